"""TinyServe's OpenAI ingress: ray.serve.llm's OpenAiIngress that survives replica failures and overload.

On top of Ray's ingress it
- answers an unknown model with an OpenAI-style 4xx (Ray's answers FastAPI's `{"detail": ...}`);
- re-sends a request whose replica fails before its first chunk to another replica, within
  `gateway.retry_max_attempts` attempts and `gateway.retry_deadline_s` (Ray Serve's router drops a replica
  whose actor died, so the next attempt goes elsewhere); a response says how many attempts it took in the
  `x-tinyserve-attempts` header;
- ends a stream whose replica fails after its first chunk with an OpenAI error event
  (`data: {"error": {...}}` then `data: [DONE]`), never a silently truncated stream;
- maps Ray Serve's BackPressureError (`max_queued_requests`) to 429 with Retry-After;
- wraps its FastAPI app in `HttpGuard` (bearer auth, body bound, the endpoint's in-flight bound).
A client that goes away cancels the request; Ray Serve cancels the replica call, and vLLM aborts the engine
request (its KV blocks go back to the pool).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncGenerator, Optional

from fastapi import HTTPException
from ray.exceptions import RayActorError
from ray.llm._internal.serve.constants import DEFAULT_LLM_ROUTER_HTTP_TIMEOUT
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse, OpenAIHTTPException
from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress, router_request_timeout
from ray.llm._internal.serve.core.ingress.utils import NON_STREAMING_RESPONSE_TYPES, _apply_openai_json_format
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from starlette.responses import JSONResponse, Response, StreamingResponse

from tinyserve.deployments.api_keys import ApiKeys
from tinyserve.deployments.config import GatewayConfig
from tinyserve.deployments.gateway_metrics import GatewayMetrics
from tinyserve.deployments.http_guard import HttpGuard, error_body

__all__ = ["TinyServeIngress", "ATTEMPTS_HEADER", "REPLICA_FAILURES"]

ATTEMPTS_HEADER = "x-tinyserve-attempts"
# A replica that died or became unreachable while holding the request.
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError)
_DONE = "data: [DONE]\n\n"


class _ReplicaFailed(Exception):
    """An attempt failed in a way another replica may not: the replica died or its engine failed (5xx)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _error_event(message: str, type_: str, code: int) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'param': None, 'code': code}})}\n\n"


class TinyServeIngress(OpenAiIngress):
    """OpenAiIngress with failover before the first chunk, error events after it, and 429 on overload.

    Owns `gateway` (GatewayConfig), the `ApiKeys` (None: auth off) and `metrics` (GatewayMetrics: retried
    requests, cut streams, rejections by reason; `gateway_stats()` returns them).
    Invariants: a request is sent at most `retry_max_attempts` times and never re-sent after a chunk of it
    reached the client; every stream the ingress starts ends with `data: [DONE]`.
    """

    def __init__(self, *args: Any, gateway: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gateway = GatewayConfig.model_validate(gateway or {})
        # Fails the replica's start when auth is configured but no key is found: never start open.
        self.api_keys = ApiKeys.load(file=self.gateway.api_keys_file, env=self.gateway.api_keys_env)
        self.metrics = GatewayMetrics(deployment=type(self).__name__)

    def _set_asgi_app(self, app: Any) -> None:
        # Ray Serve hands the ingress its FastAPI app here (after __init__): put the HTTP guard in front.
        g = self.gateway
        guarded = HttpGuard(app, keys=self.api_keys, max_body_bytes=g.max_body_bytes,
                            max_inflight=g.max_inflight_requests, retry_after_s=g.retry_after_s,
                            on_reject=self.metrics.on_rejected)
        super()._set_asgi_app(guarded)

    async def _get_model_id(self, model: Optional[str]) -> str:
        try:
            return await super()._get_model_id(model)
        except HTTPException as exc:
            error_type = "NotFoundError" if exc.status_code == 404 else "BadRequestError"
            raise OpenAIHTTPException(status_code=exc.status_code, message=str(exc.detail), type=error_type) from None

    def gateway_stats(self) -> dict[str, Any]:
        """The ingress's counters (the numbers exported as `tinyserve_gateway_*`)."""
        return self.metrics.snapshot()

    def _overloaded(self, message: str) -> Response:
        self.metrics.on_rejected("queue_full")
        return Response(error_body(429, message, "RateLimitError"), status_code=429, media_type="application/json",
                        headers={"Retry-After": str(self.gateway.retry_after_s)})

    async def _first_chunk(self, body: Any, call_method: str, raw_request: Any) -> tuple[Any, AsyncGenerator]:
        """One attempt: start the call on a replica and wait for its first chunk."""
        gen = self._get_response(body=body, call_method=call_method, raw_request=raw_request)
        try:
            first = await gen.__anext__()
        except REPLICA_FAILURES as exc:
            await gen.aclose()
            raise _ReplicaFailed(f"replica failed: {type(exc).__name__}") from None
        chunk = first[0] if isinstance(first, list) else first
        if isinstance(chunk, ErrorResponse) and chunk.error.code >= 500:
            await gen.aclose()
            raise _ReplicaFailed(chunk.error.message)
        return first, gen

    async def _process_llm_request(self, body: Any, call_method: str, raw_request: Any = None) -> Response:
        g = self.gateway
        deadline = time.monotonic() + g.retry_deadline_s
        async with router_request_timeout(DEFAULT_LLM_ROUTER_HTTP_TIMEOUT):
            attempt = 0
            while True:
                attempt += 1
                try:
                    first, gen = await self._first_chunk(body, call_method, raw_request)
                    break
                except BackPressureError:
                    return self._overloaded("Too many requests queued for the model; retry later.")
                except _ReplicaFailed as failure:
                    pause = g.retry_backoff_s * attempt
                    if attempt >= g.retry_max_attempts or time.monotonic() + pause >= deadline:
                        self.metrics.on_rejected("no_replica")
                        return Response(
                            error_body(503, f"No replica could serve the request ({failure.message}).",
                                       "ServiceUnavailableError"),
                            status_code=503, media_type="application/json",
                            headers={"Retry-After": str(g.retry_after_s), ATTEMPTS_HEADER: str(attempt)})
                    await asyncio.sleep(pause)
        if attempt > 1:
            self.metrics.on_retried()
        headers = {ATTEMPTS_HEADER: str(attempt)}
        chunk = first[0] if isinstance(first, list) else first
        if isinstance(chunk, ErrorResponse):
            raise OpenAIHTTPException(message=chunk.error.message, status_code=chunk.error.code, type=chunk.error.type)
        if isinstance(chunk, NON_STREAMING_RESPONSE_TYPES):
            return JSONResponse(content=chunk.model_dump(), headers=headers)
        return StreamingResponse(self._events(first, gen), media_type="text/event-stream", headers=headers)

    async def _events(self, first: Any, gen: AsyncGenerator) -> AsyncGenerator[str, None]:
        """Server-sent events of a stream; a failure after the first chunk becomes an error event."""
        done_sent = False
        item = first
        try:
            while True:
                packet = _apply_openai_json_format(item)
                done_sent = done_sent or packet.rstrip().endswith("data: [DONE]")
                yield packet
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
        except asyncio.CancelledError:
            raise  # the client went away: Ray Serve cancels the replica call
        except Exception as exc:  # the replica died or failed mid-stream
            self.metrics.on_cut_stream()
            replica_failed = isinstance(exc, REPLICA_FAILURES)
            message = ("The replica serving this stream failed; the output is incomplete." if replica_failed
                       else f"The stream failed: {type(exc).__name__}.")
            yield _error_event(message, "ServiceUnavailableError" if replica_failed else "InternalServerError",
                               503 if replica_failed else 500)
        finally:
            await gen.aclose()
        if not done_sent:
            yield _DONE
