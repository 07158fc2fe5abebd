"""Cache rollback: what may be undone (only the tokens of the last recorded forward), what is refused, and that
the unchecked fast path of the speculative decoder leaves the same cache as the checked one.

The reference is the full forward (no cache) of the kept prefix: after a rollback, continuing must give its
logits; a refused rollback must leave the cache exactly as it was.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mtp_model

from nemotron3.engine.cache import HybridCache


@pytest.fixture(scope="module")
def model():
    return tiny_mtp_model()  # the tiny preset, seed 0


def _snapshot(cache: HybridCache) -> list:
    return [cache.lengths.clone(), cache.rollback_limit.clone()] + [
        cache.state(i, name).clone() for i, specs in enumerate(cache.specs) for name in specs]


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _continue_equals_full_forward(model, cache, kept: list[torch.Tensor]) -> None:
    nxt = torch.tensor([[7]] * len(kept))
    got = model(nxt, cache=cache)[:, 0]
    want = torch.stack([model(torch.cat([k[None], nxt[:1]], 1))[0, -1] for k in kept])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_a_rollback_across_two_recorded_forwards_is_refused(model):
    """Two forwards of 2 tokens each: the history holds only the second, so undoing 3 tokens is refused (and
    changes nothing); undoing 2 gives the cache of the first 10 tokens."""
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = HybridCache(model.config, 1, 20, max_rollback=3, include_mtp=False)
    model(ids[:, :8], cache=cache)
    model(ids[:, 8:10], cache=cache)
    model(ids[:, 10:12], cache=cache)
    before = _snapshot(cache)
    with pytest.raises(ValueError, match="history"):
        cache.rollback([3])
    assert _same(before, _snapshot(cache))  # nothing half-done
    cache.rollback([2])
    assert cache.lengths.tolist() == [10] and cache.rollback_limit.tolist() == [0]
    _continue_equals_full_forward(model, cache, [ids[0, :10]])


@torch.no_grad()
def test_a_forward_longer_than_max_rollback_is_not_undoable(model):
    """A recorded forward, then one of more than max_rollback tokens: nothing can be undone any more (the
    history still holds the first forward's states, which are not the last tokens')."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    cache = HybridCache(model.config, 2, 20, max_rollback=3, include_mtp=False)
    model(ids[:, :6], cache=cache)
    model(ids[:, 6:8], cache=cache)  # recorded: 2 tokens could be undone here
    model(ids[:, 8:12], cache=cache)  # 4 tokens > max_rollback: not recorded step by step
    with pytest.raises(ValueError, match="history"):
        cache.rollback([1, 0])
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback([-1, 0])
    cache.rollback([0, 0])  # undoing nothing is always allowed
    assert cache.lengths.tolist() == [12, 12]
    model(ids[:, 12:15], cache=cache)  # 3 = max_rollback tokens: recorded
    cache.rollback([1, 3])
    assert cache.lengths.tolist() == [14, 12] and cache.rollback_limit.tolist() == [2, 0]
    cache.rollback([2, 0])
    with pytest.raises(ValueError, match="history"):
        cache.rollback([1, 0])
    _continue_equals_full_forward(model, cache, [ids[0, :12], ids[1, :12]])


@torch.no_grad()
def test_the_unchecked_rollback_equals_the_checked_one(model):
    """`check=False` with one count per row (the speculative decoder's call) against the checked path."""
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(3))
    caches = [HybridCache(model.config, 3, 20, max_rollback=4, include_mtp=False) for _ in range(2)]
    for c in caches:
        model(ids[:, :8], cache=c)
        model(ids[:, 8:12], cache=c)
    n = torch.tensor([0, 2, 4])
    caches[0].rollback(n, check=False)
    caches[1].rollback(n.tolist())
    assert _same(_snapshot(caches[0]), _snapshot(caches[1]))
    assert caches[0].lengths.tolist() == [12, 10, 8] and caches[0].rollback_limit.tolist() == [4, 2, 0]
    _continue_equals_full_forward(model, caches[0], [ids[0, :12], ids[1, :10], ids[2, :8]])


@torch.no_grad()
def test_rollback_of_some_rows_leaves_the_others(model):
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(4))
    cache = HybridCache(model.config, 3, 20, max_rollback=2, include_mtp=False)
    model(ids[:, :8], cache=cache)
    model(ids[:, 8:10], cache=cache)
    before = _snapshot(cache)
    cache.rollback([1], rows=[2])
    after = _snapshot(cache)
    assert cache.lengths.tolist() == [10, 10, 9] and cache.rollback_limit.tolist() == [2, 2, 1]
    for x, y in zip(before[2:], after[2:]):  # rows 0 and 1 untouched, bit for bit
        assert torch.equal(x[:2], y[:2])
    _continue_equals_full_forward(model, cache, [ids[0, :10], ids[1, :10], ids[2, :9]])
