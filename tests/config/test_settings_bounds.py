"""Every numeric setting finite and bounded by what the machine holds; prompts that are not UTF-8; resuming another
stage's run (issue 28). Each refusal is one line naming the flag, before anything is allocated or run."""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle
import sys
import time
import tracemalloc
import typing

import pytest
import torch
from conftest import eval_checkpoint, randomize_

import nemotron3
from nemotron3 import options, tasks
from nemotron3.cli import COMMANDS, main
from nemotron3.options import ConfigError, StageConfig, optional_inner
from nemotron3.tokenizer import Tokenizer

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _machine_of_64_gib(monkeypatch):
    """The memory checks against a fixed 64 GiB machine, so that every case refuses the same way on any host."""
    monkeypatch.setenv("NEMOTRON3_MEMORY_BYTES", str(64 * GIB))


def _stage_configs() -> list[type]:
    """Every stage config class of the package: the commands' and their bases with fields (TrainConfig)."""
    for module, _, _ in COMMANDS.values():
        importlib.import_module(module)
    found, todo = [], list(StageConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("nemotron3.") and cls not in found:
            found.append(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: c.__name__)


def _float_fields(cls: type) -> list[tuple[str, typing.Any]]:
    """(field, a value of its type with one NaN slot) per float field, list or tuple of floats."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint, _ = optional_inner(hints[f.name])
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is float:
            out.append((f.name, "scalar"))
        elif origin in (list, tuple) and args and args[0] is float:
            width = len(args) if origin is tuple and args[-1] is not Ellipsis else 1
            out.append((f.name, width))
    return out


def _required(cls: type, tmp_path) -> dict:
    """A value of the declared type for each required field (a path, or its string where the field is a str)."""
    hints = typing.get_type_hints(cls)
    return {f.name: str(tmp_path / "model") if hints[f.name] is str else tmp_path / "model"
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}


CONFIGS = _stage_configs()


def test_the_walk_finds_every_stage_config():
    names = {c.__name__ for c in CONFIGS}
    assert {"TrainConfig", "PretrainConfig", "SFTConfig", "GRPOConfig", "GenerateConfig", "ChatConfig",
            "ServeConfig", "QuantizeConfig", "RunConfig", "InfoConfig"} <= names


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_refuses_non_finite_values(cls, bad, tmp_path):
    """Built from Python, as the CLI builds it: the error names the field and its flag, whatever its min / max."""
    for name, shape in _float_fields(cls):
        if options.field_named(cls, name).metadata.get("infinite") and not math.isnan(bad):
            continue  # an option that gives +-inf a meaning (none today); NaN is refused all the same
        value = bad if shape == "scalar" else [0.5] * (shape - 1) + [bad]
        with pytest.raises(ConfigError) as e:
            cls(**_required(cls, tmp_path), **{name: value})
        flag = "--" + name.replace("_", "-")
        assert str(e.value).startswith(f"{name} ({flag}) = ") and "finite" in str(e.value), str(e.value)


def test_an_int_beyond_the_float_range_is_a_config_error_not_an_overflow():
    from nemotron3.stages.pretrain import PretrainConfig

    with pytest.raises(ConfigError, match=r"^lr \(--lr\) = .*finite"):
        PretrainConfig(lr=10**400)


def test_an_option_may_opt_in_to_infinity_but_never_to_nan():
    @dataclasses.dataclass
    class Timeout(StageConfig):
        seconds: float = options.option(1.0, "wait at most this long", min=0.0, infinite=True)

    assert Timeout(seconds=math.inf).seconds == math.inf
    with pytest.raises(ConfigError, match=r"seconds \(--seconds\) = nan: must be a finite number"):
        Timeout(seconds=math.nan)
    with pytest.raises(ConfigError, match=r"must be >= 0.0"):
        Timeout(seconds=-math.inf)


def _refused(capsys, argv: list[str], flag: str, words: str = "") -> str:
    """`nemotron3 ARGV` ends with one `error:` line that names `flag`, at once (nothing is built or run)."""
    t = time.perf_counter()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert time.perf_counter() - t < 10, "the refusal took too long: something ran first"
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"({flag})" in err and words in err, err
    return err


@pytest.mark.parametrize("argv,flag", [
    (["pretrain", "--lr", "inf"], "--lr"),
    (["pretrain", "--lr", "nan"], "--lr"),
    (["pretrain", "--grad-clip", "nan"], "--grad-clip"),
    (["pretrain", "--mtp-scale", "nan"], "--mtp-scale"),
    (["pretrain", "--heldout-fraction", "nan"], "--heldout-fraction"),
    (["pretrain", "--weight-decay", "inf"], "--weight-decay"),
    (["rl", "--epsilon", "nan"], "--epsilon"),
    (["rl", "--beta", "nan"], "--beta"),
    (["rl", "--top-p", "nan"], "--top-p"),
    (["run", "--budget-minutes", "inf"], "--budget-minutes"),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "inf"], "--temperature"),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    (["generate", "--model", "M", "--prompt", "x", "--top-p", "nan"], "--top-p"),
])
def test_the_reported_non_finite_flags_are_refused_naming_the_flag(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, flag, "finite")


def test_the_budget_rule_refuses_non_finite_and_overflowing_budgets():
    from nemotron3.run.pipeline import RunConfig
    from nemotron3.run.plan import plan

    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="budget_minutes"):
            plan(bad)
    with pytest.raises(ConfigError, match=r"^budget_minutes \(--budget-minutes\) = 1e\+300"):
        RunConfig(budget_minutes=1e300)  # 15 x 1e300 is still finite, 15 x 1e308 is not: bounded well below


# ----------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("argv,flag", [
    (["pretrain", "--seq-len", str(10**11)], "--seq-len"),
    (["pretrain", "--batch-size", str(10**11)], "--batch-size"),
    (["pretrain", "--eval-problems", str(10**9)], "--eval-problems"),
    (["pretrain", "--steps", str(10**9)], "--steps"),  # the task text of the whole run is packed up front
    (["pretrain", "--steps", str(10**19)], "--steps"),  # beyond 64 bits
    (["sft", "--conversations", str(10**9)], "--conversations"),
    (["sft", "--seq-len", str(10**11)], "--seq-len"),
    (["sft", "--batch-size", "2048", "--seq-len", str(10**5)], "--batch-size"),
    (["sft", "--batch-size", "2048", "--micro-batch-size", "2048", "--seq-len", str(10**5)], "--micro-batch-size"),
    (["sft", "--batch-size", str(10**6), "--micro-batch-size", "1", "--seq-len", str(10**4)], "--batch-size"),
    (["quantize", "--calib", str(10**9)], "--calib"),
    (["rl", "--max-completion-length", str(10**11)], "--max-completion-length"),
    (["rl", "--num-generations", str(10**9)], "--num-generations"),
    (["rl", "--eval-problems", str(10**9)], "--eval-problems"),
    (["rl", "--threads", str(10**6)], "--threads"),
    (["generate", "--model", "M", "--prompt", "x", "--threads", str(10**12)], "--threads"),
])
def test_sizes_beyond_the_machine_are_refused_at_once(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(capsys, argv, flag)


def test_a_micro_batch_is_named_when_only_its_forward_does_not_fit(monkeypatch):
    from nemotron3.stages.sft import SFTConfig

    monkeypatch.setenv("NEMOTRON3_MEMORY_BYTES", str(256 << 20))
    SFTConfig(batch_size=64, micro_batch_size=1, seq_len=4096)  # 64 rows of ids (2 MiB), one row's logits (4 MiB)
    with pytest.raises(ConfigError, match=r"^micro_batch_size \(--micro-batch-size\) = 64: "):
        SFTConfig(batch_size=64, micro_batch_size=64, seq_len=4096)  # and 64 rows' logits at once: 256 MiB more


def test_the_training_bound_is_below_what_a_real_step_holds(monkeypatch):
    """The check may only refuse what cannot run: its bytes for a step never exceed the ids and logits a real
    forward of the smallest model holds (the independent reference: the tensors themselves)."""
    from nemotron3.stages.pretrain import PretrainConfig

    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=300, num_nextn_predict_layers=0)
    model = nemotron3.HybridLM(config)
    batch, seq = 3, 32
    ids = torch.randint(0, 300, (batch, seq + 1))
    with torch.no_grad():
        logits = model(ids[:, :-1])  # (batch, seq, vocab)
    held = ids.nbytes + logits.float().nbytes
    monkeypatch.setenv("NEMOTRON3_MEMORY_BYTES", str(held))
    PretrainConfig(batch_size=batch, seq_len=seq, steps=1, tokenizer_sample=1, eval_problems=1,
                   heldout_task_problems=1)  # fits in exactly what the real step held


def test_an_item_is_at_least_item_bytes_in_memory():
    """ITEM_BYTES, the lower bound behind --eval-problems, --conversations and --calib, measured: task problems
    and conversations as the stages hold them take more than that each."""
    from nemotron3.train import sft_data

    for make in (lambda n: tasks.generate("add", n, split="heldout"),
                 lambda n: sft_data.task_conversations(n, 0, "train", 1)):
        tracemalloc.start()
        items = make(200)
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert size / len(items) > options.ITEM_BYTES, size / len(items)


def test_the_machines_memory_is_its_physical_memory(monkeypatch):
    import os

    monkeypatch.delenv("NEMOTRON3_MEMORY_BYTES")
    assert options.memory_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=300, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, folder)
    Tokenizer.train(["once upon a time there was a tiny model"] * 20, vocab_size=300).save(folder)
    return folder


@pytest.mark.parametrize("flag,value", [("--max-seq-len", 10**12), ("--max-batch", 10**9),
                                        ("--token-budget", 10**12), ("--max-body-bytes", 10**15)])
def test_serve_refuses_a_cache_or_body_beyond_the_machine(served, flag, value, capsys):
    _refused(capsys, ["serve", "--model", str(served), flag, str(value)], flag)


def test_the_serve_bound_is_the_cache_the_scheduler_allocates(served, monkeypatch):
    """The estimate equals the bytes of the cache the server then builds (its own tensors, counted)."""
    from nemotron3.serve import ServeConfig, build_server

    kw = dict(model=served, max_batch=3, max_seq_len=64, token_budget=32, max_body_bytes=4096)  # body under the cache
    server = build_server(ServeConfig(**kw))
    allocated = server.scheduler.cache.nbytes
    monkeypatch.setenv("NEMOTRON3_MEMORY_BYTES", str(allocated - 1))
    with pytest.raises(ConfigError, match=r"^max_batch \(--max-batch\) = 3: "):
        ServeConfig(**kw)
    monkeypatch.setenv("NEMOTRON3_MEMORY_BYTES", str(allocated + 64 * 1024 * 1024))
    ServeConfig(**kw)


def test_the_calibration_bound_is_what_the_held_out_split_holds():
    from nemotron3.stages.quantize import CALIB_SEED, MAX_CALIB, QuantizeConfig

    assert len(tasks.mixture(MAX_CALIB, seed=CALIB_SEED, split="heldout")) == MAX_CALIB
    with pytest.raises(ConfigError, match=r"^calib \(--calib\)"):
        QuantizeConfig(calib=MAX_CALIB + 1)


# ----------------------------------------------------------------------------------------- text
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    eval_checkpoint(folder, text="What is 7 * 6? It is 42.\n")
    return folder


NOT_UTF8 = b"caf\xff!".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv: 'caf\udcff!'


def test_encode_prompt_names_the_byte_that_is_not_utf8(chat_checkpoint):
    from nemotron3.engine.text import encode_prompt
    from nemotron3.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(chat_checkpoint)
    with pytest.raises(ValueError, match=r"not UTF-8.*0xff.*character 4"):
        encode_prompt(tok, NOT_UTF8, None)
    with pytest.raises(ValueError, match=r"lone UTF-16 surrogate.*U\+D800"):
        encode_prompt(tok, "a\ud800", None)


def test_generate_refuses_a_prompt_that_is_not_utf8(chat_checkpoint, capsys):
    _refused(capsys, ["generate", "--model", str(chat_checkpoint), "--prompt", NOT_UTF8], "--prompt", "0xff")


def test_chat_refuses_a_system_prompt_that_is_not_utf8(chat_checkpoint, capsys):
    _refused(capsys, ["chat", "--model", str(chat_checkpoint), "--system", NOT_UTF8], "--system", "0xff")


def test_chat_answers_a_line_that_is_not_utf8_and_goes_on(chat_checkpoint, capsys):
    from rich.console import Console

    from nemotron3.stages.chat_cli import ChatConfig, chat_session

    console = Console(file=sys.stdout, width=200, highlight=False)
    chat_session(ChatConfig(model=chat_checkpoint, max_new_tokens=4, temperature=0), [NOT_UTF8, "hi"], console)
    refusal, _, rest = capsys.readouterr().out.partition("0xff")
    assert refusal and "not sent" in rest and "tok/s" in rest, rest  # the next line got its reply


# ----------------------------------------------------------------------------------------- resume
def _fake_run(folder, run: dict) -> None:
    """A training checkpoint folder as the loop saves it, holding only what --resume reads first."""
    step = folder / "step-000002"
    step.mkdir(parents=True)
    (step / "config.json").write_text("{}")
    torch.save({"step": 2, "run": run}, step / "trainer_state.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)


@pytest.mark.parametrize("recorded", [True, False], ids=["stage-recorded", "old-folder"])
@pytest.mark.parametrize("command", ["sft", "rl"])
def test_resume_in_another_stages_folder_says_whose_run_it_is(command, recorded, tmp_path, capsys):
    from nemotron3.options import to_dict
    from nemotron3.stages.pretrain import PretrainConfig

    run = to_dict(PretrainConfig(out=tmp_path / "pre"))
    assert run["stage"] == "pretrain"
    if not recorded:
        del run["stage"]
    _fake_run(tmp_path / "pre", run)
    assert main([command, "--resume", "--out", str(tmp_path / "pre")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"holds a pretrain run, not an {command} run" in err, err
    assert "unknown fields" not in err


def test_the_stage_round_trips_and_a_same_stage_old_record_still_loads(tmp_path):
    from nemotron3.options import from_dict, to_dict
    from nemotron3.stages.sft import SFTConfig

    cfg = SFTConfig(out=tmp_path / "s", steps=7)
    assert from_dict(SFTConfig, to_dict(cfg)) == cfg
    old = {k: v for k, v in to_dict(cfg).items() if k != "stage"}
    assert from_dict(SFTConfig, old) == cfg
