"""MXFP8 training for the layers the recipe keeps out of NVFP4 (Mamba out_proj).

Nemotron 3 Super runs its Mamba output projections in MXFP8 rather than NVFP4 (NVFP4
flushed up to 40% of their values to zero on Nano; docs/low-precision.md §5). `MXFP8Linear`
quantizes all six operand copies of the three GEMMs (qlinear.py) to MXFP8: FP8 elements
with one E8M0 scale per 32 elements along each GEMM's contraction dimension, no per-tensor
scale, no Hadamard transform, round-to-nearest-even everywhere.

Defaults follow TransformerEngine's `MXFP8BlockScaling`: E4M3 for every tensor (its
`fp8_format=E4M3` default) and the RCEIL scale rule of cuBLAS / TE (mx.py), which never
saturates a block's maximum. Whether Super used E4M3 or the "hybrid" E5M2 for gradients is
not stated in the sources we have [U]; set `MXFP8Recipe(grad_elem_dtype="fp8_e5m2")` for
the latter, and `mode="floor"` for the OCP spec's scale rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from nemotron3.quant.mx import MX_BLOCK, MX_MODES, _elem_name, mx_fake_quantize
from nemotron3.quant.qlinear import QuantizedLinear

__all__ = ["MXFP8Recipe", "MXFP8Linear"]


@dataclass(frozen=True)
class MXFP8Recipe:
    elem_dtype: str = "fp8_e4m3"       # x and W
    grad_elem_dtype: str = "fp8_e4m3"  # dy
    mode: str = "rceil"                # E8M0 scale rule: 'rceil' (TE/cuBLAS) or 'floor' (OCP spec)

    def __post_init__(self) -> None:
        for name in (self.elem_dtype, self.grad_elem_dtype):
            if _elem_name(name) not in ("fp8_e4m3", "fp8_e5m2"):
                raise ValueError(f"MXFP8 needs an fp8 element type, got {name!r}")
        if self.mode not in MX_MODES:
            raise ValueError(f"unknown MX scale mode {self.mode!r}; expected one of {MX_MODES}")


class MXFP8Linear(QuantizedLinear):
    """nn.Linear with MXFP8 fprop, dgrad and wgrad (32-element blocks); fp32 master weight."""

    block_size = MX_BLOCK
    recipe_type = MXFP8Recipe

    @classmethod
    def from_float(cls, linear: nn.Linear, recipe: MXFP8Recipe | None = None) -> MXFP8Linear:
        """Wrap an existing nn.Linear (its parameters are reused, as fp32)."""
        return cls._swap_from(linear, recipe=recipe)

    def _act(self, t: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return mx_fake_quantize(t, self.recipe.elem_dtype, self.recipe.mode, axis=axis)

    def _grad(self, t: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return mx_fake_quantize(t, self.recipe.grad_elem_dtype, self.recipe.mode, axis=axis)

    def quantize_x(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x)

    def quantize_x_t(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x, axis=-2)

    def quantize_w(self, w: torch.Tensor) -> torch.Tensor:
        return self._act(w)

    def quantize_w_t(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        return self._act(w, axis=-2)

    def quantize_grad(self, dy: torch.Tensor) -> torch.Tensor:
        return self._grad(dy)

    def quantize_grad_t(self, dy: torch.Tensor) -> torch.Tensor:
        return self._grad(dy, axis=-2)
