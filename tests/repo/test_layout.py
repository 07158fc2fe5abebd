"""The suite's layout: each test file in the folder of the package it tests, shared references in conftest.py.

A test file directly in tests/ (beside conftest.py and the shared server harness serving.py) has no package; a test
module that imports another test module couples two files that pytest may collect in any order (and under
`--import-mode=importlib` could not import at all): what two files share belongs in conftest.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
SHARED = {"conftest.py", "serving.py"}  # importable from every folder: pytest puts tests/ on sys.path for conftest
# the groups that are not a nemotron3 package of the same name, and what they test
GROUPS = {
    "checkpoint": "hf.py, folders.py and train/checkpoint.py: checkpoint folders",
    "cli": "cli.py, options.py and the stage commands' flags",
    "chat": "chat.py: the chat template",
    "distributed": "parallel.py and expert_parallel.py under torchrun",
    "gpu": "the engine, training and codecs on a CUDA device (marker gpu)",
    "repo": "the repository as a whole: lint, docs, layering, layout, device factories",
    "benchmarks": "benchmarks/claims: the variants and statistics of the claims scripts",
}


def test_every_test_file_is_in_a_package_folder():
    loose = sorted(p.name for p in TESTS.glob("*.py") if p.name not in SHARED)
    assert not loose, f"test files directly in tests/: {loose}; move each into the folder of the package it tests"
    packages = {p.name for p in (TESTS.parent / "nemotron3").iterdir() if (p / "__init__.py").is_file()}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    unknown = sorted(folders - packages - set(GROUPS))
    assert not unknown, f"test folders that are no nemotron3 package and not in GROUPS: {unknown}"


def test_no_test_module_imports_another():
    names = {p.stem for p in TESTS.rglob("test_*.py")}
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(TESTS)}:{node.lineno}: {m}" for m in mods if m.split(".")[0] in names]
    assert not offenders, "test modules importing test modules (share through conftest.py):\n" + "\n".join(offenders)
