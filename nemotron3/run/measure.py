"""The pipeline's inference measurements: MTP speculation against plain decoding, and the engine against
transformers on the same weights.

Both time whole `generate` calls of one prompt at a time (batch 1: a chat user's case, and where speculation
can pay), alternating the contenders so that a slow spell of the machine hits both, and keep the best of
`repeats`. Speculation is lossless, so each speculative run must emit exactly the plain greedy tokens; that is
checked, not assumed. Timing lives here, in the pipeline, because its report prints what the run measured;
the tests check only the outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nemotron3 import tasks
from nemotron3.engine import Engine
from nemotron3.evaluate import chat_prompt
from nemotron3.train.tokenizer import Tokenizer


def heldout_chat_prompts(tokenizer: Tokenizer, n: int, seed: int = 0, difficulty: int = 1) -> list[list[int]]:
    """n held-out task problems spread round-robin over the families, as reasoning-on chat prompts (token ids)."""
    fams = sorted(tasks.FAMILIES)
    per = -(-n // len(fams))
    by_family = [tasks.generate(f, per, seed=seed, split="heldout", difficulty=difficulty) for f in fams]
    problems = [by_family[i % len(fams)][i // len(fams)] for i in range(n)]
    return [chat_prompt(tokenizer, p.prompt, thinking=True) for p in problems]


def _best(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each function over `repeats` alternating rounds, and each one's last output."""
    best = dict.fromkeys(fns, float("inf"))
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, outs


def speculative_speedup(model: nn.Module, prompts: list[list[int]], ks: tuple[int, ...] = (1, 2, 3),
                        new_tokens: int = 96, repeats: int = 2) -> dict:
    """Plain greedy decoding against MTP speculation with k = 1..K draft tokens, one prompt at a time.

    Rows stop at the model's end-of-sequence tokens. Per k: the acceptance length (tokens emitted per verify
    forward, the bonus token included; a mean over the prompts' rounds), the decode tok/s summed over the prompts
    (new tokens over the best total time of their calls) and its ratio to plain decoding, and whether every
    prompt's tokens equal plain greedy decoding's.
    """
    engine = Engine(model)

    def run_all(k: int) -> tuple[list[list[int]], list[float]]:
        tokens, acc = [], []
        for p in prompts:
            g = engine.generate([p], new_tokens, num_speculative_tokens=k)
            tokens.append(g.tokens[0])
            if k:
                acc.append(g.stats["acceptance_length"])
        return tokens, acc

    run_all(0)  # warm-up
    best, outs = _best({str(k): (lambda k=k: run_all(k)) for k in (0, *ks)}, repeats)
    plain_tokens = outs["0"][0]
    n_new = sum(len(t) for t in plain_tokens)
    plain_tok_s = n_new / best["0"]
    result = {"prompts": len(prompts), "new_tokens": n_new, "plain_tok_s": plain_tok_s, "by_k": {}}
    for k in ks:
        tokens, acc = outs[str(k)]
        tok_s = sum(len(t) for t in tokens) / best[str(k)]
        result["by_k"][k] = {"acceptance_length": sum(acc) / len(acc), "tok_s": tok_s, "speedup": tok_s / plain_tok_s,
                             "identical": tokens == plain_tokens}
    return result


def transformers_available() -> str | None:
    """None when transformers can be imported, else why not (the speed stage then says so and is skipped)."""
    try:
        from transformers import NemotronHForCausalLM  # noqa: F401
    except ImportError as e:
        return f"transformers is not installed ({e}); `pip install -e .[peers]` adds it"
    return None


def engine_vs_transformers(folder: Path, model: nn.Module, prompt: list[int], new_tokens: int = 128,
                           repeats: int = 3) -> dict:
    """tok/s of transformers' `generate` and of our Engine on the checkpoint in `folder`, batch 1, greedy,
    `new_tokens` new tokens (no stop token), best of `repeats` alternating calls; and whether they emit the
    same tokens. `model` is our load of the same folder."""
    from transformers import NemotronHForCausalLM

    hf = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # always new_tokens tokens, as ours with stop_token_ids=[]
    hf.generation_config.pad_token_id = model.config.pad_token_id or 0
    ids = torch.tensor([prompt])
    engine = Engine(model)

    def run_hf() -> list[int]:
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].tolist()

    def run_ours() -> list[int]:
        return engine.generate([prompt], new_tokens, stop_token_ids=[]).tokens[0]

    run_hf(), run_ours()  # warm-up
    best, outs = _best({"transformers": run_hf, "nemotron3": run_ours}, repeats)
    hf_tok_s, ours_tok_s = new_tokens / best["transformers"], new_tokens / best["nemotron3"]
    return {"new_tokens": new_tokens, "prompt_tokens": len(prompt), "transformers_tok_s": hf_tok_s,
            "nemotron3_tok_s": ours_tok_s, "ratio": ours_tok_s / hf_tok_s,
            "identical": outs["transformers"] == outs["nemotron3"]}
