"""What each quantized format costs in accuracy and bytes, on one trained checkpoint, in one table.

    .venv/bin/python benchmarks/quantize.py --model runs/sft/final --problems 10 --json /tmp/quantize.json

For fp32, bf16 and every `nemotron3 quantize` scheme (nvfp4 and fp8 with their activations emulated): the held-out
loss (mean next-token cross-entropy over held-out task documents), greedy exact match per task family
(nemotron3.eval.accuracy.task_accuracy on the held-out split), the checkpoint's bytes on disk, and the weights'
quantization error: relative RMSE ‖W_q − W‖ / ‖W‖ over all the quantized GEMM weights (the same matrices for every
format; those kept high are excluded). SeedLM's exhaustive seed search dominates the run time.

Then the memory and speed of an NVFP4 W4A16 load kept packed (quant/packed.py, the default of `load_pretrained`):
resident bytes (every tensor's storage, `resident_bytes`) and greedy decode tokens per second of the engine, beside
the fp32 and bf16 loads and the same folder loaded with `dequantize=True` (`--decode-tokens 0` skips it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from nemotron3 import Engine, load_pretrained, save_pretrained, tasks
from nemotron3.checkpoint import checkpoint_bytes
from nemotron3.eval.accuracy import task_accuracy
from nemotron3.hf import state_dict_for_disk
from nemotron3.quant import checkpoint as qckpt
from nemotron3.quant.packed import resident_bytes
from nemotron3.stages.quantize import QuantizeConfig, quantize
from nemotron3.tokenizer import Tokenizer

ROWS = ("fp32", "bf16", "fp8", "nvfp4-w4a16", "nvfp4", "mxfp4", "mx9", "mx6", "mx4", "seedlm4", "seedlm3")
LOSS_SEED = 2   # held-out documents for the loss: not the calibration (1) nor the exact-match problems (0)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tok: Tokenizer, n: int) -> float:
    total, count = 0.0, 0
    for p in tasks.mixture(n, seed=LOSS_SEED, split="heldout"):
        ids = torch.tensor([[tok.bos_id, *tok.encode(p.text()), tok.eos_id]])
        logits = model(ids[:, :-1]).float()
        total += float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total / count


def weight_error(ref: dict[str, torch.Tensor], model: torch.nn.Module, names: list[str]) -> float:
    got = dict(state_dict_for_disk(model))
    num = sum(float((got[n].float() - ref[n]).pow(2).sum()) for n in names)
    den = sum(float(ref[n].pow(2).sum()) for n in names)
    return math.sqrt(num / den)


def decode_tok_s(model: torch.nn.Module, tok: Tokenizer, n: int) -> float:
    """Greedy decode tokens per second of one prompt (the engine's own path: fused when it can, else reference)."""
    prompt = [tok.bos_id, *tok.encode(next(iter(tasks.mixture(1, seed=LOSS_SEED, split="heldout"))).prompt)]
    engine = Engine(model, max_seq_len=len(prompt) + n + 8)
    engine.generate([prompt], 2)                               # warm-up
    t0 = time.perf_counter()
    out = engine.generate([prompt], n).tokens[0]
    return len(out) / (time.perf_counter() - t0)


def packed_rows(model_dir: Path, tmp: Path, tok: Tokenizer, n: int, console: Console) -> list[dict]:
    """Resident bytes and decode tok/s: fp32, bf16, NVFP4 W4A16 packed, and the same folder dequantized."""
    folder = quantize(QuantizeConfig(model=model_dir, out=tmp / "packed-w4a16", scheme="nvfp4-w4a16"),
                      Console(quiet=True))
    loads = {"fp32": lambda: load_pretrained(model_dir, dtype=torch.float32),
             "bf16": lambda: load_pretrained(model_dir, dtype=torch.bfloat16),
             "nvfp4-w4a16 packed": lambda: load_pretrained(folder),
             "nvfp4-w4a16 dequantized": lambda: load_pretrained(folder, dequantize=True)}
    rows = []
    for name, load in loads.items():
        model = load()
        rows.append({"load": name, "resident_bytes": resident_bytes(model),
                     "decode_tok_s": decode_tok_s(model, tok, n) if n else None})
        del model
    base = rows[0]["resident_bytes"]
    for r in rows:
        r["resident_vs_fp32"] = r["resident_bytes"] / base
        speed = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f} tok/s"
        console.print(f"{r['load']}: {r['resident_bytes']:,} resident bytes ({r['resident_vs_fp32']:.3f}x fp32), "
                      f"decode {speed}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/pretrain/final"))
    ap.add_argument("--problems", type=int, default=10, help="held-out problems per task family")
    ap.add_argument("--loss-docs", type=int, default=60, help="held-out documents for the loss")
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--formats", default=",".join(ROWS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens timed per load (0: skip)")
    args = ap.parse_args()
    console = Console(width=160)
    tok = Tokenizer.load(args.model)
    src = load_pretrained(args.model, dtype=torch.float32)
    ref = {k: v.detach().float() for k, v in state_dict_for_disk(src)}
    # the matrices every format is measured on: those quantized by the scheme with the largest block (MXFP4),
    # so that no format is measured on a matrix another one keeps high
    common = sorted(qckpt.plan(src, "mxfp4")[0])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            if fmt == "fp32":
                folder, model = args.model, src
            elif fmt == "bf16":
                folder = Path(tmp) / "bf16"
                save_pretrained(load_pretrained(args.model, dtype=torch.bfloat16), folder)
                model = load_pretrained(folder, dtype=torch.float32)
            else:
                folder = quantize(QuantizeConfig(model=args.model, out=Path(tmp) / fmt, scheme=fmt, calib=args.calib),
                                  Console(quiet=True))
                model = load_pretrained(folder, dtype=torch.float32, quantize_activations=True)
            t_quant = time.perf_counter() - t0
            acc = task_accuracy(model, tok, n_per_family=args.problems)
            row = {"format": fmt, "bits": None if fmt in ("fp32", "bf16") else qckpt.bits_per_weight(fmt),
                   "bytes": checkpoint_bytes(folder), "loss": heldout_loss(model, tok, args.loss_docs),
                   "exact_match": {f: r["accuracy"] for f, r in acc.items()},
                   "weight_rel_rmse": weight_error(ref, model, common), "seconds_to_quantize": round(t_quant, 1)}
            row["mean_exact_match"] = sum(row["exact_match"].values()) / len(row["exact_match"])
            results.append(row)
            console.print(f"{fmt}: loss {row['loss']:.4f}, exact match {row['mean_exact_match']:.3f}, "
                          f"{row['bytes']:,} bytes, weight rel. RMSE {row['weight_rel_rmse']:.4f} ({t_quant:.0f} s)")
        memory = packed_rows(args.model, Path(tmp), tok, args.decode_tokens, console)
    families = sorted(results[0]["exact_match"])
    table = Table(title=f"quantized formats on {args.model} ({args.problems} held-out problems per family; "
                  f"weight error over {len(common)} GEMM matrices)")
    for col in ("format", "bits/w", "bytes", "held-out loss", *families, "mean EM", "weight rel. RMSE"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["format"], "-" if r["bits"] is None else f"{r['bits']:g}", f"{r['bytes']:,}",
                      f"{r['loss']:.4f}", *(f"{r['exact_match'][f]:.2f}" for f in families),
                      f"{r['mean_exact_match']:.3f}", f"{r['weight_rel_rmse']:.4f}")
    console.print(table)
    four = [r for r in results if r["bits"] is not None and 4 <= r["bits"] <= 4.5]
    if four:   # the weight error is the low-noise measurement; exact match moves by 1/problems per family
        best = min(four, key=lambda r: r["weight_rel_rmse"])
        console.print(f"best 4-bit format by weight error: {best['format']} ({best['weight_rel_rmse']:.4f}); "
                      f"one problem changes a family's exact match by {1 / args.problems:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "problems": args.problems, "rows": results,
                                         "packed": memory}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
