"""tinyserve.deployments.replica_metrics through a real Ray metrics agent: names, help, labels, values.

A Ray actor (a worker process, like a Serve replica) publishes stats-channel snapshots; the test reads
Ray's own Prometheus endpoint and checks what a scrape would store.
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest

from tinyserve.deployments.replica_metrics import (
    LABELS,
    METRIC_SPECS,
    RAY_PREFIX,
    metric_names,
)
from tinyserve.ports import free_port

pytestmark = pytest.mark.slow

LABEL_VALUES = {"application": "app-a", "deployment": "dep-b", "replica": "rep-c", "model": "tiny"}


def _snapshot(step: int) -> dict:
    """A stats-channel dict shaped like the engine core's, with counters that grow with `step`."""
    kv = {
        "num_blocks": 1000,
        "num_free_blocks": 900 - step,
        "usage": 0.1 + 0.01 * step,
        "block_size": 32,
        "token_slot_utilisation": 0.97,
        "effective_capacity": 1.25,
        "free_runs": 3 + step,
        "largest_free_run": 700,
        "free_space_scatter": 1 - 700 / (900 - step),
        "runs_per_request_mean": 1.5,
        "runs_per_request_max": 4,
        "evictions_total": 0,  # stays 0: the series must still exist
        "compactions_total": step,
        "blocks_moved_total": 10 * step,
        "prefix_cache_queries_total": 50 * step,
        "prefix_cache_hits_total": 20 * step,
    }
    selection = {
        "decode_steps_total": 7 * step,
        "pages_scored_total": 70 * step,
        "pages_selected_total": 30 * step,
        "kv_bytes_read_total": 4096 * step,
        "kv_bytes_not_read_total": 8192 * step,
    }
    return {
        "plugin": {"pid": 1, "features": ["stats"]},
        "kv": kv,
        "selection": selection,
        "scheduler": {"num_running": step, "num_waiting": 2, "num_preemptions_total": step, "num_aborted_total": step},
    }



def _parse(body: str) -> tuple[dict[str, str], dict[str, list[tuple[dict[str, str], float]]]]:
    helps: dict[str, str] = {}
    samples: dict[str, list] = {}
    for line in body.splitlines():
        if line.startswith("# HELP "):
            name, _, text = line[7:].partition(" ")
            helps[name] = text
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
            if m:
                labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
                samples.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return helps, samples


@pytest.fixture(scope="module")
def scraped(own_ray_cluster):
    ray = pytest.importorskip("ray")
    port = free_port()
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, log_to_driver=False)
    try:

        @ray.remote(num_cpus=0)
        class Publisher:
            def publish(self, step: int) -> list[str]:
                from tinyserve.deployments.replica_metrics import publish_engine_stats

                return publish_engine_stats(_snapshot(step), model="tiny", labels=LABEL_VALUES)

        pub = Publisher.remote()
        published = [ray.get(pub.publish.remote(step)) for step in (1, 2, 3)]
        wanted = {RAY_PREFIX + n for n in metric_names()}
        deadline = time.monotonic() + 60
        while True:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            helps, samples = _parse(body)
            moved = samples.get(RAY_PREFIX + "tinyserve_kv_blocks_moved_total", [])
            ok = wanted <= set(samples) and any(v == 30 for lab, v in moved if lab.get("replica") == "rep-c")
            if ok or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        yield published, helps, samples
    finally:
        ray.shutdown()


def _ours(samples, name):
    return [(lab, val) for lab, val in samples.get(RAY_PREFIX + name, []) if lab.get("replica") == "rep-c"]


def test_every_metric_is_exported_with_help_and_labels(scraped):
    published, helps, samples = scraped
    assert set(published[-1]) == set(metric_names())
    for spec in METRIC_SPECS:
        series = _ours(samples, spec.name)
        assert series, f"{spec.name} missing on Ray's metrics endpoint"
        assert helps.get(RAY_PREFIX + spec.name) == spec.help
        for labels, _ in series:
            assert {k: labels.get(k) for k in LABELS} == LABEL_VALUES


def test_gauges_hold_the_last_snapshot_and_counters_the_engine_totals(scraped):
    _, _, samples = scraped
    last = _snapshot(3)
    for spec in METRIC_SPECS:
        ((_, value),) = _ours(samples, spec.name)
        assert value == pytest.approx(float(last[spec.section][spec.key])), spec.name


def test_counter_restart_adds_new_total_and_missing_sections_are_skipped():
    ray = pytest.importorskip("ray")
    from tinyserve.deployments.replica_metrics import ReplicaMetrics

    if ray.is_initialized():
        ray.shutdown()
    metrics = ReplicaMetrics()
    recorded: list[tuple[str, float]] = []
    moved = metrics._metrics["tinyserve_kv_blocks_moved_total"]
    moved.inc = lambda value, tags=None: recorded.append(("inc", value))  # observe what reaches Ray
    names = metrics.publish({"kv": {"blocks_moved_total": 10}}, LABEL_VALUES)
    assert names == ["tinyserve_kv_blocks_moved_total"]
    metrics.publish({"kv": {"blocks_moved_total": 25}}, LABEL_VALUES)
    metrics.publish({"kv": {"blocks_moved_total": 4}}, LABEL_VALUES)  # engine core restarted
    assert recorded == [("inc", 10.0), ("inc", 15.0), ("inc", 4.0)]
    assert metrics.publish({"plugin": {}}, LABEL_VALUES) == []
