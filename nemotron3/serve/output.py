"""One choice's tokens -> what the client sees (docs/serving.md §2): text deltas, reasoning apart from the answer,
tool calls; and the pieces of a response built from them (finish reasons, logprobs, usage, server-sent events).

    reply = Reply(tokenizer, stop_ids, stop=["\\n\\n"], chat=True, thinking=True, tools=tools)
    deltas = reply.push(event.tokens)        # [("reasoning_content", "The user"), ...]; reply.finish() at the end

Text that could begin a stop string, `</think>` or the tool-call tag is held back until known, and both fields are
stripped as `chat.parse` strips them, so the streamed deltas concatenate to exactly the non-streamed message. Tool
calls are read in the layout of the checkpoint's template (`fmt`, the tokenizer's `ChatFormat`): `<tool_call>` XML
(ours, Nemotron 3) or `<TOOLCALL>` JSON (Nemotron Nano 2).
"""

from __future__ import annotations

import json
import uuid
from itertools import accumulate

from tokenizers import Tokenizer

from nemotron3 import chat
from nemotron3.engine.scheduler import Event
from nemotron3.engine.text import TextStream
from nemotron3.tokenizer import ChatFormat


def _partial_suffix(text: str, words: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `words`."""
    best = 0
    for w in words:
        for n in range(min(len(w) - 1, len(text)), best, -1):
            if text.endswith(w[:n]):
                best = n
                break
    return best


class Reply:
    """The text of one choice, as it grows; see the module docstring."""

    def __init__(self, tok: Tokenizer, stop_ids: frozenset[int] | set[int], stop: list[str] | None = None,
                 chat: bool = False, thinking: bool = False, tools: list[dict] | None = None,
                 fmt: ChatFormat | None = None) -> None:
        self.stream = TextStream(tok, skip_special_tokens=not chat)
        self.fmt = fmt or ChatFormat()
        self.stop_ids = stop_ids
        self.stop = list(stop or [])
        self.chat, self.thinking, self.tools = chat, thinking, tools
        self.raw = ""
        self.stopped = False  # a stop string ended the text
        self.finished = False
        self.sent = {"reasoning_content": "", "content": ""}
        self.tokens: list[int] = []
        self._message: dict | None = None

    # ------------------------------------------------------------------ growing
    def push(self, tokens: list[int]) -> list[tuple[str, str]]:
        """Add the tokens of one event; returns the new (field, text) deltas, field "content" or
        "reasoning_content" (a completion's text is "content")."""
        if self.stopped:
            return []
        self.tokens += tokens
        for t in tokens:
            if t not in self.stop_ids:
                self.raw += self.stream.push(t)
        self._apply_stop()
        return self._deltas(final=self.stopped)

    def finish(self) -> list[tuple[str, str]]:
        """The deltas still held back, once the choice has ended."""
        if not self.stopped:
            self.raw += self.stream.flush()
            self._apply_stop()
        self.finished = True
        return self._deltas(final=True)

    def _apply_stop(self) -> None:
        hits = [i for i in (self.raw.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.raw, self.stopped = self.raw[: min(hits)], True

    # ------------------------------------------------------------------ splitting
    def _parts(self, final: bool) -> tuple[str | None, str]:
        """(reasoning, content) visible now, stripped as in the final message; None: no reasoning."""
        raw = self.raw
        if not final:
            raw = raw[: len(raw) - _partial_suffix(raw, self.stop)]
        if not self.chat:
            return None, raw
        reasoning, content = None, raw
        if self.thinking:
            if chat.THINK_END in raw:
                reasoning, content = raw.split(chat.THINK_END, 1)
                reasoning = reasoning.strip()
            else:
                reasoning, content = raw, ""
                if not final:
                    reasoning = reasoning[: len(reasoning) - _partial_suffix(reasoning, [chat.THINK_END])]
                reasoning = reasoning.strip() if final else reasoning.lstrip().rstrip(" \t\r\n")
        content = content.lstrip()
        tool_open = self.fmt.tool_open
        if self.tools is not None and tool_open in content:
            content = content[: content.index(tool_open)]
        elif self.tools is not None and not final:
            content = content[: len(content) - _partial_suffix(content, [tool_open])]
        content = content.rstrip() if not final or self.tools is not None else content.strip()
        return reasoning, content

    def _deltas(self, final: bool) -> list[tuple[str, str]]:
        reasoning, content = self._parts(final)
        if final and self.chat:
            message = self.message()
            reasoning, content = message.get("reasoning_content"), message["content"] or ""
        out = []
        for name, now in (("reasoning_content", reasoning), ("content", content)):
            if now is None:
                continue
            sent = self.sent[name]
            if now.startswith(sent) and len(now) > len(sent):
                out.append((name, now[len(sent):]))
                self.sent[name] = now
        return out

    # ------------------------------------------------------------------ the whole reply
    def message(self) -> dict:
        """The assistant message (chat) once finished: role, content, reasoning_content, tool_calls."""
        if self._message is not None:
            return self._message
        reasoning, content = self._parts(final=True)
        calls: list[dict] = []
        if self.tools is not None:
            raw_content = self.raw.split(chat.THINK_END, 1)[1] if self.thinking and chat.THINK_END in self.raw \
                else ("" if self.thinking else self.raw)
            try:
                parsed = self.fmt.parse(raw_content, self.tools)
                calls, content = parsed["tool_calls"], parsed["content"]
            except ValueError:  # an unreadable tool call (XML or JSON): the text stays content
                content = raw_content.strip()
        message = {"role": "assistant", "content": content if content or not calls else None,
                   "reasoning_content": reasoning}
        if calls:
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                      "function": {"name": c["name"],
                                                   "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                                     for c in calls]
        if self.finished:
            self._message = message
        return message

    @property
    def text(self) -> str:
        """A completion's text (everything, stop strings cut)."""
        return self._parts(final=True)[1]


# ----------------------------------------------------------------------------------------- response pieces
def finish_reason(ev: Event, reply: Reply) -> str:
    """OpenAI's finish_reason of a choice's last event."""
    if ev.finish == "stop" and reply.chat and reply.message().get("tool_calls"):
        return "tool_calls"
    return {"stop": "stop", "length": "length"}.get(ev.finish, "abort" if ev.finish == "cancelled" else "error")


def _token_text(tok: Tokenizer, t: int) -> str:
    return tok.decode([t], skip_special_tokens=False)


def chat_logprobs(tok: Tokenizer, ev: Event) -> list[dict]:
    """The chat API's `logprobs.content` items of one event's tokens."""
    out = []
    for t, lp, alts in zip(ev.tokens, ev.logprobs or [], ev.top_logprobs or []):
        s = _token_text(tok, t)
        out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (a := _token_text(tok, i)), "logprob": v, "bytes": list(a.encode())}
                                     for i, v in alts]})
    return out


def completion_logprobs(tok: Tokenizer, events: list[Event]) -> dict:
    """The legacy completions API's `logprobs` object of some events' tokens."""
    tokens, own, top = [], [], []
    for ev in events:
        for t, lp, alts in zip(ev.tokens, ev.logprobs or [], ev.top_logprobs or []):
            tokens.append(_token_text(tok, t))
            own.append(lp)
            top.append({_token_text(tok, i): v for i, v in alts})
    offsets = list(accumulate(map(len, tokens), initial=0))[:-1]
    return {"tokens": tokens, "token_logprobs": own, "top_logprobs": top, "text_offset": offsets}


def usage(prompt_tokens: int, replies: list[Reply]) -> dict:
    completion = sum(len(r.tokens) for r in replies)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(obj: dict | str) -> bytes:
    """One server-sent event: `data: JSON` (or a bare string: `[DONE]`)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()
