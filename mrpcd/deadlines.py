"""Deadline heaps: one thread per heap expires the calls that have a deadline.

The sync server expires its calls with one (a handler is cancelled, the client told
DEADLINE_EXCEEDED); each sync app has one for its client calls that nobody waits on (a
future with callbacks, a response stream not being read), which grpc ends at their
deadline all the same. Not a timer per call: a thread switch and a timer object per
call cost more than a small RPC.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable


def _expire_server_call(call: Any) -> None:
    if call.is_active():
        call.cancel(expired=True)


class DeadlineHeap:
    """One thread that expires calls at their deadlines (a heap, not a timer per call).

    The thread runs only while calls with a deadline are in flight: a finished call is
    dropped from the count at once (its heap entry is skipped when it comes up, or dropped
    with the others when ended calls are most of the heap, see discard), and once
    nothing is pending for IDLE seconds the thread exits; the next call with a deadline
    starts a new one. It is a daemon thread all the same, so it can never hold up
    interpreter exit, and `close()` (Server.stop, App.close) ends it at once.

    A call has `deadline.at` and `timed` (set while the heap counts it), and calls
    `discard(call)` when it ends. Server calls (the default: `is_active()`,
    `cancel(expired=True)`) are expired as they are; other calls say how with `expire`,
    and `ended` (checked under the heap's lock at `add`) keeps out a call that ended
    before it was added, which would otherwise never be discarded.
    """

    IDLE = 1.0
    COMPACT_MIN = 256  # heap entries below which ended calls are left to expire

    def __init__(self, name: str = "mrpcd-deadlines", expire: "Callable[[Any], None] | None" = None,
                 ended: "Callable[[Any], bool] | None" = None) -> None:
        self._name = name
        self._expire = expire or _expire_server_call
        self._ended = ended
        self._heap: list[tuple[float, int, Any]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._closed = False
        self._sleep_until: float | None = None  # when the waiting thread wakes by itself

    def add(self, call: Any) -> None:
        if call.deadline.at is None:
            return
        with self._cond:
            if self._closed or (self._ended is not None and self._ended(call)):
                return
            at = call.deadline.at
            heapq.heappush(self._heap, (at, next(self._seq), call))
            call.timed = True
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif self._sleep_until is not None and at < self._sleep_until:
                # wake the thread only when this deadline comes before its own wake-up: two
                # thread switches per call (add + discard) cost more than a small RPC
                self._cond.notify()

    def discard(self, call: Any) -> None:
        """The call ended (answered, cancelled or expired): it no longer keeps the thread."""
        with self._cond:
            if not call.timed:
                return
            call.timed = False
            self._pending -= 1
            if not self._pending:
                self._heap.clear()  # the thread notices at its own wake-up: no switch now
            elif len(self._heap) > self.COMPACT_MIN and 2 * self._pending < len(self._heap):
                # An ended call stays in the heap until its deadline comes up; under steady
                # load (never nothing pending) that is rate x deadline calls kept alive (60 s
                # at 20,000 calls/s: 1.2 million, and the GC walking them). When the ended
                # ones are most of the heap, drop them (asyncio does the same with its
                # cancelled timers); a rebuild is paid for by as many discards.
                self._heap = [entry for entry in self._heap if entry[2].timed]
                heapq.heapify(self._heap)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._pending = 0
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self) -> None:
        idle_since: float | None = None
        while True:
            with self._cond:
                if self._closed:
                    self._thread = None
                    return
                if not self._heap:
                    # exit only after IDLE seconds with nothing to watch; a discard()'s
                    # notify wakes us early, and that is not idleness yet
                    now = time.monotonic()
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.IDLE:
                        self._thread = None  # add() starts a new thread
                        return
                    self._sleep(idle_since + self.IDLE, now)
                    continue
                idle_since = None
                at, _, call = self._heap[0]
                now = time.monotonic()
                if at > now:
                    # never longer than IDLE: discard() does not wake us, and an emptied
                    # heap must still end the thread about IDLE later
                    self._sleep(min(at, now + self.IDLE), now)
                    continue
                heapq.heappop(self._heap)
            self._expire(call)

    def _sleep(self, until: float, now: float) -> None:
        """Wait (lock held) until `until` or an earlier deadline / close() notifies."""
        self._sleep_until = until
        try:
            self._cond.wait(until - now)
        finally:
            self._sleep_until = None
