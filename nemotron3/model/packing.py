"""How the fast decoder's fused steps hold and multiply their weight matrices: fp32, bf16, or packed (int8).

Every step multiplies activations x (N, in) by weights stored as an (in, out) operand of `torch.mm`. The layout
is chosen per dtype for the kernel torch picks on a CPU:

* fp32: a contiguous (in, out) copy, MKL's fastest GEMV and GEMM layout here (docs/inference.md §3);
* bf16: the transposed *view* of contiguous (out, in) rows, no copy. At one row (N = 1) with oneDNN switched
  off (`gemv_only`), torch's bf16 matmul runs its reduced-precision GEMV (dot products over the rows, fp32
  accumulation, docs/inference.md §6), whose per-call cost is a fraction of oneDNN's; from two rows oneDNN's
  bf16 GEMM wins and reads the same view;
* `pack(w)`: any object with `mm(x) -> x · wᵀ` (quant/int8.py's per-channel int8 weights, for example): the
  steps call it through `mm` / `addmm` below and never look inside.

`pack=None` everywhere means: dense, in the weight's own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Packer = Callable[[torch.Tensor], object]


def pack_weight(w: torch.Tensor, pack: Packer | None = None, dtype: torch.dtype | None = None) -> object:
    """w (out, in) -> the operand `mm(x, ·)` multiplies by: x · wᵀ. `dtype` casts first (folded weights are
    computed in fp32 and rounded once)."""
    w = w if dtype is None else w.to(dtype)
    if pack is not None:
        return pack(w)
    if w.dtype == torch.float32:
        return w.t().contiguous()
    return w.contiguous().t()


def mm(x: torch.Tensor, w: object) -> torch.Tensor:
    """x (N, in) · wᵀ for a weight made by `pack_weight`."""
    return torch.mm(x, w) if isinstance(w, torch.Tensor) else w.mm(x)


def addmm(h: torch.Tensor, x: torch.Tensor, w: object) -> torch.Tensor:
    """h + x · wᵀ (the residual add folded into the GEMM when the weight is a plain tensor)."""
    return torch.addmm(h, x, w) if isinstance(w, torch.Tensor) else torch.add(h, w.mm(x))


def nbytes(w: object) -> int:
    """Bytes of a packed weight (a tensor, or an object with `nbytes`)."""
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else int(w.nbytes)


@contextmanager
def gemv_only(enabled: bool) -> Iterator[None]:
    """While active, and `enabled`: oneDNN off, so that one-row bf16 matmuls on a CPU take torch's own GEMV.

    The switch is process-wide (torch has no per-thread one): a matmul of another thread in the meantime runs
    without oneDNN too, which changes its speed, never its result's meaning.
    """
    if not enabled:
        yield
        return
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
