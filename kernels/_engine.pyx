# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled kernels of the Cython backend: per-bin sums of integrate, sigma_clip and medfilt.

Arrays in, arrays out, GIL released, OpenMP over the radial bins (rows of the CSR table).
The per-pixel preprocessing of ``docs/internals.md`` is fused into the loop over the entries
of a row, so no per-pixel temporary array is made; every per-pixel value is computed in
float64 as the Python reference does.

Conventions shared by the three operations:

- ``raw``: the frame, flat (C order), in its own dtype (one of :data:`RAW_DTYPES`);
  ``raw[indices[e]]`` is the pixel of CSR entry ``e``. Every index must be ``< len(raw)``
  (the caller checks this once per table, not per frame).
- ``indptr`` (int64, npt+1), ``indices`` (int32), ``coefs`` (float32, or None when every
  coefficient is 1, which skips the loads and multiplies): the CSR table, rows = radial bins.
- ``norm`` (float32) and ``dark`` (float32 or None) are **per entry**, already gathered in CSR
  order (``pixel_norm[indices]``), so the hot loop reads them as streams. Entries with
  ``norm == 0`` are invalid and skipped.
- ``variance`` (float32 or None): per *pixel*, like ``raw`` (required by the variance model).
- ``dummy`` (float or None) and ``delta_dummy``: pixels with ``|raw - dummy| <= delta_dummy``
  are invalid; so are non-finite pixels.
- ``error_model``: ``"poisson"``, ``"azimuthal"``, ``"hybrid"`` or ``"variance"``.
- ``threads``: number of OpenMP threads; 0 or None means :func:`default_threads`.
- The result is a new float64 array of shape (5, npt): rows S, V, W, W2, N (the fields of
  ``BinSums`` in that order).
"""

import math

import numpy as np

cimport openmp
from cython.parallel cimport prange
from libc.float cimport DBL_EPSILON
from libc.math cimport M_PI, fabs, floor, isfinite, log, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


cdef extern from *:
    """
    #include <cstdint>
    #include <cstring>
    #include <cmath>

    /* One fragment of a bin in medfilt: its corrected value mapped to an unsigned integer with
       the same order, and its position in the row. Rows list their pixels in increasing index,
       so keeping the row order among equal keys (a stable order) breaks ties by pixel index,
       as the contract asks. */
    struct azf_item {
        uint64_t key;
        int64_t slot;
    };

    static inline uint64_t azf_sortable_key(double x) {
        x += 0.0;  /* -0.0 -> +0.0: the two compare equal and must tie */
        uint64_t bits;
        std::memcpy(&bits, &x, sizeof bits);
        return (bits >> 63) ? ~bits : (bits | 0x8000000000000000ULL);
    }

    /* Index of the highest set bit of a non-zero value. */
    static inline int azf_top_bit(uint64_t value) {
    #if defined(__GNUC__) || defined(__clang__)
        return 63 - __builtin_clzll(value);
    #else
        int bit = 0;
        while (value >>= 1) ++bit;
        return bit;
    #endif
    }

    static inline void azf_insertion_sort(azf_item* items, Py_ssize_t n) {
        for (Py_ssize_t i = 1; i < n; ++i) {
            azf_item cur = items[i];
            Py_ssize_t j = i;
            while (j > 0 && items[j - 1].key > cur.key) { items[j] = items[j - 1]; --j; }
            items[j] = cur;
        }
    }

    /* Stable sort of items[0:n) by key (tmp[0:n) is scratch); returns items or tmp, whichever
       holds the result. LSD radix sort on bytes, skipping the bytes all keys share. */
    static inline azf_item* azf_sort_items(azf_item* items, azf_item* tmp, Py_ssize_t n) {
        if (n < 48) { azf_insertion_sort(items, n); return items; }
        Py_ssize_t counts[8][256];
        std::memset(counts, 0, sizeof counts);
        for (Py_ssize_t i = 0; i < n; ++i) {
            uint64_t k = items[i].key;
            for (int d = 0; d < 8; ++d) counts[d][(k >> (8 * d)) & 255u]++;
        }
        azf_item* src = items;
        azf_item* dst = tmp;
        for (int d = 0; d < 8; ++d) {
            Py_ssize_t* c = counts[d];
            if (c[(src[0].key >> (8 * d)) & 255u] == n) continue;  /* all share this byte */
            Py_ssize_t offsets[256];
            Py_ssize_t total = 0;
            for (int b = 0; b < 256; ++b) { offsets[b] = total; total += c[b]; }
            for (Py_ssize_t i = 0; i < n; ++i)
                dst[offsets[(src[i].key >> (8 * d)) & 255u]++] = src[i];
            azf_item* swap = src; src = dst; dst = swap;
        }
        return src;
    }

    /* The quantile rule of medfilt, for one fragment of weight w spanning [lower, upper] of the
       cumulative weight: inside [lo, hi], or covering all of it. */
    static inline bool azf_selected(double w, double lower, double upper, double lo, double hi) {
        return w != 0.0 && ((lo <= lower && upper <= hi) || (lo >= lower && upper >= hi));
    }

    /* Selection state of one bin. The fast path cumulates weights in another order than the
       reference (sorted order, one by one), so its cumulative weights may differ from the
       reference's by rounding, up to `tol`; any comparison closer than that to deciding the
       other way sets `uncertain`, and the bin is then redone exactly (azf_select_exact).
       Comparisons with lo or hi equal to 0 are exact in any order (weights are >= 0). */
    struct azf_selection {
        const double* weight;  /* by slot */
        double lo, hi;
        double tol;
        bool uncertain;
        int64_t* out;          /* selected slots */
        Py_ssize_t n_out;
    };

    static inline bool azf_near(double value, double bound, double tol) {
        return bound != 0.0 && std::fabs(value - bound) <= tol;
    }

    /* Walk items already in key order (ties in row order), cumulating from `base`. */
    static inline void azf_walk(azf_selection* sel, const azf_item* items, Py_ssize_t n,
                                double base) {
        double upper = base;
        for (Py_ssize_t i = 0; i < n; ++i) {
            double w = sel->weight[items[i].slot];
            double lower = upper;
            upper = upper + w;
            if (w == 0.0) continue;
            if (azf_near(lower, sel->lo, sel->tol) || azf_near(upper, sel->hi, sel->tol))
                sel->uncertain = true;
            if (azf_selected(w, lower, upper, sel->lo, sel->hi))
                sel->out[sel->n_out++] = items[i].slot;
        }
    }

    enum { AZF_NONE = 0, AZF_ALL = 1, AZF_REFINE = 2 };

    /* Decide a run of fragments without ordering it: none can be selected when the run ends
       below lo or starts above hi, all (but those of weight 0) when it lies inside [lo, hi]. */
    static inline int azf_classify(azf_selection* sel, double base, double total) {
        double end = base + total;
        double lo = sel->lo, hi = sel->hi, tol = sel->tol;
        if (azf_near(base, lo, tol) || azf_near(end, lo, tol) || azf_near(base, hi, tol) ||
                azf_near(end, hi, tol))
            sel->uncertain = true;
        if (end < lo || base > hi) return AZF_NONE;
        if (lo <= base && end <= hi) return AZF_ALL;
        return AZF_REFINE;
    }

    /* The reference computation: stable sort of all fragments by key, cumulative weights one
       by one in that order, T = the last one. items is rebuilt by the caller. */
    static inline void azf_select_exact(azf_selection* sel, azf_item* items, azf_item* scratch,
                                        Py_ssize_t n, double quant_min, double quant_max) {
        azf_item* sorted = azf_sort_items(items, scratch, n);
        double total = 0.0;
        for (Py_ssize_t i = 0; i < n; ++i) total = total + sel->weight[sorted[i].slot];
        sel->lo = quant_min * total;
        sel->hi = quant_max * total;
        sel->tol = -1.0;
        sel->n_out = 0;
        azf_walk(sel, sorted, n, 0.0);
    }

    /* Weighted quantile selection by recursive radix partitioning (a radix "select": only the
       runs that straddle lo or hi are ever ordered). items[0:n) are the fragments of a run of
       consecutive key ranks, in row order, with keys in [kmin, kmax] and cumulative weight
       `base` before them; scratch has room for n + 1 items and sel->out for one more slot than
       it will hold. Appends the selected slots to sel->out. */
    static void azf_select_run(azf_selection* sel, azf_item* items, azf_item* scratch,
                               Py_ssize_t n, double base, uint64_t kmin, uint64_t kmax) {
        if (n <= 32) {
            azf_insertion_sort(items, n);
            azf_walk(sel, items, n, base);
            return;
        }
        if (kmin == kmax) {  /* all tied: the row order is the order */
            azf_walk(sel, items, n, base);
            return;
        }
        const double* weight_of = sel->weight;
        int top = azf_top_bit(kmax - kmin);
        int shift = top > 7 ? top - 7 : 0;
        /* histogram of counts and weights; two interleaved copies so that runs of one bucket
           do not serialise on a single memory location */
        Py_ssize_t count[2][256];
        double weight[2][256];
        std::memset(count, 0, sizeof count);
        std::memset(weight, 0, sizeof weight);
        Py_ssize_t i = 0;
        for (; i + 1 < n; i += 2) {
            unsigned b0 = (unsigned) ((items[i].key - kmin) >> shift);
            unsigned b1 = (unsigned) ((items[i + 1].key - kmin) >> shift);
            count[0][b0]++;
            weight[0][b0] += weight_of[items[i].slot];
            count[1][b1]++;
            weight[1][b1] += weight_of[items[i + 1].slot];
        }
        if (i < n) {
            unsigned b0 = (unsigned) ((items[i].key - kmin) >> shift);
            count[0][b0]++;
            weight[0][b0] += weight_of[items[i].slot];
        }
        if (count[0][(unsigned) ((items[0].key - kmin) >> shift)] +
                count[1][(unsigned) ((items[0].key - kmin) >> shift)] == n) {
            /* one bucket holds everything: narrow to the true key range and start again */
            uint64_t low = items[0].key, high = items[0].key;
            for (i = 1; i < n; ++i) {
                low = items[i].key < low ? items[i].key : low;
                high = items[i].key > high ? items[i].key : high;
            }
            if (low == high) { azf_walk(sel, items, n, base); return; }
            if (low != kmin || high != kmax) {
                azf_select_run(sel, items, scratch, n, base, low, high);
                return;
            }
        }
        /* classify each bucket from its cumulative weight; only straddling buckets get room in
           scratch, the others write to the sink slot n */
        Py_ssize_t offset[256];
        Py_ssize_t step[256];
        unsigned char take[256];
        Py_ssize_t start[256];
        double bucket_base[256];
        double cum = base;
        Py_ssize_t pos = 0;
        int n_refine = 0;
        int refine[256];
        for (int b = 0; b < 256; ++b) {
            Py_ssize_t c = count[0][b] + count[1][b];
            double wb = weight[0][b] + weight[1][b];
            int kind = c ? azf_classify(sel, cum, wb) : AZF_NONE;
            take[b] = kind == AZF_ALL;
            if (kind == AZF_REFINE) {
                offset[b] = pos;
                start[b] = pos;
                step[b] = 1;
                bucket_base[b] = cum;
                count[0][b] = c;
                refine[n_refine++] = b;
                pos += c;
            } else {
                offset[b] = n;
                step[b] = 0;
            }
            cum += wb;
        }
        int64_t* out = sel->out;
        Py_ssize_t n_out = sel->n_out;
        for (i = 0; i < n; ++i) {
            azf_item item = items[i];
            unsigned b = (unsigned) ((item.key - kmin) >> shift);
            scratch[offset[b]] = item;
            offset[b] += step[b];
            out[n_out] = item.slot;
            n_out += take[b] & (weight_of[item.slot] != 0.0);
        }
        sel->n_out = n_out;
        /* recurse on the straddling buckets, in key order: their fragments are in scratch, the
           matching part of items is their scratch */
        for (int r = 0; r < n_refine; ++r) {
            int b = refine[r];
            uint64_t low = kmin + ((uint64_t) b << shift);
            uint64_t high = low + (((uint64_t) 1 << shift) - 1);
            if (high > kmax || high < low) high = kmax;
            azf_select_run(sel, scratch + start[b], items + start[b], count[0][b],
                           bucket_base[b], low, high);
        }
    }
    """
    ctypedef struct azf_item:
        uint64_t key
        int64_t slot
    ctypedef struct azf_selection:
        const double* weight
        double lo
        double hi
        double tol
        bint uncertain
        int64_t* out
        Py_ssize_t n_out
    uint64_t azf_sortable_key(double x) noexcept nogil
    azf_item* azf_sort_items(azf_item* items, azf_item* tmp, Py_ssize_t n) noexcept nogil
    void azf_walk(azf_selection* sel, const azf_item* items, Py_ssize_t n,
                  double base) noexcept nogil
    void azf_select_exact(azf_selection* sel, azf_item* items, azf_item* scratch, Py_ssize_t n,
                          double quant_min, double quant_max) noexcept nogil
    void azf_select_run(azf_selection* sel, azf_item* items, azf_item* scratch, Py_ssize_t n,
                        double base, uint64_t kmin, uint64_t kmax) noexcept nogil


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define azf_prefetch(address) __builtin_prefetch(address)
    #else
    #define azf_prefetch(address) ((void) 0)
    #endif
    """
    void azf_prefetch(const void* address) noexcept nogil


ctypedef fused raw_t:
    uint8_t
    unsigned short
    short
    unsigned int
    int
    float
    double


cdef enum:
    MODEL_POISSON = 0
    MODEL_AZIMUTHAL = 1
    MODEL_HYBRID = 2
    MODEL_VARIANCE = 3

#: error model name -> code used inside the kernels
ERROR_MODEL_CODES = {"poisson": MODEL_POISSON, "azimuthal": MODEL_AZIMUTHAL,
                     "hybrid": MODEL_HYBRID, "variance": MODEL_VARIANCE}

# What the gather step stores as the per-entry variance term c²·var.
cdef enum:
    VAR_NONE = 0       # azimuthal: the variance comes from the scatter in the bin
    VAR_POISSON = 1    # max(raw, 1)
    VAR_ARRAY = 2      # the user's variance array

# Per-thread workspace, in doubles per entry of the longest row: x, w, c, c·signal, c²·var
# (5 arrays), medfilt's two 16-byte sort buffers (2 doubles each) and its selected slots (1).
cdef enum:
    WORK_PER_ENTRY = 10

# How many entries ahead the gather loops prefetch the pixel they will read.
cdef enum:
    PREFETCH_AHEAD = 128

cdef double SQRT_2PI = sqrt(2.0 * M_PI)

#: dtypes of ``raw`` the kernels read directly (the caller converts anything else)
RAW_DTYPES = tuple(np.dtype(name) for name in
                   ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"))


def default_threads():
    """Number of OpenMP threads used when none is asked for (``OMP_NUM_THREADS`` or all cores).

    Returns
    -------
    int
    """
    return openmp.omp_get_max_threads()


# --------------------------------------------------------------------------------------------
# Per-entry preprocessing and per-row sums
# --------------------------------------------------------------------------------------------

cdef struct Workspace:
    double* x           # corrected value signal/norm
    double* w           # c·norm
    double* c           # coefficient
    double* s           # c·signal
    double* v           # c²·var
    azf_item* items     # medfilt: sort keys and positions in the row
    azf_item* scratch   # medfilt: the partitioning's second buffer
    int64_t* selected   # medfilt: positions of the selected fragments


cdef inline Workspace workspace_at(double* base, Py_ssize_t maxlen) noexcept nogil:
    cdef Workspace ws
    maxlen += 1  # room for the sink slot of medfilt's partitioning
    ws.x = base
    ws.w = base + maxlen
    ws.c = base + 2 * maxlen
    ws.s = base + 3 * maxlen
    ws.v = base + 4 * maxlen
    ws.items = <azf_item*> (base + 5 * maxlen)
    ws.scratch = <azf_item*> (base + 7 * maxlen)
    ws.selected = <int64_t*> (base + 9 * maxlen)
    return ws


cdef struct DummyRule:
    # raw values flagging invalid pixels: |raw - value| <= delta (float frames), or the same
    # set of integers as the range low <= raw <= low + width (integer frames: cheaper)
    bint active
    double value, delta
    bint integer_active
    int64_t low
    uint64_t width


cdef inline bint read_raw(const raw_t* raw, Py_ssize_t j, const DummyRule* rule,
                          double* value) noexcept nogil:
    """Pixel ``j`` as float64 into ``value``; False when it is invalid (non-finite or dummy)."""
    cdef double v = <double> raw[j]
    if raw_t is float or raw_t is double:
        if not isfinite(v):
            return False
        if rule.active and fabs(v - rule.value) <= rule.delta:
            return False
    else:
        if rule.integer_active and <uint64_t> (<int64_t> raw[j] - rule.low) <= rule.width:
            return False
    value[0] = v
    return True


cdef inline Py_ssize_t gather_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                                  Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                                  const float* norm, const float* dark, const float* variance,
                                  const DummyRule* rule, int var_kind,
                                  Workspace* ws) noexcept nogil:
    """Preprocess the valid entries of one row into the workspace, keeping the row order.

    ``nnz`` (the table's entry count) bounds the prefetching, which runs on into the next row.
    Returns the number of valid entries.
    """
    cdef Py_ssize_t e, m = 0
    cdef int32_t j
    cdef double v = 0.0, n, s, c = 1.0, var = 0.0
    for e in range(start, stop):
        if e + PREFETCH_AHEAD < nnz:
            azf_prefetch(&raw[indices[e + PREFETCH_AHEAD]])
        n = <double> norm[e]
        if n == 0.0:
            continue
        j = indices[e]
        if not read_raw(raw, j, rule, &v):
            continue
        s = v - <double> dark[e] if dark != NULL else v
        if coefs != NULL:
            c = <double> coefs[e]
        if var_kind == VAR_POISSON:
            var = v if v > 1.0 else 1.0
        elif var_kind == VAR_ARRAY:
            var = <double> variance[j]
        ws.x[m] = s / n
        ws.w[m] = c * n
        ws.c[m] = c
        ws.s[m] = c * s
        ws.v[m] = c * c * var
        m += 1
    return m


cdef inline void row_sums(Py_ssize_t n, const Workspace* ws, bint azimuthal,
                          double* sums) noexcept nogil:
    """S, V, W, W2, N over the first n gathered entries.

    V is the exact two-pass azimuthal ``Σ w²(x − S/W)²`` or ``Σ c²·var``. Two interleaved
    partial sums per quantity keep the adds from waiting on each other.
    """
    cdef Py_ssize_t m = 0
    cdef double s0 = 0.0, s1 = 0.0, w0 = 0.0, w1 = 0.0, q0 = 0.0, q1 = 0.0
    cdef double c0 = 0.0, c1 = 0.0, v0 = 0.0, v1 = 0.0
    cdef double mean, d0, d1
    while m + 1 < n:
        s0 += ws.s[m]
        s1 += ws.s[m + 1]
        w0 += ws.w[m]
        w1 += ws.w[m + 1]
        q0 += ws.w[m] * ws.w[m]
        q1 += ws.w[m + 1] * ws.w[m + 1]
        c0 += ws.c[m]
        c1 += ws.c[m + 1]
        m += 2
    if m < n:
        s0 += ws.s[m]
        w0 += ws.w[m]
        q0 += ws.w[m] * ws.w[m]
        c0 += ws.c[m]
    sums[0] = s0 + s1
    sums[2] = w0 + w1
    sums[3] = q0 + q1
    sums[4] = c0 + c1
    m = 0
    if azimuthal:
        if n > 0:
            mean = sums[0] / sums[2]
            while m + 1 < n:
                d0 = ws.w[m] * (ws.x[m] - mean)
                d1 = ws.w[m + 1] * (ws.x[m + 1] - mean)
                v0 += d0 * d0
                v1 += d1 * d1
                m += 2
            if m < n:
                d0 = ws.w[m] * (ws.x[m] - mean)
                v0 += d0 * d0
    else:
        while m + 1 < n:
            v0 += ws.v[m]
            v1 += ws.v[m + 1]
            m += 2
        if m < n:
            v0 += ws.v[m]
    sums[1] = v0 + v1


cdef inline void store_sums(double* result, Py_ssize_t npt, Py_ssize_t k, double sum_s,
                            double sum_v, double sum_w, double sum_w2,
                            double sum_n) noexcept nogil:
    result[k] = sum_s
    result[npt + k] = sum_v
    result[2 * npt + k] = sum_w
    result[3 * npt + k] = sum_w2
    result[4 * npt + k] = sum_n


cdef inline int variance_kind(int error_model) noexcept nogil:
    """The per-pixel variance the error model reads (hybrid reads poisson for its final V)."""
    if error_model == MODEL_VARIANCE:
        return VAR_ARRAY
    if error_model == MODEL_AZIMUTHAL:
        return VAR_NONE
    return VAR_POISSON


# --------------------------------------------------------------------------------------------
# integrate
# --------------------------------------------------------------------------------------------

cdef inline void accumulate_entry(const raw_t* raw, Py_ssize_t e, const int32_t* indices,
                                  const float* coefs, const float* norm, const float* dark,
                                  const float* variance, const DummyRule* rule, int var_kind,
                                  double* acc) noexcept nogil:
    """Add entry e to the sums acc = (S, V, W, W2, N) when its pixel is valid."""
    cdef int32_t j
    cdef double v = 0.0, nrm, s, c, w, var
    nrm = <double> norm[e]
    if nrm == 0.0:
        return
    j = indices[e]
    if not read_raw(raw, j, rule, &v):
        return
    s = v - <double> dark[e] if dark != NULL else v
    if var_kind == VAR_POISSON:
        var = v if v > 1.0 else 1.0
    else:
        var = <double> variance[j]
    if coefs == NULL:
        # no splitting: every coefficient is 1, so skip its load and the multiplies
        acc[0] += s
        acc[1] += var
        acc[2] += nrm
        acc[3] += nrm * nrm
        acc[4] += 1.0
    else:
        c = <double> coefs[e]
        w = c * nrm
        acc[0] += c * s
        acc[1] += c * c * var
        acc[2] += w
        acc[3] += w * w
        acc[4] += c


cdef inline void integrate_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                               Py_ssize_t nnz,
                               const int32_t* indices, const float* coefs, const float* norm,
                               const float* dark, const float* variance, const DummyRule* rule,
                               int error_model, double* work, Py_ssize_t maxlen, double* result,
                               Py_ssize_t npt,
                               Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t n
    cdef double sums[5]
    cdef int var_kind = variance_kind(error_model)
    cdef Workspace ws
    if error_model == MODEL_AZIMUTHAL:
        # exact two-pass variance: keep x and w of the row in the (cache-resident) workspace
        ws = workspace_at(work, maxlen)
        n = gather_row(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule, VAR_NONE,
                       &ws)
        row_sums(n, &ws, True, sums)
        store_sums(result, npt, k, sums[0], sums[1], sums[2], sums[3], sums[4])
        return
    integrate_loop(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule, var_kind,
                   result, npt, k)


cdef inline void integrate_loop(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                                Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                                const float* norm, const float* dark, const float* variance,
                                const DummyRule* rule, int var_kind, double* result,
                                Py_ssize_t npt, Py_ssize_t k) noexcept nogil:
    """Sums of one row in one pass (poisson / hybrid / variance models)."""
    cdef Py_ssize_t e
    cdef double acc0[5]
    cdef double acc1[5]
    # entries alternate between two sets of sums so that the adds overlap
    for e in range(5):
        acc0[e] = 0.0
        acc1[e] = 0.0
    e = start
    while e + 1 < stop:
        if e + PREFETCH_AHEAD + 1 < nnz:
            azf_prefetch(&raw[indices[e + PREFETCH_AHEAD]])
            azf_prefetch(&raw[indices[e + PREFETCH_AHEAD + 1]])
        accumulate_entry(raw, e, indices, coefs, norm, dark, variance, rule, var_kind, acc0)
        accumulate_entry(raw, e + 1, indices, coefs, norm, dark, variance, rule, var_kind, acc1)
        e += 2
    if e < stop:
        accumulate_entry(raw, e, indices, coefs, norm, dark, variance, rule, var_kind, acc0)
    store_sums(result, npt, k, acc0[0] + acc1[0], acc0[1] + acc1[1], acc0[2] + acc1[2],
               acc0[3] + acc1[3], acc0[4] + acc1[4])


cdef void integrate_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                         const int32_t* indices, const float* coefs, const float* norm,
                         const float* dark, const float* variance, const DummyRule* rule,
                         int error_model, double* work, Py_ssize_t maxlen, int nthreads,
                         double* result) noexcept nogil:
    cdef Py_ssize_t k
    for k in prange(npt, schedule="dynamic", chunksize=4, num_threads=nthreads):
        integrate_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                      variance, rule, error_model,
                      work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                      result, npt, k)


# --------------------------------------------------------------------------------------------
# sigma_clip
# --------------------------------------------------------------------------------------------

cdef inline Py_ssize_t drop_outliers(Py_ssize_t n, Workspace* ws, double mean,
                                     double limit) noexcept nogil:
    """Drop every entry with |x − mean| > limit at once; survivors keep the row order."""
    cdef Py_ssize_t m, kept = 0
    for m in range(n):
        if fabs(ws.x[m] - mean) > limit:
            continue
        if kept != m:
            ws.x[kept] = ws.x[m]
            ws.w[kept] = ws.w[m]
            ws.c[kept] = ws.c[m]
            ws.s[kept] = ws.s[m]
            ws.v[kept] = ws.v[m]
        kept += 1
    return kept


cdef inline void sigma_clip_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                                Py_ssize_t nnz,
                                const int32_t* indices, const float* coefs, const float* norm,
                                const float* dark, const float* variance, const DummyRule* rule,
                                int error_model, double thres, int max_iter, double* work,
                                Py_ssize_t maxlen, double* result,
                                Py_ssize_t npt, Py_ssize_t k) noexcept nogil:
    cdef Workspace ws = workspace_at(work, maxlen)
    cdef Py_ssize_t n, m, kept
    cdef int iteration = 0
    cdef double sums[5]
    cdef double mean, std, count, cutoff
    # clip with the azimuthal scatter for azimuthal and hybrid; hybrid reports poisson at the end
    cdef bint clip_azimuthal = error_model == MODEL_AZIMUTHAL or error_model == MODEL_HYBRID
    n = gather_row(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule,
                   variance_kind(error_model), &ws)
    row_sums(n, &ws, clip_azimuthal, sums)
    while iteration < max_iter:
        iteration += 1
        if sums[4] == 0.0:
            break
        mean = sums[0] / sums[2]
        std = sqrt(sums[1] / sums[3])
        count = sums[4] if sums[4] > 3.0 else 3.0
        cutoff = sqrt(2.0 * log(count / SQRT_2PI))
        if cutoff < thres:
            cutoff = thres
        kept = drop_outliers(n, &ws, mean, cutoff * std)
        if kept == n:
            break
        n = kept
        row_sums(n, &ws, clip_azimuthal, sums)
    if error_model == MODEL_HYBRID:
        sums[1] = 0.0
        for m in range(n):
            sums[1] += ws.v[m]
    store_sums(result, npt, k, sums[0], sums[1], sums[2], sums[3], sums[4])


cdef void sigma_clip_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                          const int32_t* indices, const float* coefs, const float* norm,
                          const float* dark, const float* variance, const DummyRule* rule,
                          int error_model, double thres, int max_iter, double* work,
                          Py_ssize_t maxlen, int nthreads,
                          double* result) noexcept nogil:
    cdef Py_ssize_t k
    for k in prange(npt, schedule="dynamic", chunksize=4, num_threads=nthreads):
        sigma_clip_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                       variance, rule, error_model, thres, max_iter,
                       work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                       result, npt, k)


# --------------------------------------------------------------------------------------------
# medfilt
# --------------------------------------------------------------------------------------------

cdef inline void medfilt_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                             Py_ssize_t nnz,
                             const int32_t* indices, const float* coefs, const float* norm,
                             const float* dark, const float* variance, const DummyRule* rule,
                             int error_model, double quant_min, double quant_max, double* work,
                             Py_ssize_t maxlen,
                             double* result, Py_ssize_t npt, Py_ssize_t k) noexcept nogil:
    cdef Workspace ws = workspace_at(work, maxlen)
    cdef Py_ssize_t n, m, slot
    cdef azf_selection selection
    cdef double total = 0.0, w, mean, d
    cdef double sum_s = 0.0, sum_v = 0.0, sum_w = 0.0, sum_w2 = 0.0
    cdef bint negative = False
    cdef uint64_t key, kmin = 0xFFFFFFFFFFFFFFFF, kmax = 0
    n = gather_row(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule,
                   variance_kind(error_model), &ws)
    for m in range(n):
        key = azf_sortable_key(ws.x[m])
        ws.items[m].key = key
        ws.items[m].slot = m
        kmin = key if key < kmin else kmin
        kmax = key if key > kmax else kmax
        total += ws.w[m]
        negative = negative or ws.w[m] < 0.0
    selection.weight = ws.w
    selection.lo = quant_min * total
    selection.hi = quant_max * total
    # bound on how far the fast path's cumulative weights can be from the reference's
    selection.tol = 4.0 * (n + 1) * DBL_EPSILON * total
    selection.uncertain = False
    selection.out = ws.selected
    selection.n_out = 0
    if n > 0 and not negative:
        azf_select_run(&selection, ws.items, ws.scratch, n, 0.0, kmin, kmax)
    if n > 0 and (negative or selection.uncertain):
        # negative weights (cumulative weights not monotonic) or a decision within rounding
        # of the bounds: order everything and cumulate one by one, as the reference does
        for m in range(n):
            ws.items[m].key = azf_sortable_key(ws.x[m])
            ws.items[m].slot = m
        azf_select_exact(&selection, ws.items, ws.scratch, n, quant_min, quant_max)
    for m in range(selection.n_out):
        slot = ws.selected[m]
        w = ws.w[slot]
        sum_s += ws.s[slot]
        sum_w += w
        sum_w2 += w * w
        sum_v += ws.v[slot]
    if error_model == MODEL_AZIMUTHAL:
        sum_v = 0.0
        if selection.n_out > 0:
            mean = sum_s / sum_w
            for m in range(selection.n_out):
                slot = ws.selected[m]
                d = ws.w[slot] * (ws.x[slot] - mean)
                sum_v += d * d
    store_sums(result, npt, k, sum_s, sum_v, sum_w, sum_w2, <double> selection.n_out)


cdef void medfilt_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                       const int32_t* indices, const float* coefs, const float* norm,
                       const float* dark, const float* variance, const DummyRule* rule,
                       int error_model, double quant_min, double quant_max,
                       double* work, Py_ssize_t maxlen, int nthreads,
                       double* result) noexcept nogil:
    cdef Py_ssize_t k
    for k in prange(npt, schedule="dynamic", chunksize=2, num_threads=nthreads):
        medfilt_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                    variance, rule, error_model, quant_min, quant_max,
                    work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                    result, npt, k)


# --------------------------------------------------------------------------------------------
# Python entry points
# --------------------------------------------------------------------------------------------

cdef class _Call:
    """Validated pointers and sizes of one kernel call (built with the GIL held)."""
    cdef const int64_t* indptr
    cdef const int32_t* indices
    cdef const float* coefs
    cdef const float* norm
    cdef const float* dark
    cdef const float* variance
    cdef Py_ssize_t npt, maxlen
    cdef DummyRule rule
    cdef int error_model, nthreads
    cdef object result, work, keep_alive
    cdef double* result_ptr
    cdef double* work_ptr


# integer frames: dummy ranges are clipped to this (beyond every 32-bit value)
cdef int64_t DUMMY_RANGE_LIMIT = 1 << 34


cdef set_dummy_rule(DummyRule* rule, dummy, double delta_dummy):
    """The dummy test for float frames, and the same set of values as an integer range."""
    rule.active = dummy is not None
    rule.value = float(dummy) if dummy is not None else 0.0
    rule.delta = delta_dummy
    rule.integer_active = False
    rule.low = 0
    rule.width = 0
    if not rule.active or not isfinite(rule.value) or not delta_dummy >= 0:
        return
    limit = DUMMY_RANGE_LIMIT

    def flagged(candidate):
        # the float test itself, on an integer value (exact in float64 up to the limit)
        return abs(float(candidate) - rule.value) <= rule.delta

    low = max(-limit, min(limit, math.ceil(max(-2.0 * limit, rule.value - delta_dummy))))
    high = max(-limit, min(limit, math.floor(min(2.0 * limit, rule.value + delta_dummy))))
    # settle the ends on the float test (rounding of value ± delta)
    while low > -limit and flagged(low - 1):
        low -= 1
    while low <= high and not flagged(low):
        low += 1
    while high < limit and flagged(high + 1):
        high += 1
    while high >= low and not flagged(high):
        high -= 1
    if low <= high:
        rule.integer_active = True
        rule.low = low
        rule.width = high - low


cdef _Call prepare_call(Py_ssize_t n_raw, indptr, indices, coefs, norm, dark, variance, dummy,
                        double delta_dummy, error_model, threads, bint need_work):
    """Check shapes and dtypes once, with the GIL, and collect the raw pointers."""
    cdef _Call call = _Call()
    cdef const int64_t[::1] indptr_view = indptr
    cdef const int32_t[::1] indices_view = indices
    cdef const float[::1] norm_view = norm
    cdef const float[::1] coefs_view
    cdef const float[::1] dark_view
    cdef const float[::1] variance_view
    cdef double[:, ::1] result_view
    cdef double[::1] work_view
    cdef Py_ssize_t npt = indptr_view.shape[0] - 1, nnz, k, longest = 0
    if npt < 0:
        raise ValueError("indptr must have npt + 1 >= 1 elements")
    nnz = indptr_view[npt]
    if indptr_view[0] != 0 or nnz > indices_view.shape[0] or nnz > norm_view.shape[0]:
        raise ValueError("indptr does not match indices / norm")
    for k in range(npt):
        if indptr_view[k + 1] < indptr_view[k]:
            raise ValueError("indptr must be non-decreasing")
        if indptr_view[k + 1] - indptr_view[k] > longest:
            longest = indptr_view[k + 1] - indptr_view[k]
    call.keep_alive = (indptr, indices, coefs, norm, dark, variance)
    call.indptr = &indptr_view[0]
    call.indices = &indices_view[0] if indices_view.shape[0] > 0 else NULL
    call.norm = &norm_view[0] if norm_view.shape[0] > 0 else NULL
    call.coefs = NULL
    if coefs is not None:
        coefs_view = coefs
        if coefs_view.shape[0] < nnz:
            raise ValueError("coefs is shorter than the table")
        if nnz > 0:
            call.coefs = &coefs_view[0]
    call.dark = NULL
    if dark is not None:
        dark_view = dark
        if dark_view.shape[0] < nnz:
            raise ValueError("dark (per entry) is shorter than the table")
        if nnz > 0:
            call.dark = &dark_view[0]
    if error_model not in ERROR_MODEL_CODES:
        raise ValueError(f"unknown error model {error_model!r}")
    call.error_model = ERROR_MODEL_CODES[error_model]
    call.variance = NULL
    if variance is not None:
        variance_view = variance
        if variance_view.shape[0] != n_raw:
            raise ValueError("variance must have one value per pixel of raw")
        if n_raw > 0:
            call.variance = &variance_view[0]
    elif call.error_model == MODEL_VARIANCE:
        raise ValueError("the variance error model needs a variance array")
    set_dummy_rule(&call.rule, dummy, delta_dummy)
    call.nthreads = int(threads) if threads else 0
    if call.nthreads <= 0:
        call.nthreads = openmp.omp_get_max_threads()
    call.npt = npt
    call.maxlen = longest
    call.result = np.zeros((5, npt), dtype=np.float64)
    if npt > 0:
        result_view = call.result
        call.result_ptr = &result_view[0, 0]
    call.work_ptr = NULL
    if need_work:
        call.work = np.empty(call.nthreads * WORK_PER_ENTRY * (longest + 1), dtype=np.float64)
        work_view = call.work
        call.work_ptr = &work_view[0]
    return call


def integrate(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
              double delta_dummy, str error_model, threads=None):
    """Per-bin sums of a plain integration (see the module docstring for the arguments).

    S = Σ c·signal, W = Σ c·norm, W2 = Σ (c·norm)², N = Σ c, V = Σ c²·var (poisson,
    hybrid, variance) or the exact two-pass azimuthal Σ (c·norm)²(x − S/W)².

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N.
    """
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads,
                                   error_model == "azimuthal")
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    if call.npt > 0:
        with nogil:
            integrate_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                           call.dark, call.variance, &call.rule, call.error_model, call.work_ptr,
                           call.maxlen, call.nthreads, call.result_ptr)
    return call.result


def sigma_clip(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
               double delta_dummy, str error_model, double thres, int max_iter, threads=None):
    """Per-bin sums after iterative azimuthal sigma-clipping (``docs/internals.md``).

    Within each bin, entirely in compiled code: sums with the clipping model (azimuthal for
    azimuthal and hybrid), then at most ``max_iter`` times drop every kept entry with
    ``|x − S/W| > max(thres, sqrt(2 ln(max(3, N)/sqrt(2π))))·sqrt(V/W2)`` and recompute the
    sums; hybrid reports the poisson V of the kept entries. N is the true kept count.

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N.
    """
    if max_iter < 0:
        raise ValueError("max_iter must be >= 0")
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads, True)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    if call.npt > 0:
        with nogil:
            sigma_clip_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                            call.dark, call.variance, &call.rule, call.error_model, thres,
                            max_iter, call.work_ptr, call.maxlen, call.nthreads,
                            call.result_ptr)
    return call.result


def medfilt(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
            double delta_dummy, str error_model, double quant_min, double quant_max,
            threads=None):
    """Per-bin sums of the fragments between two weighted quantiles (``docs/internals.md``).

    Fragments (key x = signal/norm, weight w = c·norm) are sorted by (key, pixel index); with
    U the cumulative weight (float64), L the previous U and T the total, fragment m is kept iff
    ``w ≠ 0`` and ``(qmin·T ≤ L and U ≤ qmax·T) or (qmin·T ≥ L and U ≥ qmax·T)``.

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N (N = number of selected fragments).
    """
    if not (0.0 <= quant_min <= quant_max <= 1.0):
        raise ValueError("quantiles must satisfy 0 <= quant_min <= quant_max <= 1")
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads, True)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    if call.npt > 0:
        with nogil:
            medfilt_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                         call.dark, call.variance, &call.rule, call.error_model, quant_min,
                         quant_max, call.work_ptr, call.maxlen, call.nthreads,
                         call.result_ptr)
    return call.result


# --------------------------------------------------------------------------------------------
# Full-split lookup table
# --------------------------------------------------------------------------------------------

cdef inline double area_left_of(const double* x, const double* y, const double* slope,
                                double t) noexcept nogil:
    """F(t): Σ over the edges k→k+1 of ∫ y dx with the edge clipped to x <= t."""
    cdef double total = 0.0, xa, xb, ya, yb
    cdef int k
    for k in range(4):
        xa = x[k] if x[k] < t else t
        xb = x[(k + 1) & 3] if x[(k + 1) & 3] < t else t
        ya = y[k] + (xa - x[k]) * slope[k]
        yb = y[k] + (xb - x[k]) * slope[k]
        total += (xb - xa) * (ya + yb) * 0.5
    return total


cdef inline Py_ssize_t pixel_split(const double* radial, const double* chi, Py_ssize_t row_stride,
                                   const double* centers, Py_ssize_t pixel, double lo,
                                   double delta, Py_ssize_t npt, double degenerate_area,
                                   double* left, double* coefs,
                                   Py_ssize_t* first_bin) noexcept nogil:
    """Coefficients of one pixel over the bins first_bin[0] + s, s < the returned span.

    ``radial``/``chi`` point at the pixel's corner A in the corner grids (B is one grid row
    below, D one column right). Mirrors :func:`azfilter.binning.csr_fullsplit`: exact areas of
    the quadrilateral A, B, C, D in (x = (radial − lo)/δ, χ) per strip, normalised over the
    strips inside [0, npt); a degenerate (zero-area) pixel goes whole to its centre's bin.
    """
    cdef double x[4]
    cdef double y[4]
    cdef double slope[4]
    cdef double x_min, x_max, y_min, y_max, first, last, whole = 0.0, dx, t, in_range
    cdef double center, center_bin
    cdef Py_ssize_t first_in, last_in, span, s, column
    cdef int k
    x[0] = (radial[0] - lo) / delta
    x[1] = (radial[row_stride] - lo) / delta
    x[2] = (radial[row_stride + 1] - lo) / delta
    x[3] = (radial[1] - lo) / delta
    x_min = x[0]
    x_max = x[0]
    for k in range(1, 4):
        x_min = x[k] if x[k] < x_min else x_min
        x_max = x[k] if x[k] > x_max else x_max
    first = floor(x_min)
    last = floor(x_max)
    if last < 0 or first >= npt:
        return 0
    first_in = <Py_ssize_t> first if first > 0 else 0
    last_in = <Py_ssize_t> last if last < npt - 1 else npt - 1
    span = last_in - first_in + 1
    first_bin[0] = first_in
    if first == last:
        coefs[0] = 1.0
        return 1
    # χ relative to corner A, unwrapped across the ±π cut
    y[0] = 0.0
    y[1] = chi[row_stride] - chi[0]
    y[2] = chi[row_stride + 1] - chi[0]
    y[3] = chi[1] - chi[0]
    for k in range(1, 4):
        if y[k] > M_PI:
            y[k] -= 2.0 * M_PI
        if y[k] < -M_PI:
            y[k] += 2.0 * M_PI
    for k in range(4):
        dx = x[(k + 1) & 3] - x[k]
        slope[k] = (y[(k + 1) & 3] - y[k]) / dx if dx != 0 else 0.0
        whole += dx * (y[k] + y[(k + 1) & 3]) * 0.5
    for s in range(span + 1):
        t = <double> (first_in + s)
        left[s] = whole if t >= x_max else 0.0
        if x_min < t < x_max:
            left[s] = area_left_of(x, y, slope, t)
    in_range = 0.0
    for s in range(span):
        coefs[s] = left[s + 1] - left[s]
        in_range += coefs[s]
    y_min = y[0]
    y_max = y[0]
    for k in range(1, 4):
        y_min = y[k] if y[k] < y_min else y_min
        y_max = y[k] if y[k] > y_max else y_max
    if fabs(whole) <= degenerate_area * (x_max - x_min) * (y_max - y_min):
        # zero area: whole, into the centre's bin if that is in range (clipped to the
        # bins of the corners, against rounding)
        for s in range(span):
            coefs[s] = 0.0
        if centers != NULL:
            center = (centers[pixel] - lo) / delta
        else:
            center = (x[0] + x[1] + x[2] + x[3]) * 0.25
        center_bin = floor(center)
        if center_bin >= 0 and center_bin < first_in + span:
            column = <Py_ssize_t> (center_bin - first_in)
            column = 0 if column < 0 else (span - 1 if column > span - 1 else column)
            coefs[column] = 1.0
    elif in_range != 0.0:
        for s in range(span):
            coefs[s] = coefs[s] / in_range
    else:
        for s in range(span):
            coefs[s] = 0.0
    return span


cdef void split_rows(const double* radial, const double* chi, const uint8_t* usable,
                     const double* centers, Py_ssize_t n1, Py_ssize_t n2, Py_ssize_t row_start,
                     Py_ssize_t row_stop, double lo, double delta, Py_ssize_t npt,
                     double degenerate_area, double* work, int64_t* counts,
                     int64_t* positions, int32_t* indices, float* coefs) noexcept nogil:
    """Entries of the pixels of rows [row_start, row_stop), in pixel then bin order.

    Counting pass (``positions`` NULL): add each entry to ``counts[bin]``. Filling pass: write
    entry (bin, pixel, coef) at ``positions[bin]`` and advance it.
    """
    cdef Py_ssize_t i, j, pixel, span, s, first_bin = 0, at
    cdef double* left = work
    cdef double* pixel_coefs = work + npt + 2
    for i in range(row_start, row_stop):
        for j in range(n2):
            pixel = i * n2 + j
            if not usable[pixel]:
                continue
            span = pixel_split(radial + i * (n2 + 1) + j, chi + i * (n2 + 1) + j, n2 + 1,
                               centers, pixel, lo, delta, npt, degenerate_area, left,
                               pixel_coefs, &first_bin)
            for s in range(span):
                if pixel_coefs[s] == 0.0:
                    continue
                if positions == NULL:
                    counts[first_bin + s] += 1
                else:
                    at = positions[first_bin + s]
                    positions[first_bin + s] = at + 1
                    indices[at] = <int32_t> pixel
                    coefs[at] = <float> pixel_coefs[s]


def fullsplit_table(radial_corners, chi_corners, usable, radial_center, double lo, double delta,
                    Py_ssize_t npt, double degenerate_area, threads=None):
    """Full-split lookup table: the compiled equivalent of ``binning.csr_fullsplit``'s loop.

    Parameters
    ----------
    radial_corners, chi_corners : numpy.ndarray
        float64 ``(N1+1, N2+1)``: radial value (internal units) and χ (rad) at pixel corners.
    usable : numpy.ndarray
        bool ``(N1, N2)``: the pixels that enter the table (every corner finite).
    radial_center : numpy.ndarray or None
        float64 ``(N1, N2)``: where a zero-area pixel goes (default: mean of its corners).
    lo, delta : float
        Lower bin bound and bin width, internal units.
    npt : int
        Number of bins.
    degenerate_area : float
        A pixel whose area is at most this times its bounding box is degenerate.
    threads : int, optional
        OpenMP threads (default :func:`default_threads`).

    Returns
    -------
    indptr, indices, coefs : numpy.ndarray
        int64 ``npt + 1``, int32, float32; rows in increasing pixel order.
    """
    cdef const double[:, ::1] radial = np.ascontiguousarray(radial_corners, dtype=np.float64)
    cdef const double[:, ::1] chi = np.ascontiguousarray(chi_corners, dtype=np.float64)
    cdef const uint8_t[:, ::1] use = np.ascontiguousarray(usable, dtype=bool).view(np.uint8)
    cdef const double[:, ::1] centers_view
    cdef const double* centers = NULL
    cdef Py_ssize_t n1 = use.shape[0], n2 = use.shape[1]
    cdef Py_ssize_t n_blocks, rows_per_block, block, b, nnz
    cdef int nthreads = int(threads) if threads else 0
    if radial.shape[0] != n1 + 1 or radial.shape[1] != n2 + 1 or \
            chi.shape[0] != n1 + 1 or chi.shape[1] != n2 + 1:
        raise ValueError("corner grids must have shape (N1 + 1, N2 + 1) of the usable mask")
    if npt < 1 or not delta > 0:
        raise ValueError("npt must be >= 1 and delta > 0")
    if radial_center is not None:
        centers_view = np.ascontiguousarray(radial_center, dtype=np.float64)
        if centers_view.shape[0] != n1 or centers_view.shape[1] != n2:
            raise ValueError("radial_center must have the shape of the usable mask")
        if n1 * n2 > 0:
            centers = &centers_view[0, 0]
    if nthreads <= 0:
        nthreads = openmp.omp_get_max_threads()
    indptr = np.zeros(npt + 1, dtype=np.int64)
    if n1 == 0 or n2 == 0:
        return indptr, np.zeros(0, np.int32), np.zeros(0, np.float32)
    # blocks of whole rows, in pixel order: per-block counts give each block its place in
    # every row of the table, so the rows come out in increasing pixel order
    n_blocks = min(n1, 8 * nthreads)
    rows_per_block = (n1 + n_blocks - 1) // n_blocks
    n_blocks = (n1 + rows_per_block - 1) // rows_per_block
    cdef int64_t[:, ::1] counts = np.zeros((n_blocks, npt), dtype=np.int64)
    cdef double[::1] work = np.empty(nthreads * (2 * npt + 4), dtype=np.float64)
    cdef const double* radial_ptr = &radial[0, 0]
    cdef const double* chi_ptr = &chi[0, 0]
    cdef const uint8_t* use_ptr = &use[0, 0]
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", num_threads=nthreads):
            split_rows(radial_ptr, chi_ptr, use_ptr, centers, n1, n2, block * rows_per_block,
                       min((block + 1) * rows_per_block, n1), lo, delta, npt,
                       degenerate_area,
                       &work[openmp.omp_get_thread_num() * (2 * npt + 4)],
                       &counts[block, 0], NULL, NULL, NULL)
    per_bin = np.asarray(counts).sum(axis=0)
    np.cumsum(per_bin, out=indptr[1:])
    nnz = int(indptr[npt])
    # positions[block, bin]: where the block's first entry of the bin goes
    positions_array = np.cumsum(np.asarray(counts), axis=0) - np.asarray(counts) + indptr[:npt]
    cdef int64_t[:, ::1] positions = np.ascontiguousarray(positions_array, dtype=np.int64)
    indices_array = np.empty(nnz, dtype=np.int32)
    coefs_array = np.empty(nnz, dtype=np.float32)
    cdef int32_t[::1] indices_view = indices_array
    cdef float[::1] coefs_view = coefs_array
    if nnz == 0:
        return indptr, indices_array, coefs_array
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", num_threads=nthreads):
            split_rows(radial_ptr, chi_ptr, use_ptr, centers, n1, n2, block * rows_per_block,
                       min((block + 1) * rows_per_block, n1), lo, delta, npt,
                       degenerate_area,
                       &work[openmp.omp_get_thread_num() * (2 * npt + 4)],
                       NULL, &positions[block, 0], &indices_view[0], &coefs_view[0])
    return indptr, indices_array, coefs_array


def nosplit_table(radial_center, usable, double lo, double delta, Py_ssize_t npt):
    """No-split lookup table: the compiled equivalent of ``binning.csr_nosplit``'s binning.

    Pixel ``j`` (with ``usable[j]``) goes to bin ``floor((radial[j] - lo) / delta)`` when that is
    in ``[0, npt)``; rows list their pixels in increasing index (a counting sort: count, prefix
    sum, scatter in pixel order).

    Parameters
    ----------
    radial_center : numpy.ndarray
        float64, flat: radial value of each pixel centre (internal units).
    usable : numpy.ndarray
        bool, flat: the pixels that may enter the table.
    lo, delta : float
        Lower bin bound and bin width.
    npt : int
        Number of bins.

    Returns
    -------
    indptr, indices : numpy.ndarray
        int64 ``npt + 1`` and int32.
    """
    cdef const double[::1] radial = np.ascontiguousarray(radial_center, dtype=np.float64).ravel()
    cdef const uint8_t[::1] use = np.ascontiguousarray(usable, dtype=bool).ravel().view(np.uint8)
    cdef Py_ssize_t n = radial.shape[0], j, k
    cdef double position
    if use.shape[0] != n:
        raise ValueError("usable must have one value per pixel")
    if npt < 1 or not delta > 0:
        raise ValueError("npt must be >= 1 and delta > 0")
    bins_array = np.empty(n, dtype=np.int32)
    indptr_array = np.zeros(npt + 1, dtype=np.int64)
    cdef int32_t[::1] bins = bins_array
    cdef int64_t[::1] indptr = indptr_array
    with nogil:
        for j in range(n):
            bins[j] = -1
            if use[j] and isfinite(radial[j]):
                position = floor((radial[j] - lo) / delta)
                if position >= 0 and position < npt:
                    bins[j] = <int32_t> position
                    indptr[bins[j] + 1] += 1
        for k in range(npt):
            indptr[k + 1] += indptr[k]
    indices_array = np.empty(indptr_array[npt], dtype=np.int32)
    cdef int32_t[::1] indices = indices_array
    cdef int64_t[::1] fill = indptr_array[:npt].copy()
    with nogil:
        for j in range(n):
            if bins[j] >= 0:
                indices[fill[bins[j]]] = <int32_t> j
                fill[bins[j]] += 1
    return indptr_array, indices_array


def finite_extent(radial_center, usable):
    """``(min, max, count)`` of the finite values of ``radial_center`` where ``usable``."""
    cdef const double[::1] radial = np.ascontiguousarray(radial_center, dtype=np.float64).ravel()
    cdef const uint8_t[::1] use = np.ascontiguousarray(usable, dtype=bool).ravel().view(np.uint8)
    cdef Py_ssize_t n = radial.shape[0], j, count = 0
    cdef double low = math.inf, high = -math.inf, value
    if use.shape[0] != n:
        raise ValueError("usable must have one value per pixel")
    with nogil:
        for j in range(n):
            value = radial[j]
            if use[j] and isfinite(value):
                count += 1
                if value < low:
                    low = value
                if value > high:
                    high = value
    return low, high, count
