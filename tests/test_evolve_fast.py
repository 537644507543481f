"""The generated fast transcoder (marshal/evolve_gen.py) against the reference one
(Transcoder.reference, marshal/evolve.py), differentially: the same random payloads, valid
and mutated / malformed, over random schema pairs (tests/test_evolve.py's generators) and
hand-made pairs for what those do not make (oneofs, required fields, declared defaults,
float, fixed kinds, recursion to MAX_DEPTH and past it). Where the reference succeeds the
fast path must give the same bytes (and must take what an encoder made: a fast path that
falls back on valid input would only be slow); where the reference fails the fast path must refuse too,
and a call must fail with the reference's exact error."""
from __future__ import annotations

import random

import msgpack
import pytest

from mrpcd.marshal import codec
from mrpcd.marshal.evolve import TranscodeError, compare, plan_service
from mrpcd.marshal.schema import Schema
from test_evolve import SVC, F, both, mutate, rand_msg, rand_schema, schema

NAMES = ("t.Req", "t.Rsp")


def outcome(fn, data):
    try:
        return ("ok", fn(data))
    except Exception as exc:  # the reference raises TranscodeError (and nothing else on these inputs)
        return (type(exc).__name__, str(exc))


def transcoders(src: Schema, dst: Schema):
    plan = plan_service(*both(src, dst), SVC)
    if plan is None:
        return {}
    mid = dst.services[SVC].methods[0].method_id
    mp = plan.methods.get(mid)
    if mp is None:
        return {}
    return {n: tc for n, tc in (("t.Req", mp.input), ("t.Rsp", mp.output)) if tc is not None}


def check(tc, data, valid: bool, stats: dict) -> None:
    assert tc.fast is not None
    ref = outcome(tc.reference, data)
    fast = outcome(tc.fast, data)
    if ref[0] == "ok":
        # what an encoder made, the fast path takes; a mutated payload the reference takes
        # it may leave to the reference (an int in a float field, in a loop it inlines)
        if valid or fast[0] == "ok":
            assert fast == ref, (data, ref, fast)
        assert outcome(tc, data) == ref
        stats["ok"] = stats.get("ok", 0) + 1
    else:
        assert not valid or ref[0] == "TranscodeError", ref
        assert fast[0] != "ok", (data, ref, fast)  # the fast path refused it too...
        assert outcome(tc, data) == ref  # ... and the call fails exactly as it did
        stats["fail"] = stats.get("fail", 0) + 1


JUNK = [None, True, False, 0, 1, 2, -1, 2**31, -2**31 - 1, 2**32, 2**63, -2**63, 2**64 - 1, 1.5, 0.0, float("nan"),
        "", "x", "ü", b"", b"\xff", b"ok", [], [1], {}, {"k": 1}, {1: None}, [[], []], msgpack.ExtType(1, b"a")]


def corrupt(rng: random.Random, v):
    """`v` (an unpacked payload) with one node replaced, removed or added."""
    if isinstance(v, list) and v and rng.random() < 0.7:
        v = list(v)
        i = rng.randrange(len(v))
        r = rng.random()
        if r < 0.5:
            v[i] = corrupt(rng, v[i])
        elif r < 0.6:
            del v[i]
        elif r < 0.7:
            v.append(rng.choice(JUNK))
        else:
            v[i] = rng.choice(JUNK)
        return v
    if isinstance(v, dict) and v and rng.random() < 0.7:
        v = dict(v)
        k = rng.choice(list(v))
        r = rng.random()
        if r < 0.5:
            v[k] = corrupt(rng, v[k])
        elif r < 0.7:
            v[rng.choice([0, 1, 2, -5, 2**40, True, "k", "z", b"\xff", b"k", None, 1.5])] = v[k]
        else:
            v[k] = rng.choice(JUNK)
        return v
    return rng.choice(JUNK)


def payloads(rng: random.Random, src: Schema, msgs: dict, name: str, n: int):
    """(data, valid) pairs: valid encodings of random values, then mutated ones."""
    for _ in range(n):
        value = rand_msg(rng, name, msgs)
        data = codec.encode_plain(src, name, value)
        yield data, True
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        for _ in range(3):
            bad = corrupt(rng, obj)
            try:
                yield msgpack.packb(bad, use_bin_type=True), False
            except (TypeError, ValueError, OverflowError):
                pass
        b = bytearray(data)
        if b:
            b[rng.randrange(len(b))] = rng.randrange(256)
            yield bytes(b), False
            yield data[:rng.randrange(len(data))], False
        yield data + b"\x00", False


@pytest.mark.parametrize("seed", range(40))
def test_random_schema_pairs(seed):
    rng = random.Random(1000 + seed)
    a_msgs = rand_schema(rng)
    b_msgs = mutate(rng, a_msgs)
    a, b = schema(a_msgs), schema(b_msgs)
    assert compare(a, b, SVC) == []
    stats: dict = {}
    for src, dst, sm in ((a, b, a_msgs), (b, a, b_msgs)):
        for name, tc in transcoders(src, dst).items():
            for data, valid in payloads(rng, src, sm, name, 15):
                check(tc, data, valid, stats)
            # the other side's own encoding as if from the peer (mostly a wrong layout)
            for data, valid in payloads(rng, dst, b_msgs if dst is b else a_msgs, name, 3):
                check(tc, data, False, stats)


def test_the_random_pairs_exercise_both_outcomes():
    stats: dict = {}
    for seed in range(40):
        rng = random.Random(1000 + seed)
        a_msgs = rand_schema(rng)
        b_msgs = mutate(rng, a_msgs)
        a, b = schema(a_msgs), schema(b_msgs)
        for name, tc in transcoders(a, b).items():
            for data, valid in payloads(rng, a, a_msgs, name, 3):
                check(tc, data, valid, stats)
    assert stats.get("ok", 0) > 100 and stats.get("fail", 0) > 100


def sch(messages: dict, enums=None) -> Schema:
    """Like test_evolve.schema, with a field's required flag and declared default:
    F(...) + (required, default)."""
    return Schema.from_dict({
        "messages": [[n, [[f[0], f[1], [f[2], f[3]], f[4], [f[5], None] if f[5] else None, f[6], *f[7:]] for f in fs]]
                     for n, fs in messages.items()],
        "enums": [[n, vals] for n, vals in (enums or {"t.E": [["A", 0], ["B", 1]]}).items()],
        "services": [[SVC, [["Call", "t.Req", "t.Rsp", False, False]]]],
    })


ONEOF_A = {"t.Req": [F("a", 1, "int32", oneof="o"), F("b", 2, "string", oneof="o"), F("c", 3, "message", "t.Rsp", oneof="o"),
                     F("f", 4, "float"), F("g", 5, "fixed32"), F("h", 6, "sfixed64", label="repeated"),
                     F("r", 7, "message", "t.Rsp", "single", None, None) + (True,), F("z", 8, "double", label="map", key="int32")],
           "t.Rsp": [F("x", 1, "uint64"), F("req", 2, "message", "t.Req")]}
ONEOF_B = {"t.Req": [F("b", 2, "bytes", oneof="p"), F("a", 1, "int64", oneof="p"), F("d", 9, "int32", oneof="p"),
                     F("f", 4, "float"), F("g", 5, "sfixed32"), F("h", 6, "fixed64", label="repeated"),
                     F("r", 7, "message", "t.Rsp", "single", None, None) + (True,), F("z", 8, "double", label="map", key="bool"),
                     F("dflt", 10, "int32") + (False, [7]),
                     F("e", 11, "enum", "t.E"), F("s", 12, "string", label="optional")],
           "t.Rsp": [F("req", 2, "message", "t.Req"), F("x", 1, "bool"), F("y", 3, "int32", label="map", key="string")]}


def deep(depth: int, leaf):
    """t.Rsp nesting t.Req nesting t.Rsp ... `depth` messages deep, as plain data per ONEOF_A."""
    v = leaf
    for i in range(depth):
        if i % 2 == 0:
            v = {"x": 1, "req": v}
        else:
            v = {"a": None, "b": None, "c": None, "f": 1.5, "g": 3, "h": [], "r": v, "z": {}}
    return v


@pytest.mark.parametrize("flip", [False, True])
def test_oneofs_required_defaults_floats_fixed_and_depth(flip):
    a, b = sch(ONEOF_A), sch(ONEOF_B)
    assert compare(a, b, SVC) == []
    src, dst = (b, a) if flip else (a, b)
    tcs = transcoders(src, dst)
    assert set(tcs) == {"t.Req", "t.Rsp"}
    rng = random.Random(7)
    stats: dict = {}
    if not flip:
        values = [{"a": 5, "f": 0.5, "g": 7, "h": [1, 2], "r": {"x": 1, "req": None}, "z": {0: 1.0, 1: 2.0}},
                  {"b": "hé", "f": 2.0, "g": 2**31, "h": [-1], "r": {"x": 0, "req": None}, "z": {3: 1.0}},
                  {"c": {"x": 2**40, "req": None}, "r": {"x": 1, "req": {"r": {"x": 0, "req": None}}}},
                  {"a": 2**31 - 1, "r": {"x": 5, "req": None}}]
    else:
        values = [{"a": 2**40, "r": {"x": True, "req": None}, "dflt": 3}, {"b": b"\xff", "r": {"x": False, "req": None}},
                  {"b": b"ok", "d": None, "g": -1, "h": [2**63 - 1, 2**63], "r": {"x": True, "req": None},
                   "z": {True: 0.25}, "e": 1, "s": "s"}, {"d": 4, "r": {"x": True, "req": None}}]
    for value in values:
        data = codec.encode_plain(src, "t.Req", value)
        check(tcs["t.Req"], data, True, stats)
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
        for _ in range(200):
            check(tcs["t.Req"], msgpack.packb(corrupt(rng, obj), use_bin_type=True), False, stats)
        # two members of one oneof at once; a required message missing; ints in a float field
        for i, j in ((0, 1), (0, 2), (1, 2)):
            o = list(obj)
            o[i], o[j] = o[i] if o[i] is not None else 1, o[j] if o[j] is not None else "s"
            check(tcs["t.Req"], msgpack.packb(o, use_bin_type=True), False, stats)
    if not flip:
        for depth in (1, 2, 30, 62, 63, 64, 65, 66, 80, 200):
            data = msgpack.packb(codec._plain_fn(src, "t.Rsp", "_e")(deep(depth, None), 0)
                                 if depth < 64 else _deep_raw(depth), use_bin_type=True)
            check(tcs["t.Rsp"], data, False, stats)
        obj = msgpack.unpackb(codec.encode_plain(src, "t.Req", values[0]), raw=False, strict_map_key=False)
        obj[3] = 1  # an int in a float field: the peer's decoder makes it a float
        obj[7] = {0: 2, 1: 2.5}
        data = msgpack.packb(obj, use_bin_type=True)
        assert outcome(tcs["t.Req"].reference, data)[0] == "ok"
        check(tcs["t.Req"], data, False, stats)
    assert stats["ok"] > 5 and stats["fail"] > 50


def _deep_raw(depth: int):
    """A t.Rsp payload (per ONEOF_A) `depth` messages deep, built as lists (the encoder
    refuses past MAX_DEPTH)."""
    v = None
    for i in range(depth):
        v = [1, v] if i % 2 == 0 else [None, None, None, 1.5, 3, [], v, {}]
    return v


def test_errors_are_the_references_words():
    a, b = sch(ONEOF_B), sch(ONEOF_A)
    tc = transcoders(a, b)["t.Req"]
    bad = codec.encode_plain(a, "t.Req", {"a": 2**40, "r": {"x": True, "req": None}})
    with pytest.raises(TranscodeError, match=r"t\.Req\.a: value 1099511627776 out of range for int32"):
        tc(bad)
    bad = codec.encode_plain(a, "t.Req", {"b": b"\xff", "r": {"x": True, "req": None}})
    with pytest.raises(TranscodeError, match="not valid UTF-8"):
        tc(bad)
