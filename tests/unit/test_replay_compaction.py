"""Compaction in the allocator's trace replay (KVDriver with `compaction`), on vLLM's real KVCacheManager over
TinyServe's pool: blocks move, the pool's invariants hold throughout, and nothing leaks."""

from __future__ import annotations

import pytest

from tinyserve.bench.allocator import _use_pool
from tinyserve.bench.kv_trace import KVDriver, make_kv_manager, make_trace
from tinyserve.engine.block_pool import uninstall_block_pool
from tinyserve.engine.settings import AllocatorSettings


@pytest.fixture(autouse=True)
def _stock_pool_after():
    yield
    uninstall_block_pool()


def test_replay_compaction_moves_blocks_and_keeps_the_pool_whole() -> None:
    _use_pool(True)
    manager = make_kv_manager(400, 32)
    pool = manager.block_pool
    tables: list[list[int]] = []

    def on_step(driver: KVDriver) -> None:
        pool.check_invariants()
        for table in driver.block_tables().values():   # a block is never in two running tables
            assert len(set(table)) == len(table)
        held = [b for table in driver.block_tables().values() for b in table]
        retained = [m.src for m in driver._retained]
        assert not set(retained) & set(held)            # a moved block's source left the table

    driver = KVDriver(manager, 32, on_step=on_step, compaction=AllocatorSettings(force_compaction_every_step=True),
                      on_finish=lambda d, rid, table, hits: tables.append(table))
    trace = make_trace(seed=3, num_requests=60)
    driver.run(trace)
    assert driver.finished == len(trace) and len(tables) == len(trace)
    assert driver.blocks_moved > 0 and pool.counters["blocks_moved_total"] == driver.blocks_moved
    pool.free_blocks(pool.blocks[m.src] for m in driver._retained)   # the last step's sources
    pool.check_invariants()
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1     # no leak


def test_replay_without_compaction_moves_nothing() -> None:
    _use_pool(True)
    manager = make_kv_manager(400, 32)
    driver = KVDriver(manager, 32)
    driver.run(make_trace(seed=3, num_requests=30))
    assert driver.blocks_moved == 0 and not driver._retained


def _own_runs(gather: bool) -> tuple[float, KVDriver]:
    from tinyserve.engine.fragmentation import count_runs
    from tinyserve.engine.own_runs import count_own_runs

    settings = AllocatorSettings(compaction_gather_runs=2)
    _use_pool(True)
    manager = make_kv_manager(800, 32)
    pool = manager.block_pool
    own: list[int] = []

    def on_step(driver: KVDriver) -> None:
        pool.check_invariants()
        tables = manager.coordinator.single_type_managers[0].req_to_blocks
        for rid, table in tables.items():   # the incremental count gathering picks by equals a full read
            scan = pool.table_scan(rid)
            if scan is not None:
                assert scan.own_runs(table) == count_own_runs(table), rid

    driver = KVDriver(manager, 32, on_step=on_step, compaction=settings if gather else None,
                      on_finish=lambda d, rid, table, hits: own.append(count_runs(table[hits:])))
    driver.run(make_trace(seed=3, num_requests=80))
    if gather:
        pool.free_blocks(pool.blocks[m.src] for m in driver._retained)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    return sum(own) / len(own), driver


def test_gathering_makes_requests_contiguous() -> None:
    """Gathering moves a request's own blocks into one stretch: far fewer runs per finished request than
    the same replay without it, the pool whole at every step and nothing leaked."""
    without, _ = _own_runs(gather=False)
    with_gathering, driver = _own_runs(gather=True)
    assert driver.blocks_moved > 0
    assert with_gathering < 0.6 * without, (with_gathering, without)
    assert with_gathering < 1.3, with_gathering   # 1.15 (seeded); 1.6 when every gather went to a fresh run


def _pool_holding(held: list[int]):
    """A fresh TinyServe pool of 64 blocks with the given block ids allocated (every other block placeable)."""
    _use_pool(True)
    pool = make_kv_manager(64, 32).block_pool
    for block_id in held:
        pool.claim_block(block_id)
        pool.blocks[block_id].ref_cnt = 1
    return pool


def test_gathering_keeps_a_run_in_place_and_moves_the_rest_beside_it() -> None:
    """A request in two runs (table indices 0-4 at ids 10-14, 5-7 at 30-32): with 15-17 free, the three blocks
    of the second run move there (3 copies, not the 8 of a move to a fresh run). With 16 held by another
    request, the first run moves in front of the second (25-29: 5 copies). A window that needs more copies
    than the budget, or one that holds another request's block, is not taken."""
    from tinyserve.engine.compaction import _gather_in_place

    table = [(0, 10), (1, 11), (2, 12), (3, 13), (4, 14), (5, 30), (6, 31), (7, 32)]
    pool = _pool_holding([b for _, b in table])
    assert _gather_in_place(pool, table, budget=64) == [(30, 15), (31, 16), (32, 17)]

    pool = _pool_holding([b for _, b in table] + [16])
    assert _gather_in_place(pool, table, budget=64) == [(10, 25), (11, 26), (12, 27), (13, 28), (14, 29)]
    assert _gather_in_place(pool, table, budget=4) is None

    pool = _pool_holding([b for _, b in table] + [16, 27])
    assert _gather_in_place(pool, table, budget=64) is None


def test_joining_two_runs_moves_the_shorter_next_to_the_other() -> None:
    """Runs 10-11 (indices 0-1) and 30-32 (2-4): the two blocks of the first move in front of the second
    (28-29); with 29 held, the second moves behind the first (12-14); with 13 held too, nothing joins; runs
    with a shared block between them in the table are not joined."""
    from tinyserve.engine.compaction import _join_two_runs

    table = [(0, 10), (1, 11), (2, 30), (3, 31), (4, 32)]
    held = [b for _, b in table]
    assert _join_two_runs(_pool_holding(held), table, budget=64) == [(10, 28), (11, 29)]
    assert _join_two_runs(_pool_holding(held + [29]), table, budget=64) == [(30, 12), (31, 13), (32, 14)]
    assert _join_two_runs(_pool_holding(held + [29]), table, budget=2) is None
    assert _join_two_runs(_pool_holding(held + [29, 13]), table, budget=64) is None
    with_shared_between = [(0, 10), (1, 11), (3, 30), (4, 31)]
    assert _join_two_runs(_pool_holding([10, 11, 30, 31]), with_shared_between, budget=64) is None
