"""The tokenizer: a byte-level BPE trained with the `tokenizers` library, with the chat template's special tokens.

Byte-level means any string round-trips (every byte has a token, no `<unk>` is ever produced). Before the
BPE merges, numbers are split into single digits (as Llama and DeepSeek do): arithmetic stays learnable for
a small model because every number is spelled with the same ten tokens, whatever merges the corpus favours.

**Long words.** The BPE trainer's cost grows with the square of a pre-tokenized word's length: one 8 MiB line
without whitespace is one word of 8 M symbols, and training on it takes minutes (a merge rewrites the whole
word, thousands of times). No merge that long is ever useful, so `train` feeds the trainer every text cut
before any run of non-whitespace (or of whitespace) longer than MAX_WORD_CHARS characters, at every
MAX_WORD_CHARS characters of the run (`capped`): the byte-level pre-tokenizer's words stay within that run, so
no word the trainer sees is longer than MAX_WORD_CHARS + 1 characters (a leading space), at most 4 bytes each.
Texts without such a run are fed whole; nothing is dropped (the pieces concatenate back to the texts). Encoding
is not affected: a long word encodes quickly, with the merges learned from its pieces.

Special tokens: `train` puts SPECIAL_TOKENS first, in this order (`pad`/`bos`/`eos` = 0/1/2, the `ModelConfig`
defaults):

    <unk> <s> </s>                           padding, begin / end of document
    <|im_start|> <|im_end|>                  a chat turn: `<|im_start|>{role}\\n{content}<|im_end|>\\n`
    <think> </think>                         the reasoning block
    <tool_call> </tool_call>                 a tool call: `<tool_call><function=NAME><parameter=K>v</parameter>...`
    <tool_response> </tool_response>         a tool result, inside a `tool` (or `user`) turn

but no id is assumed anywhere: a `Tokenizer` reads every special id from its vocabulary (`bos_id`, `eos_id`,
`pad_id` by the names tokenizer_config.json gives, else `<s>`, `</s>`, `<unk>`; `end_of_turn_id` by the marker
its chat template writes; `think_start_id` / `think_end_id`), so a foreign tokenizer whose tokens sit elsewhere
(a real Nemotron 3 checkpoint's) gets the same behaviour.

**A checkpoint folder** (`Tokenizer.from_folder`): `tokenizer.json`, `tokenizer_config.json` and the chat template
as transformers finds it (`chat_template.jinja`, else tokenizer_config.json's `chat_template`; nemotron3/
chat_template.py). The folder's template renders every prompt (`render`, `apply_chat_template`, `segments`) and
decides how output is read (`parse`, `ChatFormat`); ours (`chat.CHAT_TEMPLATE`, rendered by `chat.render`, the
same bytes) is the default for a folder without one and is what `save` writes for a tokenizer trained here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from nemotron3 import chat, chat_template
from nemotron3.chat import CHAT_TEMPLATE

SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>",
    "<think>", "</think>",
    "<tool_call>", "</tool_call>",
    "<tool_response>", "</tool_response>",
)


MAX_WORD_CHARS = 256  # longest run the trainer sees; real words are far shorter, longer runs are blobs (base64, hashes)
_LONG_RUN = re.compile(rf"\S{{{MAX_WORD_CHARS + 1},}}|\s{{{MAX_WORD_CHARS + 1},}}")


def capped(texts: Iterable[str], cap: int = MAX_WORD_CHARS) -> Iterator[str]:
    """Each text, or, when it holds a run of non-whitespace or of whitespace longer than `cap` characters, its
    pieces cut at every `cap` characters of each such run (see the module docstring, *Long words*)."""
    long_run = _LONG_RUN if cap == MAX_WORD_CHARS else re.compile(rf"\S{{{cap + 1},}}|\s{{{cap + 1},}}")
    for text in texts:
        start = 0
        for m in long_run.finditer(text):
            for cut in range(m.start() + cap, m.end(), cap):
                yield text[start:cut]
                start = cut
        yield text[start:]


OWN_TEMPLATE_ORIGIN = "nemotron3.chat.CHAT_TEMPLATE"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_DEFAULT_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}


def not_utf8(text: str) -> str | None:
    """Why `text` is not UTF-8 text, or None when it is: the first lone surrogate, as the byte it stands for
    ('\\udcff', what Python's surrogateescape makes of the byte 0xff) or as a UTF-16 surrogate ('\\ud800')."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        i, ch = e.start, text[e.start]
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return (f"is not UTF-8 text: byte 0x{ord(ch) - 0xDC00:02x} at character {i + 1} is not part of a UTF-8 "
                "character; give the text in UTF-8")
    return f"is not UTF-8 text: a lone UTF-16 surrogate U+{ord(ch):04X} at character {i + 1}"


_TOOLCALL = re.compile(r"<TOOLCALL>(.*?)</TOOLCALL>", re.S)


def _json_calls(body: str) -> list[dict]:
    """Nemotron Nano 2's `[{"name": ..., "arguments": {...} or "json"}]` -> [{"name", "arguments": dict}]."""
    try:
        calls = json.loads(body)
    except json.JSONDecodeError:
        raise ValueError(f"invalid tool call: <TOOLCALL> holds no JSON: {body.strip()[:80]!r}") from None
    out = []
    for c in calls if isinstance(calls, list) else [calls]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise ValueError(f"invalid tool call: expected {{\"name\", \"arguments\"}}, got {json.dumps(c)[:80]}")
        args = c.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise ValueError(f"invalid tool call {c['name']}: arguments are not JSON: {args[:80]!r}") from None
        out.append({"name": c["name"], "arguments": args})
    return out


@dataclass(frozen=True)
class ChatFormat:
    """What a template writes that a reader of the model's output needs: its end-of-turn marker (the first of
    `chat_template.END_OF_TURN_MARKERS` in its text: `<|im_end|>` for ours and Nemotron 3, `<SPECIAL_12>` for
    Nemotron Nano 2) and its tool-call layout: `xml` (Qwen3-Coder's, ours and Nemotron 3's, read by `chat.parse`)
    or `json` (Nano 2's `<TOOLCALL>[{"name", "arguments"}]</TOOLCALL>`). Reasoning is `<think>`...`</think>` in
    every template known here."""

    end_of_turn: str = chat.TURN_END
    tool_calls: str = "xml"

    @property
    def tool_open(self) -> str:
        """The tag that opens a tool call in this layout (a streaming reader holds content back from it)."""
        return "<tool_call>" if self.tool_calls == "xml" else "<TOOLCALL>"

    @classmethod
    def of(cls, source: str) -> ChatFormat:
        end = next((m for m in chat_template.END_OF_TURN_MARKERS if m in source), chat.TURN_END)
        return cls(end, "json" if "<TOOLCALL>" in source and "<tool_call>" not in source else "xml")

    def parse(self, text: str, tools: list[dict] | None = None) -> dict:
        """An assistant turn's text -> {"content", "reasoning_content", "tool_calls"} (as `chat.parse`)."""
        text = text.split(self.end_of_turn, 1)[0]
        if self.tool_calls == "xml":
            return chat.parse(text, tools)
        out = chat.parse(_TOOLCALL.sub("", text), tools)
        out["tool_calls"] = [c for m in _TOOLCALL.finditer(text) for c in _json_calls(m[1])]
        return out


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its special ids, its chat template and the format of its chat output.

    `Tokenizer(tk)` is a tokenizer trained here (every SPECIAL_TOKENS entry required, our template);
    `Tokenizer.from_folder(DIR)` any checkpoint folder's (see the module docstring). `tk` is the wrapped object.
    """

    def __init__(self, tk: HFTokenizer, config: dict | None = None, templates: dict[str, str] | None = None,
                 origin: str = OWN_TEMPLATE_ORIGIN) -> None:
        if config is None:
            missing = [t for t in SPECIAL_TOKENS if tk.token_to_id(t) is None]
            if missing:
                raise ValueError(f"tokenizer lacks the special tokens {missing} (expected all of "
                                 f"{list(SPECIAL_TOKENS)})")
        self.tk = tk
        self.config = config
        self.templates = dict(templates or {"default": CHAT_TEMPLATE})
        self.origin = origin
        for source in self.templates.values():
            chat_template.compile_template(source, origin)  # a syntax error is an error now, naming the file
        self.template = chat_template.pick(self.templates, origin) if "default" in self.templates \
            else next(iter(self.templates.values()))
        self.format = ChatFormat.of(self.template)
        names = {k: _token_name(config.get(k)) if config is not None and k in config else _DEFAULT_NAMES.get(k)
                 for k in _SPECIAL_NAMES}
        self.special_tokens = {k: v for k, v in names.items() if v is not None}  # transformers' special_tokens_map
        self.pad_id = self._id(names["pad_token"] or names["unk_token"])
        self.bos_id = self._id(names["bos_token"])
        self.eos_id = self._id(names["eos_token"])
        self.end_of_turn_id = self._id(self.format.end_of_turn)
        self.think_start_id = self._id(chat.THINK_START)
        self.think_end_id = self._id(chat.THINK_END)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tk.token_to_id(token)

    # ----------------------------------------------------------------- build / load / save
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Learn up to `vocab_size` tokens (bytes + specials + merges) from `texts`, no word longer than
        MAX_WORD_CHARS (`capped`); deterministic."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size {vocab_size} is below 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tk.train_from_iterator(capped(texts), trainer=trainer)
        return cls(tk)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, missing_ok: bool = False) -> Tokenizer | None:
        """The tokenizer of a checkpoint folder: its tokenizer.json, tokenizer_config.json (optional) and chat
        template (the folder's, else ours). No tokenizer.json: None with `missing_ok`, else FileNotFoundError.
        ValueError naming the file for an unreadable tokenizer.json or tokenizer_config.json, or a template that
        does not parse (`FILE:LINE: chat template syntax error: ...`). Stable API: `checkpoint.open` calls it."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            if missing_ok:
                return None
            raise FileNotFoundError(f"no tokenizer at {path} (expected a checkpoint folder with a tokenizer.json)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path} is not a readable tokenizer file: {e}") from None
        config: dict = {}
        config_path = folder / chat_template.CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{config_path} is not readable JSON: {e}") from None
            if not isinstance(config, dict):
                raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
        found = chat_template.read_templates(folder, config)
        templates, origin = found if found is not None else (None, OWN_TEMPLATE_ORIGIN)
        return cls(tk, config, templates, origin)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """`from_folder` of a checkpoint folder, or of the folder holding a given `tokenizer.json`."""
        p = Path(path)
        return cls.from_folder(p.parent if p.is_file() else p)

    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers' fast tokenizer reads, with the
        chat template in use (ours, `chat.CHAT_TEMPLATE`, for a tokenizer trained here), so `apply_chat_template`
        there renders as `render` does here."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(folder / "tokenizer.json"))
        if self.config is None:
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
                "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
                "clean_up_tokenization_spaces": False,
            }
        else:
            config = dict(self.config)
        named = [{"name": k, "template": v} for k, v in self.templates.items()]
        config["chat_template"] = self.templates["default"] if list(self.templates) == ["default"] else named
        (folder / chat_template.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text (e.g. `<think>`) become their single ids."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, text: str, bos_id: int | None) -> list[int]:
        """`[bos_id, *ids(text)]` as every training document and SFT conversation starts, without doubling a BOS
        the tokenizer's post-processor adds itself; no BOS when `bos_id` is None or not one of the tokenizer's
        special tokens (a foreign tokenizer's ordinary piece of text). ValueError for text that is not UTF-8
        (`not_utf8`): refused, not replaced by U+FFFD, so the model is never asked about a text nobody wrote."""
        problem = not_utf8(text)
        if problem is not None:
            raise ValueError(f"the prompt {problem}")
        ids = self.tk.encode(text).ids
        added = self.tk.get_added_tokens_decoder().get(bos_id) if bos_id is not None else None
        if added is not None and added.special and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        return ids

    def chat_stop_ids(self, eos_ids: Iterable[int] = ()) -> list[int]:
        """The ids a chat reply stops on: `eos_ids` (the model config's), the tokenizer's end of sequence and the
        end-of-turn marker of its template."""
        return sorted({*eos_ids, *(i for i in (self.eos_id, self.end_of_turn_id) if i is not None)})

    @cached_property
    def newline_ids(self) -> frozenset[int]:
        """Every id whose text holds a newline (where a thinking budget may close the reasoning)."""
        return frozenset(i for i in range(self.vocab_size) if "\n" in self.tk.decode([i], skip_special_tokens=False))

    # ----------------------------------------------------------------- chat
    @property
    def own_template(self) -> bool:
        """The template is ours: `chat.render` gives its bytes (tests/chat/test_chat.py) with better errors."""
        return self.template == CHAT_TEMPLATE and list(self.templates) == ["default"]

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False, enable_thinking: bool = True, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """transformers' `apply_chat_template` with the folder's template: the text, or with `tokenize` its ids
        (transformers' `input_ids`: no BOS added). Extra keyword arguments reach the template (e.g. Nemotron 3's
        `truncate_history_thinking`). ValueError for a conversation the template refuses."""
        if self.own_template and not kwargs:
            text = chat.render(messages, tools, enable_thinking, add_generation_prompt)
        else:
            source = chat_template.pick(self.templates, self.origin, tools)
            text = chat_template.render_template(
                chat_template.compile_template(source, self.origin), messages, tools, add_generation_prompt,
                self.special_tokens, self.origin, enable_thinking=enable_thinking, **kwargs)
        return self.encode(text) if tokenize else text

    def render(self, messages: list[dict], tools: list[dict] | None = None, enable_thinking: bool = True,
               add_generation_prompt: bool = False) -> str:
        """The conversation's text with the folder's template (`chat.render`'s signature)."""
        return self.apply_chat_template(messages, tools, add_generation_prompt, enable_thinking)

    def parse(self, text: str, tools: list[dict] | None = None) -> dict:
        """What the model wrote after the generation prompt -> {"content", "reasoning_content", "tool_calls"},
        read in the format of the template in use (`ChatFormat`)."""
        return self.format.parse(text, tools)

    def segments(self, messages: list[dict], tools: list[dict] | None = None,
                 enable_thinking: bool = True) -> list[tuple[str, bool]]:
        """The rendered conversation as pieces `(text, is_assistant)` for the SFT loss mask (`chat.segments` for
        our template). With another template, the trained pieces are the assistant turns after the last user
        message (a template may rewrite earlier ones once a later user turn exists): each from where its
        generation prompt ends (the render of the conversation before it with `add_generation_prompt`, or that
        less its `<think>` opener, when the whole render starts with it) through the first end-of-turn marker.
        ValueError naming the template when the conversation before such a turn does not render as a prefix of
        the whole (a template whose earlier text depends on later turns)."""
        if self.own_template:
            return chat.segments(messages, tools, enable_thinking)
        full = self.render(messages, tools, enable_thinking)
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        out: list[tuple[str, bool]] = []
        done = 0  # characters of `full` already in `out`
        for k, m in enumerate(messages):
            if m.get("role") != "assistant" or k <= last_user:
                continue
            before = self.render(messages[:k], tools, enable_thinking) if k else ""
            if not full.startswith(before) or len(before) < done:
                raise ValueError(f"the chat template ({self.origin}) does not render the conversation before message "
                                 f"{k} as a prefix of the whole; SFT needs a template that renders prefix by prefix")
            start = len(before)
            for on in (enable_thinking, not enable_thinking) if k else ():
                head = self.render(messages[:k], tools, on, add_generation_prompt=True)
                for h in (head, head.removesuffix(chat.THINK_START + "\n"), head.removesuffix(chat.THINK_START
                                                                                              + chat.THINK_END)):
                    if h.startswith(before) and full.startswith(h):
                        start = max(start, len(h))
            end = full.find(self.format.end_of_turn, start)
            end = len(full) if end < 0 else end + len(self.format.end_of_turn)
            out += [(full[done:start], False), (full[start:end], True)]
            done = end
        out.append((full[done:], False))
        return [(t, a) for t, a in out if t]
