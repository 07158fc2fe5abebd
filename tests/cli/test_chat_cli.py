"""`nemotron3 chat`: each reply is the engine's generation on the rendered conversation, the toggles change it."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import eval_checkpoint
from rich.console import Console

import nemotron3
from nemotron3 import chat
from nemotron3.cli import main
from nemotron3.stages.chat_cli import ChatConfig, chat_session

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    model, tk = eval_checkpoint(folder, text="What is 7 * 6? It is 42.\nSort 3 1 2: 1 2 3\n")
    return folder, model.train(), tk


def _reference_reply(model, tk, messages, thinking, budget, n, temperature, seed):
    """The reply as the engine gives it on `<s>` + the rendered conversation (top_p 0.95, the chat default),
    parsed back into a message."""
    prefix = chat.render(messages, add_generation_prompt=True, enable_thinking=thinking)
    ids = [tk.bos_id, *tk.tk.encode(prefix).ids]
    stops = sorted({*model.config.eos_token_ids, tk.end_of_turn_id})
    engine = nemotron3.Engine(model, think_tokens=nemotron3.engine.thinking.ThinkTokens.from_tokenizer(tk))
    out = engine.generate([ids], n, temperature=temperature, top_p=0.95, seed=seed, stop_token_ids=stops,
                          max_thinking_tokens=budget if thinking else None).tokens[0]
    body = tk.tk.decode([t for t in out if t not in stops], skip_special_tokens=False)
    parsed = chat.parse(("<think>\n" if thinking else "<think></think>") + body)
    message = {"role": "assistant", "content": parsed["content"]}
    if parsed["reasoning_content"]:
        message["reasoning_content"] = parsed["reasoning_content"]
    return message, out


def test_replies_follow_the_conversation_and_the_toggles(checkpoint):
    folder, model, tk = checkpoint
    cfg = ChatConfig(model=folder, max_new_tokens=10, temperature=0.9, seed=5, system="Be brief.")
    lines = ["What is 7 * 6?", "/no_think", "What is 2 + 3?", "/think", "/budget 2", "Sort 3 1 2", "/exit",
             "never read"]
    console = Console(file=io.StringIO(), width=200)
    got = chat_session(cfg, lines, console)
    want = [{"role": "system", "content": "Be brief."}]
    for turn, (text, thinking, budget) in enumerate([("What is 7 * 6?", True, None), ("What is 2 + 3?", False, None),
                                                     ("Sort 3 1 2", True, 2)]):
        want.append({"role": "user", "content": text})
        reply, tokens = _reference_reply(model, tk, want, thinking, budget, 10, 0.9, 5 + turn)
        if budget is not None:  # the budget closed the think block early: 2 tokens + a grace window of 1
            assert tk.tk.token_to_id("</think>") in tokens[:4]
        if reply["content"]:
            want.append(reply)
        else:  # cut off inside its reasoning: the turn is dropped
            want.pop()
    assert len(want) >= 3 and got == want
    printed = console.file.getvalue()
    assert "reasoning off" in printed and "budget 2 tokens" in printed and "never read" not in printed


def test_reset_unknown_commands_and_a_full_context(checkpoint):
    folder, _, _ = checkpoint
    console = Console(file=io.StringIO(), width=200)
    cfg = ChatConfig(model=folder, max_new_tokens=4, temperature=0.0)
    got = chat_session(cfg, ["/no_think", "hello", "/reset", "/bogus", "/budget lots", "x " * 5000, "hi"], console)
    printed = console.file.getvalue()
    assert "unknown command /bogus" in printed and "/budget takes a number" in printed
    assert "fills the context" in printed  # the overlong turn is refused and dropped, the chat goes on
    assert [m["role"] for m in got] == ["user", "assistant"] and got[0]["content"] == "hi"


def test_command_line_reads_piped_stdin(checkpoint, monkeypatch, capsys):
    folder, _, _ = checkpoint
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 7 * 6?\n/no_think\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "reasoning off" in out and "tokens" in out


def test_a_folder_without_chat_tokens_is_refused(tmp_path, capsys):
    config = nemotron3.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0)
    nemotron3.save_pretrained(nemotron3.HybridLM(config), tmp_path)
    assert main(["chat", "--model", str(tmp_path)]) == 1
    assert "chat needs a tokenizer.json" in capsys.readouterr().err
