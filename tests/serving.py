"""What the server's tests share: a tiny chat checkpoint that knows three replies by heart, and a server running on
a loopback socket of its own.

A random model writes noise, which cannot show that reasoning is returned apart from the answer or that a tool
call reaches the client parsed. So the tiny preset is trained for a few hundred Adam steps on three
conversations until greedy decoding reproduces each reply exactly: a reasoning + answer reply (GREETING), a
reasoning + tool call reply (WEATHER), and a reasoning-off answer (GREETING with thinking off). The tokenizer
is nemotron3's own (nemotron3/tokenizer.py: the chat format's special tokens), trained on the same text.

`Running(ServeConfig(...))` builds the server (`nemotron3.serve.build_server`) and runs uvicorn on a thread,
with helpers for raw requests and for reading a metric.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from pathlib import Path

import torch

import nemotron3
from nemotron3 import chat
from nemotron3.serve import ServeConfig, build_server
from nemotron3.serve.app import create_app
from nemotron3.tokenizer import Tokenizer
from nemotron3.train.sft_data import Conversation, encode

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

GREETING = [{"role": "user", "content": "Hello there"}]
GREETING_REASONING = "The user greets me. I greet back."
GREETING_REPLY = "Hi! How can I help you today?"
GREETING_OFF_REPLY = "Hello! Ask me anything."
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_REASONING = "I should call the weather tool."
WEATHER_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}


def conversations() -> list[tuple[Conversation, str]]:
    """(conversation with its assistant reply, reasoning mode) for each memorised reply."""
    return [
        (Conversation(GREETING + [{"role": "assistant", "reasoning_content": GREETING_REASONING,
                                   "content": GREETING_REPLY}]), "on"),
        (Conversation(GREETING + [{"role": "assistant", "content": GREETING_OFF_REPLY}]), "off"),
        (Conversation(WEATHER + [{"role": "assistant", "reasoning_content": WEATHER_REASONING, "content": "",
                                  "tool_calls": [WEATHER_CALL]}], TOOLS), "on"),
    ]


def build(folder: Path, mtp: bool = True, steps: int = 200, seed: int = 0, lr: float = 1e-2, stop_loss: float = 0.02
          ) -> Path:
    """Train the tokenizer and the model (until the replies' mean cross-entropy is below `stop_loss`, and the MTP
    head's below ten times that), save both in `folder`; returns it."""
    convs = conversations()
    texts = [chat.render(c.messages, c.tools, enable_thinking=mode != "off") for c, mode in convs]
    tok = Tokenizer.train(texts * 4 + ["once upon a time there was a tiny model"] * 4, vocab_size=400)
    config = nemotron3.ModelConfig.preset("tiny").replace(vocab_size=tok.vocab_size)
    if not mtp:
        config = config.replace(num_nextn_predict_layers=0)
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a second thread only waits on a busy machine at this size
    exs = [encode(c, tok, mode) for c, mode in convs]
    T = max(len(e.ids) for e in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    mask = torch.zeros(len(exs), T)
    for i, e in enumerate(exs):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = torch.tensor(e.mask, dtype=torch.float)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logits, mtp_logits = model.forward_mtp(ids[:, :-1], 1) if mtp else (model(ids[:, :-1]), None)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = main = (ce * mask[:, 1:]).sum() / mask[:, 1:].sum()
        draft = torch.zeros(())
        if mtp:  # the MTP head learns the same replies, so that its drafts are accepted
            ce2 = torch.nn.functional.cross_entropy(mtp_logits[0][:, :-1].transpose(1, 2), ids[:, 2:],
                                                    reduction="none")
            draft = (ce2 * mask[:, 2:]).sum() / mask[:, 2:].sum()
            loss = loss + 0.5 * draft
        opt.zero_grad()
        loss.backward()
        opt.step()
        if main.item() < stop_loss and draft.item() < 10 * stop_loss:
            break
    torch.set_num_threads(threads)
    nemotron3.save_pretrained(model.eval(), folder)
    tok.save(folder)
    return folder


class Running:
    """A server on a loopback socket of its own, in a thread (uvicorn without signal handlers)."""

    def __init__(self, cfg: ServeConfig) -> None:
        import uvicorn

        self.state = build_server(cfg)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(create_app(self.state), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none"):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None,
            headers: dict | None = None) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request sent as is."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        text = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), json.loads(text) if text else {}

    def text(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", path)
        text = conn.getresponse().read().decode()
        conn.close()
        return text

    def metric(self, name: str, labels: str = "") -> float:
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", self.text("/metrics"), re.M)
        return float(m[1]) if m else 0.0

    def stream(self, path: str, body: dict) -> http.client.HTTPResponse:
        """A streaming request, its first event read."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        return r

    def stop(self) -> None:
        self.uv.should_exit = True
        self.thread.join(30)
