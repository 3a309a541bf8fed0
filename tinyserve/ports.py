"""Free ports (loopback unless a host is given): for the KV-event sockets a replica binds, and for benchmarks
and tests."""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_port_pair"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p such that p and p+1 were both free a moment ago (e.g. a publisher and its replay socket)."""
    for _ in range(64):
        port = free_port(host)
        with socket.socket() as b:
            try:
                b.bind((host, port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free pair of ports on {host}")
