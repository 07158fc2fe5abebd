"""`nemotron3 pretrain --init-from DIR` (continued pretraining): the run starts from DIR's weights exactly (its MTP
block too) with a fresh optimizer and schedule, whatever training state DIR holds; a folder of another architecture
is refused in one line naming it and the differing field, before the output folder is touched.

References: the source folder read back by `load_pretrained` (torch.equal: loading fp32 weights is a copy); an
empty AdamW state and the schedule's rate at step 0 for "fresh"."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import small_model

from nemotron3 import load_pretrained
from nemotron3.cli import main
from nemotron3.stages.pretrain import PretrainConfig, pretrain
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint, loop

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(batch_size=4, seq_len=32, eval_problems=0, tokenizer_sample=200, heldout_task_problems=12,
             log_every=100)


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A pretraining run's step-000002/: weights with an MTP block and a trainer_state.pt whose optimizer has
    moments and whose schedule is two steps in."""
    out = tmp_path_factory.mktemp("src") / "run"
    _quiet(pretrain, PretrainConfig(out=out, steps=3, save_every=2, eval_every=100, **SMALL))
    folder = checkpoint.step_dir(out, 2)
    state = checkpoint.load_state(folder)
    assert state["step"] == 2 and state["optimizer"]["state"]  # there is training state to ignore
    return folder


@pytest.mark.parametrize("nvfp4", [False, True])
def test_init_from_starts_from_the_weights_with_a_fresh_optimizer_and_schedule(source, tmp_path, monkeypatch, nvfp4):
    """With --nvfp4 too: the loaded weights become the NVFP4 recipe's fp32 master weights, under Super's precision
    policy as a run from scratch gets it (the same modules quantized)."""
    seen = []
    real = loop.LMStage.train_step

    def first_step(self, step):
        if step == 0:
            seen.append({"weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                         "quantized": sorted(n for n, m in self.model.named_modules()
                                             if type(m).__name__ == "NVFP4Linear"),
                         "optimizer": {id(p): dict(s) for p, s in self.opt.state.items()}, "step": step,
                         "position": self.position})
        return real(self, step)

    monkeypatch.setattr(loop.LMStage, "train_step", first_step)
    cfg = PretrainConfig(out=tmp_path / "cpt", init_from=source, steps=4, warmup=3, eval_every=100, nvfp4=nvfp4,
                         **SMALL)
    final = _quiet(pretrain, cfg)
    if nvfp4:  # the policy of a run from scratch: the same modules quantized
        _quiet(pretrain, PretrainConfig(out=tmp_path / "scratch", steps=1, eval_every=100, nvfp4=True, **SMALL))
        assert seen[0]["quantized"] and seen[0]["quantized"] == seen[-1]["quantized"]
    first = seen[0]
    want = load_pretrained(source, dtype=torch.float32).state_dict()
    assert sorted(first["weights"]) == sorted(want) and any(k.startswith("mtp.") for k in want)
    for name, t in want.items():
        assert torch.equal(first["weights"][name], t), name
    assert first["optimizer"] == {} and first["step"] == 0 and first["position"] == 0
    records = [json.loads(line) for line in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[0]["lr"] == cfg.schedule().lr(0) != cfg.schedule().lr(2)
    assert Tokenizer.load(final).vocab_size == Tokenizer.load(source).vocab_size
    saved = json.loads((tmp_path / "cpt" / "summary.json").read_text())["config"]
    assert saved["init_from"] == str(source)


def test_init_from_another_architecture_fails_naming_it_and_leaves_out_untouched(source, tmp_path):
    other = tmp_path / "other"
    tok = Tokenizer.load(source)
    checkpoint.save(other, small_model(-(-tok.vocab_size // 64) * 64), tok)  # tiny at hidden 64, not 128
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "summary.json").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["pretrain", "--init-from", str(other), "--out", str(out), "--overwrite", "--steps", "1"])
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1, err.getvalue()
    assert str(other) in lines[0] and "hidden_size = 64" in lines[0] and "128" in lines[0], lines[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # --overwrite deleted nothing


def test_init_from_refuses_a_second_tokenizer(source, tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        PretrainConfig(out=tmp_path / "x", init_from=source, tokenizer=source)
