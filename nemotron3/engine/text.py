"""Text in and out of the engine: prompts as ids, streamed ids as text.

The engine works on token ids; the commands that talk to people (`generate`, `chat`, the server) need two
things around it, the same way each time:

- the prompt's ids: `Tokenizer.encode_prompt(text, bos_id)` (nemotron3/tokenizer.py), the beginning-of-document
  token first as in every training document and SFT conversation, text that is not UTF-8 (`not_utf8`) refused
  with a ValueError naming the character; `encode_prompt(tok, text, bos_id)` here is the same call.
- `TextStream(tok)`: push the generated ids one at a time and get back the new text each one adds. Decoding
  the whole sequence each time and emitting the new suffix is what keeps byte-level BPE right: one character
  can span several tokens, so a suffix that ends in the replacement character (an unfinished UTF-8 sequence)
  is held back until the next token completes it.
"""

from __future__ import annotations

from nemotron3.tokenizer import Tokenizer, not_utf8

__all__ = ["TextStream", "encode_prompt", "not_utf8"]


def encode_prompt(tok: Tokenizer, text: str, bos_id: int | None) -> list[int]:
    """`tok.encode_prompt(text, bos_id)`: `[bos_id, *ids(text)]`, ValueError for text that is not UTF-8."""
    return tok.encode_prompt(text, bos_id)


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
