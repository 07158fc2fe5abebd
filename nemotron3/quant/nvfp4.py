"""NVFP4: E2M1 elements, one E4M3 scale per 16 elements, one fp32 scale per tensor.

A value is stored as  x ≈ q · s_b · S_dec  with q an E2M1 code (±{0,.5,1,1.5,2,3,4,6}),
s_b the block's E4M3 scale and S_dec the per-tensor fp32 decode scale. The two-level
scale exists because E4M3 alone spans only 2^-9..448: S_dec moves the whole tensor
so that its largest block scale lands at 448, and the E4M3 block scales then keep
every block's amax to about 6% (LOWPREC §1.2, paper §2).

Two conventions, named after the code they reproduce bit for bit
================================================================
`te` (the default; TransformerEngine's kernel arithmetic, LOWPREC §1.2):

    S_enc = min(448·6 / amax, FLT_MAX); S_enc = 1 if amax == 0 or S_enc == 0
    S_dec = 1 / S_enc
    s_b   = e4m3_rne( min(block_amax · (S_enc · fp32(1/6)), 448) )
    enc_b = min(1 / (fp32(s_b) · S_dec), FLT_MAX)
    q     = e2m1_rne( clamp(fp32(x) · enc_b, -6, 6) )

  Where each rounding sits matters. `S_enc·(1/6)` is one per-tensor constant, so each
  block's scale sees a single rounding (`block_amax·c`); the "obvious" (block_amax/6)·S_enc
  rounds twice and picks a different E4M3 neighbour on a fraction of blocks. There is no
  lower clamp on s_b: an all-zero block, or one whose scale underflows E4M3, gets a literal
  0 scale, enc_b = FLT_MAX, its non-zero elements saturate to code ±6 and decode to 0.
  The per-tensor `amax` is computed by us (max|x| in fp32) unless given; with an explicit
  `per_tensor_scale` p (decode convention) we take S_enc = 1/p with the same fix-ups.

`torchao` (`torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize`, torchao 0.18):

    with p:   s_b = e4m3( clamp((block_amax / 6) / p, 2^-6, 448) );  x · ((1/p) / fp32(s_b))
    p = None: s_b = e4m3( clamp(block_amax / 6, 2^-6, 448) );         x · (1 / fp32(s_b))

  i.e. division order, and a 2^-6 floor on the block scale (so no zero-scale blocks).

Both then clamp to ±6 and round to nearest even in E2M1 (fp_codecs). Dequantization is
`q · (S_dec · fp32(s_b))`, the product order of torchao's `NVFP4Tensor.dequantize`.

2-D (16×16) block scaling for weights (LOWPREC §2.1)
====================================================
With `block_2d=True` the block amax is taken over 16×16 tiles (16 rows × 16 columns) and
the scale is replicated to each of the tile's 16 rows, so `.scales` keeps the plain
(rows, K/16) layout that a 1×16 GEMM consumes (TE's reference does the same). Quantizing
Wᵀ the same way gives exactly the transpose: the rowwise and columnwise copies of a
weight are one tensor. Rows need not be a multiple of 16 (the last tile is padded with
zeros, which cannot raise an amax, as TE pads); K must be a multiple of 16.

Stochastic rounding (`stochastic_rounding=True`, te only) replaces the E2M1 RNE step by
TE's stochastic rounding (see fp_codecs), drawing 8 random bits per element from
`generator`; the recipe uses it on gradients only.

`nvfp4_fake_quantize` returns the dequantized tensor directly without materialising
codes; it is bit-identical to `nvfp4_quantize(...).dequantize()` (tested) and is what
the training layer uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemotron3.quant.fp_codecs import (
    FLT_MAX, _check_float, decode, pack_fp4, round_e2m1, unpack_fp4, values_to_codes,
)

__all__ = ["NVFP4Quantized", "nvfp4_quantize", "nvfp4_fake_quantize", "te_global_scales"]

BLOCK = 16
E4M3_MAX = 448.0
E2M1_MAX = 6.0
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny  # 2^-6, torchao's E4M3_EPS floor
CONVENTIONS = ("te", "torchao")


@dataclass
class NVFP4Quantized:
    """An NVFP4 tensor: packed E2M1 codes, E4M3 block scales, fp32 per-tensor decode scale."""

    packed: torch.Tensor                   # uint8 (..., K/2), element 2i in the low nibble
    scales: torch.Tensor                   # float8_e4m3fn (..., K/16), row-major
    per_tensor_scale: torch.Tensor | None  # fp32 0-dim decode scale S_dec, or None (single level)
    convention: str = "te"
    block_2d: bool = False

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.packed.shape[:-1], self.packed.shape[-1] * 2))

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked uint8 E2M1 codes (..., K)."""
        return unpack_fp4(self.packed)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = decode(self.codes, "e2m1")                                  # (..., K) fp32
        return _apply_scales(q, self.scales, self.per_tensor_scale).to(dtype)


def _apply_scales(q: torch.Tensor, s_b: torch.Tensor, s_dec: torch.Tensor | None) -> torch.Tensor:
    scale = s_b.to(torch.float32)
    if s_dec is not None:
        scale = s_dec * scale                                           # torchao's product order
    return (q.unflatten(-1, (-1, BLOCK)) * scale.unsqueeze(-1)).flatten(-2)


def te_global_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_enc, S_dec) from a per-tensor amax, exactly as TE's kernel computes them."""
    amax = amax.to(torch.float32)
    s_enc = torch.clamp(torch.tensor(E4M3_MAX * E2M1_MAX, device=amax.device) / amax, max=FLT_MAX)
    s_enc = torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
    return s_enc, 1.0 / s_enc


def _block_amax(x: torch.Tensor, block_2d: bool) -> torch.Tensor:
    """max|x| per 1×16 block (..., K/16), or per 16×16 tile replicated over its rows (R, K/16)."""
    if not block_2d:
        return x.unflatten(-1, (-1, BLOCK)).abs().amax(-1)
    rows = x.shape[0]
    xp = F.pad(x, (0, 0, 0, -rows % BLOCK))                            # zero rows: amax unchanged
    tiles = xp.unflatten(0, (-1, BLOCK)).unflatten(-1, (-1, BLOCK))     # (R/16, 16, K/16, 16)
    amax = tiles.abs().amax(dim=(1, 3))                                 # (R/16, K/16)
    return amax.repeat_interleave(BLOCK, dim=0)[:rows]


def _check(x: torch.Tensor, convention: str, block_2d: bool) -> None:
    _check_float(x, "nvfp4 input")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown NVFP4 convention {convention!r}; expected one of {CONVENTIONS}")
    if x.ndim == 0 or x.shape[-1] % BLOCK:
        raise ValueError(
            f"NVFP4 needs the last dimension to be a multiple of {BLOCK}, got shape {tuple(x.shape)}; "
            "pad it with zeros first (NVFP4Linear does this for you)")
    if block_2d and x.ndim != 2:
        raise ValueError(f"2-D (16x16) block scaling needs a 2-D tensor, got shape {tuple(x.shape)}")


def _quantize_values(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None,
    convention: str,
    amax: torch.Tensor | None,
    block_2d: bool,
    stochastic_rounding: bool,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The shared core: (q on the E2M1 grid fp32 (..., K), s_b e4m3 (..., K/16), S_dec or None)."""
    _check(x, convention, block_2d)
    x = x.to(torch.float32)
    if per_tensor_scale is not None:
        per_tensor_scale = torch.as_tensor(per_tensor_scale, dtype=torch.float32, device=x.device)
        if per_tensor_scale.numel() != 1:
            raise ValueError(f"per_tensor_scale must hold one value, got shape {tuple(per_tensor_scale.shape)}")
        per_tensor_scale = per_tensor_scale.reshape(())
    block_amax = _block_amax(x, block_2d)                               # (..., K/16)

    if convention == "te":
        if per_tensor_scale is not None and amax is not None:
            raise ValueError("give either per_tensor_scale or amax, not both")
        if per_tensor_scale is None:
            if amax is None:
                amax = block_amax.amax()
            s_enc, s_dec = te_global_scales(torch.as_tensor(amax, dtype=torch.float32, device=x.device))
        else:
            s_enc = torch.clamp(1.0 / per_tensor_scale, max=FLT_MAX)
            s_enc = torch.where((per_tensor_scale == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
            s_dec = 1.0 / s_enc
        mult = s_enc * torch.reciprocal(torch.tensor(E2M1_MAX))  # one constant: single rounding
        # TE also takes min(., FLT_MAX) first; the clamp at 448 subsumes it (NaN passes both)
        s_b = (block_amax * mult).clamp_(max=E4M3_MAX).to(torch.float8_e4m3fn)
        enc = torch.clamp(1.0 / (s_b.to(torch.float32) * s_dec), max=FLT_MAX)
    else:
        if block_2d or stochastic_rounding or amax is not None:
            raise ValueError("the torchao convention has no 2-D blocks, stochastic rounding or amax argument")
        if per_tensor_scale is None:
            s_b = torch.clamp(block_amax / E2M1_MAX, min=E4M3_TINY, max=E4M3_MAX).to(torch.float8_e4m3fn)
            enc = 1.0 / s_b.to(torch.float32)
            s_dec = None
        else:
            scaled = (block_amax / E2M1_MAX) / per_tensor_scale
            s_b = torch.clamp(scaled, min=E4M3_TINY, max=E4M3_MAX).to(torch.float8_e4m3fn)
            enc = (1.0 / per_tensor_scale) / s_b.to(torch.float32)
            s_dec = per_tensor_scale

    v = (x.unflatten(-1, (-1, BLOCK)) * enc.unsqueeze(-1)).flatten(-2)  # (..., K), scaled to ±6
    q = round_e2m1(v.clamp_(-E2M1_MAX, E2M1_MAX), generator, stochastic=stochastic_rounding)
    return q, s_b, s_dec


def nvfp4_quantize(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None = None,
    convention: str = "te",
    *,
    amax: torch.Tensor | None = None,
    block_2d: bool = False,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
) -> NVFP4Quantized:
    """Quantize `x` (..., K) to NVFP4 along the last dimension (K % 16 == 0).

    per_tensor_scale: decode-convention fp32 scale (amax / (448·6)). Under `torchao`, None
      means single-level scaling, as in torchao; under `te`, None means "from max|x|"
      (or from `amax` if given, e.g. the post-Hadamard amax or one shared by W and Wᵀ).
    block_2d: 16×16 tiles (weights, te only). stochastic_rounding + generator: te only.
    """
    q, s_b, s_dec = _quantize_values(
        x, per_tensor_scale, convention, amax, block_2d, stochastic_rounding, generator)
    packed = pack_fp4(values_to_codes(q, "e2m1"))
    return NVFP4Quantized(packed, s_b, s_dec, convention, block_2d)


def nvfp4_fake_quantize(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None = None,
    convention: str = "te",
    *,
    amax: torch.Tensor | None = None,
    block_2d: bool = False,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """`nvfp4_quantize(...).dequantize()` (fp32) without building codes: the training fast path."""
    q, s_b, s_dec = _quantize_values(
        x, per_tensor_scale, convention, amax, block_2d, stochastic_rounding, generator)
    return _apply_scales(q, s_b, s_dec)
