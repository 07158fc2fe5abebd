"""The causal depthwise conv (model/conv.py) against F.conv1d: values and all three gradients."""

from __future__ import annotations

import pytest
import torch

from nemotron3.model.conv import causal_conv1d, causal_conv1d_reference


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("t", [1, 7, 64])
def test_conv_and_its_gradients_equal_conv1d(K, bias, t):
    g = torch.Generator().manual_seed(K * 100 + t)
    b, C = 3, 10
    full = torch.randn(b, t + K - 1, 2 * C, generator=g)
    window = full[..., :C]  # a non-contiguous slice, as the in_proj split gives
    w = torch.randn(C, K, generator=g)
    bb = torch.randn(C, generator=g) if bias else None
    grad = torch.randn(b, t, C, generator=g)
    outs = []
    for fn in (causal_conv1d, causal_conv1d_reference):
        leaves = ([window.clone().requires_grad_(), w.clone().requires_grad_()]
                  + ([bb.clone().requires_grad_()] if bias else []))
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(grad)
        outs.append([y.detach()] + [x.grad for x in leaves])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_history_rows_act_as_the_inputs_before_the_sequence():
    """Continuing from a window whose history is the previous inputs equals convolving the whole sequence."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 20, 6, generator=g), torch.randn(6, 4, generator=g)
    whole = causal_conv1d(torch.nn.functional.pad(x, (0, 0, 3, 0)), w)
    tail = causal_conv1d(x[:, 12 - 3 :], w)  # history = inputs 9..11, then inputs 12..19
    torch.testing.assert_close(tail, whole[:, 12:], atol=1e-6, rtol=0)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="window"):
        causal_conv1d(torch.zeros(2, 3, 5), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="shorter than the kernel"):
        causal_conv1d(torch.zeros(2, 3, 4), torch.zeros(4, 4))
