"""The schema model: what an app tells the daemon about its messages and services.

One plain-data model serves the stub generator (which builds it from protoc's descriptors),
the codec (which compiles encoders/decoders from it), the daemon (which receives it from
apps as a dict over the control socket, so it must validate it as untrusted input), and the
daemon-to-daemon handshake (which compares fingerprints). It never imports protobuf.
"""
from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, cast

import msgpack

# Scalar kinds, named as in .proto. Integer ranges are checked on encode and decode.
INT_RANGES: dict[str, tuple[int, int]] = {
    "int32": (-(2**31), 2**31 - 1),
    "sint32": (-(2**31), 2**31 - 1),
    "sfixed32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "sint64": (-(2**63), 2**63 - 1),
    "sfixed64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
    "fixed32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "fixed64": (0, 2**64 - 1),
}
FLOAT_KINDS = frozenset({"double", "float"})
SCALAR_KINDS = frozenset(INT_RANGES) | FLOAT_KINDS | {"bool", "string", "bytes"}
REF_KINDS = frozenset({"enum", "message"})
MAP_KEY_KINDS = frozenset(INT_RANGES) | {"bool", "string"}

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FULL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Bounds on what an app may register: the daemon keeps schemas in memory.
MAX_MESSAGES = 4096
MAX_FIELDS = 1024
MAX_METHODS = 1024


class SchemaError(ValueError):
    """A schema is malformed or refers to a type it does not define."""


@dataclass(frozen=True)
class TypeRef:
    """The type of one value: a scalar kind, or an enum/message by full name."""

    kind: str
    ref: str | None = None  # full name for kind "enum" / "message"

    def to_list(self) -> list:
        return [self.kind, self.ref]

    @property
    def ref_name(self) -> str:
        """`ref` of an enum or message type (from_dict refuses one without it)."""
        return cast(str, self.ref)


@dataclass(frozen=True)
class Field:
    """One message field. `label` is "single", "optional" (may be None), "repeated" or "map"."""

    name: str
    number: int
    type: TypeRef  # value type (for a map: the value type)
    label: str = "single"
    key: TypeRef | None = None  # map key type
    oneof: str | None = None  # name of the oneof group; such fields may be None
    # proto2 `required` on a message field: None (unset) is refused when encoding and
    # decoding. (A required scalar is a "single" field: it always has a value to send.)
    required: bool = False
    # proto2 `[default = X]` of a scalar or enum field (an enum's as its number), None when
    # the .proto declares none. What an unset field reads as: it is never sent (unset is nil
    # on the wire, as ever), so it is the reader's own, as in protobuf, and it is not in
    # `closure()` (changing a default is a compatible change there too).
    default: Any = field(default=None, compare=False)
    # what equality compares for the default: nan equal to itself, True / 1 / 1.0 apart
    _default_key: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.default is not None:
            object.__setattr__(self, "_default_key", (type(self.default).__name__, repr(self.default)))

    @property
    def nullable(self) -> bool:
        return self.label == "optional" or self.oneof is not None or (
            self.label == "single" and self.type.kind == "message"
        )


@dataclass(frozen=True)
class Message:
    full_name: str
    fields: tuple[Field, ...]  # in declaration order; the wire order is this order


@dataclass(frozen=True)
class Enum:
    full_name: str
    values: tuple[tuple[str, int], ...]
    # a proto2 enum is closed: a value it does not declare, received from the wire, is not
    # stored in a field (the field reads as unset; a repeated field drops it), as protobuf
    # does. proto3 enums are open (unknown values are kept as ints). Only the decoding app's
    # own schema decides, so this is not in `closure()` either.
    closed: bool = False


@dataclass(frozen=True)
class Method:
    name: str
    input: str  # full message name
    output: str
    client_streaming: bool = False
    server_streaming: bool = False
    service: str = ""  # full service name, filled by Service

    @property
    def path(self) -> str:
        """The grpc-style method path, "/pkg.Service/Method"."""
        return f"/{self.service}/{self.name}"

    @property
    def method_id(self) -> int:
        return method_id(self.path)

    @property
    def kind(self) -> str:
        return {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[(self.client_streaming, self.server_streaming)]


@dataclass(frozen=True)
class Service:
    full_name: str
    methods: tuple[Method, ...]


def method_id(path: str) -> int:
    """A stable 32-bit id for a method path; both daemons derive the same id independently."""
    return zlib.crc32(path.encode("utf-8")) & 0xFFFFFFFF


@dataclass
class Schema:
    """All the types and services one app (or one generated module) knows."""

    messages: dict[str, Message] = field(default_factory=dict)
    enums: dict[str, Enum] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)

    # -- serialisation (control socket, generated modules) ---------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "messages": [
                [m.full_name, [_field_to_list(f) for f in m.fields]] for m in self.messages.values()
            ],
            "enums": [[e.full_name, [list(v) for v in e.values]] + ([True] if e.closed else [])
                      for e in self.enums.values()],
            "services": [
                [s.full_name, [[x.name, x.input, x.output, x.client_streaming, x.server_streaming] for x in s.methods]]
                for s in self.services.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Schema":
        """Build and validate a schema from untrusted plain data; raises SchemaError."""
        try:
            return _schema_from_dict(data)
        except SchemaError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise SchemaError(f"malformed schema: {exc}") from None

    def merge(self, other: "Schema") -> None:
        """Add another schema's types; the same name defined differently is an error."""
        for attr in ("messages", "enums", "services"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            for name, value in theirs.items():
                if name in mine and mine[name] != value:
                    raise SchemaError(f"{name} is already registered with a different definition")
                mine[name] = value

    # -- identity ----------------------------------------------------------------------
    def closure(self, service: str) -> dict[str, Any]:
        """Canonical plain data for a service and every type it reaches."""
        svc = self.services[service]
        seen_m: dict[str, Message] = {}
        seen_e: dict[str, Enum] = {}
        todo = [n for m in svc.methods for n in (m.input, m.output)]
        while todo:
            name = todo.pop()
            if name in seen_m:
                continue
            msg = self.messages[name]
            seen_m[name] = msg
            for f in msg.fields:
                for t in (f.type, f.key):
                    if t is None:
                        continue
                    if t.kind == "message":
                        todo.append(t.ref_name)
                    elif t.kind == "enum":
                        seen_e[t.ref_name] = self.enums[t.ref_name]
        return {
            "service": [svc.full_name, [[x.name, x.input, x.output, x.client_streaming, x.server_streaming] for x in svc.methods]],
            # (without defaults or closed flags: what an unset field or an unknown enum value
            # reads as is the receiving app's business; the wire is the same)
            "messages": sorted([m.full_name, [_field_to_list(f, False) for f in m.fields]] for m in seen_m.values()),
            "enums": sorted([e.full_name, [list(v) for v in e.values]] for e in seen_e.values()),
        }

    def fingerprint(self, service: str) -> str:
        """sha256 of the service's canonical closure: equal on both daemons iff wire-compatible."""
        blob = msgpack.packb(self.closure(service), use_bin_type=True)
        return hashlib.sha256(blob).hexdigest()[:32]

    def fingerprints(self) -> dict[str, str]:
        return {name: self.fingerprint(name) for name in self.services}

    def methods_by_id(self) -> dict[int, Method]:
        return {m.method_id: m for s in self.services.values() for m in s.methods}


def _field_to_list(f: Field, with_default: bool = True) -> list:
    out = [f.name, f.number, f.type.to_list(), f.label, f.key.to_list() if f.key else None, f.oneof]
    # only when set: schemas without required fields or defaults keep their form and fingerprints
    if with_default and f.default is not None:
        out += [f.required, [f.default]]
    elif f.required:
        out.append(True)
    return out


def _typeref(data: Any, where: str) -> TypeRef:
    kind, ref = data
    if not isinstance(kind, str):
        raise SchemaError(f"{where}: type kind must be a string")
    if kind in SCALAR_KINDS:
        if ref is not None:
            raise SchemaError(f"{where}: scalar {kind} takes no type name")
        return TypeRef(kind)
    if kind in REF_KINDS:
        if not isinstance(ref, str) or not _FULL_NAME.match(ref):
            raise SchemaError(f"{where}: {kind} needs a full type name, got {ref!r}")
        return TypeRef(kind, ref)
    raise SchemaError(f"{where}: unknown type kind {kind!r}")


def _check_name(name: Any, pattern: re.Pattern, what: str) -> str:
    if not isinstance(name, str) or not pattern.match(name) or len(name) > 512:
        raise SchemaError(f"invalid {what} name {name!r}")
    return name


def _enum_number(value: Any, where: str) -> int:
    lo, hi = INT_RANGES["int32"]
    if type(value) is not int or not lo <= value <= hi:
        raise SchemaError(f"{where}: enum value number must be an int32, got {value!r}")
    return value


def _schema_from_dict(data: Any) -> Schema:
    if not isinstance(data, dict):
        raise SchemaError("schema must be a mapping")
    schema = Schema()
    messages, enums, services = data.get("messages", []), data.get("enums", []), data.get("services", [])
    if len(messages) > MAX_MESSAGES or len(enums) > MAX_MESSAGES or len(services) > MAX_MESSAGES:
        raise SchemaError("schema has too many definitions")
    for entry in enums:
        if len(entry) not in (2, 3) or (len(entry) == 3 and entry[2] is not True):
            raise SchemaError("an enum is [name, values] or [name, values, true] (closed)")
        name, values = entry[0], entry[1]
        _check_name(name, _FULL_NAME, "enum")
        vals = tuple((_check_name(v[0], _NAME, "enum value"), _enum_number(v[1], name)) for v in values)
        schema.enums[name] = Enum(name, vals, len(entry) == 3)
    for name, fields in messages:
        _check_name(name, _FULL_NAME, "message")
        if len(fields) > MAX_FIELDS:
            raise SchemaError(f"{name}: too many fields")
        out = []
        for entry in fields:
            if len(entry) not in (6, 7, 8):
                raise SchemaError(f"{name}: a field is 6 to 8 items, got {len(entry)}")
            fname, number, ftype, label, key, oneof = entry[:6]
            # 7 items: required (true); 8: required (a bool) and [default]
            required = entry[6] if len(entry) >= 7 else False
            where = f"{name}.{fname}"
            _check_name(fname, _NAME, "field")
            if not isinstance(number, int) or not 0 < number < 2**29:
                raise SchemaError(f"{where}: bad field number {number!r}")
            if label not in ("single", "optional", "repeated", "map"):
                raise SchemaError(f"{where}: bad label {label!r}")
            keyref = _typeref(key, where) if label == "map" else None
            if keyref is not None and keyref.kind not in MAP_KEY_KINDS:  # (a map's)
                raise SchemaError(f"{where}: map key must be an integer, bool or string")
            if oneof is not None:
                _check_name(oneof, _NAME, "oneof")
                if label in ("repeated", "map"):
                    raise SchemaError(f"{where}: a oneof member cannot be {label}")
            ftyperef = _typeref(ftype, where)
            if type(required) is not bool or (len(entry) == 7 and required is not True):
                raise SchemaError(f"{where}: the required flag must be a bool (true in a 7-item field)")
            if required and (label != "single" or oneof is not None or ftyperef.kind != "message"):
                raise SchemaError(f"{where}: only a single message field (not in a oneof) can be marked required")
            default = _default_value(entry[7], ftyperef, label, where) if len(entry) == 8 else None
            out.append(Field(fname, number, ftyperef, label, keyref, oneof, required, default))
        if len({f.name for f in out}) != len(out) or len({f.number for f in out}) != len(out):
            raise SchemaError(f"{name}: duplicate field name or number")
        schema.messages[name] = Message(name, tuple(out))
    for name, methods in services:
        _check_name(name, _FULL_NAME, "service")
        if len(methods) > MAX_METHODS:
            raise SchemaError(f"{name}: too many methods")
        ms = []
        for mname, inp, outp, cs, ss in methods:
            _check_name(mname, _NAME, "method")
            ms.append(Method(mname, _check_name(inp, _FULL_NAME, "type"), _check_name(outp, _FULL_NAME, "type"), bool(cs), bool(ss), name))
        schema.services[name] = Service(name, tuple(ms))
    _check_references(schema)
    return schema


def _default_value(data: Any, t: TypeRef, label: str, where: str) -> Any:
    """A field's declared default from plain data ([value]), checked against its type: only
    a scalar or enum field that is not repeated / a map has one (as protoc allows)."""
    if not isinstance(data, (list, tuple)) or len(data) != 1:
        raise SchemaError(f"{where}: a default is [value]")
    value: Any = data[0]
    if label in ("repeated", "map") or t.kind == "message":
        raise SchemaError(f"{where}: only a scalar or enum field that is not repeated or a map has a default")
    kind = "int32" if t.kind == "enum" else t.kind
    ok: type = {"double": float, "float": float, "bool": bool, "string": str, "bytes": bytes}.get(kind, int)
    typed = type(value) is ok  # (a bool is not an int here, nor an int a float)
    if not typed or (kind in INT_RANGES and not INT_RANGES[kind][0] <= value <= INT_RANGES[kind][1]):
        raise SchemaError(f"{where}: default {value!r:.40} is not a {t.kind}")
    if kind == "string" and len(value) > 65536 or kind == "bytes" and len(value) > 65536:
        raise SchemaError(f"{where}: default longer than 65536")
    if ok is float and math.isnan(value):
        value = math.nan  # one nan object: equal defaults compare equal (Field's key, schema merge)
    return value


def _check_references(schema: Schema) -> None:
    for msg in schema.messages.values():
        for f in msg.fields:
            if f.default is not None and f.type.kind == "enum" and f.type.ref in schema.enums:
                if f.default not in {n for _, n in schema.enums[f.type.ref].values}:
                    raise SchemaError(f"{msg.full_name}.{f.name}: default {f.default} is not a value of {f.type.ref}")
            for t in (f.type, f.key):
                if t is None or t.ref is None:
                    continue
                table = schema.messages if t.kind == "message" else schema.enums
                if t.ref not in table:
                    raise SchemaError(f"{msg.full_name}.{f.name} refers to undefined {t.kind} {t.ref}")
    ids: dict[int, str] = {}
    for svc in schema.services.values():
        for m in svc.methods:
            for ref in (m.input, m.output):
                if ref not in schema.messages:
                    raise SchemaError(f"{m.path} refers to undefined message {ref}")
            if ids.setdefault(m.method_id, m.path) != m.path:
                raise SchemaError(f"method id collision between {ids[m.method_id]} and {m.path}")
