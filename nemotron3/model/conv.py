"""The causal depthwise convolution of the Mamba-2 mixer, in the (batch, time, channels) layout it lives in.

    y[b, t, c] = bias[c] + Σ_{k<K} w[c, k] · window[b, t + k, c]        window: (b, t + K - 1, C)

`window` is the new inputs with the K-1 inputs before them prepended: zeros for a fresh sequence (the
conv's left padding), a row's cached conv state when a sequence continues. With K = 4 the whole
convolution is four multiply-adds over contiguous memory, and so is its backward:

    ∂window[b, t + k, c] += w[c, k] · ∂y[b, t, c]      (the same taps, scattered instead of gathered)
    ∂w[c, k] = Σ_{b,t} ∂y[b, t, c] · window[b, t + k, c]
    ∂bias[c] = Σ_{b,t} ∂y[b, t, c]

Why not `nn.Conv1d`: it wants (batch, channels, time), so the in_proj output has to be transposed to it
and back (two full copies), and oneDNN's depthwise backward on CPU is slow (its backward, gradient
zero-fill and the silu backward on the transposed output cost several times the multiply-adds here;
docs/results.md). `causal_conv1d_reference` is `F.conv1d` on the same
window, kept beside it for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        K = weight.shape[1]
        t = window.shape[1] - K + 1
        y = window[:, K - 1 :] * weight[:, K - 1]  # (b, t, C)
        for k in range(K - 1):
            y.addcmul_(window[:, k : k + t], weight[:, k])
        if bias is not None:
            y += bias
        ctx.save_for_backward(window, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        window, weight = ctx.saved_tensors
        K = weight.shape[1]
        t = window.shape[1] - K + 1
        grad_window = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_window = window.new_zeros(window.shape)  # (b, t + K - 1, C)
            for k in range(K):
                grad_window[:, k : k + t].addcmul_(grad, weight[:, k])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.stack([(grad * window[:, k : k + t]).sum((0, 1)) for k in range(K)], dim=1)  # (C, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1))
        return grad_window, grad_weight, grad_bias


def causal_conv1d(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """window (b, t + K - 1, C), weight (C, K), bias (C,) or None -> y (b, t, C).

    The first K-1 rows of `window` are the history (zeros, or the cached conv state); the output has one
    row per remaining row. Differentiable in all three inputs.
    """
    if window.dim() != 3 or weight.dim() != 2 or window.shape[-1] != weight.shape[0]:
        raise ValueError(f"causal_conv1d wants window (b, t+K-1, C) and weight (C, K), got {tuple(window.shape)} "
                         f"and {tuple(weight.shape)}")
    if window.shape[1] < weight.shape[1]:
        raise ValueError(f"window of {window.shape[1]} rows is shorter than the kernel ({weight.shape[1]})")
    return _CausalConv1d.apply(window, weight, bias)


def causal_conv1d_reference(window: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same convolution as `F.conv1d` computes it (channels-first, groups = C, no padding)."""
    C = weight.shape[0]
    return F.conv1d(window.transpose(1, 2), weight[:, None, :], bias, groups=C).transpose(1, 2)
