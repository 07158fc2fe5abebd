"""`nemotron3 run`: the whole recipe on the embedded default, stage by stage, then a report.

    from nemotron3.run import RunConfig, run
    report = run(RunConfig(out="runs/latest"))           # == `nemotron3 run`; -> report.json's content

    nemotron3 run                                    the default budget: 20 minutes on 2 CPU cores
    nemotron3 run --budget-minutes 60                a better model: more steps in every training stage
    nemotron3 run --stages tokenizer pretrain sft    only these (the others are listed as skipped)
    nemotron3 run --resume                           after a kill: skip the complete stages, resume the one in
                                                     progress from its newest checkpoint

The stages (run/stages.py) are functions, not subprocesses: tokenizer, pretrain (NVFP4 recipe with MTP and the
end-of-training switch), precision (its high-precision twin), sft, rl (GRPO), igrpo (budgets >= 40 min),
eval, speculative, speed (against transformers), quantize, report. Each writes its own folder under `--out`. The
budget rule (run/plan.py) decides every stage's size from `--budget-minutes` alone. One progress display covers
the run: the current stage, its own progress, elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.text import Text

from nemotron3.options import ConfigError, StageConfig, device_of, device_option, fail, option, restore_config, to_dict
from nemotron3.presets import PRESETS
from nemotron3.run import report as report_mod
from nemotron3.run import stages as S
from nemotron3.run.plan import CPT_FROM_MINUTES, IGRPO_FROM_MINUTES, MAX_BUDGET_MINUTES, STAGES, Plan, plan

REQUIRES = {"pretrain": ["tokenizer"], "precision": ["pretrain"], "cpt": ["pretrain"], "sft": ["pretrain"],
            "rl": ["sft"], "igrpo": ["sft"], "eval": ["rl"], "speculative": ["rl", "sft"], "speed": ["rl"],
            "quantize": ["rl"]}
# the fields a resumed run may change: the others decide what the run computes
OPERATIONAL = ("out", "resume", "stages", "device")


@dataclass
class RunConfig(StageConfig):
    """Where the run writes, how long it may take, and which stages run."""

    stage = "run"

    out: Path = option(Path("runs/latest"), "output folder: one subfolder per stage, report.md/.html/.json, plots/")
    budget_minutes: float = option(20.0, "total budget in minutes; every stage's size follows from it (run/plan.py)",
                                   min=0.25, max=MAX_BUDGET_MINUTES)
    stages: list[str] = option([], "run only these stages (default: all); the others are listed as skipped",
                               choices=STAGES, metavar="STAGE")
    steps: int = option(0, "pretraining steps (0 = from the budget)", min=0)
    nvfp4: bool = option(True, "pretrain with the NVFP4 recipe (--no-nvfp4: high precision, no gap measured)")
    config: str = option("tiny", f"model preset ({', '.join(sorted(PRESETS))}) or config.json")
    seed: int = option(0, "seed of every stage", min=0)
    resume: bool = option(False, "continue the run in --out: complete stages are skipped, the one in progress "
                          "resumes from its newest checkpoint")
    device: str = device_option()  # every stage's: the models trained, measured and quantized live there

    def validate(self) -> None:
        super().validate()
        for name in self.stages:
            missing = [r for r in REQUIRES.get(name, []) if r not in self.stages]
            if missing and not self.resume:
                fail(self, "stages", f"{name} needs {', '.join(missing)} (add them, or --resume a run that has "
                     "them)")


@dataclass
class Stage:
    name: str
    title: str
    fn: Callable[..., dict]
    skip: Callable[[S.Context], str | None] = lambda ctx: None


def _stages() -> list[Stage]:
    return [
        Stage("tokenizer", "byte-level BPE tokenizer", S.tokenizer_stage),
        Stage("pretrain", "pretraining (NVFP4 recipe, MTP)", S.pretrain_stage),
        Stage("precision", "high-precision twin (NVFP4 gap)", S.precision_stage,
              lambda ctx: None if ctx.nvfp4 else "pretraining ran in high precision (--no-nvfp4): no gap to measure"),
        Stage("cpt", "long-context CPT (retrieval by length)", S.cpt_stage,
              lambda ctx: None if ctx.plan.cpt else f"budget under {CPT_FROM_MINUTES:g} minutes"),
        Stage("sft", "SFT (reasoning on / off / budgets)", S.sft_stage),
        Stage("rl", "RL (GRPO)", S.rl_stage),
        Stage("igrpo", "RL (iGRPO, same budget)", S.igrpo_stage,
              lambda ctx: None if ctx.plan.igrpo else f"budget under {IGRPO_FROM_MINUTES:g} minutes"),
        Stage("eval", "evaluation by reasoning mode", S.eval_stage),
        Stage("speculative", "MTP speculative decoding", S.speculative_stage),
        Stage("speed", "engine against transformers", S.speed_stage, lambda ctx: S.speed_skip()),
        Stage("quantize", "quantized export", S.quantize_stage, lambda ctx: S.quantize_skip()),
    ]


class _Clock:
    """Elapsed time and an estimate of the time left: the plan's remaining stage estimates, scaled by how the
    finished stages compared with their own estimates."""

    def __init__(self, estimates: dict[str, float], budget_s: float) -> None:
        self.t0 = time.perf_counter()
        self.estimates, self.budget_s = estimates, budget_s
        self.done: dict[str, float] = {}
        self.current: str | None = None
        self.current_t0 = self.t0

    def start(self, name: str) -> None:
        self.current, self.current_t0 = name, time.perf_counter()

    def finish(self, name: str, seconds: float | None = None) -> None:
        self.done[name] = time.perf_counter() - self.current_t0 if seconds is None else seconds
        self.current = None

    def left(self) -> float:
        est_done = sum(self.estimates[n] for n in self.done if n in self.estimates)
        speed = (sum(self.done.values()) / est_done) if est_done > 1 else 1.0
        remaining = sum(e for n, e in self.estimates.items() if n not in self.done)
        in_current = time.perf_counter() - self.current_t0 if self.current else 0.0
        return max(0.0, remaining * speed - in_current)

    def completed(self) -> float:
        cur = min(self.estimates.get(self.current, 0.0), time.perf_counter() - self.current_t0) if self.current else 0
        return sum(self.estimates.get(n, 0.0) for n in self.done) + cur


class _ClockColumn(ProgressColumn):
    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def render(self, task) -> Text:
        el = time.perf_counter() - self.clock.t0
        return Text(f"{_mmss(el)} elapsed, ~{_mmss(self.clock.left())} left (budget {_mmss(self.clock.budget_s)})")


def _mmss(s: float) -> str:
    return f"{int(s) // 60}:{int(s) % 60:02d}"


def _restore(cfg: RunConfig) -> RunConfig:
    """The configuration to run with: `cfg` for a new run; with --resume, the run saved in `out/run.json` (a flag
    that would change what it computes is refused; `--stages` may change)."""
    saved_file = cfg.out / "run.json"
    if not cfg.resume:
        if saved_file.is_file():
            raise ConfigError(f"{cfg.out} holds an earlier run (run.json): add --resume to continue it, or choose "
                              "another --out")
        S.check_new_run(cfg.out)
        return cfg
    if not saved_file.is_file():
        S.check_new_run(cfg.out)
        return cfg
    return restore_config(cfg, json.loads(saved_file.read_text()), saved_file, OPERATIONAL)


def run(cfg: RunConfig, console: Console | None = None) -> dict:
    """Run (or resume) the pipeline in `cfg.out`; returns the report (report.json's content)."""
    console = console or Console()
    torch.set_flush_denormal(True)  # as every `nemotron3` command does (cli.py says why)
    cfg = _restore(cfg)
    device_of(cfg)  # a device this machine lacks is refused before anything is written
    p: Plan = plan(cfg.budget_minutes, cfg.steps)
    cfg.out.mkdir(parents=True, exist_ok=True)
    S.write_json(cfg.out / "run.json", to_dict(cfg))
    ctx = S.Context(cfg.out, p, console, cfg.config, cfg.seed, cfg.nvfp4, cfg.device)
    timing_file = cfg.out / "timing.json"
    timing: dict[str, float] = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    status: dict[str, str] = {}
    todo: list[Stage] = []
    for st in _stages():
        why = None if not cfg.stages or st.name in cfg.stages else "not in --stages"
        why = why or st.skip(ctx)
        if why:
            status[st.name] = f"skipped: {why}"
        elif (ctx.dir(st.name) / "summary.json").is_file():
            status[st.name] = "done"
        else:
            todo.append(st)
    for st in todo:
        missing = [r for r in REQUIRES.get(st.name, []) if status.get(r, "done") != "done"
                   and r not in [t.name for t in todo]]
        if missing:
            raise ConfigError(f"stage {st.name} needs {', '.join(missing)}, which did not run ({status[missing[0]]})")
    estimates = {st.name: p.seconds.get(st.name, 0.0) for st in todo}
    estimates["report"] = p.seconds["report"]
    clock = _Clock(estimates, 60 * cfg.budget_minutes)
    console.rule(f"[bold]nemotron3 run[/]: the Nemotron 3 recipe in miniature, budget {cfg.budget_minutes:g} min "
                 f"-> {cfg.out}")
    console.print(f"plan: pretrain {p.pretrain_steps} steps ({'NVFP4' if cfg.nvfp4 else 'high precision'}), "
                  f"twin {p.twin_steps}, SFT {p.sft_steps}, RL {p.rl_steps}{' + iGRPO' if p.igrpo else ''}, "
                  f"{p.eval_problems} held-out problems per family")
    for name, st in status.items():
        if st != "done" or name in [t.name for t in todo]:
            continue
        console.print(f"  [dim]{name}: complete, skipped[/]")
    for name, st in status.items():
        if st.startswith("skipped"):
            console.print(f"  [yellow]{name}: {st}[/]")
    columns = (TextColumn("[bold]run[/] {task.description}"), BarColumn(), _ClockColumn(clock))
    stop = threading.Event()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("", total=max(1.0, sum(estimates.values())))

        def tick() -> None:
            while not stop.wait(0.5):
                bar.update(task, completed=clock.completed())

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            for i, st in enumerate(todo, 1):
                bar.update(task, description=f"{i}/{len(todo) + 1} {st.name}: {st.title}")
                console.rule(f"[bold]{st.name}[/]: {st.title}")
                clock.start(st.name)
                t0 = time.perf_counter()
                summary = st.fn(ctx)
                seconds = time.perf_counter() - t0
                if st.name not in ("pretrain", "sft", "rl", "igrpo"):  # the training stages write their own
                    S.write_json(ctx.dir(st.name) / "summary.json", {**summary, "seconds": round(seconds, 1)})
                clock.finish(st.name, seconds)
                timing[st.name] = seconds
                S.write_json(timing_file, timing)
                status[st.name] = "done"
            bar.update(task, description=f"{len(todo) + 1}/{len(todo) + 1} report")
            clock.start("report")
            status = {st.name: status[st.name] for st in _stages()}
            rep = report_mod.build(cfg.out, p, status, {k: v for k, v in timing.items() if status.get(k) == "done"})
            clock.finish("report")
            bar.update(task, completed=bar.tasks[0].total)
        finally:
            stop.set()
    _print_headline(rep, console)
    console.print(f"\n[bold]report:[/] {cfg.out / 'report.md'}  ({cfg.out / 'report.html'}, "
                  f"{cfg.out / 'report.json'})")
    return rep


def _print_headline(rep: dict, console: Console) -> None:
    from rich.table import Table

    fams = sorted(set(rep["accuracy_pretrain"]) | set(rep["accuracy_sft"]) | set(rep["accuracy_rl"]))
    if fams:
        t = Table(title="held-out exact match", title_justify="left")
        for col in ("family", "pretrain", "SFT", "RL", "RL − SFT"):
            t.add_column(col, justify="right" if col != "family" else "left")
        for f in fams:
            vals = [rep["accuracy_pretrain"].get(f), rep["accuracy_sft"].get(f), rep["accuracy_rl"].get(f)]
            d = f"{100 * (vals[2] - vals[1]):+.0f}" if None not in vals[1:] else "–"
            t.add_row(f, *[report_mod.pct(v) for v in vals], d)
        console.print(t)
    if rep["nvfp4_loss_gap"] is not None:
        console.print(f"NVFP4 held-out loss gap on the matched run: {100 * rep['nvfp4_loss_gap']:+.2f} %")
    if rep["mtp_acceptance_length"] is not None:
        console.print(f"MTP k=3: acceptance length {rep['mtp_acceptance_length']:.2f}, decode speed-up "
                      f"{rep['mtp_speedup']:.2f}x")
    if rep["engine_vs_transformers"]:
        e = rep["engine_vs_transformers"]
        console.print(f"engine {e['nemotron3_tok_s']:,.0f} tok/s vs transformers {e['transformers_tok_s']:,.0f} "
                      f"tok/s: {e['ratio']:.2f}x")
    console.print(f"total {rep['seconds_total'] / 60:.1f} min: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in rep["seconds_by_stage"].items()))


def main(cfg: RunConfig) -> int:
    """`nemotron3 run`: the pipeline, then the path of its report."""
    run(cfg)
    return 0
