"""Free ports (loopback unless a host is given): for the KV-event sockets a replica binds, and for benchmarks
and tests.

A port chosen here is bound later, often by another process (Serve's proxy, a replica's ZMQ publisher), while
Ray starts processes that bind ports of their own: every port the kernel hands out for port 0 comes from its
ephemeral range, and Ray's workers take ports from 10002–19999 by default. So ports are drawn at random between
those two ranges (20000 up to the start of the ephemeral range), where nothing binds unasked; a port the kernel
picks is the fallback on a machine whose ephemeral range leaves no room there.
"""

from __future__ import annotations

import random
import socket

__all__ = ["free_port", "free_port_pair"]

_LOWEST = 20000          # above Ray's default worker ports (10002-19999)
_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
_rng = random.SystemRandom()
_handed_out: set[int] = set()   # never the same port twice in a process (two calls before either binds)


def _unassigned_range() -> tuple[int, int]:
    """[lo, hi) of ports neither the kernel hands out for port 0 nor Ray's workers use by default."""
    try:
        with open(_EPHEMERAL) as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768      # Linux's default
    return _LOWEST, first


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago, outside the ranges other processes take ports from."""
    lo, hi = _unassigned_range()
    if hi - lo >= 64:
        for _ in range(64):
            port = _rng.randrange(lo, hi)
            if port not in _handed_out and _bindable(host, port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p+1 were both free a moment ago (e.g. a publisher and its replay socket)."""
    for _ in range(64):
        port = free_port(host)
        if _bindable(host, port + 1):
            return port
    raise RuntimeError(f"no free pair of ports on {host}")
