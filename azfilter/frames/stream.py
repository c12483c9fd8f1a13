"""Streaming the frames of expanded inputs one at a time (:func:`open_frames`), and counting
them (:func:`count_frames`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

from ..errors import FrameReadError
from .common import Frame
from .fabio_formats import _FabioSource
from .hdf5 import _Block, _Hdf5Source
from .inputs import InputItem, _as_spec_list, _expand_one, _item_key, _selected, expand_inputs


def _check_errors_mode(errors: str) -> None:
    if errors not in ("raise", "report"):
        raise ValueError(f"errors must be 'raise' or 'report', not {errors!r}")


def _block_indices(block: _Block, wanted: range) -> range:
    """The indices of ``wanted`` (increasing) that fall in ``block``, without scanning them."""
    start = max(block.first, wanted.start)
    stop = min(block.first + block.nframes, wanted.stop)
    offset = (start - wanted.start) % wanted.step
    if offset:
        start += wanted.step - offset
    return range(start, max(start, stop), wanted.step)


def _item_frames(item: InputItem,
                 buffer: Callable | None = None) -> Iterator[Frame | FrameReadError]:
    """Frames of one item; read errors are yielded (not raised), the caller decides."""
    if item.is_hdf5:
        try:
            h5 = _Hdf5Source(item.path, item.h5path, item._layout)
        except FrameReadError as exc:
            yield exc
            return
        try:
            item._nframes, item._layout = h5.nframes, h5.layout
            wanted = _selected(item, h5.nframes)
            for block in h5.blocks:
                if block.error is not None:
                    if item.frames is None or block.first in wanted:
                        yield FrameReadError(h5.source, None, block.error)
                    continue
                for index in _block_indices(block, wanted):
                    try:
                        data = h5.read(block, index, buffer)
                    except FrameReadError as exc:
                        yield exc
                        continue
                    yield Frame(data, h5.source, index, h5.nframes, h5.header)
        finally:
            h5.close()
        return

    try:
        reader = _FabioSource(item.path)
    except FrameReadError as exc:
        yield exc
        return
    try:
        item._nframes = reader.nframes
        for index in _selected(item, reader.nframes):
            try:
                data, header = reader.read(index)
            except FrameReadError as exc:
                yield exc
                continue
            yield Frame(data, reader.source, index, reader.nframes, header)
    finally:
        reader.close()


def open_frames(inputs: str | os.PathLike | InputItem | Sequence, recursive: bool = False,
                errors: str = "raise",
                buffer: Callable | None = None) -> Iterator[Frame | FrameReadError]:
    """Stream the frames of all inputs, one at a time.

    Parameters
    ----------
    inputs : str, path-like, InputItem or sequence of them
        As for :func:`expand_inputs`.  Inputs are expanded one after the other, as the
        stream reaches them.
    recursive : bool
        Descend into subdirectories (and let ``**`` span directories).
    errors : {"raise", "report"}
        ``"raise"``: the first unreadable input, file or frame raises
        :class:`~azfilter.errors.FrameReadError`.  ``"report"``: the error is yielded in the
        stream in place of the frame(s) (``source``, ``index`` — None for a whole file —,
        ``reason``) and reading goes on with the next frame or file.
    buffer : callable, optional
        ``buffer(shape, dtype) -> numpy.ndarray``: HDF5 frames (numeric, in native byte
        order) are decoded straight into the C-contiguous array it returns (e.g. page-locked
        memory for the OpenCL backend); other formats ignore it.

    Yields
    ------
    Frame or FrameReadError
        Frames in order: inputs in the given order, files in natural order, frames by index.
    """
    _check_errors_mode(errors)
    seen: set[tuple] = set()
    for spec in _as_spec_list(inputs):
        try:
            items = _expand_one(spec, recursive)
        except FrameReadError as exc:
            if errors == "raise":
                raise
            yield exc
            continue
        for item in items:
            key = _item_key(item)
            if key in seen:
                continue
            seen.add(key)
            for result in _item_frames(item, buffer):
                if isinstance(result, FrameReadError) and errors == "raise":
                    raise result
                yield result


def count_frames(inputs: str | os.PathLike | InputItem | Sequence,
                 recursive: bool = False) -> int:
    """Number of frames :func:`open_frames` would yield for ``inputs``.

    Reads headers and dataset shapes only (CBF files count as one frame without being read).

    Raises
    ------
    FrameReadError
        When an input matches nothing or a file cannot be read.
    """
    return sum(len(item.frame_indices()) for item in expand_inputs(inputs, recursive))
