"""mrpcd: RPC as a managed system service.

The app library: connect to the local daemon, make channels and servers shaped like
grpcio's (`insecure_channel`, `server`, `StatusCode`, `RpcError`), and serve generated
servicers. `mrpcd.aio` has the asyncio flavour.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .status import (  # noqa: E402
    AbortError,
    Call,
    ChannelConnectivity,
    Compression,
    Future,
    FutureCancelledError,
    FutureTimeoutError,
    RpcContext,
    RpcError,
    Status,
    StatusCode,
)

__all__ = ["__version__", "AbortError", "Call", "ChannelConnectivity", "Compression", "Future", "FutureCancelledError", "FutureTimeoutError", "RpcContext",
           "RpcError", "Status", "StatusCode"]

from .app import App, connect, default_app  # noqa: E402
from .channel import Channel, channel_ready_future, insecure_channel  # noqa: E402
from .handlers import (  # noqa: E402
    GenericRpcHandler,
    HandlerCallDetails,
    RpcMethodHandler,
    method_handlers_generic_handler,
    stream_stream_rpc_method_handler,
    stream_unary_rpc_method_handler,
    unary_stream_rpc_method_handler,
    unary_unary_rpc_method_handler,
)
from .server import Server, ServicerContext, server  # noqa: E402
from .interceptors import (  # noqa: E402
    ClientCallDetails,
    ServerInterceptor,
    StreamStreamClientInterceptor,
    StreamUnaryClientInterceptor,
    UnaryStreamClientInterceptor,
    UnaryUnaryClientInterceptor,
    intercept_channel,
)

__all__ += [
    "App", "connect", "default_app", "Channel", "channel_ready_future", "insecure_channel", "GenericRpcHandler", "RpcMethodHandler",
    "method_handlers_generic_handler", "stream_stream_rpc_method_handler", "stream_unary_rpc_method_handler",
    "unary_stream_rpc_method_handler", "unary_unary_rpc_method_handler", "Server", "ServicerContext", "server",
    "HandlerCallDetails", "ClientCallDetails", "ServerInterceptor", "UnaryUnaryClientInterceptor",
    "UnaryStreamClientInterceptor", "StreamUnaryClientInterceptor", "StreamStreamClientInterceptor", "intercept_channel",
]
