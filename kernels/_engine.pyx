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
- ``work`` (optional): a float64 scratch array of :func:`workspace_doubles` values to reuse
  (one per calling thread; calls running at once need their own); None allocates one.
- The result is a new float64 array of shape (5, npt): rows S, V, W, W2, N (the fields of
  ``BinSums`` in that order).
"""

import math

import numpy as np

cimport openmp
from cython.parallel cimport prange
from libc.float cimport DBL_EPSILON
from libc.math cimport INFINITY, M_PI, NAN, fabs, floor, isfinite, log, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy


cdef extern from "azf_medfilt_select.h":
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


cdef extern from "azf_clip_sweep.h":
    ctypedef struct azf_clip_sums:
        double s, w, q, a, b, x_min, x_max
    ctypedef struct azf_clip_record:
        double* x
        Py_ssize_t n
        double signal_sum
    Py_ssize_t azf_clip_sweep(Py_ssize_t n, double* x, double* w, double* s, double mean,
                              double limit, azf_clip_sums* out,
                              azf_clip_record* record) noexcept nogil
    Py_ssize_t azf_clip_split(Py_ssize_t n, double* x, double* w, double* s, double mean,
                              double limit, double margin, double* cx, double* cw, double* cs,
                              Py_ssize_t* n_cand, azf_clip_sums* near,
                              azf_clip_record* record) noexcept nogil
    Py_ssize_t azf_clip_candidates(Py_ssize_t n, double* x, double* w, double* s, double mean,
                                   double limit, double center, azf_clip_sums* out,
                                   azf_clip_record* record) noexcept nogil
    Py_ssize_t azf_count_above(Py_ssize_t n, const double* x, double bound, double mean,
                               double spread, double pick, double* x_max) noexcept nogil


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


cdef extern from "azf_integrate.h":
    ctypedef struct azf_raw_rule:
        bint float_active
        double value, delta
        bint int_active
        int64_t low
        uint64_t width
    # a C++ template over the frame's dtype: one declaration per raw_t type
    void azf_integrate_row(const uint8_t* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const unsigned short* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const short* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const unsigned int* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const int* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const float* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil
    void azf_integrate_row(const double* raw, Py_ssize_t start, Py_ssize_t stop,
                           Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                           const float* norm, const float* dark, const float* variance,
                           const azf_raw_rule* rule, int var_kind, double* sums) noexcept nogil

    # azf_signal_row: the same template, S and V only (rows whose weights are known)
    bint azf_signal_row(const uint8_t* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const unsigned short* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const short* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const unsigned int* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const int* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const float* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil
    bint azf_signal_row(const double* raw, Py_ssize_t start, Py_ssize_t stop,
                        Py_ssize_t nnz, const int32_t* indices, const float* coefs,
                        const float* dark, const float* variance, const azf_raw_rule* rule,
                        int var_kind, double* sums) noexcept nogil

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


cdef inline Py_ssize_t rows_per_turn(Py_ssize_t npt, int nthreads) noexcept nogil:
    """The rows a thread takes at a time in integrate and sigma_clip: 8 turns per thread,
    4 to 64 rows each. Neighbouring bins share pixels (with pixel splitting each pixel is in
    about three), so a thread that sums them one after the other finds their pixels in its
    own cache; 4 rows at a time sent about half of them to the other core (Eiger 4M, npt
    2167, 2 threads, 2-core Xeon, medians of 60 alternated calls: full-split integrate 12.2 ->
    11.3 ms, sigma-clip 10.7 -> 9.9). Eight turns per thread keep the last turns short enough
    to even out the threads' shares."""
    cdef Py_ssize_t rows = npt // (8 * (nthreads if nthreads > 0 else 1))
    return 4 if rows < 4 else (64 if rows > 64 else rows)

cdef double SQRT_2PI = sqrt(2.0 * M_PI)

#: sigma_clip's default split margin, as a fraction of the clip limit (see sigma_clip)
SPLIT_MARGIN = 0.5

#: dtypes of ``raw`` the kernels read directly (the caller converts anything else)
RAW_DTYPES = tuple(np.dtype(name) for name in
                   ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"))


def workspace_doubles(Py_ssize_t longest_row, int threads):
    """Length (float64 values) of the workspace a kernel call needs (the ``work`` argument).

    Parameters
    ----------
    longest_row : int
        Entries of the table's longest row.
    threads : int
        OpenMP threads of the call.

    Returns
    -------
    int
    """
    return max(1, threads) * WORK_PER_ENTRY * (longest_row + 1)


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
    # what gather_row stored: c only for a table with coefficients (else every c is 1 and
    # N = the entry count), c²·var only when the error model reads a per-entry variance;
    # skipping the other stores saves memory traffic in the gather and the clipping passes
    bint has_c
    bint has_v


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
    ws.has_c = True
    ws.has_v = True
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

    Stores x, w, c, c·signal and c²·var of every entry (medfilt's loop, measured, runs slower
    with conditional stores; integrate and sigma_clip use :func:`gather_row_sums`).

    ``nnz`` (the table's entry count) bounds the prefetching, which runs on into the next row.
    Returns the number of valid entries.
    """
    cdef Py_ssize_t e, m = 0
    cdef int32_t j
    cdef double v = 0.0, n, s, c = 1.0, var = 0.0
    # locals: the module is built without strict aliasing, so the compiler would reload
    # fields of *ws after every store into the arrays
    cdef double* out_x = ws.x
    cdef double* out_w = ws.w
    cdef double* out_c = ws.c
    cdef double* out_s = ws.s
    cdef double* out_v = ws.v
    ws.has_c = True
    ws.has_v = True
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
        out_x[m] = s / n
        out_w[m] = c * n
        out_c[m] = c
        out_s[m] = c * s
        out_v[m] = c * c * var
        m += 1
    return m


cdef struct RowState:
    # what the sigma-clip passes know of the entries kept in a row: their sums S, V, W, W2,
    # N (in that order, as ``BinSums``) and the range of their x
    double sums[5]
    double x_min
    double x_max


cdef struct GatherSums:
    # running sums of gather_row_sums: entries stored, S, V, W, W2, N and the x range
    Py_ssize_t m
    double s, v, w, q, c, x_min, x_max


cdef inline void gather_span(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                             bint prefetch, const int32_t* indices, const float* coefs,
                             const float* norm, const float* dark, const float* variance,
                             const DummyRule* rule, int var_kind, double* out_x,
                             double* out_w, double* out_c, double* out_s, double* out_v,
                             GatherSums* acc) noexcept nogil:
    """Entries start to stop of :func:`gather_row_sums`; ``prefetch`` (a constant at each
    call) when entry ``e + PREFETCH_AHEAD`` exists for every e of the span."""
    cdef Py_ssize_t e, m = acc.m
    cdef int32_t j
    cdef double v = 0.0, n, s, c = 1.0, var = 0.0, x, w, cv
    cdef double sum_s = acc.s, sum_v = acc.v, sum_w = acc.w, sum_w2 = acc.q, sum_c = acc.c
    cdef double x_min = acc.x_min, x_max = acc.x_max
    cdef bint has_c = coefs != NULL
    cdef bint has_v = var_kind != VAR_NONE
    # a local copy: the module is built without strict aliasing, so the fields of *rule
    # would be reloaded after every store into the arrays
    cdef DummyRule local_rule = rule[0]
    for e in range(start, stop):
        if prefetch:
            azf_prefetch(&raw[indices[e + PREFETCH_AHEAD]])
        n = <double> norm[e]
        if n == 0.0:
            continue
        j = indices[e]
        if not read_raw(raw, j, &local_rule, &v):
            continue
        s = v - <double> dark[e] if dark != NULL else v
        x = s / n
        out_x[m] = x
        x_min = x if x < x_min else x_min
        x_max = x if x > x_max else x_max
        if has_c:
            c = <double> coefs[e]
            w = c * n
            s = c * s
            out_c[m] = c
            sum_c += c
        else:
            w = n
        out_w[m] = w
        out_s[m] = s
        sum_s += s
        sum_w += w
        sum_w2 += w * w
        if has_v:
            if var_kind == VAR_POISSON:
                var = v if v > 1.0 else 1.0
            else:
                var = <double> variance[j]
            cv = c * c * var if has_c else var
            out_v[m] = cv
            sum_v += cv
        m += 1
    acc.m = m
    acc.s = sum_s
    acc.v = sum_v
    acc.w = sum_w
    acc.q = sum_w2
    acc.c = sum_c
    acc.x_min = x_min
    acc.x_max = x_max


cdef inline Py_ssize_t gather_row_sums(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                                       Py_ssize_t nnz, const int32_t* indices,
                                       const float* coefs, const float* norm, const float* dark,
                                       const float* variance, const DummyRule* rule,
                                       int var_kind, Workspace* ws,
                                       RowState* row) noexcept nogil:
    """:func:`gather_row` (storing c only with coefficients, c²·var only with a per-entry
    variance) that also sums what it stores, in the same pass.

    ``row.sums`` gets S, W, W2, N and, with a per-entry variance (``var_kind`` not
    VAR_NONE), V = Σ c²·var; without one V is left 0 (the azimuthal V needs the mean: a second
    pass, :func:`azimuthal_variance`). ``row.x_min`` / ``row.x_max`` get the range of x
    (+inf / -inf for an empty row). Each sum is one chain of adds in entry order: the loop
    waits on its loads, not on the adds. Callers pass ``var_kind`` (and NULL for absent
    coefficients or dark current) as constants, so that each call site compiles to a loop
    without the tests of the other cases; the row is cut where the prefetching would run past
    the table, so that the loop does not test it per entry.
    Returns the number of valid entries.
    """
    cdef GatherSums acc
    cdef Py_ssize_t cut = nnz - PREFETCH_AHEAD
    acc.m = 0
    acc.s = acc.v = acc.w = acc.q = acc.c = 0.0
    acc.x_min = INFINITY
    acc.x_max = -INFINITY
    cut = start if cut < start else (stop if cut > stop else cut)
    ws.has_c = coefs != NULL
    ws.has_v = var_kind != VAR_NONE
    gather_span(raw, start, cut, True, indices, coefs, norm, dark, variance, rule, var_kind,
                ws.x, ws.w, ws.c, ws.s, ws.v, &acc)
    gather_span(raw, cut, stop, False, indices, coefs, norm, dark, variance, rule, var_kind,
                ws.x, ws.w, ws.c, ws.s, ws.v, &acc)
    row.sums[0] = acc.s
    row.sums[1] = acc.v
    row.sums[2] = acc.w
    row.sums[3] = acc.q
    row.sums[4] = acc.c if coefs != NULL else <double> acc.m
    row.x_min = acc.x_min
    row.x_max = acc.x_max
    return acc.m


cdef inline double azimuthal_variance(Py_ssize_t n, const double* x, const double* w,
                                     double mean) noexcept nogil:
    """The exact second pass ``Σ w²(x − mean)²`` over the first n entries (0 when n is 0).

    Four partial sums (entry m to sum m % 4), so that the adds do not wait on each other.
    """
    cdef Py_ssize_t m = 0
    cdef double v0 = 0.0, v1 = 0.0, v2 = 0.0, v3 = 0.0, d0, d1, d2, d3
    if n == 0:
        return 0.0
    while m + 3 < n:
        d0 = w[m] * (x[m] - mean)
        d1 = w[m + 1] * (x[m + 1] - mean)
        d2 = w[m + 2] * (x[m + 2] - mean)
        d3 = w[m + 3] * (x[m + 3] - mean)
        v0 += d0 * d0
        v1 += d1 * d1
        v2 += d2 * d2
        v3 += d3 * d3
        m += 4
    while m < n:
        d0 = w[m] * (x[m] - mean)
        v0 += d0 * d0
        m += 1
    return (v0 + v1) + (v2 + v3)


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

cdef inline void integrate_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                               Py_ssize_t nnz,
                               const int32_t* indices, const float* coefs, const float* norm,
                               const float* dark, const float* variance, const DummyRule* rule,
                               const azf_raw_rule* plain_rule, const double* weights,
                               int error_model, double* work, Py_ssize_t maxlen, double* result,
                               Py_ssize_t npt, Py_ssize_t k) noexcept nogil:
    cdef Py_ssize_t n
    cdef RowState row
    cdef double sums[5]
    cdef Workspace ws
    if error_model == MODEL_AZIMUTHAL:
        # exact two-pass variance: keep x and w of the row in the (cache-resident) workspace
        ws = workspace_at(work, maxlen)
        if coefs == NULL and dark == NULL:
            n = gather_row_sums(raw, start, stop, nnz, indices, NULL, norm, NULL, variance,
                                rule, VAR_NONE, &ws, &row)
        else:
            n = gather_row_sums(raw, start, stop, nnz, indices, coefs, norm, dark, variance,
                                rule, VAR_NONE, &ws, &row)
        row.sums[1] = azimuthal_variance(n, ws.x, ws.w, row.sums[0] / row.sums[2]) \
            if n > 0 else 0.0
        store_sums(result, npt, k, row.sums[0], row.sums[1], row.sums[2], row.sums[3],
                   row.sums[4])
        return
    # poisson, hybrid, variance: one pass, a loop compiled for this case (azf_integrate.h).
    # With the row's weights (W, W2, N of the table, see integrate_weights) and every pixel of
    # the row valid, only S and V depend on the frame: the loop skips the norm stream.
    if weights != NULL and weights[k] == weights[k]:
        if azf_signal_row(raw, start, stop, nnz, indices, coefs, dark, variance, plain_rule,
                          variance_kind(error_model), sums):
            store_sums(result, npt, k, sums[0], sums[1], weights[k], weights[npt + k],
                       weights[2 * npt + k])
            return
    azf_integrate_row(raw, start, stop, nnz, indices, coefs, norm, dark, variance, plain_rule,
                      variance_kind(error_model), sums)
    store_sums(result, npt, k, sums[0], sums[1], sums[2], sums[3], sums[4])


cdef void integrate_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                         const int32_t* indices, const float* coefs, const float* norm,
                         const float* dark, const float* variance, const DummyRule* rule,
                         const double* weights, int error_model, double* work,
                         Py_ssize_t maxlen, int nthreads, double* result) noexcept nogil:
    cdef Py_ssize_t k
    cdef azf_raw_rule plain_rule   # the dummy rule in the header's terms
    plain_rule.float_active = rule.active
    plain_rule.value = rule.value
    plain_rule.delta = rule.delta
    plain_rule.int_active = rule.integer_active
    plain_rule.low = rule.low
    plain_rule.width = rule.width
    cdef Py_ssize_t turn = rows_per_turn(npt, nthreads)
    for k in prange(npt, schedule="dynamic", chunksize=turn, num_threads=nthreads):
        integrate_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                      variance, rule, &plain_rule, weights, error_model,
                      work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                      result, npt, k)


# --------------------------------------------------------------------------------------------
# sigma_clip
# --------------------------------------------------------------------------------------------

# Outlier statistics (``OutlierSums``): per bin, after the final sums, the rows
# available, picked, rejected_sum, max_sigma of a (4, npt) float64 array.

# the entries sigma_clip dropped from one row: their x (in a per-thread buffer), count
# and Σ c·signal (x, n, signal_sum)
ctypedef azf_clip_record Rejected


cdef struct ZStats:
    # running picked count and largest z of one row
    Py_ssize_t picked
    double best


cdef inline void keep_best(ZStats* stats, double z) noexcept nogil:
    """The larger of ``stats.best`` and ``z``, NaN ignored."""
    if z == z and (stats.best != stats.best or z > stats.best):
        stats.best = z


cdef inline void add_z_values(ZStats* stats, const double* x, Py_ssize_t n, double mean,
                              double spread, double pick, const uint8_t* chosen,
                              const double* signal, double* rejected_sum) noexcept nogil:
    """Count n entries: z = (x − mean)/spread > pick, and the largest z (NaN z: nowhere).

    With ``chosen`` (not NULL), also add ``signal[m]`` of every entry not chosen to
    ``rejected_sum`` (without a branch: adding 0.0 leaves a sum unchanged), in the same pass.

    The usual case (a finite mean, 0 < spread < inf, pick > 0) divides per entry only when
    some entry comes near the threshold: correctly rounded subtraction and division by
    spread > 0 are monotonic, so the largest z is (the largest x − mean)/spread, and no x at
    or below mean + pick·spread·(1 − 1e-9) − 1e-9·|mean| can give z > pick (the margins
    dwarf the rounding). The results are those of the division per entry, bit for bit.
    """
    cdef Py_ssize_t m = 0
    cdef double d, bound, best_d = -INFINITY
    cdef double out0 = 0.0, out1 = 0.0, out2 = 0.0, out3 = 0.0
    if chosen != NULL:
        # four partial sums, so that the adds do not wait on each other
        while m + 3 < n:
            out0 += signal[m] * <double> (1 - chosen[m])
            out1 += signal[m + 1] * <double> (1 - chosen[m + 1])
            out2 += signal[m + 2] * <double> (1 - chosen[m + 2])
            out3 += signal[m + 3] * <double> (1 - chosen[m + 3])
            m += 4
        while m < n:
            out0 += signal[m] * <double> (1 - chosen[m])
            m += 1
        rejected_sum[0] += (out0 + out1) + (out2 + out3)
    cdef Py_ssize_t candidates = 0
    if isfinite(mean) and spread > 0.0 and spread < INFINITY and pick > 0.0:
        # the largest x (branch-free), and the exact test only on the rare entries above
        # the bound
        bound = (mean + pick * spread * (1.0 - 1e-9)) - 1e-9 * fabs(mean)
        candidates = azf_count_above(n, x, bound, mean, spread, pick, &best_d)
        stats.picked += candidates
        if n > 0:
            keep_best(stats, (best_d - mean) / spread)
        return
    for m in range(n):
        d = (x[m] - mean) / spread
        if d > pick:
            stats.picked += 1
        keep_best(stats, d)


cdef inline void store_stats(double* stats, Py_ssize_t npt, Py_ssize_t k, Py_ssize_t available,
                             const ZStats* z, double rejected_sum) noexcept nogil:
    stats[k] = <double> available
    stats[npt + k] = <double> z.picked
    stats[2 * npt + k] = rejected_sum
    stats[3 * npt + k] = z.best


cdef struct ClipSums:
    # partial sums of the entries one clip sweep keeps: S, W, W2, N, V and, for the azimuthal
    # model, A = Σ (w·d)² and B = Σ w·(w·d) with d = x − (the mean the sweep tested against)
    double s, w, q, c, v, a, b


cdef inline void clear_clip_sums(ClipSums* acc) noexcept nogil:
    acc.s = 0.0
    acc.w = 0.0
    acc.q = 0.0
    acc.c = 0.0
    acc.v = 0.0
    acc.a = 0.0
    acc.b = 0.0


cdef inline void clip_entry(double* x, double* w, double* s, double* c, double* v,
                           Py_ssize_t m, Py_ssize_t* kept, double mean, double limit,
                           bint azimuthal, bint has_c, bint has_v, ClipSums* acc,
                           double* x_range, Rejected* rejected) noexcept nogil:
    """Entry m of :func:`clip_sweep`: record it as dropped, or move it to ``kept`` and sum it.

    The arrays come as separate pointers (not through the Workspace): the module is built
    without strict aliasing, so fields read through a pointer would be reloaded after every
    store.
    """
    cdef double xm = x[m], wm, sm, d
    cdef Py_ssize_t to = kept[0]
    if fabs(xm - mean) > limit:
        if rejected != NULL:
            rejected.x[rejected.n] = xm
            rejected.n += 1
            rejected.signal_sum += s[m]
        return
    wm = w[m]
    sm = s[m]
    if to != m:   # nothing moves before the first dropped entry (a well-predicted branch)
        x[to] = xm
        w[to] = wm
        s[to] = sm
        if has_c:
            c[to] = c[m]
        if has_v:
            v[to] = v[m]
    acc.s += sm
    acc.w += wm
    acc.q += wm * wm
    x_range[0] = xm if xm < x_range[0] else x_range[0]
    x_range[1] = xm if xm > x_range[1] else x_range[1]
    if azimuthal:
        d = wm * (xm - mean)
        acc.a += d * d
        acc.b += wm * d
    if has_c:
        acc.c += c[m]
    if has_v and not azimuthal:
        acc.v += v[m]
    kept[0] = to + 1


cdef inline Py_ssize_t clip_sweep(Py_ssize_t n, double* x, double* w, double* s, double* c,
                                  double* v, double mean, double limit, bint azimuthal,
                                  bint has_c, bint has_v, ClipSums* acc0, ClipSums* acc1,
                                  double* x_range, Rejected* rejected) noexcept nogil:
    """The sweep of :func:`clip_pass` (entry m to partial sums m % 2); returns the kept count.

    Called with constant flags for the usual case, so that it compiles to a loop without
    their tests."""
    cdef Py_ssize_t m = 0, kept = 0
    cdef ClipSums a0, a1
    cdef double r[2]
    clear_clip_sums(&a0)
    clear_clip_sums(&a1)
    r[0] = INFINITY
    r[1] = -INFINITY
    while m + 1 < n:
        clip_entry(x, w, s, c, v, m, &kept, mean, limit, azimuthal, has_c, has_v, &a0, r,
                   rejected)
        clip_entry(x, w, s, c, v, m + 1, &kept, mean, limit, azimuthal, has_c, has_v, &a1, r,
                   rejected)
        m += 2
    if m < n:
        clip_entry(x, w, s, c, v, m, &kept, mean, limit, azimuthal, has_c, has_v, &a0, r,
                   rejected)
    acc0[0] = a0
    acc1[0] = a1
    x_range[0] = r[0]
    x_range[1] = r[1]
    return kept


cdef Py_ssize_t clip_pass(Py_ssize_t n, Workspace* ws, double mean, double limit,
                          bint azimuthal, RowState* row, Rejected* rejected) noexcept nogil:
    """Drop every entry with |x − mean| > limit at once (survivors keep the row order) and,
    when any was dropped, set ``row`` to the survivors' sums and x range, in one sweep.

    The azimuthal V = Σ w²(x − μ)² of the survivors (μ = S/W, not known during the sweep) is
    computed from sums around the tested mean: with d = x − mean and δ = μ − mean,
    V = A − 2δB + δ²·W2 (A = Σ w²d², B = Σ w²d). When δ²·W2 <= A/4, Cauchy-Schwarz
    (|B| <= sqrt(A·W2)) gives V >= A/4, so the terms are at most 9·V in size and V is good to
    a few ulps times 9; otherwise (a mean moved far by the drop, or non-finite values) an exact
    second pass computes it.

    Returns the number of entries kept (n: nothing dropped, ``row`` untouched). With
    ``rejected`` (not NULL) the x and c·signal of each dropped entry are recorded there for
    the outlier statistics, in row order.
    """
    cdef Py_ssize_t kept
    cdef ClipSums acc0, acc1
    cdef azf_clip_sums fast
    cdef Rejected nowhere
    cdef double x_range[2]
    cdef bint has_c = ws.has_c, has_v = ws.has_v
    cdef double delta, shift, total_a, total_b
    if azimuthal and not has_c and not has_v:
        # no splitting, azimuthal model: the usual case, two entries at a time
        if rejected == NULL:
            nowhere.x = NULL
            nowhere.n = 0
            nowhere.signal_sum = 0.0
            rejected = &nowhere
        kept = azf_clip_sweep(n, ws.x, ws.w, ws.s, mean, limit, &fast, rejected)
        acc0.s, acc0.w, acc0.q, acc0.a, acc0.b = fast.s, fast.w, fast.q, fast.a, fast.b
        acc0.c = acc0.v = 0.0
        clear_clip_sums(&acc1)
        x_range[0] = fast.x_min
        x_range[1] = fast.x_max
    else:
        kept = clip_sweep(n, ws.x, ws.w, ws.s, ws.c, ws.v, mean, limit, azimuthal, has_c,
                          has_v, &acc0, &acc1, x_range, rejected)
    if kept == n:
        return n
    row.sums[0] = acc0.s + acc1.s
    row.sums[2] = acc0.w + acc1.w
    row.sums[3] = acc0.q + acc1.q
    row.sums[4] = acc0.c + acc1.c if has_c else <double> kept
    row.x_min = x_range[0]
    row.x_max = x_range[1]
    if not azimuthal:
        row.sums[1] = acc0.v + acc1.v
    elif kept == 0:
        row.sums[1] = 0.0
    else:
        delta = row.sums[0] / row.sums[2] - mean
        shift = delta * delta * row.sums[3]
        total_a = acc0.a + acc1.a
        total_b = acc0.b + acc1.b
        if isfinite(total_a) and isfinite(total_b) and isfinite(shift) \
                and shift <= 0.25 * total_a:
            row.sums[1] = (total_a - 2.0 * delta * total_b) + shift
        else:
            row.sums[1] = azimuthal_variance(kept, ws.x, ws.w, row.sums[0] / row.sums[2])
    return kept


cdef inline bint range_cannot_drop(double x_min, double x_max, double mean,
                                   double limit) noexcept nogil:
    """True when no entry with x in [x_min, x_max] has |x − mean| > limit.

    x − mean is rounded monotonically in x, so |x − mean| is at most the larger of its values
    at x_min and x_max: the answer is exact, not an estimate. False (ask the entries) when
    the mean or the range is not finite.
    """
    cdef double spread, other
    if not (isfinite(mean) and isfinite(x_min) and isfinite(x_max)):
        return False
    spread = fabs(x_max - mean)
    other = fabs(x_min - mean)
    if other > spread:
        spread = other
    return not spread > limit


cdef inline bint cannot_drop(const RowState* row, double mean, double limit) noexcept nogil:
    """True when no kept entry has |x − mean| > limit, known from the x range alone."""
    return range_cannot_drop(row.x_min, row.x_max, mean, limit)


# The candidate passes (usual case: azimuthal model, no coefficients, no per-entry variance).
# A full sweep splits the survivors: those with |x − mean| <= margin (the near entries, most
# of the row) stay in the workspace, the others (the candidates) go to a small buffer. Later
# passes read only the candidates as long as the near entries' x range proves that none of
# them can be dropped (range_cannot_drop against the pass's mean and limit: exact, whatever
# the margin); the near entries' sums, made once by the splitting sweep, are added to the
# kept candidates' sums. When the range cannot prove it (the mean or the limit moved too
# far), the candidates go back behind the near entries and the pass is a full sweep that
# splits again. The kept entries, their count and every drop decision are those of the full
# sweeps; only the order of the sums differs.
cdef struct SplitRow:
    bint active          # the kept entries are split (else all in the workspace)
    Py_ssize_t n_near    # near entries: the first n_near of the workspace's x, w, s
    Py_ssize_t n_cand    # candidates, in cx, cw, cs (row order)
    double* cx
    double* cw
    double* cs
    double center        # the mean of the splitting sweep: near.a, near.b are around it
    azf_clip_sums near   # the near entries' S, W, W2, A, B and x range


cdef inline void split_totals(const SplitRow* split, const azf_clip_sums* cand,
                              const Workspace* ws, Py_ssize_t kept,
                              RowState* row) noexcept nogil:
    """``row`` = the sums and x range of the near entries and the kept candidates.

    V = Σ w²(x − μ)² with μ = S/W from A and B around the split's center, as in
    :func:`clip_pass` (the same bound decides between the sums and an exact second pass).
    """
    cdef double delta, shift, total_a, total_b, mu
    row.sums[0] = split.near.s + cand.s
    row.sums[2] = split.near.w + cand.w
    row.sums[3] = split.near.q + cand.q
    row.sums[4] = <double> kept
    row.x_min = split.near.x_min if split.near.x_min < cand.x_min else cand.x_min
    row.x_max = split.near.x_max if split.near.x_max > cand.x_max else cand.x_max
    if kept == 0:
        row.sums[1] = 0.0
        return
    mu = row.sums[0] / row.sums[2]
    delta = mu - split.center
    shift = delta * delta * row.sums[3]
    total_a = split.near.a + cand.a
    total_b = split.near.b + cand.b
    if isfinite(total_a) and isfinite(total_b) and isfinite(shift) and shift <= 0.25 * total_a:
        row.sums[1] = (total_a - 2.0 * delta * total_b) + shift
    else:
        row.sums[1] = azimuthal_variance(split.n_near, ws.x, ws.w, mu) \
            + azimuthal_variance(split.n_cand, split.cx, split.cw, mu)


cdef Py_ssize_t clip_pass_split(Py_ssize_t n, Workspace* ws, double mean, double limit,
                                double margin, SplitRow* split, RowState* row,
                                Rejected* rejected) noexcept nogil:
    """:func:`clip_pass` of the usual case that also splits the survivors at ``margin``
    (near entries compacted in the workspace, candidates in the split's buffer).

    Returns the kept count (n: nothing dropped, ``row`` untouched; the split is made anyway).
    ``rejected`` must not be NULL (its x NULL to record nothing).
    """
    cdef azf_clip_sums cand
    cdef Rejected nowhere
    cdef Py_ssize_t kept
    split.n_near = azf_clip_split(n, ws.x, ws.w, ws.s, mean, limit, margin, split.cx,
                                  split.cw, split.cs, &split.n_cand, &split.near, rejected)
    split.center = mean
    split.active = True
    kept = split.n_near + split.n_cand
    if kept == n:
        return n
    # the candidates' sums around the same center (an infinite limit keeps them all)
    nowhere.x = NULL
    nowhere.n = 0
    nowhere.signal_sum = 0.0
    azf_clip_candidates(split.n_cand, split.cx, split.cw, split.cs, mean, INFINITY, mean,
                        &cand, &nowhere)
    split_totals(split, &cand, ws, kept, row)
    return kept


cdef Py_ssize_t clip_pass_candidates(Py_ssize_t n, const Workspace* ws, double mean,
                                     double limit, SplitRow* split, RowState* row,
                                     Rejected* rejected) noexcept nogil:
    """The clipping pass over the candidates alone, when no near entry can be dropped
    (the caller checked it with :func:`range_cannot_drop` on the near entries' range).

    Returns the kept count (n: nothing dropped, ``row`` untouched).
    """
    cdef azf_clip_sums cand
    cdef Py_ssize_t kept_cand
    kept_cand = azf_clip_candidates(split.n_cand, split.cx, split.cw, split.cs, mean, limit,
                                    split.center, &cand, rejected)
    if kept_cand == split.n_cand:
        return n
    split.n_cand = kept_cand
    split_totals(split, &cand, ws, split.n_near + kept_cand, row)
    return split.n_near + kept_cand


cdef inline bint near_cannot_drop(const SplitRow* split, double mean,
                                  double limit) noexcept nogil:
    """True when no near entry can be dropped at this mean and limit (exact, from their x
    range; always true without near entries)."""
    if split.n_near == 0:
        return True
    return range_cannot_drop(split.near.x_min, split.near.x_max, mean, limit)


cdef inline Py_ssize_t merge_split(Workspace* ws, SplitRow* split) noexcept nogil:
    """Move the candidates behind the near entries (all kept entries in the workspace
    again); returns their total."""
    cdef size_t size = split.n_cand * sizeof(double)
    if split.n_cand > 0:
        memcpy(ws.x + split.n_near, split.cx, size)
        memcpy(ws.w + split.n_near, split.cw, size)
        memcpy(ws.s + split.n_near, split.cs, size)
    split.active = False
    return split.n_near + split.n_cand


cdef inline void sigma_clip_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                                Py_ssize_t nnz,
                                const int32_t* indices, const float* coefs, const float* norm,
                                const float* dark, const float* variance, const DummyRule* rule,
                                int error_model, double thres, int max_iter, double* work,
                                Py_ssize_t maxlen, double* result,
                                Py_ssize_t npt, Py_ssize_t k, double pick,
                                double* stats, double split_margin) noexcept nogil:
    cdef Workspace ws = workspace_at(work, maxlen)
    cdef Py_ssize_t n, m, kept, available
    cdef SplitRow split
    cdef Rejected nowhere
    cdef bint use_split
    cdef int iteration = 0
    cdef RowState row
    cdef double mean, std, count, cutoff, limit
    cdef Rejected dropped
    cdef Rejected* record = NULL
    cdef ZStats z
    # clip with the azimuthal scatter for azimuthal and hybrid; hybrid reports poisson at the end
    cdef bint clip_azimuthal = error_model == MODEL_AZIMUTHAL or error_model == MODEL_HYBRID
    cdef int var_kind = variance_kind(error_model)
    # one call per variance kind, each with a constant: loops without the others' tests
    if var_kind == VAR_NONE and coefs == NULL and dark == NULL:
        # the usual case (no split, no dark current, azimuthal model)
        n = gather_row_sums(raw, start, stop, nnz, indices, NULL, norm, NULL, variance, rule,
                            VAR_NONE, &ws, &row)
    elif var_kind == VAR_NONE:
        n = gather_row_sums(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule,
                            VAR_NONE, &ws, &row)
    elif var_kind == VAR_POISSON:
        n = gather_row_sums(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule,
                            VAR_POISSON, &ws, &row)
    else:
        n = gather_row_sums(raw, start, stop, nnz, indices, coefs, norm, dark, variance, rule,
                            VAR_ARRAY, &ws, &row)
    if clip_azimuthal:
        row.sums[1] = azimuthal_variance(n, ws.x, ws.w, row.sums[0] / row.sums[2]) \
            if n > 0 else 0.0
    available = n
    if stats != NULL:
        # medfilt's sort buffer is free here: it holds the dropped entries' x
        dropped.x = <double*> ws.items
        dropped.n = 0
        dropped.signal_sum = 0.0
        record = &dropped
    # candidate passes: the usual case only; the candidates in the arrays it leaves unused
    use_split = split_margin >= 0.0 and clip_azimuthal and not ws.has_c and not ws.has_v
    split.active = False
    split.cx = ws.c
    split.cw = ws.v
    split.cs = <double*> ws.scratch
    nowhere.x = NULL
    nowhere.n = 0
    nowhere.signal_sum = 0.0
    while iteration < max_iter:
        iteration += 1
        if row.sums[4] == 0.0:
            break
        mean = row.sums[0] / row.sums[2]
        std = sqrt(row.sums[1] / row.sums[3])
        count = row.sums[4] if row.sums[4] > 3.0 else 3.0
        cutoff = sqrt(2.0 * log(count / SQRT_2PI))
        if cutoff < thres:
            cutoff = thres
        limit = cutoff * std
        if cannot_drop(&row, mean, limit):
            break   # converged, without reading the entries
        if split.active and near_cannot_drop(&split, mean, limit):
            kept = clip_pass_candidates(n, &ws, mean, limit, &split, &row,
                                        record if record != NULL else &nowhere)
        elif use_split:
            if split.active:
                merge_split(&ws, &split)
            kept = clip_pass_split(n, &ws, mean, limit, split_margin * limit, &split, &row,
                                   record if record != NULL else &nowhere)
        else:
            kept = clip_pass(n, &ws, mean, limit, clip_azimuthal, &row, record)
        if kept == n:
            break
        n = kept
    if split.active:
        n = merge_split(&ws, &split)
    if error_model == MODEL_HYBRID:
        row.sums[1] = 0.0
        for m in range(n):
            row.sums[1] += ws.v[m]
    store_sums(result, npt, k, row.sums[0], row.sums[1], row.sums[2], row.sums[3],
               row.sums[4])
    if stats != NULL:
        # z against the final mean and spread, as the results report them
        mean = row.sums[0] / row.sums[2]
        std = sqrt(row.sums[1] / row.sums[3])
        z.picked = 0
        z.best = NAN
        add_z_values(&z, ws.x, n, mean, std, pick, NULL, NULL, NULL)
        add_z_values(&z, dropped.x, dropped.n, mean, std, pick, NULL, NULL, NULL)
        store_stats(stats, npt, k, available, &z, dropped.signal_sum)


cdef void sigma_clip_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                          const int32_t* indices, const float* coefs, const float* norm,
                          const float* dark, const float* variance, const DummyRule* rule,
                          int error_model, double thres, int max_iter, double* work,
                          Py_ssize_t maxlen, int nthreads,
                          double* result, double pick, double* stats,
                          double split_margin) noexcept nogil:
    cdef Py_ssize_t k
    cdef Py_ssize_t turn = rows_per_turn(npt, nthreads)
    for k in prange(npt, schedule="dynamic", chunksize=turn, num_threads=nthreads):
        sigma_clip_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                       variance, rule, error_model, thres, max_iter,
                       work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                       result, npt, k, pick, stats, split_margin)


# --------------------------------------------------------------------------------------------
# medfilt
# --------------------------------------------------------------------------------------------

cdef inline void medfilt_row(const raw_t* raw, Py_ssize_t start, Py_ssize_t stop,
                             Py_ssize_t nnz,
                             const int32_t* indices, const float* coefs, const float* norm,
                             const float* dark, const float* variance, const DummyRule* rule,
                             int error_model, double quant_min, double quant_max, double* work,
                             Py_ssize_t maxlen,
                             double* result, Py_ssize_t npt, Py_ssize_t k, double pick,
                             double* stats) noexcept nogil:
    cdef Workspace ws = workspace_at(work, maxlen)
    cdef Py_ssize_t n, m, slot
    cdef azf_selection selection
    cdef double total = 0.0, w, mean, d
    cdef double sum_s = 0.0, sum_v = 0.0, sum_w = 0.0, sum_w2 = 0.0
    cdef bint negative = False
    cdef uint64_t key, kmin = 0xFFFFFFFFFFFFFFFF, kmax = 0
    cdef uint8_t* chosen
    cdef double spread, rejected_sum = 0.0
    cdef ZStats z
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
    if stats != NULL:
        # the partitioning's second buffer is free now: one flag per gathered entry
        chosen = <uint8_t*> ws.scratch
        for m in range(n):
            chosen[m] = 0
        for m in range(selection.n_out):
            chosen[ws.selected[m]] = 1
        mean = sum_s / sum_w
        spread = sqrt(sum_v / sum_w2)
        z.picked = 0
        z.best = NAN
        add_z_values(&z, ws.x, n, mean, spread, pick, chosen, ws.s, &rejected_sum)
        store_stats(stats, npt, k, n, &z, rejected_sum)


cdef void medfilt_rows(const raw_t* raw, const int64_t* indptr, Py_ssize_t npt,
                       const int32_t* indices, const float* coefs, const float* norm,
                       const float* dark, const float* variance, const DummyRule* rule,
                       int error_model, double quant_min, double quant_max,
                       double* work, Py_ssize_t maxlen, int nthreads,
                       double* result, double pick, double* stats) noexcept nogil:
    cdef Py_ssize_t k
    for k in prange(npt, schedule="dynamic", chunksize=2, num_threads=nthreads):
        medfilt_row(raw, indptr[k], indptr[k + 1], indptr[npt], indices, coefs, norm, dark,
                    variance, rule, error_model, quant_min, quant_max,
                    work + openmp.omp_get_thread_num() * WORK_PER_ENTRY * (maxlen + 1), maxlen,
                    result, npt, k, pick, stats)


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
                        double delta_dummy, error_model, threads, bint need_work, work=None):
    """Check shapes and dtypes once, with the GIL, and collect the raw pointers.

    ``work``: a float64 array of at least :func:`workspace_doubles` values that the call may
    use as its workspace (callers reuse one per thread: a fresh one is megabytes of page
    faults per frame); None allocates one.
    """
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
        if work is not None and work.dtype == np.float64 and work.ndim == 1 \
                and work.shape[0] >= workspace_doubles(longest, call.nthreads):
            call.work = work
        else:
            call.work = np.empty(workspace_doubles(longest, call.nthreads), dtype=np.float64)
        work_view = call.work
        call.work_ptr = &work_view[0]
    return call


def integrate(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
              double delta_dummy, str error_model, threads=None, work=None, row_weights=None):
    """Per-bin sums of a plain integration (see the module docstring for the arguments).

    S = Σ c·signal, W = Σ c·norm, W2 = Σ (c·norm)², N = Σ c, V = Σ c²·var (poisson,
    hybrid, variance) or the exact two-pass azimuthal Σ (c·norm)²(x − S/W)².

    ``row_weights`` (optional): what :func:`integrate_weights` returned for this table. With
    it, the poisson, hybrid and variance models take W, W2 and N of every row whose pixels
    are all valid in this frame from there (the same values, bit for bit) and only sum S and
    V over the row; rows with an invalid pixel are summed in full.

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N.
    """
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads,
                                   error_model == "azimuthal", work)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    cdef const double[:, ::1] weights_view
    cdef const double* weights = NULL
    if row_weights is not None and call.npt > 0:
        weights_view = row_weights
        if weights_view.shape[0] != 3 or weights_view.shape[1] != call.npt:
            raise ValueError(f"row_weights must have shape (3, {call.npt})")
        weights = &weights_view[0, 0]
    if call.npt > 0:
        with nogil:
            integrate_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                           call.dark, call.variance, &call.rule, weights, call.error_model,
                           call.work_ptr, call.maxlen, call.nthreads, call.result_ptr)
    return call.result


def integrate_weights(indptr, indices, coefs, norm, threads=None):
    """W, W2 and N of every row of a table when all its pixels are valid: ``integrate``'s
    ``row_weights``.

    They depend on the table alone (norm and coefficients), so an engine computes them once:
    here with :func:`integrate` on a frame of zeros (every pixel valid), which sums them in
    the order a frame's call would. Rows holding an entry with norm 0 (skipped whatever the
    frame) get NaN: ``integrate`` sums those rows in full.

    Returns
    -------
    numpy.ndarray
        float64, shape (3, npt): W, W2, N (NaN columns for rows to sum in full).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int32)
    norm = np.asarray(norm, dtype=np.float32)
    n_raw = int(indices.max()) + 1 if indices.size else 0
    sums = integrate(np.zeros(n_raw, dtype=np.uint8), indptr, indices, coefs, norm, None, None,
                     None, 0.0, "poisson", threads)
    weights = np.ascontiguousarray(sums[2:5])
    # no negative indices: this module is compiled with wraparound=False, under which they
    # are undefined (a build of the GPU machine's Cython read indptr[:-1] wrongly)
    npt = indptr.shape[0] - 1
    zero_norms = np.concatenate(([0], np.cumsum(norm[:indptr[npt]] == 0)))
    weights[:, zero_norms[indptr[1:npt + 1]] > zero_norms[indptr[0:npt]]] = np.nan
    return weights


def sigma_clip(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
               double delta_dummy, str error_model, double thres, int max_iter, threads=None,
               work=None, double pick=3.0, stats=None, double split_margin=SPLIT_MARGIN):
    """Per-bin sums after iterative azimuthal sigma-clipping (``docs/internals.md``).

    Within each bin, entirely in compiled code: sums with the clipping model (azimuthal for
    azimuthal and hybrid), then at most ``max_iter`` times drop every kept entry with
    ``|x − S/W| > max(thres, sqrt(2 ln(max(3, N)/sqrt(2π))))·sqrt(V/W2)`` and recompute the
    sums; hybrid reports the poisson V of the kept entries. N is the true kept count.

    With ``stats`` (a C-contiguous float64 array of shape (4, npt)) the outlier statistics
    are written there too: per bin the valid entries, those with
    ``(x − S/W)/sqrt(V/W2) > pick`` over the final sums, Σ c·signal of the dropped entries,
    and the largest such z (NaN when none).

    ``split_margin`` (tables without coefficients, azimuthal or no per-entry variance):
    after a full sweep, the later passes re-read only the kept entries with
    ``|x − mean| > split_margin·limit`` of that sweep, while the others' x range proves that
    none of them can be dropped (``docs/internals.md``). It changes how much is read, not
    the kept entries; the sums are the same up to the order of the additions. Negative:
    every pass sweeps all kept entries.

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N.
    """
    if max_iter < 0:
        raise ValueError("max_iter must be >= 0")
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads, True, work)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    cdef double* stats_ptr = stats_pointer(stats, call.npt)
    if call.npt > 0:
        with nogil:
            sigma_clip_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                            call.dark, call.variance, &call.rule, call.error_model, thres,
                            max_iter, call.work_ptr, call.maxlen, call.nthreads,
                            call.result_ptr, pick, stats_ptr, split_margin)
    return call.result


cdef double* stats_pointer(stats, Py_ssize_t npt) except? NULL:
    """The data of a (4, npt) float64 statistics array, or NULL for None."""
    cdef double[:, ::1] view
    if stats is None or npt == 0:
        return NULL
    view = stats
    if view.shape[0] != 4 or view.shape[1] != npt:
        raise ValueError(f"stats must have shape (4, {npt})")
    return &view[0, 0]


def medfilt(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
            double delta_dummy, str error_model, double quant_min, double quant_max,
            threads=None, work=None, double pick=3.0, stats=None):
    """Per-bin sums of the fragments between two weighted quantiles (``docs/internals.md``).

    Fragments (key x = signal/norm, weight w = c·norm) are sorted by (key, pixel index); with
    U the cumulative weight (float64), L the previous U and T the total, fragment m is kept iff
    ``w ≠ 0`` and ``(qmin·T ≤ L and U ≤ qmax·T) or (qmin·T ≥ L and U ≥ qmax·T)``.

    With ``stats`` ((4, npt) float64) the outlier statistics are written there as by
    :func:`sigma_clip`, the selected fragments being the kept ones.

    Returns
    -------
    numpy.ndarray
        float64, shape (5, npt): S, V, W, W2, N (N = number of selected fragments).
    """
    if not (0.0 <= quant_min <= quant_max <= 1.0):
        raise ValueError("quantiles must satisfy 0 <= quant_min <= quant_max <= 1")
    cdef _Call call = prepare_call(raw.shape[0], indptr, indices, coefs, norm, dark, variance,
                                   dummy, delta_dummy, error_model, threads, True, work)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    cdef double* stats_ptr = stats_pointer(stats, call.npt)
    if call.npt > 0:
        with nogil:
            medfilt_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                         call.dark, call.variance, &call.rule, call.error_model, quant_min,
                         quant_max, call.work_ptr, call.maxlen, call.nthreads,
                         call.result_ptr, pick, stats_ptr)
    return call.result
