"""The task generators against the distributions their docstrings document (families.py `make`, `_digits`).

Over a few thousand draws from `make` at each difficulty, every drawn quantity lies in its documented range and
every value of a small range (or both ends of a range) is attained; choices documented as even pass a chi-square
test (p > 0.001) against equal weights. Drawn values are read back from the parameters and checked with plain
Python (`len(str(x))` for digit counts, a left-to-right loop for the countdown chain, the running count of a word
story). Boundary rules that a random draw reaches too rarely (a countdown chain of exactly 1000) are checked with
a scripted `rng` whose draws are written out by hand.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from nemotron3 import tasks
from nemotron3.tasks import families


def _chi2_999(dof: int) -> float:
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty: 11.2 for 1 dof, exact 10.83; 40.9 for 17, exact 40.79)."""
    z = 3.0902  # the normal quantile at 0.999
    return dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3


def _chi2_even(counts: Counter, categories) -> float:
    """Pearson's statistic of the observed counts against equal weights over `categories`."""
    total = sum(counts[c] for c in categories)
    expected = total / len(categories)
    return sum((counts[c] - expected) ** 2 / expected for c in categories)


def _assert_even(values, categories):
    counts = Counter(values)
    assert set(counts) == set(categories), counts
    dof = len(categories) - 1
    stat = _chi2_even(counts, categories)
    assert stat < _chi2_999(dof), (stat, counts)


def _draws(family: str, difficulty: int, n: int = 3000) -> list[tuple]:
    rng = random.Random(f"spec/{family}/{difficulty}")
    fam = tasks.FAMILIES[family]
    return [fam.make(rng, difficulty) for _ in range(n)]


def _ndigits(x: int) -> int:
    return len(str(x))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_digits_draws_every_n_digit_number(n):
    rng = random.Random(n)
    values = [families._digits(rng, n) for _ in range(20000)]
    lo, hi = (0, 9) if n == 1 else (10 ** (n - 1), 10**n - 1)
    assert set(values) == set(range(lo, hi + 1))  # every value in range, none outside
    if n == 1:
        _assert_even(values, range(10))


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_add_operands_digit_counts_and_operations(difficulty):
    n = difficulty + 1
    draws = _draws("add", difficulty, 6000 if difficulty == 1 else 3000)
    _assert_even([op for _, op, _ in draws], "+-")
    firsts, seconds, b_digits = [], [], []
    for a, op, b in draws:
        if op == "+":  # a sum keeps the drawn order: the n-digit operand first
            assert _ndigits(a) == n and _ndigits(b) in (n - 1, n)
            firsts.append(a)
            seconds.append(b)
            b_digits.append(_ndigits(b))
        else:  # a difference is written larger first; the larger one has n digits
            assert a >= b and _ndigits(a) == n and _ndigits(b) in (n - 1, n)
    _assert_even(b_digits, (n - 1, n))  # the second operand's digit count, n - 1 or n evenly
    assert any(a < b for a, b in zip(firsts, seconds))  # a sum is not reordered
    lo, hi = 10 ** (n - 1), 10**n - 1
    assert min(firsts) < lo + 0.01 * (hi - lo) and max(firsts) > hi - 0.01 * (hi - lo)  # the whole range is used
    if difficulty == 1:  # small ranges: every value attained
        assert set(firsts) == set(range(10, 100)) and set(seconds) == set(range(0, 100))


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_mul_factors(difficulty):
    draws = _draws("mul", difficulty)
    assert all(_ndigits(a) == difficulty + 1 for a, _ in draws)
    b_range = range(0, 10) if difficulty < 3 else range(10, 100)
    assert {b for _, b in draws} == set(b_range)  # one digit below difficulty 3, two from 3 on
    if difficulty == 1:
        assert {a for a, _ in draws} == set(range(10, 100))


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_modpow_modulus_base_and_exponent(difficulty):
    draws = _draws("modpow", difficulty)
    _assert_even([m for _, _, m in draws], range(3, 11 + 10 * difficulty))
    _assert_even([e for _, e, _ in draws], range(2, 5 + 2 * difficulty))
    assert all(2 <= a <= m - 1 for a, _, m in draws)
    assert any(a == m - 1 for a, _, m in draws if m > 3) and any(a == 2 for a, _, m in draws if m > 3)


@pytest.mark.parametrize("difficulty", [1, 2, 4])
def test_sort_lists(difficulty):
    draws = _draws("sort", difficulty)
    assert {len(p) for p in draws} == {difficulty + 2}
    assert {x for p in draws for x in p} == set(range(100))


def _chain(nums, ops) -> int:
    acc = nums[0]
    for x, op in zip(nums[1:], ops):
        acc = acc + x if op == "+" else acc - x if op == "-" else acc * x
    return acc


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_countdown_numbers_operations_and_targets(difficulty):
    draws = _draws("countdown", difficulty)
    assert {len(nums) for _, nums, _ in draws} == {difficulty + 2}
    assert {len(ops) for _, _, ops in draws} == {difficulty + 1}
    assert {x for _, nums, _ in draws for x in nums} == set(range(1, 13))
    assert all(target == _chain(nums, ops) and 1 <= target <= 999 for target, nums, ops in draws)
    # the operations are drawn evenly, but a kept chain is conditioned on its value: all three occur everywhere
    assert all({ops[i] for _, _, ops in draws} == set("+-*") for i in range(difficulty + 1))
    if difficulty == 1:
        assert min(t for t, _, _ in draws) == 1


class _Scripted:
    """An rng whose `randint` and `choice` return written-out values in order (and fail when they run out)."""

    def __init__(self, ints, choices):
        self.ints, self.choices = list(ints), list(choices)

    def randint(self, lo, hi):
        v = self.ints.pop(0)
        assert lo <= v <= hi, (lo, v, hi)
        return v

    def choice(self, seq):
        v = self.choices.pop(0)
        assert v in seq
        return v


def test_countdown_redraws_chains_outside_1_to_999():
    cd = tasks.FAMILIES["countdown"]
    # difficulty 1: three numbers, then two operations per try; 10*10*10 = 1000 and 3-2-1 = 0 are redrawn
    rng = _Scripted([10, 10, 10, 3, 2, 1, 1, 1, 1], ["*", "*", "-", "-", "*", "*"])
    assert cd.make(rng, 1) == (1, (1, 1, 1), ("*", "*"))
    assert cd.make(_Scripted([9, 12, 9], ["*", "+"]), 1) == (117, (9, 12, 9), ("*", "+"))
    # difficulty 2: four numbers; 12*12*7-9 = 999 is kept
    assert cd.make(_Scripted([12, 12, 7, 9], ["*", "*", "-"]), 2) == (999, (12, 12, 7, 9), ("*", "*", "-"))


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_word_stories(difficulty):
    top = 10 * difficulty
    draws = _draws("word", difficulty, 4000)
    starts, kinds, packs, sizes, gives, finds, friends = [], [], [], [], [], [], []
    seen_at = Counter()  # how often each count is met before a step
    give_at, share_at = set(), set()
    for name, other, item, start, steps in draws:
        assert name in families.Word.NAMES and other in families.Word.NAMES and name != other
        assert item in families.Word.ITEMS
        assert len(steps) == difficulty + 1
        starts.append(start)
        value = start
        for kind, args in steps:
            seen_at[value] += 1
            kinds.append(kind)
            if kind == 0:
                packs.append(args[0])
                sizes.append(args[1])
                value += args[0] * args[1]
            elif kind == 1:
                assert 1 <= args[0] <= value - 1
                gives.append((value, args[0]))
                give_at.add(value)
                value -= args[0]
            elif kind == 2:
                finds.append(args[0])
                value += args[0]
            else:
                (a,) = args
                assert 1 <= a <= 4 and value % (a + 1) == 0
                friends.append(a)
                share_at.add(value)
                value //= a + 1
    assert set(starts) == set(range(1, top + 1))
    assert set(kinds) == {0, 1, 2, 3}
    assert set(packs) == {2, 3, 4, 5} and set(sizes) == set(range(2, top + 1)) and set(finds) == set(range(1, top + 1))
    assert set(friends) == {1, 2, 3, 4}
    assert any(amount == value - 1 for value, amount in gives) and any(amount == 1 for _, amount in gives)
    assert {n for d in draws for n in d[:2]} == set(families.Word.NAMES) and {d[2] for d in draws} == set(
        families.Word.ITEMS)
    # a step may apply exactly when its rule says: for every count met often, give iff count > 1, share iff some
    # a in 1..4 has a + 1 dividing it
    for value, times in seen_at.items():
        if times >= 60:
            assert (value in give_at) == (value > 1), value
            assert (value in share_at) == any(value % (a + 1) == 0 for a in range(1, 5)), value
