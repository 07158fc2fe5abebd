"""One generation core: the same requests through `Engine.generate` and through the HTTP server give the same
tokens, token for token, and the same log-probabilities; and `SamplingParams` checks itself once.

The checkpoint is tests/serving.py's tiny chat model (it has an MTP block and knows its replies by heart, so chat
requests end at `<|im_end|>`). Two servers run on it, without speculation and with k = 3; each request is sent raw
(http.client) and the Engine's answer to the same SamplingParams is its reference: greedy, seeded sampling with
top-k and top-p and n choices, a thinking budget, stop tokens, and logprobs in both modes. The server names each
token by its text (`logprobs.tokens`, `logprobs.content[].token`), so the Engine's ids are decoded one by one, as
the server decodes them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import serving as sc
import torch
from serving import Running

import nemotron3
from nemotron3 import chat
from nemotron3.engine.params import SamplingParams, default_speculative_tokens, speculative_config
from nemotron3.engine.text import encode_prompt
from nemotron3.engine.thinking import ThinkTokens
from nemotron3.serve import ServeConfig
from nemotron3.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sc.build(tmp_path_factory.mktemp("core") / "tiny-chat")


@pytest.fixture(scope="module")
def servers(folder):
    running = {k: Running(ServeConfig(model=folder, speculative=k, max_batch=4, max_seq_len=256, token_budget=24,
                                      max_tokens=64)) for k in (0, K)}
    yield running
    for s in running.values():
        s.stop()


@pytest.fixture(scope="module")
def reference(folder):
    model = nemotron3.load_pretrained(folder)
    tok = Tokenizer.from_folder(folder)
    engine = nemotron3.Engine(model, think_tokens=ThinkTokens.from_tokenizer(tok))
    stops = sorted(set(model.config.eos_token_ids) | {tok.token_to_id(chat.TURN_END)})
    return engine, tok, stops


def _texts(tok, ids: list[int]) -> list[str]:
    return [tok.decode([t], skip_special_tokens=False) for t in ids]


SAMPLING = [
    dict(temperature=0.0),
    dict(temperature=1.2, top_k=40, top_p=0.9, seed=11, n=3),
    dict(temperature=2.0, seed=5, n=2, logprobs_mode="sampled"),
]


@pytest.mark.parametrize("k", [0, K])
@pytest.mark.parametrize("kw", SAMPLING)
def test_completions_equal_the_engine_token_for_token(servers, reference, k, kw):
    """A token-id prompt on /v1/completions with logprobs: every choice's tokens and log-probabilities equal the
    Engine's row for the same SamplingParams (choice i = row i of n)."""
    engine, tok, _ = reference
    prompt = encode_prompt(tok, "once upon a time", engine.config.bos_token_id)
    body = {"model": "tiny-chat", "prompt": prompt, "max_tokens": 12, "logprobs": 2, **kw}
    status, _, r = servers[k].raw("POST", "/v1/completions", body)
    assert status == 200, r
    params = SamplingParams(max_tokens=12, logprobs=2, num_speculative_tokens=k, **kw)
    out = engine.generate([prompt], params)
    assert len(r["choices"]) == len(out.tokens) == kw.get("n", 1)
    for choice, ids, lps, tops in zip(r["choices"], out.tokens, out.logprobs, out.top_logprobs):
        got = choice["logprobs"]
        assert got["tokens"] == _texts(tok, ids)
        assert got["token_logprobs"] == pytest.approx(lps, abs=1e-4)
        assert [v for t in got["top_logprobs"] for v in sorted(t.values(), reverse=True)] == \
            pytest.approx([v for alts in tops for _, v in alts], abs=1e-4)
    if kw.get("n", 1) > 1:
        assert len({tuple(ids) for ids in out.tokens}) > 1  # the choices sample independently


@pytest.mark.parametrize("k", [0, K])
def test_chat_stops_and_a_thinking_budget_equal_the_engine(servers, reference, k):
    """Chat: the reply ends at <|im_end|> (a stop token, included in the tokens), the budget forces </think> after
    3 reasoning tokens; the server's tokens are the Engine's with the same stops and budget."""
    engine, tok, stops = reference
    for budget in (None, 3):
        body = {"model": "tiny-chat", "messages": sc.GREETING, "temperature": 0, "max_tokens": 40, "logprobs": True}
        if budget is not None:
            body["max_thinking_tokens"] = budget
        status, _, r = servers[k].raw("POST", "/v1/chat/completions", body)
        assert status == 200, r
        prompt = encode_prompt(tok, chat.render(sc.GREETING, add_generation_prompt=True), engine.config.bos_token_id)
        out = engine.generate([prompt], SamplingParams(max_tokens=40, stop_token_ids=stops, max_thinking_tokens=budget,
                                                       num_speculative_tokens=k, logprobs=0))
        ids = out.tokens[0]
        assert [c["token"] for c in r["choices"][0]["logprobs"]["content"]] == _texts(tok, ids)
        assert [c["logprob"] for c in r["choices"][0]["logprobs"]["content"]] == pytest.approx(out.logprobs[0],
                                                                                                abs=1e-4)
        assert ids[-1] in stops and r["choices"][0]["finish_reason"] == "stop"
        assert (out.stats.get("thinking_forced") == [1]) == (budget is not None)


def test_the_keyword_form_builds_the_same_params(reference):
    """Engine.generate(prompts, max_new_tokens, **keywords) is Engine.generate(prompts, SamplingParams(...))."""
    engine, _, _ = reference
    prompts = [[1, 5, 9, 12], [1, 7]]
    a = engine.generate(prompts, 6, temperature=0.9, top_k=30, seed=4, stop_token_ids=[], return_logprobs=True)
    b = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.9, top_k=30, seed=4, stop_token_ids=[],
                                                logprobs=0, logprobs_mode="sampled"))
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    with pytest.raises(TypeError, match="not both"):
        engine.generate(prompts, SamplingParams(max_tokens=2), temperature=1.0)


# ----------------------------------------------------------------------------------------- SamplingParams
BAD = [
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_k", -1), ("top_k", 2.0), ("top_k", True), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 1.0), ("stop_token_ids", (1, -2)),
    ("stop_token_ids", "abc"), ("seed", 1.5), ("logprobs", -1), ("logprobs_mode", "processed"), ("n", 0),
    ("num_speculative_tokens", -1), ("max_thinking_tokens", -1), ("thinking_grace", math.inf),
]


@pytest.mark.parametrize("name,value", BAD)
def test_a_bad_field_is_one_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        SamplingParams(**{name: value})


def test_sampling_params_are_frozen_and_normalised():
    p = SamplingParams(max_tokens=4, stop_token_ids=[3, 1], temperature=1)
    assert p.stop_token_ids == (3, 1) and hash(p) == hash(SamplingParams(max_tokens=4, stop_token_ids=(3, 1),
                                                                         temperature=1))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        SamplingParams(0.5)  # keywords only
    assert nemotron3.SamplingParams is SamplingParams
    # replace() checks again
    with pytest.raises(ValueError, match="^top_p must"):
        dataclasses.replace(p, top_p=2.0)


def test_speculation_defaults_to_off_where_it_was_measured_slower():
    """The default k is a function of the device: 0 on a CPU (measured slower), 0 on a device never measured,
    whatever the model; an explicit k needs an MTP block and reserves 2k + 1 positions."""
    torch.manual_seed(0)
    with_mtp = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny"))
    without = nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0))
    assert default_speculative_tokens("cpu", True) == 0 and default_speculative_tokens("cuda", True) == 0
    assert speculative_config(with_mtp, None).k == 0 and speculative_config(without, None).room == 0
    assert speculative_config(with_mtp, 3).room == 7 and speculative_config(with_mtp, 3).max_rollback == 4
    with pytest.raises(ValueError, match="MTP block"):
        speculative_config(without, 2)

