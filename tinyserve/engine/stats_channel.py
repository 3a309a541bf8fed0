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

import functools
import os
from collections.abc import Callable
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
    _count_into(PREEMPTIONS_ATTR, "_preempt_request", lambda args, kwargs, result: 1)
    _count_into(ABORTS_ATTR, "finish_requests", _aborted)


def _aborted(args: tuple, kwargs: dict, result: Any) -> int:
    """How many requests a `Scheduler.finish_requests(request_ids, finished_status)` call ended as aborted
    (it returns the requests it finished)."""
    from vllm.v1.request import RequestStatus

    status = kwargs["finished_status"] if "finished_status" in kwargs else args[1]
    return len(result or ()) if status == RequestStatus.FINISHED_ABORTED else 0


def _count_into(attr: str, method: str, how_many: Callable[[tuple, dict, Any], int]) -> None:
    """Wrap `Scheduler.<method>` (once) so that each call adds `how_many(args, kwargs, result)` to the
    scheduler's `attr` (read by `collect_engine_stats`)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    stock = getattr(Scheduler, method)
    if getattr(stock, "_tinyserve_counted", False):
        return

    @functools.wraps(stock)
    def call_and_count(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = stock(self, *args, **kwargs)
        setattr(self, attr, getattr(self, attr, 0) + how_many(args, kwargs, result))
        return result

    call_and_count._tinyserve_counted = True  # type: ignore[attr-defined]
    setattr(Scheduler, method, call_and_count)
