"""Engine: batched generation from a HybridLM through the one scheduler (docs/inference.md).

    out = Engine(model).generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32))   # or generate(prompts, 32, ...)
    out.tokens, out.stats                   # new tokens per row (a stop token included), the call's statistics
    for step in engine.stream(prompts, params): ...                  # one token (or None) per row per step

A call submits its prompts to a `Scheduler` as one group of a static batch and steps it until idle; the scheduler,
and so its cache and its compiled steps, is kept between calls while the batch and the speculation match.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder, batch_bucket
from nemotron3.engine.params import SamplingParams, speculative_config
from nemotron3.engine.requests import check_prompt
from nemotron3.engine.sampling import fresh_seed
from nemotron3.engine.scheduler import Event, Request, Scheduler
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.model.hybrid import HybridLM

KEYWORDS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
            "seed": "seed", "stop_token_ids": "stop_token_ids", "num_speculative_tokens": "num_speculative_tokens",
            "max_thinking_tokens": "max_thinking_tokens", "thinking_grace": "thinking_grace", "n": "n"}


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row
    stats: dict = field(default_factory=dict)
    logprobs: list[list[float]] | None = None  # with params.logprobs: each new token's log-probability
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None  # per token, its most likely alternatives


def as_params(params: SamplingParams | int | None, kwargs: dict) -> SamplingParams | list[SamplingParams]:
    """`generate(prompts, params)` or the keyword form `generate(prompts, max_new_tokens, temperature=..., ...)` ->
    SamplingParams (one per prompt when `max_thinking_tokens` is a list); `return_logprobs`: logprobs=0, sampled."""
    if isinstance(params, SamplingParams):
        if kwargs:
            raise TypeError(f"give SamplingParams or keywords, not both: {', '.join(sorted(kwargs))}")
        return params
    if params is not None:
        kwargs = {**kwargs, "max_new_tokens": params}
    unknown = sorted(set(kwargs) - set(KEYWORDS) - {"return_logprobs"})
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
    fields = {KEYWORDS[name]: v for name, v in kwargs.items() if name in KEYWORDS}
    if kwargs.get("return_logprobs"):
        fields.update(logprobs=0, logprobs_mode="sampled")
    budgets = fields.get("max_thinking_tokens")
    if isinstance(budgets, (list, tuple)):
        base = SamplingParams(**{**fields, "max_thinking_tokens": None})
        return [replace(base, max_thinking_tokens=b) for b in budgets]
    return SamplingParams(**fields)


class Engine:
    """Generation with a kept scheduler and cache. max_seq_len: tokens (prompt + new) one row holds (default the
    config's max_position_embeddings); prefill_chunk: prompt tokens per prefill forward; fast: the FastDecoder when
    the model allows it; compile: the compiled decode step (one graph per batch bucket, docs/inference.md §3);
    think_tokens: the ids a thinking budget needs (engine/thinking.py)."""

    def __init__(self, model: HybridLM, max_seq_len: int | None = None, prefill_chunk: int = 2048, fast: bool = True,
                 compile: bool = False, think_tokens: ThinkTokens | None = None) -> None:
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.model, self.config, self.think_tokens = model.eval(), model.config, think_tokens or ThinkTokens()
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        self.prefill_chunk, self.device = prefill_chunk, model.lm_head.weight.device
        self.fast = FastDecoder(model, traceable=compile) if fast and FastDecoder.supports(model) else None
        self.compile = compile
        self._compiled: dict | None = {} if compile else None  # the compiled steps, kept across calls
        self.scheduler: Scheduler | None = None
        self.last_stats: dict = {}
        self.last_logprobs: list[list[float]] | None = None
        self._top: list | None = None

    @property
    def _cache(self) -> HybridCache | None:
        return None if self.scheduler is None else self.scheduler.cache

    def generate(self, prompts: list[list[int]], params: SamplingParams | int | None = None, **kwargs) -> Generation:
        """New tokens for each row (a stop token ends its row and is included) and the call's stats. `params`: a
        SamplingParams, or the keyword form (`as_params`; max_thinking_tokens may give one budget per prompt).
        Logprobs come from the engine's own forward (the verify forward under speculation)."""
        out: list[list[int]] = []
        for step in self.stream(prompts, params, **kwargs):
            out += [[] for _ in range(len(step) - len(out))]
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return Generation(out, dict(self.last_stats), self.last_logprobs, self._top)

    def stream(self, prompts: list[list[int]], params: SamplingParams | int | None = None,
               **kwargs) -> Iterator[list[int | None]]:
        """Yield per step the new token of each row, or None (stopped, or fewer tokens from this verify forward).
        Everything is checked before any work; `last_stats` (and `last_logprobs`) are set once exhausted."""
        params = as_params(params, kwargs)
        per_row = params if isinstance(params, list) else None
        params = per_row[0] if per_row else params
        prompts = self._check(prompts)
        if per_row is not None and len(per_row) != len(prompts):
            raise ValueError(f"max_thinking_tokens has {len(per_row)} budgets for {len(prompts)} prompts")
        spec = speculative_config(self.model, params.num_speculative_tokens)
        longest = max(len(p) for p in prompts)
        new = params.max_tokens or self.max_seq_len - longest - spec.room
        if longest + new + spec.room > self.max_seq_len or new <= 0:
            raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({new}) exceeds the engine's "
                             f"max_seq_len ({self.max_seq_len}); shorten the prompt or build Engine(model, "
                             "max_seq_len=...)")
        if not params.greedy and params.seed is None:  # one seed for the whole call: row i is its stream i
            params = replace(params, seed=fresh_seed())
        rows = [(p, replace(per_row[i] if per_row else params, seed=params.seed, max_tokens=new, n=1,
                            num_speculative_tokens=spec.k)) for i, p in enumerate(prompts) for _ in range(params.n)]
        return self._run(rows, spec.k, longest + new + spec.room)

    def weights_updated(self) -> None:
        """The model's weights changed: rebuild the fast decoder's fused copies on the next call (a fused optimizer
        step, RL's, writes the parameters without bumping the version counters `is_stale` watches)."""
        if self.fast is not None:
            self.fast._versions = None  # never equal to a signature: stale

    def _check(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if all(isinstance(t, int) for t in prompts):
            raise ValueError("prompts must be a list of prompts, each a list of token ids: wrap one prompt as [ids]")
        out = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
        for i, p in enumerate(out):
            check_prompt(p, self.config.vocab_size, f"prompt {i}")
        return out

    def _scheduler_for(self, rows: int, k: int, tokens: int) -> Scheduler:
        """Reuse the engine's scheduler when it has the same rows and drafts and room enough, but not over twice
        the room needed (the compiled step attends over the whole capacity); build one otherwise."""
        s, rows = self.scheduler, batch_bucket(rows) if self.compile else rows
        capacity = min(self.max_seq_len, -(-tokens // 256) * 256)
        if s is None or s.rows != rows or s.k != k or not tokens <= s.max_seq_len <= 2 * capacity:
            self.scheduler = None  # free the old cache first
            s = self.scheduler = Scheduler(self.model, rows, capacity, None, self.prefill_chunk,
                                           num_speculative_tokens=k, think_tokens=self.think_tokens, fast=self.fast,
                                           compiled=self._compiled, static=True)
        s.reset_stats()
        return s

    def _run(self, rows: list[tuple[list[int], SamplingParams]], k: int, tokens: int) -> Iterator[list[int | None]]:
        with torch.inference_mode():
            sched = self._scheduler_for(len(rows), k, tokens)
        events: list[list[Event]] = [[] for _ in rows]
        seqs = sched.submit_group([(Request(p, params, i), events[i].append) for i, (p, params) in enumerate(rows)])
        want_lp = rows[0][1].logprobs is not None
        self.last_logprobs = [[] for _ in rows] if want_lp else None
        self._top = [[] for _ in rows] if want_lp else None
        t0, t_first, produced, steps = time.perf_counter(), None, 0, 0
        while not sched.idle():
            sched.step()
            new = [[t for ev in evs for t in ev.tokens] for evs in events]
            if want_lp:
                for r, evs in enumerate(events):
                    self.last_logprobs[r] += [x for ev in evs for x in ev.logprobs or []]
                    self._top[r] += [x for ev in evs for x in ev.top_logprobs or []]
            for evs in events:
                evs.clear()
            width = max(map(len, new))
            if not width:
                continue
            if t_first is None:
                t_first, t1 = time.perf_counter() - t0, time.perf_counter()
            produced, steps = produced + sum(map(len, new)), steps + 1
            if sched.idle():
                self.fast = sched.fast
                self._finish(sched, seqs, rows, produced, t_first, time.perf_counter() - t1, steps)
            for j in range(width):
                yield [row[j] if j < len(row) else None for row in new]

    def _finish(self, sched: Scheduler, seqs, rows, produced, t_prefill, t_decode, steps) -> None:
        n_prompt = sum(len(p) for p, _ in rows)
        self.last_stats = {
            "batch": len(rows), "prompt_tokens": n_prompt, "new_tokens": produced, "prefill_s": t_prefill,
            "prefill_tok_s": n_prompt / t_prefill if t_prefill > 0 else float("inf"), "decode_steps": steps - 1,
            "decode_s": t_decode,
            "decode_tok_s": (produced - len(rows)) / t_decode if t_decode > 0 and steps > 1 else 0.0,
            "forward_passes": sched.stats["forward_passes"],
            "path": ("compiled " if self.compile and self.fast else "") + ("fast" if self.fast else "reference"),
            **sched.speculation_stats()}
        if any(s.budget is not None for s in seqs):  # times each row's </think> was forced
            self.last_stats["thinking_forced"] = [s.budget.forced[0] if s.budget else 0 for s in seqs]
