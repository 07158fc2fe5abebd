"""What one generation request asks for (`SamplingParams`), and how speculation is configured for a model.

    params = SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, seed=0, stop_token_ids=[2])
    spec = speculative_config(model, None)          # k (None: the device's default) and the cache room it needs

vLLM's names where the concept is the same; frozen, checked once when built (one ValueError naming the field).
The logprobs modes and the device default of speculation: docs/inference.md (the introduction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemotron3.engine.sampling import filtered_probs
from nemotron3.model.hybrid import HybridLM

LOGPROBS_MODES = ("raw", "sampled")
DEFAULT_K = 3  # drafts per round where speculation is on by default (deployment guides use 3, docs/inference.md §5)
# device type -> the best measured wall-clock ratio of k = DEFAULT_K speculation against plain decoding
SPECULATION_SPEEDUP = {"cpu": 0.77}


def is_int(v: object) -> bool:
    """An int that is not a bool (JSON's and Python's booleans are not numbers here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """A finite int or float (not a bool)."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """One request's sampling settings; see the module docstring. Greedy when temperature == 0."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    max_tokens: int | None = None  # new tokens at most; None: what is left of the context
    stop_token_ids: tuple[int, ...] | None = None  # None: the config's eos ids; (): never stop
    seed: int | None = None  # None: a fresh one from torch's global RNG
    logprobs: int | None = None  # None: none; k: the token's own and its k most likely alternatives
    logprobs_mode: str = "raw"  # "raw" (the model's) or "sampled" (the law it was drawn from)
    n: int = 1  # choices per prompt: choice i samples from stream i of the seed
    num_speculative_tokens: int | None = None  # None: the device's default (speculative_config)
    max_thinking_tokens: int | None = None  # the reasoning budget (engine/thinking.py)
    thinking_grace: float = 0.1

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, tuple):
            ids = self.stop_token_ids
            if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
                raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        for name, ok, what in (
            ("temperature", is_number(self.temperature) and self.temperature >= 0, "a finite number >= 0 (0 = greedy)"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1] (1 = off)"),
            ("max_tokens", self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens > 0),
             "a positive integer (max_new_tokens)"),
            ("stop_token_ids", self.stop_token_ids is None or all(is_int(t) and t >= 0 for t in self.stop_token_ids),
             "token ids >= 0"),
            ("seed", self.seed is None or is_int(self.seed), "an integer"),
            ("logprobs", self.logprobs is None or (is_int(self.logprobs) and self.logprobs >= 0), "an integer >= 0"),
            ("logprobs_mode", self.logprobs_mode in LOGPROBS_MODES, f"one of {', '.join(LOGPROBS_MODES)}"),
            ("n", is_int(self.n) and self.n >= 1, "an integer >= 1"),
            ("num_speculative_tokens", self.num_speculative_tokens is None
             or (is_int(self.num_speculative_tokens) and self.num_speculative_tokens >= 0), "an integer >= 0"),
            ("max_thinking_tokens", self.max_thinking_tokens is None
             or (is_int(self.max_thinking_tokens) and self.max_thinking_tokens >= 0), "an integer >= 0"),
            ("thinking_grace", is_number(self.thinking_grace) and self.thinking_grace >= 0, "a finite number >= 0"),
        ):
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (..., V) -> the law tokens are drawn from (..., V) fp32 (one-hot at the argmax if greedy)."""
        if self.greedy:
            return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        shape = logits.shape
        return filtered_probs(logits.reshape(-1, shape[-1]), self.temperature, self.top_k, self.top_p).view(shape)


@dataclass(frozen=True)
class SpeculativeConfig:
    """k drafts per verify forward, and the cache positions a row needs past its prompt + max_tokens: a row may
    overshoot max_tokens by k within a round, then still verify k + 1 tokens (0 without speculation)."""

    k: int

    @property
    def room(self) -> int:
        return 2 * self.k + 1 if self.k else 0

    @property
    def max_rollback(self) -> int:
        return self.k + 1 if self.k else 0


def has_mtp(model: HybridLM) -> bool:
    """Whether `model` has an MTP block to draft with."""
    return model.mtp is not None


def default_speculative_tokens(device: torch.device | str, mtp: bool) -> int:
    """DEFAULT_K where speculation was measured faster on this device type and the model has an MTP block, else 0
    (the module docstring)."""
    kind = torch.device(device).type
    return DEFAULT_K if mtp and SPECULATION_SPEEDUP.get(kind, 0.0) > 1.0 else 0


def speculative_config(model: HybridLM, k: int | None) -> SpeculativeConfig:
    """Resolve `k` (None: the device's default) for `model`; ValueError when k > 0 and the model has no MTP block."""
    if k is None:
        return SpeculativeConfig(default_speculative_tokens(model.lm_head.weight.device, has_mtp(model)))
    if not is_int(k) or k < 0:
        raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {k!r}")
    if k and not has_mtp(model):
        raise ValueError("num_speculative_tokens > 0 needs a model with an MTP block (num_nextn_predict_layers > 0)")
    return SpeculativeConfig(k)
