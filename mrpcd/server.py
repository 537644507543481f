"""Sync server side, shaped like grpcio: `server(ThreadPoolExecutor(...))`, servicers, context.

The app's rx driver routes request records here. Handlers run on the application's thread
pool, as in grpc's sync server, with one exception for speed: a unary call with its
request complete runs on the rx thread itself, which hands its role to a new thread if
the handler blocks (run_inline; docs/INTERNALS.md "Sync server threads"). At most
max_workers handlers run at once either way. Handlers see a `ServicerContext` with grpc's
methods (metadata, deadline, abort, status, cancellation callbacks). A call ends for the
handler (is_active() False, callbacks run) when the client cancels or dies, or when its
deadline passes; in the last case the server itself answers DEADLINE_EXCEEDED, as grpc
does. Response streams wait for the client's credit (mrpcd.flow), so a slow client
pauses a streaming handler inside its `yield` instead of growing buffers.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence, cast

from . import flow, wire
from ._calls import SERVER_STOPPED, ContextCore, ServerCallCore, ServerCore, TooLarge, failure_status, log_failure
from .app import App, default_app, require_app
from .deadlines import DeadlineHeap as _Deadlines
from .handlers import HandlerCallDetails, RpcMethodHandler
from .interceptors import ServerInterceptor, resolve_handler
from .marshal import records as R
from .status import RpcContext, RpcError, StatusCode, metadata_tuple

log = logging.getLogger("mrpcd.server")


class _ServerCall(ServerCallCore):
    """One call's server side (mrpcd._calls): incoming messages, cancellation, and the
    response path. State changes happen with `_cond` held."""

    def __init__(self, server: "Server", rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        super().__init__(server, rec, path, handler)
        self._cond = threading.Condition()
        self.expired = False
        self._callbacks: list[Callable[[], None]] = []
        self.timed = False  # counted by the server's _Deadlines until the call ends
        self._take(rec)

    def deliver(self, rec: R.Record) -> None:
        with self._cond:
            over = self._take(rec)
            self._cond.notify_all()
        if over:  # the call failed: the client hears it now, the handler at its next read
            self.cancel(status=self.too_large_status())

    def grant(self, n: int) -> None:
        with self._cond:
            if self._credit.grant(n):
                self._cond.notify_all()

    def cancel(self, expired: bool = False, status: "tuple[StatusCode, str] | None" = None) -> None:
        """The call is over for the handler: client cancel, lost peer, deadline, or the
        server stopping (`status`: what the client is told, since it is still there)."""
        with self._cond:
            if self.cancelled or self.finished:
                return
            self.cancelled = True
            self.expired = expired
            self._messages.clear()  # the handler's next read raises; nobody takes these
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
            if expired:  # the client may not have noticed yet (clock skew, lost CANCEL): tell it
                status = (StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            record = None if status is None else self._end_record(*status)
        self.server._forget(self)
        if record is not None:
            # never waits for ring room (the deadline thread, the rx thread call this) and
            # never lost: the client would wait for its deadline, or for ever without one
            self.app.send_control(record)
        for cb in callbacks:
            try:
                cb()
            except Exception:
                pass

    def run_end_callbacks(self) -> None:
        """The handler is done (the call answered or failed): run the callbacks a cancel
        has not run already (grpc's add_callback: 'called on RPC termination')."""
        with self._cond:
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("server call callback failed")

    def next_request(self) -> Any:
        with self._cond:
            while not self._messages and not self._half_closed and not self.cancelled:
                self._cond.wait(1.0)
            if self.too_large is not None:
                raise TooLarge(self.too_large)
            if self.cancelled:  # before what is queued: grpc raises at the next read
                raise _Cancelled()
            if not self._messages:
                raise StopIteration
            payload, window = self._pop_request()
        if window is not None:
            self.app.send_control(window)  # a lost grant would stall the request stream for good
        return self._decode(payload)

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
            flags = self._flags(flags)
        if flags & R.F_END:
            self.server._forget(self)
        try:
            self.app.send(self._record(flags, payload, ctx, code, details), self.deadline.remaining() if self.deadline.at else 30.0)
        except BaseException:
            with self._cond:
                self._unsent(flags)
            raise


class _Cancelled(RpcError):
    """What a cancelled call's request iterator raises in its handler: an RpcError
    (CANCELLED), as grpc's does, so handlers that catch grpc.RpcError to clean up port."""

    def __init__(self) -> None:
        super().__init__(StatusCode.CANCELLED, "Cancelled")


class ServicerContext(ContextCore):
    """What a handler sees of its call; method names and meaning follow grpc.ServicerContext."""

    _call: _ServerCall

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run `callback` when the call ends (answered, failed, cancelled or expired), as
        grpc does; False if it already ended."""
        call = self._call
        with call._cond:
            if call.cancelled or call.finished:
                return False
            call._callbacks.append(callback)
            return True

    def cancel(self) -> None:
        """Cancel the call: the handler sees it end, and so does the client (CANCELLED)."""
        self._call.cancel(status=(StatusCode.CANCELLED, "Cancelled"))

    def send_initial_metadata(self, metadata) -> None:
        self._set_initial(metadata)
        self._call.send(0, None, self)

    def abort(self, code: StatusCode | int, details: str = "") -> None:
        raise self._abort(code, details)

    def abort_with_status(self, status: Any) -> None:
        self._trailing = wire.check_metadata(getattr(status, "trailing_metadata", ()) or ())
        self.abort(status.code, status.details)


RpcContext.register(ServicerContext)


class Server(ServerCore):
    """Serves generic handlers through the local daemon: `add_insecure_port`, `start`, `stop`."""

    POOL_AFTER_BLOCK = 1.0  # seconds of pool-only dispatch after a handler blocked the rx thread
    INLINE_BUDGET = 0.02  # seconds of handlers the rx thread runs per batch before the pool helps

    _interceptor_base = ServerInterceptor
    _interceptor_name = "mrpcd.ServerInterceptor"

    def __init__(
        self,
        thread_pool: ThreadPoolExecutor | None = None,
        handlers: Any = None,
        *,
        app: App | None = None,
        max_workers: int = 16,
        interceptors: Sequence[ServerInterceptor] | None = None,
        options: Any = None,
        maximum_concurrent_rpcs: int | None = None,
    ) -> None:
        require_app(app, False, "mrpcd.server")
        app = app or default_app()
        self._init_core(app, interceptors, options, maximum_concurrent_rpcs)
        self._pool = thread_pool or ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mrpcd-server")
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # no new calls
        self._terminated = threading.Event()  # stopped: the calls in flight are over too
        self._idle = threading.Condition(self._lock)
        self._deadlines = _Deadlines()
        self._queue: deque[_ServerCall] = deque()  # admitted calls no runner has taken yet
        self._inline: deque[_ServerCall] = deque()  # unary calls the rx thread runs after its batch
        self._pool_only_until = 0.0  # after a handler blocked on the rx thread: the pool only
        self._runners = 0
        self._max_runners = max(1, int(getattr(self._pool, "_max_workers", max_workers) or max_workers))
        self.app.servers.append(self)
        if handlers:
            self.add_generic_rpc_handlers(handlers)

    def start(self) -> None:
        self._started = True

    def _reply_nowait(self, data: bytes) -> None:
        self.app.send_control(data)

    def _admit(self, rec: R.Record, path: str, handler: RpcMethodHandler) -> None:
        call = _ServerCall(self, rec, path, handler)
        # a unary call with its request complete, seen on the rx thread: run it there once
        # the batch is dispatched (run_inline), no thread switch
        inline = (call._half_closed and not handler.request_streaming and not handler.response_streaming
                  and not self._interceptors and self.app.on_rx_thread() and time.monotonic() >= self._pool_only_until)
        with self._lock:
            self._calls[(rec.handle, rec.call_id)] = call
            if inline:
                self._inline.append(call)
                spawn = False
            else:
                self._queue.append(call)
                spawn = self._runners < self._max_runners
                if spawn:
                    self._runners += 1
        self._deadlines.add(call)
        if call.too_large is not None:  # its first message was over the limit: no handler runs
            call.cancel(status=call.too_large_status())
        if spawn and not self._spawn_runner():
            self._refuse(call)

    def run_inline(self) -> None:
        """(on the rx thread, after a batch) Run the unary calls _admit kept for this thread.

        Why: handing each call to a pool thread costs a thread switch and a GIL hand-off
        per call, the largest cost of a small sync RPC (measured at 32 B c=128: ~9,100 RPC/s
        through pool threads, 14,900-18,100 with the handlers on the rx thread). A handler
        that blocks is no reason to stall the app: waiting inside the library hands the rx
        role to a new thread at once (App.about_to_block), any other wait longer than
        InlineWatchdog.LIMIT by the watchdog; then the calls still kept here go to the pool
        and, for POOL_AFTER_BLOCK seconds, every call does (rx_handed_off). Quick handlers
        that add up run here for INLINE_BUDGET per batch at most, then the pool takes the
        rest, so records behind them in the ring do not wait for long. A handler here
        takes one of the max_workers slots, as a runner does: no more handlers run at once
        than the application's pool allows."""
        app, kept, lock = self.app, self._inline, self._lock
        until = time.monotonic() + self.INLINE_BUDGET
        while True:
            with lock:
                if not kept or not app.on_rx_thread():
                    return
                # every slot busy (they wait in the queue), or the budget is spent (the ring
                # waits too): the rest go to the pool
                if self._runners >= self._max_runners or time.monotonic() >= until:
                    spawn = self._kept_to_pool()
                    break
                call = kept.popleft()
                self._runners += 1
            seq = app.inline_begin()
            try:
                self._run(call)
            finally:
                app.inline_end(seq)
                with lock:
                    self._runners -= 1
                    spawn = bool(self._queue) and self._runners < self._max_runners
                    if spawn:
                        self._runners += 1
                if spawn:  # calls queued while this slot was taken: nobody else may run them
                    self._spawn_runner()  # (False: the pool is shut down; stop() cancels them)
        for _ in range(spawn):
            self._spawn_runner()

    def rx_handed_off(self) -> None:
        """A handler blocked on the rx thread: its other kept calls go to the pool, and so
        do new ones for a while (handlers here are not all quick)."""
        self._pool_only_until = time.monotonic() + self.POOL_AFTER_BLOCK
        with self._lock:
            spawn = self._kept_to_pool()
        for _ in range(spawn):
            self._spawn_runner()

    def _kept_to_pool(self) -> int:
        """(lock held) Move the calls kept for the rx thread to the pool's queue; returns
        how many runners to start for them (their slots are counted already)."""
        kept = self._inline
        spawn = max(0, min(len(kept), self._max_runners - self._runners))
        self._queue.extend(kept)
        kept.clear()
        self._runners += spawn
        return spawn

    def _spawn_runner(self) -> bool:
        """Submit one runner (its slot already counted); False if the executor is shut down."""
        try:
            self._pool.submit(self._runner)
            return True
        except RuntimeError as exc:
            with self._lock:
                self._runners -= 1
            log.error("the server's thread pool refused work (%s): calls that need it are answered UNAVAILABLE", exc)
            return False

    def _refuse(self, call: _ServerCall) -> None:
        """Nobody can run this call: answer it now rather than leave the client to its deadline."""
        with self._lock:
            try:
                self._queue.remove(call)
            except ValueError:
                return  # a runner took it after all
        call.finished = True
        self._forget(call)
        self.app.send_control(wire.response_record(call.handle, call.call_id, R.F_START | R.F_END, None,
                                               code=StatusCode.UNAVAILABLE, details="the server's thread pool is shut down"))

    def _runner(self) -> None:
        """One pool task that runs queued calls until none is left.

        Why not one pool task per call: a task is a Future, a work item and a Condition,
        and the pool wakes a worker thread for each; under load a runner that just
        finished a handler takes the next call itself, with no thread switch. At most
        max_workers runners exist, so as many handlers run at once as with a task per
        call, and the executor the application passed is the one that runs them."""
        queue = self._queue
        while True:
            with self._lock:
                if not queue:
                    self._runners -= 1
                    return
                call = queue.popleft()
            try:
                self._run(call)
            except BaseException:  # _run handles Exception; keep the count right anyway
                with self._lock:
                    self._runners -= 1
                raise

    def _forget(self, call: _ServerCall) -> None:
        with self._lock:
            self._calls.pop((call.handle, call.call_id), None)
            if not self._calls:
                self._idle.notify_all()
        self._deadlines.discard(call)

    def _run(self, call: _ServerCall) -> None:
        ctx = ServicerContext(call)
        try:
            if call.cancelled:  # while it waited for a runner: grpc does not start its handler
                return
            if call.deadline.expired():
                call.cancel(expired=True)
                return
            handler = call.handler
            if self._interceptors:
                handler = resolve_handler(self._interceptors, HandlerCallDetails(call.path, metadata_tuple(call.metadata)), handler)
                if handler is None:
                    call.send(R.F_END, None, ctx, StatusCode.UNIMPLEMENTED, "Method not found!")
                    return
                call._resolved(handler)
            request = call.request_iterator() if handler.request_streaming else call.next_request()
            if handler.response_streaming:
                for response in handler.behavior(request, ctx):
                    if not call.is_active():
                        break
                    call.send(0, self._serialize(handler, response), ctx)
                if call.is_active():
                    call.send(R.F_END, None, ctx, ctx._final_code(), ctx._details)
            else:
                response = handler.behavior(request, ctx)
                code = ctx._final_code()
                payload = self._serialize(handler, response) if code is StatusCode.OK else None
                call.send(R.F_END, payload, ctx, code, ctx._details)
        except _Cancelled:
            pass
        except Exception as exc:
            log_failure(exc, call.path)
            try:
                call.send(R.F_END, None, ctx, *failure_status(exc, ctx))
            except RpcError:
                pass  # the app's link to the daemon is gone: nobody is left to tell
        finally:
            if not call.finished and not call.cancelled:
                call.finished = True
                self._forget(call)
            if call._callbacks:  # grpc runs them on termination, not only on cancellation
                call.run_end_callbacks()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop taking calls; running ones get `grace` seconds, then are cancelled.

        As in grpc, with a grace this returns at once (a handler may stop its own server
        and still answer): the Event it returns is set once the server has stopped. The
        grace runs in a non-daemon thread, so a program that exits right after stop()
        still gives its calls their grace, as with grpc."""
        self._stopped.set()
        done = threading.Event()

        def finish() -> None:
            if grace:
                with self._lock:
                    self._idle.wait_for(lambda: not self._calls, grace)
            self._cancel_all(SERVER_STOPPED)  # the clients are still there: tell them, as grpc does
            done.set()
            self._terminated.set()

        if grace:
            threading.Thread(target=finish, name="mrpcd-server-stop").start()
        else:
            finish()
        return done

    def _cancel_all(self, status: "tuple[StatusCode, str] | None") -> None:
        self._cancel_calls(status)
        self._deadlines.close()

    def _cancel_calls(self, status: "tuple[StatusCode, str] | None") -> None:
        with self._lock:
            calls = list(self._calls.values())
        for call in calls:
            call.cancel(status=status)

    def app_closed(self) -> None:
        """The app left the daemon (App.close): no call can be answered any more; cancel
        them for their handlers. Closed by its user, the server terminates; left by a
        daemon that went away, it serves on once the daemon is back (rejoin)."""
        if self.app.daemon_lost and not self._stopped.is_set():
            self._cancel_calls(None)
            if self._start_rejoin():
                threading.Thread(target=self._rejoin_loop, name="mrpcd-server-rejoin", daemon=True).start()
            return
        self._stopped.set()
        self._cancel_all(None)
        self._terminated.set()

    def _rejoin_loop(self) -> None:
        """(own thread) Wait for the daemon to come back, then serve again through the
        app's successor; a server that cannot (its address is taken now) terminates."""
        for delay in self._rejoin_waits():
            cast(threading.Event, self._stopped).wait(delay)

    def _give_up(self, error: RpcError) -> None:
        self._stopped.set()
        self._cancel_all(None)
        self._terminated.set()
        super()._give_up(error)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (stop() and its grace are over, or the app
        closed); as grpc's, returns True if `timeout` ran out first, False otherwise."""
        return not self._terminated.wait(timeout)


def server(thread_pool: ThreadPoolExecutor | None = None, handlers: Any = None, interceptors: Sequence[ServerInterceptor] | None = None, options: Any = None,
           maximum_concurrent_rpcs: int | None = None, compression: Any = None, *, app: App | None = None, **_ignored: Any) -> Server:
    """Like grpc.server(futures.ThreadPoolExecutor(...), interceptors=..., options=...,
    maximum_concurrent_rpcs=...): calls beyond maximum_concurrent_rpcs (running or waiting
    for a worker) are refused with RESOURCE_EXHAUSTED, as grpc does. `compression` is
    accepted and ignored (the daemons own the transport)."""
    return Server(thread_pool, handlers, app=app, interceptors=interceptors, options=options, maximum_concurrent_rpcs=maximum_concurrent_rpcs)
