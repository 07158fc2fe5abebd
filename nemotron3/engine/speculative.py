"""Greedy MTP speculative decoding: the model's own MTP block drafts k tokens, one forward verifies them.

One round, for every row at once (docs/inference.md §5, greedy case; the MTP block: docs/architecture.md §6):

    draft     d1 = argmax head(MTP_1(h0[L-1], Emb(x)))          x: the last emitted token, at position L
              d_j = argmax head(MTP_j(h_{j-1}, Emb(d_{j-1})))   j = 2..k, the same weights again
    verify    g = argmax head(model([x, d1, …, dk]))            one forward of k+1 tokens from the cache
    accept    a = number of leading i with d_{i+1} = g_i;  emit d_1..d_a and then g_a (the correction, or a
              bonus token when all k were right)
    rollback  the cache keeps x, d_1..d_a: the last k - a positions are undone (HybridCache.rollback; the
              Mamba states of the verify steps were recorded one by one for that)

Every emitted token is the main model's argmax given the tokens before it, so the output equals plain
greedy decoding whatever the drafts are (tests/test_engine_speculative.py checks it, with the random MTP
block and with an oracle drafter); drafts only change how many tokens one verify forward yields.

The MTP attention layer keeps its own KV slots in the cache (layer indices after the backbone's) with
its own positions: MTP position t holds the depth-1 input (h0[t], Emb(token t+1)), written once the
token t+1 is known: for the whole prompt after prefill, then for the a+1 accepted positions of each
round (the same forward yields the next round's first draft). The recursive depths 2..k are written at
the positions that follow (as vLLM runs a repeated MTP layer) and are overwritten by the next round.
Sampling (temperature > 0) needs lossless rejection sampling and is a later issue.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.model.hybrid import HybridLM


class MTPDrafter:
    """The MTP block of a HybridLM run incrementally on a HybridCache that includes its layers' slots."""

    def __init__(self, model: HybridLM) -> None:
        if model.mtp is None:
            raise ValueError(
                "num_speculative_tokens > 0 needs a model with an MTP block (num_nextn_predict_layers > 0)")
        if "M" in model.config.mtp_pattern:
            raise NotImplementedError("MTP blocks with Mamba layers are not supported by the drafter")
        self.model = model
        self.base = len(model.config.pattern)
        self.width = len(model.config.mtp_pattern)

    def __call__(self, cache: HybridCache, start: torch.Tensor, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
                 valid: torch.Tensor | None = None, rows: torch.Tensor | None = None, depth: int = 1) -> torch.Tensor:
        """prev_hidden (b, t, H), next_ids (b, t) at MTP positions start[b] + i -> h_depth (b, t, H)."""
        module = (depth - 1) % self.model.mtp.num_modules
        layers = list(self.model.mtp.layers)[module * self.width : (module + 1) * self.width]
        view = cache.begin(next_ids.shape[1], rows, valid, start=start)
        first, last = layers[0], layers[-1]
        emb = self.model.backbone.embeddings(next_ids)
        hidden = first.eh_proj(torch.cat([first.enorm(emb), first.hnorm(prev_hidden)], dim=-1))
        for j, block in enumerate(layers):
            hidden = block.forward_cached(hidden, view, self.base + module * self.width + j)
        return last.final_layernorm(hidden)

    def draft(self, cache: HybridCache, h1: torch.Tensor, start: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy drafts per row (B, k): d1 from the depth-1 hidden h1 (B, H), then depths 2..k recursively."""
        head = self.model.lm_head
        drafts, h = [head(h1).float().argmax(-1)], h1
        for j in range(2, k + 1):
            h = self(cache, start + j - 2, h[:, None], drafts[-1][:, None], depth=j)[:, 0]
            drafts.append(head(h).float().argmax(-1))
        return torch.stack(drafts, 1)


def speculative_greedy(model: HybridLM, cache: HybridCache, prompts: list[list[int]], max_new_tokens: int, k: int,
                       prefill_chunk: int, stops: set[int], stats: dict) -> Iterator[list[list[int]]]:
    """Yield, per round, the new tokens of each row (a list per row, possibly empty). Fills `stats`.

    `cache` must have max_rollback >= k + 1: a row that has finished (max_new_tokens or a stop token) still
    runs in the batch, and undoes all its k + 1 verified tokens each round so that it stops growing.
    """
    B, dev = len(prompts), cache.device
    drafter, head = MTPDrafter(model), model.lm_head
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    T = int(lens.max())
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    ar = torch.arange(B, device=dev)

    # prefill: main model, then the MTP block over every prompt position (h0[t], token t+1)
    hidden = torch.zeros(B, T, model.config.hidden_size, device=dev, dtype=head.weight.dtype)
    passes = 0
    for s in range(0, T, prefill_chunk):
        rows = (lens > s).nonzero().view(-1)
        valid = torch.clamp(lens[rows] - s, max=min(prefill_chunk, T - s))
        seg = ids[rows, s : s + prefill_chunk]
        hidden[rows, s : s + prefill_chunk] = model.hidden_states_cached(seg, cache, rows, valid)
        passes += 1
    x = head(hidden[ar, lens - 1]).float().argmax(-1)  # (B,) first new token
    yield [[t] for t in x.tolist()]
    nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    nxt[ar, lens - 1] = x
    h1 = torch.empty(B, model.config.hidden_size, device=dev, dtype=hidden.dtype)
    for s in range(0, T, prefill_chunk):
        rows = (lens > s).nonzero().view(-1)
        valid = torch.clamp(lens[rows] - s, max=min(prefill_chunk, T - s))
        out = drafter(cache, torch.full_like(rows, s), hidden[rows, s : s + prefill_chunk],
                      nxt[rows, s : s + prefill_chunk], valid, rows)
        ends = lens[rows] <= s + prefill_chunk
        h1[rows[ends]] = out[ends.nonzero().view(-1), (valid - 1)[ends]]
    mtp_start = lens.clone()
    produced = torch.ones(B, dtype=torch.long, device=dev)  # new tokens per row so far
    done = (produced >= max_new_tokens) | torch.tensor([t in stops for t in x.tolist()], device=dev)
    drafted, accepted, rounds = 0, 0, 0

    while not bool(done.all()):
        drafts = drafter.draft(cache, h1, mtp_start, k)  # (B, k): d_1..d_k
        verified = model.hidden_states_cached(torch.cat([x[:, None], drafts], 1), cache)  # (B, k+1, H), verify
        greedy = head(verified).float().argmax(-1)  # (B, k+1): the main model's tokens g_0..g_k
        a = (drafts == greedy[:, :k]).long().cumprod(1).sum(1)  # (B,) accepted drafts
        cache.rollback(torch.where(done, k + 1, k - a))  # a finished row keeps its length (it stays in the batch)
        x = torch.where(done, x, greedy[ar, a])
        out = [[] if done[b] else drafts[b, : a[b]].tolist() + [int(x[b])] for b in range(B)]
        nxt = torch.cat([drafts, drafts[:, :1]], 1)
        nxt[ar, a] = x
        mtp_hidden = drafter(cache, mtp_start, verified, nxt, a + 1)  # MTP positions of the kept tokens
        grown = torch.where(done, 0, a + 1)
        h1, mtp_start, produced = mtp_hidden[ar, a], mtp_start + grown, produced + grown  # h1: next round's draft
        passes, rounds = passes + 1, rounds + 1
        live = int((~done).sum())
        drafted, accepted = drafted + live * k, accepted + int(a[~done].sum())
        done |= produced >= max_new_tokens
        for b in range(B):
            done[b] |= any(t in stops for t in out[b])
        stats.update(forward_passes=passes, drafted=drafted, accepted=accepted, rounds=rounds,
                     acceptance_rate=accepted / max(drafted, 1),
                     tokens_per_verify=1 + accepted / max(drafted / k, 1))
        yield out
    stats.setdefault("forward_passes", passes)
