"""Compaction of the KV block pool: plan block moves that coalesce free space, apply them through vLLM.

Plan (`plan_compaction`, pure): with F free blocks, the window of F consecutive block ids that already
holds the most free blocks needs the fewest copies to become one free run: every allocated block inside
it moves to a free block outside it. A window is eligible only if each allocated block in it may move
(owned by exactly one running request) and enough destination blocks (placeable free blocks: empty or
old unused cache, never reserved or recently used cache) lie outside it. At most `max_moves` moves per
plan; a partial plan is progress toward the same window.

Gathering (`gather_requests`, `compaction_gather_runs`) instead works on requests whose own blocks lie in
several runs, one move a request a step: all of them into one stretch around one of its runs left in place,
where the blocks around it are free; else two of its runs joined; else all into a free run of their own.
`compact` picks the mode; the engine (`compact_step`) and the allocator benchmark's trace replay run the
same code.

Apply (`compact_step`, in the engine-core process, right after vLLM's scheduler built a step): only
requests that run this step as cached requests move. Each move (request, table index, src, dst) claims
dst for the request's table, keeps src allocated as a retention, appends (src, dst) to the step's
`kv_cache_block_copies` (the list vLLM 0.29 uses for its own copy-on-write copies; the worker runs
`copy_kv_cache_blocks_inplace` in `_update_states`, before the forward pass), and sends the request as
*resumed* with its whole new block table, which replaces the worker's copy of the table (vLLM's path for
requests resumed after preemption). Retained sources are freed at the start of the next step (the step
that copies has then run: synchronous scheduling), so every allocation decision sees the same free count
as without compaction. A source's prefix-cache entries move with it to dst (vLLM's `move_block_hashes`):
vLLM hashes a block when it schedules the tokens that fill it, i.e. before the step writes them, and this
step's writes land in dst only — a hash left on src would let a later prefix hit read half-written KV.
The retained src is then freed as an empty block. Block hashes never change, so no
BlockStored/BlockRemoved event is emitted for a move and event-driven routers stay right.

Hook for other per-block state kept beside the KV cache (e.g. query-aware selection's page min/max):
the moves reach the worker only as `scheduler_output.kv_cache_block_copies` (src, dst) pairs, the same
list as vLLM's own copies; apply the same pairs to that state at the same point (`copied_block_pairs`
reads them), and every block move — ours or vLLM's — is covered.

Needs synchronous scheduling (vLLM's CPU platform forces it); with async scheduling compaction is a no-op.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinyserve.engine.settings import AllocatorSettings

__all__ = [
    "BlockMove",
    "plan_compaction",
    "move_blocks",
    "compaction_due",
    "compaction_pairs",
    "gather_requests",
    "owned_blocks",
    "compact",
    "compact_step",
    "install_compaction",
    "copied_block_pairs",
]


@dataclass(frozen=True)
class BlockMove:
    """Move block `src` of request `request_id`'s table (position `index`) to free block `dst`."""

    request_id: str
    index: int
    src: int
    dst: int


def plan_compaction(
    free_mask: np.ndarray,
    movable_mask: np.ndarray,
    destination_mask: np.ndarray,
    max_moves: int,
) -> list[tuple[int, int]]:
    """(src, dst) block pairs that make the free space one run (or get closer), fewest copies first.

    Args:
        free_mask: 1 per free block.
        movable_mask: 1 per allocated block that may move.
        destination_mask: 1 per free block that may receive a moved block (subset of free_mask).
        max_moves: most pairs returned.
    """
    free = free_mask.astype(np.int64)
    num_free = int(free.sum())
    n = free.size
    if num_free == 0 or num_free == n:
        return []
    allocated = 1 - free
    blocked = allocated * (1 - movable_mask.astype(np.int64))
    csum = lambda a: np.concatenate(([0], np.cumsum(a)))  # noqa: E731
    free_in = csum(free)
    blocked_in = csum(blocked)
    dest_in = csum(destination_mask.astype(np.int64))
    starts = np.arange(n - num_free + 1)
    ends = starts + num_free
    cost = num_free - (free_in[ends] - free_in[starts])  # allocated blocks inside the window
    blocked_w = blocked_in[ends] - blocked_in[starts]
    dest_outside = dest_in[-1] - (dest_in[ends] - dest_in[starts])
    feasible = (blocked_w == 0) & (dest_outside >= cost)
    if not feasible.any():
        return []
    cost = np.where(feasible, cost, n + 1)
    start = int(np.argmin(cost))
    if cost[start] == 0:
        return []
    end = start + num_free
    sources = np.flatnonzero(allocated[start:end]) + start
    outside = destination_mask.copy()
    outside[start:end] = 0
    destinations = np.flatnonzero(outside)
    # Fill holes nearest the window first: moved blocks stay close to their neighbours.
    order = np.argsort(np.minimum(np.abs(destinations - start), np.abs(destinations - end)), kind="stable")
    destinations = np.sort(destinations[order[: len(sources)]])
    pairs = list(zip(sources.tolist(), destinations.tolist()))
    return pairs[:max_moves]


def owned_blocks(manager: Any, request_ids: Iterable[str]) -> dict[int, tuple[str, int]]:
    """block id -> (request id, table index) for the blocks of `request_ids` that no other request holds
    (`manager` is the single-type manager holding `req_to_blocks`)."""
    from tinyserve.engine.own_runs import own_blocks

    return {block_id: (rid, index) for rid in request_ids
            for index, block_id in own_blocks(manager.req_to_blocks.get(rid, ()))}


def _movable_requests(scheduler: Any, output: Any) -> list[str]:
    """The requests that run this step as cached (not new, not resumed, no partial hit) requests: those
    whose blocks compaction may move."""
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    cached = output.scheduled_cached_reqs
    return [rid for rid in cached.req_ids
            if rid not in cached.resumed_req_ids and rid not in manager._partial_hit_reqs]


def move_blocks(manager: Any, pool: Any, owners: dict[int, tuple[str, int]],
                pairs: list[tuple[int, int]]) -> list[BlockMove]:
    """Point each moved block's table entry at its destination (claimed from the free blocks, the source's
    prefix-cache entries moved along); the source keeps the request's reference as the copy's retention, to
    be freed once the copy has run. `manager` is the single-type manager holding `req_to_blocks`; pairs
    whose source has no owner or whose destination is no longer free are skipped. Returns the moves made."""
    moves = []
    for src, dst in pairs:
        owner = owners.get(src)
        if owner is None or not pool.free_mask[dst]:
            continue
        rid, index = owner
        table = manager.req_to_blocks[rid]
        assert table[index].block_id == src
        pool.claim_block(dst)
        pool.blocks[dst].ref_cnt = 1
        if pool.blocks[src].block_hash is not None:
            # The cache entry follows the data: vLLM hashes a block when it schedules the tokens that fill
            # it, so src may be hashed before this step writes it; only dst receives those writes.
            pool.move_block_hashes(pool.blocks[src], pool.blocks[dst])
        table[index] = pool.blocks[dst]  # src keeps the request's reference as the copy's retention
        pool.block_moved(rid, src, dst)
        moves.append(BlockMove(rid, index, src, dst))
    pool.counters["blocks_moved_total"] += len(moves)
    return moves


def _send_moves(scheduler: Any, output: Any, moves: list[BlockMove]) -> list[BlockMove]:
    """Tell the worker: the copies join `output.kv_cache_block_copies`, moved requests go as resumed with
    their whole new block table."""
    from vllm.v1.core.kv_cache_utils import KVCacheBlockCopy

    if not moves:
        return moves
    kv_manager = scheduler.kv_cache_manager
    copies = list(output.kv_cache_block_copies or ())
    copies.extend(KVCacheBlockCopy(m.src, m.dst) for m in moves)
    output.kv_cache_block_copies = copies
    cached = output.scheduled_cached_reqs
    moved = {m.request_id for m in moves}
    for i, rid in enumerate(cached.req_ids):
        if rid in moved:
            cached.resumed_req_ids.add(rid)
            cached.new_block_ids[i] = kv_manager.get_block_ids(rid)
            cached.all_token_ids[rid] = list(scheduler.requests[rid].all_token_ids)
    return moves


def gather_requests(manager: Any, pool: Any, request_ids: Iterable[str],
                    settings: AllocatorSettings) -> list[BlockMove]:
    """Of `request_ids` (the requests whose blocks may move), gather each whose own blocks lie in at least
    `settings.compaction_gather_runs` runs, requests with the most runs first, at most
    `compaction_max_moves` copies in all, one move a request a step, the first that can be made of:
    all its own blocks into one stretch around one of its runs left in place (`_gather_in_place`, fewest
    copies); two of its runs next in table order joined (`_join_two_runs`: one run fewer, fewest copies);
    all its own blocks into a free run of their own (`pool.gather_destination`). A block moves at most
    once a step (a second copy in the same step could read its destination before the first wrote it).
    Which requests qualify comes from each one's `own_runs.TableScan` (O(1) a request a step, plus its new
    blocks); only those are read block by block. Returns the moves."""
    from tinyserve.engine.fragmentation import count_runs
    from tinyserve.engine.own_runs import count_own_runs, own_blocks

    threshold = settings.compaction_gather_runs
    tables = manager.req_to_blocks
    candidates = []
    for rid in request_ids:
        table = tables.get(rid)
        if not table:
            continue
        scan = pool.table_scan(rid)
        runs = scan.own_runs(table) if scan is not None else count_own_runs(table)
        if runs < threshold:
            continue
        blocks = own_blocks(table)
        runs = count_runs([block_id for _, block_id in blocks])
        if runs >= threshold:
            candidates.append((-runs, rid, blocks))
    candidates.sort()
    owners = {block_id: (rid, index) for _, rid, blocks in candidates for index, block_id in blocks}
    budget = settings.compaction_max_moves
    moves: list[BlockMove] = []
    for _, rid, blocks in candidates:
        pairs = _gather_in_place(pool, blocks, budget)
        if pairs is None:
            pairs = _join_two_runs(pool, blocks, budget)
        if pairs is None and len(blocks) <= budget:
            start = pool.gather_destination(len(blocks))
            if start is not None:
                pairs = [(block_id, start + k) for k, (_, block_id) in enumerate(blocks)]
        if pairs is None:
            continue
        moves += move_blocks(manager, pool, owners, pairs)
        budget -= len(pairs)
    return moves


def _gather_in_place(pool: Any, blocks: list[tuple[int, int]], budget: int) -> list[tuple[int, int]] | None:
    """(src, dst) pairs that put `blocks` ((table index, block id), ascending index) at ids in table order
    around one of their runs left in place: the fewest copies among the runs whose window (the ids the
    other blocks must take) holds only blocks of the request already in their place or blocks a gather may
    claim (`pool.gatherable`). None when no window works within `budget` copies."""
    first_index = blocks[0][0]
    span = blocks[-1][0] - first_index + 1   # the window's length (indices of shared blocks stay unused)
    best: list[tuple[int, int]] | None = None
    for position, _ in _runs_in_table(blocks):
        base = blocks[position][1] - (blocks[position][0] - first_index)   # id that index first_index gets
        if base > 0 and base + span <= pool.num_gpu_blocks:
            pairs = []
            for index, block_id in blocks:
                dst = base + index - first_index
                if dst == block_id:
                    continue
                if not pool.gatherable(dst) or len(pairs) >= budget:
                    pairs = None
                    break
                pairs.append((block_id, dst))
            if pairs is not None and (best is None or len(pairs) < len(best)):
                best = pairs
    return best


def _runs_in_table(blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs of `blocks` ((table index, block id), ascending index) as [start, end) positions in the list:
    stretches whose ids ascend by one with their table index."""
    runs = []
    position = 0
    while position < len(blocks):
        end = position + 1
        while (end < len(blocks) and blocks[end][1] == blocks[end - 1][1] + 1
               and blocks[end][0] == blocks[end - 1][0] + 1):
            end += 1
        runs.append((position, end))
        position = end
    return runs


def _join_two_runs(pool: Any, blocks: list[tuple[int, int]], budget: int) -> list[tuple[int, int]] | None:
    """(src, dst) pairs that join two runs of `blocks` ((table index, block id), ascending index) that are
    next to each other in the table: the later moved to right after the earlier, or the earlier to right
    before the later, into blocks a gather may claim (`pool.gatherable`); the fewest copies. None when no
    two runs can be joined within `budget` copies."""
    best: list[tuple[int, int]] | None = None
    for (a_start, a_end), (b_start, b_end) in itertools.pairwise(_runs_in_table(blocks)):
        if blocks[b_start][0] != blocks[a_end - 1][0] + 1:
            continue   # a shared block between them in the table
        options = (
            [(blocks[k][1], blocks[a_end - 1][1] + 1 + k - b_start) for k in range(b_start, b_end)],
            [(blocks[k][1], blocks[b_start][1] - (a_end - k)) for k in range(a_start, a_end)],
        )
        for pairs in options:
            if len(pairs) > budget or (best is not None and len(pairs) >= len(best)):
                continue
            if all(0 < dst < pool.num_gpu_blocks and pool.gatherable(dst) for _, dst in pairs):
                best = pairs
    return best


def compaction_due(free_mask: np.ndarray, settings: AllocatorSettings) -> bool:
    """Whether the scatter of the free space (`free_mask`: 1 per free block) passes the settings'
    threshold (or compaction is forced)."""
    if settings.force_compaction_every_step:
        return True
    if settings.compaction_scatter_threshold is None:
        return False
    from tinyserve.engine.fragmentation import free_run_lengths, free_space_scatter

    return free_space_scatter(free_run_lengths(free_mask)) > settings.compaction_scatter_threshold


def compaction_pairs(pool: Any, free_mask: np.ndarray, owners: dict[int, tuple[str, int]],
                     settings: AllocatorSettings) -> list[tuple[int, int]]:
    """The (src, dst) moves `plan_compaction` picks for blocks that may move (`owners`' keys), `free_mask`
    being the pool's free blocks now."""
    if not owners:
        return []
    movable = np.zeros(free_mask.size, dtype=np.uint8)
    movable[np.fromiter(owners.keys(), dtype=np.int64)] = 1
    destinations = np.frombuffer(bytes(pool.placeable_mask()), dtype=np.uint8)
    return plan_compaction(free_mask, movable, destinations, settings.compaction_max_moves)


def compact(manager: Any, pool: Any, movable: Callable[[], list[str]],
            settings: AllocatorSettings) -> list[BlockMove]:
    """One compaction, if one is due: gathering (`compaction_gather_runs`) or coalescing free space.
    `movable()` gives the requests whose blocks may move (called only when there is something to plan).
    Returns the moves made (sources retained: free them once the copies have run)."""
    moves: list[BlockMove] = []
    if settings.compaction_gather_runs is not None:
        moves = gather_requests(manager, pool, movable(), settings)
    else:
        free_mask = np.frombuffer(bytes(pool.free_mask), dtype=np.uint8)   # a copy: the moves change the pool's
        if compaction_due(free_mask, settings):
            owners = owned_blocks(manager, movable())
            pairs = compaction_pairs(pool, free_mask, owners, settings)
            moves = move_blocks(manager, pool, owners, pairs) if pairs else []
    if moves:
        pool.counters["compactions_total"] += 1
    return moves


def compact_step(scheduler: Any, output: Any, settings: AllocatorSettings) -> list[BlockMove]:
    """`compact` after the scheduler built `output`: tables rewritten, the copies and the moved requests'
    new tables sent to the worker in `output`, sources retained (see the module docstring)."""
    if len(scheduler.kv_cache_manager.coordinator.single_type_managers) != 1:
        return []  # one KV cache group only (hybrid models keep several tables per request)
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    moves = compact(manager, scheduler.kv_cache_manager.block_pool, lambda: _movable_requests(scheduler, output),
                    settings)
    return _send_moves(scheduler, output, moves)


def install_compaction(settings: AllocatorSettings) -> None:
    """Wrap vLLM's Scheduler.schedule so each step may compact (idempotent; settings updated)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler.schedule, "_tinyserve_compaction", False):
        Scheduler.schedule._tinyserve_settings = settings  # type: ignore[attr-defined]
        return
    original = Scheduler.schedule

    @functools.wraps(original)
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        from tinyserve.engine.block_pool import BestFitBlockPool

        pool = self.kv_cache_manager.block_pool
        if not isinstance(pool, BestFitBlockPool) or self.scheduler_config.async_scheduling:
            return original(self, *args, **kwargs)
        retained = self.__dict__.pop("_tinyserve_retained", None)
        if retained:  # the step that copied them has run
            pool.free_blocks(pool.blocks[m.src] for m in retained)
        output = original(self, *args, **kwargs)
        moves = compact_step(self, output, schedule._tinyserve_settings)
        if moves:
            self._tinyserve_retained = moves
        return output

    schedule._tinyserve_compaction = True  # type: ignore[attr-defined]
    schedule._tinyserve_settings = settings  # type: ignore[attr-defined]
    Scheduler.schedule = schedule


def copied_block_pairs(scheduler_output: Any) -> list[tuple[int, int]]:
    """The (src, dst) block copies a worker must apply this step (compaction moves included)."""
    return [(c.src_block_id, c.dst_block_id) for c in (scheduler_output.kv_cache_block_copies or ())]
