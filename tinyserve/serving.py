"""`tinyserve serve`: a local (or given) Ray cluster running the TinyServe app until interrupted."""

from __future__ import annotations

import signal
import threading
import time

from tinyserve.deployments import TinyServeConfig, build_app_from_config

__all__ = ["start", "stop", "serve_forever", "APP_NAME"]

APP_NAME = "tinyserve"


def start(config: TinyServeConfig, *, blocking_timeout_s: float = 900.0) -> str:
    """Start Ray (local unless `cluster.address`), Serve's HTTP proxy and the app; return the base URL."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        if config.cluster.address:
            ray.init(address=config.cluster.address, log_to_driver=False)
        else:
            ray.init(num_cpus=config.cluster.num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app_from_config(config), name=APP_NAME, route_prefix="/", blocking=False)
    deadline = time.monotonic() + blocking_timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None and status.status == "RUNNING":
            return f"http://{config.http.host}:{config.http.port}"
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"TinyServe app failed to deploy: {status.message}")
        time.sleep(1.0)
    raise TimeoutError(f"TinyServe app not running after {blocking_timeout_s:.0f} s")


def stop() -> None:
    """Shut down the app, Serve and Ray (every replica and its vLLM engine processes)."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: TinyServeConfig) -> None:
    url = start(config)
    print(
        f"\nTinyServe is serving model '{config.model.id}' with {config.deployment.num_replicas} replicas at {url}\n"
        f"  curl {url}/v1/models\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        f"       -d '{{\"model\": \"{config.model.id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], \"max_tokens\": 16}}'\n"
        f"Press Ctrl-C to stop.\n",
        flush=True,
    )
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("Stopping TinyServe ...", flush=True)
    stop()
