"""Synthetic, verifiable reasoning tasks: the embedded pretraining corpus and the SFT, RL and evaluation data.

    from nemotron3 import tasks
    p = tasks.generate("add", 1, seed=0, split="heldout")[0]
    p.prompt, p.completion()                      # the problem, and the reference "<think>…</think>\\nanswer"
    tasks.reward([p.prompt], [p.completion()])    # [1.0]: TRL's reward signature, checked by re-parsing the prompt

`families.py` says how each family makes, renders, parses, solves and verifies a problem; `registry.py`
draws problems from the disjoint train / held-out splits and scores completions. Tasks are data: training,
evaluation and RL import them; they import nothing else of nemotron3.
"""

from nemotron3.tasks.families import Family, Problem, evaluate_arithmetic
from nemotron3.tasks.registry import (
    FAMILIES,
    HELDOUT_PER_MILLE,
    default_families,
    extract_answer,
    family_of,
    family_reward,
    generate,
    generate_at_length,
    mixture,
    reward,
    split_of,
)

__all__ = [
    "FAMILIES", "HELDOUT_PER_MILLE", "Family", "Problem", "default_families", "evaluate_arithmetic", "extract_answer",
    "family_of", "family_reward", "generate", "generate_at_length", "mixture", "reward", "split_of",
]
