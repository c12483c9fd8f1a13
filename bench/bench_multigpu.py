"""Several GPUs in one node: frames/s on 1, 2 (, 4...) devices, engine and command.

Two measurements per device set (``--device 0:0``, ``0:0,0:1``, ``0:0,0:1,0:2,0:3``...):

- **engine**: ``process_many`` of the OpenCL engine (one device) or of the
  :class:`~azfilter.backends.opencl.multi.MultiDeviceEngine` (several), in-process, over
  ``--frames`` Eiger 4M uint32 frames held in memory. ``pinned``: the frames lie in the
  engines' page-locked buffers (``host_buffers``: on several devices, spread over the devices
  as the command's readers spread them); ``pageable``: ordinary numpy arrays, which each
  engine copies into its staging buffers. The lookup table is built once and shared;
  compilation and a warm-up stream are not timed.
- **command**: ``azfilter sigma-clip --backend opencl --device SET stack.h5 -o out.h5`` as a
  fresh process, over an HDF5 stack of the same frames (one frame per chunk; uncompressed, or
  bitshuffle-LZ4 with ``--compression bslz4``, decoded as ``--decode auto`` chooses: on the
  GPUs) in ``--stack`` (default ``/dev/shm``, written once and reused), with a warm
  lookup-table cache.
  Wall time of the whole process (start-up included); the outputs of every set are checked
  to be identical to the one-device output.

The table is markdown with the scaling ratio to one device. Without GPUs (PoCL on a laptop)
the sets are the CPU device once and twice, which checks the script, not the scaling.

Usage::

    python bench/bench_multigpu.py                       # every GPU: 1, 2, 4, 8 of them
    python bench/bench_multigpu.py --sets "0:0;0:0,0:1"  # chosen sets
    python bench/bench_multigpu.py --tiny                # small frames (PoCL smoke test)
    python bench/bench_multigpu.py --compression bslz4   # the command on a bitshuffle-LZ4 stack
    python bench/bench_multigpu.py --operation integrate --frames 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

H5PATH = "/entry/data/data"
STACK_VERSION = 1
DISTINCT_FRAMES = 4
#: per operation: engine parameters, and the command's own options for the same reduction
OPERATIONS = {
    "sigma_clip": ({"thres": 5.0, "max_iter": 5, "error_model": "azimuthal"},
                   ["sigma-clip", "--thres", "5", "--max-iter", "5", "--error-model",
                    "azimuthal"]),
    "integrate": ({"error_model": "poisson"}, ["integrate", "--error-model", "poisson"]),
    "medfilt": ({"quant_min": 0.1, "quant_max": 0.9, "error_model": "poisson"},
                ["medfilt", "--percentile", "10", "90", "--split", "full"]),
}


@dataclass
class Row:
    """One measurement."""

    path: str           # "engine pinned", "engine pageable", "command"
    devices: str
    n_devices: int
    frames: int
    seconds: float
    frames_per_s: float
    ratio: float | None = None   # frames/s over the first set's row of the same path
    spread: str = ""             # frames per device (engine) or "identical" (command)


# ----------------------------------------------------------------------------- inputs
def device_sets(spec: str | None) -> tuple[list[str], str]:
    """The device sets to time and a note on what they are."""
    from azfilter.backends.opencl import list_devices

    if spec:
        return [item.strip() for item in spec.split(";") if item.strip()], "as given"
    found = list_devices()
    gpus = [info["id"] for info in found if info["type"] == "GPU"]
    if gpus:
        counts = [n for n in (1, 2, 4, 8) if n <= len(gpus)]
        if len(gpus) not in counts:
            counts.append(len(gpus))
        names = sorted({info["name"] for info in found if info["type"] == "GPU"})
        return [",".join(gpus[:n]) for n in counts], f"{len(gpus)} GPU(s): {', '.join(names)}"
    if not found:
        sys.exit("bench_multigpu: no OpenCL device")
    first = found[0]["id"]
    return [first, f"{first},{first}"], (f"no GPU: {found[0]['name']} once and twice (checks "
                                          "the script; no scaling to expect)")


def make_frames(detector: str) -> tuple[Any, list[np.ndarray]]:
    """The geometry and DISTINCT_FRAMES synthetic uint32 frames of ``detector``."""
    from tests.synthetic import default_geometry, synthetic_case

    geometry = default_geometry(detector)
    frames = []
    for seed in range(DISTINCT_FRAMES):
        raw = synthetic_case(geometry=geometry, seed=seed).raw
        frames.append(raw.astype(np.uint32) if raw.dtype != np.uint32 else raw)
    return geometry, frames


def write_stack(path: Path, frames: list[np.ndarray], n_frames: int,
                compression: str = "none") -> float:
    """An HDF5 stack of ``n_frames`` (the distinct frames cycled), one frame per chunk,
    uncompressed or bitshuffle-LZ4 (``compression="bslz4"``, needs hdf5plugin); reused when
    it is there already. Returns the seconds spent writing (0: reused)."""
    import h5py

    filters: dict[str, Any] = {}
    if compression == "bslz4":
        try:
            import hdf5plugin
        except ImportError:
            sys.exit("bench_multigpu: --compression bslz4 needs hdf5plugin")
        filters = dict(hdf5plugin.Bitshuffle(cname="lz4"))
    tag = f"v{STACK_VERSION} {frames[0].shape} {n_frames} {compression}"
    if path.exists():
        try:
            with h5py.File(path, "r") as h5:
                if h5.attrs.get("bench_multigpu") == tag:
                    return 0.0
        except OSError:
            pass
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        dset = h5.create_dataset(H5PATH, shape=(n_frames, *frames[0].shape), dtype=np.uint32,
                                 chunks=(1, *frames[0].shape), **filters)
        h5["entry"].attrs["NX_class"] = "NXentry"
        h5["entry/data"].attrs["NX_class"] = "NXdata"
        h5["entry/data"].attrs["signal"] = "data"
        for k in range(n_frames):
            dset[k] = frames[k % len(frames)]
        h5.attrs["bench_multigpu"] = tag
    os.replace(tmp, path)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- engine
def time_engine(engine: Any, frames: list[np.ndarray], n_frames: int, operation: str,
                params: dict, pinned: bool) -> tuple[float, list[int]]:
    """Seconds to stream ``n_frames`` through ``engine.process_many`` (after a warm-up), and
    the frames each device reduced."""
    n_devices = len(getattr(engine, "engines", [engine]))
    if pinned:
        ring = engine.host_buffers(DISTINCT_FRAMES * n_devices)
        sources = []
        for k in range(DISTINCT_FRAMES * n_devices):
            buffer = ring.take(frames[0].shape, frames[0].dtype)
            if buffer is None:
                raise RuntimeError("no page-locked buffer")
            buffer[...] = frames[k % len(frames)]
            sources.append(buffer)
    else:
        sources = [frame.copy() for frame in frames]
    stream = ((k, sources[k % len(sources)]) for k in range(n_frames))
    for _, sums in engine.process_many(((k, sources[k % len(sources)])
                                        for k in range(2 * n_devices)), operation, params):
        if isinstance(sums, Exception):
            raise sums
    before = list(getattr(engine, "frame_counts", [0]))
    start = time.perf_counter()
    count = 0
    for _, sums in engine.process_many(stream, operation, params):
        if isinstance(sums, Exception):
            raise sums
        count += 1
    seconds = time.perf_counter() - start
    assert count == n_frames
    after = list(getattr(engine, "frame_counts", [n_frames]))
    return seconds, [b - a for a, b in zip(before, after, strict=True)]


def engine_rows(sets: list[str], geometry: Any, frames: list[np.ndarray], n_frames: int,
                operation: str, npt: int, memories: list[str]) -> list[Row]:
    from azfilter.backends.opencl.multi import open_engine
    from azfilter.integrator import Integrator

    params = OPERATIONS[operation][0]
    split = "full" if operation == "medfilt" else "no"
    integrator = Integrator(geometry, npt=npt, backend="python", polarization=0.99)
    table = integrator.table(split)
    constants = integrator.constants
    dummy, delta = geometry.detector.dummy_for(np.dtype(np.uint32))
    rows = []
    for spec in sets:
        engine = open_engine(table, constants.pixel_norm, constants.dark, dummy, delta,
                             device=spec)
        n_devices = len(getattr(engine, "engines", [engine]))
        for memory in memories:
            seconds, spread = time_engine(engine, frames, n_frames, operation, params,
                                          memory == "pinned")
            rows.append(Row(f"engine {memory}", spec, n_devices, n_frames, seconds,
                            n_frames / seconds, spread="/".join(map(str, spread))))
            print(f"  engine {memory:8s} {spec:24s} {n_frames / seconds:9.1f} frames/s",
                  flush=True)
        del engine
    return rows


# ----------------------------------------------------------------------------- command
def command_rows(sets: list[str], stack: Path, poni: Path, n_frames: int, operation: str,
                 npt: int, work: Path) -> list[Row]:
    import h5py

    env = dict(os.environ, AZFILTER_CACHE_DIR=str(work / "cache"))
    base = [sys.executable, "-m", "azfilter", *OPERATIONS[operation][1], "-p", str(poni),
            "--npt", str(npt), "--polarization", "0.99", "--backend", "opencl", str(stack),
            "--overwrite", "-q"]

    def run(spec: str, output: Path) -> float:
        start = time.perf_counter()
        proc = subprocess.run([*base, "--device", spec, "-o", str(output)], env=env,
                              capture_output=True, text=True, cwd=work)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"bench_multigpu: azfilter --device {spec} failed "
                     f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return seconds

    def intensities(output: Path) -> np.ndarray:
        with h5py.File(output, "r") as h5:
            found: list[str] = []
            h5.visititems(lambda name, obj: found.append(name) if isinstance(
                obj, h5py.Dataset) and name.endswith("/I") else None)
            return h5[found[0]][()]

    # warm-up: the lookup table into the cache, the kernels into the driver's cache
    run(sets[0], work / "warmup.h5")
    rows, reference = [], None
    for k, spec in enumerate(sets):
        output = work / f"out{k}.h5"
        seconds = run(spec, output)
        values = intensities(output)
        if values.shape[0] != n_frames:
            sys.exit(f"bench_multigpu: {output} has {values.shape[0]} rows, not {n_frames}")
        if reference is None:
            reference = values
        same = np.array_equal(values, reference, equal_nan=True)
        rows.append(Row("command", spec, len(spec.split(",")), n_frames, seconds,
                        n_frames / seconds, spread="identical" if same else "DIFFERENT"))
        print(f"  command         {spec:24s} {n_frames / seconds:9.1f} frames/s "
              f"(output {'identical to' if same else 'DIFFERS from'} one device)", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def with_ratios(rows: list[Row]) -> list[Row]:
    for row in rows:
        base = next((other for other in rows if other.path == row.path), None)
        if base is not None:
            row.ratio = row.frames_per_s / base.frames_per_s
    return rows


def markdown(rows: list[Row], operation: str, detector: str, note: str) -> str:
    lines = [f"{operation}, {detector} uint32 frames; devices: {note}", "",
             "| path | --device | devices | frames | seconds | frames/s | vs 1st set | "
             "frames per device / output |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        lines.append(f"| {row.path} | `{row.devices}` | {row.n_devices} | {row.frames} | "
                     f"{row.seconds:.2f} | {row.frames_per_s:.1f} | {ratio} | {row.spread} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", help="device sets separated by ';' (e.g. '0:0;0:0,0:1') "
                        "[default: 1, 2, 4, 8... of the GPUs]")
    parser.add_argument("--operation", choices=list(OPERATIONS), default="sigma_clip")
    parser.add_argument("--frames", type=int, default=None,
                        help="frames per measurement [default 400; 24 with --tiny]")
    parser.add_argument("--npt", type=int, default=1000, help="radial bins")
    parser.add_argument("--detector", default="Eiger4M", help="synthetic detector")
    parser.add_argument("--tiny", action="store_true",
                        help="Pilatus 300K frames, 24 of them: a quick check on PoCL")
    parser.add_argument("--memory", nargs="+", choices=["pinned", "pageable"],
                        default=["pinned", "pageable"], help="engine inputs to time")
    parser.add_argument("--stack", type=Path, default=None,
                        help="uncompressed HDF5 stack (written if missing) [default: "
                             "/dev/shm/azfilter_bench_multigpu_<detector>.h5]")
    parser.add_argument("--compression", choices=["none", "bslz4"], default="none",
                        help="the command's stack: uncompressed or bitshuffle-LZ4")
    parser.add_argument("--no-command", action="store_true", help="engine only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    detector = "Pilatus300k" if args.tiny else args.detector
    n_frames = args.frames or (24 if args.tiny else 400)

    from azfilter.poni import save_poni

    started = time.perf_counter()
    sets, note = device_sets(args.sets)
    print(f"bench_multigpu: {args.operation}, {n_frames} {detector} frames, sets {sets}; "
          f"{note}; {platform.node()}, {os.cpu_count()} cores", flush=True)
    geometry, frames = make_frames(detector)
    rows = with_ratios(engine_rows(sets, geometry, frames, n_frames, args.operation, args.npt,
                                   args.memory))
    if not args.no_command:
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        stack = args.stack or shm / f"azfilter_bench_multigpu_{detector}_{args.compression}.h5"
        written = write_stack(stack, frames, n_frames, args.compression)
        how = f"written in {written:.1f} s" if written else "reused"
        print(f"  stack {stack} ({how})", flush=True)
        with tempfile.TemporaryDirectory(prefix="azfilter-bench-multigpu-") as tmp:
            work = Path(tmp)
            poni = work / "geometry.poni"
            save_poni(geometry, str(poni))
            rows += with_ratios(command_rows(sets, stack, poni, n_frames, args.operation,
                                             args.npt, work))
    print()
    if not args.no_command:
        note += f"; command stack: {args.compression}"
    print(markdown(rows, args.operation, detector, note))
    print(f"\n(bench_multigpu: {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps({"operation": args.operation, "detector": detector,
                                         "devices": note, "rows": [asdict(r) for r in rows]},
                                        indent=2))


if __name__ == "__main__":
    main()
