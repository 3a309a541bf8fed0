"""KVEventSubscriber against vLLM's real ZmqEventPublisher: late join, lost batches, restart, clear."""

from __future__ import annotations

import time

import pytest
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    ZmqEventPublisher,
)

from tinyserve.cache_router.kv_block_index import KVBlockIndex
from tinyserve.cache_router.kv_event_subscriber import KVEventSubscriber
from tinyserve.ports import free_port_pair


def _stored(hashes, parent=None):
    return BlockStored(block_hashes=list(hashes), parent_block_hash=parent, token_ids=[0] * (32 * len(hashes)),
                       block_size=32, lora_id=None, medium="GPU", lora_name=None)


def _batch(*events):
    return KVEventBatch(ts=time.time(), events=list(events))


def _wait(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def _drain(pub):
    assert _wait(lambda: pub._event_queue.unfinished_tasks == 0)


def _lose_on_wire(pub, batch):
    """Number and buffer a batch as the publisher does, but never send it (a batch lost in transit)."""
    import msgspec

    _drain(pub)
    seq = next(pub._seq_gen)
    pub._buffer.append((seq, msgspec.msgpack.Encoder().encode(batch)))


@pytest.fixture
def endpoints():
    port = free_port_pair()
    # What a replica reports: the endpoints its engine was configured with (the PUB binds the wildcard).
    return port, f"tcp://*:{port}", f"tcp://*:{port + 1}"


@pytest.fixture
def sub():
    index = KVBlockIndex()
    s = KVEventSubscriber(index, replay_timeout_s=1.0)
    yield s
    s.stop()


def _publisher(port):
    return ZmqEventPublisher(0, endpoint=f"tcp://*:{port}", replay_endpoint=f"tcp://*:{port + 1}")


def test_late_join_catches_up_through_replay(endpoints, sub):
    port, ep, rep = endpoints
    pub = _publisher(port)
    try:
        pub.publish(_batch(_stored([1, 2])))
        pub.publish(_batch(_stored([3], parent=2), BlockRemoved(block_hashes=[1], medium="GPU")))
        _drain(pub)
        sub.add("r", ep, rep)
        assert _wait(lambda: sub.index.holds("r", 3))
        assert not sub.index.holds("r", 1) and sub.index.holds("r", 2)
        st = sub.streams()["r"]
        assert st.complete and st.next_seq == 2
        time.sleep(0.3)  # SUB connected: live batches now
        pub.publish(_batch(_stored([4], parent=3)))
        assert _wait(lambda: sub.index.holds("r", 4))
        assert sub.streams()["r"].gaps == 0
    finally:
        pub.shutdown()


def test_lost_batch_is_replayed_and_a_lost_buffer_forces_full_resync(endpoints, sub):
    port, ep, rep = endpoints
    pub = _publisher(port)
    try:
        sub.add("r", ep, rep)
        time.sleep(0.3)
        pub.publish(_batch(_stored([10])))
        assert _wait(lambda: sub.index.holds("r", 10))
        _lose_on_wire(pub, _batch(_stored([11], parent=10), BlockRemoved(block_hashes=[10], medium="GPU")))
        pub.publish(_batch(_stored([12], parent=11)))
        assert _wait(lambda: sub.index.holds("r", 12))
        assert sub.index.holds("r", 11) and not sub.index.holds("r", 10)  # the lost batch was replayed
        assert sub.streams()["r"].gaps == 1

        # A batch neither sent nor kept for replay: the subscriber must rebuild from the buffer.
        _drain(pub)
        next(pub._seq_gen)
        pub.publish(_batch(_stored([13], parent=12)))
        assert _wait(lambda: sub.index.holds("r", 13))
        st = sub.streams()["r"]
        assert st.gaps == 2 and st.resyncs >= 2
        assert sub.index.holds("r", 11) and sub.index.holds("r", 12) and not sub.index.holds("r", 10)
    finally:
        pub.shutdown()


def test_publisher_restart_and_all_blocks_cleared_reset_the_replica(endpoints, sub):
    port, ep, rep = endpoints
    pub = _publisher(port)
    try:
        sub.add("r", ep, rep)
        time.sleep(0.3)
        pub.publish(_batch(_stored([1, 2, 3])))
        pub.publish(_batch(_stored([4], parent=3)))
        assert _wait(lambda: sub.index.holds("r", 4))
    finally:
        pub.shutdown()
    time.sleep(0.2)
    pub = _publisher(port)  # the engine restarted on the same ports: numbering starts at 0 again
    try:
        assert _wait(lambda: True)
        time.sleep(0.5)  # SUB reconnects
        pub.publish(_batch(_stored([7])))
        assert _wait(lambda: sub.index.holds("r", 7))
        assert not sub.index.holds("r", 1) and not sub.index.holds("r", 4)
        assert sub.streams()["r"].restarts == 1
        pub.publish(_batch(AllBlocksCleared(), _stored([8])))
        assert _wait(lambda: sub.index.holds("r", 8))
        assert not sub.index.holds("r", 7)
    finally:
        pub.shutdown()


def test_new_engine_pid_in_routing_stats_resyncs_and_remove_drops(endpoints, sub):
    port, ep, rep = endpoints
    pub = _publisher(port)
    try:
        sub.add("r", ep, rep, engine_pid=100)
        time.sleep(0.3)
        pub.publish(_batch(_stored([1])))
        assert _wait(lambda: sub.index.holds("r", 1))
        sub.update("r", ep, rep, engine_pid=100)  # unchanged: nothing happens
        time.sleep(0.2)
        assert sub.streams()["r"].restarts == 0
        sub.update("r", ep, rep, engine_pid=101)
        assert _wait(lambda: sub.streams().get("r") is not None and sub.streams()["r"].restarts == 1)
        assert _wait(lambda: sub.index.holds("r", 1))  # rebuilt from the (same) publisher's buffer
        sub.remove("r")
        assert _wait(lambda: "r" not in sub.index.replicas())
    finally:
        pub.shutdown()


def test_engine_that_connects_its_pub_is_served_by_a_bound_subscriber(sub):
    """`tcp://127.0.0.1:port` makes vLLM's PUB connect: the subscriber binds it, and restarts still resync."""
    port = free_port_pair()
    ep, rep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    pub = ZmqEventPublisher(0, endpoint=ep, replay_endpoint=rep)
    try:
        pub.publish(_batch(_stored([1, 2])))  # before the subscriber exists: dropped on the wire, replayed
        _drain(pub)
        sub.add("r", ep, rep)
        assert _wait(lambda: sub.index.holds("r", 2))
        time.sleep(0.5)  # the PUB reconnects to the bound SUB
        pub.publish(_batch(_stored([3], parent=2)))
        assert _wait(lambda: sub.index.holds("r", 3))
        assert sub.index.is_exact("r")
    finally:
        pub.shutdown()


def test_a_batch_lost_while_the_pub_connects_is_caught_up_without_a_later_batch(sub):
    """ZMQ's slow joiner: a PUB that connects to the subscriber's bound endpoint drops what it sends before the
    handshake. On an idle engine no later batch reveals the gap; the catch-up replays after a resync must."""
    port = free_port_pair()
    ep, rep = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
    pub = ZmqEventPublisher(0, endpoint=ep, replay_endpoint=rep)
    try:
        sub.index.add_replica("r", exact=True)
        sub.index.record_decision("r", [9], now=time.time())  # the router just sent a request there
        sub.add("r", ep, rep)
        assert _wait(lambda: "r" in sub.streams() and sub.streams()["r"].complete)
        assert sub.index.longest_prefix([9], ["r"]) == {"r": 1}  # the subscription's resync kept it
        _lose_on_wire(pub, _batch(_stored([1, 2])))  # the request's blocks, published during the handshake
        assert _wait(lambda: sub.index.holds("r", 2), timeout=4.0)
        st = sub.streams()["r"]
        assert st.catch_ups >= 1 and st.next_seq == 1 and st.resyncs == 1
    finally:
        pub.shutdown()
