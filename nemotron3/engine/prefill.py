"""Prefill: every prompt of a batch into the cache, right-padded, in segments (docs/inference.md §2).

The prompts are right-padded into one (B, T) batch and run through the model in segments of `chunk`
columns, each segment continuing from the cache the previous one filled; rows whose prompt has ended drop
out of later segments. Padding is exact (the padded positions get dt = 0 in the Mamba layers and are never
visible to a real query; see Mamba2Mixer.forward), so each row's tokens are the ones it would get alone
(tests/test_engine.py checks it). Memory is bounded by the segment length: the chunked SSD is linear in
it, and attention materialises at most SCORE_BUDGET scores at a time (model/attention.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nemotron3.model.hybrid import HybridLM


def pad_prompts(prompts: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists with 0: ids (B, T) int64 and lengths (B,)."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=device)
    return ids, lens


def segments(lens: torch.Tensor, T: int, chunk: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(s, rows, valid) per segment of `chunk` columns starting at s: the rows with prompt left and how
    many of the segment's columns are real for each."""
    for s in range(0, T, chunk):
        rows = (lens > s).nonzero().view(-1)
        yield s, rows, torch.clamp(lens[rows] - s, max=min(chunk, T - s))


def prefill(
    model: HybridLM, cache, ids: torch.Tensor, lens: torch.Tensor, chunk: int, keep_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Run ids (B, T) (row b's first lens[b] real) into cache rows 0..B-1.

    Returns each row's final-normed hidden state at its last prompt token (B, H), all hidden states
    (B, T, H) if `keep_hidden` (the MTP drafter reads every position), and the number of forward passes.
    """
    B, T = ids.shape
    last = torch.empty(B, model.config.hidden_size, device=ids.device, dtype=model.lm_head.weight.dtype)
    hidden = torch.zeros(B, T, model.config.hidden_size, device=ids.device, dtype=last.dtype) if keep_hidden else None
    passes = 0
    for s, rows, valid in segments(lens, T, chunk):
        h = model.hidden_states(ids[rows, s : s + chunk], cache, rows, valid)  # (b, c, H)
        passes += 1
        if hidden is not None:
            hidden[rows, s : s + chunk] = h
        ends = lens[rows] <= s + h.shape[1]  # rows whose last prompt token is in this segment
        last[rows[ends]] = h[ends.nonzero().view(-1), (valid - 1)[ends]]
    return last, hidden, passes
