"""Real SLURM array jobs on a one-node cluster: ``examples/slurm_array.sh`` end to end.

Every merged result is compared bit for bit with one ``azfilter`` process over the same inputs
(every dataset of ``/entry/data``: intensity, errors, std, counts, sums, sources, frame
indices). The cluster comes from the ``slurm`` fixture (tests/slurm_cluster.py): found, or
started by ``.ci/slurm-start`` when root; skipped with the reason elsewhere, a failure in CI.

The last tests check what issue 10 asked of azfilter itself (uneven arrays refused naming
--shard I/N, ``srun -n`` tasks as shards, PBS/SGE/LSF array variables, text names checked
against the whole job); they failed before that fix.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from slurm_cluster import SlurmCluster, cluster_session
from test_cli import PONI, make_frame, shim_path, write_cbf, write_stack

REPO = Path(__file__).resolve().parent.parent
ARRAY_SCRIPT = REPO / "examples" / "slurm_array.sh"
OPTIONS = ("--npt", "200")
N_FRAMES = 9  # 5 CBF files + a 4-frame HDF5 stack


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster (tests/slurm_cluster.py)."""
    yield from cluster_session()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> SimpleNamespace:
    """Synthetic inputs (data/: 5 CBF frames and a 4-frame HDF5 stack, natural order) and
    the result of one azfilter process over them (ref.h5)."""
    root = tmp_path_factory.mktemp("slurmjob")
    poni = root / "geo.poni"
    poni.write_text(PONI)
    data = root / "data"
    for k in range(5):
        write_cbf(data / f"img_{k:04d}.cbf", make_frame(k))
    write_stack(data / "stack.h5", [make_frame(10 + k) for k in range(4)])
    reference = root / "ref.h5"
    result = azfilter("sigma-clip", "-p", poni, *OPTIONS, "--quiet", data, "-o", reference)
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(root=root, poni=poni, data=data, reference=reference)


def azfilter(*args, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m azfilter ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "azfilter", *map(os.fspath, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def assert_same_result(path: Path, reference: Path,
                       inputs_moved: tuple[Path, Path] | None = None) -> None:
    """Every dataset of /entry/data identical, bit for bit (NaN in empty bins included);
    ``inputs_moved=(here, there)``: sources under ``here`` stand for the same files under
    ``there`` in the reference."""
    with h5py.File(path, "r") as got, h5py.File(reference, "r") as want:
        names = sorted(want["entry/data"])
        assert sorted(got["entry/data"]) == names
        for name in names:
            a = np.asarray(got["entry/data"][name][()])
            b = np.asarray(want["entry/data"][name][()])
            assert a.shape == b.shape, name
            if a.dtype.kind in "OSU":
                got_values = a.tolist()
                if name == "source" and inputs_moved:
                    here, there = (str(p).encode() for p in inputs_moved)
                    got_values = [v.replace(here, there, 1) for v in got_values]
                assert got_values == b.tolist(), name
            else:
                assert a.dtype == b.dtype, name
                assert a.tobytes() == b.tobytes(), f"{name} differs from one process"
        assert len(got["entry/data/source"]) == N_FRAMES


def submit(slurm: SlurmCluster, job: SimpleNamespace, output: Path, *sbatch_options: str,
           env: dict | None = None, data: Path | None = None) -> tuple[str, str]:
    """``slurm_array.sh submit OPTIONS -- sigma-clip ...`` over ``data`` (default the job's
    inputs): (array job id, merge job id)."""
    result = subprocess.run(
        ["bash", str(ARRAY_SCRIPT), "submit", *sbatch_options, "--", "sigma-clip",
         str(job.poni), f"{data or job.data}/", str(output), *OPTIONS],
        env=env or slurm.env, cwd=output.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"array job (\d+) .*merge job (\d+)", result.stdout)
    assert found, result.stdout
    return found.group(1), found.group(2)


def by_task(states) -> dict[str, tuple[str, int]]:
    return {s.job_id: (s.state, s.exit_code) for s in states}


def logs(output: Path) -> Path:
    return output.with_suffix(".logs")


def statuses(output: Path, count: int) -> list[str]:
    return [(logs(output) / f"shard_{i}.status").read_text().strip() for i in range(count)]


def merge_log(output: Path, merge_job: str) -> str:
    return (logs(output) / f"merge_{merge_job}.log").read_text()


# ============================================================================ the array script


def test_array_and_merge_equal_one_process(slurm, job, tmp_path):
    output = tmp_path / "run.h5"
    array_job, merge_job = submit(slurm, job, output, "--array=0-2")
    states = slurm.wait(array_job, merge_job)
    assert by_task(states) == {f"{array_job}_{k}": ("COMPLETED", 0) for k in range(3)} | {
        merge_job: ("COMPLETED", 0)}
    assert_same_result(output, job.reference)
    assert statuses(output, 3) == ["0", "0", "0"]
    for k in range(3):  # one log per task, with azfilter's summary line
        text = (logs(output) / f"task_{k}.log").read_text()
        assert f"shard {k}/3: 3 frames reduced, 0 skipped, 0 failed" in text
        assert (tmp_path / f"run_shard{k}of3.h5").is_file()
    assert "merge exit 0" in merge_log(output, merge_job)


def test_single_task_array(slurm, job, tmp_path):
    """--array=0 (N=1): the task writes OUT.h5 itself; the merge job only checks it."""
    output = tmp_path / "one.h5"
    array_job, merge_job = submit(slurm, job, output, "--array=0")
    states = slurm.wait(array_job, merge_job)
    assert {s.state for s in states} == {"COMPLETED"} and {s.exit_code for s in states} == {0}
    assert_same_result(output, job.reference)
    assert not list(tmp_path.glob("*_shard*"))
    assert statuses(output, 1) == ["0"]


def test_stepped_array(slurm, job, tmp_path):
    """--array=0-6:2 (ids 0, 2, 4, 6): four shards, and sbatch options passed through."""
    output = tmp_path / "step.h5"
    array_job, merge_job = submit(slurm, job, output, "--array=0-6:2", "--time=10",
                                  "--cpus-per-task=1", "--job-name=stepped")
    states = slurm.wait(array_job, merge_job)
    assert by_task(states) == {f"{array_job}_{k}": ("COMPLETED", 0) for k in (0, 2, 4, 6)} | {
        merge_job: ("COMPLETED", 0)}
    shown = slurm.run("scontrol", "show", "job", array_job).stdout
    assert "JobName=stepped" in shown and "TimeLimit=00:10:00" in shown
    assert sorted(p.name for p in tmp_path.glob("step_shard*.h5")) == [
        f"step_shard{i}of4.h5" for i in range(4)]
    for task_id, index in zip((0, 2, 4, 6), range(4), strict=True):
        assert f"shard {index}/4" in (logs(output) / f"task_{task_id}.log").read_text()
    assert_same_result(output, job.reference)


def test_script_task_and_merge_modes_without_slurm(job, tmp_path):
    """What the jobs run, run here: the four tasks of --array=3-9:2 (from the array variables),
    one of them again by hand (I/N, --skip-existing), then the merge."""
    env = shim_path(tmp_path)
    output = tmp_path / "res" / "run.h5"
    task = ["bash", str(ARRAY_SCRIPT), "task"]
    args = ["sigma-clip", str(job.poni), f"{job.data}/", str(output), *OPTIONS]
    for index, task_id in enumerate((3, 5, 7, 9)):
        result = subprocess.run([*task, "3:2/4", *args], env=dict(env, SLURM_ARRAY_TASK_ID=str(
            task_id)), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"shard {index}/4: " in result.stderr
    again = subprocess.run([*task, "2/4", *args], env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "0 frames reduced, 2 skipped" in again.stderr, again.stderr
    merged = subprocess.run(["bash", str(ARRAY_SCRIPT), "merge", str(output), "4"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert statuses(output, 4) == ["0"] * 4
    assert_same_result(output, job.reference)
    # a task id that is not one of the array's: refused, nothing run
    wrong = subprocess.run([*task, "3:2/4", *args], env=dict(env, SLURM_ARRAY_TASK_ID="4"),
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "is not one of the ids" in wrong.stderr


def test_uneven_array_refused_by_the_script(job, tmp_path):
    """Task ids 1, 3, 8 cannot be shards of one N: refused before anything is submitted."""
    output = tmp_path / "uneven.h5"
    result = subprocess.run(
        ["bash", str(ARRAY_SCRIPT), "submit", "--array=1,3,8", "--", "sigma-clip",
         str(job.poni), f"{job.data}/", str(output)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not evenly spaced" in result.stderr and "--shard I/N" in result.stderr
    assert not logs(output).exists()


def test_failed_frames_fail_the_merge(slurm, job, tmp_path):
    """An unreadable input: its task exits 3, the merge (afterany) still joins the good frames
    (equal to one process over the good inputs) and exits 3 naming that shard."""
    data = tmp_path / "data"
    shutil.copytree(job.data, data)
    (data / "img_0005.cbf").write_bytes(b"")  # between the CBF files and the stack
    output = tmp_path / "bad.h5"
    array_job, merge_job = submit(slurm, job, output, "--array=0-1", data=data)
    states = by_task(slurm.wait(array_job, merge_job))
    exits = sorted(states[f"{array_job}_{k}"][1] for k in range(2))
    assert exits == [0, 3], states
    assert states[merge_job] == ("FAILED", 3)
    failed_shard = statuses(output, 2).index("3")
    assert f"frames failed in shard(s) {failed_shard} of 2" in merge_log(output, merge_job)
    assert "img_0005.cbf" in (logs(output) / f"task_{failed_shard}.log").read_text()
    assert_same_result(output, job.reference, inputs_moved=(data, job.data))


def test_resubmitted_single_task(slurm, job, tmp_path):
    """A task that never ran fails the merge (no OUT.h5); resubmitting that one task
    (--array=2) and merging again gives the one-process result."""
    output = tmp_path / "resub.h5"
    array_job, merge_job = submit(slurm, job, output, "--array=0-2%1")
    slurm.run("scancel", f"{array_job}_2")  # still pending behind the %1 limit
    states = by_task(slurm.wait(array_job, merge_job))
    # a pending task cancelled leaves the array's record (scontrol no longer lists it)
    assert states.get(f"{array_job}_2", ("CANCELLED",))[0] == "CANCELLED"
    assert not (logs(output) / "task_2.log").exists()
    assert states[merge_job] == ("FAILED", 1)
    assert "shard 2/3: did not finish (status: never ran)" in merge_log(output, merge_job)
    assert not output.exists()

    # the task's command, as the header of slurm_array.sh documents it
    task = slurm.sbatch(f"--output={logs(output)}/task_%a.log", "--open-mode=append",
                        "--array=2", ARRAY_SCRIPT, "task", "0:1/3", "sigma-clip", job.poni,
                        f"{job.data}/", output, *OPTIONS, cwd=tmp_path)
    merge = slurm.sbatch(f"--output={logs(output)}/merge_%j.log", f"--dependency=afterany:{task}",
                         ARRAY_SCRIPT, "merge", output, "3", cwd=tmp_path)
    states = by_task(slurm.wait(task, merge))
    assert states == {f"{task}_2": ("COMPLETED", 0), merge: ("COMPLETED", 0)}
    assert "shard 2/3: 3 frames reduced" in (logs(output) / "task_2.log").read_text()
    assert_same_result(output, job.reference)


def test_cancelled_array_requeued_with_skip_existing(slurm, job, tmp_path):
    """The array is cancelled while its last task runs; the merge (afterany) fails naming that
    shard; `scontrol requeue` reruns every task with --skip-existing: the finished shards are
    skipped (files untouched), the cancelled one is reduced, and the new merge is exact."""
    output = tmp_path / "requeue.h5"
    hold, held = tmp_path / "HOLD", tmp_path / "HELD"
    hold.touch()
    # azfilter for shard 2 waits while HOLD exists (saying so in HELD), so that the test
    # cancels the task while it runs
    wrapper = tmp_path / "azfilter-held"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'case " $* " in *" --shard 2/3 "*) [ -e "{hold}" ] && touch "{held}"\n'
        f'  while [ -e "{hold}" ]; do sleep 0.2; done;; esac\n'
        f'exec "{sys.executable}" -m azfilter "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = dict(slurm.env, AZFILTER=str(wrapper))
    array_job, merge_job = submit(slurm, job, output, "--array=0-2%1", env=env)
    deadline = time.monotonic() + 90
    while not held.exists():
        assert time.monotonic() < deadline, "shard 2 did not start within 90 s"
        time.sleep(0.2)
    slurm.run("scancel", array_job)
    states = by_task(slurm.wait(array_job, merge_job))
    assert [states[f"{array_job}_{k}"][0] for k in range(3)] == [
        "COMPLETED", "COMPLETED", "CANCELLED"]
    assert states[merge_job] == ("FAILED", 1)
    # "started" when the task's shell died with it, 143 (SIGTERM) when the shell outlived it
    assert re.search(r"shard 2/3: did not finish \(status: (started|143)\)",
                     merge_log(output, merge_job))
    assert not output.exists()
    finished = {k: (tmp_path / f"requeue_shard{k}of3.h5").stat() for k in (0, 1)}

    hold.unlink()
    slurm.run("scontrol", "requeue", array_job)
    # a requeued job waits for SLURM's credential lifetime (120 s) unless told to start now
    slurm.run("scontrol", "update", f"JobId={array_job}", "StartTime=now")
    merge = slurm.sbatch(f"--output={logs(output)}/merge_%j.log",
                         f"--dependency=afterany:{array_job}", ARRAY_SCRIPT, "merge", output,
                         "3", cwd=tmp_path)
    states = by_task(slurm.wait(array_job, merge))
    assert states == {f"{array_job}_{k}": ("COMPLETED", 0) for k in range(3)} | {
        merge: ("COMPLETED", 0)}
    for k in (0, 1):
        assert "0 frames reduced, 3 skipped" in (logs(output) / f"task_{k}.log").read_text()
        after = (tmp_path / f"requeue_shard{k}of3.h5").stat()
        assert (after.st_ino, after.st_mtime_ns) == (finished[k].st_ino, finished[k].st_mtime_ns)
    log2 = (logs(output) / "task_2.log").read_text()
    assert log2.count("shard 2/3") >= 2 and "3 frames reduced, 0 skipped" in log2
    assert_same_result(output, job.reference)


# ======================================================================== azfilter's own shards


def outputs_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.h5"))


@pytest.mark.parametrize("spec", ["1,3", "1,3,8"])
def test_uneven_array_refused_by_azfilter(slurm, job, tmp_path, spec):
    """azfilter inside --array=1,3 (or 1,3,8) on its own: every task exits 2 naming
    --shard I/N, nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    array_job = slurm.sbatch(f"--array={spec}", f"--output={tmp_path}/task_%a.log", "--wrap",
                             f"azfilter sigma-clip -p {job.poni} {' '.join(OPTIONS)} "
                             f"{job.data}/ -o {out}/run.h5", cwd=tmp_path)
    states = slurm.wait(array_job)
    assert len(states) == spec.count(",") + 1
    assert {s.exit_code for s in states} == {2}, by_task(states)
    for task_id in spec.split(","):
        assert "--shard I/N" in (tmp_path / f"task_{task_id}.log").read_text()
    assert outputs_of(out) == []


def test_srun_tasks_are_shards(slurm, job, tmp_path):
    """``srun -n 2 azfilter ... -o run.h5``: two shards that hold every frame once."""
    out = tmp_path / "out"
    out.mkdir()
    batch = slurm.sbatch("--ntasks=2", f"--output={tmp_path}/srun.log", "--wrap",
                         f"srun azfilter sigma-clip -p {job.poni} {' '.join(OPTIONS)} --quiet "
                         f"{job.data}/ -o {out}/run.h5", cwd=tmp_path)
    states = slurm.wait(batch)
    assert [(s.state, s.exit_code) for s in states] == [("COMPLETED", 0)], \
        (tmp_path / "srun.log").read_text()
    assert outputs_of(out) == ["run_shard0of2.h5", "run_shard1of2.h5"]
    merged = azfilter("merge", out / "run_shard0of2.h5", out / "run_shard1of2.h5", "-o",
                      tmp_path / "merged.h5")
    assert merged.returncode == 0, merged.stderr
    assert_same_result(tmp_path / "merged.h5", job.reference)


def test_text_stem_collision_across_shards_refused(job, tmp_path):
    """a/img_0000.cbf and b/img_0000.cbf land in different shards but would both write
    out/img_0000.dat: each shard refuses (exit 2) like a single process does."""
    for folder, seed in (("a", 1), ("b", 2)):
        write_cbf(tmp_path / folder / "img_0000.cbf", make_frame(seed))
    inputs = [tmp_path / "a" / "img_0000.cbf", tmp_path / "b" / "img_0000.cbf"]
    single = azfilter("integrate", "-p", job.poni, *inputs, "-o", f"{tmp_path}/one/")
    assert single.returncode == 2 and "img_0000.dat" in single.stderr  # today's single process
    for index in (0, 1):
        result = azfilter("integrate", "-p", job.poni, *inputs, "-o", f"{tmp_path}/out/",
                          "--shard", f"{index}/2")
        assert result.returncode == 2, result.stderr
        assert "img_0000.dat" in result.stderr
    assert not list((tmp_path / "out").glob("*.dat"))


SCHEDULER_ENVIRONMENTS = {
    # PBS Pro: the index only (the range is not in the environment)
    "pbs": {"PBS_ARRAY_INDEX": "1", "PBS_ARRAY_ID": "123[].server"},
    # Grid Engine: qsub -t 1-3 (second task)
    "sge": {"SGE_TASK_ID": "2", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "3",
            "SGE_TASK_STEPSIZE": "1"},
    # LSF: bsub -J "run[1-3]" (second task; the range is in the job name)
    "lsf": {"LSB_JOBINDEX": "2", "LSB_JOBNAME": "run[1-3]", "LSB_JOBINDEX_END": "3"},
}


@pytest.mark.parametrize("scheduler", sorted(SCHEDULER_ENVIRONMENTS))
def test_other_schedulers_array_tasks(job, tmp_path, scheduler):
    """A task of a PBS/SGE/LSF array never reduces the whole job into the whole-job output:
    it writes its shard (SGE and LSF give the full range: exactly shard 1/3) or refuses (exit 2)
    naming --shard I/N when the environment does not give the number of tasks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SCHEDULER_ENVIRONMENTS[scheduler])
    result = azfilter("sigma-clip", "-p", job.poni, *OPTIONS, "--quiet", job.data, "-o",
                      tmp_path / "run.h5", env=env)
    written = outputs_of(tmp_path)
    if result.returncode == 2:
        assert "--shard I/N" in result.stderr and written == []
        assert scheduler == "pbs", f"{scheduler} gives first, last and step: no need to refuse"
        return
    assert result.returncode == 0, result.stderr
    assert "run.h5" not in written and len(written) == 1, written
    if scheduler != "pbs":
        assert written == ["run_shard1of3.h5"]
    with h5py.File(tmp_path / written[0], "r") as h5:
        assert 0 < len(h5["entry/data/source"]) < N_FRAMES

