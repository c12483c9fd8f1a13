"""Per-frame monitor normalisation (``--monitor KEY``): each frame's result is divided by a
counter recorded with it, as pyFAI-integrate's ``--monitor-name`` does.

Where the value comes from:

- a header key of the frame's file (EDF/CBF/TIFF headers: ``--monitor I0``);
- a dataset of one value per frame in each HDF5 input (``--monitor /entry/instrument/i0/data``),
  indexed by the frame's index in its stack;
- one dataset for every input (``--monitor counters.h5::/i0``), indexed the same way.

A frame whose monitor is missing, not a number, zero or not finite is a failed frame, named.
Dividing the result (not the pixels) keeps the Poisson variances of the raw counts and
which pixels sigma-clipping rejects; the sums are scaled with it, so that outputs stay
self-consistent (``I = sum_signal / sum_normalization``).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any

import numpy as np

from ..errors import FrameReadError


class MonitorReader:
    """Looks up the monitor value of each frame for one job.

    Parameters
    ----------
    spec : str
        A header key, ``/path/in/each/input.h5``, or ``file.h5::/path``.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self._datasets: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.file_spec, _, path = spec.partition("::")
        if path:
            self.dataset_path: str | None = path
        elif spec.startswith("/"):
            self.file_spec, self.dataset_path = "", spec
        else:
            self.file_spec, self.dataset_path = "", None

    def _values(self, filename: str) -> np.ndarray:
        with self._lock:
            values = self._datasets.get(filename)
            if values is None:
                import h5py

                try:
                    # as the frame readers open it (no HDF5 file locking: read-only, and a
                    # file being written by the detector stays readable)
                    with h5py.File(filename, "r", locking=False) as h5:
                        values = np.asarray(h5[self.dataset_path][()], dtype=np.float64).ravel()
                except (OSError, KeyError, TypeError, ValueError) as err:
                    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                    raise FrameReadError(filename, None, f"monitor {self.dataset_path}: "
                                         f"cannot read: {reason}") from None
                self._datasets[filename] = values
        return values

    def value(self, frame: Any) -> float:
        """The monitor of ``frame`` (an :class:`azfilter.frames.Frame`).

        Raises
        ------
        FrameReadError
            When it is missing, not a number, zero or not finite.
        """
        source_file = frame.source.split("::", 1)[0]
        if self.dataset_path is not None:
            filename = self.file_spec or source_file
            values = self._values(filename)
            if frame.index >= values.size:
                raise FrameReadError(frame.source, frame.index,
                                     f"monitor {self.spec}: no value for this frame "
                                     f"({values.size} values)")
            value = float(values[frame.index])
        else:
            header = frame.header or {}
            raw = header.get(self.spec)
            if raw is None:
                raise FrameReadError(frame.source, frame.index,
                                     f"monitor {self.spec!r} is not in the header")
            try:
                value = float(str(raw).split()[0]) if isinstance(raw, (str, bytes)) \
                    else float(raw)
            except (ValueError, IndexError, TypeError):
                raise FrameReadError(frame.source, frame.index,
                                     f"monitor {self.spec!r} is not a number: {raw!r}") from None
        if value == 0 or not math.isfinite(value):
            raise FrameReadError(frame.source, frame.index,
                                 f"monitor {self.spec!r} is {value}: cannot divide by it")
        return value


def divide_by_monitor(result: Any, monitor: float) -> Any:
    """``result`` with intensities, errors, spread and signal sums divided by ``monitor``
    (variances by its square); counts and normalization sums unchanged."""
    return dataclasses.replace(
        result,
        intensity=result.intensity / monitor, sigma=result.sigma / abs(monitor),
        std=result.std / abs(monitor), sum_signal=result.sum_signal / monitor,
        sum_variance=result.sum_variance / (monitor * monitor),
        parameters=dict(result.parameters, monitor=monitor),
    )
