"""One GPU benchmark (issue 31): decode, prefill, MTP speculation and training, each beside its physical bound.

    python benchmarks/gpu.py [--device D] [--quick] [--out FILE.json] [--trained CHECKPOINT] [--no-nano]

On `--device` (auto: CUDA when present, else the CPU; `--device cpu --quick` is the smoke test, seconds) it
measures, in this order, and writes one JSON (`--out`) and prints one table:

  * the machine: memory bandwidth (a large tensor copied, bytes read + written per second) and the matmul rate
    (square fp32 and bf16 matmuls, FLOP/s): the two numbers every bound below is made of;
  * decode on the T9 model (benchmarks/t9_config.json, random weights, with an MTP block) at batch 1 / 32 / 128,
    greedy, new tokens per second of the whole `Engine.generate` call; bound: reading the active parameters once
    per step at the measured bandwidth (batch B tokens per step), or their 2 FLOPs per parameter per token at the
    measured matmul rate, whichever is lower. Weights only: the cache read is left out, so the bound is loose
    in that direction;
  * prefill of one prompt (4,096 tokens; 256 with --quick) as one forward without a cache; bound: its FLOPs
    (2 per active parameter per token and the causal attention products) at the matmul rate;
  * MTP speculation k = 1..3 against plain greedy at batch 1 (and 32): the speed-up, the acceptance length and
    whether the tokens are identical. Random weights accept little: `--trained DIR` (a checkpoint with an MTP
    block, e.g. `nemotron3 run`'s sft/final) measures a trained one instead, as the issue asks;
  * a training step (forward + MTP losses + backward + AdamW) in fp32, bf16 autocast and the NVFP4 recipe's
    emulation: tokens per second and MFU (6 FLOPs per active parameter per token over the measured fp32 rate for
    fp32, the bf16 rate for the others);
  * the first 13 layers of Nano-30B-A3B (7.47 B parameters, bf16, random weights) on CUDA: decode at batch 1 and
    32 and prefill of 4,096 tokens, with the same bounds (skipped on the CPU, with --quick or --no-nano);
  * transformers' NemotronHForCausalLM on the same T9 weights (saved and loaded back): batch-1 decode and the
    prefill, where transformers is installed.

A measurement that fails is kept in the JSON with its error and the run goes on; after 280 s the remaining ones
are skipped (the budget is 5 minutes on one H200). No GPU figure has been measured with it yet (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from t9 import t9_hf_config

import nemotron3
from nemotron3.engine import Engine
from nemotron3.options import resolve_device

BUDGET_S = 280.0


class Bench:
    """The rows measured so far, the device and the deadline."""

    def __init__(self, device: torch.device, quick: bool) -> None:
        self.device, self.quick = device, quick
        self.rows: list[dict] = []
        self.machine: dict = {}
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object], repeats: int = 1) -> tuple[float, object]:
        """Best of `repeats` wall seconds of fn() (synchronised on CUDA), and its last output."""
        best, out = float("inf"), None
        for _ in range(repeats):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            best = min(best, time.perf_counter() - t)
        return best, out

    def row(self, section: str, name: str, fn: Callable[[], dict]) -> None:
        """Run one measurement; its dict (value, unit, bound, ...) becomes a row, an exception a row with the error."""
        if time.perf_counter() - self.t0 > BUDGET_S:
            self.rows.append({"section": section, "name": name, "skipped": f"past the {BUDGET_S:.0f} s budget"})
            return
        try:
            r = fn()
        except Exception as e:  # a benchmark reports what failed and goes on
            r = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            traceback.print_exc(file=sys.stderr)
        if "value" in r and r.get("bound"):
            r["of_bound"] = r["value"] / r["bound"]
        self.rows.append({"section": section, "name": name, **r})


# ----------------------------------------------------------------------------------------- the machine
def bandwidth(b: Bench) -> float:
    """Bytes per second of a large copy (read + write), best of a few."""
    n = (64 if b.quick else 2048) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=b.device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    dt, _ = b.timed(lambda: dst.copy_(src), repeats=5 if b.quick else 20)
    return 2 * src.numel() * 4 / dt


def matmul_rate(b: Bench, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in `dtype` (fp32 without TF32, torch's default)."""
    n = 512 if b.quick else 8192
    x = torch.randn(n, n, device=b.device).to(dtype)
    y = torch.randn(n, n, device=b.device).to(dtype)
    x @ y
    reps = 3 if b.quick else 10
    dt, _ = b.timed(lambda: [x @ y for _ in range(reps)], repeats=3)
    return 2 * n**3 * reps / dt


# ----------------------------------------------------------------------------------------- models
def t9_model(device: torch.device, mtp: bool = True) -> nemotron3.HybridLM:
    hf = t9_hf_config()
    config = nemotron3.ModelConfig.from_hf(dict(hf, model_type="nemotron_h"))
    if mtp:
        config = config.replace(num_nextn_predict_layers=1, mtp_pattern="*E")
    torch.manual_seed(0)
    return nemotron3.HybridLM(config).to(device).eval()


def nano13(device: torch.device) -> nemotron3.HybridLM:
    config = nemotron3.ModelConfig.preset("nano-30b-a3b")
    config = config.replace(pattern=config.pattern[:13])
    torch.manual_seed(0)
    with torch.device(device):
        model = nemotron3.HybridLM(config)
    return model.to(torch.bfloat16).eval()


def param_bytes(model: nemotron3.HybridLM) -> tuple[int, int]:
    """(active parameters per token, their bytes)."""
    active = model.num_parameters(active=True)
    size = next(model.parameters()).element_size()
    return active, active * size


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def decode_row(b: Bench, model: nemotron3.HybridLM, batch: int, new: int) -> dict:
    engine = Engine(model)
    ps = prompts(model.config.vocab_size, batch, 32)
    engine.generate(ps, 2, stop_token_ids=[], num_speculative_tokens=0)  # warm-up
    dt, _ = b.timed(lambda: engine.generate(ps, new, stop_token_ids=[], num_speculative_tokens=0))
    active, nbytes = param_bytes(model)
    by_bytes = batch * b.machine["bandwidth_bytes_s"] / nbytes
    by_flops = b.machine[f"matmul_{_dt(model)}_flop_s"] / (2 * active)
    return {"value": batch * new / dt, "unit": "tok/s", "bound": min(by_bytes, by_flops),
            "bound_is": f"{'bytes' if by_bytes < by_flops else 'FLOPs'}: {nbytes / 1e6:,.1f} MB of active weights "
                        f"per step, {2 * active / 1e6:,.1f} MFLOP per token",
            "batch": batch, "new_tokens": new}


def _dt(model: torch.nn.Module) -> str:
    return "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"


def prefill_flops(model: nemotron3.HybridLM, length: int) -> float:
    """2 FLOPs per active parameter per token, and causal attention's QK^T and PV (2 x 2 L^2/2 per head-dim)."""
    c = model.config
    attention = c.pattern.count("*")
    per_layer = 2 * length**2 * c.num_attention_heads * c.head_dim
    return 2 * model.num_parameters(active=True) * length + attention * per_layer


def prefill_row(b: Bench, model: nemotron3.HybridLM, length: int) -> dict:
    ids = torch.tensor(prompts(model.config.vocab_size, 1, length), device=b.device)
    with torch.no_grad():
        model(ids[:, :64])
        dt, _ = b.timed(lambda: model(ids), repeats=2 if b.quick else 3)
    bound = b.machine[f"matmul_{_dt(model)}_flop_s"] * length / prefill_flops(model, length)
    return {"value": length / dt, "unit": "tok/s", "bound": bound, "bound_is": "FLOPs at the matmul rate",
            "tokens": length}


def mtp_row(b: Bench, model: nemotron3.HybridLM, batch: int, k: int, new: int, trained: bool) -> dict:
    engine = Engine(model)
    ps = prompts(model.config.vocab_size, batch, 32, seed=1)
    engine.generate(ps, 2, stop_token_ids=[], num_speculative_tokens=k)
    t_plain, plain = b.timed(lambda: engine.generate(ps, new, stop_token_ids=[], num_speculative_tokens=0))
    t_spec, spec = b.timed(lambda: engine.generate(ps, new, stop_token_ids=[], num_speculative_tokens=k))
    return {"value": t_plain / t_spec, "unit": "x plain", "bound": k + 1.0, "bound_is": "k + 1 tokens per verify",
            "acceptance_length": spec.stats.get("acceptance_length"), "identical": spec.tokens == plain.tokens,
            "batch": batch, "k": k, "weights": "trained" if trained else "random (low acceptance)"}


def train_row(b: Bench, base: nemotron3.HybridLM, mode: str, rows: int, length: int, steps: int) -> dict:
    from nemotron3.stages.pretrain import _convert_nvfp4
    from nemotron3.train.data import PackedData
    from nemotron3.train.loss import Normalizer, micro_loss
    from nemotron3.train.optim import build_optimizer

    model = copy.deepcopy(base).cpu()
    if mode == "nvfp4":
        model = _convert_nvfp4(model, [], 0)
    model = model.to(b.device).train()
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    ids = torch.tensor(prompts(model.config.vocab_size, rows, length + 1))
    batch = PackedData(ids, torch.ones_like(ids, dtype=torch.bool)).batch(0, rows)
    batch = type(batch)(batch.inputs.to(b.device), batch.targets.to(b.device), batch.mask.to(b.device))
    norm = Normalizer.of(batch.mask, 2)

    def step() -> None:
        with torch.autocast(b.device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            micro_loss(model, batch, norm, 2, 0.3).total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    dt, _ = b.timed(lambda: [step() for _ in range(steps)])
    tok_s = rows * length * steps / dt
    rate = b.machine["matmul_fp32_flop_s" if mode == "fp32" else "matmul_bf16_flop_s"]
    flops = 6 * model.num_parameters(active=True)
    return {"value": tok_s, "unit": "tok/s", "bound": rate / flops,
            "bound_is": f"6 FLOPs per active parameter per token at the {'fp32' if mode == 'fp32' else 'bf16'} "
                        "matmul rate", "mfu": tok_s * flops / rate, "rows": rows, "seq_len": length}


def transformers_rows(b: Bench, ours: nemotron3.HybridLM, new: int, length: int) -> None:
    try:
        from transformers import NemotronHForCausalLM
    except ImportError as e:
        b.rows.append({"section": "transformers", "name": "NemotronHForCausalLM", "skipped": str(e)})
        return
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    plain = t9_model(torch.device("cpu"), mtp=False)
    plain.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items() if not k.startswith("mtp.")})
    nemotron3.save_pretrained(plain, tmp)
    hf = NemotronHForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(b.device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    ids = torch.tensor(prompts(plain.config.vocab_size, 1, 32), device=b.device)
    long = torch.tensor(prompts(plain.config.vocab_size, 1, length), device=b.device)

    def decode() -> dict:
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=2, do_sample=False)
            dt, _ = b.timed(lambda: hf.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new))
        return {"value": new / dt, "unit": "tok/s", "batch": 1, "new_tokens": new}

    def prefill() -> dict:
        with torch.no_grad():
            hf(long[:, :64])
            dt, _ = b.timed(lambda: hf(long), repeats=2)
        return {"value": length / dt, "unit": "tok/s", "tokens": length}

    b.row("transformers", "T9 decode batch 1", decode)
    b.row("transformers", f"T9 prefill 1x{length}", prefill)


# ----------------------------------------------------------------------------------------- the run
def run(device: torch.device, quick: bool, trained: Path | None, nano: bool) -> dict:
    b = Bench(device, quick)
    b.machine = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "threads": torch.get_num_threads()}
    b.machine["bandwidth_bytes_s"] = bandwidth(b)
    b.machine["matmul_fp32_flop_s"] = matmul_rate(b, torch.float32)
    b.machine["matmul_bf16_flop_s"] = matmul_rate(b, torch.bfloat16)
    new = 8 if quick else 64
    t9 = t9_model(device)
    for batch in ((1, 4) if quick else (1, 32, 128)):
        b.row("decode", f"T9 fp32 batch {batch}", lambda batch=batch: decode_row(b, t9, batch, new))
    length = 256 if quick else 4096
    b.row("prefill", f"T9 fp32 1x{length}", lambda: prefill_row(b, t9, length))
    spec_model = nemotron3.load_pretrained(trained, device=device).eval() if trained else t9
    for batch in ((1,) if quick else (1, 32)):
        for k in (1, 2, 3):
            b.row("mtp", f"k={k} batch {batch}",
                  lambda batch=batch, k=k: mtp_row(b, spec_model, batch, k, new, trained is not None))
    rows, seq, steps = (2, 64, 1) if quick else (16, 512, 3)
    for mode in ("fp32", "bf16", "nvfp4"):
        b.row("train", f"T9 {mode} {rows}x{seq}", lambda mode=mode: train_row(b, t9, mode, rows, seq, steps))
    if nano and device.type == "cuda" and not quick:
        big = nano13(device)
        for batch in (1, 32):
            b.row("nano13", f"bf16 decode batch {batch}", lambda batch=batch: decode_row(b, big, batch, 32))
        b.row("nano13", "bf16 prefill 1x4096", lambda: prefill_row(b, big, 4096))
        del big
    else:
        b.rows.append({"section": "nano13", "name": "Nano-30B-A3B first 13 layers",
                       "skipped": "CUDA only, not with --quick or --no-nano"})
    transformers_rows(b, t9, new, length)
    return {"machine": b.machine, "quick": quick, "seconds": round(time.perf_counter() - b.t0, 1), "rows": b.rows}


def _num(x: float) -> str:
    return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"device {m['device']} ({m['name']}), torch {m['torch']}: bandwidth {m['bandwidth_bytes_s'] / 1e9:,.1f} "
             f"GB/s, matmul fp32 {m['matmul_fp32_flop_s'] / 1e12:,.2f} TFLOP/s, bf16 "
             f"{m['matmul_bf16_flop_s'] / 1e12:,.2f} TFLOP/s; {result['seconds']} s",
             f"{'section':<13}{'measurement':<28}{'value':>14}  {'unit':<9}{'bound':>12}  {'of bound':>8}  notes",
             "-" * 110]
    for r in result["rows"]:
        if "value" not in r:
            lines.append(f"{r['section']:<13}{r['name']:<28}{'-':>14}  {'':<9}{'':>12}  {'':>8}  "
                         f"{r.get('error') or r.get('skipped')}")
            continue
        notes = []
        if "acceptance_length" in r:
            notes.append(f"acceptance {r['acceptance_length']:.2f}" if r["acceptance_length"] else "")
            notes.append("identical" if r["identical"] else "TOKENS DIFFER")
            notes.append(r["weights"])
        if "mfu" in r:
            notes.append(f"MFU {100 * r['mfu']:.1f} %")
        bound = _num(r["bound"]) if r.get("bound") else "-"
        of = f"{100 * r['of_bound']:.1f} %" if "of_bound" in r else "-"
        lines.append(f"{r['section']:<13}{r['name']:<28}{_num(r['value']):>14}  {r['unit']:<9}{bound:>12}  {of:>8}  "
                     + ", ".join(n for n in notes if n))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (as every nemotron3 command)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test (seconds on a CPU)")
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--trained", type=Path, help="a checkpoint with an MTP block for the speculation rows")
    ap.add_argument("--no-nano", action="store_true", help="skip the 13-layer Nano rows")
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.set_flush_denormal(True)
    result = run(device, args.quick, args.trained, not args.no_nano)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
