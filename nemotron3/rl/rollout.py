"""Rollouts: G sampled completions per prompt from the current policy, through the engine.

    params = SamplingParams(max_tokens=128, temperature=1.0, seed=step_seed, num_speculative_tokens=3)
    batch = rollout(engine, tokenizer, prompt_ids, num_generations=8, params=params)
    batch.completion_ids, batch.logprobs, batch.texts, batch.truncated, batch.stats

Each prompt (token ids, already rendered with the chat template and its generation prompt) is repeated G
times, the repeats of one prompt next to each other (the group), and all P·G rows are generated as one
batch with the engine's cache. Each row draws from its own uniform stream (engine/sampling.py), so the
samples depend only on (seed, row, weights), and on nothing else in the batch.

With `params.num_speculative_tokens = k > 0` the engine decodes with the model's MTP block drafting k tokens per verify
forward, by lossless speculative sampling (engine/speculative.py): the completions have exactly the
policy's law, and the log-probabilities reported are the target's, from the verify forward. Greedy
speculation gives the very tokens of plain greedy decoding; sampled speculation the same law but not the
same draws (it reads its uniforms differently), which tests/rl/test_rl_rollout.py checks statistically.

A completion ends at a stop token (`<|im_end|>` or `</s>`, kept: the policy learns to stop) or at
`params.max_tokens` (then `truncated`). `logprobs[i][t]` is the engine's log π(token t) under the
sampling law (logprobs_mode "sampled"): the trainer recomputes the same numbers with a full forward and logs how
far apart they are (`token_mult_prob_error`, rl/grpo.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from nemotron3.engine import Engine, SamplingParams
from nemotron3.tokenizer import Tokenizer


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]  # (P·G) rows, the prompt of each
    completion_ids: list[list[int]]  # the sampled tokens, a stop token included when one ended the row
    logprobs: list[list[float]]  # the engine's log-probability of each completion token
    texts: list[str]  # completions decoded, stop tokens removed, special tokens such as </think> kept
    truncated: list[bool]  # ended by max_completion_length, not by a stop token
    stats: dict = field(default_factory=dict)  # tokens, seconds, tok_s, acceptance_length (with speculation)
    loss_mask: list[list[float]] | None = None  # per completion token, 1 = trained (None: all); multi-turn sources


def rollout(engine: Engine, tokenizer: Tokenizer, prompt_ids: list[list[int]], num_generations: int,
            params: SamplingParams) -> RolloutBatch:
    """Sample `num_generations` completions of every prompt with `params` (its stop ids and logprobs are the
    rollout's own: the tokenizer's end ids, each token's log-probability under the sampling law)."""
    rows = [list(p) for p in prompt_ids for _ in range(num_generations)]
    stops = sorted({tokenizer.eos_id, tokenizer.end_of_turn_id})
    t0 = time.perf_counter()
    out = engine.generate(rows, replace(params, stop_token_ids=stops, logprobs=0, logprobs_mode="sampled", n=1))
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode([t for t in c if t not in stops]) for c in out.tokens]
    truncated = [not (c and c[-1] in stops) for c in out.tokens]
    n = sum(len(c) for c in out.tokens)
    stats = {"tokens": n, "seconds": seconds, "tok_s": n / seconds if seconds > 0 else 0.0}
    if "acceptance_length" in out.stats:
        stats["acceptance_length"] = out.stats["acceptance_length"]
    return RolloutBatch(rows, out.tokens, out.logprobs, texts, truncated, stats)
