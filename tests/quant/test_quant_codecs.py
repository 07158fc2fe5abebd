"""Element codecs (nemotron3/quant/fp_codecs.py) against hand-worked vectors, torchao's bit
kernels and the slow table-lookup reference.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

import math

import pytest
import torch

# torchao 0.18 is a pinned test dependency: a missing torchao must fail, not skip
import torchao.prototype.mx_formats.kernels as torchao_kernels
from torchao.prototype.custom_fp_utils import _floatx_unpacked_to_f32

from nemotron3.quant import formats
from nemotron3.quant.fp_codecs import _encode_reference

# torchao test_kernels.py: (input, expected value, expected exponent+mantissa bits), both signs
AO_FP4_CASES = [
    (0.25, 0.0, "000"), (0.1, 0.0, "000"), (0.0, 0.0, "000"),
    (0.6, 0.5, "001"), (0.5, 0.5, "001"), (0.4, 0.5, "001"),
    (1.25, 1.0, "010"), (1.1, 1.0, "010"), (1.0, 1.0, "010"), (0.9, 1.0, "010"), (0.75, 1.0, "010"),
    (1.6, 1.5, "011"), (1.5, 1.5, "011"), (1.4, 1.5, "011"),
    (2.5, 2.0, "100"), (2.1, 2.0, "100"), (2.0, 2.0, "100"), (1.9, 2.0, "100"), (1.75, 2.0, "100"),
    (3.1, 3.0, "101"), (3.0, 3.0, "101"), (2.9, 3.0, "101"),
    (5.0, 4.0, "110"), (4.1, 4.0, "110"), (4.0, 4.0, "110"), (3.9, 4.0, "110"), (3.5, 4.0, "110"),
    (6.1, 6.0, "111"), (6.0, 6.0, "111"), (5.9, 6.0, "111"),
]


@pytest.mark.parametrize("val,ref,em", AO_FP4_CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_fp4_ao_tie_vectors(val, ref, em, sign):
    code = formats.encode(torch.tensor([sign * val]), "e2m1")
    assert code.item() == int(("1" if sign < 0 else "0") + em, 2)
    assert formats.decode(code, "e2m1").item() == sign * ref


def test_fp4_pack_unpack_vector():
    vals = torch.tensor([[0.0, 0.5, 4.0, -0.0], [-0.0, 1.0, -6.0, 3.0]])
    packed = formats.pack_fp4(formats.encode(vals, "e2m1"))
    assert torch.equal(packed, torch.tensor([[0x10, 0x86], [0x28, 0x5F]], dtype=torch.uint8))
    back = formats.decode(formats.unpack_fp4(packed), "e2m1")
    assert torch.equal(back, vals) and torch.equal(torch.signbit(back), torch.signbit(vals))


def test_fp4_packing_order_element_2i_low_nibble():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = formats.pack_fp4(codes)
    assert packed.tolist() == [c0 | (c1 << 4) for c0, c1 in zip(range(0, 16, 2), range(1, 16, 2))]
    assert torch.equal(formats.unpack_fp4(packed), codes)


def _interesting(fmt):
    """Every grid value, every midpoint and its fp32 neighbours, overflow, NaN, ±0, subnormals."""
    f = formats.element_format(fmt)
    pos = formats.element_values(fmt)[: 1 << (f.ebits + f.mbits)]
    mids = (pos[1:] + pos[:-1]) / 2
    up, down = torch.tensor(1e9), torch.tensor(0.0)
    x = torch.cat([
        pos, mids, torch.nextafter(mids, down), torch.nextafter(mids, up),
        torch.randn(2000, generator=torch.Generator().manual_seed(0)) * f.max / 2,
        torch.tensor([f.max * 1.01, f.max * 3, 1e30, math.inf, 0.0, 1e-40, 1e-45, math.nan]),
    ])
    return torch.cat([x, -x])


@pytest.mark.parametrize("fmt", ["e2m1", "e2m3", "e3m2"])
def test_subbyte_encode_matches_reference_and_torchao(fmt):
    x = _interesting(fmt)
    ours = formats.encode(x, fmt)
    assert torch.equal(ours, _encode_reference(x, fmt))
    ao_fn = {"e2m1": torchao_kernels.f32_to_f4_unpacked, "e2m3": torchao_kernels.f32_to_f6_e2m3_unpacked,
             "e3m2": torchao_kernels.f32_to_f6_e3m2_unpacked}[fmt]
    finite = ~torch.isnan(x)        # torchao's code for NaN depends on the payload; ours is +max
    assert torch.equal(ours[finite], ao_fn(x)[finite])
    assert (ours[~finite] == (1 << (formats.element_format(fmt).nbits - 1)) - 1).all()


@pytest.mark.parametrize("fmt,ebits,mbits", [("e2m1", 2, 1), ("e2m3", 2, 3), ("e3m2", 3, 2)])
def test_subbyte_decode_matches_torchao(fmt, ebits, mbits):
    codes = torch.arange(1 << (1 + ebits + mbits), dtype=torch.uint8)
    assert torch.equal(formats.decode(codes, fmt), _floatx_unpacked_to_f32(codes, ebits, mbits))


@pytest.mark.parametrize("val,code", [(29.0, 0b011111), (26.0, 0b011110), (0.1251, 0b000010),
                                      (0.0314, 0b000001), (0.03, 0b000000)])
def test_fp6_e3m2_ao_rounding_vectors(val, code):
    assert formats.encode(torch.tensor([val, -val]), "e3m2").tolist() == [code, code | 0b100000]


def test_fp8_codecs_saturate_and_keep_nan():
    x = torch.tensor([500.0, 464.0, math.inf, -math.inf, math.nan, 1.0, -0.0])
    e4 = formats.encode(x, "e4m3")
    assert e4.tolist()[:4] == [0x7E, 0x7E, 0x7E, 0xFE] and e4[4] & 0x7F == 0x7F
    assert e4.tolist()[5:] == [0x38, 0x80]
    e5 = formats.encode(torch.tensor([1e6, -math.inf, 57344.0, 61440.0]), "e5m2")
    assert e5.tolist() == [0x7B, 0xFB, 0x7B, 0x7B]            # satfinite: never Inf
    assert formats.decode(e5, "e5m2").tolist() == [57344.0, -57344.0, 57344.0, 57344.0]


@pytest.mark.parametrize("fmt,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_round_to_format_equals_the_float8_cast(fmt, dtype):
    """The fast paths round block scales and MXFP8 elements in fp32 (round_to_format) instead of
    PyTorch's slow CPU float8 cast: same values, on a stride through every fp32 bit pattern up to
    max (subnormals included), each grid point and midpoint and their fp32 neighbours, values
    above max, ±0, ±Inf and NaN, both signs. (Checked once on every fp32 value up to max.)"""
    f = formats.element_format(fmt)
    top = int(torch.tensor(f.max).view(torch.int32))
    strided = torch.arange(0, top + (1 << 22), 997, dtype=torch.int32).view(torch.float32)
    grid = formats.decode(torch.arange(128, dtype=torch.uint8), fmt)
    grid = grid[torch.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2
    pts = torch.cat([grid, mids])
    specials = torch.tensor([0.0, f.max * 1.01, 1e30, math.inf, math.nan])
    v = torch.cat([strided, pts, torch.nextafter(pts, torch.tensor(math.inf)),
                   torch.nextafter(pts, torch.tensor(0.0)), specials])
    v = torch.cat([v, -v])
    ref = v.clamp(-f.max, f.max).to(dtype).to(torch.float32)
    ours = formats.round_to_format(v, fmt)
    nan = torch.isnan(ref)
    assert torch.equal(nan, torch.isnan(ours))
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))   # -0.0 included


def test_e8m0_encode_rules():
    tiny = 2.0 ** -127                                       # an fp32 subnormal: mantissa 0x400000
    just_above = torch.tensor(tiny).view(torch.int32).add(1).view(torch.float32).item()
    x = torch.tensor([1.0, 1.5, 2.0 ** -126, tiny, just_above, 0.0, 1e-45, 3e38, math.inf, math.nan])
    assert formats.encode_e8m0(x, "floor").tolist() == [127, 127, 1, 0, 0, 0, 0, 254, 254, 255]
    assert formats.encode_e8m0(x, "ceil").tolist() == [127, 128, 1, 0, 1, 0, 0, 254, 254, 255]
    dec = formats.decode_e8m0(torch.tensor([0, 1, 127, 254, 255], dtype=torch.uint8))
    assert dec[:4].tolist() == [tiny, 2.0 ** -126, 1.0, 2.0 ** 127] and math.isnan(dec[4])


# ---------------------------------------------------------------------------------------------
# stochastic rounding


@pytest.mark.parametrize("v", [0.1, 0.3, 0.8, 1.2, 2.7, 3.9, 4.6, 5.5, -0.3, -2.7, -5.5])
def test_stochastic_rounding_is_unbiased(v):
    n = 20000
    g = torch.Generator().manual_seed(1)
    q = formats.round_e2m1(torch.full((n,), v), g, stochastic=True)
    grid = formats.element_values("e2m1")
    lo = grid[grid <= abs(v)].max().item()
    hi = grid[grid >= abs(v)].min().item()
    assert set(q.abs().unique().tolist()) <= {lo, hi}                 # only the two neighbours
    step = hi - lo
    p = (abs(v) - lo) / step
    sigma = step * math.sqrt(p * (1 - p) / n)
    # the hardware consumes 8 random bits per element: P(up) = floor(256 p)/256, bias < step/256
    assert abs(q.mean().item() - v) <= step / 256 + 5 * sigma


def test_stochastic_rounding_beats_nearest_on_average():
    """TE's test_nvfp4_sr_quantize: the mean of many SR quantizations has lower RMSE than RN."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    rn = formats.nvfp4_fake_quantize(x)
    sr_mean = torch.stack([formats.nvfp4_fake_quantize(x, stochastic_rounding=True, generator=g)
                           for _ in range(50)]).mean(0)
    rmse = lambda a: (a - x).pow(2).mean().sqrt().item()  # noqa: E731
    assert rmse(sr_mean) < 0.5 * rmse(rn)


def test_stochastic_rounding_reproducible_with_seed():
    x = torch.randn(1000)
    a = formats.round_e2m1(x, torch.Generator().manual_seed(7), stochastic=True)
    b = formats.round_e2m1(x, torch.Generator().manual_seed(7), stochastic=True)
    c = formats.round_e2m1(x, torch.Generator().manual_seed(8), stochastic=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_exact_values_stay():
    grid = formats.element_values("e2m1")
    q = formats.round_e2m1(grid.repeat(100), torch.Generator().manual_seed(0), stochastic=True)
    assert torch.equal(q, grid.repeat(100))


# ---------------------------------------------------------------------------------------------
# bad input


def test_codec_errors():
    with pytest.raises(ValueError, match="unknown element format"):
        formats.encode(torch.zeros(2), "e9m9")
    with pytest.raises(TypeError, match="floating-point"):
        formats.encode(torch.zeros(2, dtype=torch.int32), "e2m1")
    with pytest.raises(ValueError, match="odd last dimension"):
        formats.pack_fp4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="rounding"):
        formats.encode_e8m0(torch.ones(2), "nearest")
    with pytest.raises(ValueError, match="codes must be <"):
        formats.decode(torch.tensor([16], dtype=torch.uint8), "e2m1")
