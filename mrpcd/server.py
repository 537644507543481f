"""Sync server side, shaped like grpcio: `server(ThreadPoolExecutor(...))`, servicers, context.

The app's rx driver routes request records here; each call runs its handler on the
thread pool, as grpc's sync server does. Handlers see a `ServicerContext` with grpc's
methods (metadata, deadline, abort, status, cancellation callbacks). A call ends for the
handler (is_active() False, callbacks run) when the client cancels or dies, or when its
deadline passes; in the last case the server itself answers DEADLINE_EXCEEDED, as grpc
does. Response streams wait for the client's credit (mrpcd.flow), so a slow client
pauses a streaming handler inside its `yield` instead of growing buffers.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from . import flow, wire
from .app import App, default_app
from .handlers import GenericRpcHandler, HandlerCallDetails, RpcMethodHandler
from .interceptors import ServerInterceptor, resolve_handler
from .marshal import records as R
from .status import AbortError, RpcError, StatusCode


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
        self._messages: deque[tuple[bytes, int]] = deque()
        self._half_closed = False
        self.cancelled = False
        self.expired = False
        self.finished = False
        self.initial_sent = False
        self.too_large: RpcError | None = None
        self._callbacks: list[Callable[[], None]] = []
        self._credit = flow.SendCredit()
        self._recv = flow.RecvWindow()
        self.timed = False  # counted by the server's _Deadlines until the call ends
        self._take(rec)

    def _take(self, rec: R.Record) -> None:
        if not rec.flags & R.F_NO_MSG:
            limit = self.server._max_receive
            if len(rec.payload) > limit:
                self.too_large = wire.too_large("Received", len(rec.payload), limit)
                self._half_closed = True
                return
            self._messages.append((rec.payload, flow.cost(len(rec.payload), len(rec.meta))))
        if rec.flags & R.F_END:
            self._half_closed = True

    def deliver(self, rec: R.Record) -> None:
        with self._cond:
            self._take(rec)
            self._cond.notify_all()

    def grant(self, n: int) -> None:
        with self._cond:
            if self._credit.grant(n):
                self._cond.notify_all()

    def cancel(self, expired: bool = False) -> None:
        """The call is over for the handler: client cancel, lost peer, or deadline."""
        with self._cond:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
            self.expired = expired
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        self.server._forget(self)
        if expired:  # the client may not have noticed yet (clock skew, lost CANCEL): tell it
            data = wire.response_record(self.handle, self.call_id, R.F_END | (0 if self.initial_sent else R.F_START), None, code=StatusCode.DEADLINE_EXCEEDED, details="Deadline Exceeded")
            self.app.try_send(data)
        for cb in callbacks:
            try:
                cb()
            except Exception:
                pass

    def is_active(self) -> bool:
        return not (self.cancelled or self.finished)

    def next_request(self) -> Any:
        with self._cond:
            while not self._messages and not self._half_closed and not self.cancelled:
                self._cond.wait(1.0)
            if self.too_large is not None and not self._messages:
                raise _TooLarge()
            if self._messages:
                payload, size = self._messages.popleft()
                grant = 0 if self._half_closed else self._recv.consume(size)
            elif self.cancelled:
                raise _Cancelled()
            else:
                raise StopIteration
        if grant:
            self.app.try_send(flow.window_record(self.handle, self.call_id, grant))
        try:
            return self.handler.request_deserializer(payload)
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None

    def request_iterator(self) -> Iterator[Any]:
        while True:
            try:
                yield self.next_request()
            except StopIteration:
                return

    def send(self, flags: int, payload: bytes | None, ctx: "ServicerContext", code: StatusCode = StatusCode.OK, details: str = "") -> None:
        if payload is not None and not flags & R.F_END:
            with self._cond:  # flow control: wait for the client's credit
                while not self._credit.available() and not self.cancelled:
                    self._cond.wait(1.0)
                self._credit.spend(flow.cost(len(payload)))
        with self._cond:
            if self.cancelled or self.finished:
                return
            if not self.initial_sent:
                flags |= R.F_START
                self.initial_sent = True
            if flags & R.F_END:
                self.finished = True
        if flags & R.F_END:
            self.server._forget(self)
        data = wire.response_record(self.handle, self.call_id, flags, payload, ctx._initial, code, details, ctx._trailing)
        self.app.send(data, self.deadline.remaining() if self.deadline.at else 30.0)


class _Cancelled(Exception):
    pass


class _BadRequest(Exception):
    pass


class _TooLarge(Exception):
    pass


class _SerializeError(Exception):
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
        """Run `callback` when the call is cancelled or expires; False if it already ended."""
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

    def set_code(self, code: StatusCode | int) -> None:
        self._code = wire.coerce_code(code)

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def abort(self, code: StatusCode | int, details: str = "") -> None:
        code = wire.coerce_code(code)
        if code is StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        raise AbortError(details)

    def abort_with_status(self, status: Any) -> None:
        self._trailing = wire.check_metadata(getattr(status, "trailing_metadata", ()) or ())
        self.abort(status.code, status.details)


class _Deadlines:
    """One thread that expires server calls at their deadlines (a heap, not a timer per call).

    The thread runs only while calls with a deadline are in flight: a finished call is
    dropped from the count at once (its heap entry is skipped when it comes up), and once
    nothing is pending for IDLE seconds the thread exits; the next call with a deadline
    starts a new one. It is a daemon thread all the same, so it can never hold up
    interpreter exit, and `close()` (Server.stop, App.close) ends it at once.
    """

    IDLE = 1.0

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _ServerCall]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._pending = 0
        self._closed = False

    def add(self, call: _ServerCall) -> None:
        if call.deadline.at is None:
            return
        with self._cond:
            if self._closed:
                return
            heapq.heappush(self._heap, (call.deadline.at, next(self._seq), call))
            call.timed = True
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mrpcd-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def discard(self, call: _ServerCall) -> None:
        """The call ended (answered, cancelled or expired): it no longer keeps the thread."""
        with self._cond:
            if not call.timed:
                return
            call.timed = False
            self._pending -= 1
            if not self._pending:
                self._heap.clear()
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._pending = 0
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._heap and not self._closed:
                    self._cond.wait(self.IDLE)
                if not self._heap or self._closed:
                    self._thread = None  # idle (or closed): add() starts a new thread
                    return
                at, _, call = self._heap[0]
                now = time.monotonic()
                if at > now:
                    self._cond.wait(at - now)
                    continue
                heapq.heappop(self._heap)
            if call.is_active():
                call.cancel(expired=True)


class Server:
    """Serves generic handlers through the local daemon: `add_insecure_port`, `start`, `stop`."""

    def __init__(
        self,
        thread_pool: ThreadPoolExecutor | None = None,
        handlers: Any = None,
        *,
        app: App | None = None,
        max_workers: int = 16,
        interceptors: Sequence[ServerInterceptor] | None = None,
        options: Any = None,
    ) -> None:
        self.app = app or default_app()
        self._pool = thread_pool or ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mrpcd-server")
        self._max_send, self._max_receive = wire.message_limits(options, self.app.max_record)
        self._interceptors = tuple(interceptors or ())
        for i in self._interceptors:
            if not isinstance(i, ServerInterceptor):
                raise TypeError(f"{type(i).__name__} is not a mrpcd.ServerInterceptor")
        self._methods: dict[int, tuple[str, RpcMethodHandler]] = {}
        self._generic: list[GenericRpcHandler] = []
        self._addresses: list[str] = []
        self._calls: dict[tuple[int, int], _ServerCall] = {}
        self._lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._deadlines = _Deadlines()
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
        return sorted({g.service_name for g in self._generic})

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
        if rec.kind == R.CANCEL or rec.kind == R.WINDOW:
            call = self._calls.get(key)
            if call is None:
                return False
            if rec.kind == R.CANCEL:
                call.cancel()
            else:
                call.grant(rec.method_id)
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
        self._deadlines.add(call)
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
        self._deadlines.discard(call)

    def _serialize(self, handler: RpcMethodHandler, response: Any) -> bytes:
        try:
            payload = handler.response_serializer(response)
        except Exception as exc:
            raise _SerializeError(str(exc)) from None
        if len(payload) > self._max_send:
            raise wire.too_large("Sent", len(payload), self._max_send)
        return payload

    def _run(self, call: _ServerCall) -> None:
        ctx = ServicerContext(call)
        try:
            if call.deadline.expired():
                call.cancel(expired=True)
                return
            handler = call.handler
            if self._interceptors:
                handler = resolve_handler(self._interceptors, HandlerCallDetails(call.path, call.metadata), handler)
                if handler is None:
                    call.send(R.F_END, None, ctx, StatusCode.UNIMPLEMENTED, "Method not found!")
                    return
                call.handler = handler
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
            pass
        except _TooLarge:
            err = call.too_large
            call.send(R.F_END, None, ctx, err.code(), err.details())
        except _BadRequest as exc:
            call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception deserializing request! {exc}")
        except _SerializeError as exc:
            call.send(R.F_END, None, ctx, StatusCode.INTERNAL, f"Exception serializing response! {exc}")
        except AbortError:
            call.send(R.F_END, None, ctx, ctx._code or StatusCode.UNKNOWN, ctx._details)
        except RpcError as exc:  # e.g. the handler's own outgoing call failed, or a size limit
            try:
                if exc.code() is StatusCode.RESOURCE_EXHAUSTED and ctx._code in (None, StatusCode.OK):
                    call.send(R.F_END, None, ctx, exc.code(), exc.details())
                else:
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
                call.finished = True
                self._forget(call)

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls; running ones get `grace` seconds, then are cancelled."""
        self._stopped.set()
        with self._lock:
            if grace:
                self._idle.wait_for(lambda: not self._calls, grace)
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        self._deadlines.close()
        done = threading.Event()
        done.set()
        return done

    def app_closed(self) -> None:
        """The app left the daemon (App.close): no call can be answered any more; cancel
        them for their handlers and end the deadline thread."""
        self._stopped.set()
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.cancel()
        self._deadlines.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def server(thread_pool: ThreadPoolExecutor | None = None, handlers: Any = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None, *, app: App | None = None, **_ignored: Any) -> Server:
    """Like grpc.server(futures.ThreadPoolExecutor(...), interceptors=..., options=...)."""
    return Server(thread_pool, handlers, app=app, interceptors=interceptors, options=options)
