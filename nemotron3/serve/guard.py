"""The app's outer layer (pure ASGI, outside every route and exception handler, docs/serving.md §4): the API key on
/v1/ (compared in constant time), one count in /metrics per response by route and status whatever produced it, and
the ends no route answered: a client gone before its response is one log line and a 499, any other exception a
logged traceback and a JSON 500."""

from __future__ import annotations

import hmac
import logging

from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nemotron3.serve.protocol import APIError

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
log = logging.getLogger("uvicorn.error")  # the server's log: uvicorn's, so these lines read like its own


class ClientGone(Exception):
    """The client closed the connection before its response was complete."""


def error(e: APIError) -> JSONResponse:
    """`e` as the response the client gets."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Guard:
    """The module docstring; `requests` counts responses by (endpoint, status)."""

    def __init__(self, app: ASGIApp, api_key: str | None, requests: Counter) -> None:
        self.app, self.key, self.requests = app, api_key.encode() if api_key else None, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], None

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.key is not None and path.startswith("/v1/") and not self._authorized(scope):
                await error(APIError(401, "Incorrect or missing API key: send Authorization: Bearer KEY",
                                     "invalid_request_error", None, "invalid_api_key"))(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        except (ClientGone, ClientDisconnect) as e:
            log.warning("%s %s: the client disconnected %s", scope["method"], path,
                        str(e) or "before its response was complete")
            if status is None:
                await Response(status_code=499)(scope, receive, counted)
        except Exception as e:
            log.exception("%s %s: the request failed", scope["method"], path)
            if status is None:
                await error(APIError(500, f"the server failed on this request ({type(e).__name__}; its log has "
                                     "the details)", "server_error"))(scope, receive, counted)
        finally:
            if status is not None:  # else nothing was answered: the task was cancelled (the server stopping)
                self.requests.labels(path if path in ROUTES else "other", str(status)).inc()

    def _authorized(self, scope: Scope) -> bool:
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(token, self.key)
