"""How a ModelConfig is spelt in a Hugging Face `config.json` (docs/architecture.md §7).

Every field of the `nemotron_h` config is a ModelConfig field under the same name. On the way in, two spellings
of the layout are accepted (`hybrid_override_pattern` and the newer `layers_block_type` list, with its legacy
`mamba` / `attention` names), as are the legacy `mamba_*` names; unknown keys and keys that contradict each other
are errors naming the key; keys that only describe the file (`architectures`, `transformers_version`, ...) are kept
in `extra` and written back unchanged. transformers writes non-finite floats as {"__float__": "Infinity"}.
"""

from __future__ import annotations

import difflib
import math
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


def decode_float(value: Any) -> Any:
    """transformers writes non-finite floats as {"__float__": "Infinity"}; plain JSON has no infinity."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):
            return value  # left as it is, for validation to name the field
    if isinstance(value, (list, tuple)):
        return [decode_float(v) for v in value]
    return value


def encode_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": "Infinity" if value > 0 else ("-Infinity" if value < 0 else "NaN")}
    if isinstance(value, (list, tuple)):
        return [encode_float(v) for v in value]
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

def parse_hf(raw: dict[str, Any], where: str, known: set[str], strict: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A `config.json` dict -> (ModelConfig keyword arguments, `extra` metadata).

    Resolves the two spellings of the layout (which must agree), the legacy names, and transformers' encoding of
    non-finite floats; `known` is the set of ModelConfig field names. Errors name the key and `where` (the file).
    """
    known = known - {"pattern", "mtp_pattern", "extra"}
    raw = {k: decode_float(v) for k, v in raw.items()}

    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def put(name: str, value: Any, source: str) -> None:
        if name in kwargs and kwargs[name] != value:
            raise ValueError(f"{where}: contradictory fields: {source} = {value!r} but {name} = {kwargs[name]!r}")
        kwargs[name] = value

    def layout(string_key: str, list_key: str) -> str | None:
        """The layout spelt as a string under `string_key`, as a block-type list under `list_key`, or both (which
        must agree); None when neither is set."""
        found = {}
        value = raw.pop(string_key, None)
        if value is not None:
            if not isinstance(value, str):
                raise ValueError(f"{where}: config field {string_key!r} must be a string of layer characters, "
                                 f"got {value!r}")
            found[string_key] = value
        value = raw.pop(list_key, None)
        if value is not None:
            try:
                found[list_key] = pattern_from_block_types(value, list_key)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e
        if len(set(found.values())) > 1:
            raise ValueError(f"{where}: contradictory fields: {string_key} and {list_key} disagree: {found}")
        return next(iter(found.values()), None)

    pattern = layout("hybrid_override_pattern", "layers_block_type")
    if pattern is None:
        raise ValueError(f"{where}: no layer layout: set 'layers_block_type' or 'hybrid_override_pattern'")
    n_layers = raw.pop("num_hidden_layers", None)
    if n_layers is not None and (not isinstance(n_layers, int) or isinstance(n_layers, bool)):
        raise ValueError(f"{where}: config field 'num_hidden_layers' must be an integer or null, got {n_layers!r}")
    if n_layers is not None and n_layers != len(pattern):
        raise ValueError(
            f"{where}: contradictory fields: num_hidden_layers = {n_layers} but the layer pattern has "
            f"{len(pattern)} layers"
        )
    kwargs["pattern"] = pattern
    mtp_pattern = layout("mtp_hybrid_override_pattern", "mtp_layers_block_type")
    if mtp_pattern is not None:
        kwargs["mtp_pattern"] = mtp_pattern

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
    return kwargs, extra
