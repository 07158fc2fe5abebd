"""Quantized weights kept packed at runtime (quant/packed.py, issue 30): `load_pretrained(DIR)` keeps the weight-only
schemes packed, computes the same logits as `load_pretrained(DIR, dequantize=True)`, holds fewer bytes, refuses
training, and generates the same greedy tokens.

Tolerances. A packed weight decodes tile by tile with the same elementwise decoder as the whole weight, so the
weights (and `state_dict()`) are bit-identical to the dequantized load (compared exactly). The logits go through
matmuls: a tile of rows is multiplied by BLAS with another blocking than the whole matrix, so the fp32 sums may be
added in another order; over this model that moves logits of size O(1) by a few 1e-7, hence `atol=1e-5`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3 import ModelConfig
from nemotron3.engine import Engine
from nemotron3.engine.decode import FastDecoder
from nemotron3.hf import state_dict_for_disk
from nemotron3.quant import packed as packed_mod
from nemotron3.quant.packed import PackedExperts, PackedLinear, resident_bytes
from nemotron3.stages.quantize import QuantizeConfig, quantize

PACKED = ("nvfp4-w4a16", "fp8", "mxfp4", "mx9", "mx6", "mx4")   # weight-only uses of every packable scheme


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The `tiny` preset (every layer kind, LatentMoE, MTP) with random fp32 weights."""
    folder = tmp_path_factory.mktemp("src") / "tiny"
    torch.manual_seed(0)
    model = nemotron3.HybridLM(ModelConfig.preset("tiny"))
    randomize_(model)
    nemotron3.save_pretrained(model, folder)
    return folder


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    return {s: quantize(QuantizeConfig(model=source, out=root / s, scheme=s, calib=1)) for s in PACKED}


def _ids() -> torch.Tensor:
    return torch.randint(3, 2048, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("scheme", PACKED)
def test_packed_load_equals_dequantized(exports, scheme):
    packed = nemotron3.load_pretrained(exports[scheme])
    dense = nemotron3.load_pretrained(exports[scheme], dequantize=True)
    kinds = {type(m) for m in packed.modules()}
    assert PackedLinear in kinds and PackedExperts in kinds
    assert not {type(m) for m in dense.modules()} & {PackedLinear, PackedExperts}
    a, b = dict(state_dict_for_disk(packed)), dict(state_dict_for_disk(dense))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                  # the same decoded weights, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(packed(_ids()), dense(_ids()), rtol=0, atol=1e-5)


def test_tiles_decode_as_the_whole_weight(exports, monkeypatch):
    """With tiles of a few rows (so every weight spans many), the result is the same."""
    folder = exports["mx6"]
    whole = nemotron3.load_pretrained(folder)
    with torch.no_grad():
        ref = whole(_ids())
        monkeypatch.setattr(packed_mod, "TILE_ELEMENTS", 200)
        torch.testing.assert_close(whole(_ids()), ref, rtol=0, atol=1e-5)


def test_resident_bytes_follow_the_format(source, exports):
    """NVFP4 W4A16: resident bytes (every tensor's storage, `resident_bytes`) of the packed load against the fp32
    model. The packed layers hold 4.5 bits per weight (plus one fp32 scale per weight). The whole model also
    holds what the scheme keeps high (embeddings, lm_head, attention, latent projections, MTP: more than half
    of the tiny model's fp32 bytes), so it reaches 0.35x once those are bf16, as a GPU load keeps them."""
    fp32 = nemotron3.load_pretrained(source, dtype=torch.float32)
    packed = nemotron3.load_pretrained(exports["nvfp4-w4a16"])
    dense = nemotron3.load_pretrained(exports["nvfp4-w4a16"], dequantize=True)
    assert resident_bytes(dense) == resident_bytes(fp32)
    names = [n for n, m in packed.named_modules() if isinstance(m, (PackedLinear, PackedExperts))]
    q_packed = sum(resident_bytes(packed.get_submodule(n)) for n in names)
    q_fp32 = sum(resident_bytes(fp32.get_submodule(n)) for n in names)
    assert q_packed <= 0.15 * q_fp32
    assert resident_bytes(packed) < 0.6 * resident_bytes(fp32)
    bf16 = nemotron3.load_pretrained(exports["nvfp4-w4a16"], dtype=torch.bfloat16)
    assert resident_bytes(bf16) <= 0.35 * resident_bytes(fp32)


def test_packed_layers_are_inference_only(exports):
    model = nemotron3.load_pretrained(exports["nvfp4-w4a16"])
    logits = model(_ids())                                  # grad mode on: the forward itself works ...
    with pytest.raises(NotImplementedError, match="inference-only.*dequantize=True"):
        logits.sum().backward()                             # ... and the backward says why it cannot
    model.train()
    with pytest.raises(NotImplementedError, match="inference-only"):
        model(_ids())
    dense = nemotron3.load_pretrained(exports["nvfp4-w4a16"], dequantize=True)
    dense(_ids()).sum().backward()                          # dequantize=True trains as before


def test_packed_model_saves_as_its_dense_weights(exports, tmp_path):
    packed = nemotron3.load_pretrained(exports["fp8"])
    nemotron3.save_pretrained(packed, tmp_path / "dense")
    again = nemotron3.load_pretrained(tmp_path / "dense")
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()), packed(_ids()), rtol=0, atol=1e-5)


def test_engine_greedy_tokens_match(exports):
    """The fused decoder does not take packed layers (FastDecoder.supports is False): the engine falls back to the
    reference path and generates what the dequantized model generates."""
    packed = nemotron3.load_pretrained(exports["nvfp4-w4a16"])
    dense = nemotron3.load_pretrained(exports["nvfp4-w4a16"], dequantize=True)
    assert not FastDecoder.supports(packed)
    prompts = [[1, 17, 230, 41, 9], [1, 99, 5]]
    a = Engine(packed, max_seq_len=64).generate(prompts, 8).tokens
    b = Engine(dense, max_seq_len=64, fast=False).generate(prompts, 8).tokens
    assert a == b


def test_activation_emulation_dequantizes(source, tmp_path):
    """quantize_activations=True needs the dense layers its hooks act on: the weights are decoded."""
    folder = quantize(QuantizeConfig(model=source, out=tmp_path / "fp8", scheme="fp8", calib=1))
    model = nemotron3.load_pretrained(folder, quantize_activations=True)
    assert not any(isinstance(m, (PackedLinear, PackedExperts)) for m in model.modules())


@pytest.mark.parametrize("scheme", ["nvfp4-w4a16", "mx4", "fp8"])
def test_info_reports_resident_bytes(exports, scheme):
    """`nemotron3 info DIR` reads the resident bytes from the headers; they are what a load measures (plus the
    model's runtime buffers, which no file holds)."""
    from nemotron3.checkpoint import layer_bytes
    from nemotron3.stages.info import bytes_table

    rows = layer_bytes(exports[scheme])
    model = nemotron3.load_pretrained(exports[scheme])
    runtime = sum(b.numel() * b.element_size() for m in model.modules() for n, b in m.named_buffers(recurse=False)
                  if n in m._non_persistent_buffers_set and not isinstance(m, (PackedLinear, PackedExperts)))
    assert sum(r["resident"] for r in rows) + runtime == resident_bytes(model)
    assert sum(r["resident"] for r in rows) < sum(r["bytes"] for r in rows) * 1.01
    assert "resident bytes" in [c.header for c in bytes_table(exports[scheme]).columns]
