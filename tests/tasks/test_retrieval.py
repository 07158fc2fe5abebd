"""The retrieval family against a plain-Python solver: answers, verification, lengths in tokens, determinism,
splits, the query's position, and its absence from the default mixes (tasks/retrieval.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nemotron3 import tasks
from nemotron3.tasks import retrieval
from nemotron3.tokenizer import Tokenizer


def solve(prompt: str) -> str:
    """The reference: read the lines with str methods only, look the asked key up in a dict."""
    lines = prompt.split("\n")
    table = {}
    for line in lines[1:-1]:
        k, v = line.split(": ")
        assert k not in table, f"duplicate key {k}"
        table[k] = v
    asked = lines[-1].removeprefix("What is the value of ").removesuffix("?")
    return table[asked]


def _query_index(prompt: str) -> tuple[int, int]:
    lines = prompt.split("\n")
    asked = lines[-1].removeprefix("What is the value of ").removesuffix("?")
    keys = [line.split(": ")[0] for line in lines[1:-1]]
    return keys.index(asked), len(keys)


@pytest.mark.parametrize("difficulty", [1, 2, 5])
def test_answers_match_the_solver_and_wrong_values_score_zero(difficulty):
    problems = tasks.generate("retrieval", 50, seed=difficulty, difficulty=difficulty)
    rng = random.Random(0)
    for p in problems:
        assert p.family == "retrieval" and p.answer == solve(p.prompt)
        assert _query_index(p.prompt)[1] == retrieval.PAIRS_PER_LEVEL * difficulty
        assert tasks.reward([p.prompt], [p.completion()]) == [1.0]
        other = next(v for v in (f"{rng.randrange(10**4):04d}" for _ in range(100)) if v != p.answer)
        assert tasks.reward([p.prompt], [f"<think>\n</think>\n{other}"]) == [0.0]
        values = [line.split(": ")[1] for line in p.prompt.split("\n")[1:-1]]
        distractor = next((v for v in values if v != p.answer), None)  # another key's value is wrong
        if distractor is not None:
            assert tasks.reward([p.prompt], [distractor]) == [0.0]


def test_the_prompt_is_recognised_and_malformed_ones_are_not():
    p = tasks.generate("retrieval", 1, seed=0, difficulty=2)[0]
    fam, params = tasks.family_of(p.prompt)
    assert fam is tasks.FAMILIES["retrieval"] and fam.problem(params) == p
    lines = p.prompt.split("\n")
    dup = "\n".join([lines[0], lines[1], lines[1], *lines[2:]])  # a repeated key: ambiguous, not a problem
    missing = "\n".join([*lines[:-1], "What is the value of zzzz?"]) if "zzzz" not in p.prompt else p.prompt + "x"
    for bad in (dup, missing, "\n".join(lines[1:]), p.prompt.replace(": ", "=", 1)):
        assert fam.parse(bad) is None
        assert tasks.reward([bad], [p.completion()]) == [0.0]
    for other in tasks.default_families():  # the six families' prompts stay theirs
        q = tasks.generate(other, 1, seed=0)[0]
        assert fam.parse(q.prompt) is None and tasks.family_of(q.prompt)[0].name == other


def _byte_tokenizer() -> Tokenizer:
    return Tokenizer.train([p.text() for p in tasks.mixture(300, seed=0)]
                           + [p.text() for p in tasks.generate("retrieval", 20, seed=0)], 400)


@pytest.mark.parametrize("length", [1024, 4096, 16384, 65536])
def test_at_length_fills_the_token_budget_with_whole_lines(length):
    tok = _byte_tokenizer()

    def count(text: str) -> int:
        return len(tok.encode(text))

    problems = tasks.generate_at_length(2, length, seed=1, count=count)
    for p in problems:
        n = count(p.prompt)
        longest_line = max(count(line + "\n") for line in p.prompt.split("\n")[1:-1])
        assert length - 2 * longest_line < n <= length  # one more line would not fit (the query may cost a line)
        assert p.answer == solve(p.prompt) and tasks.reward([p.prompt], [p.completion()]) == [1.0]
    bytes_only = tasks.generate_at_length(1, length, seed=1)[0]  # the default counter: characters = bytes
    assert length - 2 * 11 < len(bytes_only.prompt) <= length


def test_at_length_is_deterministic_and_its_splits_are_disjoint():
    a = tasks.generate_at_length(6, 1024, seed=3)
    assert a == tasks.generate_at_length(6, 1024, seed=3)
    assert a[:2] == tasks.generate_at_length(2, 1024, seed=3)  # a prefix: asking for more does not reshuffle
    assert a != tasks.generate_at_length(6, 1024, seed=4)
    fam = tasks.FAMILIES["retrieval"]
    train = tasks.generate_at_length(6, 1024, seed=3, split="train")
    assert all(tasks.split_of(fam.key(fam.parse(p.prompt))) == "heldout" for p in a)
    assert all(tasks.split_of(fam.key(fam.parse(p.prompt))) == "train" for p in train)
    with pytest.raises(ValueError, match="below the shortest prompt"):
        tasks.generate_at_length(1, 20)
    with pytest.raises(ValueError, match="split must be"):
        tasks.generate_at_length(1, 1024, split="test")


@pytest.mark.parametrize("path", ["difficulty", "length"])
def test_the_asked_key_is_anywhere_in_the_list(path):
    """The query's relative position over 400 problems: each quarter of the list about as often (chi-square,
    3 dof, p = 0.001), so the needle is as often at the far start as next to the question."""
    problems = (tasks.generate("retrieval", 400, seed=9, difficulty=4) if path == "difficulty"
                else tasks.generate_at_length(400, 512, seed=9))
    quarters = Counter()
    for p in problems:
        i, n = _query_index(p.prompt)
        quarters[4 * i // n] += 1
    assert sum((quarters[q] - 100) ** 2 / 100 for q in range(4)) < 16.27


def test_keys_are_distinct_and_lines_are_uniform():
    p = tasks.generate_at_length(1, 65536, seed=0)[0]
    keys = [line.split(": ")[0] for line in p.prompt.split("\n")[1:-1]]
    assert len(keys) == len(set(keys)) > 5000
    first_letters = Counter(k[0] for k in keys)
    assert len(first_letters) == 26 and max(first_letters.values()) < 2 * len(keys) / 26


def test_default_mixes_leave_it_out_unless_named():
    assert tasks.FAMILIES["retrieval"].long_context and "retrieval" not in tasks.default_families()
    assert not any(p.family == "retrieval" for p in tasks.mixture(700, seed=0))
    named = tasks.mixture(8, seed=0, families=["retrieval", "add"])
    assert Counter(p.family for p in named) == {"retrieval": 4, "add": 4}
    assert sorted(tasks.default_families() + ["retrieval"]) == sorted(tasks.FAMILIES)
