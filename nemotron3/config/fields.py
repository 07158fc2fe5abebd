"""The rule of every ModelConfig field, and the checks that apply them (docs/architecture.md §7).

One table, `FIELD_RULES`, names each field's type and range; `ModelConfig.validate` runs `check_types` on every
field first, then its checks between fields, then `check_range`. A wrong value is a ValueError naming the field,
the value and what is expected, when the config is made rather than at the first forward (or never: a string
`eos_token_id` would silently never stop generation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldRule:
    """How `ModelConfig.validate` checks one field: its type, then its range.

    kind      "int"; "float" (an int is accepted and stored as a float); "bool" (True or False only: not 0 / 1, not
              the string "false"); "str"; "token_ids" (a token id, a list of them, or null, as `eos_token_id`);
              "pair" (a [low, high] pair of numbers, as `time_step_limit`); "dict" (string keys, as `extra`)
    bound     "any"; "positive" (> 0); "non_negative" (>= 0); "probability" (in [0, 1]); "token" (a token id:
              0 <= id < vocab_size). Floats must also be finite.
    nullable  null (None) is accepted as well
    choices   the accepted strings, for the settings the network implements one value of
    layers    the layer kinds ('M', '*', 'E', '-') that use the field. When the model has none of them (counting
              the MTP block's layers when it has one) the field is unused: still type-checked, but only held to
              >= 0, so that the sizes of an absent layer kind may be left at 0.
    """

    kind: str
    bound: str = "any"
    nullable: bool = False
    choices: tuple[str, ...] = ()
    layers: str = ""


# One rule per ModelConfig field; `validate` refuses a config whose class has a field without one.
FIELD_RULES: dict[str, FieldRule] = {
    "pattern": FieldRule("str"),  # its characters and length are checked on their own, below
    "vocab_size": FieldRule("int", "positive"),
    "hidden_size": FieldRule("int", "positive"),
    "num_attention_heads": FieldRule("int", "positive", layers="*"),
    "num_key_value_heads": FieldRule("int", "positive", layers="*"),
    "head_dim": FieldRule("int", "positive", layers="*"),
    "attention_bias": FieldRule("bool"),
    "attention_dropout": FieldRule("float", "probability"),
    "sliding_window": FieldRule("int", "positive", nullable=True),
    "max_position_embeddings": FieldRule("int", "positive"),
    "intermediate_size": FieldRule("int", "positive", layers="-"),
    "mlp_hidden_act": FieldRule("str", choices=("relu2",)),
    "mlp_bias": FieldRule("bool"),
    "mamba_num_heads": FieldRule("int", "positive", layers="M"),
    "mamba_head_dim": FieldRule("int", "positive", layers="M"),
    "ssm_state_size": FieldRule("int", "positive", layers="M"),
    "n_groups": FieldRule("int", "positive", layers="M"),
    "conv_kernel": FieldRule("int", "positive"),
    "chunk_size": FieldRule("int", "positive"),
    "expand": FieldRule("int", "positive", layers="M"),
    "mamba_hidden_act": FieldRule("str", choices=("silu",)),
    "use_conv_bias": FieldRule("bool"),
    "mamba_proj_bias": FieldRule("bool"),
    "time_step_min": FieldRule("float", "positive"),  # dt is initialised log-uniformly in [min, max]
    "time_step_max": FieldRule("float", "positive"),
    "time_step_floor": FieldRule("float", "non_negative"),
    "time_step_limit": FieldRule("pair"),  # [low, high] with 0 <= low <= high; high may be infinite
    "mamba_ssm_cache_dtype": FieldRule("str", choices=("float32", "bfloat16", "float16")),
    "n_routed_experts": FieldRule("int", "positive", layers="E"),
    "n_shared_experts": FieldRule("int", "non_negative"),
    "num_experts_per_tok": FieldRule("int", "positive", layers="E"),
    "moe_intermediate_size": FieldRule("int", "positive", layers="E"),
    "moe_shared_expert_intermediate_size": FieldRule("int", "positive", layers="E"),
    "moe_latent_size": FieldRule("int", "positive", nullable=True, layers="E"),
    "moe_shared_expert_overlap": FieldRule("bool"),
    "routed_scaling_factor": FieldRule("float", "positive"),
    "n_group": FieldRule("int", "positive", layers="E"),
    "topk_group": FieldRule("int", "positive", layers="E"),
    "norm_topk_prob": FieldRule("bool"),
    "output_router_logits": FieldRule("bool"),
    "num_nextn_predict_layers": FieldRule("int", "non_negative"),
    "mtp_pattern": FieldRule("str"),
    "use_bias": FieldRule("bool"),
    "initializer_range": FieldRule("float", "non_negative"),
    "layer_norm_epsilon": FieldRule("float", "positive"),
    "residual_in_fp32": FieldRule("bool"),
    "hidden_dropout": FieldRule("float", "probability"),
    "rescale_prenorm_residual": FieldRule("bool"),
    "tie_word_embeddings": FieldRule("bool"),
    "use_cache": FieldRule("bool"),
    "num_logits_to_keep": FieldRule("int", "non_negative", nullable=True),
    "pad_token_id": FieldRule("int", "token", nullable=True),
    "bos_token_id": FieldRule("int", "token", nullable=True),
    "eos_token_id": FieldRule("token_ids", "token"),
    "extra": FieldRule("dict"),
}

_LAYER_NAMES = {"M": "Mamba ('M')", "*": "attention ('*')", "E": "MoE ('E')", "-": "MLP ('-')"}
_TYPE_TEXT = {
    "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
    "token_ids": "an integer, a list of integers or null", "pair": "a [low, high] pair of numbers",
    "dict": "a dict with string keys",
}
_BOUND_TEXT = {
    ("int", "any"): "an integer", ("int", "positive"): "a positive integer",
    ("int", "non_negative"): "a non-negative integer", ("float", "any"): "a finite number",
    ("float", "positive"): "a positive finite number", ("float", "non_negative"): "a non-negative finite number",
    ("float", "probability"): "a number in [0, 1]",
}
_BOUND_OK = {
    "any": lambda v, cfg: True,
    "positive": lambda v, cfg: v > 0,
    "non_negative": lambda v, cfg: v >= 0,
    "probability": lambda v, cfg: 0 <= v <= 1,
    "token": lambda v, cfg: 0 <= v < cfg.vocab_size,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _has_type(rule: FieldRule, v: Any) -> bool:
    if v is None:
        return rule.nullable or rule.kind == "token_ids"
    if rule.kind == "int":
        return _is_int(v)
    if rule.kind == "float":
        return _is_number(v)
    if rule.kind == "bool":
        return isinstance(v, bool)
    if rule.kind == "str":
        return isinstance(v, str)
    if rule.kind == "token_ids":
        return _is_int(v) or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v))
    if rule.kind == "pair":
        return isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
    if rule.kind == "dict":
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)
    raise AssertionError(f"unknown FieldRule kind {rule.kind!r}")

def normalize_spellings(cfg: Any) -> None:
    """The spellings JSON gives of two kinds of value, converted in place: an int for a float, a list for the
    (low, high) pair."""
    for name, rule in FIELD_RULES.items():
        v = getattr(cfg, name, None)
        if rule.kind == "float" and _is_int(v):
            setattr(cfg, name, float(v))
        elif rule.kind == "pair" and isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v)):
            setattr(cfg, name, tuple(float(x) for x in v))


def check_types(cfg: Any, fields: list[str]) -> None:
    """Every field has a rule, and every value the type its rule names; ValueError naming the first that has not."""
    unruled = [name for name in fields if name not in FIELD_RULES]
    if unruled:
        raise TypeError(f"ModelConfig fields {unruled} have no rule in nemotron3.config.FIELD_RULES")
    for name in fields:
        rule, v = FIELD_RULES[name], getattr(cfg, name)
        if not _has_type(rule, v):
            expected = _TYPE_TEXT[rule.kind] + (" or null" if rule.nullable else "")
            if rule.choices:
                expected += f" (one of {', '.join(map(repr, rule.choices))})"
            raise ValueError(f"config field {name!r} must be {expected}, got {v!r}")


def check_range(cfg: Any, name: str, rule: FieldRule, kinds: set[str]) -> None:
    """The range half of `rule` for field `name` of `cfg`, whose type is already known to be right.

    kinds: the layer kinds the model has (the MTP block's included when it has one)."""
    v = getattr(cfg, name)
    if v is None:
        return
    if rule.choices:
        if v not in rule.choices:
            if len(rule.choices) == 1:
                raise ValueError(f"config field {name!r} = {v!r}: only {rule.choices[0]!r} is supported")
            options = ", ".join(rule.choices[:-1]) + f" or {rule.choices[-1]}"
            raise ValueError(f"config field {name!r} = {v!r}; use {options}")
        return
    if rule.kind == "pair":
        low, high = v
        if not (math.isfinite(low) and 0 <= low <= high):  # NaN fails every comparison
            raise ValueError(
                f"config field {name!r} must be [low, high] with 0 <= low <= high (low finite), got {v}"
            )
        return
    bound = rule.bound
    if rule.layers and not kinds & set(rule.layers):
        bound = "non_negative" if bound == "positive" else bound  # unused: any size >= 0 will do
    values = list(v) if isinstance(v, (list, tuple)) else [v]
    ok = _BOUND_OK[bound]
    if all(ok(x, cfg) and (rule.kind != "float" or math.isfinite(x)) for x in values):
        return
    if bound == "token":
        expected = f"a token id in [0, vocab_size = {cfg.vocab_size})"
        if rule.kind == "token_ids":
            expected = f"a token id or a list of token ids in [0, vocab_size = {cfg.vocab_size})"
    else:
        expected = _BOUND_TEXT[rule.kind, bound]
    if rule.nullable or rule.kind == "token_ids":
        expected += " or null"
    if bound != rule.bound:
        expected += f" (no {' or '.join(_LAYER_NAMES[c] for c in rule.layers)} layer uses it)"
    elif rule.layers:
        expected += f" (used by the {' and '.join(_LAYER_NAMES[c] for c in rule.layers if c in kinds)} layers)"
    raise ValueError(f"config field {name!r} must be {expected}, got {v!r}")
