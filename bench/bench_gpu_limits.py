"""What the OpenCL engine alone reaches on a GPU, with nothing of the command around it: the
limit the command's frames/s is measured against.

Frames are compressed chunks (bitshuffle-LZ4) of an HDF5 stack, read once into the engine's
page-locked memory and decoded on the device, as ``--decode device`` does; no file is read
and no output written while the clock runs. Every row is ``process_many`` over ``--frames``
frames after a warm-up of 100, timed in each process from a common start.

- ``--processes 1,2,3 --devices 0 / 1 / 0,1``: that many processes per device, each with its
  own engine (its own OpenCL context), as the command's worker processes: what sharing one
  GPU between contexts costs (a GPU time-slices between processes), and how the engines
  alone scale over several GPUs.
- ``--replicate 1,2,4,8``: a lookup table holding every bin B times, in one process: one
  launch then does the work of B frames (on the same data), which bounds what reducing B
  frames per launch could gain over one frame per launch.
- ``--workgroups 64,128,256,512`` and ``--slots 2,4,8``: the engine's work-group size and
  its frames in flight (``GPU_SLOTS``), in one process.

Usage (GPU machine; the stack is made by ``bench_e2e_gpu.make_stacks`` if absent)::

    python bench/bench_gpu_limits.py --processes 1,2,3,4
    python bench/bench_gpu_limits.py --processes 2,3 --devices "0;1;0,1"
    python bench/bench_gpu_limits.py --replicate 1,2,4,8 --operation integrate
    python bench/bench_gpu_limits.py --workgroups 64,128,256 --slots 2,4,8
    python bench/bench_gpu_limits.py --tiny    # PoCL smoke test: CPU device, few frames
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PARAMS = {"sigma_clip": {"error_model": "azimuthal", "thres": 5.0, "max_iter": 5},
          "integrate": {"error_model": "poisson"},
          "medfilt": {"error_model": "poisson", "quant_min": 0.1, "quant_max": 0.9}}
WARM_UP = 100
DISTINCT_CHUNKS = 64


def device_name(index: int, any_device: bool) -> str:
    """``P:D`` of the ``index``-th GPU (of any device with ``any_device``), counted over all
    platforms, as ``azfilter devices`` lists them."""
    import pyopencl as cl

    wanted = cl.device_type.ALL if any_device else cl.device_type.GPU
    found = [f"{p}:{d}" for p, platform in enumerate(cl.get_platforms())
             for d, device in enumerate(platform.get_devices()) if device.type & wanted]
    if index >= len(found):
        raise SystemExit(f"no device {index}: OpenCL lists {len(found)}")
    return found[index]


def replicated(table: Any, copies: int) -> Any:
    """``table`` with every bin ``copies`` times (bins 0..n-1, then 0..n-1 again...)."""
    lengths = np.diff(table.indptr)
    return types.SimpleNamespace(
        indptr=np.concatenate([[0], np.cumsum(np.tile(lengths, copies))]).astype(np.int64),
        indices=np.tile(table.indices, copies), coefs=np.tile(table.coefs, copies),
        shape=table.shape)


def frames_per_s(stack: str, poni: str, device: str, options: dict[str, Any],
                 copies: int = 1, workgroup: int | None = None, slots: int | None = None,
                 go: Any = None) -> float:
    """Frames (launches) per second of one engine over compressed chunks of ``stack``."""
    import h5py

    import azfilter.backends.opencl.engine as opencl_engine
    from azfilter.frames.chunks import CompressedChunk, bslz4_layout
    from azfilter.integrator import Integrator
    from azfilter.poni import load_poni

    if slots is not None:
        opencl_engine.GPU_SLOTS = opencl_engine.CPU_SLOTS = slots
    integrator = Integrator(load_poni(poni), npt=options["npt"], unit="q_nm^-1",
                            backend="opencl", device=device, polarization=0.99)
    dummy, delta = integrator.geometry.detector.dummy_for(np.dtype(np.uint32))
    engine = opencl_engine.OpenCLEngine(
        replicated(integrator.table("no"), copies), integrator.constants.pixel_norm,
        integrator.constants.dark, dummy, delta, device=device, workgroup_size=workgroup)
    chunks = []
    with h5py.File(stack, "r") as h5:
        dataset = h5["/entry/data/data"]
        shape, dtype = tuple(dataset.shape[1:]), dataset.dtype
        for k in range(min(DISTINCT_CHUNKS, dataset.shape[0])):
            data = np.frombuffer(dataset.id.read_direct_chunk((k, 0, 0))[1], np.uint8)
            buffer = engine.host_array(data.size, np.uint8, device=device)
            buffer[:] = data
            layout = bslz4_layout(buffer, int(np.prod(shape)), dtype.itemsize)
            chunks.append(CompressedChunk(buffer, data.size, layout, shape, dtype))
    operation = options["operation"]

    def stream(count: int) -> int:
        tagged = ((k, chunks[k % len(chunks)]) for k in range(count))
        failed = sum(isinstance(sums, Exception)
                     for _, sums in engine.process_many(tagged, operation, PARAMS[operation]))
        if failed:
            raise RuntimeError(f"{failed} frames failed")
        return count

    stream(WARM_UP)
    if go is not None:
        go.wait()
    start = time.perf_counter()
    count = stream(options["frames"])
    return count / (time.perf_counter() - start)


def _process(stack: str, poni: str, gpu: int, options: dict[str, Any], go: Any,
             results: Any) -> None:
    try:
        device = device_name(gpu, options["any_device"])
        results.put(frames_per_s(stack, poni, device, options, go=go))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        results.put(f"device {gpu}: {type(err).__name__}: {err}")


def processes_row(stack: str, poni: str, gpus: list[int], per_device: int,
                  options: dict[str, Any]) -> str:
    """Frames/s of ``per_device`` engine processes on each of ``gpus``, all at once."""
    context = multiprocessing.get_context("fork")   # before any OpenCL in this process
    go, results = context.Event(), context.Queue()
    workers = [context.Process(target=_process, args=(stack, poni, gpu, options, go, results))
               for _ in range(per_device) for gpu in gpus]
    for worker in workers:
        worker.start()
    # every engine made and warmed up (a fresh table build can take longer: then the
    # processes' timed streams overlap less and the total reads low)
    time.sleep(options["settle_s"])
    go.set()
    rates = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    errors = [rate for rate in rates if isinstance(rate, str)]
    if errors:
        raise SystemExit("; ".join(errors))
    return (f"| {options['operation']} | {per_device} per device | {','.join(map(str, gpus))} "
            f"| {sum(rates):.0f} | {min(rates):.0f}-{max(rates):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--operation", choices=sorted(PARAMS), default="sigma_clip")
    parser.add_argument("--frames", type=int, default=3000, help="timed frames per engine")
    parser.add_argument("--npt", type=int, default=1000)
    parser.add_argument("--processes", help="processes per device, e.g. 1,2,3")
    parser.add_argument("--devices", default="0",
                        help="GPU sets for --processes, ';'-separated, e.g. '0;1;0,1'")
    parser.add_argument("--replicate", help="table copies, e.g. 1,2,4,8")
    parser.add_argument("--workgroups", help="work-group sizes, e.g. 64,128,256")
    parser.add_argument("--slots", help="frames in flight, e.g. 2,4,8")
    parser.add_argument("--stack", help="bitshuffle-LZ4 stack (default: made in --data)")
    parser.add_argument("--data", default="/dev/shm/azf", help="where the stack is made")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds the processes get to start before the clock")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke test on any OpenCL device (PoCL): 8 frames, 100 bins")
    args = parser.parse_args()
    options = {"operation": args.operation, "frames": args.frames, "npt": args.npt,
               "any_device": args.tiny, "settle_s": args.settle}
    if args.tiny:
        global WARM_UP
        WARM_UP = 2
        options.update(frames=8, npt=100, settle_s=3.0)

    from bench.bench_e2e_gpu import make_stacks

    made = make_stacks(Path(args.data), 100, set())
    stack = args.stack or made["bslz4"]
    poni = made["poni"]
    if args.processes:
        print("| operation | processes | GPUs | frames/s in all | each |\n|---|---|---|---:|---:|")
        for per_device in (int(n) for n in args.processes.split(",")):
            for gpus in args.devices.split(";"):
                print(processes_row(stack, poni, [int(g) for g in gpus.split(",")],
                                    per_device, options), flush=True)
    in_process = [("copies", args.replicate), ("workgroup", args.workgroups),
                  ("slots", args.slots)]
    if any(values for _, values in in_process):
        # in a child process: the parent has forked its engine processes without OpenCL
        context = multiprocessing.get_context("fork")
        child = context.Process(target=_in_process, args=(stack, poni, options, in_process))
        child.start()
        child.join()


def _in_process(stack: str, poni: str, options: dict[str, Any],
                variants: list[tuple[str, str | None]]) -> None:
    device = device_name(0, options["any_device"])
    print("| operation | variant | launches/s | frames/s (launches × copies) |\n"
          "|---|---|---:|---:|")
    for name, values in variants:
        for value in (int(v) for v in (values or "").split(",") if v):
            copies = value if name == "copies" else 1
            frames = max(1, options["frames"] // copies)
            rate = frames_per_s(stack, poni, device, {**options, "frames": frames},
                                copies=copies,
                                workgroup=value if name == "workgroup" else None,
                                slots=value if name == "slots" else None)
            print(f"| {options['operation']} | {name} {value} | {rate:.0f} "
                  f"| {rate * copies:.0f} |", flush=True)


if __name__ == "__main__":
    main()
