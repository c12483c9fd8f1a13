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
from libc.math cimport M_PI, fabs, floor, isfinite, log, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint64_t


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
                                  Workspace* ws, bint skip_unused=False) noexcept nogil:
    """Preprocess the valid entries of one row into the workspace, keeping the row order.

    With ``skip_unused`` (callers that read c and c²·var only through ``ws.has_c`` and
    ``ws.has_v``: row_sums, drop_outliers), c is stored only for a table with coefficients
    and c²·var only when the error model has a per-entry variance. medfilt keeps every store
    (its loop, measured, runs slower with the conditional stores).

    ``nnz`` (the table's entry count) bounds the prefetching, which runs on into the next row.
    Returns the number of valid entries.
    """
    cdef Py_ssize_t e, m = 0
    cdef int32_t j
    cdef double v = 0.0, n, s, c = 1.0, var = 0.0
    # locals: the module is built without strict aliasing, so the compiler would reload
    # fields of *ws after every store into the arrays
    cdef bint has_c = coefs != NULL or not skip_unused
    cdef bint has_v = var_kind != VAR_NONE or not skip_unused
    cdef double* out_x = ws.x
    cdef double* out_w = ws.w
    cdef double* out_c = ws.c
    cdef double* out_s = ws.s
    cdef double* out_v = ws.v
    ws.has_c = has_c
    ws.has_v = has_v
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
        if has_c:
            out_c[m] = c
        out_s[m] = c * s
        if has_v:
            out_v[m] = c * c * var
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
    if ws.has_c:
        while m + 1 < n:
            c0 += ws.c[m]
            c1 += ws.c[m + 1]
            m += 2
        if m < n:
            c0 += ws.c[m]
    else:
        # every coefficient is 1: the two partial sums of ones are exact, so is their sum
        c0 = <double> n
    m = 0
    while m + 1 < n:
        s0 += ws.s[m]
        s1 += ws.s[m + 1]
        w0 += ws.w[m]
        w1 += ws.w[m + 1]
        q0 += ws.w[m] * ws.w[m]
        q1 += ws.w[m + 1] * ws.w[m + 1]
        m += 2
    if m < n:
        s0 += ws.s[m]
        w0 += ws.w[m]
        q0 += ws.w[m] * ws.w[m]
    sums[0] = s0 + s1
    sums[2] = w0 + w1
    sums[3] = q0 + q1
    sums[4] = c0 + c1
    m = 0
    if azimuthal:
        sums[1] = azimuthal_variance(n, ws, sums)
        return
    else:
        while m + 1 < n:
            v0 += ws.v[m]
            v1 += ws.v[m + 1]
            m += 2
        if m < n:
            v0 += ws.v[m]
    sums[1] = v0 + v1


cdef inline double azimuthal_variance(Py_ssize_t n, const Workspace* ws,
                                     const double* sums) noexcept nogil:
    """The exact second pass ``Σ w²(x − S/W)²`` over the first n entries (0 when n is 0)."""
    cdef Py_ssize_t m = 0
    cdef double v0 = 0.0, v1 = 0.0, mean, d0, d1
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
    return v0 + v1


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
                       &ws, True)
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
                                     double limit, bint azimuthal, double* sums) noexcept nogil:
    """Drop every entry with |x − mean| > limit at once (survivors keep the row order) and,
    when any was dropped, set ``sums`` to the survivors' :func:`row_sums`.

    One read-only sweep finds the first outlier (a converged row ends there); the entries
    before it are summed as they are, and the rest is compacted and summed in the same
    sweep. Every partial sum receives the same values in the same order as in
    :func:`row_sums` (kept entry m goes to partial sum m % 2), so the sums are identical.
    Returns the number of entries kept (n: nothing dropped, ``sums`` untouched).
    """
    cdef Py_ssize_t m = 0, first = 0, kept
    cdef double s0 = 0.0, s1 = 0.0, w0 = 0.0, w1 = 0.0, q0 = 0.0, q1 = 0.0
    cdef double c0 = 0.0, c1 = 0.0, v0 = 0.0, v1 = 0.0, swap
    cdef bint has_c = ws.has_c, sum_v = not azimuthal
    while first < n and not fabs(ws.x[first] - mean) > limit:
        first += 1
    if first == n:
        return n
    # the survivors before the first outlier stay in place: sum them in pairs
    while m + 1 < first:
        s0 += ws.s[m]
        s1 += ws.s[m + 1]
        w0 += ws.w[m]
        w1 += ws.w[m + 1]
        q0 += ws.w[m] * ws.w[m]
        q1 += ws.w[m + 1] * ws.w[m + 1]
        if has_c:
            c0 += ws.c[m]
            c1 += ws.c[m + 1]
        if sum_v:
            v0 += ws.v[m]
            v1 += ws.v[m + 1]
        m += 2
    if m < first:
        s0 += ws.s[m]
        w0 += ws.w[m]
        q0 += ws.w[m] * ws.w[m]
        if has_c:
            c0 += ws.c[m]
        if sum_v:
            v0 += ws.v[m]
        # the "0" variables always hold the partial sums of the next survivor's parity, and
        # trade places with the others after each survivor; the next one (index first) is
        # odd. Addition is commutative: s0 + s1 at the end is the same whichever holds which.
        s0, s1 = s1, s0
        w0, w1 = w1, w0
        q0, q1 = q1, q0
        c0, c1 = c1, c0
        v0, v1 = v1, v0
    kept = first
    for m in range(first + 1, n):
        if fabs(ws.x[m] - mean) > limit:
            continue
        ws.x[kept] = ws.x[m]
        ws.w[kept] = ws.w[m]
        ws.s[kept] = ws.s[m]
        swap = s1
        s1 = s0 + ws.s[m]
        s0 = swap
        swap = w1
        w1 = w0 + ws.w[m]
        w0 = swap
        swap = q1
        q1 = q0 + ws.w[m] * ws.w[m]
        q0 = swap
        if has_c:
            ws.c[kept] = ws.c[m]
            swap = c1
            c1 = c0 + ws.c[m]
            c0 = swap
        if ws.has_v:
            ws.v[kept] = ws.v[m]
        if sum_v:
            swap = v1
            v1 = v0 + ws.v[m]
            v0 = swap
        kept += 1
    sums[0] = s0 + s1
    sums[2] = w0 + w1
    sums[3] = q0 + q1
    sums[4] = c0 + c1 if has_c else <double> kept
    sums[1] = azimuthal_variance(kept, ws, sums) if azimuthal else v0 + v1
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
                   variance_kind(error_model), &ws, True)
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
        kept = drop_outliers(n, &ws, mean, cutoff * std, clip_azimuthal, sums)
        if kept == n:
            break
        n = kept
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
              double delta_dummy, str error_model, threads=None, work=None):
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
                                   error_model == "azimuthal", work)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    if call.npt > 0:
        with nogil:
            integrate_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                           call.dark, call.variance, &call.rule, call.error_model, call.work_ptr,
                           call.maxlen, call.nthreads, call.result_ptr)
    return call.result


def sigma_clip(const raw_t[::1] raw, indptr, indices, coefs, norm, dark, variance, dummy,
               double delta_dummy, str error_model, double thres, int max_iter, threads=None,
               work=None):
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
                                   dummy, delta_dummy, error_model, threads, True, work)
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
            threads=None, work=None):
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
                                   dummy, delta_dummy, error_model, threads, True, work)
    cdef const raw_t* raw_ptr = &raw[0] if raw.shape[0] > 0 else NULL
    if call.npt > 0:
        with nogil:
            medfilt_rows(raw_ptr, call.indptr, call.npt, call.indices, call.coefs, call.norm,
                         call.dark, call.variance, &call.rule, call.error_model, quant_min,
                         quant_max, call.work_ptr, call.maxlen, call.nthreads,
                         call.result_ptr)
    return call.result
