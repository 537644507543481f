# cython: language_level=3
"""Byte-level check of runs the schema-evolution fast path copies as they are
(marshal/evolve_gen.py): a repeated field of scalars, or of small messages of scalars,
whose peer encoding is already the local one.

Unpacking such a field into millions of Python objects and packing them again is most of
what transcoding costs. `Run.check` instead reads the bytes once without making objects,
and answers True only when copying them gives exactly the bytes the reference transcoder
writes: every value valid for the peer's decoder and the local encoder (kind, range,
UTF-8), and every item in the one form msgpack's packer writes for it (smallest int /
length form, float64, no float32). Anything else answers False, and the caller takes the
slower path, which decides (and words any error) as before.

The bytes are untrusted (a peer wrote them): every read is checked against the end of
the run first (`_need`), counts are checked against the bytes left before looping.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint64_t, int8_t, int16_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize

K_INT, K_BOOL, K_FLOAT, K_STR, K_BYTES = 1, 2, 3, 4, 5
# conversions of a value while a run of messages is laid out again (Run.reshape)
C_SAME, C_TO_BOOL, C_TO_INT, C_TO_BIN, C_TO_STR = 0, 1, 2, 3, 4


cdef inline bint _need(Py_ssize_t pos, Py_ssize_t k, Py_ssize_t end):
    return k <= end - pos


cdef inline uint64_t _be(const uint8_t* p, Py_ssize_t pos, int k):
    cdef uint64_t v = 0
    cdef int i
    for i in range(k):
        v = (v << 8) | p[pos + i]
    return v


cdef Py_ssize_t _utf8(const uint8_t* p, Py_ssize_t pos, Py_ssize_t n) except -2:
    """pos + n if p[pos:pos + n] is valid UTF-8 (as msgpack's strict decoding), else -1."""
    cdef Py_ssize_t i
    for i in range(n):
        if p[pos + i] >= 0x80:
            try:
                PyUnicode_DecodeUTF8(<const char*>p + pos, n, NULL)
            except UnicodeDecodeError:
                return -1
            break
    return pos + n


cdef Py_ssize_t _scalar(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint8_t kind, bint null,
                        int64_t lo, uint64_t hi) except -2:
    """The offset after the value at p[pos] if it is taken, else -1."""
    cdef uint8_t b
    cdef uint64_t u
    cdef int64_t s
    cdef Py_ssize_t n
    if not _need(pos, 1, end):
        return -1
    b = p[pos]
    pos += 1
    if b == 0xc0:
        return pos if null else -1
    if kind == 1:  # an integer: the packer's smallest form, within [lo, hi] (lo <= 0 < hi)
        if b <= 0x7f:
            return pos if <uint64_t>b <= hi else -1
        if b >= 0xe0:
            s = <int8_t>b
            return pos if s >= lo else -1
        if b == 0xcc or b == 0xcd or b == 0xce or b == 0xcf:
            n = 1 if b == 0xcc else 2 if b == 0xcd else 4 if b == 0xce else 8
            if not _need(pos, n, end):
                return -1
            u = _be(p, pos, <int>n)
            if u < (0x80 if n == 1 else 0x100 if n == 2 else 0x10000 if n == 4 else 0x100000000) or u > hi:
                return -1
            return pos + n
        if b == 0xd0 or b == 0xd1 or b == 0xd2 or b == 0xd3:
            n = 1 if b == 0xd0 else 2 if b == 0xd1 else 4 if b == 0xd2 else 8
            if not _need(pos, n, end):
                return -1
            u = _be(p, pos, <int>n)
            if n == 1:
                s = <int8_t>u
            elif n == 2:
                s = <int16_t>u
            elif n == 4:
                s = <int32_t>u
            else:
                s = <int64_t>u
            if s >= (-32 if n == 1 else -128 if n == 2 else -32768 if n == 4 else -2147483648) or s < lo:
                return -1
            return pos + n
        return -1
    if kind == 2:
        return pos if b == 0xc2 or b == 0xc3 else -1
    if kind == 3:  # a float: float64 only (a float32 would be packed again as a float64)
        if b != 0xcb or not _need(pos, 8, end):
            return -1
        return pos + 8
    if kind == 4:
        if 0xa0 <= b <= 0xbf:
            n = b & 0x1f
        elif b == 0xd9 or b == 0xda or b == 0xdb:
            u = 1 if b == 0xd9 else 2 if b == 0xda else 4
            if not _need(pos, <Py_ssize_t>u, end):
                return -1
            n = <Py_ssize_t>_be(p, pos, <int>u)
            pos += <Py_ssize_t>u
            if n < (32 if u == 1 else 256 if u == 2 else 65536):
                return -1
        else:
            return -1
        if not _need(pos, n, end):
            return -1
        return _utf8(p, pos, n)
    if kind == 5:
        if b == 0xc4 or b == 0xc5 or b == 0xc6:
            u = 1 if b == 0xc4 else 2 if b == 0xc5 else 4
            if not _need(pos, <Py_ssize_t>u, end):
                return -1
            n = <Py_ssize_t>_be(p, pos, <int>u)
            pos += <Py_ssize_t>u
            if n < (0 if u == 1 else 256 if u == 2 else 65536) or not _need(pos, n, end):
                return -1
            return pos + n
        return -1
    return -1


cdef Py_ssize_t _header(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* count,
                       uint8_t fix, uint8_t b16, uint8_t b32, Py_ssize_t item_bytes):
    """The offset after an array or map header in the packer's smallest form (count set),
    else -1: `fix` the fix form's first byte (0x90 / 0x80), `b16` / `b32` the longer forms'
    markers, `item_bytes` the least bytes an item takes (1 for an array, 2 for a map's key
    and value), so a count the rest of the buffer cannot hold is refused here."""
    cdef uint8_t b
    cdef Py_ssize_t k
    if not _need(pos, 1, end):
        return -1
    b = p[pos]
    pos += 1
    if fix <= b <= fix + 0x0f:
        count[0] = b & 0x0f
    elif b == b16 or b == b32:
        k = 2 if b == b16 else 4
        if not _need(pos, k, end):
            return -1
        count[0] = <Py_ssize_t>_be(p, pos, <int>k)
        pos += k
        if count[0] < (16 if k == 2 else 65536):
            return -1
    else:
        return -1
    if count[0] > (end - pos) // item_bytes:
        return -1
    return pos


cdef inline Py_ssize_t _array(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* count):
    return _header(p, pos, end, count, 0x90, 0xdc, 0xdd, 1)


cdef inline Py_ssize_t _map(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* count):
    return _header(p, pos, end, count, 0x80, 0xde, 0xdf, 2)


cdef class Run:
    """How to check one repeated field: of scalars (`fields` None, one spec) or of messages
    of `len(specs)` scalar fields. A spec: (kind, nullable, lo, hi); kind is K_INT (lo, hi:
    the range both sides accept, lo <= 0 < hi), K_BOOL, K_FLOAT, K_STR or K_BYTES."""

    cdef int nf
    cdef int n
    cdef uint8_t* kinds
    cdef uint8_t* nulls
    cdef int64_t* los
    cdef uint64_t* his
    cdef int nl  # local fields of a run laid out again (0: copied as it is)
    cdef int* srcs  # per local field: the peer field it comes from, or -1 (its default)
    cdef uint8_t* convs  # per local field: C_*
    cdef list defaults  # per local field: the packed default (bytes) or None
    cdef bytes lhead  # the local message's array header
    cdef Py_ssize_t extra  # bytes a message may grow by: defaults, header, conversions
    cdef bint is_map  # a map: each item a key (kkind, within [klo, khi]) then a value as above
    cdef uint8_t kkind
    cdef int64_t klo
    cdef uint64_t khi

    def __cinit__(self, bint messages, specs, layout=None, key=None):
        cdef int i
        self.is_map = key is not None
        if key is not None:
            kind, lo, hi = key
            if kind not in (K_INT, K_BOOL, K_STR) or lo > 0 or hi < 1:
                raise ValueError(f"bad key spec {key!r}")
            self.kkind, self.klo, self.khi = kind, lo, hi
        self.srcs = NULL
        self.convs = NULL
        self.kinds = NULL
        self.nulls = NULL
        self.los = NULL
        self.his = NULL
        self.n = len(specs)
        self.nf = self.n if messages else -1
        if self.n < 1 or self.n > 4096:
            raise ValueError("a run needs 1 to 4096 specs")
        if not messages and self.n != 1:
            raise ValueError("a run of scalars has one spec")
        self.kinds = <uint8_t*>malloc(self.n)
        self.nulls = <uint8_t*>malloc(self.n)
        self.los = <int64_t*>malloc(self.n * sizeof(int64_t))
        self.his = <uint64_t*>malloc(self.n * sizeof(uint64_t))
        if not self.kinds or not self.nulls or not self.los or not self.his:
            raise MemoryError()
        for i in range(self.n):
            kind, null, lo, hi = specs[i]
            if kind not in (K_INT, K_BOOL, K_FLOAT, K_STR, K_BYTES) or lo > 0 or hi < 1:
                raise ValueError(f"bad spec {specs[i]!r}")
            self.kinds[i], self.nulls[i], self.los[i], self.his[i] = kind, bool(null), lo, hi
        self.nl = 0
        if layout is None:
            return
        if not messages:
            raise ValueError("only a run of messages is laid out again")
        fields, head = layout
        self.nl = len(fields)
        if self.nl < 1 or self.nl > 4096 or type(head) is not bytes:
            raise ValueError("a layout needs 1 to 4096 fields and a header")
        self.lhead = head
        self.srcs = <int*>malloc(self.nl * sizeof(int))
        self.convs = <uint8_t*>malloc(self.nl)
        if not self.srcs or not self.convs:
            raise MemoryError()
        self.defaults = []
        self.extra = len(head)
        for i in range(self.nl):
            src, conv, default = fields[i]
            if src == -1:
                if type(default) is not bytes or not default:
                    raise ValueError("a field from no peer field needs its packed default")
                self.extra += len(default)
            elif not 0 <= src < self.n or conv not in (C_SAME, C_TO_BOOL, C_TO_INT, C_TO_BIN, C_TO_STR):
                raise ValueError(f"bad layout field {fields[i]!r}")
            elif (conv == C_TO_BOOL and self.kinds[src] != K_INT or conv == C_TO_INT and self.kinds[src] != K_BOOL
                  or conv == C_TO_BIN and self.kinds[src] != K_STR or conv == C_TO_STR and self.kinds[src] != K_BYTES):
                raise ValueError(f"conversion {conv} of a kind {self.kinds[src]} field")
            self.extra += 1
            self.srcs[i], self.convs[i] = src, conv
            self.defaults.append(default if src == -1 else None)

    def __dealloc__(self):
        free(self.srcs)
        free(self.convs)
        free(self.kinds)
        free(self.nulls)
        free(self.los)
        free(self.his)

    @property
    def reshaped(self) -> bool:
        """True for a run laid out again (`reshape`), False for one copied (`check`)."""
        return self.nl > 0

    def check(self, data, Py_ssize_t start, Py_ssize_t end) -> bool:
        """True if data[start:end] is exactly one such array that the fast path may copy."""
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t pos, count, c, i, j
        cdef set seen
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if start < 0 or end < start or end > view.len:
                return False
            p = <const uint8_t*>view.buf
            pos = _map(p, start, end, &count) if self.is_map else _array(p, start, end, &count)
            if pos < 0:
                return False
            seen = set() if self.is_map else None
            for i in range(count):
                if self.is_map:
                    pos = _key(p, pos, end, self.kkind, self.klo, self.khi, seen)
                    if pos < 0:
                        return False
                if self.nf < 0:
                    pos = _scalar(p, pos, end, self.kinds[0], self.nulls[0], self.los[0], self.his[0])
                    if pos < 0:
                        return False
                    continue
                pos = _array(p, pos, end, &c)
                if pos < 0 or c != self.nf:
                    return False
                for j in range(c):
                    pos = _scalar(p, pos, end, self.kinds[j], self.nulls[j], self.los[j], self.his[j])
                    if pos < 0:
                        return False
            return pos == end
        finally:
            PyBuffer_Release(&view)

    def reshape(self, data, Py_ssize_t start, Py_ssize_t end):
        """data[start:end] (an array of messages) laid out as the local messages, as the
        packer writes them, or None where the fast path must not take it (as `check`)."""
        cdef Py_buffer view
        cdef const uint8_t* p
        cdef Py_ssize_t pos, count, c, i, j, k, size, o = 0, a, n, e
        cdef Py_ssize_t* starts = NULL
        cdef Py_ssize_t* ends = NULL
        cdef char* out = NULL
        cdef uint8_t b, conv
        cdef bytes d
        cdef set seen
        if self.nl == 0:
            raise ValueError("this run has no layout")
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            if start < 0 or end < start or end > view.len:
                return None
            p = <const uint8_t*>view.buf
            pos = _map(p, start, end, &count) if self.is_map else _array(p, start, end, &count)
            if pos < 0:
                return None
            seen = set() if self.is_map else None
            size = (end - start) + 5 + count * self.extra
            out = <char*>malloc(size)
            starts = <Py_ssize_t*>malloc(self.n * sizeof(Py_ssize_t))
            ends = <Py_ssize_t*>malloc(self.n * sizeof(Py_ssize_t))
            if not out or not starts or not ends:
                raise MemoryError()
            if self.is_map:
                o = _put_header(out, o, 0x80, 0xde, 0xdf, count)
            else:
                o = _put_header(out, o, 0x90, 0xdc, 0xdd, count)
            for i in range(count):
                e = pos
                if self.is_map:  # the key, copied as it is
                    pos = _key(p, pos, end, self.kkind, self.klo, self.khi, seen)
                    if pos < 0:
                        return None
                    memcpy(out + o, <const char*>p + e, pos - e)
                    o += pos - e
                    e = pos
                pos = _array(p, pos, end, &c)
                if pos < 0 or c != self.nf:
                    return None
                for j in range(c):
                    starts[j] = pos
                    pos = _scalar(p, pos, end, self.kinds[j], self.nulls[j], self.los[j], self.his[j])
                    if pos < 0:
                        return None
                    ends[j] = pos
                # (what this message writes: at most its own bytes and `extra`; so `size`)
                if o + (pos - e) + self.extra > size:
                    return None
                memcpy(out + o, <const char*>self.lhead, len(self.lhead))
                o += len(self.lhead)
                for k in range(self.nl):
                    j = self.srcs[k]
                    if j < 0:
                        d = self.defaults[k]
                        memcpy(out + o, <const char*>d, len(d))
                        o += len(d)
                        continue
                    conv = self.convs[k]
                    a = starts[j]
                    b = p[a]
                    if conv == 0 or b == 0xc0:
                        memcpy(out + o, <const char*>p + a, ends[j] - a)
                        o += ends[j] - a
                    elif conv == 1:  # an int 0 / 1 (range-checked) to a bool
                        out[o] = <char>(0xc3 if b == 1 else 0xc2)
                        o += 1
                    elif conv == 2:  # a bool to 0 / 1
                        out[o] = <char>(1 if b == 0xc3 else 0)
                        o += 1
                    else:  # a string to bytes / bytes to a string: the same payload, its own header
                        n = _payload(p, a, &a)
                        if n < 0 or a + n != ends[j]:  # (checked by _scalar already; never trusted twice)
                            return None
                        if conv == 4 and _utf8(p, a, n) < 0:
                            return None
                        if conv == 3:
                            o = _put_bin_header(out, o, n)
                        else:
                            o = _put_header(out, o, 0xa0, 0xda, 0xdb, n, 0xd9, 32)
                        memcpy(out + o, <const char*>p + a, n)
                        o += n
            if pos != end:
                return None
            return PyBytes_FromStringAndSize(out, o)
        finally:
            free(out)
            free(starts)
            free(ends)
            PyBuffer_Release(&view)


cdef Py_ssize_t _put_header(char* out, Py_ssize_t o, uint8_t fix, uint8_t b16, uint8_t b32, Py_ssize_t n,
                            uint8_t b8=0, Py_ssize_t fixmax=16):
    """An array (or, with b8 / fixmax 32, a string) header for n items as the packer writes it."""
    cdef int k, i
    if n < fixmax:
        out[o] = <char>(fix | n)
        return o + 1
    if b8 and n < 256:
        out[o] = <char>b8
        out[o + 1] = <char>n
        return o + 2
    if n < 65536:
        out[o] = <char>b16
        k = 2
    else:
        out[o] = <char>b32
        k = 4
    for i in range(k):
        out[o + 1 + i] = <char>((n >> (8 * (k - 1 - i))) & 0xff)
    return o + 1 + k


cdef Py_ssize_t _put_bin_header(char* out, Py_ssize_t o, Py_ssize_t n):
    cdef int k, i
    if n < 256:
        out[o] = <char>0xc4
        out[o + 1] = <char>n
        return o + 2
    k = 2 if n < 65536 else 4
    out[o] = <char>(0xc5 if k == 2 else 0xc6)
    for i in range(k):
        out[o + 1 + i] = <char>((n >> (8 * (k - 1 - i))) & 0xff)
    return o + 1 + k


cdef Py_ssize_t _payload(const uint8_t* p, Py_ssize_t a, Py_ssize_t* at):
    """The length of the string / bytes item at p[a] (already checked by _scalar), its
    payload's offset in at."""
    cdef uint8_t b = p[a]
    cdef int k
    if 0xa0 <= b <= 0xbf:
        at[0] = a + 1
        return b & 0x1f
    k = 1 if b == 0xd9 or b == 0xc4 else 2 if b == 0xda or b == 0xc5 else 4
    at[0] = a + 1 + k
    return <Py_ssize_t>_be(p, a + 1, k)


cdef Py_ssize_t _key(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint8_t kind, int64_t lo, uint64_t hi,
                     set seen) except -2:
    """The offset after a map key at p[pos] if it is taken and not seen before in this map
    (msgpack's dict keeps one entry of equal keys, where a copy would keep both; equal keys
    in the packer's one form have equal bytes), else -1."""
    cdef Py_ssize_t after = _scalar(p, pos, end, kind, False, lo, hi)
    cdef bytes k
    if after < 0:
        return -1
    k = PyBytes_FromStringAndSize(<const char*>p + pos, after - pos)
    if k in seen:
        return -1
    seen.add(k)
    return after
