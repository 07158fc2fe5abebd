"""iGRPO (Hatamizadeh et al. 2026): draft, keep the best, and train the policy to refine it.

One step, for each of the step's prompts:

    stage 1   sample N drafts from the current policy (no gradient) and score them with the run's reward;
              keep the best (ties: the earliest draft, i.e. the lowest sample index)
    stage 2   build the refinement prompt: the original conversation whose last user turn is rewritten by
              `refine_template` with the best draft's answer, and sample G refinements of it; the GRPO update
              (rl/loss.py) is applied to these G completions only, their rewards judged against the
              original prompt (the reward asks "is the refinement right?", not "is it a good refinement?")

The rollout budget per prompt is N + G, the number to match against GRPO's G (`nemotron3 rl --rollout-budget`).
Stage 1 sends no gradient: its completions enter the loss nowhere, only their text enters the stage-2 prompt.

UNCONFIRMED in the sources: the paper's stage-2 template and refinement instruction, how the budget is split
between drafts and refinements, and the tie rule. The defaults here: `DEFAULT_TEMPLATE` (below; `{prompt}` is
the original last user turn, `{draft}` the best draft's final answer: its content after `</think>`), an even
split of the budget, and earliest-wins ties. All three are parameters.
"""

from __future__ import annotations

import math

import torch

from nemotron3 import chat

DEFAULT_TEMPLATE = "{prompt}\nA draft answer: {draft}\nCheck the draft and give the correct final answer."


def best_drafts(rewards: torch.Tensor, num_drafts: int) -> list[int]:
    """rewards (P·N,) in groups of N -> the index within its group of each prompt's best draft (the earliest
    among equals; a NaN reward ranks below every number, and an all-NaN group keeps draft 0)."""
    g = rewards.double().view(-1, num_drafts).nan_to_num(-math.inf)
    best = g.max(-1, keepdim=True).values
    return [int(row.nonzero()[0]) for row in (g == best)]  # the first index reaching the maximum


def draft_answer(text: str) -> str:
    """The part of a draft the refinement prompt shows: its final content (reasoning and tool calls dropped)."""
    try:
        content = chat.parse(text)["content"]
    except ValueError:  # a malformed tool call in a draft: show the text after the last </think>
        content = text.rsplit("</think>", 1)[-1]
    return content.strip()


def refinement_messages(messages: list[dict], draft: str, template: str = DEFAULT_TEMPLATE) -> list[dict]:
    """The stage-2 conversation: `messages` with its last user turn rewritten as `template` says."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise ValueError("an iGRPO prompt needs a user turn to refine")
    try:
        text = template.format(prompt=messages[last]["content"], draft=draft)
    except (KeyError, IndexError) as e:
        raise ValueError(f"refine_template {template!r} uses a placeholder other than {{prompt}} and {{draft}}: "
                         f"{e}") from None
    return [*messages[:last], {**messages[last], "content": text}, *messages[last + 1 :]]


def split_budget(budget: int) -> tuple[int, int]:
    """A per-prompt rollout budget -> (N drafts, G refinements): the even split, refinements taking the odd one."""
    if budget < 3:
        raise ValueError(f"an iGRPO rollout budget needs at least 1 draft and 2 refinements, got {budget}")
    drafts = budget // 2
    return drafts, budget - drafts
