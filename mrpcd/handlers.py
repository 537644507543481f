"""Method handlers, shaped like grpcio's: what generated `add_XServicer_to_server` builds."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .marshal.schema import Schema, method_id


@dataclass
class RpcMethodHandler:
    request_streaming: bool
    response_streaming: bool
    behavior: Callable[..., Any]
    request_type: type
    response_type: type

    @property
    def request_deserializer(self) -> Callable[[bytes], Any]:
        return self.request_type.FromString

    @property
    def response_serializer(self) -> Callable[[Any], bytes]:
        return self.response_type.SerializeToString


def unary_unary_rpc_method_handler(behavior: Callable, request_type: type, response_type: type) -> RpcMethodHandler:
    return RpcMethodHandler(False, False, behavior, request_type, response_type)


def unary_stream_rpc_method_handler(behavior: Callable, request_type: type, response_type: type) -> RpcMethodHandler:
    return RpcMethodHandler(False, True, behavior, request_type, response_type)


def stream_unary_rpc_method_handler(behavior: Callable, request_type: type, response_type: type) -> RpcMethodHandler:
    return RpcMethodHandler(True, False, behavior, request_type, response_type)


def stream_stream_rpc_method_handler(behavior: Callable, request_type: type, response_type: type) -> RpcMethodHandler:
    return RpcMethodHandler(True, True, behavior, request_type, response_type)


class GenericRpcHandler:
    """All of one service's handlers, with the schema the daemon needs to serve it."""

    def __init__(self, service: str, handlers: dict[str, RpcMethodHandler], schema: Schema | None = None) -> None:
        self.service = service
        self.handlers = dict(handlers)
        self.schema = schema
        if schema is not None and service not in schema.services:
            raise ValueError(f"schema does not define service {service}")
        self.by_id = {method_id(f"/{service}/{name}"): (f"/{service}/{name}", h) for name, h in self.handlers.items()}


def method_handlers_generic_handler(service: str, method_handlers: dict[str, RpcMethodHandler], schema: Schema | None = None) -> GenericRpcHandler:
    if schema is None:
        for h in method_handlers.values():
            schema = getattr(h.request_type, "__mrpc_schema__", None)
            break
    return GenericRpcHandler(service, method_handlers, schema)
