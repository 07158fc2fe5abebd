"""The server reads tool calls in the layout of the checkpoint's template (serve/output.py `Reply(fmt=...)`):
Nemotron Nano 2's `<TOOLCALL>[...]</TOOLCALL>` JSON as well as the `<tool_call>` XML of ours and Nemotron 3, whole
and streamed token by token (the deltas never show the tag, and concatenate to the final message)."""

from __future__ import annotations

import json

import pytest

from nemotron3 import chat
from nemotron3.serve.output import Reply
from nemotron3.tokenizer import ChatFormat, Tokenizer
from nemotron3.train import data as train_data

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
NANO2 = ChatFormat("<SPECIAL_12>", "json")

JSON_TURN = ('<think>\nThe user wants Oslo.\n</think>\nLet me check. <TOOLCALL>[{"name": "get_weather", '
             '"arguments": {"city": "Oslo", "days": 2}}]</TOOLCALL>')
XML_TURN = ("<think>\nThe user wants Oslo.\n</think>\nLet me check. <tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(200, seed=0), vocab_size=400)


def _reply(tok: Tokenizer, text: str, fmt: ChatFormat | None, stream: bool) -> tuple[dict, dict[str, str]]:
    reply = Reply(tok.tk, set(), chat=True, thinking=True, tools=[WEATHER], fmt=fmt)
    ids = tok.encode(text.removeprefix(chat.THINK_START))  # the prompt ends with <think>\n
    sent = {"reasoning_content": "", "content": ""}
    for chunk in ([[i] for i in ids] if stream else [ids]):
        for name, delta in reply.push(chunk):
            sent[name] += delta
    for name, delta in reply.finish():
        sent[name] += delta
    return reply.message(), sent


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fmt,text", [(NANO2, JSON_TURN), (None, XML_TURN), (ChatFormat(), XML_TURN)],
                         ids=["nano2-json", "default-xml", "xml"])
def test_tool_calls_are_read_in_the_template_layout(tok, fmt, text, stream):
    message, sent = _reply(tok, text, fmt, stream)
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": 2}
    assert message["content"] == "Let me check."
    assert message["reasoning_content"] == "The user wants Oslo."
    assert sent["content"] == message["content"] and sent["reasoning_content"] == message["reasoning_content"]


def test_json_is_not_a_call_in_the_xml_layout(tok):
    """Our checkpoint writing Nano 2's tag: text, not a call."""
    message, _ = _reply(tok, JSON_TURN, ChatFormat(), stream=False)
    assert "tool_calls" not in message and "<TOOLCALL>" in message["content"]
