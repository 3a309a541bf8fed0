"""The channel that carries TinyServe's engine-core numbers to the replica.

vLLM's engine core runs in its own process. The plugin adds one method, `tinyserve_stats`, to vLLM's
`EngineCore`; the replica calls it through `AsyncLLM.engine_core.call_utility_async("tinyserve_stats")`
and gets a plain dict (msgspec-serialisable) back. Sections:

- "plugin": {"pid", "features"}: proof the plugin runs inside this engine core;
- "kv": block-pool numbers (from the pool's `stats()` when it is TinyServe's, else the stock counts);
- "selection": query-aware selection counters gathered from the workers (empty when selection is off);
- "scheduler": {"num_running", "num_waiting"} requests in this engine core, "num_preemptions_total", the
  preemptions since it started (counted by a wrapper the plugin puts around `Scheduler._preempt_request`),
  and "num_aborted_total", the requests the front end ended before the engine did (a client gone, a
  cancelled request, a stop string found after detokenizing; counted around `Scheduler.finish_requests`).
"""

from __future__ import annotations

import os
from typing import Any

from tinyserve.engine.settings import EngineSettings

__all__ = ["STATS_METHOD", "install_stats_channel", "collect_engine_stats"]

STATS_METHOD = "tinyserve_stats"
PREEMPTIONS_ATTR = "_tinyserve_num_preemptions"
ABORTS_ATTR = "_tinyserve_num_aborted"


def _block_pool(engine_core: Any) -> Any:
    return engine_core.scheduler.kv_cache_manager.block_pool


def collect_engine_stats(engine_core: Any) -> dict[str, Any]:
    """Snapshot of TinyServe's numbers inside one engine core (runs in the engine-core process)."""
    from tinyserve.engine.plugin import installed_features

    pool = _block_pool(engine_core)
    if hasattr(pool, "stats"):
        kv = dict(pool.stats())
    else:
        kv = {
            "num_blocks": pool.num_gpu_blocks,
            "num_free_blocks": pool.get_num_free_blocks(),
            "usage": pool.get_usage(),
        }
    selection: dict[str, Any] = {}
    if "selection" in installed_features():
        from tinyserve.engine.plugin import selection_backend_module

        selection = selection_backend_module().gather_selection_stats(engine_core)
    scheduler = engine_core.scheduler
    return {
        "plugin": {"pid": os.getpid(), "features": installed_features()},
        "kv": kv,
        "selection": selection,
        "scheduler": {
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "num_preemptions_total": getattr(scheduler, PREEMPTIONS_ATTR, 0),
            "num_aborted_total": getattr(scheduler, ABORTS_ATTR, 0),
        },
    }


def install_stats_channel(settings: EngineSettings) -> None:
    """Add `EngineCore.tinyserve_stats` (idempotent; harmless in processes that never build an EngineCore)."""
    from vllm.v1.engine.core import EngineCore

    if not hasattr(EngineCore, STATS_METHOD):
        setattr(EngineCore, STATS_METHOD, collect_engine_stats)
    _count_preemptions()
    _count_aborts()


def _count_preemptions() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler

    stock = Scheduler._preempt_request
    if getattr(stock, "_tinyserve_counted", False):
        return

    def preempt_and_count(self: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(self, PREEMPTIONS_ATTR, getattr(self, PREEMPTIONS_ATTR, 0) + 1)
        return stock(self, *args, **kwargs)

    preempt_and_count._tinyserve_counted = True  # type: ignore[attr-defined]
    Scheduler._preempt_request = preempt_and_count


def _count_aborts() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    stock = Scheduler.finish_requests
    if getattr(stock, "_tinyserve_counted", False):
        return

    def finish_and_count(self: Any, request_ids: Any, finished_status: Any) -> Any:
        finished = stock(self, request_ids, finished_status)
        if finished_status == RequestStatus.FINISHED_ABORTED and finished:
            setattr(self, ABORTS_ATTR, getattr(self, ABORTS_ATTR, 0) + len(finished))
        return finished

    finish_and_count._tinyserve_counted = True  # type: ignore[attr-defined]
    Scheduler.finish_requests = finish_and_count
