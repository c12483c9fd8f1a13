"""Per-frame timings of the OpenCL engine side by side with pyFAI's OpenCL engine, host to
device transfers, and frame streams.

One run prints (and with ``--markdown`` writes) three tables:

1. **Per frame**, for each detector (synthetic frame: rings, Poisson noise, Bragg spots, hot
   pixels, gaps; npt = the larger image dimension) and operation: the wall time of one call
   -- upload of the raw frame in its own dtype, kernels, read-back of the per-bin sums --
   for pyFAI (``method=(split, "csr", "opencl")``, ``--pyfai``), for azfilter from a frame
   in ordinary (pageable) numpy memory, and from a frame already in page-locked memory
   (``OpenCLEngine.pinned_array``, where a reader decodes it); the ratios; and the PCIe
   transfer time of the frame alone (an OpenCL profiling event on the copy, from page-locked
   memory). Each number is the median over ``--repeat`` calls after two warm-up calls; the
   three are timed in turns (pyFAI, azfilter numpy, azfilter page-locked, the order rotating)
   so that the drifts of a shared machine affect all alike, and every call takes the next of
   8 distinct frames (so that no frame sits in the CPU caches), the same for both programs.
2. **Uploads** (``--upload-study``): how a frame gets from host memory to the device -- the
   driver's copy from pageable memory (blocking, non-blocking), from page-locked memory, and
   the engine's staged copy (T threads copying pieces into page-locked memory, the DMA of
   each piece queued as soon as it is copied) -- and the host's memory-copy bandwidth.
3. **Streams** (``--stream N``): N Eiger 4M frames through ``OpenCLEngine.process_many``
   (sigma-clip), uint32 and uint16: (i) from a ring of 8 page-locked buffers that
   ``--readers`` threads fill (copying from decoded frames, as a decoder writing into the
   buffer would), (ii) from ordinary numpy frames (the engine stages them), (ii') the same
   with staging off (the driver's own path), and (iv) a ring filled by h5py ``read_direct``
   from an uncompressed HDF5 file in /dev/shm (one reader: h5py serialises HDF5 calls).

Usage::

    python bench/bench_opencl.py --pyfai --upload-study --stream 1000 --json F --markdown F
    python bench/bench_opencl.py --quick      # small and slow-device friendly (PoCL)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from azfilter.backends.opencl import OpenCLEngine, opencl_status  # noqa: E402
from azfilter.backends.opencl import engine as ocl  # noqa: E402
from azfilter.binning import build_csr  # noqa: E402
from azfilter.detectors import get_detector  # noqa: E402
from azfilter.geometry import Geometry  # noqa: E402
from azfilter.preproc import pixel_constants  # noqa: E402

# Tilted detectors ~0.2-0.3 m from the sample, beam near the middle (as bench_engine.py).
GEOMETRIES = {
    "Pilatus300k": dict(dist=0.25, poni1=0.0532, poni2=0.0461, rot1=0.012, rot2=-0.007),
    "Pilatus1M": dict(dist=0.3, poni1=0.0905, poni2=0.0843, rot1=0.012, rot2=-0.007),
    "Eiger4M": dict(dist=0.2, poni1=0.0812, poni2=0.0776, rot1=0.010, rot2=-0.006),
    "Eiger9M": dict(dist=0.25, poni1=0.1226, poni2=0.1166, rot1=0.010, rot2=-0.006),
}
WAVELENGTH = 1.0e-10
POLARIZATION = 0.99
UNIT = "q_nm^-1"
POOL = 8            # distinct frames cycled through by the per-frame timings
RING = 8            # page-locked buffers of the streamed reader ring
STREAM_SOURCES = 16  # distinct pageable frames cycled through by the streams

# label -> (split, engine method, its parameters, pyFAI method name, pyFAI keywords)
OPERATIONS = {
    "integrate no-split": ("no", "integrate", dict(error_model="poisson"),
                           "integrate1d", dict(error_model="poisson")),
    "integrate full-split": ("full", "integrate", dict(error_model="poisson"),
                             "integrate1d", dict(error_model="poisson")),
    "sigma_clip": ("no", "sigma_clip", dict(thres=5.0, max_iter=5, error_model="azimuthal"),
                   "sigma_clip_ng", dict(thres=5.0, max_iter=5, error_model="azimuthal")),
    "medfilt full-split": ("full", "medfilt",
                           dict(quant_min=0.4, quant_max=0.6, error_model="poisson"),
                           "medfilt1d_ng", dict(percentile=(40, 60), error_model="poisson")),
}
STREAM_PARAMS = dict(thres=5.0, max_iter=5, error_model="azimuthal")


# ------------------------------------------------------------------------------ helpers
def geometry(detector_name: str) -> Geometry:
    return Geometry(**GEOMETRIES[detector_name], rot3=0.0, wavelength=WAVELENGTH,
                    detector=get_detector(detector_name))


def synthetic_frames(geo: Geometry, count: int) -> list[np.ndarray]:
    """Distinct synthetic frames (Pilatus int32 with -1/-2, Eiger uint32 with 2^32-1)."""
    from synthetic import synthetic_frame
    return [synthetic_frame(geometry=geo, seed=seed) for seed in range(count)]


def cycle_copies(frames: list[np.ndarray], count: int) -> list[np.ndarray]:
    """``count`` separately allocated pageable frames (copies of ``frames``, cycled)."""
    return [frames[i % len(frames)].copy() for i in range(count)]


def as_uint16(frame: np.ndarray) -> np.ndarray:
    """An Eiger uint32 frame as the detector records it in 16-bit mode (65535 = invalid)."""
    invalid = frame == np.iinfo(frame.dtype).max
    out = np.minimum(frame, 65534).astype(np.uint16)
    out[invalid] = 65535
    return out


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_ms(call, sources: list, repeat: int, warmup: int = 2) -> float:
    """Median wall time (ms) of ``call(sources[i % len(sources)])`` over ``repeat`` calls."""
    for i in range(warmup):
        call(sources[i % len(sources)])
    times = []
    for i in range(repeat):
        source = sources[(i + warmup) % len(sources)]
        started = time.perf_counter()
        call(source)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def interleaved_ms(calls: dict, sources: dict, repeat: int, warmup: int = 2) -> dict:
    """Median wall time (ms) of each of ``calls`` (name -> callable(frame)), timed in turns
    (the order rotating), call i of each taking frame i of its ``sources`` (cycled): drifts
    of a shared machine affect every call alike."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeat):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            frames = sources[name]
            started = time.perf_counter()
            calls[name](frames[i % len(frames)])
            if i >= warmup:
                times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def pinned_copies(engine: OpenCLEngine, frames: list[np.ndarray]) -> list[np.ndarray]:
    """The frames copied into page-locked memory (where a reader would decode them)."""
    copies = []
    for frame in frames:
        pinned = engine.pinned_array(frame.shape, frame.dtype)
        pinned[...] = frame
        copies.append(pinned)
    return copies


class Uploads:
    """Transfer timings of one engine's raw buffer (wall clock and OpenCL events)."""

    def __init__(self, engine: OpenCLEngine):
        cl = engine._cl
        self.cl, self.engine = cl, engine
        self.queue = cl.CommandQueue(engine.context, engine._device,
                                     properties=cl.command_queue_properties.PROFILING_ENABLE)

    def event_ms(self, sources: list, repeat: int) -> float:
        """Median device time (ms) of the copy, from the profiling event."""
        times = []
        for i in range(repeat + 2):
            event = self.cl.enqueue_copy(self.queue, self.engine._raw[0],
                                         sources[i % len(sources)].reshape(-1),
                                         is_blocking=True)
            if i >= 2:
                times.append((event.profile.end - event.profile.start) * 1e-6)
        return statistics.median(times)

    def driver_ms(self, sources: list, repeat: int, blocking: bool) -> float:
        """Wall time of the driver's copy (blocking, or non-blocking then waited for)."""
        cl, queue, target = self.cl, self.engine._transfer_queue, self.engine._raw[0]
        return median_ms(lambda src: cl.enqueue_copy(queue, target, src.reshape(-1),
                                                     is_blocking=blocking).wait(),
                         sources, repeat)

    def staged_ms(self, sources: list, repeat: int, threads: int | None = None,
                  rounds: int | None = None) -> float:
        """Wall time of the engine's staged upload: its defaults, or exactly ``threads``
        copy threads each copying ``rounds`` pieces."""
        engine = self.engine
        saved = engine.copy_threads, ocl.STAGING_ROUNDS, ocl.STAGING_UNIT_BYTES
        if threads is not None:
            engine.copy_threads, ocl.STAGING_ROUNDS = threads, rounds
            ocl.STAGING_UNIT_BYTES = 1

        def upload(src):
            events = engine._upload(src, src.dtype, 0, None, engine.queue)
            events[-1].wait()
        try:
            return median_ms(upload, sources, repeat)
        finally:
            engine.copy_threads, ocl.STAGING_ROUNDS, ocl.STAGING_UNIT_BYTES = saved

    def pieces_ms(self, pinned: list, repeat: int, pieces: int, own: bool) -> float:
        """Wall time of DMAs of a page-locked frame in ``pieces`` copies, each from inside
        one allocation (``own=False``) or from an allocation of its own."""
        cl, queue, target = self.cl, self.engine._transfer_queue, self.engine._raw[0]
        nbytes = pinned[0].nbytes
        step = -(-nbytes // pieces // 4096) * 4096
        bounds = [(a, min(nbytes, a + step)) for a in range(0, nbytes, step)]
        if own:
            parts = [[self.engine.pinned_array(b - a, np.uint8) for a, b in bounds]]
        else:
            parts = [[frame.reshape(-1).view(np.uint8)[a:b] for a, b in bounds]
                     for frame in pinned]
        counter = iter(range(10**9))

        def send(_):
            chosen = parts[next(counter) % len(parts)]
            events = [cl.enqueue_copy(queue, target, part, dst_offset=a, is_blocking=False)
                      for part, (a, _b) in zip(chosen, bounds, strict=True)]
            queue.flush()
            events[-1].wait()
        return median_ms(send, pinned, repeat)


def host_copy_ms(sources: list, targets: list, repeat: int, threads: int) -> float:
    """Wall time of copying a frame into ``targets`` with ``threads`` threads (no device)."""
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    counter = iter(range(10**9))

    def copy(src):
        target = targets[next(counter) % len(targets)].reshape(-1)
        flat = src.reshape(-1)
        if pool is None:
            np.copyto(target, flat)
            return
        step = -(-flat.size // threads)
        list(pool.map(lambda a: np.copyto(target[a:a + step], flat[a:a + step]),
                      range(0, flat.size, step)))
    try:
        return median_ms(copy, sources, repeat)
    finally:
        if pool is not None:
            pool.shutdown()


# ------------------------------------------------------------------------------ per frame
def bench_azfilter(geo, frames, npt: int, device: str | None, repeat: int, labels: list[str],
                   study: bool, staging: bool | None,
                   theirs: dict | None) -> tuple[dict, dict, dict]:
    """azfilter from numpy and from page-locked frames, timed in turns with pyFAI's call
    (``theirs``: label -> callable(frame), when given); then the upload timings."""
    detector = geo.detector
    const = pixel_constants(geo, polarization=POLARIZATION)
    dummy, delta = detector.dummy_for(frames[0].dtype)
    pageable = cycle_copies(frames, POOL)
    results, info, engines = {}, {}, {}
    pinned = None
    for label in labels:
        split, method, params, _, _ = OPERATIONS[label]
        if split not in engines:
            progress(f"{detector.name}: {split}-split table")
            started = time.perf_counter()
            csr = build_csr(geo, UNIT, npt, split, const.static_mask)
            table_s = time.perf_counter() - started
            started = time.perf_counter()
            engines[split] = OpenCLEngine(csr, const.pixel_norm, const.dark, dummy, delta,
                                          device=device, staging=staging)
            info[split] = dict(nnz=csr.nnz, max_row=int(np.diff(csr.indptr).max()),
                               table_s=table_s, engine_s=time.perf_counter() - started)
        engine = engines[split]
        run = getattr(engine, method)
        progress(f"{detector.name}: azfilter {label}")
        started = time.perf_counter()
        run(frames[0], **params)                       # compiles for this dtype
        first_ms = (time.perf_counter() - started) * 1e3
        if pinned is None:   # page-locked memory serves every engine of the device
            pinned = pinned_copies(engine, frames)
        calls = {"ms": lambda raw: run(raw, **params),  # noqa: B023
                 "pinned_ms": lambda raw: run(raw, **params)}  # noqa: B023
        sources = {"ms": pageable, "pinned_ms": pinned}
        if theirs and label in theirs:
            calls["pyfai_ms"], sources["pyfai_ms"] = theirs[label], pageable
        results[label] = dict(interleaved_ms(calls, sources, repeat), first_ms=first_ms)
    engine = next(iter(engines.values()))
    uploads = Uploads(engine)
    transfer = dict(
        bytes=int(frames[0].nbytes),
        pinned_event_ms=uploads.event_ms(pinned, repeat),
        pageable_event_ms=uploads.event_ms(pageable, repeat),
        pinned_wall_ms=uploads.driver_ms(pinned, repeat, blocking=True),
        pageable_wall_ms=uploads.driver_ms(pageable, repeat, blocking=True),
        staged_wall_ms=uploads.staged_ms(pageable, repeat))
    if study:
        transfer["study"] = upload_study(uploads, pageable, pinned, repeat)
    meta = dict(tables=info, device=engine.device_info,
                engine=dict(workgroup_size=engine.workgroup_size, staging=engine.staging,
                            copy_threads=engine.copy_threads,
                            local_sort_size=engine.local_sort_size, fp64=engine.fp64))
    return results, transfer, meta


def upload_study(uploads: Uploads, pageable: list, pinned: list, repeat: int) -> dict:
    """Every way of getting the frame to the device, and the host's copy bandwidth."""
    progress("upload study")
    cores = os.cpu_count() or 1
    out = {
        "driver, pageable, blocking": uploads.driver_ms(pageable, repeat, blocking=True),
        "driver, pageable, non-blocking + wait":
            uploads.driver_ms(pageable, repeat, blocking=False),
        "driver, page-locked (DMA)": uploads.driver_ms(pinned, repeat, blocking=True),
        "page-locked, 8 DMAs from inside one allocation":
            uploads.pieces_ms(pinned, repeat, 8, own=False),
        "page-locked, 8 DMAs from 8 allocations": uploads.pieces_ms(pinned, repeat, 8, own=True),
        "host copy pageable->pageable, 1 thread": host_copy_ms(
            pageable, [np.empty_like(pageable[0]) for _ in range(2)], repeat, 1),
    }
    for threads in (1, 2, 4, 8, 16):
        if threads <= cores:
            out[f"host copy pageable->page-locked, {threads} thread(s)"] = host_copy_ms(
                pageable, pinned, repeat, threads)
    pool = ThreadPoolExecutor(max_workers=8)
    out["thread pool: 8 empty tasks, round trip"] = median_ms(
        lambda _: list(pool.map(lambda x: x, range(8))), pageable, repeat)
    pool.shutdown()
    out["staged, engine default"] = uploads.staged_ms(pageable, repeat)
    for threads, rounds in ((1, 1), (1, 4), (2, 2), (4, 1), (4, 2), (8, 1), (8, 2), (8, 4),
                            (12, 2), (16, 2)):
        if threads <= cores:
            out[f"staged, {threads} thread(s) x {rounds} piece(s)"] = uploads.staged_ms(
                pageable, repeat, threads, rounds)
    return out


def pyfai_calls(geo, frames, npt: int, labels: list[str]) -> tuple[dict, dict]:
    """pyFAI's call for each operation (label -> callable(frame)), after its first call."""
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    detector = detector_factory(geo.detector.name)
    mask = np.asarray(geo.detector.mask, dtype=bool) | geo.detector.invalid_pixels(frames[0])
    detector.mask = mask.astype(np.int8)
    calls, info = {}, {}
    for label in labels:
        split, _, _, method_name, kwargs = OPERATIONS[label]
        ai = AzimuthalIntegrator(dist=geo.dist, poni1=geo.poni1, poni2=geo.poni2, rot1=geo.rot1,
                                 rot2=geo.rot2, rot3=geo.rot3, wavelength=geo.wavelength,
                                 detector=detector)
        method = getattr(ai, method_name)
        progress(f"{geo.detector.name}: pyFAI {label} (first call)")
        options = dict(unit=UNIT, method=(split, "csr", "opencl"),
                       polarization_factor=POLARIZATION, **kwargs)
        started = time.perf_counter()
        out = method(frames[0], npt, **options)
        info[label] = dict(first_ms=(time.perf_counter() - started) * 1e3,
                           engine=str(getattr(out, "method", "")))
        calls[label] = lambda raw, method=method, options=options: method(raw, npt, **options)
    return calls, info


# ------------------------------------------------------------------------------ streams
class ReaderRing:
    """``RING`` page-locked buffers filled in frame order by ``readers`` threads.

    Frame i goes into buffer i % RING once frame i - RING has been consumed (the consumer
    gives a buffer back when it asks for the next frame: ``process_many`` has uploaded the
    previous one by then).
    """

    def __init__(self, engine: OpenCLEngine, shape, dtype, fill, count: int, readers: int):
        self.buffers = [engine.pinned_array(shape, dtype) for _ in range(RING)]
        self.fill, self.count, self.readers = fill, count, readers
        self.cond = threading.Condition()
        self.next_frame = 0
        self.filled = [-1] * RING            # frame number in each buffer
        self.turn = list(range(RING))        # frame number allowed into each buffer next
        self.error: BaseException | None = None

    def _reader(self) -> None:
        try:
            while True:
                with self.cond:
                    index = self.next_frame
                    self.next_frame += 1
                    if index >= self.count:
                        return
                    slot = index % RING
                    self.cond.wait_for(lambda: self.turn[slot] == index)  # noqa: B023
                self.fill(self.buffers[slot], index)
                with self.cond:
                    self.filled[slot] = index
                    self.cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - reported by the consumer
            with self.cond:
                self.error = err
                self.cond.notify_all()

    def frames(self):
        threads = [threading.Thread(target=self._reader, daemon=True)
                   for _ in range(self.readers)]
        for thread in threads:
            thread.start()
        try:
            for index in range(self.count):
                slot = index % RING
                if index:
                    previous = (index - 1) % RING
                    with self.cond:   # the previous frame is uploaded: its buffer is free
                        self.turn[previous] = index - 1 + RING
                        self.cond.notify_all()
                with self.cond:
                    self.cond.wait_for(lambda: self.filled[slot] == index  # noqa: B023
                                       or self.error is not None)
                    if self.error is not None:
                        raise self.error
                yield self.buffers[slot]
        finally:
            with self.cond:
                self.turn = [self.count + RING] * RING   # let blocked readers finish
                self.next_frame = self.count
                self.cond.notify_all()
            for thread in threads:
                thread.join()


def stream_fps(engine: OpenCLEngine, frames, count: int) -> float:
    started = time.perf_counter()
    done = sum(1 for _ in engine.process_many(enumerate(frames), "sigma_clip", STREAM_PARAMS))
    assert done == count
    return count / (time.perf_counter() - started)


def bench_streams(detector_name: str, device: str | None, count: int, readers: int,
                  with_hdf5: bool, staging: bool | None) -> dict:
    geo = geometry(detector_name)
    const = pixel_constants(geo, polarization=POLARIZATION)
    frames32 = synthetic_frames(geo, 4)
    npt = max(frames32[0].shape)
    csr = build_csr(geo, UNIT, npt, "no", const.static_mask)
    out = {}
    for frames in (frames32, [as_uint16(f) for f in frames32]):
        dtype_name = str(frames[0].dtype)
        dummy, delta = geo.detector.dummy_for(frames[0].dtype)
        engine = OpenCLEngine(csr, const.pixel_norm, const.dark, dummy, delta, device=device,
                              staging=staging)
        driver = OpenCLEngine(csr, const.pixel_norm, const.dark, dummy, delta, device=device,
                              staging=False)
        sources = cycle_copies(frames, STREAM_SOURCES)
        engine.sigma_clip(frames[0], **STREAM_PARAMS)   # compile, allocate staging
        driver.sigma_clip(frames[0], **STREAM_PARAMS)
        uploads = Uploads(engine)
        pinned = pinned_copies(engine, frames)
        row = dict(bytes=int(frames[0].nbytes), pinned_event_ms=uploads.event_ms(pinned, 20))
        progress(f"stream {detector_name} {dtype_name}: reader ring")

        def copy_fill(buffer, index, sources=sources):
            np.copyto(buffer, sources[index % len(sources)])
        ring = ReaderRing(engine, frames[0].shape, frames[0].dtype, copy_fill, count, readers)
        row["ring_fps"] = stream_fps(engine, ring.frames(), count)
        progress(f"stream {detector_name} {dtype_name}: pre-filled page-locked frames")
        row["pinned_fps"] = stream_fps(engine, (pinned[i % len(pinned)] for i in range(count)),
                                       count)
        progress(f"stream {detector_name} {dtype_name}: numpy frames")
        row["numpy_fps"] = stream_fps(engine, (sources[i % len(sources)]
                                               for i in range(count)), count)
        row["numpy_driver_fps"] = stream_fps(driver, (sources[i % len(sources)]
                                                      for i in range(count)), count)
        if with_hdf5:
            row["hdf5_ring_fps"] = hdf5_ring_fps(engine, frames, count)
        out[dtype_name] = row
        del ring, pinned, sources
    return out


def hdf5_ring_fps(engine: OpenCLEngine, frames: list[np.ndarray], count: int) -> float | None:
    """A ring filled by h5py ``read_direct`` from an uncompressed stack in /dev/shm."""
    try:
        import h5py
    except ImportError:
        return None
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    nframes = 64
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "stack.h5")
        with h5py.File(path, "w") as h5:
            dset = h5.create_dataset("data", (nframes, *frames[0].shape), frames[0].dtype,
                                     chunks=(1, *frames[0].shape))
            for i in range(nframes):
                dset[i] = frames[i % len(frames)]
        with h5py.File(path, "r") as h5:
            dset = h5["data"]
            progress(f"stream: reader ring from HDF5 ({frames[0].dtype})")

            def fill(buffer, index):
                dset.read_direct(buffer, np.s_[index % nframes])
            ring = ReaderRing(engine, frames[0].shape, frames[0].dtype, fill, count, 1)
            return stream_fps(engine, ring.frames(), count)


# ------------------------------------------------------------------------------ report
def host_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"host: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, " \
           f"numpy {np.__version__}"


def markdown(everything: dict, streams: dict | None, args) -> str:
    lines = []
    first = next(iter(everything.values()))
    device = first["meta"]["device"]
    lines.append(f"device: {device['name']} ({device['platform_name']}, driver "
                 f"{device['driver_version']}, {device['version']}); {everything_host()}")
    lines.append("")
    lines.append("| detector | operation | frame | PCIe upload ms (pinned, event) | pyFAI OpenCL "
                 "ms | azfilter ms, numpy frame | azfilter ms, pinned frame | speed-up, numpy "
                 "frame | speed-up, pinned frame | azfilter / PCIe upload (numpy, pinned) |")
    lines.append("|" + "---|" * 10)
    for name, entry in everything.items():
        transfer = entry["transfer"]
        frame = f"{entry['shape'][0]}x{entry['shape'][1]} {entry['dtype']} " \
                f"({transfer['bytes'] / 1e6:.1f} MB)"
        for label, mine in entry["azfilter"].items():
            other = entry["pyfai"].get(label)
            theirs = f"{other['ms']:.2f}" if other else "-"
            ratio = ("-", "-") if not other else (f"{other['ms'] / mine['ms']:.1f}x",
                                                   f"{other['ms'] / mine['pinned_ms']:.1f}x")
            lines.append(f"| {name} | {label} | {frame} | {transfer['pinned_event_ms']:.2f} | "
                         f"{theirs} | {mine['ms']:.2f} | {mine['pinned_ms']:.2f} | {ratio[0]} | "
                         f"{ratio[1]} | {mine['ms'] / transfer['pinned_event_ms']:.1f}, "
                         f"{mine['pinned_ms'] / transfer['pinned_event_ms']:.1f} |")
    lines.append("")
    lines.append("| detector | frame MB | PCIe from pinned: event ms (GB/s) | from pageable: "
                 "event ms | driver, pageable: wall ms (GB/s) | driver, pinned: wall ms | "
                 "azfilter staged, pageable: wall ms (GB/s) |")
    lines.append("|" + "---|" * 7)
    for name, entry in everything.items():
        t = entry["transfer"]
        gb = t["bytes"] / 1e6

        def rate(ms, gb=gb):
            return f"{gb / ms:.0f}"
        lines.append(f"| {name} | {gb:.1f} | {t['pinned_event_ms']:.3f} "
                     f"({rate(t['pinned_event_ms'])}) | {t['pageable_event_ms']:.3f} | "
                     f"{t['pageable_wall_ms']:.3f} ({rate(t['pageable_wall_ms'])}) | "
                     f"{t['pinned_wall_ms']:.3f} | {t['staged_wall_ms']:.3f} "
                     f"({rate(t['staged_wall_ms'])}) |")
    study = {name: e["transfer"].get("study") for name, e in everything.items()
             if e["transfer"].get("study")}
    if study:
        names = list(study)
        lines.append("")
        lines.append("| upload path (ms per frame, GB/s) | " + " | ".join(names) + " |")
        lines.append("|" + "---|" * (len(names) + 1))
        for key in study[names[0]]:
            cells = []
            for name in names:
                ms = study[name].get(key)
                gb = everything[name]["transfer"]["bytes"] / 1e6
                cells.append("-" if ms is None else f"{ms:.3f}" if key.startswith("thread")
                             else f"{ms:.3f} ({gb / ms:.0f})")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if streams:
        lines.append("")
        lines.append(f"| {args.stream} frames, sigma_clip | frame MB | PCIe-bound frames/s "
                     "(pinned upload event) | (i) reader ring, page-locked | pre-filled "
                     "page-locked frames | (ii) numpy frames (staged) | (ii') numpy frames, "
                     "driver path | (iv) ring filled by h5py read_direct |")
        lines.append("|" + "---|" * 8)
        for name, rows in streams.items():
            for dtype_name, row in rows.items():
                hdf5 = row.get("hdf5_ring_fps")
                lines.append(
                    f"| {name} {dtype_name} | {row['bytes'] / 1e6:.1f} | "
                    f"{1e3 / row['pinned_event_ms']:.0f} | {row['ring_fps']:.0f} | "
                    f"{row['pinned_fps']:.0f} | {row['numpy_fps']:.0f} | "
                    f"{row['numpy_driver_fps']:.0f} | "
                    f"{'-' if hdf5 is None else f'{hdf5:.0f}'} |")
    return "\n".join(lines) + "\n"


_HOST = host_line()


def everything_host() -> str:
    return _HOST


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=["Pilatus1M", "Eiger4M", "Eiger9M"],
                        choices=sorted(GEOMETRIES))
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS),
                        choices=list(OPERATIONS))
    parser.add_argument("--device", default=None, help="gpu, cpu or P:D (default: best)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--npt", type=int, default=None,
                        help="radial bins (default: the larger image dimension)")
    parser.add_argument("--pyfai", action="store_true", help="also time pyFAI's OpenCL engine")
    parser.add_argument("--upload-study", action="store_true",
                        help="time every upload path and the host's copy bandwidth")
    parser.add_argument("--stream", type=int, default=0,
                        help="frames streamed through process_many (0: no stream table)")
    parser.add_argument("--stream-detector", default="Eiger4M", choices=sorted(GEOMETRIES))
    parser.add_argument("--readers", type=int, default=4,
                        help="threads filling the page-locked ring of the streams")
    parser.add_argument("--no-hdf5", action="store_true",
                        help="skip the stream read from an HDF5 file")
    parser.add_argument("--staging", choices=("auto", "on", "off"), default="auto",
                        help="OpenCLEngine staging of pageable frames (default: the engine's)")
    parser.add_argument("--quick", action="store_true",
                        help="Pilatus300k only, 3 repeats, 20 streamed frames (PoCL-friendly)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args()
    if args.quick:
        args.detectors, args.repeat = ["Pilatus300k"], 3
        args.stream, args.stream_detector = args.stream or 20, "Pilatus300k"

    staging = {"auto": None, "on": True, "off": False}[args.staging]
    print(f"# {opencl_status()}")
    print(f"# {_HOST}")
    everything = {}
    for name in args.detectors:
        geo = geometry(name)
        progress(f"{name}: synthetic frames")
        frames = synthetic_frames(geo, 4)
        npt = args.npt or max(frames[0].shape)
        calls, pyfai_info = pyfai_calls(geo, frames, npt, args.operations) if args.pyfai \
            else ({}, {})
        ours, transfer, meta = bench_azfilter(geo, frames, npt, args.device, args.repeat,
                                              args.operations, args.upload_study, staging,
                                              calls)
        theirs = {label: dict(pyfai_info[label], ms=ours[label].pop("pyfai_ms"))
                  for label in pyfai_info}
        del calls
        everything[name] = dict(azfilter=ours, pyfai=theirs, transfer=transfer, meta=meta,
                                npt=npt, shape=list(frames[0].shape), dtype=str(frames[0].dtype))
        engine_info = meta["engine"]
        print(f"# {name}: {frames[0].shape} {frames[0].dtype}, npt={npt}, device "
              f"{meta['device']['name']} (work-group {engine_info['workgroup_size']}, local "
              f"sort {engine_info['local_sort_size']}, fp64 {engine_info['fp64']}, staging "
              f"{engine_info['staging']} with {engine_info['copy_threads']} threads), tables: "
              + ", ".join(f"{split} split nnz={t['nnz']} longest row={t['max_row']} "
                          f"(built in {t['table_s']:.1f} s)"
                          for split, t in meta["tables"].items()), flush=True)
        del frames
    streams = None
    if args.stream:
        streams = {args.stream_detector: bench_streams(args.stream_detector, args.device,
                                                       args.stream, args.readers,
                                                       not args.no_hdf5, staging)}
    text = markdown(everything, streams, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=everything, streams=streams,
                                                   host=_HOST), indent=1, default=str))


if __name__ == "__main__":
    main()
