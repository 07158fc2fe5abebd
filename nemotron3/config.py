"""ModelConfig: one dataclass for the whole Nemotron 3 hybrid, and its Hugging Face `config.json` round trip.

The layer layout is a pattern string, one character per layer (docs/architecture.md §1):

    M  Mamba-2 mixer          *  self-attention (GQA, no positional embedding)
    E  MoE / LatentMoE        -  dense relu² MLP

Every field of the Hugging Face `nemotron_h` config is a field here, under the same name, so that
`ModelConfig.from_hf(path).to_hf()` gives back the same JSON. Two spellings of the layout are accepted on
the way in (`hybrid_override_pattern` and the newer `layers_block_type` list, with its legacy `mamba` /
`attention` names), as are the legacy `mamba_*` names of the Mamba fields. Unknown fields and fields that
contradict each other are errors that name the field; keys that only describe the file (`architectures`,
`transformers_version`, ...) are kept in `extra` and written back unchanged.

Every field is type- and range-checked by one table, `FIELD_RULES`, when a config is made (and by `validate()`):
a wrong value is a ValueError naming the field, the value and what is expected, at construction rather than at
the first forward (or never: a string `eos_token_id` would silently never stop generation).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PATTERN_CHARS = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
BLOCK_TYPE_CHARS = {v: k for k, v in PATTERN_CHARS.items()}
# Older checkpoints (and the official Nemotron 3 configs) spell two of the block types differently.
LEGACY_BLOCK_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}

# Legacy config names (transformers' NemotronHConfig accepts them too) -> current names.
LEGACY_FIELDS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
    "num_local_experts": "n_routed_experts",
}

# Keys that describe the file or the training run rather than the network. Kept verbatim in `extra`.
METADATA_FIELDS = {
    "architectures", "model_type", "transformers_version", "auto_map", "_name_or_path", "torch_dtype",
    "dtype", "quantization_config", "rope_theta", "rope_scaling", "partial_rotary_factor", "id2label",
    "label2id", "return_dict", "output_hidden_states", "output_attentions", "is_encoder_decoder",
    "tokenizer_class", "problem_type", "chunk_size_feed_forward", "pruned_heads", "torchscript",
    "use_return_dict", "kv_channels", "attn_implementation", "_attn_implementation_autoset",
    "finetuning_task", "prefix", "task_specific_params", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id",
    "max_length", "num_beams", "temperature", "top_k", "top_p", "use_mamba_kernels",
    "norm_eps",  # NeMo's name for the norm epsilon, in the official Nano config next to `layer_norm_epsilon`
}


def _decode_float(value: Any) -> Any:
    """transformers writes non-finite floats as {"__float__": "Infinity"}; plain JSON has no infinity."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):
            return value  # left as it is, for validation to name the field
    if isinstance(value, (list, tuple)):
        return [_decode_float(v) for v in value]
    return value


def _encode_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "Infinity" if value > 0 else ("-Infinity" if value < 0 else "NaN")}
    if isinstance(value, (list, tuple)):
        return [_encode_float(v) for v in value]
    return value


def pattern_from_block_types(block_types: list[str], field_name: str) -> str:
    """`["linear_attention", "moe", ...]` (or the legacy `mamba` / `attention`) -> `"ME..."`."""
    if isinstance(block_types, str):
        raise ValueError(f"config field {field_name!r} must be a list of block types, got the string {block_types!r}")
    if not isinstance(block_types, (list, tuple)):
        raise ValueError(f"config field {field_name!r} must be a list of block types, got {block_types!r}")
    chars = []
    for i, t in enumerate(block_types):
        if not isinstance(t, str):
            raise ValueError(f"config field {field_name!r}[{i}] = {t!r} is not a block type name (a string)")
        t = LEGACY_BLOCK_TYPES.get(t, t)
        if t not in BLOCK_TYPE_CHARS:
            raise ValueError(
                f"config field {field_name!r}[{i}] = {t!r} is not a block type; expected one of "
                f"{sorted(BLOCK_TYPE_CHARS)} (or legacy {sorted(LEGACY_BLOCK_TYPES)})"
            )
        chars.append(BLOCK_TYPE_CHARS[t])
    return "".join(chars)


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


@dataclass
class ModelConfig:
    """The complete description of a Nemotron 3 hybrid model. Field names follow Hugging Face `nemotron_h`.

    Fields that transformers carries but the network does not use (`expand`, `rope_theta`,
    `moe_shared_expert_overlap`, `mamba_proj_bias`, ...) are kept so that a config round-trips unchanged.
    """

    pattern: str = "M*ME"
    vocab_size: int = 131072
    hidden_size: int = 4096
    # attention ('*')
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    # dense MLP ('-') and activations
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2 ('M')
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    expand: int = 2
    mamba_hidden_act: str = "silu"
    use_conv_bias: bool = True
    mamba_proj_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, float("inf"))
    mamba_ssm_cache_dtype: str = "float32"
    # MoE / LatentMoE ('E')
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    moe_shared_expert_overlap: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    # multi-token prediction
    num_nextn_predict_layers: int = 0
    mtp_pattern: str = "*E"
    # everything else
    use_bias: bool = False
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    hidden_dropout: float = 0.0
    rescale_prenorm_residual: bool = True
    tie_word_embeddings: bool = False
    use_cache: bool = True
    num_logits_to_keep: int | None = 1
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the spellings JSON gives of two kinds of value: ints for floats, a list for the (low, high) pair
        for name, rule in FIELD_RULES.items():
            v = getattr(self, name, None)
            if rule.kind == "float" and _is_int(v):
                setattr(self, name, float(v))
            elif rule.kind == "pair" and isinstance(v, (list, tuple)) and len(v) == 2 and all(map(_is_number, v)):
                setattr(self, name, tuple(float(x) for x in v))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field against its rule in FIELD_RULES, then the rules between fields (the layer pattern's
        characters, divisibility, the settings only one value of is supported); raise ValueError naming the field,
        the value and what is expected."""
        fields = [f.name for f in dataclasses.fields(self)]
        unruled = [name for name in fields if name not in FIELD_RULES]
        if unruled:
            raise TypeError(f"ModelConfig fields {unruled} have no rule in nemotron3.config.FIELD_RULES")
        for name in fields:  # types first: the checks below compare and divide the values
            rule, v = FIELD_RULES[name], getattr(self, name)
            if not _has_type(rule, v):
                expected = _TYPE_TEXT[rule.kind] + (" or null" if rule.nullable else "")
                if rule.choices:
                    expected += f" (one of {', '.join(map(repr, rule.choices))})"
                raise ValueError(f"config field {name!r} must be {expected}, got {v!r}")
        for name in ("pattern", "mtp_pattern"):
            bad = sorted(set(getattr(self, name)) - set(PATTERN_CHARS))
            if bad:
                raise ValueError(f"config field {name!r} has unknown layer characters {bad}; use M, *, E or -")
        if not self.pattern:
            raise ValueError("config field 'pattern' is empty: the model needs at least one layer")
        kinds = set(self.pattern) | (set(self.mtp_pattern) if self.num_nextn_predict_layers > 0 else set())
        for name in fields:
            self._check_range(name, FIELD_RULES[name], kinds)

        if "*" in kinds and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if "M" in kinds and self.mamba_num_heads % self.n_groups:
            raise ValueError(
                f"config field 'mamba_num_heads' ({self.mamba_num_heads}) must be a multiple of 'n_groups' "
                f"({self.n_groups})"
            )
        if "E" in kinds:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds "
                    f"'n_routed_experts' ({self.n_routed_experts})"
                )
            if self.n_routed_experts % self.n_group or self.topk_group > self.n_group:
                raise ValueError(
                    f"config fields 'n_group' ({self.n_group}) / 'topk_group' ({self.topk_group}) do not divide "
                    f"'n_routed_experts' ({self.n_routed_experts})"
                )
            if self.n_shared_experts not in (0, 1):
                raise ValueError(
                    f"config field 'n_shared_experts' = {self.n_shared_experts}: nemotron_h has one shared expert "
                    "(its width is 'moe_shared_expert_intermediate_size')"
                )
        if self.num_nextn_predict_layers and not self.mtp_pattern:
            raise ValueError("config field 'mtp_pattern' is empty but 'num_nextn_predict_layers' > 0")
        if self.time_step_min > self.time_step_max:
            raise ValueError(
                f"config field 'time_step_min' ({self.time_step_min}) exceeds 'time_step_max' ({self.time_step_max})"
            )
        if self.attention_bias:
            raise ValueError("config field 'attention_bias' = true: nemotron_h attention has no biases")
        if self.sliding_window is not None:
            raise ValueError("config field 'sliding_window' is set: nemotron_h attention is full causal attention")
        if self.tie_word_embeddings:
            raise ValueError("config field 'tie_word_embeddings' = true: nemotron_h has an untied lm_head")

    def _check_range(self, name: str, rule: FieldRule, kinds: set[str]) -> None:
        """The range half of `rule` for a value already known to have the right type."""
        v = getattr(self, name)
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
        if all(ok(x, self) and (rule.kind != "float" or math.isfinite(x)) for x in values):
            return
        if bound == "token":
            expected = f"a token id in [0, vocab_size = {self.vocab_size})"
            if rule.kind == "token_ids":
                expected = f"a token id or a list of token ids in [0, vocab_size = {self.vocab_size})"
        else:
            expected = _BOUND_TEXT[rule.kind, bound]
        if rule.nullable or rule.kind == "token_ids":
            expected += " or null"
        if bound != rule.bound:
            expected += f" (no {' or '.join(_LAYER_NAMES[c] for c in rule.layers)} layer uses it)"
        elif rule.layers:
            expected += f" (used by the {' and '.join(_LAYER_NAMES[c] for c in rule.layers if c in kinds)} layers)"
        raise ValueError(f"config field {name!r} must be {expected}, got {v!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_hidden_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_intermediate_size(self) -> int:
        """d_inner = mamba_num_heads · mamba_head_dim (transformers and vLLM ignore `expand`)."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_intermediate_size + 2 * self.n_groups * self.ssm_state_size

    @property
    def moe_expert_dim(self) -> int:
        """Width the routed experts read and write: the latent size for LatentMoE, else hidden_size."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face round trip
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, strict: bool = True) -> ModelConfig:
        """Read a Hugging Face `nemotron_h` config: a dict, a `config.json` path, or a checkpoint folder.

        A file that is not a JSON object, a value of the wrong type or out of range, an unknown key and two keys
        that contradict each other raise ValueError naming the key (and the file). With `strict=False`, unknown
        keys are kept in `extra` instead of raising.
        """
        if isinstance(path_or_dict, dict):
            raw, where = dict(path_or_dict), "config"
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
            if not isinstance(raw, dict):
                raise ValueError(f"{path} must hold a JSON object (the config's fields), got a {type(raw).__name__}")
            where = str(path)
        if raw.get("model_type", "nemotron_h") != "nemotron_h":
            raise ValueError(f"{where}: model_type is {raw['model_type']!r}, expected 'nemotron_h'")
        raw = {k: _decode_float(v) for k, v in raw.items()}

        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)} - {"pattern", "mtp_pattern", "extra"}

        def put(name: str, value: Any, source: str) -> None:
            if name in kwargs and kwargs[name] != value:
                raise ValueError(f"{where}: contradictory fields: {source} = {value!r} but {name} = {kwargs[name]!r}")
            kwargs[name] = value

        def block_types(key: str) -> str:
            try:
                return pattern_from_block_types(raw.pop(key), key)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e

        # the layout: two spellings, which must agree when both are present
        for key in ("hybrid_override_pattern", "mtp_hybrid_override_pattern"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ValueError(
                    f"{where}: config field {key!r} must be a string of layer characters, got {raw[key]!r}")
        layouts = {}
        if raw.get("hybrid_override_pattern") is not None:
            layouts["hybrid_override_pattern"] = raw.pop("hybrid_override_pattern")
        else:
            raw.pop("hybrid_override_pattern", None)
        if raw.get("layers_block_type") is not None:
            layouts["layers_block_type"] = block_types("layers_block_type")
        else:
            raw.pop("layers_block_type", None)
        if not layouts:
            raise ValueError(f"{where}: no layer layout: set 'layers_block_type' or 'hybrid_override_pattern'")
        if len(set(layouts.values())) > 1:
            raise ValueError(
                f"{where}: contradictory fields: hybrid_override_pattern and layers_block_type disagree: {layouts}")
        pattern = next(iter(layouts.values()))
        n_layers = raw.pop("num_hidden_layers", None)
        if n_layers is not None and not _is_int(n_layers):
            raise ValueError(f"{where}: config field 'num_hidden_layers' must be an integer or null, got {n_layers!r}")
        if n_layers is not None and n_layers != len(pattern):
            raise ValueError(
                f"{where}: contradictory fields: num_hidden_layers = {n_layers} but the layer pattern has "
                f"{len(pattern)} layers"
            )
        mtp = {}
        if raw.get("mtp_hybrid_override_pattern") is not None:
            mtp["mtp_hybrid_override_pattern"] = raw.pop("mtp_hybrid_override_pattern")
        else:
            raw.pop("mtp_hybrid_override_pattern", None)
        if raw.get("mtp_layers_block_type") is not None:
            mtp["mtp_layers_block_type"] = block_types("mtp_layers_block_type")
        else:
            raw.pop("mtp_layers_block_type", None)
        if len(set(mtp.values())) > 1:
            raise ValueError(f"{where}: contradictory fields: the two MTP layouts disagree: {mtp}")
        if mtp:
            kwargs["mtp_pattern"] = next(iter(mtp.values()))
        kwargs["pattern"] = pattern

        for key, value in raw.items():
            if key in LEGACY_FIELDS:
                put(LEGACY_FIELDS[key], value, key)
            elif key in known:
                put(key, value, key)
            elif key in METADATA_FIELDS or not strict:
                extra[key] = value
            else:
                close = difflib.get_close_matches(key, sorted(known | set(LEGACY_FIELDS)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"{where}: unknown config field {key!r}{hint}; pass strict=False to keep it as metadata")
        try:
            return cls(**kwargs, extra=extra)
        except ValueError as e:
            if isinstance(path_or_dict, dict):
                raise
            raise ValueError(f"{where}: {e}") from e

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict transformers' NemotronHConfig reads (layout as `layers_block_type`)."""
        out: dict[str, Any] = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h"}
        for f in dataclasses.fields(self):
            if f.name in ("pattern", "mtp_pattern", "extra"):
                continue
            out[f.name] = _encode_float(getattr(self, f.name))
        out["layers_block_type"] = [PATTERN_CHARS[c] for c in self.pattern]
        out["mtp_layers_block_type"] = [PATTERN_CHARS[c] for c in self.mtp_pattern]
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return dict(sorted(out.items()))

    def save(self, folder: str | os.PathLike) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """`tiny` (seconds on a CPU), `t9` (the benchmark model), `nano-30b-a3b`, `super-120b-a12b`."""
        from nemotron3.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def load(cls, spec: str | os.PathLike) -> ModelConfig:
        """A preset name, a `config.json` path or a checkpoint folder -> ModelConfig (what `--config` and
        `nemotron3 info` accept)."""
        from nemotron3.presets import PRESETS

        if isinstance(spec, str) and spec in PRESETS:
            return cls.preset(spec)
        if Path(spec).exists():
            return cls.from_hf(spec)
        raise ValueError(f"model {str(spec)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a path")
