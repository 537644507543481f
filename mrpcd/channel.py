"""Sync client side, shaped like grpcio: `insecure_channel(target)` and multi-callables.

A channel is a handle on a daemon-to-daemon connection. It connects lazily, on the first
call, so every stub made before then has its schema in the handshake; a lost connection is
re-established by the next call. Calls keep grpc's surface: `stub.M(req, timeout=,
metadata=)`, `.with_call(...)` returning (response, call), `.future(...)` returning a
call that is also a Future, and response iterators (also calls) for server streaming.
Response streams are flow-controlled (mrpcd.flow): the client grants credit as the
application consumes messages, so a slow reader pauses the server instead of buffering
without bound; request streams wait for the server's credit likewise.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, cast

from . import wire
from ._calls import ChannelCore, ClientCallCore, MultiCallableCore, RetryState, close_dropped_handle, connect_error, lost_listener
from .app import App, DaemonUnavailable, default_app, require_app
from .marshal import records as R
from .status import Call, ChannelConnectivity, Future, FutureCancelledError, FutureTimeoutError, RpcError, StatusCode, metadata_tuple

if TYPE_CHECKING:
    from .marshal.message import Message
    from .marshal.schema import Schema

_DEADLINE = "Deadline Exceeded"
_log = logging.getLogger(__name__)
# grpc's words (grpc/_channel.py, grpc/_utilities.py), through the logging module as there
_SUBSCRIBER_ERROR = "Exception calling channel subscription callback!"
_DONE_CALLBACK_ERROR = 'Exception calling connectivity future "done" callback!'


class _Subscription:
    """One subscribe(): a notice queued for it is dropped if it is gone by then
    (unsubscribe, close), as grpc reads its subscriber list when it delivers."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[ChannelConnectivity], None]) -> None:
        self.callback = callback


class _ClientCall(ClientCallCore):
    """One client call's state (mrpcd._calls); filled by the app's rx driver thread, read by
    the caller. Every change to the state happens with `_cond` held."""

    def __init__(self, app: App, handle: int, call_id: int, deserialize: Callable[[bytes], Any], max_receive: int, deadline: wire.Deadline | None) -> None:
        self._cond = threading.Condition()
        self._waiting = 0  # threads inside _wait (the Condition's waiters)
        self._end_lock: Any = None  # wait_end's bare lock, handed to the app when the call ends
        self._end_waiting = False  # a caller is blocked on it (changed under app._baton_lock)
        self.timed = False  # in the app's call_deadlines (a deadline, and maybe nobody waiting)
        self.watched = False  # handed to call_deadlines.add (timed implies it): _finish discards it
        self.opened: threading.Event | None = None  # a wait_for_ready call opened later (_start_later)
        self.cancel_unsent = False  # (_start_later) cancelled before its START went out
        super().__init__(app, handle, call_id, deserialize, max_receive, deadline)

    def _finish(self) -> None:
        super()._finish()
        if self.opened is not None and self.handle == -1:  # it may be waiting for its target (_start_later)
            self.app.wake_connect_waits()
        # `watched`, not `timed`: ending while add() runs, the call may not be timed yet
        # here and yet be counted right after; discard (under the heap's lock) settles it
        if self.watched:
            self.app.call_deadlines.discard(self)

    def expire_deadline(self) -> None:
        """(the app's deadline thread) The deadline passed: end the call, as a waiter would."""
        self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)

    def _wake(self) -> None:
        if self._waiting:
            self._cond.notify_all()
        lock = self._end_lock
        if lock is not None and self.done:
            self._end_lock = None
            self.app.wake_caller(self, lock)

    # -- driver side (rx thread) ----------------------------------------------------------
    def deliver(self, rec: R.Record) -> None:
        with self._cond:
            cancel = self.take(rec)
            if cancel is not None:  # (the rx thread never waits for ring room)
                self.app.send_control(cancel)

    def grant(self, n: int) -> None:
        with self._cond:
            self.grant_credit(n)

    def lost(self, code: StatusCode, details: str) -> None:
        with self._cond:
            self.end(code, details)

    # -- caller side --------------------------------------------------------------------
    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        with self._cond:
            if not self.end(code, details):
                return False
            self.cancelled_locally = code is StatusCode.CANCELLED
            if self.opened is not None and not self.opened.is_set():  # (_start_later) no START sent yet:
                self.cancel_unsent = True  # the opener sends the CANCEL after it, if it sends one
                return True
        # queued if the ring is full, never dropped: the server would go on for nobody
        # (a closed app: the daemon cancels the server side by the lost connection)
        self.app.send_control(self.cancel_record())
        return True

    def _wait(self, ready: Callable[[], bool], deadline: wire.Deadline | None, timeout: float | None = None) -> bool:
        """Wait (lock held) until ready() or the call ends; False on a caller timeout.

        The call's own deadline ends it with DEADLINE_EXCEEDED (and cancels the server).
        """
        until = None if timeout is None else time.monotonic() + timeout
        if not self.done and not ready():
            self.app.about_to_block()  # a handler on the rx thread calling out: hand the role over
        while not ready() and not self.done:
            left = deadline.remaining() if deadline else None
            if left == 0:
                self._cond.release()
                try:
                    self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)
                finally:
                    self._cond.acquire()
                continue
            if until is not None:
                mine = until - time.monotonic()
                if mine <= 0:
                    return False
                left = mine if left is None else min(left, mine)
            self._waiting += 1
            try:
                self._cond.wait(left)
            finally:
                self._waiting -= 1
        return True

    def wait_end(self) -> None:
        """Block until the call ends, for the blocking unary call: its only wait, so a bare
        lock, not the Condition (whose wait and notify cost a Python-level waiter list and
        a lock allocation per call). The app releases it (App.wake_caller: from the rx
        thread, in a chain with the other callers its batch ended). The call's deadline
        ends it with DEADLINE_EXCEEDED (and cancels the server), as in _wait."""
        with self._cond:
            if self.done:
                return
            lock = self._end_lock = threading.Lock()
            lock.acquire()
            self._end_waiting = True
        app = self.app
        woken = False
        try:
            app.about_to_block()  # a handler on the rx thread calling out: hand the role over
            deadline = self.deadline
            if deadline is None or (left := deadline.remaining()) is None:
                woken = lock.acquire()
            else:
                while left > 0 and not (woken := lock.acquire(True, left)):
                    left = deadline.remaining() or 0.0  # a timed acquire may return a hair early (a float: it has an end)
        finally:
            with app._baton_lock:
                self._end_waiting = False
            app.pass_baton()  # wake the next caller first: this one has the GIL now
        if not woken:
            self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)  # no-op if it ended meanwhile

    def next_message(self) -> Any:
        """The next response message, or StopIteration at a clean end; RpcError otherwise."""
        with self._cond:
            self._wait(lambda: bool(self.messages), self.deadline)
            got = self.pop_message()
            if got is None:
                if self.code is StatusCode.OK:
                    raise StopIteration
                raise self.error()
        payload, window = got
        if window is not None:  # a lost grant would stall the response stream for good
            self.app.send_control(window)
        try:
            return self.decode(payload)
        except ValueError as exc:
            code, details = self.deserialize_error(exc)
            if not self.cancel(code, details):
                with self._cond:  # ended already (unary: message and OK in one record): not OK any more
                    self.code, self.details = code, details
            raise self.error() from None

    def wait_done(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._wait(lambda: False, self.deadline, timeout)

    def wait_credit(self) -> bool:
        """Block the request pump until the server grants credit; False if the call ended."""
        with self._cond:
            self._wait(self.credit_available, self.deadline)
            return not self.done

    def request_message(self, payload: bytes) -> wire.RecordParts:
        with self._cond:
            return super().request_message(payload)

    def error(self) -> RpcError:
        return self.make_error()

    def add_callback(self, cb: Callable[[], None]) -> bool:
        with self._cond:
            if not self.done:
                self.callbacks.append(cb)
                return True
        return False


class _StreamAttempt(_ClientCall):
    """An attempt of a retried response stream: it tells its call (`retried`) when it
    commits (its first message, or the server's initial metadata before its end)."""

    retried: "_RetriedCall | None" = None

    def _wake(self) -> None:
        super()._wake()
        retried = self.retried
        if retried is not None and (self.messages or (self.got_initial and not self.done)):
            self.retried = None
            retried._commit(self)


class _RetriedCall(_ClientCall):
    """A unary-request call with a retryPolicy (gRFC A6), as its future / with_call /
    response iterator sees it: one call over its attempts. Each attempt is a plain call (watched by
    the app's deadline thread, with the time left of this one's deadline); when one ends,
    RetryState decides, and the next starts after the backoff on a thread of its own (never on
    the thread that ended the attempt: the rx thread must not block on a connect). The
    last attempt's outcome (response or status, metadata and all) becomes this call's.
    It is in no app's table: a lost connection ends its attempt, which may be retried.
    Cancelling it (or its deadline) cancels the attempt in flight and retries no more.
    A response stream (`stream`) commits to the attempt that receives its first message
    (or initial metadata): from then on it reads that attempt's messages, as A6 retries
    streams only until then."""

    def __init__(self, multi: "_MultiCallable", retry: RetryState, request: Any, meta: list, deadline: wire.Deadline | None,
                 wait_for_ready: bool | None, stream: bool = False) -> None:
        channel = multi._channel
        app = channel.app
        super().__init__(app, -1, app.next_call_id(), multi._decode, channel._max_receive, deadline)
        self.unregister()  # (records go to its attempts)
        self._multi = multi
        self._retry = retry
        self._request = request
        self._meta = meta
        self._wait_for_ready = wait_for_ready
        self._attempt: _ClientCall | None = None
        self._stream = stream
        self._committed: _ClientCall | None = None  # (a stream's attempt that committed)

    def launch(self) -> None:
        """Start the next attempt (the first: on the caller's thread, so a request that
        does not encode raises there, as without retries)."""
        deadline = self.deadline
        attempt = self._multi._start(self._request, True, None if deadline is None else deadline.remaining(),
                                     self._retry.metadata(self._meta), wait_for_ready=self._wait_for_ready,
                                     cls=_StreamAttempt if self._stream else _ClientCall)
        if type(attempt) is _StreamAttempt:
            with attempt._cond:  # (it may have had its first records already)
                attempt.retried = self
                attempt._wake()
        with self._cond:
            done = self.done
            if not done:
                self._attempt = attempt
        if done:  # cancelled while it started
            attempt.cancel(self.code, self.details)
        elif not attempt.add_callback(lambda: self._attempt_ended(attempt)):
            self._attempt_ended(attempt)

    def _attempt_ended(self, attempt: _ClientCall) -> None:
        """(whichever thread ended the attempt) Retry after the backoff, or adopt its outcome."""
        with self._cond:
            if self.done:
                return
            committed = attempt is self._committed or bool(attempt.initial) or bool(attempt.messages)
            delay = self._retry.next_delay(attempt.code, attempt.trailing, committed)
            if delay is not None:
                left = self.deadline.remaining() if self.deadline is not None else None
                # the deadline first: it ends the call then (DEADLINE_EXCEEDED, as grpc's)
                threading.Thread(target=self._backoff, args=(delay if left is None else min(delay, left),),
                                 name="mrpcd-retry-backoff", daemon=True).start()
                return
            if attempt is not self._committed:  # (a committed stream's messages are read from it)
                self.messages.extend(attempt.messages)
            self.initial, self.trailing, self.got_initial = attempt.initial, attempt.trailing, attempt.got_initial
            self.code, self.details = attempt.code, attempt.details
            self.cancelled_locally = attempt.cancelled_locally
            self._finish()
            self._wake()

    def _commit(self, attempt: _ClientCall) -> None:
        """(attempt's lock held) A response stream's attempt got its first message or
        initial metadata: no more retries; the stream reads that attempt from now on."""
        with self._cond:
            if self.done:
                return
            self._committed = attempt
            self.initial, self.got_initial = attempt.initial, attempt.got_initial
            self._wake()

    def next_message(self) -> Any:
        if self._stream:
            with self._cond:
                self._wait(lambda: self._committed is not None, self.deadline)
                committed = self._committed
            if committed is not None:
                return committed.next_message()
        return super().next_message()

    def _backoff(self, seconds: float) -> None:
        """(a thread of its own) Wait `seconds`, or less: the call's cancel, or closing its
        channel or app, ends the wait (they wake the app's connect_waits); then the next
        attempt, unless the call ended or its deadline passed."""
        channel = self._multi._channel
        channel._retry_pause(seconds, lambda: self.done)
        with self._cond:
            if self.done:
                return
            ended = channel._retry_ended(self.deadline)
            if ended is not None:
                self.end(*ended)
                return
        try:
            self.launch()
        except Exception as exc:  # (nobody would see it on this thread: the call ends with it)
            self.lost(StatusCode.UNKNOWN, f"the call could not be retried: {exc!r}")

    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        with self._cond:
            if not self.end(code, details):
                return False
            self.cancelled_locally = code is StatusCode.CANCELLED
            attempt = self._attempt
        self._multi._channel.app.wake_connect_waits()  # its backoff ends now
        if attempt is not None:
            attempt.cancel(code, details)
        return True


class _Rendezvous(RpcError):
    """What a call returns: a grpc.Call, a grpc.Future (result/cancel/...) and, for
    response streams, an iterator. Like grpc's, it is also the RpcError it raises."""

    def __init__(self, call: _ClientCall, streaming: bool) -> None:
        Exception.__init__(self, "mrpcd call")
        self._call = call
        self._streaming = streaming
        self._response: Any = None
        self._have_response = False
        self._lock = threading.Lock()

    def __del__(self) -> None:
        """Dropped while running (a response iterator left midway, a future nobody keeps):
        cancel the call, as grpc does, or the server would go on for nobody (a stream
        without a deadline: for ever) and the call would stay in the app's table."""
        call = getattr(self, "_call", None)
        if call is not None and not call.done and not sys.is_finalizing():  # (no thread starts then)
            # On a thread of its own: a collection can run this anywhere, even in a thread
            # that holds the app's tx lock, which the cancel's send takes (rare: only calls
            # dropped while running pay for the thread).
            try:
                threading.Thread(target=call.cancel, args=(StatusCode.CANCELLED, "Cancelled upon garbage collection!"),
                                 name="mrpcd-gc-cancel", daemon=True).start()
            except Exception:
                pass  # interpreter shutdown: nothing is left to tell

    # grpc.Call
    def code(self) -> StatusCode:
        self._call.wait_done()
        return self._call.code

    def details(self) -> str:
        self._call.wait_done()
        return self._call.details

    def initial_metadata(self) -> tuple:
        c = self._call
        with c._cond:
            c._wait(lambda: c.got_initial, c.deadline)
        return metadata_tuple(c.initial)

    def trailing_metadata(self) -> tuple:
        self._call.wait_done()
        return metadata_tuple(self._call.trailing)

    def is_active(self) -> bool:
        return not self._call.done

    def time_remaining(self) -> float | None:
        return self._call.deadline.remaining() if self._call.deadline else None

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)

    def cancel(self) -> bool:
        return self._call.cancel()

    # grpc.Future
    def cancelled(self) -> bool:
        return self._call.cancelled_locally

    def running(self) -> bool:
        return not self._call.done

    def done(self) -> bool:
        return self._call.done

    def _collect(self) -> None:
        """Unary response: take the single message (once); the call is over after it."""
        with self._lock:
            if self._have_response:
                return
            try:
                self._response = self._call.next_message()
                self._have_response = True
            except StopIteration:
                if self._call.code is StatusCode.OK:
                    self._call.lost(StatusCode.INTERNAL, "the server ended the call without a response")
            except RpcError:
                pass
            self._call.wait_done()

    def result(self, timeout: float | None = None) -> Any:
        self._wait_future(timeout)
        if self._call.cancelled_locally:
            raise FutureCancelledError()
        self._collect()
        if self._call.code is not StatusCode.OK:
            raise self._as_error()
        return self._response

    def exception(self, timeout: float | None = None) -> RpcError | None:
        self._wait_future(timeout)
        if self._call.cancelled_locally:
            raise FutureCancelledError()
        self._collect()
        return None if self._call.code is StatusCode.OK else self._as_error()

    def traceback(self, timeout: float | None = None):
        return None

    def _wait_future(self, timeout: float | None) -> None:
        if not self._call.wait_done(timeout):
            raise FutureTimeoutError()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if not self._call.add_callback(lambda: fn(self)):
            fn(self)

    def _as_error(self) -> RpcError:
        return self  # the rendezvous is the error, with code()/details()/metadata

    def __str__(self) -> str:
        if self._call.done:
            return f"<_Rendezvous of RPC that terminated with: status = {self._call.code}, details = \"{self._call.details}\">"
        return "<_Rendezvous of in-flight RPC>"

    __repr__ = __str__

    # iterator (response streams)
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if not self._streaming:
            raise TypeError("a unary call is not iterable; use result()")
        try:
            return self._call.next_message()
        except RpcError:
            raise self from None

    def next(self) -> Any:
        return self.__next__()


Call.register(_Rendezvous)  # isinstance(call, grpc.Call) / grpc.Future holds, as in grpc
Future.register(_Rendezvous)


class _MultiCallable(MultiCallableCore):
    def __init__(self, channel: "Channel", method: str, request_type: type[Message], response_type: type[Message]) -> None:
        super().__init__(channel, method, request_type, response_type)
        channel._add_schemas(self._schemas)

    def _start(self, first: Any, end: bool, timeout: float | None, metadata, watch: bool = True, wait_for_ready: bool | None = None,
               cls: "type[_ClientCall]" = _ClientCall) -> _ClientCall:
        """Open a call. `watch`: the app's deadline thread ends it at its deadline (grpc
        does so whether or not anyone waits on the call); the blocking unary call, whose
        caller waits with the deadline itself, goes without. `wait_for_ready`: while the
        target cannot be reached, wait for it (until the deadline) instead of failing
        with UNAVAILABLE at once, as grpc does."""
        channel = self._channel
        timeout, wait_for_ready = self._timeout(timeout), self._wait_for_ready(wait_for_ready)
        meta, payload, dl, deadline = self._prepare(first, timeout, metadata, end)
        try:
            if wait_for_ready and watch:  # .future() / a stream: grpc returns it at once
                try:
                    handle = channel._ensure_handle()
                except RpcError as exc:
                    if exc.code() is not StatusCode.UNAVAILABLE or channel._app_ended():
                        raise
                    return self._start_later(end, dl, meta, payload, timeout, deadline, cls)
            else:
                handle = channel._ensure_handle() if not wait_for_ready else channel._wait_for_handle(deadline)
        except RpcError as exc:
            # no connection (UNAVAILABLE, a closed channel): a call that ended with that
            # status, so the error comes where grpc raises it - from result() / next() /
            # the blocking call - not from .future() or the stream's creation
            app = channel.app
            call = cls(app, -1, app.next_call_id(), self._decode, channel._max_receive, deadline)
            call.lost(exc.code(), exc.details())
            return call
        app = channel.app  # (after the connection: a daemon restart makes it the app's successor)
        call = cls(app, handle, app.next_call_id(), self._decode, channel._max_receive, deadline)
        try:
            app.send(self._first_record(call, end, dl, meta, payload), timeout)
        except RpcError as exc:
            call.lost(exc.code(), exc.details())
        if deadline is not None and watch:
            call.watched = True
            app.call_deadlines.add(call)  # (not if it ended already)
        return call

    def _start_later(self, end: bool, dl: Any, meta: Any, payload: Any, timeout: float | None, deadline: wire.Deadline | None,
                     cls: "type[_ClientCall]" = _ClientCall) -> _ClientCall:
        """A wait_for_ready call while its target cannot be reached, returned at once (as
        grpc returns futures and streams): a helper thread waits for the connection and
        then opens it; the call's cancel() or deadline, or a closed app/channel, ends the
        wait. Until then it is under handle -1 (no record is sent for it)."""
        app = self._channel.app
        call = cls(app, -1, app.next_call_id(), self._decode, self._channel._max_receive, deadline)
        call.opened = threading.Event()  # the request pump waits for it

        def run() -> None:
            opened = cast(threading.Event, call.opened)
            try:
                handle = self._channel._wait_for_handle(deadline, lambda: call.done)
                with call._cond:
                    if call.done:
                        return
                    call.unregister()
                    app = self._channel.app
                    if app is not call.app:  # its daemon restarted meanwhile: the call carries on with the successor
                        call.app = app
                        if call.watched:
                            app.call_deadlines.add(call)
                    call.handle = handle
                    app.calls[(handle, call.call_id)] = call
                try:
                    app.send(self._first_record(call, end, dl, meta, payload), None if deadline is None else deadline.remaining())
                except RpcError as exc:
                    call.lost(exc.code(), exc.details())
                    return
                with call._cond:  # a cancel while the START was sent left its CANCEL to us
                    opened.set()
                    cancel = call.cancel_unsent
                if cancel:
                    app.send_control(call.cancel_record())
            except RpcError as exc:
                call.lost(exc.code(), exc.details())
            except Exception as exc:  # (nobody would see it on this thread: the call ends with it)
                call.lost(StatusCode.UNKNOWN, f"the call could not be started: {exc!r}")
            finally:
                opened.set()

        if deadline is not None:
            call.watched = True
            app.call_deadlines.add(call)
        threading.Thread(target=run, name="mrpcd-wait-for-ready", daemon=True).start()
        return call

    def _retried(self, request: Any, timeout: float | None, metadata: Any, wait_for_ready: bool | None, stream: bool = False) -> _Rendezvous:
        """A call of a method with a retryPolicy: its attempts share one deadline (the
        call's timeout, or its service config's), as in grpc."""
        policy = self._retry_policy
        assert policy is not None
        call = _RetriedCall(self, RetryState(policy, self._channel._retry.throttle), request, wire.check_metadata(metadata),
                            self._retry_deadline(timeout), wait_for_ready, stream)
        call.launch()
        return _Rendezvous(call, stream)

    def _retry_deadline(self, timeout: float | None) -> wire.Deadline | None:
        """The one deadline a retried call's attempts share: its timeout, or its service
        config's (the sooner), as in grpc."""
        timeout = self._timeout(timeout)
        return wire.Deadline(wire.deadline_us(timeout)) if timeout is not None else None

    def _pump_requests(self, call: _ClientCall, requests: Iterable[Any]) -> None:
        """Send each request as a message record, then half-close (in a helper thread, as grpc
        does); waits for the server's credit so a slow server pauses the producer."""
        def run() -> None:
            if call.opened is not None:
                call.opened.wait()  # (a wait_for_ready call still waiting for its target)
            app = call.app  # (once opened: the channel's app then)
            try:
                for req in requests:
                    if not call.wait_credit():
                        return
                    app.send(call.request_message(self._payload(req)), call.deadline.remaining() if call.deadline else None)
                if not call.done:
                    app.send(call.end_of_requests(), 5.0)
            except RpcError as exc:
                if exc.code() is StatusCode.RESOURCE_EXHAUSTED:
                    call.cancel(exc.code(), exc.details())
                else:
                    call.cancel(StatusCode.CANCELLED, f"request could not be sent: {exc.details()}")
            except Exception as exc:  # a failing request iterator cancels the call, as in grpc
                _log.exception("Exception iterating requests!")  # (and is logged, as grpc's _consume_request_iterator)
                call.cancel(StatusCode.UNKNOWN, f"Exception iterating requests! {exc!r}")

        threading.Thread(target=run, name="mrpcd-request-pump", daemon=True).start()


class UnaryUnaryMultiCallable(_MultiCallable):
    _RETRIED = True

    def __call__(self, request: Any, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> Any:
        """The blocking call: what with_call does, without the rendezvous and its future
        state (one wait for the end of the call, then the response or the error)."""
        if self._retry_policy is not None:  # (one test: methods without retries pay nothing more)
            call = self._blocking_retried(request, timeout, metadata, wait_for_ready)
        else:
            call = self._start(request, True, timeout, metadata, watch=False, wait_for_ready=wait_for_ready)
            call.wait_end()
        with call._cond:
            got = call.pop_message()
        if call.code is StatusCode.OK:
            if got is None:
                call.code, call.details = StatusCode.INTERNAL, "the server ended the call without a response"
            else:
                try:
                    return call.decode(got[0])
                except ValueError as exc:
                    call.code, call.details = call.deserialize_error(exc)
        raise _Rendezvous(call, False)

    def _blocking_retried(self, request: Any, timeout: float | None, metadata: Any, wait_for_ready: bool | None) -> _ClientCall:
        """The blocking call of a method with a retryPolicy: its attempts one after the
        other on the caller's thread, each as the plain blocking call makes it (a call
        that succeeds at once costs about what it costs without a policy), sharing one
        deadline; the attempt that ends it (a backoff past the deadline: one that ended
        DEADLINE_EXCEEDED, as in grpc). Closing the channel ends a backoff at once."""
        policy = self._retry_policy
        assert policy is not None
        deadline = self._retry_deadline(timeout)
        retry = RetryState(policy, self._channel._retry.throttle)
        meta = wire.check_metadata(metadata)
        channel = self._channel
        while True:
            call = self._start(request, True, None if deadline is None else deadline.remaining(), retry.metadata(meta),
                               watch=False, wait_for_ready=wait_for_ready)
            call.wait_end()
            delay = retry.next_delay(call.code, call.trailing, bool(call.initial) or bool(call.messages))
            if delay is None:
                return call
            left = deadline.remaining() if deadline is not None else None
            channel.app.about_to_block()  # a handler on the rx thread calling out: hand the role over
            channel._retry_pause(delay if left is None else min(delay, left))
            ended = channel._retry_ended(deadline)
            if ended is not None:  # (as close() ends the calls in flight; as the deadline ends one)
                with call._cond:
                    call.messages.clear()
                    (call.code, call.details), call.initial, call.trailing = ended, [], []
                return call

    def with_call(self, request: Any, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> tuple[Any, _Rendezvous]:
        fut = self.future(request, timeout, metadata, wait_for_ready=wait_for_ready)
        return fut.result(), fut

    def future(self, request: Any, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> _Rendezvous:
        if self._retry_policy is not None:
            return self._retried(request, timeout, metadata, wait_for_ready)
        return _Rendezvous(self._start(request, True, timeout, metadata, wait_for_ready=wait_for_ready), False)


class UnaryStreamMultiCallable(_MultiCallable):
    _RETRIED = True

    def __call__(self, request: Any, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> _Rendezvous:
        if self._retry_policy is not None:  # (one test: methods without retries pay nothing more)
            return self._retried(request, timeout, metadata, wait_for_ready, stream=True)
        return _Rendezvous(self._start(request, True, timeout, metadata, wait_for_ready=wait_for_ready), True)


class StreamUnaryMultiCallable(_MultiCallable):
    def __call__(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> Any:
        return self.with_call(request_iterator, timeout, metadata, wait_for_ready=wait_for_ready)[0]

    def with_call(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> tuple[Any, _Rendezvous]:
        fut = self.future(request_iterator, timeout, metadata, wait_for_ready=wait_for_ready)
        return fut.result(), fut

    def future(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> _Rendezvous:
        call = self._start(None, False, timeout, metadata, wait_for_ready=wait_for_ready)
        self._pump_requests(call, request_iterator)
        return _Rendezvous(call, False)


class StreamStreamMultiCallable(_MultiCallable):
    def __call__(self, request_iterator: Iterable[Any], timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_ignored: Any) -> _Rendezvous:
        call = self._start(None, False, timeout, metadata, wait_for_ready=wait_for_ready)
        self._pump_requests(call, request_iterator)
        return _Rendezvous(call, True)


class Channel(ChannelCore):
    """A channel to `target` ("host:port" of a server app's address) through the local daemon."""

    _unary_unary, _unary_stream = UnaryUnaryMultiCallable, UnaryStreamMultiCallable
    _stream_unary, _stream_stream = StreamUnaryMultiCallable, StreamStreamMultiCallable

    def __init__(self, target: str, app: App | None = None, options: Any = None) -> None:
        self.target = target
        require_app(app, False, "mrpcd.insecure_channel")
        self.app = app or default_app()
        self._options = options
        self._max_send, self._max_receive = wire.message_limits(options, self.app.max_record)
        self._method_defaults = wire.method_defaults(options)
        self._retry = wire.retry_config(options)  # (None: no method retries, the common case)
        self._handle: int | None = None
        self._listener: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._state = ChannelConnectivity.IDLE
        self._subscribers: list[_Subscription] = []
        self._notices: deque = deque()  # (subscriptions, state) for the notifier thread, in order
        self._notifying = False
        self._notice_lock = threading.Lock()
        self._connector: Any = None  # subscribe(try_to_connect=True)'s channel_ready_future
        self._schemas: dict[int, Schema] = {}  # its stubs' schemas, by id: registered again with a successor app

    def _add_schemas(self, schemas: list[Schema]) -> None:
        """A stub's message schemas: to the daemon now (a refused one raises here, where
        grpc's stub creation would), and again whenever the channel moves to its app's
        successor. A daemon that is gone at this moment is no error: the next call's
        connection registers them."""
        for schema in schemas:
            self._schemas.setdefault(id(schema), schema)
            try:
                self.app.ensure_schema(schema)
            except DaemonUnavailable:
                if not self.app.closed and not self.app.daemon_lost:
                    raise

    def _app_ended(self) -> bool:
        """The app is closed for good (its user closed it): no connection can come any more.
        One whose daemon went away is not: the next attempt carries on with its successor."""
        app = self.app
        return app.closed and not app.daemon_lost

    def _follow_app(self) -> App:
        """(channel lock held) The app to connect through: the channel's, or its successor
        when the daemon went away (DaemonUnavailable while none answers). The stubs'
        schemas go to the new session before the connection is made."""
        app = self.app
        if not app.closed:
            return app
        new = app.successor()
        for schema in list(self._schemas.values()):
            new.ensure_schema(schema)
        self._max_send, self._max_receive = wire.message_limits(self._options, new.max_record)  # (this daemon's)
        self.app = new
        app.wake_connect_waits()  # waits between attempts sleep on the old app's: look again
        return new

    def _ensure_handle(self) -> int:
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._closed:
                raise RpcError(StatusCode.CANCELLED, "the channel is closed")
            if self._handle is None:
                self._set_state(ChannelConnectivity.CONNECTING)
                try:
                    app = self._follow_app()
                except RpcError as exc:  # no daemon (it is the local one that failed: no "failed to connect to <target>")
                    self._set_state(ChannelConnectivity.TRANSIENT_FAILURE)
                    raise RpcError(exc.code(), exc.details()) from None
                try:
                    reply = app.call("connect", target=self.target)
                except RpcError as exc:
                    self._set_state(ChannelConnectivity.TRANSIENT_FAILURE)
                    raise connect_error(self.target, exc) from None
                self._handle = reply["handle"]
                self._listener = lost_listener(self)
                self.app.handle_listeners.setdefault(self._handle, []).append(self._listener)
                self._set_state(ChannelConnectivity.READY)
            return self._handle

    # -- grpc's connectivity API ----------------------------------------------------------
    def _set_state(self, state: ChannelConnectivity) -> None:
        with self._notice_lock:  # a change and its notice in one step (subscribe reads both)
            if state is self._state:
                return
            self._state = state
            if not self._subscribers or not self._queue_notice(tuple(self._subscribers), state):
                return
        self._start_notifier()

    def _queue_notice(self, subscriptions: tuple, state: ChannelConnectivity) -> bool:
        """(notice lock held) Queue callback(state) of each subscription for the notifier
        thread, which runs them in the order of the changes, never on the caller's thread
        (which may hold the channel's lock), as grpc runs them apart. True: none runs,
        start one."""
        self._notices.append((subscriptions, state))
        if self._notifying:
            return False
        self._notifying = True
        return True

    def _start_notifier(self) -> None:
        def run() -> None:
            while True:
                with self._notice_lock:
                    if not self._notices:
                        self._notifying = False
                        return
                    subscriptions, state = self._notices.popleft()
                for sub in subscriptions:
                    if sub not in self._subscribers:  # unsubscribed (or closed) since
                        continue
                    try:
                        sub.callback(state)
                    except Exception:
                        _log.exception(_SUBSCRIBER_ERROR)  # as grpc's _deliver

        try:
            threading.Thread(target=run, name="mrpcd-channel-connectivity", daemon=True).start()
        except RuntimeError:
            with self._notice_lock:  # interpreter shutdown
                self._notifying = False

    def subscribe(self, callback: Callable[[ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        """grpc.Channel.subscribe: callback(state) now with the current state, then at each
        change; `try_to_connect` connects in the background (retrying while the target
        cannot be reached) when the channel is not connected."""
        sub = _Subscription(callback)
        with self._notice_lock:  # (never after the notice of a later state)
            self._subscribers.append(sub)
            start = self._queue_notice((sub,), self._state)
        if start:
            self._start_notifier()
        if try_to_connect and self._handle is None and not self._closed and (self._connector is None or self._connector.done()):
            self._connector = channel_ready_future(self)

    def unsubscribe(self, callback: Callable[[ChannelConnectivity], None]) -> None:
        """grpc.Channel.unsubscribe: the first subscription of `callback` (compared with
        ==, as grpc's _unsubscribe) gets no more calls; one subscribed twice stays
        subscribed once. Unknown callbacks are ignored."""
        with self._notice_lock:
            for i, sub in enumerate(self._subscribers):
                if sub.callback == callback:
                    del self._subscribers[i]
                    break

    def _wait_for_handle(self, deadline: wire.Deadline | None, ended: Callable[[], bool] | None = None) -> int:
        """The connection for a wait_for_ready call (and channel_ready_future): while the
        target cannot be reached (UNAVAILABLE), try again, backing off to 1 s, until the
        deadline (DEADLINE_EXCEEDED then, as grpc); other errors (a closed channel) are
        raised. `ended`: the waiter ended meanwhile (cancelled): stop (CANCELLED). Between
        attempts it sleeps on the app's connect_waits: closing the channel or the app, or
        ending the waiter (whoever ends it calls app.wake_connect_waits), ends the wait at
        once, not at the next attempt."""
        if ended is None:
            def over() -> bool:
                return self._closed or self._app_ended()
        else:
            def over() -> bool:
                return self._closed or self._app_ended() or ended()
        closed = self._closed
        delay = 0.05
        while True:
            if ended is not None and ended():
                raise RpcError(StatusCode.CANCELLED, "Locally cancelled by application!")
            try:
                return self._ensure_handle()
            except RpcError as exc:
                if self._closed and not closed:  # close() while it waited: as the calls in flight
                    raise RpcError(StatusCode.CANCELLED, "Channel closed!") from None
                if exc.code() is not StatusCode.UNAVAILABLE or self._app_ended():
                    raise  # (a closed app can never connect: waiting would last until the deadline)
            left = deadline.remaining() if deadline is not None else None
            if left == 0:
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)
            app = self.app  # (one whose daemon went away too: closing the channel wakes it)
            with app.connect_waits:
                app.connect_waits.wait_for(over, delay if left is None else min(delay, left))
            delay = min(delay * 2, 1.0)

    def _retry_pause(self, seconds: float, done: Callable[[], bool] | None = None) -> None:
        """A retry's backoff: `seconds`, or less once the channel or its app is closed or
        `done()` (the call was cancelled): whoever does that wakes the app's connect_waits."""
        app = self.app
        with app.connect_waits:
            app.connect_waits.wait_for(lambda: self._closed or self._app_ended() or (done is not None and done()), seconds)

    def _retry_ended(self, deadline: wire.Deadline | None) -> "tuple[StatusCode, str] | None":
        """After a backoff, the status that ends a retried call instead of its next attempt:
        the channel closed (as close() ends the calls in flight), or its deadline passed."""
        if self._closed:
            return StatusCode.CANCELLED, "Channel closed!"
        if deadline is not None and deadline.expired():
            return StatusCode.DEADLINE_EXCEEDED, _DEADLINE
        return None

    def _on_lost(self, details: str) -> None:
        with self._lock:
            self._handle = None
            if not self._closed:
                self._set_state(ChannelConnectivity.IDLE)

    def __del__(self) -> None:
        """Dropped without close(): free the daemon connection once its calls end."""
        handle = getattr(self, "_handle", None)
        if handle is not None and not self._closed and not sys.is_finalizing():  # (exit closes it; no thread starts then)
            try:  # not here: a collection may run this in a thread holding a call's lock
                threading.Thread(target=close_dropped_handle, args=(self.app, handle), name="mrpcd-channel-close", daemon=True).start()
            except RuntimeError:
                pass  # interpreter shutdown: the app's exit closes it

    def close(self) -> None:
        """Close the connection; the channel's calls in flight end with CANCELLED at once
        (grpc's 'Channel closed!'; their servers see the connection close)."""
        with self._notice_lock:  # grpc's close unsubscribes all silently: no SHUTDOWN notice
            self._subscribers.clear()
        with self._lock:
            self._closed = True
            handle, self._handle = self._handle, None
            self._set_state(ChannelConnectivity.SHUTDOWN)
        self.app.wake_connect_waits()  # its wait_for_ready calls end now (CANCELLED)
        connector = self._connector
        if connector is not None:
            connector.cancel()
        if handle is None:
            return
        app = self.app
        listeners = app.handle_listeners.get(handle)
        if listeners is not None and self._listener in listeners:
            listeners.remove(self._listener)
        for key, sink in list(app.calls.items()):
            if key[0] == handle:
                sink.lost(StatusCode.CANCELLED, "Channel closed!")
        if not app.closed:
            try:
                app.call("close", handle=handle)
            except RpcError:
                pass

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ChannelReadyFuture:
    """grpc.channel_ready_future's Future: done once the channel is connected. While the
    target cannot be reached (UNAVAILABLE) a helper thread tries again, backing off to
    1 s, as grpc waits for READY; result(timeout) raises FutureTimeoutError meanwhile.
    Other errors (a malformed target, a closed channel) end it with that exception."""

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self._cond = threading.Condition()
        self._done = False
        self._cancelled = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] = []
        threading.Thread(target=self._run, name="mrpcd-channel-ready", daemon=True).start()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._channel._wait_for_handle(None, lambda: self._cancelled)
        except Exception as exc:  # (its CANCELLED after cancel() changes nothing: _finish ran)
            error = exc
        self._finish(error, cancelled=False)

    def _finish(self, error: BaseException | None, cancelled: bool) -> bool:
        with self._cond:
            if self._done:
                return False
            self._done, self._error = True, error
            self._cancelled = self._cancelled or cancelled
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                _log.exception(_DONE_CALLBACK_ERROR)  # as grpc's _utilities._ChannelReadyFuture
        return True

    def cancel(self) -> bool:
        with self._cond:
            if self._done:
                return False
            self._cancelled = True
        self._channel.app.wake_connect_waits()  # its wait between two attempts ends now
        return self._finish(None, cancelled=True)

    def cancelled(self) -> bool:
        return self._cancelled and self._done

    def running(self) -> bool:
        return not self._done

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> None:
        error = self.exception(timeout)
        if error is not None:
            raise error

    def exception(self, timeout: float | None = None) -> BaseException | None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise FutureTimeoutError()
        if self._cancelled:
            raise FutureCancelledError()
        return self._error

    def traceback(self, timeout: float | None = None) -> Any:
        error = self.exception(timeout)
        return None if error is None else error.__traceback__

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        with self._cond:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)


def channel_ready_future(channel: Any) -> _ChannelReadyFuture:
    """Like grpc.channel_ready_future: a Future done once `channel` is connected (the
    daemon has a connection to its target), e.g. `.result(timeout=10)` before the first call."""
    return _ChannelReadyFuture(channel)


def insecure_channel(target: str, options: Any = None, compression: Any = None, app: App | None = None) -> Channel:
    """Like grpc.insecure_channel; the daemon, not the app, decides transport and security.

    Honoured options: grpc.max_send_message_length, grpc.max_receive_message_length,
    grpc.service_config's per-method timeout / waitForReady / retryPolicy (unary-unary
    and server-streaming calls) and retryThrottling, and grpc.enable_retries; the others (keepalive, the rest
    of a service config) and `compression` are accepted and ignored (docs/PORTING.md).
    """
    if isinstance(compression, App):  # insecure_channel(target, options, app): before compression existed
        app, compression = compression, None
    return Channel(target, app, options)
