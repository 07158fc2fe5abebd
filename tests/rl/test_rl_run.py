"""`nemotron3 rl` end to end on a tiny checkpoint: the out layout and metrics, exact resume after a failing reward
function (which leaves the last checkpoint intact), iGRPO's gradient through stage 2 only, clear errors."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, small_model

from nemotron3 import load_pretrained
from nemotron3.cli import main
from nemotron3.rl import trainer as trainer_module
from nemotron3.rl.grpo import GRPOConfig, grpo
from nemotron3.rl.rewards import RewardError
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data

pytestmark = pytest.mark.usefixtures("one_thread")

# A reward with variance on a random model (the parity of the first completion token), and a switch that makes it
# fail at its n-th call, as a flaky remote judge would.
REWARD = '''
import os
CALLS = {"n": 0}
def parity(prompts, completions, completion_ids, **columns):
    CALLS["n"] += 1
    if os.environ.get("FAIL_AT_CALL") == str(CALLS["n"]):
        raise RuntimeError("judge unavailable")
    return [float(ids[0] % 2) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=300)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    return checkpoint.save(tmp_path_factory.mktemp("sft") / "final", model, tok)


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("rewards") / "parity.py"
    f.write_text(REWARD)
    return f


def _cfg(ckpt: Path, out: Path, reward_file: Path, **kw) -> GRPOConfig:
    base = dict(model=ckpt, out=out, steps=4, prompts_per_step=3, num_generations=4, max_completion_length=10,
                reward_funcs=[f"{reward_file}:parity"], eval_problems=0, lr=1e-2, log_every=100, speculative=3)
    return GRPOConfig(**{**base, **kw})


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_layout_metrics_and_exact_resume_after_a_failing_reward(ckpt, reward_file, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _quiet(grpo, _cfg(ckpt, a, reward_file, save_every=2))
    ra = _records(a)
    assert [r["step"] for r in ra] == [1, 2, 3, 4]
    for r in ra:
        assert 0.98 < r["token_mult_prob_error"] < 1.02  # engine and trainer agree on the policy's logprobs
        for key in ("reward", "reward_std", "loss", "kl", "clip_region", "entropy", "completion_length",
                    "rollout_tok_s", "acceptance_length", "zero_std_groups", "grad_norm"):
            assert key in r, key
    assert load_pretrained(a / "final").config.vocab_size > 0 and (a / "summary.json").is_file()
    assert (a / "final" / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()

    # the same run, whose reward fails at step 3 (its 3rd call): a named error, step-2 checkpoint intact
    monkeypatch.setenv("FAIL_AT_CALL", "3")
    with pytest.raises(RewardError, match="reward function parity raised RuntimeError: judge unavailable"):
        _quiet(grpo, _cfg(ckpt, b, reward_file, save_every=2))
    assert checkpoint.latest(b).name == "step-000002" and not (b / "final").exists()
    assert [r["step"] for r in _records(b)] == [1, 2]
    monkeypatch.delenv("FAIL_AT_CALL")
    _quiet(grpo, GRPOConfig(out=b, resume=True))
    assert _records(b) == [{**r, **{k: _records(b)[i][k] for k in r if k.endswith(("_s", "seconds"))}}
                           for i, r in enumerate(ra)]  # every number but the timings, exactly
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()


def test_num_iterations_and_kl_run_and_clip(ckpt, reward_file, tmp_path):
    _quiet(grpo, _cfg(ckpt, tmp_path / "mu", reward_file, steps=2, num_iterations=3, beta=0.1, lr=3e-2,
                      loss_type="grpo", leave_one_out=True, micro_batch_size=5))
    r = _records(tmp_path / "mu")[-1]
    assert r["kl"] > 0 and r["clip_region"] > 0  # after the first of 3 updates the ratio leaves [0.8, 1.2]


def test_igrpo_trains_on_the_refinements_only(ckpt, reward_file, tmp_path, monkeypatch):
    seen = []
    real = trainer_module.completion_logprobs

    def spy(model, prompts, completions, *args):
        seen.append(prompts)
        return real(model, prompts, completions, *args)

    monkeypatch.setattr(trainer_module, "completion_logprobs", spy)
    cfg = _cfg(ckpt, tmp_path / "ig", reward_file, algo="igrpo", rollout_budget=5, steps=1,
               refine_template="{prompt} DRAFT {draft}")
    _quiet(grpo, cfg)
    tok = Tokenizer.load(ckpt)
    marker = tok.encode(" DRAFT")
    assert seen and all(len(p) == 3 * 3 for p in seen)  # 3 prompts x G = 3 refinements (budget 5 = 2 + 3)
    for prompts in seen:  # every sequence the loss saw is a stage-2 prompt, holding the draft marker
        for p in prompts:
            assert any(p[i : i + len(marker)] == marker for i in range(len(p)))
    r = _records(tmp_path / "ig")[0]
    assert "best_draft_reward" in r and r["best_draft_reward"] >= r["draft_reward"]


def test_errors_are_clear(ckpt, reward_file, tmp_path):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x " * 5000}) + "\n")  # 10,000 tokens: over the 8,192 context
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--data", str(long)], "prompt 0 'x x x"),
        (["--data", str(empty)], "no prompts in"),
        (["--reward-funcs", "no_module_here:f"], "cannot import 'no_module_here'"),
        (["--reward-funcs", "tasks", "--reward-weights", "1", "2"], "2 weights for 1 reward functions"),
        (["--algo", "igrpo", "--rollout-budget", "2"], "at least 1 draft and 2 refinements"),
        (["--resume"], "no complete checkpoint"),
    ]
    for extra, match in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["rl", "--model", str(ckpt), "--out", str(tmp_path / "e"), "--steps", "1",
                         "--eval-problems", "0", *extra])
        assert code == 1 and match in err.getvalue() and "Traceback" not in err.getvalue(), (extra, err.getvalue())


def test_the_command_line_writes_the_public_layout(ckpt, tmp_path):
    out = tmp_path / "cli"
    code = _quiet(main, ["rl", "--model", str(ckpt), "--out", str(out), "--steps", "2", "--prompts-per-step", "2",
                         "--num-generations", "2", "--max-completion-length", "8", "--eval-problems", "0"])
    assert code == 0
    recs = _records(out)
    assert [r["step"] for r in recs] == [1, 2] and all("reward" in r and "token_mult_prob_error" in r for r in recs)
    assert (out / "final" / "config.json").is_file()
    torch.testing.assert_close(load_pretrained(out / "final").lm_head.weight.abs().sum(),
                               load_pretrained(out / "final").lm_head.weight.abs().sum())
