"""`tinyserve bench allocator`: vLLM's stock BlockPool vs TinyServe's BestFitBlockPool, in one run.

1. Trace replay: one seeded chat-like trace (Poisson arrivals, shared system prompts, log-uniform prompt
   and output lengths) replayed through vLLM's real KVCacheManager over each pool (`kv_trace.KVDriver`),
   at a moderate and a high KV load. Per pool: runs per finished request (mean, p99; also counting only
   the blocks the request allocated itself, i.e. after its prefix-cache hit), free runs, largest free run,
   scatter, token-slot utilisation, effective capacity, evictions, prefix hit rate (tokens), preemptions.
   The same trace again through TinyServe's pool with compaction as the engine runs it (`replay_compaction`
   in the JSON): free-space compaction forced every step, and gathering (`compaction_gather_runs=2`): blocks
   moved per request and what each does to runs per request, scatter, evictions and hits.
2. Cost per operation: µs per allocated block and per freed block at 10k and 1M blocks (sequences
   growing one block at a time up to ~70% usage, finished ones freed with cached hashes; the GC heap frozen
   after start-up, as vLLM's engine core does), in two regimes: *filling* (right after the start, free
   blocks never used yet) and *steady* (once every block was handed out: free blocks are freed ones, and
   allocating evicts cached ones). TinyServe's timing includes telling the pool which request allocates;
   TinyServe with the Python references of its compiled parts is timed too. Each
   operation is timed alone; the median per operation is reported (robust on a shared machine, where a
   mean mostly measures time the process was descheduled), means are in the JSON too.
3. What contiguity buys: each finished request's KV gathered into one buffer, as an offload or a transfer
   would, by runs (one copy per run) and block by block, on CPU: copy calls per request and GB/s
   (`tinyserve bench offload` measures the same on a GPU, with the block-copy kernel too).
4. What gathering costs a scheduler step to find the requests to gather, at 256 requests of 400 blocks:
   TinyServe's per-request own-run counts against reading every table each step (`gather_pick_cost`).

Writes benchmarks/results/allocator-<date>.json and .png (scatter and runs per running request over time).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.bench import provenance

__all__ = ["main", "replay", "op_cost", "gather_pick_cost", "RUN_CAUSES", "LOADS", "REPLAY", "GATHER_RUNS"]

RESULTS = Path("benchmarks/results")
# Pool sizes of the two loads: the default trace peaks near a third of the moderate pool and at about two
# thirds of the high one (with preemptions).
LOADS = {"moderate": 2000, "high": 1000}
REPLAY = {"seed": 1, "requests": 400, "block_size": 32}   # the default trace
GATHER_RUNS = 2   # compaction_gather_runs of the replays that gather requests (here and in bench offload)


def _progress(message: str) -> None:
    print(f"[allocator] {message}", file=sys.stderr, flush=True)


def _use_pool(ours: bool) -> None:
    from tinyserve.engine.block_pool import install_block_pool, uninstall_block_pool
    from tinyserve.engine.settings import AllocatorSettings

    uninstall_block_pool()
    if ours:
        install_block_pool(AllocatorSettings())


def _count_stock_evictions(pool: Any) -> list[int]:
    """Count cached blocks the stock pool evicts (TinyServe's pool counts its own)."""
    counter = [0]
    original = pool._maybe_evict_cached_block

    def counting(block: Any) -> bool:
        evicted = original(block)
        counter[0] += evicted
        return evicted

    pool._maybe_evict_cached_block = counting
    return counter


def _free_without_hash(pool: Any) -> Any:
    """For each block but the null one: whether it is free and carries no hash (vLLM hands those out
    before it evicts any cached block)."""
    return (b.ref_cnt == 0 and b.block_hash is None for b in pool.blocks[1:])


def _track_allocating_request(manager: Any) -> list[Any]:
    """Wrap `manager.allocate_slots`; the returned one-item list holds the vLLM Request being allocated
    (None between calls)."""
    current: list[Any] = [None]
    allocate_slots = manager.allocate_slots

    def tracking_allocate(request: Any, *args: Any, **kwargs: Any) -> Any:
        current[0] = request
        try:
            return allocate_slots(request, *args, **kwargs)
        finally:
            current[0] = None

    manager.allocate_slots = tracking_allocate
    return current


def _count_forced_breaks(manager: Any) -> dict[str, int]:
    """Count, per request, the allocations that no placement can keep contiguous under vLLM's free-queue
    order: the request already holds blocks of its own, every block has been used once, and a free block
    without a hash (a finished request's partial last block, a preempted request's unfilled one) exists —
    vLLM hands those out before evicting any cached block, and such a block never follows the request's
    last block. For a pool that keeps that order the count depends only on the schedule and bounds own runs
    from below (1 + forced breaks); TinyServe's pool departs from it in one case (decode growth into the
    request's own room, cached blocks set aside for it), where the count is larger and no bound.
    O(num_blocks) per allocation: for the replay only."""
    pool = manager.block_pool
    used = bytearray(pool.num_gpu_blocks)
    used[0] = 1
    own: dict[str, int] = {}
    forced: dict[str, int] = {}
    current = _track_allocating_request(manager)
    get_new_blocks = pool.get_new_blocks

    def counting_get_new_blocks(num_blocks: int) -> list:
        rid = current[0].request_id if current[0] is not None else None
        if rid is not None and own.get(rid) and used.find(0) < 0:
            if any(_free_without_hash(pool)):
                forced[rid] = forced.get(rid, 0) + 1
        blocks = get_new_blocks(num_blocks)
        for block in blocks:
            used[block.block_id] = 1
        if rid is not None:
            own[rid] = own.get(rid, 0) + len(blocks)
        return blocks

    free = manager.free

    def forgetting_free(request: Any) -> Any:
        own.pop(request.request_id, None)
        return free(request)

    pool.get_new_blocks = counting_get_new_blocks
    manager.free = forgetting_free
    return forced


RUN_CAUSES = (
    "split_among_empty_blocks",
    "split_empty_then_cached",
    "split_evicting_cached",
    "split_no_free_run_holds_it",
    "next_held_before_tail",
    "next_taken_by_placement",
    "next_taken_by_growth",
    "next_taken_by_hit",
    "next_free_empty_passed_over",
    "next_cached_forced_by_free_order",
    "next_cached_kept",
    "pool_end",
)


def _count_run_causes(manager: Any) -> dict[str, int]:
    """Why each new run of a request's own blocks starts (summed over finished requests; a preempted
    request's counts go with its blocks). Sum over causes = own runs - finished requests. Causes:
    - split_*: one allocation handed out blocks in more than one run: no run of free blocks (cached or
      not) held it (no_free_run_holds_it), else the free blocks without a hash could hold it all
      (among_empty_blocks), could not (empty_then_cached: vLLM's order hands out every one of them before
      evicting), or none was free (evicting_cached: the run that held it was young or prefix-hit);
    - the first block of a growth allocation is not the block right after the request's last one, and
      that next block was: already held when the request's last block was allocated
      (next_held_before_tail: placed with no room to grow), allocated since by another request's new
      placement / growth / prefix hit (next_taken_by_*), free without a hash but handed out elsewhere
      (next_free_empty_passed_over), free and cached while a block without a hash was free, which vLLM's
      order hands out first (next_cached_forced_by_free_order), free and cached with none such left
      (next_cached_kept: the pool's eviction rules kept it), or past the pool's end (pool_end).
    Placement-independent bookkeeping (wrappers around the manager and the pool, O(num_blocks) per
    allocation for the free-order check): for the replay only, never on the pool's own paths."""
    from tinyserve.engine.fragmentation import free_run_lengths, pool_free_mask

    pool = manager.block_pool
    tables = manager.coordinator.single_type_managers[0].req_to_blocks
    stamp = [0] * pool.num_gpu_blocks  # allocation serial of the block's latest holder
    taker = [""] * pool.num_gpu_blocks  # kind of allocation that took the block
    clock = [0]
    own: dict[str, int] = {}
    pending: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(RUN_CAUSES, 0)
    current = _track_allocating_request(manager)
    get_new_blocks, touch, free = pool.get_new_blocks, pool.touch, manager.free

    def cause_of_next(tail: int) -> str:
        nxt = tail + 1
        if nxt >= pool.num_gpu_blocks:
            return "pool_end"
        block = pool.blocks[nxt]
        if block.ref_cnt > 0:
            if stamp[nxt] < stamp[tail]:
                return "next_held_before_tail"
            return f"next_taken_by_{taker[nxt]}"
        if block.block_hash is None:
            return "next_free_empty_passed_over"
        if any(_free_without_hash(pool)):
            return "next_cached_forced_by_free_order"
        return "next_cached_kept"

    def counting_get_new_blocks(num_blocks: int) -> list:
        request = current[0]
        rid = request.request_id if request is not None else None
        growing = rid is not None and own.get(rid, 0) > 0
        cause = cause_of_next(tables[rid][-1].block_id) if growing else None
        empty = fits = 0
        if num_blocks > 1:
            empty = sum(_free_without_hash(pool))
            fits = int(free_run_lengths(pool_free_mask(pool)).max(initial=0)) >= num_blocks
        blocks = get_new_blocks(num_blocks)
        clock[0] += 1
        for block in blocks:
            stamp[block.block_id] = clock[0]
            taker[block.block_id] = "growth" if growing else "placement"
        if rid is None:
            return blocks
        counts = pending.setdefault(rid, dict.fromkeys(RUN_CAUSES, 0))
        if growing and blocks[0].block_id != tables[rid][-1].block_id + 1:
            counts[cause] += 1  # type: ignore[index]
        splits = sum(b.block_id != a.block_id + 1 for a, b in zip(blocks, blocks[1:]))
        if splits:
            if not fits:
                phase = "no_free_run_holds_it"
            else:
                phase = "among_empty_blocks" if empty >= num_blocks else "empty_then_cached" if empty else "evicting_cached"
            counts[f"split_{phase}"] += splits
        own[rid] = own.get(rid, 0) + len(blocks)
        return blocks

    def tracking_touch(blocks: Any) -> None:
        clock[0] += 1
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                stamp[block.block_id] = clock[0]
                taker[block.block_id] = "hit"
        touch(blocks)

    def tracking_free(request: Any) -> Any:
        own.pop(request.request_id, None)
        counts = pending.pop(request.request_id, None)
        if counts is not None and request.is_finished():
            for key, value in counts.items():
                totals[key] += value
        return free(request)

    pool.get_new_blocks = counting_get_new_blocks
    pool.touch = tracking_touch
    manager.free = tracking_free
    return totals


def replay(trace: list, *, ours: bool, num_blocks: int, block_size: int, sample_every: int,
           compaction: Any = None) -> dict[str, Any]:
    """Replay `trace` through a real KVCacheManager over one pool; summary and time series. With
    `compaction` (AllocatorSettings, TinyServe's pool only) the driver compacts after each schedule as the
    engine does; the run-cause and lower-bound counts, which watch every allocation, are left out then."""
    from tinyserve.bench.kv_trace import KVDriver, make_kv_manager
    from tinyserve.engine.fragmentation import count_runs, kv_snapshot, pool_free_mask

    _use_pool(ours)
    manager = make_kv_manager(num_blocks, block_size)
    pool = manager.block_pool
    stock_evictions = None if ours else _count_stock_evictions(pool)
    forced = _count_forced_breaks(manager) if compaction is None else {}
    causes = _count_run_causes(manager) if compaction is None else {}
    finished_runs: list[int] = []
    finished_own_runs: list[int] = []
    finished_blocks: list[int] = []
    tables: list[list[int]] = []
    series: list[dict[str, float]] = []

    def on_finish(driver: Any, rid: str, table: list[int], hit_blocks: int) -> None:
        finished_runs.append(count_runs(table))
        finished_own_runs.append(count_runs(table[hit_blocks:]))
        finished_blocks.append(len(table))
        tables.append(table)

    def on_step(driver: Any) -> None:
        if driver.steps % sample_every:
            return
        snap = kv_snapshot(
            num_blocks=num_blocks,
            block_size=block_size,
            free_mask=pool_free_mask(pool),
            block_tables=driver.block_tables(),
            tokens_held=driver.tokens_held(),
        )
        snap["step"] = driver.steps
        series.append(snap)

    driver = KVDriver(manager, block_size, on_step=on_step, on_finish=on_finish, compaction=compaction)
    started = time.perf_counter()
    driver.run(trace)
    elapsed = time.perf_counter() - started
    loaded = [s for s in series if s["runs_per_request_mean"] > 0]

    def mean(key: str) -> float:
        return float(np.mean([s[key] for s in loaded])) if loaded else 0.0

    evictions = pool.counters["evictions_total"] if ours else stock_evictions[0]  # type: ignore[index]
    summary = {
        "pool": type(pool).__name__,
        "requests_finished": driver.finished,
        "steps": driver.steps,
        "preemptions": driver.preemptions,
        "runs_per_request_mean": float(np.mean(finished_runs)),
        "runs_per_request_p99": float(np.percentile(finished_runs, 99)),
        "own_runs_per_request_mean": float(np.mean(finished_own_runs)),
        "own_runs_per_request_p99": float(np.percentile(finished_own_runs, 99)),
        # under vLLM's free-queue order, a lower bound on own runs: 1 + forced breaks (see _count_forced_breaks)
        "forced_breaks_per_request": sum(forced.values()) / max(driver.finished, 1),
        # why each own run after the first starts, per finished request (see _count_run_causes)
        "run_causes_per_request": {key: value / max(driver.finished, 1) for key, value in causes.items()},
        "blocks_per_request_mean": float(np.mean(finished_blocks)),
        "free_runs_mean": mean("free_runs"),
        "largest_free_run_mean": mean("largest_free_run"),
        "free_space_scatter_mean": mean("free_space_scatter"),
        "token_slot_utilisation_mean": mean("token_slot_utilisation"),
        "effective_capacity_mean": mean("effective_capacity"),
        "usage_mean": mean("usage"),
        "evictions": int(evictions),
        "prefix_hit_rate": driver.prefix_hit_tokens / max(driver.prefix_query_tokens, 1),
        "blocks_moved_per_request": driver.blocks_moved / max(driver.finished, 1),
        "replay_seconds": elapsed,
    }
    timeline = {k: [s[k] for s in series] for k in ("step", "free_space_scatter", "runs_per_request_mean", "usage")}
    return {"summary": summary, "timeline": timeline, "tables": tables}


class _FakeRequest:
    """What the pool reads from a vLLM Request when it places blocks."""

    __slots__ = ("request_id", "num_prompt_tokens", "max_tokens", "num_output_tokens", "status",
                 "_tinyserve_placement")

    def __init__(self, request_id: str, prompt_tokens: int, max_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.num_output_tokens = 0

    def is_finished(self) -> bool:
        return True


class _CostRunner:
    """One pool under the load of `op_cost`: sequences of U(10, 2*mean-10) blocks, enough to fill 70% of
    the pool, start at random progress (untimed); then, round robin, each operation grows one sequence by
    a block, or frees a sequence that reached its length (half its blocks carrying prefix hashes, so they
    are cached and later evicted) and starts a new one in its place. `allocated` counts blocks handed out
    since the start; `recycle` runs (untimed) until it reaches the pool's size."""

    def __init__(self, *, ours: bool, num_blocks: int, seed: int, mean_blocks: int = 40,
                 python_references: bool = False) -> None:
        from vllm.v1.core.block_pool import BlockPool

        from tinyserve.engine.block_pool import BestFitBlockPool

        self.ours = ours
        self.rng = random.Random(seed)
        self.mean_blocks = mean_blocks
        self.pool = (BestFitBlockPool if ours else BlockPool)(num_blocks, True, 32)
        if python_references:
            self.pool.use_python_references()
        self.live = max(1, int(0.7 * num_blocks / mean_blocks))
        self.serial = 0
        self.op = 0
        self.allocated = 0
        self.sequences = [self._new_sequence() for _ in range(self.live)]
        for sequence in self.sequences:
            for _ in range(self.rng.randint(0, sequence[2] - 1)):
                self._grow(sequence)

    def _new_sequence(self) -> list[Any]:
        length = self.rng.randint(10, 2 * self.mean_blocks - 10)
        self.serial += 1
        return [_FakeRequest(f"s{self.serial}", 32 * (length // 2), 32 * (length - length // 2)), [], length]

    def _grow(self, sequence: list[Any]) -> None:
        pool = self.pool
        self.allocated += 1
        if self.ours:
            pool.begin_request(sequence[0])
            sequence[1].extend(pool.get_new_blocks(1))
            pool.end_request()
        else:
            sequence[1].extend(pool.get_new_blocks(1))

    def recycle(self) -> None:
        """Run until every block could have been handed out once: free blocks are then blocks that were
        used and freed (cached ones among them), never the start's untouched ones."""
        while self.allocated < self.pool.num_gpu_blocks:
            self.run(min(50_000, self.pool.num_gpu_blocks))

    def run(self, ops: int) -> dict[str, float]:
        from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

        pool, perf = self.pool, time.perf_counter
        alloc_times: list[float] = []
        free_times: list[float] = []  # per freed block
        for _ in range(ops):
            index = self.op % self.live
            self.op += 1
            sequence = self.sequences[index]
            if len(sequence[1]) < sequence[2] and pool.get_num_free_blocks() > 0:
                _ = sequence[0].request_id  # the caller has the request at hand (vLLM's scheduler just read it)
                t0 = perf()
                self._grow(sequence)
                alloc_times.append(perf() - t0)
            else:
                for block in sequence[1][: len(sequence[1]) // 2]:
                    self.serial += 1
                    key = make_block_hash_with_group_id(BlockHash(self.serial.to_bytes(8, "little")), 0)
                    pool._insert_block_hash(key, block, None)
                t0 = perf()
                pool.free_blocks(reversed(sequence[1]))
                if self.ours:
                    pool.forget_request(sequence[0].request_id)
                free_times.append((perf() - t0) / max(len(sequence[1]), 1))
                self.sequences[index] = self._new_sequence()
        return {
            "us_per_allocated_block": 1e6 * float(np.median(alloc_times)),
            "us_per_freed_block": 1e6 * float(np.median(free_times)),
            "us_per_allocated_block_mean": 1e6 * float(np.mean(alloc_times)),
            "us_per_freed_block_mean": 1e6 * float(np.mean(free_times)),
        }


def op_cost(*, num_blocks: int, ops: int, seed: int, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """µs per allocated and per freed block at `num_blocks` for vLLM's pool, TinyServe's, and TinyServe's
    with the Python references of FreeRuns, the free pass, the placement record and reservation growth
    instead of the compiled ones (what compiling buys), in two regimes: `filling` (right after the start,
    while free blocks are ones never used) and `steady` (after `_CostRunner.recycle`: every free block was
    used, cached ones are evicted to allocate).
    Pools are measured in alternation (`repeats` rounds of ops/repeats operations each), best round per
    pool (the machine is shared)."""
    import gc

    runners = {"vllm": _CostRunner(ours=False, num_blocks=num_blocks, seed=seed),
               "tinyserve": _CostRunner(ours=True, num_blocks=num_blocks, seed=seed),
               "tinyserve_python_references": _CostRunner(ours=True, num_blocks=num_blocks, seed=seed,
                                                          python_references=True)}
    result: dict[str, dict[str, Any]] = {
        name: {"num_blocks": num_blocks, "live_sequences": runner.live} for name, runner in runners.items()}
    gc.collect()
    gc.freeze()  # as vLLM's engine core does after start-up: the block objects leave the GC's scans
    try:
        for regime in ("filling", "steady"):
            if regime == "steady":
                for runner in runners.values():
                    runner.recycle()
            best: dict[str, dict[str, float]] = {name: {} for name in runners}
            for _ in range(repeats):
                for name, runner in runners.items():
                    for key, value in runner.run(ops // repeats).items():
                        best[name][key] = min(best[name].get(key, float("inf")), value)
            for name in runners:
                result[name][regime] = best[name]
    finally:
        gc.unfreeze()
    return result


def gather_pick_cost(*, num_requests: int = 256, blocks_per_request: int = 400, steps: int = 64,
                     seed: int = 0) -> dict[str, float]:
    """ms per scheduler step that gathering spends finding which running requests lie in several runs, with
    `num_requests` requests of `blocks_per_request` blocks each in TinyServe's pool, 1 in 32 of them growing
    by a block each step (decode at 32-token blocks): TinyServe's `gather_requests` (own-run counts kept per
    request, `own_runs.TableScan`) against reading every table each step (`owned_blocks` and a run count per
    request: what gathering did before). Medians over `steps` steps, in alternation."""
    from tinyserve.engine.block_pool import BestFitBlockPool
    from tinyserve.engine.compaction import gather_requests, owned_blocks
    from tinyserve.engine.fragmentation import count_runs
    from tinyserve.engine.settings import AllocatorSettings

    class _Tables:   # what gathering reads of vLLM's single-type manager
        req_to_blocks: dict[str, list[Any]]

    rng = random.Random(seed)
    pool = BestFitBlockPool(num_requests * (blocks_per_request + steps) + 1, True, 32)
    manager = _Tables()
    manager.req_to_blocks = {}
    requests = [_FakeRequest(f"r{i}", 32 * blocks_per_request, 32 * steps) for i in range(num_requests)]
    for request in requests:
        pool.begin_request(request)
        manager.req_to_blocks[request.request_id] = pool.get_new_blocks(blocks_per_request)
        pool.end_request()
    settings = AllocatorSettings(compaction_gather_runs=GATHER_RUNS)
    ids = [request.request_id for request in requests]
    ours: list[float] = []
    full_read: list[float] = []
    perf = time.perf_counter
    gather_requests(manager, pool, ids, settings)   # the first step reads every table once
    for _ in range(steps):
        for request in rng.sample(requests, max(1, num_requests // 32)):
            pool.begin_request(request)
            manager.req_to_blocks[request.request_id] += pool.get_new_blocks(1)
            pool.end_request()
        t0 = perf()
        gather_requests(manager, pool, ids, settings)
        ours.append(perf() - t0)
        t0 = perf()
        own: dict[str, list[int]] = {}
        for block_id, (rid, _) in owned_blocks(manager, ids).items():
            own.setdefault(rid, []).append(block_id)
        sum(count_runs(sorted(blocks)) >= GATHER_RUNS for blocks in own.values())
        full_read.append(perf() - t0)
    return {"num_requests": num_requests, "blocks": num_requests * blocks_per_request, "steps": steps,
            "tinyserve_ms_per_step": 1e3 * float(np.median(ours)),
            "full_read_ms_per_step": 1e3 * float(np.median(full_read))}


def _plot(loads: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(loads), 2, figsize=(12, 4 * len(loads)), squeeze=False)
    for row, (load, pools) in enumerate(loads.items()):
        for name, result in pools.items():
            timeline = result["timeline"]
            axes[row][0].plot(timeline["step"], timeline["free_space_scatter"], label=name)
            axes[row][1].plot(timeline["step"], timeline["runs_per_request_mean"], label=name)
        axes[row][0].set_title(f"{load}: free-space scatter (1 - largest free run / free blocks)")
        axes[row][1].set_title(f"{load}: runs per running request")
        for ax in axes[row]:
            ax.set_xlabel("scheduler step")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve bench allocator", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=REPLAY["seed"])
    parser.add_argument("--requests", type=int, default=REPLAY["requests"])
    parser.add_argument("--block-size", type=int, default=REPLAY["block_size"])
    parser.add_argument("--ops", type=int, default=200_000, help="operations per cost measurement")
    parser.add_argument("--big-blocks", type=int, default=1_000_000)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="small run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.ops, args.big_blocks = 60, 20_000, 20_000

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from tinyserve.bench.kv_trace import make_trace
    from tinyserve.bench.offload import LAYER_BLOCK_BYTES, gather_tables
    from tinyserve.engine.block_pool import uninstall_block_pool

    trace = make_trace(seed=args.seed, num_requests=args.requests)
    loads_cfg = LOADS
    loads: dict[str, dict[str, Any]] = {}
    for load, num_blocks in loads_cfg.items():
        loads[load] = {}
        for name, ours in (("vllm", False), ("tinyserve", True)):
            _progress(f"replay {load} load ({num_blocks} blocks) through {name} pool ...")
            loads[load][name] = replay(trace, ours=ours, num_blocks=num_blocks, block_size=args.block_size, sample_every=5)
    from tinyserve.engine.free_runs import FreeRuns, ReferenceFreeRuns
    from tinyserve.engine.settings import AllocatorSettings

    compaction_modes = {"free_space_every_step": AllocatorSettings(force_compaction_every_step=True),
                        f"gather_{GATHER_RUNS}_runs": AllocatorSettings(compaction_gather_runs=GATHER_RUNS)}
    compacted: dict[str, dict[str, dict[str, Any]]] = {mode: {} for mode in compaction_modes}
    gathered_tables: list[list[int]] = []
    for mode, settings in compaction_modes.items():   # what compaction does to the same trace
        for load, num_blocks in loads_cfg.items():
            _progress(f"replay {load} load through the TinyServe pool, compaction {mode} ...")
            result = replay(trace, ours=True, num_blocks=num_blocks, block_size=args.block_size, sample_every=5,
                            compaction=settings)
            compacted[mode][load] = result["summary"]
            if settings.compaction_gather_runs is not None and load == "moderate":
                gathered_tables = result["tables"]
    costs: dict[str, list[dict[str, Any]]] = {}  # pool (op_cost's names) -> one entry per pool size
    for num_blocks in (10_000, args.big_blocks):
        _progress(f"cost per operation at {num_blocks} blocks, both pools in alternation ...")
        for name, measured in op_cost(num_blocks=num_blocks, ops=args.ops, seed=args.seed).items():
            costs.setdefault(name, []).append(measured)
    _progress("gathering: finding the requests to gather, per step ...")
    pick_cost = gather_pick_cost(steps=16 if args.quick else 64)
    uninstall_block_pool()
    _progress("offload copy by runs vs block by block ...")
    copies = {
        name: gather_tables(tables, num_blocks=loads_cfg["moderate"], block_bytes=LAYER_BLOCK_BYTES, limit=200)
        for name, tables in (("vllm", loads["moderate"]["vllm"]["tables"]),
                             ("tinyserve", loads["moderate"]["tinyserve"]["tables"]),
                             ("tinyserve_gathering", gathered_tables))
    }

    rows = [("metric", *(f"{load}:{name}" for load in loads for name in loads[load]))]
    for key in ("runs_per_request_mean", "runs_per_request_p99", "own_runs_per_request_mean", "own_runs_per_request_p99",
                "forced_breaks_per_request",
                "blocks_per_request_mean", "free_runs_mean", "largest_free_run_mean", "free_space_scatter_mean",
                "token_slot_utilisation_mean", "effective_capacity_mean", "usage_mean", "evictions", "prefix_hit_rate",
                "preemptions", "steps"):
        rows.append((key, *(f"{loads[l][n]['summary'][key]:.4g}" for l in loads for n in loads[l])))
    print(_table(rows))
    print()
    cause_rows = [("own run starts per request, by cause", *(f"{load}:{name}" for load in loads for name in loads[load]))]
    for key in RUN_CAUSES:
        cause_rows.append((key, *(f"{loads[l][n]['summary']['run_causes_per_request'][key]:.3g}" for l in loads for n in loads[l])))
    print(_table(cause_rows))
    print()
    cost_rows = [("blocks", "regime", "vllm µs/alloc", "tinyserve µs/alloc", "ratio", "Python refs ratio",
                  "vllm µs/free", "tinyserve µs/free", "ratio", "Python refs ratio")]
    for stock_at, ours_at, python_at in zip(costs["vllm"], costs["tinyserve"], costs["tinyserve_python_references"]):
        for regime in ("filling", "steady"):
            stock, ours_cost, python_cost = stock_at[regime], ours_at[regime], python_at[regime]
            row = [str(stock_at["num_blocks"]), regime]
            for key in ("us_per_allocated_block", "us_per_freed_block"):
                row += [f"{stock[key]:.2f}", f"{ours_cost[key]:.2f}", f"{ours_cost[key] / stock[key]:.2f}x",
                        f"{python_cost[key] / stock[key]:.2f}x"]
            cost_rows.append(tuple(row))
    print(_table(cost_rows))
    print()
    compaction_rows = [("TinyServe pool, compaction", *(f"{load}: {mode}" for load in loads_cfg
                                                       for mode in ("off", *compaction_modes)))]
    for key in ("runs_per_request_mean", "own_runs_per_request_mean", "own_runs_per_request_p99", "blocks_moved_per_request",
                "free_space_scatter_mean", "largest_free_run_mean", "evictions", "prefix_hit_rate", "preemptions"):
        compaction_rows.append((key, *(f"{(loads[l]['tinyserve']['summary'] if m == 'off' else compacted[m][l])[key]:.4g}"
                                       for l in loads_cfg for m in ("off", *compaction_modes))))
    print(_table(compaction_rows))
    print()
    print(_table([("gathering: finding requests to gather", "requests", "blocks", "TinyServe ms/step",
                   "reading every table ms/step"),
                  ("", str(pick_cost["num_requests"]), str(pick_cost["blocks"]),
                   f"{pick_cost['tinyserve_ms_per_step']:.3f}", f"{pick_cost['full_read_ms_per_step']:.2f}")]))
    print()
    copy_rows = [("offload (moderate load)", "runs/request", "copy calls by runs", "GB/s by runs", "copy calls by blocks", "GB/s by blocks")]
    for name, c in copies.items():
        copy_rows.append((name, f"{c['runs_per_request']:.2f}", f"{c['by_runs_copy_calls_per_request']:.2f}",
                          f"{c['by_runs_gb_per_s']:.2f}", f"{c['by_blocks_copy_calls_per_request']:.2f}", f"{c['by_blocks_gb_per_s']:.2f}"))
    print(_table(copy_rows))

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"allocator-{'quick-' if args.quick else ''}{stamp}"
    report = {
        "benchmark": "allocator",
        "machine": provenance.stamp(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline": "vLLM 0.29 BlockPool (stock), same trace, same process, same run",
        "trace": {"requests": len(trace), "seed": args.seed, "block_size": args.block_size},
        "replay": {load: {name: r["summary"] for name, r in pools.items()} for load, pools in loads.items()},
        "replay_pool_blocks": loads_cfg,
        "replay_compaction": compacted,
        "timeline": {load: {name: r["timeline"] for name, r in pools.items()} for load, pools in loads.items()},
        "op_cost": costs,
        "compiled_parts": "_free_runs.c, _placement.c" if FreeRuns is not ReferenceFreeRuns else "none (Python references)",
        "offload_copy_cpu": copies,
        "gather_pick_cost": pick_cost,
    }
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    _plot(loads, stem.with_suffix(".png"))
    _progress(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
