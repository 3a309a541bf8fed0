"""Free ports come from outside the kernel's ephemeral range and Ray's worker ports, never twice."""

import socket

from tinyserve import ports


def test_free_ports_avoid_the_ranges_other_processes_take_and_repeat_never():
    lo, hi = ports._unassigned_range()
    got = [ports.free_port() for _ in range(200)]
    assert len(set(got)) == len(got)
    if hi - lo >= 64:
        assert all(lo <= p < hi for p in got)
    for p in got[:20]:   # each one binds
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_free_port_pair_gives_two_bindable_neighbours():
    p = ports.free_port_pair()
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", p))
        b.bind(("127.0.0.1", p + 1))


def test_a_taken_port_is_not_handed_out(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(ports, "_unassigned_range", lambda: (taken, taken + 64))
        monkeypatch.setattr(ports._rng, "randrange", lambda lo, hi: taken)   # always proposes the taken one
        p = ports.free_port()
        assert p != taken
