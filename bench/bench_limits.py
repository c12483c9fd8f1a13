"""What bounds the command on a GPU machine, measured apart from azfilter's own code.

``--start-up``: the wall time of fresh processes that do less and less of what the command
does before its first frame (best of ``--repeat``): the bare interpreter (with and without
``site``, where machines hook packages in), ``import numpy, h5py``, pyopencl's platform list,
a GPU context and queue, ``azfilter --help``, and, with ``--poni`` and ``--one-frame``, the
command itself on a one-frame stack. At N frames a fresh process cannot be faster than N
divided by the last of these.

``--transfers RAW_STACK``: page-locked host-to-device copies of whole frames (GB/s on 1, 2 and
4 queues), and reads of the uncompressed stack's chunks from the page cache into memory with
``os.preadv`` on 1-16 threads (GB/s, frames/s), and both at once, as the command does them
(each of 4-16 threads reads frames into a page-locked buffer of its own and uploads each
before the next: frames/s): the PCIe and host-memory ceilings of an uncompressed stack.

Usage (GPU machine, the stacks of ``bench_e2e_gpu.py``)::

    python3 bench/bench_limits.py --start-up --poni /dev/shm/azf/eiger4m.poni \\
        --one-frame /dev/shm/azf/eiger4m_bslz4_1of1000f_v2.h5
    python3 bench/bench_limits.py --transfers /dev/shm/azf/eiger4m_raw_1000f_v2.h5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

DATASET = "/entry/data/data"


def best_wall(command: list[str], repeat: int) -> float:
    """Shortest wall time of ``repeat`` runs of ``command`` (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return min(times)


def start_up(args: argparse.Namespace) -> None:
    """One line per step of a fresh process."""
    python = sys.executable
    context = ("import numpy, h5py, pyopencl as cl; d = [d for p in cl.get_platforms() "
               "for d in p.get_devices() if d.type & cl.device_type.GPU][0]; "
               "q = cl.CommandQueue(cl.Context([d])); q.finish()")
    steps = [
        ("python -c pass", [python, "-c", "pass"]),
        ("python -I -c pass (no site hooks)", [python, "-I", "-c", "pass"]),
        ("import numpy, h5py", [python, "-c", "import numpy, h5py"]),
        ("+ pyopencl, platform list",
         [python, "-c", "import numpy, h5py, pyopencl as cl; cl.get_platforms()"]),
        ("+ GPU context and queue", [python, "-c", context]),
        ("azfilter --help", [python, "-m", "azfilter", "--help"]),
    ]
    if args.poni and args.one_frame:
        for operation in ("sigma-clip", "integrate"):
            steps.append((f"azfilter {operation} --backend opencl, one frame",
                          [python, "-m", "azfilter", operation, "-p", args.poni, "--backend",
                           "opencl", "--device", args.device, "--overwrite", args.one_frame,
                           "-o", os.path.join(args.scratch, "one_frame.h5")]))
    for label, command in steps:
        print(f"{label}: {best_wall(command, args.repeat):.3f} s", flush=True)


def transfers(args: argparse.Namespace) -> None:
    """Page-locked uploads and page-cache reads of whole uncompressed frames."""
    import h5py
    import numpy as np
    import pyopencl as cl

    with h5py.File(args.transfers, "r") as h5:
        dataset = h5[DATASET]
        frame_bytes = int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
        places = []
        for index in range(min(dataset.shape[0], args.frames)):
            info = dataset.id.get_chunk_info_by_coord((index,) + (0,) * (dataset.ndim - 1))
            places.append((int(info.byte_offset), int(info.size)))
    found = [d for p in cl.get_platforms() for d in p.get_devices()]
    device = ([d for d in found if d.type & cl.device_type.GPU] or found)[0]   # GPU first
    context = cl.Context([device])
    queues = [cl.CommandQueue(context) for _ in range(4)]
    flags = cl.mem_flags
    hosts, targets = [], []
    for queue in queues:
        buffer = cl.Buffer(context, flags.ALLOC_HOST_PTR | flags.READ_ONLY, frame_bytes)
        array, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.WRITE, 0, (frame_bytes,),
                                         np.uint8)
        array[:] = 1
        hosts.append((buffer, array))   # the buffer keeps the mapping alive
        targets.append(cl.Buffer(context, flags.READ_WRITE, frame_bytes))
    for count in (1, 2, 4):
        for queue in queues:
            queue.finish()
        copies = 400
        start = time.perf_counter()
        for k in range(copies):
            cl.enqueue_copy(queues[k % count], targets[k % count], hosts[k % count][1],
                            is_blocking=False)
        for queue in queues:
            queue.finish()
        seconds = time.perf_counter() - start
        print(f"page-locked upload, {count} queue(s): {copies * frame_bytes / seconds / 1e9:.1f}"
              f" GB/s = {copies / seconds:.0f} frames/s", flush=True)
    descriptor = os.open(args.transfers, os.O_RDONLY)
    try:
        for threads in (1, 2, 4, 8, 16):
            _read_rate("page cache -> memory", descriptor, places, frame_bytes,
                       [(np.empty(frame_bytes, np.uint8), None) for _ in range(threads)])
        for threads in (4, 8, 16):
            lanes, mapped = [], []   # (page-locked array, its upload); the mapped buffers
            for _ in range(threads):
                queue = cl.CommandQueue(context)
                buffer = cl.Buffer(context, flags.ALLOC_HOST_PTR | flags.READ_ONLY,
                                   frame_bytes)
                array, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.WRITE, 0,
                                                 (frame_bytes,), np.uint8)
                mapped.append(buffer)   # keeps the mapping alive
                target = cl.Buffer(context, flags.READ_WRITE, frame_bytes)

                def upload(data, queue=queue, target=target) -> None:
                    cl.enqueue_copy(queue, target, data, is_blocking=True)
                lanes.append((array, upload))
            _read_rate("page cache -> page-locked memory -> device", descriptor, places,
                       frame_bytes, lanes)
            del lanes, mapped
    finally:
        os.close(descriptor)


def _read_rate(label: str, descriptor: int, places: list[tuple[int, int]], frame_bytes: int,
               threads: list[tuple]) -> None:
    """Print the rate at which one thread per ``(memory, upload)`` of ``threads`` reads the
    chunks at ``places`` (each thread the next one not taken) into its ``memory``, and
    passes each to ``upload`` (when not None) before reading the next."""
    pending = iter(range(len(places)))
    lock = threading.Lock()
    start = time.perf_counter()
    workers = [threading.Thread(target=_read_chunks,
                                args=(descriptor, places, memory, pending, lock, upload))
               for memory, upload in threads]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - start
    print(f"{label}, {len(threads)} thread(s): "
          f"{len(places) * frame_bytes / seconds / 1e9:.1f} GB/s = "
          f"{len(places) / seconds:.0f} frames/s", flush=True)


def _read_chunks(descriptor: int, places: list[tuple[int, int]], memory, pending,
                 lock: threading.Lock, upload=None) -> None:
    """Read the chunks whose indices ``pending`` yields into ``memory``, one after another,
    each passed to ``upload`` (when not None) before the next is read."""
    view = memoryview(memory)
    while True:
        with lock:
            index = next(pending, None)
        if index is None:
            return
        offset, size = places[index]
        os.preadv(descriptor, [view[:size]], offset)
        if upload is not None:
            upload(memory[:size])


def main() -> None:
    """Parse the arguments and run the chosen measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start-up", action="store_true", help="fresh-process costs")
    parser.add_argument("--poni", help="geometry of --one-frame")
    parser.add_argument("--one-frame", help="a one-frame stack for the command's fixed cost")
    parser.add_argument("--device", default="gpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scratch", default="/dev/shm")
    parser.add_argument("--transfers", metavar="RAW_STACK",
                        help="uncompressed stack, one frame per chunk")
    parser.add_argument("--frames", type=int, default=600, help="frames read per run")
    args = parser.parse_args()
    if not (args.start_up or args.transfers):
        parser.error("give --start-up and/or --transfers")
    if args.start_up:
        start_up(args)
    if args.transfers:
        transfers(args)


if __name__ == "__main__":
    main()
