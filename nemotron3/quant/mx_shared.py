"""Shared-microexponent block formats MX9, MX6, MX4 (block data representations, Rouhani et al. 2023).

Two levels of power-of-two scale over sign-magnitude integer mantissas (docs/low-precision.md §8):

    x ≈ (-1)^s · q · 2^(E - (m - 1)) · 2^(-μ)

    k1 = 16 elements share E, an 8-bit exponent (stored biased by 127, like E8M0)
    k2 = 2  elements share μ ∈ {0, 1}, a 1-bit microexponent (the sub-block's extra scale 2^0 or 2^-1)
    q  ∈ [0, 2^m - 1], m magnitude bits, plus one sign bit per element

    bits per element = (m + 1) + 8/16 + 1/2:  MX9 m = 7,  MX6 m = 4,  MX4 m = 2

The rule (AMD Quark's, for the paper's formats):
  E = e_max, the largest fp32 exponent floor(log2|x|) in the block (clamped to the byte, [-127, 127]).
  μ = 1 when both elements of a pair have an exponent below e_max (then the pair gets one extra bit of
  precision), else 0.
  q = |x| / 2^(E - (m-1) - μ) rounded to nearest, ties to even [UNCONFIRMED: the paper's rounding was not
  read; `rounding="away"` gives ties away from zero], saturated at 2^m - 1 (a block maximum just below
  2^(E+1) that rounds up to 2^m saturates).
  Quark writes the MX9 block scale as 2^(e_max - 8 + 2) = 2^(E - 6): the same as 2^(E - (m-1)) with m = 7.

Elements far below the block's maximum fall in the "subnormal" range of the block: their steps are those of
the block, so they lose precision and underflow to zero below half a step. An all-zero block has E = -127.
Non-finite inputs are rejected (the formats have no Inf or NaN).

Storage (`MXSQuantized`, one row of blocks per row of the tensor, K % 16 == 0):
  exponents  uint8 (..., K/16)              E + 127
  micro      uint8 (..., K/16)              bit i = μ of pair i (elements 2i, 2i+1)
  codes      uint8 (..., K/16 · 2(m+1))     the 16 (m+1)-bit codes of a block (sign in the top bit), packed
                                            LSB first: element j occupies bits [j(m+1), (j+1)(m+1)) of the
                                            block's 2(m+1) bytes, bit b of byte i being bit 8i+b
so a block costs 2(m+1) + 2 bytes, exactly (m+2)/8 bytes per element. `mxs_quantize_reference` is the same
rule element by element in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemotron3.quant.fp_codecs import _check_float

__all__ = ["MXS_FORMATS", "MXS_BLOCK", "MXSQuantized", "mxs_quantize", "mxs_fake_quantize", "mxs_quantize_reference",
           "pack_bits", "unpack_bits"]

MXS_BLOCK = 16   # k1: elements per shared 8-bit exponent
MXS_PAIR = 2     # k2: elements per shared microexponent
MXS_FORMATS: dict[str, int] = {"mx9": 7, "mx6": 4, "mx4": 2}   # name -> m, magnitude bits
_E_MIN, _E_MAX = -127, 127


@dataclass
class MXSQuantized:
    """A shared-microexponent tensor; see the module docstring for the layout."""

    exponents: torch.Tensor   # uint8 (..., K/16)
    micro: torch.Tensor       # uint8 (..., K/16)
    codes: torch.Tensor       # uint8 (..., K/16 · 2(m+1))
    fmt: str

    @property
    def mbits(self) -> int:
        return MXS_FORMATS[self.fmt]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.exponents.shape[:-1], self.exponents.shape[-1] * MXS_BLOCK))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        m = self.mbits
        lead, nblk = self.exponents.shape[:-1], self.exponents.shape[-1]
        codes = unpack_bits(self.codes.reshape(*lead, nblk, -1), m + 1, MXS_BLOCK)          # (..., nblk, 16)
        mag = (codes & ((1 << m) - 1)).to(torch.float32)
        sign = torch.where(codes >> m == 1, -1.0, 1.0)
        mu = (self.micro.unsqueeze(-1) >> torch.arange(MXS_BLOCK // MXS_PAIR, device=codes.device)) & 1
        mu = mu.repeat_interleave(MXS_PAIR, dim=-1)                                           # (..., nblk, 16)
        e = self.exponents.to(torch.int32).unsqueeze(-1) - 127
        return _ldexp(sign * mag, e - (m - 1) - mu.to(torch.int32)).reshape(self.shape).to(dtype)


def pack_bits(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack n-bit codes (..., G) (G·nbits a multiple of 8) LSB first into bytes (..., G·nbits/8)."""
    shifts = torch.arange(nbits, device=codes.device)
    bits = (codes.unsqueeze(-1).to(torch.int32) >> shifts) & 1                     # (..., G, nbits)
    bits = bits.reshape(*codes.shape[:-1], -1, 8)                                  # (..., bytes, 8)
    return (bits << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., count·nbits/8) bytes -> (..., count) uint8 codes."""
    bits = (packed.unsqueeze(-1).to(torch.int32) >> torch.arange(8, device=packed.device)) & 1
    bits = bits.reshape(*packed.shape[:-1], count, nbits)
    return (bits << torch.arange(nbits, device=packed.device)).sum(-1).to(torch.uint8)


def _ldexp(a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """a · 2^k exactly, in two steps: torch.ldexp forms 2^k as a float, which overflows fp32 for k > 127."""
    half = torch.div(k, 2, rounding_mode="floor")
    return torch.ldexp(torch.ldexp(a, half), k - half)


def _round(a: torch.Tensor, rounding: str) -> torch.Tensor:
    return torch.round(a) if rounding == "even" else torch.floor(a + 0.5)


def _check(x: torch.Tensor, fmt: str, rounding: str) -> None:
    _check_float(x, f"{fmt} input")
    if fmt not in MXS_FORMATS:
        raise ValueError(f"unknown shared-microexponent format {fmt!r}; expected one of {sorted(MXS_FORMATS)}")
    if rounding not in ("even", "away"):
        raise ValueError(f"rounding must be 'even' or 'away', got {rounding!r}")
    if x.ndim == 0 or x.shape[-1] % MXS_BLOCK:
        raise ValueError(f"{fmt} needs the last dimension to be a multiple of {MXS_BLOCK}, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fmt} has no encoding for Inf or NaN")


def _quantize_blocks(x: torch.Tensor, m: int, rounding: str) -> tuple[torch.Tensor, ...]:
    """x fp32 (..., nblk, 16) -> (E int32 (..., nblk), μ int32 (..., nblk, 8), signed q fp32 (..., nblk, 16))."""
    a = x.abs()
    _, ex = torch.frexp(a)                         # a = f · 2^ex, f ∈ [0.5, 1): floor(log2 a) = ex - 1 (exact)
    e = torch.where(a > 0, ex - 1, _E_MIN - 1)     # zeros never raise a maximum
    e_max = e.amax(-1)                                                            # (..., nblk)
    big = e_max.clamp(_E_MIN, _E_MAX)
    pair_e = e.unflatten(-1, (-1, MXS_PAIR)).amax(-1)                             # (..., nblk, 8)
    mu = (pair_e < e_max.unsqueeze(-1)).to(torch.int32)
    shift = big.unsqueeze(-1) - (m - 1) - mu.repeat_interleave(MXS_PAIR, dim=-1)  # (..., nblk, 16)
    q = _round(_ldexp(a, -shift), rounding).clamp_(max=(1 << m) - 1)
    return big, mu, q.copysign(x)


def mxs_quantize(x: torch.Tensor, fmt: str, rounding: str = "even") -> MXSQuantized:
    """Quantize x (..., K), K % 16 == 0, to MX9 / MX6 / MX4 along the last dimension."""
    _check(x, fmt, rounding)
    m = MXS_FORMATS[fmt]
    xb = x.to(torch.float32).unflatten(-1, (-1, MXS_BLOCK))
    e, mu, q = _quantize_blocks(xb, m, rounding)
    codes = q.abs().to(torch.int32) | (torch.signbit(q).to(torch.int32) << m)    # sign-magnitude, -0 keeps its sign
    micro = (mu << torch.arange(MXS_BLOCK // MXS_PAIR, device=x.device)).sum(-1)
    packed = pack_bits(codes, m + 1)                                             # (..., nblk, 2(m+1))
    return MXSQuantized((e + 127).to(torch.uint8), micro.to(torch.uint8), packed.flatten(-2), fmt)


def mxs_fake_quantize(x: torch.Tensor, fmt: str, rounding: str = "even") -> torch.Tensor:
    """`mxs_quantize(x, fmt).dequantize()` (fp32) without building codes."""
    _check(x, fmt, rounding)
    m = MXS_FORMATS[fmt]
    xb = x.to(torch.float32).unflatten(-1, (-1, MXS_BLOCK))
    e, mu, q = _quantize_blocks(xb, m, rounding)
    shift = e.unsqueeze(-1) - (m - 1) - mu.repeat_interleave(MXS_PAIR, dim=-1)
    return _ldexp(q, shift).reshape(x.shape)


def mxs_quantize_reference(block: list[float], fmt: str) -> list[float]:
    """One 16-element block quantized and dequantized, element by element in Python floats (RNE)."""
    m = MXS_FORMATS[fmt]
    exps = [math.frexp(abs(v))[1] - 1 if v != 0 else _E_MIN - 1 for v in block]
    e_max = max(exps)
    big = min(max(e_max, _E_MIN), _E_MAX)
    out = []
    for i, v in enumerate(block):
        pair = exps[i - i % 2: i - i % 2 + 2]
        mu = 1 if max(pair) < e_max else 0
        step = 2.0 ** (big - (m - 1) - mu)
        q = min(round(abs(v) / step), (1 << m) - 1)   # Python's round() is ties-to-even
        out.append(math.copysign(q * step, v))
    return out
