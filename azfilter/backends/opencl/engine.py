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

Host to device transfers. A frame in page-locked memory (:func:`pinned_array`, e.g. decoded
there by a reader) goes to a discrete GPU by DMA, at PCIe speed. A frame in ordinary
(pageable) memory cannot: the driver first copies it into page-locked memory of its own, with
one thread. On discrete GPUs the engine does that copy itself instead ("staging"): a single
frame in pieces copied by several threads, the DMA of each piece queued as soon as it is
copied; in :meth:`OpenCLEngine.process_many`, whole frames copied ahead by several threads at
once while earlier frames are uploaded and reduced. Dtype conversions the kernels need (byte
order, ``bool``, ``float16``) happen in that same copy. The README's section "OpenCL backend
on a GPU" has the numbers.

``pyopencl`` is imported lazily: the rest of azfilter imports and runs without it.
:func:`list_devices` and :func:`opencl_status` serve ``azfilter devices``.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import AzfilterError
from ...frames.chunks import CompressedChunk
from ...vocabulary import ERROR_MODELS, METHODS
from ..base import DEFAULT_PICK, Engine, FrameBufferRing
from ..sums import BinSums, OutlierSums
from . import hostmem
from .bslz4 import BitshuffleLZ4Decoder, check_error_flag
from .hostmem import copy_piece, copy_pool, is_pinned
from .programs import KernelArgs, OpenCLProcessing

#: numpy dtype of a raw frame -> OpenCL C type the kernels read it as
RAW_TYPES: dict[np.dtype, str] = {
    np.dtype(np.uint8): "uchar", np.dtype(np.int8): "char",
    np.dtype(np.uint16): "ushort", np.dtype(np.int16): "short",
    np.dtype(np.uint32): "uint", np.dtype(np.int32): "int",
    np.dtype(np.uint64): "ulong", np.dtype(np.int64): "long",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}

#: operations the engine runs (the method names of the vocabulary)
OPERATIONS: tuple[str, ...] = METHODS

_NSUMS = 5                  # S, V, W, W2, N: rows of the output array (kernels' NSUMS)
_CLIP_MODEL = {"poisson": 0, "variance": 0, "azimuthal": 1, "hybrid": 2}
_VAR_POISSON, _VAR_ARRAY = 0, 1
_DEFAULT_GPU_WORKGROUP = 256
_DEFAULT_CPU_WORKGROUP = 64
#: frames a stream keeps in flight, each in a slot of its own (raw buffer, sums, flags,
#: command queue): on a GPU the kernels of several frames overlap, and a pause of the thread
#: feeding the engine (waiting for the GIL) leaves work queued
GPU_SLOTS = 4
CPU_SLOTS = 2
_MAX_LOCAL_SORT = 4096

# Staged uploads of one pageable frame (as integrate() does): sqrt(frame bytes /
# STAGING_UNIT_BYTES) copy threads, rounded to a power of two, at most ``threads``: on the H100
# host, 4 MB frames copied fastest with 2 threads, 18 MB with 4, 41 MB with 8 (waking a pool
# thread costs ~20 us, and the copy bandwidth stops growing at ~8 threads; see the README's
# GPU benchmark). Each thread copies STAGING_ROUNDS pieces one after the other, so
# that the DMA of the first pieces overlaps the copy of the later ones. Each piece has a
# page-locked allocation of its own.
STAGING_UNIT_BYTES = 1 << 20
STAGING_ROUNDS = 2
_MAX_PIECES = 64
_PIECE_ALIGN_BYTES = 4096
#: default number of threads copying a pageable frame into the staging buffer
DEFAULT_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))


# ------------------------------------------------------------------------------ the engine
_MIN_ALIGN = 128   # bytes between the regions of a results buffer, at least


def _results_layout(sizes: dict[str, int], align: int) -> dict[str, Any]:
    """Regions of ``sizes`` bytes laid out one after the other, each starting at a multiple
    of ``align`` bytes (a device's base address alignment, as sub-buffers need):
    ``{"regions": {name: (offset, size)}, "total": bytes}``."""
    regions, offset = {}, 0
    for name, size in sizes.items():
        regions[name] = (offset, size)
        offset += -(-size // align) * align
    return {"regions": regions, "total": offset}


@dataclass
class _Pending:
    """A frame submitted to the device whose sums are not read yet."""

    sums: np.ndarray    # host array the sums are copied into
    # Event of the one copy of the slot's results buffer (sums, statistics, error flag):
    # kept until the frame is finished, since pyopencl waits for a copy's completion when
    # its event is dropped, holding the GIL (H200, sigma-clip: 0.75 ms per frame of the
    # feeding thread, waiting for the kernels)
    done: Any
    # a frame decoded on the device: the decoder's error flag (host view, read with the
    # sums) and the chunk's number of blocks
    decode_error: tuple[np.ndarray, int] | None = None
    # sigma_clip / medfilt: (pick, counts host array, reals host array), read with the sums
    outliers: tuple[float, np.ndarray, np.ndarray] | None = None


class OpenCLEngine(OpenCLProcessing, Engine):
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
        Host threads that copy a frame from ordinary memory into the page-locked staging
        buffer (default: the number of cores, at most 8).
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
    staging : bool, optional
        Copy frames from ordinary memory through the engine's page-locked staging buffers
        (True) or hand them to the driver as they are (False). Default: True on GPUs that do
        not share the host's memory.

    Notes
    -----
    An engine is not thread-safe: use one per thread. The ``variance`` array of the
    ``"variance"`` error model is uploaded once and reused while the same array object (with
    the same content) is passed again.

    On a discrete GPU a frame in page-locked memory (:meth:`pinned_array`) goes to the device
    by DMA at PCIe speed (about 52 GB/s on the H100 host measured, 0.35 ms for an Eiger 4M
    uint32 frame). A frame in ordinary (pageable) memory must first be copied into page-locked
    memory; the driver does that with one thread (about 6-12 GB/s there), this engine with
    up to ``threads`` threads (16-30 GB/s there), overlapping the DMA (see the module's
    docstring and README.md (section "OpenCL backend on a GPU") for the measured rates).
    """

    name = "opencl"
    #: :meth:`process_many` takes :class:`~azfilter.frames.chunks.CompressedChunk` frames
    #: (bitshuffle-LZ4 chunks), decoded on the device into the raw-frame buffer
    decodes_chunks = True

    def __init__(self, csr, pixel_norm: np.ndarray, dark: np.ndarray | None,
                 dummy: float | None, delta_dummy: float, threads: int | None = None,
                 device: str | None = None, *, workgroup_size: int | None = None,
                 local_sort_size: int | None = None, fp64: bool | None = None,
                 staging: bool | None = None):
        OpenCLProcessing.__init__(self, device)
        cl = self._cl
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

        if threads is not None and (isinstance(threads, bool) or int(threads) < 1):
            raise AzfilterError(f"threads must be a positive integer, got {threads!r}")
        self.copy_threads = int(threads) if threads is not None else DEFAULT_COPY_THREADS
        try:
            shares_memory = bool(self._device.host_unified_memory)
        except cl.Error:   # deprecated query some drivers refuse
            shares_memory = False
        discrete = is_gpu and not shares_memory
        self.staging = discrete if staging is None else bool(staging)
        # per slot: (piece sizes in bytes, one page-locked array per piece)
        self.slots = GPU_SLOTS if is_gpu else CPU_SLOTS
        self._staging: list[tuple[tuple, list[np.ndarray]] | None] = [None] * self.slots
        # process_many's page-locked frame buffers (up to threads + 1 per dtype), reused
        self._stream_buffers: dict[str, list[np.ndarray]] = {}
        # device decoding of compressed chunks (built on the first chunk): the decoder, and
        # per slot the error flag of the chunk being decoded there
        self._bslz4 = None
        self._device_sizes: dict[str, int] = {}   # bytes of the _device_buffer()s
        self._chunk_errors: dict[int, tuple[np.ndarray, int]] = {}
        # per slot: page-locked host arrays the results are read back into (and the block
        # table is uploaded from), made on first use. A non-blocking copy between the device
        # and pageable memory is synchronous on NVIDIA's driver: reading the sums into
        # np.empty made the thread that feeds the engine wait for each frame's kernels
        # (H200, sigma-clip: 15 % of that thread's time in the read of the statistics).
        self._host_slots: list[dict[str, np.ndarray] | None] = [None] * self.slots

        # ---- geometry, once
        row_lengths = np.diff(indptr)
        self.max_row = int(row_lengths.max()) if row_lengths.size else 0
        self._idx_bits = max(1, (max(self.max_row, 1) - 1).bit_length())
        upload = self.upload

        try:
            self._indptr = upload(indptr.astype(np.int32))
            self._indices = upload(indices)
            self._coefs = upload(coefs)
            # a table without pixel splitting: the kernels need not read its coefficients
            self._unit_coefs = bool(np.all(coefs == 1.0))
            if dark is not None and np.size(dark) != self.npix:
                raise AzfilterError(f"dark has {np.size(dark)} pixels, the detector "
                                    f"{self.npix}")
            # pixel_norm and dark in table order (kernels/azf_common.cl): every kernel reads
            # them contiguously, bin by bin, instead of gathering them from the image
            self._entry_norm = upload(self.pixel_norm[indices])
            self.has_dark = dark is not None
            self._entry_dark = upload(
                np.ascontiguousarray(dark, dtype=np.float32).ravel()[indices]
                if dark is not None else np.zeros(1, np.float32))
            self._no_variance = upload(np.zeros(1, np.float32))
            self._variance = None           # device copy of the last variance array
            self._variance_host = None      # ... the array object it came from
            self._variance_copy = None      # ... and its content then
            # self.slots frames in flight (process_many): raw frame and sums per slot
            self._raw_bytes = max(8, self.npix * 8)   # room for any raw dtype up to 8 bytes
            sums_bytes = _NSUMS * self.npt * acc_bytes
            slots = range(self.slots)
            self._raw = [self.allocate(f"raw{slot}", self._raw_bytes, "r") for slot in slots]
            # Everything a frame's kernels leave for the host, in one buffer per slot read
            # back with one copy (each copy enqueued is tens of microseconds of the thread
            # that feeds the engine, holding the GIL): the decoder's error flag, the sums,
            # the outlier statistics' (available, picked) int32 and (rejected_sum, max_sigma)
            # accumulators; each region is a sub-buffer the kernels write.
            self._results_layout = _results_layout(
                {"error": 8, "sums": sums_bytes, "counts": 2 * 4 * self.npt,
                 "reals": 2 * acc_bytes * self.npt},
                max(_MIN_ALIGN, int(self._device.mem_base_addr_align) // 8))
            self._results = []
            self._regions: list[dict[str, Any]] = []
            for slot in slots:
                results = self.allocate(f"results{slot}", self._results_layout["total"], "rw")
                self._results.append(results)
                self._regions.append({
                    name: results.get_sub_region(offset, size)
                    for name, (offset, size) in self._results_layout["regions"].items()})
            # read back by outlier_stats too
            self._sums = [regions["sums"] for regions in self._regions]
            # event after which a slot is reusable
            self._slot_free: list[Any] = [None] * self.slots
            # ... and the queue it is of
            self._slot_queue: list[Any] = [None] * self.slots
            # per-entry "kept" flags, one array per slot: the kernels of several frames run
            # at once, each slot on its own in-order queue (sigma_clip on an H200: 0.70 ms
            # per frame on one queue, 0.52 ms on two, since a frame's longest bins no longer
            # leave the rest of the device idle)
            self._flags = [self.allocate(f"flags{slot}", self.nnz) for slot in slots]
            self._slot_queues = [self.queue] + [
                cl.CommandQueue(self.context, self._device, properties=self.queue.properties)
                for _ in range(1, self.slots)]
        except cl.MemoryError as err:
            raise AzfilterError(f"OpenCL device {self.device_info['name']} has not enough "
                                f"memory for this lookup table ({self.nnz} entries)") from err

        # ---- medfilt rows longer than the local sort: chunk table, merge widths
        self._long_rows = np.nonzero(row_lengths > self.local_sort_size)[0]
        self._long_lengths = row_lengths[self._long_rows]
        self._sort_buffers: dict[int, list] = {}
        # medfilt_merge kernel objects by (kernels, slot, step), with those kernels
        self._merge_kernels: dict[tuple[int, int, int], tuple[dict, Any]] = {}
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
        # kernels by (raw type, frame slot): each slot has its own kernel objects, whose
        # arguments are set again only when they change (set_args of the 16-22 arguments of
        # a reduction kernel took ~6 % of the feeding thread's time per kernel, per frame)
        self._kernels: dict[tuple[str, int], dict[str, Any]] = {}
        self._kernel_args = KernelArgs()
        if self._long_rows.size:
            blocks = -(-self._long_lengths // wg)
            self._block_row = self.upload(
                np.repeat(self._long_rows, blocks).astype(np.int32))
            self._block_offset = self.upload(np.concatenate(
                [np.arange(k) * wg for k in blocks]).astype(np.int32))
            self._n_blocks = int(blocks.sum())

    # ------------------------------------------------------------------ device plumbing
    def _kernels_for(self, raw_type: str, slot: int = 0) -> dict[str, Any]:
        """The kernels compiled for one raw dtype (built on first use, then cached), as
        objects of frame slot ``slot`` (set their arguments with :meth:`_set_args`).

        A device may run a kernel only with smaller work-groups than it advertises (register
        or local-memory pressure): then the work-group size is halved until every kernel fits.
        """
        key = (raw_type, slot)
        while self._kernels.get(key) is None:
            kernels = self.kernels([f"-D RAW_T={raw_type}"] + self._base_options,
                                   ("integrate", "sigma_clip", "medfilt", "medfilt_chunk_sort",
                                    "medfilt_merge", "outlier_stats"))
            if self.largest_workgroup(kernels) >= self.workgroup_size:
                self._kernels[key] = kernels
            elif self.workgroup_size > 1:
                self._set_workgroup_size(self.workgroup_size // 2)
            else:
                raise AzfilterError(f"OpenCL device {self.device_info['name']} cannot run "
                                    "the azfilter kernels")
        return self._kernels[key]

    def _set_args(self, kernel: Any, *args: Any) -> Any:
        """Set those of ``kernel``'s arguments that changed (:class:`KernelArgs`); returns
        the kernel."""
        return self._kernel_args.set(kernel, *args)

    def _device_dtype(self, dtype: np.dtype) -> np.dtype:
        """The dtype a frame of ``dtype`` goes to the device in (kernels read it as is)."""
        if dtype == np.bool_:
            target = np.dtype(np.uint8)
        elif dtype.kind == "f" and dtype.itemsize < 4:
            target = np.dtype(np.float32)
        elif dtype.kind in "iuf" and not dtype.isnative:
            target = dtype.newbyteorder("=")
        else:
            target = dtype
        if target == np.float64 and not self.fp64:
            target = np.dtype(np.float32)
        if target not in RAW_TYPES:
            raise AzfilterError(f"image dtype {dtype} is not supported by the OpenCL backend")
        return target

    def _prepare_frame(self, raw: Any) -> tuple[np.ndarray, np.dtype]:
        """The frame as an array (no copy) and the dtype it goes to the device in."""
        if isinstance(raw, CompressedChunk):
            return raw, self._chunk_dtype(raw)
        frame = np.asarray(raw)
        if frame.size != self.npix:
            raise AzfilterError(f"image has {frame.size} pixels (shape {frame.shape}), the "
                                f"lookup table {self.npix}")
        return frame, self._device_dtype(frame.dtype)

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

    @property
    def _sort_per_slot(self) -> bool:
        """Whether each frame slot has its own sort scratch for medfilt's long rows: when
        all of them take at most 1/8 of the device's memory. Then medfilt frames overlap on
        the slots' queues like the other operations' (on one queue the upload of a frame
        waited for the kernels of the one before); else they share one scratch and one
        queue."""
        return self.slots * 2 * max(8, self.nnz * 8) <= self.device_info["global_memory"] // 8

    def _sort_scratch(self, slot: int) -> list:
        """Two key buffers (indexed like the CSR entries) for the global-memory sort of the
        frame in ``slot`` (see :attr:`_sort_per_slot`)."""
        owner = slot if self._sort_per_slot else 0
        buffers = self._sort_buffers.get(owner)
        if buffers is None:
            cl = self._cl
            nbytes = max(8, self.nnz * 8)
            buffers = self._sort_buffers[owner] = [
                cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes) for _ in range(2)]
        return buffers

    def _merge_kernel(self, kernels: dict[str, Any], slot: int, step: int) -> Any:
        """A ``medfilt_merge`` kernel object for merge step ``step`` of ``slot``: each step
        keeps its own arguments (width, which buffer is read, which written), so none is set
        again from frame to frame."""
        key = (id(kernels), slot, step)
        entry = self._merge_kernels.get(key)
        if entry is None or entry[0] is not kernels:   # (kept with it: ids are not reused)
            entry = self._merge_kernels[key] = (kernels, self._cl.Kernel(
                kernels["medfilt_merge"].program, "medfilt_merge"))
        return entry[1]

    @staticmethod
    def host_array(shape: int | tuple[int, ...], dtype: Any,
                   device: str | None = None) -> np.ndarray:
        """A frame buffer that engines on ``device`` upload fastest: page-locked memory.

        What :meth:`azfilter.integrator.Integrator.frame_buffer` returns for this backend.
        """
        return hostmem.pinned_array(shape, dtype, device=device)

    def _pending_wait(self, event: Any) -> list | None:
        """``[event]`` unless it is None or complete: a wait for an event of another queue
        may block the enqueue itself on NVIDIA's driver."""
        complete = self._cl.command_execution_status.COMPLETE
        if event is None or event.command_execution_status == complete:
            return None
        return [event]

    def _slot_wait(self, slot: int, queue: Any) -> list | None:
        """What an upload into ``slot``'s raw buffer on ``queue`` must wait for: nothing when
        the slot's last frame ran on that in-order queue (it is before the upload already:
        no query of its event's status, a call into the driver), else its last event unless
        complete."""
        if self._slot_queue[slot] is queue:
            return None
        return self._pending_wait(self._slot_free[slot])

    def _upload(self, frame: np.ndarray, target: np.dtype, slot: int,
                queue: Any, host: dict[str, Any]) -> tuple[list, Any]:
        """Queue the copy of a frame into the raw buffer of ``slot`` (a compressed chunk is
        then decoded there on ``queue``, the kernel queue its reduction runs on).

        A frame in page-locked memory, or any frame when staging is off, is handed to the
        driver as it is (non-blocking); other frames are staged (:meth:`_staged_upload`).
        Returns the events of the copies, the last one completing last (they also keep the
        host memory they read alive: pyopencl's NannyEvent), and the queue they are on.
        """
        cl = self._cl
        if isinstance(frame, CompressedChunk):
            return self._upload_chunk(frame, slot, self._slot_wait(slot, queue), queue,
                                      host), queue
        direct = frame.dtype == target and frame.flags.c_contiguous
        if direct and (not self.staging or is_pinned(frame, self.context)):
            # on the kernel queue, as a compressed chunk (see _upload_chunk)
            events = [cl.enqueue_copy(queue, self._raw[slot], frame.reshape(-1),
                                      is_blocking=False,
                                      wait_for=self._slot_wait(slot, queue))]
            queue.flush()
            return events, queue
        elif not self.staging:
            converted = np.ascontiguousarray(frame, dtype=target).reshape(-1)
            events = [cl.enqueue_copy(self.transfer_queue, self._raw[slot], converted,
                                      is_blocking=False,
                                      wait_for=self._slot_wait(slot, self.transfer_queue))]
        else:
            events = self._staged_upload(frame, target, slot)
        self.transfer_queue.flush()
        return events, self.transfer_queue

    # ------------------------------------------------------------------ device decoding
    def _chunk_dtype(self, chunk: CompressedChunk) -> np.dtype:
        """The dtype a compressed frame is decoded to (its own: the kernels read it as is)."""
        dtype = np.dtype(chunk.dtype)
        if chunk.size != self.npix:
            raise AzfilterError(f"image has {chunk.size} pixels (shape {chunk.shape}), the "
                                f"lookup table {self.npix}")
        if dtype not in RAW_TYPES or not dtype.isnative or (dtype == np.float64
                                                            and not self.fp64):
            raise AzfilterError(f"compressed image dtype {dtype} cannot be decoded on "
                                f"OpenCL device {self.device_info['name']}")
        return dtype

    def _device_buffer(self, name: str, nbytes: int, access: str = "r") -> tuple[Any, int]:
        """The engine's device buffer ``name`` of at least ``nbytes`` (grown by 1/8 when too
        small; chunk sizes vary from frame to frame), and its size (kept here: asking the
        buffer is a call into the driver)."""
        buffer = self.buffers.get(name)
        size = self._device_sizes.get(name, 0)
        if buffer is None or size < nbytes:
            size = max(nbytes, nbytes + nbytes // 8, 4096)
            buffer = self.allocate(name, size, access)
            self._device_sizes[name] = size
        return buffer, size

    def _host_arrays(self, slot: int | None) -> dict[str, np.ndarray]:
        """The host arrays a frame's results are read back into (and its block table
        uploaded from): ``results`` (bytes, the copy of the slot's results buffer) and its
        views ``sums``, ``counts``, ``reals``, ``error`` (the decoder's flag), and ``ranges``.
        For a stream's frame slot, the slot's page-locked ones (made on first use); for
        ``None`` (one frame, :meth:`integrate`...), new ordinary arrays, since such a call
        may come while a stream's frame waits for its results."""
        arrays = None if slot is None else self._host_slots[slot]
        if arrays is None:
            real = np.float64 if self.fp64 else np.float32
            pair = () if self.fp64 else (2,)
            make = np.empty if slot is None else self.pinned_array
            results = make(self._results_layout["total"], np.uint8)

            def view(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
                offset, size = self._results_layout["regions"][name]
                return results[offset:offset + size].view(dtype).reshape(shape)
            arrays = {
                "results": results,
                "sums": view("sums", real, (_NSUMS, self.npt, *pair)),
                "counts": view("counts", np.int32, (2, self.npt)),
                "reals": view("reals", real, (2, self.npt, *pair)),
                "error": view("error", np.int32, (2,)),
                "ranges": make(2 * 1024, np.uint32),
                "make": make,
            }
            if slot is not None:
                self._host_slots[slot] = arrays
        return arrays

    @staticmethod
    def _host_ranges(host: dict[str, Any], ranges: np.ndarray) -> np.ndarray:
        """``ranges`` (a chunk's block table) copied into ``host``'s (page-locked) array."""
        flat = np.ascontiguousarray(ranges, dtype=np.uint32).reshape(-1)
        if host["ranges"].size < flat.size:
            host["ranges"] = host["make"](flat.size + flat.size // 4, np.uint32)
        target = host["ranges"][:flat.size]
        target[...] = flat
        return target

    def _upload_chunk(self, chunk: CompressedChunk, slot: int, wait: list | None,
                      queue: Any, host: dict[str, Any]) -> list:
        """Queue the upload of a compressed chunk and its block table (transfer queue), then
        its decode into the raw buffer of ``slot`` (kernel queue, after the uploads; the
        reduction queued next on that queue runs after it).

        Returns the events of the uploads (the chunk's host memory may be reused once they
        are complete). The decoder's error flag is read back with the sums (it is a region of
        the slot's results buffer); :meth:`_finish` checks it.
        """
        cl = self._cl
        if self._bslz4 is None:
            self._bslz4 = BitshuffleLZ4Decoder(self.context, self.queue)
        layout = chunk.layout
        if layout.n_elements != self.npix:
            raise AzfilterError(f"compressed image has {layout.n_elements} pixels, the lookup "
                                f"table {self.npix}")
        data = chunk.data
        chunk_buffer, chunk_capacity = self._device_buffer(f"chunk{slot}", data.nbytes)
        ranges = self._host_ranges(
            host, layout.block_ranges if layout.n_blocks else np.zeros((1, 2), np.uint32))
        ranges_buffer, _ = self._device_buffer(f"ranges{slot}", ranges.nbytes)
        error_buffer = self._regions[slot]["error"]
        # The uploads go on the slot's kernel queue, in order before the decode and the
        # reduction: the slots' queues already overlap one frame's upload with another's
        # kernels, and a kernel waiting for an event of another queue made NVIDIA's driver
        # block the enqueue (holding the GIL) until that event completed.
        events = [cl.enqueue_copy(queue, chunk_buffer, data, is_blocking=False, wait_for=wait),
                  cl.enqueue_copy(queue, ranges_buffer, ranges, is_blocking=False)]
        cl.enqueue_fill_buffer(queue, error_buffer, np.zeros(1, np.int32), 0, 8)
        # the buffer's size, not the chunk's, as the decoder's bound: the same value frame after
        # frame, so that no argument is set again; the host's walk of the block sizes
        # (bslz4_layout) already proved that every block and the tail lie inside the chunk
        self._bslz4.enqueue_kernel(queue, chunk_buffer, chunk_capacity, ranges_buffer,
                                   layout, chunk.dtype.itemsize, self._raw[slot], error_buffer)
        queue.flush()
        self._chunk_errors[slot] = (host["error"], layout.n_blocks)
        return events

    def _staging_pieces(self, slot: int, sizes: tuple[int, ...]) -> list[np.ndarray]:
        """The page-locked staging arrays (bytes) of ``slot``, one per piece of ``sizes``."""
        staged = self._staging[slot]
        if staged is None or staged[0] != sizes:
            self._staging[slot] = None   # free the old ones first
            staged = self._staging[slot] = (sizes, [self.pinned_array(size, np.uint8)
                                                    for size in sizes])
        return staged[1]

    def _pieces(self, frame: np.ndarray, itemsize: int) -> tuple[np.ndarray, int, int, list]:
        """How to stage a frame: (source as a flat or a row view, its columns, copy threads,
        [(start, stop) flat element ranges, in order])."""
        size = frame.size
        if frame.flags.c_contiguous or frame.ndim != 2:
            source = frame.reshape(-1)    # a view, except for a strided frame not 2-D (rare)
            columns, align = 1, max(1, _PIECE_ALIGN_BYTES // itemsize)
        else:   # a strided 2-D frame (a flipped or cropped view): pieces of whole rows
            source = frame
            columns = align = frame.shape[1]
        nbytes = size * itemsize
        octaves = round(math.log2(max(1.0, nbytes / STAGING_UNIT_BYTES)) / 2)
        threads = max(1, min(self.copy_threads, 1 << octaves))
        pieces = min(threads * max(1, STAGING_ROUNDS), _MAX_PIECES, max(1, size // align))
        step = -(-size // pieces)
        step = -(-step // align) * align
        bounds = [(start, min(size, start + step)) for start in range(0, size, step)]
        return source, columns, min(threads, len(bounds)), bounds

    def _staged_upload(self, frame: np.ndarray, target: np.dtype, slot: int) -> list:
        """Copy the frame into the slot's page-locked staging pieces with up to
        ``copy_threads`` threads (converting to ``target``), queueing the DMA of each piece
        as soon as it is copied. Returns the events of the DMAs, in order."""
        cl = self._cl
        itemsize = target.itemsize
        previous = self._slot_free[slot]
        if previous is not None:
            previous.wait()   # the slot's last upload (and the kernels after it) are done
        source, columns, threads, bounds = self._pieces(frame, itemsize)
        staging = [piece.view(target) for piece in self._staging_pieces(
            slot, tuple((stop - start) * itemsize for start, stop in bounds))]
        queue, device_buffer = self.transfer_queue, self._raw[slot]
        events = []

        def send(index: int) -> None:
            events.append(cl.enqueue_copy(queue, device_buffer, staging[index],
                                          dst_offset=bounds[index][0] * itemsize,
                                          is_blocking=False))
            queue.flush()   # start this piece's DMA now
        if threads == 1:   # this thread copies, piece after piece
            for index, (start, stop) in enumerate(bounds):
                copy_piece(source, staging[index], start, stop, columns)
                send(index)
            return events
        pool = copy_pool(threads)
        futures = [pool.submit(copy_piece, source, staging[index], start, stop, columns)
                   for index, (start, stop) in enumerate(bounds)]
        try:
            for index, future in enumerate(futures):
                future.result()
                send(index)
        finally:
            wait_futures(futures)   # never leave a thread writing into the staging buffers
        return events

    def _frame_args(self, slot: int, error_model: str, variance: np.ndarray | None) -> list:
        has_dummy = self.dummy is not None
        return [self._raw[slot], self._entry_norm, self._entry_dark,
                self._variance_buffer(error_model, variance),
                np.int32(self.has_dark),
                np.int32(_VAR_ARRAY if error_model == "variance" else _VAR_POISSON),
                np.int32(has_dummy), self._real(self.dummy if has_dummy else 0.0),
                self._real(self.delta_dummy), np.int32(self._unit_coefs)]

    def _submit(self, raw: Any, operation: str, params: dict, slot: int,
                stream: bool = True) -> _Pending:
        """Queue the upload of one frame, the kernels and the read-back; return once the
        frame is uploaded (the kernels and the read-back may still be running). A frame of a
        ``stream`` is read back into its slot's page-locked arrays, others into new ones."""
        cl = self._cl
        frame, target = self._prepare_frame(raw)
        raw_type = RAW_TYPES[target]
        error_model = params["error_model"]
        if error_model not in ERROR_MODELS:
            raise AzfilterError(f"unknown error model {error_model!r}; choose one of "
                                f"{', '.join(ERROR_MODELS)}")
        kernels = self._kernels_for(raw_type, slot)
        frame_args = self._frame_args(slot, error_model, params.get("variance"))
        pick = self._pick(params)
        # medfilt's long rows sharing one sort scratch: those frames stay on one queue
        queue = self._slot_queues[0 if (operation == "medfilt" and self._long_rows.size
                                        and not self._sort_per_slot) else slot]
        host = self._host_arrays(slot if stream else None)
        uploads, upload_queue = self._upload(frame, target, slot, queue, host)
        uploaded = uploads[-1]   # in-order queue: the last copy completes last
        # the kernels wait for an upload made on the transfer queue (staged frames); one on
        # their own queue is before them already
        kernel_wait = None if upload_queue is queue else [uploaded]
        wg = self.workgroup_size
        geometry = [self._indptr, self._indices, self._coefs]
        npt = np.int32(self.npt)
        out = self._sums[slot]
        flags = self._flags[slot]
        if operation == "integrate":
            kernel = kernels["integrate"]
            self._set_args(kernel, *geometry, *frame_args,
                           np.int32(error_model == "azimuthal"), npt, out)
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=kernel_wait)
        elif operation == "sigma_clip":   # with its outlier statistics, in one launch
            kernel = kernels["sigma_clip"]
            regions = self._regions[slot]
            # the frame's raw values in table order (the kernel's later passes read them),
            # one buffer per slot: frames on several slots run at once
            gathered, _ = self._device_buffer(f"gathered{slot}", self.nnz * target.itemsize,
                                              "rw")
            self._set_args(kernel, *geometry, *frame_args, self._real(params["thres"]),
                           np.int32(max(0, int(params["max_iter"]))),
                           np.int32(_CLIP_MODEL[error_model]), npt, flags, gathered, out,
                           self._real(pick), regions["counts"], regions["reals"])
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=kernel_wait)
        elif operation == "medfilt":
            idx_bits = np.int32(self._idx_bits)
            sorted_keys = self._no_variance   # any buffer: unused when every row fits
            wait_for = kernel_wait
            if self._long_rows.size:
                keys, other = self._sort_scratch(slot)
                chunk_sort = kernels["medfilt_chunk_sort"]
                self._set_args(chunk_sort, self._indptr, self._indices, *frame_args,
                               self._chunk_row, self._chunk_offset, idx_bits, keys)
                cl.enqueue_nd_range_kernel(queue, chunk_sort, (self._n_chunks * wg,), (wg,),
                                           wait_for=wait_for)
                wait_for = None
                for step, width in enumerate(self._merge_widths):
                    merge = self._merge_kernel(kernels, slot, step)
                    self._set_args(merge, self._indptr, self._block_row, self._block_offset,
                                   np.int32(width), keys, other)
                    cl.enqueue_nd_range_kernel(queue, merge, (self._n_blocks * wg,), (wg,))
                    keys, other = other, keys
                sorted_keys = keys
            kernel = kernels["medfilt"]
            self._set_args(kernel, *geometry, *frame_args, self._real(params["quant_min"]),
                            self._real(params["quant_max"]),
                            np.int32(error_model == "azimuthal"), idx_bits, sorted_keys,
                            flags, npt, out)
            cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,),
                                       wait_for=wait_for)
        else:
            raise AzfilterError(f"unknown operation {operation!r}; choose one of "
                                f"{', '.join(OPERATIONS)}")
        outliers = None
        if operation == "sigma_clip":
            outliers = (pick, host["counts"], host["reals"])
        elif operation != "integrate":
            outliers = self._submit_outlier_stats(kernels, frame_args, params, slot, queue,
                                                  host)
        # one copy of the slot's results buffer: the sums, the statistics, the error flag
        done = cl.enqueue_copy(queue, host["results"], self._results[slot], is_blocking=False)
        queue.flush()
        self._slot_free[slot], self._slot_queue[slot] = done, queue
        # The frame's memory is free for reuse once this returns: the caller (a reader's ring
        # of page-locked buffers) may overwrite it while the kernels run.
        self._wait(uploaded)
        decode_error = None
        if isinstance(frame, CompressedChunk):
            decode_error = self._chunk_errors.pop(slot)
        return _Pending(host["sums"], done, decode_error, outliers)

    def _submit_outlier_stats(self, kernels: dict[str, Any], frame_args: list, params: dict,
                              slot: int, queue: Any, host: dict[str, Any],
                              ) -> tuple[float, np.ndarray, np.ndarray]:
        """Queue the outlier statistics of the operation just queued (its flags and sums),
        into the slot's results buffer; returns (pick, host views they are read into)."""
        cl = self._cl
        pick = self._pick(params)
        kernel = kernels["outlier_stats"]
        self._set_args(kernel, self._indptr, self._indices, self._coefs, *frame_args,
                       self._flags[slot], self._sums[slot], self._real(pick),
                       np.int32(self.npt), self._regions[slot]["counts"],
                       self._regions[slot]["reals"])
        wg = self.workgroup_size
        cl.enqueue_nd_range_kernel(queue, kernel, (self.npt * wg,), (wg,))
        return pick, host["counts"], host["reals"]

    def _wait(self, event: Any) -> None:
        """Wait for ``event`` unless it is complete: a wait lets go of the GIL, and taking it
        back costs this thread (the one feeding the engine) a hand-over from the reader and
        writer threads, up to the interpreter's switch interval; asking the status does not
        let it go."""
        if event.command_execution_status != self._cl.command_execution_status.COMPLETE:
            event.wait()

    @staticmethod
    def _pick(params: dict) -> float:
        """The outlier statistics' ``pick`` of an operation's parameters."""
        return float(params.get("pick", DEFAULT_PICK))

    def _finish(self, pending: _Pending) -> BinSums:
        """The sums of a submitted frame, once read back: new arrays (the slot's page-locked
        ones take the next frame's)."""
        self._wait(pending.done)
        if pending.decode_error is not None:   # a corrupt chunk: the sums are meaningless
            check_error_flag(*pending.decode_error)
        sums = pending.sums
        if sums.ndim == 3:   # compensated float32 pairs: value = hi + lo
            sums = sums[..., 0].astype(np.float64) + sums[..., 1].astype(np.float64)
        else:
            sums = sums.copy()
        outliers = None
        if pending.outliers is not None:   # read back with the sums (one copy)
            pick, counts, reals = pending.outliers
            counts = counts.copy()
            if reals.ndim == 3:
                reals = reals[..., 0].astype(np.float64) + reals[..., 1].astype(np.float64)
            else:
                reals = reals.copy()
            outliers = OutlierSums(pick, counts[0], counts[1], reals[0], reals[1])
        return BinSums(sums[0], sums[1], sums[2], sums[3], sums[4], outliers)

    # ------------------------------------------------------------------ operations
    def integrate(self, raw: np.ndarray, error_model: str,
                  variance: np.ndarray | None = None) -> BinSums:
        """Per-bin sums S, V, W, W2, N of one frame (``docs/internals.md``, integrate)."""
        return self._finish(self._submit(raw, "integrate",
                                         dict(error_model=error_model, variance=variance), 0,
                                         stream=False))

    def sigma_clip(self, raw: np.ndarray, thres: float, max_iter: int, error_model: str,
                   variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Iterative azimuthal sigma-clipping, all iterations in one kernel launch."""
        params = dict(thres=thres, max_iter=max_iter, error_model=error_model,
                      variance=variance, pick=pick)
        return self._finish(self._submit(raw, "sigma_clip", params, 0, stream=False))

    def medfilt(self, raw: np.ndarray, quant_min: float, quant_max: float, error_model: str,
                variance: np.ndarray | None = None, pick: float = DEFAULT_PICK) -> BinSums:
        """Average of the fragments between two weighted quantiles of each bin."""
        params = dict(quant_min=quant_min, quant_max=quant_max, error_model=error_model,
                      variance=variance, pick=pick)
        return self._finish(self._submit(raw, "medfilt", params, 0, stream=False))

    def host_buffers(self, capacity: int) -> FrameBufferRing:
        """A bounded ring of ``capacity`` page-locked frame buffers of this engine's device.

        Frames read into them go to the device by DMA with no staging copy.
        """
        return FrameBufferRing(capacity, self.pinned_array)

    def _stream(self, frames: Iterable[tuple[Any, np.ndarray]], operation: str,
                params: dict[str, Any]) -> Iterator[tuple[Any, BinSums | Exception]]:
        """:meth:`process_many` overlapping transfers and kernels.

        Up to :attr:`slots` frames are in flight, each in a slot of its own (raw buffer,
        sums, command queue): frame n+1 is uploaded while the kernels of frame n run, and the
        kernels of several frames overlap; sums are read back without blocking. Results come out in
        input order, each as soon as it is ready; a frame that fails (wrong size, unsupported
        dtype, a device error) gives its exception in its place.

        Frames in page-locked memory (:meth:`pinned_array`, :meth:`host_buffers`) go to the
        device by DMA; their memory may be reused as soon as the next frame is asked for (a
        reader can cycle a small ring of such buffers). Other frames, when the engine stages
        (discrete GPUs), are read up to ``threads`` frames ahead and each copied whole into a
        page-locked buffer by one of ``threads`` threads, several frames at once: their memory
        must stay unchanged until their result is yielded (the engine keeps those
        ``threads + 1`` page-locked frame buffers per dtype for its next streams).
        """
        # submitted, not read back: (tag, pending sums or the frame's error)
        in_flight: deque[tuple[Any, _Pending | Exception]] = deque()
        # frames waiting for submission: (tag, copy into a page-locked buffer or None,
        # frame to submit or the frame's error, that buffer or None)
        copying: deque[tuple[Any, Any, np.ndarray | Exception, np.ndarray | None]] = deque()
        spare = self._stream_buffers    # page-locked frame buffers, by dtype, kept for reuse
        submitted = 0
        ahead = 0

        def submit_oldest() -> None:
            nonlocal submitted
            tag, copy, frame, buffer = copying.popleft()
            pending: _Pending | Exception
            if isinstance(frame, Exception):
                pending = frame
            else:
                try:
                    if copy is not None:
                        copy.result()
                    pending = self._submit(frame, operation, params, submitted % self.slots)
                    submitted += 1
                except Exception as err:  # noqa: BLE001 - one bad frame must not end the stream
                    pending = err
            if buffer is not None:   # uploaded (or failed): the buffer is free again
                spare[buffer.dtype.str].append(buffer)
            in_flight.append((tag, pending))

        def finish_oldest() -> tuple[Any, BinSums | Exception]:
            tag, pending = in_flight.popleft()
            if isinstance(pending, Exception):
                return tag, pending
            try:
                return tag, self._finish(pending)
            except Exception as err:  # noqa: BLE001
                return tag, err

        try:
            for tag, raw in frames:
                try:
                    frame, target = self._prepare_frame(raw)
                except Exception as err:  # noqa: BLE001
                    copying.append((tag, None, err, None))
                else:
                    if self.staging and not isinstance(frame, CompressedChunk) and not (
                            frame.dtype == target and frame.flags.c_contiguous
                            and is_pinned(frame, self.context)):
                        buffers = spare.setdefault(target.str, [])
                        buffer = (buffers.pop() if buffers
                                  else self.pinned_array(self.npix, target))
                        source, columns = ((frame, frame.shape[1]) if frame.ndim == 2
                                           and not frame.flags.c_contiguous
                                           else (frame.reshape(-1), 1))
                        copy = copy_pool(self.copy_threads).submit(
                            copy_piece, source, buffer, 0, frame.size, columns)
                        copying.append((tag, copy, buffer, buffer))
                        ahead = self.copy_threads
                    else:   # uploaded before the next frame is asked for (a reader's ring)
                        copying.append((tag, None, frame, None))
                        ahead = 0
                while len(copying) > ahead:
                    submit_oldest()
                    if len(in_flight) == self.slots:
                        yield finish_oldest()
            while copying or in_flight:
                if copying:
                    submit_oldest()
                if len(in_flight) == self.slots or not copying:
                    yield finish_oldest()
        finally:
            # abandoned generator: let the copying threads and the device finish
            wait_futures([copy for _, copy, _, _ in copying if copy is not None])
            for _, _, _, buffer in copying:
                if buffer is not None:
                    spare[buffer.dtype.str].append(buffer)
            for _, pending in in_flight:
                if not isinstance(pending, Exception):
                    pending.done.wait()
