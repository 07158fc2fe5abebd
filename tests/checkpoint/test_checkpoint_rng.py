"""Resume state: every random stream a step draws from, the per-module stochastic-rounding generators included.

The reference for "restored" is the stream itself: after `set_rng_state`, each generator's next draws equal the
draws the saved one would have made. End to end (in-process, default suite): an NVFP4 run resumed at step 2
of 4, with stochastic rounding drawing at steps 3 and 4 (after the resume), must log the uninterrupted run's
losses exactly; the same resume with the generators left fresh must not (the draws are visible in the loss).
"""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

import nemotron3
from nemotron3.cli import main
from nemotron3.quant.convert import convert_to_nvfp4
from nemotron3.train import checkpoint


@pytest.fixture(autouse=True)
def _keep_denormals():
    """`main` flushes denormals for the whole process (a training setting); later tests need them back (off is
    a fresh process's default)."""
    yield
    torch.set_flush_denormal(False)


def _model() -> nemotron3.HybridLM:
    torch.manual_seed(0)
    return convert_to_nvfp4(nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")))


def _draws(owner) -> list[int]:
    """Four draws from each of the owner's generators, without disturbing them."""
    out = []
    for g in owner._generators.values():
        state = g.get_state()
        out += torch.randint(0, 2**31, (4,), generator=g).tolist()
        g.set_state(state)
    return out


def test_rng_state_restores_every_stream_and_each_generator_by_name():
    model = _model()
    owners = checkpoint._generator_owners(model)
    assert any("#gemm_quantizer" in name for name in owners) and any("#" not in name for name in owners)
    for o in owners.values():  # create and advance each generator a different amount
        gen = o.generator(torch.device("cpu")) if hasattr(o, "generator") else None
        if gen is None:
            o._generators[torch.device("cpu")] = torch.Generator().manual_seed(7)
            gen = o._generators[torch.device("cpu")]
        torch.rand(len(owners) % 5 + 1, generator=gen)
    saved = checkpoint.rng_state(model)
    want = {name: _draws(o) for name, o in owners.items()}
    want_global = (torch.rand(3).tolist(), random.random(), np.random.rand())
    other = _model()  # a fresh model: fresh generators, other global state
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    checkpoint.set_rng_state(saved, other)
    other_owners = checkpoint._generator_owners(other)
    assert {name: _draws(o) for name, o in other_owners.items() if o._generators} == want
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == want_global
    with pytest.raises(ValueError, match="different precision recipe"):
        checkpoint.set_rng_state(saved, nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")))


ARGS = ["--nvfp4", "--steps", "4", "--batch-size", "2", "--seq-len", "48", "--eval-every", "100", "--eval-problems",
        "0", "--save-every", "2"]


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_nvfp4_resume_draws_the_same_rounding_noise_after_the_resume(tmp_path, monkeypatch):
    full = tmp_path / "full"
    main(["pretrain", *ARGS, "--out", str(full)])
    want = _losses(full)
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    for d in (resumed, fresh):
        d.mkdir()
        shutil.copytree(full / "step-000002", d / "step-000002")
    main(["pretrain", "--out", str(resumed), "--resume"])
    assert _losses(resumed) == want[2:]
    restore = checkpoint.set_rng_state

    def without_generators(state, model):  # the bug this test exists for: SR generators left at their seeds
        restore({**state, "generators": {}}, model)

    monkeypatch.setattr(checkpoint, "set_rng_state", without_generators)
    main(["pretrain", "--out", str(fresh), "--resume"])
    got = _losses(fresh)
    assert got[0] == want[2] and got[1] != want[3]  # step 3 ran on restored weights; its SR draws changed step 4
