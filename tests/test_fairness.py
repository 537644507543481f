"""Fairness when rings and queues fill: one busy or stuck party must not starve the others.

Each scenario runs real daemons and apps as processes on loopback (tests/apps/fair_app.py
serves tests/protos/streaming.proto or floods it), with bounded loads and generous
liveness bounds (a few seconds per call: "served while the other load goes on", never a
latency target):

* a. a client app floods a server with MiB-sized requests through daemons A and B, so A's
  queues, the A->B connection and B's delivery into the server's rx ring stay full; a
  second client app's small calls on the same path are each answered within seconds,
  while the flood is still going;
* b. one method of a server is slow and its calls pile up; the other method is served
  (within the server's concurrency: a pool that is full of slow handlers queues, as
  grpc's does);
* c. a stream whose receiver stops reading (its flow-control window is spent) blocks only
  that stream: other calls on the same channel, and other apps, go on;
* d. two server apps behind daemon B, one stopped (SIGSTOP: it drains nothing): calls to
  the other one, from the same client app and from another, are delivered.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import mrpcd

from mrpcd.ctl import Control

from conftest import PROTOS, wait_until

KIB, MIB = 1024, 1024 * 1024
# A call of the victim app must be answered within this long ("not starved"): generous,
# the machine has two cores and the flood keeps both busy.
LIVE_S = 5.0


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """The Streamer stubs, generated once for this module: (module, its folder)."""
    gen = tmp_path_factory.mktemp("fair_gen")
    subprocess.run([sys.executable, "-m", "mrpcd.stubgen", str(PROTOS / "streaming.proto"), "-I", str(PROTOS), "-o", str(gen)], check=True)
    sys.path.insert(0, str(gen))
    try:
        import streaming_mrpc

        yield streaming_mrpc, gen
    finally:
        sys.path.remove(str(gen))


def app_stats(daemon, name: str) -> dict:
    """The daemon's stats of its app called `name` (summed if several)."""
    ctl = Control(daemon.socket)
    try:
        apps = [s for s in ctl.call("apps")["apps"] if s["name"] == name]
    finally:
        ctl.sock.close()
    total: dict = {}
    for s in apps:
        for k, v in s["stats"].items():
            total[k] = total.get(k, 0) + v
        total["pending"] = total.get("pending", 0) + s["pending"]
    return total


def stub_empty(pb):
    """A google.protobuf.Empty of the generated module (Ping's request)."""
    return next(c for name, c in vars(pb).items() if name.endswith("Empty") and isinstance(c, type))()


def timed_calls(fn, n: int, pause: float = 0.02) -> list[float]:
    """Run fn() n times; the duration of each (fn raises on failure)."""
    took = []
    for _ in range(n):
        t = time.monotonic()
        fn()
        took.append(time.monotonic() - t)
        time.sleep(pause)
    return took


@pytest.mark.parametrize("mode", ["unary", "echo"])
def test_a_small_calls_are_served_while_another_app_floods_the_same_path(daemon_factory, app_factory, stubs, mode):
    """unary: MiB requests, small answers; echo: the server sends each request's MiB back
    (its tx ring is full too, while requests keep coming into its rx ring)."""
    pb, gen = stubs
    a, b = daemon_factory("a"), daemon_factory("b")
    server = app_factory("fair_app.py", b, "serve", gen=gen)
    target = server.readline()
    # 1-3 MiB requests, 16 at a time, for at most 20 s: the path stays full
    flood = app_factory("fair_app.py", a, "flood", target, "20", "16", "1024", "3072", *(["echo"] if mode == "echo" else []), gen=gen)
    assert flood.readline(30) == "started"
    app = mrpcd.connect(a.socket, name="victim")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(target, app))
        small = pb.Chunk(data=b"x" * 100)
        took = timed_calls(lambda: stub.Unary(small, timeout=LIVE_S), 40)
        full = app_stats(a, "fair_app.py"), app_stats(b, "fair_app.py")
        assert flood.proc.poll() is None, "the flood ended before the small calls did: nothing was shown"
    finally:
        app.close()
        flood.proc.send_signal(signal.SIGUSR1)  # the calls going end, no new ones start
    code, out, err = flood.wait(60)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["codes"] == {"OK": result["calls"]}, result
    # the flood did fill the path: A's flooder waited for room in its tx ring, B's records
    # for the server waited for room in its rx ring
    assert full[0]["tx_ring_full"] > 0 and full[1]["rx_ring_full"] > 0, full
    print(f"\n{mode}: small calls during the flood: max {max(took) * 1e3:.0f} ms, median {sorted(took)[len(took) // 2] * 1e3:.0f} ms; "
          f"flood: {result['calls']} calls; A's flooder, B's server: {full}")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_b_a_slow_method_does_not_starve_the_other(daemon_factory, app_factory, stubs, kind):
    """Slow calls (3 s each) pile up in the server; Ping calls meanwhile are answered at
    once. Sync server: 8 workers, 6 slow calls (the first runs on the rx thread until the
    watchdog hands the rx role over); a pool full of slow handlers would queue the rest, as
    grpc's does. Asyncio server: no worker bound, 300 slow calls."""
    pb, gen = stubs
    a, b = daemon_factory("a"), daemon_factory("b")
    args = ["serve", "--workers", "8"] + (["--async"] if kind == "async" else [])
    server = app_factory("fair_app.py", b, *args, gen=gen)
    target = server.readline()
    slow_n = 6 if kind == "sync" else 300
    app = mrpcd.connect(a.socket, name="caller")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(target, app))
        ping_req = stub_empty(pb)
        stub.Ping(ping_req, timeout=LIVE_S)  # connected
        slow = [stub.Unary.future(pb.Chunk(data=b"s", seq=-3000), timeout=30) for _ in range(slow_n)]
        t0 = time.monotonic()
        took = timed_calls(lambda: stub.Ping(ping_req, timeout=LIVE_S), 20)
        during = time.monotonic() - t0
        assert all(not f.done() for f in slow), "the slow calls ended before the fast ones: nothing was shown"
        assert [f.result().total for f in slow] == [1] * slow_n
    finally:
        app.close()
    print(f"\n{kind}: Ping during {slow_n} slow calls: max {max(took) * 1e3:.0f} ms, all 20 in {during:.2f} s")


def test_c_a_stream_whose_receiver_stops_reading_blocks_only_itself(daemon_factory, app_factory, stubs):
    """Both directions: a response stream the client stops reading (the server's handler
    waits for credit) and a request stream the server stops reading (the client's request
    pump waits for credit). Meanwhile unary calls and a complete stream on the same
    channel, and another app's calls, are answered."""
    pb, gen = stubs
    a, b = daemon_factory("a"), daemon_factory("b")
    server = app_factory("fair_app.py", b, "serve", gen=gen)
    target = server.readline()
    app, other = mrpcd.connect(a.socket, name="reader"), mrpcd.connect(a.socket, name="other")
    sent = [0]

    def requests():
        for i in range(1000):  # 64 MiB if nobody stopped it: far past any window
            sent[0] = i + 1
            yield pb.Chunk(data=bytes(64 * KIB), seq=20_000)  # the handler sleeps 20 s after the first

    try:
        stub, other_stub = pb.StreamerStub(mrpcd.Channel(target, app)), pb.StreamerStub(mrpcd.Channel(target, other))
        ping = stub_empty(pb)
        stub.Ping(ping, timeout=LIVE_S)
        # 1000 chunks of 64 KiB asked for; one read, then none
        unread = stub.ServerStream(pb.Chunk(data=bytes(64 * KIB), seq=1000), timeout=60)
        assert next(unread).seq == 0
        unsent = stub.ClientStream.future(requests(), timeout=60)
        time.sleep(0.5)  # both windows are spent by now
        for _ in range(2):
            took = timed_calls(lambda: stub.Ping(ping, timeout=LIVE_S), 10)
            took += timed_calls(lambda: other_stub.Ping(ping, timeout=LIVE_S), 10)
            whole = list(stub.ServerStream(pb.Chunk(data=bytes(64 * KIB), seq=20), timeout=LIVE_S))
            assert [c.seq for c in whole] == list(range(20))
            assert stub.Unary(pb.Chunk(data=bytes(200 * KIB)), timeout=LIVE_S).total == 200 * KIB
        assert not unsent.done() and sent[0] < 100, sent  # held by flow control, not buffered
        assert next(unread).seq == 1  # the stopped stream is still there, and goes on
        unread.cancel()
        unsent.cancel()
    finally:
        app.close()
        other.close()
    print(f"\ncalls beside the stopped streams: max {max(took) * 1e3:.0f} ms; request chunks sent: {sent[0]}")


def test_c_asyncio_a_stream_not_read_blocks_only_itself(daemon_factory, app_factory, stubs):
    """The asyncio client: a response stream it stops reading and a request stream whose
    writer waits for credit (the server's handler reads one message, then sleeps); unary
    calls on the same channel are answered meanwhile."""
    import asyncio

    import mrpcd.aio

    pb, gen = stubs
    a, b = daemon_factory("a"), daemon_factory("b")
    server = app_factory("fair_app.py", b, "serve", gen=gen)
    target = server.readline()

    async def main() -> list[float]:
        app = mrpcd.aio.connect(a.socket, name="aio-reader")
        try:
            async with mrpcd.aio.insecure_channel(target, app=app) as ch:
                stub = pb.StreamerStub(ch)
                ping = stub_empty(pb)
                await stub.Ping(ping, timeout=LIVE_S)
                unread = stub.ServerStream(pb.Chunk(data=bytes(64 * KIB), seq=1000), timeout=60)
                assert (await unread.read()).seq == 0
                unsent = stub.ClientStream(timeout=60)
                writes = 0

                async def write() -> None:
                    nonlocal writes
                    for _ in range(1000):
                        await unsent.write(pb.Chunk(data=bytes(64 * KIB), seq=20_000))
                        writes += 1

                writer = asyncio.ensure_future(write())
                await asyncio.sleep(0.5)
                took = []
                for _ in range(20):
                    t = time.monotonic()
                    assert await stub.Unary(pb.Chunk(data=bytes(100 * KIB)), timeout=LIVE_S)
                    await stub.Ping(ping, timeout=LIVE_S)
                    took.append(time.monotonic() - t)
                assert not writer.done() and writes < 100, writes
                assert (await unread.read()).seq == 1
                writer.cancel()
                unread.cancel()
                unsent.cancel()
                return took
        finally:
            app.close()

    took = asyncio.run(main())
    print(f"\nasyncio calls beside the stopped streams: max {max(took) * 1e3:.0f} ms")


class Stopped:
    """A server app process SIGSTOPped while inside: it drains nothing, answers nothing."""

    def __init__(self, proc) -> None:
        self.proc = proc

    def __enter__(self) -> "Stopped":
        self.proc.proc.send_signal(signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.proc.send_signal(signal.SIGCONT)


def both_servers_stubs(pb, app, other, t1: str, t2: str):
    """`app`'s stubs to S1 and S2, `other`'s to S2, and the Ping request, each path tried once."""
    stub1, stub2 = pb.StreamerStub(mrpcd.Channel(t1, app)), pb.StreamerStub(mrpcd.Channel(t2, app))
    other2 = pb.StreamerStub(mrpcd.Channel(t2, other))
    ping = stub_empty(pb)
    stub1.Ping(ping, timeout=LIVE_S), stub2.Ping(ping, timeout=LIVE_S), other2.Ping(ping, timeout=LIVE_S)
    return stub1, stub2, other2, ping


def two_servers(daemon_factory, app_factory, gen, config_a: str, config_b: str):
    a, b = daemon_factory("a", config_a), daemon_factory("b", config_b)
    s1 = app_factory("fair_app.py", b, "serve", gen=gen)
    s2 = app_factory("fair_app.py", b, "serve", gen=gen)
    return a, b, s1, s1.readline(), s2.readline()


def test_d_a_stopped_server_app_does_not_hold_up_another_behind_the_same_daemon(daemon_factory, app_factory, stubs):
    """Server S1 stops (SIGSTOP) while one client app sends it 2,000 calls of 16 KiB:
    daemon B queues what S1 does not take up to max_pending_bytes and then stops reading
    S1's connections only; daemon A queues up to max_peer_backlog and then fails new calls
    to S1 with UNAVAILABLE. Calls to S2 behind the same daemon B, from the same app and from
    another, are answered throughout; S1, woken, answers what it was sent."""
    pb, gen = stubs
    a, b, s1, t1, t2 = two_servers(daemon_factory, app_factory, gen, "max_peer_backlog: 4194304\n", "max_pending_bytes: 4194304\n")
    app, other = mrpcd.connect(a.socket, name="both"), mrpcd.connect(a.socket, name="other")
    try:
        stub1, stub2, other2, ping = both_servers_stubs(pb, app, other, t1, t2)
        with Stopped(s1):
            stuck = [stub1.Unary.future(pb.Chunk(data=bytes(16 * KIB)), timeout=60) for _ in range(2000)]
            took = timed_calls(lambda: stub2.Ping(ping, timeout=LIVE_S), 20)
            took += timed_calls(lambda: other2.Ping(ping, timeout=LIVE_S), 20)
            assert stub2.Unary(pb.Chunk(data=bytes(16 * KIB)), timeout=LIVE_S).total == 16 * KIB
            assert wait_until(lambda: app_stats(b, "fair_app.py")["pending"] > 0, 10)
            assert app_stats(a, "both")["peer_backlog_refused"] > 0  # A stopped queueing for S1
        codes: dict[str, int] = {}
        for f in stuck:
            code = f.code().name
            codes[code] = codes.get(code, 0) + 1
        assert set(codes) == {"OK", "UNAVAILABLE"}, codes  # what was sent is answered now
        stub1.Ping(ping, timeout=LIVE_S)
    finally:
        app.close()
        other.close()
    print(f"\nS2 calls while S1 stopped: max {max(took) * 1e3:.0f} ms; S1's calls: {codes}")


def test_d_a_stopped_server_app_holding_lent_payloads_is_cut_after_peer_stall_timeout(daemon_factory, app_factory, stubs):
    """Big requests (sent straight from the client app's tx ring) to a stopped S1: the ring
    space they hold is freed in order, so the same client app's other calls wait, but
    only until peer_stall_timeout (2 s here) closes the connection to S1 (its calls fail
    UNAVAILABLE; docs/INTERNALS.md). Another client app is never held up."""
    pb, gen = stubs
    a, b, s1, t1, t2 = two_servers(daemon_factory, app_factory, gen, "peer_stall_timeout: 2\n", "max_pending_bytes: 4194304\n")
    app, other = mrpcd.connect(a.socket, name="both"), mrpcd.connect(a.socket, name="other")
    try:
        stub1, stub2, other2, ping = both_servers_stubs(pb, app, other, t1, t2)
        with Stopped(s1):
            stuck = []
            sender = threading.Thread(target=lambda: stuck.extend(
                stub1.Unary.future(pb.Chunk(data=bytes(MIB)), timeout=60) for _ in range(24)))
            sender.start()  # (blocks once the tx ring is full of lent payloads)
            time.sleep(0.5)
            # the same app: behind the lent payloads, at most peer_stall_timeout late
            same_app = []
            behind = threading.Thread(target=lambda: same_app.extend(timed_calls(lambda: stub2.Ping(ping, timeout=2 + 2 * LIVE_S), 3)))
            behind.start()
            took = timed_calls(lambda: other2.Ping(ping, timeout=LIVE_S), 30, pause=0.1)
            behind.join(30)
            assert len(same_app) == 3
            sender.join(30)
            assert not sender.is_alive()
            assert app_stats(a, "both")["peer_stalled"] >= 1  # (the channel reconnects: more may follow)
            cut = [f.code().name for f in stuck if f.done()]
            assert cut and set(cut) == {"UNAVAILABLE"}, cut
        # the calls sent after the last cut were taken by the kernel's buffers: they wait
        # for S1, which answers them now
        assert wait_until(lambda: all(f.done() for f in stuck), 20)
        assert {f.code().name for f in stuck} <= {"UNAVAILABLE", "OK"}
    finally:
        app.close()
        other.close()
    print(f"\nthe other app's calls while S1 stopped: max {max(took) * 1e3:.0f} ms; the same app's: {max(same_app):.2f} s")
