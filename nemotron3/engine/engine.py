"""Engine: batched generation from a HybridLM, through the one scheduler (engine/scheduler.py).

    engine = Engine(model)
    out = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=32))     # greedy
    out = engine.generate([[1, 2, 3], [4, 5]], 32, temperature=0.8, seed=0)       # the keyword form, the same
    out.tokens  -> [[...32 ids], [...]]   (new tokens only; a stop token ends a row and is included)
    out.stats   -> {"prefill_tok_s": ..., "decode_tok_s": ..., "forward_passes": ..., ...}
    for step in engine.stream(prompts, params):       # step: one token per row, or None
        ...

A call submits its prompts to a `Scheduler` as one group of a static batch and steps it until idle: the prompts
are prefilled together in segments of `prefill_chunk` columns (docs/inference.md §2), then every row decodes one
token per step, or one MTP speculative round (engine/speculative.py), until every row is done; a finished row
stays in the batch (its tokens discarded), so shapes are fixed and `compile=True` compiles each step once. With
`n` > 1 each prompt is repeated n times, its choices next to each other; row i samples from stream i of the seed.

Decode runs through `FastDecoder` (engine/decode.py, docs/inference.md §3) when `FastDecoder.supports(model)`,
else through the reference cached path. `compile=True` wraps the fast step (and the speculative verify and MTP
forwards) in `torch.compile`; the first call compiles, which takes far longer than a step, so it pays for long or
repeated generation. The engine keeps its scheduler, and so its cache, between calls and reuses it when the batch
size and speculation match and its capacity lies between the need and twice it: repeated calls neither reallocate
nor recompile. `num_speculative_tokens` None (the default) is the device's default (engine/params.py: 0 on a CPU,
where speculation was measured slower); the stats then hold `acceptance_length` and friends.

Threads: decode-sized ops run on one core whatever `torch.get_num_threads()` says, and on a machine whose cores
are busy with other work, every parallel op waits at its OpenMP barrier for the slowest thread. Set the thread
count for the process (`torch.set_num_threads`, `nemotron3 generate --threads`) to what the machine can give.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from nemotron3.engine.cache import HybridCache
from nemotron3.engine.decode import FastDecoder, batch_bucket
from nemotron3.engine.params import SamplingParams, speculative_config
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
    """`generate(prompts, params)` or the keyword form `generate(prompts, max_new_tokens, temperature=..., ...)`
    -> SamplingParams (a list of them, one per prompt, when `max_thinking_tokens` is a list). `return_logprobs`
    asks for each token's log-probability under its sampling law (logprobs=0, logprobs_mode="sampled")."""
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
    """Generation with a preallocated hybrid cache; see the module docstring.

    max_seq_len: the most tokens (prompt + new) one row may hold; default the config's `max_position_embeddings`.
    prefill_chunk: prompt tokens per prefill forward. fast: use FastDecoder when the model allows it. compile:
    torch.compile the fast decode step. think_tokens: the ids a thinking budget needs (engine/thinking.py).
    """

    def __init__(self, model: HybridLM, max_seq_len: int | None = None, prefill_chunk: int = 2048, fast: bool = True,
                 compile: bool = False, think_tokens: ThinkTokens | None = None) -> None:
        self.model = model.eval()
        self.think_tokens = think_tokens or ThinkTokens()
        self.config = model.config
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.device = model.lm_head.weight.device
        self.fast = FastDecoder(model, traceable=compile) if fast and FastDecoder.supports(model) else None
        self.compile = compile
        self._compiled: dict | None = {} if compile else None  # torch.compile'd steps, kept across calls
        self.scheduler: Scheduler | None = None
        self.last_stats: dict = {}
        self.last_logprobs: list[list[float]] | None = None
        self._top: list | None = None

    @property
    def _cache(self) -> HybridCache | None:
        return None if self.scheduler is None else self.scheduler.cache

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: list[list[int]], params: SamplingParams | int | None = None, **kwargs) -> Generation:
        """New tokens for each row (a stop token ends its row and is included) and the call's stats; `params` a
        SamplingParams, or the keyword form (max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids,
        num_speculative_tokens, max_thinking_tokens (one budget or one per prompt), thinking_grace,
        return_logprobs). Logprobs (params.logprobs) come from the engine's own forward (the verify forward under
        speculation); a forced `</think>` gets the log-probability of that token."""
        out: list[list[int]] = []
        for step in self.stream(prompts, params, **kwargs):
            out += [[] for _ in range(len(step) - len(out))]
            for row, tok in enumerate(step):
                if tok is not None:
                    out[row].append(tok)
        return Generation(out, dict(self.last_stats), self.last_logprobs, self._top)

    def stream(self, prompts: list[list[int]], params: SamplingParams | int | None = None,
               **kwargs) -> Iterator[list[int | None]]:
        """Yield one list per step: the new token of each row, or None for a row with no token in this step (it
        has stopped, or, with speculative decoding, it got fewer tokens from this verify forward).

        Everything is checked before any work starts. `engine.last_stats` holds the stats once the iterator is
        exhausted, and with logprobs `engine.last_logprobs` each row's token log-probabilities."""
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
        """Say that the model's weights changed: the fast decoder's fused copies are rebuilt on the next call.

        In-place updates are normally seen through the tensors' version counters, but a fused optimizer step
        (`torch.optim.AdamW(fused=True)`, the training stack's default on CPU) writes the parameters without
        bumping them; a trainer that generates between its steps (RL) calls this after each step."""
        if self.fast is not None:
            self.fast._versions = None  # never equal to a signature: stale

    # ------------------------------------------------------------------ the work
    def _check(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of token-id lists")
        if all(isinstance(t, int) for t in prompts):
            raise ValueError("prompts must be a list of prompts, each a list of token ids: wrap one prompt as [ids]")
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
        return clean

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
            "batch": len(rows),
            "prompt_tokens": n_prompt,
            "new_tokens": produced,
            "prefill_s": t_prefill,
            "prefill_tok_s": n_prompt / t_prefill if t_prefill > 0 else float("inf"),
            "decode_steps": steps - 1,
            "decode_s": t_decode,
            "decode_tok_s": (produced - len(rows)) / t_decode if t_decode > 0 and steps > 1 else 0.0,
            "forward_passes": sched.stats["forward_passes"],
            "path": ("compiled " if self.compile and self.fast else "") + ("fast" if self.fast else "reference"),
            **sched.speculation_stats(),
        }
        if any(s.budget is not None for s in seqs):  # times each row's </think> was forced
            self.last_stats["thinking_forced"] = [s.budget.forced[0] if s.budget else 0 for s in seqs]
