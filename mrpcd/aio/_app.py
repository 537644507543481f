"""The asyncio session with the daemon: the event loop drains the rx ring.

The event loop itself drives the rx ring (`loop.add_reader` on the app's eventfd), so a
response is dispatched on the loop thread with no thread hop. Control requests (connect,
bind) are short local round trips run in the default executor so the loop never blocks on
a slow peer.
"""
from __future__ import annotations

import asyncio
from typing import Any

from ..app import App
from ..native import ring as ringmod
from ..status import RpcError, StatusCode

__all__ = ["AioApp", "default_app", "connect"]


class AioApp(App):
    """An App whose rx ring is drained by the event loop instead of a thread."""

    def __init__(self, socket_path: str | None = None, name: str | None = None) -> None:
        super().__init__(socket_path, name, driver="loop")
        self.loop = asyncio.get_running_loop()
        self._space_waiters: list[asyncio.Future] = []
        self._drain_scheduled = False
        self.loop.add_reader(self.app_waker.fileno(), self._on_readable)
        self._drain_soon()

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
                self._drain_soon()
                return
        except ringmod.RingCorrupt as exc:
            for sink in list(self.calls.values()):
                sink.lost(StatusCode.INTERNAL, f"rx ring corrupted: {exc}")
            return
        waiters, self._space_waiters = self._space_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        if not self.rx.prepare_sleep():
            self._drain_soon()

    async def send_async(self, data: bytes) -> None:
        if len(data) > self.max_record:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"message of {len(data)} bytes exceeds the limit of {self.max_record}")
        while not self.try_send(data):
            if self.closed:
                raise RpcError(StatusCode.UNAVAILABLE, "the app's connection to mrpcd is closed")
            fut = self.loop.create_future()
            self._space_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, 0.5)
            except asyncio.TimeoutError:
                pass

    def send_nowait(self, data: bytes) -> None:
        """From the loop thread where awaiting is impossible (dispatch): push or fall back to a task."""
        if not self.try_send(data):
            self.loop.create_task(self.send_async(data))

    async def call_async(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.loop.run_in_executor(None, lambda: self.call(op, **args))

    def close(self) -> None:
        if not self.closed:
            try:
                self.loop.remove_reader(self.app_waker.fileno())
            except Exception:
                pass
        super().close()


_apps: dict[int, AioApp] = {}


def default_app() -> AioApp:
    """One asyncio session per event loop."""
    loop = asyncio.get_running_loop()
    app = _apps.get(id(loop))
    if app is None or app.closed or app.loop is not loop:
        app = _apps[id(loop)] = AioApp()
    return app


def connect(socket_path: str | None = None, name: str | None = None) -> AioApp:
    return AioApp(socket_path, name)


