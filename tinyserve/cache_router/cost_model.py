"""What sending a request to a replica is expected to cost, in seconds of time to first token.

    cost = prefill_s_per_token × (prompt_tokens − cached_prefix_tokens)   own uncached prefill
         + prefill backlog (seconds of prefill already queued there by this router)
         + decode_s_per_request × max(router in-flight, engine running + waiting)
         + KV pressure: kv_pressure_s × ((usage − threshold) / (1 − threshold))² above the threshold,
           plus scatter_s × free-space scatter (blocks that must move as runs pay for scatter)

The overlap credit is the first term: every cached token is prefill the replica skips. The routing policy
adds ``work per request × (recent requests − mean recent requests)`` (`share_penalty_s`; work per request is
the running mean of uncached prefill plus one decode per request it routed, or ``excess_share_s``): a
replica sent more than its share has that much more work to get through than its peers. Without it, at low
load (nothing in flight anywhere) small overlaps (a shared instruction, a chat template) steer every new
prefix onto the replicas that already served most requests until the balance bounds force hot prefixes to
spread (each spread a cold prefill), and a hot prefix keeps its replica busier than the rest. The weights are
calibrated from a live run (`CostWeights.calibrate`): prefill seconds per token from TTFT of cold prompts,
decode seconds per request from how TTFT grows with the number of requests in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CostWeights", "ReplicaLoad", "CostModel"]


@dataclass(frozen=True)
class CostWeights:
    """Coefficients of the cost (seconds). Defaults: the 30M-parameter model on this CPU, rounded."""

    prefill_s_per_token: float = 2.0e-4
    decode_s_per_request: float = 0.03
    kv_pressure_threshold: float = 0.85
    kv_pressure_s: float = 1.0
    scatter_s: float = 0.01
    excess_share_s: float | None = None  # None: the router's running mean of work per request

    @classmethod
    def calibrate(
        cls,
        cold_ttft_s: list[tuple[int, float]],
        loaded_ttft_s: list[tuple[int, float]],
        **overrides: float,
    ) -> "CostWeights":
        """Least-squares fit. `cold_ttft_s`: (uncached prompt tokens, TTFT) of requests on idle replicas;
        `loaded_ttft_s`: (requests in flight on the replica, TTFT − cold estimate) under load."""
        p = cls.prefill_s_per_token
        if cold_ttft_s:
            sxx = sum(n * n for n, _ in cold_ttft_s)
            if sxx > 0:
                p = max(1e-7, sum(n * t for n, t in cold_ttft_s) / sxx)
        d = cls.decode_s_per_request
        if loaded_ttft_s:
            sxx = sum(k * k for k, _ in loaded_ttft_s)
            if sxx > 0:
                d = max(1e-5, sum(k * t for k, t in loaded_ttft_s) / sxx)
        return cls(prefill_s_per_token=p, decode_s_per_request=d, **overrides)


@dataclass
class ReplicaLoad:
    """A replica's load as the router knows it at decision time.

    `inflight` and `prefill_backlog_s` are the router's own (exact for requests it sent); `num_running`,
    `num_waiting`, `kv_usage`, `free_space_scatter` come from the replica's routing stats (periodic).
    """

    inflight: int = 0
    prefill_backlog_s: float = 0.0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    free_space_scatter: float = 0.0
    healthy: bool = True

    @property
    def requests(self) -> int:
        return max(self.inflight, self.num_running + self.num_waiting)


class CostModel:
    """Scores replicas for one request; stateless apart from its weights."""

    def __init__(self, weights: CostWeights | None = None) -> None:
        self.weights = weights or CostWeights()

    def prefill_s(self, uncached_tokens: int) -> float:
        return self.weights.prefill_s_per_token * max(0, uncached_tokens)

    def kv_penalty_s(self, load: ReplicaLoad) -> float:
        w = self.weights
        pen = w.scatter_s * load.free_space_scatter
        if load.kv_usage > w.kv_pressure_threshold:
            x = (load.kv_usage - w.kv_pressure_threshold) / max(1e-9, 1.0 - w.kv_pressure_threshold)
            pen += w.kv_pressure_s * x * x
        return pen

    def share_penalty_s(self, excess_requests: float, work_per_request_s: float) -> float:
        """Seconds charged for `excess_requests` more recent requests than the mean (negative: fewer): each
        is a request's worth of work (`work_per_request_s`, the router's running mean of the prefill and
        decode it sends per request) that replica must get through before its peers."""
        w = self.weights
        return (work_per_request_s if w.excess_share_s is None else w.excess_share_s) * excess_requests

    def cost(self, prompt_tokens: int, cached_tokens: int, load: ReplicaLoad) -> float:
        """Expected seconds to first token on a replica holding `cached_tokens` of the prompt."""
        w = self.weights
        return (
            w.prefill_s_per_token * max(0, prompt_tokens - cached_tokens)
            + load.prefill_backlog_s
            + w.decode_s_per_request * load.requests
            + self.kv_penalty_s(load)
        )
