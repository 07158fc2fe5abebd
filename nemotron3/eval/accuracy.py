"""Evaluation that generates: greedy exact match on held-out task problems, through the inference engine.

**Greedy generation without a cache.** Prompts of different lengths share one batch without padding tricks:
rows are right-padded, and at every position t a row still inside its prompt is *fed its own prompt token*
while a row past its prompt takes the argmax. The model is causal, so a row's logits at t depend only on its
tokens ≤ t and the padding after them never matters: the result equals generating each prompt alone
(`greedy_generate_reference`, tested). Each step recomputes the whole prefix: quadratic in length, the
cache-free definition that the engine's cached generation is checked against.

`task_accuracy` scores what the model writes with each family's verifier (nemotron3.tasks), prompted as a
pretraining document begins; `accuracy_by_mode` asks the same held-out problems as a chat, with reasoning on, off,
and under thinking budgets (docs/post-training.md §4). They sit above `train/` (loss-only evaluation) because they
run the engine; SFT, RL and the pipeline call them.
"""

from __future__ import annotations

import torch
from torch import nn

from nemotron3 import tasks
from nemotron3.engine import Engine
from nemotron3.eval.data import problem_items
from nemotron3.eval.runner import generate_batched, grade_all
from nemotron3.tokenizer import Tokenizer


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuation of each prompt (ids), up to `max_new_tokens` or a stop token (included)."""
    dev = next(model.parameters()).device
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    B, width = len(prompts), int(lens.max()) + max_new_tokens
    ids = torch.zeros(B, width, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=dev)
    end = lens + max_new_tokens  # exclusive end of each row's generation
    for t in range(int(lens.min()), width):
        active = (~done) & (t < end)
        if not bool(active.any()):
            break
        rows = active.nonzero().squeeze(1)  # finished rows drop out of the forward
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
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


def _exact_match(model: nn.Module, tokenizer: Tokenizer, family: str, problems: list[tasks.Problem],
                 prompts: list[list[int]], batch_size: int, engine: bool = True, engine_kwargs: dict | None = None,
                 generate_kwargs: dict | None = None, think_open: bool = False) -> dict:
    """Greedy completions of `prompts` graded by the family's verifier: {"accuracy", "n", "example"}.

    Generation and grading are `nemotron3 eval`'s (eval/runner.py, format `task`): batched through one Engine,
    the answer read after the last `</think>`; with `think_open` (the prompt opened the think block) a completion
    that never closed it answers nothing."""
    budget = max(len(tokenizer.encode(p.completion())) for p in problems) * 3 // 2 + 8
    stops = sorted({tokenizer.eos_id, tokenizer.end_of_turn_id})
    if engine:
        gen = Engine(model, max_seq_len=max(map(len, prompts)) + budget, **(engine_kwargs or {}))
        outs = generate_batched(gen, prompts, budget, stops, batch_size, **(generate_kwargs or {}))
    else:
        outs = [o for i in range(0, len(prompts), batch_size)
                for o in greedy_generate(model, prompts[i: i + batch_size], budget, set(stops))]
    completions = [tokenizer.decode(o) for o in outs]  # a final stop token shown (grading cuts the text there)
    rewards = [float(ok) for _, ok, _ in grade_all(problem_items(problems), completions, think_open)]
    return {"accuracy": sum(rewards) / len(rewards), "n": len(rewards),
            "example": {"prompt": problems[0].prompt, "completion": completions[0], "reward": rewards[0]}}


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
    for family in families or tasks.default_families():
        problems = tasks.generate(family, n_per_family, seed=seed, split="heldout", difficulty=difficulty)
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p.prompt + "\n")] for p in problems]
        results[family] = _exact_match(model, tokenizer, family, problems, prompts, batch_size, engine)
    model.train(was_training)
    return results


# ----------------------------------------------------------------------------------------- by reasoning mode
def mode_names(budgets: list[int] | tuple[int, ...] = ()) -> list[str]:
    """`on`, `off`, then `budget_N` for each thinking budget N."""
    return ["on", "off", *(f"budget_{n}" for n in budgets)]


def chat_prompt(tokenizer: Tokenizer, prompt: str, thinking: bool = True) -> list[int]:
    """`<s>` + a one-user-turn conversation with the generation prompt (docs/post-training.md §1)."""
    text = tokenizer.render([{"role": "user", "content": prompt}], enable_thinking=thinking, add_generation_prompt=True)
    return [tokenizer.bos_id, *tokenizer.encode(text)]


def accuracy_by_mode(model: nn.Module, tokenizer: Tokenizer, n_per_family: int = 20, difficulty: int = 1,
                     seed: int = 0, budgets: list[int] | tuple[int, ...] = (), families: list[str] | None = None,
                     batch_size: int = 64, modes: list[str] | None = None) -> dict[str, dict[str, dict]]:
    """Greedy exact match on held-out problems of each family, asked as a chat, in each reasoning mode.

    Modes: `on` (the generation prompt ends in `<think>\\n`: the model writes its reasoning, closes it and
    answers), `off` (the prompt ends in `<think></think>`: the answer directly), and `budget_N` for each N in
    `budgets` (reasoning on, with `Engine.generate(..., max_thinking_tokens=N)` closing the think block after N
    reasoning tokens, at a newline when one comes within the grace window). Generation stops at `<|im_end|>`
    (or `</s>`); the family's verifier reads the answer after the last `</think>`. Held-out problems are the same
    in every mode and as `task_accuracy`'s for the same seed. `modes` keeps only those of the modes (e.g.
    `["on"]`). Returns {mode: {family: {"accuracy", "n", "example"}}}.
    """
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, dict]] = {m: {} for m in mode_names(budgets) if modes is None or m in modes}
    think_kwargs: dict = {}
    if budgets:
        from nemotron3.engine.thinking import ThinkTokens

        think_kwargs = {"think_tokens": ThinkTokens.from_tokenizer(tokenizer)}
    for family in families or tasks.default_families():
        problems = tasks.generate(family, n_per_family, seed=seed, split="heldout", difficulty=difficulty)
        for mode in results:
            prompts = [chat_prompt(tokenizer, p.prompt, thinking=mode != "off") for p in problems]
            kwargs = {"max_thinking_tokens": int(mode.split("_")[1])} if mode.startswith("budget_") else {}
            results[mode][family] = _exact_match(model, tokenizer, family, problems, prompts, batch_size,
                                                 engine_kwargs=think_kwargs if kwargs else None,
                                                 generate_kwargs=kwargs, think_open=mode != "off")
    model.train(was_training)
    return results
