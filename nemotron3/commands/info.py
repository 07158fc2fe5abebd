"""Describe a model: its layout, sizes, parameter counts (computed on the meta device) and cache cost.

    nemotron3 info super-120b-a12b
    nemotron3 info path/to/checkpoint_or_config.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nemotron3.config import ModelConfig
from nemotron3.model import count_parameters
from nemotron3.presets import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="*", default=sorted(PRESETS), help="preset names, config.json files or checkpoint folders")


def load_config(spec: str) -> ModelConfig:
    if spec in PRESETS:
        return ModelConfig.preset(spec)
    if Path(spec).exists():
        return ModelConfig.from_hf(spec)
    raise SystemExit(f"error: {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a path")


def run(args: argparse.Namespace) -> int:
    table = Table(title="nemotron3 models")
    for col in ("model", "layers (M/*/E/-)", "hidden", "experts (top-k, latent)", "total params", "active / token"):
        table.add_column(col, justify="right")
    for spec in args.model:
        c = load_config(spec)
        n = count_parameters(c)
        kinds = "/".join(str(c.pattern.count(k)) for k in "M*E-")
        experts = f"{c.n_routed_experts} (top-{c.num_experts_per_tok}, {c.moe_latent_size or '-'})" if "E" in c.pattern else "-"
        table.add_row(spec, f"{len(c.pattern)} ({kinds})", str(c.hidden_size), experts, f"{n['total']:,}", f"{n['active']:,}")
    Console(width=max(Console().width, 120)).print(table)
    return 0
