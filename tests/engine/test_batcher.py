"""The continuous batcher: requests that join and leave a running batch get exactly `Engine.generate`'s tokens.

Every check runs the scheduler by hand (`step()` until idle), with requests submitted between steps, so the
batch composition changes while rows decode: prompts of different lengths, chunked prefill under a small
token budget, different sampling settings per row, speculative rounds, cancellations and a full cache.
The reference is `Engine.generate` on each prompt alone (a fixed batch, one prefill, no scheduler).
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.params import SamplingParams
from nemotron3.engine.sampling import row_stream, row_uniforms
from nemotron3.engine.scheduler import Event
from nemotron3.engine.scheduler import Request as _Request
from nemotron3.engine.scheduler import Scheduler as Batcher
from nemotron3.engine.thinking import ThinkTokens

pytestmark = pytest.mark.usefixtures("one_thread")


def Request(prompt, max_new_tokens, stream_index=0, **kw):
    """The scheduler's Request with its SamplingParams built from the old keyword form."""
    return _Request(prompt, SamplingParams(max_tokens=max_new_tokens, **kw), stream_index)


def _model(mtp: bool) -> nemotron3.HybridLM:
    """The tiny preset (its MTP block kept or dropped), every tensor random."""
    torch.manual_seed(0)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(
        vocab_size=256, num_nextn_predict_layers=1 if mtp else 0)).eval()
    randomize_(model, 0)
    return model


@pytest.fixture(scope="module")
def plain():
    return _model(mtp=False)


@pytest.fixture(scope="module")
def mtp():
    return _model(mtp=True)


PROMPTS = [list(range(3, 80)), [5, 6, 7], list(range(100, 121)), [9] * 40, [200, 3, 17, 4]]
SETTINGS = [dict(), dict(temperature=0.8, seed=3), dict(temperature=1.0, top_k=20, seed=5),
            dict(temperature=0.7, top_p=0.9, seed=7), dict(temperature=1.2, top_k=8, top_p=0.8, seed=11)]


class Collect:
    """on_event for one request: its tokens, logprobs, events and the step each event came at."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.tokens, self.logprobs, self.events, self.steps = batcher, [], [], [], []

    def __call__(self, ev: Event) -> None:
        self.events.append(ev)
        self.steps.append(self.batcher.steps)
        self.tokens += ev.tokens
        self.logprobs += ev.logprobs or []

    @property
    def finish(self) -> str | None:
        return self.events[-1].finish if self.events else None


def run(batcher: Batcher, schedule: dict[int, list[tuple[Request, Collect]]], max_steps: int = 2000) -> None:
    """Submit schedule[s] before step s; step until nothing is left."""
    for s in range(max_steps):
        for req, sink in schedule.get(s, []):
            batcher.submit(req, sink)
        if s > max(schedule) and batcher.idle():
            return
        batcher.step()
    raise AssertionError("the batcher did not finish")


def _reference(model, prompt, new, k=0, stops=(), **kw) -> list[int]:
    engine = nemotron3.Engine(model)
    return engine.generate([prompt], new, stop_token_ids=list(stops), num_speculative_tokens=k, **kw).tokens[0]


def test_row_stream_is_one_row_of_row_uniforms():
    # exact by construction: the same Philox stream, no arithmetic
    assert torch.equal(row_stream(42, 3, 50), row_uniforms(42, 5, 50)[3])


@pytest.mark.parametrize("k", [0, 2])
def test_requests_joining_a_running_batch_get_the_engines_tokens(plain, mtp, k):
    """Five prompts (3 to 77 tokens), greedy and four sampling settings, submitted at steps 0, 0, 3, 5, 9 into a
    3-slot cache with a 24-token step budget: prompts are prefilled in chunks while others decode, one waits
    for a free slot, and every row equals Engine.generate on its prompt alone with the same seed."""
    model = mtp if k else plain
    batcher = Batcher(model, rows=3, max_seq_len=256, token_budget=24, min_prefill_tokens=8, num_speculative_tokens=k)
    at = [0, 0, 3, 5, 9]
    lengths = [14, 20, 9, 17, 12]
    sinks = [Collect(batcher) for _ in PROMPTS]
    schedule: dict[int, list] = {}
    for p, kw, s, n, sink in zip(PROMPTS, SETTINGS, at, lengths, sinks):
        schedule.setdefault(s, []).append((Request(p, n, stop_token_ids=frozenset(), **kw), sink))
    run(batcher, schedule)
    for p, kw, n, sink in zip(PROMPTS, SETTINGS, lengths, sinks):
        assert sink.tokens == _reference(model, p, n, k, **kw), (p[:3], kw)
        assert sink.finish == "length"
    assert batcher.running == 0 and batcher.n_decoding == 0 and not any(batcher.cache.in_use)
    if k:
        assert batcher.stats["rounds"] > 0 and 0 <= batcher.stats["accepted"] <= batcher.stats["drafted"]


def test_choice_i_of_n_is_row_i_of_the_engine(plain):
    batcher = Batcher(plain, rows=4, max_seq_len=128)
    sinks = [Collect(batcher) for _ in range(3)]
    prompt = [4, 8, 15, 16, 23, 42]
    run(batcher, {0: [(Request(prompt, 10, temperature=1.0, seed=9, stream_index=i, stop_token_ids=frozenset()),
                       sinks[i]) for i in range(3)]})
    want = nemotron3.Engine(plain).generate([prompt] * 3, 10, temperature=1.0, seed=9, stop_token_ids=[]).tokens
    assert [s.tokens for s in sinks] == want
    assert len({tuple(t) for t in want}) == 3  # the choices differ: independent streams


def test_a_long_prompt_is_prefilled_in_chunks_without_stalling_the_streams(plain):
    """With a 16-token budget, a 200-token prompt takes many steps; the row already decoding gets a token at
    every one of them."""
    batcher = Batcher(plain, rows=2, max_seq_len=512, token_budget=16, min_prefill_tokens=8)
    short, long = Collect(batcher), Collect(batcher)
    run(batcher, {0: [(Request([1, 2, 3], 40, stop_token_ids=frozenset()), short)],
                  2: [(Request(list(range(5, 205)), 5, stop_token_ids=frozenset()), long)]})
    first_long = long.steps[0]
    assert first_long - 2 >= 200 // 16 - 1  # prefilled over many steps
    during = [s for s in short.steps if 2 <= s <= first_long]
    assert during == list(range(2, first_long + 1))  # one token per step meanwhile
    assert long.tokens == _reference(plain, list(range(5, 205)), 5)


def test_stop_tokens_and_cancellation_free_the_slot(plain):
    batcher = Batcher(plain, rows=1, max_seq_len=128)
    free_run = _reference(plain, [7, 7, 7], 20)
    stopper, cancelled, waiting = Collect(batcher), Collect(batcher), Collect(batcher)
    h = None
    batcher.submit(Request([7, 7, 7], 20, stop_token_ids=frozenset([free_run[4]])), stopper)
    while not batcher.idle():
        batcher.step()
    assert stopper.tokens == free_run[: free_run.index(free_run[4]) + 1] and stopper.finish == "stop"
    h = batcher.submit(Request([7, 7, 7], 50, stop_token_ids=frozenset()), cancelled)
    batcher.submit(Request([7, 7, 7], 6, stop_token_ids=frozenset()), waiting)
    for _ in range(4):
        batcher.step()
    assert batcher.running == 1 and len(batcher.waiting) == 1 and len(cancelled.tokens) == 4
    batcher.cancel(h)
    batcher.step()  # the cancellation frees the slot and the waiting request takes it in the same step
    assert cancelled.finish == "cancelled" and len(cancelled.tokens) == 4
    assert not batcher.waiting and batcher.running == 1
    while not batcher.idle():
        batcher.step()
    assert waiting.tokens == free_run[:6] and waiting.finish == "length"


def test_logprobs_are_the_full_forwards_log_softmax(mtp):
    """With speculation the verify logits give every emitted token's log-probability; the reference is the
    full forward over prompt + output (no cache)."""
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for k in (0, 2):
        batcher = Batcher(mtp, rows=2, max_seq_len=128, num_speculative_tokens=k)
        sink = Collect(batcher)
        run(batcher, {0: [(Request(prompt, 8, temperature=0.9, seed=1, stop_token_ids=frozenset(), logprobs=3),
                           sink)]})
        with torch.no_grad():
            logits = mtp(torch.tensor([prompt + sink.tokens]))[0, len(prompt) - 1 : -1]
        lp = torch.log_softmax(logits.double(), -1)
        want = lp[torch.arange(8), torch.tensor(sink.tokens)]
        assert torch.allclose(torch.tensor(sink.logprobs, dtype=torch.float64), want, atol=1e-4), k
        tops = [t for ev in sink.events for t in ev.top_logprobs]
        assert [[i for i, _ in t] for t in tops] == lp.topk(3, -1).indices.tolist()


def test_thinking_budget_matches_the_engine(plain):
    ids = ThinkTokens(start=5, end=6)
    prompt = [3, 5]  # ends inside <think>
    batcher = Batcher(plain, rows=2, max_seq_len=128, think_tokens=ids)
    sink = Collect(batcher)
    run(batcher, {0: [(Request(prompt, 12, max_thinking_tokens=4, stop_token_ids=frozenset()), sink)]})
    want = nemotron3.Engine(plain, think_tokens=ids).generate([prompt], 12, max_thinking_tokens=4,
                                                             stop_token_ids=[]).tokens[0]
    assert sink.tokens == want and 6 in want


def test_bad_requests_are_refused_before_queueing(plain):
    batcher = Batcher(plain, rows=1, max_seq_len=64)
    for req, words in [(lambda: Request([], 4), "empty"), (lambda: Request([1, 999], 4), "vocabulary"),
                       (lambda: Request([1], 0), "max_new_tokens"),
                       (lambda: Request([1] * 60, 10), "more than a slot holds"),
                       (lambda: Request([1], 4, temperature=-1), "temperature")]:
        with pytest.raises(ValueError, match=words):
            batcher.submit(req(), lambda ev: None)
    assert batcher.idle()


def test_a_short_chunk_near_the_end_of_a_slot_padded_to_a_wide_one(plain):
    """A row 40 tokens into a 64-token slot finishes its prompt with 5 tokens in the same forward as a new row's
    35-token chunk: its padding reaches past the slot, which the cache has room for."""
    batcher = Batcher(plain, rows=2, max_seq_len=64, token_budget=40)
    a, b = Collect(batcher), Collect(batcher)
    pa, pb = list(range(10, 55)), list(range(60, 100))
    run(batcher, {0: [(Request(pa, 19, stop_token_ids=frozenset()), a)],
                  1: [(Request(pb, 4, stop_token_ids=frozenset()), b)]})
    assert a.tokens == _reference(plain, pa, 19) and b.tokens == _reference(plain, pb, 4)


def test_swap_rows_and_prefix_views(mtp):
    """swap_rows exchanges every state, history slot, length and slot flag of two rows (sequence states up to the
    longer length); a prefix is a view: writing through it changes the cache, rows past it untouched."""
    from nemotron3.engine.cache import HybridCache

    cache = HybridCache(mtp.config, 3, 32, max_rollback=2)
    g = torch.Generator().manual_seed(0)
    for d in (*cache.states, *cache.history):
        for t in d.values():
            t.copy_(torch.randn(t.shape, generator=g))
    cache.lengths.copy_(torch.tensor([5, 9, 2]))
    cache.in_use[:] = [True, False, True]
    before = [{k: v.clone() for k, v in d.items()} for d in (*cache.states, *cache.history)]
    cache.swap_rows(0, 2)
    for i, d in enumerate((*cache.states, *cache.history)):
        hist = i >= len(cache.states)
        for name, t in d.items():
            old = before[i][name]
            row = (lambda x, r: x[:, r]) if hist else (lambda x, r: x[r])
            seq = not hist and cache.specs[i][name].kind == "sequence"
            cut = (lambda x: x[:, :5]) if seq else (lambda x: x)  # up to the longer length, 5
            assert torch.equal(cut(row(t, 0)), cut(row(old, 2))) and torch.equal(cut(row(t, 2)), cut(row(old, 0)))
            assert torch.equal(row(t, 1), row(old, 1))
    assert cache.lengths.tolist() == [2, 9, 5] and cache.in_use == [True, False, True]
    view = cache.prefix(2)
    view.lengths += 1
    name = next(iter(cache.states[0]))
    view.states[0][name].zero_()
    assert cache.lengths.tolist() == [3, 10, 5] and view.rows == 2
    assert not cache.states[0][name][:2].any() and cache.states[0][name][2].any()
