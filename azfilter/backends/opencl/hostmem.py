"""Page-locked host memory for OpenCL transfers, and the threads that copy frames into it.

A frame in page-locked memory goes to a discrete GPU by DMA at PCIe speed; a frame in ordinary
(pageable) memory is first copied into page-locked memory (by the driver with one thread, or
by the engine's staging with several: :func:`copy_piece` on :func:`copy_pool`). The address
ranges of every live allocation are recorded so that :func:`is_pinned` can tell a frame that
needs no staging.
"""

from __future__ import annotations

import math
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ...errors import AzfilterError
from .devices import device_context, import_pyopencl, select_device

_MAP_QUEUES: dict[int, Any] = {}          # context -> queue that maps page-locked buffers
# page-locked host allocations alive: start address -> (end address, context int_ptr);
# freed ones are queued by their finalizer (which may run inside any allocation, in any
# thread) and dropped under the lock
_PINNED_RANGES: dict[int, tuple[int, int]] = {}
_FREED_RANGES: list[int] = []
_RANGES_LOCK = threading.Lock()
_COPY_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


class _PinnedHost:
    """Owner of one page-locked host allocation; arrays handed out are views of it.

    numpy keeps this object alive (as the arrays' ``base``) while any view exists; when the
    last one goes, the allocation is unmapped and freed and its address range forgotten.
    """

    __slots__ = ("buffer", "mapped", "__weakref__")

    def __init__(self, buffer: Any, mapped: np.ndarray):
        self.buffer = buffer      # the OpenCL buffer (ALLOC_HOST_PTR)
        self.mapped = mapped      # its mapping; the MemoryMap behind it unmaps on release

    @property
    def __array_interface__(self) -> dict:
        return self.mapped.__array_interface__


def _forget_pinned(start: int) -> None:
    _FREED_RANGES.append(start)   # list.append is atomic: no lock in a finalizer


def pinned_ranges() -> list[tuple[int, int, int]]:
    """(start, end, context int_ptr) of every live page-locked allocation."""
    with _RANGES_LOCK:
        while _FREED_RANGES:
            _PINNED_RANGES.pop(_FREED_RANGES.pop(), None)
        return [(start, end, owner) for start, (end, owner) in list(_PINNED_RANGES.items())]


def pinned_in_context(cl, context, queue, shape: Any, dtype: Any) -> np.ndarray:
    """A new page-locked host array of ``context`` (see :func:`pinned_array`)."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    try:
        buffer = cl.Buffer(context, cl.mem_flags.ALLOC_HOST_PTR | cl.mem_flags.READ_WRITE,
                           nbytes)
        mapped, _ = cl.enqueue_map_buffer(queue, buffer, cl.map_flags.READ | cl.map_flags.WRITE,
                                          0, shape, dtype)
    except cl.Error as err:
        raise AzfilterError(f"cannot allocate {nbytes} bytes of page-locked host memory for "
                            f"OpenCL ({err})") from err
    owner = _PinnedHost(buffer, mapped)
    array = np.asarray(owner)
    start = int(array.__array_interface__["data"][0])
    with _RANGES_LOCK:
        if start in _FREED_RANGES:   # an earlier allocation at this address, freed
            _FREED_RANGES.remove(start)
        _PINNED_RANGES[start] = (start + nbytes, int(context.int_ptr))
    weakref.finalize(owner, _forget_pinned, start)
    return array


def _map_queue(cl, context, device) -> Any:
    key = int(context.int_ptr)
    with _LOCK:
        if key not in _MAP_QUEUES:
            _MAP_QUEUES[key] = cl.CommandQueue(context, device)
        return _MAP_QUEUES[key]


def pinned_array(shape: int | tuple[int, ...], dtype: Any,
                 device: str | None = None) -> np.ndarray:
    """A new host array in page-locked memory, uploaded to ``device`` at full DMA speed.

    Readers that decode frames straight into such arrays (h5py's ``Dataset.read_direct``, a
    copy out of a network receive buffer) spare every upload the copy into the driver's own
    page-locked memory. Allocation is slow (it locks the pages): allocate a few and reuse them.

    Parameters
    ----------
    shape : int or tuple of int
    dtype : numpy dtype
    device : str, optional
        As for :class:`OpenCLEngine` (``"gpu"``, ``"cpu"``, ``"P:D"``, None: the best).

    Returns
    -------
    numpy.ndarray
        Uninitialised, C-contiguous; the memory stays valid while the array (or a view of it)
        exists.

    Raises
    ------
    AzfilterError
        When OpenCL or the device is missing, or the memory cannot be allocated.
    """
    cl = import_pyopencl()
    info, dev = select_device(device)
    context = device_context(cl, info, dev)
    return pinned_in_context(cl, context, _map_queue(cl, context, dev), shape, dtype)


def is_pinned(array: np.ndarray, context: Any = None) -> bool:
    """Whether ``array`` lies in memory from :func:`pinned_array` (of ``context``, if given)."""
    interface = getattr(array, "__array_interface__", None)
    if not interface or not isinstance(array, np.ndarray):
        return False
    start = int(interface["data"][0])
    stop = start + array.nbytes
    wanted = None if context is None else int(context.int_ptr)
    return any(first <= start and stop <= last and wanted in (None, owner)
               for first, last, owner in pinned_ranges())


def copy_pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _COPY_POOLS.get(threads)
        if pool is None:
            pool = _COPY_POOLS[threads] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="azfilter-staging")
        return pool


def copy_piece(source: np.ndarray, target: np.ndarray, start: int, stop: int,
                columns: int) -> None:
    """Copy flat elements [start, stop) of ``source`` into ``target`` (flat), converting.

    ``source`` is either flat, or 2-D with ``columns`` columns and piece bounds on row
    boundaries (a strided frame). numpy releases the GIL: pieces copy in parallel.
    """
    if source.ndim == 1:
        np.copyto(target, source[start:stop], casting="unsafe")
    else:
        np.copyto(target.reshape(-1, columns), source[start // columns:stop // columns],
                  casting="unsafe")

