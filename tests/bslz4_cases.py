"""Test chunks shared by the bitshuffle-LZ4 decoders' tests (host and OpenCL, and the Oclgrind
runs): HDF5 filter-32008 chunks made with the ``bitshuffle`` package (its authors' encoder),
ways to break them, and the package's own decoder as the reference."""

from __future__ import annotations

import struct

import numpy as np
import pytest

bitshuffle = pytest.importorskip("bitshuffle")


def bslz4_chunk(array: np.ndarray, block_elements: int = 0) -> bytes:
    """The HDF5 filter-32008 chunk of ``array``: 12-byte header, then ``bitshuffle``'s blocks.

    ``block_elements`` 0 is bitshuffle's default (8 KiB blocks, as Eiger writes).
    """
    if block_elements == 0:
        block_elements = max(8, 8192 // array.itemsize // 8 * 8)
    blocks = bitshuffle.compress_lz4(np.ascontiguousarray(array).ravel(), block_elements)
    return (array.nbytes.to_bytes(8, "big") + (block_elements * array.itemsize).to_bytes(4, "big")
            + blocks.tobytes())


def split_blocks(chunk: bytes, n_blocks: int) -> tuple[bytes, list[bytes], bytes]:
    """(header, the LZ4 payload of each block, the uncompressed tail)."""
    position, payloads = 12, []
    for _ in range(n_blocks):
        size = struct.unpack_from(">I", chunk, position)[0]
        payloads.append(chunk[position + 4:position + 4 + size])
        position += 4 + size
    return chunk[:12], payloads, chunk[position:]


def with_block(chunk: bytes, n_blocks: int, index: int, payload: bytes) -> bytes:
    """``chunk`` with block ``index`` replaced by ``payload`` (the chain of sizes kept valid)."""
    header, payloads, tail = split_blocks(chunk, n_blocks)
    payloads[index] = payload
    return header + b"".join(len(p).to_bytes(4, "big") + p for p in payloads) + tail


def reference(chunk: bytes, shape, dtype) -> np.ndarray:
    """``bitshuffle.decompress_lz4`` of a chunk (it takes the blocks without the header)."""
    block_bytes = int.from_bytes(chunk[8:12], "big")
    dtype = np.dtype(dtype)
    return bitshuffle.decompress_lz4(np.frombuffer(chunk[12:], np.uint8), tuple(shape), dtype,
                                     block_bytes // dtype.itemsize)


def frame(kind: str, n: int, dtype, seed: int = 0) -> np.ndarray:
    """Test data: ``counts`` (Eiger-like: mostly small counts, a few dummies), ``zeros``,
    ``random`` (incompressible), ``runs`` (long repeats: overlapping LZ4 matches)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if kind == "counts":
        values = rng.poisson(rng.choice([0.05, 2.0, 40.0], n)).astype(dtype)
        values[rng.random(n) < 0.001] = info.max if info else -1
        return values
    if kind == "zeros":
        return np.zeros(n, dtype)
    if kind == "random":
        return rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    if kind == "runs":
        return np.repeat(rng.integers(0, 1000, n // 50 + 1), 50)[:n].astype(dtype)
    raise ValueError(kind)


def lz4_block_of_decoded_size(shuffled: bytes) -> bytes:
    """An LZ4 block of exactly ``len(shuffled)`` bytes (8192) that decodes to ``shuffled``,
    whose bytes 8150..8186 must repeat byte 8149: literals, one match of a repeated byte and
    five final literals. Such a block is still LZ4 data in a bitshuffle-LZ4 chunk (HDF5's
    plain LZ4 filter would store it as is)."""
    assert len(shuffled) == 8192 and len(set(shuffled[8149:8187])) == 1
    literals, match, final = 8150, 37, 5
    literal_extra = literals - 15             # 31 x 255 + 230
    block = (bytes([0xFF]) + bytes([255]) * (literal_extra // 255)
             + bytes([literal_extra % 255]) + shuffled[:literals]
             + struct.pack("<H", 1) + bytes([match - 4 - 15])
             + bytes([final << 4]) + shuffled[literals + match:])
    assert len(block) == len(shuffled)
    return block
