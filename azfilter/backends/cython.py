"""CythonEngine: the compiled (Cython + OpenMP) engine, the default backend.

The kernels live in ``kernels/_engine.pyx`` (extension ``azfilter._engine``): one call per
frame and operation, the per-pixel preprocessing fused into the loop over each bin's table
entries, OpenMP threads over the bins, the GIL released. This class prepares what does not
change between frames (the table in the kernels' layout, the pixel normalisation and dark
current gathered in table order) and converts each frame only when its dtype is not one the
kernels read directly. Results agree with :class:`~azfilter.backends.python.PythonEngine`
(``docs/internals.md``, "Engine interface") to rounding.
"""

from __future__ import annotations

import numpy as np

from .. import _engine
from ..errors import AzfilterError
from ..vocabulary import ERROR_MODELS
from .base import DEFAULT_PICK, Engine
from .sums import BinSums, OutlierSums

# Frame dtypes the kernels do not read, and the dtype each is converted to without loss
# (64-bit integers go through float64 exactly as the Python reference converts them).
_RAW_CONVERSIONS = {
    np.dtype(np.bool_): np.dtype(np.uint8),
    np.dtype(np.int8): np.dtype(np.int16),
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.int64): np.dtype(np.float64),
    np.dtype(np.uint64): np.dtype(np.float64),
}
_RAW_DTYPES = frozenset(_engine.RAW_DTYPES)


def _sorted_rows(indptr: np.ndarray, indices: np.ndarray) -> np.ndarray | None:
    """The permutation that sorts each row by pixel index, or None when already sorted.

    medfilt breaks ties between equal values by pixel index by keeping the row order, so the
    kernels need rows in increasing pixel order (what :mod:`azfilter.binning` produces).
    """
    if indices.size < 2:
        return None
    rising = indices[1:] > indices[:-1]
    row_starts = indptr[1:-1]
    row_starts = row_starts[(row_starts > 0) & (row_starts < indices.size)]
    rising[row_starts - 1] = True  # a new row may start lower
    if rising.all():
        return None
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr))
    return np.lexsort((indices, rows))


class CythonEngine(Engine):
    """Compiled engine over one lookup table (see the module docstring).

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
    threads : int, optional
        OpenMP threads per call; default all cores (or ``OMP_NUM_THREADS``).
    device : ignored
        Accepted for interface compatibility with the OpenCL engine.
    """

    name = "cython"

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | None = None):
        self.csr = csr
        indptr = np.ascontiguousarray(csr.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
        coefs = np.ascontiguousarray(csr.coefs, dtype=np.float32)
        pixel_norm = np.ascontiguousarray(pixel_norm, dtype=np.float32).ravel()
        self.n_pixels = int(pixel_norm.size)
        self.npt = int(indptr.size - 1)
        if self.npt < 0 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
            raise ValueError("CSR indptr must start at 0 and be non-decreasing")
        if indices.size != indptr[-1] or coefs.size != indices.size:
            raise ValueError("CSR indptr, indices and coefs disagree in length")
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_pixels):
            raise AzfilterError(
                f"lookup table refers to pixels outside the detector ({self.n_pixels} pixels)"
            )
        order = _sorted_rows(indptr, indices)
        if order is not None:
            indices, coefs = indices[order], coefs[order]
        self._indptr = indptr
        self._indices = indices
        # every coefficient 1 (no splitting): the kernels skip the loads and multiplies
        self._coefs = None if bool(np.all(coefs == 1.0)) else coefs
        # per-entry copies, so that the kernels read them as streams
        self._norm = pixel_norm[indices]
        self._dark = None
        if dark is not None:
            dark = np.ascontiguousarray(dark, dtype=np.float32).ravel()
            if dark.size != self.n_pixels:
                raise AzfilterError(f"dark has {dark.size} pixels, the detector {self.n_pixels}")
            self._dark = dark[indices]
        self.dummy = None if dummy is None else float(dummy)
        self.delta_dummy = float(delta_dummy)
        if threads is not None and int(threads) < 1:
            raise AzfilterError(f"threads must be a positive integer, got {threads!r}")
        self.threads = _engine.default_threads() if threads is None else int(threads)

    # ------------------------------------------------------------------ helpers
    def _frame(self, raw) -> np.ndarray:
        """The frame flat and contiguous in a dtype the kernels read (converted if needed)."""
        array = np.asarray(raw)
        if array.size != self.n_pixels:
            raise AzfilterError(
                f"image has {array.size} pixels, the lookup table {self.n_pixels}"
            )
        dtype = array.dtype
        if dtype.kind not in "biuf":
            raise AzfilterError(f"image has unsupported dtype {dtype}")
        if not dtype.isnative:
            dtype = dtype.newbyteorder("=")
        dtype = _RAW_CONVERSIONS.get(dtype, dtype)
        if dtype not in _RAW_DTYPES:
            dtype = np.dtype(np.float64)
        return np.ascontiguousarray(array, dtype=dtype).reshape(-1)

    def _variance(self, variance, error_model: str) -> np.ndarray | None:
        if error_model not in ERROR_MODELS:
            raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                                f"{', '.join(ERROR_MODELS)}")
        if error_model != "variance":
            return None
        if variance is None:
            raise AzfilterError("error model 'variance' needs a variance array")
        array = np.ascontiguousarray(variance, dtype=np.float32).reshape(-1)
        if array.size != self.n_pixels:
            raise AzfilterError(f"variance has {array.size} pixels, the image {self.n_pixels}")
        return array

    def _table(self) -> tuple:
        return (self._indptr, self._indices, self._coefs, self._norm, self._dark)

    @staticmethod
    def _sums(result: np.ndarray, outliers: OutlierSums | None = None) -> BinSums:
        return BinSums(result[0], result[1], result[2], result[3], result[4], outliers)

    # ------------------------------------------------------------------ operations
    def integrate(self, raw, error_model: str, variance=None) -> BinSums:
        """Weighted mean per bin (no rejection); see ``docs/internals.md``.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame (any shape with the detector's pixel count), in its own dtype.
        error_model : str
            ``"poisson"``, ``"azimuthal"``, ``"hybrid"`` or ``"variance"``.
        variance : numpy.ndarray, optional
            Per-pixel variance, required by the ``"variance"`` model.

        Returns
        -------
        BinSums
        """
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        result = _engine.integrate(frame, *self._table(), var, self.dummy, self.delta_dummy,
                                   error_model, self.threads)
        return self._sums(result)

    def sigma_clip(self, raw, thres: float, max_iter: int, error_model: str,
                   variance=None, pick: float = DEFAULT_PICK) -> BinSums:
        """Iterative azimuthal sigma-clipping per bin; see ``docs/internals.md``.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.
        thres : float
            Clipping threshold in standard deviations (raised to Chauvenet's if larger).
        max_iter : int
            Maximum number of clipping passes.
        error_model : str
            ``"azimuthal"``, ``"hybrid"``, ``"poisson"`` or ``"variance"``.
        variance : numpy.ndarray, optional
            Per-pixel variance, required by the ``"variance"`` model.
        pick : float
            Threshold of the outlier statistics' ``picked`` count, in σ of the bin.

        Returns
        -------
        BinSums
            N is the number of pixels kept; with the outlier statistics.
        """
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        if int(max_iter) < 0:
            raise AzfilterError(f"max_iter must be >= 0, got {max_iter!r}")
        stats = np.empty((4, self.npt), dtype=np.float64)
        result = _engine.sigma_clip(frame, *self._table(), var, self.dummy, self.delta_dummy,
                                    error_model, float(thres), int(max_iter), self.threads,
                                    float(pick), stats)
        return self._sums(result, OutlierSums.from_rows(pick, stats))

    def medfilt(self, raw, quant_min: float, quant_max: float, error_model: str,
                variance=None, pick: float = DEFAULT_PICK) -> BinSums:
        """Average of the fragments between two weighted quantiles; see ``docs/internals.md``.

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.
        quant_min, quant_max : float
            Quantiles in [0, 1], ``quant_min <= quant_max``.
        error_model : str
            ``"poisson"``, ``"azimuthal"``, ``"hybrid"`` or ``"variance"``.
        variance : numpy.ndarray, optional
            Per-pixel variance, required by the ``"variance"`` model.
        pick : float
            Threshold of the outlier statistics' ``picked`` count, in σ of the bin.

        Returns
        -------
        BinSums
            N is the number of selected fragments; with the outlier statistics.
        """
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        low, high = float(quant_min), float(quant_max)
        if not 0.0 <= low <= high <= 1.0:
            raise AzfilterError(
                f"quantiles must satisfy 0 <= min <= max <= 1, got ({quant_min}, {quant_max})"
            )
        stats = np.empty((4, self.npt), dtype=np.float64)
        result = _engine.medfilt(frame, *self._table(), var, self.dummy, self.delta_dummy,
                                 error_model, low, high, self.threads, float(pick), stats)
        return self._sums(result, OutlierSums.from_rows(pick, stats))
