"""Out of memory while a take builds its records: nothing is lost, no ring space leaks.

Every consumer path takes records from the shared ring first and builds Python objects for
them afterwards. Should an allocation fail on the way (MemoryError), the take is given back
(ring_untake): the next take returns the same records, byte-exact and in order, and once
they are released the ring is empty again. Before, the daemon's take lost its extent (the
ring's space never came back: the app's sends stalled for good) and the other takes freed
records nobody had received.

CPython's _testcapi.set_nomemory makes every allocation from the k-th on fail; sweeping k
over the whole take reaches each allocation it makes.
"""
from __future__ import annotations

import pytest

from mrpcd.marshal import _ringio
from mrpcd.marshal import records as R
from mrpcd.native.ring import RingPair

_testcapi = pytest.importorskip("_testcapi", reason="CPython's _testcapi (set_nomemory) is not installed")

BIG = 4096
SIZES = [10, 5000, 30, 0, 9000, 200]  # small and big (>= BIG with its header) records, mixed


def rec_bytes(call_id: int, payload_len: int) -> bytes:
    payload = bytes((call_id * 7 + i) & 0xFF for i in range(payload_len))
    return R.encode_record(R.RESPONSE, R.F_START, 0, 7, call_id, 3, 0, b"", payload)


def as_bytes(rec) -> bytes:
    if type(rec) is _ringio.RingRecord:
        head = R.HEADER.pack(rec.kind, rec.flags, rec.status, rec.handle, rec.call_id, rec.method_id, 0,
                             rec.deadline, rec.meta_len, rec.payload_len)
        return head + rec.meta + rec.payload
    if isinstance(rec, R.Lease):
        return bytes(rec)
    return bytes(rec.encode())


def fill(pair: RingPair, wrap: bool) -> list[bytes]:
    if wrap:  # move the ring's indices near its end, so the batch wraps (a wrap marker)
        filler = rec_bytes(999, pair.tx.capacity // 2 - 64)
        assert pair.tx.push(filler)
        assert pair.tx.pop_batch(1)
    want = [rec_bytes(i, n) for i, n in enumerate(SIZES)]
    for w in want:
        assert pair.tx.push(w)
    return want


def starved(take, k: int):
    """take() with allocations failing from the k-th on; its result, or the MemoryError."""
    _testcapi.set_nomemory(k, 0)
    try:
        return take()
    except MemoryError as exc:
        return exc
    finally:
        _testcapi.remove_mem_hooks()


def sweep(take, check, wrap: bool) -> int:
    """Fail the k-th allocation of a take for k = 0, 1, ... until the take gets through
    (allocations are deterministic: a later k fails nothing more). After each failure the
    next take must return every record; returns how many takes failed."""
    for k in range(400):
        with RingPair.create(1 << 16) as pair:
            want = fill(pair, wrap)
            got = starved(lambda: take(pair.tx), k)
            failed = isinstance(got, MemoryError)
            if failed:
                got = take(pair.tx)  # memory is back: the same records, all of them
            check(pair.tx, got, want)
            assert pair.tx.used_bytes() == 0, f"allocation {k} failed: ring space leaked"
        if not failed:
            return k
    raise AssertionError("the take never got through")


@pytest.mark.parametrize("wrap", [False, True], ids=["flat", "wrapped"])
def test_app_take_gives_back_what_it_could_not_build(wrap):
    def take(ring):
        return _ringio.ring_take_records(ring, 64, 1 << 16, BIG)

    def check(ring, got, want):
        recs, bad, held = got
        assert not bad
        assert [as_bytes(r) for r in recs] == want
        if held is not None:
            held.release()

    assert sweep(take, check, wrap) > 3


@pytest.mark.parametrize("wrap", [False, True], ids=["flat", "wrapped"])
def test_daemon_take_gives_back_its_extent(wrap):
    def take(ring):
        return R.ring_take_records(ring, 64, 1 << 16, 1 << 20, BIG)

    def check(ring, got, want):
        recs, bad, extent, leases = got
        assert not bad
        assert len(recs) == len(want)
        for r, w in zip(recs, want):
            assert (r.call_id, r.payload_len) == (R.HEADER.unpack_from(w)[4], len(w) - R.HEADER.size)
            assert bytes(r.payload) == w[R.HEADER.size:]
        R.ring_release_bytes(ring, extent)  # the extent covers exactly what was taken

    assert sweep(take, check, wrap) > 3


@pytest.mark.parametrize("wrap", [False, True], ids=["flat", "wrapped"])
def test_pop_frees_ring_space_only_once_records_are_built(wrap):
    def take(ring):
        return R.ring_pop_records(ring, 64, 1 << 16, 1 << 20)

    def check(ring, got, want):
        recs, bad = got
        assert not bad
        assert [bytes(r.encode()) for r in recs] == want

    assert sweep(take, check, wrap) > 3


def test_untake_refuses_more_than_is_taken():
    with RingPair.create(1 << 16) as pair:
        assert pair.tx.push(rec_bytes(1, 10))
        recs, extent = pair.tx.take_more(8, BIG)
        with pytest.raises(ValueError, match="less is taken"):
            pair.tx.untake(extent + 8)
        pair.tx.untake(extent)
        again, extent2 = pair.tx.take_more(8, BIG)
        assert [bytes(r) for r in again] == [bytes(r) for r in recs] and extent2 == extent
        pair.tx.release_bytes(extent2)
        assert pair.tx.used_bytes() == 0
