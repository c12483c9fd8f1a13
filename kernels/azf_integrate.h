/* azf_integrate.h: the sums of integrate over one bin (row of the CSR table) for the
   poisson, hybrid and variance models: S = sum c*signal, V = sum c^2*var, W = sum c*norm,
   W2 = sum (c*norm)^2, N = sum c over the valid entries of the row.

   Part of the Cython backend (kernels/_engine.pyx includes it, in integrate_row). Plain C++
   over arrays, no Python objects: the caller holds no GIL.

   Why a header: the loop of _engine.pyx served every case (coefficients or not, dark current
   or not, poisson or per-pixel variance) through one function that the compiler did not
   inline at its call sites, so each entry paid the tests of the cases it was not in (about
   41 instructions per entry with a full-split table, counted with callgrind). Here each case
   is a template instance whose flags are compile-time constants; the loop body is only what
   that case needs. With coefficients (pixel splitting) it adds the coefficient stream and
   five multiplies, nothing else.

   With SSE2 (the x86-64 baseline) the two entries of a pair run as one vector operation each
   (azf_add_pair; ~22 instructions per entry instead of 41, full split), validity as a mask.

   azf_signal_row is the loop for a row whose W, W2 and N the caller already has (they depend
   on the table alone when every pixel of the row is valid: _engine.pyx's integrate_weights):
   it sums S and V only, reads no norm, and gives up (false) at the first invalid pixel, the
   caller then summing the row in full with azf_integrate_row.

   Same arithmetic, same order as the scalar code it replaces (and as the Python reference):
   every value in float64, entries in row order, entry start + m going to partial sums m % 2
   (so that the adds of consecutive entries do not wait on each other), the two partial sums
   added at the end. Invalid entries (norm 0, non-finite or dummy pixel) are skipped. The
   sums are the previous build's bit for bit (tests/test_engine_integrate_sums.py).
*/
#ifndef AZF_INTEGRATE_H
#define AZF_INTEGRATE_H

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) || defined(__clang__)
#define AZF_FORCE_INLINE inline __attribute__((always_inline))
#define AZF_PREFETCH(address) __builtin_prefetch(address)
#else
#define AZF_FORCE_INLINE inline
#define AZF_PREFETCH(address) ((void) 0)
#endif

/* What the per-entry variance is (the values of _engine.pyx's VAR_POISSON / VAR_ARRAY). */
enum { AZF_VAR_POISSON = 1, AZF_VAR_ARRAY = 2 };

/* How many entries ahead the loop prefetches the pixel it will read (_engine.pyx's
   PREFETCH_AHEAD). */
enum { AZF_PREFETCH_AHEAD = 128 };

/* Which raw values are invalid besides non-finite ones: float frames, |raw - value| <= delta
   when float_active; integer frames, low <= raw <= low + width when int_active (the same set
   of values, see _engine.pyx's set_dummy_rule). */
typedef struct {
    bool float_active;
    double value, delta;
    bool int_active;
    int64_t low;
    uint64_t width;
} azf_raw_rule;

/* Entry e of the row into the sums acc (S, V, W, W2, N) when it is valid. */
template <typename Raw, bool HasCoef, bool HasDark, int VarKind>
static AZF_FORCE_INLINE void azf_add_entry(const Raw* raw, Py_ssize_t e, const int32_t* indices,
                                           const float* coefs, const float* norm,
                                           const float* dark, const float* variance,
                                           const azf_raw_rule& rule, double* acc) {
    const double n = (double) norm[e];
    if (n == 0.0)
        return;
    const int32_t j = indices[e];
    const double v = (double) raw[j];
    if (std::is_floating_point<Raw>::value) {
        if (!std::isfinite(v))
            return;
        if (rule.float_active && std::fabs(v - rule.value) <= rule.delta)
            return;
    } else if (rule.int_active && (uint64_t) ((int64_t) raw[j] - rule.low) <= rule.width) {
        return;
    }
    const double s = HasDark ? v - (double) dark[e] : v;
    const double var = VarKind == AZF_VAR_POISSON ? (v > 1.0 ? v : 1.0)
                                                  : (double) variance[j];
    if (HasCoef) {
        const double c = (double) coefs[e];
        const double w = c * n;
        acc[0] += c * s;
        acc[1] += c * c * var;
        acc[2] += w;
        acc[3] += w * w;
        acc[4] += c;
    } else {
        /* no splitting: every coefficient is 1, so no load and no multiplies */
        acc[0] += s;
        acc[1] += var;
        acc[2] += n;
        acc[3] += n * n;
        acc[4] += 1.0;
    }
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__)
#define AZF_INTEGRATE_PAIRS 1
#include <emmintrin.h>

/* Two consecutive floats of a stream as a pair of doubles (one 8-byte load, one CVTPS2PD). */
static AZF_FORCE_INLINE __m128d azf_load_pair(const float* address) {
    return _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd((const double*) address)));
}

/* The running sums of the pair loop: lane 0 holds partial sums 0 (entries start, start + 2,
   ...), lane 1 partial sums 1, as the scalar loop's a0 and a1. */
struct azf_pair_sums {
    __m128d s, v, w, q, c;
};

/* The dummy rule as bounds that flag nothing when it is off (see azf_integrate_case). */
struct azf_pair_rule {
    __m128d low, high, value, delta;
};

/* Entries e and e + 1 into lanes 0 and 1 of acc. An invalid entry's lane adds +0.0 (its terms
   masked off) instead of being skipped: a sum that starts at +0.0 is never -0.0, so adding
   +0.0 leaves it unchanged, bit for bit, and the pair needs no branch. Each lane's operations
   are the scalar ones (SSE2 arithmetic is IEEE per lane): the sums are azf_add_entry's. */
template <typename Raw, bool HasCoef, bool HasDark, int VarKind>
static AZF_FORCE_INLINE void azf_add_pair(const Raw* raw, Py_ssize_t e, const int32_t* indices,
                                          const float* coefs, const float* norm,
                                          const float* dark, const float* variance,
                                          const azf_pair_rule& rule, azf_pair_sums* acc) {
    const __m128d zero = _mm_setzero_pd();
    const __m128d one = _mm_set1_pd(1.0);
    const int32_t j0 = indices[e], j1 = indices[e + 1];
    const __m128d v = _mm_set_pd((double) raw[j1], (double) raw[j0]);
    const __m128d n = azf_load_pair(norm + e);
    __m128d valid = _mm_cmpneq_pd(n, zero);
    if (std::is_floating_point<Raw>::value) {
        /* finite: v - v is 0 (NaN for NaN and infinities); and not a dummy value */
        valid = _mm_and_pd(valid, _mm_cmpeq_pd(_mm_sub_pd(v, v), zero));
        const __m128d distance = _mm_andnot_pd(_mm_set1_pd(-0.0), _mm_sub_pd(v, rule.value));
        valid = _mm_andnot_pd(_mm_cmple_pd(distance, rule.delta), valid);
    } else {
        /* integer frames: a dummy value lies in [low, high] (integers, exact in float64) */
        valid = _mm_andnot_pd(_mm_and_pd(_mm_cmpge_pd(v, rule.low),
                                         _mm_cmple_pd(v, rule.high)), valid);
    }
    const __m128d s = HasDark ? _mm_sub_pd(v, azf_load_pair(dark + e)) : v;
    /* poisson: v > 1 ? v : 1 lane by lane, which is MAXPD */
    const __m128d var = VarKind == AZF_VAR_POISSON
        ? _mm_max_pd(v, one)
        : _mm_set_pd((double) variance[j1], (double) variance[j0]);
    if (HasCoef) {
        const __m128d c = azf_load_pair(coefs + e);
        const __m128d w = _mm_mul_pd(c, n);
        acc->s = _mm_add_pd(acc->s, _mm_and_pd(_mm_mul_pd(c, s), valid));
        acc->v = _mm_add_pd(acc->v, _mm_and_pd(_mm_mul_pd(_mm_mul_pd(c, c), var), valid));
        acc->w = _mm_add_pd(acc->w, _mm_and_pd(w, valid));
        acc->q = _mm_add_pd(acc->q, _mm_and_pd(_mm_mul_pd(w, w), valid));
        acc->c = _mm_add_pd(acc->c, _mm_and_pd(c, valid));
    } else {
        acc->s = _mm_add_pd(acc->s, _mm_and_pd(s, valid));
        acc->v = _mm_add_pd(acc->v, _mm_and_pd(var, valid));
        acc->w = _mm_add_pd(acc->w, _mm_and_pd(n, valid));
        acc->q = _mm_add_pd(acc->q, _mm_and_pd(_mm_mul_pd(n, n), valid));
        acc->c = _mm_add_pd(acc->c, _mm_and_pd(one, valid));
    }
}
#endif

/* The sums of row start..stop into sums[0..4]; nnz (the table's entry count) bounds the
   prefetching. The row is cut at an even offset where the prefetching would run past the
   table, so that the loop does not test it per entry. With SSE2 the pairs of entries run
   through azf_add_pair, the last odd entry through azf_add_entry. */
template <typename Raw, bool HasCoef, bool HasDark, int VarKind>
static inline void azf_integrate_case(const Raw* raw, Py_ssize_t start, Py_ssize_t stop,
                                      Py_ssize_t nnz, const int32_t* indices,
                                      const float* coefs, const float* norm, const float* dark,
                                      const float* variance, const azf_raw_rule& rule,
                                      double* sums) {
    double a0[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    double a1[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    Py_ssize_t cut = nnz - AZF_PREFETCH_AHEAD - 1;
    cut = cut < start ? start : (cut > stop ? stop : cut);
    cut -= (cut - start) % 2;
    Py_ssize_t e = start;
#ifdef AZF_INTEGRATE_PAIRS
    /* the dummy rule as bounds that flag nothing when it is off: integers in
       [low, low + width] (exact in float64: |low|, width <= 2^35), floats within delta of
       value (no distance is <= -inf) */
    const double never = -INFINITY;
    const double low = rule.int_active ? (double) rule.low : INFINITY;
    const double high = rule.int_active ? (double) (rule.low + (int64_t) rule.width) : never;
    const double value = rule.float_active ? rule.value : 0.0;
    const double delta = rule.float_active ? rule.delta : never;
    azf_pair_rule pair_rule;
    pair_rule.low = _mm_set1_pd(low);
    pair_rule.high = _mm_set1_pd(high);
    pair_rule.value = _mm_set1_pd(value);
    pair_rule.delta = _mm_set1_pd(delta);
    azf_pair_sums acc;
    acc.s = acc.v = acc.w = acc.q = acc.c = _mm_setzero_pd();
    for (; e + 1 < cut; e += 2) {
        AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD]]);
        AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD + 1]]);
        azf_add_pair<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, norm, dark,
                                                     variance, pair_rule, &acc);
    }
    for (; e + 1 < stop; e += 2)
        azf_add_pair<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, norm, dark,
                                                     variance, pair_rule, &acc);
    const __m128d lanes[5] = {acc.s, acc.v, acc.w, acc.q, acc.c};
    for (int i = 0; i < 5; i++) {
        a0[i] = _mm_cvtsd_f64(lanes[i]);
        a1[i] = _mm_cvtsd_f64(_mm_unpackhi_pd(lanes[i], lanes[i]));
    }
#else
    for (; e + 1 < cut; e += 2) {
        AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD]]);
        AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD + 1]]);
        azf_add_entry<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, norm, dark,
                                                      variance, rule, a0);
        azf_add_entry<Raw, HasCoef, HasDark, VarKind>(raw, e + 1, indices, coefs, norm, dark,
                                                      variance, rule, a1);
    }
    for (; e + 1 < stop; e += 2) {
        azf_add_entry<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, norm, dark,
                                                      variance, rule, a0);
        azf_add_entry<Raw, HasCoef, HasDark, VarKind>(raw, e + 1, indices, coefs, norm, dark,
                                                      variance, rule, a1);
    }
#endif
    if (e < stop)
        azf_add_entry<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, norm, dark,
                                                      variance, rule, a0);
    for (int i = 0; i < 5; i++)
        sums[i] = a0[i] + a1[i];
}

/* Entry e's signal terms into acc (S, V) for azf_signal_case; false, adding nothing, when its
   pixel is non-finite or a dummy. */
template <typename Raw, bool HasCoef, bool HasDark, int VarKind>
static AZF_FORCE_INLINE bool azf_add_signal_entry(const Raw* raw, Py_ssize_t e,
                                                  const int32_t* indices, const float* coefs,
                                                  const float* dark, const float* variance,
                                                  const azf_raw_rule& rule, double* acc) {
    const int32_t j = indices[e];
    const double v = (double) raw[j];
    if (std::is_floating_point<Raw>::value) {
        if (!std::isfinite(v))
            return false;
        if (rule.float_active && std::fabs(v - rule.value) <= rule.delta)
            return false;
    } else if (rule.int_active && (uint64_t) ((int64_t) raw[j] - rule.low) <= rule.width) {
        return false;
    }
    const double s = HasDark ? v - (double) dark[e] : v;
    const double var = VarKind == AZF_VAR_POISSON ? (v > 1.0 ? v : 1.0)
                                                  : (double) variance[j];
    if (HasCoef) {
        const double c = (double) coefs[e];
        acc[0] += c * s;
        acc[1] += c * c * var;
    } else {
        acc[0] += s;
        acc[1] += var;
    }
    return true;
}

/* S and V of a row whose entries all have a nonzero norm, into sums[0..1], in the order of
   azf_integrate_case; false as soon as an entry's pixel is invalid (sums then undefined).
   With every entry valid, W, W2 and N do not depend on the frame: the caller has them from the
   table (row weights), and this loop reads neither the norm stream nor computes them. */
template <typename Raw, bool HasCoef, bool HasDark, int VarKind>
static inline bool azf_signal_case(const Raw* raw, Py_ssize_t start, Py_ssize_t stop,
                                   Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                                   const float* dark, const float* variance,
                                   const azf_raw_rule& rule, double* sums) {
    double a0[2] = {0.0, 0.0};
    double a1[2] = {0.0, 0.0};
    Py_ssize_t cut = nnz - AZF_PREFETCH_AHEAD - 1;
    cut = cut < start ? start : (cut > stop ? stop : cut);
    cut -= (cut - start) % 2;
    Py_ssize_t e = start;
#ifdef AZF_INTEGRATE_PAIRS
    const double never = -INFINITY;
    const __m128d low = _mm_set1_pd(rule.int_active ? (double) rule.low : INFINITY);
    const __m128d high = _mm_set1_pd(
        rule.int_active ? (double) (rule.low + (int64_t) rule.width) : never);
    const __m128d value = _mm_set1_pd(rule.float_active ? rule.value : 0.0);
    const __m128d delta = _mm_set1_pd(rule.float_active ? rule.delta : never);
    const __m128d zero = _mm_setzero_pd();
    const __m128d one = _mm_set1_pd(1.0);
    const __m128d sign = _mm_set1_pd(-0.0);
    __m128d acc_s = zero, acc_v = zero;
    for (; e + 1 < stop; e += 2) {
        if (e + 1 < cut) {
            AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD]]);
            AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD + 1]]);
        }
        const int32_t j0 = indices[e], j1 = indices[e + 1];
        const __m128d v = _mm_set_pd((double) raw[j1], (double) raw[j0]);
        __m128d invalid;
        if (std::is_floating_point<Raw>::value) {
            const __m128d distance = _mm_andnot_pd(sign, _mm_sub_pd(v, value));
            invalid = _mm_or_pd(_mm_cmpneq_pd(_mm_sub_pd(v, v), zero),
                                _mm_cmple_pd(distance, delta));
        } else {
            invalid = _mm_and_pd(_mm_cmpge_pd(v, low), _mm_cmple_pd(v, high));
        }
        if (_mm_movemask_pd(invalid) != 0)
            return false;
        const __m128d s = HasDark ? _mm_sub_pd(v, azf_load_pair(dark + e)) : v;
        const __m128d var = VarKind == AZF_VAR_POISSON
            ? _mm_max_pd(v, one)
            : _mm_set_pd((double) variance[j1], (double) variance[j0]);
        if (HasCoef) {
            const __m128d c = azf_load_pair(coefs + e);
            acc_s = _mm_add_pd(acc_s, _mm_mul_pd(c, s));
            acc_v = _mm_add_pd(acc_v, _mm_mul_pd(_mm_mul_pd(c, c), var));
        } else {
            acc_s = _mm_add_pd(acc_s, s);
            acc_v = _mm_add_pd(acc_v, var);
        }
    }
    a0[0] = _mm_cvtsd_f64(acc_s);
    a1[0] = _mm_cvtsd_f64(_mm_unpackhi_pd(acc_s, acc_s));
    a0[1] = _mm_cvtsd_f64(acc_v);
    a1[1] = _mm_cvtsd_f64(_mm_unpackhi_pd(acc_v, acc_v));
#else
    for (; e + 1 < stop; e += 2) {
        if (e + 1 < cut) {
            AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD]]);
            AZF_PREFETCH(&raw[indices[e + AZF_PREFETCH_AHEAD + 1]]);
        }
        if (!azf_add_signal_entry<Raw, HasCoef, HasDark, VarKind>(raw, e, indices, coefs, dark,
                                                                  variance, rule, a0)
            || !azf_add_signal_entry<Raw, HasCoef, HasDark, VarKind>(raw, e + 1, indices,
                                                                     coefs, dark, variance,
                                                                     rule, a1))
            return false;
    }
#endif
    if (e < stop && !azf_add_signal_entry<Raw, HasCoef, HasDark, VarKind>(
                        raw, e, indices, coefs, dark, variance, rule, a0))
        return false;
    sums[0] = a0[0] + a1[0];
    sums[1] = a0[1] + a1[1];
    return true;
}

/* azf_signal_case for one row, the instance picked as in azf_integrate_row. */
template <typename Raw>
static inline bool azf_signal_row(const Raw* raw, Py_ssize_t start, Py_ssize_t stop,
                                  Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                                  const float* dark, const float* variance,
                                  const azf_raw_rule* rule, int var_kind, double* sums) {
    const azf_raw_rule r = *rule;
#define AZF_CASE(HAS_COEF, HAS_DARK)                                                          \
    return var_kind == AZF_VAR_POISSON                                                        \
        ? azf_signal_case<Raw, HAS_COEF, HAS_DARK, AZF_VAR_POISSON>(                          \
              raw, start, stop, nnz, indices, coefs, dark, variance, r, sums)                 \
        : azf_signal_case<Raw, HAS_COEF, HAS_DARK, AZF_VAR_ARRAY>(                            \
              raw, start, stop, nnz, indices, coefs, dark, variance, r, sums);
    if (coefs != NULL) {
        if (dark != NULL) {
            AZF_CASE(true, true)
        }
        AZF_CASE(true, false)
    }
    if (dark != NULL) {
        AZF_CASE(false, true)
    }
    AZF_CASE(false, false)
#undef AZF_CASE
}

/* The sums of one row (see the top of the file): coefs NULL when every coefficient is 1, dark
   NULL without dark current, variance (per pixel) read with var_kind AZF_VAR_ARRAY. Picks
   the instance of the case once per row. */
template <typename Raw>
static inline void azf_integrate_row(const Raw* raw, Py_ssize_t start, Py_ssize_t stop,
                                     Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                                     const float* norm, const float* dark,
                                     const float* variance, const azf_raw_rule* rule,
                                     int var_kind, double* sums) {
    const azf_raw_rule r = *rule;
#define AZF_CASE(HAS_COEF, HAS_DARK)                                                          \
    if (var_kind == AZF_VAR_POISSON)                                                          \
        azf_integrate_case<Raw, HAS_COEF, HAS_DARK, AZF_VAR_POISSON>(                         \
            raw, start, stop, nnz, indices, coefs, norm, dark, variance, r, sums);            \
    else                                                                                      \
        azf_integrate_case<Raw, HAS_COEF, HAS_DARK, AZF_VAR_ARRAY>(                           \
            raw, start, stop, nnz, indices, coefs, norm, dark, variance, r, sums);
    if (coefs != NULL) {
        if (dark != NULL) {
            AZF_CASE(true, true)
        } else {
            AZF_CASE(true, false)
        }
    } else if (dark != NULL) {
        AZF_CASE(false, true)
    } else {
        AZF_CASE(false, false)
    }
#undef AZF_CASE
}

#endif
