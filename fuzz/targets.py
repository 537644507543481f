"""Fuzz targets: every parser the daemon runs on bytes it did not write.

Each target takes arbitrary bytes and drives one trust boundary the way the daemon does.
The parsers' documented errors (RecordError, ControlError, SchemaError, HandshakeError,
RingCorrupt, DecodeError) are the *right* answer to garbage and are swallowed here; any
other exception, a crash or a hang is a bug. The same functions serve atheris
(`fuzz/run.py`, `make fuzz`) and the regression test over the stored corpus
(tests/test_fuzz_regression.py), so a crash found once stays fixed.

* ``control``: the control-socket framing (control_proto.FrameBuffer) and what the daemon
  does with a message's contents: request dispatch field checks and Schema.from_dict, then
  fingerprints and the schema-driven payload decoder on the rest of the input.
* ``ring``: a ring whose shared memory the app scribbled on (control block and data),
  drained by one of the daemon's consumers (data[0] picks: the native batch pop with
  records.parse_record, ring_pop_records, or ring_take_records lending records in place).
* ``wire``: the daemon-to-daemon byte stream: FrameDecoder split at fuzzer-chosen points,
  then the handshake (check_hello / Handshake) and GOAWAY / metadata parsing.
"""
from __future__ import annotations

import mmap
from typing import Callable

import msgpack

from mrpcd import control_proto as cp
from mrpcd.marshal import codec
from mrpcd.marshal import records as R
from mrpcd.marshal.schema import Schema, SchemaError
from mrpcd.native import ring as ringmod
from mrpcd.transports import handshake as hs

MAX_INPUT = 1 << 16  # the fuzzers' -max_len; bigger corpus files are cut to this

# -------------------------------------------------------------------- control socket


def _schema_checks(obj: object, rest: bytes) -> None:
    try:
        schema = Schema.from_dict(obj)
    except SchemaError:
        return
    merged = Schema()
    try:
        merged.merge(schema)
    except SchemaError:
        return
    merged.fingerprints()
    for name in list(schema.messages)[:4]:
        try:
            codec.decode_plain(schema, name, rest)
        except codec.DecodeError:
            pass


def _request_checks(msg: dict) -> None:
    """The argument checks of mrpcd.daemon.control's ops, on a decoded request."""
    op, services, handle = msg.get("op"), msg.get("services"), msg.get("handle")
    if op == "schema" or "schema" in msg:
        _schema_checks(msg.get("schema"), b"")
    if op == "bind" and isinstance(services, list):
        all(isinstance(s, str) for s in services)
    if isinstance(msg.get("address"), str) or isinstance(msg.get("target"), str):
        from mrpcd.daemon.session import split_address

        for addr in (msg.get("address"), msg.get("target")):
            try:
                split_address(addr)  # type: ignore[arg-type]
            except ValueError:
                pass
    if handle is not None:
        isinstance(handle, int)


def control(data: bytes) -> None:
    frames = cp.FrameBuffer()
    cut = data[0] if data else 0
    messages: list = []
    try:
        for chunk in (data[1 : 1 + cut], data[1 + cut :]):
            messages.extend(frames.feed(chunk))
    except cp.ControlError:
        pass
    for msg in messages:
        assert isinstance(msg, dict)
        _request_checks(msg)
    # the schema path directly on the raw input (the framing rarely lets random bytes through)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=MAX_INPUT * 2)
    unpacker.feed(data)
    try:
        obj = unpacker.unpack()
    except Exception:  # not msgpack: not the code under test
        return
    rest = data[unpacker.tell() :]
    _schema_checks(obj, rest)


# -------------------------------------------------------------------- ring

_RING_CAPACITY = ringmod.MIN_CAPACITY
_EXPECTED_RING = (ringmod.RingCorrupt, R.RecordError)


def _check_meta(meta) -> None:
    if meta:
        try:
            R.decode_metadata(meta)
        except R.RecordError:
            pass


def _drain_native(r) -> bool:
    """The native ring's own batch pop, each record parsed as the daemon parses one."""
    batch = r.pop_batch(64, 1 << 20)
    for rec in batch:
        assert len(rec) <= r.max_record
        try:
            parsed = R.parse_record(rec, 1 << 20)
        except R.RecordError:
            continue
        _check_meta(parsed.meta)
    return bool(batch)


def _drain_pop_records(r) -> bool:
    """The daemon's drain with policies attached: one copy, records as views of it."""
    recs, bad = R.ring_pop_records(r, 64, 1 << 20, 1 << 20)
    for rec in recs:
        _check_meta(rec.meta)
        bytes(rec.payload)
    return bool(recs or bad)


def _drain_take_records(r) -> bool:
    """The daemon's drain without policies: records (all but too-short ones) stay in the ring
    as Leases (read in full here, as the socket would), the rest copied; then the take's
    extent is freed, as once every lease is sent."""
    recs, bad, extent, leases = R.ring_take_records(r, 64, 1 << 20, 1 << 20, 0)
    for rec in recs:
        _check_meta(rec.meta)
        assert len(bytes(rec.payload)) == rec.payload_len
    for lease in leases:
        lease.seal(None)
    if extent:
        R.ring_release_bytes(r, extent)
    return bool(recs or bad or extent)


def ring(data: bytes) -> None:
    """A scribbled ring: data[0] picks attach-or-format, the rest overwrites shared memory."""
    size = ringmod.CONTROL_SIZE + _RING_CAPACITY
    mem = mmap.mmap(-1, size)
    r = None
    try:
        mode = data[0] if data else 0
        body = data[1:]
        if mode & 1:
            # attach to memory the app filled entirely (control block included)
            mem[: min(len(body), size)] = body[:size]
            try:
                r = ringmod.Ring(mem, 0, _RING_CAPACITY)
            except (ringmod.RingCorrupt, ValueError):
                return
        else:
            # a healthy ring with a few good records, then the app scribbles on it
            r = ringmod.Ring(mem, 0, _RING_CAPACITY, init=True)
            for i in range(mode % 5):
                r.push(R.encode_record(R.REQUEST, R.F_START, 0, 1, i, 7, 0, b"", b"\x90"))
            off = int.from_bytes(body[:2], "little") % size if len(body) >= 2 else 0
            patch = body[2:]
            end = min(size, off + len(patch))
            mem[off:end] = patch[: end - off]
        consumer = (mode >> 5) % 3
        for _ in range(8):
            try:
                if consumer == 0:
                    more = _drain_native(r)
                elif consumer == 1:
                    more = _drain_pop_records(r)
                else:
                    more = _drain_take_records(r)
            except ringmod.RingCorrupt:
                return
            if not more:
                break
    finally:
        if r is not None:
            r.close()
        mem.close()


# -------------------------------------------------------------------- wire

_LOCAL = {"helloworld.Greeter": "0" * 32}


def wire(data: bytes) -> None:
    decoder = R.FrameDecoder(1 << 16)
    cuts = sorted({b * (i + 1) % (len(data) + 1) for i, b in enumerate(data[:3])})
    pieces, prev = [], 0
    for c in cuts + [len(data)]:
        pieces.append(data[prev:c])
        prev = c
    records: list = []
    for piece in pieces:
        try:
            records.extend(decoder.feed(piece))
        except R.RecordError as exc:
            records.extend(getattr(exc, "records", None) or [])
            break
    _same_in_place(pieces, records)
    server = hs.Handshake("server", _LOCAL)
    server.start()
    for rec in records[:16]:
        try:
            hs.check_hello(_LOCAL, rec)
        except hs.HandshakeError:
            pass
        if server.state == hs.WAITING:
            out = server.receive(rec)
            assert all(isinstance(b, bytes) for b in out)
        text = hs.parse_goaway(rec)
        assert isinstance(text, str)
        if rec.meta:
            try:
                R.decode_metadata(rec.meta)
            except R.RecordError:
                pass
        rec.encode()


def _same_in_place(pieces: list[bytes], records: list) -> None:
    """The receiving daemon's way (data records received into a buffer the sink gives, as
    into an app's ring) yields the same records from the same reads, malformed or not."""
    buffers: list[bytearray] = []

    def sink(total: int) -> bytearray:
        buffers.append(bytearray(total))
        return buffers[-1]

    decoder = R.FrameDecoder(1 << 16)
    decoder.set_sink(sink, 64)
    got: list = []
    for piece in pieces:
        failed = False
        try:
            out = decoder.feed(piece)
        except R.RecordError as exc:
            out, failed = list(getattr(exc, "records", None) or []), True
        got.extend((r, bytes(buffers[-1][:r.size]) if r.resident else bytes(r.raw)) for r in out)
        if failed:
            break
    assert len(got) == len(records)
    for (r, body), e in zip(got, records):
        assert (r.kind, r.flags, r.status, r.handle, r.call_id, r.method_id, r.deadline, r.size) == \
            (e.kind, e.flags, e.status, e.handle, e.call_id, e.method_id, e.deadline, e.size)
        assert body == bytes(e.raw)


TARGETS: dict[str, Callable[[bytes], None]] = {"control": control, "ring": ring, "wire": wire}
