"""Evaluation during training: the held-out loss and the unigram baseline (generation-based evaluation is in
`nemotron3/evaluate.py`, which may use the engine).

**Unigram baseline.** The cross-entropy a model reaches by predicting every token from its training-set
frequency alone (add-one smoothed), measured on the held-out targets: the bar a language model must clear
before it has learned anything about context.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3.train.data import PackedData
from nemotron3.train.loss import token_ce_sum


@torch.no_grad()
def eval_loss(model: nn.Module, data: PackedData, batch_size: int = 16) -> float:
    """Mean masked next-token cross-entropy (nats) over every row of `data`, main head only."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        b = data.take(list(range(start, min(start + batch_size, len(data)))))
        total += float(token_ce_sum(model(b.inputs), b.targets, b.mask))
        count += int(b.mask.sum())
    model.train(was_training)
    return total / max(1, count)


def unigram_baseline(train: PackedData, heldout: PackedData, vocab_size: int) -> float:
    """Held-out cross-entropy (nats) of the add-one-smoothed unigram distribution of the training targets."""
    counts = torch.bincount(train.rows[:, 1:][train.mask[:, 1:]], minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = heldout.rows[:, 1:][heldout.mask[:, 1:]]
    return float(-logp[targets].mean())
