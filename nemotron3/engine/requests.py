"""A request's state in the scheduler (`Request`, `Seq`, `Event`), and sampling its rows, each under its own law:
rows are grouped by (temperature, top_k, top_p) and each group sampled at once, every row from its own stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nemotron3.engine.params import SamplingParams
from nemotron3.engine.sampling import fresh_seed, log_law, row_stream, sample
from nemotron3.engine.speculative import uniforms_per_round
from nemotron3.engine.thinking import ThinkingBudget, ThinkTokens

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class Request:
    """One sequence to generate. `stream_index`: which row stream of the seed it samples from (choice i of n uses
    stream i, as row i of `Engine.generate([prompt] * n, params)`). `constrain(tokens) -> (n, token)`: a hook told
    the request's new tokens in order, which may keep the first n and replace the last by `token` (the thinking
    budget is one, engine/thinking.py)."""

    prompt: list[int]
    params: SamplingParams
    stream_index: int = 0
    constrain: Callable[[list[int]], tuple[int, int | None]] | None = None


@dataclass
class Event:
    """What one step produced for one request."""

    tokens: list[int]
    logprobs: list[float] | None = None  # each token's log-probability (params.logprobs_mode)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the most likely (id, logprob)
    finish: str | None = None  # one of FINISH_REASONS on the request's last event
    accepted: int | None = None  # speculative round: drafts accepted (the row emitted accepted + 1)


@dataclass(eq=False)
class Seq:
    """A submitted request's state (the handle `submit` returns)."""

    req: Request
    on_event: Callable[[Event], None]
    max_tokens: int
    uniforms: torch.Tensor | None
    stops: frozenset[int]
    budget: ThinkingBudget | None
    group: list[Seq] = field(default_factory=list)
    row: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    tail: tuple | None = None  # the last prompt chunk, until the group joins: (start, hidden (c, H), ids (c,))
    produced: int = 0
    rounds: int = 0
    done: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    @classmethod
    def build(cls, req: Request, on_event: Callable[[Event], None], max_tokens: int, k: int, eos: list[int],
              think_tokens: ThinkTokens, device: torch.device, group: list[Seq]) -> Seq:
        """The state of a checked request: its uniform stream (one uniform per token, 1 + 2k + 1 per round with k
        drafts; a seed drawn when it has none), its stop ids (None: `eos`) and its thinking budget."""
        p, uniforms = req.params, None
        if not p.greedy:
            steps = 1 + max_tokens * uniforms_per_round(k) if k else max_tokens
            uniforms = row_stream(fresh_seed() if p.seed is None else p.seed, req.stream_index, steps, device)
        stops = frozenset(eos if p.stop_token_ids is None else p.stop_token_ids)
        budget = None
        if p.max_thinking_tokens is not None:
            budget = ThinkingBudget(think_tokens, [p.max_thinking_tokens], [req.prompt], p.thinking_grace)
        return cls(req, on_event, max_tokens, uniforms, stops, budget, group)

    @property
    def params(self) -> SamplingParams:
        return self.req.params

    def cut(self, tokens: list[int]) -> tuple[int, int | None]:
        """The request's hook (its own, else its thinking budget's) on its new tokens: (keep n, forced token)."""
        if self.req.constrain is not None:
            return self.req.constrain(tokens)
        return (len(tokens), None) if self.budget is None else self.budget(0, tokens)


def check_prompt(prompt: list[int], vocab: int, name: str = "the prompt") -> None:
    """ValueError naming `name` unless `prompt` is a non-empty list of token ids in [0, vocab)."""
    if not prompt:
        raise ValueError(f"{name} is empty: it needs at least one token")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise ValueError(f"{name} holds non-integer token ids")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


def row_groups(seqs: list[Seq]) -> dict[tuple, tuple[SamplingParams, list[int]]]:
    """Rows with the same sampling law, by (temperature, top_k, top_p); every greedy row in one."""
    groups: dict[tuple, tuple[SamplingParams, list[int]]] = {}
    for i, s in enumerate(seqs):
        p = s.params
        key = (0.0, 0, 1.0) if p.greedy else (float(p.temperature), p.top_k, float(p.top_p))
        groups.setdefault(key, (p, []))[1].append(i)
    return groups

def sample_rows(logits: torch.Tensor, seqs: list[Seq], column: list[int]) -> list[int]:
    """logits (b, V), row i's uniform at column[i] of its stream -> tokens."""
    out = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
    for p, idx in row_groups(seqs).values():
        u = None if p.greedy else torch.stack([seqs[i].uniforms[column[i]] for i in idx])
        out[idx] = sample(logits[idx], p.temperature, p.top_k, p.top_p, u)
    return out.tolist()

def row_laws(seqs: list[Seq]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """logits (b, ..., V) -> each row's sampling law; None when every row is greedy."""
    groups = row_groups(seqs)
    if list(groups) == [(0.0, 0, 1.0)]:
        return None

    def laws(logits: torch.Tensor) -> torch.Tensor:
        out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        for p, idx in groups.values():
            out[idx] = p.probs(logits[idx])
        return out
    return laws


def token_logprobs_of(logits: torch.Tensor, tokens: list[int], params: SamplingParams
                      ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """logits (t, V) of one row's emitted tokens -> their log-probabilities (params.logprobs_mode) and, per token,
    the params.logprobs most likely (id, logprob)."""
    lp = log_law(logits, params.temperature, params.top_k, params.top_p, params.logprobs_mode)  # (t, V)
    own = lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
    if not params.logprobs:
        return own, [[] for _ in tokens]
    v, i = lp.topk(min(params.logprobs, lp.shape[-1]), dim=-1)
    return own, [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
