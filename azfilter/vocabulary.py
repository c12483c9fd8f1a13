"""The project's shared vocabulary: one list of operations, splits, error models, backends and
file suffixes, imported by every module that needs one (the command line, the job
configuration, the integrator, the engines and the writers).

This module imports nothing from azfilter, so any module may import it without a cycle.
The radial units live in :mod:`azfilter.units`, next to their formulas.
"""

from __future__ import annotations

#: Operations as the command line and job files name them. ``sparsify`` is sigma-clip plus
#: the picking of Bragg pixels (:mod:`azfilter.bragg`), written in pyFAI's sparse format.
OPERATIONS: tuple[str, ...] = ("integrate", "sigma-clip", "medfilt", "sparsify")

#: The same operations as method names of :class:`azfilter.Integrator` and the engines.
METHODS: tuple[str, ...] = ("integrate", "sigma_clip", "medfilt")

#: command-line operation name -> method name (sparsify clips as sigma-clip, then picks)
METHOD_OF: dict[str, str] = {**dict(zip(OPERATIONS[:3], METHODS, strict=True)),
                             "sparsify": "sigma_clip"}

#: Pixel splitting schemes: ``no`` (each pixel in one bin), ``full`` (exact area split).
SPLITS: tuple[str, ...] = ("no", "full")

#: Error models every engine understands. ``variance`` needs a per-pixel variance array, so
#: only the Python API offers it; the command line and job files offer :data:`CLI_ERROR_MODELS`.
ERROR_MODELS: tuple[str, ...] = ("poisson", "azimuthal", "hybrid", "variance")
CLI_ERROR_MODELS: tuple[str, ...] = ("poisson", "azimuthal", "hybrid")

#: Compute backends, fastest-to-set-up first after the default.
BACKENDS: tuple[str, ...] = ("python", "cython", "opencl")
DEFAULT_BACKEND = "cython"

#: where bitshuffle-LZ4 HDF5 chunks are decoded with the OpenCL backend: ``auto`` (on the
#: device for GPUs, on the host for CPU devices), ``device`` or ``host``
DECODE_MODES: tuple[str, ...] = ("auto", "device", "host")

#: Output suffixes (lower case): one HDF5/NeXus file, or one text file per frame.
HDF5_SUFFIXES: tuple[str, ...] = (".h5", ".nxs", ".hdf5", ".hdf", ".nx5")
TEXT_SUFFIXES: tuple[str, ...] = (".dat", ".xy", ".txt")

#: Suffixes of compressed input files that are stripped before naming a text output.
COMPRESSION_SUFFIXES: tuple[str, ...] = (".gz", ".bz2", ".xz", ".lz4", ".zst")
