"""The watchdog over handlers that a sync server runs on its app's rx thread.

A sync server runs quick unary handlers on the thread that drains the app's rx ring
(mrpcd/server.py run_inline): no thread switch per call. A handler may block on anything
the library cannot see (a sleep, a database); meanwhile nothing would drain the ring. So
while such handlers run, this thread looks every LIMIT seconds, and one that has been
running since its previous look gets the rx role moved to a new thread (App.hand_off_rx).
After IDLE seconds without an inline handler it parks until the next one: an idle app has
no timer running.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("mrpcd.app")


class InlineWatchdog:
    """Hands the rx role over when a handler running on the rx thread takes too long
    (see the module docstring). The app reads its state: `_inline_seq`, `_inline_since`."""

    LIMIT = 0.002
    IDLE = 0.2

    def __init__(self, app: "App") -> None:
        self.app = app
        self._cond = threading.Condition()
        self._parked = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"mrpcd-watchdog-{app.app_id}", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        if self._parked:
            with self._cond:
                self._parked = False
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        app = self.app
        seen_seq, last_active = -1, time.monotonic()
        while not self._closed and not app.closed:
            time.sleep(self.LIMIT)
            seq, since = app._inline_seq, app._inline_since
            now = time.monotonic()
            if seq != seen_seq or since is not None:
                last_active = now
            if since is not None and seq == seen_seq and now - since >= self.LIMIT:
                try:
                    app.hand_off_rx(seq)
                except Exception:  # never lose the watchdog (e.g. no thread could start)
                    log.exception("handing the rx role over failed")
            seen_seq = seq
            if now - last_active >= self.IDLE:
                with self._cond:
                    self._parked = True
                    # inline_begin sets _inline_since before it looks at _parked: either it
                    # sees us parked and wakes us, or we see its handler here
                    while self._parked and app._inline_since is None and not self._closed and not app.closed:
                        self._cond.wait(1.0)
                    self._parked = False
                last_active = time.monotonic()
