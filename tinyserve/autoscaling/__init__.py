"""KV-pressure autoscaling for Ray Serve: the policy and the replica signals it reads.

Reference the policy from a deployment's autoscaling config as
`policy: {policy_function: "tinyserve.autoscaling:kv_pressure_policy", policy_kwargs: {...}}`; the replica
class reports the signals with `record_autoscaling_stats` (see replica_signals.py).
"""

from tinyserve.autoscaling.kv_pressure_policy import KVPressurePolicy, kv_pressure_policy
from tinyserve.autoscaling.replica_hook import KVPressureSignals
from tinyserve.autoscaling.replica_signals import (
    KV_USAGE,
    NUM_RUNNING,
    NUM_WAITING,
    PREEMPTIONS_TOTAL,
    autoscaling_stats,
)

__all__ = [
    "KVPressurePolicy",
    "kv_pressure_policy",
    "KVPressureSignals",
    "autoscaling_stats",
    "KV_USAGE",
    "NUM_WAITING",
    "NUM_RUNNING",
    "PREEMPTIONS_TOTAL",
]
