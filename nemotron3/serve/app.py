"""The HTTP server: FastAPI routes over the scheduler (engine/scheduler.py), OpenAI's wire format (docs/serving.md).

    app = create_app(Server(scheduler, tokenizer, settings))     # then uvicorn.run(app, ...)

The scheduler runs on its own thread; each request submits its choices and awaits their events on an asyncio queue
(one loop wake-up per scheduler step). A client gone is noticed by a watcher or a failed write, and its choices are
cancelled. `Guard`, the outer layer, checks the API key, answers what no route did (499, JSON 500) and counts every
status in /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nemotron3 import chat
from nemotron3.engine.scheduler import Event, Scheduler
from nemotron3.engine.scheduler import Request as GenRequest
from nemotron3.engine.text import encode_prompt
from nemotron3.serve.guard import ClientGone, Guard, error
from nemotron3.serve.metrics import Metrics
from nemotron3.serve.output import Reply, chat_logprobs, completion_logprobs, finish_reason, sse, usage
from nemotron3.serve.protocol import APIError, Limits, decode_body, parse_chat, parse_completion
from nemotron3.tokenizer import Tokenizer

PAGE = Path(__file__).with_name("index.html")


@dataclass(frozen=True)
class Settings:
    """What the server allows and how it identifies itself (ServeConfig's flags, docs/serving.md §4)."""

    served_model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_n: int = 8
    max_requests: int = 256  # choices running + queued
    max_body_bytes: int = 1 << 20


class Server:
    """The scheduler, the tokenizer and the limits one app serves."""

    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, settings: Settings) -> None:
        self.scheduler, self.tok, self.settings = scheduler, tokenizer, settings
        self.config = scheduler.config
        self.room = scheduler.max_seq_len - scheduler.spec.room  # prompt + new tokens one slot holds
        self.limits = Limits(min(settings.max_prompt_tokens, self.room - 1), settings.max_tokens, settings.max_n,
                             self.room)
        self.eos = frozenset(self.config.eos_token_ids)
        self.chat_stops = frozenset(tokenizer.chat_stop_ids(self.eos))
        self.in_flight = 0  # choices submitted and not yet ended
        self.created = int(time.time())
        self.metrics = Metrics(lambda: scheduler.running, lambda: scheduler.queued, scheduler.rows)
        self._lock, self._flush_scheduled = threading.Lock(), False
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # set when the app starts

    # ------------------------------------------------------------------ admission
    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tok, text, self.config.bos_token_id)

    def prompt(self, source: str | list[int], asked: int | None, param: str) -> tuple[list[int], int]:
        """(token ids, max new tokens) of one prompt, text through the tokenizer or ids as given: every id has a row
        in the model's embedding (a tokenizer may have more ids), and the prompt leaves room for the reply."""
        ids = self.encode(source) if isinstance(source, str) else list(source)
        V = self.config.vocab_size
        beyond = next((t for t in ids if not 0 <= t < V), None)
        if beyond is not None:
            origin = "the tokenizer turns it into" if isinstance(source, str) else "it holds"
            raise APIError(400, f"{param}: {origin} token id {beyond}, outside the model's vocabulary [0, {V})",
                           param=param, code="invalid_value")
        return ids, self.max_new(ids, asked, param)

    def max_new(self, prompt: list[int], asked: int | None, param: str) -> int:
        """The request's max_tokens, checked against the prompt's length and the slot's room."""
        if len(prompt) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt)} tokens, more than the {self.limits.max_prompt_tokens} "
                           "this server accepts", param=param, code="context_length_exceeded")
        room = self.room - len(prompt)
        if asked is None:
            return min(self.limits.max_tokens, room)
        if asked > room:
            raise APIError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens ({asked}) is more than the "
                           f"{self.room} tokens of context one request may use", param="max_tokens",
                           code="context_length_exceeded")
        return asked

    def admit(self, choices: int) -> None:
        if self.in_flight + choices > self.settings.max_requests:
            raise APIError(429, f"the server is at its limit of {self.settings.max_requests} running and queued "
                           "requests; retry shortly", "rate_limit_error", None, "rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    # ------------------------------------------------------------------ running choices
    async def run(self, specs: list[tuple[GenRequest, Reply]], request: Request) -> AsyncIterator[tuple]:
        """Submit the choices; yield (index, event, text deltas) per event as they come (on a choice's last event,
        whatever its Reply held back too); cancels the choices left when the consumer stops early (aclosing)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.in_flight += len(specs)
        handles, open_ = [], set(range(len(specs)))
        t0 = time.perf_counter()
        last: dict[int, float] = {}
        watcher = asyncio.create_task(self._watch(request, queue))
        try:
            for i, (req, _) in enumerate(specs):
                handles.append(self.scheduler.submit(req, lambda ev, i=i: self._deliver(queue, (i, ev))))
            while open_:
                item = await queue.get()
                if item is None:
                    raise ClientGone()
                i, ev = item
                if i not in open_:
                    continue
                reply = specs[i][1]
                now = time.perf_counter()
                if ev.tokens:
                    if i not in last:
                        self.metrics.ttft.observe(now - t0)
                    self.metrics.tokens(len(ev.tokens), now - last[i] if i in last else None)
                    last[i] = now
                if ev.accepted is not None:
                    self.metrics.round(ev.accepted, self.scheduler.k)
                deltas = reply.push(ev.tokens)
                if reply.stopped and ev.finish is None:  # a stop string: the rest is not wanted
                    self.scheduler.cancel(handles[i])
                    ev = Event(ev.tokens, ev.logprobs, ev.top_logprobs, finish="stop")
                if ev.finish is not None:
                    deltas += reply.finish()
                    open_.discard(i)
                    self.in_flight -= 1
                yield i, ev, deltas
        finally:
            watcher.cancel()
            for i in open_:
                if i < len(handles):
                    self.scheduler.cancel(handles[i])
                self.in_flight -= 1
                self.metrics.finished.labels("cancelled").inc()
            self.metrics.e2e.observe(time.perf_counter() - t0)

    def _deliver(self, queue: asyncio.Queue, item: tuple) -> None:
        """From the scheduler's thread: hand `item` to `queue` on the event loop (one wake-up per scheduler step)."""
        with self._lock:
            self._outbox.append((queue, item))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._outbox, self._flush_scheduled = self._outbox, [], False
        for queue, item in items:
            queue.put_nowait(item)

    @staticmethod
    async def _watch(request: Request, queue: asyncio.Queue) -> None:
        """Put None in `queue` once the client has disconnected (checked twice a second)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        queue.put_nowait(None)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over `server`; its lifespan starts and stops the scheduler's thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server._loop = asyncio.get_running_loop()
        server.scheduler.start()
        yield
        server.scheduler.stop(cancel=True)

    app = FastAPI(title="nemotron3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=server.settings.api_key, requests=server.metrics.requests)
    settings, metrics, tok = server.settings, server.metrics, server.tok

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              "invalid_request_error", None, kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(APIError(400, str(e)))

    async def body_of(request: Request):
        length = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes",
                           "invalid_request_error", None, "request_too_large")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise too_big
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > settings.max_body_bytes:
                    raise too_big
        except ClientDisconnect:
            raise ClientGone(f"during its upload ({len(data)} of {length or 'unknown'} bytes received)") from None
        return decode_body(bytes(data))

    # ------------------------------------------------------------------ routes
    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "running": server.scheduler.running, "waiting": server.scheduler.queued}

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model",
                                            "created": server.created, "owned_by": "nemotron3",
                                            "max_model_len": server.room}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        p = parse_chat(await body_of(request), settings.served_model_name, server.limits)
        try:
            text = tok.render(p.messages, p.tools, enable_thinking=p.enable_thinking, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        prompt, max_new = server.prompt(text, p.params.max_tokens, "messages")
        thinking = text.endswith(chat.THINK_START + "\n")
        params = replace(p.params, max_tokens=max_new, stop_token_ids=tuple(sorted(server.chat_stops)),
                         max_thinking_tokens=p.params.max_thinking_tokens if thinking else None)
        specs = [(GenRequest(prompt, params, i), Reply(tok, server.chat_stops, p.stop, chat=True, thinking=thinking,
                                                       tools=p.tools if p.parse_tools else None, fmt=tok.format))
                 for i in range(params.n)]
        return await respond(request, p, prompt, specs, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        p = parse_completion(await body_of(request), settings.served_model_name, server.limits)
        specs, prompts = [], []
        for item in p.prompts:
            ids, max_new = server.prompt(item, p.params.max_tokens, "prompt")
            prompts.append(ids)
            params = replace(p.params, max_tokens=max_new, stop_token_ids=tuple(sorted(server.eos)))
            specs += [(GenRequest(ids, params, i), Reply(tok, server.eos, p.stop)) for i in range(params.n)]
        echo = [tok.decode(ids) if p.echo else "" for ids in prompts for _ in range(p.params.n)]
        return await respond(request, p, sum(len(x) for x in prompts), specs, "text_completion", echo)

    async def respond(request: Request, p, prompt: list[int] | int, specs: list, kind: str,
                      echo: list[str] | None = None) -> Response:
        n_prompt = prompt if isinstance(prompt, int) else len(prompt)
        server.admit(len(specs))
        metrics.prompt_tokens.inc(n_prompt)
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        replies = [r for _, r in specs]
        head = {"id": rid, "created": created, "model": settings.served_model_name}
        if p.stream:
            return StreamingResponse(stream(request, p, n_prompt, specs, kind, echo, head),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        logprobs: list[list] = [[] for _ in specs]
        ends: dict[int, Event] = {}
        try:
            async with contextlib.aclosing(server.run(specs, request)) as events:
                async for i, ev, _ in events:
                    if ev.finish is not None:
                        ends[i] = ev
                    if p.params.logprobs is not None and ev.tokens:
                        logprobs[i].append(ev)
        except ClientGone:
            return Response(status_code=499)
        if any(ev.finish == "error" for ev in ends.values()):
            raise APIError(500, "generation failed inside the engine (see the server's log)", "server_error")
        choices = []
        for i, reply in enumerate(replies):
            reason = finish_reason(ends[i], reply)
            metrics.finished.labels(reason).inc()
            if kind == "chat.completion":
                lp = {"content": [x for ev in logprobs[i] for x in chat_logprobs(tok, ev)]} \
                    if p.params.logprobs is not None else None
                choices.append({"index": i, "message": reply.message(), "logprobs": lp, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": echo[i] + reply.text, "finish_reason": reason,
                                "logprobs": None if p.params.logprobs is None
                                else completion_logprobs(tok, logprobs[i])})
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": usage(n_prompt, replies)})

    async def stream(request: Request, p, n_prompt: int, specs: list, kind: str, echo: list[str] | None,
                     head: dict) -> AsyncIterator[bytes]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        replies = [r for _, r in specs]
        no_usage = {"usage": None} if p.include_usage else {}

        def chunk(i: int, body: dict, reason: str | None = None, logprobs=None) -> bytes:
            choice = {"index": i, **body, "logprobs": logprobs, "finish_reason": reason}
            return sse({**head, "object": chunk_kind, "choices": [choice], **no_usage})

        if kind == "chat.completion":
            for i in range(len(specs)):
                yield chunk(i, {"delta": {"role": "assistant", "content": ""}})
        elif echo and any(echo):
            for i, text in enumerate(echo):
                yield chunk(i, {"text": text})
        try:
            async with contextlib.aclosing(server.run(specs, request)) as events:
                async for i, ev, deltas in events:
                    lp = None
                    if p.params.logprobs is not None and ev.tokens:
                        lp = {"content": chat_logprobs(tok, ev)} if kind == "chat.completion" else \
                            completion_logprobs(tok, [ev])
                    if kind == "chat.completion":
                        body: dict = {"delta": {}}
                        for name, text in deltas:
                            body["delta"][name] = body["delta"].get(name, "") + text
                    else:
                        body = {"text": "".join(text for _, text in deltas)}
                    reason = None
                    if ev.finish is not None:
                        reason = finish_reason(ev, replies[i])
                        metrics.finished.labels(reason).inc()
                        calls = replies[i].message().get("tool_calls") if kind == "chat.completion" else None
                        if calls:
                            body["delta"]["tool_calls"] = [{"index": j, **c} for j, c in enumerate(calls)]
                    if body.get("delta") or body.get("text") or lp or reason:
                        yield chunk(i, body, reason, lp)
        except ClientGone:
            return
        if p.include_usage:
            yield sse({**head, "object": chunk_kind, "choices": [], "usage": usage(n_prompt, replies)})
        yield sse("[DONE]")

    return app
