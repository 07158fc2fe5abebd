"""Shared pieces of the claim benchmarks (benchmarks/claims/*.py): statistics over seeds, counted costs of a
config, one pretraining run through the ordinary stage, and the plot helper.

Statistics. Every claim is a difference between variants trained from the same seed (same data order and, where
the shapes allow, the same draws), so the comparison is paired: `paired_test` gives the mean difference, its
standard error, Student's t with n-1 degrees of freedom and its two-sided p (closed form through the regularised
incomplete beta function, no scipy), and the exact sign-flip permutation p (all 2^n sign patterns of the
differences; it assumes only that a difference is as likely to be +d as -d under "no effect").

Verdicts (`verdict`, from 5 seeds on): "reproduced" when the difference has the sign the paper claims, t's p < 0.05
and the sign-flip p < 0.05 or at its floor 2/2^n (every seed agrees: 0.0625 with 5 seeds); "not reproduced" when
the same holds with the opposite sign; otherwise "inside the noise".
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------- statistics
def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN below two values: no spread to estimate)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def fmt(xs: list[float], digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± s.e.' of `xs` times `scale`."""
    m, se = mean_se([x * scale for x in xs])
    return f"{m:.{digits}f} ± {se:.{digits}f}" if se == se else f"{m:.{digits}f}"


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p of Student's t with `df` degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    if t != t:
        return float("nan")
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def sign_flip_p(diffs: list[float]) -> float:
    """Exact two-sided sign-flip permutation p: the share of the 2^n sign patterns whose |mean| is at least the
    observed one (n <= 20)."""
    n = len(diffs)
    if n == 0 or n > 20:
        return float("nan")
    obs = abs(sum(diffs)) - 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    hits = sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= obs for signs in itertools.product((1, -1), repeat=n))
    return hits / 2 ** n


def paired_test(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired comparison of a against b (same seeds, same order): mean and s.e. of a - b, t, df, both p's."""
    if len(a) != len(b):
        raise ValueError(f"paired_test: {len(a)} values against {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    m, se = mean_se(d)
    t = m / se if se and se == se else (float("nan") if se != se else math.copysign(float("inf"), m) if m else 0.0)
    df = len(d) - 1
    p = (0.0 if math.isinf(t) else t_two_sided_p(t, df)) if df > 0 else float("nan")
    return {"mean": m, "se": se, "t": t, "df": df, "p_t": p, "p_sign": sign_flip_p(d), "n": len(d)}


def verdict(test: dict[str, float], claimed_sign: int, alpha: float = 0.05) -> str:
    """'reproduced' / 'not reproduced' / 'inside the noise' for a difference the paper says has `claimed_sign`:
    decided when t's p < alpha and the sign-flip p is below alpha or at its floor 2/2^n (every seed the same
    sign; with 5 seeds the floor is 0.0625); fewer than 5 seeds decide nothing."""
    n = test["n"]
    if n < 5:
        return f"too few seeds ({n}) for a verdict"
    p_t, p_sign = test["p_t"], test["p_sign"]
    if p_t != p_t or p_t >= alpha or p_sign > max(alpha, 2 / 2 ** n) + 1e-12 or test["mean"] == 0:
        return "inside the noise"
    return "reproduced" if test["mean"] * claimed_sign > 0 else "not reproduced"


def test_text(test: dict[str, float], digits: int = 4, scale: float = 1.0) -> str:
    """One line: Δ = m ± se (t, p_t, p_sign) over n seeds."""
    return (f"Δ = {test['mean'] * scale:+.{digits}f} ± {test['se'] * scale:.{digits}f} (t = {test['t']:.2f}, "
            f"df {test['df']}, p_t = {test['p_t']:.3f}, sign-flip p = {test['p_sign']:.3f}, n = {test['n']})")


# --------------------------------------------------------------------------------------------------- counted costs
def flops_per_token(config: Any, context: int) -> int:
    """Forward FLOPs per token: 2 × every weight a token multiplies (the active parameters less the input
    embedding, a lookup, and less the 1-D norm / bias / SSM scalars, which cost O(width)), plus the attention
    scores and weighted sum over `context` earlier tokens (4 · heads · head_dim · context per `*` layer). The
    Mamba scan's own arithmetic (O(d_inner · state) per token, the same in every variant of a comparison that
    keeps the M layers) is left out."""
    import torch

    from nemotron3.model import HybridLM

    with torch.device("meta"):
        model = HybridLM(config)
    active = model.num_parameters(active=True)
    small = sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2 or "conv1d" in n)
    matmul = active - config.vocab_size * config.hidden_size - small
    attn = 4 * config.num_attention_heads * config.head_dim * context * config.pattern.count("*")
    return 2 * matmul + attn


def params(config: Any) -> dict[str, int]:
    """Total and active-per-token parameter counts (nemotron3.count_parameters, on the meta device)."""
    from nemotron3 import count_parameters

    return count_parameters(config)


# --------------------------------------------------------------------------------------------------- runs
def write_config(config: Any, folder: Path) -> Path:
    """Save `config` as folder/config.json for the stages' `config` field (a ModelConfig path)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config.to_hf(), indent=1) + "\n")
    return path


def pretrain_run(config: Any, out: Path, seed: int, steps: int, batch_size: int, seq_len: int,
                 eval_problems: int, reuse: bool = False, tokenizer: Path | None = None, **train: Any) -> dict:
    """One `nemotron3 pretrain` run (the ordinary stage, in-process) of `config` into `out`; its summary.json
    plus `metrics` (the step records). With `reuse`, a finished run in `out` is read instead of retrained.
    `tokenizer`: a folder holding the tokenizer.json to use (the stage's --tokenizer) instead of training the
    same one again: the variants of one seed share the seed's tokenizer, trained by the seed's first run."""
    from rich.console import Console

    from nemotron3.stages.pretrain import PretrainConfig, pretrain

    summary_path = out / "summary.json"
    if not (reuse and summary_path.exists()):
        cfg_path = write_config(config, out.parent / f"{out.name}-config")
        cfg = PretrainConfig(config=str(cfg_path), out=out, seed=seed, steps=steps, batch_size=batch_size,
                             seq_len=seq_len, eval_every=steps, eval_problems=eval_problems, log_every=10**6,
                             overwrite=True, tokenizer=tokenizer, **train)
        pretrain(cfg, Console(quiet=True))
    summary = json.loads(summary_path.read_text())
    summary["metrics"] = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return summary


def set_threads(n: int) -> None:
    """Use `n` threads for torch (the machine is shared: one per run is what it can really give)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def machine() -> str:
    """One line describing where the numbers were taken."""
    return f"{platform.machine()} CPU, {os.cpu_count()} cores visible, {os.environ.get('OMP_NUM_THREADS', '?')} " \
           f"thread(s), {platform.python_version()}"


def say(text: str) -> None:
    """A timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --------------------------------------------------------------------------------------------------- plots
def figure(ncols: int, width: float = 4.2, height: float = 3.4):
    """A row of `ncols` axes, readable at small size (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3})
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def bars(ax: Any, names: list[str], values: dict[str, list[float]], ylabel: str, title: str,
         scale: float = 1.0, from_zero: bool = False) -> None:
    """Per variant: the mean (diamond) ± s.e. (error bar), and every seed's value as a small dot beside it."""
    allv = []
    for i, name in enumerate(names):
        xs = [v * scale for v in values[name]]
        allv += xs
        m, se = mean_se(xs)
        ax.errorbar(i, m, yerr=se if se == se else None, fmt="D", ms=7, capsize=5, color=f"C{i}", lw=2)
        ax.scatter([i + 0.18 + j * 0.04 for j in range(len(xs))], xs, s=12, color=f"C{i}", alpha=0.6, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=15, ha="right")
    ax.set_xlim(-0.5, len(names) - 0.3)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    lo, hi = min(allv), max(allv)
    pad = (hi - lo) * 0.25 or abs(hi) * 0.05 or 1.0
    ax.set_ylim(0 if from_zero else lo - pad, hi + pad)


def relative_bars(ax: Any, names: list[str], cost: dict[str, dict[str, float]], keys: list[tuple[str, str]],
                  ref: str, title: str) -> None:
    """Grouped bars of counted quantities relative to variant `ref`, each labelled with its ratio."""
    w = 0.8 / len(names)
    vals = []
    for i, n in enumerate(names):
        ys = [cost[n][k] / cost[ref][k] for k, _ in keys]
        vals += ys
        xs = [j + (i - (len(names) - 1) / 2) * w for j in range(len(keys))]
        ax.bar(xs, ys, width=w, label=n, color=f"C{i}", alpha=0.75)
        for x, y in zip(xs, ys):
            ax.text(x, y + 0.005, f"{y:.2f}", ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(keys)), [lbl for _, lbl in keys], rotation=15, ha="right")
    ax.set_ylabel(f"relative to {ref}")
    ax.set_ylim(min(0.8, min(vals) - 0.1), max(vals) * 1.28)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", ncol=len(names))


def save(fig: Any, path: Path, caption: str = "") -> None:
    """Write the figure as a small PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")
