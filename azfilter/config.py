"""Job configuration: the options of one ``azfilter`` run as a flat dictionary.

A job config uses the command-line option names (``max-iter`` or ``max_iter``; stored with
underscores) plus ``operation``, ``poni``, ``inputs`` and ``output``.  It is read from TOML or
JSON files, from the configuration stored in an azfilter output (HDF5 or text), and written
back as TOML or JSON.  Command-line options override the file; the defaults fill the rest.

Relative paths in a config file are relative to the folder of that file, so that a job file
keeps working from any working directory.  Configs written by azfilter hold absolute paths.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import AzfilterError
from .fileio import atomic_write_text
from .vocabulary import BACKENDS, DECODE_MODES, OPERATIONS, SPLITS
from .vocabulary import CLI_ERROR_MODELS as ERROR_MODELS

#: Version of the job-config layout that this azfilter writes (the ``schema`` key of saved
#: configs and of the job stored in every output). Configs without the key are version 1.
SCHEMA_VERSION = 2


def _upgrade_1_to_2(raw: dict[str, Any]) -> dict[str, Any]:
    # Version 2 only adds the ``schema`` key itself (configs of version 1 have none); the
    # option names are unchanged.
    return dict(raw)


#: ``UPGRADES[v]`` turns a version-``v`` config (raw keys, as read from a file) into version
#: ``v + 1``. A release that renames or removes a key adds a step here, so that the jobs
#: stored in old outputs still rerun (``azfilter run old.h5``).
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2}


def upgrade(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Bring a raw config (as read from a file) to :data:`SCHEMA_VERSION`.

    The ``schema`` key is consumed; a config without it is version 1.

    Raises
    ------
    AzfilterError
        For a version newer than this azfilter knows, or one that is not a positive integer.
    """
    raw = dict(raw)
    version = raw.pop("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AzfilterError(f"{where}: schema must be a positive integer, not {version!r}")
    if version > SCHEMA_VERSION:
        raise AzfilterError(
            f"{where}: config schema {version} was written by a newer azfilter (this one "
            f"reads up to {SCHEMA_VERSION}); upgrade azfilter"
        )
    while version < SCHEMA_VERSION:
        raw = UPGRADES[version](raw)
        version += 1
    return raw


# Default of every key; None means "not set / not applied".
DEFAULTS: dict[str, Any] = {
    "operation": None,
    "poni": None,
    "inputs": [],
    "output": None,
    "npt": 1000,
    "unit": "q_nm^-1",
    "backend": "cython",
    "device": None,
    "decode": "auto",       # bitshuffle-LZ4 chunks decoded on the OpenCL device or the host
    "mask": None,
    "dark": None,
    "flat": None,
    "polarization": None,
    "solid_angle": True,
    "radial_range": None,
    "azimuth_range": None,
    "error_model": None,  # per operation, see OPERATION_DEFAULTS
    "normalization": 1.0,
    "split": None,  # per operation
    "thres": 5.0,
    "max_iter": 5,
    "cutoff_pick": 3.0,     # sparsify: pick pixels above bg + cutoff_pick * sqrt(std² + noise²)
    "noise": 1.0,           # sparsify: noise floor (corrected intensity)
    "percentile": [50.0],
    "recursive": False,
    "overwrite": False,
    "skip_existing": False,
    "threads": None,
    "shard": None,
    "quiet": False,
    "wait": True,           # wait for another run's lock on the output (else refuse)
    "wavelength": None,     # angstrom; overrides the PONI file's
    "energy": None,         # keV; overrides the PONI file's wavelength
    "dummy": None,          # raw value of invalid pixels; overrides the detector's
    "delta_dummy": None,    # tolerance around dummy
    "monitor": None,        # header key or HDF5 dataset each frame is divided by
    "sectors": None,        # N equal chi sectors, or a list of [lo, hi] degree ranges
}

# Operation-dependent defaults (sigma-clip defaults to the azimuthal model: pyFAI's default
# returns zeros; README, "where it deliberately differs from pyFAI").
OPERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    "integrate": {"error_model": "poisson", "split": "no"},
    "sigma-clip": {"error_model": "azimuthal", "split": "no"},
    "medfilt": {"error_model": "poisson", "split": "full"},
    # pyFAI sparsify-Bragg's defaults: Poisson model, Chauvenet cutoff (thres 0), 5 cycles
    "sparsify": {"error_model": "poisson", "split": "no", "thres": 0.0},
}

# Keys that only one operation uses; they are dropped from the other operations' configs.
OPERATION_KEYS: dict[str, tuple[str, ...]] = {
    "integrate": (),
    "sigma-clip": ("thres", "max_iter"),
    "medfilt": ("percentile",),
    "sparsify": ("thres", "max_iter", "cutoff_pick", "noise"),
}
OPERATION_ONLY = {key for keys in OPERATION_KEYS.values() for key in keys}

# Keys holding file paths (resolved against the config file's folder).
PATH_KEYS = ("poni", "output", "mask", "dark", "flat")

# Keys describing one run rather than the job: never written into saved configs.
RUN_ONLY_KEYS = ("shard", "quiet", "wait")

# Keys that change what the numbers are; two outputs can only be joined when these agree.
RESULT_KEYS = (
    "operation", "poni", "npt", "unit", "mask", "dark", "flat", "polarization", "solid_angle",
    "radial_range", "azimuth_range", "error_model", "normalization", "split", "thres",
    "max_iter", "cutoff_pick", "noise", "percentile", "wavelength", "energy", "dummy",
    "delta_dummy", "monitor", "sectors",
)


def _key(name: str) -> str:
    return name.strip().replace("-", "_")


def _as_bool(value: Any, key: str, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise AzfilterError(f"{where}: {key} must be true or false, not {value!r}")


def _as_number(value: Any, key: str, where: str, kind: type = float) -> float | int:
    if isinstance(value, bool):
        raise AzfilterError(f"{where}: {key} must be a number, not {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise AzfilterError(f"{where}: {key} must be a number, not {value!r}") from None
    if kind is int and number != float(value):
        raise AzfilterError(f"{where}: {key} must be an integer, not {value!r}")
    if not math.isfinite(number):
        raise AzfilterError(f"{where}: {key} must be finite, not {value!r}")
    return number


def _as_pair(value: Any, key: str, where: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise AzfilterError(f"{where}: {key} must be two numbers [low, high], not {value!r}")
    low, high = (_as_number(v, key, where) for v in value)
    return [low, high]


def parse_percentile(value: Any, where: str = "percentile") -> list[float]:
    """Return ``value`` (one or two numbers in [0, 100]) as a list of one or two floats.

    Accepts a number, a list/tuple, or a string such as ``"40 60"`` or ``"40,60"``.
    """
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple)):
        value = [value]
    if len(value) not in (1, 2):
        raise AzfilterError(f"{where}: percentile takes one or two numbers, not {value!r}")
    numbers = [float(_as_number(v, "percentile", where)) for v in value]
    if any(not 0.0 <= p <= 100.0 for p in numbers):
        raise AzfilterError(f"{where}: percentile must lie in [0, 100], not {numbers}")
    if len(numbers) == 2 and numbers[0] > numbers[1]:
        raise AzfilterError(f"{where}: percentile low {numbers[0]} is above high {numbers[1]}")
    return numbers


def parse_sectors(value: Any, where: str = "sectors") -> int | list[list[float]]:
    """``sectors``: a number of equal sectors (a positive integer) or a list of
    ``[lo, hi]`` degree ranges.

    Raises
    ------
    AzfilterError
        For anything else.
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise AzfilterError(f"{where}: sectors: give a number or at least one [lo, hi]")
        return [_as_pair(pair, "sectors", where) for pair in value]
    number = _as_number(value, "sectors", where, int)
    if number < 1:
        raise AzfilterError(f"{where}: sectors must be at least 1, not {number}")
    return int(number)


def sector_count(value: int | list | None) -> int | None:
    """How many sectors a ``sectors`` value makes (None without sectors)."""
    if value is None:
        return None
    return len(value) if isinstance(value, (list, tuple)) else int(value)


def parse_shard(value: Any, where: str = "--shard") -> tuple[int, int] | None:
    """Parse ``"I/N"`` (I in 0..N-1) into ``(I, N)``; None or ``""`` give None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2:
        text = f"{value[0]}/{value[1]}"
    else:
        text = str(value)
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise AzfilterError(
            f"{where}: expected I/N with 0 <= I < N (e.g. 0/4), not {text!r}"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise AzfilterError(f"{where}: expected I/N with 0 <= I < N (e.g. 0/4), not {text!r}")
    return index, count


def normalize(raw: dict[str, Any], where: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Check the keys and types of a config dictionary and return a clean copy.

    Parameters
    ----------
    raw : dict
        Keys with dashes or underscores; only the keys present are returned.
    where : str
        Where the dictionary came from, for error messages.
    base_dir : Path, optional
        Folder that relative paths are relative to (the config file's folder).

    Raises
    ------
    AzfilterError
        On an unknown key or a value of the wrong type.
    """
    clean: dict[str, Any] = {}
    for name, value in raw.items():
        key = _key(name)
        if key in ("no_solid_angle",):  # the command-line spelling of solid_angle = false
            clean["solid_angle"] = not _as_bool(value, name, where)
            continue
        if key not in DEFAULTS:
            known = ", ".join(sorted(DEFAULTS))
            raise AzfilterError(f"{where}: unknown key {name!r} (known keys: {known})")
        if value is None:
            clean[key] = None
            continue
        if key == "operation":
            value = str(value)
            if value in ("sigma_clip", "sigmaclip"):
                value = "sigma-clip"
            if value not in OPERATIONS:
                raise AzfilterError(
                    f"{where}: operation must be one of {', '.join(OPERATIONS)}, not {value!r}"
                )
        elif key == "inputs":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise AzfilterError(f"{where}: inputs must be a list of paths, not {value!r}")
            value = [_resolve_input(v, base_dir) for v in value]
        elif key in PATH_KEYS:
            if not isinstance(value, (str, os.PathLike)):
                raise AzfilterError(f"{where}: {name} must be a path, not {value!r}")
            value = str(value)
            if key != "output" or value != "-":
                value = _resolve_path(value, base_dir)
        elif key == "npt":
            value = _as_number(value, name, where, int)
            if value < 1:
                raise AzfilterError(f"{where}: npt must be at least 1, not {value}")
        elif key == "max_iter":
            value = _as_number(value, name, where, int)
            if value < 0:
                raise AzfilterError(f"{where}: max_iter must be >= 0, not {value}")
        elif key == "threads":
            value = _as_number(value, name, where, int)
            if value < 1:
                raise AzfilterError(f"{where}: threads must be at least 1, not {value}")
        elif key in ("thres", "normalization", "dummy"):
            value = float(_as_number(value, name, where))
        elif key in ("cutoff_pick", "noise"):
            value = float(_as_number(value, name, where))
            if not value >= 0:
                raise AzfilterError(f"{where}: {name} must be >= 0, not {value}")
        elif key in ("wavelength", "energy", "delta_dummy"):
            value = float(_as_number(value, name, where))
            if value < 0 or (value == 0 and key != "delta_dummy"):
                raise AzfilterError(f"{where}: {name} must be positive, not {value}")
        elif key == "sectors":
            value = parse_sectors(value, where)
        elif key == "monitor":
            value = str(value)
            if not value.strip():
                raise AzfilterError(f"{where}: monitor must name a header key or a dataset")
        elif key == "polarization":
            value = float(_as_number(value, name, where))
            if not -1.0 <= value <= 1.0:
                raise AzfilterError(f"{where}: polarization factor must lie in [-1, 1]")
        elif key in ("solid_angle", "recursive", "overwrite", "skip_existing", "quiet", "wait"):
            value = _as_bool(value, name, where)
        elif key in ("radial_range", "azimuth_range"):
            value = _as_pair(value, name, where)
        elif key == "percentile":
            value = parse_percentile(value, where)
        elif key == "shard":
            shard = parse_shard(value, where)
            value = None if shard is None else f"{shard[0]}/{shard[1]}"
        elif key == "error_model":
            value = str(value)
            if value not in ERROR_MODELS:
                raise AzfilterError(
                    f"{where}: error_model must be one of {', '.join(ERROR_MODELS)}, not {value!r}"
                )
        elif key == "split":
            value = str(value)
            if value not in SPLITS:
                raise AzfilterError(f"{where}: split must be 'no' or 'full', not {value!r}")
        elif key == "backend":
            value = str(value)
            if value not in BACKENDS:
                raise AzfilterError(
                    f"{where}: backend must be one of {', '.join(BACKENDS)}, not {value!r}"
                )
        elif key == "decode":
            value = str(value)
            if value not in DECODE_MODES:
                raise AzfilterError(
                    f"{where}: decode must be one of {', '.join(DECODE_MODES)}, not {value!r}"
                )
        elif key in ("unit", "device"):
            value = str(value)
        clean[key] = value
    return clean


def _resolve_path(path: str, base_dir: Path | None) -> str:
    expanded = os.path.expanduser(path)
    if base_dir is not None and not os.path.isabs(expanded):
        expanded = os.path.join(base_dir, expanded)
    return expanded


def _resolve_input(spec: str, base_dir: Path | None) -> str:
    # "file.h5::/entry/data" — only the file part is a path; "@list.txt" names a file list.
    if spec.startswith("@"):
        return "@" + _resolve_path(spec[1:], base_dir)
    return _resolve_path(spec, base_dir)


def effective(*layers: dict[str, Any]) -> dict[str, Any]:
    """Merge config layers (later ones win) over :data:`DEFAULTS` and the operation defaults.

    Keys that do not apply to the operation (``thres`` for ``integrate``...) are dropped.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    operation = merged.get("operation")
    result = dict(DEFAULTS)
    if operation in OPERATION_DEFAULTS:
        result.update(OPERATION_DEFAULTS[operation])
    for key, value in merged.items():
        # None in a layer means "not set there", except for keys whose default is None anyway.
        if value is not None or DEFAULTS.get(key) is None:
            if value is None and key in ("error_model", "split"):
                continue
            result[key] = value
    if operation in OPERATION_KEYS:
        for key in OPERATION_ONLY - set(OPERATION_KEYS[operation]):
            result.pop(key, None)
    return result


def job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of an effective config that describes the job (no per-run keys), with
    absolute paths: what ``--save-config`` writes and what outputs embed."""
    job: dict[str, Any] = {"schema": SCHEMA_VERSION}
    job.update((k, v) for k, v in config.items() if k not in RUN_ONLY_KEYS)
    for key in PATH_KEYS:
        if job.get(key) and job[key] != "-":
            job[key] = os.path.abspath(job[key])
    job["inputs"] = [_abs_input(spec) for spec in job.get("inputs") or []]
    return job


def _abs_input(spec: str) -> str:
    if spec.startswith("@"):
        return "@" + _abs_input(spec[1:])
    return spec if os.path.isabs(spec) else os.path.abspath(spec)


def result_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``config`` that decide the numbers (to check two outputs can be joined)."""
    return {key: config.get(key) for key in RESULT_KEYS if key in config}


# ---------------------------------------------------------------------------- reading


def _load_toml(path: Path) -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
        import tomli as tomllib

    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise AzfilterError(f"{path}: cannot read TOML: {err}") from None


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a job config from a TOML or JSON job file.

    Returns the normalized (but not merged) dictionary, upgraded to :data:`SCHEMA_VERSION`;
    relative paths are resolved against the file's folder. Configs stored in azfilter outputs
    are read by :func:`azfilter.pipeline.load_job`, which calls :func:`from_raw`.

    Raises
    ------
    AzfilterError
        When the file is missing, unreadable, or holds no valid azfilter config.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise AzfilterError(f"{where}: config file not found")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        raw = _load_toml(path)
    elif suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise AzfilterError(f"{where}: cannot read JSON: {err}") from None
    else:
        raise AzfilterError(f"{where}: a job file ends in .toml or .json")
    return from_raw(raw, where, base_dir=path.resolve().parent)


def from_raw(raw: Any, where: str, base_dir: Path | None = None) -> dict[str, Any]:
    """Normalize a config read from a file: unwrap a ``[job]``/``[azfilter]`` section,
    upgrade an older schema (:func:`upgrade`), check keys and types (:func:`normalize`)."""
    if not isinstance(raw, dict):
        raise AzfilterError(f"{where}: a config must be a table/object of option = value")
    # TOML files may group the options under [job] or [azfilter].
    for section in ("azfilter", "job"):
        if section in raw and isinstance(raw[section], dict) and len(raw) == 1:
            raw = raw[section]
    return normalize(upgrade(raw, where), where, base_dir=base_dir)


# ---------------------------------------------------------------------------- writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: dict[str, Any]) -> str:
    """Format a flat config as TOML; keys whose value is None are written as comments
    (TOML has no null)."""
    lines = ["# azfilter job configuration (option names as on the command line)"]
    for key, value in config.items():
        name = key.replace("_", "-")
        if value is None:
            lines.append(f"# {name} = (not set)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def to_json(config: dict[str, Any]) -> str:
    """Format a config as one line of JSON (as embedded in outputs)."""
    return json.dumps(config, separators=(", ", ": "))


def save_config(config: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a job config to ``path`` (``.toml`` or ``.json``), atomically.

    Raises
    ------
    AzfilterError
        For another suffix, or when the file cannot be written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        text = to_toml(config)
    elif suffix == ".json":
        text = json.dumps(config, indent=2) + "\n"
    else:
        raise AzfilterError(f"{path}: a saved config must end in .toml or .json")
    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise AzfilterError(f"{path}: cannot write: {err.strerror or err}") from None
