"""Several environments in one run (envs/mix.py): --env specs and their one-line errors, the per-batch mix by
weight (exact expected shares, deterministic in seed and step), the per-environment metrics."""

from __future__ import annotations

import collections
import math

import pytest

from nemotron3.envs import EnvMix, EnvSpec, LookupEnv, TaskEnv, env_metrics, is_known, parse_env_specs
from nemotron3.envs.mix import allocate
from nemotron3.rl.prompts import TaskPrompts


def test_specs():
    assert parse_env_specs(["tasks", "tools:0.5"], is_known) == [EnvSpec("tasks", 1.0), EnvSpec("tools", 0.5)]
    assert parse_env_specs(["add:2", "verifiers:gsm8k", "verifiers:x:0.25"], is_known) == [
        EnvSpec("add", 2.0), EnvSpec("verifiers:gsm8k", 1.0), EnvSpec("verifiers:x", 0.25)]


@pytest.mark.parametrize("specs, words", [
    (["tools:0"], "--env tools:0: the weight must be a finite number > 0, got 0"),
    (["tasks", "tools:-1"], "--env tools:-1: the weight must be a finite number > 0, got -1"),
    (["tools:nan"], "--env tools:nan: the weight must be a finite number > 0"),
    (["tools:inf"], "--env tools:inf: the weight must be a finite number > 0"),
    (["tools:1e-400"], "--env tools:1e-400: the weight must be a finite number > 0"),  # reads as 0
    (["tools:abc"], "--env tools:abc: the weight 'abc' is not a number"),
    (["tasks", "toolz:2"], "--env toolz:2: unknown environment 'toolz'"),
    (["chess"], "--env chess: unknown environment 'chess'"),
    (["tasks", "tasks:2"], "--env tasks:2: environment 'tasks' is given twice"),
    (["tools:1e308", "tasks:1e308"], "the weights sum to inf"),
    ([], "--env: no environment given"),
])
def test_spec_errors_are_one_line_naming_the_culprit(specs, words):
    with pytest.raises(ValueError) as e:
        parse_env_specs(specs, is_known)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_allocation_is_exact_in_expectation_and_never_off_by_a_prompt():
    weights, n = [1.0, 0.5, 0.25], 8  # shares 4.57, 2.29, 1.14
    shares = [n * w / sum(weights) for w in weights]
    totals = [0] * 3
    steps = 4000
    for step in range(steps):
        counts = allocate(weights, n, seed=3, step=step)
        assert sum(counts) == n
        assert all(math.floor(s) <= c <= math.ceil(s) for c, s in zip(counts, shares))
        totals = [t + c for t, c in zip(totals, counts)]
    for t, s in zip(totals, shares):  # mean within 4 standard errors (a count's std is at most 1/2)
        assert abs(t / steps - s) < 4 * 0.5 / math.sqrt(steps)
    assert allocate(weights, n, 3, 11) == allocate(weights, n, 3, 11)
    assert allocate([1.0, 1.0], 8, 0, 0) == [4, 4]


def test_mix_is_deterministic_and_tasks_alone_draws_the_runs_prompts():
    mix = EnvMix([TaskEnv(), LookupEnv()], [1.0, 0.5], seed=2)
    a, b = mix.batch(5, 9), mix.batch(5, 9)
    assert [(e.name, x.messages, x.columns) for e, x in a] == [(e.name, x.messages, x.columns) for e, x in b]
    assert collections.Counter(e.name for e, _ in a) == {"tasks": 6, "tools": 3}
    only = EnvMix([TaskEnv()], [1.0], seed=2).batch(5, 8)
    want = TaskPrompts(seed=2).batch(5, 8)
    assert [(x.messages, x.columns) for _, x in only] == [(r.messages, r.columns) for r in want]


def test_metrics():
    c = collections.Counter
    m = env_metrics(["tasks", "tools", "tools", "tasks"], [1.0, 0.0, 1.0, math.nan], [1.0, 0.0, 1.0, 0.0],
                    [1, 3, 4, 1], [c(), c(valid=3, invalid=1, malformed=1), c(valid=2, timeout=1), c()])
    assert m["env/tasks/reward"] == 1.0 and m["env/tasks/accuracy"] == 0.5 and m["env/tasks/turns"] == 1.0
    assert m["env/tools/reward"] == 0.5 and m["env/tools/turns"] == 3.5 and m["env/tools/episodes"] == 2.0
    assert m["env/tools/tool_calls/valid_fraction"] == 5 / 6 and "env/tasks/tool_calls/valid_fraction" not in m
    assert m["tool_calls/valid_fraction"] == 5 / 6 and m["tool_calls/total"] == 6.0
    assert m["tool_calls/malformed"] == 1.0 and m["tool_calls/timeout"] == 1.0 and m["tool_calls/exception"] == 0.0
    assert math.isnan(env_metrics(["tasks"], [1.0], [1.0], [1], [c()])["tool_calls/valid_fraction"])
