"""`nemotron3 rl` under torchrun with 2 gloo processes (FSDP2-sharded policy, rollouts generated on rank 0 from the
gathered weights and broadcast), against one process.

References: one process on the same global batch (the same prompts and sampling streams, the loss normalised by the
whole batch's counts, so the 2-rank gradient is the 1-process one up to summation order); an uninterrupted 2-rank
run for a run whose rank 1 is killed with SIGKILL and resumed (bit for bit: every number but the timings, and the
final weights' bytes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_pids, randomize_, small_model, wait_for_checkpoint

from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data

pytestmark = pytest.mark.slow

REWARD = '''
def parity(prompts, completions, completion_ids, **columns):
    return [float(ids[0] % 2) for ids in completion_ids]
'''
TIMINGS = ("rollout_tok_s", "rollout_seconds", "step_seconds")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str]]:
    """A random checkpoint with an MTP block, a reward with variance on it, and the run's flags: 8 steps (the
    first 5 compared: AdamW turns the summation-order noise of gradient elements near 0 into steps of up to lr, which
    a random policy amplifies from step to step; test_parallel.py `_adam_close`), μ = 2
    passes with the old log-probabilities, the k3 KL to the reference, micro-batches of 5 (each rank's share of
    12 completions is 6: chunks of 5 and 1)."""
    root = tmp_path_factory.mktemp("rl")
    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=300)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    ckpt = checkpoint.save(root / "sft", model, tok)
    (root / "parity.py").write_text(REWARD)
    args = ["--model", str(ckpt), "--steps", "8", "--prompts-per-step", "3", "--num-generations", "4",
            "--max-completion-length", "10", "--reward-funcs", f"{root / 'parity.py'}:parity", "--eval-problems", "0",
            "--lr", "1e-3", "--num-iterations", "2", "--beta", "0.05", "--micro-batch-size", "5", "--log-every", "100",
            "--save-every", "2", "--keep-last", "0"]
    return root, args


def _rl(out: Path, args: list[str], ranks: int, *extra: str) -> None:
    launch = TORCHRUN if ranks == 2 else [sys.executable]
    proc = subprocess.run([*launch, "-m", "nemotron3.cli", "rl", *args, *extra, "--out", str(out)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _exact(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in _records(out)]


def test_two_ranks_give_the_metrics_of_one_process_and_resume_bit_exactly_after_sigkill(setup):
    root, args = setup
    one, two, killed = root / "one", root / "two", root / "killed"
    _rl(one, args, 1)
    _rl(two, args, 2)
    a, b = _records(one), _records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a[:5], b[:5]):
        assert sorted(x) == sorted(y)
        # the same rollouts: the tokens, hence the rewards and lengths, are the ones one process sampled
        for key in ("reward", "reward_std", "completion_length", "truncated", "zero_std_groups"):
            assert x[key] == y[key], (x["step"], key)
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
        for key in ("kl", "ratio", "entropy", "token_mult_prob_error", "clip_region"):
            assert abs(x[key] - y[key]) <= 1e-5, (x["step"], key, x[key], y[key])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"]), x["step"]
    assert a[-1]["kl"] > 0 and any(r["loss"] != 0 for r in a)  # the update really ran

    proc = subprocess.Popen([*TORCHRUN, "-m", "nemotron3.cli", "rl", *args, "--out", str(killed)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_checkpoint(proc, killed, 4)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not (killed / "final").exists()
    _rl(killed, ["--resume"], 2, "--log-every", "100")
    assert _exact(killed) == _exact(two)
    assert (killed / "final" / "model.safetensors").read_bytes() == (two / "final" / "model.safetensors").read_bytes()


def test_a_rank_short_of_rows_runs_a_zero_weighted_forward_and_the_losses_still_match(setup):
    """1 prompt x 5 completions in micro-batches of 2: rank 0 trains rows 0-1 and 2, rank 1 rows 3-4 and then
    nothing, so it runs one zero-weighted forward to keep FSDP2's collectives paired."""
    root, args = setup
    small = [*args, "--steps", "3", "--prompts-per-step", "1", "--num-generations", "5", "--micro-batch-size", "2",
             "--save-every", "0"]
    _rl(root / "short1", small, 1)
    _rl(root / "short2", small, 2)
    a, b = _records(root / "short1"), _records(root / "short2")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["reward"] == y["reward"] and abs(x["loss"] - y["loss"]) <= 1e-6, (x["step"], x["loss"], y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-5 * max(1.0, x["grad_norm"]), x["step"]
