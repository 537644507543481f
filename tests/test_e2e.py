"""End to end: real daemons, real server and client apps as processes, TCP on loopback."""
from __future__ import annotations

import os
import signal
import time

import pytest

import mrpcd
from mrpcd.ctl import Control
from mrpcd.marshal import records as R

from conftest import wait_until




@pytest.fixture
def served(two_daemons, app_factory, gen_dir):
    """Daemon A (clients), daemon B (the greeter server app), and the server's address."""
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    return a, b, server, address


def test_unary_calls_cross_two_daemons(served, app_factory, gen_dir):
    a, b, _server, address = served
    client = app_factory("hello_client.py", a, address, "unary", "300", gen=gen_dir)
    code, out, err = client.wait()
    assert code == 0, err
    assert out.strip() == "ok 300"
    stats_a = Control(a.socket).call("stats")["apps"]
    assert stats_a == {} or all(s["malformed"] == 0 for s in stats_a.values())


def test_server_streaming(served, app_factory, gen_dir):
    a, _b, _server, address = served
    code, out, err = app_factory("hello_client.py", a, address, "stream", "5", gen=gen_dir).wait()
    assert code == 0, err
    assert out.splitlines() == [f"Hello #{i}, s!" for i in range(1, 6)] + ["ok stream"]


def test_asyncio_client_and_server(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, "--async", gen=gen_dir)
    address = server.readline()
    code, out, err = app_factory("hello_client.py", a, address, "async", "64", gen=gen_dir).wait()
    assert code == 0, err
    assert out.strip() == "ok async 64"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("boom", "UNKNOWN|Exception calling application: boom"),
        ("abort", "PERMISSION_DENIED|not you"),
        ("fine", "OK"),
    ],
)
def test_status_from_handler(served, app_factory, gen_dir, name, expected):
    a, _b, _server, address = served
    code, out, err = app_factory("hello_client.py", a, address, "status", name, gen=gen_dir).wait()
    assert code == 0, err
    assert out.strip() == expected


def test_unknown_method_is_unimplemented(served, gen_dir):
    a, _b, _server, address = served
    import hello_mrpc

    app = mrpcd.connect(a.socket, name="prober")
    try:
        channel = mrpcd.insecure_channel(address, app=app)
        nope = channel.unary_unary("/helloworld.Greeter/Nope", request_type=hello_mrpc.HelloRequest, response_type=hello_mrpc.HelloReply)
        with pytest.raises(mrpcd.RpcError) as err:
            nope(hello_mrpc.HelloRequest(name="x"), timeout=10)
        assert err.value.code() is mrpcd.StatusCode.UNIMPLEMENTED
        # the channel still works for a real method afterwards
        stub = hello_mrpc.GreeterStub(channel)
        assert stub.SayHello(hello_mrpc.HelloRequest(name="y"), timeout=10).message == "Hello, y!"
    finally:
        app.close()


def test_schema_mismatch_is_a_clear_error_on_both_sides(served, app_factory, mismatch_gen_dir):
    a, b, _server, address = served
    code, out, err = app_factory("hello_client.py", a, address, "status", "x", gen=mismatch_gen_dir).wait()
    assert code == 0, err
    status, _, details = out.strip().partition("|")
    assert status == "FAILED_PRECONDITION", out
    assert "schema mismatch for service helloworld.Greeter" in details
    # both daemons know both schemas (HELLO carries closures): the refusal names the field
    assert "incompatible changes: helloworld.HelloRequest field 2: peer has 'double count', this side has 'int32 count'" in details
    assert wait_until(lambda: "schema mismatch for service helloworld.Greeter" in b.log())


class _Sink:
    def __init__(self) -> None:
        self.records: list[R.Record] = []

    def deliver(self, rec: R.Record) -> None:
        self.records.append(rec)

    def lost(self, code, details) -> None:
        self.records.append(None)


def test_malformed_records_are_rejected_and_other_apps_keep_working(served, app_factory, gen_dir):
    a, _b, _server, address = served
    rogue = mrpcd.connect(a.socket, name="rogue")
    try:
        sink = _Sink()
        rogue.calls[(7, 99)] = sink
        good = R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 7, 99, 1, 0, b"", b"\x90")
        bad_lengths = bytearray(good)
        bad_lengths[32:36] = (10_000).to_bytes(4, "little")  # meta_len beyond the record
        rogue.send(bytes(bad_lengths))
        rogue.send(b"\x01\x02")  # too short to even be a header
        rogue.send(R.encode_record(R.HELLO, 0, 0, 7, 5, 0, 0, b"", b""))  # a kind apps may not send
        assert wait_until(lambda: sink.records, 10)
        rec = sink.records[0]
        assert rec.status == mrpcd.StatusCode.INTERNAL.code
        assert b"malformed record" in rec.meta
        # meanwhile a well-behaved app on the same daemon is served as usual
        code, out, err = app_factory("hello_client.py", a, address, "unary", "50", gen=gen_dir).wait()
        assert code == 0 and out.strip() == "ok 50", err
        stats = Control(a.socket).call("stats")["apps"]
        rogue_stats = [s for s in stats.values() if s["malformed"]]
        assert rogue_stats and rogue_stats[0]["malformed"] == 3
        assert a.alive()
    finally:
        rogue.close()


def test_corrupted_ring_drops_only_that_app(served, app_factory, gen_dir):
    a, _b, _server, address = served
    rogue = mrpcd.connect(a.socket, name="scribbler")
    try:
        ctl = Control(a.socket)
        assert any(x["name"] == "scribbler" for x in ctl.call("apps")["apps"])
        # write an impossible head index into the tx ring's control block, then wake the daemon
        mm = rogue.rings._mm
        mm[0:8] = (rogue.tx.capacity * 3 + 8).to_bytes(8, "little")
        rogue.daemon_waker.signal()
        assert wait_until(lambda: not any(x["name"] == "scribbler" for x in ctl.call("apps")["apps"]))
        assert "corrupted its ring" in a.log()
        code, out, err = app_factory("hello_client.py", a, address, "unary", "20", gen=gen_dir).wait()
        assert code == 0 and out.strip() == "ok 20", err
    finally:
        rogue.close()


def test_client_killed_mid_rpc_is_reclaimed_and_cancels_the_server_call(two_daemons, app_factory, gen_dir, tmp_path):
    a, b = two_daemons
    cancel_log = tmp_path / "cancel.log"
    server = app_factory("hello_server.py", b, "--cancel-log", str(cancel_log), gen=gen_dir)
    address = server.readline()
    ctl = Control(a.socket)
    # warm up: the first outgoing connection makes the loop open a few lasting fds of its own
    assert app_factory("hello_client.py", a, address, "unary", "1", gen=gen_dir).wait()[0] == 0
    assert wait_until(lambda: ctl.call("apps")["apps"] == [])
    fds_before = a.fd_count()
    client = app_factory("hello_client.py", a, address, "slow", "30", gen=gen_dir)
    assert client.readline() == "calling"
    assert wait_until(lambda: len(ctl.call("apps")["apps"]) == 1 and ctl.call("apps")["apps"][0]["routes"])
    time.sleep(0.3)  # the request is in the server's handler
    os.kill(client.proc.pid, signal.SIGKILL)
    client.proc.wait(10)
    # daemon A reclaims the app: no session, no routes, fds back to where they were
    assert wait_until(lambda: ctl.call("apps")["apps"] == [])
    assert wait_until(lambda: a.fd_count() <= fds_before)
    # the server's handler sees the cancellation, long before its 30 s
    assert wait_until(lambda: cancel_log.exists() and cancel_log.read_text().strip() == "cancelled", 15)
    assert a.alive() and b.alive()


def test_server_killed_mid_rpc_fails_the_call_with_unavailable(two_daemons, app_factory, gen_dir):
    a, b = two_daemons
    server = app_factory("hello_server.py", b, gen=gen_dir)
    address = server.readline()
    client = app_factory("hello_client.py", a, address, "status", "slow:30", gen=gen_dir)
    time.sleep(1.0)
    start = time.monotonic()
    os.kill(server.proc.pid, signal.SIGKILL)
    code, out, err = client.wait(30)
    assert code == 0, err
    assert out.startswith("UNAVAILABLE|"), out
    assert time.monotonic() - start < 10
    assert b.alive()


HELLO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "hello")


def test_make_demo_prints_the_replies_and_leaves_no_daemon():
    """`make demo`, the README's first step, as a newcomer runs it."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, os.path.join(HELLO, "demo.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in ("sync  unary : Hello, mrpcd!", "sync  stream: Hello #3, mrpcd!", "async unary : Hello, mrpcd!",
                 "async stream: Hello #3, mrpcd!"):
        assert line in r.stdout, r.stdout


@pytest.mark.parametrize("script", ["greeter_server.py", "greeter_client.py"])
def test_hello_example_run_by_hand_says_how_to_generate_its_stubs(script, tmp_path):
    """`python examples/hello/greeter_server.py` died with a ModuleNotFoundError traceback:
    hello_mrpc is generated, not shipped. It now says in one line how to make it."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, os.path.join(HELLO, script)], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "mrpcd-stubgen examples/hello/hello.proto -o gen/" in r.stderr and f"PYTHONPATH=gen" in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["greeter_server.py", "greeter_client.py"])
def test_hello_example_without_a_daemon_is_one_line(script, gen_dir, tmp_path):
    """The server example died with a DaemonUnavailable traceback when no daemon ran (the
    client already said `RPC failed: UNAVAILABLE: cannot reach mrpcd ...`)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(gen_dir), MRPCD_SOCKET=str(tmp_path / "none.sock"))
    r = subprocess.run([sys.executable, os.path.join(HELLO, script)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "UNAVAILABLE: cannot reach mrpcd at" in r.stderr, r.stderr


def test_a_server_that_is_not_running_is_named_as_such(daemon_factory, gen_dir):
    """Calling an address nobody serves said "cannot connect to mrpcd at 127.0.0.1:P:
    Connection refused", which a newcomer reads as "my daemon is down"; it now says that no
    server app listens there."""
    import socket as socketmod

    import hello_mrpc

    a = daemon_factory()
    with socketmod.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nobody listens on it
    app = mrpcd.connect(a.socket, name="caller")
    try:
        with pytest.raises(mrpcd.RpcError) as err:
            hello_mrpc.GreeterStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=app)).SayHello(hello_mrpc.HelloRequest(), timeout=10)
        assert err.value.code() is mrpcd.StatusCode.UNAVAILABLE
        assert "Connection refused: no server app listens on 127.0.0.1:" in err.value.details(), err.value.details()
    finally:
        app.close()
