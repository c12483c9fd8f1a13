# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled Bragg-pixel picker: the rule of :func:`azfilter.bragg.pick_pixels_reference`,
with the same floating-point operations in the same order (so both pick the same pixels),
GIL released, OpenMP over contiguous blocks of pixels.
"""

import numpy as np

cimport openmp
from cython.parallel cimport prange
from libc.math cimport fabs, floor, isfinite, isnan, sqrt
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t

ctypedef fused raw_t:
    int32_t
    uint32_t
    int16_t
    uint16_t
    uint8_t
    float
    double


cdef Py_ssize_t pick_block(const raw_t[::1] raw, const float[::1] position,
                           const int32_t[::1] segment_of,
                           const float[::1] pixel_norm, const float[::1] dark, bint has_dark,
                           const double[::1] background, const double[::1] background_std,
                           const double[::1] radius, const double[::1] lower_bound,
                           double cutoff_pick, double noise, bint check_dummy, double dummy,
                           double delta_dummy, Py_ssize_t start, Py_ssize_t stop,
                           uint32_t[::1] out) noexcept nogil:
    """Write the picked pixels of ``start <= j < stop`` to ``out[start:]``; return how many."""
    cdef Py_ssize_t npt = background.shape[0], n_segments = lower_bound.shape[0]
    cdef Py_ssize_t j, lower, found = 0
    cdef int32_t segment
    cdef double value, signal, corrected, r, weight, bg, spread, threshold, norm
    for j in range(start, stop):
        # segment_of: the pixel's interpolation segment, -1 for pixels in no bin or with a
        # zero normalisation (computed once per geometry)
        segment = segment_of[j]
        if segment < 0:
            continue
        value = <double> raw[j]
        if not isfinite(value):
            continue
        if check_dummy and fabs(value - dummy) <= delta_dummy:
            continue
        signal = value - <double> dark[j] if has_dark else value
        norm = <double> pixel_norm[j]
        # the cheap necessary condition: corrected > the lower bound of its segment (at a
        # segment's end both neighbouring bounds hold, so a segment off by one from the exact
        # index below is safe)
        if not signal > lower_bound[segment] * norm:
            continue
        r = position[j]
        # the exact test, operation for operation as azfilter.bragg.pick_pixels_reference
        corrected = signal / norm
        if npt == 1:
            bg = background[0]
            spread = background_std[0]
        else:
            lower = segment      # floor((r - r0) / step) clamped, as the reference
            weight = (r - radius[lower]) / (radius[lower + 1] - radius[lower])
            if weight < 0.0:
                weight = 0.0
            elif weight > 1.0:
                weight = 1.0
            bg = background[lower] * (1.0 - weight) + background[lower + 1] * weight
            spread = (background_std[lower] * (1.0 - weight)
                      + background_std[lower + 1] * weight)
        threshold = cutoff_pick * sqrt(spread * spread + noise * noise)
        if threshold < noise:
            threshold = noise
        if corrected - bg > threshold:
            out[start + found] = <uint32_t> j
            found = found + 1
    return found


def segments(const float[::1] position, const float[::1] pixel_norm,
             const double[::1] radius):
    """int32 interpolation segment of each pixel (``floor((r - r_0) / step)`` clamped to
    ``[0, max(npt - 2, 0)]``), -1 for pixels in no bin (NaN radius) or of zero normalisation."""
    cdef Py_ssize_t n = position.shape[0], j, npt = radius.shape[0]
    cdef Py_ssize_t last = npt - 2 if npt > 1 else 0
    cdef double r0 = radius[0]
    cdef double step = (radius[npt - 1] - radius[0]) / (npt - 1) if npt > 1 else 1.0
    cdef double pos
    out_array = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] out = out_array
    with nogil:
        for j in range(n):
            if isnan(position[j]) or pixel_norm[j] == 0:
                out[j] = -1
                continue
            pos = floor((position[j] - r0) / step)
            if pos < 0:
                out[j] = 0
            elif pos > last:
                out[j] = <int32_t> last
            else:
                out[j] = <int32_t> pos
    return out_array


def pick_indices(const raw_t[::1] raw, const float[::1] position,
                 const int32_t[::1] segment_of, const float[::1] pixel_norm,
                 const float[::1] dark, const double[::1] background,
                 const double[::1] background_std, const double[::1] radius,
                 double cutoff_pick, double noise, bint check_dummy, double dummy,
                 double delta_dummy, int threads=0):
    """uint32 flat indices (increasing) of the picked pixels of one flat frame.

    ``dark`` of length 0 means no dark current. See
    :func:`azfilter.bragg.pick_pixels_reference` for the rule.
    """
    cdef Py_ssize_t n = raw.shape[0]
    cdef Py_ssize_t npt = background.shape[0]
    cdef bint has_dark = dark.shape[0] > 0
    if position.shape[0] != n or pixel_norm.shape[0] != n or segment_of.shape[0] != n \
            or (has_dark and dark.shape[0] != n):
        raise ValueError("frame, positions, normalisation and dark differ in size")
    if background_std.shape[0] != npt or radius.shape[0] != npt or npt < 1:
        raise ValueError("background, std and radius differ in size")
    if n >= 2 ** 32:
        raise ValueError("frames of 2**32 pixels or more do not fit uint32 indices")
    # A lower bound of bg(r) + threshold(r) over each interpolation segment (both are at least
    # their values with the smaller end of bg and of std, std >= 0): most pixels are rejected
    # by one multiplication and one comparison, without the divisions and the square root of
    # the exact test. The bound is lowered by 1e-6 (relative) so that rounding can never
    # reject a pixel the exact test keeps.
    cdef Py_ssize_t n_segments = npt - 1 if npt > 1 else 1, segment
    lower_bound_array = np.empty(n_segments, dtype=np.float64)
    cdef double[::1] lower_bound = lower_bound_array
    cdef double low_bg, low_spread, threshold, bound
    for segment in range(n_segments):
        low_bg = background[segment]
        low_spread = background_std[segment]
        if npt > 1:
            low_bg = min(low_bg, background[segment + 1])
            low_spread = min(low_spread, background_std[segment + 1])
        threshold = cutoff_pick * sqrt(low_spread * low_spread + noise * noise)
        if threshold < noise:
            threshold = noise
        bound = low_bg + threshold
        lower_bound[segment] = bound - 1e-6 * fabs(bound) - 1e-300
    cdef int n_threads = threads if threads > 0 else openmp.omp_get_max_threads()
    # each thread scans one contiguous block and writes its picks at the block's start in
    # ``out`` (never touched elsewhere, so np.empty costs no page faults): no flag image, no
    # second pass over the frame
    cdef Py_ssize_t n_blocks = max(1, min(4 * n_threads, n // 65536 + 1))
    cdef Py_ssize_t block = (n + n_blocks - 1) // n_blocks, b, start, stop
    out_array = np.empty(max(n, 1), dtype=np.uint32)
    counts_array = np.zeros(n_blocks, dtype=np.int64)
    cdef uint32_t[::1] out = out_array
    cdef int64_t[::1] counts = counts_array
    with nogil:
        for b in prange(n_blocks, schedule="dynamic", num_threads=n_threads):
            start = b * block
            stop = start + block
            if stop > n:
                stop = n
            if start < stop:
                counts[b] = pick_block(raw, position, segment_of, pixel_norm, dark, has_dark,
                                       background,
                                       background_std, radius, lower_bound, cutoff_pick,
                                       noise, check_dummy, dummy, delta_dummy, start, stop,
                                       out)
    return np.concatenate([out_array[b * block:b * block + counts_array[b]]
                           for b in range(n_blocks)])
