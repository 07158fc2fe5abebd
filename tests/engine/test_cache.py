"""HybridCache: sizes computed without allocating, slots, reset, and rollback of the last k positions."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.cache import HybridCache, cache_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", ["tiny", "t9"])
@pytest.mark.parametrize("rollback", [0, 3])
def test_computed_size_equals_allocated_bytes(preset, rollback):
    config = nemotron3.ModelConfig.preset(preset)
    cache = HybridCache(config, rows=3, max_seq_len=50, max_rollback=rollback)
    size = cache_size(config, rows=3, seq_len=50, max_rollback=rollback)
    assert cache.nbytes == size.total == cache.size().total
    # hand count: one KV pair per attention layer (MTP's included), conv + fp32 SSM per Mamba layer
    c = config
    n_attn = c.pattern.count("*") + c.mtp_pattern.count("*") * c.num_nextn_predict_layers
    n_mamba = c.pattern.count("M")
    kv = 2 * c.num_key_value_heads * c.head_dim * 4 * n_attn * 3 * 50
    state = (c.mamba_conv_dim * (c.conv_kernel - 1) + c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size) * 4
    assert size.kv == kv and size.recurrent == state * n_mamba * 3
    assert size.history == (state * n_mamba * 3 * (rollback + 1) if rollback else 0)


def test_super_at_one_million_tokens_is_computed_without_allocating():
    config = nemotron3.ModelConfig.preset("super-120b-a12b")
    size = cache_size(config, rows=1, seq_len=1 << 20, dtype=torch.bfloat16)
    # 8 backbone attention layers + 1 MTP attention layer, 2 KV heads of 128, bf16
    assert size.kv_per_token == 2 * 2 * 128 * 2 * 9
    # 40 Mamba layers: conv 10240 x 3 bf16, SSM 128 heads x 64 x 128 fp32
    assert size.state_per_row == 40 * (10240 * 3 * 2 + 128 * 64 * 128 * 4)
    assert size.total == size.kv_per_token * (1 << 20) + size.state_per_row


def test_ssm_state_dtype_follows_the_config():
    config = nemotron3.ModelConfig.preset("tiny").replace(mamba_ssm_cache_dtype="bfloat16")
    cache = HybridCache(config, 1, 8)
    assert all(cache.state(i, 'ssm').dtype == torch.bfloat16 for i, k in enumerate(cache.kinds) if k == 'M')
    assert cache.nbytes == cache_size(config, 1, 8).total


def test_slots_are_taken_freed_and_reused_fresh():
    config = nemotron3.ModelConfig.preset("tiny")
    cache = HybridCache(config, rows=2, max_seq_len=16)
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1)
    with pytest.raises(RuntimeError, match="in use"):
        cache.allocate()
    layer = cache.kinds.index("M")
    ssm = cache.state(layer, "ssm")
    ssm[a] = 1.0
    cache.lengths[a] = 5
    cache.free(a)
    assert cache.allocate() == a
    assert cache.lengths[a] == 0 and ssm[a].abs().sum() == 0


def _model(seed=0):
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")).eval()
    randomize_(model, seed)
    return model


@torch.no_grad()
def test_rollback_restores_the_state_of_the_shorter_sequence():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = HybridCache(model.config, 2, 40, max_rollback=5, include_mtp=False)
    model(ids[:, :20], cache=cache)  # prefill: chunked, records its final state
    model(ids[:, 20:25], cache=cache)  # 5 = max_rollback tokens: run and recorded one by one
    cache.rollback([3, 5], rows=None)  # row 0 keeps 22 tokens, row 1 keeps 20 (all 5 of the forward)
    assert cache.lengths.tolist() == [22, 20]
    # continuing after the rollback must equal the full forward of the kept prefix + the new token
    nxt = torch.tensor([[7], [9]])
    got = model(nxt, cache=cache)[:, 0]
    want0 = model(torch.cat([ids[:1, :22], nxt[:1]], 1))[0, -1]
    want1 = model(torch.cat([ids[1:, :20], nxt[1:]], 1))[0, -1]
    torch.testing.assert_close(got, torch.stack([want0, want1]), atol=1e-4, rtol=0)


@torch.no_grad()
def test_rollback_beyond_the_recorded_history_is_refused():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    cache = HybridCache(model.config, 1, 20, max_rollback=2, include_mtp=False)
    model(ids[:, :10], cache=cache)
    with pytest.raises(ValueError, match="history"):
        cache.rollback([1])  # nothing decoded step by step since the prefill
    model(ids[:, 10:12], cache=cache)
    cache.rollback([2])
    with pytest.raises(ValueError, match="history"):
        cache.rollback([1])
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback([11])
