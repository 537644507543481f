# cython: language_level=3
"""The daemon-to-daemon TCP connection: an asyncio protocol object, compiled.

``PeerConnection`` is both the protocol uvloop drives (uvloop duck-types protocols: it only
looks up ``connection_made``, ``data_received``, ...) and the object the daemon holds. The
per-byte work (framing, bounds checks) is ``mrpcd.marshal.records.FrameDecoder``; this file
does the per-batch work: run the handshake, route records, coalesce writes into one
``writelines`` (→ writev) per loop iteration, and turn every peer misbehaviour into a
closed connection with a reason, never an exception in the event loop.

Public behaviour is documented in ``mrpcd.transports.tcp``.
"""
import asyncio
import logging
import socket

from mrpcd.marshal.records import GOAWAY, HELLO, FrameDecoder, RecordError
from mrpcd.transports.handshake import (
    DONE,
    FAILED,
    Handshake,
    HELLO_MAX_RECORD,
    HandshakeError,
    make_goaway,
    parse_goaway,
)

log = logging.getLogger("mrpcd.transports.tcp")

cdef int K_HELLO = HELLO
cdef int K_GOAWAY = GOAWAY

# How long close() lets buffered writes drain before aborting the socket.
CLOSE_TIMEOUT = 5.0
SHORT_READ = 16 * 1024  # the read after a record received in place (get_buffer)


class PeerGoaway(ConnectionError):
    """The peer closed the connection with a GOAWAY record; ``details`` is its reason."""

    def __init__(self, message, details=""):
        super().__init__(message)
        self.details = details


def _format_peer(transport):
    try:
        addr = transport.get_extra_info("peername")
    except Exception:
        addr = None
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        if ":" in host:
            host = "[" + host + "]"
        return host + ":" + str(addr[1])
    return str(addr) if addr is not None else "?"


cdef bint _plain(transport):
    """Does this transport write our buffers as they are? uvloop's TCP transport keeps a
    buffer export of each until the kernel took it (so a Lease knows when it is free);
    TLS encrypts from a backlog on its own schedule, so lent buffers are copied for it."""
    try:
        return transport.get_extra_info("sslcontext") is None and transport.get_extra_info("socket") is not None
    except Exception:
        return False


cdef class PeerConnection:
    """One daemon-to-daemon TCP connection (the asyncio protocol object itself).

    Created by ``connect()`` / ``serve()``; the daemon only sees it once the handshake is done.
    """

    cdef readonly object transport
    cdef public object peer_hello
    cdef readonly str role
    cdef readonly str peer
    cdef readonly bint closed            # close() called, or the connection failed / was lost
    cdef readonly bint established       # handshake done
    cdef readonly bint writing_paused    # the transport's write buffer is above its high-water mark
    cdef readonly unsigned long long records_in, records_out, bytes_in
    cdef readonly unsigned long long bytes_queued  # record bytes given to send()/send_batch()
    cdef object _decoder
    cdef Py_ssize_t _max_record          # the data records' limit (the HELLO's: HELLO_MAX_RECORD)
    cdef object _loop
    cdef object _hs
    cdef object _services_for
    cdef object _on_ready
    cdef object _on_records
    cdef object _on_close
    cdef list _out
    cdef list _pending
    cdef bint _flush_scheduled
    cdef bint _lost
    cdef bint _close_known
    cdef bint _close_reported
    cdef object _close_exc
    cdef bint _user_paused
    cdef bint _reading_paused
    cdef double _handshake_timeout
    cdef object _handshake_timer
    cdef object _abort_timer
    cdef list _drain_waiters
    cdef object _scratch                 # read buffer (buffered protocol) for small reads
    cdef bint _direct                    # the last get_buffer() handed out a record's buffer
    cdef bint _short_next                # a record was just received in place: read little next
    cdef readonly bint zero_copy_send    # plain TCP: uvloop holds a buffer export until written

    def __init__(self, str role, services_for, on_ready, Py_ssize_t max_record=16 << 20,
                 double handshake_timeout=0.0):
        if role not in ("client", "server"):
            raise ValueError("role must be 'client' or 'server'")
        self.role = role
        self.peer = "?"
        self._services_for = services_for
        self._on_ready = on_ready
        # the peer's HELLO may carry its schema closures (schema evolution): it may be bigger
        # than an operator's small max_record; data records get max_record once it is done
        self._max_record = max_record
        self._decoder = FrameDecoder(max(max_record, HELLO_MAX_RECORD))
        self._out = []
        self._pending = []
        self._drain_waiters = []
        self._handshake_timeout = handshake_timeout
        self.peer_hello = None

    def __repr__(self):
        state = "closed" if self.closed else ("open" if self.established else "handshaking")
        return f"<PeerConnection {self.role} peer={self.peer} {state}>"

    # ------------------------------------------------------------------ asyncio protocol

    def connection_made(self, transport):
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self.peer = _format_peer(transport)
        self.zero_copy_send = _plain(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        try:
            services = self._services_for()
            self._hs = Handshake(self.role, services)
        except Exception as exc:
            log.exception("cannot start the handshake with %s", self.peer)
            self._fail_handshake(HandshakeError(f"internal error starting the handshake: {exc!r}"), None)
            return
        out = self._hs.start()
        if out:
            transport.writelines(out)
        if self._handshake_timeout > 0:
            self._handshake_timer = self._loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def data_received(self, data):
        if self.closed:
            return  # closing: whatever the peer still sends is dropped
        self.bytes_in += len(data)
        self._received(data, -1)

    # uvloop drives a protocol with get_buffer/buffer_updated as a buffered protocol: a
    # large record is then read straight into its own buffer (the decoder's), one copy
    # from the socket instead of socket -> chunk -> record. Other reads go to a scratch
    # buffer and are fed like data_received (the decoder copies them once, as before).
    #
    # After a record received in place (FrameDecoder.set_sink: straight into the app's
    # ring) the next read is small: if it starts another big record, only its first
    # SHORT_READ bytes go through the scratch buffer (and are copied into the ring), the rest
    # is read straight into the ring; up to 256 KiB of it would otherwise be copied twice.
    def get_buffer(self, Py_ssize_t sizehint):
        if not self.closed:
            view = self._decoder.recv_buffer(65536)
            if view is not None:
                self._direct = True
                return view
        self._direct = False
        if self._scratch is None:
            self._scratch = bytearray(256 * 1024)
        if self._short_next:
            self._short_next = False
            return memoryview(self._scratch)[:SHORT_READ]
        return self._scratch

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.closed:
            self._direct = False
            return
        self.bytes_in += nbytes
        if self._direct:
            self._direct = False
            in_place = self._decoder.in_place
            self._received(None, nbytes)
            self._short_next = in_place and not self._decoder.in_place  # that read ended it
        else:
            self._received(memoryview(self._scratch)[:nbytes], -1)

    cdef void _received(self, data, Py_ssize_t direct):
        cdef list records
        try:
            if direct >= 0:
                records = self._decoder.recv_done(direct)
            else:
                records = self._decoder.feed(data)
        except RecordError as exc:
            # the complete records before the bad frame still count (RecordError.records)
            good = getattr(exc, "records", None)
            if good and self.established:
                self._deliver(list(good))
            self._peer_error(f"malformed record from peer: {exc}", exc)
            return
        except Exception as exc:  # a decoder bug must not escape into the loop either
            log.exception("frame decoder failed on data from %s", self.peer)
            self._peer_error(f"internal error decoding records: {exc!r}", exc)
            return
        if not records:
            return
        if not self.established:
            records = self._run_handshake(records)
            if not records or self.closed:
                return
        self._deliver(records)

    def eof_received(self):
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc):
        cdef list waiters
        self._lost = True
        self._cancel_timers()
        waiters = self._drain_waiters
        self._drain_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection to {self.peer} lost"))
        if not self.established:
            reason = f"connection closed by {self.peer} during the handshake"
            if exc is not None:
                reason += f" ({exc})"
            self._fail_handshake(ConnectionError(reason), None)
            return
        if not self._close_known:
            self._close_known = True
            if self.closed:  # we closed it ourselves (close())
                self._close_exc = None
            else:
                pending = self._decoder_pending()
                if exc is not None:
                    msg = f"connection to {self.peer} lost: {exc}"
                else:
                    msg = f"connection closed by {self.peer} without GOAWAY"
                if pending:
                    msg += f", in the middle of a record ({pending} bytes of it received)"
                err = ConnectionError(msg)
                if exc is not None:
                    err.__cause__ = exc
                self._close_exc = err
        self.closed = True
        self._report_close()

    def pause_writing(self):
        self.writing_paused = True

    def resume_writing(self):
        cdef list waiters
        self.writing_paused = False
        waiters = self._drain_waiters
        self._drain_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------------ public API

    def send(self, record):
        """Queue one encoded record (bytes, or a buffer left unchanged until written).

        Records queued during one loop iteration go out in one writelines (→ writev).
        """
        if self.closed:
            raise ConnectionError(f"connection to {self.peer} is closed")
        self._out.append(record)
        self.records_out += 1
        self.bytes_queued += len(record)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_batch(self, records, Py_ssize_t count=-1, Py_ssize_t nbytes=-1):
        """Write encoded records now, with one transport.writelines() (→ one writev).

        ``records`` are bytes-like buffers left unchanged until written (zero-copy views
        are fine: uvloop keeps a reference until the kernel took the bytes). ``count`` is
        how many records they hold when one buffer carries several (default: one each);
        ``nbytes`` their total length when the caller knows it (default: summed here).
        Records already queued by send() go first, in the same writelines.
        """
        if self.closed:
            raise ConnectionError(f"connection to {self.peer} is closed")
        self.records_out += len(records) if count < 0 else count
        if nbytes < 0:
            nbytes = 0
            for rec in records:
                nbytes += len(rec)
        self.bytes_queued += nbytes
        if self._out:
            self._out.extend(records)
            self._flush()
            return
        self.transport.writelines(records)

    def set_in_place(self, sink, Py_ssize_t min_size):
        """Receive records of at least `min_size` bytes straight into the buffer
        `sink(total)` gives (or None: as usual); see FrameDecoder.set_sink."""
        self._decoder.set_sink(sink, min_size)

    def evict_in_place(self):
        """The record being received in place goes on in a buffer of our own (its sink's
        owner needs the buffer back); True if there was one. FrameDecoder.evict."""
        return self._decoder.evict()

    def write_backlog(self):
        """Bytes queued for the peer and not yet taken by the kernel (records send() queued
        for this loop iteration included)."""
        cdef Py_ssize_t n = 0
        if self.transport is not None and not self._lost:
            n = self.transport.get_write_buffer_size()
        for rec in self._out:
            n += len(rec)
        return n

    def flush(self):
        """Write queued records now instead of at the end of this loop iteration."""
        self._flush()

    def set_handlers(self, on_records, on_close):
        """on_records(list[Record]) per received batch; on_close(exc | None) once, at the end.

        Records received before this call are delivered now; if the connection already
        closed, on_close is called now too. on_close(None) means we closed it (close()).
        """
        self._on_records = on_records
        self._on_close = on_close
        if self._pending:
            pending = self._pending
            self._pending = []
            self._call_on_records(pending)
        self._update_reading()
        if self._close_known:
            self._report_close()

    def pause_reading(self):
        self._user_paused = True
        self._update_reading()

    def resume_reading(self):
        self._user_paused = False
        self._update_reading()

    def drain(self):
        """An awaitable that completes once the transport accepts writes again."""
        fut = self._loop.create_future()
        if self.closed:
            fut.set_exception(ConnectionError(f"connection to {self.peer} is closed"))
        elif not self.writing_paused:
            fut.set_result(None)
        else:
            self._drain_waiters.append(fut)
        return fut

    def close(self, reason=None):
        """Flush queued records, send GOAWAY (with ``reason`` as :details if given), close."""
        if self.closed:
            return
        self.closed = True
        if not self.established:
            self._close_known = True
        self._flush()
        if self.transport is not None and not self._lost:
            try:
                self.transport.write(make_goaway(reason))
            except Exception:
                pass
            self._close_transport()
        if not self.established:
            self._fail_handshake(HandshakeError(reason or "connection closed locally during the handshake"), None)

    def abort(self):
        """Close at once, dropping anything not yet written."""
        self.closed = True
        if self.transport is not None and not self._lost:
            self.transport.abort()

    def fail_handshake(self, str reason):
        """Abort a handshake still in progress (e.g. on a timeout): GOAWAY + close."""
        if self.established or self.closed or self._hs is None:
            return
        out = self._hs.fail(reason)
        self._fail_handshake(self._hs.error, out)

    def stats(self):
        return {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "bytes_in": self.bytes_in,
            "write_buffer": self.transport.get_write_buffer_size() if self.transport is not None and not self._lost else 0,
        }

    # ------------------------------------------------------------------ live upgrade

    VERSION = "1"

    def hand_over(self):
        """Give this connection's live state to a new transport version; this object goes quiet.

        Returns the asyncio transport (the socket stays open: the peer notices nothing), the
        frame decoder with any partial record in it, output not yet written, records not yet
        delivered, the handlers and the counters. Afterwards this object neither reads, writes
        nor reports a close: `adopt()` on the new class takes over from the next byte.
        """
        if self.closed or not self.established or self._lost:
            raise ConnectionError(f"only an open, established connection can be handed over ({self!r})")
        state = {
            "transport": self.transport, "peer_hello": self.peer_hello, "role": self.role, "peer": self.peer,
            "decoder": self._decoder, "out": self._out, "pending": self._pending,
            "on_records": self._on_records, "on_close": self._on_close,
            "user_paused": self._user_paused, "writing_paused": self.writing_paused,
            "drain_waiters": self._drain_waiters,
            "records_in": self.records_in, "records_out": self.records_out, "bytes_in": self.bytes_in,
            "bytes_queued": self.bytes_queued,
        }
        self._out = []
        self._pending = []
        self._drain_waiters = []
        self._on_records = None
        self._on_close = None
        self._cancel_timers()
        self.closed = True
        self._close_known = True
        self._close_reported = True  # the new owner reports the close, not us
        self._lost = True  # and we never touch the transport again
        return state

    @classmethod
    def adopt(cls, dict state):
        """Build a connection of this (new) class from `hand_over()` state, on the same socket."""
        cdef PeerConnection conn = cls(state["role"], None, None)
        cdef list pending
        conn.transport = state["transport"]
        conn.zero_copy_send = _plain(conn.transport)
        conn._loop = asyncio.get_running_loop()
        conn.peer = state["peer"]
        conn.peer_hello = state["peer_hello"]
        conn._decoder = state["decoder"]
        conn._out = list(state["out"])
        conn._pending = list(state["pending"])
        conn._on_records = state["on_records"]
        conn._on_close = state["on_close"]
        conn._user_paused = state["user_paused"]
        conn.writing_paused = state["writing_paused"]
        conn._drain_waiters = list(state["drain_waiters"])
        conn.records_in = state["records_in"]
        conn.records_out = state["records_out"]
        conn.bytes_in = state["bytes_in"]
        conn.bytes_queued = state.get("bytes_queued", conn.write_backlog())  # (from a version without it)
        conn.established = True
        conn.transport.set_protocol(conn)
        if conn._out:
            conn._flush_scheduled = True
            conn._loop.call_soon(conn._flush)
        if conn._pending and conn._on_records is not None:
            pending = conn._pending
            conn._pending = []
            conn._call_on_records(pending)
        conn._update_reading()
        return conn

    def bytes_taken(self):
        """Record bytes the kernel has taken so far: grows while the peer reads (what a
        daemon watches to tell a peer that stopped reading from a slow one)."""
        return self.bytes_queued - self.write_backlog()

    # ------------------------------------------------------------------ internals

    def _flush(self):
        self._flush_scheduled = False
        if not self._out:
            return
        out = self._out
        self._out = []
        if self._lost:
            return
        self.transport.writelines(out)

    cdef Py_ssize_t _decoder_pending(self):
        for name in ("pending", "buffered", "pending_bytes"):
            value = getattr(self._decoder, name, None)
            if value is None:
                continue
            if callable(value):
                try:
                    value = value()
                except Exception:
                    return 0
            try:
                return int(value)
            except (TypeError, ValueError):
                return 0
        return 0

    cdef list _run_handshake(self, list records):
        cdef Py_ssize_t i = 0, n = len(records)
        hs = self._hs
        while i < n:
            rec = records[i]
            i += 1
            out = hs.receive(rec)
            state = hs.state
            if state == DONE:
                self._decoder.max_record = self._max_record
                for rec in records[i:]:  # decoded in the same read as the HELLO, under its limit
                    if rec.size > self._max_record:
                        self._peer_error(f"record of {rec.size} bytes exceeds max_record {self._max_record}", None)
                        return None
                if out:
                    self.transport.writelines(out)
                self.established = True
                self.peer_hello = hs.peer_hello
                self._cancel_handshake_timer()
                self._ready(None)
                return records[i:]
            if state == FAILED:
                self._fail_handshake(hs.error, out)
                return None
        return None

    cdef void _deliver(self, list records):
        cdef Py_ssize_t i, n = len(records)
        cdef int kind
        for i in range(n):
            kind = records[i].kind
            if kind == K_HELLO or kind == K_GOAWAY:
                break
        else:
            self.records_in += n
            self._deliver_data(records)
            return
        # slow path: a control record in the batch
        if i:
            self.records_in += i
            self._deliver_data(records[:i])
            if self.closed:
                return
        rec = records[i]
        if kind == K_GOAWAY:
            details = parse_goaway(rec)
            msg = f"peer {self.peer} closed the connection"
            if details:
                msg += f": {details}"
            self._close_known = True
            self._close_exc = PeerGoaway(msg, details)
            self.closed = True
            self._flush()
            self._close_transport()
            # records after a GOAWAY are dropped: the peer promised to send nothing more
            return
        self._peer_error("protocol error: HELLO record after the handshake", None)

    cdef void _deliver_data(self, list records):
        if self._on_records is None:
            self._pending.extend(records)
            self._update_reading()
        else:
            self._call_on_records(records)

    cdef void _call_on_records(self, list records):
        try:
            self._on_records(records)
        except Exception as exc:
            log.exception("on_records handler failed for connection %s", self.peer)
            self._local_error(f"internal error in the receiving daemon: {exc!r}", exc)

    cdef void _update_reading(self):
        cdef bint want
        if self.transport is None or self._lost or self.closed:
            return
        want = self._user_paused or (self._on_records is None and len(self._pending) > 0)
        if want == self._reading_paused:
            return
        self._reading_paused = want
        try:
            if want:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()
        except Exception:
            pass

    cdef void _peer_error(self, str reason, exc):
        """The peer broke the protocol: GOAWAY with the reason, close, report exc."""
        if not self.established:
            err = HandshakeError(reason)
            self._fail_handshake(err, [make_goaway(reason)])
            return
        if self.closed:
            return
        log.warning("closing connection with %s: %s", self.peer, reason)
        if exc is None:
            exc = ConnectionError(reason)
        self._abort_with(reason, exc)

    cdef void _local_error(self, str reason, exc):
        if self.closed:
            return
        self._abort_with(reason, exc)

    cdef void _abort_with(self, str reason, exc):
        self.closed = True
        self._close_known = True
        self._close_exc = exc
        self._out = []
        if not self._lost:
            try:
                self.transport.write(make_goaway(reason))
            except Exception:
                pass
            self._close_transport()

    cdef void _fail_handshake(self, exc, out):
        self.closed = True
        self._close_known = True
        if self._close_exc is None:
            self._close_exc = exc
        self._cancel_handshake_timer()
        if self.transport is not None and not self._lost:
            if out:
                try:
                    self.transport.writelines(out)
                except Exception:
                    pass
            self._close_transport()
        self._ready(self._close_exc)

    cdef void _ready(self, exc):
        cb = self._on_ready
        if cb is None:
            return
        self._on_ready = None
        try:
            cb(self, exc)
        except Exception:
            log.exception("connection-ready callback failed for %s", self.peer)
            if exc is None and not self.closed:
                self._local_error("internal error accepting the connection", None)

    def _handshake_timed_out(self):
        self._handshake_timer = None
        self.fail_handshake(f"no handshake from {self.peer} within {self._handshake_timeout:g} s")

    cdef void _close_transport(self):
        self.transport.close()
        if self._abort_timer is None and self._loop is not None:
            self._abort_timer = self._loop.call_later(CLOSE_TIMEOUT, self._abort_after_close)

    def _abort_after_close(self):
        self._abort_timer = None
        if not self._lost:
            self.transport.abort()

    cdef void _cancel_handshake_timer(self):
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    cdef void _cancel_timers(self):
        self._cancel_handshake_timer()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    cdef void _report_close(self):
        if self._close_reported or self._on_close is None or not self._lost:
            return
        self._close_reported = True
        cb = self._on_close
        self._on_close = None
        self._on_records = None
        try:
            cb(self._close_exc)
        except Exception:
            log.exception("on_close handler failed for connection %s", self.peer)
