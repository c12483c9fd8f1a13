"""PONI files: pyFAI's geometry format, versions 1, 2, 2.1 and 3 (pyfai-algorithms.md §2).

Syntax: one ``key: value`` per line; the key is the text before the first ``:``, stripped and
lower-cased; lines without ``:`` and lines starting with ``#`` are ignored; when a key repeats
(several calibrations appended to one file) the last value wins. Distances are in metres, angles
in radians.

- Version 1 (no ``poni_version`` line): ``Distance``, ``Poni1``, ``Poni2``, ``Rot1-3``, optional
  ``Wavelength``, ``PixelSize1/2``, ``SplineFile`` ("None" means none) and ``Detector`` (a name).
  Without a detector name, or with a detector name and only one pixel size, a generic detector
  of that pixel size is built (as pyFAI does).
- Version 2: ``Detector: <class name>`` plus ``Detector_config: <JSON>`` (pixel sizes,
  ``max_shape`` for the generic detector).
- Version 2.1: the JSON also has ``orientation`` (1-4, 3 = pyFAI's native).
- Version 3: plus ``Parallax: True/False``.

The version is ``poni_version`` (default 1), raised to 2 when ``Detector_config`` is present, to
2.1 when it holds ``orientation`` and to 3 when ``Parallax`` is present.

Unsupported on purpose (each is a one-line :class:`AzfilterError`): spline distortion files,
pixel offset files, parallax correction switched on.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .detectors import Detector, get_detector
from .errors import AzfilterError
from .fileio import atomic_write_text
from .geometry import Geometry

#: PONI versions read and written
SUPPORTED_VERSIONS = (1.0, 2.0, 2.1, 3.0)

# how each known key is spelled when written and when named in an error message
_SPELLING = {
    "poni_version": "poni_version",
    "detector": "Detector",
    "detector_config": "Detector_config",
    "distance": "Distance",
    "dist": "Distance",
    "poni1": "Poni1",
    "poni2": "Poni2",
    "rot1": "Rot1",
    "rot2": "Rot2",
    "rot3": "Rot3",
    "wavelength": "Wavelength",
    "pixelsize1": "PixelSize1",
    "pixelsize2": "PixelSize2",
    "splinefile": "SplineFile",
    "parallax": "Parallax",
}

_NONE_WORDS = ("none", "null", "")


def _fail(source: str, key: str, problem: str) -> AzfilterError:
    return AzfilterError(f"{source}: {key}: {problem}")


def _read_key_values(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split PONI text into ``{lower-case key: value}`` (last wins) and the key spellings."""
    values: dict[str, str] = {}
    spellings: dict[str, str] = {}
    for line in text.splitlines():
        if ":" not in line or line.lstrip().startswith("#"):
            continue
        key, value = line.split(":", 1)
        spelled = key.strip()
        lower = spelled.lower()
        values[lower] = value.strip()
        spellings[lower] = spelled
    return values, spellings


def _number(
    source: str, values: dict[str, str], spellings: dict[str, str], key: str,
    required: bool, default: float | None = None, positive: bool = False,
) -> float | None:
    """The float value of ``key``; ``default`` when absent (an error when required)."""
    name = spellings.get(key, _SPELLING.get(key, key))
    if key not in values:
        if required:
            raise AzfilterError(f"{source}: no {name} (a required PONI key)")
        return default
    raw = values[key]
    try:
        number = float(raw)
    except ValueError:
        raise _fail(source, name, f"{raw!r} is not a number") from None
    if not math.isfinite(number):
        raise _fail(source, name, f"{raw!r} is not a finite number")
    if positive and number <= 0:
        raise _fail(source, name, f"{raw!r} must be > 0")
    return number


def _poni_version(source: str, values: dict[str, str], spellings: dict[str, str]) -> float:
    version = _number(source, values, spellings, "poni_version", required=False, default=1.0)
    assert version is not None
    if version not in SUPPORTED_VERSIONS:
        raise _fail(
            source, spellings.get("poni_version", "poni_version"),
            f"version {values['poni_version']!r} is not supported (1, 2, 2.1 or 3)",
        )
    return version


def _detector_config(source: str, raw: str, name: str) -> dict[str, Any]:
    if raw.lower() in _NONE_WORDS:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _fail(source, name, f"bad JSON ({err.msg} at column {err.colno})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise _fail(source, name, f"expected a JSON object, got {raw!r}")
    return config


def _check_unsupported_config(source: str, key_name: str, config: dict[str, Any]) -> None:
    lowered = {str(k).lower(): v for k, v in config.items()}
    spline = lowered.get("splinefile")
    if spline not in (None, "", "None", "none"):
        raise _fail(source, key_name, f"spline distortion not supported (splineFile {spline!r})")
    for offsets in ("x_offset_file", "y_offset_file"):
        if lowered.get(offsets) not in (None, "", "None", "none"):
            raise _fail(source, key_name, f"pixel offset files not supported ({offsets})")
    if "orientation" in lowered:
        orientation = lowered["orientation"]
        if isinstance(orientation, bool) or orientation not in (0, 1, 2, 3, 4):
            raise _fail(source, key_name, f"orientation {orientation!r} is not one of 1, 2, 3, 4")


def _make_detector(source: str, key_name: str, name: str, config: dict | None) -> Detector:
    try:
        return get_detector(name, config)
    except AzfilterError as err:
        raise _fail(source, key_name, str(err)) from None
    except (TypeError, ValueError, KeyError) as err:
        raise _fail(
            source, key_name, f"bad detector definition {name!r} {config!r}: {err}"
        ) from None


def _detector_v1(source: str, values: dict[str, str], spellings: dict[str, str]) -> Detector:
    """Version 1: optional detector name, legacy PixelSize1/2 (pyFAI's ``read_from_dict``)."""
    spline = values.get("splinefile")
    if spline is not None and spline.lower() not in _NONE_WORDS:
        raise _fail(
            source, spellings["splinefile"], f"spline distortion not supported ({spline!r})"
        )
    pixel1 = _number(source, values, spellings, "pixelsize1", required=False, positive=True)
    pixel2 = _number(source, values, spellings, "pixelsize2", required=False, positive=True)
    name = values.get("detector")
    key_name = spellings.get("detector", "Detector")
    if name is not None and name.lower() in (*_NONE_WORDS, "detector"):
        name = None  # the generic detector: built from PixelSize1/2 below
    if name is not None and (pixel1 is None) == (pixel2 is None):
        # a named detector, possibly binned by explicit pixel sizes
        config = None if pixel1 is None else {"pixel1": pixel1, "pixel2": pixel2}
        return _make_detector(source, key_name, name, config)
    if pixel1 is None or pixel2 is None:
        missing = "PixelSize1" if pixel1 is None else "PixelSize2"
        raise AzfilterError(
            f"{source}: no {missing}: a PONI file without a detector needs both pixel sizes"
        )
    return _make_detector(source, key_name, "Detector", {"pixel1": pixel1, "pixel2": pixel2})


def _detector_v2(source: str, values: dict[str, str], spellings: dict[str, str]) -> Detector:
    """Version >= 2: ``Detector`` name + ``Detector_config`` JSON."""
    if "detector" not in values or values["detector"].lower() in _NONE_WORDS:
        raise AzfilterError(f"{source}: no Detector (required from PONI version 2 on)")
    name = values["detector"]
    config_name = spellings.get("detector_config", "Detector_config")
    config = _detector_config(source, values.get("detector_config", ""), config_name)
    _check_unsupported_config(source, config_name, config)
    config = {str(k).lower(): v for k, v in config.items()}
    if config.get("orientation") == 0:  # pyFAI's "unspecified" means its native orientation
        config["orientation"] = 3
    return _make_detector(source, spellings.get("detector", "Detector"), name, config)


def parse_poni(text: str, source: str = "<string>") -> Geometry:
    """Parse the text of a PONI file.

    Parameters
    ----------
    text : str
        The file's content.
    source : str
        Name used in error messages and kept as ``Geometry.source``.

    Returns
    -------
    Geometry

    Raises
    ------
    AzfilterError
        One line naming ``source`` and the key: a missing or non-numeric distance / PONI, a bad
        number, an unknown detector, bad ``Detector_config`` JSON, an unsupported version,
        spline distortion, or parallax correction switched on.
    """
    values, spellings = _read_key_values(text)
    version = _poni_version(source, values, spellings)
    if "detector_config" in values:
        version = max(version, 2.0)
    if "parallax" in values:
        version = max(version, 3.0)
        parallax = values["parallax"].strip().lower()
        if parallax == "true":
            raise _fail(source, spellings["parallax"], "parallax correction not supported")
        if parallax not in ("false", "none", ""):
            raise _fail(source, spellings["parallax"], f"{values['parallax']!r} is not True/False")

    detector = (
        _detector_v1(source, values, spellings)
        if version < 2
        else _detector_v2(source, values, spellings)
    )

    distance_key = "distance" if "distance" in values else "dist"
    if distance_key not in values:
        raise AzfilterError(f"{source}: no Distance (a required PONI key)")
    dist = _number(source, values, spellings, distance_key, required=True, positive=True)
    poni1 = _number(source, values, spellings, "poni1", required=True)
    poni2 = _number(source, values, spellings, "poni2", required=True)
    rotations = [
        _number(source, values, spellings, f"rot{k}", required=False, default=0.0)
        for k in (1, 2, 3)
    ]
    wavelength = None
    if values.get("wavelength", "").lower() not in _NONE_WORDS:
        wavelength = _number(source, values, spellings, "wavelength", required=True, positive=True)
    return Geometry(
        dist=dist, poni1=poni1, poni2=poni2,
        rot1=rotations[0], rot2=rotations[1], rot3=rotations[2],
        wavelength=wavelength, detector=detector, source=source,
    )


def load_poni(path: str | os.PathLike) -> Geometry:
    """Read a PONI file (versions 1, 2, 2.1, 3).

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    Geometry
        With ``source`` set to ``path``.

    Raises
    ------
    AzfilterError
        When the file cannot be read, or its content is bad (see :func:`parse_poni`).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise AzfilterError(f"{source}: not a PONI file (not UTF-8 text)") from None
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise AzfilterError(f"cannot read PONI file {source}: {reason}") from None
    return parse_poni(text, source=source)


def save_poni(geometry: Geometry, path: str | os.PathLike | None = None,
              version: float = 2.1) -> str:
    """The PONI text of ``geometry`` and, when ``path`` is given, that text written atomically.

    Parameters
    ----------
    geometry : Geometry
    path : str or os.PathLike, optional
        File to write (a temporary file in the same folder, then renamed over it).
    version : float
        PONI format version: 1, 2, 2.1 (default) or 3.

    Returns
    -------
    str
        The PONI text.

    Raises
    ------
    AzfilterError
        When the version cannot express the geometry, or the file cannot be written.
    """
    text = format_poni(geometry, version=version)
    if path is not None:
        write_poni_text(text, path)
    return text


def _format_float(value: float) -> str:
    # repr is the shortest string that reads back to the same float
    return repr(float(value))


def _format_version(version: float) -> str:
    return str(int(version)) if float(version).is_integer() else str(version)


def format_poni(geometry: Geometry, version: float = 2.1) -> str:
    """The PONI text of a geometry.

    Parameters
    ----------
    geometry : Geometry
    version : float
        1, 2, 2.1 (default, as pyFAI 2026.9 writes) or 3 (with ``Parallax: False``).

    Returns
    -------
    str
        Text that :func:`parse_poni` (and pyFAI) reads back to the same geometry, every float
        written with full ``repr`` precision. Version 1 cannot hold the shape of a generic
        detector (it comes from the image again); versions 1 and 2 cannot hold an orientation
        other than 3.

    Raises
    ------
    AzfilterError
        For an unknown version, or an orientation the version cannot store.
    """
    try:
        version = float(version)
    except (TypeError, ValueError):
        raise AzfilterError(f"PONI version {version!r} is not one of 1, 2, 2.1, 3") from None
    if version not in SUPPORTED_VERSIONS:
        raise AzfilterError(f"PONI version {version!r} is not one of 1, 2, 2.1, 3")
    detector = geometry.detector
    orientation = int(detector.orientation)
    if version < 2.1 and orientation not in (0, 3):
        raise AzfilterError(
            f"PONI version {_format_version(version)} cannot store detector orientation "
            f"{orientation}; write version 2.1 or 3"
        )
    from . import __version__

    lines = [
        "# Nota: C-Order, 1 refers to the Y axis, 2 to the X axis",
        f"# Written by azfilter {__version__}",
        f"poni_version: {_format_version(version)}",
        f"Detector: {detector.name}",
    ]
    if version < 2:
        # pyFAI's v1 reader: a named detector takes both pixel sizes as a binning, a generic one
        # is built from them
        lines += [
            f"PixelSize1: {_format_float(detector.pixel1)}",
            f"PixelSize2: {_format_float(detector.pixel2)}",
        ]
    else:
        config = dict(detector.get_config())
        if version < 2.1:
            config.pop("orientation", None)
        else:
            config["orientation"] = 3 if orientation == 0 else orientation
        lines.append(f"Detector_config: {json.dumps(config)}")
    lines += [
        f"Distance: {_format_float(geometry.dist)}",
        f"Poni1: {_format_float(geometry.poni1)}",
        f"Poni2: {_format_float(geometry.poni2)}",
        f"Rot1: {_format_float(geometry.rot1)}",
        f"Rot2: {_format_float(geometry.rot2)}",
        f"Rot3: {_format_float(geometry.rot3)}",
    ]
    if geometry.wavelength is not None:
        lines.append(f"Wavelength: {_format_float(geometry.wavelength)}")
    if version >= 3:
        lines.append("Parallax: False")
    return "\n".join(lines) + "\n"


def write_poni_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then rename).

    Raises
    ------
    AzfilterError
        When the file cannot be written.
    """
    target = Path(path)
    try:
        atomic_write_text(target, text)
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise AzfilterError(f"cannot write PONI file {target}: {reason}") from None
