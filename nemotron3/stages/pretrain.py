"""The pretraining stage: a Nemotron 3 hybrid from scratch on the embedded reasoning tasks or your own text.

    from nemotron3.stages.pretrain import PretrainConfig, pretrain
    final = pretrain(PretrainConfig(steps=300, out="runs/x"))       # -> runs/x/final, a checkpoint folder

    nemotron3 pretrain                                   the embedded default (tiny model, a few minutes on 2 cores)
    nemotron3 pretrain --data corpus/ notes.jsonl        your .txt / .jsonl / .parquet files (add --tasks to mix both)
    nemotron3 pretrain --out runs/x --save-every 100     checkpoints in runs/x/step-NNNNNN/
    nemotron3 pretrain --out runs/x --resume             continue the newest checkpoint exactly
    torchrun --nproc-per-node 2 -m nemotron3.cli pretrain --batch-size 16    FSDP2 over 2 ranks (docs/scaling.md)

Layout of `out`: metrics.jsonl (one JSON object per step, plus eval records), step-NNNNNN/ (checkpoint +
trainer_state.pt), final/ (a checkpoint folder for load_pretrained, the engine and the server), summary.json.

What a run does: train a byte-level BPE tokenizer on a sample of the corpus (or load `--tokenizer`); pack the
documents into rows (train/data.py); build the model from `config` with the tokenizer's vocabulary; optionally
convert it to the NVFP4 recipe (quant/convert.py); run the training loop (train/loop.py); save final/; score greedy
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

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from nemotron3.config import ModelConfig
from nemotron3.distributed.parallel import gathered
from nemotron3.eval.accuracy import task_accuracy
from nemotron3.hf import load_pretrained
from nemotron3.model import HybridLM
from nemotron3.options import ConfigError, check_items, device_of, fail, option, restore_config, to_dict
from nemotron3.presets import PRESETS
from nemotron3.tokenizer import SPECIAL_TOKENS, Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data
from nemotron3.train.evaluate import unigram_baseline
from nemotron3.train.loop import TrainConfig, process_group, train
from nemotron3.train.summary import print_footer, run_stage

# --nvfp4-off names -> the NVFP4Recipe field each one turns off.
NVFP4_SWITCHES = {"rht": "rht", "sr": "stochastic_rounding", "2d": "weight_2d"}

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)

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
    data: list[Path] = option([], ".txt / .jsonl / .parquet files or folders (default: the embedded tasks)",
                              metavar="PATH")
    tasks: bool | None = option(None, "include the synthetic reasoning tasks (default: only when --data is not "
                                "given)")
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
        run_tokens = self.steps * self.batch_size * self.seq_len // (2 if self.data else 1) if self.use_tasks else 0
        self.check_memory(self.seq_len, run_tokens)
        check_items(self, "eval_problems", "tokenizer_sample", "heldout_task_problems")
        if 0 < self.vocab_size < MIN_VOCAB:
            fail(self, "vocab_size", f"a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes + "
                 f"{len(SPECIAL_TOKENS)} special tokens); 0 = the model config's")
        if self.tokenizer is not None and self.vocab_size:
            fail(self, "vocab_size", "caps a tokenizer trained here; --tokenizer gives one already trained")
        if self.nvfp4_off and not self.nvfp4:
            fail(self, "nvfp4_off", "ablates the NVFP4 recipe; add --nvfp4")
        if self.nvfp4_high_precision_tail and not self.nvfp4:
            fail(self, "nvfp4_high_precision_tail", "switches the NVFP4 recipe off at the end; add --nvfp4")

    @property
    def use_tasks(self) -> bool:
        return self.tasks if self.tasks is not None else not self.data


def restore(cfg: PretrainConfig, saved: dict, where: Path) -> PretrainConfig:
    """The saved run's configuration, with the caller's operational fields; refuses a change of any other."""
    saved = {k: v for k, v in saved.items() if not (k == "data" and v is None)}  # nemotron3 0.1 saved data=None
    return restore_config(cfg, saved, where, OPERATIONAL_FIELDS)


def _corpus(cfg: PretrainConfig, console: Console, tokenizer: Tokenizer | None, vocab_cap: int):
    """Texts for training and evaluation, and the tokenizer (trained here unless resuming)."""
    user = train_data.read_texts(cfg.data) if cfg.data else []
    task_sample = (train_data.task_texts(cfg.tokenizer_sample, cfg.seed, "train", cfg.difficulty)
                   if cfg.use_tasks else [])
    if tokenizer is None and cfg.tokenizer is not None:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    elif tokenizer is None:
        tokenizer = Tokenizer.train(user + task_sample, vocab_cap)
    task_train, task_heldout = [], []
    if cfg.use_tasks:
        per_doc = sum(map(len, tokenizer.encode_batch(task_sample))) / len(task_sample) + 2
        needed = cfg.steps * cfg.batch_size * cfg.seq_len * (0.5 if user else 1.0)  # tokens the run reads
        task_train = train_data.task_texts(math.ceil(1.05 * needed / per_doc), cfg.seed, "train", cfg.difficulty)
        task_heldout = train_data.task_texts(cfg.heldout_task_problems, cfg.seed, "heldout", cfg.difficulty)
    console.print(f"[bold]data[/] {len(user):,} user documents, {len(task_train):,} task documents; "
                  f"tokenizer {tokenizer.vocab_size} tokens")
    return tokenizer, user, task_train, task_heldout


def _packed(cfg: PretrainConfig, tokenizer: Tokenizer, user: list[str], task_train: list[str],
            task_heldout: list[str]) -> tuple[train_data.PackedData, train_data.PackedData]:
    """Training rows and held-out rows: a tail of the user text, and held-out task problems."""
    train_parts, eval_parts = [], []
    if user:
        a, b = train_data.split_tail(train_data.build(tokenizer, user, cfg.seq_len, cfg.seed), cfg.heldout_fraction)
        train_parts, eval_parts = [a], [b]
    if task_train:
        train_parts.append(train_data.build(tokenizer, task_train, cfg.seq_len, cfg.seed))
        eval_parts.append(train_data.build(tokenizer, task_heldout, cfg.seq_len, cfg.seed))
    if not train_parts:
        raise ConfigError("no training data: give --data files or keep the embedded tasks (--tasks)")

    def joined(parts: list[train_data.PackedData]) -> train_data.PackedData:
        return train_data.PackedData(torch.cat([p.rows for p in parts]), torch.cat([p.mask for p in parts]), cfg.seed)
    return joined(train_parts), joined(eval_parts)


def _convert_nvfp4(model: HybridLM, off: list[str], seed: int) -> HybridLM:
    """The NVFP4 recipe with Super's precision policy; `off` names the recipe switches to ablate."""
    from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4
    from nemotron3.quant.nvfp4_linear import NVFP4Recipe

    recipe = NVFP4Recipe(seed=seed, **{NVFP4_SWITCHES[name]: False for name in off})
    return convert_to_nvfp4(model, PrecisionPolicy(recipe=recipe)) or model


def pretrain(cfg: PretrainConfig, console: Console | None = None) -> Path:
    """Run (or resume) one pretraining run; returns its `final/` checkpoint folder.

    Writes `cfg.out`: metrics.jsonl, step-NNNNNN/ checkpoints, final/, summary.json (see the module docstring).
    Under torchrun every rank trains its share of each batch and rank 0 writes the files.
    """
    console = console or Console()
    t_start = time.perf_counter()
    resume, ckpt = None, None
    if cfg.resume:
        ckpt, resume = checkpoint.resume_point(cfg.out)
        cfg = restore(cfg, resume.get("run", {}), ckpt)
        console.print(f"[bold]resuming[/] {ckpt} (step {resume['step']}) with the run's saved configuration")
    device_of(cfg)  # a device this machine lacks is refused before --out is touched
    checkpoint.prepare_out(cfg.out, cfg.resume, cfg.overwrite, reads={
        "--config": Path(cfg.config) if Path(cfg.config).exists() else None, "--tokenizer": cfg.tokenizer,
        "--data": cfg.data})
    with process_group() as rank:
        return _pretrain(cfg, console, ckpt, resume, rank, t_start)


def _pretrain(cfg: PretrainConfig, console: Console, ckpt: Path | None, resume: dict | None, rank: int,
              t_start: float) -> Path:
    device = device_of(cfg)  # inside the process group: under torchrun, `auto` is this rank's own GPU
    torch.manual_seed(cfg.seed)
    config = ModelConfig.load(cfg.config)
    tokenizer, user, task_train, task_heldout = _corpus(cfg, console, Tokenizer.load(ckpt) if ckpt else None,
                                                        cfg.vocab_size or config.vocab_size)
    data, heldout = _packed(cfg, tokenizer, user, task_train, task_heldout)
    if ckpt:
        model = load_pretrained(ckpt, dtype=torch.float32, strict_finite=cfg.strict_finite, dequantize=True,
                                device=device)
    else:
        vocab = -(-tokenizer.vocab_size // 64) * 64  # the tokenizer's vocabulary, rounded up for the matmuls
        config = config.replace(vocab_size=vocab, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id)
        model = HybridLM(config)  # initialised on the CPU, so a seed gives the same weights on any --device
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {model.config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    if cfg.nvfp4:
        model = _convert_nvfp4(model, cfg.nvfp4_off, cfg.seed)
    model = model.to(device)
    if cfg.compile:
        model.compile_mixers()
    baseline = unigram_baseline(data, heldout, tokenizer.vocab_size)
    console.print(f"[bold]model[/] {cfg.config}: {model.config.pattern}, {model.num_parameters():,} parameters, "
                  f"vocab {model.config.vocab_size}; {len(data):,} training rows of {cfg.seq_len} tokens; "
                  f"unigram baseline {baseline:.3f} nats")
    result = train(model, tokenizer, data, cfg, cfg.out, heldout, resume, console)
    final = cfg.out / "final"
    model = gathered(model)  # sharded by FSDP2 under torchrun: the whole model, on rank 0 (None elsewhere)
    if rank == 0:
        checkpoint.save(final, model, tokenizer)
        accuracy = {}
        if task_train and cfg.eval_problems > 0:
            accuracy = task_accuracy(model, tokenizer, cfg.eval_problems, cfg.difficulty, cfg.seed)
        tail = result.load_ratios[-max(1, len(result.load_ratios) // 10):]
        summary = {
            "out": str(cfg.out), "final": str(final), "metrics": str(cfg.out / "metrics.jsonl"),
            "parameters": model.num_parameters(), "steps": result.steps,
            "seconds": round(time.perf_counter() - t_start, 1),
            "train_seconds": round(result.seconds, 1), "last_train_loss": result.last_loss,
            "eval_losses": result.eval_losses, "unigram_baseline": baseline,
            "load_max_min_first": result.load_ratios[0] if result.load_ratios else None,
            "load_max_min_last10pct": sum(tail) / len(tail) if result.load_ratios else None,
            "skipped_steps": result.skipped,
            "accuracy": {f: r["accuracy"] for f, r in accuracy.items()},
            "examples": {f: r["example"] for f, r in accuracy.items()},
            "config": to_dict(cfg),
        }
        (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
