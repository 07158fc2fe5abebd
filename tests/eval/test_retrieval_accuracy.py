"""Retrieval accuracy by length (eval/retrieval.py): prompt lengths in the model's tokens, grading against the
plain-Python solver of tests/tasks/test_retrieval.py, the standard error by hand, and a real run through the Engine."""

from __future__ import annotations

import math

import pytest
import torch

from nemotron3 import HybridLM, ModelConfig
from nemotron3.eval import accuracy, retrieval
from nemotron3.tokenizer import Tokenizer
from tests.tasks.test_retrieval import solve

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from nemotron3 import tasks

    return Tokenizer.train([p.text() for p in tasks.generate("retrieval", 30, seed=0)], 320)


def test_prompts_fill_each_length_of_the_models_tokens(tok):
    for length in (256, 1024, 4096):
        for p in retrieval.problems_at(tok, length, 3, seed=1):
            ids = retrieval.prompt_tokens(tok, p.prompt)
            assert ids[0] == tok.bos_id and length - 40 < len(ids) <= length
            assert tok.decode(ids[1:]) == p.prompt + "\n"


def test_grading_and_standard_error_against_the_solver(tok, monkeypatch):
    """Every other row answers the solver's value, the rest a wrong one: accuracy 1/2 and s.e. √(n/(n-1)·¼/n)."""
    n = 10
    want = {tuple(retrieval.prompt_tokens(tok, p.prompt)): solve(p.prompt) for p in retrieval.problems_at(tok, 512, n)}

    def fake(engine, prompts, max_new, stops, batch_size=32, **kw):
        out = []
        for prompt in prompts:
            value = want[tuple(prompt)]
            answer = value if len(out) % 2 == 0 else f"{(int(value) + 1) % 10000:04d}"
            out.append(tok.encode(f"<think>\nx\n</think>\n{answer}") + [tok.eos_id])
        return out

    monkeypatch.setattr(accuracy, "generate_batched", fake)
    model = HybridLM(ModelConfig.preset("tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64,
                                                        num_nextn_predict_layers=0))
    res = retrieval.retrieval_accuracy(model, tok, lengths=(512,), n=n, batch_size=n)[512]
    assert res["n"] == n and res["accuracy"] == 0.5
    assert math.isclose(res["stderr"], math.sqrt(n / (n - 1) * 0.25 / n))
    assert "| 512 | 50 ± 17 % | 10 |" in retrieval.format_table({512: res})


def test_a_random_model_runs_through_the_engine(tok):
    torch.manual_seed(0)
    model = HybridLM(ModelConfig.preset("tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64,
                                                        num_nextn_predict_layers=0))
    res = retrieval.retrieval_accuracy(model, tok, lengths=(300, 600), n=2, batch_size=2, prefill_chunk=128)
    assert list(res) == [300, 600] and all(r["n"] == 2 and 0 <= r["accuracy"] <= 1 for r in res.values())
    assert 250 < res[300]["prompt_tokens"] <= 300 and model.training  # the model's mode is restored
    with pytest.raises(ValueError, match="n must be >= 1"):
        retrieval.retrieval_accuracy(model, tok, lengths=(300,), n=0)
