"""Property tests of the fragmentation analysis and the compaction planner."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyserve.engine.compaction import plan_compaction
from tinyserve.engine.fragmentation import analyse_trace, count_runs, free_run_lengths, kv_snapshot

masks = st.lists(st.integers(0, 1), min_size=1, max_size=200)


def _naive_runs(mask: list[int]) -> list[int]:
    runs, current = [], 0
    for bit in mask + [0]:
        if bit:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@given(masks)
def test_free_run_lengths_match_naive(mask: list[int]) -> None:
    assert free_run_lengths(np.array(mask, dtype=np.uint8)).tolist() == _naive_runs(mask)
    assert free_run_lengths(bytearray(mask)).tolist() == _naive_runs(mask)


def test_count_runs() -> None:
    assert count_runs([]) == 0
    assert count_runs([5, 6, 7]) == 1
    assert count_runs([5, 6, 9, 10, 4]) == 3


def test_snapshot_definitions() -> None:
    # blocks 0 (null) .. 9; request a holds 1,2,3 (70 tokens), b holds 1,2 (shared) and 7 (40 tokens)
    free = np.array([0, 0, 0, 0, 1, 1, 0, 0, 1, 1], dtype=np.uint8)
    snap = kv_snapshot(num_blocks=10, block_size=32, free_mask=free,
                       block_tables={"a": [1, 2, 3], "b": [1, 2, 7]}, tokens_held={"a": 70, "b": 80})
    assert snap["num_free_blocks"] == 4 and snap["free_runs"] == 2 and snap["largest_free_run"] == 2
    assert snap["free_space_scatter"] == 0.5
    assert snap["token_slot_utilisation"] == 150 / (6 * 32)
    assert snap["effective_capacity"] == 150 / (5 * 32)  # 5 distinct blocks in use: sharing counts once
    assert snap["runs_per_request_mean"] == 1.5 and snap["runs_per_request_max"] == 2
    assert snap["usage"] == 1 - 4 / 9


def test_analyse_trace_replays_refcounts() -> None:
    events = [("alloc", "a", [1, 2], 50), ("alloc", "b", [1, 3], 60), ("free", "a", [], 0), ("tokens", "b", [], 64)]
    timeline = analyse_trace(events, num_blocks=6, block_size=32)
    assert [s["num_free_blocks"] for s in timeline] == [3, 2, 3, 3]
    assert timeline[-1]["token_slot_utilisation"] == 64 / 64
    assert timeline[2]["free_runs"] == 2  # block 2 freed, 1 and 3 still held by b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=60), st.integers(1, 60))
def test_plan_makes_one_run_with_fewest_copies(cells: list[int], max_moves: int) -> None:
    """cells: 0 free (destination allowed), 1 allocated movable, 2 allocated pinned."""
    free = np.array([c == 0 for c in cells], dtype=np.uint8)
    movable = np.array([c == 1 for c in cells], dtype=np.uint8)
    pairs = plan_compaction(free, movable, free.copy(), max_moves)
    num_free = int(free.sum())
    # brute force: fewest allocated blocks in a feasible window of num_free blocks
    best = None
    for start in range(len(cells) - num_free + 1):
        window = cells[start : start + num_free]
        if 2 in window:
            continue
        cost = sum(1 for c in window if c == 1)
        outside_free = num_free - (num_free - cost)
        if outside_free >= cost:
            best = cost if best is None else min(best, cost)
    if num_free == 0 or best is None or best == 0:
        assert pairs == []
        return
    assert len(pairs) == min(best, max_moves)
    srcs, dsts = [p[0] for p in pairs], [p[1] for p in pairs]
    assert len(set(srcs)) == len(srcs) and len(set(dsts)) == len(dsts)
    assert all(movable[s] for s in srcs) and all(free[d] for d in dsts)
    if len(pairs) == best:  # the whole plan applied: free space is one run
        after = free.copy()
        after[srcs] = 1
        after[dsts] = 0
        assert len(_naive_runs(after.tolist())) == 1
