"""Schema evolution between two daemons, sans-I/O: compatibility and transcoding plans.

Two apps may serve / call one service from different versions of its .proto (a rolling
upgrade). Their schema closures (``Schema.closure``) then differ. Protobuf's evolution
rules work by FIELD NUMBER, while our payload is positional (a msgpack array of the fields
in declaration order), so the receiving daemon transcodes: it decodes a payload with the
peer's schema, maps the fields by number into its own app's layout, and encodes it with
its app's schema.

Compatible (by field number, checked both ways so both daemons reach one verdict):

* a field renamed, added or removed, declarations reordered; enum values added/removed;
* a method only one side has (calls to it get UNIMPLEMENTED, as ever);
* a scalar kind changed within one of protobuf's compatible groups
  (https://protobuf.dev/programming-guides/proto3/#updating), for the value and for a map
  key alike: ``int32`` / ``uint32`` / ``int64`` / ``uint64`` / ``bool``; ``sint32`` /
  ``sint64``; ``fixed32`` / ``sfixed32``; ``fixed64`` / ``sfixed64``; ``string`` /
  ``bytes``; an enum and ``int32`` / ``uint32`` / ``int64`` / ``uint64``. (Not ``float`` /
  ``double``, not an enum and ``bool``, not two enums of different names: protobuf does
  not list those either.)

Values are converted while transcoding, and a value that does not fit the receiving side's
kind fails that one call (``TranscodeError``: INVALID_ARGUMENT for a request, INTERNAL for
a response) naming the field and the value. That is a deliberate difference from protobuf,
which silently truncates (an ``int64`` 2**40 read as ``int32`` is 0, an ``int32`` -1
read as ``uint32`` is 2**32 - 1): in a rolling upgrade a wrong quantity is worse than a
failed call. Likewise an integer becomes a ``bool`` only from 0 or 1 (protobuf reads any
non-zero value as true): so a bool travels to an integer field and back unchanged, and two
keys of a map never collapse into one. ``bytes`` become a ``string`` only when they are
valid UTF-8 (protobuf's parsers refuse invalid UTF-8 in a proto3 string too); a string
becomes its UTF-8 bytes. Enums are open, as the codec treats them: an integer that the
receiving enum does not name arrives as that number, if it is in the enum's (``int32``)
range. Integer-to-integer changes need no per-value code: the receiving side's encoder
range-checks every integer anyway, so they only cost a decode and an encode, and a change
whose every value fits (``int32`` → ``int64``, an enum → ``int64``, ...) costs nothing at
all when the field positions agree: the peer's bytes are already what the app decodes.

Refused (strict): a field number present on both sides with an incompatible kind
(``int32`` vs ``sint32``, ``string`` vs ``int32``, ``float`` vs ``double``, ...), label
(single / optional / repeated / map), map key kind, enum or message type (by full name),
oneof membership (in a oneof on one side only, or members of one oneof on one side spread
over several on the other), ``required`` flag; a required field one side lacks; a method
present on both sides whose input / output type or streaming kind differs.

Fields the peer lacks get the local default exactly as the local codec encodes an unset
field (``encode_plain`` fills missing keys with ``_Gen.default_expr``); fields only the
peer has are dropped.
"""
from __future__ import annotations

from typing import Any, Callable, cast

from .codec import DecodeError, EncodeError, decode_plain, encode_plain
from .evolve_gen import FastGen
from .schema import INT_RANGES, Field, Schema, SchemaError, TypeRef

__all__ = ["TranscodeError", "closure_schema", "compare", "MethodPlan", "ServicePlan", "plan_service",
           "Transcoder", "describe_field", "kinds_compatible"]


class TranscodeError(ValueError):
    """A payload from the peer does not decode with the peer's schema, or does not encode
    with the local one (e.g. a value the local oneof / required rules refuse, or a value of
    a kind changed compatibly that does not fit the local kind: 2**40 for an int32)."""


def closure_schema(closure: Any) -> tuple[Schema, str]:
    """A Schema (validated as untrusted input) and the service name from a closure's plain data
    (``Schema.closure(service)``, possibly after a msgpack round trip)."""
    if not isinstance(closure, dict):
        raise SchemaError("a schema closure must be a map")
    svc = closure.get("service")
    if not isinstance(svc, (list, tuple)) or len(svc) != 2:
        raise SchemaError("a schema closure needs its service as [name, methods]")
    schema = Schema.from_dict({"messages": closure.get("messages", []), "enums": closure.get("enums", []),
                               "services": [svc]})
    return schema, svc[0]


def describe_field(f: Field) -> str:
    """A field as .proto would declare it: 'repeated int32 ids', 'map<string, pkg.V> m'."""
    t = f.type.ref if f.type.ref else f.type.kind
    if f.label == "map":
        assert f.key is not None
        text = f"map<{f.key.kind}, {t}> {f.name}"
    elif f.label in ("repeated", "optional"):
        text = f"{f.label} {t} {f.name}"
    else:
        text = f"{t} {f.name}"
    if f.required:
        text = "required " + text
    if f.oneof is not None:
        text += f" (in oneof {f.oneof})"
    return text


# protobuf's groups of scalar kinds that may replace one another (proto3 guide, "Updating A
# Message Type"); an enum also goes with the four plain varint integers (not bool).
_GROUPS: dict[str, int] = {kind: i for i, group in enumerate((
    ("int32", "uint32", "int64", "uint64", "bool"), ("sint32", "sint64"), ("fixed32", "sfixed32"),
    ("fixed64", "sfixed64"), ("string", "bytes"))) for kind in group}
_ENUM_INTS = frozenset({"int32", "uint32", "int64", "uint64"})
# The range of every integer kind; an enum is open and takes any int32 (the codec's rule).
_RANGES: dict[str, tuple[int, int]] = dict(INT_RANGES, enum=INT_RANGES["int32"])


def kinds_compatible(a: TypeRef, b: TypeRef) -> bool:
    """True if a value of type `a` may be read as type `b` under protobuf's evolution rules
    (symmetric): the same type, two scalar kinds of one compatible group, or an enum and a
    plain varint integer. Transcoding converts such values and fails a call whose value
    does not fit (see the module docstring)."""
    if a == b:
        return True
    if a.kind == "enum" or b.kind == "enum":
        return (b.kind if a.kind == "enum" else a.kind) in _ENUM_INTS
    ga, gb = _GROUPS.get(a.kind), _GROUPS.get(b.kind)
    return ga is not None and ga == gb


def _field_diff(pf: Field, lf: Field) -> bool:
    """True if a field number's two declarations are not compatible (names do not count)."""
    if pf.label != lf.label or (pf.oneof is None) != (lf.oneof is None) or pf.required != lf.required:
        return True
    if not kinds_compatible(pf.type, lf.type):
        return True
    if pf.key is None or lf.key is None:
        return pf.key != lf.key
    return not kinds_compatible(pf.key, lf.key)


def _fits(peer: TypeRef | None, local: TypeRef | None) -> bool:
    """Every value the peer's codec accepts for `peer` is one the local codec accepts for
    `local`, in the same msgpack form: the peer's bytes need no transcoding for this field
    (equal types, or an integer range inside the other: int32 -> int64, an enum -> int64)."""
    if peer == local:
        return True
    assert peer is not None and local is not None  # (compare: a map on both sides or neither)
    pr, lr = _RANGES.get(peer.kind), _RANGES.get(local.kind)
    return pr is not None and lr is not None and lr[0] <= pr[0] and pr[1] <= lr[1]


class _Misfit(ValueError):
    """One value does not fit the local kind (the caller adds where it was)."""


def _int_to_bool(x: int) -> bool:
    """0 and 1 only: protobuf reads any non-zero value as true, which would lose the number
    (and collapse map keys 1 and 2 into one)."""
    if x == 0:
        return False
    if x == 1:
        return True
    raise _Misfit(f"value {x} does not fit bool (only 0 and 1 convert; protobuf would read it as true)")


def _bytes_to_str(x: bytes) -> str:
    try:
        return x.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Misfit(f"bytes {x!r:.60} are not valid UTF-8 for a string ({exc.reason} at {exc.start})") from None


def _str_to_bytes(x: str) -> bytes:
    return x.encode("utf-8")  # (a decoded string is valid UTF-8: msgpack's unpacker checked it)


def _value_fix(peer: TypeRef, local: TypeRef) -> Callable[[Any], Any] | None:
    """The conversion of one value of (compatible) type `peer` into what the local encoder
    takes for `local`; None when it takes the value as it is: equal types, or two integer
    kinds (an enum is an int here), which the encoder range-checks anyway, naming the field
    and the value when one does not fit. So no per-value code where the kinds are equal."""
    if peer == local:
        return None
    if local.kind == "bool" and peer.kind != "bool":
        return _int_to_bool
    if peer.kind == "bool" and local.kind != "bool":
        return int  # (the encoder refuses a bool for an integer kind)
    if peer.kind == "bytes" and local.kind == "string":
        return _bytes_to_str
    if peer.kind == "string" and local.kind == "bytes":
        return _str_to_bytes
    return None


def _field_fix(pf: Field, lf: Field, where: str) -> Callable[[Any], Any] | None:
    """The conversion of a whole field value (not None) whose kind changed compatibly: its
    values (not a message's: those are transcoded as messages) and, for a map, its keys.
    None when nothing needs converting. A value that does not fit raises TranscodeError
    naming `where` (message.field), the element and the value."""
    conv = None if lf.type.kind == "message" else _value_fix(pf.type, lf.type)
    kconv = _value_fix(pf.key, lf.key) if pf.key is not None and lf.key is not None else None
    if conv is None and kconv is None:
        return None
    if lf.label == "repeated":
        c = cast(Callable[[Any], Any], conv)

        def fix_list(v: list) -> list:
            try:
                return [c(x) for x in v]
            except _Misfit:
                for i, x in enumerate(v):
                    try:
                        c(x)
                    except _Misfit as exc:
                        raise TranscodeError(f"{where}[{i}]: {exc}") from None
                raise
        return fix_list
    if lf.label == "map":
        vc = conv or _same
        kc = kconv or _same

        def fix_map(v: dict) -> dict:
            out = {}
            for k, x in v.items():
                try:
                    k2 = kc(k)
                except _Misfit as exc:
                    raise TranscodeError(f"{where} (map key): {exc}") from None
                try:
                    out[k2] = vc(x)
                except _Misfit as exc:
                    raise TranscodeError(f"{where}[{k!r:.40}]: {exc}") from None
            return out
        return fix_map
    c1 = cast(Callable[[Any], Any], conv)

    def fix_one(v: Any) -> Any:
        try:
            return c1(v)
        except _Misfit as exc:
            raise TranscodeError(f"{where}: {exc}") from None
    return fix_one


def _same(x: Any) -> Any:
    return x


def _oneof_spread(a: Any, b: Any, a_side: str) -> list[str]:
    """Members of one oneof of `a` whose counterparts in `b` are in several oneofs."""
    out = []
    b_by_num = {f.number: f for f in b.fields}
    groups: dict[str, set[str]] = {}
    for f in a.fields:
        if f.oneof is not None and f.number in b_by_num and b_by_num[f.number].oneof is not None:
            groups.setdefault(f.oneof, set()).add(b_by_num[f.number].oneof)
    for g, other in sorted(groups.items()):
        if len(other) > 1:
            out.append(f"{a.full_name}: the members of oneof {g} on the {a_side} side are in several oneofs "
                       f"on the other ({', '.join(sorted(other))})")
    return out


def compare(peer: Schema, local: Schema, service: str) -> list[str]:
    """Why `service` cannot be spoken between `peer` and `local` (both closures' schemas);
    [] when it can. Symmetric in its verdict; texts say "peer" / "this side"."""
    reasons: list[str] = []
    pm = {m.name: m for m in peer.services[service].methods}
    lm = {m.name: m for m in local.services[service].methods}
    todo: list[str] = []
    for name in sorted(pm.keys() & lm.keys()):
        a, b = pm[name], lm[name]
        if a.input != b.input:
            reasons.append(f"method {service}.{name}: input type is {a.input} on the peer, {b.input} on this side")
        if a.output != b.output:
            reasons.append(f"method {service}.{name}: output type is {a.output} on the peer, {b.output} on this side")
        if (a.client_streaming, a.server_streaming) != (b.client_streaming, b.server_streaming):
            reasons.append(f"method {service}.{name}: {a.kind} on the peer, {b.kind} on this side")
        for n in (a.input, a.output):
            if n == b.input or n == b.output:
                todo.append(n)
    seen: set[str] = set()
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        a_msg, b_msg = peer.messages[name], local.messages[name]
        a_by = {f.number: f for f in a_msg.fields}
        b_by = {f.number: f for f in b_msg.fields}
        for num in sorted(a_by.keys() | b_by.keys()):
            pf, lf = a_by.get(num), b_by.get(num)
            if pf is not None and lf is not None:
                if _field_diff(pf, lf):
                    reasons.append(f"{name} field {num}: peer has {describe_field(pf)!r}, this side has {describe_field(lf)!r}")
                elif pf.type.kind == "message":
                    todo.append(pf.type.ref_name)
            elif pf is not None and pf.required:
                reasons.append(f"{name} field {num}: peer has {describe_field(pf)!r}, this side has no field {num}")
            elif lf is not None and lf.required:
                reasons.append(f"{name} field {num}: this side has {describe_field(lf)!r}, the peer has no field {num}")
        reasons += _oneof_spread(a_msg, b_msg, "peer")
        reasons += _oneof_spread(b_msg, a_msg, "this")
    return reasons


# -- plans ---------------------------------------------------------------------------------
# A message's mapping: [(local name, peer name, label, nested message name or None, fix or
# None)] for the fields both sides have; nested is None when the value can be passed as it
# is; fix converts a value (its scalars, a map's keys) whose kind changed compatibly.
_Mapping = list


def _closure_same(root: str, memo: dict[str, bool], own: Callable[[str], bool],
                  children: Callable[[str], list[str]]) -> bool:
    """True when `root` and every message it reaches (`children`, only asked of a message
    whose `own` test holds) pass `own`. Decided for the whole reachable set at once (the
    greatest fixed point): a provisional answer for a message on a cycle must not be
    remembered as final (A -> B -> A with A differing elsewhere: B differs too)."""
    if root in memo:
        return memo[root]
    found: dict[str, bool] = {}
    kids: dict[str, list[str]] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in memo or name in found:
            continue
        found[name] = own(name)
        kids[name] = children(name) if found[name] else []
        todo.extend(kids[name])
    changed = True
    while changed:
        changed = False
        for name, same in found.items():
            if same and not all(memo[c] if c in memo else found[c] for c in kids[name]):
                found[name] = False
                changed = True
    memo.update(found)
    return memo[root]


def _wire_same(peer: Schema, local: Schema, name: str, memo: dict[str, bool]) -> bool:
    """The peer's encoding of message `name` is byte-for-byte what the local codec expects
    (same field numbers in the same positions, every peer value valid for the local kind:
    equal types or an integer widened, recursively): no transcoding needed."""
    def own(n: str) -> bool:
        a, b = peer.messages[n].fields, local.messages[n].fields
        return len(a) == len(b) and all(x.number == y.number and _fits(x.type, y.type) and _fits(x.key, y.key)
                                        for x, y in zip(a, b))

    def children(n: str) -> list[str]:
        return [f.type.ref_name for f in local.messages[n].fields if f.type.kind == "message"]

    return _closure_same(name, memo, own, children)


def _dict_same(peer: Schema, local: Schema, name: str, memo: dict[str, bool]) -> bool:
    """The peer's decoded dict of `name` can be given to the local encoder as it is: every
    name means the same field number on both sides, and no value needs converting
    (integers changed kind at most: the encoder range-checks them), recursively."""
    def own(n: str) -> bool:
        a = {f.name: f.number for f in peer.messages[n].fields}
        b = {f.name: f.number for f in local.messages[n].fields}
        a_num = {num: x for x, num in a.items()}
        if not (all(a.get(x, num) == num for x, num in b.items()) and all(b.get(x, num) == num for x, num in a.items())
                and all(a_num.get(num, x) == x for x, num in b.items())):
            return False
        by_num = {f.number: f for f in peer.messages[n].fields}
        return all(_field_fix(by_num[f.number], f, "") is None for f in local.messages[n].fields if f.number in by_num)

    def children(n: str) -> list[str]:
        a = {f.name for f in peer.messages[n].fields}
        return [f.type.ref_name for f in local.messages[n].fields if f.type.kind == "message" and f.name in a]

    return _closure_same(name, memo, own, children)


class Transcoder:
    """Peer payload of message `name` → local payload (bytes → bytes). Raises TranscodeError.

    Two implementations of one function: `fast` (generated per schema pair,
    marshal/evolve_gen.py: one call per message on the unpacked lists, ~an order of
    magnitude cheaper per element, because the daemon transcodes on its only event loop)
    and `reference` (decode to dicts, rename / convert, encode: the definition). A call runs
    `fast`; a payload `fast` does not take (it never reports errors itself) runs
    `reference`, so every failure, and its message, is the reference's."""

    __slots__ = ("peer", "local", "name", "maps", "fast")

    def __init__(self, peer: Schema, local: Schema, name: str, maps: dict[str, _Mapping | None],
                 fast: Callable[[Any], bytes] | None = None) -> None:
        self.peer, self.local, self.name, self.maps = peer, local, name, maps
        self.fast = fast

    def convert(self, value: dict) -> dict:
        return _convert(self.maps, self.name, value)

    def __call__(self, data: Any) -> bytes:
        fast = self.fast
        if fast is not None:
            try:
                return fast(data)
            except Exception:  # anything it does not take: the reference decides (and words the error)
                pass
        return self.reference(data)

    def reference(self, data: Any) -> bytes:
        """The reference transcoder (slow: three passes, a dict per message)."""
        try:
            value = decode_plain(self.peer, self.name, data)
        except (DecodeError, SchemaError) as exc:
            raise TranscodeError(f"the peer's {self.name} does not decode with the peer's schema: {exc}") from None
        try:
            value = _convert(self.maps, self.name, value)
        except RecursionError:
            raise TranscodeError(f"the peer's {self.name} is nested too deeply") from None
        except TranscodeError as exc:  # a value of a kind changed compatibly does not fit
            raise TranscodeError(f"the peer's {self.name} does not fit this side's schema: {exc}") from None
        try:
            return encode_plain(self.local, self.name, value)
        except (EncodeError, TypeError, ValueError) as exc:
            raise TranscodeError(f"the peer's {self.name} does not fit this side's schema: {exc}") from None


def _convert(maps: dict[str, _Mapping | None], name: str, d: dict) -> dict:
    m = maps[name]
    if m is None:
        return d
    out = {}
    for lname, pname, label, sub, fix in m:
        v = d[pname]
        if sub is not None:
            if v is not None:
                if label == "repeated":
                    v = [_convert(maps, sub, x) for x in v]
                elif label == "map":
                    v = {k: _convert(maps, sub, x) for k, x in v.items()}
                    if fix is not None:  # (its keys' kind changed)
                        v = fix(v)
                else:
                    v = _convert(maps, sub, v)
        elif fix is not None and v is not None:
            v = fix(v)
        out[lname] = v
    return out


def _mappings(peer: Schema, local: Schema, root: str, maps: dict[str, _Mapping | None], same: dict[str, bool]) -> None:
    todo = [root]
    while todo:
        name = todo.pop()
        if name in maps:
            continue
        if _dict_same(peer, local, name, same):
            maps[name] = None
            continue
        by_num = {f.number: f for f in peer.messages[name].fields}
        m: _Mapping = []
        for lf in local.messages[name].fields:
            pf = by_num.get(lf.number)
            if pf is None:
                continue  # the local encoder fills in its default
            sub = None
            if lf.type.kind == "message" and not _dict_same(peer, local, lf.type.ref_name, same):
                sub = lf.type.ref_name
                todo.append(sub)
            m.append((lf.name, pf.name, lf.label, sub, _field_fix(pf, lf, f"{name}.{lf.name}")))
        maps[name] = m


class MethodPlan:
    """How to transcode one method's messages from the peer: `input` / `output` are None
    when the peer's encoding is already the local one."""

    __slots__ = ("path", "input", "output")

    def __init__(self, path: str, input: Transcoder | None, output: Transcoder | None) -> None:
        self.path, self.input, self.output = path, input, output


class ServicePlan:
    """A compatible service whose closures differ: the methods whose payloads need
    transcoding, by method id (methods with nothing to transcode are left out)."""

    def __init__(self, service: str, methods: dict[int, MethodPlan]) -> None:
        self.service = service
        self.methods = methods


def plan_service(peer: Schema, local: Schema, service: str) -> ServicePlan | None:
    """The transcoding plan for a service `compare` found compatible; None when every method
    both sides have already encodes alike (renames, a new method: nothing to do per record)."""
    wire_memo: dict[str, bool] = {}
    dict_memo: dict[str, bool] = {}
    maps: dict[str, _Mapping | None] = {}
    gen = FastGen(peer, local)
    pm = {m.name: m for m in peer.services[service].methods}
    methods: dict[int, MethodPlan] = {}

    def transcoder(name: str) -> Transcoder | None:
        if _wire_same(peer, local, name, wire_memo):
            return None
        _mappings(peer, local, name, maps, dict_memo)
        try:
            fast = gen.function(name)
        except Exception:  # (a generator bug may cost speed, never a plan: the reference still works)
            fast = None
        return Transcoder(peer, local, name, maps, fast)

    for lm in local.services[service].methods:
        if lm.name not in pm:
            continue
        inp, out = transcoder(lm.input), transcoder(lm.output)
        if inp is not None or out is not None:
            methods[lm.method_id] = MethodPlan(lm.path, inp, out)
    return ServicePlan(service, methods) if methods else None


def plan_services(peer_closures: dict[str, Any], local: Schema,
                  on_error: Callable[[str, str], None] | None = None) -> dict[int, MethodPlan]:
    """Plans for every service of `peer_closures` (already found compatible by the
    handshake) that `local` also has, merged by method id. A closure that no longer
    compares (the local app registered another schema since) is reported to `on_error`."""
    out: dict[int, MethodPlan] = {}
    for svc, closure in peer_closures.items():
        if svc not in local.services:
            continue
        try:
            peer, name = closure_schema(closure)
            if name != svc:
                raise SchemaError(f"closure names service {name}")
            reasons = compare(peer, local, svc)
            if reasons:
                raise SchemaError("; ".join(reasons))
            plan = plan_service(peer, local, svc)
        except SchemaError as exc:
            if on_error is not None:
                on_error(svc, str(exc))
            continue
        if plan is not None:
            out.update(plan.methods)
    return out
