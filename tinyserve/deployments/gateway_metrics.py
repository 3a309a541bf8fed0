"""`tinyserve_gateway_*` metrics of the OpenAI ingress: what it did for requests that could not simply pass.

- tinyserve_gateway_retried_requests_total: requests re-sent to another replica before their first chunk
  (counted once per request, however many attempts it took);
- tinyserve_gateway_cut_streams_total: streams whose replica failed after the first chunk, ended with an
  OpenAI error event and `data: [DONE]`;
- tinyserve_gateway_rejected_total{reason}: requests answered with an error before reaching a replica, by
  reason: `unauthorized` (401), `body_too_large` (413), `inflight_bound` (429, the endpoint's in-flight
  bound), `queue_full` (429, Ray Serve's `max_queued_requests`), `no_replica` (503 after the last attempt).

Exported like the router's metrics, through Ray's metrics agent (`ray_` prefix dropped by the shipped scrape
configuration); each ingress replica counts its own requests (label `deployment`, and Ray adds the worker's).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["GatewayMetrics", "REJECT_REASONS"]

REJECT_REASONS = ("unauthorized", "body_too_large", "inflight_bound", "queue_full", "no_replica")


class GatewayMetrics:
    """Owns the ingress's counters and an in-process copy (`snapshot()`) for tests and operators.

    Invariant: the in-process numbers equal what was exported. Ray metric objects exist only when Ray is
    initialised in this process (always so in an ingress replica; unit tests need not be).
    """

    def __init__(self, deployment: str = "") -> None:
        self._lock = threading.Lock()
        self._tags = {"deployment": deployment}
        self.retried_requests = 0
        self.cut_streams = 0
        self.rejected: dict[str, int] = {reason: 0 for reason in REJECT_REASONS}
        self._ray: dict[str, Any] | None = None
        try:
            import ray

            if ray.is_initialized():
                from ray.util.metrics import Counter

                self._ray = {
                    "retried": Counter("tinyserve_gateway_retried_requests_total",
                                       "Requests re-sent to another replica before their first chunk.",
                                       tag_keys=("deployment",)),
                    "cut": Counter("tinyserve_gateway_cut_streams_total",
                                   "Streams ended by an error event after their replica failed.",
                                   tag_keys=("deployment",)),
                    "rejected": Counter("tinyserve_gateway_rejected_total",
                                        "Requests answered with an error before reaching a replica, by reason.",
                                        tag_keys=("deployment", "reason")),
                }
        except Exception:
            self._ray = None

    def on_retried(self) -> None:
        with self._lock:
            self.retried_requests += 1
        if self._ray:
            self._ray["retried"].inc(1, tags=self._tags)

    def on_cut_stream(self) -> None:
        with self._lock:
            self.cut_streams += 1
        if self._ray:
            self._ray["cut"].inc(1, tags=self._tags)

    def on_rejected(self, reason: str) -> None:
        if reason not in self.rejected:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REJECT_REASONS}")
        with self._lock:
            self.rejected[reason] += 1
        if self._ray:
            self._ray["rejected"].inc(1, tags={**self._tags, "reason": reason})

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"retried_requests": self.retried_requests, "cut_streams": self.cut_streams,
                    "rejected": dict(self.rejected)}
