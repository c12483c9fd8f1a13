"""PythonEngine: the readable numpy / scipy.sparse reference of integrate, sigma_clip, medfilt.

The lookup table is a sparse matrix ``M`` (``npt × pixels``, entry ``M[k, j] = c``: pixel ``j``
enters radial bin ``k`` with coefficient ``c``), and ``M²`` holds the squared coefficients. The
per-bin sums of a frame are sparse matrix products with per-pixel vectors (the preprocessed
signal, normalisation, validity and variance, zero where a pixel is invalid)::

    S = M·signal    W = M·norm    N = M·valid    W2 = M²·norm²    V = M²·var

(``M`` is stored by columns, so a product streams through the pixels). ``W``, ``N`` and
``W2`` depend on a frame only through the pixels it invalidates (dummies, NaN: usually none or
a few), so they are the geometry's own sums, with every unmasked pixel valid, less the sums
over the pixels the frame loses; a bin that loses all its entries gets exact zeros. A frame
then costs two products over the table, not five. What depends on
a bin's own mean (the azimuthal scatter, sigma-clipping's rejections, medfilt's order) is
written over the table's *entries*: entry ``e`` puts pixel ``pixel[e]`` into bin ``bin[e]``
with coefficient ``coef[e]``, and per-bin sums are ``np.bincount(bin, weights)``. There is no
Python loop over pixels. The rules are those of ``docs/internals.md`` ("Engine interface");
the other engines must agree with this one.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from ..errors import AzfilterError
from ..preproc import preprocess
from ..vocabulary import ERROR_MODELS
from .base import DEFAULT_PICK, Engine
from .sums import BinSums, OutlierSums


@dataclass
class Entries:
    """The valid entries of a frame: one row per (bin, pixel) pair of the table."""

    bin: np.ndarray      # intp, radial bin of the entry
    pixel: np.ndarray    # intp, flat pixel index (ties in medfilt are broken by it)
    coef: np.ndarray     # float64, the table coefficient c (1 without splitting)
    signal: np.ndarray   # float64, raw - dark of the pixel
    var: np.ndarray      # float64, per-pixel variance of the error model (0 for azimuthal)
    norm: np.ndarray     # float64, pixel_norm of the pixel

    def subset(self, keep: np.ndarray) -> Entries:
        """The entries selected by a boolean mask or an index array."""
        return Entries(self.bin[keep], self.pixel[keep], self.coef[keep], self.signal[keep],
                       self.var[keep], self.norm[keep])

    @property
    def corrected(self) -> np.ndarray:
        """``x = signal / norm``: the value that is clipped, sorted and scattered."""
        return self.signal / self.norm


class PythonEngine(Engine):
    """Vectorised numpy engine (see the module docstring).

    Parameters
    ----------
    csr : azfilter.binning.CSR
        Lookup table: ``indptr`` (npt + 1), ``indices`` (flat pixel index), ``coefs``.
    pixel_norm : numpy.ndarray
        float32, flat: ``normalization · flat · polarization · solid_angle``, 0 where masked.
    dark : numpy.ndarray or None
        float32, flat dark current.
    dummy, delta_dummy : float or None, float
        Raw value flagging invalid pixels and its tolerance.
    threads, device : ignored
        Accepted for interface compatibility with the compiled engines.
    """

    name = "python"

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | None = None):
        self.csr = csr
        self.pixel_norm = np.ascontiguousarray(pixel_norm, dtype=np.float32).ravel()
        self.dark = None if dark is None else np.ascontiguousarray(dark, dtype=np.float32).ravel()
        self.dummy = None if dummy is None else float(dummy)
        self.delta_dummy = float(delta_dummy)
        indptr = np.asarray(csr.indptr, dtype=np.int64)
        self.npt = int(indptr.size - 1)
        self._bin = np.repeat(np.arange(self.npt, dtype=np.intp), np.diff(indptr))
        self._pixel = np.asarray(csr.indices, dtype=np.intp)
        self._coef = np.asarray(csr.coefs, dtype=np.float64)
        if self._pixel.size != self._bin.size or self._coef.size != self._bin.size:
            raise ValueError("CSR indptr, indices and coefs disagree in length")
        if self._pixel.size and (self._pixel.min() < 0
                                 or self._pixel.max() >= self.pixel_norm.size):
            raise AzfilterError(f"lookup table refers to pixels outside the detector "
                                f"({self.pixel_norm.size} pixels)")
        shape = (self.npt, self.pixel_norm.size)
        # M is kept by columns (CSC: the entries of each pixel together): a product then
        # reads the pixel vector in order and adds into the few bins, instead of gathering
        # pixels at random for each bin (3x faster on a Pilatus 1M table)
        matrix = scipy.sparse.csr_matrix((self._coef, self._pixel, indptr), shape=shape)
        self._matrix = matrix.tocsc()
        self._unit_coefs = bool(np.all(self._coef == 1.0))
        self._matrix2 = self._matrix if self._unit_coefs else scipy.sparse.csr_matrix(
            (self._coef * self._coef, self._pixel, indptr), shape=shape).tocsc()
        # the same entries in that order, for the azimuthal scatter's second pass
        self._entry_bin = self._matrix.indices.astype(np.intp)
        self._entry_pixel = np.repeat(np.arange(shape[1], dtype=np.intp),
                                      np.diff(self._matrix.indptr))
        self._entry_coef = np.asarray(self._matrix.data, dtype=np.float64)
        # W, W2, N of a frame whose every unmasked pixel is valid, and the number of entries
        # of each bin with an unmasked pixel (see the module docstring)
        self._norm = self.pixel_norm.astype(np.float64)
        self._unmasked = self._norm != 0
        unmasked = self._unmasked.astype(np.float64)
        self._geometry_sums = (self._matrix @ self._norm,
                               self._matrix2 @ (self._norm * self._norm),
                               self._matrix @ unmasked)
        self._unmasked_entries = np.bincount(self._entry_bin[self._unmasked[self._entry_pixel]],
                                             minlength=self.npt)
        # per-pixel arrays reused frame after frame, one set per thread: fresh ones for a
        # megapixel frame cost more in page faults than the arithmetic (Pilatus 1M integrate
        # 20 ms against 12 ms on a 2-core Xeon)
        self._workspaces = threading.local()

    def _workspace(self) -> tuple[np.ndarray, ...]:
        """This thread's ``signal, var, norm`` (float64) and ``valid`` (bool) arrays."""
        arrays = getattr(self._workspaces, "arrays", None)
        if arrays is None:
            size = self.pixel_norm.size
            arrays = (np.empty(size), np.empty(size), np.empty(size),
                      np.empty(size, dtype=bool))
            self._workspaces.arrays = arrays
        return arrays

    # ------------------------------------------------------------------ building blocks
    def pixels(self, raw: np.ndarray, error_model: str, variance: np.ndarray | None = None,
               reuse: bool = False) -> tuple[np.ndarray, ...]:
        """Preprocess a frame: per-pixel ``signal, var, norm, valid``, zero where invalid.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.
        error_model : str
            Decides the per-pixel variance (see :func:`azfilter.preproc.preprocess`).
        variance : numpy.ndarray, optional
            For the ``"variance"`` model.
        reuse : bool
            Write into this thread's workspace, overwritten by the next call, instead of new
            arrays.
        """
        if error_model not in ERROR_MODELS:
            raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                                f"{', '.join(ERROR_MODELS)}")
        if np.asarray(raw).dtype.kind not in "biuf":
            raise AzfilterError(f"image has unsupported dtype {np.asarray(raw).dtype}")
        if np.size(raw) != self.pixel_norm.size:
            raise AzfilterError(
                f"image has {np.size(raw)} pixels, the lookup table {self.pixel_norm.size}"
            )
        return preprocess(raw, self.pixel_norm, self.dark, self.dummy, self.delta_dummy,
                          error_model, variance,
                          out=self._workspace() if reuse else None)

    def entries(self, raw: np.ndarray, error_model: str,
                variance: np.ndarray | None = None) -> Entries:
        """Preprocess the frame and keep the table entries whose pixel is valid.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.
        error_model : str
            Decides the per-pixel variance (see :func:`azfilter.preproc.preprocess`).
        variance : numpy.ndarray, optional
            For the ``"variance"`` model.

        Returns
        -------
        Entries
            One element per valid (bin, pixel) entry, in table order (bin, then pixel).
        """
        signal, var, norm, valid = self.pixels(raw, error_model, variance, reuse=True)
        keep = valid[self._pixel]   # the gathers below copy out of the workspace
        pixel = self._pixel[keep]
        return Entries(self._bin[keep], pixel, self._coef[keep], signal[pixel], var[pixel],
                       norm[pixel])

    def _per_bin(self, bins: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(bins, weights, minlength=self.npt).astype(np.float64, copy=False)

    def _pixel_sums(self, signal: np.ndarray, var: np.ndarray, norm: np.ndarray,
                    valid: np.ndarray, azimuthal: bool) -> BinSums:
        """S, V, W, W2, N of a preprocessed frame, as sparse matrix products.

        With ``azimuthal`` V is the exact two-pass scatter ``Σ ω²(x − S/W)²`` with
        ``ω = c·norm``, over the table's entries; otherwise ``M²·var``.
        """
        matrix, matrix2 = self._matrix, self._matrix2
        signal_sum = matrix @ signal
        normalization, normalization2, count_sum = (sums.copy() for sums in self._geometry_sums)
        lost = np.flatnonzero(valid != self._unmasked)   # unmasked pixels this frame invalidates
        if lost.size:
            lost_norm = self._norm[lost]
            lost_columns = matrix[:, lost]
            normalization -= lost_columns @ lost_norm
            lost_columns2 = lost_columns if matrix2 is matrix else matrix2[:, lost]
            normalization2 -= lost_columns2 @ (lost_norm * lost_norm)
            count_sum -= lost_columns @ np.ones(lost.size)
            # a bin without a valid entry must sum to exactly zero, as the other engines' do;
            # the difference is zero there only while both products add in the same order
            emptied = np.bincount(lost_columns.indices, minlength=self.npt) \
                == self._unmasked_entries
            for sums in (normalization, normalization2, count_sum):
                sums[emptied] = 0.0
        if azimuthal:
            pixel, bins = self._entry_pixel, self._entry_bin
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = signal_sum / normalization   # NaN in a bin of zero weight, as V there
                corrected = signal / norm
                # invalid entries take no part (not even a NaN mean)
                weighted = np.where(valid[pixel], corrected[pixel] - mean[bins], 0.0)
            weighted *= self._entry_coef * norm[pixel]   # ω of each entry
            variance = self._per_bin(bins, weighted * weighted)
        else:
            variance = matrix2 @ var
        return BinSums(signal_sum, variance, normalization, normalization2, count_sum)

    def _sums(self, entries: Entries, azimuthal: bool) -> BinSums:
        """S, V, W, W2, N of the given entries.

        With ``azimuthal`` V is the exact two-pass scatter ``Σ ω²(x − S/W)²`` with
        ``ω = c·norm``; otherwise it is the propagated pixel variance ``Σ c²·var``.
        """
        c = entries.coef
        bins = entries.bin
        weight = c * entries.norm                      # ω
        signal = self._per_bin(bins, c * entries.signal)
        normalization = self._per_bin(bins, weight)
        normalization2 = self._per_bin(bins, weight * weight)
        count = self._per_bin(bins, c)
        if azimuthal:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = signal / normalization
            deviation = entries.corrected - mean[bins]
            deviation *= weight
            variance = self._per_bin(bins, deviation * deviation)
        else:
            variance = self._per_bin(bins, c * entries.coef * entries.var)
        return BinSums(signal, variance, normalization, normalization2, count)

    # ------------------------------------------------------------------ operations
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """Weighted mean per bin (the baseline, no rejection).

        Poisson and hybrid sum ``c²·max(raw, 1)``; variance sums ``c²·variance``; azimuthal
        takes the two-pass scatter of the corrected values.
        """
        signal, var, norm, valid = self.pixels(raw, error_model, variance, reuse=True)
        return self._pixel_sums(signal, var, norm, valid, azimuthal=error_model == "azimuthal")

    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Iterative azimuthal sigma-clipping, all bins at once.

        A bin where nothing is rejected keeps its sums, so it would reject nothing again:
        iterating every bin until no bin rejects anything is the same as stopping each bin on
        its own. So after each pass only the bins that rejected something are summed again,
        over their kept entries.
        """
        entries = self.entries(raw, error_model, variance)
        # hybrid clips with the azimuthal scatter and reports the Poisson error
        clip_azimuthal = error_model in ("azimuthal", "hybrid")
        bins, corrected = entries.bin, entries.corrected
        sums = self._sums(entries, clip_azimuthal)
        kept = np.ones(bins.size, dtype=bool)
        threshold_floor = float(thres)
        for _ in range(int(max_iter)):
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sums.signal / sums.normalization
                std = np.sqrt(sums.variance / sums.normalization2)
                # Chauvenet's criterion (as pyFAI): grows with N, so large rings clip harder
                chauvenet = np.sqrt(2.0 * np.log(np.maximum(3.0, sums.count)
                                                 / math.sqrt(2.0 * math.pi)))
            cutoff = np.maximum(threshold_floor, chauvenet) * std
            # NaN mean/std (empty bins) compare False: nothing is rejected there
            rejected = kept & (np.abs(corrected - mean[bins]) > cutoff[bins])
            if not rejected.any():
                break
            kept &= ~rejected
            changed = np.zeros(self.npt, dtype=bool)
            changed[bins[rejected]] = True
            sums = self._replace_bins(sums, entries.subset(kept & changed[bins]), changed,
                                      clip_azimuthal)
        if error_model == "hybrid":
            sums.variance = self._sums(entries.subset(kept), azimuthal=False).variance
        sums.outliers = self.outlier_sums(entries, kept, sums, pick)
        return sums

    def outlier_sums(self, entries: Entries, kept: np.ndarray, sums: BinSums,
                     pick: float) -> OutlierSums:
        """Per-bin outlier statistics of the final sums (see :class:`OutlierSums`).

        Parameters
        ----------
        entries : Entries
            Every valid entry of the frame (before clipping or selection).
        kept : numpy.ndarray
            bool, per entry: kept by sigma_clip, selected by medfilt.
        sums : BinSums
            The final sums: the mean ``S/W`` and spread ``sqrt(V/W2)`` the results report.
        pick : float
            Threshold of ``picked``.
        """
        bins = entries.bin
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums.signal / sums.normalization
            spread = np.sqrt(sums.variance / sums.normalization2)
            z = (entries.corrected - mean[bins]) / spread[bins]
        available = np.bincount(bins, minlength=self.npt)
        picked = np.bincount(bins[z > pick], minlength=self.npt)   # NaN compares False
        rejected = ~kept
        rejected_sum = self._per_bin(bins[rejected],
                                     entries.coef[rejected] * entries.signal[rejected])
        max_sigma = np.full(self.npt, np.nan)
        np.fmax.at(max_sigma, bins, z)   # fmax: NaN only where every z of the bin is NaN
        return OutlierSums(float(pick), available, picked, rejected_sum, max_sigma)

    def _replace_bins(self, sums: BinSums, entries: Entries, changed: np.ndarray,
                      azimuthal: bool) -> BinSums:
        """``sums`` with the ``changed`` bins summed again over ``entries`` (theirs)."""
        fresh = self._sums(entries, azimuthal)
        for name in ("signal", "variance", "normalization", "normalization2", "count"):
            values = getattr(sums, name)
            values[changed] = getattr(fresh, name)[changed]
        return sums

    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Average of the fragments between two weighted quantiles of each bin.

        Fragments are sorted by (bin, corrected value, pixel index); fragment m of a bin, with
        cumulative weight span ``[L_m, U_m]``, is selected when it lies inside
        ``[quant_min·T, quant_max·T]`` or covers it entirely.
        """
        entries = self.entries(raw, error_model, variance)
        # Sort by (bin, key, pixel index). The entries are already in (bin, pixel) order, so a
        # stable sort on the key followed by a stable sort on the bin (a radix sort for
        # integer keys) gives exactly that order, faster than np.lexsort.
        by_key = np.argsort(entries.corrected, kind="stable")
        bin_key = entries.bin.astype(np.uint16) if self.npt <= 1 << 16 else entries.bin
        order = by_key[np.argsort(bin_key[by_key], kind="stable")]
        weight = (entries.coef * entries.norm)[order]
        bins = entries.bin[order]
        # Cumulative weights restart in each bin (a cumulative sum per bin, as the contract
        # says: one global sum minus an offset would drift by the rounding of the offset).
        per_bin = np.bincount(bins, minlength=self.npt)
        bin_end = np.cumsum(per_bin)
        upper = np.empty_like(weight)
        total = np.zeros(self.npt)
        for k in np.flatnonzero(per_bin):
            start, stop = bin_end[k] - per_bin[k], bin_end[k]
            np.cumsum(weight[start:stop], out=upper[start:stop])
            total[k] = upper[stop - 1]
        lower = np.empty_like(upper)  # L_m = U_{m-1}, and 0 for the first fragment of a bin
        lower[1:] = upper[:-1]
        lower[bin_end[per_bin > 0] - per_bin[per_bin > 0]] = 0.0
        lo = float(quant_min) * total[bins]
        hi = float(quant_max) * total[bins]
        selected_sorted = (weight != 0) & (((lo <= lower) & (upper <= hi))
                                           | ((lo >= lower) & (upper >= hi)))
        selected = np.empty_like(selected_sorted)
        selected[order] = selected_sorted  # back to table order (sums do not care)
        chosen = entries.subset(selected)
        sums = self._sums(chosen, azimuthal=error_model == "azimuthal")
        sums.count = self._per_bin(chosen.bin)  # number of fragments, not Σc
        sums.outliers = self.outlier_sums(entries, selected, sums, pick)
        return sums
