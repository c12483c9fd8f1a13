"""End to end on a GPU machine: ``azfilter --backend opencl`` (device and host decoding) and
``--backend cython`` against ``pyFAI-integrate``, Eiger 4M stacks → one ``.h5`` each.

Generates (once, reused) in ``--data-dir`` (use ``/dev/shm``) a stack of ``--frames`` Eiger 4M
uint32 frames compressed with bitshuffle-LZ4 (one frame per chunk), the same frames
uncompressed, and copies of their first frames (raw chunks copied): ``--pyfai-frames``
(``--pyfai-medfilt-frames`` for medfilt, pyFAI's slowest) for pyFAI-integrate and
``--profile-frames`` for the warm-up and profiling runs. Then, per operation (sigma-clip,
integrate, medfilt), each in a fresh process, one after the other:

- ``azfilter OP --backend opencl --decode device`` and ``--decode host`` on the bslz4 stack,
  ``--backend opencl`` on the uncompressed stack, ``--backend cython`` on the bslz4 stack;
- ``pyFAI-integrate`` (WorkerConfig with the same options) on the ``--pyfai-frames`` stacks.

Each azfilter output is checked to hold (frames, npt) and the device- and host-decoded
outputs to be bit-identical. Ratios are to pyFAI-integrate on the same kind of input.

Where the time goes (a side run of ``--profile-frames`` frames per OpenCL variant, in a fresh
process): the command runs in-process with profiling-enabled OpenCL queues, and every upload,
decode kernel, reduction kernel and read-back is timed from its OpenCL event; the writer's
``sink.write`` is timed (wall time, so waits for the GIL count); the reader alone
(``iter_frames`` with the run's thread count, nothing reduced) gives the read/decode rate.
The bound column is the slowest of those stages (frames/s if only it ran: the readers, the
transfer queue's uploads, the kernels (decode, reduction and read-back; the engine's two frame
slots each have a kernel queue, so their kernels may overlap and beat this bound), the
writer), so the README can say how close each measured rate is to it.

Steady rates (``--steady N``): a fresh process costs a fixed time before its first frame
(interpreter, imports, OpenCL's start, the lookup table; ~0.8 s on the H200 machine), which
the 1000-frame rate includes. For each OpenCL variant the command also runs on the stack
alone and on N times the stack (N - 1 hard links to it, named apart), best of
``--steady-repeat`` fresh processes each; steady frames/s = (N - 1) * frames / (wall of N
stacks - wall of one), what each further frame costs.

Usage (GPU machine, 16 cores)::

    python3 bench/bench_e2e_gpu.py --data-dir /dev/shm/azf --markdown out.md --json out.json
    python3 bench/bench_e2e_gpu.py --frames 5 --pyfai-frames 3 --profile-frames 3 \\
        --data-dir /tmp/azf --device cpu          # a smoke test on PoCL
    python3 bench/bench_e2e_gpu.py --data-dir /dev/shm/azf --skip pyfai profile cython \\
        --steady 4                                # steady rates too

About 6 minutes for the defaults on 16 cores + 1 H200 (generation of the stacks ~1 min the
first time; 18 GB of uncompressed frames in ``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.append(str(REPO))   # tests.synthetic (the installed azfilter wins over the tree)

import bench_cli  # noqa: E402  (after the path set-up)
from bench_cli import H5PATH, checked, child_environment, pyfai_argv, run_child  # noqa: E402

STACK_VERSION = 1
UNIT = "q_nm^-1"
POLARIZATION = 0.99
OPERATIONS = ("sigma-clip", "integrate", "medfilt")
#: pyFAI's integrator method and options equivalent to each azfilter operation's
PYFAI_METHODS = {
    "sigma-clip": ("sigma_clip_ng", {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal"}),
    "integrate": ("integrate1d_ng", {"error_model": "poisson"}),
    "medfilt": ("medfilt1d_ng", {"percentile": 50, "error_model": "poisson"}),
}
AZFILTER_OPTIONS = {
    "sigma-clip": ["--thres", "5", "--max-iter", "5", "--error-model", "azimuthal"],
    "integrate": ["--split", "no", "--error-model", "poisson"],
    "medfilt": ["--split", "no", "--percentile", "50", "--error-model", "poisson"],
}


# ============================================================================ the stacks
def bslz4_chunk_writer() -> tuple[str, Any]:
    """(how, ``encode(frame) -> chunk bytes``): HDF5 filter 32008 chunks (bitshuffle's
    default 8 KiB blocks, LZ4), from the ``bitshuffle`` package, else imagecodecs (each
    block bit-shuffled and LZ4-compressed on its own, as the filter does)."""
    import numpy as np

    try:
        import bitshuffle

        def encode(frame: np.ndarray) -> bytes:
            block = 8192 // frame.itemsize
            body = bitshuffle.compress_lz4(frame.ravel(), block)
            return (frame.nbytes.to_bytes(8, "big") + (block * frame.itemsize).to_bytes(4, "big")
                    + body.tobytes())
        return "bitshuffle package", encode
    except ImportError:
        import imagecodecs

    def encode_imagecodecs(frame: np.ndarray) -> bytes:
        flat = frame.ravel()
        itemsize = frame.itemsize
        block = 8192 // itemsize
        blocked = flat.size - flat.size % 8
        parts = [frame.nbytes.to_bytes(8, "big"), (block * itemsize).to_bytes(4, "big")]
        for start in range(0, blocked, block):
            piece = flat[start:min(blocked, start + block)]
            shuffled = imagecodecs.bitshuffle_encode(piece, itemsize=itemsize,
                                                     blocksize=piece.size)
            packed = imagecodecs.lz4_encode(shuffled, header=False)
            parts.append(len(packed).to_bytes(4, "big") + bytes(packed))
        parts.append(flat[blocked:].tobytes())
        return b"".join(parts)
    return "imagecodecs (bitshuffle + LZ4 per block)", encode_imagecodecs


def bslz4_dataset(h5: Any, n_frames: int, shape: tuple[int, int]) -> Any:
    """An empty uint32 dataset with the bitshuffle-LZ4 filter (32008, LZ4) in its pipeline,
    chunked one frame per chunk; filled with ``write_direct_chunk`` (the filter plugin is
    not needed to write, only to read through h5py)."""
    import h5py
    import numpy as np

    try:
        import hdf5plugin

        return h5.create_dataset(H5PATH, shape=(n_frames, *shape), dtype=np.uint32,
                                 chunks=(1, *shape), **hdf5plugin.Bitshuffle(cname="lz4"))
    except ImportError:
        pass
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((1, *shape))
    dcpl.set_filter(32008, h5py.h5z.FLAG_OPTIONAL, (0, 0, 4, 0, 2))
    group = h5.require_group(str(Path(H5PATH).parent))
    space = h5py.h5s.create_simple((n_frames, *shape))
    h5py.h5d.create(group.id, Path(H5PATH).name.encode(), h5py.h5t.NATIVE_UINT32, space,
                    dcpl=dcpl)
    return h5[H5PATH]


def make_stacks(data_dir: Path, n_frames: int, subsets: set[int]) -> dict[str, Any]:
    """The stacks and the PONI, made once: ``bslz4`` and ``raw`` of ``n_frames``, and their
    first frames, ``bslz4_N`` and ``raw_N`` for each N of ``subsets`` (pyFAI, profiling)."""
    import h5py
    import numpy as np

    from azfilter.poni import save_poni
    from tests.synthetic import default_geometry

    data_dir.mkdir(parents=True, exist_ok=True)
    geometry = default_geometry("Eiger4M")
    poni = data_dir / "eiger4m.poni"
    save_poni(geometry, str(poni))
    shape = tuple(geometry.detector.shape)
    names = {
        "bslz4": data_dir / f"eiger4m_bslz4_{n_frames}f_v{STACK_VERSION}.h5",
        "raw": data_dir / f"eiger4m_raw_{n_frames}f_v{STACK_VERSION}.h5",
    }
    for count in subsets:
        for key in ("bslz4", "raw"):
            names[f"{key}_{count}"] = \
                data_dir / f"eiger4m_{key}_{count}of{n_frames}f_v{STACK_VERSION}.h5"

    def complete(path: Path, frames: int) -> bool:
        try:
            with h5py.File(path, "r") as h5:
                return bool(h5.attrs.get("complete")) and h5[H5PATH].shape[0] == frames
        except (OSError, KeyError):
            return False

    info: dict[str, Any] = {"poni": str(poni), "shape": list(shape), "generated_s": 0.0}
    start = time.perf_counter()
    if not (complete(names["bslz4"], n_frames) and complete(names["raw"], n_frames)):
        # raw frames, the compressed stack (~1/5) and the copies for pyFAI
        needed = int(shape[0] * shape[1] * 4 * (n_frames + sum(subsets)) * 1.3)
        free = shutil.disk_usage(data_dir).free
        if free < needed:
            sys.exit(f"bench_e2e_gpu: {data_dir} has {free / 2**30:.1f} GiB free, the stacks "
                     f"need about {needed / 2**30:.1f} GiB; choose another --data-dir")
        how, encode = bslz4_chunk_writer()
        info["encoder"] = how
        from concurrent.futures import ThreadPoolExecutor

        tmp = {key: names[key].with_name(names[key].name + ".tmp") for key in ("bslz4", "raw")}
        with h5py.File(tmp["bslz4"], "w") as packed, h5py.File(tmp["raw"], "w") as raw, \
                ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            packed_set = bslz4_dataset(packed, n_frames, shape)
            raw_set = raw.create_dataset(H5PATH, shape=(n_frames, *shape), dtype=np.uint32,
                                         chunks=(1, *shape))
            frames = bench_cli.eiger_frames(geometry, n_frames)
            pending: list = []
            for k, frame in enumerate(frames):
                raw_set.id.write_direct_chunk((k, 0, 0), frame.tobytes())
                pending.append((k, pool.submit(encode, frame)))
                while len(pending) > 2 * (os.cpu_count() or 1) or (
                        pending and k == n_frames - 1):
                    index, future = pending.pop(0)
                    packed_set.id.write_direct_chunk((index, 0, 0), future.result())
            for h5 in (packed, raw):
                h5["entry"].attrs["NX_class"] = "NXentry"
                h5["entry/data"].attrs["NX_class"] = "NXdata"
                h5["entry/data"].attrs["signal"] = "data"
                h5.attrs["complete"] = True
        for key in ("bslz4", "raw"):
            os.replace(tmp[key], names[key])
    for key, count in ((key, count) for key in ("bslz4", "raw") for count in subsets):
        small = names[f"{key}_{count}"]
        if complete(small, count):
            continue
        tmp_small = small.with_name(small.name + ".tmp")
        with h5py.File(names[key], "r") as source, h5py.File(tmp_small, "w") as target:
            dataset = source[H5PATH]
            # a new pipeline, not the source's creation list: the bitshuffle filter would
            # append its parameters to the copied ones again (a pipeline that fails to read)
            copy = bslz4_dataset(target, count, shape) if key == "bslz4" else \
                target.create_dataset(H5PATH, shape=(count, *shape), dtype=np.uint32,
                                      chunks=(1, *shape))
            for k in range(count):   # raw chunks copied: same bytes, no recompression
                mask, chunk = dataset.id.read_direct_chunk((k, 0, 0))
                copy.id.write_direct_chunk((k, 0, 0), chunk, mask)
            target["entry"].attrs["NX_class"] = "NXentry"
            target["entry/data"].attrs["NX_class"] = "NXdata"
            target["entry/data"].attrs["signal"] = "data"
            target.attrs["complete"] = True
        os.replace(tmp_small, small)
    info["generated_s"] = round(time.perf_counter() - start, 1)
    info.update({key: str(path) for key, path in names.items()})
    info["bslz4_mib"] = round(names["bslz4"].stat().st_size / 2**20)
    info["raw_mib"] = round(names["raw"].stat().st_size / 2**20)
    return info


# ============================================================================ runs
@dataclass
class Timed:
    """One timed command."""

    operation: str
    input: str          # "bslz4" or "raw"
    tool: str           # "azfilter" or "pyFAI-integrate"
    variant: str        # "opencl, device decode", ...
    frames: int
    wall_s: float
    cpu_s: float
    peak_mb: float

    @property
    def rate(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class Steady:
    """The command on one stack and on ``stacks`` times it (fastest fresh process each)."""

    operation: str
    input: str
    variant: str
    frames: int         # of one stack
    stacks: int
    wall_one_s: float
    wall_all_s: float

    @property
    def rate(self) -> float:
        """What each frame beyond the first stack's costs, as frames/s."""
        extra = self.wall_all_s - self.wall_one_s
        return (self.stacks - 1) * self.frames / extra if extra > 0 else float("nan")


def stack_copies(stack: Path, count: int) -> list[Path]:
    """``stack`` and ``count - 1`` hard links to it beside it (same bytes, other names:
    inputs the command reads one after the other)."""
    paths = [stack]
    for index in range(1, count):
        link = stack.with_name(f"{stack.stem}.copy{index}{stack.suffix}")
        link.unlink(missing_ok=True)
        os.link(stack, link)
        paths.append(link)
    return paths


def azfilter_argv(launcher: Any, operation: str, poni: str, npt: int, backend: str,
                  extra: list[str]) -> list[str]:
    return launcher.argv + [operation, "-p", poni, "--npt", str(npt), "--unit", UNIT,
                            "--polarization", str(POLARIZATION), "--backend", backend,
                            *AZFILTER_OPTIONS[operation], *extra, "--quiet"]


def pyfai_config(operation: str, geometry: Any, npt: int, method: str) -> dict[str, Any]:
    config = bench_cli.pyfai_config(geometry, npt, None)
    name, options = PYFAI_METHODS[operation]
    options = dict(options)
    config["error_model"] = options.pop("error_model")
    config["integrator_method"] = name
    config["extra_options"] = options
    config["method"] = ["no", "csr", method]
    return config


def output_rows(path: Path) -> Any:
    return bench_cli.azfilter_h5_result(path)[1]


# ============================================================================ profiling
def profile_child(spec: dict[str, Any]) -> None:
    """A side run: the command in-process with profiling OpenCL queues (see the module
    docstring); prints one JSON line."""
    import numpy as np
    import pyopencl as cl

    from azfilter import cli
    from azfilter.backends.opencl import bslz4 as bslz4_module
    from azfilter.frames import expand_inputs, iter_frames
    from azfilter.output import sinks
    from azfilter.resources import usable_cores

    workers = spec.get("threads") or usable_cores()
    # 1. the reader alone (what the run's readers do, nothing reduced)
    for _ in range(2):   # the first pass warms the page cache and the thread pool
        start = time.perf_counter()
        count = 0
        for frame in iter_frames(expand_inputs([spec["input"]]), workers=workers,
                                 device_decode=spec["device_decode"]):
            count += 1
            del frame
        read_s = time.perf_counter() - start
    # 2. the command with every OpenCL command timed
    events: list[tuple[str, Any, int]] = []
    lock = threading.Lock()
    profiling = cl.command_queue_properties.PROFILING_ENABLE
    command_queue = cl.CommandQueue

    def profiled_queue(context, device=None, properties=None):
        """Every queue the engine makes (transfers, one per frame slot) with profiling."""
        return command_queue(context, device, properties=(properties or 0) | profiling)
    cl.CommandQueue = profiled_queue

    def record(kind: str, event: Any, nbytes: int = 0) -> Any:
        with lock:
            events.append((kind, event, nbytes))
        return event

    enqueue_copy = cl.enqueue_copy

    def timed_copy(queue, dest, src, **kwargs):
        event = enqueue_copy(queue, dest, src, **kwargs)
        if isinstance(dest, cl.MemoryObjectHolder) and not isinstance(src, cl.MemoryObjectHolder):
            return record("upload", event, int(np.asarray(src).nbytes))
        if not isinstance(dest, cl.MemoryObjectHolder):
            return record("read back", event)
        return event
    cl.enqueue_copy = timed_copy
    enqueue_kernel = cl.enqueue_nd_range_kernel

    def timed_kernel(queue, kernel, *args, **kwargs):
        return record("reduction kernels", enqueue_kernel(queue, kernel, *args, **kwargs))
    cl.enqueue_nd_range_kernel = timed_kernel
    decode_kernel = bslz4_module.BitshuffleLZ4Decoder.enqueue_kernel

    def timed_decode(self, *args, **kwargs):
        return record("decode kernel", decode_kernel(self, *args, **kwargs))
    bslz4_module.BitshuffleLZ4Decoder.enqueue_kernel = timed_decode
    write_seconds = [0.0]
    base_write = sinks.NexusSink.write

    def timed_write(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return base_write(self, *args, **kwargs)
        finally:
            write_seconds[0] += time.perf_counter() - start
    sinks.NexusSink.write = timed_write
    start = time.perf_counter()
    status = cli.run(spec["argv"])
    wall = time.perf_counter() - start
    if status != 0:
        sys.exit(f"profile run: azfilter exited with {status}")
    totals: dict[str, float] = {}
    upload_bytes = 0
    for kind, event, nbytes in events:
        event.wait()
        totals[kind] = totals.get(kind, 0.0) + (event.profile.end - event.profile.start) * 1e-9
        upload_bytes += nbytes
    frames = spec["frames"]
    result = {"frames": frames, "read_alone_fps": count / read_s, "reader_threads": workers,
              "profiled_wall_s": wall, "write_ms": 1e3 * write_seconds[0] / frames,
              "upload_mb_per_frame": upload_bytes / frames / 1e6}
    for kind in ("upload", "decode kernel", "reduction kernels", "read back"):
        result[f"{kind} ms"] = 1e3 * totals.get(kind, 0.0) / frames
    print("PROFILE " + json.dumps(result), flush=True)


def run_profile(launcher: Any, spec: dict[str, Any], work: Path, name: str) -> dict[str, Any]:
    spec_file = work / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    log = work / f"{name}.log"
    run = run_child([sys.executable, str(Path(__file__)), "--profile-child", str(spec_file)],
                    launcher.env, work, log)
    checked(run, f"profile run {name}")
    line = next(line for line in log.read_text().splitlines() if line.startswith("PROFILE "))
    return json.loads(line[len("PROFILE "):])


def bound(profile: dict[str, Any]) -> tuple[float, str]:
    """The slowest stage (frames/s if it alone ran) and its name."""
    stages = {
        "readers": 1e3 / profile["read_alone_fps"],
        # the transfer queue uploads; each frame slot's kernel queue decodes, reduces and
        # reads back (two slots: their kernels may overlap, so this sum is a lower bound)
        "upload queue": profile["upload ms"],
        "kernels": profile["decode kernel ms"] + profile["reduction kernels ms"]
        + profile["read back ms"],
        "writer": profile["write_ms"],
    }
    name, ms = max(stages.items(), key=lambda item: item[1])
    return (1e3 / ms if ms > 0 else float("inf")), name


# ============================================================================ report
def markdown(rows: list[Timed], profiles: dict[str, dict], machine: str,
             stacks: dict[str, Any], args: argparse.Namespace,
             steady: list[Steady] | None = None) -> str:
    pyfai = {(r.operation, r.input): r for r in rows if r.tool == "pyFAI-integrate"}
    lines = [f"Machine: {machine}", "",
             f"Inputs: {args.frames} Eiger 4M uint32 frames (2167 x 2070), bitshuffle-LZ4 "
             f"({stacks['bslz4_mib']} MiB) and uncompressed ({stacks['raw_mib']} MiB), one "
             f"frame per chunk, in {args.data_dir}; pyFAI-integrate on the first "
             f"{args.pyfai_frames} ({args.pyfai_medfilt_frames} for medfilt; method "
             f"no/csr/{args.pyfai_method}). Fresh process per "
             f"run, {args.npt} bins, one .h5 output.", "",
             "| operation | input | tool | variant | frames | wall s | frames/s | "
             "× pyFAI | CPU s | peak RSS MB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = pyfai.get((r.operation, r.input))
        ratio = f"{r.rate / ref.rate:.1f}" if ref is not None and r.tool != ref.tool else ""
        lines.append(f"| {r.operation} | {r.input} | {r.tool} | {r.variant} | {r.frames} | "
                     f"{r.wall_s:.2f} | {_rate(r.rate)} | {ratio} | {r.cpu_s:.1f} | "
                     f"{r.peak_mb:.0f} |")
    if steady:
        lines += ["", f"Steady rates (fresh processes, fastest of {args.steady_repeat}; the "
                  f"stack alone and {args.steady} times it; steady = what each further frame "
                  "costs):", "",
                  "| operation | input | variant | frames | wall s | frames | wall s | "
                  "end to end f/s | steady f/s |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in steady:
            lines.append(f"| {r.operation} | {r.input} | {r.variant} | {r.frames} | "
                         f"{r.wall_one_s:.2f} | {r.frames * r.stacks} | {r.wall_all_s:.2f} | "
                         f"{_rate(r.frames * r.stacks / r.wall_all_s)} | {_rate(r.rate)} |")
    if profiles:
        lines += ["", f"Where the time goes ({args.profile_frames} frames per side run, "
                  "OpenCL profiling events; ms per frame; bound = the slowest stage alone; "
                  "measured = the timed run above):", "",
                  "| operation | input | variant | read alone f/s | upload ms (MB) | "
                  "decode ms | reduction ms | read-back ms | write ms | bound f/s (stage) | "
                  "measured f/s | % of bound |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        measured = {(r.operation, r.input, r.variant): r for r in rows}
        for key, p in profiles.items():
            operation, source, variant = key.split("|")
            limit, stage = bound(p)
            run = measured.get((operation, source, variant))
            rate = run.rate if run is not None else float("nan")
            lines.append(
                f"| {operation} | {source} | {variant} | {p['read_alone_fps']:.0f} | "
                f"{p['upload ms']:.3f} ({p['upload_mb_per_frame']:.1f}) | "
                f"{p['decode kernel ms']:.3f} | {p['reduction kernels ms']:.3f} | "
                f"{p['read back ms']:.3f} | {p['write_ms']:.3f} | {_rate(limit)} ({stage}) | "
                f"{_rate(rate)} | {100 * rate / limit:.0f} |")
    return "\n".join(lines) + "\n"


def _rate(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def machine_line(device: str | None) -> str:
    parts = [platform.node(), platform.processor() or platform.machine(),
             f"{os.cpu_count()} CPUs", f"load {os.getloadavg()[0]:.1f}"]
    try:
        from azfilter.backends.opencl import select_device

        info, _ = select_device(device)
        parts.append(f"OpenCL {info['name']} ({info['type']})")
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        parts.append(f"no OpenCL device ({err})")
    return ", ".join(parts)


# ============================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/dev/shm/azfilter-bench"),
                        help="where the stacks are generated and kept (default "
                             "/dev/shm/azfilter-bench)")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--pyfai-frames", type=int, default=200)
    parser.add_argument("--pyfai-medfilt-frames", type=int, default=20,
                        help="frames pyFAI-integrate's medfilt runs on (slow; at most "
                             "--pyfai-frames)")
    parser.add_argument("--profile-frames", type=int, default=200,
                        help="frames of each profiling side run and of the warm-up runs")
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS),
                        choices=OPERATIONS)
    parser.add_argument("--npt", type=int, default=1000)
    parser.add_argument("--device", default="gpu",
                        help="azfilter --device (default gpu; cpu for a PoCL smoke test)")
    parser.add_argument("--threads", type=int, help="azfilter --threads (default: all cores)")
    parser.add_argument("--pyfai-method", default="cython", choices=["cython", "opencl"],
                        help="pyFAI's implementation (no/csr/METHOD)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["pyfai", "cython", "raw", "profile", "host-decode"],
                        help="leave parts out")
    parser.add_argument("--install", default="auto",
                        choices=["auto", "snapshot", "installed", "editable", "source"],
                        help="how azfilter is started (bench_cli.azfilter_launcher)")
    parser.add_argument("--steady", type=int, default=0, metavar="N",
                        help="also time each OpenCL variant on N times the stack (hard links) "
                             "against the stack alone: steady frames/s")
    parser.add_argument("--steady-repeat", type=int, default=2,
                        help="fresh processes per steady timing (the fastest counts)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--profile-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_child:
        profile_child(json.loads(args.profile_child.read_text()))
        return
    args.pyfai_frames = min(args.pyfai_frames, args.frames)
    args.pyfai_medfilt_frames = min(args.pyfai_medfilt_frames, args.pyfai_frames)
    args.profile_frames = min(args.profile_frames, args.frames)
    pyfai_counts = {operation: args.pyfai_medfilt_frames if operation == "medfilt"
                    else args.pyfai_frames for operation in args.operations}
    started = time.perf_counter()
    stacks = make_stacks(args.data_dir, args.frames,
                         {args.profile_frames, *pyfai_counts.values()})
    print(f"stacks ready in {stacks['generated_s']} s: {stacks['bslz4']} "
          f"({stacks['bslz4_mib']} MiB), {stacks['raw']} ({stacks['raw_mib']} MiB)",
          flush=True)
    import azfilter

    geometry = azfilter.load_poni(stacks["poni"])
    work = Path(tempfile.mkdtemp(prefix="bench_e2e_gpu_"))
    launcher = bench_cli.azfilter_launcher(args.install, work)
    env = dict(launcher.env, AZFILTER_CACHE_DIR=str(work / "cache"))
    launcher.env = env
    extra_common = ["--device", args.device] if args.device else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    variants = [("bslz4", "opencl, device decode", "opencl", ["--decode", "device"]),
                ("bslz4", "opencl, host decode", "opencl", ["--decode", "host"]),
                ("raw", "opencl", "opencl", []),
                ("bslz4", "cython", "cython", [])]
    variants = [v for v in variants
                if not (v[0] == "raw" and "raw" in args.skip)
                and not (v[2] == "cython" and "cython" in args.skip)
                and not ("host decode" in v[1] and "host-decode" in args.skip)]
    rows: list[Timed] = []
    steady: list[Steady] = []
    profiles: dict[str, dict] = {}
    failures: list[str] = []
    copies = {source: stack_copies(Path(stacks[source]), args.steady)
              for source in ("bslz4", "raw") if args.steady > 1}
    for operation in args.operations:
        outputs: dict[str, Path] = {}
        # untimed warm-up: lookup table into the cache, OpenCL kernels compiled (the driver
        # caches them)
        warm = work / f"warm-{operation}.h5"
        checked(run_child(azfilter_argv(launcher, operation, stacks["poni"], args.npt,
                                        "opencl", extra_common + ["--decode", "device"])
                          + [stacks[f"bslz4_{args.profile_frames}"], "-o", str(warm)], env, work,
                          work / "warm.log"), f"azfilter {operation} warm-up")
        for source, variant, backend, extra in variants:
            out = work / f"{operation}-{source}-{backend}-{len(outputs)}.h5"
            argv = azfilter_argv(launcher, operation, stacks["poni"], args.npt, backend,
                                 (extra_common if backend == "opencl" else []) + extra
                                 + threads) + [stacks[source], "-o", str(out)]
            run = run_child(argv, env, work, work / f"{operation}.log")
            if run.returncode != 0:   # recorded; the other runs still go (report, exit 1)
                first_lines = " | ".join(run.stderr_tail.strip().splitlines()[:2])
                failures.append(f"{operation} {variant}: exit {run.returncode}: {first_lines}")
                print(f"  {operation:10s} {source:5s} azfilter {variant:22s} FAILED "
                      f"(exit {run.returncode})", flush=True)
                continue
            rows.append(Timed(operation, source, "azfilter", variant, args.frames, run.wall_s,
                              run.cpu_s, run.peak_mb))
            print(f"  {operation:10s} {source:5s} azfilter {variant:22s} "
                  f"{rows[-1].rate:8.1f} frames/s", flush=True)
            outputs[variant] = out
            shape = list(output_rows(out).shape)
            if shape != [args.frames, args.npt]:
                failures.append(f"{operation} {variant}: output shape {shape}")
        for source, variant, backend, extra in variants:
            if backend != "opencl" or source not in copies:
                continue
            argv = azfilter_argv(launcher, operation, stacks["poni"], args.npt, backend,
                                 extra_common + extra + threads)
            walls = []
            for inputs in ([stacks[source]], copies[source]):
                best = float("inf")
                for _ in range(args.steady_repeat):
                    run = checked(run_child(argv + ["--overwrite", *inputs,
                                                    "-o", str(work / "steady.h5")],
                                            env, work, work / "steady.log"),
                                  f"azfilter {operation} {variant} on {len(inputs)} stacks")
                    best = min(best, run.wall_s)
                walls.append(best)
            steady.append(Steady(operation, source, variant, args.frames, args.steady, *walls))
            print(f"  {operation:10s} {source:5s} azfilter {variant:22s} steady "
                  f"{steady[-1].rate:8.1f} frames/s", flush=True)
        if "opencl, device decode" in outputs and "opencl, host decode" in outputs:
            import numpy as np

            same = np.array_equal(output_rows(outputs["opencl, device decode"]),
                                  output_rows(outputs["opencl, host decode"]), equal_nan=True)
            print(f"  {operation}: device decode == host decode bit for bit: {same}",
                  flush=True)
            if not same:
                failures.append(f"{operation}: device- and host-decoded outputs differ")
        if "pyfai" not in args.skip:
            for source in ("bslz4", "raw") if "raw" not in args.skip else ("bslz4",):
                config = work / f"pyfai-{operation}.json"
                config.write_text(json.dumps(pyfai_config(operation, geometry, args.npt,
                                                          args.pyfai_method), indent=1))
                out = work / f"pyfai-{operation}-{source}.h5"
                argv = pyfai_argv() + ["--no-gui", "-j", str(config), "-o", str(out),
                                       f"{stacks[f'{source}_{pyfai_counts[operation]}']}::{H5PATH}"]
                run = checked(run_child(argv, child_environment(), work, work / "pyfai.log"),
                              f"pyFAI-integrate {operation} {source}")
                rows.append(Timed(operation, source, "pyFAI-integrate", args.pyfai_method,
                                  pyfai_counts[operation], run.wall_s, run.cpu_s, run.peak_mb))
                print(f"  {operation:10s} {source:5s} pyFAI-integrate "
                      f"{rows[-1].rate:8.1f} frames/s", flush=True)
        if "profile" not in args.skip:
            for source, variant, backend, extra in variants:
                if backend != "opencl":
                    continue
                out = work / f"profile-{operation}-{len(profiles)}.h5"
                argv = azfilter_argv(launcher, operation, stacks["poni"], args.npt, backend,
                                     extra_common + extra + threads)[len(launcher.argv):]
                subset = stacks[f"{source}_{args.profile_frames}"]
                spec = {"argv": argv + [subset, "-o", str(out)],
                        "input": subset, "frames": args.profile_frames,
                        "threads": args.threads,
                        "device_decode": "device decode" in variant}
                profiles[f"{operation}|{source}|{variant}"] = run_profile(
                    launcher, spec, work, f"profile-{len(profiles)}")
    for paths in copies.values():
        for path in paths[1:]:
            path.unlink(missing_ok=True)
    report = markdown(rows, profiles, machine_line(args.device), stacks, args, steady)
    print()
    print(report)
    print(f"total {time.perf_counter() - started:.0f} s; azfilter started as: {launcher.how}")
    if args.markdown:
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({"rows": [asdict(r) | {"frames_per_s": r.rate}
                                                  for r in rows],
                                         "steady": [asdict(r) | {"frames_per_s": r.rate}
                                                    for r in steady],
                                         "profiles": profiles, "stacks": stacks,
                                         "failures": failures}, indent=1))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work dir kept: {work}")
    if failures:
        sys.exit("bench_e2e_gpu: " + "; ".join(failures))


if __name__ == "__main__":
    main()
