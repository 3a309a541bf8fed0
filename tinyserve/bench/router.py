"""`tinyserve bench router`: the three routers on the same seeded workloads, live, in one run.

Starts a local Ray cluster, then for each router (Ray's power-of-two default, Ray's
PrefixCacheAffinityRouter, TinyServe's QueryAwareRouter) deploys the TinyServe app with `--replicas` vLLM
replicas and replays each workload (`router_workloads`: multi-turn chat with shared system prompts, RAG with
shared documents, and a hot-prompt chat) over HTTP with streaming, `--repeats` times. Every (router, repeat)
opens its prompts with its own tag, so no run finds another's prefixes cached. Reported per router and workload: TTFT p50/p90/p99, throughput, prefix-cache hit rate
from vLLM's own counters (``vllm:prefix_cache_hits`` / ``queries``, scraped from Ray's metrics agent), the
oracle bound of the same requests in the order they were sent (every request finds the longest prefix any
earlier one left, nothing evicted; prompts tokenized and hashed as the engine does), load balance (max/mean
requests per replica, from vLLM's request counters), errors; the spread over repeats.
Also a calibration, on the first deployment, of the replica model for the simulator (cold TTFT vs prompt
length, decode time per token), whose weights QueryAwareRouter then routes with. Writes benchmarks/results/router-live-<time>.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from tinyserve.bench.router_workloads import WORKLOADS, Session, make_workload
from tinyserve.ports import free_port

__all__ = ["ROUTER_KINDS", "scrape", "replica_counters", "run_sessions", "main"]

ROUTER_KINDS = ("power_of_two", "prefix_affinity", "query_aware")
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_TAG = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')



def scrape(metrics_port: int, prefixes: tuple[str, ...] = ("ray_vllm_", "ray_tinyserve_")) -> list[tuple[str, dict, float]]:
    """Samples from Ray's Prometheus endpoint on this node whose names start with one of `prefixes`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.append((m.group(1), dict(_TAG.findall(m.group(2) or "")), float(m.group(3))))
    return out


def replica_counters(samples: list[tuple[str, dict, float]]) -> dict[str, dict[str, float]]:
    """Per vLLM replica: prefix-cache hit and query tokens, finished requests (vLLM's own counters)."""
    out: dict[str, dict[str, float]] = {}
    for name, tags, value in samples:
        rid = tags.get("ReplicaId")
        if rid is None:
            continue
        row = out.setdefault(rid, {"hits": 0.0, "queries": 0.0, "requests": 0.0})
        if name == "ray_vllm_prefix_cache_hits_total":
            row["hits"] += value
        elif name == "ray_vllm_prefix_cache_queries_total":
            row["queries"] += value
        elif name == "ray_vllm_request_success_total":
            row["requests"] += value
    return out


def counters_delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {r: {k: v - before.get(r, {}).get(k, 0.0) for k, v in row.items()} for r, row in after.items()}


def wait_for_counters(metrics_port: int, expected_requests: int, before: dict, timeout_s: float = 40.0) -> dict:
    """Scrape until vLLM's request counters account for every request sent (metrics export is periodic)."""
    deadline = time.time() + timeout_s
    while True:
        delta = counters_delta(replica_counters(scrape(metrics_port)), before)
        if sum(r["requests"] for r in delta.values()) >= expected_requests or time.time() > deadline:
            return delta
        time.sleep(2.0)


async def _one_turn(client: Any, url: str, model: str, messages: list, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft = None
    sent = {"sent_at": t0}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as resp:
            if resp.status_code != 200:
                return {"ok": False, "status": resp.status_code, "error": (await resp.aread()).decode()[:200], **sent}
            async for line in resp.aiter_lines():
                if ttft is None and line.startswith("data: ") and '"content"' in line:
                    ttft = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return {"ok": ttft is not None, "ttft_s": ttft, "e2e_s": total, **sent}
    except Exception as exc:  # a failed request is a result, reported as an error
        return {"ok": False, "error": repr(exc)[:200], **sent}


async def run_sessions(url: str, model: str, sessions: list[Session], progress: bool = True) -> list[dict[str, Any]]:
    """Replay sessions: each starts at its time, turns in order with think time; returns one row per turn."""
    import httpx

    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    done = 0
    total = sum(len(s.turns) for s in sessions)

    async def session(client: Any, s: Session) -> None:
        nonlocal done
        await asyncio.sleep(max(0.0, s.start_s - (time.perf_counter() - start)))
        for t in s.turns:
            r = await _one_turn(client, url, model, t.messages, t.max_tokens)
            r.update(session=s.id, turn=t.index, group=t.group, messages=t.messages)
            results.append(r)
            done += 1
            if progress:
                print(f"\r  {done}/{total} requests", end="", flush=True)
            await asyncio.sleep(s.think_s)

    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        await asyncio.gather(*(session(client, s) for s in sessions))
    if progress:
        print()
    return results


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def balance(per_replica: list[float], n_replicas: int) -> float | None:
    """max/mean requests over the deployment's `n_replicas` (Ray's metrics keep series of replaced replicas:
    the busiest `n_replicas` series, zeros included, are the deployment's)."""
    top = sorted(per_replica, reverse=True)[:n_replicas]
    top += [0.0] * (n_replicas - len(top))
    mean = sum(top) / n_replicas
    return max(top) / mean if mean else None


def oracle_of_rows(rows: list[dict], tokenizer: Any, hasher: Any) -> float:
    """The oracle bound of the requests that were answered, in the order they were sent."""
    from tinyserve.bench.router_sim import oracle_hit_rate

    reqs = []
    for r in sorted((r for r in rows if r.get("ok")), key=lambda r: r["sent_at"]):
        ids = tokenizer.token_ids({"messages": r["messages"]})
        reqs.append((hasher.chain(ids), len(ids)))
    return oracle_hit_rate(reqs, hasher.block_size)


def summarize(rows: list[dict], counters: dict[str, dict[str, float]], wall_s: float, n_replicas: int,
              oracle: float | None = None) -> dict[str, Any]:
    ttft = [r["ttft_s"] for r in rows if r.get("ok")]
    hits = sum(c["hits"] for c in counters.values())
    queries = sum(c["queries"] for c in counters.values())
    per_replica = [c["requests"] for c in counters.values()]
    return {
        "requests": len(rows),
        "errors": sum(1 for r in rows if not r.get("ok")),
        "ttft_p50_s": _pct(ttft, 0.5),
        "ttft_p90_s": _pct(ttft, 0.9),
        "ttft_p99_s": _pct(ttft, 0.99),
        "throughput_rps": len(ttft) / wall_s if wall_s else None,
        "hit_rate": hits / queries if queries else None,
        "oracle_hit_rate": oracle,
        "hit_over_oracle": hits / queries / oracle if queries and oracle else None,
        "requests_per_replica": sorted(per_replica, reverse=True),
        "max_over_mean_requests": balance(per_replica, n_replicas),
    }


def calibrate(url: str, model: str, model_dir: str, seed: int = 7) -> dict[str, Any]:
    """Cold TTFT vs prompt tokens (fresh prompts) and decode seconds per token, one request at a time."""
    import random

    from tinyserve.bench.router_workloads import (  # the workloads' text generator
        _text,
        _vocabulary,
    )
    from tinyserve.cache_router.request_tokenizer import RequestTokenizer

    tokenizer = RequestTokenizer(model_dir)
    rng = random.Random(seed)
    vocab = _vocabulary(random.Random(seed + 1))
    pts: list[tuple[int, float]] = []
    decode: list[float] = []
    for words in (50, 150, 300, 500, 700, 50, 300, 700):
        msgs = [{"role": "user", "content": _text(rng, vocab, words)}]
        n = len(tokenizer.token_ids({"messages": msgs}))  # fresh random text: never cached
        r = asyncio.run(_ttft_and_decode(url, model, msgs, 33))
        if r.get("ok"):
            pts.append((n, r["ttft_s"]))
            decode.append((r["e2e_s"] - r["ttft_s"]) / 32)
    # TTFT = overhead + p × tokens, least squares.
    k = max(1, len(pts))
    mx = sum(n for n, _ in pts) / k
    my = sum(t for _, t in pts) / k
    sxx = sum((n - mx) ** 2 for n, _ in pts) or 1.0
    p = max(1e-7, sum((n - mx) * (t - my) for n, t in pts) / sxx)
    o = max(0.0, my - p * mx)
    d = statistics.median(decode) if decode else 0.01
    return {"points": pts, "replica_model": {"prefill_s_per_token": p, "prefill_overhead_s": o,
                                             "decode_s_per_token": d},
            "cost_weights": {"prefill_s_per_token": p, "decode_s_per_request": d}}


async def _ttft_and_decode(url: str, model: str, msgs: list, max_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=300) as client:
        return await _one_turn(client, url, model, msgs, max_tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tinyserve bench router", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="small", choices=["tiny", "small"], help="embedded model (made if missing)")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--routers", default=",".join(ROUTER_KINDS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--sessions-per-s", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=16)
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--allocator", choices=["on", "off"], default="on",
                    help="TinyServe's block pool in the engines (off: vLLM's stock pool)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from tinyserve import serving
    from tinyserve.bench import provenance
    from tinyserve.cache_router.block_hashing import BlockHasher
    from tinyserve.cache_router.request_tokenizer import RequestTokenizer
    from tinyserve.deployments.config import load_config

    model_dir = os.path.abspath(args.model_dir or f"models/tinyserve-{args.model}")
    metrics_port, http_port = free_port(), free_port()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=metrics_port)
    workloads = args.workloads.split(",")
    results: list[dict[str, Any]] = []
    calibration: dict[str, Any] = {}
    t_all = time.time()
    try:
        for router in args.routers.split(","):
            options = {"tokenizer": model_dir, "hash_seed": "0"} if router == "query_aware" else {}
            if router == "query_aware" and calibration:
                options["cost_weights"] = calibration["cost_weights"]
            cfg = load_config(None, overrides={
                "model": {"id": f"tinyserve-{args.model}", "path": model_dir, "make_size": args.model},
                "deployment": {"num_replicas": args.replicas},
                "http": {"port": http_port},
                "router": {"kind": router, "options": options},
                "tinyserve": {"allocator": {"enabled": args.allocator == "on"}},
            })
            print(f"== router {router}: deploying {args.replicas} replicas ...", flush=True)
            t0 = time.time()
            url = serving.start(cfg)
            print(f"   up in {time.time() - t0:.0f} s at {url}", flush=True)
            tokenizer = RequestTokenizer(model_dir)  # the replicas' (the model dir exists once they are up)
            hasher = BlockHasher(cfg.engine.block_size, seed="0")
            if not args.no_calibrate and not calibration:  # on the first deployment: QueryAwareRouter's weights
                calibration = calibrate(url, cfg.model.id, model_dir, seed=args.seed + 1000 * len(results))
                print(f"   calibration: {calibration['replica_model']}", flush=True)
            for rep in range(args.repeats):
                for wl in workloads:
                    sessions = make_workload(wl, seed=args.seed + rep, sessions=args.sessions, turns=args.turns,
                                             max_tokens=args.max_tokens, sessions_per_s=args.sessions_per_s,
                                             tag=f"[{router} {rep}] ")
                    before = replica_counters(scrape(metrics_port))
                    print(f"   {wl} (repeat {rep + 1}/{args.repeats}):", flush=True)
                    t1 = time.perf_counter()
                    rows = asyncio.run(run_sessions(url, cfg.model.id, sessions))
                    wall = time.perf_counter() - t1
                    sent = sum(1 for r in rows if r.get("ok"))
                    delta = wait_for_counters(metrics_port, sent, before)
                    summary = summarize(rows, delta, wall, args.replicas, oracle_of_rows(rows, tokenizer, hasher))
                    summary.update(router=router, workload=wl, repeat=rep, wall_s=wall)
                    results.append(summary)
                    print(f"   {wl}: hit {summary['hit_rate']} (oracle {summary['oracle_hit_rate']}), TTFT p50 {summary['ttft_p50_s']}, "
                          f"p90 {summary['ttft_p90_s']}, max/mean {summary['max_over_mean_requests']}, "
                          f"errors {summary['errors']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    table = _table(results)
    print(table)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "router-live", "machine": provenance.stamp(), "args": vars(args), "calibration": calibration,
           "results": results, "aggregate": _aggregate(results), "wall_s": time.time() - t_all,
           "baselines_in_same_run": [r for r in args.routers.split(",") if r != "query_aware"]}
    path = out / f"router-live-{stamp}.json"
    path.write_text(json.dumps(doc, indent=2))
    _plot(results, out / f"router-live-{stamp}.png")
    print(f"wrote {path}")
    return 0


def _aggregate(results: list[dict]) -> list[dict]:
    agg = []
    for router in dict.fromkeys(r["router"] for r in results):
        for wl in dict.fromkeys(r["workload"] for r in results):
            rs = [r for r in results if r["router"] == router and r["workload"] == wl]
            if not rs:
                continue
            row = {"router": router, "workload": wl, "repeats": len(rs)}
            for k in ("hit_rate", "oracle_hit_rate", "hit_over_oracle", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "throughput_rps", "max_over_mean_requests"):
                vals = [r[k] for r in rs if r[k] is not None]
                row[k] = statistics.mean(vals) if vals else None
                row[k + "_range"] = [min(vals), max(vals)] if vals else None
            row["errors"] = sum(r["errors"] for r in rs)
            agg.append(row)
    return agg


def _table(results: list[dict]) -> str:
    lines = [f"{'workload':8} {'router':16} {'hit':>13} {'hit/oracle':>17} {'TTFT p50 s':>13} {'TTFT p90 s':>13} {'rps':>6} {'max/mean':>11} {'err':>4}"]
    fmt = lambda r, k: f"{r[k]:.3f}" if r[k] is not None else "-"  # noqa: E731
    for row in _aggregate(results):
        rng = lambda k: f"{row[k + '_range'][0]:.2f}-{row[k + '_range'][1]:.2f}" if row[k + "_range"] else "-"  # noqa: E731
        lines.append(f"{row['workload']:8} {row['router']:16} {fmt(row, 'hit_rate'):>5} ({rng('hit_rate')}) "
                     f"{fmt(row, 'hit_over_oracle'):>5} ({rng('hit_over_oracle')}) "
                     f"{fmt(row, 'ttft_p50_s'):>6} ({rng('ttft_p50_s')}) {fmt(row, 'ttft_p90_s'):>6} ({rng('ttft_p90_s')}) "
                     f"{fmt(row, 'throughput_rps'):>6} {fmt(row, 'max_over_mean_requests'):>5} ({rng('max_over_mean_requests')}) "
                     f"{row['errors']:4d}")
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = _aggregate(results)
    wls = list(dict.fromkeys(r["workload"] for r in agg))
    routers = list(dict.fromkeys(r["router"] for r in agg))
    metrics = [("hit_rate", "prefix-cache hit rate (vLLM)"), ("hit_over_oracle", "hit rate / oracle bound"),
               ("ttft_p50_s", "TTFT p50 (s)"), ("ttft_p90_s", "TTFT p90 (s)"), ("ttft_p99_s", "TTFT p99 (s)"),
               ("max_over_mean_requests", "max/mean requests per replica")]
    fig, axes = plt.subplots(2, (len(metrics) + 1) // 2, figsize=(5 * ((len(metrics) + 1) // 2), 8))
    axes = list(axes.flat)
    width = 0.8 / max(1, len(routers))
    for ax, (key, title) in zip(axes, metrics):
        for i, router in enumerate(routers):
            vals, errs = [], []
            for wl in wls:
                row = next((r for r in agg if r["router"] == router and r["workload"] == wl), None)
                v = row[key] if row and row[key] is not None else 0.0
                lo, hi = row[key + "_range"] if row and row[key + "_range"] else (v, v)
                vals.append(v)
                errs.append([v - lo, hi - v])
            xs = [j + i * width for j in range(len(wls))]
            ax.bar(xs, vals, width, label=router, yerr=list(zip(*errs)) if errs else None, capsize=3)
        ax.set_xticks([j + width * (len(routers) - 1) / 2 for j in range(len(wls))])
        ax.set_xticklabels(wls)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
