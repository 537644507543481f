"""Where the app library must behave as grpcio does, checked through two real daemons:
what a caller sees when a message is too big for the ring, when the server stops or the
channel closes with calls in flight, which callbacks run, and how abandoned or cancelled
calls end. The server app is behind daemon B, the client app behind daemon A, both in this
process, on the four-kind Streamer service of tests/protos/streaming.proto."""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

import mrpcd
import mrpcd.aio

from conftest import aio_pair

MIB = 1024 * 1024


@contextlib.contextmanager
def sync_pair(streamer, servicer, **server_kw):
    """(server, stub) with `servicer` served behind daemon B, the stub's app behind A."""
    a, b, pb = streamer
    srv_app = mrpcd.connect(b.socket, name="parity-server")
    cli_app = mrpcd.connect(a.socket, name="parity-client")
    try:
        server = mrpcd.server(app=srv_app, **server_kw)
        pb.add_StreamerServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app)
        yield server, pb.StreamerStub(channel)
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def run_aio(streamer, servicer, body):
    """body(server, stub) with an asyncio server behind daemon B and a client behind A."""
    a, b, pb = streamer

    async def main():
        async with aio_pair(a, b, pb, servicer, name="parity-aio") as (server, channel, _, _):
            return await asyncio.wait_for(body(server, pb.StreamerStub(channel)), 30)

    return asyncio.run(main())


# -- messages bigger than the app's ring ---------------------------------------------------


def test_messages_bigger_than_the_ring_fail_with_resource_exhausted_sync(streamer):
    """The daemon's default max_record (16 MiB) is larger than its default ring (4 MiB): a
    record that can never fit in the ring must be a RESOURCE_EXHAUSTED status, not a
    ValueError from the ring (client) nor a response that never comes (server)."""
    _a, _b, pb = streamer
    big = b"x" * (5 * MIB)

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=len(request.data))

        def ServerStream(self, request, context):
            yield pb.Chunk(data=big)

    with sync_pair(streamer, Servicer()) as (server, stub):
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(data=big), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Sent message larger than max (")
        # the server's response cannot go into its ring: the client hears why, at once
        ch = mrpcd.insecure_channel(stub.Unary._channel.target, options=[("grpc.max_receive_message_length", -1)], app=stub.Unary._channel.app)
        with pytest.raises(mrpcd.RpcError) as info:
            list(pb.StreamerStub(ch).ServerStream(pb.Chunk(), timeout=20))
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value
        assert info.value.details().startswith("Sent message larger than max (")
        assert stub.Unary(pb.Chunk(data=b"ok"), timeout=20).total == 2  # nothing else broke


def test_messages_bigger_than_the_ring_fail_with_resource_exhausted_aio(streamer):
    _a, _b, pb = streamer
    big = b"x" * (5 * MIB)

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=len(request.data))

        async def ServerStream(self, request, context):
            yield pb.Chunk(data=big)

    async def body(server, stub):
        with pytest.raises(mrpcd.RpcError) as info:
            await stub.Unary(pb.Chunk(data=big), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        ch = stub.Unary._channel
        unlimited = mrpcd.aio.insecure_channel(ch.target, options=[("grpc.max_receive_message_length", -1)], app=ch.app)
        with pytest.raises(mrpcd.RpcError) as info:
            [c async for c in pb.StreamerStub(unlimited).ServerStream(pb.Chunk(), timeout=20)]
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value
        assert (await stub.Unary(pb.Chunk(data=b"ok"), timeout=20)).total == 2

    run_aio(streamer, Servicer(), body)


def test_a_response_record_over_the_limit_by_its_header_still_gets_a_status(streamer):
    """A response whose message is under the send limit but whose record (header and
    metadata added) is over the app's max_record never goes into the ring: the call must
    still end, with RESOURCE_EXHAUSTED, for unary and streamed responses, sync and aio."""
    _a, _b, pb = streamer

    def near_limit(context):
        return pb.Chunk(data=b"x" * (context.app_max - 20))  # message < max_record < record

    class Sync(pb.StreamerServicer):
        def import_(self, request, context):
            context.app_max = server.app.max_record
            return near_limit(context)

        def ServerStream(self, request, context):
            context.app_max = server.app.max_record
            yield near_limit(context)

    with sync_pair(streamer, Sync()) as (server, stub):
        ch = stub.Unary._channel
        big_stub = pb.StreamerStub(mrpcd.insecure_channel(ch.target, options=[("grpc.max_receive_message_length", -1)], app=ch.app))
        with pytest.raises(mrpcd.RpcError) as info:
            big_stub.import_(pb.Chunk(), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value
        with pytest.raises(mrpcd.RpcError) as info:
            list(big_stub.ServerStream(pb.Chunk(), timeout=20))
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value

    class Aio(pb.StreamerServicer):
        async def import_(self, request, context):
            context.app_max = aio_server[0].app.max_record
            return near_limit(context)

        async def ServerStream(self, request, context):
            context.app_max = aio_server[0].app.max_record
            yield near_limit(context)

    aio_server: list = []

    async def body(server, stub):
        aio_server.append(server)
        ch = stub.Unary._channel
        big_stub = pb.StreamerStub(mrpcd.aio.insecure_channel(ch.target, options=[("grpc.max_receive_message_length", -1)], app=ch.app))
        with pytest.raises(mrpcd.RpcError) as info:
            await big_stub.import_(pb.Chunk(), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value
        with pytest.raises(mrpcd.RpcError) as info:
            [c async for c in big_stub.ServerStream(pb.Chunk(), timeout=20)]
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value

    run_aio(streamer, Aio(), body)


# -- server stop with calls in flight --------------------------------------------------------


def _until_inactive(context, seconds):
    end = time.monotonic() + seconds
    while context.is_active() and time.monotonic() < end:
        time.sleep(0.01)


def test_server_stop_ends_calls_in_flight_with_unavailable_sync(streamer):
    """grpc's stop(grace): calls still running when the grace ends are cancelled and their
    clients get UNAVAILABLE at once; they must not wait for their deadline."""
    _a, _b, pb = streamer
    started = threading.Semaphore(0)

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            started.release()
            _until_inactive(context, request.seq)
            return pb.Summary(total=request.seq)

        def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            started.release()
            _until_inactive(context, 15)
            yield pb.Chunk(seq=1)

    with sync_pair(streamer, Servicer()) as (server, stub):
        quick = stub.Unary.future(pb.Chunk(seq=0), timeout=20)  # ends within the grace
        assert quick.result(timeout=20).total == 0
        slow = stub.Unary.future(pb.Chunk(seq=15), timeout=20)
        stream = stub.ServerStream(pb.Chunk(), timeout=20)
        assert next(stream).seq == 0
        assert started.acquire(timeout=10) and started.acquire(timeout=10) and started.acquire(timeout=10)
        server.stop(0.2)
        with pytest.raises(mrpcd.RpcError) as info:
            slow.result(timeout=20)
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE, info.value
        with pytest.raises(mrpcd.RpcError) as info:
            next(stream)
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE, info.value
        with pytest.raises(mrpcd.RpcError) as info:  # and a new call is refused
            stub.Unary(pb.Chunk(seq=0), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE


def test_server_stop_ends_calls_in_flight_with_unavailable_aio(streamer):
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            await asyncio.sleep(request.seq)
            return pb.Summary(total=request.seq)

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            await asyncio.sleep(15)
            yield pb.Chunk(seq=1)

    async def body(server, stub):
        slow = stub.Unary(pb.Chunk(seq=15), timeout=20)
        stream = stub.ServerStream(pb.Chunk(), timeout=20)
        assert (await stream.read()).seq == 0
        await asyncio.sleep(0.2)
        await server.stop(0.2)
        with pytest.raises(mrpcd.RpcError) as info:
            await slow
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE, info.value
        with pytest.raises(mrpcd.RpcError) as info:
            await stream.read()
        assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE, info.value

    run_aio(streamer, Servicer(), body)


# -- channel close with calls in flight ------------------------------------------------------


def test_channel_close_cancels_calls_in_flight_sync(streamer):
    """grpc: closing a channel ends its calls in flight with CANCELLED ('Channel closed!')
    at once, and the servers see the cancellation; the calls must not wait for a deadline."""
    _a, _b, pb = streamer
    ended = threading.Semaphore(0)

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            context.add_callback(ended.release)
            _until_inactive(context, 15)
            return pb.Summary()

        def ServerStream(self, request, context):
            context.add_callback(ended.release)
            yield pb.Chunk(seq=0)
            _until_inactive(context, 15)
            yield pb.Chunk(seq=1)

    with sync_pair(streamer, Servicer()) as (server, stub):
        ch = stub.Unary._channel
        other = pb.StreamerStub(mrpcd.insecure_channel(ch.target, app=ch.app))
        fut = stub.Unary.future(pb.Chunk(), timeout=20)
        stream = stub.ServerStream(pb.Chunk(), timeout=20)
        assert next(stream).seq == 0
        bystander = other.ServerStream(pb.Chunk(), timeout=20)  # another channel's call goes on
        assert next(bystander).seq == 0
        ch.close()
        with pytest.raises(mrpcd.RpcError) as info:
            fut.result(timeout=20)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED and info.value.details() == "Channel closed!"
        with pytest.raises(mrpcd.RpcError) as info:
            next(stream)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED
        assert ended.acquire(timeout=10) and ended.acquire(timeout=10)  # the server saw both end
        assert bystander.is_active()
        bystander.cancel()
        with pytest.raises(mrpcd.RpcError):
            stub.Unary(pb.Chunk(), timeout=20)  # a closed channel takes no new calls


def test_channel_close_cancels_calls_in_flight_aio(streamer):
    """grpc.aio: awaiting a call whose channel was closed raises CancelledError at once."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            await asyncio.sleep(15)
            return pb.Summary()

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=0)
            await asyncio.sleep(15)
            yield pb.Chunk(seq=1)

    async def body(server, stub):
        ch = stub.Unary._channel
        unary = stub.Unary(pb.Chunk(), timeout=20)
        stream = stub.ServerStream(pb.Chunk(), timeout=20)
        assert (await stream.read()).seq == 0
        await ch.close()
        with pytest.raises(asyncio.CancelledError):
            await unary
        assert await unary.code() is mrpcd.StatusCode.CANCELLED
        with pytest.raises(asyncio.CancelledError):
            await stream.read()
        with pytest.raises(mrpcd.RpcError):
            await stub.Unary(pb.Chunk(), timeout=20)  # a closed channel takes no new calls
        for _ in range(200):  # the server saw both calls end
            if not server._calls:
                break
            await asyncio.sleep(0.05)
        assert not server._calls

    run_aio(streamer, Servicer(), body)


# -- server-side callbacks ------------------------------------------------------------------


def test_server_callbacks_run_when_the_call_ends_whatever_the_outcome_sync(streamer):
    """grpc's context.add_callback: 'called on RPC termination', not only on cancellation
    (code that releases a resource there would leak on every successful call)."""
    _a, _b, pb = streamer
    ran: list = []
    done = threading.Semaphore(0)

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            assert context.add_callback(lambda: (ran.append(("unary", request.seq)), done.release()))
            if request.seq == 1:
                raise ValueError("boom")
            if request.seq == 2:
                context.abort(mrpcd.StatusCode.NOT_FOUND, "nope")
            return pb.Summary(total=request.seq)

        def ServerStream(self, request, context):
            context.add_callback(lambda: (ran.append(("stream", request.seq)), done.release()))
            yield pb.Chunk(seq=1)

        def ClientStream(self, request_iterator, context):
            context.add_callback(lambda: (ran.append(("client-stream", 0)), done.release()))
            return pb.Summary(total=sum(c.seq for c in request_iterator))

    with sync_pair(streamer, Servicer()) as (server, stub):
        assert stub.Unary(pb.Chunk(seq=0), timeout=20).total == 0
        for seq in (1, 2):
            with pytest.raises(mrpcd.RpcError):
                stub.Unary(pb.Chunk(seq=seq), timeout=20)
        assert [c.seq for c in stub.ServerStream(pb.Chunk(seq=5), timeout=20)] == [1]
        assert stub.ClientStream(iter([pb.Chunk(seq=3)]), timeout=20).total == 3
        for _ in range(5):
            assert done.acquire(timeout=10), ran
        assert sorted(ran) == [("client-stream", 0), ("stream", 5), ("unary", 0), ("unary", 1), ("unary", 2)]


def test_server_done_callbacks_run_when_the_call_ends_whatever_the_outcome_aio(streamer):
    """grpc.aio's context.add_done_callback runs on termination, given the context."""
    _a, _b, pb = streamer
    ran: list = []

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            context.add_done_callback(lambda ctx: ran.append(("unary", request.seq, ctx is context)))
            if request.seq == 1:
                raise ValueError("boom")
            return pb.Summary(total=request.seq)

        async def ServerStream(self, request, context):
            context.add_done_callback(lambda ctx: ran.append(("stream", request.seq, ctx is context)))
            yield pb.Chunk(seq=1)

    async def body(server, stub):
        assert (await stub.Unary(pb.Chunk(seq=0), timeout=20)).total == 0
        with pytest.raises(mrpcd.RpcError):
            await stub.Unary(pb.Chunk(seq=1), timeout=20)
        assert [c.seq async for c in stub.ServerStream(pb.Chunk(seq=5), timeout=20)] == [1]
        for _ in range(100):
            if len(ran) == 3:
                break
            await asyncio.sleep(0.05)
        assert sorted(ran) == [("stream", 5, True), ("unary", 0, True), ("unary", 1, True)]

    run_aio(streamer, Servicer(), body)


# -- calls the application dropped -----------------------------------------------------------


def test_an_abandoned_response_stream_is_cancelled_sync(streamer):
    """grpc cancels a call whose rendezvous is garbage collected while it runs: a response
    iterator left midway (break out of the loop, no deadline) must not keep the server's
    handler streaming, nor the call registered in the client app, forever."""
    import gc

    _a, _b, pb = streamer
    ended = threading.Event()

    class Servicer(pb.StreamerServicer):
        def ServerStream(self, request, context):
            context.add_callback(ended.set)
            for i in range(100_000):
                if not context.is_active():
                    return
                yield pb.Chunk(seq=i)

    with sync_pair(streamer, Servicer()) as (server, stub):
        app = stub.ServerStream._channel.app

        def read_a_few():
            for chunk in stub.ServerStream(pb.Chunk()):
                if chunk.seq == 3:
                    break

        read_a_few()
        gc.collect()
        assert ended.wait(10)
        assert not [k for k in app.calls if k[0] == stub.ServerStream._channel._handle]


def test_an_abandoned_response_stream_is_cancelled_aio(streamer):
    import gc

    _a, _b, pb = streamer
    ended = asyncio.Event()

    class Servicer(pb.StreamerServicer):
        async def ServerStream(self, request, context):
            context.add_done_callback(lambda ctx: ended.set())
            for i in range(100_000):
                yield pb.Chunk(seq=i)

    async def body(server, stub):
        async def read_a_few():
            call = stub.ServerStream(pb.Chunk())
            async for chunk in call:
                if chunk.seq == 3:
                    break

        await read_a_few()
        gc.collect()
        await asyncio.wait_for(ended.wait(), 10)

    run_aio(streamer, Servicer(), body)


# -- the Future surface ------------------------------------------------------------------------


def test_a_cancelled_future_raises_future_cancelled_error_and_a_timeout_future_timeout_error(streamer):
    """grpc.Future: result()/exception() of a cancelled future raise FutureCancelledError,
    a result(timeout) that runs out raises FutureTimeoutError; both names exist as in grpc
    (and stay concurrent.futures' CancelledError / TimeoutError)."""
    import concurrent.futures

    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            _until_inactive(context, request.seq)
            return pb.Summary(total=request.seq)

    assert issubclass(mrpcd.FutureCancelledError, concurrent.futures.CancelledError)
    assert issubclass(mrpcd.FutureTimeoutError, concurrent.futures.TimeoutError)
    with sync_pair(streamer, Servicer()) as (server, stub):
        fut = stub.Unary.future(pb.Chunk(seq=15), timeout=20)
        with pytest.raises(mrpcd.FutureTimeoutError):
            fut.result(timeout=0.05)
        assert fut.cancel() and fut.cancelled() and fut.done()
        with pytest.raises(mrpcd.FutureCancelledError):
            fut.result()
        with pytest.raises(mrpcd.FutureCancelledError):
            fut.exception()
        assert fut.code() is mrpcd.StatusCode.CANCELLED
        fut = stub.Unary.future(pb.Chunk(seq=0), timeout=20)
        assert fut.result().total == 0 and fut.exception() is None and not fut.cancel()


def test_a_unary_call_with_no_request_fails_at_the_caller(streamer):
    """stub.M(None) is an encoding error at the caller (grpc: 'Exception serializing
    request!'), not a call without a message that the server fails with an empty
    'Exception calling application: '."""
    _a, _b, pb = streamer
    handled: list = []

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            handled.append(request)
            return pb.Summary()

    with sync_pair(streamer, Servicer()) as (server, stub):
        for call in (lambda: stub.Unary(None, timeout=20), lambda: stub.Unary.future(None, timeout=20).result(),
                     lambda: list(stub.ServerStream(None, timeout=20))):
            with pytest.raises(Exception) as info:
                call()
            assert "Exception calling application" not in str(info.value)
            assert "NoneType" in str(info.value), info.value
        assert stub.Unary(pb.Chunk(), timeout=20) is not None and len(handled) == 1

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            handled.append(request)
            return pb.Summary()

    async def body(server, stub):
        with pytest.raises(Exception) as info:
            await stub.Unary(None, timeout=20)
        assert "NoneType" in str(info.value), info.value
        assert await stub.Unary(pb.Chunk(), timeout=20) is not None and len(handled) == 2

    run_aio(streamer, Aio(), body)


def test_aio_call_that_cannot_start_is_a_failed_call_with_aio_rpc_error(streamer):
    """grpc.aio: a call to an address nobody serves fails with AioRpcError (UNAVAILABLE),
    and its code() / details() answer; code written as 'except grpc.aio.AioRpcError' must
    catch it."""
    a, _b, pb = streamer

    async def main():
        app = mrpcd.aio.connect(a.socket, name="parity-nowhere")
        try:
            stub = pb.StreamerStub(mrpcd.aio.insecure_channel("127.0.0.1:1", app=app))
            call = stub.Unary(pb.Chunk(), timeout=20)
            with pytest.raises(mrpcd.aio.AioRpcError) as info:
                await call
            assert info.value.code() is mrpcd.StatusCode.UNAVAILABLE
            assert await call.code() is mrpcd.StatusCode.UNAVAILABLE
            assert "127.0.0.1:1" in await call.details()
            assert await call.trailing_metadata() == ()
            with pytest.raises(mrpcd.aio.AioRpcError):  # grpc.aio: 'raises aio.AioRpcError if failed'
                await stub.Unary(pb.Chunk(), timeout=20).wait_for_connection()
            stream = stub.ServerStream(pb.Chunk(), timeout=20)
            with pytest.raises(mrpcd.aio.AioRpcError):
                await stream.read()
            with pytest.raises(mrpcd.aio.AioRpcError):
                await stub.ClientStream(iter([pb.Chunk()]), timeout=20)
            assert not app.calls
        finally:
            app.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_server_stop_with_grace_returns_at_once_and_wait_for_termination_says_if_it_timed_out(streamer):
    """grpc: stop(grace) returns at once (an Event set once the server has stopped), so a
    handler may stop its own server ('shutdown' RPC) and still answer; wait_for_termination
    returns True when its timeout ran out, False once the server terminated."""
    _a, _b, pb = streamer
    release = threading.Event()

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:  # an admin "shutdown" call
                context.stopped = server_box[0].stop(10)
                return pb.Summary(total=1)
            release.wait(15)
            return pb.Summary(total=2)

    server_box: list = []
    with sync_pair(streamer, Servicer()) as (server, stub):
        server_box.append(server)
        assert server.wait_for_termination(timeout=0.01) is True  # timed out: still serving
        slow = stub.Unary.future(pb.Chunk(seq=2), timeout=20)
        assert stub.Unary(pb.Chunk(seq=1), timeout=20).total == 1  # answered, not cancelled
        assert server.wait_for_termination(timeout=0.01) is True  # the slow call keeps it in its grace
        release.set()
        assert slow.result(timeout=20).total == 2  # finished within the grace
        assert server.wait_for_termination(timeout=10) is False


def test_aio_wait_for_termination_says_if_it_timed_out(streamer):
    """grpc.aio: wait_for_termination returns True when its timeout ran out, False once
    the server has stopped (after the grace of stop(), not at its start)."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            await asyncio.sleep(request.seq)
            return pb.Summary(total=request.seq)

    async def body(server, stub):
        assert await server.wait_for_termination(timeout=0.01) is True
        call = stub.Unary(pb.Chunk(seq=1), timeout=20)
        await asyncio.sleep(0.1)
        stopping = asyncio.ensure_future(server.stop(10))
        assert await server.wait_for_termination(timeout=0.01) is True  # the call is in its grace
        assert (await call).total == 1
        assert await server.wait_for_termination(timeout=10) is False
        await stopping

    run_aio(streamer, Servicer(), body)


def test_a_cancelled_request_stream_raises_rpc_error_in_the_handler(streamer):
    """grpc: when the client cancels, the handler's request iterator raises grpc.RpcError
    (handlers catch it to clean up), not a library-private exception."""
    _a, _b, pb = streamer
    seen: list = []
    got_one = threading.Event()
    done = threading.Event()

    class Servicer(pb.StreamerServicer):
        def ClientStream(self, request_iterator, context):
            try:
                for _chunk in request_iterator:
                    got_one.set()
            except mrpcd.RpcError as exc:
                seen.append(exc.code())
                raise
            finally:
                done.set()
            return pb.Summary()

    with sync_pair(streamer, Servicer()) as (server, stub):
        gate = threading.Event()

        def requests():
            yield pb.Chunk(seq=1)
            gate.wait(15)

        fut = stub.ClientStream.future(requests(), timeout=20)
        assert got_one.wait(10)
        fut.cancel()
        assert done.wait(10)
        gate.set()
        assert seen == [mrpcd.StatusCode.CANCELLED]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_channel_ready_future_and_aio_channel_ready(streamer):
    """grpc.channel_ready_future(channel) / grpc.aio Channel.channel_ready(): wait until the
    channel connects, waiting on while nobody serves the target yet."""
    a, b, pb = streamer
    port = _free_port()
    cli_app = mrpcd.connect(a.socket, name="parity-ready")
    srv_app = mrpcd.connect(b.socket, name="parity-ready-server")
    try:
        channel = mrpcd.insecure_channel(f"127.0.0.1:{port}", app=cli_app)
        ready = mrpcd.channel_ready_future(channel)
        with pytest.raises(mrpcd.FutureTimeoutError):
            ready.result(timeout=0.2)
        assert not ready.done()
        seen: list = []
        ready.add_done_callback(seen.append)
        server = mrpcd.server(app=srv_app)
        pb.add_StreamerServicer_to_server(pb.StreamerServicer(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        assert ready.result(timeout=15) is None and ready.done() and seen == [ready]
        bad = mrpcd.channel_ready_future(mrpcd.insecure_channel("no-port-here", app=cli_app))
        with pytest.raises(mrpcd.RpcError):
            bad.result(timeout=15)
        never = mrpcd.channel_ready_future(mrpcd.insecure_channel("127.0.0.1:1", app=cli_app))
        assert never.cancel() and never.cancelled()
        with pytest.raises(mrpcd.FutureCancelledError):
            never.result()

        async def aio_ready():
            app = mrpcd.aio.connect(a.socket, name="parity-aio-ready")
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(mrpcd.aio.insecure_channel("127.0.0.1:1", app=app).channel_ready(), 0.2)
                await asyncio.wait_for(mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=app).channel_ready(), 15)
            finally:
                app.close()

        asyncio.run(aio_ready())
        server.stop(None)
    finally:
        cli_app.close()
        srv_app.close()


def test_status_and_metadata_over_the_metadata_limit_still_end_the_call(streamer):
    """Details, or trailing metadata + details, too big for one record (MAX_META) made the
    server's answer fail to build, after which nothing was sent: the client waited for its
    deadline. grpc ends such a call with RESOURCE_EXHAUSTED; so must mrpcd, sync and aio."""
    _a, _b, pb = streamer
    half = "x" * 40_000  # trailing metadata and details each under MAX_META (64 KiB), together over it

    class Sync(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:
                context.abort(mrpcd.StatusCode.INTERNAL, "d" * 100_000)
            if request.seq == 2:
                context.set_code(mrpcd.StatusCode.NOT_FOUND)
                context.set_details("d" * 100_000)
                return None
            context.set_trailing_metadata([("t", half)])
            context.abort(mrpcd.StatusCode.INTERNAL, half)

        def ServerStream(self, request, context):
            context.set_trailing_metadata([("t", half)])
            yield pb.Chunk(seq=1)
            context.set_code(mrpcd.StatusCode.NOT_FOUND)
            context.set_details(half)

    with sync_pair(streamer, Sync()) as (server, stub):
        for seq in (1, 2, 3):
            with pytest.raises(mrpcd.RpcError) as info:
                stub.Unary(pb.Chunk(seq=seq), timeout=20)
            assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, (seq, info.value)
        with pytest.raises(mrpcd.RpcError) as info:
            list(stub.ServerStream(pb.Chunk(), timeout=20))
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, info.value

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            if request.seq == 1:
                await context.abort(mrpcd.StatusCode.INTERNAL, "d" * 100_000)
            context.set_trailing_metadata([("t", half)])
            await context.abort(mrpcd.StatusCode.INTERNAL, half)

    async def body(server, stub):
        for seq in (1, 3):
            with pytest.raises(mrpcd.RpcError) as info:
                await stub.Unary(pb.Chunk(seq=seq), timeout=20)
            assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED, (seq, info.value)

    run_aio(streamer, Aio(), body)


def test_server_context_cancel_ends_the_call_for_the_client_too(streamer):
    """grpc's ServicerContext.cancel(): the client sees CANCELLED at once (it waited for
    its deadline: the cancel only reached the handler)."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            context.cancel()
            assert not context.is_active()
            return pb.Summary(total=1)

        def ServerStream(self, request, context):
            yield pb.Chunk(seq=1)
            context.cancel()
            yield pb.Chunk(seq=2)

    with sync_pair(streamer, Servicer()) as (server, stub):
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(), timeout=20)
        assert info.value.code() is mrpcd.StatusCode.CANCELLED, info.value
        with pytest.raises(mrpcd.RpcError) as info:
            list(stub.ServerStream(pb.Chunk(), timeout=20))
        assert info.value.code() is mrpcd.StatusCode.CANCELLED, info.value


# -- channels the application dropped --------------------------------------------------------


def _connections(daemon) -> int:
    """TCP sockets the daemon process holds (its peer connections and listeners)."""
    import os

    n = 0
    for fd in os.listdir(f"/proc/{daemon.pid}/fd"):
        try:
            if os.readlink(f"/proc/{daemon.pid}/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


def test_a_dropped_channel_closes_its_connection_once_its_calls_end(streamer):
    """Channels made per request and dropped without close() (stub = Stub(insecure_channel
    (...)) in a function) each kept a daemon-to-daemon connection until the app exited:
    sockets piled up in both daemons. grpc frees a channel's connection once nothing uses
    it; a call still running on a dropped channel goes on until it ends."""
    import gc

    a, _b, pb = streamer
    release = threading.Event()

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:
                release.wait(15)
            return pb.Summary(total=request.seq)

    with sync_pair(streamer, Servicer()) as (server, stub):
        target, app = stub.Unary._channel.target, stub.Unary._channel.app
        assert stub.Unary(pb.Chunk(), timeout=20).total == 0
        before = _connections(a)
        for _ in range(20):
            assert pb.StreamerStub(mrpcd.insecure_channel(target, app=app)).Unary(pb.Chunk(), timeout=20).total == 0
        fut = pb.StreamerStub(mrpcd.insecure_channel(target, app=app)).Unary.future(pb.Chunk(seq=1), timeout=20)
        gc.collect()
        deadline = time.monotonic() + 10
        while _connections(a) > before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _connections(a) <= before + 1  # only the channel of the call still running
        assert not fut.done()
        release.set()
        assert fut.result(timeout=20).total == 1  # it was not cut short
        deadline = time.monotonic() + 10
        while _connections(a) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _connections(a) <= before


def test_a_dropped_aio_channel_closes_its_connection(streamer):
    import gc

    a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    async def body(server, stub):
        target, app = stub.Unary._channel.target, stub.Unary._channel.app
        assert (await stub.Unary(pb.Chunk(), timeout=20)).total == 0
        before = _connections(a)
        for _ in range(20):
            assert (await pb.StreamerStub(mrpcd.aio.insecure_channel(target, app=app)).Unary(pb.Chunk(), timeout=20)).total == 0
        gc.collect()
        for _ in range(200):
            if _connections(a) <= before:
                break
            await asyncio.sleep(0.05)
        assert _connections(a) <= before

    run_aio(streamer, Servicer(), body)


def test_a_handler_exception_is_logged_with_its_traceback(streamer, caplog):
    """grpc logs a handler's exception ('Exception calling application') with its
    traceback; the client sees only UNKNOWN, so without it the server leaves no trace.
    An abort is no error and is not logged."""
    import logging

    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            if request.seq == 1:
                context.abort(mrpcd.StatusCode.NOT_FOUND, "nope")
            raise ZeroDivisionError("sync handler bug")

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            raise KeyError("aio handler bug")

    caplog.set_level(logging.ERROR, logger="mrpcd.server")
    with sync_pair(streamer, Servicer()) as (server, stub):
        for seq in (0, 1):
            with pytest.raises(mrpcd.RpcError):
                stub.Unary(pb.Chunk(seq=seq), timeout=20)

    async def body(server, stub):
        with pytest.raises(mrpcd.RpcError):
            await stub.Unary(pb.Chunk(), timeout=20)

    run_aio(streamer, Aio(), body)
    logged = [r for r in caplog.records if r.name == "mrpcd.server"]
    assert [type(r.exc_info[1]).__name__ for r in logged] == ["ZeroDivisionError", "KeyError"]
    assert all("Exception calling application /mrpc.stream.Streamer/Unary" in r.getMessage() for r in logged)


def test_huge_and_infinite_timeouts_work_and_nan_is_a_clear_error(streamer):
    """timeout=float('inf') or 1e15 s raised OverflowError / the record's RecordError at
    the caller: such a deadline is as good as none. NaN is a clear ValueError."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=int(context.time_remaining() > 1e6))

        def ServerStream(self, request, context):
            yield pb.Chunk(seq=1)

    with sync_pair(streamer, Servicer()) as (server, stub):
        for t in (1e10, 1e15, float("inf")):
            assert stub.Unary(pb.Chunk(), timeout=t).total == 1
            assert stub.Unary.future(pb.Chunk(), timeout=t).result().total == 1
            assert [c.seq for c in stub.ServerStream(pb.Chunk(), timeout=t)] == [1]
        with pytest.raises(ValueError, match="NaN"):
            stub.Unary(pb.Chunk(), timeout=float("nan"))
        # a timeout that is not a number says so ("'<=' not supported between 'str' and 'int'" before)
        for call in (lambda: stub.Unary(pb.Chunk(), timeout="5"), lambda: list(stub.ServerStream(pb.Chunk(), timeout="5"))):
            with pytest.raises(TypeError, match="^timeout must be a number of seconds or None, got str$"):
                call()

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=int(context.time_remaining() > 1e6))

    async def body(server, stub):
        for t in (1e10, float("inf")):
            assert (await stub.Unary(pb.Chunk(), timeout=t)).total == 1

    run_aio(streamer, Aio(), body)


def test_aio_unary_call_awaited_twice_gives_its_response_twice(streamer):
    """grpc.aio: awaiting a call again gives the same response. An interceptor that awaits
    the call (to log it) and returns it makes the application's await the second one: it
    raised AioRpcError with code OK."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

        async def ClientStream(self, request_iterator, context):
            return pb.Summary(total=sum([c.seq async for c in request_iterator]))

    class Logs(mrpcd.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            call = await continuation(details, request)
            await call  # e.g. to log the response
            return call

    async def body(server, stub):
        call = stub.Unary(pb.Chunk(seq=4), timeout=20)
        assert (await call).total == 4 and (await call).total == 4
        call = stub.Unary(pb.Chunk(seq=5), timeout=20)
        both = await asyncio.gather(call, call)
        assert [r.total for r in both] == [5, 5]
        call = stub.ClientStream(timeout=20)
        await call.write(pb.Chunk(seq=2))
        await call.done_writing()
        assert (await call).total == 2 and (await call).total == 2
        ch = stub.Unary._channel
        logged = pb.StreamerStub(mrpcd.aio.insecure_channel(ch.target, app=ch.app, interceptors=[Logs()]))
        assert (await logged.Unary(pb.Chunk(seq=6), timeout=20)).total == 6

    run_aio(streamer, Servicer(), body)


def test_aio_intercepted_calls_have_the_whole_call_surface(streamer):
    """grpc.aio's intercepted calls have add_done_callback, time_remaining and
    wait_for_connection (mrpcd's raised AttributeError), and done()/cancel() of a call
    whose interceptor raised answer instead of raising the interceptor's error."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

        async def ServerStream(self, request, context):
            yield pb.Chunk(seq=1)

    class Pass(mrpcd.aio.UnaryUnaryClientInterceptor, mrpcd.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            if request.seq < 0:
                raise mrpcd.aio.AioRpcError(mrpcd.StatusCode.INVALID_ARGUMENT, "refused")
            return await continuation(details, request)

        intercept_unary_stream = intercept_unary_unary

    async def body(server, stub):
        ch = stub.Unary._channel
        istub = pb.StreamerStub(mrpcd.aio.insecure_channel(ch.target, app=ch.app, interceptors=[Pass()]))
        ended: list = []
        call = istub.Unary(pb.Chunk(seq=3), timeout=20)
        call.add_done_callback(ended.append)
        await call.wait_for_connection()
        assert 0 < call.time_remaining() <= 20
        assert (await call).total == 3
        stream = istub.ServerStream(pb.Chunk(seq=1), timeout=20)
        stream.add_done_callback(ended.append)
        assert [c.seq async for c in stream] == [1]
        refused = istub.Unary(pb.Chunk(seq=-1), timeout=20)
        with pytest.raises(mrpcd.aio.AioRpcError):
            await refused
        assert refused.done() and not refused.cancel()
        for _ in range(100):
            if len(ended) == 2:
                break
            await asyncio.sleep(0.02)
        assert ended == [call, stream]

    run_aio(streamer, Servicer(), body)


def test_servicer_context_has_grpcs_security_and_compression_methods(streamer):
    """Handlers ported from grpc call context.set_compression(), auth_context(),
    peer_identities()... (AttributeError: UNKNOWN for every call); grpc.aio's context has
    abort_with_status too."""
    import collections

    _a, _b, pb = streamer
    Status = collections.namedtuple("Status", "code details trailing_metadata")

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            context.set_compression(None)
            context.disable_next_message_compression()
            assert context.auth_context() == {} and context.peer_identities() is None and context.peer_identity_key() is None
            return pb.Summary(total=1)

    with sync_pair(streamer, Servicer()) as (server, stub):
        assert stub.Unary(pb.Chunk(), timeout=20).total == 1

    class Aio(pb.StreamerServicer):
        async def Unary(self, request, context):
            context.set_compression(None)
            assert context.auth_context() == {} and context.peer_identities() is None
            if request.seq:
                await context.abort_with_status(Status(mrpcd.StatusCode.NOT_FOUND, "gone", (("x-why", "y"),)))
            return pb.Summary(total=1)

    async def body(server, stub):
        assert (await stub.Unary(pb.Chunk(), timeout=20)).total == 1
        call = stub.Unary(pb.Chunk(seq=1), timeout=20)
        with pytest.raises(mrpcd.RpcError) as info:
            await call
        assert info.value.code() is mrpcd.StatusCode.NOT_FOUND and info.value.details() == "gone"
        assert dict(await call.trailing_metadata()) == {"x-why": "y"}

    run_aio(streamer, Aio(), body)


def test_metadata_items_have_key_and_value_as_in_grpc(streamer):
    """grpc hands metadata out as tuples of _Metadatum (key, value) with .key / .value;
    code reading m.key failed with AttributeError. They stay equal to plain pairs."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        def Unary(self, request, context):
            keys = [m.key for m in context.invocation_metadata() if m.key.startswith("x-")]
            context.send_initial_metadata([("i", "1")])
            context.set_trailing_metadata([("t-bin", b"\x00")])
            assert context.trailing_metadata()[0].value == b"\x00"
            if request.seq:
                context.abort(mrpcd.StatusCode.NOT_FOUND, "no")
            return pb.Summary(total=len(keys))

    class Keys(mrpcd.ServerInterceptor):
        def intercept_service(self, continuation, details):
            assert [m.value for m in details.invocation_metadata if m.key == "x-a"] == ["1"]
            return continuation(details)

    with sync_pair(streamer, Servicer(), interceptors=[Keys()]) as (server, stub):
        reply, call = stub.Unary.with_call(pb.Chunk(), metadata=[("x-a", "1")], timeout=20)
        assert reply.total == 1
        assert call.initial_metadata()[0].key == "i" and call.initial_metadata() == (("i", "1"),)
        assert call.trailing_metadata()[0].value == b"\x00"
        with pytest.raises(mrpcd.RpcError) as info:
            stub.Unary(pb.Chunk(seq=1), metadata=[("x-a", "1")], timeout=20)
        assert info.value.trailing_metadata()[0].key == "t-bin"


def test_aio_channel_close_with_grace_lets_calls_finish_first(streamer):
    """grpc.aio close(grace): calls that end within the grace end normally."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            await asyncio.sleep(0.2)
            return pb.Summary(total=request.seq)

    async def body(server, stub):
        ch = stub.Unary._channel
        own = mrpcd.aio.insecure_channel(ch.target, app=ch.app)
        call = pb.StreamerStub(own).Unary(pb.Chunk(seq=7), timeout=20)
        await call.wait_for_connection()
        await own.close(grace=15)
        assert (await call).total == 7

    run_aio(streamer, Servicer(), body)


def test_aio_channel_made_before_the_loop_runs(streamer, monkeypatch):
    """grpc.aio lets a channel (and its stub) be made before the event loop runs (module
    level, an object's __init__); mrpcd's raised RuntimeError('no running event loop')."""
    a, b, pb = streamer
    monkeypatch.setenv("MRPCD_SOCKET", a.socket)

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=request.seq)

    with pytest.raises(ValueError):  # a bad option is still an error where it is given
        mrpcd.aio.insecure_channel("127.0.0.1:1", options=[("grpc.max_send_message_length", "x")])
    channel = mrpcd.aio.insecure_channel("127.0.0.1:0")  # no loop runs here
    stub = pb.StreamerStub(channel)

    async def main():
        srv_app = mrpcd.aio.connect(b.socket, name="parity-early-server")
        try:
            server = mrpcd.aio.server(app=srv_app)
            pb.add_StreamerServicer_to_server(Servicer(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            channel.target = f"127.0.0.1:{port}"  # (the port is known only now; not yet connected)
            assert (await stub.Unary(pb.Chunk(seq=9), timeout=20)).total == 9
            await channel.close()
            channel.app.close()
            await server.stop(None)
        finally:
            srv_app.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_grpc_aio_type_names_name_the_call_objects(streamer):
    """grpc.aio.UnaryUnaryCall / UnaryStreamCall / StreamUnaryCall / StreamStreamCall / Call
    and the multi-callable classes: ported code annotates with them or checks isinstance;
    mrpcd.aio lacked most of them (AttributeError at import of such code)."""
    _a, _b, pb = streamer

    class Servicer(pb.StreamerServicer):
        async def Unary(self, request, context):
            return pb.Summary(total=1)

        async def ServerStream(self, request, context):
            yield pb.Chunk()

        async def ClientStream(self, request_iterator, context):
            return pb.Summary()

        async def BidiStream(self, request_iterator, context):
            async for _ in request_iterator:
                pass
            return
            yield

    async def body(server, stub):
        unary = stub.Unary(pb.Chunk())
        stream = stub.ServerStream(pb.Chunk())
        client_stream = stub.ClientStream(iter([pb.Chunk()]))
        bidi = stub.BidiStream(iter([]))
        assert isinstance(unary, mrpcd.aio.UnaryUnaryCall) and isinstance(unary, mrpcd.aio.Call)
        assert isinstance(stream, mrpcd.aio.UnaryStreamCall) and isinstance(stream, mrpcd.aio.Call)
        assert isinstance(client_stream, mrpcd.aio.StreamUnaryCall) and isinstance(bidi, mrpcd.aio.StreamStreamCall)
        assert isinstance(stub.Unary, mrpcd.aio.UnaryUnaryMultiCallable)
        assert isinstance(stub.ServerStream, mrpcd.aio.UnaryStreamMultiCallable)
        assert isinstance(stub.ClientStream, mrpcd.aio.StreamUnaryMultiCallable)
        assert isinstance(stub.BidiStream, mrpcd.aio.StreamStreamMultiCallable)
        assert (await unary).total == 1
        assert [c async for c in stream] == [pb.Chunk()]
        for call in (client_stream, bidi):
            call.cancel()
        mrpcd.aio.init_grpc_aio()
        mrpcd.aio.shutdown_grpc_aio()

    run_aio(streamer, Servicer(), body)
