"""Inference: the hybrid cache, the decode fast path, sampling, the scheduler and the batched generation Engine."""

from nemotron3.engine.cache import CacheSize, HybridCache, cache_size
from nemotron3.engine.engine import Engine, Generation
from nemotron3.engine.params import SamplingParams

__all__ = ["Engine", "Generation", "SamplingParams", "HybridCache", "CacheSize", "cache_size"]
