"""ModelConfig: the Hugging Face config round trip, legacy names, clear errors, and exact preset sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

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


# The official NVIDIA-Nemotron-3-Nano-30B-A3B config.json (its `norm_eps` is NeMo's spelling, kept as metadata).
NANO_CONFIG_JSON = """{
  "architectures": ["NemotronHForCausalLM"], "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1,
  "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "head_dim": 128, "hidden_dropout": 0.0,
  "hidden_size": 2688, "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
  "initializer_range": 0.02, "intermediate_size": 1856, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
  "mamba_hidden_act": "silu", "mamba_num_heads": 64, "mamba_proj_bias": false, "mamba_ssm_cache_dtype": "float32",
  "max_position_embeddings": 262144, "mlp_bias": false, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
  "moe_intermediate_size": 1856, "moe_shared_expert_intermediate_size": 3712, "n_group": 1, "n_groups": 8,
  "n_routed_experts": 128, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": true,
  "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 52, "num_key_value_heads": 2,
  "num_logits_to_keep": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0, "rescale_prenorm_residual": true,
  "residual_in_fp32": false, "rope_theta": 10000, "routed_scaling_factor": 2.5, "sliding_window": null,
  "ssm_state_size": 128, "tie_word_embeddings": false, "time_step_floor": 0.0001, "time_step_max": 0.1,
  "time_step_min": 0.001, "topk_group": 1, "torch_dtype": "bfloat16", "transformers_version": "4.55.4",
  "use_bias": false, "use_cache": true, "use_conv_bias": true, "use_mamba_kernels": true, "vocab_size": 131072
}"""


# The official NVIDIA-Nemotron-3-Super-120B-A12B config.json (without its quantization_config).
SUPER_CONFIG_JSON = """{
  "architectures": ["NemotronHForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
               "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
  "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "dtype": "bfloat16", "eos_token_id": 2, "expand": 2,
  "head_dim": 128, "hidden_dropout": 0.0, "hidden_size": 4096,
  "hybrid_override_pattern": "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME",
  "initializer_range": 0.02, "intermediate_size": 2688, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
  "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": false, "mamba_ssm_cache_dtype": "float32",
  "max_position_embeddings": 262144, "mlp_bias": false, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
  "moe_intermediate_size": 2688, "moe_latent_size": 1024, "moe_shared_expert_intermediate_size": 5376,
  "moe_shared_expert_overlap": false, "mtp_hybrid_override_pattern": "*E", "n_group": 1, "n_groups": 8,
  "n_routed_experts": 512, "n_shared_experts": 1, "norm_eps": 1e-05, "norm_topk_prob": true,
  "num_attention_heads": 32, "num_experts_per_tok": 22, "num_hidden_layers": 88, "num_key_value_heads": 2,
  "num_logits_to_keep": 1, "num_nextn_predict_layers": 1, "pad_token_id": 0, "partial_rotary_factor": 1.0,
  "rescale_prenorm_residual": true, "residual_in_fp32": false, "rope_theta": 10000, "routed_scaling_factor": 5.0,
  "sliding_window": null, "ssm_state_size": 128, "tie_word_embeddings": false, "time_step_floor": 0.0001,
  "time_step_max": 0.1, "time_step_min": 0.001, "topk_group": 1, "transformers_version": "4.57.6",
  "use_bias": false, "use_cache": true, "use_conv_bias": true, "use_mamba_kernels": true, "vocab_size": 131072
}"""


def test_official_configs_load_and_match_the_presets(tmp_path):
    from nemotron3.presets import PRESETS

    for name, text in [("nano-30b-a3b", NANO_CONFIG_JSON), ("super-120b-a12b", SUPER_CONFIG_JSON)]:
        (tmp_path / "config.json").write_text(text)
        cfg = ModelConfig.from_hf(tmp_path)
        assert {k: getattr(cfg, k) for k in PRESETS[name]} == PRESETS[name], name
        assert cfg.extra["norm_eps"] == 1e-05 and cfg.to_hf()["norm_eps"] == 1e-05
    # other spellings found in released configs: an EOS list, an int for a float field, transformers' and
    # Python's non-standard `Infinity` for the dt limit
    text = SUPER_CONFIG_JSON.replace('"eos_token_id": 2', '"eos_token_id": [2, 11]').replace(
        '"routed_scaling_factor": 5.0', '"routed_scaling_factor": 5')
    for limit in ('[0.0, Infinity]', '[0.0, {"__float__": "Infinity"}]'):
        (tmp_path / "config.json").write_text(text[:-1] + f', "time_step_limit": {limit}}}')
        cfg = ModelConfig.from_hf(tmp_path)
        assert cfg.eos_token_ids == [2, 11] and cfg.time_step_limit == (0.0, float("inf"))
        assert cfg.routed_scaling_factor == 5.0 and isinstance(cfg.routed_scaling_factor, float)
    # the benchmark model's config.json is the t9 preset
    t9 = ModelConfig.from_hf(Path(__file__).resolve().parents[2] / "benchmarks" / "t9_config.json")
    assert t9.replace(extra={}) == ModelConfig.preset("t9")


@pytest.mark.parametrize("text", ["[1, 2]", '"M*E"', "null", "{not json", '{"a": 1', b"\x89PNG\r\n\x1a\n\xff\xfe"])
def test_a_config_file_that_is_not_a_json_object_is_named(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=re.escape(str(path))):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize(
    "field,value",
    [("eos_token_id", "abc"), ("use_cache", "abc"), ("routed_scaling_factor", "2.5"), ("hidden_size", 4096.0),
     ("time_step_limit", [0.0, {"__float__": "soon"}]), ("hybrid_override_pattern", 5), ("num_hidden_layers", "3"),
     ("layers_block_type", "M*E"), ("layers_block_type", [1, 2, 3]), ("mtp_hybrid_override_pattern", ["*", "E"])],
)
def test_wrong_values_in_a_config_file_name_the_file_and_field(tmp_path, field, value):
    raw = {"hybrid_override_pattern": "M*E", field: value}
    if field == "layers_block_type":
        raw.pop("hybrid_override_pattern")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'config.json'))}: .*{field}"):
        ModelConfig.from_hf(tmp_path)


def test_unknown_fields_can_be_kept_as_metadata():
    cfg = ModelConfig.from_hf({"hybrid_override_pattern": "M", "my_field": 3}, strict=False)
    assert cfg.extra["my_field"] == 3 and cfg.to_hf()["my_field"] == 3


def test_presets_have_the_official_layouts():
    nano, sup = ModelConfig.preset("nano-30b-a3b"), ModelConfig.preset("super-120b-a12b")
    assert nano.pattern == NANO_PATTERN and len(nano.pattern) == 52
    assert [i for i, c in enumerate(nano.pattern) if c == "*"] == [5, 12, 19, 26, 33, 42]
    assert sup.pattern == SUPER_PATTERN and len(sup.pattern) == 88
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
    # with its one MTP block (`*E`): the element count of the official BF16 checkpoint (docs/architecture.md §8)
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
