"""The command's Cython throughput for several numbers of concurrent frames ("lanes").

``azfilter <operation> --backend cython`` over the Eiger 4M bitshuffle-LZ4 stack of
``bench_cli.py`` (generated once into ``bench/data/``, reused) → one HDF5 file, once per
configuration: ``AZFILTER_CYTHON_LANES`` = each value of ``--lanes`` (frames the engine reduces
at once, each on ``threads // lanes`` OpenMP threads), optionally with ``--threads``. For each
run: frames/s, wall s, CPU s (user + system of the child) and CPU ms per frame; the stack is
in the page cache and the lookup table in a warm on-disk cache (one untimed run first). The
same command on a one-frame stack gives the fixed cost (start-up, table load, output file),
and "steady" is (frames - 1) / (wall - that wall): the rate of reading, decoding, reducing
and writing alone.

``--engine`` measures in-process instead, on the first ``--engine-frames`` frames decoded
into memory: (1) one frame on 1, 2, 4, ... threads for integrate without and with pixel
splitting and sigma-clip (wall ms, min of the repeats; a speed-up that stops growing while
the other keeps scaling points at memory bandwidth: the full-split table is ~2.8x larger);
(2) ``process_many`` over those frames for each number of lanes (frames/s, CPU ms per frame).

Usage::

    .venv/bin/python bench/bench_lanes.py                         # 1000 frames, lanes 1,2,4,...
    .venv/bin/python bench/bench_lanes.py --frames 40 --lanes 1 2 --repeat 3   # 2-core machine
    .venv/bin/python bench/bench_lanes.py --operations sigma-clip --wait-policy passive active
    .venv/bin/python bench/bench_lanes.py --engine --frames 40          # in-process, ~1 minute

On 16 cores with the 1000-frame stack already generated, the default run (two operations,
five lane counts) takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_cli import (  # noqa: E402 - after the path set-up
    ERROR_MODEL,
    MAX_ITER,
    POLARIZATION,
    THRES,
    UNIT,
    azfilter_launcher,
    eiger_stack,
    machine_info,
    read_page_cache,
    run_child,
)

from azfilter.resources import usable_cores  # noqa: E402


def command_options(operation: str, poni: Path, npt: int) -> list[str]:
    """The options of ``operation`` (the same reduction as bench_cli's case b)."""
    options = [operation, "-p", str(poni), "--npt", str(npt), "--unit", UNIT,
               "--polarization", str(POLARIZATION), "--backend", "cython", "--quiet"]
    if operation == "sigma-clip":
        options += ["--thres", str(THRES), "--max-iter", str(MAX_ITER),
                    "--error-model", ERROR_MODEL]
    return options


def default_lanes(cores: int) -> list[int]:
    """1, 2, 4, ... up to the cores, and the engine's own default (threads // 4)."""
    lanes = {1, max(1, cores // 4)}
    value = 2
    while value <= cores:
        lanes.add(value)
        value *= 2
    return sorted(lanes)


def doubling(limit: int) -> list[int]:
    """1, 2, 4, ... up to ``limit``, and ``limit`` itself."""
    values, value = [], 1
    while value < limit:
        values.append(value)
        value *= 2
    return values + [limit]


def memory_layout() -> str:
    """NUMA nodes and last-level cache size (Linux sysfs), what the table sizes meet."""
    import glob

    nodes = len(glob.glob("/sys/devices/system/node/node[0-9]*")) or 1
    caches = {}
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as level, open(f"{index}/size") as size:
                caches[int(level.read())] = size.read().strip()
        except (OSError, ValueError):
            continue
    last = f"L{max(caches)} {caches[max(caches)]} per cache" if caches else "cache size unknown"
    return f"{nodes} NUMA node(s), {last}"


def thread_cpu_ns() -> dict[int, int]:
    """CPU time (ns) of each thread of this process so far, from /proc (Linux; else {})."""
    times = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return times
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                times[int(tid)] = int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return times


def per_thread(call, calls: int) -> tuple[float, list[float]]:
    """Wall ms per call and each thread's CPU ms per call over ``calls`` calls (threads that
    ran, busiest first): with OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps, so a spread
    between threads is load imbalance and a sum well below threads × wall is time spent
    waiting (serial parts, start and join); CPU near threads × wall with a low speed-up is
    memory stalls."""
    import time

    before = thread_cpu_ns()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    wall = (time.perf_counter() - start) * 1e3 / calls
    after = thread_cpu_ns()
    spent = sorted(((after[t] - before.get(t, 0)) / 1e6 / calls for t in after), reverse=True)
    return wall, [ms for ms in spent if ms > 0.01]


def engine_mode(args: argparse.Namespace, stack: Path, poni: Path, cores: int,
                lanes_list: list[int]) -> list[dict]:
    """In-process: thread scaling of one frame, then process_many per number of lanes."""
    import time

    import h5py
    import hdf5plugin  # noqa: F401 - registers the bitshuffle filter
    from bench_cli import H5PATH

    import azfilter

    with h5py.File(stack, "r") as h5:
        frames = h5[H5PATH][:args.engine_frames]
    geometry = azfilter.load_poni(str(poni))
    integrator = azfilter.Integrator(geometry, npt=args.npt, unit=UNIT, backend="cython",
                                     polarization=POLARIZATION, threads=cores)
    frame = frames[0]
    rows = []
    singles = {
        "integrate no-split": ("no", lambda e, t: e._integrate(frame, "poisson", None, t)),
        "integrate full-split": ("full", lambda e, t: e._integrate(frame, "poisson", None, t)),
        "sigma-clip": ("no", lambda e, t: e._sigma_clip(frame, THRES, MAX_ITER, ERROR_MODEL,
                                                          None, t)),
    }
    print("# one frame, wall ms (min of repeats) by OpenMP threads; speed-up vs 1 thread")
    for label, (split, call) in singles.items():
        engine = integrator.engine(split, frame.dtype)
        call(engine, cores)
        times = {}
        for threads in doubling(cores):
            best = float("inf")
            for _ in range(max(3, args.repeat)):
                start = time.perf_counter()
                call(engine, threads)
                best = min(best, time.perf_counter() - start)
            times[threads] = best * 1e3
        entries = int(engine._indptr[-1])
        print(f"{label:21s} {entries / 1e6:5.2f}M entries: " + "  ".join(
            f"{t}t {ms:6.2f} ms ({times[1] / ms:4.1f}x)" for t, ms in times.items()), flush=True)
        wall, threads_ms = per_thread(lambda: call(engine, cores), max(5, args.repeat))  # noqa: B023
        print(f"{'':21s} per thread on {cores} threads: wall {wall:.2f} ms, CPU ms per thread "
              f"{' '.join(f'{ms:.2f}' for ms in threads_ms)} (sum {sum(threads_ms):.1f} = "
              f"{sum(threads_ms) / (cores * wall):.0%} of threads x wall)", flush=True)
        rows.append({"mode": "single", "case": label, "entries": entries, "ms": times,
                     "per_thread_cpu_ms": threads_ms, "per_thread_wall_ms": wall})
    print(f"# process_many over {len(frames)} frames in memory, {cores} threads")
    operations = {"sigma-clip": ("sigma_clip", {"thres": THRES, "max_iter": MAX_ITER,
                                                "error_model": ERROR_MODEL}),
                  "integrate": ("integrate", {"error_model": "poisson"}),
                  "medfilt": ("medfilt", {"quant_min": 0.5, "quant_max": 0.5,
                                          "error_model": "poisson"})}
    for operation in args.operations:
        method, params = operations[operation]
        split = "full" if operation == "medfilt" else "no"
        engine = integrator.engine(split, frame.dtype)
        for lanes in lanes_list:
            engine.lanes = min(lanes, engine.threads)
            rates, cpus = [], []
            for _ in range(args.repeat):
                start, cpu = time.perf_counter(), time.process_time()
                for _tag, outcome in engine.process_many(enumerate(frames), method, params):
                    if isinstance(outcome, Exception):
                        raise outcome
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                rates.append(len(frames) / wall)
                cpus.append(1e3 * cpu / len(frames))
            print(f"{operation:10s} lanes {engine.lanes:2d}: frames/s "
                  f"{min(rates):7.1f}-{max(rates):7.1f}  CPU ms/frame "
                  f"{min(cpus):6.1f}-{max(cpus):6.1f}", flush=True)
            rows.append({"mode": "process_many", "operation": operation,
                         "lanes": engine.lanes, "frames_per_s": rates,
                         "cpu_ms_per_frame": cpus})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--npt", type=int, default=1000)
    parser.add_argument("--operations", nargs="+", default=["sigma-clip", "integrate"],
                        choices=["sigma-clip", "integrate", "medfilt"])
    parser.add_argument("--lanes", nargs="+", type=int,
                        help="values of AZFILTER_CYTHON_LANES (default 1, 2, 4, ... cores)")
    parser.add_argument("--threads", type=int, help="--threads of the command (default: all)")
    parser.add_argument("--wait-policy", nargs="+", default=["passive"],
                        choices=["passive", "active"], help="OMP_WAIT_POLICY values to try")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration")
    parser.add_argument("--data-dir", type=Path, default=HERE / "data")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--engine", action="store_true",
                        help="in-process engine measurements instead of the command")
    parser.add_argument("--engine-frames", type=int, default=64,
                        help="frames decoded into memory for --engine")
    args = parser.parse_args()
    if args.frames < 2:
        parser.error("--frames must be at least 2")

    cores = usable_cores()
    lanes_list = args.lanes or default_lanes(args.threads or cores)
    info = machine_info()
    print(f"# machine: {info['cpu']}, {cores} usable cores, {memory_layout()}")
    stack, poni, generated = eiger_stack(args.data_dir, args.frames)
    if generated:
        print(f"# generated {stack.name} in {generated:.0f} s")
    if args.engine:
        rows = engine_mode(args, stack, poni, args.threads or cores, lanes_list)
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "stack": str(stack),
                                             "rows": rows}, indent=1))
        return
    one_frame, _, _ = eiger_stack(args.data_dir, 1)
    read_page_cache(stack)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        launcher = azfilter_launcher("auto", work)
        cache = work / "cache"
        cache.mkdir()
        base_env = dict(launcher.env, AZFILTER_CACHE_DIR=str(cache))
        for operation in args.operations:
            argv = launcher.argv + command_options(operation, poni, args.npt)
            if args.threads:
                argv += ["--threads", str(args.threads)]
            # untimed: builds the lookup table into the cache, warms the libraries
            run_child(argv + [str(stack), "-o", str(work / "warm.h5")], base_env, work,
                      work / "warm.log")
            fixed = []
            for k in range(max(3, args.repeat)):
                fixed.append(run_child(argv + [str(one_frame), "-o", str(work / f"one{k}.h5")],
                                       base_env, work, work / "one.log"))
            fixed_wall = min(r.wall_s for r in fixed)
            fixed_cpu = min(r.cpu_s for r in fixed)
            print(f"{operation:10s} one frame (fixed cost): wall {fixed_wall:.2f} s, "
                  f"CPU {fixed_cpu:.2f} s", flush=True)
            for policy in args.wait_policy:
                for lanes in lanes_list:
                    env = dict(base_env, AZFILTER_CYTHON_LANES=str(lanes),
                               OMP_WAIT_POLICY=policy.upper())
                    runs = []
                    for k in range(args.repeat):
                        output = work / f"out-{operation}-{policy}-{lanes}-{k}.h5"
                        run = run_child(argv + [str(stack), "-o", str(output)], env, work,
                                        work / "run.log")
                        if run.returncode != 0:
                            sys.exit(f"bench_lanes: {operation} lanes={lanes} failed "
                                     f"(exit {run.returncode}):\n{run.stderr_tail}")
                        output.unlink()
                        runs.append(run)
                    wall = statistics.median(r.wall_s for r in runs)
                    cpu = statistics.median(r.cpu_s for r in runs)
                    row = {"operation": operation, "wait_policy": policy, "lanes": lanes,
                           "threads": args.threads or cores, "frames": args.frames,
                           "wall_s": [round(r.wall_s, 3) for r in runs],
                           "cpu_s": [round(r.cpu_s, 3) for r in runs],
                           "frames_per_s": args.frames / wall,
                           "steady_frames_per_s": (args.frames - 1) / max(wall - fixed_wall,
                                                                          1e-9),
                           "cpu_ms_per_frame": 1e3 * cpu / args.frames,
                           "steady_cpu_ms_per_frame": 1e3 * (cpu - fixed_cpu)
                           / (args.frames - 1),
                           "peak_mb": max(r.peak_mb for r in runs)}
                    rows.append(row)
                    print(f"{operation:10s} {policy:7s} lanes {lanes:2d}: "
                          f"{row['frames_per_s']:7.1f} frames/s  wall {wall:6.2f} s "
                          f"(runs {', '.join(f'{w:.2f}' for w in row['wall_s'])})  "
                          f"CPU {cpu:6.2f} s = {row['cpu_ms_per_frame']:5.1f} ms/frame; "
                          f"steady {row['steady_frames_per_s']:6.1f} frames/s, "
                          f"{row['steady_cpu_ms_per_frame']:5.1f} CPU ms/frame  "
                          f"peak {row['peak_mb']:.0f} MB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "stack": str(stack), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
