"""The report's sections for the stages beside the main chain: the tool environment (issue 34) and the long-context
CPT (issue 32). Each is a `*_report` (the report.json part, from the stages' summaries) and a `*_blocks` (its
report.md / .html section)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemotron3.run.document import Block
from nemotron3.run.stats import pct, pct_se, se_of


def tool_report(out: Path, s: dict[str, dict]) -> dict:
    """The tool environment's held-out greedy episodes after SFT and before / after RL ({accuracy, valid_fraction,
    problems}), and the RL stage's per-environment training accuracy by step ({env: [[step, accuracy], ...]})."""
    t: dict[str, Any] = {}
    if s.get("sft", {}).get("tools_after"):
        t["sft"] = {k: s["sft"]["tools_after"][k] for k in ("accuracy", "valid_fraction", "problems")}
    rl = s.get("rl", {})
    for when in ("before", "after"):
        if "tools" in rl.get(f"env_accuracy_{when}", {}):
            t[f"rl_{when}"] = {"accuracy": rl[f"env_accuracy_{when}"]["tools"],
                               "valid_fraction": rl[f"env_valid_fraction_{when}"].get("tools"),
                               "problems": rl["config"]["eval_problems"]}
    if rl.get("envs") and (out / "rl" / "metrics.jsonl").is_file():
        recs = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines() if '"reward"' in x]
        t["rl_env_curve"] = {e: [[r["step"], r[f"env/{e}/accuracy"]] for r in recs if f"env/{e}/accuracy" in r]
                             for e in rl["envs"]}
    return t


def tool_blocks(t: dict) -> list[Block]:
    rows = [[name, pct_se(t[k]["accuracy"], se_of(t[k]["accuracy"], t[k]["problems"])), pct(t[k]["valid_fraction"]),
             str(t[k]["problems"])] for k, name in (("sft", "after SFT"), ("rl_before", "RL, before"),
                                                   ("rl_after", "after RL")) if k in t]
    b: list[Block] = [("h", 2, "Tool use (lookup + calculate)"),
                      ("p", "Held-out problems of the tool environment (docs/agentic-rl.md §3) as greedy multi-turn "
                            "episodes: the answer needs the lookup tool's values; a call is valid when it parses, "
                            "names a tool and its arguments fit. ± one binomial standard error.")]
    b.append(("table", ["model", "accuracy", "tool calls valid", "problems"], rows))
    for env, pts in t.get("rl_env_curve", {}).items():
        k = max(1, len(pts) // 10)
        vals = [[a for _, a in pts[:k]], [a for _, a in pts[-k:]]]
        if pts and all(v and all(x == x for x in v) for v in vals):  # NaN-free
            b.append(("p", f"RL training accuracy of `{env}` (sampled episodes): {pct(sum(vals[0]) / k)} over the "
                           f"first {k} steps, {pct(sum(vals[1]) / k)} over the last {k}."))
    return b


def long_context_report(s: dict[str, dict]) -> dict:
    """Retrieval exact match by length before and after the CPT phases ({"before"/"after": {length: {accuracy,
    stderr, n}}}) and the 64k cache bytes of the hybrid and its attention-only twin; {} when the stage did not run."""
    c = s.get("cpt")
    if not c:
        return {}
    keep = ("accuracy", "stderr", "n")
    return {"before": {k: {f: v[f] for f in keep} for k, v in c["before"].items()},
            "after": {k: {f: v[f] for f in keep} for k, v in c["after"].items()},
            "phases": c["phases"], "cache_bytes_64k": c["cache_bytes_64k"]}


def long_context_blocks(lc: dict) -> list[Block]:
    lengths = sorted({*lc["before"], *lc["after"]}, key=int)

    def cell(when: str, k: str) -> str:
        r = lc[when].get(k)
        return f"{pct_se(r['accuracy'], r['stderr'])} (n = {r['n']})" if r else "–"

    rows = [[f"{int(k):,}", cell("before", k), cell("after", k)] for k in lengths]
    cache = lc["cache_bytes_64k"]
    return [("h", 2, "Long context: retrieval by length"),
            ("p", f"Continued pretraining from the pretrained weights in {lc['phases']} phases of growing length "
                  "(train/long_context.py: retrieval documents with many questions, loss on the questions; "
                  "docs/long-context.md), then greedy exact match on held-out key-value retrieval problems filled to "
                  "each length. A side branch: SFT and RL start from the pretrained weights. ± one standard error."),
            ("table", ["prompt tokens", "before CPT", "after CPT"], rows),
            ("p", f"Cache of one row at 65,536 tokens (fp32): hybrid {cache['hybrid'] / 2**20:,.1f} MiB, the same "
                  f"model with every Mamba layer attention {cache['attention_only'] / 2**20:,.1f} MiB.")]
