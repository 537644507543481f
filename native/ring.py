"""Shared-memory SPSC rings between an app and its daemon, and eventfd wake-ups.

One memfd per app holds two rings: ``tx`` (app → daemon) and ``rx`` (daemon → app).
Each is a single-producer single-consumer ring of variable-length records (ring.c); the
daemon and the app map the same memfd, so a record is written once by its producer and
copied out once by its consumer. The app is untrusted: the C side validates every index
and length it reads from shared memory and reports a broken ring as ``RingCorrupt``
instead of reading outside the mapping.

Wake-up protocol (io_uring's "needs wake-up" flags; there is one eventfd per direction
of waiting, see ``Waker``):

* Consumer, ring empty: it may spin a little, then calls ``prepare_sleep()``. That sets
  ``consumer_sleeping``, issues a full fence and re-reads head. False means data arrived
  in between: do not sleep, pop again. True means it may block on its eventfd; after
  waking it calls ``finish_sleep()`` and pops.
* Producer, after every ``push``/``push_many`` call, whatever it returned (a push that
  found the ring full may still have published a wrap marker):
  ``should_wake_consumer()`` issues a full fence, then reads ``consumer_sleeping``; only
  if it was set (and this producer is the one that cleared it) does the producer write
  the consumer's eventfd.
* Producer, ring full: ``prepare_wait_for_space(n)`` sets ``producer_waiting``, fences,
  re-reads tail. True means a record of n bytes still cannot go in: block on the
  producer's eventfd, then ``finish_wait()`` and push again.
* Consumer, after every ``pop_batch`` call, even one that returned nothing (skipping a
  lone wrap marker frees space): ``should_wake_producer()`` fences, reads
  ``producer_waiting`` and, if set, clears it: then write the producer's eventfd.

Why a full ring still publishes a wrap marker: a record longer than the bytes left
before the end of the data area has to start at offset 0. If the producer waited for
room for "filler + record" at once, a record close to the capacity could never go in,
even into an empty ring. So when the filler fits but the record does not, the producer
publishes the filler alone and reports "full"; the consumer skips it, the space comes
back from offset 0, and ``prepare_wait_for_space`` never lets a producer sleep on a ring
the consumer has nothing left to free in.

The fences pair up (store flag → fence → load index on one side; store index → fence →
load flag on the other), so at least one side sees the other's write: either the sleeper
sees the new data/space and does not sleep, or the waker sees the flag and signals. No
wake-up is lost. Because a flag is only set by a side that found nothing to do, and is
cleared by the first signal, a busy ring costs no syscall per record: producers and
consumers exchange whole batches through memory and only touch an eventfd when the
other side is actually asleep.

The other side can still misbehave with the flags (never set them, set them always):
that costs it latency or spurious wake-ups, never the daemon's correctness. A daemon
must not block on an app forever; it uses eventfds from its event loop, not ``wait``.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import select
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union, cast

from mrpcd.native._ring import ffi, lib

__all__ = [
    "CONTROL_SIZE",
    "RECORD_HEADER",
    "MIN_CAPACITY",
    "MAX_CAPACITY",
    "RingCorrupt",
    "RingLayout",
    "layout",
    "shm_size_for",
    "create_shared_memory",
    "Ring",
    "RingPair",
    "Waker",
]

Buffer = Union[bytes, bytearray, memoryview]

CONTROL_SIZE: int = lib.RING_CTRL_SIZE  # control block before each data area (3 cache lines)
RECORD_HEADER: int = lib.RING_REC_HDR  # u32 length + u32 reserved
MIN_CAPACITY: int = lib.RING_MIN_CAPACITY
MAX_CAPACITY: int = lib.RING_MAX_CAPACITY


def record_space(nbytes: int) -> int:
    """Ring bytes a record of `nbytes` takes: its header, the data rounded up to 8 (ring.c's
    space_needed, without the filler a wrap may add)."""
    return RECORD_HEADER + ((nbytes + 7) & ~7)

# Above this many bytes, push_many hands C one pointer per record instead of joining the
# records into one buffer first: the join is a copy that only pays off for small records.
_JOIN_LIMIT = 16 * 1024

# C entry points handed to compiled code (mrpcd.marshal._framing) as plain addresses, so the
# per-record datapath loop runs without a cffi call per record. Same compiled ring.c.
_FN_ADDRS = tuple(
    int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
    for name in ("ring_used_bytes", "ring_peek", "ring_pop_batch", "ring_push_segs",
                 "ring_take_batch", "ring_release", "ring_reserve", "ring_commit", "ring_unreserve",
                 "ring_take_more", "ring_release_bytes", "ring_producer_should_wake",
                 "ring_consumer_should_wake_producer", "ring_untake")
)


class RingCorrupt(Exception):
    """The other side wrote an impossible index or record length into the shared ring.

    The ring cannot be trusted any more (the error is sticky); the daemon drops the app.
    """


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RingLayout:
    """Where the two rings live in one memfd, derived from its size alone.

    Both processes compute it from ``(fd, size)`` so they cannot disagree: the daemon
    sends only the size over the control socket, never offsets the app could lie about.
    """

    size: int  # memfd size
    capacity: int  # data bytes per ring (power of two)
    tx_offset: int  # app → daemon ring (the app produces)
    rx_offset: int  # daemon → app ring (the daemon produces)


def _check_capacity(capacity: int) -> None:
    if not (MIN_CAPACITY <= capacity <= MAX_CAPACITY) or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {capacity}"
        )


def shm_size_for(capacity: int) -> int:
    """memfd size that holds two rings of ``capacity`` data bytes each."""
    _check_capacity(capacity)
    return 2 * (CONTROL_SIZE + capacity)


def layout(total_size: int) -> RingLayout:
    """Split a memfd of ``total_size`` bytes into tx and rx rings.

    Each ring gets the largest power-of-two capacity that fits in half the size; every
    control block is 64-byte aligned (CONTROL_SIZE and the capacity are multiples of 64).
    """
    half = total_size // 2 - CONTROL_SIZE
    if half < MIN_CAPACITY:
        raise ValueError(f"shared memory of {total_size} bytes is too small for two rings")
    capacity = min(1 << (half.bit_length() - 1), MAX_CAPACITY)
    return RingLayout(total_size, capacity, 0, CONTROL_SIZE + capacity)


def create_shared_memory(size: int, name: str = "mrpcd-rings") -> int:
    """Create a memfd of ``size`` bytes, sealed against shrinking and growing.

    The app maps the same file. Without the seals it could ftruncate it and make the
    daemon's next access to the mapping raise SIGBUS, killing every app's daemon. With
    F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL the size is fixed for good (F_SEAL_SEAL
    stops the app from adding seals, e.g. write seals, later). CLOEXEC: the fd reaches an
    app only through SCM_RIGHTS, never by inheritance.
    """
    if size <= 0:
        raise ValueError("shared memory size must be positive")
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(
            fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


# ----------------------------------------------------------------------------- ring


class Ring:
    """One SPSC ring at ``offset`` inside ``buffer`` (an mmap of the shared memory).

    A Ring object is one side's view: use it either as the producer or as the consumer
    (a single process may do both, e.g. in tests). The view keeps its own position and
    the capacity in private memory; only the other side's index is read from the
    shared control block, and it is validated each time.
    """

    def __init__(self, buffer: Buffer | mmap.mmap, offset: int, capacity: int, *, init: bool = False) -> None:
        """Map a ring. ``init=True`` formats a fresh ring (the creator, i.e. the daemon);
        otherwise attach to an existing one and check that its control block is sane."""
        _check_capacity(capacity)
        self._cbuf = ffi.from_buffer(buffer, require_writable=True)
        if offset < 0 or offset % 64 or offset + CONTROL_SIZE + capacity > len(self._cbuf):
            ffi.release(self._cbuf)
            raise ValueError("ring does not fit the buffer at that offset (or offset not 64-aligned)")
        self.capacity = capacity
        self.max_record = capacity - RECORD_HEADER  # largest record the ring can ever hold
        self._r = ffi.new("ring_t *")
        base = self._cbuf + offset
        rc = lib.ring_init(self._r, base, capacity) if init else lib.ring_attach(self._r, base, capacity)
        if rc != 0:
            ffi.release(self._cbuf)
            if rc == lib.RING_E_CORRUPT:
                raise RingCorrupt("ring control block is inconsistent (capacity or indices)")
            raise ValueError("buffer is not 64-byte aligned")
        self._out = None  # pop buffer (capacity bytes), allocated on the first pop
        self._out_mv: Optional[memoryview] = None
        self._lens = ffi.new("uint32_t[]", 64)
        self._cp: Optional[tuple[int, ...]] = None  # c_pointers(), cached

    # -- producer ---------------------------------------------------------------

    def push(self, data: Buffer) -> bool:
        """Append one record. False: the ring is full now (wait for space and retry).

        Raises ValueError if the record can never fit, RingCorrupt if the consumer broke
        the ring. No copy is made before the one into shared memory.
        """
        n = len(data)
        if n > self.max_record:
            raise ValueError(f"record of {n} bytes exceeds the ring's maximum of {self.max_record}")
        buf = data if type(data) is bytes else ffi.from_buffer(data)
        rc = lib.ring_try_push(self._r, buf, n)
        if rc == 0:
            return True
        return self._push_error(rc)

    def push_many(self, records: Sequence[Buffer]) -> int:
        """Append records in order until one does not fit; return how many went in.

        One C call and one head publication for the whole batch, so the consumer sees
        the batch at once and at most one wake-up is needed. The caller keeps
        ``records[n:]`` for later. Every record is size-checked before any is pushed.
        """
        count = len(records)
        if count == 0:
            return 0
        lens = [len(r) for r in records]
        if max(lens) > self.max_record:
            raise ValueError(f"record of {max(lens)} bytes exceeds the ring's maximum of {self.max_record}")
        clens = ffi.new("uint32_t[]", lens)
        if sum(lens) <= _JOIN_LIMIT:
            rc = lib.ring_push_packed(self._r, b"".join(records), clens, count)
        else:
            keep = [ffi.from_buffer(r) for r in records]
            rc = lib.ring_push_many(self._r, ffi.new("void *[]", keep), clens, count)
        if rc < 0:
            self._push_error(rc)
        return rc

    def _push_error(self, rc: int) -> bool:
        if rc == lib.RING_E_FULL:
            return False
        if rc == lib.RING_E_CORRUPT:
            raise RingCorrupt("consumer index out of range")
        raise ValueError("record too big for the ring")

    def should_wake_consumer(self) -> bool:
        """Call after every push / push_many (even one that returned False or 0): True if
        the consumer is asleep and must be signalled.

        Clears the consumer's flag, so a burst of pushes signals at most once.
        """
        return bool(lib.ring_producer_should_wake(self._r))

    def prepare_wait_for_space(self, nbytes: int) -> bool:
        """Call when a push of ``nbytes`` returned False. True: still no room, block on
        the producer's eventfd (the consumer will signal after its next pop), then call
        ``finish_wait()``. False: room appeared meanwhile, push again without sleeping."""
        if nbytes > self.max_record:
            raise ValueError(f"record of {nbytes} bytes exceeds the ring's maximum of {self.max_record}")
        rc = lib.ring_producer_prepare_wait(self._r, nbytes)
        if rc < 0:
            raise RingCorrupt("consumer index out of range")
        return rc == 1

    def finish_wait(self) -> None:
        """Clear ``producer_waiting`` after waking (or giving up waiting)."""
        lib.ring_producer_finish_wait(self._r)

    def reserve(self, nbytes: int) -> Optional[memoryview]:
        """Zero-copy receive: room for one record of ``nbytes``, as a writable view of the
        ring, or None if the ring has no room now. Invisible to the consumer until
        ``commit()``; ``unreserve()`` drops it. Pushes return "full" while it is open."""
        if nbytes > self.max_record:
            raise ValueError(f"record of {nbytes} bytes exceeds the ring's maximum of {self.max_record}")
        p = ffi.new("uint8_t **")
        rc = lib.ring_reserve(self._r, nbytes, p)
        if rc == 0:
            return memoryview(ffi.buffer(p[0], nbytes))
        if rc == lib.RING_E_FULL:
            return None
        if rc == lib.RING_E_INVAL:
            raise ValueError("a reservation is already open on this ring")
        self._push_error(rc)
        return None

    def commit(self) -> None:
        """Publish the reserved record."""
        lib.ring_commit(self._r)

    def unreserve(self) -> None:
        """Drop the open reservation (nothing was published)."""
        lib.ring_unreserve(self._r)

    # -- consumer ---------------------------------------------------------------

    def take_batch(self, max_records: int = 64, big_min: int = 65536) -> list["bytes | memoryview"]:
        """Like ``pop_batch``, but records of at least ``big_min`` bytes come back as
        read-only views of the ring itself (no copy) and stay in it until ``release()``
        (or the next take / pop / peek). The producer can still write those bytes: copy
        whatever must not change under you."""
        if max_records <= 0:
            return []
        ptrs = self._take_buffers(max_records)
        n = lib.ring_take_batch(self._r, self._out, self.capacity, self._lens, ptrs, max_records, big_min)
        if n < 0:
            raise RingCorrupt("producer wrote an invalid record length or head index")
        return self._taken(n, ptrs)

    def release(self) -> None:
        """Free what the last ``take_batch`` left in the ring."""
        lib.ring_release(self._r)

    def take_more(self, max_records: int = 64, big_min: int = 65536,
                  max_bytes: Optional[int] = None) -> tuple[list["bytes | memoryview"], int]:
        """A take that keeps the open one: continues after everything taken so far.
        Returns (records, extent); free extents in order with ``release_bytes(extent)``."""
        if max_records <= 0:
            return [], 0
        ptrs = self._take_buffers(max_records)
        extent = ffi.new("uint64_t *")
        limit = self.capacity if max_bytes is None else max(0, min(max_bytes, self.capacity))
        n = lib.ring_take_more(self._r, self._out, limit, self._lens, ptrs, max_records, big_min, extent)
        if n < 0:
            if n == lib.RING_E_TOOBIG:
                return [], int(extent[0])
            raise RingCorrupt("producer wrote an invalid record length or head index")
        try:
            return self._taken(n, ptrs), int(extent[0])
        except BaseException:  # (MemoryError) what could not be handed out stays to take again
            lib.ring_untake(self._r, int(extent[0]))
            raise

    def _copy_buffers(self, max_records: int) -> None:
        """The copy-out buffer and length array a pop or take fills."""
        if self._out_mv is None:  # (both or neither: out of memory half-way leaves neither)
            out = ffi.new("char[]", self.capacity)
            self._out_mv = memoryview(ffi.buffer(out))
            self._out = out
        if len(self._lens) < max_records:
            self._lens = ffi.new("uint32_t[]", max_records)

    def _take_buffers(self, max_records: int) -> Any:
        """_copy_buffers, and a fresh pointer array for the records a take leaves in place."""
        self._copy_buffers(max_records)
        return ffi.new("const uint8_t *[]", max_records)

    def _taken(self, n: int, ptrs: Any) -> list["bytes | memoryview"]:
        """A take's records: private copies, or read-only views of those left in the ring."""
        mv = cast(memoryview, self._out_mv)  # made by _copy_buffers, which every caller ran first
        out: list[bytes | memoryview] = []
        pos = 0
        for i, ln in enumerate(ffi.unpack(self._lens, n)):
            if ptrs[i] == ffi.NULL:
                out.append(mv[pos:pos + ln].tobytes())
                pos += ln
            else:
                out.append(memoryview(ffi.buffer(ptrs[i], ln)).toreadonly())
        return out

    def release_bytes(self, nbytes: int) -> None:
        """Free the oldest ``nbytes`` of what is taken (a whole extent of ``take_more``)."""
        rc = lib.ring_release_bytes(self._r, nbytes)
        if rc == lib.RING_E_INVAL:
            raise ValueError(f"cannot release {nbytes} bytes: less is taken")
        if rc < 0:
            raise RingCorrupt("ring is corrupt")

    def untake(self, nbytes: int) -> None:
        """Give back the newest ``nbytes`` taken (the extent of the last ``take_more``)
        unfreed: the next take returns those records again."""
        rc = lib.ring_untake(self._r, nbytes)
        if rc == lib.RING_E_INVAL:
            raise ValueError(f"cannot untake {nbytes} bytes: less is taken")
        if rc < 0:
            raise RingCorrupt("ring is corrupt")

    def pop_batch(self, max_records: int = 64, max_bytes: Optional[int] = None) -> list[bytes]:
        """Remove up to ``max_records`` records totalling at most ``max_bytes`` (except
        that a first record bigger than ``max_bytes`` is still returned, alone, so one
        large record cannot wedge the ring) and return private copies of them.

        Copies, because the producer can still write the ring memory: what the daemon
        inspects must be a copy the app can no longer change. One C call per batch,
        and the space is released with one tail store. Empty list: the ring is empty.
        """
        if max_records <= 0:
            return []
        self._copy_buffers(max_records)
        limit = self.capacity if max_bytes is None else max(0, min(max_bytes, self.capacity))
        n = lib.ring_pop_batch(self._r, self._out, limit, self._lens, max_records)
        if n == lib.RING_E_TOOBIG:  # first record > max_bytes: return it alone
            n = lib.ring_pop_batch(self._r, self._out, self.capacity, self._lens, 1)
        if n <= 0:
            if n == 0:
                return []
            raise RingCorrupt("producer wrote an invalid record length or head index")
        mv = cast(memoryview, self._out_mv)  # made by _copy_buffers, which every caller ran first
        out = []
        pos = 0
        for ln in ffi.unpack(self._lens, n):
            end = pos + ln
            out.append(mv[pos:end].tobytes())
            pos = end
        return out

    def c_pointers(self) -> tuple[int, ...]:
        """Addresses for compiled callers (``mrpcd.marshal.records.ring_pop_records`` /
        ``ring_push_records`` / ``ring_take_records``): (ring_t *, ring_used_bytes,
        ring_peek, ring_pop_batch, ring_push_segs, ring_take_batch, ring_release,
        ring_reserve, ring_commit, ring_unreserve, ring_take_more, ring_release_bytes,
        ring_producer_should_wake, ring_consumer_should_wake_producer, ring_untake). Valid while this Ring is open
        (ValueError once it is closed)."""
        cp = self._cp
        if cp is None:
            if self._cbuf is None:
                raise ValueError("ring is closed")
            cp = self._cp = (int(ffi.cast("uintptr_t", self._r)),) + _FN_ADDRS
        return cp

    def pop(self) -> Optional[bytes]:
        """One record (a private copy), or None if the ring is empty."""
        got = self.pop_batch(1)
        return got[0] if got else None

    def prepare_sleep(self) -> bool:
        """Call when a pop found the ring empty. True: still empty, block on the
        consumer's eventfd (the producer will signal after its next push), then call
        ``finish_sleep()``. False: data arrived meanwhile, pop again."""
        rc = lib.ring_consumer_prepare_sleep(self._r)
        if rc < 0:
            raise RingCorrupt("producer head index out of range")
        return rc == 1

    def has_data(self) -> bool:
        """Consumer: is anything published past what it has taken? (A poller asks this
        instead of sleeping; no flag changes, so the producer does not signal.)"""
        rc = lib.ring_consumer_has_data(self._r)
        if rc < 0:
            raise RingCorrupt("producer head index out of range")
        return rc == 1

    def finish_sleep(self) -> None:
        """Clear ``consumer_sleeping`` after waking (or giving up sleeping)."""
        lib.ring_consumer_finish_sleep(self._r)

    def should_wake_producer(self) -> bool:
        """Call after every pop_batch (even an empty one: it may have skipped a wrap
        marker): True if the producer waits for space and must be signalled."""
        return bool(lib.ring_consumer_should_wake_producer(self._r))

    # -- either side ------------------------------------------------------------

    def empty(self) -> bool:
        """Snapshot: nothing published and not yet consumed."""
        return bool(lib.ring_is_empty(self._r))

    def used_bytes(self) -> int:
        """Snapshot of bytes occupied (records with headers, padding, wrap filler)."""
        return int(lib.ring_used_bytes(self._r))

    def free_bytes(self) -> int:
        """Snapshot of free bytes. A record of n bytes needs 8 + n rounded up to 8, plus
        the bytes left before the end of the data area if it has to wrap."""
        return self.capacity - self.used_bytes()

    def close(self) -> None:
        """Drop this view's export of the buffer (so the mmap can be closed)."""
        self._cp = None
        if self._cbuf is not None:
            if self._out_mv is not None:
                self._out_mv.release()
            ffi.release(self._cbuf)
            self._cbuf = None


class RingPair:
    """The two rings of one app in one memfd: ``tx`` (app → daemon), ``rx`` (daemon → app).

    The daemon calls ``create(capacity)`` and sends ``fd`` and ``size`` to the app, which
    calls ``attach(fd, size)``. The pair owns its fd and closes it in ``close()``.
    """

    def __init__(self, fd: int, size: int, *, init: bool) -> None:
        self.layout = layout(size)
        st = os.fstat(fd)
        if st.st_size != size:
            raise ValueError(f"shared memory is {st.st_size} bytes, expected {size}")
        self.fd = fd
        self.size = size
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self.tx = Ring(self._mm, self.layout.tx_offset, self.layout.capacity, init=init)
            try:
                self.rx = Ring(self._mm, self.layout.rx_offset, self.layout.capacity, init=init)
            except BaseException:
                self.tx.close()
                raise
        except BaseException:
            self._mm.close()
            raise

    @classmethod
    def create(cls, capacity: int) -> "RingPair":
        """Daemon side: a new sealed memfd holding two empty rings of ``capacity`` bytes."""
        size = shm_size_for(capacity)
        fd = create_shared_memory(size)
        try:
            return cls(fd, size, init=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> "RingPair":
        """App side (or a restarted daemon): map rings that already exist. Takes the fd
        (closed here too if the rings are refused)."""
        try:
            return cls(fd, size, init=False)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd < 0:
            return
        self.tx.close()
        self.rx.close()
        self._mm.close()
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "RingPair":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- waker


class Waker:
    """An eventfd one side writes to wake the other (one per waiting direction).

    Non-blocking, so neither an event loop (``add_reader(w.fileno(), ...)``) nor a
    signaller can ever block on it; sync users call ``wait``.
    """

    def __init__(self, fd: Optional[int] = None) -> None:
        """A new eventfd, or wrap ``fd`` (received over SCM_RIGHTS); the Waker owns it."""
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if fd is None else fd
        # signal / drain / close hold it: a thread that signals while another closes must
        # never write to the fd *number* after it was closed and handed to something else
        # (the next app's ring memfd, whose tx head the 8-byte write overwrote: "producer
        # wrote an invalid record length or head index"). Uncontended, it costs far less
        # than the eventfd syscall it guards.
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def signal(self) -> None:
        """Wake the waiter (adds 1 to the counter; wake-ups coalesce); nothing once closed."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                os.eventfd_write(self._fd, 1)
            except BlockingIOError:  # counter saturated: the waiter is already awake-able
                pass

    def drain(self) -> int:
        """Reset the counter; return how many signals had accumulated (0 if none, or closed)."""
        with self._lock:
            if self._fd < 0:
                return 0
            try:
                return os.eventfd_read(self._fd)
            except BlockingIOError:
                return 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until signalled or ``timeout`` seconds pass; drains. True if signalled."""
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not p.poll(ms):  # EINTR is retried by Python (PEP 475)
            return False
        self.drain()
        return True

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)

    def __enter__(self) -> "Waker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
