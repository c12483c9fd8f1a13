"""The engine interface that the python, cython and opencl engines implement.

An engine holds one lookup table and the per-pixel constants of one geometry and turns raw
frames into per-bin sums (:class:`~azfilter.backends.BinSums`). Three single-frame operations
(``integrate``, ``sigma_clip``, ``medfilt``) and one streaming call, :meth:`Engine.process_many`,
which the command's pipeline uses for every backend. The base class gives the plain loop
(one frame after the other); the OpenCL engine overrides it to overlap uploads and kernels.

Readers fill frames into buffers that the engine reads fastest (page-locked memory for
OpenCL, plain numpy otherwise): :meth:`Engine.host_buffers` gives a bounded ring of them,
:class:`FrameBufferRing`.
"""

from __future__ import annotations

import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import AzfilterError
from .sums import BinSums

#: operation (:data:`azfilter.vocabulary.METHODS`) -> (required parameters, optional ones)
#: of :meth:`Engine.process_many`
OPERATION_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "integrate": (("error_model",), ("variance",)),
    "sigma_clip": (("thres", "max_iter", "error_model"), ("variance", "pick")),
    "medfilt": (("quant_min", "quant_max", "error_model"), ("variance", "pick")),
}

#: default threshold (in σ of the pixel's bin) above which sigma_clip and medfilt count a
#: pixel as picked in their outlier statistics
DEFAULT_PICK = 3.0


def check_operation(operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check an operation name and its parameters once, before a stream starts.

    Parameters
    ----------
    operation : str
        ``"integrate"``, ``"sigma_clip"`` or ``"medfilt"``.
    params : mapping
        The keyword arguments of that method besides ``raw``.

    Returns
    -------
    dict
        ``params`` with ``variance`` set (None when absent).

    Raises
    ------
    AzfilterError
        For an unknown operation, a missing or an unknown parameter.
    """
    if operation not in OPERATION_PARAMETERS:
        raise AzfilterError(f"unknown operation {operation!r}; choose one of "
                            f"{', '.join(OPERATION_PARAMETERS)}")
    required, optional = OPERATION_PARAMETERS[operation]
    missing = [name for name in required if name not in params]
    if missing:
        raise AzfilterError(f"{operation} needs {', '.join(missing)}")
    unknown = sorted(set(params) - set(required) - set(optional))
    if unknown:
        raise AzfilterError(f"{operation} takes no parameter {', '.join(unknown)}")
    checked = dict(params)
    checked.setdefault("variance", None)
    return checked


def fill_buffer(ring: Any, data: Any) -> Any:
    """``data`` copied into a buffer that ``ring`` lends (``ring.is_lent``, ``ring.take``);
    ``data`` itself when it is a lent buffer already, is not a numeric array, or no buffer
    is free."""
    if ring.is_lent(data) or not isinstance(data, np.ndarray) \
            or data.dtype.kind not in "biuf" or data.ndim == 0:
        return data
    buffer = ring.take(data.shape, data.dtype)
    if buffer is None:
        return data
    buffer[...] = data
    return buffer


class FrameBufferRing:
    """A bounded set of reusable frame buffers that an engine reads fastest.

    Readers decode frames straight into a buffer from :meth:`take` (``Dataset.read_direct``)
    or copy them into one with :meth:`fill`; whoever consumes the frame gives the buffer back
    with :meth:`give_back` once the engine is done with it. At most ``capacity`` buffers
    exist, lent or idle: when all are lent :meth:`take` returns None and :meth:`fill` returns
    its argument, so memory stays bounded and a reader never waits for a buffer (no deadlock
    with bounded queues). A lent buffer that is dropped (a read error) is forgotten and its
    place freed. Thread-safe.

    Parameters
    ----------
    capacity : int
        Most buffers alive at once.
    allocate : callable
        ``allocate(shape, dtype) -> numpy.ndarray``: a new C-contiguous buffer (page-locked
        memory for OpenCL). When it raises :class:`~azfilter.errors.AzfilterError` once, the
        ring gives no buffers from then on (the callers use their own arrays).
    """

    def __init__(self, capacity: int, allocate: Callable[[tuple[int, ...], np.dtype],
                                                           np.ndarray]):
        if isinstance(capacity, bool) or int(capacity) < 0:
            raise AzfilterError(f"buffer capacity must be >= 0, got {capacity!r}")
        self.capacity = int(capacity)
        self._allocate = allocate
        self._idle: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        # buffers handed out, by id; one dropped by its borrower disappears from here
        self._lent: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self._failed = False

    def __len__(self) -> int:
        """Buffers alive (lent and idle)."""
        with self._lock:
            return self._count()

    @property
    def lent(self) -> int:
        """Buffers lent out now (not given back, not dropped)."""
        with self._lock:
            return len(self._lent)

    def _count(self) -> int:
        return len(self._lent) + sum(len(items) for items in self._idle.values())

    def take(self, shape: Iterable[int], dtype: Any) -> np.ndarray | None:
        """A buffer of ``shape`` and ``dtype`` (uninitialised), or None when all are lent.

        An idle buffer of another shape or dtype is dropped to make room when needed.
        """
        key = (tuple(int(n) for n in shape), np.dtype(dtype).str)
        with self._lock:
            idle = self._idle.get(key)
            buffer = idle.pop() if idle else None
            if buffer is None and not self._failed:
                if self._count() >= self.capacity:
                    for items in self._idle.values():
                        if items:
                            items.pop()
                            break
                if self._count() < self.capacity:
                    try:
                        buffer = self._allocate(key[0], np.dtype(key[1]))
                    except AzfilterError:
                        self._failed = True
            if buffer is not None:
                self._lent[id(buffer)] = buffer
            return buffer

    def is_lent(self, array: Any) -> bool:
        """Whether ``array`` is a buffer of this ring now lent out."""
        return self._lent.get(id(array)) is array

    def fill(self, data: np.ndarray) -> np.ndarray:
        """``data`` copied into a buffer; ``data`` itself when it is a lent buffer already,
        is not a numeric array, or no buffer is free."""
        return fill_buffer(self, data)

    def give_back(self, array: Any) -> None:
        """Return a buffer from :meth:`take` or :meth:`fill` (anything else is ignored)."""
        with self._lock:
            if self._lent.get(id(array)) is array:
                del self._lent[id(array)]
                self._idle.setdefault((array.shape, array.dtype.str), []).append(array)


class Engine(ABC):
    """Per-bin sums of one lookup table (see ``docs/internals.md``, "Engine interface").

    Subclasses take ``(csr, pixel_norm, dark, dummy, delta_dummy, threads=None, device=None)``
    and implement the three single-frame operations. Every operation returns
    :class:`~azfilter.backends.BinSums` and raises :class:`~azfilter.errors.AzfilterError`
    for a frame or an option a user got wrong.
    """

    #: backend name (``"python"``, ``"cython"``, ``"opencl"``)
    name: str = ""

    @abstractmethod
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """Weighted mean per bin (no rejection).

        Parameters
        ----------
        raw : numpy.ndarray
            The frame (any shape with the detector's pixel count), in its own dtype.
        error_model : str
            ``"poisson"``, ``"azimuthal"``, ``"hybrid"`` or ``"variance"``.
        variance : numpy.ndarray, optional
            Per-pixel variance, required by the ``"variance"`` model.
        """

    @abstractmethod
    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Iterative azimuthal sigma-clipping per bin (``N`` is the number of kept pixels).

        The result carries :class:`~azfilter.backends.sums.OutlierSums` (``outliers``).

        Parameters
        ----------
        raw : numpy.ndarray
            The frame, in its own dtype.
        thres : float
            Threshold in standard deviations (raised to Chauvenet's when larger).
        max_iter : int
            Most clipping passes.
        error_model : str
            ``"azimuthal"``, ``"hybrid"``, ``"poisson"`` or ``"variance"``.
        variance : numpy.ndarray, optional
            Per-pixel variance, required by the ``"variance"`` model.
        pick : float
            Threshold of the outlier statistics' ``picked`` count, in σ of the bin.
        """

    @abstractmethod
    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Average of the fragments between two weighted quantiles of each bin.

        The result carries :class:`~azfilter.backends.sums.OutlierSums` (``outliers``; the
        selected fragments are the kept ones).

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
        """

    def process_many(self, frames: Iterable[tuple[Any, np.ndarray]], operation: str,
                     params: Mapping[str, Any]) -> Iterator[tuple[Any, BinSums | Exception]]:
        """Run one operation over a stream of tagged frames.

        Parameters
        ----------
        frames : iterable of (tag, numpy.ndarray)
            The frames, each with a tag of the caller's (a frame index, a file name...).
        operation : str
            ``"integrate"``, ``"sigma_clip"`` or ``"medfilt"``.
        params : mapping
            The keyword arguments of that method besides ``raw`` (``error_model`` always,
            ``variance`` optional; ``thres`` and ``max_iter`` for sigma_clip, ``quant_min``
            and ``quant_max`` for medfilt, ``pick`` optional for both). Checked once, here.

        Returns
        -------
        iterator of (tag, BinSums or Exception)
            One item per frame, in input order. A frame that fails (wrong size, unsupported
            dtype, an engine error) gives ``(tag, exception)`` and the stream goes on.

        Raises
        ------
        AzfilterError
            At once, for an unknown operation or missing parameters.
        """
        checked = check_operation(operation, params)
        return self._stream(frames, operation, checked)

    def _stream(self, frames: Iterable[tuple[Any, np.ndarray]], operation: str,
                params: dict[str, Any]) -> Iterator[tuple[Any, BinSums | Exception]]:
        """The plain loop: one frame after the other, nothing overlaps."""
        method = getattr(self, operation)
        for tag, raw in frames:
            try:
                sums = method(raw, **params)
            except Exception as err:  # noqa: BLE001 - one bad frame must not end the stream
                yield tag, err
            else:
                yield tag, sums

    @staticmethod
    def host_array(shape: Iterable[int], dtype: Any, device: str | None = None) -> np.ndarray:
        """A new uninitialised frame array that engines of this backend read fastest.

        Plain numpy memory here; page-locked memory of ``device`` for OpenCL.
        """
        return np.empty(tuple(int(n) for n in shape), dtype=dtype)

    def host_buffers(self, capacity: int) -> FrameBufferRing:
        """A bounded ring of ``capacity`` reusable frame buffers for this engine.

        Parameters
        ----------
        capacity : int
            Most buffers alive at once.

        Returns
        -------
        FrameBufferRing
        """
        return FrameBufferRing(capacity, self.host_array)
