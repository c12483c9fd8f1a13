"""The OpenCL engine alone: frames per second of ``process_many`` over compressed chunks.

Reads the first ``--chunks`` bitshuffle-LZ4 chunks of an Eiger stack into page-locked memory
(as the command's readers do), then streams them ``--frames`` times through the engine's
``process_many`` for each operation and each number of frames in flight (``--slots``),
and prints frames/s and the CPU time of the thread that feeds the engine per frame (which
includes the driver's busy waits). No file reading, no writing: what the device and the
engine's submission cost, the ceiling of the command on that machine.

Two more questions it answers:

- ``--processes 1 2 3 --device-sets "0:0;0:1;0:0,0:1"``: that many processes per device,
  each with its own engine (its own OpenCL context), as the command's worker processes, all
  timed from one start: what sharing a GPU between contexts costs (a GPU time-slices
  between processes) and how the engines alone scale over several GPUs. Devices are
  ``P:D`` as ``azfilter devices`` lists them.
- ``--replicate 1 2 4 8``: a lookup table holding every bin B times, so that one launch does
  the work of B frames (on the same data): what reducing B frames per launch could gain over
  one frame per launch. Rates are frames of work per second (launches/s × B).

Usage (GPU machine, a stack from ``bench_e2e_gpu.py``)::

    python3 bench/bench_opencl_stream.py /dev/shm/azf/eiger4m_bslz4_1000f_v2.h5 \\
        /dev/shm/azf/eiger4m.poni --slots 2 4 6
    python3 bench/bench_opencl_stream.py STACK PONI --variants   # sigma-clip's parts
    python3 bench/bench_opencl_stream.py STACK PONI --operations sigma_clip \\
        --processes 1 2 3 --device-sets "0:0;0:1;0:0,0:1"
    python3 bench/bench_opencl_stream.py STACK PONI --replicate 1 2 4 8
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import types
from typing import Any

import h5py
import numpy as np

from azfilter.backends.opencl import engine as engine_module
from azfilter.frames.chunks import CompressedChunk, bslz4_layout
from azfilter.integrator import Integrator
from azfilter.poni import load_poni

OPERATIONS = {
    "sigma_clip": {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal", "pick": 3.0},
    "integrate": {"error_model": "poisson"},
    "medfilt": {"quant_min": 0.4, "quant_max": 0.6, "error_model": "azimuthal", "pick": 3.0},
}
#: --variants: what each part of sigma-clip's kernel costs (iterations, error model,
#: statistics), against integrate's decode-and-one-pass
VARIANTS = [
    ("integrate", {"error_model": "poisson"}),
    ("integrate", {"error_model": "azimuthal"}),
    ("sigma_clip", {"thres": 5.0, "max_iter": 0, "error_model": "azimuthal", "pick": 3.0}),
    ("sigma_clip", {"thres": 5.0, "max_iter": 1, "error_model": "azimuthal", "pick": 3.0}),
    ("sigma_clip", {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal", "pick": 3.0}),
    ("sigma_clip", {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal"}),
    ("sigma_clip", {"thres": 5.0, "max_iter": 5, "error_model": "poisson", "pick": 3.0}),
    ("medfilt", {"quant_min": 0.4, "quant_max": 0.6, "error_model": "azimuthal", "pick": 3.0}),
]


def stream_rate(engine, chunks: list, operation: str, params: dict,
                frames: int) -> tuple[float, float]:
    """(frames/s, CPU ms per frame of this thread) of ``frames`` chunks through the engine."""
    stream = ((k, chunks[k % len(chunks)]) for k in range(frames))
    start, cpu = time.perf_counter(), time.thread_time()
    done = sum(1 for _ in engine.process_many(stream, operation, params))
    return done / (time.perf_counter() - start), 1e3 * (time.thread_time() - cpu) / done


def replicated(table: Any, copies: int) -> Any:
    """``table`` with every bin ``copies`` times (bins 0..n-1, then 0..n-1 again...)."""
    lengths = np.diff(table.indptr)
    return types.SimpleNamespace(
        indptr=np.concatenate([[0], np.cumsum(np.tile(lengths, copies))]).astype(np.int64),
        indices=np.tile(table.indices, copies), coefs=np.tile(table.coefs, copies),
        shape=table.shape)


def engine_and_chunks(args: argparse.Namespace, device: str, copies: int = 1) -> tuple:
    """An engine on ``device`` (its table ``copies`` times over) and the stack's first
    ``--chunks`` chunks in its page-locked memory."""
    integrator = Integrator(load_poni(args.poni), npt=args.npt, backend="opencl",
                            device=device, polarization=0.99)
    with h5py.File(args.stack, "r") as h5:
        dataset = h5[args.dataset]
        shape = dataset.shape[1:]
        if copies == 1:
            engine = integrator.engine("no", dataset.dtype)
        else:
            dummy, delta = integrator.geometry.detector.dummy_for(dataset.dtype)
            engine = engine_module.OpenCLEngine(
                replicated(integrator.table("no"), copies), integrator.constants.pixel_norm,
                integrator.constants.dark, dummy, delta, device=device)
        chunks = []
        for index in range(min(args.chunks, dataset.shape[0])):
            _, raw = dataset.id.read_direct_chunk((index, 0, 0))
            buffer = engine.pinned_array(len(raw), np.uint8)
            buffer[:] = np.frombuffer(raw, np.uint8)
            layout = bslz4_layout(buffer, int(np.prod(shape)), dataset.dtype.itemsize)
            chunks.append(CompressedChunk(buffer, len(raw), layout, shape, dataset.dtype))
    return engine, chunks


def _one_process(args: argparse.Namespace, device: str, operation: str, go: Any,
                 results: Any) -> None:
    """A process of ``--processes``: its engine's frames/s from the common start."""
    try:
        engine, chunks = engine_and_chunks(args, device)
        params = OPERATIONS[operation]
        stream_rate(engine, chunks, operation, params, 100)   # programs built
        go.wait()
        results.put(stream_rate(engine, chunks, operation, params, args.frames)[0])
    except Exception as err:  # noqa: BLE001 - reported by the parent
        results.put(f"{device}: {type(err).__name__}: {err}")


def processes(args: argparse.Namespace) -> None:
    """One line per (operation, processes per device, device set): frames/s of all."""
    context = multiprocessing.get_context("fork")   # this process never starts OpenCL
    for operation in args.operations:
        for per_device in args.processes:
            for devices in args.device_sets.split(";"):
                go, results = context.Event(), context.Queue()
                workers = [context.Process(target=_one_process,
                                           args=(args, device, operation, go, results))
                           for _ in range(per_device) for device in devices.split(",")]
                for worker in workers:
                    worker.start()
                # every engine made and warmed up before the clock (a process still
                # building its table when the others run would make the total read low)
                time.sleep(args.settle)
                go.set()
                rates = [results.get() for _ in workers]
                for worker in workers:
                    worker.join()
                errors = [rate for rate in rates if isinstance(rate, str)]
                if errors:
                    raise SystemExit("; ".join(errors))
                print(f"{operation}, {per_device} processes on each of {devices}: "
                      f"{sum(rates):.0f} frames/s in all ({min(rates):.0f}-{max(rates):.0f} "
                      "each)", flush=True)


def main() -> None:
    """Parse the arguments, run, print one line per (slots, operation)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack", help="HDF5 file with /entry/data/data, bitshuffle-LZ4")
    parser.add_argument("poni")
    parser.add_argument("--dataset", default="/entry/data/data")
    parser.add_argument("--chunks", type=int, default=64, help="distinct frames kept")
    parser.add_argument("--frames", type=int, default=1000, help="frames streamed per run")
    parser.add_argument("--slots", type=int, nargs="+", default=[engine_module.GPU_SLOTS])
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--npt", type=int, default=1000)
    parser.add_argument("--operations", nargs="+", choices=list(OPERATIONS),
                        default=list(OPERATIONS))
    parser.add_argument("--variants", action="store_true",
                        help="instead of --operations: the parameter variants of VARIANTS "
                             "(ms per frame of each)")
    parser.add_argument("--workgroup-size", type=int,
                        help="the engine's work-group size (default: the engine's for the "
                             "device type)")
    parser.add_argument("--processes", type=int, nargs="+",
                        help="processes per device, each with its own engine, timed at once")
    parser.add_argument("--device-sets", default="0:0",
                        help="with --processes: ';'-separated sets of P:D devices")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="with --processes: seconds the processes get to set up")
    parser.add_argument("--replicate", type=int, nargs="+",
                        help="table copies B: one launch does B frames' work")
    args = parser.parse_args()
    if args.workgroup_size:
        engine_module._DEFAULT_GPU_WORKGROUP = engine_module._DEFAULT_CPU_WORKGROUP = \
            args.workgroup_size
    if args.processes:
        processes(args)
        return
    for slots in args.slots:
        engine_module.GPU_SLOTS = engine_module.CPU_SLOTS = slots
        for copies in args.replicate or [1]:
            engine, chunks = engine_and_chunks(args, args.device, copies)
            runs = VARIANTS if args.variants else [(operation, OPERATIONS[operation])
                                                   for operation in args.operations]
            for operation, params in runs:
                stream_rate(engine, chunks, operation, params, 100)   # programs built
                rate, cpu = stream_rate(engine, chunks, operation, params,
                                        max(1, args.frames // copies))
                if args.variants:
                    operation = f"{operation} {params}"
                table = f" table x{copies}" if args.replicate else ""
                print(f"slots {slots} work-group {engine.workgroup_size}{table} {operation}: "
                      f"{rate * copies:.0f} frames/s ({1e3 / rate:.3f} ms/launch), feeding "
                      f"thread CPU {cpu:.3f} ms/launch", flush=True)


if __name__ == "__main__":
    main()
