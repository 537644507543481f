"""Assigning a oneof member clears the other members, as protobuf does ("last assignment
wins"), checked against protoc's own Python output (`grpc_tools.protoc --python_out`, upb)
for tests/protos/oneof_clear.proto: random sequences of assignments, clears, merges and
copies leave both with the same WhichOneof, HasField and content. Then what stays as it was:
the codec reads and writes the members' raw slots (decoding two set members is refused, and
encoding them when the raw slots were written directly), one-member oneofs and proto3
`optional` fields are plain slots, constructors refuse two members (protobuf keeps the last
keyword given, which a generated signature cannot tell)."""
from __future__ import annotations

import copy
import importlib
import pickle
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from conftest import load_generated

from mrpcd.marshal import codec
from mrpcd.marshal.codec import DecodeError, EncodeError
from mrpcd.marshal.message import OneofField, raw_name
from mrpcd.marshal.schema import SchemaError
from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"
PROTO = PROTOS / "oneof_clear.proto"

# Pick's oneofs whose members clear each other (.proto names), and the attribute of each
ONEOFS = {"choice": ["int_param", "string_param", "msg_param", "bool_param", "double_param", "bytes_param"],
          "pair": ["left", "right"], "kw": ["from", "lambda"]}
ATTR = {"from": "from_", "lambda": "lambda_"}
MEMBERS = [m for ms in ONEOFS.values() for m in ms] + ["only", "opt"]
GROUPS = [*ONEOFS, "lone", "_opt"]


@pytest.fixture(scope="module")
def m(tmp_path_factory):
    """(mrpcd module, _pb2 module) of oneof_clear.proto."""
    out = tmp_path_factory.mktemp("oneof_clear")
    assert cli.main([str(PROTO), "-I", str(PROTOS), "-o", str(out)]) == 0
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}", str(PROTO)],
                   check=True, capture_output=True)
    sys.path.insert(0, str(out))
    try:
        pb = importlib.import_module("oneof_clear_pb2")
    finally:
        sys.path.remove(str(out))
    return load_generated(out / "oneof_clear_mrpc.py", "_oneof_clear_"), pb


def _value(rnd: random.Random, name: str, d) -> object:
    """A random value for member `name` (mrpcd's: a Sub for msg_param)."""
    return {"int_param": lambda: rnd.randint(-2**63, 2**63 - 1), "string_param": lambda: rnd.choice(["", "x", "é"]),
            "msg_param": lambda: d.Sub(x=rnd.randint(0, 3), y=rnd.choice(["", "y"])),
            "bool_param": lambda: rnd.random() < 0.5, "double_param": lambda: rnd.choice([0.0, 1.5, -2.0]),
            "bytes_param": lambda: rnd.choice([b"", b"\x00b"]), "left": lambda: rnd.randint(0, 3),
            "right": lambda: rnd.randint(0, 3), "only": lambda: rnd.choice(["", "o"]), "opt": lambda: rnd.randint(0, 3),
            "from": lambda: rnd.randint(0, 3), "lambda": lambda: rnd.choice(["", "l"]),
            "plain": lambda: rnd.choice(["", "p"])}[name]()


def _assign(mine, theirs, name: str, value, pb) -> None:
    """`mine.<name> = value` and protobuf's equivalent (a message field: CopyFrom into it,
    protobuf refuses assigning one)."""
    setattr(mine, ATTR.get(name, name), value)
    if name == "msg_param":
        theirs.msg_param.CopyFrom(pb.Sub(x=value.x, y=value.y))
    else:
        setattr(theirs, name, value)


def _pair(rnd: random.Random, d, pb):
    """A random Pick of each, built by assignments."""
    mine, theirs = d.Pick(), pb.Pick()
    for _ in range(rnd.randint(0, 4)):
        name = rnd.choice(MEMBERS + ["plain"])
        _assign(mine, theirs, name, _value(rnd, name, d), pb)
    return mine, theirs


def _expected(theirs) -> dict:
    """What mrpcd's to_dict() should give for a _pb2 Pick (unset members None)."""
    out = {}
    for f in theirs.DESCRIPTOR.fields:
        if f.name == "kids":
            out[f.name] = [_expected(k) for k in theirs.kids]
        elif f.name != "plain" and not theirs.HasField(f.name):
            out[f.name] = None
        elif f.name == "msg_param":
            out[f.name] = {"x": theirs.msg_param.x, "y": theirs.msg_param.y}
        else:
            out[f.name] = getattr(theirs, f.name)
    return out


def _same(mine, theirs, where: str) -> None:
    for g in GROUPS:
        assert mine.WhichOneof(g) == theirs.WhichOneof(g), (where, g)
        assert mine.HasField(g) == theirs.HasField(g), (where, g)
    for name in MEMBERS:
        assert mine.HasField(name) == theirs.HasField(name), (where, name)
    assert mine.to_dict() == _expected(theirs), where
    # it encodes (one member set a oneof) and comes back the same
    assert type(mine).FromString(mine.SerializeToString()) == mine, where


def test_random_assignments_clears_merges_and_copies_match_pb2(m, monkeypatch):
    d, pb = m
    monkeypatch.setitem(sys.modules, d.__name__, d)  # (pickle finds classes by module name)
    rnd = random.Random(20261127)
    for case in range(300):
        mine, theirs = _pair(rnd, d, pb)
        ops = []
        for _ in range(12):
            op = rnd.choice(["assign", "assign", "assign", "none", "clear_member", "clear_group", "merge", "copy",
                             "clear", "parse", "pickle", "deepcopy", "kid"])
            ops.append(op)
            if op == "assign":
                name = rnd.choice(MEMBERS + ["plain"])
                _assign(mine, theirs, name, _value(rnd, name, d), pb)
            elif op == "none":  # assigning None unsets a member (protobuf: ClearField)
                name = rnd.choice(MEMBERS)
                setattr(mine, ATTR.get(name, name), None)
                theirs.ClearField(name)
            elif op == "clear_member":
                name = rnd.choice(MEMBERS)
                mine.ClearField(name)
                theirs.ClearField(name)
            elif op == "clear_group":
                g = rnd.choice(GROUPS)
                mine.ClearField(g)
                theirs.ClearField(g)
            elif op in ("merge", "copy"):
                om, ot = _pair(rnd, d, pb)
                getattr(mine, "MergeFrom" if op == "merge" else "CopyFrom")(om)
                getattr(theirs, "MergeFrom" if op == "merge" else "CopyFrom")(ot)
            elif op == "clear":
                mine.Clear()
                theirs.Clear()
            elif op == "parse":
                om, ot = _pair(rnd, d, pb)
                mine.ParseFromString(om.SerializeToString())
                theirs.ParseFromString(ot.SerializeToString())
            elif op == "pickle":
                mine = pickle.loads(pickle.dumps(mine))
            elif op == "deepcopy":
                mine = copy.deepcopy(mine) if rnd.random() < 0.5 else copy.copy(mine)
            elif op == "kid":  # a oneof in a repeated message field
                km, kt = _pair(rnd, d, pb)
                mine.kids.append(km)
                theirs.kids.add().CopyFrom(kt)
            _same(mine, theirs, f"case {case}: {ops}")


def test_assigning_a_member_clears_the_others(m):
    d, pb = m
    p, q = d.Pick(int_param=1), pb.Pick(int_param=1)
    p.string_param = q.string_param = "x"
    assert p.WhichOneof("choice") == q.WhichOneof("choice") == "string_param"
    assert p.int_param is None and not p.HasField("int_param")
    # a member set to its type's zero value is set, and clears the others, as protobuf
    p.bool_param = q.bool_param = False
    assert p.WhichOneof("choice") == q.WhichOneof("choice") == "bool_param" and p.string_param is None
    # assigning None unsets only that member (protobuf refuses None: ClearField there)
    p.string_param = None
    assert p.WhichOneof("choice") == "bool_param"
    p.bool_param = None
    assert p.WhichOneof("choice") is None
    # the other oneofs are left alone
    p.left, p.int_param = 1, 2
    p.right = 3
    assert (p.left, p.right, p.int_param) == (None, 3, 2)
    # members named like keywords: through the alias and through getattr
    p.from_ = 4
    setattr(p, "lambda", "l")
    assert p.from_ is None and p.WhichOneof("kw") == "lambda"
    assert d.Pick.FromString(p.SerializeToString()) == p


def test_a_message_member(m):
    d, pb = m
    p = d.Pick(int_param=1)
    # unset it reads None as every unset message field here (protobuf would give a default
    # instance, and writing into it would set it): AttributeError, as docs/PORTING.md says
    with pytest.raises(AttributeError):
        p.msg_param.x = 1  # type: ignore[union-attr]
    assert p.WhichOneof("choice") == "int_param"
    sub = d.Sub(x=1)
    p.msg_param = sub
    assert p.WhichOneof("choice") == "msg_param" and p.int_param is None and p.msg_param is sub
    p.msg_param.x = 2  # writing into the set member keeps it set
    assert p.WhichOneof("choice") == "msg_param" and d.Pick.FromString(p.SerializeToString()).msg_param.x == 2
    p.int_param = 3  # the sub-message is dropped from the message (the object itself is left as it was)
    assert p.msg_param is None and sub.x == 2
    # a dict given to the constructor becomes the message, as before
    assert d.Pick(msg_param={"x": 5}).msg_param == d.Sub(x=5)


def test_merge_from_replaces_the_other_member_as_pb2(m):
    d, pb = m
    a, b = d.Pick(int_param=1, left=1), d.Pick(string_param="z")
    pa, pb_ = pb.Pick(int_param=1, left=1), pb.Pick(string_param="z")
    a.MergeFrom(b)
    pa.MergeFrom(pb_)
    assert a.WhichOneof("choice") == pa.WhichOneof("choice") == "string_param" and a.left == 1
    # a set message member in both merges, as protobuf's
    a, pa = d.Pick(msg_param=d.Sub(x=1)), pb.Pick(msg_param=pb.Sub(x=1))
    a.MergeFrom(d.Pick(msg_param=d.Sub(y="q")))
    pa.MergeFrom(pb.Pick(msg_param=pb.Sub(y="q")))
    assert a.msg_param == d.Sub(x=1, y="q") and (pa.msg_param.x, pa.msg_param.y) == (1, "q")
    # an unset oneof in the source leaves it
    a.MergeFrom(d.Pick())
    assert a.WhichOneof("choice") == "msg_param"


def test_constructors_refuse_two_members(m):
    d, pb = m
    # protobuf keeps the last keyword given; a generated signature cannot tell which that was
    assert pb.Pick(int_param=1, string_param="x").WhichOneof("choice") == "string_param"
    with pytest.raises(TypeError, match=r"^Pick\(\) got more than one member of oneof choice \(int_param, msg_param\)"):
        d.Pick(int_param=1, msg_param={"x": 1})
    with pytest.raises(TypeError, match=r"oneof kw \(from, lambda\)"):
        d.Pick(from_=1, lambda_="l")
    with pytest.raises(TypeError, match=r"oneof pair \(left, right\)"):
        d.Pick(left=0, right=0)  # (zero values are set too)
    # None is not given (as protobuf's), one member of each oneof is fine
    p = d.Pick(int_param=None, string_param="x", left=1, from_=2, only="o", opt=3)
    assert [p.WhichOneof(g) for g in GROUPS] == ["string_param", "left", "from", "only", "opt"]
    # a dict for a message field: the TypeError names the field
    with pytest.raises(TypeError, match=r"kids.*oneof choice \(int_param, string_param\)"):
        d.Pick(kids=[{"int_param": 1, "string_param": "x"}])


def test_one_member_oneofs_and_optional_fields_stay_plain_slots(m):
    d, _ = m
    member = type(d.Pick.__dict__["plain"])  # a plain field's slot descriptor
    assert type(d.Pick.__dict__["only"]) is member and type(d.Pick.__dict__["opt"]) is member
    assert "only" not in d.Pick.__mrpc_raw__ and "opt" not in d.Pick.__mrpc_raw__
    for names in ONEOFS.values():
        for name in names:
            prop = d.Pick.__dict__[name]
            assert isinstance(prop, OneofField) and type(d.Pick.__dict__[raw_name(name)]) is member
            assert prop.others == tuple(n for n in names if n != name)
    assert dict(d.Pick.__mrpc_oneofs__) == {g: tuple(ms) for g, ms in ONEOFS.items()}


def test_the_codec_reads_and_writes_the_raw_slots(m):
    d, _ = m
    # decoding: two members set on the wire are refused, as before
    raw = msgpack.unpackb(d.Pick(int_param=1).SerializeToString(), raw=False)
    raw[1] = "x"
    with pytest.raises(DecodeError, match="more than one member of oneof choice is set"):
        d.Pick.FromString(msgpack.packb(raw, use_bin_type=True))
    # encoding: reachable only by writing the raw slots; the error says so
    p = d.Pick(int_param=1)
    setattr(p, raw_name("string_param"), "x")
    with pytest.raises(EncodeError, match=r"^mrpc\.oneofclear\.Pick: more than one member of oneof choice is set "
                                          r"\(int_param, string_param\): its members' raw slots were written "
                                          r"directly, ClearField\('choice'\) first$"):
        p.SerializeToString()
    p.ClearField("choice")
    assert p.SerializeToString() == d.Pick().SerializeToString()


def test_pickles_keep_the_set_member(m, monkeypatch):
    d, _ = m
    monkeypatch.setitem(sys.modules, d.__name__, d)
    p = d.Pick(bytes_param=b"b", right=2, lambda_="l", kids=[d.Pick(msg_param=d.Sub(x=1))])
    back = pickle.loads(pickle.dumps(p))
    assert back == p and [back.WhichOneof(g) for g in ONEOFS] == ["bytes_param", "right", "lambda"]
    assert back.kids[0].WhichOneof("choice") == "msg_param"
    # a state as pickled before members had properties (every slot by name: pickle assigns
    # them in that order) loads the same
    state = {n: p.to_dict()[n] if n != "kids" else p.kids for n in d.Pick.__mrpc_fields__}

    class Old:
        def __reduce_ex__(self, protocol):
            return object.__new__, (d.Pick,), (None, state)

    assert pickle.loads(pickle.dumps(Old())) == p


def test_binding_again_keeps_the_slots(m):
    d, _ = m
    slot = d.Pick.__dict__["int_param"].slot
    codec.bind(d.SCHEMA, {"mrpc.oneofclear.Pick": d.Pick, "mrpc.oneofclear.Sub": d.Sub})
    assert d.Pick.__dict__["int_param"].slot is slot
    p = d.Pick(int_param=1)
    p.string_param = "x"
    assert p.WhichOneof("choice") == "string_param" and d.Pick.FromString(p.SerializeToString()) == p


def test_a_class_without_slots_cannot_have_oneof_members(m):
    d, _ = m

    class Loose:  # (attributes in a __dict__: nothing to put a property in front of)
        pass

    with pytest.raises(SchemaError, match=r"Loose\.int_param: cannot give the field a oneof member's property"):
        codec.bind(d.SCHEMA, {"mrpc.oneofclear.Pick": Loose, "mrpc.oneofclear.Sub": d.Sub})


def test_a_wide_oneof(m):
    # more than six members: the constructor's test is a count of the None arguments
    d, pb = m
    for k in range(1, 8):
        w, q = d.Wide(**{f"w{k}": 0 if k < 7 else ""}), pb.Wide(**{f"w{k}": 0 if k < 7 else ""})
        assert w.WhichOneof("w") == q.WhichOneof("w") == f"w{k}"
        w.w3 = q.w3 = 1
        assert w.WhichOneof("w") == q.WhichOneof("w") == "w3" and d.Wide.FromString(w.SerializeToString()) == w
    assert d.Wide().WhichOneof("w") is None
    with pytest.raises(TypeError, match=r"oneof w \(w2, w7\)"):
        d.Wide(w2=1, w7="x")
