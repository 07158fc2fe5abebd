"""MX (OCP Microscaling v1.0): 32 elements share one E8M0 (power-of-two) scale.

Element types: fp8_e4m3, fp8_e5m2, fp6_e2m3, fp6_e3m2, fp4_e2m1 (docs/low-precision.md §3). The
result keeps real low-bit data: float8 tensors for MXFP8, one uint8 code per element for
MXFP6 (as torchao stores it), packed uint8 pairs for MXFP4, and the scales as
float8_e8m0fnu bits. Every formula below reproduces torchao 0.18's `to_mx` (eager path)
bit for bit; the places where that is a choice are said where they happen.

Scale modes
===========
`floor` (the spec's rule, torchao's default): X = 2^(floor(log2 amax) - emax_elem), with
the exponent read straight from amax's fp32 bits (exact; log2 can mis-floor just below a
power of two), clamped to [-127, 128] and biased by 127, so a NaN amax gives 0xFF and an
infinite one a large finite scale. As in torchao, elements are divided by
max(X, 2^-126): torchao's guard for compilers that flush 2^-127 to zero, which only
matters for blocks whose amax is below ~2^-118. FLOOR can saturate the block's maximum
(E4M3, amax 486: X = 1, and 486 clamps to 448).

`rceil` (NVIDIA's rule: cuBLAS, TE's MXFP8, `cvt.rp.satfinite.ue8m0x2.f32`): the scale is
amax / max_elem rounded *up* to a power of two, so the block max never saturates. The
exponent is computed from the fp32 bits (`fp_codecs.encode_e8m0(.., 'ceil')`), exactly as
the instruction does. torchao's eager fallback instead evaluates ceil(log2(d)) in fp32,
which rounds a d just a few ulps above a power of two down to that power and then ceils
to it: it disagrees with the instruction (and with torchao's own GPU path) on those d.
We follow the instruction; the tests show the case (random data never hits it). The
elements are multiplied by the reciprocal 2^(127-b), with TE's two special cases kept:
b == 0 uses 1.0, b == 254 (infinite amax) uses 2^-127, and a NaN scale makes the whole
block NaN.

Elements are then clamped to ±max and rounded to nearest even (fp_codecs); sub-byte
NaNs become +max codes (their block's scale is 0xFF, or the value came from Inf/Inf).
Dequantization is value · 2^(b-127), NaN for b = 0xFF, in the output dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemotron3.quant.fp_codecs import (
    ELEMENT_FORMATS,
    ElementFormat,
    _check_float,
    chunk_workspace,
    decode,
    decode_e8m0,
    encode,
    encode_e8m0,
    pack_fp4,
    round_magnitude_,
    row_chunks,
    scratch,
    unpack_fp4,
)

__all__ = ["MX_ELEM_DTYPES", "MX_MODES", "MXQuantized", "mx_quantize", "mx_fake_quantize", "mx_scale_reference"]

MX_BLOCK = 32
MX_MODES = ("floor", "rceil")
# elem_dtype name -> (element format, emax_elem = exponent of the largest power of two <= max)
MX_ELEM_DTYPES: dict[str, str] = {
    "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2", "fp6_e2m3": "e2m3", "fp6_e3m2": "e3m2", "fp4_e2m1": "e2m1",
}
_TORCH_ALIASES = {torch.float8_e4m3fn: "fp8_e4m3", torch.float8_e5m2: "fp8_e5m2", torch.float4_e2m1fn_x2: "fp4_e2m1"}


def _elem_name(elem_dtype: str | torch.dtype) -> str:
    name = _TORCH_ALIASES.get(elem_dtype, elem_dtype) if isinstance(elem_dtype, torch.dtype) else elem_dtype
    if name not in MX_ELEM_DTYPES:
        raise ValueError(f"unknown MX elem_dtype {elem_dtype!r}; expected one of {list(MX_ELEM_DTYPES)}")
    return name


@dataclass
class MXQuantized:
    """An MX tensor: element data and one E8M0 scale per 32 elements along the last dim."""

    qdata: torch.Tensor   # float8 (..., K) | uint8 fp6 codes (..., K) | uint8 packed fp4 (..., K/2)
    scales: torch.Tensor  # float8_e8m0fnu (..., K/32)
    elem_dtype: str
    block_size: int = MX_BLOCK

    @property
    def codes(self) -> torch.Tensor:
        """One uint8 code per element (..., K)."""
        if self.elem_dtype == "fp4_e2m1":
            return unpack_fp4(self.qdata)
        return self.qdata.view(torch.uint8) if self.qdata.dtype != torch.uint8 else self.qdata

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        fmt = MX_ELEM_DTYPES[self.elem_dtype]
        vals = decode(self.qdata if fmt in ("e4m3", "e5m2") else self.codes, fmt).to(dtype)
        scale = decode_e8m0(self.scales).to(dtype).unsqueeze(-1)
        return (vals.unflatten(-1, (-1, self.block_size)) * scale).flatten(-2)


def _blocks(t: torch.Tensor, axis: int, block_size: int) -> tuple[torch.Tensor, int]:
    """(view with each block on its own axis, that axis): (..., K/bs, bs) or (R/bs, bs, K)."""
    if axis == -1:
        return t.unflatten(-1, (-1, block_size)), -1
    return t.unflatten(0, (-1, block_size)), 1


def _block_scale(
    xabs: torch.Tensor, fmt: ElementFormat, mode: str, bdim: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(E8M0 bits uint8, factor, divide) for |x| in blocks: x is scaled into the element range
    as x / factor if `divide` (floor) else x · factor (rceil). Bits and factor keep the block
    axis `bdim` as size 1, so they broadcast against the blocks."""
    amax = xabs.amax(bdim, keepdim=True)                               # NaN if any NaN
    if mode == "floor":
        exp = ((amax.view(torch.int32) >> 23) & 0xFF) - 127 - fmt.emax  # floor(log2 amax) - emax
        bits = (exp.clamp_(-127, 128) + 127)
        bits = torch.where(torch.isnan(amax), 255, bits)
        scale = (bits << 23).view(torch.float32).clamp(min=2.0 ** -126)  # 0xFF -> +inf
        return bits.to(torch.uint8), scale, True
    descale = amax / fmt.max
    bits = encode_e8m0(descale, "ceil").to(torch.int32)                # NaN 255, Inf 254
    rcp = ((254 - bits).clamp_(min=1) << 23).view(torch.float32)       # 2^(127-b) for 1 <= b <= 253
    rcp = torch.where(bits == 0, 1.0, rcp)
    rcp = torch.where(bits == 254, 2.0 ** -127, rcp)
    rcp = torch.where(bits == 255, descale, rcp)                       # NaN
    return bits.to(torch.uint8), rcp, False


def _scale_and_scale_values(xb: torch.Tensor, name: str, mode: str, bdim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E8M0 bits uint8, x scaled into the element range and clamped to ±max, fp32) for fp32
    blocks xb; the bits keep the block axis `bdim` as size 1, so they broadcast against xb."""
    fmt = ELEMENT_FORMATS[MX_ELEM_DTYPES[name]]
    bits, factor, divide = _block_scale(xb.abs(), fmt, mode, bdim)
    v = xb / factor if divide else xb * factor
    return bits, v.clamp_(-fmt.max, fmt.max)        # the sub-byte encoders saturate the same way


def _prepare(x: torch.Tensor, elem_dtype: str | torch.dtype, mode: str, block_size: int, axis: int = -1) -> str:
    _check_float(x, "mx input")
    name = _elem_name(elem_dtype)
    if mode not in MX_MODES:
        raise ValueError(f"unknown MX scale mode {mode!r}; expected one of {MX_MODES}")
    if axis not in (-1, -2) or (axis == -2 and x.ndim != 2):
        raise ValueError(f"axis must be -1, or -2 for a 2-D tensor; got axis={axis}, shape {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[axis] % block_size:
        raise ValueError(
            f"MX needs dimension {axis} to be a multiple of the block size {block_size}, "
            f"got shape {tuple(x.shape)}; pad it with zeros first")
    return name


def mx_quantize(
    x: torch.Tensor, elem_dtype: str | torch.dtype, mode: str = "floor", block_size: int = MX_BLOCK
) -> MXQuantized:
    """Quantize `x` (..., K) to MX along the last dimension. elem_dtype: one of MX_ELEM_DTYPES."""
    name = _prepare(x, elem_dtype, mode, block_size)
    xb, bdim = _blocks(x.to(torch.float32).contiguous(), -1, block_size)
    bits, v = _scale_and_scale_values(xb, name, mode, bdim)
    fmt = ELEMENT_FORMATS[MX_ELEM_DTYPES[name]]
    v = v.flatten(-2)
    if fmt.torch_dtype is not None:
        qdata = v.to(fmt.torch_dtype)
    else:
        qdata = encode(v, fmt)
        if name == "fp4_e2m1":
            qdata = pack_fp4(qdata)
    return MXQuantized(qdata, bits.squeeze(-1).view(torch.float8_e8m0fnu), name, block_size)


def mx_fake_quantize(
    x: torch.Tensor, elem_dtype: str | torch.dtype, mode: str = "floor", block_size: int = MX_BLOCK,
    axis: int = -1,
) -> torch.Tensor:
    """`mx_quantize(...).dequantize()` in fp32 without building codes (training fast path).

    Identical except for sub-byte NaN elements, which stay NaN here instead of becoming +max
    codes; their block scale is NaN, so the dequantized value is NaN either way. axis=-2
    (2-D x) puts the blocks down the columns: `mx_fake_quantize(x.mT).mT` without the copy.
    Works through chunks of rows with reused scratch buffers (see `fp_codecs.row_chunks`).
    FP8 elements are rounded by `round_magnitude_`, which gives the float8 cast's values
    (fp_codecs) several times faster than PyTorch's CPU cast kernel.
    """
    name = _prepare(x, elem_dtype, mode, block_size, axis)
    fmt = ELEMENT_FORMATS[MX_ELEM_DTYPES[name]]
    x2d = x.to(torch.float32).contiguous().reshape(-1, x.shape[-1])    # (R, K)
    out = torch.empty_like(x2d)
    chunks = row_chunks(x2d, block_size if axis == -2 else 1)
    w0, w1 = chunk_workspace(x2d, chunks, 2)
    for rows in chunks:
        xb, bdim = _blocks(x2d[rows], axis, block_size)
        a = torch.abs(xb, out=scratch(w0, xb))
        bits, factor, divide = _block_scale(a, fmt, mode, bdim)
        if divide:                                                     # |x| scaled = |x scaled|
            a.div_(factor)
        else:
            a.mul_(factor)
        q = round_magnitude_(a, fmt, work=(w1,)).copysign_(xb)          # saturates at ±max
        torch.mul(q, decode_e8m0(bits), out=_blocks(out[rows], axis, block_size)[0])
    return out.view(x.shape)


def mx_scale_reference(amax: float, elem_dtype: str, mode: str) -> int:
    """The E8M0 scale byte of one block from its amax, with Python's exact float arithmetic.

    floor: floor(log2 amax) - emax_elem (amax below 2^-126 reads as exponent -127, as from the
    fp32 exponent field), clamped to [-127, 128]; rceil: the smallest 2^e >= fp32(amax/max),
    clamped to [-127, 127]. NaN -> 255; rceil Inf -> 254. Slow; for the tests.
    """
    import numpy as np

    fmt = ELEMENT_FORMATS[MX_ELEM_DTYPES[_elem_name(elem_dtype)]]
    if math.isnan(amax):
        return 255
    if mode == "floor":
        e = math.frexp(amax)[1] - 1 if amax >= 2.0 ** -126 else -127   # frexp: amax = m·2^e, m in [.5, 1)
        e = 128 if math.isinf(amax) else e
        return min(max(e - fmt.emax, -127), 128) + 127
    d = float(np.float32(amax) / np.float32(fmt.max))                  # the fp32 division
    if math.isinf(d):
        return 254
    if d == 0:
        return 0
    m, e = math.frexp(d)
    e = e - 1 if m == 0.5 else e                                       # exact powers of two stay
    return min(max(e, -127), 127) + 127
