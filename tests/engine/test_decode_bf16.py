"""The fast decoder on bf16 weights, and on per-channel int8 weights, against the fp32 and bf16 reference paths.

Tolerances. bf16 keeps 8 significant bits: one rounding errs by at most u = 2⁻⁹ relative, and a decode step
rounds the activations a few times per layer (norm output, projections, residual). Two bf16 computations of the
same logits therefore differ by some tens of u·max|logit| after a handful of random-weight layers (measured on
these models: up to 37 u·max for fast bf16 against reference bf16, up to 60 for reference bf16 against fp32).
The checks:

* fast bf16 vs reference bf16 (same weights, same precision, different rounding points): within 96 u·max|logit|;
* fast bf16 vs fp32: within 2·e + 16 u·max|logit|, e = the reference bf16 path's own distance from fp32 on the
  same tokens: the fast path is no less accurate than the reference bf16 path, up to a factor 2;
* int8 vs fp32: within 3·e + 16 u·max|logit| (the int8 grid is max|W[o]|/127 per output channel, a few times
  bf16's step for typical rows).

Routing is made decisive (well-separated correction biases): random tiny routers put near-ties in the top-k, and a
flipped expert choice between two precisions is a discrete jump no tolerance on rounding covers. The continuous
combine weights still come from the scores.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_HF_CONFIGS, model_from_hf_config

import nemotron3
from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.quant.int8 import Int8Weight, quantize_int8

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0**-9  # bf16's unit roundoff


def decisive(model: nemotron3.HybridLM, seed: int = 0) -> nemotron3.HybridLM:
    """Correction biases 0, 2, 4, ... in a random order: the selection never depends on scores in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(2.0 * torch.randperm(b.numel(), generator=g).float())
    return model


def decode(model, fast: FastDecoder | None, lens: list[int], steps: int = 6, seed: int = 0) -> torch.Tensor:
    """Prefill rows of lengths `lens` (reference path), then `steps` forced tokens: logits (B, steps, V) fp32,
    through `fast` or, with None, the reference cached path."""
    V, B = model.config.vocab_size, len(lens)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, max(lens)), generator=gen)
    toks = torch.randint(0, V, (B, steps), generator=gen)
    cache = HybridCache(model.config, B, max(lens) + steps, model.lm_head.weight.dtype, include_mtp=False)
    out = []
    with torch.no_grad():
        model(ids, cache=cache, valid=torch.tensor(lens))
        for j in range(steps):
            if fast is None:
                out.append(model(toks[:, j : j + 1], cache=cache)[:, 0].float())
            else:
                n_keys = None if fast.traceable else int(cache.lengths.max()) + 1  # None: the compiled shapes
                out.append(fast.step(toks[:, j], cache, n_keys, len(set(lens)) == 1))
                cache.lengths += 1
    return torch.stack(out, 1)


def pair(cfg: dict, seed: int = 1) -> tuple[nemotron3.HybridLM, nemotron3.HybridLM]:
    m32 = decisive(model_from_hf_config(cfg, seed=seed), seed)
    return m32, copy.deepcopy(m32).to(torch.bfloat16)


@pytest.mark.parametrize("traceable", [False, True])  # the eager step, and the variant torch.compile traces
@pytest.mark.parametrize("lens", [[9], [3, 17, 8]])  # one row (oneDNN off, bf16 GEMV), rows at different lengths
def test_bf16_fast_path_against_reference_bf16_and_fp32(tiny_hf_config, lens, traceable):
    _, cfg = tiny_hf_config
    m32, m16 = pair(cfg)
    assert FastDecoder.supports(m16)
    r32, r16 = decode(m32, None, lens), decode(m16, None, lens)
    f16 = decode(m16, FastDecoder(m16, traceable=traceable), lens)
    scale = U * float(r32.abs().max())
    e = float((r16 - r32).abs().max())
    assert float((f16 - r16).abs().max()) <= 96 * scale
    assert float((f16 - r32).abs().max()) <= 2 * e + 16 * scale
    assert torch._C._get_mkldnn_enabled()  # the one-row step switched oneDNN back on


@pytest.mark.parametrize("lens", [[9], [20] * 6])  # GEMV pairs per expert; grouped experts (padded runs grouped)
def test_int8_fast_path_against_fp32(tiny_hf_config, lens):
    _, cfg = tiny_hf_config
    m32, m16 = pair(cfg)
    r32, r16 = decode(m32, None, lens), decode(m16, None, lens)
    i8 = decode(m16, FastDecoder(m16, pack=Int8Weight), lens)
    scale = U * float(r32.abs().max())
    assert float((i8 - r32).abs().max()) <= 3 * float((r16 - r32).abs().max()) + 16 * scale


def test_engine_decodes_a_bf16_model_on_the_fast_path():
    model = decisive(model_from_hf_config(TINY_HF_CONFIGS["latent-2groups"], seed=3)).to(torch.bfloat16)
    engine = nemotron3.Engine(model)
    out = engine.generate([[1, 2, 3], [4, 5, 6, 7, 8]], 4, stop_token_ids=[])
    assert out.stats["path"] == "fast"
    assert [len(t) for t in out.tokens] == [4, 4]
    assert FastDecoder(model).step(torch.tensor([1]), HybridCache(model.config, 1, 8, torch.bfloat16,
                                                                  include_mtp=False), 1, True).dtype == torch.float32


def test_other_dtypes_and_mixed_matrices_are_not_supported():
    model = model_from_hf_config(TINY_HF_CONFIGS["dense-mlp"])
    assert not FastDecoder.supports(copy.deepcopy(model).to(torch.float16))
    mixed = copy.deepcopy(model).to(torch.bfloat16)
    mixed.backbone.layers[0].mixer.in_proj.float()  # one fp32 matrix in a bf16 model
    assert not FastDecoder.supports(mixed)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        FastDecoder(mixed)


@pytest.mark.parametrize("shape", [(48, 64), (40, 24), (7, 16)])  # in % 16 == 0 takes torch's kernel, else not
def test_int8_weight_round_trip_and_product(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    w[0] = 0.0  # an all-zero row: scale 1, q 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    # round to nearest on a grid of step `scale`: every weight within half a step, the row's max on the grid's end
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    assert bool((q[1:].abs().amax(1) == 127).all())
    packed = Int8Weight(w.bfloat16())
    x = torch.randn(5, shape[1], generator=g).bfloat16()
    want = x.float() @ packed.dequantize().float().t()
    got = packed.mm(x[1:2]).float(), packed.mm(x).float()
    # bf16 output: one rounding of each output (plus the bf16 scales' product)
    torch.testing.assert_close(got[1], want, atol=4 * U * float(want.abs().max()), rtol=0)
    torch.testing.assert_close(got[0], want[1:2], atol=4 * U * float(want.abs().max()), rtol=0)
    assert packed.nbytes == w.numel() + 2 * shape[0]


def test_quantize_int8_rejects_a_vector():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(4))
