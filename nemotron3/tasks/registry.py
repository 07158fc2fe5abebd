"""The task families by name, seeded generation with disjoint train / held-out splits, and TRL-style rewards.

Each family generates a `Problem` from a `random.Random` and a difficulty (an int ≥ 1): a prompt, a
step-by-step reasoning trace, and a final answer. Every family can *verify* an answer string from the prompt
alone (it re-parses the prompt and recomputes, or for countdown checks the expression), so rewards need no
side channel: `reward(prompts, completions, **kwargs) -> list[float]` is TRL's reward-function signature and
works on plain strings or on conversational message lists. The six reasoning families (add, mul, modpow, sort,
countdown, word) are described in families.py; the long-context retrieval family in retrieval.py, out of the
default mixes (`default_families()`) unless named.

Text layout (the reasoning-on assistant turn of docs/post-training.md §2, minus the chat wrapper):

    {prompt}
    <think>
    {trace}
    </think>
    {answer}

Train / held-out split, disjoint by construction: a problem's canonical key (commutative operands sorted,
so `3+5` and `5+3` are the same problem) is hashed with BLAKE2b; ~10% of the key space is held out.
`generate(..., split="train")` rejects held-out problems and vice versa, whatever the seed, so no held-out
problem can ever be produced for training. Seeds of the two splits are also drawn from separate streams.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import Any

from nemotron3.tasks.families import Add, Countdown, Family, ModPow, Mul, Problem, Sort, Word
from nemotron3.tasks.retrieval import Retrieval, at_length

HELDOUT_PER_MILLE = 100  # share of the problem space reserved for evaluation


def split_of(key: str) -> str:
    """'heldout' for ~HELDOUT_PER_MILLE/1000 of all keys, 'train' otherwise; stable across runs and machines."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "heldout" if h % 1000 < HELDOUT_PER_MILLE else "train"


def extract_answer(completion: str) -> str:
    """The final answer of a completion: the first non-empty line after the last `</think>` (or of the whole
    text when there is no think block), with an optional leading 'Answer:' removed."""
    text = completion.rsplit("</think>", 1)[-1]
    for special in ("</s>", "<|im_end|>"):
        text = text.split(special, 1)[0]
    for line in text.splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^answer\s*:\s*", "", line, flags=re.IGNORECASE).strip()
    return ""

FAMILIES: dict[str, Family] = {f.name: f for f in (Add(), Mul(), ModPow(), Sort(), Countdown(), Word(), Retrieval())}
_SPLIT_STREAM = {"train": 0, "heldout": 1}


def default_families() -> list[str]:
    """The families a mixture or an evaluation uses when none are named: every family but the long-context ones
    (retrieval), whose prompts run to thousands of tokens; those come only when asked for by name."""
    return sorted(name for name, fam in FAMILIES.items() if not fam.long_context)


def generate(family: str, n: int, seed: int = 0, split: str = "train", difficulty: int = 1) -> list[Problem]:
    """`n` problems of one family, deterministic in (family, seed, split, difficulty).

    Problems whose key falls in the other split are skipped, so the two splits never share a problem.
    Duplicates within a call are allowed for the train split (it is a sample of a distribution) and
    removed for the held-out split (an evaluation set should count each problem once). After 200·n + 1000
    draws without `n` problems it gives up with a ValueError.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; expected one of {sorted(FAMILIES)}")
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    fam = FAMILIES[family]
    rng = random.Random(f"{family}/{split}/{difficulty}/{seed}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"{family}: could not find {n} distinct {split} problems at difficulty {difficulty}; "
                             "ask for fewer (or a higher difficulty, which has more)")
        params = fam.make(rng, difficulty)
        key = fam.key(params)
        if split_of(key) != split or (split == "heldout" and key in seen):
            continue
        seen.add(key)
        out.append(fam.problem(params))
    return out


def generate_at_length(n: int, length: int, seed: int = 0, split: str = "heldout",
                       count: Callable[[str], int] = len) -> list[Problem]:
    """`n` retrieval problems whose prompts fill up to `length` tokens of `count` (e.g. a tokenizer's
    `lambda s: len(tok.encode(s))`; default bytes), from the disjoint splits (tasks/retrieval.py `at_length`)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return at_length(FAMILIES["retrieval"], n, length, seed, split, count, split_of)


def family_of(prompt: str) -> tuple[Family, tuple] | None:
    """The family whose prompt format matches, and the parsed parameters."""
    for fam in FAMILIES.values():
        params = fam.parse(prompt)
        if params is not None:
            return fam, params
    return None


def _text(x: Any) -> str:
    """A prompt or completion as text: a string, or the last message's content of a conversation."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    raise TypeError(f"expected a string or a list of chat messages, got {type(x).__name__}")


def _prompt_text(x: Any) -> str:
    if isinstance(x, list):  # conversational: the last user message holds the problem
        users = [m for m in x if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]["content"]) if users else ""
    return _text(x)


def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """TRL-style reward for any mix of families: 1.0 if the completion's final answer is correct, else 0.0.

    The final answer is `extract_answer(completion)`; the family is recognised from the prompt, which is
    re-parsed to check the answer. A prompt of no known family scores 0.0. Extra kwargs (dataset columns,
    trainer state) are accepted and ignored.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    out = []
    for p, c in zip(prompts, completions):
        found = family_of(_prompt_text(p))
        out.append(float(found is not None and found[0].verify(found[1], extract_answer(_text(c)))))
    return out


def family_reward(family: str) -> Callable[..., list[float]]:
    """A reward function that scores only `family` (prompts of other families get 0.0)."""
    fam = FAMILIES[family]

    def reward_fn(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        out = []
        for p, c in zip(prompts, completions):
            params = fam.parse(_prompt_text(p))
            out.append(float(params is not None and fam.verify(params, extract_answer(_text(c)))))
        return out

    reward_fn.__name__ = f"{family}_reward"
    return reward_fn


def mixture(n: int, seed: int = 0, split: str = "train", difficulty: int = 1,
            families: list[str] | None = None) -> list[Problem]:
    """`n` problems spread evenly over `families` (by default `default_families()`), interleaved in a seeded order."""
    names = sorted(families or default_families())
    per = [n // len(names) + (i < n % len(names)) for i in range(len(names))]
    problems = [p for name, k in zip(names, per) for p in generate(name, k, seed, split, difficulty)]
    random.Random(f"mixture/{seed}/{split}").shuffle(problems)
    return problems
