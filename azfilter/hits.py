"""The hit list: which frames hold Bragg spots, from the pixels ``sparsify`` picked.

A frame's *picked* count is the number of pixels above the clipped background
(:mod:`azfilter.bragg`); its *peaks* are the groups of picked pixels that touch (8-connectivity:
sides and corners) with at least ``peak_size`` pixels. Isolated noise pixels (a 3σ pick keeps
about one background pixel in a thousand) and single hot pixels are not peaks at
``peak_size >= 2``; a crystal's Bragg spots are.

Read from a sparsify output (or any file in pyFAI's sparse format: pixel positions, so peaks
are counted) or from a sigma-clip/medfilt output with per-frame outlier statistics
(``/entry/outliers/picked``: picked counts only, no positions).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AzfilterError

#: where sigma-clip/medfilt outputs keep their per-frame count of picked pixels
OUTLIERS_PICKED = "entry/outliers/picked"


@dataclass
class FrameHits:
    """One frame's counts.

    Attributes
    ----------
    source : str
        The frame's input (as recorded in the output), or the output itself.
    frame : int
        Frame index inside ``source``.
    picked : int
        Pixels picked above the background.
    peaks : int or None
        Connected groups of at least ``peak_size`` picked pixels; None when the file has no
        pixel positions.
    """

    source: str
    frame: int
    picked: int
    peaks: int | None


def count_peaks(index: np.ndarray, shape: Sequence[int], min_size: int = 1) -> int:
    """Number of 8-connected groups of at least ``min_size`` pixels among ``index``.

    Parameters
    ----------
    index : numpy.ndarray
        Flat (row-major) pixel indices in an image of ``shape``, no duplicates.
    shape : (int, int)
        Image shape.
    min_size : int
        Smallest group counted.

    Returns
    -------
    int
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pixels = np.unique(np.asarray(index, dtype=np.int64))
    n = pixels.size
    if n == 0:
        return 0
    width = int(shape[1])
    rows, cols = np.divmod(pixels, width)
    first, second = [], []
    # each neighbour pair once: left, up-left, up, up-right
    for d_row, d_col in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):
        r, c = rows + d_row, cols + d_col
        inside = (r >= 0) & (c >= 0) & (c < width)
        target = r * width + c
        where = np.searchsorted(pixels, target)
        where_clipped = np.minimum(where, n - 1)
        found = inside & (pixels[where_clipped] == target)
        first.append(np.flatnonzero(found))
        second.append(where_clipped[found])
    a, b = np.concatenate(first), np.concatenate(second)
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
    _count, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    return int(np.count_nonzero(sizes >= max(1, int(min_size))))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _frame_names(h5: Any, path: Path, n_frames: int) -> tuple[list[str], list[int]]:
    """(source, frame index) of each row: the azfilter records, else the file itself."""
    data = h5.get("entry/data")
    if data is not None and "source" in data and "frame_index" in data \
            and data["source"].shape[0] == n_frames:
        return [_text(s) for s in data["source"][()]], [int(i) for i in data["frame_index"][()]]
    return [str(path)] * n_frames, list(range(n_frames))


def read_frame_hits(path: str | os.PathLike, peak_size: int = 2,
                    need_peaks: bool = False) -> list[FrameHits]:
    """The per-frame counts of one output.

    Parameters
    ----------
    path : str or os.PathLike
        A sparse output (sparsify, or pyFAI's sparsify-Bragg) or a sigma-clip/medfilt output
        with ``/entry/outliers/picked``.
    peak_size : int
        Smallest connected group counted as a peak.
    need_peaks : bool
        Refuse a file without pixel positions (the caller selects on peaks).

    Raises
    ------
    AzfilterError
        One line naming the file: unreadable, of neither kind, or without pixel positions
        when ``need_peaks``.
    """
    import h5py

    from .output.sparse import sparse_group_of

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            group = sparse_group_of(h5)
            if group is not None:
                ptr = np.asarray(group["frame_ptr"][()], dtype=np.int64)
                n_frames = ptr.size - 1
                shape = tuple(group["mask"].shape)
                sources, frames = _frame_names(h5, path, n_frames)
                index = group["index"]
                out = []
                for k in range(n_frames):
                    pixels = index[ptr[k]:ptr[k + 1]] if ptr[k + 1] > ptr[k] else \
                        np.zeros(0, np.int64)
                    out.append(FrameHits(sources[k], frames[k], int(ptr[k + 1] - ptr[k]),
                                         count_peaks(pixels, shape, peak_size)))
                return out
            if OUTLIERS_PICKED in h5:
                if need_peaks:
                    raise AzfilterError(
                        f"{path}: holds counts of picked pixels but not their positions: "
                        "--min-peaks needs a sparsify output (use --min-pixels)")
                picked = np.asarray(h5[OUTLIERS_PICKED][()]).reshape(-1)
                sources, frames = _frame_names(h5, path, picked.size)
                return [FrameHits(s, f, int(p), None)
                        for s, f, p in zip(sources, frames, picked, strict=True)]
    except AzfilterError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise AzfilterError(f"{path}: cannot read ({text})") from None
    raise AzfilterError(f"{path}: neither a sparsify output nor an output with per-frame "
                        f"outlier statistics (/{OUTLIERS_PICKED})")


def is_hit(frame: FrameHits, min_pixels: int | None, min_peaks: int | None) -> bool:
    """True when the frame passes every threshold given (``None``: not applied)."""
    if min_pixels is not None and frame.picked < min_pixels:
        return False
    if min_peaks is not None and (frame.peaks is None or frame.peaks < min_peaks):
        return False
    return True


def format_line(frame: FrameHits) -> str:
    """``source frame picked peaks`` (peaks ``-`` when unknown)."""
    peaks = "-" if frame.peaks is None else str(frame.peaks)
    return f"{frame.source} {frame.frame} {frame.picked} {peaks}"


def write_hits(path: str | os.PathLike, hits: list[FrameHits], criteria: dict[str, Any]) -> None:
    """Write the hit list atomically: HDF5 (``.h5``...: datasets ``source``, ``frame_index``,
    ``picked``, ``peaks`` (-1: unknown) under ``/hits``, the criteria as attributes) or text
    (``#`` header lines with the criteria, then ``source frame picked peaks`` lines).

    Raises
    ------
    AzfilterError
        When the file cannot be written.
    """
    from .fileio import atomic_output, atomic_write_text
    from .vocabulary import HDF5_SUFFIXES

    target = Path(path)
    try:
        if target.name.lower().endswith(HDF5_SUFFIXES):
            import h5py

            with atomic_output(target) as tmp, h5py.File(tmp, "w") as h5:
                group = h5.create_group("hits")
                group.attrs["NX_class"] = "NXcollection"
                group.attrs["description"] = "frames with Bragg spots (azfilter hits)"
                for key, value in criteria.items():
                    group.attrs[key] = -1 if value is None else value
                group.create_dataset("source", data=[h.source for h in hits],
                                     dtype=h5py.string_dtype("utf-8"))
                group.create_dataset("frame_index", data=np.array([h.frame for h in hits],
                                                                  dtype=np.int64))
                group.create_dataset("picked", data=np.array([h.picked for h in hits],
                                                             dtype=np.int64))
                group.create_dataset("peaks", data=np.array(
                    [-1 if h.peaks is None else h.peaks for h in hits], dtype=np.int64))
        else:
            header = ["# azfilter hits: frames with Bragg spots"]
            header += [f"# {key}: {value}" for key, value in criteria.items()]
            header.append("# source frame picked peaks")
            atomic_write_text(target, "\n".join(header + [format_line(h) for h in hits]) + "\n")
    except OSError as err:
        raise AzfilterError(f"{target}: cannot write the hit list: {err.strerror or err}") \
            from None
