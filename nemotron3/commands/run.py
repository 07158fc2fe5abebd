"""The main job of `./run.sh`.

Today it exercises everything that exists end to end: build the `tiny` model, save it in the Hugging Face
`nemotron_h` format, load it back strictly, check the reloaded logits equal the originals bit for bit, and
print a forward-pass summary and the parameter counts of every preset. As the training, engine and
post-training stages land, this command grows into the full recipe.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from nemotron3.commands import info
from nemotron3.config import ModelConfig
from nemotron3.hf import load_pretrained, save_pretrained
from nemotron3.model import HybridLM


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="where the checkpoint is written")
    p.add_argument("--config", default="tiny", help="preset to build")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    console = Console()
    torch.manual_seed(args.seed)
    config = ModelConfig.preset(args.config)
    model = HybridLM(config).eval()
    console.print(f"[bold]built[/] {args.config}: pattern {config.pattern}, {model.num_parameters():,} parameters "
                  f"({model.num_parameters(active=True):,} active per token)")
    ckpt = args.out / "init"
    save_pretrained(model, ckpt)
    again = load_pretrained(ckpt)
    ids = torch.randint(0, config.vocab_size, (2, 96))
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids)
        dt = time.perf_counter() - t0
        same = torch.equal(logits, again(ids))
    console.print(f"[bold]saved[/] {ckpt} and reloaded it: logits identical = {same}")
    console.print(f"[bold]forward[/] 2x96 tokens -> logits {tuple(logits.shape)} in {dt * 1e3:.1f} ms; "
                  f"mean entropy {torch.distributions.Categorical(logits=logits).entropy().mean():.3f} nats "
                  f"(uniform: {torch.log(torch.tensor(float(config.vocab_size))):.3f})")
    info.run(argparse.Namespace(model=["tiny", "t9", "nano-30b-a3b", "super-120b-a12b"]))
    return 0 if same else 1
