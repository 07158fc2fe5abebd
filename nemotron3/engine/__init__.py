"""Inference: the hybrid cache, the decode fast path, sampling, and the batched generation Engine."""

from nemotron3.engine.cache import CacheSize, HybridCache, cache_size
from nemotron3.engine.engine import Engine, Generation

__all__ = ["Engine", "Generation", "HybridCache", "CacheSize", "cache_size"]
