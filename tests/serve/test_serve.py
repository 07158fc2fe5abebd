"""`nemotron3 serve` through the official `openai` client, on localhost, with a tiny checkpoint.

The checkpoint (tests/serving.py) has learnt three replies by heart, so greedy requests have known
answers: reasoning apart from the answer, reasoning off, a tool call. Sampled requests are compared with
`Engine.generate` on the same prompt and seed (choice i of n = row i), with the speculation the server uses
(the checkpoint has an MTP block; the server runs with --speculative 3). Logprobs are compared with a full forward.
Bad requests are sent raw (http.client) where the client would refuse to send them, and every one is followed
by a good request that must still succeed.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serving as sc
import torch
from serving import Running

import nemotron3
from nemotron3 import chat
from nemotron3.engine.text import encode_prompt
from nemotron3.serve import ServeConfig, build_server
from nemotron3.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

openai = pytest.importorskip("openai")

K = 3  # the drafts the server runs with (speculation is off by default on a CPU: it is turned on here)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return sc.build(tmp_path_factory.mktemp("served") / "tiny-chat")


@pytest.fixture(scope="module")
def server(folder):
    s = Running(ServeConfig(model=folder, speculative=K, max_batch=4, max_seq_len=2048, token_budget=64,
                            max_tokens=2000, max_prompt_tokens=400, max_n=4, max_body_bytes=64 * 1024))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(folder):
    """(model, tokenizer, chat stop ids) for Engine.generate."""
    model = nemotron3.load_pretrained(folder)
    tok = Tokenizer.from_folder(folder)
    stops = sorted(set(model.config.eos_token_ids) | {tok.token_to_id(chat.TURN_END)})
    return model, tok, stops


def _prompt(tok, messages, tools=None, thinking=True) -> list[int]:
    return encode_prompt(tok, chat.render(messages, tools, enable_thinking=thinking, add_generation_prompt=True), 1)


def _split(text: str) -> tuple[str, str]:
    """An output written after a reasoning-on generation prompt -> (reasoning, content), as chat.parse splits."""
    head, _, tail = text.partition("</think>")
    return head.strip(), tail.strip()


def _extra(obj, name):
    return (obj.model_extra or {}).get(name)


# ----------------------------------------------------------------------------------------- the endpoints
def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    status, _, body = server.raw("GET", "/health")
    assert status == 200 and body["status"] == "ok"


def test_chat_returns_reasoning_apart_from_the_answer(server, reference):
    _, tok, _ = reference
    r = server.client().chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0)
    msg = r.choices[0].message
    assert msg.content == sc.GREETING_REPLY and _extra(msg, "reasoning_content") == sc.GREETING_REASONING
    assert r.choices[0].finish_reason == "stop" and msg.role == "assistant" and not msg.tool_calls
    assert r.usage.prompt_tokens == len(_prompt(tok, sc.GREETING))
    want = tok.encode(sc.GREETING_REASONING + "\n</think>\n" + sc.GREETING_REPLY)
    assert r.usage.completion_tokens == len(want) + 1  # and <|im_end|>
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_thinking_off_and_a_thinking_budget(server, reference):
    model, tok, stops = reference
    client = server.client()
    r = client.chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == sc.GREETING_OFF_REPLY
    assert _extra(r.choices[0].message, "reasoning_content") is None
    r = client.chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0, max_tokens=30,
                                       extra_body={"max_thinking_tokens": 3})
    think = nemotron3.engine.thinking.ThinkTokens.from_tokenizer(tok)
    out = nemotron3.Engine(model, think_tokens=think).generate(
        [_prompt(tok, sc.GREETING)], 30, stop_token_ids=stops, max_thinking_tokens=3,
        num_speculative_tokens=K).tokens[0]
    reasoning, content = _split(tok.decode([t for t in out if t not in stops], skip_special_tokens=False))
    assert _extra(r.choices[0].message, "reasoning_content") == reasoning and r.choices[0].message.content == content
    assert len(tok.encode(reasoning)) <= 4 < len(tok.encode(sc.GREETING_REASONING))


def test_streaming_with_usage_concatenates_to_the_message(server):
    client = server.client()
    plain = client.chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    reasoning = "".join(_extra(c.choices[0].delta, "reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == sc.GREETING_REASONING and content == sc.GREETING_REPLY
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one block
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed(server, stream):
    client = server.client()
    kw = dict(model="tiny-chat", messages=sc.WEATHER, tools=sc.TOOLS, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        reasoning = "".join(_extra(c.choices[0].delta, "reasoning_content") or "" for c in chunks if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        calls, reasons = r.choices[0].message.tool_calls, [r.choices[0].finish_reason]
        reasoning, content = _extra(r.choices[0].message, "reasoning_content"), r.choices[0].message.content or ""
    assert reasons == ["tool_calls"] and reasoning == sc.WEATHER_REASONING and content == ""
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    # tool_choice "none": the same reply, its XML left as text
    r = client.chat.completions.create(tool_choice="none", **{**kw, "messages": sc.WEATHER})
    assert not r.choices[0].message.tool_calls


def test_seeded_choices_equal_the_engine_and_repeat(server, reference):
    model, tok, stops = reference
    messages = [{"role": "user", "content": "Hello there, who are you?"}]
    kw = dict(model="tiny-chat", messages=messages, temperature=1.5, top_p=0.95, n=3, seed=1234, max_tokens=24)
    r = server.client().chat.completions.create(**kw)
    again = server.client().chat.completions.create(**kw)
    out = nemotron3.Engine(model).generate([_prompt(tok, messages)] * 3, 24, temperature=1.5, top_p=0.95,
                                           seed=1234, stop_token_ids=stops, num_speculative_tokens=K).tokens
    for i, tokens in enumerate(out):
        c = r.choices[i]
        reasoning, content = _split(tok.decode([t for t in tokens if t not in stops], skip_special_tokens=False))
        if "</think>" not in tok.decode(tokens, skip_special_tokens=False):
            reasoning, content = tok.decode(tokens, skip_special_tokens=False).strip(), ""
        assert c.index == i and (_extra(c.message, "reasoning_content") or "", c.message.content or "") == \
            (reasoning, content)
        assert c.finish_reason == ("stop" if tokens[-1] in stops else "length")
        assert again.choices[i].message == c.message
    assert r.usage.completion_tokens == sum(len(t) for t in out)
    assert len({(c.message.content, _extra(c.message, "reasoning_content")) for c in r.choices}) > 1


def test_logprobs_are_the_models(server, reference):
    model, tok, _ = reference
    r = server.client().chat.completions.create(model="tiny-chat", messages=sc.GREETING, temperature=0.7, seed=5,
                                                logprobs=True, top_logprobs=2, max_tokens=12)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens == 12
    prompt = _prompt(tok, sc.GREETING)
    ids = [tok.token_to_id(x.token) or tok.encode(x.token)[0] for x in items]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + ids]))[0, len(prompt) - 1 : -1].double(), -1)
    assert [x.logprob for x in items] == pytest.approx(lp[torch.arange(12), torch.tensor(ids)].tolist(), abs=1e-4)
    for x, row in zip(items, lp):
        assert len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob == pytest.approx(row.max().item(), abs=1e-4)


def test_completions(server, reference):
    model, tok, _ = reference
    client = server.client()
    text = "once upon a time"
    ids = encode_prompt(tok, text, 1)
    want = nemotron3.Engine(model).generate([ids], 10, num_speculative_tokens=K).tokens[0]
    r = client.completions.create(model="tiny-chat", prompt=text, max_tokens=10, temperature=0)
    assert r.choices[0].text == tok.decode(want) and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="tiny-chat", prompt=[ids, ids[:3]], max_tokens=10, temperature=0, echo=True)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text == tok.decode(ids) + tok.decode(want)
    stop = tok.decode(want)[3:6]
    r = client.completions.create(model="tiny-chat", prompt=text, max_tokens=10, temperature=0, stop=[stop])
    assert r.choices[0].text == tok.decode(want)[: tok.decode(want).index(stop)]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny-chat", prompt=text, max_tokens=10, temperature=0,
                                            stream=True, logprobs=1))
    assert "".join(c.choices[0].text for c in chunks) == tok.decode(want)
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == 10


# ----------------------------------------------------------------------------------------- bad input
GOOD = {"model": "tiny-chat", "messages": sc.GREETING, "max_tokens": 4}
BAD = [  # (body, status, param, code)
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({**GOOD, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ({k: v for k, v in GOOD.items() if k != "model"}, 400, "model", "missing_required_parameter"),
    ({**GOOD, "messages": "hi"}, 400, "messages", "invalid_type"),
    ({**GOOD, "messages": []}, 400, "messages", "invalid_type"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({**GOOD, "temperature": 50}, 400, "temperature", "invalid_value"),
    ({**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    ({**GOOD, "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens", "invalid_value"),
    ({**GOOD, "max_completion_tokens": 2001}, 400, "max_completion_tokens", "invalid_value"),
    ({**GOOD, "n": 1.5}, 400, "n", "invalid_type"),
    ({**GOOD, "n": 1000}, 400, "n", "invalid_value"),
    ({**GOOD, "stop": 5}, 400, "stop", "invalid_type"),
    ({**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    ({**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ({**GOOD, "logprobs": True, "top_logprobs": 99}, 400, "top_logprobs", "invalid_value"),
    ({**GOOD, "seed": "x"}, 400, "seed", "invalid_type"),
    ({**GOOD, "presence_penalty": 1.0}, 400, "presence_penalty", "unsupported_value"),
    ({**GOOD, "tool_choice": "required", "tools": sc.TOOLS}, 400, "tool_choice", "unsupported_value"),
    ({**GOOD, "tools": [{"type": "function"}]}, 400, "tools[0]", "invalid_type"),
    ({**GOOD, "chat_template_kwargs": {"enable_thinking": "no"}}, 400, "chat_template_kwargs.enable_thinking",
     "invalid_type"),
    ({**GOOD, "max_thinking_tokens": -3}, 400, "max_thinking_tokens", "invalid_value"),
    ({**GOOD, "messages": [{"role": "user", "content": "word " * 500}]}, 400, "messages", "context_length_exceeded"),
    ({**GOOD, "messages": [{"role": "assistant", "content": ""}]}, 400, "messages", None),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, body, status, param, code):
    got, _, err = server.raw("POST", "/v1/chat/completions", body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["code"] == code and err["error"]["message"]
    assert err["error"]["type"] == "invalid_request_error"
    got, _, ok = server.raw("POST", "/v1/chat/completions", GOOD)
    assert got == 200 and ok["choices"][0]["message"]["role"] == "assistant"


def test_bad_completions_routes_and_size(server):
    for body, param in [({"model": "tiny-chat"}, "prompt"), ({"model": "tiny-chat", "prompt": [1, "a"]}, "prompt"),
                        ({"model": "tiny-chat", "prompt": [[1, 99999]]}, "prompt"),
                        ({"model": "tiny-chat", "prompt": "x", "logprobs": 9}, "logprobs"),
                        ({"model": "tiny-chat", "prompt": "x", "suffix": "y"}, "suffix")]:
        status, _, err = server.raw("POST", "/v1/completions", body)
        assert status == 400 and err["error"]["param"] == param, err
    status, _, err = server.raw("POST", "/v1/chat/completions", {**GOOD, "pad": "x" * 70000})
    assert status == 413 and err["error"]["code"] == "request_too_large"
    status, _, err = server.raw("GET", "/v1/nothing")
    assert status == 404 and err["error"]["code"] == "not_found"
    status, _, err = server.raw("GET", "/v1/chat/completions")
    assert status == 405 and err["error"]["code"] == "method_not_allowed"
    assert server.raw("POST", "/v1/completions", {"model": "tiny-chat", "prompt": "x", "max_tokens": 2})[0] == 200


# ----------------------------------------------------------------------------------------- slots, keys, limits
def test_a_disconnect_mid_stream_frees_its_slot(server):
    before = server.metric("nemotron3_request_finish_total", '{reason="cancelled"}')
    generated = server.state.scheduler.stats["decode_tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": "tiny-chat", "prompt": [1, 2, 3], "max_tokens": 2000, "stream": True, "temperature": 1.0,
         "seed": 0}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    assert server.metric("nemotron3_requests_running") == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 10
    while server.metric("nemotron3_requests_running") != 0:
        assert time.time() < deadline, "the slot was not freed"
        time.sleep(0.05)
    assert server.metric("nemotron3_request_finish_total", '{reason="cancelled"}') == before + 1
    assert server.state.scheduler.stats["decode_tokens"] - generated < 1000  # cut short, not run to its end
    assert server.state.scheduler.running == 0 and not any(server.state.scheduler.cache.in_use)


@pytest.fixture(scope="module")
def guarded(folder):
    s = Running(ServeConfig(model=folder, max_batch=2, max_seq_len=2048, max_requests=2, api_key="sesame",
                            served_model_name="guarded"))
    yield s
    s.stop()


def test_the_api_key_is_enforced(guarded):
    for key in ("wrong", "sesam", "sesame!"):
        with pytest.raises(openai.AuthenticationError) as e:
            guarded.client(key).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert guarded.raw("POST", "/v1/chat/completions", {**GOOD, "model": "guarded"})[0] == 401  # no header
    assert [m.id for m in guarded.client("sesame").models.list().data] == ["guarded"]
    assert guarded.raw("GET", "/health")[0] == 200 and "<html" in guarded.text("/")  # open routes


def test_beyond_the_running_and_queued_limit_comes_429(guarded):
    client = guarded.client("sesame")
    streams = [client.completions.create(model="guarded", prompt=[1, 2], max_tokens=1500, stream=True)
               for _ in range(2)]
    for s in streams:
        next(iter(s))
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model="guarded", prompt=[1, 2], max_tokens=2)
    assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "rate_limit_exceeded"
    for s in streams:
        s.close()
    deadline = time.time() + 10
    while guarded.state.in_flight:
        assert time.time() < deadline
        time.sleep(0.05)
    assert client.completions.create(model="guarded", prompt=[1, 2], max_tokens=2).choices[0].finish_reason


def test_the_key_comes_from_the_environment(folder, monkeypatch):
    monkeypatch.setenv("NEMOTRON3_API_KEY", "from-env")
    assert build_server(ServeConfig(model=folder, max_batch=1, max_seq_len=64)).settings.api_key == "from-env"


def test_config_errors_name_the_flag(folder, tmp_path):
    with pytest.raises(ValueError, match=r"speculative.*MTP"):
        nemotron3.save_pretrained(nemotron3.HybridLM(nemotron3.ModelConfig.preset("tiny").replace(
            num_nextn_predict_layers=0, vocab_size=400)), tmp_path)
        (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
        build_server(ServeConfig(model=tmp_path, speculative=2, max_seq_len=64))
    with pytest.raises(ValueError, match="port"):
        ServeConfig(model=folder, port=70000)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        build_server(ServeConfig(model=tmp_path / "nope"))


def _stream(port: int, max_tokens: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": "tiny-chat", "prompt": [1, 2, 3], "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
         "seed": 1}), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    return r


def test_sigterm_finishes_short_streams_and_cancels_long_ones(folder):
    """`nemotron3 serve` in its own process, `--shutdown-timeout 1.5`: SIGTERM while two streams run. The short
    one still ends with [DONE], the long one is cut when the timeout expires, new connections are refused, and
    the process exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nemotron3.cli", "serve", "--model", str(folder), "--port",
                             str(port), "--max-batch", "2", "--max-seq-len", "2048", "--threads", "1",
                             "--shutdown-timeout", "1.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert b"serving tiny-chat on http://127.0.0.1:" in proc.stdout.readline()
        short, long = _stream(port, 60), _stream(port, 2000)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        events = short.read().decode().split("\n\n")
        assert events[-2] == "data: [DONE]" and time.time() - t0 < 1.5
        assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"
        with pytest.raises(http.client.IncompleteRead):  # cut: no [DONE], the chunked body never ends
            long.read()
        assert proc.wait(30) == 0 and time.time() - t0 >= 1.5
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        proc.kill()
        proc.wait()
