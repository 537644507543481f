"""gRPC's status codes and the errors an RPC raises, so code written for grpcio ports as is."""
from __future__ import annotations

import concurrent.futures
import enum
from typing import Iterable, NamedTuple, Sequence


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

    def __repr__(self) -> str:
        return f"<RpcError {self._code.name}: {self._details!r}>"


class AbortError(Exception):
    """Raised inside a handler by context.abort(); the server turns it into the status."""


class FutureTimeoutError(concurrent.futures.TimeoutError):
    """grpc.FutureTimeoutError: a call future's result()/exception() ran out of `timeout`."""


class FutureCancelledError(concurrent.futures.CancelledError):
    """grpc.FutureCancelledError: result()/exception() of a call future that was cancelled."""
