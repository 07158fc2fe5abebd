"""Forward and training-step throughput of nemotron3 against transformers, same weights, one run.

    python benchmarks/forward.py [--config ../shared/bench/t9_config.json] [--seq 2048] [--repeats 5]

Builds the T9 benchmark model with transformers (seed 0), saves it, loads the same weights into
nemotron3, and times, alternating the two systems so that machine noise hits both alike:
  * forward: batch 1 x T tokens, no grad
  * train step: batch 4 x 256, forward + backward + AdamW step
Prints tokens/s of each and the ratio ours / transformers. Best of `--repeats` runs each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import nemotron3
from gemm_floor import record, replay_seconds

DEFAULT_CONFIG = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "t9_config.json"


def t9_hf_config(path: Path | None) -> dict:
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    # the same model, from our preset, when ../shared is not beside the checkout
    return nemotron3.ModelConfig.preset("t9").to_hf()


def race(fns: dict, repeats: int) -> dict:
    """Best-of-`repeats` seconds for each function, interleaved so that machine noise hits all alike."""
    for fn in fns.values():
        fn()  # warm-up (and compilation, when enabled)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile our Mamba mixers (HybridLM.compile_mixers); --no-compile for eager")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = t9_hf_config(args.config)
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**cfg))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = nemotron3.load_pretrained(tmp)
    hf.eval()
    n_params = ours.num_parameters()
    print(f"model: T9 ({n_params / 1e6:.2f}M params), threads={torch.get_num_threads()}")

    V = ours.config.vocab_size
    ids = torch.randint(0, V, (1, args.seq))
    with torch.no_grad():
        diff = (hf(ids[:, :256]).logits - ours(ids[:, :256])).abs().max().item()
    print(f"sanity: max |Δlogits| on 256 tokens = {diff:.2e}")

    def fwd_ours():
        with torch.no_grad():
            ours(ids)

    def fwd_hf():
        with torch.no_grad():
            hf(ids)

    batch = torch.randint(0, V, (args.train_batch, args.train_seq + 1))
    x, y = batch[:, :-1], batch[:, 1:]

    def make_step(model, logits_fn, fused=False):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step():
            logits = logits_fn(x)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    # the matrix products alone (recorded from our eager model, replayed back to back): a floor for any
    # implementation doing the same fp32 arithmetic, hence a ceiling on the ratio against transformers
    ours_step = make_step(ours, ours, fused=True)
    floors = {"forward": replay_seconds(record(fwd_ours)), "train": replay_seconds(record(ours_step))}
    if args.compile:
        ours.compile_mixers()
    rows = []
    t = race({"hf": fwd_hf, "ours": fwd_ours}, args.repeats)
    rows.append((f"forward 1x{args.seq}", args.seq / t["hf"], args.seq / t["ours"]))
    ntok = args.train_batch * args.train_seq
    t = race({"hf": make_step(hf, lambda x: hf(x).logits), "ours": ours_step}, args.repeats)
    rows.append((f"train step {args.train_batch}x{args.train_seq}", ntok / t["hf"], ntok / t["ours"]))

    print(f"{'':28s}{'transformers':>14s}{'nemotron3':>14s}{'ratio':>8s}{'GEMM floor':>14s}{'max ratio':>11s}")
    for (name, a, b), (n_tok, floor) in zip(rows, [(args.seq, floors["forward"]), (ntok, floors["train"])]):
        print(f"{name:28s}{a:>10,.0f} t/s{b:>10,.0f} t/s{b / a:>7.2f}x{n_tok / floor:>10,.0f} t/s{n_tok / floor / a:>10.2f}x")
    print("GEMM floor: the same matrix products and attention kernels replayed alone (benchmarks/gemm_floor.py);\n"
          "max ratio: that floor against transformers, the most any fp32 implementation of this model could reach.")


if __name__ == "__main__":
    main()
