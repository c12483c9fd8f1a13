from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..units import get_unit

if TYPE_CHECKING:
    from ..manifest import Manifest

PROGRAM = "azfilter"
TEXT_CONFIG_PREFIX = "# config: "

# Per-bin arrays written to HDF5: (dataset name, Result attribute, dtype). ``I`` and
# ``I_errors`` are NXazint1d's names; the others are what azfilter adds.
ROW_ARRAYS = (
    ("I", "intensity", np.float32),
    ("I_errors", "sigma", np.float32),
    ("std", "std", np.float32),
    ("count", "count", np.float32),
    ("sum_signal", "sum_signal", np.float64),
    ("sum_variance", "sum_variance", np.float64),
    ("sum_normalization", "sum_normalization", np.float64),
    ("sum_normalization2", "sum_normalization2", np.float64),
)
REQUIRED_ROW_ARRAYS = ("I", "I_errors")

# The outlier statistics of sigma-clip and medfilt (azfilter.outliers), in the NXcollection
# ``/entry/outliers`` (attribute ``pick``): (dataset name, dtype, per bin?). Per-frame
# datasets are (rows,), per-bin ones have the shape of the data group's rows. Rows without
# statistics (appended to or merged with an output written before them) hold FILL_VALUES.
OUTLIERS_GROUP = "outliers"
OUTLIER_ARRAYS = (
    ("rejected", np.int64, False),
    ("rejected_sum", np.float64, False),
    ("picked", np.int64, False),
    ("max_sigma", np.float64, False),
    ("kept", np.int32, True),
    ("available", np.int32, True),
)
OUTLIER_FILL = {"rejected": -1, "rejected_sum": np.nan, "picked": -1, "max_sigma": np.nan,
                "kept": -1, "available": -1}
OUTLIER_DESCRIPTIONS = {
    "rejected": "pixels (fragments with splitting) left out: sum over bins of available - kept",
    "rejected_sum": "summed signal (raw - dark, times the table coefficient) of the pixels "
                    "left out, in the units of sum_signal",
    "picked": "pixels with (I_pixel - I)/std > pick in their bin (I, std: the bin's final "
              "values in /entry/data)",
    "max_sigma": "largest (I_pixel - I)/std of the frame (NaN: no pixel)",
    "kept": "pixels kept per bin (/entry/data/count)",
    "available": "valid pixels per bin before clipping (not masked, not dummy)",
}


#: prefix of the outlier datasets among a writer's buffered rows
OUTLIER_PREFIX = "outliers/"


def outlier_rows(result: Any) -> dict[str, np.ndarray]:
    """One row of every outlier dataset for a result (fill values when it has none)."""
    outliers = getattr(result, "outliers", None)
    if outliers is None:
        shape = np.shape(result.count)
        return {name: (np.full(shape, OUTLIER_FILL[name], dtype=dtype) if per_bin
                       else np.asarray(OUTLIER_FILL[name], dtype=dtype))
                for name, dtype, per_bin in OUTLIER_ARRAYS}
    return {name: np.asarray(getattr(outliers, name), dtype=dtype)
            for name, dtype, _per_bin in OUTLIER_ARRAYS}


def outliers_pick(meta: OutputMeta) -> float | None:
    """The pick of a job whose outputs carry outlier statistics (sigma-clip, medfilt), or
    None."""
    pick = meta.parameters.get("pick")
    if meta.operation not in ("sigma-clip", "medfilt") or pick is None:
        return None
    return float(pick)
# Names of the same arrays in files written before the NXazint1d layout (azfilter <= 0.x).
LEGACY_ROW_NAMES = {"I": "intensity", "I_errors": "intensity_errors"}

# NeXus ``units`` of the radial axis, by azfilter unit symbol (pint and the NeXus manual read
# these; ``A^-1`` would read as 1/ampere), and the axis ``long_name`` by quantity
# (NXazint1d enumerates ``q`` and ``2theta``).
NEXUS_UNITS = {"nm^-1": "1/nm", "A^-1": "1/angstrom", "deg": "degree", "rad": "rad",
               "mm": "mm", "nm": "nm", "A": "angstrom"}
NEXUS_LONG_NAMES = {"q": "q", "2th": "2theta", "r": "r", "d": "d-spacing"}


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
    manifest : Manifest or None
        The whole job's planned (source, frame) list; stored in HDF5 outputs so that
        ``azfilter merge`` can prove completeness. None: not recorded (older callers).
    wavelength : float or None
        Wavelength in metres; None: read from :attr:`poni_text`.
    instrument_name, source_name, source_type, source_probe : str
        What NXazint1d records of the instrument and its source (``unknown`` unless told).
    sectors : ndarray (n_sectors, 2) or None
        The χ sectors ``(lo, hi)`` in degrees of a reduction with sectors; None: none, or not
        known yet (the NeXus writer takes them from the first result's ``sectors``).
    """

    operation: str
    unit: str
    parameters: dict[str, Any]
    poni_text: str
    geometry: list[str]
    config: dict[str, Any]
    shard: str | None = None
    manifest: Manifest | None = None
    wavelength: float | None = None
    instrument_name: str = "unknown"
    source_name: str = "unknown"
    source_type: str = "unknown"
    source_probe: str = "x-ray"
    sectors: np.ndarray | None = None

    def wavelength_m(self) -> float | None:
        """The wavelength in metres: :attr:`wavelength`, else the PONI text's, else None."""
        if self.wavelength is not None:
            return float(self.wavelength)
        return poni_wavelength(self.poni_text)

    def shard_index(self) -> int | None:
        """I of :attr:`shard` ``"I/N"``, or None."""
        return None if not self.shard else int(self.shard.split("/")[0])


def poni_wavelength(poni_text: str) -> float | None:
    """The ``Wavelength:`` value (metres) of a PONI text, or None when absent or unusable."""
    for line in poni_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == "wavelength":
            try:
                wavelength = float(value.strip())
            except ValueError:
                return None
            return wavelength if math.isfinite(wavelength) and wavelength > 0 else None
    return None


def nexus_axis_attributes(unit: str) -> tuple[str, str]:
    """(``long_name``, ``units``) of the radial axis of a NeXus file for an azfilter unit.

    Examples
    --------
    >>> nexus_axis_attributes("q_A^-1")
    ('q', '1/angstrom')
    """
    info = get_unit(unit)
    return (NEXUS_LONG_NAMES.get(info.quantity, info.quantity),
            NEXUS_UNITS.get(info.symbol, info.symbol))


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
    """Name of the radial-axis dataset of a NeXus output: NXazint1d's ``radial_axis`` (the
    quantity and unit are its ``long_name`` and ``units`` attributes). Files written before
    the NXazint1d layout named it after the quantity (``q``, ``2th``, ``r``)."""
    get_unit(unit)  # an unknown unit raises here, as before
    return "radial_axis"


# ---------------------------------------------------------------------------- helpers


def sector_array(sectors: Any) -> np.ndarray | None:
    """Sector bounds as a float64 ``(n_sectors, 2)`` array (None stays None)."""
    return None if sectors is None else np.asarray(sectors, dtype=np.float64).reshape(-1, 2)


def same_sectors(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    """Whether two sector lists (``(n, 2)`` degrees, or None) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0, atol=1e-9))


def describe_sectors(sectors: np.ndarray | None) -> str:
    """``"none"`` or ``"3 sectors: [-180, -60] [-60, 60] [60, 180] deg"``."""
    if sectors is None:
        return "none"
    ranges = " ".join(f"[{lo:.6g}, {hi:.6g}]" for lo, hi in sectors)
    return f"{sectors.shape[0]} sector{'s' if sectors.shape[0] != 1 else ''}: {ranges} deg"


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


def job_differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The result-deciding keys (:func:`azfilter.config.result_signature`) on which two job
    configs differ, sorted.

    A key of :data:`azfilter.config.LATER_KEYS` that one config lacks (an output written
    before the key existed) does not count: such outputs stay joinable, their rows simply
    lack what the key controls.
    """
    from ..config import LATER_KEYS, result_signature

    a, b = result_signature(mine), result_signature(theirs)
    return sorted(k for k in set(a) | set(b)
                  if comparable(a.get(k)) != comparable(b.get(k))
                  and not (k in LATER_KEYS and (k not in a or k not in b)))
