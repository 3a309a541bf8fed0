"""`QueryAwareRouter`: the Ray Serve request router of TinyServe's LLM deployment.

Per request: tokenize as the engine will (chat template included) and compute the block-hash chain on a
worker thread (never on the event loop), then rank replicas with `RoutingPolicy` (index lookup + cost,
bounded O(blocks + replicas) work on the loop). Replicas are learnt from their routing stats
(`RunningReplica.routing_stats`, filled by `TinyServeLLMServer.record_routing_stats`):
``kv_events_endpoint``/``kv_events_replay_endpoint`` (subscribed; the replica's index entry is exact),
``engine_pid`` (a new pid resyncs), ``block_size``, ``num_running``/``num_waiting``, ``kv`` (``usage``,
``free_space_scatter``), optional ``healthy``, ``stats_age_s``, ``hash_seed``, ``hash_algo``, ``tokenizer``,
``node_ip`` (dialled for a wildcard endpoint ``tcp://*:port``; a concrete ``tcp://127.0.0.1:port`` endpoint
makes vLLM's PUB connect, so the router binds it and must share the replica's host).
A replica without an endpoint is tracked approximately from this router's own decisions.

Deployment config (`request_router_config`):
``request_router_class: tinyserve.cache_router:QueryAwareRouter`` and ``request_router_kwargs`` taking the
arguments of `initialize_state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray.serve._private.common import ReplicaID
from ray.serve._private.replica_result import ReplicaResult
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from tinyserve.cache_router.block_hashing import BlockHasher
from tinyserve.cache_router.cost_model import CostModel, CostWeights, ReplicaLoad
from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.kv_event_subscriber import KVEventSubscriber
from tinyserve.cache_router.request_tokenizer import RequestTokenizer, request_fields
from tinyserve.cache_router.router_metrics import RouterMetrics
from tinyserve.cache_router.routing_policy import RoutingPolicy

__all__ = ["QueryAwareRouter", "SESSION_HEADER"]

logger = logging.getLogger("ray.serve")

SESSION_HEADER = "x-session-id"  # Ray Serve puts it in RequestMetadata.session_id


class _Prepared:
    """A request's routing inputs, computed once per request (Ray may call choose_replicas repeatedly)."""

    __slots__ = ("chain", "prompt_tokens", "session", "decision", "decided_at")

    def __init__(self, chain: list, prompt_tokens: int, session: str | None) -> None:
        self.chain = chain
        self.prompt_tokens = prompt_tokens
        self.session = session
        self.decision = None
        self.decided_at = 0.0


class QueryAwareRouter(RequestRouter):
    """Sends each request to the replica whose KV cache best matches it, weighed against load.

    Owns the KV block index, the event subscriber (one thread), the tokenizer worker (one thread), the
    routing policy and the metrics. Invariants: every replica in `self._replicas` that reports a KV-event
    endpoint is subscribed under its current engine pid; replicas that died are gone from index, policy and
    subscriber; `_prepared` holds only requests not yet routed.
    """

    def initialize_state(
        self,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        hash_seed: str | None = None,
        hash_algo: str | None = None,
        block_size: int | None = None,
        cost_weights: dict[str, float] | None = None,
        balance_factor: float = 1.25,
        inflight_slack: float = 2.0,
        share_slack: float = 2.0,
        share_half_life: float = 16.0,
        approx_ttl_s: float = 120.0,
        unhealthy_stats_age_s: float = 30.0,
        silent_stream_s: float = 15.0,
        decision_log: str | None = None,
    ) -> None:
        """Args: `tokenizer` model dir (default: the replicas' routing stats ``tokenizer``); `hash_seed`,
        `hash_algo`, `block_size`: the engine's (default: routing stats, then this process's
        PYTHONHASHSEED, sha256); `cost_weights`: `CostWeights` fields; balance knobs: `RoutingPolicy`;
        `approx_ttl_s`: expiry of decision-learnt blocks; `unhealthy_stats_age_s`: replicas whose engine
        stats are older are skipped; `silent_stream_s`: a replica whose event stream has delivered nothing
        this long after this router sent it a request is treated as having no events (approximate mode);
        `decision_log`: a file to append one JSON line per decision to
        (diagnostics; written from the worker thread, never the event loop)."""
        self._tokenizer_path = tokenizer
        self._chat_template = chat_template
        self._hash_seed = hash_seed
        self._hash_algo = hash_algo
        self._block_size = block_size
        self._unhealthy_stats_age_s = unhealthy_stats_age_s
        self._silent_stream_s = silent_stream_s
        self._first_routed_at: dict[ReplicaID, float] = {}
        self._cost = CostModel(CostWeights(**(cost_weights or {})))
        self._index = KVBlockIndex(approx_ttl_s=approx_ttl_s)
        self._policy_kwargs = dict(balance_factor=balance_factor, inflight_slack=inflight_slack,
                                   share_slack=share_slack, share_half_life=share_half_life)
        self._policy: RoutingPolicy | None = None
        self._hasher: BlockHasher | None = None
        self._tokenizer: RequestTokenizer | None = None
        self._subscriber: KVEventSubscriber | None = None
        self._subscribed: dict[ReplicaID, tuple] = {}
        self._hash_mismatch: set[ReplicaID] = set()
        self._events_broken: set[ReplicaID] = set()
        self._prepared: dict[str, _Prepared] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinyserve-router-tokenize")
        self._last_expire = 0.0
        self._decision_log = open(decision_log, "a", buffering=1) if decision_log else None
        dep = self._deployment_id
        self.metrics = RouterMetrics(deployment=f"{dep.app_name}:{dep.name}" if dep else "")

    # ----- replica bookkeeping -------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        old = set(self._replica_id_set)
        super().update_replicas(replicas)
        for rid in old - set(self._replica_id_set):
            self._forget(rid)
        for r in replicas:
            self._sync_replica(r)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def _forget(self, rid: ReplicaID) -> None:
        if self._subscriber is not None and rid in self._subscribed:
            self._subscriber.remove(rid)
        self._subscribed.pop(rid, None)
        self._first_routed_at.pop(rid, None)
        self._events_broken.discard(rid)
        self._hash_mismatch.discard(rid)
        self._index.remove_replica(rid)
        if self._policy is not None:
            self._policy.remove_replica(rid)

    def _sync_replica(self, r: RunningReplica) -> None:
        stats = r.routing_stats or {}
        if self._block_size is None and stats.get("block_size"):
            self._block_size = int(stats["block_size"])
        if self._tokenizer_path is None and stats.get("tokenizer"):
            self._tokenizer_path = stats["tokenizer"]
        if self._hash_seed is None and stats.get("hash_seed") is not None:
            self._hash_seed = str(stats["hash_seed"])
        if self._hash_algo is None and stats.get("hash_algo"):
            self._hash_algo = stats["hash_algo"]
        endpoint = stats.get("kv_events_endpoint")
        rid = r.replica_id
        if endpoint:
            key = (endpoint, stats.get("kv_events_replay_endpoint"), stats.get("engine_pid"))
            known = self._subscribed.get(rid)
            if known == key:
                return
            if rid in self._hash_mismatch or rid in self._events_broken:
                return
            if self._subscriber is None:
                self._subscriber = KVEventSubscriber(self._index, root_check=self._root_check)
            host = stats.get("node_ip")
            if known is None:
                self._subscriber.add(rid, key[0], key[1], key[2], host)
            else:
                self._subscriber.update(rid, key[0], key[1], key[2], host)
            self._subscribed[rid] = key
        elif rid not in self._subscribed and rid not in self._index.replicas():
            capacity = (stats.get("kv") or {}).get("num_blocks")
            self._index.add_replica(rid, exact=False, capacity_blocks=capacity)

    def _root_check(self, token_ids: list, block_hash: Any, extra_keys: Any) -> bool:
        """Subscriber thread: does this router hash the engine's root blocks to the published values?"""
        hasher = self._hasher
        return True if hasher is None else hasher.first_block_matches(token_ids, block_hash, extra_keys)

    def _check_hash_agreement(self, rid: ReplicaID) -> None:
        """A replica whose every checked root block disagrees hashes differently (seed, algorithm, block
        size): its events cannot match this router's chains, so learn it from decisions instead."""
        checks, mismatches = self._subscriber.hash_agreement(rid)
        if checks >= 2 and mismatches == checks:
            logger.warning(
                "TinyServe router: replica %s publishes block hashes this router cannot reproduce "
                "(hash seed/algorithm/block size differ); routing it from own decisions.", rid)
            self._hash_mismatch.add(rid)
            self._subscriber.remove(rid, drop_index=False)
            self._subscribed.pop(rid, None)
            self._index.add_replica(rid, exact=False)

    def _check_stream_alive(self, rid: ReplicaID) -> None:
        """An engine that served this router's requests publishes BlockStored events; a stream silent long
        after the first such request is broken (wrong endpoint, firewall): use the approximate index."""
        now = time.time()
        first = self._first_routed_at.setdefault(rid, now)
        silent = self._subscriber.silent_since(rid)
        if silent is None or rid not in self._subscribed:
            return
        if now - max(first, silent) > self._silent_stream_s:
            logger.warning(
                "TinyServe router: no KV events from replica %s at %s after %.0f s of traffic; routing it "
                "from own decisions.", rid, self._subscribed[rid][0], now - max(first, silent))
            self._events_broken.add(rid)
            self._subscriber.remove(rid, drop_index=False)
            self._subscribed.pop(rid, None)
            self._index.add_replica(rid, exact=False)

    def _load(self, r: RunningReplica) -> ReplicaLoad:
        stats = r.routing_stats or {}
        kv = stats.get("kv") or {}
        age = stats.get("stats_age_s")
        healthy = stats.get("healthy", True) is not False and not (
            age is not None and age > self._unhealthy_stats_age_s
        )
        return ReplicaLoad(
            num_running=int(stats.get("num_running") or 0),
            num_waiting=int(stats.get("num_waiting") or 0),
            kv_usage=float(kv.get("usage") or 0.0),
            free_space_scatter=float(kv.get("free_space_scatter") or 0.0),
            healthy=healthy,
        )

    # ----- per request -----------------------------------------------------------------------------------
    def _ensure_ready(self) -> bool:
        if self._policy is None and self._block_size:
            self._hasher = BlockHasher(self._block_size, algo=self._hash_algo or "sha256", seed=self._hash_seed)
            self._policy = RoutingPolicy(self._index, self._cost, self._block_size, **self._policy_kwargs)
        return self._policy is not None

    def _prepare(self, request: Any, session: str | None) -> _Prepared:
        """Worker thread: tokenize (loading the tokenizer the first time) and hash."""
        if self._tokenizer is None and self._tokenizer_path:
            self._tokenizer = RequestTokenizer(self._tokenizer_path, self._chat_template)
        tokens = self._tokenizer.token_ids(request) if self._tokenizer is not None else None
        if not tokens:
            return _Prepared([], 0, session)
        f = request_fields(request)
        salt = f["cache_salt"]
        return _Prepared(self._hasher.chain(tokens, cache_salt=salt), len(tokens), session)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        for r in candidate_replicas:
            self._sync_replica(r)
        if pending_request is None or not pending_request.args or not self._ensure_ready():
            return [candidate_replicas]
        t0 = time.perf_counter()
        rid = pending_request.metadata.internal_request_id
        prep = self._prepared.get(rid)
        if prep is None:
            session = pending_request.metadata.session_id or request_fields(pending_request.args[0])["user"] or None
            prep = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._prepare, pending_request.args[0], session
            )
            self._prepared[rid] = prep
            if len(self._prepared) > 10_000:  # requests cancelled before routing never reach on_request_routed
                del self._prepared[next(iter(self._prepared))]
        now = time.time()
        if now - self._last_expire > 1.0:
            self._index.expire(now)
            self._last_expire = now
        by_id = {r.replica_id: r for r in candidate_replicas}
        loads = {r.replica_id: self._load(r) for r in candidate_replicas}
        decision = self._policy.choose(list(by_id), loads, prep.chain, prep.prompt_tokens, now, prep.session)
        prep.decision = decision
        self.metrics.on_decision(time.perf_counter() - t0)
        if self._decision_log is not None:
            self._worker.submit(self._log_decision, rid, prep, decision, candidate_replicas)
        ranked = [by_id[k] for k in decision.ranked]
        if not ranked:
            return []
        return [ranked[:1], ranked[1:3], ranked[3:]] if len(ranked) > 3 else [[r] for r in ranked]

    def _log_decision(self, rid: str, prep: _Prepared, decision: Any, candidates: list[RunningReplica]) -> None:
        import json

        line = {
            "t": time.time(), "request": rid, "prompt_tokens": prep.prompt_tokens, "chain_blocks": len(prep.chain),
            "session": prep.session, "ranked": [str(k.unique_id) for k in decision.ranked],
            "prefix_blocks": {str(k.unique_id): v for k, v in decision.prefix_blocks.items()},
            "spilled": decision.spilled, "by_session": decision.by_session,
            "exact": {str(r.replica_id.unique_id): self._index.is_exact(r.replica_id) for r in candidates},
            "index_blocks": {str(r.replica_id.unique_id): self._index.num_blocks(r.replica_id) for r in candidates},
            "streams": {str(k.unique_id): [s.batches, s.resyncs, s.hash_checks, s.hash_mismatches, s.complete]
                        for k, s in (self._subscriber.streams().items() if self._subscriber else [])},
            "stats_keys": {str(r.replica_id.unique_id): sorted((r.routing_stats or {}).keys()) for r in candidates},
        }
        self._decision_log.write(json.dumps(line) + "\n")

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        rid = pending_request.metadata.internal_request_id
        prep = self._prepared.pop(rid, None)
        if prep is None or self._policy is None:
            return
        d = prep.decision
        prefix = d.prefix_blocks.get(replica_id, 0) if d else 0
        bs = self._block_size or 0
        self._policy.record_routed(rid, replica_id, prep.chain, prep.prompt_tokens, prefix, time.time(), prep.session)
        spilled = bool(d and d.spilled and d.ranked and d.ranked[0] == replica_id)
        self.metrics.on_routed(
            replica_id.unique_id, prep.prompt_tokens, prefix * bs, (d.best_prefix_blocks if d else 0) * bs, spilled
        )
        resyncs = None
        if self._subscriber is not None and replica_id in self._subscribed:
            resyncs = self._subscriber.resyncs(replica_id)
            self._check_hash_agreement(replica_id)
            self._check_stream_alive(replica_id)
        self.metrics.set_replica(replica_id.unique_id, self._index.num_blocks(replica_id), self._lag(replica_id), resyncs)

    def _lag(self, replica_id: ReplicaID) -> float | None:
        if self._subscriber is None or replica_id not in self._subscribed:
            return None
        return self._subscriber.event_lag_s(replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._policy is not None:
            self._policy.complete(internal_request_id)
