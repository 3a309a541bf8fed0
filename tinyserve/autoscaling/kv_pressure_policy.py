"""KV-pressure autoscaling policy for Ray Serve 2.60's custom autoscaling policy API.

Ray Serve's controller calls the policy every control-loop tick with an `AutoscalingContext` and takes a
desired replica count back. Ray wraps every custom policy (`_apply_autoscaling_config`) with the
deployment's `upscale_delay_s` / `downscale_delay_s` (a decision must hold that long before it acts) and
its up/down-scaling factors, and clips the result to min/max replicas; this policy also clips to the
capacity-adjusted bounds itself so that its own output is always a valid count.

Signals, per replica, reported by `record_autoscaling_stats` (replica_signals.py) and averaged by Ray over
`look_back_period_s`, which is what makes them "sustained": KV usage, requests waiting in the engine
core's scheduler, the preemption rate (from the running total's time series), and Ray's own count of
ongoing requests.

Decision, with n the running replicas:
- pressure (mean KV usage >= kv_usage_high, or waiting per replica >= waiting_per_replica_high, or
  preemptions per second > preemption_rate_high, or ongoing requests per replica >=
  requests_per_replica_target): grow to max(n + 1, the count that brings mean KV usage to
  kv_usage_target, the count that brings ongoing requests per replica to the target);
- idle (mean KV usage <= kv_usage_low, nothing waiting or preempted, ongoing requests per replica <=
  idle_requests_fraction x target): shrink to the count that still keeps KV usage and ongoing requests at
  their targets (0 when nothing is ongoing; min_replicas applies);
- otherwise hold n.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from tinyserve.autoscaling.replica_signals import KV_USAGE, NUM_WAITING, PREEMPTIONS_TOTAL

__all__ = ["KVPressurePolicy", "kv_pressure_policy", "STATE_KEY"]

# Ray Serve's logger: in the controller its records land in logs/serve/controller_*.log.
logger = logging.getLogger("ray.serve")

# Key of this policy's entry in Ray's per-deployment policy state: the last decision and why.
STATE_KEY = "tinyserve_kv_pressure"


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _preemption_rate(series_by_replica: dict[Any, list[Any]] | None) -> float:
    """Preemptions per second summed over replicas, from each replica's running-total time series."""
    rate = 0.0
    for series in (series_by_replica or {}).values():
        if len(series) < 2:
            continue
        first, last = series[0], series[-1]
        elapsed = last.timestamp - first.timestamp
        increase = last.value - first.value
        if elapsed > 0 and increase > 0:  # a decrease is an engine restart, not negative preemptions
            rate += increase / elapsed
    return rate


class KVPressurePolicy:
    """Ray Serve custom autoscaling policy driven by KV-cache pressure.

    Ray instantiates the class once per deployment with the config's `policy_kwargs` and calls the instance
    every tick: `policy(ctx) -> (desired_replicas, policy_state)`. Owns only its thresholds; all memory
    between ticks lives in Ray's `ctx.policy_state` (this policy records its last decision under
    `STATE_KEY`). Invariant: the returned count lies in
    [ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas].

    Args:
        kv_usage_high: mean KV usage (0-1) at or above which the deployment grows.
        kv_usage_target: mean KV usage the grown or shrunk replica count aims at.
        kv_usage_low: mean KV usage at or below which the deployment may count as idle.
        waiting_per_replica_high: engine-waiting requests per replica at or above which it grows.
        preemption_rate_high: preemptions per second (all replicas) above which it grows.
        requests_per_replica_target: ongoing requests per replica it aims at (None: the deployment's
            `target_ongoing_requests`).
        idle_requests_fraction: idle means at most this fraction of the request target per replica.
    """

    def __init__(
        self,
        kv_usage_high: float = 0.8,
        kv_usage_target: float = 0.6,
        kv_usage_low: float = 0.2,
        waiting_per_replica_high: float = 1.0,
        preemption_rate_high: float = 0.0,
        requests_per_replica_target: float | None = None,
        idle_requests_fraction: float = 0.25,
    ) -> None:
        if not 0.0 <= kv_usage_low <= kv_usage_target <= kv_usage_high <= 1.0:
            raise ValueError("need 0 <= kv_usage_low <= kv_usage_target <= kv_usage_high <= 1")
        if kv_usage_target <= 0.0:
            raise ValueError("kv_usage_target must be > 0")
        if waiting_per_replica_high <= 0 or preemption_rate_high < 0:
            raise ValueError("waiting_per_replica_high must be > 0 and preemption_rate_high >= 0")
        if requests_per_replica_target is not None and requests_per_replica_target <= 0:
            raise ValueError("requests_per_replica_target must be > 0")
        self.kv_usage_high = kv_usage_high
        self.kv_usage_target = kv_usage_target
        self.kv_usage_low = kv_usage_low
        self.waiting_per_replica_high = waiting_per_replica_high
        self.preemption_rate_high = preemption_rate_high
        self.requests_per_replica_target = requests_per_replica_target
        self.idle_requests_fraction = idle_requests_fraction

    def signals(self, ctx: Any) -> dict[str, float | None]:
        """The numbers a decision is made from (None where no replica reported the signal yet)."""
        n = max(ctx.current_num_replicas, 1)
        aggregated = ctx.aggregated_metrics or {}
        kv = [float(v) for v in (aggregated.get(KV_USAGE) or {}).values()]
        waiting = [float(v) for v in (aggregated.get(NUM_WAITING) or {}).values()]
        raw = (ctx.raw_metrics or {}) if PREEMPTIONS_TOTAL in aggregated else {}
        return {
            "kv_usage_mean": _mean(kv),
            "waiting_per_replica": sum(waiting) / n if waiting else None,
            "preemption_rate": _preemption_rate(raw.get(PREEMPTIONS_TOTAL)),
            "requests_per_replica": float(ctx.total_num_requests) / n,
        }

    def _requests_target(self, ctx: Any) -> float:
        if self.requests_per_replica_target is not None:
            return self.requests_per_replica_target
        config = ctx.config
        target = config.get_target_ongoing_requests() if config is not None else None
        return float(target) if target else 1.0

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        n = ctx.current_num_replicas
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        if n == 0:
            # Nothing runs, so nothing reports KV numbers: start one replica once a request arrives.
            desired = 1 if ctx.total_num_requests > 0 else ctx.target_num_replicas
            state[STATE_KEY] = {"decision": "cold", "desired": desired}
            return min(max(desired, lo), hi), state

        sig = self.signals(ctx)
        requests_target = self._requests_target(ctx)
        kv_mean = sig["kv_usage_mean"]
        waiting = sig["waiting_per_replica"] or 0.0
        requests = sig["requests_per_replica"] or 0.0
        by_kv = math.ceil(n * kv_mean / self.kv_usage_target - 1e-9) if kv_mean is not None else 0
        by_requests = math.ceil(n * requests / requests_target - 1e-9)

        reasons = []
        if kv_mean is not None and kv_mean >= self.kv_usage_high:
            reasons.append("kv_usage")
        if waiting >= self.waiting_per_replica_high:
            reasons.append("waiting")
        if sig["preemption_rate"] > self.preemption_rate_high:
            reasons.append("preemptions")
        if requests >= requests_target:
            reasons.append("requests")

        idle = (
            (kv_mean is None or kv_mean <= self.kv_usage_low)
            and waiting == 0.0
            and sig["preemption_rate"] == 0.0
            and requests <= self.idle_requests_fraction * requests_target
        )
        if reasons:
            desired, decision = max(n + 1, by_kv, by_requests), "up"
        elif idle:
            desired, decision = min(n, max(by_kv, by_requests)), "idle"
        else:
            desired, decision = n, "hold"
        desired = min(max(desired, lo), hi)
        previous = (ctx.policy_state or {}).get(STATE_KEY) or {}
        if desired != n and (previous.get("desired"), previous.get("decision")) != (desired, decision):
            # Only when the wish changes, not every tick: the controller calls this many times a second.
            logger.info(
                "tinyserve kv_pressure: %s wants %d replicas (running %d): %s reasons=%s signals=%s",
                ctx.deployment_name, desired, n, decision, reasons, sig,
            )
        state[STATE_KEY] = {"decision": decision, "reasons": reasons, "desired": desired, **sig}
        return desired, state


# The import path Ray Serve configs name (`tinyserve.autoscaling:kv_pressure_policy`). Ray instantiates a
# class policy once with `policy_kwargs` (a plain function would get no kwargs).
kv_pressure_policy = KVPressurePolicy
