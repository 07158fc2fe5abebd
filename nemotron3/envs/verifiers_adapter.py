"""An installed `verifiers` environment (PrimeIntellect) as one of ours: its dataset and its rubric.

    env = VerifiersEnv.load("gsm8k")          # verifiers.load_environment("gsm8k"), wrapped; `--env verifiers:gsm8k`

`verifiers` is optional (not a dependency): this module imports it only when an environment is loaded, and a
missing package is one ValueError saying so. What is adapted:

- the dataset: `get_dataset(n, seed)` / `get_eval_dataset(n, seed)` rows (`prompt` messages, already holding the
  environment's system prompt) become Examples whose columns are the row's other fields (`answer`, `info`, `task`);
- the rubric: each reward function, called per sample with the named objects it asks for (`prompt`,
  `completion`, `answer`, `info`, `task`, `state`, `parser`; all of them when it takes **kwargs), awaited when it is
  a coroutine, becomes a TRL-style function over the batch with the same weight; a group function (one whose
  parameters are plural: `prompts`, `completions`, `answers`, `infos`, `tasks`, `states`) is called once per
  batch. Unlike verifiers, a function that raises is not scored 0 silently: rl/rewards.py stops the step
  naming it.

Only single-turn environments are adapted (`max_turns` 1): a verifiers multi-turn or tool environment answers
through its own async client and message types, which this runner does not speak; loading one is a ValueError.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from nemotron3.envs.base import Example, Rubric, SingleTurnEnv

GROUP_PARAMS = {"prompts", "completions", "answers", "infos", "tasks", "states"}


def _call(func: Callable, objects: dict[str, Any]) -> Any:
    params = inspect.signature(func).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        objects = {k: v for k, v in objects.items() if k in params}
    out = func(**objects)
    return asyncio.run(out) if inspect.isawaitable(out) else out


def trl_reward(func: Callable, parser: Any = None) -> Callable[..., list]:
    """A verifiers reward function as `f(prompts, completions, **columns) -> list[float]`."""
    group = bool(GROUP_PARAMS & set(inspect.signature(func).parameters))

    def reward(prompts: list, completions: list, **columns: Any) -> list:
        n = len(completions)
        col = {k: columns.get(k, [None] * n) for k in ("answer", "info", "task")}
        states = [{"prompt": p, "completion": c, "answer": a, "info": i or {}, "task": t}
                  for p, c, a, i, t in zip(prompts, completions, col["answer"], col["info"], col["task"])]
        if group:
            return list(_call(func, {"prompts": prompts, "completions": completions, "answers": col["answer"],
                                     "infos": [s["info"] for s in states], "tasks": col["task"], "states": states,
                                     "parser": parser}))
        return [float(_call(func, {**s, "state": s, "parser": parser})) for s in states]

    reward.__name__ = getattr(func, "__name__", "verifiers_reward")
    return reward


class VerifiersEnv(SingleTurnEnv):
    def __init__(self, vf_env: Any, name: str) -> None:
        turns = getattr(vf_env, "max_turns", 1)
        if turns != 1:
            raise ValueError(f"verifiers environment {name!r} has max_turns={turns}: only single-turn verifiers "
                             "environments are adapted (docs/agentic-rl.md §5)")
        self.vf_env, self.name = vf_env, f"verifiers:{name}"
        rubric = vf_env.rubric
        parser = getattr(rubric, "parser", None)
        funcs = [trl_reward(f, parser) for f in rubric.funcs]
        super().__init__(Rubric(funcs, list(rubric.weights), accuracy=funcs[0] if funcs else None))

    @classmethod
    def load(cls, env_id: str, **kwargs: Any) -> VerifiersEnv:
        try:
            import verifiers
        except ImportError as e:
            raise ValueError(f"--env verifiers:{env_id}: the verifiers package is not installed ({e})") from None
        return cls(verifiers.load_environment(env_id, **kwargs), env_id)

    @staticmethod
    def _examples(rows: Any) -> list[Example]:
        out = []
        for row in rows:
            prompt = row["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
            out.append(Example(messages, {k: v for k, v in row.items() if k != "prompt"}))
        return out

    def get_dataset(self, n: int, seed: int) -> list[Example]:
        return self._examples(self.vf_env.get_dataset(n=n, seed=seed))

    def get_eval_dataset(self, n: int, seed: int = 0) -> list[Example]:
        return self._examples(self.vf_env.get_eval_dataset(n=n, seed=seed))
