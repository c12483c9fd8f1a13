"""Radial lookup tables (no split, full split) against pyFAI 2026.9 and an independent polygon
clipping, and their disk cache (keys, atomic writes, corrupt files, several processes)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from conftest import REPO

from azfilter import binning
from azfilter.binning import (
    CSR,
    bin_bounds,
    build_csr,
    csr_fullsplit,
    csr_nosplit,
    in_azimuth_range,
    normalize_azimuth_range,
)
from azfilter.detectors import get_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry
from azfilter.poni import load_poni

pyFAI = pytest.importorskip("pyFAI")
from pyFAI.integrator.azimuthal import AzimuthalIntegrator  # noqa: E402

logging.getLogger("pyFAI").setLevel(logging.ERROR)

PILATUS_PONI = "silx_Pilatus1M_AgBh/Pilatus1M_wl1A.poni"
UNIT_SCALES = {"q_nm^-1": 1.0, "2th_deg": 180.0 / math.pi, "r_mm": 1000.0}
# a user radial range inside the Pilatus 1M data, per unit
RADIAL_RANGES = {"q_nm^-1": (0.3, 1.5), "2th_deg": (0.2, 1.0), "r_mm": (10.0, 60.0)}
# strongly tilted, rotated geometry with the beam on the detector (so χ's ±π cut crosses it)
TILTED = dict(dist=0.12, poni1=0.09, poni2=0.07, rot1=0.25, rot2=-0.15, rot3=0.4,
              wavelength=1.0e-10)
NPT = 500
# pyFAI places full-split corners in float32 bin coordinates x = (corner - lo)/δ: at x ~ 500 that
# is ~3e-5 of a bin per corner, hence its coefficients are off by up to ~1e-4 (ours are float64).
FULLSPLIT_COEF_ATOL = 2e-4


# ---------------------------------------------------------------------------------- helpers
class PyfaiSetup:
    """A pyFAI integrator and float64 arrays from it (independent of azfilter.geometry)."""

    def __init__(self, ai: AzimuthalIntegrator, mask: np.ndarray):
        self.ai = ai
        self.shape = tuple(ai.detector.shape)
        self.mask = mask
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.chi = ai.center_array(self.shape, "chi_rad", scale=False)
        n1, n2 = self.shape
        # pyFAI's point functions put pixel centres at index + 0.5: corners are at index - 0.5
        rows, cols = np.mgrid[0 : n1 + 1, 0 : n2 + 1].astype(np.float64) - 0.5
        self.chi_grid = ai.chi(rows, cols)
        self._corner_functions = {
            "q_nm^-1": lambda: ai.qFunction(rows, cols),
            "2th_deg": lambda: ai.tth(rows, cols),
            "r_mm": lambda: ai.rFunction(rows, cols),
        }
        self._grids: dict[str, np.ndarray] = {}

    def center(self, unit: str) -> np.ndarray:
        return self.ai.array_from_unit(self.shape, "center", unit, scale=False)

    def corners(self, unit: str) -> np.ndarray:
        if unit not in self._grids:
            self._grids[unit] = self._corner_functions[unit]()
        return self._grids[unit]

    def run(self, unit, split, radial_range=None, azimuth_range=None, npt=NPT):
        """pyFAI's integrate1d of a frame of ones and the CSR of the engine it used."""
        res = self.ai.integrate1d(
            np.ones(self.shape, np.float32), npt, unit=unit, method=(split, "csr", "cython"),
            correctSolidAngle=False, mask=self.mask, radial_range=radial_range,
            azimuth_range=azimuth_range,
        )
        engine = self.ai.engines[res.method].engine
        matrix = scipy.sparse.csr_matrix(
            (engine.data.astype(np.float64), engine.indices, engine.indptr),
            shape=(npt, self.mask.size),
        )
        return res, engine, matrix


@pytest.fixture(scope="module")
def pilatus(testdata):
    ai = pyFAI.load(str(testdata / PILATUS_PONI))
    return PyfaiSetup(ai, ai.detector.mask.astype(bool))


@pytest.fixture(scope="module")
def tilted():
    ai = AzimuthalIntegrator(detector="Pilatus1M", **TILTED)
    return PyfaiSetup(ai, ai.detector.mask.astype(bool))


def as_matrix(parts, n_pixels: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix(
        (parts.coefs.astype(np.float64), parts.indices, parts.indptr),
        shape=(parts.npt, n_pixels),
    )


def row_sums(parts) -> np.ndarray:
    rows = np.repeat(np.arange(parts.npt), np.diff(parts.indptr))
    return np.bincount(rows, weights=parts.coefs.astype(np.float64), minlength=parts.npt)


def check_layout(parts, mask: np.ndarray) -> None:
    """dtypes, CSR consistency, pixels increasing within a row, no masked pixel, coefs > 0."""
    assert parts.indptr.dtype == np.int64 and parts.indptr.shape == (parts.npt + 1,)
    assert parts.indices.dtype == np.int32 and parts.coefs.dtype == np.float32
    assert parts.indptr[0] == 0 and parts.indptr[-1] == parts.indices.size == parts.coefs.size
    assert np.all(np.diff(parts.indptr) >= 0)
    rows = np.repeat(np.arange(parts.npt), np.diff(parts.indptr))
    same_row = rows[1:] == rows[:-1]
    assert np.all(np.diff(parts.indices.astype(np.int64))[same_row] > 0)
    assert not mask.reshape(-1)[parts.indices].any()
    assert np.all(parts.coefs > 0)


# ---------------------------------------------------------------------------------- ranges
def test_bin_bounds_rules():
    eps = 2.0**-23
    assert bin_bounds(-0.5, 2.0) == (0.0, 2.0 * (1 + eps))  # lower bound clamped at 0
    assert bin_bounds(0.25, 2.0) == (0.25, 2.0 * (1 + eps))
    # a user range replaces the data range, as given (min, max), and is not clamped
    assert bin_bounds(0.25, 2.0, (3.0, -1.0)) == (-1.0, 3.0 * (1 + eps))
    assert bin_bounds(0.0, 0.0, (-3.0, -1.0)) == (-3.0, -1.0 / (1 + eps))
    with pytest.raises(AzfilterError, match="empty radial range"):
        bin_bounds(-2.0, -1.0)  # everything negative: clamped to [0, 0]
    centers = binning.bin_centers(0.0, 10.0, 5)
    np.testing.assert_array_equal(centers, [1.0, 3.0, 5.0, 7.0, 9.0])


def test_azimuth_range_wraps_across_180():
    assert normalize_azimuth_range(None) is None
    lo, hi = normalize_azimuth_range((170, -170))
    assert math.isclose(math.degrees(lo), 170) and math.isclose(math.degrees(hi), 190)
    chi = np.radians([-180.0, -175.0, -169.0, 0.0, 169.0, 171.0, 179.9, 180.0])
    np.testing.assert_array_equal(
        in_azimuth_range(chi, (lo, hi)), [True, True, False, False, False, True, True, True]
    )
    # the lower and upper limits are both inclusive
    assert in_azimuth_range(np.radians([-90.0, 0.0]), normalize_azimuth_range((-90, 0))).all()
    assert in_azimuth_range(chi, normalize_azimuth_range((0, 0))).all()  # the full circle
    assert in_azimuth_range(chi, normalize_azimuth_range((-180, 180))).all()
    with pytest.raises(AzfilterError, match="azimuth range"):
        normalize_azimuth_range((0, float("nan")))
    with pytest.raises(AzfilterError, match="azimuth range"):
        normalize_azimuth_range(("a", 3))


# ---------------------------------------------------------------------------------- no split
def test_nosplit_floor_leaves_out_pixels_below_the_range():
    # 1 x 8 pixels at radial 0.0625 .. 0.9375 (exact binary fractions), δ = 1/8 over (0.25, 0.75)
    radial = (np.arange(8, dtype=np.float64) * 0.125 + 0.0625).reshape(1, 8)
    mask = np.zeros(radial.shape, bool)
    parts = csr_nosplit(radial, None, mask, 4, (0.25, 0.75))
    check_layout(parts, mask)
    # 0.1875 lies one bin below the range: pyFAI would put it in bin 0, we leave it out
    np.testing.assert_array_equal(parts.indptr, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(parts.indices, [2, 3, 4, 5])
    # without a range: [0.0625, 0.9375·(1+2^-23)], every pixel in, the largest in the last bin
    parts = csr_nosplit(radial, None, mask, 4)
    assert parts.lo == 0.0625 and parts.hi == 0.9375 * (1 + 2.0**-23)
    np.testing.assert_array_equal(parts.indptr, [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(parts.indices, np.arange(8))


def test_nosplit_masked_and_nonfinite_pixels_never_enter():
    rng = np.random.default_rng(5)
    radial = rng.uniform(1.0, 2.0, (30, 40))
    radial[3, 4] = np.nan
    mask = rng.random(radial.shape) < 0.2
    mask[0, 0] = False
    radial[0, 0] = 100.0  # a masked outlier would stretch the range: unmasked, it does
    parts = csr_nosplit(radial, None, mask, 50)
    check_layout(parts, mask)
    assert parts.hi == 100.0 * (1 + 2.0**-23)
    assert 3 * 40 + 4 not in parts.indices
    assert parts.indices.size == (~mask).sum() - 1
    mask[:] = True
    with pytest.raises(AzfilterError, match="every pixel is masked"):
        csr_nosplit(radial, None, mask, 50)


@pytest.mark.parametrize("unit", list(UNIT_SCALES))
@pytest.mark.parametrize("setup_name", ["pilatus", "tilted"])
def test_nosplit_matches_pyfai(request, setup_name, unit):
    setup = request.getfixturevalue(setup_name)
    scale = UNIT_SCALES[unit]
    center = setup.center(unit)

    res, engine, _ = setup.run(unit, "no")
    parts = csr_nosplit(center, None, setup.mask, NPT)
    check_layout(parts, setup.mask)
    assert parts.lo == engine.pos0_min and parts.hi == engine.pos0_max
    np.testing.assert_allclose(parts.bin_centers * scale, res.radial, rtol=1e-12, atol=0)
    # the same table, entry for entry
    np.testing.assert_array_equal(parts.indptr, engine.indptr)
    np.testing.assert_array_equal(parts.indices, engine.indices)

    # a range inside the data, so that pixels lie below and above it
    valid = center[~setup.mask]
    user_range = tuple(float(np.quantile(valid, q)) * scale for q in (0.2, 0.8))
    res, engine, _ = setup.run(unit, "no", radial_range=user_range)
    parts = csr_nosplit(center, None, setup.mask, NPT, [v / scale for v in user_range])
    assert parts.lo == engine.pos0_min and parts.hi == engine.pos0_max
    np.testing.assert_allclose(parts.bin_centers * scale, res.radial, rtol=1e-12, atol=0)
    counts = np.diff(parts.indptr)
    # identical but for bin 0, where pyFAI also piles the pixels up to one bin below the range
    np.testing.assert_array_equal(counts[1:], res.count[1:])
    below = (center >= parts.lo - parts.delta) & (center < parts.lo) & ~setup.mask
    assert below.sum() > 0 and counts[0] + below.sum() == res.count[0]


def test_nosplit_azimuth_ranges_match_pyfai(pilatus):
    center = pilatus.center("q_nm^-1")
    for azimuth in [(-90, 0), (20, 30), (-170, 170)]:
        res, engine, _ = pilatus.run("q_nm^-1", "no", azimuth_range=azimuth)
        parts = csr_nosplit(center, pilatus.chi, pilatus.mask, NPT, None,
                            normalize_azimuth_range(azimuth))
        check_layout(parts, pilatus.mask)
        # the radial range is that of all unmasked pixels, whatever the azimuth range
        assert parts.lo == engine.pos0_min and parts.hi == engine.pos0_max
        np.testing.assert_array_equal(np.diff(parts.indptr), res.count)
    # across ±180°, (170, -170) is the union of pyFAI's (170, 180) and (-180, -170)
    parts = csr_nosplit(center, pilatus.chi, pilatus.mask, NPT, None,
                        normalize_azimuth_range((170, -170)))
    upper, _, _ = pilatus.run("q_nm^-1", "no", azimuth_range=(170, 180))
    lower, _, _ = pilatus.run("q_nm^-1", "no", azimuth_range=(-180, -170))
    counts = np.diff(parts.indptr)
    assert counts.sum() > 1000
    np.testing.assert_array_equal(counts, upper.count + lower.count)


# ---------------------------------------------------------------------------------- full split
def clip_polygon(points: list[tuple[float, float]], x_min: float, x_max: float):
    """Sutherland-Hodgman clipping of a polygon to the strip x_min <= x <= x_max."""

    def clip(poly, inside, cross):
        out = []
        for k, current in enumerate(poly):
            previous = poly[k - 1]
            if inside(current):
                if not inside(previous):
                    out.append(cross(previous, current))
                out.append(current)
            elif inside(previous):
                out.append(cross(previous, current))
        return out

    def crossing(limit):
        def cross(p, q):
            t = (limit - p[0]) / (q[0] - p[0])
            return (limit, p[1] + t * (q[1] - p[1]))
        return cross

    poly = clip(points, lambda p: p[0] >= x_min, crossing(x_min))
    return clip(poly, lambda p: p[0] <= x_max, crossing(x_max)) if poly else poly


def polygon_area(points) -> float:
    if len(points) < 3:
        return 0.0
    x = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def reference_fullsplit(radial_grid, chi_true_grid, mask, lo, hi, npt):
    """Coefficients by clipping each pixel's quadrilateral to each bin (dense, small grids)."""
    n1, n2 = mask.shape
    delta = (hi - lo) / npt
    dense = np.zeros((npt, n1 * n2))
    for i in range(n1):
        for j in range(n2):
            if mask[i, j]:
                continue
            quad = [(radial_grid[a, b], chi_true_grid[a, b])
                    for a, b in ((i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1))]
            areas = np.array([
                polygon_area(clip_polygon(quad, lo + k * delta, lo + (k + 1) * delta))
                for k in range(npt)
            ])
            if areas.sum() > 0:
                dense[:, i * n2 + j] = areas / areas.sum()
    return dense


@pytest.mark.parametrize("radial_range", [None, (2.0, 2.6)])
def test_fullsplit_is_the_exact_area_across_the_chi_cut(radial_range):
    # a smooth, distorted grid whose χ runs across the ±π cut (values near ±π wrap)
    rng = np.random.default_rng(11)
    n1, n2 = 6, 7
    ii, jj = np.mgrid[0 : n1 + 1, 0 : n2 + 1].astype(np.float64)
    radial = 1.0 + 0.37 * jj + 0.05 * ii + 0.04 * rng.standard_normal(ii.shape)
    chi_true = math.pi - 0.3 + 0.1 * ii + 0.02 * jj + 0.01 * rng.standard_normal(ii.shape)
    chi_wrapped = np.mod(chi_true + math.pi, 2 * math.pi) - math.pi
    assert (chi_wrapped < 0).any() and (chi_wrapped > 0).any()
    mask = np.zeros((n1, n2), bool)
    mask[2, 3] = True
    npt = 9

    parts = csr_fullsplit(radial, chi_wrapped, mask, npt, radial_range)
    check_layout(parts, mask)
    if radial_range is None:
        # range: min/max over all corners (in float32), upper bound times 1 + 2^-23
        assert parts.lo == float(np.float32(radial.min()))
        assert parts.hi == float(np.float32(radial.max())) * (1 + 2.0**-23)
    else:
        # a narrow range: pixels span several bins and stick out of it on both sides
        assert (parts.lo, parts.hi) == (2.0, 2.6 * (1 + 2.0**-23))
    expected = reference_fullsplit(radial, chi_true, mask, parts.lo, parts.hi, npt)
    ours = as_matrix(parts, n1 * n2).toarray()
    np.testing.assert_allclose(ours, expected, atol=2e-7, rtol=0)  # float32 coefficients
    assert (expected > 0).sum() == parts.indices.size  # nothing missing, nothing extra
    # every pixel reaching into the range is shared out completely
    per_pixel = np.bincount(parts.indices, weights=parts.coefs, minlength=n1 * n2)
    touched = expected.sum(axis=0) > 0
    if radial_range is None:
        assert touched.sum() == n1 * n2 - 1  # every unmasked pixel
    else:
        assert 10 < touched.sum() < n1 * n2 - 1
    np.testing.assert_allclose(per_pixel[touched], 1.0, atol=1e-6)


def test_fullsplit_range_edge_keeps_full_weight_and_single_bin_is_one():
    # one row of 3 pixels with radial corners 0..3 (δ = 1 with npt=3 over (0.5, 3.5))
    radial = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    chi = np.array([[0.0] * 4, [0.1] * 4])
    mask = np.zeros((1, 3), bool)
    parts = csr_fullsplit(radial, chi, mask, 3, (0.5, 3.5))
    # bins [0.5,1.5) [1.5,2.5) [2.5,3.5): pixel 0 (0..1) has half its area below the range but
    # keeps weight 1 in bin 0; pixels 1, 2 split half-half
    dense = as_matrix(parts, 3).toarray()
    # (δ is 1 + 2^-23: the upper bound is widened a little)
    np.testing.assert_allclose(dense[:, 0], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(dense[:, 1], [0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(dense[:, 2], [0.0, 0.5, 0.5], atol=1e-6)
    # a pixel wholly inside one bin gets exactly 1
    parts = csr_fullsplit(radial, chi, mask, 1)
    assert parts.indices.tolist() == [0, 1, 2] and parts.coefs.tolist() == [1.0, 1.0, 1.0]


def test_fullsplit_zero_area_pixel_goes_whole_to_its_centre_bin():
    # all corners on one χ: the pixel has no area, but spans bins 0..3
    radial = np.array([[0.0, 4.0], [0.0, 2.0]])
    chi = np.full((2, 2), 0.5)
    mask = np.zeros((1, 1), bool)
    parts = csr_fullsplit(radial, chi, mask, 4, radial_center=np.array([[2.5]]))
    assert parts.indices.tolist() == [0] and parts.coefs.tolist() == [1.0]
    np.testing.assert_array_equal(parts.indptr, [0, 0, 0, 1, 1])
    # without centres, the corners' mean (1.5) decides
    parts = csr_fullsplit(radial, chi, mask, 4)
    np.testing.assert_array_equal(parts.indptr, [0, 0, 1, 1, 1])
    # a centre outside the range leaves the pixel out, though its corners reach into it
    parts = csr_fullsplit(radial, chi, mask, 4, (2.0, 6.0))
    assert parts.indices.size == 0


@pytest.mark.parametrize("unit", list(UNIT_SCALES))
@pytest.mark.parametrize("setup_name", ["pilatus", "tilted"])
def test_fullsplit_matches_pyfai(request, setup_name, unit):
    setup = request.getfixturevalue(setup_name)
    scale = UNIT_SCALES[unit]
    res, engine, theirs = setup.run(unit, "full")
    parts = csr_fullsplit(setup.corners(unit), setup.chi_grid, setup.mask, NPT,
                          radial_center=setup.center(unit))
    check_layout(parts, setup.mask)
    assert parts.lo == engine.pos0_min and parts.hi == engine.pos0_max
    np.testing.assert_allclose(parts.bin_centers * scale, res.radial, rtol=1e-12, atol=0)
    difference = np.abs((as_matrix(parts, setup.mask.size) - theirs).data)
    assert difference.max() < FULLSPLIT_COEF_ATOL
    assert np.percentile(difference, 99) < 5e-5
    np.testing.assert_allclose(row_sums(parts), res.count, rtol=1e-5, atol=1e-3)


def test_fullsplit_with_radial_range_matches_pyfai(pilatus):
    unit = "2th_deg"
    user_range = RADIAL_RANGES[unit]
    res, engine, theirs = pilatus.run(unit, "full", radial_range=user_range)
    parts = csr_fullsplit(pilatus.corners(unit), pilatus.chi_grid, pilatus.mask, NPT,
                          [v / UNIT_SCALES[unit] for v in user_range])
    assert parts.lo == engine.pos0_min and parts.hi == engine.pos0_max
    difference = np.abs((as_matrix(parts, pilatus.mask.size) - theirs).data)
    assert difference.max() < FULLSPLIT_COEF_ATOL
    np.testing.assert_allclose(row_sums(parts), res.count, rtol=1e-5, atol=1e-3)


def test_fullsplit_azimuth_range_decides_on_the_centre(tilted):
    unit = "q_nm^-1"
    azimuth = (150, -120)  # across ±180°
    whole = csr_fullsplit(tilted.corners(unit), tilted.chi_grid, tilted.mask, NPT)
    wedge = csr_fullsplit(tilted.corners(unit), tilted.chi_grid, tilted.mask, NPT, None,
                          normalize_azimuth_range(azimuth), chi_center=tilted.chi)
    check_layout(wedge, tilted.mask)
    assert (wedge.lo, wedge.hi) == (whole.lo, whole.hi)  # range of all unmasked pixels
    chi_deg = np.degrees(tilted.chi).ravel()
    inside = (chi_deg >= 150) | (chi_deg <= -120)
    assert 1000 < inside[~tilted.mask.ravel()].sum() < tilted.mask.size / 2
    expected = as_matrix(whole, tilted.mask.size)[:, np.flatnonzero(inside)]
    got = as_matrix(wedge, tilted.mask.size)[:, np.flatnonzero(inside)]
    assert wedge.indices.size == got.nnz  # no pixel whose centre lies outside
    assert abs(expected - got).max() == 0
    # pyFAI keeps every pixel that touches the wedge: it counts only the edge pixels more
    res, _, _ = tilted.run(unit, "full", azimuth_range=(-180, -120))
    ours = csr_fullsplit(tilted.corners(unit), tilted.chi_grid, tilted.mask, NPT, None,
                         normalize_azimuth_range((-180, -120)), chi_center=tilted.chi)
    assert 0 < res.count.sum() - row_sums(ours).sum() < 0.02 * res.count.sum()


def test_fullsplit_many_bins_per_pixel(monkeypatch):
    # npt far above the resolution: each pixel spans tens of bins (block halving kicks in)
    monkeypatch.setattr(binning, "_FULLSPLIT_DENSE_LIMIT", 2000)
    rng = np.random.default_rng(2)
    ii, jj = np.mgrid[0:9, 0:11].astype(np.float64)
    radial = 1.0 + ii + 0.3 * jj + 0.1 * rng.random(ii.shape)
    chi = 0.05 * jj + 0.02 * ii
    mask = np.zeros((8, 10), bool)
    parts = csr_fullsplit(radial, chi, mask, 400)
    check_layout(parts, mask)
    assert parts.indices.size > 20 * mask.size
    expected = reference_fullsplit(radial, chi, mask, parts.lo, parts.hi, 400)
    np.testing.assert_allclose(as_matrix(parts, mask.size).toarray(), expected, atol=2e-7)


# ---------------------------------------------------------------------------------- build_csr
@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "lut-cache"
    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(path))
    return path


# a Pilatus 100K (33 x 84 mm) with the beam on it, for the quick build_csr and cache tests
SMALL = dict(dist=0.1, poni1=0.017, poni2=0.04, rot1=0.05, rot2=-0.03, rot3=0.2,
             wavelength=1.0e-10)


def small_geometry() -> Geometry:
    return Geometry(detector=get_detector("Pilatus100k"), **SMALL)


@pytest.mark.slow
def test_build_csr_matches_pyfai_through_geometry(pilatus, testdata):
    geometry = load_poni(testdata / PILATUS_PONI)
    mask = geometry.detector.mask
    for unit in ("q_nm^-1", "r_mm"):
        for split in ("no", "full"):
            table = build_csr(geometry, unit, NPT, split, mask, cache=False)
            assert isinstance(table, CSR)
            assert (table.unit, table.split, table.shape, table.npt) == (
                unit, split, (1043, 981), NPT)
            check_layout(table, mask)
            res, engine, theirs = pilatus.run(unit, split)
            np.testing.assert_allclose(table.radial, res.radial, rtol=1e-12, atol=0)
            np.testing.assert_array_equal(table.radial, table.bin_centers * UNIT_SCALES[unit])
            assert table.bin_edges[0] == table.lo and table.bin_edges[-1] == pytest.approx(
                table.hi, rel=1e-15)
            if split == "no":
                np.testing.assert_array_equal(table.indices, engine.indices)
                np.testing.assert_array_equal(table.indptr, engine.indptr)
            else:
                difference = np.abs((as_matrix(table, mask.size) - theirs).data)
                assert difference.max() < FULLSPLIT_COEF_ATOL
            np.testing.assert_allclose(table.row_sums(), res.count, rtol=1e-5, atol=1e-3)


def test_build_csr_ranges_in_scaled_units(cache_dir):
    geometry = small_geometry()
    mask = np.zeros(geometry.detector.shape, bool)
    table = build_csr(geometry, "2th_deg", 100, "no", mask, radial_range=(10, 20),
                      azimuth_range=(170, -170))
    assert table.lo == 10 / (180 / math.pi)
    assert table.radial[0] == pytest.approx(10.05, abs=1e-6)
    assert table.radial[-1] == pytest.approx(19.95, abs=1e-5)
    pixels = table.indices
    tth = np.degrees(geometry.center_array("2th")).ravel()[pixels]
    chi = np.degrees(geometry.center_array("chi")).ravel()[pixels]
    assert pixels.size > 100
    assert tth.min() >= 10 and tth.max() < 20 * (1 + 2.0**-23)
    assert np.all((chi >= 170) | (chi <= -170))


def test_csr_made_by_hand_derives_npt_and_bounds(cache_dir):
    table = build_csr(small_geometry(), "r_mm", 64, "no", np.zeros((195, 487), bool))
    by_hand = CSR(table.indptr, table.indices, table.coefs, table.bin_centers, table.radial,
                  table.unit, table.split, [195, 487])
    assert by_hand.npt == 64 and by_hand.shape == (195, 487) and by_hand.size == 195 * 487
    assert by_hand.lo == pytest.approx(table.lo, rel=1e-12)
    assert by_hand.hi == pytest.approx(table.hi, rel=1e-12)
    np.testing.assert_allclose(by_hand.bin_edges, table.bin_edges, rtol=1e-12)
    np.testing.assert_array_equal(by_hand.row_sums(), np.diff(table.indptr))
    assert by_hand.nnz == table.nnz == 195 * 487


def test_build_csr_user_errors(cache_dir):
    geometry = small_geometry()
    mask = np.zeros(geometry.detector.shape, bool)
    with pytest.raises(AzfilterError, match="pixel splitting"):
        build_csr(geometry, "q_nm^-1", 100, "bbox", mask)
    with pytest.raises(AzfilterError, match="npt"):
        build_csr(geometry, "q_nm^-1", 0, "no", mask)
    with pytest.raises(AzfilterError, match="npt"):
        build_csr(geometry, "q_nm^-1", 2.5, "no", mask)
    with pytest.raises(AzfilterError, match="unit"):
        build_csr(geometry, "chi_deg", 100, "no", mask)
    with pytest.raises(AzfilterError, match="shape"):
        build_csr(geometry, "q_nm^-1", 100, "no", np.zeros((10, 10), bool))
    with pytest.raises(AzfilterError, match="radial range"):
        build_csr(geometry, "q_nm^-1", 100, "no", mask, radial_range=(1, 1))
    with pytest.raises(AzfilterError, match="radial range"):
        build_csr(geometry, "q_nm^-1", 100, "no", mask, radial_range=(1,))
    with pytest.raises(AzfilterError, match="masked"):
        build_csr(geometry, "q_nm^-1", 100, "full", np.ones_like(mask))
    geometry.wavelength = None
    with pytest.raises(AzfilterError, match="wavelength"):
        build_csr(geometry, "q_nm^-1", 100, "no", mask)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


# ---------------------------------------------------------------------------------- cache
def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(tmp_path / "explicit"))
    assert binning.cache_dir() == tmp_path / "explicit"
    for off in ("off", "0", "", "OFF"):
        monkeypatch.setenv("AZFILTER_CACHE_DIR", off)
        assert binning.cache_dir() is None
    monkeypatch.delenv("AZFILTER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert binning.cache_dir() == tmp_path / "xdg" / "azfilter"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert binning.cache_dir() == tmp_path / "home" / ".cache" / "azfilter"


def test_cache_hit_returns_the_same_table(cache_dir):
    geometry = small_geometry()
    mask = geometry.detector.mask.copy()
    mask[10:20, 30:40] = True
    first: dict = {}
    table = build_csr(geometry, "q_A^-1", 300, "full", mask, radial_range=(0.5, 2.5),
                      stats=first)
    assert first["cache"] == "miss" and first["stored"]
    assert Path(first["path"]).parent == cache_dir and Path(first["path"]).is_file()
    assert [p.name for p in cache_dir.iterdir()] == [Path(first["path"]).name]  # no temp left
    second: dict = {}
    again = build_csr(geometry, "q_A^-1", 300, "full", mask, radial_range=(0.5, 2.5),
                      stats=second)
    assert second["cache"] == "hit" and not second["stored"]
    for name in ("indptr", "indices", "coefs", "bin_centers", "radial"):
        assert getattr(again, name).dtype == getattr(table, name).dtype
        np.testing.assert_array_equal(getattr(again, name), getattr(table, name))
    assert (again.lo, again.hi, again.unit, again.split, again.shape) == (
        table.lo, table.hi, table.unit, table.split, table.shape)
    # anything the table depends on gives another file
    changed = mask.copy()
    changed[0, 0] = True
    variants = [
        dict(unit="q_nm^-1"), dict(npt=301), dict(split="no"), dict(static_mask=changed),
        dict(radial_range=(0.5, 2.6)), dict(azimuth_range=(0, 90)),
    ]
    paths = {first["path"]}
    for variant in variants:
        args = dict(unit="q_A^-1", npt=300, split="full", static_mask=mask,
                    radial_range=(0.5, 2.5)) | variant
        stats: dict = {}
        build_csr(geometry, stats=stats, **args)
        assert stats["cache"] == "miss", variant
        paths.add(stats["path"])
    geometry.dist += 1e-9
    stats = {}
    build_csr(geometry, "q_A^-1", 300, "full", mask, radial_range=(0.5, 2.5), stats=stats)
    assert stats["cache"] == "miss"
    paths.add(stats["path"])
    assert len(paths) == len(variants) + 2


def test_cache_off_and_cache_false(cache_dir, monkeypatch):
    geometry = small_geometry()
    mask = np.zeros(geometry.detector.shape, bool)
    stats: dict = {}
    build_csr(geometry, "q_nm^-1", 100, "no", mask, cache=False, stats=stats)
    assert stats["cache"] == "off" and stats["path"] is None
    monkeypatch.setenv("AZFILTER_CACHE_DIR", "off")
    build_csr(geometry, "q_nm^-1", 100, "no", mask, stats=stats)
    assert stats["cache"] == "off"
    assert not cache_dir.exists()


def test_unwritable_cache_dir_still_builds(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(blocker / "cache"))
    geometry = small_geometry()
    mask = np.zeros(geometry.detector.shape, bool)
    stats: dict = {}
    table = build_csr(geometry, "q_nm^-1", 100, "full", mask, stats=stats)
    assert stats["cache"] == "miss" and not stats["stored"]
    assert table.nnz > mask.size
    assert list(tmp_path.iterdir()) == [blocker]


def _corruptions(path: Path, key: str) -> dict:
    good = path.read_bytes()
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    bad_index = arrays | {"indices": arrays["indices"].copy()}
    bad_index["indices"][-1] = 10**9  # outside the detector: must never reach an engine
    bad_ptr = arrays | {"indptr": arrays["indptr"][::-1].copy()}
    wrong_key = arrays | {"key": np.str_("0" * 64)}
    return {
        "garbage": b"this is not a zip file",
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "bad index": bad_index,
        "bad indptr": bad_ptr,
        "wrong key": wrong_key,
        "wrong dtype": arrays | {"coefs": arrays["coefs"].astype(np.float64)},
        "missing array": {k: v for k, v in arrays.items() if k != "coefs"},
    }


def test_corrupt_cache_file_is_rebuilt(cache_dir):
    geometry = small_geometry()
    mask = geometry.detector.mask
    stats: dict = {}
    table = build_csr(geometry, "2th_deg", 200, "full", mask, stats=stats)
    path = Path(stats["path"])
    for name, content in _corruptions(path, path.stem).items():
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            with open(path, "wb") as handle:
                np.savez(handle, **content)
        stats = {}
        rebuilt = build_csr(geometry, "2th_deg", 200, "full", mask, stats=stats)
        assert stats["cache"] == "miss" and stats["stored"], name
        np.testing.assert_array_equal(rebuilt.indices, table.indices)
        np.testing.assert_array_equal(rebuilt.coefs, table.coefs)
        stats = {}
        build_csr(geometry, "2th_deg", 200, "full", mask, stats=stats)
        assert stats["cache"] == "hit", name


CHILD = """
import hashlib, json, sys
import numpy as np
from azfilter.binning import build_csr
from azfilter.detectors import get_detector
from azfilter.geometry import Geometry
geometry = Geometry(detector=get_detector("Pilatus300k"), **json.loads(sys.argv[1]))
mask = geometry.detector.mask.copy()
mask[100:110, 200:260] = True
stats = {}
table = build_csr(geometry, "q_nm^-1", 700, "full", mask, azimuth_range=(-150, 120), stats=stats)
digest = hashlib.sha256()
for array in (table.indptr, table.indices, table.coefs, table.radial):
    digest.update(array.tobytes())
print(json.dumps({"cache": stats["cache"], "stored": stats["stored"],
                  "digest": digest.hexdigest()}))
"""


def run_children(n: int, cache_dir: Path) -> list[dict]:
    env = dict(os.environ, AZFILTER_CACHE_DIR=str(cache_dir),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(TILTED)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_processes_share_the_cache(cache_dir):
    # four processes start at once on an empty cache: all succeed with the same table
    racing = run_children(4, cache_dir)
    assert len({report["digest"] for report in racing}) == 1
    assert all(report["cache"] in ("miss", "hit") for report in racing)
    assert any(report["stored"] for report in racing)
    files = list(cache_dir.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one table, no temporary left over
    # a later process loads it instead of building
    (later,) = run_children(1, cache_dir)
    assert later["cache"] == "hit" and not later["stored"]
    assert later["digest"] == racing[0]["digest"]
    # and this process too, building the same table through the same code
    geometry = Geometry(detector=get_detector("Pilatus300k"), **TILTED)
    mask = geometry.detector.mask.copy()
    mask[100:110, 200:260] = True
    stats: dict = {}
    table = build_csr(geometry, "q_nm^-1", 700, "full", mask, azimuth_range=(-150, 120),
                      stats=stats)
    assert stats["cache"] == "hit"
    digest = hashlib.sha256()
    for array in (table.indptr, table.indices, table.coefs, table.radial):
        digest.update(array.tobytes())
    assert digest.hexdigest() == later["digest"]


# ------------------------------------------------------------ numpy no-split builder (fallback)
@pytest.mark.parametrize("radial_range, azimuth", [
    ((0.0, 6.0), None),        # ends inside the data: the outer pixels fall beyond the last bin
    ((2.5, 7.5), None),        # starts and ends inside the data
    ((2.0, 9.99), (-90.0, 45.0)),
    (None, None),              # the data's own range
])
def test_numpy_nosplit_builder_radial_range_inside_the_data(monkeypatch, radial_range, azimuth):
    """The numpy builder (used without the compiled extension) keeps exactly the pixels whose
    bin floor((c - lo)/δ) is in [0, npt), in pixel order within each bin; pixels beyond the
    range are left out, not put into a bin past the last one."""
    monkeypatch.setattr(binning, "USE_COMPILED_NOSPLIT", False)
    rows, cols = np.indices((30, 40))
    radial = np.hypot(rows - 3.3, cols - 5.1) / 4.0          # 0 .. ~10
    chi = np.arctan2(rows - 3.3, cols - 5.1)
    mask = np.zeros(radial.shape, dtype=bool)
    mask[10:12, :] = True
    npt = 37
    az = None if azimuth is None else binning.normalize_azimuth_range(azimuth)
    parts = binning.csr_nosplit(radial, chi, mask, npt, radial_range, az)
    # independent expectation, pixel by pixel
    delta = (parts.hi - parts.lo) / npt
    expected_rows: list[list[int]] = [[] for _ in range(npt)]
    for pixel, (value, angle, masked) in enumerate(zip(radial.ravel(), chi.ravel(),
                                                       mask.ravel(), strict=True)):
        if masked or (az is not None and not binning.in_azimuth_range(np.array([angle]),
                                                                      az)[0]):
            continue
        position = math.floor((value - parts.lo) / delta)
        if 0 <= position < npt:
            expected_rows[position].append(pixel)
    expected_indptr = np.cumsum([0] + [len(row) for row in expected_rows])
    np.testing.assert_array_equal(parts.indptr, expected_indptr)
    np.testing.assert_array_equal(parts.indices, [p for row in expected_rows for p in row])
    assert np.all(parts.coefs == 1.0)
    if radial_range is not None:
        assert parts.indices.size < np.count_nonzero(~mask)   # some pixels were left out
    # the compiled builder, when built, gives the same table
    if binning._compiled_nosplit() is not None:
        monkeypatch.setattr(binning, "USE_COMPILED_NOSPLIT", True)
        compiled = binning.csr_nosplit(radial, chi, mask, npt, radial_range, az)
        np.testing.assert_array_equal(compiled.indptr, parts.indptr)
        np.testing.assert_array_equal(compiled.indices, parts.indices)
