"""Picking Bragg pixels against the clipped background: the rule of pyFAI's ``sparsify-Bragg``.

After azimuthal sigma-clipping, each radial bin has a background ``bg`` (the clipped mean) and
a spread ``σ`` (the clipped std). A pixel is *picked* (kept as a Bragg/outlier pixel by
``azfilter sparsify``) when (Kieffer et al., J. Appl. Cryst. 58 (2025) 138-153; pyFAI's
``find_intense`` kernel)::

    I_corr − bg(r) > max(noise, cutoff_pick · sqrt(σ(r)² + noise²))

with ``I_corr = (raw − dark) / pixel_norm`` the pixel's corrected intensity and ``bg(r)``,
``σ(r)`` interpolated linearly between the bin centres at the pixel's radial position ``r``
(clamped to the first and last bin outside them).

Only pixels that are in the radial table (not masked, inside the radial and azimuthal range)
and valid in the frame (finite, not the dummy value) are candidates.

Empty bins (no pixel kept, or none there) have no background; :func:`fill_profile` fills them
by linear interpolation between their filled neighbours, and both the picking and the stored
profile use the filled values, so that a densified frame is made of the same background the
pixels were compared against.

This module is the readable numpy reference; ``azfilter._bragg.pick_pixels`` (compiled,
GIL released, OpenMP) computes the same thing with the same floating-point operations and is
used when it is built (``tests/test_sparsify.py`` checks both agree pixel for pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: pyFAI sparsify-Bragg's defaults: pick above 3 σ, noise floor 1 count
DEFAULT_CUTOFF_PICK = 3.0
DEFAULT_NOISE = 1.0

try:  # the compiled picker (kernels/_bragg.pyx), absent in a numpy-only install
    from . import _bragg as _compiled
except ImportError:  # pragma: no cover - the build always makes it
    _compiled = None


@dataclass
class PickGeometry:
    """The per-geometry constants of the picker (one detector, one radial table).

    Attributes
    ----------
    shape : (int, int)
        Detector shape.
    radius : numpy.ndarray
        float64 ``(npt,)``: the bin centres in the output unit (increasing, evenly spaced),
        rounded to float32 as the sparse file stores them.
    position : numpy.ndarray
        float32 ``(N1·N2,)``: each pixel's radial position in the output unit; NaN for the
        pixels that are in no bin (masked, outside the radial or azimuthal range).
    pixel_norm : numpy.ndarray
        float32 ``(N1·N2,)``: ``normalization · flat · polarization · solid_angle``.
    dark : numpy.ndarray or None
        float32 ``(N1·N2,)`` dark current.
    segment : numpy.ndarray or None
        int32 ``(N1·N2,)``: each pixel's interpolation segment (lower bin index), -1 for the
        pixels that are never candidates (no bin, zero normalisation); for the compiled
        picker (None without it).
    """

    shape: tuple[int, int]
    radius: np.ndarray
    position: np.ndarray
    pixel_norm: np.ndarray
    dark: np.ndarray | None
    segment: np.ndarray | None = None


def pick_geometry(integrator: Any) -> PickGeometry:
    """The picker's constants for an :class:`azfilter.Integrator` (no-split table).

    Parameters
    ----------
    integrator : azfilter.Integrator
        With a known detector shape and no sectors.

    Returns
    -------
    PickGeometry

    Raises
    ------
    ValueError
        For an integrator with χ sectors (one background per frame is the format's).
    """
    from .units import get_unit

    if integrator.sectors is not None:
        raise ValueError("picking Bragg pixels needs one radial profile per frame (no sectors)")
    table = integrator.table("no")
    unit = get_unit(integrator.unit)
    shape = integrator.shape
    centres = integrator.geometry.center_array(unit.quantity, shape).ravel()
    position = np.full(centres.size, np.nan, dtype=np.float32)
    in_table = np.asarray(table.indices, dtype=np.int64)
    position[in_table] = (centres[in_table] * unit.scale).astype(np.float32)
    constants = integrator.constants
    # float32 bin centres: what the sparse file stores (fabio's densify reads float32), so
    # that the background a pixel was compared with is the one a reader rebuilds
    radius = np.asarray(table.radial, dtype=np.float32).astype(np.float64)
    pixel_norm = np.ascontiguousarray(constants.pixel_norm, np.float32)
    segment = None if _compiled is None else _compiled.segments(position, pixel_norm, radius)
    return PickGeometry(shape=shape, radius=radius, position=position, pixel_norm=pixel_norm,
                        dark=None if constants.dark is None else
                        np.ascontiguousarray(constants.dark, np.float32), segment=segment)


def fill_profile(values: np.ndarray) -> np.ndarray:
    """A per-bin profile with its empty (non-finite) bins filled by linear interpolation over
    the bin index from their finite neighbours (the end values beyond the first and last);
    all zeros when no bin is finite.

    Parameters
    ----------
    values : numpy.ndarray
        ``(npt,)`` profile (clipped mean or std), NaN for empty bins.

    Returns
    -------
    numpy.ndarray
        float64 ``(npt,)``, finite.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    if finite.all():
        return values.copy()
    if not finite.any():
        return np.zeros_like(values)
    bins = np.arange(values.size, dtype=np.float64)
    filled = values.copy()
    filled[~finite] = np.interp(bins[~finite], bins[finite], values[finite])
    return filled


def interpolate(profile: np.ndarray, radius: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``profile`` linearly interpolated at ``position`` between the bin centres ``radius``
    (evenly spaced), clamped to the end values outside them; NaN stays NaN.

    The exact operations of the compiled picker: ``j = int((r − r_0) / step)`` clamped to
    ``[0, npt − 2]``, ``w = (r − r_j) / (r_{j+1} − r_j)`` clamped to ``[0, 1]``,
    ``p_j · (1 − w) + p_{j+1} · w``.
    """
    profile = np.asarray(profile, dtype=np.float64)
    r = np.asarray(position, dtype=np.float64)
    npt = profile.size
    if npt == 1:
        out = np.full(r.shape, profile[0])
        out[np.isnan(r)] = np.nan
        return out
    step = (radius[-1] - radius[0]) / (npt - 1)
    with np.errstate(invalid="ignore"):
        lower = np.floor((r - radius[0]) / step)
    lower = np.clip(np.nan_to_num(lower, nan=0.0), 0, npt - 2).astype(np.int64)
    with np.errstate(invalid="ignore"):
        weight = np.clip((r - radius[lower]) / (radius[lower + 1] - radius[lower]), 0.0, 1.0)
    return profile[lower] * (1.0 - weight) + profile[lower + 1] * weight


def valid_pixels(raw: np.ndarray, geometry: PickGeometry, dummy: float | None,
                 delta_dummy: float) -> np.ndarray:
    """The candidate pixels of one frame (bool, flat): in a bin, ``pixel_norm != 0``, finite,
    not the dummy value (``|raw − dummy| <= delta_dummy``), as the engines' preprocessing."""
    values = np.asarray(raw).ravel()
    as_float = values.astype(np.float64)
    valid = np.isfinite(geometry.position) & (geometry.pixel_norm != 0) & np.isfinite(as_float)
    if dummy is not None:
        valid &= ~(np.abs(as_float - dummy) <= delta_dummy)
    return valid


def pick_pixels_reference(raw: np.ndarray, geometry: PickGeometry, background: np.ndarray,
                          background_std: np.ndarray, cutoff_pick: float = DEFAULT_CUTOFF_PICK,
                          noise: float = DEFAULT_NOISE, dummy: float | None = None,
                          delta_dummy: float = 0.0) -> np.ndarray:
    """The flat indices of the picked pixels of one frame (numpy reference).

    Parameters
    ----------
    raw : numpy.ndarray
        The raw frame, in its own dtype, of the detector's shape.
    geometry : PickGeometry
        The picker's constants (:func:`pick_geometry`).
    background, background_std : numpy.ndarray
        ``(npt,)`` filled clipped mean and std (:func:`fill_profile`), corrected intensity.
    cutoff_pick : float
        Threshold in σ of the ring (``sqrt(σ² + noise²)``).
    noise : float
        Noise floor, in corrected intensity: a pixel must stand above the background by more
        than ``noise`` in any case.
    dummy, delta_dummy : float or None, float
        Raw value of invalid pixels and its tolerance.

    Returns
    -------
    numpy.ndarray
        uint32, increasing flat indices.
    """
    values = np.asarray(raw).ravel()
    valid = valid_pixels(values, geometry, dummy, delta_dummy)
    candidates = np.flatnonzero(valid)
    signal = values[candidates].astype(np.float64)
    if geometry.dark is not None:
        signal = signal - geometry.dark[candidates].astype(np.float64)
    corrected = signal / geometry.pixel_norm[candidates].astype(np.float64)
    position = geometry.position[candidates]
    bg = interpolate(background, geometry.radius, position)
    spread = interpolate(background_std, geometry.radius, position)
    threshold = np.maximum(noise, cutoff_pick * np.sqrt(spread * spread + noise * noise))
    picked = (corrected - bg) > threshold
    return candidates[picked].astype(np.uint32)


def pick_pixels(raw: np.ndarray, geometry: PickGeometry, background: np.ndarray,
                background_std: np.ndarray, cutoff_pick: float = DEFAULT_CUTOFF_PICK,
                noise: float = DEFAULT_NOISE, dummy: float | None = None,
                delta_dummy: float = 0.0, threads: int = 0) -> np.ndarray:
    """The flat indices of the picked pixels of one frame: the compiled picker when it is
    built (same result as :func:`pick_pixels_reference`), else the reference.

    Parameters are those of :func:`pick_pixels_reference`, plus ``threads`` (OpenMP threads
    of the compiled picker, 0: all).
    """
    values = np.ascontiguousarray(raw).ravel()
    if _compiled is None or geometry.segment is None:
        return pick_pixels_reference(values, geometry, background, background_std,
                                     cutoff_pick, noise, dummy, delta_dummy)
    if values.dtype not in COMPILED_DTYPES:
        values = values.astype(np.float64)   # exact for integers below 2**53
    return _compiled.pick_indices(
        values, geometry.position, geometry.segment, geometry.pixel_norm,
        geometry.dark if geometry.dark is not None else np.zeros(0, np.float32),
        np.ascontiguousarray(background, np.float64),
        np.ascontiguousarray(background_std, np.float64),
        np.ascontiguousarray(geometry.radius, np.float64), float(cutoff_pick), float(noise),
        dummy is not None, 0.0 if dummy is None else float(dummy), float(delta_dummy),
        int(threads))


#: raw dtypes the compiled picker reads directly (others are converted to float64)
COMPILED_DTYPES = tuple(np.dtype(t) for t in (np.int32, np.uint32, np.int16, np.uint16,
                                               np.uint8, np.float32, np.float64))


@dataclass
class SparseFrame:
    """One frame's sparse representation: the background profile and the picked pixels.

    Attributes
    ----------
    result : azfilter.integrator.Result
        The sigma-clipped 1-D pattern (its ``intensity`` and ``std`` are the background).
    background, background_std : numpy.ndarray
        float64 ``(npt,)``: the filled profiles the pixels were compared against.
    index : numpy.ndarray
        uint32: flat indices of the picked pixels, increasing.
    intensity : numpy.ndarray
        Their raw values, in the frame's dtype.
    """

    result: Any
    background: np.ndarray
    background_std: np.ndarray
    index: np.ndarray
    intensity: np.ndarray



def sparsify_frame(raw: np.ndarray, result: Any, geometry: PickGeometry,
                   cutoff_pick: float = DEFAULT_CUTOFF_PICK, noise: float = DEFAULT_NOISE,
                   dummy: float | None = None, delta_dummy: float = 0.0,
                   threads: int = 0) -> SparseFrame:
    """Pick the Bragg pixels of one frame against its sigma-clipped result.

    Parameters
    ----------
    raw : numpy.ndarray
        The raw frame (read only; the picked values are copied).
    result : azfilter.integrator.Result
        Its sigma-clip result (1-D, no sectors).
    geometry : PickGeometry
    cutoff_pick, noise, dummy, delta_dummy, threads
        As :func:`pick_pixels`.

    Returns
    -------
    SparseFrame
    """
    background = fill_profile(result.intensity)
    background_std = fill_profile(result.std)
    index = pick_pixels(raw, geometry, background, background_std, cutoff_pick, noise,
                        dummy, delta_dummy, threads)
    intensity = np.asarray(raw).ravel()[index].copy()
    return SparseFrame(result=result, background=background, background_std=background_std,
                       index=index, intensity=intensity)


class BraggPicker:
    """Turns each sigma-clip result of a stream into a :class:`SparseFrame` (the picking
    step of ``azfilter sparsify``).

    Parameters
    ----------
    geometry : PickGeometry
    cutoff_pick, noise : float
        The pick rule's parameters.
    detector : azfilter.detectors.Detector
        Its dummy value (per frame dtype) marks invalid pixels, as in the engines.
    threads : int
        OpenMP threads of the compiled picker (0: all).
    convert : callable, optional
        Applied to the picked raw values (the sparse writer casts them to its dtype).
    """

    def __init__(self, geometry: PickGeometry, cutoff_pick: float = DEFAULT_CUTOFF_PICK,
                 noise: float = DEFAULT_NOISE, detector: Any = None, threads: int = 0,
                 convert: Any = None):
        self.geometry = geometry
        self.cutoff_pick = float(cutoff_pick)
        self.noise = float(noise)
        self.detector = detector
        self.threads = int(threads)
        self.convert = convert

    def __call__(self, raw: np.ndarray, result: Any) -> SparseFrame:
        """The sparse frame of ``raw`` (its sigma-clip ``result``)."""
        dummy, delta = (None, 0.0) if self.detector is None else \
            self.detector.dummy_for(np.asarray(raw).dtype)
        frame = sparsify_frame(raw, result, self.geometry, self.cutoff_pick, self.noise,
                               dummy, delta, self.threads)
        if self.convert is not None:
            frame.intensity = self.convert(frame.intensity)
        return frame
