"""asyncio server side, shaped like grpc.aio: each call's handler runs as a task.

Client cancellation, a lost peer and the deadline all cancel that task (the handler sees
asyncio.CancelledError, `context.is_active()` turns False, done callbacks run); on the
deadline the server answers DEADLINE_EXCEEDED itself. Response streams await the
client's flow-control credit, request streams grant credit as the handler reads.
"""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator, Callable, Sequence, cast

from .. import flow, wire
from .._calls import SERVER_STOPPED, ContextCore, ServerCallCore, ServerCore, TooLarge, failure_status, log_failure
from ..handlers import HandlerCallDetails, RpcMethodHandler
from ..marshal import records as R
from ..status import RpcError, StatusCode, metadata_tuple
from ._app import AioApp, default_app
from ..app import require_app
from ._interceptors import ServerInterceptor, resolve_handler


class _ServerCall(ServerCallCore):
    def __init__(self, server: "Server", rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        super().__init__(server, rec, path, handler)
        self._event = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.callbacks: list = []
        self._timer = server.app.loop.call_at(server.app.loop.time() + self.deadline.remaining(), self.expire) if self.deadline.at else None
        self._take(rec)  # (a first message over the limit: Server._admit ends the call)

    def deliver(self, rec: R.Record) -> None:
        over = self._take(rec)
        self._event.set()
        if over:  # the call failed: the client hears it now, the handler task is cancelled
            self.cancel(self.too_large_status())

    def grant(self, n: int) -> None:
        if self._credit.grant(n):
            self._event.set()

    def expire(self) -> None:
        if self.cancelled or self.finished:
            return
        self.app.send_nowait(self._expired_record())
        self.cancel()

    def cancel(self, status: "tuple[StatusCode, str] | None" = None) -> None:
        """The call is over for the handler; `status`: what the client is told (the server
        stopping), None when it knows already (it cancelled) or is gone."""
        if self.cancelled or self.finished:
            return
        if status is not None:
            self.app.send_nowait(self._end_record(*status))
        self.cancelled = True
        self._messages.clear()  # the handler's next read raises; nobody takes these
        if self._timer is not None:
            self._timer.cancel()
        self.server._forget(self)
        if self.task is not None:
            self.task.cancel()
        self._event.set()
        for cb in self.callbacks:
            try:
                cb(self.server._contexts.get(id(self)))
            except Exception:
                pass

    async def next_request(self) -> Any:
        while not self._messages and not self._half_closed and not self.cancelled:
            self._event.clear()
            await self._event.wait()
        if self.too_large is not None:  # the sync server's error: no "application" failure to log
            raise TooLarge(self.too_large)
        if self.cancelled:
            raise asyncio.CancelledError()
        if self._messages:
            payload, window = self._pop_request()
            if window is not None:
                self.app.send_nowait(window)
            return self._decode(payload)
        raise StopAsyncIteration

    async def request_iterator(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.next_request()
            except StopAsyncIteration:
                return

    async def send(self, flags: int, payload: bytes | None, ctx: "ServicerContext", code: StatusCode = StatusCode.OK, details: str = "") -> None:
        if payload is not None and not flags & R.F_END:
            while not self._credit.available() and not self.cancelled:
                self._event.clear()
                await self._event.wait()
            self._credit.spend(flow.cost(len(payload)))
        if self.cancelled or self.finished:
            return
        flags = self._flags(flags)
        if flags & R.F_END:
            if self._timer is not None:
                self._timer.cancel()
            self.server._forget(self)
        try:
            await self.app.send_async(self._record(flags, payload, ctx, code, details))
        except BaseException:
            self._unsent(flags)
            raise


class ServicerContext(ContextCore):
    _call: _ServerCall

    def add_done_callback(self, callback: Callable) -> None:
        self._call.callbacks.append(callback)

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.cancelled or self._call.finished

    async def send_initial_metadata(self, metadata) -> None:
        self._set_initial(metadata)
        await self._call.send(0, None, self)

    async def abort(self, code: StatusCode | int, details: str = "", trailing_metadata=()) -> None:
        err = self._abort(code, details)
        if trailing_metadata:
            self._trailing = wire.check_metadata(trailing_metadata)
        raise err

    async def abort_with_status(self, status: Any) -> None:
        """grpc.aio: abort with a grpc.Status-like object (code, details, trailing_metadata)."""
        await self.abort(status.code, status.details, getattr(status, "trailing_metadata", ()) or ())

    async def write(self, message: Any) -> None:
        await self._call.send(0, self._call.server._serialize(self._call.handler, message), self)

    async def read(self) -> Any:
        try:
            return await self._call.next_request()
        except StopAsyncIteration:
            return None  # grpc.aio.EOF


class Server(ServerCore):
    _interceptor_base = ServerInterceptor
    _interceptor_name = "mrpcd.aio.ServerInterceptor"

    def __init__(self, app: AioApp | None = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None,
                 maximum_concurrent_rpcs: int | None = None) -> None:
        require_app(app, True, "mrpcd.aio.server")
        self._init_core(app or default_app(), interceptors, options, maximum_concurrent_rpcs)
        self._contexts: dict[int, ServicerContext] = {}
        self._stopped = asyncio.Event()  # no new calls
        self._terminated = asyncio.Event()  # stopped: the calls in flight are over too
        self.app.servers.append(self)

    async def start(self) -> None:
        self._started = True

    def _reply_nowait(self, data: bytes) -> None:
        self.app.send_nowait(data)

    def _admit(self, rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        call = _ServerCall(self, rec, path, handler)
        self._calls[(rec.handle, rec.call_id)] = call
        call.task = self.app.loop.create_task(self._run(call))
        if call.too_large is not None:  # its first message was over the limit: no handler runs
            call.cancel(call.too_large_status())

    def app_closed(self) -> None:
        """The app left the daemon (App.close): cancel every call's handler task. Closed
        by its user, the server terminates; left by a daemon that went away, it serves on
        once the daemon is back (ServerCore.rejoin, from a task on the loop)."""
        for call in list(self._calls.values()):
            call.cancel()
        if self.app.daemon_lost and not self._stopped.is_set():
            if self._start_rejoin():
                self._rejoin_task = self.app.loop.create_task(self._rejoin_loop())
            return
        self._stopped.set()
        self._terminated.set()

    async def _rejoin_loop(self) -> None:
        """Wait for the daemon to come back, then serve again through the app's successor
        (each attempt is a few local control round trips, or a refused connect, run on the
        loop: the new session must be made on it); stop() ends the wait at once."""
        for delay in self._rejoin_waits():
            try:
                await asyncio.wait_for(cast(asyncio.Event, self._stopped).wait(), delay)
            except asyncio.TimeoutError:
                pass

    def _give_up(self, error: RpcError) -> None:
        self._stopped.set()
        for call in list(self._calls.values()):
            call.cancel()
        self._terminated.set()
        super()._give_up(error)

    def _forget(self, call: _ServerCall) -> None:
        self._calls.pop((call.handle, call.call_id), None)

    async def _run(self, call: _ServerCall) -> None:
        ctx = ServicerContext(call)
        self._contexts[id(call)] = ctx
        try:
            if call.deadline.expired():
                call.expire()
                return
            handler = call.handler
            if self._interceptors:
                handler = await resolve_handler(self._interceptors, HandlerCallDetails(call.path, metadata_tuple(call.metadata)), handler)
                if handler is None:
                    await call.send(R.F_END, None, ctx, StatusCode.UNIMPLEMENTED, "Method not found!")
                    return
                call._resolved(handler)
            request = call.request_iterator() if handler.request_streaming else await call.next_request()
            result = handler.behavior(request, ctx)
            if handler.response_streaming:
                if inspect.isasyncgen(result):
                    async for response in result:
                        await call.send(0, self._serialize(handler, response), ctx)
                elif inspect.isawaitable(result):
                    await result  # handler used context.write()
                else:
                    for response in result:
                        await call.send(0, self._serialize(handler, response), ctx)
                await call.send(R.F_END, None, ctx, ctx._final_code(), ctx._details)
            else:
                if inspect.isawaitable(result):
                    result = await result
                code = ctx._final_code()
                payload = self._serialize(handler, result) if code is StatusCode.OK else None
                await call.send(R.F_END, payload, ctx, code, ctx._details)
        except asyncio.CancelledError:
            call.cancel()
        except Exception as exc:
            log_failure(exc, call.path)
            try:
                await call.send(R.F_END, None, ctx, *failure_status(exc, ctx))
            except RpcError:
                pass  # the app's link to the daemon is gone: nobody is left to tell (else
                # the task would end with an exception nobody retrieves)
        finally:
            self._contexts.pop(id(call), None)
            if not call.finished and not call.cancelled:
                call.finished = True
                self._forget(call)
            if call.callbacks and not call.cancelled:  # (a cancel ran them already)
                # grpc.aio runs done callbacks on termination, not only on cancellation
                callbacks, call.callbacks = call.callbacks, []
                for cb in callbacks:
                    try:
                        cb(ctx)
                    except Exception:
                        pass

    async def stop(self, grace: float | None) -> None:
        self._stopped.set()
        if grace:
            end = self.app.loop.time() + grace
            while self._calls and self.app.loop.time() < end:
                await asyncio.sleep(0.01)
        for call in list(self._calls.values()):
            call.cancel(SERVER_STOPPED)  # the clients are still there: tell them, as grpc does
        self._terminated.set()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Until the server has stopped (stop() and its grace are over, or the app closed);
        as grpc.aio's, returns True if `timeout` ran out first, False otherwise."""
        try:
            await asyncio.wait_for(self._terminated.wait(), timeout)
            return False
        except asyncio.TimeoutError:
            return True


def server(migration_thread_pool: Any = None, handlers: Any = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None,
           maximum_concurrent_rpcs: int | None = None, compression: Any = None, *, app: AioApp | None = None, **_ignored: Any) -> Server:
    """Like grpc.aio.server(...): calls beyond maximum_concurrent_rpcs are refused with
    RESOURCE_EXHAUSTED, as grpc.aio does; `compression` is accepted and ignored."""
    s = Server(app, interceptors, options, maximum_concurrent_rpcs)
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
