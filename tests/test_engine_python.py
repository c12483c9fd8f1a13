"""PythonEngine on tiny hand-checkable inputs, and against a per-bin loop on random tables.

The expected numbers in the small tests are worked out by hand in the comments; the random
tests compare the vectorised engine with a deliberately naive loop over bins that follows
docs/internals.md line by line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic import table

from azfilter.backends import BinSums, get_engine_class
from azfilter.backends.python import PythonEngine
from azfilter.errors import AzfilterError


def engine(rows, norm, coefs=None, dark=None, dummy=None, delta_dummy=0.0) -> PythonEngine:
    return PythonEngine(table(rows, coefs), np.asarray(norm, dtype=np.float32),
                        None if dark is None else np.asarray(dark, dtype=np.float32),
                        dummy, delta_dummy)


def frame(values) -> np.ndarray:
    """A 1xN 'image' (engines only care about the flat pixel order)."""
    return np.asarray(values)[None, :]


# ----------------------------------------------------------------------------- integrate
# 6 pixels; bin 0 = pixels 0,1,2; bin 1 = pixels 3,4; bin 2 empty; pixel 5 in no bin.
ROWS = [[0, 1, 2], [3, 4], []]
NORM = [1.0, 2.0, 1.0, 0.5, 1.0, 1.0]
RAW = [10, 20, 30, 0, 5, 7]


def test_integrate_poisson_by_hand():
    sums = engine(ROWS, NORM).integrate(frame(np.array(RAW, dtype=np.int32)), "poisson")
    # bin 0: S = 10+20+30, W = 1+2+1, W2 = 1+4+1, N = 3, V = 10+20+30
    # bin 1: S = 0+5, W = 0.5+1, W2 = 0.25+1, N = 2, V = max(0,1)+5
    np.testing.assert_allclose(sums.signal, [60, 5, 0])
    np.testing.assert_allclose(sums.normalization, [4, 1.5, 0])
    np.testing.assert_allclose(sums.normalization2, [6, 1.25, 0])
    np.testing.assert_allclose(sums.count, [3, 2, 0])
    np.testing.assert_allclose(sums.variance, [60, 6, 0])
    assert all(a.dtype == np.float64 for a in (sums.signal, sums.variance, sums.count))


def test_integrate_hybrid_is_poisson():
    raw = frame(np.array(RAW, dtype=np.int32))
    poisson = engine(ROWS, NORM).integrate(raw, "poisson")
    hybrid = engine(ROWS, NORM).integrate(raw, "hybrid")
    np.testing.assert_array_equal(hybrid.variance, poisson.variance)


def test_integrate_azimuthal_two_pass_by_hand():
    sums = engine(ROWS, NORM).integrate(frame(RAW), "azimuthal")
    # bin 0: x = 10, 10, 30, mean = 60/4 = 15, V = 1·25 + 4·25 + 1·225 = 350
    # bin 1: x = 0, 5, mean = 5/1.5, V = 0.25·(10/3)² + 1·(5/3)² = 50/9
    np.testing.assert_allclose(sums.variance, [350, 50 / 9, 0])
    np.testing.assert_allclose(sums.signal, [60, 5, 0])


def test_integrate_variance_model_and_dark():
    dark = [1, 1, 1, 2, 2, 2]
    variance = np.array([[4.0, 9.0, 16.0, 25.0, 36.0, 49.0]])
    sums = engine(ROWS, NORM, dark=dark).integrate(frame(RAW), "variance", variance)
    np.testing.assert_allclose(sums.signal, [57, 1, 0])   # (10-1)+(20-1)+(30-1), (0-2)+(5-2)
    np.testing.assert_allclose(sums.variance, [29, 61, 0])
    with pytest.raises(AzfilterError, match="variance"):
        engine(ROWS, NORM).integrate(frame(RAW), "variance")


def test_poisson_variance_uses_raw_not_dark_subtracted():
    sums = engine([[0, 1]], [1, 1], dark=[5, 5]).integrate(frame([3, 8]), "poisson")
    assert sums.signal[0] == (3 - 5) + (8 - 5)
    assert sums.variance[0] == 3 + 8


def test_split_coefficients():
    # pixel 0 split 0.25/0.75 over bins 0 and 1, pixel 1 wholly in bin 1
    sums = engine([[0], [0, 1]], [2, 1], coefs=[[0.25], [0.75, 1.0]]).integrate(
        frame([8, 4]), "poisson")
    np.testing.assert_allclose(sums.signal, [2, 6 + 4])
    np.testing.assert_allclose(sums.normalization, [0.5, 1.5 + 1])
    np.testing.assert_allclose(sums.normalization2, [0.25, 2.25 + 1])
    np.testing.assert_allclose(sums.count, [0.25, 1.75])
    np.testing.assert_allclose(sums.variance, [0.0625 * 8, 0.5625 * 8 + 4])


def test_dummy_nan_and_masked_pixels_are_skipped():
    # pixel 1 = -2 (dummy), pixel 2 = -1 (within delta 1.5), pixel 3 NaN, pixel 4 has norm 0
    raw = np.array([10.0, -2.0, -1.0, np.nan, 50.0, 20.0])
    eng = engine([[0, 1, 2, 3, 4, 5]], [1, 1, 1, 1, 0, 1], dummy=-2.0, delta_dummy=1.5)
    for model in ("poisson", "azimuthal", "hybrid"):
        sums = eng.integrate(frame(raw), model)
        assert sums.count[0] == 2 and sums.signal[0] == 30
        clipped = eng.sigma_clip(frame(raw), 5.0, 3, model)
        assert clipped.count[0] == 2 and clipped.signal[0] == 30
        median = eng.medfilt(frame(raw), 0.0, 1.0, model)
        assert median.count[0] == 2 and median.signal[0] == 30
    # without a dummy value, -2 and -1 are data
    assert engine([[0, 1, 2]], [1, 1, 1]).integrate(frame(raw[:3]), "poisson").count[0] == 3


def test_unsigned_all_ones_dummy():
    top = np.iinfo(np.uint32).max
    raw = np.array([7, top, top - 1], dtype=np.uint32)
    sums = engine([[0, 1, 2]], [1, 1, 1], dummy=float(top), delta_dummy=0.0).integrate(
        frame(raw), "poisson")
    assert sums.count[0] == 2 and sums.signal[0] == 7 + float(top - 1)


def test_empty_bins_have_zero_sums():
    sums = engine([[], [0]], [1]).integrate(frame([3]), "azimuthal")
    assert sums.count[0] == 0 and sums.normalization[0] == 0 and sums.variance[0] == 0


def test_sums_of_lost_pixels_leave_exact_zeros():
    """W, W2 and N are the geometry's sums less those of the pixels a frame invalidates; a
    bin that loses every entry must still read exactly zero, not the rounding left by the
    difference, and the other bins must match the sums taken directly."""
    rng = np.random.default_rng(3)
    n_pixels = 3000
    norm = rng.uniform(0.1, 3.0, n_pixels).astype(np.float32)
    rows = [list(range(0, 1000)), list(range(1000, 2000)), list(range(2000, n_pixels))]
    coefs = [rng.uniform(0.05, 1.0, len(row)).astype(np.float32).tolist() for row in rows]
    eng = engine(rows, norm, coefs=coefs, dummy=-2.0, delta_dummy=0.5)
    raw = rng.poisson(40, n_pixels).astype(np.float64)
    raw[:1000] = -2.0                                    # bin 0: every pixel a dummy
    raw[rng.choice(np.arange(1000, 2000), 300, replace=False)] = np.nan   # bin 1 loses some
    for model in ("poisson", "azimuthal"):
        sums = eng.integrate(frame(raw), model)
        for name in ("signal", "variance", "normalization", "normalization2", "count"):
            assert getattr(sums, name)[0] == 0.0, name
        valid = np.isfinite(raw) & (raw != -2.0)
        for k in (1, 2):
            pixels = np.array(rows[k])
            kept = valid[pixels]
            c = np.array(coefs[k], dtype=np.float64)[kept]
            weight = c * norm[pixels][kept].astype(np.float64)
            assert sums.normalization[k] == pytest.approx(weight.sum(), rel=1e-12)
            assert sums.normalization2[k] == pytest.approx((weight * weight).sum(), rel=1e-12)
            assert sums.count[k] == pytest.approx(c.sum(), rel=1e-12)


def test_wrong_frame_size_and_model():
    eng = engine(ROWS, NORM)
    with pytest.raises(AzfilterError, match="pixels"):
        eng.integrate(frame(RAW[:5]), "poisson")
    with pytest.raises(AzfilterError, match="error model"):
        eng.integrate(frame(RAW), "no")


# ----------------------------------------------------------------------------- sigma_clip
# bin 0: ten 10s, five 11s, four 9s and one 1000 (20 pixels); bin 1: two pixels 0, 10.
CLIP_VALUES = [10] * 10 + [11] * 5 + [9] * 4 + [1000] + [0, 10]
CLIP_ROWS = [list(range(20)), [20, 21]]


def clip(model, thres=3.0, max_iter=5, values=CLIP_VALUES, rows=CLIP_ROWS):
    eng = engine(rows, np.ones(len(values)))
    return eng.sigma_clip(frame(np.array(values, dtype=np.int32)), thres, max_iter, model)


def test_sigma_clip_azimuthal_by_hand():
    sums = clip("azimuthal")
    # pass 1 (bin 0): mean = 1191/20 = 59.55, std ≈ 215.8, cutoff = 3·std ≈ 647 (Chauvenet
    # for N = 20 is only 2.04): 1000 is 940 away -> rejected. pass 2: mean = 191/19,
    # std ≈ 0.686, cutoff 2.06 > every deviation -> stop.
    assert sums.count[0] == 19
    assert sums.signal[0] == 191 and sums.normalization[0] == 19
    kept = np.array(CLIP_VALUES[:19], dtype=float)
    assert sums.variance[0] == pytest.approx(((kept - kept.mean()) ** 2).sum())
    # bin 1: mean 5, std 5, cutoff max(3, Chauvenet(3)) · 5 = 15 > 5: both kept
    assert sums.count[1] == 2


def test_sigma_clip_hybrid_reports_poisson_variance():
    sums = clip("hybrid")
    assert sums.count[0] == 19 and sums.signal[0] == 191
    assert sums.variance[0] == 191  # Σ max(raw, 1) over the kept pixels


def test_sigma_clip_poisson_can_empty_a_bin():
    # Poisson std = sqrt(1191/20) ≈ 7.7 around a mean of 59.55 pulled up by the outlier: every
    # pixel is more than 3·7.7 away, so all are dropped at once (pyFAI does the same).
    sums = clip("poisson")
    assert sums.count[0] == 0 and sums.normalization[0] == 0


def test_sigma_clip_iterations():
    values = [10] * 20 + [30, 1000]
    rows = [list(range(22))]
    # pass 1 drops 1000 (cutoff ≈ 618); pass 2 (mean 230/21, std ≈ 4.26, cutoff ≈ 12.8)
    # drops 30; pass 3 finds std 0 and nothing to drop.
    assert clip("azimuthal", 3.0, 0, values, rows).count[0] == 22
    one = clip("azimuthal", 3.0, 1, values, rows)
    assert one.count[0] == 21 and one.signal[0] == 230
    assert clip("azimuthal", 3.0, 2, values, rows).count[0] == 20
    five = clip("azimuthal", 3.0, 5, values, rows)
    assert five.count[0] == 20 and five.signal[0] == 200 and five.variance[0] == 0


def test_sigma_clip_no_iteration_equals_integrate():
    eng = engine(ROWS, NORM)
    for model in ("azimuthal", "poisson"):
        clipped = eng.sigma_clip(frame(RAW), 3.0, 0, model)
        plain = eng.integrate(frame(RAW), model)
        np.testing.assert_array_equal(clipped.signal, plain.signal)
        np.testing.assert_allclose(clipped.variance, plain.variance)


def test_sigma_clip_chauvenet_at_thres_zero():
    values = [0] * 7 + [4]
    rows = [list(range(8))]
    # mean 0.5, std = sqrt((7·0.25 + 12.25)/8) ≈ 1.323; Chauvenet k(8) = sqrt(2 ln(8/√(2π)))
    # ≈ 1.52, cutoff ≈ 2.02 < 3.5: the 4 is dropped at thres=0, kept at thres=2.7 (3.57).
    k = math.sqrt(2 * math.log(8 / math.sqrt(2 * math.pi)))
    assert 3.5 > k * math.sqrt(1.75) and 3.5 < 2.7 * math.sqrt(1.75)
    assert clip("azimuthal", 0.0, 5, values, rows).count[0] == 7
    assert clip("azimuthal", 2.7, 5, values, rows).count[0] == 8


def test_sigma_clip_small_bins_use_n_at_least_3():
    # two pixels 0 and 10: mean 5, std 5; at thres 0 the cutoff uses N = max(3, 2):
    # sqrt(2 ln(3/√(2π))) ≈ 0.60 -> 3.0 < 5: both go, the bin is empty (true count 0).
    sums = clip("azimuthal", 0.0, 5, [0, 10], [[0, 1]])
    assert sums.count[0] == 0


def test_sigma_clip_strict_inequality():
    # values 0, 2 with std 1 and thres 1: |x - mean| = 1 is not > 1·1 -> both kept
    sums = clip("azimuthal", 1.0, 5, [0, 2], [[0, 1]])
    assert sums.count[0] == 2


# ----------------------------------------------------------------------------- medfilt
def median(values, quant_min=0.5, quant_max=0.5, norm=None, coefs=None, model="poisson"):
    rows = [list(range(len(values)))]
    norm = np.ones(len(values)) if norm is None else norm
    eng = engine(rows, norm, coefs=None if coefs is None else [coefs])
    return eng.medfilt(frame(np.asarray(values, dtype=np.float64)), quant_min, quant_max,
                       model)


def intensity(sums: BinSums) -> float:
    return float(sums.signal[0] / sums.normalization[0])


def test_medfilt_odd_median():
    # sorted 1, 3, 5 with spans [0,1], [1,2], [2,3]; T/2 = 1.5 lies inside the span of 3
    sums = median([5, 1, 3])
    assert sums.count[0] == 1 and intensity(sums) == 3


def test_medfilt_boundary_selects_both_fragments():
    # spans [0,1], [1,2], [2,3], [3,4]; T/2 = 2 is the boundary between 2 and 3:
    # 2 has U = 2 >= hi and L <= lo; 3 has L = 2 <= lo and U >= hi -> both, averaged
    sums = median([4, 3, 2, 1])
    assert sums.count[0] == 2 and intensity(sums) == 2.5


def test_medfilt_weighted():
    # x = 1, 2, 3 with weights 1, 1, 2 (norm): spans [0,1], [1,2], [2,4], T/2 = 2 on the
    # boundary between 2 and 3: I = (2·1 + 3·2)/(1 + 2) = 8/3
    norm = np.array([1.0, 1.0, 2.0])
    sums = median(np.array([1.0, 2.0, 3.0]) * norm, norm=norm)
    assert sums.count[0] == 2 and intensity(sums) == pytest.approx(8 / 3)
    # with coefficients instead: w = c·norm, signal weighted by c
    sums = median([1.0, 2.0, 3.0], coefs=[1.0, 1.0, 2.0])
    assert sums.count[0] == 2 and intensity(sums) == pytest.approx(8 / 3)


def test_medfilt_quantile_range_and_partial_fragments():
    # 1..8, (25, 75): lo = 2, hi = 6: fragments 3, 4, 5, 6 lie inside; 2 ([1,2]) does not
    sums = median(range(8, 0, -1), 0.25, 0.75)
    assert sums.count[0] == 4 and intensity(sums) == 4.5
    # 1..4, (30, 70): lo = 1.2, hi = 2.8: fragments 2 ([1,2]) and 3 ([2,3]) only partly
    # inside, none covers the whole interval -> nothing selected, empty bin
    sums = median([1, 2, 3, 4], 0.3, 0.7)
    assert sums.count[0] == 0
    # (0, 100) is the plain mean
    sums = median([1, 2, 3, 10], 0.0, 1.0)
    assert sums.count[0] == 4 and intensity(sums) == 4


def test_medfilt_zero_weight_fragment_never_selected():
    sums = median([1, 2, 3], 0.0, 1.0, coefs=[1.0, 0.0, 1.0])
    assert sums.count[0] == 2 and intensity(sums) == 2


def test_medfilt_variance_models():
    values = [1.0, 2.0, 3.0, 4.0]
    poisson = median(values, 0.0, 1.0)
    assert poisson.variance[0] == 1 + 2 + 3 + 4
    azimuthal = median(values, 0.0, 1.0, model="azimuthal")
    assert azimuthal.variance[0] == pytest.approx(1.5**2 * 2 + 0.5**2 * 2)


def test_medfilt_ties_do_not_depend_on_table_order():
    values = frame([5.0, 5.0, 1.0, 5.0, 9.0])
    norm = [1.0, 2.0, 1.0, 0.5, 1.0]
    forward = engine([[0, 1, 2, 3, 4]], norm).medfilt(values, 0.5, 0.5, "poisson")
    backward = engine([[4, 3, 2, 1, 0]], norm).medfilt(values, 0.5, 0.5, "poisson")
    for name in ("signal", "variance", "normalization", "normalization2", "count"):
        assert getattr(forward, name)[0] == getattr(backward, name)[0]


# ----------------------------------------------------------------------------- random tables
def loop_reference(kind, rows, coefs, raw, norm, dark, model, **options):
    """Per-bin loops over plain Python lists, following docs/internals.md literally."""
    out = np.zeros((5, len(rows)))
    for k, (pixels, cs) in enumerate(zip(rows, coefs, strict=True)):
        entries = []
        for j, c in zip(pixels, cs, strict=True):
            value = raw[j]
            if norm[j] == 0 or not math.isfinite(value) or abs(value - (-2.0)) <= 1.5:
                continue
            var = max(value, 1.0) if model in ("poisson", "hybrid") else 0.0
            entries.append((j, float(c), value - dark[j], var, float(norm[j])))

        def sums(chosen, azimuthal):
            s = sum(c * sig for _, c, sig, _, _ in chosen)
            w = sum(c * n for _, c, _, _, n in chosen)
            w2 = sum((c * n) ** 2 for _, c, _, _, n in chosen)
            cnt = sum(c for _, c, _, _, _ in chosen)
            if azimuthal:
                v = sum((c * n) ** 2 * (sig / n - s / w) ** 2 for _, c, sig, _, n in chosen)
            else:
                v = sum(c * c * var for _, c, _, var, _ in chosen)
            return [s, v, w, w2, cnt]

        if kind == "integrate":
            out[:, k] = sums(entries, model == "azimuthal")
        elif kind == "sigma_clip":
            azimuthal = model in ("azimuthal", "hybrid")
            kept = list(entries)
            result = sums(kept, azimuthal)
            for _ in range(options["max_iter"]):
                s, v, w, w2, cnt = result
                if cnt == 0:
                    break
                mean, std = s / w, math.sqrt(v / w2)
                cut = max(options["thres"],
                          math.sqrt(2 * math.log(max(3, cnt) / math.sqrt(2 * math.pi))))
                remaining = [e for e in kept if not abs(e[2] / e[4] - mean) > cut * std]
                if len(remaining) == len(kept):
                    break
                kept = remaining
                result = sums(kept, azimuthal)
            if model == "hybrid":
                result[1] = sums(kept, False)[1]
            out[:, k] = result
        else:  # medfilt
            ordered = sorted(entries, key=lambda e: (e[2] / e[4], e[0]))
            total = sum(c * n for _, c, _, _, n in ordered)
            lo, hi = options["quant_min"] * total, options["quant_max"] * total
            chosen, upper = [], 0.0
            for e in ordered:
                w = e[1] * e[4]
                lower, upper = upper, upper + w
                if w != 0 and ((lo <= lower and upper <= hi) or (lo >= lower and upper >= hi)):
                    chosen.append(e)
            result = sums(chosen, model == "azimuthal")
            result[4] = len(chosen)
            out[:, k] = result
    return out


def random_problem(seed, split):
    rng = np.random.default_rng(seed)
    n_pixels, npt = 400, 12
    raw = rng.poisson(50, n_pixels).astype(np.float64)
    raw[rng.choice(n_pixels, 8, replace=False)] += 2000        # outliers
    raw[rng.choice(n_pixels, 5, replace=False)] = -2           # dummies
    raw[rng.choice(n_pixels, 3, replace=False)] = np.nan
    norm = rng.uniform(0.5, 1.5, n_pixels).astype(np.float32)
    norm[rng.choice(n_pixels, 10, replace=False)] = 0          # statically masked
    dark = rng.uniform(0, 3, n_pixels).astype(np.float32)
    rows = [[] for _ in range(npt)]
    coefs = [[] for _ in range(npt)]
    for j in range(n_pixels - 20):                             # the last 20 pixels: no bin
        b = int(rng.integers(0, npt - 1))                      # bin npt-1 stays empty
        if split and rng.random() < 0.5 and b + 1 < npt - 1:
            f = float(np.float32(rng.uniform(0.1, 0.9)))
            rows[b].append(j), coefs[b].append(f)
            rows[b + 1].append(j), coefs[b + 1].append(float(np.float32(1 - f)))
        else:
            rows[b].append(j), coefs[b].append(1.0)
    for k in range(npt):
        order = np.argsort(rows[k])
        rows[k] = [rows[k][i] for i in order]
        coefs[k] = [coefs[k][i] for i in order]
    return rows, coefs, raw, norm, dark


def as_array(sums: BinSums) -> np.ndarray:
    return np.array([sums.signal, sums.variance, sums.normalization, sums.normalization2,
                     sums.count])


@pytest.mark.parametrize("model", ["poisson", "azimuthal", "hybrid"])
@pytest.mark.parametrize("split", [False, True])
def test_matches_loop_reference(model, split):
    rows, coefs, raw, norm, dark = random_problem(7 + split, split)
    eng = PythonEngine(table(rows, coefs), norm, dark, -2.0, 1.5)
    img = frame(raw)
    check = dict(rtol=1e-9, atol=1e-9)
    reference = loop_reference("integrate", rows, coefs, raw, norm, dark, model)
    np.testing.assert_allclose(as_array(eng.integrate(img, model)), reference, **check)
    for quant in ((0.5, 0.5), (0.25, 0.75), (0.1, 0.9)):
        reference = loop_reference("medfilt", rows, coefs, raw, norm, dark, model,
                                   quant_min=quant[0], quant_max=quant[1])
        np.testing.assert_allclose(as_array(eng.medfilt(img, *quant, model)), reference,
                                   **check)
    if not split:
        for thres, max_iter in ((3.0, 5), (0.0, 5), (5.0, 1)):
            reference = loop_reference("sigma_clip", rows, coefs, raw, norm, dark, model,
                                       thres=thres, max_iter=max_iter)
            result = as_array(eng.sigma_clip(img, thres, max_iter, model))
            np.testing.assert_allclose(result, reference, **check)
            # the outliers went somewhere: clipping kept fewer pixels than there are
            assert result[4].sum() < as_array(eng.integrate(img, model))[4].sum()


def test_engine_class_lookup():
    assert get_engine_class("python") is PythonEngine
    assert get_engine_class("Python") is PythonEngine
    with pytest.raises(AzfilterError, match="unknown backend"):
        get_engine_class("fortran")
