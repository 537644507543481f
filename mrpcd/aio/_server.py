"""asyncio server side, shaped like grpc.aio: each call's handler runs as a task.

Client cancellation, a lost peer and the deadline all cancel that task (the handler sees
asyncio.CancelledError, `context.is_active()` turns False, done callbacks run); on the
deadline the server answers DEADLINE_EXCEEDED itself. Response streams await the
client's flow-control credit, request streams grant credit as the handler reads.
"""
from __future__ import annotations

import asyncio
import inspect
from collections import deque
from typing import Any, AsyncIterator, Callable, Sequence

from .. import flow, wire
from ..handlers import GenericRpcHandler, HandlerCallDetails, RpcMethodHandler
from ..marshal import records as R
from ..status import AbortError, RpcError, StatusCode
from ._app import AioApp, default_app
from ._interceptors import ServerInterceptor, resolve_handler


class _BadRequest(Exception):
    pass


class _ServerCall:
    def __init__(self, server: "Server", rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        self.server = server
        self.app = server.app
        self.handle, self.call_id = rec.handle, rec.call_id
        self.path = path
        self.handler = handler
        self.metadata = tuple(wire.request_meta(rec))
        self.deadline = wire.Deadline(rec.deadline)
        self._messages: deque[tuple[bytes, int]] = deque()
        self._half_closed = False
        self._event = asyncio.Event()
        self.cancelled = False
        self.finished = False
        self.initial_sent = False
        self.too_large: RpcError | None = None
        self.task: asyncio.Task | None = None
        self.callbacks: list = []
        self._credit = flow.SendCredit()
        self._recv = flow.RecvWindow()
        self._timer = server.app.loop.call_at(server.app.loop.time() + self.deadline.remaining(), self.expire) if self.deadline.at else None
        self.deliver(rec)

    def deliver(self, rec: R.Record) -> None:
        if not rec.flags & R.F_NO_MSG:
            limit = self.server._max_receive
            if len(rec.payload) > limit:
                self.too_large = wire.too_large("Received", len(rec.payload), limit)
                self._half_closed = True
            else:
                self._messages.append((rec.payload, flow.cost(len(rec.payload), len(rec.meta))))
        if rec.flags & R.F_END:
            self._half_closed = True
        self._event.set()

    def grant(self, n: int) -> None:
        if self._credit.grant(n):
            self._event.set()

    def expire(self) -> None:
        if self.cancelled or self.finished:
            return
        self.app.send_nowait(wire.response_record(self.handle, self.call_id, R.F_END | (0 if self.initial_sent else R.F_START), None, code=StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded"))
        self.cancel()

    def cancel(self) -> None:
        if self.cancelled or self.finished:
            return
        self.cancelled = True
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

    def is_active(self) -> bool:
        return not (self.cancelled or self.finished)

    async def next_request(self) -> Any:
        while not self._messages and not self._half_closed and not self.cancelled:
            self._event.clear()
            await self._event.wait()
        if self.cancelled:
            raise asyncio.CancelledError()
        if self._messages:
            payload, size = self._messages.popleft()
            grant = 0 if self._half_closed else self._recv.consume(size)
            if grant:
                self.app.send_nowait(flow.window_record(self.handle, self.call_id, grant))
            try:
                return self.handler.request_deserializer(payload)
            except ValueError as exc:
                raise _BadRequest(str(exc)) from None
        if self.too_large is not None:
            raise self.too_large
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
        if not self.initial_sent:
            flags |= R.F_START
            self.initial_sent = True
        if flags & R.F_END:
            self.finished = True
            if self._timer is not None:
                self._timer.cancel()
            self.server._forget(self)
        await self.app.send_async(wire.response_record(self.handle, self.call_id, flags, payload, ctx._initial, code, details, ctx._trailing))


class ServicerContext:
    def __init__(self, call: _ServerCall) -> None:
        self._call = call
        self._code: StatusCode | None = None
        self._details = ""
        self._initial: list = []
        self._trailing: list = []

    def invocation_metadata(self) -> tuple:
        return self._call.metadata

    def peer(self) -> str:
        return f"mrpcd:{self._call.handle}"

    def method(self) -> str:
        return self._call.path

    def time_remaining(self) -> float | None:
        return self._call.deadline.remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def add_done_callback(self, callback: Callable) -> None:
        self._call.callbacks.append(callback)

    def cancelled(self) -> bool:
        return self._call.cancelled

    def done(self) -> bool:
        return self._call.cancelled or self._call.finished

    async def send_initial_metadata(self, metadata) -> None:
        if self._call.initial_sent:
            raise ValueError("initial metadata was already sent")
        self._initial = wire.check_metadata(metadata)
        await self._call.send(0, None, self)

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = wire.check_metadata(metadata)

    def trailing_metadata(self) -> tuple:
        return tuple(self._trailing)

    def set_code(self, code: StatusCode | int) -> None:
        self._code = wire.coerce_code(code)

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def abort(self, code: StatusCode | int, details: str = "", trailing_metadata=()) -> None:
        code = wire.coerce_code(code)
        if code is StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = wire.check_metadata(trailing_metadata)
        raise AbortError(details)

    async def write(self, message: Any) -> None:
        await self._call.send(0, self._call.server._serialize(self._call.handler, message), self)

    async def read(self) -> Any:
        try:
            return await self._call.next_request()
        except StopAsyncIteration:
            return None  # grpc.aio.EOF


class Server:
    def __init__(self, app: AioApp | None = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None) -> None:
        self.app = app or default_app()
        self._max_send, self._max_receive = wire.message_limits(options, self.app.max_record)
        self._interceptors = tuple(interceptors or ())
        for i in self._interceptors:
            if not isinstance(i, ServerInterceptor):
                raise TypeError(f"{type(i).__name__} is not a mrpcd.aio.ServerInterceptor")
        self._methods: dict[int, tuple[str, RpcMethodHandler]] = {}
        self._generic: list[GenericRpcHandler] = []
        self._addresses: list[str] = []
        self._calls: dict[tuple[int, int], _ServerCall] = {}
        self._contexts: dict[int, ServicerContext] = {}
        self._started = False
        self._stopped = asyncio.Event()
        self.app.servers.append(self)

    def add_generic_rpc_handlers(self, handlers) -> None:
        for generic in handlers:
            if generic.schema is not None:
                self.app.ensure_schema(generic.schema)
            self._generic.append(generic)
            self._methods.update(generic.by_id)
        for address in self._addresses:
            self.app.call("bind", address=address, services=self._services())

    def _services(self) -> list[str]:
        return sorted({g.service_name for g in self._generic})

    def add_insecure_port(self, address: str) -> int:
        reply = self.app.call("bind", address=address, services=self._services())
        self._addresses.append(reply["address"])
        return int(reply["address"].rpartition(":")[2])

    async def start(self) -> None:
        self._started = True

    def route(self, rec: R.Record) -> bool:
        key = (rec.handle, rec.call_id)
        if rec.kind == R.CANCEL or rec.kind == R.WINDOW:
            call = self._calls.get(key)
            if call is None:
                return False
            if rec.kind == R.CANCEL:
                call.cancel()
            else:
                call.grant(rec.method_id)
            return True
        if not rec.flags & R.F_START:
            call = self._calls.get(key)
            if call is None:
                return False
            call.deliver(rec)
            return True
        entry = self._methods.get(rec.method_id)
        if entry is None:
            return False
        if not self._started or self._stopped.is_set():
            self.app.send_nowait(wire.response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.UNAVAILABLE, details="server is not serving"))
            return True
        call = _ServerCall(self, rec, *entry)
        self._calls[key] = call
        call.task = self.app.loop.create_task(self._run(call))
        return True

    def handle_lost(self, handle: int) -> None:
        for key, call in list(self._calls.items()):
            if key[0] == handle:
                call.cancel()

    def app_closed(self) -> None:
        """The app left the daemon (App.close): cancel every call's handler task."""
        self._stopped.set()
        for call in list(self._calls.values()):
            call.cancel()

    def _forget(self, call: _ServerCall) -> None:
        self._calls.pop((call.handle, call.call_id), None)

    def _serialize(self, handler: RpcMethodHandler, response: Any) -> bytes:
        payload = handler.response_serializer(response)
        if len(payload) > self._max_send:
            raise wire.too_large("Sent", len(payload), self._max_send)
        return payload

    async def _run(self, call: _ServerCall) -> None:
        ctx = ServicerContext(call)
        self._contexts[id(call)] = ctx
        try:
            if call.deadline.expired():
                call.expire()
                return
            handler = call.handler
            if self._interceptors:
                handler = await resolve_handler(self._interceptors, HandlerCallDetails(call.path, call.metadata), handler)
                if handler is None:
                    await call.send(R.F_END, None, ctx, StatusCode.UNIMPLEMENTED, "Method not found!")
                    return
                call.handler = handler
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
                await call.send(R.F_END, None, ctx, ctx._code or StatusCode.OK, ctx._details)
            else:
                if inspect.isawaitable(result):
                    result = await result
                code = ctx._code or StatusCode.OK
                payload = self._serialize(handler, result) if code is StatusCode.OK else None
                await call.send(R.F_END, payload, ctx, code, ctx._details)
        except asyncio.CancelledError:
            call.cancel()
        except _BadRequest as exc:
            await call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception deserializing request! {exc}")
        except AbortError:
            await call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details)
        except RpcError as exc:
            if exc.code() is StatusCode.RESOURCE_EXHAUSTED and ctx._code in (None, StatusCode.OK):
                await call.send(R.F_END, None, ctx, exc.code(), exc.details())
            else:
                await call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details or f"Exception calling application: {exc}")
        except Exception as exc:
            if ctx._code not in (None, StatusCode.OK):
                await call.send(R.F_END, None, ctx, ctx._code, ctx._details)
            else:
                await call.send(R.F_END, None, ctx, StatusCode.UNKNOWN, f"Exception calling application: {exc}")
        finally:
            self._contexts.pop(id(call), None)
            if not call.finished and not call.cancelled:
                call.finished = True
                self._forget(call)

    async def stop(self, grace: float | None) -> None:
        self._stopped.set()
        if grace:
            end = self.app.loop.time() + grace
            while self._calls and self.app.loop.time() < end:
                await asyncio.sleep(0.01)
        for call in list(self._calls.values()):
            call.cancel()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


def server(migration_thread_pool: Any = None, handlers: Any = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None, *, app: AioApp | None = None, **_ignored: Any) -> Server:
    s = Server(app, interceptors, options)
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
