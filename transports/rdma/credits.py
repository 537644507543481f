"""Credit-based flow control for one RDMA RC connection, sans-I/O.

Why credits: an RC SEND consumes one receive buffer the peer posted. If none is posted
the peer's NIC answers "receiver not ready", the sender's NIC retries and finally breaks
the queue pair. So a sender must never send without knowing a buffer waits for it: each
side posts ``recv_buffers`` buffers, the peer starts with that many credits, spends one
per SEND, and gets them back as the receiver reposts buffers.

Returns travel two ways: piggy-backed on every outgoing message (the header's u16
``credits`` field carries all returns pending), or, when returns pile up past
``threshold`` and no data can carry them, in an explicit credit-update message.

A credit update is itself a SEND and costs a credit, which the peer owes back like any
other. With a threshold of 1 that return would trigger an update of its own, forever;
with ``threshold >= 2`` an update needs two incoming messages to cause one, so chains of
updates die out. The last ``reserve`` credit(s) are kept for updates: data may only be sent while ``send_credits > reserve``. With
``threshold <= recv_buffers - reserve`` this cannot deadlock: a side blocked on credits
has at least ``recv_buffers - reserve`` messages unreturned at the peer; once processed,
the peer's pending returns reach the threshold and it sends an update (with its reserved
credit if need be). tests/test_rdma_channel.py checks this over random interleavings.

The receiver side checks the peer plays by the rules: a message arriving when we granted
no credit, data arriving on the reserved credit, or more credits returned than were
outstanding, is a ``CreditError`` (the connection is closed with that reason).
"""
from __future__ import annotations

__all__ = ["CreditError", "CreditWindow", "MAX_RETURN"]

MAX_RETURN = 0xFFFF  # the header's credits field is a u16


class CreditError(ValueError):
    """The peer broke the credit protocol; str(exc) says how."""


class CreditWindow:
    """Both directions of credit accounting for one connection.

    Sender side: ``send_credits`` (what we may still spend toward the peer),
    ``unreturned`` (spent and not yet returned). Receiver side: ``granted`` (buffers the
    peer may still fill, as far as it can know), ``pending_return`` (buffers reposted but
    not yet returned to the peer).
    """

    __slots__ = ("recv_buffers", "peer_buffers", "threshold", "reserve", "send_credits",
                 "unreturned", "granted", "pending_return", "held")

    def __init__(self, recv_buffers: int, peer_buffers: int, *, threshold: int | None = None,
                 reserve: int = 1) -> None:
        if type(reserve) is not int or reserve < 1:
            raise ValueError(f"reserve must be an int >= 1, got {reserve!r}")
        for name, value in (("recv_buffers", recv_buffers), ("peer_buffers", peer_buffers)):
            if type(value) is not int or not (reserve + 2 <= value <= MAX_RETURN):
                raise ValueError(f"{name} must be an int in [{reserve + 2}, {MAX_RETURN}], got {value!r}")
        if threshold is None:
            threshold = max(2, min(recv_buffers // 2, recv_buffers - reserve))
        if type(threshold) is not int or not (2 <= threshold <= recv_buffers - reserve):
            raise ValueError(
                f"threshold must be in [2, recv_buffers - reserve = {recv_buffers - reserve}], got {threshold!r}"
                " (1 makes credit updates answer each other forever; more than recv_buffers - reserve"
                " could leave a blocked peer waiting for returns forever)"
            )
        self.recv_buffers = recv_buffers
        self.peer_buffers = peer_buffers
        self.threshold = threshold
        self.reserve = reserve
        self.send_credits = peer_buffers
        self.unreturned = 0
        self.granted = recv_buffers
        self.pending_return = 0
        self.held = False  # True while reading is paused: returns are withheld (backpressure)

    # ---------------------------------------------------------------- sending

    def can_send_data(self) -> bool:
        return self.send_credits > self.reserve

    def _spend(self) -> int:
        self.send_credits -= 1
        self.unreturned += 1
        if self.held:
            return 0
        ret = min(self.pending_return, MAX_RETURN)
        self.pending_return -= ret
        self.granted += ret
        return ret

    def take_for_data(self) -> int:
        """Spend one credit on a data message; returns the credits to piggy-back on it."""
        if not self.can_send_data():
            raise RuntimeError(f"no credit for data ({self.send_credits} left, {self.reserve} reserved)")
        return self._spend()

    def wants_update(self, data_waiting: bool) -> bool:
        """True if an explicit credit update should go now: returns reached the threshold
        and no data message will carry them (none waiting, or data blocked on credits)."""
        if self.held or self.pending_return < self.threshold or self.send_credits < 1:
            return False
        return not data_waiting or not self.can_send_data()

    def take_for_update(self) -> int:
        """Spend one credit (the reserve if need be) on a credit-update message."""
        if self.send_credits < 1:
            raise RuntimeError("no credit left, not even the reserved one")
        return self._spend()

    # ---------------------------------------------------------------- receiving

    def on_message(self, is_data: bool, returned: int) -> None:
        """The peer's message arrived in one of our buffers and returned ``returned`` credits."""
        if self.granted < 1:
            raise CreditError("peer sent a message without credit (all our receive buffers were in use)")
        if is_data and self.granted <= self.reserve:
            raise CreditError(f"peer sent data on its reserved credit (only {self.granted} granted)")
        if type(returned) is not int or returned < 0 or returned > self.unreturned:
            raise CreditError(f"peer returned {returned} credits but only {self.unreturned} were outstanding")
        self.granted -= 1
        self.unreturned -= returned
        self.send_credits += returned

    def on_reposted(self, n: int = 1) -> None:
        """``n`` of our receive buffers were consumed and posted again: owe the peer n credits."""
        if n < 0 or self.granted + self.pending_return + n > self.recv_buffers:
            raise RuntimeError(f"reposted {n} buffers, more than the peer ever filled")
        self.pending_return += n

    def __repr__(self) -> str:
        return (f"<CreditWindow send={self.send_credits} unreturned={self.unreturned} "
                f"granted={self.granted} pending_return={self.pending_return}>")
