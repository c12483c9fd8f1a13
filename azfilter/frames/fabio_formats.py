"""EDF, CBF, TIFF and the other formats read through fabio: opening, frame counts, and the
capture of fabio's logged errors, which turns corrupt files into one-line read errors."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..errors import FrameReadError
from .common import (
    _DECODER_BUGS,
    _MAX_MESSAGE,
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
