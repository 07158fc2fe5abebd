"""The chat format: conversations in the OpenAI messages form <-> the text the model reads and writes.

    from nemotron3 import chat
    text = chat.render([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True)
    # '<|im_start|>user\\nWhat is 2 + 3?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n'
    chat.parse("1+2...\\n</think>\\n5<|im_end|>")   # {"content": "5", "reasoning_content": "1+2...", "tool_calls": []}

The same template is `CHAT_TEMPLATE` (Jinja), which `Tokenizer.save` writes into `tokenizer_config.json`, so
transformers' `apply_chat_template(messages, tools=..., add_generation_prompt=..., enable_thinking=...)` renders
the same bytes as `render` (tests/chat/test_chat.py checks it). The layout (docs/post-training.md §1):

    <|im_start|>system\\n{system}\\n\\n{tools block}<|im_end|>\\n     a first system message and/or the tools
    <|im_start|>user\\n{content}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n{reasoning}\\n</think>\\n{content}{tool calls}<|im_end|>\\n
    <|im_start|>tool\\n<tool_response>\\n{content}\\n</tool_response><|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n                            the generation prompt, reasoning on
    <|im_start|>assistant\\n<think></think>                       the generation prompt, reasoning off

- Every assistant turn opens with a think block. It holds the turn's reasoning only for the assistant turns
  after the last user message, and only with `enable_thinking` (default on); otherwise it is empty,
  `<think></think>`, so the reasoning of earlier turns is dropped and a reasoning-off conversation has none.
- Assistant reasoning and content are stripped of surrounding whitespace. Reasoning comes from
  `reasoning_content` (transformers also fills it from `thinking` or `reasoning`); without it, content that holds
  a `</think>` is split there.
- A tool call, after the content (one newline between the parts), in the XML layout of Qwen3-Coder:
  `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`, a string VALUE
  as it is, any other value as JSON. Calls come as `{"name", "arguments"}` or OpenAI's
  `{"type": "function", "function": {"name", "arguments"}}`. `arguments` given as a JSON *string* is written
  verbatim as the function body, `<function=NAME>\\n{"k": 1}\\n</function>` (a Jinja template cannot parse
  JSON, and both renderers must agree); `parse` reads that body back as a dict too, and the SFT data
  (train/sft_data.py) turns JSON-string arguments into dicts before rendering, so training sees one layout.
- Tools are the system turn's `# Tools` block: one JSON line per tool (transformers' `tojson`, i.e.
  `json.dumps(tool, ensure_ascii=False)`) between `<tools>` and `</tools>`, and an example call.
- No `<s>`: the training data and the evaluation put the BOS id before the rendered ids.

This is our template: a checkpoint folder with a template of its own (NVIDIA's Nemotron 3 Nano's differs in its
system turn, tools block and history; docs/post-training.md §1) is rendered with that one, through
`nemotron3.tokenizer.Tokenizer` (nemotron3/chat_template.py); this module is its default.

Errors: a message without a role, an unknown role, a content that is not a string, an assistant turn with
neither content nor tool calls, a malformed tool call (no name, arguments of another type, a name or key holding
`<`, `>` or a newline) raise ValueError naming the message; `parse` raises ValueError for tool-call XML it cannot read.
"""

from __future__ import annotations

import json
import re
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
THINK_START, THINK_END = "<think>", "</think>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"

TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_OUTRO = (
    "\n</tools>\n\nTo call a function, reply with the following, one <tool_call> block per call:\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter>\nvalue\n</parameter>\n"
    "</function>\n</tool_call>"
)
# transformers fills `reasoning_content` from the first of these that is set (chat_template_utils)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# The template, in Jinja. transformers compiles it with trim_blocks and lstrip_blocks; every tag here trims its
# own whitespace, so the text is exactly what the `{{- ... }}` expressions write. Mirrors `segments` below.
CHAT_TEMPLATE = (
    "{%- set thinking = enable_thinking if enable_thinking is defined else true -%}\n"
    "{%- set ns = namespace(last_user=-1) -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- if m.role is not defined or m.role is none -%}\n"
    "    {{- raise_exception('message ' ~ loop.index0 ~ ' has no role') -}}\n"
    "  {%- elif m.role not in ['system', 'user', 'assistant', 'tool'] -%}\n"
    "    {{- raise_exception('message ' ~ loop.index0 ~ ': unknown role ' ~ m.role) -}}\n"
    "  {%- elif m.role == 'user' -%}\n"
    "    {%- set ns.last_user = loop.index0 -%}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- set first_system = messages | length > 0 and messages[0].role == 'system' -%}\n"
    "{%- if first_system or tools -%}\n"
    "  {{- '<|im_start|>system\\n' -}}\n"
    "  {%- if first_system -%}\n"
    "    {%- if messages[0].content is defined and messages[0].content is not none"
    " and messages[0].content is not string -%}\n"
    "      {{- raise_exception('message 0: content must be a string') -}}\n"
    "    {%- endif -%}\n"
    "    {{- messages[0].content or '' -}}\n"
    "    {%- if tools -%}{{- '\\n\\n' -}}{%- endif -%}\n"
    "  {%- endif -%}\n"
    "  {%- if tools -%}\n"
    "    {{- " + json.dumps(TOOLS_INTRO) + " -}}\n"
    "    {%- for tool in tools -%}{{- '\\n' ~ (tool | tojson) -}}{%- endfor -%}\n"
    "    {{- " + json.dumps(TOOLS_OUTRO) + " -}}\n"
    "  {%- endif -%}\n"
    "  {{- '<|im_end|>\\n' -}}\n"
    "{%- endif -%}\n"
    "{%- for m in messages -%}\n"
    "  {%- set i = loop.index0 -%}\n"
    "  {%- if m.content is defined and m.content is not none and m.content is not string -%}\n"
    "    {{- raise_exception('message ' ~ i ~ ': content must be a string') -}}\n"
    "  {%- endif -%}\n"
    "  {%- set content = m.content or '' -%}\n"
    "  {%- if m.role == 'system' and loop.first -%}\n"
    "  {%- elif m.role == 'tool' -%}\n"
    "    {{- '<|im_start|>tool\\n<tool_response>\\n' ~ content ~ '\\n</tool_response><|im_end|>\\n' -}}\n"
    "  {%- elif m.role != 'assistant' -%}\n"
    "    {{- '<|im_start|>' ~ m.role ~ '\\n' ~ content ~ '<|im_end|>\\n' -}}\n"
    "  {%- else -%}\n"
    "    {%- set reasoning = '' -%}\n"
    "    {%- if m.reasoning_content is string -%}\n"
    "      {%- set reasoning = m.reasoning_content -%}\n"
    "    {%- elif '</think>' in content -%}\n"
    "      {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}\n"
    "      {%- set content = content.split('</think>')[-1] -%}\n"
    "    {%- endif -%}\n"
    "    {%- set reasoning = reasoning | trim -%}\n"
    "    {%- set content = content | trim -%}\n"
    "    {%- if not content and not m.tool_calls -%}\n"
    "      {{- raise_exception('message ' ~ i ~ ': empty assistant turn (no content, no tool calls)') -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|im_start|>assistant\\n' -}}\n"
    "    {%- if thinking and i > ns.last_user and reasoning -%}\n"
    "      {{- '<think>\\n' ~ reasoning ~ '\\n</think>\\n' -}}\n"
    "    {%- else -%}\n"
    "      {{- '<think></think>' -}}\n"
    "    {%- endif -%}\n"
    "    {{- content -}}\n"
    "    {%- for call in (m.tool_calls or []) -%}\n"
    "      {%- if call.function is defined and call.function is mapping -%}\n"
    "        {%- set call = call.function -%}\n"
    "      {%- endif -%}\n"
    "      {%- if call.name is not string or not call.name or '<' in call.name or '>' in call.name"
    " or '\\n' in call.name -%}\n"
    "        {{- raise_exception('message ' ~ i ~ ': a tool call needs a name without <, > or newlines')"
    " -}}\n"
    "      {%- endif -%}\n"
    "      {%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}\n"
    "      {{- '<tool_call>\\n<function=' ~ call.name ~ '>\\n' -}}\n"
    "      {%- if call.arguments is mapping -%}\n"
    "        {%- for key, value in call.arguments | items -%}\n"
    "          {%- if key is not string or not key or '<' in key or '>' in key or '\\n' in key -%}\n"
    "            {{- raise_exception('tool call ' ~ call.name ~ ': a parameter name without <, > or newlines') -}}\n"
    "          {%- endif -%}\n"
    "          {{- '<parameter=' ~ key ~ '>\\n' -}}\n"
    "          {%- if value is string -%}{{- value -}}{%- else -%}{{- value | tojson -}}{%- endif -%}\n"
    "          {{- '\\n</parameter>\\n' -}}\n"
    "        {%- endfor -%}\n"
    "      {%- elif call.arguments is string -%}\n"
    "        {{- (call.arguments | trim) ~ '\\n' -}}\n"
    "      {%- elif call.arguments is defined and call.arguments is not none -%}\n"
    "        {{- raise_exception('tool call ' ~ call.name ~ ': arguments must be an object or a JSON string') -}}\n"
    "      {%- endif -%}\n"
    "      {{- '</function>\\n</tool_call>' -}}\n"
    "    {%- endfor -%}\n"
    "    {{- '<|im_end|>\\n' -}}\n"
    "  {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "  {%- if thinking -%}{{- '<think>\\n' -}}{%- else -%}{{- '<think></think>' -}}{%- endif -%}\n"
    "{%- endif -%}\n"
)


def _bad_name(name: Any) -> bool:
    return not isinstance(name, str) or not name or any(c in name for c in "<>\n")


def _json(value: Any) -> str:
    """transformers' `tojson` filter."""
    return json.dumps(value, ensure_ascii=False)


def _tool_call_text(call: Any, where: str) -> str:
    """One call in the Qwen3-Coder XML layout."""
    if not isinstance(call, dict):
        raise ValueError(f"{where}: a tool call must be an object, got {type(call).__name__}")
    if isinstance(call.get("function"), dict):
        call = call["function"]
    name, args = call.get("name"), call.get("arguments")
    if _bad_name(name):
        raise ValueError(f"{where}: a tool call needs a name without <, > or newlines, got {name!r}")
    body = ""
    if isinstance(args, dict):
        for key, value in args.items():
            if _bad_name(key):
                raise ValueError(f"{where}: tool call {name}: a parameter name without <, > or newlines, got {key!r}")
            body += f"<parameter={key}>\n{value if isinstance(value, str) else _json(value)}\n</parameter>\n"
    elif isinstance(args, str):
        body = args.strip() + "\n"
    elif args is not None:
        raise ValueError(f"{where}: tool call {name}: arguments must be an object or a JSON string, got "
                         f"{type(args).__name__}")
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def _content(m: dict, where: str) -> str:
    content = m.get("content")
    if content is not None and not isinstance(content, str):
        raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")
    return content or ""


def _reasoning(m: dict) -> str | None:
    return next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)


def segments(messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = True,
             add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as consecutive pieces `(text, is_assistant)`; their concatenation is `render`.

    An assistant piece is one assistant turn's body: from its `<think>` through its `<|im_end|>` (the tokens the
    model writes; `<|im_start|>assistant\\n` before it and the newline after it are not assistant pieces). Each
    piece starts and ends at a special token, so tokenizing the pieces one by one gives the tokens of the whole
    text (train/sft_data.py builds the loss mask this way).
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of objects, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected an object, got {type(m).__name__}")
        if m.get("role") is None:
            raise ValueError(f"message {i} has no role")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out: list[tuple[str, bool]] = []
    first_system = bool(messages) and messages[0]["role"] == "system"
    if first_system or tools:
        text = TURN_START + "system\n"
        if first_system:
            text += _content(messages[0], "message 0") + ("\n\n" if tools else "")
        if tools:
            text += TOOLS_INTRO + "".join("\n" + _json(t) for t in tools) + TOOLS_OUTRO
        out.append((text + TURN_END + "\n", False))
    for i, m in enumerate(messages):
        where = f"message {i}"
        content = _content(m, where)
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role == "tool":
            out.append((f"{TURN_START}tool\n<tool_response>\n{content}\n</tool_response>{TURN_END}\n", False))
            continue
        if role != "assistant":
            out.append((f"{TURN_START}{role}\n{content}{TURN_END}\n", False))
            continue
        reasoning = _reasoning(m)
        if not isinstance(reasoning, str):
            reasoning = ""
            if THINK_END in content:
                reasoning = content.split(THINK_END)[0].split(THINK_START)[-1]
                content = content.split(THINK_END)[-1]
        reasoning, content = reasoning.strip(), content.strip()
        calls = m.get("tool_calls") or []
        if not content and not calls:
            raise ValueError(f"{where}: empty assistant turn (no content, no tool calls)")
        if not isinstance(calls, list):
            raise ValueError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
        if enable_thinking and i > last_user and reasoning:
            body = f"{THINK_START}\n{reasoning}\n{THINK_END}\n"
        else:
            body = THINK_START + THINK_END
        parts = [content] if content else []
        parts += [_tool_call_text(c, where) for c in calls]
        out.append((TURN_START + "assistant\n", False))
        out.append((body + "\n".join(parts) + TURN_END, True))
        out.append(("\n", False))
    if add_generation_prompt:
        out.append((TURN_START + "assistant\n" + (THINK_START + "\n" if enable_thinking else THINK_START + THINK_END),
                    False))
    return out


def render(messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = True,
           add_generation_prompt: bool = False) -> str:
    """The text of a conversation (see the module docstring); equal to `apply_chat_template` with CHAT_TEMPLATE."""
    return "".join(text for text, _ in segments(messages, tools, enable_thinking, add_generation_prompt))


# ----------------------------------------------------------------------------------------- parse
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_FUNCTION = re.compile(r"\s*<function=([^<>\n]+)>(.*)</function>\s*", re.S)
_PARAMETER = re.compile(r"\s*<parameter=([^<>\n]+)>(.*?)</parameter>", re.S)


def _strip_newline(value: str) -> str:
    """The value of `<parameter=K>\\nVALUE\\n</parameter>`: one newline at each end belongs to the layout."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _parameter_types(tools: list[dict] | None) -> dict[tuple[str, str], str]:
    types = {}
    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else {}
        props = (fn.get("parameters") or {}).get("properties") or {}
        for key, schema in props.items():
            if isinstance(schema, dict) and isinstance(schema.get("type"), str):
                types[(fn.get("name"), key)] = schema["type"]
    return types


def _value(text: str, declared: str | None) -> Any:
    """A parameter's value: a string as written, unless it reads as JSON of another type (a number, true/false,
    null, an object or a list) and the tool's schema does not declare it a string."""
    if declared == "string":
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return text if isinstance(value, str) and declared is None else value


def _parse_call(block: str, types: dict[tuple[str, str], str]) -> dict:
    m = _FUNCTION.fullmatch(block)
    if m is None:
        raise ValueError(f"invalid tool call XML: expected <function=NAME>...</function> inside <tool_call>, got "
                         f"{block.strip()[:80]!r}")
    name, body = m[1], m[2]
    if "<parameter=" not in body:
        if not body.strip():
            return {"name": name, "arguments": {}}
        try:
            args = json.loads(body)
        except json.JSONDecodeError:
            raise ValueError(f"invalid tool call XML: function {name}: expected <parameter=KEY>...</parameter> "
                             f"elements or a JSON object, got {body.strip()[:80]!r}") from None
        if not isinstance(args, dict):
            raise ValueError(f"invalid tool call XML: function {name}: arguments are not a JSON object")
        return {"name": name, "arguments": args}
    args, pos = {}, 0
    for p in _PARAMETER.finditer(body):
        if body[pos:p.start()].strip():
            break
        args[p[1]] = _value(_strip_newline(p[2]), types.get((name, p[1])))
        pos = p.end()
    if body[pos:].strip():
        raise ValueError(f"invalid tool call XML: function {name}: unexpected {body[pos:].strip()[:80]!r} (expected "
                         "<parameter=KEY>value</parameter> elements)")
    return {"name": name, "arguments": args}


def parse(text: str, tools: list[dict] | None = None) -> dict:
    """An assistant turn's text -> `{"content", "reasoning_content", "tool_calls"}`.

    `text` is what the model wrote after the generation prompt (or a whole assistant body, `<think>` included);
    it ends at the first `<|im_end|>`. The reasoning is the text before `</think>` (after a `<think>`, when there
    is one), stripped; None when there is no `</think>`, unless an unclosed `<think>` starts the text (then all
    of it is reasoning and the content is empty). `tool_calls` is a list of `{"name", "arguments"}` with
    `arguments` a dict; a value reads as JSON when it is a number, true/false, null, an object or a list (a
    `tools` schema that declares the parameter a string keeps it a string). The content is the rest, stripped.
    Raises ValueError for a tool call whose XML it cannot read.
    """
    text = text.split(TURN_END, 1)[0]
    if text.startswith(TURN_START + "assistant\n"):
        text = text[len(TURN_START + "assistant\n"):]
    reasoning: str | None = None
    if THINK_END in text:
        head, text = text.split(THINK_END, 1)
        reasoning = head.split(THINK_START, 1)[1] if THINK_START in head else head
        reasoning = reasoning.strip()
    elif text.lstrip().startswith(THINK_START):
        reasoning, text = text.lstrip()[len(THINK_START):].strip(), ""
    types = _parameter_types(tools)
    calls = [_parse_call(m[1], types) for m in _TOOL_CALL.finditer(text)]
    rest = _TOOL_CALL.sub("", text)
    for tag in ("<tool_call>", "</tool_call>"):
        if tag in rest:
            raise ValueError(f"invalid tool call XML: unbalanced {tag} in {text.strip()[:80]!r}")
    return {"content": rest.strip(), "reasoning_content": reasoning, "tool_calls": calls}
