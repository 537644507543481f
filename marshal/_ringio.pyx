# cython: language_level=3
"""The app library's zero-copy ring paths (one copy per big message each way).

Send: `ring_push_parts` gathers a record whose payload is a `_pack.Parts` (packed runs plus
the caller's own big `bytes` values) straight into the tx ring: the big values are copied
once, from the user's objects into shared memory.

Receive: `ring_take_records` takes a batch from the rx ring with `ring_take_batch`: small
records are copied into one private buffer and parsed as ordinary `Record`s (as
`ring_pop_records` does), big ones stay in the ring and come back as `RingRecord`s, so
the message can be decoded straight from ring memory (its `bytes` fields are the one copy).
Nothing of the batch is freed until `Held.release()`, which also makes every RingRecord of
the batch unusable (their ring memory may be overwritten from then on).

Ring memory is written by the daemon: every header is read once into a private snapshot
and checked (kind, flags, reserved, MAX_META, max_record, and that the lengths add up to the
ring record's length) before any length from it is used; the metadata is copied out; the
payload is only handed out as a bounded read-only view (decoders bound every read by it)
or copied.
"""
from cpython.buffer cimport PyBuffer_FillInfo, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.ref cimport PyObject, Py_DECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy

from mrpcd.marshal._framing import (
    DEFAULT_MAX_RECORD, F_ALL, MAX_META, FrameDecoder, RecordError, parse_record, ring_pop_records,
)

cdef extern from "Python.h":
    PyObject* _raw_bytes "PyBytes_FromStringAndSize" (const char* s, Py_ssize_t n)
    int _PyBytes_Resize(PyObject** b, Py_ssize_t n)
    char* _raw_bytes_as_string "PyBytes_AS_STRING" (PyObject* b)

cdef enum:
    _HDR = 40
    _TAKE_MAX = 4096
    _E_FULL = -1
    _E_TOOBIG = -2
    _E_CORRUPT = -3
    # Pushes at least this big copy without holding the GIL. Below it the copy (~75 µs a
    # MiB here) keeps the GIL, as CPython's own bytes copies do: released, the app's other
    # threads ran only to queue on the tx lock or the GIL and switched back (sync client,
    # 1 MiB c=32: 4.0 -> 2.0 context switches and -8 % CPU per call, alternated x7).
    _NOGIL_MIN = 4194304

cdef struct _seg:
    const void* p
    uint32_t len

ctypedef uint64_t (*_used_fn)(void* r) noexcept nogil
ctypedef int (*_push_segs_fn)(void* r, const _seg* segs, const uint32_t* nsegs,
                              uint32_t n) noexcept nogil
ctypedef void (*_release_fn)(void* r) noexcept nogil
ctypedef int (*_take_more_fn)(void* r, void* out, uint64_t out_size, uint32_t* lens,
                              const uint8_t** ptrs, uint32_t max_records, uint32_t big_min,
                              uint64_t* extent) noexcept nogil
ctypedef int (*_untake_fn)(void* r, uint64_t nbytes) noexcept nogil

cdef uint32_t C_MAX_META = MAX_META
cdef int C_F_ALL = F_ALL
_KINDS = (1, 2, 3, 4, 16, 17)


include "_header.pxi"


# -- send ---------------------------------------------------------------------------------

def ring_push_parts(ring, kind, flags, status, handle, call_id, method_id, deadline,
                    bytes meta, payload):
    """ring_push_record() for a payload given as `Parts`: header, metadata and every part
    gathered into `ring` (producer side) by one C call, so a big `bytes` value is copied
    once, straight from the caller's object into shared memory. True if it went in, False
    if the ring is full now; ValueError if it can never fit; RecordError like encode_record."""
    cdef uint8_t hdr[_HDR]
    cdef tuple keep = tuple(payload.parts)  # the parts stay alive (and fixed) during the push
    cdef Py_ssize_t nbytes = payload.nbytes
    cdef Py_ssize_t nparts = len(keep), i
    cdef uint64_t total = 0
    cdef _seg* segs
    cdef uint32_t nseg
    cdef int rc
    cdef tuple cp
    cdef void* r
    cdef _push_segs_fn push_fn
    _pack_fields(hdr, kind, flags, status, handle, call_id, method_id, deadline)
    if PyBytes_GET_SIZE(meta) > C_MAX_META:
        raise RecordError(f"record meta_len {PyBytes_GET_SIZE(meta)} exceeds MAX_META {C_MAX_META}")
    for i in range(nparts):
        if type(keep[i]) is not bytes:
            raise TypeError(f"payload parts must be bytes, got {type(keep[i]).__name__}")
        total += <uint64_t>PyBytes_GET_SIZE(keep[i])
    if total != <uint64_t>nbytes:
        raise ValueError(f"payload parts hold {total} bytes, Parts says {nbytes}")
    if total > 0xFFFFFFFFu - _HDR - <uint64_t>PyBytes_GET_SIZE(meta):
        raise ValueError(f"record of {total} payload bytes exceeds the ring's maximum")
    _st32(hdr + 32, <uint32_t>PyBytes_GET_SIZE(meta))
    _st32(hdr + 36, <uint32_t>total)
    cp = ring.c_pointers()
    r = <void*><uintptr_t>cp[0]
    push_fn = <_push_segs_fn><uintptr_t>cp[4]
    segs = <_seg*>PyMem_Malloc((nparts + 2) * sizeof(_seg))
    if segs == NULL:
        raise MemoryError()
    try:
        segs[0].p = hdr
        segs[0].len = _HDR
        segs[1].p = PyBytes_AS_STRING(meta)
        segs[1].len = <uint32_t>PyBytes_GET_SIZE(meta)
        for i in range(nparts):
            segs[i + 2].p = PyBytes_AS_STRING(keep[i])
            segs[i + 2].len = <uint32_t>PyBytes_GET_SIZE(keep[i])
        nseg = <uint32_t>(nparts + 2)
        if total >= _NOGIL_MIN:  # bytes are immutable and `keep` holds them: safe without the GIL
            with nogil:
                rc = push_fn(r, segs, &nseg, 1)
        else:
            rc = push_fn(r, segs, &nseg, 1)
    finally:
        PyMem_Free(segs)
    if rc == 1:
        return True
    if rc == 0 or rc == _E_FULL:
        return False
    if rc == _E_CORRUPT:
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("consumer index out of range")
    raise ValueError(f"record of {_HDR + PyBytes_GET_SIZE(meta) + total} bytes exceeds the ring's maximum")


# -- receive ------------------------------------------------------------------------------

cdef class Held:
    """The records of one take that stay in the ring. `release()` frees their ring space
    (FIFO: everything up to the end of the batch) and invalidates their RingRecords; it is
    idempotent."""

    cdef object _ring
    cdef bint _valid

    @property
    def valid(self):
        return self._valid

    def release(self):
        cdef tuple cp
        if not self._valid:
            return
        self._valid = False
        cp = self._ring.c_pointers()  # ValueError once the ring is closed: nothing to free then
        (<_release_fn><uintptr_t>cp[6])(<void*><uintptr_t>cp[0])

    def drop(self):
        """Invalidate the records without touching the ring (it is about to be unmapped)."""
        self._valid = False


cdef class _RingSpan:
    """A read-only buffer over ring memory that counts its exports, so `RingRecord.decode`
    can tell whether a view of it (or one derived from it) outlived the call."""

    cdef const uint8_t* p
    cdef Py_ssize_t n
    cdef int exports

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("ring payload views are read-only")
        PyBuffer_FillInfo(buf, self, <void*>self.p, self.n, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.exports -= 1


cdef class RingRecord:
    """A record whose bytes stay in the rx ring until its batch is released: the header
    fields and metadata (copied out of the ring, validated), and the payload in place.

    Read the payload with `decode(fn)` (fn gets a read-only view of ring memory and must not
    keep it) or `payload` (a private copy); both raise once the batch is released. It has
    the header/metadata surface of `Record` that the app library's rx path reads."""

    cdef readonly uint8_t kind
    cdef readonly uint8_t flags
    cdef readonly uint16_t status
    cdef readonly uint32_t handle
    cdef readonly uint64_t call_id
    cdef readonly uint32_t method_id
    cdef readonly uint64_t deadline
    cdef readonly uint32_t meta_len
    cdef readonly uint32_t payload_len
    cdef readonly bytes meta
    cdef const uint8_t* _payload
    cdef Held _held

    @property
    def size(self):
        return _HDR + <Py_ssize_t>self.meta_len + <Py_ssize_t>self.payload_len

    @property
    def in_ring(self):
        """True while the payload can still be read (its batch is not released)."""
        return self._held._valid

    cdef int _check(self) except -1:
        if not self._held._valid:
            raise ValueError("the record's ring space was released: its payload is gone")
        return 0

    @property
    def payload(self):
        """A private copy of the payload (bytes)."""
        self._check()
        return PyBytes_FromStringAndSize(<const char*>self._payload, self.payload_len)

    def decode(self, fn):
        """fn(read-only view of the payload in the ring) -> its result. The view is released
        when fn returns; fn must not keep it or any view made from it: that is detected and
        raises BufferError (the result is then not used)."""
        cdef _RingSpan span
        self._check()
        span = _RingSpan.__new__(_RingSpan)
        span.p = self._payload
        span.n = self.payload_len
        view = memoryview(span)
        try:
            result = fn(view)
        finally:
            view.release()  # BufferError if fn still holds an export of the view itself
        if span.exports:
            raise BufferError("the deserializer kept a view of ring memory")
        return result

    def __repr__(self):
        return (f"RingRecord(kind={self.kind}, flags={self.flags}, handle={self.handle}, "
                f"call_id={self.call_id}, meta={self.meta_len} bytes, payload={self.payload_len} bytes, "
                f"{'in ring' if self._held._valid else 'released'})")


cdef str _header_problem(const uint8_t* h, uint32_t rec_len, uint64_t max_record):
    """Why a header snapshot is not a valid record of rec_len bytes (None if it is)."""
    cdef uint32_t meta_len = _ld32(h + 32)
    cdef uint32_t payload_len = _ld32(h + 36)
    cdef uint64_t total = <uint64_t>_HDR + meta_len + payload_len
    if not _kind_ok(h[0]):
        return f"unknown record kind {h[0]}"
    if h[1] & ~7:
        return f"unknown record flags 0x{h[1]:02x}"
    if _ld32(h + 20) != 0:
        return f"record reserved field is {_ld32(h + 20)}, must be 0"
    if meta_len > C_MAX_META:
        return f"record meta_len {meta_len} exceeds MAX_META {C_MAX_META}"
    if total > max_record:
        return (f"record length {total} (meta_len {meta_len}, payload_len {payload_len}) "
                f"exceeds max_record {max_record}")
    if total != rec_len:
        return f"record is {total} bytes but the ring record holds {rec_len}"
    return None


cdef object _ring_record(const uint8_t* p, uint32_t l, uint64_t max_record, Held held, list bad):
    """A RingRecord for the ring record p[0:l], or None (and an entry in `bad`)."""
    cdef uint8_t h[_HDR]
    cdef RingRecord rec
    cdef str problem
    if l < _HDR:
        bad.append((PyBytes_FromStringAndSize(<const char*>p, l),
                    f"record truncated: {l} bytes, header needs {_HDR}"))
        return None
    memcpy(h, p, _HDR)  # one snapshot: the daemon's memory, read once
    problem = _header_problem(h, l, max_record)
    if problem is not None:
        bad.append((PyBytes_FromStringAndSize(<const char*>p, l), problem))
        return None
    rec = RingRecord.__new__(RingRecord)
    rec.kind = h[0]
    rec.flags = h[1]
    rec.status = _ld16(h + 2)
    rec.handle = _ld32(h + 4)
    rec.call_id = _ld64(h + 8)
    rec.method_id = _ld32(h + 16)
    rec.deadline = _ld64(h + 24)
    rec.meta_len = _ld32(h + 32)
    rec.payload_len = _ld32(h + 36)
    rec.meta = PyBytes_FromStringAndSize(<const char*>p + _HDR, rec.meta_len)
    rec._payload = p + _HDR + rec.meta_len
    rec._held = held
    return rec


cdef list _parse_small(bytes base, const uint32_t* lens, list small_idx, uint64_t max_record, list bad):
    """Records for the small records copied end to end into `base` (views of it, like
    ring_pop_records makes): FrameDecoder splits them; if its split disagrees with the ring's
    record lengths (a malformed record), each is parsed alone instead so only the bad ones
    are dropped."""
    cdef Py_ssize_t n = len(small_idx), i, pos
    cdef list recs = None
    cdef bint ok = False
    cdef uint32_t l
    dec = FrameDecoder(max_record)
    try:
        recs = dec.feed(base)
        ok = len(recs) == n and dec.buffered == 0
        if ok:
            for i in range(n):
                if recs[i].size != lens[<Py_ssize_t>small_idx[i]]:
                    ok = False
                    break
    except RecordError:
        ok = False
    if ok:
        return recs
    recs = []
    pos = 0
    for i in range(n):
        l = lens[<Py_ssize_t>small_idx[i]]
        one = base[pos:pos + l]
        pos += l
        try:
            recs.append(parse_record(one, max_record))
        except RecordError as exc:
            bad.append((one, str(exc)))
            recs.append(None)
    return recs


def ring_take_records(ring, Py_ssize_t max_records, Py_ssize_t max_bytes, uint32_t big_min,
                      max_record=DEFAULT_MAX_RECORD):
    """Take up to `max_records` records from `ring` (consumer side): records of at least
    `big_min` bytes stay in the ring as RingRecords, the others are copied (at most
    `max_bytes` of them) into one private buffer and parsed as Records.

    Returns (records in ring order, bad, held): bad lists (record bytes, reason) for
    malformed records (left out of records); held is None when nothing stayed in the ring,
    else the Held whose release() the caller must call once it is done with the batch
    (until then the daemon cannot reuse that ring space). RingCorrupt if the producer broke
    the ring. When the ring holds less than `big_min` bytes no record can be big: this is
    ring_pop_records then.
    """
    cdef uint64_t mr = DEFAULT_MAX_RECORD if max_record is None else max_record
    cdef tuple cp = ring.c_pointers()
    cdef void* r = <void*><uintptr_t>cp[0]
    cdef uint64_t used = (<_used_fn><uintptr_t>cp[1])(r)
    cdef _release_fn release_fn = <_release_fn><uintptr_t>cp[6]
    cdef _take_more_fn take_fn = <_take_more_fn><uintptr_t>cp[10]
    cdef uint64_t extent = 0
    cdef uint32_t lens[_TAKE_MAX]
    cdef const uint8_t* ptrs[_TAKE_MAX]
    cdef uint64_t alloc
    cdef PyObject* b = NULL
    cdef int n, i
    cdef Py_ssize_t total = 0
    cdef bytes base
    cdef list out = [], bad = [], small_idx = [], small
    cdef Held held = None
    cdef bint kept = False
    if used < big_min or big_min == 0:
        recs, bad = ring_pop_records(ring, max_records, max_bytes, max_record)
        return recs, bad, None
    if max_records <= 0:
        return out, bad, None
    if max_records > _TAKE_MAX:
        max_records = _TAKE_MAX
    alloc = used if used < <uint64_t>max_bytes else <uint64_t>max_bytes
    if alloc < big_min:
        alloc = big_min  # room for at least one small record (each is < big_min)
    b = _raw_bytes(NULL, <Py_ssize_t>alloc)
    if b == NULL:
        raise MemoryError()
    # ring_take_batch, except that nothing is freed before the records are built: out of
    # memory on the way, the take is given back (ring_untake), not lost
    release_fn(r)  # the previous take is over
    n = take_fn(r, _raw_bytes_as_string(b), alloc, lens, ptrs, <uint32_t>max_records, big_min, &extent)
    if n <= 0:
        Py_DECREF(<object>b)
        release_fn(r)  # a lone wrap marker the take passed: free it now
        if n == 0:
            return out, bad, None
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("producer wrote an invalid record length or head index")
    try:
        for i in range(n):
            if ptrs[i] == NULL:
                total += lens[i]
                small_idx.append(i)
            else:
                kept = True
        if total + 4096 < <Py_ssize_t>alloc or (total == 0 and alloc > 0):
            if _PyBytes_Resize(&b, total) < 0:  # b is NULL and an exception is set
                raise MemoryError()
        base = <bytes>b
        b = NULL
        Py_DECREF(base)  # base now holds the only reference
        if kept:
            held = Held.__new__(Held)
            held._ring = ring
            held._valid = True
        small = _parse_small(base, lens, small_idx, mr, bad) if small_idx else []
        k = 0
        for i in range(n):
            if ptrs[i] == NULL:
                rec = small[k]
                k += 1
            else:
                rec = _ring_record(ptrs[i], lens[i], mr, held, bad)
            if rec is not None:
                out.append(rec)
        result = (out, bad, held)
    except BaseException:
        if b != NULL:
            Py_DECREF(<object>b)
        if held is not None:
            held.drop()  # its RingRecords must not read ring memory any more
        (<_untake_fn><uintptr_t>cp[14])(r, extent)
        raise
    if held is None:
        release_fn(r)  # everything was copied: free it at once, as a pop does
    return result
