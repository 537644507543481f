"""Generated fast transcoders (the fast path of ``evolve.Transcoder``).

The reference transcoder (``Transcoder.reference``) decodes a peer payload into dicts with
the peer's schema, renames / converts them (``evolve._convert``) and encodes the dicts with
the local schema: three Python passes and a dict per message, ~2.5 µs per small
sub-message. Here, for one (peer schema, local schema) pair, each message reached gets ONE
generated function that works on the lists msgpack unpacks (a message is an array of its
fields in declaration order) and returns the local layout as a tuple for msgpack to pack:
it checks every value as the peer's decoder would AND as the local encoder would (a kind
changed compatibly: the intersection of both ranges), converts what changed kind, fills
in the local defaults, and drops the peer-only fields (still checked: the reference
refuses a payload whose dropped field is malformed, and so must this).

It is exact by construction where it succeeds, and it never reports a failure itself: any
value it does not accept raises (``_Slow``, or whatever a conversion raises), and the
caller then runs the reference transcoder on the same payload, which either produces the
exact same TranscodeError as before (message text included), or, should the fast path
ever be stricter than the reference, the right output. tests/test_evolve_fast.py feeds
both the same random valid and mutated payloads over random schema pairs.

Generated source holds no name from either schema (only numbers, generated identifiers
and constants bound in its namespace), so a peer's schema cannot inject code.
"""
from __future__ import annotations

import gc
from typing import Any, Callable

import msgpack

from .codec import MAX_DEPTH, _econv, _enum_default, _plain_fn, _scalar_default
from .schema import INT_RANGES, Field, Schema, TypeRef

__all__ = ["FastGen"]

_RANGES: dict[str, tuple[int, int]] = dict(INT_RANGES, enum=INT_RANGES["int32"])
_FLOATS = frozenset({"double", "float"})
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_unpackb = msgpack.unpackb


class _Slow(Exception):
    """The fast path does not take this payload: run the reference transcoder."""


def _flt(y: Any) -> float:
    """A float field's value as the peer's decoder makes it (an int becomes a float)."""
    if y.__class__ is float:
        return y
    if y.__class__ is int:
        return float(y)
    raise _Slow


class FastGen:
    """Generates and caches the transcoding functions of one (peer, local) schema pair,
    for every message reachable from the ones asked for (they share one namespace)."""

    def __init__(self, peer: Schema, local: Schema) -> None:
        self.peer, self.local = peer, local
        self.ns: dict[str, Any] = {"_SL": _Slow, "_flt": _flt, "MAXD": MAX_DEPTH - 1}
        self.index: dict[str, int] = {}
        self.peer_dec: dict[str, str] = {}
        self.done: set[str] = set()
        self.nconst = 0
        self.ok = True  # False: a local default the local encoder would refuse (never seen)

    def const(self, value: Any) -> str:
        self.nconst += 1
        name = f"_K{self.nconst}"
        self.ns[name] = value
        return name

    def fid(self, name: str) -> int:
        if name not in self.index:
            self.index[name] = len(self.index)
        return self.index[name]

    def pdec(self, name: str) -> str:
        """The peer's own plain decoder of `name` (validates a field this side drops)."""
        if name not in self.peer_dec:
            key = self.peer_dec[name] = f"_PD{len(self.peer_dec)}"
            self.ns[key] = _plain_fn(self.peer, name, "_d")
        return self.peer_dec[name]

    def function(self, name: str) -> Callable[[Any], bytes] | None:
        """bytes (the peer's encoding of message `name`) → bytes (the local encoding).
        Raises (anything) where the reference transcoder must decide; None if this pair
        cannot have a fast path (then every payload takes the reference one)."""
        self.compile(name)
        if not self.ok:
            return None
        t = self.ns[f"_t{self.index[name]}"]
        pack, unpackb = _pack, _unpackb

        def fast(data: Any) -> bytes:
            # No cyclic GC while a message's lists are made: unpacking 4 M small arrays
            # otherwise runs the collector over them again and again (2/3 of the time),
            # though nothing here makes a cycle.
            was = gc.isenabled()
            gc.disable()
            try:
                return pack(t(unpackb(data, raw=False, strict_map_key=False), 0))
            finally:
                if was:
                    gc.enable()
        return fast

    def compile(self, root: str) -> None:
        todo = [root]
        lines: list[str] = []
        while todo:
            name = todo.pop()
            if name in self.done:
                continue
            self.done.add(name)
            lines += self.message(name, todo)
        if lines:
            exec(compile("\n".join(lines) + "\n", "<mrpcd.evolve fast>", "exec"), self.ns)

    # -- one message -----------------------------------------------------------------
    def message(self, name: str, todo: list[str]) -> list[str]:
        pm, lm = self.peer.messages[name], self.local.messages[name]
        k = self.fid(name)
        lby = {f.number: (i, f) for i, f in enumerate(lm.fields)}
        pby = {f.number: i for i, f in enumerate(pm.fields)}
        n = len(pm.fields)
        L = [f"def _t{k}(v, d):",
             f"    if v.__class__ is not list or len(v) != {n}:",
             "        raise _SL"]
        if any(f.type.kind == "message" for f in pm.fields) or any(f.type.kind == "message" for f in lm.fields):
            L += ["    if d > MAXD:", "        raise _SL"]
        if n:
            L.append(f"    {', '.join(f'p{i}' for i in range(n))}, = v")
        for i, pf in enumerate(pm.fields):
            hit = lby.get(pf.number)
            lf = hit[1] if hit is not None else None
            if lf is not None and lf.type.kind == "message":
                todo.append(lf.type.ref_name)
            L += ["    " + s for s in self.field(pf, lf, f"p{i}")]
        L += self.oneofs(pm.fields, [f"p{i}" for i in range(n)])
        L += [f"    if p{i} is None:\n        raise _SL" for i, f in enumerate(pm.fields) if f.required]
        # the local side: its values in its order, defaults for what the peer lacks
        out: list[str] = []
        local_vars: list[str | None] = []
        for lf in lm.fields:
            j = pby.get(lf.number)
            if j is not None:
                out.append(f"p{j}")
                local_vars.append(f"p{j}")
            else:
                out.append(self.const(self.default(lf, f"{name}.{lf.name}")))
                local_vars.append(None)
                if lf.required:
                    self.ok = False  # (compare refuses this)
        L += self.oneofs(lm.fields, local_vars)
        L += [f"    if {x} is None:\n        raise _SL" for f, x in zip(lm.fields, local_vars) if f.required and x]
        if [f.number for f in pm.fields] == [f.number for f in lm.fields] and not any(
                line.lstrip().startswith(f"p{i} = ") for i in range(n) for line in L):
            L.append("    return v")  # (the same layout, nothing converted: the peer's list as it is)
        else:
            L.append(f"    return ({', '.join(out)},)" if out else "    return ()")
        return L

    def flat_check(self, name: str, y: str) -> str | None:
        """For a message both sides lay out alike, of scalars only that need no conversion:
        one expression true when `y` is not such a message (the caller inlines it in its
        loop over many of them: no call per element). None for any other message."""
        pm, lm = self.peer.messages[name], self.local.messages[name]
        if len(pm.fields) != len(lm.fields):
            return None
        parts = [f"{y}.__class__ is not list", f"len({y}) != {len(pm.fields)}"]
        for i, (pf, lf) in enumerate(zip(pm.fields, lm.fields)):
            if (pf.number != lf.number or pf.label != "single" and pf.label != "optional" or lf.label != pf.label
                    or pf.type.kind == "message" or pf.oneof is not None or lf.oneof is not None):
                return None
            x = f"{y}[{i}]"
            bad, conv, floaty = self.scalar(pf.type, lf.type, x)
            if conv is not None:
                return None
            # (floaty: an int in a float field is refused here: the reference converts it,
            # but no encoder makes one, so only such a rare payload takes the slow path)
            if pf.nullable and lf.nullable:
                bad = f"{x} is not None and ({bad})"
            parts.append(f"({bad})")
        return " or ".join(parts)

    def oneofs(self, fields: list[Field], names: list[str | None]) -> list[str]:
        groups: dict[str, list[str]] = {}
        for f, x in zip(fields, names):
            if f.oneof is not None and x is not None:
                groups.setdefault(f.oneof, []).append(x)
        return [f"    if {' + '.join(f'({x} is not None)' for x in xs)} > 1:\n        raise _SL"
                for xs in groups.values() if len(xs) > 1]

    def default(self, lf: Field, where: str) -> Any:
        """What the local encoder writes for a field the peer lacks (``_Gen.default_expr``);
        a scalar default is checked once here as the encoder would check it each time."""
        if lf.label == "repeated":
            return []
        if lf.label == "map":
            return {}
        if lf.nullable:
            return None
        if lf.default is not None:
            value = lf.default
        elif lf.type.kind == "enum":
            value = _enum_default(self.local, lf.type.ref)
        else:
            value = _scalar_default(lf.type.kind)
        try:
            got = _econv(value, where, lf.type.kind, lf.type.ref)
        except Exception:
            self.ok = False
            return value
        if got.__class__ is not value.__class__ or got != value:
            self.ok = False
        return value

    # -- one field ---------------------------------------------------------------------
    def scalar(self, pt: TypeRef, lt: TypeRef | None, y: str) -> tuple[str, str | None, bool]:
        """(expression true when `y` is not taken, conversion expression or None, float?)
        for a value of peer type `pt` read as local type `lt` (None: dropped, only checked)."""
        pk, lk = pt.kind, (lt.kind if lt is not None else None)
        if pk in _RANGES:
            lo, hi = _RANGES[pk]
            if lk == "bool":
                return f"{y}.__class__ is not int or ({y} != 0 and {y} != 1)", f"{y} == 1", False
            if lk is not None and lk in _RANGES:
                lo, hi = max(lo, _RANGES[lk][0]), min(hi, _RANGES[lk][1])
            elif lk is not None:
                raise AssertionError(f"{pk} -> {lk}")  # (compare refuses it)
            return f"{y}.__class__ is not int or not {lo} <= {y} <= {hi}", None, False
        if pk == "bool":
            conv = f"int({y})" if lk is not None and lk in _RANGES else None
            if lk not in (None, "bool") and conv is None:
                raise AssertionError(f"{pk} -> {lk}")
            return f"{y}.__class__ is not bool", conv, False
        if pk in _FLOATS:
            if lk not in (None, pk):
                raise AssertionError(f"{pk} -> {lk}")
            return f"{y}.__class__ is not float", None, True
        if pk == "string":
            if lk not in (None, "string", "bytes"):
                raise AssertionError(f"{pk} -> {lk}")
            return f"{y}.__class__ is not str", (f"{y}.encode()" if lk == "bytes" else None), False
        if pk == "bytes":
            if lk not in (None, "string", "bytes"):
                raise AssertionError(f"{pk} -> {lk}")
            # (invalid UTF-8 raises UnicodeDecodeError: the reference names it)
            return f"{y}.__class__ is not bytes", (f"{y}.decode()" if lk == "string" else None), False
        raise AssertionError(pk)

    def field(self, pf: Field, lf: Field | None, x: str) -> list[str]:
        """Check the peer value `x` (a local variable) and make it the local value in place."""
        t = pf.type
        if pf.label == "repeated":
            L = [f"if {x}.__class__ is not list:", "    raise _SL"]
            if t.kind == "message":
                if lf is None:
                    return L + [f"for y in {x}:", f"    {self.pdec(t.ref_name)}(y, d + 1)"]
                flat = self.flat_check(t.ref_name, "y")
                if flat is not None:
                    return L + [f"for y in {x}:", f"    if {flat}:", "        raise _SL"]
                return L + [f"{x} = [_t{self.fid(t.ref_name)}(y, d + 1) for y in {x}]"]
            bad, conv, floaty = self.scalar(t, lf.type if lf else None, "y")
            if floaty:
                return L + [f"for y in {x}:", f"    if {bad}:", f"        {x} = [_flt(y) for y in {x}]", "        break"]
            L += [f"for y in {x}:", f"    if {bad}:", "        raise _SL"]
            if conv is not None:
                L.append(f"{x} = [{conv} for y in {x}]")
            return L
        if pf.label == "map":
            assert pf.key is not None
            kbad, kconv, _ = self.scalar(pf.key, lf.key if lf is not None else None, "k_")
            kout = kconv or "k_"
            L = [f"if {x}.__class__ is not dict:", "    raise _SL",
                 f"for k_ in {x}:", f"    if {kbad}:", "        raise _SL"]
            if t.kind == "message":
                if lf is None:
                    return L + [f"for y in {x}.values():", f"    {self.pdec(t.ref_name)}(y, d + 1)"]
                flat = self.flat_check(t.ref_name, "y")
                if flat is not None:
                    L += [f"for y in {x}.values():", f"    if {flat}:", "        raise _SL"]
                    return L + ([f"{x} = {{{kout}: y for k_, y in {x}.items()}}"] if kconv is not None else [])
                return L + [f"{x} = {{{kout}: _t{self.fid(t.ref_name)}(y, d + 1) for k_, y in {x}.items()}}"]
            bad, conv, floaty = self.scalar(t, lf.type if lf else None, "y")
            if floaty:
                L += [f"for y in {x}.values():", f"    if {bad}:",
                      f"        {x} = {{k_: _flt(y) for k_, y in {x}.items()}}", "        break"]
            else:
                L += [f"for y in {x}.values():", f"    if {bad}:", "        raise _SL"]
            if conv is not None or kconv is not None:
                L.append(f"{x} = {{{kout}: {conv or 'y'} for k_, y in {x}.items()}}")
            return L
        if t.kind == "message":  # (always nullable)
            call = (f"{self.pdec(t.ref_name)}({x}, d + 1)" if lf is None
                    else f"{x} = _t{self.fid(t.ref_name)}({x}, d + 1)")
            return [f"if {x} is not None:", f"    {call}"]
        bad, conv, floaty = self.scalar(t, lf.type if lf else None, x)
        L = [f"if {bad}:", f"    {x} = _flt({x})" if floaty else "    raise _SL"]
        if conv is not None:
            L.append(f"{x} = {conv}")
        # None is a value only where both sides have presence (else one side refuses it)
        if pf.nullable and (lf is None or lf.nullable):
            L = [f"if {x} is not None:"] + ["    " + s for s in L]
        return L
