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

Special tokens, ids fixed in this order (`pad`/`bos`/`eos` = 0/1/2, the `ModelConfig` defaults):

    <unk> <s> </s>                           padding, begin / end of document
    <|im_start|> <|im_end|>                  a chat turn: `<|im_start|>{role}\\n{content}<|im_end|>\\n`
    <think> </think>                         the reasoning block
    <tool_call> </tool_call>                 a tool call: `<tool_call><function=NAME><parameter=K>v</parameter>...`
    <tool_response> </tool_response>         a tool result, inside a `tool` (or `user`) turn

The turn markers are ChatML's, which the Nemotron Nano templates in the wild use (`<|im_start|>system\\n`);
roles (`system`, `user`, `assistant`, `tool`) are plain text after `<|im_start|>`. The exact Nemotron 3
role tokens are UNCONFIRMED (docs/post-training.md §1): the names are data here, in `SPECIAL_TOKENS`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

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


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the ids the training stack needs."""

    def __init__(self, tk: HFTokenizer) -> None:
        missing = [t for t in SPECIAL_TOKENS if tk.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing} (expected all of {list(SPECIAL_TOKENS)})")
        self.tk = tk
        self.pad_id = tk.token_to_id("<unk>")
        self.bos_id = tk.token_to_id("<s>")
        self.eos_id = tk.token_to_id("</s>")
        self.end_of_turn_id = tk.token_to_id("<|im_end|>")

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
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a `tokenizer.json` file or a checkpoint folder holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"no tokenizer at {p} (expected a tokenizer.json or a checkpoint folder with one)")
        return cls(HFTokenizer.from_file(str(p)))

    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers' fast tokenizer reads, with the
        chat template (`nemotron3.chat.CHAT_TEMPLATE`), so `apply_chat_template` renders as `chat.render` does."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
            "additional_special_tokens": list(SPECIAL_TOKENS[3:]),
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ----------------------------------------------------------------- use
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
