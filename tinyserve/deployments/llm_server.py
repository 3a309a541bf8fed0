"""TinyServe's Ray Serve LLM replica: ray.serve.llm's LLMServer plus TinyServe's engine-core stats.

Each replica
- builds the embedded model on its own node when the configured model directory is missing;
- gives its vLLM engine its own KV-events publisher on free ports, on loopback or (`router.kv_events_bind:
  node`) on every interface, advertised at the node's IP (for the cache-aware router);
- polls the TinyServe stats channel in the engine core every `stats_period_s` and keeps the last
  snapshot, which it reports through Ray Serve's `record_routing_stats` (router) and
  `record_autoscaling_stats` (KV-pressure autoscaling, from the KVPressureSignals mixin), and publishes as
  Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from ray.serve.llm.deployment import LLMServer

from tinyserve.autoscaling.replica_hook import KVPressureSignals
from tinyserve.engine.stats_channel import STATS_METHOD
from tinyserve.ports import free_port_pair

__all__ = ["TinyServeLLMServer"]


def _advertised(endpoint: str) -> str:
    """The address a router on any node connects to: a wildcard bind is reached at this node's IP."""
    if endpoint.startswith("tcp://0.0.0.0:"):
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{endpoint.rsplit(':', 1)[1]}"
    return endpoint


class TinyServeLLMServer(KVPressureSignals, LLMServer):
    """An LLMServer replica that exports TinyServe's engine-core numbers.

    Owns the periodic stats task, `requests_started` (chat and completion requests this replica accepted)
    and `last_stats`, the latest dict from the engine core's
    `tinyserve_stats` utility ({"plugin", "kv", "selection", "scheduler"}; empty until the first poll or
    when the plugin is off). Invariant: `record_routing_stats` never waits on the engine core.
    """

    # How often the engine core is polled; TINYSERVE_STATS_PERIOD_S overrides it (tests poll faster).
    stats_period_s: float = float(os.environ.get("TINYSERVE_STATS_PERIOD_S", "2.0"))

    async def __init__(self, llm_config: Any, **kwargs: Any) -> None:
        from tinyserve.deployments.model_source import ensure_model_dir

        ensure_model_dir(llm_config.model_loading_config.model_source, llm_config.experimental_configs)
        events = llm_config.engine_kwargs.get("kv_events_config")
        self._kv_events_advertised: tuple[str, str | None] | None = None
        if events is not None:
            if events.get("endpoint", "").endswith(":0"):
                host = events["endpoint"].removeprefix("tcp://").rsplit(":", 1)[0]
                port = free_port_pair(host)
                events = dict(events, endpoint=f"tcp://{host}:{port}", replay_endpoint=f"tcp://{host}:{port + 1}")
                # Updates the engine config LLMConfig caches (and pickles) as well as engine_kwargs.
                llm_config.update_engine_kwargs(kv_events_config=events)
            self._kv_events_advertised = _advertised(events["endpoint"]), (
                _advertised(events["replay_endpoint"]) if events.get("replay_endpoint") else None)
        self.last_stats: dict[str, Any] = {}
        self._last_stats_at = 0.0
        self._stats_task: asyncio.Task | None = None
        self._model_id = llm_config.model_id
        self.requests_started = 0
        await super().__init__(llm_config, **kwargs)
        self._stats_task = asyncio.get_running_loop().create_task(self._poll_stats())

    async def chat(self, *args: Any, **kwargs: Any) -> Any:
        self.requests_started += 1
        return await super().chat(*args, **kwargs)

    async def completions(self, *args: Any, **kwargs: Any) -> Any:
        self.requests_started += 1
        return await super().completions(*args, **kwargs)

    def _engine_client(self) -> Any:
        return getattr(self.engine, "_engine_client", None)

    async def tinyserve_stats(self) -> dict[str, Any]:
        """Fresh stats from the engine core (empty dict when the TinyServe plugin is off)."""
        client = self._engine_client()
        if client is None:
            return {}
        try:
            return await client.engine_core.call_utility_async(STATS_METHOD)
        except Exception as exc:  # the plugin is off: EngineCore has no such method
            if STATS_METHOD in str(exc) or "has no attribute" in str(exc):
                return {}
            raise

    async def _poll_stats(self) -> None:
        from tinyserve.deployments.replica_metrics import publish_engine_stats

        while True:
            try:
                stats = await self.tinyserve_stats()
                if stats:
                    self.last_stats, self._last_stats_at = stats, time.monotonic()
                    publish_engine_stats(stats, model=self._model_id)
            except asyncio.CancelledError:
                raise
            except Exception:  # an engine that is shutting down; health checks report real failures
                pass
            await asyncio.sleep(self.stats_period_s)

    async def record_routing_stats(self) -> dict[str, Any]:
        stats = dict(await super().record_routing_stats())
        if self._kv_events_advertised is not None:
            stats["kv_events_endpoint"], stats["kv_events_replay_endpoint"] = self._kv_events_advertised
        stats["block_size"] = self._llm_config.engine_kwargs.get("block_size")
        # What the router needs to tokenize and hash a request exactly as this engine does.
        stats["tokenizer"] = self._llm_config.model_loading_config.model_source
        stats["hash_seed"] = os.environ.get("PYTHONHASHSEED")
        stats["hash_algo"] = self._llm_config.engine_kwargs.get("prefix_caching_hash_algo", "sha256")
        stats["engine_pid"] = self.last_stats.get("plugin", {}).get("pid")
        stats["replica_pid"] = os.getpid()
        stats["requests_started"] = self.requests_started
        stats["kv"] = self.last_stats.get("kv", {})
        sched = self.last_stats.get("scheduler", {})
        stats["num_running"] = sched.get("num_running", 0)
        stats["num_waiting"] = sched.get("num_waiting", 0)
        stats["num_aborted_total"] = sched.get("num_aborted_total", 0)
        stats["stats_age_s"] = time.monotonic() - self._last_stats_at if self._last_stats_at else None
        return stats

    async def __del__(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        await super().__del__()
