"""The pipeline's inference measurements: MTP speculation against plain decoding, and the engine against
transformers on the same weights, and where the two greedy decodes part.

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
from nemotron3.eval.accuracy import chat_prompt
from nemotron3.tokenizer import Tokenizer


def heldout_chat_prompts(tokenizer: Tokenizer, n: int, seed: int = 0, difficulty: int = 1) -> list[list[int]]:
    """n held-out task problems spread round-robin over the families, as reasoning-on chat prompts (token ids)."""
    fams = tasks.default_families()
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
    `new_tokens` new tokens (no stop token), best of `repeats` alternating calls; whether they emit the same
    tokens and, if not, where they part (`divergence`: a near-tie in fp32 logits, or a disagreement). `model`
    is our load of the same folder."""
    from transformers import NemotronHForCausalLM

    dev = next(model.parameters()).device  # both on the device ours runs on (--device)
    hf = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(dev)
    hf.generation_config.eos_token_id = None  # always new_tokens tokens, as ours with stop_token_ids=[]
    hf.generation_config.pad_token_id = model.config.pad_token_id or 0
    ids = torch.tensor([prompt], device=dev)
    engine = Engine(model)

    def run_hf() -> list[int]:
        with torch.no_grad():
            return hf.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].tolist()

    def run_ours() -> list[int]:
        return engine.generate([prompt], new_tokens, stop_token_ids=[]).tokens[0]

    def logits(m: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[list[int]], torch.Tensor]:
        def last(ids: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return m(torch.tensor([ids], device=dev))[0, -1]
        return last

    run_hf(), run_ours()  # warm-up
    best, outs = _best({"transformers": run_hf, "nemotron3": run_ours}, repeats)
    hf_tok_s, ours_tok_s = new_tokens / best["transformers"], new_tokens / best["nemotron3"]
    return {"new_tokens": new_tokens, "prompt_tokens": len(prompt), "transformers_tok_s": hf_tok_s,
            "nemotron3_tok_s": ours_tok_s, "ratio": ours_tok_s / hf_tok_s,
            "identical": outs["transformers"] == outs["nemotron3"],
            "divergence": divergence(prompt, outs["transformers"], outs["nemotron3"],
                                     logits(lambda ids: hf(ids).logits), logits(model))}


# ----------------------------------------------------------------------------------------- where two decodes part
NEAR_TIE = 1e-3  # a top-2 margin (and a logit disagreement) under this share of the largest |logit| is fp32 noise


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (where the shorter one ends, if it is a prefix of
    the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2_margin(logits: torch.Tensor) -> float:
    """The largest logit minus the second largest (fp64): how close greedy decoding was to choosing otherwise."""
    top = logits.detach().to(torch.float64).topk(2).values
    return float(top[0] - top[1])


def divergence(prompt: list[int], reference: list[int], ours: list[int],
               reference_logits: Callable[[list[int]], torch.Tensor],
               our_logits: Callable[[list[int]], torch.Tensor]) -> dict:
    """Where two greedy decodes of `prompt` part, and whether that is a near-tie or a disagreement.

    At the first differing position i both models read the same prefix (prompt + the shared i tokens); there
    we take each implementation's last-position logits from one full forward of that prefix (not from its
    decode's cache). `reference_top2_margin`: the reference's top-1 minus top-2 logit; `max_abs_logit_diff`: how
    far the two implementations' logits are apart there; `reference_argmax` / `our_argmax`: the token each full
    forward ranks first (the decode whose token differs from it is the one whose cached steps flipped the
    choice). `near_tie`: the margin and the disagreement are both under NEAR_TIE of the largest |logit| (fp32
    rounding can flip such a choice); otherwise the two compute different things and the split is a bug to find.
    `position` None: the same tokens, nothing else measured.
    """
    i = first_divergence(reference, ours)
    if i is None:
        return {"position": None, "tokens": len(reference)}
    prefix = [*prompt, *reference[:i]]
    ref = reference_logits(prefix).detach().to(torch.float64)
    mine = our_logits(prefix).detach().to(torch.float64)
    scale = float(ref.abs().max())
    margin, diff = top2_margin(ref), float((ref - mine).abs().max())
    return {"position": i, "tokens": min(len(reference), len(ours)),
            "reference_token": reference[i] if i < len(reference) else None,
            "our_token": ours[i] if i < len(ours) else None,
            "reference_argmax": int(ref.argmax()), "our_argmax": int(mine.argmax()),
            "reference_top2_margin": margin, "max_abs_logit_diff": diff, "logit_scale": scale,
            "near_tie": margin <= NEAR_TIE * scale and diff <= NEAR_TIE * scale}
