"""EDF, CBF, TIFF and the other formats read through fabio: opening, frame counts, and the
capture of fabio's logged errors, which turns corrupt files into one-line read errors."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import FrameReadError
from . import cbf, edf
from .cbf import BINARY_START
from .cbf import precheck as precheck_cbf
from .common import (
    _DECODER_BUGS,
    _MAX_MESSAGE,
    LazyHeader,
    _check_file,
    _check_image,
    _exception_reason,
    _extension,
    _one_line,
)

logger = logging.getLogger(__name__)


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


#: EDF: ``Dim_<k>`` header keys; fabio loops over range(1, k), so a damaged key such as
#: Dim_2147483648 hangs it. Images have at most 3 dimensions.
_EDF_DIM_KEY = re.compile(rb"(?m)^\s*Dim_(\d+)\s*=")


def _open_maybe_compressed(path: str):
    lower = path.lower()
    if lower.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if lower.endswith(".bz2"):
        import bz2

        return bz2.open(path, "rb")
    return open(path, "rb")


def _precheck(path: str) -> None:
    """Refuse the damaged files that make fabio's readers loop forever (found by fuzzing).

    Raises
    ------
    FrameReadError
        Naming the file and the damage.
    """
    ext = _extension(path)
    try:
        if ext.startswith(".cbf"):
            with _open_maybe_compressed(path) as stream:
                # The header and the binary start lie in the first kilobytes: fabio reads the
                # file anyway, so read the rest only when they are not there (damaged files).
                content = stream.read(cbf.HEAD_BYTES)
                if BINARY_START not in content:
                    content += stream.read()
                    size = len(content)
                elif ext == ".cbf":
                    size = os.fstat(stream.fileno()).st_size
                else:                   # compressed: the decoded size needs the whole file
                    content += stream.read()
                    size = len(content)
            precheck_cbf(path, content, size)
        elif ext.startswith(".edf"):
            with _open_maybe_compressed(path) as stream:
                head = stream.read(65536)
            end = head.find(b"}")
            for match in _EDF_DIM_KEY.finditer(head[:end if end >= 0 else len(head)]):
                if int(match.group(1)) > 3:
                    raise FrameReadError(path, None, f"damaged EDF header: key "
                                         f"Dim_{match.group(1).decode()} (images have at "
                                         "most 3 dimensions)")
    except (OSError, EOFError, ValueError) as err:   # unreadable: fabio will say why
        logger.debug("%s: precheck skipped: %s", path, err)


class _FabioSource:
    """A file opened through fabio; frames are read one at a time with ``getframe``.

    A miniCBF that :mod:`.cbf` reads itself (byte offset, the usual header) is decoded here
    without fabio, into ``allocate(shape, dtype)`` when given: :attr:`native` then holds its
    (image, header).
    """

    def __init__(self, path: str, allocate: Callable[[tuple, Any], np.ndarray] | None = None):
        _check_file(path)
        self.path = path
        self.source = path
        self.native: tuple[np.ndarray, Mapping] | None = None
        ext = _extension(path)
        if ext.startswith(".cbf") or ext == ".edf":
            is_cbf = ext.startswith(".cbf")
            read = cbf.read_cbf if is_cbf else edf.read_edf
            native = read(path, allocate if allocate is not None else np.empty)
            if native is not None:
                data, head = native
                parse = _cbf_header if is_cbf else _edf_header
                self.native = (data, LazyHeader(lambda: parse(path, head), path))
                self.image = None
                self.format, self.nframes = ("CBF" if is_cbf else "EDF"), 1
                return
        _precheck(path)
        what = _fabio_format_name(path)
        fabio = _import_fabio()
        with _fabio_guard(path, None, what):
            self.image = fabio.open(path)
        self.format = _fabio_format_name(path, self.image)
        self.nframes = int(getattr(self.image, "nframes", 1) or 1)

    def read(self, index: int) -> tuple[np.ndarray, Mapping]:
        if self.native is not None:
            if index != 0:
                raise FrameReadError(self.source, index,
                                     f"a single-frame {self.format} file (frame 0 only)")
            data, header = self.native
            return _check_image(data, self.source, index), header
        with _fabio_guard(self.source, index, self.format):
            frame = self.image if index == 0 else self.image.getframe(index)
            data = frame.data
            header = dict(frame.header)
        if data is None:
            raise FrameReadError(self.source, index, f"no image data in this {self.format} file")
        return _check_image(data, self.source, index), header

    def close(self) -> None:
        self.native = None
        close = getattr(self.image, "close", None)
        if close is not None:
            try:
                close()
            except Exception:      # closing a half-read file must not hide the real error
                pass


def _cbf_header(path: str, head: bytes) -> dict[str, Any]:
    """fabio's header of a CBF whose bytes up to its binary data are ``head``."""
    import io

    _import_fabio()
    from fabio.cbfimage import CbfImage

    image = CbfImage()
    stream = io.BytesIO(head)
    stream.name = path
    with _fabio_guard(path, 0, "CBF"):
        image._readheader(stream)
    return dict(image.header)


def _edf_header(path: str, head: bytes) -> dict[str, Any]:
    """fabio's header of a single-frame EDF whose header bytes are ``head``."""
    import io

    _import_fabio()
    from fabio.edfimage import EdfImage

    stream = io.BytesIO(head)
    stream.name = path
    with _fabio_guard(path, 0, "EDF"):
        block = EdfImage._read_header_block(stream, 0)
    return dict(block.header)


def _fabio_frame_count(path: str) -> int:
    """Frames in a fabio file, reading as little as possible."""
    ext = _extension(path)
    if ext.startswith(".cbf"):
        _check_file(path)
        return 1                    # CBF files hold one image
    if ext == ".edf":
        _check_file(path)
        try:
            with open(path, "rb") as stream:
                head = stream.read(4 * edf.BLOCK)
                if edf.layout(head, os.fstat(stream.fileno()).st_size) is not None:
                    return 1            # a plain single-frame EDF (read without fabio)
        except OSError:
            pass                        # fabio says why below
    fabio = _import_fabio()
    if ext.startswith(".edf"):
        _check_file(path)
        _precheck(path)
        with _fabio_guard(path, None, "EDF"):
            header = fabio.openheader(path)     # EDF headers carry the frame count
        return int(header.nframes or 1)
    reader = _FabioSource(path)     # TIFF: fabio's header-only reader does not count pages
    try:
        return reader.nframes
    finally:
        reader.close()
