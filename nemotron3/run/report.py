"""The report of `nemotron3 run`: report.json (the numbers), report.md and report.html (the same content, the
HTML with its plots inline) and plots/*.png, all from the stages' own summaries and metrics of this run.

Nothing here measures: every number is read from a stage's `summary.json` or `metrics.jsonl`, so the report
says exactly what the stages said (a test checks it). A stage that did not run appears as skipped, with why.

report.json keys (fractions in [0, 1] unless said otherwise):
    accuracy_pretrain    {family: exact match} after pretraining (the pretraining prompt `<s>{problem}\\n`)
    accuracy_sft         {family: exact match} after SFT, reasoning on (chat prompt)
    accuracy_rl          {family: exact match} after RL, reasoning on
    accuracy_by_mode     {"sft" | "rl": {mode: {family: exact match}}}, modes on, off, budget_N
    mtp_acceptance_length, mtp_speedup    at k = 3 on the RL model (tokens per verify forward; tok/s ratio)
    mtp_by_k             {k: {acceptance_length, speedup, tok_s, identical}}
    nvfp4_loss_gap       relative held-out loss gap of the NVFP4 run over its high-precision twin at the twin's
                         last step (nvfp4_loss_gap_nats: the same in nats)
    engine_vs_transformers  {transformers_tok_s, nemotron3_tok_s, ratio, identical}
    quantized            {scheme: {accuracy (mean over families), bytes, accuracy_by_family}}
    seconds_by_stage, seconds_total, stages ({stage: "done" | "skipped: why"}), plan, environment
"""

from __future__ import annotations

import base64
import html
import json
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from nemotron3.run.plan import Plan

# ----------------------------------------------------------------------------------------- a tiny document
Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", file, caption)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            header, rows = b[1], b[2]
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                                 + ["| " + " | ".join(map(str, r)) + " |" for r in rows]))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block], folder: Path, title: str) -> str:
    """A self-contained page: the PNGs inline as data URIs, so the file can be mailed or opened anywhere."""
    body = []
    for b in blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode((folder / b[1]).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                        f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}figcaption{color:#666;font-size:90%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# ----------------------------------------------------------------------------------------- reading the run
def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def environment() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("nemotron3", "torch", "transformers", "compressed-tensors", "safetensors", "tokenizers", "matplotlib",
                 "rich"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


# ----------------------------------------------------------------------------------------- plots
def _plots(out: Path, s: dict[str, dict], plots: Path) -> list[tuple[str, str]]:
    """Draw every plot the stages' data allows; returns (file, caption) in report order."""
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

    acc = _accuracy_tables(s)
    if acc["families"]:
        import numpy as np

        fams = acc["families"]
        series = [(name, vals) for name, vals in acc["series"] if vals]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
        w = 0.8 / max(1, len(series))
        x = np.arange(len(fams))
        for i, (name, vals) in enumerate(series):
            axes[0].bar(x + i * w - 0.4 + w / 2, [100 * vals.get(f, 0) for f in fams], w, label=name)
        axes[0].set(xticks=x, xticklabels=fams, ylabel="held-out exact match (%)",
                    title="Exact match per task family after each stage")
        axes[0].legend(fontsize=8)
        modes = acc["modes"]
        by = [(name, vals) for name, vals in acc["mode_means"] if vals]
        w = 0.8 / max(1, len(by))
        x = np.arange(len(modes))
        for i, (name, vals) in enumerate(by):
            axes[1].bar(x + i * w - 0.4 + w / 2, [100 * vals.get(m, 0) for m in modes], w, label=name)
        axes[1].set(xticks=x, xticklabels=modes, ylabel="mean exact match over families (%)",
                    title="By reasoning mode")
        axes[1].legend(fontsize=8)
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
            axes[0].plot(steps, _smooth([r["reward"] for r in m]), color=f"C{j}", label=f"{label}: reward")
            if all("accuracy" in r for r in m):
                axes[0].plot(steps, _smooth([r["accuracy"] for r in m]), "--", color=f"C{j}",
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


def _smooth(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1): i + 1]) / len(xs[max(0, i - k + 1): i + 1]) for i in range(len(xs))]


def _accuracy_tables(s: dict[str, dict]) -> dict:
    """The per-family series (pretrain, SFT, RL) and the by-mode tables, from the stages' summaries."""
    pre = s.get("pretrain", {}).get("accuracy", {})
    sft_modes = {m: v for m, v in s.get("sft", {}).get("accuracy_after", {}).items() if m != "raw"}
    rl_modes = dict(s.get("eval", {}).get("accuracy", {}))
    if s.get("rl", {}).get("accuracy_after"):
        rl_modes = {"on": s["rl"]["accuracy_after"], **rl_modes}
    igrpo = s.get("igrpo", {}).get("accuracy_after", {})
    families = sorted(set(pre) | set(sft_modes.get("on", {})) | set(rl_modes.get("on", {})))
    series = [("after pretraining (pretraining prompt)", pre), ("after SFT, reasoning on", sft_modes.get("on", {})),
              ("after RL (GRPO), reasoning on", rl_modes.get("on", {})), ("after iGRPO, reasoning on", igrpo)]
    modes = [m for m in ("on", "off", *sorted(set(sft_modes) - {"on", "off"}, key=lambda m: int(m.split("_")[1])))
             if m in sft_modes or m in rl_modes]

    def means(table: dict[str, dict[str, float]]) -> dict[str, float]:
        return {m: sum(v.values()) / len(v) for m, v in table.items() if v}

    return {"families": families, "series": series, "modes": modes, "sft_modes": sft_modes, "rl_modes": rl_modes,
            "mode_means": [("after SFT", means(sft_modes)), ("after RL", means(rl_modes))]}


# ----------------------------------------------------------------------------------------- the report
def build(out: Path, plan: Plan, status: dict[str, str], seconds: dict[str, float]) -> dict:
    """Write report.json, report.md, report.html and plots/ into `out`; returns the report.json content.

    `status`: {stage: "done" | "skipped: why"}; `seconds`: wall time of each completed stage.
    """
    s = {name: json.loads((out / name / "summary.json").read_text()) for name, st in status.items()
         if st == "done" and (out / name / "summary.json").is_file()}
    acc = _accuracy_tables(s)
    spec, prec, speed, quant = s.get("speculative"), s.get("precision"), s.get("speed"), s.get("quantize")
    k3 = (spec or {}).get("by_k", {}).get("3", {})
    report: dict[str, Any] = {
        "accuracy_pretrain": s.get("pretrain", {}).get("accuracy", {}),
        "accuracy_sft": acc["sft_modes"].get("on", {}),
        "accuracy_rl": acc["rl_modes"].get("on", {}),
        "accuracy_igrpo": s.get("igrpo", {}).get("accuracy_after", {}),
        "accuracy_by_mode": {"sft": acc["sft_modes"], "rl": acc["rl_modes"]},
        "mtp_acceptance_length": k3.get("acceptance_length"),
        "mtp_speedup": k3.get("speedup"),
        "mtp_by_k": (spec or {}).get("by_k", {}),
        "nvfp4_loss_gap": (prec or {}).get("gap_relative"),
        "nvfp4_loss_gap_nats": (prec or {}).get("gap_nats"),
        "engine_vs_transformers": {k: speed[k] for k in ("transformers_tok_s", "nemotron3_tok_s", "ratio",
                                                         "identical")} if speed else None,
        "quantized": {name: {"accuracy": row["accuracy_mean"], "bytes": row["bytes"],
                             "accuracy_by_family": row["accuracy"]}
                      for name, row in (quant or {}).get("schemes", {}).items()},
        "seconds_by_stage": {k: round(v, 1) for k, v in seconds.items()},
        "seconds_total": round(sum(seconds.values()), 1),
        "stages": status,
        "plan": {k: v for k, v in asdict(plan).items() if k != "seconds"},
        "environment": environment(),
    }
    made = _plots(out, s, out / "plots")
    blocks = _blocks(report, acc, s, made)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, out, "nemotron3 run report"))
    report["plots"] = [f for f, _ in made]
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return report


def _blocks(r: dict, acc: dict, s: dict[str, dict], made: list[tuple[str, str]]) -> list[Block]:
    plots = dict(made)
    env = r["environment"]
    b: list[Block] = [("h", 1, "nemotron3: the Nemotron 3 recipe in miniature"),
                      ("p", f"One run of `nemotron3 run` ({env['date']}; budget {r['plan']['budget_minutes']:g} "
                            f"minutes, {r['seconds_total'] / 60:.1f} minutes taken) on {env['cpu']}, "
                            f"{env['torch_threads']} threads. Every number below was measured in this run.")]

    def img(name: str) -> None:
        if f"plots/{name}" in plots:
            b.append(("img", f"plots/{name}", plots[f"plots/{name}"]))

    fams = acc["families"]
    if fams:
        b.append(("h", 2, "Held-out exact match per task family"))
        rows = []
        for f in fams:
            sft_on, rl_on = r["accuracy_sft"].get(f), r["accuracy_rl"].get(f)
            delta = f"{100 * (rl_on - sft_on):+.0f}" if sft_on is not None and rl_on is not None else "–"
            rows.append([f, _pct(r["accuracy_pretrain"].get(f)), _pct(sft_on), _pct(rl_on), delta])
        b.append(("table", ["family", "after pretraining", "after SFT (reasoning on)", "after RL (reasoning on)",
                            "RL − SFT (points)"], rows))
        img("accuracy.png")
        modes = acc["modes"]
        if modes:
            b.append(("p", "By reasoning mode (on: the model reasons then answers; off: an empty think block; "
                           "budget_N: reasoning cut after N tokens):"))
            mrows = []
            for stage, table in (("SFT", acc["sft_modes"]), ("RL", acc["rl_modes"])):
                for f in fams:
                    mrows.append([f"{stage} {f}", *[_pct(table.get(m, {}).get(f)) for m in modes]])
            b.append(("table", ["model, family", *modes], mrows))
    b.append(("h", 2, "Pretraining"))
    pre, prec = s.get("pretrain"), s.get("precision")
    if pre:
        last = pre["eval_losses"][-1] if pre["eval_losses"] else None
        b.append(("p", f"{pre['parameters']:,} parameters, {pre['steps']} steps; held-out loss "
                       f"{last[1]:.3f} nats at step {last[0]} (unigram baseline {pre['unigram_baseline']:.3f})"
                       if last else f"{pre['steps']} steps"))
    if prec:
        b.append(("p", f"NVFP4 gap on the matched run: at step {prec['step']} of {prec['steps_of']} the NVFP4 run's "
                       f"held-out loss is {prec['nvfp4_eval_loss']:.4f} nats against "
                       f"{prec['high_precision_eval_loss']:.4f} for the same run in high precision: "
                       f"{100 * prec['gap_relative']:+.2f} % "
                       f"({prec['gap_nats']:+.4f} nats)."))
    img("loss.png")
    img("balance.png")
    if "rl" in s:
        rl = s["rl"]
        b.append(("h", 2, "Reinforcement learning"))
        b.append(("p", f"{rl['algo'].upper()}, {rl['steps']} steps, {rl['rollouts_per_prompt']} rollouts per prompt; "
                       f"reward {rl['reward_first']:.3f} at step 1, {rl['reward_last']:.3f} at the last; "
                       f"token_mult_prob_error at most {rl['token_mult_prob_error_max'] or 1:.4f} (engine and "
                       f"trainer agree on the policy's probabilities)."))
        if "igrpo" in s:
            ig = s["igrpo"]
            b.append(("p", f"iGRPO at the same rollout budget, from the same SFT model: reward {ig['reward_first']:.3f}"
                           f" -> {ig['reward_last']:.3f}; held-out exact match in the table's last series."))
        img("rl.png")
    spec = s.get("speculative")
    if spec:
        b.append(("h", 2, "MTP speculative decoding"))
        rows = [[k, f"{v['acceptance_length']:.2f}", f"{v['tok_s']:,.0f}", f"{v['speedup']:.2f}x",
                 "yes" if v["identical"] else "NO"] for k, v in sorted(spec["by_k"].items(), key=lambda kv: int(kv[0]))]
        b.append(("p", f"{spec['prompts']} held-out chat prompts one at a time, greedy; plain decoding "
                       f"{spec['plain_tok_s']:,.0f} tok/s. The SFT model's heads accept "
                       f"{spec['sft_acceptance_length_k3']:.2f} tokens per forward at k = 3 (RL does not train them)."))
        b.append(("table", ["k", "acceptance length", "tok/s", "speed-up", "tokens = plain greedy"], rows))
        img("speculative.png")
    speed = s.get("speed")
    if speed:
        b.append(("h", 2, "Engine against transformers"))
        b.append(("p", f"Same weights (the RL model), batch 1, greedy, {speed['new_tokens']} new tokens: transformers "
                       f"{speed['transformers_tok_s']:,.0f} tok/s, nemotron3 {speed['nemotron3_tok_s']:,.0f} tok/s "
                       f"({speed['ratio']:.2f}x); identical tokens: {speed['identical']}."))
        img("speed.png")
    quant = s.get("quantize")
    if quant:
        b.append(("h", 2, "Quantized checkpoints"))
        rows = [[name, f"{row['bytes'] / 1e6:.2f} MB", _pct(row["accuracy_mean"]),
                 *[_pct(row["accuracy"].get(f)) for f in fams]] for name, row in quant["schemes"].items()]
        b.append(("table", ["scheme", "weights", "mean exact match", *fams], rows))
        for name, why in quant.get("skipped", {}).items():
            b.append(("p", f"{name}: skipped ({why})."))
        img("quantize.png")
    b.append(("h", 2, "Stages and time"))
    rows = [[name, st, f"{r['seconds_by_stage'][name]:.0f} s" if name in r["seconds_by_stage"] else "–"]
            for name, st in r["stages"].items()]
    b.append(("table", ["stage", "status", "time"], rows))
    b.append(("h", 2, "Environment"))
    b.append(("table", ["", ""], [["CPU", env["cpu"]], ["cores / torch threads", f"{env['cores']} / "
                                                                               f"{env['torch_threads']}"],
                                  ["platform", env["platform"]],
                                  *[[k, v] for k, v in env["versions"].items()]]))
    return b
