"""Hands engine stats to the metrics module when it is present (tinyserve.deployments.replica_metrics)."""

from __future__ import annotations

from typing import Any

__all__ = ["publish"]


def publish(stats: dict[str, Any], *, model: str) -> None:
    try:
        from tinyserve.deployments.replica_metrics import publish_engine_stats
    except ImportError:
        return
    publish_engine_stats(stats, model=model)
