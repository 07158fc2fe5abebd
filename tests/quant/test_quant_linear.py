"""RHT, NVFP4Linear and MXFP8Linear: the three GEMMs against an independent emulation built
from the public codecs, and against an unquantized nn.Linear within the format's error.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nemotron3.quant import MXFP8Linear, MXFP8Recipe, NVFP4Linear, NVFP4Recipe, formats
from nemotron3.quant.hadamard import hadamard_matrix_reference

# ---------------------------------------------------------------------------------------------
# random Hadamard transform


def test_hadamard_matrix_matches_entrywise_definition_and_te_signs():
    h = formats.hadamard_matrix()
    assert torch.equal(h, hadamard_matrix_reference())
    assert formats.TE_SIGN_VECTOR == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    assert torch.equal(h.abs(), torch.full((16, 16), 0.25))
    assert torch.equal(h @ h.t(), torch.eye(16)) and torch.equal(h.t() @ h, torch.eye(16))


@pytest.mark.parametrize("signs", [formats.TE_SIGN_VECTOR, None])
def test_rht_is_orthogonal_and_invertible(signs):
    x = torch.randn(8, 64, dtype=torch.float64).float()
    y = formats.rht(x, round_to_bf16=False, signs=signs)
    torch.testing.assert_close(formats.inverse_rht(y, signs=signs), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(y.view(-1, 16).norm(dim=1), x.view(-1, 16).norm(dim=1))
    # the transform of a (16, M) pair leaves their 16-token contraction unchanged
    a, b = torch.randn(5, 32), torch.randn(7, 32)
    torch.testing.assert_close(formats.rht(a, False) @ formats.rht(b, False).t(), a @ b.t(), rtol=1e-5, atol=1e-5)


def test_butterfly_matches_the_matrix_and_both_layouts_agree_bitwise():
    x = torch.randn(48, 64)
    h = formats.hadamard_matrix()
    torch.testing.assert_close(formats.rht(x, False), (x.view(-1, 16) @ h).view(48, 64), rtol=0, atol=2e-6)
    ints = torch.randint(-50, 50, (32, 32)).float()                  # sums of these are exact
    assert torch.equal(formats.rht(ints, False), (ints.view(-1, 16) @ h).view(32, 32))
    for rnd in (False, True):                                        # same butterfly, same bits
        assert torch.equal(formats.rht(x, rnd, axis=-2), formats.rht(x.t().contiguous(), rnd).t())
    y = formats.rht(x, False, axis=-2)
    torch.testing.assert_close(formats.inverse_rht(y, axis=-2), x, rtol=0, atol=1e-6)


def test_rht_rounds_to_bf16_and_spreads_outliers():
    x = torch.zeros(1, 16)
    x[0, 3] = 100.0
    y = formats.rht(x)
    assert torch.equal(y, y.bfloat16().float())
    assert torch.equal(y.abs(), torch.full((1, 16), 25.0))  # one outlier spread over 16 entries
    z = formats.rht(torch.randn(4, 32))
    assert torch.equal(z, z.bfloat16().float())
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.rht(torch.randn(3, 20))


# ---------------------------------------------------------------------------------------------
# NVFP4Linear against an independent emulation (codes decoded by .dequantize(), explicit RHT)


def _q(t, **kw):
    """Dequantized NVFP4 of t (contraction dim last), zero-padding the last dim to 16."""
    return formats.nvfp4_quantize(F.pad(t, (0, -t.shape[-1] % 16)), **kw).dequantize()


def reference_nvfp4_linear(x, w, dy, recipe: NVFP4Recipe, seed: int):
    """y, dx, dW of the recipe, written out GEMM by GEMM. SR draws: dgrad operand, then wgrad."""
    g = torch.Generator().manual_seed(seed)
    sr = {"stochastic_rounding": True, "generator": g} if recipe.stochastic_rounding else {}
    M, K = x.shape
    N = w.shape[0]
    if recipe.weight_2d:
        wq = _q(w, block_2d=True)                                   # (N, Kp)
        wq_t = F.pad(wq[:, :K].t(), (0, -N % 16))                   # (K, Np): the same tiles
    else:
        wq = _q(w)
        wq_t = _q(w.t())
    y = _q(x) @ wq.t()
    dx = _q(dy, **sr) @ wq_t.t()
    hd = (lambda t: formats.rht(F.pad(t, (0, -t.shape[-1] % 16)))) if recipe.rht else (lambda t: t)
    dw = _q(hd(dy.t()), **sr) @ _q(hd(x.t())).t()
    return y, dx, dw


def _run_layer(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


RECIPES = [NVFP4Recipe(rht=r, stochastic_rounding=s, weight_2d=w)
           for r, s, w in itertools.product([True, False], repeat=3)]


@pytest.mark.parametrize("recipe", RECIPES,
                         ids=lambda r: f"rht{int(r.rht)}-sr{int(r.stochastic_rounding)}-2d{int(r.weight_2d)}")
@pytest.mark.parametrize("shape", [(48, 64, 32), (37, 40, 24)], ids=["aligned", "padded"])
def test_nvfp4_linear_matches_independent_emulation(recipe, shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    layer = NVFP4Linear(K, N, bias=False, recipe=recipe, seed=11)
    y, dx, dw = _run_layer(layer, x, dy)
    y_ref, dx_ref, dw_ref = reference_nvfp4_linear(x, layer.weight.detach(), dy, recipe, seed=11)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref[:, :K], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5)


def test_nvfp4_linear_close_to_unquantized_linear():
    """Relative error of y, dx, dW vs fp32 nn.Linear stays within what NVFP4 allows.

    One NVFP4 operand of Gaussian data has a relative RMS error of about 0.10 (0.11 with 16x16
    weight tiles): E2M1 has one mantissa bit and the block scale puts each block's max at 6. A
    GEMM of two such operands has about sqrt(2) of that, 0.15, and SR adds variance on the
    gradient operand (measured 0.17-0.18): we allow 0.25.
    """
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    q = NVFP4Linear.from_float(nn.Linear(256, 128))
    q.load_state_dict(lin.state_dict())
    x, dy = torch.randn(4, 64, 256), torch.randn(4, 64, 128)
    y, dx, dw = _run_layer(q, x, dy)
    y0, dx0, dw0 = _run_layer(lin, x, dy)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(formats.nvfp4_fake_quantize(x.reshape(-1, 256)), x.reshape(-1, 256)) < 0.12
    assert rel(y, y0) < 0.25 and rel(dx, dx0) < 0.25 and rel(dw, dw0) < 0.25
    torch.testing.assert_close(q.bias.grad, dy.sum((0, 1)))      # bias grad: unquantized dy


def test_nvfp4_linear_from_float_keeps_fp32_master_weights():
    lin = nn.Linear(32, 16)
    q = NVFP4Linear.from_float(lin, NVFP4Recipe(rht=False))
    assert q.weight is lin.weight and q.bias is lin.bias and q.recipe.rht is False
    half = nn.Linear(32, 16, bias=False).bfloat16()
    qh = NVFP4Linear.from_float(half)
    assert qh.weight.dtype == torch.float32 and qh.bias is None
    assert torch.equal(qh.weight, half.weight.float())
    opt = torch.optim.AdamW(qh.parameters(), lr=1e-2)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    y = qh(x)
    assert y.shape == (3, 5, 16) and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    opt.step()
    assert qh.weight.dtype == torch.float32 and opt.state[qh.weight]["exp_avg"].dtype == torch.float32
    assert not torch.equal(qh.weight, half.weight.float())
    with pytest.raises(TypeError, match="fp32 master weights"):
        NVFP4Linear(32, 16, dtype=torch.bfloat16)(torch.randn(2, 32))


def test_nvfp4_linear_stochastic_rounding_is_seeded():
    x, dy = torch.randn(32, 64), torch.randn(32, 32)
    w = torch.randn(32, 64)
    grads = []
    for seed in (5, 5, 6):
        layer = NVFP4Linear(64, 32, bias=False, seed=seed)
        with torch.no_grad():
            layer.weight.copy_(w)
        grads.append(_run_layer(layer, x, dy)[1:])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert not torch.equal(grads[0][1], grads[2][1])


def test_nvfp4_linear_sr_gradient_is_unbiased_on_average():
    """With SR the expected wgrad is the GEMM of unrounded (scaled) gradients: the mean over many
    steps is closer to the unquantized-gradient result than a single RNE step."""
    torch.manual_seed(0)
    x, dy = torch.randn(64, 32), torch.randn(64, 16)
    sr_layer = NVFP4Linear(32, 16, bias=False, recipe=NVFP4Recipe(rht=False), seed=0)
    rn_layer = NVFP4Linear(32, 16, bias=False, recipe=NVFP4Recipe(rht=False, stochastic_rounding=False))
    rn_layer.load_state_dict(sr_layer.state_dict())
    target = dy.t() @ formats.nvfp4_fake_quantize(x.t().contiguous()).t()   # only dy unquantized
    mean = torch.stack([_run_layer(sr_layer, x, dy)[2].clone() for _ in range(40)]).mean(0)
    _, _, rn = _run_layer(rn_layer, x, dy)
    assert (mean - target).norm() < 0.5 * (rn - target).norm()


# ---------------------------------------------------------------------------------------------
# MXFP8Linear


@pytest.mark.parametrize("recipe", [MXFP8Recipe(), MXFP8Recipe(grad_elem_dtype="fp8_e5m2", mode="floor")])
def test_mxfp8_linear_matches_independent_emulation(recipe):
    M, K, N = 45, 72, 40                                             # nothing a multiple of 32
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(M, K, generator=g), torch.randn(M, N, generator=g)
    layer = MXFP8Linear(K, N, bias=True, recipe=recipe)
    y, dx, dw = _run_layer(layer, x, dy)

    def q(t, elem):
        return formats.mx_quantize(F.pad(t, (0, -t.shape[-1] % 32)), elem, recipe.mode).dequantize()

    w = layer.weight.detach()
    a, gr = recipe.elem_dtype, recipe.grad_elem_dtype
    torch.testing.assert_close(y, q(x, a) @ q(w, a).t() + layer.bias.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, q(dy, gr) @ q(w.t(), a).t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, q(dy.t(), gr) @ q(x.t(), a).t(), rtol=1e-5, atol=1e-5)
    lin = nn.Linear(K, N)
    lin.load_state_dict(layer.state_dict())
    y0, dx0, dw0 = _run_layer(lin, x, dy)
    # relative RMS rounding error: ~2^-4 per E4M3 operand (3 mantissa bits), ~2^-3 for E5M2
    grad_bound = 0.06 if gr == "fp8_e4m3" else 0.12
    for a_, b_, bound in ((y, y0, 0.06), (dx, dx0, grad_bound), (dw, dw0, grad_bound)):
        assert (a_ - b_).norm() / b_.norm() < bound


def test_mxfp8_linear_from_float_and_recipe_errors():
    lin = nn.Linear(64, 32)
    q = MXFP8Linear.from_float(lin)
    assert q.weight is lin.weight and q.recipe.mode == "rceil" and q.block_size == 32
    with pytest.raises(ValueError, match="fp8 element type"):
        MXFP8Recipe(elem_dtype="fp4_e2m1")
    with pytest.raises(ValueError, match="scale mode"):
        MXFP8Recipe(mode="ceil")
