"""Base class of generated message classes.

Generated classes (mrpcd-stubgen) declare `__slots__` with their field names and an
`__init__`; `mrpcd.marshal.codec.bind` attaches `SerializeToString`, `FromString`,
`__mrpc_schema__`, `__mrpc_message__` (the schema's Message), `__mrpc_fields__` (field
names in wire order) and `__mrpc_defaults__`.

The protobuf message methods code written for grpcio reaches for (`HasField`, `WhichOneof`,
`ClearField`, `Clear`, `CopyFrom`, `MergeFrom`, `ParseFromString`, `MergeFromString`,
`ListFields`, `IsInitialized`) work on the same model: a field with presence (a message,
proto3 `optional`, proto2 `optional`, a oneof member) is set when it is not None; other
fields always have a value. As with
protobuf, a name that is not a field (or a field without presence, for `HasField`) raises
ValueError naming it.

Also as protobuf's: constructors take a dict for a message field (and inside repeated fields
and map values of messages), made into the message (`__mrpc_msg__`, containers.from_dict);
repeated / map fields of messages are containers with `add()` / `get_or_create()`
(containers.py).

Unlike protobuf, reading an unset message field gives None, not a default instance, and
writing into it (`msg.sub.x = 1`) does not set it (AttributeError on None): presence *is*
"not None" here (HasField, the encoder's nil, callers' `is None` checks), and a default
instance on read would need a property in front of every message field's slot, on the
construction, decoding and attribute-read paths. So there is no `SetInParent()` either;
docs/PORTING.md gives the replacements.

A proto2 field with a declared `[default = X]` (and presence) is the one exception to "unset
reads None": reading it unset gives X, as protobuf does, which is the point of declaring it.
Its slot still holds None while it is unset (what the encoder sends as nil and HasField
answers from); `codec.bind` puts a `DefaultedField` in front of the slot that turns that None
into X on read, and keeps the slot itself under `raw_name(field)` for the codec and the
methods here, which read presence. Only such fields pay for the descriptor.

A member of a oneof with other members gets the same arrangement (`OneofField`): assigning it
a value sets its slot and sets the other members' slots to None, as protobuf's "last
assignment wins"; reads give the slot's value. The codec reads and writes the raw slots, so
encoding and decoding cost what plain slots do; only the user's reads and writes of oneof
members go through the property. Constructors refuse two members of one oneof (TypeError):
protobuf keeps the last keyword given, but a generated `__init__` cannot tell the order of
its keyword arguments.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, TypeVar

from .containers import field_path, from_dict

_M = TypeVar("_M", bound="Message")


def raw_name(field_name: str) -> str:
    """The class attribute under which `codec.bind` keeps the slot of a field it puts a
    property in front of (a declared default, a oneof member): its value as stored, None
    when unset, which the codec and presence read."""
    return f"_mrpc_raw_{field_name}"


def clearing_oneofs(fields: Any) -> dict[str, tuple[str, ...]]:
    """The oneof groups of a message's fields (the schema's Fields) that have two or more
    members, each with its members' names in declaration order: the groups whose members
    clear each other. (A one-member oneof has nothing to clear, and proto3 `optional`'s
    synthetic oneofs are not in the schema: those fields stay plain slots.)"""
    groups: dict[str, list[str]] = {}
    for f in fields:
        if f.oneof is not None:
            groups.setdefault(f.oneof, []).append(f.name)
    return {g: tuple(names) for g, names in groups.items() if len(names) > 1}


def has_raw_slot(f: Any, oneofs: dict[str, tuple[str, ...]]) -> bool:
    """Does `codec.bind` put a property in front of field `f`'s slot (and the slot under
    raw_name)? A field with presence and a declared default, or a member of one of
    `oneofs` (clearing_oneofs). The codec and stubgen's constructors then use the slot."""
    return (f.default is not None and f.nullable) or f.oneof in oneofs


class RawField(property):
    """A property `codec.bind` puts in a class in place of a field's slot descriptor (kept in
    `slot`, and in the class under raw_name(field)), so the read of every other field stays
    a plain slot read. A property because CPython calls a property's getter and setter
    directly: half the cost of a descriptor class with a Python __get__ (about 95 against
    205 ns a read, measured)."""

    slot: Any


class DefaultedField(RawField):
    """A field with a declared proto2 default: reads its slot, or the default where the slot
    holds None (unset); writes go to the slot, so assigning None unsets it (as ClearField)."""

    def __init__(self, slot: Any, default: Any) -> None:
        super().__init__(_default_getter(slot, default), slot.__set__, slot.__delete__,
                         "A field with a declared default.")
        self.slot = slot
        self.default = default


class OneofField(RawField):
    """A member of a oneof with other members: assigning a value (not None) sets its slot
    and sets the other members' slots to None, so the last assignment wins, as in protobuf;
    assigning None unsets only it (as ClearField). Reads give the slot's value (or, for a
    member with a declared proto2 `default`, that default while it is unset).

    `name` and `others` are field names: the setter is compiled for them (as the codec's
    functions are) and stores to the slots under their raw_name, which CPython specialises
    as plain slot stores: a member of a oneof of five costs about 65 ns a write where a
    closure calling each slot's __set__ took 310 (a plain slot: 10; measured). The getter is
    an operator.attrgetter of the raw slot, which runs no Python frame: about 34 ns a read,
    where a compiled function took 43 and the slot's own __get__ 45 (a plain slot: 11)."""

    def __init__(self, slot: Any, name: str, others: tuple[str, ...], default: Any = None) -> None:
        me = raw_name(name)
        if not all(x.isidentifier() for x in (me, *map(raw_name, others))):
            raise ValueError(f"not field names: {name!r}, {others!r}")
        clears = "".join(f"        obj.{raw_name(o)} = None\n" for o in others)
        src = f"def fset(obj, value):\n    obj.{me} = value\n    if value is not None:\n{clears}"
        ns: dict[str, Any] = {}
        exec(compile(src, f"<mrpcd oneof member {name}>", "exec"), ns)
        fget = operator.attrgetter(me) if default is None else _default_getter(slot, default)
        super().__init__(fget, ns["fset"], slot.__delete__,
                         "A oneof member: assigning it clears the other members.")
        self.slot = slot
        self.others = others
        self.default = default


def _default_getter(slot: Any, default: Any) -> Any:
    get = slot.__get__

    def fget(obj: Any) -> Any:
        value = get(obj)
        return default if value is None else value
    return fget


def raw_state(self: Any) -> tuple[None, dict[str, Any]]:
    """pickle's state of a message class with RawFields (codec.bind makes it the class's
    __getstate__): the stored values, None for an unset one, where the default state would
    read each slot through its attribute (a declared default: that default, unpickled as
    set). Unpickling assigns them through the attributes: one member of a oneof is set, so
    the others' None clears nothing."""
    get = _getter(type(self))
    state = {}
    for name in type(self).__mrpc_fields__:
        try:
            state[name] = get(self, name)
        except AttributeError:  # (a slot never assigned)
            pass
    return None, state


def _getter(cls: type) -> Any:
    """getattr, or for a class with RawFields (declared defaults, oneof members) one that
    reads their slots (None when unset) instead of the defaults: what presence is judged by."""
    raw = getattr(cls, "__mrpc_raw__", None)
    if not raw:
        return getattr

    def get(obj: Any, name: str, *default: Any) -> Any:
        return getattr(obj, raw.get(name, name), *default)
    return get


class Message:
    __slots__ = ()

    __mrpc_schema__: Any = None
    __mrpc_message__: Any = None
    __mrpc_fields__: tuple[str, ...] = ()
    # (name, value, is_factory): factories (list, dict) give each instance its own object
    __mrpc_defaults__: tuple[tuple[str, Any, bool], ...] = ()
    # the class of each message field, None for other fields (codec.bind)
    __mrpc_types__: tuple[Any, ...] = ()
    # what generated __init__s compare an argument's class with (a parameter may be named `dict`)
    __mrpc_dict__ = dict
    # field name -> raw_name(field) for the fields with a RawField (codec.bind)
    __mrpc_raw__: dict[str, str] = {}
    # (group, member names) for each oneof whose members clear each other (codec.bind)
    __mrpc_oneofs__: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __init__(self, /, **kwargs: Any) -> None:
        """Every field set to its default, then to the keyword arguments given (a repeated
        field's or map's a list / dict copy of it, as protobuf's; a dict for a message made
        into one). Two members of one oneof given (not None) is a TypeError, as in generated
        constructors (which cannot tell which was given last, what protobuf keeps)."""
        for group, names in type(self).__mrpc_oneofs__:
            given = [n for n in names if kwargs.get(n) is not None]
            if len(given) > 1:
                raise _two_members(self, group, given)
        types = type(self).__mrpc_types__
        for i, (name, value, factory) in enumerate(type(self).__mrpc_defaults__):
            if name in kwargs:
                given = kwargs.pop(name)
                if value is list:
                    given = self.__mrpc_list__(given)
                elif value is dict:
                    given = self.__mrpc_map__(given)
                elif factory:
                    given = value._mrpc_of(given, self, i)
                elif given.__class__ is dict and types and types[i] is not None:
                    given = self.__mrpc_msg__(i, given)
                setattr(self, name, given)
            else:
                setattr(self, name, value() if factory else value)
        if kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected field(s) {', '.join(sorted(kwargs))}")

    def __mrpc_oneof_given__(self, group: str) -> None:
        """Raise the TypeError of a constructor given two or more members of oneof `group`
        (generated __init__s call it when they see that; the members' slots are assigned)."""
        names = dict(type(self).__mrpc_oneofs__)[group]
        get = _getter(type(self))
        raise _two_members(self, group, [n for n in names if get(self, n, None) is not None])

    # What a constructor keeps of a repeated field's / map's argument (generated __init__s call
    # these through their receiver): a new list / dict, as protobuf copies (a generator would
    # be consumed by the first SerializeToString, a tuple has no append, the caller's list
    # would be shared); None is empty; what the encoder refuses (a str for a list, a list
    # for a map) is kept as given, for it to name the field.
    @staticmethod
    def __mrpc_list__(x: Any) -> Any:
        if x is None:
            return []
        if isinstance(x, (str, bytes, bytearray, dict)) or not hasattr(x, "__iter__"):
            return x
        return list(x)

    @staticmethod
    def __mrpc_map__(x: Any) -> Any:
        if x is None:
            return {}
        if isinstance(x, dict):
            return dict(x)
        if hasattr(x, "keys") and hasattr(x, "__getitem__"):
            return {k: x[k] for k in x.keys()}
        return x

    # What a constructor keeps of a dict given for a message field (protobuf's constructors
    # take them); generated __init__s call it with the field's index. (For a repeated / map
    # field of messages they call its container's _mrpc_of, marshal/containers.py.)
    def __mrpc_msg__(self, i: int, x: Any) -> Any:
        cls = type(self).__mrpc_types__[i]
        if x.__class__ is dict:
            return from_dict(cls, x, field_path(self, i))
        # Timestamp / Duration fields: a datetime / timedelta (marshal/wkt.py); anything else
        # (another module's class of the message, a wrong type) is kept, for the encoder to judge
        convert = getattr(cls, "_mrpc_from_python", None)
        return x if convert is None else convert(x, field_path(self, i))

    def _fields(self) -> tuple[str, ...]:
        names = type(self).__mrpc_fields__
        if names:
            return names
        # not bound: fall back to the declared slots
        out: list[str] = []
        for klass in reversed(type(self).__mro__):
            for name in getattr(klass, "__slots__", ()):
                if name not in out and not name.startswith("__"):
                    out.append(name)
        return tuple(out)

    def __eq__(self, other: object) -> bool:
        # the same .proto message generated into another module (each module has its own
        # classes for the types it imports; the codec takes either) compares by fields
        if type(other) is not type(self) and not _same_message(type(self), type(other)):
            return NotImplemented
        # (set to the default and unset differ, as protobuf's)
        get, oget = _getter(type(self)), _getter(type(other))
        return all(get(self, n, None) == oget(other, n, None) for n in self._fields())

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        parts = []
        get = _getter(type(self))
        for n in self._fields():
            parts.append(f"{n}={get(self, n, '<unset>')!r}")
        return f"{type(self).__qualname__}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: nested messages become dicts (the shape codec.decode_plain returns; an
        unset field with a declared default is None, so `Msg(**m.to_dict())` keeps it unset)."""
        get = _getter(type(self))
        return {n: _plain(get(self, n, None)) for n in self._fields()}

    def ByteSize(self) -> int:
        """Length of the encoded message."""
        return len(self.SerializeToString())  # type: ignore[attr-defined]

    # -- protobuf's message methods ---------------------------------------------------------
    def HasField(self, field_name: str) -> bool:
        """Is a field with presence (or any member of a oneof group) set?"""
        f = _field(self, field_name)
        if f is None:
            members = _oneof_members(self, field_name)
            if members:
                get = _getter(type(self))
                return any(get(self, m.name) is not None for m in members)
            raise ValueError(f"Protocol message {_full_name(self)} has no field {field_name!r}")
        if not f.nullable or f.label in ("repeated", "map"):
            raise ValueError(f"Field {_full_name(self)}.{field_name} does not have presence "
                             "(only message, optional and oneof fields do)")
        return _getter(type(self))(self, field_name) is not None

    def WhichOneof(self, oneof_group: str) -> str | None:
        """The name of the member of `oneof_group` that is set, or None."""
        members = _oneof_members(self, oneof_group)
        if not members:
            raise ValueError(f"Protocol message {_full_name(self)} has no oneof {oneof_group!r}")
        get = _getter(type(self))
        for m in members:
            if get(self, m.name) is not None:
                return str(m.name)
        return None

    def ClearField(self, field_name: str) -> None:
        """Back to its default (unset); a oneof group's name clears every member."""
        names = [field_name] if _field(self, field_name) is not None else [m.name for m in _oneof_members(self, field_name)]
        if not names:
            raise ValueError(f"Protocol message {_full_name(self)} has no field {field_name!r}")
        defaults = {n: (v, factory) for n, v, factory in type(self).__mrpc_defaults__}
        for n in names:
            value, factory = defaults[n]
            setattr(self, n, value() if factory else value)

    def Clear(self) -> None:
        """Every field back to its default."""
        _schema_fields(self)
        for name, value, factory in type(self).__mrpc_defaults__:
            setattr(self, name, value() if factory else value)

    def CopyFrom(self, other_msg: "Message") -> None:
        """Make this message a deep copy of `other_msg` (same class)."""
        _check_same(self, other_msg, "CopyFrom")
        if other_msg is self:
            return
        get = _getter(type(other_msg))
        for f in _schema_fields(self):
            setattr(self, f.name, copy.deepcopy(get(other_msg, f.name)))

    def MergeFrom(self, msg: "Message") -> None:
        """protobuf's merge: set fields of `msg` overwrite (a set oneof member clears the
        others of its group), set messages merge recursively, repeated fields are appended,
        map entries added or replaced. A field without presence counts as set when it is
        not its default."""
        _check_same(self, msg, "MergeFrom")
        if msg is self:
            msg = copy.deepcopy(msg)
        defaults = {n: v for n, v, factory in type(self).__mrpc_defaults__ if not factory}
        get, mget = _getter(type(self)), _getter(type(msg))
        for f in _schema_fields(self):
            value = mget(msg, f.name)
            if f.label == "repeated":
                getattr(self, f.name).extend(copy.deepcopy(value))
            elif f.label == "map":
                getattr(self, f.name).update(copy.deepcopy(value))
            elif f.nullable:
                if value is None:
                    continue
                mine = get(self, f.name)
                if (isinstance(value, Message) and isinstance(mine, Message)
                        and (type(mine) is type(value) or _same_message(type(mine), type(value)))):
                    mine.MergeFrom(value)
                else:
                    setattr(self, f.name, copy.deepcopy(value))
                if f.oneof is not None:
                    for m in _oneof_members(self, f.oneof):
                        if m.name != f.name:
                            setattr(self, m.name, None)
            elif value != defaults.get(f.name):
                setattr(self, f.name, value)

    def MergeFromString(self, serialized: bytes) -> int:
        """Decode `serialized` and merge it in (MergeFrom); returns its length."""
        self.MergeFrom(type(self).FromString(serialized))
        return len(serialized)

    def ParseFromString(self, serialized: bytes) -> int:
        """Replace this message's contents with the decoded `serialized`; returns its length.
        Nothing changes when it cannot be decoded (DecodeError)."""
        parsed = type(self).FromString(serialized)
        get = _getter(type(parsed))
        for f in _schema_fields(self):
            setattr(self, f.name, get(parsed, f.name))
        return len(serialized)

    def ListFields(self) -> list[tuple[Any, Any]]:
        """(field, value) for every field that is set, by field number, as protobuf's:
        a field with presence when not None, a repeated field or map when not empty, any
        other field when not its default. `field` is the schema's Field (`.name`,
        `.number`, `.label`, `.type`), where protobuf gives a FieldDescriptor."""
        defaults = {n: v for n, v, factory in type(self).__mrpc_defaults__ if not factory}
        get = _getter(type(self))
        out = []
        for f in _schema_fields(self):
            value = get(self, f.name)  # (a field with a declared default: None when unset)
            if f.label in ("repeated", "map"):
                is_set = bool(value)
            elif f.nullable:
                is_set = value is not None
            else:
                is_set = value != defaults.get(f.name)
            if is_set:
                out.append((f, value))
        out.sort(key=lambda item: item[0].number)
        return out

    def IsInitialized(self) -> bool:
        """Are all proto2 `required` fields set, here and in every message below? (The
        encoder refuses the message otherwise.)"""
        for f in _schema_fields(self):
            value = getattr(self, f.name)
            if value is None:
                if f.required:
                    return False
                continue
            if f.type.kind != "message":
                continue
            values = value if f.label == "repeated" else value.values() if f.label == "map" else (value,)
            if not all(v.IsInitialized() for v in values if isinstance(v, Message)):
                return False
        return True

    def __copy__(self: _M) -> _M:
        new = object.__new__(type(self))
        get = _getter(type(self))
        for n in self._fields():
            setattr(new, n, get(self, n, None))
        return new

    def __deepcopy__(self: _M, memo: dict[int, Any]) -> _M:
        new = object.__new__(type(self))
        memo[id(self)] = new
        get = _getter(type(self))
        for n in self._fields():
            setattr(new, n, copy.deepcopy(get(self, n, None), memo))
        return new

    def SerializeToString(self, deterministic: bool = False) -> bytes:  # replaced by codec.bind
        """The encoded message; `deterministic`: map entries in key order (equal messages give
        equal bytes), else in insertion order."""
        raise TypeError(f"{type(self).__qualname__} is not bound to a schema (codec.bind)")

    @classmethod
    def FromString(cls, data: bytes) -> "Message":  # replaced by codec.bind
        raise TypeError(f"{cls.__qualname__} is not bound to a schema (codec.bind)")


def _schema_fields(m: Message) -> tuple[Any, ...]:
    msg = type(m).__mrpc_message__
    if msg is None:
        raise TypeError(f"{type(m).__qualname__} is not bound to a schema (codec.bind)")
    return msg.fields  # type: ignore[no-any-return]


def _field(m: Message, name: str) -> Any:
    for f in _schema_fields(m):
        if f.name == name:
            return f
    return None


def _oneof_members(m: Message, group: str) -> list[Any]:
    fields = _schema_fields(m)
    members = [f for f in fields if f.oneof == group]
    if not members and group.startswith("_"):
        # protobuf's synthetic oneof of an `optional` field `x` is `_x` (the schema keeps no
        # such group): WhichOneof / HasField / ClearField take that name as protobuf does
        members = [f for f in fields if f.label == "optional" and f.oneof is None and f.name == group[1:]]
    return members


def _full_name(m: Message) -> str:
    return str(type(m).__mrpc_message__.full_name)


def _same_message(mine: type, other: type) -> bool:
    """Are these two bound classes of the same .proto message (generated into two modules)?"""
    a = getattr(mine, "__mrpc_message__", None)
    b = getattr(other, "__mrpc_message__", None)
    return a is not None and b is not None and (a is b or a == b)


def _check_same(m: Message, other: Any, what: str) -> None:
    """CopyFrom / MergeFrom take an instance of the class, or of another module's class of the
    same .proto message (each module has its own classes for the types it imports)."""
    if type(other) is not type(m) and not _same_message(type(m), type(other)):
        raise TypeError(f"Parameter to {what}() must be instance of same class: expected "
                        f"{type(m).__qualname__} got {type(other).__qualname__}.")


def _two_members(m: Message, group: str, given: list[str]) -> TypeError:
    return TypeError(f"{type(m).__qualname__}() got more than one member of oneof {group} "
                     f"({', '.join(given)}): give one (protobuf keeps the last keyword given; "
                     "assigning a member after construction clears the others)")


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_dict()
    if isinstance(value, list):  # the containers of message fields too
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
