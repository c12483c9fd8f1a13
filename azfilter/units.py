"""Radial units: name, internal quantity and scale factor (as pyFAI's unit registry)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AzfilterError


@dataclass(frozen=True)
class Unit:
    """A radial unit.

    Attributes
    ----------
    name : str
        The unit's name as users write it (``"q_nm^-1"``).
    quantity : str
        The internal quantity: ``"2th"`` (radians), ``"q"`` (nm^-1), ``"r"`` (metres), ``"d"``
        (d-spacing ``2π/q``, metres, as pyFAI), or ``"chi"`` (radians, in (-pi, pi]) for the
        azimuthal units.
    scale : float
        Internal value times ``scale`` gives the value in this unit.
    symbol : str
        Short unit symbol for labels and the HDF5 ``units`` attribute.
    label : str
        Axis label for plots and text headers.
    """

    name: str
    quantity: str
    scale: float
    symbol: str
    label: str

    @property
    def positive(self) -> bool:
        """Radial quantities are >= 0, so the lower bin edge is clamped to 0; chi is signed."""
        return self.quantity != "chi"


UNITS: dict[str, Unit] = {
    "q_nm^-1": Unit("q_nm^-1", "q", 1.0, "nm^-1", "q (nm^-1)"),
    "q_A^-1": Unit("q_A^-1", "q", 0.1, "A^-1", "q (A^-1)"),
    "2th_deg": Unit("2th_deg", "2th", 180.0 / math.pi, "deg", "2theta (deg)"),
    "2th_rad": Unit("2th_rad", "2th", 1.0, "rad", "2theta (rad)"),
    "r_mm": Unit("r_mm", "r", 1000.0, "mm", "r (mm)"),
    # d-spacing, bins uniform in d (pyFAI's d_nm, d_A). d falls as 2θ rises: the bins (and
    # outputs) run from small to large d, i.e. from the detector's edge towards the beam; the
    # pixel at the beam (q = 0) has an infinite d and is left out.
    "d_nm": Unit("d_nm", "d", 1e9, "nm", "d (nm)"),
    "d_A": Unit("d_A", "d", 1e10, "A", "d (A)"),
}


# Azimuthal units: for per-pixel chi arrays (Geometry.array), never a radial binning axis, so
# they are kept out of UNITS (which lists what --unit accepts).
AZIMUTHAL_UNITS: dict[str, Unit] = {
    "chi_deg": Unit("chi_deg", "chi", 180.0 / math.pi, "deg", "chi (deg)"),
    "chi_rad": Unit("chi_rad", "chi", 1.0, "rad", "chi (rad)"),
}


def get_unit(name: str | Unit, azimuthal: bool = False) -> Unit:
    """Return the :class:`Unit` called ``name``.

    Parameters
    ----------
    name : str or Unit
        A name from :data:`UNITS` (exact spelling, as pyFAI), or a :class:`Unit` (returned as is).
    azimuthal : bool
        Also accept the names of :data:`AZIMUTHAL_UNITS` (``"chi_deg"``, ``"chi_rad"``).

    Raises
    ------
    AzfilterError
        When the name is not one of :data:`UNITS` (or :data:`AZIMUTHAL_UNITS`).
    """
    if isinstance(name, Unit):
        return name
    known = {**UNITS, **AZIMUTHAL_UNITS} if azimuthal else UNITS
    try:
        return known[name]
    except (KeyError, TypeError):
        raise AzfilterError(
            f"unknown unit {name!r}; choose one of {', '.join(known)}"
        ) from None
