"""The OpenCL engine alone: frames per second of ``process_many`` over compressed chunks.

Reads the first ``--chunks`` bitshuffle-LZ4 chunks of an Eiger stack into page-locked memory
(as the command's readers do), then streams them ``--frames`` times through the engine's
``process_many`` for each operation and each number of frames in flight (``--slots``),
and prints frames/s and the CPU time of the thread that feeds the engine per frame (which
includes the driver's busy waits). No file reading, no writing: what the device and the
engine's submission cost, the ceiling of the command on that machine.

Usage (GPU machine, a stack from ``bench_e2e_gpu.py``)::

    python3 bench/bench_opencl_stream.py /dev/shm/azf/eiger4m_bslz4_1000f_v2.h5 \\
        /dev/shm/azf/eiger4m.poni --slots 2 4 6
    python3 bench/bench_opencl_stream.py STACK PONI --variants   # sigma-clip's parts
"""

from __future__ import annotations

import argparse
import time

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
    args = parser.parse_args()
    if args.workgroup_size:
        engine_module._DEFAULT_GPU_WORKGROUP = engine_module._DEFAULT_CPU_WORKGROUP = \
            args.workgroup_size
    geometry = load_poni(args.poni)
    for slots in args.slots:
        engine_module.GPU_SLOTS = engine_module.CPU_SLOTS = slots
        integrator = Integrator(geometry, npt=args.npt, backend="opencl", device=args.device,
                                polarization=0.99)
        with h5py.File(args.stack, "r") as h5:
            dataset = h5[args.dataset]
            shape = dataset.shape[1:]
            engine = integrator.engine("no", dataset.dtype)
            chunks = []
            for index in range(min(args.chunks, dataset.shape[0])):
                _, raw = dataset.id.read_direct_chunk((index, 0, 0))
                buffer = engine.pinned_array(len(raw), np.uint8)
                buffer[:] = np.frombuffer(raw, np.uint8)
                layout = bslz4_layout(buffer, int(np.prod(shape)), dataset.dtype.itemsize)
                chunks.append(CompressedChunk(buffer, len(raw), layout, shape, dataset.dtype))
        runs = VARIANTS if args.variants else [(operation, OPERATIONS[operation])
                                               for operation in args.operations]
        for operation, params in runs:
            stream_rate(engine, chunks, operation, params, 100)   # programs built
            rate, cpu = stream_rate(engine, chunks, operation, params, args.frames)
            if args.variants:
                operation = f"{operation} {params}"
            print(f"slots {slots} work-group {engine.workgroup_size} {operation}: "
                  f"{rate:.0f} frames/s ({1e3 / rate:.3f} ms/frame), feeding thread CPU "
                  f"{cpu:.3f} ms/frame", flush=True)


if __name__ == "__main__":
    main()
