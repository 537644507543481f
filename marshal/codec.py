"""Schema-driven msgpack codec (docs/INTERNALS.md "Payload encoding", "Codec API").

A message is a msgpack array with one element per field in declaration order. For every
message, `bind` generates Python source for a specialised encoder and decoder (like
collections.namedtuple does) and execs it: the checks of each field are written out inline,
so nothing interprets the schema at run time. The encoder turns a message object into
nested tuples that one msgpack Packer call packs; the decoder unpacks with msgpack and
validates / converts the resulting Python objects field by field.

Decoding is strict (payloads are untrusted): wrong array length, wrong types, ints out of
range for their kind, invalid UTF-8, trailing bytes, nesting deeper than MAX_DEPTH, declared
lengths beyond the data all raise DecodeError naming the field.

Generated source never contains a name from the schema except as a string literal
(repr()), or as an attribute name that is a plain identifier (class mode only), so a schema
received from an app cannot inject code.
"""
from __future__ import annotations

import enum
import functools
import keyword
import numbers
import operator
import threading
import weakref
from typing import TYPE_CHECKING, Any, cast

import msgpack

from . import _framing
from . import _pack as _packmod
from .containers import map_type, repeated_type
from .enums import EnumWrapper
from .message import DefaultedField, OneofField, RawField, clearing_oneofs, has_raw_slot, raw_name, raw_state
from .schema import INT_RANGES, Field, Schema, SchemaError, TypeRef

if TYPE_CHECKING:
    from .message import Message

__all__ = ["DecodeError", "EncodeError", "MAX_DEPTH", "bind", "decode_plain", "encode_plain", "read_field"]

MAX_DEPTH = 64  # levels of nested messages (the top-level message is level 1)


class DecodeError(ValueError):
    """An encoded message does not match its schema (or is not valid msgpack)."""


class EncodeError(ValueError):
    """A message object cannot be encoded: a field holds a value of the wrong type or range."""


# ---------------------------------------------------------------------------------------
# run-time helpers used by generated code (slow paths only: called on conversion or error)

_TYPE_NAMES = {
    list: "array", tuple: "array", dict: "map", str: "string", bytes: "bytes", int: "int",
    float: "float", bool: "bool", type(None): "nil", bytearray: "bytearray",
    msgpack.ExtType: "ext", msgpack.Timestamp: "ext timestamp",
}


def _tn(x: Any) -> str:
    return _TYPE_NAMES.get(type(x)) or type(x).__name__


def _label(kind: str, ref: str | None) -> str:
    return f"{kind} {ref}" if ref else kind


def _bad(where: str, label: str, x: Any) -> str:
    if type(x) is int and label.split(" ")[0] in _RANGES:
        return f"{where}: value {x} out of range for {label}"
    return f"{where}: expected {label}, got {_tn(x)}"


def _fail(exc: Exception) -> Any:
    raise exc


_RANGES = dict(INT_RANGES)
_RANGES["enum"] = INT_RANGES["int32"]


def _dconv(x: Any, where: str, kind: str, ref: str | None) -> Any:
    """Decode-side check/convert of one scalar (slow path). Returns the value or raises."""
    t = type(x)
    if kind in _RANGES:
        lo, hi = _RANGES[kind]
        if t is int and lo <= x <= hi:
            return x
    elif kind == "double" or kind == "float":
        if t is float:
            return x
        if t is int:
            return float(x)
    elif kind == "bool":
        if t is bool:
            return x
    elif kind == "string":
        if t is str:
            return x
    elif kind == "bytes":
        if t is bytes:
            return x
    raise DecodeError(_bad(where, _label(kind, ref), x))


def _dall(seq: list, where: str, kind: str, ref: str | None) -> list:
    return [_dconv(y, f"{where}[{i}]", kind, ref) for i, y in enumerate(seq)]


def _dkey_check(k: Any, where: str, kind: str) -> Any:
    try:
        return _dconv(k, where, kind, None)
    except DecodeError:
        raise DecodeError(_bad(f"{where} (map key)", kind, k)) from None


def _dmap(d: dict, where: str, kkind: str, vkind: str, vref: str | None) -> dict:
    out = {}
    for k, v in d.items():
        k = _dkey_check(k, where, kkind)
        out[k] = _dconv(v, f"{where}[{k!r}]", vkind, vref)
    return out


def _econv(x: Any, where: str, kind: str, ref: str | None) -> Any:
    """Encode-side check/convert of one scalar (slow path). Returns the value or raises."""
    t = type(x)
    if kind in _RANGES:
        # as protobuf: an int, or any integer with __index__ (numpy.int32, ...); never a bool
        n = _as_index(x) if t is not bool else None
        if n is not None:
            lo, hi = _RANGES[kind]
            if lo <= n <= hi:
                return n
            raise EncodeError(f"{where}: value {n} out of range for {_label(kind, ref)}")
    elif kind == "double" or kind == "float":
        if isinstance(x, float):
            return float(x)
        # as protobuf: any real number (int, numpy.float32, Fraction, ...) or integer with
        # __index__; not a bool
        if t is not bool and (isinstance(x, numbers.Real) or _as_index(x) is not None):
            try:
                return float(x) if isinstance(x, numbers.Real) else float(operator.index(x))
            except OverflowError:
                raise EncodeError(f"{where}: {x} too large for {kind}") from None
    elif kind == "bool":
        if t is bool:
            return x
        if t.__module__ == "numpy" and t.__name__ in ("bool", "bool_"):  # numpy.bool_, as protobuf
            return bool(x)
    elif kind == "string":
        if isinstance(x, str):
            return str(x)
    elif kind == "bytes":
        if isinstance(x, (bytes, bytearray, memoryview)):
            return bytes(x)
    raise EncodeError(f"{where}: expected {_label(kind, ref)}, got {_qualname(t)}")


def _qualname(t: type) -> str:
    """A type's name for errors, with its module when not a builtin ('numpy.float64', whose
    bare name numpy 2 makes 'float64' but for its bool: 'bool', beside Python's bool)."""
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _as_index(x: Any) -> int | None:
    """`x` as a plain int if it is an integer (an int, or has __index__ as numpy's integer
    scalars do), else None."""
    if isinstance(x, int):
        return int(x)
    if hasattr(type(x), "__index__"):
        try:
            return operator.index(x)
        except TypeError:  # numpy.bool_ and the like refuse
            return None
    return None


def _elist(x: Any, where: str) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    if isinstance(x, (str, bytes, bytearray, dict)) or not hasattr(x, "__iter__"):
        raise EncodeError(f"{where}: expected a list (repeated field), got {type(x).__name__}")
    return list(x)


def _eall(seq: list, where: str, kind: str, ref: str | None) -> list:
    return [_econv(y, f"{where}[{i}]", kind, ref) for i, y in enumerate(seq)]


def _edict(x: Any, where: str) -> dict:
    if isinstance(x, dict):
        return dict(x)
    if hasattr(x, "keys") and hasattr(x, "__getitem__"):
        return {k: x[k] for k in x.keys()}
    raise EncodeError(f"{where}: expected a dict (map field), got {type(x).__name__}")


def _emap(d: dict, where: str, kkind: str, vkind: str, vref: str | None) -> dict:
    out = {}
    for k, v in d.items():
        try:
            k2 = _econv(k, where, kkind, None)
        except EncodeError:
            raise EncodeError(f"{where}: map key {k!r:.40} is not a valid {kkind}") from None
        out[k2] = _econv(v, f"{where}[{k!r}]", vkind, vref)
    return out


def _emsg(x: Any, cls: type[Message], enc: Any, where: str, d: int) -> Any:
    if isinstance(x, cls):
        return enc(x, d + 1)
    # Each generated module has its own classes for the types it imports: an instance of
    # another module's class for the same definition has the same fields and the same wire
    # form (what protobuf's one class per type would take).
    mine = cls.__mrpc_message__
    theirs = getattr(type(x), "__mrpc_message__", None)
    if theirs is not None and theirs == mine:
        return enc(x, d + 1)
    if theirs is not None and mine is not None and theirs.full_name == mine.full_name:
        raise EncodeError(f"{where}: expected {cls.__qualname__}, got {type(x).__qualname__} from {type(x).__module__}, "
                          f"another definition of {mine.full_name}")
    raise EncodeError(f"{where}: expected {cls.__qualname__}, got {type(x).__name__}")


def _emsg_plain(x: Any, enc: Any, where: str, d: int) -> Any:
    if isinstance(x, dict):
        return enc(x, d + 1)
    raise EncodeError(f"{where}: expected a dict (message), got {type(x).__name__}")


_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb
_pack_parts_c = _packmod.pack_parts

# A `bytes` value at least this big is not copied by the app's send path encoder
# (`cls.__mrpc_serialize_parts__`): it goes by reference to the ring push, which copies it
# once, into shared memory. Smaller ones are packed into the surrounding run.
PARTS_MIN = 32 * 1024


# ---------------------------------------------------------------------------------------
# source generation


def _ident_ok(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("__")


class _Gen:
    """Generates encoder/decoder source for a set of messages, in one namespace.

    mode "cls": decoders build instances of bound classes, encoders read attributes.
    mode "plain": decoders build dicts, encoders read dict items.
    """

    def __init__(self, schema: Schema, mode: str, classes: dict[str, type] | None = None,
                 enums: dict[str, type[enum.IntEnum]] | None = None) -> None:
        self.schema = schema
        self.mode = mode
        self.classes = classes or {}
        self.index: dict[str, int] = {}
        self.ns: dict[str, Any] = {
            "_DE": DecodeError, "_EE": EncodeError, "_bad": _bad, "_fail": _fail,
            "_dconv": _dconv, "_dall": _dall, "_dmap": _dmap, "_dkey": _dkey_check,
            "_econv": _econv, "_elist": _elist, "_eall": _eall, "_edict": _edict,
            "_emap": _emap, "_emsg": _emsg, "_emsg_plain": _emsg_plain, "_tn": _tn,
            "_new": object.__new__, "MAXD": MAX_DEPTH - 1,
        }
        self.enum_maps: dict[str, str] = {}
        self.enum_classes: dict[str, str] = {}
        for ename, ecls in (enums or {}).items() if mode == "cls" else ():
            k = len(self.enum_maps)
            self.ns[f"_E{k}"] = {int(m): m for m in ecls}
            self.ns[f"_EC{k}"] = ecls
            self.enum_maps[ename] = f"_E{k}"
            self.enum_classes[ename] = f"_EC{k}"
        self.closed_maps: dict[str, str] = {}
        self.nconst = 0
        self.reading = False  # generating a read_field reader (plain mode, as the app reads)
        self.done: set[str] = set()
        self.nfunc = 0
        self.groups: dict[str, dict[str, tuple[str, ...]]] = {}

    def const(self, value: Any) -> str:
        """A name in the generated code's namespace for `value` (a default: inf, nan and
        bytes have no safe literal in every case)."""
        self.nconst += 1
        name = f"_K{self.nconst}"
        self.ns[name] = value
        return name

    def closed_map(self, ref: str | None) -> str | None:
        """For a closed (proto2) enum, decoded where the app's view counts (the app's classes,
        read_field): the name of a dict of its declared numbers (to the IntEnum members in
        class mode); None for an open enum or the daemon's plain decoding, which keeps
        every int (the receiving app judges with its own schema)."""
        en = self.schema.enums.get(ref) if ref is not None else None
        if en is None or not en.closed or (self.mode != "cls" and not self.reading):
            return None
        key = cast(str, ref)
        name = self.closed_maps.get(key)
        if name is None:
            members = self.ns[self.enum_maps[key]] if key in self.enum_maps else {}
            name = self.closed_maps[key] = self.const({n: members.get(n, n) for _, n in en.values})
        return name

    def raw_attr(self, msg: Any, f: Field) -> str | None:
        """In class mode, the attribute the codec reads and writes a field that has a RawField
        (a declared default, a member of a oneof with others) through: its slot
        (`message.raw_name`, None when unset), as fast as a plain field's; else None."""
        if self.mode == "cls" and has_raw_slot(f, self.oneofs(msg)):
            return raw_name(f.name)
        return None

    def oneofs(self, msg: Any) -> dict[str, tuple[str, ...]]:
        """message.clearing_oneofs of `msg`, computed once a message."""
        groups = self.groups.get(msg.full_name)
        if groups is None:
            groups = self.groups[msg.full_name] = clearing_oneofs(msg.fields)
        return groups

    def fid(self, name: str) -> int:
        if name not in self.index:
            if name not in self.schema.messages:
                raise SchemaError(f"unknown message {name}")
            self.index[name] = len(self.index)
        return self.index[name]

    def compile(self, names: list[str], encoders: bool = True) -> None:
        """Generate and exec functions for `names` and every message they reach."""
        todo = [n for n in names if n not in self.done]
        seen = set(todo)
        lines: list[str] = []
        while todo:
            name = todo.pop()
            msg = self.schema.messages.get(name)
            if msg is None:
                raise SchemaError(f"unknown message {name}")
            k = self.fid(name)
            if self.mode == "cls":
                cls = self.classes.get(name)
                if cls is None:
                    raise SchemaError(f"bind: no class given for message {name}")
                self.ns[f"_C{k}"] = cls
                # the containers of repeated / map fields of this message (with add() /
                # get_or_create(), marshal/containers.py)
                self.ns[f"_RL{k}"] = repeated_type(cls)
                self.ns[f"_RM{k}"] = map_type(cls)
            lines += self.decoder(msg, k)
            if encoders:
                lines += self.encoder(msg, k)
            self.done.add(name)
            for f in msg.fields:
                if f.type.kind == "message" and f.type.ref not in seen and f.type.ref not in self.done:
                    seen.add(f.type.ref_name)
                    todo.append(f.type.ref_name)
        if lines:
            src = "\n".join(lines) + "\n"
            exec(compile(src, f"<mrpcd.codec {self.mode}>", "exec"), self.ns)

    # -- decoding ------------------------------------------------------------------------
    def dbad(self, kind: str, v: str) -> str:
        """Expression: true when v (a decoded msgpack value) is not a valid `kind`."""
        if kind in _RANGES:
            lo, hi = _RANGES[kind]
            return f"{v}.__class__ is not int or not {lo} <= {v} <= {hi}"
        return f"{v}.__class__ is not " + {"double": "float", "float": "float", "bool": "bool",
                                           "string": "str", "bytes": "bytes"}[kind]

    def decoder(self, msg: Any, k: int) -> list[str]:
        name = msg.full_name
        n = len(msg.fields)
        L = [f"def _d{k}(v, d):",
             "    if v.__class__ is not list:",
             f"        raise _DE({name!r} + ': expected array (message), got ' + _tn(v))",
             f"    if len(v) != {n}:",
             f"        raise _DE({name!r} + ': expected {n} fields, got ' + str(len(v)))"]
        if any(f.type.kind == "message" for f in msg.fields):
            L += ["    if d > MAXD:",
                  f"        raise _DE({name!r} + ': messages nested deeper than {MAX_DEPTH}')"]
        vars_ = [f"f{i}" for i in range(n)]
        if n:
            L.append(f"    {', '.join(vars_)}, = v")
        for i, f in enumerate(msg.fields):
            L += ["    " + s for s in self.dfield(f, f"f{i}", f"{name}.{f.name}")]
        L += self.oneof_check(msg, "_DE")
        L += self.required_check(msg, "_DE")
        if self.mode == "cls":
            L.append(f"    o = _new(_C{k})")
            for i, f in enumerate(msg.fields):
                raw = self.raw_attr(msg, f)
                if raw is not None:
                    L.append(f"    o.{raw} = f{i}")
                elif _ident_ok(f.name):
                    L.append(f"    o.{f.name} = f{i}")
                else:
                    L.append(f"    setattr(o, {f.name!r}, f{i})")
            L.append("    return o")
        else:
            L.append("    return {" + ", ".join(f"{f.name!r}: f{i}" for i, f in enumerate(msg.fields)) + "}")
        return L

    def dfield(self, f: Field, v: str, where: str) -> list[str]:
        W = repr(where)
        t = f.type
        if f.label == "repeated":
            L = [f"if {v}.__class__ is not list:",
                 f"    raise _DE(_bad({W}, 'array', {v}))"]
            if t.kind == "message":
                j = self.fid(t.ref_name)
                lab = repr(f"message {t.ref}")
                comp = (f"[_d{j}(y, d + 1) if y.__class__ is list else "
                        f"_fail(_DE(_bad({W} + '[' + str(i) + ']', {lab}, y))) for i, y in enumerate({v})]")
                if self.mode == "cls":  # the container with add(); an empty one without a comprehension
                    L.append(f"{v} = _RL{j}({comp}) if {v} else _RL{j}()")
                else:
                    L.append(f"{v} = {comp}")
                return L
            L += [f"for y in {v}:",
                  f"    if {self.dbad(t.kind, 'y')}:",
                  f"        {v} = _dall({v}, {W}, {t.kind!r}, {t.ref!r})",
                  "        break"]
            closed = self.closed_map(t.ref) if t.kind == "enum" else None
            if closed is not None:  # a value a closed enum does not declare is dropped, as protobuf
                L.append(f"{v} = [{closed}[y] for y in {v} if y in {closed}]")
            elif t.kind == "enum" and t.ref in self.enum_maps:
                L.append(f"{v} = [{self.enum_maps[t.ref]}.get(y, y) for y in {v}]")
            return L
        if f.label == "map":
            kk = cast(TypeRef, f.key).kind  # a map field has a key type (from_dict)
            L = [f"if {v}.__class__ is not dict:",
                 f"    raise _DE(_bad({W}, 'map', {v}))"]
            if t.kind == "message":
                j = self.fid(t.ref_name)
                lab = repr(f"message {t.ref}")
                L += [f"for k_ in {v}:",
                      f"    if {self.dbad(kk, 'k_')}:",
                      f"        _dkey(k_, {W}, {kk!r})",
                      f"{v} = {'_RM' + str(j) + '(' if self.mode == 'cls' else ''}"
                      f"{{k_: _d{j}(y, d + 1) if y.__class__ is list else "
                      f"_fail(_DE(_bad({W} + '[' + repr(k_) + ']', {lab}, y))) for k_, y in {v}.items()}}"
                      f"{f') if {v} else _RM{j}()' if self.mode == 'cls' else ''}"]
                return L
            L += [f"for k_, y in {v}.items():",
                  f"    if {self.dbad(kk, 'k_')} or {self.dbad(t.kind, 'y')}:",
                  f"        {v} = _dmap({v}, {W}, {kk!r}, {t.kind!r}, {t.ref!r})",
                  "        break"]
            closed = self.closed_map(t.ref) if t.kind == "enum" else None
            if closed is not None:  # an entry whose value a closed enum does not declare is dropped
                L.append(f"{v} = {{k_: {closed}[y] for k_, y in {v}.items() if y in {closed}}}")
            elif t.kind == "enum" and t.ref in self.enum_maps:
                L.append(f"{v} = {{k_: {self.enum_maps[t.ref]}.get(y, y) for k_, y in {v}.items()}}")
            return L
        # single / optional / oneof member
        if t.kind == "message":
            j = self.fid(t.ref_name)
            lab = repr(f"message {t.ref}")
            return [f"if {v}.__class__ is list:",
                    f"    {v} = _d{j}({v}, d + 1)",
                    f"elif {v} is not None:",
                    f"    raise _DE(_bad({W}, {lab}, {v}))"]
        L = [f"if {self.dbad(t.kind, v)}:",
             f"    {v} = _dconv({v}, {W}, {t.kind!r}, {t.ref!r})"]
        closed = self.closed_map(t.ref) if t.kind == "enum" else None
        if closed is not None:
            # a value a closed enum does not declare leaves the field unset, as protobuf (a
            # field without presence, a required one, holds its default)
            other = "" if f.nullable else ", " + self.const(self.enum_value(f))
            L.append(f"{v} = {closed}.get({v}{other})")
        elif t.kind == "enum" and t.ref in self.enum_maps:
            L.append(f"{v} = {self.enum_maps[t.ref]}.get({v}, {v})")
        if f.nullable:
            L = [f"if {v} is not None:"] + ["    " + s for s in L]
        return L

    def oneof_check(self, msg: Any, exc: str) -> list[str]:
        groups: dict[str, list[tuple[int, str]]] = {}
        for i, f in enumerate(msg.fields):
            if f.oneof is not None:
                groups.setdefault(f.oneof, []).append((i, f.name))
        L = []
        for g, members in groups.items():
            if len(members) < 2:
                continue
            cond = " + ".join(f"(f{i} is not None)" for i, _ in members)
            head = f"{msg.full_name}: more than one member of oneof {g} is set ("
            # (encoding: assigning a member clears the others and constructors refuse two, so
            # only writes to the raw slots, `_mrpc_raw_<member>`, get here)
            tail = f"): its members' raw slots were written directly, ClearField({g!r}) first" \
                if exc == "_EE" and self.mode == "cls" else ")"
            pairs = ", ".join(f"({n!r}, f{i})" for i, n in members)
            L += [f"    if {cond} > 1:",
                  f"        raise {exc}({head!r} + ', '.join([n for n, x in ({pairs}) if x is not None]) + {tail!r})"]
        return L

    def required_check(self, msg: Any, exc: str) -> list[str]:
        """proto2 `required` message fields: unset (None) is an error both ways, as protobuf's
        "Message X is missing required fields: y"."""
        L = []
        for i, f in enumerate(msg.fields):
            if f.required:
                text = f"{msg.full_name}: missing required field {f.name}"
                L += [f"    if f{i} is None:", f"        raise {exc}({text!r})"]
        return L

    # -- encoding ------------------------------------------------------------------------
    def ebad(self, kind: str, ref: str | None, v: str) -> str:
        """Expression: true when v (a Python value) needs the slow path to be encoded."""
        if kind in _RANGES:
            lo, hi = _RANGES[kind]
            cls = "int"
            if kind == "enum" and ref in self.enum_classes:
                return (f"({v}.__class__ is not int and {v}.__class__ is not {self.enum_classes[ref]})"
                        f" or not {lo} <= {v} <= {hi}")
            return f"{v}.__class__ is not {cls} or not {lo} <= {v} <= {hi}"
        return f"{v}.__class__ is not " + {"double": "float", "float": "float", "bool": "bool",
                                           "string": "str", "bytes": "bytes"}[kind]

    def encoder(self, msg: Any, k: int) -> list[str]:
        name = msg.full_name
        L = [f"def _e{k}(m, d):"]
        if any(f.type.kind == "message" for f in msg.fields):
            L += ["    if d > MAXD:",
                  f"        raise _EE({name!r} + ': messages nested deeper than {MAX_DEPTH} (a cycle?)')"]
        for i, f in enumerate(msg.fields):
            raw = self.raw_attr(msg, f)
            if raw is not None:  # its slot: None (nil) when unset, not the default
                get = f"m.{raw}"
            elif self.mode == "cls":
                get = f"m.{f.name}" if _ident_ok(f.name) else f"getattr(m, {f.name!r})"
            else:
                get = f"m.get({f.name!r}, {self.default_expr(f)})"
            L.append(f"    f{i} = {get}")
            L += ["    " + s for s in self.efield(f, f"f{i}", f"{name}.{f.name}")]
        L += self.oneof_check(msg, "_EE")
        L += self.required_check(msg, "_EE")
        n = len(msg.fields)
        if n == 0:
            L.append("    return ()")
        else:
            L.append(f"    return ({', '.join(f'f{i}' for i in range(n))},)")
        return L

    def default_expr(self, f: Field) -> str:
        if f.label == "repeated":
            return "[]"
        if f.label == "map":
            return "{}"
        if f.nullable:
            return "None"
        if f.default is not None:  # (a required scalar's declared default)
            return self.const(f.default)
        if f.type.kind == "enum":
            return repr(_enum_default(self.schema, f.type.ref))
        return repr(_scalar_default(f.type.kind))

    def enum_value(self, f: Field) -> Any:
        """What an enum field without presence holds when unset: its declared default or the
        enum's first value (its IntEnum member in class mode)."""
        number = f.default if f.default is not None else _enum_default(self.schema, f.type.ref)
        return self.ns[self.closed_maps[f.type.ref_name]].get(number, number) if f.type.ref in self.closed_maps else number

    def emsg_expr(self, ref: str, y: str, W: str) -> str:
        j = self.fid(ref)
        if self.mode == "cls":
            return f"(_e{j}({y}, d + 1) if {y}.__class__ is _C{j} else _emsg({y}, _C{j}, _e{j}, {W}, d))"
        return f"(_e{j}({y}, d + 1) if {y}.__class__ is dict else _emsg_plain({y}, _e{j}, {W}, d))"

    def efield(self, f: Field, v: str, where: str) -> list[str]:
        W = repr(where)
        t = f.type
        if f.label == "repeated":
            L = [f"if {v}.__class__ is not list:", f"    {v} = _elist({v}, {W})"]
            if t.kind == "message":
                if self.mode == "cls":  # the decoder's and constructor's container first
                    L[0] = f"if {v}.__class__ is not _RL{self.fid(t.ref_name)} and {v}.__class__ is not list:"
                L.append(f"{v} = [{self.emsg_expr(t.ref_name, 'y', W)} for y in {v}]")
                return L
            L += [f"for y in {v}:",
                  f"    if {self.ebad(t.kind, t.ref, 'y')}:",
                  f"        {v} = _eall({v}, {W}, {t.kind!r}, {t.ref!r})",
                  "        break"]
            return L
        if f.label == "map":
            kk = cast(TypeRef, f.key).kind  # a map field has a key type (from_dict)
            L = [f"if {v}.__class__ is not dict:", f"    {v} = _edict({v}, {W})"]
            if t.kind == "message":
                if self.mode == "cls":
                    L[0] = f"if {v}.__class__ is not _RM{self.fid(t.ref_name)} and {v}.__class__ is not dict:"
                L += [f"for k_ in {v}:",
                      f"    if {self.ebad(kk, None, 'k_')}:",
                      f"        {v} = {{_econv(k_, {W} + ' (map key)', {kk!r}, None): y for k_, y in {v}.items()}}",
                      "        break",
                      f"{v} = {{k_: {self.emsg_expr(t.ref_name, 'y', W)} for k_, y in {v}.items()}}"]
                return L
            L += [f"for k_, y in {v}.items():",
                  f"    if {self.ebad(kk, None, 'k_')} or {self.ebad(t.kind, t.ref, 'y')}:",
                  f"        {v} = _emap({v}, {W}, {kk!r}, {t.kind!r}, {t.ref!r})",
                  "        break"]
            return L
        if t.kind == "message":
            return [f"if {v} is not None:", f"    {v} = {self.emsg_expr(t.ref_name, v, W)}"]
        L = [f"if {self.ebad(t.kind, t.ref, v)}:",
             f"    {v} = _econv({v}, {W}, {t.kind!r}, {t.ref!r})"]
        if f.nullable:
            L = [f"if {v} is not None:"] + ["    " + s for s in L]
        return L

    # -- read_field: one field's value decoder ------------------------------------------
    def field_reader(self, f: Field, where: str) -> Any:
        for name in [f.type.ref_name] if f.type.kind == "message" else []:
            self.compile([name], encoders=False)
        self.nfunc += 1
        fname = f"_rf{self.nfunc}"
        # the value as the app reading the message sees it: a closed enum's unknown value is
        # unset, an unset field with a declared default is that default (a policy must not
        # judge an unset field otherwise than the app it lets the message through to)
        self.reading = True
        try:
            body = self.dfield(f, "x", where)
        finally:
            self.reading = False
        if f.default is not None and f.nullable:
            body += ["if x is None:", f"    x = {self.const(f.default)}"]
        L = [f"def {fname}(x, d):"] + ["    " + s for s in body] + ["    return x"]
        exec(compile("\n".join(L) + "\n", "<mrpcd.codec read_field>", "exec"), self.ns)
        return self.ns[fname]


def _enum_default(schema: Schema, ref: str | None) -> int:
    """An unset enum field's number: the enum's first value, as in protobuf (0 in proto3;
    a proto2 enum need not have a 0 value)."""
    en = schema.enums.get(ref) if ref is not None else None
    return en.values[0][1] if en is not None and en.values else 0


def _scalar_default(kind: str) -> Any:
    if kind in _RANGES:
        return 0
    return {"double": 0.0, "float": 0.0, "bool": False, "string": "", "bytes": b""}[kind]


# ---------------------------------------------------------------------------------------
# bind: attach compiled codecs to generated classes


def bind(schema: Schema, classes: dict[str, type], enums: dict[str, type[enum.IntEnum]] | None = None) -> None:
    """Compile encoders/decoders for `classes` (full message name → class) and attach
    SerializeToString, FromString, __mrpc_schema__, __mrpc_message__ to each class.

    Every message reachable from a bound one must have a class in `classes`. `enums`
    (full enum name → IntEnum class) makes decoded enum values members of those classes
    when known (unknown values of open enums stay ints; those of closed, proto2, enums leave
    the field unset, as protobuf's decoder does). A field with presence and a declared
    default gets a DefaultedField in front of its slot, a member of a oneof with other
    members a OneofField (assigning it clears them, as protobuf); the codec reads and writes
    their slots (marshal/message.py).
    """
    gen = _Gen(schema, "cls", classes, enums)
    for ename, ecls in (enums or {}).items():
        # EnumWrapper's Name() / Value() answer with the .proto names of the values
        if ename in schema.enums and isinstance(ecls, type) and issubclass(ecls, EnumWrapper):
            ecls.__mrpc_enum__ = schema.enums[ename]
    cls: Any  # the classes get the codec's attributes here (Message declares them; any class with the slots binds)
    for name, cls in classes.items():
        if name not in schema.messages:
            raise SchemaError(f"bind: {name} is not a message of the schema")
        _check_class(cls, schema.messages[name])
    for name, cls in classes.items():
        _install_raw_fields(cls, schema.messages[name], enums or {})
    gen.compile(list(classes))
    for name, cls in classes.items():
        msg = schema.messages[name]
        k = gen.index[name]
        enc, dec = gen.ns[f"_e{k}"], gen.ns[f"_d{k}"]
        cls.SerializeToString = _make_serialize(enc, schema, name, cls)
        # the app's send path finds the Parts encoder through the serializer it was given
        # (so a custom or overridden serializer is used as it is)
        parts = _make_serialize(enc, schema, name, cls, _pack_parts)
        parts.__qualname__ = f"{name}.SerializeToString.__mrpc_parts__"
        cls.SerializeToString.__mrpc_parts__ = parts
        cls.FromString = classmethod(_make_fromstring(dec, schema, name))
        cls.__mrpc_schema__ = schema
        cls.__mrpc_message__ = msg
        cls.__mrpc_fields__ = tuple(f.name for f in msg.fields)
        cls.__mrpc_defaults__ = tuple(_default(f, schema, enums or {}, classes) for f in msg.fields)
        # the class of each message field (None for others): what a dict given for one becomes
        cls.__mrpc_types__ = tuple(classes[f.type.ref_name] if f.type.kind == "message" else None for f in msg.fields)


def _check_class(cls: type, msg: Any) -> None:
    try:
        probe: object = object.__new__(cls)
    except TypeError as exc:
        raise SchemaError(f"bind: cannot instantiate {cls!r} without __init__: {exc}") from None
    for f in msg.fields:
        try:
            setattr(probe, f.name, None)
        except AttributeError:
            raise SchemaError(f"bind: {cls.__qualname__} has no attribute slot for field {f.name!r}") from None


def _declared(f: Field, enums: dict[str, type[enum.IntEnum]]) -> Any:
    """A field's declared default as it reads: an enum's as its IntEnum member."""
    if f.type.kind == "enum":
        try:
            return enums[f.type.ref_name](f.default)
        except (KeyError, ValueError):
            return f.default
    return f.default


def _install_raw_fields(cls: Any, msg: Any, enums: dict[str, type[enum.IntEnum]]) -> None:
    """Put a RawField in front of the slot of each field that has_raw_slot: a DefaultedField
    for one with presence and a declared default (reads give the default while it is unset),
    a OneofField for a member of a oneof with other members (assigning it clears them); the
    slot itself under raw_name(field) for the codec. Undo that for fields that have none (a
    class bound again to another schema)."""
    slots = {}
    for f in msg.fields:
        current = cls.__dict__.get(f.name)
        if current is None:
            current = getattr(cls, f.name, None)  # a slot of a base class
        slots[f.name] = (current, current.slot if isinstance(current, RawField) else current)
    oneofs = clearing_oneofs(msg.fields)
    raw: dict[str, str] = {}
    for f in msg.fields:
        current, slot = slots[f.name]
        if has_raw_slot(f, oneofs):
            others = tuple(n for n in oneofs.get(cast(str, f.oneof), ()) if n != f.name)
            if (not all(hasattr(s, "__set__") and hasattr(s, "__get__") for s in (slot, *(slots[n][1] for n in others)))
                    or any(x.name == raw_name(f.name) for x in msg.fields)):
                what = "its default" if f.oneof not in oneofs else "a oneof member's property (it needs __slots__)"
                raise SchemaError(f"bind: {cls.__qualname__}.{f.name}: cannot give the field {what}")
            default = _declared(f, enums) if f.default is not None else None
            setattr(cls, raw_name(f.name), slot)
            setattr(cls, f.name, OneofField(slot, f.name, others, default) if others else DefaultedField(slot, default))
            raw[f.name] = raw_name(f.name)
        elif isinstance(current, RawField) and f.name in cls.__dict__:
            setattr(cls, f.name, slot)
    cls.__mrpc_raw__ = raw
    cls.__mrpc_oneofs__ = tuple(oneofs.items())
    if raw:  # pickle the stored values (None while unset), not what the fields read as
        cls.__getstate__ = raw_state
    elif cls.__dict__.get("__getstate__") is raw_state:
        del cls.__getstate__


def _default(f: Field, schema: Schema, enums: dict[str, type[enum.IntEnum]], classes: dict[str, type]) -> tuple[str, Any, bool]:
    if f.label == "repeated":
        return (f.name, repeated_type(classes[f.type.ref_name]) if f.type.kind == "message" else list, True)
    if f.label == "map":
        return (f.name, map_type(classes[f.type.ref_name]) if f.type.kind == "message" else dict, True)
    if f.nullable:  # (unset; a declared default is what DefaultedField reads it as)
        return (f.name, None, False)
    if f.default is not None:  # a required scalar's declared default
        return (f.name, _declared(f, enums), False)
    if f.type.kind == "enum":
        number = _enum_default(schema, f.type.ref)
        try:
            return (f.name, enums[f.type.ref_name](number), False)
        except (KeyError, ValueError):
            return (f.name, number, False)
    return (f.name, _scalar_default(f.type.kind), False)


def _pack_parts(value: Any) -> "bytes | _packmod.Parts":
    """msgpack's bytes for `value`, with big `bytes` values by reference (a Parts) for the
    app's send path; msgpack itself packs what the compiled packer does not handle, so
    the bytes, and the errors, are exactly those of `_pack`."""
    try:
        return _pack_parts_c(value, PARTS_MIN)
    except _packmod.Unsupported:
        return _pack(value)


def _make_serialize(enc: Any, schema: Schema, name: str, cls: type, pack: Any = None) -> Any:
    """SerializeToString for one message: `enc` builds the nested tuples, `pack` (msgpack's
    Packer unless given) packs them; encoder and packer errors become EncodeError the same
    way whichever packer it is.

    Stubs call it unbound, `request_type.SerializeToString(request)`: a request of another
    type is refused (the encoder would read whatever attributes it has of the same names),
    except the same .proto type generated into another module (see `_emsg`)."""
    pack = pack or _pack

    def SerializeToString(self: Any, deterministic: bool = False) -> bytes:
        if self.__class__ is not cls:
            _check_top(self, cls, name)
        try:
            if deterministic:
                return pack(_sorted_maps(enc(self, 0)))
            return pack(enc(self, 0))
        except (EncodeError, TypeError):
            raise
        except AttributeError as exc:
            raise EncodeError(f"{name}: a field is not set: {exc}") from None
        except RecursionError:
            raise EncodeError(f"{name}: message nested too deeply") from None
        except UnicodeEncodeError:
            where = _find_bad_string(schema, name, self) or name
            raise EncodeError(f"{where}: string is not encodable as UTF-8 (lone surrogate)") from None
        except (ValueError, OverflowError) as exc:
            raise EncodeError(f"{name}: {exc}") from None

    SerializeToString.__qualname__ = f"{name}.SerializeToString"
    return SerializeToString


def _sorted_maps(v: Any) -> Any:
    """An encoded message (tuples, lists, dicts: dicts are maps) with every map's entries in key
    order: SerializeToString(deterministic=True), protobuf's same bytes for equal messages.
    (The keys of one map are all of one kind: str, int or bool.)"""
    cls = v.__class__
    if cls is tuple:
        return tuple([_sorted_maps(x) for x in v])
    if cls is list:
        return [_sorted_maps(x) for x in v]
    if cls is dict:
        return {k: _sorted_maps(v[k]) for k in sorted(v)}
    return v


def _check_top(obj: Any, cls: type, name: str) -> None:
    """Slow path of SerializeToString's type check: raises EncodeError unless `obj` may be
    encoded as `cls`."""
    if isinstance(obj, cls):
        return
    mine = getattr(cls, "__mrpc_message__", None)
    if mine is not None and getattr(type(obj), "__mrpc_message__", None) == mine:
        return
    raise EncodeError(f"{name}: expected {cls.__qualname__}, got {type(obj).__qualname__}")


def _make_fromstring(dec: Any, schema: Schema, name: str) -> Any:
    unpackb = _unpackb

    def FromString(cls: type, data: bytes) -> Any:
        try:
            v = unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # ExtraData, UnicodeDecodeError, length limits, TypeError, ...
            raise _unpack_error(exc, data, schema, name) from None
        return dec(v, 0)

    FromString.__qualname__ = f"{name}.FromString"
    # Safe on memory that is only valid during the call (the app decodes big messages
    # straight from its rx ring): it keeps no reference to `data` or a buffer of it.
    FromString.__mrpc_inplace__ = True  # type: ignore[attr-defined]  # a function attribute (in_place_decoder reads it): mypy does not model those
    return FromString


def _unpack_error(exc: Exception, data: Any, schema: Schema, name: str) -> DecodeError:
    """Turn a msgpack unpacking failure into a DecodeError, naming the field if it can."""
    if isinstance(exc, msgpack.ExtraData):
        return DecodeError(f"{name}: {len(exc.extra)} trailing bytes after the message")
    if isinstance(exc, UnicodeDecodeError):
        where = None
        try:
            raw = _unpackb(data, raw=True, strict_map_key=False)
            where = _find_bad_utf8(schema, name, raw)
        except Exception:
            pass
        return DecodeError(f"{where or name}: invalid UTF-8 in string ({exc.reason})")
    if isinstance(exc, (TypeError, BufferError)) and not isinstance(data, (bytes, bytearray, memoryview)):
        return DecodeError(f"{name}: expected bytes to decode, got {type(data).__name__}")
    return DecodeError(f"{name}: malformed msgpack: {exc}")


def _find_bad_utf8(schema: Schema, name: str, raw: Any, depth: int = 0) -> str | None:
    """Slow path: `raw` was unpacked with raw=True (strings as bytes); find the field
    whose string (or map key) is not valid UTF-8."""
    msg = schema.messages.get(name)
    if msg is None or type(raw) is not list or len(raw) != len(msg.fields) or depth > MAX_DEPTH:
        return None
    for f, v in zip(msg.fields, raw):
        where = f"{name}.{f.name}"
        items: list = []
        keys: list = []
        if f.label == "repeated" and type(v) is list:
            items = v
        elif f.label == "map" and type(v) is dict:
            items, keys = list(v.values()), list(v.keys())
        elif f.label not in ("repeated", "map"):
            items = [v]
        if f.key is not None and f.key.kind == "string":
            for k in keys:
                if type(k) is bytes and not _utf8_ok(k):
                    return f"{where} (map key)"
        for item in items:
            if f.type.kind == "string" and type(item) is bytes and not _utf8_ok(item):
                return where
            if f.type.kind == "message":
                found = _find_bad_utf8(schema, f.type.ref_name, item, depth + 1)
                if found:
                    return found
    return None


def _utf8_ok(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _find_bad_string(schema: Schema, name: str, obj: Any, depth: int = 0) -> str | None:
    """Slow path after a UnicodeEncodeError: name the field holding the bad string."""
    if depth > MAX_DEPTH:
        return None
    msg = schema.messages[name]
    for f in msg.fields:
        v = obj.get(f.name) if isinstance(obj, dict) else getattr(obj, f.name, None)
        where = f"{name}.{f.name}"
        vals: list = []
        if f.label == "repeated":
            vals = list(v or ())
        elif f.label == "map":
            vals = list((v or {}).items())
        else:
            vals = [v]
        for item in vals:
            parts = list(item) if f.label == "map" else [item]
            for p in parts:
                if isinstance(p, str):
                    try:
                        p.encode("utf-8")
                    except UnicodeEncodeError:
                        return where
                elif p is not None and f.type.kind == "message" and not isinstance(p, (int, bytes)):
                    found = _find_bad_string(schema, f.type.ref_name, p, depth + 1)
                    if found:
                        return found
    return None


# ---------------------------------------------------------------------------------------
# class-less codecs (daemon side): cached per schema object

_plain_lock = threading.Lock()
_plain_cache: dict[int, tuple[Any, _Gen]] = {}


def _plain_gen(schema: Schema) -> _Gen:
    key = id(schema)
    entry = _plain_cache.get(key)
    if entry is not None and entry[0]() is schema:
        return entry[1]
    with _plain_lock:
        # The generator refers to the schema weakly, so a schema the daemon drops (an app
        # went away) frees its compiled codecs too.
        gen = _Gen(weakref.proxy(schema), "plain")  # type: ignore[arg-type]
        gen.readers = {}  # type: ignore[attr-defined]
        gen.fns = {}  # type: ignore[attr-defined]
        ref = weakref.ref(schema, functools.partial(_forget, key))
        _plain_cache[key] = (ref, gen)
        return gen


def _forget(key: int, ref: Any) -> None:
    cache = _plain_cache
    if cache is not None:  # None during interpreter shutdown
        entry = cache.get(key)
        if entry is not None and entry[0] is ref:
            del cache[key]


def _plain_fn(schema: Schema, message: str, prefix: str) -> Any:
    gen = _plain_gen(schema)
    fn = gen.fns.get((prefix, message))  # type: ignore[attr-defined]
    if fn is None:
        if message not in schema.messages:
            raise SchemaError(f"unknown message {message}")
        with _plain_lock:
            gen.compile([message])
            fn = gen.fns[(prefix, message)] = gen.ns[f"{prefix}{gen.index[message]}"]  # type: ignore[attr-defined]
    return fn


def decode_plain(schema: Schema, message: str, data: bytes) -> dict:
    """Decode and validate an encoded `message` into plain data (dicts for messages)."""
    dec = _plain_fn(schema, message, "_d")
    try:
        v = _unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise _unpack_error(exc, data, schema, message) from None
    return dec(v, 0)


def encode_plain(schema: Schema, message: str, value: dict) -> bytes:
    """Encode plain data (dicts for messages; missing keys take their defaults)."""
    enc = _plain_fn(schema, message, "_e")
    if not isinstance(value, dict):
        raise EncodeError(f"{message}: expected a dict, got {type(value).__name__}")
    try:
        return _pack(enc(value, 0))
    except (EncodeError, TypeError):
        raise
    except UnicodeEncodeError:
        where = _find_bad_string(schema, message, value) or message
        raise EncodeError(f"{where}: string is not encodable as UTF-8 (lone surrogate)") from None
    except (ValueError, OverflowError, RecursionError) as exc:
        raise EncodeError(f"{message}: {exc}") from None


def read_field(schema: Schema, message: str, data: bytes, path: str) -> Any:
    """Read one field ("name" or nested "a.b.c") of an encoded `message` without decoding
    the other fields: they are only skipped (bounds-checked). The field's value is decoded
    and validated as decode_plain would. Returns None if an enclosing message is unset."""
    gen = _plain_gen(schema)
    key = (message, path)
    plan = gen.readers.get(key)  # type: ignore[attr-defined]
    if plan is None:
        plan = _plan(gen, schema, message, path)
        with _plain_lock:
            gen.readers[key] = plan  # type: ignore[attr-defined]
    steps, names, reader = plan
    try:
        code, a, b = _framing.locate(data, steps)
    except _framing.SkipError as exc:
        raise DecodeError(f"{message}: malformed msgpack: {exc}") from None
    except (TypeError, BufferError) as exc:
        raise DecodeError(f"{message}: cannot read data: {exc}") from None
    if code == 1:
        if a == 0:
            raise DecodeError(f"{message}: expected array (message), got nil")
        return None
    if code == 2:
        raise DecodeError(f"{names[a]}: expected array (message)")
    if code == 3:
        raise DecodeError(f"{names[a]}: expected {steps[a][1]} fields, got {b}")
    try:
        v = _unpackb(memoryview(data)[a:b], raw=False, strict_map_key=False)
    except Exception as exc:
        raise DecodeError(f"{message}.{path}: malformed msgpack: {exc}") from None
    return reader(v, len(steps) - 1)


def _plan(gen: _Gen, schema: Schema, message: str, path: str) -> tuple:
    parts = path.split(".")
    steps: list[tuple[int, int]] = []
    names: list[str] = []
    cur = message
    if cur not in schema.messages:
        raise SchemaError(f"unknown message {message}")
    for depth, part in enumerate(parts):  # (at least one: f is set, or SchemaError)
        msg = schema.messages[cur]
        for i, f in enumerate(msg.fields):
            if f.name == part:
                break
        else:
            raise SchemaError(f"{cur} has no field {part!r} (path {path!r})")
        steps.append((i, len(msg.fields)))
        names.append(cur)
        if depth < len(parts) - 1:
            if f.type.kind != "message" or f.label in ("repeated", "map"):
                raise SchemaError(f"{cur}.{part} is not a single message field (path {path!r})")
            cur = f.type.ref_name
    if len(steps) > MAX_DEPTH:
        raise SchemaError(f"path {path!r} deeper than {MAX_DEPTH}")
    with _plain_lock:
        reader = gen.field_reader(f, f"{cur}.{parts[-1]}")
    return tuple(steps), names, reader
