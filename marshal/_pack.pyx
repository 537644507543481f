# cython: language_level=3
"""A msgpack packer for the app's send path that does not copy big `bytes` values.

The schema codec's encoder turns a message into nested tuples that msgpack packs into one
`bytes` object: a 1 MiB `bytes` field is copied into that object, and the record push copies
it again, into the shared ring. `pack_parts` packs the same nested values to the very same
bytes (msgpack.Packer(use_bin_type=True) -- the codec's options), but hands the result back
as a `Parts`: packed runs interleaved with references to the caller's own `bytes` objects of
at least `threshold` bytes. The ring push (mrpcd.marshal._ringio.ring_push_parts) gathers
the parts straight into the ring, so such a field is copied once, from the user's object
into shared memory.

Only exact built-in types are packed here (None, bool, int, float, bytes, str, tuple, list,
dict), and only the way msgpack itself packs them; anything else (subclasses such as
IntEnum members, bytearray, memoryview, ExtType, ...) is packed by msgpack's own Packer and
its bytes spliced in, which is byte-identical because msgpack's encoding is context-free.
A value this packer cannot pack (an int out of range, a lone surrogate, nesting too deep,
a container over 2**32-1 items) raises `Unsupported`: the caller packs the whole value with
msgpack instead, which then raises msgpack's own error.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.dict cimport PyDict_Next
from cpython.ref cimport PyObject
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy

import msgpack

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int* overflow) except? -1
    unsigned long long PyLong_AsUnsignedLongLong(object o) except? -1
    double PyFloat_AS_DOUBLE(object o)
    int PyFloat_Pack8(double x, char* p, int le) except -1
    Py_ssize_t PyTuple_GET_SIZE(object o)
    PyObject* PyTuple_GET_ITEM(object o, Py_ssize_t i)
    Py_ssize_t PyList_GET_SIZE(object o)
    PyObject* PyList_GET_ITEM(object o, Py_ssize_t i)
    Py_ssize_t PyDict_GET_SIZE(object o)

# The codec's packer (mrpcd.marshal.codec._pack uses the same options): the fallback for
# everything that is not an exact built-in type, and the reference for byte-equality.
_msgpack_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

DEFAULT_THRESHOLD = 32 * 1024
# msgpack refuses nesting deeper than its own limit; far below it we hand over to msgpack,
# so the error (or the result) is exactly msgpack's.
cdef int _MAX_DEPTH = 512
cdef uint64_t _ITEM_LIMIT = 0xFFFFFFFFu


class Unsupported(ValueError):
    """This packer cannot pack the value the way msgpack does: pack it with msgpack."""


cdef class Parts:
    """An encoded message as a list of buffers: `parts` (bytes objects: packed runs and the
    caller's own big `bytes` values, by reference) whose concatenation is the encoding.
    `len()` is the encoded length, so size limits and flow control see the true size;
    `tobytes()` joins them (one copy) for whoever needs one buffer."""

    cdef readonly list parts
    cdef readonly Py_ssize_t nbytes

    def __init__(self, list parts, Py_ssize_t nbytes):
        self.parts = parts
        self.nbytes = nbytes

    def __len__(self):
        return self.nbytes

    def tobytes(self):
        return b"".join(self.parts)

    def __bytes__(self):
        return b"".join(self.parts)

    def __repr__(self):
        return f"Parts({len(self.parts)} parts, {self.nbytes} bytes)"


cdef struct _W:
    char* buf          # the current packed run (private, malloc'ed)
    Py_ssize_t len
    Py_ssize_t cap
    Py_ssize_t flushed  # bytes already handed to `parts`
    Py_ssize_t threshold


cdef int _grow(_W* w, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = w.cap
    cdef char* nb
    if extra > 0x7FFFFFFFFFFF - w.len:
        raise MemoryError()
    while cap - w.len < extra:
        cap = cap * 2 if cap else 256
    nb = <char*>PyMem_Realloc(w.buf, cap)
    if nb == NULL:
        raise MemoryError()
    w.buf = nb
    w.cap = cap
    return 0


cdef inline int _put(_W* w, const void* p, Py_ssize_t n) except -1:
    if w.cap - w.len < n:
        _grow(w, n)
    memcpy(w.buf + w.len, p, n)
    w.len += n
    return 0


cdef inline int _tag_n(_W* w, uint8_t tag, uint64_t v, int nbytes) except -1:
    """tag + v as a big-endian integer of nbytes bytes (1, 2, 4 or 8)."""
    cdef uint8_t b[9]
    cdef int i
    b[0] = tag
    for i in range(nbytes):
        b[nbytes - i] = <uint8_t>(v >> (8 * i))
    return _put(w, b, 1 + nbytes)


cdef inline int _byte(_W* w, uint8_t v) except -1:
    return _put(w, &v, 1)


cdef int _uint(_W* w, uint64_t d) except -1:
    # msgpack_pack_real_uint64
    if d < 128:
        return _byte(w, <uint8_t>d)
    if d < 256:
        return _tag_n(w, 0xcc, d, 1)
    if d < 65536:
        return _tag_n(w, 0xcd, d, 2)
    if d < 0x100000000:
        return _tag_n(w, 0xce, d, 4)
    return _tag_n(w, 0xcf, d, 8)


cdef int _neg(_W* w, int64_t d) except -1:
    # msgpack_pack_real_int64, d < 0
    if d >= -32:
        return _byte(w, <uint8_t>(d & 0xFF))
    if d >= -128:
        return _tag_n(w, 0xd0, <uint64_t>d & 0xFF, 1)
    if d >= -32768:
        return _tag_n(w, 0xd1, <uint64_t>d & 0xFFFF, 2)
    if d >= -2147483648:
        return _tag_n(w, 0xd2, <uint64_t>d & 0xFFFFFFFF, 4)
    return _tag_n(w, 0xd3, <uint64_t>d, 8)


cdef int _int(_W* w, object o) except -1:
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(o, &overflow)
    if overflow == 0:
        if v >= 0:
            return _uint(w, <uint64_t>v)
        return _neg(w, v)
    if overflow > 0:
        try:
            return _uint(w, PyLong_AsUnsignedLongLong(o))
        except OverflowError:
            pass
    raise Unsupported("int out of range")


cdef int _container(_W* w, Py_ssize_t n, uint8_t fix, uint8_t t16, uint8_t t32) except -1:
    if <uint64_t>n > _ITEM_LIMIT:
        raise Unsupported("container too large")
    if n < 16:
        return _byte(w, fix | <uint8_t>n)
    if n < 65536:
        return _tag_n(w, t16, <uint64_t>n, 2)
    return _tag_n(w, t32, <uint64_t>n, 4)


cdef int _str(_W* w, object o) except -1:
    cdef Py_ssize_t n
    cdef const char* s
    try:
        s = PyUnicode_AsUTF8AndSize(o, &n)
    except UnicodeError:
        raise Unsupported("string not encodable") from None
    if <uint64_t>n > _ITEM_LIMIT:
        raise Unsupported("string too large")
    if n < 32:
        _byte(w, 0xa0 | <uint8_t>n)
    elif n < 256:
        _tag_n(w, 0xd9, <uint64_t>n, 1)
    elif n < 65536:
        _tag_n(w, 0xda, <uint64_t>n, 2)
    else:
        _tag_n(w, 0xdb, <uint64_t>n, 4)
    return _put(w, s, n)


cdef int _bin_header(_W* w, Py_ssize_t n) except -1:
    if <uint64_t>n > _ITEM_LIMIT:
        raise Unsupported("bytes too large")
    if n < 256:
        return _tag_n(w, 0xc4, <uint64_t>n, 1)
    if n < 65536:
        return _tag_n(w, 0xc5, <uint64_t>n, 2)
    return _tag_n(w, 0xc6, <uint64_t>n, 4)


cdef int _flush(_W* w, list parts) except -1:
    """Close the current run: it becomes a bytes part."""
    if w.len:
        parts.append(PyBytes_FromStringAndSize(w.buf, w.len))
        w.flushed += w.len
        w.len = 0
    return 0


cdef int _bytes(_W* w, object o, list parts) except -1:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(o)
    _bin_header(w, n)
    if n >= w.threshold:
        _flush(w, parts)
        parts.append(o)  # by reference: the ring push copies it straight from here
        w.flushed += n
        return 0
    return _put(w, PyBytes_AS_STRING(o), n)


cdef int _pack(_W* w, object o, list parts, int depth) except -1:
    cdef type t = type(o)
    cdef Py_ssize_t i, n, pos
    cdef PyObject* k
    cdef PyObject* v
    cdef char fb[9]
    if depth > _MAX_DEPTH:
        raise Unsupported("nested too deeply")
    if o is None:
        return _byte(w, 0xc0)
    if o is True:
        return _byte(w, 0xc3)
    if o is False:
        return _byte(w, 0xc2)
    if t is int:
        return _int(w, o)
    if t is bytes:
        return _bytes(w, o, parts)
    if t is str:
        return _str(w, o)
    if t is float:
        fb[0] = <char>0xcb
        PyFloat_Pack8(PyFloat_AS_DOUBLE(o), fb + 1, 0)
        return _put(w, fb, 9)
    if t is tuple:
        n = PyTuple_GET_SIZE(o)
        _container(w, n, 0x90, 0xdc, 0xdd)
        for i in range(n):
            _pack(w, <object>PyTuple_GET_ITEM(o, i), parts, depth + 1)
        return 0
    if t is list:
        n = PyList_GET_SIZE(o)
        _container(w, n, 0x90, 0xdc, 0xdd)
        for i in range(n):
            if i >= PyList_GET_SIZE(o):  # changed under us (only Python code could)
                raise Unsupported("list changed size")
            _pack(w, <object>PyList_GET_ITEM(o, i), parts, depth + 1)
        return 0
    if t is dict:
        n = PyDict_GET_SIZE(o)
        _container(w, n, 0x80, 0xde, 0xdf)
        pos = 0
        i = 0
        while PyDict_Next(o, &pos, &k, &v):
            # keep the pair alive while packing (packing never runs Python code on exact
            # types, but the fallback below may)
            key = <object>k
            val = <object>v
            _pack(w, key, parts, depth + 1)
            _pack(w, val, parts, depth + 1)
            i += 1
        if i != n:
            raise Unsupported("dict changed size")
        return 0
    # anything else: msgpack's own bytes for it (subclasses, bytearray, memoryview, ext...)
    try:
        packed = _msgpack_pack(o)
    except Exception:
        raise Unsupported("msgpack refused a value") from None
    return _put(w, PyBytes_AS_STRING(packed), PyBytes_GET_SIZE(packed))


def pack_parts(obj, Py_ssize_t threshold=DEFAULT_THRESHOLD):
    """msgpack.packb(obj, use_bin_type=True), as `bytes` when no `bytes` value of at least
    `threshold` bytes occurs, else as a `Parts` referencing those values. Raises
    `Unsupported` when the value must be packed by msgpack itself (see the module doc)."""
    cdef _W w
    cdef list parts = []
    w.buf = NULL
    w.len = 0
    w.cap = 0
    w.flushed = 0
    w.threshold = threshold if threshold > 0 else 1
    try:
        _grow(&w, 256)
        _pack(&w, obj, parts, 0)
        if not parts:
            return PyBytes_FromStringAndSize(w.buf, w.len)
        _flush(&w, parts)
        return Parts(parts, w.flushed)
    finally:
        PyMem_Free(w.buf)


def pack_or_parts(obj, Py_ssize_t threshold=DEFAULT_THRESHOLD):
    """pack_parts, or msgpack's own bytes (or msgpack's own exception) for a value this
    packer does not handle: always the bytes msgpack.packb would produce."""
    try:
        return pack_parts(obj, threshold)
    except Unsupported:
        return _msgpack_pack(obj)
