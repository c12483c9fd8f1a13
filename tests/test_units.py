"""The unit registry against pyFAI 2026.9's units."""

from __future__ import annotations

import numpy as np
import pytest

from azfilter.errors import AzfilterError
from azfilter.units import AZIMUTHAL_UNITS, UNITS, Unit, get_unit

pyfai_units = pytest.importorskip("pyFAI.units")

# pyFAI's name of each internal quantity ("space")
SPACE = {"2th": "2th", "q": "q", "r": "r", "chi": "chi", "d": "d"}


def test_radial_units_are_the_documented_seven():
    assert sorted(UNITS) == sorted(["q_nm^-1", "q_A^-1", "2th_deg", "2th_rad", "r_mm",
                                    "d_nm", "d_A"])
    assert sorted(AZIMUTHAL_UNITS) == ["chi_deg", "chi_rad"]
    # every radial unit is one of pyFAI's, under the same name
    assert set(UNITS) <= set(pyfai_units.RADIAL_UNITS)


@pytest.mark.parametrize("name", list(UNITS) + list(AZIMUTHAL_UNITS))
def test_unit_matches_pyfai(name):
    ours = get_unit(name, azimuthal=True)
    theirs = pyfai_units.to_unit(name)
    assert ours.name == name
    assert ours.scale == pytest.approx(theirs.scale, rel=1e-15)
    assert SPACE[ours.quantity] == theirs.space
    assert ours.positive == theirs.positive
    assert ours.symbol and ours.label


def test_get_unit_accepts_only_exact_names():
    assert get_unit("q_nm^-1") is UNITS["q_nm^-1"]
    unit = Unit("x", "q", 2.0, "x", "x")
    assert get_unit(unit) is unit
    # pyFAI rejects these spellings too
    for bad in ("q_A-1", "Q_NM^-1", "2theta", "", None):
        with pytest.raises(AzfilterError, match="unknown unit") as err:
            get_unit(bad)
        assert "q_nm^-1" in str(err.value) and "\n" not in str(err.value)
    for bad in ("q_A-1", "Q_NM^-1", "2theta"):
        assert bad not in pyfai_units.RADIAL_UNITS


def test_chi_units_are_not_radial_units():
    with pytest.raises(AzfilterError, match="unknown unit"):
        get_unit("chi_deg")
    assert get_unit("chi_deg", azimuthal=True).quantity == "chi"
    assert not get_unit("chi_rad", azimuthal=True).positive
    assert all(unit.positive for unit in UNITS.values())


# ------------------------------------------------------------------------------ d-spacing
# The d units run opposite to 2θ: d = 2π/q falls as the angle grows. What is checked here is
# that nothing in the binning assumes an increasing unit, and that azfilter's d agrees with
# pyFAI's (per pixel, bin axis, integrated intensities) and with the physics (ring positions).


@pytest.fixture(scope="module")
def small_case():
    from synthetic import synthetic_case

    return synthetic_case("small", seed=3)


@pytest.fixture(scope="module")
def pyfai_ai(small_case):
    pyfai_detectors = pytest.importorskip("pyFAI.detectors")
    azimuthal = pytest.importorskip("pyFAI.integrator.azimuthal")
    g = small_case.geometry
    return azimuthal.AzimuthalIntegrator(
        dist=g.dist, poni1=g.poni1, poni2=g.poni2, rot1=g.rot1, rot2=g.rot2, rot3=g.rot3,
        wavelength=g.wavelength, detector=pyfai_detectors.detector_factory(g.detector.name))


@pytest.mark.parametrize("name", ["d_nm", "d_A"])
def test_d_per_pixel_matches_pyfai_and_two_pi_over_q(small_case, pyfai_ai, name):
    geometry = small_case.geometry
    ours = geometry.array(name)
    theirs = pyfai_ai.array_from_unit(geometry.detector.shape, "center", name, scale=True)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    # d = 2π/q, in the unit's length (q in nm^-1 gives d in nm)
    q_nm = geometry.center_array("q")
    to_unit = {"d_nm": 1.0, "d_A": 10.0}[name]
    np.testing.assert_allclose(ours, 2 * np.pi / q_nm * to_unit, rtol=1e-12)
    # d falls as 2θ rises
    tth = geometry.center_array("2th").ravel()
    order = np.argsort(tth)
    assert np.all(np.diff(ours.ravel()[order]) <= 0)


def test_d_of_the_beam_pixel_is_infinite_and_left_out():
    from azfilter.binning import build_csr
    from azfilter.detectors import get_detector
    from azfilter.geometry import Geometry

    pixel = 2.0**-13  # ~122 µm, so that the pixel centre is exactly on the PONI
    detector = get_detector("Detector", {"pixel1": pixel, "pixel2": pixel, "max_shape": [8, 8]})
    # the PONI on the centre of pixel (3, 4): q = 0 there
    geometry = Geometry(dist=0.1, poni1=3.5 * pixel, poni2=4.5 * pixel, wavelength=1e-10,
                        detector=detector)
    d = geometry.array("d_A")
    assert np.isinf(d[3, 4]) and np.isfinite(np.delete(d.ravel(), 3 * 8 + 4)).all()
    table = build_csr(geometry, "d_A", 10, "no", np.zeros((8, 8), bool), cache=False)
    assert 3 * 8 + 4 not in set(table.indices.tolist())
    assert table.nnz == 63
    # its corners are finite: with full splitting it is binned (pyFAI does the same)
    corners = geometry.array("d_A", corners=True)
    assert np.isfinite(corners).all()


@pytest.mark.parametrize("split", ["no", "full"])
def test_d_bins_ascend_and_hold_their_pixels(small_case, split):
    from azfilter.binning import build_csr

    geometry = small_case.geometry
    mask = np.array(geometry.detector.mask, dtype=bool)
    table = build_csr(geometry, "d_A", 150, split, mask, radial_range=(1.5, 9.0), cache=False)
    # same table whichever way round the range is given
    reverse = build_csr(geometry, "d_A", 150, split, mask, radial_range=(9.0, 1.5), cache=False)
    np.testing.assert_array_equal(table.indptr, reverse.indptr)
    np.testing.assert_array_equal(table.indices, reverse.indices)
    edges = table.bin_edges * 1e10  # metres -> Å
    assert edges[0] == pytest.approx(1.5) and edges[-1] == pytest.approx(9.0, rel=1e-6)
    assert np.all(np.diff(table.radial) > 0)
    np.testing.assert_allclose(table.radial, 0.5 * (edges[1:] + edges[:-1]), rtol=1e-12)
    if split == "no":  # each pixel sits in the bin of its centre's d
        d = geometry.array("d_A").ravel()
        rows = np.repeat(np.arange(table.npt), np.diff(table.indptr))
        values = d[table.indices]
        assert np.all(values >= edges[rows] - 1e-12) and np.all(values < edges[rows + 1])
        inside = (d >= 1.5) & (d < edges[-1]) & ~mask.ravel()
        assert table.nnz == int(inside.sum())
    else:
        # each pixel's weight, over the bins it reaches, is 1 (split, not lost)
        per_pixel = np.bincount(table.indices, weights=table.coefs, minlength=table.size)
        used = per_pixel > 0
        np.testing.assert_allclose(per_pixel[used], 1.0, rtol=1e-5)


def test_d_pattern_follows_the_true_profile(small_case):
    """The frame is I_true(q) times solid angle and polarization: corrected and binned in d,
    each bin must give I_true(2π/d) (sigma-clipping removes the spots and hot pixels)."""
    from synthetic import true_profile

    from azfilter.integrator import Integrator

    result = Integrator(small_case.geometry, npt=300, unit="d_A", backend="python",
                        radial_range=(1.8, 14.0),
                        polarization=small_case.polarization).sigma_clip(small_case.raw)
    assert result.unit == "d_A" and np.all(np.diff(result.radial) > 0)
    q_nm = 2 * np.pi / (result.radial / 10.0)
    deviation = np.abs(result.intensity - true_profile(q_nm)) / result.sigma
    # measured: median 0.75, 95th percentile 2.4 standard errors
    assert np.nanmedian(deviation) < 1.5 and np.nanpercentile(deviation, 95) < 4.0
    # the same bins read the other way round (d increasing with q) are far off: 56 %
    backwards = true_profile(q_nm[::-1])
    assert np.nanmedian(np.abs(result.intensity / backwards - 1)) > 0.3


@pytest.mark.parametrize("name, radial_range", [("d_A", (1.9, 12.0)), ("d_nm", (0.19, 1.2))])
@pytest.mark.parametrize("split", ["no", "full"])
def test_d_integration_matches_pyfai(small_case, pyfai_ai, name, radial_range, split):
    from azfilter.integrator import Integrator

    mask = np.array(small_case.geometry.detector.mask, dtype=bool) | (small_case.raw < 0)
    theirs = pyfai_ai.integrate1d(small_case.raw, 300, unit=name, mask=mask,
                                  method=(split, "csr", "cython"), radial_range=radial_range,
                                  error_model="poisson", correctSolidAngle=True)
    ours = Integrator(small_case.geometry, npt=300, unit=name, backend="python",
                      radial_range=radial_range).integrate(small_case.raw, split=split)
    np.testing.assert_allclose(ours.radial, theirs.radial, rtol=1e-12)
    inner = slice(1, -1)  # pyFAI piles pixels below a user range into bin 0
    # no split: the same pixels in the same bins; full split: pyFAI's float32 corners and
    # coefficients (measured: 5.5e-5 at most)
    rtol = 1e-6 if split == "no" else 2e-4
    np.testing.assert_allclose(ours.intensity[inner], theirs.intensity[inner], rtol=rtol)
    np.testing.assert_allclose(ours.sigma[inner], theirs.sigma[inner], rtol=rtol)
    if split == "no":
        np.testing.assert_array_equal(ours.count[inner], theirs.count[inner])
