"""own_runs.TableScan: the runs of a request's own blocks, read incrementally, equal a full read."""

from __future__ import annotations

from vllm.v1.core.kv_cache_utils import KVCacheBlock

from tinyserve.engine.own_runs import TableScan, count_own_runs


def _table(ids: list[int], shared: int = 0) -> list[KVCacheBlock]:
    """Blocks with these ids, the first `shared` of them held by one more request."""
    return [KVCacheBlock(block_id, ref_cnt=2 if i < shared else 1) for i, block_id in enumerate(ids)]


def test_a_growing_table_is_read_once_and_counted_like_a_full_read() -> None:
    scan = TableScan()
    table = _table([5, 6, 7])
    assert scan.own_runs(table) == count_own_runs(table) == 1
    table += _table([8, 20])                     # grows: 8 continues the run, 20 starts one
    assert scan.own_runs(table) == count_own_runs(table) == 2
    assert scan.scanned == 5 and scan.breaks == [4]
    table += _table([21, 3])
    assert scan.own_runs(table) == count_own_runs(table) == 3


def test_a_shared_prefix_is_not_counted_until_the_request_holds_it_alone() -> None:
    scan = TableScan()
    table = _table([40, 41, 10, 11, 12], shared=2)   # a prefix hit on 40-41, then its own 10-12
    assert scan.own_runs(table) == count_own_runs(table) == 1
    for block in table[:2]:                          # the other holder finished
        block.ref_cnt = 1
    assert scan.own_runs(table) == count_own_runs(table) == 2
    for block in table[:3]:                          # a new request hits the first three blocks
        block.ref_cnt = 2
    assert scan.own_runs(table) == count_own_runs(table) == 1
    for block in table:                              # every block shared: nothing of its own
        block.ref_cnt = 2
    assert scan.own_runs(table) == count_own_runs(table) == 0


def test_a_table_rewritten_in_place_is_read_again_after_forget() -> None:
    scan = TableScan()
    table = _table([1, 2, 30, 31])
    assert scan.own_runs(table) == 2
    table[2:] = _table([3, 4])                       # compaction moved the second run behind the first
    scan.forget()
    assert scan.own_runs(table) == count_own_runs(table) == 1
    del table[1:]                                    # a shorter table is a new one: read again unasked
    table += _table([9])
    assert scan.own_runs(table) == count_own_runs(table) == 2
