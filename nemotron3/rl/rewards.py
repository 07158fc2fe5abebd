"""Reward functions for RL, with TRL's signature, and the checks that keep a bad one from corrupting a run.

    reward(prompts, completions, **columns) -> list[float | None]

`prompts` are conversations (lists of OpenAI-style messages, the conversational format of TRL), `completions`
the sampled replies as one-message conversations `[{"role": "assistant", "content": text}]`, where `text` is
everything the policy wrote after the generation prompt (its reasoning, `</think>`, the answer). `columns`
are the prompt set's other fields, one value per completion (the embedded tasks give `family`), plus
`completion_ids` (the token ids). `None` means "no opinion" (the function does not apply to this sample).

Several functions combine as TRL's default `sum_then_normalize`: reward = Σ_f w_f · r_f, a None counting as
0 unless every function returned None, in which case the reward is NaN and the sample's advantage is 0.

`load(spec)` resolves `module:function` (any importable module; a path like `my_rewards.py:fn` too). The
default, `tasks`, is the embedded task verifiers (nemotron3/tasks: 1.0 when the final answer after the last
`</think>` is right, else 0.0). A reward function that raises, returns a list of the wrong length, or a value
that is not a finite number or None fails the step with a `RewardError` naming the function and the
sample; the trainer has written nothing for that step, so its last checkpoint stays intact.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nemotron3 import tasks

RewardFn = Callable[..., list]


class RewardError(ValueError):
    """A reward function misbehaved: raised, wrong length, or a value that is not a number or None."""


def name_of(fn: RewardFn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def load(spec: str) -> RewardFn:
    """`tasks` (the embedded verifiers), `module:function`, or `path/to/file.py:function`."""
    if spec == "tasks":
        return tasks.reward
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"reward function {spec!r}: expected 'module:function' (or 'tasks')")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:
        raise RewardError(f"reward function {spec!r}: cannot import {module_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _check(fn: RewardFn, values: Any, n: int) -> list[float]:
    """The function's output as floats (None -> NaN), or a RewardError saying what is wrong."""
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward function {name_of(fn)} returned {type(values).__name__}, expected a list of "
                          f"{n} floats (or None)")
    if len(values) != n:
        raise RewardError(f"reward function {name_of(fn)} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            out.append(float(v))
        else:
            raise RewardError(f"reward function {name_of(fn)}: completion {i} got {v!r}, expected a finite number "
                              "or None")
    return out


def score(fns: list[RewardFn], weights: list[float], prompts: list, completions: list,
          columns: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rewards (N,) float64, NaN where every function returned None; per-function values (N, F), NaN = None)."""
    if len(weights) != len(fns):
        raise RewardError(f"{len(weights)} reward weights for {len(fns)} reward functions")
    n = len(completions)
    per = torch.empty(n, len(fns), dtype=torch.float64)
    for j, fn in enumerate(fns):
        try:
            values = fn(prompts, completions, **columns)
        except Exception as e:
            raise RewardError(f"reward function {name_of(fn)} raised {type(e).__name__}: {e}") from e
        per[:, j] = torch.tensor(_check(fn, values, n), dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    total = (per.nan_to_num(0.0) * w).sum(-1)
    total[per.isnan().all(-1)] = math.nan
    return total, per
