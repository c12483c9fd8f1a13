"""Worker processes of an OpenCL run (``azfilter.pipeline.workers``).

Each worker reads and reduces blocks of frames through its own engine; the command writes
their results in plan order. The outputs must equal a one-process run's bit for bit (results
and failed frames), a worker killed mid-run must cost only the frames it owed (each reported,
naming the worker), and the default must fall back to one worker on a CPU device. The command
runs in a fresh process: a worker is forked, and a process that has started OpenCL (this
pytest process has) cannot hand the driver to a child.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from opencl_device import opencl_test_device
from test_decode_device import PONI, corrupt_chunks, ring_frames, write_bslz4

from azfilter.errors import AzfilterError
from azfilter.output import read_result
from azfilter.pipeline import workers
from azfilter.resources import usable_cores

pytestmark = pytest.mark.opencl

STABLE = ("entry/end_time", "entry/start_time", "entry/reduction/date",
          "entry/reduction/configuration/data")   # dates, and the output's own path


@pytest.fixture(scope="module")
def device() -> str:
    return opencl_test_device()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """300 uint32 frames, bitshuffle-LZ4, frames 2 and 4 corrupt."""
    folder = tmp_path_factory.mktemp("workers")
    path = folder / "stack.h5"
    write_bslz4(path, ring_frames(300, np.uint32))
    corrupt = corrupt_chunks(path, np.uint32)
    (folder / "geo.poni").write_text(PONI)
    return folder, path, corrupt


def command(folder, inputs, output, device, processes: str | None, *extra: str,
            operation: str = "sigma-clip") -> list[str]:
    options = ["--thres", "3"] if operation == "sigma-clip" else []
    return [sys.executable, "-m", "azfilter", operation, "-v", "--npt", "50", *options,
            "-p", str(folder / "geo.poni"), "--backend", "opencl", "--device", device,
            *extra, *map(str, inputs), "-o", str(output)]


def environment(processes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != workers.PROCESSES_VARIABLE}
    if processes is not None:
        env[workers.PROCESSES_VARIABLE] = processes
    return env


def datasets(path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: found.__setitem__(name, obj[()])
                      if isinstance(obj, h5py.Dataset) and name not in STABLE else None)
    return found


def assert_same_output(expected, actual) -> None:
    first, second = datasets(expected), datasets(actual)
    assert first.keys() == second.keys()
    for name, value in first.items():
        other = second[name]
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            np.testing.assert_array_equal(value, other, err_msg=name)
        else:
            assert np.array_equal(value, other), name


def start_with_two_workers(folder, path, output, device) -> tuple[subprocess.Popen, list[int],
                                                                  list[str]]:
    """``azfilter integrate`` with 2 workers, read on stderr until the second is ready:
    (the process, the workers' pids, the stderr lines so far)."""
    process = subprocess.Popen(command(folder, [path], output, device, "2",
                                       operation="integrate"),
                               env=environment("2"), stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in process.stderr:
        lines.append(line)
        found = re.search(r"2 worker processes \(pids (\d+) (\d+)\)", line)
        if found:
            pids = [int(found.group(1)), int(found.group(2))]
        if "worker 1 ready" in line:
            break
        assert time.monotonic() < deadline, "".join(lines)
    assert len(pids) == 2, "".join(lines)
    return process, pids, lines


@pytest.mark.parametrize("operation", ["sigma-clip", "integrate"])
def test_workers_write_what_one_process_writes(stack, device, tmp_path, operation):
    folder, path, corrupt = stack
    outputs = {}
    for processes in ("1", "2", "3"):
        output = tmp_path / f"out{processes}.h5"
        done = subprocess.run(command(folder, [path], output, device, processes,
                                      operation=operation),
                              env=environment(processes), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 3, done.stderr
        for index in corrupt:   # one line each on stderr, in every mode
            assert len(re.findall(rf"failed: .*frame {index}: ", done.stderr)) == 1, \
                done.stderr
        assert "298 frames reduced, 0 skipped, 2 failed" in done.stderr
        assert "Traceback" not in done.stderr
        if processes != "1":
            assert f"{processes} worker processes" in done.stderr
            assert "ended with" not in done.stderr   # no worker was lost
            # each worker decodes on the host with its share of the cores (a CPU device)
            if "decoded on the host" in done.stderr:
                share = max(1, usable_cores() // int(processes))
                assert f", {share} reader threads" in done.stderr
        outputs[processes] = output
    assert_same_output(outputs["1"], outputs["2"])
    assert_same_output(outputs["1"], outputs["3"])


def test_workers_write_the_same_text_files(stack, device, tmp_path):
    """A directory of text files (one per frame) from 2 workers equals one process's, line
    for line but the date and the recorded output path."""
    folder, path, corrupt = stack
    written = {}
    for processes in ("1", "2"):
        output = tmp_path / f"text{processes}"
        done = subprocess.run(command(folder, [path], f"{output}/", device, processes),
                              env=environment(processes), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 3, done.stderr
        written[processes] = {
            file.name: [line for line in file.read_text().splitlines()
                        if not line.startswith(("# date:", "# config:"))]
            for file in sorted(output.iterdir())}
    assert len(written["1"]) == 300 - len(corrupt)
    assert written["1"] == written["2"]


def test_a_killed_worker_costs_only_the_frames_it_owed(device, tmp_path):
    """Worker 1 is killed once it is ready: the frames it held fail, naming it; worker 0
    reduces every other frame; exit status 3; rows equal a one-process run's."""
    folder = tmp_path
    path = folder / "long.h5"
    frames = 2000
    write_bslz4(path, ring_frames(frames, np.uint16, seed=3))
    (folder / "geo.poni").write_text(PONI)
    output = tmp_path / "out.h5"
    process, pids, lines = start_with_two_workers(folder, path, output, device)
    os.kill(pids[1], signal.SIGKILL)
    rest = process.stderr.read()
    assert process.wait(timeout=300) == 3, "".join(lines) + rest
    stderr = "".join(lines) + rest
    summary = re.search(r"(\d+) frames reduced, 0 skipped, (\d+) failed", stderr)
    reduced, failed = int(summary.group(1)), int(summary.group(2))
    assert reduced + failed == frames and failed >= 1, stderr
    lost = re.findall(r"failed: .* frame (\d+): not reduced: worker process 1 "
                      rf"\(pid {pids[1]}\) was killed by SIGKILL", stderr)
    assert len(lost) == failed, stderr
    assert "Traceback" not in stderr

    table = read_result(output)   # the failures are listed in the file too, rows in order
    assert sorted(index for _, index, _ in table.failed) == sorted(int(i) for i in lost)
    assert table.complete is True
    kept = sorted(set(range(frames)) - {int(i) for i in lost})
    assert list(table.frame_indices) == kept

    alone = tmp_path / "alone.h5"
    done = subprocess.run(command(folder, [path], alone, device, "1", operation="integrate"),
                          env=environment("1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reference = read_result(alone)
    np.testing.assert_array_equal(table.intensity, reference.intensity[kept])
    np.testing.assert_array_equal(table.sigma, reference.sigma[kept])


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_run_ends_its_workers_and_leaves_no_output(device, tmp_path, signum, status):
    """SIGTERM (a SLURM time limit) or Ctrl-C once the workers run: the command exits 143 or
    130 with its usual line, the unfinished output is removed and no worker outlives it."""
    folder = tmp_path
    path = folder / "long.h5"
    write_bslz4(path, ring_frames(4000, np.uint16, seed=5))
    (folder / "geo.poni").write_text(PONI)
    output = tmp_path / "out.h5"
    process, pids, lines = start_with_two_workers(folder, path, output, device)
    process.send_signal(signum)
    stderr = "".join(lines) + process.stderr.read()
    assert process.wait(timeout=120) == status, stderr
    assert "unfinished outputs were removed" in stderr
    assert "Traceback" not in stderr
    assert not output.exists()
    # nothing but the inputs and the output's lock file (kept between runs, as always)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.h5.lock", "geo.poni",
                                                          "long.h5"]
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) for pid in pids):
        assert time.monotonic() < deadline, f"a worker outlived the command: {pids}"
        time.sleep(0.1)


def _state(pid: int) -> str:
    """The process state word of /proc/PID/status ("zombie" once it has ended)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("State:"):
                    return line.lower()
    except OSError:
        return "zombie"
    return ""


def test_default_workers_follow_the_device_and_the_cores(stack, device, tmp_path):
    """Without the variable, a long job on a machine with enough cores probes the device in
    its first worker: a CPU device gains nothing from a second process, which is told to end
    before it starts OpenCL; on a GPU every worker runs. With fewer cores, one process."""
    folder, path, _ = stack
    copy = tmp_path / "copy.h5"
    copy.write_bytes(path.read_bytes())
    inputs = [path, copy]   # 600 frames: above MIN_FRAMES
    assert 2 * 300 >= workers.MIN_FRAMES
    output = tmp_path / "out.h5"
    done = subprocess.run(command(folder, inputs, output, device, None, operation="integrate"),
                          env=environment(None), capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    assert "596 frames reduced, 0 skipped, 4 failed" in done.stderr
    count = workers.planned_workers({"backend": "opencl", "operation": "integrate",
                                     "device": device}, 600, {})
    if count == 1:   # fewer than 2 * CORES_PER_PROCESS usable cores: no worker process
        assert "worker process" not in done.stderr
        return
    assert f"{count} worker processes" in done.stderr
    if "worker 0 ready on a GPU" in done.stderr:
        assert f"worker {count - 1} ready on a GPU" in done.stderr
        return
    assert "the device is a CPU: one worker process" in done.stderr
    assert "worker 1 ready" not in done.stderr


def test_several_devices_one_worker_each(stack, device, tmp_path):
    """--device naming several devices: worker k runs on the k-th device named (cycling), and
    the output is what one process with one engine per device writes. (PoCL has one device:
    it is named twice, and the workers say which they took.)"""
    folder, path, _ = stack
    outputs = {}
    for processes in ("1", "3"):
        output = tmp_path / f"several{processes}.h5"
        done = subprocess.run(command(folder, [path], output, f"{device},{device}", processes,
                                      operation="integrate"),
                              env=environment(processes), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 3, done.stderr
        assert "298 frames reduced, 0 skipped, 2 failed" in done.stderr
        outputs[processes] = output
        if processes == "3":
            ready = re.findall(r"worker (\d) ready on a \w+ \(([^)]*)\)", done.stderr)
            assert sorted(ready) == [(str(k), device) for k in range(3)], done.stderr
            assert "engine threads" in done.stderr
    assert_same_output(outputs["1"], outputs["3"])


def test_workers_take_their_device_from_the_list(monkeypatch):
    """Worker k takes device k % n of the devices the job names, as OpenCL resolves them
    (`all`: the GPUs it lists), and reports n; a job on one device keeps it."""
    from azfilter.backends.opencl import devices as opencl_devices

    class FakeIntegrator:
        def __init__(self, device, several):
            self.device, self.several_devices = device, several

        def use_one_device(self, device):
            self.device, self.several_devices = device, False

    class FakeJob:
        def __init__(self, device, several):
            self.integrator = FakeIntegrator(device, several)

    found = [({"id": "0:0"}, None), ({"id": "0:1"}, None), ({"id": "1:0"}, None)]
    monkeypatch.setattr(opencl_devices, "select_devices", lambda device: found)
    for index, expected in ((0, "0:0"), (1, "0:1"), (2, "1:0"), (3, "0:0"), (7, "0:1")):
        job = FakeJob("all", True)
        assert workers._take_one_device(job, index) == 3
        assert job.integrator.device == expected and not job.integrator.several_devices
    alone = FakeJob("0:1", False)
    assert workers._take_one_device(alone, 5) == 1 and alone.integrator.device == "0:1"


def test_a_device_that_does_not_exist_is_one_line_as_in_one_process(stack, tmp_path):
    """The workers meet the error when they start their engine: the command says what one
    process says (one line, exit 2) and writes nothing."""
    folder, path, _ = stack
    lines = {}
    for processes in ("1", "2"):
        output = tmp_path / f"bad{processes}.h5"
        done = subprocess.run(command(folder, [path], output, "9:9", processes,
                                      operation="integrate")[:-2] + ["-q", "-o", str(output)],
                              env=environment(processes), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert not output.exists()
        lines[processes] = [line for line in done.stderr.splitlines()
                            if line.startswith("azfilter: error:")]
        assert len(lines[processes]) == 1 and "9:9" in lines[processes][0], done.stderr
    assert lines["1"] == lines["2"]


def test_sigma_clip_gets_workers_on_an_uncompressed_stack(tmp_path):
    """Uncompressed HDF5 stacks bind one process by their reads and uploads (sigma-clip: 3
    processes took 23-25 % less time on the H200 machine); compressed ones, other formats
    and medfilt (bound by the GPU) stay in one process."""
    from azfilter.frames import InputItem

    frames = ring_frames(2, np.uint32)
    raw = tmp_path / "raw.h5"
    with h5py.File(raw, "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, chunks=(1, *frames.shape[1:]))
    compressed = tmp_path / "bslz4.h5"
    write_bslz4(compressed, frames)
    text = tmp_path / "notes.txt"
    text.write_text("not a frame")
    config = {"backend": "opencl", "operation": "sigma-clip", "device": None}

    def count(path, operation="sigma-clip") -> int:
        return workers.planned_workers({**config, "operation": operation}, 1000, {},
                                       first_input=InputItem(str(path)), cores=16)

    assert count(raw) == workers.UNCOMPRESSED_PROCESSES["sigma-clip"] == 4
    assert count(compressed) == workers.DEFAULT_PROCESSES["sigma-clip"] == 2
    assert count(text) == 2     # unreadable: the run reports it; the default for its operation
    assert count(raw, "medfilt") == 1
    assert count(compressed, "medfilt") == 1
    assert count(compressed, "integrate") == workers.DEFAULT_PROCESSES["integrate"]
    assert workers.planned_workers(config, 1000, {}, first_input=None, cores=16) == 2


def test_workers_start_at_once_for_a_named_gpu():
    """--device gpu, a list of devices (or a forced number of workers) starts every worker
    at once; the default device, cpu, an id or `all` wait for the first worker to find a GPU
    (and, for `all`, to count them)."""
    assert workers.starts_all({"device": "gpu"}, {})
    assert workers.starts_all({"device": "GPU"}, {})
    assert workers.starts_all({"device": "0:0,0:1"}, {})
    assert workers.starts_all({"device": None}, {workers.PROCESSES_VARIABLE: "2"})
    for device in (None, "auto", "cpu", "0:0", "all", "not a device"):
        assert not workers.starts_all({"device": device}, {}), device


def test_planned_workers_rules():
    config = {"backend": "opencl", "operation": "integrate", "device": None}
    default = max(1, min(workers.DEFAULT_PROCESSES["integrate"],
                         usable_cores() // workers.CORES_PER_PROCESS))
    # medfilt is bound by the GPU in one process
    assert workers.planned_workers({**config, "operation": "medfilt"}, 1000, {}) == 1
    assert workers.planned_workers({**config, "operation": "medfilt"}, 1000,
                                   {workers.PROCESSES_VARIABLE: "2"}) == 2
    assert workers.planned_workers({**config, "operation": "sigma-clip"}, 1000, {},
                                   cores=16) == 2
    assert workers.planned_workers({**config, "operation": "sigma-clip"}, 1000, {},
                                   cores=7) == 1
    assert workers.planned_workers(config, 1000, {}) == default
    assert workers.planned_workers(config, workers.MIN_FRAMES - 1, {}) == 1
    assert workers.planned_workers({**config, "device": "cpu"}, 1000, {}) == 1
    assert workers.planned_workers({**config, "device": "gpu"}, 1000, {}) == default
    # several devices: the operation's processes per device, one per 4 cores, at least one
    # per device; `all` as if there were MAX_ALL_DEVICES (the first worker counts the GPUs)
    several = {**config, "device": "0:0,0:1"}
    assert workers.planned_workers(several, 1000, {}, cores=32) == 6
    assert workers.planned_workers(several, 1000, {}, cores=16) == 4
    assert workers.planned_workers(several, 1000, {}, cores=4) == 2
    assert workers.planned_workers({**several, "operation": "medfilt"}, 1000, {},
                                   cores=32) == 2
    assert workers.planned_workers({**several, "operation": "sigma-clip"}, 1000, {},
                                   cores=32) == 4
    assert workers.planned_workers({**config, "device": "all"}, 1000, {}, cores=32) == 8
    assert workers.planned_workers({**config, "device": "all"}, 1000, {}, cores=128) == \
        workers.MAX_ALL_DEVICES * workers.DEFAULT_PROCESSES["integrate"]
    assert workers.planned_workers({**config, "device": "0:0,cpu"}, 1000, {}) == 1
    assert workers.planned_workers(several, workers.MIN_FRAMES - 1, {}) == 1
    assert workers.planned_workers(several, 10, {workers.PROCESSES_VARIABLE: "3"}) == 3
    # one process, one engine per device in it (multi.py)
    assert workers.planned_workers(several, 1000, {workers.PROCESSES_VARIABLE: "1"}) == 1
    assert workers.planned_workers({**config, "backend": "cython"}, 1000, {}) == 1
    assert workers.planned_workers({**config, "operation": "sparsify"}, 1000, {}) == 1
    assert workers.planned_workers(config, 1000, {}, cores=16) == \
        workers.DEFAULT_PROCESSES["integrate"]
    assert workers.planned_workers(config, 1000, {}, cores=8) == 2
    assert workers.planned_workers(config, 1000, {}, cores=7) == 1
    forced = {workers.PROCESSES_VARIABLE: "3"}
    assert workers.planned_workers(config, 10, forced) == 3
    assert workers.planned_workers({**config, "device": "cpu"}, 10, forced) == 3
    assert workers.planned_workers(config, 1000, {workers.PROCESSES_VARIABLE: "1"}) == 1
    assert workers.planned_workers(config, 1, forced) == 1
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(AzfilterError, match=workers.PROCESSES_VARIABLE):
            workers.planned_workers(config, 1000, {workers.PROCESSES_VARIABLE: bad})


def test_device_all_starts_the_workers_the_gpus_need(monkeypatch):
    """`--device all`: the first worker's count of the GPUs decides how many of the forked
    workers start (the operation's processes per GPU, one per 4 cores); a CPU device, one."""
    import azfilter.resources as resources

    monkeypatch.setattr(resources, "usable_cores", lambda: 32)

    class Job:
        integrator = type("Integrator", (), {"several_devices": True})()
        config = {"operation": "sigma-clip"}
        todo = []

    pool = object.__new__(workers.WorkerPool)
    pool.job, pool.workers = Job(), [None] * workers.planned_workers(
        {"backend": "opencl", "operation": "sigma-clip", "device": "all"}, 1000, {}, cores=32)
    assert len(pool.workers) == 8
    first = workers._Worker(0, None, None, device_type="GPU")
    for gpus, wanted in ((1, 2), (2, 4), (3, 6), (8, 8)):
        first.devices = gpus
        assert pool._wanted(first) == wanted, gpus
    first.device_type = "CPU"
    assert pool._wanted(first) == 1
    Job.integrator.several_devices = False    # one device (gpu, or the default): every worker
    first.device_type = "GPU"
    assert pool._wanted(first) == 8


@pytest.mark.parametrize("total", [1, 15, 16, 17, 400, 1000, 8000])
@pytest.mark.parametrize("count", [1, 2, 6])
def test_blocks_cover_the_plan_once_and_shrink_towards_its_end(total, count):
    bounds = workers.block_bounds(total, count)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    # every block but the last holds more frames than an engine keeps unreported
    assert all(workers.MIN_BLOCK <= size <= workers.MAX_BLOCK for size in sizes[:-1])
    assert 0 < sizes[-1] <= workers.MAX_BLOCK
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True)
    if total >= 8000:   # long runs: full blocks first, the smallest at the end
        assert sizes[0] == workers.MAX_BLOCK and sizes[-2] == workers.MIN_BLOCK


def test_records_travel_in_batches_unchanged():
    """What a worker packs into one message is what the command unpacks: results (with
    outlier statistics, sectors, equal radial bins sent once) and failures, in any mix."""
    from azfilter.backends.sums import BinSums, OutlierSums
    from azfilter.integrator import Result

    rng = np.random.default_rng(5)
    radial = np.linspace(0.1, 5, 6)

    def result(sectors: bool) -> Result:
        n = 12 if sectors else 6
        sums = BinSums(*(rng.random(n) + 1 for _ in range(4)), rng.integers(0, 3, n),
                       OutlierSums(3.0, rng.integers(0, 9, n), rng.integers(0, 9, n),
                                   rng.random(n), rng.random(n)))
        return Result.from_sums(radial.copy(), sums, "q_nm^-1", "sigma_clip", {"thres": 3},
                                "azimuthal", sectors=[[0, 90], [90, 180]] if sectors else None)

    records = [("result", 0, "a.h5::/d", result(False)),
               ("failed", 1, "a.h5::/d", 1, "corrupt chunk"),
               ("result", 2, "a.h5::/d", result(False)),
               ("result", 5, "b.h5::/d", result(True))]   # a row of another shape
    for batch in (records, records[:3]):   # rows of two shapes; of one shape (stacked)
        back = workers.unpack_records(workers.pack_records(batch))
        by_position = {record[1]: record for record in back}
        assert sorted(by_position) == sorted(record[1] for record in batch)
        assert by_position[1] == records[1]
        for record in batch:
            if record[0] != "result":
                continue
            got = by_position[record[1]]
            assert got[:3] == record[:3]
            for name in ("radial", "intensity", "sigma", "std", "count", "sum_signal",
                         "sum_variance", "sum_normalization", "sum_normalization2",
                         "sectors"):
                np.testing.assert_array_equal(getattr(got[3], name), getattr(record[3], name))
            for name in ("kept", "available", "bin_picked", "bin_rejected_sum",
                         "bin_max_sigma"):
                np.testing.assert_array_equal(getattr(got[3].outliers, name),
                                              getattr(record[3].outliers, name))
            assert got[3].outliers.pick == record[3].outliers.pick
            assert (got[3].unit, got[3].operation, got[3].parameters, got[3].error_model) \
                == (record[3].unit, record[3].operation, record[3].parameters,
                    record[3].error_model)
    # the two 1-D results' fields went stacked, their equal radial bins once
    packed = workers.pack_records(records[:3])
    fields = packed[2][2]
    assert fields["intensity"][0] == "stacked" and fields["radial"][0] == "same"
