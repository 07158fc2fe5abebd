"""Shared-microexponent formats MX9 / MX6 / MX4 against vectors worked by hand from the definition
(docs/low-precision.md §8) and an element-by-element Python reference.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

import pytest
import torch

from nemotron3.quant import formats
from nemotron3.quant.mx_shared import MXS_FORMATS, mxs_quantize_reference, pack_bits, unpack_bits

ONES = [1.0] * 16


def _block(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 16)


def _deq(values: list[float], fmt: str, rounding: str = "even") -> list[float]:
    return formats.mxs_quantize(_block(values), fmt, rounding).dequantize().view(-1).tolist()


# one outlier: E = 3 (10 ∈ [8, 16)); pair 0 (0.3, 1.0) and pairs 1..6 lie below E -> μ = 1; pair 7 (1.0, 10) μ = 0
OUTLIER = [0.3] + [1.0] * 14 + [10.0]


def test_block_with_one_outlier():
    # MX9 (m = 7): μ=1 step 2^(3-6-1) = 1/16: 0.3 -> 4.8 -> 5 -> 0.3125, 1 -> 16; μ=0 step 1/8: 1, 10 exact
    assert _deq(OUTLIER, "mx9") == [0.3125] + [1.0] * 14 + [10.0]
    # MX6 (m = 4): μ=1 step 1/2: 0.3 -> 0.6 -> 1 -> 0.5; μ=0 step 1: 1 -> 1, 10 -> 10
    assert _deq(OUTLIER, "mx6") == [0.5] + [1.0] * 14 + [10.0]
    # MX4 (m = 2): μ=1 step 2: 1 -> 0.5 -> tie -> 0; μ=0 step 4: 1 -> 0.25 -> 0, 10 -> 2.5 -> tie -> 2 -> 8
    assert _deq(OUTLIER, "mx4") == [0.0] * 15 + [8.0]
    # ties away from zero instead: 0.5 -> 1 (2.0), 2.5 -> 3 (12)
    assert _deq(OUTLIER, "mx4", "away") == [0.0] + [2.0] * 13 + [0.0, 12.0]


def test_microexponent_bits_and_exponent_byte():
    q = formats.mxs_quantize(_block(OUTLIER), "mx6")
    assert q.exponents.tolist() == [[3 + 127]]
    assert q.micro.tolist() == [[0b01111111]]          # pairs 0..6 get μ = 1, pair 7 (holding the max) μ = 0
    assert q.codes.shape == (1, 2 * 5)                  # 16 codes of 5 bits


def test_zeros():
    q = formats.mxs_quantize(torch.zeros(2, 32), "mx9")
    assert q.exponents.eq(0).all() and q.codes.eq(0).all()          # E = -127, every code 0
    assert q.dequantize().eq(0).all()
    neg = formats.mxs_quantize(-torch.zeros(1, 16), "mx4").dequantize()
    assert neg.eq(0).all() and torch.signbit(neg).all()             # -0 keeps its sign bit


def test_subnormal_range_within_a_block():
    # E = 0 (max 1.0); pair (1.0, 2^-10) μ = 0 -> step 2^-3 for MX6: 2^-10 underflows to 0;
    # pair (2^-4, 2^-5) μ = 1 -> step 2^-4: 2^-4 exact, 2^-5 = half a step -> tie -> 0;
    # pair (0.09375, 0) μ = 1: 0.09375 / 2^-4 = 1.5 -> tie -> 2 -> 0.125
    block = [1.0, 2.0**-10, 2.0**-4, 2.0**-5, 0.09375] + [0.0] * 11
    assert _deq(block, "mx6") == [1.0, 0.0, 0.0625, 0.0, 0.125] + [0.0] * 11


def test_fp32_subnormal_block_clamps_the_shared_exponent():
    # every element 2^-130: E would be -130, the byte holds -127. MX9 step 2^(-127-6-1) = 2^-134: q = 16, exact;
    # MX4 step 2^(-127-1-1) = 2^-129: 2^-130 is half a step -> tie -> 0
    tiny = [2.0**-130] * 16
    q = formats.mxs_quantize(_block(tiny), "mx9")
    assert q.exponents.tolist() == [[0]]
    assert _deq(tiny, "mx9") == tiny
    assert _deq(tiny, "mx4") == [0.0] * 16


def test_saturation():
    # 15.99: E = 3. MX4 step 4 (μ = 0 for its pair): 3.9975 -> 4 -> saturates at 3 -> 12; MX9 step 1/8:
    # 127.92 -> 128 -> saturates at 127 -> 15.875
    block = [15.99, -15.99] + [0.0] * 14
    assert _deq(block, "mx4")[:2] == [12.0, -12.0]
    assert _deq(block, "mx9")[:2] == [15.875, -15.875]
    big = [3.0e38] + [0.0] * 15                                     # near FLT_MAX: E = 127, no overflow
    assert _deq(big, "mx4")[0] == 3 * 2.0**126


@pytest.mark.parametrize("fmt", sorted(MXS_FORMATS))
def test_random_blocks_match_the_reference_and_the_fake_quantizer(fmt):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-4, 4, 64)   # blocks of very different ranges
    x[0, :16] = 0
    ours = formats.mxs_quantize(x, fmt).dequantize()
    ref = torch.tensor([mxs_quantize_reference(b, fmt) for b in x.view(-1, 16).tolist()]).view(x.shape)
    assert torch.equal(ours, ref)
    assert torch.equal(formats.mxs_fake_quantize(x, fmt), ours)


@pytest.mark.parametrize("fmt", sorted(MXS_FORMATS))
def test_bits_per_element(fmt):
    m = MXS_FORMATS[fmt]
    q = formats.mxs_quantize(torch.randn(4, 128), fmt)
    nbytes = q.exponents.numel() + q.micro.numel() + q.codes.numel()
    assert nbytes * 8 / (4 * 128) == m + 2                           # MX9 9, MX6 6, MX4 4


def test_pack_bits_round_trip_and_order():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    packed = pack_bits(codes, 3)                                     # LSB first: bits 001 010 110 001 101 011 111 000
    assert packed.tolist() == [[0b11010001, 0b01011000, 0b00011111]]
    assert torch.equal(unpack_bits(packed, 3, 8), codes)


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.mxs_quantize(torch.ones(2, 24), "mx6")
    with pytest.raises(ValueError, match="Inf or NaN"):
        formats.mxs_quantize(torch.tensor([float("inf")] * 16), "mx6")
    with pytest.raises(ValueError, match="unknown"):
        formats.mxs_quantize(torch.ones(16), "mx5")
