"""Single images (mask, dark, flat), the detector pixel mask stored with a data file, and the
description of a file that ``azfilter info`` shows."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import FrameReadError
from .common import (
    H5_SEPARATOR,
    _check_file,
    _check_image,
    _exception_reason,
    _extension,
    _is_hdf5_name,
    _looks_like_hdf5,
    _native,
)
from .fabio_formats import _FabioSource
from .hdf5 import _compression_of, _Hdf5Source, _master_of, _read_pixel_mask
from .inputs import InputItem, _split_spec


def _spec_parts(path: str | os.PathLike | InputItem) -> tuple[str, str | None]:
    if isinstance(path, InputItem):
        return path.path, path.h5path
    path_part, h5path = _split_spec(os.fspath(path))
    return os.path.expanduser(path_part), h5path


def load_image(path: str | os.PathLike | InputItem) -> np.ndarray:
    """Read a single image (mask, dark, flat): any fabio format, ``.npy``, or HDF5.

    Parameters
    ----------
    path : str, path-like or InputItem
        A file; ``file.h5::/path`` selects an HDF5 dataset (without a path the dataset is
        found as for frames).  Unlike data inputs, any extension is accepted: fabio
        recognises formats by content (e.g. a TIFF mask named ``.mask``).

    Returns
    -------
    numpy.ndarray
        The 2-D image in its stored dtype (native byte order).  A stack of one frame, e.g. of
        shape ``(1, rows, cols)``, gives its frame.

    Raises
    ------
    FrameReadError
        When the file cannot be read or holds more (or fewer) than one frame.
    """
    file_path, h5path = _spec_parts(path)
    source = file_path if h5path is None else f"{file_path}{H5_SEPARATOR}{h5path}"
    _check_file(file_path)
    if file_path.lower().endswith(".npy"):
        try:
            data = np.load(file_path, allow_pickle=False)
        except Exception as exc:
            raise FrameReadError(source, None, _exception_reason(exc, "NPY")) from None
        data = np.asarray(data)
        if data.ndim > 2 and all(n == 1 for n in data.shape[:-2]):
            data = data.reshape(data.shape[-2:])
        return _check_image(data, source, None)

    if h5path is not None or _is_hdf5_name(file_path) or _looks_like_hdf5(file_path):
        h5 = _Hdf5Source(file_path, h5path)
        try:
            if h5.nframes != 1 or len(h5.blocks) != 1:
                raise FrameReadError(h5.source, None, f"holds {h5.nframes} frames; "
                                     "expected a single image")
            return h5.read(h5.blocks[0], 0)
        finally:
            h5.close()

    reader = _FabioSource(file_path)
    try:
        if reader.nframes != 1:
            raise FrameReadError(file_path, None, f"holds {reader.nframes} frames; "
                                 "expected a single image")
        return reader.read(0)[0]
    finally:
        reader.close()


def pixel_mask_for(path: str | os.PathLike | InputItem) -> np.ndarray | None:
    """The detector's own pixel mask stored with an HDF5 data file, or None.

    Looks in the file (Eiger master ``/entry/instrument/detector/detectorSpecific/pixel_mask``,
    else an ``NXdetector/pixel_mask``), and for an Eiger data file ``x_data_NNNNNN.h5`` in its
    ``x_master.h5``.  Non-zero values are invalid pixels (bit flags: gap, dead, noisy...).

    Parameters
    ----------
    path : str, path-like or InputItem
        The data file (a ``::/dataset`` suffix is ignored).  Non-HDF5 files give None.

    Returns
    -------
    numpy.ndarray or None
        The 2-D mask in its stored dtype (usually uint32).
    """
    found = _pixel_mask_with_source(path)
    return None if found is None else found[0]


def _pixel_mask_with_source(path) -> tuple[np.ndarray, str] | None:
    file_path, h5path = _spec_parts(path)
    if h5path is None and not _is_hdf5_name(file_path) and not _looks_like_hdf5(file_path):
        return None
    found = _read_pixel_mask(file_path)
    if found is None:
        master = _master_of(file_path)
        if master is not None:
            found = _read_pixel_mask(master)
    return found


def describe_file(path: str | os.PathLike | InputItem) -> dict:
    """What ``azfilter info`` shows about one data file.

    Parameters
    ----------
    path : str, path-like or InputItem
        One file, optionally ``file.h5::/dataset``.

    Returns
    -------
    dict
        ``path``, ``format`` ("CBF", "EDF", "TIFF", "HDF5"...), ``nframes``, ``shape`` (of one
        frame), ``dtype``, ``compression``, ``size_bytes``; for HDF5 also ``h5path`` (the dataset,
        or an Eiger master's data group), ``layout`` ("dataset" or "eiger-master"),
        ``data_files`` (Eiger: link -> file), ``pixel_mask`` (None or its ``source``,
        ``shape`` and number of ``masked`` pixels); ``header`` (fabio header or dataset attributes).

    Raises
    ------
    FrameReadError
        When the file cannot be read.
    """
    file_path, h5path = _spec_parts(path)
    _check_file(file_path)
    info: dict[str, Any] = {"path": file_path, "size_bytes": os.path.getsize(file_path)}
    if h5path is not None or _is_hdf5_name(file_path) or _looks_like_hdf5(file_path):
        h5 = _Hdf5Source(file_path, h5path)
        try:
            info.update(format="HDF5", h5path=h5.h5path, nframes=h5.nframes,
                        layout="dataset" if h5.links is None else "eiger-master")
            readable = [b for b in h5.blocks if b.error is None]
            if readable:
                dataset = h5._open_dataset(readable[0])
                info.update(shape=tuple(int(n) for n in dataset.shape[-2:]),
                            dtype=str(_native(np.empty(0, dataset.dtype)).dtype),
                            compression=_compression_of(dataset),
                            chunks=dataset.chunks, header=dict(h5.header))
            if h5.links is not None:
                group = h5.file[h5.h5path]
                info["data_files"] = {
                    name: getattr(group.get(name, getlink=True), "filename", None)
                    for name in h5.links}
                info["errors"] = [b.error for b in h5.blocks if b.error is not None]
        finally:
            h5.close()
        mask = _pixel_mask_with_source(file_path)
        info["pixel_mask"] = None if mask is None else {
            "source": mask[1], "shape": mask[0].shape, "masked": int(np.count_nonzero(mask[0]))}
        return info

    reader = _FabioSource(file_path)
    try:
        data, header = reader.read(0)
        compression = []
        ext = _extension(file_path)
        if ext.endswith(".gz"):
            compression.append("gzip file")
        elif ext.endswith(".bz2"):
            compression.append("bzip2 file")
        conversions = header.get("conversions")
        if conversions:
            compression.append(str(conversions).strip().strip('"').replace("x-CBF_", "").lower())
        tiff_compression = header.get("compression_type", header.get("compression"))
        if reader.format == "TIFF" and tiff_compression not in (None, False, 1):
            compression.append(f"TIFF compression {tiff_compression}")
        info.update(format=reader.format, nframes=reader.nframes, shape=data.shape,
                    dtype=str(data.dtype), compression="+".join(compression) or "none",
                    header=header)
    finally:
        reader.close()
    return info
