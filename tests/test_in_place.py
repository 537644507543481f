"""Big peer records received in place: straight from the socket into the app's rx ring.

Why: the receiving daemon used to read a big record into its own buffer and then copy it
into the app's ring (two passes over every byte); now, while no policy is attached, the
socket reads it into a reservation of the ring (one pass). What must hold: the bytes the
app gets are the bytes sent; the header the daemon acts on is the one it checked, whatever
the app writes into its ring meanwhile; a peer that stops half-way through a record holds
up nothing else for the app (the record moves to the daemon's memory); a closed connection
leaves no reservation behind; policies see every record before the app can (none is
received in place while one is attached, and one attached mid-record sees that record).
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mrpcd
from mrpcd.ctl import Control
from mrpcd.marshal import records as R
from mrpcd.native import ring as ringmod

from test_policy_ops import ctl

MIB = 1 << 20
APPS = Path(__file__).parent / "apps"


def big_record(call_id: int, size: int, fill: int = 0x41, handle: int = 7) -> bytes:
    payload = bytes([fill]) * size
    return R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, handle, call_id, 99, 0, b"m", payload)


class Sink:
    """A FrameDecoder sink over plain buffers: records each request."""

    def __init__(self, give: bool = True) -> None:
        self.give = give
        self.asked: list[int] = []
        self.buffers: list[bytearray] = []

    def __call__(self, total: int):
        self.asked.append(total)
        if not self.give:
            return None
        buf = bytearray(total)
        self.buffers.append(buf)
        return memoryview(buf)


# -- the frame decoder ------------------------------------------------------------------------

def test_a_big_record_is_assembled_in_the_sinks_buffer():
    rec = big_record(1, 300_000)
    sink = Sink()
    dec = R.FrameDecoder()
    dec.set_sink(sink, 256 * 1024)
    out = []
    for i in range(0, len(rec), 65536):  # bytes chunks: the general path
        out += dec.feed(rec[i:i + 65536])
        assert dec.in_place == (i + 65536 < len(rec))
    assert sink.asked == [len(rec)] and bytes(sink.buffers[0]) == rec
    [got] = out
    assert got.resident and (got.kind, got.call_id, got.handle, got.method_id) == (R.REQUEST, 1, 7, 99)
    assert (got.size, got.meta_len, got.payload_len) == (len(rec), 1, 300_000)
    for body in ("payload", "meta", "raw", "payload_view"):
        with pytest.raises(TypeError, match="received in place"):
            getattr(got, body)
    with ringmod.RingPair.create(4 * MIB) as pair, pytest.raises(TypeError, match="received in place"):
        R.ring_push_records(pair.rx, [got])
    with pytest.raises(TypeError, match="received in place"):
        R.wire_buffers([got])
    assert "in the app's ring" in repr(got)
    got.handle = 42  # the receiving daemon rewrites it, then writes the header into the slot
    got.pack_header_into(sink.buffers[0])
    assert R.parse_record(bytes(sink.buffers[0])).handle == 42
    assert R.parse_record(bytes(sink.buffers[0])).payload == rec[R.HEADER_SIZE + 1:]


def test_buffered_reads_go_straight_into_the_sinks_buffer():
    """The transport's way: a scratch read that starts the record, then reads into the
    rest of the record's buffer (recv_buffer / recv_done)."""
    rec = big_record(2, 1 * MIB, fill=0x42)
    sink = Sink()
    dec = R.FrameDecoder()
    dec.set_sink(sink, 256 * 1024)
    assert dec.feed(memoryview(bytearray(rec[:16384]))) == []
    out = []
    pos = 16384
    while pos < len(rec):
        view = dec.recv_buffer(65536)
        if len(rec) - pos < 65536:  # the last bit goes through a scratch read again
            assert view is None
            out += dec.feed(memoryview(bytearray(rec[pos:])))
            break
        assert view is not None and view.nbytes == len(rec) - pos
        n = min(200_000, view.nbytes)
        view[:n] = rec[pos:pos + n]
        pos += n
        out += dec.recv_done(n)
    assert len(out) == 1 and out[0].resident and bytes(sink.buffers[0]) == rec


def test_the_header_acted_on_is_the_one_checked_not_the_buffers():
    """The app can write into its ring while the record arrives: the resident record's
    header fields (and an evicted record's header) come from the daemon's own copy."""
    rec = big_record(3, 300_000)
    sink = Sink()
    dec = R.FrameDecoder()
    dec.set_sink(sink, 256 * 1024)
    dec.feed(rec[:100_000])
    sink.buffers[0][:R.HEADER_SIZE] = b"\xff" * R.HEADER_SIZE  # scribbled over
    [got] = dec.feed(rec[100_000:])
    assert (got.kind, got.call_id, got.handle, got.payload_len) == (R.REQUEST, 3, 7, 300_000)

    dec.feed(rec[:100_000])
    sink.buffers[1][:R.HEADER_SIZE] = b"\xff" * R.HEADER_SIZE
    assert dec.evict() and not dec.in_place and not dec.evict()
    [moved] = dec.feed(rec[100_000:])
    assert not moved.resident and moved.raw == rec  # whole, in the decoder's own memory


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([R.REQUEST, R.RESPONSE, R.CANCEL]),
                          st.integers(0, 4000), st.integers(0, 60)), min_size=1, max_size=6),
       st.data())
def test_in_place_or_not_the_records_are_the_same(specs, data):
    """Differential: whatever the read sizes (bytes chunks or scratch reads plus reads into
    the record's buffer), whether the sink gives a buffer, and whenever its owner evicts,
    the records that come out carry the same headers and bodies as without a sink."""
    stream = b"".join(R.encode_record(kind, R.F_START, 0, 5, i, 3, 0, b"m" * meta, bytes([i % 256]) * size)
                      for i, (kind, size, meta) in enumerate(specs))
    plain = R.FrameDecoder()
    expected = plain.feed(stream)
    assert len(expected) == len(specs)

    dec = R.FrameDecoder()
    buffers: dict[int, bytearray] = {}

    def sink(total: int):
        if data.draw(st.integers(0, 3), label="give") == 0:  # mostly it does
            return None
        buf = bytearray(total + data.draw(st.integers(0, 3), label="spare"))
        buffers[len(buffers)] = buf
        return memoryview(buf)

    dec.set_sink(sink, data.draw(st.sampled_from([41, 200]), label="min"))
    got: list = []
    resident_bytes: list[bytes] = []
    pos = 0
    while pos < len(stream):
        if dec.in_place and data.draw(st.integers(0, 3), label="evict") == 0:
            assert dec.evict()
        view = dec.recv_buffer(1) if data.draw(st.booleans(), label="direct") else None
        n = data.draw(st.integers(1, 1500), label="read")
        if view is not None:
            n = min(n, view.nbytes, len(stream) - pos)
            view[:n] = stream[pos:pos + n]
            out = dec.recv_done(n)
        elif data.draw(st.booleans(), label="scratch"):
            out = dec.feed(memoryview(bytearray(stream[pos:pos + n])))
        else:
            out = dec.feed(stream[pos:pos + n])
        pos += min(n, len(stream) - pos)
        for r in out:
            event("resident" if r.resident else "own buffer")
            if r.resident:  # its bytes are the last buffer the sink gave
                resident_bytes.append(bytes(buffers[len(buffers) - 1][:r.size]))
            got.append(r)
    assert len(got) == len(expected)
    k = 0
    for r, e in zip(got, expected):
        assert (r.kind, r.flags, r.handle, r.call_id, r.method_id, r.size) == (e.kind, e.flags, e.handle, e.call_id, e.method_id, e.size)
        if r.resident:
            assert r.kind in (R.REQUEST, R.RESPONSE)
            assert resident_bytes[k] == bytes(e.raw)
            k += 1
        else:
            assert bytes(r.raw) == bytes(e.raw)


def test_when_the_sink_is_not_used():
    rec = big_record(4, 300_000)
    small = R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 7, 9, 99, 0, b"", b"hi")
    # the sink says no: the usual way
    dec = R.FrameDecoder()
    sink = Sink(give=False)
    dec.set_sink(sink, 256 * 1024)
    [got] = dec.feed(rec[:70_000]) + dec.feed(rec[70_000:])
    assert sink.asked == [len(rec)] and not got.resident and got.raw == rec
    # below min_size: never asked
    dec, sink = R.FrameDecoder(), Sink()
    dec.set_sink(sink, len(rec) + 1)
    assert [r.resident for r in dec.feed(rec[:70_000]) + dec.feed(rec[70_000:])] == [False]
    assert sink.asked == []
    # a completed record waits before the big one in the same read: order first, no sink
    dec, sink = R.FrameDecoder(), Sink()
    dec.set_sink(sink, 256 * 1024)
    out = dec.feed(small + rec[:70_000]) + dec.feed(rec[70_000:])
    assert [r.call_id for r in out] == [9, 4] and sink.asked == [] and out[1].raw == rec
    # the next big record, at the start of a read, is received in place again
    out = dec.feed(rec[:70_000]) + dec.feed(rec[70_000:])
    assert out[0].resident and sink.asked == [len(rec)]
    # control records (a peer may send a big CANCEL or GOAWAY) are read by the decoder's owner
    dec, sink = R.FrameDecoder(), Sink()
    dec.set_sink(sink, 256 * 1024)
    cancel = R.encode_record(R.CANCEL, 0, 0, 7, 4, 0, 0, b"", b"c" * 300_000)
    [got] = dec.feed(cancel[:70_000]) + dec.feed(cancel[70_000:])
    assert sink.asked == [] and not got.resident and got.raw == cancel
    with pytest.raises(TypeError):
        dec.set_sink(42)
    with pytest.raises(ValueError):
        dec.set_sink(sink, 10)


def test_a_sink_buffer_too_small_is_an_error():
    dec = R.FrameDecoder()
    dec.set_sink(lambda total: bytearray(total - 1), 256 * 1024)
    with pytest.raises(ValueError, match="for a record of"):
        dec.feed(big_record(5, 300_000)[:1000])


def test_a_reservation_in_a_real_ring_is_published_by_commit():
    rec = big_record(6, 300_000, fill=0x43)
    with ringmod.RingPair.create(4 * MIB) as pair:
        dec = R.FrameDecoder()
        dec.set_sink(lambda total: R.ring_reserve_view(pair.rx, total), 256 * 1024)
        [got] = dec.feed(rec[:50_000]) + dec.feed(rec[50_000:])
        assert got.resident and pair.rx.pop() is None  # reserved, not published
        got.handle = 11
        R.ring_commit(pair.rx)
        popped = R.parse_record(pair.rx.pop())
        assert popped.handle == 7 and popped.payload == rec[R.HEADER_SIZE + 1:]  # header as received
        assert R.ring_reserve_view(pair.rx, 8 * MIB) is None  # never fits: the usual way refuses it


def test_a_ring_with_a_reservation_open_says_wait_not_push_again():
    """While a reservation is open every push fails, room or not: asked whether to push
    again, the ring must say wait (else a producer retrying would spin for ever)."""
    with ringmod.RingPair.create(4 * MIB) as pair:
        assert R.ring_reserve_view(pair.rx, 300_000) is not None
        assert not pair.rx.push(b"x" * 100)
        assert pair.rx.prepare_wait_for_space(100)  # wait (the app's next pop signals)
        pair.rx.unreserve()
        assert not pair.rx.prepare_wait_for_space(100) and pair.rx.push(b"x" * 100)


def test_evict_without_memory_drops_the_record_and_fails_the_stream():
    """evict() with no memory for the record: MemoryError, and the decoder lets go of the
    sink's buffer and fails its stream, so nothing is written there afterwards."""
    code = r"""
import resource
from mrpcd.marshal import records as R
rec = R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 7, 1, 99, 0, b"m", b"A" * (64 << 20))
buf = bytearray(len(rec))
dec = R.FrameDecoder(max_record=128 << 20)
dec.set_sink(lambda total: memoryview(buf), 256 * 1024)
assert dec.feed(rec[:1 << 20]) == [] and dec.in_place
del rec
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.RLIM_INFINITY))
try:
    dec.evict()
except MemoryError as exc:
    assert "no memory" in str(exc), exc
else:
    raise SystemExit("evict did not fail")
assert not dec.in_place
try:
    dec.feed(bytearray(b"B" * 65536))
except R.RecordError as exc:
    assert "already failed" in str(exc), exc
else:
    raise SystemExit("the stream went on")
assert buf.count(b"B") == 0
print("ok")
"""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


# -- through real daemons ---------------------------------------------------------------------

def b_stats(daemon) -> dict:
    apps = Control(daemon.socket).call("stats")["apps"]
    total: dict = {}
    for s in apps.values():
        for k in ("received_in_place", "in_place_evicted"):
            total[k] = total.get(k, 0) + s.get(k, 0)
    return total


async def _peer(port: int, max_record: int = 16 * MIB):
    from mrpcd.transports import tcp

    conn = await tcp.connect("127.0.0.1", port, {}, max_record=max_record)
    answers: dict[int, R.Record] = {}
    conn.set_handlers(lambda recs: answers.update((r.call_id, r) for r in recs if r.flags & R.F_END),
                      lambda exc: None)
    return conn, answers


def say_hello(call_id: int, name: str) -> bytes:
    import hello_mrpc
    from mrpcd.marshal.schema import method_id

    payload = hello_mrpc.HelloRequest(name=name).SerializeToString()
    return R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 0, call_id, method_id("/helloworld.Greeter/SayHello"),
                           0, b"", payload)


async def _wait_for(answers: dict, ids, seconds: float = 30) -> None:
    end = time.monotonic() + seconds
    while not all(i in answers for i in ids) and time.monotonic() < end:
        await asyncio.sleep(0.01)


def reply_text(rec: R.Record) -> str:
    import hello_mrpc

    assert rec.status == 0, rec
    return hello_mrpc.HelloReply.FromString(rec.payload).message


def test_big_calls_arrive_intact_and_a_half_sent_record_holds_up_nothing(daemon_factory, app_factory, gen_dir):
    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])

    async def main() -> None:
        conn, answers = await _peer(port)
        names = {i: chr(0x61 + i % 26) * (MIB + i) for i in range(1, 9)}
        for i, name in names.items():  # one at a time: each finds the app's ring free
            conn.send(say_hello(i, name))
            await _wait_for(answers, [i])
            assert reply_text(answers[i]) == f"Hello, {name}!"
        first = b_stats(b)
        assert first["received_in_place"] >= len(names), first
        # a burst of big calls with small ones between them (some in place, some not)
        names = {i: chr(0x41 + i % 26) * (MIB // 2 + i) for i in range(10, 22)}
        for i, name in names.items():
            conn.send(say_hello(i, name))
            conn.send(say_hello(100 + i, f"small {i}"))
        await _wait_for(answers, list(names) + [100 + i for i in names])
        for i, name in names.items():
            assert reply_text(answers[i]) == f"Hello, {name}!"
            assert reply_text(answers[100 + i]) == f"Hello, small {i}!"
        first = b_stats(b)

        # a peer sends half of a big call and stops: another peer's calls go on meanwhile
        stalled, stalled_answers = await _peer(port)
        half = say_hello(50, "h" * (2 * MIB))
        stalled.transport.write(half[:MIB])
        await asyncio.sleep(0.3)
        other, other_answers = await _peer(port)
        other.send(say_hello(60, "meanwhile"))
        await _wait_for(other_answers, [60], 10)
        assert reply_text(other_answers[60]) == "Hello, meanwhile!"
        stats = b_stats(b)
        assert stats["in_place_evicted"] >= 1 and stats["received_in_place"] > first["received_in_place"], stats
        stalled.transport.write(half[MIB:])  # the rest: the call completes from the daemon's copy
        await _wait_for(stalled_answers, [50])
        assert reply_text(stalled_answers[50]) == f"Hello, {'h' * 2 * MIB}!"

        # the transport is upgraded while a record arrives in place: it completes on the new code
        evicted = b_stats(b)["in_place_evicted"]
        stalled.transport.write(say_hello(52, "u" * (2 * MIB))[:MIB])
        await asyncio.sleep(0.3)
        r = await asyncio.to_thread(ctl, b, "transport", "upgrade", "--module", str(APPS / "transport_v2.py"))
        assert r.returncode == 0 and "version 2-test" in r.stdout, r.stderr
        assert b_stats(b)["in_place_evicted"] == evicted + 1
        stalled.transport.write(say_hello(52, "u" * (2 * MIB))[MIB:])
        await _wait_for(stalled_answers, [52])
        assert reply_text(stalled_answers[52]) == f"Hello, {'u' * 2 * MIB}!"

        # a peer that goes away half-way leaves nothing reserved: the ring takes more
        stalled.transport.write(say_hello(51, "g" * (2 * MIB))[:MIB])
        await asyncio.sleep(0.3)
        stalled.transport.abort()
        await asyncio.sleep(0.3)
        conn.send(say_hello(70, "x" * (3 * MIB)))
        conn.send(say_hello(71, "after"))
        await _wait_for(answers, [70, 71])
        assert reply_text(answers[70]) == f"Hello, {'x' * 3 * MIB}!" and reply_text(answers[71]) == "Hello, after!"

        # a big call of a method the app does not serve is answered by the daemon; its
        # reservation goes with it (the next big call is received in place again)
        before = b_stats(b)["received_in_place"]
        conn.send(R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 0, 80, 12345, 0, b"", b"z" * MIB))
        await _wait_for(answers, [80])
        assert answers[80].status == mrpcd.StatusCode.UNIMPLEMENTED.code
        conn.send(say_hello(81, "y" * MIB))
        await _wait_for(answers, [81])
        assert reply_text(answers[81]) == f"Hello, {'y' * MIB}!"
        assert b_stats(b)["received_in_place"] >= before + 2
        conn.close()
        other.close()

    asyncio.run(main())
    assert b.alive()


def test_big_calls_from_several_peers_at_once(daemon_factory, app_factory, gen_dir):
    """Peers whose big records arrive interleaved: one is received in place at a time, the
    others the usual way or moved out of its way; every answer is the right one."""
    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])

    async def main() -> None:
        peers = [await _peer(port) for _ in range(3)]
        expect: list[tuple[dict, int, str]] = []
        for round_ in range(6):
            for p, (conn, answers) in enumerate(peers):
                name = chr(0x61 + (7 * round_ + p) % 26) * (MIB // 2 + 1000 * p + round_)
                conn.send(say_hello(round_ + 1, name))
                expect.append((answers, round_ + 1, name))
            await asyncio.sleep(0)
        for answers, call_id, name in expect:
            await _wait_for(answers, [call_id])
            assert reply_text(answers[call_id]) == f"Hello, {name}!"
        for conn, _ in peers:
            conn.close()

    asyncio.run(main())
    assert b_stats(b)["received_in_place"] > 0 and b.alive()


def test_policies_see_big_records_first(daemon_factory, app_factory, gen_dir):
    """No record is received in place while a policy is attached, and one attached while a
    record arrives in place still gets that record before the app (an ACL on its content)."""
    # rings and records bigger than the defaults: a record past the default 16 MiB limit
    # still turns into an ordinary one when a policy arrives while it does
    b = daemon_factory("b", "ring_size: 67108864\nmax_record: 33554432\n")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])
    [app_name] = Control(b.socket).call("stats")["apps"]
    acl = ('{direction: inbound, rules: [{method: /helloworld.Greeter/SayHello, field: name, op: prefix, value: "secret",'
           ' details: "no secrets"}]}')

    async def main() -> None:
        conn, answers = await _peer(port, max_record=32 * MIB)
        record = say_hello(1, "secret" + "s" * (20 * MIB))
        conn.transport.write(record[:MIB // 2])  # arriving in place, no policy yet
        await _wait_until_in_place(b, 1)
        r = await asyncio.to_thread(ctl, b, "policy", "attach", app_name, "acl", "--config", acl)
        assert r.returncode == 0, r.stderr
        conn.transport.write(record[MIB // 2:])
        await _wait_for(answers, [1])
        assert answers[1].status == mrpcd.StatusCode.PERMISSION_DENIED.code, answers[1]

        before = b_stats(b)["received_in_place"]
        conn.send(say_hello(2, "public" + "p" * MIB))
        conn.send(say_hello(3, "secret" + "q" * MIB))
        await _wait_for(answers, [2, 3])
        assert reply_text(answers[2]) == f"Hello, public{'p' * MIB}!"
        assert answers[3].status == mrpcd.StatusCode.PERMISSION_DENIED.code
        assert b_stats(b)["received_in_place"] == before  # policies read every record first
        conn.close()

    asyncio.run(main())
    assert b.alive()


async def _wait_until_in_place(daemon, n: int) -> None:
    end = time.monotonic() + 10
    while b_stats(daemon)["received_in_place"] < n and time.monotonic() < end:
        await asyncio.sleep(0.02)
    assert b_stats(daemon)["received_in_place"] >= n


def test_a_big_call_and_an_unserved_one_in_one_read(daemon_factory, app_factory, gen_dir):
    """The end of a big call received in place and a call of a method the app does not
    serve arrive in one read: the daemon answers the second UNIMPLEMENTED and the first
    still reaches the app (the second's refusal used to drop the first's reservation, and
    the connection died of the record left without it)."""
    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])

    async def main() -> None:
        conn, answers = await _peer(port)
        big = say_hello(1, "a" * (280 * 1024))
        unserved = R.encode_record(R.REQUEST, R.F_START | R.F_END, 0, 0, 2, 12345, 0, b"", b"x")
        conn.transport.write(big[:-10000])
        await _wait_until_in_place(b, 1)
        conn.transport.write(big[-10000:] + unserved)
        await _wait_for(answers, [1, 2])
        assert answers[2].status == mrpcd.StatusCode.UNIMPLEMENTED.code
        assert reply_text(answers[1]) == "Hello, " + "a" * (280 * 1024) + "!"
        conn.send(say_hello(3, "after"))
        await _wait_for(answers, [3])
        assert reply_text(answers[3]) == "Hello, after!"
        conn.close()

    asyncio.run(main())
    assert b.alive()


def _memfds(pid: int) -> list[str]:
    """The process's shared memory objects (one path each, however many fds it holds)."""
    out: dict[int, str] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if "memfd:" in os.readlink(path):
                out.setdefault(os.stat(path).st_ino, path)
        except OSError:
            pass
    return list(out.values())


def test_a_policy_attached_mid_record_keeps_the_rest_out_of_the_apps_memory(daemon_factory, app_factory, gen_dir):
    """Attaching a policy moves a record being received in place out of the app's ring:
    what arrives after the attach is never in memory the app can read, and the policy
    decides on the record (an inbound ACL denies it)."""
    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])
    [app_name] = Control(b.socket).call("stats")["apps"]
    acl = ('{direction: inbound, rules: [{method: /helloworld.Greeter/SayHello, field: name, op: prefix, value: "secret",'
           ' details: "no secrets"}]}')
    marker = b"SENT-AFTER-THE-ATTACH"

    async def main() -> None:
        conn, answers = await _peer(port)
        record = say_hello(1, "secret" + "s" * (MIB // 2) + marker.decode() * 20 + "t" * (MIB // 2))
        conn.transport.write(record[:MIB // 4])
        await _wait_until_in_place(b, 1)
        r = await asyncio.to_thread(ctl, b, "policy", "attach", app_name, "acl", "--config", acl)
        assert r.returncode == 0, r.stderr
        conn.transport.write(record[MIB // 4:-1000])  # the marker is in this part
        await asyncio.sleep(0.3)
        [memfd] = _memfds(server.proc.pid)
        with open(memfd, "rb") as f:
            assert marker not in f.read(), "bytes sent after the attach are in the app's ring"
        assert b_stats(b)["in_place_evicted"] == 1
        conn.transport.write(record[-1000:])
        await _wait_for(answers, [1])
        assert answers[1].status == mrpcd.StatusCode.PERMISSION_DENIED.code
        conn.close()

    asyncio.run(main())


def test_an_upgrade_to_a_transport_without_in_place_receive(daemon_factory, app_factory, gen_dir):
    """A live transport upgrade to a version that cannot move a record out of the app's
    ring (one from before in-place receive) turns in-place receive off for the connections
    it takes over: big records come the usual way and other traffic for the app, which
    would need such a move, does not cost the connection."""
    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])

    async def main() -> None:
        (one, one_answers), (two, two_answers) = await _peer(port), await _peer(port)
        one.send(say_hello(1, "warm"))
        two.send(say_hello(1, "warm"))
        await _wait_for(one_answers, [1])
        await _wait_for(two_answers, [1])
        r = await asyncio.to_thread(ctl, b, "transport", "upgrade", "--module", str(APPS / "transport_without_in_place.py"))
        assert r.returncode == 0, r.stderr
        before = b_stats(b)["received_in_place"]
        big = say_hello(2, "z" * (2 * MIB))
        one.transport.write(big[:MIB])
        await asyncio.sleep(0.2)
        two.send(say_hello(3, "small"))  # other traffic for the app meanwhile
        await _wait_for(two_answers, [3])
        one.transport.write(big[MIB:])
        await _wait_for(one_answers, [2])
        assert reply_text(two_answers[3]) == "Hello, small!"
        assert reply_text(one_answers[2]) == f"Hello, {'z' * 2 * MIB}!"
        assert b_stats(b)["received_in_place"] == before
        one.close()
        two.close()

    asyncio.run(main())
    assert b.alive()


def test_an_app_that_corrupts_its_rx_ring_is_dropped_not_the_peer(daemon_factory, app_factory, gen_dir):
    """The app's rx ring is broken (its tail set to nonsense, the app stopped so it does
    not write it again) when big records come: the daemon drops that app, as for any ring
    it corrupts, instead of failing the peer's stream with a decoding error."""
    import signal

    from mrpcd.native import ring as ringmod

    b = daemon_factory("b")
    server = app_factory("hello_server.py", b, gen=gen_dir)
    port = int(server.readline().rpartition(":")[2])

    async def main() -> None:
        conn, answers = await _peer(port)
        conn.send(say_hello(1, "warm"))
        await _wait_for(answers, [1])
        [memfd] = _memfds(server.proc.pid)
        size = os.stat(memfd).st_size
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with open(memfd, "r+b") as f:
                f.seek(ringmod.layout(size).rx_offset + 64)  # struct ring_ctrl: head, pad, tail
                f.write((3).to_bytes(8, "little"))  # not a multiple of 8: corrupt
            for i in range(6):  # more than the 4 MiB ring holds: the daemon re-reads the tail
                conn.send(say_hello(2 + i, "b" * MIB))
            end = time.monotonic() + 10
            while Control(b.socket).call("stats")["apps"] and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert not Control(b.socket).call("stats")["apps"]
        finally:
            server.proc.send_signal(signal.SIGCONT)
        conn.close()

    asyncio.run(main())
    log = b.log()
    assert "corrupted its ring" in log and "internal error decoding" not in log, log[-2000:]
    assert b.alive()
