"""Per-call flow control, sans-I/O: byte credits granted back by the receiver in batches.

Why: without it a server streaming to a slow client fills the client's per-call buffer
without bound. Each stream direction of a call has a window of INITIAL_WINDOW bytes (a
message record costs header + metadata + payload). The sender may send while its credit
is positive, so at most one window plus one message is ever buffered per call; the
receiver grants consumed bytes back in one WINDOW record once half a window has been
consumed, so a fast stream costs one small record per half window, not one per message.
Records that end a call, and CANCEL records, never wait for credit. The I/O (blocking,
awaiting, sending the WINDOW record) is the sync and asyncio libraries' job.
"""
from __future__ import annotations

from .marshal import records as R

INITIAL_WINDOW = 256 * 1024
MAX_GRANT = 0xFFFFFFFF


def cost(payload_len: int, meta_len: int = 0) -> int:
    """What one message record counts against the window."""
    return R.HEADER_SIZE + meta_len + payload_len


class SendCredit:
    """The sender's view: bytes it may still send before waiting for a grant."""

    __slots__ = ("credit",)

    def __init__(self, window: int = INITIAL_WINDOW) -> None:
        self.credit = window

    def available(self) -> bool:
        return self.credit > 0

    def spend(self, n: int) -> None:
        self.credit -= n

    def grant(self, n: int) -> bool:
        """Add credit; True if the sender was blocked and may go on now."""
        was_blocked = self.credit <= 0
        self.credit += n
        return was_blocked and self.credit > 0


class RecvWindow:
    """The receiver's view: counts consumed bytes and says when to grant them back."""

    __slots__ = ("window", "consumed")

    def __init__(self, window: int = INITIAL_WINDOW) -> None:
        self.window = window
        self.consumed = 0

    def consume(self, n: int) -> int:
        """Record that the application took a message of cost n; bytes to grant now (or 0)."""
        self.consumed += n
        if self.consumed >= self.window // 2:
            grant, self.consumed = min(self.consumed, MAX_GRANT), 0
            return grant
        return 0


def window_record(handle: int, call_id: int, grant: int) -> bytes:
    """A WINDOW record granting `grant` bytes of credit on one call (method_id carries it)."""
    if not 0 < grant <= MAX_GRANT:
        raise ValueError(f"a window grant must be 1..{MAX_GRANT} bytes, got {grant}")
    return R.encode_record(R.WINDOW, R.F_NO_MSG, 0, handle, call_id, grant, 0, b"", b"")
