"""Generate text from a checkpoint folder, streaming tokens as they come.

    nemotron3 generate --model DIR --prompt "Once upon a time" --max-new-tokens 64
    nemotron3 generate --model DIR --ids 1,2,3 --temperature 0.8 --top-p 0.9 --seed 0

The tokenizer is the folder's `tokenizer.json` (Hugging Face `tokenizers` format). With `--ids` the prompt
is raw token ids and the output is printed as ids too (decoded as well when a tokenizer is present).
Stats (prefill and decode tokens/s, forward passes) go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, tokenized with the folder's tokenizer.json")
    src.add_argument("--ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop", action="store_true", help="ignore the checkpoint's end-of-sequence ids")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="greedy MTP speculative decoding with K drafted tokens (models with an MTP block)")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"error: --ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise SystemExit("error: --ids is empty")
    return ids


def load_tokenizer(folder: Path):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def run(args: argparse.Namespace) -> int:
    import nemotron3

    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"error: {folder} is not a checkpoint folder (no config.json)")
    tok = load_tokenizer(folder)
    if args.prompt is not None:
        if tok is None:
            raise SystemExit(f"error: {folder} has no tokenizer.json; pass the prompt as token ids with --ids 1,2,3")
        ids = tok.encode(args.prompt).ids
        if not ids:
            raise SystemExit("error: the prompt tokenizes to nothing")
    else:
        ids = parse_ids(args.ids)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = nemotron3.load_pretrained(folder, dtype=getattr(torch, args.dtype))
    engine = nemotron3.Engine(model, compile=args.compile)
    try:
        steps = engine.stream([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_token_ids=[] if args.no_stop else None,
                              num_speculative_tokens=args.speculative)
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"error: {e}") from None
    new: list[int] = []
    shown = ""
    for step in steps:
        if step[0] is None:
            break
        new.append(step[0])
        if args.prompt is not None:  # print the text's new suffix, holding back an unfinished UTF-8 character
            text = tok.decode(new)
            if not text.endswith("\ufffd") and text.startswith(shown):
                print(text[len(shown):], end="", flush=True)
                shown = text
        else:
            print(step[0], end=",", flush=True)
    if args.prompt is not None:
        text = tok.decode(new)
        print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="")
    print()
    if args.ids is not None and tok is not None:
        print(tok.decode(new))
    s = engine.last_stats
    print(f"[{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new; prefill {s['prefill_tok_s']:.0f} tok/s, "
          f"decode {s['decode_tok_s']:.0f} tok/s, {s['forward_passes']} forward passes, {s['path']} path]", file=sys.stderr)
    return 0
