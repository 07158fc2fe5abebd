"""The info stage: a model's layout, sizes, parameter counts (computed on the meta device) and cache cost.

    from nemotron3.stages.info import InfoConfig, info
    rows = info(InfoConfig(models=["super-120b-a12b"]))     # one dict per model

    nemotron3 info                                  every preset
    nemotron3 info super-120b-a12b path/to/checkpoint_or_config.json

For a checkpoint folder it also prints, per layer type, the bytes on disk and the bytes resident in memory once
`load_pretrained` has loaded it (weight-only quantized weights stay packed: quant/packed.py; read from the
safetensors headers, so it works for a folder of any size), and for a quantized checkpoint the scheme and bits per
weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nemotron3.checkpoint import describe, is_checkpoint, layer_bytes
from nemotron3.config import ModelConfig
from nemotron3.engine import cache_size
from nemotron3.model import count_parameters
from nemotron3.options import StageConfig, option
from nemotron3.presets import PRESETS

CACHE_TOKENS = 8192  # the context length at which `info` reports cache bytes per token


@dataclass
class InfoConfig(StageConfig):
    """The models to describe."""

    models: list[str] = option([], "preset names, config.json files or checkpoint folders (none: every preset)",
                               positional=True, metavar="MODEL")


def info(cfg: InfoConfig) -> list[dict]:
    """One row per model: layers by kind, hidden size, experts, total and active parameters, cache bytes."""
    rows = []
    for spec in cfg.models or sorted(PRESETS):
        c = ModelConfig.load(spec)
        n = count_parameters(c)
        rows.append({
            "model": spec, "layers": len(c.pattern), "kinds": {k: c.pattern.count(k) for k in "M*E-"},
            "hidden_size": c.hidden_size, "experts": c.n_routed_experts if "E" in c.pattern else 0,
            "top_k": c.num_experts_per_tok if "E" in c.pattern else 0, "latent": c.moe_latent_size,
            "mtp": c.num_nextn_predict_layers, "total": n["total"], "active": n["active"],
            "cache_bytes_per_token": cache_size(c, 1, CACHE_TOKENS).per_token,
        })
    return rows


def bytes_table(folder: Path) -> Table:
    """A checkpoint folder's scheme, and bytes on disk and resident once loaded, per layer type."""
    table = Table(title=f"{folder}: {describe(folder)}")
    for col in ("layer type", "precision", "parameters", "bytes on disk", "bits / parameter", "resident bytes"):
        table.add_column(col, justify="right")
    rows = layer_bytes(folder)
    for r in rows:
        table.add_row(r["type"], r["precision"], f"{r['params']:,}", f"{r['bytes']:,}",
                      f"{8 * r['bytes'] / max(r['params'], 1):.2f}", f"{r['resident']:,}")
    total_p, total_b = sum(r["params"] for r in rows), sum(r["bytes"] for r in rows)
    total_r = sum(r["resident"] for r in rows)
    table.add_row("total", "", f"{total_p:,}", f"{total_b:,}", f"{8 * total_b / max(total_p, 1):.2f}", f"{total_r:,}")
    return table


def main(cfg: InfoConfig) -> int:
    """`nemotron3 info`: the rows as a table."""
    table = Table(title="nemotron3 models")
    columns = ("model", "layers (M/*/E/-)", "hidden", "experts (top-k, latent)", "MTP", "total params",
               "active / token", f"cache B/token (fp32, {CACHE_TOKENS // 1024}k)")
    for col in columns:
        table.add_column(col, justify="right")
    for r in info(cfg):
        kinds = "/".join(str(r["kinds"][k]) for k in "M*E-")
        experts = f"{r['experts']} (top-{r['top_k']}, {r['latent'] or '-'})" if r["experts"] else "-"
        table.add_row(r["model"], f"{r['layers']} ({kinds})", str(r["hidden_size"]), experts, str(r["mtp"]),
                      f"{r['total']:,}", f"{r['active']:,}", f"{r['cache_bytes_per_token']:,.0f}")
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for spec in cfg.models:
        if Path(spec).is_dir() and is_checkpoint(spec):
            console.print(bytes_table(Path(spec)))
    return 0
