"""Outlier statistics (azfilter.outliers) against a brute-force numpy count, on every backend.

A flat synthetic frame (1000 counts ± 5, uniform: no background pixel is ever beyond 1.8 std)
with injected outliers whose number and summed intensity are known: hot pixels and a 2x2
Bragg spot (upward: rejected and picked) and cold pixels (downward: rejected, never picked),
each in a bin of its own, plus invalid (NaN) pixels that are never available. The
statistics of sigma_clip and medfilt on every backend must equal a per-bin Python loop that
follows the definitions literally, and the known counts.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from opencl_device import require_opencl

import azfilter as az
from azfilter.backends import get_engine_class
from azfilter.detectors import generic_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry
from azfilter.outliers import Outliers, format_summary, parse_summary

SHAPE = (60, 80)
NPT = 24
BACKENDS = ("python", "cython", pytest.param("opencl", marks=pytest.mark.opencl))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def geometry() -> Geometry:
    detector = generic_detector(172e-6, 172e-6, SHAPE)
    return Geometry(dist=0.05, poni1=0.002, poni2=0.003, wavelength=1e-10, detector=detector)


def integrator(backend: str) -> az.Integrator:
    try:
        get_engine_class(backend)
    except AzfilterError as err:
        if IN_CI:
            pytest.fail(f"{backend} unavailable in CI: {err}")
        pytest.skip(str(err))
    device = None
    if backend == "opencl":
        require_opencl()
        device = os.environ.get("AZFILTER_OPENCL_DEVICE")
    # no solid angle, no polarization: every pixel's norm is 1, so I_j is the raw value
    return az.Integrator(geometry(), npt=NPT, unit="q_nm^-1", backend=backend, device=device,
                         solid_angle=False)


def make_frame() -> tuple[np.ndarray, dict]:
    """The frame and what was injected: hot/spot/cold pixel indices (flat)."""
    rng = np.random.default_rng(11)
    frame = 1000.0 + rng.uniform(-5.0, 5.0, SHAPE)
    table = az.Integrator(geometry(), npt=NPT, backend="python", solid_angle=False).table("no")
    bin_of = np.full(frame.size, -1)
    for k in range(NPT):
        bin_of[table.indices[table.indptr[k]:table.indptr[k + 1]]] = k
    sizes = np.bincount(bin_of[bin_of >= 0], minlength=NPT)
    busy = [k for k in np.argsort(-sizes) if sizes[k] > 60]
    spot_bin, hot_bins, cold_bins = busy[0], busy[1:9], busy[9:13]
    flat = frame.reshape(-1)
    # a 2x2 spot whose four pixels fall in one bin
    spot = None
    for j in rng.permutation(np.flatnonzero(bin_of == spot_bin)):
        r, c = divmod(int(j), SHAPE[1])
        block = [r * SHAPE[1] + c, r * SHAPE[1] + c + 1, (r + 1) * SHAPE[1] + c,
                 (r + 1) * SHAPE[1] + c + 1]
        if r + 1 < SHAPE[0] and c + 1 < SHAPE[1] and all(bin_of[b] == spot_bin for b in block):
            spot = block
            break
    assert spot is not None
    hot = [int(rng.choice(np.flatnonzero(bin_of == k))) for k in hot_bins]
    cold = [int(rng.choice(np.flatnonzero(bin_of == k))) for k in cold_bins]
    flat[spot] = 6000.0
    flat[hot] = rng.uniform(4000.0, 20000.0, len(hot))
    flat[cold] = 0.0
    invalid = rng.choice(np.flatnonzero(bin_of >= 0), 25, replace=False)
    invalid = np.setdiff1d(invalid, spot + hot + cold)
    flat[invalid] = np.nan
    return frame, {"spot": spot, "hot": hot, "cold": cold, "invalid": invalid, "table": table}


def brute_force(frame: np.ndarray, table, operation: str, pick: float, thres: float = 3.0,
                max_iter: int = 10, percentile: tuple[float, float] = (10.0, 90.0)) -> dict:
    """The statistics by a Python loop over bins, from the definitions (norm 1, azimuthal)."""
    flat = frame.reshape(-1)
    kept_per_bin, available_per_bin = [], []
    rejected = picked = 0
    rejected_sum = 0.0
    max_sigma = -math.inf
    for k in range(NPT):
        pixels = np.sort(table.indices[table.indptr[k]:table.indptr[k + 1]])
        x = flat[pixels]
        x = x[np.isfinite(x)]
        n = x.size
        if operation == "sigma_clip":
            kept = np.ones(n, dtype=bool)
            for _ in range(max_iter):
                count = int(kept.sum())
                if count == 0:
                    break
                mean = x[kept].mean()
                std = math.sqrt(((x[kept] - mean) ** 2).sum() / count)
                chauvenet = math.sqrt(2 * math.log(max(3, count) / math.sqrt(2 * math.pi)))
                drop = kept & (np.abs(x - mean) > max(thres, chauvenet) * std)
                if not drop.any():
                    break
                kept &= ~drop
        else:
            order = np.argsort(x, kind="stable")
            upper = np.arange(1, n + 1, dtype=np.float64)
            lower = upper - 1
            lo, hi = percentile[0] / 100 * n, percentile[1] / 100 * n
            chosen = ((lo <= lower) & (upper <= hi)) | ((lo >= lower) & (upper >= hi))
            kept = np.zeros(n, dtype=bool)
            kept[order[chosen]] = True
        kept_per_bin.append(int(kept.sum()))
        available_per_bin.append(n)
        rejected += n - int(kept.sum())
        rejected_sum += float(x[~kept].sum())
        if kept.any():
            mean = x[kept].mean()
            std = math.sqrt(((x[kept] - mean) ** 2).sum() / kept.sum())
            with np.errstate(divide="ignore", invalid="ignore"):
                z = (x - mean) / std
            picked += int(np.count_nonzero(z > pick))
            if np.any(~np.isnan(z)):
                max_sigma = max(max_sigma, float(np.nanmax(z)))
    return {"kept": np.array(kept_per_bin), "available": np.array(available_per_bin),
            "rejected": rejected, "rejected_sum": rejected_sum, "picked": picked,
            "max_sigma": max_sigma if max_sigma > -math.inf else math.nan}


def assert_matches(outliers: Outliers, expected: dict, what: str) -> None:
    np.testing.assert_array_equal(outliers.kept, expected["kept"], err_msg=f"{what}: kept")
    np.testing.assert_array_equal(outliers.available, expected["available"],
                                  err_msg=f"{what}: available")
    assert outliers.rejected == expected["rejected"], what
    assert outliers.picked == expected["picked"], what
    assert outliers.rejected_sum == pytest.approx(expected["rejected_sum"], rel=1e-12), what
    assert outliers.max_sigma == pytest.approx(expected["max_sigma"], rel=1e-9), what


@pytest.fixture(scope="module")
def injected():
    return make_frame()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigma_clip_counts_the_injected_outliers(backend, injected):
    frame, where = injected
    result = integrator(backend).sigma_clip(frame, thres=3.0, max_iter=10,
                                            error_model="azimuthal", pick=3.0)
    outliers = result.outliers
    np.testing.assert_array_equal(outliers.kept, result.count)
    expected = brute_force(frame, where["table"], "sigma_clip", 3.0)
    assert_matches(outliers, expected, f"{backend} sigma_clip")
    # the known answer: every injected pixel and nothing else is rejected; the upward ones
    # (hot pixels and the spot) are picked, the cold ones not
    injected_pixels = where["spot"] + where["hot"] + where["cold"]
    flat = frame.reshape(-1)
    assert outliers.rejected == len(injected_pixels) == 16
    assert outliers.picked == len(where["spot"]) + len(where["hot"]) == 12
    assert outliers.rejected_sum == pytest.approx(flat[injected_pixels].sum(), rel=1e-12)
    assert outliers.max_sigma > 1000          # the hottest pixel, in std of a ±5 ring
    listed = np.zeros(flat.size, dtype=bool)
    listed[where["table"].indices] = True
    assert outliers.available.sum() == np.count_nonzero(listed & np.isfinite(flat))


@pytest.mark.parametrize("backend", BACKENDS)
def test_medfilt_statistics_equal_the_brute_force(backend, injected):
    frame, where = injected
    result = integrator(backend).medfilt(frame, percentile=(10, 90), split="no",
                                         error_model="azimuthal", pick=2.0)
    expected = brute_force(frame, where["table"], "medfilt", 2.0, percentile=(10.0, 90.0))
    assert_matches(result.outliers, expected, f"{backend} medfilt")
    # the tails of every ring are left out: about 20 % of the pixels
    assert 0.15 < result.outliers.rejected / result.outliers.available.sum() < 0.25
    assert result.outliers.picked >= 12       # the injected ones at least


@pytest.mark.parametrize("backend", BACKENDS)
def test_pick_threshold_and_process_many(backend, injected):
    frame, where = injected
    integ = integrator(backend)
    picked = [integ.sigma_clip(frame, thres=3.0, max_iter=10, pick=p).outliers.picked
              for p in (1e6, 100.0, 1.0, -1e6)]
    assert picked[0] == 0
    assert picked[0] <= picked[1] <= picked[2] <= picked[3]
    # every valid pixel is above -1e6 std except the cold ones, which are NaN-free too
    assert picked[3] == integ.sigma_clip(frame, thres=3.0, max_iter=10).outliers.available.sum()
    stream = list(integ.process_many([("a", frame), ("b", frame)], "sigma_clip", thres=3.0,
                                     max_iter=10, pick=100.0))
    for _tag, result in stream:
        assert result.outliers.picked == picked[1]
        assert result.parameters["pick"] == 100.0


def test_integrate_has_no_statistics_and_sectors_split_them(injected):
    frame, _where = injected
    integ = az.Integrator(geometry(), npt=NPT, backend="python", solid_angle=False,
                          sectors=4)
    assert integ.integrate(frame).outliers is None
    result = integ.sigma_clip(frame, thres=3.0, max_iter=10)
    assert result.outliers.kept.shape == result.outliers.available.shape == (4, NPT)
    parts = [result.sector(k).outliers for k in range(4)]
    assert sum(p.rejected for p in parts) == result.outliers.rejected
    assert sum(p.picked for p in parts) == result.outliers.picked
    assert max(p.max_sigma for p in parts) == result.outliers.max_sigma


def test_no_valid_pixel_gives_nan_max_sigma():
    frame = np.full(SHAPE, np.nan)
    result = az.Integrator(geometry(), npt=NPT, backend="python",
                           solid_angle=False).sigma_clip(frame)
    assert result.outliers.rejected == result.outliers.picked == 0
    assert math.isnan(result.outliers.max_sigma)
    assert result.outliers.rejected_sum == 0.0


def test_summary_round_trip():
    values = {"rejected": 12, "rejected_sum": 34567.25, "picked": 7, "max_sigma": 41.5}
    text = format_summary(values, 3.0)
    assert text == "rejected=12 rejected_sum=34567.25 picked=7 max_sigma=41.5 pick=3"
    assert parse_summary(text) == (values, 3.0)
    nan_values, pick = parse_summary(format_summary({**values, "max_sigma": math.nan}, 2.5))
    assert math.isnan(nan_values["max_sigma"]) and pick == 2.5
    with pytest.raises(KeyError):
        parse_summary("rejected=1 picked=2")
