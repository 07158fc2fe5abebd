"""Activation checkpointing: a block keeps only its input during the forward and recomputes the rest in backward.

A training forward saves, for every layer, the tensors its backward needs: with T tokens per row these grow as
T · (width of every intermediate), and at long context they dominate memory. `checkpointed(fn, x)` runs
`fn(x)` under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: nothing inside `fn` is saved, and the
first time backward needs one of those tensors it re-runs `fn` on the kept input (one more forward per block,
about a third more compute). The recomputed tensors are those of the first run: `fn` is deterministic (the only
randomness of a training step, NVFP4's stochastic rounding, happens in backward), and torch restores the global
RNG state before recomputing anyway; gradients are therefore the same numbers (tests/model/test_activation_
checkpointing.py).

A recompute is not a forward of the model. Whatever watches forwards (the expert-balance hooks of
train/balance.py count routed tokens and build the aux loss from the router scores) must see each forward once,
and torch requires the recompute to save exactly the tensors the forward saved: so Block runs its mixer's
`forward` inside the region, past its hooks, and calls the forward hooks itself after the region (model/block.py).
The recompute runs under `recomputing()` = True, when MoE keeps no router scores (no hook is there to read and
drop them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch.utils.checkpoint import checkpoint

_RECOMPUTING: ContextVar[bool] = ContextVar("nemotron3_recomputing", default=False)


def recomputing() -> bool:
    """True while a checkpointed function is being re-run for backward."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def _recompute() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recompute()


def checkpointed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn(x)`, saving only `x` for backward (non-reentrant checkpoint; `recomputing()` is True on the re-run)."""
    return checkpoint(fn, x, use_reentrant=False, context_fn=_contexts)
