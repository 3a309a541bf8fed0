"""Property tests of BestFitBlockPool driven through vLLM's real KVCacheManager (no model)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinyserve.bench.kv_trace import KVDriver, TraceRequest, make_kv_manager, make_trace
from tinyserve.engine.block_pool import (
    BestFitBlockPool,
    install_block_pool,
    uninstall_block_pool,
)
from tinyserve.engine.fragmentation import count_runs
from tinyserve.engine.settings import AllocatorSettings

BLOCK = 16


@pytest.fixture(autouse=True)
def _pool_installed():
    install_block_pool(AllocatorSettings())
    yield
    uninstall_block_pool()


def _check_ownership(driver: KVDriver) -> None:
    pool = driver.manager.block_pool
    pool.check_invariants()
    owners = Counter(b for table in driver.block_tables().values() for b in table)
    for block_id, count in owners.items():
        block = pool.blocks[block_id]
        assert block.ref_cnt == count, (block, count)  # no block owned twice unless shared by refcount
        if count > 1:
            assert block.block_hash is not None  # only cached (prefix) blocks are shared
    in_use = sum(1 for b in pool.blocks[1:] if b.ref_cnt > 0)
    assert in_use == len(owners)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1 - in_use


requests_strategy = st.lists(
    st.tuples(
        st.integers(0, 3),  # shared prefix id (3 = none)
        st.integers(1, 80),  # own prompt tokens
        st.integers(1, 60),  # output tokens
        st.integers(0, 3),  # arrival gap in steps
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(12, 80), requests=requests_strategy, window=st.integers(1, 4), reserve=st.sampled_from([None, 0, 1, 3]))
def test_invariants_under_random_traffic(num_blocks: int, requests, window: int, reserve: int) -> None:
    BestFitBlockPool.settings = AllocatorSettings(eviction_window=window, growth_reserve_max_blocks=reserve)
    prefixes = [tuple(range(1000 + 40 * k, 1000 + 40 * k + 8 + 16 * k)) for k in range(3)]
    trace, step = [], 0
    for index, (prefix_id, own, out, gap) in enumerate(requests):
        step += gap
        prompt = (prefixes[prefix_id] if prefix_id < 3 else ()) + tuple((index * 7 + t) % 997 for t in range(own))
        trace.append(TraceRequest(f"q{index}", step, prompt, out, out + 8))
    manager = make_kv_manager(num_blocks, BLOCK, max_model_len=BLOCK * num_blocks)
    assert isinstance(manager.block_pool, BestFitBlockPool)
    driver = KVDriver(manager, BLOCK, max_num_seqs=8, token_budget=BLOCK * num_blocks, on_step=_check_ownership)
    # Requests that can never fit the pool are left out (vLLM would reject them at admission).
    trace = [r for r in trace if -(-(len(r.prompt) + r.output_len) // BLOCK) < num_blocks - 1]
    driver.run(trace, max_steps=2000)
    assert driver.finished == len(trace)
    pool = manager.block_pool
    assert pool.get_num_free_blocks() == num_blocks - 1  # no leak
    pool.check_invariants()
    # every cached block is findable by its hash, and lookups return cached blocks
    for block in pool.blocks:
        if block.block_hash is not None:
            assert pool.cached_block_hash_to_block.contain(block.block_hash, block.block_id)


def test_without_prefix_caching_every_freed_block_is_placeable_again() -> None:
    manager = make_kv_manager(96, BLOCK, enable_caching=False)
    driver = KVDriver(manager, BLOCK, max_num_seqs=8, on_step=_check_ownership)
    trace = make_trace(seed=3, num_requests=30, shared_prefix_tokens=(32, 96), user_tokens=(8, 200),
                       output_tokens=(8, 120), max_tokens=160)
    driver.run(trace, max_steps=5000)
    pool = manager.block_pool
    assert driver.finished == 30 and pool.get_num_free_blocks() == 95
    assert pool._runs.num_free == 95 and pool._lru.num_free_blocks == 0  # nothing cached, nothing held back
    assert all(block.block_hash is None for block in pool.blocks)
    pool.check_invariants()


def test_cached_prefix_is_found_again_and_lru_order_kept() -> None:
    manager = make_kv_manager(64, BLOCK)
    driver = KVDriver(manager, BLOCK)
    shared = tuple(range(100, 100 + 3 * BLOCK))
    driver.run([TraceRequest("a", 0, shared + (1, 2, 3), 2, 4)])
    driver.run([TraceRequest("b", driver.steps, shared + (7, 8, 9), 2, 4)])
    assert driver.prefix_hit_tokens == 3 * BLOCK  # b found a's three full prompt blocks
    pool = manager.block_pool
    order = [b.block_id for b in pool._lru_blocks()]
    assert len(order) == len(set(order)) == pool._lru.num_free_blocks
    pool.check_invariants()


def test_growing_request_stays_one_run_while_others_interleave() -> None:
    manager = make_kv_manager(512, BLOCK)
    driver = KVDriver(manager, BLOCK, max_num_seqs=16)
    trace = [TraceRequest(f"g{i}", i, tuple(range(i * 50, i * 50 + 20)), 10 * BLOCK, 10 * BLOCK) for i in range(8)]
    seen: list[float] = []
    driver.on_step = lambda d: seen.extend(count_runs(t) for t in d.block_tables().values())
    driver.run(trace)
    assert max(seen) == 1


def test_same_trace_same_schedule_and_hits_as_stock() -> None:
    """The pool changes placement only: the free count, admissions, preemptions and prefix hits match."""
    trace = make_trace(seed=3, num_requests=60, arrivals_per_step=1.0)
    results = []
    for ours in (False, True):
        if not ours:
            uninstall_block_pool()
        else:
            install_block_pool(AllocatorSettings())
        manager = make_kv_manager(400, BLOCK)
        free_counts: list[int] = []
        driver = KVDriver(manager, BLOCK, on_step=lambda d: free_counts.append(d.manager.block_pool.get_num_free_blocks()))
        driver.run(trace)
        results.append((driver.steps, driver.preemptions, free_counts))
        assert type(manager.block_pool).__name__ == ("BestFitBlockPool" if ours else "BlockPool")
    assert results[0][:2] == results[1][:2]
    assert results[0][2] == results[1][2]

def test_compiled_free_path_makes_the_reference_choices() -> None:
    """The pool with its compiled parts (FreeRuns and the free pass in `_free_runs.c`, placement records and
    reservation growth in `_placement.c`) and the pool with the Python references hand out the same blocks
    at every step of a trace with prefix hits, evictions and preemption."""
    from tinyserve.engine.free_runs import ReferenceFreeRuns, compiled_free_runs
    from tinyserve.engine.placement import ReferencePlacement

    assert compiled_free_runs() is not None
    trace = make_trace(seed=5, num_requests=80, arrivals_per_step=2.0)
    timelines = []
    grown_in_c: list[bool] = []
    for compiled in (True, False):
        manager = make_kv_manager(160, BLOCK)
        pool = manager.block_pool
        if not compiled:
            pool.use_python_references()
        assert (pool._compiled_release is not None) == compiled
        assert (type(pool._runs) is ReferenceFreeRuns) != compiled
        assert (pool._placement_type is ReferencePlacement) != compiled
        assert (pool._grow_in_reservation is not None) == compiled
        if compiled:
            grow = pool._grow_in_reservation

            def counting_growth(placement: Any, grow: Any = grow) -> Any:
                taken = grow(placement)
                grown_in_c.append(taken is not None)
                return taken

            pool._grow_in_reservation = counting_growth
        tables: list[dict[str, list[int]]] = []
        driver = KVDriver(manager, BLOCK, max_num_seqs=24,
                          on_step=lambda d: (d.manager.block_pool.check_invariants(), tables.append(d.block_tables())))
        driver.run(trace)
        assert driver.finished == len(trace)
        timelines.append((tables, driver.preemptions, pool.counters["evictions_total"], driver.prefix_hit_tokens))
    assert timelines[0][1] > 0 and timelines[0][2] > 0 and timelines[0][3] > 0  # the trace reaches those paths
    assert any(grown_in_c) and not all(grown_in_c)  # the compiled growth took blocks, and declined others
    assert timelines[0] == timelines[1]


def _chat_trace(num_conversations: int = 60, turns: int = 3) -> list[TraceRequest]:
    """Multi-turn chat: a few shared system prompts; each turn's prompt is the previous turn's prompt plus
    a new user message, arriving after other conversations' turns (so its cached blocks have aged)."""
    systems = [tuple(range(3000 + 100 * k, 3000 + 100 * k + 4 * BLOCK)) for k in range(3)]
    trace = []
    for c in range(num_conversations):
        prompt = systems[c % 3]
        for t in range(turns):
            user = tuple((c * 7919 + t * 104729 + j * 31) % 1999 + 1 for j in range(40 + (c * 13 + t * 7) % 50))
            prompt = prompt + user
            output = 6 + (c * 5 + t) % 15
            trace.append(TraceRequest(f"c{c}t{t}", c * 2 + t * 70, prompt, output, output + 8))
    return trace


def test_never_evicts_cached_block_while_an_empty_one_is_free() -> None:
    """vLLM's free queue hands out never-cached blocks before any cached one, then cached ones in LRU
    order; best-fit placement must not trade a cached prefix (a future hit) for contiguity. The one
    exception: decode growth into its own room (old, never-hit cached blocks set aside for it)."""
    trace = _chat_trace()
    hits = {}
    for ours in (False, True):
        if ours:
            install_block_pool(AllocatorSettings())
        else:
            uninstall_block_pool()
        manager = make_kv_manager(1024, BLOCK)
        pool = manager.block_pool
        early: list[int] = []
        if ours:
            assert isinstance(pool, BestFitBlockPool)
            evict = pool._maybe_evict_cached_block
            consume_room = pool._consume_room
            from_rooms: set[int] = set()

            def recorded_consume_room(rid, room, got, consume_room=consume_room, from_rooms=from_rooms):
                from_rooms.update(range(room[0], room[0] + got))
                return consume_room(rid, room, got)

            def checked_evict(block, evict=evict, pool=pool, from_rooms=from_rooms):
                if block.block_hash is not None and block.block_id not in from_rooms:
                    empty_free = sum(1 for b in pool.blocks[1:] if pool.free_mask[b.block_id] and b.block_hash is None)
                    if empty_free:
                        early.append(empty_free)
                from_rooms.discard(block.block_id)
                return evict(block)

            pool._maybe_evict_cached_block = checked_evict
            pool._consume_room = recorded_consume_room
        driver = KVDriver(manager, BLOCK, max_num_seqs=32)
        driver.run(trace)
        assert driver.finished == len(trace)
        hits[ours] = driver.prefix_hit_tokens
        if ours:
            assert early == []  # no cached block was evicted while a never-cached block was free
            pool.check_invariants()
    assert hits[False] > 0
    assert hits[True] >= hits[False]


def _warm_then_interleave(num_blocks: int, batch: int, output: int) -> tuple[KVDriver, list[int], list[int]]:
    """Fill the pool's free blocks with cached blocks (a first batch that finishes), then run `batch`
    requests that arrive together, grow side by side and finish together (so none of them meets a
    free block without a hash: every allocation of the second batch evicts). Returns the driver and
    each second-batch request's own runs and all runs."""
    # 3 * BLOCK - 1 prompt tokens and one decoded token fill three blocks exactly: all cached, none empty
    warm = [TraceRequest(f"w{i}", 0, tuple(range(5000 + 97 * i, 5000 + 97 * i + 3 * BLOCK - 1)), 2, 1) for i in range(num_blocks // 3)]
    manager = make_kv_manager(num_blocks, BLOCK)
    own_runs: list[int] = []
    all_runs: list[int] = []

    def on_finish(driver: KVDriver, rid: str, table: list[int], hit_blocks: int) -> None:
        if rid.startswith("g"):
            own_runs.append(count_runs(table[hit_blocks:]))
            all_runs.append(count_runs(table))

    driver = KVDriver(manager, BLOCK, max_num_seqs=128, token_budget=num_blocks * BLOCK, on_finish=on_finish)
    driver.run(warm)
    assert driver.manager.block_pool.get_num_free_blocks() == num_blocks - 1
    start = driver.steps
    grow = [TraceRequest(f"g{i}", start, tuple(range(20000 + 53 * i, 20000 + 53 * i + 2 * BLOCK)), output, output) for i in range(batch)]
    driver.run(grow)
    return driver, own_runs, all_runs


def test_interleaved_growth_stays_contiguous_once_every_free_block_is_cached() -> None:
    """Growth rooms: eight requests decoding side by side, every block they get evicted from the prefix
    cache, each still ends up in one run (mean <= 1.2), and the pool's invariants hold."""
    driver, own_runs, all_runs = _warm_then_interleave(num_blocks=256, batch=8, output=6 * BLOCK)
    pool = driver.manager.block_pool
    assert pool.counters["evictions_total"] > 0  # the second batch really evicted
    assert len(own_runs) == 8
    assert sum(own_runs) / len(own_runs) <= 1.2, own_runs
    assert all_runs == own_runs  # no prefix shared: all runs are own runs
    pool.check_invariants()


def test_rooms_and_reservations_are_handed_out_under_pressure() -> None:
    """Blocks held as other requests' growth rooms or reservations are free blocks: a request that needs
    nearly every free block gets them (no failed allocation, no preemption beyond stock's)."""
    results = {}
    for ours in (False, True):
        if ours:
            install_block_pool(AllocatorSettings())
        else:
            uninstall_block_pool()
        manager = make_kv_manager(128, BLOCK, max_model_len=128 * BLOCK)
        driver = KVDriver(manager, BLOCK, max_num_seqs=64, token_budget=128 * BLOCK)
        warm = [TraceRequest(f"w{i}", 0, tuple(range(7000 + 50 * i, 7000 + 50 * i + 2 * BLOCK)), 2, 4) for i in range(30)]
        driver.run(warm)
        # four long-lived growers get rooms, then one request takes what is left of the pool
        growers = [TraceRequest(f"g{i}", driver.steps, tuple(range(9000 + 50 * i, 9000 + 50 * i + BLOCK)), 3 * BLOCK, 40 * BLOCK) for i in range(4)]
        driver.run(growers, max_steps=driver.steps + 3)
        pool = manager.block_pool
        if ours:
            assert isinstance(pool, BestFitBlockPool)
            assert pool._rooms or pool._reservations
        free = pool.get_num_free_blocks()
        big = TraceRequest("big", driver.steps, tuple(range(30000, 30000 + (free - 8) * BLOCK)), 2, 4)
        driver.run([big])
        assert driver.finished == 30 + 4 + 1
        results[ours] = (driver.preemptions, driver.steps)
        if ours:
            pool.check_invariants()
            assert pool.get_num_free_blocks() == 127
    assert results[True] == results[False]


def test_a_request_object_carries_its_placement_in_one_pool_only() -> None:
    """The placement cached on the request object is its pool's and only while the pool holds it: a second
    pool placing the same request object, and the request coming back after the pool forgot it (a
    preemption), both start from a placement of their own."""
    from tinyserve.bench.allocator import _FakeRequest

    first, second = BestFitBlockPool(64, True, BLOCK), BestFitBlockPool(64, True, BLOCK)
    request = _FakeRequest("r", 2 * BLOCK, 6 * BLOCK)

    def grow(pool: BestFitBlockPool, n: int) -> list[int]:
        pool.begin_request(request)
        try:
            return [b.block_id for b in pool.get_new_blocks(n)]
        finally:
            pool.end_request()

    held_first = grow(first, 2) + grow(first, 1)
    assert held_first == list(range(held_first[0], held_first[0] + 3))
    # The second pool knows nothing of the first one's table: its blocks come from its own state.
    second.begin_request(request)
    assert second._current is not first._placements["r"] and second._current.held == 0
    second.end_request()
    grow(second, 2)
    assert second._placements["r"].held == 2 and first._placements["r"].held == 3
    first.check_invariants()
    second.check_invariants()
    # Forgotten (preempted: blocks freed), then back: held and tail start again.
    first.free_blocks([first.blocks[i] for i in reversed(held_first)])
    first.forget_request("r")
    first.begin_request(request)
    assert first._current.held == 0 and first._current.tail == -2 and first._placements["r"] is first._current
    first.end_request()
    first.check_invariants()
