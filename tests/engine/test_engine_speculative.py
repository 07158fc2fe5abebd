"""MTP speculative decoding: greedy gives exactly plain greedy's tokens; sampling draws exactly the target's law.

The sampled check is statistical: thousands of seeded rows through a deliberately mismatched MTP block
(rejections are frequent), their first three tokens counted, against the exact joint law of the target
computed from full forwards (no cache, no speculation) over every 3-token continuation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY_PROMPTS as PROMPTS
from conftest import tiny_mtp_model as _model

import nemotron3
from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.engine.sampling import filtered_probs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _model()


# the first prompt crosses the 16-token prefill chunks twice
@pytest.mark.parametrize("fast", [True, False])
def test_greedy_speculation_gives_the_greedy_tokens(model, fast):
    engine = nemotron3.Engine(model, prefill_chunk=16, fast=fast)
    want = engine.generate(PROMPTS, 12, stop_token_ids=[]).tokens
    for k in range(1, 6):
        out = engine.generate(PROMPTS, 12, stop_token_ids=[], num_speculative_tokens=k)
        assert out.tokens == want, k
        rates = out.stats["acceptance_rate_per_position"]
        assert len(rates) == k and out.stats["acceptance_length"] == pytest.approx(1 + sum(rates))
    # rows that stop at different times: a stop token one row meets early, the others later or never
    stop = want[0][2]
    for k in (1, 3):
        assert engine.generate(PROMPTS, 12, stop_token_ids=[stop], num_speculative_tokens=k).tokens == \
            engine.generate(PROMPTS, 12, stop_token_ids=[stop]).tokens


def _exact_law(model, prompt, temperature, top_k, top_p):
    """Joint law of the first three sampled tokens, from full forwards: (V, V, V) float64."""
    V = model.config.vocab_size

    def probs(seqs):
        with torch.no_grad():
            logits = model(torch.tensor(seqs))[:, -1]
        return filtered_probs(logits, temperature, top_k, top_p).double()

    p1 = probs([prompt])[0]  # (V,)
    p2 = probs([prompt + [a] for a in range(V)])  # (V, V)
    p3 = probs([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi_square_p_value(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's test with the cells of expected count < 5 pooled into one; p-value from the chi-square
    survival function Q(df/2, x/2) (torch.special.gammaincc)."""
    n = counts.sum()
    expected = law.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    e = torch.cat([expected[~small], expected[small].sum()[None]])
    o = torch.cat([counts[~small], counts[small].sum()[None]])
    keep = e > 0
    stat = ((o[keep] - e[keep]) ** 2 / e[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 0.9)])
def test_speculative_sampling_draws_the_target_law(top_k, top_p):
    """6000 rows, k = 2, a random MTP block made sharper than the target (so it is confidently wrong and
    rejections are frequent): the joint law of the first three tokens must pass Pearson's chi-square test
    against the exact law at significance 1e-3 (the seeds are fixed, so the test is deterministic)."""
    model = _model(vocab=8, seed=3)
    with torch.no_grad():
        model.mtp.layers[-1].final_layernorm.weight.mul_(4.0)  # a peaked, badly matched draft law
    prompt, rows, temperature = [3, 5, 1, 4], 6000, 1.0
    engine = nemotron3.Engine(model)
    out = engine.generate([prompt] * rows, 3, temperature=temperature, top_k=top_k, top_p=top_p, seed=11,
                          stop_token_ids=[], num_speculative_tokens=2)
    assert out.stats["acceptance_rate"] < 0.8  # rejections are frequent
    V = model.config.vocab_size
    counts = torch.zeros(V, V, V)
    for t in out.tokens:
        counts[t[0], t[1], t[2]] += 1
    law = _exact_law(model, prompt, temperature, top_k, top_p)
    assert _chi_square_p_value(counts, law) > 1e-3
    # the same test has the power to see a slightly wrong law
    assert _chi_square_p_value(counts, _law_shifted(law)) < 1e-3


def _law_shifted(law: torch.Tensor) -> torch.Tensor:
    """A nearby wrong law: 20% of the mass moved onto the next token at the third position."""
    return 0.8 * law + 0.2 * torch.roll(law, 1, dims=2)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    engine = nemotron3.Engine(model)
    kw = dict(temperature=0.8, top_p=0.95, seed=5, stop_token_ids=[], num_speculative_tokens=3)
    a = engine.generate([PROMPTS[0], PROMPTS[1]], 10, **kw).tokens
    assert engine.generate([PROMPTS[0], PROMPTS[1]], 10, **kw).tokens == a
    b = engine.generate([PROMPTS[0], PROMPTS[2], [9, 9, 9, 9]], 10, **kw).tokens  # other rows beside row 0
    assert b[0] == a[0]
    assert engine.generate([PROMPTS[0], PROMPTS[1]], 10, **{**kw, "seed": 6}).tokens != a


@pytest.mark.parametrize("accepted", [0, 1, 3])
def test_rollback_leaves_no_trace_of_the_rejected_tokens(model, accepted):
    """Verify [x, d1..d4], roll back the rejected ones: bit for bit the cache of a verify whose rejected
    tokens were different ones (they leave no trace), and equal up to float summation order (the verify's
    matrix products have another row count) to a cache that only ever ran [x, d1..d_a]."""
    k, V = 4, model.config.vocab_size
    fast = FastDecoder(model)
    gen = torch.Generator().manual_seed(accepted)
    prompt = torch.randint(0, V, (3, 21), generator=gen)
    tokens = torch.randint(0, V, (3, k + 1), generator=gen)
    other = tokens.clone()
    other[:, accepted + 1 :] = (other[:, accepted + 1 :] + 1) % V
    caches = [HybridCache(model.config, 3, 40, max_rollback=k + 1, include_mtp=False) for _ in range(3)]
    with torch.no_grad():
        for c in caches:
            model(prompt, cache=c)
        for c, t in zip(caches[:2], (tokens, other)):
            fast.forward(t, c, int(c.lengths.max()) + k + 1)
            c.rollback(k - accepted)
        fast.forward(tokens[:, : accepted + 1], caches[2], int(caches[2].lengths.max()) + accepted + 1)
    for c in caches[1:]:
        assert torch.equal(caches[0].lengths, c.lengths)
    n = int(caches[0].lengths[0])
    for i, specs in enumerate(caches[0].specs):
        for name, spec in specs.items():
            x, y, z = (c.state(i, name) for c in caches)
            if spec.kind == "sequence":
                x, y, z = x[:, :, :n], y[:, :, :n], z[:, :, :n]
            assert torch.equal(x, y), (i, name)
            torch.testing.assert_close(x, z, atol=1e-5, rtol=1e-5)


def test_speculation_needs_an_mtp_block():
    config = nemotron3.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    no_mtp = nemotron3.Engine(nemotron3.HybridLM(config))
    with pytest.raises(ValueError, match="MTP block"):
        no_mtp.generate([[1, 2]], 4, num_speculative_tokens=2)


def test_an_mtp_config_from_hf_builds_a_drafting_model():
    hf = nemotron3.ModelConfig.preset("tiny").to_hf()
    hf.pop("mtp_hybrid_override_pattern", None)
    hf["mtp_layers_block_type"] = ["attention", "moe"]
    config = nemotron3.ModelConfig.from_hf(hf)
    assert config.mtp_pattern == "*E" and config.num_nextn_predict_layers == 1
    torch.manual_seed(1)
    model = nemotron3.HybridLM(config).eval()
    out = nemotron3.Engine(model).generate([[4, 5, 6]], 6, stop_token_ids=[], num_speculative_tokens=2)
    assert len(out.tokens[0]) == 6 and out.stats["drafted"] > 0
    assert list(itertools.chain(out.tokens[0])) == \
        nemotron3.Engine(model).generate([[4, 5, 6]], 6, stop_token_ids=[]).tokens[0]


@pytest.mark.slow
def test_compiled_speculation_gives_the_greedy_tokens(model):
    """The torch.compile'd verify and MTP forwards (static shapes, attention over the whole capacity)."""
    engine = nemotron3.Engine(model, compile=True, max_seq_len=256)
    want = nemotron3.Engine(model).generate(PROMPTS, 10, stop_token_ids=[]).tokens
    assert engine.generate(PROMPTS, 10, stop_token_ids=[], num_speculative_tokens=2).tokens == want
