"""Which KV blocks each replica holds, and each replica's longest cached prefix of a prompt.

Fed two ways. Exact replicas: the vLLM KV events of the replica's engine (`store`/`remove`/`clear`),
so the index mirrors the engine's prefix cache. Approximate replicas (no event stream, or a stream
that is down): the router's own decisions (`record_decision`), each block kept until it expires or the
replica's capacity pushes it out, oldest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator, Sequence

__all__ = ["KVBlockIndex"]

BlockHash = Hashable
ReplicaKey = Hashable


class KVBlockIndex:
    """Inverted index block hash → bitmask of the replicas holding it, with per-replica block sets.

    Owns: ``_slot`` (replica → bit; bits of removed replicas are reused), ``_holders`` (hash → bitmask),
    ``_blocks`` (replica → set of hashes), ``_dups`` (replica → hash → extra copies: vLLM may cache the same
    hash in two blocks, each removed by its own event), ``_approx`` (approximate replica → hash → expiry,
    oldest first) and each replica's capacity. Invariants: bit(r) is set in ``_holders[h]`` iff
    ``h in _blocks[r]``; no zero mask stays in ``_holders``; ``_dups[r]`` keys ⊆ ``_blocks[r]``; an
    approximate replica's blocks equal ``_approx[r]``'s keys. Exact replicas also hold *provisional* blocks
    (``_provisional``: hash → expiry): the prefix of a request just routed there, assumed cached for
    ``provisional_ttl_s`` so that requests arriving before the engine's ``BlockStored`` (sent only once the
    prefill is done) or before the stream is synced follow it. For an exact replica, bit(r) is set in
    ``_holders[h]`` iff ``h in _blocks[r] or h in _provisional[r]``. All methods are thread-safe (one lock: the
    event subscriber writes from its thread, the router reads on its event loop); every call holds the
    lock for O(blocks touched + replicas asked about), never O(index).

    Args:
        approx_ttl_s: how long a block recorded from a decision is assumed cached.
        approx_capacity_blocks: default cap of blocks assumed cached per approximate replica.
    """

    def __init__(self, approx_ttl_s: float = 120.0, approx_capacity_blocks: int = 100_000,
                 provisional_ttl_s: float = 10.0) -> None:
        self.approx_ttl_s = approx_ttl_s
        self.provisional_ttl_s = provisional_ttl_s
        self.approx_capacity_blocks = approx_capacity_blocks
        self._lock = threading.Lock()
        self._slot: dict[ReplicaKey, int] = {}
        self._replica_at: dict[int, ReplicaKey] = {}
        self._free_positions: list[int] = []
        self._holders: dict[BlockHash, int] = {}
        self._blocks: dict[ReplicaKey, set[BlockHash]] = {}
        self._dups: dict[ReplicaKey, dict[BlockHash, int]] = {}
        self._approx: dict[ReplicaKey, OrderedDict[BlockHash, float]] = {}
        self._provisional: dict[ReplicaKey, OrderedDict[BlockHash, float]] = {}
        self._capacity: dict[ReplicaKey, int] = {}

    # ----- replicas -------------------------------------------------------------------------------
    def _register_locked(self, replica: ReplicaKey) -> int:
        bit = self._slot.get(replica)
        if bit is None:
            pos = self._free_positions.pop() if self._free_positions else len(self._slot)
            bit = 1 << pos
            self._slot[replica] = bit
            self._replica_at[pos] = replica
            self._blocks[replica] = set()
            self._dups[replica] = {}
            self._provisional[replica] = OrderedDict()
        return bit

    def add_replica(self, replica: ReplicaKey, exact: bool, capacity_blocks: int | None = None) -> None:
        """Start tracking a replica (idempotent); `exact` says whether KV events feed it."""
        with self._lock:
            self._register_locked(replica)
            if capacity_blocks:
                self._capacity[replica] = capacity_blocks
            if exact:
                self._approx.pop(replica, None)
            else:
                self._approx.setdefault(replica, OrderedDict())

    def set_exact(self, replica: ReplicaKey, exact: bool) -> None:
        """Switch a replica's mode; its blocks are dropped (they came from the other source)."""
        with self._lock:
            known = replica in self._slot
            if known and (replica not in self._approx) == exact:
                return
            self._register_locked(replica)
            self._clear_locked(replica)
            if exact:
                self._approx.pop(replica, None)
            else:
                self._approx[replica] = OrderedDict()

    def is_exact(self, replica: ReplicaKey) -> bool:
        with self._lock:
            return replica in self._slot and replica not in self._approx

    def remove_replica(self, replica: ReplicaKey) -> None:
        with self._lock:
            bit = self._slot.get(replica)
            if bit is None:
                return
            self._clear_locked(replica)
            del self._slot[replica], self._blocks[replica], self._dups[replica], self._provisional[replica]
            pos = bit.bit_length() - 1
            del self._replica_at[pos]
            self._free_positions.append(pos)
            self._approx.pop(replica, None)
            self._capacity.pop(replica, None)

    def clear(self, replica: ReplicaKey, keep_provisional: bool = False) -> None:
        """Forget every block of a replica (AllBlocksCleared, engine restart, resync). `keep_provisional`
        keeps the provisional blocks of recent decisions (a resync of the event stream says nothing about
        them; they expire on their own)."""
        with self._lock:
            if replica in self._slot:
                self._clear_locked(replica, keep_provisional)

    def replicas(self) -> list[ReplicaKey]:
        with self._lock:
            return list(self._slot)

    # ----- exact feed (KV events) -----------------------------------------------------------------
    def store(self, replica: ReplicaKey, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            bit = self._register_locked(replica)
            blocks, dups, holders = self._blocks[replica], self._dups[replica], self._holders
            for h in hashes:
                if h in blocks:
                    dups[h] = dups.get(h, 0) + 1
                else:
                    blocks.add(h)
                    holders[h] = holders.get(h, 0) | bit

    def remove(self, replica: ReplicaKey, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            bit = self._slot.get(replica)
            if bit is None:
                return
            blocks, dups, prov = self._blocks[replica], self._dups[replica], self._provisional[replica]
            for h in hashes:
                extra = dups.get(h)
                if extra:
                    if extra == 1:
                        del dups[h]
                    else:
                        dups[h] = extra - 1
                elif h in blocks:
                    blocks.discard(h)
                    if h not in prov:
                        self._drop_holder_locked(h, bit)

    # ----- approximate feed (own decisions) -------------------------------------------------------
    def record_decision(self, replica: ReplicaKey, hashes: Sequence[BlockHash], now: float) -> None:
        """The router sent a request with block chain `hashes` to `replica`. Approximate replicas: assume
        them cached until `now + approx_ttl_s`. Exact replicas: provisionally until `now + provisional_ttl_s`
        (the engine's own events confirm or remove them)."""
        with self._lock:
            bit = self._slot.get(replica)
            if bit is None:
                return
            blocks, holders = self._blocks[replica], self._holders
            table = self._approx.get(replica)
            if table is None:
                prov = self._provisional[replica]
                expiry = now + self.provisional_ttl_s
                for h in hashes:
                    if h in prov:
                        prov.move_to_end(h)
                    elif h not in blocks:
                        holders[h] = holders.get(h, 0) | bit
                    prov[h] = expiry
                return
            expiry = now + self.approx_ttl_s
            for h in hashes:
                if h in table:
                    table.move_to_end(h)
                else:
                    blocks.add(h)
                    holders[h] = holders.get(h, 0) | bit
                table[h] = expiry
            cap = self._capacity.get(replica, self.approx_capacity_blocks)
            while len(table) > cap:
                h, _ = table.popitem(last=False)
                blocks.discard(h)
                self._drop_holder_locked(h, bit)

    def expire(self, now: float) -> int:
        """Drop approximate and provisional blocks whose time is up; returns how many were dropped."""
        dropped = 0
        with self._lock:
            for replica, table in self._approx.items():
                bit, blocks = self._slot[replica], self._blocks[replica]
                for h in _pop_expired(table, now):
                    blocks.discard(h)
                    self._drop_holder_locked(h, bit)
                    dropped += 1
            for replica, prov in self._provisional.items():
                bit, blocks = self._slot[replica], self._blocks[replica]
                for h in _pop_expired(prov, now):
                    if h not in blocks:
                        self._drop_holder_locked(h, bit)
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
            slot = self._slot
            asked = 0
            for r in result:
                b = slot.get(r)
                if b is not None:
                    asked |= b
            holders = self._holders
            alive = holders.get(chain[0], 0) & asked
            i = 1
            n = len(chain)
            at = self._replica_at
            while alive and i < n:
                nxt = holders.get(chain[i], 0)
                lost = alive & ~nxt
                if lost:
                    while lost:
                        low = lost & -lost
                        result[at[low.bit_length() - 1]] = i
                        lost ^= low
                    alive &= nxt
                i += 1
            while alive:
                low = alive & -alive
                result[at[low.bit_length() - 1]] = i
                alive ^= low
        return result

    def num_blocks(self, replica: ReplicaKey) -> int:
        with self._lock:
            return len(self._blocks.get(replica, ()))

    def holds(self, replica: ReplicaKey, h: BlockHash) -> bool:
        with self._lock:
            return h in self._blocks.get(replica, ())

    def total_blocks(self) -> int:
        """Distinct (replica, hash) entries across all replicas."""
        with self._lock:
            return sum(len(b) for b in self._blocks.values())

    # ----- internals ------------------------------------------------------------------------------
    def _drop_holder_locked(self, h: BlockHash, bit: int) -> None:
        m = self._holders.get(h)
        if m is not None:
            m &= ~bit
            if m:
                self._holders[h] = m
            else:
                del self._holders[h]

    def _clear_locked(self, replica: ReplicaKey, keep_provisional: bool = False) -> None:
        bit = self._slot[replica]
        prov = self._provisional[replica]
        for h in self._blocks[replica]:
            if not (keep_provisional and h in prov):
                self._drop_holder_locked(h, bit)
        if not keep_provisional:
            for h in prov:
                self._drop_holder_locked(h, bit)
            self._provisional[replica] = OrderedDict()
        self._blocks[replica] = set()
        self._dups[replica] = {}
        if replica in self._approx:
            self._approx[replica] = OrderedDict()


def _pop_expired(table: OrderedDict[BlockHash, float], now: float) -> Iterator[BlockHash]:
    """Pop and yield the keys of `table` (ordered by expiry, oldest first) whose expiry is not after `now`."""
    while table:
        key, expiry = next(iter(table.items()))
        if expiry > now:
            return
        table.popitem(last=False)
        yield key
