"""Bitshuffle-LZ4 (HDF5 filter 32008) decoding on an OpenCL device.

An Eiger frame compressed with bitshuffle-LZ4 is about 5x smaller than the frame: sending the
compressed chunk to the device and decoding it there saves most of the PCIe transfer, and the
decoded frame stays on the device, where the OpenCL engine reduces it in place.

The host reads the chunk's 12-byte header and walks the chain of 4-byte block sizes
(:func:`parse_chunk`, the compiled walk of :func:`azfilter.frames.chunks.bslz4_layout`, outside
the GIL; a reader thread that found the blocks already hands them in as ``layout=``);
the kernel ``bslz4_decode``
(``kernels/azf_bslz4.cl``) decodes one block per work-group: LZ4 into local memory, then the
bit-unshuffle into the output buffer, one typed store per element. The kernel checks every
read and write against the block's bounds: a corrupt chunk raises
:class:`BitshuffleLZ4Error` with a one-line reason, never a crash or a hang.

``pyopencl`` is imported lazily, as in :mod:`azfilter.backends.opencl`.
"""

from __future__ import annotations

import importlib.resources
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AzfilterError
from ...frames.chunks import ChunkError, ChunkLayout, bslz4_error_message, bslz4_layout
from .programs import KernelArgs

#: the kernel file (installed next to the other kernels)
KERNEL_FILE = "azf_bslz4.cl"
#: element sizes the kernel decodes (every numeric numpy dtype)
ELEMENT_SIZES = (1, 2, 4, 8)

_DEFAULT_WORKGROUP = 64
_SEQUENCES_PER_BATCH = 128
# local memory the kernel needs besides the block: the sequence batch (5 uint + 1 uchar per
# sequence) and a little for the compiler
_LOCAL_OVERHEAD = _SEQUENCES_PER_BATCH * 21 + 256
# largest block decoded in local memory (bigger ones use a global scratch buffer)
_MAX_LOCAL_BLOCK = 32768

# compiled programs, by (context, build options)
_PROGRAMS: dict[tuple[int, str], Any] = {}
_PROGRAMS_LOCK = threading.Lock()

class BitshuffleLZ4Error(AzfilterError):
    """A bitshuffle-LZ4 chunk that cannot be decoded; ``str(err)`` is one line."""


def parse_chunk(chunk: bytes | np.ndarray, n_elements: int, itemsize: int) -> ChunkLayout:
    """:func:`azfilter.frames.chunks.bslz4_layout` (the compiled walk that the host decoder
    uses too) for a chunk as ``Dataset.id.read_direct_chunk`` gives it (bytes or array),
    raising :class:`BitshuffleLZ4Error` where that raises ``ChunkError``."""
    try:
        return bslz4_layout(_as_bytes(chunk), n_elements, itemsize)
    except ChunkError as err:
        raise BitshuffleLZ4Error(str(err)) from None


def _as_bytes(chunk: bytes | bytearray | memoryview | np.ndarray) -> bytes | np.ndarray:
    """The chunk as a contiguous byte sequence (no copy for bytes and contiguous arrays)."""
    if isinstance(chunk, np.ndarray):
        return np.ascontiguousarray(chunk).view(np.uint8).reshape(-1)
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return chunk
    raise TypeError(f"chunk must be bytes or a numpy array, not {type(chunk).__name__}")


def kernel_source() -> str:
    """The decoder's OpenCL C source (installed copy, else the repository's kernels/)."""
    resource = importlib.resources.files("azfilter") / "kernels" / KERNEL_FILE
    if resource.is_file():
        return resource.read_text(encoding="utf-8")
    # editable install / source tree: the repository's kernels/, above this module
    for parent in Path(__file__).resolve().parents:
        path = parent / "kernels" / KERNEL_FILE
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise AzfilterError(f"OpenCL kernel {KERNEL_FILE} not found in the azfilter package nor "
                        "in a kernels/ directory above it; reinstall azfilter")


@dataclass
class DecodeJob:
    """A decode enqueued on the device; :meth:`check` waits for it and raises on error.

    Attributes
    ----------
    buffer : pyopencl.Buffer
        The decoded elements (valid once the queue has run the kernel and :meth:`check`
        passed).
    event : pyopencl.Event
        Completion of the error flag's read back.
    """

    buffer: Any
    event: Any
    _error: np.ndarray
    _n_blocks: int

    def check(self) -> Any:
        """Wait for the decode; return the buffer or raise :class:`BitshuffleLZ4Error`."""
        self.event.wait()
        check_error_flag(self._error, self._n_blocks)
        return self.buffer


def check_error_flag(error: np.ndarray, n_blocks: int) -> None:
    """Raise :class:`BitshuffleLZ4Error` when the kernel's error flag (read back into the
    two ``int32`` of ``error``: code, block) reports a corrupt chunk of ``n_blocks`` blocks."""
    code, block = int(error[0]), int(error[1])
    if code:
        raise BitshuffleLZ4Error(bslz4_error_message(code, block, n_blocks))


class BitshuffleLZ4Decoder:
    """Decode bitshuffle-LZ4 chunks into device buffers.

    Parameters
    ----------
    context : pyopencl.Context
    queue : pyopencl.CommandQueue
        In-order queue the uploads and kernels go to; enqueue the reduction of the decoded
        buffer on the same queue and it runs after the decode.
    workgroup_size : int, optional
        Work-items per block (a power of two; default 64).
    max_local_block : int, optional
        Largest block (bytes) decoded in local memory; larger ones go through a global
        scratch buffer. Default: what the device's local memory holds, at most 32 KiB
        (Eiger's blocks are 8 KiB); 0 forces the global path.

    Notes
    -----
    Not thread-safe (it reuses its chunk buffer): one decoder per thread. Elements are
    decoded in the device's byte order, which must be little-endian like the data.
    """

    def __init__(self, context: Any, queue: Any, *, workgroup_size: int | None = None,
                 max_local_block: int | None = None):
        import pyopencl as cl

        self._cl = cl
        self.context = context
        self.queue = queue
        self.device = queue.device
        if not self.device.endian_little:
            raise AzfilterError(f"OpenCL device {self.device.name.strip()} is big-endian: "
                                "the bitshuffle-LZ4 decoder needs a little-endian device")
        wg = int(workgroup_size or _DEFAULT_WORKGROUP)
        wg = min(wg, int(self.device.max_work_group_size))
        if wg < 1 or wg & (wg - 1):
            raise ValueError(f"workgroup_size must be a power of two, not {wg}")
        self.workgroup_size = wg
        self._local_capacity = min(_MAX_LOCAL_BLOCK,
                                   int(self.device.local_mem_size) - _LOCAL_OVERHEAD)
        if max_local_block is not None:
            self._local_capacity = min(self._local_capacity, int(max_local_block))
        self._kernels: dict[tuple[int, int, int | None], Any] = {}
        self._chunk_buffer = None
        self._chunk_capacity = 0
        # global scratch for blocks too large for local memory, one per queue: kernels of
        # two queues (an engine's two frame slots) may run at the same time
        self._scratch: dict[int, Any] = {}
        self._args = KernelArgs()
        # a placeholder for the scratch argument of the local-memory kernel
        self._no_scratch = cl.Buffer(context, cl.mem_flags.READ_WRITE, 64)

    # ------------------------------------------------------------------------- programs
    def _kernel(self, itemsize: int, local_block: int, queue: Any = None) -> Any:
        """The kernel for elements of ``itemsize`` bytes; ``local_block`` 0: global scratch.

        One kernel object per command ``queue`` (an engine's frame slot): its arguments stay
        set between launches, and only those that change are set again (:class:`KernelArgs`).
        """
        key = (itemsize, local_block, None if queue is None else queue.int_ptr)
        kernel = self._kernels.get(key)
        if kernel is None:
            options = [f"-DELEM_SIZE={itemsize}", f"-DWG={self.workgroup_size}",
                       f"-DNSEQ={_SEQUENCES_PER_BATCH}",
                       f"-DBLOCK_IN_LOCAL={1 if local_block else 0}",
                       f"-DLBLOCK={max(local_block, 8)}"]
            program_key = (int(self.context.int_ptr), " ".join(options))
            with _PROGRAMS_LOCK:   # compiled once per context and options (engines share it)
                program = _PROGRAMS.get(program_key)
                if program is None:
                    try:
                        program = self._cl.Program(self.context, kernel_source()).build(
                            options=options)
                    except self._cl.RuntimeError as err:   # a compiler error is our bug
                        raise RuntimeError(f"OpenCL build of {KERNEL_FILE} failed with "
                                           f"options {options}:\n{err}") from err
                    _PROGRAMS[program_key] = program
            kernel = self._kernels[key] = self._cl.Kernel(program, "bslz4_decode")
        return kernel

    def _local_block(self, block_bytes: int) -> int:
        """Local-memory capacity for blocks of ``block_bytes`` (0: they do not fit)."""
        capacity = 1 << max(10, math.ceil(math.log2(block_bytes)))
        return capacity if capacity <= self._local_capacity else 0

    # ------------------------------------------------------------------------- decoding
    def decode_async(self, chunk: bytes | np.ndarray, shape: int | tuple[int, ...],
                     dtype: Any, out: Any = None, layout: ChunkLayout | None = None
                     ) -> DecodeJob:
        """Enqueue the upload and decode of one chunk; nothing waits.

        Parameters
        ----------
        chunk : bytes or numpy.ndarray
            The compressed chunk, header included. It must not change until the job is done.
        shape : int or tuple of int
            Shape of the decoded frame.
        dtype : numpy dtype
            Element type (1, 2, 4 or 8 bytes, native byte order).
        out : pyopencl.Buffer, optional
            Where to decode (at least ``prod(shape) * itemsize`` bytes); a new buffer if None.
        layout : ChunkLayout, optional
            The chunk's blocks, when the caller found them already (e.g. with compiled code,
            outside the GIL); default: :func:`parse_chunk`.

        Returns
        -------
        DecodeJob
            Its ``check()`` waits and raises :class:`BitshuffleLZ4Error` for a corrupt chunk.

        Raises
        ------
        BitshuffleLZ4Error
            When the chunk's header or block chain is wrong (found on the host).
        """
        cl = self._cl
        dtype = np.dtype(dtype)
        if dtype.itemsize not in ELEMENT_SIZES or not dtype.isnative:
            raise AzfilterError(f"bitshuffle-LZ4 decoding on the device supports dtypes of "
                                f"{ELEMENT_SIZES} bytes in native byte order, not {dtype}")
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(n) for n in shape)
        n_elements = math.prod(shape)
        nbytes = n_elements * dtype.itemsize
        data = _as_bytes(chunk)
        if layout is None:
            layout = parse_chunk(data, n_elements, dtype.itemsize)
        elif layout.n_elements != n_elements:
            raise ValueError(f"layout is for {layout.n_elements} elements, the frame has "
                             f"{n_elements}")
        if out is None:
            out = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, max(nbytes, 1))
        elif out.size < nbytes:
            raise ValueError(f"output buffer of {out.size} bytes is smaller than the frame's "
                             f"{nbytes}")
        chunk_bytes = len(data) if not isinstance(data, np.ndarray) else data.nbytes
        chunk_buffer = self._upload_buffer(chunk_bytes)
        cl.enqueue_copy(self.queue, chunk_buffer, data, is_blocking=False)
        ranges = layout.block_ranges if layout.n_blocks else np.zeros((1, 2), np.uint32)
        ranges_buffer = cl.Buffer(self.context, cl.mem_flags.READ_ONLY, ranges.nbytes)
        cl.enqueue_copy(self.queue, ranges_buffer, ranges, is_blocking=False)
        error = np.zeros(2, dtype=np.int32)
        error_buffer = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, error.nbytes)
        cl.enqueue_copy(self.queue, error_buffer, error, is_blocking=False)

        self.enqueue_kernel(self.queue, chunk_buffer, chunk_bytes, ranges_buffer, layout,
                            dtype.itemsize, out, error_buffer)
        event = cl.enqueue_copy(self.queue, error, error_buffer, is_blocking=False)
        return DecodeJob(out, event, error, layout.n_blocks)

    def enqueue_kernel(self, queue: Any, chunk_buffer: Any, chunk_bytes: int, ranges_buffer: Any,
                       layout: ChunkLayout, itemsize: int, out: Any, error_buffer: Any,
                       wait_for: list | None = None) -> Any:
        """Enqueue the decode kernel alone, on buffers the caller owns (an engine's).

        Parameters
        ----------
        queue : pyopencl.CommandQueue
            In-order queue of this decoder's context (the kernels after it on the same queue
            see the decoded frame).
        chunk_buffer : pyopencl.Buffer
            The chunk's bytes (``chunk_bytes`` of them), uploaded.
        chunk_bytes : int
        ranges_buffer : pyopencl.Buffer
            ``layout.block_ranges`` (uint32 pairs), uploaded (at least 8 bytes).
        layout : ChunkLayout
        itemsize : int
            Bytes per element (1, 2, 4 or 8).
        out : pyopencl.Buffer
            Where the frame is decoded (at least ``layout.n_elements * itemsize`` bytes).
        error_buffer : pyopencl.Buffer
            Two ``int32`` set to 0 beforehand; the kernel writes (code, block) of the first
            error (read back and checked with :func:`check_error_flag`).
        wait_for : list of pyopencl.Event, optional

        Returns
        -------
        pyopencl.Event
            The kernel's.
        """
        block_bytes = layout.block_elements * itemsize
        local_block = self._local_block(block_bytes)
        scratch = self._no_scratch
        if not local_block and layout.n_blocks:
            scratch = self._scratch_buffer(layout.n_blocks * block_bytes, queue)
        kernel = self._args.set(
            self._kernel(itemsize, local_block, queue), chunk_buffer, np.uint32(chunk_bytes),
            ranges_buffer, np.uint32(layout.n_blocks), np.uint32(layout.block_elements),
            np.uint32(layout.blocked_elements),
            # without a tail (frames of a multiple of 8 elements, e.g. an Eiger's), its offset,
            # which moves with the compressed size, is not read: 0, so it stays set
            np.uint32(layout.tail_offset if layout.tail_elements else 0),
            np.uint32(layout.tail_elements), out, scratch, error_buffer)
        groups = max(layout.n_blocks, 1)
        return self._cl.enqueue_nd_range_kernel(queue, kernel, (groups * self.workgroup_size,),
                                                (self.workgroup_size,), wait_for=wait_for)

    def decode(self, chunk: bytes | np.ndarray, shape: int | tuple[int, ...], dtype: Any,
               out: Any = None, layout: ChunkLayout | None = None) -> Any:
        """Decode one chunk into a device buffer, checking the decoder's error flag.

        The only host synchronisation is the read back of the error flag (8 bytes, after the
        kernel); use :meth:`decode_async` to defer it.

        Parameters
        ----------
        chunk, shape, dtype, out, layout
            As for :meth:`decode_async`.

        Returns
        -------
        pyopencl.Buffer
            ``out`` (or a new buffer) holding ``prod(shape)`` elements of ``dtype``.

        Raises
        ------
        BitshuffleLZ4Error
            For a corrupt chunk (one line saying which block and what is wrong).
        """
        return self.decode_async(chunk, shape, dtype, out, layout).check()

    def decode_to_host(self, chunk: bytes | np.ndarray, shape: int | tuple[int, ...],
                       dtype: Any) -> np.ndarray:
        """Decode one chunk on the device and return it as a host array (for tests).

        Parameters
        ----------
        chunk, shape, dtype
            As for :meth:`decode_async`.

        Returns
        -------
        numpy.ndarray
            The decoded frame, of ``shape`` and ``dtype``.
        """
        dtype = np.dtype(dtype)
        frame = np.empty(shape, dtype=dtype)
        buffer = self.decode(chunk, frame.shape, dtype)
        if frame.size:
            self._cl.enqueue_copy(self.queue, frame, buffer, is_blocking=True)
        return frame

    # ------------------------------------------------------------------------- buffers
    def _upload_buffer(self, nbytes: int) -> Any:
        """The device buffer chunks are uploaded into, grown to ``nbytes`` when needed.

        A new upload into it is queued after the previous kernel (in-order queue), so reusing
        it is safe.
        """
        if nbytes > self._chunk_capacity:
            capacity = max(nbytes, self._chunk_capacity * 5 // 4, 4096)
            self._chunk_buffer = self._cl.Buffer(self.context, self._cl.mem_flags.READ_ONLY,
                                                 capacity)
            self._chunk_capacity = capacity
        return self._chunk_buffer

    def _scratch_buffer(self, nbytes: int, queue: Any) -> Any:
        """Global memory for blocks too large for local memory, for kernels on ``queue``
        (in order: one kernel at a time uses it)."""
        key = int(queue.int_ptr)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.size < nbytes:
            scratch = self._scratch[key] = self._cl.Buffer(
                self.context, self._cl.mem_flags.READ_WRITE, nbytes)
        return scratch
