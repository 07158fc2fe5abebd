"""Claim: multi-token prediction trained with shared-weight depths gives long, stable speculative drafts (Super:
acceptance length 3.45 on SPEED-Bench; the white paper: ~97 % acceptance on the first two drafted tokens) and
helps the main model (the white paper's 8B-active ablation: +2.4 % on average across benchmarks).

    .venv/bin/python benchmarks/claims/mtp_depth.py --quick      # ~2-4 minutes on 2 shared cores
    .venv/bin/python benchmarks/claims/mtp_depth.py              # full (see --help for the sizes)

Variants: the tiny preset (`MEM*EME`, one MTP module `*E`) trained by the ordinary `nemotron3 pretrain` stage,
changing only the training loop's MTP fields (within a seed the same initial weights and data order, so the
differences are paired by seed):

    no-mtp      mtp_depths = 0: the MTP block exists but gets no loss (the main head "without the MTP loss")
    d1-w0.3     1 depth, mtp_scale 0.3
    d2-w0.3     2 depths (Super's recipe), mtp_scale 0.3
    d3-w0.3     3 depths, mtp_scale 0.3
    d2-w0.1     2 depths, mtp_scale 0.1
    d2-w1.0     2 depths, mtp_scale 1.0

(the depth axis at weight 0.3 and the weight axis at 2 depths; `--grid` trains every depth × weight pair.)

Measured per variant:
  * the main head's held-out loss (nats) after the same tokens, each MTP variant paired against no-mtp;
  * acceptance length (tokens per verify forward per row, the extra token included) of greedy speculative
    decoding with k = 1, 2, 3 drafts, on held-out task prompts, rows stopping at `</s>`: a counted quantity,
    over every seed;
  * wall-clock speed-up by k: decode tok/s with k drafts over plain decoding, batch 1, fixed-length rows, on
    the seed-0 checkpoints, best of 2, alternated. Timed on a shared 2-core machine: noisy; the acceptance
    lengths are the robust numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

KS = (1, 2, 3)


def variants(grid: bool = False) -> dict[str, dict]:
    """Training-loop MTP settings per variant name (mtp_depths, mtp_scale)."""
    pairs = [(d, w) for d in (1, 2, 3) for w in (0.1, 0.3, 1.0)] if grid else \
        [(1, 0.3), (2, 0.3), (3, 0.3), (2, 0.1), (2, 1.0)]
    return {"no-mtp": {"mtp_depths": 0, "mtp_scale": 0.3},
            **{f"d{d}-w{w}": {"mtp_depths": d, "mtp_scale": w} for d, w in pairs}}


def model_config():
    """The tiny preset with its one MTP module: the same config for every variant."""
    from nemotron3.config import ModelConfig

    return ModelConfig.preset("tiny")


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n held-out task prompts spread over the families, as the pretraining documents begin."""
    from nemotron3 import tasks

    fams = tasks.default_families()
    per = -(-n // len(fams))
    problems = [p for f in fams for p in tasks.generate(f, per, seed=seed, split="heldout")]
    return [[tokenizer.bos_id, *tokenizer.encode(p.prompt + "\n")] for p in problems[:n]]


def acceptance(model, rows: list[list[int]], new: int) -> dict[int, float]:
    """Greedy acceptance length at each k (rows stop at the model's end-of-sequence token)."""
    from nemotron3 import Engine

    engine = Engine(model, max_seq_len=512)
    return {k: engine.generate(rows, new, num_speculative_tokens=k).stats["acceptance_length"] for k in KS}


def speedups(model, row: list[int], new: int, repeats: int = 2) -> dict[int, float]:
    """Decode tok/s with k drafts over plain decoding (batch 1, `new` tokens, no stop), best of `repeats`."""
    from nemotron3 import Engine

    engine = Engine(model, max_seq_len=512)
    best = dict.fromkeys((0, *KS), 0.0)
    for k in best:
        engine.generate([row], 4, stop_token_ids=[], num_speculative_tokens=k)  # warm-up
    for _ in range(repeats):
        for k in best:
            out = engine.generate([row], new, stop_token_ids=[], num_speculative_tokens=k)
            best[k] = max(best[k], out.stats["decode_tok_s"])
    return {k: best[k] / best[0] for k in KS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds x 12 steps of 8 x 64 (a smoke test)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts for the acceptance lengths")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--grid", action="store_true", help="every depth (1-3) x weight (0.1, 0.3, 1.0)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.ROOT / "runs/claims/mtp_depth")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/mtp_depth.png)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs from --out instead of retraining")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.seq_len, args.prompts, args.new = 2, 12, 8, 64, 6, 24
    common.set_threads(args.threads)
    import torch

    from nemotron3 import load_pretrained
    from nemotron3.tokenizer import Tokenizer

    config, specs = model_config(), variants(args.grid)
    names = list(specs)
    t0 = time.perf_counter()
    loss: dict[str, list[float]] = {n: [] for n in names}
    acc: dict[str, dict[int, list[float]]] = {n: {k: [] for k in KS} for n in names}
    for seed in range(args.seeds):
        tok = None  # the seed's first run trains the tokenizer, its other variants load it
        for n in names:
            out = args.out / f"{n}-seed{seed}"
            s = common.pretrain_run(config, out, seed, args.steps, args.batch_size, args.seq_len, 0, args.reuse, tok,
                                    **specs[n])
            loss[n].append(s["eval_losses"][-1][1])
            tok = tok or out / "final"
            if n != "no-mtp":
                model = load_pretrained(out / "final", dtype=torch.float32)
                for k, a in acceptance(model, prompts(Tokenizer.load(out / "final"), args.prompts),
                                       args.new).items():
                    acc[n][k].append(a)
            common.say(f"{n} seed {seed}: held-out {loss[n][-1]:.4f}" +
                       (f", acceptance k=3 {acc[n][3][-1]:.2f}" if n != "no-mtp" else ""))
    mtp_names = names[1:]
    speed = {}
    for n in mtp_names:
        final = args.out / f"{n}-seed0" / "final"
        speed[n] = speedups(load_pretrained(final, dtype=torch.float32),
                            prompts(Tokenizer.load(final), 1)[0], args.new)

    lines = [f"MTP depth and weight, tiny hybrid: {args.seeds} seeds, {args.steps} steps x {args.batch_size} x "
             f"{args.seq_len} tokens; acceptance over {args.prompts} held-out prompts, {args.new} new tokens, greedy; "
             f"{common.machine()}; {time.perf_counter() - t0:.0f} s", "",
             "| variant | main-head held-out loss | Δ vs no-mtp (paired) | acceptance k=1 | k=2 | k=3 | "
             "speed-up k=1 / 2 / 3 (seed 0, noisy) |", "|---|---|---|---|---|---|---|"]
    tests = {}
    for n in names:
        if n == "no-mtp":
            lines.append(f"| {n} | {common.fmt(loss[n], 4)} | - | - | - | - | - |")
            continue
        tests[n] = common.paired_test(loss[n], loss["no-mtp"])
        t = tests[n]
        lines.append(f"| {n} | {common.fmt(loss[n], 4)} | {t['mean']:+.4f} ± {t['se']:.4f} (p_t {t['p_t']:.2f}) | "
                     + " | ".join(common.fmt(acc[n][k], 2) for k in KS) + " | "
                     + " / ".join(f"{speed[n][k]:.2f}x" for k in KS) + " |")
    lines += ["", "Main head with the MTP loss against without (the paper: MTP helps, lower loss):"]
    for n, t in tests.items():
        lines.append(f"  {n}: {common.test_text(t)} -> {common.verdict(t, -1)}")
    pairs = [("d3-w0.3", "d1-w0.3"), ("d2-w0.3", "d1-w0.3"), ("d3-w0.3", "d2-w0.3")]
    lines += ["", "Acceptance length at k = 3, more trained depths against fewer (paired):"]
    for a, b in pairs:
        if a in acc and b in acc:
            t = common.paired_test(acc[a][3], acc[b][3])
            lines.append(f"  {a} - {b}: {common.test_text(t, 2)} -> {common.verdict(t, +1)}")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mtp_depth.md").write_text("\n".join(lines) + "\n")

    fig, axes = common.figure(3)
    for i, n in enumerate(mtp_names):
        means = [common.mean_se(acc[n][k]) for k in KS]
        axes[0].errorbar([k + (i - 2) * 0.05 for k in KS], [m for m, _ in means],
                         yerr=[se if se == se else 0 for _, se in means], fmt="o-", capsize=3, color=f"C{i + 1}",
                         label=n)
        axes[1].plot(KS, [speed[n][k] for k in KS], "o-", color=f"C{i + 1}", label=n)
    axes[0].set_title("acceptance length (greedy, counted)")
    axes[0].set_ylabel("tokens per verify forward")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_title("speed-up over plain decoding (seed 0, noisy)")
    axes[1].set_ylabel("decode tok/s ratio")
    for ax in axes[:2]:
        ax.set_xlabel("drafted tokens k")
        ax.set_xticks(list(KS))
        ax.legend(fontsize=7)
    common.bars(axes[2], names, loss, "held-out loss (nats)", "main-head held-out loss")
    common.save(fig, args.plot or args.out / "mtp_depth.png",
                f"MTP depth / weight, tiny hybrid, {args.seeds} seeds x {args.steps} steps; mean ± s.e.")


if __name__ == "__main__":
    main()
