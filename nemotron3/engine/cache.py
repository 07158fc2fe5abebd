"""HybridCache: everything a Nemotron 3 model remembers about the sequences it is decoding.

Two kinds of memory, one per mixer kind (docs/architecture.md §2-3; the design: docs/inference.md §1):

    '*' attention    key and value of every past token        (rows, kv_heads, max_seq_len, head_dim)
    'M' Mamba-2      the last conv_kernel-1 conv inputs         (rows, conv_dim, conv_kernel - 1)
                     the SSM state S (one P×N matrix per head)  (rows, heads, head_dim, state_size)

The attention part grows with the sequence, the Mamba part does not: that is why the family reaches 1M
tokens. `cache_size(config, ...)` computes every byte without allocating anything (for Nano and Super at
1M tokens), and `HybridCache.nbytes` is the same number for a cache that exists. The SSM state is kept in
`config.mamba_ssm_cache_dtype` (fp32 by default, as in transformers and vLLM): it is a running sum over
the whole sequence, and bf16 rounding would accumulate step after step. The conv state and the KV are in
the model's dtype. `MoE` and MLP layers keep nothing. When the model has an MTP block, its attention
layers get KV slots too (layer indices after the backbone's), so that the drafter can run incrementally.

Rows, lengths and slots
-----------------------
The cache has a fixed number of rows (slots). Each row holds one sequence and its own length, so rows
can be at different positions (batched prompts of different lengths, continuous batching). A slot is
taken with `allocate()` and given back with `free()`; `reset(rows)` zeroes the Mamba states (a fresh
sequence starts from S = 0 and zero conv padding) and sets the lengths to 0. Keys and values past a row's
length are never read, so they are not cleared.

Rollback (speculative decoding)
-------------------------------
Verifying k drafted tokens appends them all, then keeps only the accepted prefix. For attention, undoing
n positions is just `length -= n`. A Mamba state cannot be run backwards, so there are two options:
keep the states of the last steps, or keep one snapshot and recompute the accepted tokens. We keep the
states: with `max_rollback = R > 0`, every Mamba layer has a ring of R+1 (conv, SSM) states indexed by
position mod (R+1), and every cached step with at most R+1 tokens per row runs token by token and writes
the state after each token into the ring (vLLM's and SGLang's choice as well; it costs R+1 copies of the
constant-size state and one copy per token, and no second forward pass). A longer forward (prefill)
records only its final state, so a row can be rolled back by at most `rollback_limit[row]` positions:
the number of positions recorded one by one since its last prefill, capped at R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemotron3.config import ModelConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_layer_kinds(config: ModelConfig, include_mtp: bool = True) -> list[str]:
    """One character per cache layer index: the backbone pattern, then each MTP module's pattern."""
    kinds = list(config.pattern)
    if include_mtp:
        kinds += list(config.mtp_pattern) * config.num_nextn_predict_layers
    return kinds


@dataclass(frozen=True)
class CacheSize:
    """Bytes of a cache, by part. `per_token` is the total divided by the tokens per row it holds."""

    kv: int  # all attention keys and values
    conv: int  # all Mamba conv states
    ssm: int  # all Mamba SSM states
    history: int  # rollback rings (0 unless max_rollback > 0)
    kv_per_token: int  # what one more token of one row adds
    state_per_row: int  # constant per row: conv + SSM (+ history)
    rows: int
    seq_len: int

    @property
    def total(self) -> int:
        return self.kv + self.conv + self.ssm + self.history

    @property
    def per_token(self) -> float:
        return self.total / (self.rows * self.seq_len)


def cache_size(
    config: ModelConfig,
    rows: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    ssm_dtype: torch.dtype | None = None,
    max_rollback: int = 0,
    include_mtp: bool = True,
) -> CacheSize:
    """The bytes `HybridCache(config, rows, seq_len, ...)` allocates, computed without allocating."""
    ssm_dtype = ssm_dtype or _DTYPES[config.mamba_ssm_cache_dtype]
    kinds = cache_layer_kinds(config, include_mtp)
    n_attn, n_mamba = kinds.count("*"), kinds.count("M")
    e, es = torch.finfo(dtype).bits // 8, torch.finfo(ssm_dtype).bits // 8
    kv_tok = 2 * config.num_key_value_heads * config.head_dim * e * n_attn
    conv_row = config.mamba_conv_dim * (config.conv_kernel - 1) * e * n_mamba
    ssm_row = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * es * n_mamba
    hist_row = (conv_row + ssm_row) * (max_rollback + 1) if max_rollback > 0 else 0
    return CacheSize(
        kv=kv_tok * rows * seq_len, conv=conv_row * rows, ssm=ssm_row * rows, history=hist_row * rows,
        kv_per_token=kv_tok, state_per_row=conv_row + ssm_row + hist_row, rows=rows, seq_len=seq_len,
    )


@dataclass
class CacheView:
    """One cached forward over `b` rows of a cache, `t` tokens per row (the last t - valid[i] are padding).

    Built by `HybridCache.begin` and read by the layers' cached paths (duck-typed there, so that model/
    does not import engine/). `rows` is None when the forward covers every row in order, which lets the
    layers update the state tensors in place instead of gathering and scattering rows.
    """

    cache: HybridCache
    rows: torch.Tensor | None  # (b,) cache rows, or None for all rows
    index: torch.Tensor  # (b,) cache rows, always a tensor
    start: torch.Tensor  # (b,) each row's length before this forward = position of its first new token
    valid: torch.Tensor | None  # (b,) real tokens per row, None if all t are real
    t: int
    per_step: bool  # Mamba layers run token by token and record every state (rollback)

    @property
    def positions(self) -> torch.Tensor:
        """(b, t) absolute position of every new token."""
        return self.start[:, None] + torch.arange(self.t, device=self.start.device)

    @property
    def last(self) -> torch.Tensor:
        """(b,) index in [0, t) of each row's last real token."""
        return (self.valid - 1) if self.valid is not None else torch.full_like(self.start, self.t - 1)


class HybridCache:
    """Preallocated per-layer state for `rows` sequences of up to `max_seq_len` tokens each.

    key[i], value[i]: (rows, kv_heads, max_seq_len, head_dim)  for attention layer i
    conv[i]:          (rows, conv_dim, conv_kernel - 1)        for Mamba layer i
    ssm[i]:           (rows, heads, head_dim, state_size)      for Mamba layer i
    lengths:          (rows,) int64, tokens held by each row
    """

    def __init__(
        self,
        config: ModelConfig,
        rows: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        ssm_dtype: torch.dtype | None = None,
        max_rollback: int = 0,
        include_mtp: bool = True,
    ) -> None:
        if rows <= 0 or max_seq_len <= 0:
            raise ValueError(f"a cache needs rows > 0 and max_seq_len > 0, got rows={rows}, max_seq_len={max_seq_len}")
        if max_rollback < 0:
            raise ValueError(f"max_rollback must be >= 0, got {max_rollback}")
        self.config = config
        self.rows = rows
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.ssm_dtype = ssm_dtype or _DTYPES[config.mamba_ssm_cache_dtype]
        self.device = torch.device(device)
        self.max_rollback = max_rollback
        self.kinds = cache_layer_kinds(config, include_mtp)
        c = config
        self.key: dict[int, torch.Tensor] = {}
        self.value: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.conv_hist: dict[int, torch.Tensor] = {}
        self.ssm_hist: dict[int, torch.Tensor] = {}
        kw = dict(dtype=dtype, device=self.device)
        ssm_kw = dict(dtype=self.ssm_dtype, device=self.device)
        for i, kind in enumerate(self.kinds):
            if kind == "*":  # zeros, not empty: masked-out garbage must never be NaN (0 · NaN = NaN)
                self.key[i] = torch.zeros(rows, c.num_key_value_heads, max_seq_len, c.head_dim, **kw)
                self.value[i] = torch.zeros_like(self.key[i])
            elif kind == "M":
                self.conv[i] = torch.zeros(rows, c.mamba_conv_dim, c.conv_kernel - 1, **kw)
                self.ssm[i] = torch.zeros(rows, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, **ssm_kw)
                if max_rollback:
                    self.conv_hist[i] = torch.zeros(max_rollback + 1, *self.conv[i].shape, **kw)
                    self.ssm_hist[i] = torch.zeros(max_rollback + 1, *self.ssm[i].shape, **ssm_kw)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.rollback_limit = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.in_use = [False] * rows

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (lengths and bookkeeping excluded)."""
        parts = [self.key, self.value, self.conv, self.ssm, self.conv_hist, self.ssm_hist]
        return sum(t.numel() * t.element_size() for d in parts for t in d.values())

    def size(self) -> CacheSize:
        return cache_size(self.config, self.rows, self.max_seq_len, self.dtype, self.ssm_dtype, self.max_rollback,
                          include_mtp=len(self.kinds) > len(self.config.pattern))

    # ------------------------------------------------------------------ slots
    def allocate(self) -> int:
        """Take a free row, reset it, and return its index."""
        for r, used in enumerate(self.in_use):
            if not used:
                self.in_use[r] = True
                self.reset([r])
                return r
        raise RuntimeError(f"all {self.rows} cache rows are in use; free() one or build a larger HybridCache")

    def free(self, row: int) -> None:
        if not 0 <= row < self.rows:
            raise IndexError(f"cache row {row} out of range [0, {self.rows})")
        self.in_use[row] = False

    def reset(self, rows: list[int] | torch.Tensor | None = None) -> None:
        """Start fresh sequences in `rows` (all rows if None): zero Mamba states, length 0."""
        idx = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for d in (self.conv, self.ssm):
            for t in d.values():
                t[idx] = 0
        self.lengths[idx] = 0
        self.rollback_limit[idx] = 0

    # ------------------------------------------------------------------ one forward
    def begin(
        self,
        t: int,
        rows: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ) -> CacheView:
        """Check that `t` more tokens fit in `rows` and describe the forward for the layers.

        `start` overrides the rows' lengths as the positions of the first new tokens: the MTP drafter
        keeps its own positions for the MTP layers' slots (engine/speculative.py) and never commits.
        """
        index = torch.arange(self.rows, device=self.device) if rows is None else rows.to(self.device)
        if (rows is not None and rows.numel() == self.rows
                and torch.equal(index, torch.arange(self.rows, device=self.device))):
            rows = None  # all rows in order: the layers may work in place
        start = self.lengths[index] if start is None else start.to(device=self.device, dtype=torch.long)
        if t <= 0:
            raise ValueError("a cached forward needs at least one token per row")
        if int(start.max()) + t > self.max_seq_len:
            raise ValueError(
                f"{t} more tokens do not fit: a row holds {int(start.max())} of max_seq_len={self.max_seq_len}; "
                "build the cache (or the Engine) with a larger max_seq_len"
            )
        if valid is not None:
            valid = valid.to(device=self.device, dtype=torch.long)
            if valid.shape != index.shape or (valid < 1).any() or (valid > t).any():
                raise ValueError(f"valid must hold one count in [1, {t}] per row, got {valid.tolist()}")
            if bool((valid == t).all()):
                valid = None
        per_step = self.max_rollback > 0 and t <= self.max_rollback + 1
        return CacheView(self, rows, index, start, valid, t, per_step)

    def commit(self, view: CacheView) -> None:
        """Advance the rows' lengths after every layer has run the forward `view` describes."""
        n = view.valid if view.valid is not None else torch.full_like(view.start, view.t)
        self.lengths[view.index] = view.start + n
        if view.per_step:
            self.rollback_limit[view.index] = torch.clamp(self.rollback_limit[view.index] + n, max=self.max_rollback)
        else:
            self.rollback_limit[view.index] = 0

    # ------------------------------------------------------------------ rollback
    def record(
        self, layer: int, rows: torch.Tensor | None, positions: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor
    ) -> None:
        """Store the states (b, ...) reached after token `positions` (b,) of `rows` in the layer's ring."""
        if not self.max_rollback:
            return
        index = torch.arange(self.rows, device=self.device) if rows is None else rows
        slot = positions % (self.max_rollback + 1)
        self.conv_hist[layer][slot, index] = conv.to(self.dtype)
        self.ssm_hist[layer][slot, index] = ssm.to(self.ssm_dtype)

    def rollback(self, n: list[int] | torch.Tensor, rows: list[int] | torch.Tensor | None = None) -> None:
        """Forget the last n[i] tokens of row rows[i] (all rows in order if None); n may be 0."""
        dev = self.device
        index = torch.arange(self.rows, device=dev) if rows is None else torch.as_tensor(rows, device=dev)
        n = torch.as_tensor(n, dtype=torch.long, device=dev).expand(index.shape)
        if (n < 0).any() or (n > self.lengths[index]).any():
            raise ValueError(
                f"cannot roll back {n.tolist()} tokens from rows of lengths {self.lengths[index].tolist()}")
        if self.conv and (n > self.rollback_limit[index]).any():
            raise ValueError(
                f"rollback of {n.tolist()} tokens exceeds what the Mamba history holds "
                f"({self.rollback_limit[index].tolist()}); build the cache with a larger max_rollback, and decode "
                "the tokens to undo in steps of at most max_rollback + 1 tokens"
            )
        moved = n > 0
        if self.conv and moved.any():
            moved_rows, moved_n = index[moved], n[moved]
            slot = (self.lengths[moved_rows] - 1 - moved_n) % (self.max_rollback + 1)
            for i in self.conv:
                self.conv[i][moved_rows] = self.conv_hist[i][slot, moved_rows]
                self.ssm[i][moved_rows] = self.ssm_hist[i][slot, moved_rows]
        self.lengths[index] -= n
        self.rollback_limit[index] -= torch.minimum(n, self.rollback_limit[index])
