"""Fault tolerance: a peer daemon SIGKILLed under load, and its return on the same port."""
from __future__ import annotations

import os
import signal
import time

import mrpcd

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
