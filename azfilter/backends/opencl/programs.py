"""OpenCL programs and the processing base class that owns a device's resources.

:class:`OpenCLProcessing` holds what every OpenCL computation needs: the device, its (shared)
context, two in-order command queues (kernels, transfers), the device buffers it allocated and
the programs it compiled. :class:`~.engine.OpenCLEngine` builds on it. Programs are compiled
once per context and build options and shared by every instance of the process (compiling
costs seconds).

The kernel sources are the ``kernels/azf_*.cl`` files of the repository, installed into the
package as ``azfilter/kernels/`` by the build; an editable install reads them from the
repository.
"""

from __future__ import annotations

import importlib.resources
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import AzfilterError
from .devices import device_context, import_pyopencl, select_device
from .hostmem import pinned_in_context

#: OpenCL sources, concatenated in this order into one program
KERNEL_FILES: tuple[str, ...] = (
    "azf_common.cl", "azf_integrate.cl", "azf_stats.cl", "azf_sigma_clip.cl",
    "azf_medfilt.cl",
)

_REPO_KERNELS = Path(__file__).resolve().parents[3] / "kernels"
_PROGRAMS: dict[tuple[int, str], Any] = {}
_SOURCE: str | None = None
_LOCK = threading.Lock()


def kernel_source() -> str:
    """The OpenCL C source of every kernel (installed copy, else the repository's kernels/).

    Raises
    ------
    AzfilterError
        When a kernel file is in neither place (a broken installation).
    """
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


def build_program(cl, context, options: list[str]) -> Any:
    """The program of every kernel for ``context`` and build ``options`` (built once)."""
    key = (context.int_ptr, " ".join(options))
    with _LOCK:
        program = _PROGRAMS.get(key)
        if program is None:
            try:
                with warnings.catch_warnings():
                    # some drivers always log something (NVIDIA: "overriding noinline")
                    warnings.simplefilter("ignore", cl.CompilerWarning)
                    program = cl.Program(context, kernel_source()).build(options=options)
            except cl.RuntimeError as err:   # a compiler error is our bug: show the log
                raise RuntimeError(f"OpenCL build failed with options {options}:\n{err}") \
                    from err
            _PROGRAMS[key] = program
        return program


class KernelArgs:
    """The arguments last set on kernel objects: :meth:`set` sets only those that changed.

    pyopencl's ``kernel(queue, ...)`` sets every argument at every launch, holding the GIL
    (H200, 1000 Eiger 4M frames: the decoder's 11 arguments were a quarter of the time of the
    thread that feeds the engine). A kernel object keeps its arguments between launches, so
    one object per command queue (frame slot) and per kernel, with only what changed set
    again, is enough.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple] = {}

    @staticmethod
    def _same(old: Any, new: Any) -> bool:
        """The same buffer, or a numpy scalar of the same type and value."""
        return old is new or (type(old) is type(new) and isinstance(new, np.generic)
                              and old == new)

    def set(self, kernel: Any, *args: Any) -> Any:
        """Give ``kernel`` the arguments ``args`` (a full list); returns the kernel."""
        last = self._last.pop(id(kernel), None)   # unknown until all are set
        if last is None or len(last) != len(args):
            kernel.set_args(*args)
        else:
            for index, (old, new) in enumerate(zip(last, args, strict=True)):
                if not self._same(old, new):
                    kernel.set_arg(index, new)
        # the kernels live as long as their owner: their ids are not reused meanwhile
        self._last[id(kernel)] = args
        return kernel


class OpenCLProcessing:
    """One device's context, command queues, device buffers and compiled kernels.

    Parameters
    ----------
    device : str, optional
        ``"gpu"``, ``"cpu"``, ``"P:D"`` or None (best GPU, else a CPU); see
        :func:`~.devices.select_device`.

    Attributes
    ----------
    device_info : dict
        The device's description (:func:`~.devices.list_devices`).
    context : pyopencl.Context
        Shared by every instance on the same device.
    queue, transfer_queue : pyopencl.CommandQueue
        In-order queues: kernels and read-backs on the first, uploads on the second, so that
        the upload of a frame overlaps the kernels of the one before.

    Raises
    ------
    AzfilterError
        When pyopencl, a driver or the device is missing.
    """

    def __init__(self, device: str | None = None):
        cl = self._cl = import_pyopencl()
        self.device_info, self._device = select_device(device)
        self.context = device_context(cl, self.device_info, self._device)
        self.queue = cl.CommandQueue(self.context, self._device)
        self.transfer_queue = cl.CommandQueue(self.context, self._device)
        self._buffers: dict[str, Any] = {}

    # ------------------------------------------------------------------ device buffers
    def upload(self, array: np.ndarray) -> Any:
        """A new read-only device buffer holding a copy of ``array`` (one element if empty:
        OpenCL refuses empty buffers)."""
        if array.size == 0:
            array = np.zeros(1, dtype=array.dtype)
        cl = self._cl
        return cl.Buffer(self.context, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                         hostbuf=np.ascontiguousarray(array))

    def allocate(self, name: str, nbytes: int, access: str = "rw") -> Any:
        """A device buffer of ``nbytes`` (at least 1) kept under ``name`` (replacing any).

        Parameters
        ----------
        name : str
            Key in :attr:`buffers`.
        nbytes : int
        access : str
            ``"r"`` (kernels read it), ``"w"`` (kernels write it) or ``"rw"``.
        """
        flags = self._cl.mem_flags
        mode = {"r": flags.READ_ONLY, "w": flags.WRITE_ONLY, "rw": flags.READ_WRITE}[access]
        self._buffers[name] = self._cl.Buffer(self.context, mode, max(1, int(nbytes)))
        return self._buffers[name]

    @property
    def buffers(self) -> dict[str, Any]:
        """The device buffers allocated by :meth:`allocate`, by name."""
        return self._buffers

    def free_buffers(self) -> None:
        """Release every buffer from :meth:`allocate` (the device memory is freed once the
        queued commands using them are done)."""
        for buffer in self._buffers.values():
            buffer.release()
        self._buffers.clear()

    # ------------------------------------------------------------------ programs
    def kernels(self, options: list[str], names: tuple[str, ...]) -> dict[str, Any]:
        """The named kernels of the program built with ``options`` (compiled once)."""
        program = build_program(self._cl, self.context, options)
        return {name: self._cl.Kernel(program, name) for name in names}

    def largest_workgroup(self, kernels: dict[str, Any]) -> int:
        """The largest work-group every one of ``kernels`` can run with on this device."""
        cl = self._cl
        return min(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE,
                                              self._device) for kernel in kernels.values())

    # ------------------------------------------------------------------ host memory
    def pinned_array(self, shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
        """A new host array in page-locked memory of this device (uploaded by DMA).

        Parameters
        ----------
        shape : int or tuple of int
        dtype : numpy dtype

        Returns
        -------
        numpy.ndarray
            Uninitialised, C-contiguous; valid while the array (or a view of it) exists.
        """
        return pinned_in_context(self._cl, self.context, self.transfer_queue, shape, dtype)
