"""Interceptors shaped like grpcio's, so existing interceptors port by changing the import.

Client (sync): subclass `UnaryUnaryClientInterceptor` & co. and wrap a channel with
`intercept_channel(channel, *interceptors)`. An interceptor gets
`(continuation, client_call_details, request_or_iterator)`; `continuation(details, request)`
runs the next interceptor or the call itself and returns the call (a Future and Call for
unary responses, an iterator and Call for streamed ones). The first interceptor given is
the outermost, as in grpc.

Server: subclass `ServerInterceptor` and pass `interceptors=[...]` to `mrpcd.server()` (or
`mrpcd.aio.server()`, where `intercept_service` is a coroutine). `intercept_service(
continuation, handler_call_details)` returns the RpcMethodHandler to use (or None:
UNIMPLEMENTED); `continuation(handler_call_details)` gives the next one's.

asyncio client: `UnaryUnaryClientInterceptor` & co. from `mrpcd.aio` (coroutine
`intercept_unary_unary` etc.), given to `mrpcd.aio.insecure_channel(..., interceptors=[...])`.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, NamedTuple, Sequence


class ClientCallDetails(NamedTuple):
    """What a client interceptor may inspect and replace (grpc.ClientCallDetails)."""

    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, Any]] | None
    credentials: Any = None
    wait_for_ready: bool | None = None
    compression: Any = None


def wait_for_ready_of(details: Any, default: bool | None = None) -> bool | None:
    """details.wait_for_ready, or `default` (the call's own, as grpc falls back to) for
    call details without it: grpc's examples build their own 4-field namedtuple (method,
    timeout, metadata, credentials), also a ClientCallDetails, whose inherited field reads
    past the tuple's end."""
    try:
        return details.wait_for_ready
    except (AttributeError, IndexError):
        return default


class UnaryUnaryClientInterceptor(abc.ABC):
    @abc.abstractmethod
    def intercept_unary_unary(self, continuation: Callable, client_call_details: ClientCallDetails, request: Any) -> Any: ...


class UnaryStreamClientInterceptor(abc.ABC):
    @abc.abstractmethod
    def intercept_unary_stream(self, continuation: Callable, client_call_details: ClientCallDetails, request: Any) -> Any: ...


class StreamUnaryClientInterceptor(abc.ABC):
    @abc.abstractmethod
    def intercept_stream_unary(self, continuation: Callable, client_call_details: ClientCallDetails, request_iterator: Any) -> Any: ...


class StreamStreamClientInterceptor(abc.ABC):
    @abc.abstractmethod
    def intercept_stream_stream(self, continuation: Callable, client_call_details: ClientCallDetails, request_iterator: Any) -> Any: ...


class ServerInterceptor(abc.ABC):
    @abc.abstractmethod
    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any: ...


_KINDS = {
    "unary_unary": (UnaryUnaryClientInterceptor, "intercept_unary_unary"),
    "unary_stream": (UnaryStreamClientInterceptor, "intercept_unary_stream"),
    "stream_unary": (StreamUnaryClientInterceptor, "intercept_stream_unary"),
    "stream_stream": (StreamStreamClientInterceptor, "intercept_stream_stream"),
}


def _chain(kind: str, interceptors: Sequence[Any], terminal: Callable[[ClientCallDetails, Any], Any]) -> Callable[[ClientCallDetails, Any], Any]:
    """Compose the interceptors of one call kind around `terminal`, first one outermost."""
    base, attr = _KINDS[kind]
    call = terminal
    for interceptor in reversed(interceptors):
        if isinstance(interceptor, base):
            call = (lambda i, nxt: lambda details, req: getattr(i, attr)(nxt, details, req))(interceptor, call)
    return call


class _FailedCall:
    """The outcome of a call that raised before producing a call object (e.g. a bad
    argument): a Future whose result() re-raises, so interceptors always get a call."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def result(self, timeout: float | None = None) -> Any:
        raise self._exc

    def exception(self, timeout: float | None = None) -> BaseException:
        return self._exc

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._exc, name, None)
        if attr is None:
            raise AttributeError(name)
        return attr


class _InterceptedUnaryResponse:
    def __init__(self, kind: str, inner: Any, method: str, interceptors: Sequence[Any]) -> None:
        self._kind = kind
        self._inner = inner
        self._method = method
        self._interceptors = interceptors

    def future(self, request: Any, timeout: float | None = None, metadata=None, **kw: Any) -> Any:
        def terminal(details: ClientCallDetails, req: Any) -> Any:
            try:
                return self._inner.future(req, timeout=details.timeout, metadata=details.metadata, wait_for_ready=wait_for_ready_of(details, wait))
            except Exception as exc:
                return _FailedCall(exc)

        wait = kw.get("wait_for_ready")
        details = ClientCallDetails(self._method, timeout, metadata, kw.get("credentials"), wait, kw.get("compression"))
        return _chain(self._kind, self._interceptors, terminal)(details, request)

    def with_call(self, request: Any, timeout: float | None = None, metadata=None, **kw: Any) -> tuple[Any, Any]:
        call = self.future(request, timeout, metadata, **kw)
        return call.result(), call

    def __call__(self, request: Any, timeout: float | None = None, metadata=None, **kw: Any) -> Any:
        return self.future(request, timeout, metadata, **kw).result()


class _InterceptedStreamResponse:
    def __init__(self, kind: str, inner: Any, method: str, interceptors: Sequence[Any]) -> None:
        self._kind = kind
        self._inner = inner
        self._method = method
        self._interceptors = interceptors

    def __call__(self, request: Any, timeout: float | None = None, metadata=None, **kw: Any) -> Any:
        def terminal(details: ClientCallDetails, req: Any) -> Any:
            return self._inner(req, timeout=details.timeout, metadata=details.metadata, wait_for_ready=wait_for_ready_of(details, wait))

        wait = kw.get("wait_for_ready")
        details = ClientCallDetails(self._method, timeout, metadata, kw.get("credentials"), wait, kw.get("compression"))
        return _chain(self._kind, self._interceptors, terminal)(details, request)


class _InterceptedChannel:
    """A channel whose calls run through interceptors; everything else goes to the channel."""

    def __init__(self, channel: Any, interceptors: Sequence[Any]) -> None:
        for i in interceptors:
            if not isinstance(i, (UnaryUnaryClientInterceptor, UnaryStreamClientInterceptor, StreamUnaryClientInterceptor, StreamStreamClientInterceptor)):
                raise TypeError(f"{type(i).__name__} is not a client interceptor (subclass mrpcd.UnaryUnaryClientInterceptor & co.)")
        self._channel = channel
        self._interceptors = tuple(interceptors)

    def unary_unary(self, method: str, *args: Any, **kw: Any) -> _InterceptedUnaryResponse:
        return _InterceptedUnaryResponse("unary_unary", self._channel.unary_unary(method, *args, **kw), method, self._interceptors)

    def stream_unary(self, method: str, *args: Any, **kw: Any) -> _InterceptedUnaryResponse:
        return _InterceptedUnaryResponse("stream_unary", self._channel.stream_unary(method, *args, **kw), method, self._interceptors)

    def unary_stream(self, method: str, *args: Any, **kw: Any) -> _InterceptedStreamResponse:
        return _InterceptedStreamResponse("unary_stream", self._channel.unary_stream(method, *args, **kw), method, self._interceptors)

    def stream_stream(self, method: str, *args: Any, **kw: Any) -> _InterceptedStreamResponse:
        return _InterceptedStreamResponse("stream_stream", self._channel.stream_stream(method, *args, **kw), method, self._interceptors)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "_InterceptedChannel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


def intercept_channel(channel: Any, *interceptors: Any) -> _InterceptedChannel:
    """Like grpc.intercept_channel: a channel whose calls pass through `interceptors`."""
    return _InterceptedChannel(channel, interceptors)


def resolve_handler(interceptors: Sequence[ServerInterceptor], details: Any, handler: Any) -> Any:
    """Run the server interceptors (first outermost) over the handler found for a call."""
    def terminal(_details: Any) -> Any:
        return handler

    call = terminal
    for interceptor in reversed(interceptors):
        call = (lambda i, nxt: lambda d: i.intercept_service(nxt, d))(interceptor, call)
    return call(details)
