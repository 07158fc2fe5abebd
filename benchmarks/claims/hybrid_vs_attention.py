"""Claim: the Mamba-attention hybrid decodes faster and keeps a much smaller cache than a Transformer of the same
size (white paper: Nano 3.3× Qwen3-30B-A3B at 8k in / 16k out; Super report: up to 2.2× GPT-OSS-120B and 7.5×
Qwen3.5-122B), without paying for it in quality.

    .venv/bin/python benchmarks/claims/hybrid_vs_attention.py --quick     # ~3-5 minutes on 2 shared cores
    .venv/bin/python benchmarks/claims/hybrid_vs_attention.py             # full (see --help for the sizes)

Variants, both `ModelConfig`s trained by the ordinary `nemotron3 pretrain` stage:

    hybrid      the T9 benchmark model, `MEME*EME` (3 Mamba-2, 1 attention, 4 MoE layers; d = 256)
    attention   every `M` replaced by `*` (`*E*E*E*E`), the attention width raised to the same parameter count:
                the number of query heads is solved (a multiple of the 2 KV heads, head_dim 64) so that the total
                parameters match the hybrid's; the KV heads stay at 2, the smallest cache an attention model of
                that width can have (the comparison most favourable to attention)

Caveat: Nemotron's attention has no positional encoding (the Mamba layers carry position); the attention-only
variant inherits that (causal masking alone gives it position, "NoPE"), which a real Transformer with RoPE would
not lack. Its held-out loss is therefore a lower bound on what a Transformer of this size reaches.

Measured:
  * cache bytes per sequence at each context (1k, 8k, 32k, 64k): counted by `engine.cache.cache_size` (fp32 KV
    and SSM state, as the engine runs these models on a CPU), and the largest batch whose cache plus the weights
    fits in 8 GB (counted);
  * decode tok/s at each context, batch 1 and batch min(that largest batch, --max-batch): fast decode steps
    (`engine.decode.FastDecoder`, the engine's decode path) over a cache holding that many positions. The cache
    is sized and its lengths set, not filled by a prefill (a step's cost does not depend on the values it
    reads), so 64k contexts cost no 64k prefill. Timed as the median of `--steps-timed` steps, the variants
    alternated; the machine is shared, so these timings are noisy: ratios in one run are what to read;
  * prefill time of one sequence of 1k and 8k tokens (the engine's chunked prefill, best of 2; noisy);
  * held-out loss after the same tokens, mean ± s.e. over seeds, paired by seed.

The largest batch is counted and not timed when it exceeds --max-batch: the machine (23 GB, shared) cannot hold
8 GB of cache for a benchmark, so the timed batch is capped and said so in the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

GB8 = 8 * 2 ** 30


def variants() -> dict:
    """The hybrid T9 and its attention-only twin of the same total parameter count."""
    from nemotron3.config import ModelConfig

    hybrid = ModelConfig.preset("t9")
    attn = hybrid.replace(pattern=hybrid.pattern.replace("M", "*"))
    kv = attn.num_key_value_heads
    ref = common.params(hybrid)["total"]
    heads = min(range(kv, 64 * kv + 1, kv),
                key=lambda h: abs(common.params(attn.replace(num_attention_heads=h))["total"] - ref))
    return {"hybrid": hybrid, "attention": attn.replace(num_attention_heads=heads)}


def cache_bytes(config, context: int, rows: int = 1) -> int:
    """Bytes of the engine's cache for `rows` sequences of `context` tokens (fp32)."""
    from nemotron3.engine.cache import cache_size

    return cache_size(config, rows, context).total


def max_batch(config, context: int, budget: int = GB8) -> int:
    """The most rows whose cache at `context` plus the fp32 weights fits in `budget` bytes."""
    weights = common.params(config)["total"] * 4
    return max(0, (budget - weights) // cache_bytes(config, context))


def decode_speed(models: dict, context: int, batch: int, steps: int) -> dict[str, float]:
    """Decode tok/s of each model: median step time over `steps` fast steps at `context` cached positions."""
    import torch

    from nemotron3.engine.cache import HybridCache
    from nemotron3.engine.decode import FastDecoder

    state = {}
    for n, m in models.items():
        cache = HybridCache(m.config, batch, context + steps + 2)
        cache.lengths.fill_(context)
        state[n] = (FastDecoder(m), cache, [])
    tok = torch.zeros(batch, dtype=torch.long)
    with torch.inference_mode():
        for i in range(steps + 1):  # alternate the models step by step; the first step is a warm-up
            for fast, cache, times in state.values():
                t0 = time.perf_counter()
                fast.step(tok, cache, int(cache.lengths.max()) + 1, True)
                cache.lengths += 1
                if i:
                    times.append(time.perf_counter() - t0)
    return {n: batch / statistics.median(times) for n, (_, _, times) in state.items()}


def prefill_seconds(models: dict, tokens: int, repeats: int = 2) -> dict[str, float]:
    """Best-of-`repeats` seconds of the engine's prefill of one `tokens`-long sequence."""
    import torch

    from nemotron3.engine.cache import HybridCache

    ids = torch.randint(4, 200, (1, tokens))
    best = {n: float("inf") for n in models}
    with torch.inference_mode():
        for _ in range(repeats):
            for n, m in models.items():
                cache = HybridCache(m.config, 1, tokens + 1)
                t0 = time.perf_counter()
                for s in range(0, tokens, 2048):  # the Engine's prefill chunk
                    m(ids[:, s:s + 2048], cache=cache)
                best[n] = min(best[n], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds x 12 steps of 8 x 64, contexts 1k/8k")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768, 65536])
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 8192], help="prefill lengths timed")
    ap.add_argument("--max-batch", type=int, default=8, help="cap of the timed large batch (8 rows of 64k-token "
                    "attention cache are 2 GB)")
    ap.add_argument("--steps-timed", type=int, default=12, help="decode steps timed per point")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=common.ROOT / "runs/claims/hybrid_vs_attention")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: OUT/hybrid_vs_attention.png)")
    ap.add_argument("--reuse", action="store_true", help="read finished runs from --out instead of retraining")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.seq_len = 2, 12, 8, 64
        args.contexts, args.prefill, args.max_batch, args.steps_timed = [1024, 8192], [1024], 8, 5
    common.set_threads(args.threads)
    import torch

    from nemotron3 import load_pretrained

    configs = variants()
    names = list(configs)
    t0 = time.perf_counter()
    res: dict[str, list[dict]] = {n: [] for n in names}
    for seed in range(args.seeds):
        tok = None  # the seed's first run trains the tokenizer, its other variants load it
        for n in names:
            s = common.pretrain_run(configs[n], args.out / f"{n}-seed{seed}", seed, args.steps, args.batch_size,
                                    args.seq_len, 0, args.reuse, tok, mtp_depths=0)
            res[n].append(s)
            tok = tok or args.out / f"{n}-seed{seed}" / "final"
            common.say(f"{n} seed {seed}: held-out {s['eval_losses'][-1][1]:.4f}, {s['train_seconds']:.0f} s")
    models = {n: load_pretrained(args.out / f"{n}-seed0" / "final", dtype=torch.float32).eval() for n in names}
    heldout = {n: [s["eval_losses"][-1][1] for s in res[n]] for n in names}
    rows = []
    for ctx in args.contexts:
        big = {n: max_batch(models[n].config, ctx) for n in names}
        timed = max(1, min(min(big.values()), args.max_batch))
        s1 = decode_speed(models, ctx, 1, args.steps_timed)
        sb = decode_speed(models, ctx, timed, args.steps_timed)
        rows.append((ctx, {n: cache_bytes(models[n].config, ctx) for n in names}, big, timed, s1, sb))
        common.say(f"context {ctx}: batch 1 {s1}, batch {timed} {sb}")
    pre = {L: prefill_seconds(models, L) for L in args.prefill}

    p = {n: common.params(models[n].config) for n in names}
    lines = [f"Hybrid vs attention-only, T9 size: {args.seeds} seeds, {args.steps} steps x {args.batch_size} x "
             f"{args.seq_len} tokens; {common.machine()}; {time.perf_counter() - t0:.0f} s; timings noisy "
             "(shared machine)", "",
             "| variant | pattern | query / KV heads | total params | active params | held-out loss |",
             "|---|---|---|---|---|---|"]
    for n in names:
        c = models[n].config
        lines.append(f"| {n} | {c.pattern} | {c.num_attention_heads} / {c.num_key_value_heads} | {p[n]['total']:,} "
                     f"| {p[n]['active']:,} | {common.fmt(heldout[n], 4)} |")
    t = common.paired_test(heldout["hybrid"], heldout["attention"])
    lines += ["", f"held-out loss, hybrid - attention (paired by seed): {common.test_text(t)}", "",
              "| context | cache MiB/seq hybrid | attention | ratio | largest batch in 8 GB hybrid / attention | "
              "decode tok/s b=1 hybrid / attention (ratio) | timed batch | decode tok/s hybrid / attention (ratio) |",
              "|---|---|---|---|---|---|---|---|"]
    for ctx, cb, big, timed, s1, sb in rows:
        lines.append(f"| {ctx:,} | {cb['hybrid'] / 2**20:.2f} | {cb['attention'] / 2**20:.2f} | "
                     f"{cb['attention'] / cb['hybrid']:.1f}x | {big['hybrid']:,} / {big['attention']:,} | "
                     f"{s1['hybrid']:,.0f} / {s1['attention']:,.0f} ({s1['hybrid'] / s1['attention']:.2f}x) | "
                     f"{timed} | {sb['hybrid']:,.0f} / {sb['attention']:,.0f} "
                     f"({sb['hybrid'] / sb['attention']:.2f}x) |")
    lines += ["", "prefill of one sequence (s, best of 2, noisy): " + "; ".join(
        f"{L:,} tokens: hybrid {pre[L]['hybrid']:.2f}, attention {pre[L]['attention']:.2f} "
        f"({pre[L]['attention'] / pre[L]['hybrid']:.2f}x)" for L in args.prefill)]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_vs_attention.md").write_text("\n".join(lines) + "\n")

    fig, axes = common.figure(3)
    ctxs = [r[0] for r in rows]
    for i, n in enumerate(names):
        axes[0].plot(ctxs, [r[1][n] / 2**20 for r in rows], "o-", color=f"C{i}", label=n)
        axes[1].plot(ctxs, [r[4][n] for r in rows], "o-", color=f"C{i}", label=f"{n}, batch 1")
        axes[1].plot(ctxs, [r[5][n] for r in rows], "s--", color=f"C{i}", label=f"{n}, batch ≤ {args.max_batch}")
    for ax, title, ylabel in ((axes[0], "cache per sequence (counted)", "MiB (fp32)"),
                              (axes[1], "decode throughput (noisy)", "tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    common.bars(axes[2], names, heldout, "held-out loss (nats)", "held-out loss after the same tokens")
    common.save(fig, args.plot or args.out / "hybrid_vs_attention.png",
                f"T9 hybrid vs attention-only of equal parameters; {args.seeds} seeds x {args.steps} steps")


if __name__ == "__main__":
    main()
