"""The prompt set of an RL run: the embedded task families, or a .jsonl file of prompts with extra columns.

    source = TaskPrompts(families=None, difficulty=1, seed=0)       # an endless, seeded stream of problems
    source = FilePrompts(["prompts.jsonl"], seed=0)                  # {"prompt": ..., "answer": ...} per line
    rows = source.batch(step, 8)                                     # the step's prompts, fixed by (seed, step)

A prompt is a conversation (OpenAI messages, ending with the user's turn) or a string (one user turn); every
other field of a line is a column passed to the reward functions (TRL's dataset columns), one value per
completion. Task prompts carry `family` and `answer` (the reference answer, as text).

Step `s`'s prompts depend only on (seed, s), so a resumed run draws the same prompts as an uninterrupted one.
A file's prompts are used in a seeded order, epoch after epoch. Bad lines (not JSON, no `prompt`, a prompt
that is neither a string nor a list of messages with roles and contents, a message field of the wrong type, a
line that is not UTF-8) are errors naming file:line. A message's content may be OpenAI text parts, joined as the
SFT data joins them (train/sft_data.py `check_message`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemotron3 import tasks
from nemotron3.options import derive_seed
from nemotron3.train.data import DataError, jsonl_records
from nemotron3.train.sft_data import check_message


@dataclass
class PromptRow:
    messages: list[dict]  # the conversation to answer
    columns: dict[str, Any] = field(default_factory=dict)  # passed to the reward functions

    @property
    def label(self) -> str:
        """A short description for error messages: the last user turn, cut."""
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        text = users[-1] if users else str(self.messages[-1].get("content", ""))
        return repr(text[:60] + ("…" if len(text) > 60 else ""))


class TaskPrompts:
    """Problems of the embedded task families (train split), evenly mixed, as one-user-turn conversations."""

    def __init__(self, families: list[str] | None = None, difficulty: int = 1, seed: int = 0) -> None:
        unknown = sorted(set(families or []) - set(tasks.FAMILIES))
        if unknown:
            raise ValueError(f"unknown task families {unknown}; expected some of {sorted(tasks.FAMILIES)}")
        self.families = sorted(families) if families else None
        self.difficulty, self.seed = difficulty, seed

    def batch(self, step: int, n: int) -> list[PromptRow]:
        problems = tasks.mixture(n, seed=derive_seed(self.seed, step), split="train", difficulty=self.difficulty,
                                 families=self.families)
        return [PromptRow([{"role": "user", "content": p.prompt}], {"family": p.family, "answer": p.answer})
                for p in problems]


def _row(value: Any, where: str) -> PromptRow:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with a 'prompt' field, got {type(value).__name__}")
    if "prompt" not in value:
        raise DataError(f"{where}: no 'prompt' field (fields: {sorted(value)})")
    prompt = value["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = []
        for i, m in enumerate(prompt):
            m = check_message(m, f"{where}: prompt message {i}")  # every field typed; text parts joined
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: prompt message {i}: content is required (a string or text parts)")
            messages.append(m)
    else:
        raise DataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    return PromptRow(messages, {k: v for k, v in value.items() if k != "prompt"})


def read_prompts(paths: list[Path]) -> list[PromptRow]:
    """Every prompt of the .jsonl files, in order; DataError naming file:line for a bad line."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"prompt file {path} does not exist")
        for where, value in jsonl_records(path):
            rows.append(_row(value, where))
    if not rows:
        raise DataError(f"no prompts in {', '.join(map(str, paths))}")
    return rows


class FilePrompts:
    """Prompts of .jsonl files in a seeded order, reshuffled each epoch."""

    def __init__(self, paths: list[Path], seed: int = 0) -> None:
        self.rows = read_prompts(paths)
        self.seed = seed

    def batch(self, step: int, n: int) -> list[PromptRow]:
        out = []
        for k in range(step * n, (step + 1) * n):
            epoch, i = divmod(k, len(self.rows))
            order = list(range(len(self.rows)))
            random.Random(f"prompts/{self.seed}/{epoch}").shuffle(order)
            out.append(self.rows[order[i]])
        return out
