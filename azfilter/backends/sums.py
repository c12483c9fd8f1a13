"""BinSums: the per-bin sums every engine returns (and OutlierSums, the per-bin outlier
statistics of sigma_clip and medfilt)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BinSums:
    """Per-bin sums returned by an engine; every array is float64 of length ``npt``.

    Attributes
    ----------
    signal : numpy.ndarray
        ``S = Σ c·signal_j`` over the entries kept in the bin.
    variance : numpy.ndarray
        ``V``: ``Σ c²·var_j`` or, for the azimuthal model, the two-pass ``Σ ω²(x − S/W)²``.
    normalization : numpy.ndarray
        ``W = Σ c·norm_j``.
    normalization2 : numpy.ndarray
        ``W2 = Σ (c·norm_j)²``.
    count : numpy.ndarray
        ``N``: ``Σ c`` for integrate, the number of kept pixels (sigma_clip) or of selected
        fragments (medfilt).
    outliers : OutlierSums or None
        Per-bin outlier statistics (sigma_clip and medfilt); None for integrate.
    """

    signal: np.ndarray
    variance: np.ndarray
    normalization: np.ndarray
    normalization2: np.ndarray
    count: np.ndarray
    outliers: OutlierSums | None = None

    def __post_init__(self) -> None:
        for name in ("signal", "variance", "normalization", "normalization2", "count"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=np.float64))
        sizes = {getattr(self, name).shape for name in
                 ("signal", "variance", "normalization", "normalization2", "count")}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"BinSums arrays must be 1-D and of equal length, got {sizes}")

    @property
    def npt(self) -> int:
        """Number of bins."""
        return int(self.signal.shape[0])


@dataclass
class OutlierSums:
    """Per-bin outlier statistics of sigma_clip and medfilt; arrays of length ``npt``.

    Every engine computes them in one pass over the table's entries after the final sums:
    for a valid entry (pixel ``j`` with coefficient ``c``) of bin ``b``,
    ``z = (x_j − S_b/W_b) / sqrt(V_b/W2_b)`` with ``x_j = signal_j/norm_j``: the distance of
    the pixel from the bin's final mean (the output's ``I``) in the bin's final spread (the
    output's ``std``). ``z`` is NaN in a bin without kept entries (no mean), ±inf where the
    spread is 0 and ``x_j`` differs from the mean.

    Attributes
    ----------
    pick : float
        The threshold of :attr:`picked`, in units of the bin's spread.
    available : numpy.ndarray
        int64: valid entries of the bin before clipping or selection (not masked, not dummy,
        finite). Without splitting an entry is a pixel; with splitting a fragment.
    picked : numpy.ndarray
        int64: valid entries with ``z > pick`` (upward only), kept or not.
    rejected_sum : numpy.ndarray
        float64: ``Σ c·signal_j`` over the valid entries not kept (the units of ``S``).
    max_sigma : numpy.ndarray
        float64: the largest ``z`` of the bin, NaN ignored; NaN when every ``z`` is (no valid
        entry, or no kept one).
    """

    pick: float
    available: np.ndarray
    picked: np.ndarray
    rejected_sum: np.ndarray
    max_sigma: np.ndarray

    def __post_init__(self) -> None:
        self.pick = float(self.pick)
        self.available = np.ascontiguousarray(self.available, dtype=np.int64)
        self.picked = np.ascontiguousarray(self.picked, dtype=np.int64)
        self.rejected_sum = np.ascontiguousarray(self.rejected_sum, dtype=np.float64)
        self.max_sigma = np.ascontiguousarray(self.max_sigma, dtype=np.float64)
        sizes = {a.shape for a in (self.available, self.picked, self.rejected_sum,
                                   self.max_sigma)}
        if len(sizes) != 1 or len(next(iter(sizes))) != 1:
            raise ValueError(f"OutlierSums arrays must be 1-D and of equal length, got {sizes}")

    @classmethod
    def from_rows(cls, pick: float, rows: np.ndarray) -> OutlierSums:
        """From a ``(4, npt)`` array of rows available, picked, rejected_sum, max_sigma (the
        compiled engines' layout; the counts are exact in float64)."""
        return cls(pick, rows[0], rows[1], rows[2], rows[3])
