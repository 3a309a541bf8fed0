"""The custom autoscaling metrics a TinyServe replica reports to Ray Serve's controller.

Ray Serve 2.60 calls a replica's `record_autoscaling_stats()` (async, no arguments, returns
`dict[str, int | float]`) on the replica's metrics-record cadence and pushes the values to the controller,
which hands them to the autoscaling policy as `ctx.aggregated_metrics[name][replica_id]` (aggregated over
`look_back_period_s`) and `ctx.raw_metrics[name][replica_id]` (the time series). `autoscaling_stats` turns
the latest stats-channel snapshot of the engine core into that dict.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KV_USAGE", "NUM_WAITING", "NUM_RUNNING", "PREEMPTIONS_TOTAL", "autoscaling_stats"]

KV_USAGE = "tinyserve_kv_usage"  # fraction of KV blocks in use, 0-1
NUM_WAITING = "tinyserve_num_waiting"  # requests waiting in the engine core's scheduler
NUM_RUNNING = "tinyserve_num_running"  # requests running in the engine core's scheduler
PREEMPTIONS_TOTAL = "tinyserve_preemptions_total"  # running total of preemptions (only when the engine reports it)


def autoscaling_stats(engine_stats: dict[str, Any]) -> dict[str, float]:
    """The `record_autoscaling_stats` dict for one stats-channel snapshot ({} before the first snapshot)."""
    kv = engine_stats.get("kv") or {}
    sched = engine_stats.get("scheduler") or {}
    out: dict[str, float] = {}
    if isinstance(kv.get("usage"), (int, float)):
        out[KV_USAGE] = float(kv["usage"])
    for name, key in ((NUM_WAITING, "num_waiting"), (NUM_RUNNING, "num_running"), (PREEMPTIONS_TOTAL, "num_preemptions_total")):
        if isinstance(sched.get(key), (int, float)):
            out[name] = float(sched[key])
    return out
