"""Which KV blocks each replica holds, and each replica's longest cached prefix of a prompt.

Fed two ways. Exact replicas: the vLLM KV events of the replica's engine (`store`/`remove`/`clear`),
so the index mirrors the engine's prefix cache. Approximate replicas (no event stream, or a stream
that is down): the router's own decisions (`record_decision`), each block kept until it expires or the
replica's capacity pushes it out, oldest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence

__all__ = ["KVBlockIndex"]

BlockHash = Hashable
ReplicaKey = Hashable


class KVBlockIndex:
    """Inverted index block hash → replicas holding it, with a per-replica reference count.

    Owns: ``_holders`` (hash → set of replicas), ``_counts`` (replica → hash → number of engine blocks
    with that hash; vLLM may cache the same hash twice), ``_approx`` (replica → hash → expiry time, in
    insertion/refresh order) and each replica's mode. Invariants: ``r in _holders[h]`` iff
    ``_counts[r][h] > 0``; no empty set stays in ``_holders``; an approximate replica's counts are all 1
    and its keys equal ``_approx[r]``'s. All methods are thread-safe (one lock; the event subscriber
    writes from its thread, the router reads on its event loop), and every call holds the lock for
    O(blocks touched), never O(index).

    Args:
        approx_ttl_s: how long a block recorded from a decision is assumed cached.
        approx_capacity_blocks: default cap of blocks assumed cached per approximate replica.
    """

    def __init__(self, approx_ttl_s: float = 120.0, approx_capacity_blocks: int = 100_000) -> None:
        self.approx_ttl_s = approx_ttl_s
        self.approx_capacity_blocks = approx_capacity_blocks
        self._lock = threading.Lock()
        self._holders: dict[BlockHash, set[ReplicaKey]] = {}
        self._counts: dict[ReplicaKey, dict[BlockHash, int]] = {}
        self._approx: dict[ReplicaKey, OrderedDict[BlockHash, float]] = {}
        self._capacity: dict[ReplicaKey, int] = {}

    # ----- replicas -------------------------------------------------------------------------------
    def add_replica(self, replica: ReplicaKey, exact: bool, capacity_blocks: int | None = None) -> None:
        """Start tracking a replica (idempotent); `exact` says whether KV events feed it."""
        with self._lock:
            self._counts.setdefault(replica, {})
            if capacity_blocks:
                self._capacity[replica] = capacity_blocks
            if exact:
                self._approx.pop(replica, None)
            else:
                self._approx.setdefault(replica, OrderedDict())

    def set_exact(self, replica: ReplicaKey, exact: bool) -> None:
        """Switch a replica's mode; its blocks are dropped (they came from the other source)."""
        with self._lock:
            was_exact = replica in self._counts and replica not in self._approx
            if replica in self._counts and was_exact == exact:
                return
            self._clear_locked(replica)
            self._counts[replica] = {}
            if exact:
                self._approx.pop(replica, None)
            else:
                self._approx[replica] = OrderedDict()

    def is_exact(self, replica: ReplicaKey) -> bool:
        with self._lock:
            return replica in self._counts and replica not in self._approx

    def remove_replica(self, replica: ReplicaKey) -> None:
        with self._lock:
            self._clear_locked(replica)
            self._counts.pop(replica, None)
            self._approx.pop(replica, None)
            self._capacity.pop(replica, None)

    def clear(self, replica: ReplicaKey) -> None:
        """Forget every block of a replica (AllBlocksCleared, engine restart, resync)."""
        with self._lock:
            self._clear_locked(replica)
            if replica in self._approx:
                self._approx[replica] = OrderedDict()

    def replicas(self) -> list[ReplicaKey]:
        with self._lock:
            return list(self._counts)

    # ----- exact feed (KV events) -----------------------------------------------------------------
    def store(self, replica: ReplicaKey, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            counts = self._counts.setdefault(replica, {})
            for h in hashes:
                c = counts.get(h, 0)
                counts[h] = c + 1
                if c == 0:
                    self._holders.setdefault(h, set()).add(replica)

    def remove(self, replica: ReplicaKey, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            counts = self._counts.get(replica)
            if counts is None:
                return
            for h in hashes:
                c = counts.get(h, 0)
                if c > 1:
                    counts[h] = c - 1
                elif c == 1:
                    del counts[h]
                    self._drop_holder_locked(h, replica)

    # ----- approximate feed (own decisions) -------------------------------------------------------
    def record_decision(self, replica: ReplicaKey, hashes: Sequence[BlockHash], now: float) -> None:
        """Assume `replica` now caches `hashes` until `now + approx_ttl_s` (approximate replicas only)."""
        with self._lock:
            table = self._approx.get(replica)
            if table is None:
                return
            counts = self._counts.setdefault(replica, {})
            expiry = now + self.approx_ttl_s
            for h in hashes:
                if h in table:
                    table.move_to_end(h)
                else:
                    counts[h] = 1
                    self._holders.setdefault(h, set()).add(replica)
                table[h] = expiry
            cap = self._capacity.get(replica, self.approx_capacity_blocks)
            while len(table) > cap:
                h, _ = table.popitem(last=False)
                del counts[h]
                self._drop_holder_locked(h, replica)

    def expire(self, now: float) -> int:
        """Drop approximate blocks whose time is up; returns how many were dropped."""
        dropped = 0
        with self._lock:
            for replica, table in self._approx.items():
                counts = self._counts[replica]
                while table:
                    h, expiry = next(iter(table.items()))
                    if expiry > now:
                        break
                    table.popitem(last=False)
                    del counts[h]
                    self._drop_holder_locked(h, replica)
                    dropped += 1
        return dropped

    # ----- queries --------------------------------------------------------------------------------
    def longest_prefix(
        self, chain: Sequence[BlockHash], replicas: Iterable[ReplicaKey]
    ) -> dict[ReplicaKey, int]:
        """For each replica, how many leading blocks of `chain` it holds (0 when none)."""
        result = {r: 0 for r in replicas}
        if not chain or not result:
            return result
        with self._lock:
            holders = self._holders.get(chain[0])
            if not holders:
                return result
            alive = holders.intersection(result)
            i = 1
            n = len(chain)
            while alive and i < n:
                nxt = self._holders.get(chain[i])
                if nxt is None:
                    break
                if not alive.issubset(nxt):
                    for r in alive.difference(nxt):
                        result[r] = i
                    alive = alive.intersection(nxt)
                i += 1
            for r in alive:
                result[r] = i
        return result

    def num_blocks(self, replica: ReplicaKey) -> int:
        with self._lock:
            return len(self._counts.get(replica, ()))

    def holds(self, replica: ReplicaKey, h: BlockHash) -> bool:
        with self._lock:
            return h in self._counts.get(replica, ())

    def total_blocks(self) -> int:
        """Distinct (replica, hash) entries across all replicas."""
        with self._lock:
            return sum(len(c) for c in self._counts.values())

    # ----- internals ------------------------------------------------------------------------------
    def _drop_holder_locked(self, h: BlockHash, replica: ReplicaKey) -> None:
        s = self._holders.get(h)
        if s is not None:
            s.discard(replica)
            if not s:
                del self._holders[h]

    def _clear_locked(self, replica: ReplicaKey) -> None:
        counts = self._counts.get(replica)
        if counts:
            for h in counts:
                self._drop_holder_locked(h, replica)
            self._counts[replica] = {}
