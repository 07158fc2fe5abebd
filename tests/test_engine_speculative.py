"""Greedy MTP speculative decoding gives exactly the tokens of plain greedy decoding, whatever the drafts."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from test_engine_model import one_thread  # noqa: F401  (autouse fixture)

import nemotron3
from nemotron3.engine.speculative import MTPDrafter


@pytest.fixture(scope="module")
def engine():
    config = nemotron3.ModelConfig.preset("tiny")  # has an MTP block (*E)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config).eval()
    randomize_(model)
    return nemotron3.Engine(model)


PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]


def test_mtp_drafts_give_the_greedy_tokens(engine):
    want = engine.generate(PROMPTS, 8, stop_token_ids=[]).tokens
    out = engine.generate(PROMPTS, 8, stop_token_ids=[], num_speculative_tokens=2)
    assert out.tokens == want
    assert out.stats["drafted"] > 0 and 0 <= out.stats["acceptance_rate"] <= 1
    stop = want[0][2]  # stop tokens end rows as in plain decoding
    assert engine.generate(PROMPTS, 8, stop_token_ids=[stop], num_speculative_tokens=2).tokens == \
        engine.generate(PROMPTS, 8, stop_token_ids=[stop]).tokens


@pytest.mark.parametrize("wrong_at", [None, 1])
def test_oracle_drafts_are_accepted_and_wrong_ones_rolled_back(engine, monkeypatch, wrong_at):
    """Drafts taken from the true greedy continuation: all accepted (tokens_per_verify = k + 1), or, with
    one wrong draft at index `wrong_at` in row 1, that row accepts exactly `wrong_at` per round and the
    cache rollback must keep the output unchanged."""
    k, n = 3, 10
    longer = engine.generate(PROMPTS, n + k + 1, stop_token_ids=[]).tokens  # drafts past n are true too
    want = [w[:n] for w in longer]
    seqs = [p + w + [0] * 4 * n for p, w in zip(PROMPTS, longer)]  # rows that run ahead draft zeros

    def oracle(self, cache, h1, start, k_):
        lengths = cache.lengths.tolist()  # the last emitted token sits at position lengths[b]
        drafts = torch.tensor([seqs[b][n + 1 : n + 1 + k_] for b, n in enumerate(lengths)])
        if wrong_at is not None:
            drafts[1, wrong_at] = (drafts[1, wrong_at] + 1) % engine.config.vocab_size
        return drafts

    monkeypatch.setattr(MTPDrafter, "draft", oracle)
    out = engine.generate(PROMPTS, n, stop_token_ids=[], num_speculative_tokens=k)
    assert out.tokens == want
    if wrong_at is None:
        assert out.stats["acceptance_rate"] == 1.0 and out.stats["tokens_per_verify"] == k + 1
    else:
        assert out.stats["accepted"] < out.stats["drafted"]


def test_speculation_needs_an_mtp_block_and_greedy_decoding(engine):
    with pytest.raises(NotImplementedError, match="greedy"):
        engine.generate([[1, 2]], 4, temperature=0.5, num_speculative_tokens=2)
    config = nemotron3.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    no_mtp = nemotron3.Engine(nemotron3.HybridLM(config))
    with pytest.raises(ValueError, match="MTP block"):
        no_mtp.generate([[1, 2]], 4, num_speculative_tokens=2)
