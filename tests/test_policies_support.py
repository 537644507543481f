"""Shared helpers for the policy tests: a schema, record builders (via encode_record /
parse_record, payloads as msgpack arrays in field declaration order)."""
from __future__ import annotations

import msgpack

from mrpcd.marshal import records as R
from mrpcd.marshal.schema import Schema, method_id


def _f(name, number, kind, ref=None, label="single"):
    return [name, number, [kind, ref], label, None, None]


SCHEMA = Schema.from_dict({
    "enums": [["hotel.Tier", [["BASIC", 0], ["GOLD", 1]]]],
    "messages": [
        ["hotel.Guest", [_f("name", 1, "string"), _f("age", 2, "int32")]],
        ["hotel.ReserveRequest", [
            _f("customer_name", 1, "string"), _f("nights", 2, "int32"), _f("rate", 3, "double"),
            _f("tier", 4, "enum", "hotel.Tier"), _f("vip", 5, "bool"), _f("guest", 6, "message", "hotel.Guest"),
            _f("tags", 7, "string", label="repeated"), _f("token", 8, "bytes"),
        ]],
        ["hotel.ReserveReply", [_f("ok", 1, "bool")]],
        ["llm.GenRequest", [_f("user", 1, "string"), _f("prompt", 2, "string"), _f("prompt_tokens", 3, "int32")]],
        ["llm.GenChunk", [_f("text", 1, "string"), _f("n_tokens", 2, "int32")]],
    ],
    "services": [
        ["hotel.Reservation", [["MakeReservation", "hotel.ReserveRequest", "hotel.ReserveReply", False, False],
                               ["Upload", "hotel.ReserveRequest", "hotel.ReserveReply", True, False],
                               ["Ping", "hotel.ReserveReply", "hotel.ReserveReply", False, False]]],
        ["llm.Llm", [["Generate", "llm.GenRequest", "llm.GenChunk", False, True]]],
    ],
})

MAKE = "/hotel.Reservation/MakeReservation"
UPLOAD = "/hotel.Reservation/Upload"
PING = "/hotel.Reservation/Ping"
GEN = "/llm.Llm/Generate"
MAKE_ID, UPLOAD_ID, PING_ID, GEN_ID = (method_id(p) for p in (MAKE, UPLOAD, PING, GEN))


def reserve(customer="alice", nights=1, rate=100.0, tier=0, vip=False, guest=None, tags=(), token=b""):
    return msgpack.packb([customer, nights, rate, tier, vip, guest, list(tags), token], use_bin_type=True)


def rec(kind, flags, call_id, *, handle=1, method=0, status=0, meta=(), payload=b"", internal=False):
    m = R.encode_metadata(list(meta), internal=internal) if meta else b""
    return R.parse_record(R.encode_record(kind, flags, status, handle, call_id, method, 0, m, payload))


def unary(call_id, path=MAKE, payload=None, *, handle=1, meta=()):
    """A unary REQUEST: START | END with a message."""
    return rec(R.REQUEST, R.F_START | R.F_END, call_id, handle=handle, method=method_id(path),
               payload=reserve() if payload is None else payload, meta=meta)


def start(call_id, path=UPLOAD, payload=None, *, handle=1, no_msg=False, meta=()):
    """The START of a client stream (no END)."""
    flags = R.F_START | (R.F_NO_MSG if no_msg else 0)
    return rec(R.REQUEST, flags, call_id, handle=handle, method=method_id(path),
               payload=b"" if no_msg else (reserve() if payload is None else payload), meta=meta)


def msg(call_id, payload=None, *, handle=1, end=False):
    return rec(R.REQUEST, R.F_END if end else 0, call_id, handle=handle, payload=reserve() if payload is None else payload)


def half_close(call_id, *, handle=1):
    return rec(R.REQUEST, R.F_END | R.F_NO_MSG, call_id, handle=handle)


def cancel(call_id, *, handle=1):
    return rec(R.CANCEL, R.F_END | R.F_NO_MSG, call_id, handle=handle, status=1)


def response(call_id, status=0, *, handle=1, payload=None, end=True, first=True):
    flags = (R.F_START if first else 0) | (R.F_END if end else 0)
    if payload is None and status != 0:
        flags |= R.F_NO_MSG
        payload = b""
    return rec(R.RESPONSE, flags, call_id, handle=handle, status=status,
               payload=msgpack.packb([True]) if payload is None else payload)


def ids(records):
    return [r.call_id for r in records]
