"""benchmarks/decode.py names where two greedy decodes part (issue 29 item 5) through run/measure.py's `divergence`,
with full forwards of the shared prefix (`last_logits`): checked here on a tiny model against a planted split, the
margin recomputed by hand from the model's own full forward."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from conftest import tiny_mtp_model

import nemotron3

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _decode_module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "decode.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_the_benchmark_names_the_first_split_and_its_margin():
    bench = _decode_module()
    model = tiny_mtp_model()
    prompt = [5, 9, 14, 3]
    ours = nemotron3.Engine(model).generate([prompt], 8, stop_token_ids=[]).tokens[0]
    reference = ours[:5] + [(ours[5] + 1) % model.config.vocab_size] + ours[6:]  # parts at token 5
    split = bench.divergence(prompt, reference, ours, bench.last_logits(model), bench.last_logits(model))
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours[:5]]))[0, -1].double()
    top = logits.topk(2).values
    assert split["position"] == 5 and split["our_token"] == ours[5] and split["reference_token"] == reference[5]
    assert abs(split["reference_top2_margin"] - float(top[0] - top[1])) < 1e-9
    assert split["our_argmax"] == ours[5] and split["max_abs_logit_diff"] == 0.0
    same = bench.divergence(prompt, ours, ours, bench.last_logits(model), bench.last_logits(model))
    assert same["position"] is None
