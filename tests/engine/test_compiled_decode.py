"""The compiled decode step (issue 29 item 4): one static graph per batch bucket, against the eager step.

- fast: with compilation replaced by the identity, a batch of 3 runs the bucket-4 step (the free row decoded and
  ignored, never growing) and gives the eager engine's greedy tokens;
- slow: the real torch.compile (Inductor, C++ wrapper, fullgraph) gives the eager engine's greedy tokens and its
  log-probabilities within 1e-4, at batch 1 and 3;
- slow: a second process compiling the same step loads it from Inductor's FX graph cache (hits, no misses) and
  takes less time than the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_mtp_model

import nemotron3
from nemotron3.engine import scheduler as scheduler_module
from nemotron3.engine.decode import batch_bucket

PROMPTS = [list(range(3, 40)), [5, 6, 7], list(range(100, 120))]


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]


def test_a_batch_of_three_runs_the_bucket_of_four_and_gives_the_eager_tokens(monkeypatch):
    model = tiny_mtp_model()
    shapes = []

    def identity(fn):
        def run(x, cache, *args):
            shapes.append((x.shape[0], cache.rows))
            return fn(x, cache, *args)
        return run

    monkeypatch.setattr(scheduler_module, "compile_static", identity)
    want = nemotron3.Engine(model, max_seq_len=256).generate(PROMPTS, 12, stop_token_ids=[]).tokens
    engine = nemotron3.Engine(model, max_seq_len=256, compile=True)
    for _ in range(2):  # the second call reuses the scheduler, whose free row must not have kept growing
        assert engine.generate(PROMPTS, 12, stop_token_ids=[]).tokens == want
        assert engine.scheduler.rows == 4 and set(shapes) == {(4, 4)}
        assert int(engine.scheduler.cache.lengths[3]) <= 1  # the free row restarts at 0 every step


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_tokens_and_logprobs():
    model = tiny_mtp_model()
    params = nemotron3.SamplingParams(max_tokens=16, stop_token_ids=[], logprobs=4)
    eager, compiled = nemotron3.Engine(model, max_seq_len=256), nemotron3.Engine(model, max_seq_len=256, compile=True)
    for prompts in (PROMPTS[:1], PROMPTS):
        want, got = eager.generate(prompts, params), compiled.generate(prompts, params)
        assert got.stats["path"] == "compiled fast" and got.tokens == want.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
        for a, b in zip(got.top_logprobs, want.top_logprobs):
            torch.testing.assert_close(torch.tensor([[v for _, v in t] for t in a]),
                                       torch.tensor([[v for _, v in t] for t in b]), atol=1e-4, rtol=0)


COMPILE_ONCE = """
import json, time, torch
import nemotron3
from torch._dynamo.utils import counters
torch.manual_seed(0)
engine = nemotron3.Engine(nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny")).eval(), max_seq_len=128,
                          compile=True)
t0 = time.perf_counter()
tokens = engine.generate([[1, 2, 3]], 4, stop_token_ids=[]).tokens
c = counters["inductor"]
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": tokens, "hit": c["fxgraph_cache_hit"],
                  "miss": c["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), OMP_NUM_THREADS="1")
    runs = [json.loads(subprocess.run([sys.executable, "-c", COMPILE_ONCE], env=env, capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    first, second = runs
    assert first["miss"] >= 1 and first["hit"] == 0
    assert second["hit"] >= 1 and second["miss"] == 0 and second["tokens"] == first["tokens"]
    assert second["seconds"] < first["seconds"], runs
