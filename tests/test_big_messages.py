"""Big messages through real daemons, on the app library's one-copy paths.

Send: a generated message's big `bytes` fields go by reference (marshal/_pack.Parts) and are
gathered straight into the tx ring. Receive: records of at least app.RX_BIG_MIN bytes stay in
the rx ring and are decoded from there (marshal/_ringio.RingRecord) before the batch is
released. Both must be invisible to applications: every call kind, sync and asyncio, byte-exact
payloads around the thresholds and well above them, the same statuses for decode errors and
size limits, interceptors, grpc-style (de)serializers, many calls at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

import mrpcd
import mrpcd.aio
from mrpcd import app as appmod
from mrpcd.marshal import _pack, codec

KIB, MIB = 1024, 1024 * 1024
# record = 40-byte header + metadata + payload; payload = msgpack array around the bytes field
SIZES = [100, appmod.RX_BIG_MIN - 200, appmod.RX_BIG_MIN - 60, appmod.RX_BIG_MIN, codec.PARTS_MIN + 1,
         64 * KIB, 200 * KIB, 1 * MIB, 3 * MIB]


def blob(n: int, seed: int = 0) -> bytes:
    """n pseudo-random bytes (a corrupted or shifted copy would not match)."""
    return (zlib.crc32(bytes([seed & 0xFF])).to_bytes(4, "little") + os.urandom(n))[:n] if n else b""


def digest(data: bytes) -> int:
    return (len(data) << 32) | zlib.crc32(data)


@pytest.fixture(scope="module")
def env(streamer):
    """Two daemons and the Streamer stubs: (daemon a, daemon b, streaming_mrpc)."""
    return streamer


def _sync_servicer(pb):
    class Echo(pb.StreamerServicer):
        def Unary(self, request, context):
            return pb.Summary(total=digest(request.data))

        def ServerStream(self, request, context):
            for i in range(request.seq):
                yield pb.Chunk(data=request.data, seq=i)

        def ClientStream(self, request_iterator, context):
            return pb.Summary(total=sum(digest(c.data) for c in request_iterator) & ((1 << 63) - 1))

        def BidiStream(self, request_iterator, context):
            for c in request_iterator:
                yield pb.Chunk(data=c.data, seq=c.seq)

    return Echo()


def _aio_servicer(pb):
    sync = _sync_servicer(pb)

    class Echo(pb.StreamerServicer):
        async def Unary(self, request, context):
            return sync.Unary(request, context)

        async def ServerStream(self, request, context):
            for c in sync.ServerStream(request, context):
                yield c

        async def ClientStream(self, request_iterator, context):
            total = 0
            async for c in request_iterator:
                total += digest(c.data)
            return pb.Summary(total=total & ((1 << 63) - 1))

        async def BidiStream(self, request_iterator, context):
            async for c in request_iterator:
                yield pb.Chunk(data=c.data, seq=c.seq)

    return Echo()


class SyncEnv:
    """A sync server (behind daemon b) and a client app (behind daemon a), in this process."""

    def __init__(self, env, interceptors=(), options=None, client_options=None, handlers=None) -> None:
        a, b, pb = env
        self.pb = pb
        self.srv_app = mrpcd.connect(b.socket, name="big-server")
        self.cli_app = mrpcd.connect(a.socket, name="big-client")
        self.server = mrpcd.server(ThreadPoolExecutor(32), interceptors=list(interceptors), options=options, app=self.srv_app)
        if handlers is not None:
            self.server.add_generic_rpc_handlers(handlers)
        else:
            pb.add_StreamerServicer_to_server(_sync_servicer(pb), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = mrpcd.Channel(f"127.0.0.1:{port}", self.cli_app, options=client_options)
        self.stub = pb.StreamerStub(self.channel)

    def close(self) -> None:
        self.server.stop(None)
        self.cli_app.close()
        self.srv_app.close()

    def __enter__(self) -> "SyncEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def test_all_four_kinds_sync_byte_exact_around_the_thresholds(env):
    with SyncEnv(env) as e:
        pb, stub = e.pb, e.stub
        for n in SIZES:
            data = blob(n, n)
            assert stub.Unary(pb.Chunk(data=data), timeout=30).total == digest(data), n
            got = list(stub.ServerStream(pb.Chunk(data=data, seq=3), timeout=30))
            assert [c.seq for c in got] == [0, 1, 2] and all(c.data == data for c in got), n
            assert all(type(c.data) is bytes for c in got)
            parts = [blob(n, i) for i in range(3)]
            assert stub.ClientStream(iter([pb.Chunk(data=p) for p in parts]), timeout=30).total == sum(map(digest, parts)), n
            back = list(stub.BidiStream(iter([pb.Chunk(data=p, seq=i) for i, p in enumerate(parts)]), timeout=30))
            assert [c.data for c in back] == parts and [c.seq for c in back] == [0, 1, 2], n


@contextlib.asynccontextmanager
async def aio_env(env, name: str):
    """An asyncio server (behind daemon b) and a client app (behind daemon a), in this
    process: (server, stub, client app)."""
    a, b, pb = env
    srv_app = mrpcd.aio.connect(b.socket, name=f"{name}-server")
    cli_app = mrpcd.aio.connect(a.socket, name=f"{name}-client")
    try:
        server = mrpcd.aio.server(app=srv_app)
        pb.add_StreamerServicer_to_server(_aio_servicer(pb), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        yield server, pb.StreamerStub(mrpcd.aio.insecure_channel(f"127.0.0.1:{port}", app=cli_app)), cli_app
    finally:
        cli_app.close()
        srv_app.close()


def test_all_four_kinds_asyncio_byte_exact(env):
    pb = env[2]

    async def main():
        async with aio_env(env, "big-aio") as (server, stub, _):
            for n in SIZES:
                data = blob(n, n)
                assert (await stub.Unary(pb.Chunk(data=data), timeout=30)).total == digest(data), n
                got = [c async for c in stub.ServerStream(pb.Chunk(data=data, seq=3), timeout=30)]
                assert [c.data for c in got] == [data] * 3, n
                parts = [blob(n, i) for i in range(3)]

                async def gen():
                    for i, p in enumerate(parts):
                        yield pb.Chunk(data=p, seq=i)

                assert (await stub.ClientStream(gen(), timeout=30)).total == sum(map(digest, parts)), n
                call = stub.BidiStream(timeout=30)  # reader/writer style
                back = []
                for i, p in enumerate(parts):
                    await call.write(pb.Chunk(data=p, seq=i))
                    back.append(await call.read())
                await call.done_writing()
                assert [c.data for c in back] == parts, n
            # many at once
            datas = [blob(1 * MIB, i) for i in range(24)]
            res = await asyncio.gather(*(stub.Unary(pb.Chunk(data=d), timeout=60) for d in datas))
            assert [r.total for r in res] == [digest(d) for d in datas]
            await server.stop(None)

    asyncio.run(main())


def test_asyncio_big_calls_cancelled_while_waiting_for_ring_room(env):
    """Big calls made at once fill the 4 MiB tx ring; those waiting for room are woken a
    few at a time (AioApp._wake_space_waiters). Cancelling some of them while they wait
    (or just after being woken) loses no turn: every other call completes, byte-exact,
    and calls made afterwards go through. (Every drain of the rx ring looks at the waiters
    again, so lost wake-ups are the unit tests' job: tests/test_app_fastpath.py.)"""
    pb = env[2]

    async def main():
        async with aio_env(env, "big-aio-cancel") as (server, stub, cli_app):
            assert (await stub.Unary(pb.Chunk(data=b"x"), timeout=30)).total == digest(b"x")  # connected
            for round_ in range(3):
                datas = [blob(1 * MIB + i, 100 * round_ + i) for i in range(24)]
                tasks = [asyncio.ensure_future(stub.Unary(pb.Chunk(data=d), timeout=60)) for d in datas]
                for _ in range(round_ + 1):
                    await asyncio.sleep(0)
                assert cli_app._space_waiters or round_  # the ring filled: calls wait for room
                for t in tasks[::3]:
                    t.cancel()
                done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
                for i, (d, r) in enumerate(zip(datas, done)):
                    if i % 3:
                        assert not isinstance(r, BaseException), (i, r)
                        assert r.total == digest(d)
                    else:
                        assert isinstance(r, asyncio.CancelledError) or r.total == digest(d)
            data = blob(2 * MIB, 9)
            assert (await stub.Unary(pb.Chunk(data=data), timeout=30)).total == digest(data)
            await server.stop(None)

    asyncio.run(main())


def test_many_concurrent_big_calls_sync(env):
    """16 threads' big calls through 4 MiB rings: senders wait for room and are woken in
    turn (App._wake_space_waiters); every call completes, byte-exact. (Lost wake-ups are
    the unit tests' job, tests/test_app_fastpath.py: here the rx thread's idle loop would
    mend one within 0.5 s.)"""
    with SyncEnv(env) as e:
        pb, stub = e.pb, e.stub
        errors: list = []

        def worker(k: int) -> None:
            try:
                for i in range(4):
                    data = blob(1 * MIB + k * 4099 + i, k * 10 + i)
                    if i % 2:
                        assert stub.Unary(pb.Chunk(data=data), timeout=60).total == digest(data)
                    else:
                        got = list(stub.ServerStream(pb.Chunk(data=data, seq=2), timeout=60))
                        assert [c.data for c in got] == [data, data]
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)


def test_long_stream_of_big_messages_with_a_slow_reader(env):
    """Flow control holds the server back; the queued messages were decoded from the ring
    (they do not pin ring space: the stream completes through a 4 MiB ring)."""
    import time

    with SyncEnv(env) as e:
        pb = e.pb
        data = blob(700 * KIB, 7)
        it = e.stub.ServerStream(pb.Chunk(data=data, seq=40), timeout=60)
        got = []
        for c in it:
            got.append(c)
            if len(got) < 4:
                time.sleep(0.2)
        assert [c.seq for c in got] == list(range(40)) and all(c.data == data for c in got)


def _garbage(n: int) -> bytes:
    return b"\xc1" * n  # 0xc1 is never used by msgpack: malformed from the first byte


@pytest.mark.parametrize("n", [100, 40 * KIB, 1 * MIB])
def test_request_decode_errors_keep_their_status(env, n):
    _a, _b, pb = env

    class Garbage(pb.Chunk):
        __slots__ = ()

        def SerializeToString(self):
            return _garbage(n)

    with pytest.raises(codec.DecodeError) as exc:
        pb.Chunk.FromString(_garbage(n))
    want = f"Exception deserializing request! {exc.value}"
    with SyncEnv(env) as e:
        raw = e.channel.unary_unary("/mrpc.stream.Streamer/Unary", request_type=Garbage, response_type=pb.Summary)
        with pytest.raises(mrpcd.RpcError) as info:
            raw(Garbage(), timeout=30)
        assert info.value.code() is mrpcd.StatusCode.INTERNAL and info.value.details() == want
        # the server is fine afterwards
        assert e.stub.Unary(pb.Chunk(data=b"x" * n), timeout=30).total == digest(b"x" * n)


def _response_outcomes(env, n: int) -> list:
    """What a client sees when every response message it gets is malformed (n bytes)."""
    import time

    _a, _b, pb = env

    def stream(request, context):
        yield request
        until = time.monotonic() + 10
        while context.is_active() and time.monotonic() < until:  # the client cancels
            time.sleep(0.01)

    handlers = mrpcd.method_handlers_generic_handler("mrpc.stream.Streamer", {
        "Unary": mrpcd.unary_unary_rpc_method_handler(lambda r, c: r, request_type=pb.Chunk, response_serializer=lambda r: _garbage(n)),
        "ServerStream": mrpcd.unary_stream_rpc_method_handler(stream, request_type=pb.Chunk, response_serializer=lambda r: _garbage(n)),
    }, schema=pb.SCHEMA)
    out = []
    with SyncEnv(env, handlers=[handlers]) as e:
        for call in (lambda: e.stub.Unary.with_call(pb.Chunk(data=b"y"), timeout=30)[1], lambda: list(e.stub.ServerStream(pb.Chunk(), timeout=30))):
            try:
                got = call()
                out.append(("ok", got.code(), got.details()) if not isinstance(got, list) else ("ok", got))
            except mrpcd.RpcError as exc:
                out.append((exc.code(), exc.details()))
    return out


@pytest.mark.parametrize("n", [40 * KIB, 1 * MIB])
def test_response_decode_errors_keep_their_status(env, n):
    _a, _b, pb = env
    with pytest.raises(codec.DecodeError) as exc:
        pb.Chunk.FromString(_garbage(n))
    got = _response_outcomes(env, n)
    assert got[1] == (mrpcd.StatusCode.INTERNAL, f"Exception deserializing response! {exc.value}")
    # and the unary call ends exactly as it does for a small malformed response
    small = _response_outcomes(env, 100)
    assert got[0] == small[0]


def test_receive_limits_with_big_messages(env):
    _a, _b, pb = env
    data = blob(1 * MIB)
    with SyncEnv(env, options=[("grpc.max_receive_message_length", 512 * KIB)]) as e:
        with pytest.raises(mrpcd.RpcError) as info:
            e.stub.Unary(pb.Chunk(data=data), timeout=30)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Received message larger than max (")
        assert e.stub.Unary(pb.Chunk(data=data[:400 * KIB]), timeout=30).total == digest(data[:400 * KIB])
    with SyncEnv(env, client_options=[("grpc.max_receive_message_length", 512 * KIB)]) as e:
        with pytest.raises(mrpcd.RpcError) as info:
            list(e.stub.ServerStream(pb.Chunk(data=data, seq=2), timeout=30))
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().startswith("Received message larger than max (")
    with SyncEnv(env, client_options=[("grpc.max_send_message_length", 512 * KIB)]) as e:
        with pytest.raises(mrpcd.RpcError) as info:
            e.stub.Unary(pb.Chunk(data=data), timeout=30)
        assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        # the limit sees the encoded size (Parts length), not the size of the first run
        assert info.value.details() == f"Sent message larger than max ({len(pb.Chunk(data=data).SerializeToString())} vs. {512 * KIB})"


def test_server_interceptors_and_grpc_style_deserializers_with_big_messages(env):
    """Before the interceptors chose the handler, a request is copied out as bytes; a
    grpc-style deserializer always gets bytes; both see the exact payload."""
    _a, _b, pb = env
    seen: list = []

    class Swap(mrpcd.ServerInterceptor):
        def intercept_service(self, continuation, details):
            handler = continuation(details)
            if not details.method.endswith("/Unary"):
                return handler

            def deser(b):
                seen.append(type(b))
                return pb.Chunk.FromString(b)

            return mrpcd.unary_unary_rpc_method_handler(handler.behavior, request_deserializer=deser, response_type=pb.Summary)

    with SyncEnv(env, interceptors=[Swap()]) as e:
        data = blob(1 * MIB, 3)
        assert e.stub.Unary(pb.Chunk(data=data), timeout=30).total == digest(data)
        assert seen == [bytes]
        parts = [blob(300 * KIB, i) for i in range(5)]
        back = list(e.stub.BidiStream(iter([pb.Chunk(data=p, seq=i) for i, p in enumerate(parts)]), timeout=30))
        assert [c.data for c in back] == parts


def test_send_path_uses_parts_and_serialize_to_string_stays_bytes(env):
    _a, _b, pb = env
    data = blob(100 * KIB)
    msg = pb.Chunk(data=data, seq=5)
    enc = msg.SerializeToString()
    assert type(enc) is bytes
    parts = type(msg).SerializeToString.__mrpc_parts__(msg)
    assert type(parts) is _pack.Parts and any(p is data for p in parts.parts)
    assert parts.tobytes() == enc and len(parts) == len(enc)
    small = pb.Chunk(data=b"x" * 100)
    assert type(small).SerializeToString.__mrpc_parts__(small) == small.SerializeToString()


def test_big_messages_take_the_one_copy_paths(env, monkeypatch):
    """The big messages above really went by reference into the tx ring and were decoded
    in the rx ring (not a silent fallback to the copying paths)."""
    from mrpcd.marshal import _ringio

    pushed: list = []
    in_ring: list = []
    take, push = appmod.ring_take_records, appmod.ring_push_parts

    def counting_take(*args):
        recs, bad, held = take(*args)
        in_ring.extend(r.payload_len for r in recs if type(r) is _ringio.RingRecord)
        return recs, bad, held

    def counting_push(ring, *args):
        pushed.append(len(args[-1]))
        return push(ring, *args)

    monkeypatch.setattr(appmod, "ring_take_records", counting_take)
    monkeypatch.setattr(appmod, "ring_push_parts", counting_push)
    with SyncEnv(env) as e:
        pb = e.pb
        data = blob(1 * MIB)
        assert e.stub.Unary(pb.Chunk(data=data), timeout=30).total == digest(data)
        assert [c.data for c in e.stub.ServerStream(pb.Chunk(data=data, seq=2), timeout=30)] == [data, data]
        small = b"s" * 1000
        assert e.stub.Unary(pb.Chunk(data=small), timeout=30).total == digest(small)
    enc = len(pb.Chunk(data=data).SerializeToString())
    assert pushed.count(enc) >= 3  # the request, twice (two calls), and the streamed responses
    assert in_ring.count(enc) >= 3  # the server's two requests, the client's two responses
    assert all(n >= codec.PARTS_MIN for n in pushed)
