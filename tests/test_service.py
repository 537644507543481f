"""mrpcd as a systemd service: sd_notify messages, watchdog, SIGHUP reload, drain on SIGTERM, the unit.

The daemon runs as a real process with NOTIFY_SOCKET pointing at a datagram socket this test
binds (what systemd does), so every notification is checked as systemd would receive it.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace
from pathlib import Path

import pytest

from mrpcd import control_proto as cp
from mrpcd.ctl import Control
from mrpcd.daemon.notify import Notifier, watchdog_interval


class FakeSystemd:
    """The service manager's end of NOTIFY_SOCKET (abstract namespace, like systemd's)."""

    def __init__(self) -> None:
        self.name = f"@mrpcd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.messages: list[dict[str, str]] = []

    def _recv(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except socket.timeout:
            return None
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        self.messages.append(fields)
        return fields

    def wait_for(self, key: str, timeout: float = 10) -> dict[str, str]:
        """The next message carrying `key` (messages before it are kept in .messages)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._recv(deadline - time.monotonic())
            if msg is not None and key in msg:
                return msg
        raise AssertionError(f"no {key} notification within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(monkeypatch):
    fake = FakeSystemd()
    monkeypatch.setenv("NOTIFY_SOCKET", fake.name)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield fake
    fake.close()


def config_path(daemon) -> Path:
    return Path(daemon.socket).with_suffix(".yaml")  # conftest writes <name>.yaml beside <name>.sock


def wait_log(daemon, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log()
        if text in log:
            return log
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not in the log:\n{daemon.log()}")


def test_ready_watchdog_reload_and_stop(systemd, daemon_factory):
    d = daemon_factory("svc", config="log_format: text\n")
    ready = systemd.wait_for("READY")
    assert ready["READY"] == "1" and int(ready["MAINPID"]) == d.pid
    assert ready["STATUS"].startswith("serving ")

    t0 = time.monotonic()
    for _ in range(3):
        assert systemd.wait_for("WATCHDOG", timeout=2)["WATCHDOG"] == "1"
    assert time.monotonic() - t0 < 1.5  # half of WATCHDOG_USEC, not once a second

    # a good reload: live keys apply, restart-only keys are reported and kept
    config_path(d).write_text("log_format: json\nmax_pending_records: 1024\nring_size: 65536\n")
    d.proc.send_signal(signal.SIGHUP)
    reloading = systemd.wait_for("RELOADING")
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading["RELOADING"] == "1" and 0 <= now_us - int(reloading["MONOTONIC_USEC"]) < 10_000_000
    assert systemd.wait_for("READY")["READY"] == "1"
    log = wait_log(d, "applied (log_format, max_pending_records)")
    assert "ring_size changed to 65536; that takes a restart" in log
    assert '"logger": "mrpcd"' in log.splitlines()[-1]  # now logging JSON

    # a bad reload: refused with file:line and reason, the daemon keeps serving
    config_path(d).write_text("log_format: text\nbogus: 1\n")
    d.proc.send_signal(signal.SIGHUP)
    systemd.wait_for("RELOADING")
    assert systemd.wait_for("READY")["READY"] == "1"
    log = wait_log(d, "reload refused")
    assert f"{config_path(d)}:2: unknown key 'bogus'" in log
    assert Control(d.socket).call("ping")["pid"] == d.pid
    assert systemd.wait_for("WATCHDOG", timeout=2)

    d.proc.send_signal(signal.SIGTERM)
    assert systemd.wait_for("STOPPING")["STOPPING"] == "1"
    assert d.proc.wait(10) == 0


def slow_call_in_flight(a, b, app_factory, gen_dir, slow: str):
    """A hello server behind daemon `b` and a client behind `a` whose `slow` call ("slow:N":
    the handler sleeps N s) the server has started: the client app (it prints the status)."""
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    client = app_factory("hello_client.py", a, address, "status", slow, gen=gen_dir)
    deadline = time.monotonic() + 10
    while Control(b.socket).call("stats")["daemon"]["calls_in_flight"] < 1:
        assert time.monotonic() < deadline, "the slow call never reached the server app"
        time.sleep(0.02)
    return client


def test_drain_lets_a_call_in_flight_finish(monkeypatch, daemon_factory, app_factory, gen_dir):
    a = daemon_factory("client")
    fake = FakeSystemd()
    try:
        with monkeypatch.context() as m:
            m.setenv("NOTIFY_SOCKET", fake.name)
            b = daemon_factory("server", config="drain_timeout: 20\n")
        fake.wait_for("READY")
        client = slow_call_in_flight(a, b, app_factory, gen_dir, "slow:1.5")
        t0 = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        assert fake.wait_for("STOPPING")["STOPPING"] == "1"
        # while draining: no new apps, but the operator still gets answers
        with pytest.raises(cp.ControlError, match="shutting down"):
            Control(b.socket).call("hello", name="late")
        assert Control(b.socket).call("stats")["daemon"]["draining"] is True
        code, out, err = client.wait(30)
        assert code == 0 and out.strip() == "OK", (out, err)
        assert b.proc.wait(20) == 0
        assert time.monotonic() - t0 < 10  # it left as soon as the call was done, not at drain_timeout
        assert "draining: 1 calls in flight" in b.log()
    finally:
        fake.close()


def test_drain_timeout_sends_goaway(daemon_factory, app_factory, gen_dir):
    a = daemon_factory("client")
    b = daemon_factory("server", config="drain_timeout: 0.3\n")
    client = slow_call_in_flight(a, b, app_factory, gen_dir, "slow:30")
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0
    code, out, err = client.wait(20)
    assert out.startswith("UNAVAILABLE|") and "shutting down" in out, (out, err)
    assert "drain timeout: 1 calls still in flight" in b.log()


def test_print_unit_is_a_hardened_notify_service(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--print-unit"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    unit = r.stdout
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in unit.splitlines() if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify" and lines["WatchdogSec"] and lines["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert lines["RuntimeDirectory"] == "mrpcd" and lines["RuntimeDirectoryMode"] == "0755"
    assert "--socket /run/mrpcd/control.sock" in lines["ExecStart"]
    exe = lines["ExecStart"].split()[0]
    assert os.access(exe, os.X_OK), exe  # points at this installation's mrpcd
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("MemoryDenyWriteExecute", "yes"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6")]:
        assert lines[key] == value, key
    if shutil.which("systemd-analyze"):
        path = tmp_path / "mrpcd.service"
        path.write_text(unit)
        v = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (v.stdout + v.stderr).splitlines() if str(path) in line]
        assert v.returncode == 0 and not problems, v.stdout + v.stderr


def test_print_unit_warns_when_the_service_could_not_reach_this_installation(tmp_path):
    """DynamicUser=yes + ProtectHome=yes: an mrpcd (or its interpreter) under /root, /home or
    /run/user, or behind a folder others may not enter, makes the service fail at start with
    203/EXEC or an ImportError; --print-unit says so on stderr (stdout stays the unit)."""
    from mrpcd.daemon.main import unit_path_problems

    assert unit_path_problems(["/usr/bin/env"]) == []
    hidden = unit_path_problems(["/root/.pyenv/versions/3.11/bin/python3.11", "/home/ann/venv/bin/mrpcd"])
    assert len(hidden) == 2 and all("ProtectHome=yes" in p for p in hidden), hidden
    private = tmp_path / "private"
    (private / "venv" / "bin").mkdir(parents=True)
    private.chmod(0o700)
    blocked = unit_path_problems([str(private / "venv" / "bin" / "mrpcd")])
    assert len(blocked) == 1 and f"{private} (mode 700)" in blocked[0] and "DynamicUser=yes" in blocked[0], blocked
    # the command: the unit on stdout either way; the warning (if any) names what to change
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--print-unit"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("# mrpcd") and "mrpcd: warning" not in r.stdout
    if r.stderr:
        assert r.stderr.startswith("mrpcd: warning:") and "ProtectHome=" in r.stderr, r.stderr


def test_systemctl_reload_fails_on_a_bad_config_file():
    """`systemctl reload mrpcd` exited 0 with a bad /etc/mrpcd/mrpcd.yaml (ExecReload was only
    `kill -HUP`; the refusal was only in the journal). The unit now checks the file first, so
    the reload job fails and says so; the daemon keeps running with its old config either way."""
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--print-unit"], capture_output=True, text=True, timeout=30)
    reloads = [line.split("=", 1)[1] for line in r.stdout.splitlines() if line.startswith("ExecReload=")]
    assert len(reloads) == 2, reloads
    assert reloads[0].endswith("mrpcd --config /etc/mrpcd/mrpcd.yaml --check-config") and os.access(reloads[0].split()[0], os.X_OK)
    assert reloads[1] == "/bin/kill -HUP $MAINPID"


def test_watchdog_interval_follows_sd_watchdog_enabled():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 3.0
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}) is None  # someone else's job
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_a_tiny_watchdog_interval_does_not_make_a_busy_loop_of_pings():
    class Loop:
        def call_later(self, delay, fn):
            self.delay = delay
            return SimpleNamespace(cancel=lambda: None)

    fake = FakeSystemd()
    try:
        n = Notifier({"NOTIFY_SOCKET": fake.name, "WATCHDOG_USEC": "2"})
        loop = Loop()
        n.start_watchdog(loop)
        assert loop.delay >= 0.05
        n = Notifier({"NOTIFY_SOCKET": fake.name, "WATCHDOG_USEC": "3000000"})
        n.start_watchdog(loop)
        assert loop.delay == 1.5
    finally:
        fake.close()


def test_notifier_without_systemd_is_a_no_op_and_with_one_sends_one_datagram():
    assert Notifier({}).send("READY=1") is False
    fake = FakeSystemd()
    try:
        n = Notifier({"NOTIFY_SOCKET": fake.name})
        n.status("line one\nline two")  # a newline cannot split a field
        assert fake.wait_for("STATUS", 2) == {"STATUS": "line one line two"}
        n.close()
        gone = Notifier({"NOTIFY_SOCKET": "@mrpcd-test-nobody-listens"})
        assert gone.send("READY=1") is False  # logged once, never raised
    finally:
        fake.close()


def test_reload_reports_every_changed_key_that_needs_a_restart(daemon_factory):
    """peers and tls are read when connections are made: a reload cannot change them and must say so."""
    d = daemon_factory("peers", config='peers: {allow: ["10.0.0.0/8"]}\n')
    d.proc.send_signal(signal.SIGHUP)  # the same file: nothing to report
    log = wait_log(d, "applied (nothing changed)")
    assert "takes a restart" not in log
    config_path(d).write_text('peers: {allow: ["10.0.0.0/8", "::1"]}\n')
    d.proc.send_signal(signal.SIGHUP)
    log = wait_log(d, "peers changed")
    assert "takes a restart" in log
    assert Control(d.socket).call("ping")["pid"] == d.pid


def test_print_unit_names_this_installation_even_with_another_mrpcd_on_path(tmp_path):
    other = tmp_path / "bin"
    other.mkdir()
    (other / "mrpcd").write_text("#!/bin/sh\nexit 0\n")
    (other / "mrpcd").chmod(0o755)
    env = {**os.environ, "PATH": f"{other}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "mrpcd.daemon.main", "--print-unit"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    exe = next(line for line in r.stdout.splitlines() if line.startswith("ExecStart=")).split("=", 1)[1].split()[0]
    assert exe != str(other / "mrpcd")
    ours = os.path.join(os.path.dirname(sys.executable), "mrpcd")
    if os.access(ours, os.X_OK):
        assert exe == os.path.abspath(ours)


def test_text_logs_keep_an_app_supplied_name_on_one_line(daemon_factory):
    """Any local user names their app: a newline in the name must not forge a daemon log line."""
    import mrpcd

    d = daemon_factory("inject", config="log_format: text\n")
    app = mrpcd.connect(d.socket, name="x\n2026-01-01 00:00:00,000 ERROR mrpcd: forged")
    try:
        log = wait_log(d, "forged")
    finally:
        app.close()
    assert not any(line.startswith("2026-01-01 00:00:00,000 ERROR") for line in log.splitlines())
    assert "x\\n2026-01-01" in log


def test_sighup_while_draining_is_ignored_and_a_second_sigterm_stops_at_once(daemon_factory, app_factory, gen_dir):
    """A reload during the drain told systemd READY=1 after STOPPING=1; and an operator who
    does not want to wait for drain_timeout had only SIGKILL."""
    a = daemon_factory("client")
    fake = FakeSystemd()
    try:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("NOTIFY_SOCKET", fake.name)
            b = daemon_factory("server", config="drain_timeout: 60\n")
        fake.wait_for("READY")
        client = slow_call_in_flight(a, b, app_factory, gen_dir, "slow:60")
        b.proc.send_signal(signal.SIGTERM)
        fake.wait_for("STOPPING")
        b.proc.send_signal(signal.SIGHUP)
        wait_log(b, "SIGHUP ignored: mrpcd is stopping")
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(20) == 0  # not the 60 s of drain_timeout
        wait_log(b, "SIGTERM while draining: not waiting for the 1 calls in flight")
        while fake._recv(0.3) is not None:  # whatever it still sent
            pass
        after = fake.messages[next(i for i, msg in enumerate(fake.messages) if "STOPPING" in msg):]
        assert not any("READY" in msg or "RELOADING" in msg for msg in after), after
        code, out, err = client.wait(30)
        assert out.startswith("UNAVAILABLE|"), (out, err)
    finally:
        fake.close()


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_server_app_learns_that_its_daemon_stopped(daemon_factory, app_factory, gen_dir, how, flavour):
    """A server app did not notice its daemon exit (its calls would hang); then it ended
    with it. Now it says so, waits for a daemon at the same socket and serves there again
    (tests/test_daemon_restart.py has the calls)."""
    from conftest import DaemonProc, wait_until

    d = daemon_factory("gone")
    server = app_factory("hello_server.py", d, *(["--async"] if flavour == "async" else []), gen=gen_dir)
    address = server.readline()
    if how == "sigterm":
        d.proc.send_signal(signal.SIGTERM)
    else:
        Control(d.socket).call("shutdown")
    assert d.proc.wait(20) == 0
    again = DaemonProc(Path(d.socket).parent, Path(d.socket).stem)
    try:
        def listening() -> bool:
            return any(address in app.get("listening", ()) for app in Control(again.socket).call("apps")["apps"])

        assert wait_until(listening, 20), Control(again.socket).call("apps")
        assert server.proc.poll() is None
    finally:
        server.stop()
        again.stop()
    err = server.proc.stderr.read()
    assert "closed the connection (it stopped or dropped this app)" in err, err


def test_calls_in_flight_fail_unavailable_when_the_apps_daemon_dies(daemon_factory, app_factory, gen_dir):
    import mrpcd
    import hello_mrpc

    a, b = daemon_factory("client"), daemon_factory("server")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    app = mrpcd.connect(a.socket, name="caller")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert stub.SayHello(hello_mrpc.HelloRequest(name="x"), timeout=20).message == "Hello, x!"
        fut = stub.SayHello.future(hello_mrpc.HelloRequest(name="slow:60"), timeout=60)
        deadline = time.monotonic() + 10
        while Control(b.socket).call("stats")["daemon"]["calls_in_flight"] < 1:
            assert time.monotonic() < deadline, "the slow call never reached the server app"
            time.sleep(0.02)
        a.proc.kill()  # no drain, no GOAWAY: only the control connection's end tells the app
        exc = fut.exception(timeout=20)
        assert exc is not None and exc.code() == mrpcd.StatusCode.UNAVAILABLE and "went away" in exc.details(), exc
        assert app.closed
    finally:
        app.close()


def test_docs_match_the_defaults_and_the_unit_names_every_live_key():
    """README claimed the config "also sets" metrics on 127.0.0.1:9464 and JSON logs (both are
    off by default), never created the file the unit's ExecStartPre checks, and the unit's
    list of what a reload changes missed poll_us and peer_stall_timeout."""
    from mrpcd.daemon.config import LIVE_KEYS, load
    from mrpcd.daemon.main import unit_text

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    defaults = load()
    assert defaults.metrics["address"] is None and defaults.log_format == "text"
    assert 'also sets: `metrics: {address: "127.0.0.1:9464"}`' not in readme and "`log_format: json`\n(structured" not in readme
    assert "`metrics: {address: null}`" in readme and "`log_format: text`" in readme
    assert "mrpcd --print-default-config > /etc/mrpcd/mrpcd.yaml" in readme
    unit = unit_text()
    reload_comment = " ".join(line.lstrip("# ") for line in unit.split("`systemctl reload mrpcd`", 1)[1].split("a bad file", 1)[0].splitlines())
    assert [k for k in LIVE_KEYS if k not in reload_comment.replace(",", " ").split()] == []
    exec_start_pre = next(line for line in unit.splitlines() if line.startswith("ExecStartPre="))
    assert "--config /etc/mrpcd/mrpcd.yaml --check-config" in exec_start_pre


def test_mrpcctl_ping_says_when_the_daemon_drains(daemon_factory, app_factory, gen_dir):
    """During a drain `mrpcctl ping` answered as if all was well ("up 3.7s"): it now says
    the daemon is draining and how many calls it waits for."""
    import subprocess

    a = daemon_factory("client")
    b = daemon_factory("server", config="drain_timeout: 60\n")
    ping = [sys.executable, "-m", "mrpcd.ctl", "--socket", b.socket, "ping"]
    r = subprocess.run(ping, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "draining" not in r.stdout, r.stdout
    assert Control(b.socket).call("ping")["draining"] is False
    client = slow_call_in_flight(a, b, app_factory, gen_dir, "slow:60")
    b.proc.send_signal(signal.SIGTERM)
    wait_log(b, "mrpcd draining")
    r = subprocess.run(ping, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("draining: 1 calls in flight"), r.stdout
    b.proc.send_signal(signal.SIGTERM)  # a second one: at once
    assert b.proc.wait(20) == 0
    client.wait(30)
