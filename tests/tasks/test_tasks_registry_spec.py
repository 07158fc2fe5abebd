"""`generate` and `mixture` against their docstrings: the documented defaults (seed 0, the train split, difficulty 1),
even spreading over the families, a seeded interleaving, the give-up rule (200·n + 1000 draws), and the whole text
of every error a caller can get (unknown family, split or difficulty, too few problems, mismatched reward lists,
a completion that is neither text nor messages).

References: explicit-argument calls for the defaults; `generate` per family for what a mixture holds; a stub family
that counts its draws; Pearson's chi-square against equal weights; the messages written out by hand.
"""

from __future__ import annotations

from collections import Counter

import pytest

from nemotron3 import tasks
from nemotron3.tasks import registry
from nemotron3.tasks.families import Family, Problem

FAMILIES = sorted(tasks.FAMILIES)
DEFAULT = tasks.default_families()  # what a mixture spreads over unless named: all but the long-context retrieval


def _prompts(problems) -> list[str]:
    return [p.prompt for p in problems]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_defaults_are_seed_0_train_difficulty_1(family):
    default = tasks.generate(family, 15)
    assert default == tasks.generate(family, 15, seed=0, split="train", difficulty=1)
    assert _prompts(default) != _prompts(tasks.generate(family, 15, seed=1))
    assert _prompts(default) != _prompts(tasks.generate(family, 15, difficulty=2))
    assert all(tasks.split_of(tasks.FAMILIES[family].key(tasks.family_of(p)[1])) == "train"
               for p in _prompts(default) if family != "countdown")


def test_mixture_defaults_and_seeds():
    default = tasks.mixture(14)
    assert default == tasks.mixture(14, seed=0, split="train", difficulty=1, families=None)
    assert default == tasks.mixture(14)  # the interleaving is seeded too: the same order every call
    assert sorted(_prompts(default)) != sorted(_prompts(tasks.mixture(14, seed=1)))  # other problems, not a reorder
    assert sorted(_prompts(default)) != sorted(_prompts(tasks.mixture(14, difficulty=2)))


@pytest.mark.parametrize("n", [1, 7, 13, 600])
def test_mixture_spreads_n_problems_evenly_over_the_families(n):
    probs = tasks.mixture(n, seed=3)
    counts = Counter(p.family for p in probs)
    assert len(probs) == n and sum(counts.values()) == n
    assert DEFAULT == ["add", "countdown", "modpow", "mul", "sort", "word"] and "retrieval" not in counts
    assert all(counts[f] in (n // 6, n // 6 + 1) for f in DEFAULT)  # as even as n allows
    if n == 600:
        expected = n / len(DEFAULT)
        assert sum((counts[f] - expected) ** 2 / expected for f in DEFAULT) < 20.52  # chi-square, 5 dof, p=.001


def test_mixture_holds_the_families_problems_in_a_seeded_interleaving():
    mixed = tasks.mixture(12, seed=3, split="heldout", difficulty=2)
    parts = [p for f in DEFAULT for p in tasks.generate(f, 2, 3, "heldout", 2)]
    assert sorted(_prompts(mixed)) == sorted(_prompts(parts))
    assert _prompts(mixed) != _prompts(parts)  # interleaved, not family after family
    assert _prompts(tasks.mixture(12, seed=4, split="heldout", difficulty=2)) != _prompts(mixed)
    two = tasks.mixture(5, seed=3, families=["mul", "add"])
    assert Counter(p.family for p in two) == {"add": 3, "mul": 2}  # sorted names: the first gets the extra one


def _message(exc, fn, *args, **kwargs) -> str:
    with pytest.raises(exc) as e:
        fn(*args, **kwargs)
    return str(e.value)


def test_generate_errors_in_full():
    assert _message(ValueError, tasks.generate, "nope", 3) == (
        "unknown task family 'nope'; expected one of ['add', 'countdown', 'modpow', 'mul', 'retrieval', 'sort', "
        "'word']")
    assert _message(ValueError, tasks.generate, "add", 3, split="test") == (
        "split must be 'train' or 'heldout', got 'test'")
    assert _message(ValueError, tasks.generate, "add", 3, difficulty=0) == "difficulty must be >= 1, got 0"


class _Stub(Family):
    """Always the same problem; counts how often it was drawn."""

    name = "stub"

    def __init__(self, key: str) -> None:
        self.k, self.calls = key, 0

    def make(self, rng, difficulty):
        self.calls += 1
        return (self.k,)

    def key(self, params):
        return params[0]

    def problem(self, params):
        return Problem(self.name, "p", "t", "a")


def _key_in(split: str) -> str:
    return next(k for k in (f"stub:{i}" for i in range(1000)) if tasks.split_of(k) == split)


def test_generate_gives_up_after_200n_plus_1000_draws(monkeypatch):
    held = _Stub(_key_in("heldout"))
    monkeypatch.setitem(registry.FAMILIES, "stub", held)
    assert len(tasks.generate("stub", 1, split="heldout")) == 1 and held.calls == 1
    held.calls = 0
    msg = _message(ValueError, tasks.generate, "stub", 2, split="heldout", difficulty=3)
    assert msg == ("stub: could not find 2 distinct heldout problems at difficulty 3; ask for fewer (or a higher "
                   "difficulty, which has more)")
    assert held.calls == 200 * 2 + 1000  # one new problem, then only duplicates until the budget is spent
    only_heldout = _Stub(_key_in("heldout"))
    monkeypatch.setitem(registry.FAMILIES, "stub", only_heldout)
    assert _message(ValueError, tasks.generate, "stub", 1).startswith("stub: could not find 1 distinct train problems")
    assert only_heldout.calls == 200 * 1 + 1000
    train = _Stub(_key_in("train"))
    monkeypatch.setitem(registry.FAMILIES, "stub", train)
    assert len(tasks.generate("stub", 5)) == 5 and train.calls == 5  # train keeps duplicates


def test_reward_input_errors_in_full():
    p = "What is 2 + 3?"
    assert _message(ValueError, tasks.reward, [p, p], ["5"]) == "2 prompts but 1 completions"
    assert _message(TypeError, tasks.reward, [p], [5]) == "expected a string or a list of chat messages, got int"
    for bad in ([], [1, 2], ["5"]):  # an empty list, a list of non-messages
        assert _message(TypeError, tasks.reward, [p], [bad]) == "expected a string or a list of chat messages, got list"
    assert tasks.reward([p], [[{"role": "assistant", "content": "5"}]]) == [1.0]


def test_the_problem_is_the_last_user_message():
    p, q = "What is 2 + 3?", "What is 4 + 4?"
    conv = [{"role": "system", "content": q}, {"role": "user", "content": p}, {"role": "assistant", "content": q}]
    assert registry._prompt_text(conv) == p
    assert registry._prompt_text(["not a message", {"role": "user", "content": q}, {"role": "system"}]) == q
    assert registry._prompt_text([{"role": "system", "content": p}]) == ""
    assert tasks.family_reward("add")([conv], ["5"]) == [1.0] and tasks.family_reward("add")([conv], ["8"]) == [0.0]
