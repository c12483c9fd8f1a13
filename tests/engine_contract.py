"""The engine contract: checks every engine (python, cython, opencl) must pass.

One small synthetic problem (:func:`make_case`: a 72x90 generic detector, 60 bins, a module gap,
a masked ring that leaves bins empty, a bin whose pixels are all dummies, Bragg spots, NaN)
and check functions that take an engine *factory*, so that ``tests/test_engine_contract.py``
runs the same checks on each backend (in the spirit of numcodecs' shared codec checks):

- :func:`check_agreement`: each operation and error model equals the numpy reference
  (:class:`~azfilter.backends.python.PythonEngine`) to ``rtol``, in every frame dtype, with
  and without dark current and dummy value; for sigma_clip and medfilt the outlier
  statistics too (the counts exactly);
- :func:`check_outliers`: the outlier statistics at several pick thresholds, through
  process_many as well, equal the reference's; the counts add up (available >= kept);
- :func:`check_empty_bins`: bins without pixels, or whose pixels are all invalid, have zero
  sums;
- :func:`check_masks`: statically masked pixels (``pixel_norm == 0``) never count, whatever
  their value;
- :func:`check_dummies`: dummy pixels (within ``delta_dummy``) and NaN never count;
- :func:`check_process_many`: results come in input order with their tags and equal the
  single-frame calls; a bad frame gives its exception in its place and the stream goes on.

A factory is ``factory(table, pixel_norm, dark, dummy, delta_dummy) -> engine``.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from azfilter.backends import BinSums, OutlierSums
from azfilter.backends.python import PythonEngine
from azfilter.binning import build_csr
from azfilter.detectors import generic_detector
from azfilter.errors import AzfilterError
from azfilter.geometry import Geometry

FIELDS = ("signal", "variance", "normalization", "normalization2", "count")
ERROR_MODELS = ("poisson", "azimuthal", "hybrid", "variance")
#: the frame dtypes every engine must read (detectors write these)
DTYPES = ("uint16", "uint32", "int32", "float32", "float64")
SPLITS = ("no", "full")
SHAPE = (72, 90)
NPT = 60
DUMMY, DELTA_DUMMY = -2.0, 1.5

Factory = Callable[[Any, np.ndarray, np.ndarray | None, float | None, float], Any]


@dataclass
class Case:
    """The contract's synthetic problem."""

    tables: dict            # split -> binning.CSR
    pixel_norm: np.ndarray  # float32, flat; 0 on the masked pixels
    mask: np.ndarray        # bool, flat: the static mask
    dark: np.ndarray        # float32, flat
    variance: np.ndarray    # float32, (72, 90)
    counts: np.ndarray      # float64 frame: counts, -1/-2 dummies, NaN
    dead_bin: int           # a no-split bin whose pixels are all dummies


def make_case() -> Case:
    """Build the contract's problem (deterministic; a fraction of a second)."""
    rng = np.random.default_rng(7)
    detector = generic_detector(172e-6, 172e-6, SHAPE)
    geometry = Geometry(dist=0.05, poni1=0.004, poni2=0.006, rot1=0.02, wavelength=1e-10,
                        detector=detector)
    q = geometry.center_array("q")
    mask = np.zeros(SHAPE, dtype=bool)
    mask[30:34, :] = True                       # a module gap
    q_lo, q_hi = q.min(), q.max()
    # a ring three bins wide: bins without any pixel in the middle of the range
    mask |= (q > q_lo + 0.50 * (q_hi - q_lo)) & (q < q_lo + 0.55 * (q_hi - q_lo))
    tables = {split: build_csr(geometry, "q_nm^-1", NPT, split, mask, cache=False)
              for split in SPLITS}
    pixel_norm = (geometry.solid_angle() * geometry.polarization(0.95)).astype(np.float32)
    pixel_norm *= rng.uniform(0.8, 1.2, SHAPE).astype(np.float32)  # a flat field
    pixel_norm[mask] = 0
    pixel_norm = pixel_norm.ravel()

    counts = rng.poisson(200 * np.exp(-q / 20) * (1 + np.cos(q) ** 2)
                         * pixel_norm.reshape(SHAPE)).astype(np.float64)
    flat = counts.reshape(-1)
    n = flat.size
    flat[rng.choice(n, 40, replace=False)] += rng.uniform(300, 2000, 40)   # spots
    flat[rng.choice(n, 4, replace=False)] = 250.0                          # hot pixels
    flat[rng.choice(n, 60, replace=False)] = -1.0                          # dummies
    flat[rng.choice(n, 20, replace=False)] = -2.0
    flat[rng.choice(n, 15, replace=False)] = np.nan                        # float frames only
    np.clip(counts, -2, 250, out=counts)
    nosplit = tables["no"]
    filled = np.flatnonzero(np.diff(nosplit.indptr) > 3)
    dead_bin = int(filled[len(filled) // 2])
    flat[nosplit.indices[nosplit.indptr[dead_bin]:nosplit.indptr[dead_bin + 1]]] = -2.0
    assert np.any(np.diff(nosplit.indptr) == 0), "the contract needs empty bins"
    return Case(tables=tables, pixel_norm=pixel_norm, mask=mask.ravel(),
                dark=rng.uniform(0, 3, n).astype(np.float32),
                variance=rng.uniform(1, 300, SHAPE).astype(np.float32),
                counts=counts, dead_bin=dead_bin)


def frame(case: Case, dtype: str) -> np.ndarray:
    """The case's frame in ``dtype``: NaN become -1 in integer frames, and unsigned frames
    mark every dummy with their largest value (as Dectris detectors do)."""
    values = case.counts
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        values = np.where(np.isnan(values), -1.0, values)
        if dtype.kind == "u":
            values = np.where(values < 0, np.iinfo(dtype).max, values)
    return values.astype(dtype)


def dummy_for(dtype: str) -> tuple[float, float]:
    """The dummy value and tolerance of ``dtype`` (all ones for unsigned frames)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u":
        return float(np.iinfo(dtype).max), 0.5
    return DUMMY, DELTA_DUMMY


def variance_for(case: Case, model: str) -> np.ndarray | None:
    return case.variance if model == "variance" else None


def assert_sums_close(got: BinSums, expected: BinSums, rtol: float, what: str,
                      exact_count: bool = False) -> None:
    """Every sum equal to ``rtol`` relative (a 1e-12 floor of the largest value absorbs the
    rounding around exact zeros); counts exactly when asked."""
    assert isinstance(got, BinSums) and got.npt == expected.npt, what
    for name in FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == np.float64 and a.shape == b.shape, f"{what}: {name}"
        floor = 1e-12 * max(float(np.nanmax(np.abs(b), initial=0.0)), 1e-300)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=floor, err_msg=f"{what}: {name}")
    if exact_count:
        np.testing.assert_array_equal(got.count, expected.count, err_msg=f"{what}: count")


def assert_outliers_close(got: BinSums, expected: BinSums, rtol: float, what: str) -> None:
    """The outlier statistics: counts exactly, rejected_sum and max_sigma to ``rtol`` (NaN
    where the reference has NaN)."""
    a, b = got.outliers, expected.outliers
    assert isinstance(a, OutlierSums) and isinstance(b, OutlierSums), f"{what}: outliers"
    assert a.pick == b.pick, f"{what}: pick"
    for name in ("available", "picked"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name),
                                      err_msg=f"{what}: outliers.{name}")
        assert getattr(a, name).dtype == np.int64, f"{what}: {name} dtype"
    floor = 1e-12 * max(float(np.nanmax(np.abs(b.rejected_sum), initial=0.0)), 1e-300)
    np.testing.assert_allclose(a.rejected_sum, b.rejected_sum, rtol=rtol, atol=floor,
                               err_msg=f"{what}: outliers.rejected_sum")
    np.testing.assert_allclose(a.max_sigma, b.max_sigma, rtol=rtol, atol=1e-9,
                               err_msg=f"{what}: outliers.max_sigma")


def run(engine: Any, operation: str, raw: np.ndarray, model: str,
        variance: np.ndarray | None, pick: float | None = None, **params: Any) -> BinSums:
    """One single-frame call of ``operation`` (``pick``: the engine's default when None)."""
    extra = {} if pick is None else {"pick": pick}
    if operation == "integrate":
        return engine.integrate(raw, model, variance)
    if operation == "sigma_clip":
        return engine.sigma_clip(raw, params["thres"], params["max_iter"], model, variance,
                                 **extra)
    return engine.medfilt(raw, params["quant_min"], params["quant_max"], model, variance,
                          **extra)


#: the parameters each operation is checked with (thres 0 is pure Chauvenet; max_iter 0
#: gives the unclipped sums; the medfilt extremes are exact ties at the total weight)
OPERATION_CASES: dict[str, tuple[dict[str, float], ...]] = {
    "integrate": ({},),
    "sigma_clip": ({"thres": 3.0, "max_iter": 5}, {"thres": 0.0, "max_iter": 3},
                   {"thres": 5.0, "max_iter": 0}),
    "medfilt": ({"quant_min": 0.4, "quant_max": 0.6}, {"quant_min": 0.5, "quant_max": 0.5},
                {"quant_min": 0.0, "quant_max": 1.0}),
}


def check_agreement(factory: Factory, case: Case, operation: str, split: str, dtype: str,
                    rtol: float = 1e-6) -> None:
    """Every error model and parameter set of ``operation`` equals the reference, without
    and with dark current, without and with the dummy value."""
    raw = frame(case, dtype)
    table = case.tables[split]
    # counts of sigma_clip without splitting and of medfilt are integers: exactly equal
    exact = operation == "medfilt" or (operation == "sigma_clip" and split == "no")
    for dark, (dummy, delta) in ((None, (None, 0.0)), (case.dark, dummy_for(dtype))):
        engine = factory(table, case.pixel_norm, dark, dummy, delta)
        reference = PythonEngine(table, case.pixel_norm, dark, dummy, delta)
        for model in ERROR_MODELS:
            for params in OPERATION_CASES[operation]:
                what = (f"{operation} {split} {dtype} {model} {params} "
                        f"dark={dark is not None} dummy={dummy}")
                expected = run(reference, operation, raw, model, variance_for(case, model),
                               **params)
                got = run(engine, operation, raw, model, variance_for(case, model), **params)
                assert_sums_close(got, expected, rtol, what, exact_count=exact)
                if operation == "integrate":
                    assert got.outliers is None, what
                else:
                    assert_outliers_close(got, expected, rtol, what)


def check_outliers(factory: Factory, case: Case) -> None:
    """Outlier statistics at several pick thresholds equal the reference's, single-frame
    and through process_many; available >= kept in every bin; a lower pick picks more."""
    for split in SPLITS:
        table = case.tables[split]
        engine = factory(table, case.pixel_norm, case.dark, DUMMY, DELTA_DUMMY)
        reference = PythonEngine(table, case.pixel_norm, case.dark, DUMMY, DELTA_DUMMY)
        raw = frame(case, "float32")
        for operation in ("sigma_clip", "medfilt"):
            params = OPERATION_CASES[operation][0]
            previous = None
            for pick in (6.0, 3.0, 1.5, 0.0, -1.0):
                what = f"outliers {operation} {split} pick={pick}"
                expected = run(reference, operation, raw, "azimuthal", None, pick=pick,
                               **params)
                got = run(engine, operation, raw, "azimuthal", None, pick=pick, **params)
                assert_outliers_close(got, expected, 1e-9, what)
                assert np.all(got.outliers.available >= got.count), what
                total = int(got.outliers.picked.sum())
                assert previous is None or total >= previous, what
                previous = total
            stream = list(engine.process_many(iter([("x", raw), ("y", raw)]), operation,
                                              {"error_model": "azimuthal", "pick": 2.5,
                                               **params}))
            single = run(engine, operation, raw, "azimuthal", None, pick=2.5, **params)
            for tag, sums in stream:
                assert isinstance(sums, BinSums), f"{operation} {tag}: {sums!r}"
                assert_outliers_close(sums, single, 0.0, f"process_many {operation} {tag}")


def check_empty_bins(factory: Factory, case: Case) -> None:
    """Bins without pixels and the bin whose pixels are all dummies have zero sums."""
    raw = frame(case, "int32")
    for split in SPLITS:
        table = case.tables[split]
        empty = np.diff(table.indptr) == 0
        engine = factory(table, case.pixel_norm, None, DUMMY, DELTA_DUMMY)
        for operation, cases in OPERATION_CASES.items():
            sums = run(engine, operation, raw, "azimuthal", None, **cases[0])
            for name in FIELDS:
                values = getattr(sums, name)
                assert np.all(values[empty] == 0), f"{operation} {split}: {name} of empty bins"
                if split == "no":
                    assert values[case.dead_bin] == 0, f"{operation}: {name} of the dead bin"


def check_masks(factory: Factory, case: Case) -> None:
    """Masked pixels (pixel_norm 0) listed in a table never count, whatever their value."""
    table = case.tables["no"]
    listed = np.zeros(case.pixel_norm.size, dtype=bool)
    listed[table.indices] = True
    rng = np.random.default_rng(3)
    # mask a further tenth of the listed pixels, then give them absurd values
    extra = listed & (rng.random(listed.size) < 0.1)
    norm = case.pixel_norm.copy()
    norm[extra] = 0
    raw = frame(case, "float64").reshape(-1)
    wild = raw.copy()
    wild[extra] = 1e12
    engine = factory(table, norm, None, DUMMY, DELTA_DUMMY)
    reference = PythonEngine(table, norm, None, DUMMY, DELTA_DUMMY)
    for operation, cases in OPERATION_CASES.items():
        clean = run(engine, operation, raw.reshape(SHAPE), "poisson", None, **cases[0])
        got = run(engine, operation, wild.reshape(SHAPE), "poisson", None, **cases[0])
        assert_sums_close(got, clean, 1e-12, f"{operation}: masked pixels count",
                          exact_count=True)
        assert_sums_close(got, run(reference, operation, wild.reshape(SHAPE), "poisson",
                                   None, **cases[0]), 1e-6, f"{operation} masked: reference")


def check_dummies(factory: Factory, case: Case) -> None:
    """Dummy pixels (|raw - dummy| <= delta) and NaN never count; without a dummy value the
    same pixels are data."""
    table = case.tables["no"]
    raw = frame(case, "float32")
    valid = np.isfinite(raw) & (np.abs(raw - DUMMY) > DELTA_DUMMY)
    with_dummy = factory(table, case.pixel_norm, None, DUMMY, DELTA_DUMMY)
    without = factory(table, case.pixel_norm, None, None, 0.0)
    counted = np.zeros(case.pixel_norm.size, dtype=bool)
    counted[table.indices] = True
    counted &= case.pixel_norm != 0
    sums = with_dummy.integrate(raw, "poisson")
    assert sums.count.sum() == np.count_nonzero(counted & valid.ravel())
    # no dummy value: -1 and -2 are data, only NaN is invalid
    plain = without.integrate(raw, "poisson")
    assert plain.count.sum() == np.count_nonzero(counted & np.isfinite(raw).ravel())
    assert plain.count.sum() > sums.count.sum()


def check_process_many(factory: Factory, case: Case) -> None:
    """process_many: input order, tags kept, results equal to the single-frame calls, and
    one bad frame (wrong size, bad dtype) gives its exception in its place."""
    table = case.tables["no"]
    engine = factory(table, case.pixel_norm, case.dark, DUMMY, DELTA_DUMMY)
    rng = np.random.default_rng(5)
    base = frame(case, "int32")
    good = [(base + rng.poisson(3, SHAPE) * (base >= 0)).astype(np.int32) for _ in range(5)]
    good[2] = np.clip(good[2], 0, None).astype(np.uint16)   # the dtype may change mid-stream
    stream = [("a", good[0]), ("b", good[1]), ("short", good[1][:-1]),
              ("c", good[2]), ("complex", good[3].astype(np.complex64)), ("d", good[3]),
              ("e", good[4])]
    for operation, cases in OPERATION_CASES.items():
        params = {"error_model": "azimuthal", **cases[0]}
        results = list(engine.process_many(iter(stream), operation, params))
        assert [tag for tag, _ in results] == [tag for tag, _ in stream], operation
        for (tag, raw), (_, got) in zip(stream, results, strict=True):
            if tag in ("short", "complex"):
                assert isinstance(got, AzfilterError), f"{operation} {tag}: {got!r}"
                continue
            assert isinstance(got, BinSums), f"{operation} {tag}: {got!r}"
            single = run(engine, operation, raw, "azimuthal", None, **cases[0])
            for name in FIELDS:
                np.testing.assert_array_equal(getattr(got, name), getattr(single, name),
                                              err_msg=f"{operation} {tag}: {name}")
        assert not np.array_equal(results[0][1].signal, results[1][1].signal)
    # the options are checked at once, before any frame
    for operation, params in (("median", {"error_model": "poisson"}),
                              ("sigma_clip", {"error_model": "poisson"}),
                              ("integrate", {"error_model": "poisson", "thres": 3.0})):
        try:
            engine.process_many(iter(stream), operation, params)
        except AzfilterError:
            continue
        raise AssertionError(f"process_many accepted {operation} {params}")
    # an abandoned stream leaves the engine usable
    partial = engine.process_many(iter(stream), "integrate", {"error_model": "poisson"})
    next(partial)
    partial.close()
    np.testing.assert_array_equal(engine.integrate(base, "poisson").signal,
                                  PythonEngine(table, case.pixel_norm, case.dark, DUMMY,
                                               DELTA_DUMMY).integrate(base, "poisson").signal)


def check_host_buffers(factory: Factory, case: Case) -> None:
    """host_buffers: a bounded ring; frames read from its buffers give the same results."""
    engine = factory(case.tables["no"], case.pixel_norm, None, DUMMY, DELTA_DUMMY)
    ring = engine.host_buffers(2)
    raw = frame(case, "int32")
    first, second = ring.take(SHAPE, np.int32), ring.take(SHAPE, np.int32)
    assert first is not None and second is not None and first is not second
    assert ring.take(SHAPE, np.int32) is None          # all lent: no third buffer
    assert ring.fill(raw) is raw                       # none free: the data itself
    first[...] = raw
    np.testing.assert_array_equal(engine.integrate(first, "poisson").signal,
                                  engine.integrate(raw, "poisson").signal)
    ring.give_back(first)
    filled = ring.fill(raw)
    assert filled is first and np.array_equal(filled, raw)   # reused, not reallocated
    assert ring.fill(filled) is filled                 # already a lent buffer
    del second                                         # dropped by a reader: forgotten
    gc.collect()
    assert len(ring) == 1
    ring.give_back(filled)
    small = ring.take((4, 4), np.float32)              # room for one more
    assert small is not None and small.shape == (4, 4) and len(ring) == 2
    other = ring.take((4, 4), np.float32)              # full: the idle frame buffer dropped
    assert other is not None and len(ring) == 2
    assert ring.take((4, 4), np.float32) is None
