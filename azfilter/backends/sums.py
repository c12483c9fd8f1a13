"""BinSums: the per-bin sums every engine returns."""

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
    """

    signal: np.ndarray
    variance: np.ndarray
    normalization: np.ndarray
    normalization2: np.ndarray
    count: np.ndarray

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
