"""The embedded tool environment (`tools`): facts reachable only through `lookup`, combined with `calculate`.

    env = LookupEnv(difficulty=1)
    env.get_dataset(4, seed=0)[0].messages   # [{"role": "user", "content": "Compute p4 * t9. Each name ..."}]
    conversations(8, seed=0)                 # SFT conversations: calls, results, final answer, with reasoning

A problem is an expression over d + 1 names joined by + - * (d the difficulty), e.g. `p4 * t9`, and a table of
facts: each name's value (1 to 20·d) and d + 1 distractor names the question never uses. The values appear nowhere
but in the `lookup` tool's answers, so the answer needs at least d + 1 lookups; `calculate` evaluates the
expression once the values are in (the model may also do the arithmetic itself). The answer is the expression's
value (never negative: such draws are rejected); it is verified against the `answer` column.

Problems are a pure function of (seed, split, difficulty) and any number can be drawn. The train / held-out split
is the task families' (`tasks.split_of` on the problem's key: the expression and its values), so no held-out
problem reaches training; the held-out split has no duplicates.

The reference solution, as an SFT conversation (`conversation`): one tool call per assistant turn (generation stops
at `</tool_call>`, so a policy makes one call per turn too), each turn with a one-line reasoning:

    user       Compute p4 * t9. ...
    assistant  <think> I need p4 and t9. </think>  lookup(key="p4")        tool  12
    assistant  <think> p4 = 12 </think>            lookup(key="t9")        tool  7
    assistant  <think> t9 = 7 </think>             calculate("12 * 7")     tool  84
    assistant  <think> 12 * 7 = 84 </think>        84
"""

from __future__ import annotations

import functools
import random
from typing import Any

from nemotron3 import chat, tasks
from nemotron3.envs.base import Example, Rubric, State
from nemotron3.envs.tool_env import ToolEnv

OPS = "+-*"
LETTERS = "abcdefghjkmnpqrstuvwxyz"  # no i, l, o: easy to confuse with digits


def lookup(key: str):
    """Look up the number stored under a name.

    Args:
        key: the name, e.g. p4
    """
    raise NotImplementedError("bound to an episode's facts by LookupEnv.tools_for")


def calculate(expression: str):
    """Evaluate an arithmetic expression over integers with + - * and parentheses.

    Args:
        expression: the expression, e.g. (12 + 3) * 4
    """
    value = tasks.evaluate_arithmetic(expression)
    if value is None:
        raise ValueError(f"cannot evaluate {expression!r}: use integers, + - * and parentheses")
    return str(value)


def _lookup(facts: dict[str, int], key: str) -> str:
    key = key.strip()
    if key not in facts:
        raise KeyError(f"no number is stored under {key!r}")
    return str(facts[key])


def _problem(rng: random.Random, difficulty: int) -> tuple[str, list[str], dict[str, int], int]:
    """(expression over names, the names in order, facts (used + distractors), answer)."""
    while True:
        pool = [a + d for a in LETTERS for d in "123456789"]
        names = rng.sample(pool, 2 * (difficulty + 1))
        used = names[: difficulty + 1]
        facts = {n: rng.randint(1, 20 * difficulty) for n in names}
        ops = [rng.choice(OPS) for _ in range(difficulty)]
        expr = used[0] + "".join(f" {op} {n}" for op, n in zip(ops, used[1:]))
        answer = tasks.evaluate_arithmetic(substitute(expr, facts))
        if answer is not None and answer >= 0:
            return expr, used, facts, answer


def substitute(expr: str, facts: dict[str, int]) -> str:
    """The expression with every name replaced by its value."""
    return " ".join(str(facts[t]) if t in facts else t for t in expr.split(" "))


def prompt_text(expr: str) -> str:
    return f"Compute {expr}. Each name stands for a number that only the lookup tool knows."


def problems(n: int, seed: int = 0, split: str = "train", difficulty: int = 1) -> list[dict[str, Any]]:
    """`n` problems as {"expression", "names", "facts", "answer"}, deterministic in (seed, split, difficulty)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    rng = random.Random(f"lookup/{split}/{difficulty}/{seed}")
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"lookup: could not find {n} distinct {split} problems at difficulty {difficulty}")
        expr, used, facts, answer = _problem(rng, difficulty)
        key = f"lookup:{expr}:{[facts[u] for u in used]}"
        if tasks.split_of(key) != split or (split == "heldout" and key in seen):
            continue
        seen.add(key)
        out.append({"expression": expr, "names": used, "facts": facts, "answer": answer})
    return out


def answer_reward(prompts: list, completions: list, answer: list, **columns: Any) -> list[float]:
    """1.0 when the final answer (after the last `</think>` of the last assistant turn) is the `answer` column."""
    out = []
    for completion, want in zip(completions, answer):
        if isinstance(completion, str):
            text = completion
        else:
            turns = [m for m in completion if m.get("role") == "assistant"]
            last = turns[-1] if turns else {}
            text = last.get("content") or ""
            if last.get("tool_calls") or "<tool_call>" in text:  # still calling tools: no final answer
                text = ""
        out.append(float(tasks.extract_answer(text) == str(want)))
    return out


class LookupEnv(ToolEnv):
    name = "tools"

    def __init__(self, difficulty: int = 1, max_turns: int | None = None, timeout: float = 2.0) -> None:
        self.difficulty = difficulty
        super().__init__([lookup, calculate], Rubric([answer_reward], accuracy=answer_reward),
                         max_turns=max_turns or difficulty + 4, timeout=timeout)

    def tools_for(self, state: State) -> dict:
        return {"lookup": functools.partial(_lookup, state.example.columns["facts"]), "calculate": calculate}

    def _examples(self, n: int, seed: int, split: str) -> list[Example]:
        return [Example(self.format_prompt(prompt_text(p["expression"])),
                        {"answer": str(p["answer"]), "facts": p["facts"], "expression": p["expression"]})
                for p in problems(n, seed, split, self.difficulty)]

    def get_dataset(self, n: int, seed: int) -> list[Example]:
        return self._examples(n, seed, "train")

    def get_eval_dataset(self, n: int, seed: int = 0) -> list[Example]:
        return self._examples(n, seed, "heldout")


def _call(name: str, **arguments: Any) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def conversation(problem: dict[str, Any]) -> dict[str, Any]:
    """The reference episode of one problem as `{"messages", "tools"}` (OpenAI messages; module docstring)."""
    facts, names, expr = problem["facts"], problem["names"], problem["expression"]
    values = substitute(expr, facts)
    messages: list[dict] = [{"role": "user", "content": prompt_text(expr)}]
    reasoning = f"I need {', '.join(names[:-1])} and {names[-1]}."
    for name in names:
        messages += [{"role": "assistant", "content": "", "reasoning_content": reasoning,
                      "tool_calls": [_call("lookup", key=name)]},
                     {"role": "tool", "content": str(facts[name])}]
        reasoning = f"{name} = {facts[name]}"
    messages += [{"role": "assistant", "content": "", "reasoning_content": reasoning,
                  "tool_calls": [_call("calculate", expression=values)]},
                 {"role": "tool", "content": str(problem["answer"])},
                 {"role": "assistant", "content": str(problem["answer"]),
                  "reasoning_content": f"{values} = {problem['answer']}"}]
    return {"messages": messages, "tools": LookupEnv().tool_defs}


def conversations(n: int, seed: int = 0, split: str = "train", difficulty: int = 1) -> list[dict[str, Any]]:
    """`n` SFT conversations of the tool environment (train/sft_data.py `tool_conversations` wraps them)."""
    return [conversation(p) for p in problems(n, seed, split, difficulty)]


def texts(n: int, seed: int = 0, difficulty: int = 1) -> list[str]:
    """`n` training conversations rendered with the chat template (tools block included): what a tokenizer's
    sample needs so that tool-call text is a few hundred tokens, not a thousand (docs/agentic-rl.md §3)."""
    return [chat.render(c["messages"], c["tools"]) for c in conversations(n, seed, "train", difficulty)]
