"""`nemotron3 quantize`: compressed-tensors decodes our NVFP4 / FP8 exports bit for bit as we do and accepts the
`quantization_config`; every scheme round-trips through `load_pretrained`; bad input fails cleanly.

Bit-for-bit comparisons here are exact by construction: a codec is elementwise IEEE arithmetic (correctly rounded
multiplications and divisions, casts), max reductions and integer bit manipulation, so its bits do not depend
on the CPU's vector kernels; so are sums of exactly representable terms (integers, powers of two) and the same
computation run twice. A comparison through any other sum (a matmul of random floats) has a stated tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.forward import dequantize
from conftest import TINY_HF_CONFIGS, randomize_
from safetensors.torch import load_file

import nemotron3
from nemotron3 import CheckpointError, ModelConfig
from nemotron3.checkpoint import checkpoint_bytes, layer_bytes
from nemotron3.options import ConfigError
from nemotron3.quant import checkpoint as qc
from nemotron3.stages.quantize import SCHEMES, QuantizeConfig, quantize
from nemotron3.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny LatentMoE checkpoint with a tokenizer. Its routed experts' up_proj has input width 24 (the latent
    size): not a multiple of 16, so it must stay high; everything else quantizable has widths of 32 or 64."""
    folder = tmp_path_factory.mktemp("src") / "ckpt"
    config = ModelConfig.from_hf({**TINY_HF_CONFIGS["latent-2groups"], "vocab_size": 320})
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, folder)
    Tokenizer.train([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 320).save(folder)
    return folder


@pytest.fixture(scope="module")
def exports(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    return {s: quantize(QuantizeConfig(model=source, out=root / s, scheme=s, calib=4)) for s in SCHEMES}


def _modules(folder, suffix: str) -> dict[str, dict[str, torch.Tensor]]:
    sd = load_file(str(folder / "model.safetensors"))
    mods = {k.removesuffix(f".{suffix}") for k in sd if k.endswith(f".{suffix}")}
    return {m: {k[len(m) + 1:]: v for k, v in sd.items() if k.startswith(f"{m}.")} for m in mods}


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("scheme,preset", [("nvfp4", "NVFP4"), ("nvfp4-w4a16", "NVFP4A16"), ("fp8", "FP8_DYNAMIC")])
def test_quantization_config_is_compressed_tensors_own(exports, scheme, preset):
    cfg = _config(exports[scheme])
    parsed = QuantizationConfig.model_validate(cfg)
    expected = preset_name_to_scheme(preset, ["Linear"])
    assert parsed.config_groups["group_0"] == expected
    assert parsed.format == ("float-quantized" if scheme == "fp8" else "nvfp4-pack-quantized")
    assert parsed.quant_method == "compressed-tensors" and parsed.quantization_status == "compressed"
    ignore = set(parsed.ignore)
    assert {"lm_head", "backbone.layers.3.mixer.q_proj", "backbone.layers.1.mixer.fc1_latent_proj"} <= ignore
    misfit = "backbone.layers.1.mixer.experts.0.up_proj"                 # input width 24: not a multiple of 16
    assert (misfit in ignore) == (scheme != "fp8")
    quantized = set(_modules(exports[scheme], "weight_scale"))
    assert quantized and not quantized & ignore
    assert "backbone.layers.0.mixer.in_proj" in quantized and "backbone.layers.1.mixer.experts.5.down_proj" in quantized


def test_nvfp4_decompresses_bit_identically(exports, source):
    folder = exports["nvfp4"]
    scheme = QuantizationConfig.model_validate(_config(folder)).config_groups["group_0"]
    mods = _modules(folder, "weight_packed")
    assert "backbone.layers.1.mixer.experts.3.down_proj" in mods and "backbone.layers.0.mixer.in_proj" in mods
    loaded = dict(nemotron3.hf._state_dict_for_disk(nemotron3.load_pretrained(folder, dtype=torch.float32)))
    for name, t in mods.items():
        assert set(t) == {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale"}
        assert t["weight_scale"].dtype == torch.float8_e4m3fn and t["weight_global_scale"].shape == (1,)
        ours = loaded[f"{name}.weight"]
        ct = NVFP4PackedCompressor.decompress(dict(t), scheme)["weight"]           # CT decodes to bf16
        assert torch.equal(ct.view(torch.int16), ours.bfloat16().view(torch.int16)), name
        m, n = t["weight_packed"].shape
        ct32 = dequantize(x_q=unpack_fp4_from_uint8(t["weight_packed"], m, 2 * n, dtype=torch.float32),
                          scale=t["weight_scale"].float(), args=scheme.weights,
                          global_scale=t["weight_global_scale"], dtype=torch.float32)
        assert torch.equal(ct32.view(torch.int32), ours.view(torch.int32)), name
        assert torch.all(t["input_global_scale"] > 0)


def test_nvfp4_weights_are_close_and_global_scale_is_encode_form(exports, source):
    src = dict(nemotron3.hf._state_dict_for_disk(nemotron3.load_pretrained(source)))
    t = _modules(exports["nvfp4"], "weight_packed")["backbone.layers.0.mixer.in_proj"]
    w = src["backbone.layers.0.mixer.in_proj.weight"]
    assert float(t["weight_global_scale"]) == pytest.approx(448 * 6 / float(w.abs().max()), rel=1e-6)
    dq = qc.decode_weight("nvfp4", t, tuple(w.shape))
    assert float((dq - w).norm() / w.norm()) < 0.12


def test_fp8_decompresses_bit_identically(exports):
    folder = exports["fp8"]
    scheme = QuantizationConfig.model_validate(_config(folder)).config_groups["group_0"]
    loaded = dict(nemotron3.hf._state_dict_for_disk(nemotron3.load_pretrained(folder, dtype=torch.float32)))
    mods = _modules(folder, "weight_scale")
    assert mods
    for name, t in mods.items():
        assert t["weight"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (t["weight"].shape[0], 1)
        ct = NaiveQuantizationCompressor.decompress(dict(t), scheme)["weight"]
        assert ct.dtype == torch.float32
        assert torch.equal(ct.view(torch.int32), loaded[f"{name}.weight"].view(torch.int32)), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_round_trips_through_the_loader(exports, source, scheme):
    folder = exports[scheme]
    src = nemotron3.load_pretrained(source)
    model = nemotron3.load_pretrained(folder, dtype=torch.float32)
    quant, ignore, misfit = qc.plan(src, scheme)
    if qc.BLOCK[scheme] > 1:                                              # the latent-width (24) experts stay high
        assert misfit and all(".experts." in m and m.endswith("up_proj") for m in misfit)
    else:
        assert not misfit
    a = dict(nemotron3.hf._state_dict_for_disk(src))
    b = dict(nemotron3.hf._state_dict_for_disk(model))
    disk = load_file(str(folder / "model.safetensors"))
    for name in a:
        if name in quant:
            module = name.removesuffix(".weight")
            t = {k[len(module) + 1:]: v for k, v in disk.items() if k.startswith(f"{module}.")}
            assert torch.equal(b[name], qc.decode_weight(scheme, t, tuple(a[name].shape))), name
            assert not torch.equal(b[name], a[name]), name               # it was quantized
        else:
            assert torch.equal(b[name], a[name]), name                    # kept exactly
    assert Tokenizer.load(folder).encode("1+2=3") == Tokenizer.load(source).encode("1+2=3")
    assert checkpoint_bytes(folder) < checkpoint_bytes(source)


def test_activation_emulation_changes_only_what_it_should(exports, source):
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    for scheme in ("nvfp4", "fp8"):
        w_only = nemotron3.load_pretrained(exports[scheme])
        act = nemotron3.load_pretrained(exports[scheme], quantize_activations=True)
        seen = {}
        # layer 0's in_proj sees the same raw input in both models (only the embedding and a norm precede it)
        w_only.backbone.layers[0].mixer.in_proj.register_forward_pre_hook(
            lambda m, a, s=seen: s.setdefault("raw", a[0]))
        act.backbone.layers[0].mixer.in_proj.register_forward_pre_hook(lambda m, a, s=seen: s.setdefault("q", a[0]))
        with torch.no_grad():
            a, b = w_only(ids), act(ids)
        assert not torch.equal(a, b)
        if scheme == "nvfp4":
            disk = load_file(str(exports[scheme] / "model.safetensors"))
            gs = disk["backbone.layers.0.mixer.in_proj.input_global_scale"]
            expected = qc.nvfp4_activation_fake_quantize(seen["raw"], gs)
        else:
            expected = qc.fp8_activation_fake_quantize(seen["raw"])
        assert torch.equal(seen["q"], expected) and not torch.equal(seen["q"], seen["raw"])
        assert act.backbone.layers[1].mixer.experts.__dict__.get("gemm_quantizer") is not None   # experts too
    w4a16 = nemotron3.load_pretrained(exports["nvfp4-w4a16"], quantize_activations=True)
    plain = nemotron3.load_pretrained(exports["nvfp4-w4a16"])
    with torch.no_grad():
        assert torch.equal(w4a16(ids), plain(ids))                        # weight-only: nothing to emulate


def test_activation_fake_quantizers_by_hand():
    # fp8 per token: row max 448·2 -> s = 2; 3.3/2 = 1.65 -> e4m3 grid step 0.125 in [1, 2): 1.625 -> 3.25
    # second token: s = 1/448 (its own max, not the first token's); 0.3·448 = 134.4 -> e4m3 step 16 in [128, 256): 128
    x = torch.tensor([[896.0, 3.3, 0.0, -896.0], [1.0, 0.3, 0.0, 0.0]])
    s2 = torch.tensor(1.0) / 448
    out = qc.fp8_activation_fake_quantize(x)
    assert out[0].tolist() == [896.0, 3.25, 0.0, -896.0]
    assert out[1].tolist() == [float(448 * s2), float(128 * s2), 0.0, 0.0]
    assert qc.fp8_activation_fake_quantize(torch.zeros(1, 4)).eq(0).all()
    # nvfp4 with gs = 1: block amax 6 -> scale e4m3(1) = 1; 2.4 -> e2m1 2.0, 2.6 -> 3.0, 5.1 -> 6.0 (5 ties to 4? no:
    # 5.1 is above the 5 midpoint), -0.2 -> 0
    blk = torch.tensor([[6.0, 2.4, 2.6, 5.1, -0.2] + [0.0] * 11])
    out = qc.nvfp4_activation_fake_quantize(blk, torch.tensor([1.0]))
    assert out[0, :5].tolist() == [6.0, 2.0, 3.0, 6.0, -0.0]


def test_info_prints_scheme_and_bytes(exports, capsys):
    from nemotron3.stages.info import InfoConfig, main

    main(InfoConfig(models=[str(exports["mx6"])]))
    out = capsys.readouterr().out
    assert "mx6, 6 bits per quantized weight" in out and "routed experts" in out
    rows = {r["type"]: r for r in layer_bytes(exports["mx6"])}
    assert rows["shared experts"]["precision"] == "mx6" and rows["attention"]["precision"] == "fp32"
    assert rows["shared experts"]["bytes"] * 8 == 6 * rows["shared experts"]["params"]


# ----------------------------------------------------------------------------------------------- bad input


def _nothing_written(parent, name):
    return not (parent / name).exists() and not [p for p in parent.iterdir()
                                                 if p.name.startswith((f".{name}.", f".tmp-{name}-", f".old-{name}-"))]


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        quantize(QuantizeConfig(model=tmp_path / "empty", out=tmp_path / "out", scheme="mx6"))
    assert _nothing_written(tmp_path, "out")


def test_unsupported_scheme(source, tmp_path):
    with pytest.raises(ConfigError, match="scheme"):
        QuantizeConfig(model=source, out=tmp_path / "out", scheme="int3")


def test_already_quantized(exports, tmp_path):
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize(QuantizeConfig(model=exports["nvfp4"], out=tmp_path / "again", scheme="fp8"))
    assert _nothing_written(tmp_path, "again")


def test_refuses_to_overwrite_a_folder_that_is_not_a_quantized_checkpoint(source, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing"):
        QuantizeConfig(model=source, out=tmp_path / "busy", scheme="mx6")


def test_error_midway_leaves_nothing(source, tmp_path, monkeypatch):
    import nemotron3.stages.quantize as stage

    def boom(*args, **kwargs):
        raise OSError("disk full")

    earlier = quantize(QuantizeConfig(model=source, out=tmp_path / "old", scheme="mx9"))
    before = (earlier / "model.safetensors").read_bytes()
    monkeypatch.setattr(stage, "save_file", boom)             # fails after config.json and the tokenizer are written
    with pytest.raises(OSError, match="disk full"):
        quantize(QuantizeConfig(model=source, out=tmp_path / "out", scheme="mx4"))
    assert _nothing_written(tmp_path, "out")
    with pytest.raises(OSError, match="disk full"):                # replacing an earlier export: it survives
        quantize(QuantizeConfig(model=source, out=earlier, scheme="mx4", overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary beside it
    assert (earlier / "model.safetensors").read_bytes() == before and _config(earlier)["scheme"] == "mx9"


def test_unknown_quantization_config_is_a_clear_error(exports, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exports["mx6"], bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unsupported quantization_config"):
        nemotron3.load_pretrained(bad)
