"""The cluster simulator: real tokenizer and block hashes, the three routers, the oracle bound."""

from __future__ import annotations

import pytest

from tinyserve.bench import router_sim as rs
from tinyserve.bench.router_workloads import make_workload
from tinyserve.cache_router import BlockHasher, CostWeights, RequestTokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tinyserve.models.make_model import make_model

    return RequestTokenizer(str(make_model(tmp_path_factory.mktemp("model") / "tiny", "tiny")))


def test_workloads_are_seeded_and_tags_separate_runs():
    a = make_workload("chat", seed=3, sessions=5)
    b = make_workload("chat", seed=3, sessions=5)
    c = make_workload("chat", seed=3, sessions=5, tag="[x] ")
    assert [t.messages for s in a for t in s.turns] == [t.messages for s in b for t in s.turns]
    assert c[0].turns[0].messages[0]["content"].startswith("[x] ")
    assert all(len(s.turns) == 3 for s in a)
    assert all(len(s.turns) == 1 for s in make_workload("rag", seed=0, sessions=4))


@pytest.mark.parametrize("kind", ["chat", "rag"])
def test_routers_against_the_oracle_bound(tokenizer, kind):
    sessions = make_workload(kind, seed=0, sessions=24, groups=4 if kind == "chat" else 8, sessions_per_s=2.0)
    prepared = rs._prepare(sessions, tokenizer, BlockHasher(32, seed="0"))
    model, weights = rs.ReplicaModel(), CostWeights()
    rows = {r: rs.simulate(sessions, prepared, 4, r, model, weights) for r in rs.ROUTERS}
    oracle = rows["tinyserve"]["oracle_hit_rate"]
    for r in rows.values():
        assert r["requests"] == sum(len(s.turns) for s in sessions)
        assert 0.0 <= r["hit_rate"] <= oracle + 1e-9  # nobody beats the no-eviction oracle
    # Cache-aware routing finds more of the shared prefixes than load-only routing.
    assert rows["tinyserve"]["hit_rate"] > rows["power_of_two"]["hit_rate"]
    # ... without piling everything on one replica as prefix affinity may.
    assert rows["tinyserve"]["max_over_mean_requests"] <= rows["prefix_affinity"]["max_over_mean_requests"]


def test_decision_latency_probe_runs_at_small_scale():
    probe = rs.decision_latency_at_scale(replicas=8, blocks_per_replica=2000, decisions=200)
    assert probe["cached_blocks_total"] >= 8 * 1900
    assert 0 < probe["p50_s"] <= probe["p99_s"] <= probe["max_s"]


def test_oracle_counts_hits_as_vllm_does():
    """Whole blocks of earlier prompts, never the block holding a prompt's last token."""
    reqs = [([1, 2, 3], 3 * 32 + 5), ([1, 2, 3], 3 * 32 + 5), ([1, 2, 3], 3 * 32), ([1, 4], 2 * 32 + 1)]
    hits = 0 + 3 * 32 + 2 * 32 + 1 * 32
    assert rs.oracle_hit_rate(reqs, 32) == pytest.approx(hits / sum(t for _, t in reqs))
