"""NVFP4 (`te` convention) branch by branch: the fast paths and the loop reference against an independent one.

`_te` below is the docs' formula (docs/low-precision.md §1, the module docstring) written with other tools than
the module's: the E4M3 block scales by torch's own float8 cast, the E2M1 rounding by a nearest-even search
over the 8 magnitudes in float64, the block maxima by reshapes; it takes the per-tensor `amax` or `p` as
given. The inputs exercise each branch: zero and all-equal blocks, E2M1 and E4M3 ties (hand-worked), block
scales that are E4M3 subnormals or underflow to 0, saturation at 6·448 and past it (an amax below max|x|),
inf, 16×16 tiles over rows that are not a multiple of 16, tensors large enough to be cut into chunks, and
the error messages, matched whole.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nemotron3.quant import formats
from nemotron3.quant.nvfp4 import nvfp4_quantize_reference

FLT_MAX = torch.finfo(torch.float32).max
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
f32 = np.float32


def _e2m1_rne(a: torch.Tensor) -> torch.Tensor:
    """Magnitudes a >= 0 (any shape) -> nearest E2M1 magnitude, ties to the even code, searched in float64."""
    a = a.double().clamp(max=6.0)
    best, best_d = torch.zeros_like(a), a.clone()
    for c in range(1, 8):
        d = (a - E2M1[c]).abs()
        take = (d < best_d) | ((d == best_d) & (c % 2 == 0))
        best, best_d = torch.where(take, E2M1[c], best), torch.where(take, d, best_d)
    return best.float()


def _te(x: torch.Tensor, amax=None, p=None, block_2d=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantized (R, K) fp32, block scales (R, K/16) fp32) of 2-D x by the `te` formulas."""
    x = x.float()
    R, K = x.shape
    if p is None:
        amax = x.abs().max() if amax is None else torch.tensor(float(amax))
        s_enc = torch.minimum(torch.tensor(2688.0) / amax, torch.tensor(FLT_MAX))
        s_enc = torch.tensor(1.0) if amax == 0 or s_enc == 0 else s_enc
    else:
        p = torch.tensor(float(p))
        s_enc = torch.minimum(1 / p, torch.tensor(FLT_MAX))
        s_enc = torch.tensor(1.0) if p == 0 or s_enc == 0 else s_enc
    s_dec = 1 / s_enc
    mult = s_enc * (1 / torch.tensor(6.0))
    bmax = x.abs().reshape(R, K // 16, 16).amax(-1)  # (R, K/16)
    if block_2d:
        pad = torch.cat([bmax, torch.zeros(-R % 16, K // 16)])  # zero rows cannot raise a tile max
        bmax = pad.reshape(-1, 16, K // 16).amax(1).repeat_interleave(16, 0)[:R]
    s_b = torch.minimum(bmax * mult, torch.tensor(448.0)).to(torch.float8_e4m3fn).float()  # (R, K/16)
    enc = torch.minimum(1 / (s_b * s_dec), torch.tensor(FLT_MAX))
    v = x.reshape(R, K // 16, 16) * enc[..., None]
    q = _e2m1_rne(v.abs()).copysign(v)
    return (q * (s_dec * s_b)[..., None]).reshape(R, K), s_b


def _check_all_paths(x: torch.Tensor, **kw) -> None:
    """nvfp4_quantize (codes, scales, dequantize), nvfp4_fake_quantize and, without amax/p, the loop reference."""
    want, s_b = _te(x, **kw)
    amax, p, block_2d = kw.get("amax"), kw.get("p"), kw.get("block_2d", False)
    q = formats.nvfp4_quantize(x, per_tensor_scale=p, amax=amax, block_2d=block_2d)
    assert torch.equal(q.scales.float(), s_b)
    assert torch.equal(q.dequantize(), want)
    assert torch.equal(formats.nvfp4_fake_quantize(x, per_tensor_scale=p, amax=amax, block_2d=block_2d), want)
    if not block_2d:
        assert torch.equal(formats.nvfp4_fake_quantize(x.t().contiguous(), per_tensor_scale=p, amax=amax,
                                                       axis=-2).t(), want)
    if amax is None and p is None:
        scales, codes = nvfp4_quantize_reference(x, block_2d=block_2d)
        assert torch.equal(scales, q.scales.view(torch.uint8)) and torch.equal(codes, q.codes)


def _hand_block(*head: float) -> torch.Tensor:
    return torch.tensor(list(head) + [0.0] * (16 - len(head)))


def test_e2m1_ties_go_to_the_even_code_on_every_path():
    """Global amax 2688 makes S_enc = S_dec = 1; a block of amax 6 then has s_b = e4m3(6·fp32(1/6)) = 1 and
    enc = 1, so the values below are E2M1 inputs as written: each midpoint goes to the even code (0.25 -> 0,
    0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), and the signs follow."""
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    x = torch.stack([_hand_block(2688.0), _hand_block(6.0, *ties), _hand_block(-6.0, *[-t for t in ties])])
    x = x.reshape(3, 16)
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    q = formats.nvfp4_quantize(x)
    assert q.scales.float()[:, 0].tolist() == [448.0, 1.0, 1.0] and q.per_tensor_scale.item() == 1.0
    deq = q.dequantize()
    assert deq[1, :8].tolist() == [6.0] + want and deq[2, :8].tolist() == [-6.0] + [-w for w in want]
    codes = nvfp4_quantize_reference(x)[1]
    assert codes[1, :8].tolist() == [7, 0, 2, 2, 4, 4, 6, 6] and codes[2, :8].tolist() == [15, 8, 10, 10, 12, 12,
                                                                                             14, 14]
    _check_all_paths(x)


def test_e4m3_scale_ties_subnormal_scales_and_underflow():
    """S_enc = 1 again (amax 2688). Block maxima 6.375 and 7.125 put block_amax·fp32(1/6) at the E4M3 midpoints
    1.0625 and 1.1875: ties to the even mantissa, 1.0 and 1.25. 6·1.5·2^-9 lands on the subnormal midpoint
    1.5·2^-9 -> 2·2^-9 (even); 6·2^-9 is the smallest subnormal; 6·2^-11 underflows to a 0 scale (enc = FLT_MAX:
    the block decodes to 0). An all-equal block of 3s has s_b = 0.5 and every element codes 6."""
    rows = [_hand_block(2688.0), _hand_block(6.375, 1.0), _hand_block(7.125, -7.0), _hand_block(6 * 1.5 * 2**-9),
            _hand_block(6 * 2**-9, 2**-9), _hand_block(6 * 2**-11, -1e-4), torch.full((16,), 3.0), torch.zeros(16)]
    x = torch.stack(rows)  # (8, 16)
    q = formats.nvfp4_quantize(x)
    assert q.scales.float()[:, 0].tolist() == [448.0, 1.0, 1.25, 2 * 2**-9, 2**-9, 0.0, 0.5, 0.0]
    deq = q.dequantize()
    assert deq[1, :2].tolist() == [6.0, 1.0] and deq[2, :2].tolist() == [7.5, -7.5]  # 7.125/1.25 = 5.7 -> 6
    assert not deq[5].any() and bool((deq[6] == 3.0).all()) and not deq[7].any()
    assert nvfp4_quantize_reference(x)[0][:, 0].tolist() == [0x7E, 0x38, 0x3A, 0x02, 0x01, 0x00, 0x30, 0x00]
    _check_all_paths(x)


def test_saturation_at_and_past_6x448():
    """amax = max|x| = 2688 puts the largest block at s_b = 448 exactly; an explicit amax below max|x| sends
    blocks past 448 (clamped there) and elements past 6 (code 7). amax above max|x| shrinks the scales."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-2, 2, 64)
    x[0, 3] = -2688.0
    _check_all_paths(x)
    for amax in (10.0, 1.0, 1e4, 2688.0 * 3):
        _check_all_paths(x, amax=amax)
    q = formats.nvfp4_quantize(x, amax=1.0)
    assert q.scales.float().max() == 448 and q.dequantize().abs().max() == 6 * 448 * (1 / 2688.0)


@pytest.mark.parametrize("seed", range(3))
def test_random_tensors_with_explicit_scales_and_tiles(seed):
    """Random magnitudes over 10 decades (subnormal and zero scales included), zero blocks, all-equal blocks,
    per_tensor_scale p and amax given, 16×16 tiles over 40 rows (the last tile partial)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 64, generator=g) * torch.logspace(-6, 4, 40)[:, None]
    x[3, 16:32] = 0
    x[5, :16] = -0.7
    _check_all_paths(x)
    _check_all_paths(x, block_2d=True)
    for p in (0.01, 1.0, 3.5):
        _check_all_paths(x, p=p)
    _check_all_paths(x, amax=float(x.abs().max()) * 0.3)
    small = x[:, :32] / x[:, :32].abs().max() * 0.7  # max|x| = 0.7 < 1: S_enc = 3840
    _check_all_paths(small)


def test_inf_and_zero_inputs_of_the_loop_reference():
    """An inf element makes amax inf, S_enc = 2688/inf = 0 -> 1: its block saturates at 448 (byte 0x7E) and the
    inf codes 7; an all-zero tensor has S_enc = 1 and every byte 0. The loop reference divides by nothing that is 0
    (numpy raises here on a division by zero or an invalid operation) and returns uint8 tensors."""
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[0, 16], x[1, :3] = float("inf"), 100.0, 3.0, torch.tensor([6.0, 0.75, -2.5])
    with np.errstate(all="raise"):
        scales, codes = nvfp4_quantize_reference(x)
        zs, zc = nvfp4_quantize_reference(torch.zeros(3, 32))
    assert scales.tolist() == [[0x7E, 0x30], [0x38, 0x00]]  # 448, 0.5 (3 / 6), 1.0 (6 / 6), zero block
    assert codes[0, :2].tolist() == [7, 0] and codes[0, 16] == 7 and codes[1, :3].tolist() == [7, 2, 12]
    assert scales.dtype == codes.dtype == zs.dtype == zc.dtype == torch.uint8
    assert not zs.any() and not zc.any() and zs.shape == (3, 2) and zc.shape == (3, 32)
    q = formats.nvfp4_quantize(x)
    assert torch.equal(q.scales.view(torch.uint8), scales) and torch.equal(q.codes, codes)
    assert q.per_tensor_scale.item() == 1.0


def test_loop_reference_defaults_to_1x16_blocks():
    """Rows of different magnitudes: the default (no block_2d) gives each row its own scales, as the fast path."""
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, 16)[:, None]
    scales, codes = nvfp4_quantize_reference(x)
    q = formats.nvfp4_quantize(x)
    assert torch.equal(scales, q.scales.view(torch.uint8)) and torch.equal(codes, q.codes)
    assert not torch.equal(scales, nvfp4_quantize_reference(x, block_2d=True)[0])


def test_large_tensors_are_cut_into_tile_aligned_chunks():
    """5472 × 48 (262656 elements) is two chunks of ~2^18: 2^18 // 48 = 5461 rows, cut at 5456 for whole 16-row
    tiles (and for the 16×1 blocks of axis=-2); a cut at 5461 would split a tile. Tiles with their maximum in the
    last row show it."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5472, 48, generator=g)
    x[15::16] *= 8
    want2d, s2d = _te(x, block_2d=True)
    q = formats.nvfp4_quantize(x, block_2d=True)
    assert q.block_2d is True and q.convention == "te"
    assert torch.equal(q.scales.float(), s2d) and torch.equal(q.dequantize(), want2d)
    assert torch.equal(formats.nvfp4_fake_quantize(x, block_2d=True), want2d)
    want_col, _ = _te(x.t().contiguous())
    assert torch.equal(formats.nvfp4_fake_quantize(x, axis=-2), want_col.t())
    x1 = x[:5470]  # the last tile partial
    assert torch.equal(formats.nvfp4_fake_quantize(x1, block_2d=True), _te(x1, block_2d=True)[0])


def test_te_global_scales_by_hand():
    """S_enc = 2688 / amax in fp32, whatever the amax dtype; amax 0 or inf (2688/inf = 0) fall back to 1."""
    s_enc, s_dec = formats.te_global_scales(torch.tensor(6.0, dtype=torch.float64))
    assert s_enc.dtype == s_dec.dtype == torch.float32
    assert s_enc.item() == 448.0 and s_dec.item() == float(f32(1) / f32(448))
    third = formats.te_global_scales(torch.tensor(1 / 3, dtype=torch.float64))[0]
    assert third.item() == float(f32(2688) / f32(1 / 3))
    for amax in (0.0, float("inf")):
        s_enc, s_dec = formats.te_global_scales(torch.tensor(amax))
        assert (s_enc.item(), s_dec.item()) == (1.0, 1.0), amax
    assert formats.te_global_scales(torch.tensor(1e-45))[0].item() == FLT_MAX or torch.tensor(1e-45).item() == 0


def test_per_tensor_scale_is_fp32_whatever_it_is_given_as():
    """p as a float64 tensor, a Python float, a 1-element fp32 tensor: the same fp32 scale, the same codes."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    p64 = torch.tensor([1 / 3], dtype=torch.float64)
    for convention in ("te", "torchao"):
        ref = formats.nvfp4_quantize(x, per_tensor_scale=torch.tensor(1 / 3, dtype=torch.float32),
                                     convention=convention)
        for p in (p64, 1 / 3):
            q = formats.nvfp4_quantize(x, per_tensor_scale=p, convention=convention)
            assert q.per_tensor_scale.dtype == torch.float32 and q.per_tensor_scale.shape == ()
            assert q.per_tensor_scale.item() == float(f32(1) / (f32(1) / f32(1 / 3))) or convention == "torchao"
            assert torch.equal(q.packed, ref.packed) and torch.equal(q.scales.view(torch.uint8),
                                                                     ref.scales.view(torch.uint8))
        assert q.convention == convention and q.block_2d is False
    assert torch.equal(formats.nvfp4_fake_quantize(x, per_tensor_scale=p64), _te(x, p=1 / 3)[0])


def test_nvfp4_error_messages_whole():
    x = torch.randn(32, 16)
    cases = [
        (TypeError, r"^nvfp4 input must be a floating-point tensor, got dtype torch\.int64$",
         lambda: formats.nvfp4_quantize(torch.ones(2, 16, dtype=torch.int64))),
        (ValueError, r"^unknown NVFP4 convention 'modelopt'; expected one of \('te', 'torchao'\)$",
         lambda: formats.nvfp4_quantize(x, convention="modelopt")),
        (ValueError, r"^axis must be -1, or -2 for a 2-D tensor without block_2d; got axis=0, shape \(32, 16\)$",
         lambda: formats.nvfp4_fake_quantize(x, axis=0)),
        (ValueError, r"^axis must be -1, or -2 for a 2-D tensor without block_2d; got axis=-2, shape \(32, 16\)$",
         lambda: formats.nvfp4_fake_quantize(x, axis=-2, block_2d=True)),
        (ValueError, r"^NVFP4 needs dimension -1 to be a multiple of 16, got shape \(2, 20\); pad it with zeros "
                     r"first \(NVFP4Linear does this for you\)$", lambda: formats.nvfp4_quantize(torch.ones(2, 20))),
        (ValueError, r"^NVFP4 needs dimension -1 to be a multiple of 16, got shape \(\); ",
         lambda: formats.nvfp4_quantize(torch.tensor(1.0))),
        (ValueError, r"^NVFP4 needs dimension -2 to be a multiple of 16, got shape \(20, 16\); ",
         lambda: formats.nvfp4_fake_quantize(torch.ones(20, 16), axis=-2)),
        (ValueError, r"^2-D \(16x16\) block scaling needs a 2-D tensor, got shape \(16,\)$",
         lambda: formats.nvfp4_quantize(torch.ones(16), block_2d=True)),
        (ValueError, r"^per_tensor_scale must hold one value, got shape \(2,\)$",
         lambda: formats.nvfp4_quantize(x, per_tensor_scale=torch.ones(2))),
        (ValueError, r"^give either per_tensor_scale or amax, not both$",
         lambda: formats.nvfp4_quantize(x, per_tensor_scale=1.0, amax=1.0)),
        (ValueError, r"^out must be a contiguous fp32 tensor of shape \(32, 16\)$",
         lambda: formats.nvfp4_fake_quantize(x, out=torch.empty(16, 32))),
        (ValueError, r"^out must be a contiguous fp32 tensor of shape \(32, 16\)$",
         lambda: formats.nvfp4_fake_quantize(x, out=torch.empty(32, 16, dtype=torch.float64))),
        (ValueError, r"^out must be a contiguous fp32 tensor of shape \(32, 16\)$",
         lambda: formats.nvfp4_fake_quantize(x, out=torch.empty(16, 32).t())),
    ]
    torchao_msg = r"^the torchao convention has no 2-D blocks, stochastic rounding or amax argument$"
    for kw in (dict(block_2d=True), dict(stochastic_rounding=True), dict(amax=1.0)):
        cases.append((ValueError, torchao_msg, lambda kw=kw: formats.nvfp4_quantize(x, convention="torchao", **kw)))
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    assert formats.nvfp4_quantize(torch.ones(16)).shape == (16,)  # a 1-D tensor is one row
    out = torch.empty(32, 16)
    assert formats.nvfp4_fake_quantize(x, out=out) is not None and torch.equal(out, _te(x)[0])


def test_dequantize_dtype_and_stochastic_rounding_statistics():
    """dequantize(dtype) casts. Stochastic rounding, p = 1 and a block of amax 6 (s_b = 1, enc = 1, so the values
    are E2M1 inputs as written): each element becomes one of its two E2M1 neighbours, the upper one with a
    frequency within 0.03 (4 sigma over 4096 rows) of its distance to the lower: 0.3 -> 0.5 at 60%, 2.5 -> 3 at 50%,
    -1.25 -> -1.5 at 50%, 5.2 -> 6 at 60%; exact grid values (6, 1) never move."""
    q = formats.nvfp4_quantize(torch.full((2, 16), 3.0))
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16 and q.dequantize().dtype == torch.float32
    head = [(6.0, 6.0, 6.0), (0.3, 0.0, 0.5), (2.5, 2.0, 3.0), (-1.25, -1.0, -1.5), (5.2, 4.0, 6.0), (1.0, 1.0, 1.0)]
    x = _hand_block(*[h[0] for h in head]).expand(4096, 16).contiguous()  # (4096, 16)
    y = formats.nvfp4_fake_quantize(x, per_tensor_scale=1.0, stochastic_rounding=True,
                                    generator=torch.Generator().manual_seed(0))
    for j, (v, lo, hi) in enumerate(head):
        col = y[:, j]
        assert set(col.unique().tolist()) <= {lo, hi}, j
        if lo != hi:
            frac = (col == hi).float().mean().item()
            assert abs(frac - (v - lo) / (hi - lo)) < 0.03, (j, frac)
    assert not y[:, 6:].any()
