"""Speculative decoding with drafts that are accepted: an oracle drafter, and the cached drafter against the
uncached MTP forward.

A random MTP block almost never drafts the target's argmax, so "speculative output equals greedy" holds
whatever the drafter computes. Here (1) an oracle replaces the draft logits by the greedy continuation with
planned mistakes (right, wrong, right, ...): the output must still be greedy's, and the acceptance counts
must be exactly the length of each round's correct prefix (a draft that is right again after a mistake is
never accepted); (2) the real drafter runs with the acceptance count of each round forced (2, 0, 4, 1, 3
tokens kept), so the MTP cache holds accepted positions of every length, and every draft logit is compared
with an uncached run of the MTP block over the full sequence (depth 1: `HybridLM.forward_mtp`), every emitted
token with the target's argmax.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mtp_model

import nemotron3
from nemotron3.engine import speculative

K = 4
PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]  # the first crosses 16-token prefill chunks


@pytest.fixture(scope="module")
def model():
    return tiny_mtp_model()  # the tiny preset, seed 0


class _Rounds:
    """Follows the rounds through the two calls the decoder makes: `Drafter.logits` (the prefill's, then k
    draft calls on (B, H) per round, then the verify's on (B, k+1, H)) and `accept`."""

    def __init__(self, monkeypatch, rows: int) -> None:
        self.produced = [1] * rows  # the prefill emits one token per row
        self.round, self.j, self.started = 0, 0, False
        self.drafts: list[list[torch.Tensor]] = []  # per round: the k draft logits (B, V)
        self.before: list[list[int]] = []  # per round: tokens each row had emitted before it
        self.accepted: list[list[int]] = []
        orig_logits, orig_accept = speculative.Drafter.logits, speculative.accept

        def logits(drafter, hidden):
            out = orig_logits(drafter, hidden)
            if hidden.dim() == 3:  # the verify forward
                self.j = 0
                return out
            if not self.started:  # the prefill's last position: the first token
                self.started = True
                return out
            if self.j == 0:
                self.drafts.append([])
                self.before.append(list(self.produced))
            out = self.draft(out, self.j)
            self.drafts[-1].append(out.detach().clone())
            self.j += 1
            return out

        def accept(drafts, q, p, u_accept, u_extra, greedy):
            a, extra = self.accept(orig_accept, drafts, q, p, u_accept, u_extra, greedy)
            self.accepted.append(a.tolist())
            self.produced = [n + int(x) + 1 for n, x in zip(self.produced, a)]
            self.round += 1
            return a, extra

        monkeypatch.setattr(speculative.Drafter, "logits", logits)
        monkeypatch.setattr(speculative, "accept", accept)

    def draft(self, logits: torch.Tensor, j: int) -> torch.Tensor:
        return logits

    def accept(self, orig, *args):
        return orig(*args)


class _Oracle(_Rounds):
    """Draft j of a round is greedy's next token when plan[round][j] is True, a wrong token otherwise."""

    def __init__(self, monkeypatch, want: list[list[int]], plan: list[list[bool]], vocab: int) -> None:
        super().__init__(monkeypatch, len(want))
        self.want, self.plan, self.vocab = want, plan, vocab

    def draft(self, logits, j):
        out = torch.full_like(logits, -30.0)
        for b, row in enumerate(self.want):
            i = self.produced[b] + j
            tok = row[i] if i < len(row) else 0
            if not self.plan[self.round % len(self.plan)][j]:
                tok = (tok + 1) % self.vocab
            out[b, tok] = 30.0
        return out


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("plan", [
    [[True, False, True, True]],  # right, wrong, right again: only the first counts
    [[True, True, True, True]],  # all right: k accepted and the bonus token
    [[False, True, True, True], [True, True, False, True], [True, True, True, True]],
])
def test_an_oracle_drafter_is_accepted_up_to_its_first_mistake(model, monkeypatch, fast, plan):
    n = 13
    engine = nemotron3.Engine(model, prefill_chunk=16, fast=fast)
    want = engine.generate(PROMPTS, n + K + 2, stop_token_ids=[]).tokens
    oracle = _Oracle(monkeypatch, want, plan, model.config.vocab_size)
    out = engine.generate(PROMPTS, n, stop_token_ids=[], num_speculative_tokens=K)
    assert out.tokens == [w[:n] for w in want]
    lead = [next((i for i, ok in enumerate(p) if not ok), K) for p in plan]  # correct prefix of each plan
    live = [[oracle.before[r][b] < n for b in range(len(PROMPTS))] for r in range(oracle.round)]
    for r, (row_a, row_live) in enumerate(zip(oracle.accepted, live)):
        assert [a for a, ok in zip(row_a, row_live) if ok] == [lead[r % len(plan)]] * sum(row_live), r
    rounds = sum(map(sum, live))
    rates = [sum(sum(row_live) for r, row_live in enumerate(live) if lead[r % len(plan)] > i) / rounds
             for i in range(K)]
    assert out.stats["acceptance_rate_per_position"] == pytest.approx(rates)
    assert out.stats["acceptance_length"] == pytest.approx(1 + sum(rates))


class _Forced(_Rounds):
    """The real drafts; each round keeps a planned number of them (row b of round r: FORCED[(r + b) % 5])."""

    FORCED = [2, 0, 4, 1, 3]

    def accept(self, orig, drafts, q, p, u_accept, u_extra, greedy):
        B = drafts.shape[0]
        a = torch.tensor([self.FORCED[(self.round + b) % len(self.FORCED)] for b in range(B)])
        return a, p.argmax(-1)[torch.arange(B), a]


def _uncached_drafts(model, seq: list[int], drafts: list[int]) -> list[torch.Tensor]:
    """The k draft logits after `seq` without a cache. Depth 1 is `forward_mtp`'s at the position before the last
    token; depth j runs the MTP block over the whole input sequence extended by the recursive steps: the pairs
    (h0[t], Emb(seq[t+1])) of the prefix, then (h_1, Emb(d_1)), ..., (h_{j-1}, Emb(d_{j-1})) at the positions
    that follow (the drafter's layout, docs/inference.md §5)."""
    h0 = model.hidden_states(torch.tensor([seq]))[0]  # (n, H)
    prev, nxt, out = h0[:-1], list(seq[1:]), []
    for j in range(1, len(drafts) + 1):
        h = model.mtp.depth(j)(prev[None], model.backbone.embeddings(torch.tensor([nxt])))[0, -1]  # (H,)
        out.append(model.lm_head(h).float())
        if j == 1:
            ref = model.forward_mtp(torch.tensor([seq]), 1)[1][0][0, len(seq) - 2]  # the training forward
            torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
        prev, nxt = torch.cat([prev, h[None]]), nxt + [drafts[j - 1]]
    return out


@pytest.mark.parametrize("fast", [True, False])
@torch.no_grad()
def test_cached_drafts_equal_the_uncached_mtp_forward(model, monkeypatch, fast):
    n = 16
    rounds = _Forced(monkeypatch, len(PROMPTS))
    out = nemotron3.Engine(model, prefill_chunk=16, fast=fast).generate(
        PROMPTS, n, stop_token_ids=[], num_speculative_tokens=K)
    checked = 0
    for r, (logits, before) in enumerate(zip(rounds.drafts, rounds.before)):
        for b, prompt in enumerate(PROMPTS):
            if before[b] >= n:
                continue
            seq = prompt + out.tokens[b][: before[b]]
            drafts = [int(lg[b].argmax()) for lg in logits]
            for j, ref in enumerate(_uncached_drafts(model, seq, drafts)):
                torch.testing.assert_close(logits[j][b], ref, atol=2e-4, rtol=1e-4)
            a = rounds.accepted[r][b]
            extra = int(model(torch.tensor([seq + drafts[:a]]))[0, -1].argmax())
            assert out.tokens[b][before[b]: before[b] + a + 1] == (drafts[:a] + [extra])[: n - before[b]]
            checked += 1
    assert checked >= 10 and {a for row in rounds.accepted for a in row} == set(_Forced.FORCED)
