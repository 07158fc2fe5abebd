"""A checkpoint's byte-level BPE `tokenizer.json` as GGUF's `gpt2` tokenizer, as llama.cpp's converter writes it.

    tokenizer.ggml.model       "gpt2" (llama.cpp's name for byte-level BPE)
    tokenizer.ggml.pre         the pre-tokenizer: ours (digits split one by one, then GPT-2's byte-level regex)
                               is llama.cpp's "starcoder" (regexes `\\p{N}` then GPT-2's)
    tokenizer.ggml.tokens      one string per id up to the model's vocab_size; ids the tokenizer does not use
                               are `[PAD{id}]`
    tokenizer.ggml.token_type  NORMAL, CONTROL for the special tokens (and ones that look special: `<|...|>`),
                               USER_DEFINED for other added tokens, UNUSED for the padding
    tokenizer.ggml.merges      "left right" per merge, in rank order (gguf.SpecialVocab, as the converter)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, chat_template      from tokenizer_config.json (SpecialVocab)
    tokenizer.ggml.add_bos_token = true, add_eos_token = false           every prompt of ours starts with BOS

The converter recognises a pre-tokenizer by the hash of one encoded text, which no tokenizer trained here
matches; the pre-tokenizer is read from tokenizer.json instead, and one llama.cpp does not have is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer as HFTokenizer

_STARCODER = [{"type": "Digits", "individual_digits": True},
              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))


def pre_tokenizer_name(spec: dict, where: Path) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer; NotImplementedError for one it does not have."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if isinstance(parts, list) and len(parts) == len(_STARCODER) and all(
            isinstance(p, dict) and all(p.get(k) == v for k, v in want.items()) for p, want in zip(parts, _STARCODER)):
        return "starcoder"
    raise NotImplementedError(f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not one llama.cpp has a name for "
                              "here (nemotron3's: Digits(individual_digits) then ByteLevel(use_regex)); convert this "
                              "checkpoint with llama.cpp's convert_hf_to_gguf.py")


def vocab(folder: Path, n_vocab: int) -> tuple[list[str], list[int], str]:
    """(tokens, token types, pre-tokenizer name) for ids 0 .. n_vocab - 1."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a GGUF file carries the tokenizer, and this checkpoint has "
                                "none")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        tk = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception type
        raise ValueError(f"{path}: cannot read the tokenizer: {e}") from e
    if (spec.get("model") or {}).get("type") != "BPE":
        raise NotImplementedError(f"{path}: model type {(spec.get('model') or {}).get('type')!r} is not a BPE")
    pre = pre_tokenizer_name(spec, path)
    by_id = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise ValueError(f"{path} has token id {max(by_id)}, beyond the model's vocab_size {n_vocab}")
    added = tk.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if i in added:
            if not added[i].normalized:
                token = tk.decode(tk.encode(token, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # the converter's pre-normalised user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types, pre


def add_vocab(w: gguf.GGUFWriter, folder: Path, n_vocab: int) -> None:
    """Write the tokenizer keys (module docstring) into `w`."""
    tokens, types, pre = vocab(folder, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ValueError(f"{folder / 'tokenizer.json'} has no BPE merges")
    special.add_special_token.update(bos=True, eos=False)
    special.add_to_gguf(w, quiet=True)
