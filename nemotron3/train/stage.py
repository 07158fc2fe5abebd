"""The skeleton of every training stage (pretrain, SFT, RL): torchtitan's `Trainer`, in this package's terms.

    def pretrain(cfg, console):
        return stage.launch(cfg, console, OPERATIONAL_FIELDS, body, reads=lambda c: {"--data": c.data})

    def body(start: stage.Start) -> Path:         # inside the process group
        run = LMStage(model, tokenizer, data, start.cfg, console, ...)    # a Stage subclass: shards the model
        run.run(start.resume)                      # resume, then the loop
        model = run.save_final()                   # final/ (rank 0); then the stage writes summary.json

What the skeleton does, once for every stage:

- **Launch** (`launch`): with `--resume`, the newest complete checkpoint and the run's saved configuration (only
  the stage's operational fields may change); the device checked and `--out` prepared (`prepare_out`) before
  anything is written; the stage's body inside torchrun's process group (distributed/parallel.py; one process
  never touches torch.distributed).
- **Sharding**: under torchrun the model is sharded with FSDP2 on the `--dp-shard` / `--ep` mesh when the Stage is
  built, before the stage builds its optimizer (`build_optimizer`) over the sharded parameters.
- **Resume** (`run(resume)`): the optimizer state (full tensors cut to this rank's shards), each rank's RNG state
  (every rank's from rank 0's when the world size changed), the step, and the stage's own state
  (`load_state`); metrics.jsonl cut back to the checkpoint's step (`MetricsLog`).
- **The loop**: `train_step(step)` (the stage's: one optimizer step's worth of work, returning its metrics record,
  `"step"` first) for each step up to `end`; the record appended to metrics.jsonl (rank 0), the progress bar, a
  console line every `log_every` steps; `evaluate(step)` every `eval_every` steps (and at the last step when
  `eval_at_end`); a checkpoint every `save_every` steps before the last (`save`).
- **`optimizer_step`**, the one update rule every stage calls: clip the global gradient norm (over the DTensor
  shards, so every rank sees the same number), the NaN/Inf guard (a non-finite loss or norm skips the update on
  every rank; the caller logs it), AdamW, then `after_update()` (pretraining: the expert-bias update; RL: the
  rollout engine is told the weights changed), then the gradients are freed. `set_lr(step)` puts the schedule's
  rate into every parameter group first.
- **End**: `save_final()` writes final/ from the gathered weights (rank 0), `write_summary` summary.json.

Checkpoints (`save`) are written in the one-process format whatever the world size (parallel.py): the weights
and AdamW's moments gathered onto rank 0, every rank's RNG state, the stage's own state (`state()`), the
schedule and the run's configuration without its parallel layout, which a resume takes from its own launch.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from nemotron3.distributed import parallel
from nemotron3.options import device_of, restore_config, to_dict
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train.optim import WSD, build_optimizer


@dataclass
class Start:
    """What a stage's body starts from: the (restored) configuration, the checkpoint it resumes and its state."""

    cfg: Any
    ckpt: Path | None
    resume: dict | None
    t_start: float


def launch(cfg: Any, console: Console, operational: tuple[str, ...], body: Callable[[Start], Path],
           reads: Callable[[Any], dict] | None = None, check: Callable[[Any], None] | None = None,
           restore: Callable[..., Any] = restore_config) -> Path:
    """A stage's preamble, then `body(start)` inside the process group: the resume point and the saved
    configuration (`restore(cfg, saved, ckpt, operational)`), the device, `check(cfg)` (the stage's own checks
    that need files), then `--out` prepared (its `--model`, if the config has one, and `reads(cfg)`: {flag: paths}
    the run reads, which `--overwrite` must not delete). Nothing is written before every check has passed."""
    t_start = time.perf_counter()
    resume, ckpt = None, None
    if cfg.resume:
        ckpt, resume = checkpoint.resume_point(cfg.out)
        cfg = restore(cfg, resume.get("run", {}), ckpt, operational)
        console.print(f"[bold]resuming[/] {ckpt} (step {resume['step']}) with the run's saved configuration")
    device_of(cfg)  # a device this machine lacks is refused before --out is touched
    if check is not None:
        check(cfg)
    checkpoint.prepare_out(cfg.out, cfg.resume, cfg.overwrite, getattr(cfg, "model", None),
                           reads(cfg) if reads else None)
    with parallel.process_group():
        return body(Start(cfg, ckpt, resume, t_start))


class MetricsLog:
    """`metrics.jsonl`: one JSON object per line. On resume, records after the checkpoint's step are dropped
    (a killed run may have logged steps it never saved), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            keep = [ln for ln in path.read_text().splitlines() if self._step_of(ln) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, path)

    @staticmethod
    def _step_of(line: str) -> float:
        """A record's step; a line cut short by a kill (or blank) counts as past any checkpoint."""
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def run_record(cfg: Any) -> dict:
    """The run's configuration as a checkpoint keeps it: without the parallel layout, which a resume takes from
    its own launch (any number of ranks may resume a checkpoint)."""
    record = to_dict(cfg)
    return {**record, **{k: 0 for k in ("dp_shard", "ep") if k in record}}


def save_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, tokenizer: Tokenizer, folder: Path, state: dict,
                    keep_last: int) -> None:
    """A training checkpoint, by every rank (the gathers are collectives), written by rank 0."""
    rank, world = parallel.rank_world()
    full = parallel.gathered(model)
    optimizer = parallel.full_optimizer_state(opt, model)
    rngs = parallel.gather_objects(checkpoint.rng_state(model))
    if rank == 0:
        state = {**state, "optimizer": optimizer, "rng": rngs[0]}
        if world > 1:
            state["rng_ranks"] = rngs
        checkpoint.save(folder, full, tokenizer, state)
        checkpoint.prune(folder.parent, keep_last)
    parallel.barrier()


def write_summary(out: Path, summary: dict) -> None:
    """summary.json of the run (rank 0 calls it)."""
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


class Stage:
    """The loop every training stage runs; a subclass supplies `train_step` and, as it needs, `evaluate`,
    `state` / `load_state`, `after_update`, `progress` and `line` (see the module docstring).

    `out` is the run's folder; `cfg` carries the loop's settings: steps, save_every, keep_last, log_every,
    eval_every, grad_clip, device, and where the stage has them dp_shard, ep (the mesh under torchrun) and
    stop_after (an earlier end)."""

    label = "train"  # the progress bar's name
    eval_at_end = True  # evaluate at the last step too (RL evaluates after final/ instead)

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, cfg: Any, out: Path, console: Console) -> None:
        self.cfg, self.tokenizer, self.out, self.console = cfg, tokenizer, Path(out), console
        self.rank, self.world = parallel.rank_world()
        dp_shard, ep = getattr(cfg, "dp_shard", 0), getattr(cfg, "ep", 0)
        if self.world == 1 and max(dp_shard, ep) > 1:
            raise ValueError(f"--dp-shard {dp_shard} / --ep {ep} asks for {max(dp_shard, ep)} processes and this is "
                             "one: launch with torchrun --nproc-per-node N (docs/scaling.md)")
        if self.world > 1:
            if cfg.device != "auto" and device_of(cfg) != parallel.device():
                raise ValueError(f"--device {cfg.device}: under torchrun each rank computes on its own "
                                 f"{parallel.device()} (the process group's backend decides); leave --device at auto")
            parallel.parallelize(model, parallel.build_mesh(dp_shard, ep))  # before the optimizer sees them
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt: torch.optim.Optimizer | None = None
        self.sched: WSD | None = None
        self.step = 0
        self.end = min(cfg.steps, getattr(cfg, "stop_after", 0) or cfg.steps)
        self.log: MetricsLog | None = None
        self.seconds = 0.0

    # ------------------------------------------------------------------ the update rule
    def build_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float], sched: WSD) -> None:
        """AdamW (train/optim.py) over the (sharded) parameters, and the learning-rate schedule."""
        self.opt = build_optimizer(self.model, lr, weight_decay, betas)
        self.sched = sched

    def set_lr(self, step: int) -> float:
        """The schedule's learning rate at `step`, set in every parameter group; returns it."""
        lr = self.sched.lr(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr

    def optimizer_step(self, loss_finite: bool = True) -> tuple[float, bool]:
        """Clip the global gradient norm to `grad_clip` (0 = off); if it and the loss (`loss_finite`, the same on
        every rank) are finite, step AdamW and call `after_update()`; free the gradients either way. Returns
        (the norm before clipping, whether the update was taken)."""
        clip = self.cfg.grad_clip
        grad_norm = parallel.clip_grad_norm_(self.model, self.params, clip if clip > 0 else float("inf"))
        taken = loss_finite and math.isfinite(grad_norm)
        if taken:
            self.opt.step()
            self.after_update()
        self.opt.zero_grad(set_to_none=True)
        return grad_norm, taken

    def after_update(self) -> None:
        """What follows an optimizer step that was taken (a subclass's hook)."""

    # ------------------------------------------------------------------ the stage's parts
    def train_step(self, step: int) -> dict:
        """One step (0-based `step`): the work and its `optimizer_step`s; returns the metrics record."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict | None:
        """A held-out record to log after `step` (every rank calls it; None: nothing to log)."""
        return None

    def state(self) -> dict:
        """The stage's own resume state, saved beside the skeleton's."""
        return {}

    def load_state(self, resume: dict) -> None:
        """Restore what `state()` saved (before the RNG states are set)."""

    def progress(self, record: dict) -> str:
        return f"loss {record.get('loss', float('nan')):.3f}"

    def line(self, record: dict) -> str:
        return f"step {record['step']:5d}  {self.progress(record)}"

    # ------------------------------------------------------------------ the loop
    def restore(self, resume: dict) -> None:
        """Resume: the stage's state, the optimizer's (cut to this rank's shards), each rank's RNG, the step."""
        self.load_state(resume)
        parallel.load_optimizer_state(self.opt, resume["optimizer"], self.model)
        per_rank = resume.get("rng_ranks", [])
        checkpoint.set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else resume["rng"], self.model)
        self.step = resume["step"]

    def run(self, resume: dict | None = None) -> None:
        """Train from step 0, or from the checkpoint `resume`, to `end`."""
        if resume is not None:
            self.restore(resume)
        out = self.out
        if self.rank == 0:
            self.log = MetricsLog(out / "metrics.jsonl", self.step if resume is not None else None)
        t_start = time.perf_counter()
        columns = (TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeRemainingColumn())
        every = self.cfg.eval_every
        with Progress(*columns, console=self.console, disable=self.rank != 0, transient=False) as bar:
            task = bar.add_task(self.label, total=self.end, completed=self.step, info="")
            while self.step < self.end:
                record = self.train_step(self.step)
                self.step = step = self.step + 1
                self.write(record)
                bar.update(task, completed=step, info=self.progress(record))
                if self.rank == 0 and (step % self.cfg.log_every == 0 or step == 1):
                    self.console.print(self.line(record))
                if (every and step % every == 0 and step < self.end) or (self.eval_at_end and step == self.end):
                    self.write(self.evaluate(step))
                if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.end:
                    self.save(checkpoint.step_dir(out, step))
        self.seconds = time.perf_counter() - t_start

    def write(self, record: dict | None) -> None:
        if record is not None and self.log is not None:
            self.log.write(record)

    def save(self, folder: Path) -> None:
        """A training checkpoint of the current step (every rank calls it)."""
        state = {"step": self.step, "schedule": asdict(self.sched), "run": run_record(self.cfg), **self.state()}
        save_checkpoint(self.model, self.opt, self.tokenizer, folder, state, self.cfg.keep_last)

    def save_final(self) -> nn.Module | None:
        """final/ from the whole model (every rank calls it): returns that model on rank 0, None elsewhere."""
        model = parallel.gathered(self.model)
        if self.rank == 0:
            checkpoint.save(self.out / "final", model, self.tokenizer)
        return model
