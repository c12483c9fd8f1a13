"""End-to-end command-line benchmark: ``azfilter sigma-clip`` against ``pyFAI-integrate``.

Both commands run as fresh processes on the same inputs with equivalent options, in the same
run, one after the other, and write the same kind of output.  Two cases:

(a) one Pilatus 1M frame (the real ``Pilatus1M.edf`` AgBh image of the test data, else a
    synthetic one) reduced to one text file, from a cold start: interpreter start, imports,
    PONI, lookup table, reduction, writing.  azfilter runs with a cold on-disk lookup-table
    cache (a fresh empty ``AZFILTER_CACHE_DIR``) and with a warm one.  pyFAI has no on-disk
    cache: every process builds its table.
(b) an Eiger 4M stack of N uint32 frames compressed with bitshuffle-LZ4 (one frame per
    chunk; synthetic rings, Poisson noise, Bragg spots, hot and dead pixels, gaps at 2^32-1)
    reduced to one HDF5 file.  The output of each tool is checked to hold one row per frame.

For each run: wall time (median over the repeats), CPU time (user + system) of the child,
frames/s and peak resident memory (``ru_maxrss`` of the child, from ``os.wait4``).  The ratio
is pyFAI's median wall time over azfilter's.  In (a) each tool runs once untimed first, so
that both find their libraries in the page cache; in (b) the stack is read once beforehand.
The stack is generated once into ``bench/data/`` (git-ignored) and reused.  azfilter is
started as a wheel would install it (see :func:`azfilter_launcher`; ``--install editable``
times the development install), with bytecode caching on.

Usage::

    .venv/bin/python bench/bench_cli.py                 # full run (about 5 minutes)
    .venv/bin/python bench/bench_cli.py --quick         # (b): 20 frames, once
    .venv/bin/python bench/bench_cli.py --backend python --frames 10 --json out.json
    .venv/bin/python bench/bench_cli.py --profile       # + where azfilter's time goes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TESTDATA = Path(os.environ.get("AZFILTER_TESTDATA", "/work/shared/testdata"))
PILATUS_FRAME = TESTDATA / "silx_Pilatus1M_AgBh" / "Pilatus1M.edf"
PILATUS_PONI = TESTDATA / "silx_Pilatus1M_AgBh" / "Pilatus1M_wl1A.poni"

# Equivalent reduction parameters of both tools.
THRES = 5.0
MAX_ITER = 5
UNIT = "q_nm^-1"
POLARIZATION = 0.99
ERROR_MODEL = "azimuthal"

# Stack generation: a few distinct Poisson samples, cycled, with the Bragg spots moved per frame.
STACK_VERSION = 1
DISTINCT_FRAMES = 4
H5PATH = "/entry/data/data"

# The issues' targets (pyFAI wall time / azfilter wall time).
TARGETS = {"a": 4.0, "b": 3.0, "c": 6.0, "d": 6.0}


# ============================================================================ running a child


@dataclass
class Run:
    """One timed child process."""

    wall_s: float
    cpu_s: float
    peak_mb: float
    returncode: int
    stderr_tail: str


def run_child(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> Run:
    """Run ``argv`` to completion; wall time, CPU time and peak RSS of that child only."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        # wait4 (not Popen.wait) gives the rusage of this child alone: its peak memory is
        # not mixed with that of the other runs.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-3000:]
    return Run(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
               peak_mb=usage.ru_maxrss / 1024.0, returncode=proc.returncode,
               stderr_tail=tail)


def checked(run: Run, what: str) -> Run:
    if run.returncode != 0:
        sys.exit(f"bench_cli: {what} failed (exit {run.returncode}):\n{run.stderr_tail}")
    return run


@dataclass
class Launcher:
    """How to start a tool: argv prefix, environment, and a description for the report."""

    argv: list[str]
    env: dict[str, str]
    how: str


def child_environment() -> dict[str, str]:
    """The environment of every timed child.  Bytecode caching is on, as on a user's machine
    (this sandbox sets PYTHONDONTWRITEBYTECODE, which would make azfilter recompile its
    modules at every start while pyFAI's installed .pyc files are used)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def entry_script() -> str:
    """The ``azfilter`` script a wheel installs: the ``[project.scripts]`` entry of
    pyproject.toml (so the bench starts the command the way users do, exit included)."""
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = target["azfilter"].split(":")
    return f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n"


def azfilter_launcher(mode: str, work: Path) -> Launcher:
    """How to start azfilter.

    ``installed``: the ``azfilter`` entry point next to this Python.  ``editable``: the same,
    but through meson-python's editable loader, which runs a ``ninja`` up-to-date check at
    every start (a development install only).  ``snapshot``: what a wheel would install (the
    package's .py files, the compiled modules and the OpenCL kernels) copied into the work
    dir, started by the same entry-point code.  ``source``: ``python -m azfilter`` from the
    source tree (no compiled backend).  ``auto``: snapshot for an editable install with a
    compiled engine, else installed, else source.
    """
    env = child_environment()
    entry = BIN / "azfilter"
    finder = next((f for f in sys.meta_path if type(f).__name__ == "MesonpyMetaFinder"), None)
    try:
        import azfilter._engine as engine
    except ImportError:
        engine = None
    if mode == "auto":
        if finder is not None and engine is not None:
            mode = "snapshot"
        else:
            mode = "installed" if entry.exists() else "source"
    if mode in ("installed", "editable"):
        if not entry.exists():
            sys.exit(f"bench_cli: {entry} not found (make install)")
        how = "entry point" + (" (meson-python editable loader)" if finder else "")
        return Launcher([str(entry)], env, f"{entry}, {how}")
    if mode == "source":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if finder is not None:
            env["MESONPY_EDITABLE_SKIP"] = finder._build_path
        return Launcher([sys.executable, "-m", "azfilter"], env,
                        f"{sys.executable} -m azfilter from the source tree")
    if engine is None:
        sys.exit("bench_cli: --install snapshot needs the compiled engine (make install)")
    import azfilter

    site = work / "site"
    package = site / "azfilter"
    shutil.copytree(Path(azfilter.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # every compiled module of the package (_engine, _tables, _chunks, _cbf), as a wheel has
    # them
    suffix = Path(engine.__file__).name[len("_engine"):]
    for module in Path(engine.__file__).parent.glob(f"_*{suffix}"):
        shutil.copy2(module, package / module.name)
    (package / "kernels").mkdir(exist_ok=True)
    for kernel in (REPO / "kernels").glob("*.cl"):
        shutil.copy2(kernel, package / "kernels" / kernel.name)
    script = site / "bin" / "azfilter"
    script.parent.mkdir()
    script.write_text(entry_script())
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if finder is not None:
        env["MESONPY_EDITABLE_SKIP"] = finder._build_path  # the editable loader steps aside
    check = subprocess.run([sys.executable, "-c", "import azfilter, azfilter._engine; "
                            "print(azfilter.__file__)"], env=env, cwd=work, capture_output=True,
                           text=True)
    if check.returncode != 0 or not check.stdout.strip().startswith(str(site)):
        sys.exit(f"bench_cli: the snapshot install in {site} is not the azfilter that "
                 f"imports:\n{check.stdout}{check.stderr}")
    return Launcher([sys.executable, str(script)], env,
                    "snapshot of the built package (as a wheel installs it), entry-point code")


def pyfai_argv() -> list[str]:
    entry = BIN / "pyFAI-integrate"
    if not entry.exists():
        found = shutil.which("pyFAI-integrate")
        if not found:
            sys.exit("bench_cli: pyFAI-integrate not found (pip install pyfai)")
        entry = Path(found)
    return [str(entry)]


# ============================================================================ inputs


def pyfai_config(geometry: Any, npt: int, mask_file: str | None) -> dict[str, Any]:
    """The pyFAI WorkerConfig (version 5) equivalent to ``azfilter sigma-clip`` here."""
    return {
        "application": "worker", "version": 5,
        "poni": {"poni_version": 2.1, "dist": geometry.dist, "poni1": geometry.poni1,
                 "poni2": geometry.poni2, "rot1": geometry.rot1, "rot2": geometry.rot2,
                 "rot3": geometry.rot3, "detector": geometry.detector.name,
                 "detector_config": geometry.detector.get_config(),
                 "wavelength": geometry.wavelength},
        "nbpt_rad": npt, "nbpt_azim": None, "unit": UNIT, "chi_discontinuity_at_0": False,
        "polarization_description": [POLARIZATION, 0], "normalization_factor": 1.0,
        "val_dummy": None, "delta_dummy": None, "correct_solid_angle": True,
        "dark_current": None, "flat_field": None, "mask_file": mask_file,
        "error_model": ERROR_MODEL, "method": ["no", "csr", "cython"], "opencl_device": None,
        "azimuth_range": None, "radial_range": None,
        "integrator_class": "AzimuthalIntegrator", "integrator_method": "sigma_clip_ng",
        "extra_options": {"thres": THRES, "max_iter": MAX_ITER},
        "monitor_name": None, "shape": None,
    }


def azfilter_options(poni: Path, npt: int, backend: str, mask: Path | None) -> list[str]:
    options = ["sigma-clip", "-p", str(poni), "--npt", str(npt), "--unit", UNIT,
               "--thres", str(THRES), "--max-iter", str(MAX_ITER),
               "--error-model", ERROR_MODEL, "--polarization", str(POLARIZATION),
               "--backend", backend, "--quiet"]
    if mask is not None:
        options += ["--mask", str(mask)]
    return options


def pilatus_inputs(data_dir: Path, work: Path) -> tuple[Path, Path, Path, str]:
    """(frame, poni, mask file, description): the real AgBh frame, else a synthetic one.

    The mask file flags the frame's dummy pixels (-1 gaps, -2 dead), so that both tools mask
    the same pixels whatever their dummy handling; both add the detector's gap mask.
    """
    import fabio
    import numpy as np

    if PILATUS_FRAME.exists() and PILATUS_PONI.exists():
        frame_path, poni_path = PILATUS_FRAME, PILATUS_PONI
        what = f"real frame {PILATUS_FRAME.name} (AgBh, int32)"
    else:
        from azfilter.poni import save_poni
        from tests.synthetic import default_geometry, synthetic_frame

        data_dir.mkdir(parents=True, exist_ok=True)
        frame_path = data_dir / "pilatus1m_synthetic.edf"
        poni_path = data_dir / "pilatus1m_synthetic.poni"
        geometry = default_geometry("Pilatus1M")
        if not frame_path.exists():
            tmp = frame_path.with_suffix(".tmp")
            fabio.edfimage.EdfImage(data=synthetic_frame(geometry=geometry, seed=1)).write(
                str(tmp))
            os.replace(tmp, frame_path)
        save_poni(geometry, str(poni_path))
        what = "synthetic frame (testdata missing)"
    data = fabio.open(str(frame_path)).data
    mask_path = work / "pilatus1m_mask.edf"
    fabio.edfimage.EdfImage(data=(data < 0).astype(np.int8)).write(str(mask_path))
    return frame_path, poni_path, mask_path, what


def make_cbf_files(directory: Path, n: int) -> list[Path]:
    """``n`` Pilatus 1M CBF files (made once, then reused): the real AgBh frame with fresh
    Poisson noise per file, gaps (-1) and dead pixels (-2) kept, written by fabio (int32,
    byte offset, Content-MD5) as a Pilatus writes them."""
    import fabio
    import fabio.cbfimage
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"pilatus1m_{k:04d}.cbf" for k in range(n)]
    if all(p.exists() for p in paths):
        return paths
    if PILATUS_FRAME.exists():
        base = fabio.open(str(PILATUS_FRAME)).data.astype(np.float64)
    else:                                   # no test data: a synthetic Pilatus 1M frame
        from tests.synthetic import default_geometry, synthetic_frame

        base = synthetic_frame(geometry=default_geometry("Pilatus1M"), seed=1)
        base = np.asarray(base[0] if isinstance(base, tuple) else base, np.float64)
    rng = np.random.default_rng(0)
    for path in paths:
        frame = rng.poisson(np.clip(base, 0, None)).astype(np.int32)
        frame[base < 0] = base[base < 0].astype(np.int32)       # gaps -1, dead -2
        tmp = path.with_suffix(".tmp")
        fabio.cbfimage.CbfImage(data=frame).write(str(tmp))
        os.replace(tmp, path)
    return paths


def eiger_stack(data_dir: Path, n_frames: int) -> tuple[Path, Path, float]:
    """The Eiger 4M bitshuffle-LZ4 stack of ``n_frames`` and its PONI (made once, then reused);
    also the seconds spent generating it (0 when reused)."""
    import h5py

    from azfilter.poni import save_poni
    from tests.synthetic import default_geometry

    data_dir.mkdir(parents=True, exist_ok=True)
    poni_path = data_dir / "eiger4m.poni"
    stack_path = data_dir / f"eiger4m_bslz4_{n_frames}f_v{STACK_VERSION}.h5"
    geometry = default_geometry("Eiger4M")
    save_poni(geometry, str(poni_path))
    if stack_path.exists():
        try:
            with h5py.File(stack_path, "r") as h5:
                if h5.attrs.get("complete") and h5[H5PATH].shape[0] == n_frames:
                    return stack_path, poni_path, 0.0
        except OSError:
            pass
    start = time.perf_counter()
    tmp = stack_path.with_name(stack_path.name + ".tmp")
    write_eiger_stack(tmp, geometry, n_frames)
    os.replace(tmp, stack_path)
    return stack_path, poni_path, time.perf_counter() - start


def eiger_frames(geometry: Any, n_frames: int) -> Any:
    """Synthetic Eiger 4M uint32 frames, one after the other: DISTINCT_FRAMES Poisson samples
    of one powder pattern (with fixed hot pixels, dead pixels and gaps at 2^32-1), cycled,
    plus ~one Bragg spot per 2000 pixels whose positions move from frame to frame (rolled)."""
    import numpy as np

    from tests.synthetic import synthetic_case

    case = synthetic_case(geometry=geometry, seed=0, n_spots=0)
    shape = case.raw.shape
    invalid = np.flatnonzero(case.raw.ravel() == np.iinfo(np.uint32).max)
    hot = case.hot
    rng = np.random.default_rng(1)
    bases = [case.raw]
    for _ in range(DISTINCT_FRAMES - 1):
        raw = rng.poisson(case.expected).astype(np.uint32)
        raw[hot] = case.raw[hot]
        raw.ravel()[invalid] = np.iinfo(np.uint32).max
        bases.append(raw)
    # 3x3 spots: centres + offsets, values 500-5000 counts
    n_spots = shape[0] * shape[1] // 2000
    centre_rows = rng.integers(0, shape[0], n_spots)
    centre_cols = rng.integers(0, shape[1], n_spots)
    offsets = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    spot_rows = (centre_rows[:, None] + offsets[None, :, 0]).ravel()
    spot_cols = (centre_cols[:, None] + offsets[None, :, 1]).ravel()
    spot_counts = rng.uniform(500, 5000, spot_rows.size).astype(np.uint32)
    for k in range(n_frames):
        frame = bases[k % DISTINCT_FRAMES].copy()
        rows = (spot_rows + 37 * k) % shape[0]
        cols = (spot_cols + 101 * k) % shape[1]
        frame[rows, cols] += spot_counts
        frame.ravel()[invalid] = np.iinfo(np.uint32).max
        yield frame


def write_eiger_stack(path: Path, geometry: Any, n_frames: int) -> None:
    """:func:`eiger_frames` written as a bitshuffle-LZ4 stack, one frame per chunk."""
    import h5py
    import hdf5plugin
    import numpy as np

    shape = geometry.detector.shape
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset(H5PATH, shape=(n_frames, *shape), dtype=np.uint32,
                                 chunks=(1, *shape), **hdf5plugin.Bitshuffle())
        h5["entry"].attrs["NX_class"] = "NXentry"
        h5["entry/data"].attrs["NX_class"] = "NXdata"
        h5["entry/data"].attrs["signal"] = "data"
        for k, frame in enumerate(eiger_frames(geometry, n_frames)):
            dset[k] = frame
        h5.attrs["complete"] = True
        h5.attrs["description"] = (
            f"bench_cli.py v{STACK_VERSION}: synthetic Eiger 4M, {DISTINCT_FRAMES} Poisson "
            "samples cycled, moving 3x3 Bragg spots, hot pixels, gaps and dead at 2^32-1")


def read_page_cache(path: Path) -> None:
    """Read a file once so that every timed run finds it in the page cache."""
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass


# ============================================================================ checks


def load_dat(path: Path) -> Any:
    import numpy as np

    return np.loadtxt(path, comments="#", ndmin=2)


def compare_profiles(radial_a: Any, intensity_a: Any, radial_b: Any, intensity_b: Any) -> dict:
    """How far two reductions of the same frames are apart (a sanity check that the tools
    were given equivalent options, not an accuracy test)."""
    import numpy as np

    radial_a, radial_b = np.asarray(radial_a, float), np.asarray(radial_b, float)
    intensity_a, intensity_b = np.asarray(intensity_a, float), np.asarray(intensity_b, float)
    out: dict[str, Any] = {"same_shape": intensity_a.shape == intensity_b.shape}
    if not out["same_shape"] or radial_a.shape != radial_b.shape:
        return out
    out["radial_max_rel_diff"] = float(np.max(np.abs(radial_a - radial_b))
                                       / np.max(np.abs(radial_b)))
    good = np.isfinite(intensity_a) & np.isfinite(intensity_b) & (intensity_b != 0)
    rel = np.abs(intensity_a[good] - intensity_b[good]) / np.abs(intensity_b[good])
    out["intensity_median_rel_diff"] = float(np.median(rel)) if rel.size else float("nan")
    out["intensity_p99_rel_diff"] = float(np.percentile(rel, 99)) if rel.size else float("nan")
    return out


def azfilter_h5_result(path: Path) -> tuple[Any, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        signal = data.attrs["signal"]               # "I" (NXazint1d) or "intensity" (older)
        signal = signal.decode() if isinstance(signal, bytes) else str(signal)
        axis = data.attrs["axes"][-1]
        axis = axis.decode() if isinstance(axis, bytes) else str(axis)
        return data[axis][()], data[signal][()]


def pyfai_h5_result(path: Path) -> tuple[Any, Any]:
    import h5py

    with h5py.File(path, "r") as h5:
        entry = h5.attrs.get("default", "entry_0000")
        if isinstance(entry, bytes):
            entry = entry.decode()
        results = h5[f"{entry}/integrate/results"]
        return results["radial"][()], results["data"][()]


# ============================================================================ the cases


@dataclass
class Row:
    case: str
    tool: str
    variant: str
    frames: int
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.walls.append(run.wall_s)
        self.cpus.append(run.cpu_s)
        self.peaks.append(run.peak_mb)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    @property
    def peak(self) -> float:
        return max(self.peaks)


def case_a(args: argparse.Namespace, work: Path) -> tuple[list[Row], dict]:
    """One Pilatus 1M frame to a text file, fresh processes."""
    az_cmd, az_env = args.launcher.argv, args.launcher.env
    frame, poni, mask, what = pilatus_inputs(args.data_dir, work)
    import azfilter

    geometry = azfilter.load_poni(str(poni))
    config = work / "pilatus1m_pyfai.json"
    config.write_text(json.dumps(pyfai_config(geometry, args.npt, str(mask)), indent=1))
    az_base = az_cmd + azfilter_options(poni, args.npt, args.backend, mask)
    warm_cache = work / "cache-warm"
    warm_cache.mkdir()
    counter = iter(range(10**6))

    def fresh(prefix: str) -> Path:
        path = work / f"{prefix}{next(counter)}"
        path.mkdir()
        return path

    def run_pyfai() -> tuple[Run, Path]:
        out = fresh("a-pyfai-out")
        argv = pyfai_argv() + ["--no-gui", "-j", str(config), "-o", str(out), str(frame)]
        return checked(run_child(argv, child_environment(), work, work / "a-pyfai.log"),
                       "pyFAI-integrate (a)"), out

    def run_azfilter(cache: Path) -> tuple[Run, Path]:
        out = fresh("a-az-out")
        env = dict(az_env, AZFILTER_CACHE_DIR=str(cache))
        argv = az_base + [str(frame), "-o", f"{out}/"]
        return checked(run_child(argv, env, work, work / "a-azfilter.log"),
                       "azfilter (a)"), out

    rows = {
        "pyfai": Row("a", "pyFAI-integrate", "", 1),
        "cold": Row("a", "azfilter", "cold table cache", 1),
        "warm": Row("a", "azfilter", "warm table cache", 1),
    }
    # Untimed: page in both tools' libraries; fills the warm cache.
    _, pyfai_out = run_pyfai()
    _, az_out = run_azfilter(warm_cache)
    for _ in range(args.repeat):
        # Interleaved, so that a burst of load from other users spreads over all three.
        run, pyfai_out = run_pyfai()
        rows["pyfai"].add(run)
        run, _ = run_azfilter(fresh("cache-cold"))
        rows["cold"].add(run)
        run, az_out = run_azfilter(warm_cache)
        rows["warm"].add(run)

    pyfai_dat = sorted(pyfai_out.iterdir())
    az_dat = sorted(az_out.iterdir())
    if len(pyfai_dat) != 1 or len(az_dat) != 1:
        sys.exit(f"bench_cli: (a) expected one text file from each tool, got "
                 f"{[p.name for p in pyfai_dat]} and {[p.name for p in az_dat]}")
    fai, az = load_dat(pyfai_dat[0]), load_dat(az_dat[0])
    info = {"input": what, "frame": str(frame), "poni": str(poni), "npt": args.npt,
            "outputs": [pyfai_dat[0].name, az_dat[0].name],
            "agreement": compare_profiles(az[:, 0], az[:, 1], fai[:, 0], fai[:, 1])}
    return list(rows.values()), info


def case_b(args: argparse.Namespace, work: Path) -> tuple[list[Row], dict]:
    """An Eiger 4M bitshuffle-LZ4 stack to one HDF5 file."""
    az_cmd, az_env = args.launcher.argv, args.launcher.env
    stack, poni, generated_s = eiger_stack(args.data_dir, args.frames)
    import azfilter

    geometry = azfilter.load_poni(str(poni))
    config = work / "eiger4m_pyfai.json"
    config.write_text(json.dumps(pyfai_config(geometry, args.npt, None), indent=1))
    read_page_cache(stack)
    az_base = az_cmd + azfilter_options(poni, args.npt, args.backend, None)
    counter = iter(range(10**6))

    rows = {"pyfai": Row("b", "pyFAI-integrate", "", args.frames),
            "az": Row("b", "azfilter", "cold table cache", args.frames)}
    az_out = pyfai_out = None
    for _ in range(args.stack_repeat):
        k = next(counter)
        az_out = work / f"b-az-{k}.h5"
        cache = work / f"cache-b-{k}"
        cache.mkdir()
        env = dict(az_env, AZFILTER_CACHE_DIR=str(cache))
        rows["az"].add(checked(run_child(az_base + [str(stack), "-o", str(az_out)], env, work,
                                         work / "b-azfilter.log"), "azfilter (b)"))
        pyfai_out = work / f"b-pyfai-{k}.h5"
        argv = pyfai_argv() + ["--no-gui", "-j", str(config), "-o", str(pyfai_out),
                               f"{stack}::{H5PATH}"]
        rows["pyfai"].add(checked(run_child(argv, child_environment(), work,
                                            work / "b-pyfai.log"), "pyFAI-integrate (b)"))

    az_radial, az_intensity = azfilter_h5_result(az_out)
    fai_radial, fai_intensity = pyfai_h5_result(pyfai_out)
    shapes = {"azfilter": list(az_intensity.shape), "pyFAI": list(fai_intensity.shape)}
    expected = [args.frames, args.npt]
    if shapes["azfilter"] != expected or shapes["pyFAI"] != expected:
        sys.exit(f"bench_cli: (b) output shapes {shapes}, expected {expected} for both")
    info = {"input": f"{stack.name}: {args.frames} x {geometry.detector.shape} uint32, "
                     f"bitshuffle-LZ4, {stack.stat().st_size / 2**20:.0f} MiB",
            "stack": str(stack), "poni": str(poni), "npt": args.npt,
            "generated_s": round(generated_s, 1), "output_shapes": shapes,
            "agreement": compare_profiles(az_radial, az_intensity, fai_radial, fai_intensity)}
    return [rows["pyfai"], rows["az"]], info


def case_cbf(args: argparse.Namespace, work: Path, case: str) -> tuple[list[Row], dict]:
    """N Pilatus 1M CBF files to one text file each (``c``) or to one HDF5 file (``d``),
    fresh processes; azfilter with an empty and with a filled table cache."""
    az_cmd, az_env = args.launcher.argv, args.launcher.env
    files = make_cbf_files(args.data_dir / "pilatus1m_cbf", args.cbf_files)
    _, poni, mask, what = pilatus_inputs(args.data_dir, work)
    import azfilter

    geometry = azfilter.load_poni(str(poni))
    config = work / f"cbf_pyfai_{case}.json"
    config.write_text(json.dumps(pyfai_config(geometry, args.npt, str(mask)), indent=1))
    for path in files:
        read_page_cache(path)
    az_base = az_cmd + azfilter_options(poni, args.npt, args.backend, mask)
    text = case == "c"
    warm_cache = work / f"cache-{case}-warm"
    warm_cache.mkdir()
    counter = iter(range(10**6))
    n = len(files)

    def output(tool: str) -> Path:
        path = work / f"{case}-{tool}-{next(counter)}"
        if text:
            path.mkdir()
            return path
        return path.with_suffix(".h5")

    def run_pyfai() -> tuple[Run, Path]:
        out = output("pyfai")
        argv = pyfai_argv() + ["--no-gui", "-j", str(config), "-o", str(out)] + \
            [str(p) for p in files]
        return checked(run_child(argv, child_environment(), work, work / f"{case}-pyfai.log"),
                       f"pyFAI-integrate ({case})"), out

    def run_azfilter(cache: Path) -> tuple[Run, Path]:
        out = output("az")
        env = dict(az_env, AZFILTER_CACHE_DIR=str(cache))
        argv = az_base + [str(p) for p in files] + ["-o", f"{out}/" if text else str(out)]
        return checked(run_child(argv, env, work, work / f"{case}-azfilter.log"),
                       f"azfilter ({case})"), out

    rows = {"pyfai": Row(case, "pyFAI-integrate", "", n),
            "cold": Row(case, "azfilter", "cold table cache", n),
            "warm": Row(case, "azfilter", "warm table cache", n)}
    run_azfilter(warm_cache)               # untimed: fills the warm cache, pages libraries in
    for _ in range(args.cbf_repeat):
        # interleaved, so that a burst of load from other users spreads over all three
        run, pyfai_out = run_pyfai()
        rows["pyfai"].add(run)
        cache = work / f"cache-{case}-cold-{next(counter)}"
        cache.mkdir()
        run, _ = run_azfilter(cache)
        rows["cold"].add(run)
        run, az_out = run_azfilter(warm_cache)
        rows["warm"].add(run)

    if text:
        pyfai_dat, az_dat = sorted(pyfai_out.iterdir()), sorted(az_out.iterdir())
        if len(pyfai_dat) != n or len(az_dat) != n:
            sys.exit(f"bench_cli: ({case}) expected {n} text files from each tool, got "
                     f"{len(pyfai_dat)} and {len(az_dat)}")
        fai, az = load_dat(pyfai_dat[-1]), load_dat(az_dat[-1])
        agreement = compare_profiles(az[:, 0], az[:, 1], fai[:, 0], fai[:, 1])
        shapes = {"azfilter": [len(az_dat), *az.shape], "pyFAI": [len(pyfai_dat), *fai.shape]}
    else:
        az_radial, az_intensity = azfilter_h5_result(az_out)
        fai_radial, fai_intensity = pyfai_h5_result(pyfai_out)
        shapes = {"azfilter": list(az_intensity.shape), "pyFAI": list(fai_intensity.shape)}
        if shapes["azfilter"] != [n, args.npt] or shapes["pyFAI"] != [n, args.npt]:
            sys.exit(f"bench_cli: ({case}) output shapes {shapes}, expected {[n, args.npt]}")
        agreement = compare_profiles(az_radial, az_intensity, fai_radial, fai_intensity)
    info = {"input": f"{n} Pilatus 1M int32 CBF files (byte offset, from {what})",
            "files": str(files[0].parent), "poni": str(poni), "npt": args.npt,
            "output_shapes": shapes, "agreement": agreement}
    return list(rows.values()), info


# ============================================================================ profiling


# (label, thread role, functions whose cumulative time is that phase: "name" or "name file")
# Reader and writer threads are profiled too; times of several reader threads add up
# (thread-seconds).  Compiled code (OpenMP, decompression) counts in the Python function
# that called it.
PROFILE_PHASES = [
    ("import azfilter.cli (click, config)", "main", ["<module> azfilter/cli.py"]),
    ("PONI + geometry", "main", ["load_poni azfilter/poni.py"]),
    ("lookup table (build or cache load)", "main", ["build_csr azfilter/binning.py"]),
    ("integrator set-up incl. table", "main", ["_make_integrator azfilter/cli.py"]),
    ("planning (expand inputs, count frames)", "main", ["_plan azfilter/cli.py"]),
    ("reduction of all frames", "main", ["_reduce azfilter/cli.py"]),
    ("frame loop (reduction + waiting for readers)", "main",
     ["_consume_block azfilter/cli.py"]),
    ("closing the output", "main", ["close azfilter/cli.py"]),
    ("reading + decoding frames (reader threads)", "reader",
     ["open_frames azfilter/frames/stream.py"]),
    ("writing results (writer thread)", "writer", ["write azfilter/cli.py"]),
    ("whole command, main thread (from the import of azfilter.cli)", "main",
     ["run_profiled_cli"]),
]


def profiled_child(stats_dir: str, cli_args: list[str]) -> None:
    """Run ``azfilter CLI_ARGS`` in this process with one cProfile per thread (the main
    thread, each reader, the writer), dumped by thread role into ``stats_dir``."""
    import cProfile
    import threading

    profiles: list[tuple[str, Any]] = []
    lock = threading.Lock()
    original_run = threading.Thread.run

    def profiled_run(thread: threading.Thread) -> None:
        profile = cProfile.Profile()
        with lock:
            profiles.append((thread.name, profile))
        profile.enable()
        try:
            original_run(thread)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    main_profile = cProfile.Profile()
    profiles.append(("main", main_profile))
    status = 0

    def run_profiled_cli() -> None:
        from azfilter.cli import main

        main(cli_args, prog_name="azfilter")

    main_profile.enable()
    try:
        run_profiled_cli()
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        main_profile.disable()
    by_role: dict[str, list[Any]] = {}
    for name, profile in profiles:
        role = ("main" if name == "main" else "reader" if "reader" in name
                else "writer" if "writer" in name else "other")
        by_role.setdefault(role, []).append(profile)
    import pstats

    for role, role_profiles in by_role.items():
        stats = pstats.Stats(role_profiles[0])
        for profile in role_profiles[1:]:
            stats.add(profile)
        stats.dump_stats(os.path.join(stats_dir, f"{role}.pstats"))
    sys.exit(status)


def profile_azfilter(args: argparse.Namespace, work: Path, case: str) -> dict:
    """Where azfilter's time goes on one case: ``-X importtime`` of a plain run (warm cache),
    then a per-thread cProfile run with a cold and with a warm table cache."""
    import pstats

    az_env = args.launcher.env
    if case == "a":
        frame, poni, mask, _ = pilatus_inputs(args.data_dir, work)
        inputs, out = [str(frame)], f"{work / 'profile-a-out'}/"
    else:
        stack, poni, _ = eiger_stack(args.data_dir, args.frames)
        mask, inputs, out = None, [str(stack)], str(work / "profile-b.h5")
    cli_args = azfilter_options(poni, args.npt, args.backend, mask) + inputs + ["-o", out]
    cache = work / f"profile-{case}-cache"
    cache.mkdir()
    env = dict(az_env, AZFILTER_CACHE_DIR=str(cache))

    def clear_output() -> None:
        if os.path.isdir(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.remove(out)

    result: dict[str, Any] = {}
    for label in ("cold", "warm"):  # the same cache dir: empty first, then filled
        stats_dir = work / f"profile-{case}-{label}"
        stats_dir.mkdir()
        clear_output()
        argv = [sys.executable, str(Path(__file__).resolve()), "--profile-child",
                str(stats_dir), "--"] + cli_args
        run = checked(run_child(argv, env, work, stats_dir / "log"),
                      f"profiled azfilter ({case}, {label} cache)")
        stats = {role.stem: pstats.Stats(str(role)) for role in stats_dir.glob("*.pstats")}
        phases = {}
        for phase, role, names in PROFILE_PHASES:
            phases[phase] = cumulative(stats[role], names) if role in stats else None
        result[label] = {"wall_s": run.wall_s, "cpu_s": run.cpu_s, "phases": phases,
                         "top": top_functions(stats["main"], 10),
                         "top_reader": top_functions(stats["reader"], 5)
                         if "reader" in stats else []}
    clear_output()
    log = work / f"profile-{case}-importtime.log"
    run = checked(run_child([sys.executable, "-X", "importtime", "-m", "azfilter"] + cli_args,
                            env, work, log), f"azfilter -X importtime ({case})")
    result["imports"] = parse_importtime(log.read_text())
    result["imports"]["wall_s"] = run.wall_s
    return result


HEAVY_PACKAGES = ("numpy", "scipy", "h5py", "hdf5plugin", "fabio", "PIL", "click", "pyopencl",
                  "matplotlib", "azfilter")


def parse_importtime(log: str) -> dict[str, Any]:
    """Import seconds from ``-X importtime`` lines: the total, the top-level imports (they
    add up to the total), and the first (costly) import of each heavy package wherever it
    happened (``scipy``, ``pyopencl``, ``matplotlib`` should not be there at all)."""
    total = 0.0
    top: dict[str, float] = {}
    heavy: dict[str, float] = {}
    for line in log.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        _, cumulative_us, name = line.split("|")
        try:
            seconds = int(cumulative_us) / 1e6
        except ValueError:
            continue
        module = name.strip()
        if module in HEAVY_PACKAGES:
            # lines come in post-order: the package's own line carries its whole import
            heavy[module] = max(heavy.get(module, 0.0), seconds)
        if not name.startswith("  "):  # one leading space: imported at top level
            total += seconds
            top[module] = top.get(module, 0.0) + seconds
    largest = dict(sorted(top.items(), key=lambda item: -item[1])[:8])
    return {"total": total, "top_level": largest, "packages": heavy}


def cumulative(stats: Any, names: list[str]) -> float | None:
    """Largest cumulative time of the profiled functions matching one of ``names``
    (``function`` or ``function file-suffix``)."""
    best = None
    for (filename, _, function), (_, _, _, cum, _) in stats.stats.items():
        for name in names:
            wanted_function, _, wanted_file = name.partition(" ")
            if function == wanted_function and filename.endswith(wanted_file or filename):
                best = cum if best is None else max(best, cum)
    return best


def top_functions(stats: Any, count: int) -> list[tuple[str, float]]:
    entries = []
    for (filename, line, function), (_, _, tottime, _, _) in stats.stats.items():
        short = "/".join(Path(filename).parts[-2:]) if filename.startswith("/") else filename
        entries.append((f"{function} ({short}:{line})", tottime))
    entries.sort(key=lambda item: -item[1])
    return [(name, round(seconds, 3)) for name, seconds in entries[:count]]


# ============================================================================ report


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    memory_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gb": memory_gb, "python": platform.python_version(),
            "load_average_start": list(os.getloadavg())}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("azfilter", "pyFAI", "numpy", "h5py", "hdf5plugin", "fabio"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "source tree" if package == "azfilter" else "?"
    return out


def table(rows: list[Row]) -> str:
    lines = ["| case | tool | wall s | CPU s | frames/s | peak MB | pyFAI/azfilter wall "
             "| pyFAI/azfilter CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    pyfai = {row.case: row for row in rows if row.tool == "pyFAI-integrate"}
    for row in rows:
        tool = row.tool + (f" ({row.variant})" if row.variant else "")
        ratios = "| |"
        if row.tool == "azfilter":
            ratios = (f"| **{pyfai[row.case].wall / row.wall:.2f}x** | "
                      f"{pyfai[row.case].cpu / row.cpu:.2f}x |")
        case = {"a": "(a) Pilatus 1M, 1 frame -> .dat",
                "b": f"(b) Eiger 4M, {row.frames} frames bslz4 -> .h5",
                "c": f"(c) {row.frames} Pilatus 1M CBF files -> .dat each",
                "d": f"(d) {row.frames} Pilatus 1M CBF files -> one .h5"}[row.case]
        lines.append(f"| {case} | {tool} | {row.wall:.2f} | {row.cpu:.2f} "
                     f"| {row.frames / row.wall:.2f} | {row.peak:.0f} {ratios}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="End-to-end CLI benchmark: azfilter sigma-clip vs pyFAI-integrate.")
    parser.add_argument("--frames", type=int, default=200, help="frames in the Eiger stack")
    parser.add_argument("--repeat", type=int, default=3,
                        help="repeats of case (a) (median reported)")
    parser.add_argument("--stack-repeat", type=int, default=3,
                        help="repeats of case (b) (median reported)")
    parser.add_argument("--npt", type=int, default=1000, help="radial bins")
    parser.add_argument("--backend", default="cython", choices=["cython", "python", "opencl"],
                        help="azfilter backend")
    parser.add_argument("--install", default="auto",
                        choices=["auto", "snapshot", "installed", "editable", "source"],
                        help="how azfilter is started (see azfilter_launcher; default: as a "
                             "wheel would install it)")
    parser.add_argument("--cbf-files", type=int, default=100,
                        help="CBF files in cases (c) and (d)")
    parser.add_argument("--cbf-repeat", type=int, default=3,
                        help="repeats of cases (c) and (d) (median reported)")
    parser.add_argument("--cases", nargs="+", default=["a", "b", "c", "d"],
                        choices=["a", "b", "c", "d"])
    parser.add_argument("--quick", action="store_true",
                        help="20 frames in (b) (unless --frames is given), 3 repeats of (a), "
                             "1 of (b)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one azfilter run of each case (cold and warm cache)")
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench" / "data",
                        help="where the generated stack is kept (default bench/data)")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (outputs, logs)")
    parser.add_argument("--profile-child", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("cli_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile_child:
        profiled_child(args.profile_child, args.cli_args)
    if args.quick and "--frames" not in sys.argv:
        args.frames = 20
    if args.quick:
        args.repeat = min(args.repeat, 3)
        args.stack_repeat = 1
        args.cbf_repeat = 1
    if min(args.repeat, args.stack_repeat, args.frames, args.cbf_files, args.cbf_repeat) < 1:
        parser.error("--repeat, --stack-repeat, --frames, --cbf-files and --cbf-repeat must "
                     "be >= 1")
    # appended, not prepended: an installed (editable) azfilter wins over the source tree;
    # the tests package (synthetic frames) comes from the source tree
    sys.path.append(str(REPO))

    machine = machine_info()
    work = Path(tempfile.mkdtemp(prefix="azf-bench-cli-"))
    report: dict[str, Any] = {"machine": machine, "versions": versions(), "backend": args.backend,
                              "npt": args.npt,
                              "parameters": {"thres": THRES, "max_iter": MAX_ITER, "unit": UNIT,
                                             "error_model": ERROR_MODEL,
                                             "polarization": POLARIZATION},
                              "cases": {}}
    rows: list[Row] = []
    started = time.perf_counter()
    try:
        args.launcher = azfilter_launcher(args.install, work)
        az_how = report["azfilter_command"] = args.launcher.how
        for case in args.cases:
            if case in ("c", "d"):
                case_rows, info = case_cbf(args, work, case)
            else:
                case_rows, info = (case_a if case == "a" else case_b)(args, work)
            rows += case_rows
            info["rows"] = [dict(asdict(row), wall_median=row.wall, cpu_median=row.cpu,
                                 peak_max=row.peak) for row in case_rows]
            pyfai_wall = case_rows[0].wall
            info["ratios"] = {row.variant or row.tool: pyfai_wall / row.wall
                              for row in case_rows[1:]}
            report["cases"][case] = info
        if args.profile:
            report["profile"] = {case: profile_azfilter(args, work, case) for case in args.cases}
    finally:
        if args.keep:
            print(f"# work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = list(os.getloadavg())
    report["total_s"] = time.perf_counter() - started

    print(f"# machine: {machine['cpu']}, {machine['cores']} cores "
          f"({machine['usable_cores']} usable), {machine['memory_gb']} GB, "
          f"Python {machine['python']}; load average at start "
          f"{machine['load_average_start'][0]:.1f}, at end {machine['load_average_end'][0]:.1f}")
    v = report["versions"]
    print(f"# azfilter {v['azfilter']} (--backend {args.backend}, {az_how}), pyFAI {v['pyFAI']} "
          f"(pyFAI-integrate, method no/csr/cython); sigma-clip thres={THRES} "
          f"max_iter={MAX_ITER}, error model {ERROR_MODEL}, {args.npt} bins in {UNIT}, "
          f"polarization {POLARIZATION}, solid angle on")
    for case, info in report["cases"].items():
        agreement = info["agreement"]
        print(f"# ({case}) input: {info['input']}"
              + (f"; generated in {info['generated_s']} s" if info.get("generated_s") else ""))
        if "output_shapes" in info:
            print(f"# ({case}) output rows x bins: {info['output_shapes']}")
        print(f"# ({case}) azfilter vs pyFAI intensity: median rel. diff "
              f"{agreement.get('intensity_median_rel_diff', float('nan')):.2e}, 99th pct "
              f"{agreement.get('intensity_p99_rel_diff', float('nan')):.2e}; radial axis max "
              f"rel. diff {agreement.get('radial_max_rel_diff', float('nan')):.1e}")
    print(f"# wall and CPU (user+sys of the child): medians of {args.repeat} runs for (a), "
          f"{args.stack_repeat} for (b), {args.cbf_repeat} for (c) and (d); peak MB: max RSS "
          "of the child")
    print()
    print(table(rows))
    print()
    for case, info in report["cases"].items():
        target = TARGETS[case]
        verdicts = [f"{variant}: {ratio:.2f}x ({'met' if ratio >= target else 'MISSED'})"
                    for variant, ratio in info["ratios"].items()]
        print(f"# target ({case}) azfilter >= {target:.0f}x faster than pyFAI: "
              + "; ".join(verdicts))
    if args.profile:
        print()
        print_profile(report["profile"])
    print(f"# total benchmark time {report['total_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


def print_profile(profile: dict) -> None:
    for case, prof in profile.items():
        imports = prof["imports"]
        print(f"## azfilter profile, case ({case})")
        print(f"#   imports: {imports['total']:.3f} s of a {imports['wall_s']:.2f} s plain run "
              "(-X importtime, warm cache)")
        listing = ", ".join(f"{name} {sec:.3f}" for name, sec in imports["top_level"].items())
        print(f"#     top-level imports (they add up): {listing}")
        listing = ", ".join(f"{name} {sec:.3f}" for name, sec in imports["packages"].items())
        print(f"#     packages (first import, incl. their dependencies): {listing}")
        for cache in ("cold", "warm"):
            run = prof[cache]
            print(f"#   {cache} table cache, under cProfile: wall {run['wall_s']:.2f} s, "
                  f"CPU {run['cpu_s']:.2f} s")
            for phase, seconds in run["phases"].items():
                shown = "-" if seconds is None else f"{seconds:.3f} s"
                print(f"#     {phase}: {shown}")
            top = "; ".join(f"{name} {sec:.3f}" for name, sec in run["top"][:6])
            print(f"#     main thread, top self time (s): {top}")
            if run["top_reader"]:
                top = "; ".join(f"{name} {sec:.3f}" for name, sec in run["top_reader"][:4])
                print(f"#     reader threads, top self time (s): {top}")


if __name__ == "__main__":
    main()
