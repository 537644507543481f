"""Adaptive wake-ups: after traffic, poll the apps' rings for a short while before sleeping.

An app that pushes a record into its tx ring signals the daemon's eventfd only when the
daemon has said it sleeps (the ring's `consumer_sleeping` flag). That wake-up is a context
switch; when the daemon's CPU has gone idle in the meantime (a VM halts an idle vCPU) it
costs tens of microseconds, several times per RPC along the chain client → daemon → peer
daemon → server and back. So the daemon sleeps only after `poll_us` without traffic: until
then, sessions whose tx ring ran empty are *held* here (flag down, so apps do not signal)
and the event loop ticks, checking their rings and, through uvloop's zero-timeout poll that
pending callbacks cause, its sockets. Records from any app or peer extend the window; when
it runs out every held session goes back to the eventfd protocol (`prepare_sleep`), so an
idle daemon uses no CPU. `poll_us: 0` turns polling off.

The window adapts, as the kernel's haltpoll governor does: each time records move, the
gap since the previous movement says whether polling would have paid. A gap within
`poll_us` doubles the window (up to `poll_us`); a longer one halves it, down to nothing.
Steady request/response traffic polls; sparse traffic (a call every few milliseconds)
stops polling within a few calls instead of burning a window of CPU after each one.

Why the event loop and not a spinning thread: the rings and sockets are served by the loop
anyway, one tick costs a few microseconds, and between ticks other callbacks (control
requests, timers) run as usual. Each tick yields the CPU (`sched_yield`) so a process woken
on the same CPU, an app or a peer daemon on a small machine, runs at once.
"""
from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Callable, cast


class Poller:
    """The daemon's one poll window, shared by all sessions."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, poll_us: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.max_window = poll_us / 1e6
        self.window = self.max_window
        self.until = 0.0
        self._last = float("-inf")
        self._clock = clock
        self._held: dict[Any, None] = {}  # sessions polling instead of sleeping (an ordered set)
        self._ticking = False
        self.ticks = 0  # loop ticks spent polling
        self.hits = 0  # records found by polling: eventfd wake-ups the apps did not need

    def configure(self, poll_us: int) -> None:
        """A new `poll_us` (config reload); 0 stops polling after the current tick."""
        self.max_window = self.window = poll_us / 1e6
        if not poll_us:
            self.until = 0.0

    def touch(self) -> None:
        """Records moved: adapt the window to the gap since the last movement and keep
        polling for that long from now."""
        top = self.max_window
        if not top:
            return
        now = self._clock()
        gap, self._last = now - self._last, now
        window = self.window
        if gap <= top:  # polling would have caught this one: poll longer (up to the top)
            if window < top:
                self.window = window = min(top, max(2 * window, top / 8))
        elif window:  # a long gap: a window of CPU spent for nothing; poll less
            window /= 2
            self.window = window = window if window >= top / 16 else 0.0
        self.until = now + window

    def hold(self, session: Any) -> bool:
        """The session's tx ring is empty: poll it instead of sleeping, while the window is
        open. True if held (its sleeping flag is lowered, so its app will not signal); False
        when the caller should sleep on the eventfd as before."""
        if self._clock() >= self.until:
            return False
        if session not in self._held:
            self._held[session] = None
            session.tx.finish_sleep()  # the poller looks at the ring; no eventfd writes
        if not self._ticking:
            self._ticking = True
            if self.loop is None:
                self.loop = asyncio.get_running_loop()
            self.loop.call_soon(self._tick)
        return True

    def release(self, session: Any) -> None:
        """The session closes: forget it."""
        self._held.pop(session, None)

    def held(self) -> int:
        return len(self._held)

    def stats(self) -> dict[str, float]:
        return {"poll_ticks": self.ticks, "poll_hits": self.hits, "poll_window_us": round(self.window * 1e6, 1)}

    def _tick(self) -> None:
        self.ticks += 1
        held = self._held
        for session in list(held):
            if session.closed:
                del held[session]
                continue
            try:
                ready = session.tx.has_data()
            except Exception:  # a corrupt ring: the pump reports it and drops the app
                ready = True
            if ready:
                self.hits += 1
                del held[session]
                session._pump()  # ends in hold() again while the window is open
        if not held or self._clock() >= self.until:
            self._ticking = False
            while held:
                session = next(iter(held))
                del held[session]
                if not session.closed:
                    session._sleep()
            return
        os.sched_yield()
        cast("asyncio.AbstractEventLoop", self.loop).call_soon(self._tick)  # hold() set it before the first tick
