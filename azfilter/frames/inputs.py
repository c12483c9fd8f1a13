"""Input specifications: files, globs, directories and ``file.h5::/dataset`` expanded into
:class:`InputItem` objects (natural order, duplicates and Eiger data files of a listed master
left out), and the frame selection of an item."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FrameReadError
from .common import (
    _EIGER_DATA_FILE,
    DATA_EXTENSIONS,
    H5_SEPARATOR,
    _extension,
    _is_hdf5_name,
)
from .fabio_formats import _fabio_frame_count
from .hdf5 import _Hdf5Source

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass
class InputItem:
    """One data file (or one HDF5 dataset) out of :func:`expand_inputs`.

    Attributes
    ----------
    path : str
        The file path.
    h5path : str or None
        Dataset (or Eiger data group) inside an HDF5 file; None: found automatically.
    frames : range or None
        Restrict reading to these frame indices (e.g. for sharding); None: all frames.
    """

    path: str
    h5path: str | None = None
    frames: range | None = None
    _nframes: int | None = field(default=None, repr=False, compare=False)
    # HDF5: where the stack is (dataset path, Eiger links and blocks), found at the first
    # opening and reused, so that reading an Eiger master in many small selections does not
    # open every linked data file each time
    _layout: Any = field(default=None, repr=False, compare=False)

    @property
    def is_hdf5(self) -> bool:
        """True when the file is read through h5py."""
        return self.h5path is not None or _is_hdf5_name(self.path)

    @property
    def source(self) -> str:
        """``path``, or ``path::h5path`` when a dataset path is set."""
        return self.path if self.h5path is None else f"{self.path}{H5_SEPARATOR}{self.h5path}"

    @property
    def nframes(self) -> int:
        """Number of frames in the source (ignoring :attr:`frames`); read lazily, cached.

        Raises
        ------
        FrameReadError
            When the file cannot be read.
        """
        if self._nframes is None:
            self._nframes = _count_item_frames(self)
        return self._nframes

    def frame_indices(self) -> range:
        """The frame indices that :func:`open_frames` reads from this item."""
        return _selected(self, self.nframes)

    def select(self, frames: range) -> InputItem:
        """A copy of this item reading only ``frames`` (non-negative, increasing range)."""
        if frames.start < 0 or frames.stop < 0 or frames.step <= 0:
            raise ValueError(f"frame selection must be a non-negative increasing range: {frames}")
        return InputItem(self.path, self.h5path, frames, self._nframes, self._layout)

    def __str__(self) -> str:
        return self.source


def _natural_key(text: str) -> tuple:
    """Sort key putting ``frame_2`` before ``frame_10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"f.h5::/a/b"`` -> ``("f.h5", "/a/b")``; a plain path -> ``(path, None)``."""
    if H5_SEPARATOR in spec:
        path, h5path = spec.split(H5_SEPARATOR, 1)
        h5path = h5path.strip() or "/"
        if not h5path.startswith("/"):
            h5path = "/" + h5path
        return path, h5path
    return spec, None


def _scan_directory(directory: str, recursive: bool) -> list[str]:
    """Data files in ``directory`` (hidden files and directories skipped), natural order."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=_natural_key)
        found.extend(os.path.join(root, name) for name in files
                     if not name.startswith(".") and _extension(name))
        if not recursive:
            break
    return sorted(found, key=_natural_key)


def _drop_eiger_data_files(paths: list[str]) -> list[str]:
    """Leave out ``x_data_000001.h5`` files whose ``x_master.h5`` is in the list too.

    Reading the master already reads every data file it links, so reading both would
    reduce the same frames twice.
    """
    masters = {os.path.abspath(p) for p in paths if p.endswith("_master.h5")}
    kept = []
    for path in paths:
        match = _EIGER_DATA_FILE.match(os.path.basename(path))
        if match:
            master = os.path.join(os.path.dirname(os.path.abspath(path)),
                                  match["prefix"] + "_master.h5")
            if master in masters:
                continue
        kept.append(path)
    return kept


def _expand_one(spec: str | os.PathLike | InputItem, recursive: bool) -> list[InputItem]:
    """Expand one input (file, glob, directory, ``file.h5::/path``) into items.

    Raises
    ------
    FrameReadError
        Naming ``spec`` when it matches no data file.
    """
    if isinstance(spec, InputItem):
        return [spec]
    text = os.fspath(spec)
    path_part, h5path = _split_spec(text)
    path_part = os.path.expanduser(path_part)
    if not path_part:
        raise FrameReadError(text, None, "empty file name")

    if os.path.exists(path_part):       # literal name first: file names may contain [ ] * ?
        candidates = [path_part]
        from_glob = False
    elif _GLOB_CHARS.search(path_part):
        candidates = sorted(glob.glob(path_part, recursive=recursive), key=_natural_key)
        from_glob = True
        if not candidates:
            raise FrameReadError(text, None, "no file matches this pattern")
    else:
        raise FrameReadError(text, None, "no such file or directory")

    if h5path is not None:
        files = [c for c in candidates if os.path.isfile(c)]
        if not files:
            raise FrameReadError(text, None, "not a file (expected an HDF5 file before '::')")
        return [InputItem(f, h5path) for f in files]

    files: list[str] = []
    unknown: list[str] = []
    for candidate in candidates:
        if os.path.isdir(candidate):
            files.extend(_scan_directory(candidate, recursive))
        elif _extension(candidate):
            files.append(candidate)
        else:
            unknown.append(candidate)
    if unknown and not from_glob:
        suffix = "".join(Path(unknown[0]).suffixes[-2:]) or "(none)"
        raise FrameReadError(text, None, f"unknown file type {suffix!r} "
                             f"(known: {', '.join(DATA_EXTENSIONS)})")
    if not files:
        if os.path.isdir(path_part):
            where = "directory" + (" tree" if recursive else "")
            raise FrameReadError(text, None, f"no data files in this {where} "
                                 f"(known extensions: {', '.join(DATA_EXTENSIONS)})")
        raise FrameReadError(text, None, "no data file matches this pattern"
                             + (f" ({len(unknown)} files of unknown type)" if unknown else ""))
    return [InputItem(f) for f in _drop_eiger_data_files(files)]


def _as_spec_list(inputs) -> list:
    if isinstance(inputs, (str, os.PathLike, InputItem)):
        return [inputs]
    if isinstance(inputs, Sequence) or hasattr(inputs, "__iter__"):
        return list(inputs)
    raise TypeError(f"inputs must be a path, a pattern or a sequence of them, not {inputs!r}")


def _item_key(item: InputItem) -> tuple:
    frames = None if item.frames is None else (item.frames.start, item.frames.stop,
                                               item.frames.step)
    return (os.path.realpath(item.path), item.h5path, frames)


def expand_inputs(inputs: str | os.PathLike | InputItem | Sequence,
                  recursive: bool = False) -> list[InputItem]:
    """Turn files, globs, directories and ``file.h5::/dataset`` specs into input items.

    Parameters
    ----------
    inputs : str, path-like, InputItem or sequence of them
        Files; globs (``**`` spans directories when ``recursive``); directories (their data
        files, see :data:`DATA_EXTENSIONS`, in natural order, hidden files skipped);
        ``file.h5::/path/to/dataset`` (the file part may be a glob).
    recursive : bool
        Descend into subdirectories of directory inputs, and let ``**`` match across them.

    Returns
    -------
    list of InputItem
        In input order, each input's files in natural order, duplicates removed.  Eiger data
        files are left out when their master file is among the same input's files.

    Raises
    ------
    FrameReadError
        (an :class:`AzfilterError`) naming the first input that matches no data file, or an
        explicit file of unknown type.
    """
    items: list[InputItem] = []
    seen: set[tuple] = set()
    for spec in _as_spec_list(inputs):
        for item in _expand_one(spec, recursive):
            key = _item_key(item)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def _count_item_frames(item: InputItem) -> int:
    if item.is_hdf5:
        source = _Hdf5Source(item.path, item.h5path, item._layout)
        try:
            item._layout = source.layout
            return source.nframes
        finally:
            source.close()
    return _fabio_frame_count(item.path)


def _selected(item: InputItem, nframes: int) -> range:
    everything = range(nframes)
    if item.frames is None:
        return everything
    return everything[slice(item.frames.start, item.frames.stop, item.frames.step)]
