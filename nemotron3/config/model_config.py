"""ModelConfig: one dataclass for the whole Nemotron 3 hybrid (docs/architecture.md §1, §7).

The layer layout is a pattern string, one character per layer:

    M  Mamba-2 mixer          *  self-attention (GQA, no positional embedding)
    E  MoE / LatentMoE        -  dense relu² MLP

Field names are the Hugging Face `nemotron_h` ones, so that `ModelConfig.from_hf(path).to_hf()` gives back the
same JSON (hf_json.py: spellings, legacy names, metadata). Every field is type- and range-checked when a config
is made and by `validate()` (fields.py: one rule per field).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemotron3.config.fields import FIELD_RULES, check_range, check_types, normalize_spellings
from nemotron3.config.hf_json import PATTERN_CHARS, encode_float, parse_hf


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
        normalize_spellings(self)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every field against its rule in FIELD_RULES, then the rules between fields (the layer pattern's
        characters, divisibility, the settings only one value of is supported); raise ValueError naming the field,
        the value and what is expected."""
        fields = [f.name for f in dataclasses.fields(self)]
        check_types(self, fields)  # types first: the checks below compare and divide the values
        for name in ("pattern", "mtp_pattern"):
            bad = sorted(set(getattr(self, name)) - set(PATTERN_CHARS))
            if bad:
                raise ValueError(f"config field {name!r} has unknown layer characters {bad}; use M, *, E or -")
        if not self.pattern:
            raise ValueError("config field 'pattern' is empty: the model needs at least one layer")
        kinds = set(self.pattern) | (set(self.mtp_pattern) if self.num_nextn_predict_layers > 0 else set())
        for name in fields:
            check_range(self, name, FIELD_RULES[name], kinds)

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
        kwargs, extra = parse_hf(raw, where, {f.name for f in dataclasses.fields(cls)}, strict)
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
            out[f.name] = encode_float(getattr(self, f.name))
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
