"""SeedLM: the generator against a bit-by-bit reference and its period, a planted seed found by the search,
and reconstruction exactly from the stored seeds, coefficients and exponents decoded by hand."""

import math

import pytest
import torch

from nemotron3.quant.seedlm import SEEDLM_SPECS, SeedLMSpec, lfsr_basis, lfsr_reference, seedlm_quantize

SPEC4 = SEEDLM_SPECS["seedlm4"]


def test_lfsr_is_maximal_length():
    """x^16 + x^14 + x^13 + x^11 + 1: the state returns to the seed after exactly 2^16 - 1 shifts, not before."""
    state, seen = 1, set()
    for _ in range((1 << 16) - 1):
        seen.add(state)
        bit = (state ^ (state >> 2) ^ (state >> 3) ^ (state >> 5)) & 1
        state = (state >> 1) | (bit << 15)
    assert state == 1 and len(seen) == (1 << 16) - 1


@pytest.mark.parametrize("name", sorted(SEEDLM_SPECS))
def test_basis_matches_the_bitwise_reference(name):
    spec = SEEDLM_SPECS[name]
    u = lfsr_basis(spec)
    assert u.shape == ((1 << 16) - 1, spec.block, spec.coeffs)
    for seed in (1, 2, 777, 12345, 65535):
        ref = torch.tensor(lfsr_reference(seed, spec), dtype=torch.float32)
        # (v - 2^(K-1)) / (2^(K-1) - 1): one division of integers exact in fp32, correctly rounded on every CPU; the
        # reference divides in float64 and rounds to fp32, which is the same value (53 >= 2·24 + 2 bits).
        assert torch.equal(u[seed - 1], ref)
    assert u.abs().max() <= 1 and abs(float(u.mean())) < 0.01


def _decode_by_hand(q, spec: SeedLMSpec) -> torch.Tensor:
    """The weights from the stored bytes, with Python integers: LSB-first bit streams, sign-magnitude codes."""
    def stream(packed, nbits, count):
        bits = [(b >> i) & 1 for b in packed.tolist() for i in range(8)]
        return [sum(bits[j * nbits + i] << i for i in range(nbits)) for j in range(count)]

    n = q.seeds.numel()
    codes = stream(q.codes, spec.coeff_bits, n * spec.coeffs)
    offs = stream(q.exps, spec.exp_bits, n)
    out = []
    for b in range(n):
        seed = int(q.seeds[b]) & 0xFFFF
        e = offs[b] + q.e_top - (1 << spec.exp_bits) + 1
        t = []
        for c in codes[b * spec.coeffs:(b + 1) * spec.coeffs]:
            mag = c & ((1 << (spec.coeff_bits - 1)) - 1)
            t.append((-mag if c >> (spec.coeff_bits - 1) else mag) * 2.0**e)
        u = lfsr_reference(seed, spec)
        out += [sum(u[r][p] * t[p] for p in range(spec.coeffs)) for r in range(spec.block)]
    return torch.tensor(out[:math.prod(q.shape)], dtype=torch.float64).view(q.shape)


@pytest.mark.parametrize("name", sorted(SEEDLM_SPECS))
def test_reconstruction_is_exact_from_what_is_stored(name):
    spec = SEEDLM_SPECS[name]
    w = torch.randn(16, 36, generator=torch.Generator().manual_seed(0)) * 0.05    # 576 weights, 48 or 72 blocks
    q = seedlm_quantize(w, spec)
    ours = q.dequantize()
    assert ours.shape == w.shape
    torch.testing.assert_close(ours.double(), _decode_by_hand(q, spec), rtol=0, atol=1e-7)
    stored_bits = 8 * (2 * q.seeds.numel() + q.codes.numel() + q.exps.numel())
    assert stored_bits <= spec.bits_per_weight * q.seeds.numel() * spec.block + 16   # + the byte padding
    rel = float((ours - w).norm() / w.norm())
    assert rel < (0.25 if name == "seedlm4" else 0.4)              # it fits (random data, no structure)


def test_search_finds_a_planted_seed():
    """Blocks built as U(s)·q·2^e from chosen seeds and exactly representable coefficients come back exactly."""
    spec = SPEC4
    u = lfsr_basis(spec)
    seeds = [5, 4242, 31337, 65535]
    coeffs = torch.tensor([[3.0, -5.0, 7.0], [-7.0, 1.0, 2.0], [6.0, 6.0, -6.0], [1.0, -2.0, 4.0]]) * 2.0**-6
    w64 = torch.cat([(u[s - 1].double() @ c.double()) for s, c in zip(seeds, coeffs)]).view(4, spec.block)
    q = seedlm_quantize(w64.float(), spec)
    assert [int(s) & 0xFFFF for s in q.seeds] == seeds
    assert torch.equal(q.coefficients(), coeffs)  # 4-bit codes times 2^e: exact by construction
    # U(s)·q is a sum of 3 fp32 products whose rounding depends on the BLAS kernel (an Intel AVX-512 batched
    # matmul parts from this loop by one ulp), so against the float64 sum: |U|·|q| <= 3·7·2^-6 < 0.33, and 3
    # roundings of at most 2^-25 relative each stay below 1e-7.
    torch.testing.assert_close(q.dequantize().double(), w64, rtol=0, atol=1e-7)


def test_exhaustive_second_stage_is_never_worse():
    w = torch.randn(64, generator=torch.Generator().manual_seed(3)) * 0.02
    two = seedlm_quantize(w, SPEC4).dequantize()
    every = seedlm_quantize(w, SeedLMSpec(8, 3, candidates=0)).dequantize()
    err = lambda d: ((d - w).view(-1, 8) ** 2).sum(-1)  # noqa: E731
    assert (err(every) <= err(two) + 1e-12).all()


def test_bad_input():
    with pytest.raises(ValueError, match="finite"):
        seedlm_quantize(torch.tensor([1.0, float("nan")]), SPEC4)
