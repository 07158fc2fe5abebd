"""`nemotron3 eval`: answer extraction per format, pass@k, the code format's subprocess, a planted-accuracy data file
through the command, and one-line errors for bad data (nemotron3/eval/, docs/evaluation.md)."""

from __future__ import annotations

import json
import math
import time
from fractions import Fraction
from itertools import combinations

import pytest
import torch
from conftest import eval_checkpoint as build_checkpoint

from nemotron3 import chat
from nemotron3.cli import main
from nemotron3.eval.code import run_tests
from nemotron3.eval.data import load_items
from nemotron3.eval.extract import answer_part, extract, grade
from nemotron3.eval.metrics import mean_stderr, pass_at_k, summarize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model, tk = build_checkpoint(folder)
    return folder, model, tk


# ----------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, want", [
    ("so the result is \\boxed{42}.", "42"),
    ("first 3, then \\boxed{\\frac{3}{4}} and 7 more", "\\frac{3}{4}"),
    ("The answer is -12.", "-12"),
    ("it is 3/4", "3/4"),
    ("values 1, 2 and finally 1,234.5", "1,234.5"),
    ("x-5 gives 10 then 12", "12"),
    ("\\boxed{x = 7}", "7"),
    ("no digits at all", None),
    ("−8 (unicode minus)", "-8"),
])
def test_numeric_extraction(text, want):
    assert extract("numeric", text) == want


@pytest.mark.parametrize("pred, answer, ok", [
    ("\\frac{3}{4}", "0.75", True), ("3/4", "3/4", True), ("-12", "-12", True), ("-12", "12", False),
    ("1,234.5", "1234.5", True), ("42.0000001", "42", True), ("42.01", "42", False), ("$12$", "12", True),
])
def test_numeric_grading_with_tolerance(pred, answer, ok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "answer": answer}) + "\n")
    item = load_items(f, "numeric")[0]
    assert grade("numeric", pred, item.answer, 1e-6) is ok


@pytest.mark.parametrize("text, want", [
    ("The answer is (C).", "C"),
    ("A is wrong and B is wrong, so D", "D"),
    ("I think the answer is B because A cannot be.", "B"),
    ("\\boxed{A}", "A"),
    ("b", None),  # a lowercase letter is not a choice
    ("blue", "C"),  # the text of a choice
    ("Answer: A", "A"),
    ("I would pick E", None),  # E is not among four choices
    ("A good guess: none of them", None),
])
def test_mcq_letters_in_prose(text, want):
    assert extract("mcq", text, choices=["red", "green", "blue", "black"]) == want


def test_exact_and_answer_part():
    assert extract("exact", "<think>\nhmm\n</think>\n\n Answer: Paris. \n more") == "Paris."
    assert grade("exact", "Paris.", ["paris", "Paris, France"])
    assert not grade("exact", "Lyon", "Paris")
    # reasoning that never closed answers nothing; without an open think block the whole text is the answer
    assert answer_part("still thinking 42", think_open=True) is None
    assert extract("numeric", "still thinking 42", think_open=True) is None
    assert extract("numeric", "still thinking 42", think_open=False) == "42"
    assert extract("code", "<think>x</think>Here:\n```python\ndef f(x):\n    return 2 * x\n```\nDone.") == \
        "def f(x):\n    return 2 * x\n"


def test_task_format_uses_the_familys_verifier():
    from nemotron3 import tasks

    p = tasks.generate("countdown", 1, seed=0, split="heldout")[0]
    assert grade("task", extract("task", f"<think>\n{p.trace}\n</think>\n{p.answer}"), p.answer, prompt=p.prompt)
    assert not grade("task", extract("task", "</think>\n1+1"), p.answer, prompt=p.prompt)


# ----------------------------------------------------------------------------------------- metrics
def test_pass_at_k_against_the_closed_form():
    """1 - C(n-c, k) / C(n, k), and by enumeration: the share of k-subsets of the samples holding a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                samples = [True] * c + [False] * (n - c)
                subsets = list(combinations(samples, k))
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_accuracy_stderr_and_tokens():
    mean, se = mean_stderr([1, 0, 1, 1])
    assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))  # sample variance 0.25 (ddof 1)
    s = summarize([[True, False], [False, False]], [[10, 20], [30, 40]])
    assert s["accuracy"] == 0.25 and s["pass_at_k"] == {"1": 0.25, "2": 0.5}
    assert s["tokens_per_answer"] == 25 and s["tokens_per_correct"] == 100


# ----------------------------------------------------------------------------------------- code
def test_code_passes_fails_and_is_killed_at_its_limit():
    tests = "assert f(2) == 4\nassert f(-1) == -2\n"
    assert run_tests("def f(x):\n    return 2 * x\n", tests, 10).passed
    bad = run_tests("def f(x):\n    return x + 2\n", tests, 10)
    assert not bad.passed and "AssertionError" in bad.detail
    t = time.monotonic()
    endless = run_tests("def f(x):\n    while True:\n        pass\n", tests, 1.0)
    assert not endless.passed and endless.detail.startswith("timeout") and time.monotonic() - t < 6
    # the child sees no proxy and none of our environment
    env = run_tests("import os\nassert not any('proxy' in k.lower() for k in os.environ), os.environ\n", "", 10)
    assert env.passed, env.detail


# ----------------------------------------------------------------------------------------- the command
def _reference_completion(model, tk, prompt: str, max_new: int) -> str:
    """Greedy, one token at a time without a cache: the reply `nemotron3 eval --modes off` must see."""
    ids = [tk.bos_id, *tk.encode(chat.render([{"role": "user", "content": prompt}], enable_thinking=False,
                                             add_generation_prompt=True))]
    out = []
    stops = {tk.eos_id, tk.end_of_turn_id}
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if t in stops:
                break
            out.append(t)
    return tk.decode(out)


def _first_line(text: str) -> str | None:
    lines = [x.strip() for x in text.split("</think>")[-1].splitlines() if x.strip()]
    return lines[0] if lines else None


def test_planted_answers_score_exactly_their_planted_accuracy(checkpoint, tmp_path):
    folder, model, tk = checkpoint
    prompts = [f"Question {i}: what is {i} * 6?" for i in range(12)]
    refs = [_first_line(_reference_completion(model, tk, p, 12)) for p in prompts]
    answerable = [i for i, r in enumerate(refs) if r]
    assert len(answerable) >= 4, refs
    planted = set(answerable[: len(answerable) // 2 + 1])
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": refs[i] if i in planted else "not the reply"}) + "\n"
                            for i, p in enumerate(prompts)))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--format", "exact", "--modes", "off",
                 "--max-new-tokens", "12", "--batch-size", "5", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy"]["off"] == len(planted) / len(prompts)
    scores = [1.0 if i in planted else 0.0 for i in range(len(prompts))]
    assert results["stderr"]["off"] == pytest.approx(mean_stderr(scores)[1])
    lines = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(len(prompts)))
    assert [x["correct"] for x in lines] == [i in planted for i in range(len(prompts))]
    assert [x["prediction"] for x in lines] == refs
    assert all(set(x) >= {"index", "mode", "prediction", "answer", "correct", "tokens"} for x in lines)


def test_modes_and_samples(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} * 6?", "answer": i * 6}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--format", "numeric", "--modes",
                 "on,off,budget:2", "--n", "2", "--max-new-tokens", "8", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"on", "off", "budget:2"}
    assert set(results["pass_at_k"]["on"]) == {"1", "2"}
    lines = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 3 * 2
    budget = [x for x in lines if x["mode"] == "budget:2"]
    assert all(x["tokens"] <= 8 for x in lines) and all("</think>" in x["completion"] for x in budget)


def test_builtin_tasks(checkpoint, tmp_path):
    folder, _, _ = checkpoint
    assert main(["eval", "--model", str(folder), "--data", "tasks:add,sort", "--count", "2", "--modes", "off",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "o")]) == 0
    lines = (tmp_path / "o" / "items.jsonl").read_text().splitlines()
    assert len(lines) == 4


NUM = ["--format", "numeric"]


@pytest.mark.parametrize("content, flags, message", [
    ('{"prompt": "q", "answer": 1}\n{"prompt": "q2"}\n', NUM, r"d\.jsonl:2: missing field \"answer\""),
    ('{"answer": 1}\n', NUM, r"d\.jsonl:1: missing field \"prompt\""),
    ('{"prompt": "q", "answer": 1, "format": "essay"}\n', NUM, r"d\.jsonl:1: unknown format 'essay'"),
    ('\n\n', NUM, r"d\.jsonl: no items"),
    ('{"prompt": "q", "answer": "many"}\n', NUM, r"d\.jsonl:1: answer 'many' is not a number"),
    ('{"prompt": "q", "answer": "E", "choices": ["a", "b"]}\n', ["--format", "mcq"], r"d\.jsonl:1: answer 'E'"),
    ('{"prompt": "q", "answer": "A"}\n', ["--format", "mcq"], r"d\.jsonl:1: an mcq item needs \"choices\""),
    ('{"prompt": "q", "answer": 1}\n{"prompt": "q", "answer": 1\n', NUM, r"d\.jsonl:2: not a JSON"),
    ('{"prompt": "q", "answer": 1}\n', [], r"d\.jsonl:1: no format"),
    ('{"prompt": "q", "answer": 1}\n', ["--format", "essay"], r"invalid choice: 'essay'"),
    ('{"prompt": "q", "answer": 1}\n', ["--format", "numeric", "--modes", "on,maybe"], r"'maybe' is not a mode"),
])
def test_bad_data_is_one_line_naming_file_and_line(checkpoint, tmp_path, capsys, content, flags, message):
    import re

    folder, _, _ = checkpoint
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    try:
        code = main(["eval", "--model", str(folder), "--data", str(data), *flags, "--out", str(out)])
    except SystemExit as e:  # argparse's own usage error (exit 2)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code != 0 and re.search(message, err), err
    assert len(err.splitlines()) <= 2 and not out.exists()  # nothing half-written


def test_numeric_answers_parse_as_fractions(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "q", "answer": "\\frac{-3}{4}"}) + "\n")
    assert load_items(f, "numeric")[0].answer == Fraction(-3, 4)
