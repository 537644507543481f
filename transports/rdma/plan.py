"""Registration plan and scatter-gather plans, sans-I/O.

Which memory the NIC may touch, and how (docs/RDMA.md, "Memory"):

* ``recv``: ``recv_buffers`` buffers of ``buf_size`` bytes, carved from one region (on
  the daemon, the destination side of the app's shared memory, or a private area).
  LOCAL_WRITE only: the NIC writes incoming SENDs there; no remote access, no rkey that
  would let a peer write at will.
* ``send``: ``send_slots`` slots of ``buf_size`` bytes: each outgoing message's 8-byte
  header, plus the bytes of records that arrive as Python objects (staged: copied once).
  No access flags (local read is always allowed).
* ``ring`` (optional): the app's ring memfd mapping, registered whole, so records that
  still sit in ring slots go out by scatter-gather without a copy. No access flags:
  the NIC only reads it.

Access flag values are the ``ibv_access_flags`` bits (verbs.py checks they match
pyverbs' enums when pyverbs is importable), so this module imports no pyverbs.

``plan_message`` turns one message (header + segments) into its SGE list: the header
and every staged run live in the message's send slot, each registered piece is its own
SGE; ``max_sge`` and the message size limit are respected by the caller's
``OutStream.take`` (see ``channel.ChannelCore``) and checked here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .framing import MSG_HEADER_SIZE, Segment

__all__ = [
    "ACCESS_LOCAL_WRITE", "ACCESS_REMOTE_WRITE", "ACCESS_REMOTE_READ",
    "Region", "Sge", "PlanError", "registration_plan", "recv_buffer_offsets", "plan_message",
]

ACCESS_LOCAL_WRITE = 1
ACCESS_REMOTE_WRITE = 2
ACCESS_REMOTE_READ = 4

MIN_BUF_SIZE = 256
MAX_BUF_SIZE = 1 << 24


class PlanError(ValueError):
    """A plan cannot be built from these limits (the text says which limit)."""


@dataclass(frozen=True)
class Region:
    """One memory registration: ``name``, ``length`` bytes, ``access`` flags, and why."""

    name: str
    length: int
    access: int
    purpose: str


@dataclass(frozen=True)
class Sge:
    """One scatter-gather element: ``length`` bytes at ``offset`` in region ``region``."""

    region: str
    offset: int
    length: int


def registration_plan(*, recv_buffers: int, buf_size: int, send_slots: int,
                      ring_size: int | None = None) -> list[Region]:
    """The regions one connection registers (see the module docstring for why each)."""
    if not (MIN_BUF_SIZE <= buf_size <= MAX_BUF_SIZE) or buf_size % 64:
        raise PlanError(f"buf_size must be a multiple of 64 in [{MIN_BUF_SIZE}, {MAX_BUF_SIZE}], got {buf_size}")
    if recv_buffers < 3:
        raise PlanError(f"need at least 3 receive buffers (one is reserved for credit updates, "
                        f"and the update threshold is at least 2), got {recv_buffers}")
    if send_slots < 1:
        raise PlanError(f"need at least 1 send slot, got {send_slots}")
    plan = [
        Region("recv", recv_buffers * buf_size, ACCESS_LOCAL_WRITE,
               f"{recv_buffers} receive buffers of {buf_size} B; the NIC writes incoming SENDs"),
        Region("send", send_slots * buf_size, 0,
               f"{send_slots} send slots of {buf_size} B: message headers and staged records"),
    ]
    if ring_size is not None:
        if ring_size <= 0:
            raise PlanError(f"ring mapping size must be positive, got {ring_size}")
        plan.append(Region("ring", ring_size, 0, "the app's ring memfd: records sent straight from ring slots"))
    return plan


def recv_buffer_offsets(recv_buffers: int, buf_size: int) -> list[int]:
    """Offsets of the receive buffers in the ``recv`` region (buffer i is wr_id i)."""
    return [i * buf_size for i in range(recv_buffers)]


def plan_message(slot_offset: int, segments: Sequence[Segment], *, slot_size: int,
                 max_sge: int, max_msg: int) -> tuple[list[Sge], list[tuple[int, Segment]]]:
    """SGEs for one message whose header sits at ``slot_offset`` of the ``send`` region.

    Returns ``(sges, copies)``: ``copies`` lists ``(offset in send region, segment)`` for
    every staged segment the caller must copy into the slot before posting. The SGEs,
    in order, cover exactly the header then the segments' bytes.
    """
    sges: list[Sge] = [Sge("send", slot_offset, MSG_HEADER_SIZE)]
    copies: list[tuple[int, Segment]] = []
    cursor = slot_offset + MSG_HEADER_SIZE  # next free byte of the slot
    last_in_slot = True  # the last SGE ends at cursor in the slot (can be extended)
    total = MSG_HEADER_SIZE
    for seg in segments:
        total += seg.length
        if seg.registered:
            sges.append(Sge(seg.source, seg.offset, seg.length))
            last_in_slot = False
            continue
        if cursor + seg.length > slot_offset + slot_size:
            raise PlanError(f"staged bytes exceed the {slot_size}-byte send slot")
        copies.append((cursor, seg))
        if last_in_slot:
            prev = sges[-1]
            sges[-1] = Sge("send", prev.offset, prev.length + seg.length)
        else:
            sges.append(Sge("send", cursor, seg.length))
            last_in_slot = True
        cursor += seg.length
    if len(sges) > max_sge:
        raise PlanError(f"message needs {len(sges)} SGEs, the device allows {max_sge}")
    if total > max_msg:
        raise PlanError(f"message of {total} bytes exceeds the limit of {max_msg}")
    return sges, copies
