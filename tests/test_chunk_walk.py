"""The compiled bitshuffle-LZ4 block walk (``azfilter._chunks``, via ``bslz4_layout``, and
as a chunk is read from its file in pieces, via ``read_bslz4_chunk``) against a plain Python
walk of the same format, on valid chains and on corrupt ones (truncated at every length, size
fields off by a little or a lot, wrong headers).

The reference below is the Python loop both decoders used before the walk was compiled; it
stays here, in the tests, as the definition the compiled code must match (same blocks, same
tail offset, same verdict and message).
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time

import numpy as np
import pytest

from azfilter.frames.chunks import ChunkError, bslz4_layout, read_bslz4_chunk

#: pieces the file-reading walk is tried with: sizes that straddle headers and blocks in
#: every way, and the default
PIECES = (1, 5, 13, 64, 256 * 1024)
#: bytes before the chunk in its file (a chunk is rarely at offset 0)
FILE_OFFSET = 100


def python_walk(chunk: bytes, n_elements: int, itemsize: int) -> tuple[np.ndarray, int]:
    """(block ranges, tail offset) of a chunk, or ChunkError (the same
    messages as ``bslz4_layout``)."""
    size = len(chunk)
    if size < 12:
        raise ChunkError(f"bitshuffle-LZ4 chunk of {size} bytes is shorter than its "
                         "12-byte header")
    total, block_bytes = struct.unpack_from(">QI", chunk, 0)
    expected = n_elements * itemsize
    if total != expected:
        raise ChunkError(f"bitshuffle-LZ4 chunk header says {total} bytes, the frame "
                         f"holds {expected} ({n_elements} x {itemsize} bytes)")
    if block_bytes == 0 or block_bytes % (8 * itemsize):
        raise ChunkError(f"bitshuffle-LZ4 block size {block_bytes} bytes is not a positive "
                         f"multiple of 8 elements of {itemsize} bytes")
    block_elements = block_bytes // itemsize
    blocked = n_elements - n_elements % 8
    n_blocks = -(-blocked // block_elements)
    ranges, position = [], 12
    for block in range(n_blocks):
        if position + 4 > size:
            raise ChunkError(f"bitshuffle-LZ4 chunk truncated: its {size} bytes end inside the "
                             f"size of block {block} of {n_blocks}")
        length = struct.unpack_from(">I", chunk, position)[0]
        start, position = position + 4, position + 4 + length
        if position > size:
            raise ChunkError(f"bitshuffle-LZ4 block {block} of {n_blocks} says it ends at byte "
                             f"{position}, past the chunk's {size} bytes")
        ranges.append((start, position))
    tail = (n_elements - blocked) * itemsize
    if position + tail != size:
        raise ChunkError(f"bitshuffle-LZ4 chunk has {size} bytes, its blocks and uncompressed "
                         f"tail end at {position + tail}")
    return np.array(ranges, np.uint32).reshape(-1, 2), position


def synthetic_chunk(rng, n_elements: int, itemsize: int, block_elements: int) -> bytes:
    """A well-formed chain (the walk never looks inside a block: payloads are random)."""
    blocked = n_elements - n_elements % 8
    n_blocks = -(-blocked // block_elements)
    parts = [struct.pack(">QI", n_elements * itemsize, block_elements * itemsize)]
    for block in range(n_blocks):
        decoded = min(block_elements, blocked - block * block_elements) * itemsize
        length = int(rng.integers(1, decoded + 2))
        if rng.random() < 0.2:
            length = decoded
        parts.append(struct.pack(">I", length) + rng.bytes(length))
    parts.append(rng.bytes((n_elements - blocked) * itemsize))
    return b"".join(parts)


def outcome(walk, chunk, n_elements, itemsize):
    try:
        result = walk(chunk, n_elements, itemsize)
    except ChunkError as err:
        return "error", str(err)
    if isinstance(result, tuple):
        return "ok", result[0].tolist(), result[1]
    return "ok", result.block_ranges.tolist(), result.tail_offset


class ChunkFile:
    """A chunk written after FILE_OFFSET bytes of a temporary file, read back with
    ``read_bslz4_chunk`` in pieces: ``walk(piece)(chunk, ...)`` reads ``len(chunk)`` bytes (a
    prefix of what was written, so one file serves every truncation of it)."""

    def __init__(self, chunk: bytes):
        handle, self.path = tempfile.mkstemp(suffix=".chunk")
        os.write(handle, b"\xa5" * FILE_OFFSET + bytes(chunk))
        os.close(handle)
        self.fd = os.open(self.path, os.O_RDONLY)

    def walk(self, piece: int):
        def read(chunk, n_elements, itemsize):
            into = bytearray(len(chunk))
            layout = read_bslz4_chunk(self.fd, len(chunk), FILE_OFFSET, into, n_elements,
                                      itemsize, piece=piece)
            assert bytes(into) == bytes(chunk)
            return layout
        return read

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def assert_same(chunk, n_elements, itemsize, chunk_file: ChunkFile | None = None):
    compiled = outcome(bslz4_layout, chunk, n_elements, itemsize)
    reference = outcome(python_walk, chunk, n_elements, itemsize)
    assert compiled == reference, (len(chunk), n_elements, itemsize)
    own = chunk_file is None
    chunk_file = ChunkFile(chunk) if own else chunk_file
    try:
        for piece in PIECES:
            read = outcome(chunk_file.walk(piece), chunk, n_elements, itemsize)
            assert read == reference, (len(chunk), n_elements, itemsize, piece)
    finally:
        if own:
            chunk_file.close()
    return compiled


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
@pytest.mark.parametrize("n_elements", [0, 1, 7, 8, 64, 1000, 4096 + 5, 3 * 2048])
def test_valid_chains_agree(itemsize, n_elements):
    rng = np.random.default_rng(n_elements * 10 + itemsize)
    for block_elements in (8, 64, 2048):
        chunk = synthetic_chunk(rng, n_elements, itemsize, block_elements)
        result = assert_same(chunk, n_elements, itemsize)
        assert result[0] == "ok"
        layout = bslz4_layout(np.frombuffer(chunk, np.uint8), n_elements, itemsize)
        assert layout.tail_offset + layout.tail_elements * itemsize == len(chunk)


def test_truncated_at_every_length_agrees():
    rng = np.random.default_rng(1)
    n_elements, itemsize = 64 * 5 + 3, 4
    chunk = synthetic_chunk(rng, n_elements, itemsize, 64)
    verdicts = set()
    chunk_file = ChunkFile(chunk)
    try:
        for length in range(len(chunk) + 1):
            result = assert_same(chunk[:length], n_elements, itemsize, chunk_file)
            verdicts.add(result[0] if result[0] == "ok" else result[1].split(":")[0][:40])
            assert (result[0] == "ok") == (length == len(chunk))
    finally:
        chunk_file.close()
    assert len(verdicts) >= 4    # short header, inside a size, past the end, tail short


@pytest.mark.parametrize("piece", PIECES)
def test_file_ending_inside_the_chunk_is_one_line(tmp_path, piece):
    """The HDF5 index says the chunk is longer than what the file holds (a truncated file):
    one ChunkError naming the bytes read, whatever the piece the walk was at."""
    rng = np.random.default_rng(4)
    n_elements, itemsize = 2048 * 3 + 5, 4
    chunk = synthetic_chunk(rng, n_elements, itemsize, 2048)
    for kept in (0, 7, 12, 500, len(chunk) - 1):
        path = tmp_path / f"short{kept}.h5"
        path.write_bytes(b"\0" * FILE_OFFSET + chunk[:kept])
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(ChunkError) as caught:
                read_bslz4_chunk(fd, len(chunk), FILE_OFFSET, bytearray(len(chunk)),
                                 n_elements, itemsize, piece=piece)
        finally:
            os.close(fd)
        assert str(caught.value) == f"file ends inside a chunk ({kept} of {len(chunk)} bytes)"


def test_failed_read_raises_os_error(tmp_path):
    """A read the system refuses (here a descriptor open for writing only) is an OSError,
    which the frame readers turn into one failed frame."""
    rng = np.random.default_rng(5)
    chunk = synthetic_chunk(rng, 4096, 4, 2048)
    path = tmp_path / "chunk.bin"
    path.write_bytes(b"\0" * FILE_OFFSET + chunk)
    fd = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(OSError):
            read_bslz4_chunk(fd, len(chunk), FILE_OFFSET, bytearray(len(chunk)), 4096, 4,
                             piece=1000)
    finally:
        os.close(fd)


def test_corrupt_sizes_and_headers_agree():
    rng = np.random.default_rng(2)
    n_elements, itemsize = 2048 * 4 + 5, 2
    chunk = bytearray(synthetic_chunk(rng, n_elements, itemsize, 2048))
    positions = [12]
    for _ in range(3):
        positions.append(positions[-1] + 4 + struct.unpack_from(">I", chunk, positions[-1])[0])
    for position in positions:
        original = struct.unpack_from(">I", chunk, position)[0]
        for value in (0, 1, original - 1, original + 1, original + 4096, 2**31, 2**32 - 1):
            corrupt = bytearray(chunk)
            struct.pack_into(">I", corrupt, position, value % 2**32)
            assert assert_same(bytes(corrupt), n_elements, itemsize)[0] == "error"
    for header in (struct.pack(">QI", n_elements * itemsize + 2, 4096),
                   struct.pack(">QI", n_elements * itemsize, 0),
                   struct.pack(">QI", n_elements * itemsize, 4095),
                   struct.pack(">QI", 2**64 - 1, 2**32 - 16)):
        assert assert_same(header + bytes(chunk[12:]), n_elements, itemsize)[0] == "error"
    # random garbage after a valid header never crashes and agrees
    for _ in range(200):
        garbage = bytes(chunk[:12]) + rng.bytes(int(rng.integers(0, 64)))
        assert_same(garbage, n_elements, itemsize)


def test_compiled_walk_runs_outside_the_gil():
    """Four threads walking an Eiger-sized chain (2191 blocks) take about the time of one
    thread when the walk releases the GIL; here only checked to finish and agree (CI
    machines have few cores), and to be much faster than the Python walk."""
    rng = np.random.default_rng(3)
    n_elements = 2167 * 2070
    chunk = synthetic_chunk(rng, n_elements, 4, 2048)
    layouts = []

    def walk() -> None:
        for _ in range(20):
            layouts.append(bslz4_layout(chunk, n_elements, 4))
    threads = [threading.Thread(target=walk) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(layouts) == 80 and all(layout.n_blocks == 2191 for layout in layouts)
    start = time.perf_counter()
    for _ in range(20):
        bslz4_layout(chunk, n_elements, 4)
    compiled = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    for _ in range(5):
        python_walk(chunk, n_elements, 4)
    python = (time.perf_counter() - start) / 5
    assert compiled < python / 5, (compiled, python)
