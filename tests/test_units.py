"""The unit registry against pyFAI 2026.9's units."""

from __future__ import annotations

import pytest

from azfilter.errors import AzfilterError
from azfilter.units import AZIMUTHAL_UNITS, UNITS, Unit, get_unit

pyfai_units = pytest.importorskip("pyFAI.units")

# pyFAI's name of each internal quantity ("space")
SPACE = {"2th": "2th", "q": "q", "r": "r", "chi": "chi"}


def test_radial_units_are_the_documented_five():
    assert sorted(UNITS) == sorted(["q_nm^-1", "q_A^-1", "2th_deg", "2th_rad", "r_mm"])
    assert sorted(AZIMUTHAL_UNITS) == ["chi_deg", "chi_rad"]


@pytest.mark.parametrize("name", list(UNITS) + list(AZIMUTHAL_UNITS))
def test_unit_matches_pyfai(name):
    ours = get_unit(name, azimuthal=True)
    theirs = pyfai_units.to_unit(name)
    assert ours.name == name
    assert ours.scale == pytest.approx(theirs.scale, rel=1e-15)
    assert SPACE[ours.quantity] == theirs.space
    assert ours.positive == theirs.positive
    assert ours.symbol and ours.label


def test_get_unit_accepts_only_exact_names():
    assert get_unit("q_nm^-1") is UNITS["q_nm^-1"]
    unit = Unit("x", "q", 2.0, "x", "x")
    assert get_unit(unit) is unit
    # pyFAI rejects these spellings too
    for bad in ("q_A-1", "Q_NM^-1", "2theta", "", None):
        with pytest.raises(AzfilterError, match="unknown unit") as err:
            get_unit(bad)
        assert "q_nm^-1" in str(err.value) and "\n" not in str(err.value)
    for bad in ("q_A-1", "Q_NM^-1", "2theta"):
        assert bad not in pyfai_units.RADIAL_UNITS


def test_chi_units_are_not_radial_units():
    with pytest.raises(AzfilterError, match="unknown unit"):
        get_unit("chi_deg")
    assert get_unit("chi_deg", azimuthal=True).quantity == "chi"
    assert not get_unit("chi_rad", azimuthal=True).positive
    assert all(unit.positive for unit in UNITS.values())
