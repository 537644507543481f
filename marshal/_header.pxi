# The record header's helpers, shared by the compiled modules that read or write records
# (`include "_header.pxi"`): little-endian loads/stores (portable; compilers turn them into
# moves), the kind check and the range check of caller-given header integers. One
# definition, so the wire format is spelled out in one place. The including module
# cimports uint8_t ... uint64_t from libc.stdint and defines RecordError and C_F_ALL.

cdef inline bint _kind_ok(unsigned int k) noexcept:
    return k == 1 or k == 2 or k == 3 or k == 4 or k == 16 or k == 17


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


cdef object _u(object value, uint64_t maximum, str name):
    """Range-check one header integer given by the caller (encode side)."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"record {name} must be an int, got {type(value).__name__}")
        value = int(value)
    if value < 0 or value > maximum:
        raise RecordError(f"record {name} {value} out of range (0..{maximum})")
    return value


cdef int _pack_fields(uint8_t* hdr, kind, flags, status, handle, call_id, method_id,
                      deadline) except -1:
    """Header bytes 0..31 from caller-given values, each range-checked (encode side);
    the section lengths (32..39) are the caller's to write."""
    cdef uint8_t kd = _u(kind, 0xFF, "kind")
    cdef uint8_t fl = _u(flags, 0xFF, "flags")
    if not _kind_ok(kd):
        raise RecordError(f"unknown record kind {kd}")
    if fl & ~C_F_ALL:
        raise RecordError(f"unknown record flags 0x{fl:02x}")
    hdr[0] = kd
    hdr[1] = fl
    _st16(hdr + 2, <uint16_t>_u(status, 0xFFFF, "status"))
    _st32(hdr + 4, <uint32_t>_u(handle, 0xFFFFFFFF, "handle"))
    _st64(hdr + 8, <uint64_t>_u(call_id, 0xFFFFFFFFFFFFFFFF, "call_id"))
    _st32(hdr + 16, <uint32_t>_u(method_id, 0xFFFFFFFF, "method_id"))
    _st32(hdr + 20, 0)
    _st64(hdr + 24, <uint64_t>_u(deadline, 0xFFFFFFFFFFFFFFFF, "deadline"))
    return 0
