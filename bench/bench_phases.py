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
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import collections  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

import azfilter.integrator as integrator_module  # noqa: E402
import azfilter.pipeline.run as run_module  # noqa: E402
from azfilter.backends.opencl import engine as engine_module  # noqa: E402
from azfilter.output import sinks  # noqa: E402

if os.environ.get("READERS"):
    run_module.DEVICE_DECODE_READERS = int(os.environ["READERS"])
if os.environ.get("AHEAD"):
    run_module.READ_AHEAD = int(os.environ["AHEAD"])

seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()
first: dict[str, float] = {}
MAIN = threading.main_thread()


def record(name: str, spent: float) -> None:
    """Add ``spent`` seconds to step ``name`` (``other:`` prefix off the main thread)."""
    key = name if threading.current_thread() is MAIN else f"other:{name}"
    seconds[key] += spent
    calls[key] += 1
    first.setdefault(f"first {name}", time.perf_counter() - STARTED)


def timed(owner: Any, name: str, static: bool = False) -> None:
    """Replace ``owner.name`` by a wrapper that records its time."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            record(name, time.perf_counter() - start)
    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


timed(engine_module.OpenCLEngine, "_submit")
timed(engine_module.OpenCLEngine, "_finish", static=True)
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
    for name, total in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {name:28s} {total:8.3f} s  {calls[name]:6d} calls  "
              f"{1e3 * total / max(calls[name], 1):.3f} ms/call")
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
