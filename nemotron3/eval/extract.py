"""Answer extraction and grading per format: what a completion answers, and whether that is the reference.

Every format reads the *answer part* of a completion (`answer_part`): the text after the last `</think>`, up to an
end-of-turn or end-of-sequence token. A completion whose prompt opened a think block and that never closed it has
no answer part (its reasoning ran out of tokens), so it answers nothing, in every format.

    numeric  the content of the last `\\boxed{}` (or `\\fbox{}`) when there is one, else the last number; numbers
             may be negative, decimals, fractions (`3/4`, `\\frac{3}{4}`) or have thousands separators (`1,234`);
             equal to the reference within a tolerance (relative or absolute)
    mcq      the choice letter: `\\boxed{B}`, then "answer is (B)" / "Answer: B", then a reply that is a letter or a
             choice's text, then the last standalone capital letter among the choices (not an article "A" or a
             pronoun "I" that a lowercase word follows)
    exact    the last `\\boxed{}` content, else the first non-empty line (an "Answer:" prefix dropped), compared
             after normalization (case, whitespace, surrounding quotes, `$` and a trailing period)
    code     the last fenced code block (else the whole answer part), graded by running the reference tests
             (eval/code.py)
    task     the built-in task families (nemotron3.tasks): the family's own answer line and verifier

The same functions grade `nemotron3 eval` and the lm-evaluation-harness backend's fixture task, so the two agree
on every item by construction.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from nemotron3 import tasks

FORMATS = ("numeric", "mcq", "exact", "code", "task")
THINK_END = "</think>"
_ENDS = ("<|im_end|>", "</s>")


def answer_part(completion: str, think_open: bool = False) -> str | None:
    """The text after the last `</think>`, cut at an end-of-turn token; None when `think_open` (the prompt opened a
    think block) and the completion never closed it."""
    if THINK_END in completion:
        completion = completion.rsplit(THINK_END, 1)[1]
    elif think_open:
        return None
    for end in _ENDS:
        completion = completion.split(end, 1)[0]
    return completion


# ----------------------------------------------------------------------------------------- numbers
def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces balanced), or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


_FRAC = r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(-?\d+)\s*\}"
_NUMBER = re.compile(
    _FRAC + r"|(?<![\w.)\]])([-−]?)\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*(\d+)(?![\d.]))?")


def _fraction(m: re.Match) -> Fraction | None:
    if m[1] is not None:  # \frac{a}{b}
        num, den = int(m[1]), int(m[2])
    else:
        num, den = Fraction(m[4].replace(",", "")), int(m[5]) if m[5] else 1
        num = -num if m[3] else num
    return Fraction(num) / den if den else None


def parse_number(text: str) -> Fraction | None:
    """The number `text` is (`-3`, `1,234.5`, `3/4`, `\\frac{-3}{4}`, `$12$`, `\\$5`, `50\\%`), or None."""
    t = text.strip().strip("$").replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\\$", "")
    t = re.sub(r"\\(?:text|mathrm)\{[^{}]*\}|\\%|%", "", t).strip().rstrip(".").strip()
    t = t.replace("−", "-")
    if t.startswith("-(") and t.endswith(")"):
        t = "-" + t[2:-1]
    matches = list(_NUMBER.finditer(t))
    if len(matches) != 1 or matches[0].group(0).strip() != t:
        return None
    return _fraction(matches[0])


def extract_number(text: str) -> str | None:
    """The numeric answer of an answer part: the last boxed content when it is a number (else the last number in
    it), else the last number of the text; as written (`-3/4`), or None."""
    boxed = last_boxed(text)
    if boxed is not None:
        if parse_number(boxed) is not None:
            return boxed.strip()
        text = boxed
    found = list(_NUMBER.finditer(text.replace("−", "-")))
    return found[-1].group(0).strip() if found else None


def numbers_equal(prediction: str, answer: Fraction, tolerance: float) -> bool:
    value = parse_number(prediction)
    return value is not None and math.isclose(float(value), float(answer), rel_tol=tolerance, abs_tol=tolerance)


# ----------------------------------------------------------------------------------------- multiple choice
def letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _norm(text: str) -> str:
    t = re.sub(r"\s+", " ", text.strip().casefold())
    t = t.strip("$").strip().strip("\"'`").strip()
    return t[:-1].rstrip() if t.endswith(".") else t


def extract_letter(text: str, choices: list[str]) -> str | None:
    """The chosen letter (A.. for the choices given), or None when the text names none."""
    valid = letters(len(choices))
    cls = f"[{valid}]"
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(rf"\(?({cls})\)?(?:[.:].*)?", boxed.strip(), re.S)
        if m:
            return m[1]
    said = list(re.finditer(rf"answer(?:\s+is)?\s*[:=]?\s*(?:\*\*)?\(?({cls})\b\)?", text, re.IGNORECASE))
    said = [m for m in said if m[1].isupper()]
    if said:
        return said[-1][1]
    m = re.fullmatch(rf"\s*\(?({cls})\)?[.:)]?\s*", text)
    if m:
        return m[1]
    for letter, choice in zip(valid, choices):
        if _norm(text) == _norm(choice):
            return letter
    standalone = [m for m in re.finditer(rf"(?<![\w'’])\(?({cls})\)?(?![\w'’])", text)
                  if not (m[1] in "AI" and re.match(r"\s+[a-z]", text[m.end():]))]
    return standalone[-1][1] if standalone else None


def answer_letter(answer: object, choices: list[str]) -> str:
    """The reference of an mcq item as a letter: a letter, a 0-based index, or a choice's text; ValueError."""
    valid = letters(len(choices))
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return valid[answer]
        raise ValueError(f"answer {answer} is not a choice index (0..{len(choices) - 1})")
    if isinstance(answer, str):
        m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*", answer)
        if m and m[1].upper() in valid:
            return m[1].upper()
        for letter, choice in zip(valid, choices):
            if _norm(answer) == _norm(choice):
                return letter
    raise ValueError(f"answer {answer!r} is neither a letter {valid[0]}-{valid[-1]}, a choice index, "
                     "nor one of the choices")


# ----------------------------------------------------------------------------------------- exact and code
def extract_exact(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for line in text.splitlines():
        if line.strip():
            return re.sub(r"^answer\s*:\s*", "", line.strip(), flags=re.IGNORECASE).strip()
    return None


def exact_equal(prediction: str, answer: object) -> bool:
    refs = answer if isinstance(answer, list) else [answer]
    return any(_norm(prediction) == _norm(str(r)) for r in refs)


def extract_code(text: str) -> str | None:
    """The last fenced block (```python ... ``` or ``` ... ```), else the whole text when it is not blank."""
    blocks = re.findall(r"```[\w+-]*[ \t]*\n(.*?)```", text, re.S)
    if blocks:
        return blocks[-1]
    return text if text.strip() else None


def extract(fmt: str, completion: str, think_open: bool = False, choices: list[str] | None = None) -> str | None:
    """What the completion answers in format `fmt`, or None when it answers nothing."""
    text = answer_part(completion, think_open)
    if text is None:
        return None
    if fmt == "numeric":
        return extract_number(text)
    if fmt == "mcq":
        return extract_letter(text, choices or [])
    if fmt == "exact":
        return extract_exact(text)
    if fmt == "code":
        return extract_code(text)
    if fmt == "task":
        return tasks.extract_answer(text) or None
    raise ValueError(f"unknown answer format {fmt!r}; expected one of {', '.join(FORMATS)}")


def grade(fmt: str, prediction: str | None, answer: object, tolerance: float = 1e-6, prompt: str = "") -> bool:
    """Whether `prediction` (from `extract`) is the reference `answer` (as `data.py` normalised it); code is graded
    by eval/code.py instead. `prompt` is the task family's problem (the `task` format verifies against it)."""
    if prediction is None:
        return False
    if fmt == "numeric":
        return numbers_equal(prediction, answer, tolerance)  # type: ignore[arg-type]
    if fmt == "mcq":
        return prediction == answer
    if fmt == "exact":
        return exact_equal(prediction, answer)
    if fmt == "task":
        found = tasks.family_of(prompt)
        return found is not None and found[0].verify(found[1], prediction)
    raise ValueError(f"format {fmt!r} is not graded by comparison")
