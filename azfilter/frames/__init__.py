"""Reading detector frames: EDF, CBF, TIFF (through fabio) and HDF5/NeXus (through h5py).

Inputs are files, globs, directories or ``file.h5::/path/to/dataset``.  Multi-frame files
(HDF5 stacks, Eiger master files, multi-frame EDF/TIFF) are streamed one frame at a time, so
memory stays flat whatever the stack length.

HDF5 without a dataset path: the image stack is found, in this order, as

1. an Eiger master file: the external links ``/entry/data/data_000001, data_000002, ...``
   are read in order as one stack (source ``master.h5::/entry/data``);
2. the NeXus default plot: ``/@default`` -> NXentry ``@default`` -> NXdata ``@signal``;
3. ``/entry/data/data``;
4. the ``data`` dataset of an NXdetector group (e.g. X-Spectrum Lambda files);
5. the first dataset of two or more dimensions.

2-D datasets are one frame; 3-D datasets are stacks ``(N, rows, cols)``; higher dimensions are
stacks over all leading axes.

Modules: :mod:`.inputs` (specs, globs, directories -> :class:`InputItem`), :mod:`.fabio_formats`
(EDF/CBF/TIFF through fabio), :mod:`.hdf5` (HDF5/NeXus/Eiger through h5py), :mod:`.stream`
(:func:`open_frames`), :mod:`.images` (single images, pixel masks, file descriptions).
"""

from __future__ import annotations

from .common import DATA_EXTENSIONS, FABIO_EXTENSIONS, HDF5_EXTENSIONS, Frame
from .images import describe_file, load_image, pixel_mask_for
from .inputs import InputItem, expand_inputs
from .stream import count_frames, open_frames

__all__ = [
    "DATA_EXTENSIONS",
    "FABIO_EXTENSIONS",
    "HDF5_EXTENSIONS",
    "Frame",
    "InputItem",
    "count_frames",
    "describe_file",
    "expand_inputs",
    "load_image",
    "open_frames",
    "pixel_mask_for",
]
