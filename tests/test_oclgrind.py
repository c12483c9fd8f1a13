"""The OpenCL kernels under Oclgrind: no data race, no barrier divergence, no bad access.

PoCL runs a work-group's items in an order where a missing barrier rarely changes a result,
so the OpenCL suite cannot show one. Oclgrind (Debian package ``oclgrind``) simulates every
work-item and reports data races, barrier divergence, out-of-bounds and uninitialized reads,
and (``--check-api``) OpenCL calls made with wrong arguments.
This test runs ``tests/oclgrind/kernels_small.py`` (integrate, sigma_clip, medfilt with the
local and the global sort, in double and compensated float32, and the bitshuffle-LZ4
decoder, on tiny cases) under ``oclgrind`` and fails on any report or any failing check.

The compensated float32 engine runs with ``--data-races`` only: Oclgrind 21.10's
``--uninitialized`` plugin crashes (segmentation fault) in its sigma_clip and medfilt kernels.
Skips when ``oclgrind`` is not installed, except in CI (``CI=true``), where it must run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.opencl

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
KERNEL_CHECKS = REPO / "tests" / "oclgrind" / "kernels_small.py"

# (pytest -k selection, Oclgrind checks)
RUNS = {
    "fp64_and_decoder": ("not fp32", ["--data-races", "--uninitialized", "--check-api"]),
    "fp32": ("fp32", ["--data-races", "--check-api"]),
}


@pytest.fixture(scope="module")
def oclgrind() -> str:
    path = shutil.which("oclgrind")
    if path is None:
        reason = "oclgrind is not installed (apt-get install oclgrind)"
        if IN_CI:
            pytest.fail(reason + "; CI must run the kernels under Oclgrind")
        pytest.skip(reason)
    return path


@pytest.mark.parametrize("run", list(RUNS))
def test_kernels_under_oclgrind(oclgrind, tmp_path, run):
    selection, checks = RUNS[run]
    log = tmp_path / "oclgrind.log"
    env = dict(os.environ, AZFILTER_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("AZFILTER_OPENCL_DEVICE", None)   # Oclgrind's device is the only one there
    command = [oclgrind, *checks, "--log", str(log), sys.executable, "-m", "pytest", "-q",
               "-p", "no:cacheprovider", "-k", selection, str(KERNEL_CHECKS)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1800)
    report = log.read_text(errors="replace") if log.exists() else ""
    assert result.returncode == 0, (
        f"kernel checks failed under Oclgrind (exit {result.returncode}):\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}\nOclgrind log:\n{report[:4000]}")
    assert "passed" in result.stdout and "skipped" not in result.stdout, result.stdout
    assert report.strip() == "", f"Oclgrind reported:\n{report[:6000]}"
