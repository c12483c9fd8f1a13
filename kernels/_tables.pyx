# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled builders of the radial lookup tables (CSR): no split and exact full split.

Arrays in, arrays out, GIL released, OpenMP over detector rows. :mod:`azfilter.binning` calls
them when the extension is built and falls back to its numpy builders otherwise; both give
the same tables (``tests/test_engine_cython.py`` checks it entry for entry).
"""

import math

import numpy as np

cimport openmp
from cython.parallel cimport prange
from libc.math cimport M_PI, fabs, floor, isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t

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

