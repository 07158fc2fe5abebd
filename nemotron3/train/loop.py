"""The training loop, one for pretraining and SFT: what differs between them is only the data (SFT's rows,
train/sft_data.py, carry a loss mask over the assistant's tokens, which loss.py applies).

One optimizer step:

    lr ← WSD(step)
    global batch ← rows [position, position + B) of the seeded order; this rank takes its B/world rows
    for each micro-batch:  forward (+ MTP depths), loss normalised by the global batch's counts, backward
    under torchrun: FSDP2 reduce-scatters the gradients during backward (parallel.py); losses and expert
    loads are summed over ranks here
    clip the global gradient norm
    if loss and gradient norm are finite: AdamW step, then the expert-bias update
    else: skip the update and say so (the NaN/Inf guard); the data still advances
    log a JSON line; every `eval_every` steps the held-out loss; every `save_every` steps a checkpoint

`--batch-size` is the *global* batch in sequences: world size and micro-batch size only decide how it is
split, and since every loss is normalised by global counts (loss.py), the gradient is the same sum in any
split (equal up to floating-point summation order).

Under torchrun the model is sharded with FSDP2 on a DeviceMesh (`--dp-shard`, distributed/parallel.py) before the
optimizer is built; every rank evaluates the held-out loss (a sharded forward is a collective) and takes part
in gathering a checkpoint, which rank 0 writes in the one-process format (so it loads in any number of
ranks). Each rank's RNG state is saved; a resume under the same world size restores each rank's own, a resume
under another one every rank's from rank 0's (the same data position, not the same bits).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from nemotron3.distributed import parallel
from nemotron3.options import (
    LOGIT_BYTES,
    TOKEN_BYTES,
    StageConfig,
    check_fits,
    device_of,
    device_option,
    fail,
    option,
    to_dict,
)
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train.balance import ExpertBalance
from nemotron3.train.data import Batch, PackedData
from nemotron3.train.evaluate import eval_loss, eval_mtp_loss
from nemotron3.train.loss import Normalizer, micro_loss
from nemotron3.train.optim import WSD, build_optimizer


@dataclass
class TrainConfig(StageConfig):
    """The training loop: steps, batch, schedule, optimizer, losses, evaluation and checkpoints.

    Every default of the loop lives here. The stage configs (`PretrainConfig`, `SFTConfig`) extend it
    with their data and model fields, so these fields are also their command-line flags (`--batch-size`,
    `--lr`, ...).
    """

    steps: int = option(300, "optimizer steps", min=1)
    batch_size: int = option(16, "global batch in sequences (split over ranks and micro-batches; a step must fit in "
                             "this machine's memory)", min=1)
    micro_batch_size: int = option(0, "rows per forward on each rank (0 = the rank's whole share at once)", min=0)
    lr: float = option(3e-3, "peak learning rate of the warmup-stable-decay schedule", min=0.0)
    min_lr_ratio: float = option(0.01, "final learning rate as a fraction of the peak", min=0.0, max=1.0)
    warmup: int = option(-1, "warmup steps (-1 = 5% of the steps)", min=-1)
    decay_fraction: float = option(0.2, "fraction of the steps spent decaying the learning rate", min=0.0, max=1.0)
    decay_shape: str = option("minus_sqrt", "shape of the decay", choices=("minus_sqrt", "linear"))
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices", min=0.0)
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    mtp_depths: int = option(2, "MTP depths trained, shared weights (0 = no MTP loss)", min=0)
    mtp_scale: float = option(0.3, "weight of the mean MTP loss", min=0.0)
    bias_update_rate: float = option(1e-3, "aux-loss-free expert-bias step (0 = off)", min=0.0)
    seq_aux_coeff: float = option(1e-4, "sequence-level load-balancing loss coefficient (0 = off)", min=0.0)
    nvfp4_high_precision_tail: float = option(
        0.0, "with an NVFP4 model: train the last FRACTION of the steps unquantized, the NVFP4 paper's "
        "end-of-training switch (0 = quantized to the end)", min=0.0, metavar="FRACTION")
    eval_every: int = option(50, "held-out loss every K steps", min=1)
    save_every: int = option(0, "checkpoint every K steps (0 = only final/)", min=0)
    keep_last: int = option(2, "training checkpoints kept (0 = all)", min=0)
    log_every: int = option(25, "print a line every K steps", min=1)
    stop_after: int = option(0, "end the run after this step, with the schedule and data of the full --steps run "
                             "(0 = at --steps): the first K steps of a longer run, exactly", min=0)
    dp_shard: int = option(0, "ranks that shard the parameters, gradients and optimizer states with FSDP2 under "
                           "torchrun (0 = the world size)", min=0)
    ep: int = option(0, "ranks each MoE layer's routed experts are partitioned over, tokens moved by all-to-all "
                     "(0 = 1; divides --dp-shard)", min=0)
    device: str = device_option()  # under torchrun: auto (each rank's own GPU under nccl, else the CPU) or that one
    activation_checkpointing: bool = option(False, "keep only each block's input in the forward and recompute the "
                                            "block in backward: less memory for long rows, ~1/3 more compute")

    def validate(self) -> None:
        super().validate()
        if self.nvfp4_high_precision_tail >= 1.0:
            fail(self, "nvfp4_high_precision_tail", "must be a fraction in [0, 1)")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            fail(self, "micro_batch_size", f"does not divide --batch-size {self.batch_size}")

    def check_memory(self, seq_len: int, run_tokens: int = 0) -> None:
        """Refuse sizes this machine cannot hold (options.check_fits), before any data is built; the stage
        configs call it with their --seq-len. Lower bounds: one row is seq_len + 1 token ids and a forward's
        fp32 logits at each position; a step is this rank's share of the batch as ids (the batch over torchrun's
        WORLD_SIZE) and the logits of one forward's rows (--micro-batch-size, else the share); `run_tokens` are
        the tokens a stage packs up front for the whole run (pretraining's task text), as ids."""
        try:
            world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        except ValueError:
            world = 1
        share = -(-self.batch_size // world)
        check_fits(self, "seq_len", (seq_len + 1) * TOKEN_BYTES + seq_len * LOGIT_BYTES,
                   f"one row of {seq_len:,} tokens (its token ids and fp32 logits)")
        ids = share * (seq_len + 1) * TOKEN_BYTES
        check_fits(self, "batch_size", ids + seq_len * LOGIT_BYTES,
                   f"a step's {share:,} rows of {seq_len:,} token ids")
        name = "micro_batch_size" if self.micro_batch_size else "batch_size"
        rows = self.micro_batch_size or share
        check_fits(self, name, ids + rows * seq_len * LOGIT_BYTES,
                   f"a step's {share:,} rows of {seq_len:,} token ids and one forward's fp32 logits over {rows:,} rows")
        if run_tokens:
            check_fits(self, "steps", run_tokens * TOKEN_BYTES,
                       f"the run's {run_tokens:,} task tokens (--steps x --batch-size x --seq-len, packed before "
                       "training as token ids)")

    @property
    def high_precision_from(self) -> int:
        """The step from which an NVFP4 model trains unquantized (0 = never)."""
        tail = self.nvfp4_high_precision_tail
        return round(self.steps * (1 - tail)) if tail else 0

    def schedule(self) -> WSD:
        warmup = self.warmup if self.warmup >= 0 else max(1, self.steps // 20)
        return WSD(self.lr, self.steps, warmup, self.decay_fraction, self.min_lr_ratio, self.decay_shape)


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    load_ratios: list[float] = field(default_factory=list)  # worst layer's max/min expert load, per step
    skipped: list[int] = field(default_factory=list)
    seconds: float = 0.0


process_group = parallel.process_group  # where the stages have always imported it from


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


def _switch_to_high_precision(model: nn.Module, step: int, console: Console) -> None:
    """The end-of-training switch of the NVFP4 paper (App. D): from here on every GEMM runs unquantized.

    The quantized modules are swapped for plain ones around the *same* Parameters, so the optimizer's
    state carries over untouched. Called at the top of a step, also when a resumed run starts past the
    switch point, so a resumed run is quantized exactly where the uninterrupted one was."""
    from nemotron3.quant.convert import switch_to_high_precision

    switch_to_high_precision(model)
    console.print(f"step {step:5d}  [bold]switched to high precision[/] for the remaining steps")


def _run_record(cfg: TrainConfig) -> dict:
    """The run's configuration as a checkpoint keeps it: without the parallel layout, which a resume takes from
    its own launch (any number of ranks may resume a checkpoint)."""
    return {**to_dict(cfg), "dp_shard": 0, "ep": 0}


def _save(model: nn.Module, opt: torch.optim.Optimizer, tokenizer: Tokenizer, folder: Path, state: dict,
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


def train(model: nn.Module, tokenizer: Tokenizer, data: PackedData, cfg: TrainConfig, out_dir: str | os.PathLike,
          heldout: PackedData | None = None, resume: dict | None = None, console: Console | None = None,
          stage: str = "pretrain") -> TrainResult:
    """Train `model` in place for `cfg.steps` optimizer steps, or up to `cfg.stop_after` (from `resume["step"]` when
    resuming); `stage` names the run in the progress bar."""
    out_dir, console = Path(out_dir), console or Console()
    rank, world = parallel.rank_world()
    if cfg.activation_checkpointing:  # before FSDP2 shards the blocks (model/recompute.py)
        model.set_activation_checkpointing()
    if world == 1 and max(cfg.dp_shard, cfg.ep) > 1:
        raise ValueError(f"--dp-shard {cfg.dp_shard} / --ep {cfg.ep} asks for {max(cfg.dp_shard, cfg.ep)} processes "
                         "and this is one: launch with torchrun --nproc-per-node N (docs/scaling.md)")
    if world > 1:
        if cfg.high_precision_from:
            raise ValueError("--nvfp4-high-precision-tail swaps the quantized modules for plain ones, which FSDP2's "
                             "sharded parameters do not survive: run it in one process")
        if cfg.device != "auto" and device_of(cfg) != parallel.device():
            raise ValueError(f"--device {cfg.device}: under torchrun each rank computes on its own {parallel.device()} "
                             "(the process group's backend decides); leave --device at auto")
        parallel.parallelize(model, parallel.build_mesh(cfg.dp_shard, cfg.ep))  # before the optimizer sees them
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {world}")
    local = cfg.batch_size // world
    micro = cfg.micro_batch_size or local
    if local % micro:
        raise ValueError(f"each rank's {local} rows do not split into micro-batches of {micro}")
    depths = cfg.mtp_depths if getattr(model, "mtp", None) is not None else 0
    dev = next(model.parameters()).device  # the stage put the model on --device; batches follow it
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas)
    sched = cfg.schedule()
    balance = ExpertBalance(model, cfg.bias_update_rate, cfg.seq_aux_coeff)
    params = [p for p in model.parameters() if p.requires_grad]
    step, position = 0, 0
    if resume is not None:
        if resume["data_fingerprint"] != data.fingerprint():
            raise ValueError("the data differs from the checkpoint's (fingerprint mismatch): "
                             "resume with the same data and seed")
        parallel.load_optimizer_state(opt, resume["optimizer"], model)
        per_rank = resume.get("rng_ranks", [])
        checkpoint.set_rng_state(per_rank[rank] if len(per_rank) == world else resume["rng"], model)
        step, position = resume["step"], resume["data_position"]
    log = MetricsLog(out_dir / "metrics.jsonl", step if resume is not None else None) if rank == 0 else None
    result = TrainResult(steps=step, last_loss=float("nan"))
    model.train()
    switched = False
    t_start = time.perf_counter()
    columns = (TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=rank != 0, transient=False) as bar:
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        task = bar.add_task("train", total=end, completed=step, info="")
        while step < end:
            if cfg.high_precision_from and step >= cfg.high_precision_from and not switched:
                _switch_to_high_precision(model, step, console)
                switched = True
            t0 = time.perf_counter()
            lr = sched.lr(step)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = data.batch(position, cfg.batch_size)
            norm = Normalizer.of(batch.mask, depths)
            mine = batch.split(local)[rank]
            balance.reset()
            balance.active = True
            sums = torch.zeros(3, dtype=torch.float64)  # main CE, mean MTP CE, aux
            for mb in mine.split(micro):
                mb = Batch(mb.inputs.to(dev), mb.targets.to(dev), mb.mask.to(dev))
                ml = micro_loss(model, mb, norm, depths, cfg.mtp_scale, lambda: balance.take_aux_loss(cfg.batch_size))
                ml.total.backward()
                sums += torch.tensor([ml.lm, ml.mtp, ml.aux], dtype=torch.float64)
            balance.active = False
            parallel.all_reduce_sum_(sums)
            balance.all_reduce()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = parallel.clip_grad_norm_(model, params, max_norm)
            loss = float(sums[0])
            total = loss + cfg.mtp_scale * float(sums[1]) + float(sums[2])
            finite = math.isfinite(total) and math.isfinite(grad_norm)
            if finite:
                opt.step()
                balance.apply_bias_update()
            opt.zero_grad(set_to_none=True)
            step, position = step + 1, position + cfg.batch_size
            ratio = max(balance.load_ratio().values(), default=1.0)
            dt = time.perf_counter() - t0
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens": int(batch.mask.sum()), "tok_per_s": round(batch.inputs.numel() / dt, 1)}
            if depths:
                record["mtp_loss"] = float(sums[1])
            if cfg.seq_aux_coeff > 0:
                record["aux_loss"] = float(sums[2])
            if balance.moes:
                record["load_max_min"] = round(ratio, 4)
            result.load_ratios.append(ratio)
            if not finite:
                record["skipped"] = True
                result.skipped.append(step)
                console.print(f"[bold red]step {step}: non-finite loss {total} or gradient norm {grad_norm}: "
                              "update skipped[/]")
            else:
                result.last_loss = loss
            if log:
                log.write(record)
            bar.update(task, completed=step, info=f"loss {loss:.3f} lr {lr:.2e} {record['tok_per_s']:.0f} tok/s")
            if rank == 0 and (step % cfg.log_every == 0 or step == 1):
                console.print(f"step {step:5d}  loss {loss:.4f}  lr {lr:.2e}  |g| {grad_norm:.2f}  "
                              f"load max/min {ratio:.2f}  {record['tok_per_s']:.0f} tok/s")
            if heldout is not None and (rank == 0 or world > 1) and (step % cfg.eval_every == 0 or step == end):
                ev = eval_loss(model, heldout)  # on every rank when sharded: a sharded forward is a collective
                result.eval_losses.append((step, ev))
                record = {"step": step, "eval_loss": ev}
                if depths:
                    record["eval_mtp_loss"] = eval_mtp_loss(model, heldout, depths)
                if log:
                    log.write(record)
                    console.print(f"step {step:5d}  [bold]held-out loss {ev:.4f}[/]")
            if cfg.save_every and step % cfg.save_every == 0 and step < end:
                _save(model, opt, tokenizer, checkpoint.step_dir(out_dir, step),
                      {"step": step, "data_position": position, "schedule": asdict(sched),
                       "data_fingerprint": data.fingerprint(), "run": _run_record(cfg)}, cfg.keep_last)
    balance.remove()
    result.steps, result.seconds = step, time.perf_counter() - t_start
    return result
