"""Daemon-wide bounds: connections peers open to an app's listeners (limits.inbound_*), and
the control connections and apps of every uid together (limits.control_connections,
limits.apps). Real daemons and apps on loopback; every loop is bounded."""
from __future__ import annotations

import signal
import socket
import time
import urllib.request
from pathlib import Path

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
    d = daemon_factory(config="limits: {inbound_connections_per_listener: 2, inbound_connections: 3}\n"
                              "metrics: {address: '127.0.0.1:0'}\n")
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
        metrics = urllib.request.urlopen(f"http://{stats['daemon']['metrics_address']}/metrics", timeout=10).read().decode()
        assert "\nmrpcd_inbound_connections 3\n" in metrics and "\nmrpcd_inbound_connections_refused_total 23\n" in metrics
        lines = [ln for ln in d.log().splitlines() if "inbound peer connection to" in ln]
        assert 1 <= len(lines) <= 5, lines  # the 1st, 2nd, 4th, 8th, 16th refusal

        held.pop(0).close()  # room again on a (once the daemon sees the close)
        assert wait_until(lambda: _try_connect(client, a), timeout=10)
        with pytest.raises(RpcError, match=r"limits\.inbound_connections_per_listener"):
            client.call("connect", target=a)

        # the bounds change on reload (SIGHUP), for the next connection
        Path(d.socket).with_suffix(".yaml").write_text(
            "limits: {inbound_connections_per_listener: 5, inbound_connections: 6}\nmetrics: {address: '127.0.0.1:0'}\n")
        d.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "configuration" in d.log() and "applied" in d.log(), timeout=10), d.log()[-2000:]
        assert client.call("connect", target=a)["handle"]
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


_MANY_UIDS = r'''
import json, socket, sys, time
import mrpcd
from mrpcd.status import RpcError

path = sys.argv[1]
out, apps = {"apps_ok": 0}, []
for i in range(3):  # limits.apps: 2, and root's app holds one
    try:
        apps.append(mrpcd.connect(path, name=f"user{i}"))
        out["apps_ok"] += 1
    except RpcError as exc:
        out["apps"] = [int(exc.code().code), str(exc)]
        break
time.sleep(0.5)  # the refused app's control connection is gone from the daemon's count
socks, out["control_ok"] = [], 0
for i in range(4):  # limits.control_connections: 4; root's app and ours hold two
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(0.5)
    socks.append(s)
    try:
        data = s.recv(65536)
    except TimeoutError:  # admitted: the daemon waits for a request
        out["control_ok"] += 1
        continue
    out["control"] = data[4:].decode("utf-8", "replace")
    break
print(json.dumps(out))
sys.stdout.flush()
sys.stdin.read()  # hold everything until the test is done
'''


def test_many_uids_cannot_multiply_the_per_uid_bounds(tmp_path):
    """Per-uid budgets (apps_per_uid, control_connections_per_uid) bounded one user, but
    nothing bounded how many users connect: each new uid brought a fresh budget. Now
    limits.apps and limits.control_connections bound every uid together: a user past one is
    refused RESOURCE_EXHAUSTED naming it, while root (like the admin group) is counted but
    never refused, so the operator still gets in with mrpcctl and its own apps."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from conftest import as_other_user, other_user_daemon

    with other_user_daemon("totals", "limits: {apps: 2, control_connections: 4}\n") as d:
        root_app = mrpcd.connect(d.socket, name="root-app")
        user = None
        script = Path(tempfile.mkdtemp(prefix="mrpcd-uids-")) / "user.py"
        try:
            script.parent.chmod(0o755)
            script.write_text(_MANY_UIDS)
            script.chmod(0o644)
            user = subprocess.Popen(as_other_user([sys.executable, str(script), d.socket]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = user.stdout.readline()
            assert line, user.stderr.read()
            out = json.loads(line)
            assert out["apps_ok"] == 1 and out["apps"][0] == 8, out
            assert "all local users together have 2 apps" in out["apps"][1] and "limits.apps " in out["apps"][1], out
            assert out["control_ok"] == 2 and "limits.control_connections " in out["control"], out
            assert "at most 4 allowed" in out["control"], out
            ping = [sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "ping"]
            refused = subprocess.run(as_other_user(ping), capture_output=True, text=True, timeout=30)
            assert refused.returncode == 1 and "limits.control_connections " in refused.stderr, refused
            # root is counted but never refused: the operator gets in, and so do its apps
            assert subprocess.run(ping, capture_output=True, timeout=30).returncode == 0
            more = mrpcd.connect(d.socket, name="root-more")
            try:
                assert more.call("ping")["pid"] == d.pid
            finally:
                more.close()
            user.kill()  # what that user held is given back: it may connect again
            user.wait(10)
            assert wait_until(lambda: subprocess.run(as_other_user(ping), capture_output=True, timeout=30).returncode == 0,
                              timeout=15)
            assert d.alive()
        finally:
            if user is not None:
                user.kill()
                user.wait(10)
            shutil.rmtree(script.parent, ignore_errors=True)
            root_app.close()
