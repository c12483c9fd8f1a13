"""Running a job: readers → ``Integrator.process_many`` → writer → sink.

Data flow of one run (``azfilter sigma-clip -p geo.poni run/*.cbf -o out.h5``)::

    prepare_job(config)          plan (pipeline.plan), geometry, integrator, writer, meta
    execute(job, progress)
      reader thread pool          decodes blocks of frames ahead (bounded queues), into the
                                  engine's reusable frame buffers (page-locked for OpenCL)
      this thread                 integrator.process_many(frames) — the engines' streaming
                                  path (OpenCL overlaps the upload of frame n+1 with frame n)
      writer thread               sink.write(...) for each result (text files, NeXus rows)
      sink.close()                atomic rename of a shared output

A frame that cannot be read or reduced is reported (file, frame, reason) and the run goes on.
Every queue is bounded, so memory does not grow with the number of frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..errors import AzfilterError, FrameReadError, RunFailed
from ..fileio import (
    atomic_write_text,
    lock_path,
    sweep_folder,
    sweep_stale_temporaries,
    try_lock,
    unlock,
)
from ..manifest import Manifest
from ..poni import format_poni
from ..resources import usable_cores
from ..vocabulary import METHOD_OF
from . import plan as planning
from .monitor import MonitorReader, divide_by_monitor
from .plan import Planned
from .progress import Progress, plural

logger = logging.getLogger(__name__)

# Frames each reader may have decoded ahead of the reducer (memory stays flat).
READ_AHEAD = 2
#: reader threads at most when bitshuffle-LZ4 chunks go to the device compressed
DEVICE_DECODE_READERS = 2
# Results waiting for the writer thread (~100 kB each for 1000 bins): room for what is reduced
# while the NeXus writer flushes its 64 buffered rows (milliseconds); with 8 places the
# reducing thread waited on a full queue during each flush (H200, py-spy).
WRITE_QUEUE = 32
#: share of the usable cores a Cython job takes as threads without --threads (each of its
#: engine's OpenMP threads and of its reader threads, which decode). Both run flat out at
#: once (the engine reduces several frames at a time), so one of each per core oversubscribes
#: the cores. H200 machine, 16 cores, 1000 Eiger 4M bitshuffle-LZ4 frames, three rounds each
#: (2026-11-29): integrate 3.20 / 3.17 / 2.98 s with 16 threads, 2.90 / 2.90 / 2.95 s with 12,
#: 2.64 / 2.72 / 2.79 s with 8; sigma-clip 4.58 / 4.64 / 4.49, 4.26 / 4.19 / 4.40 and
#: 4.22 / 4.63 / 4.61 s. Again with the decoder twice as fast (2026-11-30, another instance,
#: 1000 frames, best of 3 interleaved): sigma-clip 5.45 / 4.88 / 5.12 / 5.06 s with 10 / 12 /
#: 14 / 16 threads, integrate 2.91 / 3.05 / 2.86 / 2.96 s.
CYTHON_THREAD_SHARE = 0.75
#: cores up to which a Cython job takes them all (the 2-core benchmarks were measured so)
CYTHON_ALL_CORES = 2


@dataclass
class Counters:
    """Frames reduced, skipped (already in the output) and failed, shared by threads."""

    reduced: int = 0
    skipped: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Job:
    """Everything a run needs, prepared and checked before any frame is reduced."""

    config: dict[str, Any]
    geometry: Any
    out_kind: str
    output: str
    shard: tuple[int, int] | None
    todo: list[Planned]
    skipped: int
    failures: list[Planned]
    meta: Any
    writer: Any = None
    integrator: Any = None
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None
    # sparsify: (raw frame, result) -> what the sink writes, run before the frame's buffer
    # is reused (azfilter.bragg.BraggPicker)
    postprocess: Callable[[Any, Any], Any] | None = None
    # the OpenCL start-up running beside the table's loading (join before leaving)
    warm_up: threading.Thread | None = None
    # worker processes started while the table loads (azfilter.pipeline.workers.WorkerPool)
    workers: Any = None
    # processes reading and reducing the job's frames (their reader threads share the cores)
    processes: int = 1

    def finish_warm_up(self) -> None:
        """Wait for the OpenCL start-up thread, if any, and end the worker processes (neither
        may outlive the job)."""
        if self.warm_up is not None:
            self.warm_up.join()
            self.warm_up = None
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    @property
    def label(self) -> str:
        """``"sigma-clip"``, or ``"sigma-clip shard 2/16"`` in an array job."""
        operation = self.config["operation"]
        return operation if self.shard is None else (
            f"{operation} shard {self.shard[0]}/{self.shard[1]}")


@dataclass
class JobReport:
    """What a run did: frame counts, failures (one line each), where the output went."""

    label: str
    output: str
    reduced: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    planned: list[tuple[str, int, str]] = field(default_factory=list)  # dry run
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no frame failed."""
        return self.failed == 0

    def summary(self) -> str:
        """The one-line summary the command prints."""
        rate = self.reduced / self.elapsed if self.elapsed > 0 else 0.0
        return (f"azfilter: {self.label}: {plural(self.reduced, 'frame')} reduced, "
                f"{self.skipped} skipped, {self.failed} failed in {self.elapsed:.1f} s "
                f"({rate:.1f} frames/s) -> {self.output}")


def operation_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The parameters that define the numbers, as recorded in every output's header."""
    keys = ["npt", "unit", "split", "error_model"] + list(
        cfg.OPERATION_KEYS[config["operation"]]) + [
        "mask", "dark", "flat", "polarization", "solid_angle", "normalization",
        "radial_range", "azimuth_range", "backend", "device", "wavelength", "energy",
        "dummy", "delta_dummy", "monitor", "sectors"]
    parameters = {}
    for key in keys:
        value = config.get(key)
        if key in ("mask", "dark", "flat") and value:
            value = os.path.abspath(value)
        parameters[key] = value
    return parameters


def reduction_parameters(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The Integrator method and its keyword arguments for a job's operation."""
    operation = config["operation"]
    if operation == "integrate":
        params = {"error_model": config["error_model"], "split": config["split"]}
    elif operation in ("sigma-clip", "sparsify"):
        # sparsify has no --pick: its 1-D pattern's outlier statistics use the default
        params = {"thres": config["thres"], "max_iter": config["max_iter"],
                  "error_model": config["error_model"],
                  "pick": config.get("pick", cfg.DEFAULTS["pick"])}
    else:
        percentile = config["percentile"]
        params = {"percentile": percentile[0] if len(percentile) == 1 else tuple(percentile),
                  "split": config["split"], "error_model": config["error_model"],
                  "pick": config["pick"]}
    return METHOD_OF[operation], params


def _sectors(value: Any) -> Any:
    if isinstance(value, list):
        return [tuple(pair) for pair in value]
    return value


def job_threads(config: dict[str, Any], cores: int | None = None) -> int:
    """Threads of the job's engine and of its frame readers: ``--threads``, else the usable
    cores, of which a Cython job takes :data:`CYTHON_THREAD_SHARE` above
    :data:`CYTHON_ALL_CORES` cores.

    Parameters
    ----------
    config : dict
        The job's configuration (``threads``, ``backend``).
    cores : int, optional
        Usable cores (default :func:`azfilter.resources.usable_cores`).

    Returns
    -------
    int
    """
    if config.get("threads"):
        return int(config["threads"])
    cores = usable_cores() if cores is None else cores
    if config.get("backend") == "cython" and cores > CYTHON_ALL_CORES:
        return max(CYTHON_ALL_CORES, int(cores * CYTHON_THREAD_SHARE))
    return cores


def make_integrator(config: dict[str, Any], geometry: Any, first_item: Any | None,
                    load_table: bool = True) -> Any:
    """The job's Integrator, its lookup table built (or loaded) so that errors show now
    (with ``load_table``).

    A generic detector takes its shape from the first input; an Eiger/NeXus file's own pixel
    mask is OR-ed in when it fits the detector.
    """
    from ..integrator import Integrator

    if geometry.detector.shape is None and first_item is not None:
        from ..frames import describe_file

        try:
            shape = describe_file(first_item).get("shape")
        except AzfilterError:
            shape = None
        if shape:
            geometry = dataclasses.replace(
                geometry, detector=geometry.detector.with_shape(tuple(shape)))
            check_npt(config["npt"], geometry.detector.shape)
    pixel_mask = None
    if first_item is not None:
        from ..frames import pixel_mask_for

        try:
            pixel_mask = pixel_mask_for(first_item)
        except AzfilterError:
            pixel_mask = None
        shape = geometry.detector.shape
        if pixel_mask is not None and (shape is None or tuple(pixel_mask.shape) != tuple(shape)):
            pixel_mask = None
    integrator = Integrator(
        geometry, npt=config["npt"], unit=config["unit"], backend=config["backend"],
        device=config["device"], mask=config["mask"], dark=config["dark"], flat=config["flat"],
        polarization=config["polarization"], solid_angle=config["solid_angle"],
        radial_range=config["radial_range"], azimuth_range=config["azimuth_range"],
        normalization=config["normalization"],
        threads=job_threads(config), pixel_mask=pixel_mask,
        sectors=_sectors(config.get("sectors")),
    )
    if load_table and integrator.shape is not None:
        integrator.table(config["split"])
    return integrator


def resolve_output(config: dict[str, Any]) -> tuple[str, str, tuple[int, int] | None]:
    """(kind, path, shard) of a job's output: ``out.h5`` becomes ``out_shard02of16.h5`` in
    shard 2 of 16 (given by ``--shard`` or the scheduler's environment).

    Raises
    ------
    AzfilterError
        For an output name of no known kind, or an ambiguous array task.
    """
    shard = cfg.parse_shard(config["shard"]) if config.get("shard") else \
        planning.environment_shard()
    out_kind = planning.output_kind(config["output"])
    output = planning.shard_output(config["output"], shard) if out_kind == "hdf5" else \
        config["output"]
    return out_kind, output, shard


#: Bins per detector pixel above which a job is refused: more bins than pixels leaves most
#: bins empty and made medfilt allocate tens of GiB (--npt 10000000).
MAX_BINS_PER_PIXEL = 1


#: h·c in keV·Å: wavelength [Å] = HC_KEV_ANGSTROM / energy [keV]
HC_KEV_ANGSTROM = 12.398419843320026


def apply_overrides(geometry: Any, config: dict[str, Any]) -> Any:
    """The PONI geometry with the job's ``wavelength``/``energy`` and ``dummy``/
    ``delta_dummy`` in place of the file's and the detector's."""
    wavelength = config.get("wavelength")
    if config.get("energy") is not None:
        wavelength = HC_KEV_ANGSTROM / config["energy"]
    if wavelength is not None:
        geometry = dataclasses.replace(geometry, wavelength=wavelength * 1e-10)
    if config.get("dummy") is not None or config.get("delta_dummy") is not None:
        detector = geometry.detector
        dummy = config["dummy"] if config.get("dummy") is not None else detector.dummy
        if dummy is None:
            raise AzfilterError("--delta-dummy needs --dummy (the detector has no dummy value)")
        delta = config["delta_dummy"] if config.get("delta_dummy") is not None else (
            detector.delta_dummy if config.get("dummy") is None else 0.0)
        geometry = dataclasses.replace(
            geometry, detector=dataclasses.replace(detector, dummy=dummy, delta_dummy=delta))
    return geometry


def check_npt(npt: int, shape: tuple[int, int] | None) -> None:
    """Refuse more radial bins than the detector has pixels.

    Raises
    ------
    AzfilterError
        Naming the limit.
    """
    if shape is None:
        return
    pixels = int(shape[0]) * int(shape[1])
    if npt > MAX_BINS_PER_PIXEL * pixels:
        raise AzfilterError(f"--npt {npt}: more radial bins than the detector's {pixels} "
                            "pixels; most would stay empty (choose at most the pixel count, "
                            "typically the larger image dimension)")


def check_sparsify(config: dict[str, Any], out_kind: str, output: str) -> None:
    """Refuse what the sparse format cannot hold.

    Raises
    ------
    AzfilterError
        For an output that is not one HDF5 file, χ sectors, or a monitor.
    """
    if out_kind != "hdf5":
        raise AzfilterError(f"-o {output}: sparsify writes one HDF5 file for all frames "
                            "(give a name ending in .h5)")
    if config.get("sectors"):
        raise AzfilterError("sparsify keeps one background profile per frame: it takes no "
                            "--sectors")
    if config.get("monitor"):
        raise AzfilterError("sparsify stores raw frames (densified from the background times "
                            "the pixel normalisation): it takes no --monitor")


def make_picker(config: dict[str, Any], integrator: Any, writer: Any) -> Any:
    """The sparsify step of a job: a :class:`azfilter.bragg.BraggPicker` that also gives the
    writer (:class:`azfilter.output.sparse.SparseWriter`) its detector layout.

    Raises
    ------
    AzfilterError
        When the detector's shape is unknown.
    """
    from ..bragg import BraggPicker, pick_geometry
    from ..output.sparse import SparseLayout

    if integrator.shape is None:
        raise AzfilterError("sparsify needs the detector's shape (from the PONI file or the "
                            "first frame)")
    geometry = pick_geometry(integrator)
    if writer is not None:
        writer.set_layout(SparseLayout(
            shape=geometry.shape, radius=geometry.radius, position=geometry.position,
            pixel_norm=geometry.pixel_norm, detector_dummy=integrator.geometry.detector,
            parameters={"cutoff_pick": config["cutoff_pick"], "noise": config["noise"],
                        "cutoff_clip": config["thres"], "cycle": config["max_iter"],
                        "error_model": config["error_model"], "unit": config["unit"],
                        "npt": config["npt"], "picking": "host (azfilter.bragg)"}))
    return BraggPicker(geometry, config["cutoff_pick"], config["noise"],
                       integrator.geometry.detector, threads=integrator.threads or 0,
                       convert=None if writer is None else writer.intensity_values)


def prepare_job(config: dict[str, Any], dry_run: bool = False,
                note: Callable[[str], None] | None = None) -> Job:
    """Plan a job from its effective config and set up what the run needs.

    Parameters
    ----------
    config : dict
        An effective config (:func:`azfilter.config.effective`).
    dry_run : bool
        Plan only: no integrator, nothing opened for writing.
    note : callable, optional
        Receives informational lines (a directory with no data yet).

    Raises
    ------
    AzfilterError
        Any usage or configuration problem; nothing has been written.
    """
    from ..output import OutputMeta, geometry_lines
    from ..poni import load_poni

    if config.get("decode") == "device" and config["backend"] != "opencl":
        raise AzfilterError(f"--decode device needs --backend opencl (the {config['backend']} "
                            "backend decodes on the host)")
    out_kind, output, shard = resolve_output(config)
    output_arg = config["output"]
    geometry = apply_overrides(load_poni(config["poni"]), config)
    check_npt(config["npt"], geometry.detector.shape)
    notes: list[str] = []

    def noted(text: str) -> None:
        notes.append(text)
        if note is not None:
            note(text)

    items = planning.expand(config["inputs"], config["recursive"],
                            output if out_kind == "hdf5" else None, noted)
    whole_job = planning.plan_frames(items, out_kind, output, config["unit"])
    # Text names must be unique over the whole job, not only this shard: two tasks of an
    # array writing a/img_0000.cbf and b/img_0000.cbf to one out/img_0000.dat lose one.
    planning.check_collisions([p for p in whole_job if p.error is None])
    manifest = Manifest.of(((p.source, p.index) for p in whole_job),
                           shards=1 if shard is None else shard[1])
    plan = planning.select_shard(whole_job, shard)
    frames = [p for p in plan if p.error is None]
    if out_kind in ("stdout", "textfile") and len(frames) > 1:
        raise AzfilterError(f"-o {output_arg} takes one frame, but the inputs hold "
                            f"{len(frames)}; give a directory (out/) or an .h5 file")

    job_config = cfg.job_config(config)
    job_config["output"] = os.path.abspath(output_arg) if output_arg != "-" else "-"
    meta = OutputMeta(
        operation=config["operation"], unit=config["unit"],
        parameters=operation_parameters(config), poni_text=format_poni(geometry),
        geometry=geometry_lines(geometry), config=job_config,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}", manifest=manifest,
    )
    mode = "overwrite" if config["overwrite"] else (
        "append" if config["skip_existing"] else "new")
    todo, skipped = planning.skip_existing(frames, out_kind, output, mode, config["npt"],
                                           cfg.sector_count(config.get("sectors")))
    writer = None
    if config["operation"] == "sparsify":
        check_sparsify(config, out_kind, output_arg)
    if out_kind == "hdf5":
        if config["operation"] == "sparsify":
            from ..output.sparse import SparseWriter

            writer = SparseWriter(output, meta, mode=mode)
        else:
            from ..output import NexusWriter

            writer = NexusWriter(output, meta, mode=mode)
        if mode == "append":
            todo, more = planning.drop_stored(todo, writer.existing)
            skipped += more
    job = Job(config=config, geometry=geometry, out_kind=out_kind, output=output, shard=shard,
              todo=todo, skipped=skipped, failures=[p for p in plan if p.error is not None],
              meta=meta, writer=writer, notes=notes, manifest=manifest)
    if dry_run:
        return job
    # The integrator (lookup table) only when there is work: a cron run that finds nothing
    # new stays cheap. An HDF5 output with nothing to put in it is still written (empty) when
    # nothing failed, so that every shard of an array job leaves its file for `merge`.
    # (A job whose every frame failed while planning writes it too: the file then lists the
    # failures, so that a shard is never missing from the merge.)
    empty_output = out_kind == "hdf5" and not todo and not Path(output).exists()
    if todo or empty_output:
        from . import workers

        # worker processes start OpenCL themselves: this process must not (a forked child
        # cannot use the driver its parent started)
        count = workers.planned_workers(config, len(todo), first_input=todo[0].item) \
            if todo and config["operation"] != "sparsify" else 1
        job.processes = count
        if todo and config["backend"] == "opencl" and count < 2:
            from ..backends.opencl.devices import warm_up

            job.warm_up = warm_up(config.get("device"))
        try:
            job.integrator = make_integrator(config, geometry,
                                             todo[0].item if todo else None,
                                             load_table=count < 2)
            if count > 1:
                # The table in the disk cache: the workers start now and load it beside
                # their OpenCL start-up, as one process does. Else it is built here first,
                # once, and they inherit it.
                if job.integrator.shape is not None \
                        and job.integrator.table_cached(config["split"]):
                    job.workers = workers.WorkerPool(job, count, _reducer(job),
                                                     load_table=True)
                if job.integrator.shape is not None:
                    job.integrator.table(config["split"])
            meta.geometry = geometry_lines(job.integrator.geometry)
            if config["operation"] == "sparsify":
                job.postprocess = make_picker(config, job.integrator, writer)
            if empty_output and writer is not None and job.integrator.shape is not None:
                writer.start(job.integrator.table(config["split"]).radial,
                             sectors=job.integrator.sectors)
        except BaseException:
            job.finish_warm_up()
            raise
    return job


def _reducer(job: Job) -> Callable[..., None]:
    """What a worker process runs: :func:`_reduce` over the batches it is given."""
    def reduce(batches: Iterable[list[Planned]], fail: Callable[..., None],
               emit: Callable[..., bool], stop: threading.Event) -> None:
        _reduce(job, batches, fail, emit, stop)
    return reduce


@contextlib.contextmanager
def output_lock(output: str, out_kind: str, wait: bool = True,
                note: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the output's lock (:func:`azfilter.fileio.lock_path`) for a whole run.

    Two runs on one output (two cron jobs extending one .h5, a rerun while the first still
    writes) serialise: the second waits, then plans against what the first wrote. With
    ``wait=False`` the second is refused instead. The lock is ``flock``-based (the
    ``filelock`` package): reliable on local disks and on NFS v4 / Lustre / GPFS mounts that
    forward ``flock``; the README says what to check on other shared file systems.

    Raises
    ------
    AzfilterError
        When the lock file cannot be created, or is held and ``wait`` is False.
    """
    if out_kind == "stdout":
        yield
        return
    path = lock_path(output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        held = try_lock(path)   # a free lock: taken without importing filelock
    except OSError as err:
        raise AzfilterError(f"{path}: cannot create the output's lock file: "
                            f"{err.strerror or err}") from None
    if held is not None:
        try:
            yield
        finally:
            unlock(held)
        return
    from filelock import FileLock, Timeout

    try:
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise AzfilterError(f"{output}: another azfilter run is writing this output "
                                    f"(lock {path}); try again later") from None
            if note is not None:
                note(f"{output}: waiting for another azfilter run writing it (lock {path})")
            lock.acquire()
    except OSError as err:
        raise AzfilterError(f"{path}: cannot create the output's lock file: "
                            f"{err.strerror or err}") from None
    try:
        yield
    finally:
        lock.release()


def sweep_temporaries(output: str, out_kind: str) -> list[Path]:
    """Remove the temporary files that killed runs left for this output (their process is
    gone; files of live processes or other hosts are kept)."""
    if out_kind == "stdout":
        return []
    if out_kind == "textdir":
        removed: list[Path] = []
        for folder, _, _ in os.walk(output):
            removed += sweep_folder(folder)
        return removed
    return sweep_stale_temporaries(output)


def summary_path(job: Job) -> Path | None:
    """Where the per-task summary goes, next to the output: ``OUT.h5.summary.json`` for an
    HDF5 output, ``DIR.summary.json`` (``DIR_shardIofN.summary.json`` in an array) for a
    directory of text outputs; none for stdout or a single text file."""
    if job.out_kind == "hdf5":
        return Path(f"{job.output}.summary.json")
    if job.out_kind == "textdir":
        folder = os.path.abspath(job.output)
        suffix = "" if job.shard is None else f"_shard{job.shard[0]}of{job.shard[1]}"
        return Path(f"{folder}{suffix}.summary.json")
    return None


def write_summary(job: Job, report: JobReport) -> Path | None:
    """Write the per-task summary (JSON): frames planned/reduced/skipped/failed with each
    failure, times, host, shard, manifest digest. Returns its path (None when not written;
    a summary that cannot be written is a warning in the report, never a failed run)."""
    import json

    from .. import __version__
    from ..fileio import host_name

    path = summary_path(job)
    if path is None:
        return None
    finished = time.time()
    summary = {
        "program": "azfilter", "version": __version__, "label": job.label,
        "operation": job.config["operation"], "output": os.path.abspath(job.output),
        "shard": None if job.shard is None else f"{job.shard[0]}/{job.shard[1]}",
        "host": host_name(), "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                 time.localtime(finished - report.elapsed)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(finished)),
        "elapsed_s": round(report.elapsed, 3),
        "frames_planned": len(job.todo) + job.skipped + len(job.failures),
        "reduced": report.reduced, "skipped": report.skipped, "failed": report.failed,
        "failures": report.failures,
        "manifest_sha256": None if job.manifest is None else job.manifest.digest,
        "manifest_frames": None if job.manifest is None else len(job.manifest),
        "backend": job.config.get("backend"), "threads": job.config.get("threads"),
        "exit_status": 0 if report.ok else 3,
    }
    try:
        atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    except OSError as err:
        report.notes.append(f"{path}: cannot write the run summary: {err.strerror or err}")
        return None
    return path


def _make_sink(job: Job) -> Any:
    from ..output import NexusSink, TextSink

    if job.writer is not None:
        return NexusSink(job.writer)
    return TextSink(job.meta, stdout=job.out_kind == "stdout")


def execute(job: Job, progress: Progress) -> JobReport:
    """Reduce the job's frames and write them; failures are counted, not raised.

    Raises
    ------
    RunFailed
        When the output cannot be written (the unfinished output is removed).
    KeyboardInterrupt
        Re-raised after the unfinished output is removed.
    """
    where = "stdout" if job.out_kind == "stdout" else job.output
    report = JobReport(label=job.label, output=where, notes=list(job.notes))
    counters = Counters(skipped=job.skipped)
    started = time.monotonic()

    sink = _make_sink(job)

    def fail(error: Exception, frames: int = 1, planned: Planned | None = None) -> None:
        with counters.lock:
            counters.failed += frames
            report.failures.append(str(error))
            record = getattr(sink, "record_failure", None)
            if record is not None:   # the output lists its failed frames
                record(getattr(error, "source", ""), getattr(error, "index", None), str(error))
        progress.message(f"azfilter: failed: {error}")
        for _ in range(frames):
            progress.step(failed=True)

    for failure in job.failures:
        fail(failure.error)
    try:
        _stream(job, sink, progress, counters, fail)
    finally:
        progress.close()
        report.elapsed = time.monotonic() - started
        report.reduced, report.skipped, report.failed = (
            counters.reduced, counters.skipped, counters.failed)
    return report


_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the run is stopping; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _reason(error: FrameReadError, planned: Planned | None) -> str:
    """The reason of a read error, naming the file that failed when it is not the planned
    source itself (an Eiger data file of a master file), or only the dataset when the file is
    the planned one (``stack.h5 frame 1: /entry/data/data: corrupt chunk: ...``, not the
    file and frame twice)."""
    if planned is None or _absolute(error.source) == _absolute(planned.source):
        return error.reason
    file_part = planning.file_part(error.source)
    dataset = error.source[len(file_part):].removeprefix("::")
    if dataset and error.index == planned.index \
            and _absolute(file_part) == _absolute(planned.source):
        return f"{dataset}: {error.reason}"
    return str(error)


def _runs(todo: list[Planned]) -> list[tuple[Any, list[Planned]]]:
    """Consecutive frames of one file as (item selecting them, their plans)."""
    runs: list[tuple[Any, list[Planned]]] = []
    for planned in todo:
        if runs and runs[-1][1][-1].item is planned.item \
                and runs[-1][1][-1].index + 1 == planned.index:
            runs[-1][1].append(planned)
        else:
            runs.append((planned.item, [planned]))
    return [(item.select(range(group[0].index, group[-1].index + 1)), group)
            for item, group in runs]


def decode_on_device(config: dict[str, Any]) -> bool:
    """Whether the job's bitshuffle-LZ4 HDF5 chunks go to the device compressed.

    ``decode`` ``device``: yes (with ``--backend opencl``); ``host``: no; ``auto``: with
    ``--backend opencl`` on a GPU (a compressed Eiger frame is ~5x fewer bytes over PCIe),
    not on a CPU device (the host decoder there is as fast and runs on all cores); with
    several devices, when every one is a GPU.
    """
    mode = config.get("decode") or "auto"
    if config.get("backend") != "opencl" or mode == "host":
        return False
    if mode == "device":
        return True
    from ..backends import opencl
    from ..vocabulary import names_several_devices, parse_device_spec

    try:
        tokens = parse_device_spec(config.get("device"))
        if names_several_devices(tokens):
            picked = [info for info, _ in opencl.devices.select_devices(tokens)]
        else:
            picked = [opencl.select_device(tokens[0] if tokens else None)[0]]
    except (AzfilterError, ValueError):
        return False
    return all(info.get("type") == "GPU" for info in picked)


def _ring_buffer(data: Any) -> Any:
    """The ring buffer behind a frame's data (a compressed chunk's byte buffer)."""
    from ..frames.chunks import CompressedChunk

    return data.buffer if isinstance(data, CompressedChunk) else data


def _read_frames(todo: list[Planned], workers: int, buffers: Any, fail: Callable[..., None],
                 device_decode: bool = False) -> Iterator[tuple[Planned, Any]]:
    """The planned frames in plan order as (planned, Frame); read failures go to
    ``fail(error, 1, planned=planned)``, one per planned frame.

    Frames are decoded by :func:`azfilter.frames.iter_frames` on ``workers`` threads (HDF5
    chunks read directly and decoded outside h5py's lock), into the engine's ring buffers;
    with ``device_decode``, bitshuffle-LZ4 chunks are left compressed for the engine.
    """
    from ..frames import iter_frames

    runs = _runs(todo)
    position = 0                       # runs[:position] have been opened
    remaining: dict[int, Planned] = {}

    def fail_remaining(reason: str) -> None:
        for planned in remaining.values():
            fail(FrameReadError(planned.source, planned.index, reason), 1, planned=planned)
        remaining.clear()

    def advance() -> None:
        nonlocal position
        fail_remaining("frame was not delivered by the reader")
        remaining.update((p.index, p) for p in runs[position][1])
        position += 1

    stream = iter_frames([item for item, _ in runs], workers=workers, buffer=buffers.take,
                         errors="report", device_decode=device_decode)
    try:
        for obj in stream:
            if obj.index is None:          # a whole file failed: every frame of its run
                if not remaining and position < len(runs):
                    advance()
                fail_remaining(_reason(obj, next(iter(remaining.values()), None)))
                continue
            while obj.index not in remaining and position < len(runs):
                advance()
            planned = remaining.pop(obj.index, None)
            if isinstance(obj, FrameReadError):
                if planned is not None:
                    fail(FrameReadError(planned.source, planned.index, _reason(obj, planned)),
                         1, planned=planned)
                continue
            if planned is None:            # not planned (cannot happen: selected runs)
                buffers.give_back(_ring_buffer(obj.data))
                continue
            yield planned, obj
        fail_remaining("frame was not delivered by the reader")
        for _, group in runs[position:]:
            for planned in group:
                fail(FrameReadError(planned.source, planned.index,
                                    "frame was not delivered by the reader"), 1, planned=planned)
    finally:
        stream.close()


def _absolute(source: str) -> str:
    """A source (``file`` or ``file::/dataset``) with its file part made absolute."""
    part = planning.file_part(source)
    return source if os.path.isabs(part) else os.path.abspath(part) + source[len(part):]


def _frame_source(obj: Any) -> str:
    return _absolute(obj.source)


def _stream(job: Job, sink: Any, progress: Progress, counters: Counters,
            fail: Callable[..., None]) -> None:
    """Read (thread pool) -> reduce (this thread, process_many) -> write (writer thread).

    With :func:`azfilter.pipeline.workers.worker_count` above 1 (the OpenCL backend on a
    GPU, long jobs), reading and reducing run in worker processes instead, and this thread
    puts their results in order for the writer thread.
    """
    if not job.todo:
        sink.close()
        return
    from . import workers

    stop = threading.Event()
    write_queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
    writer_error: list[BaseException] = []

    def writer() -> None:
        while True:
            work = write_queue.get()
            if work is _END:
                return
            planned, frame_source, result = work
            try:
                sink.write(planned, frame_source, result)
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                writer_error.append(err)
                stop.set()
                return
            with counters.lock:
                counters.reduced += 1
            progress.step()

    def emit(planned: Planned, frame_source: str, result: Any) -> bool:
        return _put(write_queue, (planned, frame_source, result), stop)

    pool, job.workers = job.workers, None
    count = workers.worker_count(job)
    if pool is None and count > 1:
        # forked before any thread of this run starts (a lock a thread holds at the fork
        # would stay locked in the child)
        pool = workers.WorkerPool(job, count, _reducer(job))
    writer_thread = threading.Thread(target=writer, name="azfilter-writer", daemon=True)
    writer_thread.start()
    interrupted: BaseException | None = None
    try:
        if pool is not None:
            pool.run(fail, emit, stop)
        else:
            _reduce(job, [job.todo], fail, emit, stop)
    except BaseException as err:  # KeyboardInterrupt, SIGTERM: clean up, then re-raise
        interrupted = err
        stop.set()
    finally:
        if pool is not None:
            pool.close()
        if writer_thread.is_alive():
            # The writer drains what was reduced, then stops (the queue has room as it runs).
            _put(write_queue, _END, threading.Event())
            writer_thread.join()
    if interrupted is not None or writer_error:
        sink.abort()
    if interrupted is not None:
        raise interrupted
    integrator = job.integrator
    if job.writer is not None and integrator.shape is not None:
        # a file even when every frame failed to read: it lists the failures (a no-op when
        # rows were written)
        job.writer.start(integrator.table(job.config["split"]).radial,
                         sectors=integrator.sectors)
    if writer_error:
        err = writer_error[0]
        if isinstance(err, AzfilterError):   # the writer's own one-line message
            raise err
        if isinstance(err, OSError) and err.strerror:
            where = err.filename or job.output
            raise RunFailed(f"{where}: cannot write the output: {err.strerror}")
        raise RunFailed(f"{job.output}: cannot write the output: {err}")
    sink.close()


def _reduce(job: Job, batches: Iterable[list[Planned]], fail: Callable[..., None],
            emit: Callable[[Planned, str, Any], bool], stop: threading.Event) -> None:
    """Read and reduce the planned frames of ``batches`` (lists of consecutive plans, read
    one after the other through one engine stream): ``emit(planned, frame source, result)``
    for each frame reduced (False stops the run), ``fail`` for each one that is not.
    """
    integrator = job.integrator
    # decoder threads: the job's threads (they overlap with the engine's threads), shared by
    # the worker processes when there are several
    readers = max(1, job_threads(job.config) // job.processes)
    # sparsify picks its pixels on the host from the decoded frame: its chunks are decoded here
    device_decode = decode_on_device(job.config) and job.postprocess is None
    if device_decode:
        # Chunks left compressed cost a reader ~0.5 ms each (pread + block walk): a few
        # readers keep up with the device, and more only contend for the GIL with the thread
        # that feeds the engine (H200, 1000 Eiger 4M frames, sigma-clip: 270 frames/s with 16
        # readers, 314 with 8, 327 with 4; integrate 409 / 448 / 462, 487 with 2; with four
        # frames in flight, by the command's clock: 2 readers 739 / 809, 4 readers 682 / 708,
        # 1 reader 796 / 794, sigma-clip / integrate).
        readers = min(readers, DEVICE_DECODE_READERS)
    # Buffers the engine reads fastest (page-locked for OpenCL), reused frame after frame:
    # every frame iter_frames may hold decoded ahead, plus those in the engine (up to 4 in
    # flight on a GPU)
    buffers = integrator.frame_buffers(2 * readers + 2 + READ_AHEAD + 4)
    method, params = reduction_parameters(job.config)
    if job.config.get("backend") == "opencl":
        logger.info("%s: bitshuffle-LZ4 HDF5 chunks decoded on the %s (--decode %s)",
                    job.label, "device" if device_decode else "host",
                    job.config.get("decode") or "auto")
    lanes = ""
    if job.config["backend"] == "cython":
        from ..backends.cython import default_lanes  # the compiled engine loads only here

        lanes = f" ({default_lanes(integrator.threads)} frames at once)"
    logger.info("%s: %d frames%s; backend %s%s, engine threads %s%s, %d reader threads, "
                "%d cores usable", job.label, len(job.todo),
                f" shared by {job.processes} worker processes" if job.processes > 1 else "",
                job.config["backend"],
                f" (device {integrator.device})" if integrator.device else "",
                integrator.threads, lanes, readers, usable_cores())
    # frame source and buffer of each frame in the engine, until its result is back
    in_flight: dict[int, tuple[str, Any]] = {}

    monitor = MonitorReader(job.config["monitor"]) if job.config.get("monitor") else None
    monitors: dict[int, float] = {}

    def frames() -> Iterator[tuple[Planned, Any]]:
        for batch in batches:
            for planned, frame in _read_frames(batch, readers, buffers, fail, device_decode):
                if monitor is not None:
                    try:
                        monitors[id(planned)] = monitor.value(frame)
                    except FrameReadError as err:
                        buffers.give_back(_ring_buffer(frame.data))
                        fail(err, 1, planned=planned)
                        continue
                in_flight[id(planned)] = (_frame_source(frame), frame.data)
                yield planned, frame.data

    for planned, outcome in integrator.process_many(frames(), method, **params):
        frame_source, data = in_flight.pop(id(planned))
        frame_monitor = monitors.pop(id(planned), 1.0)
        if job.postprocess is not None and not isinstance(outcome, Exception):
            try:   # sparsify: pick the Bragg pixels while the raw frame is at hand
                outcome = job.postprocess(data, outcome)
            except Exception as err:  # noqa: BLE001 - one failed frame, reported
                outcome = err
        buffers.give_back(_ring_buffer(data))   # the engine has read it: reuse the buffer
        if stop.is_set():
            break
        if isinstance(outcome, Exception):
            reason = str(outcome) if isinstance(outcome, AzfilterError) else (
                f"reduction failed: {type(outcome).__name__}: {outcome}")
            fail(FrameReadError(planned.source, planned.index, reason), 1, planned=planned)
            continue
        if monitor is not None:
            outcome = divide_by_monitor(outcome, frame_monitor)
        if not emit(planned, frame_source, outcome):
            break
