"""The state both health servicers share: statuses by service, and the open Watch calls.

Why one core for the sync and the asyncio servicer: the semantics (what Check answers, what
a Watch sees and in which order, what graceful shutdown freezes) must not differ between
them, and a core guarded by a plain lock can be driven from any thread: a sync servicer's
set() from a worker thread can feed a Watch served on an asyncio server, and the other way
round.

Ordering: a Watch's first status and every later change are queued under the one lock
that set() takes to change the status, so a watcher sees the changes in the order they were
made, with none lost between "read the current status" and "start listening". Queuing never
blocks (sending is the Watch handler's job, on its own thread or task), so set() is quick
whatever the clients do.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Callable

from .health_mrpc import HealthCheckResponse, HealthListResponse

ServingStatus = HealthCheckResponse.ServingStatus

# The service name of the health checking servicer (grpc_health.v1.health.SERVICE_NAME).
SERVICE_NAME = "grpc.health.v1.Health"
# The entry of the whole server's health (grpc_health.v1.health.OVERALL_HEALTH).
OVERALL_HEALTH = ""
# health.proto: List answers at most this many services, RESOURCE_EXHAUSTED beyond.
MAX_LIST = 100
# Statuses a Watch keeps for a client that reads slower than they change; the oldest are
# dropped beyond this (the client still ends on the latest one). Why: a stalled client must
# not grow the server's memory; clients act on the current status (grpc's asyncio servicer
# drops intermediate ones too).
MAX_PENDING = 32


def as_status(status: ServingStatus | int) -> ServingStatus | int:
    """The enum member for a known value (so responses and reprs show its name); other ints
    are kept, since proto3 enums are open."""
    try:
        return ServingStatus(int(status))
    except ValueError:
        return int(status)


def not_found(service: str) -> str:
    """Check's details for a service never set (grpcio sends none; a name helps whoever reads it)."""
    return f"unknown service {service!r}"


def too_many(n: int) -> str:
    return f"{n} services, more than List answers ({MAX_LIST})"


def list_response(statuses: dict[str, ServingStatus | int]) -> HealthListResponse:
    return HealthListResponse(statuses={name: HealthCheckResponse(status=s) for name, s in statuses.items()})


class Watcher:
    """One Watch call's statuses still to send, waited on by one thread or one task.

    Closed when the call ends (client cancel or gone, deadline, server stop): a waiting
    handler then returns at once, which is what frees its thread or task."""

    __slots__ = ("service", "_cond", "_pending", "_last", "_closed", "_wake")

    def __init__(self, service: str) -> None:
        self.service = service
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[ServingStatus | int] = deque()
        self._last: ServingStatus | int | None = None
        self._closed = False
        self._wake: Callable[[], None] | None = None  # an asyncio waiter's wake-up, callable from any thread

    def push(self, status: ServingStatus | int) -> None:
        """Queue a status unless it is the one queued last (health.proto: a message
        whenever the status *changes*)."""
        with self._cond:
            if self._closed or status == self._last:
                return
            self._last = status
            self._pending.append(status)
            if len(self._pending) > MAX_PENDING:
                self._pending.popleft()
            self._cond.notify_all()
            wake = self._wake
        if wake is not None:
            wake()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()
            wake = self._wake
        if wake is not None:
            wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self) -> ServingStatus | int | None:
        """(blocking) The next status to send, or None once the call is over."""
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait(1.0)
            return None if self._closed else self._pending.popleft()

    async def take_async(self) -> ServingStatus | int | None:
        """(asyncio) The next status to send, or None once the call is over; push() and
        close() may come from any thread."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        while True:
            with self._cond:
                self._wake = wake
                if self._closed:
                    return None
                if self._pending:
                    return self._pending.popleft()
                event.clear()
            await event.wait()


class HealthState:
    """Statuses by service name and the Watch calls open on each; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, ServingStatus | int] = {OVERALL_HEALTH: ServingStatus.SERVING}
        self._watchers: dict[str, set[Watcher]] = {}
        self._shutting_down = False

    def get(self, service: str) -> ServingStatus | int | None:
        with self._lock:
            return self._status.get(service)

    def snapshot(self) -> dict[str, ServingStatus | int]:
        with self._lock:
            return dict(self._status)

    def set(self, service: str, status: ServingStatus | int) -> None:
        status = as_status(status)
        with self._lock:
            if self._shutting_down:
                return
            self._status[service] = status
            for watcher in self._watchers.get(service, ()):
                watcher.push(status)

    def enter_graceful_shutdown(self) -> None:
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._status:
                self._status[service] = ServingStatus.NOT_SERVING
                for watcher in self._watchers.get(service, ()):
                    watcher.push(ServingStatus.NOT_SERVING)

    def watch(self, service: str) -> Watcher:
        """A new watcher of `service`, its current status already queued (SERVICE_UNKNOWN
        for a service never set: health.proto says the call goes on, it is no error)."""
        watcher = Watcher(service)
        with self._lock:
            watcher.push(self._status.get(service, ServingStatus.SERVICE_UNKNOWN))
            self._watchers.setdefault(service, set()).add(watcher)
        return watcher

    def forget(self, watcher: Watcher) -> None:
        """The watcher's call is over: close it (its handler returns) and drop it.
        Idempotent: the call's end callback and the handler's own exit both call it."""
        watcher.close()
        with self._lock:
            watchers = self._watchers.get(watcher.service)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[watcher.service]

    def watcher_count(self) -> int:
        """Open Watch calls (what a test or a metrics hook checks to see none is leaked)."""
        with self._lock:
            return sum(len(w) for w in self._watchers.values())
