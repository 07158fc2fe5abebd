"""AdamW with parameter groups, and the warmup-stable-decay (WSD) learning-rate schedule.

**Groups.** Weight decay (0.1 in the recipe, docs/architecture.md §9) shrinks matrices toward zero; applied to
a norm's gain it would pull the gain toward 0 instead of its natural value 1, and on a bias or a per-head
scalar (Mamba's `A_log`, `D`, `dt_bias`) it is a prior with no reason behind it. So: decay every parameter
with two or more dimensions (linear weights, the 3-D expert tensors, the conv kernel, embeddings, head,
router), no decay on 1-D parameters (norm gains, biases, Mamba per-head scalars), Megatron's rule. The
router's correction bias is a buffer, not a parameter: the optimizer never sees it (balance.py moves it).

**Fused AdamW.** torch's `fused=True` runs the whole update in one kernel per dtype, several times faster
than `foreach` (docs/results.md) though a small share of a training step. It computes the same AdamW
update (not bit-identical to foreach: a different operation order), and is used both in a run and in its
resumption, which is what bit-identity needs.

**WSD.** Linear warmup to the peak, constant, then decay to `min_lr` over the last `decay_fraction` of
the steps. Nemotron 3 Super decays with "minus-sqrt" over the last 5T of 25T tokens (20%), peak 4.5e-4,
minimum 4.5e-6 (1%): lr = min + (peak - min)·(1 - sqrt(p)) with p the fraction of the decay phase done,
which drops fast at first and flattens at the end. A linear decay is offered for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ≥2-D parameters with `weight_decay`, 1-D parameters without; names kept for logs."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused on CPU and CUDA by default (see the module docstring)."""
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


@dataclass(frozen=True)
class WSD:
    """Warmup-stable-decay schedule; `lr(step)` for step = 0 .. total-1 (the step about to be taken)."""

    peak: float
    total: int
    warmup: int
    decay_fraction: float = 0.2
    min_ratio: float = 0.01
    shape: str = "minus_sqrt"  # or "linear"

    def __post_init__(self) -> None:
        if self.shape not in ("minus_sqrt", "linear"):
            raise ValueError(f"WSD shape must be 'minus_sqrt' or 'linear', got {self.shape!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")

    @property
    def decay_start(self) -> int:
        return max(self.warmup, self.total - round(self.decay_fraction * self.total))

    def lr(self, step: int) -> float:
        lo = self.peak * self.min_ratio
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        start = self.decay_start
        if step < start or self.total <= start:
            return self.peak
        p = min(1.0, (step - start + 1) / (self.total - start))  # reaches 1 at the last step
        f = 1 - math.sqrt(p) if self.shape == "minus_sqrt" else 1 - p
        return lo + (self.peak - lo) * f
