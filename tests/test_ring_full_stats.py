"""Ring sizing counters: how often an app's rings were full, per app, in `mrpcctl stats`
and on the metrics endpoint (`mrpcd_app_tx_ring_full_total`, `..._rx_ring_full_total`).

Why: a full ring costs the app waits (its senders block, or records for it queue in the
daemon), and the cure is an operator's (`ring_size`); without a count they could only
guess. tx: times the app blocked on its full tx ring and its daemon woke it when it freed
room. rx: times records for the app began to wait for room in its rx ring.
"""
from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import wait_until

import mrpcd
from mrpcd.ctl import Control

SMALL_RING = "ring_size: 65536\n"
BIG = 30_000  # two such requests fill a 64 KiB ring


def _app_stats(daemon, app) -> dict:
    return Control(daemon.socket).call("stats")["apps"][str(app.app_id)]


def test_full_rings_are_counted_per_app(daemon_factory, gen_dir):
    import hello_mrpc

    sd, cd = daemon_factory("srv", SMALL_RING), daemon_factory("cli", SMALL_RING)
    srv_app, cli_app = mrpcd.connect(sd.socket, name="rf-server"), mrpcd.connect(cd.socket, name="rf-client")

    class Greeter(hello_mrpc.GreeterServicer):
        def SayHello(self, request, context):
            return hello_mrpc.HelloReply(message=f"{len(request.name)}")

    server = mrpcd.server(ThreadPoolExecutor(8), app=srv_app)
    hello_mrpc.add_GreeterServicer_to_server(Greeter(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stopped = False
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app))
        for i in range(20):  # small calls, one at a time: no ring is ever full
            assert stub.SayHello(hello_mrpc.HelloRequest(name="x" * i), timeout=10).message == str(i)
        assert _app_stats(cd, cli_app)["tx_ring_full"] == 0
        assert _app_stats(sd, srv_app)["rx_ring_full"] == 0

        # the client's daemon stops taking: big calls fill the client's tx ring, the rest wait
        results: list = []

        def caller() -> None:
            for _ in range(3):
                results.append(stub.SayHello(hello_mrpc.HelloRequest(name="y" * BIG), timeout=20).message)

        threads = [threading.Thread(target=caller) for _ in range(4)]
        cd.proc.send_signal(signal.SIGSTOP)
        stopped = True
        for t in threads:
            t.start()
        wait_until(lambda: cli_app._space_waiters > 0, 10)
        cd.proc.send_signal(signal.SIGCONT)
        stopped = False
        for t in threads:
            t.join(30)
        assert results == [str(BIG)] * 12
        assert _app_stats(cd, cli_app)["tx_ring_full"] >= 1

        # the server app stops draining its rx ring: big requests wait in its daemon
        with srv_app._rx_lock:  # what its rx thread takes to drain
            futures = [stub.SayHello.future(hello_mrpc.HelloRequest(name="z" * BIG), timeout=20) for _ in range(4)]
            wait_until(lambda: _app_stats(sd, srv_app)["pending"] > 0, 10)
        assert [f.result(timeout=20).message for f in futures] == [str(BIG)] * 4
        assert _app_stats(sd, srv_app)["rx_ring_full"] >= 1
        assert _app_stats(sd, srv_app)["pending"] == 0
    finally:
        if stopped:
            cd.proc.send_signal(signal.SIGCONT)
        server.stop(None)
        cli_app.close()
        srv_app.close()
