"""Evaluation items: a benchmark's .jsonl file, or the built-in task families.

One JSON object per line (blank lines are skipped):

    {"prompt": "What is 2 + 3?", "answer": 5}                                    numeric
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "answer": "B",
     "choices": ["red", "green", "blue"]}                                        mcq (answer: letter, index or text)
    {"prompt": "Capital of France?", "answer": ["Paris", "Paris, France"]}      exact (one string or a list)
    {"prompt": "Write f(x) returning 2x.", "answer": "assert f(2) == 4"}        code (answer: the tests)

A line may carry its own `"format"`, which overrides `--format`. Every problem (not JSON, a missing or ill-typed
field, an unknown format, a reference that is not a number or not a choice, an empty file) is one ValueError
naming FILE:LINE (or FILE for an empty one), raised before any generation starts.

Built-in data: `tasks` (the six reasoning families of nemotron3.tasks) or `tasks:add,mul` (`tasks:retrieval` too),
`count` held-out problems per family (the same problems as the pipeline's evaluation for the same seed and
difficulty), in the `task` format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemotron3 import tasks
from nemotron3.eval.extract import FORMATS, answer_letter, letters, parse_number


@dataclass
class Item:
    index: int
    messages: list[dict]  # the conversation to answer (a `prompt` becomes one user turn)
    answer: Any  # normalised: a Fraction (numeric), a letter (mcq), str or list (exact), tests (code), str (task)
    fmt: str
    choices: list[str] | None = None
    raw_answer: Any = None  # as the file wrote it (items.jsonl shows this)
    where: str = ""  # FILE:LINE, for messages about the item
    meta: dict = field(default_factory=dict)

    @property
    def problem(self) -> str:
        """The last user message: the task families re-parse it to verify an answer."""
        users = [m for m in self.messages if m.get("role") == "user"]
        return str(users[-1].get("content", "")) if users else ""


def with_choices(text: str, choices: list[str]) -> str:
    """The question followed by its lettered choices, as the prompt shows an mcq item."""
    return text.rstrip() + "\n\n" + "\n".join(f"{letter}. {c}" for letter, c in zip(letters(len(choices)), choices))


def _item(obj: Any, index: int, where: str, default_fmt: str | None) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    fmt = obj.get("format", default_fmt)
    if fmt is None:
        raise ValueError(f"{where}: no format: give --format or a \"format\" field ({'|'.join(FORMATS[:4])})")
    if fmt not in FORMATS[:4]:
        raise ValueError(f"{where}: unknown format {fmt!r}; expected one of {', '.join(FORMATS[:4])}")
    if "answer" not in obj or obj["answer"] is None:
        raise ValueError(f"{where}: missing field \"answer\"")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of chat messages (objects)")
        if not any(m.get("role") == "user" for m in messages):
            raise ValueError(f"{where}: \"messages\" has no user message")
        messages = [dict(m) for m in messages]
    elif "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string")
        messages = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise ValueError(f"{where}: missing field \"prompt\" (a string) or \"messages\" (a list of chat messages)")
    raw, choices = obj["answer"], obj.get("choices")
    if fmt == "mcq":
        if not isinstance(choices, list) or len(choices) < 2 or len(choices) > 26 or \
                not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{where}: an mcq item needs \"choices\", a list of 2 to 26 strings")
        try:
            answer: Any = answer_letter(raw, choices)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last]["content"] = with_choices(str(messages[last].get("content", "")), choices)
    elif fmt == "numeric":
        answer = parse_number(str(raw)) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None
        if answer is None:
            raise ValueError(f"{where}: answer {raw!r} is not a number (numeric format)")
    elif fmt == "exact":
        ok = isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(a, str) for a in raw))
        if not ok and not isinstance(raw, (int, float)):
            raise ValueError(f"{where}: answer must be a string or a list of strings (exact format)")
        answer = raw if ok else str(raw)
    else:  # code
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError(f"{where}: answer must be the tests, Python source as a non-empty string (code format)")
        answer = raw
    return Item(index, messages, answer, fmt, choices if fmt == "mcq" else None, raw, where)


def load_items(path: Path | str, fmt: str | None = None, limit: int | None = None) -> list[Item]:
    """The items of a .jsonl file (the first `limit`), checked; ValueError naming FILE:LINE for a bad one."""
    path = Path(path)
    items: list[Item] = []
    with path.open(encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(items) >= limit:
                break
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{where}: not a JSON object ({str(e).splitlines()[0][:120]})") from None
            items.append(_item(obj, len(items), where, fmt))
    if not items:
        raise ValueError(f"{path}: no items (the file is empty); expected one JSON object per line")
    return items


def task_items(spec: str, count: int, seed: int = 0, difficulty: int = 1) -> list[Item]:
    """Held-out problems of the built-in task families: `tasks` (all six) or `tasks:add,mul`, `count` per family."""
    names = spec.split(":", 1)[1].split(",") if ":" in spec else tasks.default_families()
    unknown = [n for n in names if n not in tasks.FAMILIES]
    if unknown or not names:
        raise ValueError(f"data (--data) {spec!r}: unknown task family {unknown[0] if unknown else ''!r}; "
                         f"expected tasks or tasks:NAME,... with names from {', '.join(sorted(tasks.FAMILIES))}")
    problems = [p for name in names for p in tasks.generate(name, count, seed=seed, split="heldout",
                                                            difficulty=difficulty)]
    return problem_items(problems)


def problem_items(problems: list[tasks.Problem]) -> list[Item]:
    """Task-family problems as items of the `task` format (graded by the family's verifier)."""
    return [Item(i, [{"role": "user", "content": p.prompt}], p.answer, "task", None, p.answer, f"tasks:{p.family}",
                 {"family": p.family}) for i, p in enumerate(problems)]


def is_builtin(spec: str) -> bool:
    return spec == "tasks" or spec.startswith("tasks:")

