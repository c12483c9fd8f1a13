"""PythonEngine: the readable numpy reference of integrate, sigma_clip and medfilt.

Everything is expressed over the *entries* of the CSR lookup table: entry ``e`` puts pixel
``pixel[e]`` into radial bin ``bin[e]`` with coefficient ``coef[e]``. Per-bin sums are
``np.bincount(bin, weights)``; there is no Python loop over bins or pixels. The rules are
those of ``docs/internals.md`` ("Engine interface"); the other engines must agree with this
one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import AzfilterError
from ..preproc import preprocess
from ..vocabulary import ERROR_MODELS
from .base import Engine
from .sums import BinSums


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

    # ------------------------------------------------------------------ building blocks
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
        if error_model not in ERROR_MODELS:
            raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                                f"{', '.join(ERROR_MODELS)}")
        if np.asarray(raw).dtype.kind not in "biuf":
            raise AzfilterError(f"image has unsupported dtype {np.asarray(raw).dtype}")
        if np.size(raw) != self.pixel_norm.size:
            raise AzfilterError(
                f"image has {np.size(raw)} pixels, the lookup table {self.pixel_norm.size}"
            )
        signal, var, norm, valid = preprocess(raw, self.pixel_norm, self.dark, self.dummy,
                                              self.delta_dummy, error_model, variance)
        keep = valid[self._pixel]
        pixel = self._pixel[keep]
        return Entries(self._bin[keep], pixel, self._coef[keep], signal[pixel], var[pixel],
                       norm[pixel])

    def _per_bin(self, bins: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(bins, weights, minlength=self.npt).astype(np.float64, copy=False)

    def _sums(self, entries: Entries, azimuthal: bool) -> BinSums:
        """S, V, W, W2, N of the given entries.

        With ``azimuthal`` V is the exact two-pass scatter ``Σ ω²(x − S/W)²`` with
        ``ω = c·norm``; otherwise it is the propagated pixel variance ``Σ c²·var``.
        """
        c, bins = entries.coef, entries.bin
        weight = c * entries.norm
        signal = self._per_bin(bins, c * entries.signal)
        normalization = self._per_bin(bins, weight)
        normalization2 = self._per_bin(bins, weight * weight)
        count = self._per_bin(bins, c)
        if azimuthal:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = signal / normalization
            deviation = entries.corrected - mean[bins]
            variance = self._per_bin(bins, weight * weight * deviation * deviation)
        else:
            variance = self._per_bin(bins, c * c * entries.var)
        return BinSums(signal, variance, normalization, normalization2, count)

    # ------------------------------------------------------------------ operations
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """Weighted mean per bin (the baseline, no rejection).

        Poisson and hybrid sum ``c²·max(raw, 1)``; variance sums ``c²·variance``; azimuthal
        takes the two-pass scatter of the corrected values.
        """
        entries = self.entries(raw, error_model, variance)
        return self._sums(entries, azimuthal=error_model == "azimuthal")

    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None) -> BinSums:
        """Iterative azimuthal sigma-clipping, all bins at once.

        A bin where nothing is rejected keeps its sums, so it would reject nothing again:
        iterating every bin until no bin rejects anything is the same as stopping each bin on
        its own.
        """
        entries = self.entries(raw, error_model, variance)
        # hybrid clips with the azimuthal scatter and reports the Poisson error
        clip_azimuthal = error_model in ("azimuthal", "hybrid")
        corrected = entries.corrected
        kept = np.ones(entries.bin.size, dtype=bool)
        sums = self._sums(entries, clip_azimuthal)
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
            rejected = kept & (np.abs(corrected - mean[entries.bin]) > cutoff[entries.bin])
            if not rejected.any():
                break
            kept &= ~rejected
            sums = self._sums(entries.subset(kept), clip_azimuthal)
        if error_model == "hybrid":
            final = self._sums(entries.subset(kept), azimuthal=False)
            sums.variance = final.variance
        return sums

    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None) -> BinSums:
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
        return sums
