"""Generation speed of the nemotron3 Engine against transformers' `generate`, same T9 weights, one run.

    python benchmarks/decode.py [--repeats 5] [--compile] [--long 65536] [--threads N] [--llama-cpp [f32|bf16]]
                                [--dtype fp32|bf16|int8] [--trained CHECKPOINT] [--decode-only]

Builds the T9 benchmark model with transformers (seed 0), saves it, loads the same weights into
nemotron3, and prints:
  * batch-1 greedy decode, 70-token prompt, 128 new tokens (docs/results.md, Peers): tokens/s of the whole
    `generate` call for both systems, timed alternately (the machine is shared and noisy; best of
    `--repeats`), the ratio, and whether the greedy tokens are identical, and if not, the first position where
    ours and transformers' part, with the top-2 logit margin there (nemotron3/run/measure.py `divergence`);
  * batch-16 against batch-1 throughput of our engine (new tokens per second over all rows);
  * prefill tokens/s at 512, 8k and `--long` (64k) tokens;
  * cache bytes per token for tiny, T9, Nano and Super (computed, nothing allocated; Super at 1M tokens).
With --compile the compiled decode step (one graph per batch bucket, engine/decode.py `compile_static`) is timed
too, at batch 1 and batch 16; its first compilation and, after `torch._dynamo.reset()`, its reload from Inductor's
FX graph cache are timed apart (a second run of the benchmark in a new process loads it from that cache too).
--decode-only stops after the batch-16 section (no GEMM floor, precision table, prefill or cache sizes).
With --llama-cpp the same weights are exported to GGUF (`nemotron3 export`, f32 or bf16, with a small tokenizer
trained here: the tokens are ids either way) and llama-cpp-python (the `llama-cpp` extra) runs the same batch-1
greedy decode, timed in the same race as the others, with the same number of threads; with bf16 our engine runs
the model cast to bf16, so both sides are at the same precision.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from gemm_floor import record, replayer
from t9 import T9_CONFIG, t9_hf_config

import nemotron3
from nemotron3.engine.cache import HybridCache, cache_size
from nemotron3.engine.decode import FastDecoder
from nemotron3.quant.int8 import Int8Weight
from nemotron3.run.measure import divergence

# llama.cpp's CPU build on the same T9 weights, 2 threads, this machine class (docs/results.md, Peers): a figure
# measured separately, not in this run, so the ratio against it is only indicative
LLAMA_CPP_TOK_S = 1260
OUTTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def race(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best-of-`repeats` seconds per function, alternating so that noise hits all alike; last outputs too."""
    best, outs = {k: float("inf") for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            dt, outs[name] = timed(fn)
            best[name] = min(best[name], dt)
    return best, outs


def llama_cpp_model(folder: Path, outtype: str, threads: int, n_ctx: int):
    """The checkpoint in `folder` exported to GGUF (with a small tokenizer trained here, which the file needs) and
    opened with llama-cpp-python; one line saying how to install it when it is missing."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("--llama-cpp needs llama-cpp-python: pip install -e '.[llama-cpp]'") from None
    from nemotron3.export import ExportConfig, export
    from nemotron3.tokenizer import Tokenizer

    Tokenizer.train(["the quick brown fox jumps over the lazy dog"] * 20, 300).save(folder)
    path = export(ExportConfig(model=folder, outtype=outtype, out=folder / f"model-{outtype}.gguf"))
    # logits_all: llama-cpp-python keeps a step's logits (in `scores`) only then; one row per token is copied
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, logits_all=True,
                           verbose=False)


def fast_greedy(model, fast: FastDecoder, ids: torch.Tensor, n: int, forced: list | None = None):
    """Prefill ids (B, P) on the reference path, then n greedy steps on `fast` (or the `forced` tokens of row 0
    for every row): (row 0's tokens, logits (n, V) of row 0, seconds of the steps alone)."""
    B, P = ids.shape
    cache = HybridCache(model.config, B, P + n + 1, model.lm_head.weight.dtype, include_mtp=False)
    toks, logits = [], []
    with torch.inference_mode():
        tok = model(ids, cache=cache, last_only=True)[:, -1].float().argmax(-1)
        t0 = time.perf_counter()
        for i in range(n):
            if forced is not None:
                tok = torch.full((B,), forced[i])
            toks.append(int(tok[0]))
            lg = fast.step(tok, cache, P + i + 1, True)
            cache.lengths += 1
            logits.append(lg[0])
            tok = lg.argmax(-1)
        return toks, torch.stack(logits), time.perf_counter() - t0


def last_logits(forward):
    """ids -> the last position's logits of one full forward (no cache): where two greedy decodes part."""
    def last(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return forward(torch.tensor([ids]))[0, -1]
    return last


def precisions(base, label: str, prompt: torch.Tensor, B: int, n: int, repeats: int) -> None:
    """fp32 / bf16 / int8 weight-only fast decoders of one fp32 model: batch-1 and batch-B decode tok/s (steps
    alone, best of `repeats`, alternated), weight bytes, greedy agreement with fp32 over n tokens (the first
    position where they part) and the max logit difference along fp32's greedy tokens (teacher-forced)."""
    m16 = copy.deepcopy(base).to(torch.bfloat16)
    variants = {"fp32": (base, FastDecoder(base)), "bf16": (m16, FastDecoder(m16)),
                "int8": (m16, FastDecoder(m16, pack=Int8Weight))}
    batch = prompt.expand(B, -1).contiguous()
    best = {(k, b): float("inf") for k in variants for b in (1, B)}
    for _ in range(repeats):
        for k, (m, f) in variants.items():
            for b, ids in ((1, prompt), (B, batch)):
                best[k, b] = min(best[k, b], fast_greedy(m, f, ids, n)[2])
    ref, ref_logits, _ = fast_greedy(base, variants["fp32"][1], prompt, n)
    scale = float(ref_logits.abs().max())
    print(f"\nprecision of the fast decoder, {label}: steps alone, best of {repeats}, {n} new tokens; agreement and "
          f"logits against fp32 (max |logit| {scale:.1f})")
    for k, (m, f) in variants.items():
        toks, _, _ = fast_greedy(m, f, prompt, n)
        _, forced_logits, _ = fast_greedy(m, f, prompt, n, forced=ref)
        part = next((i for i, (a, c) in enumerate(zip(toks, ref)) if a != c), None)
        d = float((forced_logits - ref_logits).abs().max())
        print(f"  {k}: batch 1 {n / best[k, 1]:7,.0f} tok/s, batch {B} {B * n / best[k, B]:7,.0f} tok/s; weights "
              f"{f.weight_bytes() / 2**20:6.2f} MiB; greedy {'identical' if part is None else f'parts at {part}'}"
              f" ({sum(a == c for a, c in zip(toks, ref))}/{n} positions equal); max logit diff {d:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=T9_CONFIG)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=70)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--long", type=int, default=65536, help="longest prefill measured (0 to skip)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled decode step (batch 1 and 16)")
    ap.add_argument("--decode-only", action="store_true", help="stop after the batch-1 and batch-16 decode sections")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--llama-cpp", nargs="?", const="f32", default=None, choices=sorted(OUTTYPES),
                    help="also time llama-cpp-python on a GGUF export of the same weights, at this precision")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "int8"), default=None,
                    help="our engine's weights (int8: weight-only, bf16 activations); default fp32, or --llama-cpp's")
    ap.add_argument("--trained", type=Path, default=None,
                    help="a checkpoint folder: the precision table again on trained weights (greedy agreement)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    hf = NemotronHForCausalLM(NemotronHConfig(**t9_hf_config(args.config))).eval()
    hf.generation_config.eos_token_id = None  # always 128 new tokens, as ours with stop_token_ids=[]
    hf.generation_config.pad_token_id = 0
    tmpdir = tempfile.TemporaryDirectory()
    tmp = tmpdir.name
    hf.save_pretrained(tmp)
    dtype = OUTTYPES[args.llama_cpp] if args.llama_cpp else None
    dtype = torch.bfloat16 if args.dtype in ("bf16", "int8") else torch.float32 if args.dtype else dtype
    ours = nemotron3.load_pretrained(tmp, dtype=dtype)
    llm = (llama_cpp_model(Path(tmp), args.llama_cpp, args.threads, args.prompt_len + args.new + 8)
           if args.llama_cpp else None)
    V = ours.config.vocab_size
    print(f"model: T9 ({ours.num_parameters() / 1e6:.2f}M params), threads={torch.get_num_threads()}")

    prompt = torch.randint(0, V, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    engine = nemotron3.Engine(ours, max_seq_len=max(8192, args.long) + 8)
    if args.dtype == "int8":  # the engine's fast decoder swapped for the int8 weight-only one
        engine.fast = FastDecoder(ours, pack=Int8Weight)
    print(f"our engine: {args.dtype or str(ours.lm_head.weight.dtype).split('.')[-1]} weights, "
          f"{'fast' if engine.fast is not None else 'reference'} decode path")
    n = args.new

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompt, max_new_tokens=n, do_sample=False)[0, args.prompt_len :].tolist()

    decode_tok_s: dict[str, float] = {}

    def run_ours(eng=engine):
        out = eng.generate([prompt[0].tolist()], n, stop_token_ids=[])
        key = "compiled" if eng.compile else "eager"
        decode_tok_s[key] = max(decode_tok_s.get(key, 0.0), out.stats["decode_tok_s"])
        return out.tokens[0]

    def run_llama_cpp():
        ids = prompt[0].tolist()
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([out[-1]])
        return out

    fns = {"transformers": run_hf, "nemotron3": run_ours}
    if llm is not None:
        fns[f"llama.cpp {args.llama_cpp}"] = run_llama_cpp
    compiled = None
    if args.compile:
        from torch._dynamo.utils import counters

        compiled = nemotron3.Engine(ours, max_seq_len=8192, compile=True)
        t_compile, _ = timed(lambda: run_ours(compiled))
        hits = counters["inductor"]["fxgraph_cache_hit"]
        print(f"compiled decode step, batch 1: first call {t_compile:.1f} s (compilation included; FX graph cache "
              f"hits {hits}, misses {counters['inductor']['fxgraph_cache_miss']})")
        torch._dynamo.reset()
        compiled = nemotron3.Engine(ours, max_seq_len=8192, compile=True)
        t_cached, _ = timed(lambda: run_ours(compiled))
        print(f"  again after torch._dynamo.reset(): {t_cached:.1f} s (FX graph cache hits "
              f"{counters['inductor']['fxgraph_cache_hit'] - hits})")
        fns["nemotron3 compiled"] = lambda: run_ours(compiled)
    for fn in fns.values():
        fn()  # warm-up
    best, outs = race(fns, args.repeats)
    same = all(o == outs["transformers"] for k, o in outs.items() if not k.startswith("llama.cpp"))
    hf_tok_s = n / best["transformers"]
    measured = next((n / t for k, t in best.items() if k.startswith("llama.cpp")), None)
    print(f"\nbatch-1 greedy, {args.prompt_len}-token prompt, {n} new tokens "
          f"(whole generate call, best of {args.repeats})")
    for name, t in best.items():
        print(f"  {name:20s}{n / t:10,.0f} tok/s   {n / t / hf_tok_s:5.2f}x transformers   "
              f"{n / t / LLAMA_CPP_TOK_S:5.2f}x llama.cpp (docs/results.md, {LLAMA_CPP_TOK_S}; not this run)")
    print(f"  greedy tokens identical to transformers: {same}")
    split = divergence(prompt[0].tolist(), outs["transformers"], outs["nemotron3"], last_logits(lambda x: hf(x).logits),
                       last_logits(ours))
    if split["position"] is not None:
        print(f"  ours and transformers part at new token {split['position']} of {n}: transformers "
              f"{split['reference_token']}, ours {split['our_token']}; there, from full forwards of the shared prefix, "
              f"top-2 margin {split['reference_top2_margin']:.3g} (transformers' logits), max |logit difference| "
              f"{split['max_abs_logit_diff']:.2g}, largest |logit| {split['logit_scale']:.3g}, both rank first "
              f"{split['reference_argmax']} / {split['our_argmax']} (near tie: {split['near_tie']})")
    if measured is not None:
        key, dtype = f"llama.cpp {args.llama_cpp}", str(next(ours.parameters()).dtype).split(".")[-1]
        print(f"  llama.cpp ({args.llama_cpp} GGUF, this run, {args.threads} threads): {measured:,.0f} tok/s; "
              f"nemotron3 ({dtype}) at {n / best['nemotron3'] / measured:.2f}x of it; "
              f"greedy tokens identical to ours: {outs[key] == outs['nemotron3']}")
    for key, v in decode_tok_s.items():
        print(f"  ours {key}, decode steps only (prefill excluded): {v:,.0f} tok/s ({1e3 / v:.2f} ms/step)")

    # batch-16 against batch-1: new tokens per second over all rows
    B = args.batch
    prompts = torch.randint(0, V, (B, args.prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    for name, eng in [("eager", engine)] + ([("compiled", compiled)] if compiled else []):
        t_warm, _ = timed(lambda eng=eng: eng.generate(prompts, 8, stop_token_ids=[]))  # warm-up, compilation
        if eng.compile:
            print(f"\ncompiled decode step, batch {B}: first call {t_warm:.1f} s (compilation included)")
        best_b, _ = race({"b1": lambda eng=eng: run_ours(eng),
                          "bB": lambda eng=eng: eng.generate(prompts, n, stop_token_ids=[])},
                         max(3, args.repeats // 2))
        t1, tB = n / best_b["b1"], B * n / best_b["bB"]
        print(f"\nbatch-{B} vs batch-1, {name} (whole generate call): {tB:,.0f} vs {t1:,.0f} tok/s = {tB / t1:.1f}x")

    if args.decode_only:
        return
    # the matrix products of one decode step, replayed alone: at batch 16 the step is bound by them
    print("\ndecode step against its GEMM floor (eager FastDecoder, 100-token rows; the floor replays the step's")
    print("matrix products and attention kernels alone, benchmarks/gemm_floor.py)")
    step_ms = {}
    for rows in (1, B):
        c = HybridCache(ours.config, rows, 512, ours.lm_head.weight.dtype, include_mtp=False)
        with torch.inference_mode():
            ours(torch.randint(0, V, (rows, 100)), cache=c)
        tok = torch.randint(0, V, (rows,))

        def one_step(c=c, tok=tok):
            c.lengths.fill_(100)
            engine.fast.step(tok, c, 101, True)

        with torch.inference_mode():
            replay = replayer(record(one_step))
            best, _ = race({"step": lambda one_step=one_step: [one_step() for _ in range(20)],
                            "floor": lambda replay=replay: [replay() for _ in range(20)]}, 6)
            t, floor = best["step"] / 20, best["floor"] / 20
        step_ms[rows] = t * 1e3
        print(f"  batch {rows:>2d}: step {t * 1e3:6.2f} ms, GEMM floor {floor * 1e3:6.2f} ms "
              f"({floor / t:4.0%} of the step)")
        if rows == B:
            print(f"  batch-{B} over batch-1 throughput, steps alone: {B * step_ms[1] / step_ms[B]:.1f}x; "
                  f"with the batch-{B} step at its GEMM floor it would be {B * step_ms[1] / (floor * 1e3):.1f}x")

    precisions(nemotron3.load_pretrained(tmp), "T9, random weights", prompt, B, n, max(3, args.repeats // 2))
    if args.trained:
        trained = nemotron3.load_pretrained(args.trained)
        V2 = trained.config.vocab_size
        p = torch.randint(0, V2, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
        precisions(trained, f"trained {args.trained}", p, B, n, max(3, args.repeats // 2))

    # prefill
    print("\nprefill (one prompt, engine segments of 2048 tokens)")
    for L in [512, 8192] + ([args.long] if args.long else []):
        ids = torch.randint(0, V, (L,), generator=torch.Generator().manual_seed(2)).tolist()
        reps = 3 if L <= 8192 else 1
        t = min(timed(lambda ids=ids: engine.generate([ids], 1, stop_token_ids=[]))[0] for _ in range(reps))
        print(f"  {L:>6d} tokens: {L / t:10,.0f} tok/s  ({t:.2f} s)")

    print("\ncache bytes per token (computed, nothing allocated; SSM state fp32, KV and conv in the dtype shown)")
    rows = [("tiny", 8192, torch.float32), ("t9", 8192, torch.float32),
            ("nano-30b-a3b", 262144, torch.bfloat16), ("super-120b-a12b", 1 << 20, torch.bfloat16)]
    for name, L, dt in rows:
        s = cache_size(nemotron3.ModelConfig.preset(name), 1, L, dtype=dt)
        print(f"  {name:16s} at {L:>8,d} tokens ({str(dt).split('.')[-1]}): {s.per_token:10,.0f} B/token total = "
              f"{s.kv_per_token:,} KV + {s.state_per_row:,} B of Mamba state / {L:,};  "
              f"whole cache {s.total / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
