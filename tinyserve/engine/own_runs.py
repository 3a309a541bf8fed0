"""How many runs a running request's own blocks lie in, kept per request and updated as its table grows.

A request's *own* blocks are the blocks of its table that it alone holds (ref_cnt 1); they are the ones
compaction may move. Blocks are shared only through prefix hits, and a hit takes a prefix of the hitter's
table, which is also a prefix of every other table holding those blocks; so along a table the number of
holders never grows, and the own blocks are the table from its *first own index* on. Their runs are 1 + the
*breaks* after that index, a break being a table position whose block does not follow the one before it.

`TableScan` keeps, per request, the breaks of the part of its table already read and the first own index
last seen. A step then costs O(1) per request plus its new blocks: the breaks only grow with the table, and
the first own index is rechecked by looking at two blocks (it moves only when a request sharing the prefix
arrives or finishes, and is then found again from the front). Whoever rewrites table entries in place
(compaction's moves) calls `forget` so the next count reads the table again. Compaction uses the count only
to pick which requests to gather; the blocks it moves are always re-read and filtered by ref_cnt.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

__all__ = ["TableScan", "count_own_runs", "own_blocks"]


class TableScan:
    """What has been read of one request's block table: `scanned` positions, the `breaks` among them
    (ascending), and `first_own` (the first position held by the request alone, as last seen)."""

    __slots__ = ("breaks", "first_own", "scanned")

    def __init__(self) -> None:
        self.scanned = 0
        self.breaks: list[int] = []
        self.first_own = 0

    def forget(self) -> None:
        """The table's entries changed in place: read it again next time."""
        self.scanned = 0
        self.breaks.clear()

    def own_runs(self, table: Sequence[Any]) -> int:
        """Runs of the own blocks of `table` (the request's KVCacheBlocks, in table order)."""
        size = len(table)
        if size < self.scanned:  # the table shrank: not the same one any more
            self.forget()
        breaks = self.breaks
        previous = table[self.scanned - 1].block_id if self.scanned else None
        for position in range(self.scanned, size):
            block_id = table[position].block_id
            if previous is not None and block_id != previous + 1:
                breaks.append(position)
            previous = block_id
        self.scanned = size
        first = self.first_own
        if not (first <= size and (first == size or table[first].ref_cnt == 1)
                and (first == 0 or table[first - 1].ref_cnt > 1)):
            first = next((i for i, block in enumerate(table) if block.ref_cnt == 1), size)
            self.first_own = first
        if first == size:
            return 0
        return 1 + len(breaks) - bisect_right(breaks, first)


def own_blocks(table: Sequence[Any]) -> list[tuple[int, int]]:
    """(table index, block id) of the blocks of `table` its request alone holds, in table order."""
    return [(index, block.block_id) for index, block in enumerate(table) if block.ref_cnt == 1 and not block.is_null]


def count_own_runs(table: Sequence[Any]) -> int:
    """Runs of the own blocks of `table`, read in full (for requests the pool has no scan for, and tests)."""
    from tinyserve.engine.fragmentation import count_runs

    return count_runs([block_id for _, block_id in own_blocks(table)])
