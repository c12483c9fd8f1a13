from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import AzfilterError
from ..fileio import new_file_mode, temporary_path
from ..units import get_unit
from .meta import (
    PROGRAM,
    REQUIRED_ROW_ARRAYS,
    ROW_ARRAYS,
    OutputMeta,
    comparable,
    format_value,
    row_array,
    to_json,
)
from .read import read_nexus_config, stored_keys


def _chunk_rows(npt: int, itemsize: int) -> int:
    # ~256 kB chunks, at most 64 rows: a reader of one frame decompresses little.
    return int(max(1, min(64, (256 * 1024) // max(1, npt * itemsize))))


class NexusFile:
    """An open azfilter NeXus file being written (rows appended to resizable datasets)."""

    def __init__(self, handle: Any):
        self.h5 = handle
        self.data = handle["entry/data"]

    @classmethod
    def create(cls, filename: Path, meta: OutputMeta, radial: np.ndarray,
               arrays: Sequence[str]) -> NexusFile:
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
            parameters[key] = format_value(value) if value is None or isinstance(
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
    def reopen(cls, filename: Path) -> NexusFile:
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
        from ..config import result_signature

        self.path = Path(path)
        self.meta = meta
        self.mode = mode
        self._file: NexusFile | None = None
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
                                if comparable(mine.get(k)) != comparable(theirs.get(k)))
                if differ:
                    raise AzfilterError(
                        f"{self.path}: exists with a different configuration "
                        f"({', '.join(differ)}); use --overwrite or another output name"
                    )
                self.existing = set(stored_keys(self.path))
                self._append_base = True

    def _open(self, radial: np.ndarray, arrays: Sequence[str]) -> NexusFile:
        self._tmp = temporary_path(self.path, make_folder=True)
        if self._append_base:
            shutil.copyfile(self.path, self._tmp)
            handle = NexusFile.reopen(self._tmp)
            npt_stored = handle.data["intensity"].shape[1]
            if npt_stored != len(radial):
                handle.close()
                raise AzfilterError(f"{self.path}: holds {npt_stored} bins, not "
                                    f"{len(radial)}; use --overwrite")
            return handle
        missing = [name for name in REQUIRED_ROW_ARRAYS if name not in arrays]
        if missing:
            raise AzfilterError(f"result has no {', '.join(missing)}")
        return NexusFile.create(self._tmp, self.meta, np.asarray(radial), arrays)

    def start(self, radial: np.ndarray) -> None:
        """Create the file now, with every per-bin dataset, so that :meth:`close` writes it
        even with no rows (e.g. a shard that was given no frames)."""
        if self._file is None:
            self._file = self._open(radial, [name for name, _a, _d in ROW_ARRAYS])

    def write(self, result: Any, source: str, index: int) -> None:
        """Append one frame's result (buffered: rows reach the file in blocks, since one
        resize of every dataset per row costs milliseconds)."""
        if self._file is None:
            arrays = [name for name, attr, _d in ROW_ARRAYS if row_array(result, attr) is not None]
            self._file = self._open(np.asarray(result.radial), arrays)
        for name, attr, _dtype in ROW_ARRAYS:
            value = row_array(result, attr)
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


