"""Benchmark-only vLLM plugin: samples KV fragmentation of whichever block pool runs (stock or TinyServe).

Registered on the GPU machine as a second `vllm.general_plugins` entry point (install.sh writes it). In the
engine-core process it wraps `Scheduler.schedule`: every `SAMPLE_EVERY` steps with running requests it
takes `tinyserve.engine.fragmentation.kv_snapshot` of the pool (runs per request, free runs, scatter,
token-slot utilisation) and keeps running sums; `EngineCore.tinyserve_e2e_kv()` returns the means and
clears them. It changes no scheduling or allocation decision.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register", "SAMPLE_EVERY"]

SAMPLE_EVERY = 8
_KEYS = ("runs_per_request_mean", "runs_per_request_max", "free_runs", "largest_free_run",
         "free_space_scatter", "token_slot_utilisation", "effective_capacity", "usage")
_sums: dict[str, float] = {}
_state = {"calls": 0, "samples": 0}


def _sample(scheduler: Any) -> None:
    from tinyserve.engine.fragmentation import kv_snapshot, manager_block_tables, pool_free_mask

    manager = scheduler.kv_cache_manager
    pool = manager.block_pool
    running = {r.request_id: r for r in scheduler.running}
    tables = manager_block_tables(manager, running)
    snap = kv_snapshot(
        num_blocks=pool.num_gpu_blocks,
        block_size=manager.coordinator.single_type_managers[0].block_size,
        free_mask=pool_free_mask(pool),
        block_tables=tables,
        tokens_held={rid: running[rid].num_computed_tokens for rid in tables},
    )
    for k in _KEYS:
        _sums[k] = _sums.get(k, 0.0) + float(snap[k])
    _sums["runs_per_request_max_seen"] = max(_sums.get("runs_per_request_max_seen", 0.0),
                                             float(snap["runs_per_request_max"]))
    _state["samples"] += 1


def _kv_means(engine_core: Any) -> dict[str, float]:
    n = max(1, _state["samples"])
    out = {k: _sums.get(k, 0.0) / n for k in _KEYS}
    out["runs_per_request_max_seen"] = _sums.get("runs_per_request_max_seen", 0.0)
    out["samples"] = _state["samples"]
    _sums.clear()
    _state["samples"] = 0
    return out


def register() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    if getattr(Scheduler.schedule, "_tinyserve_e2e", False):
        return
    original = Scheduler.schedule

    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        _state["calls"] += 1
        if self.running and _state["calls"] % SAMPLE_EVERY == 0:
            _sample(self)
        return out

    schedule._tinyserve_e2e = True  # type: ignore[attr-defined]
    Scheduler.schedule = schedule
    EngineCore.tinyserve_e2e_kv = _kv_means
