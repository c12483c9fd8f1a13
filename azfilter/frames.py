"""Reading detector frames: EDF, CBF, TIFF (through fabio) and HDF5/NeXus (through h5py).

Inputs are files, globs, directories or ``file.h5::/path/to/dataset``.  Multi-frame files
(HDF5 stacks, Eiger master files, multi-frame EDF/TIFF) are streamed one frame at a time, so
memory stays flat whatever the stack length.

HDF5 without a dataset path: the image stack is found, in this order, as

1. an Eiger master file: the external links ``/entry/data/data_000001, data_000002, ...``
   are read in order as one stack (source ``master.h5::/entry/data``);
2. the NeXus default plot: ``/@default`` -> NXentry ``@default`` -> NXdata ``@signal``;
3. ``/entry/data/data``;
4. the ``data`` dataset of an NXdetector group (e.g. X-Spectrum Lambda files);
5. the first dataset of two or more dimensions.

2-D datasets are one frame; 3-D datasets are stacks ``(N, rows, cols)``; higher dimensions are
stacks over all leading axes.
"""

from __future__ import annotations

import glob
import logging
import os
import posixpath
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AzfilterError, FrameReadError

logger = logging.getLogger(__name__)

__all__ = [
    "DATA_EXTENSIONS",
    "HDF5_EXTENSIONS",
    "Frame",
    "InputItem",
    "count_frames",
    "describe_file",
    "expand_inputs",
    "load_image",
    "open_frames",
    "pixel_mask_for",
]

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
_GLOB_CHARS = re.compile(r"[*?\[]")
_EIGER_LINK = re.compile(r"^data_(\d{6})$")
_EIGER_DATA_FILE = re.compile(r"^(?P<prefix>.+)_data_\d{6}\.h5$")
_EIGER_PIXEL_MASK = "/entry/instrument/detector/detectorSpecific/pixel_mask"
# Default HDF5 chunk cache per dataset: small, because frames are read once each.  A dataset
# whose chunks hold several frames gets a cache of one chunk so that the chunk is decompressed
# once, not once per frame (bounded by _MAX_CHUNK_CACHE).
_CHUNK_CACHE = 1 << 20
_MAX_CHUNK_CACHE = 512 << 20
# Exceptions that fabio raises from inside its decoders on bad content (not meaningful alone).
_DECODER_BUGS = (AttributeError, AssertionError, TypeError, IndexError, KeyError,
                 ZeroDivisionError, UnicodeError)
_MAX_MESSAGE = 200          # characters kept of each message fabio logs (it may dump raw bytes)


# --------------------------------------------------------------------------------------------
# public data types
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# expanding inputs
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> tuple:
    """Sort key putting ``frame_2`` before ``frame_10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def _extension(path: str) -> str:
    """The known (possibly double, e.g. ``.cbf.gz``) extension of ``path``, lower case, or ''."""
    name = os.path.basename(path).lower()
    for ext in sorted(DATA_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return ""


def _is_hdf5_name(path: str) -> bool:
    return _extension(path) in HDF5_EXTENSIONS


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


# --------------------------------------------------------------------------------------------
# error messages
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# fabio (EDF, CBF, TIFF, ...)
# --------------------------------------------------------------------------------------------


class _FabioLogCapture(logging.Filter):
    """Catches fabio's log records while this thread reads a file through fabio.

    fabio reports some corrupt files only in its log (a CBF checksum mismatch, an EDF data
    block shorter than its header says) and still returns an array; those errors become read
    errors here.  Warnings on files that do read are passed on at DEBUG level, because fabio
    warns about harmless oddities of common files.
    """

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        records = getattr(self.local, "records", None)
        if records is None or record.levelno < logging.WARNING:
            return True
        records.append(record)
        return False


_FABIO_LOG_CAPTURE = _FabioLogCapture()
_fabio_loggers_seen: set[str] = set()
_fabio_loggers_lock = threading.Lock()


def _fabio_module_loggers() -> list[str]:
    """Logger names of fabio's modules, including those not imported yet."""
    import pkgutil

    fabio = _import_fabio()
    names = ["fabio"]
    for package in ("", "utils", "ext", "app"):
        prefix = "fabio" + ("." + package if package else "")
        directory = os.path.join(os.path.dirname(fabio.__file__), package)
        names.extend(f"{prefix}.{m.name}" for m in pkgutil.iter_modules([directory]))
    return names


def _install_fabio_log_capture() -> None:
    # Logger filters only see records logged on that very logger, so the filter goes on every
    # fabio.* logger.  fabio imports its format modules lazily (and a module's logger is made
    # at its import), so the loggers are created here ahead of time, by module name.
    if not _fabio_loggers_seen:
        for name in _fabio_module_loggers():
            logging.getLogger(name)
    names = [name for name in list(logging.Logger.manager.loggerDict)
             if name == "fabio" or name.startswith("fabio.")]
    with _fabio_loggers_lock:
        for name in names:
            if name not in _fabio_loggers_seen:
                logging.getLogger(name).addFilter(_FABIO_LOG_CAPTURE)
                _fabio_loggers_seen.add(name)


@contextmanager
def _fabio_guard(source: str, index: int | None, what: str):
    """Run a fabio call; turn its exceptions and logged errors into one FrameReadError."""
    _install_fabio_log_capture()
    local = _FABIO_LOG_CAPTURE.local
    previous = getattr(local, "records", None)
    records: list[logging.LogRecord] = []
    local.records = records
    failure: BaseException | None = None
    try:
        yield
    except Exception as exc:    # fabio raises anything on bad bytes; report it, never a traceback
        failure = exc
    finally:
        local.records = previous
    errors = [_one_line(r.getMessage(), _MAX_MESSAGE) for r in records
              if r.levelno >= logging.ERROR]
    if failure is not None or errors:
        if errors:
            detail = "; ".join(dict.fromkeys(errors))
            if failure is None or isinstance(failure, _DECODER_BUGS):
                reason = f"corrupt or truncated {what} file ({detail})"
            else:
                reason = f"{_exception_reason(failure, what)} ({detail})"
        else:
            reason = _exception_reason(failure, what)
            warnings = [_one_line(r.getMessage(), _MAX_MESSAGE) for r in records]
            if warnings and not isinstance(failure, _DECODER_BUGS):
                reason += f" ({'; '.join(dict.fromkeys(warnings))})"
        raise FrameReadError(source, index, reason) from failure
    for record in records:
        logger.debug("%s: fabio: %s", source, record.getMessage())


def _import_fabio():
    import fabio

    return fabio


def _fabio_format_name(path: str, image: Any = None) -> str:
    if image is not None:
        name = type(image).__name__
        name = name[:-5] if name.endswith("Image") else name
        return {"Cbf": "CBF", "Edf": "EDF", "Tif": "TIFF", "Pilatus": "TIFF",
                "Mar345": "MAR345", "Marccd": "MarCCD"}.get(name, name)
    ext = _extension(path).lstrip(".").split(".")[0]
    return {"tif": "TIFF", "tiff": "TIFF", "mccd": "MarCCD", "": "image"}.get(ext, ext.upper())


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


class _FabioSource:
    """A file opened through fabio; frames are read one at a time with ``getframe``."""

    def __init__(self, path: str):
        _check_file(path)
        self.path = path
        self.source = path
        what = _fabio_format_name(path)
        fabio = _import_fabio()
        with _fabio_guard(path, None, what):
            self.image = fabio.open(path)
        self.format = _fabio_format_name(path, self.image)
        self.nframes = int(getattr(self.image, "nframes", 1) or 1)

    def read(self, index: int) -> tuple[np.ndarray, dict]:
        with _fabio_guard(self.source, index, self.format):
            frame = self.image if index == 0 else self.image.getframe(index)
            data = frame.data
            header = dict(frame.header)
        if data is None:
            raise FrameReadError(self.source, index, f"no image data in this {self.format} file")
        return _check_image(data, self.source, index), header

    def close(self) -> None:
        close = getattr(self.image, "close", None)
        if close is not None:
            try:
                close()
            except Exception:      # closing a half-read file must not hide the real error
                pass


def _fabio_frame_count(path: str) -> int:
    """Frames in a fabio file, reading as little as possible."""
    ext = _extension(path)
    if ext.startswith(".cbf"):
        _check_file(path)
        return 1                    # CBF files hold one image
    fabio = _import_fabio()
    if ext.startswith(".edf"):
        _check_file(path)
        with _fabio_guard(path, None, "EDF"):
            header = fabio.openheader(path)     # EDF headers carry the frame count
        return int(header.nframes or 1)
    reader = _FabioSource(path)     # TIFF: fabio's header-only reader does not count pages
    try:
        return reader.nframes
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------------


def _import_h5py():
    import h5py
    import hdf5plugin  # noqa: F401  (registers bitshuffle-LZ4 and other filters with HDF5)

    return h5py


def _h5_open(path: str):
    """Open ``path`` read-only, without HDF5 file locking (breaks on some beamline file
    systems and while a writer holds the file), with a small chunk cache."""
    _check_file(path)
    h5py = _import_h5py()
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=_CHUNK_CACHE)
    except Exception as exc:
        message = _exception_reason(exc)
        if "signature not found" in message:
            message = f"not an HDF5 file ({message})"
        raise FrameReadError(path, None, message) from None


def _attr_text(obj, name: str) -> str | None:
    """Attribute ``name`` of ``obj`` as a string (NeXus writes bytes, str or 1-element arrays)."""
    try:
        value = obj.attrs.get(name)
    except Exception:
        return None
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _plain_attrs(obj) -> dict:
    """HDF5 attributes as plain Python values (str, int, float, lists)."""
    out = {}
    for key in obj.attrs:
        try:
            value = obj.attrs[key]
        except Exception:           # unreadable attribute types: skip, metadata only
            continue
        if isinstance(value, (bytes, np.bytes_)):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = [v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else v
                     for v in value.tolist()] if value.size <= 64 else value
        out[key] = value
    return out


def _is_dataset(obj) -> bool:
    h5py = _import_h5py()
    return isinstance(obj, h5py.Dataset)


def _is_image_dataset(obj) -> bool:
    return (_is_dataset(obj) and obj.ndim >= 2 and obj.dtype.kind in "biuf"
            and all(n > 0 for n in obj.shape[-2:]))


def _eiger_links(group) -> list[str]:
    """Names ``data_000001, ...`` in ``group`` (an Eiger master's /entry/data), in order."""
    try:
        names = list(group.keys())
    except Exception:
        return []
    return sorted((n for n in names if _EIGER_LINK.match(n)), key=lambda n: int(n[5:]))


def _join_h5(base: str, name: str) -> str:
    """HDF5 path of ``name`` relative to ``base`` (paths are tracked by hand because an
    object's ``.name`` is its path in the file an external link leads to)."""
    joined = posixpath.normpath(name if name.startswith("/") else posixpath.join(base, name))
    return "/" + joined.lstrip("/")


def _get_quiet(group, name: str):
    try:
        return group.get(name)
    except Exception:               # broken links: treated as absent while searching
        return None


def _nexus_default(group, base: str) -> tuple[str, Any] | None:
    """(path, dataset) the NeXus ``@default`` / ``@signal`` attributes point to, or None."""
    node, path = group, base
    for _ in range(8):              # @default chains are short; the bound stops cycles
        name = _attr_text(node, "default")
        if name is None:
            break
        child = _get_quiet(node, name)
        if child is None:
            break
        node, path = child, _join_h5(path, name)
        if _is_dataset(node):
            return path, node
    signal = _attr_text(node, "signal")
    target = None if signal is None else _get_quiet(node, signal)
    if _is_dataset(target):
        return _join_h5(path, signal), target
    return None


def _first_image_dataset(group, base: str, nx_class: str | None = None) -> str | None:
    """Path of the first image dataset under ``group`` in HDF5 visit order; with ``nx_class``
    only the ``data`` member of groups of that NeXus class."""
    found = []

    def visit(name, obj):
        if nx_class is None:
            if _is_image_dataset(obj):
                found.append(_join_h5(base, name))
                return True
        elif not _is_dataset(obj) and _attr_text(obj, "NX_class") == nx_class:
            if _is_image_dataset(_get_quiet(obj, "data")):
                found.append(_join_h5(base, name + "/data"))
                return True
        return None

    group.visititems(visit)
    return found[0] if found else None


def _locate_stack(group, base: str) -> tuple[str, list[str] | None]:
    """Find the image stack in ``group`` (the file root, or a group the user named),
    whose path is ``base``.

    Returns
    -------
    (h5path, links)
        ``links`` is the list of Eiger ``data_NNNNNN`` names under ``h5path`` for a master
        file, else None and ``h5path`` is a dataset.
    """
    for candidate, path in ((group, base),
                            (_get_quiet(group, "entry/data"), _join_h5(base, "entry/data"))):
        if candidate is not None and not _is_dataset(candidate):
            links = _eiger_links(candidate)
            if links:
                return path, links
    default = _nexus_default(group, base)
    if default is not None and _is_image_dataset(default[1]):
        return default[0], None
    if _is_image_dataset(_get_quiet(group, "entry/data/data")):
        return _join_h5(base, "entry/data/data"), None
    for nx_class in ("NXdetector", None):
        path = _first_image_dataset(group, base, nx_class)
        if path is not None:
            return path, None
    raise AzfilterError("no image dataset (2-D or more) found; give one as file.h5::/path")


@dataclass
class _Block:
    """A run of frames in one HDF5 dataset (an Eiger master has one block per data file)."""

    h5path: str
    first: int = 0                  # index of the block's first frame in the whole stack
    nframes: int = 0
    error: str | None = None        # why the block cannot be read (broken external link)


def _stack_length(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1


def _compression_of(dataset) -> str:
    """Human-readable HDF5 filter pipeline, e.g. 'bitshuffle+lz4', 'shuffle+gzip(4)'."""
    try:
        plist = dataset.id.get_create_plist()
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    except Exception:
        return "unknown"
    names = []
    for code, _flags, values, _name in filters:
        if code == 1:
            names.append(f"gzip({values[0]})" if values else "gzip")
        elif code == 32008:
            kind = {2: "+lz4", 3: "+zstd"}.get(values[4] if len(values) > 4 else 0, "")
            names.append("bitshuffle" + kind)
        else:
            names.append({2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset",
                          32000: "lzf", 32001: "blosc", 32004: "lz4", 32015: "zstd",
                          32026: "blosc2"}.get(code, f"filter {code}"))
    return "+".join(names) if names else "none"


class _Hdf5Source:
    """An open HDF5 file and the image stack inside it (one dataset, or Eiger links)."""

    def __init__(self, path: str, h5path: str | None, layout: tuple | None = None):
        self.path = path
        self.file = _h5_open(path)
        self.header: dict = {}
        self._dataset = None
        self._dataset_block: _Block | None = None
        if layout is not None:
            self.h5path, self.links, self.blocks, self.nframes = layout
            return
        try:
            self._locate(h5path)
        except FrameReadError:
            self.close()
            raise
        except AzfilterError as exc:
            self.close()
            raise FrameReadError(self.source, None, str(exc)) from None
        except Exception as exc:
            self.close()
            raise FrameReadError(self.source, None, _exception_reason(exc, "HDF5")) from None

    @property
    def layout(self) -> tuple:
        """Where the stack is, to skip the search when the file is opened again."""
        return self.h5path, self.links, self.blocks, self.nframes

    @property
    def source(self) -> str:
        path = getattr(self, "h5path", None)
        return self.path if path is None else f"{self.path}{H5_SEPARATOR}{path}"

    def _locate(self, h5path: str | None) -> None:
        self.h5path = h5path
        self.links: list[str] | None = None
        if h5path is None:
            self.h5path, self.links = _locate_stack(self.file, "/")
        else:
            obj = self._get(h5path)
            if not _is_dataset(obj):
                self.h5path, self.links = _locate_stack(obj, _join_h5("/", h5path))
        if self.links is None:
            dataset = self.file[self.h5path]
            self._check_dataset(dataset, self.source)
            self.blocks = [_Block(self.h5path, 0, _stack_length(dataset.shape))]
        else:
            self.blocks = self._eiger_blocks()
        readable = [b for b in self.blocks if b.error is None]
        self.nframes = max((b.first + b.nframes for b in readable), default=0)

    def _get(self, h5path: str):
        """The object at ``h5path``, with a clear message for missing paths and broken links."""
        try:
            link = self.file.get(h5path, getlink=True)
        except Exception:
            link = None
        if link is None:
            raise FrameReadError(self.source, None, f"no dataset or group {h5path} in this file")
        try:
            return self.file[h5path]
        except Exception as exc:
            target = getattr(link, "filename", None)
            if target is not None:
                raise FrameReadError(self.source, None, f"external link {h5path} -> {target}:"
                                     f"{link.path} cannot be opened") from None
            raise FrameReadError(self.source, None, _exception_reason(exc, "HDF5")) from None

    @staticmethod
    def _check_dataset(dataset, source: str) -> None:
        if dataset.ndim < 2:
            raise FrameReadError(source, None, f"dataset is {dataset.ndim}-D (shape "
                                 f"{dataset.shape}), not an image or a stack of images")
        if dataset.dtype.kind not in "biuf":
            raise FrameReadError(source, None, f"dataset is not numeric (dtype {dataset.dtype})")

    def _eiger_blocks(self) -> list[_Block]:
        group = self.file[self.h5path]
        blocks = []
        next_first = 0
        for name in self.links:
            h5path = _join_h5(self.h5path, name)
            block = _Block(h5path, next_first)
            try:
                dataset = group[name]
                self._check_dataset(dataset, f"{self.path}{H5_SEPARATOR}{h5path}")
            except FrameReadError as exc:
                block.error = f"{h5path}: {exc.reason}"
            except Exception:
                link = group.get(name, getlink=True)
                target = getattr(link, "filename", None)
                block.error = (f"{h5path}: linked data file {target} cannot be opened"
                               if target else f"{h5path}: cannot be opened")
            else:
                block.nframes = _stack_length(dataset.shape)
                # Eiger data sets say which images they hold (1-based); trusting that keeps
                # the frame numbers right after a missing data file.
                low = dataset.attrs.get("image_nr_low")
                if low is not None and np.ndim(low) == 0 and int(low) - 1 >= next_first:
                    block.first = int(low) - 1
                del dataset
            blocks.append(block)
            next_first = block.first + block.nframes
        return blocks

    def _open_dataset(self, block: _Block):
        """Open the block's dataset with a chunk cache that fits one chunk when a chunk holds
        several frames, so that each chunk is decompressed once."""
        if self._dataset_block is block:
            return self._dataset
        self._dataset = None            # closes the previous Eiger data file
        h5py = _import_h5py()
        dataset = self.file[block.h5path]
        chunks = dataset.chunks
        if chunks is not None and dataset.ndim > 2 and int(np.prod(chunks[:-2])) > 1:
            chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dataset.dtype.itemsize
            if chunk_bytes > _CHUNK_CACHE:
                dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                dapl.set_chunk_cache(521, min(chunk_bytes + 4096, _MAX_CHUNK_CACHE), 1.0)
                dataset = h5py.Dataset(h5py.h5d.open(self.file.id, block.h5path.encode(), dapl))
        self._dataset, self._dataset_block = dataset, block
        self.header = _plain_attrs(dataset)
        return dataset

    def read(self, block: _Block, index: int, buffer: Callable | None = None) -> np.ndarray:
        try:
            dataset = self._open_dataset(block)
            local = index - block.first
            if dataset.ndim == 2:
                where: Any = ()
            elif dataset.ndim == 3:
                where = local
            else:
                where = tuple(int(i) for i in np.unravel_index(local, dataset.shape[:-2]))
            if buffer is not None and dataset.dtype.kind in "iuf":
                # decode straight into the caller's array (e.g. page-locked memory)
                data = buffer(tuple(dataset.shape[-2:]), dataset.dtype.newbyteorder("="))
                dataset.read_direct(data, np.s_[where] if dataset.ndim > 2 else None)
            else:
                data = dataset[where]
        except Exception as exc:
            raise FrameReadError(self.source, index, _exception_reason(exc, "HDF5")) from None
        return _check_image(data, self.source, index)

    def close(self) -> None:
        self._dataset = None
        self._dataset_block = None
        try:
            self.file.close()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------
# streaming frames
# --------------------------------------------------------------------------------------------


def _count_item_frames(item: InputItem) -> int:
    if item.is_hdf5:
        source = _Hdf5Source(item.path, item.h5path, item._layout)
        try:
            item._layout = source.layout
            return source.nframes
        finally:
            source.close()
    return _fabio_frame_count(item.path)


def _check_errors_mode(errors: str) -> None:
    if errors not in ("raise", "report"):
        raise ValueError(f"errors must be 'raise' or 'report', not {errors!r}")


def _selected(item: InputItem, nframes: int) -> range:
    everything = range(nframes)
    if item.frames is None:
        return everything
    return everything[slice(item.frames.start, item.frames.stop, item.frames.step)]


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


# --------------------------------------------------------------------------------------------
# single images (mask, dark, flat), file description, detector pixel masks
# --------------------------------------------------------------------------------------------


def _spec_parts(path: str | os.PathLike | InputItem) -> tuple[str, str | None]:
    if isinstance(path, InputItem):
        return path.path, path.h5path
    path_part, h5path = _split_spec(os.fspath(path))
    return os.path.expanduser(path_part), h5path


def _looks_like_hdf5(path: str) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(8) == _HDF5_SIGNATURE
    except OSError:
        return False


def load_image(path: str | os.PathLike | InputItem) -> np.ndarray:
    """Read a single image (mask, dark, flat): any fabio format, ``.npy``, or HDF5.

    Parameters
    ----------
    path : str, path-like or InputItem
        A file; ``file.h5::/path`` selects an HDF5 dataset (without a path the dataset is
        found as for frames).  Unlike data inputs, any extension is accepted: fabio
        recognises formats by content (e.g. a TIFF mask named ``.mask``).

    Returns
    -------
    numpy.ndarray
        The 2-D image in its stored dtype (native byte order).  A stack of one frame, e.g. of
        shape ``(1, rows, cols)``, gives its frame.

    Raises
    ------
    FrameReadError
        When the file cannot be read or holds more (or fewer) than one frame.
    """
    file_path, h5path = _spec_parts(path)
    source = file_path if h5path is None else f"{file_path}{H5_SEPARATOR}{h5path}"
    _check_file(file_path)
    if file_path.lower().endswith(".npy"):
        try:
            data = np.load(file_path, allow_pickle=False)
        except Exception as exc:
            raise FrameReadError(source, None, _exception_reason(exc, "NPY")) from None
        data = np.asarray(data)
        if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):
            data = data.reshape(data.shape[-2:])
        return _check_image(data, source, None)

    if h5path is not None or _is_hdf5_name(file_path) or _looks_like_hdf5(file_path):
        h5 = _Hdf5Source(file_path, h5path)
        try:
            if h5.nframes != 1 or len(h5.blocks) != 1:
                raise FrameReadError(h5.source, None, f"holds {h5.nframes} frames; "
                                     "expected a single image")
            return h5.read(h5.blocks[0], 0)
        finally:
            h5.close()

    reader = _FabioSource(file_path)
    try:
        if reader.nframes != 1:
            raise FrameReadError(file_path, None, f"holds {reader.nframes} frames; "
                                 "expected a single image")
        return reader.read(0)[0]
    finally:
        reader.close()


def _pixel_mask_dataset(h5file):
    """The detector pixel mask dataset of an open HDF5 file, or None.

    The Eiger master's ``detectorSpecific/pixel_mask`` first, then the NeXus
    ``NXdetector/pixel_mask`` of any entry (e.g. X-Spectrum Lambda files).
    """
    candidate = h5file.get(_EIGER_PIXEL_MASK)
    if _is_dataset(candidate):
        return candidate
    for entry in h5file.values():
        if _is_dataset(entry):
            continue
        for instrument in entry.values():
            if _is_dataset(instrument) or _attr_text(instrument, "NX_class") != "NXinstrument":
                continue
            for detector in instrument.values():
                if _is_dataset(detector) or _attr_text(detector, "NX_class") != "NXdetector":
                    continue
                candidate = detector.get("pixel_mask")
                if _is_dataset(candidate):
                    return candidate
    return None


def _master_of(path: str) -> str | None:
    """``x_master.h5`` next to an Eiger data file ``x_data_000001.h5``, if it exists."""
    match = _EIGER_DATA_FILE.match(os.path.basename(path))
    if match is None:
        return None
    master = os.path.join(os.path.dirname(path), match["prefix"] + "_master.h5")
    return master if os.path.isfile(master) else None


def _read_pixel_mask(path: str) -> tuple[np.ndarray, str] | None:
    h5 = _h5_open(path)
    try:
        dataset = _pixel_mask_dataset(h5)
        if dataset is None:
            return None
        mask = _native(dataset[()])
        source = f"{path}{H5_SEPARATOR}{dataset.name}"
    except Exception as exc:
        raise FrameReadError(path, None, f"pixel mask: {_exception_reason(exc, 'HDF5')}") from None
    finally:
        h5.close()
    if mask.ndim > 2 and all(n == 1 for n in mask.shape[:-2]):
        mask = mask.reshape(mask.shape[-2:])     # Lambda stores it as (1, rows, cols)
    if mask.ndim != 2:
        return None
    return mask, source


def pixel_mask_for(path: str | os.PathLike | InputItem) -> np.ndarray | None:
    """The detector's own pixel mask stored with an HDF5 data file, or None.

    Looks in the file (Eiger master ``/entry/instrument/detector/detectorSpecific/pixel_mask``,
    else an ``NXdetector/pixel_mask``), and for an Eiger data file ``x_data_NNNNNN.h5`` in its
    ``x_master.h5``.  Non-zero values are invalid pixels (bit flags: gap, dead, noisy...).

    Parameters
    ----------
    path : str, path-like or InputItem
        The data file (a ``::/dataset`` suffix is ignored).  Non-HDF5 files give None.

    Returns
    -------
    numpy.ndarray or None
        The 2-D mask in its stored dtype (usually uint32).
    """
    found = _pixel_mask_with_source(path)
    return None if found is None else found[0]


def _pixel_mask_with_source(path) -> tuple[np.ndarray, str] | None:
    file_path, h5path = _spec_parts(path)
    if h5path is None and not _is_hdf5_name(file_path) and not _looks_like_hdf5(file_path):
        return None
    found = _read_pixel_mask(file_path)
    if found is None:
        master = _master_of(file_path)
        if master is not None:
            found = _read_pixel_mask(master)
    return found


def describe_file(path: str | os.PathLike | InputItem) -> dict:
    """What ``azfilter info`` shows about one data file.

    Parameters
    ----------
    path : str, path-like or InputItem
        One file, optionally ``file.h5::/dataset``.

    Returns
    -------
    dict
        ``path``, ``format`` ("CBF", "EDF", "TIFF", "HDF5"...), ``nframes``, ``shape`` (of one
        frame), ``dtype``, ``compression``, ``size_bytes``; for HDF5 also ``h5path`` (the dataset,
        or an Eiger master's data group), ``layout`` ("dataset" or "eiger-master"),
        ``data_files`` (Eiger: link -> file), ``pixel_mask`` (None or its ``source``,
        ``shape`` and number of ``masked`` pixels); ``header`` (fabio header or dataset attributes).

    Raises
    ------
    FrameReadError
        When the file cannot be read.
    """
    file_path, h5path = _spec_parts(path)
    _check_file(file_path)
    info: dict[str, Any] = {"path": file_path, "size_bytes": os.path.getsize(file_path)}
    if h5path is not None or _is_hdf5_name(file_path) or _looks_like_hdf5(file_path):
        h5 = _Hdf5Source(file_path, h5path)
        try:
            info.update(format="HDF5", h5path=h5.h5path, nframes=h5.nframes,
                        layout="dataset" if h5.links is None else "eiger-master")
            readable = [b for b in h5.blocks if b.error is None]
            if readable:
                dataset = h5._open_dataset(readable[0])
                info.update(shape=tuple(int(n) for n in dataset.shape[-2:]),
                            dtype=str(_native(np.empty(0, dataset.dtype)).dtype),
                            compression=_compression_of(dataset),
                            chunks=dataset.chunks, header=dict(h5.header))
            if h5.links is not None:
                group = h5.file[h5.h5path]
                info["data_files"] = {
                    name: getattr(group.get(name, getlink=True), "filename", None)
                    for name in h5.links}
                info["errors"] = [b.error for b in h5.blocks if b.error is not None]
        finally:
            h5.close()
        mask = _pixel_mask_with_source(file_path)
        info["pixel_mask"] = None if mask is None else {
            "source": mask[1], "shape": mask[0].shape, "masked": int(np.count_nonzero(mask[0]))}
        return info

    reader = _FabioSource(file_path)
    try:
        data, header = reader.read(0)
        compression = []
        ext = _extension(file_path)
        if ext.endswith(".gz"):
            compression.append("gzip file")
        elif ext.endswith(".bz2"):
            compression.append("bzip2 file")
        conversions = header.get("conversions")
        if conversions:
            compression.append(str(conversions).strip().strip('"').replace("x-CBF_", "").lower())
        tiff_compression = header.get("compression_type", header.get("compression"))
        if reader.format == "TIFF" and tiff_compression not in (None, False, 1):
            compression.append(f"TIFF compression {tiff_compression}")
        info.update(format=reader.format, nframes=reader.nframes, shape=data.shape,
                    dtype=str(data.dtype), compression="+".join(compression) or "none",
                    header=header)
    finally:
        reader.close()
    return info
