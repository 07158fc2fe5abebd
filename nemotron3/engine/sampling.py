"""Turning logits into tokens: greedy, temperature, top-k, top-p, reproducible per row (docs/inference.md §4).

Each row draws from its own float64 uniform stream, one number per token, and samples by inverting the CDF, so a
row's tokens depend only on (seed, row index, its own logits). The streams are drawn on the host (a CPU generator
per row) and moved to the logits' device, so a seed gives the same uniforms on every device.
"""

from __future__ import annotations

import torch

from nemotron3.options import derive_seed


def fresh_seed() -> int:
    """A seed from torch's global (CPU) RNG, for a request without one: torch.manual_seed governs it."""
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())


def row_stream(seed: int, index: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row `index` of `row_uniforms(seed, rows, steps)`, without drawing the other rows; drawn on the host
    (see the module docstring), returned on `device`."""
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, index))
    return torch.rand(steps, generator=gen, dtype=torch.float64, device="cpu").to(device)


def row_uniforms(seed: int | None, rows: int, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(rows, steps) float64 uniforms in [0, 1) on `device`; row i's stream depends only on (seed, i)."""
    seed = fresh_seed() if seed is None else seed
    out = torch.empty(rows, steps, dtype=torch.float64, device="cpu")
    for i in range(rows):
        out[i] = row_stream(seed, i, steps)
    return out.to(device)


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits (B, V) -> probabilities (B, V) fp32 after temperature, top-k and top-p (rows sum to 1)."""
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def log_law(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, mode: str) -> torch.Tensor:
    """logits (..., V) -> log-probabilities (..., V) fp32 of one of the two logprobs modes (engine/params.py):
    `raw`, the model's log-softmax; `sampled`, the law a token is drawn from (temperature, top-k, top-p,
    renormalised; temperature 0 reads as 1, so a greedy row gets the raw softmax, top-k and top-p applied)."""
    logits = logits.float()
    if mode == "raw":
        return torch.log_softmax(logits, dim=-1)
    T = temperature or 1.0
    if top_k == 0 and top_p == 1.0:
        return torch.log_softmax(logits / T, dim=-1)
    shape = logits.shape
    return filtered_probs(logits.reshape(-1, shape[-1]), T, top_k, top_p).view(shape).log()


def sample(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """logits (B, V), uniforms (B,) in [0, 1) -> tokens (B,) int64. Greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if uniforms is None:
        raise ValueError("sampling with temperature > 0 needs one uniform per row (see row_uniforms)")
    return inverse_cdf(filtered_probs(logits, temperature, top_k, top_p), uniforms)


def inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """weights (B, V) >= 0, not necessarily normalised, uniforms (B,) in [0, 1) -> tokens (B,) int64: the
    first token whose cumulative weight exceeds u · total (a zero-weight token is never chosen)."""
    cdf = weights.double().cumsum(-1)  # (B, V)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target, right=True)
    return tokens.clamp_(max=weights.shape[-1] - 1).view(-1)
