"""Types, constants and helpers shared by the frame readers: the :class:`Frame` type, the
file extensions, one-line error reasons, and the checks every decoded image goes through."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FrameReadError

#: Extensions read through h5py (lower case).
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx", ".nexus")
#: Extensions read through fabio (lower case).  ``.img`` and ``.mccd`` are the usual ADSC,
#: Rigaku/SMV and MarCCD names at beamlines; fabio recognises the actual format by content.
FABIO_EXTENSIONS = (
    ".cbf", ".cbf.gz", ".cbf.bz2",
    ".edf", ".edf.gz", ".edf.bz2",
    ".tif", ".tiff", ".mccd", ".img",
)
#: Every extension accepted as a data file, and picked up when scanning a directory.
DATA_EXTENSIONS = FABIO_EXTENSIONS + HDF5_EXTENSIONS

H5_SEPARATOR = "::"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_EIGER_DATA_FILE = re.compile(r"^(?P<prefix>.+)_data_\d{6}\.h5$")
# Exceptions that fabio raises from inside its decoders on bad content (not meaningful alone).
_DECODER_BUGS = (AttributeError, AssertionError, TypeError, IndexError, KeyError,
                 ZeroDivisionError, UnicodeError)
_MAX_MESSAGE = 200          # characters kept of each message fabio logs (it may dump raw bytes)


@dataclass
class Frame:
    """One 2-D detector frame.

    Attributes
    ----------
    data : numpy.ndarray
        The 2-D image in its stored dtype (native byte order).
    source : str
        The file path; for HDF5 ``"file.h5::/path/to/dataset"`` (for an Eiger master file
        ``"master.h5::/entry/data"``).
    index : int
        Frame index inside the source (0 for single-frame files).
    nframes : int
        Number of frames in the source.
    header : dict
        Per-file metadata (the fabio header, or the HDF5 dataset attributes); may be empty.
    """

    data: np.ndarray = field(repr=False)
    source: str
    index: int
    nframes: int
    header: dict = field(default_factory=dict, repr=False)


def _extension(path: str) -> str:
    """The known (possibly double, e.g. ``.cbf.gz``) extension of ``path``, lower case, or ''."""
    name = os.path.basename(path).lower()
    for ext in sorted(DATA_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return ""


def _is_hdf5_name(path: str) -> bool:
    return _extension(path) in HDF5_EXTENSIONS


def _one_line(text: str, limit: int | None = None) -> str:
    line = " ".join(str(text).split())
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line


def _exception_reason(exc: BaseException, what: str = "") -> str:
    """A one-line reason for ``exc``, raised while reading ``what`` (e.g. 'CBF')."""
    if isinstance(exc, FrameReadError):
        return exc.reason
    message = _one_line(str(exc), _MAX_MESSAGE)
    if isinstance(exc, KeyError) and len(message) > 2 and message[0] == message[-1] == '"':
        message = message[1:-1]          # h5py's KeyError quotes its message
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, _DECODER_BUGS) or not message:
        detail = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        return f"corrupt or truncated {what + ' ' if what else ''}file ({detail})"
    if isinstance(exc, MemoryError):
        return f"out of memory while decoding{' ' + what if what else ''} (corrupt header?)"
    return message


def _native(data: np.ndarray) -> np.ndarray:
    """``data`` as an array in native byte order (engines and Cython expect native)."""
    data = np.asarray(data)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


def _check_image(data: np.ndarray, source: str, index: int | None) -> np.ndarray:
    data = _native(data)
    if data.ndim != 2:
        raise FrameReadError(source, index, f"not a 2-D image (shape {data.shape})")
    if data.dtype.kind not in "biuf":
        raise FrameReadError(source, index, f"not a numeric image (dtype {data.dtype})")
    return data


def _check_file(path: str) -> None:
    """Raise a clear FrameReadError for missing, unreadable and empty files."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise FrameReadError(path, None, "no such file") from None
    except OSError as exc:
        raise FrameReadError(path, None, _exception_reason(exc)) from None
    if os.path.isdir(path):
        raise FrameReadError(path, None, "is a directory, not a data file")
    if size == 0:
        raise FrameReadError(path, None, "empty file (0 bytes)")


def _looks_like_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


class LazyHeader(Mapping):
    """A file's header, parsed by ``parse()`` only when first looked at (azfilter's own
    readers decode the pixels without parsing the rest of the header: a run that reads no
    header key, i.e. no ``--monitor``, does not pay for it on every file)."""

    def __init__(self, parse: Callable[[], dict[str, Any]], name: str = ""):
        self._parse = parse
        self._name = name
        self._values: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def _parsed(self) -> dict[str, Any]:
        with self._lock:
            if self._values is None:
                self._values = self._parse()
            return self._values

    def __getitem__(self, key: str) -> Any:
        return self._parsed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._parsed())

    def __len__(self) -> int:
        return len(self._parsed())

    def __bool__(self) -> bool:
        return True                 # never looked at just to know whether it is empty

    def __repr__(self) -> str:
        return f"LazyHeader({self._name!r})"
