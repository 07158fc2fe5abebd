"""HybridCache: every per-row state a Nemotron 3 model keeps while decoding (docs/inference.md §1).

Each mixer declares its state (model/state.py `state_spec`: attention keys and values grow with the sequence, the
Mamba conv and SSM states do not); the cache allocates `rows` of each per layer, MTP layers included, and sizes
it without allocating (`cache_size`). Rows are slots with lengths of their own; `begin` / `begin_all` describe one
cached forward, `commit` advances it; `rollback` restores the recurrent states recorded token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemotron3.config import ModelConfig
from nemotron3.model.block import state_spec
from nemotron3.model.state import StateSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_layer_kinds(config: ModelConfig, include_mtp: bool = True) -> list[str]:
    """One character per cache layer index: the backbone pattern, then each MTP module's pattern."""
    kinds = list(config.pattern)
    if include_mtp:
        kinds += list(config.mtp_pattern) * config.num_nextn_predict_layers
    return kinds


def layer_specs(config: ModelConfig, max_seq_len: int, include_mtp: bool = True) -> list[dict[str, StateSpec]]:
    """Every cache layer's declared state, in cache-layer order."""
    return [state_spec(kind, config, max_seq_len) for kind in cache_layer_kinds(config, include_mtp)]


@dataclass(frozen=True)
class CacheSize:
    """Bytes of a cache, by part. `per_token` is the total divided by the tokens per row it holds."""

    sequence: int  # all sequence states (attention keys and values)
    recurrent: int  # all recurrent states (Mamba conv and SSM)
    history: int  # rollback rings (0 unless max_rollback > 0)
    kv_per_token: int  # what one more token of one row adds
    state_per_row: int  # constant per row: recurrent (+ history)
    rows: int
    seq_len: int

    @property
    def kv(self) -> int:
        return self.sequence

    @property
    def total(self) -> int:
        return self.sequence + self.recurrent + self.history

    @property
    def per_token(self) -> float:
        return self.total / (self.rows * self.seq_len)


def cache_size(config: ModelConfig, rows: int, seq_len: int, dtype: torch.dtype = torch.float32,
               ssm_dtype: torch.dtype | None = None, max_rollback: int = 0, include_mtp: bool = True) -> CacheSize:
    """The bytes `HybridCache(config, rows, seq_len, ...)` allocates, computed without allocating."""
    ssm_dtype = ssm_dtype or _DTYPES[config.mamba_ssm_cache_dtype]
    size = {"model": torch.finfo(dtype).bits // 8, "ssm": torch.finfo(ssm_dtype).bits // 8}
    seq_tok = rec_row = 0
    for specs in layer_specs(config, seq_len, include_mtp):
        for spec in specs.values():
            if spec.kind == "sequence":
                seq_tok += spec.numel() // seq_len * size[spec.dtype]
            else:
                rec_row += spec.numel() * size[spec.dtype]
    hist_row = rec_row * (max_rollback + 1) if max_rollback > 0 else 0
    return CacheSize(sequence=seq_tok * rows * seq_len, recurrent=rec_row * rows, history=hist_row * rows,
                     kv_per_token=seq_tok, state_per_row=rec_row + hist_row, rows=rows, seq_len=seq_len)


@dataclass
class CacheView:
    """One cached forward over `b` rows of a cache, `t` tokens per row (the last t - valid[i] are padding);
    `layer(i)` is layer i's handle. `rows` None: every row in order, so the layers update the states in place."""

    cache: HybridCache
    rows: torch.Tensor | None  # (b,) cache rows, or None for all rows
    index: torch.Tensor  # (b,) cache rows, always a tensor
    start: torch.Tensor  # (b,) each row's length before this forward = position of its first new token
    valid: torch.Tensor | None  # (b,) real tokens per row, None if all t are real
    t: int
    per_step: bool  # recurrent layers run token by token and record every state (rollback)
    n_keys: int | None = None  # attention reads positions < n_keys (default: max position + 1)
    mask: torch.Tensor | None = None  # (b, 1, t, n_keys) attention mask, or None when no row needs one

    @property
    def positions(self) -> torch.Tensor:
        """(b, t) absolute position of every new token."""
        return self.start[:, None] + torch.arange(self.t, device=self.start.device)

    @property
    def last(self) -> torch.Tensor:
        """(b,) index in [0, t) of each row's last real token."""
        return (self.valid - 1) if self.valid is not None else torch.full_like(self.start, self.t - 1)

    @property
    def recording(self) -> bool:
        return self.cache.max_rollback > 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)


class LayerCache:
    """Layer i's part of one cached forward: the method API of model/state.py."""

    __slots__ = ("view", "i", "states")

    def __init__(self, view: CacheView, i: int) -> None:
        self.view, self.i = view, i
        self.states = view.cache.states[i]

    # the forward's geometry, for the mixer
    t = property(lambda self: self.view.t)
    valid = property(lambda self: self.view.valid)
    positions = property(lambda self: self.view.positions)
    last = property(lambda self: self.view.last)
    per_step = property(lambda self: self.view.per_step)
    recording = property(lambda self: self.view.recording)
    start = property(lambda self: self.view.start)
    mask = property(lambda self: self.view.mask)

    @property
    def n_keys(self) -> int:
        v = self.view
        return v.n_keys if v.n_keys is not None else int(v.start.max()) + v.t

    def read(self, name: str) -> torch.Tensor:
        s = self.states[name]
        return s if self.view.rows is None else s[self.view.index]

    def write(self, name: str, value: torch.Tensor) -> None:
        s = self.states[name]
        if value is s:
            return
        if self.view.rows is None:
            s.copy_(value)
        else:
            s[self.view.index] = value.to(s.dtype)

    def append(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """new (b, t, *entry) at positions (b, t) -> the rows' entries [0, n_keys), (b, d1, n_keys, *rest)."""
        s, v = self.states[name], self.view
        n = self.n_keys
        if v.t == 1 and v.rows is None and v.mask is None and v.n_keys is not None:  # every row at length n - 1
            s.select(2, n - 1).copy_(new[:, 0])
        else:
            s[v.index[:, None], :, v.positions] = new.to(s.dtype)  # advanced indices first: (b, t, d1, *rest)
        return s[:, :, :n] if v.rows is None else s[v.index, :, :n]

    def record(self, i: int, **states: torch.Tensor) -> None:
        """Store the recurrent states (b, ...) after token i of this forward (i = -1: before it) in slot i+1."""
        cache, v = self.view.cache, self.view
        if not v.per_step:
            return
        hist = cache.history[self.i]
        for name, value in states.items():
            if v.rows is None:
                hist[name][i + 1].copy_(value)
            else:
                hist[name][i + 1, v.index] = value.to(hist[name].dtype)

    def history(self, name: str) -> torch.Tensor:
        """The history slots (R+1, rows, ...) of a recurrent state, for a forward over every row in order
        (the fast decoder writes slot 0 and slots 1..t itself)."""
        return self.view.cache.history[self.i][name]


class HybridCache:
    """Preallocated per-layer state for `rows` sequences of up to `max_seq_len` tokens each: states[i][name]
    (rows, *spec.shape), history[i][name] (R + 1, rows, ...) for rollback (max_rollback = R > 0), lengths (rows,)."""

    def __init__(self, config: ModelConfig, rows: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", ssm_dtype: torch.dtype | None = None, max_rollback: int = 0,
                 include_mtp: bool = True) -> None:
        if rows <= 0 or max_seq_len <= 0:
            raise ValueError(f"a cache needs rows > 0 and max_seq_len > 0, got rows={rows}, max_seq_len={max_seq_len}")
        if max_rollback < 0:
            raise ValueError(f"max_rollback must be >= 0, got {max_rollback}")
        self.config, self.rows, self.max_seq_len, self.dtype = config, rows, max_seq_len, dtype
        self.ssm_dtype = ssm_dtype or _DTYPES[config.mamba_ssm_cache_dtype]
        self.device, self.max_rollback, self.include_mtp = torch.device(device), max_rollback, include_mtp
        self.kinds = cache_layer_kinds(config, include_mtp)
        dtypes = {"model": dtype, "ssm": self.ssm_dtype}
        self.specs = layer_specs(config, max_seq_len, include_mtp)
        self.states: list[dict[str, torch.Tensor]] = []
        self.history: list[dict[str, torch.Tensor]] = []
        for specs in self.specs:
            # zeros, not empty: masked-out garbage must never be NaN (0 · NaN = NaN)
            self.states.append({name: torch.zeros(rows, *s.shape, dtype=dtypes[s.dtype], device=self.device)
                                for name, s in specs.items()})
            self.history.append({
                name: torch.zeros(max_rollback + 1, rows, *s.shape, dtype=dtypes[s.dtype], device=self.device)
                for name, s in specs.items() if s.kind == "recurrent" and max_rollback})
        self._recurrent = [(i, name) for i, specs in enumerate(self.specs)
                           for name, s in specs.items() if s.kind == "recurrent"]
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.rollback_limit = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.in_use = [False] * rows
        self._arange = torch.arange(rows, device=self.device)  # set here: a lazy attribute recompiles the step

    def state(self, layer: int, name: str) -> torch.Tensor:
        """The stored state `name` of cache layer `layer`, all rows: (rows, *spec.shape)."""
        return self.states[layer][name]

    # ------------------------------------------------------------------ sizes
    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (lengths and bookkeeping excluded)."""
        return sum(t.numel() * t.element_size() for part in (self.states, self.history) for d in part
                   for t in d.values())

    def size(self) -> CacheSize:
        return cache_size(self.config, self.rows, self.max_seq_len, self.dtype, self.ssm_dtype, self.max_rollback,
                          include_mtp=self.include_mtp)

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
        """Start fresh sequences in `rows` (all rows if None): zero recurrent states, length 0."""
        idx = slice(None) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for i, name in self._recurrent:
            self.states[i][name][idx] = 0
        self.lengths[idx] = 0
        self.rollback_limit[idx] = 0

    # ------------------------------------------------------------------ one forward
    def begin(self, t: int, rows: torch.Tensor | None = None, valid: torch.Tensor | None = None,
              start: torch.Tensor | None = None) -> CacheView:
        """Check that `t` more tokens fit in `rows` and describe the forward for the layers. `start` overrides the
        rows' lengths as the first new positions (the MTP drafter's own positions; it never commits)."""
        index = torch.arange(self.rows, device=self.device) if rows is None else rows.to(self.device)
        if (rows is not None and rows.numel() == self.rows
                and torch.equal(index, torch.arange(self.rows, device=self.device))):
            rows = None  # all rows in order: the layers may work in place
        start = self.lengths[index] if start is None else start.to(device=self.device, dtype=torch.long)
        if t <= 0:
            raise ValueError("a cached forward needs at least one token per row")
        if int(start.max()) + t > self.max_seq_len:
            raise ValueError(f"{t} more tokens do not fit: a row holds {int(start.max())} of max_seq_len="
                             f"{self.max_seq_len}; build the cache (or the Engine) with a larger max_seq_len")
        if valid is not None:
            valid = valid.to(device=self.device, dtype=torch.long)
            if valid.shape != index.shape or (valid < 1).any() or (valid > t).any():
                raise ValueError(f"valid must hold one count in [1, {t}] per row, got {valid.tolist()}")
            if bool((valid == t).all()):
                valid = None
        per_step = self.max_rollback > 0 and t <= self.max_rollback
        return CacheView(self, rows, index, start, valid, t, per_step)

    def begin_all(self, t: int, n_keys: int | None, uniform: bool, start: torch.Tensor | None = None) -> CacheView:
        """The fast decoder's forward: every row, t real tokens each, no checks; n_keys and `uniform` as in
        FastDecoder.forward (None: the whole capacity, masked: the compiled step's fixed shapes)."""
        start = self.lengths if start is None else start
        n = self.max_seq_len if n_keys is None else n_keys
        if t > self.max_rollback > 0:
            raise ValueError(f"a recording cache (max_rollback={self.max_rollback}) takes at most that many tokens "
                             f"per fast forward, got {t}")
        view = CacheView(self, None, self._all_rows(), start, None, t, self.max_rollback > 0, n_keys=n)
        if not (uniform and t == 1 and n_keys is not None):
            view.mask = (torch.arange(n, device=self.device) <= view.positions[..., None])[:, None]  # (B, 1, t, n)
        return view

    def _all_rows(self) -> torch.Tensor:
        return self._arange

    def commit(self, view: CacheView) -> None:
        """Advance the rows' lengths after every layer has run the forward `view` describes."""
        n = view.valid if view.valid is not None else view.t
        if view.rows is None and view.valid is None:
            self.lengths += view.t
        else:
            self.lengths[view.index] = view.start + n
        if not view.per_step:
            self.rollback_limit[view.index] = 0
        elif view.rows is None and view.valid is None:
            self.rollback_limit.fill_(view.t)
        else:
            self.rollback_limit[view.index] = n

    def commit_all(self, t: int) -> None:
        """`commit` of a `begin_all(t, ...)` forward done elsewhere (a compiled one): every row advances t."""
        self.lengths += t
        self.rollback_limit.fill_(t if self.max_rollback else 0)

    # ------------------------------------------------------------------ rollback
    def rollback(self, n: list[int] | torch.Tensor, rows: list[int] | torch.Tensor | None = None,
                 check: bool = True) -> None:
        """Forget the last n[i] tokens of row rows[i] (all rows in order if None); n may be 0. `check=False` skips
        the range checks (host syncs) for callers whose n is in range by construction (the speculative round)."""
        dev = self.device
        if rows is None and check is False and isinstance(n, torch.Tensor) and n.shape == (self.rows,):
            slot = self.rollback_limit - n  # (rows,) slot j holds the state after token j-1
            for i, name in self._recurrent:  # rows with n = 0 copy their current slot back: their own state
                self.states[i][name].copy_(self.history[i][name][slot, self._all_rows()])
            self.lengths -= n
            self.rollback_limit -= n
            return
        index = torch.arange(self.rows, device=dev) if rows is None else torch.as_tensor(rows, device=dev)
        n = torch.as_tensor(n, dtype=torch.long, device=dev).expand(index.shape)
        if check and ((n < 0).any() or (n > self.lengths[index]).any()):
            raise ValueError(f"cannot roll back {n.tolist()} tokens from rows of lengths "
                             f"{self.lengths[index].tolist()}")
        if check and self._recurrent and (n > self.rollback_limit[index]).any():
            raise ValueError(f"rollback of {n.tolist()} tokens exceeds what the recurrent history holds "
                             f"({self.rollback_limit[index].tolist()}: the tokens of each row's last forward of at "
                             f"most max_rollback={self.max_rollback} tokens); build the cache with a larger "
                             "max_rollback")
        moved = n > 0
        if self._recurrent and moved.any():
            rows_, slot = index[moved], (self.rollback_limit[index] - n)[moved]  # slot j: after token j-1
            for i, name in self._recurrent:
                self.states[i][name][rows_] = self.history[i][name][slot, rows_]
        self.lengths[index] -= n
        self.rollback_limit[index] -= torch.minimum(n, self.rollback_limit[index])

    # ------------------------------------------------------------------ continuous batching
    def prefix(self, n: int) -> HybridCache:
        """A cache over rows [0, n) of this one sharing its storage (states, history, lengths, limits), so a forward
        over it updates this cache in place and leaves rows >= n alone: the scheduler's decoding prefix."""
        if not 0 < n <= self.rows:
            raise ValueError(f"a prefix needs 0 < n <= rows={self.rows}, got {n}")
        view = object.__new__(HybridCache)
        view.__dict__.update(self.__dict__)
        view.rows = n
        view.states = [{name: s[:n] for name, s in d.items()} for d in self.states]
        view.history = [{name: h[:, :n] for name, h in d.items()} for d in self.history]
        view.lengths, view.rollback_limit = self.lengths[:n], self.rollback_limit[:n]
        view.in_use = self.in_use[:n]  # a copy: slots are allocated on the whole cache, not on a prefix
        view._arange = self._arange[:n]
        return view

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange everything rows a and b hold (states, history, lengths, rollback limits, slot use); sequence
        states up to the longer of the two lengths only."""
        if a == b:
            return
        for r in (a, b):
            if not 0 <= r < self.rows:
                raise IndexError(f"cache row {r} out of range [0, {self.rows})")
        pair, back = torch.tensor([a, b], device=self.device), torch.tensor([b, a], device=self.device)
        m = int(self.lengths[pair].max())
        for specs, states, history in zip(self.specs, self.states, self.history):
            for name, s in states.items():
                if specs[name].kind == "sequence":
                    if m:
                        s[pair, :, :m] = s[back, :, :m]
                else:
                    s[pair] = s[back]
            for h in history.values():
                h[:, pair] = h[:, back]
        self.lengths[pair] = self.lengths[back]
        self.rollback_limit[pair] = self.rollback_limit[back]
        self.in_use[a], self.in_use[b] = self.in_use[b], self.in_use[a]
