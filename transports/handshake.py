"""Daemon-to-daemon handshake, sans-I/O (no sockets, no event loop).

Wire contract (docs/INTERNALS.md, "Daemon-to-daemon TCP"):

* the client sends a HELLO record whose payload is msgpack
  ``{"version": PROTOCOL_VERSION, "role": "client", "services": {name: fingerprint},
  "closures": {name: closure}}`` (``closures``: each service's schema closure,
  ``Schema.closure``; optional: a peer without it is checked by fingerprints alone);
* the server checks it (protocol version; every service both sides know must have equal
  fingerprints, or, when both sides sent their closures, closures that are compatible by
  protobuf's evolution rules, marshal/evolve.py). On success it answers with its own HELLO
  (role "server"); on failure it answers with a GOAWAY record whose ``:details`` metadata
  explains (for an incompatible closure: the first differences), and closes;
* the client checks the server's HELLO the same way (defence in depth), or surfaces the
  server's GOAWAY text.

``Handshake`` is the state machine both roles run: feed it records, send what it returns.
"""
from __future__ import annotations

from typing import Any, Mapping

import msgpack

from mrpcd.marshal.evolve import closure_schema, compare
from mrpcd.marshal.schema import Schema, SchemaError

from mrpcd.marshal.records import (
    GOAWAY,
    HELLO,
    RecordError,
    decode_metadata,
    encode_metadata,
    encode_record,
)

__all__ = [
    "PROTOCOL_VERSION",
    "HandshakeError",
    "HELLO_MAX_RECORD",
    "Handshake",
    "make_hello",
    "ServiceSet",
    "service_set",
    "incompatible_changes",
    "copy_services",
    "check_hello",
    "make_goaway",
    "parse_goaway",
    "WAITING",
    "DONE",
    "FAILED",
]

PROTOCOL_VERSION = 1

ROLES = ("client", "server")
# Bounds on what an (untrusted, not yet authenticated) peer may announce.
MAX_SERVICES = 4096
MAX_NAME_LEN = 1024
MAX_FINGERPRINT_LEN = 256
MAX_DETAILS_LEN = 4096
# Closures a HELLO carries at most (packed bytes; past that the rest are left out, and those
# services are checked by fingerprint alone), and incompatibilities named in a refusal.
MAX_CLOSURES_BYTES = 768 << 10
# The largest HELLO a connection reads, whatever its max_record (which may be smaller: an
# operator's cap on messages must not refuse a peer whose HELLO carries its closures).
HELLO_MAX_RECORD = 1 << 20
MAX_REASONS = 3


class ServiceSet(dict):
    """{service name: fingerprint}, as the transports pass it to ``Handshake``, plus
    ``closures``: {service name: closure plain data} for the services that may evolve."""

    def __init__(self, fingerprints: Mapping[str, str] | None = None, closures: Mapping[str, Any] | None = None) -> None:
        super().__init__(fingerprints or {})
        self.closures: dict[str, Any] = dict(closures or {})


def service_set(schema: Schema, names: list[str] | None = None) -> ServiceSet:
    """The fingerprints and closures of `names` (all of the schema's services by default)."""
    names = list(schema.services) if names is None else names
    return ServiceSet({n: schema.fingerprint(n) for n in names}, {n: schema.closure(n) for n in names})


def copy_services(services: Mapping[str, str]) -> dict[str, str]:
    """A copy of a services mapping that keeps a ServiceSet's closures."""
    return ServiceSet(services, getattr(services, "closures", None))


def _closures_of(services: Mapping[str, str], closures: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(closures if closures is not None else getattr(services, "closures", None) or {})

WAITING, DONE, FAILED = "waiting", "done", "failed"


class HandshakeError(ConnectionError):
    """The daemon-to-daemon handshake failed; str(exc) says why, in words for an operator.

    ``remote`` is True when the text is the peer's (it refused us with a GOAWAY).
    """

    def __init__(self, message: str, *, remote: bool = False) -> None:
        super().__init__(message)
        self.remote = remote


def _short(fp: str, other: str) -> str:
    """Fingerprints are 32 hex digits; 12 tell them apart in practice (full if they do not)."""
    if len(fp) > 12 and fp[:12] != other[:12]:
        return fp[:12] + "…"
    return fp


def make_hello(role: str, services: Mapping[str, str], *, version: int | None = None,
               closures: Mapping[str, Any] | None = None) -> bytes:
    """Encode a HELLO record announcing this daemon's protocol version, role and services,
    and the services' closures (``closures``, else a ServiceSet's own; none: left out).

    ``version`` defaults to PROTOCOL_VERSION (tests pass another to play a newer peer).
    """
    if version is None:
        version = PROTOCOL_VERSION
    if role not in ROLES:
        raise ValueError(f"role must be 'client' or 'server', not {role!r}")
    hello: dict[str, Any] = {"version": version, "role": role, "services": dict(services)}
    packed: dict[str, Any] = {}
    total = 0
    for name, closure in sorted(_closures_of(services, closures).items()):
        if name not in services:
            continue
        blob = msgpack.packb(closure, use_bin_type=True)
        total += len(blob)
        if total > MAX_CLOSURES_BYTES:
            break  # the rest: fingerprints only (a mismatch on them is refused, as without closures)
        packed[name] = closure
    if packed:
        hello["closures"] = packed
    payload = msgpack.packb(hello, use_bin_type=True)
    return encode_record(HELLO, 0, 0, 0, 0, 0, 0, b"", payload)


def _decode_hello(record: Any) -> dict:
    kind = record.kind
    if kind != HELLO:
        if kind == GOAWAY:
            raise HandshakeError(parse_goaway(record) or "peer refused the handshake (no reason given)", remote=True)
        raise HandshakeError(f"expected a HELLO record to start the connection, got a record of kind {kind}")
    try:
        hello = msgpack.unpackb(bytes(record.payload), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, UnicodeDecodeError, ...)
        raise HandshakeError(f"malformed HELLO payload: not valid msgpack ({exc})") from None
    if not isinstance(hello, dict):
        raise HandshakeError(f"malformed HELLO payload: expected a map, got {type(hello).__name__}")
    version = hello.get("version")
    if type(version) is not int:
        raise HandshakeError(f"malformed HELLO payload: 'version' must be an int, got {version!r:.60}")
    return hello


def check_hello(
    local_services: Mapping[str, str],
    record: Any,
    *,
    expect_role: str | None = None,
    version: int | None = None,
    local_closures: Mapping[str, Any] | None = None,
) -> dict:
    """Validate a peer's HELLO record against this daemon's services.

    Returns ``{"version": int, "role": str, "services": {name: fingerprint}}``, plus
    ``"closures": {name: the peer's closure}`` for the services whose fingerprints differ
    but whose closures are compatible (both sides sent theirs; the receiving daemon
    transcodes those services' payloads, marshal/evolve.py); raises
    ``HandshakeError`` with an operator-readable reason on any problem (a GOAWAY record
    from the peer raises with the peer's reason and ``remote=True``).
    """
    ours = PROTOCOL_VERSION if version is None else version
    hello = _decode_hello(record)
    peer_version = hello["version"]
    if peer_version != ours:
        raise HandshakeError(f"protocol version {peer_version} from peer, this daemon speaks {ours}")
    role = hello.get("role")
    if role not in ROLES:
        raise HandshakeError(f"malformed HELLO payload: 'role' must be 'client' or 'server', got {role!r:.60}")
    if expect_role is not None and role != expect_role:
        raise HandshakeError(f"peer says it is a {role}, expected a {expect_role}")
    services = hello.get("services")
    if not isinstance(services, dict):
        raise HandshakeError(
            f"malformed HELLO payload: 'services' must be a map of name to fingerprint, got {type(services).__name__}"
        )
    if len(services) > MAX_SERVICES:
        raise HandshakeError(f"malformed HELLO payload: {len(services)} services (at most {MAX_SERVICES})")
    for name, fp in services.items():
        if not isinstance(name, str) or not isinstance(fp, str) or len(name) > MAX_NAME_LEN or len(fp) > MAX_FINGERPRINT_LEN:
            raise HandshakeError(
                f"malformed HELLO payload: service entry {name!r:.80} -> {fp!r:.80} is not a (name, fingerprint) string pair"
            )
    peer_closures = hello.get("closures", {})
    if not isinstance(peer_closures, dict):
        raise HandshakeError(f"malformed HELLO payload: 'closures' must be a map, got {type(peer_closures).__name__}")
    ours_closures = _closures_of(local_services, local_closures)
    evolved: dict[str, Any] = {}
    for name in sorted(services.keys() & local_services.keys()):
        our_fp, their_fp = local_services[name], services[name]
        if our_fp == their_fp:
            continue
        if name in peer_closures and name in ours_closures:
            evolved[name] = _check_evolution(name, their_fp, peer_closures[name], ours_closures[name])
            continue
        raise HandshakeError(
            f"schema mismatch for service {name}: local fingerprint {_short(our_fp, their_fp)}, "
            f"peer {_short(their_fp, our_fp)}; regenerate stubs from the same .proto"
        )
    out = {"version": peer_version, "role": role, "services": dict(services)}
    if evolved:
        out["closures"] = evolved
    return out


def incompatible_changes(reasons: list[str]) -> str:
    """The first MAX_REASONS of `compare`'s reasons, for a refusal's text."""
    more = f" (and {len(reasons) - MAX_REASONS} more)" if len(reasons) > MAX_REASONS else ""
    return f"incompatible changes: {'; '.join(reasons[:MAX_REASONS])}{more}"


def _check_evolution(name: str, their_fp: str, theirs: Any, ours: Any) -> Any:
    """The peer's closure of service `name` if it is compatible with ours; HandshakeError
    naming the first differences if not (or if it is malformed)."""
    try:
        peer_schema, svc = closure_schema(theirs)
        if svc != name or peer_schema.fingerprint(name) != their_fp:
            raise SchemaError("it does not match the fingerprint announced for it")
    except SchemaError as exc:
        raise HandshakeError(f"malformed HELLO payload: the closure of service {name!r:.80}: {exc}") from None
    local_schema, _ = closure_schema(ours)
    reasons = compare(peer_schema, local_schema, name)
    if reasons:
        raise HandshakeError(f"schema mismatch for service {name}: {incompatible_changes(reasons)}")
    return theirs


def make_goaway(details: str | None = None) -> bytes:
    """Encode a GOAWAY record; ``details`` (if any) travels as ``:details`` metadata."""
    meta = b""
    if details:
        meta = encode_metadata([(":details", details[:MAX_DETAILS_LEN])], internal=True)
    return encode_record(GOAWAY, 0, 0, 0, 0, 0, 0, meta, b"")


def parse_goaway(record: Any) -> str:
    """The ``:details`` text of a GOAWAY record ("" if none). Never raises on bad metadata."""
    meta = record.meta
    if not meta:
        return ""
    try:
        pairs = decode_metadata(bytes(meta))
    except (RecordError, ValueError, TypeError):
        return "(GOAWAY with malformed metadata)"
    for key, value in pairs:
        if key == ":details":
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("utf-8", "replace")
            return str(value)[:MAX_DETAILS_LEN]
    return ""


class Handshake:
    """One side's handshake. States: ``waiting`` → ``done`` | ``failed``.

    >>> hs = Handshake("client", {"helloworld.Greeter": fp})
    >>> to_send = hs.start()          # client: [HELLO]; server: []
    >>> to_send = hs.receive(record)  # feed each record until hs.state != "waiting"

    ``receive`` returns the encoded records to send (the server's HELLO, or a GOAWAY
    explaining a failure). After ``done``: ``peer_hello`` holds the peer's validated HELLO.
    After ``failed``: ``error`` is the ``HandshakeError``; ``goaway_sent`` says whether the
    reason was sent to the peer (it is not when the peer itself refused us).
    """

    def __init__(self, role: str, local_services: Mapping[str, str], *, version: int | None = None) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.version = PROTOCOL_VERSION if version is None else version
        self.local_services = copy_services(local_services)
        self.state = WAITING
        self.peer_hello: dict | None = None
        self.error: HandshakeError | None = None
        self.goaway_sent = False
        self._started = False

    def start(self) -> list[bytes]:
        """What to send when the connection opens: the client speaks first."""
        if self._started:
            return []
        self._started = True
        if self.role == "client":
            return [make_hello("client", self.local_services, version=self.version)]
        return []

    def receive(self, record: Any) -> list[bytes]:
        if self.state != WAITING:
            raise RuntimeError(f"handshake already {self.state}")
        if not self._started and self.role == "client":
            raise RuntimeError("client handshake: call start() and send its HELLO first")
        self._started = True
        expect = "server" if self.role == "client" else "client"
        try:
            hello = check_hello(self.local_services, record, expect_role=expect, version=self.version)
        except HandshakeError as exc:
            self.state = FAILED
            self.error = exc
            if exc.remote:  # the peer refused us (GOAWAY): nothing to answer
                return []
            self.goaway_sent = True
            return [make_goaway(str(exc))]
        self.peer_hello = hello
        self.state = DONE
        if self.role == "server":
            return [make_hello("server", self.local_services, version=self.version)]
        return []

    def fail(self, reason: str) -> list[bytes]:
        """Abort from outside (timeout, connection lost): state → failed, returns a GOAWAY."""
        if self.state != WAITING:
            return []
        self.state = FAILED
        self.error = HandshakeError(reason)
        self.goaway_sent = True
        return [make_goaway(reason)]
