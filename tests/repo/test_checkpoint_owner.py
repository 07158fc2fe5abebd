"""One owner for a checkpoint folder (issue 30): no module outside nemotron3/checkpoint/ reads a folder's
safetensors files or its config.json itself; every command opens folders through `nemotron3.checkpoint`.

Read from the source with `ast`. What counts as touching a folder's files directly:
- importing anything from `safetensors` (the reader `safe_open`, `load_file`, ...);
- a path built as `X / "config.json"` (or the weights, their index, ModelOpt's `hf_quant_config.json`);
- calling `ModelConfig.from_hf(...)` on a folder (checkpoint.read_config is the one reader).
Testing whether a folder is a checkpoint, reading its config, weights and tokenizer all have a function in
nemotron3/checkpoint/ (is_checkpoint, read_config, load, open, load_tokenizer).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemotron3"
FOLDER_FILES = {"config.json", "model.safetensors", "model.safetensors.index.json", "hf_quant_config.json"}

# (module, what) -> why it may stay. Kept small on purpose: each entry is a decision.
ALLOWED = {
    # the config's own JSON spelling: from_hf / save read and write config.json, and `--config FILE` names a file;
    # checkpoint.read_config calls it for folders
    ("config/model_config.py", 'path / "config.json"'): "ModelConfig's own file",
    ("config/model_config.py", 'Path(folder) / "config.json"'): "ModelConfig.save",
    ("config/model_config.py", "from_hf"): "ModelConfig's own reader",
    # `quantize` writes a new folder (never reads one: its --model is opened by checkpoint.open / load): the encoded
    # tensors and the config.json carrying the quantization_config, inside folders.write_folder; the failure tests
    # patch this module's save_file to fail mid-write
    ("stages/quantize.py", "safetensors.torch.save_file"): "writes its own output folder",
    ("stages/quantize.py", 'tmp / "config.json"'): "writes its own output folder",
    ("stages/quantize.py", 'tmp / "model.safetensors"'): "writes its own output folder",
}


def touches(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every direct use of a folder's files in a module (see the module docstring)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "safetensors":
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "safetensors"]
        elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
              and node.right.value in FOLDER_FILES):
            found.append((node.lineno, f"{ast.unparse(node.left)} / {node.right.value!r}".replace("'", '"')))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_hf":
            found.append((node.lineno, "from_hf"))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "checkpoint")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_checkpoint_package_reads_a_folder(path):
    rel = str(path.relative_to(PACKAGE))
    bad = [f"line {line}: {what}" for line, what in touches(path) if (rel, what) not in ALLOWED]
    assert not bad, (f"nemotron3/{rel} touches a checkpoint folder's files itself; go through nemotron3.checkpoint "
                     "(is_checkpoint, read_config, load, open, load_tokenizer):\n  " + "\n  ".join(bad))


def test_every_allowance_is_still_needed():
    used = {(str(p.relative_to(PACKAGE)), what) for p in modules() for _, what in touches(p)}
    assert not set(ALLOWED) - used, f"drop these from ALLOWED: {sorted(set(ALLOWED) - used)}"


def test_the_checker_sees_each_kind_of_direct_read(tmp_path):
    fake = tmp_path / "planted.py"
    fake.write_text("import json\nfrom safetensors import safe_open\ndef f(folder):\n"
                    "    raw = json.loads((folder / 'config.json').read_text())\n"
                    "    import safetensors.torch\n    return ModelConfig.from_hf(folder), folder / 'notes.txt'\n")
    assert sorted(touches(fake)) == [(2, "safetensors.safe_open"), (4, 'folder / "config.json"'),
                                     (5, "safetensors.torch"), (6, "from_hf")]
