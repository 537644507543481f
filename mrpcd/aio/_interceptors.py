"""grpc.aio-shaped interceptors: coroutine `intercept_*` methods on the client, coroutine
`intercept_service` on the server.

A client interceptor gets `(continuation, client_call_details, request)`; `await
continuation(details, request)` starts the next interceptor or the call and returns the
call object; the interceptor returns that call (or, for unary responses, a response value
of its own). The first interceptor given is the outermost, as in grpc.aio.
"""
from __future__ import annotations

import abc
import asyncio
import inspect
from typing import Any, Callable, Sequence

from ..interceptors import ClientCallDetails


class ClientInterceptor(abc.ABC):
    """Base of the asyncio client interceptors (grpc.aio.ClientInterceptor)."""


class UnaryUnaryClientInterceptor(ClientInterceptor):
    @abc.abstractmethod
    async def intercept_unary_unary(self, continuation: Callable, client_call_details: ClientCallDetails, request: Any) -> Any: ...


class UnaryStreamClientInterceptor(ClientInterceptor):
    @abc.abstractmethod
    async def intercept_unary_stream(self, continuation: Callable, client_call_details: ClientCallDetails, request: Any) -> Any: ...


class StreamUnaryClientInterceptor(ClientInterceptor):
    @abc.abstractmethod
    async def intercept_stream_unary(self, continuation: Callable, client_call_details: ClientCallDetails, request_iterator: Any) -> Any: ...


class StreamStreamClientInterceptor(ClientInterceptor):
    @abc.abstractmethod
    async def intercept_stream_stream(self, continuation: Callable, client_call_details: ClientCallDetails, request_iterator: Any) -> Any: ...


class ServerInterceptor(abc.ABC):
    """grpc.aio.ServerInterceptor: `await continuation(details)` gives the next handler."""

    @abc.abstractmethod
    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any: ...


_KINDS = {
    "unary_unary": (UnaryUnaryClientInterceptor, "intercept_unary_unary"),
    "unary_stream": (UnaryStreamClientInterceptor, "intercept_unary_stream"),
    "stream_unary": (StreamUnaryClientInterceptor, "intercept_stream_unary"),
    "stream_stream": (StreamStreamClientInterceptor, "intercept_stream_stream"),
}


def check_client_interceptors(interceptors: Sequence[Any] | None) -> tuple:
    out = tuple(interceptors or ())
    for i in out:
        if not isinstance(i, ClientInterceptor):
            raise TypeError(f"{type(i).__name__} is not an asyncio client interceptor (subclass mrpcd.aio.UnaryUnaryClientInterceptor & co.)")
    return out


async def resolve_handler(interceptors: Sequence[ServerInterceptor], details: Any, handler: Any) -> Any:
    async def terminal(_details: Any) -> Any:
        return handler

    call = terminal
    for interceptor in reversed(interceptors):
        call = (lambda i, nxt: lambda d: i.intercept_service(nxt, d))(interceptor, call)
    return await call(details)


class _Intercepted:
    """The call an intercepted multi-callable returns: the interceptors run in a task; the
    object forwards the Call surface to the call they produced."""

    def __init__(self, kind: str, interceptors: Sequence[Any], invoke: Callable, details: ClientCallDetails, request: Any, loop: asyncio.AbstractEventLoop) -> None:
        base, attr = _KINDS[kind]

        async def terminal(d: ClientCallDetails, req: Any) -> Any:
            return invoke(d, req)

        def link(inter: Any, nxt: Callable) -> Callable:
            async def step(d: ClientCallDetails, req: Any) -> Any:
                out = await getattr(inter, attr)(nxt, d, req)
                # `return continuation(details, request)` without await: the call, as in
                # grpc.aio (which unwraps it), not a coroutine handed to the caller
                while inspect.iscoroutine(out):
                    out = await out
                return out

            return step

        chain = terminal
        for i in reversed(interceptors):
            if isinstance(i, base):
                chain = link(i, chain)
        self._task = loop.create_task(chain(details, request))
        self._cancel_requested = False

    async def _inner(self) -> Any:
        inner = await asyncio.shield(self._task)
        if self._cancel_requested and hasattr(inner, "cancel"):
            inner.cancel()
        return inner

    def _settled(self) -> Any:
        """The call the interceptors produced, once they have; None before that, or when
        they raised (then the call is over: awaiting it raises their error)."""
        task = self._task
        if not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def cancel(self) -> bool:
        inner = self._settled()
        if inner is not None and hasattr(inner, "cancel"):
            return inner.cancel()
        if self._task.done():
            return False  # failed, or answered by the interceptor itself: nothing to cancel
        self._cancel_requested = True
        return True

    def cancelled(self) -> bool:
        inner = self._settled()
        if inner is not None and hasattr(inner, "cancelled"):
            return inner.cancelled()
        return self._cancel_requested

    def done(self) -> bool:
        if not self._task.done():
            return False
        inner = self._settled()
        return inner is None or not hasattr(inner, "done") or inner.done()

    def time_remaining(self) -> float | None:
        inner = self._settled()
        return inner.time_remaining() if inner is not None and hasattr(inner, "time_remaining") else None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        """grpc.aio: `callback(call)` once the call is over (given this intercepted call)."""
        async def attach() -> None:
            try:
                inner = await self._inner()
            except BaseException:
                callback(self)  # the interceptors failed: the call is over
                return
            if hasattr(inner, "add_done_callback"):
                inner.add_done_callback(lambda _inner: callback(self))
            else:
                callback(self)  # an interceptor's own response: over already

        asyncio.ensure_future(attach())

    async def wait_for_connection(self) -> None:
        inner = await self._inner()
        if hasattr(inner, "wait_for_connection"):
            await inner.wait_for_connection()

    async def code(self):
        return await (await self._inner()).code()

    async def details(self) -> str:
        return await (await self._inner()).details()

    async def initial_metadata(self) -> tuple:
        return await (await self._inner()).initial_metadata()

    async def trailing_metadata(self) -> tuple:
        return await (await self._inner()).trailing_metadata()


    async def write(self, request: Any) -> None:
        """Request streams made without an iterator (grpc.aio's write / done_writing)."""
        await (await self._inner()).write(request)

    async def done_writing(self) -> None:
        await (await self._inner()).done_writing()


class InterceptedUnaryResponseCall(_Intercepted):
    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> Any:
        inner = await self._inner()
        if hasattr(inner, "__await__") and hasattr(inner, "code"):
            return await inner
        return inner  # the interceptor answered with a response of its own


class InterceptedStreamResponseCall(_Intercepted):
    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        inner = await self._inner()
        async for msg in inner:
            yield msg

    async def read(self) -> Any:
        return await (await self._inner()).read()


def intercepted_call(kind: str, interceptors: Sequence[Any], invoke: Callable, details: ClientCallDetails, request: Any, loop: asyncio.AbstractEventLoop) -> Any:
    cls = InterceptedUnaryResponseCall if kind in ("unary_unary", "stream_unary") else InterceptedStreamResponseCall
    return cls(kind, interceptors, invoke, details, request, loop)
