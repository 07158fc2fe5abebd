"""Reward functions (rl/rewards.py), prompt sets (rl/prompts.py) and iGRPO's stage-2 prompts (rl/igrpo.py)."""

from __future__ import annotations

import math

import pytest
import torch

from nemotron3 import tasks
from nemotron3.rl import igrpo, rewards
from nemotron3.rl.prompts import FilePrompts, TaskPrompts, read_prompts
from nemotron3.train.data import DataError


def _p(text):
    return [{"role": "user", "content": text}]


def _c(text):
    return [{"role": "assistant", "content": text}]


def test_task_reward_reads_the_answer_after_the_reasoning():
    p = tasks.generate("add", 1, seed=0)[0]
    good, bad = f"{p.trace}\n</think>\n{p.answer}", f"{p.answer}\n</think>\n{int(p.answer) + 1}"
    total, per = rewards.score([rewards.load("tasks")], [1.0], [_p(p.prompt)] * 2, [_c(good), _c(bad)], {})
    assert total.tolist() == [1.0, 0.0] and per.shape == (2, 1)


def test_weighted_sum_none_and_all_none():
    def half(prompts, completions, **kw):
        return [0.5, None, None]

    def ones(prompts, completions, flag, **kw):
        assert flag == ["a", "b", "c"]  # columns arrive one value per completion
        return [1, 1, None]

    total, per = rewards.score([half, ones], [2.0, 0.5], [_p("x")] * 3, [_c("y")] * 3, {"flag": ["a", "b", "c"]})
    assert total[:2].tolist() == [2 * 0.5 + 0.5, 0.5] and math.isnan(total[2])
    assert per.isnan().tolist() == [[False, False], [True, False], [True, True]]


@pytest.mark.parametrize("bad,match", [
    (lambda p, c, **k: 1 / 0, "reward function .*<lambda>.* raised ZeroDivisionError"),
    (lambda p, c, **k: [1.0], "returned 1 values for 2 completions"),
    (lambda p, c, **k: [1.0, "yes"], "completion 1 got 'yes'"),
    (lambda p, c, **k: [1.0, math.inf], "completion 1 got inf"),
    (lambda p, c, **k: [True, 1.0], "completion 0 got True"),
    (lambda p, c, **k: 3.0, "returned float"),
])
def test_bad_reward_functions_are_named(bad, match):
    with pytest.raises(rewards.RewardError, match=match):
        rewards.score([bad], [1.0], [_p("x")] * 2, [_c("y")] * 2, {})


def test_load_by_module_and_by_file(tmp_path):
    assert rewards.load("nemotron3.tasks:reward") is tasks.reward
    f = tmp_path / "mine.py"
    f.write_text("def score(prompts, completions, **kw):\n"
                 "    return [float(len(c[0]['content'])) for c in completions]\n")
    fn = rewards.load(f"{f}:score")
    assert fn([_p("x")], [_c("abc")]) == [3.0]
    for spec, match in [("nope", "expected 'module:function'"), ("no_such_module_x:f", "cannot import"),
                        ("nemotron3.tasks:missing", "no callable 'missing'"), (f"{tmp_path}/x.py:f", "cannot import")]:
        with pytest.raises(rewards.RewardError, match=match):
            rewards.load(spec)


def test_task_prompts_depend_only_on_seed_and_step():
    a, b = TaskPrompts(seed=3), TaskPrompts(seed=3)
    assert [r.messages for r in a.batch(7, 12)] == [r.messages for r in b.batch(7, 12)]
    assert [r.messages for r in a.batch(7, 12)] != [r.messages for r in a.batch(8, 12)]
    rows = TaskPrompts(families=["mul"]).batch(0, 5)
    assert {r.columns["family"] for r in rows} == {"mul"}
    for r in rows:  # the reference answer column is right
        assert tasks.reward([r.messages], [_c(f"</think>\n{r.columns['answer']}")]) == [1.0]
    with pytest.raises(ValueError, match="unknown task families"):
        TaskPrompts(families=["chess"])


def test_prompt_files_and_their_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n\n{"prompt": [{"role": "user", "content": "hi"}]}\n')
    rows = read_prompts([good])
    assert rows[0].messages == _p("What is 2 + 3?") and rows[0].columns == {"answer": "5"}
    src = FilePrompts([good], seed=1)
    seen = [r.messages[0]["content"] for r in src.batch(0, 4)]
    assert sorted(seen[:2]) == ["What is 2 + 3?", "hi"] and sorted(seen[2:]) == ["What is 2 + 3?", "hi"]
    cases = [("{bad json", "p.jsonl:1: malformed JSON"), ('{"text": "x"}', "p.jsonl:1: no 'prompt' field"),
             ('{"prompt": ""}', "p.jsonl:1: empty prompt"),
             ('{"prompt": [{"role": "bot", "content": "x"}]}', "p.jsonl:1: prompt message 0"),
             ('{"prompt": 3}', "p.jsonl:1: 'prompt' must be"), ("", "no prompts in")]
    for text, match in cases:
        good.write_text(text + "\n")
        with pytest.raises(DataError, match=match):
            read_prompts([good])


def test_best_draft_ties_and_missing_rewards():
    r = torch.tensor([0.0, 1.0, 1.0, 0.5, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, math.nan, 0.0])
    assert igrpo.best_drafts(r, 4) == [1, 0, 1]  # the earliest of equals; all-NaN keeps draft 0


def test_refinement_prompt_and_budget_split():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 3?"}]
    out = igrpo.refinement_messages(msgs, igrpo.draft_answer("2 + 3 = 6\n</think>\n6"), "{prompt} | draft {draft}")
    assert out == [msgs[0], {"role": "user", "content": "What is 2 + 3? | draft 6"}] and msgs[1]["content"] == \
        "What is 2 + 3?"
    with pytest.raises(ValueError, match="placeholder"):
        igrpo.refinement_messages(msgs, "6", "{question}")
    assert igrpo.split_budget(8) == (4, 4) and igrpo.split_budget(7) == (3, 4)
    with pytest.raises(ValueError, match="at least"):
        igrpo.split_budget(2)
