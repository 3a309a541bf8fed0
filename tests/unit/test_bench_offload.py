"""The offload benchmark's gathering on CPU: runs found in table order, calls counted, bytes checked."""

from __future__ import annotations

from tinyserve.bench.offload import gather_tables, table_runs


def test_table_runs_follow_table_order():
    assert table_runs([4, 5, 6, 1, 2, 9]) == [(4, 3), (1, 2), (9, 1)]
    assert table_runs([3, 2, 1]) == [(3, 1), (2, 1), (1, 1)]   # descending ids are not one run
    assert table_runs([]) == []


def test_gather_by_runs_makes_one_copy_per_run_and_copies_every_byte():
    tables = [[1, 2, 3, 7, 8], [4], [9, 10, 12], []]
    result = gather_tables(tables, num_blocks=16, block_bytes=256, limit=10, device="cpu")
    assert result["requests"] == 3   # the empty table is left out
    assert result["verified"] is True
    assert result["runs_per_request"] == (2 + 1 + 2) / 3
    assert result["by_runs_copy_calls_per_request"] == (2 + 1 + 2) / 3
    assert result["by_blocks_copy_calls_per_request"] == (5 + 1 + 3) / 3
    assert result["by_runs_gb_per_s"] > 0 and result["by_blocks_gb_per_s"] > 0
    assert "by_block_copy_kernel_gb_per_s" not in result   # the kernel path is CUDA's
