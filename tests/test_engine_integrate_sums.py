"""integrate's compiled sums (kernels/azf_integrate.h) bit for bit, on every path.

The poisson, hybrid and variance models sum each bin in one pass, two entries at a time:
entry ``start + m`` of a row goes to partial sums ``m % 2``, each partial sum adds its entries
in row order, and the two are added at the end; invalid entries (norm 0, non-finite or dummy
pixel) add nothing. :func:`sequential_sums` spells that order out in numpy, so these tests
compare the kernel with it exactly (``assert_array_equal``), on tables with and without
coefficients, with and without dark current, every frame dtype the kernels read, rows of
every parity and length (empty, one entry, longer than the prefetch distance) and the end of
the table (where the prefetching stops). They also compare the Cython engine with the numpy
reference engine on the contract's full-split table to 1e-12.

With the table's row weights (``_engine.integrate_weights``: W, W2 and N of each row when all
its pixels are valid, which the engine passes), rows whose pixels are all valid sum only S and
V, the others everything: the same sums bit for bit, tested both ways.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_contract import FIELDS, dummy_for, frame, make_case

from azfilter.backends.python import PythonEngine

_engine = pytest.importorskip("azfilter._engine", reason="compiled extension not built")
from azfilter.backends.cython import CythonEngine  # noqa: E402

RAW_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
MODELS = ("poisson", "hybrid", "variance")
#: the prefetch distance of the kernels (entries), to size rows around it
PREFETCH_AHEAD = 128


def sequential_sums(raw, indptr, indices, coefs, norm, dark, variance, dummy, delta, model):
    """S, V, W, W2, N per row in the kernels' order (see the module docstring)."""
    v = raw[indices].astype(np.float64)
    n = norm.astype(np.float64)
    with np.errstate(invalid="ignore"):
        valid = (n != 0) & np.isfinite(v)
        if dummy is not None:
            valid &= ~(np.abs(v - dummy) <= delta)
        s = v - dark.astype(np.float64) if dark is not None else v
        var = (np.where(v > 1.0, v, 1.0) if model != "variance"
               else variance[indices].astype(np.float64))
        c = coefs.astype(np.float64) if coefs is not None else np.ones_like(n)
        w = c * n
        terms = np.stack([c * s, c * c * var, w, w * w, c])
    terms[:, ~valid] = 0.0
    npt = indptr.size - 1
    out = np.zeros((5, npt))
    for k in range(npt):
        row = terms[:, indptr[k]:indptr[k + 1]]
        lane0 = np.cumsum(row[:, 0::2], axis=1)[:, -1] if row.shape[1] > 0 else np.zeros(5)
        lane1 = np.cumsum(row[:, 1::2], axis=1)[:, -1] if row.shape[1] > 1 else np.zeros(5)
        out[:, k] = lane0 + lane1
    return out


def random_table(rng, n_pixels: int, split: bool):
    """Rows of lengths 0 to 7, around the prefetch distance and longer (odd and even), the
    last rows short so that the table ends within the prefetch distance; each row its own
    pixels, increasing; norm 0 in some entries of rows 0, 3, 6, ...; coefficients in (0, 1]
    when ``split``. Returns the table and the pixels of rows 1, 4, 7, ... (where
    :func:`random_frame` puts the invalid pixels: rows 2, 5, 8, ... are all valid)."""
    lengths = [0, 1, 2, 3, 4, 5, 6, 7, 0, PREFETCH_AHEAD - 1, PREFETCH_AHEAD,
               PREFETCH_AHEAD + 1, 2 * PREFETCH_AHEAD + 3, 600, 601, 9, 1, 0, 3, 2, 5]
    indptr = np.cumsum([0, *lengths]).astype(np.int64)
    pixels = rng.permutation(n_pixels)[:indptr[-1]]
    rows = [np.sort(pixels[indptr[k]:indptr[k + 1]]) for k in range(len(lengths))]
    indices = np.concatenate(rows).astype(np.int32)
    nnz = indices.size
    norm = rng.uniform(0.5, 1.5, nnz).astype(np.float32)
    row_of = np.repeat(np.arange(len(lengths)), lengths)
    norm[(row_of % 3 == 0) & (rng.random(nnz) < 0.1)] = 0.0
    coefs = rng.uniform(0.01, 1.0, nnz).astype(np.float32) if split else None
    dark = rng.uniform(-2.0, 5.0, nnz).astype(np.float32)
    return indptr, indices, coefs, norm, dark, indices[row_of % 3 == 1]


def random_frame(rng, n_pixels: int, dtype: str, dummy: float,
                 invalid_pixels: np.ndarray) -> np.ndarray:
    """Counts around 0..3000 (many at 0 and 1, where poisson's max(raw, 1) switches) and,
    among ``invalid_pixels``, dummy pixels and (float frames) NaN and infinities; fractions in
    float frames."""
    dtype = np.dtype(dtype)
    values = rng.poisson(rng.choice([0.5, 3.0, 40.0, 2500.0], n_pixels)).astype(np.float64)
    bad = rng.permutation(invalid_pixels)
    values[bad[:len(bad) // 6]] = dummy
    if dtype.kind == "f":
        values += rng.choice([0.0, 0.25, -0.5], n_pixels)
        values[bad[-12:]] = np.nan
        values[bad[-16:-12]] = np.inf
        values[bad[-20:-16]] = -np.inf
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info is not None:
        values = np.clip(values, info.min, info.max)
    return values.astype(dtype)


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("with_dark", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_integrate_sums_in_the_kernel_order(dtype, split, with_dark, model, threads, weights):
    """The kernel's sums equal the sequential two-lane sums exactly (counts included), with
    the table's row weights (rows with every pixel valid sum S and V only) or without."""
    rng = np.random.default_rng([RAW_DTYPES.index(dtype), split, with_dark,
                                 MODELS.index(model)])
    n_pixels = 3000
    dummy = float(np.iinfo(dtype).max) if np.dtype(dtype).kind == "u" else -2.0
    delta = 0.5
    indptr, indices, coefs, norm, dark, invalid = random_table(rng, n_pixels, split)
    dark = dark if with_dark else None
    variance = rng.uniform(0.5, 400.0, n_pixels).astype(np.float32)
    raw = random_frame(rng, n_pixels, dtype, dummy, invalid)
    row_weights = _engine.integrate_weights(indptr, indices, coefs, norm) if weights else None
    got = _engine.integrate(raw, indptr, indices, coefs, norm, dark,
                            variance if model == "variance" else None, dummy, delta, model,
                            threads, row_weights=row_weights)
    expected = sequential_sums(raw, indptr, indices, coefs, norm, dark, variance, dummy,
                               delta, model)
    np.testing.assert_array_equal(got, expected)
    assert got[4].sum() > 0   # the case has valid entries


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("dtype", ["int32", "float32"])
@pytest.mark.parametrize("dummy, delta", [(None, 0.0), (3.0, 0.0), (2.5, 0.5), (1e30, 1.0)])
def test_integrate_sums_with_each_dummy_rule(dtype, dummy, delta, weights):
    """No dummy, a single value, a range, a value no pixel has: same exact sums."""
    rng = np.random.default_rng(5)
    n_pixels = 2000
    indptr, indices, coefs, norm, _, invalid = random_table(rng, n_pixels, True)
    raw = random_frame(rng, n_pixels, dtype, 3.0, invalid)
    row_weights = _engine.integrate_weights(indptr, indices, coefs, norm) if weights else None
    got = _engine.integrate(raw, indptr, indices, coefs, norm, None, None, dummy, delta,
                            "poisson", 1, row_weights=row_weights)
    expected = sequential_sums(raw, indptr, indices, coefs, norm, None, None, dummy, delta,
                               "poisson")
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("split", [False, True])
def test_integrate_weights_are_the_all_valid_sums(split):
    """W, W2, N of every row as integrate sums them when every pixel is valid; NaN in the
    rows with an entry of norm 0, and nowhere else."""
    rng = np.random.default_rng(3)
    indptr, indices, coefs, norm, _, _ = random_table(rng, 3000, split)
    weights = _engine.integrate_weights(indptr, indices, coefs, norm)
    all_valid = sequential_sums(np.ones(3000, dtype=np.float32), indptr, indices, coefs, norm,
                                None, None, None, 0.0, "poisson")[2:]
    zero_rows = np.array([np.any(norm[indptr[k]:indptr[k + 1]] == 0)
                          for k in range(indptr.size - 1)])
    assert zero_rows.any() and not zero_rows.all()
    assert np.array_equal(np.isnan(weights[0]), zero_rows)
    np.testing.assert_array_equal(weights[:, ~zero_rows], all_valid[:, ~zero_rows])


def test_integrate_row_weights_shape_is_checked():
    rng = np.random.default_rng(4)
    indptr, indices, coefs, norm, _, _ = random_table(rng, 3000, True)
    raw = np.ones(3000, dtype=np.float32)
    with pytest.raises(ValueError, match="row_weights"):
        _engine.integrate(raw, indptr, indices, coefs, norm, None, None, None, 0.0, "poisson",
                          1, row_weights=np.zeros((3, indptr.size)))


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.mark.parametrize("model", ["poisson", "hybrid", "variance", "azimuthal"])
@pytest.mark.parametrize("with_dark", [False, True])
@pytest.mark.parametrize("dtype", ["uint32", "int32", "float32"])
def test_full_split_integrate_agrees_with_the_reference(case, dtype, with_dark, model):
    """The Cython engine on the contract's full-split table equals the numpy reference
    engine to 1e-12 (1e-12 of the largest value near zero), counts to 1e-12 too."""
    table = case.tables["full"]
    dark = case.dark if with_dark else None
    dummy, delta = dummy_for(dtype)
    raw = frame(case, dtype)
    variance = case.variance if model == "variance" else None
    got = CythonEngine(table, case.pixel_norm, dark, dummy, delta).integrate(raw, model,
                                                                             variance)
    expected = PythonEngine(table, case.pixel_norm, dark, dummy, delta).integrate(
        raw, model, variance)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        floor = 1e-12 * max(float(np.nanmax(np.abs(b), initial=0.0)), 1e-300)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=floor, err_msg=name)
    assert got.count.sum() > 0
