"""The OpenCL bitshuffle-LZ4 decoder's own paths: blocks in local and in global memory, work-
groups smaller than a block's rows, decoding into given buffers and in flight, block tables
found by the caller, dtypes it refuses. The agreement and corruption cases that every decoder
must pass (host and OpenCL) are in ``test_bslz4.py``. Runs on whatever OpenCL device is found
(PoCL in CI, where it must not skip).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from bslz4_cases import bslz4_chunk, frame
from opencl_device import require_opencl

from azfilter.backends import opencl
from azfilter.errors import AzfilterError

pytestmark = pytest.mark.opencl

cl = pytest.importorskip("pyopencl")

from azfilter.backends.opencl.bslz4 import (  # noqa: E402  (after the importorskips)
    BitshuffleLZ4Decoder,
    BitshuffleLZ4Error,
    parse_chunk,
)


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



# ----------------------------------------------------------------------------- own paths
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
    with pytest.raises(BitshuffleLZ4Error, match="outside the chunk"):
        decoder.decode(chunk, array.shape, array.dtype, layout=wrong)



def test_unsupported_dtypes(decoder):
    array = frame("counts", 64, np.uint16)
    chunk = bslz4_chunk(array)
    for dtype in (np.dtype(">u2"), np.dtype(np.complex128)):
        with pytest.raises(AzfilterError, match="native byte order"):
            decoder.decode(chunk, array.shape, dtype)
