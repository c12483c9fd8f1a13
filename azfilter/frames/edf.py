"""Single-frame, uncompressed EDF files (masks, darks, flats, ESRF frames) read without
fabio: importing fabio alone costs a run more than reading the file (it registers all of
its formats and imports h5py), and a run over CBF files with an EDF mask needs nothing else
from it.

Only the plainest case is read here: one header block ``{ key = value ; ... }`` padded to a
multiple of 512 bytes, ``Dim_1``/``Dim_2`` (no ``Dim_3``), a ``DataType`` fabio
knows, ``ByteOrder``, no ``Compression`` and no external binary file, and exactly the pixels
after the header (so one frame). Anything else returns None and fabio reads the file. The
pixels are identical to fabio's (tests/test_cbf.py); the header is fabio's, parsed by fabio
when first looked at.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import FrameReadError
from .common import _check_file, _exception_reason

BLOCK = 512

#: fabio's DataType names (the unambiguous ones) and their numpy types
DATA_TYPES = {
    "SignedByte": np.int8, "Signed8": np.int8, "UnsignedByte": np.uint8,
    "Unsigned8": np.uint8, "SignedShort": np.int16, "Signed16": np.int16,
    "UnsignedShort": np.uint16, "Unsigned16": np.uint16, "UnsignedShortInteger": np.uint16,
    "SignedInteger": np.int32, "Signed32": np.int32, "UnsignedInteger": np.uint32,
    "Unsigned32": np.uint32, "SignedLong": np.int32, "UnsignedLong": np.uint32,
    "Signed64": np.int64, "Unsigned64": np.uint64, "FloatValue": np.float32,
    "FLOATVALUE": np.float32, "FLOAT": np.float32, "Float": np.float32,
    "FloatIEEE32": np.float32, "Float32": np.float32, "Double": np.float64,
    "DoubleValue": np.float64, "FloatIEEE64": np.float64, "DoubleIEEE64": np.float64,
}
_BYTE_ORDERS = {"LOWBYTEFIRST": "<", "HIGHBYTEFIRST": ">"}
# keys that change how fabio reads the data: such files are left to it
_UNUSUAL_KEYS = {"COMPRESSION", "EDF_BINARYFILENAME", "EDF_BINARYFILEPOSITION",
                 "EDF_BINARYFILESIZE"}


def _header_end(content: bytes) -> int | None:
    """Offset of the first data byte: after the ``}`` + newline that closes the header."""
    if not content.startswith(b"{"):
        return None
    close = content.find(b"}", 0, 64 * BLOCK)
    if close < 0:
        return None
    if content[close + 1:close + 2] == b"\n":
        return close + 2
    if content[close + 1:close + 3] == b"\r\n":
        return close + 3
    return None


def layout(head: bytes, file_size: int) -> tuple[tuple[int, int], np.dtype, int] | None:
    """(shape, dtype, data offset) of a plain single-frame EDF whose first bytes are
    ``head`` (at least the header) and whose size is ``file_size``; None otherwise."""
    end = _header_end(head)
    if end is None or end % BLOCK != 0:
        return None
    values: dict[str, str] = {}
    try:
        text = head[1:head.rindex(b"}", 0, end)].decode("ascii")
    except (UnicodeDecodeError, ValueError):
        return None
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().upper()
        if not sep or not key or key in values or key in _UNUSUAL_KEYS:
            return None
        values[key] = value.strip()
    try:
        dim1, dim2 = int(values["DIM_1"]), int(values["DIM_2"])
        dtype = np.dtype(DATA_TYPES[values["DATATYPE"]])
        order = _BYTE_ORDERS[values["BYTEORDER"].upper()]
    except (KeyError, ValueError):
        return None
    if dim1 <= 0 or dim2 <= 0 or any(k.startswith("DIM_") and k not in ("DIM_1", "DIM_2")
                                     for k in values):
        return None
    nbytes = dim1 * dim2 * dtype.itemsize
    size = values.get("SIZE")
    if size is not None and size != str(nbytes):
        return None
    if file_size != end + nbytes:          # one frame, nothing after it
        return None
    return (dim2, dim1), dtype.newbyteorder(order), end


def read_edf(path: str, allocate: Callable[[tuple, Any], np.ndarray],
             index: int | None = None) -> tuple[np.ndarray, bytes] | None:
    """Read a plain single-frame ``.edf`` into ``allocate(shape, dtype)``; None when fabio
    must read it (compressed, several frames, an unusual header).

    Parameters
    ----------
    path : str
        An uncompressed ``.edf`` file.
    allocate : callable
        ``allocate(shape, dtype) -> numpy.ndarray`` (native byte order); a result that does
        not fit is replaced by a plain array.
    index : int, optional
        The frame index reported in errors.

    Returns
    -------
    (numpy.ndarray, bytes) or None
        The image and the header's bytes (for fabio's header parser, when the header is
        wanted); None: read the file with fabio.

    Raises
    ------
    FrameReadError
        For a missing or unreadable file.
    """
    _check_file(path)
    try:
        with open(path, "rb", buffering=0) as stream:
            head = stream.read(4 * BLOCK)
            size = os.fstat(stream.fileno()).st_size
            if _header_end(head) is None and b"}" not in head:
                head += stream.read(60 * BLOCK)
            found = layout(head, size)
            if found is None:
                return None
            shape, dtype, start = found
            out = allocate(shape, dtype.newbyteorder("="))
            if not (isinstance(out, np.ndarray) and out.flags.c_contiguous
                    and out.shape == shape and out.dtype == dtype.newbyteorder("=")):
                out = np.empty(shape, dtype.newbyteorder("="))
            stream.seek(start)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < len(view):
                n = stream.readinto(view[got:])
                if not n:
                    return None          # shorter than it was a moment ago: fabio says why
                got += n
    except OSError as exc:
        raise FrameReadError(path, index, _exception_reason(exc, "EDF")) from None
    if not dtype.isnative:
        out.byteswap(inplace=True)
    return out, head[:start]
