"""Daemon-wide bounds: connections peers open to an app's listeners (limits.inbound_*), and
the control connections and apps of every uid together (limits.control_connections,
limits.apps). Real daemons and apps on loopback; every loop is bounded."""
from __future__ import annotations

import socket
import time

import pytest

import mrpcd
from conftest import wait_until
from mrpcd.status import RpcError


def _port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _refused_at_once(address: str, timeout: float = 5.0) -> bytes:
    """Open a raw TCP connection to `address` and send nothing: what the daemon sent before
    it closed the connection (b"" if it only closed it); raises TimeoutError if it stays open."""
    with socket.create_connection(_port(address), timeout=timeout) as s:
        data = b""
        while True:
            chunk = s.recv(65536)  # (socket.timeout, a TimeoutError, if the daemon keeps it open)
            if not chunk:
                return data
            data += chunk


def _held(address: str) -> socket.socket:
    """A raw TCP connection the daemon accepted and keeps open (it waits for our HELLO)."""
    s = socket.create_connection(_port(address), timeout=5)
    s.settimeout(0.3)
    try:
        assert s.recv(1) != b"", "the daemon closed a connection within its bounds"
    except TimeoutError:
        pass  # still open: what we want
    return s


def test_inbound_connections_are_bounded_per_listener_and_in_all(daemon_factory):
    """Connections peers opened to an app's listener were bounded only by peers.allow: a
    loop of connects took the daemon's descriptors. Past limits.inbound_connections_per_listener
    (or limits.inbound_connections over every listener) a new one is closed as it is
    accepted, with a GOAWAY naming the limit; an app's `connect` to it fails
    RESOURCE_EXHAUSTED; it is counted in `stats` and logged only now and then; a closed
    connection makes room again, and the daemon serves on."""
    d = daemon_factory(config="limits: {inbound_connections_per_listener: 2, inbound_connections: 3}\n")
    server = mrpcd.connect(d.socket, name="server")
    client = mrpcd.connect(d.socket, name="client")
    held: list[socket.socket] = []
    try:
        a = server.call("bind", address="127.0.0.1:0", services=[])["address"]
        b = server.call("bind", address="127.0.0.2:0", services=[])["address"]
        held += [_held(a), _held(a)]
        refused = _refused_at_once(a)
        assert b"limits.inbound_connections_per_listener" in refused and b"at most 2" in refused, refused
        held.append(_held(b))  # the third in all
        refused = _refused_at_once(b)
        assert b"limits.inbound_connections" in refused and b"at most 3" in refused, refused
        with pytest.raises(RpcError, match=r"limits\.inbound_connections") as failed:
            client.call("connect", target=a)
        assert failed.value.code() == mrpcd.StatusCode.RESOURCE_EXHAUSTED
        for _ in range(20):  # a peer hammering the full listener: each refused at once
            _refused_at_once(a)

        stats = client.call("stats")
        assert stats["daemon"]["inbound_connections_refused"] == 23, stats["daemon"]
        assert stats["daemon"]["inbound_connections"] == 3, stats["daemon"]
        server_stats = stats["apps"][str(server.app_id)]
        assert server_stats["inbound_refused"] == 23, server_stats
        lines = [ln for ln in d.log().splitlines() if "inbound peer connection to" in ln]
        assert 1 <= len(lines) <= 5, lines  # the 1st, 2nd, 4th, 8th, 16th refusal

        held.pop(0).close()  # room again on a (once the daemon sees the close)
        assert wait_until(lambda: _try_connect(client, a), timeout=10)
        assert d.alive()
    finally:
        for s in held:
            s.close()
        client.close()
        server.close()


def _try_connect(client, target: str) -> bool:
    try:
        client.call("connect", target=target)
        return True
    except RpcError:
        time.sleep(0.06)
        return False
