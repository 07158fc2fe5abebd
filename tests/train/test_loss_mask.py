"""The loss mask lines up with the targets: hand-built rows, and the losses against a loop over positions.

`pack` writes a mask entry per *stream token* (1 = this token is trained as a target); the batch shifts rows
and mask together (inputs row[:-1], targets row[1:], mask[1:]), and the MTP depth k trains logits[:, t] on
targets[:, t+k] under mask[:, t+k]. A mask shifted by one position would train the prompt token before each
answer token; these tests spell the expected rows out by hand and recompute every loss with a plain loop.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemotron3.train import data as train_data
from nemotron3.train.loss import Normalizer, micro_loss


def test_packed_rows_and_mask_by_hand():
    """<s>=1, </s>=2, pad=0, T=4: stream 1 5 6 7 2 1 8 9 2 with mask 0 0 1 0 1 0 1 1 1 (an SFT-style document
    [5 6 7] that trains only on 6, then a plain one), cut into rows of 5 overlapping by one."""
    docs = [train_data.Document([5, 6, 7], [0, 1, 0]), train_data.Document([8, 9])]
    rows, mask = train_data.pack(docs, 4, bos_id=1, eos_id=2, pad_id=0)
    assert rows.tolist() == [[1, 5, 6, 7, 2], [2, 1, 8, 9, 2]]
    assert mask.int().tolist() == [[0, 0, 1, 0, 1], [1, 0, 1, 1, 1]]
    b = train_data.PackedData(rows, mask).take([0, 1])
    assert b.inputs.tolist() == [[1, 5, 6, 7], [2, 1, 8, 9]]
    assert b.targets.tolist() == [[5, 6, 7, 2], [1, 8, 9, 2]]
    # target 6 (after input 5) and </s> train; 5 and 7 (masked in the document) and the target <s> do not
    assert b.mask.int().tolist() == [[0, 1, 0, 1], [0, 1, 1, 1]]
    # a short tail is padded with a zero mask
    rows, mask = train_data.pack([train_data.Document([5])], 4, bos_id=1, eos_id=2, pad_id=0)
    assert rows.tolist() == [[1, 5, 2, 0, 0]] and mask.int().tolist() == [[0, 1, 1, 0, 0]]


class _Fixed(torch.nn.Module):
    """A 'model' whose logits are fixed tensors: the loss is then a function of the mask alone."""

    def __init__(self, logits: torch.Tensor, mtp: list[torch.Tensor]) -> None:
        super().__init__()
        self.main, self.depths = logits, mtp
        self.mtp = object() if mtp else None

    def forward(self, ids):
        return self.main

    def forward_mtp(self, ids, depths):
        return self.main, self.depths[:depths]


def _ce(logits: torch.Tensor, target: int) -> float:
    row = logits.double().tolist()
    top = max(row)
    return -(row[target] - top - math.log(sum(math.exp(v - top) for v in row)))


def test_main_and_mtp_losses_count_exactly_the_masked_targets():
    g = torch.Generator().manual_seed(0)
    B, T, V, D = 2, 6, 11, 2
    inputs = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    logits = torch.randn(B, T, V, generator=g)
    mtp = [torch.randn(B, T, V, generator=g) for _ in range(D)]
    batch = train_data.Batch(inputs, targets, mask)
    norm = Normalizer.of(mask, D)
    assert norm.tokens == 7 and norm.mtp_tokens == [6, 5]  # mask[:, 1:] holds 6 ones, mask[:, 2:] 5
    out = micro_loss(_Fixed(logits, mtp), batch, norm, D, mtp_scale=0.3)
    lm = sum(_ce(logits[b, t], int(targets[b, t])) for b in range(B) for t in range(T) if mask[b, t]) / 7
    depth = []
    for k, lk in enumerate(mtp, start=1):  # logits at t predict the target k positions later
        terms = [_ce(lk[b, t], int(targets[b, t + k])) for b in range(B) for t in range(T - k) if mask[b, t + k]]
        depth.append(sum(terms) / len(terms))
    assert math.isclose(out.lm, lm, rel_tol=1e-5)
    assert math.isclose(out.mtp, sum(depth) / D, rel_tol=1e-5)
    assert math.isclose(float(out.total), lm + 0.3 * sum(depth) / D, rel_tol=1e-5)


def test_the_normaliser_is_the_global_batch_count():
    """Two micro-batches divided by the global counts add up to the one-batch loss."""
    g = torch.Generator().manual_seed(1)
    B, T, V = 4, 5, 7
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    logits = torch.randn(B, T, V, generator=g)
    batch = train_data.Batch(targets, targets, mask)
    norm = Normalizer.of(mask, 0)
    whole = micro_loss(_Fixed(logits, []), batch, norm, 0, 0.3).lm
    parts = sum(micro_loss(_Fixed(lg, []), mb, norm, 0, 0.3).lm for lg, mb in zip(logits.split(2), batch.split(2)))
    assert math.isclose(whole, parts, rel_tol=1e-6)
    ref = sum(_ce(logits[b, t], int(targets[b, t])) for b in range(B) for t in range(T) if mask[b, t]) / int(mask.sum())
    assert math.isclose(whole, ref, rel_tol=1e-5)


def test_row_count_dtypes_and_the_held_out_tail():
    # 6 stream tokens, T=4: the last target (</s>) needs a second row
    rows, mask = train_data.pack([train_data.Document([5, 6, 7, 8])], 4, bos_id=1, eos_id=2, pad_id=0)
    assert rows.tolist() == [[1, 5, 6, 7, 8], [8, 2, 0, 0, 0]]
    assert mask.int().tolist() == [[0, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert rows.dtype == torch.long and mask.dtype == torch.bool
    docs = [train_data.Document([10 + i] * (3 + i), [i % 2] * (3 + i)) for i in range(8)]
    data = train_data.PackedData(*train_data.pack(docs, 4, 1, 2, 0), seed=5)
    train, held = train_data.split_tail(data, 0.25)
    k = len(held)
    assert k == round(len(data) * 0.25) and len(train) + k == len(data)
    # token ids and masks: integers
    assert torch.equal(train.rows, data.rows[:-k]) and torch.equal(train.mask, data.mask[:-k])
    assert torch.equal(held.rows, data.rows[-k:]) and torch.equal(held.mask, data.mask[-k:])
    assert train.seed == held.seed == 5
    one = train_data.PackedData(*train_data.pack(docs[:1], 64, 1, 2, 0))
    with pytest.raises(train_data.DataError, match="only 1 packed rows"):
        train_data.split_tail(one, 0.1)
    two = train_data.PackedData(*train_data.pack(docs[:2], 4, 1, 2, 0))
    assert [len(p) for p in train_data.split_tail(two, 0.01)] == [len(two) - 1, 1]  # at least one row held out
