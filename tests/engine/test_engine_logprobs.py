"""`return_logprobs`: each new token's log-probability, against a full forward over prompt + tokens (no cache).

Plain and speculative decoding, greedy and sampled, with a stop token, and a forced `</think>`: the reported
number is the log-probability of the emitted token under the sampling law at its position.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_PROMPTS as PROMPTS
from conftest import tiny_mtp_model as _model

import nemotron3
from nemotron3.engine.sampling import filtered_probs
from nemotron3.engine.thinking import ThinkTokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _model()


def _reference(model, prompt, tokens, temperature, top_k, top_p):
    """log p(token_i | prompt, tokens_<i) from one full forward, under the same law."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : len(prompt) + len(tokens) - 1]
    if temperature == 0:
        logp = torch.log_softmax(logits.double(), -1)
    else:
        logp = filtered_probs(logits, temperature, top_k, top_p).double().log()
    return logp[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("law", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_match_a_full_forward(model, k, law):
    engine = nemotron3.Engine(model, prefill_chunk=16)
    T, top_k, top_p = law
    free = engine.generate(PROMPTS, 10, temperature=T, top_k=top_k, top_p=top_p, seed=3, stop_token_ids=[],
                           num_speculative_tokens=k)
    stop = free.tokens[1][4]  # row 1 stops early, the others may or may not meet it
    out = engine.generate(PROMPTS, 10, temperature=T, top_k=top_k, top_p=top_p, seed=3, stop_token_ids=[stop],
                          num_speculative_tokens=k, return_logprobs=True)
    assert len(out.tokens[1]) <= 5
    for prompt, tokens, lps in zip(PROMPTS, out.tokens, out.logprobs):
        assert len(lps) == len(tokens)
        want = _reference(model, prompt, tokens, T, top_k, top_p)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want, atol=2e-4), (lps, want.tolist())
    assert engine.generate(PROMPTS, 4, seed=3).logprobs is None


@pytest.mark.parametrize("k", [0, 2])
def test_a_forced_end_of_thinking_gets_the_models_logprob(model, k):
    think = ThinkTokens(start=5, end=6, newlines=())
    engine = nemotron3.Engine(model, prefill_chunk=16, think_tokens=think)
    prompts = [[3, 4, 5], [7, 8, 5]]  # both end with <think>: thinking from the first token
    out = engine.generate(prompts, 8, temperature=1.0, seed=1, stop_token_ids=[], num_speculative_tokens=k,
                          max_thinking_tokens=2, thinking_grace=0.0, return_logprobs=True)
    for prompt, tokens, lps in zip(prompts, out.tokens, out.logprobs):
        assert tokens[2] == 6  # forced after 2 thinking tokens
        want = _reference(model, prompt, tokens, 1.0, 0, 1.0)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want, atol=2e-4)


def test_weights_updated_after_a_fused_optimizer_step():
    """A fused AdamW step writes the weights without bumping their version counters: after
    `weights_updated()` the engine samples from the new weights (its logprobs match a full forward)."""
    model = _model()
    engine = nemotron3.Engine(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    engine.generate(PROMPTS, 4, seed=0)  # the fused decode weights are built
    model.train()
    loss = model(torch.tensor([PROMPTS[1]])).logsumexp(-1).sum()
    loss.backward()
    opt.step()
    model.eval()
    engine.weights_updated()
    out = engine.generate(PROMPTS, 6, temperature=1.0, seed=1, stop_token_ids=[], return_logprobs=True)
    for prompt, tokens, lps in zip(PROMPTS, out.tokens, out.logprobs):
        want = _reference(model, prompt, tokens, 1.0, 0, 1.0)
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want, atol=2e-4)
