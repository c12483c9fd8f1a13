"""PONI reading and writing, compared with pyFAI 2026.9's reader on real and synthetic files."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
from conftest import testdata_dir as _testdata_dir

from azfilter.detectors import generic_detector, get_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry
from azfilter.poni import format_poni, load_poni, parse_poni, save_poni

pyFAI = pytest.importorskip("pyFAI")
logging.getLogger("pyFAI").setLevel(logging.CRITICAL)

PONI_FILES = sorted(p.relative_to(_testdata_dir()).as_posix()
                    for p in _testdata_dir().glob("**/*.poni"))


def load_pyfai(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pyFAI.load(str(path))


def assert_matches_pyfai(geometry: Geometry, ai) -> None:
    """Every PONI parameter and the detector description agree exactly with pyFAI's."""
    assert geometry.dist == ai.dist
    assert geometry.poni1 == ai.poni1
    assert geometry.poni2 == ai.poni2
    assert geometry.rot1 == ai.rot1
    assert geometry.rot2 == ai.rot2
    assert geometry.rot3 == ai.rot3
    assert geometry.wavelength == ai._wavelength  # None when absent (ai.wavelength warns)
    det = ai.detector
    assert geometry.detector.name == det.__class__.__name__
    expected_shape = None if det.shape is None else tuple(det.shape)
    assert geometry.detector.shape == expected_shape
    assert geometry.detector.pixel1 == det.pixel1
    assert geometry.detector.pixel2 == det.pixel2
    assert geometry.detector.orientation == (det.orientation.value or 3)


def write(tmp_path: Path, text: str, name: str = "setup.poni") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_testdata_has_poni_files(testdata):
    assert len(list(testdata.glob("**/*.poni"))) >= 10


@pytest.mark.parametrize("relpath", PONI_FILES, ids=[p.split("/")[-1] for p in PONI_FILES])
def test_testdata_poni_matches_pyfai(testdata, relpath):
    path = testdata / relpath
    geometry = load_poni(path)
    assert geometry.source == str(path)
    assert_matches_pyfai(geometry, load_pyfai(path))
    assert load_poni(str(path)) == geometry


@pytest.mark.parametrize("relpath", PONI_FILES, ids=[p.split("/")[-1] for p in PONI_FILES])
def test_testdata_round_trip(testdata, tmp_path, relpath):
    """Written (version 2.1) and read back: the same geometry, also for pyFAI."""
    geometry = load_poni(testdata / relpath)
    out = tmp_path / "out.poni"
    text = save_poni(geometry, out)
    assert out.read_text() == text
    assert parse_poni(text) == geometry
    assert load_poni(out) == geometry
    assert_matches_pyfai(geometry, load_pyfai(out))


def test_appended_calibrations_use_the_last_value_of_each_key(testdata):
    path = testdata / "ssrl_Pilatus300KW_LaB6" / "b_toney_lab6_th3_scan1_0025.poni"
    text = path.read_text()
    last = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            last[key.strip()] = float(value) if key.strip() != "Detector" else value.strip()
    assert text.count("Distance:") == 4
    geometry = load_poni(path)
    assert (geometry.dist, geometry.poni1, geometry.poni2) == (
        last["Distance"], last["Poni1"], last["Poni2"])
    assert (geometry.rot1, geometry.rot2, geometry.rot3) == (
        last["Rot1"], last["Rot2"], last["Rot3"])
    assert geometry.wavelength == last["Wavelength"]
    # a key present only in an earlier block still counts
    two_blocks = "Distance: 0.1\nPoni1: 0.01\nPoni2: 0.02\nWavelength: 1e-10\n" \
                 "PixelSize1: 1e-4\nPixelSize2: 1e-4\nDistance: 0.2\nPoni1: 0.03\n"
    geometry = parse_poni(two_blocks)
    assert (geometry.dist, geometry.poni1, geometry.poni2, geometry.wavelength) == (
        0.2, 0.03, 0.02, 1e-10)


SYNTAX_CASES = {
    # v1 without detector: generic detector from PixelSize1/2, no shape; SplineFile None
    "v1_generic": (
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis\n"
        "PixelSize1: 0.000172\nPixelSize2: 0.000150\nDistance: 1.58323111834\n"
        "Poni1: 0.0334170169115\nPoni2: 0.0412277798782\nRot1: 0.00648735642526\n"
        "Rot2: 0.00755810191106\nRot3: 4.12987220385e-08\nSplineFile: None\n"
    ),
    # Mar3450.poni style: no space after the colon, upper/lower case keys, "dist", comments,
    # a line without a colon, CRLF line ends, spaces around the key
    "v1_syntax": (
        "# comment: with a colon\r\nthis line has no colon\r\n"
        "PIXELSIZE1:0.0001\r\n  pixelsize2 :0.0001\r\ndist:0.1\r\npOnI1:0.17\r\n"
        "Poni2:0.18\r\nrot1:0.01\r\nROT2:-0.02\r\nRot3:0.0\r\nWavelength:0.3738e-10\r\n"
    ),
    # v1 with a named detector and its pixel size (the SSRL files)
    "v1_named": (
        "Detector: Pilatus300kw\nPixelSize1: 0.000172\nPixelSize2: 0.000172\n"
        "Distance: 0.9\nPoni1: 0.19\nPoni2: 0.24\nRot1: 0.085\nRot2: 0.005\nRot3: 4.8e-06\n"
        "Wavelength: 8.856e-11\n"
    ),
    # v1 naming the generic detector
    "v1_detector_named_generic": (
        "Detector: Detector\nPixelSize1: 5e-05\nPixelSize2: 6e-05\nDistance: 0.1\n"
        "Poni1: 0.01\nPoni2: 0.02\nRot1: 0\nRot2: 0\nRot3: 0\n"
    ),
    # v1 named detector, 2x2 binned by its pixel size
    "v1_binned": (
        "Detector: Pilatus1M\nPixelSize1: 0.000344\nPixelSize2: 0.000344\n"
        "Distance: 0.9\nPoni1: 0.09\nPoni2: 0.08\nRot1: 0\nRot2: 0\nRot3: 0\n"
    ),
    # v2: no orientation in the config
    "v2": (
        "poni_version: 2\nDetector: Eiger4M\nDetector_config: {\"pixel1\": 7.5e-05, "
        "\"pixel2\": 7.5e-05}\nDistance: 0.2\nPoni1: 0.08\nPoni2: 0.07\nRot1: 0.01\n"
        "Rot2: 0.02\nRot3: 0.03\nWavelength: 1e-10\n"
    ),
    # v2 generic with max_shape null (Dioptas)
    "v2_generic_null_shape": (
        "poni_version: 2\nDetector: Detector\nDetector_config: {\"pixel1\": 5.5e-05, "
        "\"pixel2\": 5.5e-05, \"max_shape\": null}\nDistance: 0.3\nPoni1: 0.04\nPoni2: 0.14\n"
        "Rot1: 0.007\nRot2: 0.001\nRot3: 1.9e-08\nWavelength: 4.836e-11\n"
    ),
    # v2.1, every orientation, with a generic detector of known shape
    **{
        f"v2.1_orientation{o}": (
            "poni_version: 2.1\nDetector: Detector\nDetector_config: {\"pixel1\": 5.5e-05, "
            f"\"pixel2\": 6e-05, \"orientation\": {o}, \"max_shape\": [256, 512]}}\n"
            "Distance: 0.1\nPoni1: 0.004\nPoni2: 0.005\nRot1: 0.1\nRot2: 0.2\nRot3: 0.3\n"
            "Wavelength: 1e-10\n"
        )
        for o in (1, 2, 3, 4)
    },
    # v2.1 named detector, case-insensitive name with a space, empty config
    "v2.1_alias": (
        "poni_version: 2.1\nDetector: Pilatus 1M\nDetector_config: {}\nDistance: 0.3\n"
        "Poni1: 0.09\nPoni2: 0.08\nRot1: 0\nRot2: 0\nRot3: 0\nWavelength: 1e-10\n"
    ),
    # v3 with a sensor and parallax off
    "v3": (
        "poni_version: 3\nDetector: Eiger4M\nDetector_config: {\"pixel1\": 7.5e-05, "
        "\"pixel2\": 7.5e-05, \"orientation\": 3, \"sensor\": {\"material\": \"Si\", "
        "\"thickness\": 0.00045}}\nDistance: 0.1\nPoni1: 0.08\nPoni2: 0.07\nRot1: 0.0\n"
        "Rot2: 0.0\nRot3: 0.0\nWavelength: 1e-10\nParallax: False\n"
    ),
}


@pytest.mark.parametrize("name", list(SYNTAX_CASES))
def test_syntax_and_versions_match_pyfai(tmp_path, name):
    path = write(tmp_path, SYNTAX_CASES[name], f"{name}.poni")
    geometry = load_poni(path)
    ai = load_pyfai(path)
    assert_matches_pyfai(geometry, ai)
    # and what we write reads back the same, here and in pyFAI
    out = tmp_path / "written.poni"
    save_poni(geometry, out)
    assert load_poni(out) == geometry
    assert_matches_pyfai(geometry, load_pyfai(out))


def test_detector_details():
    geometry = parse_poni(SYNTAX_CASES["v1_binned"])
    assert geometry.detector.shape == (521, 490)
    assert geometry.wavelength is None
    geometry = parse_poni(SYNTAX_CASES["v1_syntax"])
    assert geometry.wavelength == 0.3738e-10
    assert geometry.dist == 0.1 and geometry.rot2 == -0.02
    geometry = parse_poni(SYNTAX_CASES["v3"])
    assert geometry.detector.sensor == {"material": "Si", "thickness": 0.00045}
    assert geometry.detector.orientation == 3


@pytest.mark.parametrize("version", [1, 2, 2.1, 3])
def test_write_each_version(tmp_path, version):
    geometry = Geometry(0.1 + 0.2, 1 / 3, -2 / 7, 1e-17, -0.123456789012345678, 3.0,
                        1.0 / 7e10, get_detector("Eiger2_4M"))
    path = tmp_path / f"v{version}.poni"
    text = save_poni(geometry, path, version=version)
    assert f"poni_version: {version}\n" in text
    back = load_poni(path)
    assert back == geometry  # every float exactly (repr precision)
    assert back.dist == 0.1 + 0.2 and back.wavelength == 1.0 / 7e10
    ai = load_pyfai(path)
    assert_matches_pyfai(geometry, ai)
    if version >= 2:
        assert "Detector_config: {" in text
    if version == 3:
        assert "Parallax: False" in text


@pytest.mark.parametrize("version", [1, 2, 2.1, 3])
def test_write_generic_detector(version):
    geometry = Geometry(0.2, 0.01, 0.02, 0.0, 0.0, 0.0, None,
                        generic_detector(55e-6, 66e-6, (300, 400)))
    back = parse_poni(format_poni(geometry, version=version))
    if version == 1:
        # version 1 has no place for the shape: it comes from the image again
        assert back.detector.shape is None
        assert back == Geometry(0.2, 0.01, 0.02, 0.0, 0.0, 0.0, None,
                                generic_detector(55e-6, 66e-6))
    else:
        assert back == geometry
    assert back.wavelength is None


def test_versions_without_orientation_refuse_other_orientations():
    geometry = Geometry(0.2, 0.01, 0.02, detector=get_detector("Pilatus1M", {"orientation": 2}))
    for version in (1, 2):
        with pytest.raises(AzfilterError, match="orientation 2"):
            format_poni(geometry, version=version)
    assert parse_poni(format_poni(geometry, version=3)) == geometry
    with pytest.raises(AzfilterError, match="version"):
        format_poni(geometry, version=4)


def test_write_is_atomic_and_leaves_nothing_behind(tmp_path):
    geometry = Geometry(0.2, 0.01, 0.02, detector=get_detector("Pilatus1M"))
    path = tmp_path / "setup.poni"
    path.write_text("old content")
    save_poni(geometry, path)
    assert load_poni(path) == geometry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["setup.poni"]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode & 0o044, f"written file is {oct(mode)}: not readable by the group/others"
    save_poni(geometry, str(path), version=1)  # str paths too
    assert "poni_version: 1\n" in path.read_text()


def test_write_to_a_missing_folder_is_an_azfilter_error(tmp_path):
    geometry = Geometry(0.2, 0.01, 0.02, detector=get_detector("Pilatus1M"))
    target = tmp_path / "no" / "such" / "dir" / "x.poni"
    with pytest.raises(AzfilterError, match="cannot write PONI file .*x.poni"):
        save_poni(geometry, target)


GOOD = {
    "Detector": "Pilatus1M", "Distance": "0.3", "Poni1": "0.09", "Poni2": "0.08",
    "Rot1": "0.01", "Rot2": "0.02", "Rot3": "0.03", "Wavelength": "1e-10",
}


def text_with(**changes: str | None) -> str:
    """A valid v2.1 PONI with some keys changed (None removes the key)."""
    values = {"poni_version": "2.1", **GOOD,
              "Detector_config": '{"pixel1": 0.000172, "pixel2": 0.000172, "orientation": 3}'}
    values.update(changes)
    return "".join(f"{key}: {value}\n" for key, value in values.items() if value is not None)


BAD_CASES = {
    # name: (text, words the one-line message must contain besides the file name)
    "missing_distance": (text_with(Distance=None), ["Distance"]),
    "non_numeric_distance": (text_with(Distance="1.5 m"), ["Distance", "'1.5 m'"]),
    "negative_distance": (text_with(Distance="-0.2"), ["Distance"]),
    "nan_distance": (text_with(Distance="nan"), ["Distance"]),
    "missing_poni1": (text_with(Poni1=None), ["Poni1"]),
    "non_numeric_poni2": (text_with(Poni2="0.0.1"), ["Poni2"]),
    "non_numeric_rot3": (text_with(Rot3="zero"), ["Rot3"]),
    "non_numeric_wavelength": (text_with(Wavelength="1 A"), ["Wavelength"]),
    "unknown_detector": (text_with(Detector="Pilatus7M"), ["Detector", "Pilatus7M"]),
    "missing_detector_v2": (text_with(Detector=None), ["Detector"]),
    "bad_json": (text_with(Detector_config='{"pixel1": 0.000172,'), ["Detector_config", "JSON"]),
    "json_not_object": (text_with(Detector_config="[1, 2]"), ["Detector_config"]),
    "bad_orientation": (
        text_with(Detector_config='{"orientation": 7}'), ["Detector_config", "orientation"]),
    "bad_pixel_size": (
        text_with(Detector_config='{"pixel1": "big"}'), ["Detector", "pixel1"]),
    "spline_in_config": (
        text_with(Detector="Detector",
                  Detector_config='{"pixel1": 1e-4, "pixel2": 1e-4, "splineFile": "d.spline"}'),
        ["Detector_config", "spline distortion not supported"]),
    "version_too_new": (text_with(poni_version="4"), ["poni_version", "'4'"]),
    "version_not_a_number": (text_with(poni_version="two"), ["poni_version"]),
    "parallax_on": (text_with(poni_version="3", Parallax="True"), ["Parallax", "not supported"]),
    "v1_spline_file": (
        "PixelSize1: 1e-4\nPixelSize2: 1e-4\nDistance: 0.1\nPoni1: 0\nPoni2: 0\n"
        "SplineFile: /data/frelon.spline\n",
        ["SplineFile", "spline distortion not supported"]),
    "v1_no_pixel_size": (
        "Distance: 0.1\nPoni1: 0\nPoni2: 0\nRot1: 0\n", ["PixelSize1"]),
    "v1_bad_pixel_size": (
        "PixelSize1: 1e-4\nPixelSize2: abc\nDistance: 0.1\nPoni1: 0\nPoni2: 0\n",
        ["PixelSize2", "'abc'"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gives_one_line_error_naming_file_and_key(tmp_path, case):
    text, words = BAD_CASES[case]
    path = write(tmp_path, text, f"bad_{case}.poni")
    with pytest.raises(AzfilterError) as err:
        load_poni(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    # raised "from None": a user sees this line, not a chained traceback
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_parse_poni_names_its_source():
    with pytest.raises(AzfilterError, match=r"^beamline\.poni: no Distance"):
        parse_poni(text_with(Distance=None), source="beamline.poni")
    with pytest.raises(AzfilterError, match=r"^<string>: "):
        parse_poni("")


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_unreadable_file(tmp_path, kind):
    path = tmp_path / "setup.poni"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(AzfilterError) as err:
        load_poni(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert err.value.__suppress_context__


def test_pyfai_written_file_reads_back(tmp_path):
    """A PONI written by pyFAI 2026.9 itself (with its calibration-date comment) reads the same."""
    ai = pyFAI.integrator.azimuthal.AzimuthalIntegrator(
        dist=0.1234, poni1=0.05, poni2=0.06, rot1=0.01, rot2=-0.02, rot3=0.3,
        wavelength=0.8e-10,
        detector=pyFAI.detector_factory("Eiger2_4M", {"orientation": 4}))
    path = tmp_path / "pyfai.poni"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ai.save(str(path))
    geometry = load_poni(path)
    assert_matches_pyfai(geometry, ai)
    assert geometry.detector.orientation == 4
