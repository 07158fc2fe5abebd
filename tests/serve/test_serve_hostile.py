"""The server against hostile requests (issue 28), over a real socket (tests/serving.py's `Running`).

Every malformed body (nested past the limit, a lone UTF-16 surrogate in a string, not JSON, wrong types) gets a 4xx
in OpenAI's error shape naming the field; an exception no route expected is a JSON 500; a client that leaves during
its upload is one log line, not a traceback; and every answer, whatever its status, is counted in `/metrics`
(read with prometheus_client's own parser). Each bad request is followed by a good one that must still succeed.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import time

import pytest
import serving as sc
from prometheus_client.parser import text_string_to_metric_families
from serving import Running

import nemotron3
from nemotron3 import chat
from nemotron3.engine.text import encode_prompt
from nemotron3.serve import ServeConfig
from nemotron3.serve.protocol import MAX_DEPTH
from nemotron3.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GOOD = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A checkpoint with the serving tests' tokenizer; the model is barely trained (its replies do not matter)."""
    return sc.build(tmp_path_factory.mktemp("hostile") / "tiny-chat", mtp=False, steps=1)


@pytest.fixture(scope="module")
def server(folder):
    s = Running(ServeConfig(model=folder, max_batch=2, max_seq_len=512, max_tokens=8, max_body_bytes=1 << 20))
    yield s
    s.stop()


def counts(server: Running) -> dict[tuple[str, str], float]:
    """`nemotron3_requests_total` by (endpoint, status), as Prometheus reads the scrape."""
    return {(s.labels["endpoint"], s.labels["status"]): s.value
            for f in text_string_to_metric_families(server.text("/metrics")) if f.name == "nemotron3_requests"
            for s in f.samples if s.name == "nemotron3_requests_total"}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _chat(**fields) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


def _history(arguments) -> list[dict]:
    """A conversation whose earlier assistant turn called a tool with `arguments`."""
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                   "arguments": arguments}}]},
            {"role": "tool", "content": "ok"}]


DEEP = 100_000
HOSTILE = [  # (id, route, body, status, param, what the message must say)
    ("deep-array", CHAT, b"[" * DEEP, 400, None, "nested"),
    ("deep-array-closed", CHAT, nested(DEEP).encode(), 400, None, "nested"),
    ("deep-messages", CHAT, b'{"model": "tiny-chat", "messages": ' + nested(DEEP).encode() + b"}", 400, None,
     "nested"),
    ("deep-arguments", CHAT, _chat(messages=_history({"a": json.loads(nested(MAX_DEPTH + 1))})), 400, "messages",
     "nested"),
    ("deep-parameters", CHAT, _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": json.loads(nested(MAX_DEPTH))}}}}]),
     400, "tools", "nested"),
    ("surrogate-content", CHAT, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     "messages[0].content", "surrogate"),
    ("surrogate-part", CHAT, _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), 400,
     "messages[0].content[0].text", "surrogate"),
    ("surrogate-model", CHAT, _chat(model="x\ud800"), 400, "model", "surrogate"),
    ("surrogate-key", CHAT, _chat(extra={"\ud800": 1}), 400, "extra", "surrogate"),
    ("surrogate-prompt", COMPLETIONS, b'{"model": "tiny-chat", "prompt": "\\ud800"}', 400, "prompt", "surrogate"),
    ("surrogate-prompts", COMPLETIONS, json.dumps({"model": "tiny-chat", "prompt": ["ok", "\udc00 x"]}).encode(), 400,
     "prompt[1]", "surrogate"),
    ("huge-integer", CHAT, b'{"model": "tiny-chat", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "digits"),
    ("not-utf8", CHAT, b'{"model": "tiny-chat", "messages": "\xff"}', 400, None, "JSON"),
    ("empty", CHAT, b"", 400, None, "JSON"),
    ("top-level-string", COMPLETIONS, b'"hello"', 400, None, "object"),
    ("top-level-null", CHAT, b"null", 400, None, "object"),
    ("properties-not-object", CHAT, _chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": 5}}}]), 400,
     "tools[0].function.parameters.properties", "object"),
    ("tool-call-not-object", CHAT, _chat(messages=_history(None)[:1] + [{"role": "assistant", "tool_calls": [5]}]),
     400, "messages", "tool call"),
]


@pytest.mark.parametrize("route,body,status,param,says", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_a_hostile_body_is_a_counted_4xx_naming_the_field(server, route, body, status, param, says):
    before = counts(server)
    got, _, err = server.raw("POST", route, body)
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param, err
    assert says in err["error"]["message"], err
    assert counts(server).get((route, str(status)), 0) == before.get((route, str(status)), 0) + 1
    good = GOOD if route == CHAT else {"model": "tiny-chat", "prompt": "hi", "max_tokens": 2}
    assert server.raw("POST", route, good)[0] == 200


def test_nesting_up_to_the_limit_is_served(server):
    """The limit refuses only what is beyond it: a body nested exactly MAX_DEPTH levels (7 for the body, messages,
    a message, tool_calls, a call, function and arguments, the rest arrays in an argument) is an ordinary request."""
    depth = MAX_DEPTH - 7
    got, _, body = server.raw("POST", CHAT, _chat(messages=_history({"a": json.loads(nested(depth))})))
    assert got == 200, body


def test_an_unexpected_exception_is_a_counted_json_500(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.state.scheduler, "submit", broken)
    for route, body in [(CHAT, GOOD), (COMPLETIONS, {"model": "tiny-chat", "prompt": [1, 2], "max_tokens": 2})]:
        before = counts(server)
        got, _, err = server.raw("POST", route, body)
        assert got == 500 and err["error"]["type"] == "server_error" and "RuntimeError" in err["error"]["message"]
        assert counts(server).get((route, "500"), 0) == before.get((route, "500"), 0) + 1
    assert server.state.in_flight == 0
    monkeypatch.undo()
    assert server.raw("POST", CHAT, GOOD)[0] == 200


def test_errors_before_any_route_are_counted(server):
    before = counts(server)
    assert server.raw("GET", "/v1/nothing")[0] == 404
    assert server.raw("GET", CHAT)[0] == 405
    assert server.raw("POST", CHAT, _chat(pad="x" * (1 << 20)))[0] == 413
    after = counts(server)
    for key in [("other", "404"), (CHAT, "405"), (CHAT, "413")]:
        assert after.get(key, 0) == before.get(key, 0) + 1, key


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_gone_during_its_upload_is_one_log_line(server):
    before = counts(server)
    log, records = logging.getLogger("uvicorn.error"), Records()
    log.addHandler(records)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n" + b'{"model": "tiny-chat", "mess')
            time.sleep(0.2)
        deadline = time.time() + 10
        while not records.records and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything logged after the first record
    finally:
        log.removeHandler(records)
    lines = [logging.Formatter().format(r) for r in records.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "Traceback" not in lines[0], lines
    assert re.search(r"POST /v1/chat/completions.*disconnect.*28 of 1000 bytes", lines[0]), lines[0]
    assert counts(server).get((CHAT, "499"), 0) == before.get((CHAT, "499"), 0) + 1
    assert server.raw("POST", CHAT, GOOD)[0] == 200


def test_a_tokenizer_with_ids_beyond_the_model_is_checked_on_both_routes(folder, tmp_path):
    """A checkpoint whose tokenizer has more ids than the model has embedding rows: a prompt the tokenizer turns
    into such an id is refused with a 400 naming the field, on chat as on completions; the rest is served."""
    tok = Tokenizer.from_folder(folder)
    plain = encode_prompt(tok, chat.render(GOOD["messages"], add_generation_prompt=True), 1)
    V = max(plain) + 1
    word = tok.decode([tok.vocab_size - 1])
    beyond = [{"role": "user", "content": word}]
    assert V < tok.vocab_size and max(encode_prompt(tok, word, 1)) >= V  # the case exists, on both routes
    assert max(encode_prompt(tok, chat.render(beyond, add_generation_prompt=True), 1)) >= V
    small = tmp_path / "tiny-chat"
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=V, num_nextn_predict_layers=0)
    nemotron3.save_pretrained(nemotron3.HybridLM(config).eval(), small)
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, small / f.name)
    s = Running(ServeConfig(model=small, max_batch=1, max_seq_len=128, max_tokens=4))
    try:
        for route, body, param in [(CHAT, {**GOOD, "messages": beyond}, "messages"),
                                   (COMPLETIONS, {"model": "tiny-chat", "prompt": word, "max_tokens": 2}, "prompt")]:
            got, _, err = s.raw("POST", route, body)
            assert got == 400 and err["error"]["param"] == param, err
            assert f"[0, {V})" in err["error"]["message"] and "tokenizer" in err["error"]["message"], err
        assert s.raw("POST", CHAT, GOOD)[0] == 200
    finally:
        s.stop()
