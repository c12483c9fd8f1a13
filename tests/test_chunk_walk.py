"""The compiled bitshuffle-LZ4 block walk (``azfilter._chunks``, via ``bslz4_layout``) against
a plain Python walk of the same format, on valid chains and on corrupt ones (truncated at
every length, size fields off by a little or a lot, wrong headers).

The reference below is the Python loop both decoders used before the walk was compiled; it
stays here, in the tests, as the definition the compiled code must match (same blocks, same
tail offset, same verdict and message).
"""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from azfilter.frames.chunks import ChunkError, bslz4_layout


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


def assert_same(chunk, n_elements, itemsize):
    compiled = outcome(bslz4_layout, chunk, n_elements, itemsize)
    reference = outcome(python_walk, chunk, n_elements, itemsize)
    assert compiled == reference, (len(chunk), n_elements, itemsize)
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
    for length in range(len(chunk) + 1):
        result = assert_same(chunk[:length], n_elements, itemsize)
        verdicts.add(result[0] if result[0] == "ok" else result[1].split(":")[0][:40])
        assert (result[0] == "ok") == (length == len(chunk))
    assert len(verdicts) >= 4    # short header, inside a size, past the end, tail short


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
