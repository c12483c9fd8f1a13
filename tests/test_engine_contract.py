"""The engine contract (tests/engine_contract.py) on the python, cython and opencl engines.

The same checks run on every backend: agreement with the numpy reference in every operation,
error model, split and frame dtype; empty bins; masks; dummies; process_many's order and
per-frame errors; the frame-buffer ring. Engine-specific behaviour stays in the
test_engine_<backend>.py files.
"""

from __future__ import annotations

import os

import pytest
from engine_contract import (
    DTYPES,
    OPERATION_CASES,
    SPLITS,
    check_agreement,
    check_dummies,
    check_empty_bins,
    check_host_buffers,
    check_masks,
    check_outliers,
    check_process_many,
    make_case,
)
from opencl_device import require_opencl

from azfilter.backends import get_engine_class
from azfilter.errors import AzfilterError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BACKENDS = ("python", "cython", pytest.param("opencl", marks=pytest.mark.opencl))


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module", params=BACKENDS)
def factory(request):
    """``factory(table, pixel_norm, dark, dummy, delta_dummy)`` of one backend's engine."""
    backend = request.param
    try:
        engine_class = get_engine_class(backend)
    except AzfilterError as err:
        if IN_CI:
            pytest.fail(f"{backend} backend unavailable in CI: {err}")
        pytest.skip(str(err))
    options = {}
    if backend == "opencl":

        require_opencl()
        options["device"] = os.environ.get("AZFILTER_OPENCL_DEVICE")

    def make(table, pixel_norm, dark, dummy, delta_dummy):
        return engine_class(table, pixel_norm, dark, dummy, delta_dummy, **options)
    make.backend = backend
    return make


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("operation", list(OPERATION_CASES))
def test_agrees_with_reference(factory, case, operation, split, dtype):
    check_agreement(factory, case, operation, split, dtype)


def test_empty_bins(factory, case):
    check_empty_bins(factory, case)


def test_outlier_statistics(factory, case):
    check_outliers(factory, case)


def test_masked_pixels(factory, case):
    check_masks(factory, case)


def test_dummies_and_nan(factory, case):
    check_dummies(factory, case)


def test_process_many_order_and_errors(factory, case):
    check_process_many(factory, case)


def test_host_buffers(factory, case):
    check_host_buffers(factory, case)
