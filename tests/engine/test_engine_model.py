"""The model's cached path (prefill in segments + one-token steps) against its full forward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_HF_CONFIGS
from conftest import model_from_hf_config as build

from nemotron3.engine.cache import HybridCache

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
@pytest.mark.parametrize("segments", [(37,), (5, 16, 16), (20, 1, 1, 15)])  # chunk_size is 16 in every config
def test_prefill_then_steps_equal_the_full_forward(tiny_hf_config, segments):
    name, cfg = tiny_hf_config
    model = build(cfg)
    total = sum(segments) + 12
    ids = torch.randint(0, model.config.vocab_size, (2, total), generator=torch.Generator().manual_seed(1))
    full = model(ids)  # (2, total, V)
    cache = HybridCache(model.config, 2, total)
    outs, s = [], 0
    for n in list(segments) + [1] * 12:  # segments, then 12 single-token decode steps
        outs.append(model(ids[:, s : s + n], cache=cache))
        s += n
    assert cache.lengths.tolist() == [total, total]
    assert full.abs().max() > 0.5
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_right_padded_rows_equal_each_prompt_alone(tiny_hf_config):
    name, cfg = tiny_hf_config
    model = build(cfg, seed=2)
    V = model.config.vocab_size
    lens = [37, 5, 16, 1]
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=gen) for n in lens]
    ids = torch.full((4, 37), 7)  # padding token: any id, it must not matter
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    cache = HybridCache(model.config, 4, 48)
    last = model(ids, cache=cache, valid=torch.tensor(lens), last_only=True)[:, 0]  # (4, V)
    nxt = torch.randint(0, V, (4, 3), generator=gen)
    steps = [model(nxt[:, j : j + 1], cache=cache)[:, 0] for j in range(3)]
    for i, p in enumerate(prompts):
        alone = model(torch.cat([p, nxt[i]])[None])[0]  # (len + 3, V)
        torch.testing.assert_close(last[i], alone[len(p) - 1], atol=1e-4, rtol=0)
        for j in range(3):
            torch.testing.assert_close(steps[j][i], alone[len(p) + j], atol=1e-4, rtol=0)


@torch.no_grad()
def test_a_subset_of_rows_advances_alone():
    model = build(TINY_HF_CONFIGS["latent-2groups"])
    V = model.config.vocab_size
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(4))
    cache = HybridCache(model.config, 3, 32)
    model(ids[:, :10], cache=cache)
    rows = torch.tensor([2, 0])
    got = model(ids[rows, 10:20], cache=cache, rows=rows)  # row 1 stays at 10 tokens
    assert cache.lengths.tolist() == [20, 10, 20]
    torch.testing.assert_close(got, model(ids[rows])[:, 10:], atol=1e-4, rtol=0)
    got1 = model(ids[1:2, 10:11], cache=cache, rows=torch.tensor([1]))
    torch.testing.assert_close(got1[0, 0], model(ids[1:2, :11])[0, -1], atol=1e-4, rtol=0)


@torch.no_grad()
def test_attention_query_blocks_do_not_change_the_result(monkeypatch):
    """A tiny score budget forces one query per block: the blocked path must equal the unblocked one."""
    import nemotron3.model.attention as attention

    model = build(TINY_HF_CONFIGS["latent-2groups"])
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))
    cache = HybridCache(model.config, 2, 40)
    model(ids[:, :8], cache=cache)
    monkeypatch.setattr(attention, "SCORE_BUDGET", 1)
    got = model(ids[:, 8:], cache=cache)
    torch.testing.assert_close(got, model(ids)[:, 8:], atol=1e-4, rtol=0)


def test_a_forward_past_the_cache_capacity_is_refused_before_any_work():
    model = build(TINY_HF_CONFIGS["dense-mlp"])
    cache = HybridCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
    assert cache.lengths.tolist() == [0]
