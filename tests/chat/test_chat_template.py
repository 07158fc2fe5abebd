"""A checkpoint's own chat template: `Tokenizer.apply_chat_template` against transformers' on the same folder.

For each template (the official Nemotron ones in tests/chat/templates/ when present, see its README; ours; and a
template written here that leans on what transformers' Jinja environment adds: trim_blocks / lstrip_blocks,
`{% generation %}`, loop controls, `namespace`, `dict`, `tojson` options, the special-token variables), a folder
holds a tokenizer whose special tokens sit at other ids than ours, and `AutoTokenizer.from_pretrained(folder)` is
the reference: the text byte for byte and the ids, on the conversations below, reasoning on and off, with and
without the generation prompt. Then: parsing follows the template, special ids come from the vocabulary, and a
template that does not parse is one error line naming its file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemotron3 import chat
from nemotron3.engine.thinking import ThinkingBudget, ThinkTokens
from nemotron3.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "templates"
OFFICIAL = sorted(TEMPLATES.glob("*.jinja"))

# special tokens in an order of our own: none sits at the id nemotron3's tokenizer gives it
SPECIALS = ["<pad>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>", "<TOOLCALL>", "</TOOLCALL>", "</think>",
            "<tool_response>", "</tool_response>", "<tool_call>", "</tool_call>", "<|im_end|>", "<think>",
            "<|im_start|>", "</s>", "<s>", "<unk>"]

# written here: every Jinja feature transformers' environment adds, and whitespace left to trim/lstrip_blocks
OWN_STYLE = """{%- set ns = namespace(n=0, sys='') %}
{% for m in messages %}
    {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
{% endfor %}
{{ bos_token }}[{{ ns.n }} turns{{ ', ' ~ ns.sys if ns.sys }}]
{% if tools %}
Tools: {{ tools | tojson(indent=2, sort_keys=true) }}
{% set d = dict(a=1, b=[2]) %}{{ d | tojson(separators=(',', ':')) }}
{% endif %}
{% for m in messages if m.role != 'system' %}
    <{{ m.role }}>
    {% if m.role == 'assistant' %}
        {% generation %}
        {% if m.reasoning_content and enable_thinking %}<think>{{ m.reasoning_content }}</think>{% endif %}
        {{ m.content or '' }}
        {% for c in m.tool_calls or [] %}{{ (c.function or c).name }}{{ (c.function or c).arguments | tojson }}
        {% if loop.index == 2 %}{% break %}{% endif %}
        {% endfor %}{{ eos_token }}
        {% endgeneration %}
    {% else %}
        {{ m.content }}
        {% if m.role == 'user' and m.content == 'refuse' %}{{ raise_exception('refused: ' ~ m.content) }}{% endif %}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{{ '<think>\\n' if enable_thinking else '<think></think>' }}{% endif %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"},
                                                    "days": {"type": "integer"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now.",
                                          "parameters": {"type": "object", "properties": {}}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}

CONVERSATIONS = {
    "one user turn": ([{"role": "user", "content": "What is 7 * 6?"}], None),
    "system prompt": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], None),
    "multi-turn": ([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "times 3?"}], None),
    "reasoning in the last turn": ([{"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "4", "reasoning_content": "2 and 2 make 4"}],
                                   None),
    "reasoning in the history": ([{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "4", "reasoning_content": "two twos"},
                                  {"role": "user", "content": "and 3+3?"}], None),
    "think block in the content": ([{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "<think>\nhmm\n</think>\nthe answer"}], None),
    "tools declared": ([{"role": "user", "content": "Weather in Oslo?"}], [WEATHER, CLOCK]),
    "system and tools": ([{"role": "system", "content": "You help."}, {"role": "user", "content": "Time?"}],
                         [CLOCK]),
    "tool call and result": ([{"role": "user", "content": "Weather in Oslo?"},
                              {"role": "assistant", "content": "", "reasoning_content": "need the tool",
                               "tool_calls": [CALL]},
                              {"role": "tool", "content": "{\"temp\": 3}"},
                              {"role": "assistant", "content": "3 degrees."}], [WEATHER]),
    "two calls, two results": ([{"role": "user", "content": "Oslo and time"},
                                {"role": "assistant", "content": "Checking.", "tool_calls": [
                                    CALL, {"type": "function", "function": {"name": "get_time", "arguments": {}}}]},
                                {"role": "tool", "content": "cold"}, {"role": "tool", "content": "noon"}],
                               [WEATHER, CLOCK]),
    "content None with a call": ([{"role": "user", "content": "Oslo?"},
                                  {"role": "assistant", "content": None, "tool_calls": [
                                      {"type": "function", "function": {"name": "get_weather", "arguments": {
                                          "city": "Oslo", "days": [1, 2], "metric": True}}}]}], [WEATHER]),
    "unicode": ([{"role": "system", "content": "Réponds en français."},
                 {"role": "user", "content": "Qu'est-ce que « 東京 » ? 🌸"}], None),
    "ends with the assistant": ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
                                None),
}


def _tokenizer(corpus: list[str]) -> HFTokenizer:
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus, trainer)
    return tk


def folder_with(path: Path, template: str | None, in_file: bool = False) -> Path:
    """A tokenizer folder (SPECIALS first, in that order) with `template` in tokenizer_config.json or, with
    `in_file`, in chat_template.jinja."""
    path.mkdir(parents=True, exist_ok=True)
    corpus = [json.dumps(c) for c in CONVERSATIONS.values()] * 3
    _tokenizer(corpus).save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "clean_up_tokenization_spaces": False}
    if template is not None and in_file:
        (path / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


CASES = ["ours", "own style", *(p.stem for p in OFFICIAL)]


def _source(case: str) -> str:
    if case == "ours":
        return chat.CHAT_TEMPLATE
    if case == "own style":
        return OWN_STYLE
    return (TEMPLATES / f"{case}.jinja").read_text()


@pytest.fixture(scope="module", params=CASES)
def pair(request, tmp_path_factory) -> tuple[str, Tokenizer, object]:
    """(case, ours, transformers') on one folder; official templates go in chat_template.jinja."""
    folder = folder_with(tmp_path_factory.mktemp("tpl"), _source(request.param), in_file=request.param in
                         [p.stem for p in OFFICIAL])
    return request.param, Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)


def test_official_templates_are_present():
    """The Nemotron templates are not committed (tests/chat/templates/README.md says where they come from); without
    them only ours and the template written here are compared."""
    if not OFFICIAL:
        pytest.skip("no official template in tests/chat/templates/ (see its README.md)")
    assert {p.stem for p in OFFICIAL} <= {"NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "NVIDIA-Nemotron-Nano-v2"}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_render_equals_transformers_byte_for_byte(pair, name):
    case, ours, hf = pair
    messages, tools = CONVERSATIONS[name]
    for thinking in (True, False):
        for prompt in (True, False):
            if prompt and messages[-1]["role"] == "assistant":
                continue
            want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                          enable_thinking=thinking, tokenize=False)
            got = ours.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                           enable_thinking=thinking)
            assert got == want, (case, name, thinking, prompt)
            ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                         enable_thinking=thinking, tokenize=True, return_dict=True)["input_ids"]
            assert ours.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                            enable_thinking=thinking, tokenize=True) == ids


def test_template_keyword_arguments_reach_the_template(pair):
    """Extra keywords go to the template as transformers passes them (Nemotron 3's `truncate_history_thinking`)."""
    case, ours, hf = pair
    messages, _ = CONVERSATIONS["reasoning in the history"]
    kw = {"truncate_history_thinking": False, "enable_thinking": True}
    assert ours.apply_chat_template(messages, **kw) == hf.apply_chat_template(messages, tokenize=False, **kw)


def test_a_refused_conversation_is_a_value_error(tmp_path):
    ours = Tokenizer.from_folder(folder_with(tmp_path, OWN_STYLE))
    with pytest.raises(ValueError, match="refused: refuse") as e:
        ours.render([{"role": "user", "content": "refuse"}])
    assert "tokenizer_config.json" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- parsing
def _assistant_body(hf, messages: list[dict], tools: list[dict], **kw) -> str:
    """What the template writes for `messages[1]` (an assistant turn, then a user turn follows): the render from
    the end of the assistant header (the generation prompt less its `<think>` opener) on."""
    full = hf.apply_chat_template(messages, tools=tools, tokenize=False, **kw)
    head = hf.apply_chat_template(messages[:1], tools=tools, add_generation_prompt=True, enable_thinking=False,
                                  tokenize=False, **kw)
    head = head.removesuffix("<think></think>").removesuffix("<think>\n")
    assert full.startswith(head)
    return full[len(head):]


@pytest.mark.parametrize("official", OFFICIAL, ids=lambda p: p.stem)
def test_parse_reads_what_the_official_template_writes(official, tmp_path):
    """Round trip through the official template: an assistant turn with reasoning, content and tool calls, as
    transformers renders it in the history (reasoning kept: `truncate_history_thinking=False`), parses back to its
    fields (Nano 2 drops the reasoning of rendered turns)."""
    folder = folder_with(tmp_path, official.read_text(), in_file=True)
    ours, hf = Tokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    calls = [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
             {"name": "get_time", "arguments": {}}]
    turn = {"role": "assistant", "content": "Let me look.", "reasoning_content": "Two tools.",
            "tool_calls": [{"type": "function", "function": c} for c in calls]}
    messages = [{"role": "user", "content": "Oslo, and the time?"}, turn, {"role": "user", "content": "Thanks."}]
    body = _assistant_body(hf, messages, [WEATHER, CLOCK], truncate_history_thinking=False)
    got = ours.parse(body, [WEATHER, CLOCK])
    assert got["content"] == "Let me look." and got["tool_calls"] == calls
    if "Nano-v2" not in official.stem:
        assert got["reasoning_content"] == "Two tools."
        assert ours.format.tool_calls == "xml" and ours.end_of_turn_id == ours.token_to_id("<|im_end|>")
    else:
        assert ours.format.tool_calls == "json" and ours.end_of_turn_id == ours.token_to_id("<SPECIAL_12>")


def test_segments_with_a_foreign_template_concatenate_to_the_render(pair):
    """The SFT pieces: their concatenation is the render, and a trained piece per assistant turn after the last
    user message (ours: every assistant turn, `chat.segments`), holding its content."""
    case, ours, hf = pair
    for name in ("tool call and result", "reasoning in the last turn", "multi-turn"):
        messages, tools = CONVERSATIONS[name]
        if case == "own style" and name != "multi-turn":  # its first line counts the turns: no prefix renders
            with pytest.raises(ValueError, match="prefix by prefix"):
                ours.segments(messages, tools)
            continue
        pieces = ours.segments(messages, tools)
        assert "".join(t for t, _ in pieces) == hf.apply_chat_template(messages, tools=tools, tokenize=False)
        trained = [t for t, a in pieces if a]
        last_user = max(j for j, x in enumerate(messages) if x["role"] == "user")
        after_user = [m for i, m in enumerate(messages) if m["role"] == "assistant"  # ours trains every one
                      and (i > last_user or case == "ours")]
        assert len(trained) == len(after_user)
        assert all(m["content"] in t for m, t in zip(after_user, trained))


# ----------------------------------------------------------------------------------------- special ids
def test_special_ids_come_from_the_tokenizer(tmp_path):
    """A tokenizer whose special tokens sit at other ids than nemotron3's: every id is read from its vocabulary,
    so a thinking budget closes with its `</think>` and a chat stops on its `<|im_end|>`."""
    tok = Tokenizer.from_folder(folder_with(tmp_path, None))  # no template: ours
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    assert (tok.think_start_id, tok.think_end_id) == (vocab["<think>"], vocab["</think>"]) == (12, 6)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab["<s>"], vocab["</s>"], vocab["<pad>"])
    assert tok.end_of_turn_id == vocab["<|im_end|>"] and tok.chat_stop_ids([99]) == sorted({99, 14, 11})
    think = ThinkTokens.from_tokenizer(tok)
    assert (think.start, think.end) == (12, 6)
    assert think.newlines == {i for i in range(tok.vocab_size) if "\n" in tok.decode([i])}
    prompt = tok.encode(tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    assert prompt[-2] == 12  # the generation prompt opens the think block: `<think>` then "\n"
    budget = ThinkingBudget(think, [0], [prompt])
    assert budget(0, [tok.encode("a")[0]]) == (1, 6)  # budget 0: the first token becomes its `</think>`


def test_engine_without_think_ids_refuses_a_budget():
    with pytest.raises(ValueError, match="think"):
        ThinkingBudget(ThinkTokens(), [4], [[1, 2]])


def test_a_tokenizer_without_think_tokens_has_none():
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["plain text only"] * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    tok = Tokenizer(tk, config={})
    assert tok.think_start_id is None and tok.end_of_turn_id is None and tok.bos_id == 0
    with pytest.raises(ValueError, match="<think>"):
        ThinkTokens.from_tokenizer(tok)


# ----------------------------------------------------------------------------------------- bad folders
@pytest.mark.parametrize("in_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_a_template_that_does_not_parse_is_one_line_naming_the_file(tmp_path, in_file):
    bad = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    folder = folder_with(tmp_path, bad, in_file=in_file)
    with pytest.raises(Exception):  # noqa: B017 (the reference refuses it too, with jinja2's own exception)
        transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError) as e:
        Tokenizer.from_folder(folder)
    name = "chat_template.jinja" if in_file else "tokenizer_config.json"
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(folder / name) + ":2:") and "syntax error" in msg


def test_the_template_file_wins_over_the_config(tmp_path):
    """As transformers reads a folder: chat_template.jinja over tokenizer_config.json's entry."""
    folder = folder_with(tmp_path, "{{ 'from the config' }}")
    (folder / "chat_template.jinja").write_text("{{ 'from the file' }}")
    m = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_folder(folder).render(m) == "from the file" == \
        transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(m, tokenize=False)


def test_save_keeps_the_folder_template(tmp_path):
    src = folder_with(tmp_path / "a", OWN_STYLE, in_file=True)
    Tokenizer.from_folder(src).save(tmp_path / "b")
    again = Tokenizer.from_folder(tmp_path / "b")
    m = CONVERSATIONS["tool call and result"]
    assert again.template == OWN_STYLE and again.render(*m) == Tokenizer.from_folder(src).render(*m)
