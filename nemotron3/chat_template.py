"""A checkpoint's own chat template (Jinja), rendered exactly as transformers' `apply_chat_template` renders it.

    source, origin = read_template(folder, tokenizer_config)       # chat_template.jinja, else tokenizer_config.json
    template = compile_template(source, origin)                     # ValueError "FILE:LINE: ..." for a syntax error
    text = render_template(template, messages, tools=None, add_generation_prompt=True, enable_thinking=False)

**Where the template is.** As transformers reads a folder: `chat_template.jinja` when the folder has one, else the
`chat_template` entry of `tokenizer_config.json` (a string, or a list of `{"name", "template"}` of which the one
named `default`, or `tool_use` when tools are given, is used).

**The environment** is transformers' (`utils/chat_template_utils.py`, `_compile_jinja_template`): jinja2's
`ImmutableSandboxedEnvironment` with `trim_blocks` and `lstrip_blocks` (a block tag's own line break and leading
indentation vanish), the `loopcontrols` extension, a `{% generation %}` block that writes its body, the `tojson`
filter as `json.dumps(x, ensure_ascii=False, ...)` (Jinja's own escapes HTML), and the globals `raise_exception`,
`strftime_now`, `dict` and `namespace` (which refuses `_`-prefixed attributes).

**The variables** are transformers': `messages` with every None-valued key dropped and the reasoning copied into
`reasoning_content` and `thinking` from whichever of `reasoning_content`, `thinking`, `reasoning` is set; `tools`
(None when not given), `documents` (None), `add_generation_prompt`, the tokenizer's special tokens by name
(`bos_token`, `eos_token`, ...) and the caller's keyword arguments (`enable_thinking`, ...), which win over them.

Only jinja2 is imported: nemotron3/tokenizer.py puts this and the chat format (chat.py) together.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
END_OF_TURN_MARKERS = ("<|im_end|>", "<SPECIAL_12>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' `_REASONING_FIELDS`


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers marks assistant text with it; it writes its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace without `_`-prefixed attributes (transformers' `TemplateNamespace`)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the namespace attribute {name!r}")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` in a template, and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers compiles chat templates in (see the module docstring)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


@lru_cache(maxsize=16)
def compile_template(source: str, origin: str = "chat_template") -> jinja2.Template:
    """The compiled template; ValueError `ORIGIN:LINE: chat template syntax error: ...` when it does not parse."""
    try:
        return environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{origin}:{e.lineno}: chat template syntax error: {e.message}") from None


def _named(templates: Any, origin: str) -> dict[str, str]:
    """tokenizer_config.json's `chat_template` as {name: source}: a string is the `default`."""
    if isinstance(templates, str):
        return {"default": templates}
    if isinstance(templates, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("template"), str) for t in templates):
        return {t["name"]: t["template"] for t in templates}
    raise ValueError(f"{origin}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects")


def read_templates(folder: Path | str, config: dict) -> tuple[dict[str, str], str] | None:
    """({name: source}, the file they come from) for a folder, as transformers reads it; None without a template.
    `config` is the folder's parsed tokenizer_config.json ({} when it has none)."""
    path = Path(folder) / TEMPLATE_FILE
    if path.is_file():
        try:
            return {"default": path.read_text(encoding="utf-8")}, str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the chat template: {e}") from None
    if config.get("chat_template") is None:
        return None
    origin = str(Path(folder) / CONFIG_FILE)
    return _named(config["chat_template"], origin), origin


def pick(templates: dict[str, str], origin: str, tools: list | None = None) -> str:
    """transformers' `get_chat_template`: `tool_use` when tools are given and there is one, else `default`."""
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ValueError(f"{origin}: several chat templates ({', '.join(sorted(templates))}) and none named default")


def template_messages(messages: list) -> list[dict]:
    """The messages as a template sees them: None-valued keys dropped, the reasoning under both names."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i}: expected an object, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def render_template(template: jinja2.Template, messages: list, tools: list | None = None,
                    add_generation_prompt: bool = False, special_tokens: dict[str, str] | None = None,
                    origin: str = "chat_template", **kwargs: Any) -> str:
    """The text transformers' `apply_chat_template(..., tokenize=False)` gives; ValueError naming `origin` for
    what the template refuses (its `raise_exception`) or cannot read."""
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return template.render(messages=template_messages(messages), tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template ({origin}) refuses the conversation: {e}") from None
    except (TypeError, AttributeError, KeyError, IndexError) as e:
        raise ValueError(f"the chat template ({origin}) cannot render the conversation: {e}") from None
