"""The model's description: `ModelConfig` (model_config.py), the rule of each field (fields.py) and its
Hugging Face `config.json` spelling (hf_json.py)."""

from nemotron3.config.fields import FIELD_RULES, FieldRule
from nemotron3.config.hf_json import (
    BLOCK_TYPE_CHARS,
    LEGACY_BLOCK_TYPES,
    LEGACY_FIELDS,
    METADATA_FIELDS,
    PATTERN_CHARS,
    pattern_from_block_types,
)
from nemotron3.config.model_config import ModelConfig

__all__ = [
    "BLOCK_TYPE_CHARS", "FIELD_RULES", "LEGACY_BLOCK_TYPES", "LEGACY_FIELDS", "METADATA_FIELDS", "PATTERN_CHARS",
    "FieldRule", "ModelConfig", "pattern_from_block_types",
]
