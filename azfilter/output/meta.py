from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..units import get_unit

PROGRAM = "azfilter"
TEXT_CONFIG_PREFIX = "# config: "

# Per-bin arrays written to HDF5: (dataset name, Result attribute, dtype).
ROW_ARRAYS = (
    ("intensity", "intensity", np.float32),
    ("intensity_errors", "sigma", np.float32),
    ("std", "std", np.float32),
    ("count", "count", np.float32),
    ("sum_signal", "sum_signal", np.float64),
    ("sum_variance", "sum_variance", np.float64),
    ("sum_normalization", "sum_normalization", np.float64),
    ("sum_normalization2", "sum_normalization2", np.float64),
)
REQUIRED_ROW_ARRAYS = ("intensity", "intensity_errors")


# ---------------------------------------------------------------------------- metadata


@dataclass
class OutputMeta:
    """What every output of one job says about how it was made.

    Attributes
    ----------
    operation : str
        ``"integrate"``, ``"sigma-clip"`` or ``"medfilt"``.
    unit : str
        Radial unit name (``"q_nm^-1"``...).
    parameters : dict
        Every parameter of the reduction, in the order to print them.
    poni_text : str
        The PONI text of the geometry.
    geometry : list of str
        Human-readable geometry lines (detector, beam centre, wavelength); see
        :func:`geometry_lines`.
    config : dict
        The job config (JSON-serialisable) that reruns the job.
    shard : str or None
        ``"I/N"`` when this output holds one shard of the job.
    """

    operation: str
    unit: str
    parameters: dict[str, Any]
    poni_text: str
    geometry: list[str]
    config: dict[str, Any]
    shard: str | None = None


def beam_centre(geometry: Any) -> tuple[float, float, float, float]:
    """Where the direct beam meets the detector plane (Fit2D-style numbers).

    Solving ``t1 = t2 = 0`` for the rotated pixel position gives, independently of rot3,
    ``P1 = poni1 + dist·tan(rot2)/cos(rot1)`` and ``P2 = poni2 − dist·tan(rot1)``.

    Returns
    -------
    x, y : float
        Beam centre in pixels along dim2 (x, columns) and dim1 (y, rows), measured from the
        detector origin in the PONI frame (pixel i spans [i, i+1]); with no tilt it is
        ``poni2/pixel2, poni1/pixel1``.
    direct_distance : float
        Sample to beam-centre distance along the beam (m), ``dist/(cos rot1 cos rot2)``.
    tilt : float
        Angle between the beam and the detector normal (degrees).
    """
    c1, c2 = math.cos(geometry.rot1), math.cos(geometry.rot2)
    p1 = geometry.poni1 + geometry.dist * math.tan(geometry.rot2) / c1
    p2 = geometry.poni2 - geometry.dist * math.tan(geometry.rot1)
    detector = geometry.detector
    tilt = math.degrees(math.acos(max(-1.0, min(1.0, c1 * c2))))
    return p2 / detector.pixel2, p1 / detector.pixel1, geometry.dist / (c1 * c2), tilt


def geometry_lines(geometry: Any) -> list[str]:
    """Human-readable description of a geometry: detector, distance, PONI, beam centre,
    wavelength (one item per line, no ``#``)."""
    detector = geometry.detector
    shape = "x".join(str(n) for n in detector.shape) if detector.shape else "from the image"
    lines = [
        f"Detector: {detector.display_name} ({detector.name}), shape {shape}, "
        f"pixel {detector.pixel1 * 1e6:.4g} x {detector.pixel2 * 1e6:.4g} um, "
        f"orientation {detector.orientation}",
        f"Distance: {geometry.dist:.6g} m (sample to detector plane)",
        f"PONI: poni1={geometry.poni1:.6g} m, poni2={geometry.poni2:.6g} m",
        f"Rotations: rot1={geometry.rot1:.6g} rot2={geometry.rot2:.6g} "
        f"rot3={geometry.rot3:.6g} rad",
    ]
    x, y, direct, tilt = beam_centre(geometry)
    lines.append(
        f"Beam centre (Fit2D): x={x:.3f} y={y:.3f} pixels, direct-beam distance "
        f"{direct * 1e3:.3f} mm, tilt {tilt:.4f} deg"
    )
    if geometry.wavelength is None:
        lines.append("Wavelength: not set (q units unavailable)")
    else:
        lines.append(
            f"Wavelength: {geometry.wavelength:.6g} m ({geometry.wavelength * 1e10:.6g} A, "
            f"{geometry.energy:.6g} keV)"
        )
    return lines


def radial_dataset_name(unit: str) -> str:
    """Name of the radial-axis dataset: the unit's quantity (``q``, ``2th``, ``r``)."""
    return get_unit(unit).quantity


# ---------------------------------------------------------------------------- helpers


def row_array(result: Any, name: str) -> np.ndarray | None:
    value = getattr(result, name, None)
    return None if value is None else np.asarray(value)


def json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    return str(value)


def to_json(value: Any) -> str:
    """One-line JSON of configs and parameters (numpy scalars and paths allowed)."""
    return json.dumps(value, default=json_default, separators=(", ", ": "))


def format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return " ".join(format_value(v) for v in value)
    return str(value)


def comparable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
