# cython: language_level=3
"""Hot paths of record framing: the 40-byte header, record parsing, the stream decoder,
and a bounds-checked msgpack skipper (used by codec.read_field).

Everything parsed here comes from untrusted memory (an app's ring or a peer's socket):
every length is read once into a local, checked against the buffer and the limits, and
only then used. Record.meta / Record.payload are private copies.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    _HEADER_SIZE = 40

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


cdef inline bint _kind_ok(unsigned int k) noexcept:
    return k == 1 or k == 2 or k == 3 or k == 4 or k == 16 or k == 17


# -- little-endian loads/stores (portable; compilers turn these into plain moves) -------
cdef inline uint16_t _ld16(const uint8_t* p) noexcept:
    return <uint16_t>p[0] | (<uint16_t>p[1] << 8)

cdef inline uint32_t _ld32(const uint8_t* p) noexcept:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))

cdef inline uint64_t _ld64(const uint8_t* p) noexcept:
    return <uint64_t>_ld32(p) | (<uint64_t>_ld32(p + 4) << 32)

cdef inline void _st16(uint8_t* p, uint16_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF

cdef inline void _st32(uint8_t* p, uint32_t v) noexcept:
    p[0] = v & 0xFF
    p[1] = (v >> 8) & 0xFF
    p[2] = (v >> 16) & 0xFF
    p[3] = (v >> 24) & 0xFF

cdef inline void _st64(uint8_t* p, uint64_t v) noexcept:
    _st32(p, <uint32_t>(v & 0xFFFFFFFFu))
    _st32(p + 4, <uint32_t>(v >> 32))


cdef class Record:
    """One record: header fields, raw metadata section, raw payload."""

    cdef public uint8_t kind
    cdef public uint8_t flags
    cdef public uint16_t status
    cdef public uint32_t handle
    cdef public uint64_t call_id
    cdef public uint32_t method_id
    cdef public uint64_t deadline
    cdef public bytes meta
    cdef public bytes payload

    def __init__(self, kind=0, flags=0, status=0, handle=0, call_id=0, method_id=0,
                 deadline=0, meta=b"", payload=b""):
        self.kind = kind
        self.flags = flags
        self.status = status
        self.handle = handle
        self.call_id = call_id
        self.method_id = method_id
        self.deadline = deadline
        self.meta = bytes(meta)
        self.payload = bytes(payload)

    def encode(self):
        """header + meta + payload, as bytes."""
        if self.meta is None or self.payload is None:
            raise RecordError("record meta and payload must be bytes, not None")
        return _encode(self.kind, self.flags, self.status, self.handle, self.call_id,
                       self.method_id, self.deadline, self.meta, self.payload)

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        cdef Record o = <Record>other
        return (self.kind == o.kind and self.flags == o.flags and self.status == o.status
                and self.handle == o.handle and self.call_id == o.call_id
                and self.method_id == o.method_id and self.deadline == o.deadline
                and self.meta == o.meta and self.payload == o.payload)

    __hash__ = None

    def __repr__(self):
        return ("Record(kind=%s, flags=%d, status=%d, handle=%d, call_id=%d, method_id=%d, "
                "deadline=%d, meta=%d bytes, payload=%d bytes)" % (
                    _KIND_NAMES.get(self.kind, self.kind), self.flags, self.status,
                    self.handle, self.call_id, self.method_id, self.deadline,
                    len(self.meta) if self.meta is not None else 0,
                    len(self.payload) if self.payload is not None else 0))

    def __reduce__(self):
        return (Record, (self.kind, self.flags, self.status, self.handle, self.call_id,
                         self.method_id, self.deadline, self.meta, self.payload))


cdef object _u(object value, uint64_t maximum, str name):
    """Range-check one header integer given by the caller (encode side)."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"record {name} must be an int, got {type(value).__name__}")
        value = int(value)
    if value < 0 or value > maximum:
        raise RecordError(f"record {name} {value} out of range (0..{maximum})")
    return value


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


cdef Record _make(const uint8_t* hdr, const uint8_t* body):
    """Build a Record from a validated header snapshot `hdr` whose meta and payload are
    fully present at `body` (the lengths are taken from the snapshot only)."""
    cdef Record r = Record.__new__(Record)
    cdef uint32_t meta_len = _ld32(hdr + 32)
    cdef uint32_t payload_len = _ld32(hdr + 36)
    r.kind = hdr[0]
    r.flags = hdr[1]
    r.status = _ld16(hdr + 2)
    r.handle = _ld32(hdr + 4)
    r.call_id = _ld64(hdr + 8)
    r.method_id = _ld32(hdr + 16)
    r.deadline = _ld64(hdr + 24)
    r.meta = PyBytes_FromStringAndSize(<const char*>body, meta_len)
    r.payload = PyBytes_FromStringAndSize(<const char*>body + meta_len, payload_len)
    return r


cdef uint64_t _check_max_record(object max_record) except 0:
    if type(max_record) is not int or max_record < _HEADER_SIZE:
        raise ValueError(f"max_record must be an int >= {_HEADER_SIZE}, got {max_record!r}")
    if max_record > 0x7FFFFFFFFFFFFFFF:
        max_record = 0x7FFFFFFFFFFFFFFF
    return max_record


cdef Record _parse(const uint8_t* p, Py_ssize_t n, uint64_t max_record):
    """Parse exactly one record from p[0:n], copying the header fields exactly once."""
    cdef uint8_t hdr[_HEADER_SIZE]
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
    return _make(hdr, p + _HEADER_SIZE)


def parse_record(buf, max_record=DEFAULT_MAX_RECORD):
    """Parse exactly one record from a bytes-like buffer (no trailing bytes); RecordError
    if the record breaks the format or the limits. meta/payload are private copies."""
    cdef Py_buffer view
    cdef uint64_t mr = _check_max_record(max_record)
    try:
        PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    except BufferError as exc:
        raise TypeError(f"parse_record needs a contiguous bytes-like buffer: {exc}") from None
    try:
        return _parse(<const uint8_t*>view.buf, view.len, mr)
    finally:
        PyBuffer_Release(&view)


cdef class FrameDecoder:
    """Splits a byte stream (TCP) into records.

    feed(data) returns every record completed by data and keeps at most one partial
    record. A header announcing a record above max_record (or otherwise malformed) is
    refused as soon as its 40 bytes are in, before any of its body is buffered. After a
    RecordError the stream is unusable: later feeds raise again.
    """

    cdef uint64_t _max_record
    cdef bytearray _buf        # bytes of the one partial record
    cdef uint64_t _need        # its total length once the header is in, else 0
    cdef object _error

    def __init__(self, max_record=DEFAULT_MAX_RECORD):
        self._max_record = _check_max_record(max_record)
        self._buf = bytearray()
        self._need = 0
        self._error = None

    @property
    def max_record(self):
        return self._max_record

    @property
    def buffered(self):
        """Number of bytes of the partial record held."""
        return len(self._buf)

    def feed(self, data):
        cdef Py_buffer view
        cdef list out = []
        if self._error is not None:
            raise RecordError(f"stream already failed: {self._error}")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const uint8_t*>view.buf, view.len, out)
        except RecordError as exc:
            self._error = str(exc)
            self._buf = bytearray()
            self._need = 0
            raise RecordError(str(exc), records=out) from None
        finally:
            PyBuffer_Release(&view)
        return out

    cdef int _feed(self, const uint8_t* p, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t pos = 0, have, take
        cdef uint64_t total = 0
        cdef const uint8_t* bp
        cdef uint8_t hdr[_HEADER_SIZE]
        have = len(self._buf)
        if have:
            # Complete the pending partial record first.
            if have < _HEADER_SIZE:
                take = _HEADER_SIZE - have
                if take > n:
                    take = n
                self._buf += (<const char*>p)[:take]
                pos = take
                have += take
                if have < _HEADER_SIZE:
                    return 0
                self._need = _check_header(<const uint8_t*>(<char*>self._buf), self._max_record)
            take = <Py_ssize_t>(self._need - <uint64_t>have)
            if take > n - pos:
                take = n - pos
            if take:
                self._buf += (<const char*>p)[pos:pos + take]
                pos += take
                have += take
            if <uint64_t>have < self._need:
                return 0
            bp = <const uint8_t*>(<char*>self._buf)
            out.append(_make(bp, bp + _HEADER_SIZE))
            self._buf = bytearray()
            self._need = 0
        # Whole records straight from the caller's buffer.
        while n - pos >= _HEADER_SIZE:
            memcpy(hdr, p + pos, _HEADER_SIZE)  # one snapshot: lengths are read once
            total = _check_header(hdr, self._max_record)
            if total > <uint64_t>(n - pos):
                break
            out.append(_make(hdr, p + pos + _HEADER_SIZE))
            pos += <Py_ssize_t>total
        if pos < n:
            # Keep the one partial record (its header, if complete, is already checked).
            self._buf = bytearray((<const char*>p)[pos:n])
            if n - pos >= _HEADER_SIZE:
                self._need = total
        return 0


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
