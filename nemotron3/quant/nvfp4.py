"""NVFP4: E2M1 elements, one E4M3 scale per 16 elements, one fp32 scale per tensor.

A value is stored as  x ≈ q · s_b · S_dec  with q an E2M1 code (±{0,.5,1,1.5,2,3,4,6}),
s_b the block's E4M3 scale and S_dec the per-tensor fp32 decode scale. The two-level
scale exists because E4M3 alone spans only 2^-9..448: S_dec moves the whole tensor
so that its largest block scale lands at 448, and the E4M3 block scales then keep
every block's amax to about 6% (docs/low-precision.md §1, paper §2).

Two conventions, named after the code they reproduce bit for bit
================================================================
`te` (the default; TransformerEngine's kernel arithmetic, docs/low-precision.md §1):

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

2-D (16×16) block scaling for weights (docs/low-precision.md §4)
====================================================
With `block_2d=True` the block amax is taken over 16×16 tiles (16 rows × 16 columns) and
the scale is replicated to each of the tile's 16 rows, so `.scales` keeps the plain
(rows, K/16) layout that a 1×16 GEMM consumes (TE's reference does the same). Quantizing
Wᵀ the same way gives exactly the transpose: the rowwise and columnwise copies of a
weight are one tensor. Rows need not be a multiple of 16 (the last tile is padded with
zeros, which cannot raise an amax, as TE pads); K must be a multiple of 16.

Stochastic rounding (`stochastic_rounding=True`, te only) replaces the E2M1 RNE step by
TE's stochastic rounding (see fp_codecs), one random byte per element from `generator`
in row-major order of the tensor quantized; the recipe uses it on gradients only.

`nvfp4_fake_quantize` returns the dequantized tensor directly without materialising
codes; it is bit-identical to `nvfp4_quantize(...).dequantize()` (tested) and is what
the training layer uses. Its `axis=-2` quantizes down the columns (blocks of 16 rows):
bit-identical to quantizing the transpose, random bytes included, without the copy.

Speed: the work goes through chunks of ~2^18 elements (`fp_codecs.row_chunks`) with
three scratch buffers reused by every chunk; no Python loop touches a block. Block maxima
are max_pool1d (1×16) or an amax over the 16-row axis (16×1, 16×16); the E4M3 block scales
are rounded in fp32 (`round_magnitude_(.., "e4m3")`, the cast's values) and cast to float8
only for `nvfp4_quantize`'s `.scales`. torch.compile of the elementwise part is not used: it
speeds up the RNE kernel alone but not a whole training step (the block and per-tensor
reductions and the RHT stay eager), and it recompiles for every new shape.
`nvfp4_quantize_reference` at the bottom is the slow one: TE's formulas block by block in
numpy float32 scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemotron3.quant.fp_codecs import (
    FLT_MAX,
    _check_float,
    chunk_workspace,
    decode,
    pack_fp4,
    random_bytes,
    round_magnitude_,
    row_chunks,
    scratch,
    unpack_fp4,
    values_to_codes,
)

__all__ = ["NVFP4Quantized", "nvfp4_quantize", "nvfp4_fake_quantize", "nvfp4_quantize_reference", "te_global_scales"]

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
        return _apply_scales(q, self.scales.unsqueeze(-1), self.per_tensor_scale).to(dtype)


def _blocks(t: torch.Tensor, axis: int) -> torch.Tensor:
    """View with each 16-block on its own axis: (..., K/16, 16) for axis -1, (R/16, 16, K) for -2."""
    return t.unflatten(-1, (-1, BLOCK)) if axis == -1 else t.unflatten(0, (-1, BLOCK))


def _apply_scales(
    q: torch.Tensor, s_b: torch.Tensor, s_dec: torch.Tensor | None, axis: int = -1, out: torch.Tensor | None = None
) -> torch.Tensor:
    """q · (S_dec · fp32(s_b)) per block, into `out` (q's shape) or in place on q (a buffer we
    own). s_b keeps the block axis as size 1: (..., K/16, 1) for axis -1, (R/16, 1, K) for -2."""
    scale = s_b.to(torch.float32)
    if s_dec is not None:
        scale = s_dec * scale                                           # torchao's product order
    qb = _blocks(q, axis)
    return torch.mul(qb, scale, out=qb if out is None else _blocks(out, axis)).view(q.shape)


def te_global_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_enc, S_dec) from a per-tensor amax, exactly as TE's kernel computes them."""
    amax = amax.to(torch.float32)
    s_enc = torch.clamp(torch.tensor(E4M3_MAX * E2M1_MAX, device=amax.device) / amax, max=FLT_MAX)
    s_enc = torch.where((amax == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
    return s_enc, 1.0 / s_enc


def _block_amax(a: torch.Tensor, block_2d: bool, axis: int) -> torch.Tensor:
    """Block max of a = |x| (R, K), block axis kept as size 1 (see `_apply_scales`).

    1×16 along K, 16×16 tiles (replicated to each of the tile's rows), or 16×1 down the rows
    (axis -2). The fastest exact CPU block max differs by layout: max_pool1d for 16 contiguous
    values, amax over a strided middle axis for 16 rows (much faster than max_pool2d, which
    also computes indices). Both propagate NaN like amax.
    """
    if axis == -2:
        return a.view(-1, BLOCK, a.shape[-1]).amax(1, keepdim=True)                 # (R/16, 1, K)
    rows_amax = F.max_pool1d(a.reshape(-1, 1, a.shape[-1]), BLOCK).view(*a.shape[:-1], -1, 1)
    if not block_2d:
        return rows_amax
    rows = a.shape[0]
    ap = F.pad(rows_amax.view(rows, -1), (0, 0, 0, -rows % BLOCK))     # zero rows: amax unchanged
    amax = ap.view(-1, BLOCK, ap.shape[-1]).amax(1)                    # (R/16, K/16)
    return amax.repeat_interleave(BLOCK, dim=0)[:rows].unsqueeze(-1)


def _check(x: torch.Tensor, convention: str, block_2d: bool, axis: int = -1) -> None:
    _check_float(x, "nvfp4 input")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown NVFP4 convention {convention!r}; expected one of {CONVENTIONS}")
    if axis not in (-1, -2) or (axis == -2 and (x.ndim != 2 or block_2d)):
        raise ValueError(f"axis must be -1, or -2 for a 2-D tensor without block_2d; got axis={axis}, "
                         f"shape {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[axis] % BLOCK:
        raise ValueError(
            f"NVFP4 needs dimension {axis} to be a multiple of {BLOCK}, got shape {tuple(x.shape)}; "
            "pad it with zeros first (NVFP4Linear does this for you)")
    if block_2d and x.ndim != 2:
        raise ValueError(f"2-D (16x16) block scaling needs a 2-D tensor, got shape {tuple(x.shape)}")


@dataclass
class _Plan:
    """The per-tensor part of one quantization: convention, global scales, rounding."""

    convention: str
    s_dec: torch.Tensor | None          # decode scale (te: 1/S_enc; torchao: p or None)
    s_enc: torch.Tensor | None = None   # te only
    mult: torch.Tensor | None = None    # te only: S_enc · fp32(1/6), one constant
    block_2d: bool = False
    stochastic_rounding: bool = False
    rbits: torch.Tensor | None = None   # SR: one random byte per element, (R, K) (maybe a strided view)


def _plan(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None,
    convention: str,
    amax: torch.Tensor | float | None,
    block_2d: bool,
    stochastic_rounding: bool,
) -> _Plan:
    if per_tensor_scale is not None:
        per_tensor_scale = torch.as_tensor(per_tensor_scale, dtype=torch.float32, device=x.device)
        if per_tensor_scale.numel() != 1:
            raise ValueError(f"per_tensor_scale must hold one value, got shape {tuple(per_tensor_scale.shape)}")
        per_tensor_scale = per_tensor_scale.reshape(())
    if convention == "torchao":
        if block_2d or stochastic_rounding or amax is not None:
            raise ValueError("the torchao convention has no 2-D blocks, stochastic rounding or amax argument")
        return _Plan("torchao", per_tensor_scale)
    if per_tensor_scale is not None and amax is not None:
        raise ValueError("give either per_tensor_scale or amax, not both")
    if per_tensor_scale is None:
        if amax is None:
            lo, hi = torch.aminmax(x)                                   # max|x|, without a copy
            amax = torch.maximum(-lo, hi)
        s_enc, s_dec = te_global_scales(torch.as_tensor(amax, dtype=torch.float32, device=x.device))
    else:
        s_enc = torch.clamp(1.0 / per_tensor_scale, max=FLT_MAX)
        s_enc = torch.where((per_tensor_scale == 0) | (s_enc == 0), torch.ones_like(s_enc), s_enc)
        s_dec = 1.0 / s_enc
    mult = s_enc * torch.reciprocal(torch.tensor(E2M1_MAX, device=x.device))
    return _Plan("te", s_dec, s_enc, mult, block_2d, stochastic_rounding)


def _block_scales(block_amax: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_b, enc_b) per block, fp32: s_b on the E4M3 grid (rounded by `round_magnitude_`, the
    float8 cast's values without its slow CPU kernel) and the element multiplier enc_b."""
    if plan.convention == "te":
        # TE also takes min(., FLT_MAX) first; the clamp at 448 subsumes it (NaN passes both)
        s_b = round_magnitude_(block_amax * plan.mult, "e4m3")
        return s_b, torch.clamp(1.0 / (s_b * plan.s_dec), max=FLT_MAX)
    if plan.s_dec is None:
        s_b = round_magnitude_(torch.clamp(block_amax / E2M1_MAX, min=E4M3_TINY, max=E4M3_MAX), "e4m3")
        return s_b, 1.0 / s_b
    scaled = (block_amax / E2M1_MAX) / plan.s_dec
    s_b = round_magnitude_(torch.clamp(scaled, min=E4M3_TINY, max=E4M3_MAX), "e4m3")
    return s_b, (1.0 / plan.s_dec) / s_b


def _quantize_rows(
    x: torch.Tensor, plan: _Plan, axis: int, rbits: torch.Tensor | None = None, work: tuple[torch.Tensor, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q on the E2M1 grid fp32 (R, K), s_b fp32 on the E4M3 grid with the block axis kept) for
    fp32 rows x. `work`: three flat scratch buffers (`fp_codecs.scratch`); q lives in the first."""
    w0, *rest = (*work, None)
    xabs = torch.abs(x, out=scratch(w0, x))                             # (R, K) working buffer
    s_b, enc = _block_scales(_block_amax(xabs, plan.block_2d, axis), plan)
    # |x·enc| = |x|·enc (enc >= 0), scaled in place; the ±6 clamp of both conventions is the
    # saturation inside round_magnitude_, and the sign comes back from x at the end
    _blocks(xabs, axis).mul_(enc)
    q = round_magnitude_(xabs, "e2m1", stochastic=plan.stochastic_rounding, rbits=rbits, work=tuple(rest))
    return q.copysign_(x), s_b


def _prepare(x, per_tensor_scale, convention, amax, block_2d, stochastic_rounding, generator, axis=-1):
    _check(x, convention, block_2d, axis)
    x2d = x.to(torch.float32).contiguous().reshape(-1, x.shape[-1])    # (R, K)
    plan = _plan(x2d, per_tensor_scale, convention, amax, block_2d, stochastic_rounding)
    if stochastic_rounding:   # bytes in row-major order of the tensor quantized: x, or xᵀ for axis -2
        r, k = x2d.shape
        bits = random_bytes(r * k, generator, x.device)
        plan.rbits = bits.view(r, k) if axis == -1 else bits.view(k, r).t()
    return x2d, plan


def _chunk_bits(plan: _Plan, rows: slice) -> torch.Tensor | None:
    return None if plan.rbits is None else plan.rbits[rows]    # maybe strided: read once, converted


def nvfp4_quantize(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None = None,
    convention: str = "te",
    *,
    amax: torch.Tensor | float | None = None,
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
    x2d, plan = _prepare(x, per_tensor_scale, convention, amax, block_2d, stochastic_rounding, generator)
    R, K = x2d.shape
    packed = torch.empty(R, K // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(R, K // BLOCK, dtype=torch.float8_e4m3fn, device=x.device)
    chunks = row_chunks(x2d, BLOCK if block_2d else 1)
    work = chunk_workspace(x2d, chunks, 3)
    for rows in chunks:
        q, s_b = _quantize_rows(x2d[rows], plan, -1, _chunk_bits(plan, rows), work)
        packed[rows] = pack_fp4(values_to_codes(q, "e2m1"))
        scales[rows] = s_b.squeeze(-1)                                  # exact: s_b is on the E4M3 grid
    lead = x.shape[:-1]
    return NVFP4Quantized(packed.view(*lead, K // 2), scales.view(*lead, K // BLOCK), plan.s_dec,
                          convention, block_2d)


def nvfp4_fake_quantize(
    x: torch.Tensor,
    per_tensor_scale: torch.Tensor | float | None = None,
    convention: str = "te",
    *,
    amax: torch.Tensor | float | None = None,
    block_2d: bool = False,
    stochastic_rounding: bool = False,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
    axis: int = -1,
) -> torch.Tensor:
    """`nvfp4_quantize(...).dequantize()` (fp32) without building codes: the training fast path.

    axis=-2 (2-D x) puts the 1×16 blocks down the columns: `nvfp4_fake_quantize(x.mT).mT` bit
    for bit, without the transpose copy (the wgrad operands). `out` (fp32, contiguous, x's
    shape) receives the result and may be x itself: each chunk is read before it is written.
    """
    x2d, plan = _prepare(x, per_tensor_scale, convention, amax, block_2d, stochastic_rounding, generator, axis)
    if out is None:
        out = torch.empty_like(x2d)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {tuple(x.shape)}")
    out = out.view(x2d.shape)
    chunks = row_chunks(x2d, BLOCK if (block_2d or axis == -2) else 1)
    work = chunk_workspace(x2d, chunks, 3)
    for rows in chunks:
        q, s_b = _quantize_rows(x2d[rows], plan, axis, _chunk_bits(plan, rows), work)
        _apply_scales(q, s_b, plan.s_dec, axis, out=out[rows])
    return out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# Slow, obviously-correct reference: TE's formulas one 16-element block at a time, in numpy
# float32 scalars, with value tables built from the bit fields (tests compare the fast path).


def _nearest_even(table: list[float], a: float) -> int:
    return min(range(len(table)), key=lambda c: (abs(table[c] - a), c % 2))   # tie -> even code


def nvfp4_quantize_reference(x: torch.Tensor, block_2d: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 scale bytes (R, K/16), E2M1 codes (R, K)) of the `te` convention, by loops.

    Defined for inputs without NaN (inf included): with a NaN element the fast path's per-tensor scale is NaN
    and every scale byte 0x7F (E4M3's NaN), while this loop's `amax > 0` test fails and it falls back to
    S_enc = 1; the two are compared on NaN-free inputs only."""
    import numpy as np

    f32 = np.float32
    flt_max = f32(np.finfo(np.float32).max)
    e4m3 = [(m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            for e in range(16) for m in range(8)][:0x7F]              # 0x7F is NaN
    e2m1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    xs = x.detach().float().numpy()
    amax = f32(np.abs(xs).max())
    s_enc = min(f32(2688) / amax, flt_max) if amax > 0 else f32(1)
    s_enc = f32(1) if s_enc == 0 else f32(s_enc)
    s_dec = f32(1) / s_enc
    mult = s_enc * (f32(1) / f32(6))
    rows, cols = xs.shape
    tile_rows = BLOCK if block_2d else 1
    scales = np.zeros((rows, cols // BLOCK), dtype=np.uint8)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    for r in range(rows):
        for b in range(cols // BLOCK):
            r0 = r - r % tile_rows
            tile = xs[r0:r0 + tile_rows, b * BLOCK:(b + 1) * BLOCK]
            sb = _nearest_even(e4m3, float(min(f32(np.abs(tile).max()) * mult, f32(448))))
            scales[r, b] = sb
            enc = min(f32(1) / (f32(e4m3[sb]) * s_dec), flt_max) if sb else flt_max
            for i in range(b * BLOCK, (b + 1) * BLOCK):
                v = float(np.clip(xs[r, i] * f32(enc), -6, 6))
                codes[r, i] = _nearest_even(e2m1, abs(v)) | (8 if math.copysign(1, v) < 0 else 0)
    return torch.from_numpy(scales), torch.from_numpy(codes)
