"""Retrieval accuracy by context length: the long-context measure of issue 32 (docs/long-context.md).

For each length L (default 1k, 4k, 16k, 64k tokens), `n` held-out problems of the retrieval family
(tasks/retrieval.py) are filled to L tokens of the model's own tokenizer, counting the whole prompt the model
reads: `<s>{prompt}\\n`, exactly how a pretraining document begins (as `task_accuracy`). The model writes the
trace and answer greedily through the Engine (chunked prefill, KV + Mamba-state cache) and the family's verifier
grades the answer: exact match of the asked key's value. Reported per length: the accuracy with its standard
error (eval/metrics.py `mean_stderr`: the sample standard deviation of the 0/1 scores over √n), n, the mean
prompt tokens and the seconds spent.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from nemotron3 import tasks
from nemotron3.config import ModelConfig
from nemotron3.engine import cache_size
from nemotron3.eval.accuracy import _exact_match
from nemotron3.eval.metrics import mean_stderr
from nemotron3.tokenizer import Tokenizer

LENGTHS = (1024, 4096, 16384, 65536)


def attention_only(config: ModelConfig) -> ModelConfig:
    """The same model with every Mamba layer an attention layer (MoE layers and the MTP block unchanged)."""
    return config.replace(pattern=config.pattern.replace("M", "*"))


def cache_bytes(config: ModelConfig, tokens: int) -> dict[str, int]:
    """One row's fp32 cache bytes at `tokens` for the hybrid and its attention-only twin (computed, not allocated):
    the Mamba layers' state is constant in length, an attention layer's KV grows with it."""
    return {name: cache_size(c, 1, tokens, torch.float32, include_mtp=False).total
            for name, c in (("hybrid", config), ("attention_only", attention_only(config)))}


def prompt_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids the model reads for a problem prompt: `<s>`, the prompt, a newline."""
    return [tokenizer.bos_id, *tokenizer.encode(text + "\n")]


def problems_at(tokenizer: Tokenizer, length: int, n: int, seed: int = 0) -> list[tasks.Problem]:
    """`n` held-out retrieval problems whose prompts (as `prompt_tokens`) fill up to `length` tokens."""
    return tasks.generate_at_length(n, length, seed=seed, split="heldout",
                                    count=lambda text: len(prompt_tokens(tokenizer, text)))


@torch.no_grad()
def retrieval_accuracy(model: nn.Module, tokenizer: Tokenizer, lengths: tuple[int, ...] = LENGTHS, n: int = 20,
                       seed: int = 0, batch_size: int = 4, prefill_chunk: int = 2048) -> dict[int, dict]:
    """{length: {"accuracy", "stderr", "n", "prompt_tokens", "seconds", "example"}}: greedy exact match on `n`
    held-out retrieval problems at each length, through the Engine. `batch_size` rows decode together (each row's
    KV cache is 2·kv_heads·head_dim·bytes per attention layer per token: 64 MiB at 64k for `tiny` in fp32)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    was_training = model.training
    model.eval()
    out: dict[int, dict] = {}
    for length in lengths:
        t0 = time.perf_counter()
        problems = problems_at(tokenizer, length, n, seed)
        prompts = [prompt_tokens(tokenizer, p.prompt) for p in problems]
        res = _exact_match(model, tokenizer, "retrieval", problems, prompts, batch_size,
                           engine_kwargs={"prefill_chunk": prefill_chunk})
        correct = round(res["accuracy"] * res["n"])
        mean, se = mean_stderr([1.0] * correct + [0.0] * (res["n"] - correct))
        example = res["example"]
        out[length] = {"accuracy": mean, "stderr": se or 0.0, "n": res["n"],
                       "prompt_tokens": sum(map(len, prompts)) / len(prompts),
                       "seconds": round(time.perf_counter() - t0, 2),
                       "example": {"answer": problems[0].answer, "completion": example["completion"],
                                   "reward": example["reward"]}}
    model.train(was_training)
    return out


def format_table(results: dict[int, dict]) -> str:
    """A markdown table of `retrieval_accuracy`'s results, one row per length."""
    rows = ["| length (tokens) | exact match (± s.e.) | n | mean prompt tokens | seconds |", "|---|---|---|---|---|"]
    for length, r in results.items():
        rows.append(f"| {length:,} | {100 * r['accuracy']:.0f} ± {100 * r['stderr']:.0f} % | {r['n']} | "
                    f"{r['prompt_tokens']:,.0f} | {r['seconds']:.1f} |")
    return "\n".join(rows)
