"""The verification rule of MTP speculative decoding (`speculative.accept`) and its helpers, on hand-built tensors.

References, all independent of engine/speculative.py:
- greedy acceptance: a plain Python loop (accept drafts up to the first that is not the target's argmax, then
  the target's argmax at that position);
- sampled acceptance: the textbook rejection rule (Leviathan et al. 2023): accept draft x with probability
  min(1, p(x)/q(x)); on rejection draw from normalize(max(0, p - q)); after k acceptances draw from p_{k+1}.
  Checked exactly where it is deterministic (p == q, a draft with p = 0, residuals worked by hand on three
  tokens, the inverse CDF read by hand) and statistically (Pearson's chi-square of each emitted token's law
  against p over a few thousand seeded draws);
- the sampling transform and the log-probabilities: softmax, top-k and top-p written out in Python floats;
- `cut_rounds`: lists cut by hand.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import icdf

from nemotron3.engine.params import SamplingParams
from nemotron3.engine.requests import token_logprobs_of
from nemotron3.engine.speculative import accept, cut_rounds, uniforms_per_round


def Sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
    """The target's sampling rule (SamplingParams' three sampling fields, positionally)."""
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)


def token_logprobs(logits: torch.Tensor, params: SamplingParams, tokens: list[list[int]]) -> list[list[float]]:
    """logits (B, t, V) -> each row's tokens' log-probabilities under the sampling law, through the engine's one
    logprobs function (requests.token_logprobs_of, mode `sampled`), row by row."""
    params = replace(params, logprobs_mode="sampled")
    return [token_logprobs_of(logits[b, : len(row)], row, params)[0] if row else [] for b, row in enumerate(tokens)]


def _greedy_reference(drafts: list[int], target: list[list[float]]) -> tuple[int, int]:
    """drafts (k,), target logits (k+1, V) -> (accepted, extra) by a loop over the positions."""
    argmax = [max(range(len(row)), key=lambda j: (row[j], -j)) for row in target]
    a = 0
    while a < len(drafts) and drafts[a] == argmax[a]:
        a += 1
    return a, argmax[a]


def _textbook(drafts, q, p, u_accept, u_extra) -> tuple[int, int]:
    """One row of the rejection rule in Python floats: drafts (k,), q (k, V), p (k+1, V)."""
    k = len(drafts)
    for i, x in enumerate(drafts):
        if not u_accept[i] < p[i][x] / q[i][x]:  # reject: residual normalize(max(0, p - q))
            residual = [max(0.0, pi - qi) for pi, qi in zip(p[i], q[i])]
            return i, icdf(residual if sum(residual) > 0 else p[i], u_extra)
    return k, icdf(p[k], u_extra)


# ------------------------------------------------------------------ greedy


@pytest.mark.parametrize("k", [1, 2, 4])
def test_greedy_acceptance_equals_the_first_mismatch_loop(k):
    """Random target logits; drafts equal to the argmax with probability 0.7 (so rows stop at every position,
    including after a draft that is right again after a mistake); 64 rows against the Python loop."""
    g = torch.Generator().manual_seed(k)
    B, V = 64, 7
    target = torch.randn(B, k + 1, V, generator=g)  # (B, k+1, V)
    right = torch.rand(B, k, generator=g) < 0.7
    drafts = torch.where(right, target[:, :k].argmax(-1), (target[:, :k].argmax(-1) + 1) % V)  # (B, k)
    a, extra = accept(drafts, None, target, None, None, greedy=True)
    want = [_greedy_reference(d, t) for d, t in zip(drafts.tolist(), target.tolist())]
    assert list(zip(a.tolist(), extra.tolist())) == want
    assert set(a.tolist()) == set(range(k + 1))  # every stopping position occurs
    assert a.dtype == torch.long and extra.shape == (B,)


def test_greedy_acceptance_by_hand():
    """k = 3, V = 4: all right (bonus from the last position), wrong first, right-wrong-right, wrong last."""
    eye = torch.eye(4)
    target = torch.stack([eye[[1, 2, 3, 0]], eye[[1, 2, 3, 0]], eye[[3, 3, 3, 3]], eye[[0, 1, 2, 2]]])  # (4, 4, 4)
    drafts = torch.tensor([[1, 2, 3], [0, 2, 3], [3, 0, 3], [0, 1, 3]])  # (4, 3)
    a, extra = accept(drafts, None, target, None, None, greedy=True)
    assert a.tolist() == [3, 0, 1, 2]
    assert extra.tolist() == [0, 1, 3, 2]


# ------------------------------------------------------------------ sampled: exact cases


def _laws(g: torch.Generator, *shape: int) -> torch.Tensor:
    w = torch.rand(*shape, generator=g) + 0.05
    return w / w.sum(-1, keepdim=True)


def test_equal_laws_accept_every_draft_and_draw_the_bonus_from_the_last_position():
    """p == q at every draft position: every draft is accepted whatever u (< 1); the extra token is p_{k+1}'s
    inverse-CDF draw with u_extra."""
    g = torch.Generator().manual_seed(0)
    B, k, V = 6, 3, 5
    p = _laws(g, B, k + 1, V)  # (B, k+1, V)
    q = p[:, :k].clone()  # (B, k, V)
    drafts = torch.randint(0, V, (B, k), generator=g)
    u_accept = torch.tensor([0.0, 0.5, 0.999999, 0.3, 0.9, 0.1], dtype=torch.float64)[:, None].expand(B, k)
    u_extra = torch.rand(B, generator=g, dtype=torch.float64)
    a, extra = accept(drafts, q, p, u_accept, u_extra, greedy=False)
    assert a.tolist() == [k] * B
    assert extra.tolist() == [icdf(p[b, k].tolist(), float(u_extra[b])) for b in range(B)]


def test_a_draft_the_target_never_emits_is_rejected_even_at_u_zero():
    """q puts mass on token 2 where p = 0: rejected at u = 0 (the test is strict, u * q < p); the residual
    max(0, p - q) = (0.1, 0.2, 0) / 0.3 is then read with u_extra (by hand: u < 1/3 -> 0, else 1)."""
    p = torch.tensor([[[0.3, 0.7, 0.0], [0.2, 0.3, 0.5]]])  # (1, k+1 = 2, 3)
    q = torch.tensor([[[0.2, 0.5, 0.3]]])  # (1, 1, 3)
    drafts = torch.tensor([[2]])
    for u_extra, want in [(0.0, 0), (0.32, 0), (0.34, 1), (0.99, 1)]:
        a, extra = accept(drafts, q, p, torch.zeros(1, 1, dtype=torch.float64),
                          torch.tensor([u_extra], dtype=torch.float64), greedy=False)
        assert (a.item(), extra.item()) == (0, want), u_extra


def test_residual_and_acceptance_threshold_by_hand():
    """k = 2 over 3 tokens; the first position has p == q (accepted), the second is worked by hand.

    p_2 = (0.2, 0.5, 0.3), q_2 = (0.6, 0.2, 0.2), draft 0: accepted iff u < p/q = 1/3; on rejection the
    residual max(0, p - q) = (0, 0.3, 0.1), normalized (0, 0.75, 0.25): token 1 iff u_extra < 0.75.
    After both accepted, the bonus comes from p_3 = (0.1, 0.6, 0.3): 0 iff u < 0.1, 1 iff u < 0.7, else 2."""
    p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3]])[None].expand(8, 3, 3)  # (8, 3, 3)
    q = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.2, 0.2]])[None].expand(8, 2, 3)  # (8, 2, 3)
    drafts = torch.tensor([[1, 0]]).expand(8, 2)
    u2 = [0.34, 0.34, 0.9, 0.5, 0.32, 0.32, 0.32, 0.0]  # second acceptance uniform per row
    u_extra = [0.74, 0.76, 0.1, 0.99, 0.05, 0.2, 0.75, 0.69]
    u_accept = torch.tensor([[0.99, u] for u in u2], dtype=torch.float64)  # (8, 2)
    a, extra = accept(drafts, q, p, u_accept, torch.tensor(u_extra, dtype=torch.float64), greedy=False)
    assert a.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert extra.tolist() == [1, 2, 1, 2, 0, 1, 2, 1]
    want = [_textbook([1, 0], q[b].tolist(), p[b].tolist(), u_accept[b].tolist(), u_extra[b]) for b in range(8)]
    assert list(zip(a.tolist(), extra.tolist())) == want


def test_rows_stop_at_different_positions_in_one_call():
    """Random laws, k = 3, 200 rows with drafts drawn from q: every row equals the textbook rule, and the
    rows stop at every position 0..k (the batch is not coupled)."""
    g = torch.Generator().manual_seed(1)
    B, k, V = 200, 3, 4
    p, q = _laws(g, B, k + 1, V), _laws(g, B, k, V)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, k)  # (B, k) d_j ~ q_j
    u_accept = torch.rand(B, k, generator=g, dtype=torch.float64)
    u_extra = torch.rand(B, generator=g, dtype=torch.float64)
    a, extra = accept(drafts, q, p, u_accept, u_extra, greedy=False)
    want = [_textbook(drafts[b].tolist(), q[b].tolist(), p[b].tolist(), u_accept[b].tolist(), float(u_extra[b]))
            for b in range(B)]
    assert list(zip(a.tolist(), extra.tolist())) == want
    assert set(a.tolist()) == set(range(k + 1))


def test_a_residual_that_rounds_to_nothing_falls_back_to_p():
    """A rejection where max(0, p - q) is all zero (p sums to less than q: rounding, exaggerated here):
    p = (0.5, 0.4), q = (0.5, 0.5), draft 1 rejected at u = 0.9 (0.9 * 0.5 >= 0.4); the extra token is drawn
    from p itself: cumulative (0.5, 0.9), so u_extra = 0.3 -> 0 and 0.7 -> 1 (0.7 * 0.9 = 0.63 > 0.5)."""
    p = torch.tensor([[[0.5, 0.4], [0.3, 0.7]]]).expand(3, 2, 2)  # (3, 2, 2)
    q = torch.tensor([[[0.5, 0.5]]]).expand(3, 1, 2)  # (3, 1, 2)
    drafts = torch.tensor([[1]]).expand(3, 1)
    u_accept = torch.tensor([[0.9], [0.9], [0.7]], dtype=torch.float64)
    a, extra = accept(drafts, q, p, u_accept, torch.tensor([0.3, 0.7, 0.5], dtype=torch.float64), greedy=False)
    assert a.tolist() == [0, 0, 1]  # 0.7 * 0.5 < 0.4: the third row accepts, its bonus from (0.3, 0.7)
    assert extra.tolist() == [0, 1, 1]


# ------------------------------------------------------------------ sampled: the law


def _chi_square_p_value(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson's statistic, p-value from the chi-square survival function Q(df/2, x/2)."""
    e = law.double() * counts.sum()
    stat = ((counts.double() - e) ** 2 / e).sum()
    return float(torch.special.gammaincc(torch.tensor((len(law) - 1) / 2, dtype=torch.float64), stat / 2))


def test_sampled_acceptance_emits_the_target_law():
    """k = 2, V = 4, one (p, q) pair badly matched, 4000 seeded rows with d_j ~ q_j drawn by torch.multinomial.
    The first emitted token must follow p_1, the second (rows with a >= 1) p_2, the third (a = 2) p_3 (chi-square,
    significance 1e-3, fixed seeds: deterministic); the acceptance frequency of the first draft must be
    sum_x min(p_1(x), q_1(x)) within 4 standard errors. The same test rejects q_1 as the law of the first token."""
    g = torch.Generator().manual_seed(7)
    N, k, V = 4000, 2, 4
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.05, 0.5, 0.2]])  # (k+1, V)
    q = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7]])  # (k, V)
    drafts = torch.multinomial(q, N, replacement=True, generator=g).t().contiguous()  # (N, k)
    a, extra = accept(drafts, q.expand(N, k, V), p.expand(N, k + 1, V), torch.rand(N, k, generator=g,
                      dtype=torch.float64), torch.rand(N, generator=g, dtype=torch.float64), greedy=False)
    emitted = [d[:n] + [x] for d, n, x in zip(drafts.tolist(), a.tolist(), extra.tolist())]
    for pos in range(k + 1):
        tokens = torch.tensor([row[pos] for row in emitted if len(row) > pos])
        assert len(tokens) > 500, pos
        counts = torch.bincount(tokens, minlength=V)
        assert _chi_square_p_value(counts, p[pos]) > 1e-3, pos
    first = torch.bincount(torch.tensor([row[0] for row in emitted]), minlength=V)
    assert _chi_square_p_value(first, q[0]) < 1e-3  # power: the draft law is seen as wrong
    rate, want = float((a >= 1).double().mean()), float(torch.minimum(p[0], q[0]).sum())
    assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / N)


# ------------------------------------------------------------------ the sampling transform, log-probs, cuts


def _law(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """softmax(row / T), top-k (ties kept), then the top-p nucleus (mass strictly before a token < p), in floats."""
    z = [v / temperature for v in row]
    if 0 < top_k < len(z):
        kth = sorted(z, reverse=True)[top_k - 1]
        z = [v if v >= kth else -math.inf for v in z]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    p = [v / sum(e) for v in e]
    if top_p < 1.0:
        order, before, keep = sorted(range(len(p)), key=lambda i: -p[i]), 0.0, set()
        for i in order:
            if before < top_p:
                keep.add(i)
            before += p[i]
        p = [v if i in keep else 0.0 for i, v in enumerate(p)]
        p = [v / sum(p) for v in p]
    return p


def test_sampling_probs_greedy_is_one_hot_at_the_argmax_in_fp32():
    """Temperature 0: one-hot at the argmax (the first of equal maxima), any leading shape, fp32 out of fp64."""
    logits = torch.tensor([[[0.0, 2.0, 1.0, 2.0], [3.0, -1.0, 0.0, 0.0]], [[-2.0, -1.0, -3.0, -1.5],
                           [0.0, 0.0, 0.0, 0.5]]], dtype=torch.float64)  # (2, 2, 4)
    out = Sampling().probs(logits)
    assert out.dtype == torch.float32 and out.shape == (2, 2, 4)
    want = [[[0, 1, 0, 0], [1, 0, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 1]]]
    assert out.tolist() == want


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 1.0), (0.9, 0, 0.6),
                                                     (1.0, 4, 0.8)])
def test_sampling_probs_follow_temperature_top_k_top_p(temperature, top_k, top_p):
    """(2, 3, 6) logits -> the Python-float law of each row, shape kept."""
    logits = torch.tensor([[3.0, 1.0, 0.5, -1.0, 2.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                           [-1.0, 4.0, 4.0, 0.0, 1.0, 2.5]])
    logits = torch.stack([logits, logits.flip(-1)])  # (2, 3, 6)
    out = Sampling(temperature, top_k, top_p).probs(logits)
    assert out.shape == (2, 3, 6) and out.dtype == torch.float32
    want = [[_law(row, temperature, top_k, top_p) for row in m] for m in logits.tolist()]
    torch.testing.assert_close(out, torch.tensor(want), atol=1e-6, rtol=1e-5)


def test_uniforms_per_round_is_k_drafts_k_tests_and_one_extra():
    assert [uniforms_per_round(k) for k in (1, 2, 5)] == [3, 5, 11]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.5, 0, 1.0), (0.8, 3, 1.0),
                                                     (1.0, 0, 0.7), (0.0, 2, 1.0), (1.0, 1, 1.0)])
def test_token_logprobs_are_the_log_of_the_sampling_law(temperature, top_k, top_p):
    """logits (3, 4, 5), ragged token lists (one empty) -> log of the Python-float law at each emitting
    position (greedy: the raw softmax; top-k/top-p: the renormalized law, tokens chosen inside it)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 5, generator=g) * 2  # (B, t, V)
    law = [[_law(row, temperature or 1.0, top_k, top_p) for row in m] for m in logits.tolist()]
    def pick(row: list[float], i: int) -> int:  # a token inside the law's support, not always the argmax
        support = sorted((j for j in range(len(row)) if row[j] > 0), key=lambda j: -row[j])
        return support[i % len(support)]

    tokens = [[pick(law[0][i], i + 1) for i in range(3)], [], [pick(law[2][0], 2)]]
    out = token_logprobs(logits, Sampling(temperature, top_k, top_p), tokens)
    assert [len(r) for r in out] == [3, 0, 1]
    want = [[math.log(law[b][i][t]) for i, t in enumerate(row)] for b, row in enumerate(tokens)]
    for got, ref in zip(out, want):
        assert got == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.5])
def test_token_logprobs_of_improbable_tokens_stay_finite_without_filtering(temperature):
    """No top-k/top-p: the log-probability is log_softmax's, finite even where the probability underflows fp32
    (a logit 160 below the best, by hand: -(160 + log(1 + e^-10)) / T at T = 1, the greedy rows too)."""
    logits = torch.tensor([[[10.0, -150.0, 0.0]]])  # (1, 1, 3)
    out = token_logprobs(logits, Sampling(temperature), [[1]])
    T = temperature or 1.0
    want = -150.0 / T - math.log(math.exp(10.0 / T) + math.exp(-150.0 / T) + 1.0)
    assert out[0] == pytest.approx([want], rel=1e-5)


def test_token_logprobs_of_rows_with_no_tokens():
    """Every row empty: empty lists (the width is at least one column)."""
    assert token_logprobs(torch.zeros(2, 3, 4), Sampling(), [[], []]) == [[], []]


def test_cut_rounds_by_hand():
    """Rows of a round cut to n tokens, the last optionally forced; `accepted` and `extra` follow (n - 1, the
    row's new last token); a cut at or beyond the row's length without a forced token changes nothing."""
    out = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7], [5]]
    accepted, extra = [2, 2, 2, 2, 2, 0], [7, 7, 7, 7, 7, 5]
    cut_rounds(out, accepted, extra, [None, (2, None), (3, None), (2, 9), (3, 9), (1, 8)])
    assert out == [[5, 6, 7], [5, 6], [5, 6, 7], [5, 9], [5, 6, 9], [8]]
    assert accepted == [2, 1, 2, 1, 2, 0]
    assert extra == [7, 6, 7, 9, 9, 8]
    out, accepted, extra = [[1, 2]], [1], [2]
    cut_rounds(out, accepted, extra, [(5, None)])
    assert (out, accepted, extra) == ([[1, 2]], [1], [2])
