"""The three GEMMs of a quantized linear layer, emulated: one autograd.Function for all recipes.

A linear layer y = x Wᵀ + b does one matmul forward and two backward:

    fprop   y  = x  · Wᵀ      (M, K) · (K, N)   contraction over K (in_features)
    dgrad   dx = dy · W       (M, N) · (N, K)   contraction over N (out_features)
    wgrad   dW = dyᵀ · x      (N, M) · (M, K)   contraction over M (tokens)

Block-scaled formats (NVFP4, MX) put their blocks along the *contraction* dimension of
each GEMM, because the hardware multiplies block by block and rescales partial sums. So
each operand exists in two copies: "rowwise" (blocks along its last dim, for the GEMM that
contracts over it) and "columnwise" (the transpose, blocks along the other dim). A recipe
is the choice of how each of the six operand copies is quantized; `QuantizedLinear`
subclasses provide them as methods that take a 2-D tensor with the contraction dim last
and return its dequantized fp32 value:

    quantize_x(x)          x  (M, K)  for fprop        quantize_x_t(xᵀ)   (K, M)  for wgrad
    quantize_w(W)          W  (N, K)  for fprop        quantize_w_t(Wᵀ)   (K, N)  for dgrad
    quantize_grad(dy)      dy (M, N)  for dgrad        quantize_grad_t(dyᵀ) (N, M) for wgrad

The GEMM itself is emulated: dequantize both quantized operands to fp32 and matmul. The
tensor-core GEMM multiplies the same decoded values and accumulates in fp32, so this is the
same computation up to the order of fp32 additions (TE's own reference compares its
kernels to this kind of emulation at atol=rtol=8e-3, LOWPREC §1.3).

Every contraction dim is zero-padded to a multiple of the recipe's block size before
quantizing (TE's reference pads the same way). Zeros cannot raise a block amax, add nothing
to any dot product, and are sliced away from the results, so any in_features, out_features
and token count work.

Master weights stay in fp32: the module's `weight` is an ordinary fp32 Parameter that the
optimizer updates; quantization happens inside forward/backward on every call. The bias is
added in high precision and its gradient is the sum of the unquantized dy, as in TE.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["QuantizedLinear", "pad_last"]


def pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of `t` up to a multiple of `multiple` (no copy if already one)."""
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, layer: "QuantizedLinear") -> torch.Tensor:
        bs = layer.block_size
        xq = layer.quantize_x(pad_last(x2d, bs))                            # (M, Kp) fp32
        wq = layer.quantize_w(pad_last(weight, bs))                         # (N, Kp) fp32
        ctx.save_for_backward(x2d, weight, wq)
        ctx.layer = layer
        return (xq @ wq.t()).to(x2d.dtype)                                  # (M, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2d, weight, wq = ctx.saved_tensors
        layer: QuantizedLinear = ctx.layer
        bs = layer.block_size
        dx = dw = None
        if ctx.needs_input_grad[0]:
            gq = layer.quantize_grad(pad_last(dy, bs))                      # (M, Np)
            wq_t = layer.quantize_w_t(pad_last(weight.t(), bs), wq)         # (K, Np)
            dx = (gq @ wq_t.t()).to(x2d.dtype)                              # (M, K)
        if ctx.needs_input_grad[1]:
            gq_t = layer.quantize_grad_t(pad_last(dy.t(), bs))              # (N, Mp)
            xq_t = layer.quantize_x_t(pad_last(x2d.t(), bs))                # (K, Mp)
            dw = (gq_t @ xq_t.t()).to(weight.dtype)                         # (N, K)
        return dx, dw, None


class QuantizedLinear(nn.Linear):
    """nn.Linear whose three GEMMs take block-quantized operands (see the module docstring).

    Subclasses set `block_size` and implement the six `quantize_*` methods.
    """

    block_size: int = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__} keeps fp32 master weights, got {self.weight.dtype}")
        x2d = x.reshape(-1, x.shape[-1])                                    # (M, K)
        y = _QuantizedLinearFn.apply(x2d, self.weight, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def _swap_from(cls, linear: nn.Linear, **kwargs) -> "QuantizedLinear":
        """Build `cls` around an existing nn.Linear's parameters (fp32 copies if they are not)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, **kwargs)
        for name in ("weight", "bias"):
            p = getattr(linear, name)
            if p is None:
                continue
            if p.dtype != torch.float32:
                p = nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad)
            setattr(new, name, p)
        return new

    # the six operand quantizers: 2-D in, contraction dim last, dequantized fp32 out
    def quantize_x(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_x_t(self, x_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_w(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_w_t(self, w_t: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """Wᵀ for dgrad; `wq` is the fprop copy (a recipe with 2-D weight blocks reuses it)."""
        raise NotImplementedError

    def quantize_grad(self, dy: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_grad_t(self, dy_t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}"
