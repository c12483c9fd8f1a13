"""The text outputs' number rows (azfilter.output.text.format_rows) are Python's ``%.9e``,
character for character: every value a double can take, and the values where a shortcut
would round differently (near-ties, carries into an eleventh digit, powers of ten)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from azfilter.output.text import format_rows


def python_rows(table: np.ndarray) -> str:
    """What the writer wrote before format_rows: one %-format per number."""
    table = np.asarray(table, dtype=np.float64)
    line = " ".join(["%.9e"] * table.shape[1]) + "\n"
    return "".join(line % tuple(row) for row in table.tolist())


def check(values: np.ndarray, columns: int = 3) -> None:
    values = np.asarray(values, dtype=np.float64).ravel()
    table = values[: values.size // columns * columns].reshape(-1, columns)
    got, expected = format_rows(table), python_rows(table)
    if got != expected:
        for mine, theirs in zip(got.splitlines(), expected.splitlines(), strict=True):
            assert mine == theirs


def powers_of_ten(low: int = -330, high: int = 310) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.array([float(f"1e{e}") for e in range(low, high)])


def test_special_values():
    check(np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, -5e-324,
                    2.2250738585072014e-308, 1.7976931348623157e308, -1.7976931348623157e308,
                    1e-12, np.nextafter(1e-12, 0), 1e30, np.nextafter(1e30, 0), 1e31,
                    np.nextafter(1e31, 0), -1e30, 1.0, -1.0, 0.5, 1.5, 2.5]))


def test_powers_of_ten_and_their_neighbours():
    powers = powers_of_ten()
    check(np.concatenate([powers, -powers, np.nextafter(powers, 0), np.nextafter(powers, np.inf),
                          np.nextafter(np.nextafter(powers, 0), 0)]))


def test_near_ties_and_carries():
    rng = np.random.default_rng(7)
    exponents = 10.0 ** rng.integers(-20, 35, 6000)
    ties = (rng.integers(10**9, 10**10, 6000) + 0.5) * exponents / 1e9
    carries = 9.9999999995 * exponents
    ulps = np.concatenate([np.nextafter(ties, 0), np.nextafter(ties, np.inf),
                           np.nextafter(carries, 0), np.nextafter(carries, np.inf)])
    # exact binary ties: integers + 0.5 with ten digits before the point
    exact_ties = rng.integers(10**9, 10**10, 6000) + 0.5
    check(np.concatenate([ties, -ties, carries, ulps, exact_ties, exact_ties / 2**10]))


def test_wide_random_ranges():
    rng = np.random.default_rng(11)
    n = 60000
    check(np.concatenate([
        10.0 ** rng.uniform(-16, 36, n) * rng.choice([-1.0, 1.0], n),
        rng.uniform(0, 1e6, n),
        rng.standard_normal(n),
        rng.standard_normal(n).astype(np.float32).astype(np.float64),
        np.round(rng.uniform(0, 1e4, n), 3),
        rng.integers(0, 1 << 53, n).astype(np.float64),
        rng.integers(0, 1 << 62, n, dtype=np.int64).view(np.float64),  # any bit pattern
    ]))


def decimal_ties(count: int, seed: int = 5) -> list[float]:
    """Doubles nearest to a ten-digit decimal tie (d.ddddddddd5 x 10**e) for which a
    multiplication by 10**(9 - e) in floating point lands on the other side of the tie than
    the exact product: a formatter that rounds the scaled double gets the last digit wrong."""
    rng = random.Random(seed)
    found: list[float] = []
    while len(found) < count:
        digits, shift = rng.randrange(10**9, 10**10), rng.randrange(-20, 22)
        nearest = float(Fraction(2 * digits + 1, 2) / Fraction(10) ** shift)
        for x in (nearest, float(np.nextafter(nearest, 0)), float(np.nextafter(nearest, 1e300))):
            exact = Fraction(x) * Fraction(10) ** shift
            scaled = x * float(f"1e{shift}") if shift >= 0 else x / float(f"1e{-shift}")
            whole = exact.numerator // exact.denominator
            rest = exact - whole
            correct = whole + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and whole % 2))
            if np.rint(scaled) != correct:
                found.append(x)
    return found


def test_decimal_ties_where_the_scaled_double_rounds_the_wrong_way():
    ties = np.array(decimal_ties(300))
    check(np.concatenate([ties, -ties]))


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 40), st.integers(1, 4)),
                  elements=st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_any_doubles(table):
    assert format_rows(table) == python_rows(table)


def test_a_typical_profile_takes_the_plain_path():
    # positive radial, intensity, sigma (some 0): no padding bytes to drop
    radial = np.linspace(0.1, 40.0, 1000)
    intensity = np.random.default_rng(3).uniform(1, 1e5, 1000)
    table = np.column_stack([radial, intensity, np.sqrt(intensity)])
    table[:20, 2] = 0.0                       # bins of one pixel: sigma 0
    text = format_rows(table)
    assert text == python_rows(table)
    assert len(text) == 3 * 1000 * 16


def test_shapes():
    assert format_rows(np.empty((0, 3))) == ""
    assert format_rows([[1.0]]) == "1.000000000e+00\n"
    with pytest.raises(ValueError, match="2-D"):
        format_rows(np.ones(3))
