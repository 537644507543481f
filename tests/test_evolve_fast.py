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

from mrpcd.marshal import codec, evolve_gen
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


# -- the byte-level check of runs copied as they are (marshal/_evolve.pyx) -------------------

_ev = pytest.importorskip("mrpcd.marshal._evolve")

SPEC_OK = {  # kind -> the Python values the spec takes (the oracle)
    "int32": lambda x: type(x) is int and -2**31 <= x < 2**31,
    "uint64": lambda x: type(x) is int and 0 <= x < 2**64,
    "int64": lambda x: type(x) is int and -2**63 <= x < 2**63,
    "bool": lambda x: type(x) is bool, "double": lambda x: type(x) is float,
    "string": lambda x: type(x) is str, "bytes": lambda x: type(x) is bytes,
}
SPECS = {"int32": (_ev.K_INT, -2**31, 2**31 - 1), "uint64": (_ev.K_INT, 0, 2**64 - 1), "int64": (_ev.K_INT, -2**63, 2**63 - 1),
         "bool": (_ev.K_BOOL, 0, 1), "double": (_ev.K_FLOAT, 0, 1), "string": (_ev.K_STR, 0, 1), "bytes": (_ev.K_BYTES, 0, 1)}


def rand_item(rng):
    """One msgpack item's bytes: canonical or not, valid UTF-8 or not, any kind."""
    r = rng.randrange(12)
    if r == 0:
        return msgpack.packb(rng.choice([0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1,
                                         -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]))
    if r == 1:  # an int in a form larger than the packer's
        v = rng.choice([0, 5, 127, 200])
        return rng.choice([b"\xcc", b"\xd0"]) + bytes([v]) if v < 128 or rng.random() < .5 else b"\xcd\x00" + bytes([v])
    if r == 2:
        return rng.choice([b"\xca\x3f\xc0\x00\x00", msgpack.packb(1.5), msgpack.packb(float("nan")), b"\xcb\x00"])
    if r == 3:
        s = rng.choice(["", "a", "ü", "x" * 31, "y" * 32, "z" * 255, "é" * 200, "w" * 70000])
        return msgpack.packb(s, use_bin_type=True)
    if r == 4:  # str in a longer form, invalid UTF-8, a surrogate
        return rng.choice([b"\xd9\x01a", b"\xda\x00\x01a", b"\xa2\xc3\x28", b"\xa3\xed\xa0\x80", b"\xa1\xff", b"\xa4\xf4\x90\x80\x80"])
    if r == 5:
        return msgpack.packb(rng.choice([b"", b"\xff", b"q" * 256, b"r" * 70000]), use_bin_type=True)
    if r == 6:
        return rng.choice([b"\xc5\x00\x01a", b"\xa1a"[:1], b"\xc4\x05ab"])
    if r == 7:
        return rng.choice([b"\xc0", b"\xc2", b"\xc3", b"\xc1", b"\xd4\x01\x02", b"\x90", b"\x80"])
    return msgpack.packb(rng.choice([0, 1, -3, 2**40, True, None, "s", b"b", 0.25]), use_bin_type=True)


def rand_array(rng, items):
    n = len(items)
    if rng.random() < 0.1 and n < 16:  # a longer header than the packer's
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = msgpack.Packer().pack_array_header(n)
    return head + b"".join(items)


def oracle(data, messages, kinds, nulls):
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return False
    if msgpack.packb(obj, use_bin_type=True) != data or type(obj) is not list:
        return False
    for y in obj:
        vals = y if messages else [y]
        if messages and (type(y) is not list or len(y) != len(kinds)):
            return False
        if not all((v is None and nl) or SPEC_OK[k](v) for v, k, nl in zip(vals, kinds, nulls)):
            return False
    return True


@pytest.mark.parametrize("seed", range(30))
def test_run_check_takes_exactly_canonical_valid_runs(seed):
    rng = random.Random(seed)
    for _ in range(150):
        messages = rng.random() < 0.5
        kinds = [rng.choice(list(SPECS)) for _ in range(rng.randint(1, 3) if messages else 1)]
        nulls = [rng.random() < 0.3 for _ in kinds]
        run = _ev.Run(messages, [(SPECS[k][0], nl, SPECS[k][1], SPECS[k][2]) for k, nl in zip(kinds, nulls)])
        count = rng.choice([0, 1, 3, 17])
        if rng.random() < 0.5:  # mostly valid items: a valid canonical run must be taken
            pool = {"int32": [0, -1, 2**31 - 1, -2**31, 300], "uint64": [0, 2**64 - 1, 2**32], "int64": [-2**63, 2**63 - 1, 5],
                    "bool": [True, False], "double": [0.5, -1e300], "string": ["", "ü", "k" * 40], "bytes": [b"", b"\xff" * 300]}

            def item(k, nl):
                return msgpack.packb(None if nl and rng.random() < 0.2 else rng.choice(pool[k]), use_bin_type=True)
        else:
            def item(k, nl):
                return rand_item(rng)
        items = []
        for _ in range(count):
            if messages:
                fields = [item(k, nl) for k, nl in zip(kinds, nulls)]
                if rng.random() < 0.05:
                    fields.append(item(kinds[0], nulls[0]))
                items.append(rand_array(rng, fields))
            else:
                items.append(item(kinds[0], nulls[0]))
        data = rand_array(rng, items)
        if rng.random() < 0.1:
            data = data[:rng.randrange(len(data) + 1)]
        pad = b"\x00" * rng.randrange(3)
        assert run.check(pad + data + pad, len(pad), len(pad) + len(data)) == oracle(data, messages, kinds, nulls), (kinds, nulls, data[:80])


def test_run_check_refuses_bad_bounds_and_specs():
    run = _ev.Run(False, [(_ev.K_INT, False, -5, 5)])
    data = msgpack.packb([1, 2])
    assert run.check(data, 0, len(data))
    assert not run.check(data, 0, len(data) + 1) and not run.check(data, -1, len(data)) and not run.check(data, 2, 1)
    assert not run.check(data, 0, len(data) - 1)
    with pytest.raises(ValueError):
        _ev.Run(False, [(_ev.K_INT, False, 1, 5)])
    with pytest.raises(ValueError):
        _ev.Run(False, [])


def test_long_runs_and_items_take_the_copying_path():
    """Runs past fixarray (16 and 65536 items), strings and bytes past their short forms, in
    a top-level repeated field: copied, equal to the reference's bytes."""
    a = schema({"t.Req": [F("v", 1, "string", label="repeated"), F("w", 2, "message", "t.Rsp", "repeated"),
                          F("i", 3, "int32", label="repeated")],
                "t.Rsp": [F("x", 1, "int64"), F("b", 2, "bytes")]})
    b = schema({"t.Req": [F("i", 3, "int64", label="repeated"), F("w", 2, "message", "t.Rsp", "repeated"),
                          F("v", 1, "string", label="repeated"), F("n", 4, "int32")],
                "t.Rsp": [F("x", 1, "int64"), F("b", 2, "bytes")]})
    tc = transcoders(a, b)["t.Req"]
    stats: dict = {}
    for n in (0, 15, 16, 70000):
        value = {"v": ["é" * (k % 300) for k in range(min(n, 400))], "i": list(range(-n, n, 7)),
                 "w": [{"x": -k * 1000, "b": b"z" * (k % 700)} for k in range(n)]}
        check(tc, codec.encode_plain(a, "t.Req", value), True, stats)
    assert stats == {"ok": 4}


FLAT_KINDS = ["int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool", "string", "bytes", "double", "enum"]
FLAT_COMPAT = {"int32": ["int64", "uint32", "uint64", "bool", "enum"], "int64": ["int32", "uint64", "bool", "enum"],
               "uint32": ["int32", "uint64", "bool"], "uint64": ["int64", "uint32", "bool"], "bool": ["int32", "uint64"],
               "sint32": ["sint64"], "sint64": ["sint32"], "string": ["bytes"], "bytes": ["string"], "double": [],
               "enum": ["int32", "int64"]}
FLAT_VALUES = {"int32": [0, 1, -1, 2**31 - 1, -2**31, 300], "int64": [0, 1, 2**40, -2**63, -129],
               "uint32": [0, 1, 2**32 - 1, 200], "uint64": [0, 1, 2**64 - 1, 2**33], "sint32": [0, -5, 70000],
               "sint64": [0, -2**40], "bool": [True, False], "string": ["", "é", "x" * 40, "y" * 300, "v" * 252, "u" * 31],
               "bytes": [b"", b"ok", b"\xff\xfe", b"z" * 300, "ü".encode(), b"w" * 252, b"t" * 31, b"s" * 32], "double": [0.0, -1.5, 1e300], "enum": [0, 1, 9]}


def flat_pair(rng, nested=False, key=None):
    fields = []
    for num in rng.sample(range(1, 12), rng.randint(1, 5)):
        kind = rng.choice(FLAT_KINDS)
        fields.append(F(f"f{num}", num, kind, "t.E" if kind == "enum" else None, rng.choice(["single", "optional"])))
    other = []
    for f in fields:
        r = rng.random()
        if r < 0.15:
            continue
        if r < 0.6 and FLAT_COMPAT[f[2]]:
            kind = rng.choice(FLAT_COMPAT[f[2]])
            f = f[:2] + (kind, "t.E" if kind == "enum" else None) + f[4:]
        other.append(f)
    for num in range(12, 12 + rng.randint(0, 2)):
        kind = rng.choice(FLAT_KINDS)
        other.append(F(f"n{num}", num, kind, "t.E" if kind == "enum" else None, rng.choice(["single", "optional"])))
    if not other:
        other.append(F("z", 20, "int32"))
    rng.shuffle(other)
    top = [F("items", 1, "message", "t.Sub", "map" if key else "repeated", key), F("k", 2, "int32")]
    if not nested:
        return ({"t.Req": top, "t.Sub": fields, "t.Rsp": []},
                {"t.Req": top[::-1] + [F("extra", 3, "string")], "t.Sub": other, "t.Rsp": []})
    # the run two levels down: t.Req.mid (a oneof member) -> t.Mid.inner -> t.In.items
    mid = [F("inner", 1, "message", "t.In"), F("q", 2, "string")]
    req = [F("mid", 1, "message", "t.Mid", oneof="o"), F("alt", 2, "int32", oneof="o")]
    return ({"t.Req": req, "t.Mid": mid, "t.In": top, "t.Sub": fields, "t.Rsp": []},
            {"t.Req": req[::-1], "t.Mid": mid + [F("w", 3, "bool")], "t.In": top[::-1] + [F("extra", 3, "string")],
             "t.Sub": other, "t.Rsp": []})


@pytest.mark.parametrize("key", [None, "string", "int64"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("seed", range(40))
def test_runs_laid_out_again_in_c(seed, nested, key):
    """A top-level repeated field of scalar-only messages whose fields were reordered,
    renamed, dropped, added or changed kind compatibly: laid out by Run.reshape, equal to
    the reference (valid payloads; mutated ones as check() says)."""
    rng = random.Random(5000 + seed)
    am, bm = flat_pair(rng, nested, key)
    a, b = schema(am), schema(bm)
    assert compare(a, b, SVC) == [], (am, bm)
    stats: dict = {}
    for src, dst, sm in ((a, b, am), (b, a, bm)):
        tc = transcoders(src, dst)["t.Req"]
        assert tc.fast is not None
        for _ in range(20):
            items = []
            for _ in range(rng.choice([0, 1, 3, 20])):
                items.append({f[0]: (None if f[4] == "optional" and rng.random() < 0.3 else rng.choice(FLAT_VALUES[f[2]]))
                              for f in sm["t.Sub"]})
            if key == "string":
                items = {f"k{j % 7}": x for j, x in enumerate(items)}
            elif key:
                items = {rng.choice([0, 1, -1, 2**40, 300, -2**63]) + j: x for j, x in enumerate(items)}
            value = {"items": items, "k": 3}
            if nested:
                value = rng.choice([{"mid": {"inner": value, "q": "q"}}, {"mid": {"inner": None, "q": ""}},
                                    {"alt": 4}, {"mid": None}])
            try:
                data = codec.encode_plain(src, "t.Req", value)
            except codec.EncodeError:
                continue
            check(tc, data, True, stats)
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
            for _ in range(4):
                try:
                    check(tc, msgpack.packb(corrupt(rng, obj), use_bin_type=True), False, stats)
                except (TypeError, ValueError, OverflowError):
                    pass
    assert stats.get("ok", 0) > 10


def test_reshape_is_exercised():
    n = 0
    for seed in range(40):
        am, bm = flat_pair(random.Random(5000 + seed))
        gen = evolve_gen.FastGen(schema(am), schema(bm))
        gen.compile("t.Req")
        n += sum(1 for run in gen.runs("t.Req").values() if run.reshaped)
        am, bm = flat_pair(random.Random(5000 + seed), nested=True)
        gen = evolve_gen.FastGen(schema(am), schema(bm))
        assert gen.function("t.Req") is not None
        assert gen.splices[("t.Req", 0)] and gen.splices[("t.Mid", 1)] and gen.splices[("t.In", 2)]
    assert n > 25


def test_a_generator_failure_costs_speed_not_the_plan(monkeypatch):
    a, b = sch(ONEOF_A), sch(ONEOF_B)
    value = {"a": 5, "r": {"x": 1, "req": None}}
    data = codec.encode_plain(a, "t.Req", value)
    want = transcoders(a, b)["t.Req"](data)

    def broken(self, name):
        raise AssertionError("a bug")
    monkeypatch.setattr(evolve_gen.FastGen, "function", broken)
    tc = transcoders(a, b)["t.Req"]
    assert tc.fast is None and tc(data) == want == tc.reference(data)


@pytest.mark.parametrize("values", ["scalars", "messages", "changed"])
def test_a_map_with_equal_keys_twice_is_the_references(values):
    """msgpack's dict keeps one entry of two equal keys (the first's place, the last's value):
    the byte path must not copy both."""
    sub_a = [F("x", 1, "int32"), F("s", 2, "string")]
    sub_b = sub_a if values != "changed" else [F("s", 2, "string"), F("x", 1, "int64"), F("n", 3, "bool")]
    kind = "int32" if values == "scalars" else "message"
    ref = None if values == "scalars" else "t.Sub"
    a = schema({"t.Req": [F("m", 1, kind, ref, "map", "string")], "t.Sub": sub_a, "t.Rsp": []})
    b = schema({"t.Req": [F("m", 1, kind, ref, "map", "string"), F("e", 2, "int32")], "t.Sub": sub_b, "t.Rsp": []})
    tc = transcoders(a, b)["t.Req"]
    pk = msgpack.Packer(use_bin_type=True)
    v1, v2 = (5, 6) if values == "scalars" else ([1, "a"], [2, "b"])
    for entries in ([("k", v1), ("j", v2)], [("k", v1), ("k", v2)], [("k", v1), ("j", v2), ("k", v2)]):
        data = pk.pack_array_header(1) + pk.pack_map_header(len(entries)) + b"".join(pk.pack(k) + pk.pack(v) for k, v in entries)
        got = tc(data)
        assert got == tc.reference(data)
        if len({k for k, _ in entries}) == len(entries):
            assert tc.fast(data) == got
        else:
            with pytest.raises(Exception):
                tc.fast(data)


@pytest.mark.parametrize("seed", range(20))
def test_run_check_of_maps_takes_exactly_canonical_valid_maps(seed):
    rng = random.Random(900 + seed)
    keys = {"string": (_ev.K_STR, 0, 1, lambda k: type(k) is str), "int32": (_ev.K_INT, -2**31, 2**31 - 1, SPEC_OK["int32"]),
            "bool": (_ev.K_BOOL, 0, 1, lambda k: type(k) is bool)}
    for _ in range(150):
        kname = rng.choice(list(keys))
        kk, klo, khi, kok = keys[kname]
        vkind = rng.choice(list(SPECS))
        run = _ev.Run(False, [(SPECS[vkind][0], False, SPECS[vkind][1], SPECS[vkind][2])], None, (kk, klo, khi))
        count = rng.choice([0, 1, 2, 15, 16, 20])
        pool = {"string": ["a", "b", "é", "k" * 40], "int32": [0, 1, -1, 2**31 - 1, 300, 2**31], "bool": [True, False]}
        items = []
        for _ in range(count):
            k = msgpack.packb(rng.choice(pool[kname]), use_bin_type=True) if rng.random() < 0.8 else rand_item(rng)
            v = (msgpack.packb(rng.choice({"int32": [1, -5], "uint64": [2**64 - 1], "int64": [3], "bool": [True],
                                           "double": [0.5], "string": ["s"], "bytes": [b"b"]}[vkind]), use_bin_type=True)
                 if rng.random() < 0.8 else rand_item(rng))
            items.append(k + v)
        head = msgpack.Packer().pack_map_header(count) if rng.random() < 0.9 or count >= 16 else b"\xde" + count.to_bytes(2, "big")
        data = head + b"".join(items)
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
            want = (msgpack.packb(obj, use_bin_type=True) == data and type(obj) is dict
                    and all(kok(k) and SPEC_OK[vkind](v) for k, v in obj.items()))
        except Exception:
            want = False
        assert run.check(data, 0, len(data)) == want, (kname, vkind, data[:60])
