"""Tests for mrpcd.native.ring: SPSC shared-memory rings, validation, eventfd wake-ups."""
from __future__ import annotations

import collections
import fcntl
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import time
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrpcd.native.ring import (
    CONTROL_SIZE,
    RECORD_HEADER,
    Ring,
    RingCorrupt,
    RingPair,
    Waker,
    create_shared_memory,
    layout,
    shm_size_for,
)

HEAD, TAIL, CONSUMER_SLEEPING, PRODUCER_WAITING, CAPACITY = 0, 64, 128, 132, 136


def rec_size(n: int) -> int:
    return RECORD_HEADER + (n + 7) // 8 * 8


def new_ring(capacity: int) -> tuple[mmap.mmap, Ring]:
    mm = mmap.mmap(-1, CONTROL_SIZE + capacity)
    return mm, Ring(mm, 0, capacity, init=True)


def u64(mm, off: int) -> int:
    return struct.unpack_from("<Q", mm, off)[0]


def set_u64(mm, off: int, v: int) -> None:
    struct.pack_into("<Q", mm, off, v & (2**64 - 1))


def set_u32(mm, off: int, v: int) -> None:
    struct.pack_into("<I", mm, off, v)


# ----------------------------------------------------------------------------- basics


def test_push_pop_roundtrip_and_empty():
    mm, r = new_ring(256)
    assert r.empty() and r.pop_batch() == [] and r.pop() is None
    assert r.push(b"hello")
    assert r.push(bytearray(b"world!"))
    assert r.push(memoryview(b"xy"))
    assert r.push(b"")
    assert not r.empty()
    assert r.used_bytes() == rec_size(5) + rec_size(6) + rec_size(2) + rec_size(0)
    assert r.pop_batch() == [b"hello", b"world!", b"xy", b""]
    assert r.empty() and r.free_bytes() == 256


def test_full_then_drain_then_reuse():
    mm, r = new_ring(256)
    n = 0
    while r.push(bytes([n]) * 20):  # 32 bytes a record: exactly 8 fit
        n += 1
        assert n <= 8
    assert n == 8 and r.free_bytes() == 0
    assert r.pop_batch(max_records=3) == [bytes([i]) * 20 for i in range(3)]
    assert r.push(b"a" * 20)
    assert r.pop_batch() == [bytes([i]) * 20 for i in range(3, 8)] + [b"a" * 20]


def test_too_big_record():
    mm, r = new_ring(256)
    assert r.max_record == 256 - RECORD_HEADER
    with pytest.raises(ValueError):
        r.push(b"x" * (r.max_record + 1))
    with pytest.raises(ValueError):
        r.push_many([b"ok", b"x" * 300])
    assert r.empty()  # push_many checks every size before pushing any
    assert r.push(b"m" * r.max_record)  # the largest record fills the empty ring exactly
    assert not r.push(b"")
    assert r.pop_batch() == [b"m" * r.max_record]


def test_largest_record_at_nonzero_offset_never_deadlocks():
    """A record needing the whole ring, when the head is mid-ring: the producer publishes
    the wrap filler, reports full, and prepare_wait_for_space does not let it sleep while
    the ring holds nothing the consumer could free."""
    mm, r = new_ring(128)
    assert r.push(b"abc") and r.pop_batch() == [b"abc"]  # head/tail now at 16
    big = b"B" * r.max_record
    assert r.prepare_wait_for_space(len(big)) is False  # the wrap filler can go in
    r.finish_wait()
    assert not r.push(big)  # filler published, record does not fit yet
    assert not r.empty()
    assert r.should_wake_consumer() is False  # nobody sleeps here
    assert r.prepare_wait_for_space(len(big)) is True  # now the consumer must act
    assert r.pop_batch() == []  # skips the lone wrap marker and frees its bytes
    assert r.should_wake_producer() is True
    assert r.prepare_wait_for_space(len(big)) is False
    r.finish_wait()
    assert r.push(big)
    assert r.pop_batch() == [big]


def test_batch_push_partial_and_pop_limits():
    mm, r = new_ring(512)
    recs = [bytes([i]) * (i * 3) for i in range(40)]
    n = r.push_many(recs)
    assert 0 < n < 40
    assert r.free_bytes() < rec_size(len(recs[n])) + 64
    got = r.pop_batch(max_records=5)
    assert got == recs[:5]
    got += r.pop_batch(max_bytes=50)
    assert sum(map(len, got[5:])) <= 50 and got == recs[: len(got)]
    got += r.pop_batch(max_records=1000)
    assert got == recs[:n]
    assert r.push_many(recs[n:]) > 0
    assert r.push_many([]) == 0


def test_pop_batch_returns_a_first_record_larger_than_max_bytes():
    mm, r = new_ring(256)
    assert r.push_many([b"x" * 100, b"y", b"z"]) == 3
    assert r.pop_batch(max_bytes=10) == [b"x" * 100]
    assert r.pop_batch(max_bytes=10) == [b"y", b"z"]


def test_push_many_large_records_uses_pointer_path():
    mm, r = new_ring(1 << 16)
    recs = [os.urandom(9000), bytearray(os.urandom(9001)), memoryview(os.urandom(5))]
    assert r.push_many(recs) == 3
    assert r.pop_batch() == [bytes(x) for x in recs]


def test_popped_records_are_private_copies():
    mm, r = new_ring(256)
    r.push(b"secret")
    (got,) = r.pop_batch()
    mm[CONTROL_SIZE : CONTROL_SIZE + 64] = b"X" * 64  # the app rewrites the ring afterwards
    assert got == b"secret" and type(got) is bytes


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cap_log=st.integers(6, 11),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 300)),
            st.tuples(st.just("many"), st.lists(st.integers(0, 120), max_size=12)),
            st.tuples(st.just("pop"), st.integers(1, 10), st.one_of(st.none(), st.integers(0, 400))),
        ),
        max_size=80,
    ),
)
def test_random_sequences_match_deque_model(cap_log, ops):
    cap = 1 << cap_log
    mm, r = new_ring(cap)
    model: collections.deque[bytes] = collections.deque()
    seq = 0

    def make(n: int) -> bytes:
        nonlocal seq
        seq += 1
        return (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]

    for op in ops:
        if op[0] == "push":
            data = make(op[1])
            if len(data) > r.max_record:
                with pytest.raises(ValueError):
                    r.push(data)
                continue
            was_empty = r.empty()
            if r.push(data):
                model.append(data)
            else:
                assert not r.empty()  # "full" always leaves something for the consumer
                if was_empty:  # only a wrap filler went in; after skipping it, it fits
                    assert r.pop_batch() == [] and r.push(data)
                    model.append(data)
        elif op[0] == "many":
            batch = [make(n) for n in op[1] if n <= r.max_record]
            k = r.push_many(batch)
            assert 0 <= k <= len(batch)
            model.extend(batch[:k])
            if k < len(batch):
                assert not r.empty()
        else:
            _, max_records, max_bytes = op
            got = r.pop_batch(max_records=max_records, max_bytes=max_bytes)
            assert len(got) <= max_records
            if max_bytes is not None and len(got) > 1:
                assert sum(map(len, got)) <= max_bytes
            expect = [model.popleft() for _ in range(len(got))]
            assert got == expect
            assert got or not model  # a wrap marker ahead is skipped, never returned as "empty"
        assert 0 <= r.used_bytes() <= cap
    rest = r.pop_batch(max_records=1000)
    assert r.empty()
    assert rest == list(model)
    r.close()


@pytest.mark.parametrize("cap", [64, 128, 1024, 4096])
def test_wrap_around_many_times(cap):
    mm, r = new_ring(cap)
    sizes = [(i * 37) % (cap // 2) for i in range(3000)]
    sent = collections.deque()
    got = []
    i = 0
    for _ in range(20000):  # bounded
        if i == len(sizes) and not sent:
            break
        if i < len(sizes):
            data = i.to_bytes(4, "little") * (sizes[i] // 4) + b"-" * (sizes[i] % 4)
            if r.push(data):
                sent.append(data)
                i += 1
                continue
        for rec in r.pop_batch(max_records=3):
            assert rec == sent.popleft()
            got.append(rec)
    assert i == len(sizes) and not sent and len(got) == len(sizes)


# ----------------------------------------------------------------------------- layout, memfd


def test_layout_and_pair_share_memory():
    size = shm_size_for(4096)
    lay = layout(size)
    assert lay.capacity == 4096 and lay.tx_offset == 0 and lay.rx_offset == CONTROL_SIZE + 4096
    assert lay.rx_offset % 64 == 0
    assert layout(size + 100).capacity == 4096
    with pytest.raises(ValueError):
        layout(100)
    with pytest.raises(ValueError):
        shm_size_for(1000)
    with RingPair.create(4096) as daemon:
        app = RingPair.attach(os.dup(daemon.fd), daemon.size)
        try:
            assert app.tx.push(b"request") and daemon.tx.pop_batch() == [b"request"]
            assert daemon.rx.push(b"response") and app.rx.pop_batch() == [b"response"]
            assert daemon.tx.empty() and app.rx.empty()
        finally:
            app.close()


def test_attach_rejects_inconsistent_control_block():
    with RingPair.create(1024) as daemon:
        mm = mmap.mmap(daemon.fd, daemon.size)
        set_u64(mm, daemon.layout.rx_offset + CAPACITY, 4096)
        with pytest.raises(RingCorrupt):
            RingPair.attach(os.dup(daemon.fd), daemon.size)
        set_u64(mm, daemon.layout.rx_offset + CAPACITY, 1024)
        set_u64(mm, HEAD, 5000)
        with pytest.raises(RingCorrupt):
            RingPair.attach(os.dup(daemon.fd), daemon.size)
        mm.close()
        with pytest.raises(ValueError):  # wrong size: never map past the end of the file
            RingPair.attach(os.dup(daemon.fd), daemon.size + 4096)


def test_memfd_is_sealed_against_resizing():
    fd = create_shared_memory(shm_size_for(1024))
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
        for new_size in (0, 100, shm_size_for(1024) * 2):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, new_size)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        assert os.fstat(fd).st_size == shm_size_for(1024)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- corruption


def test_bad_length_is_corrupt_and_sticky():
    mm, r = new_ring(256)
    r.push(b"a" * 10)
    r.push(b"b" * 10)
    set_u32(mm, CONTROL_SIZE + rec_size(10), 0x7FFFFFF0)  # second record's length
    assert r.pop_batch() == [b"a" * 10]  # good records before the bad one still come out
    with pytest.raises(RingCorrupt):
        r.pop_batch()
    set_u32(mm, CONTROL_SIZE + rec_size(10), 10)  # repaired: still refused (sticky)
    with pytest.raises(RingCorrupt):
        r.pop_batch()
    with pytest.raises(RingCorrupt):
        r.prepare_sleep()


@pytest.mark.parametrize(
    "scribble",
    [
        "len_past_published",
        "len_crosses_end",
        "len_over_capacity",
        "wrap_at_zero",
        "wrap_past_head",
        "head_too_far",
        "head_unaligned",
        "head_behind_tail",
    ],
)
def test_consumer_detects_corruption(scribble):
    cap = 256
    mm, r = new_ring(cap)
    assert r.push(b"x" * 20)
    if scribble == "len_past_published":
        set_u32(mm, CONTROL_SIZE, 100)  # head says 32 bytes were published
    elif scribble == "len_crosses_end":
        for _ in range(6):  # move both positions to cap - 32
            assert r.pop_batch() and r.push(b"y" * 24)
        assert r.pop_batch() == [b"y" * 24] and u64(mm, HEAD) == cap - 32
        assert r.push(b"z" * 8)
        set_u32(mm, CONTROL_SIZE + cap - 32, 25)  # needs 40 bytes, 32 left before the end
        set_u64(mm, HEAD, cap + 16)  # and claim enough bytes were published
    elif scribble == "len_over_capacity":
        set_u32(mm, CONTROL_SIZE, cap)
    elif scribble == "wrap_at_zero":
        set_u32(mm, CONTROL_SIZE, 0xFFFFFFFF)
    elif scribble == "wrap_past_head":
        assert r.pop_batch()
        set_u32(mm, CONTROL_SIZE + 32, 0xFFFFFFFF)
        set_u64(mm, HEAD, 40)  # wrap marker would skip 224 bytes, only 8 published
    elif scribble == "head_too_far":
        set_u64(mm, HEAD, cap + 8)
    elif scribble == "head_unaligned":
        set_u64(mm, HEAD, 33)
    elif scribble == "head_behind_tail":
        set_u64(mm, HEAD, 2**64 - 8)
    with pytest.raises(RingCorrupt):
        for _ in range(3):
            r.pop_batch()


def test_producer_detects_bad_tail():
    mm, r = new_ring(128)
    while r.push(b"q" * 24):
        pass
    set_u64(mm, TAIL, u64(mm, HEAD) + 64)  # consumer claims to have read past head
    with pytest.raises(RingCorrupt):
        r.push(b"q" * 24)
    mm2, r2 = new_ring(128)
    while r2.push(b"q" * 24):
        pass
    set_u64(mm2, TAIL, 3)
    with pytest.raises(RingCorrupt):
        r2.prepare_wait_for_space(24)


@settings(max_examples=300, deadline=None)
@given(
    writes=st.lists(
        st.tuples(st.integers(0, CONTROL_SIZE + 256 - 8), st.integers(0, 2**64 - 1), st.booleans()),
        min_size=1,
        max_size=6,
    ),
    pre=st.lists(st.integers(0, 100), max_size=6),
)
def test_fuzzed_shared_memory_never_crashes(writes, pre):
    """Whatever the app scribbles, the daemon gets records (within bounds) or RingCorrupt."""
    cap = 256
    mm, r = new_ring(cap)
    for n in pre:
        r.push(b"p" * n)
    r.pop_batch(max_records=1)
    for off, val, wide in writes:
        if wide:
            set_u64(mm, off // 8 * 8, val)
        else:
            set_u32(mm, off // 4 * 4, val & 0xFFFFFFFF)
    total = 0
    try:
        for _ in range(10):
            got = r.pop_batch(max_records=100)
            total += sum(len(g) + RECORD_HEADER for g in got)
            r.prepare_sleep()
            r.finish_sleep()
        r.push(b"after")
        r.prepare_wait_for_space(10)
    except RingCorrupt:
        pass
    assert total <= 11 * cap


# ----------------------------------------------------------------------------- waker


def test_waker_signal_drain_wait():
    with Waker() as w:
        assert w.drain() == 0
        t = time.monotonic()
        assert w.wait(0.01) is False
        assert time.monotonic() - t < 1.0
        w.signal()
        w.signal()
        assert w.wait(1.0) is True  # drained by wait
        assert w.drain() == 0
        w.signal()
        assert w.drain() == 1
        assert fcntl.fcntl(w.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK


def test_a_waker_closed_while_another_thread_signals_never_writes_to_a_reused_fd(monkeypatch):
    """A sender signals after releasing the app's tx lock; if the app closes meanwhile
    and the fd number is reused (the next app's ring memfd), the late 8-byte eventfd write
    used to land at offset 0 of that memfd: its tx ring's head. close() now waits for a
    signal in flight, and a signal after close writes nothing."""
    import threading

    import mrpcd.native.ring as ringmod

    real_write = os.eventfd_write
    in_write = threading.Event()

    def slow_write(fd, value):
        in_write.set()
        time.sleep(0.3)  # the close and the fd's reuse happen here, in the old code
        return real_write(fd, value)

    monkeypatch.setattr(ringmod.os, "eventfd_write", slow_write)
    w = Waker()
    number = w.fileno()
    sender = threading.Thread(target=w.signal)
    sender.start()
    assert in_write.wait(5)
    w.close()  # waits for the signal in flight
    reused = os.memfd_create("reused", os.MFD_CLOEXEC)
    try:
        os.ftruncate(reused, 64)
        sender.join(5)
        assert os.pread(reused, 64, 0) == bytes(64), f"the late signal wrote into fd {number}'s next owner"
        w.signal()  # closed: nothing is written anywhere, no error
        assert w.drain() == 0
        assert os.pread(reused, 64, 0) == bytes(64)
    finally:
        os.close(reused)


def test_sleep_flags_through_the_compiled_checks():
    """records.ring_should_wake_consumer / _producer (what the app library calls, holding
    the GIL) read and clear the same flags as the Ring methods."""
    from mrpcd.marshal.records import ring_should_wake_consumer, ring_should_wake_producer

    mm, r = new_ring(256)
    assert ring_should_wake_consumer(r) is False  # nobody sleeps
    assert r.prepare_sleep() is True
    r.push(b"x")
    assert ring_should_wake_consumer(r) is True
    assert ring_should_wake_consumer(r) is False  # cleared: one signal per sleep
    assert r.should_wake_consumer() is False
    r.finish_sleep()
    assert r.pop_batch(max_records=1)
    while r.push(b"z" * 24):
        pass
    assert r.prepare_wait_for_space(24) is True
    assert r.pop_batch(max_records=1)
    assert ring_should_wake_producer(r) is True
    assert ring_should_wake_producer(r) is False
    r.finish_wait()
    r.close()
    with pytest.raises(ValueError, match="closed"):
        ring_should_wake_consumer(r)


def test_sleep_flags_single_process():
    mm, r = new_ring(256)
    assert r.prepare_sleep() is True  # empty: may sleep, flag raised
    assert struct.unpack_from("<I", mm, CONSUMER_SLEEPING)[0] == 1
    r.push(b"x")
    assert r.should_wake_consumer() is True
    assert r.should_wake_consumer() is False  # the flag was cleared: one signal per sleep
    r.finish_sleep()
    r.push(b"y")
    assert r.prepare_sleep() is False  # data present: do not sleep
    assert struct.unpack_from("<I", mm, CONSUMER_SLEEPING)[0] == 0
    assert r.should_wake_producer() is False
    while r.push(b"z" * 24):
        pass
    assert r.prepare_wait_for_space(24) is True
    assert struct.unpack_from("<I", mm, PRODUCER_WAITING)[0] == 1
    assert r.pop_batch(max_records=1)
    assert r.should_wake_producer() is True
    assert r.should_wake_producer() is False
    r.finish_wait()



def test_has_data_looks_past_taken_records_and_raises_no_flag():
    mm, r = new_ring(256)
    assert r.has_data() is False
    r.push(b"abc")
    assert r.has_data() is True
    assert struct.unpack_from("<I", mm, CONSUMER_SLEEPING)[0] == 0  # a poll, not a sleep
    assert r.take_batch(max_records=8, big_min=1)  # taken, not yet freed
    assert r.has_data() is False
    r.push(b"d")
    assert r.has_data() is True
    r.release()


def test_a_head_moved_back_behind_taken_records_is_corrupt():
    """The daemon keeps big records in the app's tx ring (taken, not freed) while sockets
    send them. An app that then wrote its head back between tail and what was taken made
    every check pass and `head - position` wrap around: has_data said "records" forever
    (the daemon's poll and pump spun) and a take read stale ring memory as records, its
    extent growing past the ring. head only moves forward: behind what was taken is corrupt."""
    mm, r = new_ring(256)
    r.push(b"a" * 40)
    r.push(b"b" * 40)
    assert [bytes(x) for x in r.take_more(max_records=8, big_min=1)[0]] == [b"a" * 40, b"b" * 40]
    set_u64(mm, HEAD, rec_size(40))  # back over the second taken record
    with pytest.raises(RingCorrupt):
        r.has_data()
    with pytest.raises(RingCorrupt):
        r.take_more(max_records=8, big_min=1)
    with pytest.raises(RingCorrupt):
        r.prepare_sleep()


def test_has_data_reports_a_corrupt_head():
    mm, r = new_ring(256)
    set_u64(mm, HEAD, 3)  # not 8-aligned: impossible
    with pytest.raises(RingCorrupt):
        r.has_data()

# ----------------------------------------------------------------------------- two processes
# The same produce()/consume() run in this process and in a child started as
# `python tests/test_ring.py --peer ...`, which maps the memfd it inherits by fd.

POOL = bytes(random.Random(1).getrandbits(8) for _ in range(1 << 16))


def stream_record(i: int, size: int) -> bytes:
    off = (i * 7919) % (len(POOL) - 512)
    body = POOL[off : off + size]
    return struct.pack("<II", i, zlib.crc32(body)) + body


def stream_sizes(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        if rng.random() < 0.2:
            yield rng.choice((0, 1, 7, 8, 9, 63, 64, 200, 400))
        else:
            yield rng.randrange(0, 260)


def produce(ring: Ring, data_w: Waker, space_w: Waker, n: int, seed: int, deadline: float) -> dict:
    stats = {"sleeps": 0, "lost": 0, "signals": 0, "records": 0, "error": None}
    rng = random.Random(seed + 1)
    it = enumerate(stream_sizes(n, seed))
    pending: list[bytes] = []
    done = False
    while time.monotonic() < deadline:
        if not pending and not done:
            for _ in range(rng.randrange(1, 33)):
                nxt = next(it, None)
                if nxt is None:
                    done = True
                    break
                pending.append(stream_record(*nxt))
        if not pending:
            return stats
        k = ring.push_many(pending)
        stats["records"] += k
        if ring.should_wake_consumer():  # after every push, even when k == 0
            data_w.signal()
            stats["signals"] += 1
        if k:
            del pending[:k]
            continue
        if ring.prepare_wait_for_space(len(pending[0])):
            stats["sleeps"] += 1
            if not space_w.wait(5.0):
                stats["lost"] += 1
        ring.finish_wait()
    stats["error"] = "producer timed out"
    return stats


def consume(ring: Ring, data_w: Waker, space_w: Waker, n: int, seed: int, deadline: float) -> dict:
    stats = {"sleeps": 0, "lost": 0, "signals": 0, "records": 0, "error": None}
    expect = enumerate(stream_sizes(n, seed))
    got = 0
    while got < n and time.monotonic() < deadline:
        recs = ring.pop_batch(max_records=64)
        if ring.should_wake_producer():  # after every pop, even an empty one
            space_w.signal()
            stats["signals"] += 1
        for rec in recs:
            i, size = next(expect)
            seq, crc = struct.unpack_from("<II", rec)
            body = rec[8:]
            if seq != i or len(body) != size or zlib.crc32(body) != crc:
                stats["error"] = f"record {i}: got seq {seq}, {len(body)} bytes"
                return stats
            got += 1
        stats["records"] = got
        if recs:
            continue
        if ring.prepare_sleep():
            stats["sleeps"] += 1
            if not data_w.wait(5.0):
                stats["lost"] += 1
        ring.finish_sleep()
    if got < n:
        stats["error"] = "consumer timed out"
    return stats


def peer_main(argv: list[str]) -> None:
    fd, size, data_fd, space_fd, n, seed = map(int, argv[:6])
    role, which = argv[6], argv[7]
    pair = RingPair.attach(fd, size)
    ring = pair.tx if which == "tx" else pair.rx
    fn = produce if role == "producer" else consume
    try:
        stats = fn(ring, Waker(data_fd), Waker(space_fd), n, seed, time.monotonic() + 60)
    except Exception as e:  # reported to the parent, which fails the test
        stats = {"error": repr(e)}
    print(json.dumps(stats))


@pytest.mark.parametrize(
    "daemon_role,which,n,capacity",
    [
        ("consumer", "tx", 200_000, 2048),  # the app streams requests into the daemon
        ("producer", "rx", 50_000, 1024),  # the daemon streams responses into the app
    ],
)
def test_two_processes_stream_with_wakeups(daemon_role, which, n, capacity):
    """Both processes run the real protocol through a small ring that wraps thousands of
    times and is full and empty over and over; every record is checked (sequence, size,
    CRC). A wake-up that never comes shows up as a 5 s wait timeout ("lost")."""
    assert n * 100 // capacity > 1000  # records average > 100 bytes: > 1000 wraps
    pair = RingPair.create(capacity)
    data_w, space_w = Waker(), Waker()
    seed = 1234 + n
    peer_role = "producer" if daemon_role == "consumer" else "consumer"
    fds = (pair.fd, data_w.fileno(), space_w.fileno())
    args = [pair.fd, pair.size, data_w.fileno(), space_w.fileno(), n, seed, peer_role, which]
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--peer", *map(str, args)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ring = pair.tx if which == "tx" else pair.rx
        fn = produce if daemon_role == "producer" else consume
        t0 = time.monotonic()
        mine = fn(ring, data_w, space_w, n, seed, t0 + 30)
        elapsed = time.monotonic() - t0
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        data_w.close()
        space_w.close()
        pair.close()
    assert proc.returncode == 0
    peer = json.loads(out)
    assert peer["error"] is None and mine["error"] is None, (peer, mine)
    assert peer["records"] == n and mine["records"] == n
    assert peer["lost"] == 0 and mine["lost"] == 0, (peer, mine)
    assert peer["sleeps"] + mine["sleeps"] > 0  # the sleep/wake path really ran
    print(f"\n{n} records in {elapsed:.2f}s; daemon {mine}, app {peer}")


if __name__ == "__main__" and sys.argv[1:2] == ["--peer"]:
    peer_main(sys.argv[2:])
