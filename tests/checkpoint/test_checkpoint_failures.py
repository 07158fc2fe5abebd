"""Checkpoint folders when things go wrong: a deletion that fails never fails a save, a prune or a clean-up (and
never hides the error that aborted a save); resume states with tensors load back; the resume errors' whole
messages; every generator stream listed once, under its public name.

References: a stand-in for `shutil.rmtree` that cannot delete one chosen folder (it raises unless
`ignore_errors`, as the real one does on an undeletable tree); tensors compared with `torch.equal` to the ones
saved; the messages written out by hand (the exception text of a damaged file is torch's own, from
`torch.load` called directly); hand-built modules whose owners are known by construction.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import StubTokenizer
from torch import nn

import nemotron3
from nemotron3.train import checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny"))


@pytest.fixture
def stuck(monkeypatch):
    """`stuck(predicate)`: from now on, folders whose name satisfies `predicate` cannot be deleted."""
    real = shutil.rmtree
    preds = []

    def rmtree(path, ignore_errors=False, **kw):
        if any(p(Path(path).name) for p in preds):
            if ignore_errors:
                return
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, ignore_errors=ignore_errors, **kw)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    return preds.append


def test_a_resave_succeeds_when_the_old_copy_cannot_be_deleted(tmp_path, model, stuck):
    out = tmp_path / "run"
    checkpoint.save(checkpoint.step_dir(out, 2), model, StubTokenizer(), {"step": 2})
    stuck(lambda name: name.startswith(".old-"))
    assert checkpoint.save(checkpoint.step_dir(out, 2), model, StubTokenizer(), {"step": 22}) == out / "step-000002"
    assert checkpoint.load_state(out / "step-000002")["step"] == 22
    left = [p.name for p in out.iterdir() if p.name.startswith(".old-")]
    assert len(left) == 1 and checkpoint.checkpoints(out) == [(2, out / "step-000002")]  # the leftover is hidden


def test_a_failed_save_raises_its_own_error_when_the_temporary_cannot_be_deleted(tmp_path, model, stuck):
    class Broken(StubTokenizer):
        def save(self, folder):
            raise OSError("disk full")

    stuck(lambda name: name.startswith(".tmp-"))
    with pytest.raises(OSError, match=r"^disk full$"):
        checkpoint.save(checkpoint.step_dir(tmp_path, 2), model, Broken(), {"step": 2})
    assert checkpoint.checkpoints(tmp_path) == []


def test_prune_and_clean_up_go_on_past_a_folder_that_cannot_be_deleted(tmp_path, model, stuck):
    for step in (1, 2, 3, 4):
        checkpoint.save(checkpoint.step_dir(tmp_path, step), model, StubTokenizer(), {"step": step})
    for name in (".tmp-step-000005-a", ".tmp-step-000005-b", ".old-step-000001-c"):
        (tmp_path / name).mkdir()
    stuck(lambda name: name in ("step-000001", ".tmp-step-000005-a"))
    checkpoint.prune(tmp_path, 1)  # step 1 stays (undeletable), steps 2 and 3 go
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [1, 4]
    checkpoint.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step-000005-a", "step-000001", "step-000004"]


def test_a_resume_state_with_tensors_loads_back_on_the_cpu(tmp_path, model):
    torch.manual_seed(1)
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.randn(5), "step": torch.tensor(3.0)}}},
             "rng": torch.get_rng_state()}
    checkpoint.save(checkpoint.step_dir(tmp_path, 3), model, StubTokenizer(), state)
    path, got = checkpoint.resume_point(tmp_path)
    assert path == tmp_path / "step-000003" and got["step"] == 3
    moments = got["optimizer"]["state"][0]
    assert torch.equal(moments["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert moments["exp_avg"].device.type == "cpu" and torch.equal(moments["step"], torch.tensor(3.0))
    assert torch.equal(got["rng"], state["rng"])


def test_the_resume_errors_whole_messages(tmp_path, model):
    with pytest.raises(ValueError) as e:
        checkpoint.resume_point(tmp_path)
    assert str(e.value) == (f"--resume: no complete checkpoint (step-NNNNNN/ with trainer_state.pt) in {tmp_path}; "
                            "save some with --save-every")
    checkpoint.save(tmp_path / "final", model, StubTokenizer())
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.load_state(tmp_path / "final")
    path = tmp_path / "final" / "trainer_state.pt"
    assert str(e.value) == f"{path}: not a training checkpoint (no trainer_state.pt); `final/` cannot be resumed"
    bad = checkpoint.step_dir(tmp_path, 3)
    checkpoint.save(bad, model, StubTokenizer(), {"step": 3})
    (bad / "trainer_state.pt").write_bytes(b"not a pickle")
    try:  # the reference: what torch itself raises on this file
        torch.load(bad / "trainer_state.pt", weights_only=False)
    except Exception as err:  # any error torch raises is the one to report
        cause = f"{type(err).__name__}: {err}"
    else:
        raise AssertionError("torch.load read a damaged file")
    with pytest.raises(ValueError) as e:
        checkpoint.resume_point(tmp_path)
    assert str(e.value) == (f"{bad / 'trainer_state.pt'}: cannot read the training state ({cause}); resume from an "
                            "older step-NNNNNN/ folder (delete step-000003/) or start a new run")
    assert not re.search(r"\(NoneType", str(e.value))


class _Owner(nn.Module):
    """A module with its own generator (like NVFP4Linear)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self._generators = {torch.device("cpu"): torch.Generator().manual_seed(seed)}


class _Helper:
    """A plain object a module holds, owning a generator itself (`direct`) or through `.layer` (like ExpertGemm)."""

    def __init__(self, seed: int, direct: bool) -> None:
        if direct:
            self._generators = {torch.device("cpu"): torch.Generator().manual_seed(seed)}
        else:
            self.layer = _Owner(seed)


def test_each_generator_stream_is_listed_once_under_its_public_name():
    root = nn.Module()
    root.block = nn.Module()
    root.block.owner = _Owner(1)
    root.block.gemm = _Helper(2, direct=False)  # a plain attribute: no submodule, no state_dict entry
    root.block.noise = _Helper(3, direct=True)
    root.block.scale = torch.ones(2)  # a plain tensor attribute: never an owner
    # aliases the streams are already listed under: a module and a helper kept a second time in the instance
    # dict (out of the module tree), and private references (`_x`: internals, never searched)
    root.block.__dict__["owner_again"] = root.block.owner
    root.block.__dict__["_gemm"] = root.block.gemm
    root.block.__dict__["_noise"] = root.block.noise
    root.block.__dict__["_owner"] = root.block.owner
    owners = checkpoint._generator_owners(root)
    assert owners == {"block.owner": root.block.owner, "block#gemm.layer": root.block.gemm.layer,
                      "block#noise": root.block.noise}
    state = checkpoint.rng_state(root)
    assert sorted(state["generators"]) == ["block#gemm.layer", "block#noise", "block.owner"]
