"""Schema evolution between two daemons, sans-I/O: compatibility and transcoding plans.

Two apps may serve / call one service from different versions of its .proto (a rolling
upgrade). Their schema closures (``Schema.closure``) then differ. Protobuf's evolution
rules work by FIELD NUMBER, while our payload is positional (a msgpack array of the fields
in declaration order), so the receiving daemon transcodes: it decodes a payload with the
peer's schema, maps the fields by number into its own app's layout, and encodes it with
its app's schema.

Compatible (by field number, checked both ways so both daemons reach one verdict):

* a field renamed, added or removed, declarations reordered; enum values added/removed;
* a method only one side has (calls to it get UNIMPLEMENTED, as ever).

Refused (strict): a field number present on both sides with a different kind (``int32``
vs ``int64`` too), label (single / optional / repeated / map), map key kind, enum or
message type (by full name), oneof membership (in a oneof on one side only, or members of
one oneof on one side spread over several on the other), ``required`` flag; a required
field one side lacks; a method present on both sides whose input / output type or
streaming kind differs.

Fields the peer lacks get the local default exactly as the local codec encodes an unset
field (``encode_plain`` fills missing keys with ``_Gen.default_expr``); fields only the
peer has are dropped.
"""
from __future__ import annotations

from typing import Any, Callable

from .codec import DecodeError, EncodeError, decode_plain, encode_plain
from .schema import Field, Schema, SchemaError

__all__ = ["TranscodeError", "closure_schema", "compare", "MethodPlan", "ServicePlan", "plan_service",
           "Transcoder", "describe_field"]


class TranscodeError(ValueError):
    """A payload from the peer does not decode with the peer's schema, or does not encode
    with the local one (e.g. a value the local oneof / required rules refuse)."""


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


def _field_diff(pf: Field, lf: Field) -> bool:
    """True if a field number's two declarations are not compatible (names do not count)."""
    return (pf.type != lf.type or pf.label != lf.label or pf.key != lf.key
            or (pf.oneof is None) != (lf.oneof is None) or pf.required != lf.required)


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
# A message's mapping: [(local name, peer name, label, nested message name or None)] for the
# fields both sides have; nested is None when the value can be passed as it is.
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
    (same field numbers in the same positions, recursively): no transcoding needed."""
    def own(n: str) -> bool:
        a, b = peer.messages[n].fields, local.messages[n].fields
        return len(a) == len(b) and all(x.number == y.number for x, y in zip(a, b))

    def children(n: str) -> list[str]:
        return [f.type.ref_name for f in local.messages[n].fields if f.type.kind == "message"]

    return _closure_same(name, memo, own, children)


def _dict_same(peer: Schema, local: Schema, name: str, memo: dict[str, bool]) -> bool:
    """The peer's decoded dict of `name` can be given to the local encoder as it is: every
    name means the same field number on both sides (recursively)."""
    def own(n: str) -> bool:
        a = {f.name: f.number for f in peer.messages[n].fields}
        b = {f.name: f.number for f in local.messages[n].fields}
        a_num = {num: x for x, num in a.items()}
        return (all(a.get(x, num) == num for x, num in b.items()) and all(b.get(x, num) == num for x, num in a.items())
                and all(a_num.get(num, x) == x for x, num in b.items()))

    def children(n: str) -> list[str]:
        a = {f.name for f in peer.messages[n].fields}
        return [f.type.ref_name for f in local.messages[n].fields if f.type.kind == "message" and f.name in a]

    return _closure_same(name, memo, own, children)


class Transcoder:
    """Peer payload of message `name` → local payload (bytes → bytes). Raises TranscodeError."""

    __slots__ = ("peer", "local", "name", "maps")

    def __init__(self, peer: Schema, local: Schema, name: str, maps: dict[str, _Mapping | None]) -> None:
        self.peer, self.local, self.name, self.maps = peer, local, name, maps

    def convert(self, value: dict) -> dict:
        return _convert(self.maps, self.name, value)

    def __call__(self, data: Any) -> bytes:
        try:
            value = decode_plain(self.peer, self.name, data)
        except (DecodeError, SchemaError) as exc:
            raise TranscodeError(f"the peer's {self.name} does not decode with the peer's schema: {exc}") from None
        try:
            value = _convert(self.maps, self.name, value)
        except RecursionError:
            raise TranscodeError(f"the peer's {self.name} is nested too deeply") from None
        try:
            return encode_plain(self.local, self.name, value)
        except (EncodeError, TypeError, ValueError) as exc:
            raise TranscodeError(f"the peer's {self.name} does not fit this side's schema: {exc}") from None


def _convert(maps: dict[str, _Mapping | None], name: str, d: dict) -> dict:
    m = maps[name]
    if m is None:
        return d
    out = {}
    for lname, pname, label, sub in m:
        v = d[pname]
        if sub is not None and v is not None:
            if label == "repeated":
                v = [_convert(maps, sub, x) for x in v]
            elif label == "map":
                v = {k: _convert(maps, sub, x) for k, x in v.items()}
            else:
                v = _convert(maps, sub, v)
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
            m.append((lf.name, pf.name, lf.label, sub))
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
    pm = {m.name: m for m in peer.services[service].methods}
    methods: dict[int, MethodPlan] = {}

    def transcoder(name: str) -> Transcoder | None:
        if _wire_same(peer, local, name, wire_memo):
            return None
        _mappings(peer, local, name, maps, dict_memo)
        return Transcoder(peer, local, name, maps)

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
