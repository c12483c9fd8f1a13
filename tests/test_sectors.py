"""Several χ sectors in one pass: lookup tables over (sector, radial) cells.

What is checked:

- :func:`azfilter.binning.sector_ranges`: equal sectors (full circle, a span across ±180°),
  explicit ranges, and every way of getting them wrong (one-line errors);
- for every backend (python, cython, opencl) and operation (integrate, sigma_clip, medfilt;
  no split and full split), N sectors in one pass give what N separate Integrators give:
  ``azimuth_range=sector`` without splitting, a one-sector Integrator with full splitting
  (whose χ edges cut pixels by area, unlike an azimuth range). Bit for bit on the python
  backend, 1e-6 relative on the others, on a textured frame whose sectors really differ;
- explicit, overlapping ranges and ranges across ±180°, and N sectors spanning an azimuth
  range across ±180°;
- full split: a pixel's coefficients over sectors that tile the circle add up to those of the
  table without sectors, a pixel wholly inside a sector keeps them exactly, and cut pixels
  have the areas an independent polygon clipping (Sutherland-Hodgman, written here) gives;
- the disk cache tells sectors apart and keeps the key of a table without sectors;
- the Result API: shapes ``(n_sectors, npt)``, ``chi``, ``sectors``, ``sector(k)``; no
  sectors: everything as before;
- pyFAI: one ``integrate1d(azimuth_range=sector)`` per sector against one pass, no split,
  with the tolerances of ``test_pyfai_agreement.py`` (intensity, sigma, std within 1e-5
  relative, counts equal, first and last bin left out).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from opencl_device import opencl_test_device
from synthetic import POLARIZATION, default_geometry, true_profile

from azfilter import binning
from azfilter.errors import AzfilterError
from azfilter.integrator import Integrator, Result

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NPT = 150
N_SECTORS = 6
PER_BIN = ("intensity", "sigma", "std", "count", "sum_signal", "sum_variance",
           "sum_normalization", "sum_normalization2")
#: (operation, split, options) run on each backend
OPERATIONS = [
    ("integrate", "no", {"error_model": "poisson"}),
    ("integrate", "no", {"error_model": "azimuthal"}),
    ("integrate", "full", {"error_model": "poisson"}),
    ("sigma_clip", "no", {"thres": 3.0, "max_iter": 5, "error_model": "azimuthal"}),
    ("medfilt", "no", {"percentile": (20, 80), "error_model": "poisson"}),
    ("medfilt", "full", {"percentile": 50, "error_model": "poisson"}),
]


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def texture():
    """A Pilatus 300K frame whose rings vary with χ (texture), with gaps, dead and hot pixels.

    Intensity ``I_true(q)·(1 + 0.7·cos(2χ − 1))`` times solid angle and polarization,
    Poisson-sampled; int32 with -1 in the gaps and -2 in dead pixels.
    """
    geometry = default_geometry("Pilatus300k")
    rng = np.random.default_rng(5)
    q = geometry.center_array("q")
    chi = geometry.center_array("chi")
    expected = true_profile(q) * (1.0 + 0.7 * np.cos(2.0 * chi - 1.0)) \
        * geometry.solid_angle() * geometry.polarization(POLARIZATION)
    raw = rng.poisson(expected).astype(np.int32)
    gaps = np.asarray(geometry.detector.mask, dtype=bool)
    raw[gaps] = -1
    flat = raw.reshape(-1)
    free = np.flatnonzero(~gaps.reshape(-1))
    chosen = rng.choice(free, 200, replace=False)
    flat[chosen[:100]] = -2                                        # dead
    flat[chosen[100:]] = rng.integers(50_000, 500_000, 100)       # hot
    return geometry, raw


def opencl_device() -> str | None:
    """The OpenCL device to test on (skips, or fails in CI, when there is none)."""
    return opencl_test_device()


def backend_options(backend: str) -> dict:
    if backend == "opencl":
        return {"backend": "opencl", "device": opencl_device()}
    return {"backend": backend}


def reduce(integ: Integrator, raw: np.ndarray, operation: str, split: str,
           options: dict) -> Result:
    return getattr(integ, operation)(raw, split=split, **options)


def assert_same(got: Result, ref: Result, rtol: float, what: str) -> None:
    """Every per-bin array equal (``rtol == 0``: bit for bit) or within ``rtol``."""
    np.testing.assert_array_equal(got.radial, ref.radial, err_msg=what)
    for name in PER_BIN:
        actual, expected = getattr(got, name), getattr(ref, name)
        assert actual.shape == expected.shape, (what, name)
        if rtol == 0:
            np.testing.assert_array_equal(actual, expected, err_msg=f"{what}: {name}")
        else:
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0, equal_nan=True,
                                       err_msg=f"{what}: {name}")


# ------------------------------------------------------------------------------ ranges
def test_equal_sectors_span_the_full_circle_by_default():
    bounds = binning.sector_ranges(4)
    assert bounds == ((-180.0, -90.0), (-90.0, 0.0), (0.0, 90.0), (90.0, 180.0))
    assert binning.sector_ranges(np.int64(1)) == ((-180.0, 180.0),)


def test_equal_sectors_of_an_azimuth_range_across_180():
    bounds = binning.sector_ranges(4, (150, -150))
    assert bounds == ((150.0, 165.0), (165.0, 180.0), (180.0, 195.0), (195.0, 210.0))
    # edges are shared exactly and the last sector ends where the span does
    bounds = binning.sector_ranges(7, (-33.3, 101.7))
    assert bounds[0][0] == -33.3 and bounds[-1][1] == 101.7
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


def test_explicit_ranges_read_as_azimuth_ranges():
    bounds = binning.sector_ranges([(170, -170), (-30, 10), [0, 45.5]])
    assert bounds == ((170.0, 190.0), (-30.0, 10.0), (0.0, 45.5))


@pytest.mark.parametrize("sectors, azimuth_range, message", [
    (0, None, "positive integer"),
    (-3, None, "positive integer"),
    (True, None, "positive integer"),
    (2.5, None, "positive integer"),
    ("4", None, "positive integer"),
    ([], None, "empty"),
    ([(0, 10, 20)], None, "two numbers"),
    ([("a", 10)], None, "two numbers"),
    ([(0, math.inf)], None, "finite"),
    ([(0, 10)], (0, 90), "not both"),
    (3, (0, math.nan), "finite"),
    ([(0, 400)], None, "wider than 360"),
    (4, (-180, 360), "wider than 360"),
])
def test_bad_sectors_are_one_line_errors(sectors, azimuth_range, message):
    with pytest.raises(AzfilterError, match=message) as caught:
        binning.sector_ranges(sectors, azimuth_range)
    assert "\n" not in str(caught.value)


def test_integrator_refuses_bad_sectors(texture):
    geometry, _ = texture
    with pytest.raises(AzfilterError, match="not both"):
        Integrator(geometry, npt=NPT, sectors=[(0, 10)], azimuth_range=(0, 90))
    with pytest.raises(AzfilterError, match="positive integer"):
        Integrator(geometry, npt=NPT, sectors=0)


# ------------------------------------------------------------------------------ one pass
@pytest.mark.parametrize("backend", ["python", "cython", "opencl"])
@pytest.mark.parametrize("operation, split, options", OPERATIONS,
                         ids=[f"{op}-{split}-{'-'.join(str(v) for v in opts.values())}"
                              for op, split, opts in OPERATIONS])
def test_one_pass_equals_one_integrator_per_sector(texture, backend, operation, split,
                                                   options):
    geometry, raw = texture
    common = dict(npt=NPT, polarization=POLARIZATION, **backend_options(backend))
    together = Integrator(geometry, sectors=N_SECTORS, **common)
    result = reduce(together, raw, operation, split, options)
    assert result.intensity.shape == (N_SECTORS, NPT) and result.radial.shape == (NPT,)
    rtol = 0.0 if backend == "python" else 1e-6
    for k, bounds in enumerate(together.sectors):
        if split == "no":
            alone = Integrator(geometry, azimuth_range=bounds, **common)
        else:  # full split cuts pixels at the sector's edges: a one-sector Integrator
            alone = Integrator(geometry, sectors=[bounds], **common)
        expected = reduce(alone, raw, operation, split, options)
        if split != "no":
            expected = expected.sector(0)
        assert_same(result.sector(k), expected, rtol, f"{backend} {operation} sector {k}")
    # the texture makes the sectors differ: ring intensities vary by tens of percent
    filled = np.all(np.isfinite(result.intensity), axis=0)
    assert filled.sum() > NPT // 2
    spread = np.nanmax(result.intensity[:, filled], axis=0) \
        / np.nanmin(result.intensity[:, filled], axis=0)
    assert np.median(spread) > 1.3


@pytest.mark.parametrize("operation, split, options", [OPERATIONS[0], OPERATIONS[3]],
                         ids=["integrate", "sigma_clip"])
def test_explicit_overlapping_ranges_across_180(texture, operation, split, options):
    """Overlapping explicit ranges (a pixel in two sectors counts in both) and ±180°."""
    geometry, raw = texture
    sectors = [(170, -170), (-30, 10), (0, 45), (-180, 180)]
    together = Integrator(geometry, npt=NPT, backend="python", sectors=sectors)
    result = reduce(together, raw, operation, split, options)
    assert result.intensity.shape == (4, NPT)
    np.testing.assert_array_equal(result.sectors, [[170, 190], [-30, 10], [0, 45],
                                                   [-180, 180]])
    np.testing.assert_array_equal(result.chi, [180, -10, 22.5, 0])
    for k, bounds in enumerate(sectors):
        alone = Integrator(geometry, npt=NPT, backend="python", azimuth_range=bounds)
        assert_same(result.sector(k), reduce(alone, raw, operation, split, options), 0.0,
                    f"sector {bounds}")
    # the overlap (0..10°) is in both sectors: their pixels are the union's plus the overlap's
    def pixels(azimuth_range):
        table = Integrator(geometry, npt=NPT, azimuth_range=azimuth_range).table("no")
        return table.nnz

    in_sectors = together.table("no").row_sums().reshape(4, NPT)[1:3].sum()
    assert in_sectors == pixels((-30, 45)) + pixels((0, 10)) > pixels((-30, 45))


def test_equal_sectors_of_a_span_across_180(texture):
    geometry, raw = texture
    together = Integrator(geometry, npt=NPT, backend="python", sectors=4,
                          azimuth_range=(150, -150))
    result = together.integrate(raw)
    np.testing.assert_array_equal(result.sectors, [[150, 165], [165, 180], [180, 195],
                                                   [195, 210]])
    for k, bounds in enumerate(result.sectors):
        alone = Integrator(geometry, npt=NPT, backend="python", azimuth_range=tuple(bounds))
        assert_same(result.sector(k), alone.integrate(raw), 0.0, f"sector {bounds}")
    # together they are exactly the span (no pixel centre lies on an inner edge here)
    span = Integrator(geometry, npt=NPT, backend="python", azimuth_range=(150, -150))
    assert np.array_equal(np.sort(together.table("no").indices),
                          np.sort(span.table("no").indices))
    whole = span.integrate(raw)
    np.testing.assert_allclose(result.sum_signal.sum(axis=0), whole.sum_signal, rtol=1e-12)
    np.testing.assert_array_equal(result.count.sum(axis=0), whole.count)


def test_nosplit_sectors_by_hand():
    """A pixel centre on a shared edge is in both sectors; a NaN χ is in none."""
    radial = np.array([[1.5, 2.5, 3.5, 0.5, 2.2, 9.9]])
    chi = np.array([[0.0, math.pi / 2, math.nan, -math.pi / 2, -0.1, 3.0]])
    mask = np.array([[0, 0, 0, 0, 0, 1]], dtype=bool)
    bands = binning.sectors_rad(binning.sector_ranges([(-90, 0), (0, 90)]))
    parts = binning.csr_nosplit_sectors(radial, chi, mask, 4, None, bands)
    assert parts.n_sectors == 2 and parts.npt == 4 and parts.indptr.size == 9
    rows = np.repeat(np.arange(8), np.diff(parts.indptr))
    assert sorted(zip(rows.tolist(), parts.indices.tolist(), strict=True)) == [
        (0, 3), (1, 0), (2, 4), (5, 0), (6, 1)]
    for k, band in enumerate(bands):
        alone = binning.csr_nosplit(radial, chi, mask, 4, None, band)
        assert (alone.lo, alone.hi) == (parts.lo, parts.hi)
        rows = slice(parts.indptr[4 * k], parts.indptr[4 * k + 4])
        np.testing.assert_array_equal(parts.indices[rows], alone.indices)
        np.testing.assert_array_equal(parts.indptr[4 * k:4 * k + 5] - rows.start, alone.indptr)


def test_every_pixel_in_one_sector_of_a_full_circle(texture):
    """Equal sectors of the full circle partition the pixels (no pixel centre on an edge)."""
    geometry, _ = texture
    plain = Integrator(geometry, npt=NPT, backend="python").table("no")
    table = Integrator(geometry, npt=NPT, backend="python", sectors=36).table("no")
    assert table.n_bins == 36 * NPT and table.npt == NPT and table.n_sectors == 36
    assert np.array_equal(np.sort(table.indices), np.sort(plain.indices))
    np.testing.assert_array_equal(table.row_sums().reshape(36, NPT).sum(axis=0),
                                  plain.row_sums())
    np.testing.assert_array_equal(table.radial, plain.radial)


def test_more_bins_than_16_bits(texture):
    """70 sectors x 1000 bins: row numbers past 65535 (the 16-bit radix sorts step aside)."""
    geometry, raw = texture
    python = Integrator(geometry, npt=1000, backend="python", sectors=70)
    cython = Integrator(geometry, npt=1000, backend="cython", sectors=70)
    assert python.table("no").n_bins == 70_000
    for operation in ("integrate", "medfilt"):
        ours = reduce(python, raw, operation, "no", {})
        assert_same(reduce(cython, raw, operation, "no", {}), ours, 1e-6, operation)
        for k in (3, 69):
            alone = Integrator(geometry, npt=1000, backend="python",
                               azimuth_range=python.sectors[k])
            assert_same(ours.sector(k), reduce(alone, raw, operation, "no", {}), 0.0,
                        f"{operation} sector {k}")


# ------------------------------------------------------------------------------ full split
def table_entries(table) -> dict[tuple[int, int], float]:
    """{(row, pixel): coefficient}."""
    rows = np.repeat(np.arange(table.n_bins), np.diff(table.indptr))
    return dict(zip(zip(rows.tolist(), table.indices.tolist(), strict=True),
                    table.coefs.astype(np.float64).tolist(), strict=True))


def test_full_split_sectors_add_up_to_the_plain_table(texture):
    geometry, _ = texture
    plain = Integrator(geometry, npt=NPT, backend="python").table("full")
    table = Integrator(geometry, npt=NPT, backend="python", sectors=12).table("full")
    rows = np.repeat(np.arange(table.n_bins), np.diff(table.indptr)) % NPT
    n_pixels = plain.size
    summed = np.bincount(rows * n_pixels + table.indices, table.coefs.astype(np.float64),
                         minlength=NPT * n_pixels)
    plain_rows = np.repeat(np.arange(NPT), np.diff(plain.indptr))
    expected = np.zeros_like(summed)
    expected[plain_rows * n_pixels + plain.indices] = plain.coefs
    np.testing.assert_allclose(summed, expected, rtol=0, atol=2e-6)
    assert table.nnz > plain.nnz  # pixels on the edges are cut


def test_full_split_pixels_inside_a_sector_keep_their_coefficients(texture):
    geometry, _ = texture
    plain = table_entries(Integrator(geometry, npt=NPT, backend="python").table("full"))
    table = Integrator(geometry, npt=NPT, backend="python", sectors=12).table("full")
    entries = table_entries(table)
    by_pixel: dict[int, list[tuple[int, float]]] = {}
    for (row, pixel), coef in entries.items():
        by_pixel.setdefault(pixel, []).append((row, coef))
    whole = [p for p, cells in by_pixel.items() if len({row // NPT for row, _ in cells}) == 1]
    assert len(whole) > 0.9 * len(by_pixel)
    for pixel in whole[::97]:
        for row, coef in by_pixel[pixel]:
            assert coef == plain[(row % NPT, pixel)]


def clip(polygon: list[tuple[float, float]], axis: int, bound: float,
         keep_below: bool) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: the part of ``polygon`` with coordinate ``axis`` <= (or >=) bound."""
    def inside(point):
        return point[axis] <= bound if keep_below else point[axis] >= bound

    out = []
    for k, current in enumerate(polygon):
        previous = polygon[k - 1]
        if inside(current) != inside(previous):
            u = (bound - previous[axis]) / (current[axis] - previous[axis])
            out.append((previous[0] + u * (current[0] - previous[0]),
                        previous[1] + u * (current[1] - previous[1])))
        if inside(current):
            out.append(current)
    return out


def area(polygon: list[tuple[float, float]]) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1)
                         in zip(polygon, polygon[1:] + polygon[:1], strict=True)))


def test_full_split_cut_pixels_have_exact_areas(texture):
    """Cut pixels against polygon clipping of the quadrilateral by strip, range and sector."""
    geometry, _ = texture
    # overlapping sectors, and one across ±180°
    integ = Integrator(geometry, npt=NPT, backend="python",
                       sectors=[(10, 55), (-100, 170), (170, -170)])
    table = integ.table("full")
    shape = table.shape
    radial = geometry.corner_grid("q", shape)
    chi = geometry.corner_grid("chi", shape)
    plain = table_entries(Integrator(geometry, npt=NPT, backend="python").table("full"))
    entries = table_entries(table)
    cut = sorted({pixel for (row, pixel), coef in entries.items()
                  if plain.get((row % NPT, pixel)) != coef})
    assert len(cut) > 100
    near_180 = [p for p in cut if abs(abs(chi.reshape(-1)[p // shape[1] * (shape[1] + 1)
                                                   + p % shape[1]]) - math.pi) < 0.01]
    assert near_180
    for pixel in cut[::max(1, len(cut) // 60)] + near_180[:10]:
        i, j = divmod(pixel, shape[1])
        corners = [(i, j), (i + 1, j), (i + 1, j + 1), (i, j + 1)]
        chi_a = chi[i, j]
        quad = []
        for a, b in corners:
            rel = (chi[a, b] - chi_a + math.pi) % (2 * math.pi) - math.pi
            quad.append(((radial[a, b] - table.lo) / table.delta, rel))
        in_range = clip(clip(quad, 0, 0.0, False), 0, float(NPT), True)
        total = area(in_range)
        for sector, (lo, hi) in enumerate(table.sectors):
            low = (math.radians(lo) - chi_a + math.pi) % (2 * math.pi) - math.pi
            width = math.radians(hi) - math.radians(lo)
            for b in range(NPT):
                strip = clip(clip(in_range, 0, float(b), False), 0, float(b + 1), True)
                if not strip:
                    continue
                expected = sum(area(clip(clip(strip, 1, c0, False), 1, c0 + width, True))
                               for c0 in (low, low - 2 * math.pi))
                got = entries.get((sector * NPT + b, pixel), 0.0)
                assert got == pytest.approx(expected / total, abs=2e-6), (pixel, sector, b)


@pytest.mark.parametrize("split", ["no", "full"])
def test_overlapping_sectors_tables_are_one_sector_tables_stacked(texture, split):
    geometry, _ = texture
    sectors = [(10, 55), (-100, 170), (170, -170), (-180, 180)]
    table = Integrator(geometry, npt=NPT, backend="python", sectors=sectors).table(split)
    for k, bounds in enumerate(sectors):
        alone = Integrator(geometry, npt=NPT, backend="python", sectors=[bounds]).table(split)
        rows = slice(table.indptr[k * NPT], table.indptr[(k + 1) * NPT])
        np.testing.assert_array_equal(table.indptr[k * NPT:(k + 1) * NPT + 1] - rows.start,
                                      alone.indptr)
        np.testing.assert_array_equal(table.indices[rows], alone.indices)
        np.testing.assert_array_equal(table.coefs[rows], alone.coefs)


def test_full_split_numpy_and_compiled_plain_tables_give_the_same_sectors(texture,
                                                                          monkeypatch):
    """The sector builder starts from the plain table: the same whichever builder made it."""
    geometry, _ = texture
    compiled = Integrator(geometry, npt=NPT, backend="python", sectors=5).table("full")
    monkeypatch.setattr(binning, "USE_COMPILED_FULLSPLIT", False)
    numpy_only = binning.build_csr(geometry, "q_nm^-1", NPT, "full",
                                   Integrator(geometry, npt=NPT).constants.static_mask,
                                   sectors=compiled.sectors, cache=False)
    for name in ("indptr", "indices", "coefs"):
        np.testing.assert_array_equal(getattr(numpy_only, name), getattr(compiled, name))


# ------------------------------------------------------------------------------ cache
def test_cache_tells_sectors_apart(texture, tmp_path, monkeypatch):
    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(tmp_path))
    geometry, _ = texture
    mask = Integrator(geometry, npt=NPT).constants.static_mask

    def build(**options):
        stats: dict = {}
        table = binning.build_csr(geometry, "q_nm^-1", NPT, "no", mask, stats=stats, **options)
        return table, stats

    plain, stats_plain = build()
    four, stats_four = build(sectors=binning.sector_ranges(4))
    again, stats_again = build(sectors=binning.sector_ranges(4))
    other, stats_other = build(sectors=binning.sector_ranges(4, (0, 90)))
    assert stats_four["cache"] == "miss" and stats_again["cache"] == "hit"
    assert stats_other["cache"] == "miss"
    assert len({stats_plain["path"], stats_four["path"], stats_other["path"]}) == 3
    for name in ("indptr", "indices", "coefs"):
        np.testing.assert_array_equal(getattr(again, name), getattr(four, name))
    assert again.sectors == four.sectors and again.n_bins == 4 * NPT
    # the key of a table without sectors is the one it always had
    key = binning.table_key(geometry.cache_key(), plain.shape, "q_nm^-1", NPT, "no", None,
                            None, binning.mask_digest(mask))
    assert stats_plain["path"].endswith(f"csr-{key}.npz")


# ------------------------------------------------------------------------------ Result API
def test_result_with_sectors(texture):
    geometry, raw = texture
    integ = Integrator(geometry, npt=NPT, backend="python", sectors=3)
    result = integ.sigma_clip(raw)
    assert result.n_sectors == 3 and result.npt == NPT
    for name in PER_BIN:
        assert getattr(result, name).shape == (3, NPT)
    np.testing.assert_array_equal(result.sectors, [[-180, -60], [-60, 60], [60, 180]])
    np.testing.assert_array_equal(result.chi, [-120, 0, 120])
    np.testing.assert_array_equal(integ.chi, result.chi)
    assert result.parameters["sectors"] == 3 and integ.config()["sectors"] == 3
    one = result.sector(-1)
    assert one.n_sectors is None and one.intensity.shape == (NPT,)
    np.testing.assert_array_equal(one.intensity, result.intensity[2])
    assert one.parameters["sector"] == 2 and one.parameters["sector_range"] == [60.0, 180.0]
    with pytest.raises(IndexError):
        result.sector(3)
    assert "sectors=3" in repr(result) and len(repr(result)) < 300
    radial, intensity, sigma = result
    assert intensity.shape == sigma.shape == (3, NPT) and radial.shape == (NPT,)
    with pytest.raises(AzfilterError, match=r"result.sector\(k\).save"):
        result.save("/nonexistent/x.dat")
    explicit = Integrator(geometry, npt=NPT, backend="python", sectors=[(0, 10), (20, -20)])
    assert explicit.config()["sectors"] == [[0.0, 10.0], [20.0, -20.0]]
    # the recorded configuration rebuilds the same Integrator
    rebuilt = Integrator(geometry, **{k: v for k, v in integ.config().items()
                                      if k in ("npt", "sectors", "azimuth_range")})
    assert rebuilt.sectors == integ.sectors


def test_without_sectors_nothing_changes(texture):
    geometry, raw = texture
    integ = Integrator(geometry, npt=NPT, backend="python")
    result = integ.integrate(raw)
    assert "sectors" not in integ.config() and "sectors" not in result.parameters
    assert result.sectors is None and result.n_sectors is None and result.chi is None
    assert result.intensity.shape == (NPT,) and integ.table("no").sectors is None
    with pytest.raises(ValueError, match="no sectors"):
        result.sector(0)


def test_process_many_gives_sector_results(texture):
    geometry, raw = texture
    integ = Integrator(geometry, npt=NPT, backend="cython", sectors=4)
    frames = [("a", raw), ("b", raw[:10]), ("c", raw[::-1].copy())]
    out = list(integ.process_many(frames, "medfilt", percentile=(10, 90), split="no"))
    assert [tag for tag, _ in out] == ["a", "b", "c"]
    assert isinstance(out[1][1], AzfilterError)
    for (_, result), frame in ((out[0], raw), (out[2], frames[2][1])):
        assert result.intensity.shape == (4, NPT)
        assert_same(result, integ.medfilt(frame, percentile=(10, 90), split="no"), 0.0,
                    "process_many")


# ------------------------------------------------------------------------------ pyFAI
def test_against_pyfai_one_call_per_sector(texture):
    pyFAI = pytest.importorskip("pyFAI")
    import logging

    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    logging.getLogger("pyFAI").setLevel(logging.ERROR)
    assert pyFAI.version
    geometry, raw = texture
    radial_range = (2.0, 30.0)
    integ = Integrator(geometry, npt=NPT, backend="cython", polarization=POLARIZATION,
                       radial_range=radial_range, sectors=N_SECTORS)
    result = integ.integrate(raw, "poisson")
    ai = AzimuthalIntegrator(dist=geometry.dist, poni1=geometry.poni1, poni2=geometry.poni2,
                             rot1=geometry.rot1, rot2=geometry.rot2, rot3=geometry.rot3,
                             wavelength=geometry.wavelength,
                             detector=detector_factory(geometry.detector.name))
    mask = integ.constants.static_mask.reshape(raw.shape) \
        | geometry.detector.invalid_pixels(raw)
    inner = slice(1, -1)
    for k, (lo, hi) in enumerate(result.sectors):
        ref = ai.integrate1d(raw, NPT, unit="q_nm^-1", radial_range=radial_range, mask=mask,
                             azimuth_range=(lo, hi), method=("no", "csr", "cython"),
                             error_model="poisson", polarization_factor=POLARIZATION,
                             correctSolidAngle=True)
        ours = result.sector(k)
        np.testing.assert_allclose(ours.radial, ref.radial, rtol=1e-12)
        filled = ours.count[inner] > 0
        assert filled.sum() > 0.9 * (NPT - 2)
        np.testing.assert_array_equal(ours.count[inner], ref.count[inner])
        for name in ("intensity", "sigma", "std"):
            theirs = getattr(ref, name)[inner][filled]
            mine = getattr(ours, name)[inner][filled]
            assert np.max(np.abs(mine - theirs) / np.abs(theirs)) < 1e-5, (k, name)
