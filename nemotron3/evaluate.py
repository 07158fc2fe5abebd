"""Evaluation that generates: greedy exact match on held-out task problems, through the inference engine.

**Greedy generation without a cache.** Prompts of different lengths share one batch without padding tricks:
rows are right-padded, and at every position t a row still inside its prompt is *fed its own prompt token*
while a row past its prompt takes the argmax. The model is causal, so a row's logits at t depend only on its
tokens ≤ t and the padding after them never matters: the result equals generating each prompt alone
(`greedy_generate_reference`, tested). Each step recomputes the whole prefix: quadratic in length, the
cache-free definition that the engine's cached generation is checked against.

`task_accuracy` scores what the model writes with each family's verifier (nemotron3.tasks). It sits above
`train/` (loss-only evaluation) because it runs the engine; RL and the pipeline call it too.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3 import tasks
from nemotron3.engine import Engine
from nemotron3.train.tokenizer import Tokenizer


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuation of each prompt (ids), up to `max_new_tokens` or a stop token (included)."""
    lens = torch.tensor([len(p) for p in prompts])
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    B, width = len(prompts), int(lens.max()) + max_new_tokens
    ids = torch.zeros(B, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    done = torch.zeros(B, dtype=torch.bool)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long)
    end = lens + max_new_tokens  # exclusive end of each row's generation
    for t in range(int(lens.min()), width):
        active = (~done) & (t < end)
        if not bool(active.any()):
            break
        rows = active.nonzero().squeeze(1)  # finished rows drop out of the forward
        nxt = torch.zeros(B, dtype=torch.long)
        nxt[rows] = model(ids[rows, :t])[:, -1].argmax(-1)
        gen = active & (t >= lens)  # rows generating (not still reading their prompt)
        ids[gen, t] = nxt[gen]
        done |= gen & torch.isin(nxt, stop)
    return [ids[i, len(p): _stop_end(ids[i], len(p), int(end[i]), stop)].tolist() for i, p in enumerate(prompts)]


def _stop_end(row: torch.Tensor, start: int, end: int, stop: torch.Tensor) -> int:
    hits = torch.isin(row[start:end], stop).nonzero()
    return start + int(hits[0]) + 1 if len(hits) else end


@torch.no_grad()
def greedy_generate_reference(model: nn.Module, prompt: list[int], max_new_tokens: int,
                              stop_ids: set[int]) -> list[int]:
    """One prompt, one token at a time: the definition `greedy_generate` must match."""
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
        if nxt in stop_ids:
            break
    return out


def task_accuracy(model: nn.Module, tokenizer: Tokenizer, n_per_family: int = 20, difficulty: int = 1, seed: int = 0,
                  families: list[str] | None = None, batch_size: int = 32, engine: bool = True) -> dict[str, dict]:
    """Greedy exact-match accuracy on held-out problems of each family, scored by the family's verifier.

    The prompt is `<s>{prompt}\\n`, exactly how a pretraining document begins, and the model must write the
    whole `<think>` trace and the answer itself. Generation runs on the inference `Engine` (KV + SSM cache);
    `engine=False` uses `greedy_generate` above, the cache-free definition. Returns
    {family: {"accuracy", "n", "example"}}.
    """
    was_training = model.training
    model.eval()
    results = {}
    for family in families or sorted(tasks.FAMILIES):
        problems = tasks.generate(family, n_per_family, seed=seed, split="heldout", difficulty=difficulty)
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt + "\n")] for p in problems]
        budget = max(len(tokenizer.encode(p.completion())) for p in problems) * 3 // 2 + 8
        stops = {tokenizer.eos_id, tokenizer.end_of_turn_id}
        outs = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            if engine:
                gen = Engine(model, max_seq_len=max(map(len, chunk)) + budget)
                outs += gen.generate(chunk, budget, stop_token_ids=sorted(stops)).tokens
            else:
                outs += greedy_generate(model, chunk, budget, stops)
        completions = [tokenizer.decode(o) for o in outs]
        rewards = tasks.family_reward(family)([p.prompt for p in problems], completions)
        results[family] = {"accuracy": sum(rewards) / len(rewards), "n": len(rewards),
                           "example": {"prompt": problems[0].prompt, "completion": completions[0],
                                       "reward": rewards[0]}}
    model.train(was_training)
    return results

