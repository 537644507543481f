"""The asyncio session with the daemon: the event loop drains the rx ring.

The event loop itself drives the rx ring (`loop.add_reader` on the app's eventfd), so a
response is dispatched on the loop thread with no thread hop. Control requests (connect,
bind) are short local round trips run in the default executor so the loop never blocks on
a slow peer.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast

from .. import app as _appmod
from ..app import App, DaemonUnavailable
from ..native import ring as ringmod
from ..status import RpcError, StatusCode

__all__ = ["AioApp", "default_app", "connect"]


class AioApp(App):
    """An App whose rx ring is drained by the event loop instead of a thread."""

    ASYNCIO = True

    def __init__(self, socket_path: str | None = None, name: str | None = None) -> None:
        super().__init__(socket_path, name, driver="loop")
        self.loop.add_reader(self.app_waker.fileno(), self._on_readable)
        self._drain_soon()
        self._watch_daemon()

    # A default app (one per loop) is never closed by its user: asyncio.run() ends, the loop
    # closes, and the daemon session, rings and watcher thread would stay for the process's
    # life (one more per asyncio.run). The watcher looks once a second.
    _WATCH_MS = 1000

    def _init_local(self, socket_path: str | None, name: str | None, driver: str) -> None:
        super()._init_local(socket_path, name, driver)
        self.loop = asyncio.get_running_loop()
        # Tasks waiting for room in the tx ring, with their record's size (_wake_space_waiters).
        self._space_waiters: deque[tuple[asyncio.Future, int]] = deque()
        self._space_promised = 0  # ring bytes of the tasks woken that have not run yet
        self._drain_scheduled = False
        # wait_for_ready waits between two connection attempts (mrpcd.aio Channel._wait_for_handle)
        self.connect_waiters: set[asyncio.Future] = set()

    @classmethod
    def unconnected(cls, socket_path: str | None = None, name: str | None = None, *, driver: str = "loop") -> "AioApp":
        return cast(AioApp, super().unconnected(socket_path, name, driver=driver))

    def successor(self) -> "AioApp":
        return cast(AioApp, super().successor())  # (its _reopen makes AioApps)

    def _reopen(self) -> "AioApp":
        """A new session like this one (made on the running loop: App.successor's callers
        are the loop's channels and servers)."""
        return type(self)(self.socket_path, self.name)

    def _orphaned(self) -> bool:
        return self.loop.is_closed()

    def _daemon_gone(self) -> None:
        """(watcher thread) The daemon went away: close on the event loop."""
        try:
            self.loop.call_soon_threadsafe(super()._daemon_gone)
        except RuntimeError:  # the loop is closed: nothing runs on it any more
            pass

    def _on_readable(self) -> None:
        self.app_waker.drain()
        self.rx.finish_sleep()
        self._drain()

    def _drain_soon(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain_cb)

    def _drain_cb(self) -> None:
        self._drain_scheduled = False
        self._drain()

    def _drain(self) -> None:
        if self.closed:
            return
        try:
            for _ in range(8):
                if not self.drain():
                    break
            else:
                if self._space_waiters:  # a steady inflow: the end of the method is not reached
                    self._wake_space_waiters()
                self._drain_soon()
                return
        except ringmod.RingCorrupt as exc:
            for sink in list(self.calls.values()):
                sink.lost(StatusCode.INTERNAL, f"rx ring corrupted: {exc}")
            return
        if self._space_waiters:
            self._wake_space_waiters()
        if not self.rx.prepare_sleep():
            self._drain_soon()

    def _wake_space_waiters(self) -> None:
        """Wake, first come first served, the tasks waiting for room in the tx ring whose
        records fit the room it has now (less what the tasks woken before and not run yet
        will take). Each woken task that pushes calls this again (send_async), so the turn
        passes on; when nothing was woken and the first still does not fit, the ring is
        flagged so the daemon signals after its next pop. Waking them all on every drain
        made each retry at once, nearly all to find the ring still full (measured at
        1 MiB, c=32, 4 MiB rings: the client's CPU per call -41 %, RPC/s +32 %)."""
        if self.closed:  # the rings are unmapped; close() woke everyone
            return
        waiters = self._space_waiters
        free = self.tx.free_bytes() - self._space_promised
        woke = False
        while waiters:
            fut, nbytes = waiters[0]
            if fut.done():  # its task was cancelled, or its safety-net timer fired
                waiters.popleft()
                continue
            need = ringmod.record_space(nbytes)
            if need > free and (woke or self._space_promised or self.tx.prepare_wait_for_space(nbytes)):
                return  # the woken pass the turn on, or the daemon signals when it frees room
            waiters.popleft()
            fut.set_result(need)
            self._space_promised += need
            woke = True
            free -= need

    async def send_async(self, data: bytes) -> None:
        if len(data) > self.max_record:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"message of {len(data)} bytes exceeds the limit of {self.max_record}")
        woken = False
        while True:
            if self.closed:
                raise RpcError(StatusCode.UNAVAILABLE, "the app's connection to mrpcd is closed")
            if self.try_send(data):
                break
            fut = self.loop.create_future()
            if woken:  # it was first in line and found no room yet: it stays first
                self._space_waiters.appendleft((fut, len(data)))
            else:
                self._space_waiters.append((fut, len(data)))
            # a safety net only: the daemon signals when it frees room (try_send flagged it)
            timer = self.loop.call_later(_appmod.SPACE_RECHECK_S, _set_if_pending, fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():  # woken, then cancelled: pass the wake on
                    self._space_promised -= fut.result() or 0
                    self._wake_space_waiters()
                raise
            finally:
                timer.cancel()
            self._space_promised -= fut.result() or 0
            woken = True
        if woken and self._space_waiters:
            self._wake_space_waiters()

    def send_nowait(self, data: bytes) -> None:
        """From the loop thread where awaiting is impossible (dispatch): push or fall back to a task."""
        if self.closed:
            return  # the daemon ends the app's calls itself
        if not self.try_send(data):
            self.loop.create_task(self.send_async(data))

    def send_control(self, data: bytes) -> None:
        """App.send_control on the loop: send_nowait's task waits for room, in turn, and
        never drops the record while the app lives."""
        self.send_nowait(data)

    def wake_connect_waits(self) -> None:
        """(loop thread) Wake the wait_for_ready waits between two attempts: each looks
        whether its wait is over (a closed app or channel) and sleeps on if not."""
        super().wake_connect_waits()
        if self.loop.is_closed():  # (an orphaned app's close: nothing waits any more)
            return
        for fut in list(self.connect_waiters):
            _set_if_pending(fut)

    async def call_async(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.loop.run_in_executor(None, lambda: self.call(op, **args))

    def close(self) -> None:
        if not self.closed:
            try:
                self.loop.remove_reader(self.app_waker.fileno())
            except Exception:
                pass
        super().close()
        self._space_promised = 0
        while self._space_waiters:  # they see `closed` and fail at once
            _set_if_pending(self._space_waiters.popleft()[0])


def _set_if_pending(fut: asyncio.Future) -> None:
    """Wake a waiter unless it is done already (timers' callbacks: a deadline, a re-check)."""
    if not fut.done():
        fut.set_result(None)


_apps: dict[int, AioApp] = {}


def default_app() -> AioApp:
    """One asyncio session per event loop."""
    loop = asyncio.get_running_loop()
    app = _apps.get(id(loop))
    if app is None or app.loop is not loop or (app.closed and not app.daemon_lost):
        try:
            app = AioApp()
        except DaemonUnavailable:  # as grpc.aio makes a channel to anywhere (App.unconnected)
            app = AioApp.unconnected()
        _apps[id(loop)] = app
    elif app.closed:  # its daemon restarted: the session its channels and servers carry on with
        try:
            app = _apps[id(loop)] = app.successor()
        except DaemonUnavailable:
            pass  # still none: whoever takes this one follows it to its successor later
    return app


def connect(socket_path: str | None = None, name: str | None = None) -> AioApp:
    return AioApp(socket_path, name)


