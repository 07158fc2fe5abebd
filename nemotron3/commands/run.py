"""The main job of `./run.sh`: the most complete real thing the project does today, on the embedded default.

1. Pretrain the `tiny` hybrid (Mamba-2 + attention + LatentMoE, MTP) from scratch on the synthetic
   reasoning tasks: tokenizer, packing, AdamW + WSD, MTP loss, expert-bias balancing, held-out loss,
   atomic checkpoints (`nemotron3 pretrain` with its defaults, a few minutes on 2 CPU cores).
2. Reload the final checkpoint from disk exactly as a user would (`load_pretrained` + `tokenizer.json`) and
   check it reproduces the trained model's held-out loss.
3. Summarise: held-out loss curve against the unigram baseline, greedy exact match per task family on
   held-out problems, expert load balance, and where everything went.

Later stages (SFT, RL, export, serving) extend this command as they land.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from nemotron3.hf import load_pretrained
from nemotron3.train import cli as pretrain_cli
from nemotron3.train import data as D
from nemotron3.train.evaluate import eval_loss
from nemotron3.train.tokenizer import Tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    pretrain_cli.add_arguments(p)
    p.set_defaults(out=Path("runs/latest"))


def run(args: argparse.Namespace) -> int:
    console = Console()
    console.rule("[bold]nemotron3: pretraining the tiny hybrid on the embedded reasoning tasks")
    summary = pretrain_cli.pretrain(args, console)
    if not summary:  # not rank 0 under torchrun
        return 0
    pretrain_cli.print_summary(summary, console)
    if args.data or not summary["eval_losses"]:  # user text in the held-out set, or nothing was trained
        return 0
    final = Path(summary["final"])
    model, tok = load_pretrained(final), Tokenizer.load(final)
    heldout = D.build(tok, D.task_texts(120, args.seed, "heldout", args.difficulty), args.seq_len, args.seed)
    reloaded = eval_loss(model, heldout)
    trained = summary["eval_losses"][-1][1]
    console.print(f"reloaded {final} from disk: held-out loss {reloaded:.4f} (at the end of training: {trained:.4f})")
    return 0 if abs(reloaded - trained) < 1e-5 else 1
