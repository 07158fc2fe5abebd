"""Engine: batched generation from a HybridLM with a HybridCache.

    engine = Engine(model)
    out = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)     # greedy
    out.tokens  -> [[...32 ids], [...]]   (new tokens only; a stop token ends a row and is included)
    out.stats   -> {"prefill_tok_s": ..., "decode_tok_s": ..., "forward_passes": ..., ...}
    for step in engine.stream(prompts, 32, temperature=0.8, seed=0):  # step: one token per row, or None
        ...

One call runs in two phases.

Prefill (engine/prefill.py, docs/inference.md §2). The prompts are right-padded into one batch and run
through the model in segments of `prefill_chunk` columns; padding is exact, so each row's tokens are the
ones it would get alone. Only each row's last position goes through the LM head.

Decode. One token per row per forward pass, through `FastDecoder` (engine/decode.py, docs/inference.md §3:
fused weights, in-place state updates, no per-step allocation that can be avoided) when
`FastDecoder.supports(model)` (a plain fp32 HybridLM without projection biases), else through the
reference cached path `model(tokens, cache=...)`. Every row decodes until every row is done (static
shapes; a finished row's tokens are discarded), which costs little at the batch sizes a CPU serves and
keeps the step free of row bookkeeping.

`compile=True` wraps the fast step in `torch.compile` (its speed against the eager step is measured by
benchmarks/decode.py, see docs/results.md). The first call compiles, which takes far longer than a step,
and every new batch size or cache capacity recompiles, so it pays for long or repeated generation, not
for one short call. The engine keeps its cache between calls and reuses it when the batch size matches
and it is large enough, so repeated calls neither reallocate nor recompile. The sampling rule and its
per-row random streams are in engine/sampling.py (docs/inference.md §4).

`num_speculative_tokens = k > 0` decodes with the model's MTP block drafting k tokens per verify forward
(engine/speculative.py, docs/inference.md §5): greedy gives the same tokens as without it, sampling the
same law (lossless speculative sampling). The stats then hold `acceptance_length` (tokens per verify
forward per row, the extra token included) and `acceptance_rate_per_position`.

Threads: decode-sized ops run on one core whatever `torch.get_num_threads()` says, and on a machine whose
cores are busy with other work, every parallel op of the prefill and of the reference path waits at its
OpenMP barrier for the slowest thread, so an extra thread on a busy core costs far more than it gives.
Set the thread count for the process (`torch.set_num_threads`, `nemotron3 generate --threads`) to what
the machine can really give.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder
from nemotron3.engine.prefill import pad_prompts, prefill
from nemotron3.engine.sampling import row_uniforms, sample, validate_sampling
from nemotron3.engine.speculative import Sampling, speculative_rounds, token_logprobs, uniforms_per_round
from nemotron3.engine.thinking import ThinkingBudget, ThinkTokens
from nemotron3.model.hybrid import HybridLM


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt
    stats: dict = field(default_factory=dict)
    logprobs: list[list[float]] | None = None  # with return_logprobs: each new token's log-probability


class Engine:
    """Generation with a preallocated hybrid cache; see the module docstring.

    max_seq_len: the most tokens (prompt + new) one row may hold; default the config's
    `max_position_embeddings`. prefill_chunk: prompt tokens per prefill forward. fast: use FastDecoder
    when the model allows it. compile: torch.compile the fast decode step. think_tokens: the ids a thinking
    budget needs (engine/thinking.py; default nemotron3's `<think>` / `</think>` ids and no newline ids).
    """

    def __init__(
        self,
        model: HybridLM,
        max_seq_len: int | None = None,
        prefill_chunk: int = 2048,
        fast: bool = True,
        compile: bool = False,
        think_tokens: ThinkTokens | None = None,
    ) -> None:
        self.model = model.eval()
        self.think_tokens = think_tokens or ThinkTokens()
        self.config = model.config
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.fast = FastDecoder(model, traceable=compile) if fast and FastDecoder.supports(model) else None
        self.compile = compile
        self._step = None
        self._compiled_speculative: dict = {}
        self._cache: HybridCache | None = None
        self.last_stats: dict = {}
        self.last_logprobs: list[list[float]] | None = None

    # ------------------------------------------------------------------ public API
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        num_speculative_tokens: int = 0,
        max_thinking_tokens: int | list[int] | None = None,
        thinking_grace: float = 0.1,
        return_logprobs: bool = False,
    ) -> Generation:
        """New tokens for each prompt (a stop token ends its row and is included) and the call's stats.

        `max_thinking_tokens` (one budget, or one per prompt) caps each row's reasoning inside `<think>`
        (engine/thinking.py): after N thinking tokens, `</think>` is forced after the next newline within
        `thinking_grace · N` more tokens, else at once.

        `return_logprobs`: also each new token's log-probability under the law it was sampled from
        (`log_softmax(logits / temperature)` restricted to the top-k / top-p set and renormalised; greedy:
        the raw `log_softmax(logits)`), from the engine's own forward (the verify forward under speculation).
        A forced `</think>` gets the model's log-probability of that token.
        """
        out: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
                                num_speculative_tokens, max_thinking_tokens, thinking_grace, return_logprobs):
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return Generation(out, dict(self.last_stats), self.last_logprobs)

    def stream(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        num_speculative_tokens: int = 0,
        max_thinking_tokens: int | list[int] | None = None,
        thinking_grace: float = 0.1,
        return_logprobs: bool = False,
    ) -> Iterator[list[int | None]]:
        """Yield one list per step: the new token of each row, or None for a row with no token in this step
        (it has stopped, or, with speculative decoding, it got fewer tokens from this verify forward).

        All arguments are checked before any work starts. `engine.last_stats` holds the stats once the
        iterator is exhausted, and with `return_logprobs` `engine.last_logprobs` each row's token
        log-probabilities (see `generate`).
        """
        prompts = self._validate(prompts, max_new_tokens, temperature, top_k, top_p, num_speculative_tokens)
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        budget = None
        if max_thinking_tokens is not None:
            budgets = max_thinking_tokens if isinstance(max_thinking_tokens, (list, tuple)) else \
                [max_thinking_tokens] * len(prompts)
            budget = ThinkingBudget(self.think_tokens, list(budgets), prompts, thinking_grace)
        self.last_logprobs = [[] for _ in prompts] if return_logprobs else None
        if num_speculative_tokens:
            return self._run_speculative(prompts, max_new_tokens, num_speculative_tokens, stops,
                                         Sampling(float(temperature), top_k, top_p), seed, budget)
        return self._run(prompts, max_new_tokens, temperature, top_k, top_p, seed, stops, budget)

    # ------------------------------------------------------------------ checks
    def _validate(self, prompts, max_new_tokens, temperature, top_k, top_p, num_speculative_tokens) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if all(isinstance(t, int) for t in prompts):
            raise ValueError(
                "prompts must be a list of prompts, each a list of token ids: wrap one prompt as [ids]")
        V = self.config.vocab_size
        clean = []
        for i, p in enumerate(prompts):
            p = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise ValueError(f"prompt {i} holds non-integer token ids")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
            clean.append(p)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        validate_sampling(temperature, top_k, top_p)
        if not isinstance(num_speculative_tokens, int) or num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {num_speculative_tokens!r}")
        if num_speculative_tokens > 0 and self.model.mtp is None:
            raise ValueError(
                "num_speculative_tokens > 0 needs a model with an MTP block (num_nextn_predict_layers > 0)")
        longest = max(len(p) for p in clean)
        overshoot = 2 * num_speculative_tokens + 1 if num_speculative_tokens else 0  # see _run_speculative
        if longest + max_new_tokens + overshoot > self.max_seq_len:
            raise ValueError(
                f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the engine's "
                f"max_seq_len ({self.max_seq_len}); shorten the prompt or build Engine(model, max_seq_len=...)"
            )
        return clean

    # ------------------------------------------------------------------ the work
    def _cache_for(self, rows: int, tokens: int) -> HybridCache:
        """Reuse the engine's cache when it has the same rows and room enough, but not over twice the room
        needed (the compiled step attends over the whole capacity); allocate otherwise."""
        cache = self._cache
        capacity = min(self.max_seq_len, -(-tokens // 256) * 256)
        if cache is None or cache.rows != rows or not tokens <= cache.max_seq_len <= 2 * capacity:
            self._cache = None  # free the old one first
            cache = self._cache = HybridCache(self.config, rows, capacity, self.dtype, self.device, include_mtp=False)
        cache.reset()
        return cache

    def _prefill(self, cache: HybridCache, prompts: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Run every prompt into the cache; returns each row's last-position logits (B, V) and the pass count."""
        ids, lens = pad_prompts(prompts, self.device)
        last, _, passes = prefill(self.model, cache, ids, lens, self.prefill_chunk)
        return self.model.lm_head(last).float(), passes

    def weights_updated(self) -> None:
        """Say that the model's weights changed: the fast decoder's fused copies are rebuilt on the next call.

        In-place updates are normally seen through the tensors' version counters, but a fused optimizer step
        (`torch.optim.AdamW(fused=True)`, the training stack's default on CPU) writes the parameters without
        bumping them; a trainer that generates between its steps (RL) calls this after each step."""
        if self.fast is not None:
            self.fast._versions = None  # never equal to a signature: stale

    def _fast_decoder(self) -> FastDecoder | None:
        """The fast decoder, rebuilt if the model's weights changed, or None if the model no longer allows it."""
        if self.fast is not None and self.fast.is_stale():  # weights updated or modules swapped (quantized)
            self._step = None
            self._compiled_speculative.clear()
            if not FastDecoder.supports(self.model):
                self.fast = None
            else:
                self.fast.refresh()
        return self.fast

    def _decode_fn(self, uniform: bool):
        """(tokens (B,), cache) -> logits (B, V), advancing every row by one token."""
        if self._fast_decoder() is None:
            return lambda tokens, cache: self.model(tokens[:, None], cache=cache)[:, 0]
        if self.compile:  # static shapes: attend over the whole capacity with a mask (see FastDecoder.step)
            if self._step is None:
                self._step = torch.compile(self.fast.step, dynamic=False)

            def compiled(tokens, cache):
                logits = self._step(tokens, cache, None, False)
                cache.lengths += 1
                return logits
            return compiled

        def fast(tokens, cache):
            logits = self.fast.step(tokens, cache, int(cache.lengths.max()) + 1, uniform)
            cache.lengths += 1
            return logits
        return fast

    def _run(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stops,
             budget: ThinkingBudget | None = None) -> Iterator[list[int | None]]:
        B = len(prompts)
        with torch.inference_mode():
            cache = self._cache_for(B, max(len(p) for p in prompts) + max_new_tokens)
            uniforms = row_uniforms(seed, B, max_new_tokens, self.device) if temperature > 0 else None
            step_fn = self._decode_fn(uniform=len({len(p) for p in prompts}) == 1)
            t0 = time.perf_counter()
            logits, passes = self._prefill(cache, prompts)
            tok = sample(logits, temperature, top_k, top_p, None if uniforms is None else uniforms[:, 0])
            t_prefill = time.perf_counter() - t0
        done = [False] * B
        produced = 0
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            if i > 0:
                with torch.inference_mode():
                    logits = step_fn(tok, cache)
                    passes += 1
                    tok = sample(logits, temperature, top_k, top_p, None if uniforms is None else uniforms[:, i])
            toks = tok.tolist()
            if budget is not None:  # a forced </think> replaces the sampled token, and is what the model reads next
                forced = [None if done[r] else budget(r, toks[r : r + 1])[1] for r in range(B)]
                if any(f is not None for f in forced):
                    toks = [t if f is None else f for t, f in zip(toks, forced)]
                    tok = torch.tensor(toks, device=tok.device)
            if self.last_logprobs is not None:
                with torch.inference_mode():
                    lps = token_logprobs(logits[:, None], Sampling(float(temperature), top_k, top_p),
                                         [[t] for t in toks])
                for r in range(B):
                    if not done[r]:
                        self.last_logprobs[r] += lps[r]
            out: list[int | None] = []
            for r in range(B):
                if done[r]:
                    out.append(None)
                    continue
                out.append(toks[r])
                produced += 1
                done[r] = toks[r] in stops
            if i == max_new_tokens - 1 or all(done):
                self._finish(prompts, produced, passes, t_prefill, time.perf_counter() - t1, i + 1, budget)
            yield out
            if all(done):
                break

    def _run_speculative(self, prompts, max_new_tokens, k, stops, sampling: Sampling, seed,
                         budget: ThinkingBudget | None = None) -> Iterator[list[int | None]]:
        """MTP speculation (engine/speculative.py); each round's tokens are yielded one column at a time."""
        B, longest = len(prompts), max(len(p) for p in prompts)
        with torch.inference_mode():
            # a row may overshoot max_new_tokens by k within a round, then still verifies k + 1 tokens
            cache = HybridCache(self.config, B, longest + max_new_tokens + 2 * k + 1, self.dtype, self.device,
                                max_rollback=k + 1, include_mtp=True)
            uniforms = None
            if sampling.temperature > 0:
                uniforms = row_uniforms(seed, B, 1 + max_new_tokens * uniforms_per_round(k), self.device)
            fast = self._fast_decoder()
        stats: dict = {}
        record = None if self.last_logprobs is None else [[] for _ in prompts]
        rounds = speculative_rounds(self.model, fast, cache, prompts, max_new_tokens, k, self.prefill_chunk, stops,
                                    stats, sampling, uniforms, budget,
                                    self._compiled_speculative if self.compile else None, record)
        count, done, produced = [0] * B, [False] * B, 0
        t0 = time.perf_counter()
        t_prefill = None
        while True:
            with torch.inference_mode():
                new = next(rounds, None)
            if t_prefill is None:
                t_prefill, t1 = time.perf_counter() - t0, time.perf_counter()
            if new is None:
                break
            for j in range(max(len(row) for row in new)):
                col: list[int | None] = []
                for r in range(B):
                    ok = j < len(new[r]) and not done[r] and count[r] < max_new_tokens
                    col.append(new[r][j] if ok else None)
                    if ok:
                        count[r], produced = count[r] + 1, produced + 1
                        done[r] = new[r][j] in stops or count[r] == max_new_tokens
                if all(done):
                    self._finish(prompts, produced, stats.get("forward_passes", 1), t_prefill,
                                 time.perf_counter() - t1, stats.get("rounds", 0) + 1, budget)
                    self.last_stats.update({name: v for name, v in stats.items() if name != "forward_passes"})
                if record is not None and all(done):  # the tokens emitted are each row's first count[r]
                    self.last_logprobs = [lp[:n] for lp, n in zip(record, count)]
                if any(t is not None for t in col):
                    yield col
            if all(done):
                break
        if record is not None:
            self.last_logprobs = [lp[:n] for lp, n in zip(record, count)]

    def _finish(self, prompts, produced, passes, t_prefill, t_decode, steps, budget=None) -> None:
        n_prompt = sum(len(p) for p in prompts)
        self.last_stats = {
            "batch": len(prompts),
            "prompt_tokens": n_prompt,
            "new_tokens": produced,
            "prefill_s": t_prefill,
            "prefill_tok_s": n_prompt / t_prefill if t_prefill > 0 else float("inf"),
            "decode_steps": steps - 1,
            "decode_s": t_decode,
            "decode_tok_s": (produced - len(prompts)) / t_decode if t_decode > 0 and steps > 1 else 0.0,
            "forward_passes": passes,
            "path": ("compiled " if self.compile and self.fast else "") + ("fast" if self.fast else "reference"),
        }
        if budget is not None:
            self.last_stats["thinking_forced"] = list(budget.forced)  # times each row's </think> was forced
