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

import json
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from nemotron3.run import plots
from nemotron3.run.document import Block, to_html, to_markdown
from nemotron3.run.plan import Plan
from nemotron3.run.stages import write_json


def pct(x: float | None) -> str:
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


def accuracy_tables(s: dict[str, dict]) -> dict:
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
    acc = accuracy_tables(s)
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
    made = plots.draw(out, s, acc, out / "plots")
    blocks = _blocks(report, acc, s, made)
    (out / "report.md").write_text(to_markdown(blocks))
    (out / "report.html").write_text(to_html(blocks, out, "nemotron3 run report"))
    report["plots"] = [f for f, _ in made]
    write_json(out / "report.json", report)
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
            rows.append([f, pct(r["accuracy_pretrain"].get(f)), pct(sft_on), pct(rl_on), delta])
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
                    mrows.append([f"{stage} {f}", *[pct(table.get(m, {}).get(f)) for m in modes]])
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
        rows = [[name, f"{row['bytes'] / 1e6:.2f} MB", pct(row["accuracy_mean"]),
                 *[pct(row["accuracy"].get(f)) for f in fams]] for name, row in quant["schemes"].items()]
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
