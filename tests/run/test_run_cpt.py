"""The long-context CPT stage of `nemotron3 run` (issue 32): planned from 40 minutes with its time taken off the other
stages, run end to end on a tiny checkpoint with two short phases, and reported by length."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from nemotron3.run import report, sections
from nemotron3.run import stages as S
from nemotron3.run.plan import CPT_FROM_MINUTES, CPT_MINUTES, plan
from nemotron3.train import long_context as lc
from tests.conftest import eval_checkpoint


def test_the_cpt_phase_is_planned_from_40_minutes_and_paid_for_by_the_other_stages():
    assert not plan(20).cpt and not plan(CPT_FROM_MINUTES - 0.1).cpt and plan(CPT_FROM_MINUTES).cpt
    at, rest = plan(CPT_FROM_MINUTES), plan(CPT_FROM_MINUTES - CPT_MINUTES)  # the rest: no CPT of its own
    assert (at.pretrain_steps, at.sft_steps, at.eval_problems) == (rest.pretrain_steps, rest.sft_steps,
                                                                    rest.eval_problems)
    assert at.seconds["cpt"] == 60 * CPT_MINUTES and plan(20).seconds["cpt"] == 0
    assert not rest.cpt and at.cpt_problems == min(20, at.eval_problems) and at.igrpo  # iGRPO: on the whole budget


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    eval_checkpoint(out / "pretrain" / "final", text=lc.retrieval_document(__import__("random").Random(0), 8, 4))
    mp = pytest.MonkeyPatch()
    mp.setattr(lc, "PHASES", (lc.Phase(4, 4, 256, 3, 2, 1e-3), lc.Phase(8, 4, 384, 2, 2, 1e-3)))
    mp.setattr(S, "RETRIEVAL_BEFORE", (160,))
    mp.setattr(S, "RETRIEVAL_AFTER", (160, 320))
    ctx = S.Context(out, plan(CPT_FROM_MINUTES), Console(file=io.StringIO()), device="cpu")
    ctx = S.Context(out, ctx.plan.__class__(**{**ctx.plan.__dict__, "cpt_problems": 3}), ctx.console, device="cpu")
    summary = S.cpt_stage(ctx)
    mp.undo()
    return out, summary


def test_the_cpt_stage_trains_every_phase_and_measures_retrieval_by_length(cpt_run):
    out, summary = cpt_run
    assert summary["phases"] == 2 and summary["final"] == str(out / "cpt" / "phase2" / "final")
    for k in (1, 2):
        records = [json.loads(x) for x in (out / "cpt" / f"phase{k}" / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == list(range(1, (3, 2)[k - 1] + 1))
    assert list(summary["before"]) == ["160"] and list(summary["after"]) == ["160", "320"]
    assert all(r["n"] == 3 and 0 <= r["accuracy"] <= 1 for r in [*summary["before"].values(),
                                                                  *summary["after"].values()])
    cache = summary["cache_bytes_64k"]
    assert cache["hybrid"] < cache["attention_only"]  # Mamba layers keep a constant state, attention a growing KV


def test_the_report_shows_retrieval_by_length(cpt_run):
    _, summary = cpt_run
    summary = json.loads(json.dumps(summary))  # as the pipeline writes and the report reads it
    lc_report = sections.long_context_report({"cpt": summary})
    blocks = sections.long_context_blocks(lc_report)
    table = next(b for b in blocks if b[0] == "table")
    assert [row[0] for row in table[2]] == ["160", "320"] and table[2][1][1] == "–"  # 320 measured after only
    r = summary["after"]["160"]
    assert table[2][0][2] == f"{report.pct_se(r['accuracy'], r['stderr'])} (n = 3)"
    assert sections.long_context_report({}) == {}
