"""The pretraining stage: a Nemotron 3 hybrid from scratch on the embedded reasoning tasks or your own text.

    from nemotron3.stages.pretrain import PretrainConfig, pretrain
    final = pretrain(PretrainConfig(steps=300, out="runs/x"))       # -> runs/x/final, a checkpoint folder

    nemotron3 pretrain                                   the embedded default (tiny model, a few minutes on 2 cores)
    nemotron3 pretrain --data corpus/ notes.jsonl        your .txt / .jsonl / .parquet files (add --tasks to mix both)
    nemotron3 pretrain --out runs/x --save-every 100     checkpoints in runs/x/step-NNNNNN/
    nemotron3 pretrain --out runs/x --resume             continue the newest checkpoint exactly
    nemotron3 pretrain --init-from runs/x/final --out runs/cpt   continued pretraining: those weights, a fresh
                                                         optimizer and schedule (same architecture and tokenizer)
    torchrun --nproc-per-node 2 -m nemotron3.cli pretrain --batch-size 16    FSDP2 over 2 ranks (docs/scaling.md)

Layout of `out`: metrics.jsonl (one JSON object per step, plus eval records), step-NNNNNN/ (checkpoint +
trainer_state.pt), final/ (a checkpoint folder for load_pretrained, the engine and the server), summary.json.

What a run does: train a byte-level BPE tokenizer on a sample of the corpus (or load `--tokenizer`); pack the
documents into rows (train/data.py); build the model from `config` with the tokenizer's vocabulary (or load
`--init-from`'s weights and tokenizer); optionally convert it to the NVFP4 recipe (quant/convert.py); run the
training loop (train/loop.py on the skeleton of train/stage.py); save final/; score greedy
exact match on held-out task problems (nemotron3/eval/accuracy.py); write summary.json.

**Resume** restores the configuration saved in the checkpoint. Fields that shape the run (model, data,
schedule, recipe) cannot change on resume: a different `steps`, say, would change the learning-rate
schedule and the data drawn for the run, so the result would match neither run; it is refused with a
message. Fields that only decide what is saved or reported, or where the run ends (`eval_every`, `save_every`,
`keep_last`, `log_every`, `eval_problems`, `stop_after`) may change, and so may the number of processes and their
layout (`dp_shard`, `ep`): a checkpoint saved by N ranks resumes in M at the same data position (bit for bit when
M = N).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from nemotron3.checkpoint import has_tokenizer, is_checkpoint, load_tokenizer, read_config
from nemotron3.checkpoint import load as load_pretrained
from nemotron3.config import ModelConfig
from nemotron3.envs import lookup
from nemotron3.eval.accuracy import task_accuracy
from nemotron3.model import HybridLM
from nemotron3.options import (
    ConfigError,
    check_items,
    describe,
    device_of,
    fail,
    field_named,
    option,
    restore_config,
    to_dict,
)
from nemotron3.presets import PRESETS
from nemotron3.tokenizer import SPECIAL_TOKENS, Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train import mixture, stage
from nemotron3.train.evaluate import unigram_baseline
from nemotron3.train.loop import LMStage, TrainConfig
from nemotron3.train.summary import print_footer, run_stage

# --nvfp4-off names -> the NVFP4Recipe field each one turns off.
NVFP4_SWITCHES = {"rht": "rht", "sr": "stochastic_rounding", "2d": "weight_2d"}

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)
TOOL_SHARE = 0.05  # tool conversations in the task text, a share of its tokens (PretrainConfig.tool_share)

# ModelConfig fields that are not the architecture: those that follow the tokenizer, and config.json's metadata
# (`--init-from` keeps its checkpoint's)
TOKENIZER_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "extra")

# Fields that only decide what is saved, logged or reported: a resumed run may change them.
OPERATIONAL_FIELDS = ("eval_every", "save_every", "keep_last", "log_every", "stop_after", "eval_problems", "out",
                      "resume", "dp_shard", "ep", "overwrite", "strict_finite", "device")


@dataclass
class PretrainConfig(TrainConfig):
    """Model, data and precision recipe of a pretraining run (with the training loop's fields of TrainConfig).

    Sizes are bounded by this machine's memory (TrainConfig.check_memory): a row, a step, and with the embedded
    tasks the whole run's task text (packed up front), besides the problems held for the tokenizer and the
    evaluations.
    """

    stage = "pretrain"
    config: str = option("tiny", f"model: a preset ({', '.join(sorted(PRESETS))}), a config.json or a checkpoint "
                         "folder (its config; the weights start from scratch)")
    init_from: Path | None = option(None, "continued pretraining: start from this checkpoint folder's weights (its MTP "
                                    "block too) and tokenizer, with a fresh optimizer and schedule; its architecture "
                                    "must be --config's", metavar="DIR")
    data: list[Path] = option([], "sources: .txt / .jsonl / .parquet files or folders, or tasks (the embedded task "
                              "families), each with an optional :WEIGHT, its share of the tokens (all or none; "
                              "default: the embedded tasks)", metavar="PATH[:WEIGHT]")
    tasks: bool | None = option(None, "include the synthetic reasoning tasks (default: only when --data is not "
                                "given; with weights, name them in --data as tasks:WEIGHT)")
    phase2_at: float | None = option(None, "switch to the --phase2-data blend after this fraction of the steps "
                                     "(between 0 and 1)", metavar="FRACTION")
    phase2_data: list[Path] = option([], "phase 2's sources, as --data (tasks too), each with a :WEIGHT when there "
                                     "are several", metavar="PATH[:WEIGHT]")
    difficulty: int = option(1, "task difficulty (1 = easiest)", min=1)
    seq_len: int = option(256, "tokens per training row", min=2)
    seed: int = option(0, "seed of the weights, the data order and the task problems", min=0)
    vocab_size: int = option(0, "BPE vocabulary cap (0 = the model config's)", min=0)
    tokenizer: Path | None = option(None, "a tokenizer.json, or a folder holding one, to use instead of training "
                                    "one on the corpus", metavar="PATH")
    nvfp4: bool = option(False, "train with the NVFP4 recipe and Super's precision policy (quant/convert.py)")
    nvfp4_off: list[str] = option([], "ablations of --nvfp4: turn off the random Hadamard transform on wgrad "
                                  "(rht), stochastic rounding of gradients (sr), 16x16 weight tiles (2d)",
                                  choices=sorted(NVFP4_SWITCHES), metavar="SWITCH")
    compile: bool = option(False, "torch.compile the Mamba mixers (pays off for long runs only)")
    eval_problems: int = option(50, "held-out problems per task family for the final exact match", min=0)
    tokenizer_sample: int = option(4000, "task documents the tokenizer is trained on", min=1)
    tool_share: float = option(TOOL_SHARE, "tool-use conversations (the tool environment's, rendered with the chat "
                               "template) in the task text, as a share of its tokens; the tokenizer's sample holds "
                               "them too (0 = none)", min=0.0, max=0.5)
    heldout_fraction: float = option(0.02, "fraction of user text held out for the held-out loss", min=0.0,
                                     max=0.5)
    heldout_task_problems: int = option(train_data.HELDOUT_TASK_PROBLEMS, "held-out task problems in the "
                                        "held-out loss (spread over the families)", min=1)
    out: Path = option(Path("runs/pretrain"), "output folder (metrics.jsonl, step-NNNNNN/, final/, summary.json)")
    resume: bool = option(False, "continue from the newest checkpoint in --out, with its saved configuration")
    strict_finite: bool = option(False, "on --resume: refuse a checkpoint with NaN or inf in a weight (default: "
                                 "load it, warning once per such tensor)")
    overwrite: bool = option(False, "replace the run already in --out (its final/, step-NNNNNN/, summary.json, "
                             "metrics.jsonl; nothing else)")

    def validate(self) -> None:
        super().validate()
        self.phase_sources()  # the mixture's checks, one line naming the flag and the item
        self.check_memory(self.seq_len, int(self.task_tokens()))
        check_items(self, "eval_problems", "tokenizer_sample", "heldout_task_problems")
        if 0 < self.vocab_size < MIN_VOCAB:
            fail(self, "vocab_size", f"a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes + "
                 f"{len(SPECIAL_TOKENS)} special tokens); 0 = the model config's")
        if self.init_from is not None and (self.tokenizer is not None or self.vocab_size):
            fail(self, "tokenizer" if self.tokenizer is not None else "vocab_size", "--init-from continues with its "
                 "checkpoint's tokenizer (its embeddings are that vocabulary's)")
        if self.tokenizer is not None and self.vocab_size:
            fail(self, "vocab_size", "caps a tokenizer trained here; --tokenizer gives one already trained")
        if self.nvfp4_off and not self.nvfp4:
            fail(self, "nvfp4_off", "ablates the NVFP4 recipe; add --nvfp4")
        if self.nvfp4_high_precision_tail and not self.nvfp4:
            fail(self, "nvfp4_high_precision_tail", "switches the NVFP4 recipe off at the end; add --nvfp4")

    @property
    def use_tasks(self) -> bool:
        """Whether the task families are a source of some phase."""
        return any(s.name == mixture.TASKS for phase in self.phase_sources() for s in phase)

    @property
    def phase2_step(self) -> int:
        """The 0-based step from which the batches are phase 2's: ⌊phase2_at · steps + ½⌋ (0 = no phase 2)."""
        return math.floor(self.phase2_at * self.steps + 0.5) if self.phase2_at is not None else 0

    def phase_steps(self) -> list[int]:
        return [self.phase2_step, self.steps - self.phase2_step] if self.phase2_at is not None else [self.steps]

    def phase_sources(self) -> list[list[mixture.Source]]:
        """The sources of each phase (mixture.blend); ConfigError naming the flag and the item at fault."""
        try:
            return mixture.blend(self.data, self.tasks, self.phase2_data, self.phase2_at, self.phase2_step,
                                 self.steps)
        except mixture.SpecError as e:
            value = getattr(self, e.field)
            value = e.item if e.item is not None else [str(v) for v in value] if isinstance(value, list) else value
            raise ConfigError(f"{describe(field_named(self, e.field))} = {value!r}: {e}") from None

    def task_tokens(self) -> float:
        """Tokens of task text the run reads: each phase's task share of its tokens (mixture.task_share)."""
        return sum(mixture.task_share(sources) * steps * self.batch_size * self.seq_len
                   for sources, steps in zip(self.phase_sources(), self.phase_steps()))


def restore(cfg: PretrainConfig, saved: dict, where: Path) -> PretrainConfig:
    """The saved run's configuration, with the caller's operational fields; refuses a change of any other."""
    saved = {k: v for k, v in saved.items() if not (k == "data" and v is None)}  # nemotron3 0.1 saved data=None
    saved.setdefault("tool_share", 0.0)  # saved before tool_share existed: no tool text in the task source
    return restore_config(cfg, saved, where, OPERATIONAL_FIELDS)


def tokenizer_sample(cfg: PretrainConfig) -> list[str]:
    """The task text a tokenizer trained here sees: `tokenizer_sample` task documents, then tool conversations
    (lookup.texts) at `tool_share` of the characters (at least two: every word of the tool format then merges).
    The task source's training documents have the same blend, so every token the sample teaches the tokenizer
    is trained in pretraining; none is first met, untrained, in SFT (docs/agentic-rl.md §3)."""
    texts = train_data.task_texts(cfg.tokenizer_sample, cfg.seed, "train", cfg.difficulty)
    if cfg.tool_share > 0:
        one = lookup.texts(1, cfg.seed, cfg.difficulty)[0]
        share = cfg.tool_share / (1 - cfg.tool_share)
        texts += lookup.texts(max(2, math.ceil(share * sum(map(len, texts)) / len(one))), cfg.seed, cfg.difficulty)
    return texts


def _documents(tokenizer: Tokenizer, sample: list[str], tokens: float) -> int:
    """Documents like `sample`'s that hold `tokens` tokens (5 % spare; 2 per document for <s> and </s>)."""
    per_doc = sum(map(len, tokenizer.encode_batch(sample))) / len(sample) + 2
    return math.ceil(1.05 * tokens / per_doc)


def _corpus(cfg: PretrainConfig, console: Console, tokenizer: Tokenizer | None, vocab_cap: int):
    """Texts for training and evaluation ({source: documents} for the user's sources of every phase), and the
    tokenizer (trained here unless resuming). Every source of both phases must exist before any is read."""
    flags: dict[str, str] = {}  # each source, in order, with the flag that first names it
    for flag, phase in zip(("--data", "--phase2-data"), cfg.phase_sources()):
        for s in phase:
            flags.setdefault(s.name, flag)
    paths = [n for n in flags if n != mixture.TASKS]
    for name in paths:
        if not Path(name).exists():
            raise train_data.DataError(f"{flags[name]} {name}: no such file or folder")
    user = {name: train_data.read_texts([Path(name)]) for name in paths}
    task_sample = tokenizer_sample(cfg) if cfg.use_tasks else []
    if tokenizer is None and cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    elif tokenizer is None:
        tokenizer = Tokenizer.train([t for texts in user.values() for t in texts] + task_sample, vocab_cap)
    task_train, task_heldout, n_tasks = [], [], 0
    if cfg.use_tasks:
        needed = cfg.task_tokens()  # task tokens the run reads, tool conversations included
        tasks_part, tools_part = task_sample[:cfg.tokenizer_sample], task_sample[cfg.tokenizer_sample:]
        task_train = train_data.task_texts(_documents(tokenizer, tasks_part, (1 - cfg.tool_share) * needed),
                                           cfg.seed, "train", cfg.difficulty)
        n_tasks = len(task_train)
        if tools_part:
            task_train += lookup.texts(_documents(tokenizer, tools_part, cfg.tool_share * needed), cfg.seed,
                                       cfg.difficulty)
        task_heldout = train_data.task_texts(cfg.heldout_task_problems, cfg.seed, "heldout", cfg.difficulty)
    tools = f" ({len(task_train) - n_tasks:,} tool conversations)" if len(task_train) > n_tasks else ""
    console.print(f"[bold]data[/] {sum(map(len, user.values())):,} user documents, {len(task_train):,} task "
                  f"documents{tools}; tokenizer {tokenizer.vocab_size} tokens")
    return tokenizer, user, task_train, task_heldout


def _packed(cfg: PretrainConfig, tokenizer: Tokenizer, user: dict[str, list[str]], task_train: list[str],
            task_heldout: list[str], console: Console | None = None) -> tuple[mixture.MixedData,
                                                                           train_data.PackedData]:
    """Training rows in their phases' blend (train/mixture.py) and held-out rows (each user source's tail, and
    held-out task problems); says the blend of each phase, and warns of a source its share repeats."""
    phases, steps = cfg.phase_sources(), cfg.phase_steps()
    starts = [0, cfg.phase2_step * cfg.batch_size][:len(phases)]
    data, heldout = mixture.assemble(tokenizer, phases, starts, {**user, mixture.TASKS: task_train}, task_heldout,
                                     cfg.seq_len, cfg.seed, cfg.heldout_fraction)
    console = console or Console(stderr=True)
    for line in data.plan(steps):
        console.print(f"[bold]data[/] {escape(line)}", soft_wrap=True)
    for j, epochs in ({} if data.single else data.repeats(cfg.steps * cfg.batch_size)).items():
        console.print(f"[yellow]warning:[/] data source {escape(data.names[j])}: its share draws {epochs:.2f} times "
                      f"its {data.spans[j][1] - data.spans[j][0]:,} rows, so they repeat (epochs)", soft_wrap=True)
    return data, heldout


def _data_shares(cfg: PretrainConfig, data: mixture.MixedData, steps: int) -> dict[str, dict[str, float]]:
    """Each phase's realised token share per source over the `steps` steps run (summary.json's data_shares), also
    a metrics.jsonl line for each phase the run completed, at its last step (mixture.log_shares)."""
    shares = data.shares(steps * cfg.batch_size)
    mixture.log_shares(cfg.out / "metrics.jsonl", shares, list(itertools.accumulate(cfg.phase_steps())), steps)
    return shares


def _convert_nvfp4(model: HybridLM, off: list[str], seed: int) -> HybridLM:
    """The NVFP4 recipe with Super's precision policy; `off` names the recipe switches to ablate."""
    from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4
    from nemotron3.quant.nvfp4_linear import NVFP4Recipe

    recipe = NVFP4Recipe(seed=seed, **{NVFP4_SWITCHES[name]: False for name in off})
    return convert_to_nvfp4(model, PrecisionPolicy(recipe=recipe)) or model


def pretrain(cfg: PretrainConfig, console: Console | None = None) -> Path:
    """Run (or resume) one pretraining run; returns its `final/` checkpoint folder.

    Writes `cfg.out`: metrics.jsonl, step-NNNNNN/ checkpoints, final/, summary.json (see the module docstring).
    Under torchrun every rank trains its share of each batch and rank 0 writes the files (train/stage.py).
    """
    console = console or Console()

    def reads(c: PretrainConfig) -> dict:
        return {"--config": Path(c.config) if Path(c.config).exists() else None, "--tokenizer": c.tokenizer,
                "--data": c.data, "--phase2-data": c.phase2_data, "--init-from": c.init_from}

    return stage.launch(cfg, console, OPERATIONAL_FIELDS, lambda start: _pretrain(start, console), reads=reads,
                        check=init_config, restore=lambda c, saved, where, _ops: restore(c, saved, where))


def init_config(cfg: PretrainConfig) -> ModelConfig | None:
    """With `--init-from DIR`: DIR's model config, which must be `--config`'s architecture (every field but the
    vocabulary and special-token ids, which follow DIR's tokenizer); ConfigError naming DIR and the first field
    that differs. None without `--init-from`."""
    if cfg.init_from is None or cfg.resume:  # a resumed run reads its own checkpoint, not --init-from
        return None
    where = f"--init-from {cfg.init_from}"
    if not is_checkpoint(cfg.init_from) or not has_tokenizer(cfg.init_from):
        raise ConfigError(f"{where}: not a checkpoint folder with its tokenizer (config.json and tokenizer.json)")
    source, wanted = read_config(cfg.init_from), ModelConfig.load(cfg.config)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in TOKENIZER_FIELDS and getattr(source, f.name) != getattr(wanted, f.name):
            raise ConfigError(f"{where}: {f.name} = {getattr(source, f.name)!r} there, {getattr(wanted, f.name)!r} in "
                              f"--config {cfg.config}: continued pretraining keeps the architecture (give --config "
                              f"{cfg.init_from})")
    return source


def _model(cfg: PretrainConfig, tokenizer: Tokenizer, ckpt: Path | None, device: torch.device) -> HybridLM:
    """The model a run starts from, in fp32 on `device`: the checkpoint it resumes, the `--init-from` weights (its
    MTP block too), or a fresh one of `--config` with the tokenizer's vocabulary; converted to the NVFP4 recipe
    with `--nvfp4` (a resumed checkpoint is saved unquantized and is converted again the same way)."""
    source = ckpt or cfg.init_from
    if source is not None:
        model = load_pretrained(source, dtype=torch.float32, strict_finite=cfg.strict_finite, dequantize=True,
                                device=device)
    else:
        vocab = -(-tokenizer.vocab_size // 64) * 64  # the tokenizer's vocabulary, rounded up for the matmuls
        config = ModelConfig.load(cfg.config).replace(vocab_size=vocab, bos_token_id=tokenizer.bos_id,
                                                      eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        model = HybridLM(config)  # initialised on the CPU, so a seed gives the same weights on any --device
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {model.config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    if cfg.nvfp4:
        model = _convert_nvfp4(model, cfg.nvfp4_off, cfg.seed)
    return model.to(device)


def _pretrain(start: stage.Start, console: Console) -> Path:
    cfg, ckpt = start.cfg, start.ckpt
    device = device_of(cfg)  # inside the process group: under torchrun, `auto` is this rank's own GPU
    torch.manual_seed(cfg.seed)
    config = ModelConfig.load(cfg.config)
    known = ckpt or cfg.init_from  # a tokenizer already trained: the checkpoint's
    tokenizer, user, task_train, task_heldout = _corpus(cfg, console, load_tokenizer(known, True) if known else None,
                                                        cfg.vocab_size or config.vocab_size)
    data, heldout = _packed(cfg, tokenizer, user, task_train, task_heldout, console)
    model = _model(cfg, tokenizer, ckpt, device)
    if cfg.compile:
        model.compile_mixers()
    baseline = unigram_baseline(data, heldout, tokenizer.vocab_size)
    origin = f" from {cfg.init_from} (fresh optimizer and schedule)" if cfg.init_from and not ckpt else ""
    console.print(f"[bold]model[/] {cfg.config}{origin}: {model.config.pattern}, {model.num_parameters():,} "
                  f"parameters, vocab {model.config.vocab_size}; {len(data):,} training rows of {cfg.seq_len} "
                  f"tokens; unigram baseline {baseline:.3f} nats")
    run = LMStage(model, tokenizer, data, cfg, cfg.out, console, heldout)
    run.run(start.resume)
    run.balance.remove()
    result = run.result
    final = cfg.out / "final"
    model = run.save_final()  # the whole model on rank 0 (None elsewhere)
    if run.rank == 0:
        accuracy = {}
        if task_train and cfg.eval_problems > 0:
            accuracy = task_accuracy(model, tokenizer, cfg.eval_problems, cfg.difficulty, cfg.seed)
        tail = result.load_ratios[-max(1, len(result.load_ratios) // 10):]
        stage.write_summary(cfg.out, {
            "out": str(cfg.out), "final": str(final), "metrics": str(cfg.out / "metrics.jsonl"),
            "parameters": model.num_parameters(), "steps": run.step,
            "seconds": round(time.perf_counter() - start.t_start, 1),
            "train_seconds": round(run.seconds, 1), "last_train_loss": result.last_loss,
            "eval_losses": result.eval_losses, "unigram_baseline": baseline,
            "load_max_min_first": result.load_ratios[0] if result.load_ratios else None,
            "load_max_min_last10pct": sum(tail) / len(tail) if result.load_ratios else None,
            "skipped_steps": result.skipped,
            "accuracy": {f: r["accuracy"] for f, r in accuracy.items()},
            "examples": {f: r["example"] for f, r in accuracy.items()},
            "data_shares": _data_shares(cfg, data, run.step),
            "config": to_dict(cfg),
        })
    return final


def print_summary(summary: dict, console: Console) -> None:
    """The end-of-run report of `nemotron3 pretrain`, from its summary.json."""
    ev = summary["eval_losses"]
    console.rule("[bold]pretraining summary")
    console.print(f"{summary['parameters']:,} parameters, {summary['steps']} steps in {summary['train_seconds']} s "
                  f"({summary['seconds']} s in all)")
    if ev:
        curve = "  ".join(f"{s}:{v:.3f}" for s, v in ev)
        console.print(f"held-out loss by step  {curve}   (unigram baseline {summary['unigram_baseline']:.3f} nats)")
    if summary["load_max_min_last10pct"] is not None:
        console.print(f"expert load max/min (worst layer): {summary['load_max_min_first']:.2f} at step 1, "
                      f"{summary['load_max_min_last10pct']:.2f} over the last 10% of steps")
    for fam, acc in summary["accuracy"].items():
        ex = summary["examples"][fam]
        answer = ex["completion"].rsplit("</think>", 1)[-1].strip().replace("\n", " ")[:40]
        console.print(f"  held-out exact match {fam:10s} {acc:6.1%}   e.g. {ex['prompt'][:60]!r} -> {answer!r}")
    print_footer(summary, console)


def main(cfg: PretrainConfig) -> int:
    """`nemotron3 pretrain`: run, then print the summary (rank 0)."""
    return run_stage(pretrain, cfg, print_summary)
