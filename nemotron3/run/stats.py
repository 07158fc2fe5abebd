"""Percentages and standard errors as the report prints them (report.md, report.json, the plots' error bars)."""

from __future__ import annotations

import math


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def binomial_se(p: float, n: int) -> float:
    """The standard error of an exact-match rate p measured on n problems, sqrt(p (1 - p) / n): the sampling
    noise of which problems were drawn (the plug-in estimate: 0 at p = 0 or 1, where it understates it)."""
    if n <= 0:
        raise ValueError(f"a standard error needs at least one problem, got n = {n}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"an exact-match rate is in [0, 1], got {p}")
    return math.sqrt(p * (1.0 - p) / n)


def mean_se(ps: list[float], n: int) -> float:
    """The standard error of the mean of per-family rates, each on n problems of its own family (independent
    samples): sqrt(sum p (1 - p) / n) / families."""
    return math.sqrt(sum(binomial_se(p, n) ** 2 for p in ps)) / len(ps)


def pct_se(x: float | None, se: float | None) -> str:
    """`51 ± 6 %`; without a standard error, as pct."""
    return pct(x) if x is None or se is None else f"{100 * x:.0f} ± {100 * se:.0f} %"


def se_of(x: float | None, n: int | None) -> float | None:
    return None if x is None or n is None else binomial_se(x, n)
