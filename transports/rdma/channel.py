"""One RDMA connection's protocol logic, sans-I/O: credits + framing + SGE limits.

The verbs shell (verbs.py) drives it; tests drive two of them through a simulated link::

    core = ChannelCore(recv_buffers=64, peer_recv_buffers=64, peer_buf_size=8192, ...)
    core.send_records([rec_bytes, ...])      # queue encoded records (or Segments)
    for msg in core.poll(limit=free_send_slots):
        post a SEND: msg.header + msg.segments (inline if msg.inline)
    records = core.on_message(buffer_bytes)  # a receive completion, exactly byte_len bytes
    repost the buffer; core.reposted()       # owe the peer that credit
    core.poll(...)                           # may now carry a credit update

Any violation by the peer (framing, credits, a malformed record) raises ``ProtocolError``
with the reason; the core is failed afterwards and the shell closes the connection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .credits import CreditError, CreditWindow
from .framing import (
    MSG_HEADER_SIZE,
    OP_CREDIT,
    OP_DATA,
    FramingError,
    InStream,
    OutStream,
    Segment,
    decode_header,
    encode_header,
)

__all__ = ["ProtocolError", "OutMessage", "ChannelCore"]


class ProtocolError(ConnectionError):
    """The peer broke the RDMA transport's protocol; ``records`` are the good records
    that came before the violation (deliver them, then close)."""

    def __init__(self, message: str, records: list | None = None) -> None:
        super().__init__(message)
        self.records = records or []


@dataclass(frozen=True)
class OutMessage:
    """One SEND to post: ``header`` then the bytes of ``segments`` (``length`` of them)."""

    op: int
    credits: int
    header: bytes
    segments: list[Segment]
    length: int
    inline: bool

    @property
    def size(self) -> int:
        return MSG_HEADER_SIZE + self.length


class ChannelCore:
    def __init__(self, *, recv_buffers: int, peer_recv_buffers: int, peer_buf_size: int,
                 max_msg: int, max_sge: int, max_inline: int = 0, max_record: int = 16 << 20,
                 threshold: int | None = None) -> None:
        self.msg_limit = min(peer_buf_size, max_msg)
        if self.msg_limit <= MSG_HEADER_SIZE:
            raise ValueError(f"message size limit {self.msg_limit} leaves no room after the header")
        if max_sge < 1:
            raise ValueError(f"max_sge must be >= 1, got {max_sge}")
        self.max_sge = max_sge
        self.max_inline = max_inline
        self.credits = CreditWindow(recv_buffers, peer_recv_buffers, threshold=threshold)
        self.out = OutStream()
        self.inp = InStream(max_record)
        self.error: Exception | None = None
        self.messages_out = self.messages_in = self.records_out = self.records_in = 0

    # ---------------------------------------------------------------- sending

    def send_records(self, records: Iterable[Any]) -> None:
        """Queue encoded records (bytes-like: staged; ``Segment``: sent from its region)."""
        self._check()
        for rec in records:
            self.out.push(rec if isinstance(rec, Segment) else Segment(rec, 0, len(rec)))
            self.records_out += 1

    @property
    def queued_bytes(self) -> int:
        return self.out.bytes

    def poll(self, limit: int) -> list[OutMessage]:
        """Messages to post now, at most ``limit`` (free send slots / send queue room).

        Data while credits allow, then a credit update if returns piled up and no data
        message will carry them.
        """
        self._check()
        out: list[OutMessage] = []
        cw = self.credits
        room = self.msg_limit - MSG_HEADER_SIZE
        while len(out) < limit and self.out and cw.can_send_data():
            segs = self.out.take(room, self.max_sge)
            length = sum(s.length for s in segs)
            ret = cw.take_for_data()
            out.append(self._message(OP_DATA, ret, segs, length))
        if len(out) < limit and cw.wants_update(bool(self.out)):
            out.append(self._message(OP_CREDIT, cw.take_for_update(), [], 0))
        self.messages_out += len(out)
        return out

    def _message(self, op: int, credits: int, segs: list[Segment], length: int) -> OutMessage:
        size = MSG_HEADER_SIZE + length
        return OutMessage(op, credits, encode_header(op, credits, length), segs, length, size <= self.max_inline)

    # ---------------------------------------------------------------- receiving

    def on_message(self, data: bytes | memoryview) -> list[Any]:
        """A receive completion's bytes (exactly ``byte_len``): returns the whole records.

        The caller reposts the buffer once this returns (records are private copies)
        and then calls ``reposted()``.
        """
        self._check()
        try:
            op, credits, _length = decode_header(data)
            self.credits.on_message(op == OP_DATA, credits)
        except (FramingError, CreditError) as exc:
            self._fail(ProtocolError(f"protocol error from peer: {exc}"))
        self.messages_in += 1
        if op != OP_DATA:
            return []
        try:
            recs = self.inp.feed(memoryview(data)[MSG_HEADER_SIZE:])
        except FramingError as exc:
            good = getattr(exc, "records", [])
            self.records_in += len(good)
            self._fail(ProtocolError(str(exc), good))
        self.records_in += len(recs)
        return recs

    def reposted(self, n: int = 1) -> None:
        self.credits.on_reposted(n)

    def hold_credits(self, hold: bool) -> None:
        """Withhold credit returns (pause_reading: the peer runs out and stops), or not."""
        self.credits.held = hold

    # ---------------------------------------------------------------- state

    def _fail(self, exc: Exception) -> None:
        self.error = exc
        raise exc

    def _check(self) -> None:
        if self.error is not None:
            raise ConnectionError(f"channel failed earlier: {self.error}")
