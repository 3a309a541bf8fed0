"""Maximal runs of free block ids, indexed for best-fit placement.

A *run* is a maximal interval [start, end) of consecutive block ids that are all in the set. Runs are
filed in size classes (exact lengths below 64, then eight classes per power of two) whose non-empty
classes are bits of one small integer, so "the smallest run that holds k blocks" and "the largest run"
cost O(1) bit operations plus a bounded look inside one class. Adding a block merges with its
neighbours in O(1); taking blocks from the start of a run is O(1) plus one byte per block taken. A class
keeps its runs in the order they were filed, so which of several equal candidates is picked is defined.

`ReferenceFreeRuns` is the structure in Python. `FreeRuns` is the compiled copy in `_free_runs.c` (built
at install when a C compiler is there): the same methods, the same choices, about a tenth of the cost per
call, which is what keeps the pool's free path near vLLM's. Without the compiled module (or with
TINYSERVE_REFERENCE_FREE_RUNS=1) `FreeRuns` is the reference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = ["FreeRuns", "ReferenceFreeRuns", "compiled_free_runs", "compiled_release_blocks", "size_class"]

logger = logging.getLogger(__name__)

_EXACT_CLASSES = 64
_SUB_BITS = 3
# How many members of the one size class that mixes fitting and non-fitting runs are examined before
# moving to the next class (where every run fits). Bounds best-fit work; makes it "good fit" there.
_CLASS_SCAN_LIMIT = 16
# How many runs in all `best_fit` examines when a predicate turns candidates down.
_FIT_SCAN_LIMIT = 64


def size_class(length: int) -> int:
    """Size class of a run of `length` >= 1 blocks (monotone non-decreasing in length)."""
    if length < _EXACT_CLASSES:
        return length
    top = length.bit_length()
    sub = (length >> (top - 1 - _SUB_BITS)) & ((1 << _SUB_BITS) - 1)
    return _EXACT_CLASSES + ((top - 7) << _SUB_BITS) + sub


class ReferenceFreeRuns:
    """The set of free block ids in [0, num_blocks), kept as maximal runs.

    Owns: membership (`contains`), the runs (start -> end and last -> start), and their size classes.
    Invariants: runs are maximal and disjoint; `num_free` is the number of member ids; `num_runs` is the
    number of runs; every run is in exactly the size class of its length, in the order it was filed
    there, and bit c of the class mask is set iff class c is non-empty.
    """

    __slots__ = ("num_blocks", "num_free", "num_runs", "_member", "_end", "_start", "_classes", "_mask")

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.num_free = 0
        self.num_runs = 0
        self._member = bytearray(num_blocks)
        self._end = [0] * num_blocks  # valid at run starts: exclusive end
        self._start = [0] * num_blocks  # valid at run lasts: start
        self._classes: list[dict[int, None]] = [{} for _ in range(size_class(max(num_blocks, 1)) + 1)]
        self._mask = 0

    # ---- queries -------------------------------------------------------------------------------

    def contains(self, block_id: int) -> bool:
        return bool(self._member[block_id])

    def run_at(self, start: int) -> int | None:
        """End (exclusive) of the run that starts at `start`, or None if no run starts there."""
        if 0 <= start < self.num_blocks and self._member[start] and (start == 0 or not self._member[start - 1]):
            return self._end[start]
        return None

    def best_fit(self, num: int, accept: Callable[[int], bool] | None = None) -> int | None:
        """Start of a run of at least `num` blocks, the smallest such run (exact below 64 blocks); with
        `accept`, the smallest whose start it accepts among a bounded number of runs examined."""
        cls = size_class(num)
        if cls >= len(self._classes):
            return None
        rest = self._mask >> cls
        examined = 0
        while rest:
            cls += (rest & -rest).bit_length() - 1
            best, best_len = None, 0
            for seen, start in enumerate(self._classes[cls], 1):
                length = self._end[start] - start
                if length >= num and (best is None or length < best_len) and (accept is None or accept(start)):
                    best, best_len = start, length
                    if length == num or cls < _EXACT_CLASSES:
                        break
                if seen == _CLASS_SCAN_LIMIT:
                    break
            examined += seen
            if best is not None:
                return best
            if examined >= _FIT_SCAN_LIMIT:
                return None
            cls += 1
            rest = self._mask >> cls
        return None

    def best_fit_older(self, num: int, serial: Any, limit: int) -> int | None:
        """`best_fit(num, accept)` accepting the runs whose first block's `serial` is below `limit` (serial
        an array('q') indexed by block id; the compiled copy reads it without calling back)."""
        return self.best_fit(num, lambda start: serial[start] < limit)

    def largest(self) -> tuple[int, int] | None:
        """(start, length) of a longest run, or None when empty."""
        if not self._mask:
            return None
        members = self._classes[self._mask.bit_length() - 1]
        start = max(members, key=lambda s: self._end[s] - s)
        return start, self._end[start] - start

    def runs(self) -> list[tuple[int, int]]:
        """All runs as (start, end), ascending (O(runs); for tests and analysis)."""
        return sorted((s, self._end[s]) for members in self._classes for s in members)

    # ---- updates -------------------------------------------------------------------------------

    def add(self, block_id: int) -> None:
        """Put a block that is not a member into the set, merging with neighbouring runs."""
        member = self._member
        assert not member[block_id], block_id
        left = block_id > 0 and member[block_id - 1]
        right = block_id + 1 < self.num_blocks and member[block_id + 1]
        start, end = block_id, block_id + 1
        if left:
            start = self._start[block_id - 1]
            self._file_out(start, block_id)
        if right:
            end = self._end[block_id + 1]
            self._file_out(block_id + 1, end)
        self._file_in(start, end)
        member[block_id] = 1
        self.num_free += 1
        self.num_runs += 1 - left - right

    def add_range(self, start: int, end: int) -> None:
        """Add [start, end) at once; none of its ids nor its two neighbours may be members."""
        member = self._member
        assert end > start and not any(member[max(start - 1, 0) : min(end + 1, self.num_blocks)])
        member[start:end] = b"\x01" * (end - start)
        self._file_in(start, end)
        self.num_free += end - start
        self.num_runs += 1

    def add_run(self, start: int, end: int) -> None:
        """Add [start, end), none of whose ids is a member, merging with neighbouring runs."""
        member = self._member
        left = start > 0 and member[start - 1]
        right = end < self.num_blocks and member[end]
        run_start, run_end = start, end
        if left:
            run_start = self._start[start - 1]
            self._file_out(run_start, start)
        if right:
            run_end = self._end[end]
            self._file_out(end, run_end)
        self._file_in(run_start, run_end)
        member[start:end] = b"\x01" * (end - start)
        self.num_free += end - start
        self.num_runs += 1 - left - right

    def add_many(self, block_ids: list[int]) -> None:
        """Add distinct non-members (any order; sorted in place), one merge per consecutive stretch."""
        block_ids.sort()
        if block_ids[-1] - block_ids[0] + 1 == len(block_ids):  # distinct ids: one stretch
            self.add_run(block_ids[0], block_ids[-1] + 1)
            return
        start = previous = block_ids[0]
        for block_id in block_ids:
            if block_id > previous + 1:
                self.add_run(start, previous + 1)
                start = block_id
            previous = block_id
        self.add_run(start, previous + 1)

    def take_prefix(self, start: int, num: int) -> None:
        """Remove the first `num` blocks of the run that starts at `start` (num <= its length)."""
        end = self._end[start]
        assert self.run_at(start) == end and 0 < num <= end - start
        self._file_out(start, end)
        if start + num < end:
            self._file_in(start + num, end)
        else:
            self.num_runs -= 1
        member = self._member
        for block_id in range(start, start + num):
            member[block_id] = 0
        self.num_free -= num

    def remove_range(self, start: int, end: int) -> None:
        """Remove [start, end), which must lie inside one run (finding that run scans bytes: O(run) in C)."""
        member = self._member
        run_start = member.rfind(0, 0, start) + 1
        run_end = self._end[run_start]
        assert run_start <= start < end <= run_end, (start, end, run_start, run_end)
        self._file_out(run_start, run_end)
        if run_start < start:
            self._file_in(run_start, start)
        if end < run_end:
            self._file_in(end, run_end)
        member[start:end] = bytes(end - start)
        self.num_free -= end - start
        self.num_runs += (run_start < start) + (end < run_end) - 1

    def run_containing(self, block_id: int) -> int:
        """Start of the run holding member `block_id` (scans bytes: O(run) in C)."""
        assert self._member[block_id]
        return self._member.rfind(0, 0, block_id) + 1

    def remove(self, block_id: int) -> None:
        """Remove any member (it may sit inside a run; finding its run scans bytes, O(run) in C)."""
        member = self._member
        assert member[block_id], block_id
        start = member.rfind(0, 0, block_id) + 1
        end = self._end[start]
        self._file_out(start, end)
        if start < block_id:
            self._file_in(start, block_id)
        if block_id + 1 < end:
            self._file_in(block_id + 1, end)
        member[block_id] = 0
        self.num_free -= 1
        self.num_runs += (start < block_id) + (block_id + 1 < end) - 1

    # ---- internals -----------------------------------------------------------------------------

    def _file_in(self, start: int, end: int) -> None:
        self._end[start] = end
        self._start[end - 1] = start
        length = end - start
        cls = length if length < _EXACT_CLASSES else size_class(length)
        members = self._classes[cls]
        members[start] = None
        if len(members) == 1:
            self._mask |= 1 << cls

    def _file_out(self, start: int, end: int) -> None:
        length = end - start
        cls = length if length < _EXACT_CLASSES else size_class(length)
        members = self._classes[cls]
        del members[start]
        if not members:
            self._mask &= ~(1 << cls)


def compiled_free_runs() -> type | None:
    """The compiled FreeRuns type, or None when it was not built (or TINYSERVE_REFERENCE_FREE_RUNS is set)."""
    if os.environ.get("TINYSERVE_REFERENCE_FREE_RUNS", "") not in ("", "0"):
        return None
    try:
        from tinyserve.engine._free_runs import FreeRuns as compiled
    except ImportError:
        logger.warning("tinyserve: the compiled FreeRuns (_free_runs.c) is not built; the KV block pool uses "
                       "the Python reference, several times slower per allocate and free")
        return None
    return compiled


FreeRuns: type = compiled_free_runs() or ReferenceFreeRuns


def compiled_release_blocks() -> Callable[..., tuple[int, list[Any], int]] | None:
    """`_free_runs.release_blocks` (BestFitBlockPool.free_blocks' pass, compiled) when `FreeRuns` is the
    compiled type, else None."""
    if FreeRuns is ReferenceFreeRuns:
        return None
    from tinyserve.engine._free_runs import release_blocks

    return release_blocks
