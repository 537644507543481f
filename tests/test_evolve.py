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
    (F("count", 2, "int64"), ["t.Req field 2", "'int32 count'", "'int64 count'"]),
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
    v["t.Rsp"] = [F("text", 1, "bytes")]
    assert plan_services({SVC: schema(v).closure(SVC)}, schema(V1), lambda s, e: errors.append((s, e))) == {}
    assert errors and "t.Rsp field 1" in errors[0][1]
    assert plan_services({SVC: schema(V1).closure(SVC)}, schema(V2))  # compatible: plans


# -- randomized round trips ------------------------------------------------------------------
SCALARS = ["int32", "int64", "uint32", "sint64", "bool", "string", "bytes", "double"]


def rand_value(rng, kind, ref, msgs, depth):
    if kind == "message":
        return rand_msg(rng, ref, msgs, depth + 1) if depth < 3 and rng.random() < 0.7 else None
    if kind == "enum":
        return rng.choice([0, 1])
    return {"int32": lambda: rng.randint(-5, 5), "int64": lambda: rng.randint(-2**40, 2**40),
            "uint32": lambda: rng.randint(0, 9), "sint64": lambda: rng.randint(-9, 9), "bool": lambda: rng.random() < .5,
            "string": lambda: rng.choice(["", "a", "ü", "xyz"]), "bytes": lambda: rng.choice([b"", b"\x00\xff"]),
            "double": lambda: rng.choice([0.0, 1.5, -2.25])}[kind]()


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
                out[rng.choice(["k", "j"])] = v
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
            fields.append(F(f"f{num}", num, kind, ref, label, "string" if label == "map" else None))
        msgs[n] = fields
    return msgs


def mutate(rng, msgs):
    """A compatible v2: rename, drop, add, reorder fields."""
    out = {}
    for n, fields in msgs.items():
        new = []
        for f in fields:
            r = rng.random()
            if r < 0.2:
                continue  # removed
            if r < 0.4:
                f = (f[0] + "_renamed",) + f[1:]
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
    """`value` (per a) as b's decoder should see it: by number, b's defaults for what a lacks."""
    if value is None:
        return None
    a_by = {f[1]: f for f in a_msgs[name]}
    out = {}
    for f in b_msgs[name]:
        bname, num, kind, ref, label, key, oneof = f
        af = a_by.get(num)
        if af is None:
            out[bname] = ([] if label == "repeated" else {} if label == "map" else None if label == "optional" or kind == "message"
                          else 0 if kind in ("int32", "int64", "uint32", "sint64", "enum") else
                          {"bool": False, "string": "", "bytes": b"", "double": 0.0}[kind])
            continue
        v = value[af[0]]
        if kind == "message":
            if label == "repeated":
                v = [expected(a_msgs, b_msgs, ref, x) for x in v]
            elif label == "map":
                v = {k: expected(a_msgs, b_msgs, ref, x) for k, x in v.items()}
            else:
                v = expected(a_msgs, b_msgs, ref, v)
        out[bname] = v
    return out


@pytest.mark.parametrize("seed", range(40))
def test_random_roundtrip(seed):
    rng = random.Random(seed)
    a_msgs = rand_schema(rng)
    b_msgs = mutate(rng, a_msgs)
    a, b = schema(a_msgs), schema(b_msgs)
    assert compare(a, b, SVC) == []
    for src, dst, sm, dm in ((a, b, a_msgs, b_msgs), (b, a, b_msgs, a_msgs)):
        plan = plan_service(*both(src, dst), SVC)
        mid = dst.services[SVC].methods[0].method_id
        for _ in range(10):
            for name, which in (("t.Req", "input"), ("t.Rsp", "output")):
                value = rand_msg(rng, name, sm)
                data = codec.encode_plain(src, name, value)
                tc = getattr(plan.methods[mid], which) if plan is not None and mid in plan.methods else None
                got = tc(data) if tc is not None else data
                assert codec.decode_plain(dst, name, got) == expected(sm, dm, name, codec.decode_plain(src, name, data))


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
