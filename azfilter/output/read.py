from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AzfilterError
from ..vocabulary import HDF5_SUFFIXES
from .meta import TEXT_CONFIG_PREFIX
from .text import source_stem


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
            process = find_process(h5, path)
            data = h5["entry/data"]
            axes = data.attrs.get("axes")
            radial_name = as_text(axes[-1]) if axes is not None else "q"
            axis = data[radial_name]
            unit = as_text(axis.attrs.get("unit_name", "q_nm^-1"))
            config_text = as_text(process["configuration/data"][()])
            table = ResultTable(
                radial=axis[()],
                unit=unit,
                intensity=data["intensity"][()].astype(np.float64),
                sigma=data["intensity_errors"][()].astype(np.float64),
                sources=[as_text(s) for s in data["source"][()]],
                frame_indices=[int(i) for i in data["frame_index"][()]],
                path=str(path),
                config=json.loads(config_text),
                operation=as_text(process["operation"][()]) if "operation" in process else None,
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




def stored_keys(path: Path) -> list[tuple[str, int]]:
    import h5py

    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        sources = [as_text(s) for s in data["source"][()]]
        indices = [int(i) for i in data["frame_index"][()]]
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
