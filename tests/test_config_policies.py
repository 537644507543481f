"""Policies declared in the daemon's config (`policies:`), applied to apps by name.

They attach when an app says hello (or, when they name its methods, as soon as it
registered them, and before it can connect or bind), come back for an app that reconnects
to a restarted daemon, and a reload reconciles the live apps: adds, removes and
reconfigures them, all or nothing, leaving policies attached by mrpcctl alone.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mrpcd
from mrpcd.ctl import Control
from mrpcd.daemon.config import ConfigError, load

from conftest import DaemonProc, wait_until
from test_policy_ops import ctl

SAY = "/helloworld.Greeter/SayHello"


def acl_entry(app: str, deny: str, name: str = "deny-acl", method: str = SAY) -> str:
    return f"""  - app: {app}
    kind: acl
    name: {name}
    config:
      rules:
        - method: {method}
          field: name
          op: eq
          value: {deny}
          action: deny
"""


def policies_config(*entries: str) -> str:
    return "policies:\n" + "".join(entries) if entries else "policies: []\n"


def listing(daemon: DaemonProc, app: str) -> dict:
    apps = Control(daemon.socket).call("policies", app=app)["apps"]
    assert apps, f"no app {app}"
    return apps[-1]


def instances(daemon: DaemonProc, app: str) -> list[str]:
    return [p["instance"] for p in listing(daemon, app)["policies"]]


def greet(stub, pb, name: str) -> str:
    try:
        return stub.SayHello(pb.HelloRequest(name=name), timeout=10).message
    except mrpcd.RpcError as exc:
        return exc.code().name


def reload(daemon: DaemonProc, config: str) -> str:
    """Write the daemon's config file, SIGHUP it, and return the log lines the reload wrote."""
    cfg = Path(daemon.socket).with_suffix(".yaml")
    before = len(daemon.log())
    cfg.write_text(config)
    daemon.proc.send_signal(signal.SIGHUP)
    done = lambda: "reload: configuration" in daemon.log()[before:] or "reload refused" in daemon.log()[before:]
    assert wait_until(done, 15), daemon.log()[before:]
    time.sleep(0.1)  # (the rest of its lines)
    return daemon.log()[before:]


# -- the config file ----------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mrpcd.yaml"
    path.write_text(text)
    return str(path)


def test_entries_load_in_order_with_their_lines(tmp_path):
    path = write(tmp_path, policies_config(
        "  - app: greeter-server\n    kind: ratelimit\n    name: greeter-rl\n    config: {rate: 500, burst: 50, mode: queue}\n",
        "  - {app: 'web-*', kind: metrics}\n",
        acl_entry("greeter-server", "mallory"),  # names a method: checked when an app registers it
    ))
    cfg = load(path)
    assert [(e.app, e.kind, e.instance) for e in cfg.policies] == [
        ("greeter-server", "ratelimit", "greeter-rl"), ("web-*", "metrics", "metrics"), ("greeter-server", "acl", "deny-acl")]
    assert [e.where for e in cfg.policies] == [f"{path}:2", f"{path}:6", f"{path}:7"]
    assert cfg.policies[1].matches("web-eu") and not cfg.policies[1].matches("api")
    assert load(None).policies == ()


@pytest.mark.parametrize("entry,line,words", [
    ("  - app: a\n    kind: ratelimt\n", 4, "ratelimt"),  # an unknown kind: the line of `kind`
    ("  - app: a\n    kind: ratelimit\n    config:\n      rate: 10\n      burts: 5\n", 7, "burts"),  # the line of the bad key
    ("  - app: a\n    kind: acl\n    config: {default: allw}\n", 5, "default"),
    ("  - app: a\n    knd: acl\n", 4, "knd"),
    ("  - kind: acl\n", 3, "app must be"),
    ("  - app: a\n    kind: acl\n    config: [1]\n", 5, "mapping"),
    ("  - app: a\n    kind: metrics\n  - app: a\n    kind: metrics\n", 5, "already has a policy named 'metrics'"),
])
def test_a_bad_entry_is_refused_with_its_line(tmp_path, entry, line, words):
    path = write(tmp_path, "log_level: info\n" + policies_config(entry))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert f"{path}:{line}: policies[" in str(info.value) and words in str(info.value), str(info.value)


def test_every_bad_entry_is_reported_at_once_each_on_its_line(tmp_path):
    path = write(tmp_path, policies_config("  - {app: a, kind: nope}\n", "  - {app: b, kind: metrics}\n",
                                           "  - app: c\n    kind: ratelimit\n    config: {rate: 0}\n") + "poll_us: -1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert [e.split(": ")[0] for e in info.value.errors] == [f"{path}:2", f"{path}:6", f"{path}:7"], info.value.errors
    assert "policies[0]" in info.value.errors[0] and "policies[2]" in info.value.errors[1] and "poll_us" in info.value.errors[2]


def test_check_config_refuses_a_bad_entry_with_file_and_line(tmp_path):
    path = write(tmp_path, policies_config("  - app: a\n    kind: ratelimit\n    config: {rate: -1}\n"))
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--check-config", "-c", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"{path}:4: policies[0]" in r.stderr and "rate" in r.stderr, r.stderr
    path = write(tmp_path, policies_config(acl_entry("nobody-has-this-name", "x")))
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--check-config", "-c", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -- live apps ----------------------------------------------------------------------------


@pytest.fixture
def greeter(daemon_factory, app_factory, gen_dir):
    """The greeter served behind its own daemon: (pb module, address)."""
    import hello_mrpc

    server = app_factory("hello_server.py", daemon_factory("srv"), gen=gen_dir)
    return hello_mrpc, server.readline()


def test_a_declared_acl_polices_the_first_call_of_an_app_of_that_name(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config(acl_entry("acl-client", "mallory"), "  - {app: 'no-such-app', kind: metrics}\n"))
    app = mrpcd.connect(a.socket, name="acl-client")
    other = mrpcd.connect(a.socket, name="someone-else")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"  # the very first call
        assert greet(stub, pb, "bob") == "Hello, bob!"
        (p,) = listing(a, "acl-client")["policies"]
        assert p["instance"] == "deny-acl" and p["source"] == "config" and p["declared_at"].endswith(".yaml:2"), p
        # an app of another name gets none of it
        other_stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=other))
        assert greet(other_stub, pb, "mallory") == "Hello, mallory!"
        assert instances(a, "someone-else") == []
        r = ctl(a, "policy", "list")
        assert r.returncode == 0 and "deny-acl: acl" in r.stdout and "[config " in r.stdout, r.stdout
    finally:
        app.close()
        other.close()


def test_declared_policies_keep_file_order_when_one_waits_for_the_schema(daemon_factory, greeter):
    """metrics and ratelimit attach at hello; the ACL (it names a method) once the app
    registered it, and still between them, where the file put it."""
    pb, address = greeter
    a = daemon_factory("a", policies_config("  - {app: ordered, kind: metrics, name: first}\n", acl_entry("ordered", "mallory"),
                                            "  - {app: 'ord*', kind: ratelimit, name: last, config: {rate: 1000}}\n"))
    app = mrpcd.connect(a.socket, name="ordered")
    try:
        entry = listing(a, "ordered")
        assert [p["instance"] for p in entry["policies"]] == ["first", "last"] and entry["waiting"][0]["instance"] == "deny-acl"
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))  # registers the schema
        assert instances(a, "ordered") == ["first", "deny-acl", "last"]
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        assert listing(a, "ordered")["waiting"] == []
    finally:
        app.close()


def test_a_declared_policy_the_app_cannot_have_stops_its_calls_not_the_daemon(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config(acl_entry("strict", "x", method="/helloworld.Greeter/NoSuchMethod")))
    app = mrpcd.connect(a.socket, name="strict")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(pb.HelloRequest(name="y"), timeout=10)
        assert "NoSuchMethod" in info.value.details() and "no call may pass" in info.value.details(), info.value.details()
        entry = listing(a, "strict")
        assert entry["policies"] == [] and entry["waiting"][0]["instance"] == "deny-acl", entry
        r = ctl(a, "policy", "list")
        assert "[waiting] deny-acl" in r.stdout, r.stdout
    finally:
        app.close()


def test_an_app_reconnecting_to_a_restarted_daemon_gets_its_declared_policies_again(tmp_path, daemon_factory, greeter):
    pb, address = greeter
    config = policies_config(acl_entry("comeback", "mallory"))
    procs = [DaemonProc(tmp_path, "restarting", config)]
    app = mrpcd.connect(procs[0].socket, name="comeback")
    channel = mrpcd.insecure_channel(address, app=app)
    try:
        stub = pb.GreeterStub(channel)
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        procs[0].stop()
        assert wait_until(lambda: app.closed, 10)
        procs.append(DaemonProc(tmp_path, "restarting", config))  # the same socket, a new daemon
        assert wait_until(lambda: greet(stub, pb, "bob") == "Hello, bob!", 20)
        assert channel.app is not app  # a new session (App.successor)...
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"  # ... policed as the old one was
        assert listing(procs[1], "comeback")["policies"][0]["source"] == "config"
    finally:
        channel.close()
        channel.app.close()
        app.close()
        for d in procs:
            d.stop()


def test_reload_adds_reconfigures_and_removes_declared_policies_and_leaves_mrpcctls_alone(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config())
    app = mrpcd.connect(a.socket, name="reloaded")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "mallory") == "Hello, mallory!"
        assert ctl(a, "policy", "attach", "reloaded", "metrics", "--name", "by-hand").returncode == 0

        log = reload(a, policies_config(acl_entry("reloaded", "mallory"), "  - {app: nobody, kind: metrics}\n"))
        assert "reload: configuration" in log, log
        assert instances(a, "reloaded") == ["deny-acl", "by-hand"]  # declared ones nearest the app
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        assert greet(stub, pb, "eve") == "Hello, eve!"

        reload(a, policies_config(acl_entry("reloaded", "eve")))  # reconfigured in place, state kept
        (acl,) = [p for p in listing(a, "reloaded")["policies"] if p["instance"] == "deny-acl"]
        assert acl["counters"].get("denied") == 1 and acl["counters"].get("reconfigured") == 1, acl
        assert greet(stub, pb, "eve") == "PERMISSION_DENIED"
        assert greet(stub, pb, "mallory") == "Hello, mallory!"

        reload(a, policies_config())  # removed: detached
        assert instances(a, "reloaded") == ["by-hand"]
        assert greet(stub, pb, "eve") == "Hello, eve!"
    finally:
        app.close()


def test_reload_puts_back_a_declared_policy_detached_by_hand(daemon_factory, greeter):
    pb, address = greeter
    config = policies_config(acl_entry("stubborn", "mallory"))
    a = daemon_factory("a", config)
    app = mrpcd.connect(a.socket, name="stubborn")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        assert ctl(a, "policy", "detach", "deny-acl").returncode == 0
        assert greet(stub, pb, "mallory") == "Hello, mallory!"
        reload(a, config)
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
    finally:
        app.close()


def test_a_reload_with_a_bad_entry_is_refused_with_its_line_and_changes_nothing(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config(acl_entry("kept", "mallory")))
    app = mrpcd.connect(a.socket, name="kept")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        log = reload(a, "log_level: warning\n" + policies_config(acl_entry("kept", "eve"), "  - app: kept\n    kind: ratelimit\n    config: {rate: 0}\n"))
        cfg = Path(a.socket).with_suffix(".yaml")
        assert "reload refused" in log and f"{cfg}:15: policies[1]" in log, log
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED" and greet(stub, pb, "eve") == "Hello, eve!"
        assert instances(a, "kept") == ["deny-acl"]
    finally:
        app.close()


def test_a_reload_a_live_app_cannot_take_is_refused_whole_and_shown(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config(acl_entry("live", "mallory")))
    app = mrpcd.connect(a.socket, name="live")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "bob") == "Hello, bob!"
        # valid on its own, but the live app has no such method: nothing of this reload applies
        bad = policies_config(acl_entry("live", "eve"), acl_entry("live", "x", name="second", method="/helloworld.Greeter/Nope"))
        log = reload(a, bad)
        assert "reload refused" in log and "Nope" in log and "second" in log, log
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED" and greet(stub, pb, "eve") == "Hello, eve!"
        assert instances(a, "live") == ["deny-acl"]
        reply = Control(a.socket).call("policies")
        assert "refused" in reply["config_policies_refused"] and "Nope" in reply["config_policies_refused"]
        assert "config policies: reload of" in ctl(a, "policy", "list").stdout
        # the same name taken by an mrpcctl policy: left alone, the reload refused
        assert ctl(a, "policy", "attach", "live", "metrics", "--name", "mine").returncode == 0
        log = reload(a, policies_config(acl_entry("live", "mallory"), "  - {app: live, kind: metrics, name: mine}\n"))
        assert "reload refused" in log and "attached by mrpcctl" in log, log
        # a good reload clears the refusal
        reload(a, policies_config(acl_entry("live", "mallory")))
        assert "config_policies_refused" not in Control(a.socket).call("policies")
        assert instances(a, "live") == ["deny-acl", "mine"]
    finally:
        app.close()


def test_mrpcctl_config_on_a_declared_policy_keeps_it_the_configs(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config(acl_entry("tuned", "mallory")))
    app = mrpcd.connect(a.socket, name="tuned")
    try:
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "bob") == "Hello, bob!"
        cfg = json.dumps({"rules": [{"method": SAY, "field": "name", "op": "eq", "value": "bob", "action": "deny"}]})
        assert ctl(a, "policy", "config", "deny-acl", "--config", cfg).returncode == 0
        assert greet(stub, pb, "bob") == "PERMISSION_DENIED"
        assert listing(a, "tuned")["policies"][0]["source"] == "config"
        reload(a, policies_config(acl_entry("tuned", "mallory")))  # the file's config again
        assert greet(stub, pb, "bob") == "Hello, bob!" and greet(stub, pb, "mallory") == "PERMISSION_DENIED"
    finally:
        app.close()


def test_a_server_app_is_policed_inbound_from_its_first_call_and_after_its_daemon_restarts(tmp_path, daemon_factory, app_factory, gen_dir):
    """The server side: an inbound ACL declared for the server app's name is on before it
    binds (no call can reach it unpoliced), and again once it re-registered with a new
    daemon at the same socket."""
    import hello_mrpc as pb

    config = policies_config(acl_entry("hello_server.py", "mallory").replace("    config:\n", "    config:\n      direction: inbound\n"))
    procs = [DaemonProc(tmp_path, "srv-restarting", config)]
    try:
        server = app_factory("hello_server.py", procs[0], gen=gen_dir)
        address = server.readline()
        a = daemon_factory("a")
        app = mrpcd.connect(a.socket, name="caller")
        channel = mrpcd.insecure_channel(address, app=app)
        try:
            stub = pb.GreeterStub(channel)
            assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
            assert greet(stub, pb, "bob") == "Hello, bob!"
            assert listing(procs[0], "hello_server.py")["policies"][0]["source"] == "config"
            procs[0].stop()
            procs.append(DaemonProc(tmp_path, "srv-restarting", config))
            assert wait_until(lambda: greet(stub, pb, "bob") == "Hello, bob!", 30)
            assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
            assert instances(procs[1], "hello_server.py") == ["deny-acl"]
        finally:
            channel.close()
            app.close()
    finally:
        for d in procs:
            d.stop()


def test_a_reload_gives_an_app_that_has_not_called_yet_a_waiting_policy_not_a_refusal(daemon_factory, greeter):
    pb, address = greeter
    a = daemon_factory("a", policies_config())
    app = mrpcd.connect(a.socket, name="early")  # said hello, registered nothing, connected nowhere
    try:
        log = reload(a, policies_config(acl_entry("early", "mallory")))
        assert "reload: configuration" in log, log
        assert listing(a, "early")["waiting"][0]["instance"] == "deny-acl"
        stub = pb.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert greet(stub, pb, "mallory") == "PERMISSION_DENIED"
        assert instances(a, "early") == ["deny-acl"] and listing(a, "early")["waiting"] == []
    finally:
        app.close()
