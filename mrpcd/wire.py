"""How RPC semantics map onto records, shared by the sync and asyncio app libraries.

Sans-I/O: builds the bytes of request/response records and reads status and metadata back
out of them. On a RESPONSE record, metadata pairs before the `:trailers` marker are the
initial metadata (meaningful on START), pairs after it the trailing metadata; a record that
only ENDs carries trailing metadata alone. `:details` carries the status details.
"""
from __future__ import annotations

import json
import re
import time
from typing import Iterable, Sequence, final

from .marshal import records as R
from .marshal._pack import Parts
from .status import RpcError, StatusCode

Metadata = Sequence[tuple[str, "str | bytes"]]
_TRAILERS = (":trailers", "")
_TRAILERS_ONLY = R.encode_metadata([_TRAILERS], internal=True)


# Longest timeout kept as given (~31 years): more (float('inf') included) is the same in
# practice, and would overflow the wire's u64 or a lock's wait (threading.TIMEOUT_MAX).
MAX_TIMEOUT = 1e9


def deadline_us(timeout: float | None) -> int:
    """Remaining time in microseconds as carried on the wire (0 = no deadline)."""
    if timeout is None:
        return 0
    try:
        if timeout <= 0:
            return 1
    except TypeError:  # "'<=' not supported between 'str' and 'int'" said nothing of the timeout
        raise TypeError(f"timeout must be a number of seconds or None, got {type(timeout).__name__}") from None
    if not timeout < MAX_TIMEOUT:  # huge or inf (or NaN, which no comparison passes)
        if timeout != timeout:
            raise ValueError("timeout must be a number of seconds, got NaN")
        timeout = MAX_TIMEOUT
    return max(1, int(timeout * 1e6))


def check_metadata(metadata: Metadata | None) -> list[tuple[str, str | bytes]]:
    """Validate user metadata up front, so a bad key is the caller's error, not the daemon's."""
    if not metadata:
        return []
    pairs = [(k, v) for k, v in metadata]
    try:
        R.encode_metadata(pairs)
    except (R.RecordError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid metadata: {exc}") from None
    return pairs


@final  # (so `type(x) is RecordParts` tells the type checker the rest is bytes)
class RecordParts:
    """A record not yet encoded: the arguments of encode_record. `App.send` pushes it with
    `ring_push_record` (header, metadata and payload gathered into the shared ring by one C
    call), so the payload is copied once, into shared memory, with no joined bytes on the
    way. The payload may be a `Parts` (the send path's encoding, big `bytes` fields by
    reference: `ring_push_parts` gathers them from the user's objects). `len()` is the
    encoded length (for the size checks); `encode()` the bytes."""

    __slots__ = ("args", "size")

    def __init__(self, kind: int, flags: int, status: int, handle: int, call_id: int, method_id: int, deadline: int, meta: bytes, payload) -> None:
        self.args = (kind, flags, status, handle, call_id, method_id, deadline, meta, payload)
        self.size = R.HEADER_SIZE + len(meta) + len(payload)

    def __len__(self) -> int:
        return self.size

    def encode(self) -> bytes:
        a = self.args
        if type(a[8]) is Parts:  # big bytes fields by reference: join them (one copy)
            return R.encode_record(*a[:8], a[8].tobytes())
        return R.encode_record(*a)

    def __repr__(self) -> str:
        a = self.args
        return f"RecordParts(kind={a[0]}, flags={a[1]}, handle={a[3]}, call_id={a[4]}, {self.size} bytes)"


def request_parts(handle: int, call_id: int, method_id: int, flags: int, deadline: int, metadata: Metadata, payload) -> RecordParts:
    """A REQUEST record, not yet encoded (see RecordParts)."""
    meta = R.encode_metadata(list(metadata)) if metadata else b""
    if payload is None:
        flags |= R.F_NO_MSG
        payload = b""
    return RecordParts(R.REQUEST, flags, 0, handle, call_id, method_id, deadline, meta, payload)


def request_record(handle: int, call_id: int, method_id: int, flags: int, deadline: int, metadata: Metadata, payload: bytes | None) -> bytes:
    return request_parts(handle, call_id, method_id, flags, deadline, metadata, payload).encode()


def cancel_record(handle: int, call_id: int) -> bytes:
    return R.encode_record(R.CANCEL, R.F_END | R.F_NO_MSG, StatusCode.CANCELLED.code, handle, call_id, 0, 0, b"", b"")


def response_parts(
    handle: int,
    call_id: int,
    flags: int,
    payload: bytes | None,
    initial: Metadata = (),
    code: StatusCode = StatusCode.OK,
    details: str = "",
    trailing: Metadata = (),
) -> RecordParts:
    """A RESPONSE record, not yet encoded (see RecordParts)."""
    pairs: list = []
    if flags & R.F_START:
        pairs.extend(initial)
    if flags & R.F_END:
        if flags & R.F_START:
            pairs.append(_TRAILERS)
        pairs.extend(trailing)
        if details:
            pairs.append((":details", details))
    if not pairs:
        meta = b""
    elif len(pairs) == 1 and pairs[0] is _TRAILERS:
        meta = _TRAILERS_ONLY  # the common unary answer: no metadata at all
    else:
        meta = R.encode_metadata(pairs, internal=True)
    if payload is None:
        flags |= R.F_NO_MSG
        payload = b""
    status = code.code if flags & R.F_END else 0
    return RecordParts(R.RESPONSE, flags, status, handle, call_id, 0, 0, meta, payload)


def response_record(
    handle: int,
    call_id: int,
    flags: int,
    payload: bytes | None,
    initial: Metadata = (),
    code: StatusCode = StatusCode.OK,
    details: str = "",
    trailing: Metadata = (),
) -> bytes:
    return response_parts(handle, call_id, flags, payload, initial, code, details, trailing).encode()


def split_response_meta(rec: R.Record) -> tuple[list, list, str]:
    """(initial metadata, trailing metadata, details) of a RESPONSE or GOAWAY record."""
    if not rec.meta_len:
        return [], [], ""
    meta = rec.meta
    if meta == _TRAILERS_ONLY:
        return [], [], ""  # the common unary answer: nothing to decode
    pairs = R.decode_metadata(meta)
    initial: list = []
    trailing: list = []
    details = ""
    start, end = rec.flags & R.F_START, rec.flags & R.F_END
    target = initial if start else trailing
    for key, value in pairs:
        if key == ":trailers":
            target = trailing
        elif key == ":details":
            details = value if isinstance(value, str) else value.decode("utf-8", "replace")
        elif start and not end:
            initial.append((key, value))
        else:
            target.append((key, value))
    return initial, trailing, details


def request_meta(rec: R.Record) -> list:
    return R.decode_metadata(rec.meta) if rec.meta_len else []


def error_from(rec: R.Record) -> RpcError:
    initial, trailing, details = split_response_meta(rec)
    return RpcError(StatusCode.from_int(rec.status), details, trailing, initial)


class Deadline:
    """An absolute monotonic deadline built from a remaining-µs wire value."""

    __slots__ = ("at",)

    def __init__(self, remaining_us: int) -> None:
        self.at = time.monotonic() + remaining_us / 1e6 if remaining_us else None

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


def iter_pairs(metadata: Iterable | None) -> list:
    return list(metadata) if metadata else []


# grpc's defaults: receive 4 MiB, send unlimited (the daemon's max_record still caps both).
DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024
_OPTION_NAMES = {"grpc.max_send_message_length": "max_send", "grpc.max_receive_message_length": "max_receive"}


def message_limits(options, max_record: int) -> tuple[int, int]:
    """(max_send, max_receive) bytes from grpc-style options; -1 means unlimited, as in grpc."""
    limits = {"max_send": -1, "max_receive": DEFAULT_MAX_RECEIVE}
    try:
        items = iter(options or ())
    except TypeError:
        raise TypeError(f"options must be a sequence of (key, value) pairs, got {type(options).__name__}") from None
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise ValueError(f"options must be (key, value) pairs, got {item!r:.80}") from None
        name = _OPTION_NAMES.get(key)
        if name is None:
            continue  # other grpc options have no meaning here (the daemon owns transport)
        if type(value) is not int:
            raise ValueError(f"option {key} must be an int, got {type(value).__name__}")
        limits[name] = value
    send = max_record if limits["max_send"] < 0 else min(limits["max_send"], max_record)
    recv = max_record if limits["max_receive"] < 0 else min(limits["max_receive"], max_record)
    return send, recv


_DURATION = re.compile(r"(\d{1,12})(\.\d{1,9})?s")

# method -> (timeout, wait_for_ready) from a channel's grpc.service_config; keys are
# "/pkg.Svc/M" (that method), "/pkg.Svc/" (the service's methods) and "" (every method)
MethodDefaults = dict[str, "tuple[float | None, bool | None]"]


def method_defaults(options) -> MethodDefaults:
    """The per-method `timeout` and `waitForReady` of the channel option
    grpc.service_config (a JSON service config, as grpc takes it): the call's own
    wait_for_ready wins, its deadline is the sooner of its timeout and the config's, as
    in grpc. The rest of a service config (retryPolicy, loadBalancingConfig, ...) is
    ignored; a malformed one is a ValueError here, where the channel is made."""
    table: MethodDefaults = {}
    for item in options or ():
        key, value = item  # (message_limits checked the pairs)
        if key != "grpc.service_config":
            continue
        where = "option grpc.service_config"
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a JSON string, got {type(value).__name__}")
        try:
            config = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{where} must be a JSON object")
        table.clear()  # (a later one replaces an earlier one, as options do)
        entries = config.get("methodConfig", [])
        if not isinstance(entries, list):
            raise ValueError(f"{where}: methodConfig must be a list")
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: each methodConfig must be an object")
            timeout: float | None = None
            raw = entry.get("timeout")
            if raw is not None:
                m = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
                if m is None:
                    raise ValueError(f"{where}: timeout must be a duration like \"1.5s\", got {raw!r}")
                timeout = float(raw[:-1])
            wait = entry.get("waitForReady", entry.get("wait_for_ready"))
            if wait is not None and not isinstance(wait, bool):
                raise ValueError(f"{where}: waitForReady must be true or false, got {wait!r}")
            names = entry.get("name", [])
            if not isinstance(names, list):
                raise ValueError(f"{where}: name must be a list of {{service, method}}")
            for name in names:
                service = name.get("service", "") if isinstance(name, dict) else None
                method = name.get("method", "") if isinstance(name, dict) else None
                if not isinstance(service, str) or not isinstance(method, str) or (method and not service):
                    raise ValueError(f"{where}: bad name {name!r} (a service, with or without a method)")
                path = f"/{service}/{method}" if service else ""
                if path in table:
                    raise ValueError(f"{where}: more than one methodConfig names {name!r}")
                table[path] = (timeout, wait)
    return table


def method_default(table: MethodDefaults, method: str) -> "tuple[float | None, bool | None]":
    """(timeout, wait_for_ready) of `method` ("/pkg.Svc/M"): its own entry, else its
    service's, else the default one, else (None, None)."""
    if not table:
        return None, None
    found = table.get(method)
    if found is None:
        found = table.get(method[: method.rfind("/") + 1])
    if found is None:
        found = table.get("")
    return found if found is not None else (None, None)


def too_large(direction: str, size: int, limit: int) -> RpcError:
    """grpc's RESOURCE_EXHAUSTED text for a message over the limit ("Sent"/"Received")."""
    return RpcError(StatusCode.RESOURCE_EXHAUSTED, f"{direction} message larger than max ({size} vs. {limit})")


def coerce_code(code) -> StatusCode:
    """A StatusCode from a StatusCode or an int (the interop server echoes ints)."""
    if isinstance(code, StatusCode):
        return code
    if type(code) is int:
        return StatusCode.from_int(code)
    raise TypeError(f"status code must be a StatusCode or int, got {type(code).__name__}")
