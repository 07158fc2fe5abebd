"""Several environments in one run: `--env NAME[:WEIGHT]` specs, the per-batch mix by weight, per-environment metrics.

    specs = parse_env_specs(["tasks", "tools:0.5"], known=registry.is_known)   # [EnvSpec("tasks", 1.0), ...]
    mix = EnvMix([TaskEnv(), LookupEnv()], [1.0, 0.5], seed=0)
    items = mix.batch(step, 8)          # [(env, example), ...]: step's prompts, fixed by (seed, step)
    env_metrics(names, rewards, accuracy, turns, counts)   # {"env/tools/reward": ..., "tool_calls/valid_fraction": ...}

**Specs.** `NAME` (weight 1) or `NAME:WEIGHT`; the text after the last `:` is a weight when it reads as a number or
when what precedes it is a known name (so `verifiers:ID` is a name and `verifiers:ID:0.5` a weighted one). A weight
that is not a finite number > 0, an unknown or repeated name, or weights whose sum is not a positive finite number
raise one ValueError naming the spec.

**Mix.** Each step's n prompts are split over the environments in proportion to their weights by systematic
sampling: environment i gets floor(n·p_i) prompts, and the n - Σ floor remaining slots go to environments with
probability equal to their fractional parts (one uniform u from (seed, step); environment i gets a slot when an
integer of u + k falls in its share of the fractions' cumulative sum). So E[count_i] = n·p_i exactly and no count
ever strays from n·p_i by a whole prompt or more. Environment i then draws its prompts with
`get_dataset(count_i, derive_seed(seed, step))` (the seeds rl/prompts.py `TaskPrompts` uses, so `--env tasks`
alone draws the prompts of a run without `--env`).

**Metrics** per step: `env/<name>/reward`, `env/<name>/accuracy`, `env/<name>/turns` (mean model turns per
episode), `env/<name>/episodes`, `env/<name>/tool_calls/valid_fraction` for an environment with tool calls, and over
all environments `tool_calls/valid_fraction` (valid / (valid + invalid) calls; NaN when no call was made),
`tool_calls/total` and `tool_calls/<error kind>` (envs/tools.py TOOL_ERRORS).
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from nemotron3.envs.base import Environment, Example
from nemotron3.envs.tools import TOOL_ERRORS
from nemotron3.options import derive_seed


@dataclass(frozen=True)
class EnvSpec:
    name: str
    weight: float = 1.0


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_env_specs(specs: list[str], known: Callable[[str], bool]) -> list[EnvSpec]:
    """`--env` values -> specs (module docstring); ValueError naming the culprit."""
    if not specs:
        raise ValueError("--env: no environment given (e.g. --env tasks --env tools:0.5)")
    out: list[EnvSpec] = []
    for spec in specs:
        name, sep, tail = spec.rpartition(":")
        if not sep or not name or (_number(tail) is None and not known(name)):
            name, weight = spec, 1.0
        else:
            weight = _number(tail)
            if weight is None:
                raise ValueError(f"--env {spec}: the weight {tail!r} is not a number")
        if not known(name):
            raise ValueError(f"--env {spec}: unknown environment {name!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--env {spec}: the weight must be a finite number > 0, got {tail}")
        if any(s.name == name for s in out):
            raise ValueError(f"--env {spec}: environment {name!r} is given twice")
        out.append(EnvSpec(name, weight))
    total = sum(s.weight for s in out)
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"--env {' '.join(specs)}: the weights sum to {total}; they must sum to a finite number > 0")
    return out


def allocate(weights: list[float], n: int, seed: int, step: int) -> list[int]:
    """Prompts per environment for one step: systematic sampling of n·p (module docstring)."""
    total = sum(weights)
    shares = [n * w / total for w in weights]
    counts = [math.floor(s) for s in shares]
    u = random.Random(f"envmix/{seed}/{step}").random()
    acc = 0.0
    for i, s in enumerate(shares):
        frac = s - counts[i]
        # the integers k with acc <= u + k < acc + frac (frac < 1: at most one)
        counts[i] += math.ceil(acc + frac - u) - math.ceil(acc - u)
        acc += frac
    counts[shares.index(max(shares))] += n - sum(counts)  # float rounding of Σ frac can leave the total one off
    return counts


class EnvMix:
    """Environments mixed per batch by weight (module docstring)."""

    def __init__(self, envs: list[Environment], weights: list[float], seed: int = 0) -> None:
        if len(envs) != len(weights) or not envs:
            raise ValueError(f"{len(envs)} environments for {len(weights)} weights")
        names = [e.name for e in envs]
        if len(set(names)) != len(names):
            raise ValueError(f"environment names must be distinct, got {names}")
        self.envs, self.weights, self.seed = list(envs), list(weights), seed

    def batch(self, step: int, n: int) -> list[tuple[Environment, Example]]:
        """Step `step`'s n prompts, environment by environment in the order given."""
        out = []
        for env, count in zip(self.envs, allocate(self.weights, n, self.seed, step)):
            if count:
                out += [(env, ex) for ex in env.get_dataset(count, derive_seed(self.seed, step))]
        return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def env_metrics(names: list[str], rewards: list[float], accuracy: list[float], turns: list[int],
                counts: list[collections.Counter]) -> dict[str, float]:
    """Per-environment and overall metrics of a batch of episodes, one entry per episode in each list (module
    docstring); NaN rewards or accuracies (no opinion) are left out of the means."""
    out: dict[str, float] = {}
    total: collections.Counter = collections.Counter()
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        c = sum((counts[i] for i in idx), collections.Counter())
        total += c
        out[f"env/{name}/reward"] = _mean([rewards[i] for i in idx])
        out[f"env/{name}/accuracy"] = _mean([accuracy[i] for i in idx])
        out[f"env/{name}/turns"] = sum(turns[i] for i in idx) / len(idx)
        out[f"env/{name}/episodes"] = float(len(idx))
        if c["valid"] + c["invalid"]:
            out[f"env/{name}/tool_calls/valid_fraction"] = c["valid"] / (c["valid"] + c["invalid"])
    calls = total["valid"] + total["invalid"]
    out["tool_calls/valid_fraction"] = total["valid"] / calls if calls else math.nan
    out["tool_calls/total"] = float(calls)
    for kind in TOOL_ERRORS:
        out[f"tool_calls/{kind}"] = float(total[kind])
    return out
