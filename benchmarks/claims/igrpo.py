"""Claim: iGRPO (best-of-N drafts, then GRPO on refinements conditioned on the best draft; arXiv:2602.09000)
beats GRPO at a matched rollout budget, partly by delaying the collapse of the policy's entropy.

    .venv/bin/python benchmarks/claims/igrpo.py --quick                    # ~3-5 minutes on 2 shared cores
    .venv/bin/python benchmarks/claims/igrpo.py --model runs/sft/final     # full, from an SFT checkpoint
    .venv/bin/python benchmarks/claims/igrpo.py                            # full; builds the SFT checkpoint first

The starting checkpoint: `--model` (an SFT checkpoint), or one built here with the ordinary stages,
`nemotron3 pretrain` at its defaults then `nemotron3 sft` for `--base-sft-steps` (100; its default is 300) steps
(quick: a few steps each), into OUT/base/ and reused by later invocations.

Runs: for each rollout budget B (`--budgets`, sampled completions per prompt) and each seed, one `nemotron3 rl`
run per algorithm from that checkpoint, the same steps, prompts (fixed by seed and step) and sampling settings:
GRPO samples B completions per prompt and trains on all; iGRPO samples B/2 drafts, keeps the best, and trains on
B/2 refinements (rl/igrpo.py). Each run scores greedy exact match on held-out problems of every family before and
after, with reasoning on; the held-out set is drawn from the seed, so both algorithms of a seed meet the same
problems (one shared held-out set per seed) and the difference after RL is paired by seed.

Printed: mean held-out exact match after RL (over the families) per algorithm and budget, mean ± s.e. over seeds;
the paired difference iGRPO - GRPO with its t and sign-flip p; the change from the checkpoint; per family; and
the policy's mean token entropy (the `entropy` of metrics.jsonl: the rollout policy's entropy over the trained
completions) at the first and last steps. The plot shows exact match per algorithm and budget and the entropy
over steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ALGOS = ("grpo", "igrpo")
PAPER_SIGN = +1  # iGRPO higher exact match


def base_checkpoint(out: Path, quick: bool, sft_steps: int = 100) -> Path:
    """An SFT checkpoint built by the ordinary stages (pretrain at its defaults, then `sft_steps` of sft) into
    out/; a finished pretraining or SFT run there is reused."""
    from rich.console import Console

    from nemotron3.stages.pretrain import PretrainConfig, pretrain
    from nemotron3.stages.sft import SFTConfig, sft

    final = out / "sft" / "final"
    if (final / "config.json").is_file():
        return final
    common.say(f"building the starting checkpoint in {out} (pretrain, then sft) ...")
    pre = out / "pretrain" / "final"
    if not (out / "pretrain" / "summary.json").is_file():
        small = dict(steps=30, batch_size=8, seq_len=128, eval_problems=0) if quick else {}
        pre = pretrain(PretrainConfig(out=out / "pretrain", overwrite=True, log_every=10**6, **small),
                       Console(quiet=True))
    sft_small = dict(steps=10, batch_size=8, eval_problems=0) if quick else dict(steps=sft_steps)
    return sft(SFTConfig(model=pre, out=out / "sft", overwrite=True, log_every=10**6, **sft_small), Console(quiet=True))


def rl_run(model: Path, out: Path, algo: str, budget: int, seed: int, args: argparse.Namespace) -> dict:
    """One `nemotron3 rl` run (in-process); its summary plus the per-step records."""
    from rich.console import Console

    from nemotron3.rl.grpo import GRPOConfig, grpo

    if not (args.reuse and (out / "summary.json").exists()):
        cfg = GRPOConfig(model=model, out=out, algo=algo, rollout_budget=budget, steps=args.steps, seed=seed,
                         prompts_per_step=args.prompts, temperature=args.temperature, eval_problems=args.eval_problems,
                         max_completion_length=args.max_completion_length, log_every=10**6, overwrite=True,
                         threads=args.threads)
        grpo(cfg, Console(quiet=True))
    summary = json.loads((out / "summary.json").read_text())
    summary["records"] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return summary


def mean_em(acc: dict[str, float]) -> float:
    """Mean exact match over the families, in %."""
    return 100 * sum(acc.values()) / max(1, len(acc))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, 2 steps, budgets 4 and 8 (a smoke test)")
    ap.add_argument("--model", type=Path, default=None, help="SFT checkpoint (default: build one in OUT/base)")
    ap.add_argument("--base-sft-steps", type=int, default=100, help="SFT steps of the checkpoint built without --model")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8], help="completions per prompt, both algorithms")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-completion-length", type=int, default=128)
    ap.add_argument("--eval-problems", type=int, default=40, help="held-out problems per family")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.ROOT / "runs/claims/igrpo")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/igrpo.png)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs from --out instead of rerunning")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.prompts, args.eval_problems, args.max_completion_length = 2, 2, 2, 2, 48
    for b in args.budgets:
        if b < 2 or b % 2:
            ap.error(f"--budgets: {b} is not an even number >= 2 (iGRPO splits a budget into drafts and refinements)")
    common.set_threads(args.threads)
    model = args.model or base_checkpoint(args.out / "base", args.quick, args.base_sft_steps)
    t0 = time.perf_counter()
    res: dict[tuple[str, int], list[dict]] = {(a, b): [] for b in args.budgets for a in ALGOS}
    for seed in range(args.seeds):
        for b in args.budgets:
            for a in ALGOS:
                s = rl_run(model, args.out / f"{a}-b{b}-seed{seed}", a, b, seed, args)
                res[a, b].append(s)
                common.say(f"{a} budget {b} seed {seed}: EM {mean_em(s['accuracy_before']):.1f} -> "
                           f"{mean_em(s['accuracy_after']):.1f} %, {s['seconds']:.0f} s")

    after = {k: [mean_em(s["accuracy_after"]) for s in v] for k, v in res.items()}
    change = {k: [mean_em(s["accuracy_after"]) - mean_em(s["accuracy_before"]) for s in v] for k, v in res.items()}
    ent = {k: [[r["entropy"] for r in s["records"] if "entropy" in r] for s in v] for k, v in res.items()}
    fams = sorted(res[ALGOS[0], args.budgets[0]][0]["accuracy_after"])
    before = [mean_em(s["accuracy_before"]) for s in res[ALGOS[0], args.budgets[0]]]
    lines = [f"GRPO vs iGRPO from {model}: {args.seeds} seeds, {args.steps} steps x {args.prompts} prompts, "
             f"temperature {args.temperature}, {args.eval_problems} held-out problems per family (reasoning on); "
             f"{common.machine()}; {time.perf_counter() - t0:.0f} s", "",
             f"mean held-out exact match before RL (each seed's set): {common.fmt(before, 1)} %", "",
             "| budget | algo | mean EM after % | change % | entropy, first step | entropy, last step | "
             "s per run (noisy) |", "|---|---|---|---|---|---|---|"]
    for b in args.budgets:
        for a in ALGOS:
            k = (a, b)
            lines.append(f"| {b} | {a} | {common.fmt(after[k], 1)} | {common.fmt(change[k], 1)} | "
                         f"{common.fmt([e[0] for e in ent[k]], 3)} | {common.fmt([e[-1] for e in ent[k]], 3)} | "
                         f"{sum(s['seconds'] for s in res[k]) / len(res[k]):.0f} |")
    lines += ["", "| budget | family | GRPO | iGRPO | iGRPO - GRPO (paired) |", "|---|---|---|---|---|"]
    for b in args.budgets:
        for f in fams:
            g, i = ([100 * s["accuracy_after"][f] for s in res[a, b]] for a in ALGOS)
            t = common.paired_test(i, g)
            lines.append(f"| {b} | {f} | {common.fmt(g, 1)} | {common.fmt(i, 1)} | {t['mean']:+.1f} ± {t['se']:.1f} |")
    lines += ["", "iGRPO - GRPO, mean exact match after RL, paired by seed (the paper: iGRPO higher):"]
    for b in args.budgets:
        t = common.paired_test(after["igrpo", b], after["grpo", b])
        te = common.paired_test([e[-1] for e in ent["igrpo", b]], [e[-1] for e in ent["grpo", b]])
        lines.append(f"  budget {b}: {common.test_text(t, 2)} points -> {common.verdict(t, PAPER_SIGN)}")
        lines.append(f"  budget {b}, entropy at the last step: {common.test_text(te, 3)}")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "igrpo.md").write_text("\n".join(lines) + "\n")

    fig, axes = common.figure(2, width=4.8)
    names = [f"{a} b={b}" for b in args.budgets for a in ALGOS]
    common.bars(axes[0], names, {f"{a} b={b}": after[a, b] for b in args.budgets for a in ALGOS},
                "mean held-out exact match (%)", "exact match after RL", from_zero=True)
    for (a, b) in ((a, b) for b in args.budgets for a in ALGOS):
        curves, color = ent[a, b], f"C{names.index(f'{a} b={b}')}"
        n = min(len(c) for c in curves)
        means = [common.mean_se([c[j] for c in curves]) for j in range(n)]
        xs = list(range(1, n + 1))
        style = "-" if b == args.budgets[0] else "--"
        axes[1].plot(xs, [m for m, _ in means], style, marker="o" if n < 30 else None, ms=3, color=color,
                     label=f"{a} b={b}")
        axes[1].fill_between(xs, [m - (s if s == s else 0) for m, s in means],
                             [m + (s if s == s else 0) for m, s in means], color=color, alpha=0.12)
    axes[1].set_xlabel("RL step")
    axes[1].set_ylabel("mean token entropy (nats)")
    axes[1].set_title("policy entropy over steps (mean ± s.e.)")
    axes[1].legend(fontsize=7)
    common.save(fig, args.plot or args.out / "igrpo.png",
                f"GRPO vs iGRPO at matched budgets, {args.seeds} seeds x {args.steps} steps")


if __name__ == "__main__":
    main()
