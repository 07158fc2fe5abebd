"""`nemotron3 pretrain` end to end: bit-identical resume after SIGKILL, atomic checkpoints, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from nemotron3 import load_pretrained
from nemotron3.cli import main
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint

ARGS = ["--steps", "16", "--batch-size", "4", "--seq-len", "48", "--eval-every", "8", "--eval-problems", "0",
        "--save-every", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nemotron3.cli", "pretrain", *ARGS, "--out", str(out), *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if metrics.exists() and any(json.loads(ln)["step"] >= step
                                    for ln in metrics.read_text().splitlines() if ln.endswith("}")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before step {step}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def test_sigkill_then_resume_gives_bit_identical_losses(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(_cmd(a), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(_cmd(b), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, b / "metrics.jsonl", 10)  # checkpoints at 4 and 8 exist, step 10 was logged
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (b / "final").exists() and checkpoint.latest(b).name in ("step-000008", "step-000012")
    done = subprocess.run([sys.executable, "-m", "nemotron3.cli", "pretrain", "--out", str(b), "--resume"],
                          env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    ra, rb = _records(a), _records(b)
    train_a = [(r["step"], r["loss"], r["grad_norm"]) for r in ra if "loss" in r]
    train_b = [(r["step"], r["loss"], r["grad_norm"]) for r in rb if "loss" in r]
    # steps the killed run logged past its checkpoint were dropped
    assert [s for s, *_ in train_b] == list(range(1, 17))
    assert train_a == train_b  # exact float equality, every step
    assert [r for r in ra if "eval_loss" in r] == [r for r in rb if "eval_loss" in r]
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    # final/ is a complete checkpoint folder: weights, config and tokenizer
    model = load_pretrained(b / "final")
    tok = Tokenizer.load(b / "final")
    assert model.config.vocab_size >= tok.vocab_size and model.config.eos_token_id == tok.eos_id
    assert [p.name for _, p in checkpoint.checkpoints(b)] == ["step-000008", "step-000012"]  # keep_last = 2


_CRASH_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from nemotron3 import HybridLM, ModelConfig
    from nemotron3.train import checkpoint
    from nemotron3.train import data as train_data
    from nemotron3.tokenizer import Tokenizer
    out = sys.argv[1]
    tok = Tokenizer.train(train_data.task_texts(50, seed=0), vocab_size=300)
    model = HybridLM(ModelConfig.preset("tiny"))
    checkpoint.save(checkpoint.step_dir(out, 4), model, tok, {"step": 4})
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    real_save = torch.save
    def die(*a, **k):  # the weights of step 8 are on disk, its state is half written: the process dies
        real_save(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = die
    checkpoint.save(checkpoint.step_dir(out, 8), model, tok, {"step": 8})
""")


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_loadable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _CRASH_DURING_SAVE, str(tmp_path)], env=ENV, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert "step-000004" in leftovers and "step-000008" not in leftovers
    assert any(n.startswith(".tmp-step-000008") for n in leftovers)  # the interrupted write, never renamed in
    assert checkpoint.latest(tmp_path).name == "step-000004"
    model = load_pretrained(tmp_path / "step-000004")  # the previous checkpoint is intact
    assert checkpoint.load_state(tmp_path / "step-000004") == {"step": 4}
    assert float(model.lm_head.weight.detach().abs().max()) < 1.0  # the old weights, not the +1 ones
    checkpoint.clean_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004"]


def test_an_exception_during_save_keeps_the_old_checkpoint_in_place(tmp_path, monkeypatch):
    from nemotron3 import HybridLM, ModelConfig
    from nemotron3.train import data as train_data

    tok = Tokenizer.train(train_data.task_texts(50, seed=0), vocab_size=300)
    model = HybridLM(ModelConfig.preset("tiny"))
    target = tmp_path / "final"
    checkpoint.save(target, model, tok, {"step": 1})
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(target, model, tok, {"step": 2})
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the temporary folder was removed


def _cli_error(*argv: str) -> str:
    """Run `nemotron3 pretrain ARGV` in-process; it must fail with a one-line message (returned), no traceback."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["pretrain", *argv])
    assert code != 0 and "Traceback" not in err.getvalue(), err.getvalue()
    return err.getvalue()


def test_cli_errors_name_the_file_and_line(tmp_path):
    msg = _cli_error("--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert "missing.jsonl: no such file or folder" in msg
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    msg = _cli_error("--data", str(bad), "--out", str(tmp_path / "o"))
    assert f"{bad}:3: malformed JSON" in msg
    assert "no complete checkpoint" in _cli_error("--out", str(tmp_path / "empty"), "--resume")
    assert "neither a preset" in _cli_error("--config", "nonexistent-preset", "--out", str(tmp_path / "o"))


def test_nvfp4_flags_build_the_recipe_they_name(tmp_path, monkeypatch):
    import nemotron3.quant.convert as convert

    off = ["sr", "2d"]
    seen = []
    monkeypatch.setattr(convert, "convert_to_nvfp4", lambda model, policy=None: seen.append(policy) or model)
    main(["pretrain", "--nvfp4", "--nvfp4-off", *off, "--seed", "3", "--steps", "1", "--batch-size", "2",
          "--seq-len", "32", "--eval-problems", "0", "--out", str(tmp_path / "o")])
    (policy,) = seen
    r = policy.recipe
    assert (r.rht, r.stochastic_rounding, r.weight_2d) == ("rht" not in off, "sr" not in off, "2d" not in off)
    assert r.seed == 3 and policy.high_precision_tail == convert.PrecisionPolicy().high_precision_tail
    assert "add --nvfp4" in _cli_error("--nvfp4-off", "rht", "--out", str(tmp_path / "p"))


def test_user_text_trains_and_holds_out_a_tail(tmp_path):
    corpus = tmp_path / "notes.jsonl"
    lines = [json.dumps({"text": f"Note {i}: the quick brown fox jumps over {i % 7} lazy dogs."}) for i in range(200)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    main(["pretrain", "--data", str(corpus), "--steps", "6", "--batch-size", "4", "--seq-len", "32",
          "--eval-every", "3", "--out", str(out), "--vocab-size", "300"])
    records = _records(out)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == {}  # no task data, no task accuracy
    assert torch.is_tensor(load_pretrained(out / "final").lm_head.weight)


@pytest.mark.slow
def test_world_size_changes_only_the_split_not_the_result(tmp_path):
    """torchrun with 2 gloo ranks vs one process, same global batch: the same losses up to summation order."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--steps", "6", "--batch-size", "4", "--seq-len", "48", "--eval-every", "3", "--eval-problems", "0"]
    subprocess.run([sys.executable, "-m", "nemotron3.cli", "pretrain", *args, "--out", str(one)], check=True, env=ENV,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nemotron3.cli", "pretrain", *args, "--out", str(two)],
                          env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ra, rb = _records(one), _records(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4), (x["step"], key)


@pytest.mark.slow
def test_nvfp4_run_resumes_bit_identically(tmp_path):
    """The NVFP4 recipe draws stochastic-rounding noise from per-layer generators: they are resume state too."""
    args = ["--nvfp4", "--steps", "4", "--batch-size", "2", "--seq-len", "48", "--eval-every", "100",
            "--eval-problems", "0", "--save-every", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run([sys.executable, "-m", "nemotron3.cli", "pretrain", *args, "--out", str(a)], check=True, env=ENV,
                   capture_output=True)
    b.mkdir()
    import shutil

    shutil.copytree(a / "step-000002", b / "step-000002")
    (b / "metrics.jsonl").write_text("".join(ln + "\n" for ln in (a / "metrics.jsonl").read_text().splitlines()[:2]))
    subprocess.run([sys.executable, "-m", "nemotron3.cli", "pretrain", "--out", str(b), "--resume"], check=True,
                   env=ENV, capture_output=True)
    assert [r.get("loss") for r in _records(a)] == [r.get("loss") for r in _records(b)]


def test_nvfp4_high_precision_tail_switches_at_its_step_and_resumes_there(tmp_path):
    """--nvfp4-high-precision-tail 0.5 of 4 steps: steps 1-2 are the quantized run's exactly, steps 3-4 are not;
    a run resumed from step 2 switches where the original did."""
    args = ["--nvfp4", "--steps", "4", "--batch-size", "2", "--seq-len", "48", "--eval-every", "100",
            "--eval-problems", "0", "--save-every", "2"]
    quantized, tail, resumed = tmp_path / "q", tmp_path / "t", tmp_path / "r"
    main(["pretrain", *args, "--out", str(quantized)])
    main(["pretrain", *args, "--nvfp4-high-precision-tail", "0.5", "--out", str(tail)])
    lq = [r["loss"] for r in _records(quantized) if "loss" in r]
    lt = [r["loss"] for r in _records(tail) if "loss" in r]
    assert lt[:2] == lq[:2] and lt[2] != lq[2] and lt[3] != lq[3]
    resumed.mkdir()
    import shutil

    shutil.copytree(tail / "step-000002", resumed / "step-000002")
    main(["pretrain", "--out", str(resumed), "--resume"])
    assert [r["loss"] for r in _records(resumed) if "loss" in r] == lt[2:]  # steps 3 and 4
    assert "a fraction" in _cli_error("--nvfp4", "--nvfp4-high-precision-tail", "1.5", "--out", str(tmp_path / "e"))
    assert "add --nvfp4" in _cli_error("--nvfp4-high-precision-tail", "0.2", "--out", str(tmp_path / "e"))


def test_stop_after_is_the_first_steps_of_the_longer_run_exactly(tmp_path):
    """--stop-after 6 of a 16-step run: the same losses and held-out losses as the full run's first 6 steps (same
    schedule and data), and final/ equal to the full run's weights after step 6 (its checkpoint at step 6)."""
    full, short = tmp_path / "full", tmp_path / "short"
    args = ["--eval-every", "3", "--save-every", "6", "--keep-last", "0"]
    subprocess.run(_cmd(full, *args), check=True, env=ENV, capture_output=True)
    subprocess.run(_cmd(short, *args, "--stop-after", "6"), check=True, env=ENV, capture_output=True)
    def untimed(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in _records(out)]

    rf, rs = untimed(full), untimed(short)
    assert [r for r in rf if r["step"] <= 6] == rs and max(r["step"] for r in rs) == 6
    assert json.loads((short / "summary.json").read_text())["steps"] == 6
    a, b = load_pretrained(full / "step-000006").state_dict(), load_pretrained(short / "final").state_dict()
    # exact by construction: the stopped run executes the same ops on the same data as the full run's first 6 steps
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
