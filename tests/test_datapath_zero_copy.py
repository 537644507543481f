"""The daemon datapath's copy discipline: records as views, dirty re-encode, handle patching,
ring pop/push of records, large records split over many TCP chunks.

Lifetime rule under test: a record popped from a ring is a view into a fresh private bytes
object made for that pop alone, never into the ring, so it survives the ring being reused
(and the app scribbling over it) for as long as anyone holds it.
"""
from __future__ import annotations

import asyncio
import os

import pytest

from mrpcd.marshal import records as R
from mrpcd.native import ring as ringmod
from mrpcd.transports import tcp


def rec_bytes(call_id: int, payload: bytes, *, kind=R.REQUEST, flags=R.F_START, handle=1, meta=b"") -> bytes:
    return R.encode_record(kind, flags, 0, handle, call_id, 7, 0, meta, payload)


@pytest.fixture
def pair():
    with ringmod.RingPair.create(1 << 16) as p:
        yield p


# -- ring → records ------------------------------------------------------------------------

def test_pop_records_are_views_that_survive_ring_reuse(pair):
    datas = [rec_bytes(i, bytes([i]) * (10 + i)) for i in range(20)]
    assert pair.tx.push_many(datas) == 20
    recs, bad = R.ring_pop_records(pair.tx, 512, 1 << 20)
    assert bad == [] and len(recs) == 20
    assert all(not r.dirty for r in recs)
    # the app reuses (overwrites) every byte of the ring: the records do not change
    for _ in range(8):
        assert pair.tx.push(b"\xff" * 8000)
        assert pair.tx.pop_batch()
    for i, r in enumerate(recs):
        assert r.call_id == i and r.payload == bytes([i]) * (10 + i)
        assert bytes(r.raw) == datas[i]
    # all records of one pop share one private base: back-to-back views coalesce
    bufs, nbytes = R.wire_buffers(recs)
    assert len(bufs) == 1 and bytes(bufs[0]) == b"".join(datas) and nbytes == sum(map(len, datas))


def test_pop_records_rejects_malformed_and_keeps_the_good(pair):
    good = rec_bytes(1, b"ok")
    assert pair.tx.push_many([good, b"\x09" * 40, b"short", good]) == 4
    recs, bad = R.ring_pop_records(pair.tx, 512, 1 << 20)
    assert [r.call_id for r in recs] == [1, 1]
    assert [b for b, _ in bad] == [b"\x09" * 40, b"short"]
    assert "unknown record kind 9" in bad[0][1] and "truncated" in bad[1][1]


def test_pop_records_limits_and_a_first_record_over_max_bytes(pair):
    big = rec_bytes(1, b"x" * 3000)
    small = [rec_bytes(i, b"y") for i in range(2, 6)]
    pair.tx.push_many([big] + small)
    recs, _ = R.ring_pop_records(pair.tx, 512, 100)  # big alone, whatever max_bytes says
    assert [r.call_id for r in recs] == [1] and recs[0].payload == b"x" * 3000
    recs, _ = R.ring_pop_records(pair.tx, 2, 1 << 20)
    assert [r.call_id for r in recs] == [2, 3]
    recs, _ = R.ring_pop_records(pair.tx, 512, 1 << 20)
    assert [r.call_id for r in recs] == [4, 5]
    assert R.ring_pop_records(pair.tx, 512, 1 << 20) == ([], [])


def test_pop_records_enforces_max_record(pair):
    pair.tx.push(rec_bytes(1, b"z" * 200))
    recs, bad = R.ring_pop_records(pair.tx, 512, 1 << 20, 100)
    assert recs == [] and "exceeds max_record 100" in bad[0][1]


def test_corrupt_ring_raises(pair):
    pair.tx.push(rec_bytes(1, b"a"))
    import mmap
    mm = mmap.mmap(pair.fd, pair.size)
    mm[0:8] = (3).to_bytes(8, "little")  # head not a multiple of 8
    with pytest.raises(ringmod.RingCorrupt):
        R.ring_pop_records(pair.tx, 512, 1 << 20)
    mm.close()


# -- dirty tracking ----------------------------------------------------------------------------

def test_clean_record_sends_its_bytes_unchanged_and_dirty_ones_are_reencoded_once():
    data = rec_bytes(5, b"payload", meta=b"\x90")
    r = R.parse_record(data)
    assert not r.dirty and r.raw is data and r.encode() is data
    r.flags = R.F_START | R.F_END
    assert r.dirty
    bufs, n = R.wire_buffers([r])
    # header rewritten, body sent from the original bytes (no body copy)
    assert len(bufs) == 2 and len(bufs[0]) == R.HEADER_SIZE and n == len(data)
    assert R.parse_record(b"".join(bytes(b) for b in bufs)).flags == R.F_START | R.F_END
    r.payload = b"new payload"  # body change: the base is dropped, re-encoded once
    raw = r.raw
    assert type(raw) is bytes and r.raw is raw and not r.dirty
    back = R.parse_record(raw)
    assert back.payload == b"new payload" and back.meta == b"\x90" and back.call_id == 5


def test_invalid_field_on_a_dirty_record_is_refused_on_encode():
    r = R.parse_record(rec_bytes(1, b"p"))
    r.kind = 99
    with pytest.raises(R.RecordError, match="unknown record kind 99"):
        R.wire_buffers([r])


def test_parse_record_copies_anything_but_bytes_once():
    data = bytearray(rec_bytes(1, b"payload", meta=b"mm"))
    r = R.parse_record(data)
    data[4:8] = b"\xff\xff\xff\xff"  # the writer changes the header and body afterwards
    data[-7:] = b"XXXXXXX"
    assert r.payload == b"payload" and r.handle == 1
    assert R.parse_record(bytes(r.raw)).handle == 1


def test_views_and_own():
    data = rec_bytes(1, b"abc", meta=b"\x90") + rec_bytes(2, b"defg")
    recs = R.FrameDecoder().feed(data)
    assert bytes(recs[1].payload_view) == b"defg" and bytes(recs[0].meta_view) == b"\x90"
    assert recs[1].size == R.HEADER_SIZE + 4
    assert (recs[0].meta_len, recs[0].payload_len, recs[1].payload_len) == (1, 3, 4)
    assert R.Record(payload=b"12345").payload_len == 5
    recs[1].own()
    assert recs[1].raw == data[len(data) - recs[1].size:]


# -- rx ring push with handle patching ------------------------------------------------------

def test_push_records_patches_the_handle_without_copying_the_body(pair):
    datas = [rec_bytes(i, os.urandom(100 + i), handle=0) for i in range(10)]
    recs = R.FrameDecoder().feed(b"".join(datas))
    for r in recs:
        r.handle = 42
    built = R.Record(R.RESPONSE, R.F_END, 3, 9, 77, 0, 0, b"", b"made")
    assert R.ring_push_records(pair.rx, recs + [built]) == 11
    got = pair.rx.pop_batch(100)
    for d, g in zip(datas, got):
        assert g[:4] == d[:4] and g[4:8] == (42).to_bytes(4, "little") and g[8:] == d[8:]
    assert R.parse_record(got[10]) == built


def test_push_records_stops_when_full_and_resumes(pair):
    recs = [R.parse_record(rec_bytes(i, b"q" * 4000)) for i in range(40)]
    n = R.ring_push_records(pair.rx, recs)
    assert 0 < n < 40
    got = pair.rx.pop_batch(1000)
    while n < 40:
        k = R.ring_push_records(pair.rx, recs, n)
        assert k > 0
        n += k
        got += pair.rx.pop_batch(1000)
    assert [R.parse_record(g).call_id for g in got] == list(range(40))
    with pytest.raises(ValueError, match="exceeds"):
        R.ring_push_records(pair.rx, [R.parse_record(rec_bytes(0, b"x" * (1 << 16)))])


def test_ring_push_record_equals_encode_record_and_reports_full(pair):
    meta = R.encode_metadata([("k", "v")])
    assert R.ring_push_record(pair.tx, R.REQUEST, R.F_START, 0, 3, 2**64 - 1, 9, 5, meta, memoryview(b"pay"))
    assert pair.tx.pop_batch() == [R.encode_record(R.REQUEST, R.F_START, 0, 3, 2**64 - 1, 9, 5, meta, b"pay")]
    n = 0
    while R.ring_push_record(pair.tx, R.REQUEST, 0, 0, 1, n, 0, 0, b"", b"x" * 1000):
        n += 1
    assert 0 < n < 70 and len(pair.tx.pop_batch(1000)) == n
    with pytest.raises(R.RecordError, match="unknown record kind 9"):
        R.ring_push_record(pair.tx, 9, 0, 0, 0, 0, 0, 0)
    with pytest.raises(R.RecordError, match="handle -1 out of range"):
        R.ring_push_record(pair.tx, 1, 0, 0, -1, 0, 0, 0)
    with pytest.raises(ValueError, match="exceeds"):
        R.ring_push_record(pair.tx, 1, 0, 0, 0, 0, 0, 0, b"", b"x" * (1 << 17))


# -- TCP stream decoding -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 40, 41, 1000, 65536])
def test_frame_decoder_large_record_in_many_chunks(chunk):
    big = rec_bytes(1, os.urandom(300_000), meta=b"\x91\x92\xa1k\xa1v")
    small = rec_bytes(2, b"s")
    stream = small + big + small + big
    dec = R.FrameDecoder()
    out = []
    for i in range(0, len(stream), chunk):
        out += dec.feed(stream[i:i + chunk])
    assert dec.buffered == 0
    assert [bytes(r.raw) for r in out] == [small, big, small, big]


def test_frame_decoder_views_of_whole_chunk_and_memoryview_input():
    stream = b"".join(rec_bytes(i, b"p" * i) for i in range(5))
    recs = R.FrameDecoder().feed(stream)
    bufs, _ = R.wire_buffers(recs)
    assert len(bufs) == 1 and bufs[0] is stream  # nothing copied, one buffer for the batch
    buf = bytearray(stream)
    recs = R.FrameDecoder().feed(memoryview(buf))  # a reused buffer: copied before use
    buf[:] = b"\0" * len(buf)
    assert [r.payload for r in recs] == [b"p" * i for i in range(5)]


def test_frame_decoder_refuses_a_bad_header_split_over_chunks():
    dec = R.FrameDecoder(max_record=1000)
    hdr = R.HEADER.pack(1, 0, 0, 0, 1, 0, 0, 0, 0, 5000)
    assert dec.feed(hdr[:20]) == [] and dec.buffered == 20
    with pytest.raises(R.RecordError, match="exceeds max_record 1000"):
        dec.feed(hdr[20:])
    with pytest.raises(R.RecordError, match="already failed"):
        dec.feed(b"")


async def _tcp_round(stream: bytes, n: int) -> list[bytes]:
    """Send `stream` (n records back to back) over a real connection; the records received."""
    got: list = []
    done = asyncio.get_running_loop().create_future()

    def on_conn(conn):
        def on_records(recs):
            got.extend(recs)
            if len(got) >= n and not done.done():
                done.set_result(None)
        conn.set_handlers(on_records, lambda exc: None)

    server = await tcp.serve("127.0.0.1", 0, lambda: {}, on_conn)
    port = server.sockets[0].getsockname()[1]
    client = await tcp.connect("127.0.0.1", port, {})
    client.set_handlers(lambda recs: None, lambda exc: None)
    recs = R.FrameDecoder().feed(stream)  # n records, views of one buffer
    bufs, _ = R.wire_buffers(recs)
    client.send_batch(bufs, len(recs))
    await asyncio.wait_for(done, 30)
    client.close()
    server.close()
    return [bytes(r.raw) for r in got]


def test_large_records_over_tcp_arrive_whole():
    big = rec_bytes(3, os.urandom(2 * 1024 * 1024 + 13), flags=R.F_START | R.F_END)
    assert asyncio.run(_tcp_round(big * 3, 3)) == [big] * 3


def test_large_records_over_tcp_on_uvloop_read_into_their_buffer():
    uvloop = pytest.importorskip("uvloop")
    big = rec_bytes(3, os.urandom(3 * 1024 * 1024 + 5), flags=R.F_START | R.F_END)
    small = rec_bytes(4, b"tiny")
    stream = (big + small) * 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got = runner.run(_tcp_round(stream, 4))
    assert got == [big, small, big, small]


def test_frame_decoder_recv_buffer_reads_straight_into_the_record():
    big = rec_bytes(1, os.urandom(500_000))
    dec = R.FrameDecoder()
    assert dec.recv_buffer() is None  # nothing in progress: read into a scratch buffer
    assert dec.feed(big[:1000]) == []
    pos = 1000
    while True:
        view = dec.recv_buffer(1)
        if view is None:
            break
        n = min(len(view), 70_000)
        view[:n] = big[pos:pos + n]
        pos += n
        out = dec.recv_done(n)
        if out:
            break
    assert pos == len(big) and [bytes(r.raw) for r in out] == [big] and dec.buffered == 0
    assert dec.recv_buffer(1) is None
    with pytest.raises(ValueError, match="without a matching recv_buffer"):
        dec.recv_done(5)
