"""Sync server side, shaped like grpcio: `server(ThreadPoolExecutor(...))`, servicers, context.

The app's rx driver routes request records here; each call runs its handler on the
thread pool, as grpc's sync server does. Handlers see a `ServicerContext` with grpc's
methods (metadata, deadline, abort, status, cancellation callbacks).
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from .app import App, default_app
from .handlers import GenericRpcHandler, RpcMethodHandler
from .marshal import records as R
from .status import AbortError, RpcError, StatusCode
from . import wire


class _ServerCall:
    """One call's server side: incoming messages, cancellation, and the response path."""

    def __init__(self, server: "Server", rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        self.server = server
        self.app = server.app
        self.handle = rec.handle
        self.call_id = rec.call_id
        self.path = path
        self.handler = handler
        self.metadata = tuple(wire.request_meta(rec))
        self.deadline = wire.Deadline(rec.deadline)
        self._cond = threading.Condition()
        self._messages: deque[bytes] = deque()
        self._half_closed = False
        self.cancelled = False
        self.finished = False
        self.initial_sent = False
        self._callbacks: list[Callable[[], None]] = []
        self._take(rec)

    def _take(self, rec: R.Record) -> None:
        if not rec.flags & R.F_NO_MSG:
            self._messages.append(rec.payload)
        if rec.flags & R.F_END:
            self._half_closed = True

    def deliver(self, rec: R.Record) -> None:
        with self._cond:
            self._take(rec)
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        self.server._forget(self)
        for cb in callbacks:
            try:
                cb()
            except Exception:
                pass

    def is_active(self) -> bool:
        return not (self.cancelled or self.finished or self.deadline.expired())

    def next_request(self) -> Any:
        with self._cond:
            while not self._messages and not self._half_closed and not self.cancelled:
                remaining = self.deadline.remaining()
                if remaining == 0:
                    break
                self._cond.wait(remaining if remaining is not None else 1.0)
            if self._messages:
                payload = self._messages.popleft()
            elif self.cancelled or not self._half_closed:
                raise _Cancelled()
            else:
                raise StopIteration
        try:
            return self.handler.request_type.FromString(payload)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None

    def request_iterator(self) -> Iterator[Any]:
        while True:
            try:
                yield self.next_request()
            except StopIteration:
                return

    def send(self, flags: int, payload: bytes | None, ctx: "ServicerContext", code: StatusCode = StatusCode.OK, details: str = "") -> None:
        if self.cancelled:
            return
        if not self.initial_sent:
            flags |= R.F_START
            self.initial_sent = True
        if flags & R.F_END:
            self.finished = True
            self.server._forget(self)
        data = wire.response_record(self.handle, self.call_id, flags, payload, ctx._initial, code, details, ctx._trailing)
        self.app.send(data, self.deadline.remaining() if self.deadline.at else 30.0)


class _Cancelled(Exception):
    pass


class _BadRequest(Exception):
    pass


class ServicerContext:
    """What a handler sees of its call; method names and meaning follow grpc.ServicerContext."""

    def __init__(self, call: _ServerCall) -> None:
        self._call = call
        self._code: StatusCode | None = None
        self._details = ""
        self._initial: list = []
        self._trailing: list = []

    def invocation_metadata(self) -> tuple:
        return self._call.metadata

    def peer(self) -> str:
        return f"mrpcd:{self._call.handle}"

    def method(self) -> str:
        return self._call.path

    def time_remaining(self) -> float | None:
        return self._call.deadline.remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        call = self._call
        with call._cond:
            if call.cancelled or call.finished:
                return False
            call._callbacks.append(callback)
            return True

    def cancel(self) -> None:
        self._call.cancel()

    def send_initial_metadata(self, metadata) -> None:
        if self._call.initial_sent:
            raise ValueError("initial metadata was already sent")
        self._initial = wire.check_metadata(metadata)
        self._call.send(0, None, self)

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = wire.check_metadata(metadata)

    def trailing_metadata(self) -> tuple:
        return tuple(self._trailing)

    def set_code(self, code: StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def abort(self, code: StatusCode, details: str = "") -> None:
        if code is StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        raise AbortError(details)

    def abort_with_status(self, status: Any) -> None:
        self._trailing = list(getattr(status, "trailing_metadata", ()) or ())
        self.abort(status.code, status.details)


class Server:
    """Serves generic handlers through the local daemon: `add_insecure_port`, `start`, `stop`."""

    def __init__(self, thread_pool: ThreadPoolExecutor | None = None, handlers: Any = None, *, app: App | None = None, max_workers: int = 16) -> None:
        self.app = app or default_app()
        self._pool = thread_pool or ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mrpcd-server")
        self._methods: dict[int, tuple[str, RpcMethodHandler]] = {}
        self._generic: list[GenericRpcHandler] = []
        self._addresses: list[str] = []
        self._calls: dict[tuple[int, int], _ServerCall] = {}
        self._lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()
        self._idle = threading.Condition(self._lock)
        self.app.servers.append(self)
        if handlers:
            self.add_generic_rpc_handlers(handlers)

    def add_generic_rpc_handlers(self, handlers) -> None:
        for generic in handlers:
            if generic.schema is not None:
                self.app.ensure_schema(generic.schema)
            self._generic.append(generic)
            self._methods.update(generic.by_id)
        for address in self._addresses:  # ports added before these handlers learn of them
            self.app.call("bind", address=address, services=self._services())

    def _services(self) -> list[str]:
        return sorted({g.service for g in self._generic})

    def add_insecure_port(self, address: str) -> int:
        """Bind through the daemon; returns the port (useful with ":0")."""
        reply = self.app.call("bind", address=address, services=self._services())
        actual = reply["address"]
        self._addresses.append(actual)
        return int(actual.rpartition(":")[2])

    def add_secure_port(self, address: str, credentials: Any = None) -> int:
        # Security between hosts is the daemon's job (its TLS config), not the app's.
        return self.add_insecure_port(address)

    def start(self) -> None:
        self._started = True

    # routed from the app's rx driver -------------------------------------------------
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
            self.app.try_send(wire.response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.UNAVAILABLE, details="server is not serving"))
            return True
        call = _ServerCall(self, rec, *entry)
        with self._lock:
            self._calls[key] = call
        self._pool.submit(self._run, call)
        return True

    def handle_lost(self, handle: int) -> None:
        for key, call in list(self._calls.items()):
            if key[0] == handle:
                call.cancel()

    def _forget(self, call: _ServerCall) -> None:
        with self._lock:
            self._calls.pop((call.handle, call.call_id), None)
            if not self._calls:
                self._idle.notify_all()

    def _run(self, call: _ServerCall) -> None:
        ctx = ServicerContext(call)
        handler = call.handler
        try:
            if call.deadline.expired():
                call.send(R.F_END, None, ctx, StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
                return
            request = call.request_iterator() if handler.request_streaming else call.next_request()
            if handler.response_streaming:
                for response in handler.behavior(request, ctx):
                    if not call.is_active():
                        break
                    call.send(0, self._serialize(handler, response), ctx)
                if call.is_active():
                    call.send(R.F_END, None, ctx, ctx._code or StatusCode.OK, ctx._details)
            else:
                response = handler.behavior(request, ctx)
                code = ctx._code or StatusCode.OK
                payload = self._serialize(handler, response) if code is StatusCode.OK else None
                call.send(R.F_END, payload, ctx, code, ctx._details)
        except _Cancelled:
            if not call.finished:
                call.cancel()
        except _BadRequest as exc:
            call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception deserializing request! {exc}")
        except _SerializeError as exc:
            call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception serializing response! {exc}")
        except AbortError:
            call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details)
        except RpcError as exc:  # e.g. the handler's own outgoing call failed, or the ring refused
            if not call.finished:
                try:
                    call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details or f"Exception calling application: {exc}")
                except RpcError:
                    pass
        except Exception as exc:
            if ctx._code not in (None, StatusCode.OK):
                call.send(R.F_END, None, ctx, ctx._code, ctx._details)
            else:
                call.send(R.F_END, None, ctx, StatusCode.UNKNOWN, f"Exception calling application: {exc}")
        finally:
            if not call.finished and not call.cancelled:
                self._forget(call)

    @staticmethod
    def _serialize(handler: RpcMethodHandler, response: Any) -> bytes:
        try:
            return handler.response_type.SerializeToString(response)
        except Exception as exc:
            raise _SerializeError(str(exc)) from None

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls; running ones get `grace` seconds, then are cancelled."""
        self._stopped.set()
        with self._lock:
            if grace:
                self._idle.wait_for(lambda: not self._calls, grace)
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        done = threading.Event()
        done.set()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


class _SerializeError(Exception):
    pass


def server(thread_pool: ThreadPoolExecutor | None = None, handlers: Any = None, *, app: App | None = None, **_ignored: Any) -> Server:
    """Like grpc.server(futures.ThreadPoolExecutor(...))."""
    return Server(thread_pool, handlers, app=app)
