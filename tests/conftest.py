"""Shared fixtures: the embedded tiny model and one Ray Serve cluster for all end-to-end tests.

One local Ray cluster serves the whole session (starting Ray and vLLM engines costs real time on 2 cores);
`serve_app.deploy(overrides)` (re)deploys the TinyServe app only when its config changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tinyserve.ports import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Replicas poll their engine core this often (default 2 s): tests observe KV changes of short requests.
os.environ.setdefault("TINYSERVE_STATS_PERIOD_S", "0.25")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny model, built once under the repo's (git-ignored) models/ folder."""
    from tinyserve.deployments.model_source import MAKE_SIZE_KEY, ensure_model_dir

    return ensure_model_dir(str(REPO / "models" / "tinyserve-tiny"), {MAKE_SIZE_KEY: "tiny"})



class ServeHarness:
    """Owns the session's Ray cluster and the one TinyServe app deployed on it.

    Invariant: at most one app (named `tinyserve`, route "/") is deployed; `deploy` with the config
    already deployed returns at once.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._deployed: Any = None
        self._running = False

    def _ensure_cluster(self) -> None:
        """Start the shared Ray cluster and Serve's proxy unless they run (lazily: some modules need none)."""
        if self._running:
            return
        import ray
        from ray import serve

        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self._running = True

    def config(self, overrides: dict[str, Any] | None = None) -> Any:
        from tinyserve.deployments.config import deep_merge, load_config

        base = {"model": {"path": str(self.model_dir)}, "http": {"port": self.port}}
        return load_config(None, overrides=deep_merge(base, overrides or {}))

    def deploy(self, overrides: dict[str, Any] | None = None) -> str:
        from tinyserve.serving import start

        config = self.config(overrides)
        self._ensure_cluster()
        if self._deployed != config:
            start(config)
            self._deployed = config
        return self.url

    def replica_actors(self) -> list[Any]:
        """Handles of the live TinyServe LLM replica actors."""
        import ray

        return [
            ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True)
            if "TinyServeLLMServer" in a["name"]
        ]

    def replica_stats(self) -> list[dict[str, Any]]:
        """Each live replica's routing stats (TinyServeLLMServer.record_routing_stats)."""
        import ray

        return [ray.get(actor.record_routing_stats.remote(), timeout=30) for actor in self.replica_actors()]

    def ingress_stats(self) -> dict[str, Any]:
        """The OpenAI ingress's gateway counters (TinyServeIngress.gateway_stats; one ingress replica)."""
        from ray import serve

        app = serve.status().applications["tinyserve"]
        name = next(n for n in app.deployments if "Ingress" in n)
        return serve.get_deployment_handle(name, app_name="tinyserve").gateway_stats.remote().result(timeout_s=30)

    def close(self) -> None:
        """Shut the shared cluster down (idempotent); the next `deploy` starts a new one."""
        if not self._running:
            return
        from tinyserve.serving import stop

        stop()
        self._running = False
        self._deployed = None


_HARNESS: list[ServeHarness] = []


@pytest.fixture(scope="session")
def serve_app(tiny_model_dir: Path):
    harness = ServeHarness(tiny_model_dir)
    _HARNESS.append(harness)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def own_ray_cluster():
    """For a module that starts a Ray cluster of its own: the shared one is shut down first (one per process)."""
    for harness in _HARNESS:
        harness.close()
    yield
