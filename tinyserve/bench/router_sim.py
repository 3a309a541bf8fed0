"""`tinyserve bench router-sim`: replay the router workloads on a simulated cluster of 8 to 1024 replicas.

Each simulated replica has an LRU prefix cache of `capacity_blocks` blocks keyed by the engine's real block
hashes (prompts tokenized with the model's tokenizer and chat template, hashed by `BlockHasher`), a FIFO
prefill server and a decode batch; its timing is the `ReplicaModel`, calibrated from the live benchmark
(`--calibration benchmarks/results/router-live-*.json`) or defaults measured on this machine's CPU.
Routers compared in the same run, on the same workload:
- ``power_of_two``: Ray Serve's default (two random replicas, the shorter queue);
- ``prefix_affinity``: the policy of Ray's PrefixCacheAffinityRouter, modelled on routed prefixes without
  eviction (highest match if its rate ≥ 10 %, else the replicas holding the least, then the shorter queue);
- ``tinyserve``: TinyServe's `RoutingPolicy` over an exact `KVBlockIndex` fed by the caches' store/evict events.
The oracle bound is the hit rate if every request found the longest prefix any earlier request left, with no
eviction (`oracle_hit_rate`). Hits count as vLLM's counters do: whole blocks of the prompt, at most
``(prompt_tokens − 1) // block_size`` of them (the engine always computes the last prompt token). Reported per router and scale: prefix-cache hit rate, TTFT p50/p90/p99, max/mean requests per
replica, decision latency p50/p99; plus the decision latency at 64 replicas × 100k cached blocks each.
"""

from __future__ import annotations

import argparse
import glob
import heapq
import json
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyserve.bench import provenance
from tinyserve.bench.router_workloads import WORKLOADS, Session, make_workload
from tinyserve.cache_router.block_hashing import BlockHasher
from tinyserve.cache_router.cost_model import CostModel, CostWeights, ReplicaLoad
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.request_tokenizer import RequestTokenizer
from tinyserve.cache_router.routing_policy import RoutingPolicy

__all__ = ["ReplicaModel", "simulate", "oracle_hit_rate", "decision_latency_at_scale", "main"]

ROUTERS = ("power_of_two", "prefix_affinity", "tinyserve")


@dataclass
class ReplicaModel:
    """Timing of one replica: TTFT = overhead + prefill_s_per_token × uncached × (1 + batch_slowdown × running)."""

    prefill_s_per_token: float = 2.0e-4
    prefill_overhead_s: float = 0.02
    decode_s_per_token: float = 0.01
    batch_slowdown: float = 0.05
    capacity_blocks: int = 2000
    max_ongoing: int = 64
    block_size: int = 32


class _Replica:
    __slots__ = ("cache", "prefill_free", "running", "routed", "routed_set", "routed_tokens")

    def __init__(self) -> None:
        self.cache: OrderedDict = OrderedDict()
        self.prefill_free = 0.0
        self.running = 0
        self.routed = 0
        self.routed_set: set = set()  # prefix_affinity's view: every block prefix it routed here
        self.routed_tokens = 0


def _prefix_len(chain: list, held) -> int:
    n = 0
    for h in chain:
        if h not in held:
            break
        n += 1
    return n


class _Router:
    def __init__(self, kind: str, n: int, model: ReplicaModel, weights: CostWeights, seed: int) -> None:
        self.kind = kind
        self.rng = random.Random(seed)
        self.n = n
        self.model = model
        if kind == "tinyserve":
            self.index = KVBlockIndex()
            for r in range(n):
                self.index.add_replica(r, exact=True)
            self.policy = RoutingPolicy(self.index, CostModel(weights), model.block_size)

    def choose(self, reps: list[_Replica], chain: list, tokens: int, now: float, session: str) -> int:
        cap = self.model.max_ongoing
        if self.kind == "power_of_two":
            a, b = self.rng.sample(range(self.n), 2) if self.n > 1 else (0, 0)
            return a if reps[a].running <= reps[b].running else b
        if self.kind == "prefix_affinity":
            match = [_prefix_len(chain, reps[r].routed_set) for r in range(self.n)]
            best = max(match)
            if tokens and best * self.model.block_size / tokens >= 0.1:
                group = [r for r in range(self.n) if match[r] == best]
            else:
                least = min(reps[r].routed_tokens for r in range(self.n))
                group = [r for r in range(self.n) if reps[r].routed_tokens == least]
            open_ = [r for r in group if reps[r].running < cap]
            if not open_:
                a, b = self.rng.sample(range(self.n), 2) if self.n > 1 else (0, 0)
                return a if reps[a].running <= reps[b].running else b
            low = min(reps[r].running for r in open_)
            return self.rng.choice([r for r in open_ if reps[r].running == low])
        loads = {r: ReplicaLoad(num_running=reps[r].running) for r in range(self.n)}
        d = self.policy.choose(range(self.n), loads, chain, tokens, now, session)
        for r in d.ranked:
            if reps[r].running < cap:
                return r
        return d.ranked[0]


def _cacheable_blocks(tokens: int, block_size: int) -> int:
    """Most blocks of a prompt vLLM can take from its prefix cache (it always computes the last token)."""
    return max(0, tokens - 1) // block_size


def oracle_hit_rate(requests: list[tuple[list, int]], block_size: int) -> float:
    """The oracle bound of `requests` ((block-hash chain, prompt tokens), in arrival order): each finds the
    longest prefix any earlier request left, and nothing is evicted."""
    seen: set = set()
    hit = total = 0
    for chain, tokens in requests:
        hit += min(_prefix_len(chain, seen), _cacheable_blocks(tokens, block_size)) * block_size
        total += tokens
        seen.update(chain)
    return hit / total if total else 0.0


def _prepare(sessions: list[Session], tokenizer: RequestTokenizer, hasher: BlockHasher) -> list[list[tuple[list, int]]]:
    out = []
    for s in sessions:
        turns = []
        for t in s.turns:
            ids = tokenizer.token_ids({"messages": t.messages})
            turns.append((hasher.chain(ids), len(ids)))
        out.append(turns)
    return out


def simulate(
    sessions: list[Session],
    prepared: list[list[tuple[list, int]]],
    n_replicas: int,
    router: str,
    model: ReplicaModel,
    weights: CostWeights,
    seed: int = 0,
) -> dict[str, Any]:
    """Discrete-event replay of one workload through one router; returns the report row."""
    reps = [_Replica() for _ in range(n_replicas)]
    rt = _Router(router, n_replicas, model, weights, seed)
    bs = model.block_size
    heap: list = []
    for i, s in enumerate(sessions):
        heapq.heappush(heap, (s.start_s, 0, i, 0, -1))  # (time, kind 0=arrive 1=done, session, turn, replica)
    ttfts, lat = [], []
    hit_tok = prompt_tok = oracle_tok = 0
    seen: set = set()
    req_id = 0
    while heap:
        now, kind, si, ti, r = heapq.heappop(heap)
        if kind == 1:
            reps[r].running -= 1
            if rt.kind == "tinyserve":
                rt.policy.complete((si, ti))
            if ti + 1 < len(sessions[si].turns):
                heapq.heappush(heap, (now + sessions[si].think_s, 0, si, ti + 1, -1))
            continue
        chain, tokens = prepared[si][ti]
        turn = sessions[si].turns[ti]
        t0 = time.perf_counter()
        r = rt.choose(reps, chain, tokens, now, turn.session)
        lat.append(time.perf_counter() - t0)
        rep = reps[r]
        cacheable = _cacheable_blocks(tokens, bs)
        held = _prefix_len(chain, rep.cache)
        hit = min(held, cacheable)
        oracle_tok += min(_prefix_len(chain, seen), cacheable) * bs
        seen.update(chain)
        for h in chain[:held]:
            rep.cache.move_to_end(h)
        new = chain[held:]
        for h in new:
            rep.cache[h] = True
        evicted = []
        while len(rep.cache) > model.capacity_blocks:
            evicted.append(rep.cache.popitem(last=False)[0])
        if rt.kind == "tinyserve":
            rt.index.store(r, new)
            rt.index.remove(r, evicted)
            rt.policy.record_routed((si, ti), r, chain, tokens, hit, now, turn.session)
        rep.routed_set.update(chain)
        rep.routed_tokens += tokens
        uncached = tokens - hit * bs
        start = max(now, rep.prefill_free)
        slow = 1.0 + model.batch_slowdown * rep.running
        first = start + model.prefill_overhead_s + model.prefill_s_per_token * uncached * slow
        rep.prefill_free = first
        rep.running += 1
        rep.routed += 1
        done = first + turn.max_tokens * model.decode_s_per_token * slow
        heapq.heappush(heap, (done, 1, si, ti, r))
        ttfts.append(first - now)
        hit_tok += hit * bs
        prompt_tok += tokens
        req_id += 1
    ttfts.sort()
    lat.sort()
    counts = [x.routed for x in reps]
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else None  # noqa: E731
    return {
        "router": router,
        "replicas": n_replicas,
        "requests": req_id,
        "hit_rate": hit_tok / prompt_tok if prompt_tok else 0.0,
        "oracle_hit_rate": oracle_tok / prompt_tok if prompt_tok else 0.0,
        "ttft_p50_s": q(ttfts, 0.5),
        "ttft_p90_s": q(ttfts, 0.9),
        "ttft_p99_s": q(ttfts, 0.99),
        "max_over_mean_requests": max(counts) / (sum(counts) / len(counts)) if sum(counts) else None,
        "decision_latency_p50_s": q(lat, 0.5),
        "decision_latency_p99_s": q(lat, 0.99),
    }


def decision_latency_at_scale(replicas: int = 64, blocks_per_replica: int = 100_000, decisions: int = 2000,
                              chain_blocks: int = 64, seed: int = 0) -> dict[str, Any]:
    """TinyServe's decision (index lookup + cost + bounds) with `replicas` × `blocks_per_replica` cached blocks."""
    rng = random.Random(seed)
    index = KVBlockIndex()
    shared = [rng.getrandbits(64) for _ in range(chain_blocks)]
    for r in range(replicas):
        index.add_replica(r, exact=True)
        k = rng.randint(0, chain_blocks)
        index.store(r, shared[:k])
        index.store(r, (rng.getrandbits(64) for _ in range(blocks_per_replica - k)))
    policy = RoutingPolicy(index, CostModel(), 32)
    cands = list(range(replicas))
    lat = []
    for i in range(decisions):
        chain = shared[: rng.randint(1, chain_blocks)] + [rng.getrandbits(64) for _ in range(rng.randint(0, 16))]
        loads = {r: ReplicaLoad(num_running=rng.randint(0, 8)) for r in cands}
        t0 = time.perf_counter()
        d = policy.choose(cands, loads, chain, len(chain) * 32, now=i * 0.01)
        lat.append(time.perf_counter() - t0)
        policy.record_routed(i, d.ranked[0], chain, len(chain) * 32, d.prefix_blocks[d.ranked[0]], now=i * 0.01)
        if i >= 16:
            policy.complete(i - 16)
    lat.sort()
    total = index.total_blocks()
    del index
    return {"replicas": replicas, "blocks_per_replica": blocks_per_replica, "cached_blocks_total": total,
            "decisions": decisions, "p50_s": lat[len(lat) // 2], "p99_s": lat[int(0.99 * len(lat))],
            "max_s": lat[-1]}


def _load_calibration(path: str | None) -> tuple[ReplicaModel, CostWeights, str]:
    if path is None:
        found = sorted(glob.glob("benchmarks/results/router-live-*.json"))
        path = found[-1] if found else None
    if path is None:
        return ReplicaModel(), CostWeights(), "defaults"
    data = json.loads(Path(path).read_text())
    cal = data.get("calibration", {})
    model = ReplicaModel(**{k: v for k, v in cal.get("replica_model", {}).items() if k in ReplicaModel.__dataclass_fields__})
    weights = CostWeights(**{k: v for k, v in cal.get("cost_weights", {}).items() if k in CostWeights.__dataclass_fields__})
    return model, weights, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tinyserve bench router-sim", description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default="models/tinyserve-small", help="tokenizer + chat template (made if missing)")
    ap.add_argument("--replicas", default="8,16,64,256,1024")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--sessions-per-replica", type=float, default=3.0)
    ap.add_argument("--max-sessions", type=int, default=3072)
    ap.add_argument("--calibration", default=None, help="a router-live JSON (default: the latest one, else defaults)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-blocks", type=int, default=100_000, help="blocks per replica for the latency probe")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    if not Path(args.model_dir).exists():
        from tinyserve.models.make_model import make_model

        make_model(args.model_dir, "small" if "small" in args.model_dir else "tiny")
    model, weights, cal_src = _load_calibration(args.calibration)
    tokenizer = RequestTokenizer(args.model_dir)
    hasher = BlockHasher(model.block_size, seed="0")
    scales = [int(x) for x in args.replicas.split(",")]
    rows = []
    print(f"calibration: {cal_src}; replica model {asdict(model)}", flush=True)
    hdr = f"{'workload':8} {'replicas':>8} {'router':16} {'hit':>6} {'oracle':>6} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'max/mean':>8} {'dec p99 us':>10}"
    print(hdr)
    for wl in args.workloads.split(","):
        for n in scales:
            sessions_n = int(min(args.max_sessions, max(8, args.sessions_per_replica * n)))
            groups = {"chat": max(4, n // 2), "hot": max(8, n), "rag": max(8, n)}[wl]
            sessions = make_workload(wl, seed=args.seed, sessions=sessions_n, groups=groups,
                                     sessions_per_s=0.5 * n)
            t0 = time.time()
            prepared = _prepare(sessions, tokenizer, hasher)
            for router in ROUTERS:
                row = simulate(sessions, prepared, n, router, model, weights, seed=args.seed)
                row["workload"] = wl
                rows.append(row)
                print(f"{wl:8} {n:8d} {router:16} {row['hit_rate']:6.3f} {row['oracle_hit_rate']:6.3f} "
                      f"{row['ttft_p50_s']:7.3f} {row['ttft_p90_s']:7.3f} {row['ttft_p99_s']:7.3f} "
                      f"{row['max_over_mean_requests']:8.2f} {row['decision_latency_p99_s'] * 1e6:10.1f}", flush=True)
            print(f"  ({sum(len(s.turns) for s in sessions)} requests, {time.time() - t0:.1f} s)", flush=True)
    print(f"decision latency probe: 64 replicas x {args.scale_blocks} cached blocks ...", flush=True)
    probe = decision_latency_at_scale(64, args.scale_blocks, seed=args.seed)
    print(f"  p50 {probe['p50_s'] * 1e6:.0f} us, p99 {probe['p99_s'] * 1e6:.0f} us (target p99 <= 1000 us)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "router-sim", "machine": provenance.stamp(), "calibration_source": cal_src,
              "replica_model": asdict(model), "cost_weights": asdict(weights), "rows": rows,
              "decision_latency_probe": probe, "args": vars(args)}
    path = out / f"router-sim-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    _plot(rows, out / f"router-sim-{stamp}.png")
    print(f"wrote {path}")
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(3, len(wls), figsize=(5 * len(wls), 10), squeeze=False)
    for j, wl in enumerate(wls):
        for router in ROUTERS:
            rs = sorted((r for r in rows if r["workload"] == wl and r["router"] == router), key=lambda r: r["replicas"])
            xs = [r["replicas"] for r in rs]
            axes[0][j].plot(xs, [r["hit_rate"] for r in rs], marker="o", label=router)
            axes[1][j].plot(xs, [r["ttft_p90_s"] for r in rs], marker="o", label=router)
            axes[2][j].plot(xs, [r["max_over_mean_requests"] for r in rs], marker="o", label=router)
        rs = sorted((r for r in rows if r["workload"] == wl and r["router"] == "tinyserve"), key=lambda r: r["replicas"])
        axes[0][j].plot([r["replicas"] for r in rs], [r["oracle_hit_rate"] for r in rs], "k--", label="oracle bound")
        axes[0][j].set_title(f"{wl}: prefix-cache hit rate")
        axes[1][j].set_title(f"{wl}: TTFT p90 (s)")
        axes[2][j].set_title(f"{wl}: max/mean requests per replica")
        for i in range(3):
            axes[i][j].set_xscale("log", base=2)
            axes[i][j].set_xlabel("replicas")
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
