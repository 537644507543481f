"""Connection setup over the TCP side channel, sans-I/O.

An RC queue pair needs the peer's QP number, starting PSN and address (GID, and LID on
InfiniBand) before it can leave INIT; credits need the peer's receive-buffer count and
size. The daemons exchange them over a TCP connection that first runs the ordinary
handshake (transports/handshake.py: protocol version, schema fingerprints, GOAWAY with a
reason on mismatch), then these records (kind HELLO, told apart by ``method_id``)::

    client → server   HELLO(role client)      + PARAMS(client)   client QP is in INIT
    server → client   HELLO(role server)      + PARAMS(server)   server QP is in RTS
    client → server   READY                                      client QP is in RTS

The server moves to RTS before answering and the client before READY, so nobody sends
to a queue pair that cannot receive yet. Receive buffers are posted before RTR. The TCP
connection then stays open as the control channel: GOAWAY with a reason on close, EOF
when a daemon dies.

PARAMS payload (msgpack map): ``qpn`` (u24), ``psn`` (u24), ``gid`` (16 bytes), ``lid``
(u16), ``mtu`` (256..4096 bytes), ``recv_buffers`` (credits granted, 3..65535),
``buf_size`` (bytes per receive buffer), ``max_msg`` (largest message the port takes).
No rkey / address is sent: the framing never uses RDMA WRITE (framing.py says why), so
no peer gets remote access to our memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import msgpack

from mrpcd.marshal.records import GOAWAY, HELLO, encode_record
from mrpcd.transports.handshake import (
    DONE, FAILED, WAITING, Handshake, HandshakeError, make_goaway, parse_goaway,
)

__all__ = ["ConnParams", "SetupError", "RdmaSetup", "encode_params", "decode_params",
           "PARAMS_METHOD", "READY_METHOD", "MTUS"]

PARAMS_METHOD = 0x52444D41  # "RDMA"
READY_METHOD = 0x52445952   # "RDYR"
MTUS = (256, 512, 1024, 2048, 4096)
MAX_BUF = 1 << 24


class SetupError(HandshakeError):
    """The RDMA parameter exchange failed; the text says why."""


@dataclass(frozen=True)
class ConnParams:
    qpn: int
    psn: int
    gid: bytes
    lid: int
    mtu: int
    recv_buffers: int
    buf_size: int
    max_msg: int

    def validate(self) -> "ConnParams":
        def bad(what: str) -> SetupError:
            return SetupError(f"bad RDMA parameters from peer: {what}")
        for name, hi in (("qpn", 0xFFFFFF), ("psn", 0xFFFFFF), ("lid", 0xFFFF), ("max_msg", 1 << 31)):
            v = getattr(self, name)
            if type(v) is not int or not 0 <= v <= hi:
                raise bad(f"{name} must be an int in [0, {hi}], got {v!r:.40}")
        if type(self.gid) is not bytes or len(self.gid) != 16:
            raise bad(f"gid must be 16 bytes, got {self.gid!r:.60}")
        if self.mtu not in MTUS:
            raise bad(f"mtu must be one of {MTUS}, got {self.mtu!r:.40}")
        if type(self.recv_buffers) is not int or not 3 <= self.recv_buffers <= 0xFFFF:
            raise bad(f"recv_buffers must be in [3, 65535], got {self.recv_buffers!r:.40}")
        if type(self.buf_size) is not int or not 64 < self.buf_size <= MAX_BUF:
            raise bad(f"buf_size must be in (64, {MAX_BUF}], got {self.buf_size!r:.40}")
        if self.max_msg <= 64:
            raise bad(f"max_msg {self.max_msg} is too small")
        return self


def encode_params(p: ConnParams) -> bytes:
    return encode_record(HELLO, 0, 0, 0, 0, PARAMS_METHOD, 0, b"", msgpack.packb(asdict(p), use_bin_type=True))


def encode_ready() -> bytes:
    return encode_record(HELLO, 0, 0, 0, 0, READY_METHOD, 0, b"", b"")


def decode_params(record: Any) -> ConnParams:
    if record.kind != HELLO or record.method_id != PARAMS_METHOD:
        raise SetupError(f"expected the peer's RDMA parameters, got a record of kind {record.kind} "
                         f"(method {record.method_id:#x}); is the peer running transport: rdma?")
    try:
        d = msgpack.unpackb(bytes(record.payload), raw=False)
    except Exception as exc:
        raise SetupError(f"bad RDMA parameters from peer: not msgpack ({exc})") from None
    fields = ConnParams.__dataclass_fields__.keys()
    if not isinstance(d, dict) or set(d) != set(fields):
        got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
        raise SetupError(f"bad RDMA parameters from peer: expected keys {sorted(fields)}, got {got}")
    return ConnParams(**d).validate()


class RdmaSetup:
    """One side's setup exchange: ``handshake`` → ``params`` → ``ready`` → done.

    ``start()`` / ``receive(record)`` return records to send. When ``need_local`` is
    True the shell creates its QP (INIT, receives posted) and calls ``local_ready(params)``
    (server: after the QP is in RTS; client: before, at start). ``peer_params`` is set once
    known; the client then moves its QP to RTS and calls ``client_rts()`` (sends READY).
    """

    def __init__(self, role: str, services: Mapping[str, str], *, version: int | None = None) -> None:
        self.role = role
        self.hs = Handshake(role, services, version=version)
        self.state = WAITING
        self.error: HandshakeError | None = None
        self.peer_params: ConnParams | None = None
        self.local: ConnParams | None = None
        self._phase = "hello"
        self._server_reply: list[bytes] = []

    @property
    def peer_hello(self) -> dict | None:
        return self.hs.peer_hello

    def start(self, local: ConnParams | None = None) -> list[bytes]:
        out = self.hs.start()
        if self.role == "client":
            if local is None:
                raise ValueError("the client sends its parameters with its HELLO")
            self.local = local
            out.append(encode_params(local))
        return out

    @property
    def need_local(self) -> bool:
        """Server: the HELLO checked out, create the QP and call local_ready()."""
        return self.role == "server" and self._phase == "server-params" and self.local is None

    def local_ready(self, local: ConnParams) -> list[bytes]:
        if not self.need_local:
            raise RuntimeError("local_ready() is for the server, after the client's parameters")
        self.local = local
        self._phase = "ready"
        return self._server_reply + [encode_params(local)]

    def client_rts(self) -> list[bytes]:
        if self.role != "client" or self._phase != "rts":
            raise RuntimeError("client_rts() is for the client, after the server's parameters")
        self._phase = "done"
        self.state = DONE
        return [encode_ready()]

    def fail(self, reason: str) -> list[bytes]:
        if self.state != WAITING:
            return []
        out = self.hs.fail(reason) if self.hs.state == WAITING else []
        if not out:
            out = [make_goaway(reason)]
        self.state = FAILED
        self.error = SetupError(reason)
        return out

    def receive(self, record: Any) -> list[bytes]:
        if self.state != WAITING:
            raise RuntimeError(f"setup already {self.state}")
        try:
            return self._receive(record)
        except SetupError as exc:
            return self.fail(str(exc))

    def _receive(self, record: Any) -> list[bytes]:
        if record.kind == GOAWAY and self._phase != "hello":
            self.state = FAILED
            self.error = HandshakeError(parse_goaway(record) or "peer refused the RDMA setup", remote=True)
            return []
        if self._phase == "hello":
            out = self.hs.receive(record)
            if self.hs.state == FAILED:
                self.state = FAILED
                self.error = self.hs.error
                return out
            if self.hs.state == DONE:
                self._phase = "peer-params"
                self._server_reply = out  # the server's HELLO goes with its params
                return []
            return out
        if self._phase == "peer-params":
            self.peer_params = decode_params(record)
            if self.role == "server":
                self._phase = "server-params"
                return []
            self._phase = "rts"
            return []
        if self._phase == "ready" and self.role == "server":
            if record.kind != HELLO or record.method_id != READY_METHOD:
                raise SetupError(f"expected READY from the client, got a record of kind {record.kind}")
            self._phase = "done"
            self.state = DONE
            return []
        raise SetupError(f"unexpected record of kind {record.kind} during RDMA setup ({self._phase})")
