"""MTP speculative decoding on a trained checkpoint: acceptance and wall-clock speed against plain decoding.

    python benchmarks/speculative.py [--model DIR] [--ks 1,2,3,5] [--batches 1,16] [--compile] [--repeats 3]
    python benchmarks/speculative.py --acceptance-only --model A/final B/final ...   compare trained MTP heads

With no --model, trains the default `nemotron3 pretrain` checkpoint first (a few minutes) in a temporary
folder. On held-out task prompts (`<s>{prompt}\\n`, as the pretraining documents begin), for greedy and
temperature 0.8, at each batch size, prints for k = 0 (plain decoding) and each k:
  * acceptance length: tokens emitted per verify forward per row, the extra token included;
  * per-position acceptance rate: the share of rounds whose drafts 1..i were all accepted;
  * decode tok/s (new tokens over all rows per second of the decode phase, prefill excluded), best of
    `--repeats`, timed alternately with plain decoding, and the ratio to plain decoding in the same mode;
  * with --compile, the same with the torch.compile'd steps (their compilation is warmed up first).
Also the cost of one verify forward of k+1 tokens and of one MTP draft step against a one-token step,
measured on the fast decoder: what bounds the speedup at a given acceptance length. --acceptance-only
prints, for each --model, the acceptance at each k (greedy and t = 0.8, all prompts as one batch, rows
stopping at their end-of-sequence token): no timing, so it can run beside other work.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import nemotron3
from nemotron3 import tasks
from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.tokenizer import Tokenizer


def held_out_prompts(tok: Tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n held-out problems spread over the families, as token ids."""
    fams = tasks.default_families()
    per = -(-n // len(fams))
    problems = [p for f in fams for p in tasks.generate(f, per, seed=seed, split="heldout")]
    return [[tok.bos_id, *tok.encode(p.prompt + "\n")] for p in problems[:n]]


def step_costs(model, k: int, batch: int, repeats: int = 20) -> dict[str, float]:
    """Seconds of one fast one-token step, one (k+1)-token verify forward and one MTP draft step."""
    fast = FastDecoder(model)
    V = model.config.vocab_size
    cache = HybridCache(model.config, batch, 512, max_rollback=k + 1)
    toks = torch.randint(0, V, (batch, k + 1))
    h = torch.randn(batch, model.config.hidden_size)
    with torch.inference_mode():
        model(torch.randint(0, V, (batch, 100)), cache=cache)

        def best(fn) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times)

        def one():
            fast.step(toks[:, 0], cache, int(cache.lengths.max()) + 1, True)

        def verify():
            fast.forward(toks, cache, int(cache.lengths.max()) + k + 1)
            cache.rollback(k + 1)

        def draft():
            fast.logits(fast.mtp(h, toks[:, :1], cache, cache.lengths.clone()))

        return {"step": best(one), "verify": best(verify), "draft": best(draft)}


def acceptance(model, prompts: list[list[int]], k: int, temperature: float, new: int) -> dict:
    """Acceptance stats of one speculative generate over `prompts` (stopping at the config's eos ids)."""
    out = nemotron3.Engine(model, max_seq_len=1024).generate(prompts, new, temperature=temperature, seed=0,
                                                             num_speculative_tokens=k)
    return out.stats


def compare_acceptance(paths: list[Path], ks: list[int], n_prompts: int, new: int) -> None:
    for path in paths:
        model = nemotron3.load_pretrained(path)
        prompts = held_out_prompts(Tokenizer.load(path), n_prompts)
        print(f"\n{path}:")
        for mode, temperature in (("greedy", 0.0), ("t=0.8", 0.8)):
            for k in ks:
                s = acceptance(model, prompts, k, temperature, new)
                rates = " ".join(f"{r:.2f}" for r in s["acceptance_rate_per_position"])
                print(f"  {mode:6s} k={k}  acceptance length {s['acceptance_length']:.2f}   per position: {rates}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, nargs="+", help="checkpoint folder (default: train the default pretrain run)")
    ap.add_argument("--acceptance-only", action="store_true", help="acceptance of each --model, no timing")
    ap.add_argument("--ks", default="1,2,3,5")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompts", type=int, default=36, help="held-out prompts (batch b uses the first b)")
    ap.add_argument("--new", type=int, default=96, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    if args.acceptance_only:
        if not args.model:
            raise SystemExit("error: --acceptance-only needs --model DIR [DIR ...]")
        compare_acceptance(args.model, ks, args.prompts, args.new)
        return
    args.model = args.model[0] if args.model else None
    tmp = None
    if args.model is None:
        from nemotron3.stages.pretrain import PretrainConfig, pretrain
        tmp = tempfile.TemporaryDirectory()
        print("training the default pretrain checkpoint (no --model given) ...")
        args.model = pretrain(PretrainConfig(out=Path(tmp.name) / "run"))
    model = nemotron3.load_pretrained(args.model)
    tok = Tokenizer.load(args.model)
    prompts = held_out_prompts(tok, args.prompts)
    print(f"model: {args.model} ({model.num_parameters() / 1e6:.2f}M params, pattern {model.config.pattern}, "
          f"MTP {model.config.mtp_pattern}), threads={torch.get_num_threads()}, {args.new} new tokens per row")

    costs = {k: step_costs(model, k, 1) for k in ks}
    print("\ncost against one fast one-token step, batch 1 (eager):")
    for k, c in costs.items():
        print(f"  k={k}: verify of {k + 1} tokens {c['verify'] / c['step']:.2f} steps, one MTP draft "
              f"{c['draft'] / c['step']:.2f} steps  (step {c['step'] * 1e3:.2f} ms)")

    engines = {"eager": nemotron3.Engine(model, max_seq_len=1024)}
    if args.compile:
        engines["compiled"] = nemotron3.Engine(model, max_seq_len=1024, compile=True)
    for mode, temperature in (("greedy", 0.0), ("t=0.8", 0.8)):
        for batch in batches:
            rows = prompts[:batch] if batch <= len(prompts) else (prompts * -(-batch // len(prompts)))[:batch]
            for name, engine in engines.items():
                def run(k, engine=engine, rows=rows, temperature=temperature):
                    return engine.generate(rows, args.new, temperature=temperature, seed=0, stop_token_ids=[],
                                           num_speculative_tokens=k)
                for k in [0, *ks]:  # warm up (compilation, first-call allocations)
                    run(k)
                best = dict.fromkeys([0, *ks], 0.0)
                stats = {}
                for _ in range(args.repeats):
                    for k in best:
                        out = run(k)
                        best[k] = max(best[k], out.stats["decode_tok_s"])
                        stats[k] = out.stats
                print(f"\n{mode}, batch {batch}, {name}:")
                print(f"  k=0  plain decoding          {best[0]:8,.0f} tok/s   1.00x")
                for k in ks:
                    s = stats[k]
                    rates = " ".join(f"{r:.2f}" for r in s["acceptance_rate_per_position"])
                    print(f"  k={k}  acceptance length {s['acceptance_length']:.2f}  {best[k]:8,.0f} tok/s  "
                          f"{best[k] / best[0]:5.2f}x   per position: {rates}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
