# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The block walk of a bitshuffle-LZ4 chunk (HDF5 filter 32008), compiled, outside the GIL.

A chunk is a 12-byte header, then per block a 4-byte big-endian size and that many bytes of
LZ4 data, then the uncompressed tail. Finding the blocks is a sequential walk of the chain
of sizes: in Python it costs about 0.3 us per block and holds the GIL (0.7 ms for an Eiger
4M uint32 frame of 2191 blocks), here a few microseconds without it, so that the reader
threads that find the blocks run in parallel. :func:`azfilter.frames.chunks.bslz4_layout`
calls it (for the host decoder's check and for the OpenCL decoder's block table) and turns
its status into one-line errors.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t

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


def bslz4_walk(const uint8_t[::1] chunk, Py_ssize_t n_blocks, uint32_t block_bytes,
               uint32_t last_block_bytes, uint32_t[:, ::1] ranges):
    """Walk the chain of block sizes of a bitshuffle-LZ4 chunk (GIL released).

    Parameters
    ----------
    chunk : uint8 buffer
        The whole chunk, header included (at most 4 GiB).
    n_blocks : int
        Blocks the header announces.
    block_bytes, last_block_bytes : int
        Decoded bytes of a full block and of the last block (used to count the blocks whose
        stored size equals their decoded size).
    ranges : uint32 array (>= n_blocks, 2), written
        Start and end of each block's LZ4 data in the chunk (the blocks walked so far when
        the walk fails).

    Returns
    -------
    (status, block, position, verbatim) : tuple of int
        ``status`` 0 (``WALK_OK``), 1 (``WALK_TRUNCATED_SIZE``: the chunk ends inside the
        size of ``block``) or 2 (``WALK_PAST_END``: ``block`` ends at ``position``, past the
        chunk). ``position``: where the blocks end (the tail's offset) when the walk
        succeeds. ``verbatim``: blocks whose stored size equals their decoded size.
    """
    cdef uint64_t size = chunk.shape[0]
    cdef uint64_t position = 12
    cdef uint64_t length, decoded
    cdef Py_ssize_t block = 0, verbatim = 0
    cdef int status = OK
    cdef const uint8_t* data = &chunk[0] if size else NULL
    if ranges.shape[0] < n_blocks or ranges.shape[1] != 2:
        raise ValueError("ranges must have shape (n_blocks, 2)")
    if size >= (<uint64_t>1) << 32:
        raise ValueError("chunk larger than 4 GiB")
    with nogil:
        while block < n_blocks:
            if position + 4 > size:
                status = TRUNCATED_SIZE
                break
            length = be32(data + position)
            decoded = last_block_bytes if block == n_blocks - 1 else block_bytes
            if length == decoded:
                verbatim += 1
            ranges[block, 0] = <uint32_t>(position + 4)
            position += 4 + length
            if position > size:
                status = PAST_END
                break
            ranges[block, 1] = <uint32_t>position
            block += 1
    return status, block, position, verbatim
