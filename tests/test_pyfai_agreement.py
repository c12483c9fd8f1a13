"""azfilter against pyFAI 2026.9 on the same frames, geometry, bins and mask.

Every comparison uses an explicit radial range on both sides and ignores the first and the last
bin (pyFAI piles pixels from below a user range into bin 0, docs/internals.md). pyFAI gets the
full mask explicitly: detector gaps | dummy pixels (-1/-2) | user mask, since its sigma_clip
and medfilt do not apply the detector's dummy value.

What is checked, and where azfilter knowingly differs (design.md §6):

- integrate, no split, Poisson: intensity, sigma and std within 1e-5 relative in every
  non-empty bin, counts equal.
- integrate, azimuthal model: pyFAI accumulates a single-pass variance in pixel order, azfilter
  the exact two-pass sum. Intensity within 1e-5; sigma and std within 1 % in 99 % of the bins
  (the rest within 5 %); and a numpy replay of pyFAI's single-pass update on the same pixels
  gives pyFAI's variance to 1e-5, so the formula is the whole difference.
- integrate, full split: our engine on pyFAI's own lookup table agrees to 1e-5 in every bin;
  with our table, the intensity agrees to 1e-5 plus the effect of pyFAI's float32
  splitting coefficients on the bin's strong pixels (see ``test_integrate_full_split``).
- sigma_clip (azimuthal, hybrid, poisson; thres 3 and 5, max_iter 5): intensity within 1e-3
  in 99 % of the bins and counts equal in 99 % of the bins where ours is >= 3 (pyFAI reports 3
  for bins of 1-2 pixels).
- medfilt (full split; 50, (40, 60), (10, 90)): intensity within 1e-4 in 99 % of the bins
  whose quantile bounds do not cut through a run of equal values (see ``tie_ambiguous_bins``).

Frames: a synthetic Pilatus 1M (dark, flat, normalization, polarization), a synthetic Eiger 4M
(uint32), and the real frames of the test data (Pixium, Pilatus 300K-W LaB6, Pilatus 1M AgBh,
Pilatus 6M thaumatin). The LightForm reference pattern is reproduced as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synthetic import synthetic_case

from azfilter.backends.python import PythonEngine
from azfilter.integrator import Integrator, Result
from azfilter.poni import load_poni

pyFAI = pytest.importorskip("pyFAI")
fabio = pytest.importorskip("fabio")
from pyFAI.detectors import detector_factory  # noqa: E402
from pyFAI.integrator.azimuthal import AzimuthalIntegrator  # noqa: E402

logging.getLogger("pyFAI").setLevel(logging.ERROR)

INNER = slice(1, -1)  # bins compared: all but the first and the last
NO_SPLIT = ("no", "csr", "cython")
FULL_SPLIT = ("full", "csr", "cython")
# Largest error of one of pyFAI's float32 full-split coefficients (pyfai-algorithms §9 gives
# 4.2e-5 against exact polygon clipping; we measured 4e-5 against our float64 table).
PYFAI_COEF_ERROR = 5e-5


# ------------------------------------------------------------------------------ the cases
@dataclass
class Case:
    """One frame with its geometry, as azfilter and pyFAI each see it."""

    name: str
    raw: np.ndarray
    ours: Integrator
    ai: Any                               # pyFAI AzimuthalIntegrator
    mask: np.ndarray                      # full mask for pyFAI
    npt: int
    pyfai_options: dict = field(default_factory=dict)

    def pyfai(self, function: str, **kwargs):
        """Call ``ai.<function>`` on the frame with this case's options."""
        options = {"unit": self.ours.unit, "radial_range": self.ours.radial_range,
                   "mask": self.mask, **self.pyfai_options, **kwargs}
        return getattr(self.ai, function)(self.raw, self.npt, **options)

    def engine(self, split: str) -> PythonEngine:
        return self.ours.engine(split, self.raw.dtype)


def make_case(name: str, raw: np.ndarray, geometry, ai, npt: int, unit: str,
              radial_range: tuple[float, float] | None = None, polarization: float | None = None,
              dark: np.ndarray | None = None, flat: np.ndarray | None = None,
              normalization: float = 1.0, azimuth_range=None) -> Case:
    """Build both sides; the radial range defaults to the 1-99 % span of the pixels."""
    options = dict(unit=unit, backend="python", dark=dark, flat=flat, polarization=polarization,
                   normalization=normalization, azimuth_range=azimuth_range)
    probe = Integrator(geometry, **options)
    if geometry.detector.shape is None:
        probe.integrate(raw)  # a generic detector takes its shape from the first frame
    static = probe.constants.static_mask.reshape(raw.shape)
    if radial_range is None:
        radial = probe.geometry.array(unit)[~static]
        low, high = np.quantile(radial, [0.01, 0.99])
        radial_range = (float(f"{low:.4g}"), float(f"{high:.4g}"))
    ours = Integrator(probe.geometry, npt=npt, radial_range=radial_range, **options)
    full_mask = static | ours.geometry.detector.invalid_pixels(raw)
    pyfai_options = {"polarization_factor": polarization, "correctSolidAngle": True,
                     "normalization_factor": normalization}
    for key, value in (("dark", dark), ("flat", flat), ("azimuth_range", azimuth_range)):
        if value is not None:
            pyfai_options[key] = value
    return Case(name, raw, ours, ai, full_mask, npt, pyfai_options)


def pyfai_from_geometry(geometry) -> Any:
    return AzimuthalIntegrator(
        dist=geometry.dist, poni1=geometry.poni1, poni2=geometry.poni2, rot1=geometry.rot1,
        rot2=geometry.rot2, rot3=geometry.rot3, wavelength=geometry.wavelength,
        detector=detector_factory(geometry.detector.name))


def synthetic_pilatus() -> Case:
    case = synthetic_case("Pilatus1M", seed=1)
    rng = np.random.default_rng(11)
    dark = rng.normal(2.0, 0.1, case.raw.shape).astype(np.float32)
    flat = rng.normal(1.0, 0.02, case.raw.shape).astype(np.float32)
    return make_case("synthetic-Pilatus1M", case.raw, case.geometry,
                     pyfai_from_geometry(case.geometry), 1000, "q_nm^-1",
                     radial_range=(1.0, 40.0), polarization=case.polarization, dark=dark,
                     flat=flat, normalization=2.5)


def synthetic_eiger() -> Case:
    case = synthetic_case("Eiger4M", seed=2)
    return make_case("synthetic-Eiger4M", case.raw, case.geometry,
                     pyfai_from_geometry(case.geometry), 1000, "2th_deg",
                     radial_range=(2.0, 40.0), polarization=case.polarization)


def real_case(testdata: Path, name: str, image: str, poni: str, npt: int, unit: str,
              polarization: float | None) -> Case:
    raw = fabio.open(str(testdata / image)).data
    ai = pyFAI.load(str(testdata / poni))  # pyFAI's own PONI reader, ours below
    return make_case(name, raw, load_poni(testdata / poni), ai, npt, unit,
                     polarization=polarization)


CASES = {
    "synthetic-Pilatus1M": lambda testdata: synthetic_pilatus(),
    "synthetic-Eiger4M": lambda testdata: synthetic_eiger(),
    "pixium": lambda testdata: real_case(
        testdata, "pixium", "lightform_DLS_I12_pixium_stack/pixium_03150.tif",
        "lightform_DLS_I12_pixium_stack/DLS_CeO2_1200mm_pyFAI_2022-01-13.poni", 1000,
        "2th_deg", 0.99),
    "lab6": lambda testdata: real_case(
        testdata, "lab6", "ssrl_Pilatus300KW_LaB6/b_toney_lab6_th3_scan1_0008.tif",
        "ssrl_Pilatus300KW_LaB6/b_toney_lab6_th3_scan1_0008.poni", 1000, "2th_deg", 0.95),
    "agbh": lambda testdata: real_case(
        testdata, "agbh", "silx_Pilatus1M_AgBh/Pilatus1M.edf",
        "silx_Pilatus1M_AgBh/Pilatus1M_wl1A.poni", 1000, "q_nm^-1", None),
    "thaumatin": lambda testdata: real_case(
        testdata, "thaumatin", "dials_pilatus6M_eiger16M_MX_cbf/thau_3_2_0001.cbf",
        "dials_pilatus6M_eiger16M_MX_cbf/thau_3_2_from_cbf_header.poni", 1000, "q_nm^-1",
        0.99),
}
REAL = ("pixium", "lab6", "agbh", "thaumatin")
FAST = ("synthetic-Pilatus1M",)
# The two largest frames (6 and 4.5 Mpixel) take the checks where they add something (dummy
# handling of uint32 frames, Bragg spots of MX data: clipping and the median); the other four
# frames cover the variance formulas and pixel splitting, to keep the file's run time sane.
LARGE = ("synthetic-Eiger4M", "thaumatin")


@pytest.fixture(scope="module")
def built_cases():
    """Cases are built on first use and kept (with their lookup tables) for the module."""
    store: dict[str, Case] = {}
    yield store
    store.clear()


@pytest.fixture
def case(request, built_cases) -> Case:
    name = request.param
    if name not in built_cases:
        testdata = request.getfixturevalue("testdata") if name in REAL else None
        built_cases[name] = CASES[name](testdata)
    return built_cases[name]


def over_cases(names=tuple(CASES)):
    """Parametrize a test over the named cases (all but FAST marked slow)."""
    return pytest.mark.parametrize(
        "case",
        [pytest.param(name, id=name, marks=() if name in FAST else (pytest.mark.slow,))
         for name in names],
        indirect=True,
    )


all_cases = over_cases()
usual_cases = over_cases(tuple(name for name in CASES if name not in LARGE))


# ------------------------------------------------------------------------------ helpers
def relative(ours: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """|ours - ref| / |ref|; 0 where equal, inf where ref is 0 and ours is not, or NaN."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(ours - reference) / np.abs(reference)
    rel[ours == reference] = 0.0
    return np.where(np.isnan(rel), np.inf, rel)


def nonempty(result) -> np.ndarray:
    """Inner bins where our result has pixels."""
    return result.count[INNER] > 0


@dataclass
class Table:
    """A lookup table in the form engines read (indptr, indices, coefs)."""

    indptr: np.ndarray
    indices: np.ndarray
    coefs: np.ndarray


def pyfai_table(case: Case, split: str) -> Table:
    """pyFAI's own CSR table of the last ``split`` integration run on ``case.ai``."""
    wanted = {"no": "no split", "full": "full split"}[split]
    for key, value in case.ai.engines.items():
        if wanted in str(key) and "CSR" in str(key) and hasattr(value.engine, "lut"):
            data, indices, indptr = value.engine.lut
            assert len(indptr) == case.npt + 1
            return Table(np.asarray(indptr, dtype=np.int64), np.asarray(indices),
                         np.asarray(data, dtype=np.float32))
    raise AssertionError(f"no pyFAI {wanted} CSR engine among {list(case.ai.engines)}")


def single_pass_variance(engine: PythonEngine, raw: np.ndarray) -> np.ndarray:
    """pyFAI's azimuthal accumulator (pyfai-algorithms §4.5), replayed with numpy.

    ``VV += ω²(μ_old − x)(μ_new − x)`` over the entries of each bin in table (pixel) order,
    ``ω = c·norm``; the running means come from per-bin prefix sums, so no loop is needed.
    """
    entries = engine.entries(raw, "azimuthal")
    weight = entries.coef * entries.norm
    weighted_signal = entries.coef * entries.signal
    corrected = entries.corrected
    per_bin = np.bincount(entries.bin, minlength=engine.npt)
    start = np.concatenate(([0], np.cumsum(per_bin)[:-1]))

    def running(values: np.ndarray) -> np.ndarray:
        total = np.cumsum(values)
        before = np.concatenate(([0.0], total[:-1]))
        return total - before[start][entries.bin]

    sum_signal, sum_weight = running(weighted_signal), running(weight)
    mean_new = sum_signal / sum_weight
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_old = (sum_signal - weighted_signal) / (sum_weight - weight)
    term = weight**2 * (mean_old - corrected) * (mean_new - corrected)
    term[start[per_bin > 0]] = 0.0  # the first entry of a bin only starts the sums
    return np.bincount(entries.bin, term, minlength=engine.npt)


def strong_pixel_signal(engine: PythonEngine, raw: np.ndarray) -> np.ndarray:
    """Per bin, Σ|signal| of the pixels more than 10 times the bin's mean |signal|."""
    entries = engine.entries(raw, "poisson")
    magnitude = np.abs(entries.signal)
    mean = np.bincount(entries.bin, entries.coef * magnitude, minlength=engine.npt) \
        / np.maximum(np.bincount(entries.bin, entries.coef, minlength=engine.npt), 1e-300)
    strong = magnitude > 10 * mean[entries.bin]
    return np.bincount(entries.bin[strong], magnitude[strong], minlength=engine.npt)


def tie_ambiguous_bins(engine: PythonEngine, raw: np.ndarray, quant_min: float,
                       quant_max: float) -> np.ndarray:
    """Bins whose medfilt result depends on how fragments with equal values are ordered.

    When a quantile bound ``q·T`` falls strictly inside the cumulative-weight span of a run
    of fragments with the same corrected value (float32, as pyFAI keys them) but different
    weights, which of them end up inside the bounds depends on their order, and so does
    ``W``. We break ties by pixel index, pyFAI by whatever its sort does; on low-count
    integer data (many pixels with the same count) such runs are common.
    """
    entries = engine.entries(raw, "poisson")
    key = entries.corrected.astype(np.float32)
    order = np.lexsort((key, entries.bin))
    bins, key = entries.bin[order], key[order]
    weight = (entries.coef * entries.norm)[order]
    upper = np.cumsum(weight)
    lower = upper - weight
    per_bin = np.bincount(bins, minlength=engine.npt)
    start = np.concatenate(([0], np.cumsum(per_bin)[:-1]))
    filled = per_bin > 0
    offset = np.zeros(engine.npt)
    offset[filled] = lower[start[filled]]
    upper -= offset[bins]
    lower -= offset[bins]
    total = np.zeros(engine.npt)
    total[filled] = upper[start[filled] + per_bin[filled] - 1]
    new_run = np.ones(bins.size, dtype=bool)
    new_run[1:] = (bins[1:] != bins[:-1]) | (key[1:] != key[:-1])
    run = np.cumsum(new_run) - 1
    run_bin = bins[new_run]
    run_lower = lower[new_run]
    run_upper = upper[np.concatenate((np.flatnonzero(new_run)[1:] - 1, [bins.size - 1]))]
    lightest = np.full(run_bin.size, np.inf)
    np.minimum.at(lightest, run, weight)
    heaviest = np.full(run_bin.size, -np.inf)
    np.maximum.at(heaviest, run, weight)
    cut_through = np.zeros(run_bin.size, dtype=bool)
    for quantile in (quant_min, quant_max):
        bound = quantile * total[run_bin]
        cut_through |= (run_lower < bound) & (bound < run_upper)
    ambiguous = np.zeros(engine.npt, dtype=bool)
    ambiguous[run_bin[cut_through & (lightest != heaviest)]] = True
    return ambiguous


# ------------------------------------------------------------------------------ integrate
@all_cases
def test_integrate_no_split_poisson(case):
    ref = case.pyfai("integrate1d", method=NO_SPLIT, error_model="poisson")
    res = case.ours.integrate(case.raw, "poisson", split="no")
    np.testing.assert_allclose(res.radial, ref.radial, rtol=1e-12)
    inner = nonempty(res)
    assert inner.sum() > 0.9 * (case.npt - 2)
    np.testing.assert_array_equal(res.count[INNER], ref.count[INNER])
    assert relative(res.intensity[INNER], ref.intensity[INNER])[inner].max() < 1e-5
    assert relative(res.sigma[INNER], ref.sigma[INNER])[inner].max() < 1e-5
    assert relative(res.std[INNER], ref.std[INNER])[inner].max() < 1e-5


@usual_cases
def test_integrate_no_split_azimuthal(case):
    ref = case.pyfai("integrate1d", method=NO_SPLIT, error_model="azimuthal")
    res = case.ours.integrate(case.raw, "azimuthal", split="no")
    inner = nonempty(res)
    assert relative(res.intensity[INNER], ref.intensity[INNER])[inner].max() < 1e-5
    for ours, theirs in ((res.sigma, ref.sigma), (res.std, ref.std)):
        rel = relative(ours[INNER], theirs[INNER])[inner]
        assert np.mean(rel < 1e-2) >= 0.99 and rel.max() < 0.05
    # the difference is the variance formula: pyFAI's update, replayed, gives its variance
    replay = single_pass_variance(case.engine("no"), case.raw)
    assert relative(replay[INNER], ref.sum_variance[INNER])[inner].max() < 1e-5


@usual_cases
@pytest.mark.parametrize("model", ["poisson", "azimuthal"])
def test_integrate_full_split(case, model):
    """Full splitting: exact on pyFAI's table, within its coefficient precision on ours.

    pyFAI computes the splitting coefficients in float32 (errors up to ~4e-5 per
    coefficient), azfilter in float64. A strong pixel (hot pixel, Bragg spot) split across
    bins carries that error into the bin's sum: the intensity bound is 1e-5 plus
    ``PYFAI_COEF_ERROR · Σ|strong pixel signal| / |S|``.
    """
    ref = case.pyfai("integrate1d", method=FULL_SPLIT, error_model=model)
    res = case.ours.integrate(case.raw, model, split="full")
    np.testing.assert_allclose(res.radial, ref.radial, rtol=1e-12)
    inner = nonempty(res)
    assert inner.sum() > 0.9 * (case.npt - 2)

    # 1. the engine on pyFAI's own table: every bin to 1e-5
    engine = case.engine("full")
    on_theirs = PythonEngine(pyfai_table(case, "full"), engine.pixel_norm, engine.dark,
                             engine.dummy, engine.delta_dummy)
    sums = on_theirs.integrate(case.raw, model)
    same_table = Result.from_sums(ref.radial, sums, case.ours.unit, "integrate", {}, model)
    filled = same_table.count[INNER] > 0
    np.testing.assert_allclose(same_table.count[INNER], ref.count[INNER], rtol=1e-6)
    assert relative(same_table.intensity[INNER], ref.intensity[INNER])[filled].max() < 1e-5
    if model == "poisson":
        assert relative(same_table.sigma[INNER], ref.sigma[INNER])[filled].max() < 1e-5
        assert relative(same_table.std[INNER], ref.std[INNER])[filled].max() < 1e-5
    else:
        replay = single_pass_variance(on_theirs, case.raw)
        assert relative(replay[INNER], ref.sum_variance[INNER])[filled].max() < 1e-5

    # 2. our table: within the float32 precision of pyFAI's coefficients
    np.testing.assert_allclose(res.count[INNER], ref.count[INNER], rtol=1e-4)
    budget = 1e-5 + PYFAI_COEF_ERROR * strong_pixel_signal(engine, case.raw)[INNER] \
        / np.abs(res.sum_signal[INNER])
    intensity = relative(res.intensity[INNER], ref.intensity[INNER])
    assert np.all(intensity[inner] <= budget[inner])
    if model == "poisson":  # V = Σc²·var takes the coefficient errors twice
        sigma = relative(res.sigma[INNER], ref.sigma[INNER])[inner]
        assert np.median(sigma) < 1e-5 and sigma.max() < 1e-3


# ------------------------------------------------------------------------------ sigma_clip
@all_cases
@pytest.mark.parametrize("model", ["azimuthal", "hybrid", "poisson"])
@pytest.mark.parametrize("thres", [3.0, 5.0])
def test_sigma_clip(case, model, thres):
    ref = case.pyfai("sigma_clip_ng", method=NO_SPLIT, error_model=model, thres=thres,
                     max_iter=5)
    res = case.ours.sigma_clip(case.raw, thres=thres, max_iter=5, error_model=model)
    compared = res.count[INNER] >= 3
    assert compared.sum() > 0.8 * (case.npt - 2)
    intensity = relative(res.intensity[INNER], ref.intensity[INNER])[compared]
    assert np.mean(intensity < 1e-3) >= 0.99
    assert np.mean(res.count[INNER][compared] == ref.count[INNER][compared]) >= 0.99
    # clipping did reject something on every one of these frames
    assert res.count.sum() < case.ours.integrate(case.raw).count.sum()


# ------------------------------------------------------------------------------ medfilt
@pytest.mark.parametrize("case, percentile", [
    pytest.param(name, percentile, id=f"{percentile}-{name}",
                 marks=() if name in FAST else (pytest.mark.slow,))
    for name in CASES for percentile in (50, (40, 60), (10, 90))
    if name not in LARGE or percentile != (40, 60)
], indirect=["case"])
def test_medfilt(case, percentile):
    ref = case.pyfai("medfilt1d_ng", method=FULL_SPLIT, error_model="poisson",
                     percentile=percentile)
    res = case.ours.medfilt(case.raw, percentile=percentile, split="full")
    low, high = (percentile, percentile) if np.isscalar(percentile) else percentile
    ambiguous = tie_ambiguous_bins(case.engine("full"), case.raw, low / 100, high / 100)
    compared = nonempty(res) & ~ambiguous[INNER]
    assert compared.sum() > 0.15 * (case.npt - 2)
    intensity = relative(res.intensity[INNER], ref.intensity[INNER])[compared]
    assert np.mean(intensity < 1e-4) >= 0.99


# ------------------------------------------------------------------------------ azimuth range
def test_azimuth_range_no_split():
    """A wedge of the small synthetic frame: same pixels, same values as pyFAI."""
    synthetic = synthetic_case("small", seed=5)
    case = make_case("wedge", synthetic.raw, synthetic.geometry,
                     pyfai_from_geometry(synthetic.geometry), 300, "q_nm^-1",
                     radial_range=(1.0, 40.0), polarization=synthetic.polarization,
                     azimuth_range=(-150.0, 100.0))
    ref = case.pyfai("integrate1d", method=NO_SPLIT, error_model="poisson")
    res = case.ours.integrate(case.raw, "poisson")
    inner = nonempty(res)
    np.testing.assert_array_equal(res.count[INNER], ref.count[INNER])
    assert res.count.sum() < 0.8 * np.count_nonzero(~case.mask)  # the wedge is a wedge
    assert relative(res.intensity[INNER], ref.intensity[INNER])[inner].max() < 1e-5
    ref = case.pyfai("sigma_clip_ng", method=NO_SPLIT, error_model="azimuthal", thres=3.0,
                     max_iter=5)
    res = case.ours.sigma_clip(case.raw, thres=3.0)
    compared = res.count[INNER] >= 3
    assert np.mean(res.count[INNER][compared] == ref.count[INNER][compared]) >= 0.99


# ------------------------------------------------------------------------------ LightForm
@pytest.mark.slow
def test_lightform_reference(testdata):
    """integrate(split="full") reproduces the published pyFAI 1-D pattern of pixium_03150.

    The reference call (testdata README): npt=5000, 2th_deg, mask=img<0 (nothing for uint16),
    solid angle, polarization 0.99, full split, azimuth_range (-180, 180).
    """
    folder = testdata / "lightform_DLS_I12_pixium_stack"
    raw = fabio.open(str(folder / "pixium_03150.tif")).data
    reference = np.loadtxt(folder / "ref_integrate1d_pixium_03150.dat")
    integ = Integrator(load_poni(folder / "DLS_CeO2_1200mm_pyFAI_2022-01-13.poni"), npt=5000,
                       unit="2th_deg", backend="python", mask=raw < 0, polarization=0.99,
                       azimuth_range=(-180, 180))
    res = integ.integrate(raw, split="full")
    # the file prints 7 significant digits: our grid must round to it (5e-6° at 10-20°)
    printed = reference[:, 0]
    half_digit = 0.5 * 10.0 ** (np.floor(np.log10(np.abs(printed))) - 6)
    assert np.all(np.abs(res.radial - printed) <= half_digit * (1 + 1e-6))
    assert np.abs(res.radial - printed).max() <= 5e-6
    filled = (res.count > 0) & (reference[:, 1] != 0)
    assert filled.sum() > 4900
    rel = np.abs(res.intensity[filled] - reference[filled, 1]) / np.abs(reference[filled, 1])
    assert np.median(rel) < 1e-4
    assert np.corrcoef(res.intensity[filled], reference[filled, 1])[0, 1] > 0.99999
