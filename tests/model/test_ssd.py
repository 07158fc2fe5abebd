"""The chunked SSD scan and the single recurrent step against the naive token-by-token recurrence."""

from __future__ import annotations

import pytest
import torch

from nemotron3.model.ssd import ssd_chunked, ssd_naive, ssd_step


def random_inputs(b, t, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, t, h, generator=gen) - 1.0)
    A = -torch.rand(h, generator=gen) * 4 - 0.1
    B = torch.randn(b, t, g, n, generator=gen)
    C = torch.randn(b, t, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("t", [1, 7, 16, 17, 50, 64, 100])
@pytest.mark.parametrize("g", [1, 2])
def test_chunked_matches_naive_across_chunk_boundaries(t, g):
    x, dt, A, B, C, D = random_inputs(2, t, 4, 3, g, 5)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)


def test_chunked_continues_from_an_initial_state():
    x, dt, A, B, C, D = random_inputs(1, 45, 4, 3, 2, 5, seed=1)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, chunk_size=8, D=D)
    y1, s1 = ssd_chunked(x[:, :20], dt[:, :20], A, B[:, :20], C[:, :20], chunk_size=8, D=D)
    y2, s2 = ssd_chunked(x[:, 20:], dt[:, 20:], A, B[:, 20:], C[:, 20:], chunk_size=8, D=D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s_full, atol=1e-4, rtol=1e-4)


def test_step_matches_naive():
    x, dt, A, B, C, D = random_inputs(3, 12, 6, 4, 3, 5, seed=2)
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D)
    state = torch.zeros(3, 6, 4, 5)
    ys = [ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D) for i in range(12)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_ref, atol=1e-5, rtol=1e-5)


def test_chunked_gradients_match_naive():
    inputs = [t.clone().requires_grad_(True) for t in random_inputs(1, 21, 2, 3, 1, 4, seed=3)]
    y, s = ssd_chunked(*inputs[:5], chunk_size=8, D=inputs[5])
    g1 = torch.autograd.grad((y.square().sum() + s.sum()), inputs)
    y, s = ssd_naive(*inputs)
    g2 = torch.autograd.grad((y.square().sum() + s.sum()), inputs)
    for a, b in zip(g1, g2):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("g", [1, 2])
def test_chunked_gradients_match_naive_with_an_initial_state(g):
    gen = torch.Generator().manual_seed(4)
    inputs = [t.clone().requires_grad_(True) for t in random_inputs(2, 37, 4, 3, g, 4, seed=5)]
    init = torch.randn(2, 4, 3, 4, generator=gen).requires_grad_(True)
    y, s = ssd_chunked(*inputs[:5], chunk_size=8, D=inputs[5], initial_state=init)
    g1 = torch.autograd.grad((y.square().sum() + s.square().sum()), inputs + [init])
    y, s = ssd_naive(*inputs, initial_state=init)
    g2 = torch.autograd.grad((y.square().sum() + s.square().sum()), inputs + [init])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_long_sequences_with_strong_decay_stay_finite():
    """Many chunks with decays that underflow: no inf - inf, no NaN, and still the naive recurrence."""
    x, dt, A, B, C, D = random_inputs(1, 300, 4, 3, 2, 5, seed=6)
    A = A * 50
    y_ref, s_ref = ssd_naive(x, dt, A, B, C, D)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=16, D=D)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s, s_ref, atol=1e-4, rtol=1e-4)
