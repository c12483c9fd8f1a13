# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""Compiled Bragg-pixel picker: the rule of :func:`azfilter.bragg.pick_pixels_reference`,
with the same floating-point operations in the same order (so both pick the same pixels),
GIL released, OpenMP over pixels.
"""

import numpy as np

cimport openmp
from cython.parallel cimport prange
from libc.math cimport floor, isfinite, isnan, sqrt, fabs
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t, uint32_t

ctypedef fused raw_t:
    int32_t
    uint32_t
    int16_t
    uint16_t
    uint8_t
    float
    double


def pick_flags(const raw_t[::1] raw, const float[::1] position, const float[::1] pixel_norm,
               const float[::1] dark, const double[::1] background,
               const double[::1] background_std, const double[::1] radius,
               double cutoff_pick, double noise, bint check_dummy, double dummy,
               double delta_dummy, int threads=0):
    """uint8 flags (1: picked) for every pixel of one flat frame.

    ``dark`` of length 0 means no dark current. See
    :func:`azfilter.bragg.pick_pixels_reference` for the rule.
    """
    cdef Py_ssize_t n = raw.shape[0], j, lower
    cdef Py_ssize_t npt = background.shape[0]
    cdef bint has_dark = dark.shape[0] > 0
    if position.shape[0] != n or pixel_norm.shape[0] != n or (has_dark and dark.shape[0] != n):
        raise ValueError("frame, positions, normalisation and dark differ in size")
    if background_std.shape[0] != npt or radius.shape[0] != npt or npt < 1:
        raise ValueError("background, std and radius differ in size")
    flags_array = np.zeros(n, dtype=np.uint8)
    cdef uint8_t[::1] flags = flags_array
    cdef double r0 = radius[0]
    cdef double step = (radius[npt - 1] - radius[0]) / (npt - 1) if npt > 1 else 1.0
    cdef double value, signal, corrected, r, weight, bg, spread, threshold, floor_pos
    cdef int n_threads = threads if threads > 0 else openmp.omp_get_max_threads()
    with nogil:
        for j in prange(n, schedule="static", num_threads=n_threads):
            r = position[j]
            if isnan(r) or pixel_norm[j] == 0:
                continue
            value = <double> raw[j]
            if not isfinite(value):
                continue
            if check_dummy and fabs(value - dummy) <= delta_dummy:
                continue
            signal = value - <double> dark[j] if has_dark else value
            corrected = signal / <double> pixel_norm[j]
            if npt == 1:
                bg = background[0]
                spread = background_std[0]
            else:
                floor_pos = floor((r - r0) / step)
                if floor_pos < 0:
                    lower = 0
                elif floor_pos > npt - 2:
                    lower = npt - 2
                else:
                    lower = <Py_ssize_t> floor_pos
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
                flags[j] = 1
    return flags_array
