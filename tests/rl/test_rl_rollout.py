"""Rollouts (rl/rollout.py): groups laid out prompt by prompt; speculative rollouts give plain greedy's samples
exactly and the same sampled law (a two-sample chi-square test); the logprobs are the policy's."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.params import SamplingParams
from nemotron3.rl.loss import completion_logprobs
from nemotron3.rl.rollout import rollout as _rollout
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(train_data.task_texts(200, seed=0), vocab_size=300)


def rollout(engine, tok, prompts, n, length, temperature=1.0, seed=0, speculative=0):
    """rl/rollout.py's rollout with its SamplingParams built from the old keyword form."""
    params = SamplingParams(max_tokens=length, temperature=temperature, seed=seed, num_speculative_tokens=speculative)
    return _rollout(engine, tok, prompts, n, params)


def _model(vocab: int, seed: int = 0):
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=vocab)  # with an MTP block
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config).eval()
    randomize_(model, seed)
    return model


def test_groups_greedy_speculation_and_logprobs(tok):
    model = _model(tok.vocab_size)
    engine = nemotron3.Engine(model)
    prompts = [[tok.bos_id, *tok.encode("What is 2 + 3?\n")], [tok.bos_id, *tok.encode("Sort ascending: 3 1 2\n")]]
    plain = rollout(engine, tok, prompts, 3, 12, temperature=0.0)
    spec = rollout(engine, tok, prompts, 3, 12, temperature=0.0, speculative=3)
    assert plain.prompt_ids == [prompts[0]] * 3 + [prompts[1]] * 3
    assert spec.completion_ids == plain.completion_ids  # greedy: token for token
    assert plain.completion_ids[0] == plain.completion_ids[2]  # greedy rows of one prompt agree
    for batch in (plain, spec):
        for c, lp, t, cut in zip(batch.completion_ids, batch.logprobs, batch.texts, batch.truncated):
            assert len(lp) == len(c) and cut == (len(c) == 12 and c[-1] not in (tok.eos_id, tok.end_of_turn_id))
            assert "<|im_end|>" not in t
    sampled = rollout(engine, tok, prompts, 4, 10, temperature=1.0, seed=5, speculative=2)
    with torch.no_grad():
        want, _, mask = completion_logprobs(model, sampled.prompt_ids, sampled.completion_ids, 1.0)
    got = torch.zeros_like(want)
    for i, lp in enumerate(sampled.logprobs):
        got[i, : len(lp)] = torch.tensor(lp)
    assert torch.allclose(got * mask, want * mask, atol=2e-4)
    assert sampled.stats["tokens"] == int(mask.sum()) and "acceptance_length" in sampled.stats


def _chi2_p(a: collections.Counter, b: collections.Counter) -> float:
    """p-value of the two-sample chi-square test of homogeneity (cells with few counts pooled)."""
    cells = sorted(set(a) | set(b), key=lambda c: -(a[c] + b[c]))
    big = [c for c in cells if a[c] + b[c] >= 20]
    rest = [c for c in cells if a[c] + b[c] < 20]
    rows = [(a[c], b[c]) for c in big] + ([(sum(a[c] for c in rest), sum(b[c] for c in rest))] if rest else [])
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for x, y in rows:
        tot = x + y
        ex, ey = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ex) ** 2 / ex + (y - ey) ** 2 / ey
    df = len(rows) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_speculative_rollouts_sample_the_same_law(tok):
    """Tokens 2-3 of 1500 rows per path (token 1 comes from the prefill in both): the two samples' joint
    histograms agree (p > 1e-3); the control, a plain rollout at another temperature, is told apart."""
    model = _model(24, seed=1)  # a small vocabulary: the (token 2, token 3) table has few cells
    small = Tokenizer(tok.tk)
    engine = nemotron3.Engine(model)
    prompts = [[1, 3, 4, 5, 6]]
    n = 1500

    def counts(temperature, k, seed):
        b = rollout(engine, small, prompts, n, 3, temperature=temperature, seed=seed, speculative=k)
        return collections.Counter(tuple(c[1:3]) for c in b.completion_ids if len(c) >= 3)

    plain = counts(1.0, 0, 0)
    assert _chi2_p(plain, counts(1.0, 3, 1)) > 1e-3
    assert _chi2_p(plain, counts(0.7, 0, 2)) < 1e-6  # the test can see a different law
