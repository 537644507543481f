"""mrpcd.marshal._pack: the send path's packer must produce exactly msgpack's bytes.

pack_parts hands big `bytes` values back by reference (Parts) instead of copying them into
one buffer; joined, the parts must equal msgpack.packb(value, use_bin_type=True) -- the
codec's Packer options -- for every value, including each of msgpack's size classes, and a
value it does not handle must raise msgpack's own error through pack_or_parts.
"""
from __future__ import annotations

import enum

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.marshal import _pack

PACK = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def joined(packed: "bytes | _pack.Parts") -> bytes:
    return packed if type(packed) is bytes else packed.tobytes()


def check(value, threshold: int = 64) -> "bytes | _pack.Parts":
    got = _pack.pack_or_parts(value, threshold)
    assert joined(got) == PACK(value)
    assert len(got) == len(PACK(value))
    return got


# Edges of every msgpack size class the packer writes itself.
INT_EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
             -1, -31, -32, -33, -127, -128, -129, -32767, -32768, -32769, -2**31 + 1, -2**31,
             -2**31 - 1, -2**63 + 1, -2**63]
LEN_EDGES = [0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536, 70000]


@pytest.mark.parametrize("value", INT_EDGES)
def test_int_widths(value):
    check(value)


@pytest.mark.parametrize("n", LEN_EDGES)
def test_str_bin_array_map_size_classes(n):
    check("s" * n)
    check("é" * n)  # UTF-8 length, not code points, picks the class
    check(b"b" * n, threshold=1 << 30)  # copied into the run
    check(b"b" * n, threshold=1)  # by reference
    check(list(range(min(n, 70000))))
    check(tuple([None] * n))
    check({i: i for i in range(n)})


@pytest.mark.parametrize("value", [None, True, False, 0.0, -0.0, 1.5, float("inf"), float("-inf"), 1e308, 5e-324])
def test_scalars(value):
    check(value)


def test_nan_is_packed_like_msgpack():
    check(float("nan"))


def test_big_bytes_go_by_reference_and_the_rest_is_packed_runs():
    big, other = b"x" * 100_000, b"y" * 40_000
    got = check((1, big, "mid", [other, 2], {"k": big}), threshold=32 * 1024)
    assert type(got) is _pack.Parts
    assert sum(1 for p in got.parts if p is big) == 2 and any(p is other for p in got.parts)
    assert all(type(p) is bytes for p in got.parts)


def test_small_values_come_back_as_one_bytes():
    assert type(_pack.pack_or_parts((1, b"x" * 100, "s"))) is bytes


class Color(enum.IntEnum):
    RED = 3


class MyList(list):
    pass


class MyStr(str):
    pass


@pytest.mark.parametrize("value", [
    Color.RED, (Color.RED, [Color.RED]), bytearray(b"ab" * 40000), memoryview(b"cd" * 40000),
    MyList([1, b"x" * 50000]), MyStr("hi"), msgpack.ExtType(5, b"ext"), {"a": (True, MyStr("x"))},
])
def test_other_types_are_packed_by_msgpack(value):
    check(value)


@pytest.mark.parametrize("value", [2**64, -2**63 - 1, "\ud800", object(), [1, {"k": 2**70}], (b"x" * 50000, object())])
def test_errors_are_msgpacks_own(value):
    with pytest.raises(Exception) as expected:
        PACK(value)
    with pytest.raises(type(expected.value)) as got:
        _pack.pack_or_parts(value, 16)
    assert str(got.value) == str(expected.value)


def test_nesting_beyond_msgpacks_limit_raises_msgpacks_error():
    deep: object = 1
    for _ in range(2000):
        deep = [deep]
    with pytest.raises(ValueError, match="recursion limit"):
        _pack.pack_or_parts(deep)
    moderately: object = b"z" * 40000
    for _ in range(600):  # deeper than this packer goes, within msgpack's limit
        moderately = (moderately,)
    check(moderately)


scalars = (
    st.none() | st.booleans()
    | st.sampled_from(INT_EDGES) | st.integers(-2**63, 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=300)
    | st.binary(max_size=300) | st.sampled_from([b"B" * 256, b"C" * 65536, b"D" * 70_001, "s" * 65536])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20) | st.lists(inner, max_size=20).map(tuple)
    | st.dictionaries(st.text(max_size=10) | st.integers(-1000, 1000), inner, max_size=20),
    max_leaves=60,
)


@settings(max_examples=400, deadline=None)
@given(values, st.sampled_from([1, 100, 256, 32 * 1024, 1 << 30]))
def test_random_nested_values_equal_msgpack(value, threshold):
    got = check(value, threshold)
    if type(got) is _pack.Parts:
        assert all(type(p) is bytes for p in got.parts)
        assert len(got) == sum(len(p) for p in got.parts)
