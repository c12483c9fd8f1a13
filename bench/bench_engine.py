"""Side-by-side benchmark of the reduction engine: azfilter (Cython/OpenMP) against pyFAI.

Same synthetic frames, same geometry, same mask, same number of bins, in the same run.
For each detector (Pilatus 1M, Eiger 4M; npt = the larger image dimension) and each operation
it prints ms per frame (median of repeats after a warm-up), the ratio pyFAI / azfilter, the
first-call time (lookup-table build) with a cold and a warm on-disk cache, and the peak memory
of the process that ran it.  Each (tool, detector) pair runs in its own subprocess so that the
peak memory is its own.

With ``--backend python`` it compares azfilter's numpy reference engine with pyFAI's Python
CSR engine (``method=(split, "csr", "python")``) instead.

With ``--outlier-cost`` it measures instead what the outlier statistics (``--pick``) cost the
Cython engine: sigma_clip and medfilt kernel calls with and without the statistics pass,
interleaved, ms per frame (median) and the difference.

With ``--passes`` it times the Cython kernels pass by pass with the settings of the
command-line benchmark's case (b) (1000 bins, polarization 0.99, solid angle): integrate
(poisson, azimuthal), sigma_clip with max_iter 0 (gather and sums only) and 5, without and
with the outlier statistics, on 1 and 2 threads (``--threads``; fastest of ``--repeat``
interleaved calls: the machine is shared), and sets them against the bytes each frame moves
(table streams and frame) and a numpy copy's memory bandwidth. ``--baseline SO`` adds the
same calls on another build of the kernels (a copy of an older ``_engine*.so``), interleaved,
for before/after; without ``--passes`` it runs azfilter's worker once more with that build
(before/after against pyFAI in the same run). ``--splits no full`` adds the integrate calls on
the full-split table to ``--passes``. ``--interleaved`` runs pyFAI, azfilter and (with
``--baseline``) the other build call after call in one process per detector, so that the
ratios hold under a changing load.

Usage: ``python bench/bench_engine.py [--detectors Pilatus1M Eiger4M] [--repeat 7]
[--backend cython|python] [--outlier-cost] [--passes [--baseline SO] [--threads 1 2]
[--splits no full]]
[--json F]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# environment variable telling a worker to use another build of azfilter._engine (--baseline)
KERNELS_VARIABLE = "AZFILTER_BENCH_KERNELS"
# the same for --interleaved, whose worker runs both builds
BASELINE_VARIABLE = "AZFILTER_BENCH_BASELINE"

# Geometries: a tilted detector ~0.3 m from the sample, beam near the middle.
GEOMETRIES = {
    "Pilatus1M": dict(dist=0.3, poni1=0.0905, poni2=0.0843, rot1=0.012, rot2=-0.007, rot3=0.0),
    "Eiger4M": dict(dist=0.2, poni1=0.0812, poni2=0.0776, rot1=0.010, rot2=-0.006, rot3=0.0),
    "Eiger9M": dict(dist=0.25, poni1=0.1226, poni2=0.1166, rot1=0.010, rot2=-0.006, rot3=0.0),
}
WAVELENGTH = 1.0e-10

# (label, azfilter call, pyFAI call); each call takes (integrator, frame, npt).
OPERATIONS = ["integrate no-split", "integrate full-split", "sigma_clip", "medfilt full-split"]


def poni_text(detector: str) -> str:
    g = GEOMETRIES[detector]
    lines = ["poni_version: 2.1", f"Detector: {detector}", "Detector_config: {\"orientation\": 3}"]
    lines += [f"Distance: {g['dist']}", f"Poni1: {g['poni1']}", f"Poni2: {g['poni2']}"]
    lines += [f"Rot1: {g['rot1']}", f"Rot2: {g['rot2']}", f"Rot3: {g['rot3']}"]
    lines += [f"Wavelength: {WAVELENGTH}"]
    return "\n".join(lines) + "\n"


def make_frame(detector: str, poni_path: str):
    """A synthetic frame (rings + Poisson noise + spots + hot pixels + gaps) and its mask."""
    import numpy as np

    import azfilter as az
    from tests.synthetic import synthetic_frame

    geo = az.load_poni(poni_path)
    frame = synthetic_frame(geometry=geo, seed=1)
    frame = frame[0] if isinstance(frame, tuple) else frame
    mask = np.asarray(geo.detector.mask, dtype=bool) | geo.detector.invalid_pixels(frame)
    return geo, frame, mask


def timed(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker_azfilter(detector: str, poni_path: str, repeat: int, backend: str = "cython") -> dict:
    import azfilter as az

    geo, frame, mask = make_frame(detector, poni_path)
    npt = max(frame.shape)
    calls = {
        "integrate no-split": lambda i: i.integrate(frame, error_model="poisson", split="no"),
        "integrate full-split": lambda i: i.integrate(frame, error_model="poisson", split="full"),
        "sigma_clip": lambda i: i.sigma_clip(frame, thres=5.0, max_iter=5,
                                             error_model="azimuthal"),
        "medfilt full-split": lambda i: i.medfilt(frame, percentile=(40, 60), split="full"),
    }
    out: dict = {"ms": {}, "cold_ms": {}, "warm_ms": {}}
    for label, call in calls.items():
        # cold: empty on-disk cache; warm: a new Integrator (new process state) finds the tables
        with tempfile.TemporaryDirectory() as cache:
            os.environ["AZFILTER_CACHE_DIR"] = cache
            integ = az.Integrator(geo, npt=npt, unit="q_nm^-1", mask=mask, backend=backend)
            t0 = time.perf_counter()
            call(integ)
            out["cold_ms"][label] = (time.perf_counter() - t0) * 1e3
            integ = az.Integrator(geo, npt=npt, unit="q_nm^-1", mask=mask, backend=backend)
            t0 = time.perf_counter()
            call(integ)
            out["warm_ms"][label] = (time.perf_counter() - t0) * 1e3
            out["ms"][label] = timed(lambda: call(integ), repeat)  # noqa: B023
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def worker_pyfai(detector: str, poni_path: str, repeat: int, backend: str = "cython") -> dict:
    import pyFAI

    geo, frame, mask = make_frame(detector, poni_path)
    npt = max(frame.shape)
    impl = backend   # pyFAI's implementation: "cython" or "python" (scipy.sparse CSR)
    calls = {
        "integrate no-split": lambda ai: ai.integrate1d(
            frame, npt, unit="q_nm^-1", mask=mask, method=("no", "csr", impl),
            error_model="poisson"),
        "integrate full-split": lambda ai: ai.integrate1d(
            frame, npt, unit="q_nm^-1", mask=mask, method=("full", "csr", impl),
            error_model="poisson"),
        "sigma_clip": lambda ai: ai.sigma_clip_ng(
            frame, npt, unit="q_nm^-1", mask=mask, method=("no", "csr", impl),
            error_model="azimuthal", thres=5.0, max_iter=5),
        "medfilt full-split": lambda ai: ai.medfilt1d_ng(
            frame, npt, unit="q_nm^-1", mask=mask, method=("full", "csr", impl),
            percentile=(40, 60)),
    }
    out: dict = {"ms": {}, "cold_ms": {}, "warm_ms": {}}
    for label, call in calls.items():
        ai = pyFAI.load(poni_path)  # pyFAI keeps its tables in memory only: cold == warm
        t0 = time.perf_counter()
        call(ai)
        out["cold_ms"][label] = out["warm_ms"][label] = (time.perf_counter() - t0) * 1e3
        out["ms"][label] = timed(lambda: call(ai), repeat)  # noqa: B023
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def worker_interleaved(detector: str, poni_path: str, repeat: int,
                       backend: str = "cython") -> dict:
    """pyFAI, azfilter and (``AZFILTER_BENCH_BASELINE``) azfilter on another build of the
    kernels, call after call in one process: each round calls every tool once per operation,
    so that all three see the same load (the machine is shared). ms per frame, median and
    fastest of ``repeat`` rounds."""
    import pyFAI

    import azfilter as az
    import azfilter.backends.cython as cython_backend

    geo, frame, mask = make_frame(detector, poni_path)
    npt = max(frame.shape)
    this_build = cython_backend._engine
    baseline = os.environ.get(BASELINE_VARIABLE)
    builds = {"azfilter": this_build}
    if baseline:
        builds["baseline"] = as_current_interface(load_kernels(baseline))
    integ = az.Integrator(geo, npt=npt, unit="q_nm^-1", mask=mask, backend=backend)
    ai = pyFAI.load(poni_path)
    impl = backend
    az_calls = {
        "integrate no-split": lambda: integ.integrate(frame, error_model="poisson", split="no"),
        "integrate full-split": lambda: integ.integrate(frame, error_model="poisson",
                                                        split="full"),
        "sigma_clip": lambda: integ.sigma_clip(frame, thres=5.0, max_iter=5,
                                               error_model="azimuthal"),
        "medfilt full-split": lambda: integ.medfilt(frame, percentile=(40, 60), split="full"),
    }
    fai_calls = {
        "integrate no-split": lambda: ai.integrate1d(
            frame, npt, unit="q_nm^-1", mask=mask, method=("no", "csr", impl),
            error_model="poisson"),
        "integrate full-split": lambda: ai.integrate1d(
            frame, npt, unit="q_nm^-1", mask=mask, method=("full", "csr", impl),
            error_model="poisson"),
        "sigma_clip": lambda: ai.sigma_clip_ng(
            frame, npt, unit="q_nm^-1", mask=mask, method=("no", "csr", impl),
            error_model="azimuthal", thres=5.0, max_iter=5),
        "medfilt full-split": lambda: ai.medfilt1d_ng(
            frame, npt, unit="q_nm^-1", mask=mask, method=("full", "csr", impl),
            percentile=(40, 60)),
    }
    times: dict = {op: {tool: [] for tool in ("pyfai", *builds)} for op in OPERATIONS}
    for op in OPERATIONS:   # warm-up: tables, caches, row weights
        fai_calls[op]()
        for kernels in builds.values():
            cython_backend._engine = kernels
            az_calls[op]()
    def call(op: str, tool: str) -> None:
        if tool == "pyfai":
            fai_calls[op]()
        else:
            cython_backend._engine = builds[tool]
            az_calls[op]()

    tools = ["pyfai", *builds]
    for round_ in range(repeat):
        for op in OPERATIONS:
            # each tool in turn comes first: a call right after another tool's finds that
            # tool's OpenMP threads still spinning (pyFAI ships its own OpenMP runtime); the
            # pause lets them go to sleep
            for tool in tools[round_ % len(tools):] + tools[:round_ % len(tools)]:
                time.sleep(0.02)
                t0 = time.perf_counter()
                call(op, tool)
                times[op][tool].append((time.perf_counter() - t0) * 1e3)
    cython_backend._engine = this_build
    return {op: {tool: {"median": statistics.median(values), "fastest": min(values)}
                 for tool, values in by_tool.items()} for op, by_tool in times.items()}


def worker_outlier_cost(detector: str, poni_path: str, repeat: int,
                        backend: str = "cython") -> dict:
    """ms per frame of the Cython sigma_clip and medfilt kernels without and with the
    outlier statistics (the kernels' ``stats`` argument), calls interleaved."""
    import numpy as np

    import azfilter as az
    from azfilter import _engine

    geo, frame, mask = make_frame(detector, poni_path)
    npt = max(frame.shape)
    integ = az.Integrator(geo, npt=npt, unit="q_nm^-1", mask=mask, backend="cython")
    out: dict = {}
    for label, split, kernel, args in (
            ("sigma_clip", "no", _engine.sigma_clip, ("azimuthal", 5.0, 5)),
            ("medfilt full-split", "full", _engine.medfilt, ("poisson", 0.4, 0.6))):
        engine = integ.engine(split, frame.dtype)
        raw = engine._frame(frame)
        stats = np.empty((4, engine.npt))
        common = (raw, *engine._table(), None, engine.dummy, engine.delta_dummy, *args,
                  engine.threads)
        without, with_stats = [], []
        kernel(*common)   # warm-up
        for _ in range(repeat):
            for times, extra in ((without, ()), (with_stats, (3.0, stats))):
                t0 = time.perf_counter()
                kernel(*common, *extra)
                times.append((time.perf_counter() - t0) * 1e3)
        out[label] = {"without_ms": statistics.median(without),
                      "with_ms": statistics.median(with_stats)}
    return out


def run_worker(tool: str, detector: str, poni_path: str, repeat: int, backend: str,
               kernels: str | None = None) -> dict:
    """Run one worker in a fresh process; ``kernels``: another build of ``azfilter._engine``
    (.so) for it to use instead of this one."""
    cmd = [sys.executable, __file__, "--worker", tool, detector, poni_path, str(repeat),
           backend]
    env = dict(os.environ)
    env.pop(KERNELS_VARIABLE, None)
    if kernels:
        env[KERNELS_VARIABLE] = kernels
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} {detector} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_line() -> str:
    from bench_cli import machine_info  # one description of the machine for both benchmarks

    info = machine_info()
    return f"{info['cpu']}, {info['cores']} cores, Python {info['python']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=["Pilatus1M", "Eiger4M"])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", help="also write the raw numbers to this file")
    parser.add_argument("--backend", choices=("cython", "python"), default="cython",
                        help="azfilter backend, against pyFAI's implementation of that name")
    parser.add_argument("--outlier-cost", action="store_true",
                        help="measure the outlier statistics' extra cost (Cython) instead")
    parser.add_argument("--passes", action="store_true",
                        help="time the Cython kernels pass by pass (case (b) settings)")
    parser.add_argument("--baseline", help="another build of azfilter._engine (.so) to time "
                        "alongside (with --passes, or against pyFAI)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="with --passes: OpenMP threads per call (default 1 2)")
    parser.add_argument("--splits", nargs="+", choices=("no", "full"), default=["no"],
                        help="with --passes: tables to time (default no; full times the "
                        "integrate calls on the full-split table)")
    parser.add_argument("--interleaved", action="store_true",
                        help="pyFAI, azfilter (and --baseline) call after call in one process "
                        "per detector: ratios under the same load")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        tool, detector, poni_path, repeat, backend = args.worker
        if os.environ.get(KERNELS_VARIABLE):
            import azfilter

            kernels = as_current_interface(load_kernels(os.environ[KERNELS_VARIABLE]))
            sys.modules["azfilter._engine"] = kernels
            azfilter._engine = kernels
        worker = {"azfilter": worker_azfilter, "pyfai": worker_pyfai,
                  "outliers": worker_outlier_cost, "interleaved": worker_interleaved}[tool]
        print(json.dumps(worker(detector, poni_path, int(repeat), backend)))
        return

    if args.outlier_cost:
        outlier_cost(args)
        return
    if args.interleaved:
        interleaved(args)
        return
    if args.passes:
        passes(args)
        return

    import pyFAI

    import azfilter

    print(f"# machine: {machine_line()}")
    print(f"# azfilter {azfilter.__version__} ({args.backend} backend), pyFAI {pyFAI.version} "
          f"(method=(split, 'csr', '{args.backend}'))")
    results = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for detector in args.detectors:
            poni_path = os.path.join(tmp, f"{detector}.poni")
            Path(poni_path).write_text(poni_text(detector))
            az_res = run_worker("azfilter", detector, poni_path, args.repeat, args.backend)
            fai_res = run_worker("pyfai", detector, poni_path, args.repeat, args.backend)
            results[detector] = {"azfilter": az_res, "pyfai": fai_res}
            if args.baseline:
                results[detector]["baseline"] = run_worker(
                    "azfilter", detector, poni_path, args.repeat, args.backend, args.baseline)
            for op in OPERATIONS:
                rows.append((detector, op, fai_res["ms"][op], az_res["ms"][op],
                             fai_res["ms"][op] / az_res["ms"][op], fai_res["cold_ms"][op],
                             az_res["cold_ms"][op], az_res["warm_ms"][op]))
            rows.append((detector, "peak memory (MB)", fai_res["peak_mb"], az_res["peak_mb"],
                         None, None, None, None))

    header = ("| detector | operation | pyFAI ms/frame | azfilter ms/frame | ratio | "
              "pyFAI first call ms | azfilter first call, cold cache ms | warm cache ms |")
    print(header)
    print("|" + "---|" * 8)
    for det, op, fai, az_, ratio, fai_cold, az_cold, az_warm in rows:
        if ratio is None:
            print(f"| {det} | {op} | {fai:.0f} | {az_:.0f} | | | | |")
        else:
            print(f"| {det} | {op} | {fai:.1f} | {az_:.1f} | {ratio:.1f}x | {fai_cold:.0f} | "
                  f"{az_cold:.0f} | {az_warm:.0f} |")
    if args.baseline:
        print(f"\nbaseline kernels ({args.baseline}), same run:\n")
        print("| detector | operation | baseline ms/frame | ratio pyFAI / baseline | "
              "this build ms/frame | this build / baseline |")
        print("|" + "---|" * 6)
        for detector, res in results.items():
            for op in OPERATIONS:
                base, now, fai = (res["baseline"]["ms"][op], res["azfilter"]["ms"][op],
                                  res["pyfai"]["ms"][op])
                print(f"| {detector} | {op} | {base:.1f} | {fai / base:.1f}x | {now:.1f} | "
                      f"{now / base:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def interleaved(args: argparse.Namespace) -> None:
    """Print (and store with ``--json``) the --interleaved table: per detector and operation,
    pyFAI, azfilter and the baseline build, median and fastest ms per frame, and the ratios."""
    import pyFAI

    import azfilter

    print(f"# machine: {machine_line()}, load average {os.getloadavg()[0]:.2f}")
    print(f"# azfilter {azfilter.__version__} ({args.backend} backend), pyFAI {pyFAI.version}; "
          f"calls interleaved, {args.repeat} rounds; ms per frame, median (fastest)")
    tools = ["pyfai", "azfilter"] + (["baseline"] if args.baseline else [])
    header = "| detector | operation | " + " | ".join(f"{t} ms" for t in tools) + \
        " | ratio pyFAI / azfilter | " + ("ratio pyFAI / baseline |" if args.baseline else "")
    print(header)
    print("|" + "---|" * (3 + len(tools) + (1 if args.baseline else 0)))
    results = {}
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            os.environ[BASELINE_VARIABLE] = args.baseline
        try:
            for detector in args.detectors:
                poni_path = os.path.join(tmp, f"{detector}.poni")
                Path(poni_path).write_text(poni_text(detector))
                res = results[detector] = run_worker("interleaved", detector, poni_path,
                                                     args.repeat, args.backend)
                for op in OPERATIONS:
                    row = res[op]
                    cells = " | ".join(f"{row[t]['median']:.1f} ({row[t]['fastest']:.1f})"
                                       for t in tools)
                    ratios = [row["pyfai"]["median"] / row[t]["median"] for t in tools[1:]]
                    print(f"| {detector} | {op} | {cells} | "
                          + " | ".join(f"{r:.1f}x" for r in ratios) + " |")
        finally:
            os.environ.clear()
            os.environ.update(env)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def outlier_cost(args: argparse.Namespace) -> None:
    """Print (and store with ``--json``) the outlier statistics' cost per detector."""
    import azfilter
    from azfilter import _engine

    print(f"# machine: {machine_line()}")
    print(f"# azfilter {azfilter.__version__} Cython engine, {_engine.default_threads()} "
          f"threads: sigma_clip and medfilt kernels without / with the outlier statistics")
    print("| detector | operation | without ms/frame | with ms/frame | extra ms | extra % |")
    print("|" + "---|" * 6)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for detector in args.detectors:
            poni_path = os.path.join(tmp, f"{detector}.poni")
            Path(poni_path).write_text(poni_text(detector))
            results[detector] = res = run_worker("outliers", detector, poni_path, args.repeat,
                                                 "cython")
            for op, times in res.items():
                extra = times["with_ms"] - times["without_ms"]
                print(f"| {detector} | {op} | {times['without_ms']:.1f} | "
                      f"{times['with_ms']:.1f} | {extra:+.1f} | "
                      f"{100 * extra / times['without_ms']:+.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def load_kernels(path: str):
    """An ``_engine`` extension module from a file (another build, for before/after)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_engine", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _WithoutRowWeights:
    """An older build of ``azfilter._engine`` under the engine's current calls: it has no
    ``integrate_weights`` (the engine then passes ``row_weights=None``, which is dropped)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    @staticmethod
    def integrate_weights(*args, **kwargs) -> None:
        return None

    def integrate(self, *args, row_weights=None, **kwargs):
        return self._module.integrate(*args, **kwargs)


def as_current_interface(module):
    """``module`` (a build of the kernels), wrapped when it predates ``integrate_weights``."""
    return module if hasattr(module, "integrate_weights") else _WithoutRowWeights(module)


def copy_bandwidth(megabytes: int = 256, repeat: int = 7) -> float:
    """GB/s of a one-thread numpy copy (bytes read + bytes written), fastest of ``repeat``."""
    import numpy as np

    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    best = min(timed(lambda: np.copyto(target, source), 1) for _ in range(repeat))
    return 2 * source.nbytes / best / 1e6


# --passes: (label, kernel, (its arguments after the table and dummies..., with statistics))
PASS_CALLS = (
    ("integrate poisson", "integrate", ("poisson", False)),
    ("integrate azimuthal", "integrate", ("azimuthal", False)),
    ("sigma_clip max_iter 0", "sigma_clip", ("azimuthal", 5.0, 0, False)),
    ("sigma_clip max_iter 0 + stats", "sigma_clip", ("azimuthal", 5.0, 0, True)),
    ("sigma_clip max_iter 5", "sigma_clip", ("azimuthal", 5.0, 5, False)),
    ("sigma_clip max_iter 5 + stats", "sigma_clip", ("azimuthal", 5.0, 5, True)),
)


def passes(args: argparse.Namespace) -> None:
    """Print (and store with ``--json``) per-pass kernel times, bytes per frame, bandwidth."""
    import azfilter as az
    from azfilter import _engine

    builds = {"this build": _engine}
    if args.baseline:
        builds["baseline"] = load_kernels(args.baseline)
    bandwidth = copy_bandwidth()
    print(f"# machine: {machine_line()}, load average {os.getloadavg()[0]:.2f}")
    print(f"# numpy copy, one thread: {bandwidth:.1f} GB/s (read + write)")
    print(f"# fastest of {args.repeat} interleaved calls, ms per frame; GB/s = bytes per "
          "frame (table streams + frame) / time")
    print("| detector | threads | call | " + " | ".join(f"{b} ms" for b in builds)
          + " | GB/s (this build) |")
    print("|" + "---|" * (4 + len(builds)))
    results: dict = {"copy_gb_s": bandwidth}
    with tempfile.TemporaryDirectory() as tmp:
        for detector in args.detectors:
            poni_path = os.path.join(tmp, f"{detector}.poni")
            Path(poni_path).write_text(poni_text(detector))
            geo, frame, mask = make_frame(detector, poni_path)
            integ = az.Integrator(geo, npt=1000, unit="q_nm^-1", mask=mask, polarization=0.99,
                                  solid_angle=True, backend="cython")
            for split in args.splits:
                passes_of_table(args, builds, results, detector, integ.engine(split, frame.dtype),
                                frame, split)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def passes_of_table(args: argparse.Namespace, builds: dict, results: dict, detector: str,
                    engine, frame, split: str) -> None:
    """The --passes rows of one table (``split``): every call of PASS_CALLS on the no-split
    table, the integrate calls on the full-split one. integrate gets the table's row weights
    in the builds that take them (as the engine passes them)."""
    import numpy as np

    raw = engine._frame(frame)
    table = engine._table()
    stream_bytes = sum(a.nbytes for a in table[1:] if a is not None)
    frame_bytes = raw.nbytes
    stats = np.empty((4, engine.npt))
    common = (raw, *table, None, engine.dummy, engine.delta_dummy)
    key = detector if split == "no" else f"{detector} {split}-split"
    res = results[key] = {"table_stream_bytes": stream_bytes,
                          "frame_bytes": frame_bytes, "entries": int(raw.size),
                          "ms": {}}
    print(f"| {key} | | bytes per frame: table streams {stream_bytes / 1e6:.1f} "
          f"MB ({table[1].size} entries), frame {frame_bytes / 1e6:.1f} MB | |")
    weights = {name: (kernels.integrate_weights(*table[:4])
                      if hasattr(kernels, "integrate_weights") else None)
               for name, kernels in builds.items()}
    for threads in args.threads:
        works = {name: np.empty(kernels.workspace_doubles(engine._longest_row, threads))
                 for name, kernels in builds.items()}
        for label, function, extra in PASS_CALLS:
            if split != "no" and function != "integrate":
                continue
            best = dict.fromkeys(builds, float("inf"))
            for _ in range(args.repeat):
                for name, kernels in builds.items():
                    arguments = (*common, *extra[:-1], threads, works[name])
                    if extra[-1]:
                        arguments += (3.0, stats)
                    options = ({"row_weights": weights[name]}
                               if function == "integrate" and weights[name] is not None
                               else {})
                    t0 = time.perf_counter()
                    getattr(kernels, function)(*arguments, **options)
                    best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
            res["ms"][f"{threads} {label}"] = best
            gb_s = (stream_bytes + frame_bytes) / best["this build"] / 1e6
            print(f"| {key} | {threads} | {label} | "
                  + " | ".join(f"{best[b]:.2f}" for b in builds) + f" | {gb_s:.1f} |")


if __name__ == "__main__":
    main()
