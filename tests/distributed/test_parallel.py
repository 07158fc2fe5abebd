"""FSDP2 on a DeviceMesh (distributed/parallel.py) with 2 gloo processes started by torchrun, against one process.

References: one process training the same global batch (the loss is normalised by global counts, so the sum
of the ranks' gradients is the one-process gradient up to summation order); each rank's own local shards
(DTensor.to_local) for what a checkpoint saved by 2 ranks must contain; an uninterrupted 2-rank run for a run
killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import child_pids, wait_for_checkpoint

from nemotron3 import load_pretrained
from nemotron3.cli import main
from nemotron3.distributed import parallel
from nemotron3.train import checkpoint
from nemotron3.train.optim import build_optimizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SMALL = ["--batch-size", "4", "--seq-len", "32", "--eval-problems", "0", "--tokenizer-sample", "200"]


def _pretrain(out: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = TORCHRUN if ranks == 2 else [sys.executable]
    proc = subprocess.run([*launch, "-m", "nemotron3.cli", "pretrain", *SMALL, *args, "--out", str(out)], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _exact(out: Path) -> list[dict]:
    """The records without the timing."""
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in _records(out)]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    """The reference: one process, 10 fp32 steps with MTP, the aux loss and the expert-bias update."""
    out = tmp_path_factory.mktemp("one") / "run"
    _pretrain(out, *PARITY)
    return out


PARITY = ["--steps", "10", "--eval-every", "5"]


def _same_as_one_rank(one: Path, two: Path) -> None:
    """Every logged number within 1e-5 (relative above 1: fp32 sums in another order over ranks), the same expert
    loads, the final weights within 1e-4."""
    a_records, b_records = _records(one), _records(two)
    assert [sorted(r) for r in a_records] == [sorted(r) for r in b_records] and len(a_records) == 13  # +2 evals +shares
    for a, b in zip(a_records, b_records):
        for key in ("loss", "grad_norm", "mtp_loss", "aux_loss", "eval_loss", "eval_mtp_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (a["step"], key, a[key], b[key])
        if "load_max_min" in a:  # the bias update saw the global batch's loads on both ranks
            assert a["load_max_min"] == b["load_max_min"], a["step"]
    w1 = load_pretrained(one / "final").state_dict()
    for name, t in load_pretrained(two / "final").state_dict().items():
        _adam_close(t, w1[name], name)


def _adam_close(a: torch.Tensor, b: torch.Tensor, name: str, lr: float = 3e-3, steps: int = 10) -> None:
    """Final weights of two runs whose gradients differ only in summation order (fp32: ~1e-7 relative).

    AdamW moves each element by lr·m/(sqrt(v) + 1e-8): for an element whose gradient is itself at the level of that
    summation noise, the update's direction is the noise, and the two runs may part by up to lr per step there
    (seen on an AMD EPYC: one embedding element of 57,344 off by 9e-4 after 10 steps). So every element within
    1e-4, except at most 1 in 10,000 elements of a tensor, which stay within 2·lr per step (each run moves an element
    by about lr per step at most, AdamW's normalised update)."""
    diff = (a - b).abs()
    far = int((diff > 1e-4).sum())
    assert far <= max(1, a.numel() // 10_000), (name, far, diff.max().item())
    assert diff.max().item() <= 2 * lr * steps, (name, diff.max().item())


def test_two_ranks_give_the_losses_of_one_rank_at_the_same_global_batch(one_rank, tmp_path):
    _pretrain(tmp_path / "two", *PARITY, ranks=2)
    _same_as_one_rank(one_rank, tmp_path / "two")


@pytest.mark.slow
def test_two_expert_parallel_ranks_give_the_losses_of_one_rank(one_rank, tmp_path):
    """--ep 2: each rank holds 8 of the 16 experts of every MoE layer, tokens move by all-to-all."""
    _pretrain(tmp_path / "ep", *PARITY, "--ep", "2", ranks=2)
    _same_as_one_rank(one_rank, tmp_path / "ep")


@pytest.mark.parametrize("ep", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_checkpoint_saved_by_two_ranks_holds_their_shards_and_loads_in_one(tmp_path, ep):
    """The loop's own save (train/loop.py `_save`) after 2 sharded steps: load_pretrained and a one-process
    optimizer hold exactly the concatenation of the two ranks' dim-0 shards. With --ep 2 a rank's expert
    tensors are its 8 of the 16 experts, so the concatenation is the same."""
    proc = subprocess.run([*TORCHRUN, str(Path(__file__).with_name("parallel_worker.py")), str(tmp_path), str(ep)],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = [torch.load(tmp_path / f"shards-{r}.pt") for r in range(2)]
    folder = tmp_path / "step-000002"
    model = load_pretrained(folder, dtype=torch.float32)
    halved = 0
    for name, p in model.named_parameters():
        a, b = shards[0]["params"][name], shards[1]["params"][name]
        halved += a.shape[0] < p.shape[0]
        assert torch.equal(torch.cat([a, b]), p), name
    assert halved == len(shards[0]["params"])  # every parameter really was split over the two ranks
    assert all((s["dispatched"] > 0) == (ep == 2) for s in shards)  # rows moved by all-to-all only under --ep 2
    for s in shards:  # the clipping norm is the whole gradient's, also over the experts alone
        for part, (norm, reference) in s["norms"].items():
            assert norm == pytest.approx(reference, rel=1e-6), part
    opt = build_optimizer(model, 1e-3)
    parallel.load_optimizer_state(opt, checkpoint.load_state(folder)["optimizer"])
    for name, p in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            full = torch.cat([s["moments"][name][key] for s in shards])
            assert torch.equal(opt.state[p][key], full), (name, key)
    assert all(int(opt.state[p]["step"]) == 2 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("ep", ["1", "2"])
def test_sigkill_of_one_rank_then_resume_is_bit_exact_and_another_world_size_resumes_the_position(tmp_path, ep):
    args = ["--steps", "12", "--eval-every", "6", "--save-every", "2", "--keep-last", "0", "--ep", ep]
    whole, killed, single = tmp_path / "whole", tmp_path / "killed", tmp_path / "single"
    _pretrain(whole, *args, ranks=2)
    proc = subprocess.Popen([*TORCHRUN, "-m", "nemotron3.cli", "pretrain", *SMALL, *args, "--out", str(killed)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_checkpoint(proc, killed, 4)
    ranks = child_pids(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not (killed / "final").exists()
    _pretrain(killed, "--resume", "--ep", ep, ranks=2)  # the layout is the launch's, not the checkpoint's
    assert _exact(killed) == _exact(whole)
    # one process resumes the 2-rank checkpoint of step 6 at its data position (summation order aside)
    single.mkdir()
    shutil.copytree(whole / "step-000006", single / "step-000006")
    (single / "metrics.jsonl").write_text("")
    _pretrain(single, "--resume", "--ep", "1")
    after = [r for r in _records(whole) if r["step"] > 6]
    resumed = _records(single)
    assert [r["step"] for r in resumed] == [r["step"] for r in after]
    for a, b in zip(after, resumed):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key)


def test_layout_errors(tmp_path):
    assert parallel.resolve_layout(0, 0, 4) == (4, 1)
    with pytest.raises(ValueError, match="must equal the number of processes"):
        parallel.resolve_layout(2, 1, 4)
    assert parallel.resolve_layout(4, 2, 4) == (4, 2)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.resolve_layout(4, 3, 4)
    assert main(["pretrain", *SMALL, "--steps", "1", "--dp-shard", "2", "--out", str(tmp_path / "x")]) != 0
    assert not (tmp_path / "x" / "final").exists()


@pytest.mark.slow
def test_sft_and_nvfp4_under_two_ranks(tmp_path):
    """sft: 2 ranks give the losses of one process. NVFP4 (without stochastic rounding, whose noise each rank
    draws from the same seeded stream): 2 ranks of 2 rows give the losses of one process in micro-batches of 2,
    the same activation tensors being quantized with the same per-tensor scales."""
    _pretrain(tmp_path / "base", "--steps", "2", "--eval-every", "100")
    args = ["--model", str(tmp_path / "base" / "final"), "--steps", "6", "--batch-size", "4", "--conversations", "48",
            "--eval-every", "3", "--heldout-task-problems", "12", "--eval-problems", "0", "--log-every", "100"]
    for ranks in (1, 2):
        launch = TORCHRUN if ranks == 2 else [sys.executable]
        proc = subprocess.run([*launch, "-m", "nemotron3.cli", "sft", *args, "--out", str(tmp_path / f"sft{ranks}")],
                              env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    nv = ["--nvfp4", "--nvfp4-off", "sr", "--steps", "4", "--eval-every", "4"]
    _pretrain(tmp_path / "nv1", *nv, "--micro-batch-size", "2")
    _pretrain(tmp_path / "nv2", *nv, ranks=2)
    for one, two, tol in (("sft1", "sft2", 1e-5), ("nv1", "nv2", 1e-4)):
        a, b = _records(tmp_path / one), _records(tmp_path / two)
        assert len(a) == len(b) > 4
        for x, y in zip(a, b):
            for key in ("loss", "mtp_loss", "eval_loss"):
                if key in x:
                    assert abs(x[key] - y[key]) <= tol, (one, x["step"], key)
