"""Descriptors per app and per uid (the daemon's `limits:` config, app_limits.py): one app,
or one local user's apps together, can no longer take every descriptor of the daemon."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import mrpcd
from conftest import OTHER_UID, as_other_user, other_user_daemon, wait_until
from mrpcd.status import RpcError


def test_connect_per_app_is_bounded(daemon_factory):
    """`connect` had no bound: one app connecting in a loop made a peer socket per call
    until the daemon ran out of descriptors. Past limits.connections_per_app it fails
    RESOURCE_EXHAUSTED naming the limit; a closed connection makes room again."""
    d = daemon_factory(config="limits: {connections_per_app: 3}\n")
    server = mrpcd.connect(d.socket, name="server")
    client = mrpcd.connect(d.socket, name="client")
    try:
        address = server.call("bind", address="127.0.0.1:0", services=[])["address"]
        handles = [client.call("connect", target=address)["handle"] for _ in range(3)]
        with pytest.raises(RpcError, match="connections_per_app") as refused:
            client.call("connect", target=address)
        assert refused.value.code() == mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 3" in str(refused.value)
        client.call("close", handle=handles[0])
        assert client.call("connect", target=address)["handle"]
        other = mrpcd.connect(d.socket, name="other")  # another app has its own bound
        try:
            assert other.call("connect", target=address)["handle"]
        finally:
            other.close()
    finally:
        client.close()
        server.close()
    assert d.alive()


def test_a_bad_limits_section_is_refused_with_its_line(tmp_path):
    from mrpcd.daemon.config import ConfigError, load

    path = tmp_path / "c.yaml"
    path.write_text("poll_us: 0\nlimits:\n  apps_per_uid: 0\n")
    with pytest.raises(ConfigError, match=r":3: limits: apps_per_uid must be an integer"):
        load(str(path))
    path.write_text("limits:\n  app_per_uid: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'apps_per_uid'"):
        load(str(path))
    assert load().limits["apps_per_uid"] == 128


_HOG = r'''
import json, socket, sys
import mrpcd
from mrpcd.status import RpcError

path, address = sys.argv[1], sys.argv[2]
out, apps = {}, []
def attempt(key, fn):
    try:
        fn()
        out.setdefault(key + "_ok", 0)
        out[key + "_ok"] += 1
    except RpcError as exc:
        out[key] = [int(exc.code().code), str(exc)]
        return False
    return True
for i in range(6):  # limit 4
    if not attempt("apps", lambda: apps.append(mrpcd.connect(path, name=f"hog{i}"))):
        break
for i in range(10):  # 3 per app, 5 per uid
    if not attempt("connect", lambda: apps[i % len(apps)].call("connect", target=address)):
        break
for i in range(10):  # listeners: 2 per app, 3 per uid
    if not attempt("bind", lambda: apps[i % len(apps)].call("bind", address=f"127.0.0.{i + 1}:0", services=[])):
        break
# control connections: 6 per uid; the 4 apps hold 4
socks = []
for i in range(4):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(5)
    socks.append(s)
last = socks[-1]
data = b""
try:
    while True:
        chunk = last.recv(65536)
        if not chunk:
            break
        data += chunk
except OSError as exc:
    data += repr(exc).encode()
out["control"] = data[4:].decode("utf-8", "replace")
print(json.dumps(out))
sys.stdout.flush()
sys.stdin.read()  # hold everything until the test is done
'''


@pytest.fixture
def limited_shared_daemon():
    """A daemon with small `limits:` that another local user can reach (other_user_daemon)."""
    config = ("limits: {control_connections_per_uid: 6, apps_per_uid: 4, connections_per_app: 3, connections_per_uid: 5,\n"
              "         listeners_per_app: 2, listeners_per_uid: 3}\n")
    with other_user_daemon("limited", config) as d:
        yield d


def test_one_uid_cannot_take_the_daemons_descriptors(limited_shared_daemon):
    """Per-app bounds alone let one local user open many apps, each with many peer
    connections and listeners, and many control connections, until the daemon had no
    descriptor left for anyone. Now each is bounded per uid too: that user's next one fails
    RESOURCE_EXHAUSTED naming the limit, and other users (here root, who is exempt from the
    per-uid bounds) go on as before."""
    d = limited_shared_daemon
    server = mrpcd.connect(d.socket, name="root-server")
    hog = None
    try:
        address = server.call("bind", address="127.0.0.1:0", services=[])["address"]
        script = Path(tempfile.mkdtemp(prefix="mrpcd-hog-")) / "hog.py"
        script.parent.chmod(0o755)
        script.write_text(_HOG)
        script.chmod(0o644)
        hog = subprocess.Popen(as_other_user([sys.executable, str(script), d.socket, address]), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = hog.stdout.readline()
        assert line, hog.stderr.read()
        out = json.loads(line)
        assert out["apps_ok"] == 4 and out["apps"][0] == 8 and "limits.apps_per_uid" in out["apps"][1], out
        assert f"uid {OTHER_UID} has 4 apps" in out["apps"][1], out
        assert out["connect_ok"] == 5 and out["connect"][0] == 8 and "limits.connections_per_uid" in out["connect"][1], out
        assert out["bind_ok"] == 3 and out["bind"][0] == 8 and "limits.listeners_per_uid" in out["bind"][1], out
        assert "limits.control_connections_per_uid" in out["control"], out
        ping = [*as_other_user([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "ping"])]
        refused = subprocess.run(ping, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1 and "limits.control_connections_per_uid" in refused.stderr, refused
        # root, the other user here, is not held back by that user's bounds
        more = [mrpcd.connect(d.socket, name=f"root{i}") for i in range(5)]
        try:
            assert all(a.call("ping")["pid"] == d.pid for a in more)
        finally:
            for a in more:
                a.close()
        hog.kill()  # what that user held is given back: it may connect again
        hog.wait(10)
        assert wait_until(lambda: subprocess.run(ping, capture_output=True, timeout=30).returncode == 0, timeout=15)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait(10)
            shutil.rmtree(script.parent, ignore_errors=True)
        server.close()
    assert d.alive()
