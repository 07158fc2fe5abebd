"""Thinking budget: `</think>` is forced at the right token, in batched, sampled and speculative generation.

The reference is the unbudgeted generation of the same call (same seed): up to the forced position the
budgeted output must be identical to it, and the position is computed here from that free output by the
rule of engine/thinking.py, written out independently: count the tokens after an open `<think>`; from the
N-th on, the first newline token closes the line, else the window ends at N + ceil(grace·N); the next
token is `</think>`.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_

import nemotron3
from nemotron3.engine.thinking import ThinkingBudget, ThinkTokens

pytestmark = pytest.mark.usefixtures("one_thread")

THINK, END = 5, 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")).eval()
    randomize_(m, 4)
    return m


def forced_at(free: list[int], budget: int, grace: float, newlines: set[int]) -> int | None:
    """Index in `free` (the tokens after a prompt ending in <think>) that the budget replaces by </think>."""
    window = math.ceil(grace * budget)
    if budget == 0:
        return 0
    count = 0
    for i, t in enumerate(free):
        if t == END:
            return None  # closed by the model itself first
        count += 1
        if count >= budget and (t in newlines or count >= budget + window):
            return i + 1 if i + 1 < len(free) else None
    return None


PROMPTS = [[1, 40, 41, 42, THINK], [1, 50, THINK], [1, 60, 61, 62, 63, 64, 65, THINK]]


@pytest.mark.parametrize("mode", ["greedy", "sampled", "speculative greedy", "speculative sampled"])
def test_the_budget_forces_the_end_of_thinking_at_the_right_token(model, mode):
    kw = dict(stop_token_ids=[], seed=3)
    if "sampled" in mode:
        kw.update(temperature=0.9, top_k=50)
    if "speculative" in mode:
        kw.update(num_speculative_tokens=3)
    n = 40
    free = nemotron3.Engine(model).generate(PROMPTS, n, **kw).tokens
    # a newline set that contains a token row 1 emits right after its budget, and nothing else it emits
    budgets = [0, 6, 12]
    newline = free[1][7]
    newlines = {newline} | {t for t in range(200, 210) if all(t not in f for f in free)}
    engine = nemotron3.Engine(model, think_tokens=ThinkTokens(THINK, END, frozenset(newlines)))
    out = engine.generate(PROMPTS, n, max_thinking_tokens=budgets, thinking_grace=0.5, **kw)
    # row 1 (budget 6, window 3) meets the newline at its 8th thinking token, before its window ends
    assert forced_at(free[1], 6, 0.5, newlines) == 8 != forced_at(free[1], 6, 0.5, set())
    for row, (f, o, b) in enumerate(zip(free, out.tokens, budgets)):
        at = forced_at(f, b, 0.5, newlines)
        assert at is not None, row
        assert o[:at] == f[:at] and o[at] == END, (row, at, f[: at + 1], o[: at + 1])
        assert END not in o[:at]
    assert out.stats["thinking_forced"] == [1, 1, 1]
    if mode == "greedy":  # after the forced token, the row goes on as the model would from there
        for p, o in zip(PROMPTS, out.tokens):
            at = o.index(END)
            rest = nemotron3.Engine(model).generate([p + o[: at + 1]], n - at - 1, stop_token_ids=[]).tokens[0]
            assert o[at + 1 :] == rest


def test_budget_state_machine_counts_each_open_think_afresh():
    budget = ThinkingBudget(ThinkTokens(THINK, END, frozenset({9})), [2], [[1, 2]], grace=1.0)
    assert budget(0, [7, 7, 7]) == (3, None)  # not inside: nothing counted
    assert budget(0, [THINK, 7, 7, 7]) == (4, None)  # 3 inside: the window (2) runs to 4
    assert budget(0, [8]) == (1, None)  # the 4th: the window ends, so the next token is forced
    assert budget(0, [8]) == (1, END)
    assert budget(0, [THINK, 8, 9, 8]) == (4, END)  # a newline at the budget: the next token is forced
    assert budget(0, [8, 8]) == (2, None)  # closed: nothing counted
    assert budget.forced == [2]
    zero = ThinkingBudget(ThinkTokens(THINK, END), [0], [[1, THINK]])
    assert zero(0, [7, 7]) == (1, END)  # N = 0 closes the reasoning with the first token


def test_bad_budgets_are_refused(model):
    engine = nemotron3.Engine(model)
    with pytest.raises(ValueError, match=">= 0"):
        engine.generate([[1, THINK]], 4, max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="budgets for"):
        engine.generate([[1, THINK]], 4, max_thinking_tokens=[3, 4])
