"""Element codecs: the bits of E2M1, E2M3, E3M2, E4M3, E5M2 and E8M0.

Everything in NVFP4 and MX is "scale the block, then round every element to a
tiny float format". This file is the second half: how an fp32 value becomes a
code of a few bits, and back.

The formats (OCP MX v1.0 via torchao `constants.py`, docs/low-precision.md §1 and §3)
==============================================================================
  name  ebits mbits bias  max     min normal  special values
  e2m1    2     1    1    6.0     1.0         none
  e2m3    2     3    1    7.5     1.0         none
  e3m2    3     2    3    28.0    0.25        none
  e4m3    4     3    7    448.0   2^-6        NaN only (torch.float8_e4m3fn)
  e5m2    5     2   15    57344   2^-14       Inf and NaN (torch.float8_e5m2)
  e8m0    8     0  127    2^127   (no zero)   0xFF = NaN; a pure power of two

Codes are sign-magnitude: the top bit of an E2M1 code (bit 3) is the sign, so
code 8 is -0. We keep the sign of -0.0 (code 8), as torchao, compressed-tensors
and vLLM do; TransformerEngine's *Python* reference maps an exact -0.0 input to
code 0 (docs/low-precision.md §6). Both decode to zero, so no GEMM can tell them apart.

Round to nearest, ties to even, saturating (the `cvt.rn.satfinite` semantics)
=============================================================================
The fast path rounds in fp32 arithmetic with the classic "magic number" trick:
for a value a >= 0 whose grid spacing is `step` (a power of two), the sum
a + 1.5*2^23*step lands in a binade whose ulp is exactly `step`, so the
hardware adder rounds a to the nearest multiple of `step`, ties to even; the
subtraction that follows is exact. Because 1.5*2^23 is an even multiple of
the step, "even multiple of step" is "even mantissa code", which is exactly
the tie rule of the format. The step of each element comes from its own fp32
exponent, clamped to the format's normal range (below the smallest normal
exponent the spacing stays that of the subnormals). Values are clamped to
±max first, so the result saturates instead of overflowing. The code falls out
of the same sum: its low mantissa bits count grid steps. `_encode_reference`
below does the same thing the obvious way (nearest table entry, ties to the
even code) and the tests check the two agree on every interesting input.

NaN has no encoding in the sub-byte formats. We map it to +max (code 0x7 for
E2M1), the satfinite behaviour TE's software stochastic-rounding fallback
documents ("NaN -> +6"). torchao's bit-twiddling cast instead produces a code
that depends on the NaN's payload and sign (platform dependent), so the tests
compare everything except those positions. E4M3/E5M2 go through PyTorch's own
float8 casts (RNE), after a clamp to ±max so they saturate the same way on
every PyTorch version; NaN stays NaN.

Stochastic rounding (docs/low-precision.md §1)
==================================
`round_magnitude_(a, "e2m1", stochastic=True, ...)` emulates TE's software fallback
for `cvt.rs.satfinite.e2m1x4.f32` bit for bit given the random bytes: with
u = rbits/256 (8 random bits per element, as the hardware consumes 32 bits per
4 elements), t = |v| + u*step(|v|) and the result is t rounded down to the grid
of t's own binade. The probability of rounding up is therefore floor(256*f)/256
for a fractional position f (up to the fp32 rounding of the sum): unbiased to
within 1/256 of a step, the hardware's own resolution. The bytes come
from `random_bytes` (a seeded torch.Generator, 8 bytes per 64-bit draw), one per
element in row-major order of the tensor being quantized. TE's own bits come from
Philox on the GPU and cannot be reproduced here; SR is tested statistically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ElementFormat", "ELEMENT_FORMATS", "element_format", "element_values",
    "random_bytes", "round_magnitude_", "round_to_format", "round_e2m1", "values_to_codes", "encode", "decode",
    "encode_e8m0", "decode_e8m0", "pack_fp4", "unpack_fp4",
]

FLT_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class ElementFormat:
    """A small float format: the bit layout and the constants derived from it."""

    name: str
    ebits: int
    mbits: int
    bias: int
    max: float
    torch_dtype: torch.dtype | None = None  # set for the formats PyTorch casts natively

    @property
    def emin(self) -> int:  # exponent of the smallest normal number
        return 1 - self.bias

    @property
    def emax(self) -> int:  # exponent of the largest finite number
        return math.floor(math.log2(self.max))

    @property
    def nbits(self) -> int:
        return 1 + self.ebits + self.mbits


ELEMENT_FORMATS: dict[str, ElementFormat] = {
    f.name: f
    for f in (
        ElementFormat("e2m1", 2, 1, 1, 6.0),
        ElementFormat("e2m3", 2, 3, 1, 7.5),
        ElementFormat("e3m2", 3, 2, 3, 28.0),
        ElementFormat("e4m3", 4, 3, 7, 448.0, torch.float8_e4m3fn),
        ElementFormat("e5m2", 5, 2, 15, 57344.0, torch.float8_e5m2),
    )
}


def element_format(name: str | ElementFormat) -> ElementFormat:
    """Look a format up by name ('e2m1', 'e2m3', 'e3m2', 'e4m3', 'e5m2')."""
    if isinstance(name, ElementFormat):
        return name
    if name not in ELEMENT_FORMATS:
        raise ValueError(f"unknown element format {name!r}; expected one of {sorted(ELEMENT_FORMATS)}")
    return ELEMENT_FORMATS[name]


def _check_float(x: torch.Tensor, what: str = "input") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


# ---------------------------------------------------------------------------------------------
# Value tables (from the bit fields, no arithmetic shared with the fast path)


def element_values(fmt: str | ElementFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 value of every code of a sub-byte format, indexed by code (sign bit on top), on `device`."""
    f = element_format(fmt)
    if f.torch_dtype is not None:
        raise ValueError(f"{f.name} is decoded by PyTorch's float8 cast, it has no value table here")
    vals = []
    for code in range(1 << f.nbits):
        sign = -1.0 if code >> (f.ebits + f.mbits) else 1.0
        e = (code >> f.mbits) & ((1 << f.ebits) - 1)
        m = code & ((1 << f.mbits) - 1)
        mag = (m / (1 << f.mbits)) * 2.0 ** f.emin if e == 0 else (1 + m / (1 << f.mbits)) * 2.0 ** (e - f.bias)
        vals.append(sign * mag)
    return torch.tensor(vals, dtype=torch.float32, device=device)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(f: ElementFormat, device: torch.device) -> torch.Tensor:
    key = (f.name, device)
    if key not in _TABLES:
        _TABLES[key] = element_values(f, device)
    return _TABLES[key]


# ---------------------------------------------------------------------------------------------
# Rounding (fp32 in, fp32 on the format's grid out) and codes.
# Speed (CPU, eager): every fresh 2M-element tensor costs page faults and torch.where,
# comparisons and shifts by Python scalars are slow, so the hot paths work on the fp32
# exponent *field* (bits & 0x7F800000, no shifts), reuse buffers in place, and allocate little
# (`work` scratch buffers, see `scratch`). PyTorch's CPU float8 casts run at ~6 ns/element,
# several times an fp32 pass: the fast paths round to E4M3/E5M2 with the same adder trick.

_EXP_FIELD = 0x7F800000


class _DeviceConstant:
    """A 0-dim int32 tensor per device (for ops whose scalar must be the first operand)."""

    def __init__(self, value: int) -> None:
        self.value, self.by_device = value, {}

    def get(self, device: torch.device) -> torch.Tensor:
        if device not in self.by_device:
            self.by_device[device] = torch.tensor(self.value, dtype=torch.int32, device=device)
        return self.by_device[device]


_INV_BIAS = _DeviceConstant(255 << 23)   # (255 << 23) - field: the exponent field of 1/2^(e-1)


def scratch(buf: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `dtype` tensor of `like`'s shape: a view of the flat 4-byte buffer `buf` (at least
    like.numel() elements) or, without one, a fresh tensor. Chunked loops allocate their
    temporaries once per call and reuse them for every chunk (see `row_chunks`)."""
    if buf is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if buf.dtype != dtype:
        buf = buf.view(dtype)
    return buf[: like.numel()].view(like.shape)


def _exponent_field(a: torch.Tensor, f: ElementFormat, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 exponent field (bits 30..23) of each a >= 0, clamped to the format's normal range."""
    e = torch.bitwise_and(a.view(torch.int32), _EXP_FIELD, out=out)
    return e.clamp_((127 + f.emin) << 23, (127 + f.emax) << 23)


def _magic_add_(a: torch.Tensor, f: ElementFormat, out: torch.Tensor | None = None) -> torch.Tensor:
    """a <- a + magic in place; returns magic's bits (int32, in `out` if given). magic = 1.5·2^23·step,
    where step = 2^(e - mbits) is the grid spacing at a's (clamped) exponent e. The sum lands in a
    binade whose ulp is `step`, so the adder itself rounds a to the grid, ties to even."""
    magic = _exponent_field(a, f, out).add_(((23 - f.mbits) << 23) | 0x400000)
    a.add_(magic.view(torch.float32))
    return magic


def _encode_subbyte(v: torch.Tensor, f: ElementFormat) -> torch.Tensor:
    """uint8 codes of fp32 v: saturate, RNE, sign bit on top; NaN -> +max.

    In s = a + magic the low mantissa bits count grid steps: k = bits(s) - bits(magic) = q/step.
    The magnitude code is k + 2^m (e - emin) (e = clamped exponent of a), which is continuous
    across a binade edge, so rounding up into the next binade needs no special case.
    """
    a = v.abs().clamp_(max=f.max)
    nan = bool(torch.isnan(a.amax())) if a.numel() else False
    if nan:
        a.nan_to_num_(nan=f.max)
    magic = _magic_add_(a, f)
    k = a.view(torch.int32).sub_(magic)                                # grid steps, in a's buffer
    # 2^m (e - emin) from magic's exponent field, computed in magic's buffer (no allocation)
    first = ((23 - f.mbits) << 23 | 0x400000) + ((127 + f.emin) << 23)
    k.add_(magic.sub_(first).bitwise_right_shift_(23 - f.mbits))
    sign = torch.bitwise_right_shift(v.view(torch.int32), 31, out=magic).bitwise_and_(1 << (f.ebits + f.mbits))
    if nan:
        sign.masked_fill_(torch.isnan(v), 0)
    return k.bitwise_or_(sign).to(torch.uint8)


def random_bytes(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """n uniform random bytes (uint8), drawn 8 per 64-bit word in order: one RNG call per word.

    Stochastic rounding consumes one byte per element, in row-major order of the tensor being
    quantized, so a seeded generator gives the same bits however the work is chunked.
    """
    words = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device, generator=generator)
    return words.view(torch.uint8)[:n]


def round_magnitude_(
    a: torch.Tensor, fmt: str | ElementFormat, generator: torch.Generator | None = None,
    stochastic: bool = False, rbits: torch.Tensor | None = None, work: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """In place: round magnitudes a >= 0 (fp32) to the grid, saturating at max; returns a.

    RNE by default: any format here, E4M3 and E5M2 included (for a >= 0 and NaN it equals
    PyTorch's float8 cast after the clamp to max, checked on every fp32 value up to max).
    `stochastic` (E2M1 only) is TE's stochastic rounding: t = a + u·step(a) with u = rbits/256
    (8 random bits per element; drawn from `generator` if not given), then t rounded down to
    the grid of t's own binade. `work`: up to two flat 4-byte scratch buffers (see `scratch`).
    """
    f = element_format(fmt)
    w0, w1 = (*work, None, None)[:2]
    if not stochastic:
        a.clamp_(max=f.max)                                            # satfinite
        return a.sub_(_magic_add_(a, f, scratch(w0, a, torch.int32)).view(torch.float32))  # RNE in the adder
    if f.name != "e2m1":
        raise ValueError(f"stochastic rounding is implemented for e2m1 only, not {f.name}")
    if rbits is None:
        rbits = random_bytes(a.numel(), generator, a.device).view(a.shape)
    # step(x) = 0.5 below 2, 1 below 4, else 2 = 2^(e - 1): the exponent field minus one binade;
    # u·step = rbits · (step/256), exact (an integer < 256 times a power of two). No clamp to
    # max first: a > 6 has step 2 and t >= a > 6 floors to at least 6, so the final clamp saturates it.
    field = _exponent_field(a, f, scratch(w1, a, torch.int32))
    t = torch.mul(rbits, field.sub_(9 << 23).view(torch.float32), out=scratch(w0, a))  # rbits may be strided
    a.add_(t)                                                          # = fmaf(u, step, a)
    field = _exponent_field(a, f, field)
    inv_step_t = torch.sub(_INV_BIAS.get(field.device), field, out=field).view(torch.float32)  # 2^(1 - e_t)
    return a.mul_(inv_step_t).floor_().div_(inv_step_t).clamp_(max=f.max)


def round_to_format(v: torch.Tensor, fmt: str | ElementFormat) -> torch.Tensor:
    """Round fp32 values to a format's grid: RNE, saturating to ±max, sign kept.

    Returns fp32 values (not codes); for E4M3/E5M2 the float8 cast's values. NaN stays NaN
    here; the sub-byte codes map it to +max.
    """
    return round_magnitude_(v.abs(), fmt).copysign_(v)


def round_e2m1(
    v: torch.Tensor, generator: torch.Generator | None = None, stochastic: bool = False
) -> torch.Tensor:
    """Round fp32 values to the E2M1 grid: RNE, or stochastic (TE's algorithm) if `stochastic`."""
    return round_magnitude_(v.abs(), "e2m1", generator, stochastic).copysign_(v)


def values_to_codes(q: torch.Tensor, fmt: str | ElementFormat) -> torch.Tensor:
    """uint8 codes of fp32 values on a sub-byte format's grid (rounding them is exact)."""
    return _encode_subbyte(q, element_format(fmt))


# ---------------------------------------------------------------------------------------------
# Public codecs


def encode(x: torch.Tensor, fmt: str | ElementFormat) -> torch.Tensor:
    """Encode values to uint8 codes of `fmt` (RNE, saturating). E4M3/E5M2 give the float8 bits."""
    _check_float(x)
    f = element_format(fmt)
    x = x.float()
    if f.torch_dtype is not None:
        return x.clamp(-f.max, f.max).to(f.torch_dtype).view(torch.uint8)
    return _encode_subbyte(x, f)


def decode(codes: torch.Tensor, fmt: str | ElementFormat) -> torch.Tensor:
    """Decode uint8 codes (or float8 tensors for E4M3/E5M2) to fp32."""
    f = element_format(fmt)
    if f.torch_dtype is not None:
        if codes.dtype == torch.uint8:
            codes = codes.view(f.torch_dtype)
        return codes.to(torch.float32)
    if codes.dtype != torch.uint8:
        raise TypeError(f"{f.name} codes must be uint8, got {codes.dtype}")
    if codes.numel() and int(codes.max()) >= (1 << f.nbits):
        raise ValueError(f"{f.name} codes must be < {1 << f.nbits}")
    return torch.index_select(_table(f, codes.device), 0, codes.reshape(-1).long()).view(codes.shape)


def encode_e8m0(x: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """Encode |x| as E8M0 bits (uint8): 2^(b-127). rounding 'floor' or 'ceil'; saturating.

    'floor' takes the fp32 exponent field (exact, unlike log2); 'ceil' is `cvt.rp.satfinite.ue8m0`:
    bump the exponent when any mantissa bit is set, and for fp32 subnormals only when the value is
    above 2^-127 (mantissa > 0x400000). Zero encodes as 0 (2^-127), +Inf as 254, NaN as 255.
    """
    _check_float(x)
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"E8M0 rounding must be 'floor' or 'ceil', got {rounding!r}")
    bits = x.float().view(torch.int32) & 0x7FFFFFFF
    e = torch.bitwise_right_shift(bits, 23)
    if rounding == "ceil":
        mant = bits & 0x7FFFFF
        e = torch.where(e == 0, (mant > 0x400000).to(torch.int32), e + (mant != 0).to(torch.int32))
    e = e.clamp_(max=254)
    return torch.where(bits > 0x7F800000, 255, e).to(torch.uint8)


def decode_e8m0(bits: torch.Tensor) -> torch.Tensor:
    """fp32 value of E8M0 bits (uint8 or float8_e8m0fnu): 2^(b-127), NaN for 0xFF."""
    if bits.dtype == torch.uint8:
        bits = bits.view(torch.float8_e8m0fnu)
    if bits.dtype != torch.float8_e8m0fnu:
        raise TypeError(f"E8M0 scales must be uint8 or float8_e8m0fnu, got {bits.dtype}")
    return bits.to(torch.float32)


def row_chunks(x: torch.Tensor, align: int = 1, target: int = 1 << 18) -> list[slice]:
    """Row ranges of a 2-D tensor holding about `target` elements each, `align`-row aligned.

    The block quantizers work chunk by chunk, with scratch buffers allocated once per call
    (`chunk_workspace`): the temporaries stay in cache instead of costing page faults as fresh
    multi-MB tensors. 2^18 elements (1 MB in fp32) balances cache reuse against the fixed
    cost of each eager op (a few µs, ~40 ops per chunk); 2^15 is ~2x slower.
    """
    rows, k = x.shape
    step = max(1, target // max(1, k))
    step = max(align, step - step % align)
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


def chunk_workspace(x: torch.Tensor, chunks: list[slice], n: int) -> tuple[torch.Tensor, ...]:
    """`n` flat fp32 scratch buffers as large as the biggest of `chunks` (row ranges of 2-D x,
    from `row_chunks`: the first is the biggest), for `scratch` views shared by all chunks."""
    numel = (chunks[0].stop - chunks[0].start) * x.shape[1] if chunks else 0
    return tuple(torch.empty(numel, dtype=torch.float32, device=x.device) for _ in range(n))


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte, element 2i in the low nibble: (..., K) -> (..., K/2)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dimension {codes.shape[-1]} into bytes")
    return codes[..., 0::2] | torch.bitwise_left_shift(codes[..., 1::2], 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: (..., K/2) uint8 -> (..., K) codes."""
    return torch.stack((packed & 0xF, torch.bitwise_right_shift(packed, 4)), dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# Slow, obviously-correct reference (tests compare the fast path against it)


def _encode_reference(x: torch.Tensor, fmt: str | ElementFormat) -> torch.Tensor:
    """Nearest table value, ties to the even code, saturating; one Python loop per element."""
    f = element_format(fmt)
    table = element_values(f).tolist()
    half = 1 << (f.ebits + f.mbits)
    out = []
    for v in x.float().flatten().tolist():
        if v != v:
            out.append(half - 1)
            continue
        a = min(abs(v), f.max)
        best = min(range(half), key=lambda c: (abs(table[c] - a), c % 2))  # tie -> even code
        out.append(best | (half if (v < 0 or (v == 0 and str(v).startswith("-"))) else 0))
    return torch.tensor(out, dtype=torch.uint8).view(x.shape)
