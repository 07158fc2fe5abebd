"""The three GEMMs of a quantized linear layer, emulated: one autograd.Function for all recipes.

A linear layer y = x Wᵀ + b does one matmul forward and two backward:

    fprop   y  = x  · Wᵀ      (M, K) · (K, N)   contraction over K (in_features)
    dgrad   dx = dy · W       (M, N) · (N, K)   contraction over N (out_features)
    wgrad   dW = dyᵀ · x      (N, M) · (M, K)   contraction over M (tokens)

Block-scaled formats (NVFP4, MX) put their blocks along the *contraction* dimension of
each GEMM, because the hardware multiplies block by block and rescales partial sums. So
each operand exists in two copies: "rowwise" (blocks along its last dim, for the GEMM that
contracts over it) and "columnwise" (blocks down its columns: the blocks of its transpose,
for the other GEMM). A recipe is the choice of how each of the six operand copies is
quantized; `QuantizedLinear` subclasses provide them as methods that return dequantized
fp32 tensors in the *input's own layout* (the columnwise copies are never transposed in
memory: a transpose copy costs as much as the quantization itself on a CPU):

    quantize_x(x)       x  (M, K), blocks along K  fprop   quantize_x_t(x)     blocks along M  wgrad
    quantize_w(W)       W  (N, K), blocks along K  fprop   quantize_w_t(W, wq) blocks along N  dgrad
    quantize_grad(dy)   dy (M, N), blocks along N  dgrad   quantize_grad_t(dy) blocks along M  wgrad

The GEMM itself is emulated: dequantize both quantized operands to fp32 and matmul. The
tensor-core GEMM multiplies the same decoded values and accumulates in fp32, so this is the
same computation up to the order of fp32 additions (TE's own reference compares its
kernels to this kind of emulation at atol=rtol=8e-3, docs/low-precision.md §2).

Every contraction dim is zero-padded to a multiple of the recipe's block size before
quantizing (columns for the rowwise copies, rows for the columnwise ones) (TE's reference
pads the same way). Zeros cannot raise a block amax, add nothing to any dot product, and
are sliced away from the results, so any in_features, out_features and token count work.

Master weights stay in fp32: the module's `weight` is an ordinary fp32 Parameter that the
optimizer updates; quantization happens inside forward/backward on every call. The bias is
added in high precision and its gradient is the sum of the unquantized dy, as in TE.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["QuantizedLinear", "pad_last", "pad_rows"]


def pad_last(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last dim of `t` up to a multiple of `multiple` (no copy if already one)."""
    extra = -t.shape[-1] % multiple
    return F.pad(t, (0, extra)) if extra else t


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the rows of a 2-D `t` up to a multiple of `multiple` (no copy if already one)."""
    extra = -t.shape[0] % multiple
    return F.pad(t, (0, 0, 0, extra)) if extra else t


class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, weight: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
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
            gq = layer.quantize_grad(pad_last(dy, bs))                      # (M, Np), blocks along N
            wq_col = layer.quantize_w_t(pad_rows(weight, bs), wq)           # (Np, K), blocks along N
            dx = (gq @ wq_col).to(x2d.dtype)                                # (M, K)
        if ctx.needs_input_grad[1]:
            gq_col = layer.quantize_grad_t(pad_rows(dy, bs))                # (Mp, N), blocks along M
            xq_col = layer.quantize_x_t(pad_rows(x2d, bs))                  # (Mp, K), blocks along M
            dw = (gq_col.t() @ xq_col).to(weight.dtype)                     # (N, K)
        return dx, dw, None


class QuantizedLinear(nn.Linear):
    """nn.Linear whose three GEMMs take block-quantized operands (see the module docstring).

    Subclasses set `block_size` and `recipe_type` (a dataclass of the recipe's switches; the
    default-constructed one is the default recipe) and implement the six `quantize_*` methods.
    """

    block_size: int = 16
    recipe_type: type = type(None)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        recipe: object | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else self.recipe_type()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__} keeps fp32 master weights, got {self.weight.dtype}")
        x2d = x.reshape(-1, x.shape[-1])                                    # (M, K)
        y = _QuantizedLinearFn.apply(x2d, self.weight, self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    @classmethod
    def _swap_from(cls, linear: nn.Linear, **kwargs) -> QuantizedLinear:
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

    # the six operand quantizers: 2-D in, dequantized fp32 out, same layout as the input
    def quantize_x(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, Kp): blocks along K (fprop)."""
        raise NotImplementedError

    def quantize_x_t(self, x: torch.Tensor) -> torch.Tensor:
        """x (Mp, K): blocks down the columns, along M (wgrad)."""
        raise NotImplementedError

    def quantize_w(self, w: torch.Tensor) -> torch.Tensor:
        """W (N, Kp): blocks along K (fprop)."""
        raise NotImplementedError

    def quantize_w_t(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """W (Np, K): blocks along N (dgrad); `wq` is the fprop copy (2-D weight tiles reuse it)."""
        raise NotImplementedError

    def quantize_grad(self, dy: torch.Tensor) -> torch.Tensor:
        """dy (M, Np): blocks along N (dgrad)."""
        raise NotImplementedError

    def quantize_grad_t(self, dy: torch.Tensor) -> torch.Tensor:
        """dy (Mp, N): blocks down the columns, along M (wgrad)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return super().extra_repr() + f", block_size={self.block_size}, recipe={self.recipe}"
