"""`nemotron3 rl --env`: environments as the rollout source (rl/env_source.py). On a tiny checkpoint whose turns end
often (its `</tool_call>` logit is raised), `--env tools` runs multi-turn episodes: the loss mask the
update uses is the episodes' model-token mask over every turn, `token_mult_prob_error` stays 1 over them, the metrics
hold the per-environment keys, and a run stopped at step 3 resumes bit for bit. `--env tasks` reproduces the run
without `--env`; bad specs fail with one line before anything is written; summary.json holds each environment's
held-out accuracy before and after."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, small_model

from nemotron3 import chat
from nemotron3.cli import main
from nemotron3.rl import env_source
from nemotron3.rl import trainer as trainer_module
from nemotron3.rl.grpo import GRPOConfig, grpo
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint, sft_data
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tools = [chat.render(c.messages, c.tools) for c in sft_data.tool_conversations(60, seed=0)]
    tok = Tokenizer.train(train_data.task_texts(300, seed=0) + tools, vocab_size=600)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    with torch.no_grad():  # turns that end early: a random policy that still takes several turns per episode
        w = model.lm_head.weight
        call_end = tok.token_to_id("</tool_call>")
        big = w[call_end].clone() * 6
        w.mul_(0.3)
        w[call_end] = big
    return checkpoint.save(tmp_path_factory.mktemp("sft") / "final", model, tok)


def _cfg(ckpt: Path, out: Path, **kw) -> GRPOConfig:
    base = dict(model=ckpt, out=out, steps=4, prompts_per_step=2, num_generations=3, max_completion_length=64,
                env=["tools"], eval_problems=0, lr=1e-2, log_every=100, speculative=0)
    return GRPOConfig(**{**base, **kw})


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tools_episodes_mask_metrics_and_exact_resume(ckpt, tmp_path, monkeypatch):
    episodes, masks = [], []
    real_rollout, real_loss = env_source.multiturn_rollout, trainer_module.policy_loss

    def rollout_spy(*args, **kw):
        episodes.append(real_rollout(*args, **kw))
        return episodes[-1]

    def loss_spy(logp, old, adv, mask, *args):
        masks.append(mask.detach().clone())
        return real_loss(logp, old, adv, mask, *args)

    monkeypatch.setattr(env_source, "multiturn_rollout", rollout_spy)
    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    a, b = tmp_path / "a", tmp_path / "b"
    _quiet(grpo, _cfg(ckpt, a, save_every=2))
    ra = _records(a)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    for r, eb, mask in zip(ra, episodes, masks):
        for key in ("env/tools/reward", "env/tools/accuracy", "env/tools/turns", "tool_calls/valid_fraction",
                    "tool_calls/malformed", "reward", "accuracy", "loss", "token_mult_prob_error"):
            assert key in r, key
        # the update's mask is each episode's model-token mask, right-padded with 0 (no row is dropped here)
        want = eb.mask_tensor(list(range(len(eb.completion_mask))), mask.shape[1])
        assert torch.equal(mask, want)
        # ... and the engine's log-probabilities of every model turn are what the trainer recomputes
        assert 0.98 < r["token_mult_prob_error"] < 1.02
    multi = [m for eb in episodes for m in eb.completion_mask if 0 in m and m[-1] == 1]
    assert len(multi) >= 3, "expected episodes whose model turns come after environment tokens"
    assert sum(r["tool_calls/total"] for r in ra) > 0

    # stopped by an error at step 3 (after the step-2 checkpoint), then resumed: every number but the timings
    calls = {"n": 0}
    real_generate = env_source.EnvRollouts.generate

    def failing(self, step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real_generate(self, step)

    monkeypatch.setattr(env_source.EnvRollouts, "generate", failing)
    with pytest.raises(RuntimeError, match="killed"):
        _quiet(grpo, _cfg(ckpt, b, save_every=2))
    assert checkpoint.latest(b).name == "step-000002"
    monkeypatch.setattr(env_source.EnvRollouts, "generate", real_generate)
    _quiet(grpo, GRPOConfig(out=b, resume=True))
    rb = _records(b)
    timing = ("_s", "seconds")
    assert [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rb] == \
           [{k: v for k, v in r.items() if not k.endswith(timing)} for r in ra]
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()


def test_env_tasks_reproduces_the_run_without_env(ckpt, tmp_path):
    kw = dict(steps=2, prompts_per_step=3, num_generations=2, max_completion_length=12)
    _quiet(grpo, _cfg(ckpt, tmp_path / "plain", env=[], **kw))
    _quiet(grpo, _cfg(ckpt, tmp_path / "env", env=["tasks"], **kw))
    for p, e in zip(_records(tmp_path / "plain"), _records(tmp_path / "env")):
        assert e["completion_length"] == p["completion_length"] and e["reward"] == p["reward"]
        assert e["env/tasks/reward"] == p["reward"] and e["accuracy"] == p["accuracy"]
        assert abs(e["loss"] - p["loss"]) < 1e-6 and abs(e["token_mult_prob_error"] - p["token_mult_prob_error"]) < 1e-6


def test_two_environments_and_their_heldout_accuracy_in_summary(ckpt, tmp_path):
    out = tmp_path / "mix"
    code = _quiet(main, ["rl", "--model", str(ckpt), "--out", str(out), "--env", "tasks", "--env", "tools:0.5",
                         "--steps", "2", "--prompts-per-step", "3", "--num-generations", "2",
                         "--max-completion-length", "24", "--eval-problems", "2", "--speculative", "0"])
    assert code == 0
    steps = [r for r in _records(out) if "reward" in r]
    assert all("env/tasks/accuracy" in r and "env/tools/accuracy" in r for r in steps)  # 2 + 1 prompts per step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["envs"] == {"tasks": 1.0, "tools": 0.5}
    for key in ("env_accuracy_before", "env_accuracy_after"):
        assert set(summary[key]) == {"tasks", "tools"}
        # the tasks environment's held-out accuracy is the mean of the families' exact match on the same problems
        fams = summary[key.replace("env_", "")]
        assert summary[key]["tasks"] == pytest.approx(sum(fams.values()) / len(fams))
    held = [r for r in _records(out) if "heldout_env_accuracy" in r]
    assert held and set(held[-1]["heldout_env_accuracy"]) == {"tasks", "tools"}


def test_max_turn_tokens_caps_each_turn(ckpt, tmp_path, monkeypatch):
    episodes = []
    real = env_source.multiturn_rollout

    def spy(*args, **kw):
        episodes.append(real(*args, **kw))
        return episodes[-1]

    monkeypatch.setattr(env_source, "multiturn_rollout", spy)
    _quiet(grpo, _cfg(ckpt, tmp_path / "t", steps=2, max_turn_tokens=5))
    runs = []  # the lengths of the model's turns: the runs of 1 in each completion mask
    for eb in episodes:
        for mask in eb.completion_mask:
            text = "".join(map(str, mask))
            runs += [len(r) for r in text.split("0") if r]
    assert runs and max(runs) == 5 and len(runs) > len(episodes) * 6  # capped, and more turns than episodes
    assert all(eb.turns[i] == 1 or 0 in eb.completion_mask[i] for eb in episodes for i in range(len(eb.turns)))


@pytest.mark.parametrize("specs, match", [
    (["tools:0"], "--env tools:0: the weight must be a finite number > 0"),
    (["tasks", "tools:-1"], "--env tools:-1: the weight must be a finite number > 0"),
    (["tasks:1e-400"], "--env tasks:1e-400: the weight must be a finite number > 0"),
    (["nosuchenv"], "--env nosuchenv: unknown environment 'nosuchenv'"),
    (["tasks", "tasks:2"], "given twice"),
])
def test_bad_env_fails_with_one_line_and_writes_nothing(ckpt, tmp_path, specs, match):
    out = tmp_path / "bad"
    err = io.StringIO()
    argv = ["rl", "--model", str(ckpt), "--out", str(out), "--steps", "1"]
    for s in specs:
        argv += ["--env", s]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1 and match in lines[0], err.getvalue()
    assert not out.exists()


def test_env_refuses_the_flags_it_replaces(ckpt, tmp_path):
    for extra, field in ((["--families", "add"], "families (--families)"), (["--algo", "igrpo"], "algo (--algo)"),
                         (["--reward-funcs", "x:y"], "reward_funcs (--reward-funcs)")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["rl", "--model", str(ckpt), "--out", str(tmp_path / "r"), "--env", "tools", *extra])
        assert code == 1 and field in err.getvalue() and not (tmp_path / "r").exists(), err.getvalue()

