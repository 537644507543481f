# cython: language_level=3
"""Hot paths of record framing: the 40-byte header, record parsing, the stream decoder,
and a bounds-checked msgpack skipper (used by codec.read_field).

Everything parsed here comes from untrusted memory (an app's ring or a peer's socket):
every length is read once into a local, checked against the buffer and the limits, and
only then used.

Copies are counted (DESIGN.md principle 3). A Record does not copy its metadata and payload
when it is parsed: it keeps a reference to an immutable, private `bytes` object holding the
whole encoded record (its *base*) and the record's offset in it; `meta` / `payload`
materialise (one copy) only when someone reads them, and `raw` / `wire_buffers` hand out
zero-copy views of the encoded record. Where the base comes from:

* `ring_pop_records`: one fresh bytes object per pop, filled by one copy out of the shared
  ring (that copy is the TOCTOU protection: the app can no longer change it);
* `FrameDecoder.feed(bytes)`: the chunk the socket produced (records that arrive in one
  chunk), or one exactly-sized buffer per record that spans chunks (each byte is copied
  into it once, no re-growth);
* `parse_record(bytes)`: that bytes object; any other buffer (bytearray, memoryview of
  shared memory) is copied once into a private bytes object first.

Lifetime rule: a view stays valid as long as anyone holds it, because its base is an
immutable bytes object made for this pop / chunk / record alone, never the ring or a reused
buffer. (A record held for long pins its whole base: call `own()` to give it its own copy.)

Dirty tracking: setting a header field marks the header dirty (the body is still sent from
the base, behind a freshly packed header); setting `meta` or `payload` drops the base. A
dirty record is re-encoded at most once, when its encoded form is asked for.
"""
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE,
                             PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.exc cimport PyErr_Clear
from cpython.ref cimport PyObject, Py_DECREF
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    object PyMemoryView_FromMemory(char* mem, Py_ssize_t size, int flags)
    int PyBUF_WRITE
    PyObject* _raw_bytes "PyBytes_FromStringAndSize" (const char* s, Py_ssize_t n)
    int _PyBytes_Resize(PyObject** b, Py_ssize_t n)
    char* _raw_bytes_as_string "PyBytes_AS_STRING" (PyObject* b)

cdef enum:
    _HEADER_SIZE = 40
    _GATHER_MIN = 16384  # a body of its own this big is sent as its own buffer, not re-encoded

HEADER_SIZE = _HEADER_SIZE
REQUEST = 1
RESPONSE = 2
CANCEL = 3
WINDOW = 4
HELLO = 16
GOAWAY = 17
KINDS = frozenset((REQUEST, RESPONSE, CANCEL, WINDOW, HELLO, GOAWAY))
F_START = 1
F_END = 2
F_NO_MSG = 4
F_ALL = F_START | F_END | F_NO_MSG
MAX_META = 64 * 1024
DEFAULT_MAX_RECORD = 16 * 1024 * 1024

cdef Py_ssize_t C_MAX_META = MAX_META
cdef int C_F_ALL = F_ALL


class RecordError(ValueError):
    """A record breaks the format or the limits.

    `records` holds the complete, valid records a FrameDecoder.feed() decoded before the
    bad frame (empty elsewhere).
    """

    def __init__(self, *args, records=None):
        super().__init__(*args)
        self.records = records if records is not None else []


_KIND_NAMES = {1: "REQUEST", 2: "RESPONSE", 3: "CANCEL", 4: "WINDOW", 16: "HELLO", 17: "GOAWAY"}


include "_header.pxi"


cdef class Record:
    """One record: header fields, metadata section, payload.

    Parsed records keep a zero-copy reference to their encoded bytes (see the module
    docstring): `meta` / `payload` are bytes materialised on first access, `raw` is the
    encoded record (a view while the record is unchanged).
    """

    cdef uint8_t _kind
    cdef uint8_t _flags
    cdef uint16_t _status
    cdef uint32_t _handle
    cdef uint64_t _call_id
    cdef uint32_t _method_id
    cdef uint64_t _deadline
    cdef object _meta            # bytes (materialised or assigned) or None
    cdef object _payload
    cdef bytes _base             # immutable bytes holding the encoded record, or None
    cdef Py_ssize_t _off         # the record's offset in _base
    cdef uint32_t _meta_len      # lengths of the sections in _base
    cdef uint32_t _payload_len
    cdef bint _hdirty            # a header field changed since the record was parsed
    cdef bint _resident          # received in place: the body is in an app's ring, _base is
                                 # the header alone (FrameDecoder.set_sink)

    def __init__(self, kind=0, flags=0, status=0, handle=0, call_id=0, method_id=0,
                 deadline=0, meta=b"", payload=b""):
        self._kind = kind
        self._flags = flags
        self._status = status
        self._handle = handle
        self._call_id = call_id
        self._method_id = method_id
        self._deadline = deadline
        self._meta = bytes(meta)
        self._payload = bytes(payload)
        self._base = None
        self._hdirty = True

    # -- header fields (setting one marks the header dirty) ---------------------------
    @property
    def kind(self):
        return self._kind

    @kind.setter
    def kind(self, uint8_t v):
        self._kind = v
        self._hdirty = True

    @property
    def flags(self):
        return self._flags

    @flags.setter
    def flags(self, uint8_t v):
        self._flags = v
        self._hdirty = True

    @property
    def status(self):
        return self._status

    @status.setter
    def status(self, uint16_t v):
        self._status = v
        self._hdirty = True

    @property
    def handle(self):
        return self._handle

    @handle.setter
    def handle(self, uint32_t v):
        if v != self._handle:
            self._handle = v
            self._hdirty = True

    @property
    def call_id(self):
        return self._call_id

    @call_id.setter
    def call_id(self, uint64_t v):
        self._call_id = v
        self._hdirty = True

    @property
    def method_id(self):
        return self._method_id

    @method_id.setter
    def method_id(self, uint32_t v):
        self._method_id = v
        self._hdirty = True

    @property
    def deadline(self):
        return self._deadline

    @deadline.setter
    def deadline(self, uint64_t v):
        self._deadline = v
        self._hdirty = True

    # -- body ------------------------------------------------------------------------
    @property
    def meta(self):
        """The metadata section (bytes; materialised from the base on first access)."""
        self._no_body()
        if self._meta is None and self._base is not None:
            self._meta = PyBytes_FromStringAndSize(
                PyBytes_AS_STRING(self._base) + self._off + _HEADER_SIZE, self._meta_len)
        return self._meta

    @meta.setter
    def meta(self, value):
        self._no_body()
        value = _body_value(value)
        self._detach()
        self._meta = value

    @property
    def payload(self):
        """The payload (bytes; materialised from the base on first access)."""
        self._no_body()
        if self._payload is None and self._base is not None:
            self._payload = PyBytes_FromStringAndSize(
                PyBytes_AS_STRING(self._base) + self._off + _HEADER_SIZE + self._meta_len,
                self._payload_len)
        return self._payload

    @payload.setter
    def payload(self, value):
        self._no_body()
        value = _body_value(value)
        self._detach()
        self._payload = value

    @property
    def meta_view(self):
        """Zero-copy read-only view of the metadata section (a private, immutable copy)."""
        self._no_body()
        if self._base is None:
            return memoryview(self._meta if self._meta is not None else b"")
        cdef Py_ssize_t a = self._off + _HEADER_SIZE
        return memoryview(self._base)[a:a + self._meta_len]

    @property
    def payload_view(self):
        """Zero-copy read-only view of the payload (msgpack, codec.read_field accept it)."""
        self._no_body()
        if self._base is None:
            return memoryview(self._payload if self._payload is not None else b"")
        cdef Py_ssize_t a = self._off + _HEADER_SIZE + self._meta_len
        return memoryview(self._base)[a:a + self._payload_len]

    @property
    def meta_len(self):
        """Length of the metadata section (no copy)."""
        if self._base is not None:
            return self._meta_len
        return len(self._meta) if self._meta is not None else 0

    @property
    def payload_len(self):
        """Length of the payload (no copy: use it instead of len(rec.payload))."""
        if self._base is not None:
            return self._payload_len
        return len(self._payload) if self._payload is not None else 0

    @property
    def size(self):
        """Length of the encoded record: 40 + meta_len + payload_len."""
        return self._size()

    cdef Py_ssize_t _size(self):
        if self._base is not None:
            return _HEADER_SIZE + <Py_ssize_t>self._meta_len + <Py_ssize_t>self._payload_len
        return (_HEADER_SIZE + (len(self._meta) if self._meta is not None else 0)
                + (len(self._payload) if self._payload is not None else 0))

    @property
    def dirty(self):
        """True if the encoded form must be rebuilt (a field changed, or never encoded)."""
        return self._base is None or self._hdirty

    @property
    def raw(self):
        """The encoded record: a zero-copy view while it is unchanged, else re-encoded
        (once; the result becomes the record's new base)."""
        self._no_body()
        if self._base is None or self._hdirty:
            self._reencode()
        cdef Py_ssize_t n = self._size()
        if self._off == 0 and PyBytes_GET_SIZE(self._base) == n:
            return self._base
        return memoryview(self._base)[self._off:self._off + n]

    cdef int _detach(self) except -1:
        """Materialise meta and payload and drop the base (before a body change)."""
        cdef object m, pl
        if self._base is not None:
            m = self.meta
            pl = self.payload
            self._base = None
        self._hdirty = True
        return 0

    cdef int _no_body(self) except -1:
        if self._resident:
            raise TypeError("this record was received in place: its body is in the app's ring, "
                            "not in the record (only its header fields and lengths are here)")
        return 0

    @property
    def resident(self):
        """True for a record received in place (FrameDecoder.set_sink): its header fields
        and lengths are here, its body in the buffer the sink gave (pack_header_into)."""
        return self._resident

    def pack_header_into(self, buf):
        """Write this record's header (its fields now, its body's lengths) into buf[:40]:
        how a record received in place gets a rewritten header (e.g. the handle)."""
        cdef Py_buffer view
        self._check_fields()
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE)
        try:
            if view.len < _HEADER_SIZE:
                raise ValueError(f"a header needs {_HEADER_SIZE} bytes, the buffer has {view.len}")
            self._pack_header(<uint8_t*>view.buf, self._meta_len, self._payload_len)
        finally:
            PyBuffer_Release(&view)

    cdef int _reencode(self) except -1:
        cdef bytes out = self._encode_bytes()
        cdef Py_ssize_t n = PyBytes_GET_SIZE(out)
        if self._base is None:
            self._meta_len = <uint32_t>(n - _HEADER_SIZE - len(self._payload))
            self._payload_len = <uint32_t>len(self._payload)
        self._base = out
        self._off = 0
        self._hdirty = False
        return 0

    cdef int _check_fields(self) except -1:
        if not _kind_ok(self._kind):
            raise RecordError(f"unknown record kind {self._kind}")
        if self._flags & ~C_F_ALL:
            raise RecordError(f"unknown record flags 0x{self._flags:02x}")
        return 0

    cdef inline void _pack_header(self, uint8_t* p, uint32_t meta_len, uint32_t payload_len) noexcept:
        p[0] = self._kind
        p[1] = self._flags
        _st16(p + 2, self._status)
        _st32(p + 4, self._handle)
        _st64(p + 8, self._call_id)
        _st32(p + 16, self._method_id)
        _st32(p + 20, 0)
        _st64(p + 24, self._deadline)
        _st32(p + 32, meta_len)
        _st32(p + 36, payload_len)

    cdef bytes _encode_bytes(self):
        cdef bytes out
        cdef uint8_t* p
        cdef Py_ssize_t n
        self._no_body()
        if self._base is not None:
            n = self._size()
            if not self._hdirty and self._off == 0 and PyBytes_GET_SIZE(self._base) == n:
                return self._base
            self._check_fields()
            out = PyBytes_FromStringAndSize(NULL, n)
            p = <uint8_t*>PyBytes_AS_STRING(out)
            memcpy(p, PyBytes_AS_STRING(self._base) + self._off, n)
            self._pack_header(p, self._meta_len, self._payload_len)
            return out
        if self._meta is None or self._payload is None:
            raise RecordError("record meta and payload must be bytes, not None")
        return _encode(self._kind, self._flags, self._status, self._handle, self._call_id,
                       self._method_id, self._deadline, self._meta, self._payload)

    def encode(self):
        """header + meta + payload, as bytes (the base itself when it is exactly that)."""
        return self._encode_bytes()

    def own(self):
        """Give this record a private base of its own (so it stops pinning a shared batch
        buffer or socket chunk); returns self."""
        self._no_body()
        if self._base is not None and not (self._off == 0 and PyBytes_GET_SIZE(self._base) == self._size()):
            self._base = PyBytes_FromStringAndSize(PyBytes_AS_STRING(self._base) + self._off, self._size())
            self._off = 0
        return self

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = <Record>other
        return (self._kind == o._kind and self._flags == o._flags and self._status == o._status
                and self._handle == o._handle and self._call_id == o._call_id
                and self._method_id == o._method_id and self._deadline == o._deadline
                and self.meta == o.meta and self.payload == o.payload)

    __hash__ = None

    def __repr__(self):
        if self._resident:
            return ("Record(kind=%s, flags=%d, status=%d, handle=%d, call_id=%d, method_id=%d, "
                    "deadline=%d, %d + %d bytes in the app's ring)" % (
                        _KIND_NAMES.get(self._kind, self._kind), self._flags, self._status, self._handle,
                        self._call_id, self._method_id, self._deadline, self._meta_len, self._payload_len))
        meta, payload = self.meta, self.payload
        return ("Record(kind=%s, flags=%d, status=%d, handle=%d, call_id=%d, method_id=%d, "
                "deadline=%d, meta=%d bytes, payload=%d bytes)" % (
                    _KIND_NAMES.get(self._kind, self._kind), self._flags, self._status,
                    self._handle, self._call_id, self._method_id, self._deadline,
                    len(meta) if meta is not None else 0,
                    len(payload) if payload is not None else 0))

    def __reduce__(self):
        return (Record, (self._kind, self._flags, self._status, self._handle, self._call_id,
                         self._method_id, self._deadline, self.meta, self.payload))


cdef object _body_value(object value):
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"record meta / payload must be bytes, got {type(value).__name__}")


cdef bytes _encode(uint8_t kind, uint8_t flags, uint16_t status, uint32_t handle,
                   uint64_t call_id, uint32_t method_id, uint64_t deadline,
                   object meta, object payload):
    cdef Py_buffer mb, pb
    cdef bytes out
    cdef uint8_t* p
    if not _kind_ok(kind):
        raise RecordError(f"unknown record kind {kind}")
    if flags & ~C_F_ALL:
        raise RecordError(f"unknown record flags 0x{flags:02x}")
    PyObject_GetBuffer(meta, &mb, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
        try:
            if mb.len > C_MAX_META:
                raise RecordError(f"record meta_len {mb.len} exceeds MAX_META {C_MAX_META}")
            if <uint64_t>pb.len > 0xFFFFFFFFu:
                raise RecordError(f"record payload_len {pb.len} exceeds 2**32-1")
            out = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE + mb.len + pb.len)
            p = <uint8_t*>PyBytes_AS_STRING(out)
            p[0] = kind
            p[1] = flags
            _st16(p + 2, status)
            _st32(p + 4, handle)
            _st64(p + 8, call_id)
            _st32(p + 16, method_id)
            _st32(p + 20, 0)
            _st64(p + 24, deadline)
            _st32(p + 32, <uint32_t>mb.len)
            _st32(p + 36, <uint32_t>pb.len)
            if mb.len:
                memcpy(p + _HEADER_SIZE, mb.buf, mb.len)
            if pb.len:
                memcpy(p + _HEADER_SIZE + mb.len, pb.buf, pb.len)
            return out
        finally:
            PyBuffer_Release(&pb)
    finally:
        PyBuffer_Release(&mb)


def encode_record(kind, flags, status, handle, call_id, method_id, deadline,
                  meta=b"", payload=b""):
    """Encode one record: 40-byte header + meta + payload, as bytes."""
    return _encode(_u(kind, 0xFF, "kind"), _u(flags, 0xFF, "flags"),
                   _u(status, 0xFFFF, "status"), _u(handle, 0xFFFFFFFF, "handle"),
                   _u(call_id, 0xFFFFFFFFFFFFFFFF, "call_id"),
                   _u(method_id, 0xFFFFFFFF, "method_id"),
                   _u(deadline, 0xFFFFFFFFFFFFFFFF, "deadline"), meta, payload)


cdef uint64_t _check_header(const uint8_t* p, uint64_t max_record) except? 0:
    """Validate a complete 40-byte header; return the total record length."""
    cdef uint32_t meta_len = _ld32(p + 32)
    cdef uint32_t payload_len = _ld32(p + 36)
    cdef uint64_t total
    if not _kind_ok(p[0]):
        raise RecordError(f"unknown record kind {p[0]}")
    if p[1] & ~C_F_ALL:
        raise RecordError(f"unknown record flags 0x{p[1]:02x}")
    if _ld32(p + 20) != 0:
        raise RecordError(f"record reserved field is {_ld32(p + 20)}, must be 0")
    if meta_len > <uint64_t>C_MAX_META:
        raise RecordError(f"record meta_len {meta_len} exceeds MAX_META {C_MAX_META}")
    total = <uint64_t>_HEADER_SIZE + meta_len + payload_len
    if total > max_record:
        raise RecordError(f"record length {total} (meta_len {meta_len}, payload_len "
                          f"{payload_len}) exceeds max_record {max_record}")
    return total


cdef Record _make_view(bytes base, Py_ssize_t off, const uint8_t* hdr):
    """A Record over base[off : off + total], from the validated header snapshot `hdr`
    (lengths come from the snapshot only; base must hold the whole record and its header
    bytes must equal the snapshot)."""
    cdef Record r = Record.__new__(Record)
    r._kind = hdr[0]
    r._flags = hdr[1]
    r._status = _ld16(hdr + 2)
    r._handle = _ld32(hdr + 4)
    r._call_id = _ld64(hdr + 8)
    r._method_id = _ld32(hdr + 16)
    r._deadline = _ld64(hdr + 24)
    r._meta_len = _ld32(hdr + 32)
    r._payload_len = _ld32(hdr + 36)
    r._base = base
    r._off = off
    r._hdirty = False
    return r


cdef uint64_t _check_max_record(object max_record) except 0:
    if type(max_record) is not int or max_record < _HEADER_SIZE:
        raise ValueError(f"max_record must be an int >= {_HEADER_SIZE}, got {max_record!r}")
    if max_record > 0x7FFFFFFFFFFFFFFF:
        max_record = 0x7FFFFFFFFFFFFFFF
    return max_record


cdef uint64_t _check_one(const uint8_t* p, Py_ssize_t n, uint64_t max_record, uint8_t* hdr) except 0:
    """Validate that p[0:n] is exactly one record; leaves the header snapshot in hdr."""
    cdef uint64_t total
    cdef uint32_t meta_len, payload_len
    if n < _HEADER_SIZE:
        raise RecordError(f"record truncated: {n} bytes, header needs {_HEADER_SIZE}")
    # One snapshot of the header: the buffer may be shared memory another process writes.
    memcpy(hdr, p, _HEADER_SIZE)
    total = _check_header(hdr, max_record)
    meta_len = _ld32(hdr + 32)
    payload_len = _ld32(hdr + 36)
    if meta_len > <uint64_t>(n - _HEADER_SIZE):
        raise RecordError(f"record meta_len {meta_len} exceeds buffer "
                          f"({n - _HEADER_SIZE} bytes left)")
    if payload_len > <uint64_t>(n - _HEADER_SIZE - meta_len):
        raise RecordError(f"record payload_len {payload_len} exceeds buffer "
                          f"({n - _HEADER_SIZE - meta_len} bytes left)")
    if total != <uint64_t>n:
        raise RecordError(f"record is {total} bytes but the buffer holds {n} "
                          f"({n - <Py_ssize_t>total} trailing bytes)")
    return total


def parse_record(buf, max_record=DEFAULT_MAX_RECORD):
    """Parse exactly one record from a bytes-like buffer (no trailing bytes); RecordError
    if the record breaks the format or the limits.

    A `bytes` buffer is used in place (immutable: the record keeps a zero-copy view of
    it); any other buffer is copied once into a private bytes object, so the record can
    never change under the caller (shared memory, a reused bytearray)."""
    cdef Py_buffer view
    cdef uint64_t mr = _check_max_record(max_record)
    cdef uint8_t hdr[_HEADER_SIZE]
    cdef bytes base
    if type(buf) is bytes:
        _check_one(<const uint8_t*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf), mr, hdr)
        return _make_view(<bytes>buf, 0, hdr)
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    except BufferError as exc:
        raise TypeError(f"parse_record needs a contiguous bytes-like buffer: {exc}") from None
    try:
        _check_one(<const uint8_t*>view.buf, view.len, mr, hdr)
        base = PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
        # the copy's header must be the validated snapshot, whatever the writer did since
        memcpy(PyBytes_AS_STRING(base), hdr, _HEADER_SIZE)
        return _make_view(base, 0, hdr)
    finally:
        PyBuffer_Release(&view)


cdef class FrameDecoder:
    """Splits a byte stream (TCP) into records.

    feed(data) returns every record completed by data and keeps at most one partial
    record. A header announcing a record above max_record (or otherwise malformed) is
    refused as soon as its 40 bytes are in, before any of its body is buffered. After a
    RecordError the stream is unusable: later feeds raise again.

    Copies: records that lie whole inside a `bytes` chunk are zero-copy views of that
    chunk (other buffer types are copied once into bytes first). A record that spans
    chunks is assembled in one buffer of exactly its size, allocated when its header is
    complete: every byte is copied once, whatever the number of chunks.

    Receiving in place (set_sink): a record of at least `min_size` bytes whose header
    starts a read, with no completed record waiting before it, is assembled in the buffer
    the sink gives for it (the receiving daemon: a reservation in the app's rx ring), so
    it is copied once, from the socket into the ring. It comes out as a *resident* Record:
    header fields and lengths (from our own copy of its validated header), no body.
    evict() moves a record being received in place into a buffer of our own.
    """

    cdef uint64_t _max_record
    cdef uint8_t _hdr[_HEADER_SIZE]   # a partial header (< 40 bytes so far)
    cdef Py_ssize_t _hdr_have
    cdef PyObject* _big               # the record being assembled (a bytes object we own
    cdef Py_ssize_t _big_have         # alone and fill before anyone sees it), or NULL
    cdef uint64_t _need               # its total length
    cdef uint8_t* _dst                # where it goes: _big's bytes, or the sink's buffer; NULL: none
    cdef Py_buffer _dest              # the sink's buffer (held while _has_dest)
    cdef bint _has_dest
    cdef uint8_t _dest_hdr[_HEADER_SIZE]  # the in-place record's validated header, in our memory
    cdef object _sink                 # callable(total) -> writable buffer or None; or None
    cdef uint64_t _sink_min
    cdef object _error

    def __cinit__(self):
        self._big = NULL
        self._dst = NULL
        self._has_dest = False
        self._sink = None

    def __init__(self, max_record=DEFAULT_MAX_RECORD):
        self._max_record = _check_max_record(max_record)
        self._reset()
        self._error = None

    def __dealloc__(self):
        self._reset()  # drops the partial record: our buffer, or the sink's

    cdef void _reset(self) noexcept:
        cdef PyObject* b = self._big
        self._big = NULL
        self._dst = NULL
        self._hdr_have = 0
        self._big_have = 0
        self._need = 0
        if self._has_dest:
            self._has_dest = False
            PyBuffer_Release(&self._dest)
        if b != NULL:
            Py_DECREF(<object>b)

    def set_sink(self, sink, Py_ssize_t min_size=256 * 1024):
        """Receive data records (REQUEST, RESPONSE) of at least `min_size` bytes in place:
        `sink(total)` returns a writable buffer of at least `total` bytes to assemble the
        record in, or None (then it goes to a buffer of our own as usual). None as `sink`
        stops it for later records."""
        if sink is not None and not callable(sink):
            raise TypeError("sink must be callable or None")
        if min_size < _HEADER_SIZE + 1:
            raise ValueError(f"min_size must be > {_HEADER_SIZE}")
        self._sink = sink
        self._sink_min = <uint64_t>min_size

    @property
    def in_place(self):
        """True while a record is being received into the sink's buffer."""
        return self._has_dest

    def evict(self):
        """Move the record being received in place into a buffer of our own (the sink's
        owner needs its buffer back); the rest of it goes there too. True if there was one.
        Without the memory for it (MemoryError) the record is dropped and the stream fails:
        either way nothing is written into the sink's buffer after this returns."""
        cdef PyObject* b
        if not self._has_dest:
            return False
        b = _raw_bytes(NULL, <Py_ssize_t>self._need)
        if b == NULL:
            PyErr_Clear()
            self._error = f"no memory to move a record of {self._need} bytes out of its in-place buffer"
            self._reset()
            raise MemoryError(self._error)
        memcpy(_raw_bytes_as_string(b), self._dest_hdr, _HEADER_SIZE)  # the header we checked
        memcpy(_raw_bytes_as_string(b) + _HEADER_SIZE, self._dst + _HEADER_SIZE, self._big_have - _HEADER_SIZE)
        self._has_dest = False
        PyBuffer_Release(&self._dest)
        self._big = b
        self._dst = <uint8_t*>_raw_bytes_as_string(b)
        return True

    @property
    def max_record(self):
        return self._max_record

    @max_record.setter
    def max_record(self, value):
        """Another limit for the records whose headers come from now on (a connection reads
        its peer's HELLO, which may carry schema closures, with a larger one than its data)."""
        self._max_record = _check_max_record(value)

    @property
    def buffered(self):
        """Number of bytes of the partial record held."""
        return self._big_have if self._dst != NULL else self._hdr_have

    def feed(self, data):
        cdef list out = []
        cdef bytes chunk
        cdef Py_buffer view
        if self._error is not None:
            raise RecordError(f"stream already failed: {self._error}")
        if type(data) is not bytes:
            # A read buffer (the transport's scratch) that holds only part of one big record
            # is copied straight into that record's buffer: no bytes copy of it first. (Reads
            # after a big record hold the next one's header and its first part.)
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                if self._feed_inside_big(<const uint8_t*>view.buf, view.len, out):
                    return out
            except RecordError as exc:
                self._error = str(exc)
                self._reset()
                raise RecordError(str(exc), records=out) from None
            finally:
                PyBuffer_Release(&view)
        chunk = data if type(data) is bytes else bytes(data)
        try:
            self._feed(chunk, out)
        except RecordError as exc:
            self._error = str(exc)
            self._reset()
            raise RecordError(str(exc), records=out) from None
        return out

    def recv_buffer(self, Py_ssize_t min_size=65536):
        """For a buffered-protocol transport: a writable view of the rest of the record
        being assembled, when at least `min_size` bytes of it are still missing, so the
        socket reads straight into the record's own buffer (no chunk copy). None otherwise
        (read into a scratch buffer and feed() it). Valid until the next recv_done/feed;
        write into it only, then call recv_done(nbytes)."""
        cdef Py_ssize_t missing
        if self._error is not None or self._dst == NULL:
            return None
        missing = <Py_ssize_t>(self._need - <uint64_t>self._big_have)
        if missing < min_size or missing <= 0:
            return None
        return PyMemoryView_FromMemory(<char*>self._dst + self._big_have, missing, PyBUF_WRITE)

    def recv_done(self, Py_ssize_t nbytes):
        """`nbytes` were written at the start of the last recv_buffer() view: returns
        [the record] if that completed it, else []."""
        cdef list out = []
        if self._error is not None:
            raise RecordError(f"stream already failed: {self._error}")
        if self._dst == NULL or nbytes < 0 or <uint64_t>(self._big_have + nbytes) > self._need:
            raise ValueError("recv_done without a matching recv_buffer")
        self._big_have += nbytes
        if <uint64_t>self._big_have < self._need:
            return out
        self._finish_big(out)
        return out

    cdef bint _feed_inside_big(self, const uint8_t* p, Py_ssize_t n, list out) except -1:
        """Take `p[:n]` if it lies wholly inside one big record (the one being assembled,
        or one whose header starts it and whose end lies beyond it): copied into the
        record's buffer; the record is appended to `out` if `p` ends it exactly. False
        (nothing taken) for anything else: feed() goes the general way."""
        cdef uint64_t total
        cdef Py_ssize_t missing
        cdef uint8_t hdr[_HEADER_SIZE]
        if self._hdr_have or n <= 0:
            return False
        if self._dst == NULL:
            if n < _HEADER_SIZE:
                return False
            memcpy(hdr, p, _HEADER_SIZE)  # one snapshot: checked and used from here
            total = _check_header(hdr, self._max_record)
            if total <= <uint64_t>n:
                return False  # whole records in it: they become views of one bytes copy
            self._start_big(hdr, total, not out)
            memcpy(self._dst + _HEADER_SIZE, p + _HEADER_SIZE, n - _HEADER_SIZE)
            self._big_have = n
            return True
        missing = <Py_ssize_t>(self._need - <uint64_t>self._big_have)
        if n > missing:
            return False
        memcpy(self._dst + self._big_have, p, n)
        self._big_have += n
        if n == missing:
            self._finish_big(out)
        return True

    cdef int _start_big(self, const uint8_t* hdr, uint64_t total, bint may_sink) except -1:
        """Start assembling a record of `total` bytes whose checked header is `hdr`: in the
        sink's buffer when it has one for it (and nothing completed waits before it:
        `may_sink`), else in a bytes object of its size."""
        cdef PyObject* b
        cdef object buf
        if (may_sink and self._sink is not None and total >= self._sink_min
                and (hdr[0] == REQUEST or hdr[0] == RESPONSE)):  # data: control records are read here
            buf = self._sink(<Py_ssize_t>total)
            if buf is not None:
                PyObject_GetBuffer(buf, &self._dest, PyBUF_WRITABLE)
                if self._dest.len < <Py_ssize_t>total:
                    PyBuffer_Release(&self._dest)
                    raise ValueError(f"the sink gave {self._dest.len} bytes for a record of {total}")
                self._has_dest = True
                self._dst = <uint8_t*>self._dest.buf
                memcpy(self._dest_hdr, hdr, _HEADER_SIZE)
                memcpy(self._dst, hdr, _HEADER_SIZE)
                self._big_have = _HEADER_SIZE
                self._need = total
                return 0
        b = _raw_bytes(NULL, <Py_ssize_t>total)
        if b == NULL:
            raise MemoryError()
        memcpy(_raw_bytes_as_string(b), hdr, _HEADER_SIZE)
        self._big = b
        self._dst = <uint8_t*>_raw_bytes_as_string(b)
        self._big_have = _HEADER_SIZE
        self._need = total
        return 0

    cdef int _finish_big(self, list out) except -1:
        """The record being assembled is complete: append it to `out`, ready for the next."""
        cdef PyObject* b
        cdef bytes done
        cdef Record r
        self._dst = NULL
        self._big_have = 0
        if self._has_dest:
            self._has_dest = False
            PyBuffer_Release(&self._dest)
            done = PyBytes_FromStringAndSize(<const char*>self._dest_hdr, _HEADER_SIZE)
            r = _make_view(done, 0, self._dest_hdr)
            r._resident = True
            out.append(r)
            return 0
        b = self._big
        self._big = NULL
        done = <bytes>b          # takes a reference
        Py_DECREF(done)          # ... and drops the one we held
        out.append(_make_view(done, 0, <const uint8_t*>PyBytes_AS_STRING(done)))
        return 0

    cdef int _feed(self, bytes chunk, list out) except -1:
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(chunk)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk)
        cdef Py_ssize_t pos = 0, take, rem
        cdef uint64_t total = 0
        cdef uint8_t hdr[_HEADER_SIZE]
        cdef PyObject* b
        cdef bytes done
        if self._hdr_have:
            take = _HEADER_SIZE - self._hdr_have
            if take > n:
                take = n
            memcpy(self._hdr + self._hdr_have, p, take)
            pos = take
            self._hdr_have += take
            if self._hdr_have < _HEADER_SIZE:
                return 0
            total = _check_header(self._hdr, self._max_record)
            self._hdr_have = 0
            self._start_big(self._hdr, total, not out)
        if self._dst != NULL:
            take = <Py_ssize_t>(self._need - <uint64_t>self._big_have)
            if take > n - pos:
                take = n - pos
            if take:
                memcpy(self._dst + self._big_have, p + pos, take)
                pos += take
                self._big_have += take
            if <uint64_t>self._big_have < self._need:
                return 0
            self._finish_big(out)
        # Whole records straight from the chunk, as views of it.
        while n - pos >= _HEADER_SIZE:
            memcpy(hdr, p + pos, _HEADER_SIZE)
            total = _check_header(hdr, self._max_record)
            if total > <uint64_t>(n - pos):
                break
            out.append(_make_view(chunk, pos, hdr))
            pos += <Py_ssize_t>total
        rem = n - pos
        if rem:
            if rem < _HEADER_SIZE:
                memcpy(self._hdr, p + pos, rem)
                self._hdr_have = rem
            else:  # header complete and checked (total): one buffer of the record's size
                self._start_big(hdr, total, not out)
                memcpy(self._dst + _HEADER_SIZE, p + pos + _HEADER_SIZE, rem - _HEADER_SIZE)
                self._big_have = rem
        return 0


# -- the daemon's datapath helpers: rings and sockets, per batch ---------------------------

ctypedef uint64_t (*_used_fn)(void* r) noexcept nogil
ctypedef int (*_peek_fn)(void* r, const uint8_t** data, uint32_t* len) noexcept nogil
ctypedef int (*_take_more_fn)(void* r, void* out, uint64_t out_size, uint32_t* lens,
                              const uint8_t** ptrs, uint32_t max_records, uint32_t big_min,
                              uint64_t* extent) noexcept nogil
ctypedef int (*_release_bytes_fn)(void* r, uint64_t nbytes) noexcept nogil
ctypedef int (*_untake_fn)(void* r, uint64_t nbytes) noexcept nogil
ctypedef void (*_release_fn)(void* r) noexcept nogil

cdef struct _seg:
    const void* p
    uint32_t len

ctypedef int (*_push_segs_fn)(void* r, const _seg* segs, const uint32_t* nsegs,
                              uint32_t n) noexcept nogil

cdef enum:
    _POP_MAX = 4096
    _E_FULL = -1
    _E_TOOBIG = -2
    _E_CORRUPT = -3


cdef PyObject* _batch_buffer(uint64_t used, Py_ssize_t max_bytes, uint64_t* alloc) except NULL:
    """A fresh uninitialised bytes object (a new reference) for one pop or take: `used` (the
    ring's used-bytes snapshot, >= what is published now) capped at `max_bytes`, at least
    1 byte; its size goes to *alloc."""
    cdef uint64_t n = used if used < <uint64_t>max_bytes else <uint64_t>max_bytes
    if n == 0:
        n = 1
    cdef PyObject* b = _raw_bytes(NULL, <Py_ssize_t>n)
    if b == NULL:
        raise MemoryError()
    alloc[0] = n
    return b


cdef bytes _batch_base(PyObject* b, Py_ssize_t total, uint64_t alloc):
    """A pop's fresh buffer `b` (a new reference, consumed) as the bytes its records view,
    with a big unused tail given back: the used-bytes snapshot can overestimate a lot when
    max_records cut the batch short; a few bytes of ring headers are not worth a realloc."""
    cdef bytes base
    if <uint64_t>total + 4096 < alloc:
        if _PyBytes_Resize(&b, total if total else 1) < 0:  # b is NULL, an exception set
            raise MemoryError()
    base = <bytes>b
    Py_DECREF(base)  # base now holds the only reference
    return base


cdef tuple _build_records(PyObject* b, uint64_t alloc, int n, const uint32_t* lens,
                          const uint8_t** ptrs, uint64_t mr, list leases):
    """The records of one take: those copied into `b` (a new reference, consumed) become
    views of it, and with `ptrs` (the daemon's take) a record left in the ring
    (ptrs[i] != NULL) becomes a lent record whose Lease goes to `leases`. Returns (records,
    bad); bad lists (record bytes, reason) for malformed records. Shared by the app's pop and
    the daemon's take so both check every record the same way; a MemoryError propagates
    (the callers give the take back)."""
    cdef Py_ssize_t pos = 0, total = 0
    cdef const uint8_t* dp
    cdef const uint8_t* lent
    cdef uint32_t l
    cdef int i
    cdef bytes base
    cdef list recs = [], bad = []
    cdef uint8_t hdr[_HEADER_SIZE]
    for i in range(n):
        if ptrs == NULL or ptrs[i] == NULL:
            total += lens[i]
    base = _batch_base(b, total, alloc)
    dp = <const uint8_t*>PyBytes_AS_STRING(base)
    for i in range(n):
        l = lens[i]
        lent = ptrs[i] if ptrs != NULL else NULL
        try:
            if lent != NULL:
                recs.append(_lent_record(lent, l, mr, leases))
            else:
                _check_one(dp + pos, l, mr, hdr)
                recs.append(_make_view(base, pos, hdr))
        except RecordError as exc:
            bad.append((PyBytes_FromStringAndSize(<const char*>(lent if lent != NULL else dp + pos), l), str(exc)))
        if lent == NULL:
            pos += l
    return recs, bad


def ring_pop_records(ring, Py_ssize_t max_records, Py_ssize_t max_bytes, max_record=DEFAULT_MAX_RECORD):
    """Pop up to `max_records` records (at most `max_bytes`, except that a first record
    bigger than that comes alone) from `ring` (a mrpcd.native.ring.Ring, consumer side)
    with ONE copy into a fresh private bytes object, and parse them as zero-copy views.

    Returns (records, bad): bad lists (record bytes, reason) for malformed records (the
    caller rejects them). [] and [] when the ring is empty. RingCorrupt if the producer
    broke the ring.
    """
    cdef uint64_t mr = _check_max_record(max_record)
    cdef tuple cp = ring.c_pointers()
    cdef void* r = <void*><uintptr_t>cp[0]
    cdef _used_fn used_fn = <_used_fn><uintptr_t>cp[1]
    cdef _peek_fn peek_fn = <_peek_fn><uintptr_t>cp[2]
    cdef _release_fn release_fn = <_release_fn><uintptr_t>cp[6]
    cdef _take_more_fn take_fn = <_take_more_fn><uintptr_t>cp[10]
    cdef uint64_t extent = 0
    cdef uint32_t lens[_POP_MAX]
    cdef uint64_t alloc
    cdef PyObject* b = NULL
    cdef int n
    cdef const uint8_t* dp
    cdef uint32_t l
    if max_records <= 0:
        return [], []
    if max_records > _POP_MAX:
        max_records = _POP_MAX
    if max_bytes < 0:
        max_bytes = 0
    # ring_pop_batch, except that the ring space is freed only once the records are built:
    # a take (nothing kept in place: no record is UINT32_MAX bytes), then ring_release; out
    # of memory on the way, the take is given back (ring_untake) and nothing is lost
    release_fn(r)  # an open take ends first
    b = _batch_buffer(used_fn(r), max_bytes, &alloc)
    n = take_fn(r, _raw_bytes_as_string(b), alloc, lens, NULL, <uint32_t>max_records, 0xFFFFFFFF, &extent)
    if n == _E_TOOBIG:  # the first record alone exceeds max_bytes: take it alone
        Py_DECREF(<object>b)
        b = NULL
        extent = 0
        if peek_fn(r, &dp, &l) != 1:  # (it frees a wrap marker the take may have passed)
            n = _E_CORRUPT
        else:
            alloc = l if l else 1
            b = _raw_bytes(NULL, <Py_ssize_t>alloc)
            if b == NULL:
                raise MemoryError()
            n = take_fn(r, _raw_bytes_as_string(b), alloc, lens, NULL, 1, 0xFFFFFFFF, &extent)
    if n <= 0:
        if b != NULL:
            Py_DECREF(<object>b)
        release_fn(r)  # a lone wrap marker the take passed: free it now
        if n == 0:
            return [], []
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("producer wrote an invalid record length or head index")
    try:
        result = _build_records(b, alloc, n, lens, NULL, mr, None)
    except BaseException:
        (<_untake_fn><uintptr_t>cp[14])(r, extent)
        raise
    release_fn(r)
    return result




cdef class Lease:
    """A read-only buffer over ring memory the daemon sends from (a big payload still in
    the app's tx ring), that knows when nobody reads it any more.

    Why a buffer exporter and not a memoryview: the socket layer (uvloop) keeps a buffer
    export for as long as it still has to write those bytes, and drops it when the kernel
    took them. Counting exports tells exactly when this part of the ring may be reused -
    per payload, with no polling and no copy. After `seal(on_done)` (the send was issued),
    `on_done()` runs once the last export is gone; from then on the lease refuses new
    exports, so stale references can never read reused ring memory.
    """

    cdef const uint8_t* _p
    cdef Py_ssize_t _n
    cdef Py_ssize_t _exports
    cdef Py_ssize_t _shape[1]
    cdef Py_ssize_t _strides[1]
    cdef bint _sealed
    cdef bint _done
    cdef object _on_done

    def __len__(self):
        return self._n

    @property
    def exports(self):
        return self._exports

    @property
    def done(self):
        return self._done

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if self._done:
            raise BufferError("lease returned: its ring memory may be reused")
        if flags & PyBUF_WRITABLE:
            raise BufferError("a lease is read-only")
        self._shape[0] = self._n
        self._strides[0] = 1
        buf.buf = <void*>self._p
        buf.obj = self
        buf.len = self._n
        buf.readonly = 1
        buf.itemsize = 1
        if flags & PyBUF_FORMAT:
            buf.format = b"B"
        else:
            buf.format = NULL
        buf.ndim = 1
        buf.shape = self._shape if flags & PyBUF_ND else NULL
        buf.strides = self._strides if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buf.suboffsets = NULL
        buf.internal = NULL
        self._exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self._exports -= 1
        if self._exports == 0 and self._sealed:
            self._finish()

    def seal(self, on_done):
        """The send was issued: call on_done() once nothing exports this buffer any more
        (now, if nothing does: returns True then)."""
        if self._sealed:
            raise RuntimeError("lease sealed twice")
        self._sealed = True
        self._on_done = on_done
        if self._exports == 0:
            self._finish()
            return True
        return False

    cdef void _finish(self):
        cb = self._on_done
        self._on_done = None
        self._done = True
        if cb is not None:
            try:
                cb()
            except Exception:
                import logging, sys
                logging.getLogger("mrpcd.framing").error("lease callback failed", exc_info=sys.exc_info())

    def __repr__(self):
        return f"<Lease {self._n} bytes, {self._exports} exports{', done' if self._done else ''}>"


cdef Record _lent_record(const uint8_t* p, uint32_t l, uint64_t mr, list leases):
    """A record left in the ring: header and metadata copied (private: what the daemon
    routes and checks on), the payload a Lease over the ring (only ever sent on)."""
    cdef uint8_t hdr[_HEADER_SIZE]
    cdef Record r
    cdef Lease lease
    cdef uint32_t meta_len
    _check_one(p, l, mr, hdr)  # one header snapshot, validated against the ring length
    meta_len = _ld32(hdr + 32)
    r = _make_view(None, 0, hdr)
    r._base = None
    r._hdirty = True
    r._meta = PyBytes_FromStringAndSize(<const char*>p + _HEADER_SIZE, meta_len)
    lease = Lease.__new__(Lease)
    lease._p = p + _HEADER_SIZE + meta_len
    lease._n = _ld32(hdr + 36)
    r._payload = lease
    leases.append(lease)
    return r


def ring_take_records(ring, Py_ssize_t max_records, Py_ssize_t max_bytes, max_record=DEFAULT_MAX_RECORD,
                      Py_ssize_t big_min=65536):
    """ring_pop_records for the daemon's zero-copy send: a record of at least `big_min`
    bytes stays in the ring - its header and metadata are copied (the daemon decides only
    on private copies), its payload is a `Lease` over the ring, sent from there. The app
    can change only its own payload bytes under us, never the framing.

    Nothing is released: returns (records, bad, extent, leases), and the caller frees
    `extent` ring bytes with ring_release_bytes() once every lease of this and all older
    takes is done, in take order (ring_take_more in native/ring.c). Should building the
    records fail (MemoryError), the take is given back (ring_untake) before the error
    propagates: its records stay in the ring for the next take, and the extents the caller
    frees still add up to what was taken.
    """
    cdef uint64_t mr = _check_max_record(max_record)
    cdef tuple cp = ring.c_pointers()
    cdef void* r = <void*><uintptr_t>cp[0]
    cdef _used_fn used_fn = <_used_fn><uintptr_t>cp[1]
    cdef _take_more_fn take_fn = <_take_more_fn><uintptr_t>cp[10]
    cdef uint32_t lens[_POP_MAX]
    cdef const uint8_t* ptrs[_POP_MAX]
    cdef uint64_t alloc, extent = 0, extent2 = 0
    cdef PyObject* b = NULL
    cdef int n
    cdef list recs = [], bad = [], leases = []
    if max_records <= 0:
        return recs, bad, 0, leases
    if max_records > _POP_MAX:
        max_records = _POP_MAX
    if max_bytes < _HEADER_SIZE:
        max_bytes = _HEADER_SIZE
    if big_min < _HEADER_SIZE:
        big_min = _HEADER_SIZE
    if big_min > 0xFFFFFFFF:
        big_min = 0xFFFFFFFF
    b = _batch_buffer(used_fn(r), max_bytes, &alloc)
    n = take_fn(r, _raw_bytes_as_string(b), alloc, lens, ptrs, <uint32_t>max_records, <uint32_t>big_min, &extent)
    if n == _E_TOOBIG:  # a first small record larger than max_bytes (< big_min): copy it alone
        Py_DECREF(<object>b)
        alloc = <uint64_t>big_min
        b = _raw_bytes(NULL, <Py_ssize_t>alloc)
        if b == NULL:
            (<_untake_fn><uintptr_t>cp[14])(r, extent)  # a wrap marker the first take passed
            raise MemoryError()
        n = take_fn(r, _raw_bytes_as_string(b), alloc, lens, ptrs, 1, <uint32_t>big_min, &extent2)
        extent += extent2
    if n <= 0:
        Py_DECREF(<object>b)
        if n == 0:
            return recs, bad, extent, leases
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("producer wrote an invalid record length or head index")
    try:
        recs, bad = _build_records(b, alloc, n, lens, ptrs, mr, leases)
        result = (recs, bad, extent, leases)
    except BaseException:
        # (out of memory) nothing of this take reaches the caller: give it back to the ring;
        # its leases were never handed out or exported, so no stale view can read reused memory
        (<_untake_fn><uintptr_t>cp[14])(r, extent)
        raise
    return result


ctypedef int (*_flag_fn)(void* r) noexcept nogil


# The wake-up checks an app makes after every push and every rx batch, called with the GIL
# held. Through cffi each would drop the GIL around a fence and a flag read; in a client with
# many threads, the thread holding the app's tx lock then hands the GIL to others, which pile
# up on that lock (each a sleep and a wake-up).
def ring_should_wake_consumer(ring):
    """Ring.should_wake_consumer() without releasing the GIL (producer side)."""
    cdef tuple cp = ring.c_pointers()
    return (<_flag_fn><uintptr_t>cp[12])(<void*><uintptr_t>cp[0]) != 0


ctypedef int (*_reserve_fn)(void* r, uint32_t len, uint8_t** data) noexcept nogil
ctypedef void (*_commit_fn)(void* r) noexcept nogil


def ring_reserve_view(ring, Py_ssize_t nbytes):
    """Ring.reserve() in one compiled step (a big peer record received in place): a writable
    view of room for one record of `nbytes`, or None if the ring has no room now (or never
    will: bigger than its max_record)."""
    cdef tuple cp = ring.c_pointers()
    cdef uint8_t* data = NULL
    cdef int rc
    if nbytes <= 0 or nbytes > ring.max_record:
        return None
    rc = (<_reserve_fn><uintptr_t>cp[7])(<void*><uintptr_t>cp[0], <uint32_t>nbytes, &data)
    if rc == 0:
        return PyMemoryView_FromMemory(<char*>data, nbytes, PyBUF_WRITE)
    if rc == _E_FULL:
        return None
    if rc == _E_CORRUPT:
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("consumer index out of range")
    raise ValueError("a reservation is already open on this ring")


def ring_commit(ring):
    """Ring.commit() without the cffi call: publish the reserved record."""
    cdef tuple cp = ring.c_pointers()
    (<_commit_fn><uintptr_t>cp[8])(<void*><uintptr_t>cp[0])


def ring_should_wake_producer(ring):
    """Ring.should_wake_producer() without releasing the GIL (consumer side)."""
    cdef tuple cp = ring.c_pointers()
    return (<_flag_fn><uintptr_t>cp[13])(<void*><uintptr_t>cp[0]) != 0


def ring_release_bytes(ring, uint64_t nbytes):
    """Free the oldest `nbytes` taken by ring_take_records (whole extents, in order)."""
    cdef tuple cp = ring.c_pointers()
    cdef int rc = (<_release_bytes_fn><uintptr_t>cp[11])(<void*><uintptr_t>cp[0], nbytes)
    if rc == -4:
        raise ValueError(f"cannot release {nbytes} bytes: less is taken")
    if rc < 0:
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("ring is corrupt")


def ring_push_records(ring, list records, Py_ssize_t start=0, Py_ssize_t count=-1):
    """Push records[start:start+count] (Record objects) into `ring` (producer side) in one
    C call: a clean record is copied from its base, a record whose header changed (e.g.
    the handle the receiving daemon rewrote) goes as a packed header + its body view, a
    record with a new body is re-encoded once. Returns how many went in (the ring filled
    up after that many; the caller keeps the rest). ValueError for a record larger than
    the ring can ever hold (when it is the first one); RingCorrupt if the consumer broke it.
    """
    cdef tuple cp = ring.c_pointers()
    cdef void* r = <void*><uintptr_t>cp[0]
    cdef _push_segs_fn push_fn = <_push_segs_fn><uintptr_t>cp[4]
    cdef Py_ssize_t end, n, i, k = 0
    cdef Record rec
    cdef _seg* segs
    cdef uint32_t* nsegs
    cdef uint8_t* hdrs
    cdef const char* bp
    cdef int rc
    if count < 0:
        end = len(records)
    else:
        end = min(len(records), start + count)
    if start < 0:
        start = 0
    n = end - start
    if n <= 0:
        return 0
    if n > 0x7FFFFFFF:
        n = 0x7FFFFFFF
    segs = <_seg*>PyMem_Malloc(n * 2 * sizeof(_seg))
    nsegs = <uint32_t*>PyMem_Malloc(n * sizeof(uint32_t))
    hdrs = <uint8_t*>PyMem_Malloc(n * _HEADER_SIZE)
    if segs == NULL or nsegs == NULL or hdrs == NULL:
        PyMem_Free(segs)
        PyMem_Free(nsegs)
        PyMem_Free(hdrs)
        raise MemoryError()
    try:
        for i in range(n):
            rec = <Record?>records[start + i]
            rec._no_body()  # a record received in place is committed, not pushed
            if rec._base is None:
                rec._reencode()
            bp = PyBytes_AS_STRING(rec._base) + rec._off
            if rec._hdirty:
                rec._check_fields()
                rec._pack_header(hdrs + i * _HEADER_SIZE, rec._meta_len, rec._payload_len)
                segs[k].p = hdrs + i * _HEADER_SIZE
                segs[k].len = _HEADER_SIZE
                segs[k + 1].p = bp + _HEADER_SIZE
                segs[k + 1].len = rec._meta_len + rec._payload_len
                k += 2
                nsegs[i] = 2
            else:
                segs[k].p = bp
                segs[k].len = _HEADER_SIZE + rec._meta_len + rec._payload_len
                k += 1
                nsegs[i] = 1
        rc = push_fn(r, segs, nsegs, <uint32_t>n)
    finally:
        PyMem_Free(segs)
        PyMem_Free(nsegs)
        PyMem_Free(hdrs)
    if rc >= 0:
        return rc
    if rc == _E_FULL:
        return 0
    if rc == _E_CORRUPT:
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("consumer index out of range")
    raise ValueError(f"record of {(<Record>records[start]).size} bytes exceeds the ring's maximum")


def ring_push_record(ring, kind, flags, status, handle, call_id, method_id, deadline,
                     meta=b"", payload=b""):
    """encode_record() straight into `ring` (producer side): the header is packed on the
    stack and header, meta and payload are gathered into the ring by one C call, so the
    payload is copied once (into shared memory), with no joined bytes in between.
    True if it went in, False if the ring is full now (as Ring.push); ValueError if it
    can never fit; RecordError like encode_record."""
    cdef Py_buffer mb, pb
    cdef uint8_t hdr[_HEADER_SIZE]
    cdef _seg segs[3]
    cdef uint32_t nseg = 3
    cdef int rc
    cdef tuple cp
    _pack_fields(hdr, kind, flags, status, handle, call_id, method_id, deadline)
    cp = ring.c_pointers()
    PyObject_GetBuffer(meta, &mb, PyBUF_SIMPLE)
    try:
        PyObject_GetBuffer(payload, &pb, PyBUF_SIMPLE)
        try:
            if mb.len > C_MAX_META:
                raise RecordError(f"record meta_len {mb.len} exceeds MAX_META {C_MAX_META}")
            if <uint64_t>pb.len > 0xFFFFFFFFu - _HEADER_SIZE - <uint64_t>mb.len:
                raise ValueError(f"record of {pb.len} payload bytes exceeds the ring's maximum")
            _st32(hdr + 32, <uint32_t>mb.len)
            _st32(hdr + 36, <uint32_t>pb.len)
            segs[0].p = hdr
            segs[0].len = _HEADER_SIZE
            segs[1].p = mb.buf
            segs[1].len = <uint32_t>mb.len
            segs[2].p = pb.buf
            segs[2].len = <uint32_t>pb.len
            rc = (<_push_segs_fn><uintptr_t>cp[4])(<void*><uintptr_t>cp[0], segs, &nseg, 1)
        finally:
            PyBuffer_Release(&pb)
    finally:
        PyBuffer_Release(&mb)
    if rc == 1:
        return True
    if rc == 0 or rc == _E_FULL:
        return False
    if rc == _E_CORRUPT:
        from mrpcd.native.ring import RingCorrupt
        raise RingCorrupt("consumer index out of range")
    raise ValueError(f"record of {_HEADER_SIZE + mb.len + pb.len} bytes exceeds the ring's maximum")


def wire_buffers(list records):
    """The encoded records as a list of buffers for one writelines (→ writev), and their
    total length. Adjacent clean records that lie back to back in one base go out as ONE
    zero-copy view; a record whose header changed goes as a freshly packed header + a view
    of its body; a record with a new body is re-encoded once. Returns (buffers, nbytes)."""
    cdef list out = []
    cdef Record rec
    cdef bytes run_base = None, h
    cdef Py_ssize_t run_start = 0, run_end = 0, sz, nbytes = 0, body_off
    for obj in records:
        rec = <Record?>obj
        rec._no_body()
        if rec._base is None:
            if rec._payload is not None and len(rec._payload) >= _GATHER_MIN:
                # a big body of its own (e.g. a payload still in the app's ring): header
                # and metadata packed, the payload itself as the next buffer - no copy
                if run_base is not None:
                    out.append(_view(run_base, run_start, run_end))
                    run_base = None
                if len(rec._payload) > 0xFFFFFFFF:
                    raise RecordError(f"record payload_len {len(rec._payload)} exceeds 2**32-1")
                h = _encode(rec._kind, rec._flags, rec._status, rec._handle, rec._call_id,
                            rec._method_id, rec._deadline, rec._meta, b"")
                _st32(<uint8_t*>PyBytes_AS_STRING(h) + 36, <uint32_t>len(rec._payload))
                out.append(h)
                out.append(rec._payload)
                nbytes += PyBytes_GET_SIZE(h) + len(rec._payload)
                continue
            rec._reencode()
        sz = _HEADER_SIZE + rec._meta_len + rec._payload_len
        nbytes += sz
        if rec._hdirty:
            h = PyBytes_FromStringAndSize(NULL, _HEADER_SIZE)
            rec._check_fields()
            rec._pack_header(<uint8_t*>PyBytes_AS_STRING(h), rec._meta_len, rec._payload_len)
            if run_base is not None:
                out.append(_view(run_base, run_start, run_end))
            out.append(h)
            run_base = rec._base
            run_start = rec._off + _HEADER_SIZE
            run_end = rec._off + sz
            continue
        if rec._base is run_base and rec._off == run_end:
            run_end += sz
            continue
        if run_base is not None:
            out.append(_view(run_base, run_start, run_end))
        run_base = rec._base
        run_start = rec._off
        run_end = rec._off + sz
    if run_base is not None and run_end > run_start:
        out.append(_view(run_base, run_start, run_end))
    return out, nbytes


cdef object _view(bytes base, Py_ssize_t a, Py_ssize_t b):
    if a == 0 and b == PyBytes_GET_SIZE(base):
        return base
    return memoryview(base)[a:b]


# -- msgpack skipper (codec.read_field) ---------------------------------------------------

class SkipError(ValueError):
    """Malformed or truncated msgpack while skipping."""


cdef Py_ssize_t _avail(Py_ssize_t pos, Py_ssize_t k, Py_ssize_t n) except -1:
    if k > n - pos:
        raise SkipError(f"truncated msgpack: needs {k} bytes at offset {pos}, "
                        f"{n - pos} left")
    return pos + k


cdef Py_ssize_t _skip(const uint8_t* p, Py_ssize_t pos, Py_ssize_t n, int depth) except -1:
    """Return the offset just after the msgpack object starting at p[pos]."""
    cdef uint8_t b
    cdef uint64_t count = 0, length = 0
    cdef int pairs = 0
    cdef uint64_t i
    if depth > 512:
        raise SkipError("msgpack nested too deeply")
    pos = _avail(pos, 1, n)
    b = p[pos - 1]
    if b <= 0x7f or b >= 0xe0 or b == 0xc0 or b == 0xc2 or b == 0xc3:
        return pos
    if 0xa0 <= b <= 0xbf:
        return _avail(pos, b & 0x1f, n)
    if 0x90 <= b <= 0x9f:
        count = b & 0x0f
    elif 0x80 <= b <= 0x8f:
        count = b & 0x0f
        pairs = 1
    elif b == 0xcc or b == 0xd0:
        return _avail(pos, 1, n)
    elif b == 0xcd or b == 0xd1:
        return _avail(pos, 2, n)
    elif b == 0xce or b == 0xd2 or b == 0xca:
        return _avail(pos, 4, n)
    elif b == 0xcf or b == 0xd3 or b == 0xcb:
        return _avail(pos, 8, n)
    elif b == 0xd4:
        return _avail(pos, 2, n)
    elif b == 0xd5:
        return _avail(pos, 3, n)
    elif b == 0xd6:
        return _avail(pos, 5, n)
    elif b == 0xd7:
        return _avail(pos, 9, n)
    elif b == 0xd8:
        return _avail(pos, 17, n)
    elif b == 0xc4 or b == 0xd9:
        pos = _avail(pos, 1, n)
        return _avail(pos, p[pos - 1], n)
    elif b == 0xc5 or b == 0xda:
        pos = _avail(pos, 2, n)
        return _avail(pos, (<Py_ssize_t>p[pos - 2] << 8) | p[pos - 1], n)
    elif b == 0xc6 or b == 0xdb:
        pos = _avail(pos, 4, n)
        length = ((<uint64_t>p[pos - 4] << 24) | (<uint64_t>p[pos - 3] << 16)
                  | (<uint64_t>p[pos - 2] << 8) | p[pos - 1])
        if length > <uint64_t>(n - pos):
            raise SkipError(f"truncated msgpack: needs {length} bytes at offset {pos}, "
                            f"{n - pos} left")
        return pos + <Py_ssize_t>length
    elif b == 0xc7:
        pos = _avail(pos, 2, n)
        return _avail(pos, p[pos - 2], n)
    elif b == 0xc8:
        pos = _avail(pos, 3, n)
        return _avail(pos, (<Py_ssize_t>p[pos - 3] << 8) | p[pos - 2], n)
    elif b == 0xc9:
        pos = _avail(pos, 5, n)
        length = ((<uint64_t>p[pos - 5] << 24) | (<uint64_t>p[pos - 4] << 16)
                  | (<uint64_t>p[pos - 3] << 8) | p[pos - 2])
        if length > <uint64_t>(n - pos):
            raise SkipError(f"truncated msgpack: needs {length} bytes at offset {pos}, "
                            f"{n - pos} left")
        return pos + <Py_ssize_t>length
    elif b == 0xdc or b == 0xde:
        pos = _avail(pos, 2, n)
        count = (<uint64_t>p[pos - 2] << 8) | p[pos - 1]
        pairs = b == 0xde
    elif b == 0xdd or b == 0xdf:
        pos = _avail(pos, 4, n)
        count = ((<uint64_t>p[pos - 4] << 24) | (<uint64_t>p[pos - 3] << 16)
                 | (<uint64_t>p[pos - 2] << 8) | p[pos - 1])
        pairs = b == 0xdf
    else:  # 0xc1: never used
        raise SkipError(f"invalid msgpack byte 0x{b:02x} at offset {pos - 1}")
    if pairs:
        count *= 2
    # every element takes at least one byte: refuse impossible counts before looping
    if count > <uint64_t>(n - pos):
        raise SkipError(f"msgpack container of {count} elements exceeds buffer "
                        f"({n - pos} bytes left)")
    i = 0
    while i < count:
        pos = _skip(p, pos, n, depth + 1)
        i += 1
    return pos


cdef Py_ssize_t _array_header(const uint8_t* p, Py_ssize_t pos, Py_ssize_t n,
                              Py_ssize_t* count) except -1:
    """Read an array header at p[pos]; count = -1 for nil. Returns the offset after it."""
    cdef uint8_t b
    pos = _avail(pos, 1, n)
    b = p[pos - 1]
    if 0x90 <= b <= 0x9f:
        count[0] = b & 0x0f
    elif b == 0xdc:
        pos = _avail(pos, 2, n)
        count[0] = (<Py_ssize_t>p[pos - 2] << 8) | p[pos - 1]
    elif b == 0xdd:
        pos = _avail(pos, 4, n)
        count[0] = <Py_ssize_t>((<uint64_t>p[pos - 4] << 24) | (<uint64_t>p[pos - 3] << 16)
                                | (<uint64_t>p[pos - 2] << 8) | p[pos - 1])
    elif b == 0xc0:
        count[0] = -1
    else:
        count[0] = -2
    return pos


def locate(data, path):
    """Find one field's encoded value inside a message without decoding the others.

    `path` is a sequence of (index, field_count) steps: at each step the current object
    must be an array of exactly field_count elements; the element at `index` is skipped
    to. Returns (0, start, end) with the bounds of the last element's bytes; or
    (1, step, 0) if the object at `step` was nil, (2, step, 0) if it was neither an array
    nor nil, (3, step, count) if that array had `count` elements. Raises SkipError on
    malformed or truncated msgpack.
    """
    cdef Py_buffer view
    cdef Py_ssize_t pos = 0, n, count, i, idx, nf
    cdef const uint8_t* p
    cdef Py_ssize_t step = 0
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        n = view.len
        for idx, nf in path:
            pos = _array_header(p, pos, n, &count)
            if count == -1:
                return (1, step, 0)
            if count == -2:
                return (2, step, 0)
            if count != nf:
                return (3, step, count)
            for i in range(idx):
                pos = _skip(p, pos, n, 0)
            step += 1
        return (0, pos, _skip(p, pos, n, 0))
    finally:
        PyBuffer_Release(&view)


def skip(data, Py_ssize_t pos=0):
    """Offset just after the msgpack object at data[pos] (bounds-checked)."""
    cdef Py_buffer view
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if pos < 0 or pos > view.len:
            raise SkipError(f"offset {pos} outside buffer of {view.len} bytes")
        return _skip(<const uint8_t*>view.buf, pos, view.len, 0)
    finally:
        PyBuffer_Release(&view)
