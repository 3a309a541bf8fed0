"""KVBlockIndex: exact feed, reference counts, longest prefix, approximate mode with expiry and capacity."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.cache_router.kv_block_index import KVBlockIndex


def test_longest_prefix_per_replica():
    idx = KVBlockIndex()
    for r in "abc":
        idx.add_replica(r, exact=True)
    idx.store("a", [1, 2, 3])
    idx.store("b", [1, 2])
    idx.store("c", [2, 3])  # holds later blocks but not the first: no prefix
    assert idx.longest_prefix([1, 2, 3, 4], "abc") == {"a": 3, "b": 2, "c": 0}
    assert idx.longest_prefix([], "abc") == {"a": 0, "b": 0, "c": 0}
    assert idx.longest_prefix([1, 2, 3], ["a", "zz"]) == {"a": 3, "zz": 0}


def test_duplicate_stores_need_as_many_removes():
    idx = KVBlockIndex()
    idx.add_replica("a", exact=True)
    idx.store("a", [1, 1])
    idx.remove("a", [1])
    assert idx.holds("a", 1)
    idx.remove("a", [1])
    assert not idx.holds("a", 1)
    assert idx.longest_prefix([1], ["a"]) == {"a": 0}
    idx.remove("a", [99])  # unknown hash: ignored


def test_clear_and_remove_replica_leave_others_intact():
    idx = KVBlockIndex()
    idx.add_replica("a", exact=True)
    idx.add_replica("b", exact=True)
    idx.store("a", [1, 2])
    idx.store("b", [1, 2])
    idx.clear("a")
    assert idx.longest_prefix([1, 2], "ab") == {"a": 0, "b": 2}
    idx.remove_replica("b")
    assert idx.longest_prefix([1, 2], "ab") == {"a": 0, "b": 0}
    assert idx.total_blocks() == 0 and idx.replicas() == ["a"]


def test_approximate_mode_expires_and_respects_capacity():
    idx = KVBlockIndex(approx_ttl_s=10.0)
    idx.add_replica("x", exact=False, capacity_blocks=4)
    idx.add_replica("e", exact=True)
    idx.record_decision("e", [1, 2], now=0.0)  # exact replicas hold decisions only provisionally
    assert idx.num_blocks("e") == 0
    idx.record_decision("x", [1, 2, 3], now=0.0)
    idx.record_decision("x", [1, 2, 9, 10], now=5.0)  # refreshes 1, 2; pushes 3 out (capacity 4)
    assert idx.num_blocks("x") == 4 and not idx.holds("x", 3)
    assert idx.longest_prefix([1, 2, 9], ["x"]) == {"x": 3}
    assert idx.expire(now=12.0) == 2  # only e's provisional pair (10 s); x's were refreshed/added at t=5
    assert idx.expire(now=15.0) == 4
    assert idx.longest_prefix([1], ["x"]) == {"x": 0}


def test_switching_mode_drops_blocks_from_the_other_source():
    idx = KVBlockIndex()
    idx.add_replica("a", exact=False)
    idx.record_decision("a", [1, 2], now=0.0)
    idx.set_exact("a", True)
    assert idx.is_exact("a") and idx.num_blocks("a") == 0
    idx.store("a", [1])
    idx.set_exact("a", True)  # no change: keeps blocks
    assert idx.holds("a", 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans(), st.lists(st.integers(0, 12), max_size=6)), max_size=40),
       st.lists(st.integers(0, 12), max_size=8))
def test_matches_a_naive_model(ops, chain):
    idx = KVBlockIndex()
    naive = {r: {} for r in "abc"}
    for r in "abc":
        idx.add_replica(r, exact=True)
    for r, is_store, hashes in ops:
        if is_store:
            idx.store(r, hashes)
            for h in hashes:
                naive[r][h] = naive[r].get(h, 0) + 1
        else:
            idx.remove(r, hashes)
            for h in hashes:
                if naive[r].get(h, 0) > 0:
                    naive[r][h] -= 1
    expected = {}
    for r in "abc":
        n = 0
        while n < len(chain) and naive[r].get(chain[n], 0) > 0:
            n += 1
        expected[r] = n
    assert idx.longest_prefix(chain, "abc") == expected
    assert idx.total_blocks() == sum(sum(1 for c in d.values() if c > 0) for d in naive.values())


def test_exact_replicas_hold_decisions_provisionally_until_events_confirm_or_time_runs_out():
    idx = KVBlockIndex(provisional_ttl_s=5.0)
    idx.add_replica("e", exact=True)
    idx.record_decision("e", [1, 2, 3], now=0.0)  # routed, prefill not finished: no BlockStored yet
    assert idx.longest_prefix([1, 2, 3], ["e"]) == {"e": 3}
    assert idx.num_blocks("e") == 0  # provisional blocks are not the engine's
    idx.store("e", [1, 2])  # the engine confirms two of them
    idx.remove("e", [1])  # ... and already evicted one: provisional keeps it until expiry
    assert idx.longest_prefix([1, 2, 3], ["e"]) == {"e": 3}
    idx.expire(now=6.0)
    assert idx.longest_prefix([1, 2, 3], ["e"]) == {"e": 0}  # 1 evicted, 3 never stored
    assert idx.longest_prefix([2], ["e"]) == {"e": 1}  # confirmed blocks stay
    idx.record_decision("e", [7], now=10.0)
    idx.store("e", [8])
    idx.clear("e", keep_provisional=True)  # a resync of the event stream: the decisions stay provisional
    assert idx.longest_prefix([7], ["e"]) == {"e": 1} and idx.longest_prefix([8], ["e"]) == {"e": 0}
    idx.store("e", [7])
    idx.clear("e", keep_provisional=True)  # a confirmed block that is also provisional stays a holder
    assert idx.longest_prefix([7], ["e"]) == {"e": 1} and idx.num_blocks("e") == 0
    idx.clear("e")  # AllBlocksCleared drops provisional blocks too
    assert idx.longest_prefix([7], ["e"]) == {"e": 0}
