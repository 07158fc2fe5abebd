"""The evaluation fixture benchmarks/eval_tasks (held-out add and sort problems as lm-eval tasks) and the throughput
benchmark benchmarks/eval.py (the nemotron3 backend against lm-eval's `hf` backend on the same weights)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import eval_checkpoint
from lm_eval.tasks import TaskManager

from nemotron3 import tasks
from nemotron3.eval.data import task_items

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "benchmarks" / "eval_tasks"


def _utils():
    spec = importlib.util.spec_from_file_location("eval_tasks_utils", FIXTURE / "utils.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fixture_file_is_the_families_held_out_problems():
    """problems.jsonl is what utils.problems() writes, and every item is a real held-out problem: the target
    choice is the family's answer and its verifier accepts it and rejects the three near misses."""
    utils = _utils()
    rows = [json.loads(x) for x in (FIXTURE / "problems.jsonl").read_text().splitlines()]
    assert rows == utils.problems()
    assert [r["family"] for r in rows] == ["add"] * 32 + ["sort"] * 32
    # the problems `nemotron3 eval --data tasks:add,sort --count 32` asks, in the same order
    items = task_items("tasks:add,sort", 32)
    assert [(r["prompt"], r["answer"]) for r in rows] == [(i.messages[-1]["content"], i.answer) for i in items]
    for r in rows:
        family, problem = tasks.family_of(r["prompt"])
        assert tasks.split_of(family.key(problem)) == "heldout"
        assert family.name == r["family"] and len(set(r["choices"])) == 4
        assert [family.verify(problem, c) for c in r["choices"]] == [i == r["target"] for i in range(4)]


def test_lm_eval_loads_the_fixture_tasks():
    manager = TaskManager(include_path=str(FIXTURE), include_defaults=False)
    loaded = manager.load_task_or_group(["nemotron3_tasks_gen", "nemotron3_tasks_doc", "nemotron3_tasks_mc"])
    gen, doc, mc = (loaded[f"nemotron3_tasks_{x}"] for x in ("gen", "doc", "mc"))
    docs = list(mc.test_docs())
    assert len(docs) == len(list(gen.test_docs())) == len(list(doc.test_docs())) == 64
    assert mc.doc_to_text(docs[0]) == "What is 30 + 0?\nAnswer:" and mc.doc_to_target(docs[0]) == docs[0]["target"]
    assert gen.doc_to_text(docs[0]) == "What is 30 + 0?" and doc.doc_to_text(docs[0]) == "What is 30 + 0?\n"
    # process_results grades by the family's verifier, on the answer line after any reasoning
    assert gen.process_results(docs[0], ["<think>\n0+0=0\n</think>\n30"]) == {"acc": 1.0}
    assert gen.process_results(docs[0], ["Answer: 31"]) == {"acc": 0.0}
    assert gen.process_results(docs[0], [""]) == {"acc": 0.0}


@pytest.mark.slow
def test_the_eval_benchmark_runs(tmp_path):
    """`benchmarks/eval.py --quick` on a tiny random checkpoint: both backends give items/s, the same extracted
    answers item by item (up to special tokens: the random model writes some, which `hf` drops from its replies and
    nemotron3 keeps) and loglikelihoods within float32 rounding of each other."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    eval_checkpoint(folder)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval.py"), "--quick", "--model", str(folder),
                           "--batch-size", "4", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    gen, mc = report["generate_until"], report["loglikelihood"]
    for part in (gen, mc):
        assert part["nemotron3"]["items_per_s"] > 0 and part["hf"]["items_per_s"] > 0
        assert part["nemotron3"]["acc"] == part["hf"]["acc"]
    assert gen["agreement"]["agree_without_specials"] == gen["agreement"]["items"] == 8
    assert mc["agreement"]["agree"] == mc["agreement"]["items"] == 8
    assert mc["agreement"]["max_abs_diff"] < 1e-3
    assert "items/s" in proc.stdout and "nemotron3 / hf" in proc.stdout
