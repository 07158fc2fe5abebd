"""Text in and out of the engine: a checkpoint folder's tokenizer, prompts as ids, streamed ids as text.

The engine works on token ids; the commands that talk to people (`generate`, `chat`, the server) need three
things around it, the same way each time:

- `load_tokenizer(folder)`: the folder's `tokenizer.json` (any Hugging Face `tokenizers` file), or None.
- `encode_prompt(tok, text, bos_id)`: the prompt's ids, starting with the beginning-of-document token as every
  training document and SFT conversation does (unless the tokenizer's own post-processor already put it there,
  or the tokenizer has no such special token). Text that is not UTF-8 (`not_utf8`) is refused with a
  ValueError naming the character: bytes that are not UTF-8 reach Python as lone surrogates (argv, and stdin
  read with `surrogateescape`; '\xff' -> '\udcff'), and so does a lone UTF-16 surrogate from JSON, and the
  tokenizer cannot encode either. Refused rather than replaced by U+FFFD: the model would be asked about a
  text the user did not write, and nothing would say so; the message says which byte to fix.
- `TextStream(tok)`: push the generated ids one at a time and get back the new text each one adds. Decoding
  the whole sequence each time and emitting the new suffix is what keeps byte-level BPE right: one character
  can span several tokens, so a suffix that ends in the replacement character (an unfinished UTF-8 sequence)
  is held back until the next token completes it.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(folder: Path | str) -> Tokenizer | None:
    """The folder's tokenizer.json, or None when it has none; ValueError for an unreadable one."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise ValueError(f"{path} is not a readable tokenizer file: {e}") from None


def not_utf8(text: str) -> str | None:
    """Why `text` is not UTF-8 text, or None when it is: the first lone surrogate, as the byte it stands for
    ('\udcff', what Python's surrogateescape makes of the byte 0xff) or as a UTF-16 surrogate ('\ud800')."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        i, ch = e.start, text[e.start]
    if 0xDC80 <= ord(ch) <= 0xDCFF:
        return (f"is not UTF-8 text: byte 0x{ord(ch) - 0xDC00:02x} at character {i + 1} is not part of a UTF-8 "
                "character; give the text in UTF-8")
    return f"is not UTF-8 text: a lone UTF-16 surrogate U+{ord(ch):04X} at character {i + 1}"


def encode_prompt(tok: Tokenizer, text: str, bos_id: int | None) -> list[int]:
    """`[bos_id, *ids(text)]`, without doubling a BOS the tokenizer adds itself; ValueError for text that is not
    UTF-8 (`not_utf8`).

    No BOS when `bos_id` is None or is not one of the tokenizer's special tokens (a foreign tokenizer whose id
    `bos_id` is an ordinary piece of text).
    """
    problem = not_utf8(text)
    if problem is not None:
        raise ValueError(f"the prompt {problem}")
    ids = tok.encode(text).ids
    added = tok.get_added_tokens_decoder().get(bos_id) if bos_id is not None else None
    if added is not None and added.special and (not ids or ids[0] != bos_id):
        ids = [bos_id, *ids]
    return ids


class TextStream:
    """Incremental detokenization: `push(id) -> new text` (possibly ""), `flush() -> the rest`.

    `text` is always `tok.decode(ids)` of everything pushed; what `push` returned so far is its longest prefix
    that does not end inside an unfinished character. `skip_special_tokens` is the tokenizer's flag (kept
    False by the chat commands, which switch styles on `<think>` / `</think>` themselves).
    """

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tok = tok
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.shown = ""

    @property
    def text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.text
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        """Whatever `push` held back (an incomplete character decodes as the replacement character)."""
        text = self.text
        new = text[len(self.shown):] if text.startswith(self.shown) else text
        self.shown = text
        return new
