"""SFT data: conversations -> token rows with a loss mask over the assistant's tokens, one conversation per row.

**Sources.** OpenAI-messages JSONL files, one conversation per line, `{"messages": [...], "tools": [...]}`
(`tools` optional), read by `read_conversations`; or, by default, conversations built from the embedded task
families (`task_conversations`): the problem's prompt as the user turn, its trace as the assistant's
`reasoning_content`, its answer as the content. Before a conversation is accepted it is normalised (every field
the chat format reads is type-checked; a `content` given as OpenAI text parts, `[{"type": "text", "text": ...}]`,
becomes their texts concatenated, as the server reads them, and any other kind of part is refused; tool-call
arguments given as a JSON string become an object; tool-call XML written inside an assistant's content is parsed
into `tool_calls`) and rendered once, so every mistake is found while reading and named by file:line and field.

**Modes** (docs/post-training.md §3). Each conversation is drawn, from a generator seeded by (seed, index), into
one of three modes: `off` with probability `off_share` (rendered with `enable_thinking=False`: every think
block empty, answer only), `budget` with probability `budget_share` (the reasoning of the last assistant turn
that has one is cut to a random token budget and closed early, then the answer), else `on`. A conversation
without reasoning is `on` whatever the draw would have been.

**Budget cut.** With r the reasoning's tokens and a budget B drawn uniformly from [1, len(r) - 1], the cut
imitates the engine's thinking budget (engine/thinking.py): keep the first B tokens, then up to the first newline
token among the next ceil(0.1 · B) tokens if there is one, else exactly those ceil(0.1 · B) more. The kept text,
stripped, is the reasoning; `</think>` and the answer follow as usual.

**Tokens and mask.** `<s>` then the rendered conversation, tokenized piece by piece (`chat.segments`: every piece
starts and ends at a special token, so the pieces' tokens are the whole text's tokens). The mask is 1 exactly on
the tokens of each assistant turn's body, from its `<think>` through its `<|im_end|>`, and 0 on everything else
(`<s>`, system / user / tool turns, `<|im_start|>assistant\\n`, the newline after `<|im_end|>`, padding).

**Rows.** One conversation per row, right-padded with `<unk>` under a zero mask: no conversation shares a row,
so attention and the Mamba state never carry one conversation into another (the model is causal, so the padding
after a conversation never reaches it). Rows are as wide as the longest conversation (at most `seq_len` + 1
tokens); a longer conversation is skipped and counted, and so is one without an assistant token.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from nemotron3 import chat, tasks
from nemotron3.envs import lookup
from nemotron3.tokenizer import Tokenizer
from nemotron3.train.data import MAX_JSON_DEPTH, DataError, PackedData, check_depth, jsonl_records, loads

MODES = ("on", "off", "budget")
GRACE = 0.1  # the engine's default grace window, a fraction of the budget


@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    where: str = ""  # file:line, or tasks:FAMILY


@dataclass
class Example:
    ids: list[int]  # <s> + the rendered conversation
    mask: list[int]  # 1 on the assistant's tokens
    mode: str


@dataclass
class SFTRows:
    data: PackedData
    modes: dict[str, int] = field(default_factory=dict)  # conversations per mode, among the rows
    skipped_too_long: int = 0
    skipped_no_assistant: int = 0


# ----------------------------------------------------------------------------------------- sources
def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _text_parts(content: list, where: str) -> str:
    """OpenAI content parts -> their texts concatenated (as the server does, serve/protocol.py); DataError for a
    part that is not `{"type": "text", "text": str}`."""
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            got = f"type {part.get('type')!r}" if isinstance(part, dict) else _type(part)
            raise DataError(f"{where}: content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                            f"supported, got {got}")
        if not isinstance(part.get("text"), str):
            raise DataError(f"{where}: content[{j}].text must be a string, got {_type(part.get('text'))}")
        texts.append(part["text"])
    return "".join(texts)


def _check_call(call: object, where: str) -> None:
    """One entry of `tool_calls`: `{"name", "arguments"}` or OpenAI's `{"id", "type", "function": {...}}`."""
    if not isinstance(call, dict):
        raise DataError(f"{where} must be an object, got {_type(call)}")
    for key in ("id", "type"):
        if call.get(key) is not None and not isinstance(call[key], str):
            raise DataError(f"{where}.{key} must be a string, got {_type(call[key])}")
    fn = call
    if "function" in call:
        fn, where = call["function"], f"{where}.function"
        if not isinstance(fn, dict):
            raise DataError(f"{where} must be an object with a name and arguments, got {_type(fn)}")
    if not isinstance(fn.get("name"), str):
        raise DataError(f"{where}.name must be a string, got {_type(fn.get('name'))}")
    args = fn.get("arguments")
    if args is not None and not isinstance(args, (str, dict)):
        raise DataError(f"{where}.arguments must be an object or a JSON string, got {_type(args)}")


def check_message(m: object, where: str) -> dict:
    """One OpenAI message with every field the chat format reads type-checked, as a new dict whose `content` is a
    string (or None): a list of text parts is joined. DataError `{where}: FIELD ...` names the field. Fields the
    chat format does not read are kept unchecked (OpenAI messages carry others, e.g. `refusal`)."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: expected an object, got {_type(m)}")
    role = m.get("role")
    if role is None:
        raise DataError(f"{where} has no role")
    if not isinstance(role, str):
        raise DataError(f"{where}: role must be a string, got {_type(role)}")
    if role not in chat.ROLES:
        raise DataError(f"{where}: unknown role {role!r}; expected one of {', '.join(chat.ROLES)}")
    m = dict(m)
    content = m.get("content")
    if isinstance(content, list):
        m["content"] = _text_parts(content, where)
    elif content is not None and not isinstance(content, str):
        raise DataError(f"{where}: content must be a string or a list of text parts, got {_type(content)}")
    for key in (*chat.REASONING_FIELDS, "name", "tool_call_id"):
        if m.get(key) is not None and not isinstance(m[key], str):
            raise DataError(f"{where}: {key} must be a string, got {_type(m[key])}")
    calls = m.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise DataError(f"{where}: tool_calls must be a list of tool calls, got {_type(calls)}")
        for j, call in enumerate(calls):
            _check_call(call, f"{where}: tool_calls[{j}]")
    return m


def _normalise(messages: list, tools, where: str) -> Conversation:
    """Check one conversation (every message's fields, then by rendering it) and bring its content and tool calls
    into one form; DataError names `where`."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{where}: 'tools' must be a list of objects")
    out = []
    for i, m in enumerate(messages):
        m = check_message(m, f"{where}: message {i}")
        if m["role"] == "assistant":
            content = m.get("content")
            if isinstance(content, str) and "<tool_call>" in content:
                try:
                    parsed = chat.parse(content)
                except ValueError as e:
                    raise DataError(f"{where}: message {i}: {e}") from None
                except RecursionError:  # a parameter value parsed as JSON (chat._value)
                    raise DataError(f"{where}: message {i}: tool call XML: JSON nested deeper than "
                                    f"{MAX_JSON_DEPTH} levels") from None
                check_depth(parsed["tool_calls"], f"{where}: message {i}: tool call XML")
                m["content"] = parsed["content"]
                if parsed["reasoning_content"] is not None and m.get("reasoning_content") is None:
                    m["reasoning_content"] = parsed["reasoning_content"]
                m["tool_calls"] = list(m.get("tool_calls") or []) + parsed["tool_calls"]
            calls = []
            for call in m.get("tool_calls") or []:
                fn = call.get("function", call)
                if isinstance(fn.get("arguments"), str):
                    what = f"{where}: message {i}: tool call {fn.get('name')!r}"
                    try:
                        args = loads(fn["arguments"], f"{what}: arguments") if fn["arguments"].strip() else {}
                    except json.JSONDecodeError as e:
                        raise DataError(f"{what}: arguments are not valid JSON ({e.msg} at column {e.colno})") from None
                    if not isinstance(args, dict):
                        raise DataError(f"{what}: arguments must be a JSON object")
                    call = {"name": fn.get("name"), "arguments": args}
                calls.append(call)
            if calls:
                m["tool_calls"] = calls
        out.append(m)
    try:
        chat.render(out, tools)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return Conversation(out, tools, where)


def _jsonl_files(paths: list[str | Path]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.jsonl") if f.is_file())
            if not found:
                raise DataError(f"{p}: folder has no .jsonl files")
            files += found
        elif not p.exists():
            raise DataError(f"{p}: no such file or folder")
        elif p.suffix != ".jsonl":
            raise DataError(f"{p}: SFT data are .jsonl files of OpenAI messages, one conversation per line")
        else:
            files.append(p)
    return files


def read_conversations(paths: list[str | Path]) -> list[Conversation]:
    """Every conversation of the given .jsonl files and folders, in sorted file order; blank lines are skipped.

    Raises DataError naming file:line for a line that is not UTF-8 or not JSON, that has no `messages` list, a
    message without a role or with an unknown one, a message field of the wrong type (named), a content part that
    is not text, an empty assistant turn, or a tool call that is malformed (arguments that are not a JSON object,
    tool-call XML that does not parse).
    """
    convs = []
    for f in _jsonl_files(paths):
        for where, obj in jsonl_records(f):
            if not isinstance(obj, dict) or "messages" not in obj:
                raise DataError(f"{where}: expected an object with a 'messages' list (and optional 'tools')")
            convs.append(_normalise(obj["messages"], obj.get("tools"), where))
    if not convs:
        raise DataError(f"no conversations in {', '.join(map(str, paths))}")
    return convs


def problem_conversation(p: tasks.Problem) -> Conversation:
    """A task problem as a conversation: the prompt asked, the trace as reasoning, the answer as content."""
    return Conversation([{"role": "user", "content": p.prompt},
                         {"role": "assistant", "content": p.answer, "reasoning_content": p.trace}],
                        where=f"tasks:{p.family}")


def task_conversations(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[Conversation]:
    """`n` conversations mixed evenly over the task families."""
    return [problem_conversation(p) for p in tasks.mixture(n, seed=seed, split=split, difficulty=difficulty)]


def tool_conversations(n: int, seed: int, split: str = "train", difficulty: int = 1) -> list[Conversation]:
    """`n` conversations of the embedded tool environment (envs/lookup.py): lookups, a calculation, the answer."""
    return [Conversation(c["messages"], c["tools"], f"tools:{split}")
            for c in lookup.conversations(n, seed, split, difficulty)]


# ----------------------------------------------------------------------------------------- modes
def _reasoning_turn(messages: list[dict]) -> int | None:
    """Index of the last assistant turn after the last user turn that carries reasoning, or None."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i in range(len(messages) - 1, last_user, -1):
        m = messages[i]
        r = next((m[k] for k in chat.REASONING_FIELDS if m.get(k) is not None), None)
        if m["role"] == "assistant" and isinstance(r, str) and r.strip():
            return i
    return None


def budget_cut(reasoning_ids: list[int], budget: int, newline_ids: set[int], grace: float = GRACE) -> list[int]:
    """The reasoning tokens kept under `budget` (see the module docstring): B tokens, then to the end of the line
    if it ends within ceil(grace · B) more tokens, else ceil(grace · B) more."""
    grace = math.ceil(grace * budget)  # the engine's window, float product included (engine/thinking.py)
    for j in range(budget - 1, min(budget + grace, len(reasoning_ids))):
        if reasoning_ids[j] in newline_ids:
            return reasoning_ids[: j + 1]
    return reasoning_ids[: budget + grace]


def newline_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids whose text contains a newline."""
    return {i for i in range(tokenizer.vocab_size) if "\n" in tokenizer.decode([i])}


def with_budget(conv: Conversation, tokenizer: Tokenizer, rng: random.Random,
                newlines: set[int] | None = None) -> Conversation:
    """`conv` with the reasoning of its last reasoning turn cut to a random budget (unchanged when it has none or
    a single token)."""
    i = _reasoning_turn(conv.messages)
    if i is None:
        return conv
    m = conv.messages[i]
    reasoning = next(m[k] for k in chat.REASONING_FIELDS if m.get(k) is not None).strip()
    ids = tokenizer.encode(reasoning)
    if len(ids) < 2:
        return conv
    kept = budget_cut(ids, rng.randint(1, len(ids) - 1), newline_ids(tokenizer) if newlines is None else newlines)
    cut = {k: v for k, v in m.items() if k not in chat.REASONING_FIELDS}
    cut["reasoning_content"] = tokenizer.decode(kept).strip()
    return replace(conv, messages=[*conv.messages[:i], cut, *conv.messages[i + 1:]])


def draw_mode(seed: int, index: int, off_share: float, budget_share: float) -> tuple[str, random.Random]:
    """The mode of conversation `index`, and the generator its budget is drawn from."""
    rng = random.Random(f"sft/{seed}/{index}")
    u = rng.random()
    return ("off" if u < off_share else "budget" if u < off_share + budget_share else "on"), rng


# ----------------------------------------------------------------------------------------- tokens
def encode(conv: Conversation, tokenizer: Tokenizer, mode: str = "on") -> Example:
    """`<s>` + the rendered conversation, and the mask of its assistant tokens (mode `off` renders it with
    reasoning off; a `budget` conversation is cut beforehand by `with_budget`)."""
    ids, mask = [tokenizer.bos_id], [0]
    for text, assistant in tokenizer.segments(conv.messages, conv.tools, enable_thinking=mode != "off"):
        piece = tokenizer.encode(text)
        ids += piece
        mask += [int(assistant)] * len(piece)
    return Example(ids, mask, mode)


def examples(convs: list[Conversation], tokenizer: Tokenizer, seed: int, off_share: float = 0.0,
             budget_share: float = 0.0) -> list[Example]:
    """Every conversation encoded in its drawn mode."""
    newlines = newline_ids(tokenizer) if budget_share > 0 else set()
    out = []
    for i, conv in enumerate(convs):
        mode, rng = draw_mode(seed, i, off_share, budget_share)
        if mode != "on" and _reasoning_turn(conv.messages) is None:
            mode = "on"
        if mode == "budget":
            conv = with_budget(conv, tokenizer, rng, newlines)
        out.append(encode(conv, tokenizer, mode))
    return out


def rows(exs: list[Example], seq_len: int, pad_id: int, seed: int) -> SFTRows:
    """One example per row, right-padded: rows (N, W+1) int64 and target mask (N, W+1) bool, W = the longest kept
    example's length - 1 (at most `seq_len`). Examples longer than seq_len + 1 tokens or without an assistant
    token are skipped and counted."""
    kept = [e for e in exs if len(e.ids) <= seq_len + 1 and any(e.mask)]
    result = SFTRows(PackedData(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, dtype=torch.bool), seed),
                     {m: sum(e.mode == m for e in kept) for m in MODES},
                     sum(len(e.ids) > seq_len + 1 for e in exs),
                     sum(len(e.ids) <= seq_len + 1 and not any(e.mask) for e in exs))
    if not kept:
        return result
    width = max(len(e.ids) for e in kept)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(kept), width, dtype=torch.bool)
    for r, e in enumerate(kept):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        mask[r, : len(e.ids)] = torch.tensor(e.mask, dtype=torch.bool)
    result.data = PackedData(ids, mask, seed)
    return result


def build(convs: list[Conversation], tokenizer: Tokenizer, seq_len: int, seed: int, off_share: float = 0.0,
          budget_share: float = 0.0) -> SFTRows:
    """Conversations -> rows in their drawn modes (`examples` then `rows`)."""
    return rows(examples(convs, tokenizer, seed, off_share, budget_share), seq_len, tokenizer.pad_id, seed)
