"""The KV-pressure policy on recorded metric sequences, driven through Ray Serve's own policy machinery.

The policy is loaded the way Ray Serve's controller loads it (an `AutoscalingPolicy` naming
`tinyserve.autoscaling:kv_pressure_policy` with `policy_kwargs`, cloudpickled, instantiated once) and
wrapped by Ray's `_apply_autoscaling_config` (delays, scaling factors). Each tick the harness does what the
controller does with replica reports: keeps each replica's time series of the custom metrics and gives the
policy the mean over `look_back_period_s` (Ray's default aggregation) plus the raw series. Ray's delay
logic reads wall-clock time; the harness gives that module a clock that advances one tick per second.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("ray.serve")

import ray.serve.autoscaling_policy as ray_policy_module  # noqa: E402
from ray.serve._private.autoscaling_state import _resolve_policy_callable  # noqa: E402
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue  # noqa: E402
from ray.serve.autoscaling_policy import _apply_autoscaling_config  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy  # noqa: E402

from tinyserve.autoscaling import (  # noqa: E402
    KV_USAGE,
    NUM_RUNNING,
    NUM_WAITING,
    PREEMPTIONS_TOTAL,
    KVPressurePolicy,
    autoscaling_stats,
)
from tinyserve.autoscaling.kv_pressure_policy import STATE_KEY  # noqa: E402

DEP = DeploymentID(name="LLMServer:tinyserve-tiny", app_name="tinyserve")
POLICY_KWARGS = {"kv_usage_high": 0.8, "kv_usage_target": 0.6, "kv_usage_low": 0.2, "requests_per_replica_target": 8}


def _phase(ticks: int, kv_demand: float, ongoing: float, waiting: float = 0.0, preempt_per_s: float = 0.0) -> list[dict]:
    """`ticks` seconds of constant demand. kv_demand: KV usage one replica would see holding all requests."""
    return [{"kv_demand": kv_demand, "ongoing": ongoing, "waiting": waiting, "preempt_per_s": preempt_per_s}] * ticks


class Controller:
    """What Ray Serve's controller does between replica reports and the policy, one tick per second."""

    def __init__(self, monkeypatch, *, replicas: int, look_back_s: float = 5.0, **config) -> None:
        self.now = 1_000_000.0
        monkeypatch.setattr(ray_policy_module, "time", types.SimpleNamespace(time=lambda: self.now))
        self.config = AutoscalingConfig(
            look_back_period_s=look_back_s,
            metrics_interval_s=1.0,
            policy=AutoscalingPolicy(policy_function="tinyserve.autoscaling:kv_pressure_policy", policy_kwargs=POLICY_KWARGS),
            **config,
        )
        self.policy = _apply_autoscaling_config(_resolve_policy_callable(self.config.policy))
        self.look_back_s = look_back_s
        self.replicas = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(replicas)]
        self.next_id = replicas
        self.series: dict[str, dict[ReplicaID, list[TimeStampedValue]]] = {}
        self.preemptions: dict[ReplicaID, float] = {}
        self.state: dict = {}
        self.last_signals: dict = {}

    def _report(self, sample: dict) -> None:
        n = len(self.replicas)
        for rid in self.replicas:
            total = self.preemptions.get(rid, 0.0) + sample["preempt_per_s"] / n
            self.preemptions[rid] = total
            values = {
                KV_USAGE: min(1.0, sample["kv_demand"] / n),
                NUM_WAITING: sample["waiting"] / n,
                PREEMPTIONS_TOTAL: total,
            }
            for name, value in values.items():
                self.series.setdefault(name, {}).setdefault(rid, []).append(TimeStampedValue(self.now, value))

    def _window(self) -> dict[str, dict[ReplicaID, list[TimeStampedValue]]]:
        cut = self.now - self.look_back_s
        return {
            name: {rid: [p for p in pts if p.timestamp > cut] for rid, pts in by_rid.items() if rid in self.replicas}
            for name, by_rid in self.series.items()
        }

    def tick(self, sample: dict) -> int:
        self.now += 1.0
        self._report(sample)
        raw = self._window()
        aggregated = {name: {rid: sum(p.value for p in pts) / len(pts) for rid, pts in by.items() if pts} for name, by in raw.items()}
        n = len(self.replicas)
        ctx = AutoscalingContext(
            deployment_id=DEP,
            deployment_name=DEP.name,
            app_name=DEP.app_name,
            current_num_replicas=n,
            target_num_replicas=n,
            running_replicas=list(self.replicas),
            total_num_requests=sample["ongoing"],
            total_queued_requests=0.0,
            aggregated_metrics=aggregated,
            raw_metrics=raw,
            capacity_adjusted_min_replicas=self.config.min_replicas,
            capacity_adjusted_max_replicas=self.config.max_replicas,
            policy_state=self.state,
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=self.now,
            config=self.config,
        )
        decision, self.state = self.policy(ctx)
        self.last_signals = self.state.get(STATE_KEY, {})
        decision = min(max(decision, self.config.min_replicas), self.config.max_replicas)
        while len(self.replicas) < decision:  # new replicas start reporting next tick
            self.replicas.append(ReplicaID(unique_id=f"r{self.next_id}", deployment_id=DEP))
            self.next_id += 1
        del self.replicas[decision:]
        return decision

    def run(self, trace: list[dict]) -> list[int]:
        return [self.tick(sample) for sample in trace]


def _first_change(counts: list[int], start: int) -> int | None:
    return next((i for i, c in enumerate(counts) if c != start), None)


def test_ray_loads_the_policy_class_with_its_kwargs():
    policy = _resolve_policy_callable(AutoscalingPolicy(policy_function="tinyserve.autoscaling:kv_pressure_policy", policy_kwargs=POLICY_KWARGS))
    assert type(policy).__name__ == "KVPressurePolicy"
    assert (policy.kv_usage_high, policy.kv_usage_target, policy.requests_per_replica_target) == (0.8, 0.6, 8)


def test_sustained_kv_usage_scales_up_after_the_upscale_delay(monkeypatch):
    ctl = Controller(monkeypatch, replicas=1, min_replicas=1, max_replicas=4, upscale_delay_s=3.0, downscale_delay_s=10.0)
    counts = ctl.run(_phase(5, kv_demand=0.3, ongoing=2) + _phase(15, kv_demand=0.95, ongoing=4))
    assert counts[:5] == [1] * 5
    up = _first_change(counts, 1)
    assert up is not None and counts[up] == 2
    # The 5 s look-back mean must cross 0.8 and then hold for the 3 s delay: not on the first loaded tick.
    assert up >= 5 + 3
    assert ctl.last_signals["decision"] == "hold"
    # At 2 replicas each holds 0.475 < 0.8: no further growth.
    assert counts[-1] == 2 and max(counts) == 2


def test_a_short_kv_spike_does_not_scale(monkeypatch):
    ctl = Controller(monkeypatch, replicas=1, min_replicas=1, max_replicas=4, upscale_delay_s=3.0, downscale_delay_s=10.0)
    counts = ctl.run(_phase(5, 0.3, 2) + _phase(2, 1.0, 2) + _phase(10, 0.3, 2))
    assert counts == [1] * len(counts)


def test_waiting_requests_scale_up_even_with_low_kv_usage(monkeypatch):
    ctl = Controller(monkeypatch, replicas=1, min_replicas=1, max_replicas=3, upscale_delay_s=2.0, downscale_delay_s=10.0)
    counts = ctl.run(_phase(12, kv_demand=0.1, ongoing=4, waiting=3))
    assert counts[:2] == [1, 1] and max(counts) >= 2
    assert ctl.last_signals["reasons"] == ["waiting"]


def test_preemptions_scale_up(monkeypatch):
    ctl = Controller(monkeypatch, replicas=1, min_replicas=1, max_replicas=2, upscale_delay_s=2.0, downscale_delay_s=10.0)
    counts = ctl.run(_phase(4, 0.5, 3) + _phase(10, 0.5, 3, preempt_per_s=0.5))
    assert counts[:4] == [1] * 4
    assert counts[-1] == 2


def test_idle_scales_down_to_min_after_the_downscale_delay_and_not_before(monkeypatch):
    ctl = Controller(monkeypatch, replicas=3, min_replicas=1, max_replicas=3, upscale_delay_s=2.0, downscale_delay_s=8.0)
    counts = ctl.run(_phase(6, kv_demand=1.5, ongoing=12) + _phase(30, kv_demand=0.0, ongoing=0))
    assert counts[:6] == [3] * 6  # 0.5 per replica, 4 requests per replica: neither pressure nor idle
    down = _first_change(counts, 3)
    assert down is not None and down >= 6 + 8 - 1
    assert counts[-1] == 1 and min(counts) == 1
    assert ctl.last_signals["decision"] == "idle"


def test_moderate_load_holds_steady(monkeypatch):
    ctl = Controller(monkeypatch, replicas=2, min_replicas=1, max_replicas=4, upscale_delay_s=1.0, downscale_delay_s=1.0)
    counts = ctl.run(_phase(20, kv_demand=1.0, ongoing=6))  # 0.5 KV and 3 requests per replica
    assert counts == [2] * 20


def test_bounds_hold_under_extreme_pressure(monkeypatch):
    ctl = Controller(monkeypatch, replicas=1, min_replicas=1, max_replicas=3, upscale_delay_s=0.0, downscale_delay_s=0.0)
    counts = ctl.run(_phase(20, kv_demand=10.0, ongoing=100, waiting=50, preempt_per_s=5))
    assert max(counts) == 3 and counts[-1] == 3


def test_policy_output_is_clipped_to_context_bounds():
    policy = KVPressurePolicy(**POLICY_KWARGS)
    rid = ReplicaID(unique_id="r0", deployment_id=DEP)
    ctx = AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=2, target_num_replicas=2,
        running_replicas=[rid], total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={KV_USAGE: {rid: 0.0}}, raw_metrics={}, capacity_adjusted_min_replicas=2,
        capacity_adjusted_max_replicas=5, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=None,
    )  # fmt: skip
    desired, state = policy(ctx)
    assert desired == 2 and state[STATE_KEY]["decision"] == "idle"


def test_invalid_thresholds_are_rejected():
    with pytest.raises(ValueError):
        KVPressurePolicy(kv_usage_low=0.9, kv_usage_target=0.6)
    with pytest.raises(ValueError):
        KVPressurePolicy(requests_per_replica_target=0)


def test_autoscaling_stats_from_a_stats_channel_snapshot():
    snap = {"kv": {"usage": 0.42, "num_blocks": 10}, "scheduler": {"num_running": 3, "num_waiting": 1}}
    assert autoscaling_stats(snap) == {KV_USAGE: 0.42, NUM_RUNNING: 3.0, NUM_WAITING: 1.0}
    assert autoscaling_stats({}) == {}
    with_preempt = dict(snap, scheduler={"num_running": 0, "num_waiting": 0, "num_preemptions_total": 7})
    assert autoscaling_stats(with_preempt)[PREEMPTIONS_TOTAL] == 7.0
