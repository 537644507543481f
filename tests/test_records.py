"""Records: header round trip, strict parsing, stream framing, metadata validation."""
from __future__ import annotations

import random

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.marshal import records as R
from mrpcd.marshal.records import (
    HEADER,
    HEADER_SIZE,
    MAX_META,
    FrameDecoder,
    Record,
    RecordError,
    decode_metadata,
    encode_metadata,
    encode_record,
    parse_record,
)

u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
kinds = st.sampled_from(sorted(R.KINDS))
flags = st.integers(0, R.F_ALL)


@st.composite
def record_args(draw, max_payload=300):
    return dict(
        kind=draw(kinds), flags=draw(flags), status=draw(u16), handle=draw(u32),
        call_id=draw(u64), method_id=draw(u32), deadline=draw(u64),
        meta=draw(st.binary(max_size=60)), payload=draw(st.binary(max_size=max_payload)),
    )


def header(kind=1, flags=0, status=0, handle=0, call_id=0, method_id=0, reserved=0,
           deadline=0, meta_len=0, payload_len=0) -> bytes:
    return HEADER.pack(kind, flags, status, handle, call_id, method_id, reserved, deadline,
                       meta_len, payload_len)


def test_constants():
    assert HEADER_SIZE == 40 == HEADER.size
    assert (R.REQUEST, R.RESPONSE, R.CANCEL, R.HELLO, R.GOAWAY) == (1, 2, 3, 16, 17)
    assert (R.F_START, R.F_END, R.F_NO_MSG) == (1, 2, 4)
    assert MAX_META == 64 * 1024
    assert issubclass(RecordError, ValueError)


@given(record_args())
def test_encode_parse_round_trip(a):
    data = encode_record(**a)
    assert len(data) == HEADER_SIZE + len(a["meta"]) + len(a["payload"])
    # header layout matches the documented struct exactly
    k, f, s, h, c, m, res, d, ml, pl = HEADER.unpack_from(data)
    assert (k, f, s, h, c, m, res, d, ml, pl) == (
        a["kind"], a["flags"], a["status"], a["handle"], a["call_id"], a["method_id"], 0,
        a["deadline"], len(a["meta"]), len(a["payload"]))
    for buf in (data, bytearray(data), memoryview(data)):
        r = parse_record(buf)
        for name, value in a.items():
            assert getattr(r, name) == value
        assert type(r.meta) is bytes and type(r.payload) is bytes
    r = parse_record(data)
    assert r == Record(**a)
    assert r.encode() == data


def test_record_attributes_writable_and_range_checked():
    r = Record(kind=R.RESPONSE, flags=R.F_END, status=5, payload=b"x")
    r.handle = 7
    r.call_id = 2**64 - 1
    r.meta = b"m"
    assert parse_record(r.encode()) == r
    with pytest.raises(OverflowError):
        r.kind = 256
    with pytest.raises(OverflowError):
        r.call_id = -1
    with pytest.raises(TypeError):
        r.payload = "text"
    r.payload = None
    with pytest.raises(RecordError, match="not None"):
        r.encode()
    assert "RESPONSE" in repr(Record(kind=2))


def test_payload_is_private_copy():
    data = bytearray(encode_record(R.REQUEST, R.F_START, 0, 1, 2, 3, 0, b"mm", b"payload"))
    r = parse_record(data)
    data[-7:] = b"XXXXXXX"
    data[40:42] = b"ZZ"
    assert r.payload == b"payload" and r.meta == b"mm"


@pytest.mark.parametrize("bad, message", [
    (dict(kind=300), "record kind 300 out of range"),
    (dict(kind=9), "unknown record kind 9"),
    (dict(flags=8), "unknown record flags 0x08"),
    (dict(status=-1), "record status -1 out of range"),
    (dict(handle=2**32), "record handle 4294967296 out of range"),
    (dict(call_id=2**64), "record call_id 18446744073709551616 out of range"),
    (dict(deadline="soon"), "record deadline must be an int"),
    (dict(method_id=True), "record method_id must be an int"),
    (dict(meta=b"x" * (MAX_META + 1)), f"record meta_len {MAX_META + 1} exceeds MAX_META"),
])
def test_encode_record_rejects(bad, message):
    a = dict(kind=1, flags=0, status=0, handle=0, call_id=0, method_id=0, deadline=0)
    a.update(bad)
    with pytest.raises(RecordError, match=message):
        encode_record(**a)


GOOD = encode_record(R.REQUEST, R.F_START, 0, 1, 2, 3, 4, b"meta", b"payload!")


@pytest.mark.parametrize("buf, message", [
    (b"", "record truncated: 0 bytes, header needs 40"),
    (GOOD[:39], "record truncated: 39 bytes, header needs 40"),
    (header(kind=0), "unknown record kind 0"),
    (header(kind=255), "unknown record kind 255"),
    (header(flags=0x80), "unknown record flags 0x80"),
    (header(reserved=1), "record reserved field is 1, must be 0"),
    (header(meta_len=MAX_META + 1) + b"x" * (MAX_META + 1),
     f"record meta_len {MAX_META + 1} exceeds MAX_META {MAX_META}"),
    (header(payload_len=2**32 - 1) + b"x" * 80,
     r"record length 4294967335 \(meta_len 0, payload_len 4294967295\) exceeds max_record 16777216"),
    (header(meta_len=100) + b"x" * 50, r"record meta_len 100 exceeds buffer \(50 bytes left\)"),
    (header(meta_len=10, payload_len=100) + b"x" * 50,
     r"record payload_len 100 exceeds buffer \(40 bytes left\)"),
    (GOOD[:-1], r"record payload_len 8 exceeds buffer \(7 bytes left\)"),
    (GOOD + b"\x00", r"record is 52 bytes but the buffer holds 53 \(1 trailing bytes\)"),
])
def test_parse_record_rejects(buf, message):
    with pytest.raises(RecordError, match=message):
        parse_record(buf)


def test_parse_record_payload_exceeds_buffer_with_big_limit():
    buf = header(payload_len=2**32 - 1) + b"x" * 80
    with pytest.raises(RecordError, match=r"record payload_len 4294967295 exceeds buffer \(80 bytes left\)"):
        parse_record(buf, max_record=2**40)


def test_parse_record_max_record():
    assert parse_record(GOOD, max_record=len(GOOD)).payload == b"payload!"
    with pytest.raises(RecordError, match=f"record length {len(GOOD)} .* exceeds max_record {len(GOOD) - 1}"):
        parse_record(GOOD, max_record=len(GOOD) - 1)
    with pytest.raises(ValueError, match="max_record"):
        parse_record(GOOD, max_record=10)
    with pytest.raises(TypeError):
        parse_record("not bytes")


# -- FrameDecoder ---------------------------------------------------------------------------

@settings(max_examples=200)
@given(st.lists(record_args(max_payload=200), min_size=0, max_size=8), st.data())
def test_frame_decoder_random_splits(recs, data):
    stream = b"".join(encode_record(**a) for a in recs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    pieces = [stream[i:j] for i, j in zip([0] + cuts, cuts + [len(stream)])]
    dec = FrameDecoder()
    out: list[Record] = []
    for piece in pieces:
        out += dec.feed(data.draw(st.sampled_from([bytes, bytearray, memoryview]))(piece))
        assert dec.buffered < HEADER_SIZE + 60 + 200  # never more than one partial record
    assert dec.buffered == 0
    assert out == [parse_record(encode_record(**a)) for a in recs]


def test_frame_decoder_byte_at_a_time_and_many_per_feed():
    recs = [encode_record(R.RESPONSE, R.F_END, 0, i, i, 0, 0, b"", bytes([i]) * i) for i in range(20)]
    stream = b"".join(recs)
    dec = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
    assert out == [parse_record(r) for r in recs]
    assert FrameDecoder().feed(stream) == out
    dec = FrameDecoder()
    assert dec.feed(stream + recs[10][:45]) == out
    assert dec.buffered == 45
    assert dec.feed(b"") == []
    assert dec.feed(recs[10][45:] + recs[3][:2]) == [parse_record(recs[10])]
    assert dec.buffered == 2


def test_frame_decoder_reused_read_buffer_never_leaks_into_records():
    """As the TCP transport feeds it: every read lands in one scratch bytearray that the next
    read overwrites. Parts of a big record are copied from it straight into the record
    (no bytes copy first); nothing a record holds may point into the scratch."""
    rng = random.Random(7)
    recs = [encode_record(R.REQUEST, R.F_START, 0, 1, i, 5, 0, b"m" * (i % 3), bytes([i % 251]) * rng.choice([10, 300, 70_000, 200_000]))
            for i in range(40)]
    stream = b"".join(recs)
    scratch = bytearray(65536)
    dec = FrameDecoder()
    out: list[Record] = []
    pos = 0
    while pos < len(stream):
        n = min(rng.choice([40, 1000, 65536, 30_000]), len(stream) - pos)
        scratch[:n] = stream[pos:pos + n]
        out += dec.feed(memoryview(scratch)[:n])
        scratch[:] = b"\xee" * len(scratch)  # the next read overwrites it
        pos += n
    assert [r.encode() for r in out] == recs
    big = header(payload_len=5000)
    with pytest.raises(RecordError, match="exceeds max_record 1000"):
        FrameDecoder(max_record=1000).feed(memoryview(bytearray(big + b"x" * 100)))


def test_frame_decoder_refuses_oversized_header_before_buffering():
    dec = FrameDecoder(max_record=1000)
    big = header(payload_len=5000)
    assert dec.feed(big[:20]) == []
    with pytest.raises(RecordError, match=r"record length 5040 \(meta_len 0, payload_len 5000\) exceeds max_record 1000"):
        dec.feed(big[20:])
    assert dec.buffered == 0
    with pytest.raises(RecordError, match="stream already failed"):
        dec.feed(GOOD)
    # the header alone, in one feed, is enough to refuse
    with pytest.raises(RecordError, match="exceeds max_record"):
        FrameDecoder(max_record=1000).feed(big)


def test_frame_decoder_error_keeps_good_records():
    dec = FrameDecoder()
    with pytest.raises(RecordError, match="unknown record kind 99") as info:
        dec.feed(GOOD + GOOD + header(kind=99))
    assert info.value.records == [parse_record(GOOD), parse_record(GOOD)]


@pytest.mark.parametrize("hdr, message", [
    (header(kind=5), "unknown record kind 5"),
    (header(flags=0xF0), "unknown record flags 0xf0"),
    (header(reserved=7), "reserved field is 7"),
    (header(meta_len=MAX_META + 1), "exceeds MAX_META"),
])
def test_frame_decoder_rejects_bad_headers(hdr, message):
    for split in (0, 1, 39):
        dec = FrameDecoder()
        with pytest.raises(RecordError, match=message):
            dec.feed(hdr[:split])
            dec.feed(hdr[split:])


# -- metadata -------------------------------------------------------------------------------

keys = st.from_regex(r"[0-9a-z_.\-]{1,20}", fullmatch=True)


@given(st.lists(keys.flatmap(lambda k: st.tuples(
    st.just(k), st.binary(max_size=20) if k.endswith("-bin") else st.text(max_size=20))), max_size=10))
def test_metadata_round_trip(pairs):
    data = encode_metadata(pairs)
    assert decode_metadata(data) == list(pairs)
    if not pairs:
        assert data == b""


def test_metadata_reserved_keys():
    with pytest.raises(RecordError, match="metadata key ':details' is reserved"):
        encode_metadata([(":details", "x")])
    data = encode_metadata([(":details", "boom"), ("trace-bin", b"\x00\x01")], internal=True)
    assert decode_metadata(data) == [(":details", "boom"), ("trace-bin", b"\x00\x01")]
    with pytest.raises(RecordError, match="reserved"):
        decode_metadata(data, allow_reserved=False)


@pytest.mark.parametrize("pairs, message", [
    ([("Upper", "x")], "invalid metadata key 'Upper'"),
    ([("", "x")], "invalid metadata key ''"),
    ([("sp ace", "x")], "invalid metadata key"),
    ([("caf\u00e9", "x")], "invalid metadata key"),
    ([("a:b", "x")], "invalid metadata key"),
    ([(b"key", "x")], "metadata key must be a str, got bytes"),
    ([("k", b"x")], "metadata 'k': value must be str"),
    ([("k-bin", "x")], "metadata 'k-bin': a '-bin' key takes bytes, got str"),
    ([("k", 1)], "value must be str"),
    ([("k",)], r"metadata entries must be \(key, value\) pairs"),
    ([("k", "\ud800")], "metadata cannot be encoded"),
    ([("k", "x" * MAX_META)], "exceeds MAX_META"),
])
def test_encode_metadata_rejects(pairs, message):
    with pytest.raises(RecordError, match=message):
        encode_metadata(pairs)


@pytest.mark.parametrize("data, message", [
    (b"\xc1", "malformed metadata"),
    (msgpack.packb({"a": "b"}), "expected an array of pairs, got map"),
    (msgpack.packb([["a"]]), r"entry 0 is not a \[key, value\] pair"),
    (msgpack.packb([["a", "b"], ["A", "b"]]), "entry 1: invalid metadata key 'A'"),
    (msgpack.packb([["a-bin", "text"]]), "'-bin' key takes bytes"),
    (msgpack.packb([["a", b"bin"]], use_bin_type=True), "value must be str"),
    (msgpack.packb([[1, "b"]]), "metadata key must be a str, got int"),
    (msgpack.packb([["a", "b"]]) + b"\x00", "malformed metadata"),
    (b"\x91\x92\xa1a\xa2\xff\xfe", "malformed metadata"),
    (b"\xdd\xff\xff\xff\xff", "malformed metadata"),
    (b"\x90" * (MAX_META + 1), "exceeds MAX_META"),
])
def test_decode_metadata_rejects(data, message):
    with pytest.raises(RecordError, match=message):
        decode_metadata(data)


def test_metadata_travels_in_record():
    meta = encode_metadata([("x-user", "ann"), ("x-id-bin", b"\xff")])
    r = parse_record(encode_record(R.REQUEST, R.F_START, 0, 0, 1, 2, 0, meta, b""))
    assert decode_metadata(r.meta) == [("x-user", "ann"), ("x-id-bin", b"\xff")]
    assert struct.unpack_from("<I", encode_record(1, 0, 0, 0, 0, 0, 0, meta), 32)[0] == len(meta)
