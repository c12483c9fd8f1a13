"""The host's data path alone: how many compressed frames/s the machine moves from the page
cache to its GPUs, with nothing computed.

Each of ``--processes`` processes per device (forked before any of them starts OpenCL) reads
whole chunks of an HDF5 stack chunked one frame per chunk (``os.preadv`` at the offsets of
``get_chunk_info``, as azfilter's readers do) into one of four page-locked buffers and
uploads it to its GPU (``--mode upload``), or only reads them into ordinary memory
(``--mode read``). ``--mode launch`` adds, per frame, ``--launches`` launches of a kernel that
does almost nothing and a read back of ``--readback`` bytes into page-locked memory, as an
engine's per-frame kernels and sums do: what the driver costs per frame, without the work.
It also times memcpy bandwidth with 1-16 threads (``--memcpy``).

What it is for: if this moves several times the frames/s the command reaches on the same
GPUs, neither the host's memory nor its PCIe path is what bounds the command (README,
"Several GPUs").

Usage (GPU machine)::

    python bench/bench_host_path.py STACK.h5 --devices 0 --processes 3
    python bench/bench_host_path.py STACK.h5 --devices 0,1 --processes 3 --frames 1500
    python bench/bench_host_path.py STACK.h5 --mode read --processes 8 --memcpy
    python bench/bench_host_path.py STACK.h5 --mode launch --launches 6 --devices 0,1
    python bench/bench_host_path.py STACK.h5 --mode launch --any-device --frames 20  # PoCL
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import threading
import time
from typing import Any

import numpy as np

SLOTS = 4   # page-locked buffers per process, uploads in flight
#: the kernel of ``--mode launch``: 64 work-items each read one word of the frame
NEARLY_NOTHING = """
__kernel void nearly_nothing(__global const uint *frame, const uint words,
                             __global uint *out) {
    size_t i = get_global_id(0);
    out[i] = frame[(i * 4099u) % words] + (uint) i;
}
"""


def chunk_extents(path: str, dataset: str) -> list[tuple[int, int]]:
    """(byte offset, size) of every chunk of ``dataset`` in ``path``."""
    import h5py

    with h5py.File(path, "r") as h5:
        store = h5[dataset].id
        return [(info.byte_offset, info.size)
                for info in (store.get_chunk_info(k) for k in range(store.get_num_chunks()))]


def _mover(path: str, extents: list[tuple[int, int]], options: dict[str, Any], device: int,
           seed: int, go: Any, results: Any) -> None:
    """One process: read (and upload...) ``options["frames"]`` chunks, starting at a
    different one each; puts its seconds on ``results``, or the text of what stopped it."""
    try:
        results.put(_move_chunks(path, extents, options, device, seed, go))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        results.put(f"device {device}: {type(err).__name__}: {err}")


def _move_chunks(path: str, extents: list[tuple[int, int]], options: dict[str, Any],
                 device: int, seed: int, go: Any) -> float:
    mode = options["mode"]
    largest = max(size for _, size in extents)
    fd = os.open(path, os.O_RDONLY)
    events: list[Any] = [None] * SLOTS
    if mode != "read":
        import pyopencl as cl

        wanted = cl.device_type.ALL if options["any_device"] else cl.device_type.GPU
        found = [d for p in cl.get_platforms() for d in p.get_devices() if d.type & wanted]
        if device >= len(found):
            raise RuntimeError(f"no device {device}: OpenCL lists {len(found)}")
        context = cl.Context([found[device]])
        queue = cl.CommandQueue(context)

        def pinned(nbytes: int) -> np.ndarray:
            buffer = cl.Buffer(context, cl.mem_flags.ALLOC_HOST_PTR, nbytes)
            array, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.WRITE, 0, (nbytes,),
                                             np.uint8)
            array[:] = 1   # touched before the clock starts
            return array

        hosts = [pinned(largest) for _ in range(SLOTS)]
        targets = [cl.Buffer(context, cl.mem_flags.READ_WRITE, largest) for _ in range(SLOTS)]
        readback = max(256, options["readback"])
        backs = [pinned(readback) for _ in range(SLOTS)]
        outs = [cl.Buffer(context, cl.mem_flags.READ_WRITE, readback) for _ in range(SLOTS)]
        kernel = cl.Program(context, NEARLY_NOTHING).build().nearly_nothing
    else:
        hosts = [np.ones(largest, np.uint8) for _ in range(SLOTS)]
    go.wait()
    start = time.perf_counter()
    for k in range(options["frames"]):
        offset, size = extents[(seed * 7919 + k) % len(extents)]
        slot = k % SLOTS
        if events[slot] is not None:
            events[slot].wait()
        os.preadv(fd, [memoryview(hosts[slot])[:size]], offset)
        if mode == "read":
            continue
        events[slot] = cl.enqueue_copy(queue, targets[slot], memoryview(hosts[slot])[:size],
                                       is_blocking=False)
        if mode == "launch":
            for _ in range(options["launches"]):
                kernel(queue, (64,), None, targets[slot], np.uint32(max(1, size // 4)),
                       outs[slot])
            events[slot] = cl.enqueue_copy(queue, backs[slot], outs[slot], is_blocking=False)
    if mode != "read":
        queue.finish()
    os.close(fd)
    return time.perf_counter() - start


def move(path: str, dataset: str, devices: list[int], processes: int,
         options: dict[str, Any]) -> dict[str, float]:
    """Frames/s and GB/s of ``processes`` processes per device, ``options["frames"]`` chunks
    each (``options``: mode, frames, launches, readback, any_device)."""
    extents = chunk_extents(path, dataset)
    context = multiprocessing.get_context("fork")
    go, results = context.Event(), context.Queue()
    workers = [context.Process(target=_mover, args=(path, extents, options, device,
                                                    index * 10 + device, go, results))
               for index in range(processes) for device in devices]
    for worker in workers:
        worker.start()
    time.sleep(0.5 if options["mode"] == "read" else 3.0)   # every context and buffer made
    start = time.perf_counter()
    go.set()
    times = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    failed = [text for text in times if isinstance(text, str)]
    if failed:
        raise SystemExit(f"bench_host_path: {failed[0]}")
    slowest = max(times)
    wall = time.perf_counter() - start
    total = options["frames"] * len(workers)
    mean_size = float(np.mean([size for _, size in extents]))
    return {"frames_per_s": total / wall, "gb_per_s": total * mean_size / wall / 1e9,
            "slowest_s": slowest}


def memcpy_bandwidth(threads: int, nbytes: int = 1 << 28, repeats: int = 4) -> float:
    """GB/s copied by ``threads`` threads, each copying its share of ``nbytes``."""
    source = np.ones(nbytes, np.uint8)
    target = np.empty_like(source)
    edges = np.linspace(0, nbytes, threads + 1).astype(int)
    start = time.perf_counter()
    for _ in range(repeats):
        copies = [threading.Thread(target=np.copyto, args=(target[lo:hi], source[lo:hi]))
                  for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        for copy in copies:
            copy.start()
        for copy in copies:
            copy.join()
    return repeats * nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stack", help="HDF5 stack, one frame per chunk")
    parser.add_argument("--dataset", default="/entry/data/data")
    parser.add_argument("--mode", choices=("upload", "launch", "read"), default="upload")
    parser.add_argument("--devices", default="0", help="GPU indices, comma-separated")
    parser.add_argument("--processes", type=int, default=3, help="processes per device")
    parser.add_argument("--frames", type=int, default=1500, help="chunks per process")
    parser.add_argument("--launches", type=int, default=6, help="kernels per frame (launch)")
    parser.add_argument("--readback", type=int, default=40_000,
                        help="bytes read back per frame (launch; 1000 bins of 5 sums)")
    parser.add_argument("--any-device", action="store_true",
                        help="number every OpenCL device, not only GPUs (a PoCL smoke test)")
    parser.add_argument("--memcpy", action="store_true", help="also memcpy GB/s, 1-16 threads")
    args = parser.parse_args()
    devices = [int(d) for d in args.devices.split(",")]
    options = {"mode": args.mode, "frames": args.frames, "launches": args.launches,
               "readback": args.readback, "any_device": args.any_device}
    got = move(args.stack, args.dataset, devices, args.processes, options)
    print(f"{args.mode}, devices {devices}, {args.processes} processes each: "
          f"{got['frames_per_s']:.0f} frames/s, {got['gb_per_s']:.1f} GB/s "
          f"(slowest process {got['slowest_s']:.2f} s)", flush=True)
    if args.memcpy:
        for threads in (1, 2, 4, 8, 16):
            print(f"memcpy, {threads} threads: {memcpy_bandwidth(threads):.1f} GB/s")


if __name__ == "__main__":
    main()
