from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..fileio import atomic_write_text
from ..outliers import text_lines as outlier_text_lines
from ..vocabulary import COMPRESSION_SUFFIXES
from .meta import PROGRAM, TEXT_CONFIG_PREFIX, OutputMeta, format_value, to_json


def source_stem(source: str) -> str:
    """File name stem of a source: ``/d/img_001.cbf.gz`` → ``img_001``, ``f.h5::/p`` → ``f``."""
    name = os.path.basename(source.split("::", 1)[0])
    lower = name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem, ext = os.path.splitext(name)
    return stem if stem else name


def text_suffix(unit: str) -> str:
    """``.xy`` for ``2th_deg`` (as pyFAI-waxs), ``.dat`` otherwise."""
    return ".xy" if unit == "2th_deg" else ".dat"


def text_output_name(source: str, index: int, nframes: int | None, unit: str) -> str:
    """``<stem>.dat`` for a single-frame file, ``<stem>_<frame:05d>.dat`` for a stack."""
    stem = source_stem(source)
    if nframes is None or nframes > 1:
        stem = f"{stem}_{index:05d}"
    return stem + text_suffix(unit)


def sector_paths(path: Path, n_sectors: int | None) -> list[Path]:
    """The text files of one frame: ``path`` itself, or with sectors one file per sector,
    ``<stem>_sector<k>.<suffix>`` (k zero-padded to the width of the last index)."""
    if not n_sectors:
        return [path]
    width = len(str(n_sectors - 1))
    return [path.with_name(f"{path.stem}_sector{k:0{width}d}{path.suffix}")
            for k in range(n_sectors)]


# ---------------------------------------------------------------------------- text


def text_header(meta: OutputMeta, source: str | None, index: int | None,
                nframes: int | None) -> list[str]:
    """The ``#`` header lines of a text output (without the column line)."""
    lines = [f"# {PROGRAM} {__version__}", f"# operation: {meta.operation}"]
    for key, value in meta.parameters.items():
        lines.append(f"# {key}: {format_value(value)}")
    lines.append("# == geometry ==")
    lines += [f"# {line}" for line in meta.geometry]
    lines += [f"# poni> {line}" for line in meta.poni_text.splitlines()
              if line.strip() and not line.startswith("#")]
    if source is not None:
        lines.append(f"# source: {source}")
    if index is not None:
        total = "?" if nframes is None else str(nframes)
        lines.append(f"# frame: {index} of {total}")
    if meta.shard:
        lines.append(f"# shard: {meta.shard}")
    lines.append(f"# date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    lines.append(TEXT_CONFIG_PREFIX + to_json(meta.config))
    return lines


def format_text(result: Any, meta: OutputMeta, source: str | None = None,
                index: int | None = None, nframes: int | None = None) -> str:
    """The full text output of one frame: header, column line, ``radial intensity sigma``.

    A result with outlier statistics (sigma-clip, medfilt) adds three header lines before
    the column line: ``# outliers: rejected=… rejected_sum=… picked=… max_sigma=… pick=…``
    and the per-bin ``# kept: …`` and ``# available: …`` (npt integers each).
    """
    radial = np.asarray(result.radial, dtype=np.float64)
    intensity = np.asarray(result.intensity, dtype=np.float64)
    sigma = np.asarray(result.sigma, dtype=np.float64)
    if not radial.shape == intensity.shape == sigma.shape:
        raise ValueError(f"radial, intensity and sigma differ in shape: {radial.shape}, "
                         f"{intensity.shape}, {sigma.shape}")
    lines = text_header(meta, source, index, nframes)
    outliers = getattr(result, "outliers", None)
    if outliers is not None:
        lines += outlier_text_lines(outliers)
    lines.append(f"# {meta.unit} intensity sigma")
    body = format_rows(np.column_stack([radial.ravel(), intensity.ravel(), sigma.ravel()]))
    return "\n".join(lines) + "\n" + body


# ---------------------------------------------------------------------------- number rows
#
# The rows of a text output are ``"%.9e %.9e %.9e\n" % row``: Python's correctly rounded
# formatting, ~0.7 us a number (dtoa, then an snprintf of the exponent), which made formatting
# most of the writer's time (100 Pilatus 1M files: 3000 numbers each). format_rows writes the
# same characters with numpy, ~10x faster, and leaves to Python's own formatting every number
# for which its arithmetic could round differently.
#
# Why it is exact: a finite x with 1e-12 <= |x| < 1e31 has a decimal exponent e (from a
# table of exact powers of ten: searchsorted); scaled = |x| * 10**(9 - e) is one correctly
# rounded multiplication or division by an exact power of ten (10**k is an exact double for
# k <= 22), so |scaled - exact| <= half an ulp of a number below 1e10, < 1e-6, and rounding is
# monotonic: the exact product and scaled are on the same side of every half-integer (which
# are doubles here), or scaled lands on it. So when scaled is not a tie (its fraction is kept
# 1e-5 away from one half, where 0 would do), rint(scaled) is the exact product rounded to the
# nearest integer, i.e. the ten significant digits Python prints. scaled >= 1e9 checks
# that e is not one too high (the exact product is >= 1e9 exactly when |x| >= 10**e, and
# rounding is monotonic); rint(scaled) < 1e10 that it is not one too low and that rounding did
# not carry into an eleventh digit. Zeros are written as Python writes them; everything else
# (nan, inf, tiny or huge values, near-ties, carries: a few numbers in a thousand at most) is
# formatted by Python.

_EXPONENT_LOW, _EXPONENT_HIGH = -12, 30
#: 10**e for e in [_EXPONENT_LOW, _EXPONENT_HIGH]: the doubles nearest to them
_POWERS = np.array([float(f"1e{e}") for e in range(_EXPONENT_LOW, _EXPONENT_HIGH + 1)])
_SHIFTS = [9 - e for e in range(_EXPONENT_LOW, _EXPONENT_HIGH + 1)]
# |x| * _SCALE_UP[j] / _SCALE_DOWN[j]: one of the two is 1.0 (exact), the other 10**|9 - e|
_SCALE_UP = np.array([float(f"1e{k}") if k > 0 else 1.0 for k in _SHIFTS])
_SCALE_DOWN = np.array([float(f"1e{-k}") if k < 0 else 1.0 for k in _SHIFTS])


def _ascii_word(text: str, byte: int = 0) -> int:
    """``text`` as the bytes of a little-endian integer, starting at byte ``byte``."""
    return sum(ord(char) << (8 * (byte + i)) for i, char in enumerate(text))


# A formatted number "d.ddddddddde+XX" plus its separator is 16 bytes: two little-endian
# uint64 words, "d.dddddd" and "ddde+XX" + separator, assembled from these tables.
_LEAD = np.array([_ascii_word(f"{d}.") for d in range(10)], np.uint64)
_THREE = np.arange(1000, dtype=np.uint64)
_DIGITS3_AT0 = (_THREE // 100 + 48) | (_THREE // 10 % 10 + 48) << np.uint64(8) | \
    (_THREE % 10 + 48) << np.uint64(16)
_DIGITS3_AT2 = _DIGITS3_AT0 << np.uint64(16)
_DIGITS3_AT5 = _DIGITS3_AT0 << np.uint64(40)
_EXPONENTS = np.array([_ascii_word(f"e{e:+03d}", 3)
                       for e in range(_EXPONENT_LOW, _EXPONENT_HIGH + 1)], np.uint64)
# With a minus sign or a number formatted by Python: a sign byte (0 or "-"), the two words,
# room for the longest "%.9e" ("-1.234567890e-308" and its separator: 18 bytes); the zero
# bytes are dropped when the rows are joined.
_PADDED = np.dtype([("sign", "u1"), ("words", "<u8", (2,)), ("rest", "u1", (7,))])


@functools.lru_cache(maxsize=8)
def _separators(rows: int, columns: int) -> np.ndarray:
    """The last byte of each number's second word: a space, or a newline ending its row."""
    row = np.full(columns, _ascii_word(" ", 7), np.uint64)
    row[-1] = _ascii_word("\n", 7)
    return np.tile(row, rows)


def format_rows(table: Any) -> str:
    """The text of ``"%.9e %.9e ... %.9e\\n" % row`` for each row of a 2-D array, exactly.

    Parameters
    ----------
    table : array_like
        2-D, one output row per row (converted to float64).

    Returns
    -------
    str
        Character for character what Python's ``%.9e`` formatting gives (``nan``, ``inf``,
        ``-0.000000000e+00`` and three-digit exponents included), one line per row.
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"format_rows takes a 2-D array, got {table.ndim} dimensions")
    rows, columns = table.shape
    values = np.ascontiguousarray(table).reshape(-1)
    count = values.size
    if count == 0:
        return ""
    magnitude = np.abs(values)
    # index of the largest power of ten <= |x| (nan sorts last), clipped into the tables
    power = np.searchsorted(_POWERS, magnitude, side="right")
    power -= 1
    np.clip(power, 0, _EXPONENT_HIGH - _EXPONENT_LOW, out=power)
    scaled = magnitude * _SCALE_UP[power]
    scaled /= _SCALE_DOWN[power]
    mantissa = np.rint(scaled)
    with np.errstate(invalid="ignore"):      # nan and inf: not exact, formatted by Python
        distance_to_tie = scaled - np.floor(scaled)
        distance_to_tie -= 0.5
        exact = (scaled >= 1e9) & (mantissa < 1e10) & (np.abs(distance_to_tie) > 1e-5)
        mantissa[~exact] = 1e9
    zero = magnitude == 0.0                  # "0.000000000e+00" (empty bins' sigma)
    if zero.any():
        exact |= zero
        mantissa[zero] = 0.0
        power[zero] = -_EXPONENT_LOW
    digits = mantissa.astype(np.int64)
    lead = digits // 1000000000
    digits -= lead * 1000000000
    first3 = digits // 1000000
    digits -= first3 * 1000000
    middle3 = digits // 1000
    digits -= middle3 * 1000
    negative = np.signbit(values)           # -0.0 too: "-0.000000000e+00"
    plain = bool(exact.all()) and not negative.any()
    if plain:                                # every number 16 bytes: no padding to drop
        out = np.empty((count, 2), np.uint64)
        words = out
    else:
        out = np.zeros(count, _PADDED)
        out["sign"][negative] = ord("-")
        words = out["words"]
    np.bitwise_or(_LEAD[lead], _DIGITS3_AT2[first3], out=words[:, 0])
    words[:, 0] |= _DIGITS3_AT5[middle3]
    np.bitwise_or(_DIGITS3_AT0[digits], _EXPONENTS[power], out=words[:, 1])
    words[:, 1] |= _separators(rows, columns)
    if plain:
        return out.tobytes().decode("ascii")
    padded = out.view(np.uint8).reshape(count, _PADDED.itemsize)
    for i in np.flatnonzero(~exact).tolist():
        separator = "\n" if i % columns == columns - 1 else " "
        text = f"{float(values[i]):.9e}{separator}"
        padded[i] = 0
        padded[i, :len(text)] = np.frombuffer(text.encode("ascii"), np.uint8)
    return out.tobytes().translate(None, b"\0").decode("ascii")


def text_output_complete(path: str | os.PathLike, npt: int) -> bool:
    """True when ``path`` is a finished text output with ``npt`` rows of three numbers.

    The file must end with a newline and hold exactly ``npt`` non-comment lines, each of
    three numbers (``nan`` for an empty bin). Every row is checked, not only the first and
    last: a file damaged in the middle is redone by ``--skip-existing``. About 1 ms per
    1000-row file, fast enough for thousands of outputs every minute in cron.
    """
    try:
        with open(path, "rb") as stream:
            content = stream.read()
    except OSError:
        return False
    if not content.endswith(b"\n"):
        return False
    rows = [line for line in content.split(b"\n") if line and not line.startswith(b"#")]
    if len(rows) != npt:
        return False
    for line in rows:
        fields = line.split()
        if len(fields) != 3:
            return False
        try:
            [float(f) for f in fields]
        except ValueError:
            return False
    return True


def write_text(path: str | os.PathLike, result: Any, meta: OutputMeta, source: str | None,
               index: int | None, nframes: int | None) -> None:
    """Write one frame's text output atomically (temporary file + rename)."""
    atomic_write_text(path, format_text(result, meta, source, index, nframes))


# ---------------------------------------------------------------------------- NeXus


