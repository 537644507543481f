"""asyncio app library, shaped like grpc.aio: `insecure_channel`, `server`, awaitable calls.

The event loop itself drives the rx ring (`loop.add_reader` on the app's eventfd), so a
response is dispatched on the loop thread with no thread hop. Control requests (connect,
bind) are short local round trips run in the default executor so the loop never blocks on
a slow peer.
"""
from __future__ import annotations

import asyncio
import inspect
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable

from ..app import App
from ..handlers import GenericRpcHandler, RpcMethodHandler
from ..marshal import records as R
from ..marshal.schema import method_id as _method_id
from ..native import ring as ringmod
from ..status import AbortError, RpcError, StatusCode
from .. import wire

__all__ = ["insecure_channel", "server", "Channel", "Server", "ServicerContext", "connect"]


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


# -- client ------------------------------------------------------------------------------
class _AioClientCall:
    def __init__(self, app: AioApp, handle: int, call_id: int, deserialize: Callable[[bytes], Any], timeout: float | None) -> None:
        self.app = app
        self.handle = handle
        self.call_id = call_id
        self._deserialize = deserialize
        self._messages: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._code = StatusCode.OK
        self._details = ""
        self._initial: list = []
        self._trailing: list = []
        self._deadline = wire.Deadline(wire.deadline_us(timeout)) if timeout is not None else None
        app.calls[(handle, call_id)] = self

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def deliver(self, rec: R.Record) -> None:
        if self._done:
            return
        if rec.flags & (R.F_START | R.F_END):
            initial, trailing, details = wire.split_response_meta(rec)
            if rec.flags & R.F_START:
                self._initial = initial
        if not rec.flags & R.F_NO_MSG:
            self._messages.append(rec.payload)
        if rec.flags & R.F_END:
            self._trailing, self._details = trailing, details
            self._code = StatusCode.from_int(rec.status)
            self._finish()
        self._wake()

    def lost(self, code: StatusCode, details: str) -> None:
        if not self._done:
            self._code, self._details = code, details
            self._finish()
            self._wake()

    def _finish(self) -> None:
        self._done = True
        self.app.calls.pop((self.handle, self.call_id), None)

    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        if self._done:
            return False
        self._code, self._details = code, details
        self._finish()
        self._wake()
        self.app.send_nowait(wire.cancel_record(self.handle, self.call_id))
        return True

    async def _wait(self) -> bool:
        """Wait for news; False when the deadline passed first."""
        remaining = self._deadline.remaining() if self._deadline else None
        if remaining == 0:
            return False
        self._waiter = self.app.loop.create_future()
        try:
            await asyncio.wait_for(self._waiter, remaining)
            return True
        except asyncio.TimeoutError:
            return False
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            self._waiter = None

    async def next_message(self) -> Any:
        while not self._messages and not self._done:
            if not await self._wait():
                self.cancel(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        if self._messages:
            try:
                return self._deserialize(self._messages.popleft())
            except ValueError as exc:
                self.cancel(StatusCode.INTERNAL, f"failed to decode the response: {exc}")
                raise self.error() from None
        if self._code is StatusCode.OK:
            raise StopAsyncIteration
        raise self.error()

    async def wait_done(self) -> None:
        while not self._done:
            if not await self._wait():
                self.cancel(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def error(self) -> RpcError:
        return RpcError(self._code, self._details, self._trailing, self._initial)

    async def code(self) -> StatusCode:
        await self.wait_done()
        return self._code

    async def details(self) -> str:
        await self.wait_done()
        return self._details

    async def initial_metadata(self) -> tuple:
        return tuple(self._initial)

    async def trailing_metadata(self) -> tuple:
        await self.wait_done()
        return tuple(self._trailing)

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self._done and self._code is StatusCode.CANCELLED


class _AioMultiCallable:
    def __init__(self, channel: "Channel", method: str, request_type: type, response_type: type) -> None:
        self._channel = channel
        self._method_id = _method_id(method)
        self._request_type = request_type
        self._response_type = response_type
        self._encode = request_type.SerializeToString
        self._schemas = [request_type.__mrpc_schema__, response_type.__mrpc_schema__]

    async def _start(self, first: Any, end: bool, timeout: float | None, metadata) -> _AioClientCall:
        ch = self._channel
        for schema in self._schemas:
            if id(schema) not in ch.app._schemas:
                await ch.app.loop.run_in_executor(None, ch.app.ensure_schema, schema)
        meta = wire.check_metadata(metadata)
        handle = await ch._ensure_handle()
        call = _AioClientCall(ch.app, handle, ch.app.next_call_id(), self._response_type.FromString, timeout)
        payload = self._encode(first) if first is not None else None
        flags = R.F_START | (R.F_END if end else 0)
        await ch.app.send_async(wire.request_record(handle, call.call_id, self._method_id, flags, wire.deadline_us(timeout), meta, payload))
        return call

    async def _pump(self, call: _AioClientCall, requests: Any) -> None:
        app = self._channel.app
        try:
            if hasattr(requests, "__aiter__"):
                async for req in requests:
                    if call.done():
                        return
                    await app.send_async(wire.request_record(call.handle, call.call_id, 0, 0, 0, (), self._encode(req)))
            else:
                for req in requests:
                    if call.done():
                        return
                    await app.send_async(wire.request_record(call.handle, call.call_id, 0, 0, 0, (), self._encode(req)))
            if not call.done():
                await app.send_async(wire.request_record(call.handle, call.call_id, 0, R.F_END, 0, (), None))
        except Exception as exc:
            call.cancel(StatusCode.CANCELLED, f"request iterator raised: {exc!r}")


class UnaryUnaryMultiCallable(_AioMultiCallable):
    def __call__(self, request: Any, *, timeout: float | None = None, metadata=None, **_ignored: Any):
        return self._unary(request, timeout, metadata)

    async def _unary(self, request: Any, timeout: float | None, metadata) -> Any:
        call = await self._start(request, True, timeout, metadata)
        try:
            response = await call.next_message()
        except StopAsyncIteration:
            raise RpcError(StatusCode.INTERNAL, "the server ended the call without a response") from None
        await call.wait_done()
        if call._code is not StatusCode.OK:
            raise call.error()
        return response


class _AioResponseStream:
    """The call of a server-streaming RPC: `async for` it, or `await call.read()`."""

    def __init__(self, starter) -> None:
        self._starter = starter
        self._call: _AioClientCall | None = None

    async def _get(self) -> _AioClientCall:
        if self._call is None:
            self._call = await self._starter
        return self._call

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        call = await self._get()
        return await call.next_message()

    async def read(self) -> Any:
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None  # grpc.aio.EOF

    def cancel(self) -> bool:
        return self._call.cancel() if self._call is not None else False

    async def code(self) -> StatusCode:
        return await (await self._get()).code()

    async def details(self) -> str:
        return await (await self._get()).details()

    async def initial_metadata(self) -> tuple:
        return await (await self._get()).initial_metadata()

    async def trailing_metadata(self) -> tuple:
        return await (await self._get()).trailing_metadata()


class UnaryStreamMultiCallable(_AioMultiCallable):
    def __call__(self, request: Any, *, timeout: float | None = None, metadata=None, **_ignored: Any) -> _AioResponseStream:
        return _AioResponseStream(self._start(request, True, timeout, metadata))


class StreamUnaryMultiCallable(_AioMultiCallable):
    def __call__(self, request_iterator: Any, *, timeout: float | None = None, metadata=None, **_ignored: Any):
        return self._run(request_iterator, timeout, metadata)

    async def _run(self, requests: Any, timeout: float | None, metadata) -> Any:
        call = await self._start(None, False, timeout, metadata)
        pump = asyncio.ensure_future(self._pump(call, requests))
        try:
            response = await call.next_message()
        except StopAsyncIteration:
            raise RpcError(StatusCode.INTERNAL, "the server ended the call without a response") from None
        finally:
            if not pump.done():
                pump.cancel()
        await call.wait_done()
        if call._code is not StatusCode.OK:
            raise call.error()
        return response


class StreamStreamMultiCallable(_AioMultiCallable):
    def __call__(self, request_iterator: Any, *, timeout: float | None = None, metadata=None, **_ignored: Any) -> _AioResponseStream:
        async def start() -> _AioClientCall:
            call = await self._start(None, False, timeout, metadata)
            asyncio.ensure_future(self._pump(call, request_iterator))
            return call

        return _AioResponseStream(start())


class Channel:
    def __init__(self, target: str, app: AioApp | None = None) -> None:
        self.target = target
        self.app = app or default_app()
        self._handle: int | None = None
        self._lock = asyncio.Lock()

    async def _ensure_handle(self) -> int:
        if self._handle is not None:
            return self._handle
        async with self._lock:
            if self._handle is None:
                try:
                    reply = await self.app.call_async("connect", target=self.target)
                except RpcError as exc:
                    code = exc.code() if exc.code() is not StatusCode.UNKNOWN else StatusCode.UNAVAILABLE
                    raise RpcError(code, f"failed to connect to {self.target}: {exc.details()}") from None
                self._handle = reply["handle"]
                self.app.handle_listeners.setdefault(self._handle, []).append(self._on_lost)
            return self._handle

    def _on_lost(self, details: str) -> None:
        self._handle = None

    def unary_unary(self, method: str, request_type: type, response_type: type, **_: Any) -> UnaryUnaryMultiCallable:
        return UnaryUnaryMultiCallable(self, method, request_type, response_type)

    def unary_stream(self, method: str, request_type: type, response_type: type, **_: Any) -> UnaryStreamMultiCallable:
        return UnaryStreamMultiCallable(self, method, request_type, response_type)

    def stream_unary(self, method: str, request_type: type, response_type: type, **_: Any) -> StreamUnaryMultiCallable:
        return StreamUnaryMultiCallable(self, method, request_type, response_type)

    def stream_stream(self, method: str, request_type: type, response_type: type, **_: Any) -> StreamStreamMultiCallable:
        return StreamStreamMultiCallable(self, method, request_type, response_type)

    async def close(self, grace: float | None = None) -> None:
        handle, self._handle = self._handle, None
        if handle is not None and not self.app.closed:
            try:
                await self.app.call_async("close", handle=handle)
            except RpcError:
                pass

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def insecure_channel(target: str, options: Any = None, app: AioApp | None = None) -> Channel:
    return Channel(target, app)


# -- server ------------------------------------------------------------------------------
class _AioServerCall:
    def __init__(self, server: "Server", rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        self.server = server
        self.app = server.app
        self.handle, self.call_id = rec.handle, rec.call_id
        self.path = path
        self.handler = handler
        self.metadata = tuple(wire.request_meta(rec))
        self.deadline = wire.Deadline(rec.deadline)
        self._messages: deque[bytes] = deque()
        self._half_closed = False
        self._waiter: asyncio.Future | None = None
        self.cancelled = False
        self.finished = False
        self.initial_sent = False
        self.task: asyncio.Task | None = None
        self.callbacks: list = []
        self.deliver(rec)

    def deliver(self, rec: R.Record) -> None:
        if not rec.flags & R.F_NO_MSG:
            self._messages.append(rec.payload)
        if rec.flags & R.F_END:
            self._half_closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def cancel(self) -> None:
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        self.server._forget(self)
        if self.task is not None:
            self.task.cancel()
        for cb in self.callbacks:
            try:
                cb(None)
            except Exception:
                pass

    def is_active(self) -> bool:
        return not (self.cancelled or self.finished or self.deadline.expired())

    async def next_request(self) -> Any:
        while not self._messages and not self._half_closed:
            self._waiter = self.app.loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, self.deadline.remaining())
            except asyncio.TimeoutError:
                raise asyncio.CancelledError() from None
            finally:
                self._waiter = None
        if self._messages:
            payload = self._messages.popleft()
            try:
                return self.handler.request_type.FromString(payload)
            except ValueError as exc:
                raise _BadRequest(str(exc)) from None
        raise StopAsyncIteration

    async def request_iterator(self) -> AsyncIterator[Any]:
        while True:
            try:
                yield await self.next_request()
            except StopAsyncIteration:
                return

    async def send(self, flags: int, payload: bytes | None, ctx: "ServicerContext", code: StatusCode = StatusCode.OK, details: str = "") -> None:
        if self.cancelled:
            return
        if not self.initial_sent:
            flags |= R.F_START
            self.initial_sent = True
        if flags & R.F_END:
            self.finished = True
            self.server._forget(self)
        await self.app.send_async(wire.response_record(self.handle, self.call_id, flags, payload, ctx._initial, code, details, ctx._trailing))


class _BadRequest(Exception):
    pass


class ServicerContext:
    def __init__(self, call: _AioServerCall) -> None:
        self._call = call
        self._code: StatusCode | None = None
        self._details = ""
        self._initial: list = []
        self._trailing: list = []

    def invocation_metadata(self) -> tuple:
        return self._call.metadata

    def peer(self) -> str:
        return f"mrpcd:{self._call.handle}"

    def time_remaining(self) -> float | None:
        return self._call.deadline.remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def add_done_callback(self, callback: Callable) -> None:
        self._call.callbacks.append(callback)

    def cancelled(self) -> bool:
        return self._call.cancelled

    async def send_initial_metadata(self, metadata) -> None:
        self._initial = wire.check_metadata(metadata)
        await self._call.send(0, None, self)

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = wire.check_metadata(metadata)

    def set_code(self, code: StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    async def abort(self, code: StatusCode, details: str = "", trailing_metadata=()) -> None:
        if code is StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = wire.check_metadata(trailing_metadata)
        raise AbortError(details)

    async def write(self, message: Any) -> None:
        await self._call.send(0, self._call.handler.response_type.SerializeToString(message), self)

    async def read(self) -> Any:
        try:
            return await self._call.next_request()
        except StopAsyncIteration:
            return None


class Server:
    def __init__(self, app: AioApp | None = None) -> None:
        self.app = app or default_app()
        self._methods: dict[int, tuple[str, RpcMethodHandler]] = {}
        self._generic: list[GenericRpcHandler] = []
        self._addresses: list[str] = []
        self._calls: dict[tuple[int, int], _AioServerCall] = {}
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
        return sorted({g.service for g in self._generic})

    def add_insecure_port(self, address: str) -> int:
        reply = self.app.call("bind", address=address, services=self._services())
        self._addresses.append(reply["address"])
        return int(reply["address"].rpartition(":")[2])

    async def start(self) -> None:
        self._started = True

    def route(self, rec: R.Record) -> bool:
        key = (rec.handle, rec.call_id)
        if rec.kind == R.CANCEL:
            call = self._calls.get(key)
            if call is None:
                return False
            call.cancel()
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
        call = _AioServerCall(self, rec, *entry)
        self._calls[key] = call
        call.task = self.app.loop.create_task(self._run(call))
        return True

    def handle_lost(self, handle: int) -> None:
        for key, call in list(self._calls.items()):
            if key[0] == handle:
                call.cancel()

    def _forget(self, call: _AioServerCall) -> None:
        self._calls.pop((call.handle, call.call_id), None)

    async def _run(self, call: _AioServerCall) -> None:
        ctx = ServicerContext(call)
        handler = call.handler
        try:
            if call.deadline.expired():
                await call.send(R.F_END, None, ctx, StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                return
            request = call.request_iterator() if handler.request_streaming else await call.next_request()
            result = handler.behavior(request, ctx)
            if handler.response_streaming:
                if inspect.isasyncgen(result):
                    async for response in result:
                        await call.send(0, handler.response_type.SerializeToString(response), ctx)
                elif inspect.isawaitable(result):
                    await result  # handler used context.write()
                else:
                    for response in result:
                        await call.send(0, handler.response_type.SerializeToString(response), ctx)
                await call.send(R.F_END, None, ctx, ctx._code or StatusCode.OK, ctx._details)
            else:
                if inspect.isawaitable(result):
                    result = await result
                code = ctx._code or StatusCode.OK
                payload = handler.response_type.SerializeToString(result) if code is StatusCode.OK else None
                await call.send(R.F_END, payload, ctx, code, ctx._details)
        except asyncio.CancelledError:
            call.cancel()
        except _BadRequest as exc:
            await call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception deserializing request! {exc}")
        except AbortError:
            await call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details)
        except Exception as exc:
            if ctx._code not in (None, StatusCode.OK):
                await call.send(R.F_END, None, ctx, ctx._code, ctx._details)
            else:
                await call.send(R.F_END, None, ctx, StatusCode.UNKNOWN, f"Exception calling application: {exc}")
        finally:
            if not call.finished and not call.cancelled:
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


def server(migration_thread_pool: Any = None, handlers: Any = None, *, app: AioApp | None = None, **_ignored: Any) -> Server:
    s = Server(app)
    if handlers:
        s.add_generic_rpc_handlers(handlers)
    return s
