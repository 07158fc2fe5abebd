"""Checkpoint folders in-process: atomic save and re-save, which folders count as checkpoints, pruning, clean-up
of interrupted saves, and the errors of resuming from nothing or from a damaged state file."""

from __future__ import annotations

import pytest
import torch
from conftest import StubTokenizer

import nemotron3
from nemotron3.train import checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny"))


def test_save_resave_and_the_listing(tmp_path, model):
    out = tmp_path / "run"
    for step in (2, 4, 6):
        checkpoint.save(checkpoint.step_dir(out, step), model, StubTokenizer(), {"step": step})
    checkpoint.save(out / "final", model, StubTokenizer())  # no resume state: not a training checkpoint
    (out / "step-000008").mkdir()  # no trainer_state.pt: not complete
    (out / ".tmp-step-000010-x").mkdir()
    assert checkpoint.step_dir(out, 4).name == "step-000004"
    assert [s for s, _ in checkpoint.checkpoints(out)] == [2, 4, 6]
    assert checkpoint.latest(out) == out / "step-000006"
    path, state = checkpoint.resume_point(out)
    assert path == out / "step-000006" and state["step"] == 6
    checkpoint.save(checkpoint.step_dir(out, 6), model, StubTokenizer(), {"step": 66})  # re-save replaces in place
    assert checkpoint.load_state(out / "step-000006")["step"] == 66
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".old-")) == []
    assert {"config.json", "model.safetensors", "tokenizer.json", checkpoint.STATE_FILE} <= {
        p.name for p in (out / "step-000006").iterdir()}
    checkpoint.prune(out, 0)  # keep <= 0 keeps everything
    assert len(checkpoint.checkpoints(out)) == 3
    checkpoint.prune(out, 2)
    assert [s for s, _ in checkpoint.checkpoints(out)] == [4, 6] and (out / "final").is_dir()
    checkpoint.clean_temporaries(out)
    assert not (out / ".tmp-step-000010-x").exists() and (out / "step-000008").is_dir()
    assert checkpoint.checkpoints(tmp_path / "nowhere") == [] and checkpoint.latest(tmp_path / "nowhere") is None


def test_a_failing_save_leaves_nothing_behind(tmp_path, model, monkeypatch):
    out = tmp_path / "run"
    checkpoint.save(checkpoint.step_dir(out, 2), model, StubTokenizer(), {"step": 2})

    class Broken(StubTokenizer):
        def save(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(checkpoint.step_dir(out, 2), model, Broken(), {"step": 3})
    assert [p.name for p in out.iterdir()] == ["step-000002"]  # no temporary, the old one intact
    assert checkpoint.load_state(out / "step-000002")["step"] == 2


def test_resume_errors_name_the_folder(tmp_path, model):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.resume_point(tmp_path)
    checkpoint.save(tmp_path / "final", model, StubTokenizer())
    with pytest.raises(FileNotFoundError, match="cannot be resumed"):
        checkpoint.load_state(tmp_path / "final")
    bad = checkpoint.step_dir(tmp_path, 3)
    checkpoint.save(bad, model, StubTokenizer(), {"step": 3})
    (bad / checkpoint.STATE_FILE).write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read the training state.*delete step-000003/"):
        checkpoint.resume_point(tmp_path)


def test_temporaries_are_hidden_siblings_and_prune_keeps_the_newest(tmp_path, model, monkeypatch):
    out = tmp_path / "a" / "b"  # parents are created
    seen, removed = [], []

    class Recording(StubTokenizer):
        def save(self, folder):
            seen.append(folder)
            super().save(folder)

    real_rmtree = checkpoint.shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda p, **kw: (removed.append(p), real_rmtree(p, **kw)))
    checkpoint.save(checkpoint.step_dir(out, 2), model, Recording(), {"step": 2})
    checkpoint.save(checkpoint.step_dir(out, 2), model, Recording(), {"step": 2})  # re-save: the old one aside
    assert all(f.parent == out and f.name.startswith(".tmp-step-000002-") for f in seen)
    old = [p for p in removed if p.parent == out]  # (save_pretrained removes temporaries of its own inside)
    assert len(old) == 1 and old[0].name.startswith(".old-step-000002-")
    checkpoint.save(checkpoint.step_dir(out, 4), model, StubTokenizer(), {"step": 4})
    (out / ".old-step-000004-x").mkdir()
    checkpoint.clean_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == ["step-000002", "step-000004"]
    checkpoint.prune(out, 1)
    assert [s for s, _ in checkpoint.checkpoints(out)] == [4]


def test_a_state_without_generators_restores_the_global_streams(model):
    saved = checkpoint.rng_state(model)
    expected = torch.rand(2)
    checkpoint.set_rng_state({k: v for k, v in saved.items() if k != "generators"}, model)
    # exact by construction: the restored generator state replays the same bits
    assert torch.equal(torch.rand(2), expected)
