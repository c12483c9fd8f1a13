"""Where one run of the command spends its main thread's time, step by step (in-process).

Runs ``azfilter OP ARGS...`` in this process with the pipeline's steps timed: the OpenCL
engine's ``_submit`` and ``_finish``, the results (``Integrator._result``), the wait for the
reader threads (``_read_frames``), the write queue (``_put``) and, on the writer thread, the
sink's ``write`` (wall time, so waiting for the GIL counts). Prints the command's own
summary, the process total, when each step first ran (seconds after this script started),
and per step its total, calls and milliseconds per call.

Usage (GPU machine)::

    python3 bench/bench_phases.py sigma-clip -p geo.poni --npt 1000 --backend opencl \\
        --device gpu --overwrite stack.h5 -o /dev/shm/out.h5
    READERS=8 python3 bench/bench_phases.py ...   # reader threads for device decoding

``READERS`` and ``AHEAD`` override ``DEVICE_DECODE_READERS`` and ``READ_AHEAD`` of
:mod:`azfilter.pipeline.run` for an experiment.

``SLOTS=N`` sets the frames the OpenCL engine keeps in flight, ``ROWS=N`` the rows the
NeXus writer buffers.

``SWITCH=0.0005`` sets the interpreter's switch interval (seconds; Python's default 0.005).

``NULL_ENGINE=1`` replaces the OpenCL engine's work by nothing: each frame's "sums" are the
slot's host arrays as they are (ones), so the run measures what the pipeline costs around
the engine (reading, the engine's Python bookkeeping, results, writing) on any machine with
an OpenCL device, e.g. PoCL: ``NULL_ENGINE=1 python bench/bench_phases.py sigma-clip ...
--backend opencl --device cpu --decode device``.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import collections  # noqa: E402
import os  # noqa: E402

# as the command does before numpy loads (azfilter/cli.py): otherwise OpenBLAS's idle threads
# spin in this script's profiles (4 % of the samples of a 2-core run)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

import azfilter.integrator as integrator_module  # noqa: E402
import azfilter.pipeline.run as run_module  # noqa: E402
from azfilter.backends.opencl import engine as engine_module  # noqa: E402
from azfilter.output import nexus as nexus_module  # noqa: E402
from azfilter.output import sinks  # noqa: E402

if os.environ.get("READERS"):
    run_module.DEVICE_DECODE_READERS = int(os.environ["READERS"])
if os.environ.get("SLOTS"):
    engine_module.GPU_SLOTS = engine_module.CPU_SLOTS = int(os.environ["SLOTS"])
if os.environ.get("ROWS"):
    nexus_module.MIN_BUFFER_ROWS = nexus_module.MAX_BUFFER_ROWS = int(os.environ["ROWS"])
if os.environ.get("SWITCH"):
    sys.setswitchinterval(float(os.environ["SWITCH"]))
if os.environ.get("AHEAD"):
    run_module.READ_AHEAD = int(os.environ["AHEAD"])

seconds: dict[str, float] = collections.defaultdict(float)
#: CPU seconds of each finished thread, by name with its digits dropped (a pool's threads)
thread_cpu: dict[str, float] = collections.defaultdict(float)
_thread_run = threading.Thread.run


def _run_counted(self: threading.Thread) -> None:
    try:
        _thread_run(self)
    finally:
        thread_cpu[self.name.rstrip("0123456789_")] += time.thread_time()


threading.Thread.run = _run_counted
cpu_seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()
first: dict[str, float] = {}
MAIN = threading.main_thread()


def record(name: str, spent: float, cpu: float = 0.0) -> None:
    """Add ``spent`` seconds (``cpu`` of them on this thread's CPU) to step ``name``
    (``other:`` prefix off the main thread)."""
    key = name if threading.current_thread() is MAIN else f"other:{name}"
    seconds[key] += spent
    cpu_seconds[key] += cpu
    calls[key] += 1
    first.setdefault(f"first {name}", time.perf_counter() - STARTED)


def timed(owner: Any, name: str, static: bool = False) -> None:
    """Replace ``owner.name`` by a wrapper that records its time."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            record(name, time.perf_counter() - start, time.thread_time() - start_cpu)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)




class _Complete:
    """An event that is complete (the null engine's)."""

    command_execution_status = 0   # CL_COMPLETE

    @staticmethod
    def wait() -> None:
        return None


def null_submit(self: Any, raw: Any, operation: str, params: dict, slot: int,
                stream: bool = True) -> Any:
    """``OpenCLEngine._submit`` without the device: the slot's host arrays as results."""
    self._prepare_frame(raw)
    host = self._host_arrays(slot if stream else None)
    if not host.get("null"):
        for name in ("sums", "counts", "reals"):
            host[name][...] = 1
        host["null"] = True
    outliers = None if operation == "integrate" else (
        float(params.get("pick", 0.0)), host["counts"], host["reals"])
    return engine_module._Pending(host["sums"], _Complete(), None, outliers)


if os.environ.get("NULL_ENGINE"):
    engine_module.OpenCLEngine._submit = null_submit
timed(engine_module.OpenCLEngine, "_submit")
timed(engine_module.OpenCLEngine, "_finish")
timed(integrator_module.Integrator, "_result")
timed(integrator_module.Integrator, "_engine_for")
timed(run_module, "_put")
timed(run_module, "make_integrator")
timed(run_module, "decode_on_device")
timed(sinks.NexusSink, "write")
read_frames = run_module._read_frames


def timed_read_frames(*args: Any, **kwargs: Any) -> Any:
    """The planned frames, with the wait for each timed as ``reader wait``."""
    frames = read_frames(*args, **kwargs)
    while True:
        start = time.perf_counter()
        try:
            item = next(frames)
        except StopIteration:
            return
        finally:
            record("reader wait", time.perf_counter() - start)
        yield item


run_module._read_frames = timed_read_frames


def main() -> int:
    """Run the command given on the command line; print the breakdown."""
    from azfilter.cli import run

    start = time.perf_counter()
    status = run(sys.argv[1:])
    end = time.perf_counter()
    print(f"imports of this script {start - STARTED:.3f} s; run {end - start:.3f} s; "
          f"total {end - STARTED:.3f} s; exit status {status}")
    for name, at in sorted(first.items(), key=lambda item: item[1]):
        print(f"  at {at:.3f} s: {name}")
    thread_cpu["main thread"] = time.thread_time()
    print("CPU seconds by thread: " + ", ".join(
        f"{name} {cpu:.3f}" for name, cpu in sorted(thread_cpu.items(), key=lambda i: -i[1])))
    for name, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {name:28s} {total:8.3f} s  {calls[name]:6d} calls  "
              f"{1e3 * total / max(calls[name], 1):.3f} ms/call, CPU "
              f"{1e3 * cpu_seconds[name] / max(calls[name], 1):.3f} ms/call")
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
