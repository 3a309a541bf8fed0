"""The HTTP edge of the OpenAI endpoint: bearer auth, request-body bound and the endpoint's admission bound.

`HttpGuard` is a plain ASGI middleware wrapped around the ingress's FastAPI app, so it answers before any
route parses a body: 401 (auth), 413 (body too large), 429 with Retry-After (too many requests in flight).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from tinyserve.deployments.api_keys import ApiKeys

__all__ = ["HttpGuard", "error_body"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_body(status: int, message: str, type_: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}}).encode()


class HttpGuard:
    """ASGI middleware that owns the endpoint's in-flight count and turns requests away at the edge.

    Invariants: `inflight` counts the HTTP requests inside the wrapped app (it never exceeds
    `max_inflight` when that is set); a request without an accepted key never reaches the app and its 401
    never says whether the header, the scheme or the key was wrong; no request body larger than
    `max_body_bytes` reaches the app, declared (Content-Length) or streamed (chunked).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        keys: ApiKeys | None,
        max_body_bytes: int,
        max_inflight: int | None,
        retry_after_s: int,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.on_reject = on_reject  # called with the reason of each request turned away (GatewayMetrics)
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.max_inflight = max_inflight
        self.retry_after_s = retry_after_s
        self.inflight = 0

    async def _reject(self, send: Send, reason: str, status: int, message: str, type_: str,
                      headers: list | None = None) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)
        body = error_body(status, message, type_)
        await send({
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + (headers or []),
        })
        await send({"type": "http.response.body", "body": body})

    def _too_many(self) -> list:
        return [(b"retry-after", str(self.retry_after_s).encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.keys is not None and scope.get("method") != "OPTIONS":
            if not self.keys.accepts(headers.get(b"authorization")):
                await self._reject(send, "unauthorized", 401, "Unauthorized.", "AuthenticationError",
                                   [(b"www-authenticate", b"Bearer")])
                return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await self._reject(send, "body_too_large", 413, f"Request body larger than {self.max_body_bytes} bytes.",
                               "RequestTooLargeError")
            return
        if self.max_inflight is not None and self.inflight >= self.max_inflight:
            await self._reject(send, "inflight_bound", 429, "Too many requests in flight; retry later.", "RateLimitError",
                               self._too_many())
            return

        self.inflight += 1
        try:
            body = await self._read_body(receive, send)
            if body is None:
                return
            await self.app(scope, self._replay(body, receive), send)
        finally:
            self.inflight -= 1

    async def _read_body(self, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or None after answering 413 (or when the client left)."""
        # Read the whole body first (at most max_body_bytes of it), then replay it to the app: the bound holds
        # for chunked bodies too, and an oversized body is refused before any route sees it.
        chunks: list[bytes] = []
        received = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                return None
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                await self._reject(send, "body_too_large", 413, f"Request body larger than {self.max_body_bytes} bytes.",
                                   "RequestTooLargeError")
                return None
            chunks.append(chunk)
            more_body = message.get("more_body", False)
        return b"".join(chunks)

    @staticmethod
    def _replay(body: bytes, receive: Receive) -> Receive:
        pending: list[bytes] = [body]

        async def replay_receive() -> Message:
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await receive()

        return replay_receive
