"""One face over the two RPC stacks: mrpcd (mrpcd-stubgen stubs, mrpcd.aio) and grpcio
(grpc_tools.protoc stubs, grpc.aio).

Why: the hotel services and the load generator are written once, against this adapter, so
a difference between two runs is the RPC stack and nothing else. Both stacks take keyword
constructors and plain lists for repeated fields, and both raise an RpcError with
`.code().name`, which is all the services rely on.
"""
from __future__ import annotations

import importlib
from typing import Any

SERVICES = ("frontend", "search", "geo", "rate", "profile", "reservation", "user", "recommendation")
KINDS = ("mrpcd", "grpc")


class Runtime:
    """Messages, stubs, servers and status codes of one stack (`kind`), for one process."""

    def __init__(self, kind: str, app_name: str | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown RPC stack {kind!r}; known: {', '.join(KINDS)}")
        self.kind = kind
        self.app_name = app_name
        self._app: Any = None
        if kind == "mrpcd":
            import mrpcd
            import mrpcd.aio
            self._lib, self._aio = mrpcd, mrpcd.aio
        else:
            import grpc
            import grpc.aio
            self._lib, self._aio = grpc, grpc.aio
        self.RpcError: type[BaseException] = self._lib.RpcError
        self.StatusCode = self._lib.StatusCode

    @property
    def app(self) -> Any:
        """mrpcd: the process's one session with its daemon (named, so operators can find it)."""
        if self.kind == "mrpcd" and self._app is None:
            self._app = self._aio.connect(name=self.app_name)
        return self._app

    def messages(self, service: str) -> Any:
        return importlib.import_module(f"{service}_mrpc" if self.kind == "mrpcd" else f"{service}_pb2")

    def _grpc_module(self, service: str) -> Any:
        return importlib.import_module(f"{service}_mrpc" if self.kind == "mrpcd" else f"{service}_pb2_grpc")

    def channel(self, target: str) -> Any:
        if self.kind == "mrpcd":
            return self._aio.insecure_channel(target, app=self.app)
        return self._aio.insecure_channel(target)

    def stub(self, service: str, channel: Any) -> Any:
        return getattr(self._grpc_module(service), f"{service.capitalize()}Stub")(channel)

    def server(self) -> Any:
        if self.kind == "mrpcd":
            return self._aio.server(app=self.app)
        return self._aio.server()

    def add_servicer(self, service: str, servicer: Any, server: Any) -> None:
        getattr(self._grpc_module(service), f"add_{service.capitalize()}Servicer_to_server")(servicer, server)

    def code(self, name: str) -> Any:
        return self.StatusCode[name]


def error_code(exc: BaseException) -> str:
    """The status code name of an RpcError from either stack ('UNKNOWN' if it has none)."""
    try:
        return exc.code().name  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - a non-RPC error has no code
        return "UNKNOWN"


def error_details(exc: BaseException) -> str:
    try:
        return str(exc.details())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return str(exc)
