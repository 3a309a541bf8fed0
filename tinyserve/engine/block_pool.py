"""TinyServe's block pool for vLLM 0.29, and the hook that puts it in place of vLLM's.

`BestFitBlockPool` subclasses vLLM's `BlockPool`: same interface, same prefix-caching semantics (block
hashes, lookups, `BlockStored`/`BlockRemoved` events for every cache entry added or dropped), same free
count, so the scheduler admits and preempts exactly as with vLLM's pool. What changes is *which* free
block an allocation gets: as vLLM's free queue does, placement hands out only blocks without a hash
(never cached, evicted, or a finished request's partial last block) while any is free, and evicts cached
blocks only when none is left (one exception: decode growth into the request's own growth room, below):

1. a request that owns a growth reservation takes the blocks right after its last block;
2. else it extends its own run when the block after its last block starts a free run;
3. else a new placement takes the best-fitting free run for the request's expected size (prompt + the
   expected output: the moving mean of finished requests' outputs, doubled once exceeded, capped by
   max_tokens; max_tokens until a request has finished): exact fit, else the smallest run that holds it,
   else the largest run (most room to grow), then further largest runs (fewest runs); it reserves the rest
   of its expected size right after it;
4. else it takes other requests' reservations (reserved blocks are free: they never refuse an allocation);
5. else (no free block without a hash is left) it evicts cached blocks, contiguously where LRU age
   allows (`_evict_contiguous`): the request's growth room (old, never-hit cached blocks right after its
   last block, held out of the LRU for it), else old never-hit blocks right after its last block, else the
   best-fitting run of old never-hit cached blocks for its expected size (`_cold`), else a
   region opened at the LRU head — extended down over old never-hit blocks so that a region of the
   request's expected size ends at the head — whose remainder becomes the request's room. "Old" means
   among the `eviction_age_fraction` least recently used free cached blocks; blocks that were hit (a
   shared prefix, or a preempted request's block that its resume will hit) are only ever evicted in
   vLLM's LRU order (`_pick_eviction`, among the oldest `eviction_window` candidates).

Decode growth (one block) has a fast path for steps 1, 5 (own room) and 4 (the far end of the newest
reservation) that touches one request's state and one block. It takes the next block of its own room
even while blocks without a hash are free: those cached blocks were set aside for this request when none
was left, and they are old and never hit (the replays' prefix hit rates stay at or above stock's; taking
a placeable block elsewhere instead left the room stale and the request one more run).

Request context (which request allocates, its expected length) comes from thin wrappers around
`KVCacheManager.allocate_slots`/`free`/`pop_blocks_for_free`/`record_prefix_cache_stats` that
`install_block_pool` adds; they only tell the pool who is asking and change no result.
"""

from __future__ import annotations

import functools
import heapq
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from vllm.v1.core.block_pool import BlockPool
from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

from tinyserve.engine.free_runs import (
    FreeRuns,
    ReferenceFreeRuns,
    compiled_release_blocks,
)
from tinyserve.engine.own_runs import TableScan
from tinyserve.engine.placement import (
    Placement,
    ReferencePlacement,
    compiled_reservation_growth,
)
from tinyserve.engine.settings import AllocatorSettings

__all__ = ["BestFitBlockPool", "install_block_pool", "uninstall_block_pool"]

_HIT_CLASS_CAP = 3


class _FreeQueueView:
    """Stand-in for vLLM's `free_block_queue` for code outside the pool that touches it directly
    (e.g. sink-attention managers pop blocks from it); every call goes through the pool's bookkeeping."""

    def __init__(self, pool: BestFitBlockPool) -> None:
        self._pool = pool

    @property
    def num_free_blocks(self) -> int:
        return self._pool.get_num_free_blocks()

    def popleft(self) -> KVCacheBlock:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        pool = self._pool
        return [pool.blocks[i] for i in pool._take(n)]

    def remove(self, block: KVCacheBlock) -> None:
        self._pool._take_specific(block.block_id)

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        for block in blocks:
            self._pool._release(block)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        self.append_n(blocks)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return [b for b in self._pool.blocks if self._pool._free_mask[b.block_id]]


# The request object carries its placement under this name (a cache of `BestFitBlockPool._placements`:
# `begin_request` runs on every allocation, and one attribute on the request it already reads costs less
# than a lookup in a dict of every running request; `begin_request` reads it as `request._tinyserve_placement`).
_PLACEMENT_ATTR = "_tinyserve_placement"


class BestFitBlockPool(BlockPool):
    """vLLM's block pool with best-fit contiguous placement and fragmentation-aware LRU eviction.

    Owns, besides vLLM's block objects and prefix-cache maps, three views of the free blocks (free =
    vLLM's sense: ref_cnt == 0, null block excluded; `_free_mask[i]` is 1 iff block i is free):
    - `_lru`: every free block that carries a hash (still findable by prefix lookup) and is in no room,
      least recently used first; `_in_lru[i]` is 1 iff block i is there;
    - `_cold`: the blocks of `_lru` that were never hit, as runs (where an eviction can stay contiguous);
    - `_reserved_mask` / `_reservations`: free blocks without a hash held for one request's growth,
      right after it;
    - `_runs`: every free, unreserved block without a hash (*placeable*);
    - `_room_mask` / `_rooms`: free cached blocks out of `_lru`, held as one request's growth room.
    Invariants: `get_num_free_blocks()` equals vLLM's count; every free block is in exactly one of
    `_runs`, a reservation (no hash), `_lru` or a room (hash); reservations are never adjacent, nor are
    rooms; no cached block is evicted while a free block without a hash exists, except a block of the
    growing request's own room.
    """

    settings: AllocatorSettings = AllocatorSettings()

    def __init__(self, num_gpu_blocks: int, enable_caching: bool, hash_block_size: int, *args: Any, **kwargs: Any):
        super().__init__(num_gpu_blocks, enable_caching, hash_block_size, *args, **kwargs)
        for block in self.blocks:  # the stock queue built by super() is replaced by our structures
            block.prev_free_block = block.next_free_block = None
        self._lru = FreeKVCacheBlockQueue([])
        self._in_lru = bytearray(num_gpu_blocks)
        self._free_mask = bytearray(b"\x01") * num_gpu_blocks
        self._free_mask[0] = 0  # the null block
        self._num_free = num_gpu_blocks - 1
        # Reservations are never adjacent (each starts right after its owner's allocated tail): the one
        # holding a block is found by scanning the mask to its end (C speed) and `_owner_at` (keyed by
        # the end, which decode growth, taking blocks from the front, never moves); the largest is on
        # top of `_reservation_heap` (lazy: entries are re-checked when they surface).
        self._reserved_mask = bytearray(num_gpu_blocks)
        self._owner_at: dict[int, str] = {}  # reservation end (exclusive) -> request id
        self._reservation_heap: list[tuple[int, int, str]] = []  # (-length when pushed, serial, rid)
        self._heap_serial = 0
        self.free_block_queue = _FreeQueueView(self)  # type: ignore[assignment]
        self._hits = [0] * num_gpu_blocks
        # LRU age: `_serial[i]` is the count of cached blocks freed before block i was (set when it joins
        # `_lru`); a free cached block is among the k least recently used ones if its serial is less than
        # the LRU head's plus k (blocks leaving the LRU out of order only make it older).
        self._serial = array("q", bytes(8 * num_gpu_blocks))
        self._lru_clock = 0
        # Growth rooms (once every free block is cached): request id -> [next, end), old never-hit cached
        # blocks right after the request's last block, taken out of `_lru` so that no other allocation
        # opens a region there; they stay free and cached (a prefix hit cuts the room) and go back to
        # the LRU head when the room is dropped. Rooms are never adjacent (an allocated block ends each).
        self._room_mask = bytearray(num_gpu_blocks)
        self._rooms: dict[str, list[int]] = {}
        self._room_owner_at: dict[int, str] = {}  # room end (exclusive) -> request id
        # request id -> its placement, for each request with blocks reserved right after its last block
        # ([res_next, res_end) of the placement)
        self._reservations: dict[str, ReferencePlacement] = {}
        # Who is allocating now (set by the KVCacheManager wrappers), and per-request placement state.
        self._current: ReferencePlacement | None = None
        self._placements: dict[str, ReferencePlacement] = {}
        self._kv_manager: Any = None
        self._mean_output: float | None = None  # moving mean of finished requests' output tokens
        self.counters = {
            "evictions_total": 0,
            "compactions_total": 0,
            "blocks_moved_total": 0,
            "prefix_cache_queries_total": 0,
            "prefix_cache_hits_total": 0,
        }
        self._use_compiled_parts(True)

    def _use_compiled_parts(self, compiled: bool) -> None:
        """The fresh pool's two run structures (every block but the null one placeable, none cached), its
        free pass (`_compiled_release`: `_free_runs.release_blocks`, the same steps as the Python pass, for
        caching on; None: the Python pass), its placement record type and its decode growth step in a
        reservation (`_grow_in_reservation`; None: the Python fast path): the compiled ones where they
        were built, or (compiled False) the Python references."""
        runs_type = FreeRuns if compiled else ReferenceFreeRuns
        self._cold = runs_type(self.num_gpu_blocks)
        self._runs = runs_type(self.num_gpu_blocks)
        self._runs.add_range(1, self.num_gpu_blocks)
        self._compiled_release = compiled_release_blocks() if compiled and self.enable_caching else None
        self._placement_type = Placement if compiled else ReferencePlacement
        self._grow_in_reservation = (compiled_reservation_growth(self.blocks, self._free_mask, self._reserved_mask)
                                     if compiled else None)

    def use_python_references(self) -> None:
        """Put the Python references of FreeRuns, the free pass, the placement record and reservation
        growth in place of the compiled ones (a fresh pool only: for benchmarks and tests that compare the
        two)."""
        assert self._num_free == self.num_gpu_blocks - 1 and not self._placements, "only a fresh pool"
        self._use_compiled_parts(False)

    # ---- vLLM BlockPool interface --------------------------------------------------------------

    def get_num_free_blocks(self) -> int:
        return self._num_free

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        placement = self._current
        if num_blocks == 1 and placement is not None and not self.metrics_collector:
            # Fast paths of decode growth (the steps of `_take`, inlined: the hottest path of the pool).
            grow = self._grow_in_reservation
            if grow is not None:
                taken = grow(placement)  # the first branch below, compiled (its last block aside)
                if taken is not None:
                    self._num_free -= 1
                    return taken
            block_id = placement.tail + 1
            res_end = placement.res_end
            if res_end and placement.res_next == block_id:
                # The next block of the request's own reservation (a free block: the count allows it).
                # Reserved blocks carry no hash and are in no other structure.
                self._reserved_mask[block_id] = 0
                if block_id + 1 == res_end:
                    self._end_reservation(placement.request.request_id)
                    del self._owner_at[block_id + 1]
                else:
                    placement.res_next = block_id + 1
                self._free_mask[block_id] = 0
                self._num_free -= 1
                placement.tail = block_id
                placement.held += 1
                block = self.blocks[block_id]
                block.ref_cnt = 1
                return [block]
            if not self._num_free:
                raise ValueError("Cannot get 1 free blocks from the pool")
            rooms = self._rooms
            room = rooms.get(placement.request.request_id) if not res_end and rooms else None
            if room is not None and room[0] == block_id:
                # The next block of the request's own room (even while placeable blocks are free): room
                # blocks are free, cached, out of the LRU (`_consume_room` for one block, inlined).
                self._room_mask[block_id] = 0
                if block_id + 1 == room[1]:
                    del rooms[placement.request.request_id]
                    del self._room_owner_at[block_id + 1]
                else:
                    room[0] = block_id + 1
                found = True
            elif res_end or self._runs.num_free or not self._reservations:
                found = False
            else:
                # Only reserved empty blocks are left and they go before any cached block: the far end
                # of the newest reservation (its owner keeps the blocks next to its last one).
                owner, holder = next(reversed(self._reservations.items()))
                block_id = holder.res_end - 1
                self._reserved_mask[block_id] = 0
                del self._owner_at[block_id + 1]
                if block_id == holder.res_next:
                    self._end_reservation(owner)
                else:
                    holder.res_end = block_id
                    self._owner_at[block_id] = owner
                found = True
            if found:
                block = self.blocks[block_id]
                self._free_mask[block_id] = 0
                self._num_free -= 1
                if block._block_hash is not None:
                    if self._in_lru[block_id]:
                        self._uncache_free(block)
                    self._maybe_evict_cached_block(block)
                placement.tail = block_id
                placement.held += 1
                block.ref_cnt = 1
                return [block]
        if num_blocks > self._num_free:
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        blocks = self.blocks
        metrics = self.metrics_collector
        ret = [blocks[i] for i in self._take(num_blocks)]
        for block in ret:
            if metrics:
                metrics.on_block_allocated(block)
            assert block.ref_cnt == 0
            block.ref_cnt = 1
        return ret

    def touch(self, blocks: Sequence[KVCacheBlock]) -> None:
        hits = self._hits
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self._take_specific(block.block_id)
            block.ref_cnt += 1
            if not block.is_null:
                hits[block.block_id] += 1
            if self.metrics_collector:
                self.metrics_collector.on_block_accessed(block)
        placement = self._current
        if placement is not None and blocks:
            last = blocks[-1]
            if not last.is_null:
                placement.tail = last.block_id
            placement.held += len(blocks)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        if self._compiled_release is not None:
            freed, cached, self._lru_clock = self._compiled_release(
                ordered_blocks, self._free_mask, self._in_lru, self._serial, self._hits, self._lru_clock,
                self._runs, self._cold)
            self._num_free += freed
            if cached:
                self._lru.append_n(cached)
            return
        empty_ids: list[int] = []
        cached: list[KVCacheBlock] = []
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0 and not block.is_null:
                if block._block_hash is None:
                    empty_ids.append(block.block_id)
                else:
                    cached.append(block)
        if empty_ids or cached:
            self._release_many(empty_ids, cached)

    def evict_blocks(self, block_ids: set[int]) -> None:
        for block_id in block_ids:
            assert block_id < len(self.blocks)
            block = self.blocks[block_id]
            free_cached = self._free_mask[block_id] and block.block_hash is not None
            if self._room_mask[block_id]:
                self._cut_room(block_id)  # leaves the block out of the LRU
            elif free_cached:
                self._uncache_free(block)
            if self._maybe_evict_cached_block(block) and free_cached:
                self._make_placeable(block_id)

    def reset_prefix_cache(self) -> bool:
        if self.get_num_free_blocks() != self.num_gpu_blocks - 1:
            return super().reset_prefix_cache()  # refused: blocks in use
        for rid in list(self._rooms):
            self._drop_room(rid)
        cached_free = self._lru_blocks()
        if not super().reset_prefix_cache():
            return False
        for block in cached_free:
            self._uncache_free(block)
            self._make_placeable(block.block_id)
        self._hits = [0] * self.num_gpu_blocks
        return True

    def _maybe_evict_cached_block(self, block: KVCacheBlock) -> bool:
        evicted = BlockPool._maybe_evict_cached_block(self, block)
        if evicted:
            self.counters["evictions_total"] += 1
        self._hits[block.block_id] = 0
        return evicted

    # ---- free-block bookkeeping ----------------------------------------------------------------

    def _lru_blocks(self) -> list[KVCacheBlock]:
        """Free cached blocks, least recently used first (O(n); tests and reset)."""
        out = []
        queue = self._lru
        node = queue.fake_free_list_head.next_free_block
        while node is not queue.fake_free_list_tail:
            out.append(node)
            node = node.next_free_block
        return out

    def _uncache_free(self, block: KVCacheBlock) -> None:
        self._lru.remove(block)
        self._in_lru[block.block_id] = 0
        if self._cold.contains(block.block_id):
            self._cold.remove(block.block_id)

    def _make_placeable(self, block_id: int) -> None:
        if not self._reserved_mask[block_id] and not self._runs.contains(block_id):
            self._runs.add(block_id)

    def _release(self, block: KVCacheBlock) -> None:
        """A block whose last reference went away becomes free (cached blocks stay findable)."""
        if block.block_hash is None:
            self._release_many([block.block_id], [])
        else:
            self._release_many([], [block])

    def _release_many(self, empty_ids: list[int], cached: list[KVCacheBlock]) -> None:
        """Free blocks: empty ones become placeable (merged into runs), cached ones join the most recent
        end of the LRU order."""
        if cached and not self.enable_caching:
            for block in cached:
                self._maybe_evict_cached_block(block)
                empty_ids.append(block.block_id)
            cached = []
        free_mask = self._free_mask
        self._num_free += len(empty_ids) + len(cached)
        for block_id in empty_ids:
            free_mask[block_id] = 1
        if empty_ids:
            self._runs.add_many(empty_ids)
        if cached:
            in_lru = self._in_lru
            serial = self._serial
            hits = self._hits
            clock = self._lru_clock
            cold: list[int] = []
            for block in cached:
                block_id = block.block_id
                free_mask[block_id] = 1
                in_lru[block_id] = 1
                serial[block_id] = clock
                clock += 1
                if not hits[block_id]:
                    cold.append(block_id)
            if cold:
                self._cold.add_many(cold)
            self._lru_clock = clock
            self._lru.append_n(cached)

    def _claim_old_cold(self, block_id: int, need: int, limit: int, out: list[int]) -> int:
        """Claim the old (LRU serial below `limit`), never-hit cached blocks from `block_id` on, consecutive,
        at most `need`, appending them to `out`; returns how many."""
        cold, serial, last_id = self._cold, self._serial, self.num_gpu_blocks - 1
        got = 0
        while got < need and 0 < block_id <= last_id and cold.contains(block_id) and serial[block_id] < limit:
            self._claim(block_id)
            out.append(block_id)
            block_id += 1
            got += 1
        return got

    def _claim(self, block_id: int) -> None:
        """Mark a free block allocated; it must already be out of `_runs`, unreserved and out of any
        room. Evicts its prefix-cache entry (allocation overwrites it)."""
        block = self.blocks[block_id]
        self._free_mask[block_id] = 0
        self._num_free -= 1
        if block.block_hash is not None:
            if self._in_lru[block_id]:
                self._uncache_free(block)
            self._maybe_evict_cached_block(block)

    def _take_specific(self, block_id: int) -> None:
        """Take one given free block out of the free structures, keeping its hash (a prefix hit)."""
        block = self.blocks[block_id]
        if self._reserved_mask[block_id]:
            self._unreserve(block_id)
        elif self._room_mask[block_id]:
            self._cut_room(block_id)
        elif self._runs.contains(block_id):
            self._runs.remove(block_id)
        if self._in_lru[block_id]:
            self._uncache_free(block)
        self._free_mask[block_id] = 0
        self._num_free -= 1

    def _unreserve(self, block_id: int) -> None:
        """Cut the reservation holding `block_id` (which leaves) there: its owner keeps the part before
        it, the part after it becomes placeable."""
        end = self._reserved_mask.find(0, block_id)
        end = self.num_gpu_blocks if end < 0 else end
        rid = self._owner_at.pop(end)
        holder = self._reservations[rid]
        self._reserved_mask[block_id:end] = bytes(end - block_id)
        if block_id == holder.res_next:
            self._end_reservation(rid)
        else:
            holder.res_end = block_id
            self._owner_at[block_id] = rid
        if block_id + 1 < end:  # reserved blocks never carry a hash
            self._runs.add_run(block_id + 1, end)

    def _consume_reservation(self, rid: str, holder: ReferencePlacement, got: int) -> None:
        """The owner (`holder`, the placement of `rid`) takes the first `got` blocks of its reservation."""
        nxt, end = holder.res_next, holder.res_end
        reserved_mask = self._reserved_mask
        for block_id in range(nxt, nxt + got):
            reserved_mask[block_id] = 0
        if nxt + got == end:
            self._end_reservation(rid)
            del self._owner_at[end]
        else:
            holder.res_next = nxt + got

    def _reserve(self, rid: str, start: int, end: int) -> None:
        """Reserve [start, end) (free, out of `_runs`) for `rid` (a placed request), replacing its
        reservation if any."""
        self._drop_reservation(rid)
        holder = self._reservations[rid] = self._placements[rid]
        holder.res_next, holder.res_end = start, end
        self._owner_at[end] = rid
        self._reserved_mask[start:end] = b"\x01" * (end - start)
        self._heap_serial += 1
        heap = self._reservation_heap
        heapq.heappush(heap, (start - end, self._heap_serial, rid))
        if len(heap) > 2 * len(self._reservations) + 64:  # drop dead entries (amortised O(1))
            heap[:] = [(h.res_next - h.res_end, i, r) for i, (r, h) in enumerate(self._reservations.items())]
            heapq.heapify(heap)
            self._heap_serial = len(heap)

    def _end_reservation(self, rid: str) -> None:
        self._reservations.pop(rid).res_end = 0

    def _largest_reservation(self) -> str:
        """Owner of the largest reservation (lazy heap: stale entries are refreshed or dropped)."""
        heap = self._reservation_heap
        while True:
            negative_length, _, rid = heap[0]
            holder = self._reservations.get(rid)
            negative_now = holder.res_next - holder.res_end if holder is not None else 0
            if holder is not None and negative_now == negative_length:
                return rid
            heapq.heappop(heap)
            if holder is not None:  # shrank (re-file at its size), or pushed again by a newer entry: keep one
                self._heap_serial += 1
                heapq.heappush(heap, (negative_now, self._heap_serial, rid))

    def _return_to_runs(self, block_id: int) -> None:
        if self._placeable(block_id):
            self._runs.add(block_id)

    def _placeable(self, block_id: int) -> bool:
        return self.blocks[block_id].block_hash is None

    def _drop_reservation(self, rid: str | None) -> None:
        holder = self._reservations.get(rid) if rid is not None else None
        if holder is not None:
            nxt, end = holder.res_next, holder.res_end
            self._end_reservation(rid)
            del self._owner_at[end]
            self._reserved_mask[nxt:end] = bytes(end - nxt)
            self._runs.add_run(nxt, end)  # reserved blocks never carry a hash

    # ---- placement -----------------------------------------------------------------------------

    def _expected_more(self, held: int, num: int, request: Any = None) -> int:
        """Blocks worth reserving beyond `num` for the growth of `request` (default: the current one)."""
        if request is None:
            if self._current is None:
                return 0
            request = self._current.request
        block_size = self.hash_block_size
        max_tokens = getattr(request, "max_tokens", None) or 0
        most = max(0, -(-(request.num_prompt_tokens + max_tokens) // block_size) - held - num)
        if self._mean_output is None:
            extra = most
        else:
            # At least the learned expectation (finished requests' mean output, doubled once a request
            # is past it), more when free space allows (a fair share per running request).
            generated = getattr(request, "num_output_tokens", 0)
            expected_output = max(int(self._mean_output), 2 * generated)
            learned = -(-(request.num_prompt_tokens + expected_output) // block_size) - held - num
            fair_share = self._num_free // (len(self._placements) + 1)
            extra = min(most, max(learned, fair_share, 0))
        cap = self.settings.growth_reserve_max_blocks
        return extra if cap is None else min(extra, cap)

    def _take(self, num: int) -> list[int]:
        """Choose and claim `num` free block ids for the current request (see the module docstring)."""
        out: list[int] = []
        placement = self._current
        rid = placement.request.request_id if placement is not None else None
        tail = placement.tail if placement is not None else -2
        held = placement.held if placement is not None else 0
        runs = self._runs
        # 1. own reservation
        if placement is not None and placement.res_end:
            nxt, end = placement.res_next, placement.res_end
            if nxt == tail + 1:
                got = min(num, end - nxt)
                self._consume_reservation(rid, placement, got)
                for block_id in range(nxt, nxt + got):
                    self._claim(block_id)
                out.extend(range(nxt, nxt + got))
            else:  # stale: its owner's table moved on
                self._drop_reservation(rid)
        need = num - len(out)
        extra = -1  # blocks expected beyond this allocation; computed when first needed
        if need and runs.num_free:
            last = out[-1] if out else tail
            extra = self._expected_more(held + len(out), need) if rid is not None else 0
            # 2. extend own run, else 3. best fit for the expected size, else for what is needed now
            start = last + 1
            end = runs.run_at(start) if last >= 0 else None
            if end is None:
                start = runs.best_fit(need + extra)
                if start is None and runs.num_free:
                    # Nothing holds the expected size: the largest run leaves the most room to grow.
                    start = runs.largest()[0]  # type: ignore[index]
                end = runs.run_at(start) if start is not None else None
            if end is not None:
                got = min(need, end - start)
                reserve = min(extra, end - start - got) if got == need else 0
                runs.take_prefix(start, got + reserve)
                for block_id in range(start, start + got):
                    self._claim(block_id)
                out.extend(range(start, start + got))
                if reserve:
                    self._reserve(rid, start + got, start + got + reserve)  # type: ignore[arg-type]
            # 3b. fewest runs: largest first
            while len(out) < num and runs.num_free:
                start, length = runs.largest()  # type: ignore[misc]
                got = min(num - len(out), length)
                runs.take_prefix(start, got)
                for block_id in range(start, start + got):
                    self._claim(block_id)
                out.extend(range(start, start + got))
        # 4. other requests' reservations: split the largest; the far part becomes this request's
        while len(out) < num and self._reservations:
            owner = self._largest_reservation()
            holder = self._reservations[owner]
            nxt, end = holder.res_next, holder.res_end
            need = num - len(out)
            if need >= end - nxt:
                cut, keep = nxt, 0
            else:
                extra = self._expected_more(held + len(out), need) if rid is not None else 0
                cut = min(max(nxt + (end - nxt) // 2, end - need - extra), end - need)
                keep = end - cut - need if rid is not None else 0
            got = end - cut - keep
            self._reserved_mask[cut:end] = bytes(end - cut)
            del self._owner_at[end]
            if cut == nxt:
                self._end_reservation(owner)
            else:
                holder.res_end = cut
                self._owner_at[cut] = owner
            for block_id in range(cut, cut + got):
                self._claim(block_id)
            out.extend(range(cut, cut + got))
            if got < end - cut:  # the thief keeps the rest of its part as its own reservation
                if keep and rid is not None:
                    self._reserve(rid, cut + got, end)
                else:
                    for block_id in range(cut + got, end):
                        self._return_to_runs(block_id)
        # 5. evict cached blocks (no free block without a hash is left): the old ones right after the
        # request's last block, else a region opened where the least recently used blocks are
        if len(out) < num:
            last = out[-1] if out else tail
            need = num - len(out)
            if extra < 0 or len(out):
                extra = self._expected_more(held + len(out), need) if rid is not None else 0
            size = need + extra
            out.extend(self._evict_contiguous(need, last, size, rid))
        if placement is not None:
            placement.tail = out[-1]
            placement.held = held + num
        return out

    def _age_limit(self) -> int:
        """Serial below which a free cached block is old enough to be evicted out of LRU order: among
        the `eviction_age_fraction` least recently used free cached blocks (at least the LRU head)."""
        queue = self._lru
        head = queue.fake_free_list_head.next_free_block
        if head is queue.fake_free_list_tail:
            return -1
        return self._serial[head.block_id] + max(1, int(self.settings.eviction_age_fraction * queue.num_free_blocks))

    def _evict_contiguous(self, need: int, last: int, size: int, rid: str | None) -> list[int]:
        """Claim `need` free cached blocks (no free block without a hash is left) in as few runs as LRU
        age allows, for a request whose last block is `last` and that expects `size` more blocks.

        A block is taken out of LRU order only if it is old (`_age_limit`) and was never hit (shared
        prefixes and preempted requests' blocks are left to plain LRU order). In order: the request's own
        room; old blocks right after `last`; the smallest run of never-hit cached blocks that holds the
        expected size (else what is needed now) and starts with an old block; regions opened at the LRU
        head, extended down over old blocks so that a region of the expected size ends at the head (its
        blocks freed together with the head, if the request that freed them was contiguous); plain LRU
        (`_pick_eviction`) when the head was hit. When the LRU holds no block (every free block lies in a
        room), the rooms go back to the LRU. What is left of `size` afterwards becomes the request's room."""
        out: list[int] = []
        in_lru, hits, serial = self._in_lru, self._hits, self._serial
        limit = self._age_limit()
        last_id = self.num_gpu_blocks - 1
        room = self._rooms.get(rid) if rid is not None else None
        if room is not None:
            nxt, end = room
            if nxt == last + 1:
                got = min(need, end - nxt)
                self._consume_room(rid, room, got)  # type: ignore[arg-type]
                for block_id in range(nxt, nxt + got):
                    self._claim(block_id)
                out.extend(range(nxt, nxt + got))
                need -= got
                last = nxt + got - 1
            else:  # stale: its owner's table moved on
                self._drop_room(rid)
        need -= self._claim_old_cold(last + 1, need, limit, out)
        cold = self._cold
        while need:  # runs of cold blocks whose first block is old
            start = cold.best_fit_older(size - len(out), serial, limit)
            if start is None:
                start = cold.best_fit_older(need, serial, limit)
            if start is None:
                break
            need -= self._claim_old_cold(start, need, limit, out)
        queue = self._lru
        while need:
            head = queue.fake_free_list_head.next_free_block
            if head is queue.fake_free_list_tail:
                self._drop_room(next(iter(self._rooms)))
                limit = self._age_limit()
                continue
            start = head.block_id
            if hits[start]:
                block = self._pick_eviction(out[-1] if out else last)
                self._claim(block.block_id)
                out.append(block.block_id)
                need -= 1
                continue
            lowest = max(1, start - (need + size) + 1)
            while start > lowest and in_lru[start - 1] and not hits[start - 1] and serial[start - 1] < limit:
                start -= 1
            block_id = start
            while need and block_id <= last_id and in_lru[block_id] and (
                block_id == head.block_id or (not hits[block_id] and serial[block_id] < limit)
            ):
                self._claim(block_id)
                out.append(block_id)
                block_id += 1
                need -= 1
        size -= len(out)
        if rid is not None and size > 0 and out:
            self._open_room(rid, out[-1] + 1, size, limit)
        return out

    def _open_room(self, rid: str, start: int, size: int, limit: int) -> None:
        """Make the old, never-hit cached blocks from `start` (at most `size`) `rid`'s room."""
        in_lru, hits, serial, blocks = self._in_lru, self._hits, self._serial, self.blocks
        end = start
        stop = min(start + size, self.num_gpu_blocks)
        remove = self._lru.remove
        while end < stop and in_lru[end] and not hits[end] and serial[end] < limit:
            remove(blocks[end])
            in_lru[end] = 0
            end += 1
        if end > start:
            self._cold.remove_range(start, end)
            self._drop_room(rid)
            self._rooms[rid] = [start, end]
            self._room_owner_at[end] = rid
            self._room_mask[start:end] = b"\x01" * (end - start)

    def _consume_room(self, rid: str, room: list[int], got: int) -> None:
        """The owner takes the first `got` blocks of its room."""
        nxt, end = room
        self._room_mask[nxt : nxt + got] = bytes(got)
        if nxt + got == end:
            del self._rooms[rid]
            del self._room_owner_at[end]
        else:
            room[0] = nxt + got

    def _drop_room(self, rid: str | None) -> None:
        """Give `rid`'s room back to the LRU, at its head (its blocks were the oldest when taken)."""
        room = self._rooms.pop(rid, None) if rid is not None else None
        if room is not None:
            self._return_room_blocks(room[0], room[1])
            del self._room_owner_at[room[1]]

    def _return_room_blocks(self, start: int, end: int) -> None:
        if end > start:
            self._room_mask[start:end] = bytes(end - start)
            self._in_lru[start:end] = b"\x01" * (end - start)
            self._lru.prepend_n(self.blocks[start:end])
            self._cold.add_run(start, end)  # room blocks were never hit (a hit cuts the room)

    def _cut_room(self, block_id: int) -> None:
        """A room block leaves (prefix hit, compaction): the owner keeps the part before it, the part
        after it goes back to the LRU."""
        end = self._room_mask.find(0, block_id)
        end = self.num_gpu_blocks if end < 0 else end
        rid = self._room_owner_at.pop(end)
        room = self._rooms[rid]
        self._room_mask[block_id] = 0
        self._return_room_blocks(block_id + 1, end)
        if block_id == room[0]:
            del self._rooms[rid]
        else:
            room[1] = block_id
            self._room_owner_at[block_id] = rid

    def _pick_eviction(self, after: int) -> KVCacheBlock:
        """Among the `eviction_window` least recently used cached blocks: fewest hits, then the block
        right after `after`, then fewest free neighbours, then least recent."""
        free_mask = self._free_mask
        last_id = self.num_gpu_blocks - 1
        window = self.settings.eviction_window
        best, best_key = None, None
        position = 0
        queue = self._lru
        node = queue.fake_free_list_head.next_free_block
        while position < window and node is not queue.fake_free_list_tail:
            block_id = node.block_id
            free_neighbours = (block_id > 0 and free_mask[block_id - 1]) + (
                block_id < last_id and free_mask[block_id + 1]
            )
            key = (min(self._hits[block_id], _HIT_CLASS_CAP), block_id != after + 1, free_neighbours, position)
            if best_key is None or key < best_key:
                best, best_key = node, key
            node = node.next_free_block
            position += 1
        assert best is not None, "no evictable block"
        return best

    # ---- request context (called by the KVCacheManager wrappers) -------------------------------

    def begin_request(self, request: Any) -> None:
        try:
            placement = request._tinyserve_placement
        except AttributeError:
            placement = None
        if placement is None or placement.pool is not self:  # none yet, another pool's, or forgotten
            placement = self._placements.get(request.request_id)
            if placement is None:
                placement = self._placements[request.request_id] = self._placement_type(self, request)
            try:
                setattr(request, _PLACEMENT_ATTR, placement)
            except AttributeError:  # a request type without room for it: the dict lookup every time
                pass
        self._current = placement

    def end_request(self) -> None:
        self._current = None

    @property
    def _requests(self) -> dict[str, Any]:
        """Running (or allocating) requests by id."""
        return {rid: placement.request for rid, placement in self._placements.items()}

    def forget_request(self, request_id: str) -> None:
        """The request's blocks went back (finished, aborted or preempted): drop its placement state.
        (Only placed requests hold reservations and rooms: both are made for the current placement.)"""
        placement = self._placements.get(request_id)
        if placement is None:
            return
        if placement.res_end:
            self._drop_reservation(request_id)
        if request_id in self._rooms:
            self._drop_room(request_id)
        del self._placements[request_id]
        request = placement.request
        placement.request = placement.pool = None  # a request that comes back (preempted) gets a new one
        if request is not None and request.is_finished():
            alpha = self.settings.output_mean_weight
            produced = float(request.num_output_tokens)
            mean = self._mean_output
            self._mean_output = produced if mean is None else mean + alpha * (produced - mean)

    def protect_for_resume(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A preempted request's cached blocks will be hit when it resumes: count that use now (eviction
        windows wider than 1 then take less-used candidates first)."""
        hits = self._hits
        for block in blocks:
            if block.block_hash is not None and not block.is_null:
                hits[block.block_id] += 1

    def record_prefix_lookup(self, num_tokens: int, num_hits: int) -> None:
        self.counters["prefix_cache_queries_total"] += num_tokens
        self.counters["prefix_cache_hits_total"] += num_hits

    def block_moved(self, request_id: str, src: int, dst: int) -> None:
        """Compaction moved `request_id`'s block `src` to `dst`. When `src` was the request's last block, the
        reservation and growth room that followed it no longer do (a free block would open in front of
        them): both go back, and `dst` is the tail growth extends from. The request's table changed in
        place: its scan is read again."""
        placement = self._placements.get(request_id)
        if placement is None:
            return
        if placement.scan is not None:
            placement.scan.forget()
        if placement.tail == src:
            placement.tail = dst
            self._drop_reservation(request_id)
            self._drop_room(request_id)

    def table_scan(self, request_id: str) -> TableScan | None:
        """What compaction has read of a running request's table (None for a request the pool does not
        place for)."""
        placement = self._placements.get(request_id)
        if placement is None:
            return None
        if placement.scan is None:
            placement.scan = TableScan()
        return placement.scan

    def gather_destination(self, num: int) -> int | None:
        """Start of `num` consecutive free blocks that compaction may move a request's blocks into (then
        `claim_block` each): the smallest placeable run that holds them, else the smallest run of
        never-hit cached blocks, whatever their age (claiming evicts them out of LRU order: a workload that
        comes back to its own KV later would lose those hits, which is why gathering is opt-in)."""
        start = self._runs.best_fit(num)
        return start if start is not None else self._cold.best_fit(num)

    def gatherable(self, block_id: int) -> bool:
        """Whether compaction may move a block into free block `block_id`: placeable, or never-hit cached
        (as `gather_destination`'s runs)."""
        return self._runs.contains(block_id) or self._cold.contains(block_id)

    def claim_block(self, block_id: int) -> None:
        """Allocate one given free block (compaction's destinations); its cache entry, if any, is evicted."""
        self._take_specific(block_id)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            self._maybe_evict_cached_block(block)

    # ---- inspection ----------------------------------------------------------------------------

    def placeable_mask(self) -> bytearray:
        """1 per free block that placement may hand out now (no hash, unreserved)."""
        return self._runs._member

    @property
    def free_mask(self) -> bytearray:
        """1 per free block (vLLM's sense: allocatable), 0 otherwise; the null block is never free."""
        return self._free_mask

    def check_invariants(self) -> None:
        """Assert the invariants of the free structures (O(num_blocks); for tests)."""
        spans = {rid: (holder.res_next, holder.res_end) for rid, holder in self._reservations.items()}
        reserved = {i for nxt, end in spans.values() for i in range(nxt, end)}
        assert reserved == {i for i, r in enumerate(self._reserved_mask) if r}
        assert self._owner_at == {end: rid for rid, (_, end) in spans.items()}
        for rid, placement in self._placements.items():
            assert placement.pool is self and placement.request.request_id == rid
            cached = getattr(placement.request, _PLACEMENT_ATTR, placement)  # or another pool's, if shared
            assert cached is placement or cached.pool is not self
            assert (placement.res_end != 0) == (self._reservations.get(rid) is placement)
        for rid, (nxt, end) in spans.items():  # never adjacent: the owner scan finds starts
            assert nxt < end and self._placements.get(rid) is self._reservations[rid]
            assert nxt == 0 or not self._reserved_mask[nxt - 1]
            assert any(entry[2] == rid and -entry[0] >= end - nxt for entry in self._reservation_heap)
        roomed = {i for nxt, end in self._rooms.values() for i in range(nxt, end)}
        assert roomed == {i for i, r in enumerate(self._room_mask) if r}
        assert self._room_owner_at == {room[1]: rid for rid, room in self._rooms.items()}
        for nxt, end in self._rooms.values():  # never adjacent: the owner scan finds starts
            assert nxt < end and (nxt == 0 or not self._room_mask[nxt - 1])
        assert not roomed & reserved
        lru = {b.block_id for b in self._lru_blocks()}
        assert len(lru) == self._lru.num_free_blocks and not lru & roomed
        cold = {i for start, end in self._cold.runs() for i in range(start, end)}
        assert {i for i in lru if not self._hits[i]} == cold
        cached = lru | roomed
        for block in self.blocks:
            i = block.block_id
            free = block.ref_cnt == 0 and not block.is_null
            assert self._free_mask[i] == free, block
            assert (i in cached) == (free and block.block_hash is not None), block
            assert (self._in_lru[i] != 0) == (i in lru)
            placeable = free and i not in reserved and self._placeable(i)
            assert self._runs.contains(i) == placeable, (block, self._hits[i], i in reserved)
            assert not (i in reserved and (not free or block.block_hash is not None))
            if block.block_hash is not None:
                assert self.cached_block_hash_to_block.contain(block.block_hash, i)
        assert self._num_free == sum(self._free_mask)

    def stats(self) -> dict[str, float]:
        from tinyserve.engine.fragmentation import pool_kv_stats

        return pool_kv_stats(self)


# ---- installation ------------------------------------------------------------------------------

_originals: dict[str, Any] = {}


def _with_request(method: Any) -> Any:
    @functools.wraps(method)
    def allocate_slots(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        pool = self.block_pool
        if not isinstance(pool, BestFitBlockPool):
            return method(self, request, *args, **kwargs)
        pool._kv_manager = self
        pool.begin_request(request)
        try:
            return method(self, request, *args, **kwargs)
        finally:
            pool.end_request()

    return allocate_slots


def _forgetting(method: Any) -> Any:
    @functools.wraps(method)
    def release(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        pool = self.block_pool
        if not isinstance(pool, BestFitBlockPool):
            return method(self, request, *args, **kwargs)
        if not request.is_finished():  # preemption: vLLM frees before marking the request PREEMPTED
            pool.protect_for_resume(self.coordinator.single_type_managers[0].req_to_blocks.get(request.request_id, ()))
        result = method(self, request, *args, **kwargs)
        pool.forget_request(request.request_id)
        return result

    return release


def _counting_prefix(method: Any) -> Any:
    @functools.wraps(method)
    def record_prefix_cache_stats(self: Any, request: Any, num_hits: int) -> Any:
        pool = self.block_pool
        if isinstance(pool, BestFitBlockPool) and self.prefix_cache_lookup_enabled(request):
            pool.record_prefix_lookup(request.num_tokens, num_hits)
        return method(self, request, num_hits)

    return record_prefix_cache_stats


def install_block_pool(settings: AllocatorSettings) -> None:
    """Make vLLM's KV cache coordinator build `BestFitBlockPool` and tell it who allocates (idempotent)."""
    import vllm.v1.core.kv_cache_coordinator as coordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    BestFitBlockPool.settings = settings
    if _originals:
        return
    _originals["BlockPool"] = coordinator.BlockPool
    for name, wrap in (
        ("allocate_slots", _with_request),
        ("free", _forgetting),
        ("pop_blocks_for_free", _forgetting),
        ("record_prefix_cache_stats", _counting_prefix),
    ):
        _originals[name] = getattr(KVCacheManager, name)
        setattr(KVCacheManager, name, wrap(_originals[name]))
    coordinator.BlockPool = BestFitBlockPool
    if (settings.compaction_scatter_threshold is not None or settings.force_compaction_every_step
            or settings.compaction_gather_runs is not None):
        from tinyserve.engine.compaction import install_compaction

        install_compaction(settings)


def uninstall_block_pool() -> None:
    """Put vLLM's own classes back (tests and benchmarks that compare in one process)."""
    import vllm.v1.core.kv_cache_coordinator as coordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if not _originals:
        return
    coordinator.BlockPool = _originals.pop("BlockPool")
    for name in list(_originals):
        setattr(KVCacheManager, name, _originals.pop(name))
