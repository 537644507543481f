"""The control socket: app registration, fd hand-off, refusals of bad requests, mrpcctl."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import mrpcd
from mrpcd import control_proto as cp
from mrpcd.ctl import Control
from mrpcd.marshal.schema import Schema


def raw_call(path: str, payload: bytes) -> dict | None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(payload)
        buf = cp.FrameBuffer()
        while True:
            data = s.recv(65536)
            if not data:
                return None
            msgs = buf.feed(data)
            if msgs:
                return msgs[0]


def test_ping_and_apps_via_mrpcctl(daemon_factory):
    d = daemon_factory()
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "ping"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and f"pid {d.pid}" in r.stdout
    app = mrpcd.connect(d.socket, name="lister")
    try:
        r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "apps"], capture_output=True, text=True, timeout=30)
        assert "lister" in r.stdout and str(os.getpid()) in r.stdout
    finally:
        app.close()


def test_mrpcctl_apps_shows_long_names_services_and_addresses_whole(capsys):
    """`mrpcctl apps` cut the name at 20 characters, the services at 30 and the listening
    addresses at 22, with nothing saying so; the columns now take the width of their values."""
    from mrpcd import ctl

    name = "a-rather-long-application-name-for-the-listing"
    reply = {"apps": [
        {"app_id": 7, "name": name, "pid": 4242, "services": ["pkg.v1.FirstService", "pkg.v1.SecondService"],
         "listening": ["127.0.0.1:50051", "[::1]:50052"], "routes": [1, 2], "engines": [{"name": "rl"}]},
        {"app_id": 12, "name": "short\x1b[31m", "pid": 5, "services": [], "listening": [], "routes": [], "engines": []},
    ]}
    ctl._print_apps(reply)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["APP", "NAME", "PID", "SERVICES", "LISTENING", "ROUTES", "ENGINES"]
    assert out[1].split() == ["7", name, "4242", "pkg.v1.FirstService,pkg.v1.SecondService", "127.0.0.1:50051,[::1]:50052", "2", "rl"]
    assert out[2].split() == ["12", "short\\x1b[31m", "5", "-", "-", "0", "-"]  # control characters escaped
    # the columns line up: each value starts where its header does (left-aligned ones)
    for col in ("NAME", "SERVICES", "LISTENING"):
        at = out[0].index(col)
        assert out[1][at - 1] == " " and out[1][at] != " "


def test_listings_of_a_daemon_without_apps_say_so(daemon_factory):
    """`policy list` printed nothing at all with no app connected (as if it had failed)."""
    d = daemon_factory()
    for args in (["apps"], ["policy", "list"]):
        r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == "no apps connected", (args, r.stdout, r.stderr)


def test_mrpcctl_without_daemon_is_clear(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", str(tmp_path / "none.sock"), "ping"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach mrpcd" in r.stderr
    # and says what to check, as the app library does
    assert "(is the daemon running? start it with `mrpcd`, or name its socket with --socket or MRPCD_SOCKET)" in r.stderr, r.stderr


def test_app_without_daemon_gets_unavailable(tmp_path):
    with pytest.raises(mrpcd.RpcError) as err:
        mrpcd.connect(str(tmp_path / "none.sock"))
    assert err.value.code() is mrpcd.StatusCode.UNAVAILABLE
    assert "is the daemon running" in err.value.details()


def test_hello_hands_over_sealed_memfd_and_eventfds(daemon_factory):
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="fds")
    try:
        assert app.rings.size > 0
        # the memfd is sealed: the app cannot shrink it under the daemon
        with pytest.raises(OSError):
            os.ftruncate(app.rings.fd, 4096)
        assert os.readlink(f"/proc/self/fd/{app.rings.fd}").startswith("/memfd:")
    finally:
        app.close()


def test_bad_requests_get_errors_and_daemon_keeps_serving(daemon_factory):
    d = daemon_factory()
    # unknown op: error reply, connection still usable
    ctl = Control(d.socket)
    with pytest.raises(cp.ControlError, match="unknown control op"):
        ctl.call("frobnicate")
    assert ctl.call("ping")["pid"] == d.pid
    # app ops before hello
    with pytest.raises(cp.ControlError, match="say hello first"):
        ctl.call("connect", target="127.0.0.1:1")
    # a frame announcing 1 GiB: refused, connection closed
    reply = raw_call(d.socket, struct.pack("<I", 1 << 30))
    assert reply is not None and not reply["ok"] and "exceeds" in reply["error"]
    # msgpack garbage
    reply = raw_call(d.socket, struct.pack("<I", 3) + b"\xc1\xc1\xc1")
    assert reply is not None and not reply["ok"] and "malformed" in reply["error"]
    # not a map
    body = msgpack.packb([1, 2])
    reply = raw_call(d.socket, struct.pack("<I", len(body)) + body)
    assert reply is not None and "must be a map" in reply["error"]
    assert d.alive()
    assert Control(d.socket).call("ping")["pid"] == d.pid


@pytest.mark.parametrize(
    "schema, fragment",
    [
        ("not a schema", "schema must be a mapping"),
        ({"messages": [["a.B", [["x", 1, ["message", "a.Missing"], "single", None, None]]]]}, "undefined message a.Missing"),
        ({"messages": [["a.B", [["x", 1, ["int99", None], "single", None, None]]]]}, "unknown type kind"),
        ({"messages": [["a.B", [["x", -1, ["int32", None], "single", None, None]]]]}, "bad field number"),
        ({"messages": [["bad name", []]]}, "invalid message name"),
        ({"services": [["a.S", [["M", "a.In", "a.Out", False, False]]]]}, "undefined message a.In"),
    ],
)
def test_bad_schema_is_refused_clearly(daemon_factory, schema, fragment):
    d = daemon_factory()
    app = mrpcd.connect(d.socket)
    try:
        with pytest.raises(mrpcd.RpcError) as err:
            app.call("schema", schema=schema)
        assert fragment in err.value.details()
        # the session survives a refused request
        assert app.call("schema", schema=Schema().to_dict())["fingerprints"] == {}
    finally:
        app.close()


def test_bind_and_connect_errors_are_clear(daemon_factory):
    d = daemon_factory()
    app = mrpcd.connect(d.socket)
    try:
        with pytest.raises(mrpcd.RpcError, match="register its schema first"):
            app.call("bind", address="127.0.0.1:0", services=["no.Such"])
        with pytest.raises(mrpcd.RpcError, match="must be host:port"):
            app.call("bind", address="nonsense", services=[])
        # a missing host was reported as a bad port
        with pytest.raises(mrpcd.RpcError, match=r"^INVALID_ARGUMENT: address ':50051' names no host \(e.g. '127.0.0.1:50051'\)$"):
            app.call("bind", address=":50051", services=[])
        with pytest.raises(mrpcd.RpcError) as err:
            app.call("connect", target="127.0.0.1:1")
        assert err.value.code() is mrpcd.StatusCode.UNAVAILABLE
    finally:
        app.close()


@pytest.mark.parametrize("args, fragment", [
    ({"op": "bind", "services": []}, "address None must be host:port"),
    ({"op": "bind", "address": 7000, "services": []}, "address 7000 must be host:port"),
    ({"op": "connect"}, "address None must be host:port"),
    ({"op": "connect", "target": ["127.0.0.1", 1]}, "must be host:port"),
])
def test_app_requests_without_their_address_are_refused_clearly(daemon_factory, args, fragment):
    """A request's field may be missing or of any type: the daemon says which, the app's
    session and the daemon go on (not an internal error)."""
    d = daemon_factory()
    app = mrpcd.connect(d.socket)
    try:
        with pytest.raises(mrpcd.RpcError) as err:
            app.request(dict(args))
        assert err.value.code() is mrpcd.StatusCode.INVALID_ARGUMENT and fragment in err.value.details()
        assert app.call("bind", address="127.0.0.1:0", services=[])["address"].startswith("127.0.0.1:")
    finally:
        app.close()
    assert d.alive()


@pytest.mark.parametrize("op, args", [
    ("policy_attach", {"app": None}),  # the app, filled in below
    ("policy_attach", {"app": None, "policy": 5}),
    ("policy_upgrade", {"name": "ratelimit"}),
    ("transport_upgrade", {}),
    ("transport_upgrade", {"module": {"a": 1}}),
])
def test_operator_requests_without_their_module_are_refused_clearly(daemon_factory, op, args):
    d = daemon_factory()
    app = mrpcd.connect(d.socket)
    try:
        ctl = Control(d.socket)
        app_id = ctl.call("apps")["apps"][0]["app_id"]
        if op == "policy_upgrade":
            ctl.call("policy_attach", app=app_id, policy="ratelimit", config={"rate": 5})
        request = {k: (app_id if k == "app" else v) for k, v in args.items()}
        with pytest.raises(cp.ControlError) as err:
            ctl.call(op, **request)
        assert err.value.code == 9, err.value  # FAILED_PRECONDITION with the reason, not 13 (internal error)
        assert "internal error" not in str(err.value)
        assert ctl.call("ping")["pid"] == d.pid
    finally:
        app.close()


def test_second_daemon_on_same_socket_refuses(daemon_factory, tmp_path):
    d = daemon_factory()
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--socket", d.socket], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "already serving" in r.stderr
    # and says how to run a second daemon beside it (a newcomer's next question)
    assert "--socket" in r.stderr and "MRPCD_SOCKET" in r.stderr
    assert d.alive()


def test_a_client_that_never_reads_its_replies_does_not_wedge_the_daemon(daemon_factory):
    """Replies go out without blocking the event loop: one stuck client stalls only itself."""
    d = daemon_factory()
    body = msgpack.packb({"op": "ping", "id": 1})
    frame = struct.pack("<I", len(body)) + body
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.connect(d.socket)
        stuck.setblocking(False)
        try:
            for _ in range(1_000_000):  # until both directions' buffers are full
                stuck.send(frame)
        except BlockingIOError:
            pass
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        assert ctl.call("ping")["pid"] == d.pid
        ctl.sock.close()
    assert d.alive()


def test_running_out_of_file_descriptors_does_not_stop_accepting(tmp_path):
    """EMFILE on accept is transient: once clients leave, new ones are served again."""
    import resource
    import time

    from conftest import wait_until

    path = str(tmp_path / "few-fds.sock")
    log = open(tmp_path / "few-fds.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mrpcd.daemon.main", "--socket", path], stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    clients: list[socket.socket] = []
    try:
        assert wait_until(lambda: os.path.exists(path), timeout=20)
        for _ in range(100):  # more than the daemon has descriptors for
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(path)
            except OSError:  # the backlog is full too
                s.close()
                break
            clients.append(s)
        time.sleep(0.5)  # let the daemon hit EMFILE
        for s in clients:
            s.close()
        clients.clear()

        def pings() -> bool:
            try:
                ctl = Control(path)
                ctl.sock.settimeout(2)
                with ctl.sock:
                    return ctl.call("ping")["pid"] == proc.pid
            except OSError:
                return False

        assert wait_until(pings, timeout=15)
        assert proc.poll() is None
        assert "too many open files" in (tmp_path / "few-fds.log").read_text().lower()
    finally:
        for s in clients:
            s.close()
        proc.terminate()
        proc.wait(10)
        log.close()


def test_a_file_that_is_not_a_socket_at_the_socket_path_is_kept(tmp_path):
    """Only a stale *socket* is replaced; a regular file there is the operator's mistake to see."""
    path = tmp_path / "mrpcd.yaml"
    path.write_text("log_level: debug\n")
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--socket", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "not a socket" in r.stderr
    assert path.read_text() == "log_level: debug\n"


ODD_DESCRIBE_POLICY = '''
from mrpcd.policies.base import Policy


class OddDescribe(Policy):
    """describe() returns an integer beyond 64 bits: msgpack cannot pack it."""
    name = "odd"

    def describe(self):
        return {**super().describe(), "big": 1 << 70}


POLICY = OddDescribe
'''

SET_DESCRIBE_POLICY = '''
from mrpcd.policies.base import Policy


class SetDescribe(Policy):
    """describe() holds a set and an object: not msgpack types, but they have a plain form."""
    name = "sets"

    def describe(self):
        return {**super().describe(), "tags": {"a", "b"}, "owner": object}


POLICY = SetDescribe
'''


def test_a_reply_that_cannot_be_encoded_gets_an_error_and_the_connection_stays(daemon_factory, tmp_path):
    d = daemon_factory()
    module = tmp_path / "odd_policy.py"
    module.write_text(ODD_DESCRIBE_POLICY)
    app = mrpcd.connect(d.socket, name="odd-app")
    try:
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        with pytest.raises(cp.ControlError, match="cannot be encoded") as err:
            ctl.call("policy_attach", app="odd-app", policy=str(module))
        assert err.value.code == 13
        with pytest.raises(cp.ControlError, match="cannot be encoded"):
            ctl.call("policies")
        assert ctl.call("ping")["pid"] == d.pid  # same connection, still served
        ctl.sock.close()
    finally:
        app.close()
    assert d.alive()


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "attach", "1", "ratelimit", "--config", "{rate: 10, since: 2001-01-01}"],  # a YAML date
        ["policy", "attach", "1", "ratelimit", "--position", str(1 << 70)],
        ["policy", "config", "x", "--config", "rate: " + "[" * 5000 + "]" * 5000],
        ["policy", "attach", "1", "ratelimit", "--config", "{rate: 10, per_method: {5: {rate: 1}}}"],  # an int key
    ],
)
def test_mrpcctl_request_it_cannot_send_is_a_clear_error(daemon_factory, args):
    d = daemon_factory()
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("mrpcctl: policy: ")
    assert d.alive()


def test_mrpcctl_waits_for_room_in_a_full_listen_backlog(daemon_factory):
    """Many clients at once: mrpcctl waits its turn instead of failing with EAGAIN."""
    import signal

    d = daemon_factory()
    queued: list[socket.socket] = []
    d.proc.send_signal(signal.SIGSTOP)  # accepts nothing: the backlog fills
    try:
        for _ in range(100_000):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        ctl = subprocess.Popen([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "ping"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        try:
            out, err = ctl.communicate(timeout=3)  # it must still be waiting
        except subprocess.TimeoutExpired:
            pass
        else:
            pytest.fail(f"mrpcctl gave up on a full backlog: {err}")
    finally:
        d.proc.send_signal(signal.SIGCONT)
        for s in queued:
            s.close()
    out, err = ctl.communicate(timeout=30)
    assert ctl.returncode == 0 and f"pid {d.pid}" in out, err


def test_a_policy_change_over_several_apps_is_all_or_nothing(daemon_factory):
    """An app selected by name may be several apps: one refusal must leave all of them as they were."""
    d = daemon_factory()
    a, b = mrpcd.connect(d.socket, name="twin"), mrpcd.connect(d.socket, name="twin")
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)

    def chains() -> dict[int, list[tuple[str, dict]]]:
        return {x["app_id"]: [(p["instance"], p["config"]) for p in x["policies"]] for x in ctl.call("policies", app="twin")["apps"]}

    try:
        ctl.call("policy_attach", app=b.app_id, policy="ratelimit", config={"rate": 5})
        with pytest.raises(cp.ControlError, match="already has a policy named 'ratelimit'"):
            ctl.call("policy_attach", app="twin", policy="ratelimit", config={"rate": 10})
        assert chains() == {a.app_id: [], b.app_id: [("ratelimit", {"rate": 5})]}
        # detach / config naming both apps, only one of which has the policy
        for op, args in (("policy_detach", {}), ("policy_config", {"config": {"rate": 7}})):
            with pytest.raises(cp.ControlError, match="has no policy 'ratelimit'"):
                ctl.call(op, app="twin", name="ratelimit", **args)
            assert chains() == {a.app_id: [], b.app_id: [("ratelimit", {"rate": 5})]}
        # the same instance name, different policies: a config one of them refuses changes neither
        ctl.call("policy_attach", app=a.app_id, policy="ratelimit", name="chaos", config={"rate": 3})
        ctl.call("policy_attach", app=b.app_id, policy="fault", name="chaos", config={"abort": {"probability": 0}})
        with pytest.raises(cp.ControlError, match="fault"):
            ctl.call("policy_config", name="chaos", config={"rate": 7})
        assert chains() == {a.app_id: [("chaos", {"rate": 3})], b.app_id: [("ratelimit", {"rate": 5}), ("chaos", {"abort": {"probability": 0}})]}
        # an upgrade the second app's policy refuses upgrades neither
        with pytest.raises(cp.ControlError, match="upgrade refused"):
            ctl.call("policy_upgrade", name="chaos", module="mrpcd.policies.ratelimit")
        modules = {x["app_id"]: [p["module"] for p in x["policies"]] for x in ctl.call("policies", app="twin")["apps"]}
        assert modules == {a.app_id: ["ratelimit"], b.app_id: ["ratelimit", "fault"]}
    finally:
        ctl.sock.close()
        a.close()
        b.close()


def test_a_transport_module_that_exits_on_import_is_refused_and_the_daemon_lives(daemon_factory, tmp_path):
    d = daemon_factory()
    module = tmp_path / "transport_exits.py"
    module.write_text("import sys\nsys.exit('no transport here')\n")
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)
    with pytest.raises(cp.ControlError, match="SystemExit: no transport here"):
        ctl.call("transport_upgrade", module=str(module))
    assert ctl.call("ping")["pid"] == d.pid
    ctl.sock.close()
    assert d.alive()


POLICY_EXITS_ON_START = '''
import sys
from pathlib import Path

from mrpcd.policies.base import Policy


class ExitsOnStart(Policy):
    name = "exits"

    def __init__(self, ctx, config=None):
        sys.exit("policy gives up")


POLICY = ExitsOnStart
'''


def test_a_policy_that_exits_when_it_starts_is_refused_and_the_daemon_lives(daemon_factory, tmp_path):
    d = daemon_factory()
    module = tmp_path / "policy_exits.py"
    module.write_text(POLICY_EXITS_ON_START)
    app = mrpcd.connect(d.socket, name="target")
    try:
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        with pytest.raises(cp.ControlError, match="SystemExit: policy gives up"):
            ctl.call("policy_attach", app="target", policy=str(module))
        assert ctl.call("policies", app="target")["apps"][0]["policies"] == []
        ctl.sock.close()
    finally:
        app.close()
    assert d.alive()


def test_a_policy_describe_with_sets_or_objects_is_shown_as_plain_values(daemon_factory, tmp_path):
    """attach must not report an error for a policy it attached, and policy list keeps working."""
    d = daemon_factory()
    module = tmp_path / "set_policy.py"
    module.write_text(SET_DESCRIBE_POLICY)
    app = mrpcd.connect(d.socket, name="set-app")
    try:
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        attached = ctl.call("policy_attach", app="set-app", policy=str(module))["attached"][0]
        assert sorted(attached["tags"]) == ["a", "b"] and attached["owner"] == str(object)
        policies = ctl.call("policies", app="set-app")["apps"][0]["policies"]
        assert [p["instance"] for p in policies] == ["sets"]
        ctl.sock.close()
    finally:
        app.close()


@pytest.mark.parametrize("selector, fragment", [(True, "app must be an app_id or a name"), ("9" * 5000, "no connected app"),
                                                ("²", "no connected app")])
def test_odd_app_selectors_get_a_clear_answer(daemon_factory, selector, fragment):
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="one")
    try:
        ctl = Control(d.socket)
        ctl.sock.settimeout(10)
        with pytest.raises(cp.ControlError, match=fragment):
            ctl.call("policies", app=selector)
        ctl.sock.close()
    finally:
        app.close()


def test_mrpcctl_prints_app_names_without_terminal_control_characters(daemon_factory):
    """App names come from any local user: they must not reach the operator's terminal as escapes."""
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="evil\x1b]0;owned\x07\x1b[2J\nline")
    try:
        for args in (["apps"], ["policy", "list"]):
            r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, *args], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert "evil" in r.stdout and "\x1b" not in r.stdout and "\x07" not in r.stdout, r.stdout
            assert not any(line.startswith("line") for line in r.stdout.splitlines())
    finally:
        app.close()


def test_mrpcctl_into_a_closed_pipe_exits_without_a_traceback(daemon_factory):
    """`mrpcctl stats | head -1`: the reader leaves early; mrpcctl must just stop."""
    d = daemon_factory()
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "stats"], stdout=w, stderr=subprocess.PIPE, text=True,
                           timeout=30)
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode != 0


def test_mrpcctl_finds_the_system_service_when_no_socket_is_named(daemon_factory, tmp_path, monkeypatch, capsys):
    """After `systemctl enable --now mrpcd` (socket /run/mrpcd/control.sock) a plain `mrpcctl ping` reaches it."""
    from mrpcd import ctl as ctlmod
    from mrpcd import paths

    d = daemon_factory()
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", d.socket)  # stands for /run/mrpcd/control.sock
    monkeypatch.delenv("MRPCD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no per-user daemon here
    assert ctlmod.main(["ping"]) == 0
    assert f"pid {d.pid}" in capsys.readouterr().out
    monkeypatch.setenv("MRPCD_SOCKET", "")  # empty is unset (as the app library reads it)
    assert ctlmod.main(["ping"]) == 0
    assert f"pid {d.pid}" in capsys.readouterr().out
    # an explicit choice is kept, even when nothing listens there
    monkeypatch.setenv("MRPCD_SOCKET", str(tmp_path / "none.sock"))
    assert ctlmod.main(["ping"]) == 1
    assert "none.sock" in capsys.readouterr().err


def test_apps_find_the_system_service_when_no_socket_is_named(daemon_factory, tmp_path, monkeypatch):
    """As mrpcctl does: with MRPCD_SOCKET unset and no per-user daemon, an app reaches the
    system service's socket (an app used to fail with `cannot reach mrpcd at
    /run/user/UID/mrpcd/control.sock` next to a running `systemctl start mrpcd`)."""
    from mrpcd import paths
    from mrpcd.app import App, DaemonUnavailable

    d = daemon_factory()
    monkeypatch.setattr(paths, "SYSTEM_SOCKET", d.socket, raising=False)  # stands for /run/mrpcd/control.sock
    monkeypatch.delenv("MRPCD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # no per-user daemon here
    app = App(name="system-user")
    try:
        assert app.socket_path == d.socket
    finally:
        app.close()
    # an explicit choice is kept, even when nothing listens there
    monkeypatch.setenv("MRPCD_SOCKET", str(tmp_path / "none.sock"))
    with pytest.raises(DaemonUnavailable, match="none.sock"):
        App(name="explicit")


# -- the control socket's path: who may take it over, who may remove it --------------------


def _other_user_or_skip() -> None:
    import shutil

    from conftest import as_other_user

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    probe = subprocess.run(as_other_user([sys.executable, "-c", "import mrpcd.daemon.main"]), capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"another user cannot run this Python/mrpcd: {probe.stderr.strip()[-200:]}")


def _run_daemon(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    """A daemon that should refuse to start: its exit, or a kill if it serves after all."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=10)
        err = f"(it did not refuse: still running after {timeout}s)\n{err}"
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_a_live_daemons_socket_that_cannot_be_probed_is_not_taken_over(daemon_factory):
    """connect() failing with EACCES (the operator made the socket 0600) said nothing about
    whether a daemon listens: a second daemon deleted the live one's socket and took the path."""
    import shutil
    import tempfile

    from conftest import DaemonProc, OTHER_UID, as_other_user

    _other_user_or_skip()
    home = Path(tempfile.mkdtemp(prefix="mrpcd-probe-"))
    try:
        home.chmod(0o755)
        os.chown(home, OTHER_UID, OTHER_UID)  # the second daemon may create and remove files here
        first = DaemonProc(home, "first")
        try:
            os.chmod(first.socket, 0o600)  # only root may connect now
            r = _run_daemon(as_other_user([sys.executable, "-m", "mrpcd.daemon.main", "--socket", first.socket]))
            assert r.returncode == 1, r.stderr
            assert f"cannot tell whether another mrpcd serves {first.socket}" in r.stderr and "Permission denied" in r.stderr, r.stderr
            assert Control(first.socket).call("ping")["pid"] == first.pid  # still its socket
        finally:
            first.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_a_stopping_daemon_leaves_another_daemons_socket_alone(daemon_factory, tmp_path):
    """Daemon A's socket file was removed (a tmp cleaner) and B now listens at that path: A
    stopping must not unlink B's socket."""
    a = daemon_factory("a")
    os.unlink(a.socket)
    from conftest import DaemonProc

    b = DaemonProc(tmp_path, Path(a.socket).stem)  # the same path
    try:
        assert b.socket == a.socket
        a.stop()
        assert a.proc.returncode == 0
        assert Control(b.socket).call("ping")["pid"] == b.pid
    finally:
        b.stop()
    assert not os.path.exists(b.socket)  # its own socket it does remove
    assert not os.path.exists(b.socket + ".lock")


def test_start_errors_name_what_failed(tmp_path):
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "nowhere")
    r = _run_daemon([sys.executable, "-m", "mrpcd.daemon.main", "--socket", str(dangling)])
    assert r.returncode == 1 and f"{dangling} is a symbolic link to {tmp_path / 'nowhere'} (dangling)" in r.stderr, r.stderr
    assert "mrpcd stopping" not in r.stderr, r.stderr  # it never served: nothing to stop (it said "stopping: 0 apps")
    assert dangling.is_symlink()
    cfg = tmp_path / "m.yaml"
    cfg.write_text('metrics: {address: "no-such-host.invalid:9464"}\n')
    r = _run_daemon([sys.executable, "-m", "mrpcd.daemon.main", "-c", str(cfg), "--socket", str(tmp_path / "m.sock")], timeout=60)
    assert r.returncode == 1 and "cannot start: metrics address no-such-host.invalid:9464:" in r.stderr, r.stderr
    assert not (tmp_path / "m.sock").exists()


def test_a_socket_folder_the_daemon_cannot_write_is_named(tmp_path):
    from conftest import as_other_user

    _other_user_or_skip()
    tmp_path.chmod(0o755)  # pytest's 0700 would hide the folder entirely
    tmp_path.parent.chmod(tmp_path.parent.stat().st_mode | 0o005)
    (tmp_path / "rootonly").mkdir(mode=0o755)
    path = tmp_path / "rootonly" / "x.sock"
    r = _run_daemon(as_other_user([sys.executable, "-m", "mrpcd.daemon.main", "--socket", str(path)]))
    assert r.returncode == 1 and str(tmp_path / "rootonly") in r.stderr and "Permission denied" in r.stderr, r.stderr


def test_the_default_folder_in_tmp_must_be_the_users_own(tmp_path):
    """/tmp/mrpcd-$UID is made with exist_ok: one another user made first (or anyone may
    write to) would let them replace the socket apps connect to."""
    from conftest import OTHER_UID, as_other_user

    _other_user_or_skip()
    folder = Path(f"/tmp/mrpcd-{OTHER_UID}")
    if folder.exists() or folder.is_symlink():
        pytest.skip(f"{folder} exists already")
    folder.mkdir(mode=0o777)
    try:
        folder.chmod(0o777)
        env = {k: v for k, v in os.environ.items() if k not in ("MRPCD_SOCKET", "XDG_RUNTIME_DIR")}
        proc = subprocess.Popen(as_other_user([sys.executable, "-m", "mrpcd.daemon.main"]), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
        assert proc.returncode == 1 and f"{folder} belongs to uid 0 with mode 0777: refusing" in err, err
        assert not (folder / "control.sock").exists()
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_transport_upgrade_to_a_file_that_is_not_python_is_refused_clearly(daemon_factory, tmp_path):
    d = daemon_factory()
    notpy = tmp_path / "passwd"
    notpy.write_text("root:x:0:0:root:/root:/bin/bash\n")
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)
    with pytest.raises(cp.ControlError, match="not an importable Python file") as err:
        ctl.call("transport_upgrade", module=str(notpy))
    assert "NoneType" not in str(err.value)
    ctl.sock.close()


# -- mrpcctl and module specs ---------------------------------------------------------------

RL_V2 = '''
from mrpcd.policies.ratelimit import POLICY as _Base


class RL2(_Base):
    version = "{version}"


POLICY = RL2
'''

TRANSPORT = '''
from mrpcd.transports._tcp import PeerConnection as _Current


class PeerConnection(_Current):
    VERSION = "{version}"
'''


def mrpcctl(d, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, *args], capture_output=True, text=True,
                          timeout=30, cwd=cwd)


def test_mrpcctl_module_paths_are_the_operators_not_the_daemons(daemon_factory, tmp_path):
    """`--module ./v2.py` was sent as it is and opened in the daemon's working folder."""
    d = daemon_factory()
    ops = tmp_path / "ops"
    ops.mkdir()
    (ops / "ratelimit_v2.py").write_text(RL_V2.format(version="2.0-ops"))
    (ops / "tr_ops.py").write_text(TRANSPORT.format(version="ops-1"))
    app = mrpcd.connect(d.socket, name="rl-app")
    try:
        r = mrpcctl(d, "policy", "attach", "rl-app", "./ratelimit_v2.py", "--config", "{rate: 500}", cwd=ops)
        assert r.returncode == 0, r.stderr
        r = mrpcctl(d, "policy", "upgrade", "ratelimit", "--module", "./ratelimit_v2.py", cwd=ops)
        assert r.returncode == 0, r.stderr
        [policy] = Control(d.socket).call("policies", app="rl-app")["apps"][0]["policies"]
        assert policy["version"] == "2.0-ops" and policy["module"] == str(ops / "ratelimit_v2.py")
        r = mrpcctl(d, "transport", "upgrade", "--module", "tr_ops.py", cwd=ops)
        assert r.returncode == 0 and "transport version ops-1" in r.stdout, r.stderr
    finally:
        app.close()


def test_upgrading_again_to_the_same_dotted_module_runs_its_new_code(daemon_factory, tmp_path, monkeypatch):
    """import_module returned the module cached by the first upgrade: the second one reported
    success and ran the old code."""
    mods = tmp_path / "mods"
    mods.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(mods), os.environ.get("PYTHONPATH", "")])))
    d = daemon_factory()
    (mods / "my_transport.py").write_text(TRANSPORT.format(version="t-2"))
    (mods / "my_ratelimit.py").write_text(RL_V2.format(version="r-2"))
    app = mrpcd.connect(d.socket, name="dotted")
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)
    try:
        assert ctl.call("transport_upgrade", module="my_transport")["version"] == "t-2"
        ctl.call("policy_attach", app="dotted", policy="my_ratelimit", config={"rate": 100})
        assert ctl.call("policy_upgrade", name="ratelimit", module="my_ratelimit")["upgraded"][0]["version"] == "r-2"
        # edited in place, same size (a .pyc of the first would look current)
        (mods / "my_transport.py").write_text(TRANSPORT.format(version="t-3"))
        (mods / "my_ratelimit.py").write_text(RL_V2.format(version="r-3"))
        assert ctl.call("transport_upgrade", module="my_transport")["version"] == "t-3"
        assert ctl.call("policy_upgrade", name="ratelimit", module="my_ratelimit")["upgraded"][0]["version"] == "r-3"
        # a new version that fails to import is refused; the running one stays
        (mods / "my_ratelimit.py").write_text("this is not python\n")
        with pytest.raises(cp.ControlError, match="failed to import"):
            ctl.call("policy_upgrade", name="ratelimit", module="my_ratelimit")
        [policy] = ctl.call("policies", app="dotted")["apps"][0]["policies"]
        assert policy["version"] == "r-3" and policy["config"] == {"rate": 100}
    finally:
        ctl.sock.close()
        app.close()


# -- a policy whose describe() raises -------------------------------------------------------

BAD_DESCRIBE_POLICY = '''
import os

from mrpcd.policies.base import Policy


class BadDescribe(Policy):
    name = "baddesc"
    version = "{version}"

    def describe(self):
        if os.path.exists({flag!r}):
            raise KeyError("oops")
        return super().describe()


POLICY = BadDescribe
'''


def test_a_policy_whose_describe_raises_breaks_neither_listing_nor_changes(daemon_factory, tmp_path):
    """One policy's describe() raising broke `mrpcctl apps` and `policy list` for every app, and
    an upgrade over two apps was applied on both yet reported failed."""
    d = daemon_factory()
    flag = tmp_path / "BROKEN"
    for v in (1, 2):
        (tmp_path / f"bd_v{v}.py").write_text(BAD_DESCRIBE_POLICY.format(version=v, flag=str(flag)))
    a, b = mrpcd.connect(d.socket, name="twin"), mrpcd.connect(d.socket, name="twin")
    other = mrpcd.connect(d.socket, name="other")
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)
    try:
        ctl.call("policy_attach", app="other", policy="ratelimit", config={"rate": 5})
        flag.touch()
        attached = ctl.call("policy_attach", app="twin", policy=str(tmp_path / "bd_v1.py"), name="bd")["attached"]
        assert [x["describe_error"] for x in attached] == ["KeyError: 'oops'"] * 2
        apps = {x["app_id"]: x for x in ctl.call("apps")["apps"]}
        assert apps[other.app_id]["engines"][0]["instance"] == "ratelimit"
        assert apps[a.app_id]["engines"][0]["describe_error"] == "KeyError: 'oops'"
        listed = {x["app_id"]: x["policies"] for x in ctl.call("policies")["apps"]}
        assert listed[a.app_id][0]["instance"] == "bd" and listed[other.app_id][0]["config"] == {"rate": 5}
        upgraded = ctl.call("policy_upgrade", name="bd", module=str(tmp_path / "bd_v2.py"))["upgraded"]
        assert sorted(x["app_id"] for x in upgraded) == [a.app_id, b.app_id]
        configured = ctl.call("policy_config", name="bd", config={})["configured"]
        assert sorted(x["app_id"] for x in configured) == [a.app_id, b.app_id]
        for args in (["apps"], ["policy", "list"]):
            r = mrpcctl(d, *args)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "describe() failed: KeyError" in mrpcctl(d, "policy", "list").stdout
        flag.unlink()
        versions = {x["app_id"]: [p["version"] for p in x["policies"]] for x in ctl.call("policies", app="twin")["apps"]}
        assert versions == {a.app_id: ["2"], b.app_id: ["2"]}
    finally:
        ctl.sock.close()
        for x in (a, b, other):
            x.close()


BYTES_CONFIG_POLICY = '''
from mrpcd.policies.base import Policy


class AnyConfig(Policy):
    name = "anycfg"

    def validate_config(self, config):
        return dict(config)


POLICY = AnyConfig
'''


def test_mrpcctl_json_shows_bytes_in_a_policy_config(daemon_factory, tmp_path):
    d = daemon_factory()
    (tmp_path / "anycfg.py").write_text(BYTES_CONFIG_POLICY)
    app = mrpcd.connect(d.socket, name="bytes-app")
    try:
        r = mrpcctl(d, "policy", "attach", "bytes-app", str(tmp_path / "anycfg.py"), "--config", "{blob: !!binary aGk=}")
        assert r.returncode == 0, r.stderr
        r = mrpcctl(d, "--json", "policy", "list")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        import json

        [policy] = json.loads(r.stdout)["apps"][0]["policies"]
        assert policy["config"] == {"blob": "aGk="}  # base64
    finally:
        app.close()


def test_good_requests_before_a_broken_frame_are_answered(daemon_factory):
    """Two pings and a broken frame in one write: the pings went unanswered, and the error
    said only "malformed control message: " (msgpack's FormatError has no text)."""
    d = daemon_factory()

    def frame(body: bytes) -> bytes:
        return struct.pack("<I", len(body)) + body

    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.socket)
        s.settimeout(10)
        s.sendall(frame(msgpack.packb({"op": "ping", "id": 1})) + frame(msgpack.packb({"op": "ping", "id": 2})) + frame(b"\xc1"))
        buf, replies = cp.FrameBuffer(strict=False), []
        while True:
            data = s.recv(65536)
            if not data:
                break
            replies += buf.feed(data)
    assert [(r["id"], r["ok"]) for r in replies] == [(1, True), (2, True), (None, False)]
    assert replies[2]["error"].startswith("malformed control message: ") and replies[2]["error"] != "malformed control message: "
    assert d.alive()


def test_frame_buffer_returns_good_messages_then_reports_the_break():
    good = cp.encode({"op": "ping", "id": 1})
    frames = cp.FrameBuffer()
    assert frames.feed(good + struct.pack("<I", 1) + b"\xc1") == [{"op": "ping", "id": 1}]
    assert "FormatError" in str(frames.error) or str(frames.error) != "malformed control message: "
    with pytest.raises(cp.ControlError):
        frames.feed(good)
    with pytest.raises(cp.ControlError, match="malformed control message: .+"):
        cp.FrameBuffer().feed(struct.pack("<I", 1) + b"\xc1")


def test_one_upgrade_over_several_apps_loads_the_new_module_once(daemon_factory, tmp_path, monkeypatch):
    """The apps an upgrade covers share one copy of the new module (its module-level
    state), as the apps one attach covers do."""
    mods = tmp_path / "mods"
    mods.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(mods), os.environ.get("PYTHONPATH", "")])))
    (mods / "shared_rl.py").write_text(RL_V2.format(version="s-1") + "\nimport itertools\nLOADS = itertools.count()\n"
                                       "class Counting(POLICY):\n    def describe(self):\n"
                                       "        return dict(super().describe(), module_id=id(LOADS))\nPOLICY = Counting\n")
    d = daemon_factory()
    apps = [mrpcd.connect(d.socket, name=f"shared{i}") for i in range(2)]
    ctl = Control(d.socket)
    ctl.sock.settimeout(10)
    try:
        for i in range(2):
            ctl.call("policy_attach", app=f"shared{i}", policy="shared_rl", config={"rate": 100})
        listed = ctl.call("policies")["apps"]
        assert len({p["module_id"] for a in listed for p in a["policies"]}) == 1  # attach: one module
        (mods / "shared_rl.py").write_text((mods / "shared_rl.py").read_text().replace("s-1", "s-2"))
        upgraded = ctl.call("policy_upgrade", name="ratelimit", module="shared_rl")["upgraded"]
        assert [u["version"] for u in upgraded] == ["s-2", "s-2"]
        assert len({u["module_id"] for u in upgraded}) == 1, "each app got its own copy of the new module"
    finally:
        ctl.sock.close()
        for app in apps:
            app.close()


def test_mrpcctl_every_command_says_what_it_does_in_its_help():
    """`mrpcctl ping --help` printed only a usage line: each command's --help now says what it does."""
    for args, words in ((["ping"], "alive"), (["apps"], "connected apps"), (["stats"], "counters"), (["shutdown"], "stop the daemon"),
                        (["policy"], "policies"), (["policy", "attach"], "attach a policy"), (["transport"], "transport")):
        r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", *args, "--help"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert words in r.stdout.split("options:")[0].lower(), (args, r.stdout)


def test_mrpcctl_config_errors_are_one_line_with_where(daemon_factory, tmp_path):
    """A bad --config was a multi-line PyYAML dump (or a bare '[Errno 2] ...' for a missing
    @file); one line now says where and why, exit 2, nothing sent."""
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="target")
    try:
        r = mrpcctl(d, "policy", "attach", "target", "ratelimit", "--config", "{rate: [1")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and "--config is not valid YAML/JSON: line 1, column " in r.stderr, r.stderr
        missing = tmp_path / "nope.yaml"
        r = mrpcctl(d, "policy", "attach", "target", "ratelimit", "--config", f"@{missing}")
        assert r.returncode == 2 and r.stderr.strip() == f"mrpcctl: policy: --config @{missing}: cannot read: No such file or directory"
        bad = tmp_path / "bad.yaml"
        bad.write_text("rate: 5\nburst: [\n")
        r = mrpcctl(d, "policy", "attach", "target", "ratelimit", "--config", f"@{bad}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"--config @{bad} is not valid YAML/JSON: line 3" in r.stderr, r.stderr
        assert mrpcctl(d, "--json", "policy", "list").stdout.count('"instance"') == 0
    finally:
        app.close()


def test_mrpcctl_policy_list_reads_as_a_sentence(daemon_factory):
    """`[0] ratelimit: ratelimit 1.0 ratelimit  ` said the name three times with trailing blanks."""
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="target")
    try:
        assert mrpcctl(d, "policy", "attach", "target", "ratelimit", "--config", "{rate: 5}").returncode == 0
        assert mrpcctl(d, "policy", "attach", "target", "ratelimit", "--name", "rl2", "--config", "{rate: 7}").returncode == 0
        lines = mrpcctl(d, "policy", "list").stdout.splitlines()
        assert lines[1:] == ["  [0] ratelimit: ratelimit 1.0", "  [1] rl2: ratelimit 1.0"], lines
        assert mrpcctl(d, "policy", "config", "ratelimit", "--config", "{rate: 6}").returncode == 0
        assert mrpcctl(d, "policy", "list").stdout.splitlines()[1] == "  [0] ratelimit: ratelimit 1.0 (reconfigured=1)"
    finally:
        app.close()


def test_mrpcctl_policy_changes_answer_in_a_sentence(daemon_factory, tmp_path):
    """attach / config / upgrade / detach printed the daemon's reply as 20 lines of JSON; they
    now say what was done, per app, in a line (--json keeps the reply)."""
    d = daemon_factory()
    app = mrpcd.connect(d.socket, name="target")
    try:
        r = mrpcctl(d, "policy", "attach", "target", "ratelimit", "--name", "rl", "--config", "{rate: 5, burst: 2}")
        assert r.returncode == 0 and r.stdout == f'app {app.app_id} (target): attached rl (ratelimit 1.0) with config {{"burst": 2, "rate": 5}}\n', r.stdout
        r = mrpcctl(d, "policy", "config", "rl", "--config", "{rate: 7}")
        assert r.stdout == f'app {app.app_id} (target): rl (ratelimit 1.0) now has config {{"rate": 7}}\n', r.stdout
        r = mrpcctl(d, "policy", "upgrade", "rl", "--module", "ratelimit")
        assert r.stdout == f"app {app.app_id} (target): rl upgraded to ratelimit 1.0\n", r.stdout
        r = mrpcctl(d, "policy", "detach", "rl")
        assert r.stdout == f"app {app.app_id} (target): detached rl; the calls it held went on (0 inbound, 0 outbound)\n", r.stdout
        r = mrpcctl(d, "--json", "policy", "attach", "target", "ratelimit", "--config", "{rate: 5}")
        import json

        assert json.loads(r.stdout)["attached"][0]["app_id"] == app.app_id
    finally:
        app.close()


def test_mrpcctl_global_options_also_work_after_the_command(daemon_factory):
    """`mrpcctl apps --json` / `mrpcctl policy list --socket S` were 'unrecognized arguments':
    --socket and --json are taken before or after the command."""
    import json

    d = daemon_factory()
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "ping", "--socket", d.socket, "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["pid"] == d.pid, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--json", "policy", "list", "--socket", d.socket], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout) == {"apps": []}, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "mrpcd.ctl", "--socket", d.socket, "apps"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "no apps connected", r.stdout + r.stderr
