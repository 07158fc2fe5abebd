"""Generation and grading of evaluation items, in each reasoning mode, through the engine's batched decode.

    report = evaluate_items(engine, tokenizer, items, parse_modes("on,off,budget:64"), stops=[...])
    report["modes"]["on"]["accuracy"], report["records"][0]["prediction"]

Modes (docs/post-training.md §4): `on` renders the conversation with the generation prompt ending in `<think>\\n`
(the model reasons, closes `</think>` and answers), `off` ends it in `<think></think>` (the answer directly), and
`budget:N` is `on` with the engine closing the think block after N reasoning tokens
(`Engine.generate(max_thinking_tokens=N)`). Prompts are `<s>` + `chat.render(...)`, as SFT trains and the server
serves (the checkpoint's own template replaces it once checkpoints carry one).

Generation: the prompts of a mode (each repeated n times for pass@k) are sorted longest first and run in batches
of `batch_size` rows through `Engine.generate` (greedy, or sampled with one seed per batch, speculative with the MTP
block when asked). A row stops at a stop token (dropped from the text) or after `max_new_tokens`. The pipeline's
held-out task accuracy (nemotron3/eval/accuracy.py) generates and grades through `generate_batched` and `grade_all`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemotron3.engine import Engine
from nemotron3.engine.text import encode_prompt
from nemotron3.eval.code import run_many
from nemotron3.eval.data import Item
from nemotron3.eval.extract import extract, grade
from nemotron3.eval.metrics import summarize
from nemotron3.tokenizer import Tokenizer


@dataclass(frozen=True)
class Mode:
    name: str  # "on", "off", "budget:N"
    thinking: bool
    budget: int | None = None


def parse_modes(text: str) -> list[Mode]:
    """`on,off,budget:512` -> the modes, in order; ValueError naming the bad one."""
    modes: list[Mode] = []
    for part in [p.strip() for p in text.split(",")]:
        if part in ("on", "off"):
            mode = Mode(part, part == "on")
        elif part.startswith(("budget:", "budget_")) and part[7:].isdigit():
            mode = Mode(f"budget:{int(part[7:])}", True, int(part[7:]))
        else:
            raise ValueError(f"modes (--modes) {text!r}: {part!r} is not a mode; expected on, off or budget:N "
                             "(comma-separated, e.g. on,off,budget:512)")
        if mode in modes:
            raise ValueError(f"modes (--modes) {text!r}: {mode.name} is given twice")
        modes.append(mode)
    return modes


def render_prompt(item: Item, mode: Mode, tokenizer: Tokenizer) -> str:
    """The item's conversation with the generation prompt of `mode`; ValueError naming the item."""
    try:
        return tokenizer.render(item.messages, enable_thinking=mode.thinking, add_generation_prompt=True)
    except ValueError as e:
        raise ValueError(f"{item.where}: {e}") from None


def generate_batched(engine: Engine, prompts: list[list[int]], max_new_tokens: int, stops: list[int],
                     batch_size: int = 32, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     speculative: int = 0, max_thinking_tokens: int | None = None) -> list[list[int]]:
    """Each prompt's new tokens (a final stop token included), the prompts run longest first in batches."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        gen = engine.generate([prompts[i] for i in rows], max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=None if seed is None else seed + start, stop_token_ids=stops,
                              num_speculative_tokens=speculative, max_thinking_tokens=max_thinking_tokens)
        for i, tokens in zip(rows, gen.tokens):
            out[i] = tokens
    return out


def completion_text(tokenizer: Tokenizer, tokens: list[int], stops: list[int]) -> str:
    """The generated text, special tokens kept (`</think>` marks the answer), without a final stop token."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)


def grade_all(items: list[Item], completions: list[str], think_open: bool, tolerance: float = 1e-6,
              code_timeout: float = 10.0) -> list[tuple[str | None, bool, str]]:
    """(prediction, correct, detail) of each completion of the item at the same position."""
    preds = [extract(it.fmt, c, think_open, it.choices) for it, c in zip(items, completions)]
    code = [i for i, it in enumerate(items) if it.fmt == "code"]
    ran = dict(zip(code, run_many([(preds[i], items[i].answer) for i in code], code_timeout)))
    out = []
    for i, (it, pred) in enumerate(zip(items, preds)):
        if i in ran:
            out.append((pred, ran[i].passed, ran[i].detail))
        else:
            ok = grade(it.fmt, pred, it.answer, tolerance, it.problem)
            out.append((pred, ok, "" if pred is not None else "no answer"))
    return out


def _shown(value: object) -> object:
    return str(value) if not isinstance(value, (str, int, float, bool, list, type(None))) else value


def evaluate_items(engine: Engine, tokenizer: Tokenizer, items: list[Item], modes: list[Mode], stops: list[int],
                   n: int = 1, max_new_tokens: int = 512, batch_size: int = 32, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, speculative: int = 0, tolerance: float = 1e-6,
                   code_timeout: float = 10.0) -> dict:
    """Generate `n` answers per item in each mode and grade them: {"modes": {mode: summary}, "records": [...]}.

    A record per item, mode and sample: index, mode, sample, prediction, answer, correct, tokens, completion (and
    detail: why a code answer failed, or "no answer")."""
    bos = engine.config.bos_token_id
    records: list[dict] = []
    summaries: dict[str, dict] = {}
    for mode in modes:
        prompts = [encode_prompt(tokenizer, render_prompt(it, mode, tokenizer), bos) for it in items]
        longest = max(range(len(items)), key=lambda i: len(prompts[i]))
        room = engine.max_seq_len - len(prompts[longest]) - (2 * speculative + 1 if speculative else 0)
        if room < 1:
            raise ValueError(f"{items[longest].where}: the prompt ({len(prompts[longest])} tokens) leaves no room to "
                             f"answer within the model's {engine.max_seq_len} positions")
        rows = [p for p in prompts for _ in range(n)]
        outs = generate_batched(engine, rows, min(max_new_tokens, room), stops, batch_size, temperature, top_p, seed,
                                speculative, mode.budget)
        texts = [completion_text(tokenizer, t, stops) for t in outs]
        graded = grade_all([it for it in items for _ in range(n)], texts, mode.thinking, tolerance, code_timeout)
        correct = [[graded[i * n + s][1] for s in range(n)] for i in range(len(items))]
        tokens = [[len(outs[i * n + s]) for s in range(n)] for i in range(len(items))]
        summaries[mode.name] = summarize(correct, tokens)
        for i, it in enumerate(items):
            for s in range(n):
                pred, ok, detail = graded[i * n + s]
                rec = {"index": it.index, "mode": mode.name, "sample": s, "prediction": pred,
                       "answer": _shown(it.raw_answer), "correct": ok, "tokens": tokens[i][s],
                       "completion": texts[i * n + s]}
                if detail:
                    rec["detail"] = detail
                records.append(rec)
    return {"modes": summaries, "records": records}
