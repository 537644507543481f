"""Sync client side, shaped like grpcio: `insecure_channel(target)` and multi-callables.

A channel is a handle on a daemon-to-daemon connection. It connects lazily, on the first
call, so every stub made before then has its schema in the handshake; a lost connection is
re-established by the next call. Calls keep grpc's surface: `stub.M(req, timeout=,
metadata=)`, `.with_call(...)`, `.future(...)`, response iterators for server streaming.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterable, Iterator

from .app import App, default_app
from .marshal import records as R
from .marshal.schema import method_id as _method_id
from .status import RpcError, StatusCode
from . import wire


class _ClientCall:
    """One client call's receive side; filled by the app's rx driver thread."""

    def __init__(self, app: App, handle: int, call_id: int, deserialize) -> None:
        self.app = app
        self.handle = handle
        self.call_id = call_id
        self._deserialize = deserialize
        self._cond = threading.Condition()
        self._messages: deque[bytes] = deque()
        self._done = False
        self._code = StatusCode.OK
        self._details = ""
        self._initial: list = []
        self._trailing: list = []
        self._callbacks: list = []
        app.calls[(handle, call_id)] = self

    # driver side
    def deliver(self, rec: R.Record) -> None:
        with self._cond:
            if self._done:
                return
            if rec.flags & R.F_START or rec.flags & R.F_END:
                initial, trailing, details = wire.split_response_meta(rec)
                if rec.flags & R.F_START:
                    self._initial = initial
            if not rec.flags & R.F_NO_MSG:
                self._messages.append(rec.payload)
            if rec.flags & R.F_END:
                self._trailing, self._details = trailing, details
                self._code = StatusCode.from_int(rec.status)
                self._finish()
            self._cond.notify_all()

    def lost(self, code: StatusCode, details: str) -> None:
        with self._cond:
            if not self._done:
                self._code, self._details = code, details
                self._finish()
                self._cond.notify_all()

    def _finish(self) -> None:
        self._done = True
        self.app.calls.pop((self.handle, self.call_id), None)
        for cb in self._callbacks:
            try:
                cb()
            except Exception:
                pass

    # caller side
    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        with self._cond:
            if self._done:
                return False
            self._code, self._details = code, details
            self._finish()
            self._cond.notify_all()
        try:
            self.app.send(wire.cancel_record(self.handle, self.call_id), timeout=1.0)
        except RpcError:
            pass
        return True

    def next_message(self, deadline: wire.Deadline | None) -> Any:
        """The next response message, or StopIteration at a clean end; RpcError otherwise."""
        with self._cond:
            while not self._messages and not self._done:
                remaining = deadline.remaining() if deadline else None
                if remaining == 0:
                    break
                self._cond.wait(remaining)
            if self._messages:
                payload = self._messages.popleft()
            elif self._done:
                if self._code is StatusCode.OK:
                    raise StopIteration
                raise self.error()
            else:
                payload = None
        if payload is None:
            self.cancel(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            raise self.error()
        try:
            return self._deserialize(payload)
        except ValueError as exc:
            self.cancel(StatusCode.INTERNAL, f"failed to decode the response: {exc}")
            raise self.error() from None

    def wait_done(self, deadline: wire.Deadline | None) -> None:
        with self._cond:
            while not self._done:
                remaining = deadline.remaining() if deadline else None
                if remaining == 0:
                    break
                self._cond.wait(remaining)
            done = self._done
        if not done:
            self.cancel(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def error(self) -> RpcError:
        return RpcError(self._code, self._details, self._trailing, self._initial)

    # grpc.Call surface
    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> tuple:
        return tuple(self._initial)

    def trailing_metadata(self) -> tuple:
        return tuple(self._trailing)

    def is_active(self) -> bool:
        return not self._done

    def add_done_callback(self, cb) -> None:
        with self._cond:
            if not self._done:
                self._callbacks.append(cb)
                return
        cb()


class _MultiCallable:
    def __init__(self, channel: "Channel", method: str, request_type: type, response_type: type) -> None:
        self._channel = channel
        self._method = method
        self._method_id = _method_id(method)
        self._encode = request_type.SerializeToString
        self._decode = response_type.FromString
        channel.app.ensure_schema(request_type.__mrpc_schema__)
        channel.app.ensure_schema(response_type.__mrpc_schema__)

    def _start(self, first: Any, end: bool, timeout: float | None, metadata) -> tuple[_ClientCall, wire.Deadline | None]:
        app = self._channel.app
        meta = wire.check_metadata(metadata)
        handle = self._channel._ensure_handle()
        call = _ClientCall(app, handle, app.next_call_id(), self._decode)
        payload = self._encode(first) if first is not None else None
        flags = R.F_START | (R.F_END if end else 0)
        dl = wire.deadline_us(timeout)
        try:
            app.send(wire.request_record(handle, call.call_id, self._method_id, flags, dl, meta, payload), timeout)
        except RpcError:
            call.lost(StatusCode.UNAVAILABLE, "could not hand the request to mrpcd")
            raise
        return call, wire.Deadline(dl) if timeout is not None else None


class UnaryUnaryMultiCallable(_MultiCallable):
    def __call__(self, request: Any, timeout: float | None = None, metadata=None, **_ignored: Any) -> Any:
        return self.with_call(request, timeout, metadata)[0]

    def with_call(self, request: Any, timeout: float | None = None, metadata=None, **_ignored: Any) -> tuple[Any, _ClientCall]:
        call, deadline = self._start(request, True, timeout, metadata)
        try:
            response = call.next_message(deadline)
        except StopIteration:
            raise RpcError(StatusCode.INTERNAL, "the server ended the call without a response") from None
        call.wait_done(deadline)
        if call.code() is not StatusCode.OK:
            raise call.error()
        return response, call

    def future(self, request: Any, timeout: float | None = None, metadata=None, **_ignored: Any):
        from concurrent.futures import ThreadPoolExecutor

        pool = _future_pool()
        return pool.submit(self, request, timeout, metadata)


class UnaryStreamMultiCallable(_MultiCallable):
    def __call__(self, request: Any, timeout: float | None = None, metadata=None, **_ignored: Any) -> "_ResponseIterator":
        call, deadline = self._start(request, True, timeout, metadata)
        return _ResponseIterator(call, deadline)


class _ResponseIterator:
    """Iterates the response messages; is also the call (code(), details(), cancel())."""

    def __init__(self, call: _ClientCall, deadline: wire.Deadline | None) -> None:
        self._call = call
        self._deadline = deadline

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return self._call.next_message(self._deadline)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _StreamingRequestMixin:
    def _pump_requests(self, call: _ClientCall, requests: Iterable[Any], timeout: float | None) -> None:
        """Send each request as a message record, then half-close (in a helper thread, as grpc does)."""
        app = self._channel.app

        def run() -> None:
            try:
                for req in requests:
                    if not call.is_active():
                        return
                    app.send(wire.request_record(call.handle, call.call_id, 0, 0, 0, (), self._encode(req)), timeout)
                if call.is_active():
                    app.send(wire.request_record(call.handle, call.call_id, 0, R.F_END, 0, (), None), timeout)
            except Exception as exc:  # a failing request iterator cancels the call, as in grpc
                call.cancel(StatusCode.CANCELLED, f"request iterator raised: {exc!r}")

        threading.Thread(target=run, name="mrpcd-request-pump", daemon=True).start()


class StreamUnaryMultiCallable(_MultiCallable, _StreamingRequestMixin):
    def __call__(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, **_ignored: Any) -> Any:
        return self.with_call(request_iterator, timeout, metadata)[0]

    def with_call(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, **_ignored: Any):
        call, deadline = self._start(None, False, timeout, metadata)
        self._pump_requests(call, request_iterator, timeout)
        try:
            response = call.next_message(deadline)
        except StopIteration:
            raise RpcError(StatusCode.INTERNAL, "the server ended the call without a response") from None
        call.wait_done(deadline)
        if call.code() is not StatusCode.OK:
            raise call.error()
        return response, call


class StreamStreamMultiCallable(_MultiCallable, _StreamingRequestMixin):
    def __call__(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, **_ignored: Any):
        call, deadline = self._start(None, False, timeout, metadata)
        self._pump_requests(call, request_iterator, timeout)
        return _ResponseIterator(call, deadline)


_pool = None
_pool_lock = threading.Lock()


def _future_pool():
    global _pool
    from concurrent.futures import ThreadPoolExecutor

    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="mrpcd-future")
        return _pool


class Channel:
    """A channel to `target` ("host:port" of a server app's address) through the local daemon."""

    def __init__(self, target: str, app: App | None = None) -> None:
        self.target = target
        self.app = app or default_app()
        self._handle: int | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _ensure_handle(self) -> int:
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._closed:
                raise RpcError(StatusCode.CANCELLED, "the channel is closed")
            if self._handle is None:
                try:
                    reply = self.app.call("connect", target=self.target)
                except RpcError as exc:
                    code = exc.code() if exc.code() is not StatusCode.UNKNOWN else StatusCode.UNAVAILABLE
                    raise RpcError(code, f"failed to connect to {self.target}: {exc.details()}") from None
                self._handle = reply["handle"]
                self.app.handle_listeners.setdefault(self._handle, []).append(self._on_lost)
            return self._handle

    def _on_lost(self, details: str) -> None:
        with self._lock:
            self._handle = None

    def unary_unary(self, method: str, request_type: type, response_type: type, **_ignored: Any) -> UnaryUnaryMultiCallable:
        return UnaryUnaryMultiCallable(self, method, request_type, response_type)

    def unary_stream(self, method: str, request_type: type, response_type: type, **_ignored: Any) -> UnaryStreamMultiCallable:
        return UnaryStreamMultiCallable(self, method, request_type, response_type)

    def stream_unary(self, method: str, request_type: type, response_type: type, **_ignored: Any) -> StreamUnaryMultiCallable:
        return StreamUnaryMultiCallable(self, method, request_type, response_type)

    def stream_stream(self, method: str, request_type: type, response_type: type, **_ignored: Any) -> StreamStreamMultiCallable:
        return StreamStreamMultiCallable(self, method, request_type, response_type)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
        if handle is not None and not self.app.closed:
            try:
                self.app.call("close", handle=handle)
            except RpcError:
                pass

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def insecure_channel(target: str, options: Any = None, app: App | None = None) -> Channel:
    """Like grpc.insecure_channel; the daemon, not the app, decides transport and security."""
    return Channel(target, app)
