"""Every ModelConfig field is type- and range-checked (by one table, `config.FIELD_RULES`), and the error names the
field, the bad value and what is expected.

The walks below go over `dataclasses.fields(ModelConfig)`, so a field added later without a rule, without a
wrong-typed example for its annotation, or (if it is numeric) without out-of-range examples fails here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from nemotron3 import ModelConfig
from nemotron3.config import FIELD_RULES

FIELDS = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
# every layer kind in use (with the MTP block's), so that every range is the strict one
BASE = dict(pattern="M*E-", num_nextn_predict_layers=1, mtp_pattern="*E")
INF, NAN = math.inf, math.nan
VOCAB = next(f.default for f in dataclasses.fields(ModelConfig) if f.name == "vocab_size")

# Values of the wrong type, per annotation. A string for a number, a number for a bool, a float for an int, ...
WRONG_TYPES = {
    "int": ["abc", "4", 2.5, 4.0, True, None, [3]],
    "float": ["abc", "0.1", True, None, [0.1], {"__float__": "oops"}],
    "bool": ["abc", "false", 1, 0, None, 1.0],
    "str": [5, None, ["M"], b"M*E-"],
    "int | None": ["abc", 2.5, True, [3]],
    "int | list[int] | None": ["abc", "2", 2.0, True, [2, "x"], [2, None], [2, True], {"a": 1}],
    "tuple[float, float]": ["abc", 5, None, [0.0], [0.0, 1.0, 2.0], ["a", 1.0], [0.0, True], {"low": 0}],
    "dict[str, Any]": ["abc", [], None, {1: "a"}],
}

# Values of the right type but out of range, for every field holding numbers.
OUT_OF_RANGE = {
    "vocab_size": [0, -1],
    "hidden_size": [0, -5],
    "num_attention_heads": [0, -1],
    "num_key_value_heads": [0, -1],
    "head_dim": [0, -1],
    "attention_dropout": [-0.1, 1.5, NAN, INF],
    "sliding_window": [0, -1],
    "max_position_embeddings": [0, -1],
    "intermediate_size": [0, -1],
    "mamba_num_heads": [0, -1],
    "mamba_head_dim": [0, -1],
    "ssm_state_size": [0, -1],
    "n_groups": [0, -1],
    "conv_kernel": [0, -1],
    "chunk_size": [0, -1],
    "expand": [0, -1],
    "time_step_min": [0.0, -0.001, NAN],
    "time_step_max": [0.0, -0.1, INF, NAN],
    "time_step_floor": [-1e-4, INF, NAN],
    "time_step_limit": [(0.5, 0.1), (-1.0, 1.0), (NAN, 1.0), (0.0, NAN), (INF, INF)],
    "n_routed_experts": [0, -1],
    "n_shared_experts": [-1, 2],
    "num_experts_per_tok": [0, -1],
    "moe_intermediate_size": [0, -1],
    "moe_shared_expert_intermediate_size": [0, -1],
    "moe_latent_size": [0, -1],
    "routed_scaling_factor": [0.0, -2.5, INF, NAN],
    "n_group": [0, -1],
    "topk_group": [0, -1],
    "num_nextn_predict_layers": [-1],
    "initializer_range": [-0.02, INF, NAN],
    "layer_norm_epsilon": [0.0, -1e-5, INF, NAN],
    "hidden_dropout": [-0.5, 1.01, NAN],
    "num_logits_to_keep": [-1],
    "pad_token_id": [-1, VOCAB],
    "bos_token_id": [-1, VOCAB + 7],
    "eos_token_id": [-1, VOCAB, [2, -1], [2, VOCAB]],
}


def _numeric(annotation: str) -> bool:
    return "int" in annotation or "float" in annotation


def test_every_field_has_a_rule_and_test_values():
    assert set(FIELD_RULES) == set(FIELDS), "each ModelConfig field needs exactly one rule in FIELD_RULES"
    assert not set(FIELDS.values()) - set(WRONG_TYPES), "a field's annotation has no wrong-typed examples"
    assert set(OUT_OF_RANGE) == {n for n, a in FIELDS.items() if _numeric(a)}, "numeric fields need range examples"


def test_a_field_without_a_rule_is_refused(monkeypatch):
    monkeypatch.delitem(FIELD_RULES, "use_cache")
    with pytest.raises(TypeError, match="'use_cache'.*no rule"):
        ModelConfig()


def test_the_base_configs_are_valid():
    ModelConfig(**BASE)
    for name in ("tiny", "t9", "nano-30b-a3b", "super-120b-a12b"):
        ModelConfig.preset(name)


def _raises_naming(name, value, **base):
    kwargs = {**BASE, **base, name: value}
    with pytest.raises(ValueError) as info:
        ModelConfig(**kwargs)
    msg = str(info.value)
    assert f"config field {name!r}" in msg, msg
    assert repr(value) in msg or str(value) in msg, f"{msg!r} does not show the value {value!r}"
    return msg


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_every_field_refuses_a_wrong_type(name):
    for value in WRONG_TYPES[FIELDS[name]]:
        msg = _raises_naming(name, value)
        assert "must be" in msg, msg


@pytest.mark.parametrize("name", sorted(n for n, a in FIELDS.items() if _numeric(a)))
def test_every_numeric_field_refuses_out_of_range_values(name):
    for value in OUT_OF_RANGE[name]:
        _raises_naming(name, value)


def test_messages_say_what_is_expected():
    assert _raises_naming("eos_token_id", "abc") == (
        "config field 'eos_token_id' must be an integer, a list of integers or null, got 'abc'")
    assert _raises_naming("use_cache", "abc") == "config field 'use_cache' must be true or false, got 'abc'"
    assert "must be a positive integer" in _raises_naming("hidden_size", 0)
    assert "must be a number in [0, 1]" in _raises_naming("hidden_dropout", 1.5)
    assert f"[0, vocab_size = {VOCAB})" in _raises_naming("eos_token_id", [2, VOCAB])
    assert "used by the attention ('*') layers" in _raises_naming("num_attention_heads", 0)


def test_unused_layer_kinds_keep_lenient_ranges_but_strict_types():
    """Without attention, dense-MLP or MoE layers their sizes may be 0 (a config leaving them unset), not negative,
    and their types are still checked. An MTP block counts only when it is enabled."""
    unused = dict(num_attention_heads=0, num_key_value_heads=0, head_dim=0, intermediate_size=0, n_routed_experts=0,
                  num_experts_per_tok=0, moe_intermediate_size=0, moe_shared_expert_intermediate_size=0,
                  moe_latent_size=0, n_group=0, topk_group=0)
    ModelConfig(pattern="M", num_nextn_predict_layers=0, **unused)
    for name, size in unused.items():
        assert "no " in _raises_naming(name, -1, pattern="M", num_nextn_predict_layers=0)
        _raises_naming(name, "abc", pattern="M", num_nextn_predict_layers=0)
        if name in ("num_attention_heads", "n_routed_experts"):  # used again once the MTP block (*E) is on
            _raises_naming(name, size, pattern="M", num_nextn_predict_layers=1)
    ModelConfig(pattern="*", mamba_num_heads=0, mamba_head_dim=0, ssm_state_size=0, n_groups=0, expand=0,
                num_nextn_predict_layers=0)


def test_json_spellings_are_accepted_and_normalised():
    cfg = ModelConfig(**BASE, routed_scaling_factor=5, attention_dropout=0, time_step_limit=[0, INF],
                      eos_token_id=[2, 11], sliding_window=None, moe_latent_size=None, layer_norm_epsilon=1)
    assert type(cfg.routed_scaling_factor) is float and cfg.routed_scaling_factor == 5.0
    assert type(cfg.attention_dropout) is float and type(cfg.layer_norm_epsilon) is float
    assert cfg.time_step_limit == (0.0, INF) and all(type(v) is float for v in cfg.time_step_limit)
    assert cfg.eos_token_ids == [2, 11]
    assert ModelConfig(**BASE, eos_token_id=None).eos_token_ids == []
    # the same through from_hf, with transformers' spelling of infinity
    hf = ModelConfig.from_hf({"hybrid_override_pattern": "M*E", "routed_scaling_factor": 5, "eos_token_id": [2, 11],
                              "time_step_limit": [0.0, {"__float__": "Infinity"}], "sliding_window": None,
                              "moe_latent_size": None, "hidden_dropout": 0})
    assert hf.routed_scaling_factor == 5.0 and hf.time_step_limit == (0.0, INF) and hf.eos_token_id == [2, 11]


def test_cross_field_rules_still_hold():
    for kwargs, needle in [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(mamba_num_heads=6, n_groups=4), "n_groups"),
        (dict(num_experts_per_tok=9, n_routed_experts=8), "num_experts_per_tok"),
        (dict(n_routed_experts=8, n_group=3), "n_group"),
        (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
        (dict(pattern=""), "pattern"),
        (dict(pattern="MXE"), "pattern"),
        (dict(mtp_pattern="Q"), "mtp_pattern"),
        (dict(mtp_pattern=""), "mtp_pattern"),
        (dict(mlp_hidden_act="gelu"), "only 'relu2' is supported"),
        (dict(mamba_hidden_act="relu"), "only 'silu' is supported"),
        (dict(mamba_ssm_cache_dtype="fp8"), "use float32, bfloat16 or float16"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(sliding_window=4096), "sliding_window"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    ]:
        with pytest.raises(ValueError, match=needle):
            ModelConfig(**{**BASE, **kwargs})


def test_replace_and_validate_check_again():
    cfg = ModelConfig(**BASE)
    with pytest.raises(ValueError, match="'n_groups'"):
        cfg.replace(n_groups="8")
    cfg.use_cache = "yes"  # a dataclass field can be assigned directly: validate() catches it
    with pytest.raises(ValueError, match="'use_cache'"):
        cfg.validate()
