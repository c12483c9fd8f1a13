"""Integrator and Result: options, validation, lazy tables, engine reuse, and what the filters
are for (recovering a known profile from a frame with Bragg spots and hot pixels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from synthetic import SMALL, default_geometry, synthetic_case, true_profile

from azfilter.backends import BinSums, parse_error_model
from azfilter.detectors import generic_detector, get_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry
from azfilter.integrator import Integrator, Result


@pytest.fixture(scope="module")
def case():
    """The small synthetic frame (Pilatus 300K with gaps, spots, hot and dead pixels)."""
    return synthetic_case(SMALL, seed=3, scale=5.0)


@pytest.fixture(scope="module")
def integ(case) -> Integrator:
    return Integrator(case.geometry, npt=400, backend="python",
                      polarization=case.polarization, radial_range=(1.0, 45.0))


# ------------------------------------------------------------------------------ Result
def test_result_from_sums():
    sums = BinSums(signal=[12.0, 0.0, 5.0], variance=[16.0, 0.0, 0.0],
                   normalization=[4.0, 0.0, 1.0], normalization2=[8.0, 0.0, 1.0],
                   count=[4.0, 0.0, 1.0])
    result = Result.from_sums(np.array([1.0, 2.0, 3.0]), sums, "q_nm^-1", "integrate",
                              {"npt": 3}, "poisson")
    assert result.intensity[0] == 3.0                     # S/W
    assert result.sigma[0] == 1.0                         # sqrt(V)/W
    assert result.std[0] == pytest.approx(math.sqrt(2))   # sqrt(V/W2)
    assert np.isnan(result.intensity[1]) and np.isnan(result.sigma[1])
    assert np.isnan(result.std[1]) and result.count[1] == 0
    assert result.intensity[2] == 5.0 and result.sigma[2] == 0.0
    assert result.npt == 3 and result.unit == "q_nm^-1" and result.operation == "integrate"
    for name in ("radial", "intensity", "sigma", "std", "count", "sum_signal",
                 "sum_variance", "sum_normalization", "sum_normalization2"):
        assert getattr(result, name).dtype == np.float64


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("options, message", [
    ({"npt": 0}, "npt"),
    ({"npt": 2.5}, "npt"),
    ({"unit": "q_A-1"}, "unknown unit"),
    ({"backend": "fortran"}, "unknown backend"),
    ({"normalization": 0}, "normalization"),
    ({"normalization": "x"}, "normalization"),
    ({"radial_range": (5, 1)}, "radial_range"),
    ({"radial_range": (1, float("nan"))}, "radial_range"),
    ({"azimuth_range": (1,)}, "azimuth_range"),
    ({"polarization": 3}, "polarization"),
    ({"threads": 0}, "threads"),
    ({"mask": np.zeros((3, 3))}, r"mask has shape \(3, 3\), detector Pilatus300k"),
    ({"flat": "/nonexistent/flat.edf"}, "flat.edf"),
])
def test_bad_options(case, options, message):
    with pytest.raises(AzfilterError, match=message):
        Integrator(case.geometry, **{"backend": "python", **options})


def test_bad_call_arguments(integ, case):
    raw = case.raw
    with pytest.raises(AzfilterError, match="unknown split"):
        integ.integrate(raw, split="bbox")
    with pytest.raises(AzfilterError, match="sigma_clip is no-split only"):
        integ.sigma_clip(raw, split="full")
    with pytest.raises(AzfilterError, match="unknown error model 'poissonian'"):
        integ.integrate(raw, error_model="poissonian")   # pyFAI silently means "no error"
    with pytest.raises(AzfilterError, match="thres"):
        integ.sigma_clip(raw, thres=-1)
    with pytest.raises(AzfilterError, match="max_iter"):
        integ.sigma_clip(raw, max_iter=2.5)
    for percentile in (101, -1, (60, 40), (10, 20, 30), "median", (10, float("nan"))):
        with pytest.raises(AzfilterError, match="percentile"):
            integ.medfilt(raw, percentile=percentile)
    with pytest.raises(AzfilterError, match="needs a variance array"):
        integ.integrate(raw, error_model="variance")
    with pytest.raises(AzfilterError, match="use error_model='variance'"):
        integ.integrate(raw, variance=np.ones(raw.shape))
    with pytest.raises(AzfilterError, match="variance shape"):
        integ.integrate(raw, error_model="variance", variance=np.ones((2, 2)))
    with pytest.raises(AzfilterError, match="must be 2-D"):
        integ.integrate(raw[0])


def test_image_shape_must_match_detector(integ):
    with pytest.raises(AzfilterError) as info:
        integ.integrate(np.zeros((195, 487), dtype=np.int32))
    assert str(info.value) == \
        "image shape (195, 487) does not match detector Pilatus300k shape (619, 487)"


def test_parse_error_model():
    assert parse_error_model("Poisson") == "poisson"
    assert parse_error_model("az") == "azimuthal"
    assert parse_error_model(" H ") == "hybrid"
    assert parse_error_model("VAR") == "variance"
    for bad in ("", "poissonian", "no", None, "x"):
        with pytest.raises(AzfilterError, match="poisson, azimuthal, hybrid, variance"):
            parse_error_model(bad)


def test_unavailable_backend_is_a_clear_error(case):
    """The compiled backends either work or say why not (never an ImportError)."""
    for backend in ("cython", "opencl"):
        try:
            integ = Integrator(case.geometry, npt=50, backend=backend)
        except AzfilterError as err:
            assert f"backend {backend!r} is not available" in str(err)
        else:
            assert integ.backend == backend


# ------------------------------------------------------------------------------ behaviour
def test_lazy_tables_and_engine_reuse(case):
    integ = Integrator(case.geometry, npt=100, backend="python")
    assert integ._tables == {} and integ._engines == {}
    first = integ.integrate(case.raw)
    assert set(integ._tables) == {"no"}
    engine = integ.engine("no", case.raw.dtype)
    second = integ.integrate(case.raw)
    integ.sigma_clip(case.raw)
    assert integ.engine("no", case.raw.dtype) is engine and len(integ._engines) == 1
    np.testing.assert_array_equal(first.intensity, second.intensity)
    integ.medfilt(case.raw)                                # default split: full
    assert set(integ._tables) == {"no", "full"}


def test_results_and_parameters(integ, case):
    result = integ.medfilt(case.raw, percentile=(40, 60))
    assert result.operation == "medfilt" and result.error_model == "poisson"
    assert result.unit == "q_nm^-1" and result.npt == 400
    assert result.radial[0] == pytest.approx(1.0 + 44.0 / 800)
    parameters = json.loads(json.dumps(result.parameters))
    assert parameters["percentile"] == [40.0, 60.0] and parameters["split"] == "full"
    assert parameters["polarization"] == [0.99, 0.0] and parameters["npt"] == 400
    assert parameters["radial_range"] == [1.0, 45.0] and parameters["backend"] == "python"
    assert parameters["detector"] == "Pilatus300k"
    clipped = integ.sigma_clip(case.raw, thres=4, max_iter=3, error_model="hybrid")
    assert clipped.parameters["thres"] == 4.0 and clipped.parameters["max_iter"] == 3
    assert clipped.parameters["error_model"] == "hybrid" and clipped.operation == "sigma_clip"
    config = json.loads(json.dumps(integ.config()))
    assert config == {
        "npt": 400, "unit": "q_nm^-1", "backend": "python", "device": None, "mask": None,
        "dark": None, "flat": None, "pixel_mask": None, "polarization": [0.99, 0.0],
        "solid_angle": True, "radial_range": [1.0, 45.0], "azimuth_range": None,
        "normalization": 1.0, "threads": None,
    }


def test_dummies_gaps_and_empty_bins(case):
    """Gaps (-1) and dead pixels (-2) never count, in any operation; empty bins are NaN."""
    integ = Integrator(case.geometry, npt=300, backend="python")
    in_table = np.zeros(case.raw.size, dtype=bool)
    in_table[integ.table("no").indices] = True
    expected = np.count_nonzero(in_table & ~case.dead.ravel())
    assert integ.integrate(case.raw).count.sum() == expected
    assert not in_table[case.gaps.ravel()].any()
    # the same frame with the invalid pixels as large values: they would count
    loud = case.raw.copy()
    loud[case.dead] = 1000
    assert integ.integrate(loud).count.sum() == expected + case.dead.sum()
    # a range beyond the detector: every bin empty
    far = Integrator(case.geometry, npt=10, backend="python", radial_range=(200.0, 300.0))
    for result in (far.integrate(case.raw), far.sigma_clip(case.raw),
                   far.medfilt(case.raw, split="no")):
        assert np.all(result.count == 0) and np.all(np.isnan(result.intensity))
        assert np.all(np.isnan(result.sigma)) and np.all(np.isnan(result.std))


def test_eiger_uint32_all_ones_are_invalid():
    eiger = get_detector("Eiger1M")
    raw = synthetic_case(eiger, seed=4).raw
    assert raw.dtype == np.uint32
    integ = Integrator(default_geometry(eiger), npt=200, backend="python")
    as_float = np.where(raw == np.iinfo(np.uint32).max, np.nan, raw.astype(np.float64))
    for operation in ("integrate", "sigma_clip"):
        unsigned = getattr(integ, operation)(raw)
        floating = getattr(integ, operation)(as_float)
        np.testing.assert_array_equal(unsigned.count, floating.count)
        np.testing.assert_allclose(unsigned.intensity, floating.intensity, rtol=1e-12)


def test_user_mask_file_dark_flat_normalization(case, tmp_path):
    geometry = case.geometry
    raw = case.raw
    plain = Integrator(geometry, npt=200, backend="python")
    reference = plain.integrate(raw)
    # a mask file masks exactly its non-zero pixels, on top of the gaps
    mask = np.zeros(raw.shape, dtype=np.int8)
    mask[300:340, 100:200] = 1
    np.save(tmp_path / "mask.npy", mask)
    masked = Integrator(geometry, npt=200, backend="python", mask=tmp_path / "mask.npy")
    newly = np.count_nonzero(mask.astype(bool) & ~case.gaps & ~case.dead)
    assert reference.count.sum() - masked.integrate(raw).count.sum() == newly
    assert masked.config()["mask"] == str(tmp_path / "mask.npy")
    # dark: integrating raw + dark with that dark gives the same intensities
    dark = np.full(raw.shape, 7.0, dtype=np.float32)
    darkened = np.where(raw >= 0, raw + 7, raw)
    with_dark = Integrator(geometry, npt=200, backend="python", dark=dark).integrate(darkened)
    np.testing.assert_allclose(with_dark.intensity, reference.intensity, rtol=1e-12)
    # flat: the signal is divided by it
    flat = np.full(raw.shape, 2.0)
    flattened = Integrator(geometry, npt=200, backend="python", flat=flat).integrate(raw)
    np.testing.assert_allclose(flattened.intensity, reference.intensity / 2, rtol=1e-12)
    # normalization divides intensity and sigma
    halved = Integrator(geometry, npt=200, backend="python", normalization=2).integrate(raw)
    np.testing.assert_allclose(halved.intensity, reference.intensity / 2, rtol=1e-12)
    np.testing.assert_allclose(halved.sigma, reference.sigma / 2, rtol=1e-12)
    # Eiger-style pixel mask
    pixel_mask = np.zeros(raw.shape, dtype=np.uint32)
    pixel_mask[0, :10] = 4
    bad = Integrator(geometry, npt=200, backend="python", pixel_mask=pixel_mask)
    removed = reference.count.sum() - bad.integrate(raw).count.sum()
    assert removed == np.count_nonzero(pixel_mask.astype(bool) & ~case.dead) == 10


def test_generic_detector_takes_the_first_image_shape():
    detector = generic_detector(172e-6, 172e-6)
    geometry = Geometry(dist=0.1, poni1=0.02, poni2=0.03, wavelength=1e-10, detector=detector)
    integ = Integrator(geometry, npt=50, backend="python")
    assert integ.shape is None
    frame = np.random.default_rng(0).poisson(100, (300, 400)).astype(np.int32)
    result = integ.integrate(frame)
    assert integ.shape == (300, 400) and result.count.sum() == frame.size
    with pytest.raises(AzfilterError, match=r"image shape \(400, 300\) does not match"):
        integ.integrate(frame.T)


def test_variance_error_model(integ, case):
    variance = np.full(case.raw.shape, 4.0)
    result = integ.integrate(case.raw, error_model="variance", variance=variance)
    ok = result.count > 0
    # equal per-pixel variances: V = 4·N, so sigma = 2·sqrt(N)/W
    np.testing.assert_allclose(result.sum_variance[ok], 4 * result.count[ok])


# ------------------------------------------------------------------------------ why filter
def test_filters_recover_the_profile_that_integrate_misses(integ, case):
    """Bragg spots and hot pixels bias the plain mean; sigma_clip and medfilt remove them.

    The truth is the same integration of the noise-free frame (same bins, same weights).
    """
    noise_free = np.where(case.invalid, -1.0, case.expected)
    truth = integ.integrate(noise_free).intensity
    q = integ.table("no").radial
    # the noise-free integration follows the model profile (no bias from the weighting)
    smooth = (q > 2) & (q < 4)
    np.testing.assert_allclose(truth[smooth], true_profile(q[smooth], case.scale), rtol=2e-3)

    def deviation(result):
        filled = result.count > 0
        assert filled.mean() > 0.95
        return ((result.intensity - truth) / result.sigma)[filled]

    plain = deviation(integ.integrate(case.raw))
    assert plain.mean() > 5 and np.mean(plain > 3) > 0.3          # biased upwards, often
    for result in (integ.sigma_clip(case.raw),
                   integ.sigma_clip(case.raw, thres=3, error_model="hybrid"),
                   integ.medfilt(case.raw, percentile=(40, 60))):
        z = deviation(result)
        assert np.mean(np.abs(z) < 3) >= 0.95, result.operation
        assert abs(z.mean()) < 0.5, result.operation


# ------------------------------------------------------------------------------ streams
def _assert_same_result(got: Result, expected: Result) -> None:
    assert got.operation == expected.operation and got.parameters == expected.parameters
    for name in ("radial", "intensity", "sigma", "std", "count", "sum_signal"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


@pytest.mark.parametrize("operation, params, single", [
    ("integrate", {"error_model": "azimuthal", "split": "full"},
     lambda integ, img: integ.integrate(img, error_model="azimuthal", split="full")),
    ("sigma_clip", {"thres": 3, "max_iter": 4},
     lambda integ, img: integ.sigma_clip(img, thres=3, max_iter=4)),
    ("medfilt", {"percentile": (20, 80), "split": "no"},
     lambda integ, img: integ.medfilt(img, percentile=(20, 80), split="no")),
])
def test_process_many_equals_single_frames(integ, case, operation, params, single):
    """Tags kept, input order, the single-frame results; a bad frame gives its error in its
    place and the stream goes on; a uint32 frame mid-stream (another dummy: another engine)."""
    other = np.clip(case.raw, 0, None).astype(np.uint32)
    frames = [("a", case.raw), ("b", case.raw * 2), ("wrong shape", case.raw[:-1]),
              ("c", other), ("text", np.array([["x"]])), ("d", case.raw[::-1].copy())]
    results = list(integ.process_many(iter(frames), operation, **params))
    assert [tag for tag, _ in results] == [tag for tag, _ in frames]
    for (tag, img), (_, got) in zip(frames, results, strict=True):
        if tag in ("wrong shape", "text"):
            assert isinstance(got, AzfilterError), tag
        else:
            assert isinstance(got, Result), (tag, got)
            _assert_same_result(got, single(integ, img))


@pytest.mark.parametrize("operation, params, message", [
    ("median", {}, "unknown operation"),
    ("sigma_clip", {"split": "full"}, "no-split"),
    ("sigma_clip", {"thres": -1}, "thres"),
    ("medfilt", {"percentile": 120}, "percentile"),
    ("integrate", {"error_model": "gaussian"}, "error model"),
    ("integrate", {"error_model": "variance"}, "variance"),
    ("integrate", {"thres": 3}, "no option thres"),
])
def test_process_many_checks_options_at_once(integ, case, operation, params, message):
    with pytest.raises(AzfilterError, match=message):
        integ.process_many([("a", case.raw)], operation, **params)


def test_process_many_generic_detector_and_variance():
    """A generic detector learns its shape from the first frame; the variance array is checked
    against it."""
    geometry = Geometry(dist=0.1, poni1=0.002, poni2=0.002, wavelength=1e-10,
                        detector=generic_detector(1e-4, 1e-4))
    integ = Integrator(geometry, npt=20, backend="python")
    rng = np.random.default_rng(1)
    img = rng.poisson(50, (40, 50)).astype(np.int32)
    results = list(integ.process_many([(0, img), (1, img[:, :-1])], "integrate",
                                      error_model="variance",
                                      variance=np.full((40, 50), 4.0)))
    assert isinstance(results[0][1], Result) and isinstance(results[1][1], AzfilterError)
    with pytest.raises(AzfilterError, match="variance shape"):   # shape known: at once
        integ.process_many([(0, img)], "integrate", error_model="variance",
                           variance=np.ones((3, 3)))


def test_frame_buffers_ring(integ, case):
    ring = integ.frame_buffers(1)
    buffer = ring.take(case.raw.shape, case.raw.dtype)
    assert isinstance(buffer, np.ndarray) and buffer.shape == case.raw.shape
    assert ring.take(case.raw.shape, case.raw.dtype) is None
    buffer[...] = case.raw
    _assert_same_result(integ.integrate(buffer), integ.integrate(case.raw))
    ring.give_back(buffer)
    assert ring.take(case.raw.shape, case.raw.dtype) is buffer
