"""ModelConfig: the Hugging Face config round trip, legacy names, clear errors, and exact preset sizes."""

from __future__ import annotations

import json

import pytest
import torch

import nemotron3
from nemotron3 import ModelConfig
from nemotron3.presets import NANO_PATTERN, SUPER_PATTERN

transformers = pytest.importorskip("transformers")


def test_transformers_config_round_trips(tiny_hf_config, tmp_path):
    _, cfg = tiny_hf_config
    transformers.NemotronHConfig(**cfg).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    ours = ModelConfig.from_hf(tmp_path)
    assert ours.pattern == cfg["hybrid_override_pattern"]
    back = ours.to_hf()
    for key, value in written.items():
        assert back[key] == value, key
    # and transformers reads what we write into the same config
    ours.save(tmp_path / "ours")
    again = transformers.NemotronHConfig.from_pretrained(tmp_path / "ours").to_dict()
    first = transformers.NemotronHConfig.from_pretrained(tmp_path).to_dict()
    assert {k: v for k, v in again.items() if k not in ("transformers_version", "architectures")} == {
        k: v for k, v in first.items() if k not in ("transformers_version", "architectures")}


def test_both_layout_spellings_and_legacy_names_are_accepted():
    a = ModelConfig.from_hf({"hybrid_override_pattern": "M*E-", "mamba_n_groups": 2, "mamba_d_conv": 3,
                             "mamba_chunk_size": 64, "mamba_dt_limit": [0.0, {"__float__": "Infinity"}],
                             "num_local_experts": 16, "mtp_hybrid_override_pattern": "*E"})
    b = ModelConfig.from_hf({"layers_block_type": ["mamba", "attention", "moe", "mlp"], "n_groups": 2,
                             "conv_kernel": 3, "chunk_size": 64, "n_routed_experts": 16,
                             "mtp_layers_block_type": ["full_attention", "moe"]})
    assert a == b
    assert a.pattern == "M*E-" and a.n_groups == 2 and a.time_step_limit == (0.0, float("inf"))
    assert json.loads(json.dumps(a.to_hf()))["time_step_limit"] == [0.0, {"__float__": "Infinity"}]


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"hybrid_override_pattern": "M*E", "layers_block_type": ["mamba", "moe", "moe"]}, "hybrid_override_pattern"),
        ({"hybrid_override_pattern": "M*E", "num_hidden_layers": 4}, "num_hidden_layers"),
        ({"hybrid_override_pattern": "M*E", "n_groups": 2, "mamba_n_groups": 4}, "mamba_n_groups"),
        ({"hybrid_override_pattern": "M*E", "hiden_size": 64}, "hiden_size"),
        ({"hybrid_override_pattern": "MXE"}, "pattern"),
        ({"layers_block_type": ["mamba", "transformer"]}, "layers_block_type"),
        ({"hybrid_override_pattern": "M*E", "num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"hybrid_override_pattern": "ME", "num_experts_per_tok": 9, "n_routed_experts": 8}, "num_experts_per_tok"),
        ({"hybrid_override_pattern": "M", "mamba_num_heads": 6, "n_groups": 4}, "n_groups"),
        ({"hybrid_override_pattern": "M", "hidden_size": 0}, "hidden_size"),
        ({}, "layers_block_type"),
        ({"model_type": "llama", "hybrid_override_pattern": "M"}, "model_type"),
    ],
)
def test_bad_configs_name_the_field(raw, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_hf(raw)


def test_unknown_fields_can_be_kept_as_metadata():
    cfg = ModelConfig.from_hf({"hybrid_override_pattern": "M", "my_field": 3}, strict=False)
    assert cfg.extra["my_field"] == 3 and cfg.to_hf()["my_field"] == 3


def test_presets_have_the_official_layouts():
    nano, sup = ModelConfig.preset("nano-30b-a3b"), ModelConfig.preset("super-120b-a12b")
    assert nano.pattern == NANO_PATTERN and len(nano.pattern) == 52
    assert [i for i, c in enumerate(nano.pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]
    assert [i for i, c in enumerate(sup.pattern) if c == "*"] == [7, 16, 25, 36, 47, 58, 69, 78]
    assert sup.mamba_intermediate_size == 8192 and nano.mamba_intermediate_size == 4096
    assert sup.mtp_pattern == "*E" and sup.num_nextn_predict_layers == 1
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("ultra")


def test_preset_parameter_counts_are_exact():
    assert nemotron3.count_parameters(ModelConfig.preset("nano-30b-a3b"))["total"] == 31_577_940_288
    sup = nemotron3.count_parameters(ModelConfig.preset("super-120b-a12b").replace(num_nextn_predict_layers=0))
    assert sup["total"] == 120_668_707_840
    assert sup["active"] == 12_770_237_440
    # with its one MTP block (`*E`): the element count of the official BF16 checkpoint (ARCHITECTURE.md §8)
    assert nemotron3.count_parameters(ModelConfig.preset("super-120b-a12b"))["total"] == 123_611_033_088


def test_parameter_counts_agree_with_transformers(tiny_hf_config):
    _, cfg = tiny_hf_config
    ref = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**cfg))
    n_ref = sum(p.numel() for p in ref.parameters()) + sum(
        b.numel() for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias"))
    assert nemotron3.count_parameters(ModelConfig.from_hf(cfg))["total"] == n_ref


def test_meta_device_construction_allocates_nothing():
    with torch.device("meta"):
        model = nemotron3.HybridLM(ModelConfig.preset("super-120b-a12b"))
    assert all(p.device.type == "meta" for p in model.parameters())
