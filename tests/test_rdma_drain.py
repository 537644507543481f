"""RDMA connection drain(): completes when the bytes waiting for the peer's credits are
down to the low-water mark, fails when the connection ends (sans-I/O; no device needed).

Why it matters: the daemon stops reading a peer that does not take its answers and
resumes on drain(); an RDMA drain that completed at once made that pause a no-op."""
from __future__ import annotations

import asyncio
import types

import pytest

from mrpcd.marshal.records import F_START, REQUEST, encode_record
from mrpcd.transports.rdma.channel import ChannelCore
from mrpcd.transports.rdma.drain import DrainWaiters
from mrpcd.transports.rdma.verbs import RdmaPeerConnection


def record(call_id: int, size: int) -> bytes:
    return encode_record(REQUEST, F_START, 0, 0, call_id, 7, 0, b"", b"x" * size)


def test_waiters_complete_at_low_water_and_fail_on_close():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        w = DrainWaiters(low_water=100)
        assert w.park(loop.create_future(), 100).done()          # already low: no wait
        a = w.park(loop.create_future(), 5000)
        b = w.park(loop.create_future(), 5000)
        b.cancel()                                                 # a caller gave up: skipped
        assert w.update(101) == 0 and not a.done() and len(w) == 2
        assert w.update(100) == 1 and a.result() is None and len(w) == 0
        c = w.park(loop.create_future(), 5000)
        w.fail("connection to peer lost")
        with pytest.raises(ConnectionError, match="lost"):
            c.result()
        d = w.park(loop.create_future(), 0)                        # after the end: fails too
        with pytest.raises(ConnectionError, match="lost"):
            d.result()
        assert c.exception() is not d.exception()                  # one exception per future
    asyncio.run(main())
    with pytest.raises(ValueError):
        DrainWaiters(low_water=-1)


def test_drain_follows_the_peer_returning_credits():
    """A sender whose peer withholds credits (it stopped reading): the backlog stays, the
    drain waits; once the peer returns credits and the sender sends, the drain completes."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        kw = dict(peer_buf_size=4096, max_msg=4096, max_sge=4)
        a = ChannelCore(recv_buffers=4, peer_recv_buffers=4, **kw)
        b = ChannelCore(recv_buffers=4, peer_recv_buffers=4, **kw)
        b.hold_credits(True)
        a.send_records([record(i, 3000) for i in range(100)])
        waiters = DrainWaiters(low_water=16 * 1024)

        def exchange() -> None:
            for msg in a.poll(8):
                data = msg.header + b"".join(bytes(s.view()) for s in msg.segments)
                b.on_message(data)
                b.reposted()
            for msg in b.poll(8):
                a.on_message(msg.header)
                a.reposted()
            waiters.update(a.queued_bytes)

        exchange()
        fut = waiters.park(loop.create_future(), a.queued_bytes)
        for _ in range(20):
            exchange()
        assert not fut.done() and a.queued_bytes > 16 * 1024     # no credits back: no progress
        b.hold_credits(False)
        for _ in range(500):
            exchange()
            if fut.done():
                break
        assert fut.done() and fut.result() is None and a.queued_bytes <= 16 * 1024
    asyncio.run(main())


def bare_connection(loop: asyncio.AbstractEventLoop, queued: int) -> RdmaPeerConnection:
    """An RdmaPeerConnection without verbs: enough state for drain() and the close path."""
    conn = RdmaPeerConnection.__new__(RdmaPeerConnection)
    conn.peer, conn.closed, conn._finished = "198.51.100.7:1", False, False
    conn._loop = loop
    conn.core = types.SimpleNamespace(queued_bytes=queued, error=None)
    conn._drainers = DrainWaiters()
    conn._close_timer = None
    conn._goaway = False
    conn._writer = types.SimpleNamespace(close=lambda: None, write=lambda data: None)
    conn._side_task = types.SimpleNamespace(cancel=lambda: None)
    conn._v = types.SimpleNamespace(fd=-1, close=lambda: None)
    conn._on_close = None
    return conn


def test_connection_drain_waits_and_fails_when_the_connection_ends():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        conn = bare_connection(loop, queued=1 << 20)
        assert bare_connection(loop, queued=0).drain().done()
        fut = conn.drain()
        await asyncio.sleep(0)
        assert not fut.done()
        conn.closed = True
        conn._finish(None)
        with pytest.raises(ConnectionError, match="198.51.100.7:1 lost"):
            fut.result()
        with pytest.raises(ConnectionError):
            conn.drain().result()
        closing = bare_connection(loop, queued=1 << 20)
        closing.closed = True                                      # close() called, not finished
        with pytest.raises(ConnectionError, match="closed"):
            closing.drain().result()
    asyncio.run(main())


def test_connection_send_batch_takes_the_sessions_arguments():
    """The daemon's session calls send_batch(buffers, records, nbytes) on whatever
    connection a route has; the RDMA one took only the buffers (a TypeError on every
    send)."""
    async def main() -> None:
        conn = bare_connection(asyncio.get_running_loop(), queued=0)
        sent: list = []
        conn.core.send_records = sent.extend
        conn._pump = lambda: None
        conn.send_batch([b"ab", b"cd"], 3, 4)
        conn.send_batch([b"ef"])
        assert sent == [b"ab", b"cd", b"ef"]
    asyncio.run(main())
