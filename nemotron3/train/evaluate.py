"""Evaluation during training: the held-out loss and the unigram baseline (generation-based evaluation is in
`nemotron3/eval/accuracy.py`, which may use the engine).

**Unigram baseline.** The cross-entropy a model reaches by predicting every token from its training-set
frequency alone (add-one smoothed), measured on the held-out targets: the bar a language model must clear
before it has learned anything about context.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.train.data import Batch, PackedData
from nemotron3.train.loss import token_ce_sum


def _on_model(b: Batch, model: nn.Module) -> Batch:
    """The rows on the model's device (--device): the packed data stays on the CPU."""
    dev = next(model.parameters()).device
    return Batch(b.inputs.to(dev), b.targets.to(dev), b.mask.to(dev))


@torch.no_grad()
def eval_loss(model: nn.Module, data: PackedData, batch_size: int = 16) -> float:
    """Mean masked next-token cross-entropy (nats) over every row of `data`, main head only."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        b = _on_model(data.take(list(range(start, min(start + batch_size, len(data))))), model)
        total += float(token_ce_sum(model(b.inputs), b.targets, b.mask))
        count += int(b.mask.sum())
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def eval_mtp_loss(model: nn.Module, data: PackedData, depths: int, batch_size: int = 16) -> float:
    """Held-out MTP loss (nats): the masked cross-entropy of depth k's prediction of token t+k+1, a mean over
    each depth's target tokens, then over the `depths` depths (the training loss's definition, train/loss.py)."""
    was_training = model.training
    model.eval()
    totals, counts = [0.0] * depths, [0] * depths
    for start in range(0, len(data), batch_size):
        b = _on_model(data.take(list(range(start, min(start + batch_size, len(data))))), model)
        _, mtp_logits = model.forward_mtp(b.inputs, depths)
        for k, lk in enumerate(mtp_logits, start=1):  # lk (B, T, V): position t predicts target t+k
            totals[k - 1] += float(token_ce_sum(lk[:, :-k], b.targets[:, k:], b.mask[:, k:]))
            counts[k - 1] += int(b.mask[:, k:].sum())
    model.train(was_training)
    return sum(t / max(1, c) for t, c in zip(totals, counts)) / depths


def unigram_baseline(train: PackedData, heldout: PackedData, vocab_size: int) -> float:
    """Held-out cross-entropy (nats) of the add-one-smoothed unigram distribution of the training targets."""
    counts = torch.bincount(train.rows[:, 1:][train.mask[:, 1:]], minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = heldout.rows[:, 1:][heldout.mask[:, 1:]]
    return float(-logp[targets].mean())
