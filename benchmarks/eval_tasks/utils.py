"""The `nemotron3_tasks` fixture: held-out problems of two built-in task families (add, sort) as lm-eval tasks.

    nemotron3 lm-eval --model nemotron3 --model_args pretrained=DIR,think=on --include_path benchmarks/eval_tasks \
        --tasks nemotron3_tasks_gen --apply_chat_template --batch_size 16
    nemotron3 lm-eval --model nemotron3 --model_args pretrained=DIR --include_path benchmarks/eval_tasks \
        --tasks nemotron3_tasks_doc,nemotron3_tasks_mc --batch_size 16

- `nemotron3_tasks_gen` (generate_until, meant for `--apply_chat_template`): the problem as a user turn; the reply
  is graded like `nemotron3 eval --data tasks:add,sort` (the family's answer line, tasks.extract_answer, checked by
  the family's verifier). 96 new tokens: 1.5 times the longest reference reasoning and answer, as the pipeline's
  evaluation allows (nemotron3/eval/accuracy.py).
- `nemotron3_tasks_doc` (generate_until, without the chat template): "{problem}\n", the way a pretraining
  document begins (the pipeline's `task_accuracy`): the model writes `<think>` ... `</think>` and the answer.
- `nemotron3_tasks_mc` (multiple_choice, by loglikelihood): "{problem}\\nAnswer:" and four answers, the right one
  and three near misses (an off-by-one or off-by-ten sum, the list in another order).

problems.jsonl is this file's `problems()` written out (`python benchmarks/eval_tasks/utils.py` rewrites it; a
test checks the two agree); lm-eval loads it through `load` below, found next to this file whatever the working
directory (a `data_files:` path in the YAML would be read relative to the working directory).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets

from nemotron3 import tasks
from nemotron3.eval.extract import extract, grade

HERE = Path(__file__).resolve().parent
DATA = HERE / "problems.jsonl"
FAMILIES = ("add", "sort")
PER_FAMILY = 32


def _near_misses(family: str, answer: str, prompt: str, rng: random.Random) -> list[str]:
    """Three wrong answers close to the right one, distinct from it and from each other."""
    if family == "add":
        n = int(answer)
        pool = [n + 1, n - 1, n + 10, n - 10, n + 2, n + 100]
        wrong = [str(x) for x in pool if x >= 0 and str(x) != answer]
    else:
        nums = answer.split()
        given = prompt.split(":", 1)[1].split()
        pool = [" ".join(given), " ".join(reversed(nums)), " ".join(nums[1:] + nums[:1]),
                " ".join(nums[-1:] + nums[:-1]), " ".join(nums[:1] + list(reversed(nums[1:])))]
        wrong = list(dict.fromkeys(x for x in pool if x != answer))
    rng.shuffle(wrong)
    if len(wrong) < 3:
        raise ValueError(f"{family} problem {prompt!r}: fewer than three distinct wrong answers")
    return wrong[:3]


def problems() -> list[dict]:
    """The fixture's items: PER_FAMILY held-out problems (seed 0, difficulty 1) of each family in FAMILIES."""
    out = []
    for family in FAMILIES:
        for p in tasks.generate(family, PER_FAMILY, seed=0, split="heldout", difficulty=1):
            rng = random.Random(len(out))
            choices = _near_misses(family, p.answer, p.prompt, rng)
            target = rng.randrange(4)
            choices.insert(target, p.answer)
            out.append({"family": family, "prompt": p.prompt, "answer": p.answer, "choices": choices,
                        "target": target})
    return out


def load(**_: object) -> datasets.DatasetDict:
    """lm-eval's `custom_dataset`: problems.jsonl as the test split."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list[str]) -> dict:
    """`nemotron3 eval`'s `task` format: the family's answer line, checked by the family's verifier."""
    prediction = extract("task", results[0])
    return {"acc": float(grade("task", prediction, doc["answer"], prompt=doc["prompt"]))}


if __name__ == "__main__":
    DATA.write_text("".join(json.dumps(row) + "\n" for row in problems()))
    print(f"wrote {DATA} ({PER_FAMILY * len(FAMILIES)} problems)")
