"""Per-geometry constants (static mask, pixel normalisation, dark) and per-pixel rules."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic import default_geometry

from azfilter.detectors import generic_detector, get_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry
from azfilter.preproc import (
    build_pixel_norm,
    build_static_mask,
    describe_source,
    load_pixel_array,
    parse_polarization,
    pixel_constants,
    preprocess,
)


@pytest.fixture(scope="module")
def geometry() -> Geometry:
    """Pilatus 300K: three modules with two 17-row gaps."""
    return default_geometry(get_detector("Pilatus300k"))


# ------------------------------------------------------------------------------ polarization
def test_parse_polarization():
    assert parse_polarization(None) is None
    assert parse_polarization(0.99) == (0.99, 0.0)
    assert parse_polarization((0.9, 0.25)) == (0.9, 0.25)
    assert parse_polarization([-1, 0]) == (-1.0, 0.0)
    assert parse_polarization(np.array([0.5, 1.0])) == (0.5, 1.0)
    for bad in (1.5, -2, "0.9", (0.9, 0.1, 0.2), (0.9,), float("nan"), (0.9, float("inf")),
                True):
        with pytest.raises(AzfilterError, match="polarization"):
            parse_polarization(bad)


# ------------------------------------------------------------------------------ masks
def test_static_mask_is_an_or_of_every_source():
    shape = (2, 3)
    gaps = np.array([[1, 0, 0], [0, 0, 0]], dtype=bool)
    user = np.array([[0, 2, 0], [0, 0, 0]])              # non-zero = masked
    pixel_mask = np.array([[0, 0, 1], [0, 0, 0]], dtype=np.uint32)
    flat = np.array([[1, 1, 1], [0, 1, 1]], dtype=np.float32)       # flat 0 -> masked
    dark = np.array([[0, 0, 0], [0, np.nan, 0]], dtype=np.float32)  # NaN dark -> masked
    static = build_static_mask(gaps, shape, mask=user, pixel_mask=pixel_mask, flat=flat,
                               dark=dark)
    assert static.shape == (6,) and static.dtype == bool
    assert static.tolist() == [True, True, True, True, True, False]
    # a user mask adds to the gaps, it does not replace them
    assert build_static_mask(gaps, shape, mask=np.zeros(shape)).tolist()[0] is True


def test_float_and_negative_masks_and_flats():
    shape = (1, 4)
    static = build_static_mask(None, shape, mask=np.array([[0.0, np.nan, -1.0, 0.0]]))
    assert static.tolist() == [False, True, True, False]
    static = build_static_mask(None, shape, flat=np.array([[1.0, -0.5, np.inf, 2.0]]))
    assert static.tolist() == [False, True, True, False]


def test_load_pixel_array_checks_shape_and_reads_files(tmp_path):
    assert load_pixel_array(None, "mask", (2, 2)) is None
    array = np.arange(4).reshape(2, 2)
    assert load_pixel_array(array, "mask", (2, 2)) is not None
    with pytest.raises(AzfilterError, match=r"mask has shape \(2, 2\), detector D has shape "
                                            r"\(3, 2\)"):
        load_pixel_array(array, "mask", (3, 2), "D")
    with pytest.raises(AzfilterError, match="2-D"):
        load_pixel_array(np.zeros(4), "dark", (2, 2))
    path = tmp_path / "flat.npy"
    np.save(path, array.astype(np.float32))
    np.testing.assert_array_equal(load_pixel_array(path, "flat", (2, 2)), array)
    with pytest.raises(AzfilterError, match="flat file .*flat.npy has shape"):
        load_pixel_array(str(path), "flat", (2, 3))
    with pytest.raises(AzfilterError):
        load_pixel_array(tmp_path / "missing.npy", "mask", (2, 2))
    assert describe_source(path) == str(path)
    assert describe_source(array) == "array"
    assert describe_source(None) is None


# ------------------------------------------------------------------------------ pixel_norm
def test_pixel_norm_product_in_float32(geometry):
    shape = geometry.detector.shape
    rng = np.random.default_rng(0)
    flat = rng.uniform(0.9, 1.1, shape).astype(np.float32)
    static = np.zeros(shape[0] * shape[1], dtype=bool)
    static[:10] = True
    norm = build_pixel_norm(geometry, shape, static, flat=flat, polarization=(0.95, 0.1),
                            solid_angle=True, normalization=2.5)
    expected = (np.float32(2.5) * flat
                * geometry.polarization(0.95, 0.1).astype(np.float32)
                * geometry.solid_angle().astype(np.float32)).ravel()
    expected[:10] = 0
    assert norm.dtype == np.float32 and norm.shape == (shape[0] * shape[1],)
    np.testing.assert_array_equal(norm, expected)
    # terms that are off are 1
    plain = build_pixel_norm(geometry, shape, np.zeros_like(static), solid_angle=False)
    np.testing.assert_array_equal(plain, np.ones_like(plain))
    only_sa = build_pixel_norm(geometry, shape, np.zeros_like(static))
    np.testing.assert_array_equal(only_sa, geometry.solid_angle().astype(np.float32).ravel())


def test_pixel_constants(geometry, tmp_path):
    shape = geometry.detector.shape
    user = np.zeros(shape, dtype=np.uint8)
    user[0, :5] = 1
    mask_file = tmp_path / "mask.npy"
    np.save(mask_file, user)
    dark = np.full(shape, 3.0)
    constants = pixel_constants(geometry, mask=mask_file, dark=dark, polarization=0.99,
                                normalization=2.0)
    gaps = geometry.detector.mask.ravel()
    assert gaps.sum() == 2 * 17 * 487
    expected = gaps | user.ravel().astype(bool)
    np.testing.assert_array_equal(constants.static_mask, expected)
    assert np.all(constants.pixel_norm[expected] == 0)
    assert np.all(constants.pixel_norm[~expected] > 0)
    assert constants.dark.dtype == np.float32 and constants.dark.shape == (user.size,)
    assert np.all(constants.dark[~expected] == 3.0)
    assert constants.shape == tuple(shape)
    for bad in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(AzfilterError, match="normalization"):
            pixel_constants(geometry, normalization=bad)
    with pytest.raises(AzfilterError, match="dark has shape"):
        pixel_constants(geometry, dark=np.zeros((3, 3)))


def test_pixel_constants_needs_a_shape():
    geometry = Geometry(dist=0.1, poni1=0.01, poni2=0.01, wavelength=1e-10,
                        detector=generic_detector(1e-4, 1e-4))
    with pytest.raises(AzfilterError, match="shape unknown"):
        pixel_constants(geometry)


# ------------------------------------------------------------------------------ preprocess
NORM = np.array([1.0, 2.0, 0.0, 1.0, 1.0, 0.5], dtype=np.float32)


def test_preprocess_rules():
    raw = np.array([[10, 0, 7, -2, -1, 8]], dtype=np.int32)
    dark = np.array([1, 1, 1, 1, 1, 2], dtype=np.float32)
    signal, var, norm, valid = preprocess(raw, NORM, dark, dummy=-2.0, delta_dummy=1.5,
                                          error_model="poisson")
    # pixel 2: norm 0 (masked); pixels 3, 4: within 1.5 of the dummy -2
    assert valid.tolist() == [True, True, False, False, False, True]
    assert signal.tolist() == [9, -1, 0, 0, 0, 6]
    assert var.tolist() == [10, 1, 0, 0, 0, 8]      # max(raw, 1), from the raw value
    assert norm.tolist() == [1, 2, 0, 0, 0, 0.5]
    assert all(a.dtype == np.float64 for a in (signal, var, norm))
    _, var, _, _ = preprocess(raw, NORM, dark, -2.0, 1.5, "hybrid")
    assert var.tolist() == [10, 1, 0, 0, 0, 8]
    _, var, _, _ = preprocess(raw, NORM, dark, -2.0, 1.5, "azimuthal")
    assert not var.any()
    variance = np.arange(6.0).reshape(1, 6)
    _, var, _, _ = preprocess(raw, NORM, dark, -2.0, 1.5, "variance", variance)
    assert var.tolist() == [0, 1, 0, 0, 0, 5]


def test_preprocess_without_dummy_and_with_nan():
    raw = np.array([1.0, np.nan, -2.0, np.inf, -np.inf, 4.0])
    _, _, _, valid = preprocess(raw, NORM)
    assert valid.tolist() == [True, False, False, False, False, True]  # pixel 2: norm 0
    _, _, _, valid = preprocess(raw, np.ones(6, dtype=np.float32))
    assert valid.tolist() == [True, False, True, False, False, True]   # -2 is data here


def test_preprocess_errors():
    raw = np.zeros(6)
    with pytest.raises(AzfilterError, match="variance"):
        preprocess(raw, NORM, error_model="variance")
    with pytest.raises(AzfilterError, match="variance has 3"):
        preprocess(raw, NORM, error_model="variance", variance=np.zeros(3))
    with pytest.raises(AzfilterError, match="error model"):
        preprocess(raw, NORM, error_model="poissonian")
    with pytest.raises(AzfilterError, match="image has 5 pixels"):
        preprocess(np.zeros(5), NORM)


def test_geometric_factors_cached_on_disk_give_the_same_pixel_norm(tmp_path, monkeypatch):
    """Polarization and solid angle are stored next to the lookup tables; a fresh geometry
    (a new process) reads them back and the normalisation is bit-identical."""
    from azfilter import preproc
    from azfilter.detectors import get_detector
    from azfilter.geometry import Geometry

    monkeypatch.setenv("AZFILTER_CACHE_DIR", str(tmp_path))

    def geometry():
        return Geometry(dist=0.1, poni1=0.02, poni2=0.03, rot1=0.01, rot2=-0.02, rot3=0.03,
                        wavelength=1e-10, detector=get_detector("Pilatus100k"))

    first = preproc.pixel_constants(geometry(), polarization=0.95, normalization=2.0)
    assert len(list(tmp_path.glob("factors-*.npz"))) == 1

    computed = []
    original = Geometry.polarization

    def counting(self, *args, **kwargs):
        computed.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Geometry, "polarization", counting)
    second = preproc.pixel_constants(geometry(), polarization=0.95, normalization=2.0)
    assert computed == []                                    # read from the cache
    np.testing.assert_array_equal(second.pixel_norm, first.pixel_norm)
    other = preproc.pixel_constants(geometry(), polarization=0.5, normalization=2.0)
    assert computed                                          # another factor: a new entry
    assert not np.array_equal(other.pixel_norm, first.pixel_norm)
    # a damaged entry is recomputed, not trusted
    for path in tmp_path.glob("factors-*.npz"):
        path.write_bytes(b"garbage")
    again = preproc.pixel_constants(geometry(), polarization=0.95, normalization=2.0)
    np.testing.assert_array_equal(again.pixel_norm, first.pixel_norm)
