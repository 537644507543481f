"""Emit `<name>_mrpc.py` and `<name>_mrpc.pyi` for one parsed .proto file.

The module's shape is fixed by docs/INTERNALS.md ("Generated module"): SCHEMA, enums as
enum.IntEnum, messages as `mrpcd.marshal.message.Message` subclasses with `__slots__` and a
keyword-only `__init__`, `_codec.bind(...)`, then per service `XStub`, `XServicer` and
`add_XServicer_to_server`.

Python names (the schema always keeps the .proto names):
  * a field whose name is a Python keyword (`from`) keeps its slot under the .proto name
    (the codec reads it with getattr) and gets a property with a trailing underscore
    (`from_`, or `from__` if `from_` is itself a field); `__init__` takes `from_=`;
  * type, enum value and method names that are keywords get a trailing underscore too (and
    so does an enum value named `mro`, which Python's enum refuses); a method gets two when
    the service has a method of that name (`from` next to `from_` is `from__`);
  * type and method names starting with "__" are refused (special methods, module
    attributes, private name mangling);
  * types of imported files share the module's namespace: they keep their short name
    unless that is taken (by the file's own types, the generated names, or another
    import), then they are named after their full name (`google_protobuf_Empty`);
  * a nested type whose name is taken in its class (by a field) gets trailing underscores;
  * two services whose generated names would be the same (`JobsAsync` and `Jobs` both give
    `JobsAsyncStub`) are refused, naming both.
protobuf's API on top (docs/PORTING.md): enums mix in `EnumWrapper` (`Name`, `Value`, ...); the
values of the file's own top-level enums are module constants and those of nested enums class
attributes, each only where its name is free (a type, a generated name, a field, a Message
attribute keeps it); Timestamp, Duration, Struct and ListValue mix in their helpers
(mrpcd.marshal.wkt); an `__init__` makes a dict given for a message field into the message and
gives repeated / map fields of messages their containers (mrpcd.marshal.containers). The members
of a oneof with two or more members are written to their raw slots (`_mrpc_raw_<field>`, in
front of which codec.bind puts a OneofField that clears the other members on assignment), and
two members given is a TypeError (__mrpc_oneof_given__): protobuf keeps the last keyword given,
which a signature cannot tell.

Fields named like a Message method (SerializeToString, FromString, ByteSize, to_dict,
_fields, and protobuf's HasField, WhichOneof, ClearField, Clear, CopyFrom, MergeFrom,
MergeFromString, ParseFromString, ListFields, IsInitialized) or starting with "__" cannot
be generated and are reported as errors.
"""
from __future__ import annotations

import keyword
import math
import os
import re
from typing import AbstractSet, Any, cast

from mrpcd.marshal.message import Message as _BaseMessage
from mrpcd.marshal.message import clearing_oneofs, raw_name
from mrpcd.marshal.schema import Field, Message, Schema, Service, TypeRef

from .parse import ProtoModule, StubgenError

__all__ = ["generate", "module_name"]

_INT_KINDS = frozenset({"int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64", "sfixed32", "sfixed64"})
_PY_SCALAR = {"double": "float", "float": "float", "bool": "bool", "string": "str", "bytes": "bytes"}
_DEFAULTS = {"double": "0.0", "float": "0.0", "bool": "False", "string": '""', "bytes": 'b""'}
# names that generated code itself uses at module level (and the builtins the .py calls at run
# time: a top-level type of that name would replace them)
_MODULE_RESERVED = {
    "enum", "mrpcd", "annotations", "SCHEMA", "_codec", "_Message", "_Schema", "_EnumWrapper", "_wkt", "_datetime",
    "_MessageMap", "_RepeatedMessages",
    "property", "getattr", "setattr", "globals", "NotImplementedError",
    "_Any", "_Iterable", "_Iterator", "_Sequence", "_Mapping", "_TypeAlias", "_Metadata", "_builtins",
    "_AsyncIterable", "_AsyncIterator", "_Awaitable", "_TypeVar", "_overload", "_T",
    "_MaybeAsyncIterator", "_ServicerContext", "_abc", "_METHOD_TYPES",
    # what the .pyi's call protocols import (the names they define are added below)
    "_Protocol", "_Callable", "_Generator",
}
# attributes of the Message base class that a field slot must not replace
_MESSAGE_METHODS = {"SerializeToString", "FromString", "ByteSize", "to_dict", "_fields", "HasField",
                    "WhichOneof", "ClearField", "Clear", "CopyFrom", "MergeFrom", "MergeFromString",
                    "ParseFromString", "ListFields", "IsInitialized"}
# member names Python's enum refuses outright (ValueError when the class is created)
_ENUM_REFUSED = {"mro"}
# attributes an IntEnum member has (Enum's, int's): a value of that name works at run time, but
# type checkers see it as replacing the attribute, so the .pyi marks it
_ENUM_INHERITED = {"name", "value", "real", "imag", "numerator", "denominator", "conjugate", "bit_length",
                   "bit_count", "to_bytes", "from_bytes", "as_integer_ratio", "is_integer"}
# the EnumTypeWrapper methods generated enums get from mrpcd.marshal.enums.EnumWrapper: a value of
# that name hides one (the .pyi marks it, as the IntEnum attributes above)
_ENUM_WRAPPER = {"Name", "Value", "keys", "values", "items"}
# what a message class has from its base: a nested enum's value constant (protobuf's `Outer.K1`)
# of one of these names is not generated, it would replace it
_MESSAGE_ATTRS = set(dir(_BaseMessage))
# well-known types whose generated classes get protobuf's helper methods (mrpcd.marshal.wkt)
_WKT_MIXINS = {"google.protobuf.Timestamp": "_wkt.Timestamp", "google.protobuf.Duration": "_wkt.Duration"}
# ... and the Python value a constructor takes for a field of that type (the .pyi's name for it)
_WKT_PYTHON = {"_wkt.Timestamp": "_datetime.datetime", "_wkt.Duration": "_datetime.timedelta"}
# well-known types that protobuf makes containers of JSON-like values (mrpcd.marshal.wkt), with
# the one field their helpers use
_WKT_CONTAINERS = {"google.protobuf.Struct": ("_wkt.Struct", ("fields", "map", "message")),
                   "google.protobuf.ListValue": ("_wkt.ListValue", ("values", "repeated", "message"))}
_LINE = 100

# The call objects of a stub's methods, as grpcio's stubs type grpc.UnaryUnaryMultiCallable
# and friends: the call itself, .with_call() and .future() (sync), call objects (asyncio).
_CALL_PROTOCOLS = """
_Q = _TypeVar("_Q", contravariant=True)
_R = _TypeVar("_R", covariant=True)
_Timeout: _TypeAlias = _builtins.float | None

class _Call(_Protocol):
    def code(self) -> mrpcd.StatusCode: ...
    def details(self) -> _builtins.str: ...
    def initial_metadata(self) -> _Metadata: ...
    def trailing_metadata(self) -> _Metadata: ...
    def is_active(self) -> _builtins.bool: ...
    def time_remaining(self) -> _builtins.float | None: ...
    def cancel(self) -> _builtins.bool: ...
    def add_callback(self, callback: _Callable[[], _builtins.object]) -> _builtins.bool: ...

class _CallFuture(_Call, _Protocol[_R]):
    def result(self, timeout: _Timeout = ...) -> _R: ...
    def exception(self, timeout: _Timeout = ...) -> _builtins.BaseException | None: ...
    def done(self) -> _builtins.bool: ...
    def running(self) -> _builtins.bool: ...
    def cancelled(self) -> _builtins.bool: ...
    def add_done_callback(self, fn: _Callable[[_Any], _builtins.object]) -> None: ...

class _CallIterator(_Call, _Protocol[_R]):
    def __iter__(self) -> _Iterator[_R]: ...
    def __next__(self) -> _R: ...

class _UnaryUnary(_Protocol[_Q, _R]):
    def __call__(self, request: _Q, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _R: ...
    def with_call(self, request: _Q, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _builtins.tuple[_R, _Call]: ...
    def future(self, request: _Q, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _CallFuture[_R]: ...

class _UnaryStream(_Protocol[_Q, _R]):
    def __call__(self, request: _Q, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _CallIterator[_R]: ...

class _StreamUnary(_Protocol[_Q, _R]):
    def __call__(self, request_iterator: _Iterable[_Q], timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _R: ...
    def with_call(self, request_iterator: _Iterable[_Q], timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _builtins.tuple[_R, _Call]: ...
    def future(self, request_iterator: _Iterable[_Q], timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _CallFuture[_R]: ...

class _StreamStream(_Protocol[_Q, _R]):
    def __call__(self, request_iterator: _Iterable[_Q], timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _CallIterator[_R]: ...

class _AioCall(_Protocol):
    def code(self) -> _Awaitable[mrpcd.StatusCode]: ...
    def details(self) -> _Awaitable[_builtins.str]: ...
    def initial_metadata(self) -> _Awaitable[_Metadata]: ...
    def trailing_metadata(self) -> _Awaitable[_Metadata]: ...
    def wait_for_connection(self) -> _Awaitable[None]: ...
    def cancel(self) -> _builtins.bool: ...
    def cancelled(self) -> _builtins.bool: ...
    def done(self) -> _builtins.bool: ...
    def time_remaining(self) -> _builtins.float | None: ...
    def add_done_callback(self, callback: _Callable[[_Any], _builtins.object]) -> None: ...

class _AioUnaryCall(_AioCall, _Protocol[_R]):
    def __await__(self) -> _Generator[_Any, None, _R]: ...

class _AioStreamCall(_AioCall, _Protocol[_R]):
    def __aiter__(self) -> _AsyncIterator[_R]: ...
    def read(self) -> _Awaitable[_Any]: ...  # a response, or mrpcd.aio.EOF at the end

class _AioStreamUnaryCall(_AioUnaryCall[_R], _Protocol[_Q, _R]):
    def write(self, request: _Q) -> _Awaitable[None]: ...
    def done_writing(self) -> _Awaitable[None]: ...

class _AioStreamStreamCall(_AioStreamCall[_R], _Protocol[_Q, _R]):
    def write(self, request: _Q) -> _Awaitable[None]: ...
    def done_writing(self) -> _Awaitable[None]: ...

class _AioUnaryUnary(_Protocol[_Q, _R]):
    def __call__(self, request: _Q, *, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _AioUnaryCall[_R]: ...

class _AioUnaryStream(_Protocol[_Q, _R]):
    def __call__(self, request: _Q, *, timeout: _Timeout = ..., metadata: _Metadata | None = ...) -> _AioStreamCall[_R]: ...

class _AioStreamUnary(_Protocol[_Q, _R]):
    def __call__(self, request_iterator: _Iterable[_Q] | _AsyncIterable[_Q] | None = ..., *, timeout: _Timeout = ...,
                 metadata: _Metadata | None = ...) -> _AioStreamUnaryCall[_Q, _R]: ...

class _AioStreamStream(_Protocol[_Q, _R]):
    def __call__(self, request_iterator: _Iterable[_Q] | _AsyncIterable[_Q] | None = ..., *, timeout: _Timeout = ...,
                 metadata: _Metadata | None = ...) -> _AioStreamStreamCall[_Q, _R]: ...
"""
# the names the call protocols define (type variables, aliases, classes) are taken too
_MODULE_RESERVED |= set(re.findall(r"^(?:class )?(_\w+)", _CALL_PROTOCOLS, re.M))


def module_name(proto_path: str) -> str:
    """`dir/hello.proto` -> `hello_mrpc` (characters invalid in a module name become `_`)."""
    base = os.path.basename(proto_path)
    if base.endswith(".proto"):
        base = base[: -len(".proto")]
    base = re.sub(r"\W", "_", base)
    if not base or base[0].isdigit():
        base = "_" + base
    return base + "_mrpc"


def _safe(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) else name


class _Names:
    """Python names for the types, fields, enum values and methods of one module."""

    def __init__(self, mod: ProtoModule) -> None:
        self.mod = mod
        schema = mod.schema
        self.children: dict[str | None, list[str]] = {}
        for name in list(schema.enums) + list(schema.messages):
            self.children.setdefault(mod.parents.get(name), []).append(name)
        self.local: dict[str, str] = {}  # full type name -> its class name
        self.qual: dict[str, str] = {}  # full type name -> dotted Python path in the module
        self.attrs: dict[str, dict[str, str]] = {}  # message -> field name -> attribute
        self.aliases: dict[str, dict[str, str]] = {}  # message -> field -> property (keywords only)
        self.members: dict[str, list[tuple[str, int]]] = {}  # enum -> [(python name, value)]
        self.methods: dict[str, dict[str, str]] = {}  # service -> method -> attribute
        # message -> [(name, nested enum's full name, member)]: protobuf's `Outer.K1`
        self.class_constants: dict[str, list[tuple[str, str, str]]] = {}

        for name, msg in schema.messages.items():
            self._fields(msg)
        for name, en in schema.enums.items():
            self._enum_members(name, en.values)
        for name in list(schema.enums) + list(schema.messages):
            if name.rsplit(".", 1)[-1].startswith("__"):
                raise StubgenError(f"{mod.where(name)}: type {name}: names starting with __ mean something to Python "
                                   "(special methods and module attributes, private name mangling); rename it")
        for svc in schema.services.values():
            self._methods(svc)

        taken = set(_MODULE_RESERVED)
        made_by: dict[str, str] = {}  # generated name -> the service it is generated for
        for svc_name in mod.services:
            short = svc_name.rsplit(".", 1)[-1]
            for gen in (f"{short}Stub", f"{short}AsyncStub", f"{short}Servicer", f"add_{short}Servicer_to_server"):
                if gen in made_by:
                    raise StubgenError(f"{mod.proto}: services {made_by[gen]} and {svc_name} would both define {gen}; "
                                       "rename one of them")
                made_by[gen] = svc_name
            taken |= set(made_by)
        self.service_short = {svc: svc.rsplit(".", 1)[-1] for svc in mod.services}
        top = self.children.get(None, [])
        own = [n for n in top if mod.files.get(n) == mod.proto]
        other = [n for n in top if mod.files.get(n) != mod.proto]
        for full in own + other:
            cand = _safe(full.rsplit(".", 1)[-1])
            if cand in taken:
                cand = re.sub(r"\W", "_", full.replace(".", "_"))
            while cand in taken or keyword.iskeyword(cand):
                cand += "_"
            taken.add(cand)
            self._place(full, cand, cand)
        # protobuf's module-level constants for the values of the file's own top-level enums
        # (`RED` for `Color.RED`); a value whose name is taken (by a type, a generated name)
        # has none: it would replace that
        self.constants: list[tuple[str, str, str]] = []  # (name, enum's full name, member)
        for full in own:
            if full in schema.enums:
                for member, _ in self.members[full]:
                    if member not in taken:
                        taken.add(member)
                        self.constants.append((member, full, member))

    def _place(self, full: str, local: str, qual: str) -> None:
        self.local[full] = local
        self.qual[full] = qual
        if full in self.mod.schema.messages:
            taken = set(self.attrs[full].values()) | set(self.aliases[full].values()) | set(self.attrs[full])
            taken |= _MESSAGE_METHODS | {"__init__", "__slots__"}
            if self.aliases[full]:  # the class body calls property() for them
                taken.add("property")
            for child in self.children.get(full, []):
                cand = _safe(child.rsplit(".", 1)[-1])
                while cand in taken:
                    cand += "_"
                taken.add(cand)
                self._place(child, cand, f"{qual}.{cand}")
            # the values of nested enums as class attributes, as protobuf's (`Outer.K1`), unless
            # the name is taken in the class (a field, a nested type, a Message method)
            consts = self.class_constants[full] = []
            for child in self.children.get(full, []):
                if child in self.mod.schema.enums:
                    for member, _ in self.members[child]:
                        if member not in taken and member not in _MESSAGE_ATTRS:
                            taken.add(member)
                            consts.append((member, child, member))

    def _fields(self, msg: Message) -> None:
        names = {f.name for f in msg.fields}
        attrs: dict[str, str] = {}
        aliases: dict[str, str] = {}
        for f in msg.fields:
            if f.name in _MESSAGE_METHODS or f.name.startswith("__"):
                where = f"{self.mod.where(f'{msg.full_name}.{f.name}')}: field {msg.full_name}.{f.name}"
                raise StubgenError(f"{where}: the name clashes with a method of generated messages; rename the field")
            if keyword.iskeyword(f.name):
                alias = f.name + "_"
                while alias in names or alias in aliases.values():
                    alias += "_"
                aliases[f.name] = alias
                attrs[f.name] = alias
            else:
                attrs[f.name] = f.name
        self.attrs[msg.full_name] = attrs
        self.aliases[msg.full_name] = aliases

    def _methods(self, svc: Service) -> None:
        names = {m.name for m in svc.methods}
        out: dict[str, str] = {}
        for m in svc.methods:
            if m.name.startswith("__"):
                raise StubgenError(f"{self.mod.where(f'{svc.full_name}.{m.name}')}: method {svc.full_name}.{m.name}: names starting with __ mean "
                                   "something to Python (special methods, private name mangling); rename it")
            attr = m.name
            if keyword.iskeyword(attr):  # as a keyword field: `from_`, or `from__` if `from_` is a method too
                attr += "_"
                while attr in names or attr in out.values():
                    attr += "_"
            out[m.name] = attr
        self.methods[svc.full_name] = out

    def _enum_members(self, name: str, values) -> None:
        out, used = [], set()
        for vname, number in values:
            if vname.startswith("_") and (vname.endswith("_") or vname.startswith("__")):
                raise StubgenError(f"{self.mod.where(f'{name}.{vname}')}: enum value {name}.{vname}: names like _x_ and __x are reserved by Python's enum")
            cand = _safe(vname)
            if cand in _ENUM_REFUSED:  # enum.EnumType raises on these: a trailing underscore, as for keywords
                cand += "_"
            while cand in used:
                cand += "_"
            used.add(cand)
            out.append((cand, number))
        self.members[name] = out

    def default_member(self, enum: str) -> str | None:
        """The member an unset field holds: the first value declared, as in protobuf (proto3's
        is always 0; a proto2 enum need not have a 0 value at all)."""
        members = self.members[enum]
        return members[0][0] if members else None


class _Emitter:
    def __init__(self, mod: ProtoModule) -> None:
        self.mod = mod
        self.schema: Schema = mod.schema
        self.n = _Names(mod)
        self.pyi_aliases: dict[str, str] = {}  # top-level python name -> alias used where shadowed
        self.builtins_aliases: set[str] = set()  # names for the builtins module where _builtins is shadowed
        self.top_names = {self.n.local[t] for t in self.n.children.get(None, [])} | {c for c, _, _ in self.n.constants}

    # -- types -------------------------------------------------------------------------------
    def builtin(self, name: str, shadow: AbstractSet[str] = frozenset(), pyi: bool = False) -> str:
        """A builtin type (`int`, `list`, ...) as the .pyi must spell it: where a class body (a field
        `list`, a nested type `int`) or the module (a message `str`) binds the same name, the bare
        name would mean that."""
        if not pyi or (name not in shadow and name not in self.top_names):
            return name
        return f"{self.builtins_module(shadow)}.{name}"

    def builtins_module(self, shadow: AbstractSet[str]) -> str:
        """The .pyi's name for the builtins module where `shadow` is bound: `_builtins`, unless a
        field of the class is called that (then `_builtins_`, ..., aliases made at the end)."""
        cand = "_builtins"
        while cand in shadow or (cand != "_builtins" and cand in self.top_names):
            cand += "_"
        if cand != "_builtins":
            self.builtins_aliases.add(cand)
        return cand

    def value_type(self, kind: str, ref: str | None, shadow: AbstractSet[str] = frozenset(), pyi: bool = False) -> str:
        if kind in _INT_KINDS:
            return self.builtin("int", shadow, pyi)
        if kind in _PY_SCALAR:
            return self.builtin(_PY_SCALAR[kind], shadow, pyi)
        qual = self.n.qual[cast(str, ref)]  # an enum or message kind: it has a ref
        head, _, rest = qual.partition(".")
        if pyi and head in shadow:
            alias = self.pyi_aliases.setdefault(head, f"_mrpc_{head}")
            return alias + ("." + rest if rest else "")
        return qual

    def attr_type(self, f: Field, shadow: AbstractSet[str] = frozenset(), pyi: bool = False) -> str:
        t = self.value_type(f.type.kind, f.type.ref, shadow, pyi)
        if f.label == "repeated":
            if f.type.kind == "message":  # the container with add() (mrpcd.marshal.containers)
                return f"_RepeatedMessages[{t}]"
            return f"{self.builtin('list', shadow, pyi)}[{t}]"
        if f.label == "map":
            k = self.value_type(cast(TypeRef, f.key).kind, None, shadow, pyi)
            if f.type.kind == "message":  # the container with get_or_create()
                return f"_MessageMap[{k}, {t}]"
            return f"{self.builtin('dict', shadow, pyi)}[{k}, {t}]"
        # a field with a declared default reads it while unset: never None
        return f"{t} | None" if f.nullable and f.default is None else t

    def param_type(self, f: Field, shadow: AbstractSet[str] = frozenset(), pyi: bool = False) -> str:
        """What __init__ takes for a field: what the runtime accepts (as grpcio's .pyi types
        it): an int for an enum, a dict for a message, in the .pyi any iterable for a
        repeated field (it is copied into a list) and any mapping for a map."""
        t = self.value_type(f.type.kind, f.type.ref, shadow, pyi)
        if f.type.kind == "enum":
            t += f" | {self.builtin('int', shadow, pyi)}"
        if f.type.kind == "message" and pyi:
            t += f" | {self.builtin('dict', shadow, pyi)}[{self.builtin('str', shadow, pyi)}, _Any]"
            python = _WKT_PYTHON.get(self.wkt_mixin(f.type.ref_name) or "")
            if python and f.label == "single":  # a datetime / timedelta, as protobuf's constructors take
                t += f" | {python}"
        if f.label == "repeated":
            return (f"_Iterable[{t}]" if pyi else f"list[{t}]") + " | None"
        if f.label == "map":
            k = self.value_type(cast(TypeRef, f.key).kind, None, shadow, pyi)
            return (f"_Mapping[{k}, {t}]" if pyi else f"dict[{k}, {t}]") + " | None"
        return f"{t} | None" if f.nullable or f.default is not None else t

    def wkt_mixin(self, full: str) -> str | None:
        """The helper mixin of a well-known type (Timestamp, Duration), if it is one."""
        mixin = _WKT_MIXINS.get(full)
        fields = [(f.name, f.label, f.type.kind) for f in self.schema.messages[full].fields]
        if mixin and fields == [("seconds", "single", "int64"), ("nanos", "single", "int32")]:
            return mixin
        return None

    def wkt_container(self, full: str) -> str | None:
        """The helper mixin of Struct / ListValue (a mapping / sequence of JSON-like values)."""
        mixin, field = _WKT_CONTAINERS.get(full, (None, None))
        fields = [(f.name, f.label, f.type.kind) for f in self.schema.messages[full].fields]
        if mixin and fields == [field] and self.schema.messages[full].fields[0].type.ref_name == "google.protobuf.Value":
            return mixin
        return None

    def bases(self, full: str) -> str:
        mixin = self.wkt_mixin(full) or self.wkt_container(full)
        return f"{mixin}, _Message" if mixin else "_Message"

    def imports_wkt(self) -> list[str]:
        if any(self.wkt_mixin(full) or self.wkt_container(full) for full in self.schema.messages):
            return ["from mrpcd.marshal import wkt as _wkt"]
        return []

    # -- .py -----------------------------------------------------------------------------------
    def py(self) -> str:
        mod, n = self.mod, self.n
        out = [
            f"# Generated by mrpcd-stubgen from {mod.proto}. DO NOT EDIT.",
            f'"""mrpcd messages and services of {mod.proto}'
            + (f" (package {mod.package})" if mod.package else "") + '."""',
            "from __future__ import annotations",
            "",
            "import enum",
            "",
            "import mrpcd",
            "from mrpcd.marshal import codec as _codec",
        ] + self.imports_wkt() + [
            "from mrpcd.marshal.enums import EnumWrapper as _EnumWrapper",
            "from mrpcd.marshal.message import Message as _Message",
            "from mrpcd.marshal.schema import Schema as _Schema",
            "",
        ] + _schema_literal(self.schema)
        top = n.children.get(None, [])
        for full in [t for t in top if t in self.schema.enums]:
            out += ["", ""] + self.py_type(full, 0)
        if n.constants:
            out += ["", "", "# the values of the top-level enums, as protobuf's module constants"]
            out += [f"{name} = {n.qual[en]}.{member}" for name, en, member in n.constants]
        for full in [t for t in top if t in self.schema.messages]:
            out += ["", ""] + self.py_type(full, 0)
        out += ["", ""]
        classes = _dict_arg([(repr(full), n.qual[full]) for full in self.schema.messages], 4)
        enums = _dict_arg([(repr(full), n.qual[full]) for full in self.schema.enums], 4)
        out += _wrap_call("_codec.bind(", ["SCHEMA", classes, enums], ")")
        if any(self.schema.services[svc].methods for svc in mod.services):
            # the service functions below read their types here: a parameter or local of theirs
            # (channel, server, servicer, self, ...) would hide a message of that name
            out += ["", "", "# (request type, response type) of each method, by path", "_METHOD_TYPES = {"]
            for svc in mod.services:
                for m in self.schema.services[svc].methods:
                    out.append(f"    {m.path!r}: ({n.qual[m.input]}, {n.qual[m.output]}),")
            out.append("}")
        for svc in mod.services:
            out += ["", ""] + self.py_service(self.schema.services[svc])
        return "\n".join(out) + "\n"

    def py_type(self, full: str, depth: int) -> list[str]:
        n = self.n
        name = n.local[full]
        if full in self.schema.enums:
            lines = [f"class {name}(_EnumWrapper, enum.IntEnum):"]
            lines += [f"    {member} = {number}" for member, number in n.members[full]]
            return _indent_lines(lines, depth)
        msg = self.schema.messages[full]
        lines = [f"class {name}({self.bases(full)}):"]
        slots = f"    __slots__ = {_tuple_literal([f.name for f in msg.fields])}"
        if len(slots) + 4 * depth <= _LINE:
            lines.append(slots)
        else:
            lines += ["    __slots__ = ("] + [f"        {f.name!r}," for f in msg.fields] + ["    )"]
        children = n.children.get(full, [])
        for child in [c for c in children if c in self.schema.enums] + [c for c in children if c in self.schema.messages]:
            lines += [""] + self.py_type(child, 1)
        consts = n.class_constants[full]
        if consts:
            lines += [""] + [f"    {c} = {n.local[en]}.{member}" for c, en, member in consts]
        local_names = {n.local[c] for c in children} | set(n.aliases[full].values()) | {c for c, _, _ in consts}
        for fname, alias in n.aliases[full].items():
            lines += ["", f"    {alias} = property(",
                      f"        lambda self: getattr(self, {fname!r}),",
                      f"        lambda self, value: setattr(self, {fname!r}, value),",
                      f"        doc=\"The field `{fname}` (a Python keyword).\",",
                      "    )"]
        lines += [""] + _indent_lines(self.py_init(msg, local_names), 1)
        return _indent_lines(lines, depth)

    def py_init(self, msg: Message, class_names: set[str]) -> list[str]:
        n = self.n
        attrs = n.attrs[msg.full_name]
        me = _receiver(set(attrs.values()) | self.top_names)
        # the builtin dict, unless a parameter or a module-level type hides it
        dict_ = f"{me}.__mrpc_dict__" if "dict" in set(attrs.values()) | self.top_names else "dict"
        params, body = [], []
        oneofs = clearing_oneofs(msg.fields)
        for i, f in enumerate(msg.fields):
            p = attrs[f.name]
            ptype = self.param_type(f)
            if (f.label == "repeated" or f.label == "map") and f.type.kind == "message":
                # the field's container (with add() / get_or_create()), dicts made into messages
                default = "None"
                rep = f"{me}.__mrpc_defaults__[{i}][1]"
                value = f"{rep}() if {p} is None else {rep}._mrpc_of({p}, {me}, {i})"
            elif f.label == "repeated" or f.label == "map":  # a copy, as protobuf's (of an iterator, a tuple, the caller's list)
                default, value = "None", f"{me}.__mrpc_{'list' if f.label == 'repeated' else 'map'}__({p})"
            elif f.type.kind == "message" and self.wkt_mixin(f.type.ref_name) and f.label == "single":
                # Timestamp / Duration: also a datetime / timedelta, as protobuf's constructors
                default, value = "None", (f"{p} if {p} is None or {p}.__class__ is {me}.__mrpc_types__[{i}] "
                                          f"else {me}.__mrpc_msg__({i}, {p})")
            elif f.type.kind == "message":  # protobuf's constructors take a dict for a message
                default, value = "None", f"{p} if {p}.__class__ is not {dict_} else {me}.__mrpc_msg__({i}, {p})"
            elif f.nullable:  # (unset: None, also where a declared default is what it reads as)
                default, value = "None", p
            elif f.default is not None:  # a required scalar's declared default: the one bind() computed
                default, value = "None", f"({me}.__mrpc_defaults__[{i}][1] if {p} is None else {p})"
            elif f.type.kind == "enum":
                member = n.default_member(f.type.ref_name)
                qual = n.qual[f.type.ref_name]
                head = qual.split(".")[0]
                if member is None:
                    default, value = "0", p
                elif "." not in qual and head not in class_names:
                    default, value = f"{qual}.{member}", p  # top-level enums are defined first
                elif n.mod.parents.get(f.type.ref_name) == msg.full_name:
                    default, value = f"{n.local[f.type.ref_name]}.{member}", p  # own nested enum: in class scope
                else:  # defined later or hidden by a parameter here: the default bind() computed
                    # (the same member), read through the receiver, which no name can hide
                    ptype += " | None"
                    default, value = "None", f"({me}.__mrpc_defaults__[{i}][1] if {p} is None else {p})"
            else:
                default, value = _DEFAULTS.get(f.type.kind, "0"), p
            params.append(f"{p}: {ptype} = {default}")
            if f.oneof in oneofs:
                # its slot (codec.bind's OneofField would clear the other members: slower, and
                # it would hide a second member given, which the check below refuses)
                body.append(f"{me}.{raw_name(f.name)} = {value}")
            else:
                # a keyword field is set through its property: no global name a parameter could hide
                body.append(f"{me}.{p} = {value}")
        for group, names in oneofs.items():
            # two members given: a TypeError (protobuf keeps the last keyword given, which a
            # signature cannot tell)
            body += _two_members_check([attrs[x] for x in names])
            body.append(f"    {me}.__mrpc_oneof_given__({group!r})")
        sig = _signature(f"def __init__({me}", params, ") -> None:")
        return sig + ["    " + b for b in body or ["pass"]]

    def py_service(self, svc: Service) -> list[str]:
        n = self.n
        short = n.service_short[svc.full_name]
        out = [f"class {short}Stub:",
               f'    """Client stub of {svc.full_name}: sync with mrpcd.insecure_channel, asyncio with mrpcd.aio."""',
               "",
               "    def __init__(self, channel):"]
        for m in svc.methods:
            out += ["        " + line for line in _wrap_call(
                f"self.{n.methods[svc.full_name][m.name]} = channel.{m.kind}(",
                [repr(m.path), f"request_type=_METHOD_TYPES[{m.path!r}][0]",
                 f"response_type=_METHOD_TYPES[{m.path!r}][1]"], ")", _LINE - 8)]
        if not svc.methods:
            out.append("        pass")
        out += ["", "", f"{short}AsyncStub = {short}Stub  # the .pyi's name for it on an mrpcd.aio channel"]
        out += ["", "", f"class {short}Servicer:", f'    """Server side of {svc.full_name}: subclass and override the methods."""']
        for m in svc.methods:
            arg = "request_iterator" if m.client_streaming else "request"
            out += ["", f"    def {n.methods[svc.full_name][m.name]}(self, {arg}, context):",
                    "        context.set_code(mrpcd.StatusCode.UNIMPLEMENTED)",
                    '        context.set_details("Method not implemented!")',
                    '        raise NotImplementedError("Method not implemented!")']
        out += ["", "", f"def add_{short}Servicer_to_server(servicer, server):", "    rpc_method_handlers = {"]
        for m in svc.methods:
            out += ["        " + line for line in _wrap_call(
                f"{m.name!r}: mrpcd.{m.kind}_rpc_method_handler(",
                [f"servicer.{n.methods[svc.full_name][m.name]}", f"request_type=_METHOD_TYPES[{m.path!r}][0]",
                 f"response_type=_METHOD_TYPES[{m.path!r}][1]"],
                "),", _LINE - 8)]
        out += ["    }"]
        out += ["    " + line for line in _wrap_call(
            "generic_handler = mrpcd.method_handlers_generic_handler(",
            [repr(svc.full_name), "rpc_method_handlers", "schema=SCHEMA"], ")", _LINE - 4)]
        out += ["    server.add_generic_rpc_handlers((generic_handler,))"]
        return out

    # -- .pyi ----------------------------------------------------------------------------------
    def pyi(self) -> str:
        mod, n = self.mod, self.n
        body: list[str] = []
        top = n.children.get(None, [])
        for full in [t for t in top if t in self.schema.enums]:
            body += ["", ""] + self.pyi_type(full, 0)
        if n.constants:
            body += [""] + [f"{name}: {n.qual[en]}" for name, en, _ in n.constants]
        for full in [t for t in top if t in self.schema.messages]:
            body += ["", ""] + self.pyi_type(full, 0)
        for svc in mod.services:
            body += ["", ""] + self.pyi_service(self.schema.services[svc])
        out = [
            f"# Generated by mrpcd-stubgen from {mod.proto}. DO NOT EDIT.",
            "import abc as _abc",
            "import builtins as _builtins",
            "import enum",
            "from collections.abc import AsyncIterable as _AsyncIterable, AsyncIterator as _AsyncIterator",
            "from collections.abc import Awaitable as _Awaitable",
            "from collections.abc import Iterable as _Iterable, Iterator as _Iterator, Sequence as _Sequence",
            "from collections.abc import Mapping as _Mapping",
            "from collections.abc import Callable as _Callable, Generator as _Generator",
            "from typing import Any as _Any, Protocol as _Protocol",
            "from typing import TypeAlias as _TypeAlias, TypeVar as _TypeVar, overload as _overload",
            "",
            "import mrpcd",
            "import mrpcd.aio",
        ] + (["import datetime as _datetime"] if self.imports_wkt() else []) + self.imports_wkt() + [
            "from mrpcd.marshal.containers import MessageMap as _MessageMap, RepeatedMessages as _RepeatedMessages",
            "from mrpcd.marshal.enums import EnumWrapper as _EnumWrapper",
            "from mrpcd.marshal.message import Message as _Message",
            "from mrpcd.marshal.schema import Schema as _Schema",
            "",
            "_Metadata: _TypeAlias = _Sequence[_builtins.tuple[_builtins.str, _builtins.str | _builtins.bytes]]",
            "_T = _TypeVar(\"_T\")",
            "",
            "# what a servicer's handlers are given, sync (mrpcd.server) or asyncio (mrpcd.aio.server)",
            "class _MaybeAsyncIterator(_AsyncIterator[_T], _Iterator[_T], metaclass=_abc.ABCMeta): ...",
            "class _ServicerContext(mrpcd.ServicerContext, mrpcd.aio.ServicerContext): ...  # type: ignore[misc, unused-ignore]",
            "",
            "SCHEMA: _Schema",
        ] + (_CALL_PROTOCOLS.rstrip("\n").split("\n") if mod.services else []) + body
        if self.pyi_aliases:
            out += ["", "# module-level types under names no class scope shadows"]
            out += [f"{alias} = {head}" for head, alias in sorted(self.pyi_aliases.items())]
        if self.builtins_aliases:
            out += ["", "# the builtins under names no class scope shadows"]
            out += [f"{alias} = _builtins" for alias in sorted(self.builtins_aliases)]
        return "\n".join(out) + "\n"

    def pyi_type(self, full: str, depth: int) -> list[str]:
        n = self.n
        name = n.local[full]
        if full in self.schema.enums:
            lines = [f"class {name}(_EnumWrapper, enum.IntEnum):"]
            lines += [f"    {member} = {number}" + ("  # type: ignore[assignment, misc, unused-ignore]"
                                                   if member in _ENUM_INHERITED | _ENUM_WRAPPER else "")
                      for member, number in n.members[full]]
            return _indent_lines(lines, depth)
        msg = self.schema.messages[full]
        attrs = n.attrs[full]
        children = n.children.get(full, [])
        # names a class body binds: annotations in it would resolve to these first
        consts = n.class_constants[full]
        shadow = ({n.local[c] for c in children} | set(attrs.values()) | {"SerializeToString", "FromString"}
                  | {c for c, _, _ in consts})
        lines = [f"class {name}({self.bases(full)}):"]
        for child in [c for c in children if c in self.schema.enums] + [c for c in children if c in self.schema.messages]:
            lines += self.pyi_type(child, 1)
        lines += [f"    {c}: {self.value_type('enum', en, shadow, True)}" for c, en, _ in consts]
        for f in msg.fields:
            lines.append(f"    {attrs[f.name]}: {self.attr_type(f, shadow, True)}")
        params = [f"{attrs[f.name]}: {self.param_type(f, shadow, True)} = ..." for f in msg.fields]
        me = _receiver(set(attrs.values()))
        lines += ["    " + s for s in _signature(f"def __init__({me}", params, ") -> None: ...")]
        b = self.builtin("bytes", shadow, True)
        lines += [f"    def SerializeToString({me}, deterministic: {self.builtin('bool', shadow, True)} = ...) -> {b}: ...",
                  f"    @{self.builtin('classmethod', shadow, True)}",
                  f"    def FromString(cls, data: {b}) -> {self.value_type('message', full, shadow, True)}: ..."]
        return _indent_lines(lines, depth)

    def pyi_service(self, svc: Service) -> list[str]:
        n = self.n
        short = n.service_short[svc.full_name]
        names = n.methods[svc.full_name]
        shadow = set(names.values())

        def t(ref: str) -> str:
            return self.value_type("message", ref, shadow, True)

        kinds = {(False, False): "UnaryUnary", (False, True): "UnaryStream",
                 (True, False): "StreamUnary", (True, True): "StreamStream"}

        def stub_methods(aio: bool) -> list[str]:
            # attributes, as at run time: call objects with .future() / .with_call() (sync)
            lines = []
            for m in svc.methods:
                kind = ("_Aio" if aio else "_") + kinds[(m.client_streaming, m.server_streaming)]
                line = f"    {names[m.name]}: {kind}[{t(m.input)}, {t(m.output)}]"
                if aio:  # the same attribute, the asyncio channel's call objects
                    line += "  # type: ignore[assignment]"
                lines.append(line)
            return lines

        # one runtime class for both channels; the .pyi tells them apart by the channel's type
        # (with __new__ only: mypy would type the call by an __init__)
        out = [f"class {short}Stub:",
               "    @_overload",
               f"    def __new__(cls, channel: mrpcd.aio.Channel) -> {short}AsyncStub: ...",
               "    @_overload",  # (never matched only where mypy cannot see mrpcd's types)
               f"    def __new__(cls, channel: _Any) -> {short}Stub: ...  # type: ignore[overload-cannot-match, misc, unused-ignore]",
               ] + stub_methods(False)
        out += ["", "", f"class {short}AsyncStub({short}Stub):"] + (stub_methods(True) or ["    ..."])
        # handlers may be def or async def, and take either context: as grpcio's stubs type them
        out += ["", "", f"class {short}Servicer:"]
        for m in svc.methods:
            req_t, resp_t = t(m.input), t(m.output)
            req = f"request_iterator: _MaybeAsyncIterator[{req_t}]" if m.client_streaming else f"request: {req_t}"
            if m.server_streaming:
                resp = f"_Iterator[{resp_t}] | _AsyncIterator[{resp_t}]"
            else:
                resp = f"{resp_t} | _Awaitable[{resp_t}]"
            out += ["    " + s for s in _signature(
                f"def {names[m.name]}(self", [req, "context: _ServicerContext"], f") -> {resp}: ...")]
        if not svc.methods:
            out.append("    ...")
        out += ["", "", f"def add_{short}Servicer_to_server(servicer: {short}Servicer, server: mrpcd.Server | mrpcd.aio.Server) -> None: ..."]
        return out


# -- formatting helpers -------------------------------------------------------------------------


def _receiver(taken: set[str]) -> str:
    """The name of a method's `self` parameter: `self` unless a parameter (a field) has that name."""
    cand = "self"
    if cand in taken:
        cand = "_self_"
    while cand in taken:
        cand += "_"
    return cand


def _indent_lines(lines: list[str], levels: int) -> list[str]:
    return [("    " * levels + line) if line else line for line in lines]


def _tuple_literal(names: list[str]) -> str:
    if not names:
        return "()"
    if len(names) == 1:
        return f"({names[0]!r},)"
    return "(" + ", ".join(repr(x) for x in names) + ")"


def _two_members_check(params: list[str]) -> list[str]:
    """`if <two or more of params are not None>:` for a constructor's oneof members. Tests
    that stop at the first member given (n - 1 `is` tests when none is: about 11 ns for five
    members, where adding up the bools takes 55 and a tuple's count(None) 40, measured); for
    a oneof of more than six members, whose tests grow with the square, the count."""
    if len(params) > 6:
        return [f"if ({', '.join(params)}).count(None) < {len(params) - 1}:"]
    terms = [f"{q} is not None and ({' or '.join(f'{r} is not None' for r in params[j + 1:])})"
             for j, q in enumerate(params[:-1])]
    one = f"if {' or '.join(terms)}:"
    if len(one) + 8 <= _LINE:
        return [one]
    return ["if ("] + [f"    {t}" + (" or" if k < len(terms) - 1 else "") for k, t in enumerate(terms)] + ["):"]


def _signature(head: str, params: list[str], tail: str) -> list[str]:
    """`def f(self, *, a, b) -> None:` on one line if it fits, else one parameter a line.

    `head` is "def name(receiver"; an `__init__` gets keyword-only parameters.
    """
    kwonly = head.startswith("def __init__(")
    allp = (["*"] if kwonly and params else []) + params
    one = head + "".join(", " + p for p in allp) + tail
    if len(one) <= _LINE - 8:
        return [one]
    name, _, receiver = head.partition("(")
    return [name + "("] + [f"    {p}," for p in [receiver] + allp] + [tail.lstrip()]


def _wrap_call(head: str, args: list[str], tail: str, width: int = _LINE) -> list[str]:
    one = head + ", ".join(args) + tail
    if len(one) <= width:
        return [one]
    return [head] + [f"    {a}," for a in args] + [tail]


def _dict_arg(items: list[tuple[str, str]], indent: int) -> str:
    """A dict literal, one item a line when it does not fit on one."""
    one = "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if len(one) + indent <= _LINE or not items:
        return one
    pad = " " * (indent + 4)
    return "{\n" + "".join(f"{pad}{k}: {v},\n" for k, v in items) + " " * indent + "}"


def _literal(x: Any) -> str:
    """repr() of plain data, but floats that have no literal (a default of inf, -inf, nan) as
    expressions that use no name (a module's type could be called `float`)."""
    if isinstance(x, list):
        return "[" + ", ".join(_literal(v) for v in x) + "]"
    if isinstance(x, float) and not math.isfinite(x):
        return "(1e999 * 0)" if math.isnan(x) else "1e999" if x > 0 else "-1e999"
    return repr(x)


def _schema_literal(schema: Schema) -> list[str]:
    """`SCHEMA = _Schema.from_dict({...})`: to_dict() laid out one field / method a line."""
    d = schema.to_dict()
    out = ["SCHEMA = _Schema.from_dict({"]
    out.append('    "messages": [')
    for name, fields in d["messages"]:
        if not fields:
            out.append(f"        [{name!r}, []],")
            continue
        out.append(f"        [{name!r}, [")
        out += [f"            {_literal(f)}," for f in fields]
        out.append("        ]],")
    out.append("    ],")
    out.append('    "enums": [')
    for name, values, *closed in d["enums"]:
        tail = ", True" if closed else ""  # (a closed, proto2, enum)
        one = f"        [{name!r}, {values!r}{tail}],"
        if len(one) <= _LINE:
            out.append(one)
        else:
            out.append(f"        [{name!r}, [")
            out += [f"            {v!r}," for v in values]
            out.append(f"        ]{tail}],")
    out.append("    ],")
    out.append('    "services": [')
    for name, methods in d["services"]:
        out.append(f"        [{name!r}, [")
        out += [f"            {m!r}," for m in methods]
        out.append("        ]],")
    out.append("    ],")
    out.append("})")
    return out


def generate(mod: ProtoModule) -> tuple[str, str]:
    """(source of <name>_mrpc.py, source of <name>_mrpc.pyi) for one parsed file."""
    em = _Emitter(mod)
    py, pyi = em.py(), em.pyi()
    for text, name in ((py, module_name(mod.path) + ".py"), (pyi, module_name(mod.path) + ".pyi")):
        try:  # never write a module that cannot be imported
            compile(text, name, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            where = f", line {exc.lineno}: {(exc.text or '').strip()}" if isinstance(exc, SyntaxError) else ""
            msg = exc.msg if isinstance(exc, SyntaxError) else str(exc)
            raise StubgenError(f"{mod.proto}: internal error: the generated {name} does not compile ({msg}{where}); "
                               "please report it with the .proto") from None
    return py, pyi
