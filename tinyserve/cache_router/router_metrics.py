"""`tinyserve_router_*` metrics: exported through Ray's metrics agent (Prometheus) and kept in process.

- tinyserve_router_requests_total{replica}: requests routed to each replica;
- tinyserve_router_prompt_tokens_total, tinyserve_router_hit_tokens_total (cached prefix tokens on the
  replica chosen), tinyserve_router_best_hit_tokens_total (the longest cached prefix on any healthy replica):
  achieved vs best available;
- tinyserve_router_spills_total: requests sent past their cheapest replica by the balance bound;
- tinyserve_router_decision_latency_seconds (histogram): tokenize + hash + index lookup + cost;
- tinyserve_router_index_blocks{replica}: blocks the index holds per replica;
- tinyserve_router_event_lag_seconds{replica}: engine timestamp of the latest KV-event batch to applied;
- tinyserve_router_resyncs_total{replica}: index rebuilds after a gap, a restart or a late join.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["DECISION_LATENCY_BUCKETS_S", "RouterMetrics"]

DECISION_LATENCY_BUCKETS_S = [5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1]


class RouterMetrics:
    """Owns the router's metric objects and an in-process copy (`snapshot()`) for tests and benchmarks.

    Invariant: the in-process numbers equal what was exported. Ray metric objects are created only when
    Ray is initialised in this process (the router always is; unit tests and the simulator need not be).
    Metric updates are O(1) and allocate nothing beyond Ray's own tag dict.
    """

    def __init__(self, deployment: str = "") -> None:
        self._lock = threading.Lock()
        self._deployment = deployment
        self.requests: dict[str, int] = {}
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.best_hit_tokens = 0
        self.spills = 0
        self.latencies_s: list[float] = []
        self.index_blocks: dict[str, int] = {}
        self.event_lag_s: dict[str, float] = {}
        self.resyncs: dict[str, int] = {}
        self._ray: dict[str, Any] | None = None
        try:
            import ray

            if ray.is_initialized():
                self._ray = self._make_ray_metrics()
        except Exception:
            self._ray = None

    @staticmethod
    def _make_ray_metrics() -> dict[str, Any]:
        from ray.util.metrics import Counter, Gauge, Histogram

        keys = ("deployment",)
        rkeys = ("deployment", "replica")
        return {
            "requests": Counter("tinyserve_router_requests_total", "Requests routed per replica.", tag_keys=rkeys),
            "prompt": Counter("tinyserve_router_prompt_tokens_total", "Prompt tokens routed.", tag_keys=keys),
            "hit": Counter("tinyserve_router_hit_tokens_total", "Cached prefix tokens on the chosen replica.", tag_keys=keys),
            "best": Counter("tinyserve_router_best_hit_tokens_total", "Longest cached prefix tokens on any healthy replica.", tag_keys=keys),
            "spills": Counter("tinyserve_router_spills_total", "Requests moved off their cheapest replica by the balance bound.", tag_keys=keys),
            "latency": Histogram("tinyserve_router_decision_latency_seconds", "Routing decision latency.",
                                 boundaries=DECISION_LATENCY_BUCKETS_S, tag_keys=keys),
            "blocks": Gauge("tinyserve_router_index_blocks", "KV blocks the router's index holds per replica.", tag_keys=rkeys),
            "lag": Gauge("tinyserve_router_event_lag_seconds", "Latest KV-event batch lag (engine timestamp to applied).", tag_keys=rkeys),
            "resyncs": Gauge("tinyserve_router_resyncs_total", "Index rebuilds per replica (gap, restart, late join).", tag_keys=rkeys),
        }

    def on_decision(self, latency_s: float) -> None:
        with self._lock:
            self.latencies_s.append(latency_s)
            if len(self.latencies_s) > 100_000:
                del self.latencies_s[:50_000]
        if self._ray:
            self._ray["latency"].observe(latency_s, tags={"deployment": self._deployment})

    def on_routed(self, replica: str, prompt_tokens: int, hit_tokens: int, best_hit_tokens: int, spilled: bool) -> None:
        with self._lock:
            self.requests[replica] = self.requests.get(replica, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.hit_tokens += hit_tokens
            self.best_hit_tokens += best_hit_tokens
            self.spills += int(spilled)
        if self._ray:
            t = {"deployment": self._deployment}
            self._ray["requests"].inc(1, tags={"deployment": self._deployment, "replica": replica})
            if prompt_tokens:
                self._ray["prompt"].inc(prompt_tokens, tags=t)
            if hit_tokens:
                self._ray["hit"].inc(hit_tokens, tags=t)
            if best_hit_tokens:
                self._ray["best"].inc(best_hit_tokens, tags=t)
            if spilled:
                self._ray["spills"].inc(1, tags=t)

    def set_replica(self, replica: str, index_blocks: int, event_lag_s: float | None, resyncs: int | None) -> None:
        with self._lock:
            self.index_blocks[replica] = index_blocks
            if event_lag_s is not None:
                self.event_lag_s[replica] = event_lag_s
            if resyncs is not None:
                self.resyncs[replica] = resyncs
        if self._ray:
            t = {"deployment": self._deployment, "replica": replica}
            self._ray["blocks"].set(index_blocks, tags=t)
            if event_lag_s is not None:
                self._ray["lag"].set(event_lag_s, tags=t)
            if resyncs is not None:
                self._ray["resyncs"].set(resyncs, tags=t)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = sorted(self.latencies_s)
            pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
            return {
                "requests": dict(self.requests),
                "prompt_tokens": self.prompt_tokens,
                "hit_tokens": self.hit_tokens,
                "best_hit_tokens": self.best_hit_tokens,
                "spills": self.spills,
                "decision_latency_s": {"p50": pick(0.5), "p99": pick(0.99), "n": len(lat)},
                "index_blocks": dict(self.index_blocks),
                "event_lag_s": dict(self.event_lag_s),
                "resyncs": dict(self.resyncs),
            }
