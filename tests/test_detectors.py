"""Detector registry: every model against pyFAI 2026.9, name matching, binning, Mar345 sizes,
dummy values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from azfilter.detectors import (
    DETECTORS,
    MAR345_SIZES,
    Detector,
    generic_detector,
    get_detector,
    resolve_name,
)
from azfilter.errors import AzfilterError

pyFAI_detectors = pytest.importorskip("pyFAI.detectors")

MODEL_NAMES = sorted(name for name in DETECTORS if name != "Detector")


def pyfai_detector(name: str, config: dict | None = None):
    return pyFAI_detectors.detector_factory(name, config)


def pyfai_mask(reference) -> np.ndarray:
    mask = reference.mask
    if mask is None:
        return np.zeros(reference.shape, dtype=bool)
    return np.asarray(mask) != 0


def as_json(config: dict) -> dict:
    """Config as it is written into a PONI file (tuples become lists, enums ints)."""
    return json.loads(json.dumps(config))


def assert_same_as_pyfai(ours: Detector, reference) -> None:
    assert ours.shape == tuple(reference.shape)
    assert ours.pixel1 == reference.pixel1
    assert ours.pixel2 == reference.pixel2
    assert ours.orientation == int(reference.orientation)
    if reference.dummy is None:
        assert ours.dummy is None
    else:
        assert ours.dummy == reference.dummy
        assert ours.delta_dummy == (reference.delta_dummy or 0.0)
    mask = ours.mask
    assert mask.dtype == bool and mask.shape == ours.shape
    if reference.mask is None:
        # pyFAI has no mask for this detector; skip comparing up to 92 Mpix of zeros
        assert ours.mask_kind == "none" and not mask[::7, ::5].any()
    else:
        np.testing.assert_array_equal(mask, pyfai_mask(reference))
    assert as_json(ours.get_config()) == as_json(reference.get_config())


# -- every registered model equals pyFAI's class ---------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_matches_pyfai(name):
    ours = get_detector(name)
    assert ours.name == name
    assert_same_as_pyfai(ours, pyfai_detector(name))


@pytest.mark.parametrize(
    "name", [n for n in MODEL_NAMES if DETECTORS[n].binned_pixels is not None]
)
def test_tabulated_binning_modes_match_pyfai(name):
    for _, pixel in DETECTORS[name].binned_pixels:
        config = {"pixel1": pixel, "pixel2": pixel}
        assert_same_as_pyfai(get_detector(name, config), pyfai_detector(name, config))


def test_every_pyfai_alias_of_a_registered_class_resolves_to_it():
    checked = 0
    for alias, cls in pyFAI_detectors.ALL_DETECTORS.items():
        if cls.__name__ in DETECTORS:
            assert resolve_name(alias) == cls.__name__, alias
            checked += 1
    assert checked > 150


def test_pyfai_classes_left_out_are_the_non_flat_or_distorted_ones():
    left_out = {cls.__name__ for cls in pyFAI_detectors.ALL_DETECTORS.values()} - set(DETECTORS)
    for name in left_out:
        cls = getattr(pyFAI_detectors, name)
        assert (
            not cls.IS_FLAT
            or not cls.uniform_pixel
            or cls.HAVE_TAPER
            or hasattr(cls, "module_positions")
        ), name


# -- the tested values of pyfai-algorithms.md section 3.1 ------------------------------------

@pytest.mark.parametrize(
    "name, shape, pixel, masked",
    [
        ("Pilatus1M", (1043, 981), 172e-6, 73_533),
        ("Pilatus2M", (1679, 1475), 172e-6, 197_365),
        ("Pilatus6M", (2527, 2463), 172e-6, 526_101),
        ("Eiger1M", (1065, 1030), 75e-6, 38_110),
        ("Eiger4M", (2167, 2070), 75e-6, 250_330),
        ("Eiger9M", (3269, 3110), 75e-6, 637_030),
        ("Eiger16M", (4371, 4150), 75e-6, 1_198_210),
        ("Eiger2_4M", (2162, 2068), 75e-6, 260_328),
        ("Mar345", (3450, 3450), 100e-6, 2_554_284),
    ],
)
def test_reference_table(name, shape, pixel, masked):
    detector = get_detector(name)
    assert detector.shape == shape
    assert detector.pixel1 == detector.pixel2 == pixel
    assert int(detector.mask.sum()) == masked


def test_pilatus_gap_rows_and_columns():
    mask = get_detector("Pilatus1M").mask
    assert mask[195:212].all() and not mask[194].all() and not mask[212].all()
    assert mask[:, 487:494].all() and not mask[:, 486].all() and not mask[:, 494].all()
    assert not mask[:195, 486].any() and not mask[:195, 494].any()
    assert not mask[:195, :487].any()


def test_cdte_centre_columns():
    # Pilatus CdTe: 3 extra columns [242, 245) per module; Eiger2 CdTe: 2 columns [513, 515).
    extra = get_detector("PilatusCdTe1M").mask & ~get_detector("Pilatus1M").mask
    assert sorted(set(np.nonzero(extra)[1])) == [242, 243, 244, 242 + 494, 243 + 494, 244 + 494]
    extra = get_detector("Eiger2CdTe_4M").mask & ~get_detector("Eiger2_4M").mask
    assert sorted(set(np.nonzero(extra)[1])) == [513, 514, 513 + 1040, 514 + 1040]


def test_mask_is_cached_and_read_only():
    detector = get_detector("Eiger4M")
    assert detector.mask is detector.mask
    with pytest.raises(ValueError):
        detector.mask[0, 0] = True


# -- names -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spelling, canonical",
    [
        ("Pilatus 1M", "Pilatus1M"), ("pilatus1m", "Pilatus1M"), ("PILATUS_1M", "Pilatus1M"),
        ("Pilatus-1M", "Pilatus1M"), ("Pilatus3 6M", "Pilatus6M"), ("PILATUS3 X 2M", "Pilatus2M"),
        ("Pilatus 300K-W", "Pilatus300kw"), ("pilatus300kw", "Pilatus300kw"),
        ("Pilatus CdTe 1M", "PilatusCdTe1M"), ("pilatus_1m_cdte", "PilatusCdTe1M"),
        ("eiger2_4m", "Eiger2_4M"), ("Eiger2 4M", "Eiger2_4M"), ("EIGER2 X 9M", "Eiger2_9M"),
        ("Eiger2 CdTe 1M-W", "Eiger2CdTe_1MW"), ("eiger 16M", "Eiger16M"),
        ("Pilatus4 1M CdTe", "Pilatus4_CdTe_1M"),
        ("mar345", "Mar345"), ("MAR 345", "Mar345"), ("Mar3450", "Mar345"),
        ("Perkin Elmer", "Perkin"), ("PerkinElmer", "Perkin"), ("pixium", "Pixium"),
        ("Lambda 2M", "Lambda2M"), ("lambda_750k", "Lambda750k"), ("Lambda 7.5M", "Lambda7M5"),
        ("MAR 225", "RayonixMx225"), ("detector", "Detector"),
    ],
)
def test_name_variants(spelling, canonical):
    assert resolve_name(spelling) == canonical


def test_unknown_name_lists_close_matches():
    with pytest.raises(AzfilterError) as info:
        get_detector("Pilatus 1K")
    message = str(info.value)
    assert "\n" not in message
    assert "'Pilatus 1K'" in message and "Pilatus1M" in message


def test_unknown_name_without_close_match():
    with pytest.raises(AzfilterError, match="DETECTORS") as info:
        get_detector("Hubble Space Telescope")
    assert "\n" not in str(info.value)


def test_display_name():
    assert get_detector("pilatus1m").display_name == "Pilatus 1M"
    assert get_detector("Eiger2_4M").display_name == "Eiger2 4M"


# -- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_get_config_round_trip(name):
    detector = get_detector(name)
    assert get_detector(name, as_json(detector.get_config())) == detector


def test_config_keys_are_case_insensitive_and_json_strings_accepted():
    detector = get_detector("Pilatus1M", '{"Pixel1": 0.000172, "PIXEL2": 0.000172, '
                                         '"Orientation": 2, "unknown": 1}')
    assert detector.orientation == 2 and detector.shape == (1043, 981)


def test_orientation():
    assert get_detector("Pilatus1M").orientation == 3
    assert get_detector("Pilatus1M", {"orientation": 0}).orientation == 3
    assert get_detector("Pilatus1M", {"orientation": 4}).orientation == 4
    with pytest.raises(AzfilterError, match="orientation"):
        get_detector("Pilatus1M", {"orientation": 5})


def test_float_noise_in_pixel_size_is_not_binning():
    reference = pyfai_detector("Pilatus1M", {"pixel1": 0.00017199999999999998,
                                             "pixel2": 0.00017199999999999998})
    ours = get_detector("Pilatus1M", {"pixel1": 0.00017199999999999998,
                                      "pixel2": 0.00017199999999999998})
    assert_same_as_pyfai(ours, reference)


def test_sensor_is_kept():
    config = {"pixel1": 7.5e-05, "pixel2": 7.5e-05, "orientation": 3,
              "sensor": {"material": "Si", "thickness": 0.00045}}
    detector = get_detector("Eiger4M", config)
    assert detector.get_config() == config
    assert as_json(pyfai_detector("Eiger4M", config).get_config()) == config


def test_max_shape_override_matches_pyfai():
    config = {"max_shape": [600, 1100]}
    assert_same_as_pyfai(get_detector("Eiger1M", config), pyfai_detector("Eiger1M", config))


def test_module_size_override_matches_pyfai():
    config = {"module_size": [100, 200]}
    assert_same_as_pyfai(get_detector("Pilatus1M", config), pyfai_detector("Pilatus1M", config))


def test_distortion_files_are_refused():
    with pytest.raises(AzfilterError, match="splinefile"):
        get_detector("Pilatus1M", {"splineFile": "frelon.spline"})


# -- binning -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, pixel1, pixel2",
    [
        ("Eiger2_4M", 150e-6, 150e-6), ("Eiger2_4M", 150e-6, 75e-6), ("Eiger2_16M", 150e-6, 150e-6),
        ("Eiger2_1MW", 75e-6, 300e-6), ("Lambda2M", 110e-6, 110e-6),
        ("Perkin", 100e-6, 100e-6), ("Perkin", 400e-6, 400e-6), ("Pixium", 154e-6, 154e-6),
        ("Apex2", 240e-6, 240e-6),
    ],
)
def test_binning_matches_pyfai(name, pixel1, pixel2):
    config = {"pixel1": pixel1, "pixel2": pixel2}
    ours = get_detector(name, config)
    assert_same_as_pyfai(ours, pyfai_detector(name, config))
    # the round trip keeps the binning
    assert get_detector(name, as_json(ours.get_config())) == ours


def test_binning_of_an_odd_shape_crops_like_the_detector():
    # pyFAI cannot rebin the 1043x981 mask by 2; the binned mask is "any unbinned pixel masked"
    # over the whole 2x2 blocks.
    ours = get_detector("Pilatus1M", {"pixel1": 344e-6, "pixel2": 344e-6})
    assert ours.shape == (521, 490) and ours.binning == (2, 2)
    full = pyfai_mask(pyfai_detector("Pilatus1M"))[: 521 * 2, : 490 * 2]
    expected = full.reshape(521, 2, 490, 2).any(axis=(1, 3))
    np.testing.assert_array_equal(ours.mask, expected)


def test_binning_keyword():
    ours = get_detector("Eiger2_4M", {"binning": [2, 2]})
    assert ours.shape == (1081, 1034) and ours.pixel1 == 150e-6
    with pytest.raises(AzfilterError, match="contradicts"):
        get_detector("Eiger2_4M", {"binning": 2, "pixel1": 75e-6, "pixel2": 75e-6})


@pytest.mark.parametrize(
    "name, pixel",
    [("Pilatus1M", 250e-6), ("Pilatus1M", 100e-6), ("Eiger4M", 100e-6), ("Pixium", 296e-6),
     ("RayonixMx225", 80e-6)],
)
def test_pixel_that_is_not_a_binning_is_an_error(name, pixel):
    with pytest.raises(AzfilterError, match="pixel1") as info:
        get_detector(name, {"pixel1": pixel, "pixel2": pixel})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", [0, -1e-4, "big", True])
def test_bad_pixel_value(value):
    with pytest.raises(AzfilterError, match="pixel1"):
        get_detector("Detector", {"pixel1": value, "pixel2": 1e-4})


# -- Mar345 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(MAR345_SIZES))
def test_mar345_sizes_follow_the_image_like_pyfai(size):
    ours = get_detector("Mar345").with_shape((size, size))
    reference = pyfai_detector("Mar345")
    assert reference.guess_binning((size, size))
    assert ours.pixel1 == ours.pixel2 == MAR345_SIZES[size]
    assert_same_as_pyfai(ours, reference)
    assert get_detector("Mar345", as_json(ours.get_config())) == ours


def test_mar345_config():
    assert get_detector("mar345").shape == (3450, 3450)
    small = get_detector("Mar345", {"pixel1": 150e-6, "pixel2": 150e-6})
    assert small.shape == (2300, 2300)
    assert_same_as_pyfai(small, pyfai_detector("Mar345", {"pixel1": 150e-6, "pixel2": 150e-6}))
    assert get_detector("Mar345", {"pixel1": 1e-4, "max_shape": [2400, 2400]}).shape == (2400,
                                                                                           2400)
    with pytest.raises(AzfilterError, match="does not fit"):
        get_detector("Mar345", {"pixel1": 1e-4, "pixel2": 1e-4, "max_shape": [2300, 2300]})
    with pytest.raises(AzfilterError, match="neither"):
        get_detector("Mar345", {"pixel1": 2e-4, "pixel2": 2e-4})


def test_mar345_wrong_image_size():
    with pytest.raises(AzfilterError, match="Mar345 plate size"):
        get_detector("Mar345").with_shape((3450, 3000))
    with pytest.raises(AzfilterError, match="Mar345 plate size"):
        get_detector("Mar345").with_shape((1024, 1024))


# -- generic detector and with_shape -----------------------------------------------------------

def test_generic_detector_takes_the_image_shape():
    detector = get_detector("Detector", {"pixel1": 0.000296, "pixel2": 0.000296,
                                         "max_shape": None})
    assert detector.shape is None and detector.dummy is None
    with pytest.raises(AzfilterError, match="with_shape"):
        detector.mask  # noqa: B018
    fitted = detector.with_shape((1441, 1440))
    assert fitted.shape == (1441, 1440) and fitted.pixel1 == 0.000296
    assert not fitted.mask.any() and fitted.mask.shape == (1441, 1440)
    assert fitted.get_config() == {"pixel1": 0.000296, "pixel2": 0.000296, "orientation": 3,
                                   "max_shape": [1441, 1440]}
    assert fitted.with_shape((1441, 1440)) is fitted
    with pytest.raises(AzfilterError, match="1440x1441"):
        fitted.with_shape((1440, 1441))


def test_generic_config_matches_pyfai():
    config = {"pixel1": 5.5e-05, "pixel2": 5.5e-05, "orientation": 3, "max_shape": [256, 256]}
    ours = get_detector("Detector", config)
    assert_same_as_pyfai(ours, pyfai_detector("Detector", config))
    assert ours == generic_detector(5.5e-05, 5.5e-05, (256, 256))
    with pytest.raises(AzfilterError, match="pixel1 and pixel2"):
        get_detector("Detector", {"pixel1": 1e-4})


def test_with_shape_of_a_fixed_detector():
    pilatus = get_detector("Pilatus1M")
    assert pilatus.with_shape((1043, 981)) is pilatus
    with pytest.raises(AzfilterError, match="981x1043 does not match") as info:
        pilatus.with_shape((981, 1043))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, shape", [("Eiger2_4M", (1081, 1034)),
                                         ("RayonixMx225", (6144, 6144)),
                                         ("RayonixMx225", (2048, 2048)),
                                         ("Perkin", (1024, 1024))])
def test_with_shape_guesses_binning_like_pyfai(name, shape):
    reference = pyfai_detector(name)
    assert reference.guess_binning(shape)
    ours = get_detector(name).with_shape(shape)
    assert ours.shape == shape
    assert ours.pixel1 == pytest.approx(reference.pixel1, rel=1e-12)
    assert ours.pixel2 == pytest.approx(reference.pixel2, rel=1e-12)
    np.testing.assert_array_equal(ours.mask, pyfai_mask(reference))


@pytest.mark.slow
def test_pixium_poni_fits_the_lightform_frames(testdata):
    fabio = pytest.importorskip("fabio")
    folder = testdata / "lightform_DLS_I12_pixium_stack"
    frame = fabio.open(str(sorted(folder.glob("pixium_*.tif"))[0])).data
    poni = (folder / "DLS_CeO2_1200mm_pyFAI_2022-01-13.poni").read_text()
    lines = dict(line.split(":", 1) for line in poni.splitlines() if ":" in line)
    detector = get_detector(lines["Detector"].strip(), json.loads(lines["Detector_config"]))
    fitted = detector.with_shape(frame.shape)
    assert fitted.shape == frame.shape == (1441, 1440)
    assert fitted.pixel1 == fitted.pixel2 == 0.000296
    assert not fitted.mask.any()


# -- invalid pixels ----------------------------------------------------------------------------

def test_invalid_pixels_signed_integers():
    pilatus = get_detector("Pilatus1M")
    raw = np.array([[-4, -3, -2, -1, 0, 1, 2**31 - 1]], dtype=np.int32)
    # invalid when |raw - (-2)| <= 1.5, i.e. raw in [-3.5, -0.5], as pyFAI's preprocessing
    np.testing.assert_array_equal(pilatus.invalid_pixels(raw),
                                  [[False, True, True, True, False, False, False]])
    dummy, delta = pyfai_detector("Pilatus1M").get_dummies(raw)
    assert pilatus.dummy_for(raw.dtype) == (float(dummy), float(delta))


def test_invalid_pixels_floats():
    eiger = get_detector("Eiger4M")
    raw = np.array([np.nan, np.inf, -np.inf, -3.5, -3.51, -0.5, -0.49, 0.0, 7.0],
                   dtype=np.float32)
    expected = [True, True, True, True, False, True, False, False, False]
    np.testing.assert_array_equal(eiger.invalid_pixels(raw), expected)
    np.testing.assert_array_equal(eiger.invalid_pixels(raw.astype(np.float64)), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_invalid_pixels_unsigned_sentinel(dtype):
    # -1/-2 cannot occur in unsigned frames; the Eiger flags bad pixels with the all-ones value
    eiger = get_detector("Eiger2_4M")
    top = np.iinfo(dtype).max
    raw = np.array([0, 1, top - 2, top - 1, top], dtype=dtype)
    np.testing.assert_array_equal(eiger.invalid_pixels(raw), [False, False, False, False, True])
    assert eiger.dummy_for(dtype) == (float(top), 0.0)


def test_invalid_pixels_without_dummy():
    detector = generic_detector(1e-4, 1e-4, (2, 3))
    raw = np.array([[-1.0, -2.0, np.nan], [0.0, 65535.0, 1.0]])
    np.testing.assert_array_equal(detector.invalid_pixels(raw),
                                  [[False, False, True], [False, False, False]])
    assert not detector.invalid_pixels(np.array([[-1, -2]], dtype=np.int16)).any()
    assert detector.dummy_for(np.float32) == (None, 0.0)


def test_invalid_pixels_lambda_zero_dummy_as_pyfai():
    # pyFAI's Lambda classes flag 0 (no tolerance) as the dummy value.
    lambda2m = get_detector("Lambda2M")
    raw = np.array([0, 1, 2], dtype=np.uint16)
    np.testing.assert_array_equal(lambda2m.invalid_pixels(raw), [True, False, False])
    np.testing.assert_array_equal(lambda2m.invalid_pixels(raw.astype(np.float32)),
                                  [True, False, False])
