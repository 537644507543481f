"""asyncio client side, shaped like grpc.aio: calls start at once and are awaitable objects.

`stub.M(req)` returns a call (it is already running, as in grpc.aio): `await` it for the
response, or `async for` / `read()` a response stream; a request stream comes from an
(async) iterator, or, when the call is made without one, from `await call.write(msg)` and
`await call.done_writing()`; `cancel()`, `code()`, `details()`,
`initial_metadata()`, `trailing_metadata()` work on every kind. Cancelling the task that
awaits a call cancels the RPC, and the server sees it. Response streams grant flow-control
credit as they are consumed; request streams await the server's credit.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, AsyncIterator, Callable, Coroutine, Sequence, cast

from .. import wire
from .._calls import ChannelCore, ClientCallCore, MultiCallableCore, RetryState, close_dropped_handle, connect_error, lost_listener
from ..interceptors import ClientCallDetails, wait_for_ready_of
from ..marshal import records as R
from ..status import BaseError, ChannelConnectivity, RpcError, StatusCode
from ._app import AioApp, _set_if_pending, default_app
from ..app import require_app
from ._metadata import Metadata

_DEADLINE = "Deadline Exceeded"
_log = logging.getLogger(__name__)

# wait_for_ready start tasks (Channel._wait_for_handle): those whose call was cancelled
# meanwhile, and those between two connection attempts, where cancelling them is safe
# (no connect reply or START record half done)
_CANCEL_ASKED: "weakref.WeakSet[asyncio.Task]" = weakref.WeakSet()
_BETWEEN_ATTEMPTS: "weakref.WeakSet[asyncio.Task]" = weakref.WeakSet()


class _CallState(ClientCallCore):
    """One call's receive side (mrpcd._calls), fed by the loop's rx drain; the same
    (handle, call_id) sink contract as the sync library."""

    def __init__(self, app: AioApp, handle: int, call_id: int, deserialize: Callable[[bytes], Any], max_receive: int, deadline: wire.Deadline | None) -> None:
        self._waiters: list[asyncio.Future] = []
        self._timer: asyncio.TimerHandle | None = None
        super().__init__(app, handle, call_id, deserialize, max_receive, deadline)
        if deadline is not None:
            # grpc.aio ends a call at its deadline whether or not anything awaits it (a
            # call with only done callbacks, a stream nobody reads); waits need no timer
            # of their own then
            self._timer = app.loop.call_later(deadline.remaining() or 0.0, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._timer = None
        self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)

    def unregister(self) -> None:
        """(the call ended, or never started) Its deadline timer goes too."""
        super().unregister()
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _wake(self) -> None:
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for fut in waiters:
                _set_if_pending(fut)

    def deliver(self, rec: R.Record) -> None:
        cancel = self.take(rec)
        if cancel is not None:
            self.app.send_nowait(cancel)

    def grant(self, n: int) -> None:
        self.grant_credit(n)

    def lost(self, code: StatusCode, details: str) -> None:
        self.end(code, details)

    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        if not self.end(code, details):
            return False
        self.cancelled_locally = code is StatusCode.CANCELLED
        self.app.send_nowait(self.cancel_record())
        return True

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        """Until ready() or the call ends; the deadline ends it with DEADLINE_EXCEEDED
        (the call's own timer, _deadline_passed, wakes the wait).

        One future per wait, woken by _wake (every state change runs on the loop, so
        nothing can change between the check and the await): less than half the cost of
        asyncio.wait_for over an Event, which builds a task, a waiter and a callback each
        time (13 vs 6.5 µs a wait, measured, with a timer per wait then)."""
        while not ready() and not self.done:
            if self.deadline is not None and self.deadline.expired():  # (the timer is due)
                self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)
                return
            fut = self.app.loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                self.cancel()
                raise
            finally:
                if fut in self._waiters:  # cancelled, not woken by _wake: drop it
                    self._waiters.remove(fut)

    async def next_message(self) -> Any:
        await self._wait_for(lambda: bool(self.messages))
        got = self.pop_message()
        if got is not None:
            payload, window = got
            if window is not None:
                self.app.send_nowait(window)
            try:
                return self.decode(payload)
            except ValueError as exc:
                code, details = self.deserialize_error(exc)
                if not self.cancel(code, details):  # ended already (unary): not OK any more
                    self.code, self.details = code, details
                raise self.error() from None
        if self.code is StatusCode.OK:
            raise StopAsyncIteration
        if self.cancelled_locally:  # grpc.aio: reading a call the app cancelled raises CancelledError
            raise asyncio.CancelledError()
        raise self.error()

    async def wait_done(self) -> None:
        await self._wait_for(lambda: False)

    async def wait_credit(self) -> bool:
        await self._wait_for(self.credit_available)
        return not self.done

    def error(self) -> RpcError:
        return self.make_error(AioRpcError)


class AioRpcError(RpcError):
    """grpc.aio.AioRpcError: what a failed asyncio call raises; its metadata are
    grpc.aio.Metadata, as grpc.aio's."""

    # grpc's own split: grpc.RpcError's metadata are tuples, grpc.aio.AioRpcError's Metadata
    def initial_metadata(self) -> Metadata:  # type: ignore[override]
        return Metadata.from_tuple(self._initial)

    def trailing_metadata(self) -> Metadata:  # type: ignore[override]
        return Metadata.from_tuple(self._trailing)


class _NoApp:
    """Where a call that never started is (briefly) registered: no app's table."""

    def __init__(self) -> None:
        self.calls: dict = {}


class _ClosedWhileWaiting(AioRpcError):
    """The channel was closed while the call waited for its target (wait_for_ready):
    grpc.aio's close cancels such a call with the others in flight."""

    def __init__(self) -> None:
        super().__init__(StatusCode.CANCELLED, "Channel closed!")


class _FailedStart(_CallState):
    """A call that could not start (the channel could not connect, the ring refused its
    first record): over at once with that error, so awaiting it raises AioRpcError and
    code() / details() answer, as grpc.aio shows a call that failed to connect."""

    def __init__(self, exc: RpcError) -> None:
        super().__init__(_NoApp(), 0, 0, bytes, 0, None)  # type: ignore[arg-type]
        self.initial, self.trailing = list(exc.initial_metadata()), list(exc.trailing_metadata())
        self.end(exc.code(), exc.details())


class _StreamAttemptState(_CallState):
    """An attempt of a retried response stream: `committed` once it has its first message,
    or the server's initial metadata before its end (set as the records arrive)."""

    committed = False

    def _wake(self) -> None:
        if not self.committed and (self.messages or (self.got_initial and not self.done)):
            self.committed = True
        super()._wake()


class _RetriedState(_CallState):
    """A unary-request call with a retryPolicy (gRFC A6), as its grpc.aio call sees it:
    one call over its attempts, which a task of its own runs (`run`) one after the other, each a
    plain call with the time left of this one's deadline; RetryState decides after each
    whether and when to try again. The last attempt's outcome (response or status,
    metadata and all) becomes this call's. It is in no app's table (records go to its
    attempts; a lost connection ends an attempt, which may be retried); its own deadline
    timer ends it, and cancelling it (or its deadline) cancels the attempt in flight and
    retries no more. A response stream (`stream`) commits to the attempt that receives
    its first message (or initial metadata): from then on it reads that attempt's
    messages, as A6 retries streams only until then."""

    def __init__(self, multi: "_AioMultiCallable", retry: RetryState, payload: Any, meta: list, deadline: wire.Deadline | None,
                 wait_for_ready: bool | None, stream: bool = False) -> None:
        app = multi._channel.app
        super().__init__(app, -1, app.next_call_id(), multi._decode, multi._channel._max_receive, deadline)
        app.calls.pop((self.handle, self.call_id), None)  # (not unregister(): that stops the deadline timer)
        self._multi = multi
        self._retry = retry
        self._payload = payload
        self._meta = meta
        self._wait_for_ready = wait_for_ready
        self._attempt: _CallState | None = None
        self._sleeping = False
        self._task: asyncio.Task | None = None
        self._stream = stream
        self._committed: _CallState | None = None  # (a stream's attempt that committed)

    def start(self) -> None:
        task = self._task = asyncio.ensure_future(self.run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (run ends the call with any error)

    async def run(self) -> None:
        try:
            while not self.done:
                try:
                    attempt: _CallState = await self._multi._open_attempt(self._payload, self._retry.metadata(self._meta), self.deadline, self._wait_for_ready,
                                                                          _StreamAttemptState if self._stream else _CallState)
                except RpcError as exc:  # no connection, record refused: an attempt that failed with it
                    attempt = _FailedStart(exc)
                self._attempt = attempt
                if self.done:  # cancelled (or past its deadline) while the attempt started
                    attempt.cancel(self.code, self.details)
                    return
                if self._stream:
                    await attempt._wait_for(lambda: getattr(attempt, "committed", False))
                    if self.done:
                        return
                    if getattr(attempt, "committed", False):  # no more retries: the stream reads this attempt
                        self._committed = attempt
                        self.initial, self.got_initial = attempt.initial, attempt.got_initial
                        self._wake()
                await attempt.wait_done()
                if self.done:
                    return
                committed = attempt is self._committed or bool(attempt.initial) or bool(attempt.messages)
                delay = self._retry.next_delay(attempt.code, attempt.trailing, committed)
                if delay is None:
                    if attempt is not self._committed:  # (a committed stream's messages are read from it)
                        self.messages.extend(attempt.messages)
                    self.initial, self.trailing, self.got_initial = attempt.initial, attempt.trailing, attempt.got_initial
                    self.code, self.details = attempt.code, attempt.details
                    self.cancelled_locally = attempt.cancelled_locally  # (closed by the channel's close: CancelledError)
                    self._finish()
                    self._wake()
                    return
                left = self.deadline.remaining() if self.deadline is not None else None
                self._sleeping = True
                try:
                    # the deadline first: its timer ends the call then (DEADLINE_EXCEEDED, as grpc's)
                    await self._multi._channel._pause(delay if left is None else min(delay, left))  # (its close ends it)
                finally:
                    self._sleeping = False
                if self.done:
                    return
                if self._multi._channel._closed:  # grpc.aio's close cancels the calls in flight
                    self.cancel(StatusCode.CANCELLED, "Channel closed!")
                    self.cancelled_locally = True
                    return
                if self.deadline is not None and self.deadline.expired():
                    self.cancel(StatusCode.DEADLINE_EXCEEDED, _DEADLINE)
        except asyncio.CancelledError:
            self.cancel()
        except Exception as exc:  # (nobody would see it in this task: the call ends with it)
            self.end(StatusCode.UNKNOWN, f"the call could not be retried: {exc!r}")

    async def next_message(self) -> Any:
        if self._stream:
            await self._wait_for(lambda: self._committed is not None)
            committed = self._committed
            if committed is not None:
                return await committed.next_message()
        return await super().next_message()

    def cancel(self, code: StatusCode = StatusCode.CANCELLED, details: str = "Locally cancelled by application!") -> bool:
        if not self.end(code, details):
            return False
        self.cancelled_locally = code is StatusCode.CANCELLED
        attempt, task = self._attempt, self._task
        if attempt is not None:
            attempt.cancel(code, details)
        if task is not None and not task.done():
            _CANCEL_ASKED.add(task)  # a wait_for_ready attempt's wait ends (Channel._wait_for_handle)
            if self._sleeping or task in _BETWEEN_ATTEMPTS:
                task.cancel()
        return True


class _Call:
    """Common grpc.aio.Call surface over a call that is being started by a task, or that
    started already (`state`: its first record is in the ring)."""

    def __init__(self, starter, loop: asyncio.AbstractEventLoop, *, state: "_CallState | None" = None) -> None:
        self._state: _CallState | None = state
        self._cancel_requested = False
        self._start_task = loop.create_task(self._start(starter)) if state is None else None

    def __del__(self) -> None:
        """Dropped while running (a response stream left midway, a call never awaited):
        cancel it, as grpc.aio does, or the server would go on for nobody."""
        state = getattr(self, "_state", None)
        if state is not None and not state.done:
            # Soon, on the loop: a collection can run this anywhere, even inside the app's
            # tx lock, which the cancel's send takes.
            try:
                state.app.loop.call_soon_threadsafe(state.cancel, StatusCode.CANCELLED, "Cancelled upon garbage collection!")
            except Exception:
                pass  # the loop is closed: nothing is left to tell

    async def _start(self, starter) -> _CallState:
        try:
            state = await starter
        except RpcError as exc:  # no connection, record refused: a call that failed with it
            state = _FailedStart(exc)
            # close() while it waited: as grpc.aio's close cancels it, awaiting it raises CancelledError
            state.cancelled_locally = isinstance(exc, _ClosedWhileWaiting)
        except asyncio.CancelledError:
            if not self._cancel_requested:
                raise
            # cancel() while a wait_for_ready call waited for its target: nothing was sent
            state = _FailedStart(AioRpcError(StatusCode.CANCELLED, "Locally cancelled by application!"))
            state.cancelled_locally = True
        self._state = state
        if self._cancel_requested:
            state.cancel()
        return state

    async def _get(self) -> _CallState:
        if self._state is None:
            # (no state yet: it is being started by the task __init__ made)
            return await asyncio.shield(cast("asyncio.Task[_CallState]", self._start_task))
        return self._state

    def cancel(self) -> bool:
        if self._state is None:
            if self._cancel_requested:
                return False
            self._cancel_requested = True
            task = cast("asyncio.Task[_CallState]", self._start_task)
            _CANCEL_ASKED.add(task)  # a wait_for_ready wait ends (Channel._wait_for_handle)
            if task in _BETWEEN_ATTEMPTS:
                task.cancel()
            return True
        return self._state.cancel()

    def cancelled(self) -> bool:
        return self._cancel_requested or (self._state is not None and self._state.cancelled_locally)

    def done(self) -> bool:
        return self._state is not None and self._state.done

    def time_remaining(self) -> float | None:
        s = self._state
        return s.deadline.remaining() if s is not None and s.deadline else None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        async def attach() -> None:
            s = await self._get()
            if s.done:
                callback(self)
            else:
                s.callbacks.append(lambda: callback(self))

        asyncio.ensure_future(attach())

    async def code(self) -> StatusCode:
        s = await self._get()
        await s.wait_done()
        return s.code

    async def details(self) -> str:
        s = await self._get()
        await s.wait_done()
        return s.details

    async def initial_metadata(self) -> Metadata:
        s = await self._get()
        await s._wait_for(lambda: s.got_initial)
        return Metadata.from_tuple(s.initial)

    async def trailing_metadata(self) -> Metadata:
        s = await self._get()
        await s.wait_done()
        return Metadata.from_tuple(s.trailing)

    async def wait_for_connection(self) -> None:
        """Until the call has started; raises AioRpcError if it could not (grpc.aio)."""
        state = await self._get()
        if type(state) is _FailedStart:
            raise state.error()


class UnaryResponseCall(_Call):
    """A unary-response call: `await call` gives the response (or raises AioRpcError)."""

    # The response once taken: a call may be awaited again (an interceptor awaited it, then
    # the application), as in grpc.aio, and each await gives the same response.
    _taken = False
    _response: Any = None

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> Any:
        s = await self._get()
        try:
            if not self._taken:
                try:
                    self._response = await s.next_message()
                    self._taken = True
                except StopAsyncIteration:
                    if not self._taken:  # (else another await took it meanwhile)
                        s.end(StatusCode.INTERNAL, "the server ended the call without a response")
                        raise s.error() from None
            await s.wait_done()
        except asyncio.CancelledError:
            s.cancel()
            raise
        if s.code is not StatusCode.OK:
            if s.cancelled_locally:
                raise asyncio.CancelledError()
            raise s.error()
        return self._response


class StreamResponseCall(_Call):
    """A response-stream call: `async for` it, or `await call.read()` (None at the end)."""

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                msg = await self._next()
            except StopAsyncIteration:
                return
            yield msg

    async def _next(self) -> Any:
        s = await self._get()
        try:
            return await s.next_message()
        except asyncio.CancelledError:
            s.cancel()
            raise

    async def read(self) -> Any:
        try:
            return await self._next()
        except StopAsyncIteration:
            return EOF


EOF = None  # grpc.aio.EOF


class UsageError(BaseError):
    """grpc.aio.UsageError: the API was used in a way it does not allow (e.g. write() on a
    call that was given a request iterator)."""


_MIXED_STYLES = "Please don't mix two styles of API for streaming requests"
_RPC_FINISHED = "RPC already finished."
_HALF_CLOSED = 'RPC is half closed after calling "done_writing".'


class _StreamRequestMixin:
    """grpc.aio's reader/writer style for request streams: a stream-unary or stream-stream
    call made without a request iterator takes its requests from `await call.write(msg)`
    and half-closes at `await call.done_writing()`. Writes wait for the server's
    flow-control credit, like the iterator pump."""

    _writer: "_AioMultiCallable | None"  # None: the call was given a request iterator
    _get: Callable[[], Coroutine[Any, Any, _CallState]]  # the _Call's it is mixed into

    def _init_writer(self, writer: "_AioMultiCallable | None") -> None:
        self._writer = writer
        self._done_writing = False
        self._write_lock = asyncio.Lock()

    def _raise_for_status(self, s: _CallState) -> None:
        if s.cancelled_locally:
            raise asyncio.CancelledError()
        raise s.error()

    async def write(self, request: Any) -> None:
        if self._writer is None:
            raise UsageError(_MIXED_STYLES)
        s = await self._get()
        if s.done:
            raise asyncio.InvalidStateError(_RPC_FINISHED)
        if self._done_writing:
            raise asyncio.InvalidStateError(_HALF_CLOSED)
        try:
            async with self._write_lock:  # concurrent writes keep their order
                if not await s.wait_credit():
                    self._raise_for_status(s)
                try:
                    payload = self._writer._payload(request)
                except RpcError as exc:  # over the send limit: the call fails with it, as the pump does
                    s.cancel(exc.code(), exc.details())
                    self._raise_for_status(s)
                await s.app.send_async(s.request_message(payload))
        except asyncio.CancelledError:
            s.cancel()
            raise

    async def done_writing(self) -> None:
        if self._writer is None:
            raise UsageError(_MIXED_STYLES)
        s = await self._get()
        if s.done or self._done_writing:
            return
        self._done_writing = True
        try:
            async with self._write_lock:
                if not s.done:
                    await s.app.send_async(s.end_of_requests())
        except asyncio.CancelledError:
            s.cancel()
            raise


class StreamUnaryCall(_StreamRequestMixin, UnaryResponseCall):
    """A stream-unary call (grpc.aio.StreamUnaryCall): `await call` gives the response;
    made without a request iterator, it takes `write()` / `done_writing()`."""

    def __init__(self, starter, loop: asyncio.AbstractEventLoop, writer: "_AioMultiCallable | None" = None) -> None:
        self._init_writer(writer)
        super().__init__(starter, loop)


class StreamStreamCall(_StreamRequestMixin, StreamResponseCall):
    """A stream-stream call (grpc.aio.StreamStreamCall): `async for` / `read()` the
    responses; made without a request iterator, it takes `write()` / `done_writing()`."""

    def __init__(self, starter, loop: asyncio.AbstractEventLoop, writer: "_AioMultiCallable | None" = None) -> None:
        self._init_writer(writer)
        super().__init__(starter, loop)


class _AioMultiCallable(MultiCallableCore):
    def __init__(self, channel: "Channel", method: str, request_type: type, response_type: type) -> None:
        super().__init__(channel, method, request_type, response_type)
        for schema in self._schemas:  # (registered by the first call: _open)
            channel._schemas.setdefault(id(schema), schema)

    def _call(self, call_cls: type, first: Any, details: ClientCallDetails, wait_for_ready: bool | None = None) -> Any:
        """A call with a single request, started here when everything it needs is at hand
        (the schemas registered, the channel connected, room in the ring): no start task,
        no shield, the record goes into the ring now, as grpc.aio starts a call when it
        is made. Otherwise a task starts it (errors then surface where the call is
        awaited, as before)."""
        loop = self._channel.app.loop
        if self._retry_policy is not None:  # (one test: methods without retries pay nothing more)
            return call_cls(self._retried(first, details, self._wait_for_ready(wait_for_ready_of(details, wait_for_ready)), call_cls is StreamResponseCall), loop)
        got = self._open_now(first, details.timeout, details.metadata)
        if got is None:
            return call_cls(self._open(first, True, details.timeout, details.metadata, wait_for_ready=wait_for_ready_of(details, wait_for_ready)), loop)
        state, unsent = got
        if unsent is None:
            return call_cls(None, loop, state=state)
        return call_cls(self._send_first(state, unsent), loop)

    async def _retried(self, first: Any, details: ClientCallDetails, wait_for_ready: bool | None, stream: bool = False) -> _CallState:
        """A call of a method with a retryPolicy: encoded once, its attempts share one
        deadline (the call's timeout, or its service config's), as in grpc."""
        policy = self._retry_policy
        assert policy is not None
        meta, payload, _dl, deadline = self._prepare(first, details.timeout, details.metadata)
        state = _RetriedState(self, RetryState(policy, self._channel._retry.throttle), payload, meta, deadline, wait_for_ready, stream)
        state.start()
        return state

    async def _register_schemas(self) -> None:
        """The stub's message schemas to the daemon, once per app (a control round trip in
        the executor). A closed app's channel connects through its successor, which takes
        the channel's schemas before it connects (Channel._follow_app)."""
        app = self._channel.app
        if not app.closed:
            for schema in self._schemas:
                if id(schema) not in app._schemas:
                    await app.loop.run_in_executor(None, app.ensure_schema, schema)

    async def _open_attempt(self, payload: Any, meta: list, deadline: wire.Deadline | None, wait_for_ready: bool | None,
                            cls: "type[_CallState]" = _CallState) -> _CallState:
        """One attempt of a retried call (_RetriedState): _open's steps, with the request
        encoded already and the time left of the call's deadline."""
        ch = self._channel
        await self._register_schemas()
        handle = await (ch._wait_for_handle(deadline) if wait_for_ready else ch._ensure_handle())
        dl = wire.deadline_us(deadline.remaining()) if deadline is not None else 0
        state = cls(ch.app, handle, ch.app.next_call_id(), self._decode, ch._max_receive, deadline)
        try:
            await ch.app.send_async(self._first_record(state, True, dl, meta, payload))
        except BaseException:
            state.unregister()  # never sent: forget it
            raise
        return state

    def _open_now(self, first: Any, timeout: float | None, metadata) -> "tuple[_CallState, Any] | None":
        """(state, None) when the call started; (state, record) when only the ring was
        full (the record still to send); None when the task must do it all."""
        ch = self._channel
        app = ch.app
        handle = ch._handle
        if handle is None or app.closed:
            return None
        for schema in self._schemas:
            if id(schema) not in app._schemas:
                return None
        try:
            meta, payload, dl, deadline = self._prepare(first, timeout, metadata)
        except Exception:
            return None  # _open raises it again, where the call is awaited
        state = _CallState(app, handle, app.next_call_id(), self._decode, ch._max_receive, deadline)
        try:
            record = self._first_record(state, True, dl, meta, payload)
            if len(record) > app.max_record:
                sent = False  # send_async refuses it, where the call is awaited
            else:
                sent = app.try_send(record)
        except Exception:
            state.unregister()  # never sent: forget it
            return None  # _open meets the same error again, where the call is awaited
        return state, (None if sent else record)

    async def _send_first(self, state: _CallState, record: Any) -> _CallState:
        try:
            await self._channel.app.send_async(record)
        except BaseException:
            state.unregister()  # never sent: forget it
            raise
        return state

    async def _open(self, first: Any, end: bool, timeout: float | None, metadata, requests: Any = None, wait_for_ready: bool | None = None) -> _CallState:
        ch = self._channel
        await self._register_schemas()
        meta, payload, dl, deadline = self._prepare(first, timeout, metadata, end)
        if self._wait_for_ready(wait_for_ready):
            closed = ch._closed
            try:
                handle = await ch._wait_for_handle(deadline)
            except RpcError:
                if ch._closed and not closed:
                    raise _ClosedWhileWaiting() from None
                raise
        else:
            handle = await ch._ensure_handle()
        state = _CallState(ch.app, handle, ch.app.next_call_id(), self._decode, ch._max_receive, deadline)
        try:
            await ch.app.send_async(self._first_record(state, end, dl, meta, payload))
        except BaseException:
            state.unregister()  # never sent: forget it
            raise
        if requests is not None:  # None: no requests after the first, or the caller write()s them
            task = asyncio.ensure_future(self._pump(state, requests))
            state.callbacks.append(lambda: task.done() or task.cancel())
        return state

    async def _pump(self, state: _CallState, requests: Any) -> None:
        app = state.app

        async def send(req: Any) -> bool:
            if not await state.wait_credit():
                return False
            await app.send_async(state.request_message(self._payload(req)))
            return True

        try:
            if hasattr(requests, "__aiter__"):
                async for req in requests:
                    if not await send(req):
                        return
            else:
                for req in requests:
                    if not await send(req):
                        return
            if not state.done:
                await app.send_async(state.end_of_requests())
        except asyncio.CancelledError:
            pass
        except RpcError as exc:
            state.cancel(exc.code(), exc.details())
        except Exception as exc:
            _log.debug("Client request_iterator raised exception:", exc_info=True)  # as grpc.aio's _consume_request_iterator
            state.cancel(StatusCode.UNKNOWN, f"Exception iterating requests! {exc!r}")

    def _details(self, timeout: float | None, metadata, wait_for_ready: bool | None = None) -> ClientCallDetails:
        return ClientCallDetails(self._method, timeout, metadata, None, wait_for_ready)


class UnaryUnaryMultiCallable(_AioMultiCallable):
    _RETRIED = True

    def __call__(self, request: Any, *, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_: Any) -> Any:
        def invoke(details: ClientCallDetails, req: Any) -> UnaryResponseCall:
            return self._call(UnaryResponseCall, req, details, wait_for_ready)

        return self._channel._intercept("unary_unary", invoke, self._details(timeout, metadata, wait_for_ready), request)


class UnaryStreamMultiCallable(_AioMultiCallable):
    _RETRIED = True

    def __call__(self, request: Any, *, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_: Any) -> Any:
        def invoke(details: ClientCallDetails, req: Any) -> StreamResponseCall:
            return self._call(StreamResponseCall, req, details, wait_for_ready)

        return self._channel._intercept("unary_stream", invoke, self._details(timeout, metadata, wait_for_ready), request)


class StreamUnaryMultiCallable(_AioMultiCallable):
    def __call__(self, request_iterator: Any = None, *, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_: Any) -> Any:
        """With no request iterator the call takes `write()` / `done_writing()` (grpc.aio)."""
        def invoke(details: ClientCallDetails, reqs: Any) -> StreamUnaryCall:
            return StreamUnaryCall(self._open(None, False, details.timeout, details.metadata, reqs, wait_for_ready_of(details, wait_for_ready)),
                                   self._channel.app.loop, self if reqs is None else None)

        return self._channel._intercept("stream_unary", invoke, self._details(timeout, metadata, wait_for_ready), request_iterator)


class StreamStreamMultiCallable(_AioMultiCallable):
    def __call__(self, request_iterator: Any = None, *, timeout: float | None = None, metadata=None, credentials: Any = None, wait_for_ready: bool | None = None, **_: Any) -> Any:
        """With no request iterator the call takes `write()` / `done_writing()` (grpc.aio)."""
        def invoke(details: ClientCallDetails, reqs: Any) -> StreamStreamCall:
            return StreamStreamCall(self._open(None, False, details.timeout, details.metadata, reqs, wait_for_ready_of(details, wait_for_ready)),
                                    self._channel.app.loop, self if reqs is None else None)

        return self._channel._intercept("stream_stream", invoke, self._details(timeout, metadata, wait_for_ready), request_iterator)


class Channel(ChannelCore):
    """An asyncio channel to `target` through the local daemon (grpc.aio.Channel)."""

    _unary_unary, _unary_stream = UnaryUnaryMultiCallable, UnaryStreamMultiCallable
    _stream_unary, _stream_stream = StreamUnaryMultiCallable, StreamStreamMultiCallable

    def __init__(self, target: str, app: AioApp | None = None, options: Any = None, interceptors: Sequence[Any] | None = None) -> None:
        from ._interceptors import check_client_interceptors

        self.target = target
        self._options = options
        wire.message_limits(options, 1 << 30)  # a bad option is an error here, where it is given
        self._method_defaults = wire.method_defaults(options)
        self._retry = wire.retry_config(options)  # (None: no method retries, the common case)
        self._interceptors = check_client_interceptors(interceptors)
        self._handle: int | None = None
        self._listener: Callable[[str], None] | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        require_app(app, True, "mrpcd.aio.insecure_channel")
        self._state = ChannelConnectivity.IDLE
        self._state_changed: asyncio.Event | None = None  # made by wait_for_state_change, on its loop
        self._connector: asyncio.Future | None = None  # get_state(try_to_connect=True)'s channel_ready()
        self._schemas: dict[int, Any] = {}  # its stubs' schemas, by id: registered with a successor app before it connects
        if app is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # made before the loop runs (as grpc.aio allows): the app comes on first use
        self._bind(app or default_app())

    def _bind(self, app: AioApp) -> None:
        self.app = app
        self._max_send, self._max_receive = wire.message_limits(self._options, app.max_record)

    def __getattr__(self, name: str) -> Any:
        """A channel made outside a running loop takes the loop's app when first used
        inside it; from then on these are plain attributes (nothing on the call path)."""
        if name in ("app", "_max_send", "_max_receive"):
            self._bind(default_app())  # RuntimeError outside a running loop, as before
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _intercept(self, kind: str, invoke: Callable[[ClientCallDetails, Any], Any], details: ClientCallDetails, request: Any) -> Any:
        if not self._interceptors:
            return invoke(details, request)
        from ._interceptors import intercepted_call

        # grpc.aio's interceptors get a Metadata, never None (they .add() to it, or +)
        details = details._replace(metadata=Metadata.from_tuple(details.metadata))  # type: ignore[arg-type]  # (pairs, not a Sequence)
        return intercepted_call(kind, self._interceptors, invoke, details, request, self.app.loop)

    async def _ensure_handle(self) -> int:
        if self._handle is not None:
            return self._handle
        async with self._lock:
            if self._closed:
                raise AioRpcError(StatusCode.CANCELLED, "the channel is closed")
            if self._handle is None:
                self._set_state(ChannelConnectivity.CONNECTING)
                try:
                    app = await self._follow_app()
                except RpcError as exc:  # no daemon (it is the local one that failed: no "failed to connect to <target>")
                    self._set_state(ChannelConnectivity.TRANSIENT_FAILURE)
                    raise AioRpcError(exc.code(), exc.details()) from None
                connecting = asyncio.ensure_future(app.call_async("connect", target=self.target))
                try:
                    reply = await asyncio.shield(connecting)  # (the connect goes on in its thread anyway)
                except RpcError as exc:
                    self._set_state(ChannelConnectivity.TRANSIENT_FAILURE)
                    raise connect_error(self.target, exc) from None
                except asyncio.CancelledError:  # (asyncio.wait_for's timeout): the late connection is nobody's
                    connecting.add_done_callback(self._drop_late_connection)
                    if not self._closed:
                        self._set_state(ChannelConnectivity.IDLE)
                    raise
                if self._closed:  # close() ran meanwhile: it found no connection to close
                    close_dropped_handle(self.app, reply["handle"])
                    raise AioRpcError(StatusCode.CANCELLED, "the channel is closed")
                self._handle = reply["handle"]
                self._listener = lost_listener(self)
                self.app.handle_listeners.setdefault(self._handle, []).append(self._listener)
                self._set_state(ChannelConnectivity.READY)
            return self._handle

    def _app_ended(self) -> bool:
        """The app is closed for good (its user closed it): no connection can come any more.
        One whose daemon went away is not: the next attempt carries on with its successor."""
        app = self.app
        return app.closed and not app.daemon_lost

    async def _follow_app(self) -> AioApp:
        """(channel lock held) The app to connect through: the channel's, or its successor
        when the daemon went away (RpcError UNAVAILABLE while none answers). The stubs'
        schemas go to the new session before the connection is made, so the daemons'
        handshake compares them."""
        app = self.app
        if not app.closed:
            return app
        new = app.successor()
        self._bind(new)
        app.wake_connect_waits()  # waits between attempts sleep on the old app's: look again
        for schema in list(self._schemas.values()):
            if id(schema) not in new._schemas:
                await new.loop.run_in_executor(None, new.ensure_schema, schema)
        return new

    def _drop_late_connection(self, connecting: "asyncio.Future[dict[str, Any]]") -> None:
        """The connect of an _ensure_handle that was cancelled: close what it made."""
        if not connecting.cancelled() and connecting.exception() is None:
            close_dropped_handle(self.app, connecting.result()["handle"])

    # -- grpc.aio's connectivity API ------------------------------------------------------
    def _set_state(self, state: ChannelConnectivity) -> None:
        if state is self._state:
            return
        self._state = state
        event, self._state_changed = self._state_changed, None
        if event is not None:
            event.set()  # wakes every wait_for_state_change; later ones make a new event

    def get_state(self, try_to_connect: bool = False) -> ChannelConnectivity:
        """grpc.aio.Channel.get_state: the channel's state now; `try_to_connect` connects
        in the background (retrying while the target cannot be reached) if it is not."""
        if try_to_connect and self._handle is None and not self._closed and (self._connector is None or self._connector.done()):
            task = self._connector = asyncio.ensure_future(self.channel_ready())  # one at a time, however often it is polled
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
        return self._state

    async def wait_for_state_change(self, last_observed_state: ChannelConnectivity) -> None:
        """grpc.aio.Channel.wait_for_state_change: until the state is not
        `last_observed_state` (bound it with asyncio.wait_for); UsageError once the
        channel is closed, as grpc.aio (a closed channel's state never changes again)."""
        if self._closed:
            raise UsageError("Channel is closed.")
        while self._state is last_observed_state:
            if self._state_changed is None:
                self._state_changed = asyncio.Event()
            await self._state_changed.wait()

    async def _wait_for_handle(self, deadline: wire.Deadline | None) -> int:
        """The connection for a wait_for_ready call (and channel_ready): while the target
        cannot be reached (UNAVAILABLE), try again, backing off to 1 s, until the call's
        deadline (DEADLINE_EXCEEDED then, as grpc.aio); other errors (a closed channel) are
        raised. Closing the channel or the app ends the wait between two attempts at once
        (_pause)."""
        delay = 0.05
        while True:
            try:
                return await self._ensure_handle()
            except RpcError as exc:
                if exc.code() is not StatusCode.UNAVAILABLE or self._app_ended():
                    raise  # (a closed app can never connect: waiting would last until the deadline)
            left = deadline.remaining() if deadline is not None else None
            if left == 0:
                raise AioRpcError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            task = asyncio.current_task()
            if task in _CANCEL_ASKED:  # the call was cancelled during the attempt
                raise asyncio.CancelledError()
            if task is not None:
                _BETWEEN_ATTEMPTS.add(task)
            try:
                await self._pause(delay if left is None else min(delay, left))
            finally:
                if task is not None:
                    _BETWEEN_ATTEMPTS.discard(task)
            delay = min(delay * 2, 1.0)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds` between two connection attempts, or less: the app's
        wake_connect_waits (its close, a channel's) ends it once this channel or the app
        is closed. (Cancelling the task ends it too.)"""
        app, loop = self.app, self.app.loop  # (one whose daemon went away too: closing the channel wakes it)
        end = loop.time() + seconds
        while not (self._closed or self._app_ended()):
            left = end - loop.time()
            if left <= 0:
                return
            fut = loop.create_future()
            timer = loop.call_later(left, _set_if_pending, fut)
            app.connect_waiters.add(fut)
            try:
                await fut
            finally:
                timer.cancel()
                app.connect_waiters.discard(fut)

    def _on_lost(self, details: str) -> None:
        self._handle = None
        if not self._closed:
            self._set_state(ChannelConnectivity.IDLE)

    def __del__(self) -> None:
        """Dropped without close(): free the daemon connection once its calls end."""
        handle = getattr(self, "_handle", None)
        if handle is not None and not self._closed:
            try:  # on the loop, where the calls' callbacks live
                self.app.loop.call_soon_threadsafe(close_dropped_handle, self.app, handle)
            except RuntimeError:
                pass  # the loop is closed: the app's close frees it

    async def channel_ready(self) -> None:
        """Until the channel is connected (grpc.aio's channel_ready: until READY). While
        the target cannot be reached (UNAVAILABLE) it tries again, backing off to 1 s, as
        grpc waits; bound it with asyncio.wait_for. Other errors (a malformed target, a
        closed channel) are raised."""
        await self._wait_for_handle(None)

    async def close(self, grace: float | None = None) -> None:
        """Close the channel (grpc.aio): calls still in flight after `grace` seconds are
        cancelled (awaiting them raises CancelledError; their servers see the connection
        close), and the channel takes no new calls."""
        self._closed = True
        self._set_state(ChannelConnectivity.SHUTDOWN)
        if self._connector is not None:
            self._connector.cancel()
        app = self.app
        app.wake_connect_waits()  # its wait_for_ready calls end now (CANCELLED)
        handle = self._handle
        if handle is not None and grace:
            end = app.loop.time() + grace
            while any(key[0] == handle for key in app.calls) and app.loop.time() < end:
                await asyncio.sleep(0.01)
        handle, self._handle = self._handle, None
        if handle is None:
            return
        listeners = app.handle_listeners.get(handle)
        if listeners is not None and self._listener in listeners:
            listeners.remove(self._listener)
        for key, sink in list(app.calls.items()):
            if key[0] == handle:
                sink.cancelled_locally = True  # grpc.aio: as if the application cancelled it
                sink.lost(StatusCode.CANCELLED, "Channel closed!")
        if not app.closed:
            try:
                await app.call_async("close", handle=handle)
            except RpcError:
                pass

    async def __aenter__(self) -> "Channel":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def insecure_channel(target: str, options: Any = None, compression: Any = None, interceptors: Sequence[Any] | None = None, *, app: AioApp | None = None) -> Channel:
    """Like grpc.aio.insecure_channel (options: grpc.max_send/receive_message_length,
    grpc.service_config's per-method timeout / waitForReady / retryPolicy (unary-unary
    and server-streaming calls) and retryThrottling, grpc.enable_retries)."""
    return Channel(target, app, options, interceptors)
