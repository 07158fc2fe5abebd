"""The report's plots (matplotlib, Agg): loss curves, expert balance, exact match, RL, MTP, speed, quantization.
Each is drawn only when the stages that feed it ran; nothing is measured here.

Every figure is at most WIDTH_PX wide at DPI, the width of the HTML report's column, so the page shows it at
its own size, and its smallest text is 9 pt (12.5 px). `text_problems` checks a figure for text too small at
that size, text that overlaps other text, and text outside the figure (the tests run it on every plot).
Accuracy carries one binomial standard error (report.binomial_se) as error bars.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DPI = 100
WIDTH_PX = 960  # the report page's column (document.py: 1000 px less its padding): figures are shown 1:1
WIDTH = WIDTH_PX / DPI  # inches
MIN_TEXT_PX = 12.0  # the smallest text, in pixels as the page shows it
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9, "xtick.labelsize": 9,
         "ytick.labelsize": 9, "figure.dpi": DPI, "savefig.dpi": DPI}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heldout_points(out: Path, name: str, summary: dict) -> list[tuple[int, dict[str, float], int | None]]:
    """An RL stage's held-out exact match over its run: (step, {family: exact match}, problems per family), from
    the summary's `accuracy_before` (step 0) and the `heldout_accuracy` records of its metrics.jsonl."""
    n = summary.get("config", {}).get("eval_problems")
    pts = [(0, summary["accuracy_before"], n)] if summary.get("accuracy_before") else []
    for r in read_metrics(out / name / "metrics.jsonl"):
        if "heldout_accuracy" in r:
            pts.append((r["step"], r["heldout_accuracy"], r.get("heldout_problems", n)))
    return pts


def _span(lo: float, hi: float, least: float, floor: float | None = 0.0, ceil: float | None = 100.0,
          pad: float = 0.08) -> tuple[float, float]:
    """Axis limits around data in [lo, hi], padded, clipped to [floor, ceil], at least `least` wide (all-equal
    data, e.g. a smoke run's zeros, then still gets a readable axis above the floor)."""
    d = max(hi - lo, least)
    a, b = lo - pad * d, lo + d + pad * d
    if floor is not None and a < floor:
        a, b = floor, max(b, floor + least)
    if ceil is not None:
        b = min(b, ceil)
    return a, b


def _se(p: float, n: int | None) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


@contextmanager
def _style() -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(STYLE):
        yield plt


def draw(out: Path, s: dict[str, dict], acc: dict, plots: Path) -> list[tuple[str, str]]:
    """Draw every plot the stages' data allows (`s`: the stages' summaries; `acc`: report.accuracy_tables(s));
    returns (file, caption) in report order."""
    plots.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []
    with _style() as plt:
        for name, caption, fig in figures(out, s, acc):
            fig.savefig(plots / name, dpi=DPI)
            plt.close(fig)
            made.append((f"plots/{name}", caption))
    return made


def figures(out: Path, s: dict[str, dict], acc: dict) -> list[tuple[str, str, Any]]:
    """(file name, caption, matplotlib Figure) for every plot the data allows, in report order (call it inside
    `_style()`, as `draw` does, for the report's fonts)."""
    made = []
    for fn in (_loss, _balance, _accuracy, _rl, _speculative, _speed, _quantize):
        got = fn(out, s, acc)
        if got is not None:
            made.append(got)
    return made


def _figure(height: float, width: float = WIDTH, **kw: Any) -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), layout="constrained", **kw)


def _loss(out: Path, s: dict, acc: dict) -> tuple | None:
    pre = read_metrics(out / "pretrain" / "metrics.jsonl")
    if not pre:
        return None
    twin = read_metrics(out / "precision" / "twin" / "metrics.jsonl")
    fig, ax = _figure(4.6)
    train = [r for r in pre if "loss" in r]
    ev = [r for r in pre if "eval_loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0", alpha=0.35, lw=1,
            label="main head, train")
    if any("mtp_loss" in r for r in train):
        ax.plot([r["step"] for r in train], [r["mtp_loss"] for r in train], color="C1", alpha=0.35, lw=1,
                label="MTP (mean over depths), train")
    ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", color="C0", label="main head, held-out")
    if any("eval_mtp_loss" in r for r in ev):
        ax.plot([r["step"] for r in ev], [r["eval_mtp_loss"] for r in ev], "o-", color="C1", label="MTP, held-out")
    tev = [r for r in twin if "eval_loss" in r]
    if tev:
        ax.plot([r["step"] for r in tev], [r["eval_loss"] for r in tev], "s--", color="C2",
                label="main head, held-out: high-precision twin")
    if "pretrain" in s and s["pretrain"].get("config", {}).get("nvfp4_high_precision_tail"):
        cfg = s["pretrain"]["config"]
        ax.axvline(round(cfg["steps"] * (1 - cfg["nvfp4_high_precision_tail"])), color="grey", ls=":",
                   label="NVFP4 -> high precision switch")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log",
           title="Pretraining loss: NVFP4 recipe with MTP, and its high-precision twin")
    ax.legend(loc="upper right")
    return ("loss.png", "Pretraining loss, main head and MTP, train and held-out; the high-precision twin (same "
            "weights, data and schedule) for its first steps", fig)


def _balance(out: Path, s: dict, acc: dict) -> tuple | None:
    bal = [r for r in read_metrics(out / "pretrain" / "metrics.jsonl") if "load_max_min" in r]
    if not bal:
        return None
    fig, ax = _figure(3.6)
    ax.plot([r["step"] for r in bal], [r["load_max_min"] for r in bal], lw=1, label="pretrain")
    sft_bal = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "load_max_min" in r]
    if sft_bal:
        off = bal[-1]["step"]
        ax.plot([off + r["step"] for r in sft_bal], [r["load_max_min"] for r in sft_bal], lw=1,
                label="SFT (steps after pretraining)")
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(xlabel="step", ylabel="max / min tokens per expert", yscale="log",
           title="Expert load balance, worst MoE layer (1 = perfectly balanced)")
    ax.legend(loc="upper right")
    return ("balance.png", "Expert load balance over training: the worst layer's most-loaded over least-loaded "
            "expert, per step (aux-loss-free bias balancing)", fig)


def _accuracy(out: Path, s: dict, acc: dict) -> tuple | None:
    if not acc["families"]:
        return None
    fig, axes = _figure(7.4, nrows=2)
    _grouped_bars(axes[0], acc["families"], acc["series"], "held-out exact match (%)",
                  "Exact match per task family after each stage")
    _grouped_bars(axes[1], acc["modes"], acc["mode_means"], "mean over families (%)",
                  "By reasoning mode, after SFT and after RL")
    return ("accuracy.png", "Held-out greedy exact match per family (top) and by reasoning mode, mean over families "
            "(bottom); error bars: one binomial standard error", fig)


def _grouped_bars(ax: Any, labels: list[str], series: list[tuple[str, dict[str, float], dict[str, float]]],
                  ylabel: str, title: str) -> None:
    """One group of bars per label, one bar per non-empty series (name, {label: fraction}, {label: standard
    error}), in percent, with the standard errors as error bars; the legend above the bars."""
    import numpy as np

    series = [x for x in series if x[1]]
    w, x = 0.8 / max(1, len(series)), np.arange(len(labels))
    top = 0.0
    for i, (name, vals, ses) in enumerate(series):
        ys = [100 * vals.get(k, 0) for k in labels]
        err = [100 * ses.get(k, 0.0) for k in labels]
        ax.bar(x + i * w - 0.4 + w / 2, ys, w, yerr=err, capsize=2, error_kw={"lw": 0.8}, label=name)
        top = max(top, *[y + e for y, e in zip(ys, err)])
    ax.set(xticks=x, xticklabels=labels, ylabel=ylabel, title=title, ylim=(0, max(10.0, 1.1 * top)))
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), frameon=False)


def _rl(out: Path, s: dict, acc: dict) -> tuple | None:
    runs = [(name, [r for r in read_metrics(out / name / "metrics.jsonl") if "reward" in r])
            for name in ("rl", "igrpo")]
    runs = [(n, m) for n, m in runs if m]
    if not runs:
        return None
    fig, axes = _figure(7.6, nrows=2)
    seen: list[float] = []  # every value on each axis, for its limits
    held: list[float] = []
    for j, (name, m) in enumerate(runs):
        label = "GRPO" if name == "rl" else "iGRPO"
        seen += [r["reward"] for r in m] + [r["accuracy"] for r in m if "accuracy" in r]
        steps = [r["step"] for r in m]
        axes[0].plot(steps, smooth([r["reward"] for r in m]), color=f"C{j}", label=f"{label}: reward")
        if all("accuracy" in r for r in m):
            axes[0].plot(steps, smooth([r["accuracy"] for r in m]), "--", color=f"C{j}",
                         label=f"{label}: sampled accuracy")
        pts = heldout_points(out, name, s.get(name, {}))
        if not pts:
            continue
        fams = sorted(pts[0][1])
        xs = [p[0] for p in pts]
        for f in fams:
            axes[1].plot(xs, [100 * p[1].get(f, math.nan) for p in pts], "-" if j == 0 else "--", lw=1, alpha=0.55,
                         color=f"C{fams.index(f) + 2}", label=f"{label}: {f}")
        mean = [sum(p[1].values()) / len(p[1]) for p in pts]
        err = [100 * math.sqrt(sum(_se(a, p[2]) ** 2 for a in p[1].values())) / len(p[1]) for p in pts]
        held += [100 * a for p in pts for a in p[1].values()] + [100 * v + e for v, e in zip(mean, err)]
        axes[1].errorbar(xs, [100 * v for v in mean], yerr=err, fmt="o-" if j == 0 else "s--", color=f"C{j}",
                         lw=2.2, capsize=3, label=f"{label}: mean over families ± s.e.")
    axes[0].set_ylim(*_span(min(seen), max(seen), 0.05, floor=min(0.0, min(seen)), ceil=None))
    if held:
        axes[1].set_ylim(*_span(0.0, max(held), 5.0))
    axes[0].set(xlabel="RL step", ylabel="mean over the step's completions",
                title="RL reward and sampled accuracy (rolling mean of 5 steps)")
    axes[0].legend(loc="lower left", bbox_to_anchor=(1.0, 0.0), frameon=False)
    axes[1].set(xlabel="RL step", ylabel="held-out exact match (%)",
                title="Held-out greedy exact match, reasoning on, during RL")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return ("rl.png", "RL: reward and sampled accuracy per step (top); held-out exact match before, at evenly spaced "
            "steps (on the first problems of the held-out set) and after, per family and the mean over families "
            "with one standard error (bottom)", fig)


def _speculative(out: Path, s: dict, acc: dict) -> tuple | None:
    spec = s.get("speculative")
    if not spec:
        return None
    ks = sorted(spec["by_k"], key=int)
    fig, ax = _figure(3.8, 7.5)
    ax.bar([str(k) for k in ks], [spec["by_k"][k]["acceptance_length"] for k in ks], color="C0", alpha=0.7,
           label="acceptance length (tokens per verify forward)")
    ax2 = ax.twinx()
    ax2.plot([str(k) for k in ks], [spec["by_k"][k]["speedup"] for k in ks], "o-", color="C3",
             label="decode speed-up over plain decoding")
    ax2.axhline(1.0, color="C3", ls=":")
    ax.set(xlabel="k (draft tokens per round)", ylabel="tokens per verify forward",
           title="MTP speculative decoding, batch 1, greedy")
    ax.set_ylim(0, 1.45 * max(spec["by_k"][k]["acceptance_length"] for k in ks))
    ax2.set_ylabel("speed-up (x)")
    ax2.set_ylim(0, 1.45 * max(1.2, max(spec["by_k"][k]["speedup"] for k in ks)))
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    return ("speculative.png", "MTP speculation on the RL model: acceptance length and wall-clock speed-up by number "
            "of draft tokens k", fig)


def _speed(out: Path, s: dict, acc: dict) -> tuple | None:
    speed = s.get("speed")
    if not speed:
        return None
    fig, ax = _figure(3.0, 7.5)
    names = ["transformers", "nemotron3 engine"]
    vals = [speed["transformers_tok_s"], speed["nemotron3_tok_s"]]
    ax.barh(names, vals, color=["C7", "C0"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,.0f} tok/s", va="center")
    ax.set(xlabel="decode tok/s, batch 1, greedy", xlim=(0, max(vals) * 1.35),
           title=f"Same weights: the engine at {speed['ratio']:.1f}x transformers")
    return ("speed.png", "Decode speed on the RL model's weights, our engine against transformers' generate, "
            "measured in this run", fig)


def _quantize(out: Path, s: dict, acc: dict) -> tuple | None:
    """One row per scheme (its name as the row label, so no label can sit on another): mean exact match with one
    standard error (left), and the bytes of its weight files (right)."""
    quant = s.get("quantize")
    if not quant or not quant["schemes"]:
        return None
    n = quant.get("problems_per_family")
    names = list(quant["schemes"])[::-1]  # the table's order, top to bottom
    rows = [quant["schemes"][k] for k in names]
    fig, (ax, bx) = _figure(1.4 + 0.36 * len(names), nrows=1, ncols=2, sharey=True,
                            gridspec_kw={"width_ratios": [3, 2]})
    mean = [100 * r["accuracy_mean"] for r in rows]
    err = [100 * math.sqrt(sum(_se(a, n) ** 2 for a in r["accuracy"].values())) / len(r["accuracy"]) for r in rows]
    y = list(range(len(names)))
    ax.errorbar(mean, y, xerr=err, fmt="o", color="C0", capsize=3)
    tags = [re.search(r"\(W\d+A\d+\)", r.get("activations") or "") for r in rows]
    labels = [f"{k} {t.group(0)}" if t else k for k, t in zip(names, tags)]
    ax.set(yticks=y, yticklabels=labels, xlabel="mean exact match over families (%), ± one s.e.",
           title="Accuracy, reasoning on", ylim=(-0.6, len(names) - 0.4),
           xlim=_span(min(m - e for m, e in zip(mean, err)), max(m + e for m, e in zip(mean, err)), 5.0))
    ax.grid(axis="x", alpha=0.3)
    bx.barh(y, [r["bytes"] / 1e6 for r in rows], color="C7")
    bx.set(xlabel="weight files (MB)", title="Size")
    fig.suptitle("Quantized checkpoints of the RL model")
    return ("quantize.png", "Every quantization scheme of the RL model: held-out exact match (reasoning on; one "
            "standard error) and the bytes of its weight files", fig)


def smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


# ----------------------------------------------------------------------------------------- legibility
def text_problems(fig: Any, width_px: float = WIDTH_PX, min_px: float = MIN_TEXT_PX) -> list[str]:
    """What makes `fig` hard to read when shown `width_px` wide (or at its own size, if narrower): text smaller
    than `min_px` pixels, text whose box overlaps another's, and text outside the figure. Empty: readable."""
    from matplotlib.text import Text

    drawn: list[Text] = []  # the texts a draw renders (a tick label outside the axis range is not drawn)
    draw_text = Text.draw

    def record(self: Text, renderer: Any) -> None:
        drawn.append(self)
        draw_text(self, renderer)

    Text.draw = record
    try:
        fig.canvas.draw()
    finally:
        Text.draw = draw_text
    renderer = fig.canvas.get_renderer()
    shrink = min(1.0, width_px / fig.bbox.width)
    texts = [t for t in dict.fromkeys(drawn) if t.get_visible() and t.get_text().strip()]
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    boxes = [(t, b) for t, b in boxes if b.width > 0 and b.height > 0]
    problems = []
    for t, b in boxes:
        if t.get_fontsize() * fig.dpi / 72 * shrink < min_px:
            problems.append(f"{t.get_text()!r}: {t.get_fontsize() * fig.dpi / 72 * shrink:.1f} px shown")
        if b.x0 < -1 or b.y0 < -1 or b.x1 > fig.bbox.width + 1 or b.y1 > fig.bbox.height + 1:
            problems.append(f"{t.get_text()!r}: outside the figure")
    for i, (t, a) in enumerate(boxes):
        for u, c in boxes[i + 1:]:
            w = min(a.x1, c.x1) - max(a.x0, c.x0)
            h = min(a.y1, c.y1) - max(a.y0, c.y0)
            if w > 0.5 and h > 0.5:
                problems.append(f"{t.get_text()!r} overlaps {u.get_text()!r}")
    return problems
