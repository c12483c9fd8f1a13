"""OpenCLEngine: integrate, sigma_clip and medfilt on any OpenCL 1.2 device (pyopencl).

One :class:`OpenCLEngine` owns a context, two in-order command queues (transfers and
kernels), the compiled programs and every device buffer. The geometry (CSR table,
``pixel_norm``, ``dark``) goes to the device once, in ``__init__``; per frame only the raw
frame travels, in its own dtype (``uint16``, ``uint32``, ``int32``, ``float32``...), and the
kernels convert it on the device: the program is compiled once per raw dtype
(``-D RAW_T=...``) and cached. Kernels (``kernels/azf_*.cl``):

- ``integrate``: one work-group per radial bin, coalesced reads of the row, local-memory
  reductions (and a second pass for the exact azimuthal scatter);
- ``sigma_clip``: every iteration in one launch; per bin the work-group recomputes the sums,
  broadcasts mean and std and flags rejected entries in a per-entry ``uint8`` buffer;
- ``medfilt``: a bitonic sort of the bin's keys in local memory when the row fits, otherwise
  a chunked sort plus merge passes in global memory, then two identical work-group scans of
  the weights (the total, then the selection) and the sums of the selected fragments.

Accumulators are double where the device has ``cl_khr_fp64`` (per-pixel arithmetic then also
runs in double, like the numpy reference), compensated float32 pairs otherwise.

``pyopencl`` is imported lazily: the rest of azfilter imports and runs without it.
:func:`list_devices` and :func:`opencl_status` serve ``azfilter devices``.
"""

from __future__ import annotations

import importlib.resources
import math
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AzfilterError
from . import ERROR_MODELS, BinSums

#: OpenCL sources, concatenated in this order into one program
KERNEL_FILES: tuple[str, ...] = (
    "azf_common.cl", "azf_integrate.cl", "azf_sigma_clip.cl", "azf_medfilt.cl",
)

#: numpy dtype of a raw frame -> OpenCL C type the kernels read it as
RAW_TYPES: dict[np.dtype, str] = {
    np.dtype(np.uint8): "uchar", np.dtype(np.int8): "char",
    np.dtype(np.uint16): "ushort", np.dtype(np.int16): "short",
    np.dtype(np.uint32): "uint", np.dtype(np.int32): "int",
    np.dtype(np.uint64): "ulong", np.dtype(np.int64): "long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}

#: operations the engine runs, for :meth:`OpenCLEngine.process_many`
OPERATIONS: tuple[str, ...] = ("integrate", "sigma_clip", "medfilt")

_NSUMS = 5                  # S, V, W, W2, N: rows of the output array (kernels' NSUMS)
_CLIP_MODEL = {"poisson": 0, "variance": 0, "azimuthal": 1, "hybrid": 2}
_VAR_POISSON, _VAR_ARRAY = 0, 1
_DEFAULT_GPU_WORKGROUP = 256
_DEFAULT_CPU_WORKGROUP = 64
_MAX_LOCAL_SORT = 4096

_REPO_KERNELS = Path(__file__).resolve().parent.parent.parent / "kernels"

# Contexts and programs are shared by every engine of the process (compiling costs seconds).
_CONTEXTS: dict[tuple[int, int], Any] = {}
_PROGRAMS: dict[tuple[int, str], Any] = {}
_SOURCE: str | None = None


# ------------------------------------------------------------------------------ discovery
def _import_pyopencl():
    """Return the pyopencl module, or raise AzfilterError saying it is missing."""
    try:
        import pyopencl
    except ImportError as err:
        raise AzfilterError(f"OpenCL backend unavailable: pyopencl is not installed ({err})") \
            from err
    return pyopencl


def _device_type_name(cl, device) -> str:
    for flag, name in ((cl.device_type.GPU, "GPU"), (cl.device_type.CPU, "CPU"),
                       (cl.device_type.ACCELERATOR, "ACCELERATOR")):
        if device.type & flag:
            return name
    return "OTHER"


def _describe(cl, platform_index: int, device_index: int, platform, device) -> dict:
    return {
        "id": f"{platform_index}:{device_index}",
        "platform": platform_index,
        "device": device_index,
        "platform_name": platform.name.strip(),
        "name": device.name.strip(),
        "type": _device_type_name(cl, device),
        "version": device.version.strip(),
        "driver_version": device.driver_version.strip(),
        "global_memory": int(device.global_mem_size),
        "local_memory": int(device.local_mem_size),
        "max_work_group_size": int(device.max_work_group_size),
        "compute_units": int(device.max_compute_units),
        "fp64": "cl_khr_fp64" in device.extensions.split(),
    }


def _enumerate(cl) -> list[tuple[dict, Any]]:
    """(description, cl.Device) of every device of every platform that answers."""
    found = []
    for platform_index, platform in enumerate(cl.get_platforms()):
        try:
            devices = platform.get_devices()
        except cl.Error:    # a platform without devices raises DEVICE_NOT_FOUND
            continue
        for device_index, device in enumerate(devices):
            found.append((_describe(cl, platform_index, device_index, platform, device),
                          device))
    return found


def list_devices() -> list[dict]:
    """Every OpenCL device this process can use.

    Returns
    -------
    list of dict
        One dict per device with keys ``id`` (``"P:D"``, what ``device=`` accepts),
        ``platform``, ``device`` (indices), ``platform_name``, ``name``, ``type`` (``"GPU"``,
        ``"CPU"``, ``"ACCELERATOR"``, ``"OTHER"``), ``version``, ``driver_version``,
        ``global_memory`` and ``local_memory`` (bytes), ``max_work_group_size``,
        ``compute_units`` and ``fp64`` (double precision available). Empty when pyopencl is
        missing or no platform answers; :func:`opencl_status` says why.
    """
    try:
        cl = _import_pyopencl()
        return [info for info, _ in _enumerate(cl)]
    except Exception:   # AzfilterError, cl.Error from a broken ICD loader: nothing usable
        return []


def opencl_status() -> str:
    """One paragraph saying whether OpenCL is usable here and, if not, why.

    Returns
    -------
    str
        e.g. ``"OpenCL: 1 device(s): 0:0 CPU pthread-skylake... (Portable Computing
        Language)"`` or the reason none is available (pyopencl missing, no platform, an ICD
        loader error), with a hint on how to fix it.
    """
    try:
        import pyopencl as cl
    except ImportError as err:
        return (f"OpenCL unavailable: pyopencl is not installed ({err}); "
                "pip install pyopencl")
    try:
        platforms = cl.get_platforms()
    except Exception as err:   # PLATFORM_NOT_FOUND_KHR when the ICD loader finds no driver
        return ("OpenCL unavailable: no OpenCL platform found "
                f"({type(err).__name__}: {err}); install a driver (pocl-opencl-icd for CPUs, "
                "the GPU vendor's OpenCL ICD) and check /etc/OpenCL/vendors or "
                "$OCL_ICD_VENDORS")
    if not platforms:
        return ("OpenCL unavailable: the ICD loader lists no platform; install a driver "
                "(pocl-opencl-icd) and check /etc/OpenCL/vendors")
    lines, problems = [], []
    for platform_index, platform in enumerate(platforms):
        try:
            devices = platform.get_devices()
        except Exception as err:
            problems.append(f"platform {platform_index} ({platform.name.strip()}): "
                            f"{type(err).__name__}: {err}")
            continue
        for device_index, device in enumerate(devices):
            info = _describe(cl, platform_index, device_index, platform, device)
            lines.append(f"{info['id']} {info['type']} {info['name']} "
                         f"({info['platform_name']}, {info['global_memory'] / 2**30:.1f} GiB, "
                         f"{info['compute_units']} compute units, "
                         f"fp64 {'yes' if info['fp64'] else 'no'})")
    if not lines:
        return "OpenCL unavailable: platforms found but no device: " + "; ".join(problems)
    text = f"OpenCL: {len(lines)} device(s): " + "; ".join(lines)
    if problems:
        text += " (ignored: " + "; ".join(problems) + ")"
    return text


def select_device(device: str | None = None) -> tuple[dict, Any]:
    """Resolve a ``device=`` choice to (description, ``pyopencl.Device``).

    Parameters
    ----------
    device : str or None
        ``"gpu"`` (the best GPU), ``"cpu"``, ``"P:D"`` (platform and device indices, as
        :func:`list_devices` ``id``), or None: the best GPU, else a CPU, else anything.

    Raises
    ------
    AzfilterError
        When pyopencl or a platform is missing, or the choice does not exist (the message
        lists the devices that do).
    """
    cl = _import_pyopencl()
    try:
        found = _enumerate(cl)
    except Exception as err:
        raise AzfilterError(opencl_status()) from err
    if not found:
        raise AzfilterError(opencl_status())
    available = ", ".join(f"{info['id']} ({info['type']} {info['name']})" for info, _ in found)

    def best(kind: str | None):
        ranked = [item for item in found if kind is None or item[0]["type"] == kind]
        # GPUs first, then double precision, then memory, then compute units
        ranked.sort(key=lambda item: (item[0]["type"] == "GPU", item[0]["type"] == "CPU",
                                      item[0]["fp64"], item[0]["global_memory"],
                                      item[0]["compute_units"]), reverse=True)
        return ranked[0] if ranked else None

    choice = None if device is None else str(device).strip().lower()
    if choice in (None, "", "auto"):
        return best(None)
    if choice in ("gpu", "cpu"):
        picked = best(choice.upper())
        if picked is None:
            raise AzfilterError(f"--device {device}: no OpenCL {choice.upper()} found; "
                                f"available: {available}")
        return picked
    parts = choice.split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        wanted = (int(parts[0]), int(parts[1]))
        for info, dev in found:
            if (info["platform"], info["device"]) == wanted:
                return info, dev
        raise AzfilterError(f"--device {device}: no OpenCL device {wanted[0]}:{wanted[1]}; "
                            f"available: {available}")
    raise AzfilterError(f"--device {device!r}: expected 'gpu', 'cpu' or 'P:D' "
                        f"(platform:device); available: {available}")


# ------------------------------------------------------------------------------ programs
def kernel_source() -> str:
    """The OpenCL C source of every kernel (installed copy, else the repository's kernels/)."""
    global _SOURCE
    if _SOURCE is None:
        parts = []
        installed = importlib.resources.files("azfilter") / "kernels"
        for name in KERNEL_FILES:
            resource = installed / name
            if resource.is_file():
                parts.append(resource.read_text(encoding="utf-8"))
            else:   # editable install / source tree: the .cl files are not in the package
                path = _REPO_KERNELS / name
                if not path.is_file():
                    raise AzfilterError(f"OpenCL kernel {name} not found in the azfilter "
                                        f"package nor in {_REPO_KERNELS}; reinstall azfilter")
                parts.append(path.read_text(encoding="utf-8"))
        _SOURCE = "\n".join(parts)
    return _SOURCE


def _context(cl, info: dict, device) -> Any:
    key = (info["platform"], info["device"])
    if key not in _CONTEXTS:
        _CONTEXTS[key] = cl.Context([device])
    return _CONTEXTS[key]


def _program(cl, context, options: list[str]) -> Any:
    """Build (once per context and options) the program of every kernel."""
    key = (context.int_ptr, " ".join(options))
    program = _PROGRAMS.get(key)
    if program is None:
        try:
            with warnings.catch_warnings():
                # some drivers always log something (NVIDIA: "overriding noinline attribute")
                warnings.simplefilter("ignore", cl.CompilerWarning)
                program = cl.Program(context, kernel_source()).build(options=options)
        except cl.RuntimeError as err:   # a compiler error is our bug: show the log
            raise RuntimeError(f"OpenCL build failed with options {options}:\n{err}") from err
        _PROGRAMS[key] = program
    return program


# ------------------------------------------------------------------------------ the engine
@dataclass
class _Pending:
    """A frame submitted to the device whose sums are not read yet."""

    sums: np.ndarray    # host array the sums are copied into
    done: Any           # event of that copy


class OpenCLEngine:
    """OpenCL engine: same interface and results as :class:`~.python.PythonEngine`.

    Parameters
    ----------
    csr : azfilter.binning.CSR
        Lookup table (``indptr`` int64, ``indices`` int32, ``coefs`` float32).
    pixel_norm : numpy.ndarray
        float32, flat: ``normalization · flat · polarization · solid_angle``, 0 where masked.
    dark : numpy.ndarray or None
        float32, flat dark current.
    dummy, delta_dummy : float or None, float
        Raw value flagging invalid pixels and its tolerance.
    threads : int, optional
        Ignored (the device decides).
    device : str, optional
        ``"gpu"``, ``"cpu"``, ``"P:D"`` or None (best GPU, else a CPU); see
        :func:`select_device`.
    workgroup_size : int, optional
        Work-items per bin (a power of two); default 256 on GPUs, 64 on CPUs.
    local_sort_size : int, optional
        Longest row sorted in local memory by medfilt (a power of two); longer rows use the
        global-memory sort. Default: what fits in the device's local memory, at most 4096.
    fp64 : bool, optional
        Force double (True) or compensated float32 (False) arithmetic; default: double when
        the device supports it.

    Notes
    -----
    An engine is not thread-safe: use one per thread. The ``variance`` array of the
    ``"variance"`` error model is uploaded once and reused while the same array object (with
    the same content) is passed again.

    On a discrete GPU the upload of a frame from ordinary (pageable) memory runs at the
    host's memory-copy speed (the driver copies it into a page-locked buffer first: about
    11 GB/s on the H100 host measured, 1.3 ms for an Eiger 4M uint32 frame), while a frame
    that already lives in page-locked memory goes by DMA at about 50 GB/s (0.35 ms). Readers
    that can decode into a given buffer should use :meth:`pinned_array`. (Copying frames into
    a page-locked buffer with several threads was tried and gained little: the host's memory
    bandwidth is the limit.)
    """

    name = "opencl"

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | None = None, *, workgroup_size: int | None = None,
                 local_sort_size: int | None = None, fp64: bool | None = None):
        cl = self._cl = _import_pyopencl()
        self.device_info, self._device = select_device(device)
        self.pixel_norm = np.ascontiguousarray(pixel_norm, dtype=np.float32).ravel()
        self.npix = int(self.pixel_norm.size)
        indptr = np.asarray(csr.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(csr.indices, dtype=np.int32)
        coefs = np.ascontiguousarray(csr.coefs, dtype=np.float32)
        self.npt = int(indptr.size - 1)
        self.nnz = int(indices.size)
        if indptr[-1] != self.nnz or coefs.size != self.nnz or self.npt < 1:
            raise ValueError("CSR indptr, indices and coefs disagree in length")
        rows = np.repeat(np.arange(self.npt), np.diff(indptr))
        if np.any((np.diff(indices) <= 0) & (np.diff(rows) == 0)):
            # medfilt breaks ties by position in the row: it must be the pixel index order
            order = np.lexsort((indices, rows))
            indices, coefs = indices[order], coefs[order]
        if self.nnz >= 2**31 - 1:
            raise AzfilterError(f"lookup table has {self.nnz} entries; the OpenCL backend "
                                "handles at most 2^31 - 1")
        self.shape = tuple(int(n) for n in getattr(csr, "shape", (self.npix,)))
        self.dummy = None if dummy is None else float(dummy)
        self.delta_dummy = float(delta_dummy)

        has_fp64 = bool(self.device_info["fp64"])
        if fp64 and not has_fp64:
            raise AzfilterError(f"OpenCL device {self.device_info['name']} has no double "
                                "precision (cl_khr_fp64)")
        self.fp64 = has_fp64 if fp64 is None else bool(fp64)
        self._real = np.float64 if self.fp64 else np.float32
        is_gpu = self.device_info["type"] == "GPU"
        wg = int(workgroup_size or (_DEFAULT_GPU_WORKGROUP if is_gpu
                                    else _DEFAULT_CPU_WORKGROUP))
        if wg < 1 or wg & (wg - 1):
            raise AzfilterError(f"workgroup_size must be a power of two, got {workgroup_size}")
        wg = min(wg, 1 << (self.device_info["max_work_group_size"].bit_length() - 1))
        acc_bytes = 8   # double or float2
        if local_sort_size is None:
            budget = self.device_info["local_memory"] - _NSUMS * wg * acc_bytes - 4 * wg - 1024
            local_sort_size = 1 << max(1, int(math.log2(max(2, budget // 8))))
            local_sort_size = min(_MAX_LOCAL_SORT, local_sort_size)
        if local_sort_size < 2 or local_sort_size & (local_sort_size - 1):
            raise AzfilterError(f"local_sort_size must be a power of two >= 2, got "
                                f"{local_sort_size}")
        self.local_sort_size = int(local_sort_size)

        self.context = _context(cl, self.device_info, self._device)
        self._queue = cl.CommandQueue(self.context, self._device)            # kernels
        self._transfer_queue = cl.CommandQueue(self.context, self._device)   # uploads
        self._pinned: list[Any] = []   # keeps the buffers behind pinned_array alive

        # ---- geometry, once
        row_lengths = np.diff(indptr)
        self.max_row = int(row_lengths.max()) if row_lengths.size else 0
        self._idx_bits = max(1, (max(self.max_row, 1) - 1).bit_length())
        mf = cl.mem_flags
        ro = mf.READ_ONLY | mf.COPY_HOST_PTR

        def upload(array: np.ndarray):
            if array.size == 0:   # OpenCL refuses empty buffers
                array = np.zeros(1, dtype=array.dtype)
            return cl.Buffer(self.context, ro, hostbuf=np.ascontiguousarray(array))
        self._upload_table = upload

        try:
            self._indptr = upload(indptr.astype(np.int32))
            self._indices = upload(indices)
            self._coefs = upload(coefs)
            self._pixel_norm = upload(self.pixel_norm)
            self.has_dark = dark is not None
            self._dark = upload(np.ascontiguousarray(dark, dtype=np.float32).ravel()
                                if dark is not None else np.zeros(1, np.float32))
            if dark is not None and np.size(dark) != self.npix:
                raise AzfilterError(f"dark has {np.size(dark)} pixels, the detector "
                                    f"{self.npix}")
            self._no_variance = upload(np.zeros(1, np.float32))
            self._variance = None           # device copy of the last variance array
            self._variance_host = None      # ... the array object it came from
            self._variance_copy = None      # ... and its content then
            # two frames in flight (process_many): raw frame and sums per slot
            self._raw_bytes = max(8, self.npix * 8)   # room for any raw dtype up to 8 bytes
            sums_bytes = _NSUMS * self.npt * acc_bytes
            self._raw = [cl.Buffer(self.context, mf.READ_ONLY, self._raw_bytes)
                         for _ in range(2)]
            self._sums = [cl.Buffer(self.context, mf.WRITE_ONLY, sums_bytes) for _ in range(2)]
            self._slot_free: list[Any] = [None, None]    # event after which a slot is reusable
            self._flags = cl.Buffer(self.context, mf.READ_WRITE, max(1, self.nnz))
        except cl.MemoryError as err:
            raise AzfilterError(f"OpenCL device {self.device_info['name']} has not enough "
                                f"memory for this lookup table ({self.nnz} entries)") from err

        # ---- medfilt rows longer than the local sort: chunk table, merge widths
        self._long_rows = np.nonzero(row_lengths > self.local_sort_size)[0]
        self._long_lengths = row_lengths[self._long_rows]
        self._sort_buffers = None
        if self._long_rows.size:
            chunks = -(-self._long_lengths // self.local_sort_size)
            self._chunk_row = upload(np.repeat(self._long_rows, chunks).astype(np.int32))
            self._chunk_offset = upload(np.concatenate(
                [np.arange(k) * self.local_sort_size for k in chunks]).astype(np.int32))
            self._n_chunks = int(chunks.sum())
            self._merge_widths = []
            width = self.local_sort_size
            while width < self.max_row:
                self._merge_widths.append(width)
                width *= 2
        self._set_workgroup_size(wg)

    def _set_workgroup_size(self, wg: int) -> None:
        """Build options and the merge-block table (blocks of one work-group) for ``wg``."""
        self.workgroup_size = wg
        self._base_options = [f"-D WG={wg}", f"-D LSORT={self.local_sort_size}"]
        if self.fp64:
            self._base_options.append("-D USE_FP64")
        self._kernels: dict[str, dict[str, Any]] = {}
        if self._long_rows.size:
            blocks = -(-self._long_lengths // wg)
            self._block_row = self._upload_table(
                np.repeat(self._long_rows, blocks).astype(np.int32))
            self._block_offset = self._upload_table(np.concatenate(
                [np.arange(k) * wg for k in blocks]).astype(np.int32))
            self._n_blocks = int(blocks.sum())

    # ------------------------------------------------------------------ device plumbing
    def _kernels_for(self, raw_type: str) -> dict[str, Any]:
        """The kernels compiled for one raw dtype (built on first use, then cached).

        A device may run a kernel only with smaller work-groups than it advertises (register
        or local-memory pressure): then the work-group size is halved until every kernel fits.
        """
        cl = self._cl
        while self._kernels.get(raw_type) is None:
            program = _program(cl, self.context, [f"-D RAW_T={raw_type}"] + self._base_options)
            kernels = {name: cl.Kernel(program, name) for name in
                       ("integrate", "sigma_clip", "medfilt", "medfilt_chunk_sort",
                        "medfilt_merge")}
            fits = min(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                                  self._device) for kernel in kernels.values())
            if fits >= self.workgroup_size:
                self._kernels[raw_type] = kernels
            elif self.workgroup_size > 1:
                self._set_workgroup_size(self.workgroup_size // 2)
            else:
                raise AzfilterError(f"OpenCL device {self.device_info['name']} cannot run "
                                    "the azfilter kernels")
        return self._kernels[raw_type]

    def _prepare_frame(self, raw: Any) -> tuple[np.ndarray, str]:
        """The frame as a C-contiguous array of a dtype the kernels read, and that type."""
        frame = np.asarray(raw)
        if frame.size != self.npix:
            raise AzfilterError(f"image has {frame.size} pixels (shape {frame.shape}), the "
                                f"lookup table {self.npix}")
        dtype = frame.dtype
        if dtype == np.bool_:
            frame = frame.view(np.uint8)
        elif dtype.kind == "f" and dtype.itemsize < 4:
            frame = frame.astype(np.float32)
        elif dtype.kind in "iuf" and not dtype.isnative:
            frame = frame.astype(dtype.newbyteorder("="))
        if frame.dtype == np.float64 and not self.fp64:
            frame = frame.astype(np.float32)
        raw_type = RAW_TYPES.get(frame.dtype)
        if raw_type is None:
            raise AzfilterError(f"image dtype {dtype} is not supported by the OpenCL backend")
        return np.ascontiguousarray(frame).reshape(-1), raw_type

    def _variance_buffer(self, error_model: str, variance: np.ndarray | None):
        if error_model != "variance":
            return self._no_variance
        if variance is None:
            raise AzfilterError("error model 'variance' needs a variance array")
        if (variance is self._variance_host and self._variance_copy is not None
                and np.array_equal(self._variance_copy, np.ravel(variance))):
            return self._variance   # same array, same content: already on the device
        values = np.ascontiguousarray(variance, dtype=np.float32).ravel()
        if values.size != self.npix:
            raise AzfilterError(f"variance has {values.size} pixels, the image {self.npix}")
        cl = self._cl
        self._variance = cl.Buffer(self.context, cl.mem_flags.READ_ONLY
                                   | cl.mem_flags.COPY_HOST_PTR, hostbuf=values)
        self._variance_host = variance
        self._variance_copy = values.copy()
        return self._variance

    def _sort_scratch(self):
        """Two key buffers (indexed like the CSR entries) for the global-memory sort."""
        if self._sort_buffers is None:
            cl = self._cl
            nbytes = max(8, self.nnz * 8)
            self._sort_buffers = [cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes)
                                  for _ in range(2)]
        return self._sort_buffers

    def pinned_array(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """A new host array in page-locked memory, uploaded at full DMA speed.

        A reader that decodes frames straight into such arrays (e.g. h5py's
        ``Dataset.read_direct``) saves the host-side copy of every upload.

        Parameters
        ----------
        shape : int or tuple of int
        dtype : numpy dtype

        Returns
        -------
        numpy.ndarray
            Uninitialised, C-contiguous; valid while the engine lives.
        """
        cl = self._cl
        dtype = np.dtype(dtype)
        shape = (shape,) if np.isscalar(shape) else tuple(shape)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        buffer = cl.Buffer(self.context, cl.mem_flags.ALLOC_HOST_PTR | cl.mem_flags.READ_WRITE,
                           nbytes)
        array, _ = cl.enqueue_map_buffer(self._transfer_queue, buffer,
                                         cl.map_flags.READ | cl.map_flags.WRITE, 0, shape,
                                         dtype)
        self._pinned.append(buffer)
        return array

    def _upload(self, frame: np.ndarray, slot: int, wait: list | None):
        """Queue the copy of a frame into the raw buffer of ``slot``; return its event.

        Non-blocking: pyopencl keeps the frame alive until the copy is done.
        """
        event = self._cl.enqueue_copy(self._transfer_queue, self._raw[slot], frame,
                                      is_blocking=False, wait_for=wait)
        self._transfer_queue.flush()
        return event

    def _frame_args(self, slot: int, error_model: str, variance: np.ndarray | None) -> list:
        has_dummy = self.dummy is not None
        return [self._raw[slot], self._pixel_norm, self._dark,
                self._variance_buffer(error_model, variance),
                np.int32(self.has_dark),
                np.int32(_VAR_ARRAY if error_model == "variance" else _VAR_POISSON),
                np.int32(has_dummy), self._real(self.dummy if has_dummy else 0.0),
                self._real(self.delta_dummy)]

    def _submit(self, raw: Any, operation: str, params: dict, slot: int) -> _Pending:
        """Queue the upload of one frame, the kernels and the read-back; return at once."""
        cl = self._cl
        frame, raw_type = self._prepare_frame(raw)
        error_model = params["error_model"]
        if error_model not in ERROR_MODELS:
            raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                                f"{', '.join(ERROR_MODELS)}")
        kernels = self._kernels_for(raw_type)
        frame_args = self._frame_args(slot, error_model, params.get("variance"))
        wait = [self._slot_free[slot]] if self._slot_free[slot] is not None else None
        uploaded = self._upload(frame, slot, wait)
        wg = self.workgroup_size
        geometry = [self._indptr, self._indices, self._coefs]
        npt = np.int32(self.npt)
        out = self._sums[slot]
        queue = self._queue
        if operation == "integrate":
            kernel = kernels["integrate"]
            kernel.set_args(*geometry, *frame_args,
                            np.int32(error_model == "azimuthal"), npt, out)
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=[uploaded])
        elif operation == "sigma_clip":
            kernel = kernels["sigma_clip"]
            kernel.set_args(*geometry, *frame_args, self._real(params["thres"]),
                            np.int32(max(0, int(params["max_iter"]))),
                            np.int32(_CLIP_MODEL[error_model]), npt, self._flags, out)
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=[uploaded])
        elif operation == "medfilt":
            idx_bits = np.int32(self._idx_bits)
            sorted_keys = self._no_variance   # any buffer: unused when every row fits
            wait_for = [uploaded]
            if self._long_rows.size:
                keys, other = self._sort_scratch()
                chunk_sort = kernels["medfilt_chunk_sort"]
                chunk_sort.set_args(self._indptr, self._indices, *frame_args,
                                    self._chunk_row, self._chunk_offset, idx_bits, keys)
                cl.enqueue_nd_range_kernel(queue, chunk_sort, (self._n_chunks * wg,), (wg,),
                                           wait_for=wait_for)
                wait_for = None
                merge = kernels["medfilt_merge"]
                for width in self._merge_widths:
                    merge.set_args(self._indptr, self._block_row, self._block_offset,
                                   np.int32(width), keys, other)
                    cl.enqueue_nd_range_kernel(queue, merge, (self._n_blocks * wg,), (wg,))
                    keys, other = other, keys
                sorted_keys = keys
            kernel = kernels["medfilt"]
            kernel.set_args(*geometry, *frame_args, self._real(params["quant_min"]),
                            self._real(params["quant_max"]),
                            np.int32(error_model == "azimuthal"), idx_bits, sorted_keys,
                            self._flags, npt, out)
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=wait_for)
        else:
            raise AzfilterError(f"unknown operation {operation!r}; choose one of "
                                f"{', '.join(OPERATIONS)}")
        host = np.empty((_NSUMS, self.npt) if self.fp64 else (_NSUMS, self.npt, 2),
                        dtype=np.float64 if self.fp64 else np.float32)
        done = cl.enqueue_copy(queue, host, out, is_blocking=False)
        queue.flush()
        self._slot_free[slot] = done
        return _Pending(host, done)

    @staticmethod
    def _finish(pending: _Pending) -> BinSums:
        pending.done.wait()
        sums = pending.sums
        if sums.ndim == 3:   # compensated float32 pairs: value = hi + lo
            sums = sums[..., 0].astype(np.float64) + sums[..., 1].astype(np.float64)
        return BinSums(sums[0], sums[1], sums[2], sums[3], sums[4])

    # ------------------------------------------------------------------ operations
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """Per-bin sums S, V, W, W2, N of one frame (``docs/internals.md``, integrate)."""
        return self._finish(self._submit(raw, "integrate",
                                         dict(error_model=error_model, variance=variance), 0))

    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None) -> BinSums:
        """Iterative azimuthal sigma-clipping, all iterations in one kernel launch."""
        params = dict(thres=thres, max_iter=max_iter, error_model=error_model,
                      variance=variance)
        return self._finish(self._submit(raw, "sigma_clip", params, 0))

    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None) -> BinSums:
        """Average of the fragments between two weighted quantiles of each bin."""
        params = dict(quant_min=quant_min, quant_max=quant_max, error_model=error_model,
                      variance=variance)
        return self._finish(self._submit(raw, "medfilt", params, 0))

    def process_many(self, frames: Iterable[np.ndarray], operation: str,
                     **params: Any) -> Iterator[BinSums]:
        """Run one operation over a stream of frames, overlapping transfers and kernels.

        Frame n+1 is uploaded (on the transfer queue, into the second raw buffer) while the
        kernels of frame n run; its sums are read back without blocking. Results come out in
        input order, each as soon as it is ready.

        Parameters
        ----------
        frames : iterable of numpy.ndarray
            Raw frames (any supported dtype, which may change from frame to frame).
        operation : str
            ``"integrate"``, ``"sigma_clip"`` or ``"medfilt"``.
        **params
            The keyword arguments of that method besides ``raw``: ``error_model`` and
            ``variance`` always; ``thres`` and ``max_iter`` for sigma_clip; ``quant_min``
            and ``quant_max`` for medfilt.

        Yields
        ------
        BinSums
            One per frame, in order.
        """
        if operation not in OPERATIONS:
            raise AzfilterError(f"unknown operation {operation!r}; choose one of "
                                f"{', '.join(OPERATIONS)}")
        required = {"integrate": ("error_model",),
                    "sigma_clip": ("thres", "max_iter", "error_model"),
                    "medfilt": ("quant_min", "quant_max", "error_model")}[operation]
        missing = [name for name in required if name not in params]
        if missing:
            raise AzfilterError(f"{operation} needs {', '.join(missing)}")
        params.setdefault("variance", None)
        in_flight: deque[_Pending] = deque()
        try:
            for index, frame in enumerate(frames):
                in_flight.append(self._submit(frame, operation, params, index % 2))
                if len(in_flight) == 2:
                    yield self._finish(in_flight.popleft())
            while in_flight:
                yield self._finish(in_flight.popleft())
        finally:
            for pending in in_flight:   # abandoned generator: let the device finish
                pending.done.wait()
