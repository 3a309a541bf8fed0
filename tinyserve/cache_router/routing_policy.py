"""The routing decision, free of Ray: rank replicas for a request by expected cost, within a balance bound.

For a request with block-hash chain `chain`: every healthy candidate's longest cached prefix (from the
`KVBlockIndex`) gives its overlap credit; the `CostModel` turns prefix, load and KV pressure into seconds,
and charges each replica for its recent requests above the mean (`CostModel.share_penalty_s`), so that a new
prefix goes where recent traffic was light rather than where a short shared overlap happens to be.
Two balance bounds keep a hot prefix from piling onto one replica (the request *spills* to the next
cheapest replica when its cheapest one is over a bound). Each bound caps what a replica would hold after
taking the request at ``max(balance_factor × level, ceil(level) + slack)``, where ``level`` is the
per-replica mean after the request:
- in flight: requests in flight (``inflight_slack``);
- share: recent requests, exponentially decayed with a half-life of ``share_half_life`` decisions per
  replica (the memory grows with the cluster, so each replica's share counts a similar number of its own
  requests at any size) (``share_slack``); moot
  while nothing is in flight anywhere (nothing could queue behind the request; sequential requests stay
  where their prefix is cached).
The factor is the bound that holds once the mean is a few requests; the integer slack only lets the first
requests of a burst share a replica (with a mean below one request no ratio can hold). So, whatever the
prefix popularity, a replica's recent requests stay within ``balance_factor`` of the mean once it exceeds
``slack / (balance_factor - 1)`` requests, and a hot prefix spreads over as many replicas as its traffic needs
(each spill pays one cold prefill of the prefix; the cost model sends later ones to replicas that hold it).
A session key (header or OpenAI ``user``) pins later turns to the replica of the first while that replica
is within both bounds. The same object serves the Ray Serve router and the simulator.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from tinyserve.cache_router.cost_model import CostModel, ReplicaLoad
from tinyserve.cache_router.kv_block_index import KVBlockIndex

__all__ = ["Decision", "RoutingPolicy"]

_WORK_EWMA = 1.0 / 64  # weight of the newest request in the running mean of work per request


@dataclass
class Decision:
    """One routing decision: replicas best first, and what the prefix index said."""

    ranked: list[Hashable]
    prefix_blocks: dict[Hashable, int] = field(default_factory=dict)
    best_prefix_blocks: int = 0
    spilled: bool = False
    by_session: bool = False


@dataclass
class _ReplicaState:
    inflight: int = 0
    prefill_busy_until: float = 0.0
    share: float = 0.0  # decayed request count, valid at tick `share_tick`
    share_tick: int = 0
    routed: int = 0


class RoutingPolicy:
    """Owns per-replica router-side load (in flight, prefill backlog, decayed share), sessions, and the
    link between decisions and the index's approximate mode.

    Invariants: `_state` has an entry for every replica seen and not removed; a request id is in
    `_inflight` from `record_routed` until `complete` (then the replica's in-flight count drops by one).
    Not thread-safe: call it from one thread (the router's event loop).

    Args:
        index: the KV block index (exact replicas fed by events; approximate by `record_routed`).
        cost: the cost model.
        block_size: tokens per block of the chains passed in.
        balance_factor, inflight_slack, share_slack, share_half_life: the balance bounds (see module doc).
        session_capacity: most sessions remembered (least recently used forgotten first).
    """

    def __init__(
        self,
        index: KVBlockIndex,
        cost: CostModel,
        block_size: int,
        balance_factor: float = 1.25,
        inflight_slack: float = 2.0,
        share_slack: float = 2.0,
        share_half_life: float = 16.0,
        session_capacity: int = 100_000,
    ) -> None:
        self.index = index
        self.cost = cost
        self.block_size = block_size
        self.balance_factor = balance_factor
        self.inflight_slack = inflight_slack
        self.share_slack = share_slack
        self.share_half_life = share_half_life
        self._decay = 0.5 ** (1.0 / max(1.0, share_half_life))
        self._decay_replicas = 1
        self._tick = 0
        self._state: dict[Hashable, _ReplicaState] = {}
        self._inflight: dict[Hashable, Hashable] = {}
        self._sessions: OrderedDict[str, Hashable] = OrderedDict()
        # Running mean of the work (s) per routed request, the share penalty's unit. It starts at one decode
        # step, not at the first (cold) request: prefixes settle on replicas before balance weighs in fully.
        self._work_s = cost.weights.decode_s_per_request
        self._session_capacity = session_capacity

    # ----- replicas --------------------------------------------------------------------------------
    def remove_replica(self, replica: Hashable) -> None:
        self._state.pop(replica, None)
        for rid in [k for k, r in self._inflight.items() if r == replica]:
            del self._inflight[rid]

    def routed_counts(self) -> dict[Hashable, int]:
        return {r: s.routed for r, s in self._state.items()}

    def inflight(self, replica: Hashable) -> int:
        s = self._state.get(replica)
        return s.inflight if s else 0

    def prefill_backlog_s(self, replica: Hashable, now: float) -> float:
        s = self._state.get(replica)
        return max(0.0, s.prefill_busy_until - now) if s else 0.0

    def _cap(self, level: float, slack: float) -> float:
        """Most a replica may hold after a request when the per-replica mean after it is `level`."""
        return max(self.balance_factor * level, math.ceil(level - 1e-9) + slack)

    def _share(self, s: _ReplicaState) -> float:
        return s.share * self._decay ** (self._tick - s.share_tick)

    # ----- decisions -------------------------------------------------------------------------------
    def choose(
        self,
        candidates: Sequence[Hashable],
        loads: dict[Hashable, ReplicaLoad],
        chain: Sequence[Hashable],
        prompt_tokens: int,
        now: float,
        session: str | None = None,
    ) -> Decision:
        """Rank healthy candidates (unhealthy ones never appear). `loads[r].inflight` and
        `.prefill_backlog_s` are filled in here from the router's own state."""
        healthy = [r for r in candidates if loads.get(r) is None or loads[r].healthy]
        if not healthy:
            return Decision(ranked=[])
        prefix = self.index.longest_prefix(chain, healthy) if chain else dict.fromkeys(healthy, 0)
        best = max(prefix.values())
        n = len(healthy)
        if n != self._decay_replicas:
            self._decay_replicas = n
            self._decay = 0.5 ** (1.0 / max(1.0, self.share_half_life * n))
        cost_of = self.cost.cost
        bs = self.block_size
        states = self._state
        total_req = 0
        total_own = 0
        total_share = 0.0
        rows = []
        for r in healthy:
            s = states.get(r)
            if s is None:
                s = states[r] = _ReplicaState(share_tick=self._tick)
            load = loads.get(r) or ReplicaLoad()
            load.inflight = s.inflight
            load.prefill_backlog_s = s.prefill_busy_until - now if s.prefill_busy_until > now else 0.0
            share = self._share(s)
            req = load.requests
            total_req += req
            total_own += s.inflight
            total_share += share
            rows.append((cost_of(prompt_tokens, prefix[r] * bs, load), r, req, share))
        mean_share = total_share / n
        penalty, work = self.cost.share_penalty_s, self._work_s
        rows = [(c + penalty(sh - mean_share, work), r, req, sh) for c, r, req, sh in rows]
        rows.sort(key=lambda row: row[0])
        req_cap = self._cap((total_req + 1) / n, self.inflight_slack)
        share_cap = self._cap((total_share + 1) / n, self.share_slack)
        # With none of this router's requests in flight the share bound is moot (nothing it sent can queue
        # behind the request, and sequential requests stay where their prefix is cached); otherwise it holds.
        share_cap = share_cap if total_own else float("inf")
        eligible = [row[1] for row in rows if row[2] + 1 <= req_cap and row[3] + 1 <= share_cap]
        if not eligible:
            eligible = [row[1] for row in rows]
        spilled = eligible[0] != rows[0][1]
        by_session = False
        if session is not None:
            # A session's later turns follow its first while that replica is within both bounds (its turns
            # count towards its share like any request: a pinned session cannot unbalance the replicas).
            pinned = self._sessions.get(session)
            if pinned is not None and pinned in eligible:
                eligible.remove(pinned)
                eligible.insert(0, pinned)
                by_session = True
        eligible_set = set(eligible)
        ranked = eligible + [row[1] for row in rows if row[1] not in eligible_set]
        return Decision(ranked=ranked, prefix_blocks=prefix, best_prefix_blocks=best, spilled=spilled,
                        by_session=by_session)

    def record_routed(
        self,
        request_id: Hashable,
        replica: Hashable,
        chain: Sequence[Hashable],
        prompt_tokens: int,
        cached_blocks: int,
        now: float,
        session: str | None = None,
    ) -> None:
        """The request went to `replica` (not always the first ranked: Ray skips full replicas)."""
        s = self._state.get(replica)
        if s is None:
            s = self._state[replica] = _ReplicaState(share_tick=self._tick)
        self._tick += 1
        s.share = self._share(s) * self._decay + 1.0
        s.share_tick = self._tick
        s.inflight += 1
        s.routed += 1
        start = s.prefill_busy_until if s.prefill_busy_until > now else now
        prefill = self.cost.prefill_s(prompt_tokens - cached_blocks * self.block_size)
        s.prefill_busy_until = start + prefill
        work = prefill + self.cost.weights.decode_s_per_request
        self._work_s += _WORK_EWMA * (work - self._work_s)
        self._inflight[request_id] = replica
        if chain:
            self.index.record_decision(replica, chain, now)
        if session is not None:
            self._sessions[session] = replica
            self._sessions.move_to_end(session)
            if len(self._sessions) > self._session_capacity:
                self._sessions.popitem(last=False)

    def complete(self, request_id: Hashable) -> None:
        replica = self._inflight.pop(request_id, None)
        if replica is None:
            return
        s = self._state.get(replica)
        if s is not None and s.inflight > 0:
            s.inflight -= 1
