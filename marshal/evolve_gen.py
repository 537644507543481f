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

Most of what is left after that is msgpack making and packing an object per element. So
the repeated and map fields that hold scalars, or messages of scalars only, are not
unpacked at all (`splice`): the payload is split into its fields (``_framing.skip``), and
such a field's bytes are checked in C (``_evolve.Run``: kinds, ranges, UTF-8, map keys not
twice, and that each item is in the one form msgpack's packer writes) and copied as they
are, or, when the messages' layout changed (fields reordered, added, dropped, an int read
as a bool, a string as bytes, ...), laid out again in C; a message field holding such runs
(down to level 4) is split alike; the other fields are unpacked and transcoded as above,
and the output is the local array header and each field's bytes in the local order.

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
from typing import Any, Callable, Sequence, cast

import msgpack

from . import _framing
from .codec import MAX_DEPTH, _econv, _enum_default, _plain_fn, _scalar_default
from .schema import INT_RANGES, Field, Schema, TypeRef

__all__ = ["FastGen"]

_RANGES: dict[str, tuple[int, int]] = dict(INT_RANGES, enum=INT_RANGES["int32"])
_FLOATS = frozenset({"double", "float"})
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_skip = _framing.skip
try:
    from . import _evolve as _ev
except ImportError:  # (not built: every field is unpacked)
    _ev = None  # type: ignore[assignment]  # (a module or None)
_unpackb = msgpack.unpackb


def _header(n: int) -> bytes:
    """msgpack's array header for `n` items, as the packer writes it."""
    return msgpack.Packer().pack_array_header(n)


def _split(m: memoryview, a: int, b: int, n: int) -> list[int]:
    """The offsets of the `n` items of the one array m[a:b] holds, and its end (== b);
    raises when it is anything else (the reference then says what is wrong)."""
    if a >= b:
        raise _Slow
    h = m[a]
    if 0x90 <= h <= 0x9F:
        count, pos = h & 0x0F, a + 1
    elif h == 0xDC:
        count, pos = int.from_bytes(m[a + 1:a + 3], "big"), a + 3
    elif h == 0xDD:
        count, pos = int.from_bytes(m[a + 1:a + 5], "big"), a + 5
    else:
        raise _Slow
    if count != n or pos > b:
        raise _Slow
    out = [pos]
    for _ in range(n):
        pos = _skip(m, pos)  # (bounds-checked against the whole buffer; past b: refused below)
        out.append(pos)
    if pos != b:
        raise _Slow
    return out


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
        self.ns: dict[str, Any] = {"_SL": _Slow, "_flt": _flt, "MAXD": MAX_DEPTH - 1, "_split": _split,
                                   "_unp": _unpackb, "_pack": _pack, "_NIL": b"\xc0"}
        self.splices: dict[tuple[str, int], str | None] = {}
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
        fname = self.splice(name, 0)
        if fname is not None:
            spliced = self.splicer(fname)
            return spliced if self.ok else None
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

    # -- runs copied as they are ---------------------------------------------------------
    def spec(self, pf: Field, lf: Field | None) -> tuple[tuple[int, bool, int, int], int] | None:
        """(`Run` spec, conversion C_*) of a single or repeated scalar field checked as
        bytes (lf None: dropped, checked as the peer's); None if it cannot be."""
        if pf.type.kind == "message" or pf.label == "map":
            return None
        if lf is not None and (pf.label != lf.label or lf.type.kind == "message"):
            return None
        return self.tspec(pf.type, lf.type if lf is not None else None, pf.nullable and (lf is None or lf.nullable))

    def tspec(self, pt: TypeRef, lt: TypeRef | None, null: bool) -> tuple[tuple[int, bool, int, int], int] | None:
        """`spec` of one value of peer type `pt` read as local type `lt` (None: dropped)."""
        pk, lk = pt.kind, (lt.kind if lt is not None else None)
        if pk == "message" or lk == "message":
            return None
        if pk in _RANGES:
            lo, hi = _RANGES[pk]
            if lk == "bool":
                return (_ev.K_INT, null, 0, 1), _ev.C_TO_BOOL
            if lk is not None:
                lo, hi = max(lo, _RANGES[lk][0]), min(hi, _RANGES[lk][1])
            return (_ev.K_INT, null, lo, hi), _ev.C_SAME
        if pk == "bool":
            return (_ev.K_BOOL, null, 0, 1), (_ev.C_TO_INT if lk is not None and lk != "bool" else _ev.C_SAME)
        if pk in _FLOATS:
            return (_ev.K_FLOAT, null, 0, 1), _ev.C_SAME
        if pk == "string":
            return (_ev.K_STR, null, 0, 1), (_ev.C_TO_BIN if lk == "bytes" else _ev.C_SAME)
        if pk == "bytes":
            return (_ev.K_BYTES, null, 0, 1), (_ev.C_TO_STR if lk == "string" else _ev.C_SAME)
        return None

    def runs(self, name: str) -> dict[int, Any]:
        """The repeated and map fields of message `name` (by peer index) that the fast path
        checks as bytes with a `Run` and copies (of scalars, or of messages of scalars laid
        out alike) or lays out again in C (messages of scalars, fields reordered, added,
        dropped, or of kinds changed compatibly). A map's keys must keep their kind."""
        if _ev is None:
            return {}
        pm, lm = self.peer.messages[name], self.local.messages[name]
        lby = {f.number: f for f in lm.fields}
        out: dict[int, Any] = {}
        for i, pf in enumerate(pm.fields):
            lf = lby.get(pf.number)
            if lf is None or pf.label not in ("repeated", "map") or lf.label != pf.label:
                continue
            key = None
            if pf.label == "map":
                assert pf.key is not None and lf.key is not None
                ks = self.tspec(pf.key, lf.key, False)
                if ks is None or ks[1] != _ev.C_SAME or ks[0][0] not in (_ev.K_INT, _ev.K_BOOL, _ev.K_STR):
                    continue
                key = (ks[0][0], ks[0][2], ks[0][3])
            if pf.type.kind != "message":
                sc = self.tspec(pf.type, lf.type, False)
                if sc is not None and sc[1] == _ev.C_SAME:
                    out[i] = _ev.Run(False, [sc[0]], None, key)
                continue
            sub = pf.type.ref_name
            sub_p, sub_l = self.peer.messages[sub], self.local.messages[sub]
            if not sub_p.fields or not sub_l.fields or len(sub_p.fields) > 4096 or len(sub_l.fields) > 4096 or any(
                    f.oneof is not None or f.required or f.type.kind == "message" or f.label not in ("single", "optional")
                    for f in (*sub_p.fields, *sub_l.fields)):
                continue
            sl = {f.number: f for f in sub_l.fields}
            specs = [self.spec(f, sl.get(f.number)) for f in sub_p.fields]
            if any(sc is None for sc in specs):
                continue
            specs_ok = cast("list[tuple[tuple[int, bool, int, int], int]]", specs)
            if [f.number for f in sub_p.fields] == [f.number for f in sub_l.fields] and all(
                    sc[1] == _ev.C_SAME for sc in specs_ok):
                out[i] = _ev.Run(True, [sc[0] for sc in specs_ok], None, key)
                continue
            pidx = {f.number: j for j, f in enumerate(sub_p.fields)}
            layout = []
            for f in sub_l.fields:
                j = pidx.get(f.number)
                if j is None:
                    layout.append((-1, _ev.C_SAME, _pack(self.default(f, f"{sub}.{f.name}"))))
                else:
                    layout.append((j, specs_ok[j][1], None))
            out[i] = _ev.Run(True, [sc[0] for sc in specs_ok], (layout, _header(len(sub_l.fields))), key)
        return out

    def splice(self, name: str, level: int) -> str | None:
        """The name of a generated function (m, a, b) → bytes: message `name`'s encoding
        m[a:b] at nesting `level` made local, its repeated fields of scalars or of
        scalar-only messages checked / laid out as bytes by their `Run`, its message fields
        that have such runs themselves spliced alike (down to level 4), the others unpacked
        and transcoded as usual; the result is the local array header and each field's
        bytes in the local order. None when no field of it, or below, has such a run."""
        key = (name, level)
        if key in self.splices:
            return self.splices[key]
        self.splices[key] = None  # (until it is made: a message on a cycle is not spliced in itself)
        if level > 4:
            return None
        runs = self.runs(name)
        pm, lm = self.peer.messages[name], self.local.messages[name]
        lby = {f.number: f for f in lm.fields}
        subs: dict[int, str] = {}
        for i, pf in enumerate(pm.fields):
            lf = lby.get(pf.number)
            if lf is not None and pf.type.kind == "message" and pf.label != "repeated" and pf.label != "map":
                fn = self.splice(pf.type.ref_name, level + 1)
                if fn is not None:
                    subs[i] = fn
        if not runs and not subs:
            return None
        n = len(pm.fields)
        fname = f"_sp{self.fid(name)}_{level}"
        L = [f"def {fname}(m, a, b):", f"    o = _split(m, a, b, {n})", f"    d = {level}"]
        if level > MAX_DEPTH - 1:
            L += ["    raise _SL"]
        for i, run in sorted(runs.items()):
            r = self.const(run)
            if run.reshaped:
                L += [f"    p{i} = {r}.reshape(m, o[{i}], o[{i + 1}])", f"    if p{i} is None:", "        raise _SL"]
            else:
                L += [f"    if not {r}.check(m, o[{i}], o[{i + 1}]):", "        raise _SL", f"    p{i} = m[o[{i}]:o[{i + 1}]]"]
        for i, fn in subs.items():
            L.append(f"    p{i} = None if m[o[{i}]] == 0xC0 else {fn}(m, o[{i}], o[{i + 1}])")
        for i, pf in enumerate(pm.fields):
            if i in runs or i in subs:
                continue
            L.append(f"    p{i} = _unp(m[o[{i}]:o[{i + 1}]], raw=False, strict_map_key=False)")
            lf = lby.get(pf.number)
            if lf is not None and lf.type.kind == "message":
                self.compile(lf.type.ref_name)
            L += ["    " + s for s in self.field(pf, lf, f"p{i}")]
        names: list[str | None] = [None if i in runs else f"p{i}" for i in range(n)]
        L += self.oneofs(pm.fields, names)
        L += [f"    if p{i} is None:\n        raise _SL" for i, f in enumerate(pm.fields) if f.required and i not in runs]
        pby = {f.number: i for i, f in enumerate(pm.fields)}
        parts = [self.const(_header(len(lm.fields)))]
        local_vars: list[str | None] = []
        for lf in lm.fields:
            j = pby.get(lf.number)
            if j is None:
                parts.append(self.const(_pack(self.default(lf, f"{name}.{lf.name}"))))
                local_vars.append(None)
            elif j in runs:
                parts.append(f"p{j}")
                local_vars.append(None)
            elif j in subs:
                parts.append(f"(_NIL if p{j} is None else p{j})")
                local_vars.append(f"p{j}")
            else:
                parts.append(f"_pack(p{j})")
                local_vars.append(f"p{j}")
        L += self.oneofs(lm.fields, local_vars)
        L += [f"    if {x} is None:\n        raise _SL" for f, x in zip(lm.fields, local_vars) if f.required and x]
        L.append(f"    return b''.join(({', '.join(parts)},))")
        exec(compile("\n".join(L) + "\n", "<mrpcd.evolve fast splice>", "exec"), self.ns)
        self.splices[key] = fname
        return fname

    def splicer(self, fname: str) -> Callable[[Any], bytes]:
        """The fast path of a top-level message spliced by generated function `fname`."""
        sp = self.ns[fname]

        def fast(data: Any) -> bytes:
            m = memoryview(data)
            if m.ndim != 1 or m.itemsize != 1:
                raise _Slow
            m = m.cast("B")
            was = gc.isenabled()
            gc.disable()
            try:
                return sp(m, 0, len(m))
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

    def flat(self, name: str, y: str) -> tuple[str, str | None] | None:
        """For a message of scalars only (no message field on either side, no oneof): the
        caller inlines it in its loop over many of them, no call per element. Returns (an
        expression true when `y` is not taken, the expression of its local layout, None when
        that is `y` itself); None for any other message."""
        pm, lm = self.peer.messages[name], self.local.messages[name]
        if any(f.type.kind == "message" or f.oneof is not None or f.label in ("repeated", "map")
               for f in (*pm.fields, *lm.fields)):
            return None
        lby = {f.number: f for f in lm.fields}
        parts = [f"{y}.__class__ is not list", f"len({y}) != {len(pm.fields)}"]
        got: dict[int, str] = {}
        for i, pf in enumerate(pm.fields):
            lf = lby.get(pf.number)
            x = f"{y}[{i}]"
            bad, conv, _ = self.scalar(pf.type, lf.type if lf is not None else None, x)
            # (a float field: an int in it is refused here; the reference makes it a float,
            # but no encoder writes one, so only such a rare payload takes the slow path)
            both = pf.nullable and (lf is None or lf.nullable)
            if both:
                bad = f"{x} is not None and ({bad})"
            parts.append(f"({bad})")
            if conv is not None and both:
                conv = f"(None if {x} is None else {conv})"
            got[pf.number] = conv or x
        if [f.number for f in pm.fields] == [f.number for f in lm.fields] and all(
                got[f.number] == f"{y}[{i}]" for i, f in enumerate(pm.fields)):
            return " or ".join(parts), None
        out = [got[f.number] if f.number in got else self.const(self.default(f, f"{name}.{f.name}")) for f in lm.fields]
        return " or ".join(parts), (f"({', '.join(out)},)" if out else "()")

    def oneofs(self, fields: Sequence[Field], names: Sequence[str | None]) -> list[str]:
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
                flat = self.flat(t.ref_name, "y")
                if flat is not None:
                    L += [f"for y in {x}:", f"    if {flat[0]}:", "        raise _SL"]
                    return L + ([f"{x} = [{flat[1]} for y in {x}]"] if flat[1] is not None else [])
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
                flat = self.flat(t.ref_name, "y")
                if flat is not None:
                    L += [f"for y in {x}.values():", f"    if {flat[0]}:", "        raise _SL"]
                    if kconv is not None or flat[1] is not None:
                        L.append(f"{x} = {{{kout}: {flat[1] or 'y'} for k_, y in {x}.items()}}")
                    return L
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
