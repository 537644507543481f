"""Streams and calls that must end, or go on, as grpcio's do when things are not smooth:
flow-control credit sent while the app's tx ring is full, a request over the server's
receive limit in the middle of a stream, deadlines of calls nobody waits on, and reads
after a cancel. The server app is behind daemon B, the client app behind daemon A, both in
this process, on the four-kind Streamer service of tests/protos/streaming.proto.

A full tx ring is made here by stopping the app's daemon (SIGSTOP; it stands for a daemon
that is busy for a moment) and filling the ring with CANCELs of calls that never existed
(harmless: nobody has such a call); every test resumes the daemon in a `finally`."""
from __future__ import annotations

import contextlib
import signal
import threading

import pytest

import mrpcd
from mrpcd import wire
from mrpcd.status import StatusCode
from mrpcd.marshal import records as R

from conftest import aio_pair, wait_until

KIB = 1024
SMALL_RING = "ring_size: 262144\n"  # quick to fill with 40-byte records


@contextlib.contextmanager
def sync_pair(a, b, pb, servicer, server_options=None):
    """(server, stub, channel, client app, server app): `servicer` served behind daemon
    `b`, the stub's app behind daemon `a`."""
    srv_app = mrpcd.connect(b.socket, name="robust-server")
    cli_app = mrpcd.connect(a.socket, name="robust-client")
    try:
        server = mrpcd.server(app=srv_app, options=server_options)
        pb.add_StreamerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app)
        yield server, pb.StreamerStub(channel), channel, cli_app, srv_app
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


@contextlib.contextmanager
def stopped(daemon):
    """The daemon takes nothing from its apps' rings while inside."""
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        daemon.proc.send_signal(signal.SIGCONT)


def fill_tx_ring(app, handle: int) -> int:
    """(its daemon stopped) Fill the app's tx ring up to the last byte a 40-byte record
    could use; returns how many records that took."""
    n = 0
    while app.try_send(wire.cancel_record(handle, (1 << 40) + n)):
        n += 1
    assert n > 0 and app.tx.free_bytes() < 64
    return n


def server_calls(server):
    return list(server._calls.values())


# -- flow-control credit is never dropped (sync) ---------------------------------------


def test_sync_server_request_credit_survives_a_full_tx_ring(daemon_factory, streamer):
    """The sync server grants request-stream credit as its handler reads. When that grant
    met a full tx ring it was dropped (try_send), and the client, out of credit, waited
    for it until its deadline: the stream stalled for good. Now it waits in the app's
    control queue and goes out once the daemon takes records again."""
    pb = streamer[2]
    a, b = daemon_factory("a"), daemon_factory("b", SMALL_RING)
    size = 100 * KIB  # 3 messages spend the 256 KiB window; the 2nd read grants 200 KiB
    entered, go, got, peer = threading.Event(), threading.Event(), [], []

    class S(pb.StreamerServicer):
        def ClientStream(self, request_iterator, context):
            peer.append(int(context.peer().rpartition(":")[2]))
            entered.set()
            go.wait(20)
            for chunk in request_iterator:
                got.append(chunk.seq)
            return pb.Summary(total=len(got))

    with sync_pair(a, b, pb, S()) as (server, stub, _channel, _cli_app, srv_app):
        result = {}

        def client():
            try:
                result["ok"] = stub.ClientStream(iter([pb.Chunk(seq=i, data=b"x" * size) for i in range(5)]), timeout=15).total
            except mrpcd.RpcError as exc:
                result["err"] = (exc.code(), exc.details())

        th = threading.Thread(target=client)
        th.start()
        try:
            assert entered.wait(10)
            # the client sent what its credit allowed (3 messages) and waits for a grant
            assert wait_until(lambda: sum(len(c._messages) for c in server_calls(server)) == 3, 10)
            with stopped(b):
                fill_tx_ring(srv_app, peer[0])
                go.set()
                assert wait_until(lambda: len(got) == 3, 10)
                assert srv_app.tx.free_bytes() < 64  # the grant met the full ring
        finally:
            go.set()
            th.join(30)
        assert result == {"ok": 5}, result
        assert wait_until(lambda: not getattr(srv_app, "_control", ()), 5)


def test_sync_client_response_credit_survives_a_full_tx_ring(daemon_factory, streamer):
    """Likewise for the sync client reading a response stream: its grant waited 1 s for
    ring room, then was dropped, and the server's stream stalled until the deadline."""
    pb = streamer[2]
    a, b = daemon_factory("a", SMALL_RING), daemon_factory("b")
    size = 100 * KIB
    sent = []

    class S(pb.StreamerServicer):
        def ServerStream(self, request, context):
            for i in range(5):
                sent.append(i)
                yield pb.Chunk(seq=i, data=b"x" * size)

    with sync_pair(a, b, pb, S()) as (_server, stub, channel, cli_app, _srv_app):
        it = stub.ServerStream(pb.Chunk(), timeout=15)
        # the server sent what its credit allowed (3 messages) and waits for a grant
        assert wait_until(lambda: sum(len(c.messages) for c in list(cli_app.calls.values())) == 3, 10)
        with stopped(a):
            fill_tx_ring(cli_app, channel._handle)
            assert [next(it).seq for _ in range(3)] == [0, 1, 2]
            assert cli_app.tx.free_bytes() < 64  # the 2nd read's grant met the full ring
        assert [m.seq for m in it] == [3, 4]
        assert sent == [0, 1, 2, 3, 4]
        assert wait_until(lambda: not getattr(cli_app, "_control", ()), 5)


# -- a request over the server's receive limit fails the call at once -----------------


def test_sync_request_over_the_limit_mid_stream_fails_the_call_at_once(streamer, caplog):
    """grpc fails the call with RESOURCE_EXHAUSTED when a request message is over the
    server's max_receive_message_length; the handler gets nothing more. It used to skip
    that message and read on (the handler saw 0, 2, 3), the call ending OK."""
    a, b, pb = streamer
    go, seen, outcome = threading.Event(), [], []

    class S(pb.StreamerServicer):
        def ClientStream(self, request_iterator, context):
            go.wait(5)
            try:
                for chunk in request_iterator:
                    seen.append(chunk.seq)
            except Exception as exc:
                outcome.append((type(exc).__name__, context.is_active()))
                raise
            outcome.append(("end", context.is_active()))
            return pb.Summary(total=len(seen))

    requests = [pb.Chunk(seq=0, data=b"x" * 10), pb.Chunk(seq=1, data=b"x" * 2000), pb.Chunk(seq=2), pb.Chunk(seq=3)]
    with sync_pair(a, b, pb, S(), server_options=[("grpc.max_receive_message_length", 1000)]) as (_server, stub, *_):
        try:
            fut = stub.ClientStream.future(iter(requests), timeout=10)
            # answered without waiting for the handler, which has not read anything yet
            assert fut.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
            assert fut.details().startswith("Received message larger than max (")
        finally:
            go.set()
        assert wait_until(lambda: outcome, 10)
    assert seen == [] and outcome == [("TooLarge", False)]
    assert not [r for r in caplog.records if r.name == "mrpcd.server" and r.levelname == "ERROR"]


def test_aio_request_over_the_limit_mid_stream_fails_the_call_at_once(streamer, caplog):
    """The asyncio server likewise: the call ends with RESOURCE_EXHAUSTED at once and the
    handler task is cancelled (it used to read on past the message, then see a raw
    RpcError that was logged as an exception of the application)."""
    import asyncio

    a, b, pb = streamer
    seen, outcome = [], []

    class S(pb.StreamerServicer):
        async def ClientStream(self, request_iterator, context):
            try:
                await asyncio.sleep(5)  # the whole stream arrives meanwhile
                async for chunk in request_iterator:
                    seen.append(chunk.seq)
            except BaseException as exc:
                outcome.append(type(exc).__name__)
                raise
            return pb.Summary(total=len(seen))

    async def main():
        async with aio_pair(a, b, pb, S(), [("grpc.max_receive_message_length", 1000)], name="robust-aio") as (server, channel, cli_app, srv_app):
            requests = [pb.Chunk(seq=0, data=b"x" * 10), pb.Chunk(seq=1, data=b"x" * 2000), pb.Chunk(seq=2), pb.Chunk(seq=3)]
            call = pb.StreamerStub(channel).ClientStream(iter(requests), timeout=10)
            with pytest.raises(mrpcd.RpcError) as info:
                await asyncio.wait_for(call, 3)  # well before the handler would read
            assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details().startswith("Received message larger than max (")
            assert await call.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.2)  # (a handler that went on reading would have done so now)

    asyncio.run(main())
    # cancelled in its sleep, or before it started when the whole stream came in one batch
    assert seen == [] and outcome in ([], ["CancelledError"])
    assert not [r for r in caplog.records if r.name == "mrpcd.server" and r.levelname == "ERROR"]


# -- after a cancel, the next read raises (nothing queued comes out first) -------------


def _queued(app) -> int:
    return sum(len(c.messages) for c in list(app.calls.values()))


def test_sync_reads_after_cancel_or_channel_close_raise_at_once(streamer):
    """grpc raises on the next read of a call the application cancelled (or whose
    channel it closed); the response iterator used to hand out every message already
    queued first (thousands, up to a flow-control window), then raise."""
    a, b, pb = streamer

    class S(pb.StreamerServicer):
        def ServerStream(self, request, context):
            i = 0
            while context.is_active():
                yield pb.Chunk(seq=i)
                i += 1

    with sync_pair(a, b, pb, S()) as (_server, stub, channel, cli_app, _srv_app):
        it = stub.ServerStream(pb.Chunk(), timeout=20)
        assert next(it).seq == 0
        assert wait_until(lambda: _queued(cli_app) >= 100, 10)
        it.cancel()
        with pytest.raises(mrpcd.RpcError) as info:
            next(it)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED
        it = stub.ServerStream(pb.Chunk(), timeout=20)
        assert next(it).seq == 0
        assert wait_until(lambda: _queued(cli_app) >= 100, 10)
        channel.close()
        with pytest.raises(mrpcd.RpcError) as info:
            next(it)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED and info.value.details() == "Channel closed!"


def test_aio_reads_after_cancel_raise_at_once(streamer):
    import asyncio

    a, b, pb = streamer

    class S(pb.StreamerServicer):
        async def ServerStream(self, request, context):
            i = 0
            while True:
                yield pb.Chunk(seq=i)
                i += 1

    async def main():
        async with aio_pair(a, b, pb, S(), name="robust-aio") as (server, channel, cli_app, srv_app):
            call = pb.StreamerStub(channel).ServerStream(pb.Chunk(), timeout=20)
            assert (await call.read()).seq == 0
            for _ in range(200):
                if _queued(cli_app) >= 100:
                    break
                await asyncio.sleep(0.05)
            assert _queued(cli_app) >= 100
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call.read()

    asyncio.run(main())


def test_sync_server_reads_after_the_client_cancelled_raise_at_once(streamer):
    """The sync server's request iterator likewise: once the client cancelled, the
    handler's next read raises CANCELLED; it used to yield the requests queued first."""
    a, b, pb = streamer
    go, outcome = threading.Event(), []
    gate = threading.Event()

    class S(pb.StreamerServicer):
        def ClientStream(self, request_iterator, context):
            go.wait(10)
            n = 0
            try:
                for _ in request_iterator:
                    n += 1
            except mrpcd.RpcError as exc:
                outcome.append((n, exc.code()))
                raise
            outcome.append((n, "end"))
            return pb.Summary(total=n)

    def requests():
        for i in range(50):
            yield pb.Chunk(seq=i)
        gate.wait(10)  # the stream stays open

    with sync_pair(a, b, pb, S()) as (server, stub, *_):
        try:
            fut = stub.ClientStream.future(requests(), timeout=20)
            assert wait_until(lambda: sum(len(c._messages) for c in server_calls(server)) == 50, 10)
            call = server_calls(server)[0]
            fut.cancel()
            assert wait_until(lambda: not call.is_active(), 10)
            go.set()
            assert wait_until(lambda: outcome, 10)
        finally:
            go.set()
            gate.set()
    assert outcome == [(0, mrpcd.StatusCode.CANCELLED)]


# -- a client call ends at its deadline even when nothing waits on it -----------------


def test_sync_calls_nobody_waits_on_end_at_their_deadline(streamer):
    """grpc ends a call at its deadline (DEADLINE_EXCEEDED, callbacks run, the server
    told). A future with only a done callback, or a response stream nobody reads, used to
    stay running past it for as long as nobody asked (and in the app's table), since only
    a waiting caller checked the deadline. The server does not answer here: its daemon is
    stopped."""
    a, b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    with sync_pair(a, b, pb, S()) as (_server, stub, _channel, cli_app, _srv_app):
        assert stub.Unary(pb.Chunk(seq=1), timeout=10).total == 1  # connected
        fired = threading.Event()
        with stopped(b):
            fut = stub.Unary.future(pb.Chunk(), timeout=0.3)
            fut.add_done_callback(lambda f: fired.set())
            stream = stub.ServerStream(pb.Chunk(), timeout=0.3)
            assert fired.wait(10), "the future's deadline passed and nothing ended it"
            assert wait_until(lambda: not stream.is_active(), 10)
            assert fut.done() and fut.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
            assert stream.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
            assert not cli_app.calls
        assert [t for t in threading.enumerate() if t.name == "mrpcd-call-deadlines"]
    assert not [t for t in threading.enumerate() if t.name == "mrpcd-call-deadlines"], "App.close left the thread"


def test_aio_calls_nobody_awaits_end_at_their_deadline(streamer):
    import asyncio

    a, b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    async def main():
        async with aio_pair(a, b, pb, S(), name="robust-aio") as (server, channel, cli_app, srv_app):
            stub = pb.StreamerStub(channel)
            assert (await stub.Unary(pb.Chunk(seq=1), timeout=10)).total == 1  # connected
            fired = asyncio.Event()
            with stopped(b):
                call = stub.Unary(pb.Chunk(), timeout=0.3)
                call.add_done_callback(lambda c: fired.set())
                stream = stub.ServerStream(pb.Chunk(), timeout=0.3)
                await asyncio.wait_for(fired.wait(), 10)
                for _ in range(200):
                    if stream.done():
                        break
                    await asyncio.sleep(0.05)
                assert call.done() and stream.done()
                assert await call.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
                assert await stream.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
                assert not cli_app.calls

    asyncio.run(main())


# -- smaller things ----------------------------------------------------------------------


def test_sync_server_skips_the_handler_of_a_call_cancelled_while_queued(streamer):
    """A call the client cancelled while it waited for a free worker is not started
    (grpc does not start it); it used to run its handler for nobody (one with a request
    stream: a unary request's read already raised before the handler was called)."""
    from concurrent.futures import ThreadPoolExecutor

    a, b, pb = streamer
    started, release = [], threading.Event()

    class S(pb.StreamerServicer):
        def BidiStream(self, request_iterator, context):
            n = dict(context.invocation_metadata())["x-n"]
            started.append(n)
            if n == "1":
                release.wait(10)
            for chunk in request_iterator:
                yield chunk

    def call(stub, n):
        return stub.BidiStream(iter([pb.Chunk(seq=n)]), timeout=20, metadata=[("x-n", str(n))])

    pool = ThreadPoolExecutor(max_workers=1)
    srv_app = mrpcd.connect(b.socket, name="robust-server")
    cli_app = mrpcd.connect(a.socket, name="robust-client")
    try:
        server = mrpcd.server(pool, app=srv_app)
        pb.add_StreamerServicer_to_server(S(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = pb.StreamerStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app))
        try:
            first = call(stub, 1)
            assert wait_until(lambda: started == ["1"], 10)
            second = call(stub, 2)  # waits for the one worker
            assert wait_until(lambda: len(server._queue) == 1, 10)
            second.cancel()
            assert wait_until(lambda: len(server._calls) == 1, 10)  # the server saw the cancel
        finally:
            release.set()
        assert [c.seq for c in first] == [1]
        assert [c.seq for c in call(stub, 3)] == [3]  # queued after the 2nd: it was taken first
        assert started == ["1", "3"]
    finally:
        cli_app.close()
        srv_app.close()
        pool.shutdown(wait=True)


def test_aio_handler_task_ends_cleanly_when_its_answer_meets_a_closed_app(daemon_factory, streamer):
    """An asyncio handler's answer waiting for ring room when the app closes: the send
    fails, and the error answer the server then tries fails too. That second failure
    escaped the handler's task ('Task exception was never retrieved')."""
    import asyncio

    import mrpcd.aio

    pb = streamer[2]
    a, b = daemon_factory("a"), daemon_factory("b", SMALL_RING)
    tasks, peer = [], []

    async def main():
        entered, go = asyncio.Event(), asyncio.Event()

        class S(pb.StreamerServicer):
            async def Unary(self, request, context):
                tasks.append(asyncio.current_task())
                peer.append(int(context.peer().rpartition(":")[2]))
                entered.set()
                await go.wait()
                return pb.Summary(total=1)

        srv_app = mrpcd.aio.connect(b.socket, name="robust-aio-server")
        cli_app = mrpcd.aio.connect(a.socket, name="robust-aio-client")
        try:
            server = mrpcd.aio.server(app=srv_app)
            pb.add_StreamerServicer_to_server(S(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=cli_app)
            try:
                call = pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=20)
                await asyncio.wait_for(entered.wait(), 10)
                with stopped(b):
                    fill_tx_ring(srv_app, peer[0])
                    go.set()
                    for _ in range(200):  # the handler returned; its answer waits for room
                        if srv_app._space_waiters:
                            break
                        await asyncio.sleep(0.01)
                    assert srv_app._space_waiters
                    srv_app.close()
                    await asyncio.wait(tasks, timeout=5)
                call.cancel()
            finally:
                await channel.close()
        finally:
            cli_app.close()
            srv_app.close()

    asyncio.run(main())
    task = tasks[0]
    assert task.done() and (task.cancelled() or task.exception() is None), task


# -- found reviewing the merged fixes ----------------------------------------------------

def test_send_behind_a_queued_bigger_control_record_waits_and_times_out(daemon_factory):
    """A control record queued on a full ring that a smaller data record would fit in
    front of: the sender must wait for room for the queued one (it goes first), not spin
    holding the tx lock, deaf to its timeout, until the daemon frees room."""
    from mrpcd.app import App
    from mrpcd.status import StatusCode

    d = daemon_factory("spin", SMALL_RING)
    app = App(d.socket, "spin")
    try:
        small = wire.cancel_record(1, 1 << 41)  # 40 bytes: 48 in the ring
        big = wire.response_record(1, 1 << 42, R.F_START | R.F_END, None, code=StatusCode.DEADLINE_EXCEEDED,
                                   details="d" * 200)  # 280 in the ring
        k = 0  # one 104-byte record, taken by the daemon: the ring's positions at 112
        while len(rec := wire.response_record(1, 1 << 44, R.F_START | R.F_END, None, details="x" * k)) < 104:
            k += 1
        app.send(rec)
        assert wait_until(lambda: not app.tx.used_bytes(), 10)
        with stopped(d):
            for i in range((app.tx.capacity - 112) // 48):
                assert app.try_send(wire.cancel_record(1, (1 << 43) + i))
            assert app.tx.free_bytes() == 112
            app.send_control(big)  # does not fit: queued
            assert len(app._control) == 1
            result = {}

            def sender():
                try:
                    app.send(small, timeout=0.5)
                    result["r"] = "sent"
                except mrpcd.RpcError as exc:
                    result["r"] = exc.code()

            t = threading.Thread(target=sender, daemon=True)
            t.start()
            t.join(10)
            assert not t.is_alive() and result["r"] is StatusCode.DEADLINE_EXCEEDED
            assert app._tx_lock.acquire(timeout=5)
            app._tx_lock.release()
        assert wait_until(lambda: not app._control, 10), "the queued control record never went out"
    finally:
        app.close()


def test_a_forked_child_closing_its_copy_leaves_the_parents_app_alone(daemon_factory):
    """Dropping an inherited session in a child is what careful pre-fork code does; the
    socket is shared across fork, so shutting it down ended the parent's session."""
    import os

    from mrpcd.app import App

    d = daemon_factory("fork")
    app = App(d.socket, "parent")
    try:
        pid = os.fork()
        if pid == 0:
            try:
                app.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert app.call("ping")["ok"]
        assert not app.closed
    finally:
        app.close()


def test_client_call_ending_while_added_to_the_deadline_heap_is_not_counted(streamer):
    """A call whose response arrives between the heap's `ended` check and its `timed` mark
    must not stay counted (the heap's thread and the call kept alive until the deadline)."""
    import time as _time

    a, b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    with sync_pair(a, b, pb, S()) as (_server, stub, _channel, cli_app, _srv_app):
        assert stub.Unary(pb.Chunk(seq=1), timeout=10).total == 1
        heap = cli_app.call_deadlines
        checked = heap._ended

        def ended(call):  # a preemption right after the check: the response comes in then
            r = checked(call)
            _time.sleep(0.2)
            return r

        heap._ended = ended
        futs = [stub.Unary.future(pb.Chunk(seq=i), timeout=60) for i in range(3)]
        assert [f.result(timeout=30).total for f in futs] == [0, 1, 2]
        assert wait_until(lambda: heap._pending == 0, 5), f"{heap._pending} ended calls still counted"


def test_default_aio_apps_of_closed_loops_are_closed(daemon_factory, monkeypatch):
    """mrpcd.aio's default app is one per event loop and nobody closes it: each
    asyncio.run() left a daemon session, its rings and a watcher thread for the process's
    life. Once its loop is closed the app closes itself."""
    import asyncio

    from mrpcd.aio import _app as aioapp
    from mrpcd.ctl import Control

    d = daemon_factory("orphans")
    monkeypatch.setenv("MRPCD_SOCKET", d.socket)

    async def main():
        await aioapp.default_app().call_async("ping")

    for _ in range(3):
        asyncio.run(main())
    ctl = Control(d.socket)
    try:
        assert wait_until(lambda: not ctl.call("apps")["apps"], 10), ctl.call("apps")
    finally:
        ctl.sock.close()


def test_an_app_of_the_other_api_is_refused_where_it_is_given(streamer):
    """A sync channel or server given an asyncio app (or the reverse) used to be made and
    fail only at its first call, inside the library (AttributeError: 'App' object has no
    attribute 'loop'); now the constructor says which connect() the API needs."""
    import asyncio

    import mrpcd.aio

    a, _b, _pb = streamer

    async def main():
        aio_app = mrpcd.aio.connect(a.socket, name="robust-wrong-aio")
        sync_app = mrpcd.connect(a.socket, name="robust-wrong-sync")
        try:
            with pytest.raises(TypeError, match=r"mrpcd.insecure_channel: app is an asyncio app .*mrpcd.connect\(\)"):
                mrpcd.insecure_channel("127.0.0.1:1", app=aio_app)
            with pytest.raises(TypeError, match=r"mrpcd.server: app is an asyncio app"):
                mrpcd.server(app=aio_app)
            with pytest.raises(TypeError, match=r"mrpcd.aio.insecure_channel: app is a sync app .*mrpcd.aio.connect\(\)"):
                mrpcd.aio.insecure_channel("127.0.0.1:1", app=sync_app)
            with pytest.raises(TypeError, match=r"mrpcd.aio.server: app is a sync app"):
                mrpcd.aio.server(app=sync_app)
            with pytest.raises(TypeError, match=r"app must be an mrpcd app .*not str"):
                mrpcd.insecure_channel("127.0.0.1:1", app="a.sock")
            # the right kinds are still taken
            mrpcd.insecure_channel("127.0.0.1:1", app=sync_app).close()
            await mrpcd.aio.insecure_channel("127.0.0.1:1", app=aio_app).close()
        finally:
            sync_app.close()
            aio_app.close()

    asyncio.run(main())


def test_a_call_id_started_twice_ends_that_call_and_orphans_no_handler(streamer):
    """Call ids are unique per connection, but a peer may send a second START for a call
    that is still going. The server put the new call in its table over the old one: the old
    handler could then get no END, CANCEL or GOAWAY (nothing could find it) and held its
    worker for good, also after the peer left; a few such STARTs wedged the server for every
    client. Now the second START ends the call: the handler sees it cancelled, the peer gets
    INTERNAL."""
    from concurrent.futures import ThreadPoolExecutor

    from mrpcd.marshal import records as R
    from mrpcd.marshal.schema import method_id

    a, b, pb = streamer
    pool = ThreadPoolExecutor(max_workers=2)
    srv_app = mrpcd.connect(b.socket, name="twice-server")
    rogue = mrpcd.connect(a.socket, name="twice-rogue")
    cli_app = mrpcd.connect(a.socket, name="twice-client")
    try:
        server = mrpcd.server(pool, app=srv_app)

        class S(pb.StreamerServicer):
            def ClientStream(self, request_iterator, context):
                return pb.Summary(total=sum(1 for _ in request_iterator))

            def Unary(self, request, context):
                return pb.Summary(total=request.seq)

        pb.add_StreamerServicer_to_server(S(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        rogue.ensure_schema(pb.SCHEMA)
        handle = rogue.call("connect", target=f"127.0.0.1:{port}")["handle"]
        mid = method_id("/mrpc.stream.Streamer/ClientStream")
        chunk = pb.Chunk(seq=1).SerializeToString()
        records = []
        for call_id in (1, 2, 3, 4):  # more than the server has workers
            records += [R.encode_record(R.REQUEST, R.F_START, 0, handle, call_id, mid, 0, b"", chunk)] * 2
            records.append(R.encode_record(R.REQUEST, R.F_END | R.F_NO_MSG, 0, handle, call_id, 0, 0, b"", b""))
        ended: dict[int, int] = {}

        def on_record(rec) -> None:
            if rec.kind == R.RESPONSE and rec.flags & R.F_END:
                ended[rec.call_id] = rec.status

        rogue.dispatch = on_record  # the rogue's rx thread hands us what comes back
        assert rogue.tx.push_many(records) == len(records)
        rogue.daemon_waker.signal()
        assert wait_until(lambda: len(ended) == 4, 10), ended
        assert set(ended.values()) == {StatusCode.INTERNAL.code}
        assert wait_until(lambda: not server._calls, 10)  # no handler left behind
        stub = pb.StreamerStub(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app))
        assert stub.Unary(pb.Chunk(seq=5), timeout=10).total == 5  # a worker is free
    finally:
        cli_app.close()
        rogue.close()
        srv_app.close()
        pool.shutdown(wait=False)


def _rogue_calls(a_socket: str, pb, port: int, records) -> dict[int, int]:
    """Push `records(handle, method_id)` from a raw app behind daemon a to the server at
    `port` in one go; the final status of each call id answered within 10 s."""
    from mrpcd.marshal import records as R
    from mrpcd.marshal.schema import method_id

    rogue = mrpcd.connect(a_socket, name="rogue")
    try:
        rogue.ensure_schema(pb.SCHEMA)
        handle = rogue.call("connect", target=f"127.0.0.1:{port}")["handle"]
        ended: dict[int, int] = {}

        def on_record(rec) -> None:
            if rec.kind == R.RESPONSE and rec.flags & R.F_END:
                ended[rec.call_id] = rec.status

        rogue.dispatch = on_record  # the rogue's rx thread hands us what comes back
        batch = records(handle, method_id("/mrpc.stream.Streamer/Unary"))
        assert rogue.tx.push_many(batch) == len(batch)
        rogue.daemon_waker.signal()
        wait_until(lambda: len(ended) == len(batch), 10)
        return ended
    finally:
        rogue.close()


def _bad_meta_then_good(pb):
    from mrpcd.marshal import records as R

    chunk = pb.Chunk(seq=1).SerializeToString()
    return lambda h, mid: [
        R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, h, 1, mid, 0, b"\x91\x92\x01\x02", chunk),  # key not a str
        R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, h, 2, mid, 0, b"", chunk),
    ]


def test_sync_server_answers_a_call_with_malformed_metadata_and_the_rest_of_its_batch(streamer):
    """The daemons forward metadata as the calling app wrote it. A START whose metadata did
    not decode raised out of the server's dispatch: the rest of the batch the rx thread had
    taken (other clients' calls, their ENDs and WINDOW grants) was dropped, and the bad call
    got no answer. Now that call fails INTERNAL and the batch goes on."""
    a, b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    srv_app = mrpcd.connect(b.socket, name="meta-server")
    try:
        server = mrpcd.server(app=srv_app)
        pb.add_StreamerServicer_to_server(S(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ended = _rogue_calls(a.socket, pb, port, _bad_meta_then_good(pb))
        assert ended == {1: StatusCode.INTERNAL.code, 2: StatusCode.OK.code}
    finally:
        srv_app.close()


def test_aio_server_answers_a_call_with_malformed_metadata_and_goes_on(streamer):
    """The same on an asyncio server: the error escaped the loop's drain callback, which then
    neither drained again nor raised the ring's sleeping flag, so the app stopped receiving."""
    import asyncio

    import mrpcd.aio

    a, b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    async def main() -> dict[int, int]:
        srv_app = mrpcd.aio.connect(b.socket, name="aio-meta-server")
        try:
            server = mrpcd.aio.server(app=srv_app)
            pb.add_StreamerServicer_to_server(S(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            ended = await asyncio.to_thread(_rogue_calls, a.socket, pb, port, _bad_meta_then_good(pb))
            await server.stop(None)
            return ended
        finally:
            srv_app.close()

    assert asyncio.run(main()) == {1: StatusCode.INTERNAL.code, 2: StatusCode.OK.code}
