"""MTP speculative decoding (docs/inference.md §5): the model's own MTP block drafts k tokens, one forward of k + 1
tokens verifies them, and the accept rule of Leviathan et al. and Chen et al. (2023) keeps the output lossless,
greedy or sampled. The drafter's forwards run on the fast decoder when the model allows it; the MTP attention
layer keeps its own positions in the cache; each row reads 2k + 1 uniforms per round at a fixed offset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder, compile_static
from nemotron3.engine.params import speculative_config
from nemotron3.engine.sampling import inverse_cdf
from nemotron3.model.hybrid import HybridLM


def uniforms_per_round(k: int) -> int:
    """Uniforms one row reads per round: k draft draws, k acceptance tests, one extra token."""
    return 2 * k + 1


def accept(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor, u_accept: torch.Tensor, u_extra: torch.Tensor,
           greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The verification rule. drafts (B, k), q (B, k, V) their laws, p (B, k+1, V) the target's laws,
    u_accept (B, k), u_extra (B,) uniforms -> accepted counts a (B,) and the extra token (B,)."""
    B, k = drafts.shape
    ar = torch.arange(B, device=drafts.device)
    if greedy:
        target = p.argmax(-1)  # (B, k+1)
        a = (drafts == target[:, :k]).long().cumprod(1).sum(1)
        return a, target[ar, a]
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k) target probability of each draft
    q_d = q.gather(-1, drafts[..., None])[..., 0]  # > 0: the draft was drawn from q
    ok = u_accept.to(p_d.dtype) * q_d < p_d  # u < p/q, without dividing
    a = ok.long().cumprod(1).sum(1)  # (B,) leading acceptances
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # (B, k+1, V): the bonus position has q = 0
    residual = (p[ar, a] - q_pad[ar, a]).clamp_(min=0)  # (B, V): p itself at the bonus position
    empty = residual.sum(-1) <= 0  # p = q up to rounding (then a rejection cannot happen): draw from p
    residual[empty] = p[ar, a][empty]
    return a, inverse_cdf(residual, u_extra)


class Drafter:
    """The verify forward and the MTP block on a cache, through the fast decoder or the reference path."""

    def __init__(self, model: HybridLM, fast: FastDecoder | None, compiled: dict | None = None) -> None:
        speculative_config(model, 1)  # ValueError without an MTP block
        if "M" in model.config.mtp_pattern:
            raise NotImplementedError("MTP blocks with Mamba layers are not supported by the drafter")
        self.model, self.fast = model, fast
        # a traceable fast decoder runs torch.compile'd forwards (static shapes: attention over the whole
        # capacity); `compiled` keeps them between calls (the Engine owns it)
        self.compiled = compiled if fast is not None and fast.traceable and compiled is not None else None

    def _compiled(self, key: tuple, make: Callable) -> Callable:
        """One torch.compile'd function per (kind, batch, tokens, MTP module): each shape compiles once."""
        if key not in self.compiled:
            self.compiled[key] = compile_static(make())
        return self.compiled[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V) fp32."""
        return self.model.lm_head(hidden).float() if self.fast is None else self.fast.logits(hidden)

    def verify(self, cache: HybridCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, t) appended to every row -> hidden (B, t, H); the recurrent states are recorded."""
        if self.fast is None:
            return self.model.hidden_states(tokens, cache)
        B, t = tokens.shape
        if self.compiled is not None:
            fast = self.fast
            fn = self._compiled(("verify", B, t), lambda: lambda tok, c: fast.forward(tok, c, None, False, False))
            hidden = fn(tokens, cache)
            cache.commit_all(t)
            return hidden.view(B, t, -1)
        return self.fast.forward(tokens, cache, int(cache.lengths.max()) + t).view(B, t, -1)

    def mtp(self, cache: HybridCache, start: torch.Tensor, prev_hidden: torch.Tensor, next_ids: torch.Tensor,
            depth: int = 1, rows: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """prev_hidden (b, t, H), next_ids (b, t) at MTP positions start[b] + i -> h_depth (b, t, H)."""
        b, t = next_ids.shape
        if self.fast is not None and rows is None and valid is None:
            if self.compiled is None:
                return self.fast.mtp(prev_hidden.reshape(b * t, -1), next_ids, cache, start, depth).view(b, t, -1)
            fast, module = self.fast, (depth - 1) % len(self.fast.mtp_modules)
            fn = self._compiled(("mtp", b, t, module),
                                lambda: lambda p, ids, c, s: fast.mtp(p, ids, c, s, module + 1))
            return fn(prev_hidden.reshape(b * t, -1), next_ids, cache, start).view(b, t, -1)
        view = cache.begin(t, rows, valid, start=start)
        return self.model.mtp.depth(depth)(prev_hidden, self.model.backbone.embeddings(next_ids), view)


    def prompt_chunks(self, cache: HybridCache, jobs: list[tuple[int, int, torch.Tensor, list[int]]]
                      ) -> list[torch.Tensor]:
        """The MTP block over prompt chunks in one forward, filling its cache positions: jobs (row, start, hidden
        (c, H), the next ids) -> each job's h1 at its last position (the next draft's input after a prompt)."""
        dev, width = cache.device, max(len(n) for *_, n in jobs)
        hidden = torch.zeros(len(jobs), width, jobs[0][2].shape[-1], device=dev, dtype=jobs[0][2].dtype)
        nxt = torch.zeros(len(jobs), width, dtype=torch.long, device=dev)
        for i, (_, _, h, n) in enumerate(jobs):
            hidden[i, : len(n)], nxt[i, : len(n)] = h[: len(n)], torch.tensor(n, dtype=torch.long, device=dev)
        rows, start, valid = (torch.tensor(v, device=dev) for v in zip(*[(r, st, len(n)) for r, st, _, n in jobs]))
        out = self.mtp(cache, start, hidden, nxt, rows=rows, valid=valid)  # (b, width, H)
        return [out[i, len(n) - 1] for i, (*_, n) in enumerate(jobs)]

def cut_rounds(out: list[list[int]], accepted: list[int], extra: list[int],
               cuts: list[tuple[int, int | None] | None]) -> None:
    """Apply each row's cut `(n, token)` of a round in place (the thinking budget's answer, engine/thinking.py):
    its tokens cut to the first n, the last replaced by `token` when one is given; `accepted` and `extra` (the
    row's accepted drafts and its last token) follow. A None cut leaves the row as it is."""
    for b, cut in enumerate(cuts):
        if cut is None:
            continue
        n, forced = cut
        if n < len(out[b]) or forced is not None:
            out[b] = out[b][:n]
            if forced is not None:
                out[b][-1] = forced
            accepted[b], extra[b] = n - 1, out[b][-1]


def speculative_round(drafter: Drafter, cache: HybridCache, x: torch.Tensor, h1: torch.Tensor,
                      mtp_start: torch.Tensor, k: int, laws: Callable[[torch.Tensor], torch.Tensor] | None,
                      u: torch.Tensor, done: list[bool], cut: Callable[[int, list[int]], tuple[int, int | None]]
                      ) -> tuple[list[list[int]], list[int], torch.Tensor, tuple[torch.Tensor, ...]]:
    """One round for every row of `cache` (the module docstring): x (n,) each row's last emitted token, h1 (n, H)
    its next draft's input, mtp_start (n,) its next MTP position; `laws(logits (n, ..., V))` each row's sampling
    law, None when every row is greedy; u (n, 2k+1) each row's uniforms of this round. A row in `done` emits
    nothing and undoes all k + 1 verified tokens (it stays in a static batch). `cut(row, tokens)` may cut a row's
    tokens (cut_rounds; the thinking budget). Returns each row's tokens, its accepted drafts, the verify logits
    (n, k+1, V) and the new (x, h1, mtp_start)."""
    n, dev = x.shape[0], x.device
    drafts, qs, h = [], [], h1
    for j in range(1, k + 1):
        if j > 1:
            h = drafter.mtp(cache, mtp_start + j - 2, h[:, None], drafts[-1][:, None], depth=j)[:, 0]
        logits = drafter.logits(h)  # (n, V)
        if laws is None:
            drafts.append(logits.argmax(-1))
        else:
            qs.append(laws(logits))
            drafts.append(inverse_cdf(qs[-1], u[:, j - 1]))
    drafts_t = torch.stack(drafts, 1)  # (n, k): d_1..d_k
    verified = drafter.verify(cache, torch.cat([x[:, None], drafts_t], 1))  # (n, k+1, H)
    logits = drafter.logits(verified)  # (n, k+1, V)
    if laws is None:  # the target's argmax: accept while the drafts agree, then its token
        a, extra = accept(drafts_t, None, logits, None, None, greedy=True)
    else:
        a, extra = accept(drafts_t, torch.stack(qs, 1), laws(logits), u[:, k : 2 * k], u[:, 2 * k], greedy=False)
    a_l, extra_l, drafts_l = a.tolist(), extra.tolist(), drafts_t.tolist()
    out = [[] if done[b] else drafts_l[b][: a_l[b]] + [extra_l[b]] for b in range(n)]
    cut_rounds(out, a_l, extra_l, [cut(b, row) if row else None for b, row in enumerate(out)])
    a, extra = torch.tensor(a_l, device=dev), torch.tensor(extra_l, device=dev)
    finished = torch.tensor(done, device=dev)
    cache.rollback(torch.where(finished, k + 1, k - a), check=False)
    x = torch.where(finished, x, extra)
    ar = torch.arange(n, device=dev)
    nxt = torch.cat([drafts_t, drafts_t[:, :1]], 1)
    nxt[ar, a] = x
    mtp_hidden = drafter.mtp(cache, mtp_start, verified, nxt)  # MTP positions of the kept tokens
    return out, a_l, logits, (x, mtp_hidden[ar, a], mtp_start + torch.where(finished, 0, a + 1))
