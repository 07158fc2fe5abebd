"""int8 weight-only, symmetric per output channel: the fast decoder's packed-weight variant (docs/inference.md §6).

    scale_o = max_i |W[o, i]| / 127,   q[o, i] = round(W[o, i] / scale_o) ∈ [-127, 127],   W ≈ q · scale

Activations stay in the model's dtype (bf16); the product x · Wᵀ = (x · qᵀ) · scale runs on a CPU in torch's
`_weight_int8pack_mm` (int8 weights widened inside the kernel, fp32 accumulation, one scale per output), which
for bf16 activations costs about what a dense bf16 GEMV does at one row while reading half the bytes. Elsewhere
(CUDA, or an input width that is not a multiple of 16, which that kernel mishandles) the weight is dequantized
inside `mm`. Use it through the fast decoder:

    FastDecoder(model_bf16, pack=Int8Weight)

The error bound per weight is scale / 2 = max|W[o]| / 254; the router, the LM head, the embedding, the norms and
the Mamba vectors stay in their own dtype (the decoder keeps the router and head in fp32).
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> q (out, in) int8 and fp32 scales (out,): symmetric, per output channel, round to nearest.
    An all-zero row gets scale 1 (its q is 0)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8: weight must be 2-D (out, in), got shape {tuple(w.shape)}")
    w32 = w.float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Weight:
    """A packed weight for model/packing.py: `mm(x)` = x · Wᵀ with W ≈ q · scale (scales in x's dtype)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.q, scale = quantize_int8(w)
        self.scale = scale.to(w.dtype)  # the kernel wants scales in the activations' dtype (the model's)
        self.shape = tuple(w.shape)
        # torch's CPU kernel needs in % 16 == 0: other widths crash it or return garbage (torch 2.13, measured)
        self.kernel = w.device.type == "cpu" and w.shape[1] % 16 == 0

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        """(out, in) in the scales' dtype: q · scale."""
        return self.q.to(self.scale.dtype) * self.scale[:, None]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out) in x's dtype."""
        if self.kernel:
            return torch._weight_int8pack_mm(x.contiguous(), self.q, self.scale.to(x.dtype))
        return torch.mm(x, self.q.to(x.dtype).t()) * self.scale.to(x.dtype)
