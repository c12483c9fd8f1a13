"""Where a fresh ``azfilter`` process spends its first second: a timeline of one run.

Runs the command once in a fresh process (its output to a file, not a pipe) with a few of its
functions wrapped to log when they start and end, in the command's process and in every
worker process it forks, and prints a table: per process, each step's first start and last
end, in seconds since the launch, and the launch-to-exit wall time. Steps: interpreter and
imports, pyopencl's import, the platform list, the device's context, the lookup table, the
engine's set-up (buffers, table upload), the first and last frame submitted and finished,
the end of the workers' run, the output's close.

It answers what the end-to-end rate of a short run cannot: at 1000 frames, which part of
the wall time is the fixed start (and which part of that runs in parallel in the workers),
and what the command does after its last frame.

The wrapper imports the modules it times before the command starts (the command imports
some of them later, lazily): "azfilter imported" is that sum, not the command's own import
time; what follows it is the command's.

Usage (GPU machine, a stack from ``bench_e2e_gpu.py``)::

    python3 bench/bench_timeline.py -- sigma-clip -p /dev/shm/azf/eiger4m.poni \\
        --backend opencl --device gpu /dev/shm/azf/eiger4m_bslz4_1000f_v1.h5 \\
        -o /dev/shm/out.h5 --overwrite
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import subprocess
import sys
import tempfile
import time

#: (module, attribute path) of the steps timed
STEPS = [
    ("azfilter.pipeline.workers", "WorkerPool.run"),
    ("azfilter.pipeline.workers", "WorkerPool.close"),
    ("azfilter.backends.opencl.devices", "import_pyopencl"),
    ("azfilter.backends.opencl.devices", "_ask_platforms"),
    ("azfilter.backends.opencl.devices", "device_context"),
    ("azfilter.backends.opencl.programs", "build_program"),
    ("azfilter.backends.opencl.engine", "OpenCLEngine.__init__"),
    ("azfilter.backends.opencl.engine", "OpenCLEngine._submit"),
    ("azfilter.backends.opencl.engine", "OpenCLEngine._finish"),
    ("azfilter.integrator", "Integrator.table"),
    ("azfilter.output.nexus", "NexusWriter.close"),
]
#: the variable that passes the launch time to the child
LAUNCH_VARIABLE = "AZFILTER_TIMELINE_T0"


def child(log_path: str, arguments: list[str]) -> None:
    """Run the command in this process with its steps wrapped; every line goes to the log:
    ``pid name start end`` (seconds since the launch)."""
    launch = float(os.environ[LAUNCH_VARIABLE])
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(name: str, start: float, end: float) -> None:
        os.write(log, f"{os.getpid()} {name} {start - launch:.4f} {end - launch:.4f}\n".encode())

    note("interpreter started", launch, time.time())
    import h5py  # noqa: F401
    import numpy  # noqa: F401
    note("numpy, h5py imported", launch, time.time())

    def wrap(name, func):
        def timed(*args, **kwargs):
            start = time.time()
            try:
                return func(*args, **kwargs)
            finally:
                note(name, start, time.time())
        return timed

    for module_name, path in STEPS:
        owner = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        setattr(owner, attribute, wrap(path, getattr(owner, attribute)))
    note("azfilter imported", launch, time.time())
    from azfilter.cli import run

    status = run(arguments)
    note("command returned", time.time(), time.time())
    os._exit(status)


def summary(log_path: str, wall: float) -> str:
    """The markdown table of a log: per process and step, calls, first start, first end,
    last end."""
    steps: dict[tuple[int, str], list[float]] = {}   # first start, first end, last end
    calls: collections.Counter = collections.Counter()
    order: list[int] = []
    with open(log_path) as log:
        for line in log:
            pid_text, rest = line.split(" ", 1)
            name, start, end = rest.rsplit(" ", 2)
            pid = int(pid_text)
            if pid not in order:
                order.append(pid)
            key = (pid, name)
            calls[key] += 1
            first, first_end, last = steps.get(key, (float(start), float(end), float(end)))
            steps[key] = [min(first, float(start)), min(first_end, float(end)),
                          max(last, float(end))]
    lines = ["| process | step | calls | first start s | first end s | last end s |",
             "|---|---|---:|---:|---:|---:|"]
    for index, pid in enumerate(order):
        who = "command" if index == 0 else f"worker {index} (pid {pid})"
        for (owner, name), (first, first_end, last) in sorted(
                ((k, v) for k, v in steps.items() if k[0] == pid), key=lambda kv: kv[1][0]):
            lines.append(f"| {who} | {name} | {calls[(owner, name)]} | {first:.3f} | "
                         f"{first_end:.3f} | {last:.3f} |")
    lines.append(f"| command | launch to exit (wall) | | 0.000 | | {wall:.3f} |")
    return "\n".join(lines)


def main() -> None:
    """Launch the command in a fresh process with its steps timed; print the table."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="keep the raw log here (default: a temporary file)")
    parser.add_argument("arguments", nargs=argparse.REMAINDER,
                        help="-- then the azfilter arguments")
    args = parser.parse_args()
    arguments = args.arguments[1:] if args.arguments[:1] == ["--"] else args.arguments
    if args.log:
        log_path = args.log
        if os.path.exists(log_path):
            os.remove(log_path)
    else:   # an empty file of ours, which the child appends to
        with tempfile.NamedTemporaryFile(suffix=".log", prefix="azfilter-timeline-",
                                         delete=False) as log:
            log_path = log.name
    with tempfile.TemporaryFile("w+") as output:
        launch = time.time()
        env = dict(os.environ, **{LAUNCH_VARIABLE: repr(launch)})
        done = subprocess.run([sys.executable, __file__, "--child", log_path, *arguments],
                              stdout=output, stderr=output, env=env, check=False)
        wall = time.time() - launch
        output.seek(0)
        tail = output.read().strip().splitlines()[-1:]
    print(f"azfilter {' '.join(arguments)}\nexit status {done.returncode}: "
          f"{tail[0] if tail else ''}\n")
    print(summary(log_path, wall))
    if not args.log:
        os.remove(log_path)


if __name__ == "__main__":
    main()
