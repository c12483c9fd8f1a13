/* azf_clip_sweep.h: one clipping sweep of sigma_clip over a bin, two entries at a time
   (azf_clip_sweep; azf_clip_split also splits the survivors into near entries and
   candidates, azf_clip_candidates sweeps the candidates alone: see _engine.pyx's candidate
   passes), and the count of the outlier statistics, azf_count_above.

   Part of the Cython backend (kernels/_engine.pyx includes it, in clip_pass). Plain C++ over
   arrays, no Python objects: the caller holds no GIL. The usual case only (azimuthal model,
   no coefficients, no per-entry variance: the arrays x, w = norm, s = signal); the other
   cases run the generic sweep of _engine.pyx.

   The sweep drops every entry with |x - mean| > limit (the survivors keep the row order) and
   sums the survivors: S = sum s, W = sum w, W2 = sum w^2 and, around the tested mean
   (d = x - mean), A = sum (w d)^2 and B = sum w (w d), plus the range of their x. The scalar
   sweep of _engine.pyx spends its time issuing instructions (about 25 per entry), so this one
   does the same arithmetic on pairs of entries with GCC/Clang vector extensions: SSE2, the
   x86-64 baseline, executes each pair operation as one instruction. A pair holding a dropped
   entry (a few per bin) takes the scalar path.

   Every operation is the IEEE operation of the scalar code, lane by lane: entry m goes to
   partial sum m % 2 whichever path it takes, so the results do not depend on the path and
   the fallback for other compilers gives the same sums bit for bit.
*/
#ifndef AZF_CLIP_SWEEP_H
#define AZF_CLIP_SWEEP_H

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) || defined(__clang__)
typedef double azf_v2d __attribute__((vector_size(16)));
typedef long long azf_v2i __attribute__((vector_size(16)));
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* a > b ? a : b and a < b ? a : b lane by lane (b where either is NaN): one MAXPD / MINPD
   with SSE2, which the compiler does not make of the comparison and masks. */
static inline azf_v2d azf_larger(azf_v2d a, azf_v2d b) {
#if defined(__SSE2__)
    return (azf_v2d) _mm_max_pd((__m128d) a, (__m128d) b);
#else
    azf_v2i pick = a > b;
    return (azf_v2d) (((azf_v2i) a & pick) | ((azf_v2i) b & ~pick));
#endif
}

static inline azf_v2d azf_smaller(azf_v2d a, azf_v2d b) {
#if defined(__SSE2__)
    return (azf_v2d) _mm_min_pd((__m128d) a, (__m128d) b);
#else
    azf_v2i pick = a < b;
    return (azf_v2d) (((azf_v2i) a & pick) | ((azf_v2i) b & ~pick));
#endif
}

/* Whether either lane of a comparison's result is true. */
static inline bool azf_either(azf_v2i mask) {
#if defined(__SSE2__)
    return _mm_movemask_pd((__m128d) mask) != 0;
#else
    return (mask[0] | mask[1]) != 0;
#endif
}
#endif

/* What a sweep returns besides the kept count: totals of the survivors' sums and x range. */
struct azf_clip_sums {
    double s, w, q, a, b;
    double x_min, x_max;
};

/* Where the dropped entries are recorded for the outlier statistics (x and the sum of s);
   x == NULL records nothing. */
struct azf_clip_record {
    double* x;
    Py_ssize_t n;
    double signal_sum;
};

/* Entry m of azf_clip_split: dropped (and recorded) when |x - mean| > limit, else a candidate
   (copied to cx, cw, cs at *n_cand) when |x - mean| > margin, else moved to *kept and added
   to acc (s, w, q, a, b of its lane, around mean) and to the range. */
static inline void azf_split_one(double* x, double* w, double* s, Py_ssize_t m,
                                 Py_ssize_t* kept, double mean, double limit, double margin,
                                 double* cx, double* cw, double* cs, Py_ssize_t* n_cand,
                                 double* acc, double* range, azf_clip_record* record) {
    double xm = x[m];
    double d = xm - mean;
    double dist = std::fabs(d);
    if (dist > limit) {
        if (record->x != NULL) {
            record->x[record->n++] = xm;
            record->signal_sum += s[m];
        }
        return;
    }
    if (dist > margin) {
        Py_ssize_t c = *n_cand;
        cx[c] = xm;
        cw[c] = w[m];
        cs[c] = s[m];
        *n_cand = c + 1;
        return;
    }
    double wm = w[m], sm = s[m];
    Py_ssize_t to = *kept;
    x[to] = xm;
    w[to] = wm;
    s[to] = sm;
    acc[0] += sm;
    acc[1] += wm;
    acc[2] += wm * wm;
    double wd = wm * d;
    acc[3] += wd * wd;
    acc[4] += wm * wd;
    range[0] = xm < range[0] ? xm : range[0];
    range[1] = xm > range[1] ? xm : range[1];
    *kept = to + 1;
}

/* azf_clip_sweep that also splits the survivors: those with |x - mean| > margin (the
   candidates) are copied, in row order, to cx, cw, cs (their count in *n_cand); the others
   (the near entries) are compacted to the front of x, w, s, and summed into *near (around
   mean, with the range of their x). Returns the number of near entries.

   Which survivors are candidates only decides how much later passes read, not what they
   compute: the caller lets a later pass skip the near entries only when their x range
   proves that none of them can be dropped. */
static inline Py_ssize_t azf_clip_split(Py_ssize_t n, double* x, double* w, double* s,
                                        double mean, double limit, double margin,
                                        double* cx, double* cw, double* cs,
                                        Py_ssize_t* n_cand, azf_clip_sums* near,
                                        azf_clip_record* record) {
    Py_ssize_t m = 0, kept = 0;
    double lane0[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    double lane1[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    double range[2] = {INFINITY, -INFINITY};
    /* the fast path's test: the smaller of margin and limit (limit for a NaN margin) */
    double test = margin < limit ? margin : limit;
    *n_cand = 0;
#if defined(__GNUC__) || defined(__clang__)
    typedef azf_v2d v2d;
    typedef azf_v2i v2i;
    const v2d vmean = {mean, mean};
    const v2d vtest = {test, test};
    const v2i no_sign = {0x7fffffffffffffffLL, 0x7fffffffffffffffLL};
    v2d vs = {0.0, 0.0}, vw = {0.0, 0.0}, vq = {0.0, 0.0}, va = {0.0, 0.0}, vb = {0.0, 0.0};
    v2d lo = {INFINITY, INFINITY}, hi = {-INFINITY, -INFINITY};
    for (; m + 1 < n; m += 2) {
        v2d xv, wv, sv;
        std::memcpy(&xv, x + m, sizeof xv);
        v2d d = xv - vmean;
        v2d dist = (v2d) ((v2i) d & no_sign);
        if (azf_either(dist > vtest)) {
            for (int lane = 0; lane < 2; ++lane) {
                double acc[5] = {vs[lane], vw[lane], vq[lane], va[lane], vb[lane]};
                azf_split_one(x, w, s, m + lane, &kept, mean, limit, margin, cx, cw, cs,
                              n_cand, acc, range, record);
                vs[lane] = acc[0];
                vw[lane] = acc[1];
                vq[lane] = acc[2];
                va[lane] = acc[3];
                vb[lane] = acc[4];
            }
            continue;
        }
        std::memcpy(&wv, w + m, sizeof wv);
        std::memcpy(&sv, s + m, sizeof sv);
        if (kept != m) {
            std::memcpy(x + kept, &xv, sizeof xv);
            std::memcpy(w + kept, &wv, sizeof wv);
            std::memcpy(s + kept, &sv, sizeof sv);
        }
        kept += 2;
        vs += sv;
        vw += wv;
        vq += wv * wv;
        v2d wd = wv * d;
        va += wd * wd;
        vb += wv * wd;
        lo = azf_smaller(xv, lo);
        hi = azf_larger(xv, hi);
    }
    const v2d sums[5] = {vs, vw, vq, va, vb};
    for (int k = 0; k < 5; ++k) {
        lane0[k] = sums[k][0];
        lane1[k] = sums[k][1];
    }
    for (int lane = 0; lane < 2; ++lane) {
        range[0] = lo[lane] < range[0] ? lo[lane] : range[0];
        range[1] = hi[lane] > range[1] ? hi[lane] : range[1];
    }
#else
    for (; m + 1 < n; m += 2) {
        azf_split_one(x, w, s, m, &kept, mean, limit, margin, cx, cw, cs, n_cand, lane0,
                      range, record);
        azf_split_one(x, w, s, m + 1, &kept, mean, limit, margin, cx, cw, cs, n_cand, lane1,
                      range, record);
    }
#endif
    if (m < n)
        azf_split_one(x, w, s, m, &kept, mean, limit, margin, cx, cw, cs, n_cand, lane0,
                      range, record);
    near->s = lane0[0] + lane1[0];
    near->w = lane0[1] + lane1[1];
    near->q = lane0[2] + lane1[2];
    near->a = lane0[3] + lane1[3];
    near->b = lane0[4] + lane1[4];
    near->x_min = range[0];
    near->x_max = range[1];
    return kept;
}

/* One clipping sweep: drops every entry with |x - mean| > limit (recorded), compacts the
   survivors to the front of x, w, s and sums them into *out (around mean, with their x
   range). Returns the number kept. It is azf_clip_split with an infinite margin (no
   survivor is a candidate): the same vector path and the same sums, in the same order. */
static inline Py_ssize_t azf_clip_sweep(Py_ssize_t n, double* x, double* w, double* s,
                                        double mean, double limit, azf_clip_sums* out,
                                        azf_clip_record* record) {
    Py_ssize_t no_candidates = 0;
    return azf_clip_split(n, x, w, s, mean, limit, INFINITY, NULL, NULL, NULL,
                          &no_candidates, out, record);
}

/* The clipping sweep over the candidates alone (few entries, one at a time): drops every
   entry with |x - mean| > limit (recorded; survivors compacted in order) and sums the
   survivors into *out, A and B around center (not the tested mean: the near entries'
   sums are around the mean of the sweep that split them). Returns the kept count. */
static inline Py_ssize_t azf_clip_candidates(Py_ssize_t n, double* x, double* w, double* s,
                                             double mean, double limit, double center,
                                             azf_clip_sums* out, azf_clip_record* record) {
    Py_ssize_t kept = 0;
    double sum_s = 0.0, sum_w = 0.0, sum_q = 0.0, sum_a = 0.0, sum_b = 0.0;
    double lo = INFINITY, hi = -INFINITY;
    for (Py_ssize_t m = 0; m < n; ++m) {
        double xm = x[m];
        if (std::fabs(xm - mean) > limit) {
            if (record->x != NULL) {
                record->x[record->n++] = xm;
                record->signal_sum += s[m];
            }
            continue;
        }
        double wm = w[m], sm = s[m];
        x[kept] = xm;
        w[kept] = wm;
        s[kept] = sm;
        ++kept;
        sum_s += sm;
        sum_w += wm;
        sum_q += wm * wm;
        double wd = wm * (xm - center);
        sum_a += wd * wd;
        sum_b += wm * wd;
        lo = xm < lo ? xm : lo;
        hi = xm > hi ? xm : hi;
    }
    out->s = sum_s;
    out->w = sum_w;
    out->q = sum_q;
    out->a = sum_a;
    out->b = sum_b;
    out->x_min = lo;
    out->x_max = hi;
    return kept;
}

/* The outlier statistics' count over a bin's x: how many x > bound have (x - mean) / spread
   > pick (the exact test, on the few above the bound), and the largest x (-inf when n is
   0), two entries at a time. */
static inline Py_ssize_t azf_count_above(Py_ssize_t n, const double* x, double bound,
                                         double mean, double spread, double pick,
                                         double* x_max) {
    Py_ssize_t m = 0, count = 0;
    double hi_s = -INFINITY;
#if defined(__GNUC__) || defined(__clang__)
    typedef azf_v2d v2d;
    typedef azf_v2i v2i;
    const v2d vbound = {bound, bound};
    v2d hi = {-INFINITY, -INFINITY};
    for (; m + 1 < n; m += 2) {
        v2d xv;
        std::memcpy(&xv, x + m, sizeof xv);
        hi = azf_larger(xv, hi);
        if (azf_either(xv > vbound)) {
            count += (xv[0] > bound && (xv[0] - mean) / spread > pick);
            count += (xv[1] > bound && (xv[1] - mean) / spread > pick);
        }
    }
    hi_s = hi[0] > hi[1] ? hi[0] : hi[1];
#endif
    for (; m < n; ++m) {
        hi_s = x[m] > hi_s ? x[m] : hi_s;
        count += (x[m] > bound && (x[m] - mean) / spread > pick);
    }
    *x_max = hi_s;
    return count;
}

#endif
