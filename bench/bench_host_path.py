"""The host's data path alone: how many compressed frames/s the machine moves from the page
cache to its GPUs, with nothing computed.

Each of ``--processes`` processes per device (forked before any of them starts OpenCL) reads
whole chunks of an HDF5 stack chunked one frame per chunk (``os.preadv`` at the offsets of
``get_chunk_info``, as azfilter's readers do) into one of four page-locked buffers and
uploads it to its GPU (``--mode upload``), or only reads them into ordinary memory
(``--mode read``). It also times memcpy bandwidth with 1-16 threads (``--memcpy``).

What it is for: if this moves several times the frames/s the command reaches on the same
GPUs, neither the host's memory nor its PCIe path is what bounds the command (README,
"Several GPUs").

Usage (GPU machine)::

    python bench/bench_host_path.py STACK.h5 --devices 0 --processes 3
    python bench/bench_host_path.py STACK.h5 --devices 0,1 --processes 3 --frames 1500
    python bench/bench_host_path.py STACK.h5 --mode read --processes 8 --memcpy
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


def chunk_extents(path: str, dataset: str) -> list[tuple[int, int]]:
    """(byte offset, size) of every chunk of ``dataset`` in ``path``."""
    import h5py

    with h5py.File(path, "r") as h5:
        store = h5[dataset].id
        return [(info.byte_offset, info.size)
                for info in (store.get_chunk_info(k) for k in range(store.get_num_chunks()))]


def _mover(path: str, extents: list[tuple[int, int]], mode: str, device: int, seed: int,
           frames: int, go: Any, results: Any) -> None:
    """One process: read (and upload) ``frames`` chunks, starting at a different one each;
    puts its seconds on ``results``, or the text of what stopped it."""
    try:
        results.put(_move_chunks(path, extents, mode, device, seed, frames, go))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        results.put(f"device {device}: {type(err).__name__}: {err}")


def _move_chunks(path: str, extents: list[tuple[int, int]], mode: str, device: int,
                 seed: int, frames: int, go: Any) -> float:
    largest = max(size for _, size in extents)
    fd = os.open(path, os.O_RDONLY)
    events: list[Any] = [None] * SLOTS
    if mode == "upload":
        import pyopencl as cl

        gpus = [d for p in cl.get_platforms() for d in p.get_devices()
                if d.type & cl.device_type.GPU]
        if device >= len(gpus):
            raise RuntimeError(f"no GPU {device}: OpenCL lists {len(gpus)} GPUs")
        context = cl.Context([gpus[device]])
        queue = cl.CommandQueue(context)
        hosts = []
        for _ in range(SLOTS):
            buffer = cl.Buffer(context, cl.mem_flags.ALLOC_HOST_PTR | cl.mem_flags.READ_ONLY,
                               largest)
            array, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.WRITE, 0, (largest,),
                                             np.uint8)
            array[:] = 1   # touched before the clock starts
            hosts.append(array)
        targets = [cl.Buffer(context, cl.mem_flags.READ_WRITE, largest) for _ in range(SLOTS)]
    else:
        hosts = [np.ones(largest, np.uint8) for _ in range(SLOTS)]
    go.wait()
    start = time.perf_counter()
    for k in range(frames):
        offset, size = extents[(seed * 7919 + k) % len(extents)]
        slot = k % SLOTS
        if events[slot] is not None:
            events[slot].wait()
        os.preadv(fd, [memoryview(hosts[slot])[:size]], offset)
        if mode == "upload":
            events[slot] = cl.enqueue_copy(queue, targets[slot], memoryview(hosts[slot])[:size],
                                           is_blocking=False)
    if mode == "upload":
        queue.finish()
    os.close(fd)
    return time.perf_counter() - start


def move(path: str, dataset: str, mode: str, devices: list[int], processes: int,
         frames: int) -> dict[str, float]:
    """Frames/s and GB/s of ``processes`` processes per device, ``frames`` chunks each."""
    extents = chunk_extents(path, dataset)
    context = multiprocessing.get_context("fork")
    go, results = context.Event(), context.Queue()
    workers = [context.Process(target=_mover, args=(path, extents, mode, device,
                                                    index * 10 + device, frames, go, results))
               for index in range(processes) for device in devices]
    for worker in workers:
        worker.start()
    time.sleep(3.0 if mode == "upload" else 0.5)   # every context and buffer made
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
    total = frames * len(workers)
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
    parser.add_argument("--mode", choices=("upload", "read"), default="upload")
    parser.add_argument("--devices", default="0", help="GPU indices, comma-separated")
    parser.add_argument("--processes", type=int, default=3, help="processes per device")
    parser.add_argument("--frames", type=int, default=1500, help="chunks per process")
    parser.add_argument("--memcpy", action="store_true", help="also memcpy GB/s, 1-16 threads")
    args = parser.parse_args()
    devices = [int(d) for d in args.devices.split(",")]
    got = move(args.stack, args.dataset, args.mode, devices, args.processes, args.frames)
    print(f"{args.mode}, GPUs {devices}, {args.processes} processes each: "
          f"{got['frames_per_s']:.0f} frames/s, {got['gb_per_s']:.1f} GB/s "
          f"(slowest process {got['slowest_s']:.2f} s)", flush=True)
    if args.memcpy:
        for threads in (1, 2, 4, 8, 16):
            print(f"memcpy, {threads} threads: {memcpy_bandwidth(threads):.1f} GB/s")


if __name__ == "__main__":
    main()
