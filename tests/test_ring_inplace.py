"""Zero-copy ring operations: take_batch/release (consumer) and reserve/commit (producer).

The daemon sends big records straight out of an app's tx ring (take) and receives big
records straight into an app's rx ring (reserve); both must keep the ring's order and
never let the other side see a half-written record. Checked against a deque model.
"""
from __future__ import annotations

import collections
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.native.ring import CONTROL_SIZE, Ring


def new_ring(capacity: int) -> Ring:
    mm = mmap.mmap(-1, CONTROL_SIZE + capacity)
    return Ring(mm, 0, capacity, init=True)


def test_take_leaves_big_records_in_place_until_release():
    r = new_ring(4096)
    small, big = b"s" * 10, b"B" * 1000
    assert r.push_many([small, big, small]) == 3
    got = r.take_batch(max_records=10, big_min=500)
    assert [bytes(g) for g in got] == [small, big, small]
    assert type(got[0]) is bytes and type(got[1]) is memoryview and type(got[2]) is bytes
    used = r.used_bytes()
    assert used > 0  # nothing released yet: the producer cannot overwrite the big record
    r.release()
    assert r.empty()


def test_take_without_big_records_releases_at_once():
    r = new_ring(1024)
    r.push_many([b"a" * 8, b"b" * 16])
    assert r.take_batch(big_min=100) == [b"a" * 8, b"b" * 16]
    assert r.empty()


def test_a_new_take_or_pop_releases_the_open_take():
    r = new_ring(4096)
    r.push_many([b"x" * 600, b"y"])
    assert [bytes(v) for v in r.take_batch(max_records=1, big_min=500)] == [b"x" * 600]
    assert r.pop_batch() == [b"y"]  # not the taken record again
    assert r.empty()


def test_reserved_record_is_invisible_until_commit_and_blocks_pushes():
    r = new_ring(4096)
    view = r.reserve(100)
    assert view is not None and len(view) == 100
    assert r.empty() and r.pop_batch() == []
    assert r.push(b"later") is False  # order: the reserved record goes first
    with pytest.raises(ValueError):
        r.reserve(10)  # one reservation at a time
    view[:] = b"R" * 100
    r.commit()
    assert r.push(b"later")
    assert r.pop_batch() == [b"R" * 100, b"later"]


def test_unreserve_drops_the_record():
    r = new_ring(4096)
    r.push(b"first")
    view = r.reserve(200)
    view[:5] = b"junk!"
    r.unreserve()
    r.push(b"second")
    assert r.pop_batch() == [b"first", b"second"]


def test_reserve_on_a_full_ring_returns_none():
    r = new_ring(256)
    while r.push(b"z" * 40):
        pass
    assert r.reserve(40) is None
    r.pop_batch(max_records=100)
    assert r.reserve(40) is not None


@settings(max_examples=300)
@given(
    cap_log=st.integers(6, 11),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(0, 300)),
            st.tuples(st.just("reserve"), st.integers(0, 300), st.booleans()),
            st.tuples(st.just("take"), st.integers(1, 8), st.integers(0, 200)),
            st.tuples(st.just("release")),
            st.tuples(st.just("pop"), st.integers(1, 8)),
        ),
        max_size=80,
    ),
)
def test_random_take_and_reserve_match_deque_model(cap_log, ops):
    cap = 1 << cap_log
    r = new_ring(cap)
    model: collections.deque[bytes] = collections.deque()
    taken = 0  # records the open take still covers (still in `model`'s front)
    seq = 0

    def make(n: int) -> bytes:
        nonlocal seq
        seq += 1
        return (seq.to_bytes(4, "little") * (n // 4 + 1))[:n]

    def end_take() -> None:
        nonlocal taken
        for _ in range(taken):
            model.popleft()
        taken = 0

    for op in ops:
        if op[0] == "push":
            data = make(op[1])
            if len(data) <= r.max_record and r.push(data):
                model.append(data)
        elif op[0] == "reserve":
            data = make(op[1])
            if len(data) > r.max_record:
                continue
            view = r.reserve(len(data))
            if view is None:
                continue
            view[:] = data
            if op[2]:
                r.commit()
                model.append(data)
            else:
                r.unreserve()
        elif op[0] == "take":
            end_take()
            got = r.take_batch(max_records=op[1], big_min=op[2])
            assert [bytes(g) for g in got] == list(model)[: len(got)]
            assert got or not model
            if any(type(g) is memoryview for g in got):
                taken = len(got)
            else:
                for _ in got:
                    model.popleft()
        elif op[0] == "release":
            r.release()
            end_take()
        else:
            end_take()
            got = r.pop_batch(max_records=op[1])
            assert got == [model.popleft() for _ in range(len(got))]
    r.release()
    end_take()
    assert r.pop_batch(max_records=1000) == list(model)
    assert r.empty()


def test_a_consumer_with_records_taken_but_not_freed_may_sleep():
    """prepare_sleep looks past what is taken: a daemon whose payloads are still lent to
    sockets, with nothing new in the ring, sleeps instead of polling until they come back."""
    r = new_ring(4096)
    r.push_many([b"a" * 600, b"b" * 10])
    got, extent = r.take_more(max_records=10, big_min=500)
    assert len(got) == 2 and not r.empty()  # still taken, not freed
    assert r.prepare_sleep() is True
    r.finish_sleep()
    r.push(b"c")
    assert r.prepare_sleep() is False  # a new record past the taken ones
    r.release_bytes(extent)
    assert [bytes(x) for x in r.take_more(big_min=500)[0]] == [b"c"]
