"""The package's layering (docs/architecture.md §10): every module imports only from layers below its own.

Read from the source with `ast`, so imports inside functions count too. A new top-level module or package
must be given a layer here, which is the point: where it sits is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemotron3"

# top-level component of nemotron3 -> layer; a module may import its own component and any lower layer
LAYERS = {
    "presets": 0, "tasks": 0, "options": 0, "chat": 0,  # data, stage-config helpers, the chat format: no imports
    "chat_template": 0,  # a checkpoint's Jinja chat template in transformers' environment (jinja2 only)
    "folders": 0,  # output folders: atomic swap, recovery, modes
    "config": 1, "tokenizer": 1,  # the tokenizer owns the special ids and the chat template's rendering
    "envs": 1,  # RL environments, tools, rubrics: on tasks and the chat format; never the engine, training or rl
    "model": 2,
    # hf: the tensor names on disk (the per-expert rule) and CheckpointError, no folders: quant's layouts and packed
    # layers spell expert names through it, so it sits below quant
    "hf": 3, "distributed": 3,  # FSDP2 + expert parallelism: model-level, below the engine and training
    "quant": 4,  # codecs, training layers, the quantized layouts' encoders and decoders (no files)
    # checkpoint: the one owner of a folder (files, load, save, open); above quant because it calls each quantized
    # layout's decoder from its table of schemes, below engine (engine/folder.py opens folders through it) and train
    "checkpoint": 5,
    "engine": 6,
    "train": 7, "eval": 7,  # side by side: evaluation on benchmark files and the lm-eval backend (engine, tasks)
    "rl": 8,
    "stages": 9, "export": 9,  # the commands' entry points
    "serve": 9,  # the OpenAI-compatible server (a stage too)
    "run": 10,  # the pipeline: chains the stages
    "cli": 11,
}


def component(module: str) -> str | None:
    """`nemotron3.train.loop` -> `train`; None for modules outside the package or the package root."""
    parts = module.split(".")
    if parts[0] != "nemotron3" or len(parts) == 1:
        return None
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in a file; `from nemotron3 import x` names `nemotron3.x`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # the package uses absolute imports only, so that this check can read them
                out.append((node.lineno, "." * node.level + base))
            elif base == "nemotron3":
                out += [(node.lineno, f"nemotron3.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, base))
    return out


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_component_has_a_layer():
    found = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()}
    assert not found - set(LAYERS), f"give these a layer in LAYERS and docs/architecture.md §10: {found - set(LAYERS)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above_or_beside_it(path):
    mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    bad = []
    for line, name in imports_of(path):
        if name.startswith("."):
            bad.append(f"line {line}: relative import {name!r}; use an absolute nemotron3.… import")
            continue
        other = component(name)
        if other is None:
            if name == "nemotron3":
                bad.append(f"line {line}: imports the package root (the public API); import the module itself")
            continue
        if other == mine:
            continue
        if other not in LAYERS:
            bad.append(f"line {line}: {name} has no layer")
        elif LAYERS[other] >= LAYERS[mine]:
            bad.append(f"line {line}: {name} (layer {LAYERS[other]}) from {mine} (layer {LAYERS[mine]})")
    assert not bad, f"{path.relative_to(PACKAGE.parent)}:\n  " + "\n  ".join(bad)


def test_the_checker_sees_imports_inside_functions_and_from_the_package(tmp_path):
    fake = tmp_path / "planted.py"
    fake.write_text("import torch\ndef f():\n    from nemotron3 import engine\n    import nemotron3.train.loop\n"
                    "    from nemotron3.model.moe import MoE\n")
    names = [n for _, n in imports_of(fake)]
    assert names == ["torch", "nemotron3.engine", "nemotron3.train.loop", "nemotron3.model.moe"]
    assert [component(n) for n in names] == [None, "engine", "train", "model"]
