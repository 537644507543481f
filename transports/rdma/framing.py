"""Message framing over fixed-size receive buffers, sans-I/O.

The scheme (docs/RDMA.md, "Framing"): the records a connection sends form one byte
stream, exactly the TCP wire (INTERNALS.md records: 40-byte header + meta + payload).
The stream is cut into SEND messages that each fit one of the peer's receive buffers;
every message starts with an 8-byte message header:

    u8 op (1 DATA, 2 CREDIT), u8 reserved (0), u16 credits returned, u32 data length

followed by ``length`` stream bytes (0 for CREDIT). Many small records share one
message, a large record spans several; RC delivers SENDs reliably and in order, so the
receiver rebuilds records with the same bounds-checked ``FrameDecoder`` the TCP
transport uses.

Why not RDMA WRITE into a registered region with a rendezvous: it costs a round trip
per large record, and it hands the peer an rkey that lets it write anywhere in that
region at any time, while the daemon is the trust boundary. SENDs land only in buffers
we posted, credits map one to one onto those buffers, and one code path serves all sizes.
The price is a copy of large records out of the receive buffers, which the receive path
makes anyway (the records go to the app's ring).
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable

from mrpcd.marshal.records import FrameDecoder, RecordError

__all__ = [
    "MSG_HEADER", "MSG_HEADER_SIZE", "OP_DATA", "OP_CREDIT", "FramingError",
    "Segment", "encode_header", "decode_header", "OutStream", "InStream",
]

MSG_HEADER = struct.Struct("<BBHI")
MSG_HEADER_SIZE = MSG_HEADER.size  # 8
OP_DATA, OP_CREDIT = 1, 2


class FramingError(ValueError):
    """A received message breaks the framing (bad header, length, or record inside)."""


@dataclass(frozen=True)
class Segment:
    """``length`` bytes at ``offset`` of ``source``.

    ``source`` is a registered region's name (str: the bytes are sent from there by
    scatter-gather) or a buffer object (bytes-like: the bytes are staged, i.e. copied
    into a registered send slot).
    """

    source: Any
    offset: int
    length: int

    @property
    def registered(self) -> bool:
        return isinstance(self.source, str)

    def view(self, regions: dict[Hashable, Any] | None = None) -> memoryview:
        if not self.registered:
            buf = self.source
        elif regions is None:
            raise ValueError(f"a segment of registered region {self.source!r} needs the regions to be viewed")
        else:
            buf = regions[self.source]
        return memoryview(buf)[self.offset:self.offset + self.length]


def encode_header(op: int, credits: int, length: int) -> bytes:
    return MSG_HEADER.pack(op, 0, credits, length)


def decode_header(data: bytes | memoryview) -> tuple[int, int, int]:
    """Check a received message (header + body, exactly as long as the completion says)."""
    n = len(data)
    if n < MSG_HEADER_SIZE:
        raise FramingError(f"message of {n} bytes is shorter than the {MSG_HEADER_SIZE}-byte header")
    op, reserved, credits, length = MSG_HEADER.unpack_from(data)
    if op not in (OP_DATA, OP_CREDIT):
        raise FramingError(f"unknown message op {op}")
    if reserved:
        raise FramingError(f"reserved header byte is {reserved}, must be 0")
    if length != n - MSG_HEADER_SIZE:
        raise FramingError(f"header says {length} data bytes, message carries {n - MSG_HEADER_SIZE}")
    if op == OP_DATA and length == 0:
        raise FramingError("DATA message with no data")
    if op == OP_CREDIT and length:
        raise FramingError(f"CREDIT message carries {length} data bytes")
    return op, credits, length


class OutStream:
    """Records waiting to be sent, as segments; ``take`` cuts the next message's worth."""

    def __init__(self) -> None:
        self._q: deque[Segment] = deque()
        self.bytes = 0

    def __bool__(self) -> bool:
        return self.bytes > 0

    def push(self, seg: Segment) -> None:
        if seg.length < 0 or seg.offset < 0:
            raise ValueError(f"bad segment {seg}")
        if seg.length:
            self._q.append(seg)
            self.bytes += seg.length

    def take(self, max_bytes: int, max_sge: int) -> list[Segment]:
        """Up to ``max_bytes`` from the front, needing at most ``max_sge`` SGEs with the
        header (``plan.plan_message``: the header and each run of staged pieces share the
        send slot; a registered piece, and a staged run after one, each need an SGE of
        their own). A segment that does not fit whole is split."""
        if max_bytes <= 0 or max_sge < 1:
            raise ValueError("max_bytes and max_sge must be positive")
        out: list[Segment] = []
        room = max_bytes
        sges = 1  # the header
        in_slot = True
        q = self._q
        while q and room:
            seg = q[0]
            if seg.registered or not in_slot:
                if sges == max_sge:
                    break
                sges += 1
            in_slot = not seg.registered
            if seg.length <= room:
                q.popleft()
                out.append(seg)
                room -= seg.length
            else:
                out.append(Segment(seg.source, seg.offset, room))
                q[0] = Segment(seg.source, seg.offset + room, seg.length - room)
                room = 0
        self.bytes -= max_bytes - room
        return out


class InStream:
    """The receiving end: message bodies in, whole records out (bounds-checked)."""

    def __init__(self, max_record: int) -> None:
        self._dec = FrameDecoder(max_record)

    def feed(self, body: bytes | memoryview) -> list[Any]:
        try:
            return self._dec.feed(body)  # records come out as private copies
        except RecordError as exc:
            err = FramingError(f"malformed record from peer: {exc}")
            err.records = list(getattr(exc, "records", []) or [])  # type: ignore[attr-defined]
            raise err from None

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete record held (a record spans several messages)."""
        value = self._dec.buffered
        return int(value() if callable(value) else value)
