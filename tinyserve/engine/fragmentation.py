"""Fragmentation analysis of a KV block pool, with the definitions of DESIGN.md ("Honest definitions").

- token-slot utilisation = tokens held / (blocks held × block_size), summed over running requests
  (a block shared by two requests counts for each); the waste is the slack in each request's last block.
- effective capacity = logical tokens of running requests / physical token slots in use (distinct
  allocated blocks × block_size); above 1 with prefix sharing.
- free runs, largest free run, free-space scatter = 1 − largest_free_run / free_blocks, where *free* is
  vLLM's sense (allocatable: ref_cnt == 0, cached blocks included, null block excluded).
- runs per request: maximal stretches of a request's block table whose ids ascend by one.
- prefix-cache queries and hits are counted in tokens, as vLLM's PrefixCacheStats counts them (queries =
  request tokens at lookup, hits = tokens found in the cache).

`kv_snapshot` works for any pool (vLLM's or TinyServe's) given a free mask and block tables, so a
benchmark measures both pools with one function; `pool_kv_stats` is what `BestFitBlockPool.stats()`
returns through the stats channel. The pool keeps its free mask, counters and per-request state
incrementally; a snapshot then costs O(num_blocks) vectorised (free runs) plus O(blocks held) (runs per
request) — it runs when asked (scrape, benchmark sample), never on the allocation path.
`analyse_trace` is the one-shot analysis of a recorded allocation trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "STATS_KEYS",
    "free_run_lengths",
    "free_space_scatter",
    "count_runs",
    "kv_snapshot",
    "pool_kv_stats",
    "pool_free_mask",
    "manager_block_tables",
    "analyse_trace",
]

STATS_KEYS = (
    "num_blocks",
    "num_free_blocks",
    "usage",
    "block_size",
    "token_slot_utilisation",
    "effective_capacity",
    "free_runs",
    "largest_free_run",
    "free_space_scatter",
    "runs_per_request_mean",
    "runs_per_request_max",
    "evictions_total",
    "compactions_total",
    "blocks_moved_total",
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
)


def free_run_lengths(free_mask: Any) -> np.ndarray:
    """Lengths of the maximal runs of 1s in a 0/1 mask (bytes, bytearray or array), in address order."""
    mask = np.frombuffer(bytes(free_mask), dtype=np.uint8) if not isinstance(free_mask, np.ndarray) else free_mask
    padded = np.concatenate(([0], mask.astype(np.int8, copy=False), [0]))
    edges = np.diff(padded)
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


def free_space_scatter(run_lengths: np.ndarray) -> float:
    """1 - largest free run / free blocks (0 when nothing is free), from `free_run_lengths`."""
    free_blocks = int(run_lengths.sum())
    return 1.0 - int(run_lengths.max()) / free_blocks if free_blocks else 0.0


def count_runs(block_ids: Sequence[int]) -> int:
    """Maximal stretches of `block_ids` (in table order) whose ids ascend by one."""
    runs = 0
    previous = -2
    for block_id in block_ids:
        if block_id != previous + 1:
            runs += 1
        previous = block_id
    return runs


def kv_snapshot(
    *,
    num_blocks: int,
    block_size: int,
    free_mask: Any,
    block_tables: Mapping[str, Sequence[int]],
    tokens_held: Mapping[str, int],
) -> dict[str, float]:
    """Fragmentation numbers of one pool state.

    Args:
        num_blocks: blocks in the pool, null block included (vLLM's num_gpu_blocks).
        block_size: tokens per block.
        free_mask: 1 per free block.
        block_tables: block ids of each running request, in table order (null blocks excluded).
        tokens_held: tokens whose KV each running request holds.
    """
    lengths = free_run_lengths(free_mask)
    free_blocks = int(lengths.sum())
    largest = int(lengths.max()) if lengths.size else 0
    runs = [count_runs(table) for table in block_tables.values() if table]
    slots_held = sum(len(table) for table in block_tables.values()) * block_size
    tokens = sum(min(tokens_held.get(rid, 0), len(table) * block_size) for rid, table in block_tables.items())
    in_use = num_blocks - 1 - free_blocks
    return {
        "num_blocks": num_blocks,
        "num_free_blocks": free_blocks,
        "usage": 1.0 - free_blocks / (num_blocks - 1) if num_blocks > 1 else 0.0,
        "block_size": block_size,
        "token_slot_utilisation": tokens / slots_held if slots_held else 1.0,
        "effective_capacity": tokens / (in_use * block_size) if in_use else 1.0,
        "free_runs": int(lengths.size),
        "largest_free_run": largest,
        "free_space_scatter": free_space_scatter(lengths),
        "runs_per_request_mean": float(np.mean(runs)) if runs else 0.0,
        "runs_per_request_max": max(runs) if runs else 0,
    }


def pool_free_mask(pool: Any) -> Any:
    """The pool's free mask: TinyServe's keeps one; for vLLM's it is read off the blocks (O(n))."""
    mask = getattr(pool, "free_mask", None)
    if mask is not None:
        return mask
    return bytes(1 if (b.ref_cnt == 0 and not b.is_null) else 0 for b in pool.blocks)


def manager_block_tables(kv_manager: Any, request_ids: Iterable[str]) -> dict[str, list[int]]:
    """Block ids of each request in KV cache group 0 (null blocks left out)."""
    table_of = kv_manager.coordinator.single_type_managers[0].req_to_blocks
    tables = {}
    for rid in request_ids:
        blocks = table_of.get(rid)
        if blocks:
            tables[rid] = [b.block_id for b in blocks if not b.is_null]
    return tables


def pool_kv_stats(pool: Any) -> dict[str, float]:
    """The `stats["kv"]` section for a BestFitBlockPool (keys: STATS_KEYS, numbers only)."""
    manager = pool._kv_manager
    requests = pool._requests
    if manager is not None:
        tables = manager_block_tables(manager, requests)
        block_size = manager.coordinator.single_type_managers[0].block_size
    else:
        tables, block_size = {}, pool.hash_block_size
    tokens = {rid: requests[rid].num_computed_tokens for rid in tables}
    snapshot = kv_snapshot(
        num_blocks=pool.num_gpu_blocks,
        block_size=block_size,
        free_mask=pool.free_mask,
        block_tables=tables,
        tokens_held=tokens,
    )
    snapshot.update(pool.counters)
    return snapshot


def analyse_trace(
    events: Iterable[tuple[str, str, Sequence[int], int]],
    *,
    num_blocks: int,
    block_size: int,
    every: int = 1,
) -> list[dict[str, float]]:
    """Replay a recorded allocation trace and return a snapshot every `every` events.

    Each event is (op, request_id, block_ids, tokens_held): op "alloc" appends block_ids to the request's
    table, "free" releases the request's whole table (block_ids ignored), "tokens" only updates
    tokens_held. Blocks shared between requests are counted once in the free mask (reference counts).
    """
    refs = np.zeros(num_blocks, dtype=np.int64)
    refs[0] = 1  # the null block is never free
    tables: dict[str, list[int]] = {}
    tokens: dict[str, int] = {}
    timeline = []
    for index, (op, rid, block_ids, held) in enumerate(events):
        if op == "alloc":
            tables.setdefault(rid, []).extend(block_ids)
            np.add.at(refs, list(block_ids), 1)
            tokens[rid] = held
        elif op == "free":
            table = tables.pop(rid, [])
            np.subtract.at(refs, table, 1)
            tokens.pop(rid, None)
        elif op == "tokens":
            tokens[rid] = held
        else:
            raise ValueError(f"unknown trace op {op!r}")
        if (index + 1) % every == 0:
            snapshot = kv_snapshot(
                num_blocks=num_blocks,
                block_size=block_size,
                free_mask=(refs == 0).astype(np.uint8),
                block_tables=tables,
                tokens_held=tokens,
            )
            snapshot["event"] = index + 1
            timeline.append(snapshot)
    return timeline
