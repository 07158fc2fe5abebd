"""The Nemotron 3 hybrid model: mixers, blocks and the language model."""

from nemotron3.model.block import Block
from nemotron3.model.hybrid import HybridLM, count_parameters

__all__ = ["Block", "HybridLM", "count_parameters"]
