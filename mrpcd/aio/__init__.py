"""asyncio app library, shaped like grpc.aio: `insecure_channel`, `server`, awaitable calls.

The event loop itself drives the rx ring (`loop.add_reader` on the app's eventfd), so a
response is dispatched on the loop thread with no thread hop (`_app`). `_client` has the
channel and call objects, `_server` the server and servicer context, `_interceptors` the
grpc.aio-shaped interceptor classes.
"""
from __future__ import annotations

from ._app import AioApp, connect, default_app
from ._client import (
    EOF,
    AioRpcError,
    Channel,
    StreamResponseCall,
    StreamStreamCall,
    StreamStreamMultiCallable,
    StreamUnaryCall,
    StreamUnaryMultiCallable,
    UnaryResponseCall,
    UnaryStreamMultiCallable,
    UnaryUnaryMultiCallable,
    UsageError,
    _Call as Call,
    insecure_channel,
)
from ._interceptors import (
    ClientInterceptor,
    ServerInterceptor,
    StreamStreamClientInterceptor,
    StreamUnaryClientInterceptor,
    UnaryStreamClientInterceptor,
    UnaryUnaryClientInterceptor,
)
from ._metadata import Metadata
from ..status import AbortError, BaseError, InternalError  # grpc.aio's exception classes
from ..interceptors import ClientCallDetails  # grpc.aio.ClientCallDetails: the same fields
from ._server import Server, ServicerContext, server

# grpc.aio's names for the call objects (what ported code annotates with, or checks with
# isinstance): a unary-response call is grpc.aio's UnaryUnaryCall, a response stream its
# UnaryStreamCall
UnaryUnaryCall = UnaryResponseCall
UnaryStreamCall = StreamResponseCall


def init_grpc_aio() -> None:
    """grpc.aio.init_grpc_aio: nothing to set up here (the event loop drives the app)."""


def shutdown_grpc_aio() -> None:
    """grpc.aio.shutdown_grpc_aio: nothing to tear down (apps close with their loop)."""


__all__ = [
    "Call", "UnaryUnaryCall", "UnaryStreamCall", "UnaryUnaryMultiCallable", "UnaryStreamMultiCallable",
    "StreamUnaryMultiCallable", "StreamStreamMultiCallable", "init_grpc_aio", "shutdown_grpc_aio",
    "AioApp", "connect", "default_app", "EOF", "AioRpcError", "Channel", "StreamResponseCall", "UnaryResponseCall",
    "StreamUnaryCall", "StreamStreamCall", "UsageError",
    "insecure_channel", "ClientInterceptor", "ServerInterceptor", "StreamStreamClientInterceptor",
    "StreamUnaryClientInterceptor", "UnaryStreamClientInterceptor", "UnaryUnaryClientInterceptor",
    "Server", "ServicerContext", "server", "Metadata", "ClientCallDetails", "AbortError", "BaseError", "InternalError",
]
