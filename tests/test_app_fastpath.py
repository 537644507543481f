"""The app library's fast path, sans daemon: records pushed into the tx ring without a
joined copy (wire.RecordParts + ring_push_record), the rx ring drained as zero-copy record
views (ring_pop_records), message payloads queued as views only when large (and owned when
the reader is behind), codecs decoding from buffers into bytes that own their memory."""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import pytest
from conftest import wait_until

import mrpcd
from mrpcd import _calls, app as appmod, flow, wire
from mrpcd.deadlines import DeadlineHeap
from mrpcd.handlers import RpcMethodHandler
from mrpcd.marshal import codec
from mrpcd.marshal import records as R
from mrpcd.marshal.message import Message
from mrpcd.marshal.schema import Schema
from mrpcd.native.ring import RingPair, Waker


def F(name, num, kind, ref=None, label="single", key=None):
    return [name, num, [kind, ref], label, [key, None] if key else None, None]


SCHEMA = Schema.from_dict({
    "messages": [
        ["fp.Inner", [F("s", 1, "string"), F("b", 2, "bytes")]],
        ["fp.Blob", [F("name", 1, "string"), F("data", 2, "bytes"), F("parts", 3, "bytes", label="repeated"),
                     F("by_id", 4, "bytes", label="map", key="int32"), F("inner", 5, "message", "fp.Inner"),
                     F("o_data", 6, "bytes", label="optional")]],
    ],
})


class Inner(Message):
    __slots__ = ("s", "b")


class Blob(Message):
    __slots__ = ("name", "data", "parts", "by_id", "inner", "o_data")


codec.bind(SCHEMA, {"fp.Inner": Inner, "fp.Blob": Blob})


def _blob(n: int = 100) -> Blob:
    return Blob(name="n\u00e9", data=b"d" * n, parts=[b"p1", b"p2" * n], by_id={1: b"x" * n}, inner=Inner(s="s", b=b"ib" * n), o_data=b"o")


def _assert_owned_bytes(msg: Blob) -> None:
    for value in (msg.data, *msg.parts, *msg.by_id.values(), msg.inner.b, msg.o_data):
        assert type(value) is bytes
    assert type(msg.name) is str and type(msg.inner.s) is str


@pytest.mark.parametrize("n", [0, 10, 100_000])
def test_from_string_takes_buffers_and_returns_owned_bytes(n):
    want = _blob(n)
    enc = want.SerializeToString()
    buf = bytearray(b"\xff" * 7 + enc + b"\xff" * 3)  # a view into a larger, mutable buffer
    got = Blob.FromString(memoryview(buf)[7:7 + len(enc)])
    assert got == want
    _assert_owned_bytes(got)
    buf[:] = b"\x00" * len(buf)  # the buffer is reused / freed: the message must not change
    assert got == want
    assert Blob.FromString(bytearray(enc)) == want
    with pytest.raises(codec.DecodeError):
        Blob.FromString(memoryview(enc)[:-1])


def test_record_parts_encode_like_encode_record_and_go_into_the_ring_in_one_piece():
    parts = wire.request_parts(3, 9, 77, R.F_START | R.F_END, 1000, [("k", "v")], b"payload")
    assert len(parts) == len(parts.encode()) == R.HEADER_SIZE + len(R.encode_metadata([("k", "v")])) + 7
    assert parts.encode() == wire.request_record(3, 9, 77, R.F_START | R.F_END, 1000, [("k", "v")], b"payload")
    resp = wire.response_parts(3, 9, R.F_START | R.F_END, None, [("a", "b")], mrpcd.StatusCode.NOT_FOUND, "gone", [("t", "u")])
    rec = R.parse_record(resp.encode())
    assert rec.flags & R.F_NO_MSG and rec.status == mrpcd.StatusCode.NOT_FOUND.code
    assert wire.split_response_meta(rec) == ([("a", "b")], [("t", "u")], "gone")
    with RingPair.create(1 << 16) as pair:
        assert R.ring_push_record(pair.tx, *parts.args)
        recs, bad = R.ring_pop_records(pair.tx, 16, 1 << 20)
        assert not bad and recs[0].encode() == parts.encode()


class _Sink:
    def __init__(self) -> None:
        self.got: list[R.Record] = []

    def deliver(self, rec):
        self.got.append(rec)

    def grant(self, n):
        self.got.append(n)

    def lost(self, code, details):
        pass


def _bare_app(pair: RingPair) -> appmod.App:
    """An App's ring side without a daemon: both rings of `pair`, eventfds of our own."""
    app = object.__new__(appmod.App)
    app.tx, app.rx = pair.tx, pair.rx
    app.daemon_waker, app.app_waker = Waker(), Waker()
    app._tx_lock = threading.Lock()
    app._space = threading.Condition(app._tx_lock)
    app.closed = False
    app._rx_lock, app._held = threading.RLock(), None
    app._baton, app._baton_lock, app._draining = collections.deque(), threading.Lock(), None
    app._inline_since = None
    app._control = collections.deque()
    app.call_deadlines = DeadlineHeap("mrpcd-call-deadlines")
    app.max_record = 1 << 20
    app.calls, app.servers, app.handle_listeners = {}, [], {}
    app.connect_waits = threading.Condition()
    return app


def test_app_send_try_send_and_drain_use_the_records_api(caplog):
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        try:
            parts = wire.request_parts(1, 2, 3, R.F_START, 0, (), b"x" * 100)
            app.send(parts)
            assert app.try_send(parts)
            app.send(parts.encode())  # encoded bytes still go as they are
            recs, bad = R.ring_pop_records(pair.tx, 16, 1 << 20)
            assert not bad and [r.encode() for r in recs] == [parts.encode()] * 3
            # the message-size check counts the whole record
            big = wire.request_parts(1, 2, 3, 0, 0, (), b"y" * (1 << 20))
            with pytest.raises(mrpcd.RpcError) as info:
                app.send(big)
            assert info.value.code() is mrpcd.StatusCode.RESOURCE_EXHAUSTED
            # rx: a batch popped as views and dispatched; a malformed record is logged, skipped
            sink = _Sink()
            app.calls[(1, 2)] = sink
            assert pair.rx.push(wire.response_record(1, 2, R.F_START, b"a" * 10))
            assert pair.rx.push(b"\x02" + b"\x00" * 10)  # truncated header
            assert pair.rx.push(flow.window_record(1, 2, 4096))
            with caplog.at_level(logging.ERROR, logger="mrpcd.app"):
                assert app.drain()
            assert "malformed record" in caplog.text
            assert [type(x) for x in sink.got] == [R.Record, int] and sink.got[1] == 4096
            assert sink.got[0].payload_len == 10 and bytes(sink.got[0].payload_view) == b"a" * 10
            assert not app.drain()
        finally:
            app.daemon_waker.close()
            app.app_waker.close()


def _response(call_id: int, n: int, flags: int = 0) -> R.Record:
    """A RESPONSE as the rx path sees it: a view into a batch buffer holding more records."""
    with RingPair.create(1 << 22) as pair:
        pair.rx.push(wire.response_record(3, 99, 0, b"before"))
        pair.rx.push(wire.response_record(3, call_id, flags, bytes(range(256)) * (n // 256) + b"z" * (n % 256)))
        recs, _ = R.ring_pop_records(pair.rx, 16, 1 << 22)
    return recs[1]


def test_client_core_queues_small_messages_as_bytes_and_large_ones_as_views():
    class FakeApp:
        calls: dict = {}

    call = _calls.ClientCallCore(FakeApp(), 3, 9, Blob.FromString, 4 << 20, None)
    small = _response(9, 100)
    call.take(small)
    payload, _ = call.pop_message()
    assert type(payload) is bytes and payload == small.payload
    big = _response(9, _calls.VIEW_MIN)
    call.take(big)
    payload, _ = call.pop_message()
    assert type(payload) is memoryview and payload.readonly and payload == big.payload
    assert len(payload.obj) > big.size  # the reader was not behind: a view of the whole batch, no copy
    # a reader that is behind: the queued message gets a buffer of its own (owned)
    first, second = _response(9, _calls.VIEW_MIN), _response(9, _calls.VIEW_MIN + 1)
    call.take(first)
    call.take(second)
    second_view = call.messages[1][0]
    assert len(second_view.obj) == second.size  # own(): exactly the record, not the batch
    # flow-control cost counts header + meta + payload without materialising the payload
    assert call.messages[1][1] == flow.cost(_calls.VIEW_MIN + 1, second.meta_len)
    # the receive limit is checked on payload_len
    tight = _calls.ClientCallCore(FakeApp(), 3, 10, bytes, 10, None)
    cancel = tight.take(_response(10, 11))
    assert R.parse_record(cancel).kind == R.CANCEL and tight.code is mrpcd.StatusCode.RESOURCE_EXHAUSTED


def test_server_core_hands_grpc_style_deserializers_bytes_and_generated_ones_views():
    class FakeServer:
        app = None
        _max_receive = 4 << 20
        _interceptors = ()

    seen = []
    blob = _blob(_calls.VIEW_MIN)
    enc = blob.SerializeToString()
    rec = R.parse_record(wire.request_record(3, 9, 1, R.F_START | R.F_END, 0, (), enc))
    plain = RpcMethodHandler(False, False, None, None, None, lambda b: seen.append(type(b)) or b, lambda r: r)
    call = _calls.ServerCallCore(FakeServer(), rec, "/fp.S/M", plain)
    call._take(rec)
    payload, _ = call._pop_request()
    assert type(payload) is memoryview
    assert call._decode(payload) == enc and seen == [bytes]
    typed = RpcMethodHandler(False, False, None, Blob, Blob)
    call = _calls.ServerCallCore(FakeServer(), rec, "/fp.S/M", typed)
    call._take(rec)
    got = call._decode(call._pop_request()[0])
    assert got == blob
    _assert_owned_bytes(got)


class _LockProbe:
    """A daemon waker that records whether the app's tx lock was held when signalled."""

    def __init__(self, app: appmod.App) -> None:
        self.app, self.held = app, []

    def signal(self) -> None:
        self.held.append(self.app._tx_lock.locked())

    def close(self) -> None:
        pass


def test_app_wakes_a_sleeping_daemon_after_releasing_the_tx_lock():
    """The eventfd write drops the GIL: made under the tx lock, every other sending thread
    would run only to queue on that lock (a context switch each)."""
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        real = app.daemon_waker
        app.daemon_waker = probe = _LockProbe(app)
        try:
            parts = wire.request_parts(1, 2, 3, R.F_START, 0, (), b"x" * 100)
            for send in (app.send, app.try_send):
                assert pair.tx.prepare_sleep()  # the daemon found the ring empty and sleeps
                send(parts)
                R.ring_pop_records(pair.tx, 16, 1 << 20)
            assert probe.held == [False, False]
            app.send(parts)  # the daemon is awake: no signal at all
            assert probe.held == [False, False]
        finally:
            real.close()
            app.app_waker.close()


def _blocked_callers(app: appmod.App, deadlines: list[float]) -> tuple[list, list[threading.Thread], list]:
    """One _ClientCall per deadline (0: none) and a thread blocked in each one's wait_end."""
    from mrpcd.channel import _ClientCall

    calls = [_ClientCall(app, 1, i + 1, Blob.FromString, 1 << 20, wire.Deadline(int(d * 1e6)) if d else None)
             for i, d in enumerate(deadlines)]
    returned: list = []
    threads = [threading.Thread(target=lambda c=c: (c.wait_end(), returned.append(c.call_id)), daemon=True) for c in calls]
    for t in threads:
        t.start()
    wait_until(lambda: all(c._end_waiting for c in calls), 5.0)
    return calls, threads, returned


def test_callers_ended_in_one_drain_wake_in_a_chain():
    """Inside drain() the rx thread only queues the callers its batch ended; it wakes the
    first at the end, and each woken caller wakes the next."""
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        try:
            calls, threads, returned = _blocked_callers(app, [0, 0, 0, 0])
            app._draining = threading.get_ident()  # as drain() does
            for c in calls:
                with c._cond:
                    c.end(mrpcd.StatusCode.OK, "")
            time.sleep(0.1)
            assert returned == [] and len(app._baton) == 4  # queued, nobody woken yet
            app._draining = None
            app.pass_baton()  # the end of the batch: one wake-up, the callers do the rest
            for t in threads:
                t.join(5.0)
            assert sorted(returned) == [1, 2, 3, 4] and not app._baton
            # ended from any other thread (a lost connection, close): woken at once
            calls, threads, returned = _blocked_callers(app, [0])
            calls[0].lost(mrpcd.StatusCode.UNAVAILABLE, "gone")
            threads[0].join(5.0)
            assert returned == [1] and not app._baton
        finally:
            app.daemon_waker.close()
            app.app_waker.close()


def test_a_caller_leaving_on_its_deadline_passes_the_chain_on():
    """A queued caller that gives up (deadline) before its turn is skipped, and its own
    leaving wakes the next one: the chain never stops at a thread that is gone."""
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        try:
            calls, threads, returned = _blocked_callers(app, [0.3, 0])
            app._draining = threading.get_ident()
            for c in calls:
                with c._cond:
                    c.end(mrpcd.StatusCode.OK, "")
            app._draining = None  # and nobody passes the baton: only the leaving caller can
            for t in threads:
                t.join(5.0)
            assert sorted(returned) == [1, 2] and not app._baton
            assert calls[0].code is mrpcd.StatusCode.OK  # it had ended: the deadline cancels nothing
            # a caller whose deadline passes while nobody ends its call
            calls, threads, returned = _blocked_callers(app, [0.2])
            threads[0].join(5.0)
            assert returned == [1] and calls[0].code is mrpcd.StatusCode.DEADLINE_EXCEEDED
        finally:
            app.daemon_waker.close()
            app.app_waker.close()


class _RecordingSink:
    def __init__(self, yielded: list) -> None:
        self.yielded, self.seen = yielded, []

    def deliver(self, rec: R.Record) -> None:
        self.seen.append(len(self.yielded))  # how many yields came before this record's drain

    def grant(self, n: int) -> None: ...

    def lost(self, code, details) -> None: ...


@pytest.mark.parametrize("waiting", [appmod.RX_YIELD_MIN_CALLS, appmod.RX_YIELD_MIN_CALLS - 1])
def test_rx_thread_yields_on_waking_only_with_many_calls_waiting(monkeypatch, waiting):
    """RX_YIELD_MIN_CALLS: woken with that many calls waiting, the rx thread lets the
    runnable threads go first (one sched_yield) before it drains; with fewer, it drains
    at once."""
    yielded: list = []
    monkeypatch.setattr(appmod.os, "sched_yield", lambda: yielded.append(1))
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        app._rx_gen, app._rx_ident, app._handoff_lock, app._space_waiters = 1, None, threading.Lock(), 0
        app.calls = {(1, i): _RecordingSink(yielded) for i in range(waiting)}
        rx = threading.Thread(target=app._rx_thread, args=(1,), daemon=True)
        rx.start()
        try:
            time.sleep(0.1)  # the ring is empty: the rx thread sleeps on its eventfd
            resp = wire.response_parts(1, 0, R.F_START | R.F_END, b"ok").encode()
            assert R.ring_push_records(pair.rx, [R.parse_record(resp)]) == 1
            assert R.ring_should_wake_consumer(pair.rx)  # it sleeps: signal it, as the daemon does
            app.app_waker.signal()
            sink = app.calls[(1, 0)]
            wait_until(lambda: sink.seen, 5.0)
            assert sink.seen == ([1] if waiting >= appmod.RX_YIELD_MIN_CALLS else [0])
        finally:
            app.closed = True
            app.app_waker.signal()
            rx.join(5)
            app.daemon_waker.close()
            app.app_waker.close()
        assert not rx.is_alive()


def _daemon_side_consumer(pair: RingPair, got: dict, wake_producer, stop: threading.Event, raw: bool = False) -> threading.Thread:
    """The daemon's part for a full-ring test: take one record of the tx ring every half
    millisecond and, when a sender flagged the ring, wake the app's space waiters (the
    daemon signals the app's eventfd; its rx path calls `wake_producer`). `raw`: the
    ring holds bytes that are not records, taken all the same."""

    def run() -> None:
        while not stop.is_set():
            recs, bad = R.ring_pop_records(pair.tx, 1, 1 << 20)
            assert raw or not bad
            for rec in recs:
                got.setdefault(rec.handle, []).append(rec.call_id)
            if R.ring_should_wake_producer(pair.tx):
                wake_producer()
            time.sleep(0.0005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _counting_pushes(app: appmod.App) -> list[int]:
    tries = [0]
    real = app._push

    def push(data):
        tries[0] += 1
        return real(data)

    app._push = push
    return tries


def test_senders_blocked_on_a_full_tx_ring_are_woken_one_after_another(monkeypatch):
    """Room freed in a full tx ring sends one blocked sender to push again, and each one
    that pushes passes the turn on: every record goes, in order per sender. (Woken all at
    once, each of the 12 senders tried again at every freed record, nearly all to find the
    ring full again: about ten tries per record.) No periodic re-check: a lost wake-up
    would hang a sender."""
    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)
    senders, per, size = 12, 15, 12 << 10
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        app._space_waiters = 0
        tries = _counting_pushes(app)
        got: dict[int, list[int]] = {}
        stop = threading.Event()

        def send_all(handle: int) -> None:
            for i in range(per):
                app.send(wire.request_parts(handle, i, 1, R.F_START | R.F_END, 0, (), b"x" * size), timeout=30)

        threads = [threading.Thread(target=send_all, args=(h,), daemon=True) for h in range(1, senders + 1)]
        consumer = _daemon_side_consumer(pair, got, app._wake_space_waiters, stop)
        try:
            for t in threads:
                t.start()
            _join_all(threads, 30)
            assert not any(t.is_alive() for t in threads), "a sender hangs: a wake-up was lost"
            wait_until(lambda: sum(map(len, got.values())) == senders * per, 10)
        finally:
            _release_senders(app, threads)
            stop.set()
            consumer.join(5)
            app.daemon_waker.close()
            app.app_waker.close()
        assert got == {h: list(range(per)) for h in range(1, senders + 1)}
        assert tries[0] <= 4 * senders * per, f"{tries[0]} pushes tried for {senders * per} records"


def _join_all(threads: list[threading.Thread], seconds: float) -> None:
    """Join every thread within one overall time limit."""
    end = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))


def _release_senders(app: appmod.App, threads: list[threading.Thread]) -> None:
    """Senders still blocked (a failed test) leave through `closed` before the rings are
    unmapped under them."""
    if any(t.is_alive() for t in threads):
        app.closed = True
        with app._tx_lock:
            app._space.notify_all()
        _join_all(threads, 5)


def _full_ring_record(handle: int, n: int):
    return wire.request_parts(handle, 1, 1, R.F_START | R.F_END, 0, (), b"x" * n)


def test_a_sender_leaving_on_its_deadline_keeps_the_ring_flagged_for_the_others(monkeypatch):
    """The ring's waiting flag is shared by all blocked senders: one that gives up on its
    deadline must not lower it while another still waits, or the daemon frees room without
    signalling and the other sleeps on (here: forever, the periodic re-check is off)."""
    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        app._space_waiters = 0
        while app.try_send(_full_ring_record(0, 12 << 10)):
            pass
        outcome: dict[str, object] = {}

        def patient() -> None:
            app.send(_full_ring_record(2, 100))
            outcome["patient"] = "sent"

        def hurried() -> None:
            try:
                app.send(_full_ring_record(1, 12 << 10), timeout=0.3)
            except mrpcd.RpcError as exc:
                outcome["hurried"] = exc.code()

        threads = [threading.Thread(target=patient, daemon=True), threading.Thread(target=hurried, daemon=True)]
        got: dict[int, list[int]] = {}
        stop = threading.Event()
        consumer = None
        try:
            threads[0].start()
            wait_until(lambda: app._space_waiters == 1, 5)
            threads[1].start()
            threads[1].join(5)
            assert outcome == {"hurried": mrpcd.StatusCode.DEADLINE_EXCEEDED}
            consumer = _daemon_side_consumer(pair, got, app._wake_space_waiters, stop)
            threads[0].join(10)
            assert outcome.get("patient") == "sent"
        finally:
            _release_senders(app, threads)
            stop.set()
            if consumer is not None:
                consumer.join(5)
            app.daemon_waker.close()
            app.app_waker.close()


def _bare_aio_app(pair: RingPair, loop) -> "AioApp":
    from mrpcd.aio._app import AioApp

    app = _bare_app(pair)
    app.__class__ = AioApp
    app.loop = loop
    app._space_waiters = collections.deque()
    app._space_promised = 0
    app.connect_waiters = set()
    return app


def test_aio_senders_blocked_on_a_full_tx_ring_are_woken_as_many_as_fit(monkeypatch):
    """The asyncio side: freed room wakes the waiting tasks whose records fit it, first
    come first served, and flags the ring for the rest; every record goes, in order per
    task. (Woken all at once on every drain, each task tried again each time.) No
    periodic re-check: a lost wake-up would hang a task."""
    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)
    import asyncio

    senders, per, size = 12, 15, 12 << 10

    async def body(pair: RingPair) -> tuple[dict, int]:
        loop = asyncio.get_running_loop()
        app = _bare_aio_app(pair, loop)
        tries = _counting_pushes(app)
        got: dict[int, list[int]] = {}
        stop = threading.Event()

        async def send_all(handle: int) -> None:
            for i in range(per):
                await app.send_async(wire.request_parts(handle, i, 1, R.F_START | R.F_END, 0, (), b"x" * size))

        consumer = _daemon_side_consumer(pair, got, lambda: loop.call_soon_threadsafe(app._wake_space_waiters), stop)
        try:
            await asyncio.wait_for(asyncio.gather(*(send_all(h) for h in range(1, senders + 1))), 30)
            for _ in range(1000):
                if sum(map(len, got.values())) == senders * per:
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            consumer.join(5)
            app.daemon_waker.close()
            app.app_waker.close()
        return got, tries[0]

    with RingPair.create(1 << 16) as pair:
        got, tries = asyncio.run(body(pair))
    assert got == {h: list(range(per)) for h in range(1, senders + 1)}
    assert tries <= 3 * senders * per, f"{tries} pushes tried for {senders * per} records"


def test_aio_freed_room_wakes_as_many_as_fit_and_a_cancelled_wake_is_passed_on(monkeypatch):
    """Room for two records wakes the first two waiting tasks, not the third; the first,
    cancelled before it could run, passes its wake on, so the third pushes in its place."""
    import asyncio

    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)
    size = 20 << 10

    async def body(pair: RingPair) -> None:
        app = _bare_aio_app(pair, asyncio.get_running_loop())
        while app.try_send(_full_ring_record(0, size)):  # three records fill it
            pass
        tasks = [asyncio.ensure_future(app.send_async(_full_ring_record(h, size))) for h in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert len(app._space_waiters) == 3
        recs, _ = R.ring_pop_records(pair.tx, 2, 1 << 20)  # room for two records
        assert len(recs) == 2
        app._wake_space_waiters()
        assert [h for (f, _), h in zip(app._space_waiters, (3,))] == [3]  # 1 and 2 woken
        tasks[0].cancel()
        await asyncio.wait_for(asyncio.gather(tasks[1], tasks[2]), 2)  # no daemon signal needed
        with pytest.raises(asyncio.CancelledError):
            await tasks[0]
        recs, _ = R.ring_pop_records(pair.tx, 64, 1 << 20)
        assert [r.handle for r in recs] == [0, 2, 3]
        assert app._space_promised == 0 and not app._space_waiters
        app.daemon_waker.close()
        app.app_waker.close()

    with RingPair.create(1 << 16) as pair:
        asyncio.run(body(pair))


def test_aio_try_send_leaves_the_ring_flagged_when_only_a_wrap_marker_fitted(monkeypatch):
    """try_send's "no room" must leave the ring flagged. Case: a record that has to wrap;
    room appears between its push and the flag for the wrap marker only; the push after
    it writes the marker and is full again. Returning then, with the flag lowered, the
    task waited for a signal the daemon never sent (here: forever)."""
    import asyncio

    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)

    async def body(pair: RingPair) -> None:
        loop = asyncio.get_running_loop()
        app = _bare_aio_app(pair, loop)
        tx = pair.tx
        for _ in range(16):  # 16 records of 4 KiB fill the 64 KiB ring
            assert app.try_send(b"a" * 4088)
        assert sum(map(len, R.ring_pop_records(tx, 15, 1 << 20))) == 15  # (not records: "bad")
        for _ in range(12):  # the head is at 48 KiB now, 12 KiB free
            assert app.try_send(b"b" * 4088)
        R.ring_should_wake_producer(tx)
        real, pushes = app._push, []

        def push(data):
            ok = real(data)
            pushes.append(ok)
            if len(pushes) == 1:  # the daemon takes one record right after the first try
                assert sum(map(len, R.ring_pop_records(tx, 1, 1 << 20))) == 1
                assert not R.ring_should_wake_producer(tx)
            return ok

        app._push = push
        task = asyncio.ensure_future(app.send_async(b"X" * 20000))  # needs the 16 KiB to the end
        await asyncio.sleep(0.01)
        assert not task.done() and pushes[:2] == [False, False]
        app._push = real
        stop = threading.Event()
        consumer = _daemon_side_consumer(pair, {}, lambda: loop.call_soon_threadsafe(app._wake_space_waiters), stop, raw=True)
        try:
            await asyncio.wait_for(task, 5)
        finally:
            stop.set()
            consumer.join(5)
            app.daemon_waker.close()
            app.app_waker.close()

    with RingPair.create(1 << 16) as pair:
        asyncio.run(body(pair))


def test_aio_a_task_woken_by_close_and_then_cancelled_does_not_touch_the_rings():
    """close() unmaps the rings, then wakes the waiting tasks; one cancelled before it runs
    passes no wake on (it used to read the unmapped ring: a segfault)."""
    import asyncio
    import socket

    async def body(pair: RingPair) -> None:
        app = _bare_aio_app(pair, asyncio.get_running_loop())
        app._sock, peer = socket.socketpair()
        app._watchdog = app._thread = None
        app.rings = pair
        while app.try_send(_full_ring_record(0, 12 << 10)):
            pass
        task = asyncio.ensure_future(app.send_async(_full_ring_record(1, 12 << 10)))
        await asyncio.sleep(0.01)
        assert app._space_waiters
        app.close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        peer.close()

    pair = RingPair.create(1 << 16)
    asyncio.run(body(pair))


def test_senders_blocked_on_a_full_tx_ring_are_woken_while_the_rx_thread_is_busy(monkeypatch):
    """The daemon tells of freed tx room on the app's eventfd, which the rx thread reads
    only when its ring runs empty: under a steady inflow (here every drain finds records)
    blocked senders waited for the periodic re-check (SPACE_RECHECK_S, 0.5 s each; here
    off), and went only once the inflow stopped."""
    monkeypatch.setattr(appmod, "SPACE_RECHECK_S", 600)
    senders, per, size = 4, 10, 12 << 10
    with RingPair.create(1 << 16) as pair:
        app = _bare_app(pair)
        app._space_waiters = 0
        app._handoff_lock, app._rx_gen, app._rx_ident = threading.Lock(), 1, None
        inflow = threading.Event()
        inflow.set()

        def busy_drain() -> bool:
            time.sleep(0.0005)
            return inflow.is_set() and not app.closed

        app.drain = busy_drain
        got: dict[int, list[int]] = {}
        stop = threading.Event()

        def send_all(handle: int) -> None:
            for i in range(per):
                app.send(wire.request_parts(handle, i, 1, R.F_START | R.F_END, 0, (), b"x" * size), timeout=30)

        threads = [threading.Thread(target=send_all, args=(h,), daemon=True) for h in range(1, senders + 1)]
        rx = threading.Thread(target=app._rx_thread, args=(1,), daemon=True)
        # the daemon's side: takes records, and signals the app's eventfd when a sender waits
        consumer = _daemon_side_consumer(pair, got, app.app_waker.signal, stop)
        try:
            rx.start()
            for t in threads:
                t.start()
            _join_all(threads, 5)
            during_inflow = not any(t.is_alive() for t in threads)
            inflow.clear()
            _join_all(threads, 5)
            wait_until(lambda: sum(map(len, got.values())) == senders * per, 10)
        finally:
            inflow.clear()
            _release_senders(app, threads)
            app.closed = True
            app.app_waker.signal()
            rx.join(5)
            stop.set()
            consumer.join(5)
            app.daemon_waker.close()
            app.app_waker.close()
        assert during_inflow, "blocked senders went only when the rx thread went idle"
        assert got == {h: list(range(per)) for h in range(1, senders + 1)}


def test_aio_senders_blocked_on_a_full_tx_ring_are_woken_while_the_loop_drains_a_steady_inflow():
    """mrpcd.aio: `_drain` stops after 8 batches to let other callbacks run and comes back
    (call_soon); on that path it did not wake the tasks waiting for tx room, so under a
    steady inflow they waited for the periodic re-check."""
    from mrpcd.aio._app import AioApp

    async def main() -> None:
        with RingPair.create(1 << 16) as pair:
            app = object.__new__(AioApp)
            app.tx, app.rx = pair.tx, pair.rx
            app.closed = False
            app.loop = asyncio.get_running_loop()
            app._space_waiters, app._space_promised = collections.deque(), 0
            app._drain_scheduled = False
            app.calls = {}
            drains = [0]

            def busy_drain() -> bool:
                drains[0] += 1
                return drains[0] <= 8  # one full round of 8 batches, then the ring is empty

            app.drain = busy_drain
            record = _full_ring_record(1, 12 << 10)
            while app.tx.push(record.encode()):
                pass
            waiter = app.loop.create_future()
            app._space_waiters.append((waiter, 12 << 10))
            R.ring_pop_records(pair.tx, 16, 1 << 20)  # the daemon frees the whole ring
            try:
                app._drain()  # 8 busy batches: the early return
                woken = waiter.done()
            finally:
                app.closed = True  # (the drain it scheduled must not touch the rings unmapped below)
            assert woken, "a task waiting for tx room was not woken on the busy path"

    asyncio.run(main())
