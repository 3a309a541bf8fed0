"""`tinyserve bench offload`: what contiguity buys when a finished request's KV leaves the cache.

Each finished request's block table (from the allocator replay, `tinyserve bench allocator`'s moderate load,
for vLLM's stock pool, for TinyServe's, and for TinyServe's gathering requests together) is gathered into one
buffer, as an offload to host memory or a
transfer to another engine would do it:
- by runs: one copy per run of consecutive block ids;
- block by block: one copy per block;
- on CUDA also through TinyServe's block-copy kernel (`ops.copy_blocks`): one launch gathers the request's
  blocks into a contiguous staging area on the device, then one copy moves it to the host.
On CPU the copies go from the cache to a staging tensor; on CUDA from the device cache to pinned host memory.
Reports copy calls per request and GB/s (best of three passes, each pool measured twice in alternation) and
checks every gathered byte against the cache.

    tinyserve bench offload --make-tables benchmarks/results/offload-tables.json   # CPU, needs vLLM
    tinyserve bench offload --tables benchmarks/results/offload-tables.json        # on the GPU machine

Writes benchmarks/results/offload-<device>-<date>.json and .png (GB/s by method, for each pool).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve.bench import provenance

__all__ = ["gather_tables", "main", "make_tables", "table_runs"]

RESULTS = Path("benchmarks/results")
# 32 tokens x 4 KV heads x 64 dims x (K, V) x fp16: one layer's share of a block of the replay's model
LAYER_BLOCK_BYTES = 32 * 4 * 64 * 2 * 2


def table_runs(table: list[int]) -> list[tuple[int, int]]:
    """(first block id, length) of each run of consecutive block ids in `table`, in table order."""
    runs: list[tuple[int, int]] = []
    for block_id in table:
        if runs and block_id == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def gather_tables(tables: list[list[int]], *, num_blocks: int, block_bytes: int, limit: int,
                  device: str = "cpu") -> dict[str, float]:
    """Gather the first `limit` non-empty tables by runs, block by block and (CUDA) through the block-copy
    kernel; calls per request, GB/s, and whether every gathered byte matched the cache."""
    import torch

    from tinyserve.kernels import ops

    cuda = device.startswith("cuda")
    chosen = [t for t in tables if t][:limit]
    longest = max(len(t) for t in chosen)
    elems = block_bytes // 2
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # one memcpy stream: calls, not thread start-up, are what differ
    # the cache, then `longest` spare blocks: the block-copy kernel's staging area on the device
    cache = torch.randn(num_blocks + longest, elems, device=device).to(torch.float16)
    staging = torch.zeros(longest, elems, dtype=torch.float16, pin_memory=cuda)  # touched: no page faults
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def by_runs(table: list[int]) -> int:
        offset = 0
        runs = table_runs(table)
        for start, length in runs:
            staging[offset : offset + length].copy_(cache[start : start + length], non_blocking=cuda)
            offset += length
        return len(runs)

    def by_blocks(table: list[int]) -> int:
        for offset, block_id in enumerate(table):
            staging[offset].copy_(cache[block_id], non_blocking=cuda)
        return len(table)

    def by_kernel(table: list[int]) -> int:
        n = len(table)
        ops.copy_blocks([cache], torch.tensor(table), torch.arange(num_blocks, num_blocks + n))
        staging[:n].copy_(cache[num_blocks : num_blocks + n], non_blocking=True)
        return 2  # one launch, one copy

    methods: dict[str, Callable[[list[int]], int]] = {"by_runs": by_runs, "by_blocks": by_blocks}
    if cuda:
        methods["by_block_copy_kernel"] = by_kernel
    result: dict[str, Any] = {"requests": len(chosen), "block_bytes": block_bytes, "device": device}
    verified = True
    for fn in methods.values():  # warm-up pass, checked request by request
        for table in chosen:
            fn(table)
            sync()
            verified &= bool(torch.equal(staging[: len(table)].cpu(), cache[table].cpu()))
    total_bytes = sum(len(t) for t in chosen) * block_bytes
    for name, fn in methods.items():
        elapsed = float("inf")
        for _ in range(3):  # best of three
            sync()
            started = time.perf_counter()
            calls = sum(fn(t) for t in chosen)
            sync()
            elapsed = min(elapsed, time.perf_counter() - started)
        result[f"{name}_copy_calls_per_request"] = calls / len(chosen)
        result[f"{name}_gb_per_s"] = total_bytes / elapsed / 1e9
    result["runs_per_request"] = float(np.mean([len(table_runs(t)) for t in chosen]))
    result["verified"] = verified
    torch.set_num_threads(threads)
    return result


def make_tables(path: Path, *, limit: int = 200) -> None:
    """Replay the allocator benchmark's moderate load through both pools (CPU, vLLM), and through TinyServe's
    gathering requests together (`compaction_gather_runs=GATHER_RUNS`), and write the first `limit` finished
    requests' block tables of each to `path`."""
    from tinyserve.bench.allocator import GATHER_RUNS, LOADS, REPLAY, replay
    from tinyserve.bench.kv_trace import make_trace
    from tinyserve.engine.block_pool import uninstall_block_pool
    from tinyserve.engine.settings import AllocatorSettings

    trace = make_trace(seed=REPLAY["seed"], num_requests=REPLAY["requests"])
    out: dict[str, Any] = {"commit": provenance.commit(), "machine": provenance.machine(),
                           "load": "moderate", "num_blocks": LOADS["moderate"], "block_size": REPLAY["block_size"],
                           "trace": REPLAY, "tables": {}}
    for name, ours, compaction in (("vllm", False, None), ("tinyserve", True, None),
                                   ("tinyserve_gathering", True, AllocatorSettings(compaction_gather_runs=GATHER_RUNS))):
        print(f"[offload] replay (moderate load) through {name} pool ...", flush=True)
        run = replay(trace, ours=ours, num_blocks=LOADS["moderate"], block_size=REPLAY["block_size"], sample_every=50,
                     compaction=compaction)
        out["tables"][name] = run["tables"][:limit]
    uninstall_block_pool()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    print(f"[offload] wrote {path}")


def _plot(pools: dict[str, dict[str, Any]], methods: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(pools)
    for i, (name, result) in enumerate(pools.items()):
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [result[m + "_gb_per_s"] for m in methods], width,
               label=f"{name} ({result['runs_per_request']:.2f} runs / request)")
    ax.set_xticks([j + width * (len(pools) - 1) / 2 for j in range(len(methods))], methods)
    ax.set_ylabel("GB/s")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve bench offload", description=__doc__.splitlines()[0])
    parser.add_argument("--make-tables", type=Path, help="replay the allocator trace and write the tables here")
    parser.add_argument("--tables", type=Path, help="tables written by --make-tables")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--block-bytes", type=int, default=LAYER_BLOCK_BYTES)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.make_tables:
        make_tables(args.make_tables)
        return 0
    if not args.tables:
        parser.error("--tables or --make-tables is required")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = json.loads(args.tables.read_text())
    pools: dict[str, dict[str, Any]] = {}
    for _ in range(2):  # the pools in alternation, twice: the first measurement of a process runs cold
        for name, tables in source["tables"].items():
            result = gather_tables(tables, num_blocks=source["num_blocks"], block_bytes=args.block_bytes,
                                   limit=len(tables), device=device)
            best = pools.setdefault(name, result)
            for key, value in result.items():
                if key.endswith("_gb_per_s"):
                    best[key] = max(best[key], value)
            best["verified"] = best["verified"] and result["verified"]
    methods = [k[: -len("_gb_per_s")] for k in pools["vllm"] if k.endswith("_gb_per_s")]
    header = ("pool", "runs/request", *(f"{m} calls" for m in methods), *(f"{m} GB/s" for m in methods), "verified")
    rows = [header] + [(name, f"{r['runs_per_request']:.2f}",
                        *(f"{r[m + '_copy_calls_per_request']:.2f}" for m in methods),
                        *(f"{r[m + '_gb_per_s']:.2f}" for m in methods), str(r["verified"]))
                       for name, r in pools.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    stamp = dt.datetime.now(dt.timezone.utc)
    report = {"benchmark": "offload", "card": card, "date": stamp.isoformat(timespec="seconds"),
              "commit": provenance.commit(), "machine": provenance.machine(card if card != "cpu" else None),
              "tables": str(args.tables), "tables_commit": source.get("commit"), "load": source["load"],
              "block_bytes": args.block_bytes, "pools": pools}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"offload-{card.replace(' ', '_')}-{stamp:%Y-%m-%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=1))
    title = f"gathering finished requests' KV, {args.block_bytes} B blocks, {card}"
    _plot(pools, methods, title, path.with_suffix(".png"))
    print(f"[offload] wrote {path} and .png")
    return 0 if all(r["verified"] for r in pools.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
