"""Every `tinyserve_*` Prometheus metric a replica exports, and how engine-core stats become them.

The replica polls its engine core's stats channel (`EngineCore.tinyserve_stats`, another process) every few
seconds and hands the dict to `publish_engine_stats`. The numbers leave the replica through Ray's metrics
API (`ray.util.metrics`): each Ray worker pushes them to its node's metrics agent, which serves them on
Ray's Prometheus endpoint beside vLLM's engine metrics and Ray Serve's own.

Names on the wire. Ray's metrics agent prefixes every application metric with `ray_` (and rewrites vLLM's
`vllm:x` as `ray_vllm_x`), so Ray's endpoint shows `ray_tinyserve_kv_usage_ratio`, ... The scrape
configuration TinyServe ships (k8s/ PodMonitor, the test's prometheus.yml) drops that prefix with one
`metric_relabel_configs` rule, `RAY_PREFIX_RELABEL`, so Prometheus stores the exact names defined here.

Labels: `application`, `deployment`, `replica` (from the Ray Serve replica context; empty outside a
replica) and `model` (the served model id). Engine counters arrive as running totals; they are turned into
Prometheus counters by adding the increase since the last snapshot (a total that goes down means the engine
core restarted, and its new total is added).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "MetricSpec",
    "METRIC_SPECS",
    "LABELS",
    "RAY_PREFIX",
    "RAY_PREFIX_RELABEL",
    "ReplicaMetrics",
    "publish_engine_stats",
    "metric_names",
]

LABELS: tuple[str, ...] = ("application", "deployment", "replica", "model")
RAY_PREFIX = "ray_"
# Prometheus metric_relabel_configs rule that stores `ray_tinyserve_*` as `tinyserve_*`.
RAY_PREFIX_RELABEL: dict[str, Any] = {
    "source_labels": ["__name__"],
    "regex": "ray_(tinyserve_.*)",
    "target_label": "__name__",
    "replacement": "$1",
    "action": "replace",
}


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: its Prometheus name, kind, help text and where its value comes from.

    `section`/`key` name the entry of the stats-channel dict ({"kv": {...}, "selection": {...},
    "scheduler": {...}}) that feeds it; a missing entry (feature off) leaves the metric unset.
    """

    name: str
    kind: str  # "gauge" or "counter" (counters are fed by engine running totals)
    help: str
    section: str
    key: str


def _g(name: str, section: str, key: str, help: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help, section, key)


def _c(name: str, section: str, key: str, help: str) -> MetricSpec:
    return MetricSpec(name, "counter", help, section, key)


METRIC_SPECS: tuple[MetricSpec, ...] = (
    _g("tinyserve_kv_blocks", "kv", "num_blocks", "KV cache blocks in the engine's block pool."),
    _g("tinyserve_kv_free_blocks", "kv", "num_free_blocks", "KV cache blocks free (evictable cached blocks included)."),
    _g("tinyserve_kv_usage_ratio", "kv", "usage", "Fraction of KV cache blocks in use (0-1)."),
    _g("tinyserve_kv_block_size_tokens", "kv", "block_size", "Tokens per KV cache block."),
    _g(
        "tinyserve_kv_token_slot_utilisation_ratio",
        "kv",
        "token_slot_utilisation",
        "Tokens held / (blocks allocated x block_size): the slack in each request's last block is the waste.",
    ),
    _g(
        "tinyserve_kv_effective_capacity_ratio",
        "kv",
        "effective_capacity",
        "Logical tokens of running requests / physical token slots in use (above 1 with prefix sharing).",
    ),
    _g("tinyserve_kv_free_runs", "kv", "free_runs", "Number of maximal runs of contiguous free KV blocks."),
    _g("tinyserve_kv_largest_free_run_blocks", "kv", "largest_free_run", "Length of the longest run of contiguous free KV blocks."),
    _g(
        "tinyserve_kv_free_space_scatter_ratio",
        "kv",
        "free_space_scatter",
        "1 - largest_free_run / free_blocks: 0 when all free blocks form one run.",
    ),
    _g("tinyserve_kv_runs_per_request_mean", "kv", "runs_per_request_mean", "Mean number of contiguous block runs per running request."),
    _g("tinyserve_kv_runs_per_request_max", "kv", "runs_per_request_max", "Largest number of contiguous block runs of a running request."),
    _c("tinyserve_kv_evictions_total", "kv", "evictions_total", "Cached KV blocks evicted to serve allocations."),
    _c("tinyserve_kv_compactions_total", "kv", "compactions_total", "Compactions of the KV block pool applied."),
    _c("tinyserve_kv_blocks_moved_total", "kv", "blocks_moved_total", "KV blocks copied by compaction."),
    _c("tinyserve_kv_prefix_cache_queries_total", "kv", "prefix_cache_queries_total", "Prefix-cache lookups, in blocks."),
    _c("tinyserve_kv_prefix_cache_hits_total", "kv", "prefix_cache_hits_total", "Prefix-cache lookups that hit, in blocks."),
    _c("tinyserve_selection_decode_steps_total", "selection", "decode_steps_total", "Decode steps that ran query-aware page selection."),
    _c("tinyserve_selection_pages_scored_total", "selection", "pages_scored_total", "KV pages scored by query-aware selection."),
    _c("tinyserve_selection_pages_selected_total", "selection", "pages_selected_total", "KV pages attended after selection."),
    _c("tinyserve_selection_kv_bytes_read_total", "selection", "kv_bytes_read_total", "KV bytes read by selected-page attention."),
    _c(
        "tinyserve_selection_kv_bytes_not_read_total",
        "selection",
        "kv_bytes_not_read_total",
        "KV bytes dense attention would have read that selection skipped.",
    ),
    _g("tinyserve_scheduler_running_requests", "scheduler", "num_running", "Requests running in the engine core's scheduler."),
    _g("tinyserve_scheduler_waiting_requests", "scheduler", "num_waiting", "Requests waiting in the engine core's scheduler."),
    _c("tinyserve_scheduler_preemptions_total", "scheduler", "num_preemptions_total", "Requests preempted for lack of KV blocks."),
    _c("tinyserve_scheduler_aborted_requests_total", "scheduler", "num_aborted_total",
       "Requests the front end ended before the engine did (client gone, cancelled, stop string)."),
)


def metric_names() -> list[str]:
    """The exported names as Prometheus stores them (after `RAY_PREFIX_RELABEL`)."""
    return [spec.name for spec in METRIC_SPECS]


def _replica_labels(model: str) -> dict[str, str]:
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return {
            "application": ctx.app_name or "",
            "deployment": ctx.deployment or "",
            "replica": ctx.replica_tag or "",
            "model": model,
        }
    except Exception:  # not inside a Ray Serve replica
        return {"application": "", "deployment": "", "replica": "", "model": model}


class ReplicaMetrics:
    """The Ray metric objects of one replica process and the last engine totals seen.

    Owns one `ray.util.metrics` Gauge or Counter per `MetricSpec` (created once; Ray registers them with
    the node's metrics agent on first use) and `_last_totals`, the previous value of each engine counter
    per label set. Invariant: every exported counter equals the sum of the engine totals' increases seen,
    so it never decreases.
    """

    def __init__(self) -> None:
        from ray.util import metrics

        self._metrics: dict[str, Any] = {}
        for spec in METRIC_SPECS:
            cls = metrics.Gauge if spec.kind == "gauge" else metrics.Counter
            self._metrics[spec.name] = cls(spec.name, description=spec.help, tag_keys=LABELS)
        self._last_totals: dict[tuple[str, tuple[str, ...]], float] = {}

    def publish(self, stats: dict[str, Any], labels: dict[str, str]) -> list[str]:
        """Set every metric whose source is in `stats`; return the names set (others are left alone)."""
        label_key = tuple(labels[k] for k in LABELS)
        published = []
        for spec in METRIC_SPECS:
            value = (stats.get(spec.section) or {}).get(spec.key)
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric = self._metrics[spec.name]
            if spec.kind == "gauge":
                metric.set(float(value), tags=labels)
            else:
                last = self._last_totals.get((spec.name, label_key))
                increase = float(value) if last is None or value < last else float(value) - last
                self._last_totals[(spec.name, label_key)] = float(value)
                if increase > 0:
                    metric.inc(increase, tags=labels)
                elif last is None:
                    # Counter.inc refuses 0; a zero record makes the series exist (rate() = 0, not "no data").
                    metric._record(0.0, tags=labels)
            published.append(spec.name)
        return published


_replica_metrics: ReplicaMetrics | None = None


def publish_engine_stats(stats: dict[str, Any], *, model: str, labels: dict[str, str] | None = None) -> list[str]:
    """Export one stats-channel snapshot of this replica's engine core; return the metric names set.

    `labels` overrides the label values (default: this process's Ray Serve replica context and `model`).
    """
    global _replica_metrics
    if _replica_metrics is None:
        _replica_metrics = ReplicaMetrics()
    return _replica_metrics.publish(stats, labels or _replica_labels(model))
