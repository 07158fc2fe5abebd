"""RL on the training skeleton (rl/trainer.py): the rollout interface a multi-turn source plugs into (a per-token
`loss_mask` on the RolloutBatch reaches the loss and its token count), and how a step's kept completions are cut
over ranks (every row once, every rank the same number of forwards).

References: the mask the test itself writes (the loss must see exactly it, times the completion-length mask); a
plain enumeration of rows and ranks."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_, small_model
from rich.console import Console

from nemotron3.rl import trainer as trainer_module
from nemotron3.rl.config import GRPOConfig
from nemotron3.rl.grpo import GRPOStage
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=300)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    return checkpoint.save(tmp_path_factory.mktemp("sft") / "final", model, tok)


def _every_other(completions: list[list[int]]) -> list[list[float]]:
    return [[float(t % 2 == 0) for t in range(len(c))] for c in completions]


def test_a_rollout_sources_loss_mask_reaches_the_loss(ckpt, tmp_path, monkeypatch):
    """A source that overrides `generate` and masks every other completion token (as a tool's output would be):
    the loss sees that mask and divides by its token count (dapo)."""
    seen = []
    real = trainer_module.policy_loss

    def spy(logp, old, adv, mask, *args):
        seen.append((mask.clone(), args[-2]))  # the mask and num_items
        return real(logp, old, adv, mask, *args)

    class Masked(GRPOStage):
        def generate(self, step):
            ro = super().generate(step)
            ro.batch.loss_mask = _every_other(ro.batch.completion_ids)
            self.comps = ro.batch.completion_ids
            return ro

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    cfg = GRPOConfig(model=ckpt, out=tmp_path / "m", steps=1, prompts_per_step=2, num_generations=3,
                     max_completion_length=8, eval_problems=0, reward_funcs=["tasks"], micro_batch_size=4)
    run = Masked(cfg, Console(file=io.StringIO()), ckpt)
    run.run()
    want = _every_other(run.comps)
    assert [m.shape[0] for m, _ in seen] == [4, 2]  # micro-batches of 4 and 2 completions
    rows = torch.cat([torch.nn.functional.pad(m, (0, 8 - m.shape[1])) for m, _ in seen])
    for r, w in zip(rows.tolist(), want):
        assert r[: len(w)] == w and not any(r[len(w):])
    assert all(n == sum(map(sum, want)) for _, n in seen)


@pytest.mark.parametrize("n, world, mb", [(12, 2, 5), (5, 2, 2), (1, 2, 0), (7, 3, 0), (9, 4, 2)])
def test_each_kept_completion_is_trained_once_and_every_rank_runs_the_same_forwards(n, world, mb):
    chunks = [trainer_module.RLRun._shares(SimpleNamespace(world=world, rank=r, cfg=SimpleNamespace(
        micro_batch_size=mb)), n) for r in range(world)]
    assert len({len(c) for c in chunks}) == 1  # the same number of forwards (a collective each) on every rank
    rows = [j for per_rank in chunks for ch in per_rank for j in ch]
    assert sorted(rows) == list(range(n))  # every row exactly once
    assert all(not mb or len(ch) <= mb for per_rank in chunks for ch in per_rank)
