"""NVFP4 and MX quantizers: bit-identical to torchao 0.18, and the `te` convention against
hand-worked vectors and a naive per-block loop written from docs/low-precision.md §1.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

import math

import numpy as np
import pytest
import torch

# torchao 0.18 is a pinned test dependency: a missing torchao must fail, not skip
import torchao.prototype.mx_formats.mx_tensor as mx_ao
import torchao.prototype.mx_formats.nvfp4_tensor as nvfp4_ao
from torchao.prototype.mx_formats.config import ScaleCalculationMode

from nemotron3.quant import formats
from nemotron3.quant.mx import mx_scale_reference
from nemotron3.quant.nvfp4 import nvfp4_quantize_reference

f32 = np.float32


def _inputs(block: int):
    g = torch.Generator().manual_seed(0)
    yield "normal-fp32", torch.randn(32, 8 * block, generator=g)
    yield "normal-bf16", torch.randn(32, 8 * block, generator=g).bfloat16()
    yield "heavy-tailed", torch.distributions.StudentT(1.2).sample((32, 8 * block))
    z = torch.randn(16, 4 * block, generator=g)
    z[:, :block] = 0
    z[3] = 0
    yield "zero-blocks", z
    m = torch.randn(8, 4 * block, generator=g)
    fmax = torch.finfo(torch.float32).max
    m[0, 0], m[1, 5], m[2, 3] = fmax, -fmax, 486.0
    yield "max", m
    yield "subnormal", torch.randn(8, 4 * block, generator=g) * 1e-39
    yield "tiny", torch.randn(8, 4 * block, generator=g) * 1e-36
    yield "3-d", torch.randn(2, 8, 4 * block, generator=g)


# ---------------------------------------------------------------------------------------------
# NVFP4, torchao convention


NVFP4_INPUTS = dict(_inputs(16))


@pytest.mark.parametrize("name", list(NVFP4_INPUTS))
@pytest.mark.parametrize("with_scale", [False, True])
def test_nvfp4_torchao_convention_bit_identical(name, with_scale):
    x = NVFP4_INPUTS[name]
    pts = nvfp4_ao.per_tensor_amax_to_scale(x.abs().max()) if with_scale else None
    ref = nvfp4_ao.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts)
    ours = formats.nvfp4_quantize(x, pts, convention="torchao")
    assert ours.packed.dtype == torch.uint8 and ours.scales.dtype == torch.float8_e4m3fn
    assert ours.packed.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert ours.scales.shape == (*x.shape[:-1], x.shape[-1] // 16)
    assert torch.equal(ours.packed, ref.qdata)
    assert torch.equal(ours.scales.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(ours.dequantize(), ref.dequantize(torch.float32))
    assert (ours.per_tensor_scale is None) == (pts is None)


# ---------------------------------------------------------------------------------------------
# NVFP4, te convention: hand-worked vectors (docs/low-precision.md §1)


def test_te_ties_and_saturation_hand_vectors():
    # global amax 2688 -> S_enc = 2688/2688 = 1, S_dec = 1. Block 0 (amax 6):
    #   s_b = e4m3(6 * fp32(1/6)) = e4m3(fp32(1.0000000298)) = e4m3(1.0) = 1.0  (0x38)
    #   enc = 1 / (1.0 * 1) = 1: the elements reach the E2M1 cast unchanged, ties intact.
    # Block 1 (amax 2688): s_b = e4m3(2688 * fp32(1/6) = 448.000008 -> 448) = 448  (0x7E).
    # Block 2 (amax 6.3): s_b = e4m3(1.05) = 1.0 (1.05 is nearer 1.0 than 1.125), enc = 1, so
    #   6.3 saturates to 6 (code 7) and 5.5 rounds to 6 (code 7).
    ties = [6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.1]
    codes = [7, 0, 2, 2, 4, 4, 6, 6, 8, 10, 10, 12, 12, 14, 14, 0]
    x = torch.zeros(1, 48)
    x[0, :16] = torch.tensor(ties)
    x[0, 16] = 2688.0
    x[0, 32], x[0, 33], x[0, 34] = 6.3, 5.5, -6.3
    q = formats.nvfp4_quantize(x)
    assert q.scales.view(torch.uint8).tolist() == [[0x38, 0x7E, 0x38]]
    assert q.codes[0, :16].tolist() == codes
    assert q.codes[0, 16] == 7 and q.codes[0, 17:32].tolist() == [0] * 15
    assert q.codes[0, 32:35].tolist() == [7, 7, 15]
    assert q.per_tensor_scale.item() == 1.0


def test_te_single_rounding_scale_product_and_zero_scale_block():
    # global amax 7 -> S_enc = fp32(2688/7) = 384 exactly; S_enc * fp32(1/6) = fp32(64.0000019) = 64.
    # Block 1 amax b = 31/4096 - 2^-31 (the fp32 just below 31/4096):
    #   TE:      b * 64 = 31/64 - 2^-25, just below the E4M3 midpoint 0.484375 between
    #            0.46875 (0x2F) and 0.5 (0x30)  ->  0.46875, 0x2F
    #   (b/6)*S_enc (two roundings) lands exactly on the midpoint and ties to even: 0.5, 0x30.
    #   enc = 1/(0.46875 * fp32(1/384)) ~ 819.2, so b*enc ~ 6.2 saturates to code 7 and
    #   -b/2 * enc ~ -3.1 rounds to -3 (code 13).
    # Block 2 amax 1e-6: 1e-6 * 64 = 6.4e-5 < 2^-10 (half the smallest E4M3 subnormal 2^-9),
    #   so s_b = 0: a zero-scale block; enc = min(1/0, FLT_MAX) = FLT_MAX saturates the non-zero
    #   elements to codes 7 / 15, which decode to 0.
    b = float(np.nextafter(f32(31 / 4096), f32(0)))
    assert b == 31 / 4096 - 2 ** -31
    x = torch.zeros(1, 48)
    x[0, 0] = 7.0
    x[0, 16], x[0, 17] = b, -b / 2
    x[0, 32], x[0, 33] = 1e-6, -1e-6
    q = formats.nvfp4_quantize(x)
    assert q.scales.view(torch.uint8).tolist() == [[0x7E, 0x2F, 0x00]]
    assert q.codes[0, 16:18].tolist() == [7, 13]
    assert q.codes[0, 32:34].tolist() == [7, 15]
    deq = q.dequantize()
    assert deq[0, 32:].abs().max() == 0
    # the double-rounded order really does pick the other neighbour
    double = (f32(b) / f32(6)) * f32(384)
    assert double == f32(0.484375)
    assert torch.tensor(float(double)).to(torch.float8_e4m3fn).view(torch.uint8).item() == 0x30


def test_te_and_torchao_disagree_on_small_blocks():
    # Same tensor, same per-tensor scale 1/S_enc = 1 (amax 2688). A block with amax 0.03:
    #   te:      s_b = e4m3(0.03 * fp32(1/6) = 0.005) = 3 * 2^-9 = 0.005859375 (0x03), no floor
    #   torchao: s_b = clamp(0.005, min=2^-6) = 0.015625 (0x08)
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 16], x[0, 17] = 2688.0, 0.03, 0.004
    te = formats.nvfp4_quantize(x)
    ao = formats.nvfp4_quantize(x, per_tensor_scale=1.0, convention="torchao")
    assert te.scales.view(torch.uint8)[0, 1] == 0x03
    assert ao.scales.view(torch.uint8)[0, 1] == 0x08
    assert not torch.equal(te.packed, ao.packed)
    # te keeps the block's resolution: 0.03 -> 0.03515625 (6 * s_b), torchao's floor -> 0.03125
    assert te.dequantize()[0, 16].item() == 6 * 3 * 2 ** -9
    assert ao.dequantize()[0, 16].item() == 2 * 2 ** -6


# ---------------------------------------------------------------------------------------------
# NVFP4, te convention: the naive per-block loop (numpy float32 scalars, tables from bit fields)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block_2d", [False, True])
def test_te_matches_naive_loop(seed, block_2d):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20, 64, generator=g) * torch.logspace(-3, 2, 20).unsqueeze(1)
    x[5, 16:32] = 0
    x[7, :16] *= 1e-5                                       # underflowing / zero-scale blocks
    scales, codes = nvfp4_quantize_reference(x, block_2d=block_2d)
    q = formats.nvfp4_quantize(x, block_2d=block_2d)
    assert torch.equal(q.scales.view(torch.uint8), scales)
    assert torch.equal(q.codes, codes)


def test_te_bf16_input_and_explicit_scales():
    x = torch.randn(16, 64).bfloat16()
    q = formats.nvfp4_quantize(x)
    assert torch.equal(q.packed, formats.nvfp4_quantize(x.float()).packed)
    amax = x.float().abs().max()
    assert torch.equal(formats.nvfp4_quantize(x, amax=amax).packed, q.packed)
    s_enc, s_dec = formats.te_global_scales(amax)
    assert s_enc.item() == f32(2688) / f32(amax.item()) and s_dec.item() == f32(1) / s_enc.numpy()
    zeros = formats.nvfp4_quantize(torch.zeros(2, 32))
    assert zeros.per_tensor_scale.item() == 1.0 and zeros.packed.eq(0).all()


def test_2d_blocks_transpose_is_the_same_tensor():
    w = torch.randn(40, 48) * torch.rand(40, 1) * 10         # 40 rows: last tile is partial
    q = formats.nvfp4_quantize(w, block_2d=True).dequantize()
    qt = formats.nvfp4_quantize(torch.nn.functional.pad(w.t(), (0, 8)), block_2d=True).dequantize()
    assert torch.equal(q.t(), qt[:, :40])
    s = formats.nvfp4_quantize(w, block_2d=True).scales.view(torch.uint8)
    assert torch.equal(s[:16], s[:1].expand(16, -1))          # one scale per 16x16 tile


@pytest.mark.parametrize("kwargs", [{}, {"block_2d": True}, {"stochastic_rounding": True}])
def test_fake_quantize_equals_dequantized_codes(kwargs):
    x = torch.randn(32, 64)
    gen = {"generator": torch.Generator().manual_seed(3)} if "stochastic_rounding" in kwargs else {}
    gen2 = {"generator": torch.Generator().manual_seed(3)} if gen else {}
    assert torch.equal(formats.nvfp4_fake_quantize(x, **kwargs, **gen),
                       formats.nvfp4_quantize(x, **kwargs, **gen2).dequantize())


def test_columnwise_axis_equals_transposed_quantization():
    x = torch.randn(48, 80) * torch.logspace(-2, 2, 80)
    assert torch.equal(formats.nvfp4_fake_quantize(x, axis=-2), formats.nvfp4_fake_quantize(x.t()).t())
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    sr_col = formats.nvfp4_fake_quantize(x, axis=-2, stochastic_rounding=True, generator=g1)
    sr_row = formats.nvfp4_fake_quantize(x.t(), stochastic_rounding=True, generator=g2).t()
    assert torch.equal(sr_col, sr_row)                      # random bytes follow xᵀ's row-major order
    for mode in ("floor", "rceil"):
        assert torch.equal(formats.mx_fake_quantize(x[:32], "fp8_e4m3", mode, axis=-2),
                           formats.mx_fake_quantize(x[:32].t(), "fp8_e4m3", mode).t())
    buf = x.clone()                                          # out= may alias the input
    assert torch.equal(formats.nvfp4_fake_quantize(buf, out=buf), formats.nvfp4_fake_quantize(x))


def test_stochastic_rounding_bytes_are_row_major_whatever_the_chunking():
    # 40000 x 16 is processed in three chunks; the bytes must be one row-major stream
    x = torch.randn(40000, 16)
    ours = formats.nvfp4_fake_quantize(x, stochastic_rounding=True, generator=torch.Generator().manual_seed(9))
    rbits = formats.random_bytes(x.numel(), torch.Generator().manual_seed(9)).view(x.shape)
    s_enc, s_dec = formats.te_global_scales(x.abs().max())
    s_b = (x.abs().view(-1, 16).amax(1, keepdim=True) * (s_enc * (1 / torch.tensor(6.0))))
    s_b = s_b.clamp(max=448).to(torch.float8_e4m3fn).float()
    enc = (1 / (s_b * s_dec)).clamp(max=torch.finfo(torch.float32).max)
    mag = formats.round_magnitude_((x.abs().view(-1, 16) * enc).view(x.shape), "e2m1", stochastic=True, rbits=rbits)
    ref = (mag.copysign(x).view(-1, 16) * (s_dec * s_b)).view(x.shape)
    assert torch.equal(ours, ref)


def test_fake_quantize_and_rht_do_not_depend_on_the_chunking(monkeypatch):
    """Chunks share scratch buffers and the last one is shorter (208 rows in 32-row chunks; 200 for
    the 16x16 tiles, the last one partial): the results must be those of one chunk, bit for bit."""
    import nemotron3.quant.fp_codecs as fp_codecs
    import nemotron3.quant.hadamard as hadamard
    import nemotron3.quant.mx as mx
    import nemotron3.quant.nvfp4 as nvfp4

    x = torch.randn(208, 64, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 3, 64)
    sr = lambda: {"stochastic_rounding": True, "generator": torch.Generator().manual_seed(6)}  # noqa: E731
    cases = [
        lambda: formats.nvfp4_fake_quantize(x), lambda: formats.nvfp4_fake_quantize(x, axis=-2),
        lambda: formats.nvfp4_fake_quantize(x[:200], block_2d=True), lambda: formats.nvfp4_fake_quantize(x, **sr()),
        lambda: formats.nvfp4_fake_quantize(x, axis=-2, **sr()), lambda: formats.nvfp4_quantize(x, **sr()).packed,
        lambda: formats.mx_fake_quantize(x[:192], "fp8_e4m3", "rceil", axis=-2),
        lambda: formats.mx_fake_quantize(x, "fp6_e2m3", "floor"), lambda: formats.rht(x, axis=-2),
        lambda: formats.rht(x, round_to_bf16=False),
    ]
    whole = [f() for f in cases]                              # 13312 elements: one chunk each
    small = lambda t, align=1: fp_codecs.row_chunks(t, align, target=2048)  # noqa: E731
    for module in (nvfp4, mx, hadamard):
        monkeypatch.setattr(module, "row_chunks", small)
    assert [r.stop - r.start for r in small(x, 16)] == [32] * 6 + [16]
    for f, ref in zip(cases, whole):
        assert torch.equal(f(), ref)


def test_nvfp4_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.nvfp4_quantize(torch.randn(4, 20))
    with pytest.raises(ValueError, match="unknown NVFP4 convention"):
        formats.nvfp4_quantize(torch.randn(4, 32), convention="modelopt")
    with pytest.raises(TypeError, match="floating-point"):
        formats.nvfp4_quantize(torch.ones(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="torchao convention"):
        formats.nvfp4_quantize(torch.randn(32, 32), convention="torchao", block_2d=True)
    with pytest.raises(ValueError, match="2-D"):
        formats.nvfp4_quantize(torch.randn(2, 32, 32), block_2d=True)
    with pytest.raises(ValueError, match="axis"):
        formats.nvfp4_fake_quantize(torch.randn(2, 32, 32), axis=-2)
    with pytest.raises(ValueError, match="dimension -2"):
        formats.nvfp4_fake_quantize(torch.randn(20, 32), axis=-2)


# ---------------------------------------------------------------------------------------------
# MX vs torchao MXTensor.to_mx


AO_ELEM = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp6_e2m3": "fp6_e2m3",
           "fp6_e3m2": "fp6_e3m2", "fp4_e2m1": torch.float4_e2m1fn_x2}
AO_MODE = {"floor": ScaleCalculationMode.FLOOR, "rceil": ScaleCalculationMode.RCEIL}


def _mx_inputs():
    yield from _inputs(32)
    n = torch.randn(8, 128)
    n[0, 3] = math.nan
    n[1, 40] = math.inf
    n[2, 70] = -math.inf
    n[3, 0], n[3, 1] = math.nan, math.inf
    yield "nan-inf", n
    yield "nan-inf-bf16", n.bfloat16()


@pytest.mark.parametrize("elem", list(AO_ELEM))
@pytest.mark.parametrize("mode", list(AO_MODE))
def test_mx_bit_identical_to_torchao(elem, mode):
    for name, x in _mx_inputs():
        ref = mx_ao.MXTensor.to_mx(x, AO_ELEM[elem], 32, AO_MODE[mode])
        ours = formats.mx_quantize(x, elem, mode)
        assert ours.scales.dtype == torch.float8_e8m0fnu
        assert ours.scales.shape == (*x.shape[:-1], x.shape[-1] // 32)
        assert torch.equal(ours.scales.view(torch.uint8), ref.scale.view(torch.uint8)), name
        ref_deq = ref.dequantize(torch.float32)
        ours_codes = ours.codes
        ref_codes = ref.qdata.view(torch.uint8)
        if elem == "fp4_e2m1":
            ref_codes = formats.unpack_fp4(ref_codes)
            assert ours.qdata.shape == ref.qdata.shape
        else:
            assert ours.qdata.dtype == ref.qdata.dtype
        # sub-byte formats cannot encode NaN: torchao's code there depends on the NaN payload
        # (ours is +max); those elements sit in blocks whose scale is NaN (0xFF), checked above.
        comparable = (~torch.isnan(ref_deq) if elem.startswith(("fp4", "fp6"))
                      else torch.ones_like(ref_deq, dtype=torch.bool))
        assert torch.equal(ours_codes[comparable], ref_codes[comparable]), name
        assert torch.equal(ours.dequantize().nan_to_num(7.0), ref_deq.nan_to_num(7.0)), name
        fake = formats.mx_fake_quantize(x, elem, mode)
        assert torch.equal(fake.nan_to_num(7.0), ours.dequantize().nan_to_num(7.0)), name


def test_mx_rceil_hardware_vectors():
    """Vectors from torchao's test_to_mx_rceil (a GPU ground truth, skipped in torchao itself).

    For the NaN block we check only the scale (0xFF): that test expects the block's finite
    elements to encode as 0, while torchao's eager path (which we match) multiplies them by
    the NaN reciprocal; with a NaN scale the whole block decodes to NaN either way."""
    nan_block = torch.tensor([
        2143289344, 1054459450, 1060527345, 1045656552, 1058239340, 1045057552, 1061158006, 1049626606,
        1052757568, 1032293288, 1056992320, 1064929425, 1061036255, 1047450552, 1057077424, 1055125012,
        1036491424, 1063542041, 1057099838, 1058731224, 1050189482, 1049114228, 1058347802, 1060065968,
        1058846156, 1048878912, 1065109089, 1054494928, 1044803976, 1049117692, 1065222528, 1056965012,
    ], dtype=torch.int64).to(torch.int32).view(torch.float32)
    q = formats.mx_quantize(nan_block, "fp8_e4m3", "rceil")
    assert q.scales.view(torch.uint8).item() == 255 and torch.isnan(q.qdata[0].float())
    assert torch.isnan(q.dequantize()).all()
    some_denorm = torch.tensor([
        8388608, 1063716449, 1064039365, 1063568877, 1051091338, 1062185569, 1034449408, 1060813641,
        1054893736, 1034907680, 1036660744, 1023639888, 1058536559, 1050896496, 1049237634, 1064950601,
        1051852994, 1059794063, 1054011102, 1062023602, 1059467900, 1062276774, 1059155029, 1053287574,
        1064378711, 1055768540, 1045266076, 1059575077, 1054928758, 1040468200, 1058061961, 1053066436,
    ], dtype=torch.int64).to(torch.int32).view(torch.float32)
    q = formats.mx_quantize(some_denorm, "fp8_e4m3", "rceil")
    assert q.scales.view(torch.uint8).item() == 119
    assert q.qdata.view(torch.uint8).tolist() == [
        0, 118, 119, 118, 106, 117, 91, 116, 110, 91, 93, 80, 113, 106, 105, 120,
        107, 115, 109, 117, 114, 117, 114, 108, 119, 111, 101, 114, 110, 96, 113, 108]
    denorm = torch.tensor([
        6142315, 5096174, 3345704, 6178415, 5728750, 419002, 1716691, 4335089,
        5785800, 6234845, 1697524, 33075, 3975816, 3714822, 5411407, 3040844,
        7400945, 4474166, 7257182, 1273750, 5872176, 4694081, 2096530, 6273621,
        67028, 7585260, 4532315, 4599275, 6133942, 4542483, 5992199, 6862780,
    ], dtype=torch.int32).view(torch.float32)
    q = formats.mx_quantize(denorm, "fp8_e4m3", "rceil")
    assert q.scales.view(torch.uint8).item() == 0 and q.qdata.view(torch.uint8).eq(0).all()


def test_mx_rceil_follows_the_instruction_where_torchao_eager_does_not():
    # amax/448 = 2^-5 * (1 + 2^-23): cvt.rp rounds up to 2^-4 (any mantissa bit set). torchao's
    # eager fallback computes ceil(log2(d)) in fp32, where log2(d) rounds to exactly -5.
    d = torch.nextafter(torch.tensor(2.0 ** -5), torch.tensor(1.0))
    x = torch.zeros(1, 32)
    x[0, 0] = d * 448
    assert (x[0, 0] / 448).item() == d.item()
    ours = formats.mx_quantize(x, "fp8_e4m3", "rceil")
    ref = mx_ao.MXTensor.to_mx(x, torch.float8_e4m3fn, 32, ScaleCalculationMode.RCEIL)
    assert ours.scales.view(torch.uint8).item() == 127 - 4
    assert ref.scale.view(torch.uint8).item() == 127 - 5
    assert ours.qdata.float()[0, 0] < 448                    # RCEIL never saturates the block max


@pytest.mark.parametrize("elem", list(AO_ELEM))
@pytest.mark.parametrize("mode", list(AO_MODE))
def test_mx_scales_match_per_block_reference(elem, mode):
    x = torch.randn(16, 256) * torch.logspace(-40, 30, 16).unsqueeze(1)
    x[0, :32] = 0
    x[1, 0], x[2, 40], x[3, 70] = math.nan, math.inf, 2.0 ** -130
    got = formats.mx_quantize(x, elem, mode).scales.view(torch.uint8)
    amax = x.abs().view(16, -1, 32).amax(-1)
    want = [[mx_scale_reference(a, elem, mode) for a in row] for row in amax.tolist()]
    assert got.tolist() == want


def test_mx_floor_saturates_block_max():
    x = torch.zeros(1, 32)
    x[0, 0] = 486.0                                          # X = 2^(8 - 8) = 1, 486 clamps to 448
    q = formats.mx_quantize(x, "fp8_e4m3", "floor")
    assert q.scales.view(torch.uint8).item() == 127 and q.qdata.float()[0, 0] == 448


def test_mx_errors():
    with pytest.raises(ValueError, match="unknown MX elem_dtype"):
        formats.mx_quantize(torch.randn(2, 32), "int8")
    with pytest.raises(ValueError, match="unknown MX scale mode"):
        formats.mx_quantize(torch.randn(2, 32), "fp8_e4m3", mode="even")
    with pytest.raises(ValueError, match="multiple of the block size"):
        formats.mx_quantize(torch.randn(2, 48), "fp8_e4m3")
    with pytest.raises(TypeError, match="floating-point"):
        formats.mx_quantize(torch.ones(2, 32, dtype=torch.int32), "fp8_e4m3")
    assert formats.mx_quantize(torch.randn(2, 32), torch.float8_e4m3fn).elem_dtype == "fp8_e4m3"
