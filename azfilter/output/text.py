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
    # One %-format over all rows: the same text as f"{x:.9e}" per number (both are Python's
    # correctly rounded float formatting), in 2/3 of the time of a per-row f-string.
    body = _rows_format(radial.size) % tuple(
        np.column_stack([radial.ravel(), intensity.ravel(), sigma.ravel()]).ravel().tolist())
    return "\n".join(lines) + "\n" + body


@functools.lru_cache(maxsize=8)
def _rows_format(rows: int) -> str:
    """The %-format of ``rows`` lines ``radial intensity sigma``."""
    return "%.9e %.9e %.9e\n" * rows


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


