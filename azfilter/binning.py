"""Radial bins and the CSR lookup tables that map detector pixels onto them, with a disk cache.

A lookup table is a sparse matrix in CSR form: one row per radial bin, one column per flat pixel
index, and a coefficient per entry, the fraction of the pixel that falls in the bin (always 1
without pixel splitting). Engines only ever walk these rows, so everything geometric is decided
here, once per geometry.

Bin range (bit-compatible with pyFAI's radial axis; docs/internals.md "Binning"):

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

Sectors (:func:`sector_ranges`): a table may bin (sector, radial) cells, row ``s·npt + b``,
every sector over the same radial bins (the range of the whole detector), so that one pass
over a frame reduces every sector. Without splitting, sector ``s`` holds exactly the rows
that the azimuth range ``sectors[s]`` gives (a pixel whose centre lies on an edge that two
sectors share, or in two overlapping sectors, is in both). With full splitting a pixel is cut
exactly in χ as well (:func:`csr_fullsplit_sectors`): unlike an azimuth range, the sectors'
edges split pixels by area.

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
from .cache import cache_dir, open_npz, store_soon
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
        int64, ``n_sectors * npt + 1``: row ``k`` is ``indices[indptr[k]:indptr[k+1]]``.
    indices : numpy.ndarray
        int32, flat pixel indices, increasing within each row.
    coefs : numpy.ndarray
        float32, the fraction of the pixel in the bin (1 without splitting).
    lo, hi : float
        Lower and upper bin bound, internal units.
    npt : int
        Number of radial bins.
    n_sectors : int
        Number of χ sectors (1: a plain radial table); row ``s * npt + b`` is cell (s, b).
    """

    indptr: np.ndarray
    indices: np.ndarray
    coefs: np.ndarray
    lo: float
    hi: float
    npt: int
    n_sectors: int = 1

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

    With sectors the rows are (sector, radial) cells: row ``s * npt + b`` is radial bin ``b``
    of sector ``s``, every sector over the same ``npt`` radial bins.

    Attributes
    ----------
    indptr : numpy.ndarray
        int64 ``[n_bins + 1]``; the entries of bin ``k`` are ``indptr[k]:indptr[k+1]``.
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
        Number of radial bins (default: from ``indptr`` and the sectors).
    lo, hi : float
        Lower and upper bin bound, internal units (default: from evenly spaced
        ``bin_centers``, for tables made by hand).
    sectors : tuple of (float, float), optional
        The χ sectors, ``(lo, hi)`` in degrees (:func:`sector_ranges`); None: one radial row
        per bin over the whole azimuth range.
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
    sectors: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if self.npt < 0:
            self.npt = (int(len(self.indptr)) - 1) // self.n_sectors
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
    def n_sectors(self) -> int:
        """Number of sectors (1 without sectors)."""
        return 1 if self.sectors is None else len(self.sectors)

    @property
    def n_bins(self) -> int:
        """Number of rows: ``n_sectors * npt``."""
        return self.n_sectors * self.npt

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.size)

    @property
    def size(self) -> int:
        """Number of pixels (columns): ``N1 * N2``."""
        return int(self.shape[0]) * int(self.shape[1])

    def row_sums(self) -> np.ndarray:
        """Σ coefficients per bin (float64, ``n_bins``): the pixel count of each bin with no
        pixel invalid."""
        rows = np.repeat(np.arange(self.n_bins), np.diff(self.indptr))
        return np.bincount(rows, weights=self.coefs.astype(np.float64), minlength=self.n_bins)


# ---------------------------------------------------------------------------------- ranges
def bin_bounds(
    data_min: float, data_max: float, radial_range: Sequence[float] | None = None
) -> tuple[float, float]:
    """Lower and upper bin bound (internal units), as pyFAI computes its radial axis.

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


# ---------------------------------------------------------------------------------- sectors
def sector_ranges(
    sectors: Any, azimuth_range: Sequence[float] | None = None
) -> tuple[tuple[float, float], ...] | None:
    """The χ sectors as ``(lo, hi)`` degree pairs with ``lo < hi``, or None without sectors.

    Parameters
    ----------
    sectors : None, int or sequence of (float, float)
        ``N``: ``N`` equal sectors spanning ``azimuth_range`` (default the full circle
        −180°..180°); a sequence: explicit ``(lo, hi)`` ranges in degrees, each read as
        :func:`normalize_azimuth_range` reads an azimuth range (``hi <= lo`` adds 360°, so
        ``(170, -170)`` is 170°..190°). Explicit ranges may overlap or leave gaps.
    azimuth_range : (float, float), optional
        The span of ``N`` equal sectors; not allowed with explicit ranges.

    Returns
    -------
    tuple of (float, float) or None
        Degrees, ``hi > lo`` (a sector across ±180° has ``hi > 180``); equal sectors share
        their edges exactly (``hi`` of one is ``lo`` of the next) and end at the span's end.

    Raises
    ------
    AzfilterError
        For a count that is not a positive integer, a range that is not two finite numbers
        or is wider than 360°, an empty list, or explicit ranges together with an azimuth
        range.
    """
    if sectors is None:
        return None
    if isinstance(sectors, (bool, np.bool_)):
        raise AzfilterError(f"sectors must be a positive integer or a list of (lo, hi) "
                            f"degree ranges, got {sectors!r}")
    if isinstance(sectors, (int, np.integer)) or (
            isinstance(sectors, (float, np.floating)) and float(sectors).is_integer()):
        count = int(sectors)
        if count < 1:
            raise AzfilterError(f"sectors must be a positive integer, got {sectors!r}")
        span = (-180.0, 180.0) if azimuth_range is None else azimuth_range
        normalize_azimuth_range(span)  # checks it
        first, second = (float(v) for v in span)
        # the end as normalize_azimuth_range reads it: hi, or hi + 360 when hi <= lo
        last = second if second > first else second + 360.0
        if last - first > 360.0:
            raise AzfilterError(f"the azimuth range that sectors span is wider than 360°: "
                                f"{tuple(span)!r}")
        edges = [first] + [first + (last - first) * k / count for k in range(1, count)] + [last]
        return tuple((edges[k], edges[k + 1]) for k in range(count))
    if isinstance(sectors, (str, bytes)) or not isinstance(sectors, (Sequence, np.ndarray)):
        raise AzfilterError(f"sectors must be a positive integer or a list of (lo, hi) "
                            f"degree ranges, got {sectors!r}")
    if azimuth_range is not None:
        raise AzfilterError("give either explicit sector ranges or an azimuth range, not both "
                            "(an azimuth range is the span of N equal sectors)")
    if len(sectors) == 0:
        raise AzfilterError("sectors: the list of (lo, hi) ranges is empty")
    ranges = []
    for pair in sectors:
        try:
            first, second = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise AzfilterError(
                f"each sector must be two numbers (lo, hi) in degrees, got {pair!r}") from None
        if not (math.isfinite(first) and math.isfinite(second)):
            raise AzfilterError(f"sector range must be finite, got {pair!r}")
        second = second if second > first else second + 360.0
        if second - first > 360.0:
            raise AzfilterError(f"sector range is wider than 360°: {pair!r}")
        ranges.append((first, second))
    return tuple(ranges)


def sectors_rad(sectors_deg: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Each sector in radians exactly as :func:`normalize_azimuth_range` converts a range."""
    bands = []
    for pair in sectors_deg:
        band = normalize_azimuth_range(pair)
        assert band is not None
        bands.append(band)
    return bands


# Buckets of χ (mod 2π) used to find the pixels a sector may touch without testing every pixel
# against every sector; a pixel whose χ extent is wider than a few buckets is always tested.
_CHI_BUCKETS = 1024
_WIDE_PIXEL_BUCKETS = 4


def _sector_candidates(
    chi_start: np.ndarray, chi_width: np.ndarray | None, bands: Sequence[tuple[float, float]]
) -> list[np.ndarray]:
    """For each band ``(lo, hi)`` (radians), the positions of the items that may overlap it.

    Item ``i`` covers χ from ``chi_start[i]`` to ``chi_start[i] + chi_width[i]`` (a point
    without ``chi_width``). The result for a band is a superset of the items that overlap it
    (one bucket of margin on each side, far above rounding), in increasing position: the
    caller decides exactly on these. Items with a non-finite χ overlap nothing.
    """
    theta = np.mod(chi_start, _TWO_PI)
    finite = np.isfinite(theta) if chi_width is None else np.isfinite(theta + chi_width)
    everything = np.flatnonzero(finite)
    step = _TWO_PI / _CHI_BUCKETS
    bucket = np.zeros(theta.size, dtype=np.intp)
    bucket[everything] = np.minimum((theta[everything] / step).astype(np.intp),
                                    _CHI_BUCKETS - 1)
    if chi_width is None:
        wide = np.zeros(0, dtype=np.intp)
        narrow = everything
        reach = 0.0
    else:
        is_wide = chi_width[everything] > _WIDE_PIXEL_BUCKETS * step
        wide = everything[is_wide]
        narrow = everything[~is_wide]
        reach = float(chi_width[narrow].max()) if narrow.size else 0.0
    order = narrow[np.argsort(bucket[narrow].astype(np.uint16), kind="stable")]
    per_bucket = np.bincount(bucket[narrow], minlength=_CHI_BUCKETS)
    bucket_end = np.cumsum(per_bucket)
    bucket_start = bucket_end - per_bucket

    result = []
    for lo, hi in bands:
        start = math.floor((lo % _TWO_PI - reach) / step) - 1
        stop = math.floor((lo % _TWO_PI + (hi - lo)) / step) + 1
        if stop - start + 1 >= _CHI_BUCKETS:
            result.append(everything)
            continue
        first, last = start % _CHI_BUCKETS, stop % _CHI_BUCKETS
        if first <= last:
            pieces = [order[bucket_start[first]:bucket_end[last]]]
        else:  # wraps past 2π
            pieces = [order[bucket_start[first]:], order[:bucket_end[last]]]
        result.append(np.sort(np.concatenate(pieces + [wide])))
    return result


def _sector_rows(
    n_rows_per_sector: int, per_sector: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack per-sector ``(indptr, indices, coefs)`` into one table, sector after sector."""
    counts = [np.diff(indptr) for indptr, _, _ in per_sector]
    indptr = np.zeros(n_rows_per_sector * len(per_sector) + 1, dtype=np.int64)
    if per_sector:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    indices = np.concatenate([part[1] for part in per_sector]).astype(np.int32, copy=False)
    coefs = np.concatenate([part[2] for part in per_sector]).astype(np.float32, copy=False)
    return indptr, indices, coefs


def csr_nosplit_sectors(
    radial_center: np.ndarray,
    chi_center: np.ndarray,
    static_mask: np.ndarray,
    npt: int,
    radial_range_internal: Sequence[float] | None,
    bands: Sequence[tuple[float, float]],
) -> CSRParts:
    """No-split lookup table over (sector, radial) bins: row ``s * npt + b``.

    Sector ``s`` holds exactly the rows :func:`csr_nosplit` gives with
    ``azimuth_range_rad=bands[s]`` (same pixels, same order, same radial range: the range is
    taken over the whole detector, never over one sector). Sectors that overlap, or share an
    edge on which a pixel centre lies exactly, both hold that pixel.

    Parameters
    ----------
    radial_center, chi_center : numpy.ndarray
        Radial value (internal units) and χ (rad) of each pixel centre, ``(N1, N2)``.
    static_mask : numpy.ndarray
        Bool, ``(N1, N2)`` or flat; True pixels never enter the table.
    npt : int
        Radial bins per sector.
    radial_range_internal : (float, float) or None
        Radial range in internal units; default: the range of the unmasked pixel centres.
    bands : sequence of (float, float)
        Each sector in radians (:func:`sectors_rad`).

    Returns
    -------
    CSRParts
        ``n_sectors * npt`` rows, ``n_sectors = len(bands)``.
    """
    npt = _check_npt(npt)
    radial = np.asarray(radial_center, dtype=np.float64)
    if radial.ndim != 2:
        raise AzfilterError(f"radial array must be 2-D, got shape {radial.shape}")
    shape = radial.shape
    radial = radial.reshape(-1)
    usable = ~_check_mask(static_mask, shape)
    usable &= np.isfinite(radial)
    pixels = np.flatnonzero(usable)
    if pixels.size == 0:
        raise AzfilterError("every pixel is masked: no radial range")
    values = radial[pixels]
    lo, hi = bin_bounds(values.min(), values.max(), radial_range_internal)
    # the radial bin of each pixel, with the very operations of csr_nosplit's two builders
    delta = (hi - lo) / npt
    position = (values - lo) / delta
    np.floor(position, out=position)
    inside = (position >= 0) & (position < npt)
    pixels = pixels[inside]
    bins = position[inside].astype(np.intp)
    chi = np.asarray(chi_center, dtype=np.float64).reshape(-1)[pixels]

    per_sector = []
    for band, candidates in zip(bands, _sector_candidates(chi, None, bands), strict=True):
        chosen = candidates[in_azimuth_range(chi[candidates], band)]
        sector_bins = bins[chosen]
        order = _stable_order(sector_bins, npt)
        per_sector.append((_rows_to_indptr(sector_bins, npt), pixels[chosen][order],
                           np.ones(chosen.size, dtype=np.float32)))
    indptr, indices, coefs = _sector_rows(npt, per_sector)
    return CSRParts(indptr, indices, coefs, lo, hi, npt, len(bands))


def csr_fullsplit_sectors(
    radial_corners: np.ndarray,
    chi_corners: np.ndarray,
    static_mask: np.ndarray,
    npt: int,
    radial_range_internal: Sequence[float] | None,
    bands: Sequence[tuple[float, float]],
    *,
    radial_center: np.ndarray | None = None,
    chi_center: np.ndarray | None = None,
) -> CSRParts:
    """Full-split lookup table over (sector, radial) cells: row ``s * npt + b``.

    A pixel is cut exactly in χ as in the radial direction: its coefficient for cell
    ``(s, b)`` is the area of its quadrilateral (in the plane x = (radial − lo)/δ, χ) inside
    radial strip ``b`` and sector ``s``, divided by its area inside the radial range (over
    all χ). So the fraction of a pixel outside every sector (outside the span of the sectors,
    in a gap between explicit ranges) is lost, and over sectors that tile the circle a
    pixel's coefficients add up to those of :func:`csr_fullsplit` without sectors. A pixel
    wholly inside a sector has there exactly its coefficients of the table without sectors;
    a pixel of zero area that a sector's edge crosses goes whole to that sector's cell when
    its centre is in the sector (as :func:`in_azimuth_range` decides). Each sector's rows
    depend on that sector alone, so a table of one sector is bit for bit the rows of that
    sector in a table of many.

    The radial range is that of the table without sectors (the whole detector).

    Parameters
    ----------
    radial_corners, chi_corners : numpy.ndarray
        Radial value (internal units) and χ (rad) at the pixel corners, ``(N1+1, N2+1)``.
    static_mask : numpy.ndarray
        Bool, ``(N1, N2)`` or flat; True pixels never enter the table.
    npt : int
        Radial bins per sector.
    radial_range_internal : (float, float) or None
        Radial range in internal units; default as :func:`csr_fullsplit`.
    bands : sequence of (float, float)
        Each sector in radians (:func:`sectors_rad`).
    radial_center, chi_center : numpy.ndarray, optional
        Values at the pixel centres, ``(N1, N2)``; ``chi_center`` places zero-area pixels
        (default: the mean of the corners' χ, unwrapped).

    Returns
    -------
    CSRParts
        ``n_sectors * npt`` rows, ``n_sectors = len(bands)``.
    """
    npt = _check_npt(npt)
    n_sectors = len(bands)
    plain = csr_fullsplit(radial_corners, chi_corners, static_mask, npt, radial_range_internal,
                          None, radial_center=radial_center)
    radial_grid = np.asarray(radial_corners, dtype=np.float64)
    chi_grid = np.asarray(chi_corners, dtype=np.float64)
    n2 = radial_grid.shape[1] - 1
    n_pixels = (radial_grid.shape[0] - 1) * n2
    lo, delta = plain.lo, (plain.hi - plain.lo) / npt
    present = np.flatnonzero(np.bincount(plain.indices, minlength=n_pixels))
    extent = _chi_extent(chi_grid, present, n2)
    candidates_of = _sector_candidates(extent.chi_a + extent.low, extent.high - extent.low,
                                       bands)
    chi_centre = None if chi_center is None else \
        np.asarray(chi_center, dtype=np.float64).reshape(-1)

    # layers[k][p]: the k-th sector pixel p lies wholly inside (-1: none); a pixel is in
    # several layers only where sectors overlap
    layers: list[np.ndarray] = []
    cut_keys: list[np.ndarray] = []   # cells of cut pixels: row * n_pixels + pixel
    cut_coefs: list[np.ndarray] = []
    for sector, (band, candidates) in enumerate(zip(bands, candidates_of, strict=True)):
        local = extent.subset(candidates)
        inside, touching = _band_overlap(local, band)
        whole_pixels = [present[candidates[inside]]]
        cut = candidates[touching & ~inside]
        if cut.size:
            pixels = present[cut]
            corners = _pixel_corners(radial_grid, chi_grid, pixels, n2, lo, delta)
            degenerate = corners.degenerate()
            if degenerate.any():  # zero area: whole or nothing, by its centre
                flat = pixels[degenerate]
                if chi_centre is not None:
                    centre = chi_centre[flat]
                else:
                    sub = corners.subset(degenerate)
                    centre = sub.chi_a + 0.25 * (sub.ys[0] + sub.ys[1] + sub.ys[2] + sub.ys[3])
                whole_pixels.append(flat[in_azimuth_range(centre, band)])
                keep = ~degenerate
                pixels, corners = pixels[keep], corners.subset(keep)
            bins, rows, coefs = _band_split(corners, band, npt)
            cut_keys.append((sector * npt + bins).astype(np.int64) * n_pixels + pixels[rows])
            cut_coefs.append(coefs.astype(np.float32))
        _place(layers, np.concatenate(whole_pixels), sector, n_pixels)

    # entries of the pixels wholly inside: their plain entries, moved to their sector's rows;
    # the plain rows list pixels in increasing order, so a stable sort by row keeps it
    radial_row = np.repeat(np.arange(npt, dtype=np.int32), np.diff(plain.indptr))
    parts = []
    for layer in layers:
        sector_of_entry = layer[plain.indices]
        taken = np.flatnonzero(sector_of_entry >= 0)
        rows = sector_of_entry[taken] * npt + radial_row[taken]
        order = taken[_stable_order(rows, n_sectors * npt)]
        rows = sector_of_entry[order] * npt + radial_row[order]
        parts.append((rows.astype(np.int64) * n_pixels + plain.indices[order],
                      plain.coefs[order]))
    if cut_keys:  # few: one sort, then one merge into the large parts
        keys = np.concatenate(cut_keys)
        order = np.argsort(keys)
        parts.append((keys[order], np.concatenate(cut_coefs)[order]))
    keys, coefs = _merge_sorted(parts)
    rows, indices = np.divmod(keys, n_pixels)
    indptr = _rows_to_indptr(rows, n_sectors * npt)
    return CSRParts(indptr, indices.astype(np.int32), coefs, plain.lo, plain.hi, npt,
                    n_sectors)


def _place(layers: list[np.ndarray], pixels: np.ndarray, sector: int, n_pixels: int) -> None:
    """Record that ``pixels`` lie wholly inside ``sector``, in the first free layer of each."""
    for layer in layers:
        if pixels.size == 0:
            return
        free = layer[pixels] < 0
        layer[pixels[free]] = sector
        pixels = pixels[~free]
    while pixels.size:  # pixels already inside an earlier sector of every layer: a new layer
        layers.append(np.full(n_pixels, -1, dtype=np.int32))
        layers[-1][pixels] = sector
        pixels = pixels[:0]


def _merge_sorted(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merge (sorted unique int64 keys, values) pairs whose keys never repeat across parts."""
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    parts = sorted(parts, key=lambda part: -part[0].size)  # merge the small into the large
    keys, values = parts[0]
    for more_keys, more_values in parts[1:]:
        if more_keys.size == 0:
            continue
        # final places: each new key goes after the old keys below it and the new ones before
        at = np.searchsorted(keys, more_keys) + np.arange(more_keys.size)
        merged_keys = np.empty(keys.size + more_keys.size, dtype=np.int64)
        merged_values = np.empty(merged_keys.size, dtype=values.dtype)
        old = np.ones(merged_keys.size, dtype=bool)
        old[at] = False
        merged_keys[at], merged_values[at] = more_keys, more_values
        merged_keys[old], merged_values[old] = keys, values
        keys, values = merged_keys, merged_values
    return keys, values


@dataclass
class _Extent:
    """The χ extent of a set of pixels: corner A's χ and the lowest and highest χ of the
    corners relative to it (unwrapped across the ±π cut)."""

    chi_a: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def subset(self, keep: np.ndarray) -> _Extent:
        return _Extent(self.chi_a[keep], self.low[keep], self.high[keep])


def _unwrapped(chi: np.ndarray, chi_a: np.ndarray) -> np.ndarray:
    """χ relative to corner A, unwrapped across the ±π cut as the plain builder does."""
    rel = chi - chi_a
    rel[rel > math.pi] -= _TWO_PI
    rel[rel < -math.pi] += _TWO_PI
    return rel


def _corner_offsets(pixels: np.ndarray, n2: int) -> tuple[np.ndarray, ...]:
    """Flat corner-grid indices of corners A=(i,j), B=(i+1,j), C=(i+1,j+1), D=(i,j+1)."""
    rows, cols = np.divmod(pixels, n2)
    a = rows * (n2 + 1) + cols
    return a, a + (n2 + 1), a + (n2 + 2), a + 1


def _chi_extent(chi_grid: np.ndarray, pixels: np.ndarray, n2: int) -> _Extent:
    """The χ extent of the flat ``pixels``."""
    chi_flat = chi_grid.reshape(-1)
    at = _corner_offsets(pixels, n2)
    chi_a = chi_flat[at[0]]
    low = np.zeros(pixels.size)
    high = np.zeros(pixels.size)
    for k in at[1:]:
        rel = _unwrapped(chi_flat[k], chi_a)
        np.minimum(low, rel, out=low)
        np.maximum(high, rel, out=high)
    return _Extent(chi_a, low, high)


@dataclass
class _Corners:
    """Corners of a set of pixels: x in bin units, χ relative to corner A (unwrapped)."""

    xs: list[np.ndarray]
    ys: list[np.ndarray]
    chi_a: np.ndarray

    def subset(self, keep: np.ndarray) -> _Corners:
        return _Corners([x[keep] for x in self.xs], [y[keep] for y in self.ys],
                        self.chi_a[keep])

    def extent(self) -> _Extent:
        low = np.minimum(np.minimum(self.ys[0], self.ys[1]), np.minimum(self.ys[2], self.ys[3]))
        high = np.maximum(np.maximum(self.ys[0], self.ys[1]),
                          np.maximum(self.ys[2], self.ys[3]))
        return _Extent(self.chi_a, low, high)

    def degenerate(self) -> np.ndarray:
        """Zero area to rounding, against the bounding box (the test of the plain builder)."""
        whole = np.zeros(self.chi_a.size)
        for k in range(4):
            x0, y0 = self.xs[k], self.ys[k]
            x1, y1 = self.xs[(k + 1) % 4], self.ys[(k + 1) % 4]
            whole += (x1 - x0) * (y0 + y1) * 0.5
        x_lo = np.minimum(np.minimum(self.xs[0], self.xs[1]), np.minimum(self.xs[2], self.xs[3]))
        x_hi = np.maximum(np.maximum(self.xs[0], self.xs[1]), np.maximum(self.xs[2], self.xs[3]))
        extent = self.extent()
        return np.abs(whole) <= _DEGENERATE_AREA * (x_hi - x_lo) * (extent.high - extent.low)


def _pixel_corners(radial_grid: np.ndarray, chi_grid: np.ndarray, pixels: np.ndarray, n2: int,
                   lo: float, delta: float) -> _Corners:
    """Corners A=(i,j), B=(i+1,j), C=(i+1,j+1), D=(i,j+1) of the flat ``pixels``."""
    at = _corner_offsets(pixels, n2)
    radial_flat = radial_grid.reshape(-1)
    chi_flat = chi_grid.reshape(-1)
    xs = [(radial_flat[k] - lo) / delta for k in at]
    chi_a = chi_flat[at[0]]
    ys = [np.zeros(pixels.size)] + [_unwrapped(chi_flat[k], chi_a) for k in at[1:]]
    return _Corners(xs, ys, chi_a)


def _band_copies(extent: _Extent, band: tuple[float, float]) -> list[tuple[np.ndarray, ...]]:
    """The band in each pixel's frame (χ relative to corner A): the two 2π copies that can
    meet a pixel, as ``(low, high, overlaps, contains)`` arrays."""
    lo, hi = band
    width = hi - lo
    low = np.mod(lo - extent.chi_a + math.pi, _TWO_PI) - math.pi  # in [−π, π)
    copies = []
    for shift in (0.0, -_TWO_PI):
        c0 = low + shift
        c1 = c0 + width
        overlaps = (c0 < extent.high) & (c1 > extent.low)
        contains = (c0 <= extent.low) & (extent.high <= c1)
        copies.append((c0, c1, overlaps, contains))
    return copies


def _band_overlap(extent: _Extent, band: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(wholly inside the band, touching it) for each pixel."""
    copies = _band_copies(extent, band)
    return copies[0][3] | copies[1][3], copies[0][2] | copies[1][2]


def _excess_integral(xa, ya, xb, yb, c):
    """∫ max(y − c, 0) dx along the segments (xa, ya) → (xb, yb) (y linear in x)."""
    y_min = np.minimum(ya, yb)
    y_max = np.maximum(ya, yb)
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (y_max - c) ** 2 / (2.0 * (y_max - y_min))
    mean = np.where(y_min >= c, 0.5 * (ya + yb) - c, np.where(y_max <= c, 0.0, crossing))
    return (xb - xa) * mean


def _band_split(corners: _Corners, band: tuple[float, float],
                npt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial bins, pixel positions and coefficients of pixels cut by a sector's edges.

    With ``F(t)`` the signed area left of ``x = t`` (∫ y dx along the edges clipped to
    ``x <= t``, as in :func:`_split_coefficients`) and ``G(t)`` the same restricted to the
    band ``c0 <= y <= c1`` (by Green's theorem, ∫ [max(y − c0, 0) − max(y − c1, 0)] dx along
    the same clipped edges), the coefficient of bin ``b`` is
    ``(G(b + 1) − G(b)) / Σ_in-range (F(b + 1) − F(b))``. Every step is elementwise and the
    strip sums run column by column, so a pixel's coefficients do not depend on which other
    pixels are computed with it.
    """
    n = corners.chi_a.size
    xs, ys = corners.xs, corners.ys
    x_min = np.minimum(np.minimum(xs[0], xs[1]), np.minimum(xs[2], xs[3]))
    x_max = np.maximum(np.maximum(xs[0], xs[1]), np.maximum(xs[2], xs[3]))
    first = np.floor(x_min)
    last = np.floor(x_max)
    reach = (last >= 0) & (first < npt)
    first_in = np.clip(first, 0, npt - 1)
    span = np.where(reach, np.clip(last, 0, npt - 1) - first_in + 1, 0).astype(np.intp)
    n_strips = int(span.max()) if n else 0
    if n_strips == 0:
        empty = np.zeros(0, dtype=np.intp)
        return empty, empty, np.zeros(0)
    if n > 1 and n * n_strips > _FULLSPLIT_DENSE_LIMIT:
        half = n // 2
        head = _band_split(corners.subset(slice(0, half)), band, npt)
        tail = _band_split(corners.subset(slice(half, n)), band, npt)
        return (np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1] + half]),
                np.concatenate([head[2], tail[2]]))

    copies = [(c0, c1, overlaps) for c0, c1, overlaps, _ in _band_copies(corners.extent(), band)]
    slopes = []
    for k in range(4):
        dx = xs[(k + 1) % 4] - xs[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            slopes.append(np.where(dx != 0, (ys[(k + 1) % 4] - ys[k]) / dx, 0.0))

    def left_of(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(F(t), G(t)) for every pixel."""
        plain = np.zeros(n)
        banded = np.zeros(n)
        for k in range(4):
            x0, y0, x1, slope = xs[k], ys[k], xs[(k + 1) % 4], slopes[k]
            xa = np.minimum(x0, t)
            xb = np.minimum(x1, t)
            ya = y0 + (xa - x0) * slope
            yb = y0 + (xb - x0) * slope
            plain += (xb - xa) * (ya + yb) * 0.5
            for c0, c1, overlaps in copies:
                part = _excess_integral(xa, ya, xb, yb, c0) - _excess_integral(xa, ya, xb, yb, c1)
                banded += np.where(overlaps, part, 0.0)
        return plain, banded

    in_range = np.zeros(n)
    areas = np.zeros((n, n_strips))
    previous_plain, previous_band = left_of(first_in)
    for strip in range(n_strips):
        plain, banded = left_of(first_in + strip + 1)
        used = strip < span
        in_range += np.where(used, plain - previous_plain, 0.0)
        areas[:, strip] = np.where(used, banded - previous_band, 0.0)
        previous_plain, previous_band = plain, banded
    coefs = np.zeros_like(areas)
    ok = in_range != 0
    coefs[ok] = areas[ok] / in_range[ok, None]
    np.maximum(coefs, 0.0, out=coefs)  # a sliver's rounding must not give a negative weight
    pixel_idx, strip_idx = np.nonzero(coefs)
    return first_in.astype(np.intp)[pixel_idx] + strip_idx, pixel_idx, coefs[pixel_idx, strip_idx]

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
    sectors_rad: Sequence[tuple[float, float]] | None = None,
) -> str:
    """sha256 (hex) of everything a lookup table depends on, and the cache format version.

    Floats enter by their exact binary value, so the key is stable across processes and
    machines and changes with any input. ``sectors_rad`` (each sector in radians) enters
    only when given, so tables without sectors keep their keys.
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
    if sectors_rad is not None:
        record["sectors"] = [exact(band) for band in sectors_rad]
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _cache_path(directory: Path, key: str) -> Path:
    return directory / f"csr-{key}.npz"


def _load_cached(path: Path, key: str, shape: tuple[int, int], npt: int,
                 n_sectors: int = 1) -> CSRParts | None:
    """The table stored at ``path``, or None if it is absent, unreadable or inconsistent.

    Every index is checked to lie inside the detector: a damaged file must never reach an
    engine that trusts the table.
    """
    try:
        with open_npz(path) as stored:  # a hit makes it the most recently used
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
        and indptr.shape == (n_sectors * npt + 1,)
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
    return CSRParts(indptr, indices, coefs, lo, hi, npt, n_sectors)


def _store_cached(path: Path, key: str, parts: CSRParts) -> bool:
    """Write the table atomically; returns whether it was stored (or is being stored, on a
    background thread: :func:`azfilter.cache.store_soon`)."""
    return store_soon(
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
    sectors: Sequence[tuple[float, float]] | None = None,
    only_if_cached: bool = False,
) -> CSR | bool:
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
        Not with ``sectors`` (their span is in their ranges).
    cache : bool
        Use the disk cache (:func:`cache_dir`); False always builds and stores nothing.
    stats : dict, optional
        Filled with ``cache`` ("hit", "miss" or "off"), ``path`` (the cache file or None),
        ``stored`` (whether a built table was written) and ``seconds`` (total time).
    sectors : sequence of (float, float), optional
        χ sectors in degrees (:func:`sector_ranges`): the table's rows are then the
        (sector, radial) cells, row ``s * npt + b``; no split:
        :func:`csr_nosplit_sectors`, full split: :func:`csr_fullsplit_sectors`.
    only_if_cached : bool
        Build and load nothing: return whether the disk cache has the table (the options
        are checked all the same).

    Returns
    -------
    CSR, or bool with ``only_if_cached``

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
    if sectors is not None and azimuth_range is not None:
        raise AzfilterError("a table with sectors takes no azimuth range (the sectors span it)")
    sector_bounds = sector_ranges(sectors) if sectors is not None else None
    bands = None if sector_bounds is None else sectors_rad(sector_bounds)
    n_sectors = 1 if bands is None else len(bands)

    directory = cache_dir() if cache else None
    path = None
    parts = None
    if directory is not None:
        key = table_key(
            geometry.cache_key(), shape, unit_info.name, npt, split, user_range, azimuth_rad,
            mask_digest(flat_mask), bands,
        )
        path = _cache_path(directory, key)
        if only_if_cached:
            return path.is_file()
        parts = _load_cached(path, key, shape, npt, n_sectors)
    elif only_if_cached:
        return False
    hit = parts is not None
    stored = False
    if parts is None:
        quantity = unit_info.quantity
        needs_chi = azimuth_rad is not None or split == "full" or bands is not None
        chi_center = geometry.center_array("chi", shape) if needs_chi else None
        if bands is not None and split == "no":
            parts = csr_nosplit_sectors(
                geometry.center_array(quantity, shape), chi_center, flat_mask, npt,
                range_internal, bands,
            )
        elif bands is not None:
            parts = csr_fullsplit_sectors(
                geometry.corner_grid(quantity, shape), geometry.corner_grid("chi", shape),
                flat_mask, npt, range_internal, bands,
                radial_center=geometry.center_array(quantity, shape), chi_center=chi_center,
            )
        elif split == "no":
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
        sectors=sector_bounds,
    )
    seconds = time.perf_counter() - started
    state = "off" if directory is None else ("hit" if hit else "miss")
    logger.debug(
        "lookup table %s/%s/%d%s: cache %s, %.3f s", unit_info.name, split, npt,
        "" if bands is None else f"x{len(bands)} sectors", state, seconds
    )
    if stats is not None:
        stats.update(cache=state, path=None if path is None else str(path), stored=stored,
                     seconds=seconds)
    return table
