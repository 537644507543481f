"""Parse .proto files with protoc (from grpcio-tools) into mrpcd schemas.

protoc does all the parsing and type resolution; we read the FileDescriptorSet it writes
(`--descriptor_set_out --include_imports`) and turn it into a `mrpcd.marshal.schema.Schema`
per input file, plus the little extra the generator needs (which types are nested in which,
which file declared what).

What goes into the schema of one input ("main") file: every message and enum it declares,
its services, and every type those reach through fields or method signatures, whatever
file declares it (imports, including google/protobuf well-known types), plus the enclosing
messages of reached nested types and everything in files it imports with `import public`.
Generated modules are self-contained.

Mapping of descriptors to the schema:
  * repeated field of a map-entry message  -> label "map" (key, value); the entry type is
    not a message of the schema;
  * repeated                               -> "repeated";
  * proto3 `optional` (synthetic oneof)    -> "optional" (the synthetic oneof is dropped);
  * proto2 `optional`                      -> "optional"; proto2 `required` -> "single"
    (a required message field is marked `required`: unset is refused both ways; a
    required scalar always has a value to send);
  * member of a real oneof                 -> "single" with oneof=<oneof name>;
  * everything else                        -> "single".
proto2 `[default = X]` (on an optional field, a oneof member or a required scalar) becomes the
field's `default` (typed: an enum's by its number, bytes unescaped as protoc gives them C
escaped); a proto2 file's enums are `closed`.
Field names stay the .proto names, also when they are Python keywords (`from`); the
generator gives such fields a safe Python attribute (`from_`).

Not supported (clear error naming the construct and its file:line:column): proto2 groups,
extensions declared in an input file (custom options, extensions of google.protobuf.*Options,
are fine: they add no field to a message), editions syntax.
"""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from mrpcd.marshal.schema import Enum, Field, Message, Method, Schema, SchemaError, Service, TypeRef

if TYPE_CHECKING:  # (protoc's descriptor classes: imported where protoc has run)
    from google.protobuf.descriptor_pb2 import DescriptorProto, EnumDescriptorProto, FileDescriptorProto

__all__ = ["StubgenError", "ProtoModule", "run_protoc", "parse", "build_modules", "well_known_include"]


class StubgenError(Exception):
    """A user-facing error: bad input, protoc failure, unsupported proto feature."""


@dataclass
class ProtoModule:
    """Everything the generator needs for one input file."""

    proto: str  # the file's name as protoc knows it (relative to its -I dir)
    path: str  # the path given on the command line
    package: str
    schema: Schema
    services: list[str]  # full names of the services declared in this file, in order
    # full type name -> full name of the enclosing message, or None for top-level types
    parents: dict[str, str | None] = field(default_factory=dict)
    # full type name -> .proto file declaring it
    files: dict[str, str] = field(default_factory=dict)
    # dotted name of a type, field, enum value, service or method -> "file:line:column"
    locate: Callable[[str], str] | None = field(default=None, repr=False)

    def where(self, name: str) -> str:
        """Where `name` is declared, for errors (the input file when that is not known)."""
        return (self.locate(name) if self.locate else None) or self.proto


# FieldDescriptorProto.Type numbers -> schema kinds
_KINDS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32",
    8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32", 16: "sfixed64",
    17: "sint32", 18: "sint64",
}
_TYPE_GROUP, _TYPE_MESSAGE, _TYPE_ENUM = 10, 11, 14
_LABEL_OPTIONAL, _LABEL_REQUIRED, _LABEL_REPEATED = 1, 2, 3


def well_known_include() -> str:
    """grpcio-tools' bundled include dir (google/protobuf/*.proto)."""
    import grpc_tools

    return os.path.join(os.path.dirname(os.path.abspath(grpc_tools.__file__)), "_proto")


def _virtual_name(path: str, includes: list[str]) -> str | None:
    """The name protoc gives an input file: its path relative to the first -I dir holding it."""
    real = os.path.realpath(path)
    for inc in includes:
        base = os.path.realpath(inc)
        rel = os.path.relpath(real, base)
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir and not os.path.isabs(rel):
            return rel.replace(os.sep, "/")
    return None


def run_protoc(protos: list[str], includes: list[str] | None = None):
    """Run protoc on `protos`; returns (FileDescriptorSet, [protoc names of the inputs]).

    Raises StubgenError with protoc's own messages (file:line:column: text) on failure.
    """
    try:
        from google.protobuf import descriptor_pb2
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - a broken install
        raise StubgenError(f"grpcio-tools is needed to parse .proto files ({exc}); pip install grpcio-tools") from None

    includes = list(includes or [])
    for inc in includes:
        if not os.path.isdir(inc):
            raise StubgenError(f"include directory {inc}: not a directory")
    for p in protos:
        if not os.path.exists(p):
            raise StubgenError(f"{p}: no such file")
        if not os.path.isfile(p):
            raise StubgenError(f"{p}: not a file")
        if not p.endswith(".proto"):
            raise StubgenError(f"{p}: not a .proto file")
    # A file outside every -I dir the user gave: its own directory is searched (as protoc
    # does with no -I), and names it. Those directories come after the user's, deepest first:
    # protoc names an input after the first -I holding it, and a file's own directory must
    # win over another file's directory above it, whatever the order of the arguments.
    own = []
    for p in protos:
        if _virtual_name(p, includes) is None:
            d = os.path.realpath(os.path.dirname(os.path.abspath(p)))
            if d not in own:
                own.append(d)
    own.sort(key=lambda d: d.count(os.sep), reverse=True)
    includes += own
    wk = well_known_include()
    names = []
    for p in protos:
        name = _virtual_name(p, includes)
        assert name is not None
        names.append(name)

    with tempfile.TemporaryDirectory(prefix="mrpcd-stubgen-") as tmp:
        out = os.path.join(tmp, "set.pb")
        # source info: the line and column of what we refuse (_where)
        args = ["protoc", f"--descriptor_set_out={out}", "--include_imports", "--include_source_info"]
        # protoc matches -I dirs as string prefixes: give it real paths on both sides
        args += [f"-I{os.path.realpath(inc)}" for inc in includes] + [f"-I{wk}"]
        args += [os.path.realpath(p) for p in protos]
        rc, text = _call_protoc(protoc.main, args)
        if rc != 0 or not os.path.exists(out):
            msg = text.strip() or f"protoc exited with status {rc}"
            for p in protos:  # name the files as the user did
                msg = msg.replace(os.path.realpath(p), p)
            raise StubgenError(f"protoc could not compile {', '.join(protos)}:\n{msg}{_import_hint(msg, includes)}")
        if text.strip():  # warnings (e.g. unused imports): pass them on
            for p in protos:
                text = text.replace(os.path.realpath(p), p)
            print(text.rstrip(), file=sys.stderr)
        fds = descriptor_pb2.FileDescriptorSet()
        with open(out, "rb") as f:
            fds.ParseFromString(f.read())
    return fds, names


def _import_hint(msg: str, includes: list[str]) -> str:
    """What to do about imports protoc did not find ("x/y.proto: File not found."): they are
    looked up under the -I directories, by the path the import statement gives."""
    missing = [line[: -len(": File not found.")] for line in msg.splitlines() if line.endswith(": File not found.")]
    if not missing:
        return ""
    where = ", ".join(includes) if includes else "none given"
    return (f"\nhint: an import \"{missing[0]}\" is looked up as DIR/{missing[0]} for each -I DIR "
            f"(searched: {where}; google/protobuf/*.proto are built in): add -I with the directory "
            f"that holds {missing[0]}")


def _call_protoc(fn, args: list[str]) -> tuple[int, str]:
    """Run protoc in-process with its stderr (C++ level, fd 2) captured."""
    with tempfile.TemporaryFile() as errf:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(errf.fileno(), 2)
            try:
                rc = fn(args)
            finally:
                os.dup2(saved, 2)
        finally:
            os.close(saved)
        errf.seek(0)
        return rc, errf.read().decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# descriptors -> schema


@dataclass
class _Decl:
    kind: str  # "message" / "enum"
    full: str
    proto: DescriptorProto | EnumDescriptorProto
    file: FileDescriptorProto
    parent: str | None
    map_entry: bool = False
    path: tuple[int, ...] = ()  # its SourceCodeInfo path in its file (_where)


def _index(fds) -> tuple[dict[str, _Decl], dict[str, FileDescriptorProto]]:
    decls: dict[str, _Decl] = {}
    files: dict[str, FileDescriptorProto] = {}

    # SourceCodeInfo paths: FileDescriptorProto.message_type = 4, .enum_type = 5;
    # DescriptorProto.nested_type = 3, .enum_type = 4
    def walk_msg(m, prefix: str, fd, parent: str | None, path: tuple[int, ...]) -> None:
        full = f"{prefix}{m.name}"
        decls[full] = _Decl("message", full, m, fd, parent, m.options.map_entry, path)
        for i, e in enumerate(m.enum_type):
            decls[f"{full}.{e.name}"] = _Decl("enum", f"{full}.{e.name}", e, fd, full, path=path + (4, i))
        for i, n in enumerate(m.nested_type):
            walk_msg(n, full + ".", fd, full, path + (3, i))

    for fd in fds.file:
        files[fd.name] = fd
        prefix = f"{fd.package}." if fd.package else ""
        for i, e in enumerate(fd.enum_type):
            decls[prefix + e.name] = _Decl("enum", prefix + e.name, e, fd, None, path=(5, i))
        for i, m in enumerate(fd.message_type):
            walk_msg(m, prefix, fd, None, (4, i))
    return decls, files


def _line(fd, path: tuple[int, ...]) -> tuple[int, int] | None:
    """(line, column), from 1, of the declaration at SourceCodeInfo `path` in `fd`."""
    for loc in fd.source_code_info.location:
        if tuple(loc.path) == path and len(loc.span) >= 2:
            return loc.span[0] + 1, loc.span[1] + 1
    return None


def _where(fd, path: tuple[int, ...]) -> str:
    """`file:line:column` of that declaration (protoc's own form for errors), or just the
    file when protoc gave no location for it."""
    at = _line(fd, path)
    return f"{fd.name}:{at[0]}:{at[1]}" if at else fd.name


def _ref(type_name: str) -> str:
    return type_name[1:] if type_name.startswith(".") else type_name


def _check_file(fd) -> None:
    if fd.syntax == "editions":
        # (FileDescriptorProto.syntax = 12: the location of the `edition = ...` statement)
        raise StubgenError(f"{_where(fd, (12,))}: protobuf editions are not supported (use syntax = \"proto3\" or \"proto2\")")


def _is_option(ext) -> bool:
    """A custom option (`extend google.protobuf.FieldOptions { ... }`): it annotates the .proto
    and adds no field to any message, so it needs no support."""
    extendee = ext.extendee.lstrip(".")
    return extendee.startswith("google.protobuf.") and extendee.endswith("Options")


def _check_no_extensions(fd) -> None:
    # (SourceCodeInfo paths: FileDescriptorProto.extension = 7, DescriptorProto.extension = 6)
    found: list[tuple[tuple[int, ...], str]] = [
        ((7, i), f"{x.extendee.lstrip('.')}.{x.name}") for i, x in enumerate(fd.extension) if not _is_option(x)]

    def walk(m, prefix: str, path: tuple[int, ...]) -> None:
        full = prefix + m.name
        found.extend((path + (6, i), f"{x.extendee.lstrip('.')}.{x.name} (declared in {full})")
                     for i, x in enumerate(m.extension) if not _is_option(x))
        for i, n in enumerate(m.nested_type):
            walk(n, full + ".", path + (3, i))

    for i, m in enumerate(fd.message_type):
        walk(m, f"{fd.package}." if fd.package else "", (4, i))
    if found:
        found.sort(key=lambda x: _line(fd, x[0]) or (0, 0))
        raise StubgenError(f"{_where(fd, found[0][0])}: extensions are not supported: {', '.join(n for _, n in found)}")


def _convert_message(d: _Decl, decls: dict[str, _Decl]) -> tuple[Message, list[str]]:
    """The schema Message for a declaration, and the type names its fields refer to."""
    m, fd = d.proto, d.file
    proto2 = fd.syntax in ("", "proto2")
    refs: list[str] = []
    fields = []

    def at(i: int) -> str:  # where field i is (only for errors: a scan of the file's locations)
        return _where(fd, d.path + (2, i))  # (DescriptorProto.field = 2)

    def typeref(f, where: str, i: int | None = None) -> TypeRef:
        if f.type == _TYPE_GROUP:
            raise StubgenError(f"{fd.name if i is None else at(i)}: {where}: proto2 groups are not supported (use a nested message field)")
        if f.type in (_TYPE_MESSAGE, _TYPE_ENUM):
            ref = _ref(f.type_name)
            if ref not in decls:
                raise StubgenError(f"{fd.name}: {where}: unknown type {ref}")
            refs.append(ref)
            return TypeRef("message" if f.type == _TYPE_MESSAGE else "enum", ref)
        try:
            return TypeRef(_KINDS[f.type])
        except KeyError:
            raise StubgenError(f"{fd.name}: {where}: unsupported field type {f.type}") from None

    for i, f in enumerate(m.field):
        where = f"{d.full}.{f.name}"
        oneof = None
        key = None
        if f.label == _LABEL_REPEATED:
            entry = decls.get(_ref(f.type_name)) if f.type == _TYPE_MESSAGE else None
            if entry is not None and entry.map_entry:
                kf = {x.number: x for x in entry.proto.field}
                key = typeref(kf[1], where + " (map key)")
                vtype = typeref(kf[2], where + " (map value)")
                fields.append(Field(f.name, f.number, vtype, "map", key))
                continue
            label = "repeated"
        elif f.proto3_optional:
            label = "optional"
        elif f.HasField("oneof_index"):
            label = "single"
            oneof = m.oneof_decl[f.oneof_index].name
        elif proto2 and f.label == _LABEL_OPTIONAL:
            label = "optional"
        else:
            label = "single"
        ref = typeref(f, where, i)
        required = proto2 and f.label == _LABEL_REQUIRED and ref.kind == "message"
        default = _default(f, ref, decls, f"{at(i)}: {where}") if f.HasField("default_value") else None
        fields.append(Field(f.name, f.number, ref, label, key, oneof, required, default))
    return Message(d.full, tuple(fields)), refs


def _default(f, ref: TypeRef, decls: dict[str, _Decl], where: str) -> Any:
    """A proto2 `[default = X]` as the schema keeps it, from protoc's text of it
    (FieldDescriptorProto.default_value: numbers as written, floats also inf / -inf / nan,
    bools true / false, strings as they are, bytes C-escaped, enums by value name)."""
    text = f.default_value
    try:
        if ref.kind == "enum":
            for v in decls[ref.ref_name].proto.value:  # type: ignore[union-attr]  # (an enum's _Decl)
                if v.name == text:
                    return v.number
            raise ValueError(f"{ref.ref} has no value {text}")
        if ref.kind in ("double", "float"):
            return float(text)  # (Python reads inf, -inf and nan as protoc writes them)
        if ref.kind == "bool":
            return {"true": True, "false": False}[text]
        if ref.kind == "string":
            return text
        if ref.kind == "bytes":
            from google.protobuf import text_encoding

            return bytes(text_encoding.CUnescape(text))
        return int(text)  # (protoc writes them in decimal, also those given in hex)
    except (ValueError, KeyError) as exc:  # pragma: no cover - protoc has checked the text
        raise StubgenError(f"{where}: cannot read the default value {text!r}: {exc}") from None


def _public_closure(fd, files: dict[str, FileDescriptorProto]) -> list[FileDescriptorProto]:
    out, todo, seen = [], [fd], {fd.name}
    while todo:
        cur = todo.pop()
        for i in cur.public_dependency:
            dep = files.get(cur.dependency[i])
            if dep is not None and dep.name not in seen:
                seen.add(dep.name)
                out.append(dep)
                todo.append(dep)
    return out


def _locator(decls: dict[str, _Decl], files: dict[str, FileDescriptorProto]) -> Callable[[str], str]:
    """`file:line:column` of a type, field, enum value, service or method by its dotted name
    (for the generator's errors: a scan of the file's locations, only when one is raised)."""
    def locate(name: str) -> str:
        d = decls.get(name)
        if d is not None:
            return _where(d.file, d.path)
        parent, _, member = name.rpartition(".")
        d = decls.get(parent)
        if d is not None:  # DescriptorProto.field = 2, EnumDescriptorProto.value = 2
            items = d.proto.field if d.kind == "message" else d.proto.value  # type: ignore[union-attr]
            for i, x in enumerate(items):
                if x.name == member:
                    return _where(d.file, d.path + (2, i))
            return _where(d.file, d.path)
        for fd in files.values():  # FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2
            prefix = f"{fd.package}." if fd.package else ""
            for i, svc in enumerate(fd.service):
                if prefix + svc.name == name:
                    return _where(fd, (6, i))
                if prefix + svc.name == parent:
                    for j, m in enumerate(svc.method):
                        if m.name == member:
                            return _where(fd, (6, i, 2, j))
        return ""
    return locate


def build_modules(fds, main_names: list[str], paths: list[str] | None = None) -> list[ProtoModule]:
    """One ProtoModule per input file, from protoc's FileDescriptorSet."""
    decls, files = _index(fds)
    locate = _locator(decls, files)
    order = {name: i for i, name in enumerate(decls)}  # declaration order, files topological
    modules = []
    for k, main in enumerate(main_names):
        fd = files.get(main)
        if fd is None:
            raise StubgenError(f"{main}: protoc did not describe this file")
        _check_file(fd)
        _check_no_extensions(fd)
        roots = [n for n, d in decls.items() if d.file is fd and not d.map_entry]
        for pub in _public_closure(fd, files):
            roots += [n for n, d in decls.items() if d.file is pub and not d.map_entry]
        services = []
        prefix = f"{fd.package}." if fd.package else ""
        for s in fd.service:
            full = prefix + s.name
            methods = []
            for x in s.method:
                inp, outp = _ref(x.input_type), _ref(x.output_type)
                roots += [inp, outp]
                methods.append(Method(x.name, inp, outp, bool(x.client_streaming), bool(x.server_streaming), full))
            services.append(Service(full, tuple(methods)))

        messages: dict[str, Message] = {}
        enums: dict[str, Enum] = {}
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            name = todo.pop(0)  # declaration order: the first error in the file is the one reported
            if name in seen:
                continue
            seen.add(name)
            d = decls.get(name)
            if d is None:
                raise StubgenError(f"{fd.name}: unknown type {name}")
            if d.parent is not None:
                todo.append(d.parent)
            if d.file is not fd:
                _check_file(d.file)
            if d.kind == "enum":
                # a proto2 file's enum is closed, a proto3 one's open (protobuf's rule; a
                # proto2 message's field of a proto3 enum keeps unknown values)
                enums[name] = Enum(name, tuple((v.name, v.number) for v in d.proto.value),
                                   closed=d.file.syntax in ("", "proto2"))
                continue
            msg, refs = _convert_message(d, decls)
            messages[name] = msg
            todo += refs
        schema = Schema(
            messages={n: messages[n] for n in sorted(messages, key=order.__getitem__)},
            enums={n: enums[n] for n in sorted(enums, key=order.__getitem__)},
            services={s.full_name: s for s in services},
        )
        try:  # validate exactly as an app's daemon will
            Schema.from_dict(schema.to_dict())
        except SchemaError as exc:
            raise StubgenError(f"{fd.name}: {exc}") from None
        names = set(messages) | set(enums)
        modules.append(ProtoModule(
            proto=fd.name,
            path=paths[k] if paths else fd.name,
            package=fd.package,
            schema=schema,
            services=[s.full_name for s in services],
            parents={n: decls[n].parent for n in names},
            files={n: decls[n].file.name for n in names},
            locate=locate,
        ))
    return modules


def parse(protos: list[str], includes: list[str] | None = None) -> list[ProtoModule]:
    """Parse .proto files (one protoc run); one ProtoModule per file, in order."""
    fds, names = run_protoc(protos, includes)
    return build_modules(fds, names, protos)
