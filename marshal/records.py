"""Records: the unit apps, daemons and peers exchange (ring and wire share the format).

A record is a 40-byte little-endian header, `meta_len` bytes of metadata, then
`payload_len` bytes of payload (the encoded message). See docs/INTERNALS.md "Record format".
The hot parts (header pack/unpack, parse_record, FrameDecoder) are Cython, in _framing.pyx;
this module re-exports them and adds metadata encoding.
"""
from __future__ import annotations

import re
import struct
from typing import Sequence

import msgpack

from ._framing import (
    CANCEL,
    DEFAULT_MAX_RECORD,
    F_ALL,
    F_END,
    F_NO_MSG,
    F_START,
    GOAWAY,
    HEADER_SIZE,
    HELLO,
    KINDS,
    MAX_META,
    REQUEST,
    RESPONSE,
    WINDOW,
    FrameDecoder,
    Record,
    RecordError,
    encode_record,
    parse_record,
    ring_pop_records,
    ring_push_record,
    ring_push_records,
    Lease,
    ring_commit,
    ring_release_bytes,
    ring_reserve_view,
    ring_should_wake_consumer,
    ring_should_wake_producer,
    ring_take_records,
    wire_buffers,
)

__all__ = [
    "HEADER", "HEADER_SIZE", "REQUEST", "RESPONSE", "CANCEL", "WINDOW", "HELLO", "GOAWAY", "KINDS",
    "F_START", "F_END", "F_NO_MSG", "F_ALL", "MAX_META", "DEFAULT_MAX_RECORD",
    "RecordError", "Record", "encode_record", "parse_record", "FrameDecoder",
    "ring_pop_records", "ring_push_record", "ring_push_records", "ring_take_records", "ring_release_bytes", "Lease",
    "ring_should_wake_consumer", "ring_should_wake_producer", "ring_reserve_view", "ring_commit",
    "wire_buffers",
    "encode_metadata", "decode_metadata", "check_metadata_key",
]

# Reference layout of the header (for documentation and for code outside the hot path):
# kind u8, flags u8, status u16, handle u32, call_id u64, method_id u32, reserved u32,
# deadline u64, meta_len u32, payload_len u32.
HEADER = struct.Struct("<BBHIQIIQII")
assert HEADER.size == HEADER_SIZE

# Metadata keys: lowercase ASCII letters, digits, '-', '_', '.'; reserved (daemon-internal)
# keys start with ':' (e.g. ':details' carries status details on a final RESPONSE).
_KEY = re.compile(r":?[0-9a-z_.\-]+")
MAX_KEY_LEN = 256


def check_metadata_key(key: object, internal: bool = False) -> str:
    """Validate one metadata key; return it or raise RecordError."""
    if type(key) is not str:
        raise RecordError(f"metadata key must be a str, got {type(key).__name__}")
    if not key or len(key) > MAX_KEY_LEN or not _KEY.fullmatch(key):
        raise RecordError(
            f"invalid metadata key {key[:64]!r}: keys are 1..{MAX_KEY_LEN} characters of "
            "lowercase ASCII letters, digits, '-', '_', '.'"
        )
    if key[0] == ":" and not internal:
        raise RecordError(f"metadata key {key!r} is reserved (keys starting with ':' are internal)")
    return key


def _check_value(key: str, value: object, decoding: bool) -> str | bytes:
    if key.endswith("-bin"):
        if type(value) is bytes:
            return value
        if not decoding and isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        raise RecordError(f"metadata {key!r}: a '-bin' key takes bytes, got {type(value).__name__}")
    if type(value) is str:
        return value
    if not decoding and isinstance(value, str):
        return str(value)
    raise RecordError(f"metadata {key!r}: value must be str (use a '-bin' key for bytes), got {type(value).__name__}")


_packb = msgpack.Packer(use_bin_type=True).pack


def encode_metadata(pairs: Sequence[tuple[str, str | bytes]], internal: bool = False) -> bytes:
    """Encode metadata pairs as the record's metadata section (b"" when there are none).

    Keys are validated (lowercase ASCII [0-9a-z-_.]); keys starting with ':' are reserved
    for the daemon and library, which pass internal=True. Keys ending in '-bin' take bytes,
    the others str. RecordError on anything else, or if the section exceeds MAX_META.
    """
    if not pairs:
        return b""
    out = []
    for item in pairs:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise RecordError(f"metadata entries must be (key, value) pairs, got {item!r:.80}") from None
        check_metadata_key(key, internal)
        out.append((key, _check_value(key, value, False)))
    try:
        data = _packb(out)
    except (UnicodeEncodeError, ValueError, OverflowError) as exc:
        raise RecordError(f"metadata cannot be encoded: {exc}") from None
    if len(data) > MAX_META:
        raise RecordError(f"metadata is {len(data)} bytes, exceeds MAX_META {MAX_META}")
    return data


def decode_metadata(data: bytes | memoryview, allow_reserved: bool = True) -> list[tuple[str, str | bytes]]:
    """Decode and validate a record's metadata section (untrusted); RecordError if malformed.

    Reserved ':' keys are accepted by default (they travel on the wire and to apps); the
    daemon passes allow_reserved=False for sections written by apps.
    """
    if len(data) == 0:
        return []
    if len(data) > MAX_META:
        raise RecordError(f"metadata is {len(data)} bytes, exceeds MAX_META {MAX_META}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # any malformed msgpack (ValueError, TypeError, ExtraData, ...)
        raise RecordError(f"malformed metadata: {exc}") from None
    if type(obj) is not list:
        raise RecordError(f"malformed metadata: expected an array of pairs, got {_tname(obj)}")
    out = []
    for i, item in enumerate(obj):
        if type(item) is not list or len(item) != 2:
            raise RecordError(f"malformed metadata: entry {i} is not a [key, value] pair")
        key, value = item
        try:
            check_metadata_key(key, allow_reserved)
            out.append((key, _check_value(key, value, True)))
        except RecordError as exc:
            raise RecordError(f"malformed metadata: entry {i}: {exc}") from None
    return out


def _tname(obj: object) -> str:
    return {list: "array", dict: "map", str: "string", bytes: "bytes", int: "int",
            float: "float", bool: "bool", type(None): "nil"}.get(type(obj), type(obj).__name__)
