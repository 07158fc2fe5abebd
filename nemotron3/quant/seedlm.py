"""SeedLM: each block of C weights is a seed of a pseudo-random generator plus P low-bit coefficients.

    w_block ≈ U(s) · t,   U(s) ∈ [-1, 1]^(C×P) generated from the seed s,   t = q · 2^e

(Shafipour et al. 2024, docs/low-precision.md §9). Only the idea is confirmed; every parameter below is our
choice [UNCONFIRMED], a field of `SeedLMSpec`:

  generator   a K = 16-bit Fibonacci LFSR with the primitive polynomial x^16 + x^14 + x^13 + x^11 + 1
              (taps (16, 14, 13, 11), period 2^16 - 1, tested). Seeds are the non-zero states 1 .. 2^K - 1.
  U(s)        entry j (row-major over C×P) is the register after (j + 1)·K shifts (K fresh bits per entry),
              V_j ∈ [1, 2^K - 1], normalised U_j = (V_j - 2^(K-1)) / (2^(K-1) - 1).
  coefficients t = U(s)⁺ w (least squares), then q = round(t / 2^e) clamped to ±(2^(b-1) - 1) (symmetric
              b-bit integers, stored sign-magnitude), e = ceil(log2(max|t| / (2^(b-1) - 1))) per block: the
              smallest power of two at which no coefficient saturates.
  exponent    ebits = 4 bits per block, relative to one int8 exponent per tensor (e_top, the largest block
              exponent): e ∈ [e_top - 15, e_top]; a block that would need less uses e_top - 15.
  search      the seed minimising ‖w - U(s)·q·2^e‖₂ after quantization. Exhaustive in two stages, vectorised
              in torch over all 2^K - 1 seeds: (1) the least-squares fit of every seed, scored by the captured
              energy wᵀ P_s w (P_s the projector onto U(s)'s columns) as one GEMM of the blocks' quadratic
              features (B, C(C+1)/2) against the seeds' projector entries (C(C+1)/2, S); (2) the `candidates`
              best seeds of each block are quantized and the one with the least quantized error is kept.
              `candidates = 0` quantizes every seed (exact Algorithm 1, slow).

  seedlm4: C = 8,  P = 3, b = 4: (16 + 3·4 + 4) / 8  = 4 bits per weight
  seedlm3: C = 12, P = 4, b = 4: (16 + 4·4 + 4) / 12 = 3 bits per weight

Blocks run over the tensor flattened row-major (so any shape works); the tail is padded with zeros.
Storage (`SeedLMQuantized`): seeds int16 (nblk,) (the seed's 16 bits), codes uint8 (packed b-bit
sign-magnitude coefficients, LSB first, `mx_shared.pack_bits`), exps uint8 (packed 4-bit offsets
e - (e_top - 15)), e_top int8, and the shape.
Reconstruction regenerates U(s) from the seed (`lfsr_basis`) and is exact given the stored values:
`lfsr_reference` is the generator written the slow obvious way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from nemotron3.quant.mx_shared import pack_bits, unpack_bits

__all__ = ["SeedLMSpec", "SEEDLM_SPECS", "SeedLMQuantized", "seedlm_quantize", "lfsr_basis", "lfsr_reference"]


@dataclass(frozen=True)
class SeedLMSpec:
    """One SeedLM configuration (see the module docstring; all of it is our choice)."""

    block: int = 8                          # C, weights per seed
    coeffs: int = 3                         # P, coefficients per block
    coeff_bits: int = 4                     # b
    lfsr_bits: int = 16                     # K
    taps: tuple[int, ...] = (16, 14, 13, 11)  # exponents of the feedback polynomial (the x^K term first)
    exp_bits: int = 4
    candidates: int = 16                    # seeds per block quantized in stage 2 (0: all of them)

    @property
    def bits_per_weight(self) -> float:
        return (self.lfsr_bits + self.coeffs * self.coeff_bits + self.exp_bits) / self.block

    @property
    def qmax(self) -> int:
        return (1 << (self.coeff_bits - 1)) - 1


SEEDLM_SPECS = {"seedlm4": SeedLMSpec(8, 3), "seedlm3": SeedLMSpec(12, 4)}


@dataclass
class SeedLMQuantized:
    seeds: torch.Tensor      # int16 (nblk,): the 16 bits of the seed (1 .. 2^K - 1), read back with & 0xFFFF
    codes: torch.Tensor      # uint8 packed coefficients
    exps: torch.Tensor       # uint8 packed exponent offsets
    e_top: int
    shape: tuple[int, ...]
    spec: SeedLMSpec

    def coefficients(self) -> torch.Tensor:
        """The dequantized coefficients q · 2^e, fp32 (nblk, P)."""
        s, n = self.spec, self.seeds.numel()
        nq = n * s.coeffs
        codes = unpack_bits(self.codes, s.coeff_bits, _pad8(nq))[:nq].to(torch.int32).view(n, s.coeffs)
        mag = codes & ((1 << (s.coeff_bits - 1)) - 1)
        q = torch.where(codes >> (s.coeff_bits - 1) == 1, -mag, mag).to(torch.float32)
        off = unpack_bits(self.exps, s.exp_bits, _pad8(n))[:n].to(torch.int32)
        return torch.ldexp(q, (off + self.e_top - (1 << s.exp_bits) + 1).unsqueeze(-1))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s = self.spec
        basis = lfsr_basis(s, self.seeds.device)[(self.seeds.to(torch.int64) & 0xFFFF) - 1]     # (nblk, C, P)
        w = (basis @ self.coefficients().unsqueeze(-1)).reshape(-1)             # (nblk·C,)
        return w[:math.prod(self.shape)].reshape(self.shape).to(dtype)


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _lfsr_step(state: torch.Tensor, k: int, taps: tuple[int, ...]) -> torch.Tensor:
    """One Fibonacci shift of K-bit registers: feedback = XOR of bits (K - tap), shifted in at the top."""
    bit = torch.zeros_like(state)
    for t in taps:
        bit ^= state >> (k - t)
    return (state >> 1) | ((bit & 1) << (k - 1))


def lfsr_basis(spec: SeedLMSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """U(s) for every seed s = 1 .. 2^K - 1, fp32 (2^K - 1, C, P) on `device`: row s - 1 is seed s.
    Computed on the host (one table per spec) and copied, so every device reads the same values."""
    return _lfsr_table(spec, torch.device(device))


@lru_cache(maxsize=8)
def _lfsr_table(spec: SeedLMSpec, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return _lfsr_table(spec, torch.device("cpu")).to(device)
    k = spec.lfsr_bits
    state = torch.arange(1, 1 << k, dtype=torch.int32, device="cpu")
    out = torch.empty(state.numel(), spec.block * spec.coeffs, dtype=torch.float32, device="cpu")
    half = float(1 << (k - 1))
    for j in range(spec.block * spec.coeffs):
        for _ in range(k):
            state = _lfsr_step(state, k, spec.taps)
        out[:, j] = (state.to(torch.float32) - half) / (half - 1)
    return out.view(-1, spec.block, spec.coeffs)


def lfsr_reference(seed: int, spec: SeedLMSpec) -> list[list[float]]:
    """U(seed) the slow way: a list of K register bits shifted one at a time."""
    k = spec.lfsr_bits
    reg = [(seed >> i) & 1 for i in range(k)]          # reg[i] is bit i of the state
    vals = []
    for _ in range(spec.block * spec.coeffs):
        for _ in range(k):
            fb = 0
            for t in spec.taps:
                fb ^= reg[k - t]
            reg = reg[1:] + [fb]
        v = sum(b << i for i, b in enumerate(reg))
        vals.append((v - 2 ** (k - 1)) / (2 ** (k - 1) - 1))
    return [vals[r * spec.coeffs:(r + 1) * spec.coeffs] for r in range(spec.block)]


@lru_cache(maxsize=8)
def _search_tables(spec: SeedLMSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pinv U (S, P, C), quadratic-form weights (C(C+1)/2, S), upper-triangle indices (2, C(C+1)/2)) on
    `device`; factorised on the host in float64 (one result whatever the device), then copied."""
    if device.type != "cpu":
        return tuple(t.to(device) for t in _search_tables(spec, torch.device("cpu")))
    u = lfsr_basis(spec).double()
    q, _ = torch.linalg.qr(u)                                      # (S, C, P), orthonormal columns
    proj = q @ q.mT                                                # (S, C, C)
    iu = torch.triu_indices(spec.block, spec.block, device="cpu")
    weight = proj[:, iu[0], iu[1]] * torch.where(iu[0] == iu[1], 1.0, 2.0).double()
    return torch.linalg.pinv(u).float(), weight.float().T.contiguous(), iu


def _block_exponent(amax: torch.Tensor, spec: SeedLMSpec) -> torch.Tensor:
    """ceil(log2(amax / qmax)), exactly: frexp gives y = f · 2^ex with f ∈ [0.5, 1), a power of two at f = 0.5."""
    mant, ex = torch.frexp(amax / spec.qmax)
    return torch.where(mant == 0.5, ex - 1, ex)


def _quantize_coeffs(t: torch.Tensor, spec: SeedLMSpec, e_lo: int, e_top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp32 integers, e int32) for coefficients t (..., P): per-vector exponent in [e_lo, e_top]."""
    e = _block_exponent(t.abs().amax(-1), spec).clamp(e_lo, e_top)
    q = torch.round(torch.ldexp(t, -e.unsqueeze(-1))).clamp(-spec.qmax, spec.qmax)
    return q, e


def _top_seeds(feats: torch.Tensor, weight: torch.Tensor, n: int, seed_chunk: int) -> torch.Tensor:
    """Indices (b, n) of the n seeds capturing the most energy of each block, best first. The (blocks, seeds)
    scores are formed one tile of `seed_chunk` seeds at a time (a tile that stays in cache) and merged."""
    best_v = torch.full((feats.shape[0], 0), -math.inf, device=feats.device)
    best_i = torch.empty((feats.shape[0], 0), dtype=torch.int64, device=feats.device)
    for s0 in range(0, weight.shape[1], seed_chunk):
        score = feats @ weight[:, s0:s0 + seed_chunk]                  # (b, seeds of the tile)
        v, i = score.topk(min(n, score.shape[1]), dim=-1)
        best_v, pick = torch.cat([best_v, v], 1).topk(min(n, best_v.shape[1] + v.shape[1]), dim=-1)
        best_i = torch.cat([best_i, i + s0], 1).gather(1, pick)
    return best_i


def seedlm_quantize(w: torch.Tensor, spec: SeedLMSpec, chunk: int = 512, seed_chunk: int = 2048) -> SeedLMQuantized:
    """Quantize a tensor to SeedLM (blocks of `spec.block` over the flattened tensor). `chunk` blocks by
    `seed_chunk` seeds is the tile of the exhaustive search."""
    if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
        raise ValueError("SeedLM needs a finite floating-point tensor")
    dev = w.device
    pinv, weight, iu = _search_tables(spec, dev)
    basis = lfsr_basis(spec, dev)
    flat = w.detach().to(torch.float32).reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % spec.block)).view(-1, spec.block)   # (B, C)
    n_seeds = basis.shape[0]
    ncand = n_seeds if spec.candidates == 0 else min(spec.candidates, n_seeds)
    cands = torch.empty(blocks.shape[0], ncand, dtype=torch.int64, device=dev)
    for i in range(0, blocks.shape[0], chunk):
        b = blocks[i:i + chunk]
        feats = b[:, iu[0]] * b[:, iu[1]]                            # (b, C(C+1)/2)
        cands[i:i + chunk] = _top_seeds(feats, weight, ncand, seed_chunk)
    # e_top: the largest block exponent over the best least-squares fits
    t_best = (pinv[cands[:, 0]] @ blocks.unsqueeze(-1)).squeeze(-1)        # (B, P)
    e_top = int(_block_exponent(t_best.abs().amax(-1), spec).max()) if blocks.numel() else 0
    e_top = max(-128 + (1 << spec.exp_bits), min(127, e_top))
    e_lo = e_top - (1 << spec.exp_bits) + 1
    seeds = torch.empty(blocks.shape[0], dtype=torch.int64, device=dev)
    qs = torch.empty(blocks.shape[0], spec.coeffs, device=dev)
    es = torch.empty(blocks.shape[0], dtype=torch.int32, device=dev)
    step = max(1, chunk * 64 // ncand)
    for i in range(0, blocks.shape[0], step):
        b, c = blocks[i:i + step], cands[i:i + step]                             # (b, C), (b, n)
        t = (pinv[c] @ b[:, None, :, None]).squeeze(-1)                          # (b, n, P)
        q, e = _quantize_coeffs(t, spec, e_lo, e_top)
        rec = (basis[c] @ torch.ldexp(q, e.unsqueeze(-1)).unsqueeze(-1)).squeeze(-1)   # (b, n, C)
        best = ((rec - b[:, None]) ** 2).sum(-1).argmin(-1)                       # first minimum: lowest rank
        r = torch.arange(b.shape[0], device=dev)
        seeds[i:i + step], qs[i:i + step], es[i:i + step] = c[r, best] + 1, q[r, best], e[r, best]
    return _pack(seeds, qs, es, e_top, tuple(w.shape), spec)


def _pack(seeds: torch.Tensor, q: torch.Tensor, e: torch.Tensor, e_top: int, shape: tuple[int, ...],
          spec: SeedLMSpec) -> SeedLMQuantized:
    qi = q.to(torch.int32).reshape(-1)
    codes = qi.abs() | ((qi < 0).to(torch.int32) << (spec.coeff_bits - 1))
    codes = torch.nn.functional.pad(codes, (0, -codes.numel() % 8))
    off = e - (e_top - (1 << spec.exp_bits) + 1)
    off = torch.nn.functional.pad(off, (0, -off.numel() % 8))
    seeds16 = torch.where(seeds >= 1 << 15, seeds - (1 << 16), seeds).to(torch.int16)
    return SeedLMQuantized(seeds16, pack_bits(codes, spec.coeff_bits), pack_bits(off, spec.exp_bits), e_top, shape,
                           spec)
