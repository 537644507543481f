"""gRPC's status codes and the errors an RPC raises, so code written for grpcio ports as is."""
from __future__ import annotations

import abc
import concurrent.futures
import enum
from typing import Any, Iterable, Iterator, NamedTuple, Sequence


class StatusCode(enum.Enum):
    """The 17 canonical codes; `.value` is (int, name) exactly as in grpc.StatusCode."""

    OK = (0, "ok")
    CANCELLED = (1, "cancelled")
    UNKNOWN = (2, "unknown")
    INVALID_ARGUMENT = (3, "invalid argument")
    DEADLINE_EXCEEDED = (4, "deadline exceeded")
    NOT_FOUND = (5, "not found")
    ALREADY_EXISTS = (6, "already exists")
    PERMISSION_DENIED = (7, "permission denied")
    RESOURCE_EXHAUSTED = (8, "resource exhausted")
    FAILED_PRECONDITION = (9, "failed precondition")
    ABORTED = (10, "aborted")
    OUT_OF_RANGE = (11, "out of range")
    UNIMPLEMENTED = (12, "unimplemented")
    INTERNAL = (13, "internal")
    UNAVAILABLE = (14, "unavailable")
    DATA_LOSS = (15, "data loss")
    UNAUTHENTICATED = (16, "unauthenticated")

    @property
    def code(self) -> int:
        return self.value[0]

    @classmethod
    def from_int(cls, code: int) -> "StatusCode":
        """Unknown numbers map to UNKNOWN, as grpc does for out-of-range codes."""
        return _BY_INT.get(code, cls.UNKNOWN)


_BY_INT = {c.value[0]: c for c in StatusCode}

Metadata = Sequence[tuple[str, "str | bytes"]]


class Metadatum(NamedTuple):
    """One metadata pair as grpc hands it out: a (key, value) tuple with .key and .value."""

    key: str
    value: "str | bytes"


def metadata_tuple(pairs: Iterable) -> tuple:
    """Metadata as grpc's accessors return it: a tuple of Metadatum (equal to plain pairs)."""
    return tuple(Metadatum(k, v) for k, v in pairs)


class RpcError(Exception):
    """Raised by a failed call; like grpc.RpcError it is also the call: code(), details(), metadata."""

    def __init__(
        self,
        code: StatusCode,
        details: str = "",
        trailing_metadata: Metadata = (),
        initial_metadata: Metadata = (),
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self._trailing = tuple(trailing_metadata)
        self._initial = tuple(initial_metadata)

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return metadata_tuple(self._trailing)

    def initial_metadata(self) -> tuple:
        return metadata_tuple(self._initial)

    def debug_error_string(self) -> str:
        """grpc's debugging text of a failed call: here its status and details."""
        return f"{self.code().name}: {self.details()}"

    def __repr__(self) -> str:
        return f"<RpcError {self._code.name}: {self._details!r}>"


class BaseError(Exception):
    """grpc.aio.BaseError: the base of AbortError, UsageError and InternalError."""


class AbortError(BaseError):
    """Raised inside a handler by context.abort(); the server turns it into the status
    (grpc.aio.AbortError: `except grpc.aio.AbortError: raise` around handler code works)."""


class InternalError(BaseError):
    """grpc.aio.InternalError (grpc raises it on its own internal failures; mrpcd does not,
    it is here for code that catches it)."""


class FutureTimeoutError(concurrent.futures.TimeoutError):
    """grpc.FutureTimeoutError: a call future's result()/exception() ran out of `timeout`."""


class FutureCancelledError(concurrent.futures.CancelledError):
    """grpc.FutureCancelledError: result()/exception() of a call future that was cancelled."""


# -- grpc's interface classes, so code that subclasses or checks them ports -------------------
# (grpc's examples subclass grpc.Future for an interceptor's own answer, grpc.Call and
# grpc.Future for a wrapped response iterator, and grpc.Status for abort_with_status.)


class RpcContext(abc.ABC):
    """grpc.RpcContext: what a call and a servicer context share."""

    @abc.abstractmethod
    def is_active(self) -> bool: ...

    @abc.abstractmethod
    def time_remaining(self) -> "float | None": ...

    @abc.abstractmethod
    def cancel(self) -> Any: ...

    @abc.abstractmethod
    def add_callback(self, callback: Any) -> bool: ...


class Call(RpcContext):
    """grpc.Call: an RPC's metadata and status, as a client sees them."""

    @abc.abstractmethod
    def initial_metadata(self) -> Any: ...

    @abc.abstractmethod
    def trailing_metadata(self) -> Any: ...

    @abc.abstractmethod
    def code(self) -> StatusCode: ...

    @abc.abstractmethod
    def details(self) -> str: ...


class Future(abc.ABC):
    """grpc.Future: a call's outcome to come (what `.future()` returns)."""

    @abc.abstractmethod
    def cancel(self) -> bool: ...

    @abc.abstractmethod
    def cancelled(self) -> bool: ...

    @abc.abstractmethod
    def running(self) -> bool: ...

    @abc.abstractmethod
    def done(self) -> bool: ...

    @abc.abstractmethod
    def result(self, timeout: "float | None" = None) -> Any: ...

    @abc.abstractmethod
    def exception(self, timeout: "float | None" = None) -> Any: ...

    @abc.abstractmethod
    def traceback(self, timeout: "float | None" = None) -> Any: ...

    @abc.abstractmethod
    def add_done_callback(self, fn: Any) -> None: ...


class Status(abc.ABC):
    """grpc.Status: what `context.abort_with_status` takes (attributes code, details,
    trailing_metadata; grpc_status's rpc_status.to_status makes one)."""


class Compression(enum.IntEnum):
    """grpc.Compression. Accepted wherever grpc takes it and ignored: the daemons own the
    transport between hosts, and an app's messages reach its daemon through shared memory."""

    NoCompression = 0
    Deflate = 1
    Gzip = 2


class ChannelConnectivity(enum.Enum):
    """grpc.ChannelConnectivity: a channel's state, `.value` (int, name) as in grpc. A
    channel is IDLE until its first call, CONNECTING while its daemon connects to the
    target, READY once connected, TRANSIENT_FAILURE when that failed, IDLE again after
    the connection was lost, SHUTDOWN once closed."""

    IDLE = (0, "idle")
    CONNECTING = (1, "connecting")
    READY = (2, "ready")
    TRANSIENT_FAILURE = (3, "transient failure")
    SHUTDOWN = (4, "shutdown")
