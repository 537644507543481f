"""mrpcd.marshal._ringio: the app's one-copy ring paths, without daemons.

ring_push_parts must put exactly encode_record's bytes into the ring; ring_take_records must
give the batch back in ring order (small records as Records, big ones left in the ring as
RingRecords until release), drop malformed records with a reason and never read outside a
record whatever its header claims.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.marshal import _pack, _ringio
from mrpcd.marshal import records as R
from mrpcd.native.ring import RingPair

BIG = 4096


def rec_bytes(call_id: int, payload_len: int, meta: bytes = b"", kind: int = R.RESPONSE) -> bytes:
    payload = bytes((call_id + i) & 0xFF for i in range(payload_len))
    return R.encode_record(kind, R.F_START, 0, 7, call_id, 3, 0, meta, payload)


def as_bytes(rec) -> bytes:
    if type(rec) is _ringio.RingRecord:
        head = R.HEADER.pack(rec.kind, rec.flags, rec.status, rec.handle, rec.call_id, rec.method_id, 0, rec.deadline, rec.meta_len, rec.payload_len)
        return head + rec.meta + rec.payload
    return rec.encode()


def test_push_parts_puts_encode_records_bytes_into_the_ring():
    big = b"B" * 50_000
    payload = _pack.pack_parts((1, big, "x", big), 1000)
    assert type(payload) is _pack.Parts
    meta = R.encode_metadata([("k", "v")])
    with RingPair.create(1 << 20) as pair:
        assert _ringio.ring_push_parts(pair.tx, R.REQUEST, R.F_START, 0, 4, 5, 6, 7, meta, payload)
        got = pair.tx.pop_batch()
        assert got == [R.encode_record(R.REQUEST, R.F_START, 0, 4, 5, 6, 7, meta, payload.tobytes())]


def test_push_parts_reports_a_full_ring_and_refuses_bad_input():
    payload = _pack.pack_parts((b"P" * 40_000,), 1000)
    with RingPair.create(1 << 16) as pair:
        assert _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 1, 0, 0, b"", payload)
        assert not _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 2, 0, 0, b"", payload)  # full now
        with pytest.raises(R.RecordError):
            _ringio.ring_push_parts(pair.tx, 99, 0, 0, 1, 1, 0, 0, b"", payload)
        with pytest.raises(R.RecordError):
            _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, -1, 1, 0, 0, b"", payload)
        with pytest.raises(R.RecordError):
            _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 1, 0, 0, b"m" * (R.MAX_META + 1), payload)
        with pytest.raises(ValueError):
            _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 1, 0, 0, b"", _pack.Parts([b"ab"], 3))
        with pytest.raises(TypeError):
            _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 1, 0, 0, b"", _pack.Parts([bytearray(b"ab")], 2))
    with RingPair.create(1 << 12) as pair:
        with pytest.raises(ValueError):
            _ringio.ring_push_parts(pair.tx, R.REQUEST, 0, 0, 1, 1, 0, 0, b"", payload)  # never fits


def test_take_keeps_big_records_in_the_ring_until_release():
    sizes = [10, BIG, 20, 3 * BIG, 5]
    with RingPair.create(1 << 16) as pair:
        want = [rec_bytes(i, n) for i, n in enumerate(sizes)]
        assert pair.rx.push_many(want) == len(want)
        recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        assert not bad and held is not None and held.valid
        assert [type(r) for r in recs] == [R.Record, _ringio.RingRecord, R.Record, _ringio.RingRecord, R.Record]
        assert [as_bytes(r) for r in recs] == want
        assert recs[1].in_ring and recs[1].size == len(want[1])
        assert recs[1].decode(bytes) == want[1][R.HEADER_SIZE:]
        assert not pair.rx.empty()  # the producer cannot reuse that space yet
        held.release()
        assert pair.rx.empty() and not held.valid and not recs[1].in_ring
        with pytest.raises(ValueError, match="released"):
            recs[1].payload
        with pytest.raises(ValueError, match="released"):
            recs[1].decode(bytes)
        assert [as_bytes(r) for r in recs[::2]] == want[::2]  # the small ones are private copies
        held.release()  # idempotent


def test_small_batches_take_the_pop_path():
    with RingPair.create(1 << 16) as pair:
        pair.rx.push_many([rec_bytes(1, 10), rec_bytes(2, 20)])
        recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        assert held is None and not bad and [r.call_id for r in recs] == [1, 2] and pair.rx.empty()
        assert _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG) == ([], [], None)


def test_many_small_records_and_no_big_one_release_at_once():
    with RingPair.create(1 << 16) as pair:
        want = [rec_bytes(i, 300) for i in range(40)]  # > BIG bytes in the ring, each small
        pair.rx.push_many(want)
        recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        assert held is None and not bad and [r.encode() for r in recs] == want and pair.rx.empty()


def test_drop_invalidates_without_touching_the_ring():
    with RingPair.create(1 << 16) as pair:
        pair.rx.push(rec_bytes(1, BIG))
        recs, _, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        held.drop()
        with pytest.raises(ValueError):
            recs[0].payload
        assert not pair.rx.empty()


def test_a_decoder_that_keeps_the_view_is_caught():
    with RingPair.create(1 << 16) as pair:
        pair.rx.push(rec_bytes(1, BIG))
        recs, _, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        kept = []
        with pytest.raises(BufferError):
            recs[0].decode(lambda v: kept.append(memoryview(v)))
        kept.clear()
        held.release()


def _corrupt(data: bytes, off: int, value: bytes) -> bytes:
    return data[:off] + value + data[off + len(value):]


@pytest.mark.parametrize("where", ["big", "small"])
@pytest.mark.parametrize("how", ["payload_len", "meta_len", "kind", "reserved", "truncated"])
def test_malformed_records_are_dropped_with_a_reason(where, how):
    good = [rec_bytes(1, 10), rec_bytes(2, BIG), rec_bytes(3, 10), rec_bytes(4, BIG)]
    i = 1 if where == "big" else 2
    r = good[i]
    bad_rec = {
        "payload_len": _corrupt(r, 36, (len(r) * 3).to_bytes(4, "little")),
        "meta_len": _corrupt(r, 32, (5).to_bytes(4, "little")),
        "kind": _corrupt(r, 0, b"\x63"),
        "reserved": _corrupt(r, 20, b"\x01"),
        "truncated": r[:30] if where == "small" else r[:30] + b"\x00" * BIG,
    }[how]
    batch = good[:i] + [bad_rec] + good[i + 1:]
    with RingPair.create(1 << 16) as pair:
        pair.rx.push_many(batch)
        recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG)
        assert [as_bytes(x) for x in recs] == [b for j, b in enumerate(good) if j != i]
        assert len(bad) == 1 and bad[0][0] == bad_rec and bad[0][1]
        held.release()
        assert pair.rx.empty()


def test_max_record_applies_to_big_records():
    with RingPair.create(1 << 16) as pair:
        pair.rx.push(rec_bytes(1, BIG))
        recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 20, BIG, BIG)
        assert recs == [] and "exceeds max_record" in bad[0][1]
        if held is not None:
            held.release()


@settings(max_examples=150)
@given(st.lists(st.tuples(st.integers(0, 3 * BIG), st.integers(0, 300)), min_size=1, max_size=30),
       st.integers(1, 64), st.sampled_from([64, BIG, 2 * BIG]))
def test_random_batches_come_back_in_order_and_byte_exact(shapes, max_records, big_min):
    with RingPair.create(1 << 18) as pair:
        want = [rec_bytes(i, n, b"\x90" * m) for i, (n, m) in enumerate(shapes)]
        assert pair.rx.push_many(want) == len(want)
        got = []
        while len(got) < len(want):
            recs, bad, held = _ringio.ring_take_records(pair.rx, max_records, 1 << 20, big_min)
            assert not bad and recs
            for r in recs:
                assert (type(r) is _ringio.RingRecord) == (r.size >= big_min and held is not None)
            got.extend(as_bytes(r) for r in recs)
            if held is not None:
                held.release()
        assert got == want and pair.rx.empty()
