"""Hostile data files and weights (issue 28): every one ends in one line naming the culprit (file:line, the field,
the tensor), never a traceback, a stall or garbage with exit 0."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer

import nemotron3
from nemotron3 import CheckpointError, chat, hf, load_pretrained
from nemotron3 import tokenizer as tokenizer_module
from nemotron3.cli import main
from nemotron3.rl.prompts import read_prompts
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint as checkpoint_module
from nemotron3.train import sft_data
from nemotron3.train.data import DataError, read_texts

QUICK = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-problems", "0", "--tokenizer-sample", "60"]
DEEP = "[" * 100_000
POISONED = "backbone.layers.0.mixer.in_proj.weight"


def fails(capsys, *argv: str) -> str:
    """Run `nemotron3 ARGV` in-process; assert one `error:` line and no traceback, and return it."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code not in (0, None), f"{argv} succeeded"
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint folder with a tokenizer that has the chat tokens."""
    folder = tmp_path_factory.mktemp("ckpt") / "plain"
    tok = Tokenizer.train(["once upon a time there was a tiny model"] * 50, vocab_size=300)
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, folder)
    tok.save(folder)
    return folder


# ----------------------------------------------------------------------------------------- 1. nesting
def _lines(tmp_path, name: str, *lines: str):
    f = tmp_path / name
    f.write_text("".join(line + "\n" for line in lines))
    return f


GOOD = {"pretrain": json.dumps({"text": "fine"}),
        "sft": json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
        "rl": json.dumps({"prompt": "2 + 3?", "answer": "5"})}
READERS = {"pretrain": read_texts, "sft": sft_data.read_conversations, "rl": read_prompts}


@pytest.mark.parametrize("stage", list(READERS))
@pytest.mark.parametrize("line", [DEEP, DEEP + "]" * 100_000, '{"text": "x", "messages": [], "prompt": "p", "more": '
                                  + "[" * 500 + "]" * 500 + "}"], ids=["unclosed", "closed", "500-deep"])
def test_deeply_nested_json_line_names_its_line(tmp_path, stage, line):
    f = _lines(tmp_path, "deep.jsonl", GOOD[stage], line)
    with pytest.raises(DataError, match=rf"^{f}:2: .*nested"):
        READERS[stage]([f])


def test_deeply_nested_tool_call_arguments_name_the_line(tmp_path):
    args = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": DEEP}}]}
    xml = {"role": "assistant", "content": f"<tool_call>\n<function=f>\n<parameter=x>\n{DEEP}\n</parameter>\n"
                                           "</function>\n</tool_call>"}
    for i, m in enumerate((args, xml)):
        f = _lines(tmp_path, f"calls{i}.jsonl", GOOD["sft"], json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                                       m]}))
        with pytest.raises(DataError, match=rf"^{f}:2: .*nested"):
            sft_data.read_conversations([f])


def test_deeply_nested_line_is_one_error_line_in_every_command(tmp_path, capsys, checkpoint):
    for stage, extra in (("pretrain", QUICK), ("sft", ["--model", str(checkpoint), "--steps", "1"]),
                         ("rl", ["--model", str(checkpoint), "--steps", "1"])):
        f = _lines(tmp_path, f"{stage}.jsonl", GOOD[stage], DEEP)
        err = fails(capsys, stage, "--data", str(f), "--out", str(tmp_path / f"out-{stage}"), *extra)
        assert f"{f}:2" in err and "nested" in err, err


# ----------------------------------------------------------------------------------------- 2. long words
class _Spy:
    """A `tokenizers.Tokenizer` that records every string the trainer is fed."""

    fed: list[str] = []

    def __init__(self, model) -> None:
        object.__setattr__(self, "_tk", HFTokenizer(model))

    def __getattr__(self, name):
        return getattr(self._tk, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._tk, name, value)

    def train_from_iterator(self, iterator, trainer) -> None:
        items = list(iterator)
        _Spy.fed.extend(items)
        self._tk.train_from_iterator(items, trainer=trainer)


def test_the_trainer_never_sees_a_word_longer_than_the_cap(monkeypatch):
    cap = tokenizer_module.MAX_WORD_CHARS
    monkeypatch.setattr(tokenizer_module, "HFTokenizer", _Spy)
    _Spy.fed = []
    texts = ["ab" * 5 * cap, "x" * (3 * cap + 7), "one two three 12345 " * 50, "é" * (2 * cap) + " tail",
             " " * (4 * cap) + "end", "\n".join(["word"] * 10)]
    tok = Tokenizer.train(texts, vocab_size=300)
    assert "".join(_Spy.fed) == "".join(texts)  # split, never altered or dropped
    pre = tok.tk.pre_tokenizer
    longest = max(len(word) for piece in _Spy.fed for word, _ in pre.pre_tokenize_str(piece))
    # a word is at most `cap` characters (plus one leading space), each at most 4 bytes (byte-level symbols)
    assert cap // 2 < longest <= 4 * (cap + 1), longest
    short = "\n".join(["word"] * 10)
    assert short in _Spy.fed  # a text without a long run is fed whole


def test_a_long_line_without_whitespace_trains_in_about_the_time_of_normal_text():
    normal = " ".join(f"w{i % 97}x{i % 13}" for i in range(40_000))
    t0 = time.perf_counter()
    Tokenizer.train([normal], vocab_size=400)
    t_normal = time.perf_counter() - t0
    t0 = time.perf_counter()
    Tokenizer.train(["a" * 300_000], vocab_size=400)  # unbounded: about 40 s on a 2-core Xeon
    t_long = time.perf_counter() - t0
    assert t_long < 10 * t_normal + 5, (t_long, t_normal)


# ----------------------------------------------------------------------------------------- 3. message fields
USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize("message, field", [
    ({"role": "assistant", "content": "a", "tool_calls": 5}, "tool_calls"),
    ({"role": "assistant", "content": "a", "tool_calls": {"name": "f"}}, "tool_calls"),
    ({"role": "assistant", "content": "a", "tool_calls": [5]}, "tool_calls[0]"),
    ({"role": "assistant", "content": "a", "tool_calls": [{"function": 5}]}, "tool_calls[0].function"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": 5, "arguments": {}}}]}, "tool_calls[0].function.name"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 5}}]},
     "tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": [1]}]}, "tool_calls[0].arguments"),
    ({"role": "assistant", "tool_calls": [{"id": 5, "function": {"name": "f"}}]}, "tool_calls[0].id"),
    ({"role": "assistant", "content": "a", "reasoning_content": 5}, "reasoning_content"),
    ({"role": "assistant", "content": "a", "thinking": ["x"]}, "thinking"),
    ({"role": "assistant", "content": 5}, "content"),
    ({"role": 5, "content": "a"}, "role"),
    ({"role": "wizard", "content": "a"}, "unknown role"),
    ({"role": "tool", "content": "a", "tool_call_id": 5}, "tool_call_id"),
    ({"role": "user", "content": "a", "name": 5}, "name"),
])
def test_every_field_of_a_message_is_type_checked(tmp_path, message, field):
    f = _lines(tmp_path, "bad.jsonl", GOOD["sft"], json.dumps({"messages": [USER, message]}))
    with pytest.raises(DataError) as e:
        sft_data.read_conversations([f])
    assert str(e.value).startswith(f"{f}:2: message 1: {field} ") or str(e.value).startswith(
        f"{f}:2: message 1: {field}:"), str(e.value)


def test_tool_calls_as_a_number_is_one_error_line(tmp_path, capsys, checkpoint):
    f = _lines(tmp_path, "bad.jsonl", GOOD["sft"], json.dumps({"messages": [USER, {"role": "assistant",
                                                                                  "tool_calls": 5}]}))
    err = fails(capsys, "sft", "--model", str(checkpoint), "--data", str(f), "--out", str(tmp_path / "o"))
    assert f"{f}:2" in err and "tool_calls" in err, err


# ----------------------------------------------------------------------------------------- 4. empty .txt
@pytest.mark.parametrize("content", ["", " \n\n\t"])
def test_an_empty_txt_file_is_named(tmp_path, content):
    (tmp_path / "a.txt").write_text("some text to train on")
    (tmp_path / "b.txt").write_text(content)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.txt'}: .*empty"):
        read_texts([tmp_path / "a.txt", tmp_path / "b.txt"])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.txt'}: .*empty"):
        read_texts([tmp_path])


# ----------------------------------------------------------------------------------------- 5. content parts
def _parts(*texts: str) -> list[dict]:
    return [{"type": "text", "text": t} for t in texts]


def test_content_given_as_text_parts_is_joined(tmp_path):
    parts = {"messages": [{"role": "system", "content": _parts("Be ", "brief.")},
                          {"role": "user", "content": _parts("What is ", "2 + 3?")},
                          {"role": "assistant", "content": _parts("5")}]}
    plain = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                          {"role": "assistant", "content": "5"}]}
    f = _lines(tmp_path, "parts.jsonl", json.dumps(parts), json.dumps(plain))
    a, b = sft_data.read_conversations([f])
    assert chat.render(a.messages) == chat.render(b.messages)
    assert a.messages[1]["content"] == "What is 2 + 3?"
    rl = _lines(tmp_path, "prompts.jsonl", json.dumps({"prompt": parts["messages"][:2], "answer": "5"}))
    (row,) = read_prompts([rl])
    assert row.messages == plain["messages"][:2] and row.columns == {"answer": "5"}


@pytest.mark.parametrize("part, culprit", [
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "content[1]: only text parts"),
    ({"type": "text", "text": 5}, "content[1]"),
    ("text", "content[1]"),
])
def test_content_parts_that_are_not_text_are_refused(tmp_path, part, culprit):
    content = [{"type": "text", "text": "look: "}, part]
    f = _lines(tmp_path, "bad.jsonl", json.dumps({"messages": [{"role": "user", "content": content},
                                                               {"role": "assistant", "content": "a"}]}))
    with pytest.raises(DataError, match=rf"^{f}:1: message 0: {culprit.replace('[', '.').replace(']', '.')}"):
        sft_data.read_conversations([f])
    rl = _lines(tmp_path, "prompts.jsonl", json.dumps({"prompt": [{"role": "user", "content": content}]}))
    with pytest.raises(DataError, match=rf"^{rl}:1: .*message 0: {culprit.replace('[', '.').replace(']', '.')}"):
        read_prompts([rl])


# ----------------------------------------------------------------------------------------- 6. non-finite weights
@pytest.fixture
def poisoned(checkpoint, tmp_path):
    """A copy of the checkpoint with 3 NaN and 2 inf values in one weight."""
    import shutil

    folder = tmp_path / "poisoned"
    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    w = tensors[POISONED].clone()
    w.view(-1)[[0, 5, 9]] = float("nan")
    w.view(-1)[[1, 7]] = float("inf") * torch.tensor([1.0, -1.0])
    tensors[POISONED] = w
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_non_finite_weights_warn_naming_the_tensor(poisoned, checkpoint):
    with pytest.warns(hf.NonFiniteWeightWarning) as record:
        model = load_pretrained(poisoned)
    messages = [str(w.message) for w in record if issubclass(w.category, hf.NonFiniteWeightWarning)]
    assert messages == [f"{poisoned / 'model.safetensors'}: {POISONED} has 5 non-finite values"], messages
    assert not math.isfinite(model.state_dict()[POISONED].sum().item())  # loaded as it is, only reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(checkpoint)  # a clean checkpoint: not a word
    with pytest.raises(CheckpointError, match=rf"^{poisoned}/model.safetensors: {POISONED} has 5 non-finite values"):
        load_pretrained(poisoned, strict_finite=True)


def test_non_finite_weights_in_a_cast_or_expert_tensor(tmp_path):
    """A routed expert's weight (copied into the stacked tensor) and a weight cast on load are checked too."""
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=320, num_nextn_predict_layers=0)
    model = nemotron3.HybridLM(config)
    randomize_(model)
    nemotron3.save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    expert = next(k for k in tensors if ".experts.1." in k)
    tensors[expert].view(-1)[3] = float("inf")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{expert} has 1 non-finite value"):
        load_pretrained(tmp_path, dtype=torch.bfloat16, strict_finite=True)


def test_generate_warns_in_one_line_and_strict_finite_refuses(poisoned, tmp_path):
    cmd = [sys.executable, "-c", "import sys; from nemotron3.cli import main; sys.exit(main(sys.argv[1:]))",
           "generate", "--model", str(poisoned), "--ids", "1,5", "--max-new-tokens", "2"]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    warned = [line for line in ok.stderr.splitlines() if "non-finite" in line]
    assert warned == [f"warning: {poisoned / 'model.safetensors'}: {POISONED} has 5 non-finite values"], ok.stderr


@pytest.mark.parametrize("command, extra", [
    ("generate", ["--ids", "1,5"]), ("chat", []), ("serve", []), ("quantize", ["--out", "{tmp}/q"]),
    ("sft", ["--out", "{tmp}/sft"]), ("rl", ["--out", "{tmp}/rl"]),
])
def test_strict_finite_refuses_in_every_command_that_loads(poisoned, tmp_path, capsys, command, extra):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    err = fails(capsys, command, "--model", str(poisoned), "--strict-finite", *extra)
    assert f"{POISONED} has 5 non-finite values" in err, err


def test_strict_finite_refuses_a_resumed_pretraining_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--save-every", "1", *QUICK, "--steps", "3", "--stop-after", "2"]) == 0
    step = checkpoint_module.latest(out)
    tensors = load_file(step / "model.safetensors")
    tensors[POISONED].view(-1)[0] = float("nan")
    save_file(tensors, step / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    err = fails(capsys, "pretrain", "--out", str(out), "--resume", "--strict-finite")
    assert f"{POISONED} has 1 non-finite value" in err, err
