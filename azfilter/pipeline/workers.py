"""Worker processes for the OpenCL backend: each reads and reduces blocks of frames through its
own engine, and the command's process writes their results in plan order.

Why processes: on a GPU the engine is no longer what binds the command. Every Python thread of
one process (the readers, the thread that feeds the engine and turns its sums into results,
the writer) holds the interpreter's lock for ~1.1-1.3 ms per Eiger 4M frame in all (H200
machine, 2026-11-29), so one process tops out at ~770 frames/s for sigma-clip while its
engine alone runs ~1500. Two processes each feed the device, and the GPU runs their kernels
in turn.

How (``fork``, Linux only)::

    command process                          worker k
      WorkerPool(job, count)  -- fork -->      ignores SIGINT; dies with its parent
      run():                                   starts OpenCL (and loads the lookup table
                                               from the disk cache, beside it), sends
                                               ("ready", device type)
        worker 0 ready: a GPU? start the rest   waits for blocks:
        (all at once for --device gpu)
        sends ("processes", n)              -->  shares the cores among n processes
        sends ("block", start, stop) ahead  -->    ("block", a, b): reads and reduces
        receives results and failures      <--     job.todo[a:b] through one engine stream,
        puts them in plan order, emits them        one record per planned frame
        ("end",) once every block is sent   -->  ("done",), then exits

Each planned frame gets exactly one record, a result or a failure, so the command knows
which frames a worker still owes. A worker sends its records in batches ("batch", records)
of up to :data:`RECORDS_PER_MESSAGE`, and at the end of each block (the command waits for the
block's frames in plan order), each field of the batch's results stacked into one array
(:func:`pack_records`): one message per frame cost the command's process ~0.35 ms per Eiger
4M frame to receive and unpickle (113 kB of ~15 small arrays, 2-core EPYC), more than its
writer thread (~0.2 ms). If a worker dies (a driver crash, the OOM killer), the frames it
owed are reported failed, naming the worker and how it ended (with those of its last batch,
not sent), and the blocks not yet handed out go to the others. Nothing is lost while the
process says 0.

Several devices (``--device 0:0,0:1``, ``all``): the operation's processes per device, each
worker on one device (worker k on the k-th device, cycling), because one process cannot feed
even one GPU (an in-process engine per device, multi.py, fed two H200s at 312 sigma-clip
frames/s against 772 for one GPU in two processes). For a list the workers start at once; for
``all`` the first worker lists the GPUs (the command's process must not start OpenCL) and the
command then starts the processes those GPUs need and ends the others.

The workers are forked before any thread of the run starts: a lock a thread held at the fork
(h5py's, the logging module's) would stay locked in the child. When the lookup table is in the
disk cache they are forked before it loads, and each loads it while its OpenCL starts (what one
process overlaps); else the command builds it once and they inherit it. The command's process
itself never starts OpenCL in this mode (a child cannot use a driver its parent started).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import AzfilterError, FrameReadError

logger = logging.getLogger(__name__)

#: environment variable: worker processes of an OpenCL run (1: none, all in this process)
PROCESSES_VARIABLE = "AZFILTER_OPENCL_PROCESSES"
#: worker processes on one GPU by default, by operation (fewer when the job may use fewer
#: than CORES_PER_PROCESS cores each; an operation not listed runs in one process). The GPU
#: runs the kernels of the contexts in turn, so more processes help only while each is bound
#: by its interpreter's lock: integrate's GPU work per frame is small (engine alone 8379 Eiger
#: 4M frames/s); sigma-clip's is larger (engine alone 2738 frames/s since its kernel reads a
#: bin's gathered values, 1531 before), medfilt's larger still (1590), and medfilt stays in one
#: process. The command over 1000 / 4000 Eiger 4M bitshuffle-LZ4 frames decoded on the device,
#: 1 / 2 / 3 processes (H200 machine, 2026-11-29): sigma-clip 2.90 / 2.77 / 3.12 s and 5.56 /
#: 4.85 / 5.19 s; integrate 1 / 3 / 4 processes over 4000: 3.82 / 2.72 / 3.08 s; medfilt 7.42 /
#: 8.56 / 8.60 s.
DEFAULT_PROCESSES = {"integrate": 3, "sigma-clip": 2}
#: the same when the first input is an uncompressed HDF5 stack (each frame's read and upload
#: then binds one process): 1000 uncompressed Eiger 4M frames, 1 / 3 processes, sigma-clip
#: 3.93 / 2.93, 2.57 / 1.97 and 4.28 / 3.24 s on three instances of the H200 machine; medfilt
#: 2.79 / 3.01 s (bound by the GPU). Sigma-clip, 1000 / 2000 frames, 3 / 4 processes, best of
#: 2-3 on two instances (2026-11-29): 3.65 / 3.58 s and 4.82 / 4.31 s; 2.21 / 2.10 s and
#: 3.13 / 2.82 s (6 processes: 3.91 s and 4.14 s); it takes 4 (at most one per 4 cores).
UNCOMPRESSED_PROCESSES = {"integrate": 3, "sigma-clip": 4}
#: cores each default worker process should have (two reader threads and the feeding one)
CORES_PER_PROCESS = 4
#: most devices a job started with ``--device all`` spreads its worker processes over (its
#: workers are forked before the first one has listed the GPUs)
MAX_ALL_DEVICES = 8
#: fewest frames for which the default starts worker processes: each starts OpenCL after the
#: fork, where one process starts it while the lookup table loads (~0.3 s later on the H200)
MIN_FRAMES = 400
#: blocks of consecutive frames each worker holds at once (read ahead while the command
#: writes the block before)
BLOCKS_AHEAD = 2
#: largest block of frames handed to a worker (smaller for short jobs, so that every worker
#: gets some)
MAX_BLOCK = 128
#: most records (results or failures) a worker sends in one message; it sends fewer at the end
#: of each block. Up to 16 Eiger 4M results of sigma-clip at 1000 bins make ~1.7 MB.
RECORDS_PER_MESSAGE = 16
#: smallest block: more frames than a worker's engine holds unreported (4 in flight on a GPU,
#: the one being uploaded and the one the stream's grouping looks ahead at: 6; twice that for
#: margin). A worker asks for its next block once it has taken every frame of the newest one it
#: holds; the command hands that out once it has written the worker's older block, whose
#: frames are then all out of the engine only if a block is longer than that.
MIN_BLOCK = 16


def planned_workers(config: dict[str, Any], frames: int,
                    environ: dict[str, str] | None = None, first_input: Any = None,
                    cores: int | None = None) -> int:
    """Worker processes a run of ``frames`` frames with ``config`` starts (1: none).

    ``AZFILTER_OPENCL_PROCESSES`` (a positive integer) chooses, for any OpenCL job that can
    use workers (1: one process; with several devices, one engine per device in it:
    multi.py); otherwise the operation's :data:`DEFAULT_PROCESSES` (its
    :data:`UNCOMPRESSED_PROCESSES` when ``first_input`` is an uncompressed HDF5 stack), at
    most one per :data:`CORES_PER_PROCESS` usable cores, over at least :data:`MIN_FRAMES`
    frames on devices that are not ``cpu`` (the first worker checks that its device is a GPU
    before the others start). Several devices: that many per device
    (:func:`several_device_workers`; for ``all``, as if there were :data:`MAX_ALL_DEVICES`,
    and the first worker's count of the GPUs decides how many start).

    Raises
    ------
    AzfilterError
        When the environment variable is not a positive integer.
    """
    from ..vocabulary import ALL_GPUS_WORDS, names_several_devices, parse_device_spec

    environ = os.environ if environ is None else environ
    asked = environ.get(PROCESSES_VARIABLE, "").strip()
    if asked and (not asked.isdigit() or int(asked) < 1):
        raise AzfilterError(f"{PROCESSES_VARIABLE} must be a positive integer, got {asked!r}")
    # Linux only: fork is unsafe on macOS's system frameworks, and PR_SET_PDEATHSIG is Linux's
    if config.get("backend") != "opencl" or config.get("operation") == "sparsify" \
            or not sys.platform.startswith("linux") or frames < 2:
        return 1
    try:
        tokens = parse_device_spec(config.get("device"))
    except ValueError:
        return 1
    several = names_several_devices(tokens)
    if asked:
        return int(asked)
    if frames < MIN_FRAMES or (tokens and "cpu" in tokens):
        return 1
    per_device = processes_per_device(config, first_input)
    cap = process_cap(cores)
    if several:
        devices = len(tokens) if tokens[0] not in ALL_GPUS_WORDS else MAX_ALL_DEVICES
        return several_device_workers(per_device, devices, cap)
    if per_device == 1:
        return 1
    return max(1, min(per_device, cap))


def process_cap(cores: int | None = None) -> int:
    """Most default worker processes: one per :data:`CORES_PER_PROCESS` of ``cores`` (the
    usable cores when None), at least one."""
    if cores is None:
        from ..resources import usable_cores

        cores = usable_cores()
    return max(1, cores // CORES_PER_PROCESS)


def several_device_workers(per_device: int, devices: int, cap: int) -> int:
    """Worker processes for ``devices`` devices: ``per_device`` each, at most ``cap`` (one per
    :data:`CORES_PER_PROCESS` cores) but at least one per device, up to ``2 * cap`` (their
    reader threads then share the cores)."""
    return max(min(devices, 2 * cap), min(per_device * devices, cap))


def processes_per_device(config: dict[str, Any], first_input: Any = None) -> int:
    """The operation's worker processes on one device: :data:`DEFAULT_PROCESSES`, or
    :data:`UNCOMPRESSED_PROCESSES` when ``first_input`` is an uncompressed HDF5 stack."""
    operation = config.get("operation")
    wanted = DEFAULT_PROCESSES.get(operation, 1)
    uncompressed = UNCOMPRESSED_PROCESSES.get(operation, wanted)
    if uncompressed != wanted and uncompressed_hdf5(first_input):   # reads the file's header
        wanted = uncompressed
    return wanted


def uncompressed_hdf5(item: Any) -> bool:
    """Whether ``item`` (an input file) is an HDF5 stack stored without compression."""
    if item is None:
        return False
    from ..frames import describe_file

    try:
        info = describe_file(item)
    except Exception:  # noqa: BLE001 - unreadable here: the run reports it, one process
        return False
    return info.get("format") == "HDF5" and info.get("compression") == "none"


def worker_count(job: Any) -> int:
    """Worker processes for ``job`` (1: reduce in this process): what :func:`planned_workers`
    gave when the job was prepared (``job.processes``)."""
    if job.postprocess is not None:   # sparsify picks on the raw frames of this process
        return 1
    return job.processes


def block_bounds(total: int, workers: int) -> list[tuple[int, int]]:
    """The blocks ``(start, stop)`` of ``total`` planned frames for ``workers`` worker
    processes: each a share of the frames still left (``BLOCKS_AHEAD * workers * 2`` shares),
    between :data:`MIN_BLOCK` and :data:`MAX_BLOCK` frames, so that they shrink towards the
    end and the workers finish their last blocks at about the same time (with blocks of one
    size, the run waited for the last worker's whole last block: 128 frames are ~0.2 s of one
    worker on an H200)."""
    shares = BLOCKS_AHEAD * max(1, workers) * 2
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < total:
        size = max(MIN_BLOCK, min(MAX_BLOCK, -(-(total - start) // shares)))
        bounds.append((start, min(start + size, total)))
        start += size
    return bounds


def starts_all(config: dict[str, Any], environ: dict[str, str] | None = None) -> bool:
    """Whether every worker starts at once, each starting OpenCL beside the others: when
    ``AZFILTER_OPENCL_PROCESSES`` sets their number (whatever the device), when
    ``--device gpu`` names a GPU, or when ``--device`` lists several devices (the first
    worker need not find out the device's type before the others start). Otherwise the
    others start once the first has found a GPU: each costs a start of OpenCL and its share
    of the cores, which a CPU device does not repay."""
    from ..vocabulary import parse_device_spec

    environ = os.environ if environ is None else environ
    if environ.get(PROCESSES_VARIABLE, "").strip():
        return True
    try:
        tokens = parse_device_spec(config.get("device"))
    except ValueError:
        return False
    # a list of devices is a list of GPUs in practice (each worker checks its own); `all`
    # waits for the first worker's count of the GPUs
    return tokens == ["gpu"] or (tokens is not None and len(tokens) > 1)


# Reduce = (batches of planned frames, fail, emit, stop) -> None; run.py's _reduce.
Reduce = Callable[[Iterator[list], Callable[..., None], Callable[..., bool], threading.Event],
                  None]


@dataclasses.dataclass
class _Worker:
    index: int
    process: Any
    connection: Any
    blocks: collections.deque = dataclasses.field(default_factory=collections.deque)
    alive: bool = True
    started: bool = False
    told_to_end: bool = False
    device_type: str | None = None
    device: str | None = None
    devices: int = 1     # devices the job's --device names (as this worker found them)

    def ended(self) -> str:
        """How the process ended, for the failure messages of the frames it owed."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is None:
            return "did not answer"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"ended with exit status {code}"


class WorkerPool:
    """Worker processes reducing blocks of ``job.todo`` (see the module docstring).

    Parameters
    ----------
    job : azfilter.pipeline.run.Job
        The prepared job: the workers inherit its integrator (with its lookup table, unless
        ``load_table``).
    count : int
        Worker processes (at least 2).
    reduce : callable
        ``reduce(batches, fail, emit, stop)``: reads and reduces every frame of the batches
        (lists of planned frames), calling ``emit(planned, frame source, result)`` or
        ``fail(error, 1, planned=planned)`` once per planned frame.
    load_table : bool
        The job's lookup table is not loaded yet (it is in the disk cache): each worker loads
        it while OpenCL starts, as one process does, instead of starting OpenCL after the
        command loaded it.
    """

    def __init__(self, job: Any, count: int, reduce: Reduce, load_table: bool = False):
        self.job = job
        self.start_all = starts_all(job.config)
        self.pending: dict[int, tuple] = {}   # position in job.todo -> its message
        context = multiprocessing.get_context("fork")
        self.workers: list[_Worker] = []
        for index in range(count):
            ours, theirs = context.Pipe(duplex=True)
            process = context.Process(
                target=_worker_main, name=f"azfilter-worker-{index}", daemon=True,
                args=(job, index, theirs, reduce, not (index == 0 or self.start_all),
                      load_table))
            with warnings.catch_warnings():   # "multi-threaded process": see the docstring
                warnings.simplefilter("ignore", DeprecationWarning)
                process.start()
            theirs.close()
            self.workers.append(_Worker(index, process, ours,
                                        started=index == 0 or self.start_all))
        logger.info("%s: %d worker processes (pids %s), blocks of up to %d frames%s",
                    job.label, count, " ".join(str(w.process.pid) for w in self.workers),
                    MAX_BLOCK, "; each loads the lookup table from the cache" if load_table
                    else "")

    # ------------------------------------------------------------------ command side
    def run(self, fail: Callable[..., None], emit: Callable[..., bool],
            stop: threading.Event) -> None:
        """Hand out the blocks, put the workers' messages in plan order, ``emit`` each result
        and ``fail`` each failed frame; returns when every planned frame is accounted for.

        Raises
        ------
        AzfilterError
            A worker could not start its engine (no OpenCL device...): the run stops as it
            would in one process.
        """
        todo = self.job.todo
        total = len(todo)
        blocks = block_bounds(total, len(self.workers))
        pending = self.pending             # position -> the worker's message for it
        owners: dict[int, _Worker | None] = {}   # block start -> the worker reducing it
        handed = 0                         # blocks[:handed] have a worker (or failed)

        first = self.workers[0]
        message = self._receive(first)
        if not self.start_all:
            wanted = self._wanted(first) if message is not None else len(self.workers)
            for worker in self.workers[1:wanted]:
                self._send(worker, ("start",))
                worker.started = True
            for worker in self.workers[wanted:]:
                self._send(worker, ("end",))
                worker.told_to_end = True
                worker.alive = False
            if first.device_type != "GPU" and message is not None:
                # a CPU device gains nothing from a second process
                logger.info("%s: the device is a %s: one worker process", self.job.label,
                            first.device_type)

        def hand_out(worker: _Worker | None) -> None:
            """The next block to ``worker`` (to the least busy one if it has ended)."""
            nonlocal handed
            if handed >= len(blocks):
                self._no_more_blocks()
                return
            if worker is None or not worker.alive:
                candidates = [w for w in self.workers if w.alive and w.started]
                worker = min(candidates, key=lambda w: len(w.blocks), default=None)
            start, end = blocks[handed]
            handed += 1
            owners[start] = worker
            if worker is None:
                for position in range(start, end):
                    pending.setdefault(position, ("lost", "no worker process was left"))
                return
            worker.blocks.append((start, end))
            self._send(worker, ("block", start, end))
            if handed == len(blocks):
                self._no_more_blocks()

        active = [w for w in self.workers if w.alive and w.started]
        for worker in active:   # how many share the cores (one alone on a CPU device)
            self._send(worker, ("processes", len(active)))
        for _ in range(BLOCKS_AHEAD):
            for worker in self.workers:
                if worker.alive and worker.started:
                    hand_out(worker)
        if handed == 0:
            hand_out(None)
        position = 0
        for start, end in blocks:
            if start not in owners:   # every worker ended: this block fails as a whole
                hand_out(None)
            while position < end:
                if stop.is_set():
                    return
                message = pending.pop(position, None)
                if message is None:
                    self._wait()
                    continue
                planned = todo[position]
                if message[0] == "result":
                    _, _, frame_source, result = message
                    result.geometry = self.job.integrator.geometry
                    if not emit(planned, frame_source, result):
                        return
                elif message[0] == "failed":
                    _, _, source, index, reason = message
                    fail(FrameReadError(source, index, reason), 1, planned=planned)
                else:   # "lost": its worker ended before reducing it
                    fail(FrameReadError(planned.source, planned.index,
                                        f"not reduced: {message[1]}"), 1, planned=planned)
                position += 1
            owner = owners.pop(start)
            if owner is not None and owner.blocks and owner.blocks[0][0] == start:
                owner.blocks.popleft()
            hand_out(owner)

    def _wanted(self, first: _Worker) -> int:
        """Workers to start once the first is ready: one on a CPU device; all of them on a
        GPU; with ``--device all``, as many as the GPUs the first one found need."""
        if first.device_type != "GPU":
            return 1
        if not self.job.integrator.several_devices:
            return len(self.workers)
        per_device = processes_per_device(self.job.config,
                                          self.job.todo[0].item if self.job.todo else None)
        return min(len(self.workers),
                   several_device_workers(per_device, first.devices, process_cap()))

    def _no_more_blocks(self) -> None:
        """Every block is handed out: each worker finishes its own and ends (a worker waiting
        for a block holds the last frames of its newest one in its engine)."""
        for worker in self.workers:
            if worker.alive and worker.started and not worker.told_to_end:
                worker.told_to_end = True
                self._send(worker, ("end",))

    def _send(self, worker: _Worker, message: tuple) -> None:
        try:
            worker.connection.send(message)
        except OSError:
            self._lost(worker)

    def _wait(self) -> None:
        """Receive at least one message from the workers that owe frames."""
        owing = [w for w in self.workers if w.alive and w.started]
        if not owing:   # cannot happen: a dead worker's frames are already marked lost
            raise AzfilterError("no worker process left and frames still owed")
        ready = multiprocessing.connection.wait([w.connection for w in owing])
        for worker in owing:
            if worker.connection in ready:
                self._receive(worker)

    def _receive(self, worker: _Worker) -> tuple | None:
        """One message of ``worker`` into ``pending`` (or its readiness, or its end)."""
        try:
            message = worker.connection.recv()
        except (EOFError, OSError):
            self._lost(worker)
            return None
        kind = message[0]
        if kind == "batch":
            for record in unpack_records(message[1]):
                self.pending[record[1]] = record
        elif kind == "ready":
            _, worker.device_type, worker.device, worker.devices = message
            logger.info("%s: worker %d ready on a %s (%s)", self.job.label, worker.index,
                        worker.device_type, worker.device)
        elif kind == "done":   # every frame it was given is accounted for
            worker.alive = False
        elif kind == "fatal":
            worker.alive = False
            raise AzfilterError(message[1])
        return message

    def _lost(self, worker: _Worker) -> None:
        """``worker`` ended: the frames it owed fail, naming it."""
        if not worker.alive:
            return
        worker.alive = False
        how = f"worker process {worker.index} (pid {worker.process.pid}) {worker.ended()}"
        for start, end in worker.blocks:
            for position in range(start, end):
                self.pending.setdefault(position, ("lost", how))
        worker.blocks.clear()
        logger.warning("%s: %s", self.job.label, how)

    def close(self) -> None:
        """Tell the workers that no block follows; wait for those that still owe frames (the
        run stopped part-way) and kill any that does not end.

        A worker that owes nothing is not waited for: it ends by itself once told, and its
        end is mostly the driver releasing its context and page-locked buffers, which would
        delay the output's rename and the command's exit. multiprocessing reaps it when the
        next pool starts (``azfilter watch``); it dies with this process anyway
        (``_die_with_parent``).
        """
        for worker in self.workers:
            if worker.alive and not worker.told_to_end:
                worker.told_to_end = True
                try:
                    worker.connection.send(("end",))
                except OSError:
                    pass
        for worker in self.workers:
            if not worker.blocks and worker.told_to_end:
                worker.connection.close()
                continue
            worker.process.join(timeout=10 if worker.alive else 0.5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.connection.close()


# ------------------------------------------------------------------ batches of records
def pack_records(records: list[tuple]) -> tuple:
    """``records`` (``("result", position, frame source, Result)`` and ``("failed", ...)``
    tuples) for one message: the failures as they are; the results' fields each as one
    value (:func:`_pack_column`), so that a batch pickles a few large arrays instead of
    ~15 small ones per frame."""
    failed = [record for record in records if record[0] != "result"]
    results = [record for record in records if record[0] == "result"]
    heads = [record[:3] for record in results]
    column = _pack_column([record[3] for record in results]) if results else None
    return failed, heads, column


def unpack_records(packed: tuple) -> list[tuple]:
    """The records :func:`pack_records` packed (the results' arrays are views of the batch's
    stacked arrays)."""
    failed, heads, column = packed
    results = _unpack_column(column, len(heads)) if heads else []
    return failed + [(*head, result) for head, result in zip(heads, results, strict=True)]


def _pack_column(values: list) -> tuple:
    """One field of a batch's results: ``("same", value)`` when every result holds the same
    object (the parameters) or equal arrays (the radial bins), ``("stacked", array)`` for
    arrays of one shape and dtype, ``("fields", class, {name: column})`` for dataclasses of
    one class (a Result, its Outliers), else ``("each", values)``."""
    first = values[0]
    if all(value is first for value in values):
        return ("same", first)
    if isinstance(first, np.ndarray) and all(
            isinstance(value, np.ndarray) and value.shape == first.shape
            and value.dtype == first.dtype for value in values):
        # equal arrays (each result's copy of the radial bins) are sent once; the last one
        # first, since the data of two frames almost never agree
        if np.array_equal(first, values[-1]) \
                and all(np.array_equal(first, value) for value in values[1:-1]):
            return ("same", first)
        return ("stacked", np.stack(values))
    if dataclasses.is_dataclass(first) and not isinstance(first, type) \
            and all(type(value) is type(first) for value in values):
        return ("fields", type(first),
                {field.name: _pack_column([getattr(value, field.name) for value in values])
                 for field in dataclasses.fields(first)})
    return ("each", list(values))


def _unpack_column(column: tuple, count: int) -> list:
    kind = column[0]
    if kind == "same":
        return [column[1]] * count
    if kind == "stacked":
        return list(column[1])
    if kind == "fields":
        cls, fields = column[1], column[2]
        values = {name: _unpack_column(packed, count) for name, packed in fields.items()}
        init = [field.name for field in dataclasses.fields(cls) if field.init]
        later = [name for name in values if name not in init]
        objects = []
        for row in range(count):
            obj = cls(**{name: values[name][row] for name in init})
            for name in later:
                setattr(obj, name, values[name][row])
            objects.append(obj)
        return objects
    return column[1]


# ------------------------------------------------------------------ worker side
def _worker_main(job: Any, index: int, connection: Any, reduce: Reduce,
                 wait_for_start: bool, load_table: bool) -> None:
    """A worker process: start the engine, then reduce the blocks the command sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the command handles Ctrl-C
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    _die_with_parent()
    status = 0
    try:
        if wait_for_start and connection.recv()[0] != "start":
            os._exit(0)
        devices = _take_one_device(job, index)
        if load_table:
            from ..backends.opencl.devices import warm_up

            starting = warm_up(job.integrator.device)
            job.integrator.table(job.config["split"])
            starting.join()
        connection.send(("ready", _device_type(job), job.integrator.device, devices))
        message = connection.recv()
        if message[0] != "processes":
            os._exit(0)
        job.processes = message[1]
        # id(planned) -> (its position in job.todo, the start of its block)
        positions: dict[int, tuple[int, int]] = {}
        owed: dict[int, int] = {}       # block start -> its frames not yet in the outbox
        outbox: list[tuple] = []        # records not sent yet

        def batches() -> Iterator[list]:
            while True:
                message = connection.recv()
                if message[0] != "block":
                    return
                _, start, end = message
                batch = job.todo[start:end]
                for offset, planned in enumerate(batch):
                    positions[id(planned)] = (start + offset, start)
                owed[start] = end - start
                yield batch

        def add(record: tuple, block: int) -> None:
            """``record`` to the outbox, sent when full or when ``block`` is accounted for."""
            outbox.append(record)
            owed[block] -= 1
            block_done = not owed[block]
            if block_done:
                del owed[block]
            if block_done or len(outbox) >= RECORDS_PER_MESSAGE:
                send_outbox()

        def send_outbox() -> None:
            if outbox:
                connection.send(("batch", pack_records(outbox)))
                outbox.clear()

        def fail(error: Exception, frames: int = 1, planned: Any = None) -> None:
            position, block = positions.pop(id(planned))
            reason = error.reason if isinstance(error, FrameReadError) else str(error)
            source = getattr(error, "source", planned.source)
            add(("failed", position, source, getattr(error, "index", None), reason), block)

        def emit(planned: Any, frame_source: str, result: Any) -> bool:
            position, block = positions.pop(id(planned))
            # the geometry is the command's own: not sent with every frame
            add(("result", position, frame_source, dataclasses.replace(result, geometry=None)),
                block)
            return True

        reduce(batches(), fail, emit, threading.Event())
        send_outbox()
        connection.send(("done",))
    except BaseException as err:  # noqa: BLE001 - reported to the command, which stops
        status = 1
        text = str(err) if isinstance(err, AzfilterError) else (
            f"worker process {index} failed: {type(err).__name__}: {err}")
        try:
            connection.send(("fatal", text))
        except OSError:
            pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        _release_standard_streams()
        os._exit(status)   # no interpreter teardown: the command's files are not ours


def _release_standard_streams() -> None:
    """Point this worker's stdin, stdout and stderr at /dev/null before it ends.

    Its end is mostly the driver releasing the OpenCL context and page-locked buffers;
    whoever reads the command's output through a pipe (a shell's ``$(...)``, ``| tee``,
    Python's ``subprocess.run``) waits for every holder of the pipe to close it, so without
    this it would wait for that teardown after the command is done.
    """
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for stream in (0, 1, 2):
            os.dup2(null, stream)
        os.close(null)
    except OSError:
        pass


def _take_one_device(job: Any, index: int) -> int:
    """A job over several devices: this worker (``index``) takes the ``index``-th of them,
    cycling; returns how many the job names (for ``all``, the GPUs found here)."""
    integrator = job.integrator
    if not integrator.several_devices:
        return 1
    from ..backends.opencl.devices import select_devices

    picked = select_devices(integrator.device)
    info, _ = picked[index % len(picked)]
    integrator.use_one_device(info["id"])
    return len(picked)


def _device_type(job: Any) -> str:
    """The type (``GPU``, ``CPU``...) of the device this worker's engine runs on."""
    from ..backends.opencl.devices import select_device

    info, _ = select_device(job.integrator.device)
    return str(info.get("type"))


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the command's process ends."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if os.getppid() == 1:           # the parent ended before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass
