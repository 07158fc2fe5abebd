"""ModelConfig: one dataclass for the whole Nemotron 3 hybrid, and its Hugging Face `config.json` round trip.

The layer layout is a pattern string, one character per layer (ARCHITECTURE.md §1.1):

    M  Mamba-2 mixer          *  self-attention (GQA, no positional embedding)
    E  MoE / LatentMoE        -  dense relu² MLP

Every field of the Hugging Face `nemotron_h` config is a field here, under the same name, so that
`ModelConfig.from_hf(path).to_hf()` gives back the same JSON. Two spellings of the layout are accepted on
the way in (`hybrid_override_pattern` and the newer `layers_block_type` list, with its legacy `mamba` /
`attention` names), as are the legacy `mamba_*` names of the Mamba fields. Unknown fields and fields that
contradict each other are errors that name the field; keys that only describe the file (`architectures`,
`transformers_version`, ...) are kept in `extra` and written back unchanged.
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
}


def _decode_float(value: Any) -> Any:
    """transformers writes non-finite floats as {"__float__": "Infinity"}; plain JSON has no infinity."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
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
    chars = []
    for i, t in enumerate(block_types):
        t = LEGACY_BLOCK_TYPES.get(t, t)
        if t not in BLOCK_TYPE_CHARS:
            raise ValueError(
                f"config field {field_name!r}[{i}] = {t!r} is not a block type; expected one of "
                f"{sorted(BLOCK_TYPE_CHARS)} (or legacy {sorted(LEGACY_BLOCK_TYPES)})"
            )
        chars.append(BLOCK_TYPE_CHARS[t])
    return "".join(chars)


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
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)  # type: ignore[assignment]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field that shapes the network; raise ValueError naming the field."""
        for name in ("pattern", "mtp_pattern"):
            bad = sorted(set(getattr(self, name)) - set(PATTERN_CHARS))
            if bad:
                raise ValueError(f"config field {name!r} has unknown layer characters {bad}; use M, *, E or -")
        if not self.pattern:
            raise ValueError("config field 'pattern' is empty: the model needs at least one layer")
        positive = ["vocab_size", "hidden_size", "chunk_size", "conv_kernel"]
        if "*" in self.pattern + self.mtp_pattern:
            positive += ["num_attention_heads", "num_key_value_heads", "head_dim"]
        if "M" in self.pattern:
            positive += ["mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"]
        if "E" in self.pattern + self.mtp_pattern:
            positive += ["n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"]
        if "-" in self.pattern:
            positive += ["intermediate_size"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"config field {name!r} must be a positive integer, got {v!r}")
        if "*" in self.pattern and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if "M" in self.pattern and self.mamba_num_heads % self.n_groups:
            raise ValueError(
                f"config field 'mamba_num_heads' ({self.mamba_num_heads}) must be a multiple of 'n_groups' ({self.n_groups})"
            )
        if "E" in self.pattern + self.mtp_pattern:
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
            if self.moe_latent_size is not None and self.moe_latent_size <= 0:
                raise ValueError(f"config field 'moe_latent_size' must be positive or null, got {self.moe_latent_size}")
            if self.n_shared_experts not in (0, 1):
                raise ValueError(
                    f"config field 'n_shared_experts' = {self.n_shared_experts}: nemotron_h has one shared expert "
                    "(its width is 'moe_shared_expert_intermediate_size')"
                )
        if self.num_nextn_predict_layers < 0:
            raise ValueError(f"config field 'num_nextn_predict_layers' must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_nextn_predict_layers and not self.mtp_pattern:
            raise ValueError("config field 'mtp_pattern' is empty but 'num_nextn_predict_layers' > 0")
        for name in ("mlp_hidden_act",):
            if getattr(self, name) != "relu2":
                raise ValueError(f"config field {name!r} = {getattr(self, name)!r}: only 'relu2' is supported")
        if self.mamba_hidden_act != "silu":
            raise ValueError(f"config field 'mamba_hidden_act' = {self.mamba_hidden_act!r}: only 'silu' is supported")
        if self.attention_bias:
            raise ValueError("config field 'attention_bias' = true: nemotron_h attention has no biases")
        if self.sliding_window is not None:
            raise ValueError("config field 'sliding_window' is set: nemotron_h attention is full causal attention")
        if self.tie_word_embeddings:
            raise ValueError("config field 'tie_word_embeddings' = true: nemotron_h has an untied lm_head")
        if self.mamba_ssm_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"config field 'mamba_ssm_cache_dtype' = {self.mamba_ssm_cache_dtype!r}; use float32, bfloat16 or float16"
            )
        if len(self.time_step_limit) != 2 or self.time_step_limit[0] > self.time_step_limit[1]:
            raise ValueError(f"config field 'time_step_limit' must be [low, high], got {self.time_step_limit}")

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

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face round trip
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, strict: bool = True) -> "ModelConfig":
        """Read a Hugging Face `nemotron_h` config: a dict, a `config.json` path, or a checkpoint folder.

        With `strict=False`, unknown keys are kept in `extra` instead of raising.
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
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from e
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

        # the layout: two spellings, which must agree when both are present
        layouts = {}
        if raw.get("hybrid_override_pattern") is not None:
            layouts["hybrid_override_pattern"] = raw.pop("hybrid_override_pattern")
        else:
            raw.pop("hybrid_override_pattern", None)
        if raw.get("layers_block_type") is not None:
            layouts["layers_block_type"] = pattern_from_block_types(raw.pop("layers_block_type"), "layers_block_type")
        else:
            raw.pop("layers_block_type", None)
        if not layouts:
            raise ValueError(f"{where}: no layer layout: set 'layers_block_type' or 'hybrid_override_pattern'")
        if len(set(layouts.values())) > 1:
            raise ValueError(f"{where}: contradictory fields: hybrid_override_pattern and layers_block_type disagree: {layouts}")
        pattern = next(iter(layouts.values()))
        n_layers = raw.pop("num_hidden_layers", None)
        if n_layers is not None and n_layers != len(pattern):
            raise ValueError(
                f"{where}: contradictory fields: num_hidden_layers = {n_layers} but the layer pattern has {len(pattern)} layers"
            )
        mtp = {}
        if raw.get("mtp_hybrid_override_pattern") is not None:
            mtp["mtp_hybrid_override_pattern"] = raw.pop("mtp_hybrid_override_pattern")
        else:
            raw.pop("mtp_hybrid_override_pattern", None)
        if raw.get("mtp_layers_block_type") is not None:
            mtp["mtp_layers_block_type"] = pattern_from_block_types(raw.pop("mtp_layers_block_type"), "mtp_layers_block_type")
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
                raise ValueError(f"{where}: unknown config field {key!r}{hint}; pass strict=False to keep it as metadata")
        if "time_step_limit" in kwargs:
            kwargs["time_step_limit"] = tuple(kwargs["time_step_limit"])
        return cls(**kwargs, extra=extra)

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
    def preset(cls, name: str) -> "ModelConfig":
        """`tiny` (seconds on a CPU), `t9` (the benchmark model), `nano-30b-a3b`, `super-120b-a12b`."""
        from nemotron3.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])
