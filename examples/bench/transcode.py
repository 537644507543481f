"""Micro-benchmark: schema-evolution transcoding (marshal/evolve.py) per message shape, the
generated fast path against the reference transcoder, measured in the same run.

    .venv/bin/python examples/bench/transcode.py [--mib 1] [--repeat 3] [--shapes a,b]

Each shape is a v1 → v2 change of one .proto (a field added to the top message, and for
some shapes a change inside the elements) and a payload of about --mib MiB. For both
transcoders: the best of --repeat runs, elements/s (an element: a sub-message, a map
entry, a scalar of a repeated field, a bytes value) and MB/s of the peer's payload; then
speedup = reference time / fast time. JSON on stdout. Both outputs are checked equal.

This is what the daemon does on its one event loop for every message between apps of
different schema versions (docs/INTERNALS.md, "Schema evolution"): while it runs, no
other app on that daemon is served.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any, Callable

from mrpcd.marshal import codec
from mrpcd.marshal.evolve import Transcoder, plan_service
from mrpcd.marshal.schema import Schema

SVC = "b.S"


def schema(messages: dict[str, list]) -> Schema:
    """messages: {name: [(field, number, kind, ref, label, key)]}"""
    return Schema.from_dict({
        "messages": [[n, [[f[0], f[1], [f[2], f[3]], f[4], [f[5], None] if f[5] else None, None] for f in fs]]
                     for n, fs in messages.items()],
        "enums": [],
        "services": [[SVC, [["Call", "b.Req", "b.Rsp", False, False]]]],
    })


def F(name: str, number: int, kind: str, ref: str | None = None, label: str = "single", key: str | None = None) -> tuple:
    return (name, number, kind, ref, label, key)


ADDED = F("added", 15, "string")  # v2's new top-level field: what makes a transcoder necessary
RSP = {"b.Rsp": []}


def shape_small_same(mib: float) -> tuple:
    """Many tiny sub-messages whose own layout did not change (only the top message did):
    the 7.6 MiB / 4 M-element case of docs/INTERNALS.md, scaled."""
    n = int(mib * 2**20 / 2)
    v1 = {"b.Req": [F("items", 1, "message", "b.In", "repeated")], "b.In": [F("x", 1, "int32")], **RSP}
    v2 = {"b.Req": [F("items", 1, "message", "b.In", "repeated"), ADDED], "b.In": [F("x", 1, "int32")], **RSP}
    return v1, v2, {"items": [{"x": i & 63} for i in range(n)]}, n


def shape_small_changed(mib: float) -> tuple:
    """Many small sub-messages whose fields were reordered, renamed, widened, and one added."""
    n = int(mib * 2**20 / 6)
    v1 = {"b.Req": [F("items", 1, "message", "b.In", "repeated")],
          "b.In": [F("x", 1, "int32"), F("s", 2, "string"), F("ok", 3, "bool")], **RSP}
    v2 = {"b.Req": [F("items", 1, "message", "b.In", "repeated"), ADDED],
          "b.In": [F("flag", 3, "bool"), F("x", 1, "int64"), F("s", 2, "string"), F("z", 4, "double")], **RSP}
    return v1, v2, {"items": [{"x": i & 63, "s": "ab", "ok": bool(i & 1)} for i in range(n)]}, n


def shape_nested_small(mib: float) -> tuple:
    """Many small sub-messages (changed) one level down, in a message field of the top
    message: the fast path's Python part (only the top message's own repeated fields are
    checked and laid out in C)."""
    n = int(mib * 2**20 / 6)
    inner = [F("x", 1, "int32"), F("s", 2, "string"), F("ok", 3, "bool")]
    v1 = {"b.Req": [F("batch", 1, "message", "b.Batch")], "b.Batch": [F("items", 1, "message", "b.In", "repeated")],
          "b.In": inner, **RSP}
    v2 = {"b.Req": [F("batch", 1, "message", "b.Batch"), ADDED], "b.Batch": [F("items", 1, "message", "b.In", "repeated")],
          "b.In": [F("flag", 3, "bool"), F("x", 1, "int64"), F("s", 2, "string"), F("z", 4, "double")], **RSP}
    return v1, v2, {"batch": {"items": [{"x": i & 63, "s": "ab", "ok": bool(i & 1)} for i in range(n)]}}, n


def shape_msgs_holding_msgs(mib: float) -> tuple:
    """Small sub-messages that hold a message themselves (changed): not a run the C part
    does, so the generated Python path."""
    n = int(mib * 2**20 / 22)
    v1 = {"b.Req": [F("items", 1, "message", "b.In", "repeated")],
          "b.In": [F("x", 1, "int32"), F("p", 2, "message", "b.P")], "b.P": [F("a", 1, "double"), F("b", 2, "double")], **RSP}
    v2 = {"b.Req": [F("items", 1, "message", "b.In", "repeated"), ADDED],
          "b.In": [F("p", 2, "message", "b.P"), F("x", 1, "int64")], "b.P": [F("a", 1, "double"), F("b", 2, "double")], **RSP}
    return v1, v2, {"items": [{"x": i & 63, "p": {"a": 0.5, "b": 1.5}} for i in range(n)]}, n


def shape_small_request(mib: float) -> tuple:
    """One small request (the common case): a few fields, a changed sub-message, a map
    entry; timed over 10,000 calls (elements: calls)."""
    inner1 = [F("x", 1, "int64"), F("s", 2, "string")]
    inner2 = [F("x", 1, "int64"), F("y", 3, "string", label="optional")]
    top = [F("name", 1, "string"), F("count", 2, "int32"), F("inner", 3, "message", "b.In"),
           F("items", 4, "message", "b.In", "repeated"), F("tags", 5, "message", "b.In", "map", "string")]
    v1 = {"b.Req": top + [F("old", 6, "bool")], "b.In": inner1, **RSP}
    v2 = {"b.Req": top[::-1] + [F("level", 7, "double"), ADDED], "b.In": inner2, **RSP}
    value = {"name": "n", "count": 3, "inner": {"x": 1, "s": "a"}, "items": [{"x": 2, "s": "b"}],
             "tags": {"k": {"x": 3, "s": "c"}}, "old": True}
    return v1, v2, value, LOOPS


LOOPS = 10_000


def shape_big_bytes(mib: float) -> tuple:
    """One big bytes field (one element)."""
    v1 = {"b.Req": [F("blob", 1, "bytes"), F("n", 2, "int32")], **RSP}
    v2 = {"b.Req": [F("blob", 1, "bytes"), F("n", 2, "int32"), ADDED], **RSP}
    return v1, v2, {"blob": b"\xab" * int(mib * 2**20), "n": 1}, 1


def shape_map_of_messages(mib: float) -> tuple:
    """A map<string, message> (an entry: one element)."""
    n = int(mib * 2**20 / 16)
    v1 = {"b.Req": [F("m", 1, "message", "b.In", "map", "string")], "b.In": [F("x", 1, "int64"), F("y", 2, "double")], **RSP}
    v2 = {"b.Req": [F("m", 1, "message", "b.In", "map", "string"), ADDED],
          "b.In": [F("y", 2, "double"), F("x", 1, "int64")], **RSP}
    return v1, v2, {"m": {f"k{i}": {"x": i, "y": 0.5} for i in range(n)}}, n


def shape_repeated_ints(mib: float) -> tuple:
    """Repeated scalars: int32 widened to int64 (each value range-checked)."""
    n = int(mib * 2**20 / 3)
    v1 = {"b.Req": [F("v", 1, "int32", label="repeated")], **RSP}
    v2 = {"b.Req": [F("v", 1, "int64", label="repeated"), ADDED], **RSP}
    return v1, v2, {"v": [i & 0x7FFF for i in range(n)]}, n


def shape_repeated_doubles(mib: float) -> tuple:
    """Repeated doubles, unchanged (the top message changed)."""
    n = int(mib * 2**20 / 9)
    v1 = {"b.Req": [F("v", 1, "double", label="repeated")], **RSP}
    v2 = {"b.Req": [F("v", 1, "double", label="repeated"), ADDED], **RSP}
    return v1, v2, {"v": [i * 0.5 for i in range(n)]}, n


SHAPES: dict[str, Callable[[float], tuple]] = {
    "small_msgs_same": shape_small_same, "small_msgs_changed": shape_small_changed,
    "nested_small_msgs_changed": shape_nested_small, "msgs_holding_msgs": shape_msgs_holding_msgs, "big_bytes": shape_big_bytes,
    "map_of_msgs": shape_map_of_messages, "small_request": shape_small_request, "repeated_int32_to_int64": shape_repeated_ints,
    "repeated_doubles": shape_repeated_doubles,
}


def best(fn: Callable[[Any], bytes], data: bytes, repeat: int, loops: int = 1) -> tuple[float, bytes]:
    out = b""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(loops):
            out = fn(data)
        times.append(time.perf_counter() - t)
    return min(times), out


def run_shape(name: str, mib: float, repeat: int) -> dict:
    v1, v2, value, elements = SHAPES[name](mib)
    a, b = schema(v1), schema(v2)
    plan = plan_service(a, b, SVC)
    assert plan is not None
    tc: Transcoder = next(iter(plan.methods.values())).input
    assert tc is not None and tc.fast is not None
    data = codec.encode_plain(a, "b.Req", value)
    del value  # (4 M live objects of the bench's own would slow the collector the reference leaves on)
    gc.collect()
    loops = LOOPS if name == "small_request" else 1
    t_ref, ref = best(tc.reference, data, repeat, loops)
    t_fast, fast = best(tc.fast, data, repeat, loops)
    assert fast == ref, "the fast transcoder's output differs from the reference's"
    mb = len(data) * loops / 1e6
    return {
        "shape": name, "payload_bytes": len(data), "elements": elements,
        "reference": {"seconds": round(t_ref, 4), "elements_per_s": round(elements / t_ref), "MB_per_s": round(mb / t_ref, 1)},
        "fast": {"seconds": round(t_fast, 4), "elements_per_s": round(elements / t_fast), "MB_per_s": round(mb / t_fast, 1)},
        "speedup": round(t_ref / t_fast, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, default=1.0, help="payload size per shape (default 1 MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per transcoder; the best counts")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    args = ap.parse_args(argv)
    out = {"python": sys.version.split()[0], "mib": args.mib, "repeat": args.repeat,
           "results": [run_shape(s, args.mib, args.repeat) for s in args.shapes.split(",")]}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
