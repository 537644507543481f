"""The protobuf Python API that code ported from grpcio reaches for on generated messages:
enum wrappers and constants, repeated-message `add()`, dicts for message fields in
constructors, message-valued maps, Timestamp / Duration helpers (tests/protos/compat.proto)."""
from __future__ import annotations

import copy
import datetime
import os
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_generated

from mrpcd.stubgen import cli

PROTOS = Path(__file__).resolve().parent / "protos"
ROOT = PROTOS.parent.parent


def load(path: Path, tag: str = ""):
    """A generated module under a private name (other tests import their own)."""
    return load_generated(path, f"_stubgen_compat_{tag}")


def generate(tmp_path: Path, text: str, name: str = "t") -> Path:
    """Write `text` as NAME.proto, generate it into tmp_path/out; returns the .py's path."""
    proto = tmp_path / f"{name}.proto"
    proto.write_text(text)
    out = tmp_path / "out"
    assert cli.main([str(proto), "-o", str(out)]) == 0
    return out / f"{name}_mrpc.py"


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    out = tmp_path_factory.mktemp("stubgen_compat")
    assert cli.main([str(PROTOS / "compat.proto"), "-o", str(out)]) == 0
    return load(out / "compat_mrpc.py")


def _mypy(cwd: Path, path: Path, *files: Path):
    """mypy over `files` with the generated modules in `path` and mrpcd's own types (the
    source tree laid out as the package: the editable install's import hook is invisible
    to mypy), as tests/test_stubgen.py does."""
    src = cwd / "src"
    if not src.exists():
        pkg = src / "mrpcd"
        pkg.mkdir(parents=True)
        for entry in (ROOT / "mrpcd").iterdir():
            (pkg / entry.name).symlink_to(entry)
        for sub in ("marshal", "native", "policies", "stubgen", "transports"):
            (pkg / sub).symlink_to(ROOT / sub)
    env = dict(os.environ, MYPYPATH=os.pathsep.join([str(path), str(src)]))
    cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental",
           "--cache-dir", os.devnull, *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# -- enums: protobuf's EnumTypeWrapper methods and value constants ------------------------------------


def test_enum_wrapper_methods(c):
    assert c.Color.Name(1) == "GREEN" and c.Color.Value("GREEN") == 1
    assert c.Color.Value("GREEN") is c.Color.GREEN  # a member: still an int
    assert c.Color.keys() == ["RED", "GREEN"] and c.Color.values() == [0, 1]
    assert c.Color.items() == [("RED", 0), ("GREEN", 1)]
    assert c.Outer.Kind.Name(0) == "K0" and c.Outer.Kind.Value("K1") == 1
    with pytest.raises(ValueError, match="Color has no name defined for value 5"):
        c.Color.Name(5)
    with pytest.raises(ValueError, match="Color has no value defined for name 'BLUE'"):
        c.Color.Value("BLUE")
    # still an IntEnum
    assert c.Color(1) is c.Color.GREEN and c.Color.GREEN == 1 and list(c.Color) == [c.Color.RED, c.Color.GREEN]


def test_enum_value_constants(c):
    assert c.RED is c.Color.RED and c.GREEN is c.Color.GREEN  # module level: top-level enums
    assert c.Outer.K0 is c.Outer.Kind.K0 and c.Outer.K1 is c.Outer.Kind.K1  # nested: the message class
    o = c.Outer(kind=c.Outer.K1, color=c.GREEN)
    assert c.Outer.FromString(o.SerializeToString()).kind is c.Outer.Kind.K1


def test_enum_names_are_the_proto_names(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package e;
enum Word { from = 0; to = 1; }
enum Aliased { option allow_alias = true; A = 0; B = 1; ALSO_B = 1; }
"""), "names")
    assert m.Word.Name(0) == "from" and m.Word.Value("from") is m.Word.from_ and m.Word.keys() == ["from", "to"]
    assert m.from_ is m.Word.from_  # the constant has the member's (Python) name
    assert m.Aliased.Name(1) == "B" and m.Aliased.Value("ALSO_B") == 1
    assert m.Aliased.keys() == ["A", "B", "ALSO_B"]


def test_enum_constants_never_replace_other_names(tmp_path):
    m = load(generate(tmp_path, """
syntax = "proto3";
package e;
enum Word { SCHEMA = 0; mrpcd = 1; OK = 2; }
message Msg {
  enum Kind { Clear = 0; from = 1; HasField = 3; DONE = 4; to_dict = 5; }
  int32 from_ = 1;
  Kind kind = 2;
}
"""), "clash")
    # a value named like a generated or imported name, a Message method, a field: no constant
    assert m.OK is m.Word.OK and not isinstance(m.SCHEMA, int) and m.mrpcd.StatusCode
    assert m.Msg.DONE is m.Msg.Kind.DONE
    assert callable(m.Msg.Clear) and callable(m.Msg.HasField) and callable(m.Msg.to_dict)
    msg = m.Msg(from_=3, kind=m.Msg.Kind.from_)
    assert msg.from_ == 3 and m.Msg.FromString(msg.SerializeToString()) == msg


# -- Timestamp / Duration helpers ------------------------------------------------------------------


def test_timestamp_helpers(c):
    t = c.Timestamp()
    t.FromJsonString("1972-01-01T10:00:20.021-05:00")
    assert (t.seconds, t.nanos) == (63126020, 21000000) and t.ToJsonString() == "1972-01-01T15:00:20.021Z"
    assert t.ToMilliseconds() == 63126020021 and t.ToSeconds() == 63126020
    t.FromNanoseconds(-1)  # normalised: nanos in [0, 1e9)
    assert (t.seconds, t.nanos) == (-1, 999999999) and t.ToJsonString() == "1969-12-31T23:59:59.999999999Z"
    assert t.ToMilliseconds() == -1 and t.ToMicroseconds() == -1 and t.ToNanoseconds() == -1
    t.FromMilliseconds(1500)
    assert (t.seconds, t.nanos) == (1, 500000000) and t.ToJsonString() == "1970-01-01T00:00:01.500Z"
    t.FromSeconds(5)
    assert (t.seconds, t.nanos) == (5, 0) and t.ToJsonString() == "1970-01-01T00:00:05Z"
    # datetimes: naive ones are UTC; ToDatetime gives naive UTC, or aware in the zone asked for
    t.FromDatetime(datetime.datetime(2024, 2, 29, 12, 0, 0, 250))
    assert (t.seconds, t.nanos) == (1709208000, 250000)
    assert t.ToDatetime() == datetime.datetime(2024, 2, 29, 12, 0, 0, 250)
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    t.FromDatetime(datetime.datetime(2024, 2, 29, 14, 0, tzinfo=plus2))
    assert t.seconds == 1709208000 and t.ToDatetime(plus2).hour == 14 and t.ToDatetime(plus2).tzinfo == plus2
    before = time.time_ns()
    t.GetCurrentTime()
    assert before <= t.ToNanoseconds() <= time.time_ns() and 0 <= t.nanos < 10**9
    assert c.Timestamp(seconds=10) - c.Timestamp(seconds=4) == datetime.timedelta(seconds=6)
    assert c.Timestamp(seconds=10) + c.Duration(seconds=1) == datetime.datetime(1970, 1, 1, 0, 0, 11)
    # bad input
    with pytest.raises(ValueError, match="Failed to parse timestamp"):
        t.FromJsonString("1972-01-01 10:00:20Z")
    with pytest.raises(ValueError, match="seconds .* must be in range"):
        t.FromSeconds(10**12)
    with pytest.raises(TypeError, match="Expected a datetime"):
        t.FromDatetime(1.5)
    with pytest.raises(ValueError, match="nanos"):
        c.Timestamp(seconds=1, nanos=-1).ToJsonString()
    # a field of a message: the helpers work on it, it encodes as any message
    o = c.Outer(ts=c.Timestamp())
    o.ts.FromSeconds(7)
    assert c.Outer.FromString(o.SerializeToString()).ts.ToSeconds() == 7


def test_duration_helpers(c):
    d = c.Duration()
    d.FromJsonString("-3.100s")
    assert (d.seconds, d.nanos) == (-3, -100000000) and d.ToJsonString() == "-3.100s"
    d.FromNanoseconds(-1500000000)  # nanos has the sign of seconds
    assert (d.seconds, d.nanos) == (-1, -500000000) and d.ToMilliseconds() == -1500
    d.FromNanoseconds(-1)
    assert (d.seconds, d.nanos) == (0, -1) and d.ToJsonString() == "-0.000000001s" and d.ToMicroseconds() == 0
    d.FromTimedelta(datetime.timedelta(days=1, microseconds=-1))
    assert (d.seconds, d.nanos) == (86399, 999999000) and d.ToTimedelta() == datetime.timedelta(days=1, microseconds=-1)
    d.FromMilliseconds(-1)
    assert (d.seconds, d.nanos) == (0, -1000000) and d.ToTimedelta() == datetime.timedelta(milliseconds=-1)
    d.FromSeconds(2)
    assert d.ToJsonString() == "2s" and d.ToSeconds() == 2 and d.ToNanoseconds() == 2 * 10**9
    assert c.Duration(seconds=1) + datetime.timedelta(seconds=1) == datetime.timedelta(seconds=2)
    with pytest.raises(ValueError, match="Couldn't parse duration"):
        d.FromJsonString("1.5")
    with pytest.raises(ValueError, match="different signs"):
        c.Duration(seconds=1, nanos=-1).ToJsonString()
    with pytest.raises(TypeError, match="Expected a timedelta"):
        d.FromTimedelta(3)


def test_timestamp_and_duration_agree_with_protobuf(c):
    """The same results as protobuf's own classes over a spread of values."""
    timestamp_pb2 = pytest.importorskip("google.protobuf.timestamp_pb2")
    duration_pb2 = pytest.importorskip("google.protobuf.duration_pb2")
    rng = random.Random(7)
    for _ in range(500):
        ns = rng.choice([rng.randint(-62135596800 * 10**9, 253402300799 * 10**9), rng.randint(-10**12, 10**12)])
        a, b = c.Timestamp(), timestamp_pb2.Timestamp()
        a.FromNanoseconds(ns)
        b.FromNanoseconds(ns)
        assert (a.seconds, a.nanos) == (b.seconds, b.nanos) and a.ToJsonString() == b.ToJsonString()
        assert (a.ToMilliseconds(), a.ToMicroseconds(), a.ToDatetime()) == (b.ToMilliseconds(), b.ToMicroseconds(), b.ToDatetime())
        back = c.Timestamp()
        back.FromJsonString(b.ToJsonString())
        assert back == a
        x, y = c.Duration(), duration_pb2.Duration()
        x.FromNanoseconds(ns // 3)
        y.FromNanoseconds(ns // 3)
        assert (x.seconds, x.nanos) == (y.seconds, y.nanos) and x.ToJsonString() == y.ToJsonString()
        assert (x.ToMilliseconds(), x.ToMicroseconds(), x.ToTimedelta()) == (y.ToMilliseconds(), y.ToMicroseconds(), y.ToTimedelta())
        back = c.Duration()
        back.FromJsonString(y.ToJsonString())
        assert back == x


# -- repeated message fields: add() ------------------------------------------------------------------


def test_repeated_message_add(c):
    o = c.Outer()
    first = o.items.add(a=3)
    assert first is o.items[0] and first == c.Inner(a=3) and o.items.add() == c.Inner()
    assert len(o.items) == 2
    # still a list: append / extend / index / slices / == with a plain list
    o.items.append(c.Inner(a=4))
    o.items.extend([c.Inner(a=5)])
    assert isinstance(o.items, list) and o.items[-1].a == 5 and [i.a for i in o.items[1:]] == [0, 4, 5]
    assert o.items == [c.Inner(a=3), c.Inner(), c.Inner(a=4), c.Inner(a=5)]
    # every way of getting the field gives the container
    back = c.Outer.FromString(o.SerializeToString())
    assert back == o and back.items.add(a=9).a == 9
    assert c.Outer(items=[c.Inner()]).items.add(s="x").s == "x"
    deep = copy.deepcopy(o)
    assert deep == o and deep.items.add() is deep.items[-1] and len(o.items) == 4
    shallow = copy.copy(o)  # shares the list, as copy.copy does
    assert shallow == o and shallow.items.add() is o.items[-1]
    del o.items[-1]
    cleared = c.Outer(items=[c.Inner()])
    cleared.Clear()
    assert cleared.items.add() == c.Inner()
    cleared.ClearField("items")
    cleared.CopyFrom(o)
    assert cleared == o and cleared.items.add() is cleared.items[-1]
    merged = c.Outer()
    merged.MergeFrom(o)
    merged.ParseFromString(o.SerializeToString())
    assert merged == o and merged.items.add() is merged.items[-1]
    assert o.to_dict()["items"][0] == {"a": 3, "s": "", "leaf": None} and type(o.to_dict()["items"]) is list
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        o.items.add(nope=1)


def test_repeated_add_takes_any_field_name(tmp_path):
    """add(**kw) passes every keyword to the element's constructor, `self` too (a field name)."""
    m = load(generate(tmp_path, """
syntax = "proto3";
package a;
message Sub { int32 self = 1; int32 kwargs = 2; }
message Msg { repeated Sub subs = 1; }
"""), "addself")
    o = m.Msg()
    assert o.subs.add(self=1, kwargs=2) == m.Sub(self=1, kwargs=2) and o.subs == [m.Sub(self=1, kwargs=2)]


def test_dicts_with_keyword_field_names_from_to_dict_make_messages(tmp_path):
    """to_dict() gives a keyword-named field by its .proto name (`from`); constructors call it
    `from_`: a dict of it given for a message field (in a repeated field, as a map value) was
    refused, so `Holder(**h.to_dict())` failed for such messages."""
    m = load(generate(tmp_path, """
syntax = "proto3";
package kw;
message Range { int32 from = 1; int32 to = 2; }
message Holder { Range r = 1; repeated Range rs = 2; map<string, Range> by = 3; }
"""), "kwdict")
    h = m.Holder(r={"from": 1, "to": 2}, rs=[{"from": 3}], by={"k": {"from": 4}})
    assert (h.r.from_, h.r.to, h.rs[0].from_, h.by["k"].from_) == (1, 2, 3, 4)
    assert m.Holder(**h.to_dict()) == h
    assert m.Holder(r={"from_": 5}).r.from_ == 5  # the Python name still works
    with pytest.raises(TypeError, match=r"^kw\.Holder\.r: .*unexpected keyword argument 'nope'"):
        m.Holder(r={"from": 1, "nope": 2})


def test_timestamp_and_duration_fields_take_datetime_and_timedelta(c, tmp_path):
    """protobuf's constructors take a datetime for a Timestamp field and a timedelta for a
    Duration field (Outer(ts=datetime.now(timezone.utc))); they were kept as they were and
    the encoder refused them."""
    import datetime

    when = datetime.datetime(2020, 1, 2, 3, 4, 5, 600_000, tzinfo=datetime.timezone.utc)
    o = c.Outer(ts=when, dur=datetime.timedelta(seconds=-1.5))
    assert (o.ts.seconds, o.ts.nanos, o.dur.seconds, o.dur.nanos) == (1577934245, 600_000_000, -1, -500_000_000)
    assert type(o.ts) is c.Timestamp and o.ts.ToDatetime(datetime.timezone.utc) == when
    assert c.Outer.FromString(o.SerializeToString()) == o
    naive = c.Outer(ts=datetime.datetime(1970, 1, 1, 0, 0, 7))  # naive: UTC, as protobuf
    assert naive.ts.seconds == 7
    own, as_dict = c.Timestamp(seconds=1), c.Outer(ts={"seconds": 2})
    assert c.Outer(ts=own).ts is own and as_dict.ts == c.Timestamp(seconds=2) and c.Outer(ts=None).ts is None
    with pytest.raises(ValueError, match=r"^compat\.Outer\.dur: Duration is not valid"):
        c.Outer(dur=datetime.timedelta(days=10**8))
    with pytest.raises(ValueError, match=r"compat\.Outer\.ts"):  # (the EncodeError)
        c.Outer(ts=datetime.timedelta(1)).SerializeToString()  # a timedelta is no Timestamp


def test_containers_pickle(c):
    # a module that pickle can import
    sys.modules[c.__name__] = c
    try:
        o = c.Outer(items=[c.Inner(a=1)], m={"k": c.Inner(a=2)})
        back = pickle.loads(pickle.dumps(o))
        assert back == o and back.items.add(a=3).a == 3 and back.m.get_or_create("z") == c.Inner()
        assert type(back.items) is type(o.items) and type(back.m) is type(o.m)
    finally:
        del sys.modules[c.__name__]


# -- message-valued maps: m[key] and get_or_create() ---------------------------------------------------


def test_message_map_creates_missing_values(c):
    o = c.Outer()
    o.m["x"].a = 1  # created on access, as protobuf's message maps
    o.m.get_or_create("y").s = "why"
    assert o.m.get_or_create("x") is o.m["x"]
    assert o.m == {"x": c.Inner(a=1), "y": c.Inner(s="why")}
    assert "z" not in o.m and o.m.get("z") is None and "z" not in o.m  # get() and `in` create nothing
    back = c.Outer.FromString(o.SerializeToString())
    assert back == o and back.m["new"] == c.Inner() and "new" in back.m
    assert copy.deepcopy(o).m["w"] == c.Inner() and "w" not in o.m
    with pytest.raises(KeyError):  # maps of scalars stay plain dicts
        o.counts["nope"]
    o.m["a"].a = 2
    assert o.SerializeToString(deterministic=True) == c.Outer(m=dict(sorted(o.m.items()))).SerializeToString()


# -- dicts for message fields in constructors --------------------------------------------------------


def test_constructor_takes_dicts_for_messages(c):
    o = c.Outer(one={"a": 1, "leaf": {"x": 2}}, items=[{"a": 3}, c.Inner(a=4)], m={"k": {"s": "v"}},
                ts={"seconds": 5}, picked={"a": 6})
    assert o.one == c.Inner(a=1, leaf=c.Leaf(x=2)) and o.one.leaf.x == 2
    assert o.items == [c.Inner(a=3), c.Inner(a=4)] and type(o.items[0]) is c.Inner
    assert o.m == {"k": c.Inner(s="v")} and o.ts.ToSeconds() == 5
    assert o.WhichOneof("choice") == "picked" and o.picked.a == 6
    assert c.Outer.FromString(o.SerializeToString()) == o


def test_base_class_constructor_does_the_same(c):
    """Message.__init__ (classes written by hand and bound with codec.bind use it)."""
    from mrpcd.marshal.message import Message
    o = object.__new__(c.Outer)
    Message.__init__(o, one={"a": 1}, items=[{"a": 2}], m={"k": {"a": 3}}, numbers=(1, 2))
    assert o == c.Outer(one=c.Inner(a=1), items=[c.Inner(a=2)], m={"k": c.Inner(a=3)}, numbers=[1, 2])
    assert o.items.add(a=4).a == 4 and o.m.get_or_create("z") == c.Inner() and type(o.numbers) is list
    with pytest.raises(TypeError, match=r"^compat\.Outer\.items\[0\]: "):
        Message.__init__(object.__new__(c.Outer), items=[{"nope": 1}])


def test_constructor_dict_errors_name_the_field(c):
    with pytest.raises(TypeError, match=r"^compat\.Outer\.one: .*unexpected keyword argument 'nope'"):
        c.Outer(one={"nope": 1})
    with pytest.raises(TypeError, match=r"^compat\.Outer\.items\[1\]: .*'nope'"):
        c.Outer(items=[{}, {"nope": 1}])
    with pytest.raises(TypeError, match=r"^compat\.Outer\.m\['k'\]: .*'nope'"):
        c.Outer(m={"k": {"nope": 1}})
    with pytest.raises(TypeError, match=r"^compat\.Outer\.one: compat\.Inner\.leaf: .*'nope'"):
        c.Outer(one={"leaf": {"nope": 1}})
    with pytest.raises(TypeError, match=r"^compat\.Outer\.one: .*keywords must be strings"):
        c.Outer(one={1: 2})
    # other wrong types are still refused by the encoder, naming the field
    from mrpcd.marshal.codec import EncodeError
    with pytest.raises(EncodeError, match="compat.Outer.one: expected Inner, got int"):
        c.Outer(one=5).SerializeToString()
    with pytest.raises(EncodeError, match=r"compat.Outer.items: expected Inner, got str"):
        c.Outer(items=["x"]).SerializeToString()


# -- the .pyi types all of it ----------------------------------------------------------------------


def test_pyi_types_the_compat_api(c, tmp_path):
    pytest.importorskip("mypy")
    out = Path(c.__file__).parent
    use = tmp_path / "use.py"
    use.write_text(
        "import datetime\n"
        "import compat_mrpc as c\n"
        "name: str = c.Color.Name(1)\n"
        "number: int = c.Color.Value('GREEN') + c.Outer.Kind.Value('K1')\n"
        "keys: list[str] = c.Color.keys()\n"
        "pairs: list[tuple[str, c.Outer.Kind]] = c.Outer.Kind.items()\n"
        "red: c.Color = c.RED\n"
        "k1: c.Outer.Kind = c.Outer.K1\n"
        "o = c.Outer(one={'a': 1}, items=[{'a': 2}, c.Inner()], m={'k': {'a': 3}})\n"
        "inner: c.Inner = o.items.add(a=4)\n"
        # Value() / values() / items() give members: a field of the enum takes them
        "o.color = c.Color.Value('GREEN')\n"
        "o.kind = c.Outer.Kind.values()[1]\n"
        "o.color = dict(c.Color.items())['RED']\n"
        "also: c.Inner = o.m.get_or_create('y')\n"
        "items: list[c.Inner] = o.items\n"
        "first: c.Inner = o.items[0]\n"
        "by_key: dict[str, c.Inner] = o.m\n"
        "value: c.Inner = o.m['k']\n"
        "t = c.Timestamp()\n"
        "t.GetCurrentTime()\n"
        "when: datetime.datetime = t.ToDatetime()\n"
        "ms: int = t.ToMilliseconds()\n"
        "d = c.Duration()\n"
        "d.FromTimedelta(datetime.timedelta(seconds=1))\n"
        "text: str = d.ToJsonString()\n"
        "dated = c.Outer(ts=datetime.datetime.now(datetime.timezone.utc), dur=datetime.timedelta(seconds=2))\n"
    )
    r = _mypy(tmp_path, out, out / "compat_mrpc.pyi", use)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.py"
    bad.write_text("import compat_mrpc as c\n"
                   "c.Color.Name('RED')\n"
                   "c.Outer().items.add().nope\n"
                   "c.Outer(one=1)\n"
                   # the containers' elements are the message class, not Any
                   "c.Outer().items[0].nope\n"
                   "for i in c.Outer().items: i.nope\n"
                   "c.Outer().m['k'].nope\n"
                   "c.Outer().m.get('k', c.Inner()).nope\n"
                   "import datetime\n"
                   "c.Outer(ts=datetime.timedelta(1))\n")
    r = _mypy(tmp_path, out, bad)
    assert r.returncode == 1 and r.stdout.count("error:") == 8, r.stdout


def test_dict_conversion_where_dict_is_another_name(tmp_path):
    """The generated __init__ compares with the builtin dict: a parameter or a module constant
    named `dict` must not hide it."""
    m = load(generate(tmp_path, """
syntax = "proto3";
package d;
enum Word { dict = 0; list = 1; }
message Sub { int32 x = 1; }
message A { Sub sub = 1; int32 dict = 2; repeated Sub subs = 3; int32 self = 4; }
message B { Sub sub = 1; map<string, Sub> by = 2; }
"""), "dictname")
    assert m.dict is m.Word.dict
    a = m.A(sub={"x": 1}, dict=2, subs=[{"x": 3}], self=4)
    assert a.sub == m.Sub(x=1) and a.dict == 2 and a.subs == [m.Sub(x=3)] and a.self == 4
    b = m.B(sub={"x": 5}, by={"k": {"x": 6}})
    assert b.sub.x == 5 and b.by["k"].x == 6 and m.B.FromString(b.SerializeToString()) == b


# -- messages of one .proto type generated into two modules -----------------------------------------


def test_copy_and_merge_from_another_modules_class(tmp_path):
    """Each module has its own Timestamp (and classes of the types it imports): protobuf's
    `resp.ts.CopyFrom(req.ts)` / `MergeFrom` take the other module's instance, as `==` and the
    encoder do; a different message type is still refused."""
    (tmp_path / "a.proto").write_text("""
syntax = "proto3";
package a;
import "google/protobuf/timestamp.proto";
message Common { int32 x = 1; string s = 2; Common sub = 3; repeated Common kids = 4; }
message Req { google.protobuf.Timestamp ts = 1; Common c = 2; }
""")
    (tmp_path / "b.proto").write_text("""
syntax = "proto3";
package b;
import "google/protobuf/timestamp.proto";
import "a.proto";
message Resp { google.protobuf.Timestamp ts = 1; a.Common c = 2; }
""")
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "a.proto"), str(tmp_path / "b.proto"), "-o", str(out)]) == 0
    a = load(out / "a_mrpc.py", "cross_a")
    b = load(out / "b_mrpc.py", "cross_b")
    assert a.Timestamp is not b.Timestamp and a.Common is not b.Common
    req = a.Req(ts={"seconds": 5, "nanos": 6}, c={"x": 1, "sub": {"s": "deep"}, "kids": [{"x": 2}]})
    resp = b.Resp(ts={}, c={"s": "mine", "sub": {"x": 7}})
    resp.ts.CopyFrom(req.ts)
    assert (resp.ts.seconds, resp.ts.nanos) == (5, 6) and type(resp.ts) is b.Timestamp
    resp.c.MergeFrom(req.c)
    assert (resp.c.x, resp.c.s) == (1, "mine") and (resp.c.sub.x, resp.c.sub.s) == (7, "deep")  # merged recursively
    assert resp.c.kids == [a.Common(x=2)] and resp.c.kids[0] is not req.c.kids[0]
    assert b.Resp.FromString(resp.SerializeToString()) == resp
    with pytest.raises(TypeError, match="must be instance of same class"):
        resp.ts.CopyFrom(req.c)
    with pytest.raises(TypeError, match="must be instance of same class"):
        resp.c.MergeFrom(req)
