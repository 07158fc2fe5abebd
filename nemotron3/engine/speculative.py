"""MTP speculative decoding: the model's own MTP block drafts k tokens, one forward verifies them, losslessly.

One round, for every row at once (docs/inference.md §5; the MTP block: docs/architecture.md §6):

    draft     q_1 = T(head(MTP_1(h0[L-1], Emb(x))))        x: the last emitted token, at position L
              q_j = T(head(MTP_j(h_{j-1}, Emb(d_{j-1}))))  j = 2..k, the same weights again;  d_j ~ q_j
    verify    p_i = T(head(model([x, d_1, …, d_k])_i))     one forward of k+1 tokens from the cache
    accept    d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order, until the first
              rejection; a = the number accepted
    emit      d_1..d_a, then one more token: at a rejection (a < k) drawn from normalize(max(0, p_a - q_a)),
              after k acceptances (the bonus) from p_k
    rollback  the cache keeps x, d_1..d_a: the last k - a positions are undone (HybridCache.rollback; the
              Mamba states of the verify tokens were recorded one by one for that)

T is the sampling transform of the target (temperature, then top-k, then top-p: engine/sampling.py),
applied to the draft logits too, so q is exactly the law the drafts are drawn from. This is the
speculative sampling of Leviathan et al. and Chen et al. (2023): each emitted token has the target's
conditional law p given the tokens before it, whatever q is; drafts only change how many tokens one
verify forward yields. Greedy (temperature 0) is the limit where p and q are one-hot: a draft is accepted
when it equals the target's argmax, and the extra token is the target's argmax, so the output equals
plain greedy decoding token for token (tests/engine/test_engine_speculative.py checks both, the sampled law with
a chi-square test against full forwards).

Randomness: each row has its own uniform stream (engine/sampling.py, `row_uniforms`), and round n of a
row reads its 2k+1 uniforms at a fixed offset (k to draw the drafts, k for the acceptance tests, one for
the extra token) whether or not it used them in earlier rounds, so a seeded row's tokens depend only on
(seed, row index, its prompt), not on which rows share the batch or when they stop.

Both forwards run through the fast decoder when the model allows it (engine/decode.py: the verify is
its (k+1)-token forward, the drafts its MTP steps), else through the reference cached path.

The MTP attention layer keeps its own KV slots in the cache (layer indices after the backbone's) with
its own positions: MTP position t holds the depth-1 input (h0[t], Emb(token t+1)), written once the
token t+1 is known: for the whole prompt after prefill, then for the a+1 accepted positions of each
round (the same forward yields the next round's first draft). The recursive depths 2..k are written at
the positions that follow (as vLLM runs a repeated MTP layer) and are overwritten by the next round; the
MTP block holds no Mamba layer, so positions written past the accepted ones need no rollback.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder, compile_static
from nemotron3.engine.params import SamplingParams, speculative_config
from nemotron3.engine.sampling import inverse_cdf, log_law
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


def token_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[list[int]]) -> list[list[float]]:
    """logits (B, t, V) at the positions that emitted `tokens[b]` (the first len(tokens[b]) of them) -> each
    token's log-probability under the sampling law (temperature, top-k, top-p; greedy: the raw softmax).

    This is what a rollout engine reports for RL (the trainer recomputes it and compares, `token_mult_prob_error`).
    Under speculative sampling every emitted token has the target's law p at its position, accepted draft and
    extra token alike, so the verify forward's p is the law each one was drawn from.
    """
    logp = log_law(logits, params.temperature, params.top_k, params.top_p, "sampled")
    n = [len(row) for row in tokens]
    width = max(max(n), 1)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in tokens], dtype=torch.long, device=logits.device)
    picked = logp[:, :width].gather(-1, ids[..., None])[..., 0].tolist()  # (B, width)
    return [row[:k] for row, k in zip(picked, n)]


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
