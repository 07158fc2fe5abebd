"""The rounds of MTP speculative decoding (the scheduler's static batch, engine/scheduler.py, over
`speculative_round` and `Drafter`) on a micro model (hidden 16, vocab 32, one Mamba, one attention and one MoE
layer; an MTP block of one attention and one MoE layer).

The rounds are the scheduler's events, step by step: each row's tokens cut at its stop token and max_new_tokens, as
every caller gets them (the former `speculative_rounds` generator yielded whole rounds and left the cut to the
Engine), so the references below are cut the same way (`_clip`).

References, none of which runs engine/speculative.py:
- greedy: plain greedy decoding by full forwards (no cache), and the round-by-round outcome of an oracle
  drafter (drafts right or wrong by plan: the row emits the correct prefix of its drafts plus one token, a
  finished row emits nothing), with the statistics counted from that plan;
- sampling: the whole algorithm rewritten per row in Python from full forwards: draft j's law q_j from an
  uncached run of the MTP block over the sequence (docs/inference.md §5's layout), the target's laws p_i from
  one full forward, the documented uniform layout (column 0 the first token; round r reads 2k+1 columns from
  1 + r(2k+1): k draft draws, k acceptance tests, one extra token), the textbook rejection rule;
- log-probabilities: the log of the law of each emitted token from full forwards;
- the compiled verify/MTP branches run with torch.compile replaced by the identity (the same function, eagerly),
  against the reference cached path.
Every direct run of the generator is bounded (`_run`), so a loop that never ends fails instead of hanging.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import icdf, randomize_

import nemotron3
from nemotron3.engine import speculative
from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.engine.params import SamplingParams
from nemotron3.engine.sampling import filtered_probs, row_uniforms
from nemotron3.engine.scheduler import Request, Scheduler
from nemotron3.engine.speculative import Drafter


def Sampling(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
    """The target's sampling rule (SamplingParams' three sampling fields, positionally)."""
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)

MICRO = dict(pattern="M*E", vocab_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
             intermediate_size=32, mamba_num_heads=2, mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=8,
             n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
             moe_shared_expert_intermediate_size=16, moe_latent_size=8, num_nextn_predict_layers=1, mtp_pattern="*E")
CHUNK = 8
# prefill chunks of 8: 19 tokens cross two chunk boundaries, 16 ends on one; rows 2 and 3 end in the same chunk
PROMPTS = [list(range(3, 22)), [5, 6, 7], list(range(10, 20)), list(range(12, 28))]


def _micro(**changes) -> nemotron3.HybridLM:
    torch.manual_seed(0)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(**{**MICRO, **changes})).eval()
    randomize_(model, 0)
    return model


@pytest.fixture(scope="module")
def model():
    return _micro()


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """n tokens of plain greedy decoding, one full forward (no cache) per token."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def _run(model, prompts, n, k, fast=True, limit=40, stats=None, on_yield=None, stops=(), sampling=None, seed=None,
         constrain=None, compiled=None, logprobs=None, grown=None) -> list[list[list[int]]]:
    """The rounds of one static batch: per scheduler step that emitted tokens, a list per row (at most `limit`
    of them, else the test fails), each passed to `on_yield` before the next step runs; `stats` holds the
    scheduler's forward passes and acceptance statistics as of that step. `fast`: True (an eager FastDecoder),
    False (the reference path) or a FastDecoder. `seed`: the rows' streams are row_uniforms(seed, B, ...).
    `logprobs` (lists per row) is extended with the sampled law's log-probability of each emitted token; `grown`
    (a list) gets, per round, each row's kept tokens before the cut (accepted + 1, 0 for a finished row)."""
    if fast is True:
        fast = FastDecoder(model)
    p = sampling or SamplingParams()
    params = SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, max_tokens=n, seed=seed,
                            stop_token_ids=stops, logprobs=None if logprobs is None else 0, logprobs_mode="sampled")
    sched = Scheduler(model, len(prompts), max(map(len, prompts)) + n + 2 * k + 1, None, CHUNK,
                      num_speculative_tokens=k, fast=fast or False, compiled=compiled, static=True)
    events = [[] for _ in prompts]
    hooks = [None if constrain is None else (lambda tokens, b=b: constrain(b, tokens)) for b in range(len(prompts))]
    sched.submit_group([(Request(list(pr), params, b, hooks[b]), events[b].append) for b, pr in enumerate(prompts)])
    stats = {} if stats is None else stats
    out = []
    with torch.inference_mode():
        while not sched.idle():
            sched.step()
            rows = [[t for ev in evs for t in ev.tokens] for evs in events]
            if grown is not None and any(ev.accepted is not None for evs in events for ev in evs):
                grown.append([sum(ev.accepted + 1 for ev in evs if ev.accepted is not None) for evs in events])
            if logprobs is not None:
                for b, evs in enumerate(events):
                    logprobs[b] += [x for ev in evs for x in ev.logprobs or []]
            for evs in events:
                evs.clear()
            stats.clear()
            stats.update(forward_passes=sched.stats["forward_passes"], **sched.speculation_stats())
            if any(rows):
                out.append(rows)
                assert len(out) <= limit, "more rounds than the bound"
                if on_yield is not None:
                    on_yield(rows)
    return out


def _clip(rounds: list[list[list[int]]], n: int, stops=()) -> list[list[list[int]]]:
    """Whole rounds per row cut as the scheduler cuts them: at max_new_tokens and after a stop token."""
    out, done, count = [], [False] * len(rounds[0]), [0] * len(rounds[0])
    for r in rounds:
        row_out = []
        for b, row in enumerate(r):
            row = [] if done[b] else row[: n - count[b]]
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            row = row[:cut]
            count[b] += len(row)
            done[b] = done[b] or count[b] >= n or cut < len(r[b]) or any(t in stops for t in row)
            row_out.append(row)
        out.append(row_out)
    return out


def _rows(rounds: list[list[list[int]]]) -> list[list[int]]:
    """Each row's tokens, concatenated over the yields."""
    return [sum((r[b] for r in rounds), []) for b in range(len(rounds[0]))]


# ------------------------------------------------------------------ greedy, an oracle drafter


class _Oracle:
    """Replaces the draft logits (the `Drafter.logits` calls on (B, H) after the prefill's): draft j of row b in
    round r is want[b]'s next token when plan[r % len(plan)][j] is True, a wrong token otherwise. `produced` is
    advanced by the caller from the yields (the next round's drafts are computed after the yield)."""

    def __init__(self, monkeypatch, want: list[list[int]], plan: list[list[bool]], vocab: int) -> None:
        self.want, self.plan, self.vocab = want, plan, vocab
        self.produced, self.round, self.j, self.started = [0] * len(want), 0, 0, False
        orig = speculative.Drafter.logits

        def logits(drafter, hidden):
            out = orig(drafter, hidden)
            if hidden.dim() == 3:  # the verify forward ends the round's drafts
                self.round, self.j = self.round + 1, 0
                return out
            if not self.started:  # the prefill's last position: the first token
                self.started = True
                return out
            forced = torch.full_like(out, -30.0)
            for b, row in enumerate(self.want):
                i = min(self.produced[b] + self.j, len(row) - 1)
                ok = self.plan[self.round % len(self.plan)][self.j]
                forced[b, row[i] if ok else (row[i] + 1) % self.vocab] = 30.0
            self.j += 1
            return forced

        monkeypatch.setattr(speculative.Drafter, "logits", logits)

    def feed(self, out: list[list[int]]) -> None:
        for b, row in enumerate(out):
            self.produced[b] += len(row)


def _plan_outcome(want, plan, n, k, stops=()):
    """What the rounds must be: per yield each row's tokens; and the statistics, counted from the plan."""
    lead = [next((i for i, ok in enumerate(p) if not ok), k) for p in plan]
    produced = [1] * len(want)
    done = [n <= 1 or w[0] in stops for w in want]
    rounds, live, accepted_at = [[w[:1] for w in want]], 0, [0] * k
    while not all(done):
        a, out = lead[(len(rounds) - 1) % len(plan)], []
        for b, w in enumerate(want):
            if done[b]:
                out.append([])
                continue
            out.append(w[produced[b]: produced[b] + a + 1])
            produced[b] += a + 1
            live += 1
            for i in range(a):
                accepted_at[i] += 1
            done[b] = produced[b] >= n or any(t in stops for t in out[b])
        rounds.append(out)
    rates = [c / live for c in accepted_at]
    stats = dict(rounds=len(rounds) - 1, drafted=live * k, accepted=sum(accepted_at), acceptance_length=1 + sum(rates),
                 acceptance_rate_per_position=rates, acceptance_rate=sum(rates) / k)
    return rounds, stats


def _prefill_passes(prompts) -> int:
    return -(-max(map(len, prompts)) // CHUNK)


def _assert_stats(stats: dict, want: dict, prompts) -> None:
    """The plan's statistics, and forward_passes = the prefill's segments + one verify per round."""
    assert stats.pop("forward_passes") == _prefill_passes(prompts) + want["rounds"]
    assert sorted(stats) == sorted(want)
    for name, value in want.items():
        assert stats[name] == pytest.approx(value), name


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("k,plan", [
    (1, [[True], [False], [True]]),
    (3, [[True, False, True], [True, True, True], [False, True, True], [True, True, False]]),
])
def test_an_oracle_drafter_gives_greedy_tokens_and_the_planned_rounds(model, monkeypatch, fast, k, plan):
    """Every yield equals the plan's outcome over greedy's tokens (the correct prefix of the drafts, then one
    more token; nothing once a row is done), and the statistics are the plan's counts."""
    n = 11
    want = [_greedy(model, p, n + k + 1) for p in PROMPTS]
    oracle = _Oracle(monkeypatch, want, plan, model.config.vocab_size)
    stats: dict = {}
    live: list[tuple[int, int]] = []  # (rounds, forward_passes) as the stats read at each round's yield

    def feed(out):
        oracle.feed(out)
        if "rounds" in stats:
            live.append((stats["rounds"], stats["forward_passes"]))

    rounds = _run(model, PROMPTS, n, k, fast=fast, stats=stats, on_yield=feed)
    expected, want_stats = _plan_outcome(want, plan, n, k)
    assert rounds == _clip(expected, n)
    # the statistics are current at every yield, not only once the rounds are over
    assert live == [(r, _prefill_passes(PROMPTS) + r) for r in range(1, len(expected))]
    _assert_stats(stats, want_stats, PROMPTS)


def test_stop_tokens_inside_the_accepted_drafts_and_rows_that_stop_at_different_rounds(model, monkeypatch):
    """All drafts right, k = 3: row 0 meets its stop token as an accepted draft of the first round (that round
    is emitted whole, nothing after), the other rows go on to max_new_tokens unless they meet it too."""
    n, k = 12, 3
    want = [_greedy(model, p, n + k + 1) for p in PROMPTS]
    i = next(i for i in (2, 3, 1) if want[0][i] not in want[0][:i])  # an accepted draft of row 0's first round
    stop = want[0][i]
    oracle = _Oracle(monkeypatch, want, [[True] * k], model.config.vocab_size)
    stats: dict = {}
    rounds = _run(model, PROMPTS, n, k, stats=stats, stops=[stop], on_yield=oracle.feed)
    expected, want_stats = _plan_outcome(want, [[True] * k], n, k, stops=[stop])
    assert rounds == _clip(expected, n, [stop])
    assert rounds[2][0] == [] and len(rounds) > 3  # row 0 stopped after the first round, the others did not
    _assert_stats(stats, want_stats, PROMPTS)


def test_a_row_stopped_earlier_stays_done_when_another_row_stops_later(model, monkeypatch):
    """Row 0 meets stop A in round 1, another row meets stop B in round 2 while the others go on: row 0 must stay
    done (empty lists) in every later round, as in the plan's outcome; a round's stops add to the done rows."""
    n, k = 12, 3
    want = [_greedy(model, p, n + k + 1) for p in PROMPTS]
    i = next(i for i in (2, 3, 1) if want[0][i] not in want[0][:i])  # an accepted draft of row 0's first round
    stop_a = want[0][i]
    # a token of row b's second round (positions 5..8), new in row b and not row 0's first token
    b, j = next((b, j) for b in (1, 2, 3) for j in range(5, 9)
                if want[b][j] not in want[b][:j] + [want[0][0]] and stop_a not in want[b][:j + 1])
    stops = [stop_a, want[b][j]]
    oracle = _Oracle(monkeypatch, want, [[True] * k], model.config.vocab_size)
    stats: dict = {}
    rounds = _run(model, PROMPTS, n, k, stats=stats, stops=stops, on_yield=oracle.feed)
    expected, want_stats = _plan_outcome(want, [[True] * k], n, k, stops=stops)
    # the scenario: row 0 done after round 1, row b after round 2, some row still live in round 3
    assert expected[1][0] and expected[2][b] and len(expected) > 3 and any(expected[3])
    assert all(r[0] == [] for r in expected[2:]) and all(r[b] == [] for r in expected[3:])
    assert rounds == _clip(expected, n, stops)
    _assert_stats(stats, want_stats, PROMPTS)


def test_one_row_one_round_gives_that_round_s_acceptance_rates(model, monkeypatch):
    """One row, k = 3, max_new_tokens = 3: the prefill's token and one round (draft 1 right, draft 2 wrong:
    2 tokens) finish it, so the per-position rates are that round's own, [1, 0, 0], over one live round."""
    k, prompt = 3, PROMPTS[:1]
    want = [_greedy(model, prompt[0], 2 * k + 2)]
    plan = [[True, False, True]]
    oracle = _Oracle(monkeypatch, want, plan, model.config.vocab_size)
    stats: dict = {}
    rounds = _run(model, prompt, 3, k, stats=stats, on_yield=oracle.feed)
    expected, want_stats = _plan_outcome(want, plan, 3, k)
    assert rounds == _clip(expected, 3) and len(rounds) == 2
    assert want_stats["acceptance_rate_per_position"] == [1.0, 0.0, 0.0]
    _assert_stats(stats, want_stats, prompt)


@pytest.mark.parametrize("n", [1, 2])
def test_a_stop_first_token_or_a_one_token_budget_runs_no_round(model, n):
    """A row done after the prefill's token (max_new_tokens = 1, or that token is a stop) runs no round."""
    first = [_greedy(model, p, 1)[0] for p in PROMPTS]
    stats: dict = {}
    stops = [] if n == 1 else first
    rounds = _run(model, PROMPTS, n, 2, stats=stats, stops=stops)
    assert rounds == [[[t] for t in first]]
    assert stats == {"forward_passes": _prefill_passes(PROMPTS)}


@pytest.mark.parametrize("fast", [True, False])
def test_the_real_drafter_gives_plain_greedy_tokens_for_k_1_and_3(model, fast):
    """No oracle: whatever the random MTP block drafts, the rows' tokens are greedy's (the overshoot past
    max_new_tokens is at most k tokens, and greedy's too)."""
    n = 9
    want = [_greedy(model, p, n + 4) for p in PROMPTS]
    for k in (1, 3):
        rows = _rows(_run(model, PROMPTS, n, k, fast=fast))
        assert all(n <= len(r) <= n + k for r in rows), k
        assert rows == [w[: len(r)] for w, r in zip(want, rows)], k


# ------------------------------------------------------------------ sampling, the whole rule in Python


@torch.no_grad()
def _uncached_draft_logits(model, seq: list[int], drafts: list[int], j: int, prev: list[torch.Tensor]) -> torch.Tensor:
    """Draft j's logits after `seq` (j = 1: the MTP block over the pairs (h0[t], Emb(seq[t+1])); j > 1: those
    pairs then (h_1, Emb(d_1)), ..., (h_{j-1}, Emb(d_{j-1})) at the positions that follow), no cache.
    `prev` holds h_1..h_{j-1} and gets h_j appended."""
    h0 = model.hidden_states(torch.tensor([seq]))[0]  # (n, H)
    hidden = torch.cat([h0[:-1]] + [h[None] for h in prev])  # (n - 1 + j - 1, H)
    nxt = seq[1:] + drafts[: j - 1]
    h = model.mtp.depth(j)(hidden[None], model.backbone.embeddings(torch.tensor([nxt])))[0, -1]  # (H,)
    prev.append(h)
    return model.lm_head(h).double()


def _law(logits: torch.Tensor, sampling: Sampling) -> list[float]:
    return filtered_probs(logits[None].float(), sampling.temperature, sampling.top_k, sampling.top_p)[0].tolist()



@torch.no_grad()
def _sampled_reference(model, prompt, n, k, sampling, u: list[float], stops=()) -> tuple[list[list[int]], list]:
    """One row's yields under speculative sampling, and each emitted token's log-probability, from full forwards."""
    first = icdf(_law(model(torch.tensor([prompt]))[0, -1], sampling), u[0])
    seq, rounds = prompt + [first], [[first]]
    lps = [float(torch.tensor(_law(model(torch.tensor([prompt]))[0, -1], sampling))[first].log())]
    r = 0
    while len(seq) - len(prompt) < n and not any(t in stops for t in rounds[-1]):
        col = u[1 + r * (2 * k + 1): 1 + (r + 1) * (2 * k + 1)]
        drafts, qs, prev = [], [], []
        for j in range(1, k + 1):
            qs.append(_law(_uncached_draft_logits(model, seq, drafts, j, prev), sampling))
            drafts.append(icdf(qs[-1], col[j - 1]))
        logits = model(torch.tensor([seq + drafts]))[0, len(seq) - 1:]  # (k+1, V)
        ps = [_law(row, sampling) for row in logits]
        a = 0
        while a < k and col[k + a] < ps[a][drafts[a]] / qs[a][drafts[a]]:
            a += 1
        if a < k:
            residual = [max(0.0, x - y) for x, y in zip(ps[a], qs[a])]
            extra = icdf(residual if sum(residual) > 0 else ps[a], col[2 * k])
        else:
            extra = icdf(ps[k], col[2 * k])
        out = drafts[:a] + [extra]
        lps += [float(torch.tensor(ps[i][t]).log()) for i, t in enumerate(out)]
        rounds.append(out)
        seq += out
        r += 1
    return rounds, lps


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("k,sampling", [(2, Sampling(1.5)), (1, Sampling(1.2, 12, 0.95)), (3, Sampling(2.0, 0, 0.9))])
def test_sampled_rounds_equal_the_textbook_rule_token_for_token(model, fast, k, sampling):
    """Seeded rows (the engine's streams, row_uniforms) through speculative_rounds against `_sampled_reference`:
    the same yields (rows that finish early emit nothing after), the same log-probabilities, and rounds with
    rejections at several positions and full acceptances among them."""
    n = 8
    u = row_uniforms(5, len(PROMPTS), 1 + n * (2 * k + 1))  # (B, 1 + n(2k+1)) float64
    logprobs = [[] for _ in PROMPTS]
    stats: dict = {}
    rounds = _run(model, PROMPTS, n, k, fast=fast, sampling=sampling, seed=5, logprobs=logprobs, stats=stats)
    refs = [_sampled_reference(model, p, n, k, sampling, u[b].tolist()) for b, p in enumerate(PROMPTS)]
    for b, (ref, lps) in enumerate(refs):
        got = [r[b] for r in rounds]
        ref = [r[0] for r in _clip([[r] for r in ref], n)]
        assert got == ref + [[]] * (len(got) - len(ref)), b
        assert logprobs[b] == pytest.approx(lps[:n], abs=1e-4), b
    lengths = {len(r) for ref, _ in refs for r in ref[1:]}
    assert len(lengths) >= 2  # rounds of different acceptance counts
    assert stats["rounds"] == len(rounds) - 1 == max(len(ref) for ref, _ in refs) - 1


def test_the_drafts_follow_the_documented_mtp_layout(model, monkeypatch):
    """Each round calls the MTP block at depth j = 2..k for draft j, one token at MTP position mtp_start + j - 2,
    then once at depth 1 over the k + 1 verified tokens at mtp_start (the position after the row's kept tokens);
    the prefill's calls (per segment, with rows) come first (docs/inference.md §5). mtp_start is counted
    from the yields: the prompt length plus the tokens emitted after the first."""
    calls = []
    orig = speculative.Drafter.mtp

    def mtp(drafter, *args, **kwargs):  # the call as the real method sees it, its own defaults applied
        call = inspect.signature(orig).bind(drafter, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        calls.append((a["start"].tolist(), tuple(a["next_ids"].shape), a["depth"], a["rows"] is None))
        return orig(drafter, *args, **kwargs)

    monkeypatch.setattr(speculative.Drafter, "mtp", mtp)
    n, k, B = 9, 3, len(PROMPTS)
    grown: list[list[int]] = []  # per round, each row's kept tokens (before the cut at max_new_tokens)
    rounds = _run(model, PROMPTS, n, k, grown=grown)
    segments = -(-max(map(len, PROMPTS)) // CHUNK)
    assert [c[3] for c in calls[:segments]] == [False] * segments
    start, want = [len(p) for p in PROMPTS], []
    assert len(grown) == len(rounds) - 1
    for kept in grown:
        want += [([s + j - 2 for s in start], (B, 1), j, True) for j in range(2, k + 1)]
        want.append((list(start), (B, k + 1), 1, True))
        start = [s + g for s, g in zip(start, kept)]
    assert calls[segments:] == want


def test_a_bf16_model_runs_the_reference_path_in_its_dtype():
    """A bf16 micro model (the reference cached path): the rows' tokens are plain greedy's from bf16 full
    forwards (the drafter's states keep the model's dtype)."""
    model = _micro().to(torch.bfloat16)
    n = 8
    want = [_greedy(model, p, n + 3) for p in PROMPTS]
    rows = _rows(_run(model, PROMPTS, n, 3, fast=False))
    assert rows == [w[: len(r)] for w, r in zip(want, rows)]


# ------------------------------------------------------------------ hooks: constrain, logprobs


def test_constrain_forces_and_cuts_and_the_rows_continue_from_the_forced_tokens(model, monkeypatch):
    """Oracle drafts all right (k = 3), so the first round emits k + 1 tokens per row; the hook forces row 1's
    first token, cuts row 0's first round to 2 tokens (the second forced) and row 2's to 1 without forcing.
    Each row must continue as greedy from its forced sequence; the hook sees every row's tokens in order, and
    nothing of a row that has finished."""
    n, k, V, B = 10, 3, model.config.vocab_size, len(PROMPTS)
    want = [_greedy(model, p, n + k + 1) for p in PROMPTS]
    F, G = (want[1][0] + 5) % V, (want[0][2] + 7) % V
    oracle = _Oracle(monkeypatch, want, [[True] * k], V)
    calls = []

    def constrain(b, tokens):
        calls.append((b, list(tokens)))
        if len(calls) <= B:  # the first tokens
            return 1, F if b == 1 else None
        if len(calls) <= 2 * B:  # the first round
            return {0: (2, G), 2: (1, None)}.get(b, (len(tokens), None))
        return len(tokens), None

    rounds = _run(model, PROMPTS, n, k, constrain=constrain, on_yield=oracle.feed)
    rows = _rows(rounds)
    ref = [want[0][:2] + [G], [F], want[2][:2]] + [w[:1] for w in want[3:]]
    ref = [r + _greedy(model, p + r, n + k) for p, r in zip(PROMPTS, ref)]
    assert rows == [r[: len(row)] for r, row in zip(ref, rows)]
    assert all(len(r) >= n for r in rows)
    assert calls[:B] == [(b, want[b][:1]) for b in range(B)]  # the drawn first tokens, before forcing
    assert calls[B] == (0, want[0][1: k + 2]) and calls[B + 2] == (2, want[2][1: k + 2])
    # a finished row is not told anything: one call per non-empty row of a round (some rows finish early)
    assert any(not row for r in rounds[:-1] for row in r)
    assert len(calls) == sum(1 for r in rounds for row in r if row) and all(tokens for _, tokens in calls)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.0, 5)])
def test_greedy_logprobs_are_the_raw_softmax_of_the_full_forward(model, sampling):
    """Greedy rows with logprobs: each emitted token's log_softmax under the full forward's logits at its
    position (temperature 1, top-k applied when given), prefill token included; the lists are extended (what
    they held before stays)."""
    n, k = 7, 2
    logprobs = [[-7.0] for _ in PROMPTS]
    rows = _rows(_run(model, PROMPTS, n, k, logprobs=logprobs, sampling=sampling))
    for b, (p, row) in enumerate(zip(PROMPTS, rows)):
        with torch.no_grad():
            logits = model(torch.tensor([p + row]))[0, len(p) - 1: -1]  # (len(row), V)
        law = filtered_probs(logits, 1.0, sampling.top_k)
        want = [-7.0] + law.gather(-1, torch.tensor(row)[:, None])[:, 0].log().tolist()
        assert logprobs[b] == pytest.approx(want, abs=1e-4), b


# ------------------------------------------------------------------ the drafter's paths


class _EagerCompile:
    """torch.compile replaced by the identity: records (function, kwargs) of each call."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch, "compile", self)

    def __call__(self, fn, **kwargs):
        self.calls.append(kwargs)
        return fn


@pytest.mark.parametrize("k", [1, 3])
def test_the_compiled_branches_eagerly_give_the_reference_rounds(model, monkeypatch, k):
    """A traceable fast decoder with a `compiled` dict runs the verify and MTP forwards through `_compiled`
    (static shapes: attention over the whole capacity, lengths committed after). With compile the identity,
    the rounds must equal the textbook rule's (sampling: drafts and verify both matter) and plain greedy's; each
    (kind, batch, tokens[, module]) compiles once, as one static graph, and the second call reuses them."""
    fake = _EagerCompile(monkeypatch)
    compiled: dict = {}
    fast = FastDecoder(model, traceable=True)
    n, sampling = 7, Sampling(1.5)
    u = row_uniforms(9, len(PROMPTS), 1 + n * (2 * k + 1))
    rounds = _run(model, PROMPTS, n, k, fast=fast, sampling=sampling, seed=9, compiled=compiled)
    for b, p in enumerate(PROMPTS):
        ref, _ = _sampled_reference(model, p, n, k, sampling, u[b].tolist())
        ref = [r[0] for r in _clip([[r] for r in ref], n)]
        got = [r[b] for r in rounds]
        assert got == ref + [[]] * (len(got) - len(ref)), b
    B = len(PROMPTS)
    keys = {("verify", B, k + 1), ("mtp", B, k + 1, 0)} | ({("mtp", B, 1, 0)} if k > 1 else set())
    assert set(compiled) == keys and len(fake.calls) == len(keys)
    assert all(c["dynamic"] is False and c["fullgraph"] for c in fake.calls)  # static shapes, one graph
    want = [_greedy(model, p, n + k) for p in PROMPTS]
    rows = _rows(_run(model, PROMPTS, n, k, fast=fast, compiled=compiled))
    assert rows == [w[: len(r)] for w, r in zip(want, rows)]
    assert len(fake.calls) == len(keys)  # nothing compiled twice


def test_a_compiled_dict_is_used_only_with_a_traceable_fast_decoder(model, monkeypatch):
    """Without a traceable fast decoder, or without a dict, nothing is compiled (the eager paths run)."""
    fake = _EagerCompile(monkeypatch)
    for fast, compiled in [(FastDecoder(model), {}), (FastDecoder(model, traceable=True), None), (False, {})]:
        rows = _rows(_run(model, PROMPTS, 5, 2, fast=fast, compiled=compiled))
        assert rows == [_greedy(model, p, len(r)) for p, r in zip(PROMPTS, rows)]
        assert fake.calls == [] and not compiled


def test_three_mtp_modules_take_turns_in_every_path(monkeypatch):
    """An MTP block of three modules: depth j runs module (j - 1) % 3. Drafter.verify, then Drafter.mtp at depths
    1..4 on a cache, through the reference path (the model's own `hidden_states` and `mtp.depth(j)`), the eager
    fast decoder and the compiled branch (compile the identity): the same hidden states and logits."""
    _EagerCompile(monkeypatch)
    model = _micro(num_nextn_predict_layers=3)
    gen = torch.Generator().manual_seed(2)
    B, T, V, H = 2, 6, model.config.vocab_size, model.config.hidden_size
    ids = torch.randint(0, V, (B, T), generator=gen)  # (B, T)
    d = torch.randint(0, V, (B, 1), generator=gen)  # (B, 1) a draft
    outs = []
    for fast, compiled in [(None, None), (FastDecoder(model), None), (FastDecoder(model, traceable=True), {})]:
        drafter = Drafter(model, fast, compiled)
        cache = HybridCache(model.config, B, 16, max_rollback=T, include_mtp=True)
        with torch.inference_mode():
            hidden = drafter.verify(cache, ids)  # (B, T, H)
            assert cache.lengths.tolist() == [T] * B
            h = drafter.mtp(cache, torch.zeros(B, dtype=torch.long), hidden[:, :-1], ids[:, 1:])  # (B, T-1, H)
            got = [hidden, h]
            h = h[:, -1:]
            for depth in (2, 3, 4):
                h = drafter.mtp(cache, torch.full((B,), T + depth - 3), h, d, depth=depth)  # (B, 1, H)
                got.append(h)
            got.append(drafter.logits(h))  # (B, 1, V)
        assert [g.shape for g in got] == [(B, T, H), (B, T - 1, H), (B, 1, H), (B, 1, H), (B, 1, H), (B, 1, V)]
        outs.append(got)
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # Drafter.mtp's default depth is 1: module 0, as the uncached MTP forward over the same pairs computes it
    with torch.inference_mode():
        h0 = model.hidden_states(ids)  # (B, T, H)
        ref = model.mtp.depth(1)(h0[:, :-1], model.backbone.embeddings(ids[:, 1:]))  # (B, T-1, H)
    torch.testing.assert_close(outs[0][1], ref, atol=1e-5, rtol=1e-5)


def test_the_reference_logits_are_fp32_for_a_bf16_model(model):
    """The reference path's head on a bf16 model: fp32 logits (the head's product, up to bf16 rounding)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    h = torch.randn(3, model.config.hidden_size, dtype=torch.bfloat16)
    out = Drafter(model, None).logits(h)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (h.float() @ model.lm_head.weight.float().t()), atol=0.1, rtol=0.02)


def test_a_drafter_needs_an_mtp_block_without_mamba_layers():
    with pytest.raises(ValueError, match=r"^num_speculative_tokens > 0 needs a model with an MTP block "
                                         r"\(num_nextn_predict_layers > 0\)$"):
        Drafter(_micro(num_nextn_predict_layers=0), None)
    with pytest.raises(NotImplementedError, match="^MTP blocks with Mamba layers are not supported by the drafter$"):
        Drafter(_micro(mtp_pattern="M*"), None)
