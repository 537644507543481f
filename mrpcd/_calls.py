"""Call bookkeeping shared by the sync and asyncio app libraries, sans-I/O.

Both halves keep the same state per call and make the same decisions about it; only how
they wait (threading.Condition vs asyncio.Event), how they send (blocking push vs
awaiting the loop) and where handlers run (thread pool vs tasks) differ. What is the
same lives here, once:

* `ClientCallCore`: a client call's receive side: applying RESPONSE records (initial and
  trailing metadata, status, details, the receive size limit), the message queue and the
  flow-control credit granted back, ending the call and running its callbacks.
* `ServerCallCore`: a server call's request side (request records, the receive limit,
  half-close, credit to grant back) and the START/END bookkeeping of its responses.
* `ContextCore`: the parts of grpc's ServicerContext that do no I/O.
* `ServerCore`: the handler registry, binding, and the routing of records to calls.
* `failure_status`: which status a handler's exception ends its call with.
* `MultiCallableCore`, `ChannelCore` and `connect_error`: a client stub method's
  encoding, size checks and first record, a channel's four factories, and the error a
  failed connect becomes.

The subclasses add the waiting and the sending; none of this module blocks or awaits.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast, final

from . import flow, wire
from .handlers import GenericRpcHandler, RpcMethodHandler
from .marshal import records as R
from .marshal._ringio import RingRecord
from .marshal.schema import method_id as _method_id
from .status import AbortError, RpcError, StatusCode, metadata_tuple

if TYPE_CHECKING:
    import asyncio

    from .marshal.message import Message

# A message at least this big is queued as a zero-copy view of the buffer its record was
# popped into (one copy saved); a smaller one as its own bytes (copying a few bytes costs
# no more than making the view, and a small message must not pin a whole batch buffer).
VIEW_MIN = 64 * 1024


@final  # (so `type(x) is Decoded` tells the type checker the rest is not one)
class Decoded:
    """A message the rx path already decoded, straight from the rx ring (see
    `message_of`): its value, or the exception the deserializer raised, which the reader
    gets when it takes the message, exactly as if it had decoded it there."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any, error: "Exception | None") -> None:
        self.value = value
        self.error = error

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def in_place_decoder(deserialize: "Callable[[Any], Any] | None") -> "Callable[[Any], Any] | None":
    """`deserialize` if it may be given memory that is only valid during the call (the
    generated FromString: it keeps nothing of its argument), else None."""
    return deserialize if getattr(deserialize, "__mrpc_inplace__", False) else None


def parts_serializer(serialize: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """The send path's version of `serialize`: for a generated SerializeToString, the one
    that returns big `bytes` fields by reference (a Parts, gathered straight into the tx
    ring: one copy); any other serializer as it is."""
    return getattr(serialize, "__mrpc_parts__", None) or serialize


def _decode_in_ring(rec: RingRecord, decode: Callable[[Any], Any]) -> Decoded:
    """Decode a message while its bytes are still in the rx ring. An exception is kept
    for the reader, without its traceback (whose frames would hold the ring view)."""
    try:
        return Decoded(rec.decode(decode), None)
    except Exception as exc:
        exc.__traceback__ = None
        if exc.__suppress_context__:
            exc.__context__ = None
        return Decoded(None, exc)


def message_of(rec: "R.Record | RingRecord", behind: bool, decode: "Callable[[Any], Any] | None" = None) -> "bytes | memoryview | Decoded":
    """The payload of a message record, to queue for the application.

    A big record the rx path left in the ring (a RingRecord: App.drain releases its ring
    space once the batch is dispatched) is decoded right here with `decode` (an
    `in_place_decoder`): its `bytes` fields are then the one copy out of shared memory.
    Without one (a grpc-style deserializer is promised `bytes`; a server whose
    interceptors have not yet chosen the handler) it is copied out as `bytes`.

    The view's lifetime rule (docs/INTERNALS.md "Records API"): a view pins the private,
    immutable buffer of the ring pop it came from, never the ring itself. `behind` (the
    reader has not taken the messages before this one) means it may sit in the queue for
    long: then the record gets a base of its own first (`own()`, the copy the old path
    always made), so a slow reader pins its messages, not whole batch buffers.
    """
    if type(rec) is RingRecord:
        if decode is not None:
            return _decode_in_ring(rec, decode)
        return rec.payload
    if rec.payload_len < VIEW_MIN:
        return rec.payload
    if behind:
        rec.own()
    return rec.payload_view

# -- client --------------------------------------------------------------------------------


class ClientCallCore:
    """One client call's state, registered in the app's dispatch table under (handle, call_id).

    `take()` applies a RESPONSE record from the rx driver; `end()` ends the call locally
    (cancel, deadline, lost connection). Subclasses wake their waiters in `_wake()`.
    """

    def __init__(self, app: Any, handle: int, call_id: int, deserialize: Callable[[Any], Any], max_receive: int, deadline: wire.Deadline | None) -> None:
        self.app = app
        self.handle = handle
        self.call_id = call_id
        self._deserialize = deserialize
        self._in_place = in_place_decoder(deserialize)
        self._max_receive = max_receive
        self.deadline = deadline
        self.messages: deque[tuple["bytes | memoryview | Decoded", int]] = deque()
        self.done = False
        self.got_initial = False
        self.cancelled_locally = False
        self.code = StatusCode.OK
        self.details = ""
        self.initial: list = []
        self.trailing: list = []
        self.callbacks: list[Callable[[], object]] = []  # (what they return is ignored)
        self._recv = flow.RecvWindow()
        self._credit = flow.SendCredit()
        app.calls[(handle, call_id)] = self

    def _wake(self) -> None:
        """Wake whoever waits on this call (the subclass's lock is held, if it has one)."""

    def take(self, rec: R.Record) -> bytes | None:
        """Apply one RESPONSE record. Returns a CANCEL record for the caller to send when
        the record's message is over the receive limit (the call has then ended with
        RESOURCE_EXHAUSTED), else None."""
        if self.done:
            return None
        flags = rec.flags
        if flags & (R.F_START | R.F_END):
            initial, trailing, details = wire.split_response_meta(rec)
            if flags & R.F_START:
                self.initial = initial
                self.got_initial = True
        if not flags & R.F_NO_MSG:
            n = rec.payload_len  # len(rec.payload) would materialise a copy
            if n > self._max_receive:
                err = wire.too_large("Received", n, self._max_receive)
                self.end(err.code(), err.details())
                return wire.cancel_record(self.handle, self.call_id)
            self.messages.append((message_of(rec, bool(self.messages), self._in_place), flow.cost(n, rec.meta_len)))
        if flags & R.F_END:
            self.trailing, self.details = trailing, details
            self.code = StatusCode.from_int(rec.status)
            self._finish()
        self._wake()
        return None

    def grant_credit(self, n: int) -> bool:
        """A WINDOW record's credit for the request stream; True if a blocked sender may go on."""
        if self._credit.grant(n):
            self._wake()
            return True
        return False

    def end(self, code: StatusCode, details: str) -> bool:
        """End the call locally; False if it had already ended.

        The messages still queued are dropped: the call failed here (cancel, deadline,
        lost connection, channel closed), and grpc raises at the next read, it does not
        hand out what it buffered first (thousands, a window's worth). Messages the
        server sent before its own error status are kept (take(): they came first)."""
        if self.done:
            return False
        self.code, self.details = code, details
        self.messages.clear()
        self._finish()
        self._wake()
        return True

    def unregister(self) -> None:
        """Stop routing records to this call (it ended, or its first record was never sent)."""
        self.app.calls.pop((self.handle, self.call_id), None)

    def _finish(self) -> None:
        self.done = True
        self.unregister()
        callbacks, self.callbacks = self.callbacks, []
        for cb in callbacks:  # run on whichever thread ended the call, as grpc does
            try:
                cb()
            except Exception as exc:  # logged, not raised into the thread that ended the call (grpc's words)
                _client_log.error("Exception in callback %s: %s", repr(cb), repr(exc))

    def pop_message(self) -> "tuple[bytes | memoryview | Decoded, bytes | None] | None":
        """The next message's payload and the WINDOW record to send for it (None: no
        grant due now); None when no message is queued."""
        if not self.messages:
            return None
        payload, size = self.messages.popleft()
        grant = 0 if self.done else self._recv.consume(size)
        return payload, (flow.window_record(self.handle, self.call_id, grant) if grant else None)

    def decode(self, payload: "bytes | memoryview | Decoded") -> Any:
        """The response message of a payload `pop_message` returned (raises what the
        deserializer raised, whether it ran now or on the rx path)."""
        if type(payload) is Decoded:
            return payload.result()
        return self._deserialize(payload)

    def credit_available(self) -> bool:
        return self._credit.available()

    def spend(self, n: int) -> None:
        self._credit.spend(n)

    def cancel_record(self) -> bytes:
        return wire.cancel_record(self.handle, self.call_id)

    def end_of_requests(self) -> wire.RecordParts:
        """The half-close record of the request stream."""
        return wire.request_parts(self.handle, self.call_id, 0, R.F_END, 0, (), None)

    def request_message(self, payload: bytes) -> wire.RecordParts:
        """A request-stream message record (after the first); spends its credit."""
        self._credit.spend(flow.cost(len(payload)))
        return wire.request_parts(self.handle, self.call_id, 0, 0, 0, (), payload)

    def deserialize_error(self, exc: Exception) -> tuple[StatusCode, str]:
        return StatusCode.INTERNAL, f"Exception deserializing response! {exc}"

    def make_error(self, cls: type[RpcError] = RpcError) -> RpcError:
        return cls(self.code, self.details, self.trailing, self.initial)


PREVIOUS_ATTEMPTS = "grpc-previous-rpc-attempts"  # A6: sent with each retry, as grpc does
PUSHBACK = "grpc-retry-pushback-ms"  # A6: a server's say on when (or whether) to retry


class RetryState:
    """One retried unary call's attempts, sans-I/O (gRFC A6), shared by the sync and
    asyncio libraries: after each attempt `next_delay` says whether to try again and
    after how long. The caller checks the call's deadline, cancellation and channel."""

    __slots__ = ("policy", "throttle", "attempts", "_backoffs")

    def __init__(self, policy: wire.RetryPolicy, throttle: wire.RetryThrottle | None) -> None:
        self.policy = policy
        self.throttle = throttle
        self.attempts = 0  # attempts started
        self._backoffs = 0  # backoffs since the start or the last server pushback

    def metadata(self, meta: list) -> list:
        """The metadata of the next attempt: the call's, plus grpc-previous-rpc-attempts
        on a retry (what A6 sends, so a server can tell a retry from a new call)."""
        n = self.attempts
        self.attempts = n + 1
        return meta if n == 0 else [*meta, (PREVIOUS_ATTEMPTS, str(n))]

    def next_delay(self, code: StatusCode, trailing: list, committed: bool) -> float | None:
        """After an attempt ended with `code` (and `trailing` metadata): the wait before
        the next attempt, or None when the call ends with this attempt's outcome. In A6's
        order: a success or a code not in retryableStatusCodes ends it; a retryable
        failure takes a throttle token (retries stop while the bucket is at or below
        half); a committed call (the server sent a response or initial metadata) or one
        out of attempts ends; the server's pushback (ms; negative or malformed: do not
        retry) replaces the backoff once and resets it."""
        throttle = self.throttle
        if code is StatusCode.OK:
            if throttle is not None:
                throttle.success()
            return None
        if code not in self.policy.codes:
            return None
        if throttle is not None and not throttle.failure():
            return None
        if committed or self.attempts >= self.policy.max_attempts:
            return None
        for key, value in trailing:
            if key == PUSHBACK:
                text = value if isinstance(value, str) else ""
                if not text.isdigit():
                    return None  # (a negative number or garbage: the server says do not retry)
                self._backoffs = 0
                return int(text) / 1000
        self._backoffs += 1
        return self.policy.backoff(self._backoffs)


class MultiCallableCore:
    """What a stub method does before any I/O: encode, check the send limit, build the
    record that opens the call."""

    _RETRIED = False  # its calls follow a retryPolicy (those with one request: no request stream to replay)

    def __init__(self, channel: Any, method: str, request_type: type[Message], response_type: type[Message]) -> None:
        self._channel = channel
        self._method = method
        self._method_id = _method_id(method)
        # grpc.service_config's timeout / waitForReady for this method (wire.method_defaults)
        self._config_timeout, self._config_wait = wire.method_default(getattr(channel, "_method_defaults", None) or {}, method)
        # its retryPolicy (wire.retry_config); None: calls take the path without retries
        retry = getattr(channel, "_retry", None)
        self._retry_policy: wire.RetryPolicy | None = retry.policy(method) if retry is not None and self._RETRIED else None
        self._encode = parts_serializer(request_type.SerializeToString)
        self._decode = response_type.FromString
        self._schemas = [request_type.__mrpc_schema__, response_type.__mrpc_schema__]

    def _payload(self, message: Any) -> Any:
        """The encoded request (bytes, or Parts for big bytes fields; len() is its size)."""
        payload = self._encode(message)
        limit = self._channel._max_send
        if len(payload) > limit:
            raise wire.too_large("Sent", len(payload), limit)
        return payload

    def _prepare(self, first: Any, timeout: float | None, metadata, unary: bool = True) -> tuple[list, bytes | None, int, wire.Deadline | None]:
        """(metadata pairs, first payload or None, wire deadline, local Deadline or None);
        raises on bad metadata or an oversized message before the call exists. `unary`:
        `first` is the call's one request, encoded even when it is None (the encoder's
        error, as for any wrong request; a call with no message would fail at the server
        as an empty 'Exception calling application'); else the request stream comes later."""
        timeout = self._timeout(timeout)
        meta = wire.check_metadata(metadata)
        payload = self._payload(first) if unary else None
        dl = wire.deadline_us(timeout)
        return meta, payload, dl, (wire.Deadline(dl) if timeout is not None else None)

    def _timeout(self, timeout: float | None) -> float | None:
        """The call's timeout: the sooner of its own and its service config's (grpc's rule)."""
        limit = self._config_timeout
        if limit is None or (timeout is not None and timeout <= limit):
            return timeout
        return limit

    def _wait_for_ready(self, wait_for_ready: bool | None) -> bool | None:
        """The call's wait_for_ready if it gave one (True or False), else its service config's."""
        return self._config_wait if wait_for_ready is None else wait_for_ready

    def _first_record(self, call: ClientCallCore, end: bool, dl: int, meta: list, payload: bytes | None) -> wire.RecordParts:
        flags = R.F_START | (R.F_END if end else 0)
        return wire.request_parts(call.handle, call.call_id, self._method_id, flags, dl, meta, payload)


class ChannelCore:
    """grpc's four channel factories; a channel class names its multi-callable classes."""

    _unary_unary: type
    _unary_stream: type
    _stream_unary: type
    _stream_stream: type

    def unary_unary(self, method: str, request_type: type[Message] | None = None, response_type: type[Message] | None = None, **kw: Any) -> Any:
        return self._unary_unary(self, method, *_message_types(method, request_type, response_type, kw))

    def unary_stream(self, method: str, request_type: type[Message] | None = None, response_type: type[Message] | None = None, **kw: Any) -> Any:
        return self._unary_stream(self, method, *_message_types(method, request_type, response_type, kw))

    def stream_unary(self, method: str, request_type: type[Message] | None = None, response_type: type[Message] | None = None, **kw: Any) -> Any:
        return self._stream_unary(self, method, *_message_types(method, request_type, response_type, kw))

    def stream_stream(self, method: str, request_type: type[Message] | None = None, response_type: type[Message] | None = None, **kw: Any) -> Any:
        return self._stream_stream(self, method, *_message_types(method, request_type, response_type, kw))


def _message_types(method: str, request_type: Any, response_type: Any, kw: dict) -> tuple[type[Message], type[Message]]:
    """The message classes of a multi-callable, or a TypeError that says what is wrong:
    a grpcio-generated `_pb2_grpc` stub passes protobuf (de)serializers, which cannot
    serve a daemon that needs the schema of mrpcd's generated classes."""
    for t in (request_type, response_type):
        if t is None or getattr(t, "__mrpc_schema__", None) is None:
            given = "request_serializer/response_deserializer (a grpcio-generated _pb2_grpc stub)" if kw.get("request_serializer") or kw.get("response_deserializer") \
                else f"{getattr(t, '__qualname__', repr(t))}"
            raise TypeError(f"{method}: an mrpcd channel needs the message classes of an mrpcd-stubgen module (x_mrpc.XStub); "
                            f"got {given}: generate the stubs with mrpcd-stubgen")
    return request_type, response_type


def lost_listener(channel: Any) -> Callable[[str], None]:
    """The app's lost-connection listener for `channel`, holding it weakly: the app's table
    must not keep a channel the application dropped alive (see close_dropped_handle)."""
    ref = weakref.ref(channel)

    def on_lost(details: str) -> None:
        ch = ref()
        if ch is not None:
            ch._on_lost(details)

    return on_lost


def close_dropped_handle(app: Any, handle: int) -> None:
    """A channel was garbage collected without close(): close its daemon connection once
    the calls still running on it have ended (grpc frees a channel's connection once
    nothing uses it), else every dropped channel keeps a connection in both daemons until
    the app exits. Run it where the calls' callbacks may be added (the sync library: any
    thread; asyncio: the loop); the close itself goes to a short thread of its own."""

    def close() -> None:
        app.handle_listeners.pop(handle, None)
        if not app.closed:
            try:
                app.call("close", handle=handle)
            except Exception:
                pass  # the daemon is gone: so is the connection

    def start_close() -> None:
        try:
            threading.Thread(target=close, name="mrpcd-channel-close", daemon=True).start()
        except RuntimeError:
            pass  # interpreter shutdown: the app's exit closes it

    pending = [sink for key, sink in list(app.calls.items()) if key[0] == handle]
    if not pending:
        start_close()
        return
    left = [len(pending)]
    lock = threading.Lock()

    def one_ended() -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            start_close()

    for sink in pending:
        add = getattr(sink, "add_callback", None)
        if add is not None:
            added = add(one_ended)
        elif not sink.done:
            sink.callbacks.append(one_ended)
            added = True
        else:
            added = False
        if not added:
            one_ended()


def connect_error(target: str, exc: RpcError) -> RpcError:
    """The error a channel's failed `connect` becomes (UNAVAILABLE unless the daemon said more)."""
    code = exc.code() if exc.code() is not StatusCode.UNKNOWN else StatusCode.UNAVAILABLE
    return RpcError(code, f"failed to connect to {target}: {exc.details()}")


# -- server --------------------------------------------------------------------------------


class BadRequest(Exception):
    """A request message did not decode."""


class SerializeError(Exception):
    """A response did not encode (the sync server reports it as grpc's does)."""


class TooLarge(Exception):
    """A request message was over the server's receive limit."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(error.details())
        self.error = error


class ServerCallCore:
    """One call's server side, without I/O: incoming request messages, the credit to grant
    back for them, and which flags its next response record carries."""

    def __init__(self, server: Any, rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        self.server = server
        self.app = server.app
        self.handle, self.call_id = rec.handle, rec.call_id
        self.path = path
        self.handler = handler
        self.metadata = tuple(wire.request_meta(rec))
        self.deadline = wire.Deadline(rec.deadline)
        self._messages: deque[tuple["bytes | memoryview | Decoded", int]] = deque()
        self._half_closed = False
        self.cancelled = False
        self.finished = False
        self.initial_sent = False
        self.too_large: RpcError | None = None
        # Until the server's interceptors have chosen the handler (in the handler's own
        # thread/task), the deserializer is not known: the rx path must not decode early.
        self.resolved = not server._interceptors
        self._credit = flow.SendCredit()
        self._recv = flow.RecvWindow()

    def _take(self, rec: R.Record) -> bool:
        """Apply one REQUEST record. True if its message is over the receive limit: the
        call has failed then (`too_large`), and the caller ends it at once.

        As in grpc, a message over the limit fails the call: nothing queued before it nor
        sent after it reaches the handler (it was skipped, and the handler read on)."""
        if self.too_large is not None:
            return False  # the call failed on an earlier message: the rest is not read
        if not rec.flags & R.F_NO_MSG:
            limit = self.server._max_receive
            n = rec.payload_len  # len(rec.payload) would materialise a copy
            if n > limit:
                self.too_large = wire.too_large("Received", n, limit)
                self._half_closed = True
                self._messages.clear()
                return True
            decode = in_place_decoder(self.handler.request_deserializer) if self.resolved else None
            self._messages.append((message_of(rec, bool(self._messages), decode), flow.cost(n, rec.meta_len)))
        if rec.flags & R.F_END:
            self._half_closed = True
        return False

    def too_large_status(self) -> tuple[StatusCode, str]:
        """What the client is told when a request was over the limit."""
        err = cast(RpcError, self.too_large)  # asked once _take said the message was over the limit
        return err.code(), err.details()

    def is_active(self) -> bool:
        return not (self.cancelled or self.finished)

    def _pop_request(self) -> "tuple[bytes | memoryview | Decoded, bytes | None]":
        """The next request payload (one must be queued) and the WINDOW record due for it."""
        payload, size = self._messages.popleft()
        grant = 0 if self._half_closed else self._recv.consume(size)
        return payload, (flow.window_record(self.handle, self.call_id, grant) if grant else None)

    def _resolved(self, handler: RpcMethodHandler) -> None:
        """The interceptors chose `handler`: from now on the rx path may decode with it."""
        self.handler = handler
        self.resolved = True

    def _decode(self, payload: "bytes | memoryview | Decoded") -> Any:
        h = self.handler
        if type(payload) is Decoded:  # decoded on the rx path with this handler's deserializer
            try:
                return payload.result()
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        if type(payload) is not bytes and (h.request_type is None or h.request_deserializer != h.request_type.FromString):
            payload = bytes(payload)  # a grpc-style deserializer is promised bytes, as in grpc
        try:
            return h.request_deserializer(payload)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def _flags(self, flags: int) -> int:
        """Flags for the next response record: START on the first, and an END finishes the call."""
        if not self.initial_sent:
            flags |= R.F_START
            self.initial_sent = True
        if flags & R.F_END:
            self.finished = True
        return flags

    def _unsent(self, flags: int) -> None:
        """The record `_flags` gave `flags` to never went out (the app's send refused it,
        e.g. over max_record with its header): undo what `_flags` noted, so the error status
        that follows still opens and ends the call instead of being skipped as a second END."""
        if flags & R.F_START:
            self.initial_sent = False
        if flags & R.F_END:
            self.finished = False

    def _record(self, flags: int, payload: bytes | None, ctx: "ContextCore", code: StatusCode, details: str) -> wire.RecordParts:
        try:
            return wire.response_parts(self.handle, self.call_id, flags, payload, ctx._initial, code, details, ctx._trailing)
        except R.RecordError as exc:
            # Initial + trailing metadata + details over MAX_META (each was checked alone):
            # the call must still end, as grpc's does (RESOURCE_EXHAUSTED), not go unanswered.
            err = RpcError(StatusCode.RESOURCE_EXHAUSTED, f"response metadata too large: {exc}")
            if not flags & R.F_END:
                raise err from None  # the handler's send fails; its END comes here again
            return wire.response_parts(self.handle, self.call_id, flags, None, (), err.code(), err.details(), ())

    def _expired_record(self) -> bytes:
        """DEADLINE_EXCEEDED from the server itself (the client may not have noticed yet)."""
        return self._end_record(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _end_record(self, code: StatusCode, details: str) -> bytes:
        """A status from the server library itself, ending a call its handler never ended
        (deadline passed, server stopped)."""
        return wire.response_record(self.handle, self.call_id, R.F_END | (0 if self.initial_sent else R.F_START), None, code=code, details=details)


# What the client of a call still running when its server stops gets (grpc: UNAVAILABLE).
SERVER_STOPPED = (StatusCode.UNAVAILABLE, "Cancelling all calls: the server stopped")


class ContextCore:
    """The I/O-free part of grpc's ServicerContext, for both servers."""

    def __init__(self, call: ServerCallCore) -> None:
        self._call = call
        self._code: StatusCode | None = None
        self._details = ""
        self._initial: list = []
        self._trailing: list = []

    def invocation_metadata(self) -> tuple:
        return metadata_tuple(self._call.metadata)

    def peer(self) -> str:
        return f"mrpcd:{self._call.handle}"

    def method(self) -> str:
        return self._call.path

    def time_remaining(self) -> float | None:
        return self._call.deadline.remaining()

    def is_active(self) -> bool:
        return self._call.is_active()

    def _set_initial(self, metadata) -> None:
        if self._call.initial_sent:
            raise ValueError("initial metadata was already sent")
        self._initial = wire.check_metadata(metadata)

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = wire.check_metadata(metadata)

    def trailing_metadata(self) -> tuple:
        return metadata_tuple(self._trailing)

    def set_code(self, code: StatusCode | int) -> None:
        self._code = wire.coerce_code(code)

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def _abort(self, code: StatusCode | int, details: str) -> AbortError:
        """Record the abort status; the caller raises what this returns."""
        code = wire.coerce_code(code)
        if code is StatusCode.OK:
            raise ValueError("abort() needs a non-OK status code")
        self._code, self._details = code, details
        return AbortError(details)

    def _final_code(self) -> StatusCode:
        return self._code or StatusCode.OK

    # grpc's transport-security and compression knobs: the daemon owns transport and
    # security (its TLS config) here, so these answer as grpc does for an insecure
    # channel without compression, rather than fail a handler ported from grpc.
    def auth_context(self) -> dict:
        return {}

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def set_compression(self, compression: Any) -> None:
        pass

    def disable_next_message_compression(self) -> None:
        pass


_server_log = logging.getLogger("mrpcd.server")
# After a daemon restart, a server looks for the new daemon after this long, then twice as
# long each time up to REJOIN_MAX_S (a refused connect to a unix socket costs microseconds).
REJOIN_FIRST_S = 0.05
REJOIN_MAX_S = 2.0
# What a rejoin attempt tries again after: no daemon yet, the address not free yet, or a
# limit of the new daemon (another app of the uid may leave). Any other refusal (e.g. a
# schema the new daemon refuses) stays: the server terminates and says why.
_REJOIN_RETRY = (StatusCode.UNAVAILABLE, StatusCode.RESOURCE_EXHAUSTED)
_client_log = logging.getLogger("mrpcd.channel")


def log_failure(exc: Exception, path: str) -> None:
    """Log a handler's unexpected exception with its traceback, as grpc does ('Exception
    calling application'): the client sees only the status, and without this the server
    would leave no trace of the bug. An abort or a request over the limit is no bug."""
    if not isinstance(exc, (AbortError, TooLarge)):
        _server_log.error("Exception calling application %s: %s", path, exc, exc_info=exc)


def failure_status(exc: Exception, ctx: ContextCore) -> tuple[StatusCode, str]:
    """The status a call ends with when its handler (or the library on its behalf) raised."""
    if isinstance(exc, TooLarge):
        return exc.error.code(), exc.error.details()
    if isinstance(exc, BadRequest):
        return StatusCode.INTERNAL, f"Exception deserializing request! {exc}"
    if isinstance(exc, SerializeError):
        return StatusCode.INTERNAL, f"Exception serializing response! {exc}"
    if isinstance(exc, AbortError):
        return ctx._code or StatusCode.UNKNOWN, ctx._details
    if isinstance(exc, RpcError):  # e.g. the handler's own outgoing call failed, or a size limit
        if exc.code() is StatusCode.RESOURCE_EXHAUSTED and ctx._code in (None, StatusCode.OK):
            return exc.code(), exc.details()
        return ctx._code or StatusCode.UNKNOWN, ctx._details or f"Exception calling application: {exc}"
    if ctx._code not in (None, StatusCode.OK):
        return ctx._code, ctx._details
    return StatusCode.UNKNOWN, f"Exception calling application: {exc}"


class ServerCore:
    """Handler registry, binding and record routing shared by both servers.

    A subclass provides `_admit(rec, path, handler)` (create, register and start a call),
    `_reply_nowait(data)` (send from the rx path without blocking) and `_stopped` (an
    Event of either kind).
    """

    _interceptor_base: type = object
    _interceptor_name = ""
    # the subclass's (above)
    _stopped: threading.Event | asyncio.Event
    _reply_nowait: Callable[[bytes], None]
    _admit: Callable[[R.Record, str, RpcMethodHandler], None]

    def _init_core(self, app: Any, interceptors: Any, options: Any, maximum_concurrent_rpcs: int | None = None) -> None:
        if maximum_concurrent_rpcs is not None and (type(maximum_concurrent_rpcs) is not int or maximum_concurrent_rpcs < 1):
            raise ValueError(f"maximum_concurrent_rpcs must be a positive int or None, got {maximum_concurrent_rpcs!r}")
        self._max_concurrent = maximum_concurrent_rpcs
        self.app = app
        self._options = options
        self._max_send, self._max_receive = wire.message_limits(options, app.max_record)
        self._interceptors = tuple(interceptors or ())
        for i in self._interceptors:
            if not isinstance(i, self._interceptor_base):
                raise TypeError(f"{type(i).__name__} is not a {self._interceptor_name}")
        self._methods: dict[int, tuple[str, RpcMethodHandler]] = {}
        self._generic: list[GenericRpcHandler] = []
        self._addresses: list[str] = []
        self._calls: dict[tuple[int, int], Any] = {}
        self._started = False
        # Serving again after a daemon restart (rejoin): a loop runs at a time; the app it
        # is re-registering with and the addresses that app does not listen at yet
        self._rejoin_lock = threading.Lock()
        self._follow_lock = threading.Lock()
        self._rejoining = False
        self._rejoin_app: Any = None
        self._rejoin_left: list[str] = []
        self._rejoin_failures = 0

    def add_generic_rpc_handlers(self, handlers) -> None:
        handlers = list(handlers)
        for generic in handlers:  # all checked before any is added
            if not isinstance(generic, GenericRpcHandler):
                raise TypeError(f"{type(generic).__module__}.{type(generic).__qualname__} is not an mrpcd generic handler: "
                                "serve services generated by mrpcd-stubgen (add_XServicer_to_server) or built with "
                                "mrpcd.method_handlers_generic_handler; grpcio's own (grpcio-generated _pb2_grpc modules, "
                                "grpc_health, grpc_reflection) cannot be served by mrpcd")
        app = self.app
        for generic in handlers:
            if generic.schema is not None and not app.closed:  # (else registered once a daemon answers: _follow)
                app.ensure_schema(generic.schema)
            self._generic.append(generic)
            self._methods.update(generic.by_id)
        for address in self._addresses:  # ports added before these handlers learn of them
            app.call("bind", address=address, services=self._services())

    # -- serving again after a daemon restart ---------------------------------------------
    def _start_rejoin(self) -> bool:
        """(App.close of an app whose daemon went away) True if the caller is to start the
        rejoin loop; False if one runs already (it sees the app closed and goes on)."""
        with self._rejoin_lock:
            if self._rejoining:
                return False
            self._rejoining = True
            return True

    def _rejoin_done(self) -> bool:
        """(the rejoin loop, after a rejoin() that finished) True: the loop ends. False: the
        app it joined closed meanwhile (its daemon went away again), go on."""
        with self._rejoin_lock:
            if self.app.closed and not self._stopped.is_set():
                return False
            self._rejoining = False
            return True

    def _rejoin_waits(self) -> Iterator[float]:
        """The rejoin loop's attempts, shared by both servers (each waits its own way, a
        thread on an Event or a task on the loop, for the delays this yields; stop() ends
        a wait at once): attempt, then back off from REJOIN_FIRST_S doubling to
        REJOIN_MAX_S while the daemon is not back; done once rejoined (or stopped, or
        given up), unless the app it joined closed meanwhile."""
        delay = REJOIN_FIRST_S
        while True:
            if self._stopped.is_set() or self.rejoin() is None:
                if self._rejoin_done():
                    return
                delay = REJOIN_FIRST_S
                continue
            yield delay
            delay = min(delay * 2, REJOIN_MAX_S)

    def rejoin(self) -> "RpcError | None":
        """One attempt to serve again through the app's successor after the daemon went
        away: a new session, the handlers' schemas, then each address the server listened
        at (its actual port, so clients reconnect to where it was). None: done (serving, or
        given up on an error no retry can fix: the server terminates). An error of
        _REJOIN_RETRY: try again later (the addresses bound already are not bound twice)."""
        try:
            self._follow()
        except RpcError as exc:
            if exc.code() not in _REJOIN_RETRY:
                self._give_up(exc)
                return None
            from .app import DaemonUnavailable

            self._rejoin_failures += 1
            if not isinstance(exc, DaemonUnavailable) and self._rejoin_failures & (self._rejoin_failures - 1) == 0:
                # mrpcd is back, yet it refuses (the 1st, 2nd, 4th, ... time): say why
                joined = self._rejoin_app
                where = f" at {self._rejoin_left[0]}" if self._rejoin_left and joined is not None and not joined.closed else ""
                _server_log.warning("mrpcd is back but the server cannot serve%s again yet: %s (%s); trying again",
                                    where, exc.details(), exc.code().name)
            return exc
        if self._addresses:
            _server_log.info("serving again at %s after mrpcd restarted", ", ".join(self._addresses))
        self._rejoin_failures = 0
        return None

    def _follow(self) -> Any:
        """(the app closed with daemon_lost) Move to the app's successor: the handlers'
        schemas, then each address the server listened at, bound again there. Raises what
        the daemon (or its absence) says; what was done stays done for the next try."""
        with self._follow_lock:  # (the rejoin loop, and an add_insecure_port at the same time)
            new = self.app.successor()
            if self._rejoin_app is not new:
                for generic in self._generic:
                    if generic.schema is not None:
                        new.ensure_schema(generic.schema)
                self._rejoin_app, self._rejoin_left = new, list(self._addresses)
                self._max_send, self._max_receive = wire.message_limits(self._options, new.max_record)  # (this daemon's)
                self.app = new
                new.servers.append(self)  # before its listeners: no call finds it missing
            while self._rejoin_left:
                new.call("bind", address=self._rejoin_left[0], services=self._services())
                self._rejoin_left.pop(0)
            return new

    def _give_up(self, error: RpcError) -> None:
        """The server cannot serve again after a daemon restart: it terminates (the
        subclass ends its calls and wakes wait_for_termination), and says why."""
        _server_log.error("the server cannot serve again after mrpcd restarted: %s (%s); it terminates",
                          error.details(), error.code().name)

    def _services(self) -> list[str]:
        return sorted({g.service_name for g in self._generic})

    def add_insecure_port(self, address: str) -> int:
        """Bind through the daemon; returns the port (useful with ":0")."""
        app = self.app
        if app.closed and app.daemon_lost:  # no daemon when the server was made, or it restarted since
            app = self._follow()
        reply = app.call("bind", address=address, services=self._services())
        actual = reply["address"]
        self._addresses.append(actual)
        return int(actual.rpartition(":")[2])

    def add_secure_port(self, address: str, credentials: Any = None) -> int:
        # Security between hosts is the daemon's job (its TLS config), not the app's.
        return self.add_insecure_port(address)

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
        live = self._calls.get(key)
        if live is not None:
            # Call ids are unique per connection: a second START of a call still going is
            # the peer's protocol error. Admitted, it would take the first call's place in
            # _calls, where its handler is found by END, CANCEL and a lost connection:
            # orphaned, that handler would hold its worker for good. The call ends here.
            live.cancel(status=(StatusCode.INTERNAL, f"mrpcd: the peer started call {rec.call_id} twice"))
            return True
        entry = self._methods.get(rec.method_id)
        if entry is None:
            return False
        if not self._started or self._stopped.is_set():
            self._reply_nowait(wire.response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.UNAVAILABLE, details="server is not serving"))
            return True
        if self._max_concurrent is not None and len(self._calls) >= self._max_concurrent:
            # grpc's maximum_concurrent_rpcs: a call over the limit is refused at once (the
            # rest of its request stream finds no call and is dropped)
            self._reply_nowait(wire.response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.RESOURCE_EXHAUSTED, details="Concurrent RPC limit exceeded!"))
            return True
        try:
            self._admit(rec, *entry)
        except R.RecordError as exc:  # its metadata does not decode: the daemons pass it on as the peer wrote it
            self._reply_nowait(wire.response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.INTERNAL,
                                                    details=f"mrpcd: malformed request: {exc}"))
        return True

    def handle_lost(self, handle: int) -> None:
        for key, call in list(self._calls.items()):
            if key[0] == handle:
                call.cancel()

    def _serialize(self, handler: RpcMethodHandler, response: Any) -> bytes:
        payload = self._encode_response(handler, response)
        if len(payload) > self._max_send:
            raise wire.too_large("Sent", len(payload), self._max_send)
        return payload

    def _encode_response(self, handler: RpcMethodHandler, response: Any) -> Any:
        """The encoded response (bytes, or Parts for big bytes fields; len() is its size);
        a response the serializer refuses (None, another type) is SerializeError: INTERNAL
        "Exception serializing response!" for the client, from either server."""
        try:
            return parts_serializer(handler.response_serializer)(response)
        except Exception as exc:
            raise SerializeError(str(exc)) from None
