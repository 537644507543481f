"""Method handlers, shaped like grpcio's: what generated `add_XServicer_to_server` builds.

A handler can be made from message classes (`request_type=`, `response_type=`, what
generated code passes) or from grpc-style `request_deserializer` / `response_serializer`
callables, so server interceptors written for grpcio can rebuild a handler around a
wrapped behavior exactly as they do there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from .marshal.schema import Schema, method_id

if TYPE_CHECKING:
    from .marshal.message import Message


def _raw_request(payload: bytes) -> bytes:
    """No request_deserializer: the handler gets the request's bytes (grpc's identity)."""
    return payload


def _raw_response(response: Any) -> bytes:
    """No response_serializer: the handler must return bytes, as in grpc."""
    if isinstance(response, (bytes, bytearray, memoryview)):
        return bytes(response)
    raise TypeError(f"a method handler made without response_serializer or response_type must return bytes, not {type(response).__name__}")


class RpcMethodHandler:
    """One method: its streaming shape, behavior and (de)serializers (grpc.RpcMethodHandler)."""

    def __init__(
        self,
        request_streaming: bool,
        response_streaming: bool,
        behavior: Callable[..., Any],
        request_type: type[Message] | None = None,
        response_type: type[Message] | None = None,
        request_deserializer: Callable[[bytes], Any] | None = None,
        response_serializer: Callable[[Any], bytes] | None = None,
    ) -> None:
        self.request_streaming = request_streaming
        self.response_streaming = response_streaming
        self.behavior = behavior
        self.request_type = request_type
        self.response_type = response_type
        # Neither given: the request's bytes as they are, and bytes back, as in grpc (a
        # server interceptor's terminator handler is made so: `unary_unary_rpc_method_handler(
        # deny)`, whose behavior only aborts).
        if request_deserializer is None:
            request_deserializer = request_type.FromString if request_type is not None else _raw_request
        if response_serializer is None:
            response_serializer = response_type.SerializeToString if response_type is not None else _raw_response
        # called with bytes (as grpc's), or with a memoryview if it is the generated FromString
        self.request_deserializer: Callable[[Any], Any] = request_deserializer
        self.response_serializer = response_serializer

    def _if(self, req: bool, rsp: bool) -> Callable[..., Any] | None:
        return self.behavior if (self.request_streaming, self.response_streaming) == (req, rsp) else None

    @property
    def unary_unary(self) -> Callable[..., Any] | None:
        return self._if(False, False)

    @property
    def unary_stream(self) -> Callable[..., Any] | None:
        return self._if(False, True)

    @property
    def stream_unary(self) -> Callable[..., Any] | None:
        return self._if(True, False)

    @property
    def stream_stream(self) -> Callable[..., Any] | None:
        return self._if(True, True)

    def __repr__(self) -> str:
        return f"RpcMethodHandler(request_streaming={self.request_streaming}, response_streaming={self.response_streaming}, behavior={self.behavior!r})"


def unary_unary_rpc_method_handler(behavior: Callable, request_deserializer: Callable | None = None, response_serializer: Callable | None = None, *, request_type: type[Message] | None = None, response_type: type[Message] | None = None) -> RpcMethodHandler:
    return RpcMethodHandler(False, False, behavior, request_type, response_type, request_deserializer, response_serializer)


def unary_stream_rpc_method_handler(behavior: Callable, request_deserializer: Callable | None = None, response_serializer: Callable | None = None, *, request_type: type[Message] | None = None, response_type: type[Message] | None = None) -> RpcMethodHandler:
    return RpcMethodHandler(False, True, behavior, request_type, response_type, request_deserializer, response_serializer)


def stream_unary_rpc_method_handler(behavior: Callable, request_deserializer: Callable | None = None, response_serializer: Callable | None = None, *, request_type: type[Message] | None = None, response_type: type[Message] | None = None) -> RpcMethodHandler:
    return RpcMethodHandler(True, False, behavior, request_type, response_type, request_deserializer, response_serializer)


def stream_stream_rpc_method_handler(behavior: Callable, request_deserializer: Callable | None = None, response_serializer: Callable | None = None, *, request_type: type[Message] | None = None, response_type: type[Message] | None = None) -> RpcMethodHandler:
    return RpcMethodHandler(True, True, behavior, request_type, response_type, request_deserializer, response_serializer)


class HandlerCallDetails(NamedTuple):
    """What a server interceptor sees of an incoming call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: tuple


class GenericRpcHandler:
    """All of one service's handlers, with the schema the daemon needs to serve it."""

    def __init__(self, service: str, handlers: dict[str, RpcMethodHandler], schema: Schema | None = None) -> None:
        self.service_name = service
        self.handlers = dict(handlers)
        self.schema = schema
        if schema is not None and service not in schema.services:
            raise ValueError(f"schema does not define service {service}")
        self.by_id = {method_id(f"/{service}/{name}"): (f"/{service}/{name}", h) for name, h in self.handlers.items()}

    @property
    def service(self) -> str:  # kept for code that read the attribute
        return self.service_name


def method_handlers_generic_handler(service: str, method_handlers: dict[str, RpcMethodHandler], schema: Schema | None = None) -> GenericRpcHandler:
    if schema is None:
        for h in method_handlers.values():
            schema = getattr(h.request_type, "__mrpc_schema__", None)
            break
    return GenericRpcHandler(service, method_handlers, schema)
