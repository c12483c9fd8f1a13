"""The ``azfilter`` command, driven for real: click's CliRunner and ``python -m azfilter``.

Small synthetic frames (a 96x120 generic detector) keep the file fast; a few tests use the real
detector frames of ``../shared/testdata``.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fabio.cbfimage
import fabio.edfimage
import h5py
import numpy as np
import pytest
from opencl_device import require_opencl

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from click.testing import CliRunner

import azfilter as az
from azfilter import cli
from azfilter import config as cfg
from azfilter.commands import options
from azfilter.errors import AzfilterError
from azfilter.output import read_result, text_output_complete
from azfilter.pipeline import progress as progress_module

REPO = Path(__file__).resolve().parent.parent
SHAPE = (96, 120)
PONI = """\
poni_version: 2.1
Detector: Detector
Detector_config: {"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [96, 120], "orientation": 3}
Distance: 0.05
Poni1: 0.0048
Poni2: 0.006
Rot1: 0.01
Rot2: -0.02
Rot3: 0.0
Wavelength: 1e-10
"""


def make_frame(seed: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Two powder rings on a background, Poisson noise, a few bright spots (int32)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    radius = np.hypot(rows - 48.0, cols - 60.0)
    expected = 30 + 300 * np.exp(-0.5 * ((radius - 22) / 2.0) ** 2) \
        + 150 * np.exp(-0.5 * ((radius - 38) / 2.5) ** 2)
    frame = rng.poisson(expected).astype(np.int32)
    frame.flat[rng.integers(0, frame.size, 12)] += 40_000
    return frame


def write_cbf(path: Path, frame: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fabio.cbfimage.CbfImage(data=frame).write(os.fspath(path))
    return path


def write_stack(path: Path, frames: list[np.ndarray]) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=np.stack(frames), chunks=(1, *SHAPE),
                          compression="gzip")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """geo.poni, run/img_000[1-3].cbf, stack.h5 (4 frames), single.edf."""
    root = tmp_path_factory.mktemp("clidata")
    (root / "geo.poni").write_text(PONI)
    cbfs = [write_cbf(root / "run" / f"img_{k:04d}.cbf", make_frame(k)) for k in (1, 2, 3)]
    stack_frames = [make_frame(10 + k) for k in range(4)]
    stack = write_stack(root / "stack.h5", stack_frames)
    edf = root / "single.edf"
    fabio.edfimage.EdfImage(data=make_frame(20).astype(np.float32)).write(os.fspath(edf))
    return SimpleNamespace(root=root, poni=root / "geo.poni", cbfs=cbfs, stack=stack,
                           stack_frames=stack_frames, edf=edf)


def invoke(*args, env: dict | None = None):
    """Run ``azfilter ARGS`` in process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner(env=env)
    return runner.invoke(cli.main, [str(a) for a in args], catch_exceptions=False,
                         prog_name="azfilter")


def integrator(data, **options) -> az.Integrator:
    return az.Integrator(az.load_poni(data.poni), backend="python", **options)


def cbf_frame(k: int) -> np.ndarray:
    return make_frame(k)


def fast_backend() -> str:
    """The compiled backend if built, else OpenCL if a device answers (else skip)."""
    if has_backend("cython"):
        return "cython"
    from azfilter.backends import opencl

    if opencl.list_devices():
        return "opencl"
    pytest.skip("neither the cython backend nor an OpenCL device is available")


def has_backend(name: str) -> bool:
    from azfilter.backends import get_engine_class

    try:
        get_engine_class(name)
    except AzfilterError:
        return False
    return True


def shim_path(tmp_path: Path) -> dict:
    """Environment with an ``azfilter`` on PATH that runs this source tree."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "azfilter"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m azfilter \"$@\"\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for key in list(env):
        if key.startswith("SLURM_"):
            del env[key]
    return env


# ============================================================================ help


@pytest.mark.parametrize("command", ["integrate", "sigma-clip", "medfilt", "run"])
def test_reduction_help_lists_options_defaults_and_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = result.stdout
    for option in ("--poni", "--output", "--npt", "--unit", "--backend", "--device", "--mask",
                   "--dark", "--flat", "--polarization", "--no-solid-angle", "--radial-range",
                   "--azimuth-range", "--error-model", "--normalization", "--overwrite",
                   "--skip-existing", "--recursive", "--shard", "--threads", "--quiet",
                   "--config", "--save-config"):
        assert option in text, option
    assert "[default: 1000" in text and "[default: q_nm^-1]" in text
    assert "Example:" in text and f"azfilter {command} " in text
    if command in ("sigma-clip", "run"):
        assert "--thres" in text and "[default: 5.0" in text and "--max-iter" in text
    if command in ("medfilt", "run"):
        assert "--percentile P [P]" in text
    if command == "integrate":
        assert "--thres" not in text and "--percentile" not in text


@pytest.mark.parametrize("command", ["info", "devices", "plot", "merge"])
def test_other_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


def test_percentile_argument_joining():
    join = options.join_percentile
    assert join(["--percentile", "40", "60", "a.cbf"]) == ["--percentile", "40,60", "a.cbf"]
    assert join(["--percentile", "40", "a.cbf"]) == ["--percentile", "40", "a.cbf"]
    assert join(["a.cbf", "--percentile", "10", "90"]) == ["a.cbf", "--percentile", "10,90"]
    assert join(["--", "--percentile", "1", "2"]) == ["--", "--percentile", "1", "2"]


# ============================================================================ reductions


def test_integrate_text_directory_matches_integrator(data, tmp_path):
    out = tmp_path / "out"
    result = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 120,
                    *data.cbfs, data.stack, "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["img_0001.dat", "img_0002.dat", "img_0003.dat", "stack_00000.dat",
                     "stack_00001.dat", "stack_00002.dat", "stack_00003.dat"]
    reference = integrator(data, npt=120)
    for k in (1, 2, 3):
        values = np.loadtxt(out / f"img_{k:04d}.dat")
        expected = reference.integrate(cbf_frame(k), error_model="poisson")
        np.testing.assert_allclose(values[:, 0], expected.radial, rtol=1e-8)
        np.testing.assert_allclose(values[:, 1], expected.intensity, rtol=1e-8)
        np.testing.assert_allclose(values[:, 2], expected.sigma, rtol=1e-8)
    values = np.loadtxt(out / "stack_00002.dat")
    expected = reference.integrate(data.stack_frames[2])
    np.testing.assert_allclose(values[:, 1], expected.intensity, rtol=1e-8)
    header = [ln for ln in (out / "stack_00002.dat").read_text().splitlines()
              if ln.startswith("#")]
    assert f"# source: {data.stack}::/entry/data/data" in header
    assert "# frame: 2 of 4" in header and "# operation: integrate" in header
    assert "# npt: 120" in header and "# error_model: poisson" in header
    assert header[-1] == "# q_nm^-1 intensity sigma"
    assert "7 frames reduced, 0 skipped, 0 failed" in result.stderr


def test_sigma_clip_hdf5_output_matches_integrator(data, tmp_path):
    out = tmp_path / "clip.h5"
    result = invoke("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 90,
                    "--thres", 3, "--max-iter", 3, "--unit", "2th_deg", *data.cbfs, data.stack,
                    "-o", out)
    assert result.exit_code == 0, result.output
    reference = integrator(data, npt=90, unit="2th_deg")
    frames = [cbf_frame(k) for k in (1, 2, 3)] + data.stack_frames
    with h5py.File(out, "r") as h5:
        assert h5.attrs["default"] == "entry" and h5["entry"].attrs["default"] == "data"
        nxdata = h5["entry/data"]
        assert list(nxdata.attrs["axes"]) == [".", "radial_axis"]
        assert nxdata["I"].shape == (7, 90)
        sources = [s.decode() for s in nxdata["source"][()]]
        assert sources == [str(p) for p in data.cbfs] + [str(data.stack)] * 4
        assert list(nxdata["frame_index"][()]) == [0, 0, 0, 0, 1, 2, 3]
        for row, frame in enumerate(frames):
            expected = reference.sigma_clip(frame, thres=3, max_iter=3)
            np.testing.assert_allclose(nxdata["I"][row], expected.intensity, rtol=2e-6)
            np.testing.assert_allclose(nxdata["I_errors"][row], expected.sigma, rtol=2e-6)
            np.testing.assert_array_equal(nxdata["count"][row], expected.count)
        np.testing.assert_allclose(nxdata["radial_axis"][()], expected.radial)
        config = json.loads(h5["entry/reduction/configuration/data"][()])
    assert config["operation"] == "sigma-clip" and config["thres"] == 3.0
    assert config["max_iter"] == 3 and config["error_model"] == "azimuthal"
    assert "percentile" not in config


def test_medfilt_percentile_takes_one_or_two_numbers(data, tmp_path):
    out = tmp_path / "med.h5"
    result = invoke("medfilt", "-p", data.poni, "--backend", "python", "--npt", 60,
                    "--percentile", 30, 70, data.cbfs[0], data.cbfs[1], "-o", out)
    assert result.exit_code == 0, result.output
    reference = integrator(data, npt=60)
    table = read_result(out)
    assert table.config["percentile"] == [30.0, 70.0] and table.config["split"] == "full"
    expected = reference.medfilt(cbf_frame(2), percentile=(30, 70))
    np.testing.assert_allclose(table.intensity[1], expected.intensity, rtol=2e-6)
    single = tmp_path / "single.dat"
    result = invoke("medfilt", "-p", data.poni, "--backend", "python", "--npt", 60,
                    "--split", "no", "--percentile", 50, data.cbfs[0], "-o", single)
    assert result.exit_code == 0, result.output
    expected = reference.medfilt(cbf_frame(1), percentile=50, split="no")
    np.testing.assert_allclose(np.loadtxt(single)[:, 1], expected.intensity, rtol=1e-8)
    bad = invoke("medfilt", "-p", data.poni, "--percentile", 70, 30, data.cbfs[0], "-o",
                 tmp_path / "bad.dat")
    assert bad.exit_code == 2 and "above high" in bad.stderr


def test_sigma_clip_refuses_full_split(data, tmp_path):
    out = tmp_path / "x.h5"
    result = invoke("sigma-clip", "-p", data.poni, "--split", "full", data.cbfs[0], "-o", out)
    assert result.exit_code == 2
    assert "no pixel splitting" in result.stderr or "without pixel splitting" in result.stderr
    assert not out.exists()


def test_inputs_directory_recursive_and_dataset_path(data, tmp_path):
    tree = tmp_path / "tree"
    write_cbf(tree / "a" / "x_0001.cbf", make_frame(1))
    write_cbf(tree / "b" / "deeper" / "x_0002.cbf", make_frame(2))
    write_cbf(tree / "top.cbf", make_frame(3))
    out = tmp_path / "out"
    flat = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50, tree,
                  "-o", f"{out}/")
    assert flat.exit_code == 0, flat.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dat")) == ["top.dat"]
    deep = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50, "-r",
                  tree, "-o", f"{out}/", "--skip-existing")
    assert deep.exit_code == 0, deep.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dat")) == [
        "a/x_0001.dat", "b/deeper/x_0002.dat", "top.dat"]
    # a dataset path, and a glob
    h5out = tmp_path / "ds.h5"
    result = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50,
                    f"{data.stack}::/entry/data/data", str(data.root / "run" / "img_000[12].cbf"),
                    "-o", h5out)
    assert result.exit_code == 0, result.output
    table = read_result(h5out)
    assert table.sources == [f"{data.stack}::/entry/data/data"] * 4 + [
        str(data.cbfs[0]), str(data.cbfs[1])]


def test_same_name_in_two_inputs_is_refused(data, tmp_path):
    one = write_cbf(tmp_path / "one" / "img.cbf", make_frame(1))
    two = write_cbf(tmp_path / "two" / "img.cbf", make_frame(2))
    out = tmp_path / "out"
    result = invoke("integrate", "-p", data.poni, one, two, "-o", f"{out}/")
    assert result.exit_code == 2 and "would both be written" in result.stderr
    assert not out.exists()


# ============================================================================ exit codes


@pytest.mark.parametrize("case", ["missing-poni", "bad-poni", "unknown-option", "missing-input",
                                  "no-output", "no-wavelength-q", "bad-mask", "bad-output",
                                  "bad-shard", "both-existing-modes", "bad-config"])
def test_usage_and_configuration_errors_exit_2_without_traceback(data, tmp_path, case):
    out = tmp_path / "out.h5"
    args = ["integrate", "-p", data.poni, "--backend", "python", data.cbfs[0], "-o", out]
    if case == "missing-poni":
        args[2] = tmp_path / "nope.poni"
    elif case == "bad-poni":
        bad = tmp_path / "bad.poni"
        bad.write_text("Distance: zero\nPoni1: 0\n")
        args[2] = bad
    elif case == "unknown-option":
        args.append("--frobnicate")
    elif case == "missing-input":
        args[5] = tmp_path / "missing_*.cbf"
    elif case == "no-output":
        args = args[:-2]
    elif case == "no-wavelength-q":
        no_wl = tmp_path / "nowl.poni"
        no_wl.write_text(PONI.replace("Wavelength: 1e-10\n", ""))
        args[2] = no_wl
    elif case == "bad-mask":
        mask = tmp_path / "mask.edf"
        fabio.edfimage.EdfImage(data=np.zeros((10, 10), np.int8)).write(os.fspath(mask))
        args += ["--mask", mask]
    elif case == "bad-output":
        args[-1] = tmp_path / "results"  # no such directory, no known suffix
    elif case == "bad-shard":
        args += ["--shard", "3/3"]
    elif case == "both-existing-modes":
        args += ["--overwrite", "--skip-existing"]
    elif case == "bad-config":
        conf = tmp_path / "job.toml"
        conf.write_text('npt = 100\nfrobnicate = 3\n')
        args += ["--config", conf]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    if case in ("unknown-option", "no-output", "both-existing-modes", "bad-shard"):
        assert "Usage: azfilter integrate" in result.stderr  # click's usage errors
    else:
        assert "azfilter: error:" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_corrupt_and_wrong_shape_frames_are_reported_and_others_written(data, tmp_path):
    run = tmp_path / "run"
    good = [write_cbf(run / f"img_{k:04d}.cbf", make_frame(k)) for k in (1, 3)]
    corrupt = run / "img_0002.cbf"
    corrupt.write_bytes(good[0].read_bytes()[:1500])  # truncated CBF
    wrong = write_cbf(run / "img_0004.cbf", make_frame(4, shape=(50, 60)))
    out = tmp_path / "out"
    result = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50, run,
                    "-o", f"{out}/")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    failures = [ln for ln in result.stderr.splitlines() if "failed:" in ln]
    assert len(failures) == 2
    assert any(str(corrupt) in ln for ln in failures)
    assert any(str(wrong) in ln and "shape" in ln for ln in failures)
    assert sorted(p.name for p in out.iterdir()) == ["img_0001.dat", "img_0003.dat"]
    assert "2 frames reduced, 0 skipped, 2 failed" in result.stderr
    h5out = tmp_path / "out.h5"
    result = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50, run,
                    "-o", h5out)
    assert result.exit_code == 3
    assert read_result(h5out).sources == [str(g) for g in good]


def test_existing_outputs_refuse_overwrite_skip(data, tmp_path):
    out = tmp_path / "out"
    base = ["integrate", "-p", data.poni, "--backend", "python", "--npt", 40, *data.cbfs,
            "-o", f"{out}/"]
    assert invoke(*base).exit_code == 0
    first = out / "img_0001.dat"
    first.write_text(first.read_text().replace("# operation", "# marker\n# operation"))
    refused = invoke(*base)
    assert refused.exit_code == 2 and "exists" in refused.stderr and "--overwrite" in \
        refused.stderr
    assert "# marker" in first.read_text()
    # --skip-existing: complete outputs are kept, an incomplete one is redone
    third = out / "img_0003.dat"
    third.write_text(third.read_text()[:-200])
    skipped = invoke(*base, "--skip-existing")
    assert skipped.exit_code == 0, skipped.output
    assert "1 frame reduced, 2 skipped" in skipped.stderr
    assert "# marker" in first.read_text()
    assert text_output_complete(third, 40)
    replaced = invoke(*base, "--overwrite")
    assert replaced.exit_code == 0 and "3 frames reduced" in replaced.stderr
    assert "# marker" not in first.read_text()
    # HDF5: refuse, then overwrite
    h5out = tmp_path / "o.h5"
    h5base = ["integrate", "-p", data.poni, "--backend", "python", "--npt", 40, data.cbfs[0],
              "-o", h5out]
    assert invoke(*h5base).exit_code == 0
    before = h5out.read_bytes()
    assert invoke(*h5base).exit_code == 2
    assert h5out.read_bytes() == before
    assert invoke(*h5base, "--overwrite").exit_code == 0


def test_skip_existing_on_a_growing_directory(data, tmp_path):
    incoming = tmp_path / "incoming"
    write_cbf(incoming / "f_0001.cbf", make_frame(1))
    out_dir, out_h5 = tmp_path / "reduced", tmp_path / "all.h5"
    text_args = ["integrate", "-p", data.poni, "--backend", "python", "--npt", 40,
                 "--skip-existing", incoming, "-o", f"{out_dir}/"]
    h5_args = text_args[:-1] + [out_h5]
    assert invoke(*text_args).exit_code == 0
    assert invoke(*h5_args).exit_code == 0
    first_mtime = (out_dir / "f_0001.dat").stat().st_mtime_ns
    write_cbf(incoming / "f_0002.cbf", make_frame(2))
    write_cbf(incoming / "f_0003.cbf", make_frame(3))
    text_run = invoke(*text_args)
    assert text_run.exit_code == 0 and "2 frames reduced, 1 skipped" in text_run.stderr
    assert (out_dir / "f_0001.dat").stat().st_mtime_ns == first_mtime
    h5_run = invoke(*h5_args)
    assert h5_run.exit_code == 0 and "2 frames reduced, 1 skipped" in h5_run.stderr
    table = read_result(out_h5)
    assert [Path(s).name for s in table.sources] == ["f_0001.cbf", "f_0002.cbf", "f_0003.cbf"]
    expected = integrator(data, npt=40).integrate(make_frame(3))
    np.testing.assert_allclose(table.intensity[2], expected.intensity, rtol=2e-6)
    again = invoke(*h5_args)
    assert again.exit_code == 0 and "0 frames reduced, 3 skipped" in again.stderr
    assert read_result(out_h5).intensity.shape[0] == 3
    # an HDF5 output inside the input directory is not read back as an input
    inside = incoming / "reduced.h5"
    assert invoke(*h5_args[:-1], inside).exit_code == 0
    inner = invoke(*h5_args[:-1], inside)
    assert inner.exit_code == 0 and "0 frames reduced, 3 skipped" in inner.stderr
    # an empty directory is nothing to do, not an error
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = invoke("integrate", "-p", data.poni, "--skip-existing", empty, "-o",
                     f"{tmp_path / 'e'}/")
    assert nothing.exit_code == 0 and "0 frames reduced" in nothing.stderr


def test_output_to_stdout(data, tmp_path):
    result = invoke("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 64,
                    data.edf, "-o", "-")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# azfilter")
    values = np.loadtxt(lines)
    expected = integrator(data, npt=64).sigma_clip(
        fabio.open(os.fspath(data.edf)).data)
    np.testing.assert_allclose(values[:, 1], expected.intensity, rtol=1e-8)
    several = invoke("integrate", "-p", data.poni, *data.cbfs, "-o", "-")
    assert several.exit_code == 2 and "takes one frame" in several.stderr
    assert several.stdout == ""


def test_command_exits_at_once_with_its_outputs_complete(data, tmp_path):
    """``python -m azfilter`` (and the console script, ``azfilter.__main__:entry``) ends the
    process as soon as the command returns, skipping the interpreter's teardown (atexit
    handlers included), with stdout flushed and the command's exit status."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('TEARDOWN', flush=True))\n"
              "from azfilter.__main__ import entry\n"
              "sys.argv[0] = 'azfilter'\n"
              "entry()\n")
    stdout_run = subprocess.run(
        [sys.executable, "-c", script, "sigma-clip", "-p", str(data.poni), "--backend",
         "python", "--npt", "64", str(data.edf), "-o", "-"],
        capture_output=True, text=True, timeout=120)
    assert stdout_run.returncode == 0, stdout_run.stderr
    assert "TEARDOWN" not in stdout_run.stdout
    lines = stdout_run.stdout.splitlines()   # the whole table reached the pipe
    assert lines[0].startswith("# azfilter") and np.loadtxt(lines).shape == (64, 3)
    broken = tmp_path / "run"
    write_cbf(broken / "img_0001.cbf", make_frame(1))
    (broken / "img_0002.cbf").write_bytes(b"not a CBF file")
    failed_run = subprocess.run(
        [sys.executable, "-m", "azfilter", "integrate", "-p", str(data.poni), "--backend",
         "python", "--npt", "32", str(broken), "-o", str(tmp_path / "out.h5")],
        capture_output=True, text=True, timeout=120)
    assert failed_run.returncode == 3, failed_run.stderr
    assert "1 frame reduced, 0 skipped, 1 failed" in failed_run.stderr
    assert read_result(tmp_path / "out.h5").sources == [str(broken / "img_0001.cbf")]
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["azfilter"] == "azfilter.__main__:entry"


def test_progress_log_lines_and_quiet(data, tmp_path, monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.0)
    result = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 40,
                    data.stack, "-o", tmp_path / "a.h5")
    assert result.exit_code == 0
    lines = result.stderr.splitlines()
    assert any("/4 frames" in ln and "frames/s" in ln for ln in lines[:-1]), lines
    assert "\r" not in result.stderr  # no bar when stderr is not a terminal
    assert lines[-1].startswith("azfilter: integrate: 4 frames reduced, 0 skipped, 0 failed in")
    quiet = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 40,
                   data.stack, "-o", tmp_path / "b.h5", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_dry_run_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    result = invoke("integrate", "-p", data.poni, *data.cbfs, "-o", f"{out}/", "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.count("->") == 3 and "3 frames to reduce" in result.stderr
    assert not out.exists()


# ============================================================================ config


def test_config_module_parsing(tmp_path):
    (tmp_path / "sub").mkdir()
    job = tmp_path / "sub" / "job.toml"
    job.write_text('operation = "sigma-clip"\nponi = "geo.poni"\ninputs = ["data/*.cbf"]\n'
                   'max-iter = 3\npercentile = [10, 90]\nradial-range = [1, 20]\n'
                   'no-solid-angle = true\n')
    loaded = cfg.load_config(job)
    assert loaded["poni"] == str(tmp_path / "sub" / "geo.poni")
    assert loaded["inputs"] == [str(tmp_path / "sub" / "data/*.cbf")]
    assert loaded["max_iter"] == 3 and loaded["solid_angle"] is False
    assert loaded["radial_range"] == [1.0, 20.0]
    merged = cfg.effective(loaded)
    assert merged["error_model"] == "azimuthal" and "percentile" not in merged
    assert tomllib.loads(cfg.to_toml(merged))["max-iter"] == 3
    with pytest.raises(AzfilterError, match="unknown key 'frob'"):
        cfg.normalize({"frob": 1}, "x")
    with pytest.raises(AzfilterError, match="npt must be an integer"):
        cfg.normalize({"npt": 10.5}, "x")
    assert cfg.parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "1-3", "a/b"):
        with pytest.raises(AzfilterError):
            cfg.parse_shard(bad)
    assert cfg.parse_percentile("40 60") == [40.0, 60.0]
    assert cfg.parse_percentile(50) == [50.0]
    with pytest.raises(AzfilterError):
        cfg.parse_percentile([1, 2, 3])


def test_config_round_trip_save_run_and_from_outputs(data, tmp_path):
    job = tmp_path / "job.toml"
    out1 = tmp_path / "first.h5"
    first = invoke("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 70,
                   "--thres", 2.5, "--unit", "q_A^-1", "--polarization", 0.9,
                   "--azimuth-range", -170, 170, *data.cbfs, "-o", out1, "--save-config", job)
    assert first.exit_code == 0, first.output
    saved = tomllib.loads(job.read_text())
    assert saved["operation"] == "sigma-clip" and saved["thres"] == 2.5
    assert saved["azimuth-range"] == [-170.0, 170.0] and saved["npt"] == 70
    assert saved["poni"] == str(data.poni) and saved["output"] == str(out1)
    reference = read_result(out1)
    # 1. the saved TOML reruns the job (to another output)
    out2 = tmp_path / "second.h5"
    again = invoke("run", job, "-o", out2)
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(read_result(out2).intensity, reference.intensity)
    # 2. the config stored in the HDF5 output reruns it
    out3 = tmp_path / "third.h5"
    rerun = invoke("run", out1, "-o", out3)
    assert rerun.exit_code == 0, rerun.output
    np.testing.assert_array_equal(read_result(out3).intensity, reference.intensity)
    assert read_result(out3).config == {**reference.config, "output": str(out3)}
    # 3. the '# config:' line of a text output reruns that frame
    text = tmp_path / "t.dat"
    assert invoke("run", out1, data.cbfs[1], "-o", text).exit_code == 0
    rerun_text = tmp_path / "t2.dat"
    assert invoke("run", text, "-o", rerun_text).exit_code == 0
    np.testing.assert_array_equal(np.loadtxt(rerun_text), np.loadtxt(text))
    np.testing.assert_allclose(np.loadtxt(text)[:, 1], reference.intensity[1], rtol=1e-6)
    # 4. --config with a JSON job, the command line overrides it; the command names the op
    json_job = tmp_path / "job.json"
    json_job.write_text(json.dumps({"poni": str(data.poni), "npt": 33, "backend": "python",
                                    "unit": "2th_deg", "inputs": [str(data.cbfs[0])]}))
    out4 = tmp_path / "four.dat"
    over = invoke("medfilt", "--config", json_job, "--npt", 44, "-o", out4)
    assert over.exit_code == 0, over.output
    table = read_result(out4)
    assert table.radial.shape == (44,) and table.unit == "2th_deg"
    assert table.config["operation"] == "medfilt" and table.config["npt"] == 44
    # a config without an operation cannot be run by "run"
    assert invoke("run", json_job, "-o", tmp_path / "x.dat").exit_code == 2


def test_save_config_alone(data, tmp_path):
    job = tmp_path / "job.json"
    result = invoke("medfilt", "-p", data.poni, "--percentile", 25, 75, "--save-config", job)
    assert result.exit_code == 0, result.output
    saved = json.loads(job.read_text())
    assert saved["operation"] == "medfilt" and saved["percentile"] == [25.0, 75.0]
    assert saved["split"] == "full" and "shard" not in saved


# ============================================================================ shards, merge


def test_slurm_array_shards_and_merge(data, tmp_path, monkeypatch):
    out = tmp_path / "run.h5"
    args = ["integrate", "-p", data.poni, "--backend", "python", "--npt", 40, *data.cbfs,
            data.stack, "-o", out]
    for task in (1, 2, 3):  # --array=1-3: ids start at SLURM_ARRAY_TASK_MIN
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3",
               "SLURM_ARRAY_TASK_MIN": "1"}
        result = invoke(*args, env=env)
        assert result.exit_code == 0, result.output
        assert f"shard {task - 1}/3" in result.stderr
    shards = sorted(tmp_path.glob("run_shard*of3.h5"))
    assert [p.name for p in shards] == ["run_shard0of3.h5", "run_shard1of3.h5",
                                        "run_shard2of3.h5"]
    rows = [read_result(p).intensity.shape[0] for p in shards]
    assert rows == [2, 2, 3]  # 7 frames in contiguous blocks
    merged = invoke("merge", *reversed(shards), "-o", out)
    assert merged.exit_code == 0, merged.output
    whole = tmp_path / "whole.h5"
    assert invoke(*args[:-1], whole).exit_code == 0
    a, b = read_result(out), read_result(whole)
    assert a.sources == b.sources and a.frame_indices == b.frame_indices
    np.testing.assert_array_equal(a.intensity, b.intensity)
    # a missing shard: merged anyway, exit 3
    partial = invoke("merge", shards[0], shards[2], "-o", tmp_path / "partial.h5")
    assert partial.exit_code == 3 and "shard(s) 1 missing" in partial.stderr
    # explicit --shard over text outputs: the shards together hold every frame once
    text_out = tmp_path / "text"
    for index in range(2):
        result = invoke(*args[:-1], f"{text_out}/", "--shard", f"{index}/2")
        assert result.exit_code == 0, result.output
    assert len(list(text_out.iterdir())) == 7


# ============================================================================ info, devices


def test_info_poni_data_and_result(data, tmp_path, testdata):
    poni = testdata / "silx_Pilatus1M_AgBh" / "Pilatus1M_wl1A.poni"
    result = invoke("info", poni, data.cbfs[0], data.stack)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Pilatus 1M" in text and "Distance: 1.58323 m" in text
    assert "Wavelength: 1e-10 m (1 A, 12.3984 keV)" in text
    pyfai = pytest.importorskip("pyFAI")
    fit2d = pyfai.load(str(poni)).getFit2D()
    assert f"x={fit2d['centerX']:.3f} y={fit2d['centerY']:.3f} pixels" in text
    assert "CBF data file" in text and "frame shape: 96x120" in text and "dtype: int32" in text
    assert "frames: 4" in text and "dataset: /entry/data/data" in text
    out = tmp_path / "r.h5"
    assert invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 30,
                  data.stack, "-o", out).exit_code == 0
    described = invoke("info", out)
    assert "azfilter result (integrate)" in described.stdout and "frames: 4" in described.stdout
    assert "bins: 30 in q_nm^-1" in described.stdout
    missing = invoke("info", tmp_path / "nope.cbf")
    assert missing.exit_code == 2 and "no such file" in missing.stderr


def test_info_no_tilt_centre_is_poni_over_pixel(data, tmp_path):
    poni = tmp_path / "flat.poni"
    poni.write_text(PONI.replace("Rot1: 0.01", "Rot1: 0").replace("Rot2: -0.02", "Rot2: 0"))
    result = invoke("info", poni)
    assert "Beam centre (Fit2D): x=60.000 y=48.000 pixels" in result.stdout


def test_devices_lists_or_explains(monkeypatch):
    from azfilter.backends import opencl

    devices = opencl.list_devices()
    result = invoke("devices")
    assert result.exit_code == 0
    if devices:
        for device in devices:
            assert f"  {device['id']}  {device['type']}" in result.stdout
    else:
        assert "No OpenCL device" in result.stdout
    monkeypatch.setattr(opencl, "list_devices", lambda: [])
    monkeypatch.setattr(opencl, "opencl_status", lambda: "OpenCL unavailable: no platform")
    none = invoke("devices")
    assert none.exit_code == 0
    assert none.stdout.strip() == "No OpenCL device: OpenCL unavailable: no platform"


class _FakeTerminal:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def test_progress_bar_on_a_terminal(monkeypatch):
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = progress_module.Progress(total=4, quiet=False, label="integrate")
    progress.step()
    progress.message("azfilter: failed: x.cbf: corrupt")
    for _ in range(3):
        progress.step()
    progress.close()
    assert "1/4 frames" in terminal.text and "ETA" in terminal.text
    assert "4/4 frames" in terminal.text and "frames/s" in terminal.text
    assert "[" + "#" * 30 + "]" in terminal.text
    assert "\r\033[Kazfilter: failed: x.cbf: corrupt\n" in terminal.text
    assert terminal.text.endswith("\r\033[K")  # the bar is cleared at the end
    quiet = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    progress = progress_module.Progress(total=2, quiet=True, label="x")
    progress.step()
    progress.step()
    progress.close()
    assert quiet.text == ""


def test_progress_bar_fits_a_narrow_terminal(monkeypatch):
    import os as os_module
    import shutil

    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(shutil, "get_terminal_size",
                        lambda fallback=None: os_module.terminal_size((50, 20)))
    progress = progress_module.Progress(total=1000, quiet=False, label="sigma-clip shard 2/16")
    assert "0/1000 frames" in terminal.text          # shown before the first frame
    for _ in range(1000):
        progress.step()
    progress.close()
    lines = [part for part in terminal.text.split("\r\033[K") if part]
    assert lines and all(len(line) <= 49 for line in lines), max(lines, key=len)


# ============================================================================ plot


def test_plot_text_hdf5_heatmap_png(data, tmp_path):
    pytest.importorskip("matplotlib")
    out_dir, out_h5 = tmp_path / "t", tmp_path / "r.h5"
    for target in (f"{out_dir}/", out_h5):
        assert invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 50,
                      *data.cbfs, data.stack, "-o", target).exit_code == 0
    png = tmp_path / "curves.png"
    result = invoke("plot", *sorted(out_dir.iterdir())[:3], out_h5, "-o", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    heat = tmp_path / "heat.png"
    assert invoke("plot", out_h5, "--heatmap", "--log", "-o", heat).exit_code == 0
    assert heat.read_bytes()[:4] == b"\x89PNG"
    assert invoke("plot", out_h5, "-o", heat).exit_code == 2  # exists
    assert invoke("plot", data.cbfs[0], "-o", tmp_path / "x.png").exit_code == 2


def test_plot_without_matplotlib(data, tmp_path, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke("plot", data.cbfs[0], "-o", tmp_path / "x.png")
    assert result.exit_code == 2
    assert "pip install 'azfilter[plot]'" in result.stderr
    assert not (tmp_path / "x.png").exists()


# ============================================================================ subprocess, examples


def run_module(*args, env=None, timeout=120, **kwargs):
    return subprocess.run([sys.executable, "-m", "azfilter", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
                          **kwargs)


@pytest.mark.slow
def test_python_m_azfilter_on_real_pilatus_frame_agrees_with_pyfai(testdata, tmp_path):
    folder = testdata / "silx_Pilatus1M_AgBh"
    out = tmp_path / "agbh.dat"
    proc = run_module("integrate", "-p", folder / "Pilatus1M_wl1A.poni", "--backend", "python",
                      "--npt", 500, folder / "Pilatus1M.edf", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "1 frame reduced, 0 skipped, 0 failed" in proc.stderr
    values = np.loadtxt(out)
    pyfai = pytest.importorskip("pyFAI")
    ai = pyfai.load(str(folder / "Pilatus1M_wl1A.poni"))
    image = fabio.open(os.fspath(folder / "Pilatus1M.edf")).data
    reference = ai.integrate1d(image, 500, unit="q_nm^-1", method=("no", "csr", "cython"),
                               error_model="poisson", correctSolidAngle=True)
    np.testing.assert_allclose(values[:, 0], reference.radial, rtol=1e-6)
    filled = np.isfinite(values[:, 1]) & (reference.count > 0)
    assert filled.sum() > 400
    np.testing.assert_allclose(values[filled, 1], reference.intensity[filled], rtol=1e-4)


@pytest.mark.slow
def test_dials_pilatus6m_cbfs_sigma_clip_removes_bragg_spots(testdata, tmp_path):
    folder = testdata / "dials_pilatus6M_eiger16M_MX_cbf"
    backend = fast_backend()
    frames = [folder / "thau_3_2_0001.cbf", folder / "thau_3_2_0002.cbf.bz2"]
    common = ["-p", folder / "thau_3_2_from_cbf_header.poni", "--backend", backend,
              "--npt", 400, *frames]
    clipped, plain = tmp_path / "clip.h5", tmp_path / "plain.h5"
    for command, out in (("sigma-clip", clipped), ("integrate", plain)):
        result = invoke(command, *common, "-o", out)
        assert result.exit_code == 0, result.output
    clip, mean = read_result(clipped), read_result(plain)
    assert clip.sources == [str(p) for p in frames] and clip.intensity.shape == (2, 400)
    both = np.isfinite(clip.intensity) & np.isfinite(mean.intensity) & (clip.intensity > 0)
    assert both.sum() > 600
    excess = mean.intensity[both] / clip.intensity[both]
    # Bragg spots and hot pixels (up to 1e6 counts) pull the plain mean up in some rings;
    # the clipped mean never lies much above it.
    assert excess.max() > 2 and np.median(excess) > 1.0 and excess.min() > 0.95
    with h5py.File(clipped, "r") as h5:
        kept = h5["entry/data/count"][()]
    with h5py.File(plain, "r") as h5:
        assert (kept <= h5["entry/data/count"][()] + 1e-6).all()


@pytest.mark.slow
def test_python_m_azfilter_on_lambda_nexus_stack(testdata, tmp_path):
    folder = testdata / "dioptas_lambda2M_3module_stack"
    stack = folder / "testasapo1_1009_00002_m1_part00000.nxs"
    out = tmp_path / "lambda.h5"
    backend = "cython" if has_backend("cython") else "python"
    proc = run_module("integrate", "-p", folder / "L2.poni", "--backend", backend, "--npt",
                      300, "--unit", "2th_deg", f"{stack}::/entry/instrument/detector/data",
                      "--shard", "1/3", "-o", out)
    assert proc.returncode == 0, proc.stderr
    shard_file = tmp_path / "lambda_shard1of3.h5"
    table = read_result(shard_file)
    assert table.frame_indices == [3, 4, 5]
    assert np.isfinite(table.intensity).sum(axis=1).min() > 150


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_leaves_no_partial_output(data, tmp_path, signum):
    stack = write_stack(tmp_path / "big.h5", [make_frame(k) for k in range(60)])
    out = tmp_path / "killed.h5"
    env = dict(os.environ, AZFILTER_LOG_INTERVAL="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "azfilter", "medfilt", "-p", os.fspath(data.poni), "--backend",
         "python", "--threads", "1", "--npt", "200", os.fspath(stack), "-o", os.fspath(out)],
        stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    first_line = proc.stderr.readline()  # the first progress line: frames are being written
    assert "frames" in first_line, first_line
    proc.send_signal(signum)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, first_line + rest
    assert "terminated" in rest
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_default_backend(data, tmp_path):
    if not has_backend("cython"):
        pytest.skip("the compiled (cython) backend is not built here")
    out = tmp_path / "default.h5"
    result = invoke("sigma-clip", "-p", data.poni, "--npt", 80, *data.cbfs, "-o", out)
    assert result.exit_code == 0, result.output
    table = read_result(out)
    assert table.config["backend"] == "cython"
    reference = integrator(data, npt=80)
    for row, k in enumerate((1, 2, 3)):
        expected = reference.sigma_clip(cbf_frame(k))
        np.testing.assert_allclose(table.intensity[row], expected.intensity, rtol=1e-5)


@pytest.mark.opencl
def test_opencl_backend_through_the_command(data, tmp_path):
    require_opencl()
    out = tmp_path / "cl.h5"
    result = invoke("medfilt", "-p", data.poni, "--backend", "opencl", "--device", "0:0",
                    "--npt", 70, "--percentile", 20, 80, *data.cbfs, "-o", out)
    assert result.exit_code == 0, result.output
    table = read_result(out)
    reference = integrator(data, npt=70)
    for row, k in enumerate((1, 2, 3)):
        expected = reference.medfilt(cbf_frame(k), percentile=(20, 80))
        np.testing.assert_allclose(table.intensity[row], expected.intensity, rtol=1e-5)


def test_example_oneliner_and_cron_scripts(data, tmp_path):
    env = shim_path(tmp_path)
    incoming = tmp_path / "incoming"
    for k in (1, 2):
        write_cbf(incoming / f"s_{k:04d}.cbf", make_frame(k))
    out = tmp_path / "oneliner"
    proc = subprocess.run(["bash", REPO / "examples" / "oneliner.sh", data.poni, incoming, out,
                           "--backend", "python"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["s_0001.xy", "s_0002.xy"]
    assert np.loadtxt(out / "s_0001.xy").shape == (2000, 3)

    reduced = tmp_path / "reduced"
    cron = ["bash", REPO / "examples" / "cron_reduce.sh", data.poni, incoming, reduced,
            "--backend", "python", "--npt", "50"]
    first = subprocess.run(cron, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0 and first.stdout == "" and first.stderr == "", first.stderr
    stamps = {p.name: p.stat().st_mtime_ns for p in reduced.glob("*.dat")}
    assert sorted(stamps) == ["s_0001.dat", "s_0002.dat"]
    write_cbf(incoming / "later" / "s_0003.cbf", make_frame(3))
    (incoming / "s_0004.cbf").write_bytes(b"not a CBF at all")
    second = subprocess.run(cron, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 3  # the corrupt file is reported (cron mails it)
    assert "s_0004.cbf" in second.stderr and "failed" in second.stderr
    assert (reduced / "later" / "s_0003.dat").exists()
    assert {p.name: p.stat().st_mtime_ns for p in reduced.glob("*.dat")} == stamps


def test_make_demo_data_writes_cbf_hdf5_and_poni(tmp_path):
    proc = subprocess.run([sys.executable, REPO / "examples" / "make_demo_data.py",
                           tmp_path / "demo", "--frames-cbf", "2", "--frames-h5", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    geometry = az.load_poni(tmp_path / "demo" / "demo.poni")
    frames = list(az.open_frames([tmp_path / "demo"]))
    assert len(frames) == 4 and all(f.data.shape == geometry.detector.shape for f in frames)
    first = frames[0].data
    gaps = geometry.detector.mask
    assert gaps.sum() > 10_000 and np.all(first[gaps] < 0)  # module gaps: -1 (or dead, -2)
    assert (first == -2).any() and first.max() > 40_000  # dead pixels, zingers/spots


def test_whole_file_is_quick_enough_guard():
    # Keep the start-up cheap: importing the command must not import the engine or h5py.
    code = ("import sys, time; t=time.time(); import azfilter.cli; "
            "print('h5py' in sys.modules, 'azfilter.integrator' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.stdout.split() == ["False", "False"]



def test_detector_pixel_mask_in_nexus_file_is_applied(data, tmp_path):
    """A NeXus file's NXdetector/pixel_mask (dead/hot pixels flagged by the detector) is OR-ed
    into the mask: flagged hot pixels do not reach the pattern, unflagged ones would."""
    frame = np.full(SHAPE, 100, np.int32)
    hot = np.zeros(SHAPE, bool)
    hot[::7, ::11] = True
    frame[hot] = 1_000_000
    path = tmp_path / "flagged.nxs"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=frame[None])
        h5.create_group("entry/instrument").attrs["NX_class"] = "NXinstrument"
        detector = h5.create_group("entry/instrument/detector")
        detector.attrs["NX_class"] = "NXdetector"
        detector.create_dataset("pixel_mask", data=hot.astype(np.uint32) * 4)
    out = tmp_path / "out.h5"
    done = invoke("integrate", "-p", data.poni, "--no-solid-angle", "--npt", 50, path,
                  "-o", out)
    assert done.exit_code == 0, done.output
    with h5py.File(out) as h5:
        intensity = h5["entry/data/I"][0]
    finite = np.isfinite(intensity)
    assert finite.sum() > 40
    np.testing.assert_allclose(intensity[finite], 100.0, rtol=1e-9)
    # the same frame without the flags: hot pixels dominate
    unflagged = tmp_path / "unflagged.h5"
    with h5py.File(unflagged, "w") as h5:
        h5.create_dataset("entry/data/data", data=frame[None])
    done = invoke("integrate", "-p", data.poni, "--no-solid-angle", "--npt", 50, unflagged,
                  "-o", tmp_path / "out2.h5")
    assert done.exit_code == 0, done.output
    with h5py.File(tmp_path / "out2.h5") as h5:
        assert np.nanmax(h5["entry/data/I"][0]) > 1000


# ============================================================================ library call


def test_run_job_is_the_command_without_click(data, tmp_path):
    """azfilter.run_job(config) reduces a job as the command does; its report says what."""
    import io

    stream = io.StringIO()
    bad = tmp_path / "broken.cbf"
    bad.write_bytes(b"###CBF: not really\n")
    report = az.run_job({"operation": "sigma-clip", "poni": str(data.poni), "npt": 40,
                         "backend": "python", "thres": 3,
                         "inputs": [str(p) for p in data.cbfs] + [str(bad)],
                         "output": str(tmp_path / "lib.h5")}, stream=stream)
    assert (report.reduced, report.skipped, report.failed) == (3, 0, 1)
    assert not report.ok and "broken.cbf" in report.failures[0]
    assert "broken.cbf" in stream.getvalue()
    table = read_result(tmp_path / "lib.h5")
    ref = integrator(data, npt=40).sigma_clip(make_frame(2), thres=3)
    np.testing.assert_allclose(table.intensity[1], ref.intensity, rtol=1e-6)
    # the same job through click gives the same numbers
    result = invoke("sigma-clip", "-p", data.poni, "--npt", 40, "--backend", "python",
                    "--thres", 3, *data.cbfs, "-o", tmp_path / "cli.h5", "--quiet")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(read_result(tmp_path / "cli.h5").intensity, table.intensity)
    with pytest.raises(AzfilterError, match="poni missing"):
        az.run_job({"operation": "integrate", "inputs": ["x"], "output": "y.h5"})
    dry = az.run_job({"operation": "integrate", "poni": str(data.poni),
                      "inputs": [str(data.stack)], "output": str(tmp_path / "dry.h5")},
                     dry_run=True)
    assert [index for _, index, _ in dry.planned] == [0, 1, 2, 3]
    assert not (tmp_path / "dry.h5").exists()


def test_cython_lanes_give_the_same_output(data, tmp_path):
    """Frames reduced several at once (AZFILTER_CYTHON_LANES) give the one-at-a-time file."""
    outputs = []
    for lanes in ("1", "2"):
        output = tmp_path / f"lanes{lanes}.h5"
        result = invoke("sigma-clip", "-p", data.poni, "--backend", "cython", "--threads", 2,
                        "--npt", 40, data.stack, *data.cbfs, "-o", output, "--quiet",
                        env={"AZFILTER_CYTHON_LANES": lanes})
        assert result.exit_code == 0, result.output
        outputs.append(read_result(output))
    assert outputs[0].intensity.shape[0] > 4
    for name in ("radial", "intensity", "sigma"):
        np.testing.assert_array_equal(getattr(outputs[1], name), getattr(outputs[0], name))


def test_verbose_prints_pools_and_follows_slurm_cpus(data, tmp_path):
    result = invoke("integrate", "-v", "-p", data.poni, "--backend", "python", "--npt", 30,
                    *data.cbfs, "-o", tmp_path / "v.h5", env={"SLURM_CPUS_PER_TASK": "1"})
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stderr.splitlines() if "engine threads" in ln)
    assert "engine threads 1" in line and "1 cores usable" in line and "reader threads" in line
    # not a terminal: log lines start with a timestamp
    assert line[:4].isdigit() and line[4] == "-"
    quiet = invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", 30,
                   *data.cbfs, "-o", tmp_path / "q.h5")
    assert "engine threads" not in quiet.stderr
    assert "frames at once" not in line      # the python engine reduces one frame at a time
    compiled = invoke("integrate", "-v", "-p", data.poni, "--backend", "cython", "--npt", 30,
                      *data.cbfs, "-o", tmp_path / "c.h5",
                      env={"SLURM_CPUS_PER_TASK": "1", "AZFILTER_CYTHON_LANES": "3"})
    assert compiled.exit_code == 0, compiled.output
    line = next(ln for ln in compiled.stderr.splitlines() if "engine threads" in ln)
    assert "engine threads 1 (1 frames at once)" in line   # lanes never exceed the threads


def test_cython_jobs_leave_a_quarter_of_many_cores(data, tmp_path, monkeypatch):
    """Without --threads a Cython job takes 3/4 of the cores for its engine and as many
    readers (both run at once: one of each per core oversubscribes them), all of 2 cores,
    and --threads as given; other backends take every core."""
    from azfilter.pipeline import run as pipeline_run

    def threads(config: dict, cores: int) -> int:
        return pipeline_run.job_threads(config, cores=cores)

    cython = {"backend": "cython", "threads": None}
    assert [threads(cython, n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 2, 2, 3, 6, 12, 48]
    assert threads({**cython, "threads": 16}, 16) == 16
    for backend in ("opencl", "python"):
        assert threads({"backend": backend, "threads": None}, 16) == 16
    monkeypatch.setattr(pipeline_run, "usable_cores", lambda: 16)
    result = invoke("integrate", "-v", "-p", data.poni, "--backend", "cython", "--npt", 30,
                    *data.cbfs, "-o", tmp_path / "c.h5")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.stderr.splitlines() if "engine threads" in ln)
    assert "engine threads 12 (3 frames at once), 12 reader threads, 16 cores usable" in line


def test_a_damaged_tiff_is_one_line_without_the_readers_warnings(tmp_path):
    """A TIFF cut inside its header makes PIL warn ("Corrupt EXIF data", two lines) on top of
    the command's own failure line: the user sees that one line and the summary, nothing
    else (a fresh process, as a user runs it: pytest would catch the warnings itself)."""
    from PIL import Image

    (tmp_path / "geo.poni").write_text(PONI)
    good, damaged = tmp_path / "a_good.tif", tmp_path / "b_damaged.tif"
    Image.fromarray(make_frame(1).astype(np.int32)).save(good)
    Image.fromarray(make_frame(2).astype(np.int32)).save(damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])   # the first IFD's entries cut
    result = subprocess.run(
        [sys.executable, "-m", "azfilter", "integrate", "-p", str(tmp_path / "geo.poni"),
         "--backend", "python", "--npt", "40", str(good), str(damaged),
         "-o", str(tmp_path / "out.h5")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("azfilter: failed: ") and str(damaged) in lines[0]
    assert "1 frame reduced, 0 skipped, 1 failed" in lines[1]
    assert read_result(tmp_path / "out.h5").sources == [str(good)]
