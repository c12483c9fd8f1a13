"""Detector registry: pixel sizes, shapes, module-gap masks and dummy values.

A :class:`Detector` is one concrete detector as used for one image: its pixel sizes (after any
binning), its shape, its orientation and its static gap mask.  :func:`get_detector` builds one
from a pyFAI class name (as written in a PONI file's ``Detector:`` line) and the optional
``Detector_config`` dictionary; :func:`generic_detector` builds a plain pixel grid.

The geometry of every registered model (shape, pixel size, module layout, dummy value) is that
of the pyFAI 2026.9 class of the same name, so that PONI files written by pyFAI describe the
same pixels here (the test suite compares each model with pyFAI pixel for pixel).
Detectors that need a spline or offset file, or whose pixels are not a flat regular grid
(Xpad, hexagonal, cylindrical), are not provided.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import AzfilterError

Shape = tuple[int, int]

# Relative tolerance when checking that a configured pixel size is an integer multiple of the
# native one: PONI files store pixel sizes like 0.00017199999999999998.
_PIXEL_RTOL = 1e-6

# Mar345 imaging plate: valid (square) image sizes and their pixel size (m).
MAR345_SIZES: dict[int, float] = {
    3450: 100e-6, 3000: 100e-6, 2400: 100e-6, 1800: 100e-6,
    2300: 150e-6, 2000: 150e-6, 1600: 150e-6, 1200: 150e-6,
}


@dataclass(frozen=True)
class ModuleLayout:
    """Regular grid of identical modules separated by insensitive gaps.

    Attributes
    ----------
    module_size : (int, int)
        Rows and columns of sensitive pixels in one module.
    module_gap : (int, int)
        Rows and columns of the gap between two modules.
    centre_gap : (int, int) or None
        Extra masked columns inside each module (CdTe sensors), as ``(start, stop)`` offsets
        relative to column ``module_size[1] // 2`` of the module.
    """

    module_size: Shape
    module_gap: Shape
    centre_gap: tuple[int, int] | None = None

    def gap_mask(self, shape: Shape) -> np.ndarray:
        """Boolean mask (True = gap) of a detector of ``shape`` unbinned pixels."""
        mask = np.zeros(shape, dtype=bool)
        (rows, cols), (gap_rows, gap_cols) = self.module_size, self.module_gap
        # Gaps follow each full module: the module pitch is module + gap.
        for start in range(rows, shape[0], rows + gap_rows):
            mask[start:start + gap_rows, :] = True
        for start in range(cols, shape[1], cols + gap_cols):
            mask[:, start:start + gap_cols] = True
        if self.centre_gap is not None:
            lo, hi = self.centre_gap
            for centre in range(cols // 2, shape[1], cols + gap_cols):
                mask[:, max(centre + lo, 0):centre + hi] = True
        return mask


@dataclass(frozen=True)
class DetectorModel:
    """One registered detector model (the equivalent of a pyFAI detector class).

    Attributes
    ----------
    name : str
        Canonical name, the pyFAI class name (``"Pilatus1M"``).
    native_pixel : (float, float) or None
        Unbinned pixel size (m) along rows and columns; None for the generic detector.
    max_shape : (int, int) or None
        Unbinned full shape; None for the generic detector.
    default_binning : (int, int)
        Binning applied when the configuration gives no pixel size (Perkin, Pixium).
    layout : ModuleLayout or None
        Module grid for the gap mask.
    kind : str
        ``"generic"`` (shape from the image), ``"fixed"`` (fixed pixel grid, may be binned) or
        ``"mar345"`` (circular imaging plate whose size selects the pixel size).
    dummy, delta_dummy : float or None, float
        Value flagging invalid pixels in raw frames and its tolerance.
    aliases : tuple of str
        Other names, as pyFAI's (the first is the display name).
    manufacturer : str or None
        Maker, for reports.
    binned_pixels : tuple of (int, float), optional
        Valid binning factors and their tabulated pixel sizes (Rayonix); None when any
        integer binning of the native pixel is valid.
    circular : bool
        Pixels outside the circle inscribed in the (binned) image are masked.
    """

    name: str
    native_pixel: tuple[float, float] | None
    max_shape: Shape | None
    default_binning: Shape = (1, 1)
    layout: ModuleLayout | None = None
    kind: str = "fixed"
    dummy: float | None = None
    delta_dummy: float = 0.0
    aliases: tuple[str, ...] = ()
    manufacturer: str | None = None
    binned_pixels: tuple[tuple[int, float], ...] | None = None
    circular: bool = False

    @property
    def display_name(self) -> str:
        """Human-readable name ("Pilatus 1M"), as pyFAI's ``Detector.name``."""
        return self.aliases[0] if self.aliases else self.name

    def binned_pixel(self, axis: int, factor: int) -> float | None:
        """Pixel size (m) along ``axis`` at binning ``factor``; None if not a valid binning."""
        assert self.native_pixel is not None
        if self.binned_pixels is None:
            return self.native_pixel[axis] * factor
        return dict(self.binned_pixels).get(factor)

    def binning_of(self, axis: int, pixel: float) -> int | None:
        """Binning factor giving pixel size ``pixel`` along ``axis``; None if there is none."""
        assert self.native_pixel is not None
        if self.binned_pixels is not None:
            for factor, size in self.binned_pixels:
                if math.isclose(size, pixel, rel_tol=_PIXEL_RTOL):
                    return factor
            return None
        ratio = pixel / self.native_pixel[axis]
        factor = round(ratio)
        if factor < 1 or abs(ratio - factor) > _PIXEL_RTOL * ratio:
            return None
        return factor


@dataclass
class Detector:
    """A concrete detector: pixel grid, orientation, gap mask and dummy value.

    Attributes
    ----------
    name : str
        Canonical pyFAI class name (``"Pilatus1M"``); ``"Detector"`` for a generic one.
    pixel1, pixel2 : float
        Pixel size (m) along rows (slow axis) and columns (fast axis), binning included.
    shape : (int, int) or None
        Image shape ``(N1, N2)``; None for a generic detector whose shape comes from the image
        (see :meth:`with_shape`).
    orientation : int
        1-4 as pyFAI (3 = pyFAI native, origin at the bottom right seen from the sample).
    dummy : float or None
        Raw value flagging invalid pixels (Dectris: -2).
    delta_dummy : float
        A pixel is invalid when ``|raw - dummy| <= delta_dummy`` (Dectris: 1.5, so -1 and -2).
    max_shape : (int, int) or None
        Unbinned full shape the gap mask is computed on.
    binning : (int, int)
        Binning factors relative to ``max_shape``.
    layout : ModuleLayout or None
        Module grid for the gap mask.
    mask_kind : str
        ``"none"``, ``"modules"`` or ``"circle"`` (pixels outside the inscribed circle of a
        round imaging plate or CCD taper).
    sensor : dict or None
        ``{"material": ..., "thickness": m}`` from the configuration, kept for round trips.
    """

    name: str
    pixel1: float
    pixel2: float
    shape: Shape | None
    orientation: int = 3
    dummy: float | None = None
    delta_dummy: float = 0.0
    max_shape: Shape | None = None
    binning: Shape = (1, 1)
    layout: ModuleLayout | None = None
    mask_kind: str = "none"
    sensor: dict[str, Any] | None = None
    _mask_cache: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.shape is not None:
            self.shape = (int(self.shape[0]), int(self.shape[1]))
        if self.max_shape is None:
            self.max_shape = self.shape
        else:
            self.max_shape = (int(self.max_shape[0]), int(self.max_shape[1]))
        self.binning = (int(self.binning[0]), int(self.binning[1]))
        self.pixel1 = float(self.pixel1)
        self.pixel2 = float(self.pixel2)
        self.orientation = _check_orientation(self.orientation, self.name)

    # -- static mask -------------------------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        """Static gap mask, bool, True = masked, shape ``self.shape`` (cached, read-only).

        For a binned detector a binned pixel is masked when any of its unbinned pixels is.
        All False for detectors without gaps.
        """
        if self.shape is None:
            raise AzfilterError(
                f"detector {self.name}: shape unknown, call with_shape(image.shape) first"
            )
        if self._mask_cache is None or self._mask_cache.shape != self.shape:
            mask = self._compute_mask()
            mask.flags.writeable = False
            self._mask_cache = mask
        return self._mask_cache

    def _compute_mask(self) -> np.ndarray:
        assert self.shape is not None
        if self.mask_kind == "circle":
            return _circle_mask(self.shape)
        if self.mask_kind != "modules" or self.layout is None:
            return np.zeros(self.shape, dtype=bool)
        assert self.max_shape is not None
        full = self.layout.gap_mask(self.max_shape)
        b1, b2 = self.binning
        if (b1, b2) == (1, 1):
            return full
        n1, n2 = self.shape
        # Binned pixels beyond a whole number of bins are cut off, as the detector does.
        blocks = full[: n1 * b1, : n2 * b2].reshape(n1, b1, n2, b2)
        return blocks.any(axis=(1, 3))

    # -- configuration -----------------------------------------------------------------------
    @property
    def display_name(self) -> str:
        """Human-readable name, e.g. ``"Pilatus 1M"`` (pyFAI's ``Detector.name``)."""
        model = DETECTORS.get(self.name)
        return model.display_name if model is not None else self.name

    def get_config(self) -> dict[str, Any]:
        """pyFAI-compatible ``Detector_config`` dictionary (JSON-serialisable).

        Always ``pixel1``, ``pixel2`` and ``orientation``; ``max_shape`` when it differs from the
        model's default (always for a generic detector of known shape); ``module_size`` when
        it differs from the model's; ``sensor`` when one was configured.
        """
        config: dict[str, Any] = {
            "pixel1": self.pixel1,
            "pixel2": self.pixel2,
            "orientation": self.orientation,
        }
        model = DETECTORS.get(self.name)
        if self.max_shape is not None:
            if model is None or model.max_shape is None:
                config["max_shape"] = list(self.max_shape)
            elif tuple(self.max_shape) != tuple(model.max_shape):
                config["max_shape"] = list(self.max_shape)
        if (
            model is not None
            and model.layout is not None
            and self.layout is not None
            and self.layout.module_size != model.layout.module_size
        ):
            config["module_size"] = list(self.layout.module_size)
        if self.sensor:
            config["sensor"] = dict(self.sensor)
        return config

    # -- image shape -------------------------------------------------------------------------
    def with_shape(self, shape: tuple[int, ...]) -> Detector:
        """This detector fitted to an image of ``shape``.

        A generic detector without a shape takes the image's.  A Mar345 takes the plate size
        (and so the pixel size) of the image.  A fixed detector whose full shape is an exact
        multiple of the image shape is binned accordingly (as pyFAI's ``guess_binning``).

        Parameters
        ----------
        shape : tuple of int
            The image shape ``(N1, N2)``.

        Returns
        -------
        Detector
            ``self`` when the shape already matches, else a new detector.

        Raises
        ------
        AzfilterError
            When the image cannot come from this detector.
        """
        shape = _as_shape(shape, f"detector {self.name}: image shape")
        if self.shape == shape:
            return self
        model = DETECTORS.get(self.name)
        if model is not None and model.kind == "mar345":
            return _mar345(shape, self.orientation, self.sensor, "image shape")
        if self.shape is None:
            return replace(self, shape=shape, max_shape=shape, binning=(1, 1))
        if model is not None and model.kind == "fixed" and self.max_shape is not None:
            (m1, m2), (n1, n2) = self.max_shape, shape
            if 0 < n1 <= m1 and 0 < n2 <= m2 and m1 % n1 == 0 and m2 % n2 == 0:
                new_binning = (m1 // n1, m2 // n2)
                new_pixels = [model.binned_pixel(axis, new_binning[axis]) for axis in range(2)]
                if new_pixels[0] is not None and new_pixels[1] is not None:
                    return replace(
                        self, shape=shape, binning=new_binning,
                        pixel1=new_pixels[0], pixel2=new_pixels[1],
                    )
        raise AzfilterError(
            f"detector {self.name}: image shape {shape[0]}x{shape[1]} does not match the "
            f"detector shape {self.shape[0]}x{self.shape[1]}"
        )

    # -- dynamic mask ------------------------------------------------------------------------
    def invalid_pixels(self, raw: np.ndarray) -> np.ndarray:
        """Pixels of a raw frame that carry no measurement.

        A pixel is invalid when it is NaN or infinite, or, when the detector has a dummy value,
        when ``|raw - dummy| <= delta_dummy`` (Pilatus/Eiger: -1 for gaps, -2 for bad pixels).
        For detectors with a negative dummy (Dectris) and an unsigned image dtype, the
        all-ones value (65535 for uint16, 4294967295 for uint32: the Eiger sentinel) is
        invalid instead.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.

        Returns
        -------
        numpy.ndarray
            Boolean array of ``raw.shape``, True = invalid.
        """
        raw = np.asarray(raw)
        kind = raw.dtype.kind
        if kind in "fc":
            invalid = ~np.isfinite(raw)
        else:
            invalid = np.zeros(raw.shape, dtype=bool)
        dummy, delta = self.dummy_for(raw.dtype)
        if dummy is None:
            return invalid
        if kind in "iub":
            # Integer test without a float copy: |raw - d| <= delta <=> lo <= raw <= hi.
            lo, hi = math.ceil(dummy - delta), math.floor(dummy + delta)
            info = np.iinfo(raw.dtype) if kind != "b" else None
            if info is not None:
                lo, hi = max(lo, info.min), min(hi, info.max)
            if lo <= hi:
                invalid |= (raw >= lo) & (raw <= hi)
        else:
            invalid |= np.abs(raw.astype(np.float64, copy=False) - dummy) <= delta
        return invalid

    def dummy_for(self, dtype: np.dtype | type) -> tuple[float | None, float]:
        """The dummy value and tolerance that apply to raw frames of ``dtype``.

        Equals ``(dummy, delta_dummy)`` except for unsigned integer frames of a detector with a
        negative dummy, where the all-ones value replaces it, with tolerance 0 (evaluate
        ``|raw - dummy| <= delta`` in float64 for uint32 frames).

        Parameters
        ----------
        dtype : numpy dtype
            The raw frame's dtype.

        Returns
        -------
        (float or None, float)
            ``(None, 0.0)`` when no dummy applies.
        """
        if self.dummy is None:
            return None, 0.0
        dtype = np.dtype(dtype)
        if dtype.kind == "u" and self.dummy < 0:
            return float(np.iinfo(dtype).max), 0.0
        return float(self.dummy), float(self.delta_dummy)


# ---------------------------------------------------------------------------------------------
# helpers

def _check_orientation(value: Any, name: str) -> int:
    try:
        orientation = int(value)
    except (TypeError, ValueError):
        orientation = -1
    if orientation == 0:  # pyFAI: 0 means "the detector's default", 3 for every model here
        orientation = 3
    if not 1 <= orientation <= 4 or isinstance(value, bool):
        raise AzfilterError(f"detector {name}: orientation must be 1, 2, 3 or 4, got {value!r}")
    return orientation


def _as_shape(value: Any, what: str) -> Shape:
    try:
        n1, n2 = (int(v) for v in value)
        ok = (n1, n2) == tuple(value) and n1 > 0 and n2 > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AzfilterError(f"{what} must be two positive integers, got {value!r}")
    return n1, n2


def _as_pixel(value: Any, key: str, name: str) -> float:
    try:
        pixel = float(value)
    except (TypeError, ValueError):
        pixel = math.nan
    if not (math.isfinite(pixel) and pixel > 0) or isinstance(value, bool):
        raise AzfilterError(
            f"detector {name}: Detector_config {key} must be a positive size in m, got {value!r}"
        )
    return pixel


def _circle_mask(shape: Shape) -> np.ndarray:
    """Pixels outside the circle inscribed in a Mar345 plate (centre at N // 2)."""
    c1, c2 = shape[0] // 2, shape[1] // 2
    rows = np.arange(shape[0], dtype=np.float64)[:, None] + 0.5 - c1
    cols = np.arange(shape[1], dtype=np.float64)[None, :] + 0.5 - c2
    return rows * rows + cols * cols > float(c1 * c1)


def _mar345(
    shape: Shape, orientation: int, sensor: dict[str, Any] | None, what: str
) -> Detector:
    n1, n2 = shape
    if n1 != n2 or n1 not in MAR345_SIZES:
        sizes = ", ".join(str(s) for s in sorted(MAR345_SIZES))
        raise AzfilterError(
            f"detector Mar345: {what} {n1}x{n2} is not a Mar345 plate size (square: {sizes})"
        )
    pixel = MAR345_SIZES[n1]
    return Detector(
        name="Mar345", pixel1=pixel, pixel2=pixel, shape=shape, orientation=orientation,
        max_shape=shape, mask_kind="circle", sensor=sensor,
    )


def _normalize(name: str) -> str:
    """Lower case without spaces, underscores, dashes or dots: "Eiger2 CdTe 1M-W" -> ..."""
    return re.sub(r"[\s_\-.]+", "", name.lower())


# ---------------------------------------------------------------------------------------------
# the registry

DETECTORS: dict[str, DetectorModel] = {}
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name


def _register(model: DetectorModel) -> None:
    DETECTORS[model.name] = model
    for label in (model.name, *model.aliases):
        key = _normalize(label)
        previous = _LOOKUP.setdefault(key, model.name)
        if previous != model.name:
            raise RuntimeError(f"detector alias {label!r} names both {previous} and {model.name}")


_DECTRIS = dict(dummy=-2.0, delta_dummy=1.5, manufacturer="Dectris")

# Pilatus: 195x487 modules of 172 um pixels, 17-row and 7-column gaps.
_PILATUS = ModuleLayout((195, 487), (17, 7))
_PILATUS_CDTE = ModuleLayout((195, 487), (17, 7), centre_gap=(-1, 2))
for _size, _shape in [
    ("100k", (195, 487)), ("200k", (407, 487)), ("300k", (619, 487)), ("300kw", (195, 1475)),
    ("900k", (619, 1475)), ("1M", (1043, 981)), ("2M", (1679, 1475)), ("6M", (2527, 2463)),
]:
    _register(DetectorModel(
        f"Pilatus{_size}", (172e-6, 172e-6), _shape, layout=_PILATUS,
        aliases=(f"Pilatus {_size}", f"Pilatus3 {_size}", f"Pilatus3 X {_size}"), **_DECTRIS,
    ))
for _size, _shape in [
    ("300k", (619, 487)), ("300kw", (195, 1475)), ("900kw", (195, 4439)),
    ("1M", (1043, 981)), ("2M", (1679, 1475)),
]:
    _register(DetectorModel(
        f"PilatusCdTe{_size}", (172e-6, 172e-6), _shape, layout=_PILATUS_CDTE,
        aliases=(f"Pilatus CdTe {_size}", f"Pilatus {_size} CdTe", f"Pilatus3 X CdTe {_size}"),
        **_DECTRIS,
    ))

# Pilatus4: 255x513 modules of 150 um, 20-row and 7-column gaps; CdTe masks the centre column.
_PILATUS4 = ModuleLayout((255, 513), (20, 7))
_PILATUS4_CDTE = ModuleLayout((255, 513), (20, 7), centre_gap=(0, 1))
for _size, _shape in [
    ("260k", (530, 513)), ("260kw", (255, 1033)), ("1M", (1080, 1033)),
    ("2M", (1630, 1553)), ("4M", (2180, 2073)),
]:
    _register(DetectorModel(
        f"Pilatus4_{_size}", (150e-6, 150e-6), _shape, layout=_PILATUS4,
        aliases=(f"Pilatus4 {_size}",), **_DECTRIS,
    ))
    _register(DetectorModel(
        f"Pilatus4_CdTe_{_size}", (150e-6, 150e-6), _shape, layout=_PILATUS4_CDTE,
        aliases=(f"Pilatus4 {_size} CdTe", f"Pilatus4 CdTe {_size}"), **_DECTRIS,
    ))

# Eiger: 514x1030 modules of 75 um (2x4 chips with interpolated double pixels), 37/10 gaps.
_EIGER = ModuleLayout((514, 1030), (37, 10))
for _size, _shape in [
    ("500k", (514, 1030)), ("1M", (1065, 1030)), ("4M", (2167, 2070)),
    ("9M", (3269, 3110)), ("16M", (4371, 4150)),
]:
    _register(DetectorModel(
        f"Eiger{_size}", (75e-6, 75e-6), _shape, layout=_EIGER,
        aliases=(f"Eiger {_size}", f"Eiger X {_size}"), **_DECTRIS,
    ))

# Eiger2: 512x1028 modules, 38/12 gaps; CdTe sensors lose 2 columns at each module centre.
_EIGER2 = ModuleLayout((512, 1028), (38, 12))
_EIGER2_CDTE = ModuleLayout((512, 1028), (38, 12), centre_gap=(-1, 1))
for _size, _shape in [
    ("250k", (512, 512)), ("500k", (512, 1028)), ("1M", (1062, 1028)), ("1MW", (512, 2068)),
    ("2MW", (512, 4148)), ("4M", (2162, 2068)), ("9M", (3262, 3108)), ("16M", (4362, 4148)),
]:
    _pretty = _size[:-1] + "-W" if _size.endswith("W") else _size
    _register(DetectorModel(
        f"Eiger2_{_size}", (75e-6, 75e-6), _shape, layout=_EIGER2,
        aliases=(f"Eiger2 {_pretty}", f"Eiger2 X {_pretty}"), **_DECTRIS,
    ))
    if _size != "250k":
        _register(DetectorModel(
            f"Eiger2CdTe_{_size}", (75e-6, 75e-6), _shape, layout=_EIGER2_CDTE,
            aliases=(f"Eiger2 CdTe {_pretty}", f"Eiger2 X CdTe {_pretty}"), **_DECTRIS,
        ))

# X-Spectrum Lambda: 256x256 Medipix3 chips of 55 um with 4-pixel gaps.  pyFAI flags 0 as
# the dummy value (no tolerance).  The 9M's gaps are module specific: pyFAI masks nothing.
_LAMBDA = ModuleLayout((256, 256), (4, 4))
for _size, _shape in [
    ("60k", (256, 256)), ("250k", (516, 516)), ("750k", (516, 1556)), ("2M", (1556, 1556)),
    ("7M5", (2596, 2596)), ("10M", (2596, 4676)), ("9M", (3868, 3227)),
]:
    _pretty = "7.5M" if _size == "7M5" else _size
    _register(DetectorModel(
        f"Lambda{_size}", (55e-6, 55e-6), _shape, layout=None if _size == "9M" else _LAMBDA,
        dummy=0.0, delta_dummy=0.0, aliases=(f"Lambda {_pretty}",), manufacturer="X-Spectrum",
    ))

_register(DetectorModel(
    "Mar345", (100e-6, 100e-6), (3450, 3450), kind="mar345",
    aliases=("MAR 345", "Mar3450"), manufacturer="Mar Research",
))
# Perkin Elmer flat panel: 4096x4096 pixels of 100 um, read out 2x2 binned by default.
_register(DetectorModel(
    "Perkin", (100e-6, 100e-6), (4096, 4096), default_binning=(2, 2),
    aliases=("Perkin detector", "Perkin Elmer"), manufacturer="Perkin Elmer",
))
# Thales Pixium 4700: 1910x2480 pixels of 154 um, 2x2 binned by default (pyFAI "Pixium").
_register(DetectorModel(
    "Pixium", (154e-6, 154e-6), (1910, 2480), default_binning=(2, 2),
    aliases=("Pixium 4700", "Pixium 4700 detector", "Thales Electronics"),
    manufacturer="Thales Electronics",
))

# Round Rayonix CCDs (MAR133, SX165): pixels outside the inscribed circle are masked.
for _name, _table, _default, _aliases in [
    ("Rayonix133", ((1, 32e-6), (2, 64e-6), (4, 128e-6), (8, 256e-6)), 2, ("MAR 133",)),
    ("RayonixSx165", ((1, 39.5e-6), (2, 79e-6), (3, 118.616e-6), (4, 158e-6), (8, 316e-6)), 1,
     ("Rayonix SX165", "MAR 165")),
]:
    _register(DetectorModel(
        _name, (_table[0][1], _table[0][1]), (4096, 4096), default_binning=(_default, _default),
        binned_pixels=_table, aliases=_aliases, manufacturer="Rayonix", circular=True,
    ))

# PSI Jungfrau 1M/4M as assembled without sub-module pixel expansion: Dectris-like modules.
_JUNGFRAU = ModuleLayout((514, 1030), (36, 8))
for _size, _shape in [("1M", (1064, 1030)), ("4M", (2164, 2068))]:
    _register(DetectorModel(
        f"Jungfrau{_size}", (75e-6, 75e-6), _shape, layout=_JUNGFRAU, dummy=-2.0,
        delta_dummy=1.5, aliases=(f"Jungfrau {_size}",), manufacturer="PSI",
    ))

# ESRF Maxipix: 256x256 chips of 55 um with 4-pixel gaps.
_MAXIPIX = ModuleLayout((256, 256), (4, 4))
_register(DetectorModel(
    "Maxipix", (55e-6, 55e-6), (256, 256), layout=_MAXIPIX,
    aliases=("Maxipix 1x1", "Maxipix1x1"), manufacturer="ESRF",
))
for _size, _shape in [("2x2", (516, 516)), ("5x1", (256, 1296))]:
    _register(DetectorModel(
        f"Maxipix{_size}", (55e-6, 55e-6), _shape, layout=_MAXIPIX,
        aliases=(f"Maxipix {_size}",), manufacturer="ESRF",
    ))

# Plain pixel grids without gaps: (name, pixel (m), shape, aliases, manufacturer).
for _name, _pixel, _shape, _aliases, _maker in [
    ("ADSC_Q4", 51e-6, (2304, 2304), ("Quantum 4",), "ADSC"),
    ("ADSC_Q210", 51e-6, (4096, 4096), ("Quantum 210",), "ADSC"),
    ("ADSC_Q270", 51e-6, (4168, 4168), ("Quantum 270",), "ADSC"),
    ("ADSC_Q315", 51e-6, (6144, 6144), ("Quantum 315",), "ADSC"),
    ("HF_130K", 150e-6, (256, 512), ("HF-130k",), "ADSC"),
    ("HF_262k", 150e-6, (512, 512), ("HF-262k",), "ADSC"),
    ("HF_1M", 150e-6, (1024, 1024), ("HF-1M",), "ADSC"),
    ("HF_2M", 150e-6, (1536, 1536), ("HF-2.4M",), "ADSC"),
    ("HF_4M", 150e-6, (2048, 2048), ("HF-4M",), "ADSC"),
    ("HF_9M", 150e-6, (3072, 3072), ("HF-9.4M",), "ADSC"),
    ("Apex2", 120e-6, (1024, 1024), ("ApexII", "Bruker"), "Bruker"),
    ("Basler", 3.75e-6, (966, 1296), ("aca1300",), "Basler"),
    ("Dexela2923", 75e-6, (3888, 3072), ("Dexela 2923",), None),
    ("Fairchild", 15e-6, (4096, 4096), ("Fairchild", "Condor", "Fairchild Condor 486:90"),
     "Fairchild Semiconductor"),
    ("Mar555", 139e-6, (3072, 2560), ("MAR 555",), "Mar Research"),
    ("RaspberryPi5M", 1.4e-6, (1944, 2592), ("Picam v1",), None),
    ("RaspberryPi8M", 1.12e-6, (2464, 3280), ("Picam v2",), None),
    ("RaspberryPi12M", 1.55e-6, (3040, 4056), ("Picam HQ",), None),
    ("Titan", 60e-6, (2048, 2048), ("Titan 2k x 2k", "OXD Titan", "Agilent Titan"),
     "Agilent"),
]:
    _register(DetectorModel(
        _name, (_pixel, _pixel), _shape, aliases=_aliases, manufacturer=_maker,
    ))
# Dectris Mythen strip: one row of 1280 strips, 8 mm long and 50 um wide.
_register(DetectorModel(
    "Mythen", (8e-3, 50e-6), (1, 1280), aliases=("Mythen 1280",), manufacturer="Dectris",
))

# Rayonix CCDs: binning modes with tabulated (rounded) pixel sizes, as pyFAI's tables.
_RAYONIX_44 = (
    (1, 44.2708e-6), (2, 88.5417e-6), (3, 132.8125e-6), (4, 177.0833e-6), (5, 221.3542e-6),
    (6, 265.625e-6), (8, 354.1667e-6), (10, 442.7083e-6),
)
_RAYONIX_39 = (
    (1, 39.0625e-6), (2, 78.125e-6), (3, 117.1875e-6), (4, 156.25e-6), (5, 195.3125e-6),
    (6, 234.375e-6), (8, 312.5e-6), (10, 390.625e-6),
)
_RAYONIX_36 = (
    (1, 36.621e-6), (2, 73.242e-6), (3, 109.971e-6), (4, 146.484e-6), (8, 292.969e-6),
)
for _name, _table, _shape, _default, _aliases in [
    ("RayonixSx200", ((1, 48e-6), (2, 96e-6), (3, 144e-6), (4, 192e-6), (8, 384e-6)),
     (4096, 4096), 1, ("Rayonix SX200",)),
    ("RayonixSx30hs", ((1, 15.625e-6), (2, 31.25e-6), (3, 46.875e-6), (4, 62.5e-6),
                       (5, 78.125e-6), (6, 93.75e-6), (8, 125e-6), (10, 156.25e-6)),
     (1920, 1920), 1, ("Rayonix SX30HS", "Rayonix SX30 HS")),
    ("RayonixSx85hs", _RAYONIX_44, (1920, 1920), 1, ("Rayonix SX85HS", "Rayonix SX85 HS")),
    ("RayonixLx170", _RAYONIX_44, (1920, 3840), 1,
     ("Rayonix LX170", "Rayonix LX170-HS", "Rayonix LX170 HS")),
    ("RayonixLx255", _RAYONIX_44, (1920, 5760), 1,
     ("Rayonix LX255", "Rayonix LX255-HS", "Rayonix LX 255HS", "RayonixLX225HS")),
    ("RayonixMx170", _RAYONIX_44, (3840, 3840), 1,
     ("Rayonix MX170", "Rayonix MX170-HS", "Rayonix MX170 HS")),
    ("RayonixMx340hs", _RAYONIX_44, (7680, 7680), 2, ("Rayonix MX340HS",)),
    ("RayonixMx425hs", _RAYONIX_44, (9600, 9600), 1, ("Rayonix MX425HS", "Rayonix MX425 HS")),
    ("RayonixMx225", _RAYONIX_36, (6144, 6144), 2, ("Rayonix MX225", "MAR 225")),
    ("RayonixMx300", _RAYONIX_36, (8192, 8192), 2, ("Rayonix MX300", "MAR 300")),
    ("RayonixMx225hs", _RAYONIX_39, (5760, 5760), 2, ("Rayonix MX225HS", "Rayonix MX225 HS")),
    ("RayonixMx300hs", _RAYONIX_39, (7680, 7680), 2, ("Rayonix MX300HS", "Rayonix MX300 HS")),
    ("RayonixMx325", ((1, 39.673e-6), (2, 79.346e-6), (3, 119.135e-6), (4, 158.691e-6),
                      (8, 317.383e-6)), (8192, 8192), 2, ("Rayonix MX325",)),
]:
    _register(DetectorModel(
        _name, (_table[0][1], _table[0][1]), _shape, default_binning=(_default, _default),
        binned_pixels=_table, aliases=_aliases, manufacturer="Rayonix",
    ))

_register(DetectorModel("Detector", None, None, kind="generic"))


# ---------------------------------------------------------------------------------------------
# public constructors

def generic_detector(
    pixel1: float, pixel2: float, shape: tuple[int, int] | None = None, orientation: int = 3
) -> Detector:
    """A plain detector: a regular grid of pixels without gaps or dummy value.

    Parameters
    ----------
    pixel1, pixel2 : float
        Pixel size (m) along rows and columns.
    shape : (int, int), optional
        Image shape; None to take it later from the image (:meth:`Detector.with_shape`).
    orientation : int
        1-4 as pyFAI; 3 is pyFAI's native orientation.

    Returns
    -------
    Detector
    """
    pixel1 = _as_pixel(pixel1, "pixel1", "Detector")
    pixel2 = _as_pixel(pixel2, "pixel2", "Detector")
    if shape is not None:
        shape = _as_shape(shape, "detector Detector: max_shape")
    return Detector(
        name="Detector", pixel1=pixel1, pixel2=pixel2, shape=shape, orientation=orientation
    )


def resolve_name(name: str) -> str:
    """Canonical (pyFAI class) name of a detector name or alias.

    Matching ignores case, spaces, underscores, dashes and dots: ``"Pilatus 1M"``,
    ``"PILATUS_1M"`` and ``"pilatus1m"`` all give ``"Pilatus1M"``.

    Raises
    ------
    AzfilterError
        For an unknown name; the message lists close matches.
    """
    key = _normalize(str(name))
    try:
        return _LOOKUP[key]
    except KeyError:
        pass
    import difflib  # only for the error message

    close = difflib.get_close_matches(key, list(_LOOKUP), n=8, cutoff=0.6)
    suggestions: list[str] = []
    for match in close:
        canonical = _LOOKUP[match]
        if canonical not in suggestions:
            suggestions.append(canonical)
    hint = (
        f"close matches: {', '.join(suggestions[:5])}"
        if suggestions
        else "see azfilter.detectors.DETECTORS for the known names"
    )
    raise AzfilterError(f"unknown detector {name!r}; {hint}")


def get_detector(name: str, config: dict[str, Any] | str | None = None) -> Detector:
    """Build a detector from its name and an optional pyFAI ``Detector_config``.

    Parameters
    ----------
    name : str
        A registered name or alias (see :func:`resolve_name`), ``"Detector"`` for a generic
        detector.
    config : dict or JSON str, optional
        pyFAI's ``Detector_config``; keys are case-insensitive.  ``pixel1``/``pixel2`` (m) set
        the pixel size of a generic detector and the binning of a fixed one (an integer
        multiple of the native pixel); ``orientation`` (1-4, 0 = default 3); ``max_shape``
        (the shape of a generic detector, or the full unbinned shape of a fixed one);
        ``module_size``; ``binning`` (factors, instead of pixel sizes); ``sensor`` (kept).
        A spline or offset file is an error (distortion is not supported).  Other keys are
        ignored.

    Returns
    -------
    Detector

    Raises
    ------
    AzfilterError
        Unknown name, or a configuration this detector cannot have.
    """
    canonical = resolve_name(name)
    model = DETECTORS[canonical]
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as err:
            raise AzfilterError(
                f"detector {canonical}: Detector_config is not JSON ({err})"
            ) from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise AzfilterError(f"detector {canonical}: Detector_config must be a JSON object")
    config = {str(key).lower(): value for key, value in config.items()}
    orientation = _check_orientation(config.get("orientation") or 3, canonical)
    sensor = config.get("sensor") or None
    if sensor is not None and not isinstance(sensor, dict):
        raise AzfilterError(f"detector {canonical}: Detector_config sensor must be an object")
    max_shape = config.get("max_shape")
    if max_shape is not None:
        max_shape = _as_shape(max_shape, f"detector {canonical}: Detector_config max_shape")
    pixels = [
        None if config.get(key) is None else _as_pixel(config[key], key, canonical)
        for key in ("pixel1", "pixel2")
    ]
    for key in ("splinefile", "x_offset_file", "y_offset_file"):
        # A distortion file moves every pixel: ignoring it would give a wrong geometry.
        if config.get(key) not in (None, "", "None"):
            raise AzfilterError(
                f"detector {canonical}: Detector_config {key} is set, but distortion (spline or "
                "offset) files are not supported"
            )
    requested_binning = config.get("binning")
    if requested_binning is not None:
        if isinstance(requested_binning, (int, float)):
            requested_binning = (requested_binning, requested_binning)
        requested_binning = _as_shape(
            requested_binning, f"detector {canonical}: Detector_config binning"
        )

    if model.kind == "generic":
        if pixels[0] is None or pixels[1] is None:
            raise AzfilterError(
                "detector Detector: Detector_config needs pixel1 and pixel2 (m) for a generic "
                "detector"
            )
        detector = generic_detector(pixels[0], pixels[1], max_shape, orientation)
        detector.sensor = sensor
        return detector

    if model.kind == "mar345":
        return _mar345_from_config(pixels, max_shape, orientation, sensor)

    assert model.native_pixel is not None and model.max_shape is not None
    full_shape = max_shape if max_shape is not None else model.max_shape
    binning = []
    sizes = []
    for axis in range(2):
        pixel = pixels[axis]
        if pixel is None:
            if requested_binning is None:
                factor = model.default_binning[axis]
            else:
                factor = requested_binning[axis]
            pixel = model.binned_pixel(axis, factor)
            if pixel is None:
                raise AzfilterError(
                    f"detector {canonical}: Detector_config binning {factor} is not a binning "
                    "mode of this detector" + _binning_hint(model)
                )
        else:
            found = model.binning_of(axis, pixel)
            if found is None:
                raise AzfilterError(
                    f"detector {canonical}: Detector_config pixel{axis + 1} = {pixel:g} m "
                    f"is not a binning of the native {model.native_pixel[axis]:g} m pixel"
                    + _binning_hint(model)
                )
            factor = found
            if requested_binning is not None and requested_binning[axis] != factor:
                raise AzfilterError(
                    f"detector {canonical}: Detector_config binning {requested_binning[axis]} "
                    f"contradicts pixel{axis + 1} = {pixel:g} m (binning {factor})"
                )
        sizes.append(pixel)
        binning.append(factor)
    shape = (full_shape[0] // binning[0], full_shape[1] // binning[1])
    if shape[0] < 1 or shape[1] < 1:
        raise AzfilterError(
            f"detector {canonical}: binning {binning[0]}x{binning[1]} leaves no pixel"
        )
    layout = model.layout
    if layout is not None and config.get("module_size") is not None:
        module_size = _as_shape(
            config["module_size"], f"detector {canonical}: Detector_config module_size"
        )
        layout = replace(layout, module_size=module_size)
    return Detector(
        name=canonical, pixel1=sizes[0], pixel2=sizes[1], shape=shape, orientation=orientation,
        dummy=model.dummy, delta_dummy=model.delta_dummy, max_shape=full_shape,
        binning=(binning[0], binning[1]), layout=layout,
        mask_kind="modules" if layout is not None else ("circle" if model.circular else "none"),
        sensor=sensor,
    )


def _binning_hint(model: DetectorModel) -> str:
    if model.binned_pixels is None:
        return ""
    sizes = ", ".join(f"{size:g}" for _, size in model.binned_pixels)
    return f" (valid: {sizes})"


def _mar345_from_config(
    pixels: list[float | None],
    max_shape: Shape | None,
    orientation: int,
    sensor: dict[str, Any] | None,
) -> Detector:
    """Mar345 from a configuration: the plate size sets the pixel size and vice versa."""
    if max_shape is not None:
        detector = _mar345(max_shape, orientation, sensor, "Detector_config max_shape")
    else:
        pixel = pixels[0] if pixels[0] is not None else pixels[1]
        if pixel is None:
            pixel = 100e-6
        # The largest plate for this pixel size: 3450 at 100 um, 2300 at 150 um.
        sizes = [s for s, p in MAR345_SIZES.items() if math.isclose(p, pixel, rel_tol=1e-6)]
        if not sizes:
            raise AzfilterError(
                f"detector Mar345: Detector_config pixel size {pixel:g} m is neither 100e-6 "
                "nor 150e-6"
            )
        detector = _mar345((max(sizes), max(sizes)), orientation, sensor, "plate size")
    for axis, pixel in enumerate(pixels):
        native = (detector.pixel1, detector.pixel2)[axis]
        if pixel is not None and not math.isclose(pixel, native, rel_tol=1e-6):
            raise AzfilterError(
                f"detector Mar345: Detector_config pixel{axis + 1} = {pixel:g} m does not fit "
                f"a {detector.shape[0]}x{detector.shape[1]} plate ({native:g} m)"
            )
    return detector
