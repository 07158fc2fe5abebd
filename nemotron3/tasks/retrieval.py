"""The long-context task family: key–value retrieval among distractors, at any length.

A prompt is a header, then `pairs` lines `key: value` (distinct keys of four lowercase letters, values of four
digits, drawn uniformly), then a question about one key chosen uniformly among them:

    Remember each key's value.
    qbxe: 0417
    mzak: 9120
    ...
    What is the value of mzak?

The reference trace is the recalled line (`mzak: 9120`) and the answer its value (`9120`). Only a mixer that can
look back over the whole list answers it: Mamba-2's constant-size state cannot hold thousands of arbitrary pairs,
attention can (docs/long-context.md). Verification re-parses the prompt, so rewards need no side channel.

Length. `difficulty` d means PAIRS_PER_LEVEL·d pairs (the generic `tasks.generate` path; about 12 characters a
pair). `at_length(n, length, ...)` instead fills each prompt to at most `length` tokens of a given counter (the
byte-level tokenizer's `len(encode(text))`; by default `len`, the byte count of this ASCII text, which is what a
byte-level tokenizer without merges gives and an upper bound for one with merges), as close to it as whole lines
allow. The family is `long_context`: `tasks.mixture` and the default evaluations leave it out unless asked for,
so the default run's data does not change.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable

from nemotron3.tasks.families import Family, Problem

PAIRS_PER_LEVEL = 8
KEY_LETTERS = 4  # 26^4 = 456,976 distinct keys: room for ~38k lines (~450k bytes) without a repeat
VALUE_DIGITS = 4
HEADER = "Remember each key's value."
_KEY_SPACE = 26**KEY_LETTERS
_line = re.compile(rf"^([a-z]{{{KEY_LETTERS}}}): (\d{{{VALUE_DIGITS}}})$")
_question = re.compile(rf"^What is the value of ([a-z]{{{KEY_LETTERS}}})\?$")


def _key(i: int) -> str:
    """The i-th key of the key space, base 26 over a..z."""
    out = []
    for _ in range(KEY_LETTERS):
        i, r = divmod(i, 26)
        out.append(string.ascii_lowercase[r])
    return "".join(out)


class Retrieval(Family):
    """Recall one key's value from a list of key–value lines (params: (pairs, query key))."""

    name = "retrieval"
    long_context = True

    def draw(self, rng: random.Random, pairs: int) -> tuple:
        """`pairs` distinct uniform keys with uniform values, and a query key uniform among them."""
        if not 1 <= pairs <= _KEY_SPACE:
            raise ValueError(f"retrieval: pairs must be in 1..{_KEY_SPACE}, got {pairs}")
        keys = [_key(i) for i in rng.sample(range(_KEY_SPACE), pairs)]
        values = [f"{rng.randrange(10**VALUE_DIGITS):0{VALUE_DIGITS}d}" for _ in keys]
        return tuple(zip(keys, values)), keys[rng.randrange(pairs)]

    def make(self, rng, difficulty):
        """PAIRS_PER_LEVEL · difficulty pairs (see `draw`)."""
        return self.draw(rng, PAIRS_PER_LEVEL * difficulty)

    def render(self, p):
        pairs, query = p
        return "\n".join([HEADER, *(f"{k}: {v}" for k, v in pairs), f"What is the value of {query}?"])

    def parse(self, prompt):
        lines = prompt.strip().split("\n")
        if len(lines) < 3 or lines[0] != HEADER:
            return None
        q = _question.match(lines[-1])
        pairs = [_line.match(line) for line in lines[1:-1]]
        if q is None or not all(pairs):
            return None
        params = tuple((m[1], m[2]) for m in pairs), q[1]
        keys = [k for k, _ in params[0]]
        return params if q[1] in keys and len(set(keys)) == len(keys) else None

    def key(self, p):
        return f"retrieval:{p}"

    def solve(self, p):
        pairs, query = p
        value = dict(pairs)[query]
        return [f"{query}: {value}"], value


def at_length(family: Retrieval, n: int, length: int, seed: int = 0, split: str = "heldout",
              count: Callable[[str], int] = len, split_of: Callable[[str], str] | None = None) -> list[Problem]:
    """`n` problems whose prompts are at most `length` units of `count` (tokens), each as long as whole lines allow.

    Deterministic in (length, seed, split) for a given counter. Each problem draws more pairs than can fit and keeps
    the longest prefix of lines that fits (a binary search, `count` on the rendered prompt), then asks about a key
    uniform among the kept ones; with `split_of` (registry.split_of) the query is redrawn until the problem's key
    falls in `split`, so the two splits never share a problem, as in `tasks.generate`.
    """
    one = ((_key(0), "0" * VALUE_DIGITS),)
    shortest = count(family.render((one, _key(0))))
    if length < shortest:
        raise ValueError(f"retrieval: length {length} is below the shortest prompt ({shortest} tokens)")
    probe = family.render(family.draw(random.Random(0), 64))
    per_line = max(1.0, (count(probe) - shortest) / 63)  # tokens per line, to size the first draw
    rng = random.Random(f"retrieval/{split}/length{length}/{seed}")

    def fits(pairs: tuple, query: str) -> bool:
        return count(family.render((pairs, query))) <= length

    out: list[Problem] = []
    tries = 0
    while len(out) < n:
        hi = min(_KEY_SPACE, int(1.5 * length / per_line) + 16)
        pairs, _ = family.draw(rng, hi)
        while fits(pairs, pairs[0][0]) and hi < _KEY_SPACE:  # rare: the counter merges more than the probe showed
            hi = min(_KEY_SPACE, 2 * hi)
            pairs, _ = family.draw(rng, hi)
        lo = 1  # lo lines fit, hi do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(pairs[:mid], pairs[0][0]) else (lo, mid)
        for _ in range(4 * lo):  # a short list may have no key of this split: then new pairs
            kept = pairs[:lo]
            query = kept[rng.randrange(lo)][0]
            while not fits(kept, query) and len(kept) > 1:  # this query key may take more tokens than the first
                kept = kept[:-1] if kept[-1][0] != query else kept[:-2] + kept[-1:]
            if split_of is None or split_of(family.key((kept, query))) == split:
                out.append(family.problem((kept, query)))
                break
        else:
            tries += 1
            if tries > 100 + n:
                raise ValueError(f"retrieval: could not find {n} {split} problems of {length} tokens")
    return out
