"""proto2 `[default = X]` and closed enums (tests/protos/defaults2.proto), checked against
protoc's own Python output (`grpc_tools.protoc --python_out`, upb) for the same file: an unset
field with a declared default reads it, HasField / ListFields say it is unset, it is not sent,
the receiver reads its own default; a closed enum's undeclared value from the wire leaves
the field unset (a repeated field / map drops it), an open enum's stays an int. Then the
schema the daemon gets (to_dict, closure, evolution) and read_field (what policies read),
and one call over two real daemons."""
from __future__ import annotations

import copy
import importlib
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DaemonProc, load_generated

import mrpcd
from mrpcd.marshal import codec, evolve
from mrpcd.marshal.schema import Schema, SchemaError
from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"
FILES = [PROTOS / "defaults2.proto", PROTOS / "defaults2_wire.proto"]

# Conf's fields with a declared default: .proto name -> Python attribute
DEFAULTED = {n: n for n in ["i", "u", "s", "b", "inf", "ninf", "nan", "flag", "color", "hex", "f", "off", "empty",
                            "one_a"]} | {"from": "from_"}


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """(mrpcd module, its wire twin, _pb2 module, its wire twin)."""
    out = tmp_path_factory.mktemp("proto2_defaults")
    assert cli.main([*map(str, FILES), "-I", str(PROTOS), "-o", str(out)]) == 0
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}", *map(str, FILES)],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))  # defaults2_pb2 imports defaults2_wire_pb2 by that name
    try:
        pb, pw = importlib.import_module("defaults2_pb2"), importlib.import_module("defaults2_wire_pb2")
    finally:
        sys.path.remove(str(out))
    return (load_generated(out / "defaults2_mrpc.py", "_proto2_defaults_"),
            load_generated(out / "defaults2_wire_mrpc.py", "_proto2_defaults_"), pb, pw)


def same(a, b) -> bool:
    """Equal values, nan equal to nan."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or isinstance(a, int) and isinstance(b, int) and a == b


# -- declared defaults ------------------------------------------------------------------------------


def test_schema_keeps_the_declared_defaults_typed(m):
    d, w, _, _ = m
    fields = {f.name: f for f in d.SCHEMA.messages["mrpc.defaults.Conf"].fields}
    assert fields["i"].default == -7 and fields["u"].default == 2**64 - 1 and fields["hex"].default == 16
    assert fields["s"].default == 'h"i\né' and fields["b"].default == b"\x01\xffx\\"  # (protoc C-escapes bytes)
    assert fields["inf"].default == math.inf and fields["ninf"].default == -math.inf and math.isnan(fields["nan"].default)
    assert fields["flag"].default is True and fields["off"].default is False and fields["empty"].default == ""
    assert fields["color"].default == 3 and fields["f"].default == 1500.0 and fields["req"].default == 42
    assert fields["plain"].default is None and fields["one_a"].oneof == "pick" and fields["one_a"].default == 5
    # proto2 enums are closed, proto3 ones open
    assert d.SCHEMA.enums["mrpc.defaults.Color"].closed and not w.SCHEMA.enums["mrpc.wire.Mode"].closed
    assert d.SCHEMA.enums["mrpc.wire.Mode"].closed is False  # (the imported proto3 enum, in defaults2's schema)


def test_unset_fields_read_their_defaults_as_pb2(m):
    d, _, pb, _ = m
    o, p = d.Conf(), pb.Conf()
    for name, attr in DEFAULTED.items():
        assert same(getattr(o, attr), getattr(p, name)), name
        assert not o.HasField(name) and not p.HasField(name), name
    assert o.color is d.Color.BLUE  # the IntEnum member
    assert o.req == p.req == 42 and o.plain is None  # (without a declared default: None, docs/PORTING.md)
    assert [f.name for f, _ in o.ListFields()] == [f.name for f, _ in p.ListFields()] == []
    assert o.WhichOneof("pick") is None and p.WhichOneof("pick") is None


def test_set_to_the_default_is_set_and_clear_restores_it_as_pb2(m):
    d, _, pb, _ = m
    for name, attr in DEFAULTED.items():
        o, p = d.Conf(req=1), pb.Conf(req=1)
        value = getattr(p, name)
        setattr(o, attr, value)
        setattr(p, name, value)
        assert o.HasField(name) and p.HasField(name), name
        assert [f.name for f, _ in o.ListFields()] == [f.name for f, _ in p.ListFields()], name
        assert (o == d.Conf(req=1)) is (p == pb.Conf(req=1)) is False, name  # set differs from unset
        back, pback = d.Conf.FromString(o.SerializeToString()), pb.Conf.FromString(p.SerializeToString())
        assert back.HasField(name) and pback.HasField(name) and same(getattr(back, attr), getattr(pback, name)), name
        o.ClearField(name)
        p.ClearField(name)
        assert not o.HasField(name) and not p.HasField(name) and same(getattr(o, attr), getattr(p, name)), name
        assert o == d.Conf(req=1)


def test_other_values_round_trip_as_pb2(m):
    d, _, pb, _ = m
    values = dict(i=1, u=2, s="x", b=b"y", inf=1.5, ninf=-2.0, nan=0.25, flag=False, color=1, hex=-3, f=2.5, off=True,
                  empty="e", one_b="z")
    o, p = d.Conf(req=7, from_=9, **values), pb.Conf(req=7, **{"from": 9}, **values)
    back, pback = d.Conf.FromString(o.SerializeToString()), pb.Conf.FromString(p.SerializeToString())
    for name in list(values) + ["req", "from"]:
        attr = DEFAULTED.get(name, name)
        assert same(getattr(back, attr), getattr(pback, name)) and back.HasField(name) == pback.HasField(name) \
            if name != "req" else back.req == pback.req == 7, name
    # the oneof's other member reads its default, as protobuf's
    assert back.WhichOneof("pick") == pback.WhichOneof("pick") == "one_b" and back.one_a == pback.one_a == 5


def test_a_oneof_member_with_a_default_is_cleared_by_the_other_as_pb2(m):
    d, _, pb, _ = m
    o, p = d.Conf(one_a=1), pb.Conf(one_a=1)
    o.one_b = p.one_b = "z"  # clears one_a, which reads its default again
    assert o.WhichOneof("pick") == p.WhichOneof("pick") == "one_b"
    assert o.one_a == p.one_a == 5 and not o.HasField("one_a") and not p.HasField("one_a")
    o.one_a = p.one_a = 5  # set to its default: set, and one_b cleared
    assert o.WhichOneof("pick") == p.WhichOneof("pick") == "one_a" and o.one_b is None and p.one_b == ""
    assert d.Conf.FromString(o.SerializeToString()).WhichOneof("pick") == "one_a"
    o.one_a = None  # unsets it (protobuf: ClearField)
    assert o.WhichOneof("pick") is None and o.one_a == 5


def test_an_unset_default_is_not_sent_and_the_receiver_reads_its_own(m):
    d, _, pb, _ = m
    data = d.Conf().SerializeToString()
    plain = codec.decode_plain(d.SCHEMA, "mrpc.defaults.Conf", data)
    assert all(plain[n] is None for n in DEFAULTED)  # nil on the wire: unset
    assert plain["req"] == 42  # a required scalar always has a value to send
    # a receiver whose .proto declares other defaults reads those (defaults are not on the wire)
    changed = Schema.from_dict(_with_default(d.SCHEMA.to_dict(), "mrpc.defaults.Conf", "i", 99))
    assert codec.read_field(changed, "mrpc.defaults.Conf", data, "i") == 99
    # what the daemon's transcoding fills in for a field the peer's version lacks: unset, and
    # a required scalar's declared default
    filled = codec.decode_plain(d.SCHEMA, "mrpc.defaults.Conf", codec.encode_plain(d.SCHEMA, "mrpc.defaults.Conf", {}))
    assert filled["req"] == 42 and filled["i"] is None
    back, pback = d.Conf.FromString(data), pb.Conf.FromString(pb.Conf(req=42).SerializeToString())
    assert (back.i, back.HasField("i")) == (pback.i, pback.HasField("i")) == (-7, False)


def test_python_api_keeps_presence(m):
    d, _, _, _ = m
    o = d.Conf(i=None, color=None, from_=None)
    assert o == d.Conf() and o.i == -7 and o.from_ == 3 and getattr(o, "from") == 3
    kw = o.to_dict()
    kw["from_"] = kw.pop("from")
    assert kw["i"] is None and d.Conf(**kw) == o  # (unset stays unset)
    for c in (copy.copy(o), copy.deepcopy(o)):
        assert not c.HasField("i") and c.i == -7
    c = d.Conf(i=5)
    c.CopyFrom(o)
    assert not c.HasField("i") and c.i == -7
    c = d.Conf(i=5)
    c.MergeFrom(o)  # an unset field does not overwrite, as protobuf's MergeFrom
    assert c.i == 5 and c.HasField("i")
    o.MergeFrom(d.Conf(i=-7))
    assert o.HasField("i")
    o.i = None  # assigning None unsets it, as ClearField
    assert not o.HasField("i") and o.i == -7
    o.ParseFromString(d.Conf(s="q").SerializeToString())
    assert o.s == "q" and not o.HasField("i")
    o.Clear()
    assert not o.HasField("s") and o.s == 'h"i\né' and o.req == 42
    assert "i=None" in repr(o)  # what is stored: unset


def test_pickle_keeps_presence(m, monkeypatch):
    d = m[0]
    monkeypatch.setitem(sys.modules, d.__name__, d)  # (pickle finds classes by module name)
    for o in (d.Conf(), d.Conf(i=-7, s="x")):
        back = pickle.loads(pickle.dumps(o))
        assert back == o and back.HasField("i") == o.HasField("i") and back.i == -7


def _with_default(data: dict, message: str, field: str, value) -> dict:
    data = copy.deepcopy(data)
    for name, fields in data["messages"]:
        if name == message:
            for f in fields:
                if f[0] == field:
                    f[6:] = [False, [value]]
    return data


# -- the schema the daemon gets -----------------------------------------------------------------------


def test_to_dict_round_trips_defaults_and_closed_enums(m):
    d, _, _, _ = m
    again = Schema.from_dict(d.SCHEMA.to_dict())
    assert again.messages == d.SCHEMA.messages and again.enums == d.SCHEMA.enums  # (nan equal to nan)
    assert again.enums["mrpc.defaults.Color"].closed


@pytest.mark.parametrize("field, error", [
    (["x", 1, ["int32", None], "repeated", None, None, False, [1]], "only a scalar or enum field"),
    (["x", 1, ["int32", None], "optional", None, None, False, ["1"]], "default '1' is not a int32"),
    (["x", 1, ["int32", None], "optional", None, None, False, [2**31]], "is not a int32"),
    (["x", 1, ["bool", None], "optional", None, None, False, [1]], "is not a bool"),
    (["x", 1, ["double", None], "optional", None, None, False, [1]], "is not a double"),
    (["x", 1, ["enum", "E"], "optional", None, None, False, [7]], "default 7 is not a value of E"),
    (["x", 1, ["int32", None], "optional", None, None, False, 1], "a default is [value]"),
    (["x", 1, ["int32", None], "optional", None, None, 1, [1]], "required flag must be a bool"),
    (["x", 1, ["int32", None], "optional", None, None, False], "required flag must be a bool"),  # (7 items: true)
    (["x", 1, ["int32", None], "optional", None, None, "yes"], "required flag must be a bool"),
    (["x", 1, ["int32", None], "optional", None, None, True, [1]], "only a single message field"),
])
def test_from_dict_checks_defaults(field, error):
    data = {"messages": [["M", [field]]], "enums": [["E", [["A", 1]], True]]}
    with pytest.raises(SchemaError, match=error.replace("[", r"\[").replace("]", r"\]")):
        Schema.from_dict(data)


def test_from_dict_checks_the_closed_flag():
    with pytest.raises(SchemaError, match="closed"):
        Schema.from_dict({"enums": [["E", [["A", 1]], 1]]})


def test_defaults_and_closedness_do_not_change_fingerprints_or_compatibility(m):
    d, _, _, _ = m
    plain = d.SCHEMA.to_dict()
    for _, fields in plain["messages"]:
        for f in fields:
            del f[6:]  # no defaults, no required flags (Conf has no required message field)
    plain["enums"] = [e[:2] for e in plain["enums"]]
    bare = Schema.from_dict(plain)
    assert bare.messages != d.SCHEMA.messages
    # the wire is the same: what an unset field or an unknown value reads as is the receiver's
    assert bare.fingerprints() == d.SCHEMA.fingerprints()
    changed = Schema.from_dict(_with_default(d.SCHEMA.to_dict(), "mrpc.defaults.Conf", "i", 99))
    assert changed.fingerprints() == d.SCHEMA.fingerprints()
    assert evolve.compare(changed, d.SCHEMA, "mrpc.defaults.Settings") == []  # (as protobuf: a default may change)


def test_read_field_reads_as_the_app_does(m):
    """What a policy (ACL, VTC) judges is what the app it lets the message through to reads:
    the declared default of an unset field, not None; not a closed enum's unknown value."""
    d, w, _, _ = m
    data = d.Conf().SerializeToString()
    assert codec.read_field(d.SCHEMA, "mrpc.defaults.Conf", data, "i") == -7
    assert codec.read_field(d.SCHEMA, "mrpc.defaults.Conf", data, "color") == 3
    assert codec.read_field(d.SCHEMA, "mrpc.defaults.Conf", data, "s") == 'h"i\né'
    assert codec.read_field(d.SCHEMA, "mrpc.defaults.Conf", data, "plain") is None
    got = w.Wire(e=9, es=[1, 9, 2], r=9, m={"a": 1, "b": 9}, o=9, op=9, open=9, rd=9).SerializeToString()
    read = {f: codec.read_field(d.SCHEMA, "mrpc.defaults.Got", got, f) for f in ["e", "es", "r", "m", "o", "op", "open", "rd"]}
    assert read == {"e": None, "es": [1, 2], "r": 0, "m": {"a": 1}, "o": None, "op": 2, "open": 9, "rd": 1}
    # the daemon's own decoding (transcoding between versions) keeps them: the app's decoder judges
    assert codec.decode_plain(d.SCHEMA, "mrpc.defaults.Got", got)["es"] == [1, 9, 2]


def test_an_acl_rule_sees_the_default_of_an_unset_field(m):
    """A deny rule on the value the server app reads must not be bypassed by leaving the
    field unset (the app reads its declared default), nor by a closed enum's unknown value."""
    from mrpcd.policies.acl import Acl
    from mrpcd.policies.testing import FakeContext
    from test_policies_support import ids, unary

    d, w, _, _ = m
    ctx = FakeContext(d.SCHEMA)
    acl = Acl(ctx, {"rules": [{"method": "/mrpc.defaults.Settings/Echo", "field": "i", "op": "eq", "value": -7},
                              {"method": "/mrpc.defaults.Settings/Check", "field": "op", "op": "eq", "value": "GREEN"}]})
    out = acl.outbound([unary(1, "/mrpc.defaults.Settings/Echo", d.Conf().SerializeToString()),
                        unary(2, "/mrpc.defaults.Settings/Echo", d.Conf(i=1).SerializeToString()),
                        unary(3, "/mrpc.defaults.Settings/Check", w.Wire(op=9, r=1, rd=1).SerializeToString()),
                        unary(4, "/mrpc.defaults.Settings/Check", w.Wire(op=1, r=1, rd=1).SerializeToString())])
    assert ids(out) == [2, 4]


# -- closed enums ---------------------------------------------------------------------------------------


def _both(mods, **values):
    d, w, pb, pw = mods
    return d.Got.FromString(w.Wire(**values).SerializeToString()), pb.Got.FromString(pw.Wire(**values).SerializeToString())


def test_unknown_closed_enum_values_are_dropped_as_pb2(m):
    o, p = _both(m, e=9, es=[1, 9, 2, 10], r=9, m={"a": 1, "b": 9}, o=9, op=9, open=9, rd=9)
    assert not o.HasField("e") and not p.HasField("e") and o.e is None  # (unset, no default: None)
    assert list(o.es) == list(p.es) == [1, 2]
    assert dict(o.m) == dict(p.m) == {"a": 1}
    assert o.WhichOneof("pick") is None and p.WhichOneof("pick") is None
    assert not o.HasField("op") and not p.HasField("op") and o.op == p.op == 2
    assert o.r == p.r == 0 and o.rd == p.rd == 1  # required: the default (protobuf: unset, reads it)
    # a proto3 (open) enum in a proto2 message keeps the unknown value, as protobuf's
    assert o.HasField("open") and p.HasField("open") and o.open == p.open == 9
    assert type(o.es[0]).__name__ == "Color"


def test_declared_closed_enum_values_are_kept_as_pb2(m):
    o, p = _both(m, e=2, es=[3, 1], r=1, m={"k": 3}, o=2, op=3, open=1, rd=2)
    assert o.e == p.e == 2 and o.HasField("e") and list(o.es) == list(p.es) == [3, 1] and o.r == p.r == 1
    assert dict(o.m) == dict(p.m) == {"k": 3} and o.WhichOneof("pick") == p.WhichOneof("pick") == "o" and o.o == 2
    assert o.op == p.op == 3 and o.HasField("op") and o.open == p.open == 1 and o.rd == p.rd == 2
    assert o.e is m[0].Color.GREEN


def test_proto3_enums_keep_unknown_values(m):
    """Open enums: the closed-enum check is not applied to them (nor generated: it costs proto3
    files nothing)."""
    _, w, _, _ = m
    probe = codec._Gen(w.SCHEMA, "plain")
    probe.reading = True
    assert probe.closed_map("mrpc.wire.Mode") is None
    assert codec.read_field(w.SCHEMA, "mrpc.wire.Wire", w.Wire(open=9).SerializeToString(), "open") == 9


# -- over two daemons -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client_mod(tmp_path_factory):
    """defaults2.proto as another version of it: other defaults, one more Color value."""
    src = tmp_path_factory.mktemp("proto2_defaults_v2")
    text = (PROTOS / "defaults2.proto").read_text()
    text = text.replace("[default = -7]", "[default = 99]").replace("BLUE = 3;", "BLUE = 3;\n  PURPLE = 4;")
    (src / "defaults2.proto").write_text(text)
    (src / "defaults2_wire.proto").write_text((PROTOS / "defaults2_wire.proto").read_text())
    out = tmp_path_factory.mktemp("proto2_defaults_v2_gen")
    assert cli.main([str(src / "defaults2.proto"), "-I", str(src), "-o", str(out)]) == 0
    return load_generated(out / "defaults2_mrpc.py", "_proto2_defaults_v2_")


def test_over_two_daemons(m, client_mod, tmp_path):
    d = m[0]
    seen: list = []

    class Settings(d.SettingsServicer):
        def Echo(self, request, context):
            seen.append(request)
            return request

        def Check(self, request, context):
            seen.append(request)
            return request

    a, b = DaemonProc(tmp_path, "a"), DaemonProc(tmp_path, "b")
    try:
        sapp, capp = mrpcd.connect(b.socket, name="p2-server"), mrpcd.connect(a.socket, name="p2-client")
        try:
            server = mrpcd.server(app=sapp)
            d.add_SettingsServicer_to_server(Settings(), server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            stub = client_mod.SettingsStub(mrpcd.Channel(f"127.0.0.1:{port}", capp))
            r = stub.Echo(client_mod.Conf(s="set"), timeout=10)
            got = seen[-1]
            # each side reads its own declared default for the unset field
            assert (got.i, got.HasField("i"), got.s, got.HasField("s")) == (-7, False, "set", True)
            assert (r.i, r.HasField("i"), r.color, r.HasField("color")) == (99, False, client_mod.Color.BLUE, False)
            # a value the server's closed enum does not declare is dropped there
            purple = client_mod.Color.PURPLE
            r = stub.Check(client_mod.Got(e=purple, es=[1, purple, 3], r=2, m={"a": purple, "b": 1}, op=purple),
                           timeout=10)
            got = seen[-1]
            assert (got.e, list(got.es), got.r, dict(got.m), got.HasField("op"), got.op) == (None, [1, 3], 2, {"b": 1}, False, 2)
            assert (r.e, list(r.es), dict(r.m), r.HasField("op")) == (None, [1, 3], {"b": 1}, False)
        finally:
            capp.close()
            sapp.close()
    finally:
        a.stop()
        b.stop()
