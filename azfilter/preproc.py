"""Per-pixel preprocessing: the constant arrays of a geometry and the per-frame reference rules.

Two things live here (``docs/internals.md``, "Per-pixel preprocessing"):

- the per-geometry constants every engine receives: the flat boolean ``static_mask``, the
  float32 ``pixel_norm = normalization · flat · polarization · solid_angle`` (0 where masked)
  and the float32 ``dark``;
- :func:`preprocess`, the readable reference of what every engine does to one raw frame
  (which pixels are valid, their signal, variance and normalisation). The Python engine uses
  it directly; the Cython and OpenCL engines re-implement it inside their loops.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import cache_dir, open_npz, store_soon
from .errors import AzfilterError
from .vocabulary import ERROR_MODELS

#: what a mask, dark, flat or variance argument may be: nothing, an array, or an image file
PixelArraySource = np.ndarray | str | os.PathLike | None


@dataclass
class PixelConstants:
    """The per-geometry arrays shared by every frame, flat (length ``N1·N2``).

    Attributes
    ----------
    shape : (int, int)
        The detector (image) shape.
    static_mask : numpy.ndarray
        bool, True = never used: detector gaps, user mask, Eiger pixel mask, invalid flat or
        dark.
    pixel_norm : numpy.ndarray
        float32, ``normalization · flat · polarization · solid_angle``; 0 where masked.
    dark : numpy.ndarray or None
        float32 dark current to subtract from the raw values (0 where masked).
    """

    shape: tuple[int, int]
    static_mask: np.ndarray
    pixel_norm: np.ndarray
    dark: np.ndarray | None


def describe_source(value: Any) -> str | None:
    """How a mask/dark/flat argument is recorded in a configuration: the path, "array", None."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return "array"


def load_pixel_array(value: PixelArraySource, what: str, shape: tuple[int, int],
                     detector_name: str = "detector") -> np.ndarray | None:
    """Return a per-pixel array given as an array or an image file, checked against ``shape``.

    Parameters
    ----------
    value : array-like, str, os.PathLike or None
        The array itself, or a path read with :func:`azfilter.frames.load_image`.
    what : str
        Its role ("mask", "dark", "flat", "pixel_mask", "variance") for error messages.
    shape : (int, int)
        The detector shape it must have.
    detector_name : str
        For error messages.

    Returns
    -------
    numpy.ndarray or None
        The 2-D array in its own dtype, or None when ``value`` is None.

    Raises
    ------
    AzfilterError
        When the file cannot be read or the shape differs.
    """
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        from .frames import load_image  # lazily: frames pulls in fabio and h5py

        where = f"{what} file {os.fspath(value)}"
        array = np.asarray(load_image(value))
    else:
        where = what
        array = np.asarray(value)
    if array.ndim != 2:
        raise AzfilterError(f"{where}: expected a 2-D image, got {array.ndim} dimension(s)")
    if tuple(array.shape) != tuple(shape):
        raise AzfilterError(
            f"{where} has shape {tuple(array.shape)}, detector {detector_name} has shape "
            f"{tuple(shape)}"
        )
    return array


def parse_polarization(value: Any) -> tuple[float, float] | None:
    """Normalise a polarization argument to ``(factor, axis_offset)`` or None.

    Parameters
    ----------
    value : None, float or (float, float)
        None (or False) for no correction; a factor ``f`` in [-1, 1]; or ``(f, δ)`` with the
        axis offset ``δ`` in radians.

    Raises
    ------
    AzfilterError
        When the factor is not a number in [-1, 1] or the offset is not finite.
    """
    if value is None or value is False:
        return None
    if isinstance(value, (str, bytes)) or value is True:
        raise AzfilterError(f"polarization must be a number in [-1, 1] or (factor, offset), "
                            f"got {value!r}")
    if isinstance(value, Sequence) or isinstance(value, np.ndarray):
        items = list(np.asarray(value, dtype=object).ravel())
        if len(items) != 2:
            raise AzfilterError(
                f"polarization must be a factor or (factor, axis_offset), got {value!r}"
            )
        factor_value, offset_value = items
    else:
        factor_value, offset_value = value, 0.0
    try:
        factor, offset = float(factor_value), float(offset_value)
    except (TypeError, ValueError):
        raise AzfilterError(f"polarization must be numbers, got {value!r}") from None
    if not (math.isfinite(factor) and -1.0 <= factor <= 1.0):
        raise AzfilterError(f"polarization factor {factor} is outside [-1, 1]")
    if not math.isfinite(offset):
        raise AzfilterError(f"polarization axis offset {offset} is not finite")
    return factor, offset


def build_static_mask(detector_mask: np.ndarray | None, shape: tuple[int, int], *,
                      mask: np.ndarray | None = None, pixel_mask: np.ndarray | None = None,
                      flat: np.ndarray | None = None,
                      dark: np.ndarray | None = None) -> np.ndarray:
    """OR of every static reason to ignore a pixel, flat bool array (True = masked).

    Parameters
    ----------
    detector_mask : numpy.ndarray or None
        The detector's gap mask (True = gap).
    shape : (int, int)
        Detector shape.
    mask : numpy.ndarray, optional
        User mask, non-zero = masked. It is OR-ed with the gap mask, never replaces it.
    pixel_mask : numpy.ndarray, optional
        Eiger ``pixel_mask`` from the master file, non-zero = bad pixel.
    flat : numpy.ndarray, optional
        Flat field; non-finite or non-positive values are masked.
    dark : numpy.ndarray, optional
        Dark current; non-finite values are masked.
    """
    static = np.zeros(shape, dtype=bool)
    if detector_mask is not None:
        static |= np.asarray(detector_mask, dtype=bool)
    for user in (mask, pixel_mask):
        if user is not None:
            user = np.asarray(user)
            # NaN in a float mask counts as masked, as any non-zero value does
            static |= (user != 0) if user.dtype.kind != "f" else ~(user == 0)
    if flat is not None:
        flat64 = np.asarray(flat, dtype=np.float64)
        static |= ~(np.isfinite(flat64) & (flat64 > 0))
    if dark is not None:
        static |= ~np.isfinite(np.asarray(dark, dtype=np.float64))
    return static.ravel()


def geometric_factors(geometry: Any, shape: tuple[int, int],
                      polarization: tuple[float, float] | None,
                      solid_angle: bool) -> list[np.ndarray]:
    """The float32 polarization and solid-angle arrays (those switched on), in that order.

    They depend only on the geometry, so they are kept in the on-disk cache next to the lookup
    tables: a fresh process with a known set-up skips the trigonometry (tens of ms for a
    Pilatus 1M, most of a one-frame job's set-up).
    """
    if polarization is None and not solid_angle:
        return []
    record = json.dumps({"format": 1, "geometry": geometry.cache_key(),
                         "shape": [int(n) for n in shape],
                         "polarization": None if polarization is None
                         else [float(v).hex() for v in polarization],
                         "solid_angle": bool(solid_angle)}, sort_keys=True)
    key = hashlib.sha256(record.encode()).hexdigest()
    directory = cache_dir()
    path = None if directory is None else directory / f"factors-{key}.npz"
    names = (["polarization"] if polarization is not None else []) + \
        (["solid_angle"] if solid_angle else [])
    if path is not None:
        try:
            with open_npz(path) as stored:  # a hit makes it the most recently used
                if str(stored["key"]) == key:
                    arrays = [stored[name] for name in names]
                    if all(a.shape == tuple(shape) and a.dtype == np.float32 for a in arrays):
                        return arrays
        except Exception:  # absent, partial or damaged: compute it again
            pass
    arrays = []
    if polarization is not None:
        factor, offset = polarization
        arrays.append(geometry.polarization(factor, offset, shape=shape).astype(np.float32))
    if solid_angle:
        arrays.append(geometry.solid_angle(shape=shape).astype(np.float32))
    if path is not None:
        store_soon(path, key=np.str_(key), **dict(zip(names, arrays, strict=True)))
    return arrays


def build_pixel_norm(geometry: Any, shape: tuple[int, int], static_mask: np.ndarray, *,
                     flat: np.ndarray | None = None,
                     polarization: tuple[float, float] | None = None,
                     solid_angle: bool = True, normalization: float = 1.0) -> np.ndarray:
    """``normalization · flat · polarization · solid_angle`` per pixel, float32, flat.

    Each factor is rounded to float32 and the product is taken in float32 in this order, as
    pyFAI does, so that the normalisation (and with it the corrected values) agree to the last
    bit where possible. Masked pixels get 0.

    Parameters
    ----------
    geometry : azfilter.geometry.Geometry
        Gives ``polarization(factor, axis_offset)`` and ``solid_angle()``.
    shape : (int, int)
        Detector shape.
    static_mask : numpy.ndarray
        Flat bool mask from :func:`build_static_mask`.
    flat : numpy.ndarray, optional
        Flat field (pixel response; the signal is divided by it).
    polarization : (float, float) or None
        ``(factor, axis_offset)`` from :func:`parse_polarization`.
    solid_angle : bool
        Divide by the relative solid angle ``cos³α``.
    normalization : float
        Constant (monitor) the intensities are divided by.
    """
    norm = np.full(shape, np.float32(normalization), dtype=np.float32)
    if flat is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            norm *= np.asarray(flat).astype(np.float32)
    factors = geometric_factors(geometry, shape, polarization, solid_angle)
    for factor in factors:
        norm *= factor
    norm = norm.ravel()
    norm[static_mask] = 0.0
    # a non-finite factor (overflowing flat) must not let a pixel through with a NaN norm
    norm[~np.isfinite(norm)] = 0.0
    return norm


def pixel_constants(geometry: Any, *, mask: PixelArraySource = None,
                    dark: PixelArraySource = None, flat: PixelArraySource = None,
                    polarization: Any = None, solid_angle: bool = True,
                    normalization: float = 1.0,
                    pixel_mask: PixelArraySource = None) -> PixelConstants:
    """Build the per-geometry arrays of :class:`PixelConstants`.

    Parameters
    ----------
    geometry : azfilter.geometry.Geometry
        Its detector must have a shape (a generic detector: ``detector.with_shape`` first).
    mask, dark, flat, pixel_mask : array or path, optional
        See :func:`build_static_mask`; files are read with :func:`azfilter.frames.load_image`.
    polarization : None, float or (float, float)
        See :func:`parse_polarization`.
    solid_angle : bool
        Apply the solid-angle correction.
    normalization : float
        Positive constant the intensities are divided by.

    Raises
    ------
    AzfilterError
        Unreadable or mis-shaped files, a bad polarization or normalization.
    """
    detector = geometry.detector
    if detector.shape is None:
        raise AzfilterError(
            f"detector {detector.name}: shape unknown, the first image gives it"
        )
    shape = (int(detector.shape[0]), int(detector.shape[1]))
    try:
        normalization = float(normalization)
    except (TypeError, ValueError):
        raise AzfilterError(f"normalization must be a positive number, got {normalization!r}") \
            from None
    if not (math.isfinite(normalization) and normalization > 0):
        raise AzfilterError(f"normalization must be a positive number, got {normalization!r}")
    polarization = parse_polarization(polarization)
    name = detector.name
    mask_array = load_pixel_array(mask, "mask", shape, name)
    pixel_mask_array = load_pixel_array(pixel_mask, "pixel_mask", shape, name)
    flat_array = load_pixel_array(flat, "flat", shape, name)
    dark_array = load_pixel_array(dark, "dark", shape, name)
    static_mask = build_static_mask(detector.mask, shape, mask=mask_array,
                                    pixel_mask=pixel_mask_array, flat=flat_array,
                                    dark=dark_array)
    pixel_norm = build_pixel_norm(geometry, shape, static_mask, flat=flat_array,
                                  polarization=polarization, solid_angle=solid_angle,
                                  normalization=normalization)
    dark_flat = None
    if dark_array is not None:
        dark_flat = dark_array.astype(np.float32).ravel()
        dark_flat[static_mask] = 0.0  # masked pixels may hold NaN darks; keep engines clean
    static_mask[pixel_norm == 0] = True
    return PixelConstants(shape, static_mask, pixel_norm, dark_flat)


def preprocess(raw: np.ndarray, pixel_norm: np.ndarray, dark: np.ndarray | None = None,
               dummy: float | None = None, delta_dummy: float = 0.0,
               error_model: str = "poisson", variance: np.ndarray | None = None,
               out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel signal, variance and normalisation of one raw frame (the reference rules).

    For pixel ``j``::

        valid_j  = pixel_norm_j != 0 and isfinite(raw_j)
                   and not (dummy is not None and |raw_j - dummy| <= delta_dummy)
        signal_j = raw_j - dark_j
        var_j    = max(raw_j, 1)  (poisson, hybrid) | variance_j (variance) | 0 (azimuthal)
        norm_j   = pixel_norm_j

    Parameters
    ----------
    raw : numpy.ndarray
        The frame in its own dtype (any shape with ``pixel_norm.size`` elements).
    pixel_norm : numpy.ndarray
        float32 or float64, flat, 0 for statically masked pixels.
    dark : numpy.ndarray, optional
        float32, flat.
    dummy, delta_dummy : float or None, float
        Raw value flagging invalid pixels and its tolerance (as :meth:`Detector.dummy_for`).
    error_model : str
        One of :data:`azfilter.vocabulary.ERROR_MODELS`.
    variance : numpy.ndarray, optional
        Per-pixel variance, required by (and only used with) the ``"variance"`` model.
    out : tuple of numpy.ndarray, optional
        ``signal, var, norm`` (float64) and ``valid`` (bool), flat, to write the results into
        (an engine's workspace, reused frame after frame: fresh arrays of a megapixel frame
        cost more in page faults than the arithmetic does). New arrays by default.

    Returns
    -------
    signal, var, norm : numpy.ndarray
        float64, flat; 0 where the pixel is invalid.
    valid : numpy.ndarray
        bool, flat.
    """
    if error_model not in ERROR_MODELS:
        raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                            f"{', '.join(ERROR_MODELS)}")
    raw_flat = np.asarray(raw).ravel()
    pixel_norm = np.asarray(pixel_norm).ravel()
    if raw_flat.size != pixel_norm.size:
        raise AzfilterError(f"image has {raw_flat.size} pixels, the detector {pixel_norm.size}")
    if error_model == "variance":
        if variance is None:
            raise AzfilterError("error model 'variance' needs a variance array")
        variance = np.asarray(variance).ravel()
        if variance.size != raw_flat.size:
            raise AzfilterError(f"variance has {variance.size} pixels, the image "
                                f"{raw_flat.size}")
    if out is None:
        out = (np.empty(raw_flat.size), np.empty(raw_flat.size), np.empty(raw_flat.size),
               np.empty(raw_flat.size, dtype=bool))
    signal, var, norm, valid = out
    np.copyto(signal, raw_flat, casting="unsafe")     # the raw values, as float64
    np.copyto(norm, pixel_norm)
    np.not_equal(norm, 0.0, out=valid)
    valid &= np.isfinite(signal)
    if dummy is not None:
        np.subtract(signal, dummy, out=var)           # var is scratch until it is set below
        valid &= ~(np.abs(var, out=var) <= delta_dummy)
    if error_model in ("poisson", "hybrid"):
        np.maximum(signal, 1.0, out=var)              # of the raw value, before the dark
    elif error_model == "variance":
        np.copyto(var, variance)
    else:
        var.fill(0.0)
    if dark is not None:
        signal -= np.asarray(dark).ravel()
    invalid = ~valid
    for values in (signal, var, norm):
        np.copyto(values, 0.0, where=invalid)
    return signal, var, norm, valid
