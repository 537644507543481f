"""The daemon object: configuration, app sessions and the control socket, on one uvloop loop."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Coroutine

from .. import __version__
from .config import Config
from .control import serve_control
from .session import AppSession

log = logging.getLogger("mrpcd")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = __version__
        self.sessions: dict[int, AppSession] = {}
        self._next_app_id = 1
        self._started = time.monotonic()
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()
        self._control_sock = None
        self.counters = {"apps_connected": 0, "apps_dropped": 0}
        self.policy_globals: dict[str, Any] = {}  # shared by every app's policies (e.g. the QoS scheduler)

    async def start(self) -> None:
        self._control_sock = await serve_control(self, self.config.control_socket)
        log.info("mrpcd %s listening on %s (transport %s)", self.version, self.config.control_socket, self.config.transport)

    async def run_until_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        log.info("mrpcd stopping: %d apps", len(self.sessions))
        for session in list(self.sessions.values()):
            self.drop_session(session, "daemon stopping")
        if self._control_sock is not None:
            self._control_sock.close()
            try:
                os.unlink(self.config.control_socket)
            except OSError:
                pass
        for task in list(self._tasks):
            task.cancel()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def new_session(self, name: str, pid: int, uid: int, gid: int) -> AppSession:
        session = AppSession(self, self._next_app_id, name, pid, uid, gid)
        self._next_app_id += 1
        self.sessions[session.app_id] = session
        self.counters["apps_connected"] += 1
        log.info("app %s connected: app_id %d, pid %d, uid %d", name, session.app_id, pid, uid)
        return session

    def drop_session(self, session: AppSession, reason: str) -> None:
        if self.sessions.pop(session.app_id, None) is None:
            return
        self.counters["apps_dropped"] += 1
        log.info("app %s (app_id %d, pid %d) gone: %s; resources reclaimed", session.name, session.app_id, session.pid, reason)
        session.close()

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def stats(self) -> dict[str, Any]:
        return {"apps": len(self.sessions), "uptime": self.uptime(), **self.counters}
