"""CostModel and RoutingPolicy: overlap credit vs load, KV pressure, spill-over, sessions, health."""

from __future__ import annotations

import random

import pytest

from tinyserve.cache_router.cost_model import CostModel, CostWeights, ReplicaLoad
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.routing_policy import RoutingPolicy

BS = 32


def test_cost_credits_cached_tokens_and_charges_load():
    m = CostModel(CostWeights(prefill_s_per_token=1e-3, decode_s_per_request=0.05))
    idle = ReplicaLoad()
    assert m.cost(1000, 640, idle) == pytest.approx(0.36)
    assert m.cost(1000, 0, idle) > m.cost(1000, 640, idle)
    busy = ReplicaLoad(num_running=6, num_waiting=2)
    assert m.cost(1000, 640, busy) == pytest.approx(0.36 + 0.4)
    assert ReplicaLoad(inflight=9, num_running=3).requests == 9  # router's own count wins when larger


def test_kv_pressure_only_above_threshold_and_grows():
    m = CostModel(CostWeights(kv_pressure_threshold=0.8, kv_pressure_s=2.0, scatter_s=0.0))
    assert m.kv_penalty_s(ReplicaLoad(kv_usage=0.79)) == 0.0
    a, b = m.kv_penalty_s(ReplicaLoad(kv_usage=0.9)), m.kv_penalty_s(ReplicaLoad(kv_usage=1.0))
    assert 0 < a < b == pytest.approx(2.0)


def test_calibrate_recovers_coefficients():
    rng = random.Random(0)
    cold = [(n, 3e-4 * n + rng.gauss(0, 1e-4)) for n in range(50, 2000, 50)]
    loaded = [(k, 0.02 * k + rng.gauss(0, 1e-3)) for k in range(1, 16)]
    w = CostWeights.calibrate(cold, loaded)
    assert w.prefill_s_per_token == pytest.approx(3e-4, rel=0.05)
    assert w.decode_s_per_request == pytest.approx(0.02, rel=0.05)


def _policy(**kw):
    idx = KVBlockIndex()
    for r in "abcd":
        idx.add_replica(r, exact=True)
    w = CostWeights(prefill_s_per_token=1e-3, decode_s_per_request=0.01)
    return idx, RoutingPolicy(idx, CostModel(w), BS, **kw)


def test_prefers_the_replica_holding_the_longest_prefix():
    idx, pol = _policy()
    chain = list(range(100, 110))
    idx.store("b", chain[:4])
    idx.store("c", chain[:8])
    d = pol.choose("abcd", {}, chain, 10 * BS, now=0.0)
    assert d.ranked[0] == "c" and d.ranked[1] == "b"
    assert d.prefix_blocks == {"a": 0, "b": 4, "c": 8, "d": 0} and d.best_prefix_blocks == 8


def test_load_outweighs_a_short_prefix_but_not_a_long_one():
    idx, pol = _policy(balance_factor=100.0)
    chain = list(range(10))
    idx.store("a", chain[:1])  # 32 cached tokens = 0.032 s of prefill saved
    loads = {"a": ReplicaLoad(num_running=8), "b": ReplicaLoad(), "c": ReplicaLoad(), "d": ReplicaLoad()}
    assert pol.choose("abcd", loads, chain, 10 * BS, now=0.0).ranked[0] != "a"
    idx.store("a", chain[1:])  # 320 cached tokens = 0.32 s saved > 0.08 s of load
    assert pol.choose("abcd", loads, chain, 10 * BS, now=0.0).ranked[0] == "a"


def test_hot_prefix_spills_and_balance_stays_bounded():
    idx, pol = _policy(balance_factor=1.2, inflight_slack=1.0, share_slack=1.0)
    chain = list(range(8))
    idx.store("a", chain)
    counts = {r: 0 for r in "abcd"}
    spills = 0
    for i in range(400):  # a flood of one prefix; requests complete after 4 more arrive
        d = pol.choose("abcd", {}, chain, 8 * BS, now=i * 0.01)
        r = d.ranked[0]
        spills += d.spilled
        counts[r] += 1
        pol.record_routed(i, r, chain, 8 * BS, d.prefix_blocks[r], now=i * 0.01)
        idx.store(r, chain)  # the engine caches it where it ran
        if i >= 4:
            pol.complete(i - 4)
    mean = sum(counts.values()) / 4
    assert spills > 0 and min(counts.values()) > 0
    assert max(counts.values()) / mean <= 1.3


def test_session_pins_unless_overloaded_and_unhealthy_never_chosen():
    idx, pol = _policy()
    d = pol.choose("abcd", {}, [], 100, now=0.0, session="s1")
    first = d.ranked[0]
    pol.record_routed("q1", first, [], 100, 0, now=0.0, session="s1")
    pol.complete("q1")
    other = next(r for r in "abcd" if r != first)
    idx.store(other, [1, 2, 3])
    d2 = pol.choose("abcd", {}, [1, 2, 3], 3 * BS, now=1.0, session="s1")
    assert d2.ranked[0] == first and d2.by_session
    loads = {first: ReplicaLoad(healthy=False)}
    d3 = pol.choose("abcd", loads, [1, 2, 3], 3 * BS, now=1.0, session="s1")
    assert first not in d3.ranked and d3.ranked[0] == other
    assert pol.choose("ab", {"a": ReplicaLoad(healthy=False), "b": ReplicaLoad(healthy=False)}, [], 1, 0.0).ranked == []


def test_approximate_replicas_learn_from_decisions():
    idx = KVBlockIndex(approx_ttl_s=5.0)
    idx.add_replica("x", exact=False)
    idx.add_replica("y", exact=False)
    pol = RoutingPolicy(idx, CostModel(), BS, balance_factor=100.0)
    chain = [7, 8, 9]
    d = pol.choose("xy", {}, chain, 3 * BS, now=0.0)
    pol.record_routed(1, d.ranked[0], chain, 3 * BS, 0, now=0.0)
    pol.complete(1)
    d2 = pol.choose("xy", {}, chain, 3 * BS, now=1.0)
    assert d2.ranked[0] == d.ranked[0] and d2.best_prefix_blocks == 3
    idx.expire(now=10.0)
    assert pol.choose("xy", {}, chain, 3 * BS, now=10.0).best_prefix_blocks == 0
