"""Several OpenCL devices as one engine: frames spread over one :class:`OpenCLEngine` each.

``--device 0:0,0:1`` or ``--device all`` (every GPU) gives a :class:`MultiDeviceEngine` in one
process: the Python API, and the command when it runs without worker processes (short runs,
``AZFILTER_OPENCL_PROCESSES=1``; otherwise each worker process runs one device's engine:
``azfilter/pipeline/workers.py``, because one process's interpreter lock cannot feed even one
GPU). It
owns one :class:`~.engine.OpenCLEngine` per device (each with its own context, queues, copy of
the lookup table and staging buffers) and feeds each from a worker thread running that
engine's own :meth:`~.engine.OpenCLEngine.process_many`, so every device overlaps uploads and
kernels exactly as it does alone. The command's pipeline does not change: the multi-device
engine is an :class:`~azfilter.backends.base.Engine` whose ``process_many`` yields
``(tag, sums | exception)`` in input order.

Scheduling. The thread that iterates ``process_many`` reads the input and hands each frame to
the device holding the fewest frames, preferring the device whose page-locked memory the frame
lies in (:class:`DeviceRings` lends readers such buffers, device by device, so frames reach
each GPU by DMA). Every device holds at most ``in_flight`` frames (4, plus the engine's copy
threads when it stages pageable frames) and results wait at most for the whole window to be
yielded in order, so memory stays bounded whatever the stack length. A device whose engine
needs one more frame before it can return the oldest result gets it even when the window is
full (an engine keeps a frame or two in flight until the next arrives), so the stream never
deadlocks.

Failures. A frame's own error (wrong size, unsupported dtype, a corrupt chunk) is its result,
as with one device. An OpenCL error (``pyopencl.Error``: a device lost, out of resources) is
the device's: the frame is retried once on another device; when the retry succeeds, the
failing device is taken out of the pool for the rest of the engine's life (one warning naming
it) and the frames it still holds go to the others. A frame that fails with an OpenCL error on
two devices keeps that error (both devices stay: the frame, not a device, may be at fault). A
device that cannot start (no memory for the table, a driver error) is left out with one
warning naming it; the engine fails only when none starts. Items are passed to the device
engines unchanged (arrays, or whatever else those engines accept).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import AzfilterError
from ..base import Engine, FrameBufferRing, fill_buffer
from ..sums import BinSums
from .devices import select_devices
from .engine import OpenCLEngine
from .hostmem import is_pinned, pinned_array

logger = logging.getLogger(__name__)

#: frames one device holds when they arrive page-locked: the engine overlaps the upload of one
#: frame with the kernels of the one before, and two more wait so that it never runs dry
PINNED_IN_FLIGHT = 4

_PENDING = object()   # a frame's result, before it is back


def device_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "this device failed" rather than "this frame is bad"."""
    try:
        import pyopencl as cl
    except ImportError:   # without pyopencl there is no OpenCL engine to fail
        return ()
    return (cl.Error,)


def describe_device(info: dict) -> str:
    """``"0:1 (NVIDIA H200)"``: a device's id and name, for messages."""
    return f"{info['id']} ({info['name']})"


@dataclass
class _Frame:
    """One input frame in the window, until its result is yielded."""

    tag: Any
    item: Any
    worker: int = -1                   # the worker it was last given to
    result: Any = _PENDING             # BinSums or Exception once final
    failed_on: int | None = None       # worker whose OpenCL error made it retry


@dataclass
class _Worker:
    """One device's engine, its thread and its share of the window."""

    index: int                         # position in MultiDeviceEngine.engines
    engine: Any
    capacity: int                      # most frames held (inbox and engine)
    inbox: deque = field(default_factory=deque)   # frame numbers not yet taken by the engine
    holding: set = field(default_factory=set)     # frame numbers given, result not back
    waiting: bool = False              # its engine waits for a frame and the inbox is empty
    closed: bool = False               # no more frames: the engine finishes what it holds
    live: bool = True
    thread: threading.Thread | None = None


class DeviceRings:
    """Page-locked frame buffers of several devices: one :class:`FrameBufferRing` each.

    Readers take a buffer before anyone knows which device will reduce the frame: :meth:`take`
    lends from the device with the fewest buffers lent (the least busy, since a buffer comes
    back when its frame's result is yielded), and :class:`MultiDeviceEngine` gives a frame to
    the device its buffer belongs to when that device has room. Same interface as
    :class:`FrameBufferRing`; thread-safe.

    Parameters
    ----------
    capacity : int
        Most buffers alive at once per device.
    devices : sequence of str
        Device ids (``"P:D"``), each once.
    """

    def __init__(self, capacity: int, devices: Sequence[str]):
        if not devices:
            raise AzfilterError("DeviceRings needs at least one device")
        self.devices = list(devices)
        self.rings = [FrameBufferRing(capacity, _pinned_allocator(device))
                      for device in self.devices]
        self.capacity = capacity * len(self.rings)
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Buffers alive (lent and idle), all devices."""
        return sum(len(ring) for ring in self.rings)

    @property
    def lent(self) -> int:
        """Buffers lent out now, all devices."""
        return sum(ring.lent for ring in self.rings)

    def take(self, shape: Iterable[int], dtype: Any) -> np.ndarray | None:
        """A buffer of the device with the fewest lent (round robin among equals), or None
        when every device's buffers are lent."""
        shape = tuple(int(n) for n in shape)
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.rings)
        order = sorted(range(len(self.rings)),
                       key=lambda k: (self.rings[k].lent, (k - start) % len(self.rings)))
        for k in order:
            buffer = self.rings[k].take(shape, dtype)
            if buffer is not None:
                return buffer
        return None

    def is_lent(self, array: Any) -> bool:
        """Whether ``array`` is a buffer of one of the rings, now lent out."""
        return any(ring.is_lent(array) for ring in self.rings)

    def fill(self, data: np.ndarray) -> np.ndarray:
        """``data`` copied into a buffer (see :meth:`FrameBufferRing.fill`)."""
        return fill_buffer(self, data)

    def give_back(self, array: Any) -> None:
        """Return a buffer to the ring that lent it (anything else is ignored)."""
        for ring in self.rings:
            if ring.is_lent(array):
                ring.give_back(array)
                return


def _pinned_allocator(device: str) -> Callable[[tuple[int, ...], np.dtype], np.ndarray]:
    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return pinned_array(shape, dtype, device=device)
    return allocate


def device_rings(capacity: int, device: str | list[str] | None) -> DeviceRings:
    """The page-locked frame buffers for a ``--device`` that names several devices.

    Parameters
    ----------
    capacity : int
        Buffers the caller needs in all (its read-ahead); each device gets its share plus
        :data:`PINNED_IN_FLIGHT` for the frames it holds.
    device : str or list of str
        As :func:`~.devices.select_devices` takes it.

    Returns
    -------
    DeviceRings
    """
    ids = list(dict.fromkeys(info["id"] for info, _ in select_devices(device)))
    per_device = math.ceil(capacity / len(ids)) + PINNED_IN_FLIGHT
    rings = DeviceRings(per_device, ids)
    logger.info("frame buffers: %d page-locked per device on %s (%d in all)", per_device,
                ", ".join(ids), rings.capacity)
    return rings


def open_engine(csr, pixel_norm: np.ndarray, dark: np.ndarray | None, dummy: float | None,
                delta_dummy: float, threads: int | None = None,
                device: str | list[str] | None = None, **options: Any) -> Engine:
    """An OpenCL engine for ``device``: one :class:`OpenCLEngine` when it names one device,
    a :class:`MultiDeviceEngine` when it names several.

    Parameters are those of :class:`OpenCLEngine`; ``device`` may name several devices
    (:func:`~.devices.select_devices`).
    """
    resolved = select_devices(device)
    if len(resolved) == 1:
        return OpenCLEngine(csr, pixel_norm, dark, dummy, delta_dummy, threads=threads,
                            device=resolved[0][0]["id"], **options)
    return MultiDeviceEngine(csr, pixel_norm, dark, dummy, delta_dummy, threads=threads,
                             device=device, **options)


class MultiDeviceEngine(Engine):
    """One :class:`OpenCLEngine` per device; ``process_many`` spreads frames over them.

    Parameters
    ----------
    csr, pixel_norm, dark, dummy, delta_dummy, threads
        As for :class:`OpenCLEngine` (``threads``: copy threads of each device's engine).
    device : str or list of str
        Several devices (``"0:0,0:1"``, ``["0:0", "0:1"]``, ``"all"``: every GPU); see
        :func:`~.devices.select_devices`. A device named twice gets two engines.
    in_flight : int, optional
        Most frames one device holds; default :data:`PINNED_IN_FLIGHT`, plus the engine's
        copy threads when it stages pageable frames.
    **options
        Keyword options of :class:`OpenCLEngine` (``workgroup_size``, ``fp64``...).

    Attributes
    ----------
    engines : list of OpenCLEngine
        The engines that started, in the order the devices were named.
    devices : list of dict
        Their device descriptions (:func:`~.devices.list_devices`).
    retired : dict
        Engine index -> the OpenCL error that took it out of the pool.
    frame_counts : list of int
        Results each engine produced (all streams so far).

    Raises
    ------
    AzfilterError
        For a device that does not exist, or when no device starts (the message names each
        with its error). A device that fails to start while others do is left out with a
        warning.

    Notes
    -----
    Not thread-safe, like every engine: one thread iterates ``process_many``. The frames
    given to ``process_many`` must stay unchanged until their result is yielded (the
    pipeline's ring gives a buffer back only then).
    """

    name = "opencl"
    #: like :class:`OpenCLEngine`: compressed chunks are passed to the device engines as they
    #: are, and decoded there
    decodes_chunks = True

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | list[str] | None = None, *, in_flight: int | None = None,
                 **options: Any):
        if in_flight is not None and (isinstance(in_flight, bool) or int(in_flight) < 1):
            raise AzfilterError(f"in_flight must be a positive integer, got {in_flight!r}")
        resolved = [info for info, _ in select_devices(device)]

        def start(info: dict) -> Any:
            try:
                return OpenCLEngine(csr, pixel_norm, dark, dummy, delta_dummy,
                                    threads=threads, device=info["id"], **options)
            except Exception as err:  # noqa: BLE001 - reported by device below
                return err

        # tables go to every device at once (each upload waits on its own PCIe link)
        with ThreadPoolExecutor(max_workers=len(resolved),
                                thread_name_prefix="azfilter-device-start") as pool:
            started = list(pool.map(start, resolved))
        self.engines: list[OpenCLEngine] = []
        self.devices: list[dict] = []
        failed = []
        for info, engine in zip(resolved, started, strict=True):
            if isinstance(engine, Exception):
                failed.append(f"{describe_device(info)}: {engine}")
            else:
                self.engines.append(engine)
                self.devices.append(info)
        if not self.engines:
            raise AzfilterError("no OpenCL device could start: " + "; ".join(failed))
        for message in failed:
            logger.warning("OpenCL device %s; continuing on %d device(s)", message,
                           len(self.engines))
        self.in_flight = None if in_flight is None else int(in_flight)
        self.retired: dict[int, BaseException] = {}
        self.frame_counts = [0] * len(self.engines)
        self._last_error: dict[int, BaseException] = {}   # engine index -> its last OpenCL error
        first = self.engines[0]
        self.npt, self.npix, self.shape = first.npt, first.npix, first.shape
        self._device_errors = device_error_types()
        logger.info("OpenCL engines: %s", "; ".join(
            f"{describe_device(info)}, at most {self._capacity(engine)} frames in flight"
            for info, engine in zip(self.devices, self.engines, strict=True)))

    def _capacity(self, engine: Any) -> int:
        if self.in_flight is not None:
            return self.in_flight
        copies = int(getattr(engine, "copy_threads", 0)) if getattr(engine, "staging", False) \
            else 0
        return PINNED_IN_FLIGHT + copies

    def _live_engine(self) -> Any:
        for index, engine in enumerate(self.engines):
            if index not in self.retired:
                return engine
        return self.engines[0]

    # ------------------------------------------------------------------ one frame
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """One frame, on the first device still in the pool."""
        return self._live_engine().integrate(raw, error_model, variance)

    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None) -> BinSums:
        """One frame, on the first device still in the pool."""
        return self._live_engine().sigma_clip(raw, thres, max_iter, error_model, variance)

    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None) -> BinSums:
        """One frame, on the first device still in the pool."""
        return self._live_engine().medfilt(raw, quant_min, quant_max, error_model, variance)

    @staticmethod
    def host_array(shape: Iterable[int], dtype: Any, device: Any = None) -> np.ndarray:
        """Page-locked memory of the first device that ``device`` names."""
        first = select_devices(device)[0][0]["id"]
        return pinned_array(tuple(int(n) for n in shape), dtype, device=first)

    def host_buffers(self, capacity: int) -> DeviceRings:
        """Page-locked frame buffers, ``capacity`` per device (each device once)."""
        ids = list(dict.fromkeys(info["id"] for info in self.devices))
        return DeviceRings(capacity, ids)

    # ------------------------------------------------------------------ the stream
    def _stream(self, frames: Iterable[tuple[Any, Any]], operation: str,
                params: dict[str, Any]) -> Iterator[tuple[Any, BinSums | Exception]]:
        """Spread the frames over the devices; yield results in input order."""
        cv = threading.Condition()
        window: dict[int, _Frame] = {}
        workers = [_Worker(index, engine, self._capacity(engine))
                   for index, engine in enumerate(self.engines)]
        for worker in workers:
            worker.live = worker.index not in self.retired
        no_device: list[BaseException] = []   # why no device is left (a crashed last one)
        finished = False                        # every frame yielded, or the stream abandoned

        def live() -> list[_Worker]:
            return [worker for worker in workers if worker.live]

        def give(worker: _Worker, number: int) -> None:
            window[number].worker = worker.index
            worker.inbox.append(number)
            worker.holding.add(number)

        def least_busy(candidates: list[_Worker]) -> _Worker:
            return min(candidates, key=lambda worker: (len(worker.holding), worker.index))

        def retire(worker: _Worker, error: BaseException) -> None:
            """Take a failing device out of the pool; its waiting frames go elsewhere."""
            if not worker.live:
                return
            others = [other for other in live() if other is not worker]
            if not others:
                return   # the last device stays: its errors are the frames' errors
            worker.live = False
            self.retired[worker.index] = error
            logger.warning("OpenCL device %s failed (%s: %s); its frames go to the other "
                           "%d device(s)", describe_device(self.devices[worker.index]),
                           type(error).__name__, error, len(others))
            while worker.inbox:
                number = worker.inbox.popleft()
                worker.holding.discard(number)
                give(least_busy(others), number)
            worker.closed = True

        def returned(worker: _Worker, number: int, outcome: Any, crashed: bool = False) -> None:
            """A device's result for frame ``number`` (under the lock)."""
            worker.holding.discard(number)
            entry = window[number]
            if isinstance(outcome, BaseException) and (
                    crashed or isinstance(outcome, self._device_errors)):
                others = [other for other in live()
                          if other is not worker and other.index != entry.failed_on]
                if entry.failed_on is None and others:
                    entry.failed_on = worker.index   # retry once, elsewhere
                    give(least_busy(others), number)
                    return
            elif entry.failed_on is not None and not isinstance(outcome, BaseException):
                # it failed with an OpenCL error on another device and works here: that
                # device is at fault
                retire(workers[entry.failed_on], self._last_error.get(entry.failed_on)
                       or RuntimeError("OpenCL error"))
            entry.result = outcome
            self.frame_counts[worker.index] += 1

        def feed(worker: _Worker) -> Iterator[tuple[int, Any]]:
            while True:
                with cv:
                    while not worker.inbox and not worker.closed:
                        worker.waiting = True
                        cv.notify_all()
                        cv.wait()
                    worker.waiting = False
                    if not worker.inbox:
                        return
                    number = worker.inbox.popleft()
                    item = window[number].item
                yield number, item

        def work(worker: _Worker) -> None:
            """The device's thread: its engine's stream over the frames it is given; once the
            input is over, a new stream for frames retried here, until the window is done."""
            while True:
                try:
                    for number, outcome in worker.engine.process_many(feed(worker), operation,
                                                                      params):
                        with cv:
                            if isinstance(outcome, self._device_errors):
                                self._last_error[worker.index] = outcome
                            returned(worker, number, outcome)
                            cv.notify_all()
                except BaseException as err:  # noqa: BLE001 - the device's stream broke
                    with cv:
                        crashed(worker, err)
                        cv.notify_all()
                    return
                with cv:
                    while not worker.inbox and worker.live and not finished:
                        cv.wait()
                    if not worker.inbox or not worker.live:
                        return

        def crashed(worker: _Worker, err: BaseException) -> None:
            """A device's stream raised (under the lock): the device leaves the pool; the
            frames in its engine are retried elsewhere, those not taken yet are moved."""
            self._last_error[worker.index] = err
            if any(other is not worker for other in live()):
                retire(worker, err)
            else:
                worker.live = False
                no_device.append(err)
            for number in sorted(worker.holding - set(worker.inbox)):
                returned(worker, number, err, crashed=True)
            for number in list(worker.inbox):   # the last device: nowhere to go
                worker.holding.discard(number)
                window[number].result = self._no_device_error(err)
            worker.inbox.clear()

        def may_read(next_number: int, oldest: int) -> _Worker | bool:
            """Whether to read the next input now: True, or the stalled worker that needs it."""
            running = live()
            if not running:
                return True   # it fails at once
            if next_number - oldest < sum(worker.capacity for worker in running) and any(
                    len(worker.holding) < worker.capacity for worker in running):
                return True
            entry = window.get(oldest)
            if entry is not None and entry.result is _PENDING and entry.worker >= 0:
                worker = workers[entry.worker]
                if worker.live and worker.waiting and not worker.inbox:
                    return worker   # its engine needs one more frame to return the oldest
            return False

        for worker in workers:
            if worker.live:
                worker.thread = threading.Thread(
                    target=work, args=(worker,), daemon=True,
                    name=f"azfilter-device-{self.devices[worker.index]['id']}")
                worker.thread.start()
        iterator = iter(frames)
        next_number = 0     # frames read
        oldest = 0          # frames yielded
        exhausted = False
        try:
            while True:
                ready: list[tuple[Any, Any]] = []
                read = False
                with cv:
                    while True:
                        while oldest < next_number and window[oldest].result is not _PENDING:
                            entry = window.pop(oldest)
                            ready.append((entry.tag, entry.result))
                            oldest += 1
                        if ready or (exhausted and oldest == next_number):
                            break
                        if not exhausted:
                            stalled = may_read(next_number, oldest)
                            if stalled:
                                read = True
                                break
                        cv.wait()
                if ready:
                    yield from ready
                    continue
                if not read:
                    return   # every frame read and yielded
                try:
                    tag, item = next(iterator)
                except StopIteration:
                    with cv:
                        exhausted = True
                        for worker in workers:
                            worker.closed = True
                        cv.notify_all()
                    continue
                with cv:
                    window[next_number] = _Frame(tag, item)
                    running = live()
                    if not running:
                        window[next_number].result = self._no_device_error(
                            no_device[0] if no_device else None)
                    else:
                        target = self._choose(item, running, may_read(next_number, oldest))
                        give(target, next_number)
                    next_number += 1
                    cv.notify_all()
        finally:
            with cv:
                finished = True
                for worker in workers:
                    worker.closed = True
                    for number in worker.inbox:
                        worker.holding.discard(number)
                    worker.inbox.clear()
                cv.notify_all()
            for worker in workers:
                if worker.thread is not None:
                    worker.thread.join()

    def _choose(self, item: Any, running: list[_Worker], stalled: _Worker | bool) -> _Worker:
        """The device for a new frame (under the lock): the stalled one that needs it, else
        the least busy with room, preferring the device whose page-locked memory holds it."""
        if isinstance(stalled, _Worker):
            return stalled
        room = [worker for worker in running if len(worker.holding) < worker.capacity]
        candidates = room or running
        # a frame, or the buffer a compressed chunk was read into (CompressedChunk.buffer)
        host = item if isinstance(item, np.ndarray) else getattr(item, "buffer", None)
        if isinstance(host, np.ndarray):
            own = [worker for worker in candidates
                   if is_pinned(host, worker.engine.context)]
            candidates = own or candidates
        return min(candidates, key=lambda worker: (len(worker.holding), worker.index))

    def _no_device_error(self, error: BaseException | None) -> AzfilterError:
        names = ", ".join(describe_device(info) for info in self.devices)
        reason = f": {type(error).__name__}: {error}" if error is not None else ""
        return AzfilterError(f"no OpenCL device left of {names}{reason}")
