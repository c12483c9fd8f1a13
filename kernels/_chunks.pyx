# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The block walk of a bitshuffle-LZ4 chunk (HDF5 filter 32008), compiled, outside the GIL.

A chunk is a 12-byte header, then per block a 4-byte big-endian size and that many bytes of
LZ4 data, then the uncompressed tail. Finding the blocks is a sequential walk of the chain
of sizes: in Python it costs about 0.3 us per block and holds the GIL (0.7 ms for an Eiger
4M uint32 frame of 2191 blocks), here a few microseconds without it, so that the reader
threads that find the blocks run in parallel. :func:`azfilter.frames.chunks.bslz4_layout`
calls it (for the host decoder's check and for the OpenCL decoder's block table) and turns
its status into one-line errors; :func:`azfilter.frames.chunks.read_bslz4_chunk` reads a
chunk from its file and walks it piece by piece (:func:`bslz4_read_walk`).
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from posix.types cimport off_t
from posix.unistd cimport pread

# walk statuses
cdef enum:
    OK = 0
    TRUNCATED_SIZE = 1      # the chunk ends inside the 4-byte size of block `block`
    PAST_END = 2            # block `block` ends at `position`, past the chunk's end

#: walk statuses, for Python
WALK_OK = OK
WALK_TRUNCATED_SIZE = TRUNCATED_SIZE
WALK_PAST_END = PAST_END


cdef inline uint32_t be32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) \
        | (<uint32_t>p[3])


cdef struct Walk:
    # where a walk of the chain of block sizes stands: the next block and its size's offset
    Py_ssize_t block
    uint64_t position
    int status


cdef bint walk_blocks(const uint8_t* data, uint64_t have, uint64_t size, Py_ssize_t n_blocks,
                      uint32_t* ranges, Walk* walk) noexcept nogil:
    """Walk on through the block sizes that lie in the first ``have`` of the chunk's ``size``
    bytes, writing each block's (start, end) into ``ranges``; True once the walk is over (all
    ``n_blocks`` found, or ``walk.status`` says where it failed), False when it needs more of
    the chunk."""
    cdef uint64_t length
    while walk.block < n_blocks:
        if walk.position + 4 > have:
            if have < size:
                return False
            walk.status = TRUNCATED_SIZE
            return True
        length = be32(data + walk.position)
        ranges[2 * walk.block] = <uint32_t>(walk.position + 4)
        walk.position += 4 + length
        if walk.position > size:
            walk.status = PAST_END
            return True
        ranges[2 * walk.block + 1] = <uint32_t>walk.position
        walk.block += 1
    return True


def bslz4_walk(const uint8_t[::1] chunk, Py_ssize_t n_blocks, uint32_t[:, ::1] ranges):
    """Walk the chain of block sizes of a bitshuffle-LZ4 chunk (GIL released).

    Parameters
    ----------
    chunk : uint8 buffer
        The whole chunk, header included (at most 4 GiB).
    n_blocks : int
        Blocks the header announces.
    ranges : uint32 array (>= n_blocks, 2), written
        Start and end of each block's LZ4 data in the chunk (the blocks walked so far when
        the walk fails).

    Returns
    -------
    (status, block, position) : tuple of int
        ``status`` 0 (``WALK_OK``), 1 (``WALK_TRUNCATED_SIZE``: the chunk ends inside the
        size of ``block``) or 2 (``WALK_PAST_END``: ``block`` ends at ``position``, past the
        chunk). ``position``: where the blocks end (the tail's offset) when the walk
        succeeds.
    """
    cdef uint64_t size = chunk.shape[0]
    cdef Walk walk
    cdef const uint8_t* data = &chunk[0] if size else NULL
    if ranges.shape[0] < n_blocks or (n_blocks and ranges.shape[1] != 2):
        raise ValueError("ranges must have shape (n_blocks, 2)")
    if size >= (<uint64_t>1) << 32:
        raise ValueError("chunk larger than 4 GiB")
    walk.block = 0
    walk.position = 12
    walk.status = OK
    with nogil:
        walk_blocks(data, size, size, n_blocks, &ranges[0, 0] if n_blocks else NULL, &walk)
    return walk.status, walk.block, walk.position


def bslz4_read_walk(int fd, int64_t offset, uint8_t[::1] chunk, Py_ssize_t have,
                    Py_ssize_t n_blocks, uint32_t[:, ::1] ranges, Py_ssize_t piece):
    """Read the rest of a bitshuffle-LZ4 chunk from a file and walk its chain of block sizes
    as the pieces arrive (GIL released): each size is read while its piece is still in the
    core's cache, where a walk after the whole read waits on memory for each of them (Eiger 4M,
    2191 sizes 1.4 kB apart in a 3.1 MB chunk: ~0.18 ms of a reader's CPU per frame on the
    H200 node).

    Parameters
    ----------
    fd : int
        The open file.
    offset : int
        The chunk's offset in the file.
    chunk : uint8 buffer
        The chunk's whole size; its first ``have`` bytes are already read (the header, which
        the caller checked to find ``n_blocks``).
    n_blocks : int
        Blocks the header announces.
    ranges : uint32 array (>= n_blocks, 2), written
        As :func:`bslz4_walk`'s.
    piece : int
        Bytes per read.

    Returns
    -------
    (status, block, position, read, error) : tuple of int
        ``status``, ``block``, ``position`` as :func:`bslz4_walk` returns them (valid when
        ``read`` is the chunk's size); ``read``: the bytes read in all, fewer when the file
        ends first; ``error``: the ``errno`` of a failed read, else 0.
    """
    cdef uint64_t size = chunk.shape[0]
    cdef uint64_t done = have
    cdef Walk walk
    cdef ssize_t got
    cdef size_t want
    cdef int error = 0
    cdef bint walked = False
    cdef uint8_t* data = &chunk[0] if size else NULL
    cdef uint32_t* table = &ranges[0, 0] if n_blocks else NULL
    if ranges.shape[0] < n_blocks or (n_blocks and ranges.shape[1] != 2):
        raise ValueError("ranges must have shape (n_blocks, 2)")
    if size >= (<uint64_t>1) << 32:
        raise ValueError("chunk larger than 4 GiB")
    if have < 0 or <uint64_t>have > size or piece <= 0:
        raise ValueError("have must lie within the chunk and piece be positive")
    walk.block = 0
    walk.position = 12
    walk.status = OK
    with nogil:
        walked = walk_blocks(data, done, size, n_blocks, table, &walk)
        while done < size:
            want = <size_t>(size - done) if size - done < <uint64_t>piece else <size_t>piece
            got = pread(fd, data + done, want, <off_t>(offset + <int64_t>done))
            if got < 0:
                if errno == EINTR:
                    continue
                error = errno
                break
            if got == 0:
                break
            done += <uint64_t>got
            if not walked:
                walked = walk_blocks(data, done, size, n_blocks, table, &walk)
    return walk.status, walk.block, walk.position, done, error


cdef extern from "azf_bslz4_host.h" nogil:
    int azf_bslz4_decode(const uint8_t *chunk, size_t chunk_bytes, const uint32_t *ranges,
                         size_t n_blocks, size_t block_elems, size_t blocked_elems,
                         size_t elem_size, uint8_t *out, int simd, long *failed_block)
    int azf_has_avx2()
    int azf_has_gfni()

#: decoder status when its scratch block could not be allocated (the others: azf_bslz4.cl's)
DECODE_NO_MEMORY = 7


def bslz4_uses_avx2():
    """True when :func:`bslz4_decode` bit-unshuffles with AVX2 (an x86-64 CPU that has it)."""
    return bool(azf_has_avx2())


def bslz4_uses_gfni():
    """True when :func:`bslz4_decode` bit-unshuffles with AVX2 and GFNI (the CPU has both)."""
    return bool(azf_has_gfni())


def bslz4_decode(const uint8_t[::1] chunk, const uint32_t[:, ::1] ranges,
                 Py_ssize_t block_elements, Py_ssize_t blocked_elements, Py_ssize_t itemsize,
                 uint8_t[::1] out, int simd=3):
    """Decode the LZ4 blocks of a bitshuffle-LZ4 chunk and bit-unshuffle them into ``out``
    (GIL released; ``kernels/azf_bslz4_host.h``).

    Parameters
    ----------
    chunk : uint8 buffer
        The whole chunk, header included.
    ranges : uint32 array (n_blocks, 2)
        Start and end of each block's LZ4 data (:func:`bslz4_walk`).
    block_elements, blocked_elements, itemsize : int
        Elements of a full block, elements in all blocks (a multiple of 8), bytes per element.
    out : uint8 buffer, written
        At least ``blocked_elements * itemsize`` bytes: the decoded elements (the chunk's
        uncompressed tail is the caller's).
    simd : int
        The bit-unshuffle's code: 3 the widest the CPU has (AVX2 with GFNI, else AVX2, else
        16-byte vectors), 2 AVX2 without GFNI (else 16-byte vectors), 1 16-byte vectors (SSE2,
        NEON), 0 64-bit words only (the tests compare them).

    Returns
    -------
    (status, block) : tuple of int
        ``status`` 0, or the error code of ``azf_bslz4.cl`` (1-6; 7: no memory), and the
        block that failed (-1 when none).
    """
    cdef long failed = -1
    cdef int status
    cdef size_t n_blocks = ranges.shape[0]
    if itemsize not in (1, 2, 4, 8):
        raise ValueError("itemsize must be 1, 2, 4 or 8")
    if block_elements <= 0 or block_elements % 8 or blocked_elements % 8 or blocked_elements < 0:
        raise ValueError("block and blocked elements must be multiples of 8")
    if n_blocks and ranges.shape[1] != 2:
        raise ValueError("ranges must have shape (n_blocks, 2)")
    if <size_t>n_blocks * <size_t>block_elements < <size_t>blocked_elements or \
            (n_blocks and <size_t>(n_blocks - 1) * <size_t>block_elements >= <size_t>blocked_elements):
        raise ValueError(f"{n_blocks} blocks of {block_elements} elements do not hold "
                         f"{blocked_elements}")
    if <size_t>out.shape[0] < <size_t>blocked_elements * <size_t>itemsize:
        raise ValueError("out is smaller than the blocked elements")
    if n_blocks == 0:
        return 0, -1
    with nogil:
        status = azf_bslz4_decode(&chunk[0], chunk.shape[0], &ranges[0, 0], n_blocks,
                                  block_elements, blocked_elements, itemsize, &out[0], simd,
                                  &failed)
    return status, failed
