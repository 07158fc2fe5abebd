"""SFT data: the loss mask token by token against an independent construction, the budget cut against a
simulation of the engine's rule, the mode shares, one conversation per row, and file:line errors."""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from nemotron3 import chat, tasks
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data
from nemotron3.train import sft_data

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"key": {"type": "string"}, "n": {"type": "integer"}}}}}]
MULTI = sft_data.Conversation([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42", "reasoning_content": "2+0=2\n1+3=4"},
    {"role": "user", "content": "Look up x."},
    {"role": "assistant", "content": "Looking.", "reasoning_content": "use the tool",
     "tool_calls": [{"name": "lookup", "arguments": {"key": "x", "n": 2}}]},
    {"role": "tool", "content": "x = 7"},
    {"role": "assistant", "content": "x is 7.", "reasoning_content": "the tool said 7"},
], TOOLS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(400, seed=0) + [chat.render(MULTI.messages, MULTI.tools)],
                           vocab_size=420)


def _independent(conv: sft_data.Conversation, tok: Tokenizer, thinking: bool) -> tuple[list[int], list[int]]:
    """Tokenize the whole rendered text at once and mark a token as the assistant's when its characters lie
    inside `<|im_start|>assistant\\n` ... `<|im_end|>` (the `<|im_end|>` included), found by a regex."""
    text = chat.render(conv.messages, conv.tools, enable_thinking=thinking)
    spans = [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]
    enc = tok.tk.encode(text, add_special_tokens=False)
    mask = [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc.offsets]
    return [tok.bos_id, *enc.ids], [0, *mask]


@pytest.mark.parametrize("thinking", [True, False])
def test_mask_covers_exactly_the_assistant_tokens(tok, thinking):
    convs = [MULTI, *sft_data.task_conversations(30, seed=1)]
    for conv in convs:
        ex = sft_data.encode(conv, tok, "on" if thinking else "off")
        ids, mask = _independent(conv, tok, thinking)
        assert ex.ids == ids
        assert ex.mask == mask
    # and spelled out for one task conversation: every assistant token, <think> to <|im_end|>, and nothing else
    p = tasks.generate("mul", 1, seed=0)[0]
    ex = sft_data.encode(sft_data.problem_conversation(p), tok, "on" if thinking else "off")
    body = p.completion() if thinking else f"<think></think>{p.answer}"
    assert tok.decode([t for t, m in zip(ex.ids, ex.mask) if m]) == body + "<|im_end|>"
    assert tok.decode([t for t, m in zip(ex.ids, ex.mask) if not m]) == (
        f"<s><|im_start|>user\n{p.prompt}<|im_end|>\n<|im_start|>assistant\n\n")


def test_mask_lines_up_with_the_targets_of_the_rows(tok):
    convs = sft_data.task_conversations(12, seed=2)
    exs = sft_data.examples(convs, tok, seed=0)
    data = sft_data.rows(exs, 256, tok.pad_id, seed=0).data
    for r, ex in enumerate(exs):
        b = data.take([r])
        n = len(ex.ids)
        assert b.inputs[0, : n - 1].tolist() == ex.ids[:-1] and b.targets[0, : n - 1].tolist() == ex.ids[1:]
        assert b.mask[0, : n - 1].tolist() == [bool(m) for m in ex.mask[1:]]  # target t+1 trains iff assistant
        assert not b.mask[0, n - 1:].any() and (b.targets[0, n - 1:] == tok.pad_id).all()


def _engine_rule(ids: list[int], budget: int, newlines: set[int], grace: float = 0.1) -> list[int]:
    """What the engine keeps of a reasoning under a budget, token by token: once `budget` tokens are out, the
    token after the first newline-bearing one (or after budget + ceil(grace · budget) tokens) is `</think>`."""
    window = math.ceil(grace * budget)
    out = []
    for t in ids:
        out.append(t)
        if len(out) >= budget and (t in newlines or len(out) >= budget + window):
            break
    return out


def test_budget_cut_follows_the_engine_rule(tok):
    newlines = sft_data.newline_ids(tok)
    assert {tok.encode("\n")[0]} <= newlines and tok.bos_id not in newlines
    rng = random.Random(0)
    for p in tasks.mixture(60, seed=3):
        ids = tok.encode(p.trace)
        for budget in (1, 2, 5, rng.randint(1, len(ids) - 1), len(ids) - 1):
            assert sft_data.budget_cut(ids, budget, newlines) == _engine_rule(ids, budget, newlines)


def test_modes_follow_their_shares_and_render_as_documented(tok):
    convs = sft_data.task_conversations(1200, seed=4)
    exs = sft_data.examples(convs, tok, seed=0, off_share=0.3, budget_share=0.2)
    counts = {m: sum(e.mode == m for e in exs) for m in sft_data.MODES}
    assert abs(counts["off"] / 1200 - 0.3) < 0.05 and abs(counts["budget"] / 1200 - 0.2) < 0.05
    assert exs == sft_data.examples(convs, tok, seed=0, off_share=0.3, budget_share=0.2)  # deterministic
    shorter = 0
    for conv, ex in zip(convs, exs):
        p = conv.messages
        body = tok.decode([t for t, m in zip(ex.ids, ex.mask) if m])
        trace, answer = p[1]["reasoning_content"], p[1]["content"]
        if ex.mode == "off":
            assert body == f"<think></think>{answer}<|im_end|>"
        elif ex.mode == "on":
            assert body == f"<think>\n{trace}\n</think>\n{answer}<|im_end|>"
        else:
            kept = body.removeprefix("<think>\n").split("\n</think>\n")[0]
            assert body == f"<think>\n{kept}\n</think>\n{answer}<|im_end|>"
            assert trace.startswith(kept)  # the whole trace when its end falls inside the grace window
            shorter += len(kept) < len(trace)
    assert shorter > 0.8 * counts["budget"]


def test_one_conversation_per_row_and_the_skipped_are_counted(tok):
    convs = [*sft_data.task_conversations(5, seed=5),
             sft_data.Conversation([{"role": "user", "content": "9 " * 200}, {"role": "assistant", "content": "x"}]),
             sft_data.Conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "no answer"}])]
    result = sft_data.build(convs, tok, seq_len=128, seed=0)
    assert (result.skipped_too_long, result.skipped_no_assistant) == (1, 1)
    exs = sft_data.examples(convs[:5], tok, seed=0)
    rows = result.data.rows
    assert rows.shape == (5, max(len(e.ids) for e in exs))  # as wide as the longest conversation
    for row, ex in zip(rows.tolist(), exs):
        assert row == ex.ids + [tok.pad_id] * (rows.shape[1] - len(ex.ids))
        assert row.count(tok.bos_id) == 1 and row.count(tok.token_to_id("<|im_start|>")) == 2


def test_reading_normalises_tool_calls(tmp_path):
    f = tmp_path / "chats.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "x?"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "lookup", "arguments": '{"key": "x", "n": 2}'}}]},
            {"role": "tool", "content": "7"}, {"role": "assistant", "content": "7"}], "tools": TOOLS},
        {"messages": [{"role": "user", "content": "y?"}, {"role": "assistant", "content":
            "<think>\nneed it\n</think>\nOk.\n<tool_call>\n<function=lookup>\n<parameter=key>\ny\n</parameter>\n"
            "</function>\n</tool_call>"}]},
    ]
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    convs = sft_data.read_conversations([tmp_path])
    assert [c.where for c in convs] == [f"{f}:1", f"{f}:2", f"{f}:3"]
    assert convs[1].messages[1]["tool_calls"] == [{"name": "lookup", "arguments": {"key": "x", "n": 2}}]
    assert convs[1].tools == TOOLS
    m = convs[2].messages[1]
    assert (m["content"], m["reasoning_content"], m["tool_calls"]) == (
        "Ok.", "need it", [{"name": "lookup", "arguments": {"key": "y"}}])
    # the normalised message renders exactly as the raw XML text did
    assert chat.render(convs[2].messages) == chat.render(lines[2]["messages"])


@pytest.mark.parametrize("line, culprit", [
    ('{"messages": [{"role": "user", "content": "a"}', "malformed JSON"),
    ('{"text": "pretraining line"}', "expected an object with a 'messages' list"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": [{"content": "a"}]}', "message 0 has no role"),
    ('{"messages": [{"role": "narrator", "content": "a"}]}', "message 0: unknown role 'narrator'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     "message 1: empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": '
     '"<tool_call>\\n<function=f>\\n<parameter=k>\\nv\\n</function>\\n</tool_call>"}]}',
     "message 1: invalid tool call XML"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<tool_call>oops"}]}',
     "message 1: invalid tool call XML"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"type": "function", '
     '"function": {"name": "f", "arguments": "{not json"}}]}]}', "tool call 'f': arguments are not valid JSON"),
    ('{"messages": [{"role": "user", "content": "a"}], "tools": {"name": "f"}}', "'tools' must be a list"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, culprit):
    f = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
    f.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(train_data.DataError) as e:
        sft_data.read_conversations([f])
    assert str(e.value).startswith(f"{f}:3: ") and culprit in str(e.value), str(e.value)


def test_bad_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path, culprit in ((tmp_path / "none.jsonl", "no such file"), (tmp_path / "notes.txt", "are .jsonl files"),
                          (tmp_path, "folder has no .jsonl files")):
        with pytest.raises(train_data.DataError, match=culprit):
            sft_data.read_conversations([path])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(train_data.DataError, match="no conversations"):
        sft_data.read_conversations([tmp_path / "empty.jsonl"])


def test_task_conversations_carry_prompt_trace_and_answer():
    for conv, p in zip(sft_data.task_conversations(12, seed=6), tasks.mixture(12, seed=6)):
        assert conv.messages == [{"role": "user", "content": p.prompt},
                                 {"role": "assistant", "content": p.answer, "reasoning_content": p.trace}]
        # the assistant body is the pretraining document's completion, closed by the end-of-turn token
        assert chat.render(conv.messages).endswith(f"<|im_start|>assistant\n{p.completion()}<|im_end|>\n")
