"""The `te` convention with an explicit `per_tensor_scale` p, against hand-worked vectors.

With p given, S_enc = 1/p (1 when p = 0 or 1/p underflows, FLT_MAX when it overflows) and S_dec = 1/S_enc;
each block's scale is s_b = e4m3_rne(min(block_amax · (S_enc · fp32(1/6)), 448)), its elements are
e2m1_rne(clamp(x / (s_b · S_dec), ±6)), and they decode as q · (S_dec · s_b). The numbers below are worked
out by hand from that definition (E4M3 near 1/3: 0.3125 and 0.34375; E2M1: 0 .5 1 1.5 2 3 4 6).

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

from __future__ import annotations

import pytest
import torch

from nemotron3.quant import formats

E2M1_CODE = {0.0: 0, 0.5: 1, 1.0: 2, 1.5: 3, 2.0: 4, 3.0: 5, 4.0: 6, 6.0: 7}


def _codes(values: list[float]) -> list[int]:
    return [E2M1_CODE[abs(v)] | (8 if v < 0 or (v == 0 and str(v).startswith("-")) else 0) for v in values]


def _row(head: list[float]) -> torch.Tensor:
    return torch.tensor(head + [0.0] * (16 - len(head)))


def test_explicit_per_tensor_scale_hand_vectors():
    """p = 0.5: S_enc = 2, S_dec = 0.5, S_enc·(1/6) = 0.33333334.
    Block 0 (amax 6): s_b = e4m3(2.0) = 2, enc = 1/(2·0.5) = 1: 6, 3, -1.5 stay, 0.25 is a tie -> 0 (even).
    Block 1 (amax 1): s_b = e4m3(0.33333334) = 0.34375, enc = 1/(0.34375·0.5) = 5.818182:
    1 -> 5.82 -> 6, 0.5 -> 2.91 -> 3, -0.3 -> -1.745 -> -1.5 (below the 1.75 midpoint), 0.05 -> 0.29 -> 0.5;
    decode scale 0.5 · 0.34375 = 0.171875."""
    x = torch.stack([torch.cat([_row([6.0, 3.0, -1.5, 0.25]), _row([1.0, 0.5, -0.3, 0.05])])])  # (1, 32)
    q = formats.nvfp4_quantize(x, per_tensor_scale=0.5)
    assert q.per_tensor_scale.item() == 0.5
    assert q.scales.float().tolist() == [[2.0, 0.34375]]
    want0, want1 = [6.0, 3.0, -1.5, 0.0], [6.0, 3.0, -1.5, 0.5]
    assert q.codes[0, :4].tolist() == _codes(want0) and q.codes[0, 16:20].tolist() == _codes(want1)
    assert q.codes[0, 4:16].eq(0).all() and q.codes[0, 20:].eq(0).all()
    deq = q.dequantize()[0]
    assert deq[:4].tolist() == want0
    assert deq[16:20].tolist() == [v * 0.171875 for v in want1]
    fake = formats.nvfp4_fake_quantize(x, per_tensor_scale=torch.tensor([0.5]))
    assert torch.equal(fake, q.dequantize())


def test_degenerate_per_tensor_scales_fall_back_to_one_or_saturate():
    """p = 0 (and p = inf, whose 1/p is 0) fall back to S_enc = 1: block amax 6 -> s_b = e4m3(1.0) = 1.
    p = 1e-45 (a denormal): 1/p overflows, S_enc = FLT_MAX, every block scale saturates at 448."""
    x = _row([6.0, -3.0, 1.0])[None]
    for p in (0.0, float("inf")):
        q = formats.nvfp4_quantize(x, per_tensor_scale=p)
        assert q.per_tensor_scale.item() == 1.0 and q.scales.float().tolist() == [[1.0]], p
        assert q.dequantize()[0, :3].tolist() == [6.0, -3.0, 1.0]
    q = formats.nvfp4_quantize(x, per_tensor_scale=1e-45)
    if torch.tensor(1e-45).item() == 0:  # denormals flushed (torch.set_flush_denormal, set by another test): p = 0
        assert q.per_tensor_scale.item() == 1.0 and q.scales.float().tolist() == [[1.0]]
    else:
        assert q.scales.float().tolist() == [[448.0]]
        assert q.per_tensor_scale.item() == pytest.approx(1 / torch.finfo(torch.float32).max, rel=1e-6)


def test_per_tensor_scale_errors():
    x = torch.ones(1, 16)
    with pytest.raises(ValueError, match="one value"):
        formats.nvfp4_quantize(x, per_tensor_scale=torch.ones(2))
    with pytest.raises(ValueError, match="either per_tensor_scale or amax"):
        formats.nvfp4_quantize(x, per_tensor_scale=1.0, amax=1.0)


def test_other_shapes_dtypes_and_the_torchao_limits():
    """A 1-D tensor is one row; dequantize honours its dtype; the torchao convention refuses stochastic rounding
    alone, and clamps block scales at 448 like torchao itself (values far above 448·6, with and without p)."""
    import torchao.prototype.mx_formats.nvfp4_tensor as nvfp4_ao

    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(formats.nvfp4_quantize(x[0]).packed, formats.nvfp4_quantize(x[:1]).packed[0])
    assert formats.nvfp4_quantize(x).dequantize(torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="torchao convention has no"):
        formats.nvfp4_quantize(x, convention="torchao", stochastic_rounding=True)
    big = x * 1e5
    for p in (None, torch.tensor(1.0)):
        ref = nvfp4_ao.NVFP4Tensor.to_nvfp4(big, per_tensor_scale=p)
        ours = formats.nvfp4_quantize(big, p, convention="torchao")
        assert torch.equal(ours.scales.view(torch.uint8), ref.scale.view(torch.uint8))
        assert torch.equal(ours.packed, ref.qdata)


def test_2d_block_codes_do_not_depend_on_the_chunking(monkeypatch):
    """nvfp4_quantize with 16x16 tiles in small chunks (the last partial) equals one chunk, bit for bit."""
    import nemotron3.quant.fp_codecs as fp_codecs
    import nemotron3.quant.nvfp4 as nvfp4

    # 48 columns: a 2048-element chunk is 42 rows unless aligned to whole tiles (32)
    x = torch.randn(200, 48, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 3, 48)
    whole = formats.nvfp4_quantize(x, block_2d=True)
    monkeypatch.setattr(nvfp4, "row_chunks", lambda t, align=1: fp_codecs.row_chunks(t, align, target=2048))
    small = formats.nvfp4_quantize(x, block_2d=True)
    assert torch.equal(small.packed, whole.packed) and torch.equal(small.scales.view(torch.uint8),
                                                                   whole.scales.view(torch.uint8))
