"""HDF5 and NeXus files through h5py: finding the image stack (Eiger master links, NeXus
default plot, NXdetector data), reading frames, and the detector pixel mask stored with them."""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import AzfilterError, FrameReadError
from .common import (
    _EIGER_DATA_FILE,
    H5_SEPARATOR,
    _check_file,
    _check_image,
    _exception_reason,
    _native,
)

_EIGER_LINK = re.compile(r"^data_(\d{6})$")
_EIGER_PIXEL_MASK = "/entry/instrument/detector/detectorSpecific/pixel_mask"
# Default HDF5 chunk cache per dataset: small, because frames are read once each.  A dataset
# whose chunks hold several frames gets a cache of one chunk so that the chunk is decompressed
# once, not once per frame (bounded by _MAX_CHUNK_CACHE).
_CHUNK_CACHE = 1 << 20
_MAX_CHUNK_CACHE = 512 << 20


def _import_h5py():
    import h5py
    import hdf5plugin  # noqa: F401  (registers bitshuffle-LZ4 and other filters with HDF5)

    return h5py


def _h5_open(path: str):
    """Open ``path`` read-only, without HDF5 file locking (breaks on some beamline file
    systems and while a writer holds the file), with a small chunk cache."""
    _check_file(path)
    h5py = _import_h5py()
    try:
        return h5py.File(path, "r", locking=False, rdcc_nbytes=_CHUNK_CACHE)
    except Exception as exc:
        message = _exception_reason(exc)
        if "signature not found" in message:
            message = f"not an HDF5 file ({message})"
        raise FrameReadError(path, None, message) from None


def _attr_text(obj, name: str) -> str | None:
    """Attribute ``name`` of ``obj`` as a string (NeXus writes bytes, str or 1-element arrays)."""
    try:
        value = obj.attrs.get(name)
    except Exception:
        return None
    if isinstance(value, np.ndarray):
        if value.size != 1:
            return None
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _plain_attrs(obj) -> dict:
    """HDF5 attributes as plain Python values (str, int, float, lists)."""
    out = {}
    for key in obj.attrs:
        try:
            value = obj.attrs[key]
        except Exception:           # unreadable attribute types: skip, metadata only
            continue
        if isinstance(value, (bytes, np.bytes_)):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = [v.decode("utf-8", "replace") if isinstance(v, (bytes, np.bytes_)) else v
                     for v in value.tolist()] if value.size <= 64 else value
        out[key] = value
    return out


def _is_dataset(obj) -> bool:
    h5py = _import_h5py()
    return isinstance(obj, h5py.Dataset)


def _is_image_dataset(obj) -> bool:
    return (_is_dataset(obj) and obj.ndim >= 2 and obj.dtype.kind in "biuf"
            and all(n > 0 for n in obj.shape[-2:]))


def _eiger_links(group) -> list[str]:
    """Names ``data_000001, ...`` in ``group`` (an Eiger master's /entry/data), in order."""
    try:
        names = list(group.keys())
    except Exception:
        return []
    return sorted((n for n in names if _EIGER_LINK.match(n)), key=lambda n: int(n[5:]))


def _join_h5(base: str, name: str) -> str:
    """HDF5 path of ``name`` relative to ``base`` (paths are tracked by hand because an
    object's ``.name`` is its path in the file an external link leads to)."""
    joined = posixpath.normpath(name if name.startswith("/") else posixpath.join(base, name))
    return "/" + joined.lstrip("/")


def _get_quiet(group, name: str):
    try:
        return group.get(name)
    except Exception:               # broken links: treated as absent while searching
        return None


def _nexus_default(group, base: str) -> tuple[str, Any] | None:
    """(path, dataset) the NeXus ``@default`` / ``@signal`` attributes point to, or None."""
    node, path = group, base
    for _ in range(8):              # @default chains are short; the bound stops cycles
        name = _attr_text(node, "default")
        if name is None:
            break
        child = _get_quiet(node, name)
        if child is None:
            break
        node, path = child, _join_h5(path, name)
        if _is_dataset(node):
            return path, node
    signal = _attr_text(node, "signal")
    target = None if signal is None else _get_quiet(node, signal)
    if _is_dataset(target):
        return _join_h5(path, signal), target
    return None


def _first_image_dataset(group, base: str, nx_class: str | None = None) -> str | None:
    """Path of the first image dataset under ``group`` in HDF5 visit order; with ``nx_class``
    only the ``data`` member of groups of that NeXus class."""
    found = []

    def visit(name, obj):
        if nx_class is None:
            if _is_image_dataset(obj):
                found.append(_join_h5(base, name))
                return True
        elif not _is_dataset(obj) and _attr_text(obj, "NX_class") == nx_class:
            if _is_image_dataset(_get_quiet(obj, "data")):
                found.append(_join_h5(base, name + "/data"))
                return True
        return None

    group.visititems(visit)
    return found[0] if found else None


def _locate_stack(group, base: str) -> tuple[str, list[str] | None]:
    """Find the image stack in ``group`` (the file root, or a group the user named),
    whose path is ``base``.

    Returns
    -------
    (h5path, links)
        ``links`` is the list of Eiger ``data_NNNNNN`` names under ``h5path`` for a master
        file, else None and ``h5path`` is a dataset.
    """
    for candidate, path in ((group, base),
                            (_get_quiet(group, "entry/data"), _join_h5(base, "entry/data"))):
        if candidate is not None and not _is_dataset(candidate):
            links = _eiger_links(candidate)
            if links:
                return path, links
    default = _nexus_default(group, base)
    if default is not None and _is_image_dataset(default[1]):
        return default[0], None
    if _is_image_dataset(_get_quiet(group, "entry/data/data")):
        return _join_h5(base, "entry/data/data"), None
    for nx_class in ("NXdetector", None):
        path = _first_image_dataset(group, base, nx_class)
        if path is not None:
            return path, None
    raise AzfilterError("no image dataset (2-D or more) found; give one as file.h5::/path")


@dataclass
class _Block:
    """A run of frames in one HDF5 dataset (an Eiger master has one block per data file)."""

    h5path: str
    first: int = 0                  # index of the block's first frame in the whole stack
    nframes: int = 0
    error: str | None = None        # why the block cannot be read (broken external link)


def _stack_length(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1


def _compression_of(dataset) -> str:
    """Human-readable HDF5 filter pipeline, e.g. 'bitshuffle+lz4', 'shuffle+gzip(4)'."""
    try:
        plist = dataset.id.get_create_plist()
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    except Exception:
        return "unknown"
    names = []
    for code, _flags, values, _name in filters:
        if code == 1:
            names.append(f"gzip({values[0]})" if values else "gzip")
        elif code == 32008:
            kind = {2: "+lz4", 3: "+zstd"}.get(values[4] if len(values) > 4 else 0, "")
            names.append("bitshuffle" + kind)
        else:
            names.append({2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset",
                          32000: "lzf", 32001: "blosc", 32004: "lz4", 32015: "zstd",
                          32026: "blosc2"}.get(code, f"filter {code}"))
    return "+".join(names) if names else "none"


class _Hdf5Source:
    """An open HDF5 file and the image stack inside it (one dataset, or Eiger links)."""

    def __init__(self, path: str, h5path: str | None, layout: tuple | None = None):
        self.path = path
        self.file = _h5_open(path)
        self.header: dict = {}
        self._dataset = None
        self._dataset_block: _Block | None = None
        if layout is not None:
            self.h5path, self.links, self.blocks, self.nframes = layout
            return
        try:
            self._locate(h5path)
        except FrameReadError:
            self.close()
            raise
        except AzfilterError as exc:
            self.close()
            raise FrameReadError(self.source, None, str(exc)) from None
        except Exception as exc:
            self.close()
            raise FrameReadError(self.source, None, _exception_reason(exc, "HDF5")) from None

    @property
    def layout(self) -> tuple:
        """Where the stack is, to skip the search when the file is opened again."""
        return self.h5path, self.links, self.blocks, self.nframes

    @property
    def source(self) -> str:
        path = getattr(self, "h5path", None)
        return self.path if path is None else f"{self.path}{H5_SEPARATOR}{path}"

    def _locate(self, h5path: str | None) -> None:
        self.h5path = h5path
        self.links: list[str] | None = None
        if h5path is None:
            self.h5path, self.links = _locate_stack(self.file, "/")
        else:
            obj = self._get(h5path)
            if not _is_dataset(obj):
                self.h5path, self.links = _locate_stack(obj, _join_h5("/", h5path))
        if self.links is None:
            dataset = self.file[self.h5path]
            self._check_dataset(dataset, self.source)
            self.blocks = [_Block(self.h5path, 0, _stack_length(dataset.shape))]
        else:
            self.blocks = self._eiger_blocks()
        readable = [b for b in self.blocks if b.error is None]
        self.nframes = max((b.first + b.nframes for b in readable), default=0)

    def _get(self, h5path: str):
        """The object at ``h5path``, with a clear message for missing paths and broken links."""
        try:
            link = self.file.get(h5path, getlink=True)
        except Exception:
            link = None
        if link is None:
            raise FrameReadError(self.source, None, f"no dataset or group {h5path} in this file")
        try:
            return self.file[h5path]
        except Exception as exc:
            target = getattr(link, "filename", None)
            if target is not None:
                raise FrameReadError(self.source, None, f"external link {h5path} -> {target}:"
                                     f"{link.path} cannot be opened") from None
            raise FrameReadError(self.source, None, _exception_reason(exc, "HDF5")) from None

    @staticmethod
    def _check_dataset(dataset, source: str) -> None:
        if dataset.ndim < 2:
            raise FrameReadError(source, None, f"dataset is {dataset.ndim}-D (shape "
                                 f"{dataset.shape}), not an image or a stack of images")
        if dataset.dtype.kind not in "biuf":
            raise FrameReadError(source, None, f"dataset is not numeric (dtype {dataset.dtype})")

    def _eiger_blocks(self) -> list[_Block]:
        group = self.file[self.h5path]
        blocks = []
        next_first = 0
        for name in self.links:
            h5path = _join_h5(self.h5path, name)
            block = _Block(h5path, next_first)
            try:
                dataset = group[name]
                self._check_dataset(dataset, f"{self.path}{H5_SEPARATOR}{h5path}")
            except FrameReadError as exc:
                block.error = f"{h5path}: {exc.reason}"
            except Exception:
                link = group.get(name, getlink=True)
                target = getattr(link, "filename", None)
                block.error = (f"{h5path}: linked data file {target} cannot be opened"
                               if target else f"{h5path}: cannot be opened")
            else:
                block.nframes = _stack_length(dataset.shape)
                # Eiger data sets say which images they hold (1-based); trusting that keeps
                # the frame numbers right after a missing data file.
                low = dataset.attrs.get("image_nr_low")
                if low is not None and np.ndim(low) == 0 and int(low) - 1 >= next_first:
                    block.first = int(low) - 1
                del dataset
            blocks.append(block)
            next_first = block.first + block.nframes
        return blocks

    def _open_dataset(self, block: _Block):
        """Open the block's dataset with a chunk cache that fits one chunk when a chunk holds
        several frames, so that each chunk is decompressed once."""
        if self._dataset_block is block:
            return self._dataset
        self._dataset = None            # closes the previous Eiger data file
        h5py = _import_h5py()
        dataset = self.file[block.h5path]
        chunks = dataset.chunks
        if chunks is not None and dataset.ndim > 2 and int(np.prod(chunks[:-2])) > 1:
            chunk_bytes = int(np.prod(chunks, dtype=np.int64)) * dataset.dtype.itemsize
            if chunk_bytes > _CHUNK_CACHE:
                dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                dapl.set_chunk_cache(521, min(chunk_bytes + 4096, _MAX_CHUNK_CACHE), 1.0)
                dataset = h5py.Dataset(h5py.h5d.open(self.file.id, block.h5path.encode(), dapl))
        self._dataset, self._dataset_block = dataset, block
        self.header = _plain_attrs(dataset)
        return dataset

    def read(self, block: _Block, index: int, buffer: Callable | None = None) -> np.ndarray:
        try:
            dataset = self._open_dataset(block)
            local = index - block.first
            if dataset.ndim == 2:
                where: Any = ()
            elif dataset.ndim == 3:
                where = local
            else:
                where = tuple(int(i) for i in np.unravel_index(local, dataset.shape[:-2]))
            if buffer is not None and dataset.dtype.kind in "iuf":
                # decode straight into the caller's array (e.g. page-locked memory)
                data = buffer(tuple(dataset.shape[-2:]), dataset.dtype.newbyteorder("="))
                dataset.read_direct(data, np.s_[where] if dataset.ndim > 2 else None)
            else:
                data = dataset[where]
        except Exception as exc:
            raise FrameReadError(self.source, index, _exception_reason(exc, "HDF5")) from None
        return _check_image(data, self.source, index)

    def close(self) -> None:
        self._dataset = None
        self._dataset_block = None
        try:
            self.file.close()
        except Exception:
            pass


def _pixel_mask_dataset(h5file):
    """The detector pixel mask dataset of an open HDF5 file, or None.

    The Eiger master's ``detectorSpecific/pixel_mask`` first, then the NeXus
    ``NXdetector/pixel_mask`` of any entry (e.g. X-Spectrum Lambda files).
    """
    candidate = h5file.get(_EIGER_PIXEL_MASK)
    if _is_dataset(candidate):
        return candidate
    for entry in h5file.values():
        if _is_dataset(entry):
            continue
        for instrument in entry.values():
            if _is_dataset(instrument) or _attr_text(instrument, "NX_class") != "NXinstrument":
                continue
            for detector in instrument.values():
                if _is_dataset(detector) or _attr_text(detector, "NX_class") != "NXdetector":
                    continue
                candidate = detector.get("pixel_mask")
                if _is_dataset(candidate):
                    return candidate
    return None


def _master_of(path: str) -> str | None:
    """``x_master.h5`` next to an Eiger data file ``x_data_000001.h5``, if it exists."""
    match = _EIGER_DATA_FILE.match(os.path.basename(path))
    if match is None:
        return None
    master = os.path.join(os.path.dirname(path), match["prefix"] + "_master.h5")
    return master if os.path.isfile(master) else None


def _read_pixel_mask(path: str) -> tuple[np.ndarray, str] | None:
    h5 = _h5_open(path)
    try:
        dataset = _pixel_mask_dataset(h5)
        if dataset is None:
            return None
        mask = _native(dataset[()])
        source = f"{path}{H5_SEPARATOR}{dataset.name}"
    except Exception as exc:
        raise FrameReadError(path, None, f"pixel mask: {_exception_reason(exc, 'HDF5')}") from None
    finally:
        h5.close()
    if mask.ndim > 2 and all(n == 1 for n in mask.shape[:-2]):
        mask = mask.reshape(mask.shape[-2:])     # Lambda stores it as (1, rows, cols)
    if mask.ndim != 2:
        return None
    return mask, source
