"""The lm-evaluation-harness backend (nemotron3/eval/harness.py) through lm-eval's own Python API: a fixture task in
lm-eval's YAML format over a local .jsonl (no download), scored the same as `nemotron3 eval`; loglikelihoods against
a plain forward; `nemotron3 lm-eval` as lm-eval's command line."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_checkpoint as build_checkpoint
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

import nemotron3.eval.harness  # noqa: F401  (registers the model)
from nemotron3.cli import main
from nemotron3.eval.extract import extract
from nemotron3.eval.harness import Nemotron3LM

PROMPTS = [f"Question {i}: what is {i} * 6? Pick one." for i in range(6)]
CHOICES = ["red", "green", "blue"]

GEN_TASK = """task: nemo_fixture_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: []
  max_gen_toks: 12
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: nemo_fixture_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

UTILS = '''from nemotron3.eval.extract import extract, grade


def process_results(doc, results):
    """The same extraction and grading as `nemotron3 eval --format exact` (the backend returns the answer part)."""
    prediction = extract("exact", results[0])
    return {"acc": float(grade("exact", prediction, doc["answer"]))}
'''


def _tasks(folder) -> TaskManager:
    """The fixture tasks alone: indexing lm-eval's thousands of built-in task files takes seconds per call."""
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    folder = root / "ckpt"
    folder.mkdir()
    model, tk = build_checkpoint(folder)
    # planted answers: half the items answered by what the model itself replies (from `nemotron3 eval` below)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "?", "choices": CHOICES, "target": i % 3}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    probe = root / "probe"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--format", "exact", "--modes", "off",
                 "--max-new-tokens", "12", "--out", str(probe)]) == 0
    preds = [json.loads(x)["prediction"] for x in (probe / "items.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({"prompt": p, "answer": preds[i] if i % 2 and preds[i] else "not it",
                                        "choices": CHOICES, "target": i % 3}) + "\n" for i, p in enumerate(PROMPTS)))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=data))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=data))
    (tasks / "utils.py").write_text(UTILS)
    return root, folder, model, tk, data, tasks


def test_simple_evaluate_agrees_with_nemotron3_eval(setup):
    root, folder, model, tk, data, tasks = setup
    out = root / "ours"
    assert main(["eval", "--model", str(folder), "--data", str(data), "--format", "exact", "--modes", "off",
                 "--max-new-tokens", "12", "--batch-size", "4", "--out", str(out)]) == 0
    ours = json.loads((out / "results.json").read_text())
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert 0 < ours["accuracy"]["off"] < 1
    res = simple_evaluate(model="nemotron3", model_args=f"pretrained={folder},think=off,batch_size=4",
                          tasks=["nemo_fixture_gen"], task_manager=_tasks(tasks),
                          apply_chat_template=True, log_samples=True)
    theirs = res["results"]["nemo_fixture_gen"]
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"]["off"])
    assert theirs["acc_stderr,none"] == pytest.approx(ours["stderr"]["off"])
    samples = sorted(res["samples"]["nemo_fixture_gen"], key=lambda s: s["doc_id"])
    assert [extract("exact", s["resps"][0][0]) for s in samples] == [x["prediction"] for x in items]


def test_multiple_choice_by_loglikelihood(setup):
    """lm-eval's multiple_choice task: acc is the share of items whose target choice has the highest loglikelihood,
    computed here by plain forwards."""
    root, folder, model, tk, data, tasks = setup
    res = simple_evaluate(model="nemotron3", model_args=f"pretrained={folder},batch_size=3",
                          tasks=["nemo_fixture_mc"], task_manager=_tasks(tasks))
    hits = 0
    for i, p in enumerate(PROMPTS):
        scores = [_manual_loglikelihood(model, tk, p, " " + c)[0] for c in CHOICES]
        hits += max(range(3), key=lambda j: scores[j]) == i % 3
    assert res["results"]["nemo_fixture_mc"]["acc,none"] == pytest.approx(hits / len(PROMPTS))


def _manual_loglikelihood(model, tk, context: str, continuation: str) -> tuple[float, bool]:
    """<s> + context + continuation in one forward; the continuation's tokens are those after the context's."""
    whole = [tk.bos_id, *tk.encode(context + continuation)]
    n = len(whole) - 1 - len(tk.encode(context))
    with torch.no_grad():
        logp = model(torch.tensor([whole[:-1]]))[0].double().log_softmax(-1)
    targets = torch.tensor(whole[-n:])
    rows = logp[-n:]
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_loglikelihood_against_a_manual_forward(setup):
    _, folder, model, tk, _, _ = setup
    lm = Nemotron3LM(pretrained=str(folder), batch_size=2)
    pairs = [("What is 7 * 6?", " It is 42."), ("Paris is", " the capital of France."), ("The answer", " is B."),
             ("", "What is 7 * 6?")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (score, greedy) in zip(pairs[:3], got[:3]):
        want, want_greedy = _manual_loglikelihood(model, tk, ctx, cont)
        assert score == pytest.approx(want, abs=1e-5) and greedy == want_greedy
    # an empty context is conditioned on <s> alone
    assert got[3][0] == pytest.approx(_manual_loglikelihood(model, tk, "", "What is 7 * 6?")[0], abs=1e-5)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (TEXT,), 0) for TEXT in
                                        ["What is 7 * 6? It is 42."]])
    assert rolling[0] == pytest.approx(_manual_loglikelihood(model, tk, "", "What is 7 * 6? It is 42.")[0], abs=1e-5)


def test_rolling_windows_score_every_token_once(setup):
    """With a window shorter than the text, each token is still scored exactly once (lm-eval's disjoint windows):
    the sum equals scoring each window's new tokens by hand."""
    _, folder, model, tk, _, _ = setup
    text = "What is 7 * 6? It is 42. The answer is B. Paris is the capital of France."
    lm = Nemotron3LM(pretrained=str(folder), max_length=8)
    ids = tk.encode(text)
    want = 0.0
    with torch.no_grad():
        for end in range(len(ids)):  # token `end` predicted from at most 8 tokens of context (BOS for the first)
            ctx = ([tk.bos_id] + ids)[max(0, end + 1 - 8): end + 1]
            want += float(model(torch.tensor([ctx]))[0, -1].double().log_softmax(-1)[ids[end]])
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # lm-eval's windows give the first tokens of a window less context than a sliding window: compare the
    # windows' own rule instead when they differ
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    exact = 0.0
    with torch.no_grad():
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tk.bos_id, 8, 1)):
            full = ctx + cont
            logp = model(torch.tensor([full[:-1]]))[0].double().log_softmax(-1)
            exact += float(logp[-len(cont):].gather(-1, torch.tensor(cont)[:, None]).sum())
    # the backend's log_softmax is fp32 (the reference's float64): a few ulps of a logsumexp near 10 per token
    assert got == pytest.approx(exact, abs=2e-6 * len(ids))
    assert want < 0 and got < 0


def test_generate_until_stops_at_strings_and_keeps_the_answer(setup):
    _, folder, model, tk, _, _ = setup
    lm = Nemotron3LM(pretrained=str(folder), think="off")
    ctx = lm.apply_chat_template([{"role": "user", "content": PROMPTS[0]}])
    full = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 12}), 0)])[0]
    assert full, "the tiny model replies something"
    stop = full.strip()[:1]
    cut = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 12}), 0)])[0]
    assert cut == full.split(stop)[0]


def test_cli_runs_lm_evals_command_line(setup, capsys, monkeypatch):
    root, folder, _, _, _, tasks = setup
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, metadata=None, **_: _tasks(include_path))
    out = root / "cli-out"
    code = main(["lm-eval", "--model", "nemotron3", "--model_args", f"pretrained={folder},think=off",
                 "--tasks", "nemo_fixture_gen", "--include_path", str(tasks), "--limit", "2",
                 "--apply_chat_template", "--output_path", str(out)])
    assert code == 0
    assert "nemo_fixture_gen" in capsys.readouterr().out
    assert list(out.rglob("results_*.json"))
    code = main(["lm-eval", "--model", "nemotron3", "--model_args", f"pretrained={root / 'nowhere'}",
                 "--tasks", "nemo_fixture_gen", "--include_path", str(tasks)])
    assert code == 1 and "not a checkpoint folder" in capsys.readouterr().err
