"""The OpenAI wire format: request bodies checked field by field, errors in OpenAI's shape (docs/serving.md §2, §4).

    params = parse_chat(body, served, limits)    # -> ChatParams, or raises APIError(400, ..., param="top_p")

Every field the server reads is checked for its JSON type and range before any work, naming it as OpenAI does
(`messages[2].content`); the body first (`decode_body`: JSON, an object, nested at most MAX_DEPTH levels, no lone
UTF-16 surrogate). Unknown fields are ignored; known ones the server cannot honour are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from nemotron3.engine.params import LOGPROBS_MODES, SamplingParams, is_int, is_number

MAX_STOP = 4  # OpenAI's limit on `stop` strings
MAX_TOP_LOGPROBS = 20  # chat; the legacy completions API allows 5
MAX_DEPTH = 64  # arrays and objects nested in a body at most (a request, tool schemas and arguments need a few)


class APIError(Exception):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = "invalid_value") -> APIError:
    """A 400 about one field."""
    return APIError(400, f"{param}: {message}", "invalid_request_error", param, code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the server's flags, docs/serving.md §4)."""

    max_prompt_tokens: int
    max_tokens: int  # the most a request may ask for (max_tokens / max_completion_tokens)
    max_n: int
    context: int  # prompt + new tokens one cache slot holds


@dataclass
class Body:
    """The fields common to both endpoints, checked; the sampling ones as the SamplingParams passed down (its
    max_tokens None: as many as fit, up to Limits.max_tokens; its logprobs the model's own, `raw`)."""

    model: str
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatParams(Body):
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    parse_tools: bool = False  # tool_choice "auto" with tools: calls are parsed out of the reply
    enable_thinking: bool = True


@dataclass
class CompletionParams(Body):
    prompts: list[str | list[int]] = field(default_factory=list)  # one text or one token-id list each
    echo: bool = False


# ----------------------------------------------------------------------------------------- JSON types
def _int(body: dict, name: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not is_int(v):
        raise bad(name, f"expected an integer, got {_json_type(v)}", "invalid_type")
    if lo is not None and v < lo:
        raise bad(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}, got {v}")
    return v


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not is_number(v):
        raise bad(name, f"expected a number, got {_json_type(v)}", "invalid_type")
    if v < lo or (lo_open and v == lo) or v > hi:
        raise bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return float(v)


def _bool(body: dict, name: str, default: bool, where: str | None = None) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(where or name, f"expected true or false, got {_json_type(v)}", "invalid_type")
    return v


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    if isinstance(v, str):
        return f"a string ({v[:40]!r})"
    return "an array" if isinstance(v, list) else "an object"


def _zero_only(body: dict, name: str) -> None:
    v = body.get(name)
    if v is None:
        return
    if not is_number(v):
        raise bad(name, f"expected a number, got {_json_type(v)}", "invalid_type")
    if v != 0:
        raise bad(name, "is not supported by this server (only 0)", "unsupported_value")


# ----------------------------------------------------------------------------------------- the body
def expect_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    return body


def decode_body(data: bytes) -> dict:
    """A request body's bytes -> its JSON object, every string in it text and its nesting bounded; else APIError
    400 (naming the field where there is one)."""
    try:
        body = json.loads(data)
    except RecursionError:  # deeper than the parser's own recursion limit, which is far beyond MAX_DEPTH
        raise APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep (arrays and objects)",
                       code="invalid_json") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer of more digits than Python converts
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    body = expect_object(body)
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """Walk the body (without recursion): no container deeper than MAX_DEPTH, no string or key that is not text."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            top = re.match(r"[^.\[]*", path)[0]
            raise bad(top, f"nested more than {MAX_DEPTH} levels deep (arrays and objects, counting the body)")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, v in items:
            if isinstance(key, str) and not _is_text(key):
                if not path:
                    raise APIError(400, f"a key of the request body holds {_surrogate(key)}", code="invalid_value")
                raise bad(path, f"a key holds {_surrogate(key)}")
            if isinstance(v, str):
                if not _is_text(v):
                    raise bad(_where(path, key), f"holds {_surrogate(v)}")
            elif isinstance(v, (dict, list)):
                stack.append((v, _where(path, key), depth + 1))


def _where(path: str, key: str | int) -> str:
    """OpenAI's name for a field: `messages[2].content`."""
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key


def _is_text(s: str) -> bool:
    """Whether `s` is Unicode text, i.e. holds no lone UTF-16 surrogate (what JSON's \\ud800 escape gives)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate(s: str) -> str:
    i = next(i for i, c in enumerate(s) if 0xD800 <= ord(c) <= 0xDFFF)
    return f"a lone UTF-16 surrogate (\\u{ord(s[i]):04x} at character {i}), which is not text"


# ----------------------------------------------------------------------------------------- requests

def _body(body: dict, served: str, limits: Limits, cls: type, thinking: int | None = None, **extra: Any) -> Any:
    model = body.get("model")
    if model is None:
        raise bad("model", "is required (the served model is " + repr(served) + ")", "missing_required_parameter")
    if not isinstance(model, str):
        raise bad("model", f"expected a string, got {_json_type(model)}", "invalid_type")
    if model != served:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{served}`.",
                       "invalid_request_error", "model", "model_not_found")
    max_tokens = _int(body, "max_completion_tokens", None, 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1, limits.max_tokens)
    for name in ("presence_penalty", "frequency_penalty"):
        _zero_only(body, name)
    if body.get("logit_bias"):
        raise bad("logit_bias", "is not supported by this server", "unsupported_value")
    top_k = _int(body, "top_k", 0, -1)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", f"expected a string or an array of strings, got {_json_type(stop)}", "invalid_type")
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise bad("stop", f"at most {MAX_STOP} non-empty strings")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options", f"expected an object, got {_json_type(options)}", "invalid_type")
        if not stream:
            raise bad("stream_options", "is only allowed with stream: true")
        include_usage = _bool(options, "include_usage", False, "stream_options.include_usage")
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    mode = body.get("logprobs_mode", "raw")
    if mode not in LOGPROBS_MODES:
        raise bad("logprobs_mode", f"expected one of {', '.join(LOGPROBS_MODES)}, got {_json_type(mode)}")
    params = SamplingParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), top_k=max(top_k, 0),
                            n=_int(body, "n", 1, 1, limits.max_n), seed=seed,
                            max_thinking_tokens=thinking, logprobs_mode=mode)
    return cls(model=model, params=params, stop=stop, stream=stream, include_usage=include_usage, **extra)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty array of messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"expected an object, got {_json_type(m)}", "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{where}.role", f"expected one of system, developer, user, assistant, tool, got "
                      f"{_json_type(role)}")
        m = dict(m, role="system" if role == "developer" else role)
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, concatenated
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are "
                              "supported", "unsupported_value")
                texts.append(part["text"])
            m["content"] = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise bad(f"{where}.content", f"expected a string or an array of text parts, got {_json_type(content)}",
                      "invalid_type")
        if role == "assistant" and m.get("tool_calls") is not None:
            calls = m["tool_calls"]
            if not isinstance(calls, list):
                raise bad(f"{where}.tool_calls", f"expected an array, got {_json_type(calls)}", "invalid_type")
        elif role != "tool" and m.get("content") is None:
            raise bad(f"{where}.content", "is required", "missing_required_parameter")
        out.append(m)
    return out


def _tools(body: dict) -> tuple[list[dict] | None, bool]:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", f"expected an array, got {_json_type(tools)}", "invalid_type")
        for i, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
                raise bad(f"tools[{i}]", 'expected {"type": "function", "function": {...}}', "invalid_type")
            if not isinstance(fn.get("name"), str) or not fn["name"]:
                raise bad(f"tools[{i}].function.name", "is required (a non-empty string)", "missing_required_parameter")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise bad(f"tools[{i}].function.parameters", "expected a JSON Schema object", "invalid_type")
            if params is not None and params.get("properties") is not None and not isinstance(params["properties"],
                                                                                               dict):
                raise bad(f"tools[{i}].function.parameters.properties", "expected an object (JSON Schema), got "
                          f"{_json_type(params['properties'])}", "invalid_type")
        tools = tools or None
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice not in ("auto", "none"):
        if choice == "required" or isinstance(choice, dict):
            raise bad("tool_choice", "only \"auto\" and \"none\" are supported (no constrained decoding)",
                      "unsupported_value")
        raise bad("tool_choice", f"expected \"auto\" or \"none\", got {_json_type(choice)}")
    if choice == "none":
        return None, False
    return tools, tools is not None


def parse_chat(body: Any, served: str, limits: Limits) -> ChatParams:
    """Check a `/v1/chat/completions` body; raises APIError naming the first wrong field."""
    body = expect_object(body)
    messages = _messages(body)
    tools, parse_tools = _tools(body)
    kwargs = body.get("chat_template_kwargs")
    enable_thinking = True
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", f"expected an object, got {_json_type(kwargs)}", "invalid_type")
        enable_thinking = _bool(kwargs, "enable_thinking", True, "chat_template_kwargs.enable_thinking")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad("response_format", "only {\"type\": \"text\"} is supported", "unsupported_value")
    parsed = _body(body, served, limits, ChatParams, _int(body, "max_thinking_tokens", None, 0, limits.context),
                   messages=messages, tools=tools, parse_tools=parse_tools, enable_thinking=enable_thinking)
    if _bool(body, "logprobs", False):
        parsed.params = replace(parsed.params, logprobs=_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS))
    elif body.get("top_logprobs") is not None:
        _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        raise bad("top_logprobs", "needs logprobs: true")
    return parsed


def parse_completion(body: Any, served: str, limits: Limits) -> CompletionParams:
    """Check a `/v1/completions` body; raises APIError naming the first wrong field."""
    body = expect_object(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "is required", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(is_int(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "expected a string, an array of strings, an array of token ids or an array of such "
                  "arrays (none empty)", "invalid_type")
    if any(isinstance(p, str) and not p for p in prompts):
        raise bad("prompt", "is empty")
    if body.get("suffix"):
        raise bad("suffix", "is not supported by this server", "unsupported_value")
    n = _int(body, "n", 1, 1, limits.max_n)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise bad("best_of", "is not supported by this server (only best_of = n)", "unsupported_value")
    if len(prompts) * n > limits.max_n:
        raise bad("prompt", f"{len(prompts)} prompts × n = {n} is more than the {limits.max_n} choices a request "
                  "may ask for")
    parsed = _body(body, served, limits, CompletionParams, prompts=prompts, echo=_bool(body, "echo", False))
    parsed.params = replace(parsed.params, logprobs=_int(body, "logprobs", None, 0, 5))
    return parsed
