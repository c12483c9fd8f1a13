"""Synthetic diffraction frames with a known answer, generated in code.

A frame is a smooth powder profile ``I_true(q)`` (decaying background + Gaussian rings) times
the pixel's solid angle and polarization, Poisson-sampled, plus what the filters are for:
Bragg spots (small blocks of strong pixels), hot pixels, module gaps (-1) and dead pixels
(-2), as a Pilatus writes them (int32). Eiger frames are uint32 and flag both with the
all-ones value 2^32 - 1.

- :func:`synthetic_frame` returns the raw frame only;
- :func:`synthetic_case` returns it with its geometry, the noise-free expected counts and
  where the spots, hot and dead pixels are;
- :func:`true_profile` is ``I_true(q)``.

The default detector, ``SMALL`` (Pilatus 300K, 619x487 pixels, 3 modules), is quick; use
``"Pilatus1M"`` or ``"Eiger4M"`` for agreement tests at full size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from azfilter.detectors import Detector, get_detector
from azfilter.geometry import Geometry

#: the detector of the quick tests: real gaps and Dectris dummies, 0.3 Mpixel
SMALL = "Pilatus300k"

#: wavelength of every synthetic geometry (m)
WAVELENGTH = 1.0e-10

#: polarization factor the frames are made with (pass it to the Integrator to undo it)
POLARIZATION = 0.99

# Powder rings: position (nm^-1), amplitude (counts), Gaussian width (nm^-1).
RINGS = ((5.0, 150.0, 0.15), (9.0, 80.0, 0.15), (12.0, 120.0, 0.2), (16.0, 60.0, 0.2),
         (21.0, 50.0, 0.25), (27.0, 40.0, 0.25), (33.0, 30.0, 0.3))


def true_profile(q: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """``I_true(q)`` in counts per unit solid angle and polarization (q in nm^-1).

    ``scale·(20 + 200·exp(-q/8) + Σ rings)``.
    """
    q = np.asarray(q, dtype=np.float64)
    intensity = 20.0 + 200.0 * np.exp(-q / 8.0)
    for position, amplitude, width in RINGS:
        intensity = intensity + amplitude * np.exp(-0.5 * ((q - position) / width) ** 2)
    return scale * intensity


def as_detector(detector: str | Detector) -> Detector:
    """A :class:`Detector` from a name (``"small"`` means :data:`SMALL`) or as given."""
    if isinstance(detector, Detector):
        return detector
    return get_detector(SMALL if detector == "small" else detector)


def default_geometry(detector: str | Detector) -> Geometry:
    """A slightly tilted geometry with the beam near the detector centre at 1 Å.

    The distance is 0.6 times the larger detector side, so that the frame spans q from 0 to
    about 35 nm^-1 and every ring of :data:`RINGS` is (at least partly) on the detector.
    """
    detector = as_detector(detector)
    if detector.shape is None:
        raise ValueError("a generic detector needs a shape for a synthetic frame")
    height = detector.shape[0] * detector.pixel1
    width = detector.shape[1] * detector.pixel2
    return Geometry(dist=0.6 * max(height, width), poni1=0.45 * height, poni2=0.55 * width,
                    rot1=0.01, rot2=-0.007, rot3=0.0, wavelength=WAVELENGTH,
                    detector=detector)


@dataclass
class SyntheticCase:
    """A synthetic frame and everything known about it.

    Attributes
    ----------
    raw : numpy.ndarray
        The frame: int32 (uint32 for Eiger detectors).
    geometry : azfilter.geometry.Geometry
        The geometry it was made with.
    expected : numpy.ndarray
        float64 noise-free counts ``I_true(q)·solid_angle·polarization`` (0 in gaps).
    spots, hot, dead : numpy.ndarray
        bool masks of the Bragg-spot, hot and dead pixels.
    gaps : numpy.ndarray
        bool, the detector's gap mask.
    polarization : float
        The polarization factor used.
    scale : float
        The intensity scale used (see :func:`true_profile`).
    """

    raw: np.ndarray
    geometry: Geometry
    expected: np.ndarray
    spots: np.ndarray
    hot: np.ndarray
    dead: np.ndarray
    gaps: np.ndarray
    polarization: float
    scale: float

    @property
    def invalid(self) -> np.ndarray:
        """Pixels without a measurement: gaps and dead pixels."""
        return self.gaps | self.dead


def synthetic_case(detector: str | Detector | Geometry = SMALL, geometry: Geometry | None = None,
                   seed: int = 0, *, scale: float = 1.0, n_spots: int | None = None,
                   n_hot: int | None = None, n_dead: int | None = None,
                   spot_counts: tuple[float, float] = (500.0, 5000.0),
                   polarization: float = POLARIZATION) -> SyntheticCase:
    """Make a synthetic frame (see the module docstring).

    Parameters
    ----------
    detector : str, Detector or Geometry
        Detector name (``"small"`` = :data:`SMALL`) or a Detector with a shape; a Geometry
        here stands for ``geometry``.
    geometry : Geometry, optional
        Default :func:`default_geometry`; its detector wins over ``detector``.
    seed : int
        Seed of the random generator: the same seed gives the same frame.
    scale : float
        Multiplies the intensity profile (more counts, relatively less noise).
    n_spots, n_hot, n_dead : int, optional
        Number of Bragg spots (2x2 or 3x3 pixel blocks), hot pixels and dead pixels; by
        default one per 2000, 20000 and 10000 pixels.
    spot_counts : (float, float)
        Range of the counts added to each spot pixel.
    polarization : float
        Polarization factor of the beam.
    """
    if isinstance(detector, Geometry):
        geometry = detector
    if geometry is None:
        geometry = default_geometry(detector)
    detector = geometry.detector
    shape = tuple(detector.shape)
    n_pixels = shape[0] * shape[1]
    n_spots = n_pixels // 2000 if n_spots is None else n_spots
    n_hot = n_pixels // 20000 if n_hot is None else n_hot
    n_dead = n_pixels // 10000 if n_dead is None else n_dead
    rng = np.random.default_rng(seed)

    q = geometry.center_array("q")
    expected = true_profile(q, scale) * geometry.solid_angle() \
        * geometry.polarization(polarization)
    gaps = np.array(detector.mask, dtype=bool)
    expected[gaps] = 0.0
    counts = rng.poisson(expected).astype(np.int64)

    # Bragg spots: square blocks of strong pixels at random places, away from the edges
    spots = np.zeros(shape, dtype=bool)
    sizes = rng.integers(2, 4, n_spots)
    rows = rng.integers(0, shape[0] - 3, n_spots)
    cols = rng.integers(0, shape[1] - 3, n_spots)
    for size, row, col in zip(sizes, rows, cols, strict=True):
        block = (slice(row, row + size), slice(col, col + size))
        spots[block] = True
        counts[block] += rng.uniform(*spot_counts, (size, size)).astype(np.int64)
    spots &= ~gaps

    free = np.flatnonzero(~(gaps | spots).ravel())
    chosen = rng.choice(free, n_hot + n_dead, replace=False)
    hot = np.zeros(n_pixels, dtype=bool)
    hot[chosen[:n_hot]] = True
    dead = np.zeros(n_pixels, dtype=bool)
    dead[chosen[n_hot:]] = True
    hot, dead = hot.reshape(shape), dead.reshape(shape)
    counts[hot] = rng.integers(100_000, 1_000_000, n_hot)

    if detector.name.startswith("Eiger"):
        raw = counts.astype(np.uint32)
        raw[gaps | dead] = np.iinfo(np.uint32).max
    else:
        raw = counts.astype(np.int32)
        raw[gaps] = -1
        raw[dead] = -2
    return SyntheticCase(raw=raw, geometry=geometry, expected=expected, spots=spots, hot=hot,
                         dead=dead, gaps=gaps, polarization=polarization, scale=scale)


def synthetic_frame(detector: str | Detector | Geometry = SMALL, geometry: Geometry | None = None,
                    seed: int = 0, **options) -> np.ndarray:
    """The raw frame of :func:`synthetic_case` (same arguments)."""
    return synthetic_case(detector, geometry, seed, **options).raw


@dataclass
class Table:
    """The part of ``binning.CSR`` that engines read: a hand-made lookup table for tests."""

    indptr: np.ndarray
    indices: np.ndarray
    coefs: np.ndarray


def table(rows: list[list[int]], coefs: list[list[float]] | None = None) -> Table:
    """A CSR table from the pixel list of each bin (coefficients 1 unless given)."""
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    indices = np.array([p for r in rows for p in r], dtype=np.int32)
    if coefs is None:
        values = np.ones(indices.size, dtype=np.float32)
    else:
        values = np.array([c for r in coefs for c in r], dtype=np.float32)
    return Table(indptr, indices, values)
