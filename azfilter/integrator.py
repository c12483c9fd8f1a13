"""The Integrator: one geometry and set of options, applied to any number of frames.

It is the glue between the pieces: it builds the per-geometry constants (:mod:`.preproc`),
the radial lookup tables (:func:`azfilter.binning.build_csr`, cached on disk) lazily for each
pixel-splitting mode, one engine per table (reused across frames), and turns the engine's
per-bin sums into a :class:`Result`.

With ``sectors`` the tables bin (sector, radial) cells, so one pass over a frame reduces every
χ sector; the engines see only more bins, and the Result's arrays take the shape
``(n_sectors, npt)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import vocabulary
from .backends import BACKENDS, BinSums, FrameBufferRing, get_engine_class, parse_error_model
from .backends.base import DEFAULT_PICK
from .errors import AzfilterError
from .frames.chunks import CompressedChunk
from .outliers import Outliers
from .preproc import PixelConstants, describe_source, parse_polarization, pixel_constants
from .units import get_unit

if TYPE_CHECKING:
    from .backends.opencl.multi import DeviceRings

#: pixel-splitting modes: none (each pixel in the bin of its centre) or exact area splitting
SPLITS: tuple[str, ...] = vocabulary.SPLITS

#: the three operations, as recorded in :attr:`Result.operation` (method names)
OPERATIONS: tuple[str, ...] = vocabulary.METHODS


@dataclass
class Result:
    """A reduced 1-D pattern and the sums it came from, or one per χ sector.

    Without sectors every per-bin array has shape ``(npt,)``; with sectors it has shape
    ``(n_sectors, npt)`` (row ``s`` is sector ``s``) while ``radial`` stays ``(npt,)``: every
    sector has the same radial bins. :meth:`sector` gives one sector as a plain 1-D Result.

    Attributes
    ----------
    radial : numpy.ndarray
        Bin centres in ``unit``, ``(npt,)``.
    intensity : numpy.ndarray
        ``S/W``: the (filtered) mean corrected intensity of each bin; NaN for empty bins.
    sigma : numpy.ndarray
        ``sqrt(V)/W``: standard error of ``intensity``; NaN for empty bins.
    std : numpy.ndarray
        ``sqrt(V/W2)``: spread of the pixels of the ring; NaN for empty bins.
    count : numpy.ndarray
        Pixels (sum of coefficients with splitting) kept in each bin; 0 for empty bins.
    sum_signal, sum_variance, sum_normalization, sum_normalization2 : numpy.ndarray
        The engine's sums S, V, W, W2.
    unit : str
        Name of the radial unit (``"q_nm^-1"``...).
    operation : str
        ``"integrate"``, ``"sigma_clip"`` or ``"medfilt"``.
    parameters : dict
        Every option that produced this result (JSON-serialisable).
    error_model : str
        The error model used.
    sectors : numpy.ndarray or None
        ``(n_sectors, 2)``: each sector's χ range ``(lo, hi)`` in degrees, ``lo < hi`` (a
        sector across ±180° has ``hi > 180``); None without sectors.
    geometry : azfilter.geometry.Geometry or None
        The geometry it was reduced with (for :meth:`save`'s header).
    outliers : azfilter.outliers.Outliers or None
        Outlier statistics of sigma_clip and medfilt (pixels rejected, their summed signal,
        pixels above ``pick`` σ of their ring, the largest excess, per-bin kept and
        available); None for integrate.

    Notes
    -----
    As pyFAI's ``Integrate1dResult``, a Result unpacks into its three columns:
    ``radial, intensity, sigma = result`` (with sectors, ``intensity`` and ``sigma`` are
    ``(n_sectors, npt)``).
    """

    radial: np.ndarray
    intensity: np.ndarray
    sigma: np.ndarray
    std: np.ndarray
    count: np.ndarray
    sum_signal: np.ndarray
    sum_variance: np.ndarray
    sum_normalization: np.ndarray
    sum_normalization2: np.ndarray
    unit: str
    operation: str
    parameters: dict[str, Any] = field(default_factory=dict)
    error_model: str = "poisson"
    sectors: np.ndarray | None = None
    geometry: Any = field(default=None, repr=False, compare=False)
    outliers: Outliers | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_sums(cls, radial: np.ndarray, sums: BinSums, unit: str, operation: str,
                  parameters: dict[str, Any], error_model: str,
                  sectors: Sequence[Sequence[float]] | None = None,
                  geometry: Any = None) -> Result:
        """Final values per bin: ``I = S/W``, ``sigma = sqrt(V)/W``, ``std = sqrt(V/W2)``.

        Bins with a count of 0 get NaN for all three. With ``sectors`` (``(lo, hi)`` degrees
        each) the sums are ``n_sectors * npt`` long, sector after sector, and every array is
        reshaped to ``(n_sectors, npt)``.
        """
        count = np.array(sums.count, dtype=np.float64)
        empty = ~(count > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            intensity = sums.signal / sums.normalization
            sigma = np.sqrt(sums.variance) / sums.normalization
            std = np.sqrt(sums.variance / sums.normalization2)
        for values in (intensity, sigma, std):
            values[empty] = np.nan
        count[empty] = 0.0
        per_bin = {
            "intensity": intensity, "sigma": sigma, "std": std, "count": count,
            "sum_signal": sums.signal.copy(), "sum_variance": sums.variance.copy(),
            "sum_normalization": sums.normalization.copy(),
            "sum_normalization2": sums.normalization2.copy(),
        }
        bounds = None
        if sectors is not None:
            bounds = np.array(sectors, dtype=np.float64).reshape(-1, 2)
            shape = (bounds.shape[0], int(np.shape(radial)[0]))
            if sums.npt != shape[0] * shape[1]:
                raise ValueError(f"{sums.npt} bins are not {shape[0]} sectors of "
                                 f"{shape[1]} radial bins")
            per_bin = {name: values.reshape(shape) for name, values in per_bin.items()}
        outliers = None
        if sums.outliers is not None:
            outliers = Outliers.from_sums(sums.outliers, per_bin["count"],
                                          per_bin["count"].shape)
        return cls(
            radial=np.array(radial, dtype=np.float64), **per_bin, unit=unit,
            operation=operation, parameters=parameters, error_model=error_model,
            sectors=bounds, geometry=geometry, outliers=outliers,
        )

    @property
    def npt(self) -> int:
        """Number of radial bins."""
        return int(self.radial.shape[0])

    def __iter__(self) -> Iterator[np.ndarray]:
        """``radial, intensity, sigma = result``, as pyFAI's ``Integrate1dResult``."""
        return iter((self.radial, self.intensity, self.sigma))

    def __repr__(self) -> str:
        """One short line: operation, unit, bins, range and a few statistics."""
        filled = np.isfinite(self.intensity)
        if self.npt:
            span = f"[{self.radial[0]:.6g}, {self.radial[-1]:.6g}]"
        else:
            span = "[]"
        if filled.any():
            values = self.intensity[filled]
            stats = (f"I mean={values.mean():.4g} min={values.min():.4g} "
                     f"max={values.max():.4g}")
        else:
            stats = "I: no filled bin"
        sectors = "" if self.sectors is None else f" sectors={self.sectors.shape[0]}"
        return (f"<Result {self.operation} {self.unit} npt={self.npt}{sectors} range={span} "
                f"{stats} empty={int(filled.size - filled.sum())} "
                f"error_model={self.error_model}>")

    def save(self, path: str | os.PathLike) -> None:
        """Write the pattern as azfilter's text output (``radial intensity sigma`` columns).

        The header holds the operation, every parameter and, when known, the geometry (PONI
        lines), as the command line's text outputs; ``numpy.loadtxt(path)`` reads the
        columns. The file appears atomically.

        Parameters
        ----------
        path : str or os.PathLike
            A text file (``.dat``, ``.xy``, ``.txt`` or any other name but an HDF5 one).

        Raises
        ------
        AzfilterError
            For an HDF5 name (the NeXus output is the command line's), a result with sectors
            (save each sector: ``result.sector(k).save(...)``), or a file that cannot be
            written.
        """
        from .output import OutputMeta, geometry_lines, write_text
        from .poni import format_poni
        from .vocabulary import HDF5_SUFFIXES

        target = os.fspath(path)
        if self.sectors is not None:
            raise AzfilterError(
                f"{target}: a result of {self.sectors.shape[0]} sectors is one text file per "
                "sector: result.sector(k).save(path)"
            )
        if target.lower().endswith(HDF5_SUFFIXES):
            raise AzfilterError(
                f"{target}: Result.save writes text (.dat, .xy, .txt); NeXus files are "
                "written by the command line (azfilter integrate ... -o out.h5)"
            )
        geometry = self.geometry
        meta = OutputMeta(
            # the command line's spelling (sigma-clip), so both outputs say the same
            operation=self.operation.replace("_", "-"), unit=self.unit,
            # the operation has its own header line
            parameters={k: v for k, v in self.parameters.items() if k != "operation"},
            poni_text="" if geometry is None else format_poni(geometry),
            geometry=[] if geometry is None else geometry_lines(geometry),
            config=dict(self.parameters),
        )
        try:
            write_text(target, self, meta, source=None, index=None, nframes=None)
        except OSError as err:
            raise AzfilterError(f"cannot write {target}: {err.strerror or err}") from None

    @property
    def n_sectors(self) -> int | None:
        """Number of χ sectors; None for a result without sectors (1-D arrays)."""
        return None if self.sectors is None else int(self.sectors.shape[0])

    @property
    def chi(self) -> np.ndarray | None:
        """Centre of each sector, ``(lo + hi) / 2`` in degrees; None without sectors."""
        return None if self.sectors is None else self.sectors.mean(axis=1)

    def sector(self, index: int) -> Result:
        """Sector ``index`` as a plain 1-D Result (arrays of shape ``(npt,)``, copies).

        Its ``parameters`` add ``sector`` (the index) and ``sector_range`` (``[lo, hi]``,
        degrees) to those of the whole result.

        Raises
        ------
        ValueError
            For a result without sectors.
        IndexError
            For an index outside ``-n_sectors .. n_sectors - 1``.
        """
        if self.sectors is None:
            raise ValueError("this result has no sectors")
        n_sectors = self.sectors.shape[0]
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) \
                or not -n_sectors <= index < n_sectors:
            raise IndexError(f"sector index {index!r} out of range for {n_sectors} sectors")
        index = int(index) % n_sectors
        lo, hi = (float(v) for v in self.sectors[index])
        per_bin = {name: np.array(getattr(self, name)[index]) for name in _PER_BIN_FIELDS}
        return Result(
            radial=self.radial.copy(), **per_bin, unit=self.unit, operation=self.operation,
            parameters={**self.parameters, "sector": index, "sector_range": [lo, hi]},
            error_model=self.error_model, geometry=self.geometry,
            outliers=None if self.outliers is None else self.outliers.sector(index),
        )


#: the per-bin arrays of a Result (shape (npt,), or (n_sectors, npt) with sectors)
_PER_BIN_FIELDS = ("intensity", "sigma", "std", "count", "sum_signal", "sum_variance",
                   "sum_normalization", "sum_normalization2")


class Integrator:
    """Azimuthal integration, sigma-clipping and median filtering with one set of options.

    Parameters
    ----------
    geometry : azfilter.geometry.Geometry, path or pyFAI AzimuthalIntegrator
        Detector position and detector: a Geometry (``azfilter.load_poni``), the path of a
        PONI file, or a pyFAI ``AzimuthalIntegrator`` (its dist, poni1, poni2, rot1-3,
        wavelength and detector are read; pyFAI itself is not needed).
    npt : int
        Number of radial bins.
    unit : str
        Radial unit: ``"q_nm^-1"``, ``"q_A^-1"``, ``"2th_deg"``, ``"2th_rad"``, ``"r_mm"``.
    backend : str
        ``"python"`` (numpy reference), ``"cython"`` (default) or ``"opencl"``.
    device : str or list of str, optional
        OpenCL device: ``"gpu"``, ``"cpu"`` or ``"P:D"``; or several, to spread frames over
        them (``"0:0,0:1"``, ``["0:0", "0:1"]``, ``"all"``: every GPU), one engine each.
    mask : array or path, optional
        User mask, non-zero = masked; OR-ed with the detector's gap mask.
    dark, flat : array or path, optional
        Dark current subtracted from the raw values; flat field the signal is divided by
        (pixels with a non-positive or non-finite flat are masked).
    polarization : None, float or (float, float)
        Polarization factor in [-1, 1], optionally with the axis offset (rad).
    solid_angle : bool
        Correct for the relative solid angle of each pixel.
    radial_range : (float, float), optional
        Radial bin range in ``unit``; default: the extent of the unmasked pixels.
    azimuth_range : (float, float), optional
        Azimuthal range in degrees (``(170, -170)`` crosses ±180°).
    normalization : float
        Positive constant (monitor) the intensities are divided by.
    threads : int, optional
        Threads of the compiled engines (default: all cores).
    pixel_mask : array or path, optional
        Eiger ``pixel_mask`` (non-zero = bad), OR-ed with the other masks.
    sectors : None, int or list of (float, float)
        χ sectors reduced in one pass: ``N`` equal sectors spanning ``azimuth_range``
        (default the full circle, −180°..180°), or explicit ``(lo, hi)`` ranges in degrees
        (each read as an azimuth range: ``hi <= lo`` crosses ±180°; ranges may overlap or
        leave gaps; not together with ``azimuth_range``). Every sector has the same ``npt``
        radial bins over the same radial range, and results have per-bin arrays of shape
        ``(n_sectors, npt)``. Without splitting, sector ``s`` holds exactly the pixels that
        ``azimuth_range=sectors[s]`` selects (a pixel in two overlapping sectors counts in
        both, and sigma-clipping judges it in each separately); full splitting also cuts
        pixels by area at the sectors' edges.

    Raises
    ------
    AzfilterError
        For any option a user got wrong, or a backend that is not available here.
    """

    def __init__(self, geometry: Any, npt: int = 1000, unit: str = "q_nm^-1",
                 backend: str = "cython", device: str | None = None, mask: Any = None,
                 dark: Any = None, flat: Any = None, polarization: Any = None,
                 solid_angle: bool = True, radial_range: Sequence[float] | None = None,
                 azimuth_range: Sequence[float] | None = None, normalization: float = 1.0,
                 threads: int | None = None, pixel_mask: Any = None, sectors: Any = None):
        self.geometry = as_geometry(geometry)
        self.npt = _check_positive_int(npt, "npt")
        self.unit = get_unit(unit).name
        backend_name = backend.strip().lower() if isinstance(backend, str) else backend
        self._engine_class = get_engine_class(backend_name)
        self.backend = str(backend_name)
        try:
            device_tokens = vocabulary.parse_device_spec(device, "device")
        except ValueError as err:
            raise AzfilterError(str(err)) from None
        #: the device tokens joined by commas ("0:0,0:1"), None for the default device
        self.device = None if device_tokens is None else ",".join(device_tokens)
        self._several_devices = (self.backend == "opencl"
                                 and vocabulary.names_several_devices(device_tokens))
        self.threads = None if threads is None else _check_positive_int(threads, "threads")
        self.mask, self.dark, self.flat, self.pixel_mask = mask, dark, flat, pixel_mask
        self.polarization = parse_polarization(polarization)
        self.solid_angle = bool(solid_angle)
        self.radial_range = _check_range(radial_range, "radial_range")
        self.azimuth_range = _check_range(azimuth_range, "azimuth_range", ordered=False)
        self.sectors_option, self.sectors = _check_sectors(sectors, self.azimuth_range)
        try:
            self.normalization = float(normalization)
        except (TypeError, ValueError):
            self.normalization = math.nan
        if not (math.isfinite(self.normalization) and self.normalization > 0):
            raise AzfilterError(f"normalization must be a positive number, got {normalization!r}")
        self._constants: PixelConstants | None = None
        self._tables: dict[str, Any] = {}
        self._engines: dict[tuple, Any] = {}
        if self.geometry.detector.shape is not None:
            # read mask/dark/flat files now, so that a bad file fails before any frame
            self._prepare()

    # ------------------------------------------------------------------ configuration
    def config(self) -> dict[str, Any]:
        """The Integrator's settings as a JSON-serialisable dict (constructor argument names).

        Arrays given for mask, dark, flat or pixel_mask are recorded as ``"array"``, files by
        their path. ``sectors`` is there only when sectors were asked for, as given (a count,
        or the list of ``[lo, hi]`` ranges).
        """
        return {
            "npt": self.npt,
            "unit": self.unit,
            "backend": self.backend,
            "device": self.device,
            "mask": describe_source(self.mask),
            "dark": describe_source(self.dark),
            "flat": describe_source(self.flat),
            "pixel_mask": describe_source(self.pixel_mask),
            "polarization": None if self.polarization is None else list(self.polarization),
            "solid_angle": self.solid_angle,
            "radial_range": None if self.radial_range is None else list(self.radial_range),
            "azimuth_range": None if self.azimuth_range is None else list(self.azimuth_range),
            "normalization": self.normalization,
            "threads": self.threads,
            **({} if self.sectors_option is None else {"sectors": self.sectors_option}),
        }

    @property
    def n_sectors(self) -> int | None:
        """Number of χ sectors; None without sectors."""
        return None if self.sectors is None else len(self.sectors)

    @property
    def chi(self) -> np.ndarray | None:
        """Centre of each sector in degrees; None without sectors."""
        if self.sectors is None:
            return None
        return np.array(self.sectors, dtype=np.float64).mean(axis=1)

    @property
    def shape(self) -> tuple[int, int] | None:
        """Detector shape (None for a generic detector before the first image)."""
        shape = self.geometry.detector.shape
        return None if shape is None else (int(shape[0]), int(shape[1]))

    @property
    def constants(self) -> PixelConstants:
        """The per-geometry arrays (static mask, pixel normalisation, dark)."""
        if self._constants is None:
            self._prepare()
        assert self._constants is not None
        return self._constants

    def _prepare(self) -> None:
        self._constants = pixel_constants(
            self.geometry, mask=self.mask, dark=self.dark, flat=self.flat,
            polarization=self.polarization, solid_angle=self.solid_angle,
            normalization=self.normalization, pixel_mask=self.pixel_mask,
        )

    def table_cached(self, split: str = "no") -> bool:
        """Whether the ``split`` lookup table is loaded or in the disk cache (nothing built)."""
        split = _check_split(split)
        return split in self._tables or bool(self._build_table(split, only_if_cached=True))

    def table(self, split: str = "no"):
        """The CSR lookup table for ``split`` (built, or read from the disk cache, once).

        With sectors its rows are the (sector, radial) cells, row ``s * npt + b``.
        """
        split = _check_split(split)
        if split not in self._tables:
            self._tables[split] = self._build_table(split)
        return self._tables[split]

    def _build_table(self, split: str, only_if_cached: bool = False):
        from .binning import build_csr  # lazily: only needed once a frame comes

        return build_csr(
            self.geometry, self.unit, self.npt, split, self.constants.static_mask,
            radial_range=self.radial_range,
            azimuth_range=None if self.sectors is not None else self.azimuth_range,
            sectors=self.sectors, only_if_cached=only_if_cached,
        )

    def engine(self, split: str = "no", dtype: Any = np.float64):
        """The engine working on the ``split`` table for frames of ``dtype`` (kept for reuse).

        The dtype matters because the dummy value of an unsigned frame differs
        (:meth:`azfilter.detectors.Detector.dummy_for`).
        """
        return self._engine_for(_check_split(split),
                                *self.geometry.detector.dummy_for(np.dtype(dtype)))

    @property
    def several_devices(self) -> bool:
        """Whether this OpenCL Integrator spreads its frames over several devices."""
        return self._several_devices

    def use_one_device(self, device: str) -> None:
        """Run on ``device`` alone (``"P:D"``) from now on: a worker process of a job that
        spreads its frames over several devices, one process per device (before any engine
        of this Integrator starts)."""
        if self._engines:
            raise RuntimeError("use_one_device after an engine started")
        self.device = device
        self._several_devices = False

    def _engine_for(self, split: str, dummy: float | None, delta_dummy: float):
        """The engine of ``split`` for frames whose dummy value is ``dummy`` (kept)."""
        key = (split, dummy, delta_dummy)
        if key not in self._engines:
            constants = self.constants
            engine_class = self._engine_class
            if self._several_devices:   # one OpenCL engine per device, frames spread over them
                from .backends.opencl.multi import open_engine as engine_class
            self._engines[key] = engine_class(
                self.table(split), constants.pixel_norm, constants.dark, dummy, delta_dummy,
                threads=self.threads, device=self.device,
            )
        return self._engines[key]

    def frame_buffer(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """An uninitialised frame array that this Integrator's engine reads fastest.

        For the OpenCL backend it is page-locked host memory of the device (a frame decoded
        into it goes to a discrete GPU by DMA, with no host-side copy); for the other
        backends a plain :func:`numpy.empty`. Allocating page-locked memory is slow: readers
        should keep a few such buffers and reuse them.

        Parameters
        ----------
        shape : tuple of int
        dtype : numpy dtype

        Returns
        -------
        numpy.ndarray
            C-contiguous, of ``shape`` and ``dtype``.
        """
        if self._several_devices:   # page-locked memory of the first device named
            from .backends.opencl.multi import MultiDeviceEngine

            return MultiDeviceEngine.host_array(tuple(shape), dtype, device=self.device)
        host_array = getattr(self._engine_class, "host_array", None)
        if host_array is None:
            return np.empty(tuple(shape), dtype=dtype)
        return host_array(tuple(shape), dtype, device=self.device)

    def frame_buffers(self, capacity: int) -> FrameBufferRing | DeviceRings:
        """A bounded ring of reusable frame buffers that this Integrator's engine reads fastest.

        Page-locked memory of the device for the OpenCL backend, plain numpy memory
        otherwise (see :class:`azfilter.backends.FrameBufferRing`). With several OpenCL
        devices, one ring per device (:class:`azfilter.backends.opencl.multi.DeviceRings`):
        ``capacity`` shared among them, plus the frames each device holds.

        Parameters
        ----------
        capacity : int
            Most buffers alive at once (with several devices: buffers for the read-ahead).

        Returns
        -------
        FrameBufferRing or DeviceRings
        """
        if self._several_devices:
            from .backends.opencl.multi import device_rings

            return device_rings(capacity, self.device)
        return FrameBufferRing(capacity, self.frame_buffer)

    # ------------------------------------------------------------------ checks
    def _check_image(self, img: Any, what: str = "image") -> np.ndarray:
        """The frame as an array of the detector's shape (fixing a generic detector's shape).

        A :class:`~azfilter.frames.chunks.CompressedChunk` (a frame still compressed) passes
        as it is when the engine decodes chunks itself (the OpenCL engine).
        """
        if isinstance(img, CompressedChunk):
            if not getattr(self._engine_class, "decodes_chunks", False):
                raise AzfilterError(f"{what} is a compressed chunk, which the "
                                    f"{self.backend} engine cannot decode (device decoding "
                                    "needs the opencl backend)")
            array = img
        else:
            array = np.asarray(img)
        if array.ndim != 2:
            raise AzfilterError(f"{what} must be 2-D, got shape {tuple(array.shape)}")
        if array.dtype.kind not in "biuf":
            raise AzfilterError(f"{what} has unsupported dtype {array.dtype}")
        shape = tuple(int(n) for n in array.shape)
        detector = self.geometry.detector
        if detector.shape is None:
            self.geometry = dataclasses.replace(self.geometry,
                                                detector=detector.with_shape(shape))
            self._prepare()
        elif shape != self.shape:
            raise AzfilterError(
                f"{what} shape {shape} does not match detector {detector.name} shape "
                f"{self.shape}"
            )
        return array

    def _check_variance(self, variance: Any, error_model: str) -> np.ndarray | None:
        if error_model == "variance" and variance is None:
            raise AzfilterError("error model 'variance' needs a variance array (variance=...)")
        if variance is None:
            return None
        if error_model != "variance":
            raise AzfilterError(
                f"a variance array was given but the error model is {error_model!r}; "
                "use error_model='variance'"
            )
        array = np.asarray(variance, dtype=np.float64)
        if tuple(array.shape) != self.shape:
            raise AzfilterError(
                f"variance shape {tuple(array.shape)} does not match detector "
                f"{self.geometry.detector.name} shape {self.shape}"
            )
        return array

    def _result(self, sums: BinSums, split: str, operation: str, error_model: str,
                **options: Any) -> Result:
        table = self.table(split)
        parameters = {"operation": operation, **self.config(), "split": split,
                      "error_model": error_model, **options,
                      "detector": self.geometry.detector.name}
        return Result.from_sums(table.radial, sums, self.unit, operation, parameters,
                                error_model, sectors=table.sectors, geometry=self.geometry)

    # ------------------------------------------------------------------ operations
    def integrate(self, img: Any, error_model: str = "poisson", split: str = "no",
                  variance: Any = None) -> Result:
        """Mean corrected intensity per radial bin (no outlier rejection).

        Parameters
        ----------
        img : 2-D array
            Raw frame of the detector's shape, in its own dtype.
        error_model : str
            ``"poisson"`` (variance = max(raw, 1)), ``"azimuthal"`` (scatter in the ring),
            ``"hybrid"`` (as poisson here) or ``"variance"`` (with ``variance``).
        split : str
            ``"no"`` or ``"full"`` pixel splitting.
        variance : 2-D array, optional
            Per-pixel variance for the ``"variance"`` model.

        Returns
        -------
        Result
        """
        model = parse_error_model(error_model)
        split = _check_split(split)
        array = self._check_image(img)
        var = self._check_variance(variance, model)
        sums = self.engine(split, array.dtype).integrate(array, model, var)
        return self._result(sums, split, "integrate", model)

    def sigma_clip(self, img: Any, thres: float = 5.0, max_iter: int = 5,
                   error_model: str = "azimuthal", variance: Any = None,
                   split: str = "no", pick: float = DEFAULT_PICK) -> Result:
        """Iterative azimuthal sigma-clipping (no pixel splitting).

        Parameters
        ----------
        img : 2-D array
            Raw frame.
        thres : float
            Rejection threshold in standard deviations (the Chauvenet cutoff takes over when
            it is larger; ``thres=0`` is pure Chauvenet).
        max_iter : int
            Maximum number of rejection passes.
        error_model : str
            ``"azimuthal"`` (default), ``"hybrid"`` (clip azimuthal, report Poisson),
            ``"poisson"`` or ``"variance"``.
        variance : 2-D array, optional
            Per-pixel variance for the ``"variance"`` model.
        split : str
            Must be ``"no"``: a pixel shared between bins cannot be rejected in one only.
        pick : float
            Threshold of ``result.outliers.picked``: pixels more than ``pick`` std above their
            ring's mean.

        Returns
        -------
        Result
            With :attr:`Result.outliers`.
        """
        if split != "no":
            raise AzfilterError(
                f"sigma_clip is no-split only (each pixel must belong to one ring), got "
                f"split={split!r}"
            )
        model = parse_error_model(error_model)
        thres = _check_number(thres, "thres", minimum=0.0)
        max_iter = _check_count(max_iter, "max_iter")
        pick = _check_number(pick, "pick")
        array = self._check_image(img)
        var = self._check_variance(variance, model)
        sums = self.engine("no", array.dtype).sigma_clip(array, thres, max_iter, model, var,
                                                         pick=pick)
        return self._result(sums, "no", "sigma_clip", model, thres=thres, max_iter=max_iter,
                            pick=pick)

    def medfilt(self, img: Any, percentile: float | Sequence[float] = 50,
                split: str = "full", error_model: str = "poisson",
                variance: Any = None, pick: float = DEFAULT_PICK) -> Result:
        """Mean of the pixel fragments between two quantiles of each ring.

        Parameters
        ----------
        img : 2-D array
            Raw frame.
        percentile : float or (float, float)
            In 0-100. A scalar ``p`` selects the fragment at the weighted ``p``-th percentile
            (50 is the median); ``(lo, hi)`` averages the fragments between the two.
        split : str
            ``"full"`` (default) or ``"no"`` pixel splitting.
        error_model : str
            ``"poisson"``, ``"hybrid"`` (as poisson), ``"azimuthal"`` or ``"variance"``.
        variance : 2-D array, optional
            Per-pixel variance for the ``"variance"`` model.
        pick : float
            Threshold of ``result.outliers.picked``, in std of the ring (fragments with
            ``split="full"``).

        Returns
        -------
        Result
            With :attr:`Result.outliers` (the selected fragments are the kept ones).
        """
        model = parse_error_model(error_model)
        split = _check_split(split)
        low, high = _check_percentile(percentile)
        pick = _check_number(pick, "pick")
        array = self._check_image(img)
        var = self._check_variance(variance, model)
        sums = self.engine(split, array.dtype).medfilt(array, low / 100.0, high / 100.0,
                                                       model, var, pick=pick)
        return self._result(sums, split, "medfilt", model, percentile=[low, high], pick=pick)

    def process_many(self, frames: Iterable[tuple[Any, Any]], operation: str,
                     **params: Any) -> Iterator[tuple[Any, Result | Exception]]:
        """Run one operation over a stream of tagged frames through the engine's stream.

        The options are checked once, before the first frame; each frame is then checked
        (shape, dtype) and reduced by :meth:`azfilter.backends.Engine.process_many`, which
        overlaps transfers and kernels on the OpenCL backend.

        Parameters
        ----------
        frames : iterable of (tag, 2-D array)
            Raw frames of the detector's shape, each with a tag of the caller's.
        operation : str
            ``"integrate"``, ``"sigma_clip"`` or ``"medfilt"``.
        **params
            The keyword arguments of that method besides ``img`` (``error_model``,
            ``split``, ``variance``, ``thres``, ``max_iter``, ``percentile``, ``pick``), with
            the same defaults.

        Returns
        -------
        iterator of (tag, Result or Exception)
            One item per frame, in input order; a frame that fails (wrong shape or dtype, an
            engine error) gives ``(tag, exception)`` and the stream goes on.

        Raises
        ------
        AzfilterError
            At once, for an unknown operation or an invalid option.
        """
        split, engine_params, options, model = self._stream_options(operation, params)
        return self._stream(frames, operation, split, engine_params, options, model)

    def _stream_options(self, operation: str,
                        params: dict[str, Any]) -> tuple[str, dict, dict, str]:
        """(split, engine parameters, options recorded in the results, error model)."""
        if operation not in OPERATIONS:
            raise AzfilterError(f"unknown operation {operation!r}; choose one of "
                                f"{', '.join(OPERATIONS)}")
        defaults = {
            "integrate": {"error_model": "poisson", "split": "no", "variance": None},
            "sigma_clip": {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal",
                           "variance": None, "split": "no", "pick": DEFAULT_PICK},
            "medfilt": {"percentile": 50, "split": "full", "error_model": "poisson",
                        "variance": None, "pick": DEFAULT_PICK},
        }[operation]
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise AzfilterError(f"{operation} takes no option {', '.join(unknown)}")
        values = {**defaults, **params}
        model = parse_error_model(values["error_model"])
        split = _check_split(values["split"])
        variance = values["variance"]
        if model == "variance" and variance is None:
            raise AzfilterError("error model 'variance' needs a variance array (variance=...)")
        if variance is not None and model != "variance":
            raise AzfilterError(
                f"a variance array was given but the error model is {model!r}; "
                "use error_model='variance'"
            )
        engine_params: dict[str, Any] = {"error_model": model}
        options: dict[str, Any] = {}
        if operation == "sigma_clip":
            if split != "no":
                raise AzfilterError(
                    f"sigma_clip is no-split only (each pixel must belong to one ring), got "
                    f"split={split!r}"
                )
            options = {"thres": _check_number(values["thres"], "thres", minimum=0.0),
                       "max_iter": _check_count(values["max_iter"], "max_iter"),
                       "pick": _check_number(values["pick"], "pick")}
            engine_params.update(options)
        elif operation == "medfilt":
            low, high = _check_percentile(values["percentile"])
            options = {"percentile": [low, high], "pick": _check_number(values["pick"], "pick")}
            engine_params.update(quant_min=low / 100.0, quant_max=high / 100.0,
                                 pick=options["pick"])
        engine_params["variance"] = variance
        if variance is not None and self.shape is not None:
            self._check_variance(variance, model)   # fail now, not once per frame
        return split, engine_params, options, model

    def _stream(self, frames: Iterable[tuple[Any, Any]], operation: str, split: str,
                engine_params: dict[str, Any], options: dict[str, Any],
                model: str) -> Iterator[tuple[Any, Result | Exception]]:
        variance_source = engine_params["variance"]
        checked_variance: list[np.ndarray | None] = []   # checked once the shape is known

        def checked() -> Iterator[tuple[Any, Any, Any]]:
            """(tag, frame or error, engine key or None)."""
            for tag, img in frames:
                try:
                    array = self._check_image(img)
                    if not checked_variance:
                        checked_variance.append(self._check_variance(variance_source, model))
                    dummy = self.geometry.detector.dummy_for(array.dtype)
                except Exception as err:  # noqa: BLE001 - one bad frame must not end the stream
                    yield tag, err, None
                else:
                    yield tag, array, dummy

        # consecutive frames that share an engine go through one engine stream
        for key, group in itertools.groupby(checked(), key=lambda item: item[2]):
            if key is None:
                for tag, error, _ in group:
                    yield tag, error
                continue
            engine = self._engine_for(split, *key)
            params = {**engine_params, "variance": checked_variance[0]}
            stream = engine.process_many(((tag, array) for tag, array, _ in group),
                                         operation, params)
            for tag, sums in stream:
                if isinstance(sums, Exception):
                    yield tag, sums
                else:
                    yield tag, self._result(sums, split, operation, model, **options)


# ---------------------------------------------------------------------------- validation
_PYFAI_GEOMETRY_ATTRIBUTES = ("dist", "poni1", "poni2", "rot1", "rot2", "rot3", "detector")


def as_geometry(geometry: Any) -> Any:
    """The :class:`~azfilter.geometry.Geometry` of ``geometry``.

    Parameters
    ----------
    geometry : Geometry, str, os.PathLike or pyFAI AzimuthalIntegrator
        A Geometry (returned as is), the path of a PONI file, or any object with pyFAI's
        geometry attributes (``dist``, ``poni1``, ``poni2``, ``rot1``-``rot3``,
        ``wavelength``, ``detector``). The latter is written out as PONI 2.1 text (detector
        class name and ``detector.get_config()``, as pyFAI writes them) and read back, so it
        goes through the same checks as a PONI file.

    Raises
    ------
    AzfilterError
        For anything else, or a geometry azfilter cannot use (a spline-distorted detector).
    """
    from .geometry import Geometry
    from .poni import load_poni, parse_poni

    if isinstance(geometry, Geometry):
        return geometry
    if isinstance(geometry, (str, os.PathLike)):
        return load_poni(geometry)
    kind = type(geometry).__name__
    if all(hasattr(geometry, name) for name in _PYFAI_GEOMETRY_ATTRIBUTES):
        source = f"pyFAI {kind}"
        try:
            text = _pyfai_poni_text(geometry)
        except (AttributeError, TypeError, ValueError) as err:
            raise AzfilterError(f"{source}: cannot read its geometry ({err})") from None
        return parse_poni(text, source=source)
    raise AzfilterError(
        f"geometry must be an azfilter Geometry, a PONI file path or a pyFAI "
        f"AzimuthalIntegrator, got {kind}"
    )


def _pyfai_poni_text(integrator: Any) -> str:
    """PONI 2.1 text of a pyFAI-like integrator (what pyFAI's own ``write`` produces)."""
    detector = integrator.detector
    if detector is None:
        raise ValueError("it has no detector")
    get_config = getattr(detector, "get_config", None)
    if callable(get_config):
        config = dict(get_config())
    else:  # a minimal detector: pixel sizes (and shape) only
        config = {"pixel1": float(detector.pixel1), "pixel2": float(detector.pixel2)}
        max_shape = getattr(detector, "max_shape", None)
        if max_shape is not None:
            config["max_shape"] = [int(n) for n in max_shape]

    def plain(value: Any) -> Any:  # numpy scalars and pyFAI's enums to JSON
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, (tuple, np.ndarray)):
            return list(value)
        return int(value) if hasattr(value, "__index__") else str(value)

    lines = [
        "poni_version: 2.1",
        f"Detector: {type(detector).__name__}",
        f"Detector_config: {json.dumps(config, default=plain)}",
    ]
    for key in ("dist", "poni1", "poni2", "rot1", "rot2", "rot3"):
        name = "Distance" if key == "dist" else key.capitalize()
        lines.append(f"{name}: {float(getattr(integrator, key))!r}")
    wavelength = getattr(integrator, "wavelength", None)
    if wavelength:  # pyFAI: None (or 0) when not set
        lines.append(f"Wavelength: {float(wavelength)!r}")
    return "\n".join(lines) + "\n"


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)):
        raise AzfilterError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise AzfilterError(f"{name} must be a positive integer, got {value!r}")
    if int(value) < 1:
        raise AzfilterError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_count(value: Any, name: str) -> int:
    """A non-negative integer (an integer-valued float such as 5.0 from a config is fine)."""
    whole = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer())
    if isinstance(value, bool) or not whole or value < 0:
        raise AzfilterError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_number(value: Any, name: str, minimum: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AzfilterError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (
            minimum is not None and number < minimum):
        bound = "" if minimum is None else f" >= {minimum:g}"
        raise AzfilterError(f"{name} must be a finite number{bound}, got {value!r}")
    return number


def _check_split(split: Any) -> str:
    if split not in SPLITS:
        raise AzfilterError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return str(split)


def _check_range(value: Any, name: str, ordered: bool = True) -> tuple[float, float] | None:
    """Two finite numbers; ``ordered`` requires low < high (radial ranges)."""
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise AzfilterError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise AzfilterError(f"{name} must be finite, got {value!r}")
    if ordered and not low < high:
        raise AzfilterError(f"{name} must have low < high, got {value!r}")
    return low, high


SectorBounds = tuple[tuple[float, float], ...]


def _check_sectors(sectors: Any, azimuth_range: tuple[float, float] | None
                   ) -> tuple[int | list[list[float]] | None, SectorBounds | None]:
    """(the option as given, JSON-ready; the sector bounds in degrees) or (None, None)."""
    if sectors is None:
        return None, None
    from .binning import sector_ranges

    bounds = sector_ranges(sectors, azimuth_range)
    if isinstance(sectors, (int, np.integer, float, np.floating)):
        return len(bounds), bounds
    return [[float(v) for v in pair] for pair in sectors], bounds


def _check_percentile(percentile: Any) -> tuple[float, float]:
    """``p`` -> ``(p, p)``; ``(lo, hi)`` -> itself; all in [0, 100], lo <= hi."""
    values = np.atleast_1d(np.asarray(percentile, dtype=object)).ravel()
    if values.size not in (1, 2):
        raise AzfilterError(f"percentile must be one number or two (lo, hi), got {percentile!r}")
    numbers = [_check_number(v, "percentile") for v in values]
    low, high = numbers[0], numbers[-1]
    if not (0.0 <= low <= 100.0 and 0.0 <= high <= 100.0):
        raise AzfilterError(f"percentile must be within 0-100, got {percentile!r}")
    if low > high:
        raise AzfilterError(f"percentile (lo, hi) must have lo <= hi, got {percentile!r}")
    return low, high


__all__ = ["Integrator", "Result", "SPLITS", "OPERATIONS", "BACKENDS", "as_geometry"]
