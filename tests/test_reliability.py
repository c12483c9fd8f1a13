"""Nothing lost (issue 10): locks, stale temporaries, summaries, shard collisions, bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import PONI, invoke, make_frame, write_cbf, write_stack

from azfilter import fileio
from azfilter.output import read_result

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def poni(tmp_path) -> Path:
    path = tmp_path / "geo.poni"
    path.write_text(PONI)
    return path


def _azfilter(*args, env=None, **kwargs) -> subprocess.Popen:
    environment = dict(os.environ, **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "azfilter", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, **kwargs)


def test_two_concurrent_skip_existing_runs_lose_nothing(poni, tmp_path):
    """Item 1: two runs extending one .h5 with different new inputs: both land."""
    first = [write_cbf(tmp_path / "a" / f"img_{k}.cbf", make_frame(k)) for k in range(6)]
    second = [write_cbf(tmp_path / "b" / f"img_{k}.cbf", make_frame(10 + k)) for k in range(6)]
    out = tmp_path / "all.h5"
    procs = [_azfilter("integrate", "-p", poni, "--backend", "python", "--npt", 60,
                       "--skip-existing", *files, "-o", out) for files in (first, second)]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    table = read_result(out)
    assert len(table.sources) == 12
    assert {os.path.basename(os.path.dirname(s)) for s in table.sources} == {"a", "b"}


def test_a_held_lock_makes_the_run_wait_then_extend(poni, tmp_path):
    from filelock import FileLock

    files = [write_cbf(tmp_path / f"img_{k}.cbf", make_frame(k)) for k in range(2)]
    out = tmp_path / "held.h5"
    lock = FileLock(str(fileio.lock_path(out)))
    lock.acquire()
    try:
        proc = _azfilter("integrate", "-p", poni, "--backend", "python", "--npt", 40,
                         *files, "-o", out)
        time.sleep(3)
        assert proc.poll() is None            # waiting
        assert not out.exists()
    finally:
        lock.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "waiting for another azfilter run" in err
    assert len(read_result(out).sources) == 2


def test_stale_temporaries_of_dead_processes_are_swept(poni, tmp_path):
    """Item 10: a SIGKILLed run's temporary file is removed by the next run on that output;
    a live process's is kept."""
    files = [write_cbf(tmp_path / f"img_{k}.cbf", make_frame(k)) for k in range(2)]
    out = tmp_path / "swept.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fileio._host_tag()
    stale = tmp_path / f".swept.h5.azf-{host}-{dead.pid}-abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    alive = tmp_path / f".swept.h5.azf-{host}-{os.getpid()}-def456.tmp"
    alive.write_bytes(b"y")
    other_host = tmp_path / f".swept.h5.azf-elsewhere-{dead.pid}-ghi789.tmp"
    other_host.write_bytes(b"z")
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40, *files,
                    "-o", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    assert alive.exists() and other_host.exists()


def test_sigkill_debris_is_swept_by_the_next_run(poni, tmp_path):
    stack = write_stack(tmp_path / "big.h5", [make_frame(k) for k in range(40)])
    out = tmp_path / "killed.h5"
    proc = _azfilter("medfilt", "-p", poni, "--backend", "python", "--threads", "1",
                     "--npt", 100, stack, "-o", out, env={"AZFILTER_LOG_INTERVAL": "0"})
    assert "frames" in proc.stderr.readline()
    proc.kill()
    proc.wait()
    debris = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert debris, "a SIGKILLed run leaves its temporary file"
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40,
                    tmp_path / "big.h5::/entry/data/data", "-o", out)
    assert result.exit_code == 0, result.output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_per_task_summary_records_failures(poni, tmp_path):
    files = [write_cbf(tmp_path / f"img_{k}.cbf", make_frame(k)) for k in range(3)]
    bad = tmp_path / "img_9.cbf"
    bad.write_bytes(b"garbage")
    out = tmp_path / "sum.h5"
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40, *files, bad,
                    "--shard", "0/1", "-o", out)
    assert result.exit_code == 3
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    assert (summary["reduced"], summary["failed"], summary["exit_status"]) == (3, 1, 3)
    assert "img_9.cbf" in summary["failures"][0]
    assert summary["manifest_frames"] == 4 and len(summary["manifest_sha256"]) == 64
    assert summary["host"] and summary["pid"] > 0
    text = tmp_path / "txt"
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40, *files,
                    "--shard", "1/2", "-o", f"{text}/")
    assert result.exit_code == 0
    summary = json.loads((tmp_path / "txt_shard1of2.summary.json").read_text())
    assert summary["reduced"] == 2 and summary["shard"] == "1/2"
    assert sorted(p.name for p in text.iterdir()) == ["img_1.dat", "img_2.dat"]


def test_text_name_collisions_are_checked_over_the_whole_job(poni, tmp_path):
    """Item 3: a/img_0000.cbf and b/img_0000.cbf in different shards of one array."""
    a = write_cbf(tmp_path / "a" / "img_0000.cbf", make_frame(1))
    b = write_cbf(tmp_path / "b" / "img_0000.cbf", make_frame(2))
    for shard in ("0/2", "1/2"):
        result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40, a, b,
                        "--shard", shard, "-o", f"{tmp_path / 'out'}/")
        assert result.exit_code == 2, result.output
        assert "would both be written to" in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_npt_beyond_the_pixel_count_is_refused(poni, tmp_path):
    """Item 9: --npt 10000000 used to allocate 33 GiB before failing."""
    frame = write_cbf(tmp_path / "one.cbf", make_frame(1))
    started = time.monotonic()
    result = invoke("medfilt", "-p", poni, "--npt", 10_000_000, frame, "-o", tmp_path / "x.h5")
    assert result.exit_code == 2
    assert "more radial bins than the detector's 11520 pixels" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert time.monotonic() - started < 10


def test_a_non_utf8_job_file_is_one_line(poni, tmp_path):
    """Item 8: a job file that is not UTF-8."""
    for name in ("job.toml", "job.json"):
        job = tmp_path / name
        job.write_bytes(b"npt = 10\n\xff\xfe\xfa bad = 1\n")
        result = invoke("run", job)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("azfilter: error: ") and str(job) in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_uneven_slurm_array_is_refused_through_the_command(poni, tmp_path):
    frame = write_cbf(tmp_path / "one.cbf", make_frame(1))
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "2",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3",
           "SLURM_ARRAY_TASK_STEP": "2"}
    ok = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 20, frame,
                "-o", tmp_path / "even.h5", env=env)
    assert ok.exit_code == 0, ok.output            # 1,3 with step 2 is evenly spaced
    assert (tmp_path / "even_shard1of2.h5").exists()
    env["SLURM_ARRAY_TASK_STEP"] = "1"             # --array=1,3: not evenly spaced
    refused = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 20, frame,
                     "-o", tmp_path / "uneven.h5", env=env)
    assert refused.exit_code == 2 and "--shard I/N" in refused.stderr
    assert not list(tmp_path.glob("uneven*"))
    assert read_result(tmp_path / "even_shard1of2.h5").intensity.shape == (1, 20)


def test_sharded_runs_merge_and_prove_completeness_end_to_end(poni, tmp_path):
    """Items 2 and 5 through the command: shards of one job merge complete; a failed frame
    is carried into the merged file and shown by info; a different N, a different input list
    or a missing shard is refused or marked incomplete (exit 3)."""
    data = tmp_path / "data"
    files = [write_cbf(data / f"img_{k:02d}.cbf", make_frame(k)) for k in range(7)]
    (data / "img_03.cbf").write_bytes(b"broken")          # one frame fails in its shard
    out = tmp_path / "run.h5"
    statuses = []
    for shard in range(3):
        result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 30,
                        f"{data}/", "--shard", f"{shard}/3", "-o", out)
        statuses.append(result.exit_code)
    assert statuses == [0, 3, 0]
    shards = sorted(tmp_path.glob("run_shard*of3.h5"))
    merged = invoke("merge", *shards, "-o", tmp_path / "all.h5")
    assert merged.exit_code == 3, merged.output             # complete, but one frame failed
    table = read_result(tmp_path / "all.h5")
    assert len(table.sources) == 6 and table.complete
    assert len(table.failed) == 1 and "img_03.cbf" in table.failed[0][0]
    info = invoke("info", tmp_path / "all.h5")
    assert "img_03.cbf" in info.output and "failed" in info.output
    # a missing shard: exit 3, the file says it is incomplete
    partial = invoke("merge", shards[0], shards[2], "-o", tmp_path / "partial.h5")
    assert partial.exit_code == 3 and "missing" in partial.stderr
    assert read_result(tmp_path / "partial.h5").complete is False
    # a shard of the same job over a different input list (a file arrived in between)
    write_cbf(data / "img_07.cbf", make_frame(7))
    late = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 30, f"{data}/",
                  "--shard", "1/3", "-o", tmp_path / "late" / "run.h5")
    assert late.exit_code == 3
    mixed = invoke("merge", shards[0], tmp_path / "late" / "run_shard1of3.h5", shards[2],
                   "-o", tmp_path / "mixed.h5")
    assert mixed.exit_code == 2 and not (tmp_path / "mixed.h5").exists()
    # shards of different N
    other = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 30, *files[:2],
                   "--shard", "1/4", "-o", tmp_path / "n4.h5")
    assert other.exit_code == 0
    different = invoke("merge", shards[0], tmp_path / "n4_shard1of4.h5",
                       "-o", tmp_path / "diff.h5")
    assert different.exit_code == 2 and len(different.stderr.strip().splitlines()) == 1


def test_file_lists_and_frozen_inputs(poni, tmp_path):
    """--save-config --freeze-inputs stores the expanded inputs; @LIST names inputs."""
    data = tmp_path / "data"
    for k in range(3):
        write_cbf(data / f"img_{k}.cbf", make_frame(k))
    listing = tmp_path / "inputs.txt"
    listing.write_text("# the frames of run 1\ndata/img_0.cbf\n\ndata/img_2.cbf\n")
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 30, f"@{listing}",
                    "-o", tmp_path / "list.h5")
    assert result.exit_code == 0, result.output
    assert [os.path.basename(s) for s in read_result(tmp_path / "list.h5").sources] == [
        "img_0.cbf", "img_2.cbf"]
    job = tmp_path / "job.json"
    saved = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 30, f"{data}/",
                   "--save-config", job, "--freeze-inputs", "--dry-run", "-o",
                   tmp_path / "frozen.h5")
    assert saved.exit_code == 0, saved.output
    frozen = json.loads(job.read_text())
    assert [os.path.basename(s) for s in frozen["inputs"]] == ["img_0.cbf", "img_1.cbf",
                                                                "img_2.cbf"]
    write_cbf(data / "img_3.cbf", make_frame(3))   # the directory fills later
    rerun = invoke("run", job)
    assert rerun.exit_code == 0, rerun.output
    assert len(read_result(tmp_path / "frozen.h5").sources) == 3
    missing = invoke("integrate", "-p", poni, "@nowhere.txt", "-o", tmp_path / "x.h5")
    assert missing.exit_code == 2 and "input list" in missing.stderr


def test_atomic_files_finish_every_file_and_name_a_failed_one(tmp_path):
    """The text outputs' writer (fileio.AtomicFiles): every file written is complete under
    its final name after finish(), with an ordinary file's permissions and no temporary
    left; a file whose rename fails (a folder in the way) is named by the next write and by
    finish(), its temporary removed, the other files finished all the same."""
    files = fileio.AtomicFiles(workers=2, pending=3)
    texts = {tmp_path / f"f{k}.dat": f"# {k}\n" + "1.0 2.0 3.0\n" * (k + 1) for k in range(20)}
    for path, text in texts.items():
        files.write_text(path, text)
    files.finish()
    for path, text in texts.items():
        assert path.read_text() == text
        assert path.stat().st_mode & 0o777 == fileio.new_file_mode()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in texts)

    blocked = tmp_path / "blocked.dat"
    (blocked / "inside").mkdir(parents=True)           # os.replace cannot replace it
    files = fileio.AtomicFiles(workers=2, pending=2)
    files.write_text(blocked, "x\n")
    with pytest.raises(OSError) as failure:
        for k in range(100):   # the failure shows at a later write (or at finish, below)
            files.write_text(tmp_path / f"g{k}.dat", "y\n")
            time.sleep(0.01)
    assert failure.value.filename == str(blocked)
    with pytest.raises(OSError) as again:
        files.finish()
    assert again.value.filename == str(blocked)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert all(p.read_text() == "y\n" for p in tmp_path.glob("g*.dat"))


def test_try_lock_and_filelock_exclude_each_other(tmp_path):
    """output_lock's fast path (fileio.try_lock, plain flock) and filelock's FileLock (its
    path when the lock is busy) lock the same file: each sees the other's hold."""
    from filelock import FileLock, Timeout

    path = tmp_path / ".out.lock"
    fd = fileio.try_lock(path)
    assert fd is not None and path.exists()
    with pytest.raises(Timeout):
        FileLock(str(path)).acquire(timeout=0)
    assert fileio.try_lock(path) is None          # a second holder in this process too
    fileio.unlock(fd)
    other = FileLock(str(path))
    other.acquire(timeout=0)
    try:
        assert fileio.try_lock(path) is None
    finally:
        other.release()
    fd = fileio.try_lock(path)
    assert fd is not None
    fileio.unlock(fd)


def test_a_corrupt_chunk_names_its_file_and_frame_once(poni, tmp_path):
    """A corrupt chunk of a stack given as a file: one ``failed:`` line naming the file, the
    frame and then the dataset, not the file and frame twice; the run ends with status 3."""
    import h5py

    stack = write_stack(tmp_path / "stack.h5", [make_frame(k) for k in range(3)])
    with h5py.File(stack, "r+") as h5:
        dataset = h5["entry/data/data"]
        _, chunk = dataset.id.read_direct_chunk((1, 0, 0))
        dataset.id.write_direct_chunk((1, 0, 0), chunk[:len(chunk) // 2])   # truncated
    result = invoke("integrate", "-p", poni, "--backend", "python", "--npt", 40, stack,
                    "-o", tmp_path / "out.h5")
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if "failed:" in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"azfilter: failed: {stack} frame 1: /entry/data/data: "), lines
    assert lines[0].count(str(stack)) == 1, lines
