"""Bitshuffle-LZ4 chunks decoded on the OpenCL device (``--decode device``) inside the engine.

The reader hands the engine the raw chunk (``os.pread`` into the ring's page-locked buffers,
block table found by the compiled walk); the engine uploads it, decodes it into its raw-frame
buffer and reduces it there. Results must be bit-identical to the host decoder's through the
command (integrate, sigma-clip, medfilt; uint16/uint32/int32; a stack mixing bslz4, gzip
and CBF inputs), a corrupt chunk must be one failed frame in both modes, and memory must stay
bounded. Runs on PoCL in CI (``--decode device`` forces the path on a CPU device).
"""

from __future__ import annotations

import os

import fabio.cbfimage
import h5py
import hdf5plugin
import numpy as np
import pytest
from click.testing import CliRunner
from opencl_device import opencl_test_device

from azfilter import cli
from azfilter.backends import opencl
from azfilter.errors import AzfilterError
from azfilter.frames.chunks import CompressedChunk, bslz4_layout
from azfilter.integrator import Integrator
from azfilter.output import read_result
from azfilter.pipeline import run as pipeline_run

pytestmark = pytest.mark.opencl

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# 97 x 121 = 11737 pixels: 5 blocks of 2048 uint32 (4096 uint16) elements and a 1-element
# tail stored uncompressed
SHAPE = (97, 121)
PONI = ("poni_version: 2.1\nDetector: Detector\nDetector_config: {\"pixel1\": 0.0001, "
        "\"pixel2\": 0.0001, \"max_shape\": [97, 121], \"orientation\": 3}\n"
        "Distance: 0.05\nPoni1: 0.0048\nPoni2: 0.006\nRot1: 0.01\nRot2: -0.02\nRot3: 0.0\n"
        "Wavelength: 1e-10\n")
OPERATIONS = {
    "integrate": ["--npt", "50"],
    "sigma-clip": ["--npt", "50", "--thres", "3"],
    "medfilt": ["--npt", "50", "--percentile", "20", "80"],
}


@pytest.fixture(scope="module")
def device() -> str:
    """The ``--device`` of the OpenCL device the tests run on (PoCL in CI)."""
    return opencl_test_device()


def ring_frames(n: int, dtype, seed: int = 0) -> np.ndarray:
    """Counts on a ring, a few hot pixels and (signed types) dummies."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(SHAPE)
    rings = 30 + 200 * np.exp(-0.5 * ((np.hypot(rows - 48, cols - 60) - 25) / 2.5) ** 2)
    frames = rng.poisson(rings, (n, *SHAPE)).astype(dtype)
    for frame in frames:
        frame.flat[rng.integers(0, frame.size, 8)] = min(np.iinfo(dtype).max, 60_000)
        if np.dtype(dtype).kind == "i":
            frame.flat[rng.integers(0, frame.size, 8)] = -1
    return frames


def write_bslz4(path, frames: np.ndarray) -> None:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, chunks=(1, *SHAPE),
                          **hdf5plugin.Bitshuffle(cname="lz4"))


def chunk_place(path, index: int) -> tuple[int, int]:
    """(file offset, size) of frame ``index``'s chunk."""
    with h5py.File(path, "r") as h5:
        info = h5["entry/data/data"].id.get_chunk_info_by_coord((index, 0, 0))
        return int(info.byte_offset), int(info.size)


def corrupt_chunks(path, dtype) -> dict[int, str]:
    """Damage two chunks in place: frame 2's block chain (found by the reader's walk) and
    frame 4's LZ4 data (found by the decoders). Returns {frame: what is wrong}."""
    itemsize = np.dtype(dtype).itemsize
    with open(path, "r+b") as f:
        offset, size = chunk_place(path, 2)
        f.seek(offset)
        chunk = f.read(size)
        blocks = bslz4_layout(chunk, SHAPE[0] * SHAPE[1], itemsize)
        f.seek(offset + int(blocks.block_ranges[1, 0]) - 4)
        f.write((0x7FFF0000).to_bytes(4, "big"))          # block 1 says it ends far away
        offset, size = chunk_place(path, 4)
        f.seek(offset)
        blocks = bslz4_layout(f.read(size), SHAPE[0] * SHAPE[1], itemsize)
        start, end = (int(v) for v in blocks.block_ranges[0])
        f.seek(offset + start)
        f.write(bytes([0xF0]) + b"\xff" * (end - start - 1))   # a literal run past the block
    return {2: "past the chunk", 4: "corrupt"}


def run_command(tmp_path, operation: str, inputs: list, out, *options) -> CliRunner:
    args = [operation, "-p", tmp_path / "geo.poni", *OPERATIONS[operation], *options,
            *inputs, "-o", out, "--quiet"]
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def spy(monkeypatch):
    """What reaches the engines: per frame, (is a CompressedChunk, its buffer page-locked);
    and every page-locked allocation."""
    seen: list[tuple[bool, bool]] = []
    allocated: list[tuple] = []
    process_many = Integrator.process_many
    pinned_array = opencl.hostmem.pinned_array

    def watched_process_many(integrator, frames, operation, **params):
        def watched():
            for tag, data in frames:
                compressed = isinstance(data, CompressedChunk)
                seen.append((compressed, compressed and opencl.is_pinned(data.buffer)))
                yield tag, data
        return process_many(integrator, watched(), operation, **params)

    def counting_pinned(shape, dtype, device=None):
        allocated.append((tuple(shape), np.dtype(dtype)))
        return pinned_array(shape, dtype, device=device)

    monkeypatch.setattr(Integrator, "process_many", watched_process_many)
    monkeypatch.setattr(opencl.hostmem, "pinned_array", counting_pinned)
    return seen, allocated


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32])
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_device_decode_equals_host_decode_through_the_command(tmp_path, device, spy,
                                                              operation, dtype):
    """bslz4 stack (two corrupt chunks) + gzip stack + CBF in one job: ``--decode device``
    and ``--decode host`` give the same bits and fail the same two frames."""
    seen, _ = spy
    (tmp_path / "geo.poni").write_text(PONI)
    frames = ring_frames(9, dtype, seed=len(operation))
    write_bslz4(tmp_path / "bslz4.h5", frames[:6])
    damaged = corrupt_chunks(tmp_path / "bslz4.h5", dtype)
    with h5py.File(tmp_path / "gzip.h5", "w") as h5:
        h5.create_dataset("entry/data/data", data=frames[6:8], chunks=(1, *SHAPE),
                          compression="gzip")
    fabio.cbfimage.CbfImage(data=frames[8].astype(np.int32)).write(str(tmp_path / "f.cbf"))
    inputs = [tmp_path / "bslz4.h5", tmp_path / "gzip.h5", tmp_path / "f.cbf"]
    results = {}
    for mode in ("device", "host"):
        seen.clear()
        out = tmp_path / f"{mode}.h5"
        result = run_command(tmp_path, operation, inputs, out, "--backend", "opencl",
                             "--device", device, "--decode", mode)
        assert result.exit_code == 3, result.output          # 3: some frames failed
        results[mode] = read_result(out)
        # the readable bslz4 frames reach the engine compressed, in page-locked memory
        compressed = [flag for flag, _ in seen]
        if mode == "device":
            assert compressed == [True] * 5 + [False] * 3, seen   # frame 2 failed reading
            assert all(pinned for flag, pinned in seen if flag)
        else:
            assert not any(compressed) and len(seen) == 7
    device_result, host_result = results["device"], results["host"]
    for result in (device_result, host_result):
        failed = {index: reason for source, index, reason in result.failed}
        assert sorted(failed) == sorted(damaged), result.failed
        assert damaged[2] in failed[2]
        assert all("\n" not in reason for reason in failed.values())
    assert device_result.frame_indices == host_result.frame_indices
    assert device_result.sources == host_result.sources and len(device_result.sources) == 7
    np.testing.assert_array_equal(device_result.intensity, host_result.intensity)
    np.testing.assert_array_equal(device_result.sigma, host_result.sigma)
    assert np.isfinite(device_result.intensity).any()


def test_long_stack_keeps_memory_bounded(tmp_path, device, spy):
    """60 compressed frames: the page-locked chunk buffers are a fixed ring, reused."""
    seen, allocated = spy
    (tmp_path / "geo.poni").write_text(PONI)
    write_bslz4(tmp_path / "long.h5", ring_frames(60, np.uint32, seed=3))
    result = run_command(tmp_path, "integrate", [tmp_path / "long.h5"], tmp_path / "o.h5",
                         "--backend", "opencl", "--device", device, "--decode", "device")
    assert result.exit_code == 0, result.output
    assert len(seen) == 60 and all(flag and pinned for flag, pinned in seen)
    chunk_buffers = [shape for shape, dtype in allocated if dtype == np.uint8]
    assert 1 <= len(chunk_buffers) <= 2 * pipeline_run.usable_cores() + 2 \
        + pipeline_run.READ_AHEAD + 4
    # and no decoded-frame buffer is taken for a chunk that goes to the device compressed
    # (one was, per frame, and never given back: 47 ms of page locking per frame on a GPU)
    assert allocated == [shape_dtype for shape_dtype in allocated if shape_dtype[1] == np.uint8]


@pytest.mark.parametrize("slots", [2, 4])
def test_engine_stream_mixes_chunks_and_frames(device, slots, monkeypatch):
    """``process_many`` on compressed chunks and plain frames in one stream equals plain
    frames bit for bit, with 2 or 4 frames in flight; a chunk whose LZ4 data is wrong is
    that frame's exception."""
    import bitshuffle

    from azfilter.backends.opencl import engine as engine_module

    monkeypatch.setattr(engine_module, "CPU_SLOTS", slots)
    monkeypatch.setattr(engine_module, "GPU_SLOTS", slots)

    frames = ring_frames(5, np.int32, seed=7)
    from azfilter.poni import parse_poni

    integrator = Integrator(parse_poni(PONI), npt=40, backend="opencl", device=device)
    engine = integrator.engine("no", np.int32)
    assert engine.slots == slots

    def compressed(frame: np.ndarray) -> CompressedChunk:
        body = bitshuffle.compress_lz4(frame.ravel(), 2048).tobytes()
        chunk = frame.nbytes.to_bytes(8, "big") + (2048 * 4).to_bytes(4, "big") + body
        buffer = np.frombuffer(chunk, np.uint8).copy()
        return CompressedChunk(buffer, buffer.size, bslz4_layout(buffer, frame.size, 4),
                               SHAPE, np.dtype(np.int32))

    bad = compressed(frames[2])
    start, end = (int(v) for v in bad.layout.block_ranges[1])
    bad.buffer[start:end] = 0xFF
    bad.buffer[start] = 0xF0
    stream = [(0, compressed(frames[0])), (1, frames[1]), (2, bad),
              (3, compressed(frames[3])), (4, frames[4])]
    params = {"thres": 3.0, "max_iter": 5, "error_model": "azimuthal"}
    got = dict(engine.process_many(stream, "sigma_clip", params))
    assert isinstance(got[2], AzfilterError) and "block 1 of" in str(got[2])
    for index in (0, 1, 3, 4):
        expected = engine.sigma_clip(frames[index], **params)
        for name in ("signal", "variance", "normalization", "normalization2", "count"):
            np.testing.assert_array_equal(getattr(got[index], name), getattr(expected, name))
    # blocks in global scratch memory (one scratch per kernel queue: the engine's frame
    # slots decode on queues of their own)
    from azfilter.backends.opencl.bslz4 import BitshuffleLZ4Decoder

    engine._bslz4 = BitshuffleLZ4Decoder(engine.context, engine.queue, max_local_block=0)
    stream = [(index, compressed(frames[index])) for index in (0, 1, 3, 4)]
    for index, sums in engine.process_many(stream, "sigma_clip", params):
        expected = engine.sigma_clip(frames[index], **params)
        np.testing.assert_array_equal(sums.signal, expected.signal)
        np.testing.assert_array_equal(sums.count, expected.count)
    assert len(engine._bslz4._scratch) >= 1
    # a chunk of another size is refused like a frame of another size
    other = compressed(np.zeros((8, 8), np.int32))
    other_result = dict(engine.process_many([(0, other)], "integrate",
                                            {"error_model": "poisson"}))
    assert isinstance(other_result[0], AzfilterError) and "pixels" in str(other_result[0])


def test_decode_option_and_config_key(tmp_path, device, monkeypatch):
    """``--decode device`` needs the opencl backend (one line, exit 2); the config key is
    checked; ``auto`` decodes on the device for GPUs only."""
    (tmp_path / "geo.poni").write_text(PONI)
    write_bslz4(tmp_path / "s.h5", ring_frames(2, np.uint16))
    result = run_command(tmp_path, "integrate", [tmp_path / "s.h5"], tmp_path / "o.h5",
                         "--backend", "cython", "--decode", "device")
    assert result.exit_code == 2 and "--decode device needs --backend opencl" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "job.json").write_text('{"decode": "gpu"}')
    result = run_command(tmp_path, "integrate", [tmp_path / "s.h5"], tmp_path / "o.h5",
                         "--config", tmp_path / "job.json")
    assert result.exit_code == 2 and "decode must be one of auto, device, host" in result.output

    config = {"backend": "opencl", "device": device, "decode": "auto"}
    kind = opencl.select_device(device)[0]["type"]
    assert pipeline_run.decode_on_device(config) == (kind == "GPU")
    assert pipeline_run.decode_on_device({**config, "decode": "device"})
    assert not pipeline_run.decode_on_device({**config, "decode": "host"})
    assert not pipeline_run.decode_on_device({**config, "backend": "cython"})
    real = opencl.select_device

    def as_gpu(wanted=None):
        info, dev = real(wanted)
        return {**info, "type": "GPU"}, dev
    monkeypatch.setattr(opencl, "select_device", as_gpu)
    assert pipeline_run.decode_on_device(config)


def test_device_decode_uses_few_readers(tmp_path, device):
    """Chunks that go to the device compressed need few readers (more contend for the GIL):
    --threads 8 gives DEVICE_DECODE_READERS readers with --decode device, 8 with host."""
    (tmp_path / "geo.poni").write_text(PONI)
    write_bslz4(tmp_path / "s.h5", ring_frames(3, np.uint32))
    for mode, readers in (("device", pipeline_run.DEVICE_DECODE_READERS), ("host", 8)):
        args = ["integrate", "-p", tmp_path / "geo.poni", *OPERATIONS["integrate"],
                "--backend", "opencl", "--device", device, "--decode", mode, "--threads", 8,
                "-v", tmp_path / "s.h5", "-o", tmp_path / f"{mode}.h5"]
        result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert f", {readers} reader threads" in result.output, result.output


def test_opencl_start_up_runs_beside_the_table_and_ends_with_the_job(tmp_path, device,
                                                                      monkeypatch):
    """With --backend opencl the device's start-up (pyopencl, device list, context) runs in a
    thread while the lookup table loads; the thread has ended when the command returns, also
    when the set-up fails after it started (a mask of the wrong shape)."""
    import threading
    import time

    from azfilter.backends.opencl import devices

    started = []
    warm_up = devices.warm_up

    def counted(spec):
        """The start-up, made slower than the rest of the set-up: a job that did not wait
        for it would leave it running."""
        def slow() -> None:
            warm_up(spec).join()
            time.sleep(0.5)
        thread = threading.Thread(target=slow, name="azfilter-opencl-start", daemon=True)
        thread.start()
        started.append(thread)
        return thread

    monkeypatch.setattr(devices, "warm_up", counted)
    (tmp_path / "geo.poni").write_text(PONI)
    write_bslz4(tmp_path / "s.h5", ring_frames(2, np.uint32))
    result = run_command(tmp_path, "integrate", [tmp_path / "s.h5"], tmp_path / "o.h5",
                         "--backend", "opencl", "--device", device)
    assert result.exit_code == 0, result.output
    assert len(started) == 1 and not started[0].is_alive()
    np.save(tmp_path / "mask.npy", np.zeros((5, 5), np.uint8))
    result = run_command(tmp_path, "integrate", [tmp_path / "s.h5"], tmp_path / "p.h5",
                         "--backend", "opencl", "--device", device,
                         "--mask", tmp_path / "mask.npy")
    assert result.exit_code == 2 and "mask" in result.output, result.output
    assert len(started) == 2 and not started[1].is_alive()
    assert not [t for t in threading.enumerate() if t.name == "azfilter-opencl-start"]


def test_engines_that_do_not_decode_refuse_a_chunk():
    """A compressed chunk handed to the cython or python engine is that frame's error (one
    line), never a wrong result; the frames around it are reduced."""
    import bitshuffle

    from azfilter.poni import parse_poni

    frame = ring_frames(1, np.uint16)[0]
    body = bitshuffle.compress_lz4(frame.ravel(), 4096).tobytes()
    chunk = np.frombuffer(frame.nbytes.to_bytes(8, "big") + (8192).to_bytes(4, "big") + body,
                          np.uint8).copy()
    compressed = CompressedChunk(chunk, chunk.size, bslz4_layout(chunk, frame.size, 2), SHAPE,
                                 np.dtype(np.uint16))
    integrator = Integrator(parse_poni(PONI), npt=30, backend="python")
    got = dict(integrator.process_many([(0, frame), (1, compressed), (2, frame)], "integrate"))
    assert isinstance(got[1], AzfilterError) and "cannot decode" in str(got[1])
    np.testing.assert_array_equal(got[0].intensity, got[2].intensity)
