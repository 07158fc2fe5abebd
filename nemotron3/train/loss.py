"""The training objective: next-token cross-entropy, the MTP loss, and the sequence aux loss.

    total = CE_main + mtp_scale · mean_k CE_k + aux

Every cross-entropy is a *sum over the micro-batch's valid targets divided by the global batch's count of
valid targets* (`Normalizer`), so the gradients of all micro-batches on all ranks add up to the gradient of
one big batch: accumulation steps and world size change how the batch is split, never the objective.
Targets are masked by the batch's loss mask (document starts, padding, and in SFT everything but the
assistant's tokens).

**MTP (docs/architecture.md §6).** `model.forward_mtp(ids, D)` returns one logits tensor per depth k = 1..D;
depth k at position t predicts input token t+k+1, i.e. `targets[t+k]`. The last k positions read a wrapped
embedding and have no target, so depth k's loss uses logits[:, :T-k] against targets[:, k:] under
mask[:, k:]. Megatron scales the summed depth losses by `mtp_loss_scaling_factor / mtp_num_layers`: the
mean over depths times 0.3. Nemotron 3 Super trains its one MTP module for D = 2 depths with shared weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemotron3.train.data import Batch


def token_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) fp32, targets (B, T), mask (B, T) bool -> Σ over masked positions of −log p(target)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")
    return (ce * mask.reshape(-1)).sum()


@dataclass
class Normalizer:
    """Counts over the *global* batch that every micro-batch's sums are divided by."""

    tokens: int  # valid main targets
    mtp_tokens: list[int]  # valid targets of depth k = 1..D
    sequences: int

    @classmethod
    def of(cls, mask: torch.Tensor, mtp_depths: int) -> Normalizer:
        """mask (B, T) of the whole global batch."""
        return cls(max(1, int(mask.sum())), [max(1, int(mask[:, k:].sum())) for k in range(1, mtp_depths + 1)],
                   mask.shape[0])


@dataclass
class MicroLoss:
    total: torch.Tensor  # the differentiable objective of this micro-batch, already globally normalised
    lm: float  # this micro-batch's share of the global mean main CE
    mtp: float  # its share of mean_k CE_k (unscaled)
    aux: float  # its share of the aux loss


def micro_loss(model: torch.nn.Module, batch: Batch, norm: Normalizer, mtp_depths: int, mtp_scale: float,
               aux_loss_fn=None) -> MicroLoss:
    """Forward one micro-batch and build its share of the objective. `aux_loss_fn()` returns the aux term
    collected by the forward's hooks (or None)."""
    depths = mtp_depths if getattr(model, "mtp", None) is not None else 0
    if depths:
        logits, mtp_logits = model.forward_mtp(batch.inputs, depths)
    else:
        logits, mtp_logits = model(batch.inputs), []
    lm = token_ce_sum(logits, batch.targets, batch.mask) / norm.tokens
    total = lm
    mtp = torch.zeros((), device=lm.device)
    for k, lk in enumerate(mtp_logits, start=1):
        mtp = mtp + token_ce_sum(lk[:, :-k], batch.targets[:, k:], batch.mask[:, k:]) / norm.mtp_tokens[k - 1]
    if mtp_logits:
        mtp = mtp / len(mtp_logits)
        total = total + mtp_scale * mtp
    aux = aux_loss_fn() if aux_loss_fn is not None else None
    if aux is not None:
        total = total + aux
    return MicroLoss(total, float(lm.detach()), float(mtp.detach()), float(aux.detach()) if aux is not None else 0.0)
