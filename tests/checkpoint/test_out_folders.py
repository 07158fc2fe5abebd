"""Output folders (issue 28): an `--out` holding another run, or the `--model` checkpoint, is refused (or needs
`--overwrite`, which never deletes what the command does not write); a folder swap killed at any point is put
back together by the next start; written folders and files get the modes the umask gives.

References: kills are real (SIGKILL, in a forked child for the bare swap, in a subprocess where torch runs);
the content expected after a kill is one of the two copies the test wrote itself, compared byte for byte; modes
are computed from the umask the test sets (0777 / 0666 & ~umask).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import StubTokenizer
from safetensors.torch import load_file

import nemotron3
from nemotron3.cli import main
from nemotron3.options import ConfigError
from nemotron3.stages.pretrain import PretrainConfig, pretrain
from nemotron3.stages.quantize import QuantizeConfig, quantize
from nemotron3.stages.sft import SFTConfig, sft
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_PRETRAIN = dict(steps=2, batch_size=2, seq_len=32, eval_problems=0, tokenizer_sample=60, eval_every=1,
                     heldout_task_problems=6, log_every=100)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(200, seed=0), vocab_size=300)


@pytest.fixture(scope="module")
def source(tok, tmp_path_factory) -> Path:
    """A small checkpoint with a tokenizer: the --model of the tests."""
    torch.manual_seed(0)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320))
    return checkpoint.save(tmp_path_factory.mktemp("src") / "ckpt", model, tok)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args)


# ----------------------------------------------------------------------------------------- another run's --out
def _fake_run(folder: Path, source: Path) -> dict[str, bytes]:
    """A finished run's folder: final/ (a real checkpoint), summary.json, metrics.jsonl; returns final's files."""
    shutil.copytree(source, folder / "final")
    (folder / "summary.json").write_text('{"steps": 7}\n')
    (folder / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    return _files(folder / "final")


def test_pretrain_into_another_run_is_refused_with_one_line_naming_the_flag(tmp_path, source):
    run = tmp_path / "run"
    before = _fake_run(run, source)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["pretrain", "--out", str(run), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                     "--eval-problems", "0", "--tokenizer-sample", "60"])
    lines = err.getvalue().strip().splitlines()
    assert code != 0 and len(lines) == 1, err.getvalue()
    assert "--out" in lines[0] and str(run) in lines[0] and "--overwrite" in lines[0]
    assert _files(run / "final") == before and json.loads((run / "summary.json").read_text()) == {"steps": 7}


def test_pretrain_twice_into_one_out_needs_overwrite_which_keeps_what_it_did_not_write(tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty existing --out is fine
    _quiet(pretrain, PretrainConfig(out=out, save_every=1, **TINY_PRETRAIN))
    first = _files(out / "final")
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "step-000001", "summary.json"]
    with pytest.raises(ConfigError, match=r"--out .*run holds another run \(final/, metrics.jsonl, step-000001/, "
                                          r"summary.json\)"):
        pretrain(PretrainConfig(out=out, seed=1, **TINY_PRETRAIN))
    assert _files(out / "final") == first
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    _quiet(pretrain, PretrainConfig(out=out, seed=1, overwrite=True, **TINY_PRETRAIN))
    assert _files(out / "final") != first  # the second run's weights (another seed)
    assert (out / "notes.txt").read_text() == "mine" and (out / "data").is_dir()
    assert checkpoint.checkpoints(out) == []  # the first run's step-000001/ went with it (no --save-every now)
    assert json.loads((out / "summary.json").read_text())["config"]["seed"] == 1


def test_what_counts_as_another_run(tmp_path):
    from nemotron3 import folders

    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")  # a run that failed before its first step: nothing to lose
    (out / "notes.txt").write_text("mine")
    (out / "step-x").mkdir()
    assert folders.run_marks(out) == [] and folders.run_marks(tmp_path / "missing") == []
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "step-000003").mkdir()
    (out / "w.safetensors").write_bytes(b"x")
    assert folders.run_marks(out) == ["metrics.jsonl", "step-000003/", "w.safetensors"]


def test_sft_into_the_pretraining_runs_own_folder_is_refused_even_with_overwrite(tmp_path, source):
    run = tmp_path / "run"
    before = _fake_run(run, source)
    fast = dict(steps=1, batch_size=2, conversations=4, eval_problems=0, heldout_task_problems=2, log_every=100)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"--out .*run.*(final, which holds|contains) --model"):
            sft(SFTConfig(model=run / "final", out=run, overwrite=overwrite, **fast))
    assert _files(run / "final") == before and json.loads((run / "summary.json").read_text()) == {"steps": 7}
    # --model elsewhere inside --out: only with --overwrite
    (run / "src").mkdir()
    shutil.copytree(source, run / "src" / "ckpt")
    with pytest.raises(ConfigError, match="contains --model"):
        sft(SFTConfig(model=run / "src" / "ckpt", out=run / "src", **fast))


def test_rl_refuses_to_replace_its_own_model(tmp_path, source):
    from nemotron3.rl.grpo import GRPOConfig, grpo

    run = tmp_path / "run"
    before = _fake_run(run, source)
    with pytest.raises(ConfigError, match=r"--out .*replaces .*final, which holds --model"):
        grpo(GRPOConfig(model=run / "final", out=run, overwrite=True, steps=1, prompts_per_step=1,
                        num_generations=2, max_completion_length=2, eval_problems=0))
    assert _files(run / "final") == before


def test_quantize_never_deletes_its_source_and_replaces_an_export_only_with_overwrite(tmp_path, source):
    q = quantize(QuantizeConfig(model=source, out=tmp_path / "q", scheme="mx9"))
    shutil.copytree(source, q / "src")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"out \(--out\).*holds --model .*src"):
            QuantizeConfig(model=q / "src", out=q, scheme="mx4", overwrite=overwrite)
    assert _files(q / "src") == _files(source)
    shutil.rmtree(q / "src")
    with pytest.raises(ConfigError, match="add --overwrite"):
        QuantizeConfig(model=source, out=q, scheme="mx4")
    quantize(QuantizeConfig(model=source, out=q, scheme="mx4", overwrite=True))
    assert json.loads((q / "config.json").read_text())["quantization_config"]["scheme"] == "mx4"


def test_run_refuses_an_out_holding_another_commands_run(tmp_path, source):
    from nemotron3.run import RunConfig, run

    runs = tmp_path / "runs"
    before = _fake_run(runs / "pretrain", source)  # `nemotron3 pretrain --out runs/pretrain`
    with pytest.raises(ConfigError, match=r"--out .*runs holds another run \(pretrain/\)"):
        _quiet(run, RunConfig(out=runs, stages=["tokenizer"], budget_minutes=0.25))
    assert _files(runs / "pretrain" / "final") == before and not (runs / "tokenizer").exists()


# ----------------------------------------------------------------------------------------- kills
def _killed_at(n: int, fn) -> bool:
    """Run `fn` in a forked child that SIGKILLs itself at its n-th file-system call (rename, unlink, rmdir, mkdir,
    chmod, fsync); True when it was killed, False when it got through."""
    pid = os.fork()
    if pid == 0:  # the child: file operations only, no torch
        try:
            calls = [0]

            def counted(real):
                def f(*a, **k):
                    calls[0] += 1
                    if calls[0] == n:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*a, **k)
                return f

            for name in ("rename", "replace", "unlink", "rmdir", "mkdir", "chmod", "fsync"):
                setattr(os, name, counted(getattr(os, name)))
            fn()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("had_old", [True, False], ids=["replacing", "first-write"])
def test_a_swap_killed_at_any_point_is_put_back_by_the_next_start(tmp_path, had_old):
    from nemotron3 import folders

    old, new = {"a": b"old a", "b": b"old b"}, {"a": b"new a", "b": b"new b", "c": b"new c"}

    def fill(tmp: Path) -> None:
        for name, data in new.items():
            (tmp / name).write_bytes(data)
            os.fsync(os.open(tmp / name, os.O_RDONLY))  # a kill point between files

    outcomes = []
    for n in range(1, 100):
        parent = tmp_path / f"kill{n}"
        dest = parent / "final"
        if had_old:
            folders.write_folder(dest, lambda t: [(t / k).write_bytes(v) for k, v in old.items()])
        killed = _killed_at(n, lambda dest=dest: folders.write_folder(dest, fill))
        folders.recover_all(parent)  # the next start
        got = _files(dest) if dest.exists() else None
        assert got in ((old if had_old else None), new), (n, got)
        left = sorted(p.name for p in parent.iterdir()) if parent.exists() else []
        assert left == (["final"] if got is not None else []), (n, left)
        outcomes.append(got == new)
        if not killed:
            break
    else:
        raise AssertionError("the swap never finished")
    assert n > 6 and outcomes[-1] and outcomes == sorted(outcomes)  # old (or nothing) until some point, then new


_KILL_SECOND_RENAME = textwrap.dedent("""
    import os, signal, sys
    calls = [0]
    def counted(real):
        def f(*a, **k):
            calls[0] += 1
            if calls[0] == 2:  # between the two renames of a folder swap
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return f
    import torch, nemotron3
    from nemotron3.train import checkpoint
    what, a, b = sys.argv[1:4]
    if what == "checkpoint":
        from conftest import StubTokenizer
        torch.manual_seed(1)
        model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320))
        os.rename = counted(os.rename)  # the swap's renames (save_pretrained moves its files with os.replace)
        checkpoint.save(b, model, StubTokenizer())
    else:
        from nemotron3.stages.quantize import QuantizeConfig, quantize
        kw = {"overwrite": True} if "overwrite" in QuantizeConfig.__dataclass_fields__ else {}
        cfg = QuantizeConfig(model=a, out=b, scheme="mx4", calib=1, **kw)
        os.rename, os.replace = counted(os.rename), counted(os.replace)
        quantize(cfg)
""")


def _kill_second_rename(what: str, a: Path, b: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _KILL_SECOND_RENAME, what, str(a), str(b)], env=ENV, text=True,
                          capture_output=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not b.exists()  # killed between the two renames: the folder is not there


def test_sft_killed_while_final_is_swapped_gets_final_back(tmp_path, source):
    out = tmp_path / "run"
    shutil.copytree(source, out / "final")
    (out / "step-000004").mkdir()
    _kill_second_rename("checkpoint", source, out / "final")
    checkpoint.clean_temporaries(out)  # what `--resume` runs first
    assert sorted(p.name for p in out.iterdir()) == ["final", "step-000004"]
    weights = load_file(str(out / "final" / "model.safetensors"))  # complete: the old copy or the new one
    assert set(weights) == set(load_file(str(source / "model.safetensors")))
    assert nemotron3.load_pretrained(out / "final").config.vocab_size == 320


def test_quantize_killed_between_its_renames_gets_its_out_back(tmp_path, source, monkeypatch):
    import nemotron3.stages.quantize as stage

    earlier = quantize(QuantizeConfig(model=source, out=tmp_path / "q", scheme="mx9"))
    before = _files(earlier)
    _kill_second_rename("quantize", source, earlier)
    # the next start, whose own write fails: the folder the kill left must be whole again, the old or the new one
    monkeypatch.setattr(stage, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    kw = {"overwrite": True} if "overwrite" in QuantizeConfig.__dataclass_fields__ else {}
    with pytest.raises(OSError, match="disk full"):
        quantize(QuantizeConfig(model=source, out=earlier, scheme="mx6", **kw))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    scheme = json.loads((earlier / "config.json").read_text())["quantization_config"]["scheme"]
    assert scheme in ("mx9", "mx4") and (scheme == "mx4" or _files(earlier) == before)
    nemotron3.load_pretrained(earlier)


def test_folders_left_by_the_earlier_versions_are_put_back(tmp_path, source):
    out = tmp_path / "run"
    (out / ".old-final-ab12cd34").mkdir(parents=True)  # checkpoint.save's layout: the old copy inside
    shutil.copytree(source, out / ".old-final-ab12cd34" / "final")
    (out / ".tmp-final-ef56gh78").mkdir()
    checkpoint.clean_temporaries(out)
    assert sorted(p.name for p in out.iterdir()) == ["final"] and _files(out / "final") == _files(source)
    q = tmp_path / "q"
    export = _files(quantize(QuantizeConfig(model=source, out=tmp_path / "x", scheme="mx9")))
    os.rename(tmp_path / "x", tmp_path / ".q.old-4242")  # quantize's: `.NAME.old-PID` beside `.NAME.writing-XXXXXXXX`
    (tmp_path / ".q.writing-abcd1234").mkdir()
    (tmp_path / ".q.writing-abcd1234" / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="add --overwrite"):  # put back, then seen for what it is
        quantize(QuantizeConfig(model=source, out=q, scheme="mx4"))
    assert _files(q) == export and not [p for p in tmp_path.iterdir() if p.name.startswith(".q.")]


# ----------------------------------------------------------------------------------------- modes
@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_written_folders_and_files_get_the_umasks_modes(tmp_path, source, umask):
    dirs, files = 0o777 & ~umask, 0o666 & ~umask
    torch.manual_seed(0)
    model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320))
    step = checkpoint.save(checkpoint.step_dir(tmp_path / "run", 2), model, StubTokenizer(), {"step": 2})
    plain = tmp_path / "plain"
    nemotron3.save_pretrained(model, plain)
    q = quantize(QuantizeConfig(model=source, out=tmp_path / "q", scheme="mx6"))
    for folder in (step, plain, q):
        assert _mode(folder) == dirs, (folder, oct(_mode(folder)))
        for f in folder.iterdir():
            assert _mode(f) == files, (f, oct(_mode(f)))
    assert {"model.safetensors", "config.json", checkpoint.STATE_FILE} <= {f.name for f in step.iterdir()}
