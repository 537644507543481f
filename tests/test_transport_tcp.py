"""Daemon-to-daemon TCP transport on uvloop, over loopback (127.0.0.1, port 0)."""
import asyncio
import logging
import random

import pytest
import uvloop

from mrpcd.marshal.records import (
    GOAWAY,
    HELLO,
    REQUEST,
    RESPONSE,
    FrameDecoder,
    RecordError,
    encode_record,
)
from mrpcd.transports.handshake import Handshake, make_hello, parse_goaway
from mrpcd.transports.tcp import (
    ConnectTimeout,
    HandshakeError,
    PeerConnection,
    PeerGoaway,
    connect,
    serve,
)

GREETER = "helloworld.Greeter"
FP_A = "ab12" + "0" * 28
FP_B = "cd34" + "1" * 28
SERVICES = {GREETER: FP_A}


def run(coro, timeout=20.0):
    async def main():
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(main())


def port_of(server):
    return server.sockets[0].getsockname()[1]


def req(call_id, payload=b"", meta=b""):
    return encode_record(REQUEST, 1, 0, 0, call_id, 7, 0, meta, payload)


class Sink:
    """on_records / on_close recorder with awaitable conditions."""

    def __init__(self):
        self.records = []
        self.batches = 0
        self.closed = asyncio.get_running_loop().create_future()
        self._want = None

    def on_records(self, records):
        self.batches += 1
        self.records.extend(records)
        if self._want and len(self.records) >= self._want[0] and not self._want[1].done():
            self._want[1].set_result(None)

    def on_close(self, exc):
        assert not self.closed.done(), "on_close called twice"
        self.closed.set_result(exc)

    async def wait_for(self, n):
        if len(self.records) < n:
            self._want = (n, asyncio.get_running_loop().create_future())
            await self._want[1]

    def attach(self, conn):
        conn.set_handlers(self.on_records, self.on_close)
        return self


async def start_server(services=SERVICES, **kw):
    accepted = asyncio.Queue()
    errors = asyncio.Queue()
    server = await serve(
        "127.0.0.1", 0, lambda: services, accepted.put_nowait,
        on_handshake_error=lambda peer, exc: errors.put_nowait((peer, exc)), **kw,
    )
    return server, accepted, errors


async def raw_open(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return reader, writer


async def read_records(reader, n=1, timeout=5.0):
    """Read until n records (or EOF) from a raw stream."""
    dec = FrameDecoder()
    out = []
    while len(out) < n:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            break
        out += dec.feed(data)
    return out


# --------------------------------------------------------------------------- round trips

def test_round_trip_many_records_both_ways():
    rng = random.Random(1234)
    sizes = [rng.choice([0, 1, 13, 40, 1000, 9000, 70000, rng.randrange(300000)]) for _ in range(600)]
    sizes[100] = sizes[400] = 4 << 20  # two 4 MiB records in the stream
    payloads = [rng.randbytes(s) for s in sizes]

    async def main():
        server, accepted, _ = await start_server()
        async with server:
            client = await connect("127.0.0.1", port_of(server), SERVICES)
            assert client.peer_hello == {"version": 1, "role": "server", "services": SERVICES}
            sconn = await asyncio.wait_for(accepted.get(), 5)
            assert sconn.peer_hello["role"] == "client"
            ssink, csink = Sink().attach(sconn), Sink().attach(client)

            # client → server: send() many in one iteration (coalesced), then a send_batch
            for i, p in enumerate(payloads[:300]):
                client.send(req(i, p, b"\x91\x92\xa1k\xa1v" if i % 7 == 0 else b""))
            client.send_batch([req(300 + i, p) for i, p in enumerate(payloads[300:])])
            # server → client at the same time
            sconn.send_batch([encode_record(RESPONSE, 2, 0, 0, i, 0, 0, b"", p) for i, p in enumerate(payloads)])

            await asyncio.gather(ssink.wait_for(len(payloads)), csink.wait_for(len(payloads)))
            for sink, kind in ((ssink, REQUEST), (csink, RESPONSE)):
                assert [r.call_id for r in sink.records] == list(range(len(payloads)))
                assert all(r.kind == kind for r in sink.records)
                assert [bytes(r.payload) for r in sink.records] == payloads
                assert sink.batches < len(payloads)  # delivered in batches, not one by one
            assert bytes(ssink.records[0].meta) == b"\x91\x92\xa1k\xa1v"

            client.close("done")
            assert await asyncio.wait_for(csink.closed, 5) is None
            exc = await asyncio.wait_for(ssink.closed, 5)
            assert isinstance(exc, PeerGoaway) and exc.details == "done" and "done" in str(exc)
            assert client.closed and sconn.closed
            with pytest.raises(ConnectionError, match="closed"):
                client.send(req(1))

    run(main())


def test_records_split_into_single_bytes_over_tcp():
    async def main():
        server, accepted, _ = await start_server()
        async with server:
            reader, writer = await raw_open(port_of(server))
            stream = make_hello("client", SERVICES) + b"".join(req(i, bytes([i]) * i) for i in range(20))
            for i in range(len(stream)):
                writer.write(stream[i:i + 1])
                await writer.drain()
                if i % 64 == 0:
                    await asyncio.sleep(0)
            sconn = await asyncio.wait_for(accepted.get(), 5)
            sink = Sink().attach(sconn)
            await asyncio.wait_for(sink.wait_for(20), 5)
            assert [bytes(r.payload) for r in sink.records] == [bytes([i]) * i for i in range(20)]
            (hello,) = await read_records(reader)
            assert hello.kind == HELLO
            writer.close()
            assert isinstance(await asyncio.wait_for(sink.closed, 5), ConnectionError)

    run(main())


class FakeTransport:
    def __init__(self):
        self.written = []
        self.writelines_calls = []
        self.closed = False
        self.reading = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 9) if name == "peername" else default

    def write(self, data):
        self.written.append(bytes(data))

    def writelines(self, bufs):
        bufs = list(bufs)
        self.writelines_calls.append(len(bufs))
        self.written.append(b"".join(bufs))

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def get_write_buffer_size(self):
        return 0


def test_single_byte_feed_deterministic():
    """Protocol object fed one byte per data_received: the handshake and records decode."""

    async def main():
        ready = []
        conn = PeerConnection("server", lambda: SERVICES, lambda c, e: ready.append(e))
        t = FakeTransport()
        conn.connection_made(t)
        stream = make_hello("client", SERVICES) + req(1, b"x" * 300) + req(2) + req(3, b"\x00" * 5000)
        for i in range(len(stream)):
            conn.data_received(stream[i:i + 1])
        assert ready == [None] and conn.established
        assert FrameDecoder().feed(b"".join(t.written))[0].kind == HELLO
        # records arrived before set_handlers: held, and reading paused meanwhile
        assert not t.reading
        sink = Sink().attach(conn)
        assert t.reading
        assert [(r.call_id, len(r.payload)) for r in sink.records] == [(1, 300), (2, 0), (3, 5000)]
        conn.connection_lost(None)
        assert isinstance(sink.closed.result(), ConnectionError)

    run(main())


def test_send_coalesces_into_one_writelines():
    async def main():
        conn = PeerConnection("server", lambda: SERVICES, lambda c, e: None)
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(make_hello("client", SERVICES))
        assert conn.established and t.writelines_calls == [1]  # the server's HELLO
        for i in range(50):
            conn.send(req(i))
        assert t.writelines_calls == [1]  # queued, flushed once at the end of this iteration
        await asyncio.sleep(0)
        assert t.writelines_calls == [1, 50]
        conn.send(req(50))
        conn.send_batch([req(51), req(52)])  # keeps order with queued records, one writelines
        assert t.writelines_calls == [1, 50, 3]
        conn.send_batch([req(53), req(54)])
        assert t.writelines_calls == [1, 50, 3, 2]
        await asyncio.sleep(0)
        assert t.writelines_calls == [1, 50, 3, 2]
        recs = FrameDecoder().feed(b"".join(t.written[1:]))
        assert [r.call_id for r in recs] == list(range(55))
        conn.close("bye")
        assert t.closed and parse_goaway(FrameDecoder().feed(t.written[-1])[0]) == "bye"

    run(main())


def test_records_before_set_handlers_are_buffered():
    async def main():
        server, accepted, _ = await start_server()
        async with server:
            client = await connect("127.0.0.1", port_of(server), SERVICES)
            for i in range(10):
                client.send(req(i, b"p%d" % i))
            sconn = await accepted.get()
            await asyncio.sleep(0.1)  # records arrive; nobody is listening yet
            sink = Sink().attach(sconn)
            assert [r.call_id for r in sink.records] == list(range(10))
            sconn.send(encode_record(RESPONSE, 3, 0, 0, 0, 0, 0, b"", b"r"))
            await asyncio.sleep(0.05)
            csink = Sink().attach(client)  # the client's early records are held too
            await csink.wait_for(1)
            assert bytes(csink.records[0].payload) == b"r"
            sconn.close()
            exc = await asyncio.wait_for(csink.closed, 5)
            assert isinstance(exc, PeerGoaway) and exc.details == ""
            assert await asyncio.wait_for(sink.closed, 5) is None

    run(main())


# --------------------------------------------------------------------------- handshake failures

def test_fingerprint_mismatch_both_sides(caplog):
    async def main():
        server, accepted, errors = await start_server({GREETER: FP_A, "x.Ok": FP_B})
        async with server:
            with pytest.raises(HandshakeError) as ei:
                await connect("127.0.0.1", port_of(server), {GREETER: FP_B, "x.Ok": FP_B})
            text = str(ei.value)
            assert f"mrpcd at 127.0.0.1:{port_of(server)} refused the connection: " in text
            assert (
                "schema mismatch for service helloworld.Greeter: local fingerprint ab1200000000…, "
                "peer cd3411111111…; regenerate stubs from the same .proto"
            ) in text
            peer, exc = await asyncio.wait_for(errors.get(), 5)
            assert peer.startswith("127.0.0.1:") and isinstance(exc, HandshakeError)
            assert str(exc).startswith("schema mismatch for service helloworld.Greeter")
            assert accepted.empty()

    with caplog.at_level(logging.WARNING, logger="mrpcd.transports.tcp"):
        run(main())
    assert any("schema mismatch for service helloworld.Greeter" in r.getMessage() for r in caplog.records)


def test_version_mismatch_client_newer(caplog):
    """A v2 client meets our server: the server refuses with GOAWAY, logs the reason."""

    async def main():
        server, accepted, errors = await start_server()
        async with server:
            reader, writer = await raw_open(port_of(server))
            hs = Handshake("client", SERVICES, version=2)
            writer.write(b"".join(hs.start()))
            recs = await read_records(reader, 2)
            assert [r.kind for r in recs] == [GOAWAY]  # then EOF
            hs.receive(recs[0])
            assert str(hs.error) == "protocol version 2 from peer, this daemon speaks 1" and hs.error.remote
            _, exc = await asyncio.wait_for(errors.get(), 5)
            assert str(exc) == "protocol version 2 from peer, this daemon speaks 1"
            writer.close()

    with caplog.at_level(logging.WARNING, logger="mrpcd.transports.tcp"):
        run(main())
    assert any("protocol version 2 from peer, this daemon speaks 1" in r.getMessage() for r in caplog.records)


def test_version_mismatch_server_newer():
    """Our client meets a v2 server: connect() raises with the text, the server gets a GOAWAY."""

    async def main():
        got = asyncio.get_running_loop().create_future()

        async def v2_server(reader, writer):
            (hello,) = await read_records(reader, 1)
            assert hello.kind == HELLO
            writer.write(make_hello("server", SERVICES, version=2))
            got.set_result(await read_records(reader, 2))
            writer.close()

        server = await asyncio.start_server(v2_server, "127.0.0.1", 0)
        async with server:
            with pytest.raises(HandshakeError) as ei:
                await connect("127.0.0.1", port_of(server), SERVICES)
            assert str(ei.value) == (
                f"handshake with mrpcd at 127.0.0.1:{port_of(server)} failed: "
                "protocol version 2 from peer, this daemon speaks 1"
            )
            recs = await asyncio.wait_for(got, 5)
            assert [r.kind for r in recs] == [GOAWAY]
            assert parse_goaway(recs[0]) == "protocol version 2 from peer, this daemon speaks 1"

    run(main())


def test_connect_errors_are_clear():
    async def main():
        # nothing listening
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = port_of(probe)
        probe.close()
        await probe.wait_closed()
        with pytest.raises(ConnectionError, match=f"cannot connect to mrpcd at 127.0.0.1:{port}"):
            await connect("127.0.0.1", port, SERVICES)

        # a server that accepts but never answers the HELLO
        writers = []
        silent = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
        async with silent:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(ConnectTimeout, match="no handshake reply within 0.3 s"):
                await connect("127.0.0.1", port_of(silent), SERVICES, timeout=0.3)
            assert loop.time() - t0 < 2
            for w in writers:
                w.close()

        # a server that closes at once
        async def slam(r, w):
            w.close()

        slammer = await asyncio.start_server(slam, "127.0.0.1", 0)
        async with slammer:
            with pytest.raises(ConnectionError, match="closed by 127.0.0.1:.* during the handshake"):
                await connect("127.0.0.1", port_of(slammer), SERVICES)

    run(main())


def test_server_handshake_timeout():
    async def main():
        server, accepted, errors = await start_server(handshake_timeout=0.2)
        async with server:
            reader, writer = await raw_open(port_of(server))
            recs = await read_records(reader, 2)
            assert [r.kind for r in recs] == [GOAWAY]
            assert "no handshake from 127.0.0.1:" in parse_goaway(recs[0])
            _, exc = await asyncio.wait_for(errors.get(), 5)
            assert "within 0.2 s" in str(exc)
            writer.close()

    run(main())


# --------------------------------------------------------------------------- misbehaving peers

BAD_HEADER = bytes([200]) + b"\xff" * 39  # unknown kind, absurd lengths


def test_garbage_before_handshake_closes_that_connection_only():
    async def main():
        server, accepted, errors = await start_server()
        async with server:
            good = await connect("127.0.0.1", port_of(server), SERVICES)
            sgood = Sink().attach(await accepted.get())

            reader, writer = await raw_open(port_of(server))
            writer.write(BAD_HEADER + b"GET / HTTP/1.1\r\n\r\n")
            recs = await read_records(reader, 2)
            assert [r.kind for r in recs] == [GOAWAY]
            assert parse_goaway(recs[0]).startswith("malformed record from peer: ")
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
            _, exc = await asyncio.wait_for(errors.get(), 5)
            assert "malformed record" in str(exc)
            writer.close()
            await writer.wait_closed()

            # the server still serves: the old connection and a new one
            good.send(req(1, b"still here"))
            await sgood.wait_for(1)
            again = await connect("127.0.0.1", port_of(server), SERVICES)
            s2 = Sink().attach(await accepted.get())
            again.send(req(2))
            await s2.wait_for(1)
            good.close()
            again.close()

    run(main())


def test_garbage_after_handshake_goaway_and_on_close(caplog):
    async def main():
        server, accepted, errors = await start_server()
        async with server:
            reader, writer = await raw_open(port_of(server))
            hs = Handshake("client", SERVICES)
            writer.write(b"".join(hs.start()) + req(5, b"ok"))
            (hello,) = await read_records(reader, 1)
            hs.receive(hello)
            sconn = await asyncio.wait_for(accepted.get(), 5)
            sink = Sink().attach(sconn)
            await sink.wait_for(1)
            writer.write(BAD_HEADER)
            exc = await asyncio.wait_for(sink.closed, 5)
            assert isinstance(exc, RecordError)
            recs = await read_records(reader, 2)
            assert [r.kind for r in recs] == [GOAWAY]
            assert parse_goaway(recs[0]) == f"malformed record from peer: {exc}"
            writer.close()
            # a second, well-behaved client is fine
            c = await connect("127.0.0.1", port_of(server), SERVICES)
            s2 = Sink().attach(await accepted.get())
            c.send(req(9))
            await s2.wait_for(1)
            c.close()

    with caplog.at_level(logging.WARNING, logger="mrpcd.transports.tcp"):
        run(main())
    assert any("malformed record from peer" in r.getMessage() for r in caplog.records)


def test_oversized_record_rejected():
    async def main():
        server, accepted, errors = await start_server(max_record=1 << 16)
        async with server:
            client = await connect("127.0.0.1", port_of(server), SERVICES)
            sink = Sink().attach(await accepted.get())
            csink = Sink().attach(client)
            client.send(req(1, b"x" * 100))
            client.send(req(2, b"x" * (1 << 17)))
            exc = await asyncio.wait_for(sink.closed, 5)
            assert isinstance(exc, RecordError)
            # records before the bad frame (even in the same read) are still delivered
            assert [r.call_id for r in sink.records] == [1]
            cexc = await asyncio.wait_for(csink.closed, 5)
            assert isinstance(cexc, PeerGoaway) and "malformed record from peer" in cexc.details

    run(main())


def _big_hello_services():
    """A service set whose HELLO (with its schema closure) is ~20 KiB: a real service's size."""
    from mrpcd.marshal.schema import Schema
    from mrpcd.transports.handshake import ServiceSet
    fields = [[f"field_{i}", i + 1, ["string", None], "single", None, None] for i in range(400)]
    schema = Schema.from_dict({"messages": [["big.Req", fields]], "enums": [],
                               "services": [["big.Svc", [["Call", "big.Req", "big.Req", False, False]]]]})
    return ServiceSet({"big.Svc": schema.fingerprint("big.Svc")}, {"big.Svc": schema.closure("big.Svc")})


def test_hello_with_closures_is_read_whatever_the_max_record():
    """A small max_record (an operator's cap on messages) must not refuse a peer whose HELLO
    carries its schema closures; data records keep that cap."""
    services = _big_hello_services()
    assert len(make_hello("client", services)) > 8192

    async def main():
        server, accepted, errors = await start_server(services=services, max_record=8192)
        async with server:
            client = await connect("127.0.0.1", port_of(server), services, max_record=8192)
            sink = Sink().attach(await accepted.get())
            csink = Sink().attach(client)
            client.send(req(1, b"x" * 100))
            await sink.wait_for(1)
            client.send(req(2, b"x" * 9000))  # over the data records' limit
            exc = await asyncio.wait_for(sink.closed, 5)
            assert isinstance(exc, RecordError) and "exceeds max_record 8192" in str(exc)
            cexc = await asyncio.wait_for(csink.closed, 5)
            assert isinstance(cexc, PeerGoaway)

    run(main())


def test_a_record_behind_the_hello_gets_the_data_limit():
    """A record in the same read as the HELLO was decoded under the HELLO's larger limit:
    it is still held to max_record."""
    async def main():
        server, accepted, errors = await start_server(max_record=8192)
        async with server:
            reader, writer = await raw_open(port_of(server))
            hs = Handshake("client", SERVICES)
            writer.write(b"".join(hs.start()) + req(1, b"x" * 9000))
            recs = await read_records(reader, 2)
            assert [r.kind for r in recs] == [GOAWAY]
            assert "exceeds max_record 8192" in parse_goaway(recs[0])
            peer, exc = await asyncio.wait_for(errors.get(), 5)
            assert "exceeds max_record 8192" in str(exc)
            writer.close()

    run(main())


def test_peer_closing_mid_stream_triggers_on_close():
    async def main():
        server, accepted, errors = await start_server()
        async with server:
            reader, writer = await raw_open(port_of(server))
            hs = Handshake("client", SERVICES)
            whole = req(3, b"y" * 1000)
            writer.write(b"".join(hs.start()) + req(1) + whole[:500])
            (hello,) = await read_records(reader, 1)
            sconn = await asyncio.wait_for(accepted.get(), 5)
            sink = Sink().attach(sconn)
            await sink.wait_for(1)
            writer.close()
            exc = await asyncio.wait_for(sink.closed, 5)
            assert isinstance(exc, ConnectionError) and not isinstance(exc, PeerGoaway)
            assert "closed by 127.0.0.1:" in str(exc)
            assert "in the middle of a record (500 bytes of it received)" in str(exc)
            assert [r.call_id for r in sink.records] == [1]
            assert sconn.closed

    run(main())


def test_handler_exception_closes_connection_not_loop():
    async def main():
        server, accepted, errors = await start_server()
        async with server:
            client = await connect("127.0.0.1", port_of(server), SERVICES)
            csink = Sink().attach(client)
            sconn = await accepted.get()
            closed = asyncio.get_running_loop().create_future()

            def boom(records):
                raise KeyError("bug")

            sconn.set_handlers(boom, closed.set_result)
            client.send(req(1))
            assert isinstance(await asyncio.wait_for(closed, 5), KeyError)
            cexc = await asyncio.wait_for(csink.closed, 5)
            assert "internal error in the receiving daemon" in cexc.details

    run(main())


def test_pause_and_resume_reading():
    async def main():
        server, accepted, errors = await start_server()
        async with server:
            client = await connect("127.0.0.1", port_of(server), SERVICES)
            sconn = await accepted.get()
            sink = Sink().attach(sconn)
            sconn.pause_reading()
            client.send(req(1))
            await asyncio.sleep(0.1)
            assert sink.records == []
            sconn.resume_reading()
            await asyncio.wait_for(sink.wait_for(1), 5)
            await client.drain()
            client.close()

    run(main())


def test_the_ipv6_wildcard_listens_dual_stack_other_v6_addresses_do_not():
    """"[::]:port" (what grpc servers listen on) takes IPv4 peers too, as grpc's listener
    does; "::1" stays IPv6-only (asyncio's default for IPv6 sockets)."""
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")

    async def main():
        wildcard = await serve("::", 0, lambda: SERVICES, lambda conn: None)
        port = wildcard.sockets[0].getsockname()[1]
        _r, w = await asyncio.open_connection("127.0.0.1", port)  # refused before the fix
        w.close()
        wildcard.close()
        try:
            loopback6 = await serve("::1", 0, lambda: SERVICES, lambda conn: None)
        except OSError:
            return  # no ::1 here: nothing more to check
        sock = loopback6.sockets[0]
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        loopback6.close()

    run(main())


@pytest.mark.parametrize("failure", ["no-ipv6-socket", "v6only-unsupported"])
def test_the_ipv6_wildcard_on_a_host_without_dual_stack_still_listens(monkeypatch, failure):
    """No IPv6 in the kernel (socket(AF_INET6) fails) or no IPV6_V6ONLY: "[::]:port" still
    listens (on IPv4's wildcard when there is no IPv6), as grpc's wildcard listener falls
    back, instead of failing the whole listener."""
    import errno
    import socket

    import mrpcd.transports.tcp as tcp

    real_socket = socket.socket

    class Sock(real_socket):
        def setsockopt(self, level, opt, *args):
            if failure == "v6only-unsupported" and level == socket.IPPROTO_IPV6 and opt == socket.IPV6_V6ONLY:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            return super().setsockopt(level, opt, *args)

    def make(family=socket.AF_INET, *args, **kw):
        if failure == "no-ipv6-socket" and family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return Sock(family, *args, **kw)

    monkeypatch.setattr(tcp.socket, "socket", make)

    async def main():
        listener = await serve("::", 0, lambda: SERVICES, lambda conn: None)
        port = listener.sockets[0].getsockname()[1]
        monkeypatch.setattr(tcp.socket, "socket", real_socket)
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        listener.close()

    run(main())
