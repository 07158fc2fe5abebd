"""The `nemotron3 eval` stage: a checkpoint scored on a benchmark file (or the built-in tasks), per reasoning mode.

    nemotron3 eval --model DIR --data bench.jsonl --format numeric --modes on,off,budget:512 --out DIR2
    nemotron3 eval --model DIR --data tasks:add,mul --count 50 --n 4 --temperature 0.6

Each item is asked as a chat (`<s>` + chat.render), in each mode, `--n` times; the answers are extracted per
format (eval/extract.py), graded (code: its tests run in a subprocess, eval/code.py), and summed up per mode:
accuracy ± standard error, pass@k for k = 1, 2, 4, ... n, tokens per answer and per correct answer
(eval/metrics.py). `--out` gets results.json and items.jsonl (one line per item, mode and sample), written whole
or not at all. docs/evaluation.md describes the data format and every number.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nemotron3 import checkpoint
from nemotron3.engine.folder import open_folder
from nemotron3.eval.data import is_builtin, load_items, task_items
from nemotron3.eval.extract import FORMATS
from nemotron3.eval.runner import evaluate_items, parse_modes
from nemotron3.folders import run_marks, within, write_folder
from nemotron3.options import CPU_COUNT, ConfigError, StageConfig, device_of, device_option, fail, option

OUR_FILES = {"results.json", "items.jsonl"}


@dataclass
class EvalConfig(StageConfig):
    """One evaluation: the checkpoint, the data and its answer format, the modes and the sampling."""

    stage = "eval"

    model: Path = option(help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    data: str = option(help="a .jsonl file of items ({\"prompt\" or \"messages\", \"answer\", \"choices\"}), or the "
                       "built-in task families: tasks or tasks:add,mul,...", metavar="FILE|tasks[:NAMES]")
    format: str | None = option(None, "answer format of the file's items (a line's own \"format\" overrides it)",
                                choices=FORMATS[:4])
    modes: str = option("on,off", "reasoning modes, comma-separated: on, off, budget:N (thinking capped at N "
                        "tokens)", metavar="MODES")
    n: int = option(1, "samples per item and mode (pass@k for k up to n)", min=1)
    temperature: float | None = option(None, "sampling temperature (default: 0, greedy, for --n 1; 0.6 for --n > 1)",
                                       min=0.0)
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)", min=0.0, max=1.0)
    seed: int = option(0, "seed of the sampling streams and of the built-in tasks' problems", min=0)
    max_new_tokens: int = option(512, "tokens generated per answer at most (reasoning included)", min=1)
    batch_size: int = option(32, "rows per engine batch", min=1)
    limit: int | None = option(None, "evaluate only the first N items of the file", min=1, metavar="N")
    count: int = option(20, "built-in tasks: held-out problems per family", min=1)
    difficulty: int = option(1, "built-in tasks: difficulty of the problems", min=1)
    tolerance: float = option(1e-6, "numeric format: relative (and absolute) tolerance of a match", min=0.0)
    code_timeout: float = option(10.0, "code format: seconds each program's tests may run", min=0.1)
    speculative: int = option(0, "MTP speculative decoding with K drafted tokens per verify forward (greedy output "
                              "unchanged; pays at small batches)", min=0, metavar="K")
    dtype: str = option("float32", "weights' dtype in memory", choices=("float32", "bfloat16"))
    device: str = device_option()
    threads: int | None = option(None, "torch intra-op threads", min=1, max=CPU_COUNT)
    out: Path | None = option(None, "folder for results.json and items.jsonl (replaced whole)")

    def validate(self) -> None:
        super().validate()
        try:
            parse_modes(self.modes)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.temperature == 0 and self.n > 1:
            fail(self, "temperature", f"is 0 (greedy) with --n {self.n}: every sample would be the same; give a "
                 "temperature above 0")
        if not is_builtin(self.data) and not Path(self.data).is_file():
            fail(self, "data", "is neither a file nor tasks / tasks:NAME,...")


def _check_out(cfg: EvalConfig) -> None:
    out = Path(cfg.out)  # type: ignore[arg-type]
    if within(cfg.model, out) is not None:
        fail(cfg, "out", "holds the --model checkpoint; give another folder")
    if out.exists() and not out.is_dir():
        fail(cfg, "out", "is a file, not a folder")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in OUR_FILES)
        if other or run_marks(out):
            fail(cfg, "out", f"holds other files ({', '.join(other[:3])}); give an empty folder or a new one")


def evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation of `cfg`: {"modes": {mode: summary}, "records": [...]}, written to cfg.out when given."""
    device = device_of(cfg)
    folder = Path(cfg.model)
    if not checkpoint.is_checkpoint(folder):
        fail(cfg, "model", "is not a checkpoint folder (no config.json)")
    if cfg.out is not None:
        _check_out(cfg)
    modes = parse_modes(cfg.modes)
    if is_builtin(cfg.data):
        items = task_items(cfg.data, cfg.count, cfg.seed, cfg.difficulty)
    else:  # without --format every line names its own (load_items says which line does not)
        items = load_items(cfg.data, cfg.format, cfg.limit)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    served = open_folder(folder, cfg.dtype, device=device)
    if served.tokenizer is None:
        fail(cfg, "model", "has no tokenizer.json; evaluation needs the checkpoint's tokenizer")
    if any(m.budget is not None for m in modes) and not served.has_think:
        fail(cfg, "modes", "budget:N needs a tokenizer with <think> and </think> tokens")
    temperature = cfg.temperature if cfg.temperature is not None else (0.6 if cfg.n > 1 else 0.0)
    report = evaluate_items(served.engine, served.tokenizer, items, modes, served.chat_stops, n=cfg.n,
                            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, temperature=temperature,
                            top_p=cfg.top_p, seed=cfg.seed, speculative=cfg.speculative, tolerance=cfg.tolerance,
                            code_timeout=cfg.code_timeout)
    if cfg.out is not None:
        write_folder(cfg.out, lambda tmp: _write(tmp, cfg, report))
    return report


def results_json(cfg: EvalConfig, report: dict) -> dict:
    """results.json: accuracy and stderr per mode first (the public API), then the rest of each mode's summary."""
    modes = report["modes"]
    return {"accuracy": {m: s["accuracy"] for m, s in modes.items()},
            "stderr": {m: s["stderr"] for m, s in modes.items()},
            "pass_at_k": {m: s["pass_at_k"] for m, s in modes.items()},
            "tokens_per_answer": {m: s["tokens_per_answer"] for m, s in modes.items()},
            "tokens_per_correct": {m: s["tokens_per_correct"] for m, s in modes.items()},
            "items": next(iter(modes.values()))["items"], "samples": cfg.n,
            "config": {"model": str(cfg.model), "data": cfg.data, "format": cfg.format, "modes": list(modes),
                       "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}}


def _write(tmp: Path, cfg: EvalConfig, report: dict) -> None:
    (tmp / "results.json").write_text(json.dumps(results_json(cfg, report), indent=2) + "\n")
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
        for rec in report["records"]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main(cfg: EvalConfig) -> int:
    report = evaluate(cfg)
    for mode, s in report["modes"].items():
        err = f" ± {s['stderr']:.3f}" if s["stderr"] is not None else ""
        per_correct = f"{s['tokens_per_correct']:.1f}" if s["tokens_per_correct"] is not None else "-"
        passes = "  ".join(f"pass@{k} {v:.3f}" for k, v in s["pass_at_k"].items()) if cfg.n > 1 else ""
        print(f"{mode:>12}  accuracy {s['accuracy']:.3f}{err}  ({s['items']} items)  tokens/answer "
              f"{s['tokens_per_answer']:.1f}  tokens/correct {per_correct}  {passes}".rstrip())
    if cfg.out is not None:
        print(f"wrote {Path(cfg.out) / 'results.json'} and items.jsonl", file=sys.stderr)
    return 0
