"""The OpenCL bitshuffle-LZ4 decoder against the ``bitshuffle`` package and h5py + hdf5plugin.

Decoded frames must be bit-identical to ``bitshuffle.decompress_lz4`` and to h5py's reads of
Eiger-style datasets (one frame per chunk, filter 32008), for uint16/uint32/int32 (and 1- and
8-byte types), sizes that are and are not multiples of the block and of 8 elements, blocks in
local and in global memory, compressible and random data, and the real Dectris files in the
test data. Corrupt chunks raise :class:`BitshuffleLZ4Error` with one line, never hang or
crash. Runs on whatever OpenCL device is found (PoCL in CI, where it must not skip).
"""

from __future__ import annotations

import dataclasses
import os
import struct

import h5py
import hdf5plugin
import numpy as np
import pytest
from opencl_device import require_opencl

from azfilter.backends import opencl
from azfilter.errors import AzfilterError

pytestmark = pytest.mark.opencl

bitshuffle = pytest.importorskip("bitshuffle")
cl = pytest.importorskip("pyopencl")

from azfilter.backends.opencl.bslz4 import (  # noqa: E402  (after the importorskips)
    BitshuffleLZ4Decoder,
    BitshuffleLZ4Error,
    parse_chunk,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EIGER_DIR = "eiger_bslz4_format_only_synthetic"


# ----------------------------------------------------------------------------- chunks
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


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def queue():
    """An in-order queue on the test device (PoCL in CI)."""
    require_opencl()
    _, device = opencl.select_device(os.environ.get("AZFILTER_OPENCL_DEVICE"))
    context = cl.Context([device])
    return cl.CommandQueue(context)


@pytest.fixture(scope="module")
def decoder(queue):
    return BitshuffleLZ4Decoder(queue.context, queue)


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


# ----------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32])
@pytest.mark.parametrize("n", [4096, 2048 * 3, 4096 + 8, 5000 + 3, 7, 8, 1])
@pytest.mark.parametrize("kind", ["counts", "random"])
def test_matches_bitshuffle(decoder, dtype, n, kind):
    """Multiples of the block size and of 8 elements or not; a tail alone (n < 8)."""
    array = frame(kind, n, dtype, seed=n)
    chunk = bslz4_chunk(array)
    expected = reference(chunk, array.shape, array.dtype)
    np.testing.assert_array_equal(expected, array)
    got = decoder.decode_to_host(chunk, array.shape, array.dtype)
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kind", ["counts", "zeros", "random", "runs"])
@pytest.mark.parametrize("block_elements", [8, 64, 1000, 4096, 30000])
def test_block_sizes_and_memory_paths(queue, kind, block_elements):
    """Block sizes from 8 elements to 120 KB (global scratch path), in 2-D frames."""
    array = frame(kind, 257 * 131, np.uint32, seed=block_elements).reshape(257, 131)
    chunk = bslz4_chunk(array, block_elements)
    decoder = BitshuffleLZ4Decoder(queue.context, queue)
    if block_elements == 30000:
        assert decoder._local_block(block_elements * 4) == 0   # global scratch
    np.testing.assert_array_equal(decoder.decode_to_host(chunk, array.shape, array.dtype), array)
    # every block in global memory too, and a work-group smaller than a block's rows
    forced = BitshuffleLZ4Decoder(queue.context, queue, workgroup_size=16, max_local_block=0)
    np.testing.assert_array_equal(forced.decode_to_host(chunk, array.shape, array.dtype), array)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.float32, np.float64,
                                   np.int64])
def test_other_element_sizes(decoder, dtype):
    array = frame("random", 3001, dtype, seed=3)
    chunk = bslz4_chunk(array)
    np.testing.assert_array_equal(
        decoder.decode_to_host(chunk, array.shape, array.dtype).view(np.uint8),
        array.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32])
@pytest.mark.parametrize("shape", [(3, 257, 129), (2, 512, 256)])
def test_matches_h5py_hdf5plugin(tmp_path, decoder, dtype, shape):
    """Eiger-style datasets: one frame per chunk, hdf5plugin's Bitshuffle(cname='lz4')."""
    rng = np.random.default_rng(4)
    frames = rng.poisson(3.0, shape).astype(dtype)
    frames[:, 100:103, :] = np.iinfo(dtype).max            # a module gap
    frames[1] = 0                                         # an empty frame
    path = tmp_path / "eiger.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=frames, chunks=(1,) + shape[1:],
                          **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(path, "r") as h5:
        dataset = h5["data"]
        assert "32008" in dataset._filters
        for index in range(shape[0]):
            _, chunk = dataset.id.read_direct_chunk((index, 0, 0))
            got = decoder.decode_to_host(chunk, shape[1:], dataset.dtype)
            np.testing.assert_array_equal(got, dataset[index])


def test_real_eiger_files(testdata, decoder):
    """The Dectris Eiger1/Eiger2 data files (bitshuffle-LZ4, uint16) decode as h5py reads them."""
    files = sorted((testdata / EIGER_DIR).glob("*_bslz4_data_*.h5"))
    assert len(files) == 2, files
    for path in files:
        with h5py.File(path, "r") as h5:
            dataset = h5["entry/data/data"]
            assert "32008" in dataset._filters and dataset.chunks == (1,) + dataset.shape[1:]
            for index in range(dataset.shape[0]):
                _, chunk = dataset.id.read_direct_chunk((index, 0, 0))
                got = decoder.decode_to_host(chunk, dataset.shape[1:], dataset.dtype)
                np.testing.assert_array_equal(got, dataset[index], err_msg=f"{path} {index}")


def test_decode_into_a_given_buffer_and_async(queue, decoder):
    """Several decodes in flight into one reused buffer each, checked afterwards; the output
    is a plain buffer of n x itemsize bytes, in the frame's layout."""
    arrays = [frame("counts", 300 * 200, np.uint32, seed=s).reshape(300, 200) for s in range(3)]
    buffers = [cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, a.nbytes) for a in arrays]
    jobs = [decoder.decode_async(bslz4_chunk(a), a.shape, a.dtype, out=b)
            for a, b in zip(arrays, buffers, strict=True)]
    for array, job, buffer in zip(arrays, jobs, buffers, strict=True):
        assert job.check() is buffer and buffer.size == array.nbytes
        host = np.empty_like(array)
        cl.enqueue_copy(queue, host, buffer, is_blocking=True)
        np.testing.assert_array_equal(host, array)
    with pytest.raises(ValueError, match="smaller"):
        bigger = frame("counts", 301 * 200, np.uint32)
        decoder.decode(bslz4_chunk(bigger), (301, 200), np.uint32, out=buffers[0])


def test_parse_chunk_layout(decoder):
    """The blocks found on the host; a caller may pass them (found by its own code)."""
    array = frame("counts", 5000 + 3, np.uint16)
    chunk = bslz4_chunk(array)
    layout = parse_chunk(chunk, array.size, 2)
    assert layout.block_elements == 4096 and layout.n_blocks == 2
    assert layout.blocked_elements == 5000 and layout.tail_elements == 3
    assert layout.block_ranges.dtype == np.uint32 and layout.block_ranges[0, 0] == 16
    assert layout.block_ranges[1, 1] == layout.tail_offset == len(chunk) - 6
    buffer = decoder.decode(chunk, array.shape, array.dtype, layout=layout)
    host = np.empty_like(array)
    cl.enqueue_copy(decoder.queue, host, buffer, is_blocking=True)
    np.testing.assert_array_equal(host, array)
    with pytest.raises(ValueError, match="layout is for"):
        decoder.decode(chunk, (array.size - 1,), array.dtype, layout=layout)
    # a layout whose ranges lie outside the chunk is caught by the kernel
    wrong = dataclasses.replace(layout, block_ranges=layout.block_ranges + len(chunk))
    assert "outside the chunk" in _one_line_error(decoder, chunk, array.shape, array.dtype,
                                                  layout=wrong)


# ----------------------------------------------------------------------------- corruption
def _one_line_error(decoder, chunk, shape, dtype, **options) -> str:
    with pytest.raises(BitshuffleLZ4Error) as info:
        decoder.decode(chunk, shape, dtype, **options)
    message = str(info.value)
    assert "\n" not in message and "bitshuffle-LZ4" in message
    return message


def test_corrupt_headers_and_chains(decoder):
    array = frame("counts", 4096 * 2 + 100 + 5, np.uint32)   # 3 blocks and a 5-element tail
    chunk = bslz4_chunk(array, 4096)
    shape, dtype = array.shape, array.dtype
    cases = {
        "shorter than": chunk[:10],
        "truncated": chunk[:14],                                        # inside a size
        "past the chunk": chunk[:len(chunk) // 2],
        "end at": chunk[:-1],                                           # tail cut short
        "the frame holds": (array.nbytes + 4).to_bytes(8, "big") + chunk[8:],
        "not a positive multiple": chunk[:8] + (100).to_bytes(4, "big") + chunk[12:],
    }
    for expected, corrupt in cases.items():
        assert expected in _one_line_error(decoder, corrupt, shape, dtype), expected
    # a block's size field off by one: the chain no longer ends at the chunk's end
    size = struct.unpack_from(">I", chunk, 12)[0]
    for delta in (-1, 1):
        corrupt = chunk[:12] + (size + delta).to_bytes(4, "big") + chunk[16:]
        _one_line_error(decoder, corrupt, shape, dtype)
    # the frame's shape disagrees with the chunk
    assert "holds" in _one_line_error(decoder, chunk, (array.size + 8,), dtype)


def test_corrupt_lz4_blocks_raise_in_the_kernel(decoder):
    """Blocks that chain correctly but whose LZ4 content is wrong: the kernel's error flag."""
    array = frame("counts", 2048 * 3, np.uint32)
    chunk = bslz4_chunk(array, 2048)
    shape, dtype = array.shape, array.dtype
    _, payloads, _ = split_blocks(chunk, 3)
    cases = {
        "refers to data before": bytes([0x10, 0x41, 0x00, 0x00]) + b"\0" * 8,  # offset 0
        "before the start": bytes([0x10, 0x41, 0x05, 0x00]) + b"\0" * 8,     # offset 5 > 1
        "literal run runs past": bytes([0xF0, 0xFF, 0xFF]),                 # lengths run out
        "past the end of": bytes([0x50, 0x41]),                             # 5 literals, 1 byte
        "ends inside a match": bytes([0x10, 0x41, 0x01]),                    # half an offset
        "fewer bytes": bytes([0x30, 1, 2, 3]),                              # 3 of 8192 bytes
        "more bytes": bytes([0x1F, 0x41, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                             0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                             0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                             0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                             0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x10]),           # 11k-byte match
    }
    for expected, payload in cases.items():
        corrupt = with_block(chunk, 3, 1, payload)
        message = _one_line_error(decoder, corrupt, shape, dtype)
        assert expected in message and "block 1 of 3" in message, (expected, message)
    # the last block broken too: every block reports, the first error is kept
    corrupt = with_block(with_block(chunk, 3, 0, payloads[1]), 3, 2, bytes([0x30, 1, 2, 3]))
    _one_line_error(decoder, corrupt, shape, dtype)
    # the decoder is still fine afterwards
    np.testing.assert_array_equal(decoder.decode_to_host(chunk, shape, dtype), array)


def test_garbage_never_hangs_or_crashes(decoder):
    """Random bytes inside blocks: either an error, or (LZ4 has no checksum) the same frame
    as the bitshuffle package decodes from the same bytes."""
    rng = np.random.default_rng(8)
    array = frame("counts", 2048 * 4 + 3, np.uint32)
    chunk = bslz4_chunk(array, 2048)
    failures = 0
    for trial in range(40):
        corrupt = bytearray(chunk)
        start = int(rng.integers(16, len(chunk) - 24))
        corrupt[start:start + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        corrupt = bytes(corrupt)
        try:
            got = decoder.decode_to_host(corrupt, array.shape, array.dtype)
        except BitshuffleLZ4Error as err:
            assert "\n" not in str(err)
            failures += 1
            continue
        try:
            expected = reference(corrupt, array.shape, array.dtype)
        except Exception:   # the LZ4 library is stricter about a block's last sequences
            continue
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")
    assert failures > 0
    # whole blocks of garbage, sizes kept: the kernel must report, not accept
    for trial in range(10):
        payload = rng.integers(0, 256, 500, dtype=np.uint8).tobytes()
        with pytest.raises(BitshuffleLZ4Error):
            decoder.decode(with_block(chunk, 4, trial % 4, payload), array.shape, array.dtype)


def test_unsupported_dtypes(decoder):
    array = frame("counts", 64, np.uint16)
    chunk = bslz4_chunk(array)
    for dtype in (np.dtype(">u2"), np.dtype(np.complex128)):
        with pytest.raises(AzfilterError, match="native byte order"):
            decoder.decode(chunk, array.shape, dtype)
