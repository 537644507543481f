"""grpc semantics beyond the interop cases, through two daemons: flow control (a slow
reader pauses a streaming server; memory stays bounded; order kept), token-stream
throughput, server-side deadlines and cancellation callbacks, server interceptors, and
the sans-I/O flow-control accounting."""
from __future__ import annotations

import json
import time
import types

import pytest

import mrpcd
from mrpcd import flow, wire
from mrpcd.marshal import records as R

from conftest import aio_pair, wait_until


def _vm_hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_recv_window_grants_in_batches_and_send_credit_blocks():
    recv = flow.RecvWindow(1000)
    grants = [recv.consume(100) for _ in range(10)]
    assert grants == [0, 0, 0, 0, 500, 0, 0, 0, 0, 500]
    send = flow.SendCredit(100)
    assert send.available()
    send.spend(150)  # overdraw by at most one message
    assert not send.available()
    assert send.grant(30) is False and not send.available()
    assert send.grant(100) is True and send.available()
    rec = R.parse_record(flow.window_record(3, 7, 4096))
    assert (rec.kind, rec.handle, rec.call_id, rec.method_id) == (R.WINDOW, 3, 7, 4096)
    with pytest.raises(ValueError, match="window grant"):
        flow.window_record(3, 7, 0)


def test_message_limit_options():
    assert wire.message_limits(None, 16 << 20) == (16 << 20, 4 << 20)
    assert wire.message_limits([("grpc.max_send_message_length", 10), ("grpc.max_receive_message_length", -1)], 1 << 20) == (10, 1 << 20)
    with pytest.raises(ValueError, match="must be an int"):
        wire.message_limits([("grpc.max_send_message_length", "10")], 100)
    err = wire.too_large("Received", 11, 10)
    assert err.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED and err.details() == "Received message larger than max (11 vs. 10)"


def test_shared_call_core_sans_io():
    """mrpcd._calls: the bookkeeping both app libraries share, without sockets or rings."""
    from mrpcd import _calls

    class FakeApp:
        calls: dict = {}

    app = FakeApp()
    ended = []
    call = _calls.ClientCallCore(app, 3, 9, bytes, 10, None)
    call.callbacks.append(lambda: ended.append(call.code))
    assert app.calls[(3, 9)] is call
    start = R.parse_record(wire.response_record(3, 9, R.F_START, b"hi", initial=[("k", "v")]))
    assert call.take(start) is None and call.got_initial and call.initial == [("k", "v")]
    payload, window = call.pop_message()
    assert payload == b"hi" and window is None and call.pop_message() is None
    end = R.parse_record(wire.response_record(3, 9, R.F_END, None, code=mrpcd.StatusCode.NOT_FOUND, details="gone \U0001f608", trailing=[("t-bin", b"\x00")]))
    assert call.take(end) is None
    assert (call.done, call.code, call.details, call.trailing) == (True, mrpcd.StatusCode.NOT_FOUND, "gone \U0001f608", [("t-bin", b"\x00")])
    assert ended == [mrpcd.StatusCode.NOT_FOUND] and (3, 9) not in app.calls
    assert not call.end(mrpcd.StatusCode.CANCELLED, "late")  # already over
    big = _calls.ClientCallCore(app, 3, 10, bytes, 10, None)
    cancel = big.take(R.parse_record(wire.response_record(3, 10, R.F_START, b"x" * 11)))
    assert R.parse_record(cancel).kind == R.CANCEL and big.code is mrpcd.StatusCode.RESOURCE_EXHAUSTED
    assert big.details == "Received message larger than max (11 vs. 10)"

    ctx = _calls.ContextCore(None)
    assert _calls.failure_status(ValueError("boom"), ctx) == (mrpcd.StatusCode.UNKNOWN, "Exception calling application: boom")
    assert _calls.failure_status(_calls.BadRequest("bad"), ctx) == (mrpcd.StatusCode.INTERNAL, "Exception deserializing request! bad")
    assert _calls.failure_status(wire.too_large("Sent", 5, 4), ctx)[0] is mrpcd.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(mrpcd.AbortError):
        raise ctx._abort(mrpcd.StatusCode.PERMISSION_DENIED, "no")
    assert _calls.failure_status(mrpcd.AbortError("no"), ctx) == (mrpcd.StatusCode.PERMISSION_DENIED, "no")
    assert _calls.failure_status(RuntimeError("x"), ctx) == (mrpcd.StatusCode.PERMISSION_DENIED, "no")
    with pytest.raises(ValueError, match="non-OK"):
        ctx._abort(0, "")


@pytest.fixture
def flow_server(two_daemons, app_factory, gen_dir, tmp_path):
    a, b = two_daemons
    progress, log = tmp_path / "progress", tmp_path / "log"
    srv = app_factory("interop_flow_server.py", b, "--progress", str(progress), "--log", str(log), gen=gen_dir)
    return a, b, srv.readline(), progress, log


def test_slow_reader_pauses_the_server_with_bounded_memory(flow_server, app_factory, gen_dir):
    a, b, target, progress, _log = flow_server
    client = app_factory("interop_flow_client.py", a, "--target", target, "--progress", str(progress), "--count", "40000", gen=gen_dir)
    rc, out, err = client.wait(60)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    print("flow:", res, "daemon A VmHWM kB", _vm_hwm_kb(a.pid), "daemon B VmHWM kB", _vm_hwm_kb(b.pid))
    assert res["received"] == 40_000 and res["in_order"] and res["code"] == "OK"
    # while the client slept, the server got at most one window (+1 message) ahead of it
    ahead = res["server_yielded_during_pause"] - res["read_before_pause"]
    assert 0 < ahead <= flow.INITIAL_WINDOW // R.HEADER_SIZE + 1, res
    assert res["server_yielded_during_pause"] < 40_000
    assert res["client_max_rss_kb"] < 150_000
    assert _vm_hwm_kb(a.pid) < 150_000 and _vm_hwm_kb(b.pid) < 150_000


def test_deadline_reaches_the_handler_and_expires_on_both_sides(flow_server, gen_dir):
    a, _b, target, _progress, log = flow_server
    import hello_mrpc

    app = mrpcd.connect(a.socket)
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.Channel(target, app))
        t0 = time.monotonic()
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="sleep:5"), timeout=0.3)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "Deadline Exceeded"
        assert time.monotonic() - t0 < 2
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {"cancelled", "callback"} <= set(log.read_text().split()):
            time.sleep(0.02)
        lines = log.read_text().split()
        assert "cancelled" in lines and "callback" in lines
        remaining = float(lines[lines.index("remaining") + 1])
        assert 0 < remaining <= 0.3
        # client cancel of a future reaches the handler too
        fut = stub.SayHello.future(hello_mrpc.HelloRequest(name="sleep:5"))
        time.sleep(0.2)
        assert fut.cancel() and fut.cancelled() and fut.code() is mrpcd.StatusCode.CANCELLED
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and log.read_text().split().count("cancelled") < 2:
            time.sleep(0.02)
        assert log.read_text().split().count("cancelled") == 2
    finally:
        app.close()


def test_interceptors_client_and_server(flow_server, gen_dir):
    a, _b, target, _progress, _log = flow_server
    import hello_mrpc

    seen = []

    class AddMeta(mrpcd.UnaryUnaryClientInterceptor, mrpcd.UnaryStreamClientInterceptor):
        def __init__(self, name):
            self.name = name

        def intercept_unary_unary(self, continuation, details, request):
            seen.append((self.name, details.method))
            meta = list(details.metadata or ()) + [("x-deny", "1")] if request.name == "deny" else details.metadata
            return continuation(details._replace(metadata=meta), request)

        def intercept_unary_stream(self, continuation, details, request):
            seen.append((self.name, details.method))
            return continuation(details, request)

    app = mrpcd.connect(a.socket)
    try:
        channel = mrpcd.intercept_channel(mrpcd.Channel(target, app), AddMeta("outer"), AddMeta("inner"))
        stub = hello_mrpc.GreeterStub(channel)
        reply, call = stub.SayHello.with_call(hello_mrpc.HelloRequest(name="ok"), timeout=5)
        assert reply.message == "Hello, ok!" and call.code() is mrpcd.StatusCode.OK
        assert seen == [("outer", "/helloworld.Greeter/SayHello"), ("inner", "/helloworld.Greeter/SayHello")]
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="deny"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.PERMISSION_DENIED and info.value.details() == "denied by interceptor"
        assert [r.message for r in stub.SayHelloStream(hello_mrpc.HelloRequest(count=3), timeout=5)] == ["0", "1", "2"]
    finally:
        app.close()


def test_receive_limit_is_resource_exhausted(flow_server, gen_dir):
    a, _b, target, _progress, _log = flow_server
    import hello_mrpc

    app = mrpcd.connect(a.socket)
    try:
        stub = hello_mrpc.GreeterStub(mrpcd.Channel(target, app, options=[("grpc.max_receive_message_length", 10)]))
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="a long enough name"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Received message larger than max (")
        small = hello_mrpc.GreeterStub(mrpcd.Channel(target, app, options=[("grpc.max_send_message_length", 5)]))
        with pytest.raises(mrpcd.RpcError) as info:
            small.SayHello(hello_mrpc.HelloRequest(name="too long"), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Sent message larger than max (")
    finally:
        app.close()


# -- asyncio interceptors, grpc.aio reader/writer request streams, deadline thread ----------
# Server and client apps live in this process (one event loop; the server behind daemon B,
# the client behind daemon A), on the four-kind Streamer service of tests/protos/streaming.proto.


def _aio_servicer(pb):
    class Streamer(pb.StreamerServicer):
        async def Unary(self, request, context):
            context.set_trailing_metadata([(k, v) for k, v in context.invocation_metadata() if k.startswith("x-")])
            return pb.Summary(total=request.seq)

        async def ServerStream(self, request, context):
            for i in range(request.seq):
                yield pb.Chunk(seq=i)

        async def ClientStream(self, request_iterator, context):
            total = 0
            async for chunk in request_iterator:
                total += chunk.seq
            return pb.Summary(total=total)

        async def BidiStream(self, request_iterator, context):
            async for chunk in request_iterator:
                yield pb.Chunk(seq=chunk.seq * 10)

    return Streamer()


def _run_aio(streamer, body, server_interceptors=(), client_interceptors=()):
    """Start an asyncio Streamer server behind daemon B, run body(stub, server_app) with a
    client behind daemon A, close everything."""
    import asyncio

    a, b, pb = streamer

    async def main():
        async with aio_pair(a, b, pb, _aio_servicer(pb), name="aio-streamer", server_interceptors=server_interceptors,
                            client_interceptors=client_interceptors) as (_, channel, _, _):
            return await asyncio.wait_for(body(pb.StreamerStub(channel), pb), 20)

    return asyncio.run(main())


def test_aio_interceptors_client_and_server_all_kinds_in_order(streamer):
    import mrpcd.aio

    seen: list = []

    class Client(mrpcd.aio.UnaryUnaryClientInterceptor, mrpcd.aio.UnaryStreamClientInterceptor,
                 mrpcd.aio.StreamUnaryClientInterceptor, mrpcd.aio.StreamStreamClientInterceptor):
        def __init__(self, name):
            self.name = name

        async def _go(self, continuation, details, request):
            seen.append(("client", self.name, details.method.rpartition("/")[2]))
            meta = list(details.metadata or ()) + [(f"x-via-{self.name}", "1")]
            return await continuation(details._replace(metadata=meta), request)

        intercept_unary_unary = intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _go

    class Server(mrpcd.aio.ServerInterceptor):
        def __init__(self, name):
            self.name = name

        async def intercept_service(self, continuation, details):
            seen.append(("server", self.name, details.method.rpartition("/")[2]))
            return await continuation(details)

    async def body(stub, pb):
        call = stub.Unary(pb.Chunk(seq=7), timeout=5)
        assert (await call).total == 7
        assert dict(await call.trailing_metadata()) == {"x-via-outer": "1", "x-via-inner": "1"}
        assert [c.seq async for c in stub.ServerStream(pb.Chunk(seq=3), timeout=5)] == [0, 1, 2]

        async def chunks(n):
            for i in range(n):
                yield pb.Chunk(seq=i)

        assert (await stub.ClientStream(chunks(5), timeout=5)).total == 10
        assert [c.seq async for c in stub.BidiStream(chunks(3), timeout=5)] == [0, 10, 20]

    _run_aio(streamer, body, [Server("first"), Server("second")], [Client("outer"), Client("inner")])
    per_call = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert len(seen) == 16, seen
    for calls, method in zip(per_call, ["Unary", "ServerStream", "ClientStream", "BidiStream"]):
        # client interceptors first-outermost, then the server's in the order given
        assert calls == [("client", "outer", method), ("client", "inner", method), ("server", "first", method), ("server", "second", method)]


def test_aio_interceptors_that_abort(streamer):
    import mrpcd.aio

    handled: list = []

    class Deny(mrpcd.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            if not dict(details.invocation_metadata).get("x-deny"):
                return handler
            if handler.response_streaming:
                async def deny_stream(request, context):
                    handled.append("deny_stream")
                    await context.abort(mrpcd.StatusCode.PERMISSION_DENIED, "no stream for you", trailing_metadata=[("x-why", "policy")])
                    yield  # pragma: no cover - an async generator that aborts first
                return mrpcd.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer, handler.response_serializer)

            async def deny(request, context):
                handled.append("deny")
                await context.abort(mrpcd.StatusCode.PERMISSION_DENIED, "denied by interceptor")
            return mrpcd.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)

    class Refuse(mrpcd.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            if request.seq < 0:
                raise mrpcd.aio.AioRpcError(mrpcd.StatusCode.INVALID_ARGUMENT, "refused before sending")
            return await continuation(details, request)

    async def body(stub, pb):
        with pytest.raises(mrpcd.RpcError) as info:
            await stub.Unary(pb.Chunk(seq=1), timeout=5, metadata=[("x-deny", "1")])
        assert info.value.code() is mrpcd.StatusCode.PERMISSION_DENIED and info.value.details() == "denied by interceptor"
        call = stub.ServerStream(pb.Chunk(seq=3), timeout=5, metadata=[("x-deny", "1")])
        with pytest.raises(mrpcd.RpcError) as info:
            [c async for c in call]
        assert info.value.code() is mrpcd.StatusCode.PERMISSION_DENIED and info.value.details() == "no stream for you"
        assert await call.code() is mrpcd.StatusCode.PERMISSION_DENIED
        assert dict(await call.trailing_metadata()) == {"x-why": "policy"}
        with pytest.raises(mrpcd.RpcError) as info:
            await stub.Unary(pb.Chunk(seq=-1), timeout=5)
        assert info.value.code() is mrpcd.StatusCode.INVALID_ARGUMENT and info.value.details() == "refused before sending"
        assert (await stub.Unary(pb.Chunk(seq=4), timeout=5)).total == 4  # the others pass through

    _run_aio(streamer, body, [Deny()], [Refuse()])
    assert handled == ["deny", "deny_stream"]  # the refused call never reached the server


def test_aio_call_waits_many_waiters_cancel_and_deadline(streamer):
    """The asyncio call's waits (one future + timer each, woken by every state change): two
    tasks waiting on the same call both wake; a waiter cancelled mid-wait leaves the call
    usable for the others; an expired deadline still ends the wait with DEADLINE_EXCEEDED."""
    import asyncio

    import mrpcd.aio

    async def body(stub, pb):
        # a reader and a code() waiter on one bidi call, both waiting before anything arrives
        call = stub.BidiStream(timeout=5)
        reader = asyncio.ensure_future(call.read())
        code = asyncio.ensure_future(call.code())
        await asyncio.sleep(0.05)
        assert not reader.done() and not code.done()
        await call.write(pb.Chunk(seq=4))
        assert (await asyncio.wait_for(reader, 5)).seq == 40
        assert not code.done()
        # a third waiter is cancelled while it waits: the call goes on for the others
        doomed = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.05)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert await asyncio.wait_for(code, 5) is mrpcd.StatusCode.CANCELLED  # cancelling a read cancels the call, as in grpc.aio
        # nothing arrives before the deadline: the wait ends with DEADLINE_EXCEEDED
        call = stub.BidiStream(timeout=0.3)
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(mrpcd.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        assert 0.2 < asyncio.get_running_loop().time() - t0 < 3
        # and a plain unary call is unaffected
        assert (await stub.Unary(pb.Chunk(seq=7), timeout=5)).total == 7

    _run_aio(streamer, body)


def test_aio_calls_start_without_a_task_when_they_can(streamer):
    """A unary-request call on a connected channel goes into the ring when it is made (no
    start task); the first call (channel not connected yet), a full ring and a request that
    cannot be serialized take the task path, with the same results and errors as before."""
    import asyncio

    import mrpcd.aio

    async def body(stub, pb):
        first = stub.Unary(pb.Chunk(seq=1), timeout=5)
        assert first._start_task is not None  # not connected yet: the task connects
        assert (await first).total == 1
        call = stub.Unary(pb.Chunk(seq=2), timeout=5)
        assert call._start_task is None and call._state is not None
        assert (await call).total == 2 and await call.code() is mrpcd.StatusCode.OK
        stream = stub.ServerStream(pb.Chunk(seq=3), timeout=5)
        assert stream._start_task is None
        assert [c.seq async for c in stream] == [0, 1, 2]
        # the ring is full when the call is made: it exists, the task only sends the record
        app = stub.Unary._channel.app
        real = app.try_send
        refused = []
        app.try_send = lambda rec: refused.append(rec) or False
        try:
            call = stub.Unary(pb.Chunk(seq=4), timeout=5)
        finally:
            app.try_send = real
        assert refused and call._start_task is not None
        assert (await call).total == 4
        # a request that cannot be serialized fails where the call is awaited, as before
        call = stub.Unary(object(), timeout=5)
        with pytest.raises(Exception):
            await call
        # the ring refuses the record outright: no error where the call is made, the same
        # error where it is awaited, and the call it had begun is not left registered
        calls_before = len(app.calls)
        app.try_send = lambda rec: (_ for _ in ()).throw(ValueError("record can never fit"))
        try:
            call = stub.Unary(pb.Chunk(seq=4), timeout=5)
            assert call._start_task is not None and len(app.calls) == calls_before
            with pytest.raises(ValueError, match="never fit"):
                await call
            assert len(app.calls) == calls_before  # nor by the task that tried again
        finally:
            app.try_send = real
        # a cancel right after the call was made: awaiting it raises CancelledError (as in
        # grpc.aio), for a call that started at once and for one its task still starts
        call = stub.Unary(pb.Chunk(seq=5), timeout=5)
        assert call._start_task is None and call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await call.code() is mrpcd.StatusCode.CANCELLED
        app.try_send = lambda rec: False
        try:
            call = stub.Unary(pb.Chunk(seq=5), timeout=5)
        finally:
            app.try_send = real
        assert call._start_task is not None and call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        stream = stub.ServerStream(pb.Chunk(seq=3), timeout=5)
        assert stream.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stream.read()
        assert (await stub.Unary(pb.Chunk(seq=6), timeout=5)).total == 6

    _run_aio(streamer, body)


def test_aio_write_and_done_writing_without_a_request_iterator(streamer):
    import asyncio

    import mrpcd.aio

    async def body(stub, pb):
        # stream-unary: requests from write(), the response after done_writing()
        call = stub.ClientStream(timeout=5)
        for i in range(1, 5):
            await call.write(pb.Chunk(seq=i))
        await call.done_writing()
        await call.done_writing()  # a second half-close is a no-op, as in grpc.aio
        assert (await call).total == 10 and await call.code() is mrpcd.StatusCode.OK
        with pytest.raises(asyncio.InvalidStateError):
            await call.write(pb.Chunk(seq=1))
        # stream-stream ping-pong: write one, read one
        call = stub.BidiStream(timeout=5)
        for i in range(3):
            await call.write(pb.Chunk(seq=i))
            assert (await call.read()).seq == i * 10
        await call.done_writing()
        assert await call.read() is mrpcd.aio.EOF
        assert await call.code() is mrpcd.StatusCode.OK
        # many writes: more than one flow-control window, so write() waits for credit
        call = stub.ClientStream(timeout=10)
        payload = b"x" * 4096
        for i in range(200):
            await call.write(pb.Chunk(seq=1, data=payload))
        await call.done_writing()
        assert (await call).total == 200
        # half-closed, then write: the call refuses it
        call = stub.BidiStream(timeout=5)
        await call.done_writing()
        with pytest.raises(asyncio.InvalidStateError, match="half closed"):
            await call.write(pb.Chunk(seq=1))
        assert await call.read() is mrpcd.aio.EOF
        # given an iterator, a call does not take write() too
        async def one():
            yield pb.Chunk(seq=2)

        call = stub.ClientStream(one(), timeout=5)
        with pytest.raises(mrpcd.aio.UsageError):
            await call.write(pb.Chunk(seq=1))
        with pytest.raises(mrpcd.aio.UsageError):
            await call.done_writing()
        assert (await call).total == 2
        # cancelled while the client still writes
        call = stub.BidiStream(timeout=5)
        await call.write(pb.Chunk(seq=1))
        assert call.cancel()
        with pytest.raises(asyncio.InvalidStateError, match="finished"):
            await call.write(pb.Chunk(seq=2))
        assert await call.code() is mrpcd.StatusCode.CANCELLED

    class Tap(mrpcd.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            assert request_iterator is None or hasattr(request_iterator, "__aiter__")
            return await continuation(details, request_iterator)

    _run_aio(streamer, body)

    async def intercepted(stub, pb):  # write()/done_writing() pass through an intercepted call
        call = stub.ClientStream(timeout=5)
        await call.write(pb.Chunk(seq=3))
        await call.write(pb.Chunk(seq=4))
        await call.done_writing()
        assert (await call).total == 7

    _run_aio(streamer, intercepted, client_interceptors=[Tap()])


def test_sync_deadline_thread_stops_when_idle_and_at_app_close(streamer, monkeypatch):
    import importlib
    import threading

    server_mod = importlib.import_module("mrpcd.server")  # `mrpcd.server` the attribute is the function
    a, b, pb = streamer
    monkeypatch.setattr(server_mod._Deadlines, "IDLE", 0.05)

    class Sync(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    def deadline_threads():
        return [t for t in threading.enumerate() if t.name == "mrpcd-deadlines"]

    srv_app, cli_app = mrpcd.connect(b.socket, name="sync-streamer"), mrpcd.connect(a.socket, name="sync-caller")
    try:
        server = mrpcd.server(app=srv_app)
        pb.add_StreamerServicer_to_server(Sync(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        assert stub.Unary(pb.Chunk(seq=3), timeout=30).total == 3  # a deadline: the thread starts
        deadline = time.monotonic() + 5
        while deadline_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not deadline_threads(), "the deadline thread outlived the calls it watched (deadline 30 s, call done)"
        assert stub.Unary(pb.Chunk(seq=4), timeout=30).total == 4  # a new call starts it again
        server._deadlines.IDLE = 60.0  # now only App.close can end it quickly
        assert stub.Unary(pb.Chunk(seq=5), timeout=30).total == 5
        assert deadline_threads()
    finally:
        cli_app.close()
        srv_app.close()
    assert not deadline_threads(), "App.close left the server's deadline thread running"


def test_an_undecodable_response_fails_the_call_with_internal(two_daemons, gen_dir):
    """grpc: a response that does not deserialize ends the call with INTERNAL, even when
    its OK status arrived in the same record (unary) - never a silent None."""
    import asyncio

    import hello_mrpc

    a, b = two_daemons
    sapp, capp = mrpcd.connect(b.socket, name="garbage-server"), mrpcd.connect(a.socket, name="caller")
    try:
        server = mrpcd.server(app=sapp)
        handler = mrpcd.unary_unary_rpc_method_handler(
            lambda req, ctx: hello_mrpc.HelloReply(message="x"),
            request_deserializer=hello_mrpc.HelloRequest.FromString,
            response_serializer=lambda r: b"\xc1\xc1",  # not msgpack
            request_type=hello_mrpc.HelloRequest, response_type=hello_mrpc.HelloReply)
        server.add_generic_rpc_handlers([mrpcd.method_handlers_generic_handler("helloworld.Greeter", {"SayHello": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = hello_mrpc.GreeterStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
        with pytest.raises(mrpcd.RpcError) as info:
            stub.SayHello(hello_mrpc.HelloRequest(name="x"), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.INTERNAL
        assert info.value.details().startswith("Exception deserializing response!")

        async def call_async():
            import mrpcd.aio

            app = mrpcd.aio.connect(a.socket, name="aio-caller")
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=app)
            try:
                with pytest.raises(mrpcd.RpcError) as ainfo:
                    await hello_mrpc.GreeterStub(channel).SayHello(hello_mrpc.HelloRequest(name="y"), timeout=10)
                return ainfo.value
            finally:
                await channel.close()
                app.close()

        err = asyncio.run(call_async())
        assert err.code() is mrpcd.StatusCode.INTERNAL
    finally:
        capp.close()
        sapp.close()


def test_sync_server_runs_at_most_max_workers_handlers_and_every_queued_call(streamer):
    """The sync server runs calls on at most max_workers slots: runner tasks of the
    application's executor (mrpcd/server.py _runner) or the rx thread (run_inline, for quick
    unary handlers; these block, so the watchdog moves them to the pool). Never more
    handlers at once than the pool has threads, every queued call still runs, and the
    runners end when the queue is empty."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    a, b, pb = streamer
    lock = threading.Lock()
    running, peak, seen_threads = [0], [0], set()

    class Slow(pb.StreamerServicer):
        def Unary(self, request, context):
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
                seen_threads.add(threading.current_thread().name)
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            return pb.Summary(total=request.seq)

    pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="user-pool")
    srv_app, cli_app = mrpcd.connect(b.socket, name="runner-server"), mrpcd.connect(a.socket, name="runner-caller")
    try:
        server = mrpcd.server(pool, app=srv_app)
        pb.add_StreamerServicer_to_server(Slow(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        futures = [stub.Unary.future(pb.Chunk(seq=i), timeout=60) for i in range(12)]
        assert sorted(f.result().total for f in futures) == list(range(12))
        assert peak[0] == 3, peak  # the pool's size, not one thread per call, not fewer
        # handlers run on the pool's threads, or (quick unary ones) on the app's rx thread
        assert seen_threads and all(n.startswith(("user-pool", "mrpcd-rx-")) for n in seen_threads), seen_threads
        assert any(n.startswith("user-pool") for n in seen_threads)  # these handlers block: the pool took over
        # a runner ends just after the result it delivered: wait for it, bounded
        assert wait_until(lambda: server._runners == 0 and not server._queue and not server._inline, timeout=10), (server._runners, len(server._queue), len(server._inline))
        assert stub.Unary(pb.Chunk(seq=99), timeout=30).total == 99  # a new runner after idling
    finally:
        cli_app.close()
        srv_app.close()
        pool.shutdown(wait=True)


def _serve_streamer(pb, b_socket, servicer, name, pool=None):
    srv_app = mrpcd.connect(b_socket, name=name)
    server = mrpcd.server(pool, app=srv_app) if pool is not None else mrpcd.server(app=srv_app)
    pb.add_StreamerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return srv_app, server, port


def test_quick_unary_handlers_run_on_the_rx_thread_streams_on_the_pool(streamer):
    """mrpcd/server.py run_inline: a unary handler with its request complete runs on the
    app's rx thread (no thread switch); streaming handlers always go to the pool."""
    import threading

    a, b, pb = streamer
    where: dict[str, set] = {"unary": set(), "stream": set()}

    class Quick(pb.StreamerServicer):
        def Unary(self, request, context):
            where["unary"].add(threading.current_thread().name)
            return pb.Summary(total=request.seq)

        def ServerStream(self, request, context):
            where["stream"].add(threading.current_thread().name)
            yield pb.Chunk(seq=request.seq)

    srv_app, server, port = _serve_streamer(pb, b.socket, Quick(), "inline-server")
    cli_app = mrpcd.connect(a.socket, name="inline-caller")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        for i in range(20):
            assert stub.Unary(pb.Chunk(seq=i), timeout=30).total == i
        assert [c.seq for c in stub.ServerStream(pb.Chunk(seq=7), timeout=30)] == [7]
        assert where["unary"] == {f"mrpcd-rx-{srv_app.app_id}"}, where
        assert all(not n.startswith("mrpcd-rx-") for n in where["stream"]), where
        assert srv_app._rx_gen == 1  # nothing blocked: the rx role never moved
        watchdog = srv_app._watchdog
        assert watchdog is not None
        assert wait_until(lambda: watchdog._parked, 5)  # idle: no timer left running
    finally:
        cli_app.close()
        srv_app.close()


def test_a_handler_that_blocks_on_the_rx_thread_does_not_hold_up_other_calls(streamer):
    """A unary handler that sleeps (a wait the library cannot see) runs on the rx thread
    first; the watchdog gives the rx role to a new thread within milliseconds, so a quick
    call made meanwhile is answered long before the sleeper."""
    from concurrent.futures import ThreadPoolExecutor

    a, b, pb = streamer

    class Mixed(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:
                time.sleep(1.5)
            return pb.Summary(total=request.seq)

    srv_app, server, port = _serve_streamer(pb, b.socket, Mixed(), "blocking-server")
    cli_app = mrpcd.connect(a.socket, name="blocking-caller")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        t0 = time.monotonic()
        slow = stub.Unary.future(pb.Chunk(seq=1), timeout=30)
        time.sleep(0.2)  # the sleeper is in its handler, on the rx thread or past it
        assert stub.Unary(pb.Chunk(seq=2), timeout=30).total == 2
        quick_done = time.monotonic() - t0
        assert slow.result().total == 1
        assert quick_done < 1.0, quick_done  # not behind the 1.5 s sleeper
        assert srv_app._rx_gen >= 2  # the rx role moved to a new thread
    finally:
        cli_app.close()
        srv_app.close()


def test_a_handler_calling_out_through_its_own_app_hands_the_rx_role_over_at_once(streamer, monkeypatch):
    """A gateway-style handler: on the rx thread it makes a call through the same app,
    whose response only the rx role can deliver. The library hands the role over before
    waiting (App.about_to_block), so it neither deadlocks nor waits for the watchdog
    (which this test slows to a minute: only the library's own hand-over can save it)."""
    from mrpcd.watchdog import InlineWatchdog

    monkeypatch.setattr(InlineWatchdog, "LIMIT", 60.0)
    a, b, pb = streamer
    box: dict = {}

    class Gateway(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq >= 1000:  # the backend half: answer directly
                return pb.Summary(total=request.seq - 1000)
            back = box["stub"].Unary(pb.Chunk(seq=request.seq + 1000), timeout=10)
            return pb.Summary(total=back.total + 1)

    srv_app, server, port = _serve_streamer(pb, b.socket, Gateway(), "gateway-server")
    cli_app = mrpcd.connect(a.socket, name="gateway-caller")
    try:
        box["stub"] = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", srv_app))  # same app as the server
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        t0 = time.monotonic()
        assert stub.Unary(pb.Chunk(seq=5), timeout=10).total == 6
        assert srv_app._rx_gen >= 2  # handed over before the inner wait
        server.POOL_AFTER_BLOCK = 0.0  # every call may try the rx thread again
        for i in range(20):
            assert stub.Unary(pb.Chunk(seq=i), timeout=10).total == i + 1
        assert time.monotonic() - t0 < 10
    finally:
        cli_app.close()
        srv_app.close()


def test_calls_that_need_a_shut_down_pool_are_answered_unavailable(streamer):
    """The application shut its executor down under a running server: a quick unary call
    still runs on the rx thread, a streaming one (which needs the pool) is answered
    UNAVAILABLE at once instead of waiting for its deadline."""
    from concurrent.futures import ThreadPoolExecutor

    a, b, pb = streamer

    class Both(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq)

        def ServerStream(self, request, context):
            yield pb.Chunk(seq=request.seq)

    pool = ThreadPoolExecutor(max_workers=2)
    srv_app, server, port = _serve_streamer(pb, b.socket, Both(), "no-pool-server", pool)
    cli_app = mrpcd.connect(a.socket, name="no-pool-caller")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        assert [c.seq for c in stub.ServerStream(pb.Chunk(seq=3), timeout=30)] == [3]
        pool.shutdown(wait=True)
        assert stub.Unary(pb.Chunk(seq=4), timeout=30).total == 4
        t0 = time.monotonic()
        with pytest.raises(mrpcd.RpcError) as info:
            list(stub.ServerStream(pb.Chunk(seq=5), timeout=30))
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
        assert "thread pool is shut down" in info.value.details()
        assert time.monotonic() - t0 < 10
        assert server._runners == 0
    finally:
        cli_app.close()
        srv_app.close()


def test_inline_budget_spent_sends_the_rest_of_a_batch_to_the_pool(streamer):
    """run_inline stops after INLINE_BUDGET seconds of handlers per batch and gives the
    calls left to the pool (records behind them in the ring must not wait long). With a
    budget of 0 every call goes to the pool, and all are answered."""
    import threading

    a, b, pb = streamer
    names: set = set()

    class Quick(pb.StreamerServicer):
        def Unary(self, request, context):
            names.add(threading.current_thread().name)
            return pb.Summary(total=request.seq)

    srv_app, server, port = _serve_streamer(pb, b.socket, Quick(), "budget-server")
    server.INLINE_BUDGET = 0.0
    cli_app = mrpcd.connect(a.socket, name="budget-caller")
    try:
        stub = pb.StreamerStub(mrpcd.Channel(f"127.0.0.1:{port}", cli_app))
        futures = [stub.Unary.future(pb.Chunk(seq=i), timeout=30) for i in range(40)]
        assert sorted(f.result().total for f in futures) == list(range(40))
        assert names and not any(n.startswith("mrpcd-rx-") for n in names), names
        assert wait_until(lambda: server._runners == 0, 5) and not server._inline
    finally:
        cli_app.close()
        srv_app.close()


class _FakeTimedCall:
    """What server._Deadlines reads of a call: deadline.at, timed, is_active(), cancel()."""

    def __init__(self, at: float) -> None:
        self.deadline = types.SimpleNamespace(at=at)
        self.timed = False
        self.expired_by_heap = False

    def is_active(self) -> bool:
        return self.timed

    def cancel(self, expired: bool = False) -> None:
        self.expired_by_heap = expired


def test_sync_deadline_heap_drops_ended_calls_under_steady_load():
    """A call that ended stays in the deadline heap until its deadline comes up, and with
    a call always pending the heap is never cleared: under steady load with long deadlines
    it would keep rate x deadline ended calls alive. The heap drops them once they are
    most of it; the calls still pending keep their deadlines."""
    import importlib
    import weakref

    server_mod = importlib.import_module("mrpcd.server")
    heap = server_mod._Deadlines()
    try:
        live = _FakeTimedCall(time.monotonic() + 0.3)
        heap.add(live)
        refs = []
        for _ in range(20_000):
            call = _FakeTimedCall(time.monotonic() + 60.0)
            heap.add(call)
            heap.discard(call)
            refs.append(weakref.ref(call))
            assert len(heap._heap) <= max(server_mod._Deadlines.COMPACT_MIN, 2 * heap._pending) + 1
        del call
        assert sum(r() is not None for r in refs) <= server_mod._Deadlines.COMPACT_MIN
        deadline = time.monotonic() + 5
        while not live.expired_by_heap and time.monotonic() < deadline:
            time.sleep(0.01)
        assert live.expired_by_heap, "the pending call's deadline was lost with the ended ones"
    finally:
        heap.close()
