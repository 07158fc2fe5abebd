"""Forward and training-step throughput of nemotron3 against transformers, same weights, one run.

    python benchmarks/forward.py [--config benchmarks/t9_config.json] [--seq 2048] [--repeats 5]

Builds the T9 benchmark model with transformers (seed 0), saves it, loads the same weights into
nemotron3, and times, alternating the two systems so that machine noise hits both alike:
  * forward: batch 1 x T tokens, no grad
  * train step: batch 4 x 256, forward + backward + AdamW step
Prints tokens/s of each and the ratio ours / transformers. Best of `--repeats` runs each.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gemm_floor import record, replayer
from t9 import T9_CONFIG, t9_hf_config

import nemotron3


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
    ap.add_argument("--config", type=Path, default=T9_CONFIG)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--train-seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time our model with torch.compile'd Mamba mixers (HybridLM.compile_mixers)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = t9_hf_config(args.config)
    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**cfg))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = {"eager": nemotron3.load_pretrained(tmp)}
        if args.compile:  # the same weights again, with torch.compile'd Mamba mixers
            ours["compiled"] = nemotron3.load_pretrained(tmp).compile_mixers()
    hf.eval()
    eager = ours["eager"]
    print(f"model: T9 ({eager.num_parameters() / 1e6:.2f}M params), threads={torch.get_num_threads()}")

    V = eager.config.vocab_size
    ids = torch.randint(0, V, (1, args.seq))
    with torch.no_grad():
        diff = (hf(ids[:, :256]).logits - eager(ids[:, :256])).abs().max().item()
    print(f"sanity: max |Δlogits| on 256 tokens = {diff:.2e}")

    def forward_of(model):
        def fwd():
            with torch.no_grad():
                model(ids)
        return fwd

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

    steps = {name: make_step(m, m, fused=True) for name, m in ours.items()}
    # the matrix products alone (recorded from our eager model, replayed back to back): a floor for any
    # implementation doing the same fp32 arithmetic, hence a ceiling on the ratio against transformers;
    # timed in the same race, so that machine noise hits it like the rest
    ntok = args.train_batch * args.train_seq
    floor_fwd, floor_train = replayer(record(forward_of(eager))), replayer(record(steps["eager"]))
    fwd_t = race({"hf": forward_of(hf), **{n: forward_of(m) for n, m in ours.items()}, "floor": floor_fwd},
                 args.repeats)
    train_t = race({"hf": make_step(hf, lambda x: hf(x).logits), **steps, "floor": floor_train}, args.repeats)
    floors = {"forward": args.seq / fwd_t["floor"], "train": ntok / train_t["floor"]}

    print(f"{'tokens/s':24s}{'transformers':>13s}" + "".join(f"{'ours ' + n:>15s}{'ratio':>7s}" for n in ours)
          + f"{'GEMM floor':>12s}{'ratio':>7s}")
    for name, n_tok, t, floor in [(f"forward 1x{args.seq}", args.seq, fwd_t, floors["forward"]),
                                  (f"train step {args.train_batch}x{args.train_seq}", ntok, train_t, floors["train"])]:
        hf_rate = n_tok / t["hf"]
        cells = "".join(f"{n_tok / t[n]:>15,.0f}{n_tok / t[n] / hf_rate:>6.2f}x" for n in ours)
        print(f"{name:24s}{hf_rate:>13,.0f}{cells}{floor:>12,.0f}{floor / hf_rate:>6.2f}x")
    print("GEMM floor: the same matrix products and attention kernels replayed alone (benchmarks/gemm_floor.py):\n"
          "its ratio is the most any fp32 implementation of this model could reach against transformers here.")


if __name__ == "__main__":
    main()
