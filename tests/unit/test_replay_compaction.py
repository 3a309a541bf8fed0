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

    settings = AllocatorSettings(compaction_gather_runs=2)
    _use_pool(True)
    manager = make_kv_manager(800, 32)
    pool = manager.block_pool
    own: list[int] = []

    def on_step(driver: KVDriver) -> None:
        pool.check_invariants()

    driver = KVDriver(manager, 32, on_step=on_step, compaction=settings if gather else None,
                      on_finish=lambda d, rid, table, hits: own.append(count_runs(table[hits:])))
    driver.run(make_trace(seed=3, num_requests=80))
    if gather:
        pool.free_blocks(pool.blocks[m.src] for m in driver._retained)
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    return sum(own) / len(own), driver


def test_gathering_makes_requests_contiguous() -> None:
    """Gathering moves a request's own blocks into one free run: far fewer runs per finished request than
    the same replay without it, the pool whole at every step and nothing leaked."""
    without, _ = _own_runs(gather=False)
    with_gathering, driver = _own_runs(gather=True)
    assert driver.blocks_moved > 0
    assert with_gathering < 0.6 * without, (with_gathering, without)
