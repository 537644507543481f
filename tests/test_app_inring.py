"""The app library's one-copy receive path, sans daemon: App.drain leaves big records in
the rx ring while it dispatches them, the call cores decode them there (or copy them out as
bytes when they may not), the reader gets the message or the very same error it would have
got decoding itself, and the ring space is released after the batch."""
from __future__ import annotations

import threading

import pytest

import mrpcd
from mrpcd import _calls, app as appmod, wire
from mrpcd.handlers import RpcMethodHandler
from mrpcd.marshal import _ringio, codec
from mrpcd.marshal import records as R
from mrpcd.native.ring import RingPair, Waker

from test_app_fastpath import Blob, _assert_owned_bytes, _bare_app, _blob

BIG = appmod.RX_BIG_MIN


class _Sink:
    """Records what deliver() saw while the batch was still being dispatched."""

    def __init__(self) -> None:
        self.seen: list = []

    def deliver(self, rec):
        in_ring = type(rec) is _ringio.RingRecord and rec.in_ring
        self.seen.append((type(rec), in_ring, rec.decode(Blob.FromString) if in_ring else None))

    def grant(self, n):
        pass

    def lost(self, code, details):
        pass


def test_drain_dispatches_big_records_in_the_ring_then_releases_them():
    big = _blob(BIG)
    with RingPair.create(1 << 20) as pair:
        app = _bare_app(pair)
        try:
            sink = _Sink()
            app.calls[(1, 2)] = sink
            pair.rx.push(wire.response_record(1, 2, R.F_START, b"\x90"))
            pair.rx.push(wire.response_record(1, 2, 0, big.SerializeToString()))
            pair.rx.push(wire.response_record(1, 2, R.F_END, None))
            assert app.drain()
            assert [s[:2] for s in sink.seen] == [(R.Record, False), (_ringio.RingRecord, True), (R.Record, False)]
            assert sink.seen[1][2] == big
            assert pair.rx.empty() and app._held is None  # released once the batch was dispatched
            assert not app.drain()
        finally:
            app.daemon_waker.close()
            app.app_waker.close()


def test_a_failing_dispatch_still_releases_the_batch(caplog):
    with RingPair.create(1 << 20) as pair:
        app = _bare_app(pair)

        class Boom(_Sink):
            def deliver(self, rec):
                raise RuntimeError("bug in a callback")

        try:
            app.calls[(1, 2)] = Boom()
            pair.rx.push(wire.response_record(1, 2, 0, _blob(BIG).SerializeToString()))
            assert app.drain()  # the error is logged; the rest of the batch would go on
            assert pair.rx.empty() and app._held is None
            assert "bug in a callback" in caplog.text
        finally:
            app.daemon_waker.close()
            app.app_waker.close()


def _ring_records(*payloads: bytes, flags: int = 0) -> tuple[list, object, RingPair]:
    pair = RingPair.create(1 << 22)
    for i, p in enumerate(payloads):
        pair.rx.push(wire.response_record(3, 9, flags, p))
    recs, bad, held = _ringio.ring_take_records(pair.rx, 64, 1 << 22, BIG, 1 << 31)
    assert not bad and all(type(r) is _ringio.RingRecord for r in recs)
    return recs, held, pair


class _FakeApp:
    calls: dict = {}


def test_client_core_decodes_in_the_ring_and_the_reader_gets_the_message():
    want = _blob(BIG)
    recs, held, pair = _ring_records(want.SerializeToString())
    try:
        call = _calls.ClientCallCore(_FakeApp(), 3, 9, Blob.FromString, 4 << 20, None)
        call.take(recs[0])
        held.release()  # the ring space is gone; the queued message is not
        payload, _ = call.pop_message()
        assert type(payload) is _calls.Decoded
        got = call.decode(payload)
        assert got == want
        _assert_owned_bytes(got)
    finally:
        pair.close()


@pytest.mark.parametrize("garbage", [b"\xc1" * BIG, b"\x92" + b"\xc4\x00" * BIG, _blob(BIG).SerializeToString() + b"x"])
def test_decode_errors_from_the_ring_are_the_errors_decoding_would_raise(garbage):
    with pytest.raises(codec.DecodeError) as direct:
        Blob.FromString(garbage)
    recs, held, pair = _ring_records(garbage)
    try:
        call = _calls.ClientCallCore(_FakeApp(), 3, 9, Blob.FromString, 4 << 20, None)
        call.take(recs[0])
        held.release()
        payload, _ = call.pop_message()
        with pytest.raises(codec.DecodeError) as late:
            call.decode(payload)
        assert str(late.value) == str(direct.value) and late.value.__traceback__ is not None
    finally:
        pair.close()


def _server_call(rec, handler, interceptors=()):
    class FakeServer:
        app = None
        _max_receive = 4 << 20
        _interceptors = interceptors

    return _calls.ServerCallCore(FakeServer(), rec, "/fp.S/M", handler)


def test_server_core_decodes_in_the_ring_only_with_a_known_generated_deserializer():
    want = _blob(BIG)
    enc = want.SerializeToString()
    recs, held, pair = _ring_records(enc, enc, enc, enc)
    try:
        typed = RpcMethodHandler(False, False, None, Blob, Blob)
        seen = []
        plain = RpcMethodHandler(False, False, None, None, None, lambda b: seen.append(type(b)) or Blob.FromString(b), lambda r: r)
        # generated FromString, no interceptors: decoded in the ring
        call = _server_call(recs[0], typed)
        call._take(recs[0])
        # grpc-style deserializer: gets bytes, copied out while still in the ring
        call2 = _server_call(recs[1], plain)
        call2._take(recs[1])
        # interceptors not yet resolved: bytes (the handler may still change) ...
        call3 = _server_call(recs[2], typed, interceptors=(object(),))
        call3._take(recs[2])
        # ... and decoded in place once they chose the handler
        call3._resolved(typed)
        call3._take(recs[3])
        held.release()
        assert type(call._messages[0][0]) is _calls.Decoded
        assert call._decode(call._pop_request()[0]) == want
        assert call2._decode(call2._pop_request()[0]) == want and seen == [bytes]
        kinds = [type(m[0]) for m in call3._messages]
        assert kinds == [bytes, _calls.Decoded]
        assert call3._decode(call3._pop_request()[0]) == want == call3._decode(call3._pop_request()[0])
    finally:
        pair.close()


def test_server_core_bad_request_from_the_ring_keeps_its_status_text():
    garbage = b"\xc1" * BIG
    recs, held, pair = _ring_records(garbage)
    try:
        call = _server_call(recs[0], RpcMethodHandler(False, False, None, Blob, Blob))
        call._take(recs[0])
        held.release()
        with pytest.raises(_calls.BadRequest) as info:
            call._decode(call._pop_request()[0])
        ctx = _calls.ContextCore(call)
        with pytest.raises(codec.DecodeError) as direct:
            Blob.FromString(garbage)
        assert _calls.failure_status(info.value, ctx) == (mrpcd.StatusCode.INTERNAL, f"Exception deserializing request! {direct.value}")
    finally:
        pair.close()


def test_receive_limit_is_checked_before_any_decoding():
    recs, held, pair = _ring_records(_blob(BIG).SerializeToString())
    try:
        call = _calls.ClientCallCore(_FakeApp(), 3, 9, lambda b: pytest.fail("decoded"), BIG // 2, None)
        cancel = call.take(recs[0])
        assert cancel is not None and call.code is mrpcd.StatusCode.RESOURCE_EXHAUSTED
        assert call.details == f"Received message larger than max ({recs[0].payload_len} vs. {BIG // 2})"
        held.release()
    finally:
        pair.close()
