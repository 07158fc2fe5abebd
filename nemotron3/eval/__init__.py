"""Evaluation on benchmark files and on the built-in tasks (`nemotron3 eval`), and the lm-evaluation-harness backend.

    extract.py   answer extraction and grading per format: numeric, mcq, exact, code, task
    code.py      the code format's tests, run in a subprocess with limits
    metrics.py   accuracy ± standard error, unbiased pass@k, tokens per answer and per correct answer
    data.py      items from a .jsonl file (errors name FILE:LINE) or the built-in task families
    runner.py    prompts per reasoning mode, batched generation through the engine, grading
    stage.py     the `nemotron3 eval` command: results.json and items.jsonl
    harness.py   `nemotron3` as an lm-eval model (`import nemotron3.eval.harness` registers it; needs the `eval`
                 extra) and `nemotron3 lm-eval ARGS`, lm-eval's own command line with it registered

docs/evaluation.md is the user's description.
"""
