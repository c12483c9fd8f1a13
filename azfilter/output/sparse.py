"""The sparse Bragg-frame output of ``azfilter sparsify``: pyFAI's ``sparsify-Bragg`` format.

One HDF5 file for all frames. It is an azfilter NeXus output (``/entry/data``: the
sigma-clipped 1-D pattern of every frame with its source and frame index, the job records,
so that ``--skip-existing``, ``merge``, ``info`` and ``plot`` work on it) plus the group that
pyFAI's ``sparsify-Bragg`` writes and fabio's ``SparseImage`` reads::

    /                         @creator = "pyFAI sparse frames (azfilter X.Y)"
                              (fabio recognises the format by a creator starting with
                              "pyFAI"; the program is azfilter, see /entry/program_name)
    /entry                    @pyFAI_sparse_frames = "/entry/sparse_frames"
        sparse_frames         NXdata @signal="background_avg" @axes=[".", "radius"]
            frame_ptr         (n_frames + 1,) int64: frame k's pixels are
                              index[frame_ptr[k]:frame_ptr[k+1]]
            index             (n_pixels,) uint32: flat pixel index (row-major) of each
                              picked pixel, increasing within a frame
            intensity         (n_pixels,) the frames' dtype: their raw values
            background_avg    (n_frames, npt) float32: clipped mean per radial bin
                              (corrected intensity; empty bins filled by interpolation)
            background_std    (n_frames, npt) float32: clipped std per bin (also "errors")
            radius            (npt,) float32: bin centres in the job's unit
            mask              (N1, N2) float32: each pixel's radial position in that unit,
                              NaN for the pixels in no bin (masked, outside the ranges)
            normalization     (N1, N2) float32: normalization · flat · polarization ·
                              solid angle (densify multiplies the background by it)
            dummy             scalar of the intensity dtype: the value of masked pixels
        sparsify              NXprocess: program, version, date,
                              configuration (NXnote, JSON: {"sparsify": {cutoff_pick, noise,
                              cutoff_clip, cycle, error_model, unit, npt}, "azfilter": job})

Densifying frame k (fabio): ``interp(mask, radius, background_avg[k]) · normalization``,
rounded for integer dtypes, the picked pixels set to their raw values, ``dummy`` where
``mask`` is NaN.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import AzfilterError
from .meta import OutputMeta, to_json
from .nexus import NexusFile, NexusWriter, _group, _now

#: the NXdata group of the sparse frames, and the entry attribute fabio looks for
SPARSE_GROUP = "sparse_frames"
SPARSE_PATH = f"/entry/{SPARSE_GROUP}"
#: what fabio's format detection needs at the start of the root ``creator`` attribute
CREATOR = f"pyFAI sparse frames (azfilter {__version__})"

#: gzip level 1 after byte shuffling: readable by every HDF5 library (no filter plugin)
_COMPRESSION: dict[str, Any] = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
_PIXEL_CHUNK = 1 << 16


@dataclass
class SparseLayout:
    """The per-geometry part of a sparse file.

    Attributes
    ----------
    shape : (int, int)
        Detector shape.
    radius : numpy.ndarray
        ``(npt,)`` bin centres in the job's unit (stored as float32).
    position : numpy.ndarray
        float32 flat: each pixel's radial position, NaN for pixels in no bin.
    pixel_norm : numpy.ndarray
        float32 flat normalisation of each pixel.
    detector_dummy : Any
        The detector (the job's ``--dummy``), to choose the dummy of the intensity dtype.
    parameters : dict
        The sparsification parameters (cutoff_pick, noise, cutoff_clip, cycle, error_model,
        unit, npt), stored in ``entry/sparsify/configuration``.
    """

    shape: tuple[int, int]
    radius: np.ndarray
    position: np.ndarray
    pixel_norm: np.ndarray
    detector_dummy: Any
    parameters: dict[str, Any]


def dummy_for(dtype: np.dtype, detector: Any) -> Any:
    """The value of masked pixels in densified frames of ``dtype``: NaN for floats; for
    integers the detector's dummy (Pilatus/Eiger: −1, all ones for unsigned frames) when it
    fits the dtype, else 0."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return dtype.type(np.nan)
    value = None if detector is None else detector.dummy_for(dtype)[0]
    info = np.iinfo(dtype)
    if value is None or not float(value).is_integer() or not info.min <= value <= info.max:
        return dtype.type(0)
    return dtype.type(int(value))


def is_sparse_output(path: str | Path) -> bool:
    """True when ``path`` is an HDF5 file holding sparse frames (azfilter's or pyFAI's)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            return sparse_group_of(h5) is not None
    except (OSError, KeyError, ValueError):
        return False


def sparse_group_of(h5: Any) -> Any:
    """The sparse-frame NXdata group of an open file (found as fabio finds it), or None."""
    entry_name = h5.attrs.get("default")
    if isinstance(entry_name, bytes):
        entry_name = entry_name.decode()
    if not entry_name or entry_name not in h5:
        return None
    entry = h5[entry_name]
    name = entry.attrs.get("pyFAI_sparse_frames") or entry.attrs.get("default")
    if isinstance(name, bytes):
        name = name.decode()
    if not name or name not in entry:
        return None
    group = entry[name]
    return group if "frame_ptr" in group and "index" in group else None


def create_sparse_group(h5: Any, layout: SparseLayout, job_config: dict[str, Any]) -> None:
    """Write the geometry part of the sparse group and its empty per-frame datasets (the
    pixel datasets come with the first frame, whose dtype they take)."""
    h5.attrs["creator"] = CREATOR
    entry = h5["entry"]
    entry.attrs["pyFAI_sparse_frames"] = SPARSE_PATH
    group = _group(entry, SPARSE_GROUP, "NXdata")
    group.attrs["signal"] = "background_avg"
    group.attrs["axes"] = [".", "radius"]
    group.attrs["description"] = (
        "sparse Bragg frames (pyFAI sparsify-Bragg format): background profile per frame "
        "plus the picked pixels; fabio.open(file) densifies them")
    group.create_dataset("frame_ptr", data=np.zeros(1, np.int64), maxshape=(None,),
                         chunks=(4096,))
    npt = int(layout.radius.shape[0])
    for name, long_name in (("background_avg", "Average value of background"),
                            ("background_std", "Standard deviation of background")):
        dset = group.create_dataset(name, shape=(0, npt), maxshape=(None, npt),
                                    dtype=np.float32, chunks=(max(1, 65536 // npt), npt),
                                    **_COMPRESSION)
        dset.attrs["interpretation"] = "spectrum"
        dset.attrs["long_name"] = long_name
    group["errors"] = group["background_std"]
    unit = layout.parameters.get("unit", "")
    radius = group.create_dataset("radius", data=np.asarray(layout.radius, np.float32))
    radius.attrs["interpretation"] = "spectrum"
    radius.attrs["unit"] = unit
    radius.attrs["long_name"] = unit
    mask = group.create_dataset("mask", data=layout.position.reshape(layout.shape),
                                chunks=(min(256, layout.shape[0]), layout.shape[1]),
                                **_COMPRESSION)
    mask.attrs["interpretation"] = "image"
    mask.attrs["unit"] = unit
    mask.attrs["description"] = "radial position of each pixel; NaN: not in any bin (masked)"
    norm = group.create_dataset("normalization", data=layout.pixel_norm.reshape(layout.shape),
                                chunks=(min(256, layout.shape[0]), layout.shape[1]),
                                **_COMPRESSION)
    norm.attrs["interpretation"] = "image"
    process = _group(entry, "sparsify", "NXprocess")
    process["program"] = "azfilter"
    process["version"] = __version__
    process["date"] = _now()
    process["sequence_index"] = 2
    note = _group(process, "configuration", "NXnote")
    note["type"] = "text/json"
    note["data"] = to_json({"sparsify": layout.parameters, "azfilter": job_config})


def create_pixel_datasets(group: Any, dtype: np.dtype, dummy: Any) -> None:
    """The ``index``/``intensity`` datasets (empty, extendable) and ``dummy``."""
    group.create_dataset("index", shape=(0,), maxshape=(None,), dtype=np.uint32,
                         chunks=(_PIXEL_CHUNK,), **_COMPRESSION)
    group.create_dataset("intensity", shape=(0,), maxshape=(None,), dtype=dtype,
                         chunks=(_PIXEL_CHUNK,), **_COMPRESSION)
    group.create_dataset("dummy", data=dummy)


def append_sparse(group: Any, indices: list[np.ndarray], values: list[np.ndarray],
                  background: np.ndarray, background_std: np.ndarray) -> None:
    """Append frames (pixels, profiles) to an open sparse group."""
    counts = np.array([len(i) for i in indices], dtype=np.int64)
    ptr = group["frame_ptr"]
    start_frames = ptr.shape[0] - 1
    last = int(ptr[-1])
    ptr.resize(ptr.shape[0] + len(counts), axis=0)
    ptr[start_frames + 1:] = last + np.cumsum(counts)
    if counts.sum():
        for name, parts in (("index", indices), ("intensity", values)):
            dset = group[name]
            joined = np.concatenate(parts).astype(dset.dtype, copy=False)
            dset.resize(last + joined.shape[0], axis=0)
            dset[last:] = joined
    for name, rows in (("background_avg", background), ("background_std", background_std)):
        dset = group[name]
        dset.resize(start_frames + rows.shape[0], axis=0)
        dset[start_frames:] = rows


class SparseWriter(NexusWriter):
    """:class:`NexusWriter` that also writes each frame's sparse representation.

    :meth:`write` takes an :class:`azfilter.bragg.SparseFrame`: its sigma-clip result goes
    to ``/entry/data`` (a row, as ``sigma-clip`` writes it), its profiles and picked pixels
    to ``/entry/sparse_frames``. :meth:`set_layout` must be called before the first frame.

    Raises
    ------
    AzfilterError
        In append mode, when the existing file holds no sparse frames or another detector.
    """

    def __init__(self, path: str | Path, meta: OutputMeta, mode: str = "new"):
        super().__init__(path, meta, mode)
        self.layout: SparseLayout | None = None
        self._lock = threading.Lock()
        self.intensity_dtype: np.dtype | None = None
        self._sparse_buffer: list[Any] = []
        if self._append_base:
            import h5py

            with h5py.File(self.path, "r") as h5:
                group = sparse_group_of(h5)
                if group is None:
                    raise AzfilterError(f"{self.path}: exists but holds no sparse frames (not "
                                        "written by azfilter sparsify); use --overwrite")
                if "intensity" in group:
                    self.intensity_dtype = group["intensity"].dtype
                self._stored_shape = tuple(group["mask"].shape)

    def set_layout(self, layout: SparseLayout) -> None:
        """Give the geometry part (known once the integrator is built)."""
        if self._append_base and tuple(layout.shape) != self._stored_shape:
            raise AzfilterError(f"{self.path}: holds frames of shape {self._stored_shape}, "
                                f"not {tuple(layout.shape)}; use --overwrite")
        self.layout = layout

    def intensity_values(self, values: np.ndarray) -> np.ndarray:
        """The picked values in the file's intensity dtype (the first frame's).

        Called by the reducing thread, so that a frame that does not fit fails alone.

        Raises
        ------
        AzfilterError
            When the values cannot be stored exactly in the file's dtype.
        """
        with self._lock:
            if self.intensity_dtype is None:
                self.intensity_dtype = np.dtype(values.dtype)
            target = self.intensity_dtype
        if values.dtype == target:
            return values
        converted = values.astype(target)
        if not np.array_equal(converted.astype(np.float64), values.astype(np.float64),
                              equal_nan=True):
            raise AzfilterError(f"frame of dtype {values.dtype} does not fit the output's "
                                f"intensity dtype {target}")
        return converted

    def _open(self, radial: np.ndarray, arrays: Any) -> NexusFile:
        file = super()._open(radial, arrays)
        if self._append_base:
            return file
        if self.layout is None:
            file.close()
            raise AzfilterError(f"{self.path}: sparse output without a detector layout")
        layout = self.layout
        try:
            file.guarded(lambda: create_sparse_group(file.h5, layout, self.meta.config))
        except BaseException:
            file.close()
            raise
        return file

    def write(self, result: Any, source: str, index: int) -> None:
        """Append one frame (an :class:`azfilter.bragg.SparseFrame`)."""
        self._sparse_buffer.append(result)
        super().write(result.result, source, index)

    def flush(self) -> None:
        """Write the buffered frames: sparse group first, then the rows."""
        if self._file is not None and self._sparse_buffer:
            frames, self._sparse_buffer = self._sparse_buffer, []
            file = self._file

            def write() -> None:
                group = file.h5[SPARSE_PATH]
                if "intensity" not in group:
                    dtype = self.intensity_dtype or frames[0].intensity.dtype
                    create_pixel_datasets(group, dtype, dummy_for(
                        dtype, self.layout.detector_dummy if self.layout else None))
                append_sparse(group, [f.index for f in frames], [f.intensity for f in frames],
                              np.stack([f.background for f in frames]).astype(np.float32),
                              np.stack([f.background_std for f in frames]).astype(np.float32))

            self._run(lambda: file.guarded(write))
        super().flush()

    def _job_records(self, file: NexusFile) -> None:
        def finish_group() -> None:
            group = file.h5[SPARSE_PATH]
            if "intensity" not in group:    # no frame at all: an empty, readable group
                dtype = self.intensity_dtype or np.dtype(np.float32)
                create_pixel_datasets(group, dtype, dummy_for(
                    dtype, self.layout.detector_dummy if self.layout else None))

        file.guarded(finish_group)
        super()._job_records(file)

    def abort(self) -> None:
        self._sparse_buffer = []
        super().abort()


def read_sparse_config(h5: Any) -> dict[str, Any]:
    """The ``sparsify`` parameters stored in a sparse file (empty when absent)."""
    entry = h5.get("entry")
    if entry is None or "sparsify/configuration/data" not in entry:
        return {}
    value = entry["sparsify/configuration/data"][()]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return dict(json.loads(value).get("sparsify", {}))
    except (ValueError, AttributeError):
        return {}


class SparseMerger:
    """Carries the sparse frames of shard files into a merged file (``azfilter merge``).

    Parameters
    ----------
    out_h5 : h5py.File
        The merged file being written (its ``/entry`` exists).
    inputs : list of Path
        The shard files, all sparse.

    Raises
    ------
    AzfilterError
        When the shards' detector layouts (mask, radius) or intensity dtypes differ.
    """

    def __init__(self, out_h5: Any, inputs: list[Path]):
        import h5py

        first = inputs[0]
        dtypes = []
        with h5py.File(first, "r") as h5:
            group = sparse_group_of(h5)
            mask, radius = group["mask"][()], group["radius"][()]
            out_h5.attrs["creator"] = CREATOR
            entry = out_h5["entry"]
            entry.attrs["pyFAI_sparse_frames"] = SPARSE_PATH
            h5.copy(group, entry, name=SPARSE_GROUP)
            if "sparsify" in h5["entry"]:
                h5.copy(h5["entry/sparsify"], entry, name="sparsify")
        for path in inputs:
            with h5py.File(path, "r") as h5:
                group = sparse_group_of(h5)
                if not (np.array_equal(group["mask"][()], mask, equal_nan=True)
                        and np.array_equal(group["radius"][()], radius)):
                    raise AzfilterError(f"{path}: detector layout (mask, radius) differs from "
                                        f"{first}")
                if "intensity" in group and group["frame_ptr"][-1] > 0:
                    dtypes.append((group["intensity"].dtype, group["dummy"][()]))
        if len({d for d, _ in dtypes}) > 1:
            raise AzfilterError(f"{inputs[0]}: the shards store pixels of different dtypes "
                                f"({', '.join(sorted({str(d) for d, _ in dtypes}))})")
        self.group = out_h5[SPARSE_PATH]
        npt = self.group["radius"].shape[0]
        for name in ("index", "intensity", "dummy", "background_avg", "background_std",
                     "errors", "frame_ptr"):
            if name in self.group:
                del self.group[name]
        self.group.create_dataset("frame_ptr", data=np.zeros(1, np.int64), maxshape=(None,),
                                  chunks=(4096,))
        for name in ("background_avg", "background_std"):
            self.group.create_dataset(name, shape=(0, npt), maxshape=(None, npt),
                                      dtype=np.float32, chunks=(max(1, 65536 // npt), npt),
                                      **_COMPRESSION)
        self.group["errors"] = self.group["background_std"]
        if dtypes:
            create_pixel_datasets(self.group, dtypes[0][0], dtypes[0][1])
        else:
            create_pixel_datasets(self.group, np.dtype(np.float32), np.float32(np.nan))

    def add(self, in_h5: Any, rows: list[int]) -> None:
        """Append the sparse frames ``rows`` (row numbers of ``/entry/data``) of a shard."""
        if not rows:
            return
        group = sparse_group_of(in_h5)
        ptr = group["frame_ptr"][()]
        first, last = int(ptr[rows[0]]), int(ptr[rows[-1] + 1])
        index = group["index"][first:last]
        values = group["intensity"][first:last]
        indices = [index[ptr[r] - first:ptr[r + 1] - first] for r in rows]
        intensities = [values[ptr[r] - first:ptr[r + 1] - first] for r in rows]
        append_sparse(self.group, indices, intensities,
                      group["background_avg"][rows[0]:rows[-1] + 1][
                          [r - rows[0] for r in rows]],
                      group["background_std"][rows[0]:rows[-1] + 1][
                          [r - rows[0] for r in rows]])
