"""The six task families of `nemotron3.tasks`: how each one makes, renders, parses, solves and verifies a
problem. A family is stateless; `tasks.generate` drives it with a seeded `random.Random`.

    add        multi-digit addition / subtraction, column by column with carries and borrows
    mul        multi-digit × one- or two-digit multiplication, digit by digit with carries
    modpow     a^e mod m by repeated multiplication and reduction
    sort       sort a list of numbers by repeated selection of the minimum
    countdown  reach a target from given numbers with + - * (any correct expression is accepted)
    word       multi-step word problems built from sentence templates
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    family: str
    prompt: str
    trace: str  # the reasoning, one step per line
    answer: str

    def text(self) -> str:
        """The pretraining document (without BOS/EOS, which the data pipeline adds as ids)."""
        return f"{self.prompt}\n<think>\n{self.trace}\n</think>\n{self.answer}"

    def completion(self) -> str:
        """What a model should produce after `prompt + "\\n"`: the reference completion."""
        return f"<think>\n{self.trace}\n</think>\n{self.answer}"


def _digits(rng: random.Random, n: int) -> int:
    """A uniform n-digit number: 0..9 for n = 1, 10^(n-1)..10^n - 1 for n > 1."""
    return rng.randint(10 ** (n - 1) if n > 1 else 0, 10**n - 1)


# ----------------------------------------------------------------------------------------- families
class Family:
    """One task family. Subclasses define `make` (rng, difficulty -> params), `render`, `parse`, `solve`."""

    name: str = ""
    long_context: bool = False  # prompts of thousands of tokens: out of the default mixes unless asked for

    def make(self, rng: random.Random, difficulty: int) -> tuple:
        raise NotImplementedError

    def render(self, params: tuple) -> str:
        raise NotImplementedError

    def parse(self, prompt: str) -> tuple | None:
        """The parameters of a prompt of this family, or None if it is not one."""
        raise NotImplementedError

    def solve(self, params: tuple) -> tuple[list[str], str]:
        """(trace lines, answer)."""
        raise NotImplementedError

    def key(self, params: tuple) -> str:
        return f"{self.name}:{params}"

    def verify(self, params: tuple, answer: str) -> bool:
        return answer.strip() == self.solve(params)[1]

    def problem(self, params: tuple) -> Problem:
        trace, answer = self.solve(params)
        return Problem(self.name, self.render(params), "\n".join(trace), answer)


class Add(Family):
    """a ± b, column by column from the ones digit; the partial result grows one digit per line."""

    name = "add"
    _re = re.compile(r"^What is (\d+) ([+-]) (\d+)\?$")

    def make(self, rng, difficulty):
        """With n = difficulty + 1: a uniform n-digit, b uniform with n - 1 or n digits (at least 1; the count drawn
        first, evenly), + or - evenly; a difference is written larger first (never negative), a sum as drawn."""
        n = difficulty + 1
        a, b, op = _digits(rng, n), _digits(rng, rng.randint(max(1, n - 1), n)), rng.choice("+-")
        return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)

    def render(self, p):
        return f"What is {p[0]} {p[1]} {p[2]}?"

    def parse(self, prompt):
        m = self._re.match(prompt.strip())
        return (int(m[1]), m[2], int(m[3])) if m else None

    def key(self, p):
        a, op, b = p
        return f"add:{op}:{sorted((a, b)) if op == '+' else (a, b)}"

    def solve(self, p):
        a, op, b = p
        da, db = str(a)[::-1], str(b)[::-1]
        lines, partial, carry = [], "", 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            if op == "+":
                s = x + y + carry
                partial = str(s % 10) + partial
                lines.append(f"{x}+{y}+{carry}={s} -> {partial}, carry {s // 10}")
                carry = s // 10
            else:
                borrow = int(x - y - carry < 0)
                s = 10 * borrow + x - y - carry
                partial = str(s) + partial
                lines.append(f"{10 * borrow + x}-{y}-{carry}={s} -> {partial}, borrow {borrow}")
                carry = borrow
        if op == "+" and carry:
            partial = str(carry) + partial
            lines.append(f"carry {carry} -> {partial}")
        return lines, str(int(partial))


class Mul(Family):
    """a × b: digit by digit with carries for each digit of b, then the shifted partial products summed."""

    name = "mul"
    _re = re.compile(r"^What is (\d+) \* (\d+)\?$")

    def make(self, rng, difficulty):
        """A uniform (difficulty + 1)-digit number times a uniform one-digit one (0..9) below difficulty 3, a
        two-digit one (10..99) from 3 on."""
        return _digits(rng, difficulty + 1), _digits(rng, 1 if difficulty < 3 else 2)

    def render(self, p):
        return f"What is {p[0]} * {p[1]}?"

    def parse(self, prompt):
        m = self._re.match(prompt.strip())
        return (int(m[1]), int(m[2])) if m else None

    def key(self, p):
        return f"mul:{sorted(p)}"

    def solve(self, p):
        a, b = p
        lines, products = [], []
        for shift, y in enumerate(int(c) for c in str(b)[::-1]):
            partial, carry = "", 0
            for x in (int(c) for c in str(a)[::-1]):
                s = x * y + carry
                partial = str(s % 10) + partial
                lines.append(f"{x}*{y}+{carry}={s} -> {partial}, carry {s // 10}")
                carry = s // 10
            prod = int((str(carry) if carry else "") + partial) * 10**shift
            lines.append(f"{a}*{y * 10**shift}={prod}")
            products.append(prod)
        if len(products) > 1:
            lines.append(f"{'+'.join(map(str, products))}={sum(products)}")
        return lines, str(a * b)


class ModPow(Family):
    """a^e mod m: multiply by a and reduce, one power per line."""

    name = "modpow"
    _re = re.compile(r"^What is (\d+)\^(\d+) mod (\d+)\?$")

    def make(self, rng, difficulty):
        """m uniform in 3..10 + 10·difficulty, then a uniform in 2..m - 1 and e uniform in 2..4 + 2·difficulty."""
        m = rng.randint(3, 10 + 10 * difficulty)
        return rng.randint(2, m - 1), rng.randint(2, 4 + 2 * difficulty), m

    def render(self, p):
        return f"What is {p[0]}^{p[1]} mod {p[2]}?"

    def parse(self, prompt):
        m = self._re.match(prompt.strip())
        return tuple(int(g) for g in m.groups()) if m else None

    def solve(self, p):
        a, e, m = p
        r = a % m
        lines = [f"{a}^1={r}"]
        for k in range(2, e + 1):
            prod = r * a
            r = prod % m
            lines.append(f"{a}^{k}={lines[-1].rsplit('=', 1)[1]}*{a}={prod}" + (f"={r}" if prod != r else ""))
        return lines, str(r)


class Sort(Family):
    """Sort ascending by taking the smallest remaining number, one per line."""

    name = "sort"
    _re = re.compile(r"^Sort ascending: (\d+(?: \d+)*)$")

    def make(self, rng, difficulty):
        """difficulty + 2 numbers, each uniform in 0..99."""
        return tuple(rng.randint(0, 99) for _ in range(difficulty + 2))

    def render(self, p):
        return "Sort ascending: " + " ".join(map(str, p))

    def parse(self, prompt):
        m = self._re.match(prompt.strip())
        return tuple(int(x) for x in m[1].split()) if m else None

    def solve(self, p):
        left, taken, lines = list(p), [], []
        while left:
            x = min(left)
            left.remove(x)
            taken.append(x)
            lines.append(f"take {x}, left {' '.join(map(str, left)) or 'none'}")
        return lines, " ".join(map(str, taken))


class Countdown(Family):
    """Reach the target with some of the numbers (each at most once) and + - *; shown as a chain of steps."""

    name = "countdown"
    _re = re.compile(r"^Reach (\d+) using (\d+(?: \d+)*) with \+ - \*\.$")

    def make(self, rng, difficulty):
        """difficulty + 2 numbers, each uniform in 1..12, chained left to right by + - * (each evenly); the chain's
        value is the target, and the whole draw is repeated until it lies in 1..999."""
        while True:
            nums = [rng.randint(1, 12) for _ in range(difficulty + 2)]
            acc, steps = nums[0], []
            for x in nums[1:]:
                op = rng.choice("+-*")
                acc = acc + x if op == "+" else acc - x if op == "-" else acc * x
                steps.append(op)
            if 0 < acc < 1000:
                return acc, tuple(nums), tuple(steps)  # the chain is the (hidden) construction

    def render(self, p):
        return f"Reach {p[0]} using {' '.join(map(str, sorted(p[1])))} with + - *."

    def parse(self, prompt):
        m = self._re.match(prompt.strip())
        return (int(m[1]), tuple(int(x) for x in m[2].split())) if m else None

    def key(self, p):
        return f"countdown:{p[0]}:{sorted(p[1])}"

    def problem(self, p):
        target, nums, ops = p
        acc, expr, lines = nums[0], str(nums[0]), []
        for x, op in zip(nums[1:], ops):
            new = acc + x if op == "+" else acc - x if op == "-" else acc * x
            lines.append(f"{acc}{op}{x}={new}")
            acc, expr = new, f"{expr}{op}{x}" if expr.isdigit() else f"({expr}){op}{x}"
        return Problem(self.name, self.render(p), "\n".join(lines), expr)

    def verify(self, p, answer):
        target, nums = p[0], p[1]
        value = evaluate_arithmetic(answer)
        used = [int(t) for t in re.findall(r"\d+", answer)]
        pool = list(nums)
        for u in used:
            if u not in pool:
                return False
            pool.remove(u)
        return value == target


class Word(Family):
    """A running count through template sentences: buys packs, gives away, finds, shares out equally."""

    name = "word"
    NAMES = ("Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max")
    ITEMS = ("apples", "stamps", "marbles", "cards", "shells", "coins")
    _start = re.compile(r"^(\w+) has (\d+) (\w+)$")
    _steps = (
        (re.compile(r"^\w+ buys (\d+) packs of (\d+) \w+$"),
         lambda v, a, b: (v + a * b, f"{a}*{b}={a * b}, {v}+{a * b}={v + a * b}")),
        (re.compile(r"^\w+ gives (\d+) \w+ to \w+$"), lambda v, a: (v - a, f"{v}-{a}={v - a}")),
        (re.compile(r"^\w+ finds (\d+) more \w+$"), lambda v, a: (v + a, f"{v}+{a}={v + a}")),
        (re.compile(r"^\w+ shares them equally with (\d+) friends and keeps one share$"),
         lambda v, a: (v // (a + 1), f"{v}/{a + 1}={v // (a + 1)}")),
    )

    def make(self, rng, difficulty):
        """With top = 10·difficulty: a start uniform in 1..top, then difficulty + 1 steps, each of a kind drawn evenly
        from the four and redrawn when it does not apply: buy 2..5 packs of 2..top, give 1..count - 1 (only while
        the count is above 1), find 1..top, share with a friends (a uniform among the a in 1..4 with a + 1
        dividing the count; only when there is one); two distinct names and an item, each uniform."""
        top = 10 * difficulty
        start = value = rng.randint(1, top)
        steps = []
        while len(steps) < difficulty + 1:
            kind = rng.randrange(4)
            if kind == 0:
                args = (rng.randint(2, 5), rng.randint(2, top))
            elif kind == 1 and value > 1:
                args = (rng.randint(1, value - 1),)
            elif kind == 2:
                args = (rng.randint(1, top),)
            elif kind == 3 and any(value % (a + 1) == 0 for a in range(1, 5)):
                args = (rng.choice([a for a in range(1, 5) if value % (a + 1) == 0]),)
            else:
                continue
            value = self._steps[kind][1](value, *args)[0]
            steps.append((kind, args))
        name, other = rng.sample(self.NAMES, 2)
        return name, other, rng.choice(self.ITEMS), start, tuple(steps)

    def render(self, p):
        name, other, item, start, steps = p
        s = [f"{name} has {start} {item}"]
        for kind, args in steps:
            s.append(["{n} buys {0} packs of {1} {i}", "{n} gives {0} {i} to {o}", "{n} finds {0} more {i}",
                      "{n} shares them equally with {0} friends and keeps one share"][kind]
                     .format(*args, n=name, i=item, o=other))
        return ". ".join(s) + f". How many {item} does {name} have now?"

    def parse(self, prompt):
        m = re.match(r"^(.*)\. How many (\w+) does (\w+) have now\?$", prompt.strip())
        if not m:
            return None
        sentences = m[1].split(". ")
        head = self._start.match(sentences[0])
        if not head:
            return None
        steps = []
        for sent in sentences[1:]:
            for kind, (pattern, _) in enumerate(self._steps):
                sm = pattern.match(sent)
                if sm:
                    steps.append((kind, tuple(int(g) for g in sm.groups())))
                    break
            else:
                return None
        return head[1], "", head[3], int(head[2]), tuple(steps)

    def key(self, p):
        return f"word:{p[3]}:{p[4]}"

    def solve(self, p):
        value, lines = p[3], []
        for kind, args in p[4]:
            value, line = self._steps[kind][1](value, *args)
            lines.append(line)
        return lines, str(value)


def evaluate_arithmetic(expr: str) -> int | None:
    """Value of an expression over non-negative integers, + - * and parentheses; None if it is not one.

    A small recursive-descent parser (never `eval`): completions are untrusted model output.
    """
    tokens = re.findall(r"\d+|[-+*()]|\S", expr)
    pos = 0

    def atom() -> int:
        nonlocal pos
        if pos < len(tokens) and tokens[pos] == "(":
            pos += 1
            v = sum_()
            if pos >= len(tokens) or tokens[pos] != ")":
                raise ValueError
            pos += 1
            return v
        if pos < len(tokens) and tokens[pos].isdigit():
            pos += 1
            return int(tokens[pos - 1])
        raise ValueError

    def product() -> int:
        nonlocal pos
        v = atom()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            v *= atom()
        return v

    def sum_() -> int:
        nonlocal pos
        v = product()
        while pos < len(tokens) and tokens[pos] in "+-":
            op, pos = tokens[pos], pos + 1
            v = v + product() if op == "+" else v - product()
        return v

    try:
        v = sum_()
        return v if pos == len(tokens) and len(tokens) <= 64 else None
    except ValueError:
        return None
