"""A real Prometheus server scrapes a live local TinyServe deployment; every dashboard expression returns data.

Ray (local, 2 replicas of the tiny model, query-aware router, allocator and page selection on) serves
OpenAI requests over HTTP; Debian's `prometheus` binary, started here on loopback with the scrape config
TinyServe documents (Ray's metrics endpoint, `ray_` prefix stripped from `tinyserve_*`), scrapes it.

Set TINYSERVE_DASHBOARD_PNG=path to also draw the main panels from this run's Prometheus data.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tinyserve.ports import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "k8s" / "grafana" / "tinyserve-dashboard.json"
SCRAPE_INTERVAL_S = 2



def _get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post_json(url: str, body: dict, timeout: float = 300.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for p in [panel] + panel.get("panels", []):
            for t in p.get("targets", []):
                out.append((p["title"], t["expr"]))
    return out


class PrometheusServer:
    """A Prometheus process on loopback scraping one target with TinyServe's relabelling; owns its tmp dir."""

    def __init__(self, workdir: Path, target: str) -> None:
        from tinyserve.deployments.replica_metrics import RAY_PREFIX_RELABEL

        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus (Debian package) not installed")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [
                {
                    "job_name": "ray",
                    "static_configs": [{"targets": [target]}],
                    "metric_relabel_configs": [RAY_PREFIX_RELABEL],
                }
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=2)
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.5)
        raise TimeoutError("prometheus not ready")

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = _get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        body = _get_json(f"{self.url}/api/v1/query_range?{urllib.parse.urlencode(params)}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets_up(self) -> bool:
        return any(r["value"][1] == "1" for r in self.query("up"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _send_load(base_url: str, model: str, n_requests: int, concurrency: int) -> list[str]:
    """Completions sharing a long prefix (router hits, prefix cache) and long enough for page selection."""
    prefix = " ".join(f"fact {i}: the quick brown fox jumps over the lazy dog." for i in range(40))
    errors: list[str] = []
    lock = threading.Lock()
    todo = list(range(n_requests))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                out = _post_json(
                    f"{base_url}/v1/completions",
                    {"model": model, "prompt": f"{prefix} question {i}: what follows?", "max_tokens": 24, "temperature": 0},
                )
                assert out["choices"][0]["text"] is not None
            except Exception as exc:  # collected and asserted by the caller
                with lock:
                    errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture(scope="module")
def live(tmp_path_factory, own_ray_cluster):
    ray = pytest.importorskip("ray")
    from ray import serve

    from tinyserve.deployments import build_app_from_config, load_config

    if shutil.which("prometheus") is None:
        pytest.skip("prometheus (Debian package) not installed")
    work = tmp_path_factory.mktemp("prom_live")
    metrics_port, http_port = free_port(), free_port()
    overrides = {
        "model": {"path": str(work / "tinyserve-tiny"), "make_size": "tiny"},
        "engine": {"max_num_seqs": 8},
        "deployment": {"num_replicas": 2},
        # The router tokenizes prompts with the served model's tokenizer (for prefix-hit accounting).
        "router": {"kind": "query_aware", "options": {"tokenizer": str(work / "tinyserve-tiny")}},
        "tinyserve": {
            "enabled": True,
            "allocator": {"enabled": True},
            "selection": {"enabled": True, "budget_fraction": 0.5, "min_context_tokens": 0, "exempt_layers": []},
        },
        "http": {"host": "127.0.0.1", "port": http_port},
    }
    config = load_config(None, overrides=overrides)
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 2000},  # workers push to the agent every 2 s (default 10)
    )
    prom = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app_from_config(config), name="tinyserve", route_prefix="/", blocking=False)
        deadline = time.monotonic() + 600
        while True:
            status = serve.status().applications.get("tinyserve")
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(status.message)
            if time.monotonic() > deadline:
                raise TimeoutError("app not running")
            time.sleep(1.0)
        prom = PrometheusServer(work / "prometheus", f"127.0.0.1:{metrics_port}")
        base = f"http://127.0.0.1:{http_port}"
        started = time.time()
        errors: list[str] = []
        for _ in range(3):  # bursts with pauses: the panels show load coming and going
            errors += _send_load(base, config.model.id, n_requests=12, concurrency=4)
            time.sleep(3 * SCRAPE_INTERVAL_S)
        load_end = time.time()
        time.sleep(3 * SCRAPE_INTERVAL_S)  # the last stats polls, metric pushes and scrapes land
        yield {"prom": prom, "errors": errors, "start": started, "end": load_end, "config": config, "metrics_port": metrics_port}
    finally:
        if prom is not None:
            prom.stop()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_load_was_served(live):
    assert live["errors"] == []


def test_tinyserve_metrics_carry_replica_labels(live):
    prom = live["prom"]
    deadline = time.monotonic() + 60
    while True:
        series = prom.query("tinyserve_kv_usage_ratio")
        replicas = {s["metric"].get("replica") for s in series}
        if len(replicas) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_INTERVAL_S)
    assert len(replicas) == 2, series
    for s in series:
        labels = s["metric"]
        assert labels["application"] == "tinyserve"
        assert labels["deployment"] and labels["replica"]
        assert labels["model"] == live["config"].model.id
    # Engine-core numbers crossed over: the stats channel's block count is the engine's real pool size.
    assert all(float(s["value"][1]) > 0 for s in prom.query("tinyserve_kv_blocks"))
    # Beside vLLM's and Ray Serve's own metrics on the same endpoint.
    assert prom.query("ray_vllm_num_requests_running")
    assert prom.query("ray_serve_deployment_replica_healthy")


# Router panels whose numbers need the router to follow the replicas' KV-event streams.
_ROUTER_TOKEN_PANELS = ("KV-event lag",)


def _missing(live, titles_in: bool) -> list[str]:
    """Dashboard expressions (panels in or out of _ROUTER_TOKEN_PANELS) with no data over the run."""
    prom = live["prom"]
    # Evaluated as a Grafana panel does: a range query over the run, at the scrape interval.
    start, end = live["start"], time.time()
    return [
        f"{title}: {expr}"
        for title, expr in dashboard_exprs()
        if (title in _ROUTER_TOKEN_PANELS) == titles_in and not prom.query_range(expr, start, end, SCRAPE_INTERVAL_S)
    ]


def test_every_dashboard_expression_returns_data(live):
    assert len(dashboard_exprs()) > 20
    png = os.environ.get("TINYSERVE_DASHBOARD_PNG")
    if png:
        _draw_dashboard(live["prom"], live["start"], live["end"] + 2 * SCRAPE_INTERVAL_S, Path(png))
    missing = _missing(live, titles_in=False)
    assert missing == [], "no data for:\n" + "\n".join(missing)


def test_router_token_panels_return_data(live):
    missing = _missing(live, titles_in=True)
    assert missing == [], "no data for:\n" + "\n".join(missing)


# Main panels of the dashboard drawn from this run's Prometheus data (for the README / benchmarks/results).
_MAIN_PANELS = (
    "KV utilisation",
    "Effective capacity",
    "Free runs",
    "Runs per request",
    "Pages attended / scored",
    "Prefix hit tokens: achieved vs available",
    "Requests per replica",
    "Time to first token",
    "Inter-token latency",
    "Queue",
    "Replicas",
    "Free-space scatter",
)


def _draw_dashboard(prom: PrometheusServer, start: float, end: float, out: Path) -> None:
    import platform
    import subprocess as sp

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = {p["title"]: p for row in dash["panels"] for p in [row] + row.get("panels", [])}
    fig, axes = plt.subplots(4, 3, figsize=(16, 14))
    data: dict[str, Any] = {}
    for ax, title in zip(axes.flat, _MAIN_PANELS):
        panel = panels[title]
        data[title] = []
        for target in panel["targets"]:
            for s in prom.query_range(target["expr"], start, end, SCRAPE_INTERVAL_S):
                legend = target.get("legendFormat", "")
                for k, v in s["metric"].items():
                    legend = legend.replace("{{" + k + "}}", v[-12:])
                xs = [float(t) - start for t, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(xs, ys, label=legend)
                data[title].append({"expr": target["expr"], "legend": legend, "t": xs, "v": ys})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("s since load start", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            ax.legend(fontsize=6)
    commit = sp.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    fig.suptitle(f"TinyServe dashboard, live test run (tiny model, 2 replicas, CPU) - {machine} - commit {commit}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "commit": commit, "start": start, "end": end, "panels": data}, indent=1)
    )

