"""The SFT stage: supervised fine-tuning of a checkpoint on chat conversations, with reasoning on, off and cut to
budgets, the loss on the assistant's tokens only.

    from nemotron3.stages.sft import SFTConfig, sft
    final = sft(SFTConfig(model="runs/pretrain/final", out="runs/sft"))     # -> runs/sft/final

    nemotron3 sft                                          the embedded default: `nemotron3 pretrain`'s checkpoint,
                                                           conversations from the task families (a few minutes)
    nemotron3 sft --model DIR --data chats.jsonl           your conversations: {"messages": [...], "tools": [...]}
    nemotron3 sft --out runs/s --save-every 50 --resume    continue the newest checkpoint exactly

Layout of `out`, as for `nemotron3 pretrain`: metrics.jsonl (one JSON object per step, plus eval records),
step-NNNNNN/ (checkpoint + trainer_state.pt), final/ (a checkpoint folder whose tokenizer_config.json carries
the chat template), summary.json.

What a run does: load the model and its tokenizer from `--model`; read the conversations (train/sft_data.py)
and draw each one's mode: reasoning off (`--reasoning-off-share`), reasoning cut to a random token budget and
closed early (`--budget-share`), or as written; render them with the chat template (nemotron3/chat.py), one
conversation per row with the loss mask on the assistant's tokens; measure held-out exact match by reasoning
mode (nemotron3/eval/accuracy.py: on, off, and at `--eval-budgets` when the engine has a thinking budget); train with
the pretraining loop (train/loop.py: the same optimizer, schedule, MTP loss, expert balancing, checkpoints and
bit-for-bit resume); save final/; measure again; write summary.json with both. docs/post-training.md §3-4.

**Resume** restores the configuration saved in the checkpoint; as for pretraining, only the fields that decide
what is saved or reported (`eval_every`, `save_every`, `keep_last`, `log_every`, `eval_problems`,
`eval_budgets`) may change.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from nemotron3 import checkpoint
from nemotron3.distributed import parallel
from nemotron3.engine import Engine
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.envs import LookupEnv
from nemotron3.eval.accuracy import accuracy_by_mode, task_accuracy
from nemotron3.options import (
    ITEM_BYTES,
    ConfigError,
    check_fits,
    check_items,
    derive_seed,
    device_of,
    fail,
    option,
    to_dict,
)
from nemotron3.rl.env_source import heldout_env
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import sft_data, stage
from nemotron3.train.data import HELDOUT_TASK_PROBLEMS, Batch, DataError, PackedData
from nemotron3.train.loop import LMStage, TrainConfig
from nemotron3.train.summary import print_footer, run_stage

TOOL_EPISODE_TOKENS = 256  # a reference episode is ~180 tokens after its ~280-token prompt (docs/agentic-rl.md §6)
OPERATIONAL_FIELDS = ("eval_every", "save_every", "keep_last", "log_every", "stop_after", "eval_problems",
                      "eval_budgets", "tool_eval_problems", "out", "resume", "dp_shard", "ep", "overwrite",
                      "strict_finite", "device")


@dataclass
class SFTConfig(TrainConfig):
    """Checkpoint, conversations, reasoning modes and evaluation of an SFT run (and the loop's TrainConfig).

    Sizes are bounded by this machine's memory (TrainConfig.check_memory): a row, a step, and the conversations
    and problems held at once (the task conversations are all built before training).
    """

    stage = "sft"
    model: Path = option(Path("runs/pretrain/final"), "checkpoint folder to fine-tune (weights + tokenizer.json; "
                         "default: the final/ of `nemotron3 pretrain`)", metavar="DIR")
    data: list[Path] = option([], "OpenAI-messages .jsonl files or folders of them (default: conversations built "
                              "from the embedded task families)", metavar="PATH")
    tasks: bool | None = option(None, "include the task conversations (default: only when --data is not given)")
    conversations: int = option(0, "task conversations to train on (0 = one per row the run reads)", min=0)
    tools: bool | None = option(None, "include the tool environment's conversations (lookup + calculate calls, "
                                "envs/lookup.py; default: with the task conversations)")
    tool_share: float = option(0.1, "tool conversations, as a share of the task conversations", min=0.0, max=1.0)
    tool_eval_problems: int = option(50, "held-out tool problems run as greedy episodes after SFT: accuracy and "
                                     "tool-call validity (0 = none)", min=0)
    difficulty: int = option(1, "task difficulty (1 = easiest)", min=1)
    seq_len: int = option(512, "most tokens of one conversation (one per row; longer ones are skipped and counted; a "
                          "tool conversation is about 460)", min=2)
    seed: int = option(0, "seed of the data order, the reasoning modes and budgets, and the task problems", min=0)
    reasoning_off_share: float = option(0.2, "share of the conversations trained with reasoning off (empty think "
                                        "block, the answer only)", min=0.0, max=1.0)
    budget_share: float = option(0.1, "share of the conversations whose reasoning is cut to a random token budget "
                                 "and closed early with </think>, then the answer", min=0.0, max=1.0)
    eval_problems: int = option(50, "held-out problems per task family for the exact match by reasoning mode, "
                                "before and after (0 = none)", min=0)
    eval_budgets: list[int] = option([8, 24], "thinking budgets (tokens) of the exact match by mode", min=1,
                                     metavar="N")
    heldout_fraction: float = option(0.02, "fraction of the --data conversations held out for the held-out loss",
                                     min=0.0, max=0.5)
    heldout_task_problems: int = option(HELDOUT_TASK_PROBLEMS, "held-out task conversations in the held-out loss",
                                        min=1)
    out: Path = option(Path("runs/sft"), "output folder (metrics.jsonl, step-NNNNNN/, final/, summary.json)")
    resume: bool = option(False, "continue from the newest checkpoint in --out, with its saved configuration")
    strict_finite: bool = option(False, "refuse a checkpoint with NaN or inf in a weight (default: load it, "
                                 "warning once per such tensor)")
    overwrite: bool = option(False, "replace the run already in --out (its final/, step-NNNNNN/, summary.json, "
                             "metrics.jsonl; nothing else)")
    # the training loop's defaults, for fine-tuning
    steps: int = option(300, "optimizer steps", min=1)
    lr: float = option(2e-3, "peak learning rate of the warmup-stable-decay schedule", min=0.0)

    def validate(self) -> None:
        super().validate()
        self.check_memory(self.seq_len)
        check_items(self, "conversations", "eval_problems", "heldout_task_problems")
        if self.use_tasks and not self.conversations:  # one task conversation per row the run reads
            n = self.steps * self.batch_size // (2 if self.data else 1)
            check_fits(self, "steps", n * ITEM_BYTES, f"{n:,} task conversations (--conversations 0: one per row "
                       "the run reads, --steps x --batch-size)")
        if self.reasoning_off_share + self.budget_share > 1:
            fail(self, "budget_share", f"with --reasoning-off-share {self.reasoning_off_share} the shares exceed 1")

    @property
    def use_tasks(self) -> bool:
        return self.tasks if self.tasks is not None else not self.data

    @property
    def use_tools(self) -> bool:
        return (self.tools if self.tools is not None else self.use_tasks) and self.tool_share > 0


def _data(cfg: SFTConfig, tokenizer: Tokenizer,
          console: Console) -> tuple[sft_data.SFTRows, sft_data.SFTRows, dict[str, int]]:
    """Training rows (in their drawn modes, drawn in batches of one length bucket), held-out rows (reasoning on),
    and the tool conversations' counts {"tools": given, "tools_too_long": skipped by --seq-len}."""
    train_convs, heldout_convs = [], []
    user = sft_data.read_conversations(cfg.data) if cfg.data else []
    if user:
        k = max(1, round(len(user) * cfg.heldout_fraction)) if len(user) > 1 else 0
        train_convs, heldout_convs = user[: len(user) - k], user[len(user) - k:]
    n = cfg.conversations or math.ceil(cfg.steps * cfg.batch_size * (0.5 if user else 1.0))
    if cfg.use_tasks:
        train_convs += sft_data.task_conversations(n, cfg.seed, "train", cfg.difficulty)
        heldout_convs += sft_data.task_conversations(cfg.heldout_task_problems, cfg.seed, "heldout", cfg.difficulty)
    n_tools = round(n * cfg.tool_share) if cfg.use_tools else 0
    if n_tools:  # after the others: their modes are drawn as without tools
        train_convs += sft_data.tool_conversations(n_tools, cfg.seed, "train", cfg.difficulty)
        heldout_convs += sft_data.tool_conversations(max(1, round(cfg.heldout_task_problems * cfg.tool_share)),
                                                     cfg.seed, "heldout", cfg.difficulty)
    if not train_convs:
        raise ConfigError("no training data: give --data files or keep the task conversations (--tasks)")
    exs = sft_data.examples(train_convs, tokenizer, cfg.seed, cfg.reasoning_off_share, cfg.budget_share)
    tools = {"tools": n_tools, "tools_too_long": sum(len(e.ids) > cfg.seq_len + 1 for e in exs[len(exs) - n_tools:])}
    rows = sft_data.rows(exs, cfg.seq_len, tokenizer.pad_id, cfg.seed)
    heldout = sft_data.build(heldout_convs, tokenizer, cfg.seq_len, cfg.seed)
    if not len(rows.data):
        raise DataError(f"every conversation is longer than --seq-len {cfg.seq_len} tokens or has no assistant "
                        "turn: nothing to train on")
    rows.data = LengthBatches(rows.data, cfg.batch_size)
    heldout.data = LengthBatches(heldout.data, 0) if len(heldout.data) else heldout.data
    console.print(f"[bold]data[/] {len(rows.data):,} conversations ({len(user):,} from files, "
                  f"{n_tools - tools['tools_too_long']:,} tool conversations), modes {rows.modes}, rows of at most "
                  f"{rows.data.seq_len + 1} tokens; skipped: {rows.skipped_too_long} longer than {cfg.seq_len} "
                  f"tokens, {rows.skipped_no_assistant} without an assistant turn")
    return rows, heldout, tools


class LengthBatches(PackedData):
    """Rows drawn in batches of one length bucket (the row's length rounded up to a power of two), each batch cut
    to its longest row: a batch of short task conversations is not padded to a tool conversation's ~460 tokens.

    Exact for the loss: a row is right-padded, the model is causal, and nothing past a batch's last target counted
    by the mask is read. An epoch's order: the rows shuffled (the seed's stream for the epoch), split by bucket
    into batches of `batch_size` in that order; the full batches shuffled, then each bucket's remainder; rotated so
    that the full batches sit on the run's batch boundaries (an epoch's length need not divide into batches).
    `batch_size` 0 (held-out rows): the rows sorted by length, so `eval_loss`'s consecutive chunks are cut too."""

    def __init__(self, data: PackedData, batch_size: int) -> None:
        lengths = (data.mask.cumsum(1) == data.mask.sum(1, keepdim=True)).int().argmax(1) + 1  # last counted target
        order = (torch.argsort(lengths, stable=True) if batch_size == 0
                 else torch.arange(len(data), device=lengths.device))
        super().__init__(data.rows[order], data.mask[order], data.seed)
        self.lengths, self.batch_size = lengths[order], batch_size
        self.buckets = torch.ceil(torch.log2(self.lengths.clamp(min=64).double())).long()

    def order(self, epoch: int) -> torch.Tensor:
        if self.batch_size == 0:
            return torch.arange(len(self), device=self.rows.device)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, epoch))  # host rows, as PackedData's
            perm = torch.randperm(len(self), generator=g, device="cpu")
            parts = [b for k in self.buckets.unique().tolist()
                     for b in perm[self.buckets[perm] == k].split(self.batch_size)]
            full = [b for b in parts if len(b) == self.batch_size]
            seq = torch.cat([full[i] for i in torch.randperm(len(full), generator=g, device="cpu")]
                            + [b for b in parts if len(b) < self.batch_size])
            fill = -(epoch * len(self)) % self.batch_size  # rows that close the last epoch's batch
            self._perm = (epoch, seq.roll(fill))
        return self._perm[1]

    def take(self, index: list[int]) -> Batch:
        b = super().take(index)
        width = int(self.lengths[index].max())
        return Batch(b.inputs[:, :width], b.targets[:, :width], b.mask[:, :width])


def _accuracy(cfg: SFTConfig, model: torch.nn.Module, tokenizer: Tokenizer) -> dict:
    """{mode: {family: accuracy}} by reasoning mode, plus `raw` (the pretraining prompt of task_accuracy)."""
    by_mode = accuracy_by_mode(model, tokenizer, cfg.eval_problems, cfg.difficulty, cfg.seed, cfg.eval_budgets)
    raw = task_accuracy(model, tokenizer, cfg.eval_problems, cfg.difficulty, cfg.seed)
    table = {mode: {f: r["accuracy"] for f, r in fams.items()} for mode, fams in by_mode.items()}
    table["raw"] = {f: r["accuracy"] for f, r in raw.items()}
    examples = {f: r["example"] for f, r in by_mode["on"].items()}
    return {"accuracy": table, "examples": examples}


def _tool_accuracy(cfg: SFTConfig, model: torch.nn.Module, tokenizer: Tokenizer) -> dict:
    """Greedy episodes of the tool environment's held-out problems (rl/env_source.py heldout_env): accuracy,
    tool-call validity, turns; a whole episode gets TOOL_EPISODE_TOKENS tokens after its prompt."""
    engine = Engine(model, think_tokens=ThinkTokens.from_tokenizer(tokenizer))
    return heldout_env(engine, tokenizer, LookupEnv(cfg.difficulty), cfg.tool_eval_problems, cfg.seed,
                       TOOL_EPISODE_TOKENS)


def sft(cfg: SFTConfig, console: Console | None = None) -> Path:
    """Run (or resume) one SFT run; returns its `final/` checkpoint folder.

    Writes `cfg.out`: metrics.jsonl, step-NNNNNN/ checkpoints, final/, summary.json (see the module docstring).
    Under torchrun every rank trains its share of each batch and rank 0 writes the files (train/stage.py).
    """
    console = console or Console()
    return stage.launch(cfg, console, OPERATIONAL_FIELDS, lambda start: _sft(start, console),
                        reads=lambda c: {"--data": c.data})


def _sft(start: stage.Start, console: Console) -> Path:
    cfg, ckpt = start.cfg, start.ckpt
    rank = parallel.rank_world()[0]
    device = device_of(cfg)  # inside the process group: under torchrun, `auto` is this rank's own GPU
    torch.manual_seed(cfg.seed)
    source = ckpt or cfg.model
    # training needs dense weights: a quantized --model is expanded (quant/packed.py layers are inference-only)
    model, tokenizer = checkpoint.open(source, device, torch.float32, strict_finite=cfg.strict_finite,
                                       dequantize=True, require_tokenizer=True)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{source}: the model's vocab_size {model.config.vocab_size} < its tokenizer's "
                          f"{tokenizer.vocab_size}")
    rows, heldout, tools = _data(cfg, tokenizer, console)
    evaluate = rank == 0 and cfg.use_tasks and cfg.eval_problems > 0
    before = {}
    # a resumed run measures the checkpoint the run started from, as the uninterrupted run did
    if evaluate and (ckpt is None or checkpoint.is_checkpoint(cfg.model)):
        t0 = time.perf_counter()
        begin = model if ckpt is None else checkpoint.load(cfg.model, dtype=torch.float32,
                                                           strict_finite=cfg.strict_finite, dequantize=True,
                                                           device=device)
        before = _accuracy(cfg, begin, tokenizer)
        console.print(f"[bold]before SFT[/] exact match by mode measured in {time.perf_counter() - t0:.0f} s")
    elif evaluate:
        console.print(f"[yellow]{cfg.model} (the checkpoint the run started from) is gone: no 'before' accuracy[/]")
    torch.manual_seed(cfg.seed)  # the training run's random streams do not depend on whether it evaluated first
    console.print(f"[bold]model[/] {source}: {model.config.pattern}, {model.num_parameters():,} parameters; "
                  f"{cfg.steps} steps of {cfg.batch_size} conversations")
    run = LMStage(model, tokenizer, rows.data, cfg, cfg.out, console, heldout.data if len(heldout.data) else None,
                  label="sft")
    run.run(start.resume)
    run.balance.remove()
    result = run.result
    final = cfg.out / "final"
    model = run.save_final()  # the whole model on rank 0 (None elsewhere)
    if rank == 0:
        after = _accuracy(cfg, model, tokenizer) if evaluate else {}
        tool_after = _tool_accuracy(cfg, model, tokenizer) if cfg.use_tools and cfg.tool_eval_problems else {}
        stage.write_summary(cfg.out, {
            "out": str(cfg.out), "final": str(final), "metrics": str(cfg.out / "metrics.jsonl"),
            "model": str(cfg.model), "parameters": model.num_parameters(), "steps": run.step,
            "seconds": round(time.perf_counter() - start.t_start, 1), "train_seconds": round(run.seconds, 1),
            "last_train_loss": result.last_loss, "eval_losses": result.eval_losses,
            "conversations": {"train": len(rows.data), "heldout": len(heldout.data), "modes": rows.modes,
                              "skipped_too_long": rows.skipped_too_long + heldout.skipped_too_long,
                              "skipped_no_assistant": rows.skipped_no_assistant + heldout.skipped_no_assistant,
                              "row_tokens": rows.data.seq_len + 1, **tools},
            "accuracy_before": before.get("accuracy", {}), "accuracy_after": after.get("accuracy", {}),
            "examples": after.get("examples", {}), "tools_after": tool_after,
            "skipped_steps": result.skipped,
            "config": to_dict(cfg),
        })
    return final


def print_summary(summary: dict, console: Console) -> None:
    """The end-of-run report of `nemotron3 sft`, from its summary.json."""
    console.rule("[bold]SFT summary")
    conv = summary["conversations"]
    console.print(f"{summary['steps']} steps in {summary['train_seconds']} s ({summary['seconds']} s in all) on "
                  f"{conv['train']:,} conversations (modes {conv['modes']}; {conv.get('tools', 0):,} tool "
                  f"conversations); skipped: {conv['skipped_too_long']} too long, {conv['skipped_no_assistant']} "
                  "without an assistant turn")
    if summary["eval_losses"]:
        curve = "  ".join(f"{s}:{v:.3f}" for s, v in summary["eval_losses"])
        console.print(f"held-out loss (assistant tokens) by step  {curve}")
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    if after:
        modes = list(after)
        families = list(after[modes[0]])
        console.print("held-out exact match by reasoning mode, before -> after SFT")
        console.print(f"  {'family':10s}" + "".join(f"{m:>16s}" for m in modes))
        for fam in families:
            cells = "".join((f"{before[m][fam]:7.0%}" if fam in before.get(m, {}) else f"{'-':>7s}") +
                            f" -> {after[m][fam]:4.0%}" for m in modes)
            console.print(f"  {fam:10s}{cells}")
    tools = summary.get("tools_after") or {}
    if tools:
        valid = tools["valid_fraction"]
        console.print(f"tool environment, {tools['problems']} held-out problems as greedy episodes: accuracy "
                      f"{tools['accuracy']:.0%}, tool calls valid "
                      f"{'-' if valid is None else f'{valid:.0%}'}, {tools['turns']:.1f} turns")
    print_footer(summary, console)


def main(cfg: SFTConfig) -> int:
    """`nemotron3 sft`: run, then print the summary (rank 0)."""
    return run_stage(sft, cfg, print_summary)
