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

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as cfg
from ..errors import AzfilterError, FrameReadError, RunFailed
from ..vocabulary import METHOD_OF
from . import plan as planning
from .plan import Block, Planned
from .progress import Progress, plural

# Frames each reader may have decoded ahead of the reducer (memory stays flat).
READ_AHEAD = 2
# Results waiting for the writer thread.
WRITE_QUEUE = 8


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
        "radial_range", "azimuth_range", "backend", "device"]
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
    elif operation == "sigma-clip":
        params = {"thres": config["thres"], "max_iter": config["max_iter"],
                  "error_model": config["error_model"]}
    else:
        percentile = config["percentile"]
        params = {"percentile": percentile[0] if len(percentile) == 1 else tuple(percentile),
                  "split": config["split"], "error_model": config["error_model"]}
    return METHOD_OF[operation], params


def make_integrator(config: dict[str, Any], geometry: Any, first_item: Any | None) -> Any:
    """The job's Integrator, its lookup table built (or loaded) so that errors show now.

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
        normalization=config["normalization"], threads=config["threads"],
        pixel_mask=pixel_mask,
    )
    if integrator.shape is not None:
        integrator.table(config["split"])
    return integrator


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
    from ..output import NexusWriter, OutputMeta, geometry_lines
    from ..poni import load_poni

    shard = cfg.parse_shard(config["shard"]) if config.get("shard") else \
        planning.environment_shard()
    geometry = load_poni(config["poni"])
    output_arg = config["output"]
    out_kind = planning.output_kind(output_arg)
    output = planning.shard_output(output_arg, shard) if out_kind == "hdf5" else output_arg
    notes: list[str] = []

    def noted(text: str) -> None:
        notes.append(text)
        if note is not None:
            note(text)

    items = planning.expand(config["inputs"], config["recursive"],
                            output if out_kind == "hdf5" else None, noted)
    plan = planning.select_shard(
        planning.plan_frames(items, out_kind, output, config["unit"]), shard)
    frames = [p for p in plan if p.error is None]
    if out_kind in ("stdout", "textfile") and len(frames) > 1:
        raise AzfilterError(f"-o {output_arg} takes one frame, but the inputs hold "
                            f"{len(frames)}; give a directory (out/) or an .h5 file")
    planning.check_collisions(frames)

    job_config = cfg.job_config(config)
    job_config["output"] = os.path.abspath(output_arg) if output_arg != "-" else "-"
    meta = OutputMeta(
        operation=config["operation"], unit=config["unit"],
        parameters=operation_parameters(config), poni_text=geometry.to_poni(),
        geometry=geometry_lines(geometry), config=job_config,
        shard=None if shard is None else f"{shard[0]}/{shard[1]}",
    )
    mode = "overwrite" if config["overwrite"] else (
        "append" if config["skip_existing"] else "new")
    todo, skipped = planning.skip_existing(frames, out_kind, output, mode, config["npt"])
    writer = None
    if out_kind == "hdf5":
        writer = NexusWriter(output, meta, mode=mode)
        if mode == "append":
            todo, more = planning.drop_stored(todo, writer.existing)
            skipped += more
    job = Job(config=config, geometry=geometry, out_kind=out_kind, output=output, shard=shard,
              todo=todo, skipped=skipped, failures=[p for p in plan if p.error is not None],
              meta=meta, writer=writer, notes=notes)
    if dry_run:
        return job
    # The integrator (lookup table) only when there is work: a cron run that finds nothing
    # new stays cheap. An HDF5 output with nothing to put in it is still written (empty) when
    # nothing failed, so that every shard of an array job leaves its file for `merge`.
    empty_output = (out_kind == "hdf5" and not todo and not job.failures
                    and not Path(output).exists())
    if todo or empty_output:
        job.integrator = make_integrator(config, geometry, todo[0].item if todo else None)
        meta.geometry = geometry_lines(job.integrator.geometry)
        if empty_output and writer is not None and job.integrator.shape is not None:
            writer.start(job.integrator.table(config["split"]).radial)
    return job


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

    def fail(error: Exception, frames: int = 1) -> None:
        with counters.lock:
            counters.failed += frames
            report.failures.append(str(error))
        progress.message(f"azfilter: failed: {error}")
        for _ in range(frames):
            progress.step(failed=True)

    for failure in job.failures:
        fail(failure.error)
    try:
        _stream(job, _make_sink(job), progress, counters, fail)
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


def _taker(buffers: Any) -> Callable[[Any, Any], Any]:
    """The readers' ``buffer(shape, dtype)``: a ring buffer, or a new array when all are
    lent (a reader never waits for a buffer: no deadlock with the bounded queues)."""
    import numpy as np

    def take(shape: Any, dtype: Any) -> Any:
        buffer = buffers.take(shape, dtype)
        return np.empty(shape, dtype=dtype) if buffer is None else buffer

    return take


def _read_block(block: Block, q: queue.Queue, stop: threading.Event,
                buffers: Any | None = None) -> None:
    """Reader task: decode the block's frames into ``q`` (then _END)."""
    from ..frames import Frame, open_frames

    first, last = block.frames[0].index, block.frames[-1].index
    item = block.item.select(range(first, last + 1))
    try:
        for obj in open_frames([item], errors="report",
                               buffer=None if buffers is None else _taker(buffers)):
            if buffers is not None and isinstance(obj, Frame):
                obj.data = buffers.fill(obj.data)
            if not _put(q, obj, stop):
                return
    except Exception as err:  # noqa: BLE001 - a reader must never die silently
        _put(q, FrameReadError(block.frames[0].source, None,
                               f"read error: {type(err).__name__}: {err}"), stop)
    finally:
        _put(q, _END, stop)


def _read_frames(todo: list[Planned], threads: int | None, buffers: Any,
                 stop: threading.Event, fail: Callable[[Exception, int], None]
                 ) -> Iterator[tuple[Planned, Any]]:
    """The planned frames in order as (planned, Frame); read failures go to ``fail``.

    A pool of reader threads decodes blocks of frames ahead into bounded queues.
    """
    groups = planning.blocks(todo)
    readers = 1 if threads == 1 else 2
    window = readers + 1
    pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="azfilter-reader")
    pending: list[tuple[Block, queue.Queue]] = []
    next_block = 0
    try:
        while (pending or next_block < len(groups)) and not stop.is_set():
            while next_block < len(groups) and len(pending) < window:
                block_queue: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
                pool.submit(_read_block, groups[next_block], block_queue, stop, buffers)
                pending.append((groups[next_block], block_queue))
                next_block += 1
            block, block_queue = pending.pop(0)
            expected = {planned.index: planned for planned in block.frames}
            while not stop.is_set():
                try:
                    obj = block_queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if obj is _END:
                    break
                if isinstance(obj, FrameReadError):
                    if obj.index is None:
                        fail(obj, len(expected))
                        expected.clear()
                    elif obj.index in expected:
                        expected.pop(obj.index)
                        fail(obj, 1)
                    continue
                planned = expected.pop(obj.index, None)
                if planned is None:
                    if buffers is not None:
                        buffers.give_back(obj.data)
                    continue
                yield planned, obj
            if expected and not stop.is_set():
                for planned in expected.values():
                    fail(FrameReadError(planned.source, planned.index,
                                        "frame was not delivered by the reader"), 1)
    finally:
        stop.set()   # readers still running (the consumer stopped early) put nothing more
        pool.shutdown(wait=True, cancel_futures=True)


def _frame_source(obj: Any) -> str:
    part = planning.file_part(obj.source)
    return obj.source if os.path.isabs(part) else os.path.abspath(part) + obj.source[len(part):]


def _stream(job: Job, sink: Any, progress: Progress, counters: Counters,
            fail: Callable[[Exception, int], None]) -> None:
    """Read (thread pool) -> reduce (this thread, process_many) -> write (writer thread)."""
    if not job.todo:
        sink.close()
        return
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

    writer_thread = threading.Thread(target=writer, name="azfilter-writer", daemon=True)
    writer_thread.start()
    integrator = job.integrator
    threads = job.config.get("threads")
    # Buffers the engine reads fastest (page-locked for OpenCL), reused frame after frame:
    # enough for every frame the read-ahead queues can hold, plus the readers' and the
    # engine's own.
    readers = 1 if threads == 1 else 2
    buffers = _frame_buffers(integrator, (readers + 1) * (READ_AHEAD + 1) + 4)
    method, params = reduction_parameters(job.config)
    interrupted: BaseException | None = None
    read_stop = threading.Event()
    # frame source and buffer of each frame in the engine, until its result is back
    in_flight: dict[int, tuple[str, Any]] = {}

    def frames() -> Iterator[tuple[Planned, Any]]:
        for planned, frame in _read_frames(job.todo, threads, buffers, read_stop, fail):
            in_flight[id(planned)] = (_frame_source(frame), frame.data)
            yield planned, frame.data

    try:
        for planned, outcome in _process_many(integrator, frames(), method, params):
            frame_source, data = in_flight.pop(id(planned))
            buffers.give_back(data)   # the engine has read it: reuse the buffer
            if stop.is_set():
                break
            if isinstance(outcome, Exception):
                reason = str(outcome) if isinstance(outcome, AzfilterError) else (
                    f"reduction failed: {type(outcome).__name__}: {outcome}")
                fail(FrameReadError(planned.source, planned.index, reason), 1)
                continue
            if not _put(write_queue, (planned, frame_source, outcome), stop):
                break
    except BaseException as err:  # KeyboardInterrupt, SIGTERM: clean up, then re-raise
        interrupted = err
        stop.set()
    finally:
        read_stop.set()
        if writer_thread.is_alive():
            # The writer drains what was reduced, then stops (the queue has room as it runs).
            _put(write_queue, _END, threading.Event())
            writer_thread.join()
    if interrupted is not None or writer_error:
        sink.abort()
    if interrupted is not None:
        raise interrupted
    if writer_error:
        err = writer_error[0]
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise RunFailed(f"cannot write the output: {reason}")
    sink.close()


# TEMPORARY until the engines branch lands (Integrator.process_many / frame_buffers).
class _NoBuffers:
    def take(self, shape: Any, dtype: Any) -> None:
        return None

    def fill(self, data: Any) -> Any:
        return data

    def give_back(self, data: Any) -> None:
        return None


def _frame_buffers(integrator: Any, capacity: int) -> Any:
    if hasattr(integrator, "frame_buffers"):
        return integrator.frame_buffers(capacity)
    return _NoBuffers()


def _process_many(integrator: Any, frames: Any, method: str, params: dict) -> Iterator:
    if hasattr(integrator, "process_many"):
        yield from integrator.process_many(frames, method, **params)
        return
    for tag, data in frames:
        try:
            yield tag, getattr(integrator, method)(data, **params)
        except Exception as err:  # noqa: BLE001
            yield tag, err
