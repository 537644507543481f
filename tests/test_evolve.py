"""Schema evolution, sans-I/O (marshal/evolve.py): compatibility by field number and
transcoding a peer's payload into the local layout."""
from __future__ import annotations

import random

import pytest

from mrpcd.marshal import codec
from mrpcd.marshal.evolve import TranscodeError, closure_schema, compare, plan_service, plan_services
from mrpcd.marshal.schema import Schema

SVC = "t.S"


def schema(messages: dict, methods=(("Call", "t.Req", "t.Rsp", False, False),), enums=None) -> Schema:
    """messages: {name: [(fname, number, kind, ref, label, key, oneof)]}"""
    return Schema.from_dict({
        "messages": [[n, [[f[0], f[1], [f[2], f[3]], f[4], [f[5], None] if f[5] else None, f[6]] for f in fs]]
                     for n, fs in messages.items()],
        "enums": [[n, vals] for n, vals in (enums or {"t.E": [["A", 0], ["B", 1]]}).items()],
        "services": [[SVC, [list(m) for m in methods]]],
    })


def F(name, number, kind, ref=None, label="single", key=None, oneof=None):
    return (name, number, kind, ref, label, key, oneof)


V1 = {
    "t.Req": [F("name", 1, "string"), F("count", 2, "int32"), F("inner", 3, "message", "t.Inner"),
              F("items", 4, "message", "t.Inner", "repeated"), F("tags", 5, "message", "t.Inner", "map", "string"),
              F("old", 6, "bool")],
    "t.Inner": [F("x", 1, "int64"), F("s", 2, "string")],
    "t.Rsp": [F("text", 1, "string")],
}
V2 = {
    # reordered, count renamed, old (6) removed, level (7) and color (8) added
    "t.Req": [F("inner", 3, "message", "t.Inner"), F("name", 1, "string"), F("number", 2, "int32"),
              F("items", 4, "message", "t.Inner", "repeated"), F("tags", 5, "message", "t.Inner", "map", "string"),
              F("level", 7, "double"), F("color", 8, "enum", "t.E"), F("more", 9, "string", label="repeated")],
    # nested: s removed, y added
    "t.Inner": [F("x", 1, "int64"), F("y", 3, "string", label="optional")],
    "t.Rsp": [F("text", 1, "string"), F("extra", 2, "bytes")],
}


def both(a: Schema, b: Schema):
    pa, _ = closure_schema(a.closure(SVC))
    pb, _ = closure_schema(b.closure(SVC))
    return pa, pb


def test_closure_roundtrip_and_identical_needs_no_plan():
    a = schema(V1)
    pa, name = closure_schema(a.closure(SVC))
    assert name == SVC and pa.fingerprint(SVC) == a.fingerprint(SVC)
    assert compare(pa, a, SVC) == []
    assert plan_service(pa, a, SVC) is None


def test_rename_only_and_new_method_need_no_plan():
    v = {k: list(fs) for k, fs in V1.items()}
    v["t.Rsp"] = [F("body", 1, "string")]
    b = schema(v, methods=(("Call", "t.Req", "t.Rsp", False, False), ("New", "t.Rsp", "t.Rsp", False, True)))
    pa, pb = both(schema(V1), b)
    assert pa.fingerprint(SVC) != pb.fingerprint(SVC)
    assert compare(pa, pb, SVC) == [] and plan_service(pa, pb, SVC) is None


def test_v1_to_v2_and_back():
    a, b = schema(V1), schema(V2)
    assert compare(a, b, SVC) == [] and compare(b, a, SVC) == []
    plan = plan_service(a, b, SVC)
    mp = plan.methods[b.services[SVC].methods[0].method_id]
    value = {"name": "n", "count": 7, "inner": {"x": 1, "s": "dropped"}, "items": [{"x": 2, "s": "a"}],
             "tags": {"k": {"x": 3, "s": "b"}}, "old": True}
    out = codec.decode_plain(b, "t.Req", mp.input(codec.encode_plain(a, "t.Req", value)))
    assert out == {"inner": {"x": 1, "y": None}, "name": "n", "number": 7, "items": [{"x": 2, "y": None}],
                   "tags": {"k": {"x": 3, "y": None}}, "level": 0.0, "color": 0, "more": []}
    back = plan_service(b, a, SVC).methods[a.services[SVC].methods[0].method_id]
    out = codec.decode_plain(a, "t.Req", back.input(codec.encode_plain(b, "t.Req", {"number": 3, "level": 1.5, "inner": {"x": 5, "y": "q"}})))
    assert out == {"name": "", "count": 3, "inner": {"x": 5, "s": ""}, "items": [], "tags": {}, "old": False}
    rsp = codec.decode_plain(a, "t.Rsp", back.output(codec.encode_plain(b, "t.Rsp", {"text": "t", "extra": b"z"})))
    assert rsp == {"text": "t"}


def test_default_matches_local_encoder_enum_first_value():
    b = schema({"t.Req": [F("e", 2, "enum", "t.E")], "t.Rsp": []}, enums={"t.E": [["FIVE", 5], ["ZERO", 0]]})
    a = schema({"t.Req": [F("z", 1, "int32")], "t.Rsp": []}, enums={"t.E": [["FIVE", 5], ["ZERO", 0]]})
    mp = plan_service(a, b, SVC).methods[b.services[SVC].methods[0].method_id]
    data = mp.input(codec.encode_plain(a, "t.Req", {"z": 1}))
    assert data == codec.encode_plain(b, "t.Req", {})
    assert codec.decode_plain(b, "t.Req", data) == {"e": 5}


@pytest.mark.parametrize("change, words", [
    (F("count", 2, "double"), ["t.Req field 2", "'int32 count'", "'double count'"]),
    (F("count", 2, "sint32"), ["'sint32 count'"]),  # zigzag: not protobuf-compatible with int32
    (F("count", 2, "fixed32"), ["'fixed32 count'"]),
    (F("count", 2, "string"), ["'string count'"]),
    (F("count", 2, "enum", "t.E", label="repeated"), ["'repeated t.E count'"]),
    (F("count", 2, "int32", label="repeated"), ["t.Req field 2", "'repeated int32 count'"]),
    (F("count", 2, "int32", label="optional"), ["'optional int32 count'"]),
    (F("n", 2, "message", "t.Rsp"), ["'t.Rsp n'", "'int32 count'"]),
    (F("count", 2, "int32", oneof="o"), ["(in oneof o)"]),
])
def test_incompatible_field(change, words):
    v = {k: list(fs) for k, fs in V1.items()}
    v["t.Req"] = [change if f[1] == 2 else f for f in v["t.Req"]]
    reasons = compare(schema(V1), schema(v), SVC)
    assert len(reasons) == 1, reasons
    for w in words:
        assert w in reasons[0]
    assert compare(schema(v), schema(V1), SVC)  # both ways


def test_incompatible_methods_and_nested():
    b = schema(V1, methods=(("Call", "t.Rsp", "t.Rsp", False, False),))
    assert any("input type is t.Req on the peer, t.Rsp on this side" in r for r in compare(schema(V1), b, SVC))
    b = schema(V1, methods=(("Call", "t.Req", "t.Rsp", False, True),))
    assert any("unary_unary on the peer, unary_stream on this side" in r for r in compare(schema(V1), b, SVC))
    v = {k: list(fs) for k, fs in V1.items()}
    v["t.Inner"] = [F("x", 1, "string"), F("s", 2, "string")]
    assert compare(schema(V1), schema(v), SVC) == ["t.Inner field 1: peer has 'int64 x', this side has 'string x'"]
    # a method only one side has is not compared
    b = schema(V1, methods=(("Other", "t.Inner", "t.Inner", True, True),))
    assert compare(schema(V1), b, SVC) == []


def test_oneof_spread_refused():
    a = schema({"t.Req": [F("a", 1, "int32", oneof="o"), F("b", 2, "int32", oneof="o")], "t.Rsp": []})
    b = schema({"t.Req": [F("a", 1, "int32", oneof="p"), F("b", 2, "int32", oneof="q")], "t.Rsp": []})
    assert compare(a, b, SVC) and compare(b, a, SVC)
    c = schema({"t.Req": [F("b", 2, "int32", oneof="r"), F("a", 1, "int32", oneof="r")], "t.Rsp": []})
    assert compare(a, c, SVC) == []


def test_bad_payloads_raise_transcode_error():
    a, b = schema(V1), schema(V2)
    mp = plan_service(a, b, SVC).methods[b.services[SVC].methods[0].method_id]
    for data in (b"\xc1", b"\x93\x01\x02\x03", codec.encode_plain(b, "t.Req", {}), b""):
        with pytest.raises(TranscodeError):
            mp.input(data)


def test_plan_services_reports_stale():
    errors = []
    v = {k: list(fs) for k, fs in V1.items()}
    v["t.Rsp"] = [F("text", 1, "int32")]
    assert plan_services({SVC: schema(v).closure(SVC)}, schema(V1), lambda s, e: errors.append((s, e))) == {}
    assert errors and "t.Rsp field 1" in errors[0][1]
    assert plan_services({SVC: schema(V1).closure(SVC)}, schema(V2))  # compatible: plans


# -- compatible kind changes (protobuf's "Updating A Message Type") ----------------------------
ALL_KINDS = ["int32", "uint32", "int64", "uint64", "bool", "sint32", "sint64", "fixed32", "sfixed32", "fixed64",
             "sfixed64", "string", "bytes", "float", "double", "enum"]
# protobuf's table, as unordered pairs (every kind is also compatible with itself)
PROTOBUF_COMPATIBLE = {frozenset(p) for p in [
    *[(a, b) for a in ("int32", "uint32", "int64", "uint64", "bool") for b in ("int32", "uint32", "int64", "uint64", "bool")],
    ("sint32", "sint64"), ("fixed32", "sfixed32"), ("fixed64", "sfixed64"), ("string", "bytes"),
    *[("enum", b) for b in ("int32", "uint32", "int64", "uint64")],
]}


def one_field(kind, label="single", key=None, ref=None, oneof=None, extra=()):
    ref = ref or ("t.E" if kind == "enum" else None)
    return schema({"t.Req": [F("v", 1, kind, ref, label, key, oneof), *extra], "t.Rsp": []})


def transcode(src: Schema, dst: Schema, value: dict):
    """`value` (t.Req of src) as dst's app decodes it after its daemon's transcoding, and
    whether there was a transcoder at all."""
    plan = plan_service(*both(src, dst), SVC)
    mid = dst.services[SVC].methods[0].method_id
    tc = plan.methods[mid].input if plan is not None and mid in plan.methods else None
    data = codec.encode_plain(src, "t.Req", value)
    return codec.decode_plain(dst, "t.Req", tc(data) if tc is not None else data), tc is not None


@pytest.mark.parametrize("a", ALL_KINDS)
def test_kind_changes_follow_protobufs_table(a):
    for b in ALL_KINDS:
        ok = a == b or frozenset((a, b)) in PROTOBUF_COMPATIBLE
        for label in ("single", "optional", "repeated"):
            reasons = compare(one_field(a, label), one_field(b, label), SVC)
            assert (reasons == []) == ok, (a, b, label, reasons)
            assert (compare(one_field(b, label), one_field(a, label), SVC) == []) == ok  # one verdict both ways
            if not ok:
                assert reasons[0].startswith("t.Req field 1: peer has"), reasons
    # map values, and map keys (their kinds: integers, bool, string)
    for b in ALL_KINDS:
        ok = a == b or frozenset((a, b)) in PROTOBUF_COMPATIBLE
        assert (compare(one_field(a, "map", "string"), one_field(b, "map", "string"), SVC) == []) == ok
    keys = ["int32", "uint32", "int64", "uint64", "bool", "sint32", "sint64", "fixed32", "sfixed32", "fixed64",
            "sfixed64", "string"]
    if a in keys:
        for b in keys:
            ok = a == b or frozenset((a, b)) in PROTOBUF_COMPATIBLE
            reasons = compare(one_field("int32", "map", a), one_field("int32", "map", b), SVC)
            assert (reasons == []) == ok, (a, b, reasons)
            assert (compare(one_field("int32", "map", b), one_field("int32", "map", a), SVC) == []) == ok


def test_enums_of_other_names_and_label_changes_stay_refused():
    enums = {"t.E": [["A", 0]], "t.G": [["A", 0]]}
    a = schema({"t.Req": [F("v", 1, "enum", "t.E")], "t.Rsp": []}, enums=enums)
    b = schema({"t.Req": [F("v", 1, "enum", "t.G")], "t.Rsp": []}, enums=enums)
    assert compare(a, b, SVC) == ["t.Req field 1: peer has 't.E v', this side has 't.G v'"]
    assert compare(one_field("int32"), one_field("int64", "repeated"), SVC)
    assert compare(one_field("int32", "map", "string"), one_field("int64", "map", "int64"), SVC)
    assert compare(one_field("int32", oneof="o"), one_field("int64"), SVC)


@pytest.mark.parametrize("src, dst", [("int32", "int64"), ("uint32", "int64"), ("uint32", "uint64"), ("int32", "enum"),
                                      ("enum", "int32"), ("enum", "int64"), ("sint32", "sint64")])
def test_widening_needs_no_transcoder(src, dst):
    """Every value of `src` is one of `dst` in the same msgpack form: the peer's bytes go to
    the app as they are (nothing per message, as between equal schemas)."""
    for label, key in (("single", None), ("optional", None), ("repeated", None), ("map", "string")):
        a, b = one_field(src, label, key), one_field(dst, label, key)
        assert compare(a, b, SVC) == [] and plan_service(*both(a, b), SVC) is None, (label, key)
    # the other way may not fit: transcoded (and range-checked); an enum is an int32 both ways
    a, b = one_field(dst), one_field(src)
    assert (plan_service(*both(a, b), SVC) is None) == ({src, dst} == {"int32", "enum"})
    # int keys widened too
    a, b = one_field("int32", "map", "int32"), one_field("int32", "map", "int64")
    assert plan_service(*both(a, b), SVC) is None and plan_service(*both(b, a), SVC) is not None


@pytest.mark.parametrize("src, dst, value, want", [
    ("int64", "int32", 2**31 - 1, 2**31 - 1),
    ("int64", "uint32", 7, 7),
    ("uint64", "int64", 2**63 - 1, 2**63 - 1),
    ("int32", "uint64", 0, 0),
    ("bool", "int32", True, 1),
    ("bool", "uint64", False, 0),
    ("int64", "bool", 1, True),
    ("uint32", "bool", 0, False),
    ("int64", "enum", 9, 9),  # a number the enum does not name: kept (open enums, as the codec)
    ("enum", "uint32", 1, 1),
    ("string", "bytes", "h\u00e9", "h\u00e9".encode()),
    ("bytes", "string", "h\u00e9".encode(), "h\u00e9"),
    ("sint64", "sint32", -5, -5),
    ("sfixed32", "fixed32", 3, 3),
    ("fixed64", "sfixed64", 2**63 - 1, 2**63 - 1),
])
def test_compatible_values_convert_in_every_label(src, dst, value, want):
    for label, key in (("single", None), ("optional", None), ("repeated", None), ("map", "string")):
        a, b = one_field(src, label, key), one_field(dst, label, key)
        assert compare(a, b, SVC) == [] and compare(b, a, SVC) == []
        v = [value, value] if label == "repeated" else {"k": value} if label == "map" else value
        w = [want, want] if label == "repeated" else {"k": want} if label == "map" else want
        got, _ = transcode(a, b, {"v": v})
        assert got == {"v": w} and type(got["v"] if label in ("single", "optional") else want) is type(want), label
        if label == "optional":
            assert transcode(a, b, {"v": None})[0] == {"v": None}
    # oneof members too
    a, b = one_field(src, oneof="o"), one_field(dst, oneof="o")
    assert transcode(a, b, {"v": value})[0] == {"v": want} and transcode(a, b, {"v": None})[0] == {"v": None}


@pytest.mark.parametrize("src, dst, value, words", [
    ("int64", "int32", 2**40, ["t.Req.v", "1099511627776", "out of range for int32"]),
    ("int32", "uint32", -1, ["t.Req.v", "value -1 out of range for uint32"]),
    ("uint64", "int64", 2**63, ["t.Req.v", str(2**63)]),
    ("int64", "enum", 2**31, ["t.Req.v", str(2**31), "enum t.E"]),
    ("enum", "uint64", -3, ["t.Req.v", "-3", "uint64"]),
    ("sint64", "sint32", -2**31 - 1, ["t.Req.v", str(-2**31 - 1)]),
    ("sfixed32", "fixed32", -1, ["t.Req.v", "-1", "fixed32"]),
    ("fixed64", "sfixed64", 2**64 - 1, ["t.Req.v", str(2**64 - 1)]),
    ("int32", "bool", 2, ["t.Req.v", "value 2 does not fit bool", "only 0 and 1"]),
    ("int64", "bool", -1, ["t.Req.v", "value -1 does not fit bool"]),
    ("bytes", "string", b"ok\xff", ["t.Req.v", "not valid UTF-8", "ok\\xff"]),
])
def test_a_value_that_does_not_fit_fails_naming_field_and_value(src, dst, value, words):
    """protobuf would truncate (or read non-zero as true): a rolling upgrade must not turn a
    quantity into another one silently, so that call fails instead."""
    for label, key, where in (("single", None, "t.Req.v"), ("optional", None, "t.Req.v"),
                              ("repeated", None, "t.Req.v[1]"), ("map", "string", "t.Req.v['k']")):
        a, b = one_field(src, label, key), one_field(dst, label, key)
        v = [want_ok(src), value] if label == "repeated" else {"k": value} if label == "map" else value
        with pytest.raises(TranscodeError) as ei:
            transcode(a, b, {"v": v})
        text = str(ei.value)
        assert text.startswith("the peer's t.Req does not fit this side's schema: "), text
        for w in words:
            assert w.replace("t.Req.v", where) in text, (label, text)


def want_ok(kind):
    """A value of `kind` that fits every compatible kind."""
    return {"string": "", "bytes": b""}.get(kind, 0 if kind != "bool" else False)


def test_map_keys_convert_and_do_not_collapse():
    a, b = one_field("string", "map", "int64"), one_field("string", "map", "int32")
    assert transcode(a, b, {"v": {-(2**31): "lo", 5: "x"}})[0] == {"v": {-(2**31): "lo", 5: "x"}}
    with pytest.raises(TranscodeError, match=r"t\.Req\.v.*map key 4294967296"):
        transcode(a, b, {"v": {2**32: "x"}})
    a, b = one_field("string", "map", "uint32"), one_field("string", "map", "bool")
    got = transcode(a, b, {"v": {0: "f", 1: "t"}})[0]["v"]
    assert got == {False: "f", True: "t"} and all(type(k) is bool for k in got)
    with pytest.raises(TranscodeError, match=r"t\.Req\.v \(map key\): value 2 does not fit bool"):
        transcode(a, b, {"v": {1: "t", 2: "also true to protobuf"}})  # two keys would collapse into True
    got = transcode(b, a, {"v": {True: "t", False: "f"}})[0]["v"]
    assert got == {1: "t", 0: "f"} and all(type(k) is int for k in got)
    # message values with converted keys
    sub = [F("x", 1, "int32")]
    a = schema({"t.Req": [F("v", 1, "message", "t.A", "map", "bool")], "t.A": sub, "t.Rsp": []})
    b = schema({"t.Req": [F("v", 1, "message", "t.A", "map", "int64")], "t.A": sub, "t.Rsp": []})
    assert transcode(a, b, {"v": {True: {"x": 3}}})[0] == {"v": {1: {"x": 3}}}
    assert transcode(b, a, {"v": {0: {"x": 4}}})[0] == {"v": {False: {"x": 4}}}
    # ... whose message changed too (transcoded as a message, and its keys converted)
    a = schema({"t.Req": [F("v", 1, "message", "t.A", "map", "bool")], "t.A": [F("x", 1, "int32"), F("y", 2, "bool")],
                "t.Rsp": []})
    b = schema({"t.Req": [F("v", 1, "message", "t.A", "map", "int64")], "t.A": [F("y", 2, "uint32"), F("z", 1, "int32")],
                "t.Rsp": []})
    assert transcode(a, b, {"v": {True: {"x": 3, "y": True}}})[0] == {"v": {1: {"y": 1, "z": 3}}}
    with pytest.raises(TranscodeError, match=r"t\.Req\.v \(map key\): value 2 does not fit bool"):
        transcode(b, a, {"v": {2: {"z": 4}}})


def test_nested_and_renamed_fields_convert_inside_the_message():
    a = schema({"t.Req": [F("inner", 1, "message", "t.A"), F("items", 2, "message", "t.A", "repeated")],
                "t.A": [F("flag", 1, "bool"), F("blob", 2, "string")], "t.Rsp": []})
    b = schema({"t.Req": [F("inner", 1, "message", "t.A"), F("items", 2, "message", "t.A", "repeated")],
                "t.A": [F("blob_bytes", 2, "bytes"), F("count", 1, "int64")], "t.Rsp": []})
    value = {"inner": {"flag": True, "blob": "x"}, "items": [{"flag": False, "blob": "y"}]}
    assert transcode(a, b, value)[0] == {"inner": {"blob_bytes": b"x", "count": 1},
                                         "items": [{"blob_bytes": b"y", "count": 0}]}
    with pytest.raises(TranscodeError, match=r"t\.A\.flag: value 7 does not fit bool"):
        transcode(b, a, {"items": [{"count": 1}, {"count": 7}]})


def test_integer_changes_cost_no_per_value_conversion():
    """Integers are range-checked by the local encoder: their mapping carries no converter
    (and a message whose only change is an integer kind is passed to the encoder as it is)."""
    a, b = one_field("int64"), one_field("int32")
    plan = plan_service(*both(a, b), SVC)
    tc = plan.methods[b.services[SVC].methods[0].method_id].input
    assert tc.maps["t.Req"] is None
    a, b = one_field("bool", extra=[F("w", 2, "int64")]), one_field("int32", extra=[F("w", 2, "int32")])
    tc = plan_service(*both(a, b), SVC).methods[b.services[SVC].methods[0].method_id].input
    fixes = {e[0]: e[4] for e in tc.maps["t.Req"]}
    assert fixes["v"] is not None and fixes["w"] is None


# -- randomized round trips ------------------------------------------------------------------
SCALARS = ["int32", "int64", "uint32", "uint64", "sint32", "sint64", "bool", "string", "bytes", "double"]
KEY_KINDS = ["string", "int32", "int64", "uint32", "bool"]
# what mutate may change a kind to (protobuf's compatible kinds among SCALARS and enum)
_A = ["int32", "int64", "uint32", "uint64", "bool"]
COMPATIBLE = {**{k: _A for k in _A}, "sint32": ["sint32", "sint64"], "sint64": ["sint32", "sint64"],
              "string": ["string", "bytes"], "bytes": ["string", "bytes"], "double": ["double"],
              "enum": ["enum", "int32", "int64", "uint32", "uint64"]}
for _k in ("int32", "int64", "uint32", "uint64"):
    COMPATIBLE[_k] = COMPATIBLE[_k] + ["enum"]
INT_RANGE = {"int32": (-2**31, 2**31 - 1), "sint32": (-2**31, 2**31 - 1), "enum": (-2**31, 2**31 - 1),
             "int64": (-2**63, 2**63 - 1), "sint64": (-2**63, 2**63 - 1), "uint32": (0, 2**32 - 1),
             "uint64": (0, 2**64 - 1)}


class Misfit(Exception):
    """The oracle's verdict: this value does not fit the receiving kind (the call fails)."""


def conv(v, src, dst):
    """The test's own statement of the conversion rules (module docstring of evolve.py)."""
    if src == dst:
        return v
    if dst == "bool":
        if v in (0, 1):
            return bool(v)
        raise Misfit
    if dst in INT_RANGE:
        lo, hi = INT_RANGE[dst]
        if lo <= int(v) <= hi:
            return int(v)
        raise Misfit
    if dst == "string":
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise Misfit from None
    assert dst == "bytes" and src == "string"
    return v.encode("utf-8")


def rand_value(rng, kind, ref, msgs, depth):
    if kind == "message":
        return rand_msg(rng, ref, msgs, depth + 1) if depth < 3 and rng.random() < 0.7 else None
    if kind == "enum":
        return rng.choice([0, 1, 9])
    return {"int32": lambda: rng.randint(-5, 5), "int64": lambda: rng.choice([rng.randint(-1, 2), rng.randint(-2**40, 2**40)]),
            "uint32": lambda: rng.randint(0, 9), "uint64": lambda: rng.choice([0, 1, 2**63 + 5]),
            "sint32": lambda: rng.randint(-9, 9), "sint64": lambda: rng.choice([-9, 9, -2**40]),
            "bool": lambda: rng.random() < .5,
            "string": lambda: rng.choice(["", "a", "ü", "xyz"]), "bytes": lambda: rng.choice([b"", b"ok", b"\x00\xff"]),
            "double": lambda: rng.choice([0.0, 1.5, -2.25])}[kind]()


def rand_key(rng, kind):
    return rng.choice({"string": ["k", "j"], "int32": [0, 1, -3], "int64": [0, 1, 2**40], "uint32": [0, 1, 7],
                       "bool": [False, True]}[kind])


def rand_field_value(rng, f, msgs, depth):
    name, num, kind, ref, label, key, oneof = f
    if label == "repeated":
        if kind == "message" and depth >= 3:
            return []
        return [v for v in (rand_value(rng, kind, ref, msgs, depth) for _ in range(rng.randint(0, 2))) if v is not None]
    if label == "map":
        if kind == "message" and depth >= 3:
            return {}
        out = {}
        for _ in range(rng.randint(0, 2)):
            v = rand_value(rng, kind, ref, msgs, depth)
            if v is not None:
                out[rand_key(rng, key)] = v
        return out
    if label == "optional" and rng.random() < 0.3:
        return None
    return rand_value(rng, kind, ref, msgs, depth)


def rand_msg(rng, name, msgs, depth=0):
    return {f[0]: rand_field_value(rng, f, msgs, depth) for f in msgs[name]}


def rand_schema(rng):
    names = ["t.Req", "t.Rsp", "t.A", "t.B"]
    msgs = {}
    for i, n in enumerate(names):
        fields = []
        for num in rng.sample(range(1, 12), rng.randint(0, 6)):
            kind = rng.choice(SCALARS + ["enum", "message"])
            ref = "t.E" if kind == "enum" else (rng.choice(names[i + 1:] or ["t.B"]) if kind == "message" else None)
            if ref == n:
                kind, ref = "int32", None
            label = rng.choice(["single", "single", "optional", "repeated", "map"])
            if label == "optional" and kind == "message":
                label = "single"
            fields.append(F(f"f{num}", num, kind, ref, label, rng.choice(KEY_KINDS) if label == "map" else None))
        msgs[n] = fields
    return msgs


def mutate(rng, msgs):
    """A compatible v2: rename, drop, add, reorder fields; change a kind (of a value or a
    map key) to one protobuf calls compatible."""
    out = {}
    for n, fields in msgs.items():
        new = []
        for f in fields:
            r = rng.random()
            if r < 0.2:
                continue  # removed
            if r < 0.4:
                f = (f[0] + "_renamed",) + f[1:]
            if f[2] != "message" and rng.random() < 0.25:
                kind = rng.choice(COMPATIBLE[f[2]])
                f = f[:2] + (kind, "t.E" if kind == "enum" else None) + f[4:]
            if f[4] == "map" and rng.random() < 0.25:
                f = f[:5] + (rng.choice([k for k in KEY_KINDS if k == f[5] or k in COMPATIBLE.get(f[5], ())]),) + f[6:]
            new.append(f)
        used = {f[1] for f in fields}
        for num in range(12, 12 + rng.randint(0, 3)):
            kind = rng.choice(SCALARS + ["enum"])
            new.append(F(f"n{num}", num, kind, "t.E" if kind == "enum" else None,
                         rng.choice(["single", "optional", "repeated"])))
            used.add(num)
        rng.shuffle(new)
        out[n] = new
    return out


def expected(a_msgs, b_msgs, name, value):
    """`value` (per a) as b's decoder should see it: by number, b's defaults for what a lacks,
    values converted by `conv` (Misfit if one does not fit)."""
    if value is None:
        return None
    a_by = {f[1]: f for f in a_msgs[name]}
    out = {}
    for f in b_msgs[name]:
        bname, num, kind, ref, label, key, oneof = f
        af = a_by.get(num)
        if af is None:
            out[bname] = ([] if label == "repeated" else {} if label == "map" else None if label == "optional" or kind == "message"
                          else 0 if kind in INT_RANGE else
                          {"bool": False, "string": "", "bytes": b"", "double": 0.0}[kind])
            continue
        v = value[af[0]]
        if kind == "message":
            one = lambda x: expected(a_msgs, b_msgs, ref, x)  # noqa: E731
        else:
            one = lambda x, s=af[2], d=kind: conv(x, s, d)  # noqa: E731
        if v is None:
            pass
        elif label == "repeated":
            v = [one(x) for x in v]
        elif label == "map":
            v = {conv(k, af[5], key): one(x) for k, x in v.items()}
        else:
            v = one(v)
        out[bname] = v
    return out


@pytest.mark.parametrize("seed", range(60))
def test_random_roundtrip(seed):
    rng = random.Random(seed)
    a_msgs = rand_schema(rng)
    b_msgs = mutate(rng, a_msgs)
    a, b = schema(a_msgs), schema(b_msgs)
    assert compare(a, b, SVC) == [] and compare(b, a, SVC) == []
    outcomes = set()
    for src, dst, sm, dm in ((a, b, a_msgs, b_msgs), (b, a, b_msgs, a_msgs)):
        plan = plan_service(*both(src, dst), SVC)
        mid = dst.services[SVC].methods[0].method_id
        for _ in range(10):
            for name, which in (("t.Req", "input"), ("t.Rsp", "output")):
                value = rand_msg(rng, name, sm)
                data = codec.encode_plain(src, name, value)
                tc = getattr(plan.methods[mid], which) if plan is not None and mid in plan.methods else None
                try:
                    want = expected(sm, dm, name, codec.decode_plain(src, name, data))
                except Misfit:
                    assert tc is not None, "a value that does not fit went to the app untranscoded"
                    with pytest.raises(TranscodeError, match="does not fit this side's schema"):
                        tc(data)
                    outcomes.add("misfit")
                    continue
                got = tc(data) if tc is not None else data
                assert codec.decode_plain(dst, name, got) == want
                outcomes.add("ok")
    assert "ok" in outcomes


def test_random_kind_changes_are_exercised():
    """(the randomized round trips above do change kinds, and do hit values that do not fit)"""
    changed = 0
    for seed in range(60):
        rng = random.Random(seed)
        a_msgs = rand_schema(rng)
        b_msgs = mutate(rng, a_msgs)
        for n in a_msgs:
            a_by = {f[1]: f for f in a_msgs[n]}
            changed += sum(1 for f in b_msgs[n] if f[1] in a_by and (a_by[f[1]][2], a_by[f[1]][5]) != (f[2], f[5]))
    assert changed > 40


def test_required_and_map_key_rules():
    def req(required: bool, number: int = 2):
        fields = [["a", 1, ["int32", None], "single", None, None],
                  ["m", number, ["message", "t.Rsp"], "single", None, None] + ([True] if required else [])]
        return Schema.from_dict({"messages": [["t.Req", fields], ["t.Rsp", []]],
                                 "services": [[SVC, [["Call", "t.Req", "t.Rsp", False, False]]]]})
    assert any("required" in r for r in compare(req(True), req(False), SVC))
    reasons = compare(req(True, 3), req(False, 2), SVC)
    assert any("field 3: peer has 'required t.Rsp m', this side has no field 3" in r for r in reasons)
    a = schema({"t.Req": [F("m", 1, "int32", label="map", key="string")], "t.Rsp": []})
    b = schema({"t.Req": [F("m", 1, "int32", label="map", key="int64")], "t.Rsp": []})
    assert compare(a, b, SVC) == ["t.Req field 1: peer has 'map<string, int32> m', this side has 'map<int64, int32> m'"]


def test_enum_values_changed_need_no_plan():
    a = schema(V2, enums={"t.E": [["A", 0]]})
    b = schema(V2, enums={"t.E": [["A", 0], ["B", 1], ["C", 2]]})
    assert a.fingerprint(SVC) != b.fingerprint(SVC)  # t.E (Req.color) is in the closure
    assert compare(a, b, SVC) == [] and plan_service(a, b, SVC) is None


def test_recursive_messages_differing_elsewhere_are_transcoded_inside_the_cycle():
    # Req -> B -> Req (a cycle) and Req -> C; C differs (a rename and a reorder). A message on
    # the cycle was remembered as "the same" while Req's answer was still provisional: Req
    # nested in B was passed as it was (C's renamed field lost), and a method taking B got
    # no transcoder at all.
    p = {"t.Req": [F("b", 1, "message", "t.B"), F("c", 2, "message", "t.C")],
         "t.B": [F("a", 1, "message", "t.Req")],
         "t.C": [F("x", 1, "int32"), F("w", 2, "int32")],
         "t.Rsp": []}
    q = dict(p, **{"t.C": [F("w", 2, "int32"), F("z", 1, "int32")]})
    methods = (("Call", "t.Req", "t.Rsp", False, False), ("Other", "t.B", "t.Rsp", False, False))
    a, b = schema(p, methods), schema(q, methods)
    assert compare(a, b, SVC) == []
    plan = plan_service(a, b, SVC)
    call, other = (m.method_id for m in b.services[SVC].methods)
    v = {"b": {"a": {"b": None, "c": {"x": 5, "w": 6}}}, "c": {"x": 7, "w": 8}}
    out = codec.decode_plain(b, "t.Req", plan.methods[call].input(codec.encode_plain(a, "t.Req", v)))
    assert out == {"b": {"a": {"b": None, "c": {"w": 6, "z": 5}}}, "c": {"w": 8, "z": 7}}
    assert other in plan.methods
    out = codec.decode_plain(b, "t.B", plan.methods[other].input(codec.encode_plain(a, "t.B", v["b"])))
    assert out == {"a": {"b": None, "c": {"w": 6, "z": 5}}}
