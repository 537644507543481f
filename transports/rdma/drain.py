"""Who waits for an RDMA connection's send backlog to go down (sans-I/O).

Why: the daemon stops reading a peer that sends calls but does not take their answers
(session `_check_answer_backlog`) and resumes once the connection's `drain()` completes.
TCP's drain completes when the kernel takes writes again; an RDMA connection has no kernel
buffer, its backlog is the bytes queued in `ChannelCore` waiting for the peer's credits (a
peer that does not read does not return credits). So drain() completes once that backlog
is down to `low_water`, and fails if the connection closes first, as TCP's does.

No event loop here: the owner passes the future to park and reports the backlog after
every step that can lower it (completions, credit updates, a pump).
"""
from __future__ import annotations

import asyncio

DEFAULT_LOW_WATER = 64 * 1024  # as a TCP transport's default low-water mark


class DrainWaiters:
    """Futures waiting for the backlog to reach `low_water` bytes or less."""

    def __init__(self, low_water: int = DEFAULT_LOW_WATER) -> None:
        if low_water < 0:
            raise ValueError(f"low_water must be >= 0, got {low_water}")
        self.low_water = low_water
        self._waiting: list[asyncio.Future[None]] = []
        self._error: str | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def park(self, fut: "asyncio.Future[None]", backlog: int) -> "asyncio.Future[None]":
        """Complete `fut` now if the backlog is low (or fail it if the connection failed),
        else keep it until `update` sees the backlog low."""
        if self._error is not None:
            fut.set_exception(ConnectionError(self._error))
        elif backlog <= self.low_water:
            fut.set_result(None)
        else:
            self._waiting.append(fut)
        return fut

    def update(self, backlog: int) -> int:
        """The backlog is now `backlog` bytes: complete the waiters if it is low enough.
        Returns how many were completed."""
        if not self._waiting or backlog > self.low_water:
            return 0
        waiting, self._waiting = self._waiting, []
        done = 0
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)
                done += 1
        return done

    def fail(self, reason: str) -> None:
        """The connection is gone: every waiter, and every later park, fails with a
        ConnectionError saying `reason` (one exception per future: a traceback attached to
        one must not grow on the others)."""
        self._error = reason
        waiting, self._waiting = self._waiting, []
        for fut in waiting:
            if not fut.done():
                fut.set_exception(ConnectionError(reason))
