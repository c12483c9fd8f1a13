"""Direct chunk reads: the raw bytes of an HDF5 chunk holding one frame, decoded outside h5py.

h5py reads and decodes every chunk behind one global lock, so a multi-threaded reader gains
nothing from it.  For datasets chunked one frame per chunk (Eiger, NeXus and what most
detectors write), :func:`direct_layout` finds where each chunk lies in its file
(one walk of the dataset's chunk index, :func:`chunk_table`, or ``get_chunk_info`` per frame,
under h5py's lock), the bytes are read with plain ``os.pread``
(no lock, from any thread) and :func:`decode_chunk` decodes them outside the GIL:
bitshuffle-LZ4 with azfilter's own decoder (``azfilter._chunks.bslz4_decode``,
``kernels/azf_bslz4_host.h``), LZ4 and deflate with imagecodecs.  Filters covered:
bitshuffle-LZ4 (32008), LZ4 (32004), deflate (1), byte shuffle (2, alone or before deflate)
and none; anything else, a chunk whose filters were skipped, an unallocated chunk or a layout
that is not one frame per chunk is read through h5py instead (the caller falls back;
:func:`direct_layout` returns None).

The chunk formats, as the HDF5 filters write them:

- bitshuffle-LZ4: 8-byte big-endian total size, 4-byte big-endian block size in bytes, then
  per block a 4-byte big-endian compressed size and an LZ4 block of the bit-shuffled elements.
- LZ4 (HDF5 filter 32004): the same framing; a block whose stored size equals its decoded
  size is stored uncompressed.
- deflate: a zlib stream; shuffle: byte ``k`` of element ``i`` is at ``k * n + i``.
"""

from __future__ import annotations

import collections
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

#: HDF5 filter codes decoded here.
FILTER_DEFLATE = 1
FILTER_SHUFFLE = 2
FILTER_LZ4 = 32004
FILTER_BITSHUFFLE = 32008
_BITSHUFFLE_LZ4 = 2                 # bitshuffle's cd_values[4]: 2 = LZ4 compression
_HEADER = struct.Struct(">QI")      # total decoded bytes, block size in bytes

# The pipelines decoded directly, as tuples of filter codes in the order HDF5 applies them
# when writing (decoding runs them backwards).
_SUPPORTED = {(), (FILTER_BITSHUFFLE,), (FILTER_LZ4,), (FILTER_DEFLATE,),
              (FILTER_SHUFFLE,), (FILTER_SHUFFLE, FILTER_DEFLATE)}


class ChunkError(ValueError):
    """A chunk's bytes do not decode to one frame (corrupt or truncated chunk)."""


@dataclass(frozen=True)
class DirectLayout:
    """How to read the frames of one dataset chunk by chunk, without h5py.

    Attributes
    ----------
    filename : str
        The file that holds the chunks (for an Eiger master, the linked data file).
    base : int
        Added to the chunk addresses HDF5 reports (the file's user block size).
    filters : tuple of int
        The filter codes, in the order they were applied when writing.
    shape : tuple of int
        One frame's shape (rows, cols).
    dtype : numpy.dtype
        The frame dtype (native byte order).
    leading : tuple of int
        The stack's leading dimensions (empty for a single 2-D frame).
    pread : bool
        True when the chunks can be read from ``filename`` with ``os.pread``; else their
        bytes come from h5py's ``read_direct_chunk`` (under its lock; decoded outside it).
    """

    filename: str
    base: int
    filters: tuple[int, ...]
    shape: tuple[int, int]
    dtype: np.dtype
    leading: tuple[int, ...]
    pread: bool = True

    @property
    def nbytes(self) -> int:
        """Decoded bytes of one frame."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _filters_of(dataset) -> tuple[tuple[int, ...], list[tuple[int, ...]]] | None:
    plist = dataset.id.get_create_plist()
    codes, values = [], []
    for i in range(plist.get_nfilters()):
        code, _flags, cd_values, _name = plist.get_filter(i)
        codes.append(int(code))
        values.append(tuple(int(v) for v in cd_values))
    return tuple(codes), values


def direct_layout(dataset) -> DirectLayout | None:
    """The :class:`DirectLayout` of an h5py dataset, or None when h5py must read it.

    Direct reads need: a chunked dataset (not virtual, not external raw storage) with one
    frame per chunk, a numeric dtype in native byte order, and a filter pipeline this module
    decodes (see the module docstring).
    """
    try:
        import h5py

        if dataset.ndim < 2 or dataset.chunks is None or dataset.is_virtual:
            return None
        if dataset.external:
            return None
        shape = tuple(int(n) for n in dataset.shape[-2:])
        if tuple(dataset.chunks[-2:]) != shape or any(c != 1 for c in dataset.chunks[:-2]):
            return None
        dtype = dataset.dtype
        if dtype.kind not in "iuf" or not dtype.isnative or dtype.itemsize not in (1, 2, 4, 8):
            return None
        found = _filters_of(dataset)
        if found is None:
            return None
        codes, values = found
        if codes not in _SUPPORTED:
            return None
        if FILTER_BITSHUFFLE in codes:
            cd = values[codes.index(FILTER_BITSHUFFLE)]
            if len(cd) < 5 or cd[4] != _BITSHUFFLE_LZ4:
                return None             # bitshuffle alone or with zstd: h5py reads it
        if dataset.id.get_offset() is not None:
            return None                 # contiguous storage (not chunked after all)
        if not isinstance(dataset.id, h5py.h5d.DatasetID):
            return None
        base = int(dataset.file.id.get_create_plist().get_userblock())
        filename = dataset.file.filename
        # chunk addresses are offsets in the file only with HDF5's default (sec2) driver;
        # get_chunk_info needs HDF5 >= 1.10.5
        pread = (os.path.isfile(filename) and dataset.file.driver == "sec2"
                 and hasattr(dataset.id, "get_chunk_info_by_coord"))
        return DirectLayout(filename, base, codes, shape, np.dtype(dtype),
                            tuple(int(n) for n in dataset.shape[:-2]), pread)
    except Exception:                   # any doubt: h5py reads it
        return None


def chunk_coordinates(layout: DirectLayout, local: int) -> tuple[int, ...]:
    """The chunk coordinates (dataset indices of its first element) of frame ``local``."""
    leading = tuple(int(i) for i in np.unravel_index(local, layout.leading)) \
        if layout.leading else ()
    return leading + (0, 0)


def chunk_location(dataset, layout: DirectLayout, local: int) -> tuple[int, int] | None:
    """(file offset, size) of the chunk holding frame ``local`` of ``dataset``, or None when
    the chunk is not stored (fill value) or a filter was skipped for it (h5py reads it)."""
    return _stored_at(layout, dataset.id.get_chunk_info_by_coord(chunk_coordinates(layout,
                                                                                    local)))


def _stored_at(layout: DirectLayout, info: Any) -> tuple[int, int] | None:
    """(file offset, size) of a chunk h5py describes (``StoreInfo``), or None (see
    :func:`chunk_location`)."""
    if info.byte_offset is None or info.filter_mask != 0 or info.size <= 0:
        return None
    return layout.base + int(info.byte_offset), int(info.size)


#: the planner walks a dataset's chunk index (:func:`chunk_table`) for at least this many
#: frames, or for at least 1 / WALK_SHARE of its chunks
WALK_FRAMES = 64
WALK_SHARE = 8
#: chunk tables kept per process (:func:`cached_chunk_table`)
KEPT_TABLES = 4
_tables: collections.OrderedDict = collections.OrderedDict()
_tables_lock = threading.Lock()


def _frames_in(layout: DirectLayout) -> int:
    """Frames of a dataset of this layout (one per chunk)."""
    return int(np.prod(layout.leading, dtype=np.int64)) if layout.leading else 1


class ChunkTable:
    """Where the chunks of one dataset are, by frame, as one walk of its chunk index found
    them (:func:`chunk_table`): two int64 arrays, 16 bytes per frame (a dict of tuples took
    ~170 bytes; a million-frame stack is 16 MB).

    ``local in table``: the walk saw the frame's chunk. ``table[local]``: its
    :func:`chunk_location` ((file offset, size), or None for a chunk whose filter was
    skipped). A frame the walk did not see (never written, or written since) is not in it.
    """

    #: offset of a frame the walk did not see, and of a chunk h5py must read
    NOT_SEEN = -1
    THROUGH_H5PY = -2

    def __init__(self, frames: int):
        self.offsets = np.full(frames, self.NOT_SEEN, dtype=np.int64)
        self.sizes = np.zeros(frames, dtype=np.int64)

    def record(self, local: int, location: tuple[int, int] | None) -> None:
        """The walk found frame ``local`` (frames beyond the table's length are left out:
        the dataset grew during the walk)."""
        if 0 <= local < self.offsets.size:
            if location is None:
                self.offsets[local] = self.THROUGH_H5PY
            else:
                self.offsets[local], self.sizes[local] = location

    def get(self, local: int, default: Any = None) -> Any:
        """Frame ``local``'s location (``table[local]``), or ``default`` when the walk did
        not see it (one read of the arrays: the planner asks once per frame)."""
        if not 0 <= local < self.offsets.size:
            return default
        offset = int(self.offsets[local])
        if offset == self.NOT_SEEN:
            return default
        return None if offset == self.THROUGH_H5PY else (offset, int(self.sizes[local]))

    def __contains__(self, local: int) -> bool:
        return self.get(local, self) is not self

    def __getitem__(self, local: int) -> tuple[int, int] | None:
        location = self.get(local, self)
        if location is self:
            raise KeyError(local)
        return location

    def __len__(self) -> int:
        return int(np.count_nonzero(self.offsets != self.NOT_SEEN))

    def seen(self) -> list[int]:
        """The frames the walk saw, in order."""
        return [int(local) for local in np.flatnonzero(self.offsets != self.NOT_SEEN)]


def chunk_table(dataset, layout: DirectLayout) -> ChunkTable | None:
    """:func:`chunk_location` of every chunk of ``dataset`` stored when it is called, from
    one walk of its chunk index (h5py's ``chunk_iter``); None where h5py or HDF5 cannot walk
    it (``chunk_iter`` needs HDF5 >= 1.14 and h5py >= 3.8).

    A lookup per frame costs more the more chunks the dataset has (HDF5 2.0: 18 / 55 /
    248 µs per frame with 1000 / 4000 / 16000 chunks, so a whole stack costs quadratic
    time), the walk 2-2.7 µs per chunk.
    """
    walk = getattr(dataset.id, "chunk_iter", None)
    if walk is None:
        return None
    # frame index of a chunk from its leading coordinates (C order, one frame per chunk)
    strides = [int(np.prod(layout.leading[k + 1:], dtype=np.int64))
               for k in range(len(layout.leading))]
    table = ChunkTable(_frames_in(layout))

    def visit(info: Any) -> None:
        coordinates = info.chunk_offset[:len(strides)]
        table.record(sum(c * s for c, s in zip(coordinates, strides, strict=True)),
                     _stored_at(layout, info))

    try:
        walk(visit)
    except Exception:                   # noqa: BLE001 - any doubt: one lookup per frame
        return None
    return table


def cached_chunk_table(dataset, layout: DirectLayout, wanted: int) -> ChunkTable | None:
    """The :func:`chunk_table` of ``dataset``, walked when ``wanted`` frames make it
    worthwhile (:data:`WALK_FRAMES`, :data:`WALK_SHARE`) and kept for the next reads of the
    same file in this process (a worker reads a stack block by block); None: look the
    frames up one by one.

    The table is kept while the file's size and modification time stay the same. A frame
    missing from it may have been written since the walk (a file still being written):
    callers look such frames up.
    """
    try:
        status = os.stat(layout.filename)
    except OSError:
        return None
    key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, dataset.name)
    with _tables_lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    if wanted < WALK_FRAMES and wanted * WALK_SHARE < _frames_in(layout):
        return None
    table = chunk_table(dataset, layout)
    if table is not None:
        with _tables_lock:
            _tables[key] = table
            while len(_tables) > KEPT_TABLES:
                _tables.popitem(last=False)
    return table


def read_exactly(fd: int, size: int, offset: int, into: Any = None,
                 chunk_bytes: int | None = None) -> Any:
    """``size`` bytes at ``offset`` of an open file (``os.pread``, no lock), into ``into``
    (a writable buffer of ``size`` bytes) when given. ``chunk_bytes``: the whole chunk's size
    when these bytes are its first ones (for the message).

    Raises
    ------
    ChunkError
        When the file ends before ``size`` bytes (a truncated file).
    """
    if into is None:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ChunkError(f"file ends inside a chunk ({len(data)} of {size} bytes)")
        return data
    view = memoryview(into).cast("B")
    done = 0
    while done < size:
        got = os.preadv(fd, [view[done:size]], offset + done)
        if got <= 0:
            raise ChunkError(f"file ends inside a chunk ({done} of {chunk_bytes or size} "
                             f"bytes)")
        done += got
    return into


def _codecs():
    """imagecodecs, imported where a filter needs it (~0.15 s: not for bitshuffle-LZ4 or
    uncompressed chunks)."""
    import imagecodecs

    return imagecodecs


#: bitshuffle blocks hold a multiple of this many elements; the rest is stored as is
BLOCK_MULTIPLE = 8
#: bytes of a bitshuffle-LZ4 chunk's header: decoded size (uint64 BE), block size (uint32 BE)
HEADER_BYTES = 12


@dataclass(frozen=True)
class ChunkLayout:
    """Where the blocks of one bitshuffle-LZ4 chunk are (:func:`bslz4_layout`).

    Attributes
    ----------
    n_elements : int
        Elements of the decoded chunk.
    block_elements : int
        Elements of a full block.
    blocked_elements : int
        Elements held by the LZ4 blocks (``n_elements`` rounded down to a multiple of 8).
    block_ranges : numpy.ndarray
        ``uint32`` (n_blocks, 2): start and end of each block's LZ4 data in the chunk.
    tail_offset : int
        Offset of the last ``n_elements % 8`` elements, stored uncompressed.
    """

    n_elements: int
    block_elements: int
    blocked_elements: int
    block_ranges: np.ndarray
    tail_offset: int

    @property
    def n_blocks(self) -> int:
        """Number of LZ4 blocks."""
        return len(self.block_ranges)

    @property
    def tail_elements(self) -> int:
        """Elements stored uncompressed after the blocks."""
        return self.n_elements - self.blocked_elements


def bslz4_layout(chunk: Any, n_elements: int, itemsize: int) -> ChunkLayout:
    """Check a bitshuffle-LZ4 chunk's header and find its blocks (the chain of sizes).

    The walk is compiled (``azfilter._chunks.bslz4_walk``) and releases the GIL: a few
    microseconds for an Eiger 4M frame, where a Python loop took 0.7 ms holding the GIL.

    Parameters
    ----------
    chunk : bytes-like or numpy.ndarray
        The compressed chunk as HDF5 stores it, header included.
    n_elements : int
        Elements the decoded chunk must hold.
    itemsize : int
        Bytes per element.

    Returns
    -------
    ChunkLayout

    Raises
    ------
    ChunkError
        One line: the header disagrees with the frame's size, the block size is not a
        positive multiple of 8 elements, or the block sizes do not chain exactly to the
        chunk's end (truncated chunk, a wrong size field).
    """
    from .._chunks import bslz4_walk

    data = _byte_array(chunk)
    plan = _BlockPlan(data, data.size, n_elements, itemsize)
    ranges = plan.ranges()
    status, block, position = bslz4_walk(data, plan.n_blocks, ranges)
    return plan.layout(status, block, position, ranges)


#: bytes a read of :func:`read_bslz4_chunk` takes at a time: small enough that the piece just
#: read is still in the core's L2 cache when its block sizes are walked
READ_PIECE_BYTES = 256 * 1024


def read_bslz4_chunk(fd: int, size: int, offset: int, into: Any, n_elements: int,
                     itemsize: int, piece: int = READ_PIECE_BYTES) -> ChunkLayout:
    """Read a bitshuffle-LZ4 chunk of ``size`` bytes at ``offset`` of an open file into
    ``into`` (a writable buffer of at least ``size`` bytes) and find its blocks: what
    :func:`read_exactly` then :func:`bslz4_layout` do, with the chain of block sizes walked as
    the pieces of ``piece`` bytes arrive (``azfilter._chunks.bslz4_read_walk``, outside the
    GIL).

    Raises
    ------
    ChunkError
        As :func:`bslz4_layout`, and when the file ends inside the chunk.
    OSError
        When a read fails.
    """
    from .._chunks import bslz4_read_walk

    data = _byte_array(into)[:size]
    if data.size < size:
        raise ValueError(f"a buffer of {data.size} bytes cannot hold a chunk of {size}")
    first = min(size, max(piece, HEADER_BYTES))   # the header, for the checks below
    read_exactly(fd, first, offset, data[:first], chunk_bytes=size)
    plan = _BlockPlan(data, size, n_elements, itemsize)
    ranges = plan.ranges()
    status, block, position, done, error = bslz4_read_walk(fd, offset, data, first,
                                                           plan.n_blocks, ranges, piece)
    if error:
        raise OSError(error, os.strerror(error))
    if done != size:
        raise ChunkError(f"file ends inside a chunk ({done} of {size} bytes)")
    return plan.layout(status, block, position, ranges)


class _BlockPlan:
    """What a bitshuffle-LZ4 chunk's header announces, checked against the frame: the block
    size, the elements in blocks and the number of blocks (one place for the header's checks
    and the walk's verdicts of :func:`bslz4_layout` and :func:`read_bslz4_chunk`)."""

    def __init__(self, data: np.ndarray, size: int, n_elements: int, itemsize: int):
        if size < HEADER_BYTES:
            raise ChunkError(f"bitshuffle-LZ4 chunk of {size} bytes is shorter than its "
                             f"{HEADER_BYTES}-byte header")
        total, block_bytes = _HEADER.unpack_from(data, 0)
        expected = n_elements * itemsize
        if total != expected:
            raise ChunkError(f"bitshuffle-LZ4 chunk header says {total} bytes, the frame "
                             f"holds {expected} ({n_elements} x {itemsize} bytes)")
        if block_bytes == 0 or block_bytes % (BLOCK_MULTIPLE * itemsize):
            raise ChunkError(f"bitshuffle-LZ4 block size {block_bytes} bytes is not a "
                             f"positive multiple of {BLOCK_MULTIPLE} elements of {itemsize} "
                             f"bytes")
        if size >= 2**32:
            raise ChunkError(f"bitshuffle-LZ4 chunk of {size} bytes is too large (4 GiB at "
                             f"most)")
        self.size = size
        self.n_elements = n_elements
        self.itemsize = itemsize
        self.block_elements = block_bytes // itemsize
        self.blocked = n_elements - n_elements % BLOCK_MULTIPLE
        self.n_blocks = -(-self.blocked // self.block_elements)

    def ranges(self) -> np.ndarray:
        """The block table to fill: a corrupt header cannot make it large (its total was
        checked against the frame's size)."""
        return np.empty((self.n_blocks, 2), dtype=np.uint32)

    def layout(self, status: int, block: int, position: int,
               ranges: np.ndarray) -> ChunkLayout:
        """The chunk's layout once its walk ended with ``status`` at ``block``, ``position``
        (``azfilter._chunks``' walk statuses); ChunkError when the chain is wrong."""
        from .._chunks import WALK_TRUNCATED_SIZE

        size, n_blocks = self.size, self.n_blocks
        if status == WALK_TRUNCATED_SIZE:
            raise ChunkError(f"bitshuffle-LZ4 chunk truncated: its {size} bytes end inside "
                             f"the size of block {block} of {n_blocks}")
        if status:
            raise ChunkError(f"bitshuffle-LZ4 block {block} of {n_blocks} says it ends at "
                             f"byte {position}, past the chunk's {size} bytes")
        tail_bytes = (self.n_elements - self.blocked) * self.itemsize
        if position + tail_bytes != size:
            raise ChunkError(f"bitshuffle-LZ4 chunk has {size} bytes, its blocks and "
                             f"uncompressed tail end at {position + tail_bytes}")
        return ChunkLayout(self.n_elements, self.block_elements, self.blocked, ranges,
                           position)


def _byte_array(chunk: Any) -> np.ndarray:
    """The chunk as a flat uint8 array (no copy for bytes, memoryviews, contiguous arrays)."""
    if isinstance(chunk, np.ndarray):
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return np.frombuffer(chunk, np.uint8)
    raise TypeError(f"chunk must be bytes or a numpy array, not {type(chunk).__name__}")


@dataclass
class CompressedChunk:
    """One frame still compressed (bitshuffle-LZ4), handed to an engine that decodes it.

    A reader gives it in place of the decoded frame when the OpenCL engine decodes on the
    device (``--decode device``): the raw chunk bytes, read with ``os.pread`` into a buffer
    of the reader's ring (page-locked memory), and its block table, found by the reader's
    thread (:func:`bslz4_layout`, outside the GIL). It looks like the frame it holds
    (``shape``, ``dtype``, ``ndim``, ``size``); only an engine that decodes chunks
    (``OpenCLEngine.decodes_chunks``) takes it.

    Attributes
    ----------
    buffer : numpy.ndarray
        The uint8 buffer the chunk was read into (the ring's; give it back when done).
    nbytes_chunk : int
        Bytes of the chunk at the start of ``buffer``.
    layout : ChunkLayout
        Its blocks.
    shape : tuple of int
        The decoded frame's shape.
    dtype : numpy.dtype
        The decoded frame's dtype (native byte order).
    """

    buffer: np.ndarray
    nbytes_chunk: int
    layout: ChunkLayout
    shape: tuple[int, int]
    dtype: np.dtype

    @property
    def data(self) -> np.ndarray:
        """The chunk's bytes (a view of :attr:`buffer`)."""
        return self.buffer[:self.nbytes_chunk]

    @property
    def ndim(self) -> int:
        """Dimensions of the decoded frame."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Elements of the decoded frame."""
        return int(np.prod(self.shape, dtype=np.int64))


class NeedsH5py(Exception):
    """This chunk cannot be decoded here (not a decoding error): read it through h5py."""


_scratch = threading.local()


def _scratch_bytes(nbytes: int) -> np.ndarray:
    """A per-thread byte array of ``nbytes`` for intermediate results (reused: fresh memory
    costs page faults that take as long as the decoding)."""
    array = getattr(_scratch, "array", None)
    if array is None or array.size < nbytes:
        array = _scratch.array = np.empty(nbytes, np.uint8)
    return array[:nbytes]


def chunk_scratch(nbytes: int) -> memoryview:
    """A per-thread writable buffer of ``nbytes`` to read one raw chunk into (reused)."""
    buffer = getattr(_scratch, "chunk", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _scratch.chunk = bytearray(nbytes)
    return memoryview(buffer)[:nbytes]


def _check_length(data, expected: int, what: str) -> None:
    if len(data) != expected:
        raise ChunkError(f"{what} data decodes to {len(data)} bytes, expected {expected}")


def _unshuffle(data: Any, out: np.ndarray) -> None:
    """Undo HDF5's byte shuffle of ``data`` into ``out``."""
    itemsize = out.dtype.itemsize
    planes = np.frombuffer(data, np.uint8).reshape(itemsize, -1)
    np.copyto(out.reshape(-1).view(np.uint8).reshape(-1, itemsize), planes.T)


#: error codes of the bitshuffle-LZ4 decoders (``kernels/azf_bslz4.cl`` on a device,
#: ``kernels/azf_bslz4_host.h`` on the host) -> what is wrong
BSLZ4_ERRORS = {
    1: "a literal run runs past the end of the LZ4 block",
    2: "the LZ4 block decodes to more bytes than the block holds",
    3: "an LZ4 match refers to data before the start of the block (bad offset)",
    4: "the LZ4 block ends inside a match",
    5: "the LZ4 block decodes to fewer bytes than the block holds",
    6: "the block lies outside the chunk",
    7: "no memory for the decoder's block",
}


def bslz4_error_message(code: int, block: int, n_blocks: int) -> str:
    """One line for a decoder's error ``code`` at ``block`` (-1: the uncompressed tail)."""
    reason = BSLZ4_ERRORS.get(code, f"decoder error code {code}")
    where = "its uncompressed tail" if block < 0 else f"block {block} of {n_blocks}"
    return f"corrupt bitshuffle-LZ4 chunk, {where}: {reason}"


#: The host decoder's bit-unshuffle codes (``simd`` of :func:`decode_chunk`): the widest the
#: CPU runs (AVX2 with GFNI, else AVX2, else 16-byte vectors: SSE2, NEON), AVX2 without GFNI,
#: 16-byte vectors, 64-bit words only.
SIMD_WIDEST, SIMD_AVX2, SIMD_VECTORS, SIMD_WORDS = 3, 2, 1, 0


def _decode_bitshuffle_lz4(raw: Any, layout: DirectLayout, out: np.ndarray,
                           simd: int, blocks: ChunkLayout | None) -> None:
    from .._chunks import bslz4_decode

    itemsize = layout.dtype.itemsize
    data = _byte_array(raw)
    flat = out.reshape(-1)
    if blocks is None:
        # header, block size and the chain of blocks checked (compiled walk, outside the GIL)
        blocks = bslz4_layout(data, flat.size, itemsize)
    # The last n % 8 elements (Eiger 4M: 2167 x 2070 pixels, 2 of them) follow the blocks
    # as they are, neither shuffled nor compressed.
    shuffled_count = blocks.blocked_elements
    tail_elements = flat.size - shuffled_count
    if tail_elements:
        flat[shuffled_count:] = np.frombuffer(data, layout.dtype, count=tail_elements,
                                              offset=data.size - tail_elements * itemsize)
    # each block: LZ4 into a cache-resident scratch block, then bit-unshuffled into the frame
    status, block = bslz4_decode(data, blocks.block_ranges, blocks.block_elements,
                                 shuffled_count, itemsize, flat.view(np.uint8), simd)
    if status:
        raise ChunkError(bslz4_error_message(status, block, blocks.n_blocks))


def decode_chunk(raw: Any, layout: DirectLayout, out: np.ndarray, *,
                 simd: int = SIMD_WIDEST, blocks: ChunkLayout | None = None) -> np.ndarray:
    """Decode one frame's chunk bytes ``raw`` into ``out`` (C-contiguous, ``layout.shape``,
    ``layout.dtype``); the codecs run outside the GIL.  ``simd``: the bitshuffle-LZ4
    bit-unshuffle's code (:data:`SIMD_WIDEST`; the tests and benchmarks compare the others);
    ``blocks``: a bitshuffle-LZ4 chunk's layout when the caller found it already
    (:func:`read_bslz4_chunk`).

    Raises
    ------
    ChunkError
        When the bytes do not decode to exactly one frame.
    NeedsH5py
        When this chunk must be read through h5py.
    """
    nbytes = layout.nbytes
    filters = layout.filters
    try:
        if filters == ():
            _check_length(raw, nbytes, "uncompressed")
            np.copyto(out.reshape(-1).view(np.uint8), np.frombuffer(raw, np.uint8))
        elif filters == (FILTER_BITSHUFFLE,):
            _decode_bitshuffle_lz4(raw, layout, out, simd, blocks)
        elif filters == (FILTER_LZ4,):
            decoded = _codecs().lz4h5_decode(raw, out=out.reshape(-1).view(np.uint8))
            _check_length(decoded, nbytes, "LZ4")
        elif filters == (FILTER_DEFLATE,):
            # libdeflate (zlib stream), straight into the frame
            decoded = _codecs().deflate_decode(raw, out=out.reshape(-1).view(np.uint8))
            _check_length(decoded, nbytes, "deflate")
        elif filters == (FILTER_SHUFFLE,):
            _check_length(raw, nbytes, "shuffled")
            _unshuffle(raw, out)
        elif filters == (FILTER_SHUFFLE, FILTER_DEFLATE):
            shuffled = _codecs().deflate_decode(raw, out=_scratch_bytes(nbytes))
            _check_length(shuffled, nbytes, "shuffle+deflate")
            _unshuffle(shuffled, out)
        else:                           # direct_layout only accepts the pipelines above
            raise NeedsH5py
    except (ChunkError, NeedsH5py):
        raise
    except Exception as exc:            # the codecs' own errors: a corrupt chunk
        raise ChunkError(f"{_pipeline_name(filters)} chunk does not decode "
                         f"({type(exc).__name__}: {exc})") from None
    return out


def _pipeline_name(filters: tuple[int, ...]) -> str:
    names = {FILTER_DEFLATE: "deflate", FILTER_SHUFFLE: "shuffle", FILTER_LZ4: "LZ4",
             FILTER_BITSHUFFLE: "bitshuffle-LZ4"}
    return "+".join(names[f] for f in filters) or "uncompressed"
