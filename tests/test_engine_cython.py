"""CythonEngine (kernels/_engine.pyx): what the engine contract does not already check.

The contract's case and checks (agreement with the numpy reference to 1e-6, counts exactly)
on the raw dtypes only this engine reads or converts itself, then the engine's own behaviour:
dummy ranges of integer frames, long medfilt rows (the radix-partition path), threads, row
order, conversions, argument checks of the compiled functions, and the compiled table builders
against the numpy ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_contract import (
    DELTA_DUMMY,
    DUMMY,
    FIELDS,
    NPT,
    OPERATION_CASES,
    SHAPE,
    Case,
    check_agreement,
    check_process_many,
    dummy_for,
    frame,
    make_case,
)
from engine_contract import assert_sums_close as contract_assert_close
from synthetic import Table

from azfilter.backends import BinSums, get_engine_class
from azfilter.backends.python import PythonEngine
from azfilter.detectors import generic_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry

_engine = pytest.importorskip("azfilter._engine", reason="compiled extension not built")
_tables = pytest.importorskip("azfilter._tables", reason="compiled extension not built")
from azfilter.backends.cython import CythonEngine  # noqa: E402

DTYPES = ("uint8", "int16", "int8", "int64", ">u2")   # beyond the contract's five
SPLITS = ("no", "full")


@pytest.fixture(scope="module")
def case() -> Case:
    return make_case()


def assert_sums_close(got: BinSums, expected: BinSums, exact_count: bool = False) -> None:
    contract_assert_close(got, expected, 1e-6, "cython vs python", exact_count=exact_count)


def engines(case: Case, split: str, dark: bool, dummy: float | None, delta: float, **kw):
    table = case.tables[split]
    dark_array = case.dark if dark else None
    return (CythonEngine(table, case.pixel_norm, dark_array, dummy, delta, **kw),
            PythonEngine(table, case.pixel_norm, dark_array, dummy, delta))


# ----------------------------------------------------------------------------- agreement
# The contract (tests/test_engine_contract.py) checks uint16, uint32, int32, float32 and
# float64; the kernels also read uint8 and int16 directly and convert the others on the host.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("operation", list(OPERATION_CASES))
def test_other_dtypes_agree(case, operation, split, dtype):
    def cython(table, pixel_norm, dark, dummy, delta_dummy):
        return CythonEngine(table, pixel_norm, dark, dummy, delta_dummy)
    check_agreement(cython, case, operation, split, dtype)


def test_sigma_clip_rejects_spots(case):
    """Not only agreement: clipping must actually remove the strong pixels."""
    raw = frame(case, "int32")
    cy, _ = engines(case, "no", False, DUMMY, DELTA_DUMMY)
    plain = cy.integrate(raw, "poisson")
    clipped = cy.sigma_clip(raw, 3.0, 5, "azimuthal")
    assert clipped.count.sum() < plain.count.sum()
    assert np.all(clipped.count <= plain.count)


@pytest.mark.parametrize("dummy, delta", [(-2.0, 1.5), (0.0, 0.0), (2.5, 0.4), (2.5, 0.5),
                                          (3.0, 1e-9), (-1e30, 1e31), (7.25, 2.0)])
@pytest.mark.parametrize("dtype", ["int16", "uint16", "int32", "float32"])
def test_dummy_values_as_the_float_test(case, dummy, delta, dtype):
    """Integer frames test dummies as an integer range: same pixels as |raw - dummy| <= delta."""
    rng = np.random.default_rng(11)
    raw = rng.integers(-4, 12, SHAPE).astype(dtype)
    if raw.dtype.kind == "f":
        raw += rng.choice([0.0, 0.25, 0.5], SHAPE).astype(dtype)
    cy, py = engines(case, "no", False, dummy, delta)
    got, expected = cy.integrate(raw, "poisson"), py.integrate(raw, "poisson")
    assert_sums_close(got, expected)
    np.testing.assert_array_equal(got.count, expected.count)


# ------------------------------------------------------------ sigma_clip, kernel paths
def clip_rows(rng, lengths, hot: float):
    """A table of bins of the given lengths (pixels in order), a uint32 frame of Poisson
    counts with a few outliers per bin (``hot`` counts, and some at 30-60 sigma), norms."""
    indptr = np.cumsum([0, *lengths]).astype(np.int64)
    n = int(indptr[-1])
    raw = rng.poisson(200.0, n).astype(np.uint32)
    outliers = rng.choice(n, max(1, n // 150), replace=False)
    raw[outliers[::2]] = np.uint32(hot)
    raw[outliers[1::2]] += rng.integers(400, 900, outliers[1::2].size).astype(np.uint32)
    norm = rng.uniform(0.6, 1.0, n).astype(np.float32)
    return indptr, np.arange(n, dtype=np.int32), raw, norm


@pytest.mark.parametrize("hot", [3000.0, 4.0e9])
@pytest.mark.parametrize("model", ["azimuthal", "hybrid", "poisson"])
def test_sigma_clip_paths_agree(model, hot):
    """The sweep for tables without coefficients (two entries at a time, kernels/
    azf_clip_sweep.h) and the generic sweep (explicit unit coefficients) give the same sums
    and statistics bit for bit; both equal the reference. Rows of odd and even lengths, empty
    and single-entry rows; ``hot`` 4e9 moves the mean so far that the variance after the drop
    comes from the exact second pass, 3000 from the sums around the tested mean."""
    rng = np.random.default_rng(5)
    lengths = [0, 1, 2, 3, 7, 8, 64, 65, 301, 1000, 1001, 4097]
    indptr, indices, raw, norm = clip_rows(rng, lengths, hot)
    results = []
    for coefs in (None, np.ones(indices.size, np.float32)):
        stats = np.empty((4, len(lengths)))
        # split_margin -1: full sweeps at every pass (the candidate passes, which add the
        # sums in another order, are checked in test_sigma_clip_candidate_passes_agree)
        sums = _engine.sigma_clip(raw, indptr, indices, coefs, norm, None, None, None, 0.0,
                                  model, 3.0, 5, 1, None, 2.0, stats, split_margin=-1.0)
        results.append((sums, stats))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    reference = PythonEngine(Table(indptr, indices, np.ones(indices.size, np.float32)), norm,
                             None, None, 0.0).sigma_clip(raw, 3.0, 5, model, pick=2.0)
    got = BinSums(*results[0][0])
    contract_assert_close(got, reference, 1e-12, f"sigma_clip {model}", exact_count=True)
    stats = results[0][1]
    np.testing.assert_array_equal(stats[0], reference.outliers.available)
    np.testing.assert_array_equal(stats[1], reference.outliers.picked)
    np.testing.assert_allclose(stats[2], reference.outliers.rejected_sum, rtol=1e-12)
    np.testing.assert_allclose(stats[3], reference.outliers.max_sigma, rtol=1e-12)
    clipped = results[0][0][4] < np.diff(indptr)
    assert clipped.sum() >= 5   # the outliers were dropped: the sweeps did run


def clip_frame_with_dead_bins(rng):
    """clip_rows with bins of every length, hot pixels, moderate outliers and dead bins (every
    entry of norm 0, or every pixel the dummy value 0), as a uint32 frame."""
    lengths = [0, 1, 2, 3, 5, 64, 65, 301, 1000, 1001, 2500, 4097, 300, 300]
    indptr, indices, raw, norm = clip_rows(rng, lengths, 4.0e9)
    raw[rng.choice(raw.size, raw.size // 40, replace=False)] = 0   # scattered dummies
    # a second population in some bins (a ring edge): wide, skewed rows, many passes
    skewed = rng.choice(raw.size, raw.size // 5, replace=False)
    raw[skewed] += rng.integers(20, 120, skewed.size).astype(np.uint32)
    norm[indptr[-3]:indptr[-2]] = 0.0   # a dead bin: no valid entry
    raw[indptr[-2]:indptr[-1]] = 0      # a dead bin: every pixel a dummy
    return indptr, indices, raw, norm


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("margin", [0.0, 1e-9, 0.2, 0.5, 0.9, 1.0, 3.0, np.inf])
def test_sigma_clip_candidate_passes_agree(margin, threads):
    """Later passes over the candidates alone (``split_margin``) keep exactly the entries the
    full sweeps keep: same counts and outlier statistics counts, sums equal up to the order of
    the additions. Margin 0 and 1e-9 make almost every entry a candidate (passes over the
    candidates only, whatever the limit does), 1, 3 and inf none (the x range of the near
    entries never proves anything: every pass falls back to a full sweep), 0.2-0.9 mix both;
    rows with hot pixels (the exact second pass for V), dead bins and several passes."""
    rng = np.random.default_rng(17)
    indptr, indices, raw, norm = clip_frame_with_dead_bins(rng)
    npt = indptr.size - 1
    outputs = {}
    for split_margin in (-1.0, margin):
        for thres, max_iter in ((3.0, 5), (2.0, 9), (1.0, 20)):
            stats = np.empty((4, npt))
            sums = _engine.sigma_clip(raw, indptr, indices, None, norm, None, None, 0.0, 0.0,
                                      "azimuthal", thres, max_iter, threads, None, 2.0, stats,
                                      split_margin=split_margin)
            outputs[split_margin, thres] = (sums, stats)
    for thres in (3.0, 2.0, 1.0):
        full_sums, full_stats = outputs[-1.0, thres]
        sums, stats = outputs[margin, thres]
        np.testing.assert_array_equal(sums[4], full_sums[4])      # kept counts
        np.testing.assert_array_equal(stats[:2], full_stats[:2])  # available, picked
        np.testing.assert_allclose(sums, full_sums, rtol=1e-12, atol=0.0)
        np.testing.assert_allclose(stats[2:], full_stats[2:], rtol=1e-12, atol=0.0)
        assert (full_sums[4] < np.diff(indptr)).sum() >= 8   # rows were clipped
        assert full_sums[4][-2:].tolist() == [0.0, 0.0]      # the dead bins
    # several passes ran: the thresholds keep fewer and fewer entries
    assert outputs[-1.0, 1.0][0][4].sum() < outputs[-1.0, 2.0][0][4].sum() \
        < outputs[-1.0, 3.0][0][4].sum()


def test_sigma_clip_converged_rows_keep_their_sums():
    """A row with nothing to drop (known from its x range, no sweep) reports its unclipped
    sums: sigma_clip with max_iter 5 equals max_iter 0 on a frame without outliers."""
    indptr = np.array([0, 500, 1501], dtype=np.int64)
    indices = np.arange(1501, dtype=np.int32)
    raw = np.full(1501, 100, np.uint32)
    raw[::3] = 101   # x within 1.5 sigma of the mean
    norm = np.full(1501, 0.75, np.float32)
    args = (raw, indptr, indices, None, norm, None, None, None, 0.0, "azimuthal", 3.0)
    np.testing.assert_array_equal(_engine.sigma_clip(*args, 5, 1),
                                  _engine.sigma_clip(*args, 0, 1))
    np.testing.assert_array_equal(_engine.sigma_clip(*args, 5, 1)[4], [500, 1001])


# ------------------------------------------------------------------- medfilt, long rows
def big_row_engines(rng, n: int, unit_norm: bool, split: bool):
    """One bin holding everything and a second, smaller one: long rows, many ties."""
    indptr = np.array([0, n // 3, n], dtype=np.int64)
    table = Table(indptr, np.arange(n, dtype=np.int32),
                  rng.uniform(0.0, 1.0, n).astype(np.float32) if split
                  else np.ones(n, dtype=np.float32))
    if split:
        table.coefs[::97] = 0.0   # fragments of weight 0 are never selected
    norm = np.ones(n, np.float32) if unit_norm else rng.uniform(0.5, 1, n).astype(np.float32)
    return (CythonEngine(table, norm, None, DUMMY, DELTA_DUMMY),
            PythonEngine(table, norm, None, DUMMY, DELTA_DUMMY))


@pytest.mark.parametrize("n, top", [(5000, 3), (20000, 40), (3000, 100_000)])
@pytest.mark.parametrize("unit_norm", [True, False])
@pytest.mark.parametrize("split", [False, True])
def test_medfilt_long_rows_and_ties(n, top, unit_norm, split):
    """Long rows take the radix-partition path; small integers make many exact ties."""
    rng = np.random.default_rng(n + top)
    raw = rng.integers(0, top, n).astype(np.int32)
    raw[rng.random(n) < 0.01] = -2
    cy, py = big_row_engines(rng, n, unit_norm, split)
    for low, high in ((0.4, 0.6), (0.5, 0.5), (0.0, 1.0), (0.1, 0.9), (0.0, 0.0),
                      (1.0, 1.0), (0.25, 0.75)):
        for model in ("poisson", "azimuthal"):
            assert_sums_close(cy.medfilt(raw, low, high, model),
                              py.medfilt(raw, low, high, model), exact_count=True)


def test_medfilt_median_of_odd_row_is_the_middle_value():
    """A hand-checkable case: 5 pixels of weight 1, median = the 3rd smallest value."""
    table = Table(np.array([0, 5], np.int64), np.arange(5, dtype=np.int32),
                  np.ones(5, np.float32))
    cy = CythonEngine(table, np.ones(5, np.float32), None, None, 0.0)
    sums = cy.medfilt(np.array([9.0, 1.0, 7.0, 3.0, 5.0]), 0.5, 0.5, "poisson")
    assert sums.count[0] == 1 and sums.signal[0] == 5.0 and sums.normalization[0] == 1.0


# ----------------------------------------------------------------------------- behaviour
def test_threads_do_not_change_results(case):
    raw = frame(case, "int32")
    one, _ = engines(case, "full", True, DUMMY, DELTA_DUMMY, threads=1)
    three, _ = engines(case, "full", True, DUMMY, DELTA_DUMMY, threads=3)
    assert one.threads == 1 and three.threads == 3
    for call in (lambda e: e.integrate(raw, "azimuthal"),
                 lambda e: e.sigma_clip(raw, 3.0, 5, "hybrid"),
                 lambda e: e.medfilt(raw, 0.25, 0.75, "poisson")):
        a, b = call(one), call(three)
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("threads, lanes", [(2, 2), (4, 3), (3, 1)])
def test_process_many_in_lanes_keeps_the_contract(case, threads, lanes):
    """Several frames at once: input order, per-frame errors, results bit-identical to the
    single-frame calls on all threads, an abandoned stream (the contract's checks)."""
    def factory(table, pixel_norm, dark, dummy, delta_dummy):
        return CythonEngine(table, pixel_norm, dark, dummy, delta_dummy, threads=threads,
                            lanes=lanes)
    engine = factory(case.tables["no"], case.pixel_norm, None, None, 0.0)
    assert engine.lanes == lanes
    check_process_many(factory, case)


def test_process_many_in_lanes_holds_a_bounded_number_of_frames(case):
    """However long the stream, at most 2 × lanes frames are taken and not yet returned."""
    engine = CythonEngine(case.tables["full"], case.pixel_norm, None, None, 0.0, threads=3,
                          lanes=3)
    raw = frame(case, "int32")
    expected = engine.medfilt(raw, 0.3, 0.7, "poisson")
    taken = [0]

    def frames():
        for index in range(40):
            taken[0] += 1
            yield index, raw + (index % 2)

    returned = 0
    for tag, sums in engine.process_many(frames(), "medfilt",
                                         {"quant_min": 0.3, "quant_max": 0.7,
                                          "error_model": "poisson"}):
        assert tag == returned
        returned += 1
        assert taken[0] - returned < 2 * engine.lanes
        if tag % 2 == 0:
            np.testing.assert_array_equal(sums.signal, expected.signal)
    assert returned == 40


def test_default_lanes(monkeypatch):
    from azfilter.backends.cython import LANES_VARIABLE, THREADS_PER_LANE, default_lanes

    monkeypatch.delenv(LANES_VARIABLE, raising=False)
    assert default_lanes(1) == 1
    # fewer threads than a lane's share: one frame per thread (2 cores: two frames at once)
    assert default_lanes(2) == 2 and default_lanes(THREADS_PER_LANE - 1) == THREADS_PER_LANE - 1
    assert default_lanes(THREADS_PER_LANE) == 1 and default_lanes(4 * THREADS_PER_LANE) == 4
    assert default_lanes(16, {LANES_VARIABLE: "8"}) == 8
    assert default_lanes(2, {LANES_VARIABLE: "8"}) == 2      # at least one thread per lane
    for bad in ("0", "two", "-1"):
        with pytest.raises(AzfilterError, match=LANES_VARIABLE):
            default_lanes(4, {LANES_VARIABLE: bad})
    with pytest.raises(AzfilterError, match="lanes"):
        CythonEngine(Table(np.array([0, 1]), np.array([0], np.int32), np.ones(1, np.float32)),
                     np.ones(1, np.float32), None, None, 0.0, lanes=0)


def test_workspace_argument_of_the_kernels(case):
    """A reused workspace gives the same sums as a fresh one; one too small is replaced."""
    engine = CythonEngine(case.tables["full"], case.pixel_norm, case.dark, None, 0.0,
                          threads=2)
    raw = frame(case, "float32").ravel()
    table = engine._table()
    longest = int(np.diff(table[0]).max())
    size = _engine.workspace_doubles(longest, 2)
    fresh = _engine.medfilt(raw, *table, None, None, 0.0, "azimuthal", 0.2, 0.8, 2)
    for work in (np.full(size, np.nan), np.zeros(3), None):
        again = _engine.medfilt(raw, *table, None, None, 0.0, "azimuthal", 0.2, 0.8, 2, work)
        np.testing.assert_array_equal(again, fresh)
        clipped = _engine.sigma_clip(raw, *table, None, None, 0.0, "hybrid", 2.0, 4, 2, work)
        np.testing.assert_array_equal(
            clipped, _engine.sigma_clip(raw, *table, None, None, 0.0, "hybrid", 2.0, 4, 2))


def test_default_threads_is_openmp_default(case):
    cy, _ = engines(case, "no", False, None, 0.0)
    assert cy.threads == _engine.default_threads() >= 1


def test_unsorted_rows_are_sorted_by_pixel(case):
    """medfilt breaks ties by pixel index even if a table lists a row out of order."""
    rng = np.random.default_rng(3)
    table = case.tables["full"]
    order = np.arange(table.indices.size)
    for k in range(NPT):
        lo, hi = table.indptr[k], table.indptr[k + 1]
        order[lo:hi] = rng.permutation(order[lo:hi])
    shuffled = Table(table.indptr, table.indices[order], table.coefs[order])
    raw = np.round(frame(case, "float32") / 20)  # coarse values: many ties
    a = CythonEngine(shuffled, case.pixel_norm, None, DUMMY, DELTA_DUMMY)
    b = CythonEngine(table, case.pixel_norm, None, DUMMY, DELTA_DUMMY)
    for name in FIELDS:
        np.testing.assert_allclose(getattr(a.medfilt(raw, 0.3, 0.7, "poisson"), name),
                                   getattr(b.medfilt(raw, 0.3, 0.7, "poisson"), name),
                                   rtol=1e-12)


@pytest.mark.parametrize("dtype", ["bool", "float16", "uint64", ">f8", "<i4"])
def test_other_dtypes_are_converted(case, dtype):
    raw = frame(case, "float64")
    raw = np.where(np.isnan(raw), 0, np.abs(raw)).astype(dtype)
    cy, py = engines(case, "no", False, None, 0.0)
    assert_sums_close(cy.integrate(raw, "poisson"), py.integrate(raw, "poisson"))


def test_non_contiguous_frame(case):
    raw = np.asfortranarray(frame(case, "uint16"))
    cy, py = engines(case, "full", False, *dummy_for("uint16"))
    assert_sums_close(cy.medfilt(raw, 0.4, 0.6, "poisson"), py.medfilt(raw, 0.4, 0.6, "poisson"))


def test_get_engine_class():
    assert get_engine_class("cython") is CythonEngine


def test_user_errors(case):
    cy, _ = engines(case, "no", False, None, 0.0)
    raw = frame(case, "int32")
    with pytest.raises(AzfilterError, match="pixels"):
        cy.integrate(raw[:-1], "poisson")
    with pytest.raises(AzfilterError, match="variance"):
        cy.integrate(raw, "variance")
    with pytest.raises(AzfilterError, match="variance has"):
        cy.integrate(raw, "variance", np.ones(5))
    with pytest.raises(AzfilterError, match="error model"):
        cy.integrate(raw, "gaussian")
    with pytest.raises(AzfilterError, match="quantiles"):
        cy.medfilt(raw, 0.6, 0.4, "poisson")
    with pytest.raises(AzfilterError, match="max_iter"):
        cy.sigma_clip(raw, 3.0, -1, "azimuthal")
    with pytest.raises(AzfilterError, match="dtype"):
        cy.integrate(raw.astype(complex), "poisson")
    table = case.tables["no"]
    with pytest.raises(AzfilterError, match="threads"):
        CythonEngine(table, case.pixel_norm, None, None, 0.0, threads=0)
    with pytest.raises(AzfilterError, match="outside the detector"):
        CythonEngine(table, case.pixel_norm[:100], None, None, 0.0)


def test_kernel_argument_checks(case):
    """The compiled functions check shapes themselves (they are public to the package)."""
    table = case.tables["no"]
    norm = case.pixel_norm[table.indices]
    raw = frame(case, "int32").ravel()
    with pytest.raises(ValueError):
        _engine.integrate(raw, table.indptr, table.indices, None, norm[:-1], None, None,
                          None, 0.0, "poisson", 1)
    with pytest.raises(ValueError):
        _engine.integrate(raw, table.indptr, table.indices, None, norm, None, None, None, 0.0,
                          "variance", 1)
    with pytest.raises(ValueError):
        _engine.medfilt(raw, table.indptr, table.indices, None, norm, None, None, None, 0.0,
                        "poisson", 0.7, 0.2, 1)


# ------------------------------------------------------------------- full-split table builder
def reference_fullsplit(radial_grid, chi_grid, mask, npt, radial_range=None, azimuth=None,
                        radial_center=None, chi_center=None, monkeypatch=None):
    """binning.csr_fullsplit's numpy implementation, and the pixels it bins."""
    import azfilter.binning as binning

    if monkeypatch is not None and hasattr(binning, "USE_COMPILED_FULLSPLIT"):
        monkeypatch.setattr(binning, "USE_COMPILED_FULLSPLIT", False)
    azimuth_rad = binning.normalize_azimuth_range(azimuth) if azimuth else None
    parts = binning.csr_fullsplit(radial_grid, chi_grid, mask, npt, radial_range, azimuth_rad,
                                  radial_center=radial_center, chi_center=chi_center)
    finite = np.isfinite(radial_grid) & np.isfinite(chi_grid)
    usable = ~mask & finite[:-1, :-1] & finite[1:, :-1] & finite[1:, 1:] & finite[:-1, 1:]
    if azimuth_rad is not None:
        usable &= binning.in_azimuth_range(chi_center, azimuth_rad)
    return parts, usable


@pytest.mark.parametrize("config", [
    dict(unit="q", npt=60),
    dict(unit="q", npt=700),                                    # many bins per pixel
    dict(unit="2th", npt=40, radial_range=(0.05, 0.2)),         # pixels cut by the range
    dict(unit="2th", npt=50, azimuth=(150.0, -160.0)),          # wedge across ±180°
    dict(unit="r", npt=30, tilt=True),
])
def test_fullsplit_table_matches_numpy_builder(config, monkeypatch):
    import azfilter.binning as binning

    tilt = dict(rot1=0.3, rot2=-0.2, rot3=0.1) if config.get("tilt") else {}
    # the beam inside the detector: pixels around it straddle the χ = ±π cut
    geometry = Geometry(dist=0.05, poni1=0.006, poni2=0.008, wavelength=1e-10,
                        detector=generic_detector(172e-6, 172e-6, SHAPE), **tilt)
    unit = config["unit"]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[30:34] = True
    radial_grid, chi_grid = geometry.corner_grid(unit), geometry.corner_grid("chi")
    radial_center, chi_center = geometry.center_array(unit), geometry.center_array("chi")
    parts, usable = reference_fullsplit(radial_grid, chi_grid, mask, config["npt"],
                                        config.get("radial_range"), config.get("azimuth"),
                                        radial_center, chi_center, monkeypatch)
    delta = (parts.hi - parts.lo) / parts.npt
    for threads in (1, 3):
        indptr, indices, coefs = _tables.fullsplit_table(
            radial_grid, chi_grid, usable, radial_center, parts.lo, delta, parts.npt,
            binning._DEGENERATE_AREA, threads)
        np.testing.assert_array_equal(indptr, parts.indptr)
        np.testing.assert_array_equal(indices, parts.indices)
        np.testing.assert_allclose(coefs, parts.coefs, rtol=1e-6, atol=1e-7)
        assert indices.dtype == np.int32 and coefs.dtype == np.float32


def test_fullsplit_table_degenerate_and_non_finite_pixels(monkeypatch):
    """Zero-area pixels go whole to their centre's bin; pixels with a NaN corner are left out."""
    import azfilter.binning as binning

    n1, n2 = 12, 15
    rows, cols = np.mgrid[0:n1 + 1, 0:n2 + 1].astype(np.float64)
    radial_grid = 0.8 * rows + 0.37 * cols
    chi_grid = 0.01 * cols
    chi_grid[:, 4] = chi_grid[:, 3]     # column 3: all corners at one χ, zero area
    radial_grid[7, 9] = np.nan          # the 4 pixels around this corner cannot be placed
    mask = np.zeros((n1, n2), dtype=bool)
    parts, usable = reference_fullsplit(radial_grid, chi_grid, mask, 25,
                                        radial_range=(1.0, 14.0), monkeypatch=monkeypatch)
    assert not usable[7, 9] and not usable[6, 8]
    delta = (parts.hi - parts.lo) / parts.npt
    indptr, indices, coefs = _tables.fullsplit_table(radial_grid, chi_grid, usable, None,
                                                     parts.lo, delta, parts.npt,
                                                     binning._DEGENERATE_AREA, 2)
    np.testing.assert_array_equal(indptr, parts.indptr)
    np.testing.assert_array_equal(indices, parts.indices)
    np.testing.assert_allclose(coefs, parts.coefs, rtol=1e-6, atol=1e-7)
    degenerate = np.isin(indices, np.arange(n1) * n2 + 3)
    assert degenerate.any() and np.all(coefs[degenerate] == 1.0)
    assert not np.isin(indices, [6 * n2 + 8, 7 * n2 + 9]).any()
    # every placed pixel keeps its full weight inside the range
    per_pixel = np.bincount(indices, weights=coefs, minlength=n1 * n2)
    inside = per_pixel > 0
    np.testing.assert_allclose(per_pixel[inside], 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- real data
@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS)
def test_real_pilatus_frame_agrees(testdata, split):
    """A real Pilatus 1M frame (int32, gaps at -1) through the Integrator's tables."""
    import fabio

    import azfilter as az

    raw = fabio.open(str(testdata / "dioptas_CeO2_Pilatus1M" / "CeO2_Pilatus1M.tif")).data
    geometry = az.load_poni(testdata / "dioptas_CeO2_Pilatus1M"
                            / "CeO2_Pilatus1M_pyFAI_orientation2.poni")
    integ = az.Integrator(geometry, npt=1000, unit="2th_deg", backend="cython",
                          polarization=0.99)
    result = integ.integrate(raw, split=split)  # the image gives a generic detector its shape
    assert np.isfinite(result.intensity).sum() > 900
    cy = integ.engine(split, raw.dtype)
    assert isinstance(cy, CythonEngine)
    dummy, delta = integ.geometry.detector.dummy_for(raw.dtype)
    py = PythonEngine(integ.table(split), integ.constants.pixel_norm, integ.constants.dark,
                      dummy, delta)
    assert_sums_close(cy.integrate(raw, "poisson"), py.integrate(raw, "poisson"))
    assert_sums_close(cy.integrate(raw, "azimuthal"), py.integrate(raw, "azimuthal"))
    assert_sums_close(cy.medfilt(raw, 0.4, 0.6, "azimuthal"),
                      py.medfilt(raw, 0.4, 0.6, "azimuthal"), exact_count=True)
    if split == "no":
        assert_sums_close(cy.sigma_clip(raw, 5.0, 5, "azimuthal"),
                          py.sigma_clip(raw, 5.0, 5, "azimuthal"), exact_count=True)


@pytest.mark.parametrize("config", [
    dict(unit="q", npt=60),
    dict(unit="q", npt=3000),                                   # more bins than pixel rows
    dict(unit="2th", npt=40, radial_range=(0.05, 0.2)),         # pixels outside the range
    dict(unit="2th", npt=50, azimuth=(150.0, -160.0)),          # wedge across ±180°
    dict(unit="r", npt=30, tilt=True),
])
def test_nosplit_table_matches_numpy_builder(config, monkeypatch):
    """The compiled counting-sort builder gives the numpy builder's table exactly."""
    import azfilter.binning as binning

    tilt = dict(rot1=0.3, rot2=-0.2, rot3=0.1) if config.get("tilt") else {}
    geometry = Geometry(dist=0.05, poni1=0.006, poni2=0.008, wavelength=1e-10,
                        detector=generic_detector(172e-6, 172e-6, SHAPE), **tilt)
    radial = geometry.center_array(config["unit"])
    chi = geometry.center_array("chi")
    mask = np.zeros(SHAPE, bool)
    mask[::5, ::3] = True
    radial = radial.copy()
    radial[3, 4] = np.nan                                       # a pixel with no position
    azimuth = config.get("azimuth")
    azimuth_rad = binning.normalize_azimuth_range(azimuth) if azimuth else None
    args = (radial, chi, mask, config["npt"], config.get("radial_range"), azimuth_rad)
    assert binning._compiled_nosplit() is not None
    compiled = binning.csr_nosplit(*args)
    monkeypatch.setattr(binning, "USE_COMPILED_NOSPLIT", False)
    reference = binning.csr_nosplit(*args)
    assert (compiled.lo, compiled.hi) == (reference.lo, reference.hi)
    np.testing.assert_array_equal(compiled.indptr, reference.indptr)
    np.testing.assert_array_equal(compiled.indices, reference.indices)
    np.testing.assert_array_equal(compiled.coefs, reference.coefs)
    assert compiled.indices.dtype == np.int32 and compiled.indptr.dtype == np.int64
