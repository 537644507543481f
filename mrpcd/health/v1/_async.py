"""The asyncio health servicer: grpc_health.v1.health.aio.HealthServicer (grpcio's `_async`).

For `mrpcd.aio.server()`: every handler is a coroutine, and set() / enter_graceful_shutdown()
are too, as in grpcio, so ported code that awaits them runs unchanged. The state is the sync
servicer's (mrpcd.health.v1._core), guarded by a lock, so calling them from another thread
(through the underlying `_health`) is safe as well.
"""
from __future__ import annotations

import mrpcd
import mrpcd.aio

from . import health_pb2 as _pb2
from . import health_pb2_grpc as _pb2_grpc
from ._core import MAX_LIST, HealthState, ServingStatus, list_response, not_found, too_many

__all__ = ["HealthServicer"]


class HealthServicer(_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health on an asyncio server: Check, List and Watch as the sync
    servicer's (mrpcd.health.v1.health.HealthServicer), each Watch a task that ends when
    its call does (client cancel or gone, deadline, server stop)."""

    def __init__(self) -> None:
        self._health = HealthState()

    async def Check(self, request: _pb2.HealthCheckRequest, context: mrpcd.aio.ServicerContext) -> _pb2.HealthCheckResponse:
        status = self._health.get(request.service)
        if status is None:
            await context.abort(mrpcd.StatusCode.NOT_FOUND, not_found(request.service))
            return _pb2.HealthCheckResponse()  # (not reached: abort raises)
        return _pb2.HealthCheckResponse(status=status)

    async def List(self, request: _pb2.HealthListRequest, context: mrpcd.aio.ServicerContext) -> _pb2.HealthListResponse:
        statuses = self._health.snapshot()
        if len(statuses) > MAX_LIST:
            await context.abort(mrpcd.StatusCode.RESOURCE_EXHAUSTED, too_many(len(statuses)))
            return _pb2.HealthListResponse()  # (not reached)
        return list_response(statuses)

    async def Watch(self, request: _pb2.HealthCheckRequest, context: mrpcd.aio.ServicerContext) -> None:  # type: ignore[override]
        # (the generated base types Watch as an iterator; grpc.aio's way, context.write() from
        # a coroutine, is the other form a streaming handler may take)
        watcher = self._health.watch(request.service)
        try:
            while (status := await watcher.take_async()) is not None:
                await context.write(_pb2.HealthCheckResponse(status=status))
        finally:  # cancelled with its call: nothing of it stays behind
            self._health.forget(watcher)

    async def set(self, service: str, status: ServingStatus | int) -> None:
        """Set the status of `service` ("" for the whole server); ignored after
        enter_graceful_shutdown() (a draining server must not report SERVING again)."""
        self._health.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Set every service NOT_SERVING for good: call it when the server starts draining,
        before `await server.stop(grace)`."""
        self._health.enter_graceful_shutdown()
