"""HybridCache bookkeeping on row subsets, right padding, recorded forwards and rollback, in-process.

The references are plain Python: `ListModel` keeps each row's tokens as a list and its rollback limit as an int,
and the layers are driven by hand through `LayerCache` (a "counting" mixer: the attention layer appends each
token's id at its position, the Mamba layer's states hold a checksum of the row's tokens), so after any sequence
of forwards, commits, resets and rollbacks the cache's lengths, limits, keys and recurrent states must equal what
the lists say. Index arithmetic (positions, masks, slot numbers) is recomputed by Python loops over rows.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.cache import HybridCache, cache_layer_kinds, cache_size, layer_specs

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = nemotron3.ModelConfig.preset("tiny")  # pattern MEM*EME, MTP *E: cache layers M E M * E M E * E
KINDS = list(CONFIG.pattern + CONFIG.mtp_pattern)
ATT, MAMBA = KINDS.index("*"), KINDS.index("M")


def _cache(rows=3, seq=12, rollback=0, **kw) -> HybridCache:
    return HybridCache(CONFIG, rows, seq, max_rollback=rollback, **kw)


def _checksum(tokens: list[int]) -> float:
    """The counting mixer's recurrent state after `tokens`: exact in fp32 for the short rows used here."""
    return float(sum((p + 1) * tok for p, tok in enumerate(tokens)))


class ListModel:
    """What the cache should hold, as lists: tokens per row and the rollback limit per row."""

    def __init__(self, rows: int, max_rollback: int):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.limit = [0] * rows
        self.recorded = [False] * rows  # the row's last forward since its reset was recorded (slot `limit` = now)
        self.R = max_rollback

    def forward(self, rows: list[int], toks: list[list[int]], valid: list[int], t: int):
        for r, tk, v in zip(rows, toks, valid):
            self.tokens[r] += tk[:v]
            self.limit[r] = v if 0 < self.R and t <= self.R else 0
            self.recorded[r] = 0 < self.R and t <= self.R

    def rollback(self, rows: list[int], n: list[int]):
        for r, k in zip(rows, n):
            if k:
                self.tokens[r] = self.tokens[r][:-k]
            self.limit[r] -= min(k, self.limit[r])


def _run_counting_forward(cache: HybridCache, view, toks: torch.Tensor) -> None:
    """Drive one attention and one Mamba layer through `view` as a mixer would. toks (b, t) int."""
    b, t = toks.shape
    valid = view.valid if view.valid is not None else torch.full((b,), t)
    att = view.layer(ATT)
    key_shape = cache.state(ATT, "key").shape  # (rows, kv_heads, max_seq_len, head_dim)
    new = toks[:, :, None, None].float().expand(b, t, key_shape[1], key_shape[3])  # (b, t, kv_heads, head_dim)
    att.append("key", new)
    m = view.layer(MAMBA)
    before = m.read("ssm")[:, 0, 0, 0].clone()  # (b,) the checksum so far
    pos = view.start  # (b,)
    states = [before]
    for i in range(t):  # padding (i >= valid) leaves the state unchanged
        add = torch.where(i < valid, (pos + i + 1).double() * toks[:, i].double(), 0.0)
        states.append(states[-1] + add.float())
    full = lambda s: s[:, None, None, None].expand(b, *cache.state(MAMBA, "ssm").shape[1:])  # noqa: E731
    conv = lambda s: s[:, None, None].expand(b, *cache.state(MAMBA, "conv").shape[1:])  # noqa: E731
    for i, s in enumerate(states):
        m.record(i - 1, ssm=full(s), conv=conv(s))
    m.write("ssm", full(states[-1]).contiguous())
    m.write("conv", conv(states[-1]).contiguous())


def _assert_matches(cache: HybridCache, ref: ListModel) -> None:
    assert cache.lengths.tolist() == [len(tk) for tk in ref.tokens]
    assert cache.rollback_limit.tolist() == ref.limit
    key, ssm, conv = cache.state(ATT, "key"), cache.state(MAMBA, "ssm"), cache.state(MAMBA, "conv")
    for r, tk in enumerate(ref.tokens):
        assert key[r, 0, : len(tk), 0].tolist() == [float(x) for x in tk], f"row {r} keys"
        assert bool((ssm[r] == _checksum(tk)).all()) and bool((conv[r] == _checksum(tk)).all()), f"row {r} state"


@pytest.mark.parametrize("seed", range(4))
def test_random_forwards_commits_and_rollbacks_equal_the_list_model(seed):
    """Forwards over random row subsets (in order, permuted, all rows), right padding, recorded (t <= R) or not,
    then checked and unchecked rollbacks, resets, refused rollbacks (which must change nothing)."""
    rng = random.Random(seed)
    rows_n, R, seq = 4, 3, 40
    cache = _cache(rows=rows_n, seq=seq, rollback=R)
    ref = ListModel(rows_n, R)
    for _ in range(40):
        op = rng.choice(["forward", "forward", "forward", "rollback", "reset"])
        room = seq - max(len(tk) for tk in ref.tokens)
        if op == "forward" and room >= 1:
            t = rng.randint(1, min(R + 2, room))
            kind = rng.choice(["all", "all-list", "subset"])
            if kind == "subset":
                rows = rng.sample(range(rows_n), rng.randint(1, rows_n))
            else:
                rows = list(range(rows_n))
            valid = [rng.randint(1, t) for _ in rows] if rng.random() < 0.5 else [t] * len(rows)
            toks = torch.tensor([[rng.randint(1, 9) for _ in range(t)] for _ in rows])
            view = cache.begin(t, rows=None if kind == "all" else torch.tensor(rows), valid=torch.tensor(valid))
            assert view.per_step == (t <= R)
            _run_counting_forward(cache, view, toks)
            cache.commit(view)
            ref.forward(rows, toks.tolist(), valid, t)
        elif op == "rollback":
            rows = list(range(rows_n)) if rng.random() < 0.5 else rng.sample(range(rows_n), rng.randint(1, rows_n))
            n = [rng.randint(0, ref.limit[r]) for r in rows]
            if rng.random() < 0.3:  # one count too many: refused, nothing changes
                j = rng.randrange(len(rows))
                n[j] = ref.limit[rows[j]] + 1
                with pytest.raises(ValueError, match=r"^(cannot roll back|rollback of) "):
                    cache.rollback(n, rows=rows)
            elif rows == list(range(rows_n)) and all(ref.recorded) and rng.random() < 0.5:
                # the speculative decoder's fast path: every row's last forward was recorded, n = 0 rows included
                cache.rollback(torch.tensor(n), check=False)
                ref.rollback(rows, n)
            else:
                cache.rollback(n, rows=None if rows == list(range(rows_n)) else rows)
                ref.rollback(rows, n)
        elif op == "reset":
            rows = rng.sample(range(rows_n), rng.randint(1, rows_n))
            cache.reset(rows)
            for r in rows:
                ref.tokens[r], ref.limit[r], ref.recorded[r] = [], 0, False
        _assert_matches(cache, ref)


def test_begin_describes_the_rows_positions_and_padding():
    """`begin` against hand-computed views: rows collapse to None only for every row in order."""
    cache = _cache(rows=3, seq=12, rollback=2)
    cache.lengths[:] = torch.tensor([4, 0, 7])
    assert cache.begin(2, rows=torch.tensor([0, 1, 2])).rows is None
    for rows in ([2, 0], [1, 0, 2], [0, 1]):
        v = cache.begin(2, rows=torch.tensor(rows))
        assert v.rows.tolist() == rows and v.index.tolist() == rows
        assert v.start.tolist() == [[4, 0, 7][r] for r in rows]
    v = cache.begin(3, rows=torch.tensor([2, 0]), valid=torch.tensor([3, 1], dtype=torch.int32))
    assert v.valid.dtype == torch.long
    assert v.positions.tolist() == [[7, 8, 9], [4, 5, 6]] and v.last.tolist() == [2, 0]
    assert v.valid.tolist() == [3, 1] and v.t == 3 and not v.per_step and v.recording
    v = cache.begin(2, valid=torch.tensor([2, 2, 2]))
    assert v.valid is None and v.last.tolist() == [1, 1, 1] and v.per_step and v.rows is None
    assert v.index.tolist() == [0, 1, 2]
    assert v.layer(ATT).n_keys == 7 + 2 and v.layer(ATT).positions.tolist() == [[4, 5], [0, 1], [7, 8]]
    v = cache.begin(1, start=torch.tensor([1, 2, 3], dtype=torch.int32))  # the MTP drafter's own positions
    assert v.start.tolist() == [1, 2, 3] and v.start.dtype == torch.long and v.per_step
    v = cache.begin(1, rows=torch.tensor([2, 0]), start=torch.tensor([1, 2]))
    cache.commit(v)  # a subset's lengths follow the given start, not the old lengths
    assert cache.lengths.tolist() == [3, 0, 2] and cache.rollback_limit.tolist() == [1, 0, 1]
    cache.lengths[:] = torch.tensor([4, 0, 7])
    assert cache.begin(5).t == 5  # 7 + 5 = 12 = max_seq_len still fits
    assert not _cache(rows=1, rollback=0).begin(1).per_step and not _cache(rows=1).begin(1).recording


def test_begin_refuses_bad_forwards_with_their_messages():
    cache = _cache(rows=2, seq=8)
    cache.lengths[:] = torch.tensor([3, 6])
    with pytest.raises(ValueError, match=r"^a cached forward needs at least one token per row$"):
        cache.begin(0)
    with pytest.raises(ValueError, match=r"^3 more tokens do not fit: a row holds 6 of max_seq_len=8; build the "
                                         r"cache \(or the Engine\) with a larger max_seq_len$"):
        cache.begin(3)
    cache.begin(3, rows=torch.tensor([0]))  # row 0 has room: 3 + 3 <= 8
    for valid in ([1], [0, 1], [1, 3]):
        with pytest.raises(ValueError, match=rf"^valid must hold one count in \[1, 2\] per row, got \{valid}$"):
            cache.begin(2, valid=torch.tensor(valid))
    assert cache.begin(2, valid=torch.tensor([1, 2])).valid.tolist() == [1, 2]


def test_append_on_a_row_subset_writes_the_rows_positions_only():
    """Keys of 3 of 4 rows at different lengths, right-padded (padding is written too, never read): the storage
    against a loop over rows and positions, the returned keys against the loop's rows [0, n_keys)."""
    cache = _cache(rows=4, seq=12, dtype=torch.bfloat16)  # bf16 storage, fp32 input: cast on write
    cache.lengths[:] = torch.tensor([3, 0, 5, 2])
    key = cache.state(ATT, "key")  # (4, 2, 12, 32)
    key.copy_(torch.randn(key.shape, generator=torch.Generator().manual_seed(0)))
    ref = key.clone()
    rows, start = [2, 0, 3], [5, 3, 2]
    new = torch.randn(3, 3, key.shape[1], key.shape[3], generator=torch.Generator().manual_seed(1))  # (b, t, kv, d)
    got = cache.begin(3, rows=torch.tensor(rows), valid=torch.tensor([3, 1, 2])).layer(ATT).append("key", new)
    for b, r in enumerate(rows):
        for j in range(3):
            ref[r, :, start[b] + j] = new[b, j].to(torch.bfloat16)
    # exact by construction: the cache copies values (bf16 rounding done the same way in the reference)
    assert torch.equal(key, ref)
    assert got.shape == (3, 2, 8, 32) and torch.equal(got, torch.stack([ref[r, :, :8] for r in rows]))


def test_append_over_every_row_returns_the_storage_up_to_n_keys():
    cache = _cache(rows=2, seq=10)
    cache.lengths[:] = torch.tensor([4, 4])
    key = cache.state(ATT, "key")
    new = torch.randn(2, 2, key.shape[1], key.shape[3])  # (b, t, kv, d)
    got = cache.begin(2).layer(ATT).append("key", new)
    assert got.shape == (2, 2, 6, 32) and got.data_ptr() == key.data_ptr()  # a view: no gather
    for b in range(2):
        assert torch.equal(key[b, :, 4:6], new[b].transpose(0, 1)) and not key[b, :, 6:].any()
    # the fast decoder's single uniform step: one position (n_keys - 1) written for every row
    one = torch.randn(2, 1, key.shape[1], key.shape[3])
    view = cache.begin_all(1, n_keys=7, uniform=True, start=torch.tensor([6, 6]))
    assert view.mask is None
    got = view.layer(ATT).append("key", one)
    assert got.shape == (2, 2, 7, 32) and torch.equal(key[:, :, 6], one[:, 0]) and not key[:, :, 7:].any()
    assert torch.equal(key[:, :, 4:6], new.transpose(1, 2))


def test_read_write_and_record_on_row_subsets():
    """read gathers the rows (a copy) or returns the storage itself; write and record scatter (with a cast to the
    storage dtype) only into the forward's rows; a forward longer than max_rollback records nothing."""
    cache = _cache(rows=3, seq=8, rollback=2, ssm_dtype=torch.bfloat16)
    ssm = cache.state(MAMBA, "ssm")
    ssm.copy_(torch.arange(3.0)[:, None, None, None].expand_as(ssm))
    sub = cache.begin(2, rows=torch.tensor([2, 0])).layer(MAMBA)
    got = sub.read("ssm")
    assert got[:, 0, 0, 0].tolist() == [2.0, 0.0]
    got += 10
    assert ssm[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]  # a copy
    sub.write("ssm", torch.full((2, *ssm.shape[1:]), 5.0))
    assert ssm[:, 0, 0, 0].tolist() == [5.0, 1.0, 5.0]
    hist = sub.history("ssm")
    assert hist is cache.history[MAMBA]["ssm"] and hist.shape == (3, 3, *ssm.shape[1:])
    sub.record(-1, ssm=torch.full((2, *ssm.shape[1:]), 7.0))
    sub.record(1, ssm=torch.stack([torch.full(ssm.shape[1:], 8.0), torch.full(ssm.shape[1:], 9.0)]))
    assert hist[:, :, 0, 0, 0].tolist() == [[7.0, 0.0, 7.0], [0.0, 0.0, 0.0], [9.0, 0.0, 8.0]]
    everyone = cache.begin(1).layer(MAMBA)
    assert everyone.read("ssm") is ssm
    everyone.write("ssm", ssm)  # the mixer updated the storage in place: nothing to copy
    everyone.write("ssm", torch.full(ssm.shape, 4.0))
    assert bool((ssm == 4.0).all())
    everyone.record(0, ssm=torch.full(ssm.shape, 6.0))
    assert bool((hist[1] == 6.0).all()) and bool((hist[0, 1] == 0).all())
    cache.begin(3).layer(MAMBA).record(0, ssm=torch.full(ssm.shape, 1.0))  # t = 3 > R: not recorded
    assert bool((hist[1] == 6.0).all())


def test_begin_all_masks_and_limits_against_a_loop():
    """The fast decoder's view: mask[b, 0, j, k] = (k <= start[b] + j) by a loop; n_keys None = whole capacity."""
    cache = _cache(rows=3, seq=9, rollback=2)
    cache.lengths[:] = torch.tensor([2, 5, 0])
    v = cache.begin_all(2, n_keys=None, uniform=False)
    assert v.rows is None and v.index.tolist() == [0, 1, 2] and v.n_keys == 9 and v.per_step
    want = torch.tensor([[[[k <= s + j for k in range(9)] for j in range(2)]] for s in (2, 5, 0)])
    assert v.mask.shape == (3, 1, 2, 9) and torch.equal(v.mask, want)
    v = cache.begin_all(1, n_keys=6, uniform=False)
    assert v.mask.shape == (3, 1, 1, 6) and v.layer(0).n_keys == 6
    assert cache.begin_all(1, n_keys=None, uniform=True).mask is not None  # whole capacity: masked
    assert cache.begin_all(2, n_keys=7, uniform=True).mask is not None  # two tokens: causal mask
    assert not _cache(rows=1).begin_all(5, 5, True).per_step
    with pytest.raises(ValueError, match=r"^a recording cache \(max_rollback=2\) takes at most that many tokens "
                                         r"per fast forward, got 3$"):
        cache.begin_all(3, None, False)
    cache.commit_all(2)
    assert cache.lengths.tolist() == [4, 7, 2] and cache.rollback_limit.tolist() == [2, 2, 2]
    plain = _cache(rows=2)
    plain.commit_all(3)
    assert plain.lengths.tolist() == [3, 3] and plain.rollback_limit.tolist() == [0, 0]
    assert cache._all_rows() is cache._all_rows()  # one index tensor for every fast step
    v = cache.begin_all(2, n_keys=5, uniform=False, start=torch.tensor([1, 3, 0]))  # the MTP drafter's positions
    assert v.positions.tolist() == [[1, 2], [3, 4], [0, 1]] and v.mask[1, 0, 0].tolist() == [1, 1, 1, 1, 0]
    one = _cache(rows=1, rollback=1)
    assert one.begin_all(1, None, False).per_step and one.begin(1).per_step and not one.begin(2).per_step
    with pytest.raises(ValueError, match=r"^a recording cache \(max_rollback=1\) takes at most that many tokens "):
        one.begin_all(2, None, False)


def test_single_token_fast_step_of_rows_at_different_lengths():
    """One token per row, rows at lengths 2, 5, 0 (masked): each key goes to its own row's position (a loop)."""
    cache = _cache(rows=3, seq=9)
    cache.lengths[:] = torch.tensor([2, 5, 0])
    key = cache.state(ATT, "key")
    new = torch.randn(3, 1, key.shape[1], key.shape[3])  # (b, 1, kv, d)
    got = cache.begin_all(1, n_keys=6, uniform=False).layer(ATT).append("key", new)
    want = torch.zeros_like(key)
    for b, pos in enumerate([2, 5, 0]):
        want[b, :, pos] = new[b, 0]
    assert torch.equal(key, want) and torch.equal(got, want[:, :, :6])


def test_commit_of_a_full_forward_sets_every_limit():
    cache = _cache(rows=2, seq=8, rollback=3)
    cache.commit(cache.begin(3))
    assert cache.lengths.tolist() == [3, 3] and cache.rollback_limit.tolist() == [3, 3]
    cache.commit(cache.begin(4))  # longer than max_rollback: nothing can be undone
    assert cache.lengths.tolist() == [7, 7] and cache.rollback_limit.tolist() == [0, 0]
    cache.commit(cache.begin(1, rows=torch.tensor([1])))
    assert cache.lengths.tolist() == [7, 8] and cache.rollback_limit.tolist() == [0, 1]


def test_rollback_without_recurrent_layers_may_undo_any_kept_token():
    """An attention-only model has no history to bound a rollback: any n up to the length is allowed and the
    limit goes to max(limit - n, 0)."""
    config = CONFIG.replace(pattern="*E*", mtp_pattern="*")
    cache = HybridCache(config, 2, 10, max_rollback=2)
    cache.commit(cache.begin(5))
    cache.commit(cache.begin(2))
    cache.rollback([4, 1])
    assert cache.lengths.tolist() == [3, 6] and cache.rollback_limit.tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"^cannot roll back \[0, 7\] tokens from rows of lengths \[3, 6\]$"):
        cache.rollback([0, 7])
    with pytest.raises(ValueError, match=r"^cannot roll back \[-1\] tokens from rows of lengths \[3\]$"):
        cache.rollback([-1], rows=[0])
    cache.rollback([3], rows=[0], check=False)
    assert cache.lengths.tolist() == [0, 6]


def test_refused_rollback_names_the_history_it_holds():
    cache = _cache(rows=2, seq=10, rollback=2)
    cache.commit(cache.begin(5))
    cache.commit(cache.begin(2))
    with pytest.raises(ValueError, match=r"^rollback of \[3, 0\] tokens exceeds what the recurrent history holds "
                                         r"\(\[2, 2\]: the tokens of each row's last forward of at most "
                                         r"max_rollback=2 tokens\); build the cache with a larger max_rollback$"):
        cache.rollback([3, 0])
    with pytest.raises(ValueError, match=r"^rollback of \[3\] tokens"):
        cache.rollback(3, rows=[1])  # one count for the listed rows
    cache.rollback(1, rows=[1])
    assert cache.lengths.tolist() == [7, 6]


def test_construction_slots_and_reset():
    for kw, msg in [(dict(rows=0), r"^a cache needs rows > 0 and max_seq_len > 0, got rows=0, max_seq_len=4$"),
                    (dict(seq=0), r"^a cache needs rows > 0 and max_seq_len > 0, got rows=2, max_seq_len=0$"),
                    (dict(rollback=-1), r"^max_rollback must be >= 0, got -1$")]:
        with pytest.raises(ValueError, match=msg):
            _cache(**{"rows": 2, "seq": 4, **kw})
    cache = _cache(rows=2, seq=5, rollback=1, dtype=torch.bfloat16, device="cpu")
    assert cache.device == torch.device("cpu") and cache.max_rollback == 1 and cache.include_mtp
    assert cache.kinds == KINDS and len(cache.states) == len(KINDS) and cache.in_use == [False, False]
    assert cache.state(ATT, "key").dtype == torch.bfloat16 and cache.state(MAMBA, "conv").dtype == torch.bfloat16
    assert cache.state(MAMBA, "ssm").dtype == torch.float32
    assert cache.state(ATT, "key").shape == (2, CONFIG.num_key_value_heads, 5, CONFIG.head_dim)
    assert cache.state(MAMBA, "ssm").shape == (2, CONFIG.mamba_num_heads, CONFIG.mamba_head_dim, CONFIG.ssm_state_size)
    assert set(cache.history[ATT]) == set() and set(cache.history[MAMBA]) == {"conv", "ssm"}
    assert cache.history[MAMBA]["conv"].shape == (2, 2, CONFIG.mamba_conv_dim, CONFIG.conv_kernel - 1)
    assert cache.history[MAMBA]["conv"].dtype == torch.bfloat16
    assert all(not t.any() for d in cache.states + cache.history for t in d.values())
    assert cache.lengths.dtype == cache.rollback_limit.dtype == torch.long
    assert _cache(rows=2).history[MAMBA] == {}
    no_mtp = _cache(rows=1, seq=1, include_mtp=False)  # one token of capacity is a cache too
    assert len(no_mtp.states) == len(CONFIG.pattern) and no_mtp.kinds == list(CONFIG.pattern)
    assert no_mtp.begin(1).t == 1
    with pytest.raises(IndexError, match=r"^cache row 2 out of range \[0, 2\)$"):
        cache.free(2)
    with pytest.raises(IndexError, match=r"^cache row -1 out of range \[0, 2\)$"):
        cache.free(-1)
    assert cache.allocate() == 0
    cache.lengths[0] = 4
    cache.state(MAMBA, "ssm")[0] = 2.0
    assert cache.allocate() == 1  # resets row 1 only
    assert cache.lengths.tolist() == [4, 0] and bool((cache.state(MAMBA, "ssm")[0] == 2).all())
    with pytest.raises(RuntimeError, match=r"^all 2 cache rows are in use; free\(\) one or build a larger "):
        cache.allocate()
    cache.free(0)
    assert cache.in_use == [False, True]
    for d in cache.states:
        for t in d.values():
            t.fill_(3.0)
    cache.lengths.fill_(4)
    cache.rollback_limit.fill_(1)
    cache.reset([1])  # recurrent states zeroed, sequence states kept (never read past the length)
    assert cache.lengths.tolist() == [4, 0] and cache.rollback_limit.tolist() == [1, 0]
    assert not cache.state(MAMBA, "ssm")[1].any() and bool((cache.state(MAMBA, "ssm")[0] == 3).all())
    assert not cache.state(MAMBA, "conv")[1].any() and bool((cache.state(ATT, "key") == 3).all())
    cache.reset([])  # no rows: nothing to do
    assert cache.lengths.tolist() == [4, 0] and bool((cache.state(MAMBA, "ssm")[0] == 3).all())
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and cache.rollback_limit.tolist() == [0, 0]
    assert not cache.state(MAMBA, "ssm").any() and not cache.state(2, "conv").any()


def test_sizes_by_hand_for_other_dtypes_and_mtp_depths():
    """bf16 model states with fp32 or bf16 SSM, two MTP modules or none, a rollback ring: bytes counted by hand."""
    c = CONFIG.replace(num_nextn_predict_layers=2)
    assert cache_layer_kinds(c) == list(c.pattern) + list(c.mtp_pattern) * 2
    assert cache_layer_kinds(c, include_mtp=False) == list(c.pattern)
    assert len(layer_specs(c, 8)) == 11 and len(layer_specs(c, 8, include_mtp=False)) == 7
    n_attn, n_mamba = 1 + 2, 3  # MEM*EME + 2 x *E
    kv_tok = 2 * c.num_key_value_heads * c.head_dim * 2 * n_attn  # bf16
    conv, ssm = c.mamba_conv_dim * (c.conv_kernel - 1) * 2, c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size
    for ssm_dtype, ssm_bytes in ((None, 4), (torch.bfloat16, 2), (torch.float32, 4)):
        size = cache_size(c, rows=3, seq_len=7, dtype=torch.bfloat16, ssm_dtype=ssm_dtype, max_rollback=2)
        rec = (conv + ssm * ssm_bytes) * n_mamba
        assert (size.kv_per_token, size.sequence, size.kv) == (kv_tok, kv_tok * 21, kv_tok * 21)
        assert (size.recurrent, size.history, size.state_per_row) == (rec * 3, rec * 9, rec * 4)
        assert (size.rows, size.seq_len, size.total) == (3, 7, kv_tok * 21 + rec * 12)
        assert size.per_token == size.total / 21
        cache = HybridCache(c, 3, 7, dtype=torch.bfloat16, ssm_dtype=ssm_dtype, max_rollback=2)
        assert cache.nbytes == size.total and cache.size() == size
        assert all(type(getattr(size, f)) is int for f in ("sequence", "recurrent", "history", "kv_per_token",
                                                           "state_per_row", "total"))
    one = cache_size(c, rows=2, seq_len=5, max_rollback=1)
    assert one.history == (conv * 2 + ssm * 4) * n_mamba * 2 * 2 == HybridCache(c, 2, 5, max_rollback=1).nbytes - (
        one.sequence + one.recurrent)
    no_mtp = cache_size(c, rows=1, seq_len=4, include_mtp=False)
    assert no_mtp.kv_per_token == 2 * c.num_key_value_heads * c.head_dim * 4 * 1 and no_mtp.history == 0
    assert HybridCache(c, 1, 4, include_mtp=False).size() == no_mtp


def _model():
    torch.manual_seed(0)
    m = nemotron3.HybridLM(CONFIG).eval()
    randomize_(m, 0)
    return m


@torch.no_grad()
def test_prefix_and_swap_rows_against_the_full_forward():
    """A prefix view decoded alone updates the whole cache's first rows only; swapped rows continue each other's
    sequences. Reference: the full forward (no cache) of each row's tokens."""
    model = _model()
    V = CONFIG.vocab_size
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(5))
    cache = HybridCache(CONFIG, 3, 16, max_rollback=2, include_mtp=False)
    cache.allocate()
    model(ids[:, :6], valid=torch.tensor([6, 4, 5]), cache=cache)
    kept = [ids[0, :6], ids[1, :4], ids[2, :5]]
    with pytest.raises(ValueError, match=r"^a prefix needs 0 < n <= rows=3, got 0$"):
        cache.prefix(0)
    with pytest.raises(ValueError, match=r"^a prefix needs 0 < n <= rows=3, got 4$"):
        cache.prefix(4)
    assert cache.prefix(3).rows == 3 and cache.prefix(1).lengths.tolist() == [6]
    pre = cache.prefix(2)
    assert pre.rows == 2 and pre.in_use == [True, False] and pre.lengths.tolist() == [6, 4]
    assert pre._all_rows().tolist() == [0, 1] and cache._all_rows().tolist() == [0, 1, 2]
    before2 = [t[2].clone() for d in cache.states for t in d.values()]
    nxt = torch.tensor([[3], [4]])
    got = model(nxt, cache=pre)[:, 0]  # (2, V)
    assert cache.lengths.tolist() == [7, 5, 5] and cache.rollback_limit.tolist() == [1, 1, 0]
    assert all(torch.equal(a, t[2]) for a, t in zip(before2, [t for d in cache.states for t in d.values()]))
    for b in range(2):
        kept[b] = torch.cat([kept[b], nxt[b]])
        torch.testing.assert_close(got[b], model(kept[b][None])[0, -1], atol=1e-4, rtol=0)
    pre.rollback([1, 0])  # the prefix's history is the cache's: row 0 back to 6 tokens
    kept[0] = kept[0][:-1]
    assert cache.lengths.tolist() == [6, 5, 5] and cache.rollback_limit.tolist() == [0, 1, 0]
    cache.swap_rows(0, 2)
    cache.swap_rows(1, 1)
    with pytest.raises(IndexError, match=r"^cache row 3 out of range \[0, 3\)$"):
        cache.swap_rows(0, 3)
    with pytest.raises(IndexError, match=r"^cache row -1 out of range \[0, 3\)$"):
        cache.swap_rows(-1, 0)
    kept = [kept[2], kept[1], kept[0]]
    assert cache.lengths.tolist() == [5, 5, 6] and cache.rollback_limit.tolist() == [0, 1, 0]
    assert cache.in_use == [False, False, True]
    nxt = torch.tensor([[1], [2], [5]])
    got = model(nxt, cache=cache)[:, 0]
    for b in range(3):
        torch.testing.assert_close(got[b], model(torch.cat([kept[b], nxt[b]])[None])[0, -1], atol=1e-4, rtol=0)
    kept = [torch.cat([k, n]) for k, n in zip(kept, nxt)]
    cache.rollback([1, 1, 1])  # the swapped history slots follow their rows
    cache.swap_rows(2, 1)
    kept = [kept[0][:-1], kept[2][:-1], kept[1][:-1]]
    got = model(nxt, cache=cache)[:, 0]
    for b in range(3):
        torch.testing.assert_close(got[b], model(torch.cat([kept[b], nxt[b]])[None])[0, -1], atol=1e-4, rtol=0)


def test_swap_rows_copies_sequence_entries_up_to_the_longer_length_only():
    cache = _cache(rows=3, seq=8)
    key = cache.state(ATT, "key")
    key.copy_(torch.arange(3.0)[:, None, None, None].expand_as(key))
    cache.lengths[:] = torch.tensor([3, 0, 2])
    cache.swap_rows(2, 0)
    assert key[:, 0, :, 0].tolist() == [[2.0] * 3 + [0.0] * 5, [1.0] * 8, [0.0] * 3 + [2.0] * 5]
    assert cache.lengths.tolist() == [2, 0, 3]
    empty = _cache(rows=2, seq=4)
    empty.state(ATT, "key")[1] = 1.0
    empty.swap_rows(0, 1)  # both rows empty: no entry is read, none is moved
    assert not empty.state(ATT, "key")[0].any()


def test_only_an_unchecked_full_count_tensor_takes_the_fast_rollback():
    """A checked rollback given one count per row as a tensor is still checked; an unchecked one over listed rows
    follows the listed order; an unchecked 0-dim count with rows never recorded moves nothing (the fast path would
    copy their stale slot back)."""
    cache = _cache(rows=2, seq=10, rollback=2)
    ssm = cache.state(MAMBA, "ssm")
    cache.commit(cache.begin(5))  # not recorded: the history slots are stale (zeros)
    ssm.fill_(1.0)
    with pytest.raises(ValueError, match=r"^rollback of \[1, 0\] tokens exceeds"):
        cache.rollback(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"^cannot roll back \[-1, 0\] tokens"):
        cache.rollback(torch.tensor([-1, 0]))
    cache.rollback(torch.tensor(0), check=False)
    assert bool((ssm == 1).all()) and cache.lengths.tolist() == [5, 5]
    view = cache.begin(2)  # recorded: slot j holds the state after token j - 1, here 10 * (j + 1) + row
    hist = cache.history[MAMBA]["ssm"]
    for j in range(3):
        hist[j] = torch.tensor([10.0 * (j + 1), 10.0 * (j + 1) + 1])[:, None, None, None]
    cache.commit(view)
    cache.rollback(torch.tensor([2, 1]), rows=[1, 0], check=False)  # row 1 back 2 tokens, row 0 back 1
    assert cache.lengths.tolist() == [6, 5] and cache.rollback_limit.tolist() == [1, 0]
    assert ssm[:, 0, 0, 0].tolist() == [20.0, 11.0]
