"""A live local deployment scales 1 -> 2 replicas under load and back, driven by the KV-pressure policy.

The deployment autoscales with `tinyserve.autoscaling:kv_pressure_policy`. The request-count trigger is set
far above the load (requests_per_replica_target 1000), so only the engine-core signals the replicas
report through `record_autoscaling_stats` (requests waiting in vLLM's scheduler: max_num_seqs is 1 and
four requests are kept in flight) can scale it up; idle (no requests) brings it back to min_replicas.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tinyserve.ports import free_port

pytestmark = pytest.mark.slow

APP = "tinyserve_autoscale"
MAX_WAIT_S = 300



def _server_cls():
    """TinyServe's replica class with Ray Serve's autoscaling hook (the mixin, unless the class has it)."""
    from tinyserve.autoscaling import KVPressureSignals
    from tinyserve.deployments.llm_server import TinyServeLLMServer

    if hasattr(TinyServeLLMServer, "record_autoscaling_stats"):
        return TinyServeLLMServer
    return type("TinyServeAutoscalingLLMServer", (KVPressureSignals, TinyServeLLMServer), {"__module__": __name__})


def _running_replicas(serve) -> int:
    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    counts = [d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items() if "Ingress" not in name]
    return max(counts, default=0)


class Load:
    """Keeps `concurrency` long completions in flight until stopped; counts completions and errors."""

    def __init__(self, url: str, model: str, concurrency: int) -> None:
        self.url, self.model = url, model
        self.stop_flag = threading.Event()
        self.done = 0
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]
        for t in self.threads:
            t.start()

    def _run(self, i: int) -> None:
        n = 0
        while not self.stop_flag.is_set():
            body = {"model": self.model, "prompt": f"worker {i} request {n}: count slowly", "max_tokens": 128, "temperature": 0, "ignore_eos": True}
            req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    json.loads(r.read())
                self.done += 1
            except Exception as exc:
                self.errors.append(repr(exc))
            n += 1

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, own_ray_cluster):
    # Replicas push autoscaling metrics every 10 s by default; the processes Ray starts inherit these.
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    ray = pytest.importorskip("ray")
    import sys

    from ray import cloudpickle, serve

    from tinyserve.deployments import build_llm_config, load_config

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the composed server class lives here
    work = tmp_path_factory.mktemp("autoscale_live")
    http_port = free_port()
    overrides = {
        "model": {"path": str(work / "tinyserve-tiny"), "make_size": "tiny"},
        "engine": {"max_num_seqs": 1},
        "router": {"kind": "power_of_two"},
        "deployment": {
            "max_ongoing_requests": 16,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "initial_replicas": 1,
                "policy": "kv_pressure",
                "policy_kwargs": {"waiting_per_replica_high": 1.0, "requests_per_replica_target": 1000},
                "upscale_delay_s": 3,
                "downscale_delay_s": 10,
            },
        },
        "http": {"host": "127.0.0.1", "port": http_port},
    }
    config = load_config(None, overrides=overrides)
    llm_config = build_llm_config(config)
    llm_config.server_cls = _server_cls()
    from ray.serve.llm import build_openai_app

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_openai_app({"llm_configs": [llm_config]}), name=APP, route_prefix="/", blocking=False)
        deadline = time.monotonic() + 600
        while serve.status().applications.get(APP) is None or serve.status().applications[APP].status != "RUNNING":
            app = serve.status().applications.get(APP)
            if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(app.message)
            if time.monotonic() > deadline:
                raise TimeoutError("app not running")
            time.sleep(1.0)
        yield {"serve": serve, "url": f"http://127.0.0.1:{http_port}/v1/completions", "model": config.model.id}
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _controller_log() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("controller_*.log")))


def _wait_for(serve, count: int, timeout_s: float) -> list[tuple[float, int]]:
    history = []
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        n = _running_replicas(serve)
        history.append((round(time.monotonic() - start, 1), n))
        if n == count:
            return history
        time.sleep(1.0)
    raise AssertionError(f"never reached {count} replicas: {history[-20:]}")


def test_scales_up_under_load_and_back_when_idle(cluster):
    serve = cluster["serve"]
    assert _running_replicas(serve) == 1
    load = Load(cluster["url"], cluster["model"], concurrency=4)
    try:
        _wait_for(serve, 2, MAX_WAIT_S)
    finally:
        load.stop()
    assert load.errors == []
    assert load.done > 0
    _wait_for(serve, 1, MAX_WAIT_S)
    # TinyServe's policy ran and scaled on the engines' waiting requests, then on idleness.
    log = _controller_log()
    assert "Using custom autoscaling policy 'tinyserve.autoscaling:kv_pressure_policy'" in log
    assert re.search(r"tinyserve kv_pressure: .* wants 2 replicas \(running 1\): up reasons=\['waiting'\]", log), log[-3000:]
    assert re.search(r"tinyserve kv_pressure: .* wants 1 replicas \(running 2\): idle", log), log[-3000:]
