"""Every OpenCL kernel on small cases, meant to run under Oclgrind (see tests/test_oclgrind.py).

sigma_clip and medfilt also run the outlier_stats kernel; its statistics are checked too.

Oclgrind simulates each work-item, so the cases are tiny: a 64x64 frame, 12 radial bins,
work-groups of 16, both arithmetic variants (double and compensated float32), medfilt with the
local-memory sort and with the global chunk sort and merges, and the bitshuffle-LZ4 decoder
with blocks in local and in global memory and a corrupt chunk. Results are compared with the
numpy reference so that a kernel that races visibly also fails here; races that happen not to
change the result are what Oclgrind itself reports (to its log, which the caller checks).

Not collected by the normal run (the name does not start with ``test_``): test_oclgrind.py
runs ``oclgrind ... python -m pytest tests/oclgrind/kernels_small.py``. Run directly, it
tests the same on whatever OpenCL device is found.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from azfilter.backends import opencl
from azfilter.backends.python import PythonEngine
from azfilter.errors import AzfilterError

pytestmark = pytest.mark.opencl

SIDE = 64            # frame of SIDE x SIDE pixels
BINS = 12
WORKGROUP = 16
DUMMY, DELTA_DUMMY = -2.0, 1.5


@pytest.fixture(scope="module")
def device() -> str:
    """The device: Oclgrind's under ``oclgrind`` (the only platform there), else the best."""
    if not opencl.list_devices():
        pytest.skip("no OpenCL device: " + opencl.opencl_status())
    return opencl.select_device(os.environ.get("AZFILTER_OPENCL_DEVICE"))[0]["id"]


class SmallTable:
    """CSR table of a 64x64 frame: radial bins, pixels at a bin edge split between two bins."""

    def __init__(self) -> None:
        y, x = np.indices((SIDE, SIDE))
        radius = np.hypot(y - 20.3, x - 27.9).ravel()
        position = radius / (radius.max() + 1e-3) * BINS
        low = np.floor(position).astype(np.int64)
        frac = position - low
        split = (frac > 0.8) & (low + 1 < BINS)
        pixels = np.arange(SIDE * SIDE)
        rows = np.concatenate([low, low[split] + 1])
        indices = np.concatenate([pixels, pixels[split]]).astype(np.int32)
        coefs = np.concatenate([np.where(split, 0.6, 1.0), np.full(split.sum(), 0.4)])
        order = np.lexsort((indices, rows))
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=BINS))])
        self.indices = indices[order]
        self.coefs = coefs[order].astype(np.float32)
        self.shape = (SIDE, SIDE)


def small_frame(seed: int = 5):
    """int32 frame: Poisson background, a few strong pixels, dummies; flat-ish norm; a dark."""
    rng = np.random.default_rng(seed)
    raw = rng.poisson(40, SIDE * SIDE).astype(np.int32)
    raw[rng.choice(raw.size, 30, replace=False)] = 5000       # outliers for the clipping
    raw[rng.choice(raw.size, 20, replace=False)] = -2         # dummies
    norm = rng.uniform(0.8, 1.2, raw.size).astype(np.float32)
    norm[:SIDE] = 0                                          # a masked row
    dark = rng.uniform(0, 2, raw.size).astype(np.float32)
    return raw, norm, dark


def assert_close(expected, got, what: str) -> None:
    for name in ("signal", "variance", "normalization", "normalization2", "count"):
        ref = getattr(expected, name)
        scale = float(np.abs(ref).max(initial=0.0))
        np.testing.assert_allclose(getattr(got, name), ref, rtol=1e-5, atol=1e-9 * scale,
                                   err_msg=f"{what}: {name}")


def assert_outliers_close(expected, got, what: str) -> None:
    """The outlier statistics (outlier_stats kernel): counts exactly, the rest to 1e-5."""
    a, b = got.outliers, expected.outliers
    np.testing.assert_array_equal(a.available, b.available, err_msg=f"{what}: available")
    np.testing.assert_array_equal(a.picked, b.picked, err_msg=f"{what}: picked")
    scale = float(np.abs(b.rejected_sum).max(initial=0.0))
    np.testing.assert_allclose(a.rejected_sum, b.rejected_sum, rtol=1e-5, atol=1e-9 * scale,
                               err_msg=f"{what}: rejected_sum")
    np.testing.assert_allclose(a.max_sigma, b.max_sigma, rtol=1e-5, err_msg=f"{what}: max_sigma")


@pytest.mark.parametrize("fp64", [True, False], ids=["fp64", "fp32"])
@pytest.mark.parametrize("local_sort_size", [512, 64], ids=["local_sort", "global_sort"])
def test_engine_kernels(device, fp64, local_sort_size):
    """integrate, sigma_clip and medfilt (local sort, or chunk sort + merges) agree."""
    table = SmallTable()
    raw, norm, dark = small_frame()
    ref = PythonEngine(table, norm, dark, DUMMY, DELTA_DUMMY)
    # staging=False: Oclgrind reports frames staged through mapped page-locked memory as
    # uninitialized (it does not see host writes through a mapping); staging is host code
    try:
        ocl = opencl.OpenCLEngine(table, norm, dark, DUMMY, DELTA_DUMMY, device=device,
                                  workgroup_size=WORKGROUP, local_sort_size=local_sort_size,
                                  fp64=fp64, staging=False)
    except AzfilterError as err:   # a device without cl_khr_fp64
        pytest.skip(str(err))
    long_rows = np.diff(table.indptr).max() > local_sort_size
    assert bool(ocl._long_rows.size) == long_rows
    if local_sort_size == 512:
        for model in ("poisson", "azimuthal"):
            assert_close(ref.integrate(raw, model), ocl.integrate(raw, model),
                         f"integrate {model}")
        for model in ("azimuthal", "hybrid"):
            expected = ref.sigma_clip(raw, 3.0, 3, model)
            assert np.any(expected.count < ref.integrate(raw, model).count)   # it clipped
            got = ocl.sigma_clip(raw, 3.0, 3, model)
            assert_close(expected, got, f"sigma_clip {model}")
            assert_outliers_close(expected, got, f"sigma_clip {model}")
            assert got.outliers.picked.sum() >= 20   # most of the 30 strong pixels
    for model, quantiles in (("poisson", (0.5, 0.5)), ("azimuthal", (0.2, 0.8))):
        expected = ref.medfilt(raw, *quantiles, model)
        got = ocl.medfilt(raw, *quantiles, model)
        assert_close(expected, got, f"medfilt {model} {quantiles}")
        assert_outliers_close(expected, got, f"medfilt {model} {quantiles}")


def test_bslz4_decoder(device):
    """Blocks in local memory and in global scratch, a tail, and a corrupt chunk."""
    import pyopencl as cl
    from bslz4_cases import bslz4_chunk, with_block

    from azfilter.backends.opencl.bslz4 import BitshuffleLZ4Decoder, BitshuffleLZ4Error

    info, dev = opencl.select_device(device)
    context = cl.Context([dev])
    queue = cl.CommandQueue(context)
    rng = np.random.default_rng(1)
    zeros_and_counts = np.where(rng.random(3000 + 5) < 0.7, 0, rng.poisson(3, 3005))
    cases = [
        (zeros_and_counts.astype(np.uint16), 256),                       # 12 blocks + tail
        (rng.integers(0, 2**31, 1000, dtype=np.int64).astype(np.int32), 512),   # random
        (np.repeat(rng.poisson(9, 300), 30).astype(np.uint32), 8192),     # long runs
    ]
    # work-groups of 16 with blocks over 4 KiB in global scratch; the default (64, local)
    small_groups = BitshuffleLZ4Decoder(context, queue, workgroup_size=WORKGROUP,
                                        max_local_block=4096)
    assert small_groups._local_block(8192 * 4) == 0
    for decoder in (small_groups, BitshuffleLZ4Decoder(context, queue)):
        for array, block in cases:
            chunk = bslz4_chunk(array, block)
            np.testing.assert_array_equal(
                decoder.decode_to_host(chunk, array.shape, array.dtype), array,
                err_msg=f"{array.dtype} block {block} work-group {decoder.workgroup_size}")
    decoder = small_groups
    array, block = cases[0]
    chunk = bslz4_chunk(array, block)
    n_blocks = array.size // block
    for payload in (bytes([0x10, 0x41, 0x05, 0x00]) + bytes(8),    # offset before the start
                    bytes([0x30, 1, 2, 3])):                        # too short
        with pytest.raises(BitshuffleLZ4Error):
            decoder.decode(with_block(chunk, n_blocks, 3, payload), array.shape, array.dtype)


def test_engine_decodes_chunks(device):
    """The engine's device-decode path: a bitshuffle-LZ4 chunk uploaded, decoded into the
    raw-frame buffer and reduced there (process_many), equal to the frame sent decoded; a
    corrupt chunk is that frame's error and the next frame is still right."""
    from bslz4_cases import bslz4_chunk, with_block

    from azfilter.frames.chunks import CompressedChunk, bslz4_layout

    table = SmallTable()
    raw, norm, dark = small_frame()
    try:
        ocl = opencl.OpenCLEngine(table, norm, dark, DUMMY, DELTA_DUMMY, device=device,
                                  workgroup_size=WORKGROUP, fp64=True, staging=False)
    except AzfilterError as err:   # a device without cl_khr_fp64
        pytest.skip(str(err))

    def compressed(chunk: bytes) -> CompressedChunk:
        buffer = np.frombuffer(chunk, np.uint8).copy()
        return CompressedChunk(buffer, buffer.size, bslz4_layout(buffer, raw.size, 4),
                               (SIDE, SIDE), np.dtype(np.int32))

    chunk = bslz4_chunk(raw, 1024)                      # 4 blocks of 1024 int32
    corrupt = with_block(chunk, 4, 2, bytes([0x30, 1, 2, 3]))   # block 2 decodes too short
    frames = [(0, compressed(chunk)), (1, compressed(corrupt)), (2, compressed(chunk))]
    got = dict(ocl.process_many(frames, "integrate", {"error_model": "azimuthal"}))
    expected = ocl.integrate(raw, "azimuthal")
    assert isinstance(got[1], AzfilterError) and "block 2 of 4" in str(got[1])
    for index in (0, 2):
        for name in ("signal", "variance", "normalization", "normalization2", "count"):
            np.testing.assert_array_equal(getattr(got[index], name), getattr(expected, name))
