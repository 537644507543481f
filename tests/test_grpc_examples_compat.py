"""The patterns of grpc's own Python examples (route guide, metadata, errors, deadlines,
cancellation, interceptors, wait-for-ready, multiplexing, channel options), written the
way those examples use grpcio's API, run over two real daemons: porting an example should
be an import swap. Own code throughout, on tests/protos/streaming.proto (Streamer: all four
call kinds; Second: another service). The server app is behind daemon B, the client app
behind daemon A, both in this process; every wait is bounded."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import socket
import threading
import time
from concurrent import futures

import pytest

import mrpcd
import mrpcd.aio

from conftest import aio_pair, wait_until


@contextlib.contextmanager
def sync_pair(streamer, servicer, *, second=None, interceptors=None, **server_kw):
    """(server, channel): `servicer` (and `second`, a SecondServicer) served behind daemon
    B by a server made as the examples make it, a channel to it from an app behind A."""
    a, b, pb = streamer
    srv_app = mrpcd.connect(b.socket, name="compat-server")
    cli_app = mrpcd.connect(a.socket, name="compat-client")
    try:
        server = mrpcd.server(futures.ThreadPoolExecutor(max_workers=10), interceptors=interceptors, app=srv_app, **server_kw)
        pb.add_StreamerServicer_to_server(servicer, server)
        if second is not None:
            pb.add_SecondServicer_to_server(second, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        with mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app) as channel:
            yield server, channel
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def run_aio(streamer, servicer, body, **kw):
    """body(server, channel) with an asyncio server of `servicer` behind B, a client behind A."""
    a, b, pb = streamer

    async def main():
        async with aio_pair(a, b, pb, servicer, name="compat-aio", **kw) as (server, channel, _, _):
            return await asyncio.wait_for(body(server, channel), 30)

    return asyncio.run(main())


# -- route_guide: the four call kinds -----------------------------------------------------


def _route_servicer(pb):
    """The route guide's shapes on Streamer: a lookup, a listing, a recorded route and a
    chat that answers each note with the earlier notes of the same place."""

    class Guide(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=request.seq * 2)

        def ServerStream(self, request, context):
            for i in range(request.seq):
                yield pb.Chunk(seq=i, data=b"feature")

        def ClientStream(self, request_iterator, context):
            count = total = 0
            for chunk in request_iterator:
                count += 1
                total += chunk.seq
            return pb.Summary(total=count * 1000 + total)

        def BidiStream(self, request_iterator, context):
            earlier = []
            for note in request_iterator:
                for old in earlier:
                    if old.seq == note.seq:  # same "location"
                        yield old
                earlier.append(note)

    return Guide()


def _notes(pb):
    return [pb.Chunk(seq=s, data=name.encode()) for s, name in [(0, "first"), (1, "second"), (2, "third"), (0, "fourth"), (2, "fifth")]]


def test_route_guide_sync_all_four_kinds_with_call_and_futures(streamer):
    _a, _b, pb = streamer
    with sync_pair(streamer, _route_servicer(pb)) as (_server, channel):
        stub = pb.StreamerStub(channel)
        assert stub.Unary(pb.Chunk(seq=21), timeout=10).total == 42
        assert [c.seq for c in stub.ServerStream(pb.Chunk(seq=4), timeout=10)] == [0, 1, 2, 3]

        def route():  # a generator, as the example's generate_route
            for i in range(1, 6):
                yield pb.Chunk(seq=i)

        assert stub.ClientStream(route(), timeout=10).total == 5015
        chat = [c.data for c in stub.BidiStream(iter(_notes(pb)), timeout=10)]
        assert chat == [b"first", b"third"]

        response, call = stub.Unary.with_call(pb.Chunk(seq=1), timeout=10)
        assert response.total == 2 and call.code() is mrpcd.StatusCode.OK and call.details() in ("", None)
        response, call = stub.ClientStream.with_call(route(), timeout=10)
        assert response.total == 5015 and call.code() is mrpcd.StatusCode.OK

        future = stub.Unary.future(pb.Chunk(seq=5), timeout=10)
        assert isinstance(future, mrpcd.Future) and isinstance(future, mrpcd.Call)
        assert future.result(timeout=10).total == 10 and future.done() and not future.cancelled()
        future = stub.ClientStream.future(route(), timeout=10)
        done = threading.Event()
        future.add_done_callback(lambda f: done.set())
        assert future.result(timeout=10).total == 5015 and done.wait(10)
        assert future.exception() is None


def test_route_guide_aio_sync_and_async_handlers_and_iterables(streamer):
    """grpc.aio's route guide server mixes a plain `def` handler with `async def` ones, and
    its client sends request streams from plain generators as well as async ones."""
    _a, _b, pb = streamer

    class Guide(pb.StreamerServicer):
        def Unary(self, request, context):  # not a coroutine: grpc.aio runs it as is
            return pb.Summary(total=request.seq * 2)

        async def ServerStream(self, request, context):
            for i in range(request.seq):
                yield pb.Chunk(seq=i)

        async def ClientStream(self, request_iterator, context):
            n = 0
            async for chunk in request_iterator:
                n += chunk.seq
            return pb.Summary(total=n)

        async def BidiStream(self, request_iterator, context):
            earlier = []
            async for note in request_iterator:
                for old in earlier:
                    if old.seq == note.seq:
                        yield old
                earlier.append(note)

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        assert (await stub.Unary(pb.Chunk(seq=4), timeout=10)).total == 8
        assert [c.seq async for c in stub.ServerStream(pb.Chunk(seq=3), timeout=10)] == [0, 1, 2]
        assert (await stub.ClientStream((pb.Chunk(seq=i) for i in range(5)), timeout=10)).total == 10

        async def agen():
            for i in range(4):
                yield pb.Chunk(seq=i)

        assert (await stub.ClientStream(agen(), timeout=10)).total == 6
        chat = [c.data async for c in stub.BidiStream(iter(_notes(pb)), timeout=10)]
        assert chat == [b"first", b"third"]

    run_aio(streamer, Guide(), body)


def test_aio_channel_as_async_context_manager_and_wildcard_listen_addresses(streamer):
    """`async with grpc.aio.insecure_channel(...)`, and servers that listen on "[::]:port"
    or "localhost:port" as the examples do, reached as "localhost:port"."""
    a, b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=7)

    async def main():
        srv_app = mrpcd.aio.connect(b.socket, name="compat-wild-server")
        cli_app = mrpcd.aio.connect(a.socket, name="compat-wild-client")
        try:
            server = mrpcd.aio.server(app=srv_app)
            pb.add_StreamerServicer_to_server(S(), server)
            ports = [server.add_insecure_port("[::]:0"), server.add_insecure_port("localhost:0")]
            await server.start()
            for port in ports:
                async with mrpcd.aio.insecure_channel(f"localhost:{port}", app=cli_app) as channel:
                    assert (await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)).total == 7
            await server.stop(None)
        finally:
            cli_app.close()
            srv_app.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- multiplex: several services on one server, several stubs on one channel ----------------


def test_multiplex_two_services_one_server_one_channel(streamer):
    _a, _b, pb = streamer

    class Second(pb.SecondServicer):
        def Get(self, request, context):
            return pb.Summary(total=99)

    with sync_pair(streamer, _route_servicer(pb), second=Second()) as (_server, channel):
        guide, other = pb.StreamerStub(channel), pb.SecondStub(channel)
        assert other.Get(pb.Empty(), timeout=10).total == 99
        assert guide.Unary(pb.Chunk(seq=3), timeout=10).total == 6
        assert [c.seq for c in guide.ServerStream(pb.Chunk(seq=2), timeout=10)] == [0, 1]


# -- metadata -------------------------------------------------------------------------------

_SENT = (("initial-metadata-1", "a str value"), ("binary-metadata-bin", b"\x00bytes\xff"), ("accesstoken", "token"))


def test_metadata_sync_invocation_trailing_and_with_call(streamer):
    _a, _b, pb = streamer
    seen = {}

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            seen["unary"] = [(k, v) for k, v in context.invocation_metadata()]
            context.set_trailing_metadata((("checksum-bin", b"I agree"), ("retry", "false")))
            return pb.Summary(total=1)

        def ServerStream(self, request, context):
            seen["stream"] = dict(context.invocation_metadata())
            context.send_initial_metadata((("hello", "there"),))
            yield pb.Chunk(seq=1)
            context.set_trailing_metadata((("done", "yes"),))

    with sync_pair(streamer, S()) as (_server, channel):
        stub = pb.StreamerStub(channel)
        response, call = stub.Unary.with_call(pb.Chunk(), metadata=_SENT, timeout=10)
        assert response.total == 1
        assert list(call.trailing_metadata()) == [("checksum-bin", b"I agree"), ("retry", "false")]
        for key, value in call.trailing_metadata():  # pairs unpack as in grpc
            assert isinstance(key, str)
        assert [kv for kv in seen["unary"] if kv[0] in dict(_SENT)] == list(_SENT)
        stream = stub.ServerStream(pb.Chunk(), metadata=_SENT, timeout=10)
        assert dict(stream.initial_metadata())["hello"] == "there"
        assert [c.seq for c in stream] == [1]
        assert dict(stream.trailing_metadata()) == {"done": "yes"}
        assert seen["stream"]["binary-metadata-bin"] == b"\x00bytes\xff"


def test_metadata_aio_invocation_trailing_and_call_accessors(streamer):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            got = dict(context.invocation_metadata())
            context.set_trailing_metadata((("checksum-bin", b"I agree"), ("echo", got["accesstoken"])))
            return pb.Summary(total=len(got["binary-metadata-bin"]))

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        call = stub.Unary(pb.Chunk(), metadata=_SENT, timeout=10)
        assert (await call).total == len(b"\x00bytes\xff")
        trailing = await call.trailing_metadata()
        assert dict(trailing) == {"checksum-bin": b"I agree", "echo": "token"}
        assert isinstance(trailing, mrpcd.aio.Metadata) and trailing["echo"] == "token"  # as grpc.aio's
        assert trailing == (("checksum-bin", b"I agree"), ("echo", "token"))
        assert await call.code() is mrpcd.StatusCode.OK
        await call.initial_metadata()

    run_aio(streamer, S(), body)


@pytest.mark.parametrize("bad", [
    (("Upper-Case", "x"),),          # grpc: keys are lower case
    (("key-bin", "not bytes"),),     # grpc: a -bin value is bytes
    (("plain", b"bytes"),),          # grpc: a value without -bin is str
])
def test_bad_metadata_is_a_clear_error_at_the_caller(streamer, bad):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary()

    with sync_pair(streamer, S()) as (_server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises((ValueError, TypeError, mrpcd.RpcError)) as info:
            stub.Unary(pb.Chunk(), metadata=bad, timeout=10)
        assert "metadata" in str(info.value).lower()
        assert stub.Unary(pb.Chunk(), timeout=10).total == 0  # nothing else broke


# -- errors: abort, set_code / set_details, exceptions -------------------------------------


def _error_servicer(pb):
    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:
                context.abort(mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Request limit exceeded.")
            if request.seq == 2:
                context.set_code(mrpcd.StatusCode.NOT_FOUND)
                context.set_details("no such feature")
                return pb.Summary()
            if request.seq == 3:
                raise RuntimeError("boom")
            if request.seq == 4:
                context.set_trailing_metadata((("why-bin", b"\x01\x02"),))
                context.abort(mrpcd.StatusCode.FAILED_PRECONDITION, "with trailers")
            if request.seq == 5:  # a code set, and no response at all
                context.set_code(mrpcd.StatusCode.PERMISSION_DENIED)
                context.set_details("nothing for you")
                return None
            return pb.Summary(total=request.seq)

        def ServerStream(self, request, context):
            for i in range(3):
                if i == request.seq:
                    context.abort(mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Exhausted")
                yield pb.Chunk(seq=i)

    return S()


_ERRORS = [
    (1, mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Request limit exceeded."),
    (2, mrpcd.StatusCode.NOT_FOUND, "no such feature"),
    (3, mrpcd.StatusCode.UNKNOWN, None),
    (4, mrpcd.StatusCode.FAILED_PRECONDITION, "with trailers"),
    (5, mrpcd.StatusCode.PERMISSION_DENIED, "nothing for you"),
]


@pytest.mark.parametrize("seq,code,details", _ERRORS)
def test_errors_sync_code_details_and_trailers(streamer, seq, code, details):
    _a, _b, pb = streamer
    with sync_pair(streamer, _error_servicer(pb)) as (_server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(seq=seq), timeout=10)
        err = info.value
        assert err.code() is code and err.code() == mrpcd.StatusCode.__members__[code.name]
        if details is not None:
            assert err.details() == details
        if seq == 4:
            assert dict(err.trailing_metadata()) == {"why-bin": b"\x01\x02"}
        assert code.name in err.debug_error_string()
        # the same status through with_call and a future
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary.with_call(pb.Chunk(seq=seq), timeout=10)
        assert info.value.code() is code
        fut = stub.Unary.future(pb.Chunk(seq=seq), timeout=10)
        assert fut.exception(timeout=10).code() is code


def test_abort_in_the_middle_of_a_response_stream(streamer):
    _a, _b, pb = streamer
    with sync_pair(streamer, _error_servicer(pb)) as (_server, channel):
        got = []
        with pytest.raises(mrpcd.RpcError) as info:
            for chunk in pb.StreamerStub(channel).ServerStream(pb.Chunk(seq=2), timeout=10):
                got.append(chunk.seq)
        assert got == [0, 1]
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED and info.value.details() == "Exhausted"


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), mrpcd.Status):
    """What grpc_status.rpc_status.to_status() returns: a grpc.Status (code, details,
    trailing metadata carrying the packed google.rpc.Status)."""


def test_abort_with_status_carries_rich_details_in_trailers_sync_and_aio(streamer):
    _a, _b, pb = streamer
    packed = b"\x08\x08\x12\x17Request limit exceeded."
    status = _Status(mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Request limit exceeded.", (("grpc-status-details-bin", packed),))

    class Sync(pb.StreamerServicer):
        def Unary(self, request, context):
            context.abort_with_status(status)

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            await context.abort_with_status(status)

    def check(err):
        assert err.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED and err.details() == "Request limit exceeded."
        assert dict(err.trailing_metadata())["grpc-status-details-bin"] == packed
        for key, value in err.trailing_metadata():  # what grpc_status.rpc_status.from_call reads
            assert isinstance(key, str)

    with sync_pair(streamer, Sync()) as (_server, channel):
        with pytest.raises(mrpcd.RpcError) as info:
            pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)
        check(info.value)

    async def body(server, channel):
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)
        check(info.value)

    run_aio(streamer, Aio(), body)


def test_errors_aio_abort_set_code_and_exception(streamer):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            if request.seq == 1:
                await context.abort(mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Request limit exceeded.")
            if request.seq == 2:
                context.set_code(mrpcd.StatusCode.NOT_FOUND)
                context.set_details("no such feature")
                return pb.Summary()
            raise RuntimeError("boom")

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            await context.abort(mrpcd.StatusCode.RESOURCE_EXHAUSTED, "Exhausted")

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        for seq, code in [(1, mrpcd.StatusCode.RESOURCE_EXHAUSTED), (2, mrpcd.StatusCode.NOT_FOUND), (3, mrpcd.StatusCode.UNKNOWN)]:
            with pytest.raises(mrpcd.aio.AioRpcError) as info:
                await stub.Unary(pb.Chunk(seq=seq), timeout=10)
            assert info.value.code() is code
            assert isinstance(info.value, mrpcd.RpcError)
        call = stub.ServerStream(pb.Chunk(), timeout=10)
        got = []
        with pytest.raises(mrpcd.aio.AioRpcError):
            async for chunk in call:
                got.append(chunk.seq)
        assert got == [0] and await call.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert await call.details() == "Exhausted"

    run_aio(streamer, S(), body)


# -- deadlines --------------------------------------------------------------------------------


def test_deadline_sync_expires_with_deadline_exceeded_and_the_handler_sees_it(streamer):
    _a, _b, pb = streamer
    seen = {}
    released = threading.Event()

    class Slow(pb.StreamerServicer):
        def Unary(self, request, context):
            seen["remaining"] = context.time_remaining()
            if request.seq:
                released.wait(10)
                # the server's deadline is the client's plus the transit: it ends a moment later
                seen["active_after"] = not wait_until(lambda: not context.is_active(), 10)
            return pb.Summary(total=1)

    with sync_pair(streamer, Slow()) as (_server, channel):
        stub = pb.StreamerStub(channel)
        assert stub.Unary(pb.Chunk(), timeout=5).total == 1
        assert 0 < seen["remaining"] <= 5
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(seq=1), timeout=0.3)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        assert info.value.details() == "Deadline Exceeded"
        released.set()
        assert wait_until(lambda: "active_after" in seen, 10) and seen["active_after"] is False


def test_deadline_aio(streamer):
    _a, _b, pb = streamer

    class Slow(pb.StreamerServicer):
        async def Unary(self, request, context):
            await asyncio.sleep(10)
            return pb.Summary()

    async def body(server, channel):
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=0.3)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED

    run_aio(streamer, Slow(), body)


# -- cancellation -----------------------------------------------------------------------------


def test_cancellation_sync_future_and_response_iterator_reach_the_handler(streamer):
    _a, _b, pb = streamer
    started = threading.Semaphore(0)
    stopped: list = []

    class Finder(pb.StreamerServicer):
        def Unary(self, request, context):
            stop = threading.Event()
            context.add_callback(stop.set)
            started.release()
            stop.wait(15)
            stopped.append(("unary", stop.is_set(), context.is_active()))
            return pb.Summary()

        def ServerStream(self, request, context):
            stop = threading.Event()
            context.add_callback(stop.set)
            i = 0
            while not stop.is_set() and i < 10_000:
                yield pb.Chunk(seq=i)
                i += 1
                stop.wait(0.01)
            stopped.append(("stream", stop.is_set(), context.is_active()))

    # one worker, as the cancellation example: a cancelled call must give its thread back
    with sync_pair(streamer, Finder(), maximum_concurrent_rpcs=1) as (server, channel):
        stub = pb.StreamerStub(channel)
        future = stub.Unary.future(pb.Chunk(), wait_for_ready=True, timeout=30)
        assert started.acquire(timeout=10)
        with pytest.raises(mrpcd.RpcError) as info:  # over maximum_concurrent_rpcs, as in grpc
            stub.Ping(pb.Empty(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == "Concurrent RPC limit exceeded!"
        assert future.cancel() and future.cancelled()
        with pytest.raises(mrpcd.FutureCancelledError):
            future.result(timeout=10)
        stream = stub.ServerStream(pb.Chunk(), wait_for_ready=True, timeout=30)
        assert next(stream).seq == 0
        stream.cancel()
        with pytest.raises(mrpcd.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() is mrpcd.StatusCode.CANCELLED
        assert wait_until(lambda: len(stopped) == 2, 10), stopped
        assert sorted(stopped) == [("stream", True, False), ("unary", True, False)]
        # the cancelled calls gave their slot back: the next call is admitted (and answered
        # UNIMPLEMENTED by the servicer's default Ping)
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Ping(pb.Empty(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_maximum_concurrent_rpcs_must_be_a_positive_int(streamer, bad):
    app = mrpcd.connect(streamer[1].socket, name="compat-maxrpcs")
    try:
        with pytest.raises(ValueError, match="maximum_concurrent_rpcs"):
            mrpcd.server(futures.ThreadPoolExecutor(1), maximum_concurrent_rpcs=bad, app=app)
    finally:
        app.close()


def test_maximum_concurrent_rpcs_aio(streamer):
    _a, _b, pb = streamer
    release = asyncio.Event()

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            await release.wait()
            return pb.Summary(total=1)

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        first = asyncio.ensure_future(stub.Unary(pb.Chunk(), timeout=10))
        while not server._calls:
            await asyncio.sleep(0.01)
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await stub.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        assert (await first).total == 1
        assert (await stub.Unary(pb.Chunk(), timeout=10)).total == 1

    a, b, _ = streamer

    async def main():
        async with aio_pair(a, b, pb, S(), name="compat-max-aio", maximum_concurrent_rpcs=1) as (server, channel, _, _):
            await body(server, channel)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_side_context_cancel_ends_the_call_with_cancelled(streamer):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            context.cancel()
            return pb.Summary()

    with sync_pair(streamer, S()) as (_server, channel):
        with pytest.raises(mrpcd.RpcError) as info:
            pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED


def test_cancellation_aio_call_cancel_reaches_the_handler(streamer):
    _a, _b, pb = streamer
    seen = []

    class S(pb.StreamerServicer):
        async def ServerStream(self, request, context):
            context.add_done_callback(lambda ctx: seen.append("done"))
            try:
                i = 0
                while True:
                    yield pb.Chunk(seq=i)
                    i += 1
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

    async def body(server, channel):
        call = pb.StreamerStub(channel).ServerStream(pb.Chunk(), timeout=30)
        assert (await call.read()).seq == 0
        assert call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        assert call.cancelled() and await call.code() is mrpcd.StatusCode.CANCELLED
        for _ in range(500):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(seen) == ["cancelled", "done"]

    run_aio(streamer, S(), body)


# -- interceptors ------------------------------------------------------------------------------


class _GenericClientInterceptor(mrpcd.UnaryUnaryClientInterceptor, mrpcd.UnaryStreamClientInterceptor,
                                mrpcd.StreamUnaryClientInterceptor, mrpcd.StreamStreamClientInterceptor):
    """The examples' generic interceptor: one function rewrites (details, requests) for all
    four kinds."""

    def __init__(self, fn):
        self._fn = fn

    def intercept_unary_unary(self, continuation, details, request):
        details, requests = self._fn(details, iter((request,)))
        return continuation(details, next(requests))

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(*self._fn(details, request_iterator))

    intercept_stream_stream = intercept_stream_unary


class _FourFieldDetails(collections.namedtuple("_FourFieldDetails", ("method", "timeout", "metadata", "credentials")), mrpcd.ClientCallDetails):
    """How grpc's header example builds its call details: its own 4-field namedtuple,
    also a ClientCallDetails."""


def _header_adder(header, value):
    def fn(details, requests):
        metadata = list(details.metadata) if details.metadata is not None else []
        metadata.append((header, value))
        return _FourFieldDetails(details.method, details.timeout, metadata, details.credentials), requests

    return _GenericClientInterceptor(fn)


class _HeaderValidator(mrpcd.ServerInterceptor):
    """The examples' request-header validator: a call without the header is answered by a
    terminator handler made with no (de)serializers at all."""

    def __init__(self, header, value):
        self._pair = (header, value)

        def terminate(ignored_request, context):
            context.abort(mrpcd.StatusCode.UNAUTHENTICATED, "Access denied!")

        self._terminator = mrpcd.unary_unary_rpc_method_handler(terminate)

    def intercept_service(self, continuation, handler_call_details):
        if self._pair in handler_call_details.invocation_metadata:
            return continuation(handler_call_details)
        return self._terminator


def test_interceptors_sync_header_added_by_a_client_interceptor_is_checked_by_the_server(streamer):
    _a, _b, pb = streamer
    with sync_pair(streamer, _route_servicer(pb), interceptors=[_HeaderValidator("one-time-password", "42")]) as (_server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(seq=1), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.UNAUTHENTICATED and info.value.details() == "Access denied!"
        ok = pb.StreamerStub(mrpcd.intercept_channel(channel, _header_adder("one-time-password", "42")))
        assert ok.Unary(pb.Chunk(seq=1), timeout=10).total == 2
        assert ok.Unary.with_call(pb.Chunk(seq=2), timeout=10)[0].total == 4
        assert ok.Unary.future(pb.Chunk(seq=3), timeout=10).result(timeout=10).total == 6
        assert ok.ClientStream(iter([pb.Chunk(seq=1)]), timeout=10).total == 1001


def test_a_handler_made_without_serializers_takes_and_gives_bytes(streamer):
    """grpc's identity (de)serializers: the behavior gets the request's bytes and must
    return bytes; anything else is a clear error for the client, not a hang."""
    _a, _b, pb = streamer
    seen = []

    def raw(request, context):
        seen.append(type(request))
        return request if context.method().endswith("Ping") else pb.Summary(total=1)

    class Raw(mrpcd.ServerInterceptor):
        def intercept_service(self, continuation, details):
            return mrpcd.unary_unary_rpc_method_handler(raw)

    with sync_pair(streamer, _route_servicer(pb), interceptors=[Raw()]) as (_server, channel):
        stub = pb.StreamerStub(channel)
        assert stub.Ping(pb.Empty(), timeout=10) == pb.Empty()
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() in (mrpcd.StatusCode.INTERNAL, mrpcd.StatusCode.UNKNOWN)
        assert "must return bytes" in info.value.details()
        assert seen == [bytes, bytes]


def test_interceptors_sync_streaming_wrappers_on_both_sides(streamer):
    """The examples' streaming interceptors: the server one rebuilds the handler around a
    wrapped response iterator from handler.unary_stream and its (de)serializers; client
    ones wrap the response iterator; a default-value one answers failed calls itself."""
    _a, _b, pb = streamer
    log: list = []

    def wrap_responses(tag, responses):
        for i, r in enumerate(responses):
            log.append((tag, i))
            yield r

    class ServerWrap(mrpcd.ServerInterceptor):
        def __init__(self, tag):
            self.tag = tag

        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if handler is None or handler.unary_stream is None:
                return handler
            behavior = handler.unary_stream

            def wrapped(request, context):
                return wrap_responses(("server", self.tag), behavior(request, context))

            return mrpcd.unary_stream_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer,
                                                         response_serializer=handler.response_serializer)

    class ClientWrap(mrpcd.UnaryStreamClientInterceptor):
        def __init__(self, tag):
            self.tag = tag

        def intercept_unary_stream(self, continuation, details, request):
            return wrap_responses(("client", self.tag), continuation(details, request))

    class _Concrete(mrpcd.Future):  # an answer of the interceptor's own, as grpc's example
        def __init__(self, value):
            self._value = value

        def cancel(self):
            return False

        def cancelled(self):
            return False

        def running(self):
            return False

        def done(self):
            return True

        def result(self, timeout=None):
            return self._value

        def exception(self, timeout=None):
            return None

        def traceback(self, timeout=None):
            return None

        def add_done_callback(self, fn):
            fn(self)

    class DefaultValue(mrpcd.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            response = continuation(details, request)
            return _Concrete(pb.Summary(total=-1)) if response.exception() else response

    with sync_pair(streamer, _error_servicer(pb), interceptors=[ServerWrap("s1"), ServerWrap("s2")]) as (_server, channel):
        wrapped = mrpcd.intercept_channel(channel, ClientWrap("c1"), ClientWrap("c2"), DefaultValue())
        stub = pb.StreamerStub(wrapped)
        assert [c.seq for c in stub.ServerStream(pb.Chunk(seq=9), timeout=10)] == [0, 1, 2]
        assert [t for t in log if t[1] == 0] == [(("server", "s2"), 0), (("server", "s1"), 0), (("client", "c2"), 0), (("client", "c1"), 0)]
        assert stub.Unary(pb.Chunk(seq=1), timeout=10).total == -1  # failed: the default value
        assert stub.Unary(pb.Chunk(seq=7), timeout=10).total == 7


def test_interceptors_aio_rpc_id_contextvar_and_pass_through_client(streamer):
    """grpc.aio's interceptor example: server interceptors set a contextvar the handler
    reads (they run in the handler's task), client interceptors log or pass through."""
    _a, _b, pb = streamer
    rpc_id = contextvars.ContextVar("rpc_id", default="default")
    log: list = []

    class RpcIdInterceptor(mrpcd.aio.ServerInterceptor):
        def __init__(self, tag):
            self.tag = tag

        async def intercept_service(self, continuation, details):
            if rpc_id.get() == "default":
                rpc_id.set(f"{self.tag}-{dict(details.invocation_metadata)['client-rpc-id']}")
            else:
                rpc_id.set(f"{self.tag}-{rpc_id.get()}")
            return await continuation(details)

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            context.set_trailing_metadata((("rpc-id", rpc_id.get()),))
            return pb.Summary(total=1)

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=5)

    class Logging(mrpcd.aio.UnaryUnaryClientInterceptor, mrpcd.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            log.append(details.method)
            return await continuation(details, request)

        intercept_unary_stream = intercept_unary_unary

    class PassThrough(mrpcd.aio.UnaryUnaryClientInterceptor, mrpcd.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return continuation(details, request)  # not awaited: newer grpc.aio unwraps it

        intercept_unary_stream = intercept_unary_unary

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        call = stub.Unary(pb.Chunk(), metadata=mrpcd.aio.Metadata(("client-rpc-id", "abc")), timeout=10)
        assert (await call).total == 1
        assert dict(await call.trailing_metadata())["rpc-id"] == "Interceptor2-Interceptor1-abc"
        assert [c.seq async for c in stub.ServerStream(pb.Chunk(), metadata=(("client-rpc-id", "d"),), timeout=10)] == [5]
        assert log == ["/mrpc.stream.Streamer/Unary", "/mrpc.stream.Streamer/ServerStream"]

    run_aio(streamer, S(), body, server_interceptors=[RpcIdInterceptor("Interceptor1"), RpcIdInterceptor("Interceptor2")],
            client_interceptors=[Logging(), PassThrough()])


def test_interceptors_aio_header_validator_with_a_bare_terminator(streamer):
    _a, _b, pb = streamer

    class Validator(mrpcd.aio.ServerInterceptor):
        def __init__(self):
            async def terminate(request, context):
                await context.abort(mrpcd.StatusCode.UNAUTHENTICATED, "Access denied!")

            self._terminator = mrpcd.unary_unary_rpc_method_handler(terminate)

        async def intercept_service(self, continuation, details):
            if ("one-time-password", "42") in details.invocation_metadata:
                return await continuation(details)
            return self._terminator

    class AddHeader(mrpcd.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            meta = list(details.metadata or ()) + [("one-time-password", "42")]
            return await continuation(mrpcd.ClientCallDetails(details.method, details.timeout, meta, details.credentials, details.wait_for_ready), request)

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=3)

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await stub.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.UNAUTHENTICATED
        ok = mrpcd.aio.insecure_channel(channel.target, interceptors=[AddHeader()], app=channel.app)
        assert mrpcd.aio.ClientCallDetails is mrpcd.ClientCallDetails
        assert (await pb.StreamerStub(ok).Unary(pb.Chunk(), timeout=10)).total == 3
        await ok.close()

    run_aio(streamer, S(), body, server_interceptors=[Validator()])


# -- wait_for_ready ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_for_ready_sync_waits_for_the_server_fail_fast_does_not(streamer):
    a, b, pb = streamer
    port = _free_port()
    srv_app = mrpcd.connect(b.socket, name="compat-wfr-server")
    cli_app = mrpcd.connect(a.socket, name="compat-wfr-client")
    results: dict = {}
    try:
        with mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app) as channel:
            states: list = []
            failed = threading.Event()

            def watch(state):
                states.append(state)
                if state is mrpcd.ChannelConnectivity.TRANSIENT_FAILURE:
                    failed.set()

            channel.subscribe(watch)
            stub = pb.StreamerStub(channel)

            def call(wait):
                try:
                    results[wait] = stub.Unary(pb.Chunk(seq=3), timeout=20, wait_for_ready=wait).total
                except mrpcd.RpcError as exc:
                    results[wait] = exc.code()

            threads = [threading.Thread(target=call, args=(w,)) for w in (False, True)]
            for t in threads:
                t.start()
            assert failed.wait(15)  # as the example: start the server once the channel failed
            assert wait_until(lambda: False in results, 15)
            assert results[False] is mrpcd.StatusCode.UNAVAILABLE
            server = mrpcd.server(app=srv_app)
            pb.add_StreamerServicer_to_server(_route_servicer(pb), server)
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()
            for t in threads:
                t.join(20)
            assert results[True] == 6
            assert wait_until(lambda: states and states[-1] is mrpcd.ChannelConnectivity.READY, 10), states
            assert states[0] is mrpcd.ChannelConnectivity.IDLE
            channel.unsubscribe(watch)
            server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def test_wait_for_ready_without_a_server_ends_at_the_deadline(streamer):
    """Sync (plain and through an interceptor, whose call details carry the flag) and
    asyncio: nobody ever listens, so the call waits until its deadline, as in grpc."""
    a, _b, pb = streamer
    port = _free_port()
    cli_app = mrpcd.connect(a.socket, name="compat-wfr-none")
    try:
        with mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app) as channel:
            for ch in (channel, mrpcd.intercept_channel(channel, _header_adder("x", "y"))):
                stub = pb.StreamerStub(ch)
                with pytest.raises(mrpcd.RpcError) as info:
                    stub.Unary(pb.Chunk(), timeout=0.5, wait_for_ready=True)
                assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(mrpcd.RpcError) as info:
                    list(stub.ServerStream(pb.Chunk(), timeout=0.5, wait_for_ready=True))
                assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
    finally:
        cli_app.close()

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-wfr-none-aio")
        try:
            async with mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=app) as channel:
                with pytest.raises(mrpcd.aio.AioRpcError) as info:
                    await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=0.5, wait_for_ready=True)
                assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
        finally:
            app.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_wait_for_ready_aio(streamer):
    a, b, pb = streamer
    port = _free_port()

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=5)

    async def main():
        srv_app = mrpcd.aio.connect(b.socket, name="compat-wfr-aio-server")
        cli_app = mrpcd.aio.connect(a.socket, name="compat-wfr-aio-client")
        try:
            async with mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=cli_app) as channel:
                stub = pb.StreamerStub(channel)

                async def process(wait):
                    try:
                        return (await stub.Unary(pb.Chunk(), timeout=20, wait_for_ready=wait)).total
                    except mrpcd.aio.AioRpcError as exc:
                        return exc.code()

                fail_fast = asyncio.ensure_future(process(False))
                waiting = asyncio.ensure_future(process(True))
                state = channel.get_state()
                while state is not mrpcd.ChannelConnectivity.TRANSIENT_FAILURE:
                    await asyncio.wait_for(channel.wait_for_state_change(state), 15)
                    state = channel.get_state()
                assert await asyncio.wait_for(fail_fast, 15) is mrpcd.StatusCode.UNAVAILABLE
                server = mrpcd.aio.server(app=srv_app)
                pb.add_StreamerServicer_to_server(S(), server)
                server.add_insecure_port(f"127.0.0.1:{port}")
                await server.start()
                assert await asyncio.wait_for(waiting, 20) == 5
                assert channel.get_state() is mrpcd.ChannelConnectivity.READY
                await server.stop(None)
            assert channel.get_state() is mrpcd.ChannelConnectivity.SHUTDOWN
        finally:
            cli_app.close()
            srv_app.close()

    asyncio.run(asyncio.wait_for(main(), 40))


# -- channel and server options (keepalive, retries, service config) -------------------------

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 8000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 5),
    ("grpc.keepalive_permit_without_calls", 1),
]
_RETRY = [("grpc.enable_retries", 1), ("grpc.service_config", '{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 5, '
          '"initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}')]


@pytest.mark.parametrize("options", [_KEEPALIVE, _RETRY, [("grpc.max_receive_message_length", 1 << 20)]], ids=["keepalive", "retry", "limits"])
def test_grpc_channel_and_server_options_are_accepted(streamer, options):
    _a, _b, pb = streamer
    with sync_pair(streamer, _route_servicer(pb), options=options, compression=mrpcd.Compression.Gzip) as (_server, channel):
        ch = mrpcd.insecure_channel(channel.target, options, mrpcd.Compression.Gzip, app=channel.app)
        assert pb.StreamerStub(ch).Unary(pb.Chunk(seq=1), timeout=10).total == 2
        ch.close()


def test_retry_policy_retries_as_grpc_and_enable_retries_0_turns_it_off(streamer):
    """grpc's retry policy in the service config retries a unary call that failed with a
    listed code (tests/test_retries.py has the rest); with grpc.enable_retries=0 the call
    fails once, the server sees it once, as in grpc."""
    _a, _b, pb = streamer
    calls = []

    class Flaky(pb.StreamerServicer):
        def Unary(self, request, context):
            calls.append(1)
            if len(calls) % 2 == 1:
                context.abort(mrpcd.StatusCode.UNAVAILABLE, "flaky")
            return pb.Summary(total=len(calls))

    config = ('{"methodConfig": [{"name": [{"service": "mrpc.stream.Streamer"}], '
              '"retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, '
              '"retryableStatusCodes": ["UNAVAILABLE"]}}]}')
    with sync_pair(streamer, Flaky()) as (_server, channel):
        stub = pb.StreamerStub(mrpcd.insecure_channel(channel.target, options=[("grpc.service_config", config)], app=channel.app))
        assert stub.Unary(pb.Chunk(), timeout=10).total == 2 and len(calls) == 2
        off = pb.StreamerStub(mrpcd.insecure_channel(channel.target, options=[("grpc.enable_retries", 0), ("grpc.service_config", config)], app=channel.app))
        with pytest.raises(mrpcd.RpcError) as info:
            off.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE and len(calls) == 3
        assert off.Unary(pb.Chunk(), timeout=10).total == 4  # the application's own retry


@pytest.mark.parametrize("options", [[("grpc.keepalive_time_ms",)], ["not a pair"], 5, [("grpc.max_receive_message_length", "4MB")]])
def test_malformed_options_are_a_clear_error(streamer, options):
    with pytest.raises((TypeError, ValueError)) as info:
        mrpcd.insecure_channel("127.0.0.1:1", options=options, app=mrpcd.connect(streamer[0].socket, name="compat-opts"))
    assert "option" in str(info.value).lower()


# -- bad input: clear errors, never a hang ---------------------------------------------------


def test_wrong_request_and_response_types_are_clear_errors(streamer):
    """A request of the wrong message type, a handler that returns None or the wrong
    type, or yields the wrong type: each call ends with a status that says so."""
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        def Unary(self, request, context):
            return None if request.seq == 0 else pb.Chunk(seq=1)

        def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            yield pb.Summary(total=1)

    with sync_pair(streamer, S()) as (_server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises((TypeError, ValueError, mrpcd.RpcError)) as info:
            stub.Unary(pb.Summary(total=1), timeout=10)
        assert "Summary" in str(info.value) or "Chunk" in str(info.value), info.value
        for seq in (0, 1):
            with pytest.raises(mrpcd.RpcError) as info:
                stub.Unary(pb.Chunk(seq=seq), timeout=10)
            assert info.value.code() in (mrpcd.StatusCode.INTERNAL, mrpcd.StatusCode.UNKNOWN), info.value
            assert "serializ" in info.value.details().lower(), info.value.details()
        got = []
        with pytest.raises(mrpcd.RpcError) as info:
            for chunk in stub.ServerStream(pb.Chunk(), timeout=10):
                got.append(chunk.seq)
        assert got == [0] and info.value.code() in (mrpcd.StatusCode.INTERNAL, mrpcd.StatusCode.UNKNOWN)


def test_wrong_types_aio_are_clear_errors(streamer):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return None

        async def ServerStream(self, request, context):
            yield pb.Summary(total=1)

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        with pytest.raises(mrpcd.RpcError) as info:
            await stub.Unary(pb.Chunk(), timeout=10)
        assert info.value.code() in (mrpcd.StatusCode.INTERNAL, mrpcd.StatusCode.UNKNOWN)
        assert "serializ" in info.value.details().lower(), info.value.details()
        with pytest.raises(mrpcd.RpcError) as info:
            [c async for c in stub.ServerStream(pb.Chunk(), timeout=10)]
        assert info.value.code() in (mrpcd.StatusCode.INTERNAL, mrpcd.StatusCode.UNKNOWN)
        with pytest.raises((TypeError, ValueError, mrpcd.RpcError)):
            await stub.Unary(pb.Summary(), timeout=10)

    run_aio(streamer, S(), body)


# -- async_streaming / hellostreamingworld: responses consumed elsewhere, read() until EOF ----


def test_bidi_with_a_finite_request_iterator_consumed_on_another_thread(streamer):
    """The async_streaming example: one request, then the server streams call states
    (an enum compared with `is`), the responses read on an executor thread; the server
    cleans up in an add_callback."""
    _a, _b, pb = streamer
    cleaned = threading.Event()

    class Phone(pb.StreamerServicer):
        def BidiStream(self, request_iterator, context):
            first = next(request_iterator)
            context.add_callback(cleaned.set)
            for state in (0, 1):
                yield pb.Chunk(seq=first.seq, header={"trace_id": "call", "priority": state})

    with sync_pair(streamer, Phone()) as (_server, channel), futures.ThreadPoolExecutor(2) as pool:
        responses = pb.StreamerStub(channel).BidiStream(iter((pb.Chunk(seq=7),)), timeout=10)

        def watch():
            states = []
            for r in responses:
                if r.HasField("header"):
                    states.append(r.header.priority)
            return states

        states = pool.submit(watch).result(timeout=10)
        assert states == [0, 1] and states[1] is pb.Priority.PRIORITY_HIGH  # an enum member, as `is` comparisons expect
        assert cleaned.wait(10)


def test_aio_read_until_eof_and_write_done_writing(streamer):
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        async def ServerStream(self, request, context):
            for i in range(request.seq):
                yield pb.Chunk(seq=i)

        async def BidiStream(self, request_iterator, context):
            async for chunk in request_iterator:
                yield pb.Chunk(seq=chunk.seq + 100)

    async def body(server, channel):
        stub = pb.StreamerStub(channel)
        call = stub.ServerStream(pb.Chunk(seq=3), timeout=10)
        got = []
        while True:
            response = await call.read()
            if response == mrpcd.aio.EOF:
                break
            got.append(response.seq)
        assert got == [0, 1, 2]
        call = stub.BidiStream(timeout=10)
        for i in range(3):
            await call.write(pb.Chunk(seq=i))
            assert (await call.read()).seq == 100 + i
        await call.done_writing()
        assert await call.read() == mrpcd.aio.EOF
        assert await call.code() is mrpcd.StatusCode.OK

    run_aio(streamer, S(), body)


def test_exception_wrapper_interceptor_around_a_response_stream(streamer):
    """grpc's exception_wrapper example: a client interceptor returns its own Call and
    Future around the response iterator and turns one status into its own exception."""
    _a, _b, pb = streamer

    class Wrapped(Exception):
        pass

    class Wrapper(mrpcd.Call, mrpcd.Future):
        def __init__(self, call):
            self._call = call

        def __getattr__(self, name):
            return getattr(self._call, name)

        initial_metadata = property(lambda self: self._call.initial_metadata)
        trailing_metadata = property(lambda self: self._call.trailing_metadata)
        code = property(lambda self: self._call.code)
        details = property(lambda self: self._call.details)
        is_active = property(lambda self: self._call.is_active)
        time_remaining = property(lambda self: self._call.time_remaining)
        cancel = property(lambda self: self._call.cancel)
        add_callback = property(lambda self: self._call.add_callback)
        cancelled = property(lambda self: self._call.cancelled)
        running = property(lambda self: self._call.running)
        done = property(lambda self: self._call.done)
        result = property(lambda self: self._call.result)
        exception = property(lambda self: self._call.exception)
        traceback = property(lambda self: self._call.traceback)
        add_done_callback = property(lambda self: self._call.add_done_callback)

        def __iter__(self):
            return self

        def __next__(self):
            try:
                return next(self._call)
            except StopIteration:
                raise
            except mrpcd.RpcError as err:
                if err.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED:
                    raise Wrapped(err) from err
                raise

    class ExceptionInterceptor(mrpcd.UnaryStreamClientInterceptor):
        def intercept_unary_stream(self, continuation, details, request):
            return Wrapper(continuation(details, request))

    with sync_pair(streamer, _error_servicer(pb)) as (_server, channel):
        stub = pb.StreamerStub(mrpcd.intercept_channel(channel, ExceptionInterceptor()))
        got = []
        with pytest.raises(Wrapped):
            for chunk in stub.ServerStream(pb.Chunk(seq=1), timeout=10):
                got.append(chunk.seq)
        assert got == [0]
        call = stub.ServerStream(pb.Chunk(seq=9), timeout=10)
        assert [c.seq for c in call] == [0, 1, 2] and call.code() is mrpcd.StatusCode.OK


def test_aio_metadata_class_behaves_as_grpc_aio_metadata():
    m = mrpcd.aio.Metadata(("a", "1"), ("b", b"\x00"))
    m.add("a", "2")
    assert m["a"] == "1" and m.get_all("a") == ["1", "2"] and len(m) == 3 and "b" in m
    assert list(m) == [("a", "1"), ("a", "2"), ("b", b"\x00")]
    m["a"] = "one"
    del m["b"]
    assert m == (("a", "one"), ("a", "2")) and m.get("b") is None
    assert mrpcd.aio.Metadata.from_tuple((("k", "v"),)) == mrpcd.aio.Metadata(("k", "v"))
    with pytest.raises(KeyError):
        m["missing"]


# -- streams driven by what comes back ---------------------------------------------------------


def test_bidi_ping_pong_driven_by_a_generator_that_waits_for_each_answer(streamer):
    """A request generator that yields the next note only once the answer to the last one
    arrived (route_guide's chat, paced by the responses): each request must go out as it
    is yielded, not once the generator ends."""
    import queue

    _a, _b, pb = streamer

    class Echo(pb.StreamerServicer):
        def BidiStream(self, request_iterator, context):
            for note in request_iterator:
                yield pb.Chunk(seq=note.seq + 1)

    with sync_pair(streamer, Echo()) as (_server, channel):
        answers: queue.Queue = queue.Queue()

        def notes():
            seq = 0
            for _ in range(5):
                yield pb.Chunk(seq=seq)
                seq = answers.get(timeout=10)

        got = []
        for reply in pb.StreamerStub(channel).BidiStream(notes(), timeout=20):
            got.append(reply.seq)
            answers.put(reply.seq)
        assert got == [1, 2, 3, 4, 5]


def test_client_stream_answered_early_stops_taking_an_endless_request_iterator(streamer):
    """The server answers after three requests; the client's endless generator is no
    longer drawn on and the call ends with the answer, sync and asyncio."""
    _a, _b, pb = streamer

    def endless():
        i = 0
        while True:
            yield pb.Chunk(seq=i)
            i += 1

    class Sync(pb.StreamerServicer):
        def ClientStream(self, request_iterator, context):
            return pb.Summary(total=sum(next(request_iterator).seq for _ in range(3)))

    with sync_pair(streamer, Sync()) as (_server, channel):
        assert pb.StreamerStub(channel).ClientStream(endless(), timeout=20).total == 3

    class Aio(pb.StreamerServicer):
        async def ClientStream(self, request_iterator, context):
            total = 0
            n = 0
            async for chunk in request_iterator:
                total += chunk.seq
                n += 1
                if n == 3:
                    break
            return pb.Summary(total=total)

    async def body(server, channel):
        assert (await pb.StreamerStub(channel).ClientStream(endless(), timeout=20)).total == 3

    run_aio(streamer, Aio(), body)


def test_deadline_on_response_streams_sync_and_aio(streamer):
    _a, _b, pb = streamer

    class SlowSync(pb.StreamerServicer):
        def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            while context.is_active():
                threading.Event().wait(0.02)

    with sync_pair(streamer, SlowSync()) as (_server, channel):
        got = []
        with pytest.raises(mrpcd.RpcError) as info:
            for c in pb.StreamerStub(channel).ServerStream(pb.Chunk(), timeout=0.5):
                got.append(c.seq)
        assert got == [0] and info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED

    class SlowAio(pb.StreamerServicer):
        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            await asyncio.sleep(10)

    async def body(server, channel):
        got = []
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            async for c in pb.StreamerStub(channel).ServerStream(pb.Chunk(), timeout=0.5):
                got.append(c.seq)
        assert got == [0] and info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED

    run_aio(streamer, SlowAio(), body)


def test_subscribe_try_to_connect_and_get_state_try_to_connect(streamer):
    """grpc's readiness idioms: subscribe(callback, try_to_connect=True) and asyncio
    get_state(try_to_connect=True) connect an idle channel in the background."""
    _a, _b, pb = streamer
    with sync_pair(streamer, _route_servicer(pb)) as (_server, channel):
        ready = threading.Event()

        def watch(state):
            if state is mrpcd.ChannelConnectivity.READY:
                ready.set()

        fresh = mrpcd.insecure_channel(channel.target, app=channel.app)
        fresh.subscribe(watch, try_to_connect=True)
        assert ready.wait(10)
        fresh.close()

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary()

    async def body(server, channel):
        fresh = mrpcd.aio.insecure_channel(channel.target, app=channel.app)
        state = fresh.get_state(try_to_connect=True)
        while state is not mrpcd.ChannelConnectivity.READY:
            await asyncio.wait_for(fresh.wait_for_state_change(state), 10)
            state = fresh.get_state()
        await fresh.close()
        assert fresh.get_state() is mrpcd.ChannelConnectivity.SHUTDOWN

    run_aio(streamer, S(), body)


def test_an_unreachable_target_fails_the_call_where_grpc_raises(streamer):
    """Fail-fast against nobody: grpc's .future() and a response stream's creation do not
    raise; the future's result() / exception() and the first next() do (UNAVAILABLE)."""
    a, _b, pb = streamer
    app = mrpcd.connect(a.socket, name="compat-unreachable")
    try:
        with mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app) as channel:
            stub = pb.StreamerStub(channel)
            future = stub.Unary.future(pb.Chunk(), timeout=10)
            assert future.done() and future.exception(timeout=5).code() is mrpcd.StatusCode.UNAVAILABLE
            stream = stub.ServerStream(pb.Chunk(), timeout=10)
            with pytest.raises(mrpcd.RpcError) as info:
                next(stream)
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
            future = stub.ClientStream.future(iter([pb.Chunk()]), timeout=10)
            with pytest.raises(mrpcd.RpcError) as info:
                future.result(timeout=5)
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
            with pytest.raises(mrpcd.RpcError) as info:
                stub.Unary(pb.Chunk(), timeout=10)
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
        with pytest.raises(mrpcd.RpcError) as info:  # closed: CANCELLED, at result() as well
            stub.Unary.future(pb.Chunk(), timeout=10).result(timeout=5)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED
        assert not [k for k in app.calls if k[0] == -1]  # nothing left in the app's table
    finally:
        app.close()


def test_grpcio_handlers_on_an_mrpcd_server_are_a_clear_error(streamer):
    """grpcio's own services (grpc_health's servicer, a grpcio-generated _pb2_grpc module)
    register grpcio handlers: refused with a TypeError that says what to use instead."""
    grpc = pytest.importorskip("grpc")
    app = mrpcd.connect(streamer[1].socket, name="compat-grpcio-handlers")
    try:
        server = mrpcd.server(futures.ThreadPoolExecutor(1), app=app)
        foreign = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
            "Check": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
        with pytest.raises(TypeError, match="not an mrpcd generic handler"):
            server.add_generic_rpc_handlers((foreign,))
    finally:
        app.close()


def test_a_grpcio_generated_stub_on_an_mrpcd_channel_is_a_clear_error(streamer):
    """Keeping a grpcio-generated _pb2_grpc stub and swapping only the channel: the stub's
    protobuf (de)serializers are refused with a TypeError saying to use mrpcd-stubgen."""
    app = mrpcd.connect(streamer[0].socket, name="compat-grpcio-stub")
    try:
        channel = mrpcd.insecure_channel("127.0.0.1:1", app=app)
        with pytest.raises(TypeError, match="mrpcd-stubgen"):  # what grpcio's generated __init__ calls
            channel.unary_unary("/helloworld.Greeter/SayHello", request_serializer=bytes, response_deserializer=bytes, _registered_method=True)
        with pytest.raises(TypeError, match="mrpcd-stubgen"):
            channel.stream_stream("/x.S/M", request_type=dict, response_type=dict)
    finally:
        app.close()


def test_a_wait_for_ready_call_ends_when_its_app_closes(streamer):
    """Nobody listens and the call has no deadline: closing the app (or the channel) ends
    the wait with an error instead of leaving the caller waiting for ever."""
    a, _b, pb = streamer
    port = _free_port()
    for close in ("app", "channel"):
        app = mrpcd.connect(a.socket, name=f"compat-wfr-close-{close}")
        channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=app)
        outcome: list = []

        def call():
            try:
                pb.StreamerStub(channel).Unary(pb.Chunk(), wait_for_ready=True)
            except mrpcd.RpcError as exc:
                outcome.append(exc.code())

        t = threading.Thread(target=call, daemon=True)
        t.start()
        assert wait_until(lambda: channel._state is mrpcd.ChannelConnectivity.TRANSIENT_FAILURE, 10)
        (app if close == "app" else channel).close()
        t.join(10)
        assert not t.is_alive() and outcome and outcome[0] in (mrpcd.StatusCode.UNAVAILABLE, mrpcd.StatusCode.CANCELLED), outcome
        app.close()

    app = mrpcd.connect(a.socket, name="compat-ready-close")
    ready = mrpcd.channel_ready_future(mrpcd.insecure_channel(f"127.0.0.1:{port}", app=app))
    with pytest.raises(mrpcd.FutureTimeoutError):
        ready.result(timeout=0.3)
    app.close()  # channel_ready_future's retries end with the app too
    with pytest.raises(mrpcd.RpcError):
        ready.result(timeout=10)

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-wfr-close-aio")
        channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=app)
        waiting = asyncio.ensure_future(pb.StreamerStub(channel).Unary(pb.Chunk(), wait_for_ready=True))
        state = channel.get_state()
        while state is not mrpcd.ChannelConnectivity.TRANSIENT_FAILURE:
            await asyncio.wait_for(channel.wait_for_state_change(state), 10)
            state = channel.get_state()
        readiness = asyncio.ensure_future(channel.channel_ready())
        app.close()
        with pytest.raises(mrpcd.RpcError) as info:
            await asyncio.wait_for(waiting, 10)
        # CANCELLED: the app's own close, as the sync calls in flight get (an app whose
        # daemon went away would wait on: tests/test_daemon_restart.py)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED
        with pytest.raises(mrpcd.RpcError):
            await asyncio.wait_for(readiness, 10)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_callbacks_example_connectivity_logger_and_call_termination_callbacks(streamer):
    """grpc's callbacks example: a connectivity logger subscribed and unsubscribed on the
    fly, and add_callback on response iterators (ok and failing) run when the call ends."""
    _a, _b, pb = streamer
    with sync_pair(streamer, _error_servicer(pb)) as (_server, channel):
        fresh = mrpcd.insecure_channel(channel.target, app=channel.app)
        events: list = []
        ended: list = []
        fresh.subscribe(events.append)
        stub = pb.StreamerStub(fresh)
        stream = stub.ServerStream(pb.Chunk(seq=9), timeout=10)
        added = stream.add_callback(lambda: ended.append("ok"))
        assert [c.seq for c in stream] == [0, 1, 2]
        assert wait_until(lambda: ended == ["ok"] or not added, 10), ended
        assert wait_until(lambda: mrpcd.ChannelConnectivity.READY in events, 10), events
        fresh.unsubscribe(events.append)
        seen = len(events)
        failing = stub.ServerStream(pb.Chunk(seq=0), timeout=10)
        added = failing.add_callback(lambda: ended.append("failed"))
        with pytest.raises(mrpcd.RpcError):
            list(failing)
        assert wait_until(lambda: "failed" in ended or not added, 10), ended
        fresh.close()
        assert len(events) == seen  # unsubscribed: SHUTDOWN was not reported


def test_aio_wait_for_state_change_on_a_closed_channel_is_a_usage_error(streamer):
    """grpc.aio raises UsageError('Channel is closed.') there; waiting for a SHUTDOWN
    channel to change state would wait for ever."""
    a, _b, _pb = streamer

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-wfsc-closed")
        try:
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
            await channel.close()
            assert channel.get_state() is mrpcd.ChannelConnectivity.SHUTDOWN
            with pytest.raises(mrpcd.aio.UsageError):
                await asyncio.wait_for(channel.wait_for_state_change(mrpcd.ChannelConnectivity.SHUTDOWN), 5)
        finally:
            app.close()

    asyncio.run(main())


def test_aio_get_state_try_to_connect_polled_keeps_one_connector(streamer):
    """grpc's readiness loop calls get_state(try_to_connect=True) again and again while the
    target is down: one background connection attempt, not one more task per call, and
    none left once the channel is closed."""
    a, _b, _pb = streamer

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-get-state-poll")
        try:
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
            def connectors():
                return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("channel_ready")]

            for _ in range(20):
                channel.get_state(try_to_connect=True)
                await asyncio.sleep(0)
            assert len(connectors()) <= 1
            await channel.close()
            for _ in range(200):
                if not connectors():
                    break
                await asyncio.sleep(0.05)
            assert not connectors()
        finally:
            app.close()

    asyncio.run(main())


def test_wait_for_ready_future_and_streams_return_at_once_and_can_be_cancelled(streamer):
    """grpc's future(wait_for_ready=True) and its streaming calls return at once while the
    target cannot be reached: the wait is the call's, so cancel() (or the deadline) ends
    it, and a call without a deadline does not hold its caller for ever; once a server
    listens, the waiting calls go through."""
    a, b, pb = streamer
    port = _free_port()
    srv_app = mrpcd.connect(b.socket, name="compat-wfr-future-server")
    app = mrpcd.connect(a.socket, name="compat-wfr-future")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=app)
        stub = pb.StreamerStub(channel)
        made: list = []

        def make():
            made.append(stub.Unary.future(pb.Chunk(seq=1), wait_for_ready=True))  # no deadline
            made.append(stub.ServerStream(pb.Chunk(seq=2), wait_for_ready=True))
            made.append(stub.ClientStream.future(iter([pb.Chunk(seq=3), pb.Chunk(seq=4)]), timeout=30, wait_for_ready=True))
            made.append(stub.BidiStream(iter([pb.Chunk(seq=5)]), timeout=30, wait_for_ready=True))
            made.append(stub.Unary.future(pb.Chunk(), wait_for_ready=True))  # cancelled below
            made.append(stub.ServerStream(pb.Chunk(), timeout=0.3, wait_for_ready=True))

        t = threading.Thread(target=make, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive() and len(made) == 6  # (each waited for the target before)
        unary, server_stream, client_stream, bidi, cancelled, expiring = made
        assert not unary.done() and unary.running()
        assert cancelled.cancel() and cancelled.cancelled()
        with pytest.raises(mrpcd.RpcError) as info:
            next(expiring)
        assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED

        server = mrpcd.server(app=srv_app)
        pb.add_StreamerServicer_to_server(_route_servicer(pb), server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        assert unary.result(timeout=20).total == 2
        assert [c.seq for c in server_stream] == [0, 1]
        assert client_stream.result(timeout=20).total == 2007
        assert list(bidi) == []
        assert cancelled.cancelled() and cancelled.code() is mrpcd.StatusCode.CANCELLED
        channel.close()
        server.stop(None)
    finally:
        app.close()
        srv_app.close()


def test_aio_client_interceptors_see_the_metadata_as_grpc_aio_metadata(streamer):
    """grpc.aio hands a client interceptor's details.metadata as a grpc.aio.Metadata, never
    None: interceptors written for it add to it in place or with `+`."""
    _a, _b, pb = streamer

    class AddInPlace(mrpcd.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            assert isinstance(details.metadata, mrpcd.aio.Metadata)
            details.metadata.add("one-time-password", "42")
            return await continuation(details, request)

    class AddWithPlus(mrpcd.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            meta = details.metadata + (("one-time-password", "42"),)
            return await continuation(details._replace(metadata=meta), request)

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=sum(1 for k, v in context.invocation_metadata() if (k, v) == ("one-time-password", "42")))

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=sum(1 for k, v in context.invocation_metadata() if k in ("one-time-password", "k")))

    async def body(server, channel):
        ch = mrpcd.aio.insecure_channel(channel.target, interceptors=[AddInPlace(), AddWithPlus()], app=channel.app)
        stub = pb.StreamerStub(ch)
        assert (await stub.Unary(pb.Chunk(), timeout=10)).total == 1
        assert (await stub.Unary(pb.Chunk(), timeout=10, metadata=(("k", "v"),))).total == 1
        assert [c.seq async for c in stub.ServerStream(pb.Chunk(), timeout=10, metadata=(("k", "v"),))] == [2]
        await ch.close()

    run_aio(streamer, S(), body)


def test_aio_wait_for_ready_call_cancelled_while_it_waits_ends_at_once(streamer):
    """grpc.aio: cancelling a wait_for_ready call that waits for an unreachable target
    ends it (awaiting it raises CancelledError, its code is CANCELLED); it waited on,
    holding its awaiter, for ever without a deadline."""
    a, _b, pb = streamer

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-wfr-aio-cancel")
        try:
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
            stub = pb.StreamerStub(channel)
            for pause in (0.3, 0):  # between two attempts, and before the first
                call = stub.Unary(pb.Chunk(), wait_for_ready=True)
                await asyncio.sleep(pause)
                assert call.cancel() and call.cancelled()

                async def awaited():
                    return await call

                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(awaited(), 5)
                assert await asyncio.wait_for(call.code(), 5) is mrpcd.StatusCode.CANCELLED
            await channel.close()
        finally:
            app.close()

    asyncio.run(main())


def test_aio_channel_closed_or_cancelled_while_it_connects(streamer):
    """close() while the channel's connection is being made (channel_ready(), the first
    call, get_state(try_to_connect=True)): the channel stays SHUTDOWN and takes no call
    (the late connection came back READY on a closed channel, kept for nobody). A
    channel_ready() cancelled midway (asyncio.wait_for's timeout) leaves it IDLE, not
    CONNECTING for ever."""
    _a, _b, pb = streamer

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=1)

    async def body(server, channel):
        app = channel.app
        base = len(app.handle_listeners)
        fresh = mrpcd.aio.insecure_channel(channel.target, app=app)
        ready = asyncio.ensure_future(fresh.channel_ready())
        await asyncio.sleep(0)  # its connect is under way
        assert fresh.get_state() is mrpcd.ChannelConnectivity.CONNECTING
        await fresh.close()
        with pytest.raises(mrpcd.RpcError):
            await asyncio.wait_for(ready, 10)
        assert fresh.get_state() is mrpcd.ChannelConnectivity.SHUTDOWN
        with pytest.raises(mrpcd.RpcError):
            await pb.StreamerStub(fresh).Unary(pb.Chunk(), timeout=5)
        assert len(app.handle_listeners) == base

        other = mrpcd.aio.insecure_channel(channel.target, app=app)
        ready = asyncio.ensure_future(other.channel_ready())
        await asyncio.sleep(0)
        ready.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ready
        assert other.get_state() is mrpcd.ChannelConnectivity.IDLE
        assert (await pb.StreamerStub(other).Unary(pb.Chunk(), timeout=10)).total == 1
        assert other.get_state() is mrpcd.ChannelConnectivity.READY
        await other.close()

    run_aio(streamer, S(), body)


def test_subscribe_racing_a_state_change_ends_on_the_current_state(streamer):
    """subscribe() reads the state for its first notice while another thread changes it:
    the callback's last notice must be the channel's state (its first notice, of the older
    state, came after the newer one: a readiness watcher saw CONNECTING last, with the
    channel READY, and waited for ever)."""
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="compat-subscribe-race")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
        real = channel._notice_lock
        subscriber = threading.get_ident()
        raced: list = []

        class Racing:
            """The notice lock; the subscriber's first entry lets another thread change
            the state first (waiting for it at most 1 s: it may need this very lock)."""

            def __enter__(self):
                if threading.get_ident() == subscriber and not raced:
                    raced.append(True)
                    t = threading.Thread(target=channel._set_state, args=(mrpcd.ChannelConnectivity.CONNECTING,), daemon=True)
                    t.start()
                    t.join(1.0)
                return real.__enter__()

            def __exit__(self, *exc):
                return real.__exit__(*exc)

        channel._notice_lock = Racing()
        seen: list = []
        channel.subscribe(seen.append)
        assert wait_until(lambda: seen and not channel._notifying, 10)  # every notice delivered
        assert seen[-1] is channel._state, (seen, channel._state)
        assert channel._state is mrpcd.ChannelConnectivity.CONNECTING
        channel._notice_lock = real
        channel.close()
    finally:
        app.close()


def test_a_failing_subscriber_is_logged_as_grpc_logs_it_and_the_others_go_on(streamer, caplog):
    """grpc's _deliver: a subscriber that raises is logged (_LOGGER.exception, "Exception
    calling channel subscription callback!"), not swallowed; later notices and the other
    subscribers are not affected. The same for channel_ready_future's done callbacks."""
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="compat-subscriber-raises")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
        seen: list = []

        def broken(state):
            raise RuntimeError(f"subscriber broke on {state}")

        with caplog.at_level("ERROR", logger="mrpcd.channel"):
            channel.subscribe(broken)
            channel.subscribe(seen.append)
            channel._set_state(mrpcd.ChannelConnectivity.CONNECTING)
            assert wait_until(lambda: len(seen) == 2 and not channel._notifying, 10), seen
            records = [r for r in caplog.records if r.name == "mrpcd.channel"]
            assert [r.getMessage() for r in records] == ["Exception calling channel subscription callback!"] * 2
            assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in records)
            channel.unsubscribe(broken)
            channel.close()

            caplog.clear()
            ready = mrpcd.channel_ready_future(mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app))
            ready.add_done_callback(lambda f: 1 / 0)
            assert ready.cancel()
            assert [r.getMessage() for r in caplog.records if r.name == "mrpcd.channel"] == [
                'Exception calling connectivity future "done" callback!']
    finally:
        app.close()


def test_close_drops_subscribers_silently_as_grpc(streamer):
    """grpc's Channel._close starts with _unsubscribe_all: subscribers get no SHUTDOWN
    notice (nor any notice queued before and not delivered yet)."""
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="compat-close-subscribers")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
        seen: list = []
        channel.subscribe(seen.append)
        assert wait_until(lambda: seen == [mrpcd.ChannelConnectivity.IDLE] and not channel._notifying, 10), seen
        channel.close()
        time.sleep(0.2)  # (a notice would come from the notifier thread)
        assert seen == [mrpcd.ChannelConnectivity.IDLE]
        assert channel._subscribers == []
    finally:
        app.close()


def test_unsubscribe_removes_one_subscription_of_the_callback_as_grpc(streamer):
    """grpc's _unsubscribe pops the first registration equal to the callback and stops:
    a callback subscribed twice stays subscribed once. A notice queued before
    unsubscribe() and not yet delivered is not delivered (grpc reads its list then)."""
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="compat-unsubscribe-once")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", app=app)
        seen: list = []
        channel.subscribe(seen.append)
        channel.subscribe(seen.append)
        assert wait_until(lambda: len(seen) == 2 and not channel._notifying, 10), seen
        channel.unsubscribe(seen.append)
        channel.unsubscribe(lambda s: None)  # not subscribed: ignored, as in grpc
        channel._set_state(mrpcd.ChannelConnectivity.CONNECTING)
        assert wait_until(lambda: len(seen) == 3 and not channel._notifying, 10), seen
        time.sleep(0.1)
        assert seen == [mrpcd.ChannelConnectivity.IDLE] * 2 + [mrpcd.ChannelConnectivity.CONNECTING]

        gate = threading.Event()
        held: list = []
        channel.subscribe(lambda s: held.append(s) or gate.wait(5))  # holds the notifier
        assert wait_until(lambda: held, 10)
        channel._set_state(mrpcd.ChannelConnectivity.READY)  # queued behind the held notice
        channel.unsubscribe(seen.append)
        gate.set()
        assert wait_until(lambda: not channel._notifying, 10)
        assert seen == [mrpcd.ChannelConnectivity.IDLE] * 2 + [mrpcd.ChannelConnectivity.CONNECTING]
        assert held == [mrpcd.ChannelConnectivity.CONNECTING, mrpcd.ChannelConnectivity.READY]
        channel.close()
    finally:
        app.close()


def test_closing_the_channel_or_app_ends_wait_for_ready_waits_at_once(streamer):
    """A wait_for_ready call (blocking, .future(), a stream), a channel_ready_future and a
    cancelled .future() waiting for an unreachable target end at once when their channel
    or app closes (or they are cancelled), not at the next attempt up to 1 s later."""
    a, _b, pb = streamer
    port = _free_port()
    for close in ("channel", "app", "cancel"):
        app = mrpcd.connect(a.socket, name=f"compat-wfr-close-now-{close}")
        try:
            channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=app)
            stub = pb.StreamerStub(channel)
            outcome: list = []

            def call():
                try:
                    stub.Unary(pb.Chunk(), timeout=30, wait_for_ready=True)
                except mrpcd.RpcError as exc:
                    outcome.append(exc.code())

            t = threading.Thread(target=call, daemon=True)
            t.start()
            future = stub.Unary.future(pb.Chunk(), wait_for_ready=True)
            stream = stub.ServerStream(pb.Chunk(), timeout=30, wait_for_ready=True)
            ready = mrpcd.channel_ready_future(channel)
            time.sleep(1.8)  # attempts at 0, .05, .15, .35, .75, 1.55, 2.55: each waiter sleeps 1 s now
            started = time.monotonic()
            if close == "cancel":
                assert future.cancel() and ready.cancel()
                assert future.cancelled() and ready.cancelled()
                with pytest.raises(mrpcd.FutureCancelledError):
                    ready.result(timeout=5)
                with pytest.raises(mrpcd.FutureCancelledError):
                    future.result(timeout=5)
                assert time.monotonic() - started < 0.5
                channel.close()
                t.join(10)
                continue
            (channel if close == "channel" else app).close()
            t.join(10)
            # (the app's close ends its calls CANCELLED; a new connect to the daemon fails UNAVAILABLE)
            codes = {mrpcd.StatusCode.CANCELLED} if close == "channel" else {mrpcd.StatusCode.CANCELLED, mrpcd.StatusCode.UNAVAILABLE}
            assert not t.is_alive() and len(outcome) == 1 and outcome[0] in codes, outcome
            assert future.exception(timeout=5).code() in codes
            with pytest.raises(mrpcd.RpcError) as info:
                next(stream)
            assert info.value.code() in codes
            if close == "channel":  # as the calls in flight (grpc's close: CANCELLED "Channel closed!")
                assert future.details() == info.value.details() == "Channel closed!"
            with pytest.raises(mrpcd.RpcError):
                ready.result(timeout=5)
            assert time.monotonic() - started < 0.5, time.monotonic() - started
        finally:
            app.close()


def test_aio_closing_the_channel_or_app_ends_wait_for_ready_waits_at_once(streamer):
    """grpc.aio: close() cancels the calls in flight, a wait_for_ready call waiting for its
    target among them; here they (and channel_ready()) end at once on the channel's or the
    app's close, not at the next attempt up to 1 s later."""
    a, _b, pb = streamer
    port = _free_port()

    async def main(close):
        app = mrpcd.aio.connect(a.socket, name=f"compat-wfr-aio-close-now-{close}")
        try:
            channel = mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=app)
            waiting = asyncio.ensure_future(pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=30, wait_for_ready=True))
            readiness = asyncio.ensure_future(channel.channel_ready())
            await asyncio.sleep(1.8)  # attempts at 0, .05, .15, .35, .75, 1.55, 2.55: each waiter sleeps 1 s now
            loop = asyncio.get_running_loop()
            started = loop.time()
            if close == "channel":
                await channel.close()
            else:
                app.close()
            if close == "channel":  # grpc.aio's close cancels the calls in flight, this one too
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(waiting, 10)
            else:
                with pytest.raises(mrpcd.RpcError):
                    await asyncio.wait_for(waiting, 10)
            with pytest.raises(mrpcd.RpcError):
                await asyncio.wait_for(readiness, 10)
            assert loop.time() - started < 0.5, loop.time() - started
        finally:
            app.close()

    for close in ("channel", "app"):
        asyncio.run(asyncio.wait_for(main(close), 30))


def _service_config(*entries):
    import json

    return [("grpc.service_config", json.dumps({"methodConfig": list(entries)}))]


def test_service_config_timeout_and_wait_for_ready_apply_to_calls(streamer):
    """grpc.service_config's per-method timeout and waitForReady, as grpc applies them: a
    call without its own wait_for_ready takes the config's (False/True given on the call
    wins), its deadline is the sooner of its timeout and the config's; a method's own
    entry beats its service's. Nobody listens: waiting calls end DEADLINE_EXCEEDED."""
    a, _b, pb = streamer
    options = _service_config(
        {"name": [{"service": "mrpc.stream.Streamer"}], "waitForReady": True, "timeout": "1.5s"},
        {"name": [{"service": "mrpc.stream.Streamer", "method": "ServerStream"}], "timeout": "0.2s"},
    )
    app = mrpcd.connect(a.socket, name="compat-service-config")
    try:
        with mrpcd.insecure_channel(f"127.0.0.1:{_free_port()}", options, app=app) as channel:
            stub = pb.StreamerStub(channel)

            def outcome(fn):
                started = time.monotonic()
                with pytest.raises(mrpcd.RpcError) as info:
                    fn()
                return info.value.code(), time.monotonic() - started

            code, took = outcome(lambda: stub.Unary(pb.Chunk()))  # waits (config), ends at the config's 1.5 s
            assert code is mrpcd.StatusCode.DEADLINE_EXCEEDED and 1.4 < took < 8, took
            code, took = outcome(lambda: stub.Unary(pb.Chunk(), timeout=0.1))  # its own, sooner
            assert code is mrpcd.StatusCode.DEADLINE_EXCEEDED and took < 1.2, took
            code, took = outcome(lambda: stub.Unary(pb.Chunk(), timeout=30))  # the config's, sooner
            assert code is mrpcd.StatusCode.DEADLINE_EXCEEDED and 1.4 < took < 8, took
            code, _ = outcome(lambda: stub.Unary(pb.Chunk(), wait_for_ready=False))  # fail fast, as asked
            assert code is mrpcd.StatusCode.UNAVAILABLE
            code, took = outcome(lambda: list(stub.ServerStream(pb.Chunk())))  # its method's entry: fail fast
            assert code is mrpcd.StatusCode.UNAVAILABLE, code
            code, took = outcome(lambda: list(stub.ServerStream(pb.Chunk(), wait_for_ready=True)))  # ... at 0.2 s
            assert code is mrpcd.StatusCode.DEADLINE_EXCEEDED and took < 1.2, took
            code, took = outcome(lambda: pb.StreamerStub(mrpcd.intercept_channel(channel, _header_adder("x", "y"))).Unary(pb.Chunk()))
            assert code is mrpcd.StatusCode.DEADLINE_EXCEEDED, code  # (below the interceptors, as in grpc)
    finally:
        app.close()

    async def main():
        app = mrpcd.aio.connect(a.socket, name="compat-service-config-aio")
        try:
            async with mrpcd.aio.insecure_channel(f"127.0.0.1:{_free_port()}", options, app=app) as channel:
                stub = pb.StreamerStub(channel)
                with pytest.raises(mrpcd.aio.AioRpcError) as info:
                    await stub.Unary(pb.Chunk())
                assert info.value.code() is mrpcd.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(mrpcd.aio.AioRpcError) as info:
                    await stub.Unary(pb.Chunk(), wait_for_ready=False)
                assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
        finally:
            app.close()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("config", [
    "not json", "[]", '{"methodConfig": {}}', '{"methodConfig": [{"name": [{"method": "M"}]}]}',
    '{"methodConfig": [{"name": [{"service": "s"}], "timeout": "1m"}]}',
    '{"methodConfig": [{"name": [{"service": "s"}], "waitForReady": "yes"}]}',
    '{"methodConfig": [{"name": [{"service": "s"}]}, {"name": [{"service": "s"}]}]}',
])
def test_a_malformed_service_config_is_a_clear_error_where_the_channel_is_made(streamer, config):
    a, _b, _pb = streamer
    app = mrpcd.connect(a.socket, name="compat-bad-service-config")
    try:
        with pytest.raises(ValueError, match="grpc.service_config"):
            mrpcd.insecure_channel("127.0.0.1:1", [("grpc.service_config", config)], app=app)
    finally:
        app.close()


def test_failing_call_callbacks_and_request_iterators_are_logged_as_grpc(streamer, caplog):
    """grpc logs a call's callback that raises ("Exception in callback ...", _channel.py's
    event handler) and a request iterator that raises (_LOGGER.exception("Exception
    iterating requests!"), grpc.aio at debug); the call itself ends as before."""
    _a, _b, pb = streamer
    with sync_pair(streamer, _route_servicer(pb)) as (_server, channel):
        stub = pb.StreamerStub(channel)
        ran: list = []
        with caplog.at_level("DEBUG", logger="mrpcd"):
            gate = threading.Event()

            def held():  # the call cannot end before the callbacks are added
                gate.wait(10)
                yield from ()

            stream = stub.BidiStream(held(), timeout=10)
            assert stream.add_callback(lambda: 1 / 0)
            assert stream.add_callback(lambda: ran.append("ran"))
            gate.set()
            assert list(stream) == []
            assert wait_until(lambda: ran == ["ran"], 10)
            assert any(r.name == "mrpcd.channel" and r.levelname == "ERROR" and r.getMessage().startswith("Exception in callback")
                       and "ZeroDivisionError" in r.getMessage() for r in caplog.records), caplog.records

            def requests():
                yield pb.Chunk(seq=1)
                raise ValueError("the iterator broke")

            with pytest.raises(mrpcd.RpcError) as info:
                stub.ClientStream(requests(), timeout=10)
            assert info.value.code() is mrpcd.StatusCode.UNKNOWN
            logged = [r for r in caplog.records if r.getMessage() == "Exception iterating requests!"]
            assert len(logged) == 1 and isinstance(logged[0].exc_info[1], ValueError)

    class S(pb.StreamerServicer):
        async def ClientStream(self, request_iterator, context):
            async for _ in request_iterator:
                pass
            return pb.Summary()

    async def body(server, channel):
        async def requests():
            yield pb.Chunk(seq=1)
            raise ValueError("the async iterator broke")

        caplog.clear()
        with caplog.at_level("DEBUG", logger="mrpcd"):
            with pytest.raises(mrpcd.aio.AioRpcError) as info:  # (grpc.aio: CancelledError; docs/PORTING.md)
                await pb.StreamerStub(channel).ClientStream(requests(), timeout=10)
            assert info.value.code() is mrpcd.StatusCode.UNKNOWN
            assert info.value.details().startswith("Exception iterating requests!")
        logged = [r for r in caplog.records if r.getMessage().startswith("Client request_iterator raised exception")]
        assert len(logged) == 1 and logged[0].levelname == "DEBUG" and isinstance(logged[0].exc_info[1], ValueError)

    run_aio(streamer, S(), body)


def test_aio_abort_raises_grpc_aio_abort_error_and_the_error_classes_exist(streamer):
    """grpc.aio: `await context.abort(...)` raises grpc.aio.AbortError (code that catches
    it around a handler's body and re-raises keeps working); BaseError is the base of
    AbortError, UsageError and InternalError."""
    _a, _b, pb = streamer
    assert all(issubclass(c, mrpcd.aio.BaseError) for c in (mrpcd.aio.AbortError, mrpcd.aio.UsageError, mrpcd.aio.InternalError))
    caught: list = []

    class S(pb.StreamerServicer):
        async def Unary(self, request, context):
            try:
                await context.abort(mrpcd.StatusCode.NOT_FOUND, "no such chunk")
            except mrpcd.aio.AbortError:
                caught.append(True)
                raise

    async def body(server, channel):
        with pytest.raises(mrpcd.aio.AioRpcError) as info:
            await pb.StreamerStub(channel).Unary(pb.Chunk(), timeout=10)
        assert info.value.code() is mrpcd.StatusCode.NOT_FOUND and info.value.details() == "no such chunk"
        assert caught == [True]

    run_aio(streamer, S(), body)
