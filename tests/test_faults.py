"""Fault tolerance: a peer daemon SIGKILLed under load, and its return on the same port."""
from __future__ import annotations

import os
import signal
import time

import mrpcd

from conftest import wait_until

N_CALLS = 32
DEADLINE = 20.0


def test_peer_daemon_killed_mid_load_then_back(daemon_factory, app_factory, gen_dir):
    import hello_mrpc

    a = daemon_factory("a")
    b = daemon_factory("b")
    address = app_factory("hello_server.py", b, gen=gen_dir).readline()
    app = mrpcd.connect(a.socket, name="faults-client")
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(address, app=app))
        assert stub.SayHello(hello_mrpc.HelloRequest(name="warm"), timeout=10).message == "Hello, warm!"
        # in flight: slow calls sitting in the server's handler, and quick calls racing the kill
        futures = [stub.SayHello.future(hello_mrpc.HelloRequest(name="slow:30" if i % 2 else f"q{i}"), timeout=DEADLINE)
                   for i in range(N_CALLS)]
        time.sleep(0.5)
        start = time.monotonic()
        os.kill(b.pid, signal.SIGKILL)
        b.proc.wait(10)
        end = start + DEADLINE + 5
        failed = 0
        for f in futures:
            try:
                exc = f.exception(timeout=max(0.01, end - time.monotonic()))
            except TimeoutError:
                raise AssertionError("a call hung past its deadline") from None
            if exc is None:
                continue  # a quick call that finished before the kill
            failed += 1
            assert isinstance(exc, mrpcd.RpcError) and exc.code() is mrpcd.StatusCode.UNAVAILABLE, repr(exc)
        assert failed >= N_CALLS // 2  # every slow call at least
        assert time.monotonic() - start < 10, "failures should be prompt, not the deadline"
        assert a.alive()
        # while the peer is down: a clear UNAVAILABLE, no hang
        t0 = time.monotonic()
        try:
            stub.SayHello(hello_mrpc.HelloRequest(name="down"), timeout=10)
            raise AssertionError("a call to a dead peer succeeded")
        except mrpcd.RpcError as exc:
            assert exc.code() is mrpcd.StatusCode.UNAVAILABLE, exc
        assert time.monotonic() - t0 < 10
        # the peer comes back on the same port: the same channel reconnects on the next call
        b2 = daemon_factory("b")
        app_factory("hello_server.py", b2, "--address", address, gen=gen_dir).readline()
        deadline = time.monotonic() + 15
        while True:
            try:
                assert stub.SayHello(hello_mrpc.HelloRequest(name="back"), timeout=5).message == "Hello, back!"
                break
            except mrpcd.RpcError as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no reconnect after the peer came back: {exc}") from None
                time.sleep(0.2)
        for i in range(20):
            assert stub.SayHello(hello_mrpc.HelloRequest(name=f"n{i}"), timeout=5).message == f"Hello, n{i}!"
    finally:
        app.close()


# A client app with many slow calls in flight at once. It lives here (not in tests/apps)
# because only this test needs it: N futures of "slow:60", one line "calling N", then it
# waits to be killed.
_MANY_SLOW_CLIENT = """
import sys, time
import mrpcd, hello_mrpc
target, n = sys.argv[1], int(sys.argv[2])
stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(target))
futures = [stub.SayHello.future(hello_mrpc.HelloRequest(name="slow:60"), timeout=90) for _ in range(n)]
print(f"calling {n}", flush=True)
time.sleep(120)
"""
N_SLOW = 16  # = the sync server's default pool (max_workers=16): every call is in a handler at once




def test_client_killed_with_many_calls_in_flight_cancels_every_handler(two_daemons, app_factory, gen_dir, tmp_path):
    """SIGKILL of a client with 16 slow calls: all 16 server handlers see the cancellation, A reclaims the app.

    The kill leaves daemon A with a dead session whose calls it must cancel towards B one by
    one; losing any of them would leave a server thread busy for 60 s (the handler's sleep),
    which the cancel log shows as a missing or "finished" line.
    """
    import subprocess
    import sys

    from mrpcd.ctl import Control

    a, b = two_daemons
    cancel_log = tmp_path / "cancel.log"
    address = app_factory("hello_server.py", b, "--cancel-log", str(cancel_log), gen=gen_dir).readline()
    ctl_a, ctl_b = Control(a.socket), Control(b.socket)
    # warm up: the first outgoing connection makes daemon A open a few lasting fds of its own
    assert app_factory("hello_client.py", a, address, "unary", "1", gen=gen_dir).wait()[0] == 0
    assert wait_until(lambda: ctl_a.call("apps")["apps"] == [])
    fds_before = a.fd_count()
    env = {**a.env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(gen_dir), os.environ.get("PYTHONPATH", "")]))}
    client = subprocess.Popen([sys.executable, "-c", _MANY_SLOW_CLIENT, address, str(N_SLOW)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == f"calling {N_SLOW}", client.stderr.read() if client.poll() is not None else ""
        # every call has reached the server app through daemon B
        assert wait_until(lambda: ctl_b.call("stats")["daemon"]["calls_in_flight"] == N_SLOW), ctl_b.call("stats")["daemon"]
        time.sleep(0.3)  # the pool threads have picked them up and sit in the handler's loop
        assert not cancel_log.exists(), cancel_log.read_text()
        os.kill(client.pid, signal.SIGKILL)
        client.wait(10)
        # every handler sees the cancellation, long before its 60 s
        lines = lambda: cancel_log.read_text().split() if cancel_log.exists() else []  # noqa: E731
        assert wait_until(lambda: len(lines()) >= N_SLOW, 15), lines()
        assert lines() == ["cancelled"] * N_SLOW
        # daemon A reclaims the app: no session, fds back to where they were; B has no call left
        assert wait_until(lambda: ctl_a.call("apps")["apps"] == [])
        assert wait_until(lambda: a.fd_count() <= fds_before), (a.fd_count(), fds_before)
        assert wait_until(lambda: ctl_b.call("stats")["daemon"]["calls_in_flight"] == 0)
        assert a.alive() and b.alive()
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)
        client.stdout.close()
        client.stderr.close()
