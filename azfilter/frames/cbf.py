"""miniCBF files (Pilatus, Eiger) read without fabio: the MIME header parsed here, the
byte-offset data decoded by the compiled :mod:`azfilter._cbf` straight into the caller's
buffer, outside the GIL.

Only the common case is read here: a binary section with ``conversions="x-CBF_BYTE_OFFSET"``,
an integer element type fabio knows, ``_array_data.data`` opening it, found where fabio
finds it. Anything else (another compression, a header fabio would read differently, no
compiled decoder) is left to fabio (:class:`~.fabio_formats._FabioSource`): :func:`parse`
returns None. The pixels are bit-identical to fabio's (tests/test_cbf.py), with one
documented exception: fabio's int32 decoder does not know the 64-bit escape of the CBF
specification; here it is decoded as the specification (and fabio's decoder for every
other element type) says.

The Content-MD5 of the binary data is checked as fabio does by default; a mismatch makes the
frame fail, as fabio's logged error does through :func:`~.fabio_formats._fabio_guard`.
:func:`precheck` refuses the damaged files that make fabio's reader loop or crash (found by
fuzzing); it runs before fabio too.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FrameReadError
from .common import _MAX_MESSAGE, _check_file, _exception_reason, _extension, _one_line

#: the marker that opens the MIME header of the binary section
SECTION = b"--CIF-BINARY-FORMAT-SECTION--"
#: the bytes that start the binary data
BINARY_START = b"\x0c\x1a\x04\xd5"
#: fabio looks for :data:`SECTION` in the first 16 blocks of 512 bytes only
SECTION_SEARCH = 16 * 512

#: X-Binary-Element-Type values and their numpy types (fabio's DATA_TYPES)
ELEMENT_TYPES = {
    "signed 8-bit integer": np.dtype(np.int8),
    "signed 16-bit integer": np.dtype(np.int16),
    "signed 32-bit integer": np.dtype(np.int32),
    "signed 64-bit integer": np.dtype(np.int64),
    "unsigned 8-bit integer": np.dtype(np.uint8),
    "unsigned 16-bit integer": np.dtype(np.uint16),
    "unsigned 32-bit integer": np.dtype(np.uint32),
    "unsigned 64-bit integer": np.dtype(np.uint64),
}

# The text before SECTION must end with the CIF item that holds the binary section
# (``_array_data.data`` then a ``;`` text-field line), as fabio needs it.
_DATA_ITEM = b"_array_data.data"


def _decoder() -> Callable | None:
    """The compiled decoder, or None when the extension is not built (source tree)."""
    try:
        from .._cbf import decode_byte_offset
    except ImportError:
        return None
    return decode_byte_offset


_DECODE = _decoder()


def available() -> bool:
    """True when the compiled byte-offset decoder is built (else fabio reads every CBF)."""
    return _DECODE is not None


@dataclass(frozen=True)
class MiniCbf:
    """Where a miniCBF's pixels are and what they are.

    Attributes
    ----------
    shape : tuple of int
        (slow, fast) = (X-Binary-Size-Second-Dimension, X-Binary-Size-Fastest-Dimension).
    dtype : numpy.dtype
        From X-Binary-Element-Type.
    start : int
        Offset of the binary data (after the 4 start bytes) in the file's bytes.
    size : int
        X-Binary-Size: bytes of binary data.
    md5 : bytes or None
        Content-MD5 (base64), checked when present.
    """

    shape: tuple[int, int]
    dtype: np.dtype
    start: int
    size: int
    md5: bytes | None


#: bytes of a CBF read to check its headers (Pilatus/Eiger headers take a few kB)
HEAD_BYTES = 256 * 1024
_CBF_KEYS = {
    "size": rb"X-Binary-Size:\s*(\d+)",
    "elements": rb"X-Binary-Number-of-Elements:\s*(\d+)",
    "fastest": rb"X-Binary-Size-Fastest-Dimension:\s*(\d+)",
    "second": rb"X-Binary-Size-Second-Dimension:\s*(\d+)",
}


def precheck(path: str, content: bytes, size: int) -> None:
    """A CBF's binary section must be there and agree with its MIME header: fabio's reader
    loops forever without the section and its byte-offset decoder trusts the sizes (a damaged
    header crashed the process)."""
    # fabio looks for the MIME section in the first 16 blocks of 512 bytes, then for the
    # binary start after it, reading on forever when it is not there.
    section = content.find(SECTION, 0, 16 * 512)
    if section < 0:
        if any(mark in content for mark in (SECTION, BINARY_START,
                                              b"_array_data.data")):
            raise FrameReadError(path, None, "corrupt or truncated CBF file: no binary section "
                                 "header in its first 8 kB")
        return                      # no binary data at all: fabio reports it itself
    start = content.find(BINARY_START, section)
    if start < 0:
        raise FrameReadError(path, None, "corrupt or truncated CBF file: its binary section "
                             "is missing (a file still being written?)")
    header = content[section:start]
    values = {}
    for name, pattern in _CBF_KEYS.items():
        matches = re.findall(pattern, header)
        match = matches[-1] if matches else None      # fabio keeps the last value
        if match is None:
            raise FrameReadError(path, None, f"corrupt or truncated CBF file: no "
                                 f"{pattern.split(b':')[0].decode()}")
        values[name] = int(match)
    available = size - start - len(BINARY_START)
    if values["size"] > available:
        raise FrameReadError(path, None, f"corrupt or truncated CBF file: {values['size']} "
                             f"bytes of binary data announced, {available} present")
    if values["fastest"] * values["second"] != values["elements"] or values["elements"] == 0:
        raise FrameReadError(path, None, "corrupt or truncated CBF file: "
                             f"{values['fastest']} x {values['second']} is not "
                             f"{values['elements']} elements")


def _mime_lines(header: bytes) -> dict[str, str] | None:
    """The MIME header's ``key: value`` (or ``key=value``) lines as fabio reads them: from
    the line after SECTION to the first line shorter than 10 bytes; values stripped of
    blanks and quotes. None when a line is not ASCII or has neither separator."""
    values: dict[str, str] = {}
    for line in header.split(b"\n")[1:]:
        if len(line) < 10:
            break
        key, sep, value = line.partition(b":")
        if not sep:
            key, sep, value = line.partition(b"=")
            if not sep:
                return None
        try:
            values[key.strip().decode("ascii")] = value.strip(b' "\n\r\t').decode("ascii")
        except UnicodeDecodeError:
            return None
    return values


def parse(content: bytes) -> MiniCbf | None:
    """The layout of a miniCBF in ``content`` (the whole file), or None when this reader
    does not handle the file (fabio then reads it; it also reports the damaged ones).

    Files that would make fabio loop or crash are refused before this by
    :func:`precheck`; the sizes are checked again here, so that the
    decoder is never given a range outside ``content``.
    """
    if _DECODE is None:
        return None
    section = content.find(SECTION, 0, SECTION_SEARCH)
    if section < 0:
        return None
    before = content[:section].rstrip()
    if not before.endswith(b"\n;") or not before[:-1].rstrip().endswith(_DATA_ITEM):
        return None
    binary = content.find(BINARY_START, section, section + 65536)
    if binary < 0:
        return None
    mime = _mime_lines(content[section:binary])
    if mime is None or mime.get("conversions") != "x-CBF_BYTE_OFFSET":
        return None
    dtype = ELEMENT_TYPES.get(mime.get("X-Binary-Element-Type", ""))
    if dtype is None:
        return None
    try:
        fast = int(mime["X-Binary-Size-Fastest-Dimension"])
        slow = int(mime["X-Binary-Size-Second-Dimension"])
        size = int(mime["X-Binary-Size"])
        elements = int(mime["X-Binary-Number-of-Elements"])
    except (KeyError, ValueError):
        return None
    start = binary + len(BINARY_START)
    if fast <= 0 or slow <= 0 or fast * slow != elements or size < 0 \
            or start + size > len(content):
        return None
    third = mime.get("X-Binary-Size-Third-Dimension")
    if third is not None and third.strip() != "1":
        return None
    md5 = mime.get("Content-MD5")
    return MiniCbf(shape=(slow, fast), dtype=dtype, start=start, size=size,
                   md5=None if md5 is None else md5.encode("ascii"))


def check_md5(content: bytes, layout: MiniCbf) -> None:
    """Compare the binary data with its Content-MD5, as fabio does by default.

    Raises
    ------
    ValueError
        On a mismatch (fabio's message).
    """
    if layout.md5 is None:
        return
    payload = memoryview(content)[layout.start:layout.start + layout.size]
    digest = base64.b64encode(hashlib.md5(payload).digest())   # hashlib releases the GIL
    if digest != layout.md5:
        raise ValueError(f"Checksum of binary data mismatch: expected {layout.md5!r}, "
                         f"got {digest!r}")


def decode(content: bytes, layout: MiniCbf, out: np.ndarray) -> None:
    """Decode the pixels of ``content`` (laid out as ``layout``) into ``out``.

    Parameters
    ----------
    content : bytes
        The whole file.
    layout : MiniCbf
        From :func:`parse`.
    out : numpy.ndarray
        C-contiguous, ``layout.shape`` and ``layout.dtype``.

    Raises
    ------
    ValueError
        When the data end before the last pixel.
    """
    _DECODE(memoryview(content)[layout.start:layout.start + layout.size], out.reshape(-1))


def read_file(path: str) -> bytes:
    """The bytes of ``path`` (``.cbf.gz``/``.cbf.bz2`` decompressed)."""
    ext = _extension(path)
    if ext == ".cbf.gz":
        import gzip

        with gzip.open(path, "rb") as stream:
            return stream.read()
    if ext == ".cbf.bz2":
        import bz2

        with bz2.open(path, "rb") as stream:
            return stream.read()
    with open(path, "rb", buffering=0) as stream:
        return stream.read()


def read_cbf(path: str, allocate: Callable[[tuple, Any], np.ndarray],
             index: int | None = None) -> tuple[np.ndarray, bytes] | None:
    """Read a single-frame miniCBF into ``allocate(shape, dtype)``; None when fabio must.

    Parameters
    ----------
    path : str
        A ``.cbf`` (or ``.cbf.gz``/``.cbf.bz2``) file.
    allocate : callable
        ``allocate(shape, dtype) -> numpy.ndarray``: the frame's buffer (e.g. the engine's
        page-locked ring); a result that does not fit is replaced by a plain array.
    index : int, optional
        The frame index reported in errors (None: the file as a whole).

    Returns
    -------
    (numpy.ndarray, bytes) or None
        The image and the file's bytes up to its data (for fabio's header parser, when the
        header is wanted); None when the file is not one this reader handles (another
        compression, an unusual header): read it with fabio.

    Raises
    ------
    FrameReadError
        For a missing, unreadable or damaged file (one line naming the file).
    """
    if _DECODE is None:
        return None
    _check_file(path)
    try:
        content = read_file(path)
    except (OSError, EOFError, ValueError) as exc:
        raise FrameReadError(path, index, _exception_reason(exc, "CBF")) from None
    try:
        precheck(path, content, len(content))
    except FrameReadError as exc:
        raise FrameReadError(path, index, exc.reason) from None
    layout = parse(content)
    if layout is None:
        return None
    try:
        check_md5(content, layout)          # before a buffer of the caller's ring is taken
        out = allocate(layout.shape, layout.dtype)
        if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
                and out.shape == layout.shape and out.dtype == layout.dtype):
            out = np.empty(layout.shape, layout.dtype)
        decode(content, layout, out)
    except ValueError as exc:
        raise FrameReadError(path, index, "corrupt or truncated CBF file ("
                             f"{_one_line(str(exc), _MAX_MESSAGE)})") from None
    return out, content[:layout.start]
