"""Task families against plain Python: every answer, every trace step and every verifier decision.

`Family.verify` compares an answer with the family's own `solve`, the function that also wrote the reference
answer, so a wrong solver would make wrong training data and reward it. Here every generated problem (hundreds
per family, at every difficulty) is re-derived from its *rendered prompt* by an independent reference: `int`
arithmetic, `pow(a, e, m)`, `sorted`, Python's own evaluation of the countdown expression, and a sentence-by-
sentence reading of the word problem with exact fractions. Each verifier must then accept the reference answer
and reject its near misses (off by one, a digit dropped, a digit or a token added, two numbers swapped).
"""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from nemotron3 import tasks

DIFFICULTIES = [1, 2, 3, 4, 5]
N = 120  # problems per (family, difficulty)


def _problems(family: str, difficulty: int) -> list[tasks.Problem]:
    return tasks.generate(family, N, seed=100 + difficulty, difficulty=difficulty)


def _numbers(prompt: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", prompt)]


def _reference(family: str, prompt: str) -> str | None:
    """The answer from the prompt alone, by plain Python (None for countdown: any route is right)."""
    n = _numbers(prompt)
    if family == "add":
        return str(n[0] + n[1] if " + " in prompt else n[0] - n[1])
    if family == "mul":
        return str(n[0] * n[1])
    if family == "modpow":
        return str(pow(n[0], n[1], n[2]))
    if family == "sort":
        return " ".join(map(str, sorted(n)))
    if family == "word":
        return str(_word_value(prompt))
    return None


def _word_value(prompt: str) -> int:
    """Read the story sentence by sentence with exact fractions: the count must stay a whole number."""
    *story, _question = prompt.split(". ")
    value = Fraction(int(re.fullmatch(r"\w+ has (\d+) \w+", story[0])[1]))
    for s in story[1:]:
        n = _numbers(s)
        if " buys " in s:
            value += n[0] * n[1]
        elif " gives " in s:
            value -= n[0]
        elif " finds " in s:
            value += n[0]
        elif " shares them equally with " in s:
            value /= n[0] + 1  # the friends and the sharer
        else:
            raise AssertionError(f"unknown sentence {s!r}")
        assert value.denominator == 1 and value >= 0, (prompt, s)
    return int(value)


def _countdown_ok(prompt: str, expr: str) -> bool:
    """Python's own evaluation of an expression of digits, + - * and parentheses, and the numbers it uses
    taken from the given ones (each at most once)."""
    target, *given = _numbers(prompt)
    if not expr or not re.fullmatch(r"[\d+\-*() ]+", expr) or re.search(r"\*\*|\d\s+\d", expr):
        return False
    if re.search(r"(^|[(+\-*])\s*[+\-]", expr):  # a unary sign is not one of the allowed operations
        return False
    try:
        value = eval(expr, {"__builtins__": {}})  # only digits, operators and parentheses reach here
    except SyntaxError:
        return False
    return value == target and not Counter(_numbers(expr)) - Counter(given)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("family", ["add", "mul", "modpow", "sort", "word"])
def test_answers_equal_plain_python(family, difficulty):
    for p in _problems(family, difficulty):
        assert p.answer == _reference(family, p.prompt), p.prompt


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_countdown_reference_expressions_reach_the_target_with_the_given_numbers(difficulty):
    for p in _problems("countdown", difficulty):
        assert _countdown_ok(p.prompt, p.answer), (p.prompt, p.answer)
        target = _numbers(p.prompt)[0]
        assert 0 < target < 1000
        steps = [re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", line) for line in p.trace.splitlines()]
        acc = int(steps[0][1])
        for m in steps:  # the trace is a chain: each step starts from the previous result and is right
            assert int(m[1]) == acc
            acc = eval(f"{m[1]}{m[2]}{m[3]}")
            assert int(m[4]) == acc, p.trace
        assert acc == target


def _column_lines(p: tasks.Problem) -> list[re.Match]:
    pat = r"(\d+)([+-])(\d+)[+-](\d)=(\d+) -> (\d+), (carry|borrow) (\d)"
    return [re.fullmatch(pat, line) for line in p.trace.splitlines() if "->" in line and "=" in line]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_add_traces_carry_and_borrow_like_integer_arithmetic(difficulty):
    """Column i's line holds the last i+1 digits of the result and the carry (borrow) out of those digits."""
    for p in _problems("add", difficulty):
        a, b = _numbers(p.prompt)[:2]
        plus = " + " in p.prompt
        lines = _column_lines(p)
        assert len(lines) == len(str(max(a, b)))
        for i, m in enumerate(lines):
            mod = 10 ** (i + 1)
            low = (a % mod + b % mod) if plus else (a % mod - b % mod)
            assert m[6] == str(low % mod).zfill(i + 1), (p.prompt, m[0])
            assert int(m[8]) == (low // mod if plus else int(low < 0)), (p.prompt, m[0])
        tail = p.trace.splitlines()[-1]
        if plus and a + b >= 10 ** len(lines):  # the last carry becomes the leading digit
            assert tail == f"carry 1 -> {a + b}"


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_mul_and_modpow_traces_hold_the_right_partial_results(difficulty):
    for p in _problems("mul", difficulty):
        a, b = _numbers(p.prompt)
        partials = [re.fullmatch(r"(\d+)\*(\d+)=(\d+)", line) for line in p.trace.splitlines()]
        partials = [m for m in partials if m]
        digits = str(b)[::-1]
        assert [int(m[2]) for m in partials] == [int(d) * 10**s for s, d in enumerate(digits)]
        assert all(int(m[3]) == a * int(m[2]) for m in partials), p.trace
        if len(digits) > 1:
            assert p.trace.splitlines()[-1].endswith(f"={a * b}")
    for p in _problems("modpow", difficulty):
        a, e, m = _numbers(p.prompt)
        lines = p.trace.splitlines()
        assert len(lines) == e
        assert [int(line.rsplit("=", 1)[1]) for line in lines] == [pow(a, k, m) for k in range(1, e + 1)]


def test_sort_and_word_traces_follow_the_reference():
    for d in DIFFICULTIES:
        for p in _problems("sort", d):
            nums = _numbers(p.prompt)
            taken = [int(line.split()[1][:-1]) for line in p.trace.splitlines()]
            assert taken == sorted(nums)
        for p in _problems("word", d):
            results = [int(line.rsplit("=", 1)[1]) for line in p.trace.splitlines()]
            assert len(results) == len(p.prompt.split(". ")) - 2  # a line per step sentence
            assert results[-1] == _word_value(p.prompt)


def _near_misses(answer: str) -> list[str]:
    """Wrong answers a model plausibly writes: off by one, a digit dropped or added, a stray token."""
    out = [answer + "0", answer + " 1", "1" + answer, answer[:-1], answer[1:], f"{answer}.", f"{answer} {answer}"]
    if re.fullmatch(r"-?\d+", answer):
        out += [str(int(answer) + 1), str(int(answer) - 1), str(-int(answer)) if int(answer) else "1"]
    else:  # a list of numbers: swap two different neighbours, drop or repeat one
        xs = answer.split()
        for i in range(len(xs) - 1):
            if xs[i] != xs[i + 1]:
                out.append(" ".join(xs[:i] + [xs[i + 1], xs[i]] + xs[i + 2:]))
                break
        out += [" ".join(xs[1:]), " ".join(xs + xs[-1:]), " ".join(xs[:-1] + [str(int(xs[-1]) + 1)])]
    return [x for x in out if x.strip() != answer]


@pytest.mark.parametrize("difficulty", [1, 3, 5])
@pytest.mark.parametrize("family", ["add", "mul", "modpow", "sort", "word"])
def test_verifiers_accept_the_reference_and_reject_near_misses(family, difficulty):
    fam = tasks.FAMILIES[family]
    for p in _problems(family, difficulty)[:60]:
        params = fam.parse(p.prompt)
        ref = _reference(family, p.prompt)
        assert fam.verify(params, ref) and fam.verify(params, f"  {ref} ")
        for wrong in _near_misses(ref):
            assert not fam.verify(params, wrong), (p.prompt, wrong)
        # the RL reward path: the completion's last line after </think>
        assert tasks.reward([p.prompt], [f"<think>\n{ref}\n</think>\n{_near_misses(ref)[0]}"]) == [0.0]
        assert tasks.reward([p.prompt], [f"<think>\nwork\n</think>\n{ref}"]) == [1.0]


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_countdown_verifier_agrees_with_python_on_near_misses(difficulty):
    fam = tasks.FAMILIES["countdown"]
    for p in _problems("countdown", difficulty)[:60]:
        params = fam.parse(p.prompt)
        target, *given = _numbers(p.prompt)
        e = p.answer
        candidates = [e, f"({e})+1", f"({e})-1", f"({e})*1", f"({e})+0", f"{e}{given[0]}", e[:-1], f"({e})*{e}",
                      f"({e})", f"{target}", f"{e}+{given[0]}-{given[0]}", "+".join(map(str, given)),
                      "*".join(map(str, given)), f"-{e}", f"{e} {given[-1]}", ""]
        for c in candidates:
            assert fam.verify(params, c) == _countdown_ok(p.prompt, c), (p.prompt, c)
        assert fam.verify(params, e)


def test_the_sharing_step_divides_by_the_friends_and_the_sharer():
    """A hand-worked story: 12, share with 3 friends (4 shares) -> 3, buy 2 packs of 5 -> 13, give 4 -> 9."""
    prompt = ("Ava has 12 coins. Ava shares them equally with 3 friends and keeps one share. Ava buys 2 packs of "
              "5 coins. Ava gives 4 coins to Ben. Ava finds 7 more coins. How many coins does Ava have now?")
    fam, params = tasks.family_of(prompt)
    assert fam.name == "word" and fam.problem(params).answer == "16" == str(_word_value(prompt))
    steps = ((3, (3,)), (0, (2, 5)), (1, (4,)), (2, (7,)))
    assert params == ("Ava", "", "coins", 12, steps)
    assert fam.render(("Ava", "Ben", "coins", 12, steps)) == prompt  # the exact wording, every template
    assert fam.problem(params).trace.splitlines() == ["12/4=3", "2*5=10, 3+10=13", "13-4=9", "9+7=16"]


def test_carry_borrow_and_product_lines_by_hand():
    fam = tasks.FAMILIES["add"]
    assert fam.verify(fam.parse("What is 7 + 995?"), "1002")  # a prompt whose first operand is the shorter one
    assert fam.problem((7, "+", 995)).trace.splitlines()[-1] == "carry 1 -> 1002"
    mul = tasks.FAMILIES["mul"]
    for p in _problems("mul", 3)[:40] + [mul.problem((478, 7))]:
        a, b = _numbers(p.prompt)
        for m in re.finditer(r"(\d)\*(\d)\+(\d+)=(\d+) -> (\d+), carry (\d+)", p.trace):
            x, y, c, s = (int(m[i]) for i in range(1, 5))
            assert s == x * y + c and int(m[6]) == s // 10, m[0]
        if b < 10:  # one partial product: no sum line
            assert p.trace.splitlines()[-1] == f"{a}*{b}={a * b}"
    assert mul.problem((478, 7)).trace.splitlines() == [
        "8*7+0=56 -> 6, carry 5", "7*7+5=54 -> 46, carry 5", "4*7+5=33 -> 346, carry 3", "478*7=3346"]


def test_sort_trace_lists_what_is_left():
    for p in _problems("sort", 3)[:40]:
        left = _numbers(p.prompt)
        for line, x in zip(p.trace.splitlines(), sorted(left)):
            left.remove(x)  # the first occurrence, as in the prompt's order
            assert line == f"take {x}, left {' '.join(map(str, left)) if left else 'none'}"


def test_countdown_expression_and_word_parse_by_hand():
    cd = tasks.FAMILIES["countdown"].problem((14, (3, 4, 2), ("+", "*")))
    assert cd.answer == "(3+4)*2" and cd.trace.splitlines() == ["3+4=7", "7*2=14"]
    word = tasks.FAMILIES["word"]
    for p in _problems("word", 2)[:30]:
        head = re.match(r"(\w+) has (\d+) (\w+)\. ", p.prompt)
        name, start, item = head[1], int(head[2]), head[3]
        params = word.parse(p.prompt)
        assert params[:4] == (name, "", item, start)
        assert word.key(params) != word.key((*params[:3], start + 1, params[4]))  # the start is part of the problem


def test_split_is_the_documented_hash_rule():
    """blake2b-64 of the key, little-endian, mod 1000 below HELDOUT_PER_MILLE: fixed, so that a held-out problem
    stays held out across versions (a checkpoint is never evaluated on what a later version trained on)."""
    import hashlib

    for i in range(20000):
        key = f"add:+:[{i}, {i % 97}]"
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 1000
        assert tasks.split_of(key) == ("heldout" if h < 100 else "train"), key


def test_answer_extraction_and_message_formats():
    ex = tasks.extract_answer
    assert ex("<think>\na</think>\nb\n</think>\n42") == "42"  # after the last think block
    assert ex("<think>\nx\n</think>\n42<|im_end|>\n7") == "42" and ex("42</s>7</s>") == "42"
    assert ex("\n  \n") == "" and ex("Answer:  5 ") == "5"
    p = "What is 2 + 3?"
    conv = [{"role": "user", "content": p}, {"role": "assistant", "content": "ok"}]
    assert tasks.reward([conv], ["5"]) == [1.0]  # the last *user* message holds the problem
    assert tasks.reward([[{"role": "system", "content": p}]], ["5"]) == [0.0]  # no user message: no problem
    assert tasks.reward([p], [[{"role": "assistant"}]]) == [0.0]
    assert tasks.registry._text([{"role": "assistant"}]) == ""
    with pytest.raises(TypeError, match="expected a string or a list of chat messages, got list"):
        tasks.reward([p], [[]])


def test_evaluate_arithmetic_rejects_strays_and_long_expressions():
    assert tasks.evaluate_arithmetic("1X2") is None and tasks.evaluate_arithmetic("1 2") is None
    assert tasks.evaluate_arithmetic("+".join(["1"] * 32)) == 32  # 63 tokens
    assert tasks.evaluate_arithmetic("+".join(["1"] * 33)) is None  # 65 tokens: over the 64-token limit
