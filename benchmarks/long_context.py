"""Long context on the tiny hybrid: retrieval accuracy by length, and a 256k-token prompt through the Engine.

    python benchmarks/long_context.py [--model CHECKPOINT] [--n 20] [--lengths 1024 4096 16384 65536]
                                      [--long 262144] [--new-tokens 16] [--prefill-chunk 2048] [--threads N]

Prints, each part timed:
  * with --model: greedy exact match on n held-out retrieval problems at each length (eval/retrieval.py,
    mean ± s.e.), prompts filled to the length in the checkpoint's own tokens;
  * prefill + decode of one `--long`-token prompt (random ids) on the `tiny` preset (random weights, or the
    checkpoint's when --model is a tiny model) through the Engine with chunked prefill: seconds and tokens/s
    of each part, from `Generation.stats`;
  * the cache bytes of that prompt (engine.cache_size, one row, fp32: what the Engine allocates for it) against
    an attention-only model of the same size: the same layers, d_model and heads, every Mamba layer (`M`) made
    attention (`*`); the MoE layers hold no cache in either. `--long 0` skips the prefill (bytes only).
"""

from __future__ import annotations

import argparse
import time

import torch

import nemotron3
from nemotron3.engine import Engine, cache_size
from nemotron3.eval.retrieval import LENGTHS, attention_only, format_table, retrieval_accuracy
from nemotron3.tokenizer import Tokenizer


def cache_line(name: str, config: nemotron3.ModelConfig, tokens: int) -> str:
    size = cache_size(config, 1, tokens, torch.float32, include_mtp=False)
    return (f"  {name:<28} {config.pattern:<10} {size.total / 2**20:10,.1f} MiB   KV {size.kv_per_token:,} B/token, "
            f"recurrent state {size.recurrent:,} B")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint folder (with its tokenizer) for retrieval accuracy")
    ap.add_argument("--n", type=int, default=20, help="retrieval problems per length")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    ap.add_argument("--batch-size", type=int, default=4, help="retrieval rows decoded together")
    ap.add_argument("--long", type=int, default=262144, help="tokens of the long prompt (0: cache bytes only)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens decoded after the long prompt")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model = None
    if args.model:
        model = nemotron3.load_pretrained(args.model, dtype=torch.float32)
        tok = Tokenizer.from_folder(args.model)
        t0 = time.perf_counter()
        results = retrieval_accuracy(model, tok, tuple(args.lengths), args.n, batch_size=args.batch_size,
                                     prefill_chunk=args.prefill_chunk)
        print(f"\nretrieval exact match, {args.model} ({time.perf_counter() - t0:.1f} s)")
        print(format_table(results))
        for length, r in results.items():
            print(f"  {length}: first problem's answer {r['example']['answer']!r}, "
                  f"completion {r['example']['completion'][:60]!r}")

    if model is None or model.config.pattern != nemotron3.ModelConfig.preset("tiny").pattern:
        torch.manual_seed(0)
        model = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")).eval()
        print("\nlong prompt: the tiny preset, random weights")
    config = model.config
    tokens = args.long or max(args.lengths)
    print(f"\ncache of one {tokens:,}-token row (fp32, engine.cache_size)")
    print(cache_line("hybrid (this model)", config, tokens + args.new_tokens))
    print(cache_line("attention-only, same size", attention_only(config), tokens + args.new_tokens))
    hybrid = cache_size(config, 1, tokens + args.new_tokens, torch.float32, include_mtp=False).total
    attn = cache_size(attention_only(config), 1, tokens + args.new_tokens, torch.float32, include_mtp=False).total
    print(f"  hybrid / attention-only: {hybrid / attn:.3f}")
    if args.long:
        ids = torch.randint(3, config.vocab_size, (args.long,), generator=torch.Generator().manual_seed(0)).tolist()
        engine = Engine(model, max_seq_len=args.long + args.new_tokens, prefill_chunk=args.prefill_chunk)
        t0 = time.perf_counter()
        out = engine.generate([ids], args.new_tokens, stop_token_ids=[])
        s = out.stats
        print(f"\nprefill + decode, {args.long:,}-token prompt, {args.new_tokens} new tokens "
              f"({time.perf_counter() - t0:.1f} s in all, path {s.get('path')})")
        print(f"  prefill {s['prefill_s']:.1f} s ({s['prefill_tok_s']:,.0f} tok/s, chunks of {args.prefill_chunk})")
        print(f"  decode  {s['decode_s']:.2f} s ({s['decode_tok_s']:,.1f} tok/s at {args.long:,} tokens of context)")


if __name__ == "__main__":
    main()
