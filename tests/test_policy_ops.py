"""Operators change policies on running apps with mrpcctl: attach, reconfigure, upgrade, detach.

Real daemons, real apps, load running the whole time; every call is counted.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mrpcd
from mrpcd.ctl import Control

from conftest import OTHER_UID, as_other_user


V2_MODULE = '''
"""Version 2 of the rate limit: same behaviour, new version string, reads v1 state."""
from mrpcd.policies.ratelimit import RateLimit


class RateLimitV2(RateLimit):
    version = "2.0-test"


POLICY = RateLimitV2
'''


def ctl(daemon, *args: str, uid: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mrpcd.ctl", "--socket", daemon.socket, *args]
    if uid is not None:
        assert uid == OTHER_UID
        cmd = as_other_user(cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def load_counts(out: str) -> tuple[int, int, int]:
    """(attempted, completed, failed) from hello_client.py's load summary line."""
    line = next(x for x in out.splitlines() if x.startswith("attempted "))
    attempted, completed, failed = (int(x) for x in line.split()[1::2])
    return attempted, completed, failed


def policies_of(daemon, app: str) -> list[dict]:
    apps = Control(daemon.socket).call("policies", app=app)["apps"]
    return apps[0]["policies"] if apps else []


@pytest.fixture
def served(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    return a, b, server.readline()


def test_attach_upgrade_detach_under_load_loses_nothing(served, app_factory, gen_dir, tmp_path):
    a, _b, address = served
    stop = tmp_path / "stop"
    v2 = tmp_path / "ratelimit_v2.py"
    v2.write_text(V2_MODULE)
    load = app_factory("hello_client.py", a, address, "load", "60", "4", gen=gen_dir)  # stops when `stop` exists
    assert load.readline() == "started"

    # queue mode with a rate below the offered load, so calls really wait in the policy
    r = ctl(a, "policy", "attach", "hello_client.py", "ratelimit", "--config", "{rate: 300, burst: 5, mode: queue, max_queue: 100000}")
    assert r.returncode == 0, r.stderr
    time.sleep(0.8)
    before = policies_of(a, "hello_client.py")[0]
    assert before["version"] == "1.0"

    r = ctl(a, "policy", "upgrade", "ratelimit", "--module", str(v2))
    assert r.returncode == 0, r.stderr
    after = policies_of(a, "hello_client.py")[0]
    assert after["version"] == "2.0-test"
    # the counters were carried over, not restarted
    admitted_key = next(k for k in before["counters"] if "admit" in k or "passed" in k or "allowed" in k)
    assert after["counters"][admitted_key] >= before["counters"][admitted_key] > 0

    time.sleep(0.8)
    r = ctl(a, "policy", "config", "ratelimit", "--config", "{rate: 5000, burst: 50, mode: queue, max_queue: 100000}")
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    r = ctl(a, "policy", "detach", "ratelimit")
    assert r.returncode == 0, r.stderr
    assert policies_of(a, "hello_client.py") == []
    time.sleep(0.3)
    stop.touch()
    code, out, err = load.wait(60)
    assert code == 0, err
    attempted, completed, failed = load_counts(out)
    assert failed == 0, out
    assert attempted == completed > 100


@pytest.fixture(autouse=True)
def _stop_file_env(monkeypatch, tmp_path):
    # hello_client.py's load mode stops when STOP_FILE exists; app_factory copies os.environ
    monkeypatch.setenv("STOP_FILE", str(tmp_path / "stop"))


def test_drop_mode_rejects_with_resource_exhausted(served, app_factory, gen_dir):
    a, _b, address = served
    rogue = mrpcd.connect(a.socket, name="limited")
    try:
        r = ctl(a, "policy", "attach", "limited", "ratelimit", "--config", "{rate: 0.001, burst: 1, mode: drop}")
        assert r.returncode == 0, r.stderr
        import hello_mrpc

        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=rogue))
        assert stub.SayHello(hello_mrpc.HelloRequest(name="first"), timeout=10).message == "Hello, first!"
        with pytest.raises(mrpcd.RpcError) as err:
            stub.SayHello(hello_mrpc.HelloRequest(name="second"), timeout=10)
        assert err.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert "rate limit" in err.value.details()
    finally:
        rogue.close()


def test_content_acl_on_the_server_side(served, app_factory, gen_dir):
    a, b, address = served
    rules = json.dumps({"rules": [{"method": "/helloworld.Greeter/SayHello", "field": "name", "op": "eq", "value": "mallory",
                                   "action": "deny", "details": "mallory is not welcome"}], "direction": "inbound"})
    r = ctl(b, "policy", "attach", "hello_server.py", "acl", "--config", rules)
    assert r.returncode == 0, r.stderr
    code, out, err = app_factory("hello_client.py", a, address, "status", "mallory", gen=gen_dir).wait()
    assert out.strip() == "PERMISSION_DENIED|mallory is not welcome", (out, err)
    code, out, err = app_factory("hello_client.py", a, address, "status", "alice", gen=gen_dir).wait()
    assert out.strip() == "OK", (out, err)


def test_acl_decides_on_a_copy_the_app_cannot_change(served, gen_dir):
    """The app keeps rewriting its shared memory after submitting: a request the ACL let
    through as "alice__" must reach the server as "alice__", never as the denied "mallory"."""
    import threading

    a, _b, address = served
    import hello_mrpc

    rules = json.dumps({"rules": [{"method": "/helloworld.Greeter/SayHello", "field": "name", "op": "eq", "value": "mallory", "action": "deny"}]})
    app = mrpcd.connect(a.socket, name="sneaky")
    stop = threading.Event()
    flips = [0]

    def scribbler() -> None:
        mm = app.rings._mm
        end = len(mm) // 2  # the tx ring (app -> daemon) is the first half of the memfd
        while not stop.is_set():
            pos = mm.find(b"alice__", 0, end)
            if pos >= 0:
                mm[pos:pos + 7] = b"mallory"
                flips[0] += 1

    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))  # registers the schema
        r = ctl(a, "policy", "attach", "sneaky", "acl", "--config", rules)
        assert r.returncode == 0, r.stderr
        assert stub.SayHello(hello_mrpc.HelloRequest(name="warmup"), timeout=10).message == "Hello, warmup!"
        t = threading.Thread(target=scribbler, daemon=True)
        t.start()
        outcomes = {"passed": 0, "denied": 0}
        for _ in range(40):
            try:
                reply = stub.SayHello(hello_mrpc.HelloRequest(name="alice__"), timeout=10)
            except mrpcd.RpcError as exc:  # the app changed it before the daemon took its copy: checked as mallory
                assert exc.code() is mrpcd.StatusCode.PERMISSION_DENIED, exc
                outcomes["denied"] += 1
            else:
                assert reply.message == "Hello, alice__!", f"the server got what the ACL never checked: {reply.message}"
                outcomes["passed"] += 1
        stop.set()
        t.join(5)
        assert flips[0] > 0, "the scribbler never found the request in shared memory"
        assert sum(outcomes.values()) == 40
    finally:
        stop.set()
        app.close()


def test_bad_policy_modules_are_refused_and_the_old_one_keeps_running(served, tmp_path):
    a, _b, _address = served
    app = mrpcd.connect(a.socket, name="victim")
    try:
        assert ctl(a, "policy", "attach", "victim", "ratelimit", "--config", "{rate: 1000}").returncode == 0
        raising = tmp_path / "raising.py"
        raising.write_text("raise RuntimeError('this module is broken')\n")
        r = ctl(a, "policy", "upgrade", "ratelimit", "--module", str(raising))
        assert r.returncode == 1 and "this module is broken" in r.stderr
        nopolicy = tmp_path / "nopolicy.py"
        nopolicy.write_text("X = 1\n")
        r = ctl(a, "policy", "upgrade", "ratelimit", "--module", str(nopolicy))
        assert r.returncode == 1 and "POLICY" in r.stderr
        wrongtype = tmp_path / "wrongtype.py"
        wrongtype.write_text("POLICY = dict\n")
        r = ctl(a, "policy", "upgrade", "ratelimit", "--module", str(wrongtype))
        assert r.returncode == 1 and "Policy" in r.stderr
        r = ctl(a, "policy", "attach", "victim", "no-such-policy")
        assert r.returncode == 1
        r = ctl(a, "policy", "config", "ratelimit", "--config", "{rate: -5}")
        assert r.returncode == 1 and "rate" in r.stderr
        r = ctl(a, "policy", "attach", "victim", "ratelimit", "--config", "{rate: 10}")
        assert r.returncode == 1 and "already has a policy named" in r.stderr
        pols = policies_of(a, "victim")
        assert [p["instance"] for p in pols] == ["ratelimit"] and pols[0]["version"] == "1.0"
        assert pols[0]["config"]["rate"] == 1000
        assert a.alive()
    finally:
        app.close()


def test_non_admin_is_refused(shared_daemon):
    d = shared_daemon
    app = mrpcd.connect(d.socket, name="guarded")
    try:
        r = ctl(d, "policy", "attach", "guarded", "ratelimit", "--config", "{rate: 10}", uid=65534)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "permission denied" in r.stderr and "uid 65534" in r.stderr
        # and says how an operator other than root gets the right
        assert "none is configured: set admin_group in the daemon's config" in r.stderr, r.stderr
        assert policies_of(d, "guarded") == []
        r = ctl(d, "policy", "list", uid=65534)  # reading is allowed
        assert r.returncode == 0 and "guarded" in r.stdout
        r = ctl(d, "policy", "attach", "guarded", "ratelimit", "--config", "{rate: 10}")  # root may
        assert r.returncode == 0, r.stderr
    finally:
        app.close()


def test_transport_live_upgrade_keeps_connections_under_load(served, app_factory, gen_dir, tmp_path):
    a, b, address = served
    apps_dir = Path(__file__).resolve().parent / "apps"
    load = app_factory("hello_client.py", a, address, "load", "60", "4", gen=gen_dir)
    assert load.readline() == "started"
    routes_before = {d.socket: Control(d.socket).call("apps")["apps"] for d in (a, b)}
    sockets_before = {d: sorted(r["socket_peer"] for app in apps for r in app["routes"]) for d, apps in routes_before.items()}
    assert all(sockets_before.values())
    # a module that is no transport is refused and nothing changes
    r = ctl(a, "transport", "upgrade", "--module", str(apps_dir / "transport_broken.py"))
    assert r.returncode == 1 and "not a transport version" in r.stderr
    for d in (a, b):
        r = ctl(d, "transport", "upgrade", "--module", str(apps_dir / "transport_v2.py"))
        assert r.returncode == 0, r.stderr
        assert "version 2-test" in r.stdout
        time.sleep(0.3)
    for d in (a, b):
        apps = Control(d.socket).call("apps")["apps"]
        routes = [r for app in apps for r in app["routes"]]
        assert routes and all(r["transport"] == "2-test" for r in routes)
        # the same TCP connections: same peer addresses, ephemeral ports included
        assert sorted(r["socket_peer"] for r in routes) == sockets_before[d.socket]
    # a new connection made after the upgrade also runs the new version
    code, out, err = app_factory("hello_client.py", a, address, "unary", "5", gen=gen_dir).wait()
    assert code == 0 and out.strip() == "ok 5", err
    (tmp_path / "stop").touch()
    code, out, err = load.wait(60)
    assert code == 0, err
    attempted, completed, failed = load_counts(out)
    assert failed == 0, out
    assert attempted == completed > 100


def test_transport_upgrade_when_one_hand_over_fails(served):
    """The running version's hand_over() raises on one connection after it went quiet: the
    upgrade still reaches every other connection and records the new version; the broken
    connection is closed (calls on it fail or reconnect, never hang) and named in the reply."""
    import hello_mrpc

    a, b, address = served
    apps_dir = Path(__file__).resolve().parent / "apps"
    app = mrpcd.connect(a.socket, name="upgrade-partial")
    try:
        stubs = [hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app)) for _ in range(3)]
        for i, stub in enumerate(stubs):
            assert stub.SayHello(hello_mrpc.HelloRequest(name=f"c{i}"), timeout=10).message == f"Hello, c{i}!"
        r = ctl(b, "transport", "upgrade", "--module", str(apps_dir / "transport_flaky.py"))
        assert r.returncode == 0 and "3 connections handed over" in r.stdout, (r.stdout, r.stderr)
        r = ctl(b, "transport", "upgrade", "--module", str(apps_dir / "transport_v2.py"))
        assert r.returncode == 0, r.stderr
        assert "version 2-test: 2 connections handed over" in r.stdout and "flaky hand_over" in r.stdout
        routes = [r for x in Control(b.socket).call("apps")["apps"] for r in x["routes"]]
        assert len(routes) == 2 and all(r["transport"] == "2-test" for r in routes)
        for i, stub in enumerate(stubs):
            try:
                reply = stub.SayHello(hello_mrpc.HelloRequest(name=f"c{i}"), timeout=5)
            except mrpcd.RpcError as exc:  # the closed connection's call may fail, clearly
                assert exc.code() is mrpcd.StatusCode.UNAVAILABLE, exc
                reply = stub.SayHello(hello_mrpc.HelloRequest(name=f"c{i}"), timeout=5)
            assert reply.message == f"Hello, c{i}!"
        # and new connections run the recorded new version
        fresh = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert fresh.SayHello(hello_mrpc.HelloRequest(name="new"), timeout=10).message == "Hello, new!"
        routes = [r for x in Control(b.socket).call("apps")["apps"] for r in x["routes"]]
        assert routes and all(r["transport"] == "2-test" for r in routes)
    finally:
        app.close()


def test_policy_doc_shows_a_policys_config_keys_without_a_daemon(tmp_path):
    """An operator had no way from the CLI to learn which config keys a policy takes (only
    the source's docstring said): `mrpcctl policy doc NAME` prints it, no daemon needed."""
    def doc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", str(tmp_path / "none.sock"), "policy", "doc", *args],
                              capture_output=True, text=True, timeout=30)

    for name in ("ratelimit", "acl", "qos", "fault", "metrics", "admission", "vtc"):
        r = doc(name)
        assert r.returncode == 0 and "Config keys" in r.stdout, (name, r.stdout, r.stderr)
    assert "burst" in doc("ratelimit").stdout
    # a module file of the operator's: its docstring, read without running it
    mine = tmp_path / "mine.py"
    mine.write_text('"""My policy.\n\nConfig keys:\n  limit  int\n"""\nraise SystemExit("must not run")\n')
    r = doc(str(mine))
    assert r.returncode == 0 and r.stdout.startswith("My policy.") and "limit  int" in r.stdout, r.stdout + r.stderr
    r = doc("nosuch")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "no policy module 'nosuch'" in r.stderr and "ratelimit" in r.stderr
    r = doc(str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "cannot read" in r.stderr, r.stderr
