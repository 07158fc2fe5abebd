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
    engine_vs_transformers_divergence  where the two greedy decodes part (measure.divergence): position (None:
                         the same tokens), reference_top2_margin, max_abs_logit_diff, near_tie
    quantized            {scheme: {accuracy (mean over families), accuracy_se, bytes, activations,
                         accuracy_by_family}}
    problems_per_family  {source: n} behind each accuracy figure (pretrain, sft, rl, igrpo, eval, quantize); a
                         figure p on n problems has the binomial standard error sqrt(p (1 - p) / n) (binomial_se)
    rl_heldout_curve     {"rl" | "igrpo": [{step, accuracy: {family: exact match}, problems}]}: before (step 0), the
                         evaluations inside the stage (on the first problems of the set) and after
    tools                the tool environment: {"sft" | "rl_before" | "rl_after": {accuracy, valid_fraction,
                         problems}} (held-out greedy episodes), "rl_env_curve": {env: [[step, training accuracy]]}
    seconds_by_stage, seconds_total, stages ({stage: "done" | "skipped: why"}), plan, environment
"""

from __future__ import annotations

import json
import math
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
from nemotron3.run.sections import long_context_blocks, long_context_report, tool_blocks, tool_report
from nemotron3.run.stages import write_json
from nemotron3.run.stats import binomial_se, mean_se, pct, pct_se, se_of  # noqa: F401  (report.* in tests)


def problems(summary: dict) -> int | None:
    """Problems per family behind a stage's accuracy figures, from the stage's own summary."""
    n = summary.get("problems_per_family", summary.get("config", {}).get("eval_problems"))
    return n if isinstance(n, int) and n > 0 else None


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
    n = {name: problems(s[name]) for name in ("pretrain", "sft", "rl", "igrpo", "eval", "quantize") if name in s}

    def ses(vals: dict[str, float], k: int | None) -> dict[str, float]:
        return {f: binomial_se(v, k) for f, v in vals.items()} if k else {}

    # (name, {family: exact match}, {family: standard error})
    series = [("after pretraining (pretraining prompt)", pre, ses(pre, n.get("pretrain"))),
              ("after SFT, reasoning on", sft_modes.get("on", {}), ses(sft_modes.get("on", {}), n.get("sft"))),
              ("after RL (GRPO), reasoning on", rl_modes.get("on", {}), ses(rl_modes.get("on", {}), n.get("rl"))),
              ("after iGRPO, reasoning on", igrpo, ses(igrpo, n.get("igrpo")))]
    # per mode: the problems behind it (RL's `on` is the RL stage's own evaluation, its other modes the eval stage's)
    mode_n = {"sft": dict.fromkeys(sft_modes, n.get("sft")),
              "rl": {m: n.get("rl") if m == "on" and s.get("rl", {}).get("accuracy_after") else n.get("eval")
                     for m in rl_modes}}
    modes = [m for m in ("on", "off", *sorted(set(sft_modes) - {"on", "off"}, key=lambda m: int(m.split("_")[1])))
             if m in sft_modes or m in rl_modes]

    def means(table: dict[str, dict[str, float]]) -> dict[str, float]:
        return {m: sum(v.values()) / len(v) for m, v in table.items() if v}

    def mean_ses(table: dict[str, dict[str, float]], ns: dict[str, int | None]) -> dict[str, float]:
        return {m: mean_se(list(v.values()), ns[m]) for m, v in table.items() if v and ns.get(m)}

    return {"families": families, "series": series, "modes": modes, "sft_modes": sft_modes, "rl_modes": rl_modes,
            "n": n, "mode_n": mode_n,
            "mode_means": [("after SFT", means(sft_modes), mean_ses(sft_modes, mode_n["sft"])),
                           ("after RL", means(rl_modes), mean_ses(rl_modes, mode_n["rl"]))]}


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
        "engine_vs_transformers_divergence": (speed or {}).get("divergence"),
        "quantized": {name: {"accuracy": row["accuracy_mean"], "accuracy_se": _quant_se(row, acc["n"].get("quantize")),
                             "bytes": row["bytes"], "activations": row.get("activations"),
                             "accuracy_by_family": row["accuracy"]}
                      for name, row in (quant or {}).get("schemes", {}).items()},
        "problems_per_family": acc["n"],
        "rl_heldout_curve": {name: [{"step": step, "accuracy": a, "problems": k} for step, a, k in
                                    plots.heldout_points(out, name, s.get(name, {}))] for name in ("rl", "igrpo")
                             if name in s},
        "tools": tool_report(out, s),
        "long_context": long_context_report(s),
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


def _quant_se(row: dict, n: int | None) -> float | None:
    return mean_se(list(row["accuracy"].values()), n) if n and row["accuracy"] else None


def se_note(n: dict[str, int]) -> str:
    """What the ± in the accuracy tables is, and the problems behind it."""
    counts = sorted(set(n.values()))
    k = " or ".join(str(c) for c in counts) if counts else "the"
    return (f"± is one standard error of the sampling of problems, √(p(1 − p)/n), with n = {k} held-out problems per "
            "family (for a mean over F families, √(Σ p(1 − p)/n) / F; for a difference, √(s₁² + s₂²)). Two "
            "figures less than about two standard errors apart are within that noise; at 0 % or 100 % the formula "
            "gives 0 and understates it.")


def divergence_text(speed: dict) -> str:
    """What the engine against transformers showed about their tokens, in the words the measurement allows."""
    d, n = speed.get("divergence"), speed["new_tokens"]
    if d is None:
        return f"Identical tokens: {speed['identical']} (where they part was not measured)."
    if d["position"] is None:
        return f"Both emitted the same {n} tokens (compared token by token)."
    i = d["position"]
    where = (f"The two emitted the same first {i} tokens and part at token {i + 1} of {n} (transformers "
             f"{d['reference_token']}, the engine {d['our_token']}). From that shared prefix, one full forward of "
             f"transformers ranks token {d.get('reference_argmax', '?')} first, {d['reference_top2_margin']:.2g} "
             f"ahead of the next (largest |logit| {d['logit_scale']:.3g}), and the two implementations' logits "
             f"differ by up to {d['max_abs_logit_diff']:.2g}: ")
    if not d["near_tie"]:
        departs = [name for name, tok in (("transformers' generate", d["reference_token"]),
                                          ("the engine", d["our_token"])) if tok != d.get("reference_argmax")]
        if d["max_abs_logit_diff"] < d["reference_top2_margin"] / 2 and len(departs) == 1:
            # both full forwards rank the same token first, far from a tie: one side's cached decode departs from it
            return where + (f"not a near-tie, and both full forwards agree: {departs[0]}'s cached decode departs "
                            "from its own full forward there, a disagreement to find in that decode path.")
        return where + "not a near-tie: the two compute different logits there, a disagreement to find."
    flipped = [name for name, tok in (("transformers' generate", d["reference_token"]),
                                      ("the engine", d["our_token"])) if tok != d.get("reference_argmax")]
    return where + ("a near-tie in fp32" + (f", which {' and '.join(flipped)} resolved the other way in its "
                                            "cached decode" if flipped else "") +
                    "; the implementations agree, and the tokens after it continue a different but equally "
                    "greedy text.")


CLAIMS_NOTE = ("Not part of this run (each takes minutes to tens of minutes): benchmarks/claims/ re-measures LatentMoE "
               "against MoE, the hybrid against attention-only, MTP depth and iGRPO against GRPO over seeds; the "
               "verdicts are in the repository's docs/results.md (\"The papers' claims re-measured at this scale\") "
               "and the plots in docs/claims/ (latent_moe.png, hybrid_vs_attention.png, mtp_depth.png, igrpo.png).")


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

    fams, n = acc["families"], acc["n"]
    if fams:
        b.append(("h", 2, "Held-out exact match per task family"))
        rows = []
        for f in fams:
            pre, sft_on, rl_on = r["accuracy_pretrain"].get(f), r["accuracy_sft"].get(f), r["accuracy_rl"].get(f)
            s_sft, s_rl = se_of(sft_on, n.get("sft")), se_of(rl_on, n.get("rl"))
            delta = "–"
            if sft_on is not None and rl_on is not None:
                delta = f"{100 * (rl_on - sft_on):+.0f}"
                if s_sft is not None and s_rl is not None:
                    delta += f" ± {100 * math.hypot(s_sft, s_rl):.0f}"
            rows.append([f, pct_se(pre, se_of(pre, n.get("pretrain"))), pct_se(sft_on, s_sft), pct_se(rl_on, s_rl),
                         delta])
        b.append(("table", ["family", "after pretraining", "after SFT (reasoning on)", "after RL (reasoning on)",
                            "RL − SFT (points)"], rows))
        b.append(("p", se_note({k: v for k, v in n.items() if k != "quantize"})))
        img("accuracy.png")
        modes = acc["modes"]
        if modes:
            b.append(("p", "By reasoning mode (on: the model reasons then answers; off: an empty think block; "
                           "budget_N: reasoning cut after N tokens):"))
            mrows = []
            for stage, table, ns in (("SFT", acc["sft_modes"], acc["mode_n"]["sft"]),
                                     ("RL", acc["rl_modes"], acc["mode_n"]["rl"])):
                for f in fams:
                    cells = [(table.get(m, {}).get(f), ns.get(m)) for m in modes]
                    mrows.append([f"{stage} {f}", *[pct_se(x, se_of(x, k)) for x, k in cells]])
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
        curve = r["rl_heldout_curve"].get("rl", [])
        inside = curve[1:-1] if len(curve) > 2 else []
        if inside:
            b.append(("p", f"Held-out exact match (reasoning on) at {len(curve)} points of the run: before (step 0), "
                           f"at steps {', '.join(str(c['step']) for c in inside)} (the first "
                           f"{inside[0]['problems']} problems per family, the same for every point between) and "
                           f"after (step {curve[-1]['step']}); {curve[0]['problems']} problems per family before and "
                           "after. Error bars: one standard error."))
        img("rl.png")
    if r["tools"]:
        b += tool_blocks(r["tools"])
    if r["long_context"]:
        b += long_context_blocks(r["long_context"])
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
                       f"({speed['ratio']:.2f}x). " + divergence_text(speed)))
        img("speed.png")
    quant = s.get("quantize")
    if quant:
        b.append(("h", 2, "Quantized checkpoints"))
        k = n.get("quantize")
        rows = [[name, row.get("activations", "–"), f"{row['bytes'] / 1e6:.2f} MB",
                 pct_se(row["accuracy_mean"], _quant_se(row, k)),
                 *[pct_se(row["accuracy"].get(f), se_of(row["accuracy"].get(f), k)) for f in fams]]
                for name, row in quant["schemes"].items()]
        b.append(("table", ["scheme", "activations", "weights", "mean exact match", *fams], rows))
        b.append(("p", f"Reasoning on, {k} held-out problems per family; ± as above. nvfp4 runs W4A4: each "
                       "quantized layer's input is NVFP4-quantized with its calibrated global scale; fp8 quantizes "
                       "inputs per token; the others quantize weights only."))
        for name, why in quant.get("skipped", {}).items():
            b.append(("p", f"{name}: skipped ({why})."))
        img("quantize.png")
    b.append(("h", 2, "Stages and time"))
    rows = [[name, st, f"{r['seconds_by_stage'][name]:.0f} s" if name in r["seconds_by_stage"] else "–"]
            for name, st in r["stages"].items()]
    b.append(("table", ["stage", "status", "time"], rows))
    b.append(("h", 2, "The papers' claims at this scale"))
    b.append(("p", CLAIMS_NOTE))
    b.append(("h", 2, "Environment"))
    b.append(("table", ["", ""], [["CPU", env["cpu"]], ["cores / torch threads", f"{env['cores']} / "
                                                                               f"{env['torch_threads']}"],
                                  ["platform", env["platform"]],
                                  *[[k, v] for k, v in env["versions"].items()]]))
    return b
