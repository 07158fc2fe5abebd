"""Environments by name, as `--env` names them.

    tasks                  the six task families mixed evenly (TaskEnv), single-turn
    add, mul, modpow, sort, countdown, word
                           one task family
    tools                  the embedded tool environment (LookupEnv): lookup + calculate, multi-turn
    verifiers:ID           an installed `verifiers` environment (envs/verifiers_adapter.py), when verifiers imports

`load_environment(name, difficulty=1)` builds one; `is_known(name)` is what `parse_env_specs` checks against.
"""

from __future__ import annotations

from nemotron3 import tasks
from nemotron3.envs.base import Environment
from nemotron3.envs.lookup import LookupEnv
from nemotron3.envs.task_env import TaskEnv

VERIFIERS_PREFIX = "verifiers:"
NAMES = ("tasks", "tools", *sorted(tasks.FAMILIES))


def is_known(name: str) -> bool:
    return name in NAMES or (name.startswith(VERIFIERS_PREFIX) and len(name) > len(VERIFIERS_PREFIX))


def load_environment(name: str, difficulty: int = 1) -> Environment:
    """The environment called `name` (module docstring); ValueError for an unknown name."""
    if name == "tasks":
        return TaskEnv(difficulty=difficulty)
    if name == "tools":
        return LookupEnv(difficulty=difficulty)
    if name in tasks.FAMILIES:
        return TaskEnv([name], difficulty=difficulty)
    if is_known(name):
        from nemotron3.envs.verifiers_adapter import VerifiersEnv

        return VerifiersEnv.load(name[len(VERIFIERS_PREFIX):])
    raise ValueError(f"unknown environment {name!r}; expected one of {', '.join(NAMES)} or verifiers:ID")
