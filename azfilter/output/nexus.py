"""The NeXus writer: rows of one job appended to one NXazint1d file, renamed into place.

Writes go through :class:`GuardedFile` (h5py's file-object driver): when the disk is full,
over quota, read-only or not writable, the first failed write is remembered and the following
ones are dropped, so that HDF5 still closes its handles cleanly. Letting HDF5 itself hit
ENOSPC leaves it with handles that cannot be closed; their clean-up at exit crashed the
process (segmentation fault) and printed a traceback per handle. The error then reaches the
caller once, as :class:`OutputWriteError` naming the file, and the temporary file is removed.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import io
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .. import __version__
from ..errors import AzfilterError, RunFailed
from ..fileio import commit_temporary, remove_quietly, temporary_path
from .meta import (
    OUTLIER_ARRAYS,
    OUTLIER_DESCRIPTIONS,
    OUTLIER_FILL,
    OUTLIER_PREFIX,
    OUTLIERS_GROUP,
    PROGRAM,
    REQUIRED_ROW_ARRAYS,
    ROW_ARRAYS,
    OutputMeta,
    describe_sectors,
    format_value,
    job_differences,
    nexus_axis_attributes,
    outlier_rows,
    outliers_pick,
    row_array,
    same_sectors,
    sector_array,
    to_json,
)
from .read import (
    CHI_AXIS,
    DEFINITION,
    RADIAL_AXIS,
    SECTOR_RANGES,
    SIGNAL,
    check_nexus,
    missing_entries,
    outliers_pick_of,
    read_nexus_config,
    sector_ranges_of,
    stored_keys,
)

REFERENCE = ("azfilter (azimuthal integration with sigma-clipping and median filtering); "
             "algorithms after pyFAI: Kieffer et al., J. Synchrotron Rad. 27 (2020) 558-566, "
             "https://doi.org/10.1107/S1600577520000776")
NOTE = ("Radial bins as pyFAI (PONI geometry); I = sum_signal / sum_normalization; I_errors is "
        "the standard error of I, std the spread of the pixels in the ring; rows are frames, "
        "named by source and frame_index.")

# errno values that mean "this output cannot be written here": one line, exit 3, no retry.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                errno.EIO}

T = TypeVar("T")


class OutputWriteError(RunFailed):
    """An output file could not be written (disk full, quota, read-only, permission).

    ``str(err)`` is one line naming the file; the unfinished temporary file is already removed.
    """

    def __init__(self, path: str | os.PathLike, error: BaseException | str):
        self.path = Path(path)
        self.errno = getattr(error, "errno", None)
        super().__init__(f"{self.path}: cannot write: {describe_os_error(error)}")


def describe_os_error(error: BaseException | str) -> str:
    """A short reason for an OS error: ``No space left on device (ENOSPC)``."""
    if isinstance(error, str):
        return error
    number = getattr(error, "errno", None)
    if isinstance(error, OSError) and number:
        name = errno.errorcode.get(number, str(number))
        return f"{os.strerror(number)} ({name})"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


class GuardedFile(io.RawIOBase):
    """A read/write file for h5py's file-object driver that never fails a write.

    The first OSError of a write, truncate or flush is kept in :attr:`error`; from then on
    writes are dropped (reported as done). HDF5 thus never sees a failed write and can always
    close its objects; the owner checks :attr:`error` after each operation and discards the
    file.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self._raw = open(self.path, "r+b", buffering=0)  # noqa: SIM115 - closed by close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):   # an unbuffered write may be short
                    written = self._raw.write(view[done:])
                    if not written:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += written
                return done
            except OSError as err:
                self.error = err
        self._raw.seek(len(view), io.SEEK_CUR)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._raw.truncate(size)
            except OSError as err:
                self.error = err
        return self.tell() if size is None else size

    def flush(self) -> None:
        return None

    def fsync(self) -> None:
        """Flush the file to disk (an error is kept like a failed write)."""
        if self.error is None:
            try:
                os.fsync(self._raw.fileno())
            except OSError as err:
                self.error = err

    def close(self) -> None:
        try:
            self._raw.close()
        except OSError as err:
            if self.error is None:
                self.error = err
        super().close()


#: bytes of rows a NexusWriter buffers before it writes them (between MIN_BUFFER_ROWS and
#: MAX_BUFFER_ROWS rows): each write costs every dataset an h5py resize and write, ~0.1 ms
#: of the GIL each (an Eiger 4M stack at 1000 bins: 0.25-0.31 ms of the writer's CPU per
#: frame with 64 rows, 0.15-0.20 with 256)
BUFFER_BYTES = 16 << 20
MIN_BUFFER_ROWS = 64
MAX_BUFFER_ROWS = 1024


def buffer_rows(result: Any) -> int:
    """Rows to buffer for results like ``result``: :data:`BUFFER_BYTES` of them."""
    rows = [(row_array(result, attr), dtype) for _name, attr, dtype in ROW_ARRAYS]
    row_bytes = sum(np.dtype(dtype).itemsize * np.size(row) for row, dtype in rows
                    if row is not None)
    row_bytes += sum(np.asarray(value).nbytes for value in outlier_rows(result).values())
    return int(max(MIN_BUFFER_ROWS, min(MAX_BUFFER_ROWS, BUFFER_BYTES // max(1, row_bytes))))


class RowBlock:
    """Rows of several datasets gathered in place: one preallocated ``(capacity, *row)`` array
    per dataset, in the dataset's dtype, written to the file as one block.

    Copying a row into its place costs a few microseconds; stacking lists of rows at each
    flush, and converting them inside HDF5, cost the writer thread ~0.2 ms per frame (1000
    bins), and with worker processes that thread's share of the command's GIL bounds the
    frame rate.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self.rows = 0

    def put(self, name: str, value: Any, dtype: Any, capacity: int) -> None:
        """Copy ``value`` (converted to ``dtype``) into row :attr:`rows` of ``name``."""
        value = np.asarray(value)
        block = self._arrays.get(name)
        if block is None or block.shape[1:] != value.shape or block.shape[0] <= self.rows:
            grown = np.empty((max(capacity, self.rows + 1), *value.shape), dtype=dtype)
            if block is not None and self.rows:
                if block.shape[1:] != value.shape:
                    raise ValueError(f"{name}: a row of shape {value.shape} after rows of "
                                     f"shape {block.shape[1:]}")
                grown[:self.rows] = block[:self.rows]
            block = self._arrays[name] = grown
        block[self.rows] = value

    def take(self) -> dict[str, np.ndarray]:
        """The rows gathered so far (views, valid until the next :meth:`put`); empties the
        block."""
        rows, self.rows = self.rows, 0
        return {name: block[:rows] for name, block in self._arrays.items()}

    def clear(self) -> None:
        self._arrays, self.rows = {}, 0


def _chunk_rows(npt: int, itemsize: int) -> int:
    # ~256 kB chunks, at most 64 rows: a reader of one frame decompresses little.
    # (With sectors ``npt`` is the values of one row: n_sectors * npt.)
    return int(max(1, min(64, (256 * 1024) // max(1, npt * itemsize))))


def _now() -> str:
    # ISO 8601 with the local offset as NX_DATE_TIME wants it: 2026-11-28T19:07:22+01:00
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _string_list(group: Any, name: str, values: Sequence[str], chunk: int = 1024) -> Any:
    import h5py

    return group.create_dataset(
        name, data=np.array(list(values), dtype=object), maxshape=(None,),
        dtype=h5py.string_dtype("utf-8"), chunks=(chunk,))


def _int_list(group: Any, name: str, values: Sequence[int], chunk: int = 1024) -> Any:
    return group.create_dataset(name, data=np.asarray(list(values), dtype=np.int64),
                                maxshape=(None,), chunks=(chunk,))


def _extend(dset: Any, values: Sequence[Any]) -> None:
    start = dset.shape[0]
    dset.resize(start + len(values), axis=0)
    if len(values):
        dset[start:] = np.array(list(values), dtype=dset.dtype if dset.dtype.kind != "O"
                                else object)


def _group(parent: Any, name: str, nx_class: str) -> Any:
    group = parent.require_group(name)
    group.attrs["NX_class"] = nx_class
    return group


class NexusFile:
    """An open azfilter NeXus file being written (rows appended to resizable datasets).

    Every h5py call goes through :meth:`guarded`, which turns a failed write into
    :class:`OutputWriteError` naming :attr:`name` (the final output, not the temporary file).
    """

    def __init__(self, handle: Any, guard: GuardedFile, name: Path):
        self.h5 = handle
        self.guard = guard
        self.name = name
        self.data = handle["entry/data"]

    # -------------------------------------------------------------- opening

    @staticmethod
    def _open_guarded(filename: Path, mode: str, name: Path) -> tuple[Any, GuardedFile]:
        import h5py

        try:
            guard = GuardedFile(filename)
        except OSError as err:
            raise OutputWriteError(name, err) from None
        try:
            handle = h5py.File(guard, mode, locking=False)
        except BaseException as err:
            guard.close()
            if guard.error is not None:
                raise OutputWriteError(name, guard.error) from None
            if mode == "r+":
                raise AzfilterError(f"{name}: damaged HDF5 file ({describe_os_error(err)}); "
                                    "use --overwrite to replace it") from None
            raise
        if guard.error is not None:
            NexusFile._drop(handle, guard)
            raise OutputWriteError(name, guard.error)
        return handle, guard

    @classmethod
    def create(cls, filename: Path, meta: OutputMeta, radial: np.ndarray,
               arrays: Sequence[str], name: Path | None = None) -> NexusFile:
        """A new NXazint1d file at ``filename`` (an existing empty temporary file); with
        ``meta.sectors`` its per-bin datasets are ``(rows, n_sectors, npt)``."""
        name = Path(name or filename)
        handle, guard = cls._open_guarded(filename, "w", name)
        try:
            _write_header(handle, meta, radial, arrays)
        except BaseException as err:
            cls._drop(handle, guard)
            if guard.error is not None:
                raise OutputWriteError(name, guard.error) from None
            raise AzfilterError(f"{name}: cannot write the NeXus header: "
                                f"{describe_os_error(err)}") from err
        out = cls(handle, guard, name)
        out.check()
        return out

    @classmethod
    def reopen(cls, filename: Path, name: Path | None = None) -> NexusFile:
        """Open a copy of an existing NXazint1d output to append rows to it."""
        name = Path(name or filename)
        handle, guard = cls._open_guarded(filename, "r+", name)
        try:
            out = cls(handle, guard, name)
        except KeyError:
            cls._drop(handle, guard)
            raise AzfilterError(f"{name}: damaged: no /entry/data; use --overwrite") from None
        return out

    # -------------------------------------------------------------- guarded calls

    def check(self) -> None:
        """Raise :class:`OutputWriteError` when a write has failed."""
        if self.guard.error is not None:
            raise OutputWriteError(self.name, self.guard.error)

    def guarded(self, operation: Callable[[], T]) -> T:
        """Run an h5py operation; a failed write becomes :class:`OutputWriteError`."""
        try:
            result = operation()
        except Exception as err:
            if self.guard.error is not None:
                raise OutputWriteError(self.name, self.guard.error) from None
            if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
                raise OutputWriteError(self.name, err) from None
            raise
        self.check()
        return result

    # -------------------------------------------------------------- rows

    @property
    def rows(self) -> int:
        return int(self.data["source"].shape[0])

    @property
    def array_names(self) -> list[str]:
        return [name for name, _a, _d in ROW_ARRAYS if name in self.data]

    @property
    def outliers(self) -> Any:
        """The ``/entry/outliers`` group (outlier statistics), or None."""
        return self.h5["entry"].get(OUTLIERS_GROUP)

    def add_outliers(self, pick: float | None) -> None:
        """Give a file written before outlier statistics its ``/entry/outliers`` group, its
        existing rows filled with -1 / NaN (nothing when ``pick`` is None or it has one)."""
        if pick is None or self.outliers is not None:
            return

        def write() -> None:
            group = _outliers_group(self.h5["entry"], pick, self.data[SIGNAL].shape[1:])
            for name, _dtype, _per_bin in OUTLIER_ARRAYS:
                group[name].resize(self.rows, axis=0)   # the fill value

        self.guarded(write)

    def append(self, arrays: dict[str, np.ndarray], sources: Sequence[str],
               frame_indices: Sequence[int],
               outliers: dict[str, np.ndarray] | None = None) -> None:
        """Append rows (one per source/frame) to every per-bin dataset, and to the outlier
        datasets when the file has them (``outliers``: their rows; fill values if absent)."""
        n_new = len(sources)
        if n_new == 0:
            return

        def write() -> None:
            start = self.rows
            for name in self.array_names:
                dset = self.data[name]
                dset.resize(start + n_new, axis=0)
                if name in arrays:
                    dset[start:] = np.asarray(arrays[name]).reshape(n_new, *dset.shape[1:])
            group = self.outliers
            if group is not None:
                for name, _dtype, _per_bin in OUTLIER_ARRAYS:
                    dset = group[name]
                    # a file extended after rows of an older azfilter: those keep the fill
                    old_rows = dset.shape[0]
                    dset.resize(start + n_new, axis=0)
                    if old_rows < start:
                        dset[old_rows:start] = OUTLIER_FILL[name]
                    if outliers is not None and name in outliers:
                        dset[start:] = np.asarray(outliers[name]).reshape(n_new,
                                                                          *dset.shape[1:])
            _extend(self.data["source"], list(sources))
            _extend(self.data["frame_index"], [int(i) for i in frame_indices])

        self.guarded(write)

    # -------------------------------------------------------------- job records

    def job_group(self) -> Any:
        return _group(self.h5["entry"], "azfilter", "NXcollection")

    def set_manifest(self, entries: Sequence[tuple[str, int]], digest: str,
                     shards: int) -> None:
        """Store (replace) the job manifest: every planned (source, frame), its digest, N."""

        def write() -> None:
            job = self.job_group()
            if "manifest" in job:
                del job["manifest"]
            group = _group(job, "manifest", "NXcollection")
            group.attrs["digest"] = digest
            group.attrs["shards"] = int(shards)
            group.attrs["entries"] = len(entries)
            group.attrs["description"] = (
                "the job's planned (source, frame_index); frame_index -1: the whole file")
            _string_list(group, "source", [s for s, _i in entries])
            _int_list(group, "frame_index", [i for _s, i in entries])

        self.guarded(write)

    def set_failures(self, failures: Sequence[tuple[str, int, str]]) -> None:
        """Store (replace) the list of failed frames: source, frame_index (-1: the whole
        source), reason."""

        def write() -> None:
            job = self.job_group()
            if "failed" in job:
                del job["failed"]
            group = _group(job, "failed", "NXcollection")
            group.attrs["description"] = "planned frames that could not be reduced, and why"
            _string_list(group, "source", [f[0] for f in failures], chunk=256)
            _int_list(group, "frame_index", [f[1] for f in failures], chunk=256)
            _string_list(group, "reason", [f[2] for f in failures], chunk=256)

        self.guarded(write)

    def set_completeness(self, complete: bool | None,
                         missing: Sequence[tuple[str, int]] = (),
                         missing_shards: Sequence[int] = ()) -> None:
        """Record whether every planned frame is a row or a failed frame (None: unknown, no
        manifest); the missing entries and shard indices when not."""

        def write() -> None:
            job = self.job_group()
            for key in ("complete",):
                if key in job.attrs:
                    del job.attrs[key]
            if "missing" in job:
                del job["missing"]
            if complete is None:
                return
            job.attrs["complete"] = bool(complete)
            if complete:
                return
            group = _group(job, "missing", "NXcollection")
            group.attrs["description"] = (
                "planned frames neither in the rows nor in failed (shard files not merged?)")
            group.attrs["shards"] = np.asarray(list(missing_shards), dtype=np.int64)
            _string_list(group, "source", [s for s, _i in missing])
            _int_list(group, "frame_index", [i for _s, i in missing])

        self.guarded(write)

    # -------------------------------------------------------------- closing

    def finish(self) -> None:
        """Set the end time and close; raises :class:`OutputWriteError` (the file is then
        closed and must be discarded)."""

        def write() -> None:
            self.h5["entry/end_time"][()] = _now()
            self.h5.flush()

        try:
            self.guarded(write)
            self.guard.fsync()
        except BaseException:
            self.close()
            raise
        self.close()
        if self.guard.error is not None:
            raise OutputWriteError(self.name, self.guard.error)

    def close(self) -> None:
        """Close the HDF5 file and its file object; never raises (after a failure)."""
        self._drop(self.h5, self.guard)
        self.data = None

    @staticmethod
    def _drop(handle: Any, guard: GuardedFile) -> None:
        try:
            handle.close()
        except Exception:  # noqa: BLE001 - closing after a failure, keep the first error
            pass
        guard.close()


def _write_header(h5: Any, meta: OutputMeta, radial: np.ndarray, arrays: Sequence[str]) -> None:
    """Everything of an NXazint1d file but the rows (NeXus definitions v2026.01).

    With ``meta.sectors`` the per-bin datasets are ``(rows, n_sectors, npt)``, NXdata's
    ``axes`` are ``[".", "chi", "radial_axis"]`` with a ``chi`` axis (sector centres, degree)
    and ``sector_ranges`` ``(n_sectors, 2)`` (each sector's χ bounds, degree). NXazint1d
    itself knows no sectors (its ``I`` is rank 2): such a file keeps every item the
    definition requires, but ``I``/``I_errors`` gain the χ dimension.
    """
    import h5py

    long_name, nexus_units = nexus_axis_attributes(meta.unit)
    npt = int(radial.shape[0])
    sectors = sector_array(meta.sectors)
    # the shape of one row (one frame) of every per-bin dataset
    row = (npt,) if sectors is None else (int(sectors.shape[0]), npt)
    now = _now()
    config = meta.config
    parameters = meta.parameters
    h5.attrs["NX_class"] = "NXroot"
    h5.attrs["creator"] = f"{PROGRAM} {__version__}"
    h5.attrs["file_time"] = now
    h5.attrs["default"] = "entry"
    entry = _group(h5, "entry", "NXentry")
    entry.attrs["default"] = "data"
    entry["definition"] = DEFINITION
    entry["title"] = f"azfilter {meta.operation}"
    entry["program_name"] = PROGRAM
    entry["program_name"].attrs["version"] = __version__
    entry["start_time"] = now
    entry["end_time"] = now
    solid_angle = parameters.get("solid_angle", config.get("solid_angle", True))
    polarization = parameters.get("polarization", config.get("polarization"))
    entry["solid_angle_applied"] = bool(solid_angle)
    entry["polarization_applied"] = polarization is not None
    # I = sum_signal / sum_normalization: divided by the pixels' (weighted) contribution.
    entry["normalization_applied"] = True
    entry["monitor_applied"] = bool(parameters.get("monitor", config.get("monitor")))

    instrument = _group(entry, "instrument", "NXinstrument")
    instrument["name"] = meta.instrument_name
    mono = _group(instrument, "monochromator", "NXmonochromator")
    wavelength = meta.wavelength_m()
    # 12.398419843320026 keV·Å = h·c (CODATA 2018)
    wavelength_a = wavelength * 1e10 if wavelength else float("nan")
    mono["wavelength"] = wavelength_a
    mono["wavelength"].attrs["units"] = "angstrom"
    mono["energy"] = 12.398419843320026 / wavelength_a if wavelength else float("nan")
    mono["energy"].attrs["units"] = "keV"
    source = _group(instrument, "source", "NXsource")
    source["name"] = meta.source_name
    source["type"] = meta.source_type
    source["probe"] = meta.source_probe

    process = _group(entry, "reduction", "NXprocess")
    process["program"] = PROGRAM
    process["version"] = __version__
    process["date"] = now
    process["reference"] = REFERENCE
    process["note"] = NOTE
    process["sequence_index"] = 1
    process["operation"] = meta.operation
    if meta.shard:
        process["shard"] = meta.shard
    inputs = _group(process, "input", "NXparameters")
    inputs["operation"] = meta.operation
    # the wavelength used (PONI or --wavelength/--energy), in angstrom as azint writes it
    inputs["wavelength"] = wavelength_a
    inputs["wavelength"].attrs["units"] = "angstrom"
    for key, value in parameters.items():
        if key in inputs:
            continue
        inputs[key] = format_value(value) if value is None or isinstance(
            value, (list, tuple, dict)) else value
    if "poni" not in inputs:
        inputs["poni"] = meta.poni_text
    configuration = _group(process, "configuration", "NXnote")
    configuration["type"] = "application/json"
    configuration["description"] = "azfilter job configuration (reruns the job)"
    configuration["data"] = to_json(config)
    poni = _group(process, "poni", "NXnote")
    poni["type"] = "text/plain"
    poni["description"] = "geometry (pyFAI PONI format)"
    poni["data"] = meta.poni_text

    data = _group(entry, "data", "NXdata")
    data.attrs["signal"] = SIGNAL
    if sectors is None:
        data.attrs["axes"] = [".", RADIAL_AXIS]
        data.attrs[f"{RADIAL_AXIS}_indices"] = 1
    else:
        data.attrs["axes"] = [".", CHI_AXIS, RADIAL_AXIS]
        data.attrs[f"{CHI_AXIS}_indices"] = 1
        data.attrs[f"{RADIAL_AXIS}_indices"] = 2
    data.attrs["interpretation"] = "spectrum"
    data.attrs["source_indices"] = 0
    data.attrs["frame_index_indices"] = 0
    data["title"] = f"{meta.operation} ({meta.unit})"
    axis = data.create_dataset(RADIAL_AXIS, data=np.asarray(radial, dtype=np.float64))
    axis.attrs["long_name"] = long_name
    axis.attrs["units"] = nexus_units
    axis.attrs["unit_name"] = meta.unit
    if sectors is not None:
        chi = data.create_dataset(CHI_AXIS, data=sectors.mean(axis=1))
        chi.attrs["long_name"] = "chi (sector centre)"
        chi.attrs["units"] = "degree"
        bounds = data.create_dataset(SECTOR_RANGES, data=sectors)
        bounds.attrs["long_name"] = "sector chi range (lo, hi)"
        bounds.attrs["units"] = "degree"
        bounds.attrs["description"] = (
            "each sector's azimuthal range [lo, hi) in degrees; lo < hi, hi > 180 for a "
            "sector across +-180 degrees; sectors may overlap or leave gaps")
    for name, _attr, dtype in ROW_ARRAYS:
        if name not in arrays:
            continue
        itemsize = np.dtype(dtype).itemsize
        dset = data.create_dataset(
            name, shape=(0, *row), maxshape=(None, *row), dtype=dtype,
            chunks=(_chunk_rows(int(np.prod(row)), itemsize), *row), fillvalue=np.nan,
        )
        if name == SIGNAL:
            dset.attrs["interpretation"] = "spectrum"
            dset.attrs["long_name"] = "intensity"
            dset.attrs["units"] = "arbitrary units"
            dset.attrs["operation"] = meta.operation
        elif name == f"{SIGNAL}_errors":
            dset.attrs["long_name"] = "estimated intensity error"
            dset.attrs["units"] = "arbitrary units"
    data.create_dataset("source", shape=(0,), maxshape=(None,),
                        dtype=h5py.string_dtype("utf-8"), chunks=(256,))
    data.create_dataset("frame_index", shape=(0,), maxshape=(None,), dtype=np.int64,
                        chunks=(256,))
    pick = outliers_pick(meta)
    if pick is not None:
        _outliers_group(entry, pick, row)
    _group(entry, "azfilter", "NXcollection").attrs["description"] = (
        "azfilter's job records: manifest (planned frames), failed frames, completeness")


def _outliers_group(entry: Any, pick: float, row: tuple[int, ...]) -> Any:
    """The empty ``/entry/outliers`` NXcollection (rows are appended with the data's)."""
    group = _group(entry, OUTLIERS_GROUP, "NXcollection")
    group.attrs["pick"] = float(pick)
    group.attrs["description"] = (
        "per-frame outlier statistics of the clipping (azfilter README, 'Outputs'); rows "
        "match /entry/data/source and frame_index; -1 / NaN: a row without statistics")
    for name, dtype, per_bin in OUTLIER_ARRAYS:
        shape = row if per_bin else ()
        itemsize = np.dtype(dtype).itemsize
        chunk = _chunk_rows(int(np.prod(shape)), itemsize) if per_bin else 1024
        dset = group.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape),
                                    dtype=dtype, chunks=(chunk, *shape),
                                    fillvalue=OUTLIER_FILL[name])
        dset.attrs["description"] = OUTLIER_DESCRIPTIONS[name]
    return group


class NexusWriter:
    """Write the rows of one job into one NeXus (NXazint1d) file, atomically.

    Rows are appended to resizable datasets of a temporary file in the output's folder,
    created at the first row; :meth:`close` renames it over ``path``.  With ``mode="append"``
    an existing output is checked, copied, and its rows kept (``--skip-existing``).

    Parameters
    ----------
    path : str or Path
        The final file name.
    meta : OutputMeta
        With ``meta.manifest`` set, the file stores the job manifest and says whether every
        planned frame of this output's shard is a row or a failed frame.
    mode : {"new", "overwrite", "append"}
        ``"new"`` refuses an existing file; ``"append"`` keeps its rows (the existing file
        must come from the same job: same operation, geometry, bins and parameters).

    Raises
    ------
    AzfilterError
        In append mode, when the existing file is damaged, of an older layout or of another
        job. Writing raises :class:`OutputWriteError` (one line naming the file) when the
        disk is full or the folder not writable; the temporary file is then removed.
    """

    def __init__(self, path: str | os.PathLike, meta: OutputMeta, mode: str = "new"):
        import h5py

        self.path = Path(path)
        self.meta = meta
        self.mode = mode
        self._file: NexusFile | None = None
        self._tmp: Path | None = None
        self._radial: np.ndarray | None = None
        # the rows not yet written, and whether they carry outlier statistics
        self._block = RowBlock()
        self._block_outliers = False
        self._buffer_keys: list[tuple[str, int]] = []
        #: rows buffered before they are written; set from the size of a row at the first
        #: one (:data:`BUFFER_BYTES`), unless set before
        self.buffer_rows: int | None = None
        self.written = 0
        self.existing: set[tuple[str, int]] = set()
        self._keys: set[tuple[str, int]] = set()
        self.failures: list[tuple[str, int, str]] = []
        self._append_base = False
        # sectors: known from meta, else from the first result (or start(sectors=...))
        self._sectors_known = meta.sectors is not None
        if self.path.exists():
            if mode == "new":
                raise AzfilterError(
                    f"{self.path}: output exists; use --overwrite to replace it or "
                    "--skip-existing to add only new frames"
                )
            if mode == "append":
                layout = check_nexus(self.path)   # damaged or foreign: AzfilterError
                if layout != "nxazint1d":
                    raise AzfilterError(
                        f"{self.path}: written by an older azfilter (layout before NXazint1d); "
                        "use --overwrite, or write to a new file and 'azfilter merge' both")
                stored = read_nexus_config(self.path)
                differ = job_differences(meta.config, stored)
                with h5py.File(self.path, "r") as h5:
                    stored_pick = outliers_pick_of(h5)
                if stored_pick is not None and stored_pick != outliers_pick(meta):
                    differ = sorted({*differ, "pick"})
                if differ:
                    raise AzfilterError(
                        f"{self.path}: exists with a different configuration "
                        f"({', '.join(differ)}); use --overwrite or another output name"
                    )
                self.existing = set(stored_keys(self.path))
                self._append_base = True

    # -------------------------------------------------------------- opening

    def _open(self, radial: np.ndarray, arrays: Sequence[str]) -> NexusFile:
        missing = [name for name in REQUIRED_ROW_ARRAYS if name not in arrays]
        if missing and not self._append_base:
            raise AzfilterError(f"result has no {', '.join(missing)}")
        try:
            self._tmp = temporary_path(self.path, make_folder=True)
        except OSError as err:
            raise OutputWriteError(self.path, err) from None
        try:
            if self._append_base:
                try:
                    shutil.copyfile(self.path, self._tmp)
                except OSError as err:
                    raise OutputWriteError(self.path, err) from None
                handle = NexusFile.reopen(self._tmp, name=self.path)
                npt_stored = handle.data[SIGNAL].shape[-1]
                if npt_stored != len(radial):
                    handle.close()
                    raise AzfilterError(f"{self.path}: holds {npt_stored} bins, not "
                                        f"{len(radial)}; use --overwrite")
                stored = sector_ranges_of(handle.data)
                mine = sector_array(self.meta.sectors)
                if not self._sectors_known:
                    # an empty run (start() without sectors) keeps the file's sectors
                    self.meta = dataclasses.replace(self.meta, sectors=stored)
                    mine = stored
                if not same_sectors(stored, mine):
                    handle.close()
                    raise AzfilterError(
                        f"{self.path}: exists with other sectors ({describe_sectors(stored)}; "
                        f"this run: {describe_sectors(mine)}); use --overwrite or another "
                        "output name")
                handle.add_outliers(outliers_pick(self.meta))
                return handle
            return NexusFile.create(self._tmp, self.meta, np.asarray(radial), arrays,
                                    name=self.path)
        except BaseException:
            remove_quietly(self._tmp)
            self._tmp = None
            raise

    def start(self, radial: np.ndarray, sectors: Any = None) -> None:
        """Create the file now, with every per-bin dataset, so that :meth:`close` writes it
        even with no rows (e.g. a shard that was given no frames, or whose frames all failed:
        the file then records the failures).

        Parameters
        ----------
        radial : ndarray (npt,)
            The radial bin centres.
        sectors : array-like (n_sectors, 2) or None
            The integrator's χ sectors (degrees), when it has some and no result came yet.
        """
        self._radial = np.asarray(radial)
        self._learn_sectors(sectors)
        if self._file is None:
            self._file = self._run(lambda: self._open(
                self._radial, [name for name, _a, _d in ROW_ARRAYS]))

    def _run(self, operation: Callable[[], T]) -> T:
        """Run a write step; on a write error drop the temporary file, then re-raise."""
        try:
            return operation()
        except OutputWriteError:
            self.abort()
            raise

    # -------------------------------------------------------------- rows and failures

    def write(self, result: Any, source: str, index: int) -> None:
        """Append one frame's result (buffered: rows reach the file in blocks, since one
        resize of every dataset per row costs milliseconds)."""
        if self._file is None:
            self._learn_sectors(getattr(result, "sectors", None), from_result=True)
            arrays = [name for name, attr, _d in ROW_ARRAYS if row_array(result, attr) is not None]
            self._file = self._run(lambda: self._open(np.asarray(result.radial), arrays))
        if self.buffer_rows is None:
            self.buffer_rows = buffer_rows(result)
        has_outliers = getattr(result, "outliers", None) is not None
        if self._buffer_keys and has_outliers != self._block_outliers:
            self.flush()   # a block's rows all have outlier statistics, or none has
        self._block_outliers = has_outliers
        block, capacity = self._block, self.buffer_rows
        for name, attr, dtype in ROW_ARRAYS:
            value = row_array(result, attr)
            if value is not None:
                block.put(name, value, dtype, capacity)
        if has_outliers:   # rows without them keep the datasets' fill values
            for name, dtype, _per_bin in OUTLIER_ARRAYS:   # per-bin arrays, per-frame numbers
                block.put(OUTLIER_PREFIX + name, getattr(result.outliers, name), dtype,
                          capacity)
        block.rows += 1
        self._buffer_keys.append((source, int(index)))
        self.written += 1
        if len(self._buffer_keys) >= self.buffer_rows:
            self.flush()

    def _learn_sectors(self, sectors: Any, from_result: bool = False) -> None:
        """Take the sectors of the first result (``result.sectors``, None: a 1-D result)."""
        if self._file is not None or self._sectors_known:
            return
        if sectors is None and not from_result:
            return
        # a copy: the caller's meta is shared with its other outputs
        self.meta = dataclasses.replace(self.meta, sectors=sector_array(sectors))
        self._sectors_known = True

    def record_failure(self, source: str, index: int | None, reason: str) -> None:
        """Record a planned frame that could not be reduced (stored in the file by
        :meth:`close`, in ``entry/azfilter/failed``).

        Parameters
        ----------
        source : str
            The planned source, as in the rows (``file.h5::/path`` for datasets).
        index : int or None
            The frame index; None when the whole source failed (stored as -1).
        reason : str
            One line: why.
        """
        index = -1 if index is None else int(index)
        reason = " ".join(str(reason).split())
        # FrameReadError's text starts with "SOURCE frame I: "; the record has its own columns
        for prefix in (f"{source} frame {index}: ", f"{source}: "):
            if reason.startswith(prefix):
                reason = reason[len(prefix):]
                break
        self.failures.append((str(source), index, reason))

    def flush(self) -> None:
        """Write the buffered rows to the (temporary) file."""
        if self._file is None or not self._buffer_keys:
            return
        rows = self._block.take()
        arrays = {name: block for name, block in rows.items()
                  if not name.startswith(OUTLIER_PREFIX)}
        outliers = {name[len(OUTLIER_PREFIX):]: block for name, block in rows.items()
                    if name.startswith(OUTLIER_PREFIX)}
        sources = [key[0] for key in self._buffer_keys]
        indices = [key[1] for key in self._buffer_keys]
        self._keys.update(self._buffer_keys)
        self._buffer_keys = []
        file = self._file
        self._run(lambda: file.append(arrays, sources, indices, outliers))

    # -------------------------------------------------------------- closing

    def _job_records(self, file: NexusFile) -> None:
        manifest = self.meta.manifest
        rows = self.existing | self._keys
        # A frame that failed before and is a row now (a rerun) is no longer a failure.
        failures = [f for f in self.failures if (f[0], f[1]) not in rows]
        file.set_failures(failures)
        if manifest is None:
            file.set_completeness(None)
            return
        file.set_manifest(manifest.entries, manifest.digest, manifest.shards)
        shard = self.meta.shard_index()
        planned: Iterable[tuple[str, int]] = manifest.entries
        if shard is not None and manifest.shards > 1:
            planned = manifest.shard_entries(shard)
        missing = missing_entries(planned, rows, {(f[0], f[1]) for f in failures})
        file.set_completeness(not missing, missing)

    def close(self) -> bool:
        """Finish the file and rename it into place; returns False when no row was written
        and nothing failed (then nothing is created or changed).

        Raises
        ------
        OutputWriteError
            When the file cannot be written (the temporary file is removed).
        """
        if self._file is None and self.failures and self._radial is not None:
            self.start(self._radial)
        if self._file is None:
            return False
        self.flush()
        file = self._file
        try:
            self._run(lambda: self._job_records(file))
            self._file = None
            file.finish()
            commit_temporary(self._tmp, self.path, fsync=False)   # finish() synced it
        except OutputWriteError:
            self._file = None
            self.abort()
            raise
        except OSError as err:
            self._file = None
            self.abort()
            raise OutputWriteError(self.path, err) from None
        except BaseException:
            self._file = None
            self.abort()
            raise
        self._tmp = None
        return True

    def abort(self) -> None:
        """Drop the temporary file; the final name is left as it was."""
        self._block.clear()
        self._buffer_keys = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            remove_quietly(self._tmp)
            self._tmp = None
