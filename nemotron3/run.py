"""The main job of `./run.sh`: the most complete real thing the project does today, on the embedded default.

    from nemotron3.run import RunConfig, run
    run(RunConfig())                       # == `nemotron3 run`

1. Pretrain the `tiny` hybrid (Mamba-2 + attention + LatentMoE, MTP) from scratch on the synthetic reasoning
   tasks: tokenizer, packing, AdamW + WSD, MTP loss, expert-bias balancing, held-out loss, atomic checkpoints
   (`nemotron3 pretrain` with its defaults, a few minutes on 2 CPU cores).
2. Reload the final checkpoint from disk exactly as a user would (`load_pretrained` + `tokenizer.json`) and
   check it reproduces the trained model's held-out loss.
3. Summarise: held-out loss curve against the unigram baseline, greedy exact match per task family on
   held-out problems, expert load balance, and where everything went.

Later stages (SFT, RL, export, serving) extend this command as they land. Every pretraining flag applies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from nemotron3.hf import load_pretrained
from nemotron3.options import from_dict, option
from nemotron3.pretrain import PretrainConfig, pretrain, print_summary
from nemotron3.train import data as train_data
from nemotron3.train.evaluate import eval_loss
from nemotron3.train.tokenizer import Tokenizer


@dataclass
class RunConfig(PretrainConfig):
    """The main job: where it writes (every pretraining field applies too)."""

    out: Path = option(Path("runs/latest"), "output folder of the whole run")


def run(cfg: RunConfig, console: Console | None = None) -> dict:
    """Pretrain, reload and check; returns the pretraining summary plus `reloaded_eval_loss`."""
    console = console or Console()
    console.rule("[bold]nemotron3: pretraining the tiny hybrid on the embedded reasoning tasks")
    final = pretrain(cfg, console)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    summary = json.loads((final.parent / "summary.json").read_text())
    print_summary(summary, console)
    if cfg.data or not summary["eval_losses"]:  # user text in the held-out set, or nothing was trained
        return summary
    saved = from_dict(PretrainConfig, summary["config"])  # the run's own configuration (resume restores it)
    model, tok = load_pretrained(final), Tokenizer.load(final)
    texts = train_data.task_texts(saved.heldout_task_problems, saved.seed, "heldout", saved.difficulty)
    heldout = train_data.build(tok, texts, saved.seq_len, saved.seed)
    summary["reloaded_eval_loss"] = eval_loss(model, heldout)
    trained = summary["eval_losses"][-1][1]
    console.print(f"reloaded {final} from disk: held-out loss {summary['reloaded_eval_loss']:.4f} "
                  f"(at the end of training: {trained:.4f})")
    return summary


def main(cfg: RunConfig) -> int:
    """`nemotron3 run`: non-zero if the reloaded checkpoint does not reproduce the trained model."""
    summary = run(cfg)
    if "reloaded_eval_loss" not in summary:
        return 0
    return 0 if abs(summary["reloaded_eval_loss"] - summary["eval_losses"][-1][1]) < 1e-5 else 1
