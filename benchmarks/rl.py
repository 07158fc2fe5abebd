"""RL on the embedded default: GRPO against iGRPO at a matched rollout budget, and rollout speed with speculation.

    python benchmarks/rl.py [--model runs/sft/final] [--seeds 0,1,2] [--budget 16] [--steps 60]
    python benchmarks/rl.py --throughput-only        only the rollout tok/s, with and without MTP speculation

Part 1, rollout throughput: the first training step's prompts of `nemotron3 rl` (prompts_per_step x G rows),
sampled at temperature 1 with k = 0 (plain) and k = 2, 3 (lossless MTP speculation), alternately `--repeats`
times; prints the median rollout tok/s of each (new tokens of all rows over the whole generate call, prefill
included, as the trainer sees it), their ratio to plain, and the acceptance length.

Part 3 (`--env-compare`, alone), the tool environment (issue 34): from an SFT checkpoint trained with the tool
conversations, per seed, `nemotron3 rl --env tasks --env tools:W` (`--tool-weight`, 0.5) against `--env tasks`:
the tool environment's held-out accuracy and tool-call validity (greedy episodes) before and after, each family's
change of held-out exact match, wall time; mean ± s.e. over `--seeds`.

    python benchmarks/rl.py --env-compare --model runs/sft/final --steps 60 --seeds 0,1,2

Part 2, GRPO vs iGRPO: from the same SFT checkpoint, for each seed, one `nemotron3 rl` run per algorithm with the
same number of sampled completions per prompt (`--budget`: GRPO samples B, iGRPO B/2 drafts + B/2 refinements)
and the same steps and prompts; prints held-out greedy exact match per family (reasoning on) before and after,
mean ± standard error over the seeds, the change against each seed's own held-out set (a seed draws its own
held-out problems, so GRPO and iGRPO are paired within a seed), and the runs' wall time. Runs go to a
temporary folder (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from nemotron3 import checkpoint
from nemotron3.engine import Engine
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.envs import LookupEnv
from nemotron3.rl.env_source import heldout_env
from nemotron3.rl.grpo import GRPOConfig, grpo
from nemotron3.rl.rollout import rollout
from nemotron3.rl.trainer import RLRun


def throughput(model: Path, ks: list[int], repeats: int, prompts: int, generations: int) -> None:
    cfg = GRPOConfig(model=model, prompts_per_step=prompts, num_generations=generations, eval_problems=0)
    run = RLRun(cfg, Console(quiet=True), model)
    ids = run.encode(run.prompts.batch(0, prompts))
    run.model.eval()
    rollout(run.engine, run.tokenizer, ids[:2], 2, 16, seed=0)  # warm the allocator
    speeds: dict[int, list[float]] = {k: [] for k in ks}
    accept: dict[int, list[float]] = {k: [] for k in ks}
    for r in range(repeats):
        for k in ks:
            b = rollout(run.engine, run.tokenizer, ids, generations, cfg.max_completion_length, 1.0, seed=r,
                        speculative=k)
            speeds[k].append(b.stats["tok_s"])
            accept[k].append(b.stats.get("acceptance_length", 1.0))
    base = statistics.median(speeds[0])
    print(f"rollout throughput: {prompts} prompts x {generations} completions, temperature 1, "
          f"max {cfg.max_completion_length} tokens, {torch.get_num_threads()} threads, median of {repeats}")
    for k in ks:
        s = statistics.median(speeds[k])
        print(f"  k={k}: {s:7.0f} tok/s  x{s / base:4.2f} vs plain  acceptance length {statistics.mean(accept[k]):.2f}")


def compare(model: Path, seeds: list[int], budget: int, steps: int, out: Path, extra: dict) -> None:
    results: dict[str, list[dict]] = {"grpo": [], "igrpo": []}
    before = None
    for seed in seeds:
        for algo in ("grpo", "igrpo"):
            t0 = time.perf_counter()
            cfg = GRPOConfig(model=model, out=out / f"{algo}-{seed}", algo=algo, rollout_budget=budget, steps=steps,
                             seed=seed, log_every=10**6, **extra)
            final = grpo(cfg, Console(quiet=True))
            summary = json.loads((final.parent / "summary.json").read_text())
            before = before or summary["accuracy_before"]
            results[algo].append({**summary["accuracy_after"], "_seconds": time.perf_counter() - t0,
                                  "_change": {f: a - summary["accuracy_before"][f]
                                              for f, a in summary["accuracy_after"].items()}})
            print(f"  {algo:5s} seed {seed}: {time.perf_counter() - t0:5.0f} s  " +
                  "  ".join(f"{f} {a:.0%}" for f, a in summary["accuracy_after"].items()), flush=True)
    fams = [f for f in results["grpo"][0] if not f.startswith("_")]

    def cell(algo: str, f: str) -> str:
        vals = [r[f] * 100 for r in results[algo]]
        se = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):5.1f} ± {se:3.1f}"

    print(f"\nheld-out exact match (%), reasoning on, {len(seeds)} seeds, budget {budget} completions per prompt, "
          f"{steps} steps (before: seed 0's held-out set)")
    print(f"  {'family':10s} {'before':>7s} {'GRPO':>12s} {'iGRPO':>12s}")
    for f in fams:
        print(f"  {f:10s} {before.get(f, float('nan')) * 100:7.1f} {cell('grpo', f):>12s} {cell('igrpo', f):>12s}")
    mean = {a: statistics.mean(statistics.mean(r[f] for f in fams) for r in results[a]) * 100 for a in results}
    secs = {a: statistics.mean(r["_seconds"] for r in results[a]) for a in results}
    print(f"  {'mean':10s} {statistics.mean(before[f] for f in fams) * 100:7.1f} {mean['grpo']:12.1f} "
          f"{mean['igrpo']:12.1f}")
    print(f"  wall time per run: GRPO {secs['grpo']:.0f} s, iGRPO {secs['igrpo']:.0f} s")
    print("change against each seed's own held-out set before RL (points, mean ± s.e.)")
    for algo in results:
        changes = {f: [r["_change"][f] * 100 for r in results[algo]] for f in fams}
        se = {f: statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0 for f, v in changes.items()}
        print(f"  {algo:5s} " + "  ".join(f"{f} {statistics.mean(v):+.1f}±{se[f]:.1f}" for f, v in changes.items()))


def tool_heldout(final: Path, n: int, seed: int, tokens: int) -> dict:
    """The tool environment's held-out greedy episodes of a checkpoint (rl/env_source.py heldout_env)."""
    model, tok = checkpoint.open(final, "cpu", torch.float32, require_tokenizer=True)
    engine = Engine(model, think_tokens=ThinkTokens.from_tokenizer(tok))
    return heldout_env(engine, tok, LookupEnv(), n, seed, tokens)


def env_compare(model: Path, seeds: list[int], steps: int, out: Path, weight: float, problems: int,
                tokens: int) -> None:
    """Part 3: RL on `--env tasks --env tools:W` against `--env tasks` from one SFT checkpoint, per seed: the
    tool environment's held-out accuracy and tool-call validity (greedy episodes) before and after, and each
    family's held-out exact match; mean ± s.e. over the seeds, paired within a seed (same held-out sets)."""
    arms = {"tasks+tools": ["tasks", f"tools:{weight:g}"], "tasks": ["tasks"]}
    rows: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in seeds:
        before = tool_heldout(model, problems, seed, tokens)
        for arm, env in arms.items():
            t0 = time.perf_counter()
            final = grpo(GRPOConfig(model=model, out=out / f"{arm}-{seed}", env=env, steps=steps, seed=seed,
                                    max_completion_length=tokens, micro_batch_size=16, temperature=0.7,
                                    eval_problems=problems, log_every=10**6), Console(quiet=True))
            seconds = time.perf_counter() - t0
            summary = json.loads((final.parent / "summary.json").read_text())
            after = tool_heldout(final, problems, seed, tokens)
            rows[arm].append({"seconds": seconds, "tools_before": before["accuracy"], "tools": after["accuracy"],
                              "valid": after["valid_fraction"],
                              "family": {f: summary["accuracy_after"][f] - b
                                         for f, b in summary["accuracy_before"].items()}})
            print(f"  {arm:11s} seed {seed}: {seconds:5.0f} s  tools {before['accuracy']:.0%} -> "
                  f"{after['accuracy']:.0%} (valid {after['valid_fraction'] or 0:.0%})  " +
                  "  ".join(f"{f} {d * 100:+.0f}" for f, d in rows[arm][-1]["family"].items()), flush=True)

    def ms(vals: list[float]) -> str:
        se = statistics.stdev(vals) / len(vals) ** 0.5 if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):+.1f} ± {se:.1f}"

    print(f"\n{len(seeds)} seeds, {steps} steps, {problems} held-out problems per family and of the tool "
          f"environment, completions up to {tokens} tokens; mean ± s.e. over seeds")
    for arm, rs in rows.items():
        fams = rs[0]["family"]
        print(f"  {arm:11s} tools {statistics.mean(r['tools_before'] for r in rs) * 100:.1f} % -> "
              f"{statistics.mean(r['tools'] for r in rs) * 100:.1f} % (change "
              f"{ms([(r['tools'] - r['tools_before']) * 100 for r in rs])} points), tool calls valid "
              f"{statistics.mean(r['valid'] or 0 for r in rs) * 100:.1f} %, "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} s per run")
        print("              family change (points): " + "  ".join(
            f"{f} {ms([r['family'][f] * 100 for r in rs])}" for f in fams))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("runs/sft/final"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=16, help="sampled completions per prompt, both algorithms")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per run (default: nemotron3 rl's)")
    ap.add_argument("--ks", default="0,2,3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--throughput-only", action="store_true")
    ap.add_argument("--prompts", type=int, default=None, help="prompts of the throughput batch (default: rl's)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--env-compare", action="store_true", help="only part 3: tasks + tools against tasks")
    ap.add_argument("--tool-weight", type=float, default=0.5)
    ap.add_argument("--problems", type=int, default=40, help="part 3: held-out problems per family and of tools")
    ap.add_argument("--tokens", type=int, default=256, help="part 3: --max-completion-length")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} is not a checkpoint folder: run `nemotron3 pretrain` and `nemotron3 sft` "
                         "first (or pass --model)")
    defaults = GRPOConfig()
    if args.env_compare:
        with tempfile.TemporaryDirectory() as tmp:
            env_compare(args.model, [int(s) for s in args.seeds.split(",")], args.steps or 60, args.out or Path(tmp),
                        args.tool_weight, args.problems, args.tokens)
        return
    prompts = args.prompts or defaults.prompts_per_step
    throughput(args.model, [int(k) for k in args.ks.split(",")], args.repeats, prompts, args.budget)
    if args.throughput_only:
        return
    steps = args.steps or defaults.steps
    with tempfile.TemporaryDirectory() as tmp:
        compare(args.model, [int(s) for s in args.seeds.split(",")], args.budget, steps, args.out or Path(tmp), {})


if __name__ == "__main__":
    main()
