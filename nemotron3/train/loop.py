"""The language-model step of pretraining and SFT on the training skeleton (train/stage.py, `LMStage`), and the
loop's configuration (`TrainConfig`): what differs between the two stages is only the data (SFT's rows,
train/sft_data.py, carry a loss mask over the assistant's tokens, which loss.py applies). The skeleton owns the
sharding, resume, metrics, evaluation and checkpoint schedule, and the update rule (`Stage.optimizer_step`).

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

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from nemotron3.distributed import parallel
from nemotron3.options import (
    LOGIT_BYTES,
    TOKEN_BYTES,
    StageConfig,
    check_fits,
    device_option,
    fail,
    option,
)
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import stage
from nemotron3.train.balance import ExpertBalance
from nemotron3.train.data import Batch, PackedData
from nemotron3.train.evaluate import eval_loss, eval_mtp_loss
from nemotron3.train.loss import Normalizer, micro_loss
from nemotron3.train.optim import WSD


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


# where the stages and tests have always found them; they live in train/stage.py, the skeleton
process_group = parallel.process_group
MetricsLog = stage.MetricsLog
_run_record = stage.run_record
_save = stage.save_checkpoint


def _switch_to_high_precision(model: nn.Module, step: int, console: Console) -> None:
    """The end-of-training switch of the NVFP4 paper (App. D): from here on every GEMM runs unquantized.

    The quantized modules are swapped for plain ones around the *same* Parameters, so the optimizer's
    state carries over untouched. Called at the top of a step, also when a resumed run starts past the
    switch point, so a resumed run is quantized exactly where the uninterrupted one was."""
    from nemotron3.quant.convert import switch_to_high_precision

    switch_to_high_precision(model)
    console.print(f"step {step:5d}  [bold]switched to high precision[/] for the remaining steps")


class LMStage(stage.Stage):
    """Pretraining's and SFT's step on the skeleton (train/stage.py): a global batch of packed rows, this rank's
    share in micro-batches, the MTP and aux losses, one `optimizer_step`, the expert-bias update after it."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, data: PackedData, cfg: TrainConfig, out: Path,
                 console: Console, heldout: PackedData | None = None, label: str = "pretrain") -> None:
        if parallel.rank_world()[1] > 1 and cfg.high_precision_from:
            raise ValueError("--nvfp4-high-precision-tail swaps the quantized modules for plain ones, which FSDP2's "
                             "sharded parameters do not survive: run it in one process")
        super().__init__(model, tokenizer, cfg, out, console)
        self.label, self.data, self.heldout = label, data, heldout
        if cfg.batch_size % self.world:
            raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the world size {self.world}")
        self.local = cfg.batch_size // self.world
        self.micro = cfg.micro_batch_size or self.local
        if self.local % self.micro:
            raise ValueError(f"each rank's {self.local} rows do not split into micro-batches of {self.micro}")
        self.depths = cfg.mtp_depths if getattr(model, "mtp", None) is not None else 0
        self.dev = next(model.parameters()).device  # the stage put the model on --device; batches follow it
        self.build_optimizer(cfg.lr, cfg.weight_decay, cfg.betas, cfg.schedule())
        self.balance = ExpertBalance(model, cfg.bias_update_rate, cfg.seq_aux_coeff)
        self.position = 0
        self.switched = False
        self.result = TrainResult(steps=0, last_loss=float("nan"))

    def state(self) -> dict:
        return {"data_position": self.position, "data_fingerprint": self.data.fingerprint()}

    def load_state(self, resume: dict) -> None:
        if resume["data_fingerprint"] != self.data.fingerprint():
            raise ValueError("the data differs from the checkpoint's (fingerprint mismatch): "
                             "resume with the same data and seed")
        self.position = resume["data_position"]

    def after_update(self) -> None:
        self.balance.apply_bias_update()

    def train_step(self, step: int) -> dict:
        cfg, model, balance = self.cfg, self.model, self.balance
        if cfg.high_precision_from and step >= cfg.high_precision_from and not self.switched:
            _switch_to_high_precision(model, step, self.console)
            self.switched = True
        t0 = time.perf_counter()
        lr = self.set_lr(step)
        batch = self.data.batch(self.position, cfg.batch_size)
        norm = Normalizer.of(batch.mask, self.depths)
        mine = batch.split(self.local)[self.rank]
        balance.reset()
        balance.active = True
        sums = torch.zeros(3, dtype=torch.float64, device=self.dev)  # main CE, mean MTP CE, aux (nccl: on the GPU)
        for mb in mine.split(self.micro):
            mb = Batch(mb.inputs.to(self.dev), mb.targets.to(self.dev), mb.mask.to(self.dev))
            ml = micro_loss(model, mb, norm, self.depths, cfg.mtp_scale,
                            lambda: balance.take_aux_loss(cfg.batch_size))
            ml.total.backward()
            sums += torch.tensor([ml.lm, ml.mtp, ml.aux], dtype=torch.float64, device=self.dev)
        balance.active = False
        parallel.all_reduce_sum_(sums)
        balance.all_reduce()
        loss = float(sums[0])
        total = loss + cfg.mtp_scale * float(sums[1]) + float(sums[2])
        grad_norm, finite = self.optimizer_step(math.isfinite(total))
        self.position += cfg.batch_size
        ratio = max(balance.load_ratio().values(), default=1.0)
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(batch.mask.sum()), "tok_per_s": round(batch.inputs.numel() / dt, 1)}
        if self.depths:
            record["mtp_loss"] = float(sums[1])
        if cfg.seq_aux_coeff > 0:
            record["aux_loss"] = float(sums[2])
        if balance.moes:
            record["load_max_min"] = round(ratio, 4)
        self.result.load_ratios.append(ratio)
        if not finite:
            record["skipped"] = True
            self.result.skipped.append(step + 1)
            self.console.print(f"[bold red]step {step + 1}: non-finite loss {total} or gradient norm {grad_norm}: "
                               "update skipped[/]")
        else:
            self.result.last_loss = loss
        return record

    def progress(self, record: dict) -> str:
        return f"loss {record['loss']:.3f} lr {record['lr']:.2e} {record['tok_per_s']:.0f} tok/s"

    def line(self, record: dict) -> str:
        return (f"step {record['step']:5d}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"|g| {record['grad_norm']:.2f}  load max/min {self.result.load_ratios[-1]:.2f}  "
                f"{record['tok_per_s']:.0f} tok/s")

    def evaluate(self, step: int) -> dict | None:
        """The held-out loss, on every rank (a sharded forward is a collective), logged by rank 0."""
        if self.heldout is None:
            return None
        ev = eval_loss(self.model, self.heldout)
        self.result.eval_losses.append((step, ev))
        record = {"step": step, "eval_loss": ev}
        if self.depths:
            record["eval_mtp_loss"] = eval_mtp_loss(self.model, self.heldout, self.depths)
        if self.rank == 0:
            self.console.print(f"step {step:5d}  [bold]held-out loss {ev:.4f}[/]")
        return record


def train(model: nn.Module, tokenizer: Tokenizer, data: PackedData, cfg: TrainConfig, out_dir: str | os.PathLike,
          heldout: PackedData | None = None, resume: dict | None = None, console: Console | None = None,
          stage: str = "pretrain") -> TrainResult:
    """Train `model` in place for `cfg.steps` optimizer steps, or up to `cfg.stop_after` (from `resume["step"]` when
    resuming), writing `out_dir`; `stage` names the run in the progress bar. Under torchrun `model` is sharded in
    place with FSDP2 (the stage gathers it for final/)."""
    if cfg.activation_checkpointing:  # before the skeleton shards the blocks (model/recompute.py)
        model.set_activation_checkpointing()
    run = LMStage(model, tokenizer, data, cfg, Path(out_dir), console or Console(), heldout, stage)
    run.run(resume)
    run.balance.remove()
    run.result.steps, run.result.seconds = run.step, run.seconds
    return run.result
