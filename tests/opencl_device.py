"""The OpenCL device the tests run on, one rule for every test file.

Without a device a test is skipped, except in CI, where it fails: CI must run the OpenCL
tests on PoCL. ``$AZFILTER_OPENCL_DEVICE`` picks the device (``gpu`` on the GPU machine).
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_opencl() -> list[dict]:
    """The OpenCL devices there are; skips (fails in CI) when there is none."""
    from azfilter.backends import opencl

    devices = opencl.list_devices()
    if not devices:
        reason = "no OpenCL device: " + opencl.opencl_status()
        if IN_CI:
            pytest.fail(reason + " (CI must run the OpenCL tests on PoCL)")
        pytest.skip(reason)
    return devices


def opencl_test_device() -> str:
    """The id (``P:D``) of the device the tests run on: ``$AZFILTER_OPENCL_DEVICE``, else the
    best one (skips, or fails in CI, without a device)."""
    from azfilter.backends import opencl

    require_opencl()
    return opencl.select_device(os.environ.get("AZFILTER_OPENCL_DEVICE"))[0]["id"]
