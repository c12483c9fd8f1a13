"""Result conveniences (short repr, unpacking, save) and what Integrator accepts as geometry."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from synthetic import synthetic_case

from azfilter.errors import AzfilterError
from azfilter.integrator import Integrator, as_geometry
from azfilter.output import read_result
from azfilter.poni import save_poni


@pytest.fixture(scope="module")
def case():
    return synthetic_case("small", seed=7)


@pytest.fixture(scope="module")
def result(case):
    integrator = Integrator(case.geometry, npt=1000, backend="python")
    return integrator.sigma_clip(case.raw, thres=4)


def test_repr_is_one_short_line(result):
    text = repr(result)
    assert len(text) < 300 and "\n" not in text and str(result) == text
    assert text.startswith("<Result sigma_clip q_nm^-1 npt=1000 range=[")
    assert f"{result.radial[0]:.6g}" in text and f"{result.radial[-1]:.6g}" in text
    assert f"mean={np.nanmean(result.intensity):.4g}" in text
    assert f"empty={int(np.isnan(result.intensity).sum())}" in text
    assert "error_model=azimuthal" in text


def test_repr_of_a_result_with_no_filled_bin(case):
    # a range beyond the detector's edge: every bin empty
    empty = Integrator(case.geometry, npt=20, backend="python",
                       radial_range=(200.0, 300.0)).integrate(case.raw)
    assert "I: no filled bin" in repr(empty) and "empty=20" in repr(empty)


def test_unpacks_like_pyfai(case, result):
    radial, intensity, sigma = result
    assert radial is result.radial and intensity is result.intensity and sigma is result.sigma
    azimuthal = pytest.importorskip("pyFAI.integrator.azimuthal")
    detectors = pytest.importorskip("pyFAI.detectors")
    g = case.geometry
    ai = azimuthal.AzimuthalIntegrator(
        dist=g.dist, poni1=g.poni1, poni2=g.poni2, rot1=g.rot1, rot2=g.rot2, rot3=g.rot3,
        wavelength=g.wavelength, detector=detectors.detector_factory(g.detector.name))
    logging.getLogger("pyFAI").setLevel(logging.ERROR)
    theirs = ai.integrate1d(case.raw, 100, error_model="poisson")
    assert len(tuple(theirs)) == len(tuple(result)) == 3


def test_save_writes_the_text_output(result, tmp_path):
    path = tmp_path / "pattern.dat"
    result.save(path)
    columns = np.loadtxt(path, comments="#")
    expected = np.column_stack([result.radial, result.intensity, result.sigma])
    np.testing.assert_allclose(columns, expected, rtol=1e-9, equal_nan=True)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert [line for line in header if line.startswith("# operation")] == [
        "# operation: sigma-clip"]
    assert "# thres: 4.0" in header
    assert any(line.startswith("# poni> Distance: ") for line in header)
    assert header[-1] == "# q_nm^-1 intensity sigma"
    table = read_result(path)  # azfilter's own reader (azfilter plot, merge) takes it
    assert table.unit == "q_nm^-1" and table.operation == "sigma-clip"
    np.testing.assert_allclose(table.intensity[0], result.intensity, rtol=1e-9, equal_nan=True)
    result.save(str(tmp_path / "again.xy"))  # str paths too
    assert (tmp_path / "again.xy").is_file()


def test_save_refuses_hdf5_and_unwritable_paths(result, tmp_path):
    with pytest.raises(AzfilterError, match=r"out\.h5: Result\.save writes text"):
        result.save(tmp_path / "out.h5")
    with pytest.raises(AzfilterError, match="cannot write .*missing/x.dat: No such file"):
        result.save(tmp_path / "missing" / "x.dat")


# ---------------------------------------------------------------------------- geometry
def test_integrator_takes_a_poni_path(case, tmp_path):
    poni = tmp_path / "geo.poni"
    save_poni(case.geometry, poni)
    reference = Integrator(case.geometry, npt=200, backend="python").integrate(case.raw)
    for given in (poni, str(poni)):
        integrator = Integrator(given, npt=200, backend="python")
        assert integrator.geometry == case.geometry and integrator.geometry.source == str(poni)
        np.testing.assert_array_equal(integrator.integrate(case.raw).intensity,
                                      reference.intensity)
    with pytest.raises(AzfilterError, match=r"cannot read PONI file .*nowhere\.poni"):
        Integrator(tmp_path / "nowhere.poni")


def test_integrator_takes_a_pyfai_integrator(case, tmp_path):
    pyFAI = pytest.importorskip("pyFAI")
    poni = tmp_path / "geo.poni"
    save_poni(case.geometry, poni)
    ai = pyFAI.load(str(poni))  # a pyFAI AzimuthalIntegrator
    integrator = Integrator(ai, npt=200, backend="python")
    assert integrator.geometry == case.geometry
    assert integrator.geometry.source == f"pyFAI {type(ai).__name__}"
    reference = Integrator(case.geometry, npt=200, backend="python").integrate(case.raw)
    np.testing.assert_array_equal(integrator.integrate(case.raw).intensity, reference.intensity)
    # a generic pyFAI detector, a non-default orientation, no wavelength
    from pyFAI.detectors import Detector, detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    generic = AzimuthalIntegrator(dist=0.1, poni1=0.004, poni2=0.005,
                                  detector=Detector(1e-4, 2e-4, max_shape=(80, 60)))
    geometry = as_geometry(generic)
    assert geometry.detector.shape == (80, 60) and geometry.wavelength is None
    assert (geometry.detector.pixel1, geometry.detector.pixel2) == (1e-4, 2e-4)
    flipped = AzimuthalIntegrator(dist=0.2, wavelength=7e-11,
                                  detector=detector_factory("Pilatus1M", {"orientation": 2}))
    geometry = as_geometry(flipped)
    assert geometry.detector.orientation == 2 and geometry.wavelength == 7e-11
    np.testing.assert_allclose(geometry.array("2th_rad"), flipped.twoThetaArray(), rtol=1e-6)


class _NotAnIntegrator:
    dist = poni1 = poni2 = rot1 = rot2 = rot3 = 0.1
    detector = None


@pytest.mark.parametrize("given, message", [
    (None, "got NoneType"), (42, "got int"), ({"dist": 0.1}, "got dict"),
    (_NotAnIntegrator(), "pyFAI _NotAnIntegrator: cannot read its geometry (it has no detector)"),
])
def test_integrator_refuses_anything_else_in_one_line(given, message):
    with pytest.raises(AzfilterError) as err:
        Integrator(given)
    assert message in str(err.value) and "\n" not in str(err.value)
    if not isinstance(given, _NotAnIntegrator):
        assert str(err.value).startswith(
            "geometry must be an azfilter Geometry, a PONI file path or a pyFAI "
            "AzimuthalIntegrator")


def test_geometry_is_passed_through(case):
    assert as_geometry(case.geometry) is case.geometry
    assert Integrator(case.geometry, npt=10, backend="python").geometry is case.geometry
