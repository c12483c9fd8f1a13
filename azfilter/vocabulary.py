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

#: ``--device`` words for one OpenCL device: the best GPU, a CPU, or the best of any kind.
DEVICE_WORDS: tuple[str, ...] = ("gpu", "cpu", "auto")
#: ``--device`` words for every GPU of the node (frames spread over them, one engine each).
ALL_GPUS_WORDS: tuple[str, ...] = ("all", "gpus", "all-gpus")


def parse_device_spec(value: object, where: str = "--device") -> list[str] | None:
    """The device tokens of a ``--device`` value, checked for syntax only.

    Parameters
    ----------
    value : None, str or sequence of str
        ``"gpu"``, ``"cpu"``, ``"auto"``, ``"P:D"`` (platform and device indices, as
        ``azfilter devices`` lists them), ``"all"`` (every GPU; also ``"gpus"``,
        ``"all-gpus"``), or several of them separated by commas (``"0:0,0:1"``), or a list of
        such strings. A device may be named twice (two engines on it).
    where : str
        Where the value came from, for the error message.

    Returns
    -------
    list of str or None
        Lower-case tokens in the given order (``"P:D"`` without spaces or leading zeros);
        None when no device was named (None, ``""``, an empty list).

    Raises
    ------
    ValueError
        For a token that is none of the above (the message starts with ``where``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        parts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(part, str) for part in value):
        parts = list(value)
    else:
        raise ValueError(f"{where}: expected a device or a list of devices, not {value!r}")
    tokens = [token.strip().lower() for part in parts for token in part.split(",")]
    if all(not token for token in tokens):
        return None
    checked = []
    for token in tokens:
        pair = token.split(":")
        if token in DEVICE_WORDS or token in ALL_GPUS_WORDS:
            checked.append(token)
        elif len(pair) == 2 and all(item.strip().isdigit() for item in pair):
            checked.append(f"{int(pair[0])}:{int(pair[1])}")
        else:
            raise ValueError(
                f"{where}: {token!r} is not a device; give gpu, cpu, all (every GPU), or "
                "platform:device indices as 'azfilter devices' lists them, several separated "
                "by commas (e.g. 0:0,0:1)")
    return checked


def names_several_devices(tokens: list[str] | None) -> bool:
    """Whether parsed ``--device`` tokens may name more than one device (a list, or all)."""
    return bool(tokens) and (len(tokens) > 1 or tokens[0] in ALL_GPUS_WORDS)
