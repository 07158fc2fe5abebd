"""StateSpec: what one mixer remembers per sequence while it decodes, declared by the mixer itself.

Each mixer class states its decode-time memory for one row as named tensors (`Mixer.state_spec(config,
max_len)`); the cache (engine/cache.py) allocates `rows` of each and is the only code that indexes,
records or rolls them back. Two kinds:

    "recurrent"  a fixed-size state replaced after every token (Mamba-2's conv window and SSM state); it
                 cannot be run backwards, so speculative decoding keeps a ring of recent copies
    "sequence"   one entry per position, at dimension 1 of the per-row shape (attention's keys and
                 values); undoing n positions is only a shorter length

`dtype` is a role, not a torch dtype: "model" (the activations' dtype) or "ssm" (the config's
`mamba_ssm_cache_dtype`, fp32 by default: a running sum over the whole sequence).

The mixers read and write their state through a per-layer handle of one cached forward (`LayerCache` in
engine/cache.py), duck-typed here so that model/ does not import engine/:

    read(name)            -> the forward's rows of the state (the stored tensor itself when the forward
                             covers every row in order, so that updates may be in place)
    write(name, value)    store the rows' new state (nothing to do if `value` is the stored tensor)
    append(name, new)     write (b, t, ...) new entries of a sequence state at the rows' positions and
                          return the rows' entries up to the last position written, (b, ..., L, ...)
    record(j, **states)   the recurrent states reached after token j (b,) of each row, for rollback
    positions (b, t), last (b,), valid (b,) | None, t, per_step, recording
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class StateSpec:
    """One named per-row state tensor of a mixer: its shape without the row dimension, dtype role, kind."""

    shape: tuple[int, ...]
    dtype: Literal["model", "ssm"] = "model"
    kind: Literal["recurrent", "sequence"] = "recurrent"

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n
