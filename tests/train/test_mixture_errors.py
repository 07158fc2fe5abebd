"""Bad mixture flags of `nemotron3 pretrain` (issue 32 item 4): each fails with one line naming the flag and the
value at fault, before anything is written; the output folder is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemotron3.cli import main


def _tree(folder: Path) -> dict[str, bytes] | None:
    """Every file under `folder` with its bytes (None: no folder)."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(capsys, out: Path, *argv: str) -> str:
    """`nemotron3 pretrain ARGV --out OUT` fails in one line (returned), leaving OUT as it was."""
    before = _tree(out)
    try:
        code = main(["pretrain", "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-problems", "0",
                     *argv, "--out", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert _tree(out) == before
    return err.strip()


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i} " * 20}) + "\n" for i in range(50)))
    return path


@pytest.fixture(params=["missing", "holding"])
def out(request, tmp_path) -> Path:
    """An output folder that does not exist yet, or one that holds a file of the user's."""
    folder = tmp_path / "out"
    if request.param == "holding":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    return folder


def test_bad_weights_name_the_flag_and_the_item(capsys, corpus, out):
    err = _fails(capsys, out, "--data", f"{corpus}:-0.5", "tasks:0.5")
    assert f"data (--data) = '{corpus}:-0.5'" in err and "negative" in err
    err = _fails(capsys, out, "--data", f"{corpus}:0.5", "tasks:lots")
    assert "data (--data) = 'tasks:lots'" in err and "not a number" in err
    err = _fails(capsys, out, "--data", f"{corpus}:nan", "tasks:1")
    assert f"'{corpus}:nan'" in err and "not a finite number" in err
    err = _fails(capsys, out, "--data", f"{corpus}:0", "tasks:0")
    assert f"data (--data) = ['{corpus}:0', 'tasks:0']" in err and "sum to 0" in err
    err = _fails(capsys, out, "--data", f"{corpus}:0.5", "tasks")
    assert "data (--data) = 'tasks'" in err and "no weight" in err
    err = _fails(capsys, out, "--data", f"{corpus}:0.5", f"{corpus}:0.5")
    assert "a second time" in err
    err = _fails(capsys, out, "--phase2-at", "0.5", "--phase2-data", "tasks:-1")
    assert "phase2_data (--phase2-data) = 'tasks:-1'" in err and "negative" in err
    err = _fails(capsys, out, "--data", f"{corpus}:0.5", "tasks:0.5", "--tasks")
    assert "tasks (--tasks) = True" in err and "tasks:WEIGHT" in err


def test_bad_phase_flags_name_the_flag_and_the_value(capsys, corpus, out):
    for at in ("1.5", "0", "-0.2", "1"):
        err = _fails(capsys, out, "--phase2-at", at, "--phase2-data", "tasks")
        assert f"phase2_at (--phase2-at) = {float(at)!r}" in err and "between 0 and 1" in err
    err = _fails(capsys, out, "--phase2-at", "0.8")
    assert "phase2_at (--phase2-at) = 0.8" in err and "--phase2-data" in err
    err = _fails(capsys, out, "--phase2-data", "tasks")
    assert "phase2_data (--phase2-data) = ['tasks']" in err and "--phase2-at" in err
    err = _fails(capsys, out, "--phase2-at", "0.01", "--phase2-data", "tasks")  # step 0 of 4: no phase 1
    assert "phase2_at (--phase2-at) = 0.01" in err and "without a step" in err
    err = _fails(capsys, out, "--data", str(corpus), "--tasks", "--phase2-at", "0.5", "--phase2-data", "tasks")
    assert "data (--data) = " in err and "give every source of a phase a weight" in err


def test_a_missing_source_of_either_phase_is_named_before_anything_is_written(capsys, corpus, out, tmp_path):
    gone = tmp_path / "gone.jsonl"
    err = _fails(capsys, out, "--data", f"{corpus}:0.5", "tasks:0.5", "--phase2-at", "0.5",
                 "--phase2-data", f"{gone}:1", "tasks:1")
    assert err == f"error: --phase2-data {gone}: no such file or folder"
    err = _fails(capsys, out, "--data", f"{gone}:0.5", "tasks:0.5")
    assert err == f"error: --data {gone}: no such file or folder"
