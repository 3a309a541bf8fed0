"""ZMQ subscriber to every replica's vLLM KV-event publisher, feeding a `KVBlockIndex`.

vLLM's `ZmqEventPublisher` sends multipart messages ``(topic, seq: 8-byte big-endian, msgpack KVEventBatch)``
on a PUB socket, numbering batches 0, 1, 2, … from engine start, and keeps the last ``buffer_steps`` batches
for replay on a ROUTER socket (always bound). The PUB socket binds a wildcard endpoint (``tcp://*:port``;
the subscriber connects) and connects to a concrete one (``tcp://127.0.0.1:port``; the subscriber binds
it, so it must run on that host). For replay, send ``(b"", start_seq)`` and it answers each buffered batch with
``seq >= start_seq`` as ``(b"", topic, seq, payload)``, then ``(b"", b"", -1, b"")``.

Per replica this subscriber keeps the next expected sequence number and resynchronises when the stream
and the index may disagree:
- first batch seen (joined late): clear the replica, replay from 0;
- a gap (seq > expected): replay from `expected`; if the buffer no longer holds it, clear and replay from 0;
- seq 0 after later ones, or a new engine pid (`update`), i.e. the engine restarted: clear, replay from 0;
- ``AllBlocksCleared``: clear the replica.
A replay that cannot reach back to seq 0 leaves the replica ``complete=False`` (blocks stored before
the buffer's start are unknown: the index under-counts, it never invents blocks).

A (re)subscribed stream also asks the replay socket a few times shortly afterwards for anything from its
next expected sequence number on (``catch_up_after_s``): ZMQ drops what a PUB sends before the connection's
subscription handshake has finished (the "slow joiner"), and a batch lost that way would otherwise wait for
the next live batch to reveal the gap, which on an idle replica may never come. A resync keeps the
index's provisional blocks (this router's own recent decisions, not the stream's).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from tinyserve.cache_router.kv_block_index import KVBlockIndex

__all__ = ["StreamState", "KVEventSubscriber", "publisher_binds", "dialable"]

_END_SEQ = -1


def publisher_binds(endpoint: str) -> bool:
    """vLLM's rule: its PUB socket binds a wildcard, ipc or inproc endpoint and connects to any other."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def dialable(endpoint: str, host: str = "127.0.0.1") -> str:
    """A bound wildcard endpoint as an address to connect to (`tcp://*:5557` → `tcp://127.0.0.1:5557`)."""
    return endpoint.replace("*", host)


@dataclass
class StreamState:
    """One replica's event stream as the subscriber sees it (read-only outside the subscriber thread)."""

    replica: Hashable
    endpoint: str
    replay_endpoint: str | None
    engine_pid: int | None = None
    next_seq: int | None = None
    complete: bool = False
    batches: int = 0
    gaps: int = 0
    resyncs: int = 0
    restarts: int = 0
    hash_checks: int = 0
    hash_mismatches: int = 0
    last_event_lag_s: float = 0.0
    last_batch_at: float = 0.0
    subscribed_at: float = 0.0
    catch_ups: int = 0
    catch_up_at: list = field(default_factory=list, repr=False)
    sub: Any = field(default=None, repr=False)


class KVEventSubscriber:
    """Owns one background thread, one SUB socket per replica and the replay requests.

    Invariants: only the subscriber thread touches sockets and `StreamState` fields; other threads talk
    to it through a command queue (`add`, `update`, `remove`, `stop`). Batches of one replica are applied
    to the index in sequence order, each exactly once since the last clear of that replica.

    Args:
        index: the index to feed (its replicas are registered exact by `add`).
        on_batch: optional callback ``(replica, lag_s)`` after each applied batch (metrics).
        replay_timeout_s: how long to wait for a replay answer before declaring the replay failed.
        root_check: optional ``(token_ids, block_hash, extra_keys) -> bool`` run on root blocks (no parent)
            to prove the router hashes as the engine does; results counted in `StreamState.hash_*`.
        catch_up_after_s: seconds after each resync at which to ask the replay socket for batches the live
            socket may have dropped while connecting.
    """

    def __init__(
        self,
        index: KVBlockIndex,
        on_batch: Callable[[Hashable, float], None] | None = None,
        replay_timeout_s: float = 2.0,
        root_check: Callable[[list, Any, Any], bool] | None = None,
        catch_up_after_s: tuple[float, ...] = (0.5, 2.0, 5.0),
    ) -> None:
        self.index = index
        self._catch_up_after_s = catch_up_after_s
        self._root_check = root_check
        self._on_batch = on_batch
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._ctx = zmq.Context()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[Hashable, StreamState] = {}
        from vllm.distributed.kv_events import (  # the publisher's own wire types
            AllBlocksCleared,
            BlockRemoved,
            BlockStored,
            KVEventBatch,
        )

        self._stored, self._removed, self._cleared = BlockStored, BlockRemoved, AllBlocksCleared
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="tinyserve-kv-events", daemon=True)
        self._thread.start()

    # ----- public, any thread ----------------------------------------------------------------------
    def add(self, replica: Hashable, endpoint: str, replay_endpoint: str | None, engine_pid: int | None = None,
            host: str | None = None) -> None:
        """Subscribe to a replica's publisher (its index entry becomes exact). `host`: the replica's node
        address, dialled in place of a wildcard endpoint's ``*`` (default 127.0.0.1)."""
        self.index.add_replica(replica, exact=True)
        self._commands.put(("add", replica, endpoint, replay_endpoint, engine_pid, host))

    def update(self, replica: Hashable, endpoint: str, replay_endpoint: str | None, engine_pid: int | None,
               host: str | None = None) -> None:
        """New routing stats for a replica: a changed endpoint or engine pid means a restarted engine."""
        self._commands.put(("update", replica, endpoint, replay_endpoint, engine_pid, host))

    def remove(self, replica: Hashable, drop_index: bool = True) -> None:
        """Unsubscribe; with `drop_index` the replica's blocks leave the index too."""
        self._commands.put(("remove", replica, drop_index))

    def streams(self) -> dict[Hashable, StreamState]:
        """A snapshot (shallow copies) of every stream's state."""
        return {k: StreamState(**{f: getattr(s, f) for f in s.__dataclass_fields__ if f != "sub"})
                for k, s in list(self._streams.items())}

    def event_lag_s(self, replica: Hashable) -> float | None:
        """Lag of the latest applied batch (engine timestamp to applied), None if none yet."""
        s = self._streams.get(replica)
        return s.last_event_lag_s if s is not None and s.batches else None

    def hash_agreement(self, replica: Hashable) -> tuple[int, int]:
        """(root blocks checked, mismatches) for a replica's stream."""
        s = self._streams.get(replica)
        return (s.hash_checks, s.hash_mismatches) if s is not None else (0, 0)

    def silent_since(self, replica: Hashable) -> float | None:
        """When a stream that has never delivered a batch was opened (None once it has delivered one)."""
        s = self._streams.get(replica)
        if s is None or s.batches:
            return None
        return s.subscribed_at or None

    def resyncs(self, replica: Hashable) -> int | None:
        s = self._streams.get(replica)
        return s.resyncs if s is not None else None

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        self._commands.put(("stop",))
        self._thread.join(timeout=5)
        self._ctx.term()

    # ----- subscriber thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        socket_owner: dict[Any, Hashable] = {}
        while self._running:
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == "stop":
                    self._running = False
                    break
                self._command(cmd, poller, socket_owner)
            if not self._running:
                break
            events = dict(poller.poll(50)) if socket_owner else (time.sleep(0.05) or {})
            for sock in events:
                replica = socket_owner.get(sock)
                stream = self._streams.get(replica)
                if stream is None:
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) == 3:
                        self._on_live(stream, frames[1], frames[2])
            now = time.time()
            for stream in list(self._streams.values()):
                if stream.catch_up_at and stream.catch_up_at[0] <= now:
                    stream.catch_up_at.pop(0)
                    self._catch_up(stream)
        for s in self._streams.values():
            s.sub.close(linger=0)
        self._streams.clear()

    def _command(self, cmd: tuple, poller: zmq.Poller, socket_owner: dict) -> None:
        kind, replica = cmd[0], cmd[1]
        old = self._streams.get(replica)
        if kind == "update" and old is not None and old.endpoint == cmd[2]:
            if old.engine_pid == cmd[4]:
                return
            # Same endpoint, new engine: keep the socket (re-binding a just-closed address can fail), restart
            # the stream: the new engine numbers its batches from 0.
            first_pid = old.engine_pid is None
            old.engine_pid = cmd[4]
            if not first_pid:  # None → pid is the replica's first stats poll, not a restart
                old.restarts += 1
                self._resync(old)
            return
        if kind == "remove" or (kind == "update" and old is not None and (old.endpoint, old.engine_pid) != (cmd[2], cmd[4])):
            if old is not None:
                poller.unregister(old.sub)
                socket_owner.pop(old.sub, None)
                old.sub.close(linger=0)
                del self._streams[replica]
            if kind == "remove":
                if cmd[2]:
                    self.index.remove_replica(replica)
                return
            self.index.clear(replica)
            restarts = old.restarts + 1
        elif old is not None:
            return
        else:
            restarts = 0
        _, replica, endpoint, replay_endpoint, pid, host = cmd
        host = host or "127.0.0.1"
        self.index.add_replica(replica, exact=True)
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.LINGER, 0)
        try:
            if publisher_binds(endpoint):
                sub.connect(dialable(endpoint, host))
            else:  # the engine's PUB connects to this address: the subscriber is the stable (bound) end
                sub.bind(endpoint)
        except zmq.ZMQError:
            sub.close(linger=0)
            self.index.set_exact(replica, False)  # no stream: learn from decisions instead
            return
        stream = StreamState(replica, endpoint, dialable(replay_endpoint, host) if replay_endpoint else None, pid,
                             restarts=restarts, sub=sub, subscribed_at=time.time())
        self._streams[replica] = stream
        socket_owner[sub] = replica
        poller.register(sub, zmq.POLLIN)
        # Catch up on what the engine published before we connected.
        self._resync(stream)

    def _on_live(self, stream: StreamState, seq_bytes: bytes, payload: bytes) -> None:
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        expected = stream.next_seq
        if expected is None:
            self._resync(stream)
            if stream.next_seq is None or seq >= stream.next_seq:
                self._apply(stream, seq, payload)
            return
        if seq == expected:
            self._apply(stream, seq, payload)
        elif seq > expected:
            stream.gaps += 1
            if not self._replay(stream, expected):
                self._resync(stream)
            if stream.next_seq is None or seq >= stream.next_seq:
                self._apply(stream, seq, payload)
        elif seq == 0:
            # The publisher numbers from 0 again: its engine restarted behind the same endpoint.
            stream.restarts += 1
            self.index.clear(stream.replica)
            stream.next_seq = 0
            stream.complete = True
            self._apply(stream, seq, payload)
        # else: a batch already applied through replay.

    def _resync(self, stream: StreamState, catch_up: bool = True) -> None:
        """Forget the replica's blocks and rebuild them from the publisher's replay buffer; with `catch_up`,
        schedule the catch-up replays."""
        stream.resyncs += 1
        self.index.clear(stream.replica, keep_provisional=True)
        stream.next_seq = None
        stream.complete = False
        self._replay(stream, 0, from_scratch=True)
        if catch_up and stream.replay_endpoint:
            now = time.time()
            stream.catch_up_at = [now + d for d in self._catch_up_after_s]

    def _catch_up(self, stream: StreamState) -> None:
        """Apply what the publisher buffered from the next expected batch on (lost to a slow join)."""
        stream.catch_ups += 1
        if stream.next_seq is None or not self._replay(stream, stream.next_seq, nothing_is_complete=True):
            self._resync(stream, catch_up=False)

    def _replay(self, stream: StreamState, start: int, from_scratch: bool = False,
                nothing_is_complete: bool = False) -> bool:
        """Apply buffered batches from `start`; True when the buffer reached back to `start` (or, with
        `nothing_is_complete`, when it holds nothing at or after `start`: nothing was missed)."""
        if not stream.replay_endpoint:
            return False
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(stream.replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            first: int | None = None
            while sock.poll(self._replay_timeout_ms):
                frames = sock.recv_multipart()
                if len(frames) != 4:
                    continue
                seq = int.from_bytes(frames[2], "big", signed=True)
                if seq == _END_SEQ:
                    if first is None:  # nothing buffered at or after start
                        if from_scratch:  # nothing published yet: the next batch is seq 0
                            stream.next_seq = 0
                            stream.complete = True
                        return from_scratch or nothing_is_complete
                    return first == start
                if first is None:
                    first = seq
                    if from_scratch:
                        stream.complete = seq == 0
                        stream.next_seq = seq
                    elif seq != start:
                        return False
                if stream.next_seq is None or seq == stream.next_seq:
                    self._apply(stream, seq, frames[3])
            return False  # timed out
        finally:
            sock.close(linger=0)

    def _apply(self, stream: StreamState, seq: int, payload: bytes) -> None:
        batch = self._decoder.decode(payload)
        replica = stream.replica
        for ev in batch.events:
            if isinstance(ev, self._stored):
                if ev.group_idx in (None, 0) and ev.medium in (None, "GPU"):
                    self.index.store(replica, ev.block_hashes)
                    if self._root_check is not None and ev.parent_block_hash is None and ev.block_hashes:
                        keys = ev.extra_keys[0] if ev.extra_keys else None
                        keys = tuple(keys) if keys is not None else None  # msgpack turns tuples to lists
                        stream.hash_checks += 1
                        if not self._root_check(ev.token_ids, ev.block_hashes[0], keys):
                            stream.hash_mismatches += 1
            elif isinstance(ev, self._removed):
                if ev.group_idx in (None, 0) and ev.medium in (None, "GPU"):
                    self.index.remove(replica, ev.block_hashes)
            elif isinstance(ev, self._cleared):
                self.index.clear(replica)
        stream.next_seq = seq + 1
        stream.batches += 1
        now = time.time()
        stream.last_batch_at = now
        stream.last_event_lag_s = max(0.0, now - batch.ts)
        if self._on_batch is not None:
            self._on_batch(replica, stream.last_event_lag_s)
