"""Thinking budget: cap the reasoning of each row at N tokens, closing `<think>` at a line end when it can.

    engine = Engine(model, think_tokens=ThinkTokens.from_tokenizer(tokenizer))
    engine.generate(prompts, 512, max_thinking_tokens=64)          # or one budget per row: [64, 128, ...]

A row is *inside* its reasoning when the last `<think>` of its prompt (a generation prompt with thinking on
ends with one, docs/post-training.md §1) or of its output so far is not yet closed by `</think>`. Every
token it emits inside counts. Once N have been emitted, the row may go on for a grace window of
`ceil(grace · N)` more tokens (default 10 %) to finish its line: the token after the first newline-bearing
token emitted from then on is replaced by `</think>`; if the window ends without a newline, the next token
is `</think>` at once. Then the row continues to its answer as usual (it may open `<think>` again, with a
fresh count). N = 0 closes the reasoning with the first token. This is the budget control of Nemotron 3
and Nano (stop the trace at a line boundary near the budget and force the answer), done in the engine so
that it works in batches, with sampling and with speculative decoding, where a forced token cuts the row's
accepted drafts at that position (engine/speculative.py) and the cache rolls back what follows.

Forcing a token changes the law of the output: budgeted generation is not the model's law, by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nemotron3.tokenizer import Tokenizer


@dataclass(frozen=True)
class ThinkTokens:
    """The ids of `<think>`, `</think>` and of every token whose text holds a newline, read from the tokenizer
    (`from_tokenizer`); none is assumed. The default (no ids) serves engines that never get a thinking budget:
    asking one for a budget is a ValueError (`ThinkingBudget`)."""

    start: int | None = None
    end: int | None = None
    newlines: frozenset[int] = field(default_factory=frozenset)

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> ThinkTokens:
        """ValueError when the tokenizer has no `<think>` / `</think>` tokens."""
        start, end = tokenizer.think_start_id, tokenizer.think_end_id
        if start is None or end is None:
            raise ValueError("the tokenizer has no <think> / </think> tokens: a thinking budget needs both")
        return cls(start, end, tokenizer.newline_ids)


class ThinkingBudget:
    """Per-row budget state. `__call__(row, tokens)` is told each row's newly emitted tokens in order and
    returns (n, forced): keep the first n of them, the last replaced by `forced` when it is not None."""

    def __init__(self, ids: ThinkTokens, budgets: list[int], prompts: list[list[int]], grace: float = 0.1) -> None:
        if ids.start is None or ids.end is None:
            raise ValueError("a thinking budget needs the tokenizer's <think> / </think> ids: build the engine with "
                             "think_tokens=ThinkTokens.from_tokenizer(tokenizer)")
        if len(budgets) != len(prompts):
            raise ValueError(f"max_thinking_tokens has {len(budgets)} budgets for {len(prompts)} prompts")
        if any(not isinstance(b, int) or b < 0 for b in budgets):
            raise ValueError(f"max_thinking_tokens must be integers >= 0, got {budgets}")
        if not 0 <= grace:
            raise ValueError(f"the thinking grace window must be >= 0, got {grace}")
        self.ids = ids
        self.budgets = budgets
        self.windows = [math.ceil(grace * b) for b in budgets]
        self.inside = [self._open_at_end(p) for p in prompts]
        self.count = [0] * len(prompts)
        self.pending = [bool(i and b == 0) for i, b in zip(self.inside, budgets)]  # force the next token
        self.forced = [0] * len(prompts)  # how many times each row was forced to close

    def _open_at_end(self, prompt: list[int]) -> bool:
        last_start = max((i for i, t in enumerate(prompt) if t == self.ids.start), default=-1)
        last_end = max((i for i, t in enumerate(prompt) if t == self.ids.end), default=-1)
        return last_start > last_end

    def __call__(self, row: int, tokens: list[int]) -> tuple[int, int | None]:
        for i, t in enumerate(tokens):
            if self.pending[row]:
                self.pending[row], self.inside[row] = False, False
                self.forced[row] += 1
                return i + 1, self.ids.end
            if not self.inside[row]:
                if t == self.ids.start:
                    self.inside[row], self.count[row] = True, 0
                    self.pending[row] = self.budgets[row] == 0
                continue
            if t == self.ids.end:
                self.inside[row] = False
                continue
            self.count[row] += 1
            n, N = self.count[row], self.budgets[row]
            if n >= N and (t in self.ids.newlines or n >= N + self.windows[row]):
                self.pending[row] = True
        return len(tokens), None
