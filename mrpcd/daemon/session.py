"""One connected app, as the daemon sees it: its rings, its wake-ups, its routes, its datapath.

Everything the app writes is untrusted: ring records are bounds-checked by the ring and
parsed by `records.parse_record`; a malformed record fails that call (when its header can
still name the call) and never touches another app. When the app's control connection
closes (exit, crash, SIGKILL) `close()` reclaims every resource it held.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import struct
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

from ..malloc_tuning import tune_malloc
from ..marshal import records as R
from ..marshal.evolve import MethodPlan, TranscodeError, closure_schema, compare, plan_services
from ..marshal.schema import Schema, SchemaError
from ..native import ring as ringmod
from ..status import StatusCode
from ..wire import cancel_record
from ..transports import tcp
from ..transports.handshake import HandshakeError, ServiceSet, incompatible_changes, service_set
from ..control_proto import ControlError
from .app_limits import check_app_schema, limit_exceeded
from .datapath import Datapath, error_response
from .inbound_limits import REFUSED_MARK, ListenerConnections
from .log_limits import worth_logging
from .observe import Observer
from .policy_host import PolicyHost
from .reply_limits import LIST_SHOWN, shown
from .transport_upgrade import migrate

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("mrpcd.session")

# Records moved per ring drain before the loop gets a chance to serve other apps.
DRAIN_RECORDS = 512
DRAIN_BYTES = 4 << 20
DRAIN_ROUNDS = 8
# Records at least this big are sent straight from the app's ring when no policy reads
# bodies; at most LEND_LIMIT payload bytes are out to sockets at once (then the app waits).
LEND_MIN = 64 * 1024
LEND_LIMIT = 8 << 20
# While payloads are lent, how often a session looks for a peer that stopped taking them
# (_check_lent_stall; the config's peer_stall_timeout says how long it may).
STALL_CHECK_S = 0.25
# Pumps of one app's rings that may fail in a row (a bug, not the app's ring) before the
# app is dropped: retried at once, since nothing else would pump it again.
PUMP_FAILURES_MAX = 3
# Calls refused for a peer's backlog whose request streams are remembered (Route.refused).
REFUSED_MAX = 65536
# Past this many times max_pending_records / _bytes waiting for an app's rx ring, its tx
# ring is not read until the backlog is under the limits (_rx_backlogged).
TX_HOLD_FACTOR = 2
# Peer records at least this big are received straight into the app's rx ring when no policy
# is attached (_reserve_in_place): one copy, socket -> ring, instead of two.
IN_PLACE_MIN = 256 * 1024
# Calls of a transcoding connection whose message type is remembered (Route.calls); past
# this the oldest are forgotten (their later records would then fail to decode in the app).
TRACKED_CALLS_MAX = 65536
_HEADER_PREFIX = struct.Struct("<BBHIQ")  # kind, flags, status, handle, call_id

class PendingRecords(deque):
    """Records waiting for room in an app's rx ring, with their total size in `nbytes`.

    Why bytes too: a bound on the number of records alone let a peer park 65,536 records of
    up to max_record bytes each in the daemon's memory (max_pending_bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def append(self, rec: R.Record) -> None:
        self.nbytes += rec.size
        super().append(rec)

    def extend(self, recs: Any) -> None:
        recs = list(recs)
        self.nbytes += sum(r.size for r in recs)
        super().extend(recs)

    def extendleft(self, recs: Any) -> None:
        recs = list(recs)
        self.nbytes += sum(r.size for r in recs)
        super().extendleft(recs)

    def popleft(self) -> R.Record:
        rec = super().popleft()
        self.nbytes -= rec.size
        return rec

    def clear(self) -> None:
        super().clear()
        self.nbytes = 0


def _peer_hello(route: "Route") -> dict[str, Any]:
    """The peer's validated HELLO on a route's connection ({} if it has none)."""
    hello = getattr(route.conn, "peer_hello", None)
    return hello if isinstance(hello, dict) else {}


def _remember(table: dict[int, Any], call_id: int, value: Any) -> None:
    """Put a call in one of a transcoding route's call tables, forgetting the oldest past
    TRACKED_CALLS_MAX."""
    table[call_id] = value
    if len(table) > TRACKED_CALLS_MAX:
        del table[next(iter(table))]


class Route:
    """A handle: one daemon-to-daemon connection owned by this app (client or server side)."""

    __slots__ = ("handle", "conn", "role", "target", "services", "binding", "refused", "backlog_paused", "stall_mark",
                 "plans", "calls", "failed", "hello_services", "unverified")

    def __init__(self, handle: int, conn: tcp.PeerConnection, role: str, target: str, services: frozenset[int], binding: "Binding | None") -> None:
        self.binding = binding
        # (server side) the services our HELLO announced on this connection; with those the
        # peer announced, the ones whose versions a handshake or a registration compared
        self.hello_services: frozenset[str] = frozenset(binding.fingerprints) if binding is not None else frozenset()
        # method ids of services served here only since, that neither HELLO named: their
        # versions were never compared, so a call to one closes the connection (the peer's
        # next HELLO compares them) instead of reaching the app unchecked
        self.unverified: frozenset[int] = frozenset()
        self.handle = handle
        self.conn = conn
        self.role = role  # "client" (the app connected out) or "server" (a peer connected in)
        self.target = target
        self.services = services  # method ids served on this route (server role)
        # calls whose START was refused here (the peer's backlog was full) that may still
        # send records: those are dropped until the call's request stream ends
        self.refused: dict[int, None] = {}  # insertion-ordered: the oldest are forgotten past REFUSED_MAX
        # server role: reading paused because the peer does not take our answers
        self.backlog_paused = False
        # (bytes the kernel had taken, since when) while it holds the oldest lent payload
        self.stall_mark: tuple[int, float] | None = None
        # schema evolution (marshal/evolve.py): the peer's app speaks another, compatible
        # version of a service; what this daemon receives on the route is transcoded into
        # its app's layout (requests on the server side, responses on the client side).
        # None: the peer's payloads are the app's own (no per-record work at all).
        self.plans: dict[int, MethodPlan] | None = None
        # call id -> the transcoder of its messages from the peer
        self.calls: dict[int, Any] = {}
        # calls that failed to transcode here (both ends were told): their later records are
        # dropped. Kept apart from `calls`: the peer need never end such a call (the caller
        # got its final status), and these must not push live calls out of `calls`
        self.failed: dict[int, None] = {}


class Binding:
    """A listening address of a server app, with the services it serves there (mutable)."""

    __slots__ = ("server", "address", "fingerprints", "method_ids", "inbound")

    def __init__(self) -> None:
        self.server: tcp.Listener | None = None
        self.inbound: ListenerConnections | None = None  # the peer connections accepted here (limits.inbound_*)
        self.address = ""
        self.fingerprints: ServiceSet = ServiceSet()
        self.method_ids: frozenset[int] = frozenset()


class AppSession:
    def __init__(self, daemon: "Daemon", app_id: int, name: str, pid: int, uid: int, gid: int) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.app_id = app_id
        self.name = name
        self.pid, self.uid, self.gid = pid, uid, gid
        self.loop = asyncio.get_running_loop()
        tune_malloc()
        self.rings = ringmod.RingPair.create(self.config.ring_size)
        self.shm_fd, self.shm_size = self.rings.fd, self.rings.size
        self.tx, self.rx = self.rings.tx, self.rings.rx
        self.daemon_waker = ringmod.Waker()  # the app signals it: tx has records / rx has room
        self.app_waker = ringmod.Waker()  # the daemon signals it: rx has records / tx has room
        self.schema = Schema()
        self.routes: dict[int, Route] = {}
        self._next_handle = 1
        self.listeners: list[tcp.Listener] = []
        # descriptors bounded by the config's `limits:` (app_limits.py): peer connections this
        # app opened (routes of role client) and those being opened, listeners being made
        self.client_routes = 0
        self.connecting = 0
        self.binding = 0
        self.limits_exempt = False  # root or the admin group (set by the control connection)
        self.bindings: dict[str, Binding] = {}  # requested and actual address -> binding
        self.pending = PendingRecords()  # records waiting for room in the rx ring
        self.paused_routes = False
        self.datapath = Datapath(self, self._send_out, self._deliver_in)
        self.observer = Observer(daemon.call_stats, lambda: self.schema)  # per-method metrics, drain (observe.py)
        self.policies = PolicyHost(self, daemon.policy_globals)
        # entries of the config's `policies:` this app matches that are not on its chain yet,
        # with why: while there is one it may not connect or bind (declared.py)
        self.declared_waiting: list[tuple[Any, str]] = []
        self.poller = daemon.poller
        self._methods_by_id: dict[int, Any] | None = None
        self.stats: dict[str, int] = {
            "records_out": 0, "records_in": 0, "bytes_out": 0, "bytes_in": 0,
            "malformed": 0, "unroutable": 0, "unimplemented": 0,
            "oversized": 0,  # peer records bigger than the app's rx ring: that call failed RESOURCE_EXHAUSTED
            "peer_backlog_refused": 0,  # new calls failed UNAVAILABLE: their peer had max_peer_backlog bytes queued
            "peer_backlog_paused": 0,  # times a calling peer's socket was not read: it did not take its answers
            "lent_payloads": 0,  # big payloads sent straight from the app's tx ring
            "wakeups": 0,  # eventfd signals from the app (the poller saves most while traffic flows)
            "received_in_place": 0,  # big peer records read from the socket straight into the rx ring
            "in_place_evicted": 0,  # ... of which moved to the daemon's memory before they were complete
            # ring sizing: times the app blocked on its full tx ring (woken when this daemon
            # freed room), and times records for it began to wait for room in its rx ring
            "tx_ring_full": 0,
            "rx_ring_full": 0,
            "peer_stalled": 0,  # connections closed by peer_stall_timeout
            # schema evolution: peer messages transcoded into the app's schema version, and
            # those that did not fit it (each failed its call)
            "transcoded": 0,
            "transcode_failed": 0,
            # peer connections to its listening addresses closed as they were accepted:
            # limits.inbound_connections_per_listener or limits.inbound_connections
            "inbound_refused": 0,
        }
        self._stall_timer: Any = None
        self._pump_failures = 0  # _pump calls that raised in a row
        # the route whose big record is being received into a reservation of the rx ring,
        # and that reservation (both set, or both None)
        self._in_place: Route | None = None
        self._in_place_view: memoryview | None = None
        self.closed = False
        # why the daemon dropped the app (its ring, a bug), for the control requests it may
        # still send before its connection is hung up; None while it is connected
        self.drop_reason: str | None = None
        # set by the control connection: ends it, so the app learns it was dropped
        self.hang_up: Callable[[], None] | None = None
        self._pump_scheduled = False
        # the tx ring is not taken from while too much waits for room in the rx ring (_rx_backlogged)
        self._tx_held = False
        # takes of the tx ring whose big payloads sockets still write from: [extent, leases
        # out], oldest first (ring space is freed in this order)
        self._lent: deque[list] = deque()
        self._lent_bytes = 0
        self.loop.add_reader(self.daemon_waker.fileno(), self._on_wake)
        self._schedule_pump()  # ends in prepare_sleep(): raises the flag that makes the app signal us

    # -- the app's rings ------------------------------------------------------------
    def handoff_fds(self) -> list[int]:
        return [self.shm_fd, self.daemon_waker.fileno(), self.app_waker.fileno()]

    def _on_wake(self) -> None:
        self.stats["wakeups"] += 1
        self.daemon_waker.drain()
        self.tx.finish_sleep()
        self.rx.finish_wait()
        self._pump()

    def _schedule_pump(self) -> None:
        if not self._pump_scheduled and not self.closed:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump_soon)

    def _pump_soon(self) -> None:
        self._pump_scheduled = False
        self._pump()

    def _pump(self) -> None:
        """Drain the app's tx ring in batches, flush what waits for its rx ring, then sleep."""
        if self.closed:
            return
        try:
            drained = self._drain_tx()
            if self.pending:
                self._flush_pending()
            if drained and not self._pump_scheduled and not self.poller.hold(self):
                self._sleep()
        except ringmod.RingCorrupt as exc:
            self._ring_corrupted(exc)
        except Exception as exc:  # a daemon bug on this app's path: retry, never stall nor spin
            self._pump_failures += 1
            log.exception("app %s: moving its records failed (%d in a row)", self.name, self._pump_failures,
                          extra=self.log_fields())
            if self._pump_failures >= PUMP_FAILURES_MAX:
                self.daemon.drop_session(self, f"internal error moving its records: {type(exc).__name__}: {exc}")
            else:
                self._schedule_pump()
        else:
            self._pump_failures = 0

    def _ring_corrupted(self, exc: Exception) -> None:
        if self.closed:
            return
        log.warning("app %s (pid %d) corrupted its ring: %s; disconnecting it", self.name, self.pid, exc, extra=self.log_fields())
        self.daemon.drop_session(self, f"ring corrupted: {exc}")

    def _sleep(self) -> None:
        """The tx ring ran empty and the poller does not hold it: sleep on the eventfd
        (prepare_sleep raises the flag that makes the app signal), or pump again if records
        came in meanwhile."""
        if not self.tx.prepare_sleep():
            self._schedule_pump()

    def _drain_tx(self) -> bool:
        """Move records from the app's tx ring to the datapath. False if it stopped early
        because ring space is still lent to sockets (a lease coming back pumps again)."""
        max_record = self.config.max_record
        for _ in range(DRAIN_ROUNDS):
            if self.pending and self._rx_backlogged(TX_HOLD_FACTOR):
                self._tx_held = True  # _flush_pending pumps again once the app has read
                return False
            short = False
            if self.datapath.engines:
                if self._lent:
                    return False  # a policy was attached: pop (which frees the ring) once lent bytes are back
                # one copy out of the shared ring into a fresh private buffer (the TOCTOU
                # copy: policies read what the peer will get); records are views into it
                recs, bad = R.ring_pop_records(self.tx, DRAIN_RECORDS, DRAIN_BYTES, max_record)
                handled = False
            else:
                if self._lent_bytes >= LEND_LIMIT:
                    return False
                # no policy reads bodies: big payloads stay in the ring and go from there to
                # the socket as Leases (headers and metadata are still private copies)
                recs, bad, extent, leases = R.ring_take_records(self.tx, DRAIN_RECORDS, DRAIN_BYTES, max_record, LEND_MIN)
                handled = bool(leases or self._lent)
                if handled and extent:  # (an empty take while older bytes are lent: nothing to track)
                    self._lend(recs, bad, extent, leases)
                elif extent:  # everything was copied and nothing older is out: free it now
                    R.ring_release_bytes(self.tx, extent)
                # a short take emptied the ring as it was: prepare_sleep() re-checks it, so
                # no second (empty) take is needed before sleeping
                short = not leases and len(recs) + len(bad) < DRAIN_RECORDS and extent < DRAIN_BYTES
            if R.ring_should_wake_producer(self.tx):  # even an empty pass may have freed a wrap marker
                self.stats["tx_ring_full"] += 1
                self.app_waker.signal()  # the app waits for room in its tx ring
            if not recs and not bad:
                return True
            if not handled:
                self._handle_outbound(recs, bad)
            if short:
                return True
        self._schedule_pump()  # more work: come back after other apps had a turn
        return True

    def _lend(self, recs: list, bad: list, extent: int, leases: list) -> None:
        """Send one take; its ring bytes are freed (in take order) once its leases are back."""
        # [ring bytes, leases out, when, handles the take went to (_check_lent_stall)]
        entry = [extent, len(leases), self.loop.time(), {r.handle for r in recs}]
        self._lent.append(entry)
        if self._stall_timer is None and leases:
            self._stall_timer = self.loop.call_later(STALL_CHECK_S, self._check_lent_stall)
        try:
            if recs or bad:
                self._handle_outbound(recs, bad)
        finally:
            self.stats["lent_payloads"] += len(leases)
            for lease in leases:
                self._lent_bytes += len(lease)
                lease.seal(functools.partial(self._lease_back, entry, len(lease)))
            self._free_returned()

    def _check_lent_stall(self) -> None:
        """Ring space is freed in take order, so a payload lent to a peer that stopped
        reading would hold up everything the app sends, to anyone, for as long as that
        connection lives. While the oldest take is out, a connection it went to that has
        bytes queued and has taken none of them for `peer_stall_timeout` is closed: its
        leases come back, its calls fail UNAVAILABLE, the app's other calls go on. A slow
        peer that keeps reading makes progress and is left alone."""
        self._stall_timer = None
        if self.closed or not self._lent:
            return
        timeout = self.config.peer_stall_timeout
        front = self._lent[0]
        now = self.loop.time()
        if timeout > 0 and front[1] and now - front[2] >= STALL_CHECK_S:
            for handle in front[3]:
                route = self.routes.get(handle)
                if route is None:
                    continue
                taken = getattr(route.conn, "bytes_taken", None)
                if taken is None or route.conn.closed:
                    continue
                mark = (taken(), now)
                if route.conn.write_backlog() == 0 or route.stall_mark is None or route.stall_mark[0] != mark[0]:
                    route.stall_mark = mark  # nothing queued, or progress: (re)start the clock
                elif now - route.stall_mark[1] >= timeout:
                    log.warning("app %s: peer %s has taken none of the %d bytes queued for it in %.0f s; closing "
                                "the connection so the app's other calls can go on (peer_stall_timeout)", self.name,
                                route.target, route.conn.write_backlog(), now - route.stall_mark[1],
                                extra=self.log_fields(handle=route.handle, peer=route.target))
                    self.stats["peer_stalled"] += 1
                    route.conn.abort()
        self._stall_timer = self.loop.call_later(STALL_CHECK_S, self._check_lent_stall)

    def _lease_back(self, entry: list, nbytes: int) -> None:
        """The socket layer wrote (or dropped) a lent payload: nothing reads it any more."""
        entry[1] -= 1
        self._lent_bytes -= nbytes
        if entry[1] == 0 and self._lent and entry is self._lent[0]:
            self._free_returned()
            self._schedule_pump()

    def _free_returned(self) -> None:
        """Free the ring bytes of the oldest takes whose leases are all back."""
        lent = self._lent
        freed = False
        while lent and lent[0][1] == 0:
            extent = lent.popleft()[0]
            if not self.closed:
                R.ring_release_bytes(self.tx, extent)
                freed = True
        if self.closed:
            if not lent:
                self.rings.close()  # close() waited for the last lease
        elif freed and R.ring_should_wake_producer(self.tx):
            self.stats["tx_ring_full"] += 1
            self.app_waker.signal()

    def _handle_outbound(self, recs: list[R.Record], bad: Sequence[tuple[bytes, str]] = ()) -> None:
        """Records the app sent (parsed views into the pop's private buffer) → the chain."""
        for data, reason in bad:
            self._reject_malformed(data, reason)
        batch = recs
        for rec in recs:
            kind = rec.kind
            if kind != R.REQUEST and kind != R.RESPONSE and kind != R.CANCEL and kind != R.WINDOW:
                batch = []  # slow path: rebuild without the records an app may not send
                for rec in recs:
                    kind = rec.kind
                    if kind == R.CANCEL or kind == R.REQUEST or kind == R.RESPONSE or kind == R.WINDOW:
                        batch.append(rec)
                    else:
                        self._reject_malformed(rec.encode(), f"record kind {kind} may not be sent by an app")
                break
        self.stats["records_out"] += len(batch)
        if batch:
            self.poller.touch()
            self.observer.from_app(batch)
            self.datapath.outbound(batch)

    def _reject_malformed(self, data: bytes, reason: str) -> None:
        """Fail the call the record names (if its header is readable), count it, go on.

        Logged at the 1st, 2nd, 4th, ... one: an app pushing garbage in a loop must not
        flood the daemon's log (the count is in its stats)."""
        n = self.stats["malformed"] = self.stats["malformed"] + 1
        if worth_logging(n):
            log.warning("app %s (pid %d): malformed record rejected: %s (%d so far)", self.name, self.pid, reason, n,
                        extra=self.log_fields())
        if len(data) >= _HEADER_PREFIX.size:
            kind, _flags, _status, handle, call_id = _HEADER_PREFIX.unpack_from(data)
            if kind == R.REQUEST:
                self._deliver_in([error_response(handle, call_id, StatusCode.INTERNAL.code, f"mrpcd rejected a malformed record: {reason}")])

    def _send_out(self, batch: list[R.Record]) -> None:
        """The transport end of the datapath: group records by route, one writev per route.

        Records no engine changed go out as zero-copy views of the buffer they were popped
        into (back-to-back records as one view); the receiving daemon rewrites the handle.
        """
        routes = self.routes
        groups: dict[int, list[R.Record]] = {}
        for rec in batch:
            h = rec.handle
            g = groups.get(h)
            if g is None:
                groups[h] = [rec]
            else:
                g.append(rec)
        for handle, recs in groups.items():
            route = routes.get(handle)
            if route is None or route.conn.closed:
                self.stats["unroutable"] += len(recs)
                for rec in recs:
                    if rec.kind == R.REQUEST:
                        # back through the chain, as a peer's answer would: policies that
                        # track the call (metrics, admission, acl) see it end
                        self.datapath.inbound([error_response(rec.handle, rec.call_id, StatusCode.UNAVAILABLE.code, f"channel {rec.handle} is not connected")])
                continue
            if route.refused or (route.role == "client" and getattr(route.conn, "writing_paused", True)):
                recs = self._check_backlog(route, recs)
                if not recs:
                    continue
            elif route.role == "server" and not route.backlog_paused and getattr(route.conn, "writing_paused", True):
                self._check_answer_backlog(route)
            if route.plans is not None or route.calls:
                self._track_calls(route, recs)
            bufs, nbytes = R.wire_buffers(recs)
            self.stats["bytes_out"] += nbytes
            if self._lent and not getattr(route.conn, "zero_copy_send", False):
                # TLS / RDMA keep buffers on their own terms: give them copies of leases
                bufs = [bytes(b) if type(b) is R.Lease else b for b in bufs]
            route.conn.send_batch(bufs, len(recs), nbytes)

    def _check_backlog(self, route: Route, recs: list[R.Record]) -> list[R.Record]:
        """A peer that reads nothing (a hung server behind it) must not make this daemon
        queue every new call for it: past max_peer_backlog queued bytes, a new call fails
        here with UNAVAILABLE. Records of calls already going still go (each is bounded by
        its flow-control window); the rest of a refused call's request stream is dropped."""
        refused = route.refused
        limit = self.config.max_peer_backlog
        backlog = route.conn.write_backlog()
        if backlog < limit and not refused:
            return recs
        out: list[R.Record] = []
        failed: list[R.Record] = []
        for rec in recs:
            if rec.kind == R.REQUEST and rec.flags & R.F_START and backlog >= limit:
                if not rec.flags & R.F_END:
                    refused[rec.call_id] = None
                    if len(refused) > REFUSED_MAX:  # an app that never ends them: keep the newest
                        del refused[next(iter(refused))]
                failed.append(error_response(
                    rec.handle, rec.call_id, StatusCode.UNAVAILABLE.code,
                    f"mrpcd: peer {route.target} is not reading: {backlog} bytes already queued for it "
                    f"(max_peer_backlog {limit})"))
            elif refused and rec.call_id in refused:
                if rec.kind == R.CANCEL or rec.flags & R.F_END:
                    del refused[rec.call_id]
            else:
                out.append(rec)
        if failed:
            n = self.stats["peer_backlog_refused"] + 1
            if worth_logging(n):  # a hung peer must not flood the log
                log.warning("app %s: peer %s is not reading (%d bytes queued for it); new calls to it fail "
                            "UNAVAILABLE until it reads", self.name, route.target, backlog,
                            extra=self.log_fields(handle=route.handle, peer=route.target))
            self.stats["peer_backlog_refused"] += len(failed)
            self.datapath.inbound(failed)  # back through the chain: policies tracking these calls see them end
        return out

    def _check_answer_backlog(self, route: Route) -> None:
        """Server side: a peer that sends calls but does not read their answers. Past
        max_peer_backlog bytes queued for it, stop reading its socket (its new calls wait
        in its own buffers) until it has taken what we sent (the transport's drain)."""
        conn = route.conn
        backlog = conn.write_backlog()
        if backlog < self.config.max_peer_backlog:
            return
        route.backlog_paused = True
        n = self.stats["peer_backlog_paused"] = self.stats["peer_backlog_paused"] + 1
        if worth_logging(n):
            log.warning("app %s: peer %s does not read its answers (%d bytes queued for it); not reading "
                        "its calls until it does", self.name, route.target, backlog,
                        extra=self.log_fields(handle=route.handle, peer=route.target))
        conn.pause_reading()
        conn.drain().add_done_callback(functools.partial(self._answer_backlog_drained, route))

    def _answer_backlog_drained(self, route: Route, fut: "asyncio.Future[None]") -> None:
        route.backlog_paused = False
        if not fut.cancelled():
            fut.exception()  # a closed connection: nothing to resume (its close is reported elsewhere)
        conn = route.conn  # the current one (a transport upgrade may have replaced it)
        if not self.closed and not conn.closed and not self.paused_routes:
            conn.resume_reading()

    def _deliver_in(self, batch: list[R.Record]) -> None:
        """The frontend end: push records into the app's rx ring; what does not fit waits.

        One C call copies each record into the ring straight from where it was received
        (a rewritten handle goes as a packed header in front of the received body)."""
        self.observer.to_app(batch)
        self.stats["records_in"] += len(batch)
        poller = self.poller
        if poller.max_window:  # the app will likely answer soon: poll its tx ring meanwhile
            poller.touch()
            if not self._pump_scheduled:
                poller.hold(self)
        try:
            if self._in_place is not None:
                if batch and batch[0].resident:  # complete: publish it where it was received
                    self._end_in_place(batch[0])
                    batch = batch[1:]
                else:  # anything else for the app moves it out of the way first (order)
                    self._end_in_place()
            elif batch and batch[0].resident:  # its reservation is gone (a bug): never push a header alone
                log.error("app %s: a record received in place lost its reservation; dropped", self.name, extra=self.log_fields())
                batch = batch[1:]
            if self.pending:
                self.pending.extend(batch)
            elif batch:
                try:
                    n = R.ring_push_records(self.rx, batch)
                except ValueError:  # batch[0] can never fit the ring: _flush_pending refuses it
                    self.pending.extend(batch)
                else:
                    if n < len(batch):  # the ring is full: records wait, from now until it drains
                        self.stats["rx_ring_full"] += 1
                        self.pending.extend(batch[n:] if n else batch)
            if R.ring_should_wake_consumer(self.rx):
                self.app_waker.signal()
            if self.pending:
                self._apply_backpressure()
                self._flush_pending()
        except ringmod.RingCorrupt as exc:  # the app broke its ring: it goes (not the peer's stream)
            self.loop.call_soon(self._ring_corrupted, exc)

    def _flush_pending(self) -> None:
        """Push what waits; if the ring stays full, ask the app to signal when it pops."""
        pending = self.pending
        if pending and self._in_place is not None:
            self._end_in_place()
        while pending:
            chunk = list(islice(pending, DRAIN_RECORDS))
            try:
                n = R.ring_push_records(self.rx, chunk)
            except ValueError:  # chunk[0] is bigger than the rx ring can ever hold
                self._refuse_oversized(pending.popleft())
                continue
            for _ in range(n):
                pending.popleft()
            if n == 0:
                if R.ring_should_wake_consumer(self.rx):
                    self.app_waker.signal()
                if self.rx.prepare_wait_for_space(pending[0].size):
                    break  # the app signals daemon_waker after its next pop
        if R.ring_should_wake_consumer(self.rx):
            self.app_waker.signal()
        if not pending and self.paused_routes:
            self.paused_routes = False
            for route in self.routes.values():
                if not route.backlog_paused:
                    route.conn.resume_reading()
        if self._tx_held and not self._rx_backlogged():
            self._tx_held = False
            self._schedule_pump()

    # -- big peer records received in place ---------------------------------------------------
    def _reserve_in_place(self, route: Route, nbytes: int) -> memoryview | None:
        """(the route's frame decoder, at the header of a peer record of `nbytes`) Room for
        it in the app's rx ring, so the socket reads it straight there: one copy instead
        of two. Only while no policy is attached (a policy sees a record before the app may:
        this one is in the app's memory as it arrives), nothing waits for the ring (order)
        and no other record is being received so; None otherwise (the usual way). Anything
        else for the app while it arrives moves it out of the way first (_end_in_place), so
        a peer that stops half-way through a record holds up nothing."""
        if (self.closed or self._in_place is not None or self.pending or self.datapath.engines
                or self.routes.get(route.handle) is not route or route.plans is not None):
            return None
        try:
            view = R.ring_reserve_view(self.rx, nbytes)
        except ringmod.RingCorrupt as exc:  # the app's doing: drop the app, not the peer's stream
            self.loop.call_soon(self._ring_corrupted, exc)  # not from inside the decoder
            return None
        if view is None:  # no room now (or never: bigger than the ring; the usual way refuses it)
            return None
        self._in_place, self._in_place_view = route, view
        self.stats["received_in_place"] += 1
        return view

    def _resident_record(self, route: Route, rec: R.Record) -> R.Record | None:
        """A record received in place is complete. While its reservation is open, it goes
        on as it is (committed by _deliver_in). If a policy was attached meanwhile, the
        policies must see it first: it becomes an ordinary record (a private copy) and the
        reservation is dropped (a fallback: attaching a policy moves a record still arriving
        out of the ring first). None: no reservation holds it (a bug; logged)."""
        if self._in_place is not route:
            log.error("app %s: a record received in place has no reservation; dropped", self.name,
                      extra=self.log_fields(handle=route.handle))
            return None
        if not self.datapath.engines:
            return rec
        header = bytearray(R.HEADER_SIZE)
        rec.pack_header_into(header)  # the header the decoder checked, not the ring's bytes
        # _in_place is route, so _in_place_view is its view: the two are set and cleared together
        view = cast(memoryview, self._in_place_view)
        copy = R.parse_record(bytes(header) + view[R.HEADER_SIZE:rec.size].tobytes(),
                              max_record=rec.size)  # checked against max_record at its header
        self._end_in_place()
        return copy

    def _end_in_place(self, rec: R.Record | None = None) -> None:
        """Close the open reservation (if any): publish `rec`, the complete record it holds,
        with its header as the daemon has it now (the handle rewritten); or drop it, the
        route's decoder first moving what it has of the record into memory of its own (the
        rest follows there, and the record comes the usual way)."""
        route, view = self._in_place, self._in_place_view
        if route is None:
            return
        self._in_place = self._in_place_view = None
        if rec is not None:
            rec.pack_header_into(view)
            R.ring_commit(self.rx)
            return
        try:
            evict = getattr(route.conn, "evict_in_place", None)
            if evict is None:  # a transport version that cannot: it must not write into the ring
                log.error("app %s: connection %s cannot move a record out of the app's ring; closing it",
                          self.name, route.target, extra=self.log_fields(handle=route.handle))
                route.conn.abort()
            elif evict():
                self.stats["in_place_evicted"] += 1
        except Exception as exc:  # MemoryError: the decoder dropped the record; so goes its stream
            log.error("app %s: cannot move a record of connection %s out of the app's ring (%s); closing it",
                      self.name, route.target, exc, extra=self.log_fields(handle=route.handle))
            route.conn.abort()
        finally:  # whatever happened, the ring must not stay reserved (pushes would fail for good)
            self.rx.unreserve()

    def _drop_in_place(self, route: Route) -> None:
        """`route`'s record, if one is being received in place, no longer goes to the app
        that way (its call or connection ends): drop the reservation (_end_in_place)."""
        if self._in_place is route:
            self._end_in_place()

    def receive_in_place(self, route: Route, on: bool) -> None:
        """Let `route`'s connection read big records into the app's ring, if it can also
        move one out again (evict_in_place); or stop it (before a transport upgrade: the
        decoder goes over to the new code as it is, and that code may not know how)."""
        conn = route.conn
        set_in_place = getattr(conn, "set_in_place", None)
        if set_in_place is None:  # a version without it: its decoder has no sink either
            return
        if on and route.plans is None and getattr(conn, "evict_in_place", None) is not None:
            # (a transcoding route never: the app must get the transcoded payload, not the peer's)
            set_in_place(functools.partial(self._reserve_in_place, route), IN_PLACE_MIN)
        else:
            set_in_place(None, IN_PLACE_MIN)

    def stop_in_place(self) -> None:
        """Move a record being received in place into the daemon's memory (a policy is
        attached; the connection changes hands: transport upgrade)."""
        self._end_in_place()

    def _refuse_oversized(self, rec: R.Record) -> None:
        """A peer sent a record bigger than this app's rx ring can hold (the peer's daemon
        has bigger rings or a bigger max_record): fail that one call, both ends, with
        RESOURCE_EXHAUSTED; the connection and the app's other calls go on.

        Client side: the app's call ends with the status and the peer is told to CANCEL it.
        Server side: the caller gets the status and the app's handler a CANCEL (unless the
        record started the call: then the app never heard of it).
        """
        size, limit = rec.size, self.rx.max_record
        details = (f"mrpcd: a record of {size} bytes for call {rec.call_id} does not fit the receiving app's "
                   f"ring (at most {limit} bytes; ring_size of the receiving daemon)")
        self.stats["oversized"] += 1
        log.warning("app %s (pid %d): %s", self.name, self.pid, details, extra=self.log_fields(handle=rec.handle))
        route = self.routes.get(rec.handle)
        role = route.role if route is not None else ("server" if rec.kind == R.REQUEST else "client")
        if route is not None and route.plans is not None:
            self._call_failed(route, rec.call_id, bool(rec.flags & R.F_END))
        to_app: list[R.Record] = []
        if role == "server":
            rsp = error_response(0, rec.call_id, StatusCode.RESOURCE_EXHAUSTED.code, details)
            if route is not None and not route.conn.closed:
                route.conn.send(rsp.encode())
            rsp.handle = rec.handle
            self.observer.from_app([rsp])  # the server call ends as the caller sees it
            if not (rec.kind == R.REQUEST and rec.flags & R.F_START):
                to_app.append(R.parse_record(cancel_record(rec.handle, rec.call_id)))
        else:
            to_app.append(error_response(rec.handle, rec.call_id, StatusCode.RESOURCE_EXHAUSTED.code, details))
            if route is not None and not route.conn.closed and not (rec.kind == R.RESPONSE and rec.flags & R.F_END):
                route.conn.send(cancel_record(0, rec.call_id))
        if to_app:
            self.observer.to_app(to_app)
            self.pending.extendleft(reversed(to_app))  # in the refused record's place

    def _rx_backlogged(self, factor: int = 1) -> bool:
        """`factor` times what max_pending_records / _bytes allow waits for room in the app's
        rx ring.

        At 1 its peers' sockets are no longer read (_apply_backpressure): what they add is then
        bounded by about that much. At TX_HOLD_FACTOR its tx ring is not read either
        (_drain_tx), until the backlog is under 1 again: only the answers the daemon makes up
        itself (UNAVAILABLE on a handle that is not connected, INTERNAL for a malformed
        record, a policy's refusal) get there, and they queued without bound for an app that
        sends calls and never reads. Holding the tx ring at 1 already would also hold a
        slow server's answers back from its peers (their backlog check saw them later; a
        greedy peer's test measured more daemon memory)."""
        pending, config = self.pending, self.config
        return len(pending) >= factor * config.max_pending_records or pending.nbytes >= factor * config.max_pending_bytes

    def _apply_backpressure(self) -> None:
        """An app that reads slower than its peers write: stop reading their sockets."""
        if self._rx_backlogged() and not self.paused_routes:
            self.paused_routes = True
            for route in self.routes.values():
                route.conn.pause_reading()

    # -- schemas, endpoints -------------------------------------------------------------
    def register_schema(self, data: Any) -> dict[str, str]:
        schema = Schema.from_dict(data)
        merged = Schema(dict(self.schema.messages), dict(self.schema.enums), dict(self.schema.services))
        merged.merge(schema)
        check_app_schema(merged)
        # only this schema's services: the others' closures cannot change (merge refuses a
        # new definition of a known name), and they were checked when they came
        fingerprints = {name: merged.fingerprint(name) for name in schema.services}
        for route in self.routes.values():
            if route.role != "client":
                continue
            hello = _peer_hello(route)
            peer, closures = hello.get("services", {}), hello.get("closures", {})
            for svc, fp in fingerprints.items():
                if svc in peer and peer[svc] != fp:
                    if svc in closures:  # the peer's version of it: is ours still compatible?
                        reasons = compare(closure_schema(closures[svc])[0], merged, svc)
                        if not reasons:
                            continue
                        raise SchemaError(f"schema mismatch for service {svc} with peer {route.target}: "
                                          f"{incompatible_changes(reasons)}")
                    raise SchemaError(
                        f"schema mismatch for service {svc}: local fingerprint {fp}, peer {route.target} has {peer[svc]}; "
                        "regenerate stubs from the same .proto"
                    )
        self.schema = merged
        self._methods_by_id = None
        for route in self.routes.values():  # the app's layout may have changed: plans again
            self._set_plans(route)
        return fingerprints

    def methods_by_id(self) -> dict[int, Any]:
        if self._methods_by_id is None:
            self._methods_by_id = self.schema.methods_by_id()
        return self._methods_by_id

    def deliver_to_app(self, batch: list[R.Record]) -> None:
        """Push records straight to the app's rx ring (no inbound engines): daemon-made replies."""
        self._deliver_in(batch)

    def fail_calls(self, batch: list[R.Record], code: int, details: str) -> None:
        """End every call with a record in `batch` on both sides, bypassing the engines.

        For records that can no longer go on (an engine raised on them): the caller's side
        gets a final status `code` (the app for its own calls, the peer for calls it made),
        the other side a CANCEL, so neither waits for a deadline."""
        to_app: list[R.Record] = []
        seen: set[tuple[int, int]] = set()
        for rec in batch:
            kind = rec.kind
            key = (rec.handle, rec.call_id)
            if key in seen or kind not in (R.REQUEST, R.RESPONSE, R.CANCEL, R.WINDOW):
                continue
            seen.add(key)
            route = self.routes.get(rec.handle)
            if route is not None and rec.call_id in route.calls:  # a call being transcoded
                if route.role == "server":  # has the peer's side of the call ended (its END, its CANCEL)?
                    ended = kind == R.CANCEL or kind == R.REQUEST and bool(rec.flags & R.F_END)
                else:
                    ended = kind == R.RESPONSE and bool(rec.flags & R.F_END)
                self._call_failed(route, rec.call_id, ended)
            conn = None if route is None or route.conn.closed else route.conn
            if route is not None and route.role == "server":  # the peer called the app
                if conn is not None:
                    conn.send(error_response(0, rec.call_id, code, details).encode())
                to_app.append(R.parse_record(cancel_record(rec.handle, rec.call_id)))
            else:  # the app called out
                to_app.append(error_response(rec.handle, rec.call_id, code, details))
                if conn is not None:
                    conn.send(cancel_record(0, rec.call_id))
        if to_app and not self.closed:
            self._deliver_in(to_app)

    def _service_fingerprints(self, names: list[str] | None = None) -> ServiceSet:
        """Fingerprints and closures of the app's services (all, or `names`), for the HELLO."""
        return service_set(self.schema, names)

    async def bind(self, address: str, services: list[str]) -> str:
        """Listen on `address` for peers calling `services`; binding again updates the services."""
        host, port = split_address(address)
        missing = [s for s in services if s not in self.schema.services]
        if missing:
            raise SchemaError(f"cannot serve {', '.join(missing)}: register its schema first")
        binding = self.bindings.get(address)
        if binding is None:
            self._check_limit("listening addresses", "listeners", lambda s: len(s.listeners) + s.binding)
            binding = Binding()
        before = binding.fingerprints
        binding.fingerprints = self._service_fingerprints(services)
        binding.method_ids = frozenset(m.method_id for s in services for m in self.schema.services[s].methods)
        if binding.server is not None:
            for route in list(self.routes.values()):
                if route.binding is not binding:
                    continue
                # a service served here only now was not in that connection's HELLO: a peer
                # that announced another version of it was never compared (nor given
                # transcoding plans); it must reconnect, and its new HELLO is checked
                hello = _peer_hello(route)
                theirs, compared = hello.get("services", {}), hello.get("closures") or {}
                other = sorted(s for s, fp in binding.fingerprints.items()
                               if s not in before and s not in compared and s in theirs and theirs[s] != fp)
                if other:
                    reason = (f"the server now serves {', '.join(other)}, which this peer has in another version: "
                              "reconnect to compare the schemas")
                    self._close_route(route, reason)
                    continue
                unverified = frozenset(m.method_id for s in binding.fingerprints
                                       if s not in route.hello_services and s not in theirs
                                       for m in self.schema.services[s].methods)
                route.services, route.unverified = binding.method_ids - unverified, unverified
            return binding.address

        def on_connection(conn: tcp.PeerConnection) -> None:
            if self.closed:
                conn.close("server app is gone")
                return
            self._add_route(conn, "server", conn.peer, binding.method_ids, binding)

        def refused() -> None:
            self.stats["inbound_refused"] += 1

        transport, options = self._transport()
        inbound = self.daemon.inbound.listener(address, refused)
        self.binding += 1
        try:
            server = await transport.serve(host, port, lambda: binding.fingerprints, on_connection,
                                           max_record=self.config.max_record, admit=inbound.admit, **options)
        except BaseException:
            inbound.close()
            raise
        finally:
            self.binding -= 1
        if self.closed:  # dropped meanwhile: close() has run, nothing would ever close this one
            server.close()
            inbound.close()
            raise ConnectionError("app disconnected while binding")
        if not server.sockets:  # uvloop's answer when it could make no socket (out of descriptors)
            server.close()
            inbound.close()
            raise OSError(f"cannot listen on {address}: mrpcd could not make a socket (out of file descriptors?)")
        binding.server, binding.inbound = server, inbound
        self.listeners.append(server)
        sockname = binding.server.sockets[0].getsockname()
        binding.address = f"{sockname[0]}:{sockname[1]}" if ":" not in sockname[0] else f"[{sockname[0]}]:{sockname[1]}"
        inbound.address = binding.address
        self.bindings[address] = self.bindings[binding.address] = binding
        return binding.address

    def _transport(self) -> tuple[Any, dict[str, Any]]:
        """The daemon's configured transport module and its options: apps never choose it."""
        if self.config.transport == "rdma":
            from ..transports import rdma

            return rdma, {}
        return tcp, {"tls": self.config.tls, "allow": self.config.peers.allow}

    def _check_limit(self, what: str, kind: str, count: Callable[["AppSession"], int]) -> None:
        """Raise RESOURCE_EXHAUSTED if one more of `kind` would pass limits.<kind>_per_app
        or limits.<kind>_per_uid (counted over the live apps of this app's uid). The per-app
        bound holds for every app (a runaway loop is a bug whoever runs it); root and admins
        are trusted with more than one user's share."""
        limits = self.daemon.config.limits
        mine = count(self)
        if mine >= limits[f"{kind}_per_app"]:
            raise limit_exceeded(what, f"{kind}_per_app", mine, limits[f"{kind}_per_app"])
        if self.limits_exempt:
            return
        total = sum(count(s) for s in self.daemon.sessions.values() if s.uid == self.uid and not s.closed)
        if total >= limits[f"{kind}_per_uid"]:
            raise limit_exceeded(what, f"{kind}_per_uid", total, limits[f"{kind}_per_uid"], self.uid)

    async def connect(self, target: str) -> int:
        host, port = split_address(target)
        self._check_limit("peer connections", "connections", lambda s: s.client_routes + s.connecting)
        transport, options = self._transport()
        self.connecting += 1
        try:
            conn = await transport.connect(
                host, port, self._service_fingerprints(), max_record=self.config.max_record, timeout=self.config.connect_timeout, **options
            )
        except HandshakeError as exc:
            if REFUSED_MARK in str(exc):  # the peer's limits.inbound_connections*: not a schema problem
                raise ControlError(str(exc), 8) from None
            raise
        finally:
            self.connecting -= 1
        if self.closed:
            conn.close("client app is gone")
            raise ConnectionError("app disconnected while connecting")
        return self._add_route(conn, "client", target, frozenset()).handle

    def _add_route(self, conn: tcp.PeerConnection, role: str, target: str, method_ids: frozenset[int], binding: "Binding | None" = None) -> Route:
        if type(conn) is not self.daemon.transport_class:
            conn = migrate(conn, self.daemon.transport_class)  # made by the old code after an upgrade
        handle = self._next_handle
        self._next_handle += 1
        route = Route(handle, conn, role, target, method_ids, binding)
        self.routes[handle] = route
        if role == "client":
            self.client_routes += 1
        self._set_plans(route)
        conn.set_handlers(functools.partial(self._on_peer_records, route), functools.partial(self._on_peer_closed, route))
        self.receive_in_place(route, True)
        if self.paused_routes:
            conn.pause_reading()
        return route

    # -- schema evolution: transcoding what a peer of another schema version sends ------------
    def _set_plans(self, route: Route) -> None:
        """(Re)compute the route's transcoding plans from the peer's closures (its HELLO)."""
        closures = _peer_hello(route).get("closures")
        plans: dict[int, MethodPlan] | None = None
        if closures:
            def stale(svc: str, reason: str) -> None:
                log.warning("app %s: peer %s speaks another version of %s that no longer fits the app's: %s",
                            self.name, route.target, svc, reason, extra=self.log_fields(handle=route.handle))
            plans = plan_services(closures, self.schema, stale) or None
        was, route.plans = route.plans, plans
        if plans is None:
            route.calls.clear()
            route.failed.clear()
        elif was is None:
            log.info("app %s: peer %s speaks another version of its services; transcoding %d method(s)",
                     self.name, route.target, len(plans), extra=self.log_fields(handle=route.handle))
            self.receive_in_place(route, False)
            self._drop_in_place(route)

    def _close_route(self, route: Route, reason: str) -> None:
        """Close a peer connection whose schemas must be compared again (the peer reconnects)."""
        route.conn.close(reason)
        self._on_peer_closed(route, ConnectionError(reason))

    def _track_calls(self, route: Route, recs: list[R.Record]) -> None:
        """(sending to a transcoding route) Client side: remember the output transcoder of
        each call started, for its responses. Server side: forget a call the app ended."""
        calls = route.calls
        if route.role == "client":
            plans = route.plans
            if plans is None:
                return
            for rec in recs:
                if rec.kind == R.REQUEST and rec.flags & R.F_START:
                    mp = plans.get(rec.method_id)
                    if mp is not None and mp.output is not None:
                        _remember(calls, rec.call_id, mp.output)
                elif rec.kind == R.CANCEL and calls:  # the app gave up on it: forget it
                    calls.pop(rec.call_id, None)
        else:
            for rec in recs:
                if rec.kind == R.RESPONSE and rec.flags & R.F_END:
                    calls.pop(rec.call_id, None)

    def _transcode_in(self, route: Route, recs: list[R.Record]) -> list[R.Record]:
        """Records from a peer whose app speaks another version of the schema, turned into
        the app's layout: requests (server side) by the method's input type, responses
        (client side) by its output type, each message of a stream. A message that does not
        fit fails its call (INVALID_ARGUMENT for a request, INTERNAL for a response), never
        the connection."""
        plans, calls = cast("dict[int, MethodPlan]", route.plans), route.calls
        server = route.role == "server"
        want = R.REQUEST if server else R.RESPONSE
        out: list[R.Record] = []
        for rec in recs:
            kind = rec.kind
            if kind != want:
                if kind == R.CANCEL and server:
                    calls.pop(rec.call_id, None)
                    route.failed.pop(rec.call_id, None)
                out.append(rec)  # (wrong-direction kinds: _on_peer_records refuses them)
                continue
            flags, cid = rec.flags, rec.call_id
            if server and flags & R.F_START:
                mp = plans.get(rec.method_id) if rec.method_id in route.services else None
                tc = mp.input if mp is not None else None
                if tc is not None and not flags & R.F_END:
                    _remember(calls, cid, tc)
            else:
                if cid not in calls:
                    if cid in route.failed:  # its call already failed here: drop the rest
                        if flags & R.F_END:
                            del route.failed[cid]
                        continue
                    out.append(rec)  # a call of a method with nothing to transcode
                    continue
                tc = calls[cid]
                if flags & R.F_END:
                    del calls[cid]
            if tc is not None and not flags & R.F_NO_MSG:
                try:
                    rec.payload = tc(rec.payload)
                except TranscodeError as exc:
                    self._transcode_failed(route, rec, str(exc), out)
                    continue
                self.stats["transcoded"] += 1
            out.append(rec)
        return out

    @staticmethod
    def _call_failed(route: Route, cid: int, ended: bool) -> None:
        """(a transcoding route) The daemon failed call `cid` both ways: it leaves the call
        table (the peer need never end it); unless the peer's side of it `ended`, the rest
        of it is dropped."""
        route.calls.pop(cid, None)
        if not ended:
            _remember(route.failed, cid, None)

    def _transcode_failed(self, route: Route, rec: R.Record, reason: str, out: list[R.Record]) -> None:
        """Fail the call of a peer message that does not fit the app's schema, both ways."""
        cid, flags = rec.call_id, rec.flags
        self.stats["transcode_failed"] += 1
        n = self.stats["transcode_failed"]
        if worth_logging(n):
            log.warning("app %s: a message from peer %s does not fit the app's schema: %s", self.name, route.target,
                        reason, extra=self.log_fields(handle=route.handle, peer=route.target))
        self._call_failed(route, cid, bool(flags & R.F_END))
        if route.role == "server":
            details = f"mrpcd: the request does not fit the server's version of the schema: {reason}"
            rsp = error_response(0, cid, StatusCode.INVALID_ARGUMENT.code, details)
            if not route.conn.closed:
                route.conn.send(rsp.encode())
            if not flags & R.F_START:  # the app has the call: it ends (as the caller sees it)
                rsp.handle = route.handle
                self.observer.from_app([rsp])
                out.append(R.parse_record(cancel_record(route.handle, cid)))
        else:
            details = f"mrpcd: the response does not fit the client's version of the schema: {reason}"
            out.append(error_response(route.handle, cid, StatusCode.INTERNAL.code, details))
            if not flags & R.F_END and not route.conn.closed:
                route.conn.send(cancel_record(0, cid))

    def _on_peer_records(self, route: Route, recs: list[R.Record]) -> None:
        if route.plans is not None:
            recs = self._transcode_in(route, recs)
        batch = []
        for rec in recs:
            resident = rec.resident
            if resident:  # received in place: it is the first of its batch
                rec = self._resident_record(route, rec)
                if rec is None:
                    continue
            rec.handle = route.handle
            if rec.kind == R.REQUEST and route.role == "server":
                if rec.flags & R.F_START and rec.method_id not in route.services:
                    if rec.method_id in route.unverified:
                        self._drop_in_place(route)
                        reason = ("the server began serving this method's service after this connection's handshake, "
                                  "which compared neither side's version of it: reconnect to compare the schemas")
                        self._close_route(route, reason)
                        return
                    # unknown service or method: answer here, the app never sees it
                    self.stats["unimplemented"] += 1
                    rsp = error_response(0, rec.call_id, StatusCode.UNIMPLEMENTED.code, "Method not found!")
                    route.conn.send(rsp.encode())
                    if resident:  # this record's reservation (not that of one before it in the batch)
                        self._drop_in_place(route)
                    continue
            elif rec.kind == R.RESPONSE and route.role == "server" or rec.kind == R.REQUEST and route.role == "client":
                self._drop_in_place(route)
                route.conn.close(f"protocol error: record kind {rec.kind} in the wrong direction")
                return
            elif rec.kind not in (R.REQUEST, R.RESPONSE, R.CANCEL, R.WINDOW):
                self._drop_in_place(route)
                route.conn.close(f"protocol error: unexpected record kind {rec.kind}")
                return
            self.stats["bytes_in"] += rec.size
            batch.append(rec)
        if batch:
            self.datapath.inbound(batch)

    def _on_peer_closed(self, route: Route, exc: Exception | None) -> None:
        """Tell the app: every call on this handle fails (client) or is cancelled (server)."""
        self._drop_in_place(route)  # the rest of that record never comes
        if self.routes.pop(route.handle, None) is None or self.closed:
            return
        if route.role == "client":
            self.client_routes -= 1
        self.datapath.handle_closed(route.handle)
        reason = str(exc) if exc else "peer closed the connection"
        log.info("app %s: connection %d to %s closed: %s", self.name, route.handle, route.target, reason,
                 extra=self.log_fields(handle=route.handle, peer=route.target, role=route.role))
        meta = R.encode_metadata([(":details", f"connection to {route.target} lost: {reason}")], internal=True)
        goaway = R.parse_record(R.encode_record(R.GOAWAY, 0, StatusCode.UNAVAILABLE.code, route.handle, 0, 0, 0, meta, b""))
        self._deliver_in([goaway])

    def close_handle(self, handle: int) -> None:
        route = self.routes.pop(handle, None)
        if route is not None:
            if route.role == "client":
                self.client_routes -= 1
            self._drop_in_place(route)
            route.conn.close()
            self.datapath.handle_closed(handle)

    # -- teardown -----------------------------------------------------------------------
    def close(self) -> None:
        """Reclaim everything: routes, listeners, wake-up fds, shared memory."""
        if self.closed:
            return
        self._end_in_place()  # before the ring goes: the decoder must not write into it
        self.closed = True
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self.poller.release(self)
        self.observer.close()
        self.loop.remove_reader(self.daemon_waker.fileno())
        self.policies.close_all()
        for route in list(self.routes.values()):
            route.conn.close("app disconnected")
        self.routes.clear()
        self.client_routes = 0
        for server in self.listeners:
            server.close()
        self.listeners.clear()
        for binding in self.bindings.values():  # its connections were closed just above
            if binding.inbound is not None:
                binding.inbound.close()
        self.pending.clear()
        self.daemon_waker.close()
        self.app_waker.close()
        if self._lent:
            return  # sockets still write from the app's ring: _free_returned unmaps it after the last lease
        self.rings.close()

    def log_fields(self, **more: Any) -> dict[str, Any]:
        """`extra=` fields of a log line about this app (the JSON log format shows them)."""
        return {"app_id": self.app_id, "app": self.name, "pid": self.pid, **more}

    def describe(self) -> dict[str, Any]:
        """What `mrpcctl apps` shows of this app; of each list the app makes as long as it
        likes, the first LIST_SHOWN entries and `<list>_more` (reply_limits.py)."""
        out: dict[str, Any] = {"app_id": self.app_id, "name": self.name, "pid": self.pid, "uid": self.uid}
        shown(out, "services", sorted(self.schema.services))
        shown(out, "listening", sorted({b.address for b in self.bindings.values()}))
        routes = []
        for r in islice(self.routes.values(), LIST_SHOWN):
            route = {"handle": r.handle, "role": r.role, "peer": r.target, "socket_peer": r.conn.peer,
                     "transport": getattr(r.conn, "VERSION", "?")}
            if r.plans:
                shown(route, "transcoding", sorted({p.path for p in r.plans.values()}))
                route["tracked_calls"] = len(r.calls)
            routes.append(route)
        out["routes"] = routes
        if len(self.routes) > LIST_SHOWN:
            out["routes_more"] = len(self.routes) - LIST_SHOWN
        out.update(engines=self.policies.describe(), pending=len(self.pending), stats=dict(self.stats))
        return out


def address_text(address: object) -> str:
    """`address` if it is text that can be "host:port" (a control message's field may be
    anything), else the error split_address gives for it."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address {address!r} must be host:port")
    return address


def split_address(address: object) -> tuple[str, int]:
    """"host:port" or "[v6]:port" → (host, port), with a clear error for anything else."""
    host, _, port_s = address_text(address).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"address {address!r}: port {port_s!r} is not a number") from None
    if not host and 0 <= port <= 65535:
        raise ValueError(f"address {address!r} names no host (e.g. '127.0.0.1:{port}')")
    if not 0 <= port <= 65535 or not host:
        raise ValueError(f"address {address!r} must be host:port with port 0..65535")
    return host, port
