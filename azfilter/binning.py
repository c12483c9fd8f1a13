"""Radial bins and the CSR lookup tables that map detector pixels onto them, with a disk cache.

A lookup table is a sparse matrix in CSR form: one row per radial bin, one column per flat pixel
index, and a coefficient per entry, the fraction of the pixel that falls in the bin (always 1
without pixel splitting). Engines only ever walk these rows, so everything geometric is decided
here, once per geometry.

Bin range (``reference/pyfai-algorithms.md`` §4.3, bit-compatible with pyFAI's radial axis):

- without a user range, ``lo``/``hi_in`` are the minimum/maximum radial value over the pixels
  that are not statically masked (pixel centres without splitting, all pixel corners with full
  splitting), both clamped at 0 (every azfilter radial unit is positive);
- a user ``radial_range`` (in the unit's scaled values) replaces them, divided by the scale;
- ``hi = hi_in·(1 + 2⁻²³)`` (so that the largest value falls inside the last bin),
  ``δ = (hi − lo)/npt``, bin centres ``linspace(lo + δ/2, hi − δ/2, npt)``.

With full splitting the range is taken over the corner values rounded to float32, as pyFAI
(which stores corners in float32) does; the coefficients themselves are computed in float64.

Deliberate difference from pyFAI: a pixel's bin is ``floor((c − lo)/δ)`` and pixels outside
``[lo, hi)`` are left out, where pyFAI truncates toward zero and so piles pixels from up to one
bin below a user range into bin 0.

Azimuth range (degrees ``(lo, hi)``; ``hi <= lo`` adds 360 so that ``(170, -170)`` is the 20°
wedge across ±180°): a pixel is in range when its centre's χ, taken modulo 2π into
``[lo, lo + 2π)``, is ``<= hi``. Full splitting decides on the centre's χ as well: a pixel
straddling the azimuthal edge is either wholly in or wholly out.

Disk cache (:func:`build_csr`): a table is stored as ``csr-<key>.npz`` in :func:`cache_dir`,
``key`` the sha256 of everything it depends on (:func:`table_key`). Files are written to a
temporary name in the same folder and renamed over the final one, so concurrent processes
(SLURM array tasks) never see a partial table; a file that cannot be read or fails the
consistency checks is rebuilt, and a cache folder that cannot be written only costs the reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import vocabulary
from .cache import cache_dir, store_npz
from .errors import AzfilterError
from .units import get_unit

logger = logging.getLogger(__name__)

#: bumped whenever the table layout or the way tables are computed changes (invalidates caches)
CACHE_FORMAT_VERSION = 1

#: pyFAI's "EPS32": the upper bin bound is the data maximum times this
UPPER_BOUND_FACTOR = 1.0 + 2.0**-23

SPLITS = vocabulary.SPLITS

_TWO_PI = 2.0 * math.pi

# Pixels per block in the full-split builder: bounds the temporaries (a few tens of MB).
_FULLSPLIT_BLOCK_PIXELS = 1 << 18
# Largest (pixels x bins-per-pixel) area matrix built at once (8 bytes each).
_FULLSPLIT_DENSE_LIMIT = 1 << 22
# A pixel whose area is below this fraction of its bounding box is degenerate (zero area).
_DEGENERATE_AREA = 1e-12
# [hook, owner of kernels/_tables.pyx] build full-split tables with the compiled builder
# (azfilter._tables.fullsplit_table, same table bit for bit; tests/test_engine_cython.py
# checks it against the numpy code below) when the extension is built; False: numpy only.
USE_COMPILED_FULLSPLIT = True
# the same for no-split tables (azfilter._tables.nosplit_table: same table, a counting sort)
USE_COMPILED_NOSPLIT = True


# ---------------------------------------------------------------------------------- containers
@dataclass
class CSRParts:
    """What the table builders return: the sparse matrix and its bin range.

    Attributes
    ----------
    indptr : numpy.ndarray
        int64, ``npt + 1``: row ``k`` is ``indices[indptr[k]:indptr[k+1]]``.
    indices : numpy.ndarray
        int32, flat pixel indices, increasing within each row.
    coefs : numpy.ndarray
        float32, the fraction of the pixel in the bin (1 without splitting).
    lo, hi : float
        Lower and upper bin bound, internal units.
    npt : int
        Number of bins.
    """

    indptr: np.ndarray
    indices: np.ndarray
    coefs: np.ndarray
    lo: float
    hi: float
    npt: int

    @property
    def delta(self) -> float:
        """Bin width, internal units."""
        return (self.hi - self.lo) / self.npt

    @property
    def bin_centers(self) -> np.ndarray:
        """Bin centres, internal units (float64, as pyFAI's ``bin_centers``)."""
        return bin_centers(self.lo, self.hi, self.npt)


@dataclass
class CSR:
    """A radial lookup table: rows are radial bins, columns are flat pixel indices.

    Attributes
    ----------
    indptr : numpy.ndarray
        int64 ``[npt + 1]``; the entries of bin ``k`` are ``indptr[k]:indptr[k+1]``.
    indices : numpy.ndarray
        int32 ``[nnz]``; flat pixel index (row-major in ``shape``), increasing within a bin.
        Statically masked pixels never appear.
    coefs : numpy.ndarray
        float32 ``[nnz]``; fraction of the pixel in the bin, all 1 without splitting. With full
        splitting each pixel's coefficients sum to 1 over the bins of the range.
    bin_centers : numpy.ndarray
        float64 ``[npt]``, internal units (rad, nm⁻¹, m).
    radial : numpy.ndarray
        float64 ``[npt]``, ``bin_centers * unit.scale`` (what results report).
    unit : str
        The unit's name (``"q_nm^-1"``...).
    split : str
        ``"no"`` or ``"full"``.
    shape : tuple of int
        Detector shape ``(N1, N2)``.
    npt : int
        Number of bins (default: from ``indptr``).
    lo, hi : float
        Lower and upper bin bound, internal units (default: from evenly spaced
        ``bin_centers``, for tables made by hand).
    """

    indptr: np.ndarray
    indices: np.ndarray
    coefs: np.ndarray
    bin_centers: np.ndarray
    radial: np.ndarray
    unit: str
    split: str
    shape: tuple[int, int]
    npt: int = -1
    lo: float = math.nan
    hi: float = math.nan

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if self.npt < 0:
            self.npt = int(len(self.indptr)) - 1
        if math.isnan(self.lo) and self.npt > 1:
            half = 0.5 * (float(self.bin_centers[-1]) - float(self.bin_centers[0])) / (self.npt - 1)
            self.lo = float(self.bin_centers[0]) - half
            self.hi = float(self.bin_centers[-1]) + half

    @property
    def delta(self) -> float:
        """Bin width, internal units."""
        return (self.hi - self.lo) / self.npt

    @property
    def bin_edges(self) -> np.ndarray:
        """The ``npt + 1`` bin edges, internal units (bin ``k`` is ``[edge_k, edge_k+1)``)."""
        return self.lo + self.delta * np.arange(self.npt + 1, dtype=np.float64)

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.size)

    @property
    def size(self) -> int:
        """Number of pixels (columns): ``N1 * N2``."""
        return int(self.shape[0]) * int(self.shape[1])

    def row_sums(self) -> np.ndarray:
        """Σ coefficients per bin (float64): the pixel count of each bin with no pixel invalid."""
        rows = np.repeat(np.arange(self.npt), np.diff(self.indptr))
        return np.bincount(rows, weights=self.coefs.astype(np.float64), minlength=self.npt)


# ---------------------------------------------------------------------------------- ranges
def bin_bounds(
    data_min: float, data_max: float, radial_range: Sequence[float] | None = None
) -> tuple[float, float]:
    """Lower and upper bin bound (internal units), pyFAI-algorithms §4.3.

    Parameters
    ----------
    data_min, data_max : float
        Smallest and largest radial value of the pixels that take part (internal units).
    radial_range : (float, float), optional
        User range in internal units (already divided by the unit's scale); replaces the data
        range, taken as (min, max).

    Returns
    -------
    lo, hi : float
        ``lo = max(0, data_min)`` or ``min(range)``; ``hi = max(0, data_max)`` or
        ``max(range)``, times ``1 + 2⁻²³``.

    Raises
    ------
    AzfilterError
        When the range is empty (``hi <= lo``) or not finite.
    """
    if radial_range is None:
        lo = max(0.0, float(data_min))
        hi_in = max(0.0, float(data_max))
    else:
        first, second = (float(v) for v in radial_range)
        lo, hi_in = min(first, second), max(first, second)
    hi = hi_in * UPPER_BOUND_FACTOR if hi_in > 0 else hi_in / UPPER_BOUND_FACTOR
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        raise AzfilterError(f"empty radial range [{lo!r}, {hi!r}] (internal units)")
    return lo, hi


def bin_centers(lo: float, hi: float, npt: int) -> np.ndarray:
    """Bin centres ``linspace(lo + δ/2, hi − δ/2, npt)`` with ``δ = (hi − lo)/npt`` (float64)."""
    delta = (hi - lo) / npt
    return np.linspace(lo + 0.5 * delta, hi - 0.5 * delta, npt)


def normalize_azimuth_range(azimuth_range: Sequence[float] | None) -> tuple[float, float] | None:
    """Azimuth range in degrees ``(lo, hi)`` → radians, with 360° added to ``hi`` if ``hi <= lo``.

    So ``(170, -170)`` becomes the wedge 170°..190° across the ±180° cut, and ``(0, 0)`` the full
    circle.

    Raises
    ------
    AzfilterError
        When it is not two finite numbers.
    """
    if azimuth_range is None:
        return None
    try:
        first, second = (float(v) for v in azimuth_range)
    except (TypeError, ValueError):
        raise AzfilterError(
            f"azimuth range must be two numbers (degrees), got {azimuth_range!r}"
        ) from None
    if not (math.isfinite(first) and math.isfinite(second)):
        raise AzfilterError(f"azimuth range must be finite, got {azimuth_range!r}")
    if second <= first:
        second += 360.0
    return math.radians(first), math.radians(second)


def in_azimuth_range(chi: np.ndarray, azimuth_range_rad: tuple[float, float]) -> np.ndarray:
    """Boolean mask: χ (radians), taken modulo 2π into ``[lo, lo + 2π)``, is ``<= hi``."""
    lo, hi = azimuth_range_rad
    unwrapped = np.mod(np.asarray(chi, dtype=np.float64) - lo, _TWO_PI)
    unwrapped += lo
    return unwrapped <= hi


def _check_npt(npt: Any) -> int:
    try:
        value = int(npt)
    except (TypeError, ValueError):
        raise AzfilterError(f"npt must be a positive integer, got {npt!r}") from None
    if value != npt or value < 1:
        raise AzfilterError(f"npt must be a positive integer, got {npt!r}")
    return value


def _check_mask(static_mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The static mask as a flat bool array of ``N1*N2`` (2-D ``shape`` or already flat)."""
    mask = np.asarray(static_mask)
    n_pixels = shape[0] * shape[1]
    if mask.shape != tuple(shape) and mask.shape != (n_pixels,):
        raise AzfilterError(f"static mask has shape {mask.shape}, expected {tuple(shape)}")
    return mask.astype(bool, copy=False).reshape(n_pixels)


def _rows_to_indptr(bins: np.ndarray, npt: int) -> np.ndarray:
    indptr = np.zeros(npt + 1, dtype=np.int64)
    np.cumsum(np.bincount(bins, minlength=npt), out=indptr[1:])
    return indptr


def _bin_dtype(npt: int) -> type:
    # NumPy's stable sort is a linear-time radix sort for 16-bit keys
    return np.uint16 if npt <= 1 << 16 else np.int32


def _stable_order(bins: np.ndarray, npt: int) -> np.ndarray:
    """Permutation sorting ``bins`` and keeping the input order within a bin (pixel order)."""
    return np.argsort(bins.astype(_bin_dtype(npt), copy=False), kind="stable")


# ---------------------------------------------------------------------------------- no split
def csr_nosplit(
    radial_center: np.ndarray,
    chi_center: np.ndarray | None,
    static_mask: np.ndarray,
    npt: int,
    radial_range_internal: Sequence[float] | None = None,
    azimuth_range_rad: tuple[float, float] | None = None,
) -> CSRParts:
    """Lookup table without pixel splitting: each pixel goes whole into its centre's bin.

    Parameters
    ----------
    radial_center : numpy.ndarray
        Radial value of each pixel centre, internal units, shape ``(N1, N2)``.
    chi_center : numpy.ndarray or None
        χ of each pixel centre (rad); needed only with ``azimuth_range_rad``.
    static_mask : numpy.ndarray
        Bool, ``(N1, N2)`` or flat; True pixels never enter the table.
    npt : int
        Number of radial bins.
    radial_range_internal : (float, float), optional
        Radial range in internal units; default: the range of the unmasked pixel centres.
    azimuth_range_rad : (float, float), optional
        ``(lo, hi)`` in radians as from :func:`normalize_azimuth_range`.

    Returns
    -------
    CSRParts
        Bin of pixel ``j`` is ``floor((c_j − lo)/δ)``; pixels outside ``[0, npt)`` are left out.
    """
    npt = _check_npt(npt)
    radial = np.asarray(radial_center, dtype=np.float64)
    if radial.ndim != 2:
        raise AzfilterError(f"radial array must be 2-D, got shape {radial.shape}")
    shape = radial.shape
    radial = radial.reshape(-1)
    usable = ~_check_mask(static_mask, shape)
    usable &= np.isfinite(radial)
    if not usable.any():
        raise AzfilterError("every pixel is masked: no radial range")

    compiled = _compiled_nosplit() if USE_COMPILED_NOSPLIT else None  # [hook]
    if compiled is not None:
        table, extent = compiled
        low, high, count = extent(radial, usable)
        if count == 0:
            raise AzfilterError("every pixel is masked: no radial range")
        lo, hi = bin_bounds(low, high, radial_range_internal)
        if azimuth_range_rad is not None:
            if chi_center is None:
                raise ValueError("an azimuth range needs chi_center")
            chi = np.asarray(chi_center, dtype=np.float64).reshape(-1)
            usable = usable & in_azimuth_range(chi, azimuth_range_rad)
        indptr, indices = table(radial, usable, lo, (hi - lo) / npt, npt)
        return CSRParts(indptr, indices, np.ones(indices.size, dtype=np.float32), lo, hi, npt)

    pixels = np.flatnonzero(usable)
    values = radial[pixels]
    lo, hi = bin_bounds(values.min(), values.max(), radial_range_internal)
    if azimuth_range_rad is not None:
        if chi_center is None:
            raise ValueError("an azimuth range needs chi_center")
        chi = np.asarray(chi_center, dtype=np.float64).reshape(-1)[pixels]
        keep = in_azimuth_range(chi, azimuth_range_rad)
        pixels, values = pixels[keep], values[keep]

    delta = (hi - lo) / npt
    position = (values - lo) / delta
    np.floor(position, out=position)
    inside = (position >= 0) & (position < npt)
    bins = position[inside].astype(np.intp)
    pixels = pixels[inside]

    order = _stable_order(bins, npt)
    indices = pixels[order].astype(np.int32)
    indptr = _rows_to_indptr(bins, npt)
    coefs = np.ones(indices.size, dtype=np.float32)
    return CSRParts(indptr, indices, coefs, lo, hi, npt)


# ---------------------------------------------------------------------------------- full split
def _corner_views(grid: np.ndarray, rows: slice) -> tuple[np.ndarray, ...]:
    """Corners A=(i,j), B=(i+1,j), C=(i+1,j+1), D=(i,j+1) of the pixels in ``rows``."""
    block = grid[rows.start : rows.stop + 1]
    return block[:-1, :-1], block[1:, :-1], block[1:, 1:], block[:-1, 1:]


def _used_corners(usable: np.ndarray) -> np.ndarray:
    """Corner grid points that belong to at least one usable pixel."""
    n1, n2 = usable.shape
    used = np.zeros((n1 + 1, n2 + 1), dtype=bool)
    for di in (0, 1):
        for dj in (0, 1):
            used[di : di + n1, dj : dj + n2] |= usable
    return used


def csr_fullsplit(
    radial_corners: np.ndarray,
    chi_corners: np.ndarray,
    static_mask: np.ndarray,
    npt: int,
    radial_range_internal: Sequence[float] | None = None,
    azimuth_range_rad: tuple[float, float] | None = None,
    *,
    radial_center: np.ndarray | None = None,
    chi_center: np.ndarray | None = None,
) -> CSRParts:
    """Lookup table with full pixel splitting (exact quadrilateral areas).

    Each pixel is the quadrilateral A=(i,j), B=(i+1,j), C=(i+1,j+1), D=(i,j+1) of its corners in
    the plane (x = (radial − lo)/δ, χ), where bin ``b`` is the strip ``b <= x < b + 1``. The
    pixel's area in each strip is the signed area under the edges A→B→C→D→A clipped to the strip
    (the per-strip shoelace formula); its coefficient for bin ``b`` is that area divided by the
    sum over the bins inside ``[0, npt)``, so a pixel straddling the range edge keeps its full
    weight inside the range. Corner χ values are unwrapped relative to A so that a pixel
    straddling the ±π cut stays one quadrilateral. A pixel whose corners all fall in one bin
    gets coefficient 1; a pixel of zero area falls back to its centre's bin with coefficient 1.
    Coefficients that are exactly 0 are dropped.

    Parameters
    ----------
    radial_corners, chi_corners : numpy.ndarray
        Radial value (internal units) and χ (rad) at the pixel corners, shape ``(N1+1, N2+1)``.
    static_mask : numpy.ndarray
        Bool, ``(N1, N2)`` or flat; True pixels never enter the table.
    npt : int
        Number of radial bins.
    radial_range_internal : (float, float), optional
        Radial range in internal units; default: the range over all corners of the unmasked
        pixels, taken in float32 as pyFAI does (so both give the same radial axis).
    azimuth_range_rad : (float, float), optional
        ``(lo, hi)`` in radians (:func:`normalize_azimuth_range`); decided on the centre's χ.
    radial_center, chi_center : numpy.ndarray, optional
        Values at the pixel centres, ``(N1, N2)``. ``chi_center`` is required with an azimuth
        range; ``radial_center`` places zero-area pixels (default: mean of the 4 corners).

    Returns
    -------
    CSRParts
    """
    npt = _check_npt(npt)
    radial_grid = np.asarray(radial_corners, dtype=np.float64)
    chi_grid = np.asarray(chi_corners, dtype=np.float64)
    if radial_grid.ndim != 2 or chi_grid.shape != radial_grid.shape:
        raise AzfilterError(
            f"corner grids must be 2-D and alike, got {radial_grid.shape} and {chi_grid.shape}"
        )
    shape = (radial_grid.shape[0] - 1, radial_grid.shape[1] - 1)
    n1, n2 = shape
    usable = ~_check_mask(static_mask, shape).reshape(shape)
    # a pixel with a non-finite corner cannot be placed
    finite_corners = np.isfinite(radial_grid) & np.isfinite(chi_grid)
    usable &= finite_corners[:-1, :-1] & finite_corners[1:, :-1]
    usable &= finite_corners[1:, 1:] & finite_corners[:-1, 1:]
    if not usable.any():
        raise AzfilterError("every pixel is masked: no radial range")
    if azimuth_range_rad is not None:
        if chi_center is None:
            raise ValueError("an azimuth range needs chi_center")
        usable_for_bins = usable & in_azimuth_range(
            np.asarray(chi_center, dtype=np.float64).reshape(shape), azimuth_range_rad
        )
    else:
        usable_for_bins = usable

    corner_values = radial_grid[_used_corners(usable)].astype(np.float32)
    lo, hi = bin_bounds(corner_values.min(), corner_values.max(), radial_range_internal)
    del corner_values
    delta = (hi - lo) / npt

    compiled = _compiled_fullsplit_table() if USE_COMPILED_FULLSPLIT else None  # [hook]
    if compiled is not None:
        indptr, indices, coefs = compiled(radial_grid, chi_grid, usable_for_bins, radial_center,
                                          lo, delta, npt, _DEGENERATE_AREA)
        return CSRParts(indptr, indices, coefs, lo, hi, npt)

    all_bins: list[np.ndarray] = []
    all_pixels: list[np.ndarray] = []
    all_coefs: list[np.ndarray] = []
    rows_per_block = max(1, _FULLSPLIT_BLOCK_PIXELS // max(1, n2))
    for start in range(0, n1, rows_per_block):
        rows = slice(start, min(start + rows_per_block, n1))
        selected = usable_for_bins[rows]
        local = np.flatnonzero(selected)
        if local.size == 0:
            continue
        pixels = local + start * n2
        xs = [(view[selected] - lo) / delta for view in _corner_views(radial_grid, rows)]
        chis = [view[selected] for view in _corner_views(chi_grid, rows)]
        if radial_center is None:
            center = (xs[0] + xs[1] + xs[2] + xs[3]) * 0.25
        else:
            center = (np.asarray(radial_center, dtype=np.float64)[rows][selected] - lo) / delta
        bins, coef_pixels, coefs = _split_block(xs, chis, center, npt)
        # compact dtypes right away: the entries of a 4M detector run into the millions
        all_bins.append(bins.astype(_bin_dtype(npt)))
        all_pixels.append(pixels[coef_pixels].astype(np.int32))
        all_coefs.append(coefs.astype(np.float32))

    if all_bins:
        bins = np.concatenate(all_bins)
        pixels = np.concatenate(all_pixels)
        coefs = np.concatenate(all_coefs)
    else:
        bins = np.zeros(0, dtype=_bin_dtype(npt))
        pixels = np.zeros(0, dtype=np.int32)
        coefs = np.zeros(0, dtype=np.float32)
    del all_bins, all_pixels, all_coefs
    order = _stable_order(bins, npt)
    indptr = _rows_to_indptr(bins, npt)
    del bins
    return CSRParts(indptr, pixels[order], coefs[order], lo, hi, npt)


def _compiled_nosplit():
    """[hook] ``azfilter._tables`` (nosplit_table, finite_extent), or None when not built."""
    try:
        from ._tables import finite_extent, nosplit_table
    except ImportError:
        return None
    return nosplit_table, finite_extent


def _compiled_fullsplit_table():
    """[hook] ``azfilter._tables.fullsplit_table``, or None when the extension is not built."""
    try:
        from ._tables import fullsplit_table
    except ImportError:
        return None
    return fullsplit_table


def _split_block(
    xs: list[np.ndarray], chis: list[np.ndarray], center: np.ndarray, npt: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bins, pixel positions (in the block's selection) and coefficients for one block.

    ``xs``/``chis`` are the corner coordinates A, B, C, D (x in bin units), ``center`` the
    centre's x. Entries come out ordered by pixel, then by bin, so that a stable sort by bin
    leaves the pixels of each row in increasing order.
    """
    n = center.size
    x_min = np.minimum(np.minimum(xs[0], xs[1]), np.minimum(xs[2], xs[3]))
    x_max = np.maximum(np.maximum(xs[0], xs[1]), np.maximum(xs[2], xs[3]))
    first = np.floor(x_min)
    last = np.floor(x_max)
    # only the bins inside [0, npt) are needed: coefficients are normalised over those
    reach = (last >= 0) & (first < npt)
    single = reach & (first == last)  # all corners in one bin: coefficient 1
    first_in = np.clip(first, 0, npt - 1).astype(np.intp)
    span = np.where(reach, np.clip(last, 0, npt - 1) - first_in + 1, 0).astype(np.intp)
    n_strips = int(span.max()) if n else 0
    if n_strips == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0)
    if n > 1 and n * n_strips > _FULLSPLIT_DENSE_LIMIT:
        # many bins per pixel (npt far above the detector's resolution): halve the block
        half = n // 2
        head = _split_block([x[:half] for x in xs], [c[:half] for c in chis], center[:half], npt)
        tail = _split_block([x[half:] for x in xs], [c[half:] for c in chis], center[half:], npt)
        return (
            np.concatenate([head[0], tail[0]]),
            np.concatenate([head[1], tail[1] + half]),
            np.concatenate([head[2], tail[2]]),
        )

    # coefs[p, s]: coefficient of pixel p in bin first_in[p] + s
    coefs = np.zeros((n, n_strips))
    coefs[single, 0] = 1.0
    multi = np.flatnonzero(reach & ~single)
    if multi.size:
        coefs[multi] = _split_coefficients(
            [x[multi] for x in xs], [c[multi] for c in chis], center[multi],
            first_in[multi], span[multi], n_strips,
        )
    pixel_idx, strip_idx = np.nonzero(coefs)  # row-major: by pixel, then by bin
    return first_in[pixel_idx] + strip_idx, pixel_idx, coefs[pixel_idx, strip_idx]


def _split_coefficients(
    xs: list[np.ndarray], chis: list[np.ndarray], center: np.ndarray,
    first: np.ndarray, span: np.ndarray, n_strips: int,
) -> np.ndarray:
    """Coefficients ``(n, n_strips)`` of pixels spanning several bins, bin ``first + s``.

    With ``F(t)`` the signed area of the pixel left of ``x = t`` (the integral of y dx along
    the edges A→B→C→D→A, each clipped to ``x <= t``), the area in bin ``b`` is
    ``F(b + 1) − F(b)``. ``F`` is 0 left of the pixel and its whole area right of it, so only
    the bin boundaries that cut the pixel are evaluated: one for a pixel over two bins.
    """
    n = center.size
    # χ relative to corner A, unwrapped across the ±π cut (also keeps the areas well-conditioned)
    ys = [np.zeros(n)]
    for chi in chis[1:]:
        rel = chi - chis[0]
        rel[rel > math.pi] -= _TWO_PI
        rel[rel < -math.pi] += _TWO_PI
        ys.append(rel)
    # edges A→B, B→C, C→D, D→A: start point, end x and slope dy/dx (0 if vertical)
    edges = []
    whole = np.zeros(n)  # F right of the pixel: minus its signed (shoelace) area
    for k in range(4):
        x0, y0 = xs[k], ys[k]
        x1, y1 = xs[(k + 1) % 4], ys[(k + 1) % 4]
        dx = x1 - x0
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(dx != 0, (y1 - y0) / dx, 0.0)
        edges.append((x0, y0, x1, slope))
        whole += dx * (y0 + y1) * 0.5

    x_lo = np.minimum(np.minimum(xs[0], xs[1]), np.minimum(xs[2], xs[3]))
    x_hi = np.maximum(np.maximum(xs[0], xs[1]), np.maximum(xs[2], xs[3]))
    # left_area[:, s] = F(first + s)
    left_area = np.empty((n, n_strips + 1))
    for boundary in range(n_strips + 1):
        t = (first + boundary).astype(np.float64)
        column = np.where(t >= x_hi, whole, 0.0)
        cut = np.flatnonzero((t > x_lo) & (t < x_hi))
        if 2 * cut.size >= n:  # most pixels: cheaper on all than gathering a subset
            column[cut] = _area_left_of(edges, t)[cut]
        elif cut.size:
            column[cut] = _area_left_of(edges, t, cut)
        left_area[:, boundary] = column
    areas = np.diff(left_area, axis=1)
    areas[np.arange(n_strips)[None, :] >= span[:, None]] = 0.0
    in_range_area = areas.sum(axis=1)

    # zero area (to rounding, against the bounding box) means a degenerate pixel
    y_lo = np.minimum(np.minimum(ys[0], ys[1]), np.minimum(ys[2], ys[3]))
    y_hi = np.maximum(np.maximum(ys[0], ys[1]), np.maximum(ys[2], ys[3]))
    degenerate = np.abs(whole) <= _DEGENERATE_AREA * (x_hi - x_lo) * (y_hi - y_lo)

    coefs = np.zeros_like(areas)
    ok = ~degenerate & (in_range_area != 0)
    coefs[ok] = areas[ok] / in_range_area[ok, None]
    # zero-area pixel over several bins: whole, into its centre's bin if that is in range
    # (clipped to the bins of its corners, against rounding)
    centre_bin = np.floor(center)
    placed = degenerate & (centre_bin >= 0) & (centre_bin < first + span)
    column_of_centre = np.clip(centre_bin - first, 0, span - 1).astype(np.intp)
    coefs[placed, column_of_centre[placed]] = 1.0
    return coefs


def _area_left_of(edges: list, t: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
    """``F(t)``: Σ over the edges of ∫ y dx with each edge clipped to ``x <= t``.

    Evaluated on the pixels of ``subset`` (their values, in that order) or on all of them.
    """
    if subset is not None:
        t = t[subset]
    total = np.zeros(t.size)
    for x0, y0, x1, slope in edges:
        if subset is not None:
            x0, y0, x1, slope = x0[subset], y0[subset], x1[subset], slope[subset]
        xa = np.minimum(x0, t)
        xb = np.minimum(x1, t)
        ya = y0 + (xa - x0) * slope
        yb = y0 + (xb - x0) * slope
        total += (xb - xa) * (ya + yb) * 0.5
    return total


# ---------------------------------------------------------------------------------- disk cache


def mask_digest(static_mask: np.ndarray) -> str:
    """sha256 of the mask as C-ordered bytes of bool (what the table depends on)."""
    return hashlib.sha256(np.ascontiguousarray(static_mask, dtype=bool).tobytes()).hexdigest()


def table_key(
    geometry_key: str,
    shape: tuple[int, int],
    unit: str,
    npt: int,
    split: str,
    radial_range: Sequence[float] | None,
    azimuth_range_rad: tuple[float, float] | None,
    static_mask_digest: str,
) -> str:
    """sha256 (hex) of everything a lookup table depends on, and the cache format version.

    Floats enter by their exact binary value, so the key is stable across processes and
    machines and changes with any input.
    """

    def exact(values: Sequence[float] | None) -> list[str] | None:
        return None if values is None else [float(v).hex() for v in values]

    record = {
        "format": CACHE_FORMAT_VERSION,
        "geometry": geometry_key,
        "shape": [int(n) for n in shape],
        "unit": unit,
        "npt": int(npt),
        "split": split,
        "radial_range": exact(radial_range),
        "azimuth_range": exact(azimuth_range_rad),
        "mask": static_mask_digest,
    }
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _cache_path(directory: Path, key: str) -> Path:
    return directory / f"csr-{key}.npz"


def _load_cached(path: Path, key: str, shape: tuple[int, int], npt: int) -> CSRParts | None:
    """The table stored at ``path``, or None if it is absent, unreadable or inconsistent.

    Every index is checked to lie inside the detector: a damaged file must never reach an
    engine that trusts the table.
    """
    try:
        with np.load(path, allow_pickle=False) as stored:
            if (
                int(stored["format"]) != CACHE_FORMAT_VERSION
                or str(stored["key"]) != key
                or int(stored["npt"]) != npt
            ):
                return None
            indptr = stored["indptr"]
            indices = stored["indices"]
            coefs = stored["coefs"]
            lo = float(stored["lo"])
            hi = float(stored["hi"])
    except FileNotFoundError:
        return None
    except Exception as err:  # a corrupt or partial file is rebuilt, whatever the failure
        logger.debug("ignoring unreadable lookup table %s: %s", path, err)
        return None
    n_pixels = shape[0] * shape[1]
    consistent = (
        indptr.dtype == np.int64
        and indices.dtype == np.int32
        and coefs.dtype == np.float32
        and indptr.shape == (npt + 1,)
        and indices.ndim == 1
        and coefs.shape == indices.shape
        and indptr[0] == 0
        and indptr[-1] == indices.size
        and bool(np.all(np.diff(indptr) >= 0))
        and (indices.size == 0 or (indices.min() >= 0 and indices.max() < n_pixels))
        and math.isfinite(lo)
        and math.isfinite(hi)
        and hi > lo
    )
    if not consistent:
        logger.debug("ignoring inconsistent lookup table %s", path)
        return None
    return CSRParts(indptr, indices, coefs, lo, hi, npt)


def _store_cached(path: Path, key: str, parts: CSRParts) -> bool:
    """Write the table atomically; returns whether it was stored."""
    return store_npz(
        path,
        format=np.int64(CACHE_FORMAT_VERSION),
        key=np.str_(key),
        npt=np.int64(parts.npt),
        lo=np.float64(parts.lo),
        hi=np.float64(parts.hi),
        indptr=parts.indptr,
        indices=parts.indices,
        coefs=parts.coefs,
    )


# ---------------------------------------------------------------------------------- entry point
def _check_radial_range(radial_range: Any, unit_name: str) -> tuple[float, float] | None:
    if radial_range is None:
        return None
    try:
        first, second = (float(v) for v in radial_range)
    except (TypeError, ValueError):
        raise AzfilterError(
            f"radial range must be two numbers ({unit_name}), got {radial_range!r}"
        ) from None
    if not (math.isfinite(first) and math.isfinite(second)) or first == second:
        raise AzfilterError(
            f"radial range must be two different finite numbers ({unit_name}), "
            f"got {radial_range!r}"
        )
    return first, second


def build_csr(
    geometry: Any,
    unit: str,
    npt: int,
    split: str,
    static_mask: np.ndarray,
    radial_range: Sequence[float] | None = None,
    azimuth_range: Sequence[float] | None = None,
    cache: bool = True,
    stats: dict | None = None,
) -> CSR:
    """The radial lookup table of a geometry, from the disk cache when it is there.

    Parameters
    ----------
    geometry : azfilter.geometry.Geometry
        Gives the per-pixel radial and χ arrays (centres, or corner grids for full split),
        ``detector.shape`` and ``cache_key()``.
    unit : str
        Radial unit (``"q_nm^-1"``, ``"q_A^-1"``, ``"2th_deg"``, ``"2th_rad"``, ``"r_mm"``).
    npt : int
        Number of radial bins.
    split : {"no", "full"}
        No pixel splitting, or full splitting (exact pixel areas).
    static_mask : numpy.ndarray
        Bool, ``(N1, N2)`` or flat; True pixels never enter the table.
    radial_range : (float, float), optional
        In the unit's values (e.g. degrees for ``2th_deg``); default: the data range.
    azimuth_range : (float, float), optional
        Degrees; ``hi <= lo`` wraps across ±180° (``(170, -170)`` is 170°..190°).
    cache : bool
        Use the disk cache (:func:`cache_dir`); False always builds and stores nothing.
    stats : dict, optional
        Filled with ``cache`` ("hit", "miss" or "off"), ``path`` (the cache file or None),
        ``stored`` (whether a built table was written) and ``seconds`` (total time).

    Returns
    -------
    CSR

    Raises
    ------
    AzfilterError
        Bad unit, split, npt or range, mask of the wrong shape, every pixel masked, or a q
        unit without a wavelength.
    """
    started = time.perf_counter()
    unit_info = get_unit(unit)
    if split not in SPLITS:
        raise AzfilterError(f"unknown pixel splitting {split!r}; choose one of {', '.join(SPLITS)}")
    npt = _check_npt(npt)
    mask = np.asarray(static_mask)
    if hasattr(geometry, "resolve_shape"):  # checks the mask against the detector's shape
        shape = geometry.resolve_shape(mask.shape if mask.ndim == 2 else None)
    else:
        shape = tuple(int(n) for n in geometry.detector.shape)
    flat_mask = _check_mask(mask, shape)
    user_range = _check_radial_range(radial_range, unit_info.name)
    range_internal = (
        None if user_range is None else tuple(value / unit_info.scale for value in user_range)
    )
    azimuth_rad = normalize_azimuth_range(azimuth_range)

    directory = cache_dir() if cache else None
    path = None
    parts = None
    if directory is not None:
        key = table_key(
            geometry.cache_key(), shape, unit_info.name, npt, split, user_range, azimuth_rad,
            mask_digest(flat_mask),
        )
        path = _cache_path(directory, key)
        parts = _load_cached(path, key, shape, npt)
    hit = parts is not None
    stored = False
    if parts is None:
        quantity = unit_info.quantity
        needs_chi = azimuth_rad is not None or split == "full"
        chi_center = geometry.center_array("chi", shape) if needs_chi else None
        if split == "no":
            parts = csr_nosplit(
                geometry.center_array(quantity, shape), chi_center, flat_mask, npt,
                range_internal, azimuth_rad,
            )
        else:
            parts = csr_fullsplit(
                geometry.corner_grid(quantity, shape), geometry.corner_grid("chi", shape),
                flat_mask, npt, range_internal, azimuth_rad,
                radial_center=geometry.center_array(quantity, shape), chi_center=chi_center,
            )
        if path is not None:
            stored = _store_cached(path, key, parts)

    centers = bin_centers(parts.lo, parts.hi, npt)
    table = CSR(
        indptr=parts.indptr,
        indices=parts.indices,
        coefs=parts.coefs,
        bin_centers=centers,
        radial=centers * unit_info.scale,
        unit=unit_info.name,
        split=split,
        shape=shape,
        npt=npt,
        lo=parts.lo,
        hi=parts.hi,
    )
    seconds = time.perf_counter() - started
    state = "off" if directory is None else ("hit" if hit else "miss")
    logger.debug(
        "lookup table %s/%s/%d: cache %s, %.3f s", unit_info.name, split, npt, state, seconds
    )
    if stats is not None:
        stats.update(cache=state, path=None if path is None else str(path), stored=stored,
                     seconds=seconds)
    return table
