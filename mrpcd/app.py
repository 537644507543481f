"""An app's session with its local daemon: control socket, shared-memory rings, wake-ups.

`connect()` says hello on the control socket, receives the memfd holding the app's two
rings and the two eventfds, and maps them. Records go out by pushing into the tx ring
(one eventfd write only when the daemon sleeps); records come back through the rx ring,
drained in batches by a *driver*: a background thread for the sync API, or the event loop
itself (`loop.add_reader` on the eventfd) for asyncio. Calls and servers register in the
app's dispatch tables, keyed by (handle, call_id).
"""
from __future__ import annotations

import itertools
import logging
import operator
import os
import select
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from . import control_proto as cp
from .deadlines import DeadlineHeap
from .marshal import records as R
from .marshal._pack import Parts
from .marshal._ringio import ring_push_parts, ring_take_records
from .marshal.schema import Schema
from .malloc_tuning import tune_malloc
from .native import ring as ringmod
from .paths import client_socket_path
from .status import RpcError, StatusCode
from .watchdog import InlineWatchdog
from .wire import RecordParts

log = logging.getLogger("mrpcd.app")

RX_BATCH = 256
RX_BYTES = 4 << 20
# Records at least this big stay in the rx ring while their batch is dispatched: their
# message is decoded straight from ring memory (one copy instead of two), then the ring
# space is released (App.drain).
RX_BIG_MIN = 32 * 1024
# With at least this many calls of the app waiting on their responses, the rx thread, each
# time it wakes, first lets the threads already runnable go (os.sched_yield, GIL released):
# callers its last batch woke finish their next send and block again, and more responses
# gather, so it drains a bigger batch and fights fewer threads for the GIL. Measured on
# the 2-vCPU VM, sync client at c=128, 32 B, pairs run in alternating order (ABBA): without
# a policy chain RPC/s higher in 6 of 6 pairs (mean +11 %), client context switches per
# call lower in 4; through the bench's policy chain (which batches the responses already)
# neutral (3 of 6 higher, mean +3 %). At c=32 it was neutral for 32 B and lower in 2 of 3
# pairs for 1 MiB (-7, -11 %, noise-sized), hence the threshold.
RX_YIELD_MIN_CALLS = 64
# A sender blocked on a full tx ring looks again after this long even if no wake-up came:
# a safety net only (the daemon signals when it frees room, and the woken senders pass
# the turn on); tests raise it to show no wake-up is lost.
SPACE_RECHECK_S = 0.5
# An unconnected app's record limit, until a daemon tells the real one: what the default
# config allows (4 MiB rings less a record header)
UNCONNECTED_MAX_RECORD = (4 << 20) - 8

class CallSink(Protocol):
    cancelled_locally: bool  # (a client call's: ended by this app, CANCELLED)

    def deliver(self, rec: R.Record) -> None: ...
    def grant(self, n: int) -> None: ...
    def lost(self, code: StatusCode, details: str) -> None: ...


class DaemonUnavailable(RpcError):
    """The local daemon cannot be reached: not running, or the socket path is wrong."""

    def __init__(self, details: str) -> None:
        super().__init__(StatusCode.UNAVAILABLE, details)


class App:
    """One connection to the local mrpcd. Thread-safe; normally one per process (`default_app`)."""

    # what close() tells the calls in flight (_daemon_gone sets UNAVAILABLE)
    _close_reason = (StatusCode.CANCELLED, "the app closed its connection to mrpcd")
    _pid = 0  # the process that made the app (set in __init__)
    # The daemon went away (stopped, restarted, or dropped this app): the app closed by
    # itself, not by its user, so its channels and servers carry on with its successor
    daemon_lost = False
    _successor: "App | None" = None
    _sock: "socket.socket | None"  # the control connection (None: an unconnected app)
    _space_need = 0  # ring bytes the last sender to block on a full tx ring needs
    # the blocked senders: App counts them (int), AioApp queues their futures (a deque); each
    # class's own methods use its kind (AioApp overrides every App method that touches it
    # but the blocking send(), which an event-loop app does not use)
    _space_waiters: Any
    ASYNCIO = False  # mrpcd.aio's AioApp: its rx side is driven by an event loop

    def __init__(self, socket_path: str | None = None, name: str | None = None, *, driver: str = "thread") -> None:
        tune_malloc()
        self._init_local(socket_path, name, driver)
        self._sock = sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(
                f"cannot reach mrpcd at {self.socket_path}: {exc.strerror or exc} "
                "(is the daemon running? start it with `mrpcd`, or set MRPCD_SOCKET)"
            ) from None
        reply, fds = self.request({"op": "hello", "name": self.name}, nfds=3)
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            raise DaemonUnavailable("mrpcd did not hand over the shared memory and wake-up fds")
        shm_fd, daemon_fd, app_fd = fds
        self.app_id = reply["app_id"]
        self.rings = ringmod.RingPair.attach(shm_fd, reply["shm_size"])
        self.tx, self.rx = self.rings.tx, self.rings.rx
        # The daemon's max_record may be more than one ring can hold (the defaults: 16 MiB
        # records, 4 MiB rings). A bigger record could never be pushed nor received, so
        # the app's limit is the smaller one: message limits and send checks then answer
        # RESOURCE_EXHAUSTED instead of the ring's ValueError (or a response never sent).
        self.max_record = min(reply["max_record"], self.tx.max_record, self.rx.max_record)
        self.daemon_waker = ringmod.Waker(daemon_fd)
        self.app_waker = ringmod.Waker(app_fd)
        if driver == "thread":
            self._start_rx_thread()
            self._watch_daemon()

    @classmethod
    def unconnected(cls, socket_path: str | None = None, name: str | None = None, *, driver: str = "thread") -> "App":
        """An app made while no daemon answers, as grpc makes a channel to anywhere: no
        session yet, closed with `daemon_lost` set, so its channels and servers take its
        successor (the first session a daemon accepts) when they next need the daemon.
        What `default_app()` gives instead of raising; `connect()` still raises."""
        app = cls.__new__(cls)
        app._init_local(socket_path, name, driver)
        app._sock = None
        app.app_id = None
        app.max_record = UNCONNECTED_MAX_RECORD
        app.closed = app.daemon_lost = True
        app.call_deadlines.close()
        return app

    def _init_local(self, socket_path: str | None, name: str | None, driver: str) -> None:
        """The app's own state, none of it from the daemon (what an unconnected app has too)."""
        self._pid = os.getpid()
        self.socket_path = socket_path or client_socket_path()
        self.name = name or os.path.basename(sys.argv[0] or "python")
        self._control_lock = threading.Lock()
        self._frames = cp.FrameBuffer()
        self._inbox: list[dict] = []
        self._ids = itertools.count(1)
        # successor()'s: held while the new session says hello (a local round trip, or a
        # refused connect while no daemon listens); per app, so a daemon that accepts and
        # then hangs holds up only the apps that wait for it anyway
        self._successor_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._space = threading.Condition(self._tx_lock)
        self._space_waiters = 0  # senders blocked on a full tx ring (counted before they flag the ring)
        # Control records (WINDOW, CANCEL, statuses the library makes up) that met a full
        # tx ring, in order; pushed ahead of everything else once there is room (send_control)
        self._control: deque[bytes] = deque()
        self._call_ids = itertools.count(1)
        self.calls: dict[tuple[int, int], CallSink] = {}
        # Client calls with a deadline that nobody may be waiting on (futures, response
        # streams; mrpcd.channel): ended at their deadline all the same, as grpc does.
        # Its thread starts with the first such call and leaves when none is left.
        self.call_deadlines = DeadlineHeap("mrpcd-call-deadlines", expire=operator.methodcaller("expire_deadline"),
                                           ended=operator.attrgetter("done"))
        self.servers: list[Any] = []  # mrpcd.server.Server / aio servers, each with route(), handle_lost() and app_closed()
        self.handle_listeners: dict[int, list[Callable[[str], None]]] = {}
        self._schemas: set[int] = set()
        self._schema_lock = threading.Lock()
        self.closed = False
        # wait_for_ready waits between two connection attempts sleep on it (mrpcd.channel);
        # what ends such a wait (the app's close, a channel's, the waiting call's end)
        # wakes them (wake_connect_waits), so none lasts until its next attempt
        self.connect_waits = threading.Condition()
        # Held while the rx path reads the rx ring (and records it left in place); close()
        # takes it before unmapping the rings. Re-entrant: a callback run by dispatch on
        # the rx thread / event loop may close the app.
        self._rx_lock = threading.RLock()
        self._held: Any = None  # the open take of the batch being dispatched, if any
        # Blocked unary callers whose calls ended, to be woken one at a time (pass_baton).
        self._baton: deque[tuple[Any, Any]] = deque()
        self._baton_lock = threading.Lock()
        self._draining: int | None = None  # the thread inside drain(), which only queues them
        self.driver = driver
        # The rx role (draining the rx ring) belongs to one thread at a time. A sync server
        # runs quick unary handlers on that thread (mrpcd.server); when such a handler
        # blocks, the role moves to a new thread (hand_off_rx) and the old one leaves once
        # its handler returns. _rx_gen says which thread's loop is current.
        self._rx_gen = 0
        self._rx_ident: int | None = None
        self._handoff_lock = threading.Lock()
        self._inline_seq = 0  # counts handlers run on the rx thread
        self._inline_since: float | None = None  # when the one running now started
        self._handed_seq = 0  # the handler whose thread gave the rx role away
        self._watchdog: InlineWatchdog | None = None
        self._thread: threading.Thread | None = None

    # -- the daemon going away ----------------------------------------------------------
    def _watch_daemon(self) -> None:
        """A thread that sleeps until the daemon closes the control connection (it stopped,
        or dropped this app), then closes the app: servers terminate, calls in flight fail
        UNAVAILABLE. Off the datapath: one poll() for the app's lifetime (close() wakes it)."""
        assert self._sock is not None  # (a connected app's)
        threading.Thread(target=self._daemon_watch, args=(self._sock.fileno(),), name=f"mrpcd-watch-{self.app_id}",
                         daemon=True).start()

    def _daemon_watch(self, fd: int) -> None:
        p = select.poll()
        p.register(fd, select.POLLRDHUP)  # the peer's close; POLLHUP / POLLERR come anyway, replies do not wake it
        while not self.closed:
            try:
                if p.poll(self._WATCH_MS):
                    break
            except OSError:
                return
            if self._orphaned():
                self._orphan_closed()
                return
        if not self.closed:
            self._daemon_gone()

    _WATCH_MS: "int | None" = None  # the sync app's watcher waits for the daemon only

    def _orphaned(self) -> bool:
        """Nothing can use this app any more (an asyncio app whose loop is closed)."""
        return False

    def _orphan_closed(self) -> None:
        """(watcher thread) Close an app nothing can use: its daemon session and threads go."""
        log.info("the event loop of mrpcd app %s closed without closing the app: closing it", self.app_id)
        try:
            self.close()
        except Exception:  # (callbacks of a closed loop's futures cannot be scheduled)
            log.debug("closing an orphaned app", exc_info=True)

    def _daemon_gone(self) -> None:
        if self.closed:
            return
        log.warning("mrpcd at %s closed the connection (it stopped or dropped this app): the calls in flight fail; "
                    "channels and servers carry on once it is back", self.socket_path)
        self._close_reason = (StatusCode.UNAVAILABLE, f"mrpcd at {self.socket_path} went away (stopped or restarted)")
        self.daemon_lost = True
        self.close()

    # -- carrying on after a daemon restart -----------------------------------------------
    def successor(self) -> "App":
        """The live session that carries on for this one: itself while it is open; once
        its daemon went away (`daemon_lost`), a new session with the daemon now at the
        same socket, made by the first caller that needs it and shared by every later
        one (a chain, should that daemon go away too). Channels take it for their next
        call and servers to serve again (re-registering their schemas and addresses), so
        a process outlives `systemctl restart mrpcd` as a grpc process outlives a server
        restart: the calls in flight fail UNAVAILABLE, the later ones work.

        Raises DaemonUnavailable while no daemon answers (callers try again later), and
        RpcError CANCELLED for an app its user closed (nothing carries on after that)."""
        app = self
        while app.closed:
            if not app.daemon_lost:
                raise RpcError(StatusCode.CANCELLED, "the app's connection to mrpcd was closed by the app")
            with app._successor_lock:
                nxt = app._successor
                if nxt is None:
                    nxt = app._successor = app._reopen()
                    log.info("mrpcd at %s is back: the app carries on in a new session (app %s)", self.socket_path, nxt.app_id)
            app = nxt
        return app

    def _reopen(self) -> "App":
        """A new session like this one (same socket, name and driver)."""
        return type(self)(self.socket_path, self.name, driver=self.driver)

    # -- control socket -----------------------------------------------------------------
    def request(self, message: dict[str, Any], nfds: int = 0) -> tuple[dict[str, Any], list[int]]:
        """One control request/response; raises RpcError with the daemon's text on failure."""
        sock = self._sock
        if sock is None:
            raise DaemonUnavailable(f"cannot reach mrpcd at {self.socket_path} (not yet: the app has not connected)")
        with self._control_lock:
            rid = next(self._ids)
            message = dict(message, id=rid)
            try:
                sock.sendall(cp.encode(message))
                fds: list[int] = []
                while not self._inbox:
                    data, got, _flags, _addr = socket.recv_fds(sock, 1 << 16, max(nfds, 1))
                    fds.extend(got)
                    if not data:
                        raise DaemonUnavailable(f"mrpcd at {self.socket_path} closed the control connection")
                    self._inbox.extend(self._frames.feed(data))
                reply = self._inbox.pop(0)
            except OSError as exc:
                raise DaemonUnavailable(f"control connection to mrpcd failed: {exc}") from None
            except cp.ControlError as exc:
                raise RpcError(StatusCode.INTERNAL, f"mrpcd sent a malformed control reply: {exc}") from None
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise RpcError(StatusCode.from_int(reply.get("code", 2)), reply.get("error", "control request failed"))
        return reply, fds

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        return self.request({"op": op, **args})[0]

    def ensure_schema(self, schema: Schema) -> None:
        """Hand a generated module's schema to the daemon, once."""
        key = id(schema)
        if key in self._schemas:
            return
        with self._schema_lock:
            if key not in self._schemas:
                self.call("schema", schema=schema.to_dict())
                self._schemas.add(key)

    # -- tx -----------------------------------------------------------------------------
    def next_call_id(self) -> int:
        return next(self._call_ids)

    def _push(self, data: "bytes | RecordParts") -> bool:
        """One record into the tx ring (tx lock held): encoded bytes as they are, a
        wire.RecordParts gathered straight into the ring (ring_push_record: one copy; a
        Parts payload's big bytes values straight from the user's objects, ring_push_parts)."""
        if type(data) is RecordParts:
            args = data.args
            if type(args[8]) is Parts:
                return ring_push_parts(self.tx, *args)
            return R.ring_push_record(self.tx, *args)
        return self.tx.push(data)

    def send(self, data: "bytes | RecordParts", timeout: float | None = None) -> None:
        """Push one record (bytes, or a wire.RecordParts not yet encoded); blocks (bounded
        by `timeout`) while the ring is full."""
        if len(data) > self.max_record:
            raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"message of {len(data)} bytes exceeds the limit of {self.max_record}")
        with self._tx_lock:
            if self.closed:
                raise DaemonUnavailable("the app's connection to mrpcd is closed")
            deadline = None if timeout is None else time.monotonic() + timeout
            waited = False
            # queued control records first (and a full ring for them is full for this one)
            while (self._control and not self._flush_control(flag=False)) or not self._push(data):
                if R.ring_should_wake_consumer(self.tx):
                    self.daemon_waker.signal()
                if self._inline_since is not None:
                    self.about_to_block()  # only the rx role frees room: never wait holding it
                self._space_waiters += 1  # before the ring flag: the rx thread must see us
                # wait for room for the record that blocks: a queued control record bigger
                # than ours, else "push again" forever (a spin holding the tx lock)
                need = len(self._control[0]) if self._control else len(data)
                self._space_need = ringmod.record_space(need)  # what the rx thread looks for
                try:
                    if self.tx.prepare_wait_for_space(need):
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            self._leave_space_wait()
                            raise RpcError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded while waiting for room in the ring")
                        try:
                            self._space.wait(min(left, SPACE_RECHECK_S) if left is not None else SPACE_RECHECK_S)
                        except BaseException:  # KeyboardInterrupt and the like
                            self._leave_space_wait()
                            raise
                        self.tx.finish_wait()
                        waited = True
                finally:
                    self._space_waiters -= 1
                if self.closed:
                    raise DaemonUnavailable("the app's connection to mrpcd is closed")
            if waited and self._space_waiters:
                self._space.notify()  # pass the turn on (_wake_space_waiters)
            wake = R.ring_should_wake_consumer(self.tx)
        if wake:  # outside the lock: the write drops the GIL, and callers would queue on the lock
            self.daemon_waker.signal()

    def _leave_space_wait(self) -> None:
        """(tx lock held) A blocked sender gives up without pushing (deadline, interrupt).
        The ring's waiting flag is shared: lower it only if no other sender waits, or the
        daemon would free room without signalling them; and pass on the wake-up it may have
        taken (Condition.notify can pick a waiter whose wait is timing out)."""
        if self._space_waiters > 1:  # itself included
            self._space.notify()
        elif not self._control:  # (queued control records still need the daemon's signal)
            self.tx.finish_wait()

    def try_send(self, data: "bytes | RecordParts") -> bool:
        """Non-blocking push for the event-loop driver; False when the ring is full, and
        then the ring is flagged: the daemon signals after its next pop."""
        with self._tx_lock:
            if self.closed:  # the rings are unmapped
                return False
            if not self._push_or_flag(data):
                return False  # the rx driver is woken when the daemon frees room
            wake = R.ring_should_wake_consumer(self.tx)
        if wake:
            self.daemon_waker.signal()
        return True

    def _push_or_flag(self, data: "bytes | RecordParts") -> bool:
        """(tx lock held) Push `data`; if the ring is full, flag it (the daemon then
        signals the app's eventfd after its next pop) and return False."""
        if self._push(data):
            return True
        if R.ring_should_wake_consumer(self.tx):
            self.daemon_waker.signal()
        # prepare_wait says "push again" also when only the wrap marker fits; that
        # push returns full again, and returning then would leave the flag down
        while not self.tx.prepare_wait_for_space(len(data)):
            if self._push(data):
                return True
        return False

    def send_control(self, data: bytes) -> None:
        """Send a small control record - WINDOW credit, a CANCEL, a status the library
        makes up (deadline, receive limit, no such method) - without blocking and without
        ever losing it while the app lives: pushed now when the tx ring has room, else
        queued, in order, and pushed as soon as the daemon frees room, before any other
        record (the rx thread notices the room: flush_control; a sender pushes the queue
        before its own record).

        Why not try_send or a send with a timeout: a full ring is a normal, passing state
        (big messages, a daemon busy for a moment), and each of these records matters
        once: a lost WINDOW stalls its stream for good, a lost CANCEL leaves a server
        working for nobody, a lost status leaves a client waiting for its deadline (or
        for ever). And the rx thread and the deadline thread must never wait for room."""
        with self._tx_lock:
            if self.closed:
                return  # the daemon ends the app's calls itself
            if self._control:  # behind the ones queued already: control records keep their order
                self._control.append(data)
                if not self._flush_control():
                    return
            elif not self._push_or_flag(data):
                self._control.append(data)
                return
            wake = R.ring_should_wake_consumer(self.tx)
        if wake:
            self.daemon_waker.signal()

    def _flush_control(self, flag: bool = True) -> bool:
        """(tx lock held) Push the queued control records in order; True once none is
        left. `flag`: when the ring fills again, flag it so the daemon signals after its
        next pop (a blocked sender flags it itself)."""
        control = self._control
        while control:
            if not (self._push_or_flag(control[0]) if flag else self._push(control[0])):
                return False
            control.popleft()
        return True

    def flush_control(self) -> None:
        """(rx thread) Push the queued control records now that the daemon made room."""
        with self._tx_lock:
            if self.closed or not self._control or not self._flush_control():
                return
            wake = R.ring_should_wake_consumer(self.tx)
        if wake:
            self.daemon_waker.signal()

    # -- rx -----------------------------------------------------------------------------
    def drain(self) -> bool:
        """Take and dispatch one batch from the rx ring; True if there was anything.

        Small records: one copy out of the shared ring into a private buffer for the whole
        batch, the records are zero-copy views of it. Records of at least RX_BIG_MIN bytes
        stay in the ring (RingRecords) while the batch is dispatched, so their messages are
        decoded straight from ring memory (mrpcd._calls.message_of); then the batch's ring
        space is released, and the daemon woken if it waits for room. Every header is
        bounds-checked (mrpcd.marshal._ringio)."""
        with self._rx_lock:
            if self.closed:
                return False
            recs, bad, held = ring_take_records(self.rx, RX_BATCH, RX_BYTES, RX_BIG_MIN, 1 << 31)
            self._draining = threading.get_ident()
            try:
                if held is None:
                    if R.ring_should_wake_producer(self.rx):
                        self.daemon_waker.signal()
                    self._dispatch_batch(recs, bad)
                    return bool(recs or bad)
                self._held = held
                try:
                    self._dispatch_batch(recs, bad)
                finally:
                    self._held = None
                    held.release()
                if R.ring_should_wake_producer(self.rx):
                    self.daemon_waker.signal()
                return True
            finally:
                self._draining = None
                if self._baton:
                    self.pass_baton()

    def wake_caller(self, call: Any, lock: Any) -> None:
        """Wake a caller blocked in a call's `wait_end` (mrpcd.channel): `lock` is the held
        lock it waits on. From inside drain() the caller is only queued; at the end of the
        batch the draining thread wakes the first, and each woken caller wakes the next
        as soon as it runs (pass_baton). Woken all at once, a batch's callers would each
        find the GIL taken and sleep again on it (a context switch apiece); in a chain,
        one thread at a time wakes and finds it free."""
        with self._baton_lock:
            self._baton.append((call, lock))
        if self._draining != threading.get_ident():
            self.pass_baton()

    def pass_baton(self) -> None:
        """Wake the next queued caller that still waits (one that gave up on its deadline,
        or was interrupted, has left already: skipped). Every caller leaving `wait_end`
        calls this, so the chain goes on whatever the woken threads do next."""
        with self._baton_lock:
            baton = self._baton
            while baton:
                call, lock = baton.popleft()
                if call._end_waiting:
                    call._end_waiting = False
                    lock.release()
                    return

    def _dispatch_batch(self, recs: list, bad: list) -> None:
        for _data, reason in bad:  # the daemon is trusted, but never crash on it
            log.error("mrpcd sent a malformed record: %s", reason)
        dispatch = self.dispatch
        for rec in recs:
            try:
                dispatch(rec)
            except Exception:  # one record that breaks a call's code must not drop the rest of the batch:
                # other calls' records (their ENDs, WINDOW grants) are in it, and the asyncio
                # driver would stop draining altogether
                log.exception("error dispatching a record from mrpcd (kind %d, call %d); the rest of its batch goes on",
                              rec.kind, rec.call_id)

    def dispatch(self, rec: R.Record) -> None:
        kind = rec.kind
        if kind == R.RESPONSE:
            sink = self.calls.get((rec.handle, rec.call_id))
            if sink is not None:
                sink.deliver(rec)
        elif kind == R.WINDOW:  # credit for a request stream (client call) or a response stream (server call)
            sink = self.calls.get((rec.handle, rec.call_id))
            if sink is not None:
                sink.grant(rec.method_id)
                return
            for server in self.servers:
                if server.route(rec):
                    return
        elif kind == R.REQUEST or kind == R.CANCEL:
            for server in self.servers:
                if server.route(rec):
                    return
            if kind == R.REQUEST and rec.flags & R.F_START:
                from .wire import response_record

                # on the rx path: never block waiting for tx room (the rx path frees it)
                self.send_control(response_record(rec.handle, rec.call_id, R.F_START | R.F_END, None, code=StatusCode.UNIMPLEMENTED, details="Method not found!"))
        elif kind == R.GOAWAY:
            from .wire import split_response_meta

            details = split_response_meta(rec)[2] or "connection lost"
            self.handle_lost(rec.handle, details)

    def handle_lost(self, handle: int, details: str) -> None:
        for key, sink in list(self.calls.items()):
            if key[0] == handle:
                sink.lost(StatusCode.UNAVAILABLE, details)
        for server in self.servers:
            server.handle_lost(handle)
        for listener in self.handle_listeners.pop(handle, []):
            listener(details)

    def _wake_space_waiters(self) -> None:
        """Wake one sender blocked on a full tx ring; each that pushes wakes the next
        (send), one that finds no room flags the ring and waits again. Woken all at once,
        every blocked sender tried again at each freed record, nearly all to find the ring
        full (1 MiB calls, c=32, 8 MiB rings, alternated pairs: the client's CPU per call
        about a quarter lower this way, RPC/s +5 %). Queued control records go first."""
        if self._control:
            self.flush_control()
        if not self._space_waiters:  # the common case: nobody waits, skip the lock
            return
        with self._tx_lock:
            self._space.notify()

    def _start_rx_thread(self) -> None:
        """(handoff lock held, or at construction) A new thread takes the rx role."""
        self._rx_gen += 1
        self._rx_ident = None  # until the new thread runs: the old one is no longer it
        self._thread = threading.Thread(target=self._rx_thread, args=(self._rx_gen,), name=f"mrpcd-rx-{self.app_id}", daemon=True)
        self._thread.start()

    def on_rx_thread(self) -> bool:
        return threading.get_ident() == self._rx_ident

    # -- handlers run on the rx thread (sync server) ----------------------------------------
    def inline_begin(self) -> int:
        """A handler starts on the rx thread: the watchdog hands the rx role over if it
        runs for longer than InlineWatchdog.LIMIT. Returns its number for inline_end."""
        self._inline_seq = seq = self._inline_seq + 1
        self._inline_since = time.monotonic()
        watchdog = self._watchdog
        if watchdog is None:
            try:
                watchdog = self._watchdog = InlineWatchdog(self)
            except RuntimeError as exc:  # no thread to be had now: run unwatched, try again next time
                log.error("cannot start the inline-handler watchdog: %s", exc)
                return seq
        watchdog.poke()
        return seq

    def inline_end(self, seq: int) -> None:
        """Handler `seq` returned. (A thread that lost the rx role while in it must not end
        the watch over the new rx thread's handler.)"""
        if self._inline_seq == seq:
            self._inline_since = None

    def about_to_block(self) -> None:
        """The library is about to wait (for a response, for ring room): if this is the rx
        thread inside a handler, nobody else would drain the rx ring, so hand the role over
        first."""
        if self._inline_since is not None and threading.get_ident() == self._rx_ident:
            self.hand_off_rx(self._inline_seq)

    def hand_off_rx(self, seq: int) -> bool:
        """Give the rx role to a new thread while handler number `seq` still runs on the
        current one; its servers move their other waiting calls to their pools."""
        with self._handoff_lock:
            if self.closed or self._inline_seq != seq or self._inline_since is None or self._handed_seq == seq:
                return False
            gen, ident = self._rx_gen, self._rx_ident
            try:
                self._start_rx_thread()
            except RuntimeError as exc:  # no thread to be had: this one keeps the role
                self._rx_gen, self._rx_ident = gen, ident
                log.error("cannot start a thread to take over the rx ring (%s); a handler blocks it", exc)
                return False
            self._handed_seq = seq  # once per handler: the thread running it is not the rx thread now
        for server in list(self.servers):
            handed_off = getattr(server, "rx_handed_off", None)
            if handed_off is not None:
                handed_off()
        return True

    def _run_inline(self) -> None:
        for server in self.servers:
            run = getattr(server, "run_inline", None)
            if run is not None:
                run()

    def _rx_thread(self, gen: int) -> None:
        waker = self.app_waker
        with self._handoff_lock:
            if gen != self._rx_gen:
                return
            self._rx_ident = threading.get_ident()
        while not self.closed and gen == self._rx_gen:
            try:
                if self.drain():
                    self._run_inline()
                    if self._control:  # busy rx: it may not reach _wake_space_waiters soon
                        self.flush_control()
                    if self._space_waiters and self.tx.free_bytes() >= self._space_need:
                        # the daemon signals freed room on the eventfd this thread reads only
                        # when idle: under a steady inflow, senders would wait for the re-check
                        self._wake_space_waiters()
                    continue
                self._wake_space_waiters()
                if self.rx.prepare_sleep():
                    waker.wait(0.5)  # drains the eventfd when it was signalled
                    self.rx.finish_sleep()
                    self._wake_space_waiters()
                    if len(self.calls) >= RX_YIELD_MIN_CALLS:
                        os.sched_yield()
            except ringmod.RingCorrupt as exc:
                log.error("rx ring corrupted: %s", exc)
                break
            except Exception:  # a bug in a callback must not kill the app's receive path
                log.exception("error dispatching records from mrpcd")

    def wake_connect_waits(self) -> None:
        """Wake the wait_for_ready waits between two attempts: each looks whether its wait
        is over (a closed app or channel, an ended call) and sleeps on if not."""
        with self.connect_waits:
            self.connect_waits.notify_all()

    def close(self) -> None:
        """Leave the daemon: it reclaims this app's rings, channels and listeners. On an
        app whose daemon went away (or that never had one), the user's close ends the
        carrying on: its successor session closes too, and none is made any more."""
        with _close_lock:  # once, whoever calls it (the user, the daemon watcher) at the same time
            closed, self.closed = self.closed, True
            if closed:  # (only the user closes a closed app: the watcher closes an open one)
                ended, self.daemon_lost = self.daemon_lost, False
        if closed:
            if ended:
                with self._successor_lock:
                    successor = self._successor
                self.wake_connect_waits()  # waits for a daemon end now
                if successor is not None:
                    successor.close()
            return
        code, details = self._close_reason
        for key, sink in list(self.calls.items()):
            if key[0] == -1 and self.daemon_lost:
                continue  # a wait_for_ready call still waiting for its target: it waits on with the successor
            sink.lost(code, details)
        for server in list(self.servers):
            server.app_closed()  # handlers see the cancellation; helper threads end
        self.call_deadlines.close()
        self.wake_connect_waits()
        self.app_waker.signal()
        if self._watchdog is not None:
            self._watchdog.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        with self._tx_lock:
            self._control.clear()
            self._space.notify_all()
        sock = self._sock
        assert sock is not None  # (an unconnected app is born closed: it never gets here)
        try:
            if os.getpid() == self._pid:  # (in a forked child the socket is the parent's too:
                try:                        # shutdown would end the parent's session)
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the watcher (_daemon_watch)
                except OSError:
                    pass
            sock.close()
        finally:
            self.daemon_waker.close()
            self.app_waker.close()
            with self._rx_lock:  # not while the rx path reads the ring
                held, self._held = self._held, None
                if held is not None:
                    held.drop()  # closed from a callback mid-batch: its records are gone
                self.rings.close()
        if self.daemon_lost:  # the channels' connections went with the daemon: they reconnect (IDLE)
            for handle in list(self.handle_listeners):
                for listener in self.handle_listeners.pop(handle, ()):
                    try:
                        listener(details)
                    except Exception:
                        log.exception("error telling a channel its daemon went away")


_close_lock = threading.Lock()  # App.close's test-and-set (rare: one lock for all apps)
_default_app: App | None = None
_default_lock = threading.Lock()


def require_app(app: Any, asyncio_app: bool, where: str) -> None:
    """Refuse, where it is given, an app of the other API: a sync channel or server on an
    asyncio app (or the reverse) would otherwise be accepted and fail only at its first
    call, deep inside (the two drive their rings differently: a thread vs the loop). None
    (the default app, made of the right kind later) passes."""
    if app is None or (isinstance(app, App) and app.ASYNCIO == asyncio_app):
        return
    if not isinstance(app, App):
        raise TypeError(f"{where}: app must be an mrpcd app ({'mrpcd.aio' if asyncio_app else 'mrpcd'}.connect()), not {type(app).__name__}")
    if asyncio_app:
        raise TypeError(f"{where}: app is a sync app (mrpcd.connect()); the asyncio API needs one from mrpcd.aio.connect()")
    raise TypeError(f"{where}: app is an asyncio app (mrpcd.aio.connect()); the sync API needs one from mrpcd.connect()")


def connect(socket_path: str | None = None, name: str | None = None) -> App:
    """A new session with the local daemon (MRPCD_SOCKET or the default socket path)."""
    return App(socket_path, name)


def default_app() -> App:
    """The process-wide session that `insecure_channel()` and `server()` use by default;
    while no daemon answers, an unconnected app (App.unconnected) instead of an error."""
    global _default_app
    with _default_lock:
        if _default_app is None or (_default_app.closed and not _default_app.daemon_lost):
            try:
                _default_app = App()
            except DaemonUnavailable:  # as grpc makes a channel to anywhere: its calls fail (or wait) until a daemon answers
                _default_app = App.unconnected()
        elif _default_app.closed:  # its daemon restarted: the session its channels and servers carry on with
            try:
                _default_app = _default_app.successor()
            except DaemonUnavailable:
                pass  # still none: whoever takes this one follows it to its successor later
        return _default_app
