"""A parallel, ordered frame stream: :func:`iter_frames`.

One planner thread walks the inputs (opening files, finding each frame's HDF5 chunk) and hands
one task per frame to a pool of decoder threads; the caller receives the results in plan order.
Decoding runs outside the GIL and outside h5py's lock where the format allows it:

- HDF5 datasets chunked one frame per chunk, with a filter pipeline :mod:`.chunks` decodes:
  the chunk bytes are read with ``os.pread`` and decoded in the pool (:func:`.chunks.decode_chunk`);
- other HDF5 datasets: h5py reads them, one at a time (h5py has one global lock);
- single-frame fabio files (CBF, EDF, TIFF): each is opened and decoded in the pool (fabio's
  byte-offset decoder, zlib, bz2 and md5 release the GIL; its header parsing does not);
- multi-frame fabio files: their frames are read one after the other (one fabio object per
  file, not thread-safe), still in the pool.

Memory is bounded: at most ``read_ahead`` decoded frames exist that the caller has not taken,
whatever the length of the stack.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import FrameReadError
from .chunks import (
    FILTER_BITSHUFFLE,
    ChunkError,
    CompressedChunk,
    DirectLayout,
    NeedsH5py,
    cached_chunk_table,
    chunk_coordinates,
    chunk_location,
    chunk_scratch,
    decode_chunk,
    direct_layout,
    read_bslz4_chunk,
    read_exactly,
)
from .common import Frame, _check_image, _exception_reason
from .fabio_formats import _FabioSource
from .hdf5 import _Block, _Hdf5Source
from .inputs import InputItem, _as_spec_list, _expand_one, _selected
from .stream import _block_indices, _check_errors_mode

logger = logging.getLogger(__name__)

__all__ = ["iter_frames"]

_END = object()


def _allocator(buffer: Callable | None) -> Callable[[tuple, Any], np.ndarray]:
    """``buffer`` made total: a plain array when it is None or returns None."""
    def allocate(shape: tuple, dtype: Any) -> np.ndarray:
        if buffer is not None:
            data = buffer(tuple(shape), np.dtype(dtype))
            if data is not None:
                return data
        return np.empty(shape, dtype)
    return allocate


class _Shared:
    """An open source (HDF5 file and its chunk files, or a fabio file) used by several frame
    tasks: closed when the planner is done with it and its last task has run."""

    def __init__(self, source: Any = None):
        self.source = source
        self.lock = threading.Lock()        # the source object is not thread-safe
        self._users = 1                      # the planner
        self._count_lock = threading.Lock()
        self._fds: dict[str, int] = {}

    def fd(self, filename: str) -> int:
        with self._count_lock:
            fd = self._fds.get(filename)
            if fd is None:
                fd = self._fds[filename] = os.open(filename, os.O_RDONLY)
            return fd

    def take(self) -> None:
        with self._count_lock:
            self._users += 1

    def release(self) -> None:
        with self._count_lock:
            self._users -= 1
            last = self._users == 0
        if last:
            self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        if self.source is not None:
            with self.lock:
                try:
                    self.source.close()
                except Exception:            # closing must not hide the frames' own errors
                    pass


class _Task:
    """One planned frame: ``run()`` returns its Frame or FrameReadError (never raises)."""

    def __init__(self, source: str, index: int | None, work: Callable[[], Any] | None = None,
                 shared: _Shared | None = None, result: Any = None):
        self.source, self.index = source, index
        self.work, self.shared, self.result = work, shared, result
        if shared is not None:
            shared.take()

    def run(self) -> Frame | FrameReadError:
        try:
            if self.work is None:
                return self.result
            return self.work()
        except FrameReadError as exc:
            return exc
        except Exception as exc:             # noqa: BLE001 - one bad frame, not the stream
            return FrameReadError(self.source, self.index, _exception_reason(exc))
        finally:
            self.discard()

    def discard(self) -> None:
        """Let go of the shared source (also for a task that will never run)."""
        shared, self.shared = self.shared, None
        if shared is not None:
            shared.release()


def _whole_file_failure(item: InputItem, error: FrameReadError) -> list[_Task]:
    """One error per planned frame when the item's frame count is known, else one error."""
    if item._nframes is None:
        return [_Task(error.source, None, result=error)]
    return [_Task(error.source, index, result=FrameReadError(error.source, index, error.reason))
            for index in _selected(item, item._nframes)]


# --------------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------------


def _hdf5_tasks(item: InputItem, allocate: Callable,
                device_decode: bool = False) -> Iterator[_Task]:
    try:
        h5 = _Hdf5Source(item.path, item.h5path, item._layout)
    except FrameReadError as exc:
        yield from _whole_file_failure(item, exc)
        return
    shared = _Shared(h5)
    try:
        item._nframes, item._layout = h5.nframes, h5.layout
        wanted = _selected(item, h5.nframes)
        for block in h5.blocks:
            if block.error is not None:
                if item.frames is None or block.first in wanted:
                    yield _Task(h5.source, None, result=FrameReadError(h5.source, None,
                                                                       block.error))
                continue
            indices = _block_indices(block, wanted)
            if not indices:
                continue
            with shared.lock:
                try:
                    dataset = h5._open_dataset(block)
                except Exception as exc:       # noqa: BLE001 - reported per frame below
                    dataset, opened_error = None, _exception_reason(exc, "HDF5")
                else:
                    opened_error = None
                header = h5.header
                layout = direct_layout(dataset) if dataset is not None else None
                # the chunks' places from one walk of the chunk index (None: one lookup per
                # frame below, as for a frame the walk did not see)
                table = cached_chunk_table(dataset, layout, len(indices)) \
                    if layout is not None and layout.pread else None
            for index in indices:
                if opened_error is not None:
                    yield _Task(h5.source, index,
                                result=FrameReadError(h5.source, index, opened_error))
                    continue
                local = index - block.first
                location: Any = _LOOK_UP if table is None else table.get(local, _LOOK_UP)
                if location is _LOOK_UP:
                    if layout is None:
                        location = None
                    elif not layout.pread:
                        location = _VIA_H5PY
                    else:
                        with shared.lock:
                            try:
                                location = chunk_location(dataset, layout, local)
                            except Exception:  # noqa: BLE001 - raw bytes through h5py instead
                                location = _VIA_H5PY
                yield _Task(h5.source, index, _hdf5_work(
                    h5, shared, block, index, header, layout, location, dataset, allocate,
                    device_decode), shared)
    finally:
        shared.release()


# a chunk location meaning: raw chunk bytes from h5py's read_direct_chunk, decoded here
_VIA_H5PY = "read_direct_chunk"
# a frame the chunk table does not know (or no table): its chunk is looked up on its own
_LOOK_UP = object()


def _hdf5_work(h5: _Hdf5Source, shared: _Shared, block: _Block, index: int, header: dict,
               layout, location, dataset, allocate: Callable,
               device_decode: bool = False) -> Callable[[], Frame]:
    """The task reading one HDF5 frame: chunk bytes by ``os.pread`` (``location`` = offset and
    size) or by ``read_direct_chunk`` (``_VIA_H5PY``), decoded outside h5py's lock; or the
    whole read through h5py (``location`` None, or a chunk the decoders leave to h5py).
    With ``device_decode``, a bitshuffle-LZ4 chunk read by ``os.pread`` is not decoded: the
    frame is a :class:`~.chunks.CompressedChunk` (its bytes and block table)."""
    source, nframes = h5.source, h5.nframes

    def through_h5py() -> Frame:
        with shared.lock:
            data = h5.read(block, index, allocate)
        return Frame(data, source, index, nframes, header)

    if location is None:
        return through_h5py

    def frame_memory() -> np.ndarray:
        out = allocate(layout.shape, layout.dtype)
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
                and out.shape == layout.shape and out.dtype == layout.dtype):
            out = np.empty(layout.shape, layout.dtype)
        return out

    def direct() -> Frame:
        # the decoded frame's buffer is taken only where a frame is decoded here: a chunk
        # handed to the device compressed holds a buffer of the ring already
        out = None
        try:
            if location == _VIA_H5PY:
                out = frame_memory()
                with shared.lock:
                    try:
                        mask, raw = dataset.id.read_direct_chunk(
                            chunk_coordinates(layout, index - block.first))
                    except Exception:          # noqa: BLE001 - unstored chunk: h5py's read
                        mask, raw = None, None
                if mask != 0:
                    raise NeedsH5py
                decode_chunk(raw, layout, out)
                return Frame(_check_image(out, source, index), source, index, nframes, header)
            offset, size = location
            fd = shared.fd(layout.filename)
            # integer frames only (what detectors write): float64 may need converting to
            # float32 for a device without doubles, which only the host path does
            if device_decode and layout.filters == (FILTER_BITSHUFFLE,) \
                    and layout.dtype.kind in "iu":
                return Frame(_read_compressed(fd, offset, size, layout, allocate), source,
                             index, nframes, header)
            out = frame_memory()
            if layout.filters == ():
                # uncompressed: read straight into the frame's memory
                if size != layout.nbytes:
                    raise ChunkError(f"uncompressed chunk of {size} bytes, "
                                     f"expected {layout.nbytes}")
                read_exactly(fd, size, offset, out)
            elif layout.filters == (FILTER_BITSHUFFLE,):
                # the block sizes walked as the chunk is read (while each piece is cached)
                chunk = chunk_scratch(size)
                blocks = read_bslz4_chunk(fd, size, offset, chunk, out.size,
                                          layout.dtype.itemsize)
                decode_chunk(chunk, layout, out, blocks=blocks)
            else:
                decode_chunk(read_exactly(fd, size, offset, chunk_scratch(size)), layout, out)
        except NeedsH5py:
            return through_h5py()
        except ChunkError as exc:
            raise FrameReadError(source, index, f"corrupt chunk: {exc}") from None
        except OSError as exc:
            raise FrameReadError(source, index, _exception_reason(exc, "HDF5")) from None
        return Frame(_check_image(out, source, index), source, index, nframes, header)

    return direct


def chunk_buffer_bytes(frame_bytes: int) -> int:
    """Bytes of the ring buffers compressed chunks are read into: the frame's size plus
    LZ4's worst-case growth (incompressible blocks) and the block headers, so that every
    chunk of a frame fits (a larger one, which a valid chunk cannot be, gets its own
    array)."""
    return frame_bytes + frame_bytes // 128 + 4096


def _read_compressed(fd: int, offset: int, size: int, layout: DirectLayout,
                     allocate: Callable) -> CompressedChunk:
    """One bitshuffle-LZ4 chunk read into a buffer of the caller's ring (page-locked memory
    for the OpenCL engine), with its block table (compiled walk, outside the GIL).

    Raises
    ------
    ChunkError
        When the chunk's header or block chain is wrong (one failed frame).
    """
    capacity = chunk_buffer_bytes(layout.nbytes)
    buffer = allocate((capacity,), np.uint8) if size <= capacity else None
    if not (isinstance(buffer, np.ndarray) and buffer.flags.c_contiguous
            and buffer.dtype == np.uint8 and buffer.size >= size):
        buffer = np.empty(size, np.uint8)
    elements = int(np.prod(layout.shape, dtype=np.int64))
    blocks = read_bslz4_chunk(fd, size, offset, buffer, elements, layout.dtype.itemsize)
    return CompressedChunk(buffer, size, blocks, layout.shape, layout.dtype)


# --------------------------------------------------------------------------------------------
# fabio formats
# --------------------------------------------------------------------------------------------


def _fabio_frame(reader: _FabioSource, index: int, allocate: Callable,
                 copy: bool) -> Frame:
    data, header = reader.read(index)
    if copy and reader.native is None:     # own CBF/EDF readers decode into allocate()'s buffer
        out = allocate(data.shape, data.dtype)
        np.copyto(out, data)
        data = out
    return Frame(data, reader.source, index, reader.nframes, header)


def _fabio_tasks(item: InputItem, allocate: Callable, copy: bool) -> Iterator[_Task]:
    try:
        nframes = item.nframes              # CBF: 1 without reading; EDF: its header
    except FrameReadError as exc:
        yield _Task(exc.source, None, result=exc)
        return
    indices = _selected(item, nframes)
    if nframes == 1:
        for index in indices:               # open, decode and close in the pool
            yield _Task(item.path, index, _single_fabio_work(item, index, allocate, copy))
        return

    shared = _Shared()
    state: dict[str, Any] = {}

    def work_for(index: int) -> Callable[[], Frame]:
        def work() -> Frame:
            with shared.lock:
                if "error" in state:
                    raise FrameReadError(item.path, index, state["error"].reason)
                if shared.source is None:
                    try:
                        shared.source = _FabioSource(item.path)
                    except FrameReadError as exc:
                        state["error"] = exc
                        raise FrameReadError(item.path, index, exc.reason) from None
                return _fabio_frame(shared.source, index, allocate, copy)
        return work

    try:
        for index in indices:
            yield _Task(item.path, index, work_for(index), shared)
    finally:
        shared.release()


def _single_fabio_work(item: InputItem, index: int, allocate: Callable,
                       copy: bool) -> Callable[[], Frame]:
    def work() -> Frame:
        try:
            reader = _FabioSource(item.path, allocate)
        except FrameReadError as exc:
            raise FrameReadError(exc.source, index, exc.reason) from None
        try:
            return _fabio_frame(reader, index, allocate, copy)
        finally:
            reader.close()
    return work


# --------------------------------------------------------------------------------------------
# the stream
# --------------------------------------------------------------------------------------------


def _plan(inputs: Sequence, allocate: Callable, copy: bool,
          device_decode: bool = False) -> Iterator[_Task]:
    """One task per planned frame (or per failed input), in plan order."""
    for spec in _as_spec_list(inputs):
        try:
            items = _expand_one(spec, False)
        except FrameReadError as exc:
            yield _Task(exc.source, None, result=exc)
            continue
        for item in items:
            try:
                if item.is_hdf5:
                    yield from _hdf5_tasks(item, allocate, device_decode)
                else:
                    yield from _fabio_tasks(item, allocate, copy)
            except Exception as exc:        # noqa: BLE001 - a planner must never die silently
                reason = f"read error: {type(exc).__name__}: {exc}"
                yield _Task(item.source, None, result=FrameReadError(item.source, None,
                                                                     reason))


def iter_frames(items: str | os.PathLike | InputItem | Sequence, *, workers: int,
                buffer: Callable | None = None, errors: str = "report",
                read_ahead: int | None = None,
                device_decode: bool = False) -> Iterator[Frame | FrameReadError]:
    """Decode the frames of ``items`` on ``workers`` threads; yield them in plan order.

    Parameters
    ----------
    items : InputItem, str, path-like or sequence of them
        Usually the output of :func:`~azfilter.frames.expand_inputs`, possibly
        ``.select()``-ed; plain specs are expanded as :func:`~azfilter.frames.open_frames`
        does (without recursion).  Items are read as given (no duplicate removal).
    workers : int
        Decoder threads (at least 1).
    buffer : callable, optional
        ``buffer(shape, dtype) -> numpy.ndarray or None``: each frame is decoded into the
        C-contiguous array it returns (e.g. page-locked memory for the OpenCL engine; frames
        of fabio formats are copied into it); None, or a None result, means a plain array.
    errors : {"report", "raise"}
        ``"report"``: an unreadable input, file or frame is yielded as a
        :class:`~azfilter.errors.FrameReadError` in its place.  ``"raise"``: the first one
        (in plan order) is raised.
    read_ahead : int, optional
        Frames decoded ahead of the caller, at most (default ``2 * workers + 2``); this bounds
        memory whatever the stack length.
    device_decode : bool
        Leave bitshuffle-LZ4 chunks of integer frames (HDF5 filter 32008, one frame per
        chunk, read with ``os.pread``) compressed: such a frame's ``data`` is a
        :class:`~azfilter.frames.chunks.CompressedChunk` (the chunk's bytes in a ``buffer``
        of ``(n,)`` uint8, and its block table) for an engine that decodes on the device.
        Other frames are decoded as usual.

    Yields
    ------
    Frame or FrameReadError
        In plan order (inputs in order, then frames by index), exactly one per planned frame.
        A file that cannot be opened gives one error per planned frame when its frame count
        is known (``item.nframes`` was read before), else one error with ``index`` None.
    """
    _check_errors_mode(errors)
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    read_ahead = 2 * workers + 2 if read_ahead is None else int(read_ahead)
    if read_ahead < 1:
        raise ValueError(f"read_ahead must be at least 1, not {read_ahead}")
    allocate = _allocator(buffer)
    copy = buffer is not None

    slots = threading.Semaphore(read_ahead)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="azfilter-decode")

    def planner() -> None:
        tasks = _plan(items, allocate, copy, device_decode)
        try:
            for task in tasks:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        task.discard()
                        return
                if stop.is_set():
                    task.discard()
                    return
                if task.work is None:
                    future: Future = Future()
                    future.set_result(task.run())
                else:
                    future = pool.submit(task.run)
                ready.put((future, task))
        except BaseException as exc:        # noqa: BLE001 - handed to the consumer
            ready.put((None, exc))
        finally:
            tasks.close()                   # the files of a stopped plan are let go now
            ready.put(_END)

    thread = threading.Thread(target=planner, name="azfilter-plan", daemon=True)
    thread.start()
    try:
        while True:
            entry = ready.get()
            if entry is _END:
                break
            future, task = entry
            if future is None:
                raise task                  # the planner itself failed (a bug): surface it
            result = future.result()
            slots.release()
            if isinstance(result, FrameReadError) and errors == "raise":
                raise result
            yield result
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        thread.join()
        while True:                         # tasks that never ran let go of their files
            try:
                entry = ready.get_nowait()
            except queue.Empty:
                break
            if entry is not _END and entry[0] is not None and entry[0].cancelled():
                entry[1].discard()
        pool.shutdown(wait=True)
