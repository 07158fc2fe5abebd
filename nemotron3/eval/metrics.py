"""The numbers of an evaluation: accuracy with its standard error, pass@k, and tokens spent per answer.

With n samples per item and c of them correct, an item's score is c / n (the unbiased pass@1) and the accuracy is
the mean over items. Its standard error is the sample standard deviation of the item scores over sqrt(items), the
same rule as lm-evaluation-harness's `mean` metric (`mean_stderr`), so the two backends report the same ± for the
same scores; None with fewer than two items.

pass@k is the unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code"):
1 - C(n - c, k) / C(n, k) per item, the chance that k of the n samples drawn without replacement hold a correct
one, averaged over items; computed as a product so that large n does not overflow.

Tokens: `tokens_per_answer` is the mean count of generated tokens per sample (reasoning included), and
`tokens_per_correct` what one correct answer cost: every token generated in the mode over the count of correct
samples (None when none is correct).
"""

from __future__ import annotations

import math


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one item with `c` correct among `n` samples (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def mean_stderr(scores: list[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) of per-item scores; the error is None below two items."""
    if not scores:
        raise ValueError("no scores to average")
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        return mean, None
    var = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)
    return mean, math.sqrt(var / len(scores))


def summarize(correct: list[list[bool]], tokens: list[list[int]]) -> dict:
    """One mode's summary from each item's samples: accuracy, stderr, pass@k, tokens per answer and per correct."""
    n = len(correct[0])
    accuracy, stderr = mean_stderr([sum(c) / n for c in correct])
    total_tokens = sum(sum(t) for t in tokens)
    n_correct = sum(sum(c) for c in correct)
    return {
        "accuracy": accuracy, "stderr": stderr, "items": len(correct), "samples": n,
        "pass_at_k": {str(k): sum(pass_at_k(n, sum(c), k) for c in correct) / len(correct) for k in ks_for(n)},
        "tokens_per_answer": total_tokens / (len(correct) * n),
        "tokens_per_correct": total_tokens / n_correct if n_correct else None,
    }
