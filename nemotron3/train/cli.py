"""Pretrain a Nemotron 3 hybrid model on the embedded reasoning tasks or your own text.

    nemotron3 pretrain                                   the embedded default (tiny model, a few minutes on 2 cores)
    nemotron3 pretrain --data corpus/ notes.jsonl        your .txt / .jsonl / .parquet files (add --tasks to mix both)
    nemotron3 pretrain --out runs/x --save-every 100     checkpoints in runs/x/step-NNNNNN/
    nemotron3 pretrain --out runs/x --resume             continue the newest checkpoint exactly
    torchrun --nproc-per-node 2 -m nemotron3.cli pretrain --batch-size 16    data parallel (gloo)

Layout of --out: metrics.jsonl (one JSON object per step, plus eval records), step-NNNNNN/ (checkpoint +
trainer_state.pt), final/ (a checkpoint folder for load_pretrained, the engine and the server), summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from nemotron3.commands.info import load_config
from nemotron3.hf import load_pretrained
from nemotron3.model import HybridLM
from nemotron3.presets import PRESETS
from nemotron3.train import checkpoint
from nemotron3.train import data as D
from nemotron3.train.evaluate import task_accuracy, unigram_baseline
from nemotron3.train.loop import TrainConfig, train
from nemotron3.train.tokenizer import Tokenizer

# --nvfp4-off names -> the NVFP4Recipe field each one turns off.
NVFP4_SWITCHES = {"rht": "rht", "sr": "stochastic_rounding", "2d": "weight_2d"}

# Arguments that define the run; `--resume` restores them from the checkpoint.
RUN_ARGS = ("config", "data", "tasks", "nvfp4", "nvfp4_off", "nvfp4_high_precision_tail", "steps", "batch_size", "micro_batch_size", "seq_len", "lr",
            "seed", "difficulty", "eval_every", "save_every", "compile", "vocab_size", "bias_update_rate",
            "seq_aux_coeff", "mtp_depths")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help=f"preset ({', '.join(sorted(PRESETS))}) or a config.json / folder")
    p.add_argument("--data", nargs="+", metavar="PATH", help=".txt/.jsonl/.parquet files or folders (default: the embedded tasks)")
    p.add_argument("--tasks", action=argparse.BooleanOptionalAction, default=None,
                   help="include the synthetic reasoning tasks (default: only when --data is not given)")
    p.add_argument("--nvfp4", action="store_true", help="the NVFP4 pretraining recipe (nemotron3.quant.convert)")
    p.add_argument("--nvfp4-off", nargs="+", default=[], choices=sorted(NVFP4_SWITCHES), metavar="SWITCH",
                   help=f"ablations of --nvfp4: turn off {', '.join(sorted(NVFP4_SWITCHES))} "
                        "(random Hadamard transform on wgrad, stochastic rounding of gradients, 16x16 weight tiles)")
    p.add_argument("--nvfp4-high-precision-tail", type=float, default=0.0, metavar="FRACTION",
                   help="with --nvfp4: train the last FRACTION of the steps unquantized, the paper's end-of-training "
                        "switch (App. D: the last 18%% recovers the loss gap); 0 = quantized to the end")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences (split over ranks)")
    p.add_argument("--micro-batch-size", type=int, default=0, help="rows per forward per rank (0 = all at once)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the WSD schedule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (1 = easiest)")
    p.add_argument("--vocab-size", type=int, default=0, help="BPE vocabulary cap (default: the config's)")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-loss-free expert-bias step (0 = off)")
    p.add_argument("--seq-aux-coeff", type=float, default=1e-4, help="sequence aux loss coefficient (0 = off)")
    p.add_argument("--mtp-depths", type=int, default=2, help="MTP depths trained (shared weights; 0 = no MTP loss)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-problems", type=int, default=50, help="held-out problems per family for the final exact match")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every K steps (0 = only final/)")
    p.add_argument("--compile", action="store_true", help="torch.compile the Mamba mixers (pays off for long runs only)")
    p.add_argument("--out", type=Path, default=Path("runs/pretrain"))
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")


def _convert_nvfp4(model: HybridLM, off: list[str], seed: int) -> HybridLM:
    """The NVFP4 recipe with Super's precision policy; `off` names the recipe switches to ablate."""
    from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4
    from nemotron3.quant.nvfp4_linear import NVFP4Recipe

    recipe = NVFP4Recipe(seed=seed, **{NVFP4_SWITCHES[name]: False for name in off})
    return convert_to_nvfp4(model, PrecisionPolicy(recipe=recipe)) or model


def _corpus(args: argparse.Namespace, console: Console, tokenizer: Tokenizer | None, vocab_cap: int):
    """Texts for training and evaluation, and the tokenizer (trained here unless resuming)."""
    use_tasks = args.tasks if args.tasks is not None else not args.data
    user = D.read_texts(args.data) if args.data else []
    task_sample = D.task_texts(4000, args.seed, "train", args.difficulty) if use_tasks else []
    if tokenizer is None:
        tokenizer = Tokenizer.train(user + task_sample, vocab_cap)
    task_train, task_heldout = [], []
    if use_tasks:
        per_doc = sum(map(len, tokenizer.encode_batch(task_sample))) / len(task_sample) + 2
        needed = args.steps * args.batch_size * args.seq_len * (0.5 if user else 1.0)
        task_train = D.task_texts(math.ceil(1.05 * needed / per_doc), args.seed, "train", args.difficulty)
        task_heldout = D.task_texts(D.HELDOUT_TASK_PROBLEMS, args.seed, "heldout", args.difficulty)
    console.print(f"[bold]data[/] {len(user):,} user documents, {len(task_train):,} task documents; "
                  f"tokenizer {tokenizer.vocab_size} tokens")
    return tokenizer, user, task_train, task_heldout


def pretrain(args: argparse.Namespace, console: Console | None = None) -> dict:
    """Everything `nemotron3 pretrain` does; returns the summary it also writes to OUT/summary.json."""
    console = console or Console()
    t_start = time.perf_counter()
    out: Path = args.out
    resume, ckpt = None, None
    if args.resume:
        ckpt = checkpoint.latest(out)
        if ckpt is None:
            raise SystemExit(f"error: --resume: no complete checkpoint (step-NNNNNN/ with {checkpoint.STATE_FILE}) in {out}")
        resume = checkpoint.load_state(ckpt)
        for k, v in resume["run"].items():
            setattr(args, k, v)
        console.print(f"[bold]resuming[/] {ckpt} (step {resume['step']}) with the run's saved arguments")
        checkpoint.clean_temporaries(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(args.seed)
    config = load_config(args.config)
    tokenizer, user, task_train, task_heldout = _corpus(args, console, Tokenizer.load(ckpt) if ckpt else None,
                                                        args.vocab_size or config.vocab_size)
    train_parts, eval_parts = [], []
    if user:
        a, b = D.split_tail(D.build(tokenizer, user, args.seq_len, args.seed), 0.02)
        train_parts, eval_parts = [a], [b]
    if task_train:
        train_parts.append(D.build(tokenizer, task_train, args.seq_len, args.seed))
        eval_parts.append(D.build(tokenizer, task_heldout, args.seq_len, args.seed))
    data = D.PackedData(torch.cat([p.rows for p in train_parts]), torch.cat([p.mask for p in train_parts]), args.seed)
    heldout = D.PackedData(torch.cat([p.rows for p in eval_parts]), torch.cat([p.mask for p in eval_parts]), args.seed)
    if ckpt:
        model = load_pretrained(ckpt, dtype=torch.float32)
    else:
        vocab = -(-tokenizer.vocab_size // 64) * 64  # the tokenizer's vocabulary, rounded up for the matmuls
        config = dataclasses.replace(config, vocab_size=vocab, bos_token_id=tokenizer.bos_id,
                                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        model = HybridLM(config)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"error: the model's vocab_size {model.config.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    if args.nvfp4_off and not args.nvfp4:
        raise SystemExit("error: --nvfp4-off ablates the NVFP4 recipe; add --nvfp4")
    tail = getattr(args, "nvfp4_high_precision_tail", 0.0)
    if not 0.0 <= tail < 1.0:
        raise SystemExit(f"error: --nvfp4-high-precision-tail {tail} is not a fraction in [0, 1)")
    if tail and not args.nvfp4:
        raise SystemExit("error: --nvfp4-high-precision-tail switches the NVFP4 recipe off at the end; add --nvfp4")
    if args.nvfp4:
        model = _convert_nvfp4(model, args.nvfp4_off, args.seed)
    if args.compile:
        model.compile_mixers()
    baseline = unigram_baseline(data, heldout, tokenizer.vocab_size)
    console.print(f"[bold]model[/] {args.config}: {model.config.pattern}, {model.num_parameters():,} parameters, "
                  f"vocab {model.config.vocab_size}; {len(data):,} training rows of {args.seq_len} tokens; "
                  f"unigram baseline {baseline:.3f} nats")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                      lr=args.lr, eval_every=args.eval_every, save_every=args.save_every, mtp_depths=args.mtp_depths,
                      bias_update_rate=args.bias_update_rate, seq_aux_coeff=args.seq_aux_coeff,
                      high_precision_from=round(args.steps * (1 - tail)) if tail else 0)
    run_info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in RUN_ARGS}
    result = train(model, tokenizer, data, cfg, out, heldout, resume, run_info, console)
    summary: dict = {}
    if rank == 0:
        final = checkpoint.save(out / "final", model, tokenizer)
        accuracy = task_accuracy(model, tokenizer, args.eval_problems, args.difficulty, args.seed) if task_train and args.eval_problems > 0 else {}
        tail = result.load_ratios[-max(1, len(result.load_ratios) // 10):]
        summary = {
            "out": str(out), "final": str(final), "metrics": str(out / "metrics.jsonl"),
            "parameters": model.num_parameters(), "steps": result.steps, "seconds": round(time.perf_counter() - t_start, 1),
            "train_seconds": round(result.seconds, 1), "last_train_loss": result.last_loss,
            "eval_losses": result.eval_losses, "unigram_baseline": baseline,
            "load_max_min_first": result.load_ratios[0] if result.load_ratios else None,
            "load_max_min_last10pct": sum(tail) / len(tail) if result.load_ratios else None,
            "skipped_steps": result.skipped,
            "accuracy": {f: r["accuracy"] for f, r in accuracy.items()},
            "examples": {f: r["example"] for f, r in accuracy.items()},
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return summary


def print_summary(summary: dict, console: Console) -> None:
    if not summary:
        return
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
    if summary["skipped_steps"]:
        console.print(f"[red]skipped (non-finite) steps: {summary['skipped_steps']}[/]")
    console.print(f"checkpoint: {summary['final']}\nmetrics:    {summary['metrics']}\nsummary:    {summary['out']}/summary.json")


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        summary = pretrain(args, console)
    except D.DataError as e:
        raise SystemExit(f"error: {e}") from None
    print_summary(summary, console)
    return 0
