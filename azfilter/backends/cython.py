"""CythonEngine: the compiled (Cython + OpenMP) engine, the default backend.

The kernels live in ``kernels/_engine.pyx`` (extension ``azfilter._engine``): one call per
frame and operation, the per-pixel preprocessing fused into the loop over each bin's table
entries, OpenMP threads over the bins, the GIL released. This class prepares what does not
change between frames (the table in the kernels' layout, the pixel normalisation and dark
current gathered in table order) and converts each frame only when its dtype is not one the
kernels read directly. Results agree with :class:`~azfilter.backends.python.PythonEngine`
(``docs/internals.md``, "Engine interface") to rounding.

:meth:`CythonEngine.process_many` reduces several frames at once ("lanes"), each call with
its share of the engine's threads: one frame on all cores spends a growing part of its time
starting, waking and joining OpenMP threads and in the serial parts around each call, while
frames on fewer threads each run at close to one core's speed. With fewer threads than
:data:`THREADS_PER_LANE` each frame gets one thread: on a few cores the command's reader and
writer threads take turns with the engine's, and one frame on all of them waits, at the end of
each parallel loop, for the thread a reader interrupted (2 cores, Eiger 4M stack: a fifth of
the cores' time idle with one frame on two threads; with two frames on one thread each, none
between the first frame and the last).
Results are the same whatever the number of lanes or threads (each bin is summed by one
thread, in table order).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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

#: OpenMP threads per frame that :func:`default_lanes` aims for when frames run concurrently
THREADS_PER_LANE = 4
#: environment variable overriding the number of frames process_many reduces at once
LANES_VARIABLE = "AZFILTER_CYTHON_LANES"


def default_lanes(threads: int, environ=None) -> int:
    """Frames :meth:`CythonEngine.process_many` reduces at once with ``threads`` threads.

    ``threads // THREADS_PER_LANE``; with fewer threads than that, ``threads`` (one thread per
    frame: see the module docstring). ``AZFILTER_CYTHON_LANES``, when it is set to a positive
    integer, chooses instead (capped at ``threads``: every lane gets at least one thread).

    Parameters
    ----------
    threads : int
        OpenMP threads of the engine, shared by the lanes.
    environ : mapping, optional
        Environment to read (default ``os.environ``).

    Returns
    -------
    int
    """
    environ = os.environ if environ is None else environ
    threads = max(1, int(threads))
    asked = environ.get(LANES_VARIABLE, "").strip()
    if asked:
        if not asked.isdigit() or int(asked) < 1:
            raise AzfilterError(f"{LANES_VARIABLE} must be a positive integer, got {asked!r}")
        return min(int(asked), threads)
    if threads < THREADS_PER_LANE:
        return threads
    return threads // THREADS_PER_LANE


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
        OpenMP threads per call; default all cores (or ``OMP_NUM_THREADS``). process_many
        shares them among :attr:`lanes` frames reduced at once.
    device : ignored
        Accepted for interface compatibility with the OpenCL engine.
    lanes : int, optional
        Frames :meth:`process_many` reduces at once; default :func:`default_lanes`.
    """

    name = "cython"

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | None = None, lanes: int | None = None):
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
        if lanes is not None and int(lanes) < 1:
            raise AzfilterError(f"lanes must be a positive integer, got {lanes!r}")
        self.lanes = default_lanes(self.threads) if lanes is None else min(int(lanes),
                                                                            self.threads)
        self._longest_row = int(np.diff(indptr).max()) if self.npt > 0 else 0
        # W, W2, N of each row with every pixel valid (see _integrate), made on first use
        self._row_weights: np.ndarray | None = None
        # one reusable kernel workspace per calling thread (see _workspace)
        self._local = threading.local()

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

    def _workspace(self, threads: int) -> np.ndarray:
        """This thread's kernel workspace for calls on ``threads`` threads (kept and reused).

        Allocating it per call costs page faults on megabytes every frame (16 threads, Eiger
        4M: 5.8 MB for sigma_clip, 16 MB for medfilt full split), in the serial part of the
        call. One per thread because lanes run kernels at the same time.
        """
        size = _engine.workspace_doubles(self._longest_row, threads)
        work = getattr(self._local, "work", None)
        if work is None or work.size < size:
            work = np.empty(size, dtype=np.float64)
            self._local.work = work
        return work

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
        return self._integrate(raw, error_model, variance, self.threads)

    def _weights(self, threads: int) -> np.ndarray:
        """The table's row weights (``_engine.integrate_weights``), computed once.

        integrate reads them instead of the norm stream in every row whose pixels are all
        valid: with pixel splitting each pixel is in about three rows, and its norm was
        streamed (and multiplied) each time. Lanes may compute them at once: same values.
        """
        weights = self._row_weights
        if weights is None:
            weights = _engine.integrate_weights(self._indptr, self._indices, self._coefs,
                                                self._norm, threads)
            self._row_weights = weights
        return weights

    def _integrate(self, raw, error_model: str, variance, threads: int) -> BinSums:
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        if error_model == "azimuthal":
            result = _engine.integrate(frame, *self._table(), var, self.dummy,
                                       self.delta_dummy, error_model, threads,
                                       self._workspace(threads))
        else:
            result = _engine.integrate(frame, *self._table(), var, self.dummy,
                                       self.delta_dummy, error_model, threads,
                                       row_weights=self._weights(threads))
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
        return self._sigma_clip(raw, thres, max_iter, error_model, variance, pick=pick,
                                threads=self.threads)

    def _sigma_clip(self, raw, thres: float, max_iter: int, error_model: str, variance=None,
                    pick: float = DEFAULT_PICK, *, threads: int) -> BinSums:
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        if int(max_iter) < 0:
            raise AzfilterError(f"max_iter must be >= 0, got {max_iter!r}")
        stats = np.empty((4, self.npt), dtype=np.float64)
        result = _engine.sigma_clip(frame, *self._table(), var, self.dummy, self.delta_dummy,
                                    error_model, float(thres), int(max_iter), threads,
                                    work=self._workspace(threads), pick=float(pick),
                                    stats=stats)
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
        return self._medfilt(raw, quant_min, quant_max, error_model, variance, pick=pick,
                             threads=self.threads)

    def _medfilt(self, raw, quant_min: float, quant_max: float, error_model: str, variance=None,
                 pick: float = DEFAULT_PICK, *, threads: int) -> BinSums:
        var = self._variance(variance, error_model)
        frame = self._frame(raw)
        low, high = float(quant_min), float(quant_max)
        if not 0.0 <= low <= high <= 1.0:
            raise AzfilterError(
                f"quantiles must satisfy 0 <= min <= max <= 1, got ({quant_min}, {quant_max})"
            )
        stats = np.empty((4, self.npt), dtype=np.float64)
        result = _engine.medfilt(frame, *self._table(), var, self.dummy, self.delta_dummy,
                                 error_model, low, high, threads, work=self._workspace(threads),
                                 pick=float(pick), stats=stats)
        return self._sums(result, OutlierSums.from_rows(pick, stats))

    # ------------------------------------------------------------------ streaming
    def _stream(self, frames: Iterable[tuple[Any, np.ndarray]], operation: str,
                params: dict[str, Any]) -> Iterator[tuple[Any, BinSums | Exception]]:
        """Several frames at once (:attr:`lanes`), results in input order.

        Each lane is a thread of a pool that calls the kernel (which releases the GIL) with
        ``threads // lanes`` OpenMP threads; this thread keeps pulling frames from ``frames``
        meanwhile. At most ``2 * lanes`` frames are submitted and not yet returned (one
        waiting per lane, so that a lane done before the head of the queue does not idle),
        so memory stays bounded whatever the stream's length.
        """
        lanes = self.lanes
        if lanes <= 1:
            yield from super()._stream(frames, operation, params)
            return
        method = getattr(self, "_" + operation)
        threads = max(1, self.threads // lanes)

        def outcome(future) -> BinSums | Exception:
            try:
                return future.result()
            except Exception as err:  # noqa: BLE001 - one bad frame must not end the stream
                return err

        pending: deque = deque()
        pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="azfilter-lane")
        try:
            for tag, raw in frames:
                pending.append((tag, pool.submit(method, raw, threads=threads, **params)))
                if len(pending) >= 2 * lanes:
                    head_tag, future = pending.popleft()
                    yield head_tag, outcome(future)
            while pending:
                head_tag, future = pending.popleft()
                yield head_tag, outcome(future)
        finally:
            # the consumer stopped early (or an error): drop what has not started, wait for
            # the rest (kernels cannot be interrupted and read the caller's buffers)
            pool.shutdown(wait=True, cancel_futures=True)
