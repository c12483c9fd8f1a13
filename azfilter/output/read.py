from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AzfilterError
from ..outliers import TEXT_BIN_PREFIXES as OUTLIER_BIN_PREFIXES
from ..outliers import TEXT_PREFIX as OUTLIER_TEXT_PREFIX
from ..outliers import parse_summary
from ..vocabulary import HDF5_SUFFIXES
from .meta import (
    LEGACY_ROW_NAMES,
    OUTLIER_ARRAYS,
    OUTLIERS_GROUP,
    ROW_ARRAYS,
    TEXT_CONFIG_PREFIX,
    sector_array,
)
from .text import source_stem

DEFINITION = "NXazint1d"
SIGNAL = "I"
RADIAL_AXIS = "radial_axis"
#: a file with χ sectors: the sector-centre axis and the (n_sectors, 2) bounds, in NXdata
CHI_AXIS = "chi"
SECTOR_RANGES = "sector_ranges"

# What reading a damaged HDF5 file raises (h5py: OSError "wrong B-tree signature", KeyError
# for a missing object, RuntimeError/ValueError for inconsistent metadata).
READ_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError, IndexError)


def read_error(path: Path, err: BaseException) -> AzfilterError:
    """One line for an HDF5 file that cannot be read."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > 160:
        text = text[:157] + "..."
    return AzfilterError(f"{path}: damaged or not an azfilter result ({text})")


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            return stream.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def find_process(h5: Any, path: Path) -> Any:
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


def as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return as_text(value.item())
    return str(value)


def outliers_pick_of(h5: Any) -> float | None:
    """The ``pick`` of an open azfilter NeXus file's outlier statistics; None without."""
    group = h5.get(f"entry/{OUTLIERS_GROUP}")
    return None if group is None else float(group.attrs["pick"])


def read_nexus_config(path: str | os.PathLike) -> dict[str, Any]:
    """The job config stored in an azfilter NeXus output (the raw JSON dictionary)."""
    import h5py

    path = Path(path)
    if not _is_hdf5(path):
        raise AzfilterError(f"{path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as h5:
            process = find_process(h5, path)
            config = process["configuration"]
            text = as_text(config["data"][()] if isinstance(config, h5py.Group) else config[()])
    except AzfilterError:
        raise
    except READ_ERRORS as err:
        raise read_error(path, err) from None
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
    intensity, sigma : ndarray (n_rows, npt), or (n_rows, n_sectors, npt) with sectors
        Row ``r``, sector ``s`` is ``intensity[r, s]`` (NeXus outputs with χ sectors).
    sources : list of str
    frame_indices : list of int
    path : str
        The file the rows came from.
    config : dict
        The stored job config ({} when absent).
    operation : str or None
    layout : str
        ``"nxazint1d"``, ``"legacy"`` (NeXus written before NXazint1d) or ``"text"``.
    failed : list of (str, int, str)
        Failed frames recorded in the file: source, frame index (-1: whole source), reason.
    manifest_entries : int or None
        Number of planned frames of the job (None: no manifest stored).
    manifest_digest : str or None
    shards : int or None
        N of the job's manifest.
    complete : bool or None
        Whether every planned frame is a row or a failed frame (None: not recorded).
    missing : list of (str, int)
        Planned frames neither in the rows nor failed (recorded when incomplete).
    missing_shards : list of int
    sectors : ndarray (n_sectors, 2) or None
        Each sector's χ range ``(lo, hi)`` in degrees; None for a result without sectors.
    outliers : dict or None
        The outlier statistics of sigma-clip and medfilt outputs, one row per result row:
        ``rejected``, ``rejected_sum``, ``picked``, ``max_sigma`` (n_rows,) and ``kept``,
        ``available`` (the shape of ``intensity``); -1 / NaN for rows without statistics.
        None when the file has none (integrate, or written before them).
    pick : float or None
        The threshold of ``picked`` (None without statistics).
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
    layout: str = "text"
    failed: list[tuple[str, int, str]] = field(default_factory=list)
    manifest_entries: int | None = None
    manifest_digest: str | None = None
    shards: int | None = None
    complete: bool | None = None
    missing: list[tuple[str, int]] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    sectors: np.ndarray | None = None
    outliers: dict[str, np.ndarray] | None = None
    pick: float | None = None

    @property
    def n_sectors(self) -> int | None:
        """Number of χ sectors; None without sectors."""
        return None if self.sectors is None else int(self.sectors.shape[0])

    @property
    def chi(self) -> np.ndarray | None:
        """Centre of each sector in degrees; None without sectors."""
        return None if self.sectors is None else self.sectors.mean(axis=1)

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


def nexus_layout(h5: Any) -> str:
    """``"nxazint1d"`` or ``"legacy"`` (azfilter files before NXazint1d: ``intensity``)."""
    data = h5["entry/data"]
    signal = as_text(data.attrs.get("signal", ""))
    if signal == SIGNAL and SIGNAL in data:
        return "nxazint1d"
    if "intensity" in data:
        return "legacy"
    raise KeyError("no signal dataset in /entry/data")


def row_dataset(data: Any, name: str, layout: str) -> Any:
    """The per-bin dataset ``name`` (NXazint1d name) of either layout, or None."""
    if layout == "legacy":
        name = LEGACY_ROW_NAMES.get(name, name)
    return data.get(name)


def radial_axis_of(data: Any) -> tuple[Any, str]:
    """(radial dataset, azfilter unit name) of an NXdata group of either layout."""
    axes = data.attrs.get("axes")
    radial_name = as_text(axes[-1]) if axes is not None and len(axes) else RADIAL_AXIS
    axis = data[radial_name]
    return axis, as_text(axis.attrs.get("unit_name", "q_nm^-1"))


def sector_ranges_of(data: Any) -> np.ndarray | None:
    """The ``(n_sectors, 2)`` χ ranges (degrees) of an NXdata group with sectors, or None."""
    dset = data.get(SECTOR_RANGES)
    return None if dset is None else sector_array(dset[()])


def row_shape(data: Any, rows: int) -> tuple[int, ...]:
    """The shape every per-bin dataset of an NXdata group must have: ``(rows, npt)``, or
    ``(rows, n_sectors, npt)`` with sectors."""
    axis, _unit = radial_axis_of(data)
    sectors = sector_ranges_of(data)
    npt = int(axis.shape[0])
    return (rows, npt) if sectors is None else (rows, int(sectors.shape[0]), npt)


def _text_list(dset: Any) -> list[str]:
    return [as_text(v) for v in dset[()]]


def read_job_records(h5: Any) -> dict[str, Any]:
    """The job records of an azfilter NeXus file (``entry/azfilter``): manifest, failures,
    completeness. Absent parts read as None / empty."""
    out: dict[str, Any] = {"entries": None, "digest": None, "shards": None, "failed": [],
                           "complete": None, "missing": [], "missing_shards": []}
    job = h5.get("entry/azfilter")
    if job is None:
        return out
    manifest = job.get("manifest")
    if manifest is not None:
        out["entries"] = list(zip(_text_list(manifest["source"]),
                                  (int(i) for i in manifest["frame_index"][()]), strict=True))
        out["digest"] = as_text(manifest.attrs["digest"])
        out["shards"] = int(manifest.attrs["shards"])
    failed = job.get("failed")
    if failed is not None:
        out["failed"] = list(zip(_text_list(failed["source"]),
                                 (int(i) for i in failed["frame_index"][()]),
                                 _text_list(failed["reason"]), strict=True))
    if "complete" in job.attrs:
        out["complete"] = bool(job.attrs["complete"])
    missing = job.get("missing")
    if missing is not None:
        out["missing"] = list(zip(_text_list(missing["source"]),
                                  (int(i) for i in missing["frame_index"][()]), strict=True))
        out["missing_shards"] = [int(k) for k in np.atleast_1d(missing.attrs.get("shards", []))]
    return out


def _read_nexus(path: Path) -> ResultTable:
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            process = find_process(h5, path)
            data = h5["entry/data"]
            layout = nexus_layout(h5)
            axis, unit = radial_axis_of(data)
            config_text = as_text(process["configuration/data"][()])
            records = read_job_records(h5)
            table = ResultTable(
                radial=axis[()],
                unit=unit,
                intensity=row_dataset(data, "I", layout)[()].astype(np.float64),
                sigma=row_dataset(data, "I_errors", layout)[()].astype(np.float64),
                sources=[as_text(s) for s in data["source"][()]],
                frame_indices=[int(i) for i in data["frame_index"][()]],
                path=str(path),
                config=json.loads(config_text),
                operation=as_text(process["operation"][()]) if "operation" in process else None,
                layout=layout,
                failed=records["failed"],
                manifest_entries=None if records["entries"] is None else len(records["entries"]),
                manifest_digest=records["digest"],
                shards=records["shards"],
                complete=records["complete"],
                missing=records["missing"],
                missing_shards=records["missing_shards"],
                sectors=sector_ranges_of(data),
            )
            group = h5.get(f"entry/{OUTLIERS_GROUP}")
            if group is not None:
                table.pick = float(group.attrs["pick"])
                table.outliers = {name: group[name][()]
                                  for name, _dtype, _per_bin in OUTLIER_ARRAYS}
    except AzfilterError:
        raise
    except (json.JSONDecodeError, *READ_ERRORS) as err:
        raise read_error(path, err) from None
    return table


def check_nexus(path: str | os.PathLike, block_rows: int = 4096) -> str:
    """Read every part of an azfilter NeXus output (each per-bin dataset in full, block by
    block) and return its layout; a damaged file raises.

    Used before an output is extended (``--skip-existing``): a file whose metadata or data
    chunks cannot be read back is refused, never taken as holding its frames.

    Returns
    -------
    str
        ``"nxazint1d"`` or ``"legacy"``.

    Raises
    ------
    AzfilterError
        ``damaged ...; use --overwrite``: the file cannot be read in full, its datasets
        disagree in length, or it is not an azfilter result.
    """
    import h5py

    path = Path(path)
    hint = "use --overwrite to replace it"
    if not _is_hdf5(path):
        raise AzfilterError(f"{path}: damaged or not an HDF5 file; {hint}")
    try:
        with h5py.File(path, "r") as h5:
            find_process(h5, path)
            json.loads(as_text(find_process(h5, path)["configuration/data"][()]))
            layout = nexus_layout(h5)
            data = h5["entry/data"]
            axis, _unit = radial_axis_of(data)
            rows = data["source"].shape[0]
            shape = row_shape(data, rows)
            if data["frame_index"].shape[0] != rows:
                raise ValueError("source and frame_index differ in length")
            data["source"][()]
            data["frame_index"][()]
            axis[()]
            for name, _attr, _dtype in ROW_ARRAYS:
                dset = row_dataset(data, name, layout)
                if dset is None:
                    continue
                if dset.shape != shape:
                    raise ValueError(f"{name} has shape {dset.shape}, not {shape}")
                for start in range(0, rows, block_rows):
                    dset[start:start + block_rows]
            read_job_records(h5)
    except AzfilterError as err:
        # an output we are asked to extend that is HDF5 but has no azfilter structure left
        detail = str(err).split(": ", 1)[-1]
        raise AzfilterError(f"{path}: damaged or not an azfilter result ({detail}); {hint}") \
            from None
    except (json.JSONDecodeError, *READ_ERRORS) as err:
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise AzfilterError(f"{path}: damaged ({text}); {hint}") from None
    return layout


def missing_entries(planned: Iterable[tuple[str, int]], rows: set[tuple[str, int]],
                    failed: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Planned (source, frame) pairs that are neither a row nor a failed frame.

    A planned frame index -1 (a file that could not be counted when the job was planned) is
    accounted for by any row or failure of that source; a failure with index -1 (the whole
    source failed) accounts for every planned frame of its source.
    """
    whole_failed = {source for source, index in failed if index < 0}
    seen_sources: set[str] | None = None
    missing = []
    for source, index in planned:
        if index < 0:
            if seen_sources is None:
                seen_sources = {s for s, _i in rows} | {s for s, _i in failed}
            if source not in seen_sources:
                missing.append((source, index))
            continue
        key = (source, index)
        if key in rows or key in failed or source in whole_failed:
            continue
        missing.append(key)
    return missing


def _read_text(path: Path) -> ResultTable:
    source, frame, config, unit, operation = "", -1, {}, None, None
    summary: tuple[dict[str, Any], float] | None = None
    per_bin: dict[str, np.ndarray] = {}
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
        elif line.startswith(OUTLIER_TEXT_PREFIX):
            try:
                summary = parse_summary(line[len(OUTLIER_TEXT_PREFIX):])
            except (KeyError, ValueError):
                raise AzfilterError(f"{path}: bad '{OUTLIER_TEXT_PREFIX.strip()}' line") \
                    from None
        else:
            for name, prefix in OUTLIER_BIN_PREFIXES.items():
                if line.startswith(prefix):
                    try:
                        per_bin[name] = np.array(line[len(prefix):].split(), dtype=np.int64)
                    except ValueError:
                        raise AzfilterError(f"{path}: bad '{prefix.strip()}' line") from None
    if header:
        # The last header line names the columns: "# <unit> intensity sigma".
        fields = header[-1].lstrip("#").split()
        if fields:
            unit = fields[0]
    if unit not in ("q_nm^-1", "q_A^-1", "2th_deg", "2th_rad", "r_mm"):
        unit = config.get("unit", "2th_deg" if path.suffix == ".xy" else "q_nm^-1")
    sigma = values[:, 2] if values.shape[1] > 2 else np.full(values.shape[0], np.nan)
    outliers, pick = None, None
    if summary is not None:
        frame_values, pick = summary
        outliers = {name: np.array([value]) for name, value in frame_values.items()}
        for name, _dtype, per_bin_field in OUTLIER_ARRAYS:
            if not per_bin_field:
                continue
            row = per_bin.get(name)
            if row is None or row.size != values.shape[0]:
                raise AzfilterError(f"{path}: '# {name}:' line missing or not of "
                                    f"{values.shape[0]} values")
            outliers[name] = row[None, :]
    return ResultTable(
        radial=values[:, 0], unit=unit, intensity=values[None, :, 1], sigma=sigma[None, :],
        sources=[source], frame_indices=[frame], path=str(path), config=config,
        operation=operation, outliers=outliers, pick=pick,
    )




def stored_keys(path: Path) -> list[tuple[str, int]]:
    """The (source, frame_index) of every row of an azfilter NeXus output, in order."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            data = h5["entry/data"]
            sources = [as_text(s) for s in data["source"][()]]
            indices = [int(i) for i in data["frame_index"][()]]
    except READ_ERRORS as err:
        raise read_error(Path(path), err) from None
    if len(sources) != len(indices):
        raise AzfilterError(f"{path}: damaged: source and frame_index differ in length")
    return list(zip(sources, indices, strict=True))


def stored_frames(path: str | os.PathLike) -> set[tuple[str, int]]:
    """The (source, frame_index) pairs held by an azfilter NeXus output."""
    return set(stored_keys(Path(path)))




def read_text_config(path: str | os.PathLike) -> dict[str, Any]:
    """The job config stored in a text output's ``# config:`` header line.

    Raises
    ------
    AzfilterError
        When the file cannot be read or has no such line.
    """
    import json

    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                if not line.startswith("#"):
                    break
                if line.startswith(TEXT_CONFIG_PREFIX):
                    try:
                        return json.loads(line[len(TEXT_CONFIG_PREFIX):])
                    except json.JSONDecodeError as err:
                        raise AzfilterError(f"{path}: bad '# config:' line: {err}") from None
    except OSError as err:
        raise AzfilterError(f"{path}: cannot read: {err.strerror or err}") from None
    raise AzfilterError(
        f"{path}: not a config file (use .toml or .json) and no '# config:' header line found"
    )


def read_stored_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw job config stored in an azfilter output (NeXus/HDF5 or text), not normalized."""
    if str(path).lower().endswith(HDF5_SUFFIXES):
        return read_nexus_config(path)
    return read_text_config(path)
