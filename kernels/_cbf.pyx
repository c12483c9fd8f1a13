# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""CBF byte-offset decoding (``x-CBF_BYTE_OFFSET``), bounds-checked, GIL released, straight
into the caller's array.

The stream is a sequence of deltas from the previous pixel (the first from 0): one signed
byte, or the byte 0x80 followed by a little-endian int16; an int16 of -32768 (0x8000) is
followed by an int32, and an int32 of -2**31 by an int64 (the CBF specification's escapes,
as Pilatus and Eiger detectors write them). Pixel values are accumulated in 64 bits and
stored in the output's type, wrapping as a C cast does (as fabio's ``astype`` does).

:mod:`azfilter.frames.cbf` parses the MIME header in Python and calls :func:`decode_byte_offset`.
"""

from libc.string cimport memcpy
from libc.stdint cimport (
    INT32_MIN,
    int8_t,
    int16_t,
    int32_t,
    int64_t,
    uint8_t,
    uint16_t,
    uint32_t,
    uint64_t,
)

ctypedef fused pixel_t:
    int8_t
    int16_t
    int32_t
    int64_t
    uint8_t
    uint16_t
    uint32_t
    uint64_t


cdef inline int64_t _le16(const uint8_t* p) noexcept nogil:
    return <int16_t>(<uint16_t>p[0] | (<uint16_t>p[1] << 8))


cdef inline int64_t _le32(const uint8_t* p) noexcept nogil:
    return <int32_t>(<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
                     | (<uint32_t>p[3] << 24))


cdef inline int64_t _le64(const uint8_t* p) noexcept nogil:
    cdef uint64_t value = 0
    cdef int k
    for k in range(7, -1, -1):
        value = (value << 8) | p[k]
    return <int64_t>value


cdef Py_ssize_t _decode(const uint8_t* src, Py_ssize_t n, pixel_t* out, Py_ssize_t count,
                        Py_ssize_t* used) noexcept nogil:
    """Decode up to ``count`` pixels from ``src[:n]``; returns the pixels written. Stops early
    (fewer than ``count``) when the stream ends, also in the middle of an escape: never reads
    past ``src + n``. ``used[0]``: bytes consumed."""
    cdef Py_ssize_t i = 0, j = 0, k, run
    cdef uint64_t value = 0          # unsigned: wrapping is defined behaviour
    cdef int64_t delta
    cdef const uint8_t* p
    cdef pixel_t* o
    cdef uint64_t word
    while j < count and i < n:
        # A run of one-byte deltas (nearly every pixel of a Pilatus frame): a tight loop
        # with one test per byte.
        run = n - i if n - i < count - j else count - j
        p = src + i
        o = out + j
        k = 0
        # eight bytes at a time while none of them is 0x80 (an escape)
        while k + 8 <= run:
            memcpy(&word, p + k, 8)
            word ^= 0x8080808080808080ULL              # 0x80 bytes become 0x00
            if ((word - 0x0101010101010101ULL) & ~word & 0x8080808080808080ULL) != 0:
                break                                  # a zero byte: an escape in these 8
            value += <uint64_t><int64_t><int8_t>p[k]
            o[k] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 1]
            o[k + 1] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 2]
            o[k + 2] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 3]
            o[k + 3] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 4]
            o[k + 4] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 5]
            o[k + 5] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 6]
            o[k + 6] = <pixel_t>value
            value += <uint64_t><int64_t><int8_t>p[k + 7]
            o[k + 7] = <pixel_t>value
            k += 8
        while k < run and p[k] != 0x80:
            value += <uint64_t><int64_t><int8_t>p[k]
            o[k] = <pixel_t>value
            k += 1
        i += k
        j += k
        if k == run:
            break
        # an escape: 0x80, then int16; 0x8000 -> int32; 0x80000000 -> int64
        if i + 3 > n:
            break
        delta = _le16(src + i + 1)
        if delta != -32768:
            i += 3
        else:
            if i + 7 > n:
                break
            delta = _le32(src + i + 3)
            if delta != INT32_MIN:
                i += 7
            else:
                if i + 15 > n:
                    break
                delta = _le64(src + i + 7)
                i += 15
        value += <uint64_t>delta
        out[j] = <pixel_t>value
        j += 1
    used[0] = i
    return j


def decode_byte_offset(const uint8_t[::1] stream, pixel_t[::1] out):
    """Decode a CBF byte-offset stream into ``out`` (one pixel per element).

    Parameters
    ----------
    stream : bytes-like
        The binary section's data (``X-Binary-Size`` bytes after the 4 start bytes).
    out : 1-D C-contiguous numpy array of int8/16/32/64 or uint8/16/32/64
        Receives the pixels (e.g. ``frame.reshape(-1)`` of the caller's buffer).

    Returns
    -------
    int
        Bytes of ``stream`` used; bytes after the last pixel are ignored.

    Raises
    ------
    ValueError
        When the stream ends before ``out`` is full (a truncated or corrupt file).
    """
    cdef Py_ssize_t n = stream.shape[0], count = out.shape[0], used = 0, written = 0
    cdef const uint8_t* src = &stream[0] if n > 0 else NULL
    cdef pixel_t* dst = &out[0] if count > 0 else NULL
    if count == 0:
        return 0
    if n == 0:
        raise ValueError(f"byte-offset data end after 0 of {count} pixels")
    with nogil:
        written = _decode(src, n, dst, count, &used)
    if written < count:
        raise ValueError(f"byte-offset data end after {written} of {count} pixels")
    return used
