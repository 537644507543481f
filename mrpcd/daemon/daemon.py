"""The daemon object: configuration, app sessions and the control socket, on one uvloop loop."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, Callable, Coroutine

from .. import __version__
from .app_limits import ControlBudget
from .config import Config
from .control import serve_control, unlink_if_ours
from .inbound_limits import InboundConnections
from .observe import CallStats
from .poller import Poller
from ..transports import tcp
from .session import AppSession
from .transport_upgrade import TransportVersion, load_transport_class, migrate

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
        self._control_sock: socket.socket | None = None
        self._control_ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self.counters = {"apps_connected": 0, "apps_dropped": 0}
        self.call_stats = CallStats(config.metrics["buckets"])  # fed by every session's Observer
        self.draining = False
        self._drain_cut = False  # cut_drain(): stop waiting for calls in flight
        # why the last reload's `policies:` were not (all) applied; shown by `mrpcctl policy list`
        self.declared_error: str | None = None
        self.policy_globals: dict[str, Any] = {}  # shared by every app's policies (e.g. the QoS scheduler)
        self.transport_class: type[TransportVersion] = tcp.PeerConnection  # live-upgradable (see upgrade_transport)
        self.poller = Poller(None, config.poll_us)  # adaptive wake-ups (poller.py)
        self.control_budget = ControlBudget()  # unfinished control messages held, per uid (app_limits.py)
        self.control_connections: dict[int, int] = {}  # open control connections per uid (limits.control_connections_per_uid)
        # peer connections accepted on the apps' listeners (limits.inbound_connections*)
        self.inbound = InboundConnections(lambda: self.config.limits, self.counters)

    async def start(self) -> None:
        if self.config.transport == "rdma":
            from ..transports import rdma

            ok, why = rdma.available()
            if not ok:
                raise RuntimeError(f"transport: rdma configured, but {why}")
        self._control_sock, self._control_ident = await serve_control(self, self.config.control_socket)
        log.info("mrpcd %s listening on %s (transport %s, config %s)", self.version, self.config.control_socket, self.config.transport,
                 self.config.source)

    async def run_until_stopped(self, on_stopping: Callable[[], None] | None = None) -> None:
        await self._stop.wait()
        if on_stopping is not None:
            on_stopping()
        await self.drain(self.config.drain_timeout)
        await self.shutdown()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def cut_drain(self) -> None:
        """Stop waiting for calls in flight (a second SIGTERM / SIGINT): they get GOAWAY now."""
        self._drain_cut = True
        self._stop.set()

    async def shutdown(self) -> None:
        if self._control_sock is not None:  # (a start that failed before serving has nothing to stop)
            log.info("mrpcd stopping: %d apps", len(self.sessions))
        self.goaway_all("mrpcd is shutting down")
        for session in list(self.sessions.values()):
            self.drop_session(session, "daemon stopping")
        if self._control_sock is not None:
            self._control_sock.close()
            self._control_sock = None
            # only our own: if ours was removed and another daemon listens there now, its socket stays
            unlink_if_ours(self.config.control_socket, self._control_ident)
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
        log.info("app %s connected: app_id %d, pid %d, uid %d", name, session.app_id, pid, uid, extra=session.log_fields(uid=uid))
        return session

    def drop_session(self, session: AppSession, reason: str) -> None:
        if self.sessions.pop(session.app_id, None) is None:
            return
        self.counters["apps_dropped"] += 1
        log.info("app %s (app_id %d, pid %d) gone: %s; resources reclaimed", session.name, session.app_id, session.pid, reason,
                 extra=session.log_fields(reason=reason))
        session.drop_reason = reason
        session.close()
        if session.hang_up is not None:  # dropped for its ring or a bug: end its control connection
            session.hang_up()  # too, or the app would wait on calls nobody moves (it learns from the close)

    # -- graceful drain (SIGTERM) -------------------------------------------------------
    def in_flight(self) -> int:
        """Calls not yet answered, plus records still waiting for room in an app's rx ring."""
        return sum(s.observer.in_flight + len(s.pending) for s in self.sessions.values())

    def refuse_if_draining(self, what: str) -> None:
        if self.draining:
            raise ConnectionRefusedError(f"mrpcd is shutting down: no {what}")

    async def drain(self, timeout: float) -> bool:
        """Take no new apps or peer connections; wait up to `timeout` s for calls in flight.

        Existing connections keep working meanwhile, so answers still reach their callers.
        True if everything finished in time.
        """
        self.draining = True
        for session in self.sessions.values():
            for server in session.listeners:
                server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        left = self.in_flight()
        log.info("mrpcd draining: %d calls in flight, waiting up to %.1fs", left, timeout, extra={"in_flight": left})
        while left and loop.time() < deadline and not self._drain_cut:
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
            left = self.in_flight()
        if left:
            log.warning("drain timeout: %d calls still in flight get GOAWAY", left, extra={"in_flight": left})
        return not left

    def goaway_all(self, reason: str) -> None:
        """GOAWAY with `reason` to every peer connection and, per handle, to every app."""
        for session in list(self.sessions.values()):
            for route in list(session.routes.values()):
                session._on_peer_closed(route, ConnectionError(reason))  # the app's GOAWAY for this handle
                route.conn.close(reason)  # the peer's GOAWAY

    def upgrade_transport(self, spec: object) -> dict[str, Any]:
        """Swap every live connection to a new transport version, sockets kept (see transport_upgrade)."""
        cls = load_transport_class(spec)  # `spec` as a control request gave it: checked there
        moved = 0
        failed: list[str] = []
        for session in list(self.sessions.values()):
            session.stop_in_place()  # a record being received into its ring: into the daemon's memory
            for route in list(session.routes.values()):
                old = route.conn
                session.receive_in_place(route, False)  # its decoder moves over as it is
                try:
                    route.conn = migrate(old, cls)
                except (Exception, SystemExit) as exc:  # the old code's hand_over (or re-adopt) failed
                    failed.append(f"{old.peer}: {type(exc).__name__}: {exc}")
                    self._upgrade_failed(session, route, exc)
                    continue
                session.receive_in_place(route, True)  # if the new code can
                moved += route.conn is not old
        # every connection either moved or stayed on working code (or is closed): from now on
        # new connections run the new version, so the recorded version matches the code
        self.transport_class = cls
        log.info("transport upgraded to version %s (%s): %d connections handed over, %d failed",
                 cls.VERSION, spec, moved, len(failed))
        return {"version": cls.VERSION, "connections": moved, "failed": failed}

    @staticmethod
    def _upgrade_failed(session: AppSession, route: Any, exc: BaseException) -> None:
        """One connection could not be handed over. If the old object is still open it keeps
        the connection on its code; if it went quiet first (its state is lost), the socket is
        aborted and the app told, so calls on it fail UNAVAILABLE instead of hanging."""
        conn = route.conn
        log.error("transport upgrade: connection %s could not be handed over: %s", conn.peer, exc,
                  exc_info=exc, extra=session.log_fields(handle=route.handle, peer=route.target))
        if not conn.closed:
            return
        transport = getattr(conn, "transport", None)
        if transport is not None:
            try:
                transport.abort()
            except Exception:
                pass
        session._on_peer_closed(route, ConnectionError(f"transport upgrade failed: {type(exc).__name__}: {exc}"))

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def stats(self) -> dict[str, Any]:
        return {"apps": len(self.sessions), "uptime": self.uptime(), **self.counters, **self.poller.stats(),
                "control_connections": sum(self.control_connections.values()), "inbound_connections": self.inbound.open_now()}
