"""The embedded task families (nemotron3/tasks) as single-turn environments, with their rewards unchanged.

    TaskEnv()                  # "tasks": the six families mixed evenly, the prompts `nemotron3 rl` draws by default
    TaskEnv(["add"])           # "add": one family

A prompt is the problem as one user turn with the columns `family` and `answer`, exactly the rows of
rl/prompts.py `TaskPrompts` for the same seed; the rubric is `tasks.reward` alone (1.0 when the answer after
the last `</think>` is right), which is also the accuracy.
"""

from __future__ import annotations

from nemotron3 import tasks
from nemotron3.envs.base import Example, Rubric, SingleTurnEnv


class TaskEnv(SingleTurnEnv):
    def __init__(self, families: list[str] | None = None, difficulty: int = 1) -> None:
        unknown = sorted(set(families or []) - set(tasks.FAMILIES))
        if unknown:
            raise ValueError(f"unknown task families {unknown}; expected some of {sorted(tasks.FAMILIES)}")
        self.families = sorted(families) if families else None
        self.difficulty = difficulty
        self.name = "tasks" if not self.families else "+".join(self.families)
        super().__init__(Rubric([tasks.reward], accuracy=tasks.reward))

    def _examples(self, n: int, seed: int, split: str) -> list[Example]:
        problems = tasks.mixture(n, seed=seed, split=split, difficulty=self.difficulty, families=self.families)
        return [Example(self.format_prompt(p.prompt), {"family": p.family, "answer": p.answer}) for p in problems]

    def get_dataset(self, n: int, seed: int) -> list[Example]:
        return self._examples(n, seed, "train")

    def get_eval_dataset(self, n: int, seed: int = 0) -> list[Example]:
        return self._examples(n, seed, "heldout")
