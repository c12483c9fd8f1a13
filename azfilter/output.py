"""Writers and readers of 1-D results: text (``.dat`` / ``.xy``) and NeXus/HDF5.

Text: one file per frame, ``#`` header lines (program, operation and parameters, PONI
geometry, detector, source file and frame, the job config as one JSON line), a ``#`` column
line, then three columns ``radial intensity sigma`` that ``numpy.loadtxt`` reads (empty bins
are ``nan``).

NeXus (design §5), one file for all frames::

    /                     @default="entry"
    /entry                NXentry, @default="data"
        reduction         NXprocess: program, version, date, operation,
                          configuration (NXnote, JSON), poni (NXnote, PONI text)
        data              NXdata, @signal="intensity", @axes=[".", <radial>], @<radial>_indices=1
            intensity            (n_frames, npt) float32
            intensity_errors     (n_frames, npt) float32   sigma (standard error of the mean)
            std                  (n_frames, npt) float32   spread of the pixels in the ring
            count                (n_frames, npt) float32   pixels (fragments) per bin
            sum_signal, sum_variance, sum_normalization, sum_normalization2
                                 (n_frames, npt) float64   accumulators, to re-bin or merge
            <radial>             (npt,) float64, @units, @long_name, @unit_name
            source               (n_frames,) str  input file (``file.h5::/path`` for datasets)
            frame_index          (n_frames,) int64 frame index inside the source

``<radial>`` is the quantity: ``q``, ``2th`` or ``r``; its ``units`` attribute gives the unit
(``nm^-1``, ``A^-1``, ``deg``, ``rad``, ``mm``) and ``unit_name`` azfilter's unit name.

Every output appears atomically: it is written under a temporary name in the same folder and
renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import AzfilterError
from .fileio import atomic_write_text, new_file_mode, temporary_path
from .units import get_unit
from .vocabulary import COMPRESSION_SUFFIXES

PROGRAM = "azfilter"
TEXT_CONFIG_PREFIX = "# config: "

# Per-bin arrays written to HDF5: (dataset name, Result attribute, dtype).
ROW_ARRAYS = (
    ("intensity", "intensity", np.float32),
    ("intensity_errors", "sigma", np.float32),
    ("std", "std", np.float32),
    ("count", "count", np.float32),
    ("sum_signal", "sum_signal", np.float64),
    ("sum_variance", "sum_variance", np.float64),
    ("sum_normalization", "sum_normalization", np.float64),
    ("sum_normalization2", "sum_normalization2", np.float64),
)
REQUIRED_ROW_ARRAYS = ("intensity", "intensity_errors")


# ---------------------------------------------------------------------------- metadata


@dataclass
class OutputMeta:
    """What every output of one job says about how it was made.

    Attributes
    ----------
    operation : str
        ``"integrate"``, ``"sigma-clip"`` or ``"medfilt"``.
    unit : str
        Radial unit name (``"q_nm^-1"``...).
    parameters : dict
        Every parameter of the reduction, in the order to print them.
    poni_text : str
        The PONI text of the geometry.
    geometry : list of str
        Human-readable geometry lines (detector, beam centre, wavelength); see
        :func:`geometry_lines`.
    config : dict
        The job config (JSON-serialisable) that reruns the job.
    shard : str or None
        ``"I/N"`` when this output holds one shard of the job.
    """

    operation: str
    unit: str
    parameters: dict[str, Any]
    poni_text: str
    geometry: list[str]
    config: dict[str, Any]
    shard: str | None = None


def beam_centre(geometry: Any) -> tuple[float, float, float, float]:
    """Where the direct beam meets the detector plane (Fit2D-style numbers).

    Solving ``t1 = t2 = 0`` for the rotated pixel position gives, independently of rot3,
    ``P1 = poni1 + dist·tan(rot2)/cos(rot1)`` and ``P2 = poni2 − dist·tan(rot1)``.

    Returns
    -------
    x, y : float
        Beam centre in pixels along dim2 (x, columns) and dim1 (y, rows), measured from the
        detector origin in the PONI frame (pixel i spans [i, i+1]); with no tilt it is
        ``poni2/pixel2, poni1/pixel1``.
    direct_distance : float
        Sample to beam-centre distance along the beam (m), ``dist/(cos rot1 cos rot2)``.
    tilt : float
        Angle between the beam and the detector normal (degrees).
    """
    c1, c2 = math.cos(geometry.rot1), math.cos(geometry.rot2)
    p1 = geometry.poni1 + geometry.dist * math.tan(geometry.rot2) / c1
    p2 = geometry.poni2 - geometry.dist * math.tan(geometry.rot1)
    detector = geometry.detector
    tilt = math.degrees(math.acos(max(-1.0, min(1.0, c1 * c2))))
    return p2 / detector.pixel2, p1 / detector.pixel1, geometry.dist / (c1 * c2), tilt


def geometry_lines(geometry: Any) -> list[str]:
    """Human-readable description of a geometry: detector, distance, PONI, beam centre,
    wavelength (one item per line, no ``#``)."""
    detector = geometry.detector
    shape = "x".join(str(n) for n in detector.shape) if detector.shape else "from the image"
    lines = [
        f"Detector: {detector.display_name} ({detector.name}), shape {shape}, "
        f"pixel {detector.pixel1 * 1e6:.4g} x {detector.pixel2 * 1e6:.4g} um, "
        f"orientation {detector.orientation}",
        f"Distance: {geometry.dist:.6g} m (sample to detector plane)",
        f"PONI: poni1={geometry.poni1:.6g} m, poni2={geometry.poni2:.6g} m",
        f"Rotations: rot1={geometry.rot1:.6g} rot2={geometry.rot2:.6g} "
        f"rot3={geometry.rot3:.6g} rad",
    ]
    x, y, direct, tilt = beam_centre(geometry)
    lines.append(
        f"Beam centre (Fit2D): x={x:.3f} y={y:.3f} pixels, direct-beam distance "
        f"{direct * 1e3:.3f} mm, tilt {tilt:.4f} deg"
    )
    if geometry.wavelength is None:
        lines.append("Wavelength: not set (q units unavailable)")
    else:
        lines.append(
            f"Wavelength: {geometry.wavelength:.6g} m ({geometry.wavelength * 1e10:.6g} A, "
            f"{geometry.energy:.6g} keV)"
        )
    return lines


def radial_dataset_name(unit: str) -> str:
    """Name of the radial-axis dataset: the unit's quantity (``q``, ``2th``, ``r``)."""
    return get_unit(unit).quantity


# ---------------------------------------------------------------------------- helpers


def _array(result: Any, name: str) -> np.ndarray | None:
    value = getattr(result, name, None)
    return None if value is None else np.asarray(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    return str(value)


def to_json(value: Any) -> str:
    """One-line JSON of configs and parameters (numpy scalars and paths allowed)."""
    return json.dumps(value, default=_json_default, separators=(", ", ": "))


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(_format_value(v) for v in value)
    return str(value)


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


# ---------------------------------------------------------------------------- text


def text_header(meta: OutputMeta, source: str | None, index: int | None,
                nframes: int | None) -> list[str]:
    """The ``#`` header lines of a text output (without the column line)."""
    lines = [f"# {PROGRAM} {__version__}", f"# operation: {meta.operation}"]
    for key, value in meta.parameters.items():
        lines.append(f"# {key}: {_format_value(value)}")
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
    """The full text output of one frame: header, column line, ``radial intensity sigma``."""
    radial = np.asarray(result.radial, dtype=np.float64)
    intensity = np.asarray(result.intensity, dtype=np.float64)
    sigma = np.asarray(result.sigma, dtype=np.float64)
    lines = text_header(meta, source, index, nframes)
    lines.append(f"# {meta.unit} intensity sigma")
    body = "\n".join(
        f"{x:.9e} {i:.9e} {s:.9e}" for x, i, s in zip(radial.tolist(), intensity.tolist(),
                                                       sigma.tolist(), strict=True)
    )
    return "\n".join(lines) + "\n" + body + "\n"


def text_output_complete(path: str | os.PathLike, npt: int) -> bool:
    """True when ``path`` is a finished text output with ``npt`` rows of three numbers.

    Fast enough to run over thousands of outputs every minute (``--skip-existing`` in cron):
    the file must end with a newline, hold exactly ``npt`` non-comment lines, and its first
    and last rows must be three numbers.
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
    for line in (rows[0], rows[-1]) if rows else ():
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


def _chunk_rows(npt: int, itemsize: int) -> int:
    # ~256 kB chunks, at most 64 rows: a reader of one frame decompresses little.
    return int(max(1, min(64, (256 * 1024) // max(1, npt * itemsize))))


class _NexusFile:
    """An open azfilter NeXus file being written (rows appended to resizable datasets)."""

    def __init__(self, handle: Any):
        self.h5 = handle
        self.data = handle["entry/data"]

    @classmethod
    def create(cls, filename: Path, meta: OutputMeta, radial: np.ndarray,
               arrays: Sequence[str]) -> _NexusFile:
        import h5py

        unit = get_unit(meta.unit)
        radial_name = unit.quantity
        npt = int(radial.shape[0])
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        h5 = h5py.File(filename, "w")
        h5.attrs["NX_class"] = "NXroot"
        h5.attrs["creator"] = f"{PROGRAM} {__version__}"
        h5.attrs["file_time"] = now
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        entry["title"] = f"azfilter {meta.operation}"
        entry["program_name"] = PROGRAM
        entry["program_name"].attrs["version"] = __version__
        entry["start_time"] = now
        entry["end_time"] = now

        process = entry.create_group("reduction")
        process.attrs["NX_class"] = "NXprocess"
        process["program"] = PROGRAM
        process["version"] = __version__
        process["date"] = now
        process["sequence_index"] = 1
        process["operation"] = meta.operation
        if meta.shard:
            process["shard"] = meta.shard
        configuration = process.create_group("configuration")
        configuration.attrs["NX_class"] = "NXnote"
        configuration["type"] = "application/json"
        configuration["description"] = "azfilter job configuration (reruns the job)"
        configuration["data"] = to_json(meta.config)
        poni = process.create_group("poni")
        poni.attrs["NX_class"] = "NXnote"
        poni["type"] = "text/plain"
        poni["description"] = "geometry (pyFAI PONI format)"
        poni["data"] = meta.poni_text
        parameters = process.create_group("parameters")
        parameters.attrs["NX_class"] = "NXparameters"
        for key, value in meta.parameters.items():
            parameters[key] = _format_value(value) if value is None or isinstance(
                value, (list, tuple, dict)) else value

        data = entry.create_group("data")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "intensity"
        data.attrs["axes"] = [".", radial_name]
        data.attrs[f"{radial_name}_indices"] = 1
        data.attrs["source_indices"] = 0
        data.attrs["frame_index_indices"] = 0
        data["title"] = f"{meta.operation} ({meta.unit})"
        axis = data.create_dataset(radial_name, data=np.asarray(radial, dtype=np.float64))
        axis.attrs["units"] = unit.symbol
        axis.attrs["long_name"] = unit.label
        axis.attrs["unit_name"] = unit.name
        for name, _attr, dtype in ROW_ARRAYS:
            if name not in arrays:
                continue
            itemsize = np.dtype(dtype).itemsize
            dset = data.create_dataset(
                name, shape=(0, npt), maxshape=(None, npt), dtype=dtype,
                chunks=(_chunk_rows(npt, itemsize), npt), fillvalue=np.nan,
            )
            if name == "intensity":
                dset.attrs["interpretation"] = "spectrum"
                dset.attrs["long_name"] = f"intensity ({meta.operation})"
        data.create_dataset("source", shape=(0,), maxshape=(None,),
                            dtype=h5py.string_dtype("utf-8"), chunks=(256,))
        data.create_dataset("frame_index", shape=(0,), maxshape=(None,), dtype=np.int64,
                            chunks=(256,))
        return cls(h5)

    @classmethod
    def reopen(cls, filename: Path) -> _NexusFile:
        import h5py

        return cls(h5py.File(filename, "r+"))

    @property
    def rows(self) -> int:
        return int(self.data["source"].shape[0])

    @property
    def array_names(self) -> list[str]:
        return [name for name, _a, _d in ROW_ARRAYS if name in self.data]

    def append(self, arrays: dict[str, np.ndarray], sources: Sequence[str],
               frame_indices: Sequence[int]) -> None:
        n_new = len(sources)
        if n_new == 0:
            return
        start = self.rows
        for name in self.array_names:
            dset = self.data[name]
            dset.resize(start + n_new, axis=0)
            if name in arrays:
                dset[start:] = np.asarray(arrays[name]).reshape(n_new, -1)
        for name, values in (("source", list(sources)), ("frame_index", list(frame_indices))):
            dset = self.data[name]
            dset.resize(start + n_new, axis=0)
            dset[start:] = values

    def finish(self) -> None:
        self.h5["entry/end_time"][()] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.h5.close()

    def close(self) -> None:
        try:
            self.h5.close()
        except Exception:  # noqa: BLE001 - closing after a failure, keep the first error
            pass


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _find_process(h5: Any, path: Path) -> Any:
    entry = h5.get("entry")
    if entry is not None:
        process = entry.get("reduction")
        if process is not None and "configuration" in process:
            return process
        for item in entry.values():
            if getattr(item, "attrs", {}).get("NX_class") in ("NXprocess", b"NXprocess") \
                    and "configuration" in item:
                return item
    raise AzfilterError(f"{path}: not an azfilter result (no /entry/reduction/configuration)")


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def read_nexus_config(path: str | os.PathLike) -> dict[str, Any]:
    """The job config stored in an azfilter NeXus output (the raw JSON dictionary)."""
    import h5py

    path = Path(path)
    if not _is_hdf5(path):
        raise AzfilterError(f"{path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as h5:
            process = _find_process(h5, path)
            config = process["configuration"]
            text = _text(config["data"][()] if isinstance(config, h5py.Group) else config[()])
    except OSError as err:
        raise AzfilterError(f"{path}: cannot read HDF5: {err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise AzfilterError(f"{path}: bad configuration JSON: {err}") from None


@dataclass
class ResultTable:
    """The rows of one or more results, read back from text or NeXus outputs.

    Attributes
    ----------
    radial : ndarray (npt,)
    unit : str
        Unit name (``q_nm^-1``...).
    intensity, sigma : ndarray (n_rows, npt)
    sources : list of str
    frame_indices : list of int
    path : str
        The file the rows came from.
    config : dict
        The stored job config ({} when absent).
    operation : str or None
    """

    radial: np.ndarray
    unit: str
    intensity: np.ndarray
    sigma: np.ndarray
    sources: list[str]
    frame_indices: list[int]
    path: str
    config: dict[str, Any] = field(default_factory=dict)
    operation: str | None = None

    @property
    def labels(self) -> list[str]:
        """One short label per row: ``stem`` or ``stem #frame``."""
        per_source: dict[str, int] = {}
        for source in self.sources:
            per_source[source] = per_source.get(source, 0) + 1
        out = []
        for source, index in zip(self.sources, self.frame_indices, strict=True):
            stem = source_stem(source) if source else Path(self.path).stem
            stack = per_source[source] > 1 or (index is not None and index > 0)
            out.append(f"{stem} #{index}" if stack else stem)
        return out


def read_result(path: str | os.PathLike) -> ResultTable:
    """Read an azfilter output (NeXus/HDF5 or text) as a :class:`ResultTable`.

    Raises
    ------
    AzfilterError
        When the file is missing or is not an azfilter result.
    """
    path = Path(path)
    if not path.is_file():
        raise AzfilterError(f"{path}: no such file")
    if _is_hdf5(path):
        return _read_nexus(path)
    return _read_text(path)


def _read_nexus(path: Path) -> ResultTable:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            process = _find_process(h5, path)
            data = h5["entry/data"]
            axes = data.attrs.get("axes")
            radial_name = _text(axes[-1]) if axes is not None else "q"
            axis = data[radial_name]
            unit = _text(axis.attrs.get("unit_name", "q_nm^-1"))
            config_text = _text(process["configuration/data"][()])
            table = ResultTable(
                radial=axis[()],
                unit=unit,
                intensity=data["intensity"][()].astype(np.float64),
                sigma=data["intensity_errors"][()].astype(np.float64),
                sources=[_text(s) for s in data["source"][()]],
                frame_indices=[int(i) for i in data["frame_index"][()]],
                path=str(path),
                config=json.loads(config_text),
                operation=_text(process["operation"][()]) if "operation" in process else None,
            )
    except (OSError, KeyError) as err:
        raise AzfilterError(f"{path}: not a readable azfilter result: {err}") from None
    return table


def _read_text(path: Path) -> ResultTable:
    source, frame, config, unit, operation = "", -1, {}, None, None
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            header = [line.rstrip("\n") for line in stream if line.startswith("#")]
        values = np.loadtxt(path, comments="#", ndmin=2)
    except (OSError, ValueError) as err:
        raise AzfilterError(f"{path}: not a readable text result: {err}") from None
    if values.shape[1] < 2:
        raise AzfilterError(f"{path}: expected columns 'radial intensity [sigma]'")
    for line in header:
        if line.startswith("# source: "):
            source = line[len("# source: "):]
        elif line.startswith("# frame: "):
            try:
                frame = int(line.split()[2])
            except (IndexError, ValueError):
                pass
        elif line.startswith(TEXT_CONFIG_PREFIX):
            try:
                config = json.loads(line[len(TEXT_CONFIG_PREFIX):])
            except json.JSONDecodeError:
                config = {}
        elif line.startswith("# operation: "):
            operation = line[len("# operation: "):]
    if header:
        # The last header line names the columns: "# <unit> intensity sigma".
        fields = header[-1].lstrip("#").split()
        if fields:
            unit = fields[0]
    if unit not in ("q_nm^-1", "q_A^-1", "2th_deg", "2th_rad", "r_mm"):
        unit = config.get("unit", "2th_deg" if path.suffix == ".xy" else "q_nm^-1")
    sigma = values[:, 2] if values.shape[1] > 2 else np.full(values.shape[0], np.nan)
    return ResultTable(
        radial=values[:, 0], unit=unit, intensity=values[None, :, 1], sigma=sigma[None, :],
        sources=[source], frame_indices=[frame], path=str(path), config=config,
        operation=operation,
    )


class NexusWriter:
    """Write the rows of one job into one NeXus file, atomically.

    Rows are appended to resizable datasets of a temporary file in the output's folder,
    created at the first row; :meth:`close` renames it over ``path``.  With ``mode="append"``
    an existing output is copied first and its rows kept (``--skip-existing``).

    Parameters
    ----------
    path : str or Path
        The final file name.
    meta : OutputMeta
    mode : {"new", "overwrite", "append"}
        ``"new"`` refuses an existing file; ``"append"`` keeps its rows (the existing file
        must come from the same job: same operation, geometry, bins and parameters).
    """

    def __init__(self, path: str | os.PathLike, meta: OutputMeta, mode: str = "new"):
        from .config import result_signature

        self.path = Path(path)
        self.meta = meta
        self.mode = mode
        self._file: _NexusFile | None = None
        self._tmp: Path | None = None
        self._buffer: dict[str, list[np.ndarray]] = {}
        self._buffer_keys: list[tuple[str, int]] = []
        self.buffer_rows = 64
        self.written = 0
        self.existing: set[tuple[str, int]] = set()
        self._append_base = False
        if self.path.exists():
            if mode == "new":
                raise AzfilterError(
                    f"{self.path}: output exists; use --overwrite to replace it or "
                    "--skip-existing to add only new frames"
                )
            if mode == "append":
                stored = read_nexus_config(self.path)
                mine, theirs = result_signature(meta.config), result_signature(stored)
                differ = sorted(k for k in set(mine) | set(theirs)
                                if _comparable(mine.get(k)) != _comparable(theirs.get(k)))
                if differ:
                    raise AzfilterError(
                        f"{self.path}: exists with a different configuration "
                        f"({', '.join(differ)}); use --overwrite or another output name"
                    )
                self.existing = set(_stored_keys(self.path))
                self._append_base = True

    def _open(self, radial: np.ndarray, arrays: Sequence[str]) -> _NexusFile:
        self._tmp = temporary_path(self.path, make_folder=True)
        if self._append_base:
            shutil.copyfile(self.path, self._tmp)
            handle = _NexusFile.reopen(self._tmp)
            npt_stored = handle.data["intensity"].shape[1]
            if npt_stored != len(radial):
                handle.close()
                raise AzfilterError(f"{self.path}: holds {npt_stored} bins, not "
                                    f"{len(radial)}; use --overwrite")
            return handle
        missing = [name for name in REQUIRED_ROW_ARRAYS if name not in arrays]
        if missing:
            raise AzfilterError(f"result has no {', '.join(missing)}")
        return _NexusFile.create(self._tmp, self.meta, np.asarray(radial), arrays)

    def start(self, radial: np.ndarray) -> None:
        """Create the file now, with every per-bin dataset, so that :meth:`close` writes it
        even with no rows (e.g. a shard that was given no frames)."""
        if self._file is None:
            self._file = self._open(radial, [name for name, _a, _d in ROW_ARRAYS])

    def write(self, result: Any, source: str, index: int) -> None:
        """Append one frame's result (buffered: rows reach the file in blocks, since one
        resize of every dataset per row costs milliseconds)."""
        if self._file is None:
            arrays = [name for name, attr, _d in ROW_ARRAYS if _array(result, attr) is not None]
            self._file = self._open(np.asarray(result.radial), arrays)
        for name, attr, _dtype in ROW_ARRAYS:
            value = _array(result, attr)
            if value is not None:
                self._buffer.setdefault(name, []).append(value)
        self._buffer_keys.append((source, int(index)))
        self.written += 1
        if len(self._buffer_keys) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows to the (temporary) file."""
        if self._file is None or not self._buffer_keys:
            return
        arrays = {name: np.stack(rows) for name, rows in self._buffer.items()}
        sources = [key[0] for key in self._buffer_keys]
        indices = [key[1] for key in self._buffer_keys]
        self._buffer, self._buffer_keys = {}, []
        self._file.append(arrays, sources, indices)

    def close(self) -> bool:
        """Finish the file and rename it into place; returns False when no row was written
        (then nothing is created or changed)."""
        if self._file is None:
            return False
        self.flush()
        self._file.finish()
        self._file = None
        os.chmod(self._tmp, new_file_mode())
        os.replace(self._tmp, self.path)
        self._tmp = None
        return True

    def abort(self) -> None:
        """Drop the temporary file; the final name is left as it was."""
        self._buffer, self._buffer_keys = {}, []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except OSError:
                pass
            self._tmp = None


def _comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _stored_keys(path: Path) -> list[tuple[str, int]]:
    import h5py

    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        sources = [_text(s) for s in data["source"][()]]
        indices = [int(i) for i in data["frame_index"][()]]
    return list(zip(sources, indices, strict=True))


def stored_frames(path: str | os.PathLike) -> set[tuple[str, int]]:
    """The (source, frame_index) pairs held by an azfilter NeXus output."""
    return set(_stored_keys(Path(path)))


# ---------------------------------------------------------------------------- merge


def merge_nexus(inputs: Iterable[str | os.PathLike], output: str | os.PathLike,
                overwrite: bool = False, block_rows: int = 1024) -> dict[str, Any]:
    """Join shard outputs of one job into one NeXus file, in shard (= source/frame) order.

    Shards are ordered by their stored shard index ``I/N`` (files without one keep their
    command-line order, after the sharded ones); rows keep their order inside each file.
    A (source, frame) pair present in several inputs is written once.

    Returns
    -------
    dict
        ``rows`` written, ``duplicates`` dropped, ``missing_shards`` (shard indices absent
        when the inputs say how many shards there were).

    Raises
    ------
    AzfilterError
        When an input is not an azfilter result, the inputs come from different jobs or have
        different bins, or the output exists and ``overwrite`` is false.
    """
    import h5py

    from .config import result_signature

    paths = [Path(p) for p in inputs]
    output = Path(output)
    if not paths:
        raise AzfilterError("merge: no input files")
    if output.exists() and not overwrite:
        raise AzfilterError(f"{output}: output exists; use --overwrite to replace it")
    if any(p.resolve() == output.resolve() for p in paths if p.exists()):
        raise AzfilterError(f"{output}: the output is also an input")
    infos = []
    for order, path in enumerate(paths):
        if not path.is_file():
            raise AzfilterError(f"{path}: no such file")
        config = read_nexus_config(path)
        with h5py.File(path, "r") as h5:
            process = _find_process(h5, path)
            shard = _text(process["shard"][()]) if "shard" in process else None
            poni_text = _text(process["poni/data"][()])
            operation = _text(process["operation"][()])
            parameters = {k: _plain(v[()]) for k, v in process["parameters"].items()} \
                if "parameters" in process else {}
            data = h5["entry/data"]
            radial_name = _text(data.attrs["axes"][-1])
            radial = data[radial_name][()]
            unit = _text(data[radial_name].attrs.get("unit_name", "q_nm^-1"))
            arrays = [name for name, _a, _d in ROW_ARRAYS if name in data]
        shard_index, shard_count = (None, None)
        if shard:
            shard_index, shard_count = (int(v) for v in shard.split("/"))
        infos.append(dict(path=path, config=config, shard_index=shard_index,
                          shard_count=shard_count, poni=poni_text, operation=operation,
                          parameters=parameters, radial=radial, unit=unit, arrays=arrays,
                          order=order))
    first = infos[0]
    signature = result_signature(first["config"])
    for info in infos[1:]:
        other = result_signature(info["config"])
        differ = sorted(k for k in set(signature) | set(other)
                        if _comparable(signature.get(k)) != _comparable(other.get(k)))
        if differ:
            raise AzfilterError(
                f"{info['path']}: comes from a different job than {first['path']} "
                f"({', '.join(differ)} differ)"
            )
        if info["radial"].shape != first["radial"].shape or not np.allclose(
                info["radial"], first["radial"], rtol=1e-12, atol=0):
            raise AzfilterError(f"{info['path']}: radial bins differ from {first['path']}")
    infos.sort(key=lambda i: (i["shard_index"] is None,
                              i["shard_index"] if i["shard_index"] is not None else 0,
                              i["order"]))
    missing: list[int] = []
    counts = {i["shard_count"] for i in infos if i["shard_count"]}
    if len(counts) == 1:
        count = counts.pop()
        present = {i["shard_index"] for i in infos}
        missing = [k for k in range(count) if k not in present]
    arrays = [name for name in first["arrays"] if all(name in i["arrays"] for i in infos)]
    config = dict(first["config"])
    config["output"] = str(output.resolve())
    meta = OutputMeta(operation=first["operation"], unit=first["unit"],
                      parameters=first["parameters"], poni_text=first["poni"], geometry=[],
                      config=config)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(output, make_folder=True)
    seen: set[tuple[str, int]] = set()
    written = duplicates = 0
    out = None
    try:
        out = _NexusFile.create(tmp, meta, first["radial"], arrays)
        for info in infos:
            with h5py.File(info["path"], "r") as h5:
                data = h5["entry/data"]
                n_rows = data["source"].shape[0]
                for start in range(0, n_rows, block_rows):
                    stop = min(n_rows, start + block_rows)
                    sources = [_text(s) for s in data["source"][start:stop]]
                    indices = [int(i) for i in data["frame_index"][start:stop]]
                    keep = []
                    for k, key in enumerate(zip(sources, indices, strict=True)):
                        if key in seen:
                            duplicates += 1
                        else:
                            seen.add(key)
                            keep.append(k)
                    if not keep:
                        continue
                    block = {name: data[name][start:stop][keep] for name in arrays}
                    out.append(block, [sources[k] for k in keep], [indices[k] for k in keep])
                    written += len(keep)
        out.finish()
        out = None
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, output)
    except BaseException:
        if out is not None:
            out.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"rows": written, "duplicates": duplicates, "missing_shards": missing}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
