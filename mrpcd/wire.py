"""How RPC semantics map onto records, shared by the sync and asyncio app libraries.

Sans-I/O: builds the bytes of request/response records and reads status and metadata back
out of them. On a RESPONSE record, metadata pairs before the `:trailers` marker are the
initial metadata (meaningful on START), pairs after it the trailing metadata; a record that
only ENDs carries trailing metadata alone. `:details` carries the status details.
"""
from __future__ import annotations

import json
import random
import re
import threading
import time
from typing import Any, Iterable, Sequence, final

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
_WHERE = "option grpc.service_config"


def _service_config(options) -> dict | None:
    """The JSON object of the channel option grpc.service_config (the last one given, as
    a later option replaces an earlier one), or None; a malformed one is a ValueError."""
    config = None
    for item in options or ():
        key, value = item  # (message_limits checked the pairs)
        if key != "grpc.service_config":
            continue
        if not isinstance(value, str):
            raise ValueError(f"{_WHERE} must be a JSON string, got {type(value).__name__}")
        try:
            config = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{_WHERE} is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{_WHERE} must be a JSON object")
    return config


def _method_configs(config: dict) -> "list[tuple[int, dict, list[str]]]":
    """(index, entry, paths it names) of each methodConfig entry; a bad name, or a name
    two entries give, is a ValueError."""
    entries = config.get("methodConfig", [])
    if not isinstance(entries, list):
        raise ValueError(f"{_WHERE}: methodConfig must be a list")
    seen: set[str] = set()
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{_WHERE}: each methodConfig must be an object")
        names = entry.get("name", [])
        if not isinstance(names, list):
            raise ValueError(f"{_WHERE}: name must be a list of {{service, method}}")
        paths = []
        for name in names:
            service = name.get("service", "") if isinstance(name, dict) else None
            method = name.get("method", "") if isinstance(name, dict) else None
            if not isinstance(service, str) or not isinstance(method, str) or (method and not service):
                raise ValueError(f"{_WHERE}: bad name {name!r} (a service, with or without a method)")
            path = f"/{service}/{method}" if service else ""
            if path in seen:
                raise ValueError(f"{_WHERE}: more than one methodConfig names {name!r}")
            seen.add(path)
            paths.append(path)
        out.append((i, entry, paths))
    return out


def method_defaults(options) -> MethodDefaults:
    """The per-method `timeout` and `waitForReady` of the channel option
    grpc.service_config (a JSON service config, as grpc takes it): the call's own
    wait_for_ready wins, its deadline is the sooner of its timeout and the config's, as
    in grpc. `retryPolicy` and `retryThrottling` are read by `retry_config`; the rest
    (loadBalancingConfig, ...) is ignored; a malformed one is a ValueError here, where
    the channel is made."""
    table: MethodDefaults = {}
    config = _service_config(options)
    if config is None:
        return table
    for _i, entry, paths in _method_configs(config):
        timeout: float | None = None
        raw = entry.get("timeout")
        if raw is not None:
            m = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
            if m is None:
                raise ValueError(f"{_WHERE}: timeout must be a duration like \"1.5s\", got {raw!r}")
            timeout = float(raw[:-1])
        wait = entry.get("waitForReady", entry.get("wait_for_ready"))
        if wait is not None and not isinstance(wait, bool):
            raise ValueError(f"{_WHERE}: waitForReady must be true or false, got {wait!r}")
        for path in paths:
            table[path] = (timeout, wait)
    return table


def method_default(table: MethodDefaults, method: str) -> "tuple[float | None, bool | None]":
    """(timeout, wait_for_ready) of `method` ("/pkg.Svc/M"): its own entry, else its
    service's, else the default one, else (None, None)."""
    return _entry_for(table, method, (None, None))


def _entry_for(table: dict, method: str, missing: Any = None) -> Any:
    """What `table` holds for `method`'s methodConfig entry, chosen as grpc chooses it: the
    method's own ("/pkg.Svc/M"), else its service's ("/pkg.Svc/"), else the default one
    (""); `missing` if none names it. (An entry may hold None: it still wins.)"""
    for key in (method, method[: method.rfind("/") + 1], ""):
        if key in table:
            return table[key]
    return missing


# -- retries (grpc's retryPolicy and retryThrottling, gRFC A6) -------------------------------

MAX_ATTEMPTS_CAP = 5  # grpc caps maxAttempts at 5 (more is taken as 5, as there)
MAX_TOKENS_CAP = 1000  # A6: retryThrottling.maxTokens is capped at 1000


@final
class RetryPolicy:
    """A method's retryPolicy, validated as grpc validates it (gRFC A6). `backoff(n)` is
    the jittered wait before retry n (1 = the first retry)."""

    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "multiplier", "codes")

    def __init__(self, max_attempts: int, initial_backoff: float, max_backoff: float, multiplier: float, codes: "frozenset[StatusCode]") -> None:
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.multiplier = multiplier
        self.codes = codes

    def backoff(self, n: int) -> float:
        """A6: random(0, min(initialBackoff * backoffMultiplier**(n-1), maxBackoff)); the
        jitter spreads the retries of many clients that failed together."""
        try:
            cap = min(self.initial_backoff * self.multiplier ** (n - 1), self.max_backoff)
        except OverflowError:
            cap = self.max_backoff
        return random.uniform(0.0, cap)

    def __repr__(self) -> str:
        codes = ",".join(sorted(c.name for c in self.codes))
        return (f"RetryPolicy(maxAttempts={self.max_attempts}, initialBackoff={self.initial_backoff}s, "
                f"maxBackoff={self.max_backoff}s, backoffMultiplier={self.multiplier}, retryableStatusCodes=[{codes}])")


class RetryThrottle:
    """A channel's retryThrottling token bucket (A6): every attempt that fails with a
    retryable code takes a token, every success gives back tokenRatio; while the tokens
    are at or below half of maxTokens no call is retried, so a failing server is not
    hit with maxAttempts times its load. Thread-safe (the sync library's calls end on
    several threads); the asyncio library uses it from its loop alone."""

    __slots__ = ("max_tokens", "ratio", "tokens", "_lock")

    def __init__(self, max_tokens: float, ratio: float) -> None:
        self.max_tokens = max_tokens
        self.ratio = ratio
        self.tokens = max_tokens
        self._lock = threading.Lock()

    def success(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def failure(self) -> bool:
        """Take a token for a retryable failure; True if a retry is allowed."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1)
            return self.tokens > self.max_tokens / 2


@final
class RetryConfig:
    """A channel's retry policies by method and its throttle (None: no retryThrottling).
    Built by `retry_config`; `policy(method)` is looked up once per stub method."""

    __slots__ = ("table", "throttle")

    def __init__(self, table: "dict[str, RetryPolicy | None]", throttle: RetryThrottle | None) -> None:
        self.table = table
        self.throttle = throttle

    def policy(self, method: str) -> RetryPolicy | None:
        """`method`'s retryPolicy: that of its own methodConfig entry, else its service's,
        else the default one's (the entry is chosen first, as in grpc: a method entry
        without a retryPolicy means no retries even if its service's has one)."""
        return _entry_for(self.table, method)


def _duration(raw: Any, field: str) -> float:
    m = _DURATION.fullmatch(raw) if isinstance(raw, str) else None
    if m is None:
        raise ValueError(f"{_WHERE}: {field} must be a duration like \"0.1s\", got {raw!r}")
    value = float(raw[:-1])
    if value <= 0:
        raise ValueError(f"{_WHERE}: {field} must be greater than 0, got {raw!r}")
    return value


def _number(raw: Any, field: str, integer: bool = False) -> float:
    """A JSON number (or a string of one, as protobuf's JSON takes them), > 0."""
    value: Any = raw
    if isinstance(raw, str):
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)) or value != value:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{_WHERE}: {field} must be {kind}, got {raw!r}")
    if value <= 0:
        raise ValueError(f"{_WHERE}: {field} must be greater than 0, got {raw!r}")
    return value


def _retry_policy(raw: Any, where: str) -> RetryPolicy:
    if not isinstance(raw, dict):
        raise ValueError(f"{_WHERE}: {where} must be an object")
    for key in ("maxAttempts", "initialBackoff", "maxBackoff", "backoffMultiplier", "retryableStatusCodes"):
        if raw.get(key) is None:
            raise ValueError(f"{_WHERE}: {where}.{key} is missing (a retryPolicy needs maxAttempts, "
                             "initialBackoff, maxBackoff, backoffMultiplier and retryableStatusCodes)")
    attempts = int(_number(raw["maxAttempts"], f"{where}.maxAttempts", integer=True))
    if attempts < 2:
        raise ValueError(f"{_WHERE}: {where}.maxAttempts must be at least 2, got {raw['maxAttempts']!r}")
    initial = _duration(raw["initialBackoff"], f"{where}.initialBackoff")
    most = _duration(raw["maxBackoff"], f"{where}.maxBackoff")
    multiplier = _number(raw["backoffMultiplier"], f"{where}.backoffMultiplier")
    names = raw["retryableStatusCodes"]
    if not isinstance(names, list) or not names:
        raise ValueError(f"{_WHERE}: {where}.retryableStatusCodes must be a non-empty list of status codes, got {names!r}")
    codes = set()
    for j, name in enumerate(names):
        code = None
        if isinstance(name, str):
            code = StatusCode.__members__.get(name.upper())
        elif type(name) is int:
            code = next((c for c in StatusCode if c.code == name), None)
        if code is None:
            raise ValueError(f"{_WHERE}: {where}.retryableStatusCodes[{j}] is not a status code: {name!r}")
        codes.add(code)
    codes.discard(StatusCode.OK)  # (grpc takes it; a call that succeeded is never retried)
    return RetryPolicy(min(attempts, MAX_ATTEMPTS_CAP), initial, most, float(multiplier), frozenset(codes))


def retry_config(options) -> RetryConfig | None:
    """The channel's retries: grpc.service_config's per-method `retryPolicy` and its
    `retryThrottling`, validated as grpc validates them (a bad one is a ValueError naming
    the field, where the channel is made; grpc Python makes the channel and fails every
    call INVALID_ARGUMENT "errors validating service config"). None when no method has a
    retry policy, or `grpc.enable_retries` is 0 (grpc retries by default): such a
    channel's calls take the path without retries, which costs nothing more."""
    config = _service_config(options)
    if config is None:
        return None
    table: dict[str, RetryPolicy | None] = {}
    for i, entry, paths in _method_configs(config):
        raw = entry.get("retryPolicy")
        policy = None if raw is None else _retry_policy(raw, f"methodConfig[{i}].retryPolicy")
        for path in paths:
            table[path] = policy
    throttle = None
    raw = config.get("retryThrottling")
    if raw is not None:
        if not isinstance(raw, dict):
            raise ValueError(f"{_WHERE}: retryThrottling must be an object")
        for key in ("maxTokens", "tokenRatio"):
            if raw.get(key) is None:
                raise ValueError(f"{_WHERE}: retryThrottling.{key} is missing")
        tokens = _number(raw["maxTokens"], "retryThrottling.maxTokens", integer=True)
        ratio = _number(raw["tokenRatio"], "retryThrottling.tokenRatio")
        # A6: at most 1000 tokens; the ratio keeps 3 decimals
        throttle = RetryThrottle(float(min(tokens, MAX_TOKENS_CAP)), int(ratio * 1000) / 1000 or 0.001)
    enabled = True
    for key, value in options or ():
        if key == "grpc.enable_retries":  # (an int channel argument in grpc; "0" taken as 0 too)
            enabled = value not in (0, "0", False)
    if not enabled or not any(p is not None for p in table.values()):
        return None
    return RetryConfig(table, throttle)


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
