"""Per-request placement records of the block pool, and decode growth inside a reservation.

`ReferencePlacement` is the record in Python and documents its fields. `Placement` is the compiled copy in
`_placement.c` (built at install with `_free_runs.c`): the same fields, its integers stored in the object.
Decode growth reads them on every allocation, and among thousands of interleaved requests each int object
of the reference is one more cache miss. `compiled_reservation_growth` gives the compiled step that takes
the next block of a request's own reservation, the pool's hottest path (`BestFitBlockPool.get_new_blocks`
has the Python it mirrors). The pool uses the compiled parts exactly when `FreeRuns` is compiled (not with
TINYSERVE_REFERENCE_FREE_RUNS=1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tinyserve.engine.free_runs import FreeRuns, ReferenceFreeRuns
from tinyserve.engine.own_runs import TableScan

__all__ = ["Placement", "ReferencePlacement", "compiled_reservation_growth"]


class ReferencePlacement:
    """Placement state of one request that is running or allocating, in one pool: the pool and its vLLM
    Request (both None once the pool forgot it), the id of the last block of its table (-2 before it holds
    one), how many blocks its table holds, its reservation [res_next, res_end) (res_end 0: none; the
    placement is `BestFitBlockPool._reservations[request id]` iff it has one), and the runs of its own
    blocks as far as compaction has read its table (`own_runs.TableScan`)."""

    __slots__ = ("held", "pool", "request", "res_end", "res_next", "scan", "tail")

    def __init__(self, pool: Any, request: Any) -> None:
        self.pool = pool
        self.request = request
        self.tail = -2
        self.held = 0
        self.res_next = 0
        self.res_end = 0
        self.scan: TableScan | None = None  # what compaction has read of the request's table (made on demand)


def _compiled_placement() -> type | None:
    if FreeRuns is ReferenceFreeRuns:
        return None
    try:
        from tinyserve.engine._placement import Placement as compiled
    except ImportError:  # built with _free_runs.c, so only a partial build lands here
        return None
    return compiled


Placement: type = _compiled_placement() or ReferencePlacement


def compiled_reservation_growth(blocks: list[Any], free_mask: bytearray,
                                reserved_mask: bytearray) -> Callable[[Any], list[Any] | None] | None:
    """The compiled growth step over the pool's blocks and masks when `Placement` is compiled, else None.
    Called with a placement, it returns [the next block of its reservation] (that block off both masks,
    its ref_cnt 1, the placement's tail, held and res_next advanced; the caller lowers the free count),
    or None, changing nothing, when that is not the step: no reservation right after the last block, the
    block would end it (the Python path ends the reservation), or a reference placement."""
    if Placement is ReferencePlacement:
        return None
    from tinyserve.engine._placement import ReservationGrowth

    return ReservationGrowth(blocks, free_mask, reserved_mask)
