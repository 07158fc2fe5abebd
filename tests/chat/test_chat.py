"""The chat format: `chat.render` against transformers' `apply_chat_template` on the Jinja template a checkpoint
folder carries (byte for byte), against hand-written expected text, and `chat.parse` as its inverse."""

from __future__ import annotations

import json
import random

import jinja2
import pytest

from nemotron3 import chat
from nemotron3.tokenizer import Tokenizer
from nemotron3.train import data as train_data

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city — in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "zip": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def _call(name, arguments, openai=True):
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}} if openai else {
        "name": name, "arguments": arguments}


# A dozen conversations: (messages, tools)
CONVERSATIONS = {
    "one user turn": ([{"role": "user", "content": "What is 2 + 3?"}], None),
    "system and reasoning": ([
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"}], None),
    "multi-turn, earlier reasoning": ([
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5", "reasoning_content": "2+3=5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "20", "reasoning_content": "5*4=20"}], None),
    "multi-turn ending with a user turn": ([
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
        {"role": "user", "content": "c"}], None),
    "think block inside content": ([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\nsplit me\n</think>\n\nanswer"}],
        None),
    "tools declared only": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, SEARCH]),
    "system plus tools": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "hi"}], [WEATHER]),
    "tool call dict, tool turn, answer": ([
        {"role": "user", "content": "Weather in Paris for 3 days?"},
        {"role": "assistant", "content": None, "reasoning_content": "Call the tool.",
         "tool_calls": [_call("get_weather", {"city": "Paris", "days": 3})]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21, "sky": "clear"}'},
        {"role": "assistant", "content": "Clear, 21 °C.", "reasoning_content": "The tool answered."}], [WEATHER]),
    "tool call as JSON string": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [_call("get_weather", '{"city": "Oslo"}')]}],
        [WEATHER]),
    "two calls, flat form, nested values": ([
        {"role": "user", "content": "Both"},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("search", {"q": "a <b> & c"}, openai=False),
            _call("get_weather", {"city": "Rome", "days": 2, "extra": {"x": [1, 2.5, None, True]}}, openai=False)]},
        {"role": "tool", "content": "r1"}, {"role": "tool", "content": "r2"}], [WEATHER, SEARCH]),
    "unicode and blank lines": ([
        {"role": "user", "content": "Ünïcödé 🙂\n\n  spaced  "},
        {"role": "assistant", "content": "  ok  \n", "reasoning_content": "\n  think  \n"}], None),
    "later system turn, thinking alias": ([
        {"role": "system", "content": "first"}, {"role": "user", "content": "u"},
        {"role": "system", "content": "second"},
        {"role": "assistant", "content": "x", "thinking": "via the thinking field"}], None),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(train_data.task_texts(300, seed=0), vocab_size=400)


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok.save(folder)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("prompt", [True, False])
def test_render_is_byte_identical_to_apply_chat_template(hf, name, thinking, prompt):
    messages, tools = CONVERSATIONS[name]
    ours = chat.render(messages, tools=tools, enable_thinking=thinking, add_generation_prompt=prompt)
    theirs = hf.apply_chat_template(messages, tools=tools, enable_thinking=thinking, add_generation_prompt=prompt,
                                    tokenize=False)
    assert ours == theirs


def test_apply_chat_template_without_enable_thinking_means_on(hf):
    messages, _ = CONVERSATIONS["system and reasoning"]
    assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == chat.render(
        messages, add_generation_prompt=True)


def _random_conversation(rng: random.Random) -> tuple[list[dict], list[dict] | None]:
    words = ["x", "7", "Paris", "é", "<b>", "a b", "\n", " ", "{}", "[1]", "true", "null", "</s>"]

    def text(allow_empty=True):
        s = "".join(rng.choice(words) for _ in range(rng.randint(0 if allow_empty else 1, 4)))
        return s if allow_empty or s.strip() else "y"

    messages = [{"role": "system", "content": text()}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": text()})
        for _ in range(rng.randint(0, 2)):
            m = {"role": "assistant", "content": text(allow_empty=False)}
            if rng.random() < 0.6:
                m["reasoning_content"] = text()
            if rng.random() < 0.5:
                values = [text(), rng.randint(-5, 5), rng.random(), [1, "a"], {"k": None}, False]
                args = {f"p{j}": rng.choice(values) for j in range(rng.randint(0, 3))}
                m["tool_calls"] = [_call(rng.choice(["f", "get_weather"]),
                                         json.dumps(args) if rng.random() < 0.3 else args, rng.random() < 0.5)]
                if rng.random() < 0.3:
                    m["content"] = None
            messages.append(m)
            if "tool_calls" in m:
                messages.append({"role": "tool", "content": text()})
    return messages, ([WEATHER] if rng.random() < 0.4 else None)


def test_render_matches_apply_chat_template_on_random_conversations(hf):
    rng = random.Random(0)
    for _ in range(150):
        messages, tools = _random_conversation(rng)
        thinking, prompt = rng.random() < 0.5, rng.random() < 0.5
        assert chat.render(messages, tools, thinking, prompt) == hf.apply_chat_template(
            messages, tools=tools, enable_thinking=thinking, add_generation_prompt=prompt, tokenize=False), messages


def test_render_spells_the_documented_layout():
    """Expected text written out by hand, independently of both renderers."""
    messages, _ = CONVERSATIONS["multi-turn, earlier reasoning"]
    assert chat.render(messages) == (
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>5<|im_end|>\n"  # reasoning of the earlier turn dropped
        "<|im_start|>user\nAnd times 4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n5*4=20\n</think>\n20<|im_end|>\n")
    assert chat.render(messages, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think></think>20<|im_end|>\n")
    user = [{"role": "user", "content": "hi"}]
    assert chat.render(user, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert chat.render(user, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think></think>")
    messages, tools = CONVERSATIONS["tool call dict, tool turn, answer"]
    text = chat.render(messages, tools)
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER, ensure_ascii=False) in text
    assert ("<|im_start|>assistant\n<think>\nCall the tool.\n</think>\n<tool_call>\n<function=get_weather>\n"
            "<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
            "<|im_end|>\n<|im_start|>tool\n<tool_response>\n{\"temp\": 21, \"sky\": \"clear\"}\n</tool_response>"
            "<|im_end|>\n") in text
    assert chat.render(*CONVERSATIONS["system plus tools"]).startswith("<|im_start|>system\nUse tools.\n\n# Tools")


def test_segments_mark_exactly_the_assistant_bodies():
    messages, tools = CONVERSATIONS["tool call dict, tool turn, answer"]
    pieces = chat.segments(messages, tools)
    assert "".join(t for t, _ in pieces) == chat.render(messages, tools)
    bodies = [t for t, a in pieces if a]
    assert len(bodies) == 2 and all(b.startswith("<think>") and b.endswith("<|im_end|>") for b in bodies)
    for i, (_, a) in enumerate(pieces):
        if a:
            assert pieces[i - 1][0].endswith("<|im_start|>assistant\n") and not pieces[i - 1][1]


def _assistant_bodies(text: str) -> list[str]:
    return [part.split("<|im_end|>")[0] for part in text.split("<|im_start|>assistant\n")[1:]]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_parse_inverts_render(name):
    """parse(render(turn)) gives back the last assistant turn: reasoning, content, and tool calls as dicts."""
    messages, tools = CONVERSATIONS[name]
    if messages[-1]["role"] != "assistant":
        return
    last = messages[-1]
    got = chat.parse(_assistant_bodies(chat.render(messages, tools))[-1], tools)
    reasoning = next((last[k] for k in chat.REASONING_FIELDS if last.get(k) is not None), None)
    content = last["content"] or ""
    if reasoning is None and "</think>" in content:
        reasoning, content = content.split("</think>")[0].split("<think>")[-1], content.split("</think>")[-1]
    assert got["reasoning_content"] == (reasoning or "").strip()
    assert got["content"] == content.strip()
    want_calls = []
    for c in last.get("tool_calls", []):
        c = c.get("function", c)
        args = c["arguments"]
        want_calls.append({"name": c["name"], "arguments": json.loads(args) if isinstance(args, str) else args})
    assert got["tool_calls"] == want_calls


def test_parse_reads_a_completion_after_the_generation_prompt():
    # generated after "...<|im_start|>assistant\n<think>\n": the text starts inside the think block
    assert chat.parse("3*4=12\n</think>\n12<|im_end|>\ntrailing junk") == {
        "content": "12", "reasoning_content": "3*4=12", "tool_calls": []}
    assert chat.parse("12<|im_end|>") == {"content": "12", "reasoning_content": None, "tool_calls": []}
    assert chat.parse("<think>\nstill thinking") == {"content": "", "reasoning_content": "still thinking",
                                                     "tool_calls": []}
    # the compact layout of the issue text and the newline layout read the same
    compact = chat.parse("<think></think><tool_call><function=f><parameter=a>1</parameter>"
                         "<parameter=b>x y</parameter></function></tool_call>")
    assert compact == {"content": "", "reasoning_content": "", "tool_calls": [{"name": "f",
                                                                               "arguments": {"a": 1, "b": "x y"}}]}


def test_parse_types_values_by_the_tool_schema():
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    assert chat.parse(text)["tool_calls"][0]["arguments"] == {"city": 42, "days": 3}
    assert chat.parse(text, [WEATHER])["tool_calls"][0]["arguments"] == {"city": "42", "days": 3}


@pytest.mark.parametrize("text, culprit", [
    ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n", "unbalanced <tool_call>"),
    ("<tool_call>\n<parameter=a>\n1\n</parameter>\n</tool_call>", "expected <function=NAME>"),
    ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>", "unexpected"),
    ("<tool_call>\n<function=f>\nnot json\n</function>\n</tool_call>", "or a JSON object"),
    ("<tool_call>\n<function=f>\n<parameter=a>1</parameter> junk\n</function>\n</tool_call>", "unexpected"),
    ("done</tool_call>", "unbalanced </tool_call>"),
])
def test_parse_rejects_invalid_tool_call_xml(text, culprit):
    with pytest.raises(ValueError, match="invalid tool call XML") as e:
        chat.parse(text)
    assert culprit in str(e.value)


@pytest.mark.parametrize("messages, culprit", [
    ([{"content": "no role"}], "message 0 has no role"),
    ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1: unknown role 'robot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "message 1: empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "reasoning_content": "r"}],
     "message 1: empty assistant turn"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}], "needs a name"),
    ([{"role": "assistant", "content": "", "tool_calls": [_call("f", {"a<b": 1})]}], "parameter name"),
    ([{"role": "assistant", "content": "", "tool_calls": [_call("f", [1, 2])]}], "arguments must be"),
    ([{"role": "user", "content": ["parts"]}], "content must be a string"),
])
def test_bad_conversations_raise_in_both_renderers(hf, messages, culprit):
    with pytest.raises(ValueError, match=culprit):
        chat.render(messages)
    with pytest.raises(jinja2.TemplateError):
        hf.apply_chat_template(messages, tokenize=False)


def test_think_markers_are_single_tokens_in_the_saved_folder(hf, tok):
    for marker, expected_id in (("<think>", 5), ("</think>", 6), ("<|im_start|>", 3), ("<|im_end|>", 4)):
        assert hf.convert_tokens_to_ids(marker) == expected_id == tok.token_to_id(marker)
    text = chat.render(*CONVERSATIONS["system and reasoning"])
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(text) and ids.count(5) == 1 and ids.count(6) == 1
    assert hf.chat_template == chat.CHAT_TEMPLATE
