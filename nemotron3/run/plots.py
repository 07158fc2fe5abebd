"""The report's plots (matplotlib, Agg): loss curves, expert balance, exact match, RL, MTP, speed, quantization.
Each is drawn only when the stages that feed it ran; nothing is measured here."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(out: Path, s: dict[str, dict], acc: dict, plots: Path) -> list[tuple[str, str]]:
    """Draw every plot the stages' data allows (`s`: the stages' summaries; `acc`: report.accuracy_tables(s));
    returns (file, caption) in report order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        made.append((f"plots/{name}", caption))

    pre = read_metrics(out / "pretrain" / "metrics.jsonl")
    if pre:
        twin = read_metrics(out / "precision" / "twin" / "metrics.jsonl")
        fig, ax = plt.subplots(figsize=(9, 4.8))
        train = [r for r in pre if "loss" in r]
        ev = [r for r in pre if "eval_loss" in r]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0", alpha=0.35, lw=1,
                label="main head, train")
        if any("mtp_loss" in r for r in train):
            ax.plot([r["step"] for r in train], [r["mtp_loss"] for r in train], color="C1", alpha=0.35, lw=1,
                    label="MTP (mean over depths), train")
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", color="C0", label="main head, held-out")
        if any("eval_mtp_loss" in r for r in ev):
            ax.plot([r["step"] for r in ev], [r["eval_mtp_loss"] for r in ev], "o-", color="C1",
                    label="MTP, held-out")
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
        ax.legend(fontsize=8)
        save(fig, "loss.png", "Pretraining loss, main head and MTP, train and held-out; the high-precision twin "
             "(same weights, data and schedule) for its first steps")
        bal = [r for r in pre if "load_max_min" in r]
        if bal:
            fig, ax = plt.subplots(figsize=(9, 3.6))
            ax.plot([r["step"] for r in bal], [r["load_max_min"] for r in bal], lw=1, label="pretrain")
            sft_bal = [r for r in read_metrics(out / "sft" / "metrics.jsonl") if "load_max_min" in r]
            if sft_bal:
                off = bal[-1]["step"]
                ax.plot([off + r["step"] for r in sft_bal], [r["load_max_min"] for r in sft_bal], lw=1,
                        label="SFT (steps after pretraining)")
            ax.axhline(1.0, color="grey", ls=":")
            ax.set(xlabel="step", ylabel="max / min tokens per expert", yscale="log",
                   title="Expert load balance, worst MoE layer (1 = perfectly balanced)")
            ax.legend(fontsize=8)
            save(fig, "balance.png", "Expert load balance over training: the worst layer's most-loaded over "
                 "least-loaded expert, per step (aux-loss-free bias balancing)")

    if acc["families"]:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
        _grouped_bars(axes[0], acc["families"], acc["series"], "held-out exact match (%)",
                      "Exact match per task family after each stage")
        _grouped_bars(axes[1], acc["modes"], acc["mode_means"], "mean exact match over families (%)",
                      "By reasoning mode")
        save(fig, "accuracy.png", "Held-out greedy exact match per family (left) and by reasoning mode, mean over "
             "families (right)")

    rl_runs = [(name, read_metrics(out / name / "metrics.jsonl")) for name in ("rl", "igrpo")]
    rl_runs = [(n, [r for r in m if "reward" in r]) for n, m in rl_runs]
    rl_runs = [(n, m) for n, m in rl_runs if m]
    if rl_runs:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for j, (name, m) in enumerate(rl_runs):
            label = "GRPO" if name == "rl" else "iGRPO"
            steps = [r["step"] for r in m]
            axes[0].plot(steps, smooth([r["reward"] for r in m]), color=f"C{j}", label=f"{label}: reward")
            if all("accuracy" in r for r in m):
                axes[0].plot(steps, smooth([r["accuracy"] for r in m]), "--", color=f"C{j}",
                             label=f"{label}: sampled accuracy")
            held = [r for r in read_metrics(out / name / "metrics.jsonl") if "heldout_accuracy" in r]
            summ = s.get(name, {})
            pts = ([(0, summ["accuracy_before"])] if summ.get("accuracy_before") else []) + \
                [(r["step"], r["heldout_accuracy"]) for r in held]
            if pts:
                for f in sorted(pts[0][1]):
                    axes[1].plot([p[0] for p in pts], [100 * p[1][f] for p in pts], "o-" if j == 0 else "s--",
                                 color=f"C{sorted(pts[0][1]).index(f)}", label=f"{label} {f}")
        axes[0].set(xlabel="RL step", ylabel="mean over the step's completions",
                    title="RL reward and sampled accuracy (rolling mean of 5 steps)")
        axes[0].legend(fontsize=8)
        axes[1].set(xlabel="RL step", ylabel="held-out greedy exact match (%)",
                    title="Held-out exact match, reasoning on")
        axes[1].legend(fontsize=7, ncol=2)
        save(fig, "rl.png", "RL: reward and sampled accuracy per step (left); held-out exact match before and "
             "after (right)")

    spec = s.get("speculative")
    if spec:
        ks = sorted(spec["by_k"], key=int)
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.bar([str(k) for k in ks], [spec["by_k"][k]["acceptance_length"] for k in ks], color="C0", alpha=0.7,
               label="acceptance length (tokens per verify forward)")
        ax2 = ax.twinx()
        ax2.plot([str(k) for k in ks], [spec["by_k"][k]["speedup"] for k in ks], "o-", color="C3",
                 label="decode speed-up over plain decoding")
        ax2.axhline(1.0, color="C3", ls=":")
        ax.set(xlabel="k (draft tokens per round)", ylabel="tokens per verify forward",
               title="MTP speculative decoding, batch 1, greedy")
        ax2.set_ylabel("speed-up (x)")
        ax2.set_ylim(0, max(1.2, 1.1 * max(spec["by_k"][k]["speedup"] for k in ks)))
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        save(fig, "speculative.png", "MTP speculation on the RL model: acceptance length and wall-clock speed-up "
             "by number of draft tokens k")

    speed = s.get("speed")
    if speed:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = ["transformers", "nemotron3 engine"]
        vals = [speed["transformers_tok_s"], speed["nemotron3_tok_s"]]
        ax.barh(names, vals, color=["C7", "C0"])
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:,.0f} tok/s", va="center")
        ax.set(xlabel="decode tok/s, batch 1, greedy", xlim=(0, max(vals) * 1.35),
               title=f"Same weights: the engine at {speed['ratio']:.1f}x transformers")
        save(fig, "speed.png", "Decode speed on the RL model's weights, our engine against transformers' "
             "generate, measured in this run")

    quant = s.get("quantize")
    if quant:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for name, row in quant["schemes"].items():
            ax.scatter(row["bytes"] / 1e6, 100 * row["accuracy_mean"], s=30)
            ax.annotate(name, (row["bytes"] / 1e6, 100 * row["accuracy_mean"]), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel="checkpoint weight bytes (MB, log scale)",
               ylabel="mean exact match over families (%)", title="Quantized checkpoints: accuracy against size")
        save(fig, "quantize.png", "Every quantization scheme of the RL model: held-out exact match (reasoning on) "
             "against the bytes of its weight files")
    return made


def _grouped_bars(ax, labels: list[str], series: list[tuple[str, dict[str, float]]], ylabel: str,
                  title: str) -> None:
    """One group of bars per label, one bar per non-empty series ({label: fraction}), in percent."""
    import numpy as np

    series = [(name, vals) for name, vals in series if vals]
    w, x = 0.8 / max(1, len(series)), np.arange(len(labels))
    for i, (name, vals) in enumerate(series):
        ax.bar(x + i * w - 0.4 + w / 2, [100 * vals.get(k, 0) for k in labels], w, label=name)
    ax.set(xticks=x, xticklabels=labels, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)


def smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]
