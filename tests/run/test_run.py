"""`nemotron3 run` at a smoke size: every stage leaves its artifact, a run killed mid-stage resumes in that stage
(the complete stages are not run again), and the report says exactly what the stages' own files say.

One pipeline of about two minutes on one thread (`--budget-minutes 0.5`: the budget rule's smoke sizes), killed
with SIGKILL once SFT has written its first checkpoint, then resumed to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemotron3.options import ConfigError
from nemotron3.run import RunConfig, run
from nemotron3.run.plan import STAGES, plan
from nemotron3.train import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nemotron3.cli", "run", "--out", str(out), *extra]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    proc = subprocess.Popen(_cmd(out, "--budget-minutes", "0.5"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while checkpoint.latest(out / "sft") is None:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before SFT saved: {proc.stdout.read()}")
        if time.time() - t0 > 400:
            proc.kill()
            raise AssertionError("SFT saved no checkpoint within 400 s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    first = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    pretrain_summary = (out / "pretrain" / "summary.json").stat().st_mtime_ns
    done = subprocess.run(_cmd(out, "--resume"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, first, done.stdout, pretrain_summary


def test_every_stage_leaves_its_artifact(killed_and_resumed):
    out, *_ = killed_and_resumed
    rep = _read(out / "report.json")
    for stage in ("tokenizer", "pretrain", "precision", "sft", "rl", "eval", "speculative", "speed", "quantize"):
        assert rep["stages"][stage] == "done", (stage, rep["stages"][stage])
        assert (out / stage / "summary.json").is_file()
    assert rep["stages"]["igrpo"].startswith("skipped: budget under")
    assert rep["stages"]["cpt"] == "skipped: budget under 40 minutes" and rep["long_context"] == {}
    assert set(rep["stages"]) == set(STAGES) - {"report"}
    tokenizer = (out / "tokenizer" / "tokenizer.json").read_text()
    assert tokenizer == (out / "pretrain" / "final" / "tokenizer.json").read_text()  # pretraining used it
    for ckpt in ("pretrain", "sft", "rl"):
        assert {"model.safetensors", "config.json"} <= {f.name for f in (out / ckpt / "final").iterdir()}
    for key in ("accuracy_pretrain", "accuracy_sft", "accuracy_rl", "mtp_acceptance_length", "mtp_speedup",
                "nvfp4_loss_gap", "quantized", "seconds_by_stage", "seconds_total"):
        assert key in rep, key
    assert set(rep["accuracy_rl"]) == {"add", "countdown", "modpow", "mul", "sort", "word"}
    assert (out / "report.md").read_text().startswith("# nemotron3")
    html = (out / "report.html").read_text()
    for png in rep["plots"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert html.count("data:image/png;base64,") == len(rep["plots"])
    assert {"plots/loss.png", "plots/balance.png", "plots/accuracy.png", "plots/rl.png",
            "plots/speculative.png", "plots/speed.png", "plots/quantize.png"} <= set(rep["plots"])
    assert {"fp32", "bf16", "nvfp4", "nvfp4-w4a16", "fp8", "mx9", "mx6", "mx4", "mxfp4"} <= set(rep["quantized"])
    assert _read(out / "quantize" / "summary.json")["skipped"] == {  # the smoke budget leaves SeedLM out, and says so
        "seedlm4": "budget under 10 minutes", "seedlm3": "budget under 10 minutes"}


def test_a_killed_run_resumes_in_the_stage_it_was_in(killed_and_resumed):
    out, first, resumed, pretrain_mtime = killed_and_resumed
    assert "sft: SFT" in first and "rl: RL" not in first
    for stage in ("tokenizer", "pretrain", "precision"):
        assert f"{stage}: complete, skipped" in resumed
    assert (out / "pretrain" / "summary.json").stat().st_mtime_ns == pretrain_mtime  # not run again
    assert "resuming" in resumed.split("rl: RL")[0]  # SFT continued from its checkpoint
    sft = _read(out / "sft" / "summary.json")
    steps = [r["step"] for r in _metrics(out / "sft" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, sft["steps"] + 1))  # one record per step: none lost, none twice


def test_the_report_says_what_the_stages_said(killed_and_resumed):
    out, *_ = killed_and_resumed
    rep = _read(out / "report.json")
    pre, sft, rl = (_read(out / s / "summary.json") for s in ("pretrain", "sft", "rl"))
    assert rep["accuracy_pretrain"] == pre["accuracy"]
    assert rep["accuracy_sft"] == sft["accuracy_after"]["on"]
    assert rep["accuracy_rl"] == rl["accuracy_after"]
    ev = _read(out / "eval" / "summary.json")
    assert rep["accuracy_by_mode"]["rl"] == {"on": rl["accuracy_after"], **ev["accuracy"]}
    assert rep["accuracy_by_mode"]["sft"] == {m: v for m, v in sft["accuracy_after"].items() if m != "raw"}
    # the NVFP4 gap, from the two runs' own metrics: held-out loss at the twin's last step
    step = plan(0.5).twin_steps
    nv = [r["eval_loss"] for r in _metrics(out / "pretrain" / "metrics.jsonl") if r.get("step") == step
          and "eval_loss" in r]
    hp = [r["eval_loss"] for r in _metrics(out / "precision" / "twin" / "metrics.jsonl") if r.get("step") == step
          and "eval_loss" in r]
    assert rep["nvfp4_loss_gap"] == pytest.approx((nv[0] - hp[0]) / hp[0], rel=1e-12)
    spec = _read(out / "speculative" / "summary.json")
    assert rep["mtp_acceptance_length"] == spec["by_k"]["3"]["acceptance_length"]
    assert rep["mtp_speedup"] == spec["by_k"]["3"]["speedup"]
    assert rep["mtp_by_k"] == spec["by_k"]
    speed = _read(out / "speed" / "summary.json")
    assert rep["engine_vs_transformers"] == {k: speed[k] for k in ("transformers_tok_s", "nemotron3_tok_s", "ratio",
                                                                   "identical")}
    timing = _read(out / "timing.json")
    assert rep["seconds_by_stage"] == {k: round(v, 1) for k, v in timing.items()}
    for scheme, row in rep["quantized"].items():
        own = _read(out / "quantize" / f"{scheme}.json")
        assert row["accuracy"] == own["accuracy_mean"] and row["bytes"] == own["bytes"]
    # the tool environment (issue 34): SFT trained on its conversations, RL mixed it in; the report's section
    tools = rep["tools"]
    assert sft["conversations"]["tools"] > 0 and rl["envs"] == {"tasks": 1.0, "tools": plan(0.5).rl_tool_weight}
    assert tools["sft"] == {k: sft["tools_after"][k] for k in ("accuracy", "valid_fraction", "problems")}
    for when in ("before", "after"):
        assert tools[f"rl_{when}"]["accuracy"] == rl[f"env_accuracy_{when}"]["tools"]
        assert tools[f"rl_{when}"]["valid_fraction"] == rl[f"env_valid_fraction_{when}"].get("tools")
    steps = [r for r in _metrics(out / "rl" / "metrics.jsonl") if "reward" in r]
    assert tools["rl_env_curve"]["tools"] == [[r["step"], r["env/tools/accuracy"]] for r in steps
                                              if "env/tools/accuracy" in r]
    assert "## Tool use" in (out / "report.md").read_text()


def test_resume_refuses_a_change_of_what_the_run_computes(killed_and_resumed, tmp_path):
    out, *_ = killed_and_resumed
    with pytest.raises(ConfigError, match="budget-minutes"):
        run(RunConfig(out=out, resume=True, budget_minutes=1))
    with pytest.raises(ConfigError, match="--resume"):
        run(RunConfig(out=out))


def test_stages_need_what_they_read():
    with pytest.raises(ConfigError, match="sft needs pretrain"):
        RunConfig(stages=["tokenizer", "sft"])
