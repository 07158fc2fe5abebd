"""`--device auto|cpu|cuda[:N]` on every command that computes (issue 31): one declaration, one validation, and
the device reaches the model.

Without a GPU the last part is shown with a stand-in CUDA: `torch.cuda.is_available()` made True and
`torch.cuda._lazy_init` (what torch calls before the first tensor is made on a CUDA device) made to raise
`ReachedCUDA`. A command that puts its model where `--device` says then stops with ReachedCUDA at the model; one
that ignores the flag runs to the end on the CPU, which fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from pathlib import Path

import pytest
import torch

from nemotron3 import options
from nemotron3.cli import build_parser, main
from nemotron3.options import ConfigError, device_syntax, resolve_device, restore_config, to_dict
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint
from nemotron3.train import data as train_data
from tests.conftest import randomize_, small_model

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = ("pretrain", "sft", "rl", "generate", "chat", "serve", "quantize", "run", "eval")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")


class ReachedCUDA(BaseException):  # BaseException: no `except Exception` on the way turns it into an error line
    """Raised by the stand-in CUDA where torch would initialise the device for a tensor."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small checkpoint with the task tokenizer (chat tokens included): every command can start from it."""
    tok = Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=300)
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    return checkpoint.save(tmp_path_factory.mktemp("device") / "final", model, tok)


def argv_of(command: str, ckpt: Path, tmp: Path) -> list[str]:
    """The quickest invocation of each command (output folders under `tmp`, which they must create)."""
    return {
        "pretrain": ["pretrain", "--out", str(tmp / "p"), "--tokenizer", str(ckpt), "--steps", "1", "--batch-size", "2",
                     "--seq-len", "32", "--eval-problems", "0", "--tokenizer-sample", "20"],
        "sft": ["sft", "--model", str(ckpt), "--out", str(tmp / "s"), "--steps", "1", "--batch-size", "2",
                "--conversations", "8", "--heldout-task-problems", "4", "--eval-problems", "0"],
        "rl": ["rl", "--model", str(ckpt), "--out", str(tmp / "r"), "--steps", "1", "--eval-problems", "0",
               "--prompts-per-step", "1", "--num-generations", "2", "--max-completion-length", "4"],
        "generate": ["generate", "--model", str(ckpt), "--ids", "5,6,7", "--max-new-tokens", "2"],
        "chat": ["chat", "--model", str(ckpt), "--max-new-tokens", "2"],
        "serve": ["serve", "--model", str(ckpt), "--port", "0", "--max-batch", "2"],
        "quantize": ["quantize", "--model", str(ckpt), "--out", str(tmp / "q"), "--scheme", "fp8"],
        "run": ["run", "--out", str(tmp / "run"), "--stages", "tokenizer", "pretrain", "--budget-minutes", "0.25"],
        "eval": ["eval", "--model", str(ckpt), "--data", "tasks:add", "--count", "1", "--max-new-tokens", "2",
                 "--modes", "off"],
    }[command]


def quiet(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """CUDA that says it is there (one device) and raises ReachedCUDA when a tensor is made on it."""
    def reached() -> None:
        raise ReachedCUDA("a tensor was placed on the CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_lazy_init", reached)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # chat: no turns


# ----------------------------------------------------------------------------------------- one declaration


def test_every_computing_command_has_the_same_device_flag():
    parser, modules = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    seen = {}
    for name in COMMANDS:
        action = next((a for a in sub[name]._actions if "--device" in a.option_strings), None)
        assert action is not None, f"nemotron3 {name} has no --device"
        field = options.field_named(modules[name][1], "device")
        assert field.default == "auto" and field.metadata["check"] is device_syntax, name
        seen[name] = (action.help, action.metavar, action.type, action.choices)
    assert len(set(seen.values())) == 1, seen
    assert "--device" not in {s for a in sub["info"]._actions for s in a.option_strings}  # info computes nothing


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:0:1", "CPU", "cuda:٣", ""])
def test_a_malformed_device_is_one_line_for_every_command(bad, ckpt, tmp_path):
    for name in COMMANDS:
        code, err = quiet([*argv_of(name, ckpt, tmp_path), "--device", bad])
        assert code == 1, (name, err)
        assert err == f"error: device (--device) = {bad!r}: expected auto, cpu, cuda or cuda:N (N the GPU's index, " \
                      "e.g. cuda:0)\n", (name, err)


def test_the_syntax_accepts_every_documented_form():
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:7", "cuda:12"):
        assert device_syntax(good) is None, good


@no_cuda
def test_cuda_without_cuda_is_one_line_and_exit_1_and_writes_nothing(ckpt, tmp_path):
    for spec in ("cuda", "cuda:0", "cuda:3"):
        for name in COMMANDS:
            code, err = quiet([*argv_of(name, ckpt, tmp_path), "--device", spec])
            assert code == 1, (name, spec, err)
            assert err == (f"error: device (--device) = {spec!r}: CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu or auto\n"), (name, err)
    assert list(tmp_path.iterdir()) == []  # no --out folder was started


@no_cuda
def test_auto_resolves_to_the_cpu_here_and_to_cuda_where_it_is():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_and_indices_with_cuda_present(stand_in_cuda):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device \(--device\) = 'cuda:1': this machine has 1 CUDA device "
                                          r"\(cuda:0\)$"):
        resolve_device("cuda:1")


# ----------------------------------------------------------------------------------------- the device reaches the model


@pytest.mark.parametrize("name", COMMANDS)
def test_the_device_reaches_the_model(name, ckpt, tmp_path, stand_in_cuda, monkeypatch):
    """With CUDA (standing in), `--device cuda` and `auto` put the model there: the command stops at the first
    tensor placed on it. Were the flag ignored, the command would run on the CPU and this would fail."""
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # serve: return, not listen forever
    for spec in ("cuda", "auto"):
        with pytest.raises(ReachedCUDA):
            quiet([*argv_of(name, ckpt, tmp_path / spec), "--device", spec])


@pytest.mark.parametrize("name", ["generate", "quantize", "eval", "chat"])
def test_device_cpu_runs_on_the_cpu_even_where_cuda_is(name, ckpt, tmp_path, stand_in_cuda):
    code, err = quiet([*argv_of(name, ckpt, tmp_path), "--device", "cpu"])
    assert code == 0, err


@pytest.mark.parametrize("name", ["sft", "pretrain"])
def test_training_with_device_cpu_runs_one_step(name, ckpt, tmp_path, stand_in_cuda):
    code, err = quiet([*argv_of(name, ckpt, tmp_path), "--device", "cpu"])
    assert code == 0, err
    assert (tmp_path / name[0] / "final" / "config.json").is_file()


def test_the_loaded_model_lives_on_the_resolved_device(ckpt, monkeypatch):
    """open_folder (generate, chat, serve, eval) and the server's model sit on what resolve_device returned: a
    resolver standing in (returning torch.device("cpu") explicitly, and counting its calls) is what they used."""
    from nemotron3.serve import ServeConfig, build_server

    calls = []

    def resolver(spec: str) -> torch.device:
        calls.append(spec)
        return torch.device("cpu")

    monkeypatch.setattr(options, "resolve_device", resolver)
    server = build_server(ServeConfig(model=ckpt, device="cuda:5", max_batch=2))
    assert calls and set(calls) == {"cuda:5"}
    assert {p.device for p in server.scheduler.model.parameters()} == {torch.device("cpu")}


# ----------------------------------------------------------------------------------------- resume on another device


def test_a_run_resumes_on_another_device(tmp_path):
    """`device` is operational in every stage that resumes: --resume --device X continues the saved run on X."""
    from nemotron3.rl.grpo import OPERATIONAL_FIELDS as RL_OPS
    from nemotron3.rl.grpo import GRPOConfig
    from nemotron3.run.pipeline import OPERATIONAL as RUN_OPS
    from nemotron3.run.pipeline import RunConfig
    from nemotron3.stages.pretrain import OPERATIONAL_FIELDS as PRETRAIN_OPS
    from nemotron3.stages.pretrain import PretrainConfig
    from nemotron3.stages.sft import OPERATIONAL_FIELDS as SFT_OPS
    from nemotron3.stages.sft import SFTConfig

    for cls, ops in ((PretrainConfig, PRETRAIN_OPS), (SFTConfig, SFT_OPS), (GRPOConfig, RL_OPS), (RunConfig, RUN_OPS)):
        saved = to_dict(cls(out=tmp_path / "o", device="cpu"))
        resumed = cls(out=tmp_path / "o", resume=True, device="cuda:1")
        assert restore_config(resumed, saved, "x", ops).device == "cuda:1", cls
        assert restore_config(dataclasses.replace(resumed, device="auto"), saved, "x", ops).device == "cpu", cls
