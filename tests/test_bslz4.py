"""The bitshuffle-LZ4 decoders (HDF5 filter 32008) against the ``bitshuffle`` package and h5py
+ hdf5plugin, through one set of cases: the host decoder (``kernels/azf_bslz4_host.h``, with
its AVX2 bit-unshuffles, with and without GFNI, its 16-byte vectors and its portable 64-bit-word
code) and the OpenCL decoder
(``kernels/azf_bslz4.cl``; PoCL in CI, where it must not skip).

Decoded frames must be bit-identical to ``bitshuffle.decompress_lz4`` and to h5py's reads of
Eiger-style datasets (one frame per chunk), for uint16/uint32/int32 (and 1- and 8-byte types),
sizes that are and are not multiples of the block and of 8 elements, compressible and random
data, and the real Dectris files in the test data. Corrupt chunks raise one line, never hang or
crash. The OpenCL decoder's own paths (memory, buffers, layouts) are in
``test_bslz4_opencl.py``.
"""

from __future__ import annotations

import os
import platform
import struct
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
from bslz4_cases import bslz4_chunk, frame, reference, split_blocks, with_block
from hypothesis import given, settings
from hypothesis import strategies as st

from azfilter.frames import chunks

EIGER_DIR = "eiger_bslz4_format_only_synthetic"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class HostDecoder:
    """The host decoder behind the OpenCL decoder's test interface."""

    error = chunks.ChunkError

    def __init__(self, simd: int):
        self.simd = simd

    def decode_to_host(self, chunk, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        out = np.empty(shape, dtype)
        layout = chunks.DirectLayout(filename="", base=0, filters=(chunks.FILTER_BITSHUFFLE,),
                                     shape=out.shape, dtype=dtype, leading=(), pread=False)
        return chunks.decode_chunk(chunk, layout, out, simd=self.simd)


class OpenCLDecoder:
    """The OpenCL decoder on the test device."""

    def __init__(self):
        from opencl_device import require_opencl

        require_opencl()
        import pyopencl as cl

        from azfilter.backends import opencl
        from azfilter.backends.opencl.bslz4 import BitshuffleLZ4Decoder, BitshuffleLZ4Error

        _, device = opencl.select_device(os.environ.get("AZFILTER_OPENCL_DEVICE"))
        context = cl.Context([device])
        self.decoder = BitshuffleLZ4Decoder(context, cl.CommandQueue(context))
        self.error = BitshuffleLZ4Error

    def decode_to_host(self, chunk, shape, dtype) -> np.ndarray:
        return self.decoder.decode_to_host(chunk, shape, dtype)


#: the host decoder's bit-unshuffles (decode_chunk's simd)
HOST_CODES = {"host": chunks.SIMD_WIDEST, "host-avx2": chunks.SIMD_AVX2,
              "host-vectors": chunks.SIMD_VECTORS, "host-words": chunks.SIMD_WORDS}


@pytest.fixture(scope="module", params=[*HOST_CODES,
                                        pytest.param("opencl", marks=pytest.mark.opencl)])
def decoder(request):
    if request.param == "opencl":
        return OpenCLDecoder()
    return HostDecoder(HOST_CODES[request.param])


def one_line_error(decoder, chunk, shape, dtype) -> str:
    with pytest.raises(decoder.error) as info:
        decoder.decode_to_host(chunk, shape, dtype)
    message = str(info.value)
    assert "\n" not in message and "bitshuffle-LZ4" in message
    return message


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



# ----------------------------------------------------------------------------- corruption
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
        assert expected in one_line_error(decoder, corrupt, shape, dtype), expected
    # a block's size field off by one: the chain no longer ends at the chunk's end
    size = struct.unpack_from(">I", chunk, 12)[0]
    for delta in (-1, 1):
        corrupt = chunk[:12] + (size + delta).to_bytes(4, "big") + chunk[16:]
        one_line_error(decoder, corrupt, shape, dtype)
    # the frame's shape disagrees with the chunk
    assert "holds" in one_line_error(decoder, chunk, (array.size + 8,), dtype)


def test_corrupt_lz4_blocks(decoder):
    """Blocks that chain correctly but whose LZ4 content is wrong (the OpenCL kernel's error
    flag, the host decoder's status)."""
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
        message = one_line_error(decoder, corrupt, shape, dtype)
        assert expected in message and "block 1 of 3" in message, (expected, message)
    # the last block broken too: every block reports, the first error is kept
    corrupt = with_block(with_block(chunk, 3, 0, payloads[1]), 3, 2, bytes([0x30, 1, 2, 3]))
    one_line_error(decoder, corrupt, shape, dtype)
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
        except decoder.error as err:
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
        with pytest.raises(decoder.error):
            decoder.decode_to_host(with_block(chunk, 4, trial % 4, payload), array.shape,
                                   array.dtype)




# ----------------------------------------------------------------------------- host decoder
HOSTS = [HostDecoder(code) for code in HOST_CODES.values()]


@settings(max_examples=150, deadline=None)
@given(itemsize=st.sampled_from([1, 2, 4, 8]), block_columns=st.integers(1, 80),
       n=st.integers(1, 9000), kind=st.sampled_from(["counts", "zeros", "random", "runs"]),
       seed=st.integers(0, 2**16))
def test_host_paths_agree_on_any_block(itemsize, block_columns, n, kind, seed):
    """Blocks of 8 to 640 elements (column counts below, at and above the vector steps of 16
    and 32, and not multiples of them), every element size: every bit-unshuffle (AVX2 or
    16-byte vectors with 64-bit words for the rest, 16-byte vectors, 64-bit words) gives the
    frame back."""
    dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    array = frame(kind, n, dtype, seed=seed)
    chunk = bslz4_chunk(array, 8 * block_columns)
    for host in HOSTS:
        np.testing.assert_array_equal(host.decode_to_host(chunk, array.shape, dtype), array,
                                      err_msg=f"code {host.simd}")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_host_decoder_on_damaged_chunks(data):
    """Bytes changed, removed or inserted anywhere (the chain of sizes kept or not): one-line
    ChunkError or a frame, never a crash; every bit-unshuffle gives the same frame."""
    array = frame("counts", 2048 * 3 + 5, np.uint32, seed=data.draw(st.integers(0, 50)))
    chunk = bytearray(bslz4_chunk(array, 2048))
    edit = data.draw(st.sampled_from(["change", "remove", "insert", "block"]))
    position = data.draw(st.integers(0, len(chunk) - 1))
    size = data.draw(st.integers(1, 64))
    garbage = data.draw(st.binary(min_size=size, max_size=size))
    if edit == "change":
        chunk[position:position + size] = garbage[:len(chunk[position:position + size])]
    elif edit == "remove":
        del chunk[position:position + size]
    elif edit == "insert":
        chunk[position:position] = garbage
    else:                              # a block's payload replaced, its size field made right
        chunk = bytearray(with_block(bytes(chunk), 3, position % 3, garbage))
    results = []
    for decoder in HOSTS:
        try:
            results.append(decoder.decode_to_host(bytes(chunk), array.shape, array.dtype))
        except chunks.ChunkError as err:
            assert "\n" not in str(err)
            results.append(str(err))
    for other in results[1:]:
        if isinstance(results[0], str):
            assert other == results[0]
        else:
            np.testing.assert_array_equal(other, results[0])


def test_host_decoder_reads_only_its_chunk():
    """A chunk at the very end of a buffer (the next page unmapped would crash a read past
    it): every length of a short last literal run and match decodes, and truncations fail."""
    mmap = pytest.importorskip("mmap")
    array = frame("counts", 256 + 3, np.uint16, seed=2)
    chunk = bslz4_chunk(array, 256)
    page = mmap.PAGESIZE
    for cut in (len(chunk), len(chunk) - 1, 20):
        data = chunk[:cut]
        pages = -(-len(data) // page) + 1
        with mmap.mmap(-1, pages * page) as region:
            end = (pages - 1) * page
            region[end - len(data):end] = data
            # the last page made inaccessible: reading past the chunk faults
            import ctypes

            libc = ctypes.CDLL(None)
            base = ctypes.addressof(ctypes.c_char.from_buffer(region))
            assert libc.mprotect(ctypes.c_void_p(base + end), page, 0) == 0
            view = memoryview(region)[end - len(data):end]
            try:
                if cut == len(chunk):
                    np.testing.assert_array_equal(
                        HOSTS[0].decode_to_host(view, array.shape, array.dtype), array)
                else:
                    with pytest.raises(chunks.ChunkError):
                        HOSTS[0].decode_to_host(view, array.shape, array.dtype)
            finally:
                view.release()
                libc.mprotect(ctypes.c_void_p(base + end), page, 3)


def test_host_decoder_uses_avx2_and_gfni_where_the_cpu_has_them():
    """The run-time choice: AVX2 on an x86-64 CPU that lists it (CI's), with GFNI when it lists
    that too, else the 16-byte vectors."""
    from azfilter._chunks import bslz4_uses_avx2, bslz4_uses_gfni

    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    avx2 = platform.machine() in ("x86_64", "AMD64") and "avx2" in flags
    assert bslz4_uses_avx2() == avx2
    assert bslz4_uses_gfni() == (avx2 and "gfni" in flags)


def test_host_decoder_under_address_sanitizer(tmp_path):
    """tests/c/bslz4_host_fuzz.c, built with the C compiler's AddressSanitizer and
    UndefinedBehaviorSanitizer: 3000 damaged Eiger-like chunks decoded by every bit-unshuffle
    without a read or write out of bounds, and the three bit-unshuffles agreeing on random
    blocks of every element size."""
    import shutil
    import subprocess

    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the sanitizer harness")
    tests = Path(__file__).resolve().parent
    program = tmp_path / "bslz4_host_fuzz"
    build = subprocess.run([compiler, "-O1", "-g", "-fsanitize=address,undefined",
                            "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                            "-I", str(tests.parent / "kernels"),
                            str(tests / "c" / "bslz4_host_fuzz.c"), "-o", str(program)],
                           capture_output=True, text=True)
    if build.returncode and "sanitize" in build.stderr and not IN_CI:
        pytest.skip(f"the compiler cannot build with sanitizers: {build.stderr[-200:]}")
    assert build.returncode == 0, build.stderr
    array = frame("counts", 2048 * 40, np.uint32, seed=11)
    chunk = tmp_path / "chunk.bin"
    chunk.write_bytes(bslz4_chunk(array, 2048))
    done = subprocess.run([str(program), str(chunk), "3000", "5"], capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    statuses = [int(n) for n in done.stdout.split("\n")[0].split()[1:]]
    assert sum(statuses) > 3000 and statuses[0] > 0 and sum(statuses[1:6]) > 0, done.stdout
    assert "unshuffle mismatches 0" in done.stdout
