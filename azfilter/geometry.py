"""Detector geometry (pyFAI's PONI convention) and every per-pixel array derived from it.

Conventions (pyFAI's, docs/internals.md "Geometry"): index ``i`` is the row (dim1, slow axis),
``j`` the column (dim2, fast axis). Pixel centres sit at ``(i + 0.5)·pixel1`` and
``(j + 0.5)·pixel2`` from the detector origin, pixel corners at integer indices. The detector
orientation (1-4) only remaps the pixel index before the +0.5 step. The offsets from the PONI,
``(p1, p2, dist)``, are rotated by ``R = R3·R2·R1`` into the laboratory frame ``(t1, t2, t3)``,
``t3`` along the beam; then

- ``2θ = atan2(sqrt(t1² + t2²), t3)`` (rad),
- ``χ = atan2(t1, t2)`` in (-π, π] (rad),
- ``q = 4π·1e-9/λ · sin(θ)`` (nm⁻¹),
- ``r = sqrt(t1² + t2²)`` (m, distance to the beam axis),
- ``d = 2π/(1e9·q)`` (m, d-spacing; infinite where q = 0).

Every array is float64 and is computed from one-dimensional row and column terms broadcast
block by block over the rows, so an Eiger 16M needs only the output array plus a few small
temporaries. The blocks are shared among threads, one per usable core (numpy's element-wise
functions release the GIL): each element is computed by the same operations whatever thread
computes its block, so the arrays are the same bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import AzfilterError
from .units import get_unit

if TYPE_CHECKING:  # detectors imports nothing from here; the name is only needed for hints
    from .detectors import Detector

#: h·c in keV·Å (CODATA, as scipy.constants and pyFAI's units.CONST_hc)
HC_KEV_ANGSTROM = 12.398419843320026

#: the quantities of :meth:`Geometry.center_array` and their internal units
QUANTITIES = ("2th", "q", "r", "chi", "d")

# Rows per block when filling a per-pixel array: ~256 k elements (2 MB) per temporary.
_BLOCK_ELEMENTS = 1 << 18


def _for_each_block(fill: Callable[[slice], None], blocks: Iterator[slice]) -> None:
    """Call ``fill(rows)`` for every row block, on one thread per usable core.

    The per-pixel arrays are the bulk of a new lookup table's set-up (a Pilatus 1M: ~0.2 s of
    trigonometry on one core, before the first frame can be reduced); the blocks are
    independent, and numpy's element-wise functions run without the GIL.
    """
    from .resources import usable_cores

    blocks = list(blocks)
    workers = min(len(blocks), usable_cores())
    if workers <= 1:
        for rows in blocks:
            fill(rows)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="azfilter-geometry") as pool:
        for _ in pool.map(fill, blocks):   # re-raises the first error of a block
            pass


@dataclass(eq=False)
class Geometry:
    """A calibrated detector position (pyFAI's PONI geometry) and its per-pixel arrays.

    Parameters
    ----------
    dist : float
        Sample to detector-plane distance along the plane normal (m).
    poni1, poni2 : float
        Point of normal incidence along dim1 (rows) and dim2 (columns), from the detector
        origin (m).
    rot1, rot2, rot3 : float
        Detector rotations (rad), applied in the order rot1, rot2, rot3.
    wavelength : float or None
        X-ray wavelength (m); needed only for q.
    detector : Detector
        Shape (may be None for a generic detector: the image gives it), pixel sizes,
        orientation, mask.
    source : str or None
        Where the geometry came from (the PONI file), for error messages.

    Notes
    -----
    Arrays are cached on the instance and returned read-only; the cache is dropped when any
    parameter changes. Two geometries compare equal when all parameters and the detector
    (name, shape, pixel sizes, orientation) are equal; ``source`` is not compared.
    """

    dist: float
    poni1: float
    poni2: float
    rot1: float = 0.0
    rot2: float = 0.0
    rot3: float = 0.0
    wavelength: float | None = None
    detector: Detector = None  # type: ignore[assignment]  # required; checked below
    source: str | None = None
    _cache: dict = field(default_factory=dict, init=False, repr=False)
    _cache_params: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.detector is None:
            raise TypeError("Geometry needs a detector (azfilter.detectors.Detector)")

    # ------------------------------------------------------------------ derived scalars
    @property
    def energy(self) -> float | None:
        """Photon energy in keV (``hc/λ``), or None without a wavelength."""
        if self.wavelength is None:
            return None
        return HC_KEV_ANGSTROM / (self.wavelength * 1e10)

    @property
    def name(self) -> str:
        """The geometry's source (PONI file) for messages, or a generic description."""
        return self.source if self.source else "the geometry"

    def _params(self) -> tuple:
        det = self.detector
        shape = None if det.shape is None else tuple(int(n) for n in det.shape)
        return (
            float(self.dist), float(self.poni1), float(self.poni2),
            float(self.rot1), float(self.rot2), float(self.rot3),
            None if self.wavelength is None else float(self.wavelength),
            str(det.name), shape, float(det.pixel1), float(det.pixel2), int(det.orientation),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return self._params() == other._params()

    __hash__ = None  # mutable

    @classmethod
    def from_poni(cls, path: str | os.PathLike) -> Geometry:
        """Read a PONI file (versions 1, 2, 2.1, 3); the same as :func:`azfilter.load_poni`.

        Raises
        ------
        AzfilterError
            When the file cannot be read, or its content is bad.
        """
        from .poni_format import read_poni_fields

        return cls(**read_poni_fields(path))

    def to_poni(self, path: str | os.PathLike | None = None, version: float = 2.1) -> str:
        """The PONI text of this geometry and, when ``path`` is given, that text written
        atomically (:func:`azfilter.poni.save_poni`)."""
        from .poni_format import save_poni

        return save_poni(self, path, version=version)

    def cache_key(self) -> str:
        """A stable hex digest of the geometry and detector (for on-disk lookup tables).

        Floats enter by their exact binary value (``float.hex``), so any change of any
        parameter, of the detector name, shape, pixel size or orientation changes the key; the
        key is the same across processes and machines.
        """
        (dist, poni1, poni2, rot1, rot2, rot3, wavelength, name, shape, pixel1, pixel2,
         orientation) = self._params()
        record = {
            "dist": dist.hex(), "poni1": poni1.hex(), "poni2": poni2.hex(),
            "rot1": rot1.hex(), "rot2": rot2.hex(), "rot3": rot3.hex(),
            "wavelength": None if wavelength is None else wavelength.hex(),
            "detector": name, "shape": None if shape is None else list(shape),
            "pixel1": pixel1.hex(), "pixel2": pixel2.hex(), "orientation": orientation,
        }
        blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        return "geometry-v1-" + hashlib.sha256(blob).hexdigest()

    # ------------------------------------------------------------------ shapes, cache
    def with_shape(self, shape: tuple[int, ...]) -> Geometry:
        """This geometry with its detector fitted to an image of ``shape``.

        A generic detector without a shape takes the image's; a binned image of a fixed
        detector gets the binned pixel size (:meth:`Detector.with_shape`). Returns ``self`` when
        the shape already matches.

        Raises
        ------
        AzfilterError
            When the image cannot come from this detector.
        """
        detector = self.detector.with_shape(tuple(shape))
        if detector is self.detector:
            return self
        return Geometry(
            dist=self.dist, poni1=self.poni1, poni2=self.poni2,
            rot1=self.rot1, rot2=self.rot2, rot3=self.rot3,
            wavelength=self.wavelength, detector=detector, source=self.source,
        )

    def resolve_shape(self, shape: tuple[int, int] | None = None) -> tuple[int, int]:
        """The array shape: ``shape`` if given (it must match a known detector shape), else the
        detector's.

        Raises
        ------
        AzfilterError
            When neither is known, or when they disagree.
        """
        det_shape = self.detector.shape
        if shape is None:
            if det_shape is None:
                raise AzfilterError(
                    f"{self.name}: detector {self.detector.name!r} has no shape; "
                    "it comes from the image (pass shape=)"
                )
            return (int(det_shape[0]), int(det_shape[1]))
        try:
            n1, n2 = (int(n) for n in shape)
        except (TypeError, ValueError):
            raise AzfilterError(
                f"{self.name}: bad shape {shape!r}, expected (rows, columns)"
            ) from None
        if n1 <= 0 or n2 <= 0:
            raise AzfilterError(f"{self.name}: bad shape {shape!r}, expected positive sizes")
        if det_shape is not None and (n1, n2) != tuple(int(n) for n in det_shape):
            raise AzfilterError(
                f"{self.name}: image shape {(n1, n2)} does not match detector "
                f"{self.detector.name} shape {tuple(det_shape)}"
            )
        return (n1, n2)

    def _cached(self, key: tuple, compute) -> np.ndarray:
        params = self._params()
        if params != self._cache_params:
            self._cache.clear()
            self._cache_params = params
        array = self._cache.get(key)
        if array is None:
            array = compute()
            array.flags.writeable = False
            self._cache[key] = array
        return array

    def clear_cache(self) -> None:
        """Drop every cached array (to free memory)."""
        self._cache.clear()

    # ------------------------------------------------------------------ core computation
    def _axis_offsets(self, shape: tuple[int, int], corners: bool) -> tuple[np.ndarray, np.ndarray]:
        """Offsets from the PONI along dim1 and dim2 (m), orientation applied.

        Centres: index ``k -> (k' + 0.5)·pixel``; corners: ``k -> k'·pixel``, where ``k'`` is the
        index remapped by the orientation (1: both axes flipped, 2: dim1, 4: dim2, 3: none).
        """
        n1, n2 = shape
        orientation = int(self.detector.orientation)
        if orientation not in (0, 1, 2, 3, 4):
            raise AzfilterError(
                f"{self.name}: detector orientation {orientation} is not supported (1-4)"
            )
        flip1 = orientation in (1, 2)
        flip2 = orientation in (1, 4)
        if corners:
            idx1 = np.arange(n1 + 1, dtype=np.float64)
            idx2 = np.arange(n2 + 1, dtype=np.float64)
            if flip1:
                idx1 = n1 - idx1
            if flip2:
                idx2 = n2 - idx2
        else:
            idx1 = np.arange(n1, dtype=np.float64)
            idx2 = np.arange(n2, dtype=np.float64)
            if flip1:
                idx1 = (n1 - 1) - idx1
            if flip2:
                idx2 = (n2 - 1) - idx2
            idx1 += 0.5
            idx2 += 0.5
        p1 = idx1 * float(self.detector.pixel1) - float(self.poni1)
        p2 = idx2 * float(self.detector.pixel2) - float(self.poni2)
        return p1, p2

    def _lab_terms(self, p1: np.ndarray, p2: np.ndarray):
        """Row and column terms of (t1, t2, t3): ``tK = rowK[:, None] + colK[None, :]``.

        ``(t1, t2, t3) = R3·R2·R1·(p1, p2, dist)`` is linear in p1 (rows) and p2 (columns).
        """
        c1, s1 = math.cos(self.rot1), math.sin(self.rot1)
        c2, s2 = math.cos(self.rot2), math.sin(self.rot2)
        c3, s3 = math.cos(self.rot3), math.sin(self.rot3)
        p3 = float(self.dist)
        row1 = p1 * (c2 * c3) - p3 * (c1 * c3 * s2 + s1 * s3)
        col1 = p2 * (c3 * s1 * s2 - c1 * s3)
        row2 = p1 * (c2 * s3) - p3 * (-c3 * s1 + c1 * s2 * s3)
        col2 = p2 * (c1 * c3 + s1 * s2 * s3)
        row3 = p1 * s2 + p3 * (c1 * c2)
        col3 = p2 * (-c2 * s1)
        return (row1, col1), (row2, col2), (row3, col3)

    @staticmethod
    def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
        step = max(1, _BLOCK_ELEMENTS // max(1, n_cols))
        for start in range(0, n_rows, step):
            yield slice(start, min(start + step, n_rows))

    def _compute(self, quantity: str, shape: tuple[int, int], corners: bool) -> np.ndarray:
        """2θ, χ or r on the pixel centres or the corner grid (float64)."""
        p1, p2 = self._axis_offsets(shape, corners)
        (row1, col1), (row2, col2), (row3, col3) = self._lab_terms(p1, p2)
        out = np.empty((p1.size, p2.size), dtype=np.float64)

        def fill(rows: slice) -> None:
            t1 = row1[rows, None] + col1[None, :]
            t2 = row2[rows, None] + col2[None, :]
            block = out[rows]
            if quantity == "chi":
                # atan2 as is, as pyFAI (2026.9): range [-pi, pi]; on the cut left of the PONI
                # (t1 = ±0, t2 < 0) the sign of t1's zero decides: +pi, or -pi where the
                # rotation leaves -0.0 (docs/internals.md, "The χ cut")
                np.arctan2(t1, t2, out=block)
            elif quantity == "r":
                np.hypot(t1, t2, out=block)
            else:  # 2th
                radius = np.hypot(t1, t2, out=t1)
                t3 = np.add(row3[rows, None], col3[None, :], out=t2)
                np.arctan2(radius, t3, out=block)

        _for_each_block(fill, self._row_blocks(p1.size, p2.size))
        return out

    def _q_from_tth(self, tth: np.ndarray) -> np.ndarray:
        wavelength = self._require_wavelength()
        scale = 4.0e-9 * math.pi / wavelength
        q = np.empty_like(tth)

        def fill(rows: slice) -> None:
            block = np.multiply(tth[rows], 0.5, out=q[rows])
            np.sin(block, out=block)
            block *= scale

        _for_each_block(fill, self._row_blocks(*tth.shape) if tth.ndim == 2
                        else iter([slice(None)]))
        return q

    @staticmethod
    def _d_from_q(q: np.ndarray) -> np.ndarray:
        """d-spacing (m) from q (nm^-1): ``2π/(1e9·q)``, +inf where q = 0."""
        d = np.multiply(q, 1e9)
        with np.errstate(divide="ignore"):
            np.divide(2.0 * math.pi, d, out=d)
        return d

    def _require_wavelength(self) -> float:
        if self.wavelength is None:
            raise AzfilterError(f"no wavelength in {self.name}: q and d units need one")
        return float(self.wavelength)

    @staticmethod
    def _check_quantity(quantity: str) -> str:
        if quantity not in QUANTITIES:
            raise AzfilterError(
                f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}"
            )
        return quantity

    # ------------------------------------------------------------------ public arrays
    def center_array(self, quantity: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Per-pixel value at the pixel centres, in internal units.

        Parameters
        ----------
        quantity : {"2th", "q", "r", "chi", "d"}
            2θ (rad), q (nm⁻¹), r (m, distance to the beam axis), χ (rad, in (-π, π]),
            d (m, d-spacing, +inf at q = 0).
        shape : (int, int), optional
            Array shape; required when the detector has no shape.

        Returns
        -------
        numpy.ndarray
            float64, read-only, of the given shape.
        """
        quantity = self._check_quantity(quantity)
        shape = self.resolve_shape(shape)
        if quantity == "q":
            self._require_wavelength()
            tth = self.center_array("2th", shape)
            return self._cached(("center", "q", shape), lambda: self._q_from_tth(tth))
        if quantity == "d":
            q = self.center_array("q", shape)
            return self._cached(("center", "d", shape), lambda: self._d_from_q(q))
        return self._cached(
            ("center", quantity, shape), lambda: self._compute(quantity, shape, corners=False)
        )

    def corner_grid(self, quantity: str, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Value at every pixel corner, shape ``(N1 + 1, N2 + 1)``, internal units.

        ``grid[i, j]`` is the corner at integer indices ``(i, j)`` of the array (orientation
        applied), so pixel ``(i, j)`` has corners ``grid[i, j]``, ``grid[i+1, j]``,
        ``grid[i+1, j+1]``, ``grid[i, j+1]`` (A, B, C, D in pyFAI's order). χ is in (-π, π],
        so the corners of a pixel straddling the -π/π cut differ by about 2π.
        """
        quantity = self._check_quantity(quantity)
        shape = self.resolve_shape(shape)
        if quantity == "q":
            self._require_wavelength()
            tth = self.corner_grid("2th", shape)
            return self._cached(("corner", "q", shape), lambda: self._q_from_tth(tth))
        if quantity == "d":
            q = self.corner_grid("q", shape)
            return self._cached(("corner", "d", shape), lambda: self._d_from_q(q))
        return self._cached(
            ("corner", quantity, shape), lambda: self._compute(quantity, shape, corners=True)
        )

    def array(
        self, unit_name: str, corners: bool = False, shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Per-pixel centre values (or the corner grid) scaled to a unit.

        Parameters
        ----------
        unit_name : str
            ``"q_nm^-1"``, ``"q_A^-1"``, ``"2th_deg"``, ``"2th_rad"``, ``"r_mm"``, ``"d_nm"``,
            ``"d_A"``, ``"chi_deg"``, ``"chi_rad"``.
        corners : bool
            Return the ``(N1 + 1, N2 + 1)`` corner grid instead of the centres.
        shape : (int, int), optional
            Array shape; required when the detector has no shape.

        Returns
        -------
        numpy.ndarray
            float64, read-only.
        """
        unit = get_unit(unit_name, azimuthal=True)
        base = (
            self.corner_grid(unit.quantity, shape)
            if corners
            else self.center_array(unit.quantity, shape)
        )
        if unit.scale == 1.0:
            return base
        kind = "corner" if corners else "center"
        return self._cached((kind, unit.name, base.shape), lambda: base * unit.scale)

    def solid_angle(self, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Relative solid angle ``cos³α`` per pixel, 1 at the PONI (float64, read-only).

        ``cos α = dist / sqrt(dist² + p1² + p2²)``, with ``(p1, p2)`` the pixel centre's offset
        from the PONI in the detector plane (orientation applied); rotations do not enter.
        """
        shape = self.resolve_shape(shape)

        def compute() -> np.ndarray:
            p1, p2 = self._axis_offsets(shape, corners=False)
            inv_d2 = 1.0 / float(self.dist) ** 2
            row = p1 * p1 * inv_d2
            col = p2 * p2 * inv_d2
            out = np.empty(shape, dtype=np.float64)

            def fill(rows: slice) -> None:
                block = out[rows]
                np.add(row[rows, None], col[None, :], out=block)
                block += 1.0  # 1/cos²α
                # cos³α = (1/cos²α)^(-3/2)
                np.power(block, -1.5, out=block)

            _for_each_block(fill, self._row_blocks(*shape))
            return out

        return self._cached(("solid_angle", shape), compute)

    def polarization(
        self, factor: float, axis_offset: float = 0.0, shape: tuple[int, int] | None = None
    ) -> np.ndarray:
        """Polarization factor per pixel (float64, read-only), pyFAI's formula with its axis offset.

        ``P = ½·[1 + cos²2θ − f·cos(2(χ + δ))·(1 − cos²2θ)]``.

        Parameters
        ----------
        factor : float
            ``f = (I_h − I_v)/(I_h + I_v)`` in [-1, 1]; 0 is unpolarised, about 0.95-0.99 at
            synchrotrons.
        axis_offset : float
            ``δ`` (rad): angle between the polarization axis and the detector's X axis.
        shape : (int, int), optional
            Array shape; required when the detector has no shape.
        """
        try:
            factor = float(factor)
            axis_offset = float(axis_offset)
        except (TypeError, ValueError):
            raise AzfilterError(
                f"polarization factor and axis offset must be numbers, got {factor!r}, "
                f"{axis_offset!r}"
            ) from None
        if not -1.0 <= factor <= 1.0:
            raise AzfilterError(f"polarization factor {factor} is outside [-1, 1]")
        if not math.isfinite(axis_offset):
            raise AzfilterError(f"polarization axis offset {axis_offset} is not finite")
        shape = self.resolve_shape(shape)
        tth = self.center_array("2th", shape)
        chi = self.center_array("chi", shape)

        def compute() -> np.ndarray:
            out = np.empty(shape, dtype=np.float64)

            def fill(rows: slice) -> None:
                cos2 = np.cos(tth[rows])
                cos2 *= cos2
                azim = np.add(chi[rows], axis_offset)
                azim *= 2.0
                np.cos(azim, out=azim)
                azim *= factor
                block = out[rows]
                np.subtract(1.0, cos2, out=block)
                block *= azim  # f·cos(2(χ+δ))·(1 − cos²2θ)
                np.subtract(cos2, block, out=block)
                block += 1.0
                block *= 0.5

            _for_each_block(fill, self._row_blocks(*shape))
            return out

        return self._cached(("polarization", factor, axis_offset, shape), compute)
