"""Codec: property-based round trips for every field type, strict decoding, read_field."""
from __future__ import annotations

import enum
import fractions
import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpcd.marshal import codec
from mrpcd.marshal.codec import DecodeError, EncodeError, decode_plain, encode_plain, read_field
from mrpcd.marshal.message import Message
from mrpcd.marshal.schema import INT_RANGES, Field, Schema, SchemaError, TypeRef
from mrpcd.marshal.schema import Message as MessageDef

INT_KINDS = sorted(INT_RANGES)


def F(name, num, kind, ref=None, label="single", key=None, oneof=None):
    return [name, num, [kind, ref], label, [key, None] if key else None, oneof]


SCALARS = INT_KINDS + ["double", "float", "bool", "string", "bytes"]

SCHEMA = Schema.from_dict({
    "enums": [["t.Color", [["RED", 0], ["GREEN", 1], ["BLUE", 2]]]],
    "messages": [
        ["t.Inner", [F("s", 1, "string"), F("n", 2, "int32")]],
        ["t.Scalars", [F(k, i + 1, k) for i, k in enumerate(SCALARS)] + [F("color", 99, "enum", "t.Color")]],
        ["t.Composite", [
            F("inner", 1, "message", "t.Inner"),
            F("r_int32", 2, "int32", label="repeated"),
            F("r_uint64", 3, "uint64", label="repeated"),
            F("r_sint64", 4, "sint64", label="repeated"),
            F("r_double", 5, "double", label="repeated"),
            F("r_bool", 6, "bool", label="repeated"),
            F("r_string", 7, "string", label="repeated"),
            F("r_bytes", 8, "bytes", label="repeated"),
            F("r_color", 9, "enum", "t.Color", label="repeated"),
            F("r_inner", 10, "message", "t.Inner", label="repeated"),
            F("m_int_str", 11, "string", label="map", key="int32"),
            F("m_str_inner", 12, "message", "t.Inner", label="map", key="string"),
            F("m_bool_i64", 13, "int64", label="map", key="bool"),
            F("m_u64_double", 14, "double", label="map", key="uint64"),
            F("m_s32_bytes", 15, "bytes", label="map", key="sfixed32"),
            F("m_str_color", 16, "enum", "t.Color", label="map", key="string"),
            F("o_int32", 17, "int32", label="optional"),
            F("o_string", 18, "string", label="optional"),
            F("o_double", 19, "double", label="optional"),
            F("o_color", 20, "enum", "t.Color", label="optional"),
            F("c_int", 21, "int64", oneof="choice"),
            F("c_str", 22, "string", oneof="choice"),
            F("c_inner", 23, "message", "t.Inner", oneof="choice"),
        ]],
        ["t.Node", [F("value", 1, "int32"), F("child", 2, "message", "t.Node"),
                    F("kids", 3, "message", "t.Node", label="repeated")]],
        ["t.Empty", []],
    ],
})


class Color(enum.IntEnum):
    RED = 0
    GREEN = 1
    BLUE = 2


class Inner(Message):
    __slots__ = ("s", "n")

    def __init__(self, *, s: str = "", n: int = 0) -> None:  # hand-written, like stubgen's
        self.s = s
        self.n = n


class Scalars(Message):
    __slots__ = tuple(SCALARS) + ("color",)


class Composite(Message):
    __slots__ = tuple(f.name for f in SCHEMA.messages["t.Composite"].fields)


class Node(Message):
    __slots__ = ("value", "child", "kids")


class Empty(Message):
    __slots__ = ()


codec.bind(SCHEMA, {"t.Inner": Inner, "t.Scalars": Scalars, "t.Composite": Composite,
                    "t.Node": Node, "t.Empty": Empty}, {"t.Color": Color})

# -- strategies -----------------------------------------------------------------------------


def ints(kind):
    lo, hi = INT_RANGES[kind]
    return st.one_of(st.sampled_from([lo, hi, 0, lo + 1, hi - 1, -1 if lo < 0 else 1]), st.integers(lo, hi))


text = st.one_of(st.text(max_size=20), st.text(st.characters(min_codepoint=0x10000), max_size=5),
                 st.sampled_from(["", "h\u00e9llo", "\U0001F600\U0010FFFF", "\x00"]))
floats = st.floats(allow_nan=False)
colors = st.one_of(st.sampled_from(list(Color)), ints("int32"))
SCALAR_ST = {k: ints(k) for k in INT_KINDS}
SCALAR_ST.update(double=floats, float=floats, bool=st.booleans(), string=text, bytes=st.binary(max_size=40))

inners = st.builds(Inner, s=text, n=ints("int32"))


@st.composite
def scalars(draw):
    return Scalars(**{k: draw(SCALAR_ST[k]) for k in SCALARS}, color=draw(colors))


@st.composite
def composites(draw):
    L = lambda s: st.lists(s, max_size=5)  # noqa: E731
    D = lambda k, v: st.dictionaries(k, v, max_size=5)  # noqa: E731
    c = Composite(
        inner=draw(st.none() | inners),
        r_int32=draw(L(ints("int32"))), r_uint64=draw(L(ints("uint64"))), r_sint64=draw(L(ints("sint64"))),
        r_double=draw(L(floats)), r_bool=draw(L(st.booleans())), r_string=draw(L(text)),
        r_bytes=draw(L(st.binary(max_size=10))), r_color=draw(L(colors)), r_inner=draw(L(inners)),
        m_int_str=draw(D(ints("int32"), text)), m_str_inner=draw(D(text, inners)),
        m_bool_i64=draw(D(st.booleans(), ints("int64"))), m_u64_double=draw(D(ints("uint64"), floats)),
        m_s32_bytes=draw(D(ints("sfixed32"), st.binary(max_size=10))), m_str_color=draw(D(text, colors)),
        o_int32=draw(st.none() | ints("int32")), o_string=draw(st.none() | text),
        o_double=draw(st.none() | floats), o_color=draw(st.none() | colors),
    )
    which = draw(st.sampled_from([None, "c_int", "c_str", "c_inner"]))
    if which:
        setattr(c, which, draw({"c_int": ints("int64"), "c_str": text, "c_inner": inners}[which]))
    return c


nodes = st.recursive(
    st.builds(Node, value=ints("int32")),
    lambda kids: st.builds(Node, value=ints("int32"), child=st.none() | kids, kids=st.lists(kids, max_size=3)),
    max_leaves=20,
)


def check_round_trip(obj):
    cls = type(obj)
    data = obj.SerializeToString()
    assert type(data) is bytes
    back = cls.FromString(data)
    assert type(back) is cls
    assert back == obj
    assert back.SerializeToString() == data  # canonical
    assert obj.ByteSize() == len(data)
    name = cls.__mrpc_message__.full_name
    assert decode_plain(SCHEMA, name, data) == obj.to_dict()
    assert encode_plain(SCHEMA, name, obj.to_dict()) == data
    assert msgpack.unpackb(data, raw=False, strict_map_key=False).__class__ is list
    return data


# -- round trips ----------------------------------------------------------------------------

@settings(max_examples=300)
@given(scalars())
def test_round_trip_scalars(obj):
    data = check_round_trip(obj)
    raw = msgpack.unpackb(data, raw=False)
    assert len(raw) == len(SCALARS) + 1
    assert type(raw[SCALARS.index("float")]) is float
    assert type(raw[SCALARS.index("bytes")]) is bytes


@settings(max_examples=300)
@given(composites())
def test_round_trip_composite(obj):
    check_round_trip(obj)


@settings(max_examples=100)
@given(nodes)
def test_round_trip_recursive(obj):
    check_round_trip(obj)


def test_defaults_and_empty():
    c = Composite()
    assert c.inner is None and c.r_int32 == [] and c.m_str_inner == {} and c.o_int32 is None
    assert Composite().r_int32 is not c.r_int32  # fresh mutable defaults
    s = Scalars()
    assert s.color is Color.RED and s.string == "" and s.bytes == b"" and s.double == 0.0 and s.bool is False
    check_round_trip(c)
    check_round_trip(s)
    assert Empty().SerializeToString() == b"\x90"
    assert Empty.FromString(b"\x90") == Empty()
    with pytest.raises(TypeError, match="unexpected field"):
        Composite(nope=1)


def test_wire_layout():
    """Fields in declaration order; nested messages as arrays; nil for unset; maps as maps."""
    c = Composite(inner=Inner(s="a", n=1), r_int32=[1, 2], m_str_inner={"k": Inner()}, c_str="x")
    raw = msgpack.unpackb(c.SerializeToString(), raw=False, strict_map_key=False)
    assert raw[0] == ["a", 1]
    assert raw[1] == [1, 2]
    assert raw[11] == {"k": ["", 0]}
    assert raw[16:20] == [None, None, None, None]
    assert raw[20:23] == [None, "x", None]


def test_enum_values_decode_to_members_open_enum_stays_int():
    s = Scalars(color=7)
    back = Scalars.FromString(s.SerializeToString())
    assert back.color == 7 and type(back.color) is int
    s.color = Color.BLUE
    assert Scalars.FromString(s.SerializeToString()).color is Color.BLUE
    assert decode_plain(SCHEMA, "t.Scalars", s.SerializeToString())["color"] == 2


def test_float_conversions():
    s = Scalars(double=3, float=2**70)  # ints are accepted and packed as float64
    back = Scalars.FromString(s.SerializeToString())
    assert type(back.double) is float and back.double == 3.0 and back.float == float(2**70)
    raw = msgpack.unpackb(Scalars().SerializeToString(), raw=False)
    raw[SCALARS.index("double")] = 5  # an int on the wire for a double field is accepted
    assert Scalars.FromString(msgpack.packb(raw)).double == 5.0
    s = Scalars(double=math.nan, float=math.inf)
    back = Scalars.FromString(s.SerializeToString())
    assert math.isnan(back.double) and back.float == math.inf


def test_lenient_python_inputs_are_normalised():
    class MyStr(str):
        pass

    c = Composite(r_int32=(1, 2), r_bytes=[bytearray(b"x"), memoryview(b"y")], o_string=MyStr("s"),
                  m_int_str={Color.GREEN: "g"}, r_color=[Color.RED, 2])
    back = Composite.FromString(c.SerializeToString())
    assert back.r_int32 == [1, 2] and back.r_bytes == [b"x", b"y"] and back.o_string == "s"
    assert back.m_int_str == {1: "g"} and back.r_color == [Color.RED, Color.BLUE]


def test_numpy_style_numbers_are_accepted_as_protobuf_does():
    # protobuf takes any integer with __index__ (numpy.int32, ...) for an integer field and any
    # real number (numpy.float32, Fraction) for a float field; bool stays refused for integers
    class Index:  # how numpy's integer scalars look to Python: not int subclasses
        def __init__(self, v):
            self.v = v

        def __index__(self):
            return self.v

    s = Scalars(int32=Index(-3), uint64=Index(2**64 - 1), double=fractions.Fraction(1, 2), float=Index(2),
                color=Index(2))
    back = Scalars.FromString(s.SerializeToString())
    assert (back.int32, back.uint64, back.double, back.float, back.color) == (-3, 2**64 - 1, 0.5, 2.0, Color.BLUE)
    c = Composite(r_int32=[Index(1)], m_int_str={Index(7): "x"}, o_double=fractions.Fraction(3, 4))
    back = Composite.FromString(c.SerializeToString())
    assert (back.r_int32, back.m_int_str, back.o_double) == ([1], {7: "x"}, 0.75)
    assert decode_plain(SCHEMA, "t.Scalars", encode_plain(SCHEMA, "t.Scalars", {"int64": Index(5)}))["int64"] == 5
    with pytest.raises(EncodeError, match="out of range for int32"):
        Scalars(int32=Index(2**31)).SerializeToString()
    with pytest.raises(EncodeError, match="expected int32, got bool"):
        Scalars(int32=True).SerializeToString()
    np = pytest.importorskip("numpy")
    s = Scalars(int64=np.int64(9), uint32=np.uint8(3), float=np.float32(1.5), double=np.int32(2))
    back = Scalars.FromString(s.SerializeToString())
    assert (back.int64, back.uint32, back.float, back.double) == (9, 3, 1.5, 2.0)
    assert type(back.int64) is int and type(back.float) is float
    with pytest.raises(EncodeError, match="expected int32, got numpy.float64"):
        Scalars(int32=np.float64(1.0)).SerializeToString()
    # numpy's bool (what a comparison of arrays gives, e.g. TGI's Tokens.is_special from a mask)
    c = Composite(r_bool=[np.True_, np.bool_(False)])
    back = Composite.FromString(c.SerializeToString())
    assert back.r_bool == [True, False] and type(back.r_bool[0]) is bool
    assert Scalars.FromString(Scalars(bool=np.True_).SerializeToString()).bool is True
    with pytest.raises(EncodeError, match=r"t\.Scalars\.int32: expected int32, got numpy\.bool"):
        Scalars(int32=np.True_).SerializeToString()  # still no bool for an integer


# -- strict decoding ----------------------------------------------------------------------

def scalars_raw(**over):
    raw = msgpack.unpackb(Scalars().SerializeToString(), raw=False)
    for k, v in over.items():
        raw[(SCALARS + ["color"]).index(k)] = v
    return msgpack.packb(raw, use_bin_type=True)


def comp_raw(**over):
    names = list(Composite.__mrpc_fields__)
    raw = msgpack.unpackb(Composite().SerializeToString(), raw=False)
    for k, v in over.items():
        raw[names.index(k)] = v
    return msgpack.packb(raw, use_bin_type=True)


def reject(cls, data, message):
    with pytest.raises(DecodeError) as info:
        cls.FromString(data)
    assert message in str(info.value)
    with pytest.raises(DecodeError) as info:
        decode_plain(SCHEMA, cls.__mrpc_message__.full_name, data)
    assert message in str(info.value)


@pytest.mark.parametrize("kind", INT_KINDS)
def test_decode_int_range_edges(kind):
    lo, hi = INT_RANGES[kind]
    assert getattr(Scalars.FromString(scalars_raw(**{kind: lo})), kind) == lo
    assert getattr(Scalars.FromString(scalars_raw(**{kind: hi})), kind) == hi
    if lo - 1 >= -(2**63):
        reject(Scalars, scalars_raw(**{kind: lo - 1}), f"t.Scalars.{kind}: value {lo - 1} out of range for {kind}")
    if hi + 1 < 2**64:
        reject(Scalars, scalars_raw(**{kind: hi + 1}), f"t.Scalars.{kind}: value {hi + 1} out of range for {kind}")
    reject(Scalars, scalars_raw(**{kind: True}), f"t.Scalars.{kind}: expected {kind}, got bool")
    reject(Scalars, scalars_raw(**{kind: 1.0}), f"t.Scalars.{kind}: expected {kind}, got float")


@pytest.mark.parametrize("field, value, message", [
    ("string", 5, "t.Scalars.string: expected string, got int"),
    ("string", b"x", "t.Scalars.string: expected string, got bytes"),
    ("bytes", "x", "t.Scalars.bytes: expected bytes, got string"),
    ("bool", 1, "t.Scalars.bool: expected bool, got int"),
    ("bool", None, "t.Scalars.bool: expected bool, got nil"),
    ("double", "1.0", "t.Scalars.double: expected double, got string"),
    ("double", True, "t.Scalars.double: expected double, got bool"),
    ("float", [], "t.Scalars.float: expected float, got array"),
    ("color", "RED", "t.Scalars.color: expected enum t.Color, got string"),
    ("color", 2**31, "t.Scalars.color: value 2147483648 out of range for enum t.Color"),
    ("int32", None, "t.Scalars.int32: expected int32, got nil"),
    ("string", msgpack.ExtType(5, b"x"), "t.Scalars.string: expected string, got ext"),
])
def test_decode_wrong_scalar_types(field, value, message):
    reject(Scalars, scalars_raw(**{field: value}), message)


@pytest.mark.parametrize("field, value, message", [
    ("inner", 5, "t.Composite.inner: expected message t.Inner, got int"),
    ("inner", [1, 2], "t.Inner.s: expected string, got int"),
    ("inner", ["a"], "t.Inner: expected 2 fields, got 1"),
    ("r_int32", {}, "t.Composite.r_int32: expected array, got map"),
    ("r_int32", None, "t.Composite.r_int32: expected array, got nil"),
    ("r_int32", [1, 2, "3"], "t.Composite.r_int32[2]: expected int32, got string"),
    ("r_uint64", [-1], "t.Composite.r_uint64[0]: value -1 out of range for uint64"),
    ("r_bool", [True, 0], "t.Composite.r_bool[1]: expected bool, got int"),
    ("r_inner", [["a", 1], None], "t.Composite.r_inner[1]: expected message t.Inner, got nil"),
    ("r_color", [1, 2**40], "t.Composite.r_color[1]: value 1099511627776 out of range for enum t.Color"),
    ("m_int_str", [], "t.Composite.m_int_str: expected map, got array"),
    ("m_int_str", {"1": "a"}, "t.Composite.m_int_str (map key): expected int32, got string"),
    ("m_int_str", {1: 2}, "t.Composite.m_int_str[1]: expected string, got int"),
    ("m_str_inner", {1: ["", 0]}, "t.Composite.m_str_inner (map key): expected string, got int"),
    ("m_str_inner", {"k": 3}, "t.Composite.m_str_inner['k']: expected message t.Inner, got int"),
    ("m_bool_i64", {1: 1}, "t.Composite.m_bool_i64 (map key): expected bool, got int"),
    ("m_u64_double", {-5: 1.0}, "t.Composite.m_u64_double (map key): value -5 out of range for uint64"),
    ("o_int32", "x", "t.Composite.o_int32: expected int32, got string"),
    ("c_inner", 7, "t.Composite.c_inner: expected message t.Inner, got int"),
])
def test_decode_wrong_composite_types(field, value, message):
    reject(Composite, comp_raw(**{field: value}), message)


def test_hand_written_classes_clear_oneof_members_too():
    # Message.__init__ (classes bound with codec.bind without a generated __init__) refuses two
    # members as generated constructors do; assigning one clears the others
    with pytest.raises(TypeError, match=r"^Composite\(\) got more than one member of oneof choice \(c_int, c_str\)"):
        Composite(c_int=1, c_str="x")
    c = Composite(c_int=1, c_str=None)
    c.c_inner = Inner(s="a")
    assert c.c_int is None and c.WhichOneof("choice") == "c_inner"
    assert Composite.FromString(c.SerializeToString()) == c


def test_decode_oneof_two_members_set():
    reject(Composite, comp_raw(c_int=1, c_str="x"), "t.Composite: more than one member of oneof choice is set")


def test_decode_array_shape():
    reject(Inner, msgpack.packb(["a", 1, 2]), "t.Inner: expected 2 fields, got 3")
    reject(Inner, msgpack.packb([]), "t.Inner: expected 2 fields, got 0")
    reject(Inner, msgpack.packb({"s": "a"}), "t.Inner: expected array (message), got map")
    reject(Inner, msgpack.packb(None), "t.Inner: expected array (message), got nil")


def test_decode_malformed_bytes():
    good = Inner(s="hi", n=3).SerializeToString()
    reject(Inner, good + b"\x00", "t.Inner: 1 trailing bytes after the message")
    reject(Inner, good[:-1], "t.Inner: malformed msgpack")
    reject(Inner, b"", "t.Inner: malformed msgpack")
    reject(Inner, b"\xc1", "t.Inner: malformed msgpack")
    bad_utf8 = b"\x92\xa2\xff\xfe\x01"
    reject(Inner, bad_utf8, "t.Inner.s: invalid UTF-8 in string")
    deep_utf8 = comp_raw(m_str_inner={"k": ["ok", 1]}).replace(b"\xa2ok", b"\xa2\xc3\x28")
    reject(Composite, deep_utf8, "t.Inner.s: invalid UTF-8 in string")
    key_utf8 = comp_raw(m_str_inner={"kk": ["", 1]}).replace(b"\xa2kk", b"\xa2\xed\xa0")
    reject(Composite, key_utf8, "t.Composite.m_str_inner (map key): invalid UTF-8")
    with pytest.raises(DecodeError):
        Inner.FromString("not bytes")


@pytest.mark.parametrize("prefix", [
    b"\x92\xdb\xff\xff\xff\xff",   # str32 of 4 GiB
    b"\x92\xc6\xff\xff\xff\xff",   # bin32
    b"\x92\xdd\xff\xff\xff\xff",   # array32
    b"\x92\xdf\xff\xff\xff\xff",   # map32
    b"\xdd\xff\xff\xff\xff",       # the message array itself
])
def test_decode_huge_declared_lengths(prefix):
    with pytest.raises(DecodeError, match="t.Inner: malformed msgpack: .*(exceeds max|incomplete input)"):
        Inner.FromString(prefix + b"\x00" * 8)


def test_decode_nesting_limit():
    def nested(depth):
        raw = [0, None, []]
        for _ in range(depth - 1):
            raw = [0, raw, []]
        return msgpack.packb(raw)

    n = Node.FromString(nested(64))
    assert n.child is not None
    reject(Node, nested(65), "t.Node: messages nested deeper than 64")
    # through repeated fields too
    raw = [0, None, []]
    for _ in range(70):
        raw = [0, None, [raw]]
    reject(Node, msgpack.packb(raw), "nested deeper than 64")


# -- strict encoding ------------------------------------------------------------------------


def _assigned(obj, **fields):
    """`obj` with attributes assigned after construction (which converts nothing)."""
    for name, value in fields.items():
        setattr(obj, name, value)
    return obj


@pytest.mark.parametrize("obj, message", [
    (Inner(s=5), "t.Inner.s: expected string, got int"),
    (Inner(s=b"x"), "t.Inner.s: expected string, got bytes"),
    (Inner(n="1"), "t.Inner.n: expected int32, got str"),
    (Inner(n=True), "t.Inner.n: expected int32, got bool"),
    (Inner(n=1.0), "t.Inner.n: expected int32, got float"),
    (Inner(n=2**31), "t.Inner.n: value 2147483648 out of range for int32"),
    (Inner(s=None), "t.Inner.s: expected string, got NoneType"),
    (Inner(s="\ud800"), "t.Inner.s: string is not encodable as UTF-8"),
    (Scalars(uint32=-1), "t.Scalars.uint32: value -1 out of range for uint32"),
    (Scalars(uint64=2**64), "t.Scalars.uint64: value 18446744073709551616 out of range for uint64"),
    (Scalars(int64=-(2**63) - 1), "out of range for int64"),
    (Scalars(bytes="x"), "t.Scalars.bytes: expected bytes, got str"),
    (Scalars(bool=1), "t.Scalars.bool: expected bool, got int"),
    (Scalars(double="1"), "t.Scalars.double: expected double, got str"),
    (Scalars(color="RED"), "t.Scalars.color: expected enum t.Color, got str"),
    (Scalars(color=2**31), "t.Scalars.color: value 2147483648 out of range for enum t.Color"),
    (Composite(inner=Scalars()), "t.Composite.inner: expected Inner, got Scalars"),
    # (the constructor makes a dict into the message, as protobuf's; assigned, it is refused)
    (_assigned(Composite(), inner={"s": "x"}), "t.Composite.inner: expected Inner, got dict"),
    (Composite(r_int32="123"), "t.Composite.r_int32: expected a list (repeated field), got str"),
    (Composite(r_int32=[1, None]), "t.Composite.r_int32[1]: expected int32, got NoneType"),
    (Composite(r_inner=[Inner(), None]), "t.Composite.r_inner: expected Inner, got NoneType"),
    (Composite(r_string=["a", "\udfff"]), "t.Composite.r_string: string is not encodable"),
    (Composite(m_int_str=[1]), "t.Composite.m_int_str: expected a dict (map field), got list"),
    (Composite(m_int_str={"1": "a"}), "t.Composite.m_int_str: map key '1' is not a valid int32"),
    (Composite(m_int_str={1: 1}), "t.Composite.m_int_str[1]: expected string, got int"),
    (Composite(m_str_inner={1: Inner()}), "t.Composite.m_str_inner (map key): expected string, got int"),
    (Composite(m_str_inner={"a": 1}), "t.Composite.m_str_inner: expected Inner, got int"),
    (Composite(m_str_inner={"a": Inner(s="\ud800")}), "t.Inner.s: string is not encodable"),
    (Composite(o_int32="x"), "t.Composite.o_int32: expected int32, got str"),
    # (assigning a member clears the others, constructors refuse two: only the raw slots get here)
    (_assigned(Composite(c_int=1), _mrpc_raw_c_inner=Inner()),
     "t.Composite: more than one member of oneof choice is set (c_int, c_inner): its members' raw slots "
     "were written directly, ClearField('choice') first"),
])
def test_encode_rejects(obj, message):
    with pytest.raises((EncodeError, TypeError)) as info:
        obj.SerializeToString()
    assert message in str(info.value)


def test_same_proto_type_from_another_generated_module_is_accepted():
    # every generated module carries its own classes for the types it imports: a Money from
    # orders_mrpc is taken where billing_mrpc wants a Money, as the one protobuf class would be
    other = Schema.from_dict(SCHEMA.to_dict())  # another module's copy of the same definitions
    Inner2 = type("Inner", (Message,), {"__slots__": ("s", "n")})
    codec.bind(other, {"t.Inner": Inner2})
    c = Composite(inner=Inner2(s="a", n=1), r_inner=[Inner2(s="b")], m_str_inner={"k": Inner2(n=2)}, c_inner=Inner2())
    back = Composite.FromString(c.SerializeToString())
    assert type(back.inner) is Inner and back.inner == Inner(s="a", n=1)
    assert back.r_inner == [Inner(s="b")] and back.m_str_inner == {"k": Inner(n=2)} and back.c_inner == Inner()
    # a class of the same name bound to a different definition is still refused
    changed = Schema.from_dict({"messages": [["t.Inner", [F("s", 1, "string")]]]})
    Inner3 = type("Inner", (Message,), {"__slots__": ("s",)})
    codec.bind(changed, {"t.Inner": Inner3})
    with pytest.raises(EncodeError, match="t.Composite.inner: expected Inner, got Inner from .*, another definition of t.Inner"):
        Composite(inner=Inner3(s="x")).SerializeToString()


def test_serializer_refuses_another_message_type():
    # a stub encodes with request_type.SerializeToString(request): a request of the wrong type
    # must not be packed field by field as if it were the right one
    for ser in (Inner.SerializeToString, Inner.SerializeToString.__mrpc_parts__):
        with pytest.raises(EncodeError, match="t.Inner: expected Inner, got Scalars"):
            ser(Scalars(string="x"))
        with pytest.raises(EncodeError, match="t.Inner: expected Inner, got dict"):
            ser({"s": "x", "n": 1})
    lookalike = object.__new__(type("Lookalike", (Message,), {"__slots__": ("s", "n")}))
    lookalike.s, lookalike.n = "x", 1
    with pytest.raises(EncodeError, match="t.Inner: expected Inner, got Lookalike"):
        Inner.SerializeToString(lookalike)
    Sub = type("Sub", (Inner,), {"__slots__": ()})
    assert Inner.SerializeToString(Sub(s="x")) == Inner(s="x").SerializeToString()
    other = Schema.from_dict(SCHEMA.to_dict())  # the same type generated into another module
    Inner2 = type("Inner", (Message,), {"__slots__": ("s", "n")})
    codec.bind(other, {"t.Inner": Inner2})
    assert Inner.SerializeToString(Inner2(s="y")) == Inner(s="y").SerializeToString()


def test_encode_cycle_and_missing_field():
    n = Node(value=1)
    n.child = n
    with pytest.raises(EncodeError, match="t.Node: messages nested deeper than 64"):
        n.SerializeToString()
    bare = object.__new__(Inner)
    bare.s = "x"
    with pytest.raises(EncodeError, match="t.Inner: a field is not set"):
        bare.SerializeToString()


def test_bind_errors():
    with pytest.raises(SchemaError, match="no class given for message t.Inner"):
        codec.bind(SCHEMA, {"t.Composite": type("C", (Message,), {"__slots__": Composite.__slots__})})
    with pytest.raises(SchemaError, match="no attribute slot for field 'n'"):
        codec.bind(SCHEMA, {"t.Inner": type("I", (Message,), {"__slots__": ("s",)})})
    with pytest.raises(SchemaError, match="not a message"):
        codec.bind(SCHEMA, {"t.Nope": Inner})


def test_message_base_api():
    i = Inner(s="x", n=2)
    assert repr(i) == "Inner(s='x', n=2)"
    assert i.to_dict() == {"s": "x", "n": 2}
    assert i == Inner(s="x", n=2) and i != Inner(s="x", n=3) and i != Scalars()
    assert Inner.__mrpc_schema__ is SCHEMA and Inner.__mrpc_message__ is SCHEMA.messages["t.Inner"]
    with pytest.raises(TypeError):
        hash(i)
    c = Composite(inner=i, r_inner=[i], m_str_inner={"a": i})
    assert c.to_dict()["inner"] == {"s": "x", "n": 2}
    assert c.to_dict()["r_inner"] == [{"s": "x", "n": 2}]
    assert c.to_dict()["m_str_inner"] == {"a": {"s": "x", "n": 2}}
    assert c.ByteSize() == len(c.SerializeToString())


def test_untrusted_names_cannot_inject_code():
    """Schemas built directly (bypassing from_dict validation) still only become literals."""
    evil = "x'); raise SystemExit('pwned'); ('"
    s = Schema(messages={
        "e.M": MessageDef("e.M", (Field(evil, 1, TypeRef("string")), Field("class", 2, TypeRef("int32")))),
        evil: MessageDef(evil, (Field("a", 1, TypeRef("int32")),)),
    })
    data = msgpack.packb(["v", 1])
    assert decode_plain(s, "e.M", data) == {evil: "v", "class": 1}
    with pytest.raises(DecodeError, match="expected int32"):
        decode_plain(s, evil, msgpack.packb(["no"]))

    class M(Message):
        __slots__ = ("__dict__",)

    codec.bind(Schema(messages={"e.M": MessageDef("e.M", (Field("class", 1, TypeRef("int32")),))}), {"e.M": M})
    m = M(**{"class": 4})
    assert M.FromString(m.SerializeToString()) == m and getattr(M.FromString(b"\x91\x05"), "class") == 5


def test_plain_codecs_are_freed_with_their_schema():
    import gc
    import weakref

    s = Schema.from_dict(SCHEMA.to_dict())
    decode_plain(s, "t.Inner", b"\x92\xa1a\x01")
    assert read_field(s, "t.Inner", b"\x92\xa1a\x01", "n") == 1
    ref = weakref.ref(s)
    before = len(codec._plain_cache)
    del s
    gc.collect()
    assert ref() is None and len(codec._plain_cache) == before - 1


@pytest.mark.parametrize("schema, message", [
    ({"messages": [["e.M", [["a", 1, ["int32", None], "repeated", None, "g"]]]]},
     "e.M.a: a oneof member cannot be repeated"),
    ({"enums": [["e.E", [["A", "1"]]]]}, "e.E: enum value number must be an int32, got '1'"),
    ({"enums": [["e.E", [["A", 2**31]]]]}, "enum value number must be an int32"),
])
def test_schema_validation_fixes(schema, message):
    with pytest.raises(SchemaError, match=message):
        Schema.from_dict(schema)


def test_schema_from_dict_round_trip():
    s2 = Schema.from_dict(SCHEMA.to_dict())
    data = Composite(inner=Inner(s="x")).SerializeToString()
    assert decode_plain(s2, "t.Composite", data) == decode_plain(SCHEMA, "t.Composite", data)


# -- read_field ----------------------------------------------------------------------------

COMPOSITE_PATHS = [f.name for f in SCHEMA.messages["t.Composite"].fields] + [
    "inner.s", "inner.n", "c_inner.s", "c_inner.n"]


def dig(plain, path):
    for part in path.split("."):
        if plain is None:
            return None
        plain = plain[part]
    return plain


@settings(max_examples=200)
@given(composites())
def test_read_field_agrees_with_full_decode(obj):
    data = obj.SerializeToString()
    full = decode_plain(SCHEMA, "t.Composite", data)
    for path in COMPOSITE_PATHS:
        assert read_field(SCHEMA, "t.Composite", data, path) == dig(full, path), path


@settings(max_examples=100)
@given(scalars())
def test_read_field_scalars(obj):
    data = obj.SerializeToString()
    full = decode_plain(SCHEMA, "t.Scalars", data)
    for name in SCALARS + ["color"]:
        assert read_field(SCHEMA, "t.Scalars", data, name) == full[name]


@settings(max_examples=100)
@given(nodes)
def test_read_field_recursive(obj):
    data = obj.SerializeToString()
    full = decode_plain(SCHEMA, "t.Node", data)
    for path in ["value", "child", "kids", "child.value", "child.child.value", "child.child.kids"]:
        assert read_field(SCHEMA, "t.Node", data, path) == dig(full, path)


def test_read_field_skips_without_validating_others_but_checks_its_own():
    names = list(Composite.__mrpc_fields__)
    raw = msgpack.unpackb(Composite(inner=Inner(s="ok", n=1)).SerializeToString(), raw=False)
    raw[names.index("r_int32")] = ["not", "ints"]  # invalid, but skipped
    data = msgpack.packb(raw)
    assert read_field(SCHEMA, "t.Composite", data, "inner.s") == "ok"
    with pytest.raises(DecodeError, match=r"t.Composite.r_int32\[0\]: expected int32, got string"):
        read_field(SCHEMA, "t.Composite", data, "r_int32")
    raw[0] = ["ok", "bad"]
    with pytest.raises(DecodeError, match="t.Inner.n: expected int32, got string"):
        read_field(SCHEMA, "t.Composite", msgpack.packb(raw), "inner.n")


def test_read_field_errors():
    data = Composite(inner=Inner(s="x")).SerializeToString()
    with pytest.raises(SchemaError, match="no field 'nope'"):
        read_field(SCHEMA, "t.Composite", data, "nope")
    with pytest.raises(SchemaError, match="not a single message field"):
        read_field(SCHEMA, "t.Composite", data, "r_inner.s")
    with pytest.raises(SchemaError, match="unknown message"):
        read_field(SCHEMA, "t.Nope", data, "x")
    for cut in range(len(data)):
        try:
            read_field(SCHEMA, "t.Composite", data[:cut], "c_inner")  # the last field
        except DecodeError:
            pass
        else:
            raise AssertionError(f"truncated at {cut} not detected")
    with pytest.raises(DecodeError, match="t.Composite: expected 23 fields, got 2"):
        read_field(SCHEMA, "t.Composite", msgpack.packb([1, 2]), "inner")
    with pytest.raises(DecodeError, match="t.Inner: expected 2 fields, got 1"):
        read_field(SCHEMA, "t.Composite", comp_raw(inner=["a"]), "inner.s")
    with pytest.raises(DecodeError, match="t.Inner: expected array"):
        read_field(SCHEMA, "t.Composite", comp_raw(inner=5), "inner.s")
    with pytest.raises(DecodeError, match="malformed msgpack"):
        read_field(SCHEMA, "t.Composite", b"\xdc\x00\x17\xc1" + b"\x00" * 30, "o_color")
    with pytest.raises(DecodeError, match="exceeds buffer"):
        read_field(SCHEMA, "t.Composite", b"\xdc\x00\x17\xdd\xff\xff\xff\xff", "o_color")


@settings(max_examples=200)
@given(st.binary(max_size=60))
def test_fuzz_never_crashes(data):
    for fn in (lambda: Composite.FromString(data), lambda: decode_plain(SCHEMA, "t.Node", data),
               lambda: read_field(SCHEMA, "t.Composite", data, "inner.s"),
               lambda: read_field(SCHEMA, "t.Node", data, "child.child.value")):
        try:
            fn()
        except DecodeError:
            pass
