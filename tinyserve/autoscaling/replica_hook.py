"""The replica side of KV-pressure autoscaling: a mixin that gives an LLMServer Ray Serve's autoscaling hook.

Ray Serve 2.60 looks for `record_autoscaling_stats` on the deployment class; when present (and the
deployment autoscales) each replica calls it on its metrics cadence and pushes the returned numbers to the
controller, where the policy reads them from `ctx.aggregated_metrics` / `ctx.raw_metrics`.
"""

from __future__ import annotations

from typing import Any

from tinyserve.autoscaling.replica_signals import autoscaling_stats

__all__ = ["KVPressureSignals"]


class KVPressureSignals:
    """Mixin for a replica class that keeps the engine core's latest stats-channel dict in `last_stats`.

    Owns nothing; reads `self.last_stats` (the replica's own poll of the engine core) and never waits on
    the engine core, so the hook stays well inside Ray's `RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S`.
    """

    last_stats: dict[str, Any]

    async def record_autoscaling_stats(self) -> dict[str, float]:
        return autoscaling_stats(getattr(self, "last_stats", None) or {})
