"""`nemotron3 sft`: conversations never see each other, the run's layout and summary, exact resume, clear errors,
and the exact match by reasoning mode against hand-built chat prompts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, small_model

from nemotron3 import chat, load_pretrained, tasks
from nemotron3.cli import main
from nemotron3.eval.accuracy import accuracy_by_mode, greedy_generate_reference
from nemotron3.stages.pretrain import PretrainConfig
from nemotron3.stages.sft import SFTConfig
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import checkpoint, loop, sft_data
from nemotron3.train import data as train_data

FAST = ["--steps", "8", "--batch-size", "4", "--conversations", "48", "--eval-every", "4", "--save-every", "4",
        "--heldout-task-problems", "12", "--log-every", "100"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(400, seed=0), vocab_size=400)


@pytest.fixture(scope="module")
def pretrained(tok, tmp_path_factory) -> Path:
    """A checkpoint folder like `nemotron3 pretrain`'s final/: a small hybrid with MTP, random weights."""
    model = small_model(-(-tok.vocab_size // 64) * 64)
    randomize_(model)
    return checkpoint.save(tmp_path_factory.mktemp("pretrained") / "final", model, tok)


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["sft", *argv])
    return code, err.getvalue()


# ----------------------------------------------------------------------------------------- isolation
def test_a_changed_earlier_conversation_leaves_the_later_ones_logits_unchanged(tok):
    """One conversation per row: the logits (main and MTP) of a conversation are the same whatever conversation
    comes before it in the batch, and the same as alone. The control: packing the two into one stream, as
    pretraining does, does change them, so the comparison can see a leak."""
    model = small_model(-(-tok.vocab_size // 64) * 64, seed=1).eval()
    randomize_(model, seed=1)
    a, a2, b = sft_data.task_conversations(3, seed=7)
    a2 = sft_data.Conversation([{"role": "system", "content": "other"}, *a2.messages])  # longer, different
    exs = {name: sft_data.encode(c, tok) for name, c in (("a", a), ("a2", a2), ("b", b))}
    n = len(exs["b"].ids)
    with torch.no_grad():
        def later(first: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
            rows = sft_data.rows([exs[first], exs["b"]], 256, tok.pad_id, seed=0).data.rows
            logits, mtp = model.forward_mtp(rows[:, :-1], 2)
            return logits[1, : n - 1], [m[1, : n - 3] for m in mtp]  # depth k: the last k positions wrap around

        (l1, m1), (l2, m2) = later("a"), later("a2")
        alone, alone_mtp = model.forward_mtp(torch.tensor([exs["b"].ids[:-1]]), 2)
        torch.testing.assert_close(l1, l2, rtol=0, atol=1e-5)
        torch.testing.assert_close(l1, alone[0], rtol=0, atol=1e-5)
        for x, y, z in zip(m1, m2, alone_mtp):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
            torch.testing.assert_close(x, z[0, : n - 3], rtol=0, atol=1e-5)

        def packed(first: str) -> torch.Tensor:
            docs = [train_data.Document(exs[first].ids[1:], exs[first].mask[1:]),
                    train_data.Document(exs["b"].ids[1:], exs["b"].mask[1:])]
            rows, _ = train_data.pack(docs, 1024, tok.bos_id, tok.eos_id, tok.pad_id)
            start = len(exs[first].ids) + 1  # after <s> first </s>: where b's <s> sits
            return model(rows[:1, :-1])[0, start: start + n - 1]

        assert (packed("a") - packed("a2")).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- the stage
def test_sft_run_layout_summary_and_chat_template(pretrained, tmp_path, tok):
    out = tmp_path / "sft"
    code, err = run("--model", str(pretrained), "--out", str(out), *FAST, "--eval-problems", "1",
                    "--eval-budgets", "4", "12")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl", "step-000004", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    modes = ["on", "off", "budget_4", "budget_12", "raw"]
    for key in ("accuracy_before", "accuracy_after"):
        assert list(summary[key]) == modes
        assert all(sorted(summary[key][m]) == tasks.default_families() for m in modes)
    conv = summary["conversations"]
    assert conv["train"] == 48 and conv["heldout"] == 12 and sum(conv["modes"].values()) == 48
    assert summary["steps"] == 8 and [s for s, _ in summary["eval_losses"]] == [4, 8]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9)) and all("mtp_loss" in r for r in train_records)
    # final/ opens like any checkpoint, and its tokenizer folder renders chats as chat.render does
    from transformers import AutoTokenizer

    assert load_pretrained(out / "final").config.vocab_size >= tok.vocab_size
    hf = AutoTokenizer.from_pretrained(str(out / "final"))
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    for thinking in (True, False):
        assert hf.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking,
                                      tokenize=False) == chat.render(messages, None, thinking, True)


def test_sft_trains_on_the_assistant_tokens_only(pretrained, tmp_path, tok, monkeypatch):
    """The batches the loop trains on carry the sft_data mask: every counted target is an assistant token."""
    seen = []
    real = loop.micro_loss

    def spy(model, batch, *a, **kw):
        seen.append(batch)
        return real(model, batch, *a, **kw)

    monkeypatch.setattr(loop, "micro_loss", spy)
    code, err = run("--model", str(pretrained), "--out", str(tmp_path / "o"), *FAST, "--steps", "2",
                    "--eval-problems", "0")
    assert code == 0, err
    think, end = tok.token_to_id("<think>"), tok.end_of_turn_id
    assert seen
    for batch in seen:
        for inputs, targets, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
            ids = [inputs[0], *targets]
            # independently: an assistant body starts at the <think> right after "<|im_start|>assistant\n" and
            # runs through the next <|im_end|>; target j is token j + 1
            want = [False] * len(targets)
            for i in range(1, len(ids)):
                if ids[i] == think and tok.decode(ids[:i]).endswith("<|im_start|>assistant\n"):
                    j = i
                    while True:
                        want[j - 1] = True
                        if ids[j] == end:
                            break
                        j += 1
            assert any(want) and mask == want


def test_resume_continues_bit_for_bit(pretrained, tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--model", str(pretrained), *FAST, "--eval-problems", "0"]
    assert run(*common, "--out", str(a))[0] == 0
    calls = []
    real = loop.micro_loss

    def dies_at_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "micro_loss", dies_at_step_6)
    assert run(*common, "--out", str(b))[0] == 130  # interrupted after the checkpoint of step 4
    monkeypatch.setattr(loop, "micro_loss", real)
    assert checkpoint.latest(b).name == "step-000004" and not (b / "final").exists()
    code, err = run("--out", str(b), "--resume")
    assert code == 0, err

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert records(a) == [{**r, "tok_per_s": x["tok_per_s"]} if "tok_per_s" in r else r
                          for r, x in zip(records(b), records(a))]
    assert (a / "final" / "model.safetensors").read_bytes() == (b / "final" / "model.safetensors").read_bytes()
    code, err = run("--out", str(b), "--resume", "--lr", "0.5")
    assert code == 1 and "--lr 0.5 (saved: 0.002) would change what the run computes" in err


def test_errors_name_the_culprit(pretrained, tmp_path):
    bad = tmp_path / "chats.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                   '{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n')
    code, err = run("--model", str(pretrained), "--data", str(bad), "--out", str(tmp_path / "o"))
    assert code == 1 and err.strip() == f"error: {bad}:2: message 1: unknown role 'bot'; expected one of system, " \
        "user, assistant, tool"
    code, err = run("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert code == 1 and "nowhere" in err and "Traceback" not in err
    code, err = run("--reasoning-off-share", "0.7", "--budget-share", "0.5")
    assert code == 1 and "budget_share (--budget-share) = 0.5" in err
    code, err = run("--out", str(tmp_path / "empty"), "--resume")
    assert code == 1 and "no complete checkpoint" in err
    code, err = run("--model", str(pretrained), "--out", str(tmp_path / "o"), "--seq-len", "8", "--steps", "1")
    assert code == 1 and "longer than --seq-len 8" in err


def test_user_conversations_are_trained_and_the_too_long_ones_counted(pretrained, tmp_path):
    f = tmp_path / "chats.jsonl"
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    long = {"messages": [{"role": "user", "content": "9 " * 300}, {"role": "assistant", "content": "ok"}]}
    f.write_text("\n".join(json.dumps(x) for x in [short] * 30 + [long]) + "\n")
    out = tmp_path / "o"
    code, err = run("--model", str(pretrained), "--data", str(f), "--out", str(out), "--steps", "2", "--batch-size",
                    "2", "--eval-problems", "5")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    # the last conversation (the held-out tail) is the long one: skipped and counted
    assert summary["conversations"]["skipped_too_long"] == 1 and summary["conversations"]["train"] == 30
    assert summary["accuracy_after"] == {}  # no task conversations: nothing to score


def test_defaults_continue_from_pretrain():
    assert SFTConfig().model == PretrainConfig().out / "final"
    assert SFTConfig().reasoning_off_share > 0 and SFTConfig().budget_share > 0 and SFTConfig().mtp_depths > 0


# ----------------------------------------------------------------------------------------- evaluation by mode
def _by_hand(model, tok, prompt_text: str, max_new: int, **budget) -> str:
    ids = [tok.bos_id, *tok.encode(prompt_text)]
    stops = {tok.eos_id, tok.end_of_turn_id}
    if budget:
        from nemotron3.engine import Engine
        from nemotron3.engine.thinking import ThinkTokens

        out = Engine(model, think_tokens=ThinkTokens.from_tokenizer(tok)).generate(
            [ids], max_new, stop_token_ids=sorted(stops), **budget).tokens[0]
    else:
        out = greedy_generate_reference(model, ids, max_new, stops)
    return tok.decode(out)


def test_accuracy_by_mode_asks_the_documented_chat_prompts(tok):
    model = small_model(-(-tok.vocab_size // 64) * 64, seed=2).eval()
    randomize_(model, seed=2)
    families = ["countdown"]  # the shortest completions: the reference recomputes every prefix
    got = accuracy_by_mode(model, tok, n_per_family=2, families=families, seed=3)
    assert list(got) == ["on", "off"]
    for fam in families:
        p = tasks.generate(fam, 2, seed=3, split="heldout")[0]
        max_new = max(len(tok.encode(q.completion())) for q in tasks.generate(fam, 2, seed=3, split="heldout"))
        max_new = max_new * 3 // 2 + 8
        head = f"<|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n"
        assert got["on"][fam]["example"]["completion"] == _by_hand(model, tok, head + "<think>\n", max_new)
        assert got["off"][fam]["example"]["completion"] == _by_hand(model, tok, head + "<think></think>", max_new)
        assert got["on"][fam]["n"] == 2 and got["on"][fam]["example"]["prompt"] == p.prompt


def test_budget_modes_cap_the_reasoning(tok):
    model = small_model(-(-tok.vocab_size // 64) * 64, seed=4).eval()
    randomize_(model, seed=4)
    got = accuracy_by_mode(model, tok, n_per_family=2, families=["mul"], seed=5, budgets=[3, 10])
    assert list(got) == ["on", "off", "budget_3", "budget_10"]
    p = tasks.generate("mul", 2, seed=5, split="heldout")
    max_new = max(len(tok.encode(q.completion())) for q in p) * 3 // 2 + 8
    head = f"<|im_start|>user\n{p[0].prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    for n in (3, 10):
        text = got[f"budget_{n}"]["mul"]["example"]["completion"]
        assert text == _by_hand(model, tok, head, max_new, max_thinking_tokens=n)
        if "</think>" not in got["on"]["mul"]["example"]["completion"]:
            assert "</think>" in text  # the budget closed a reasoning the model never closed itself


def test_a_quantized_model_is_fine_tuned_from_its_decoded_weights(pretrained, tmp_path):
    """`load_pretrained` keeps weight-only quantized weights packed (inference-only layers); SFT from such a folder
    starts from the decoded weights, the same ones `load_pretrained(..., dequantize=True)` gives."""
    from nemotron3.stages.quantize import QuantizeConfig, quantize

    q = quantize(QuantizeConfig(model=pretrained, out=tmp_path / "q", scheme="nvfp4-w4a16", calib=1))
    code, err = run("--model", str(q), "--out", str(tmp_path / "o"), *FAST, "--steps", "1", "--eval-problems", "0")
    assert code == 0, err
    start = load_pretrained(q, dequantize=True).state_dict()
    after = load_pretrained(tmp_path / "o" / "final").state_dict()
    assert after.keys() == start.keys()
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert moved and all((start[k] - after[k]).abs().max() < 0.05 for k in start)  # one small step from them
