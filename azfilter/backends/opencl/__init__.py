"""The OpenCL backend: integrate, sigma_clip and medfilt on any OpenCL 1.2 device.

- :mod:`.devices`: discovery and selection (``azfilter devices``, ``--device``);
- :mod:`.hostmem`: page-locked host memory and the threads that copy frames into it;
- :mod:`.programs`: kernel sources, compiled programs and :class:`OpenCLProcessing`, the base
  class that owns a device's context, queues, buffers and kernels;
- :mod:`.engine`: :class:`OpenCLEngine`, the engine.

``pyopencl`` is imported lazily: importing this package works without it, and
:func:`list_devices` then returns an empty list (:func:`opencl_status` says why).
"""

from __future__ import annotations

from .devices import import_pyopencl, list_devices, opencl_status, select_device
from .engine import (
    DEFAULT_COPY_THREADS,
    OPERATIONS,
    RAW_TYPES,
    STAGING_ROUNDS,
    STAGING_UNIT_BYTES,
    OpenCLEngine,
)
from .hostmem import copy_piece, is_pinned, pinned_array, pinned_ranges
from .programs import KERNEL_FILES, OpenCLProcessing, kernel_source

__all__ = [
    "DEFAULT_COPY_THREADS", "KERNEL_FILES", "OPERATIONS", "RAW_TYPES", "STAGING_ROUNDS",
    "STAGING_UNIT_BYTES", "OpenCLEngine", "OpenCLProcessing", "copy_piece", "import_pyopencl",
    "is_pinned", "kernel_source", "list_devices", "opencl_status", "pinned_array",
    "pinned_ranges", "select_device",
]
