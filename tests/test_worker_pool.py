"""The worker pool's protocol without OpenCL (``azfilter.pipeline.workers.WorkerPool``).

The workers run a stand-in reduction (no engine), so that what is tested is the pool: every
planned frame comes back once, in plan order, and neither closing the pool nor a pipe
reading the command's output waits for workers that owe nothing (their end is the driver's
teardown on a GPU node). The OpenCL runs of the same pool are in ``test_workers.py``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from types import SimpleNamespace

from azfilter.pipeline import workers

#: how long each stand-in worker takes to end after its last message
SLOW_END_S = 3.0


@dataclasses.dataclass
class FakeResult:
    position: int
    geometry: object = None


def stand_in_reduce(batches, fail, emit, stop) -> None:
    """What a worker's engine would do: one result per planned frame."""
    for batch in batches:
        for planned in batch:
            emit(planned, f"frame {planned.index}", FakeResult(planned.index))


def test_close_does_not_wait_for_workers_that_owe_nothing(monkeypatch):
    real_exit = os._exit

    def slow_exit(status: int) -> None:   # a GPU worker releasing its context
        released = all(os.path.samefile(f"/proc/self/fd/{stream}", os.devnull)
                       for stream in (0, 1, 2))
        time.sleep(SLOW_END_S)
        real_exit(status if released else 7)

    # inherited by the forked workers: each ends SLOW_END_S after it said "done"
    monkeypatch.setattr(os, "_exit", slow_exit)
    monkeypatch.setattr(workers, "_device_type", lambda job: "GPU")
    todo = [SimpleNamespace(index=k, source="stack.h5") for k in range(100)]
    job = SimpleNamespace(config={"device": "gpu", "operation": "integrate"}, todo=todo,
                          label="integrate",
                          integrator=SimpleNamespace(geometry="geometry", device="gpu",
                                                     several_devices=False),
                          processes=None)
    emitted: list[tuple[int, str]] = []
    failed: list[object] = []

    def emit(planned, frame_source, result) -> bool:
        assert result.position == planned.index and result.geometry == "geometry"
        emitted.append((planned.index, frame_source))
        return True

    pool = workers.WorkerPool(job, 2, stand_in_reduce)
    pool.run(lambda error, frames=1, planned=None: failed.append(error), emit,
             threading.Event())
    started = time.monotonic()
    pool.close()
    closing = time.monotonic() - started
    assert not failed
    assert emitted == [(k, f"frame {k}") for k in range(100)]
    assert closing < SLOW_END_S / 2, f"close() waited {closing:.2f} s for the workers"
    # they do end, by themselves, with status 0, their standard streams released first
    # (7: a pipe to the command's reader was still held while the driver tore down)
    for worker in pool.workers:
        worker.process.join(timeout=30)
        assert worker.process.exitcode == 0
