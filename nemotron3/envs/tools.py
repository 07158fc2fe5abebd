"""Tools: Python functions a model may call, their JSON schemas, and running one call without ever crashing.

    schema = get_json_schema(lookup)          # transformers' layout: {"type": "function", "function": {...}}
    result = call_tool(lookup, {"key": "p4"}, timeout=1.0)   # ToolResult(content, error): never raises

`get_json_schema` builds the schema the chat template renders into the system turn from the function's signature
(type hints) and its Google-style docstring (the description, then an `Args:` block with one `name: text` line per
parameter, an optional `(choices: [...])` at the end of a line becoming an `enum`, and an optional `Returns:`
block), as `transformers.utils.get_json_schema` does: tests/envs/test_tools.py compares the two on the same
functions. transformers is not a core dependency, so this is a small copy of its rules.

`call_tool` runs a call with a time limit and turns every failure into a tool message the model reads (the
episode goes on). The messages, one per kind of failure (`TOOL_ERRORS`), are documented in docs/agentic-rl.md §3:

    malformed      the tool-call XML does not parse               (raised by the environment, see ToolEnv)
    unknown_tool   no tool of that name
    bad_arguments  missing, unexpected or mistyped arguments (checked against the signature and the schema)
    exception      the tool raised
    timeout        the tool ran past its time limit (its thread is abandoned, a daemon: Python cannot kill it)
    non_string     the tool returned something other than a string
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

TOOL_ERRORS = ("malformed", "unknown_tool", "bad_arguments", "exception", "timeout", "non_string")
MODEL_ERRORS = ("malformed", "unknown_tool", "bad_arguments")  # the model's fault: the call is invalid

_DESCRIPTION = re.compile(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", re.S)
_ARGS = re.compile(r"\n\s*Args:\n(.*?)[\n\s]*(Returns:|Raises:|\Z)", re.S)
_ARG = re.compile(r"(?:^|\n)([ \t]*)(\w+):\s*(.*?)\s*(?=\n(?!\1[ \t])[ \t]*\w+:|\Z)", re.S)
_RETURNS = re.compile(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", re.S)
_CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.I)
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
_BASIC = {**{t: {"type": n} for t, n in _SCALARS.items()}, list: {"type": "array"}, tuple: {"type": "array"},
          dict: {"type": "object"}, Any: {}}


def _enum(values: list) -> dict:
    kinds = list(dict.fromkeys(_SCALARS[type(v)] for v in values))
    return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": values}


def _type_schema(hint: Any) -> dict:
    """A type hint as JSON schema (transformers' `_parse_type_hint` rules); ValueError for one it cannot write."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum([m.value for m in hint])
    if origin is None:
        if hint not in _BASIC:
            raise ValueError(f"cannot write the type hint {hint!r} as JSON schema (use int, float, str, bool, "
                             "list, tuple, dict, Literal, Enum or unions of them)")
        return dict(_BASIC[hint])
    if origin is Union or origin is types.UnionType:
        subs = [_type_schema(t) for t in args if t is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subs):
            names = sorted({s["type"] for s in subs})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is Literal:
        return _enum(list(args))
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if len(args) == 1 or ... in args:
            raise ValueError(f"cannot write {hint!r} as JSON schema: use list[...] for a variable length")
        return {"type": "array", "prefixItems": [_type_schema(t) for t in args]} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": _type_schema(args[1])} if len(args) == 2 else {})}
    raise ValueError(f"cannot write the type hint {hint!r} as JSON schema")


def get_json_schema(func: Callable) -> dict:
    """`{"type": "function", "function": {"name", "description", "parameters", ["return"]}}` from the function's
    signature and docstring (module docstring). ValueError naming the function for a parameter without a type hint
    or without a line in `Args:`, or without a docstring."""
    name = getattr(func, "__name__", "operation")
    doc = (inspect.getdoc(func) or "").strip()
    if not doc:
        raise ValueError(f"tool {name}: no docstring to describe it")
    hints, sig = get_type_hints(func), inspect.signature(func)
    params = [p for i, p in enumerate(sig.parameters.values())
              if not (i == 0 and p.name in ("self", "cls") and p.annotation is inspect.Parameter.empty)]
    for p in params:
        if p.annotation is inspect.Parameter.empty:
            raise ValueError(f"tool {name}: argument {p.name} has no type hint")
    properties = {p.name: _type_schema(hints[p.name]) for p in params}
    m = _ARGS.search(doc)
    arg_lines = "\n".join(line for line in m.group(1).split("\n") if line.strip()) if m else ""
    described = {a[1]: re.sub(r"\s*\n+\s*", " ", a[2].strip()) for a in _ARG.findall(arg_lines)}
    for arg, schema in properties.items():
        if arg not in described:
            raise ValueError(f"tool {name}: the docstring's Args: block does not describe {arg!r}")
        desc = described[arg]
        choices = _CHOICES.search(desc)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            desc = desc[: choices.start()].strip()
        schema["description"] = desc
    parameters = {"type": "object", "properties": properties}
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    if required:
        parameters["required"] = required
    d = _DESCRIPTION.search(doc)
    out = {"name": name, "description": d.group(1).strip() if d else None, "parameters": parameters}
    if "return" in hints:
        try:
            ret = _type_schema(hints["return"])
        except ValueError:  # the model never writes the return value: leave it out rather than describe it wrongly
            ret = None
        if ret is not None:
            r = _RETURNS.search(doc)
            if r:
                ret["description"] = r.group(1).strip()
            out["return"] = ret
    return {"type": "function", "function": out}


# ----------------------------------------------------------------------------------------- calling
@dataclass
class ToolResult:
    content: str  # what the model reads in the tool turn
    error: str | None = None  # one of TOOL_ERRORS, None when the call succeeded


def tool_error(kind: str, name: str, detail: str = "", timeout: float = 0.0) -> ToolResult:
    """The documented message of one failure (docs/agentic-rl.md §3)."""
    text = {
        "malformed": f"error: malformed tool call ({detail})",
        "unknown_tool": f"error: unknown tool {name!r}; the tools are {detail}",
        "bad_arguments": f"error: bad arguments for {name}: {detail}",
        "exception": f"error: {name} raised {detail}",
        "timeout": f"error: {name} did not finish within {timeout:g} s",
        "non_string": f"error: {name} returned {detail}, not a string",
    }[kind]
    return ToolResult(text, kind)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value),
                                                                                                  type(value).__name__)


def _fits(value: Any, schema: dict) -> bool:
    """Whether a JSON value has the schema's type (and is one of its enum values); unknown keywords pass."""
    if value is None and schema.get("nullable"):
        return True
    if "anyOf" in schema:
        return any(_fits(value, s) for s in schema["anyOf"])
    if "enum" in schema and value not in schema["enum"]:
        return False
    kinds = schema.get("type")
    if kinds is None:
        return True
    kinds = [kinds] if isinstance(kinds, str) else kinds
    got = _json_type(value)
    return got in kinds or (got == "integer" and "number" in kinds)


def check_arguments(func: Callable, schema: dict, args: Any) -> str | None:
    """None when `args` bind to `func`'s signature with the types its schema declares, else what is wrong."""
    if not isinstance(args, dict):
        return f"arguments must be an object, got {_json_type(args)}"
    try:
        inspect.signature(func).bind(**args)
    except TypeError as e:
        return str(e)
    props = schema.get("function", schema).get("parameters", {}).get("properties", {})
    for key, value in args.items():
        if key in props and not _fits(value, props[key]):
            want = props[key].get("type", "one of " + str(props[key].get("enum")))
            return f"argument {key!r} must be {want}, got {_json_type(value)} {json.dumps(value)[:40]}"
    return None


def call_tool(func: Callable, args: dict, timeout: float = 5.0, name: str | None = None) -> ToolResult:
    """Run `func(**args)` on a daemon thread for at most `timeout` seconds; every failure becomes a ToolResult with
    its documented message. The arguments are assumed checked (`check_arguments`)."""
    name = name or getattr(func, "__name__", "tool")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func(**args)
        except BaseException as e:  # anything a tool raises (SystemExit too) is a message to the model
            box["error"] = e

    thread = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return tool_error("timeout", name, timeout=timeout)
    if "error" in box:
        e = box["error"]
        return tool_error("exception", name, f"{type(e).__name__}: {e}"[:200])
    value = box.get("value")
    if not isinstance(value, str):
        return tool_error("non_string", name, type(value).__name__)
    return ToolResult(value)
