"""The NVFP4 pretraining recipe against unquantized training, and its ablations, on the tiny model.

    .venv/bin/python benchmarks/nvfp4_recipe.py                  # 5 variants x 2 seeds, ~40 min on 2 cores
    .venv/bin/python benchmarks/nvfp4_recipe.py --jobs 2 --steps 600 --seeds 0 1 2 3 4 --variants nvfp4
                                                                 # the longer comparison, two runs at a time
    .venv/bin/python benchmarks/nvfp4_recipe.py --seeds 0 --steps 100   # a quick look
    .venv/bin/python benchmarks/nvfp4_recipe.py --reuse          # re-print the table from finished runs

Every variant is the project's own `nemotron3 pretrain` (same loop, data, schedule and checkpoint
format), run as a subprocess into `--out/<variant>-seed<N>/`:

    fp32          no quantization (fp32 master weights and fp32 GEMMs)
    nvfp4         the recipe: NVFP4 fprop/dgrad/wgrad with 16x16 weight tiles, RHT on the wgrad
                  operands, stochastic rounding of gradients; Super's precision policy (last ~15 %
                  of layers, attention, latent projections, MTP and head high precision; Mamba
                  out_proj in MXFP8)
    nvfp4-no-rht  the recipe without the random Hadamard transform      (--nvfp4-off rht)
    nvfp4-no-sr   the recipe with round-to-nearest gradients            (--nvfp4-off sr)
    nvfp4-no-2d   the recipe with 1x16 weight blocks in every GEMM      (--nvfp4-off 2d)
    nvfp4-switch  the recipe, then the last 18 % of steps unquantized     (--nvfp4-high-precision-tail 0.18)

Within a seed every variant starts from the same initial weights and sees the same batches in the
same order, so the differences are paired: each is reported as its mean over seeds ± the standard
error of that mean (from 3 seeds on), and the seed-to-seed spread of the fp32 run is printed for scale.
The metric is the final held-out loss (main head, nats, computed with the variant's own quantized
forward), and the mean training loss over the last 10 % of steps.

What the paper reports (docs/low-precision.md §5): NVFP4 within ~1-1.5 % of the higher-precision loss at
12B / 10T tokens, and removing SR, RHT or 2-D weights each worsens the loss (Fig. 4). At this scale
(1.8M parameters, 1.2M tokens at the default 300 steps) the per-GEMM quantization error matters less
than the optimisation noise, so small ablation effects may fall inside the seed spread: the table says
which do.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "nvfp4": ["--nvfp4"],
    "nvfp4-no-rht": ["--nvfp4", "--nvfp4-off", "rht"],
    "nvfp4-no-sr": ["--nvfp4", "--nvfp4-off", "sr"],
    "nvfp4-no-2d": ["--nvfp4", "--nvfp4-off", "2d"],
    "nvfp4-switch": ["--nvfp4", "--nvfp4-high-precision-tail", "0.18"],
}
# The sign of the change the paper reports against the full recipe: +1 worse (Fig. 4), -1 better (App. D).
PAPER_SIGN = {"nvfp4-no-rht": +1, "nvfp4-no-sr": +1, "nvfp4-no-2d": +1, "nvfp4-switch": -1}


def say(text: str) -> None:
    """One timestamped progress line, written in one call so that parallel runs do not interleave."""
    sys.stdout.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


def run_variant(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one variant (unless `--reuse` finds its summary) and return its metrics."""
    out = args.out / f"{name}-seed{seed}"
    summary_path = out / "summary.json"
    if not (args.reuse and summary_path.exists()):
        cmd = [sys.executable, "-m", "nemotron3.cli", "pretrain", "--out", str(out), "--seed", str(seed),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.steps),
               "--eval-problems", "0", *VARIANTS[name]]
        say(f"{name} seed {seed}: {' '.join(cmd[3:])}")
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        with (args.out / f"{name}-seed{seed}.log").open("w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); see {log.name}")
        say(f"{name} seed {seed} done in {time.perf_counter() - t0:.0f} s")
    summary = json.loads(summary_path.read_text())
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    losses = [r["loss"] for r in records if "loss" in r and not r.get("skipped")]
    tail = losses[-max(1, len(losses) // 10):]
    return {"heldout": summary["eval_losses"][-1][1], "train_tail": sum(tail) / len(tail),
            "seconds": summary["train_seconds"], "skipped": len(summary["skipped_steps"])}


def cross_eval(seed: int, args: argparse.Namespace) -> dict[tuple[str, ...], float]:
    """Held-out loss of the fp32- and the NVFP4-trained checkpoint of `seed`, each under both forwards,
    and under its own forward per task family (keys (trained, forward) and (trained, family)).

    Separates the two ways the recipe can cost loss: weights that learned less (the NVFP4-trained
    checkpoint is worse even when run in fp32) and rounding at evaluation time (the fp32-trained
    checkpoint gets worse when its forward is quantized). The held-out set is rebuilt exactly as
    `nemotron3 pretrain` builds it, so the diagonal reproduces each run's own final loss; the
    family sets are its 20 problems per family (`tasks.mixture` draws them with `tasks.generate`).
    """
    import torch

    from nemotron3 import load_pretrained, tasks
    from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4
    from nemotron3.tokenizer import Tokenizer
    from nemotron3.train import data as train_data
    from nemotron3.train.evaluate import eval_loss

    losses: dict[tuple[str, ...], float] = {}
    for trained in ("fp32", "nvfp4"):
        final = args.out / f"{trained}-seed{seed}" / "final"
        tokenizer = Tokenizer.load(final)

        def rows(texts: list[str], tokenizer: Tokenizer = tokenizer) -> train_data.PackedData:
            part = train_data.build(tokenizer, texts, 256, seed)
            return train_data.PackedData(part.rows, part.mask, seed)
        model = load_pretrained(final, dtype=torch.float32)
        for fwd in ("fp32", "nvfp4"):
            if fwd == "nvfp4":
                convert_to_nvfp4(model, PrecisionPolicy())
            heldout = train_data.task_texts(train_data.HELDOUT_TASK_PROBLEMS, seed, "heldout", 1)
            losses[trained, fwd] = eval_loss(model, rows(heldout))
            if fwd == trained:
                per_family = train_data.HELDOUT_TASK_PROBLEMS // len(tasks.default_families())
                for family in tasks.default_families():
                    texts = [p.text() for p in tasks.generate(family, per_family, seed, "heldout", 1)]
                    losses[trained, family] = eval_loss(model, rows(texts))
    return losses


def rel_pct(x: float, ref: float) -> float:
    """`x` relative to `ref`, in %."""
    return (x / ref - 1) * 100


def standard_error(d: list[float]) -> float:
    """Standard error of the mean of `d`; NaN below 3 seeds (too few to estimate a spread)."""
    return statistics.stdev(d) / len(d) ** 0.5 if len(d) >= 3 else float("nan")


def paired_text(d: list[float]) -> str:
    """'+m ± se %' for per-seed relative differences in % (the ± only when it can be estimated)."""
    se = standard_error(d)
    return f"{statistics.mean(d):+.2f}{f' ± {se:.2f}' if se == se and any(d) else ''} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("runs/nvfp4_recipe"))
    ap.add_argument("--reuse", action="store_true", help="keep runs whose summary.json exists")
    ap.add_argument("--cross-eval", action="store_true",
                    help="also evaluate each seed's fp32 and nvfp4 checkpoints under both forwards "
                         "(is the gap in the learned weights or in evaluation-time rounding?)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once, the cores split between them (2 one-thread runs do ~1.3x the work of one "
                         "two-thread run on this 2-core machine: the tiny model's GEMMs are too small to scale)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be >= 1")
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if "fp32" not in args.variants:
        args.variants.insert(0, "fp32")
    args.out.mkdir(parents=True, exist_ok=True)

    keys = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait on subprocesses
        res = dict(zip(keys, pool.map(lambda k: run_variant(*k, args), keys)))
    base = {s: res["fp32", s] for s in args.seeds}

    def rel(v: str, ref: str) -> list[float]:
        """Per-seed held-out loss of variant `v` relative to variant `ref`, in %."""
        return [rel_pct(res[v, s]["heldout"], res[ref, s]["heldout"]) for s in args.seeds]
    spread = (max(b["heldout"] for b in base.values()) - min(b["heldout"] for b in base.values())) / \
        statistics.mean(b["heldout"] for b in base.values()) * 100 if len(args.seeds) > 1 else float("nan")

    lines = [f"NVFP4 recipe on the tiny model: {args.steps} steps x {args.batch_size} x 256 tokens, seeds {args.seeds}",
             f"fp32 held-out loss spread across seeds: {spread:.2f} % (the noise of one comparison)", "",
             "| variant | held-out loss (per seed) | Δ vs fp32 (paired, mean ± s.e.) | Δ vs nvfp4 (paired) "
             "| train loss, last 10 % | train s | skipped |",
             "|---|---|---|---|---|---|---|"]
    for v in args.variants:
        rows = [res[v, s] for s in args.seeds]
        d_nv = paired_text(rel(v, "nvfp4")) if "nvfp4" in args.variants else "-"
        per_seed = " / ".join(f"{r['heldout']:.4f}" for r in rows)
        lines.append(f"| {v} | {per_seed} | {paired_text(rel(v, 'fp32'))} | {d_nv} "
                     f"| {statistics.mean(r['train_tail'] for r in rows):.4f} "
                     f"| {statistics.mean(r['seconds'] for r in rows):.0f} | {sum(r['skipped'] for r in rows)} |")
    if "nvfp4" in args.variants:
        lines.append("")
        for v, what in (("nvfp4", "NVFP4 recipe"), ("nvfp4-switch", "NVFP4 recipe, then the last steps unquantized,")):
            if v in args.variants:
                d = statistics.mean(rel(v, "fp32"))
                lines.append(f"{what} vs fp32: {d:+.2f} % (goal: within 3 %) -> {'met' if abs(d) <= 3 else 'NOT met'}")
        for v in [x for x in args.variants if x in PAPER_SIGN]:
            per_seed = rel(v, "nvfp4")
            d = statistics.mean(per_seed)
            paper = "worse" if PAPER_SIGN[v] > 0 else "better"
            verdict = f"{'worse' if d > 0 else 'better'}, " + \
                ("as the paper reports" if d * PAPER_SIGN[v] > 0 else f"the paper reports {paper}")
            consistent = "the same sign on every seed" if all(x > 0 for x in per_seed) or all(x < 0 for x in per_seed) \
                else "the sign differs across seeds (noise)"
            se = standard_error(per_seed)
            size = (f"{abs(d) / se:.1f} standard errors from zero" if se == se and se > 0
                    else "too few seeds for a standard error")
            seeds = ", ".join(f"{x:+.2f}" for x in per_seed)
            lines.append(f"{v}: {d:+.2f} % vs the full recipe (per seed {seeds}): "
                         f"{verdict}; {consistent}; {size}")
    if args.cross_eval and "nvfp4" in args.variants:
        ce = {s: cross_eval(s, args) for s in args.seeds}

        def pct(trained: str, fwd: str) -> str:
            return paired_text([rel_pct(ce[s][trained, fwd], ce[s]["fp32", "fp32"]) for s in args.seeds])
        lines += ["", "Held-out loss by how the weights were trained (rows) and how the forward runs (columns), "
                  "vs the fp32-trained model in fp32:", "",
                  "| trained \\ forward | fp32 | NVFP4 (the policy's layers) |", "|---|---|---|"]
        for trained in ("fp32", "nvfp4"):
            cells = [" / ".join(f"{ce[s][trained, fwd]:.4f}" for s in args.seeds) + f" ({pct(trained, fwd)})"
                     for fwd in ("fp32", "nvfp4")]
            lines.append(f"| {trained} | {cells[0]} | {cells[1]} |")
        lines += ["", "Held-out loss of the NVFP4 run vs the fp32 run by task family (each under its own forward), "
                  "per seed:", "", "| family | fp32 | nvfp4 | Δ per seed | Δ (paired) |", "|---|---|---|---|---|"]
        for family in sorted({k[1] for s in ce for k in ce[s]} - {"fp32", "nvfp4"}):
            d = [rel_pct(ce[s]["nvfp4", family], ce[s]["fp32", family]) for s in args.seeds]
            lines.append(f"| {family} | {statistics.mean(ce[s]['fp32', family] for s in args.seeds):.4f} "
                         f"| {statistics.mean(ce[s]['nvfp4', family] for s in args.seeds):.4f} "
                         f"| {' / '.join(f'{x:+.1f}' for x in d)} | {paired_text(d)} |")
    text = "\n".join(lines)
    print(text)
    (args.out / "nvfp4_recipe.md").write_text(text + "\n")
    print(f"\n(table written to {args.out / 'nvfp4_recipe.md'})")


if __name__ == "__main__":
    main()
