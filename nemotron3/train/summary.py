"""The end of a training stage's command: run it, then print its summary.json on rank 0 (pretrain, sft)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console


def print_footer(summary: dict[str, Any], console: Console) -> None:
    """Skipped steps, if any, and where the checkpoint, metrics and summary are."""
    if summary["skipped_steps"]:
        console.print(f"[red]skipped (non-finite) steps: {summary['skipped_steps']}[/]")
    console.print(f"checkpoint: {summary['final']}\nmetrics:    {summary['metrics']}\n"
                  f"summary:    {summary['out']}/summary.json")


def run_stage(run: Callable[[Any, Console], Path], cfg: Any,
              print_summary: Callable[[dict, Console], None]) -> int:
    """`run(cfg, console)` -> the final checkpoint folder; then print its summary.json (rank 0 only)."""
    console = Console()
    final = run(cfg, console)
    summary_file = final.parent / "summary.json"
    if summary_file.is_file() and int(os.environ.get("RANK", "0")) == 0:
        print_summary(json.loads(summary_file.read_text()), console)
    return 0
