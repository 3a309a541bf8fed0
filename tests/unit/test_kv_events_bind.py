"""router.kv_events_bind: where replicas' KV-event sockets listen, and the address the router is given."""

from __future__ import annotations

import socket

import pytest

from tinyserve.deployments.app import _engine_kwargs
from tinyserve.deployments.config import load_config
from tinyserve.deployments.llm_server import _advertised


def test_default_binds_loopback():
    events = _engine_kwargs(load_config(None))["kv_events_config"]
    assert events["endpoint"] == "tcp://127.0.0.1:0" and events["replay_endpoint"] == "tcp://127.0.0.1:0"
    assert _advertised("tcp://127.0.0.1:5557") == "tcp://127.0.0.1:5557"


def test_node_binds_every_interface_and_advertises_the_node_ip():
    config = load_config(None, overrides={"router": {"kv_events_bind": "node"}})
    events = _engine_kwargs(config)["kv_events_config"]
    assert events["endpoint"] == "tcp://0.0.0.0:0"
    host, port = _advertised("tcp://0.0.0.0:6001").removeprefix("tcp://").rsplit(":", 1)
    assert port == "6001" and host not in ("0.0.0.0", "")
    socket.inet_aton(host)  # an IPv4 address a router on another node can connect to


def test_other_routers_publish_no_events():
    config = load_config(None, overrides={"router": {"kind": "power_of_two"}})
    assert "kv_events_config" not in _engine_kwargs(config)


def test_unknown_bind_is_a_config_error():
    with pytest.raises(Exception, match="kv_events_bind"):
        load_config(None, overrides={"router": {"kv_events_bind": "everywhere"}})
