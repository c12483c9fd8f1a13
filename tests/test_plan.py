"""Planning without click and without frames: shards, output names, collisions,
skip-existing, the job-config schema."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from azfilter import config as cfg
from azfilter.errors import AzfilterError
from azfilter.output import text_output_complete
from azfilter.pipeline import plan


def _planned(n: int, source: str = "/data/a.h5", out: Path | None = None) -> list[plan.Planned]:
    item = SimpleNamespace(path=source, h5path=None)
    return [plan.Planned(item, k, n, source, None if out is None else out / f"f{k}.dat")
            for k in range(n)]


@pytest.mark.parametrize("total,count", [(10, 3), (7, 7), (3, 5), (100, 16), (1, 1)])
def test_shards_cover_the_plan_once_in_order(total, count):
    frames = _planned(total)
    pieces = [plan.select_shard(frames, (k, count)) for k in range(count)]
    joined = [p for piece in pieces for p in piece]
    assert joined == frames
    sizes = [len(piece) for piece in pieces]
    assert max(sizes) - min(sizes) <= 1


def test_environment_shard_from_slurm_variables():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "5",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert plan.environment_shard(env) == (2, 3)
    assert plan.environment_shard({}) is None
    with pytest.raises(AzfilterError, match="--shard I/N"):
        plan.environment_shard({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3"})
    with pytest.raises(AzfilterError, match="cannot read"):
        plan.environment_shard({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"})


@pytest.mark.parametrize("ids", [[1, 3], [1, 3, 8], [0, 1, 5]])
def test_unevenly_spaced_slurm_arrays_are_refused(ids):
    for task in ids:
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
               "SLURM_ARRAY_TASK_MIN": str(min(ids)), "SLURM_ARRAY_TASK_MAX": str(max(ids)),
               "SLURM_ARRAY_TASK_STEP": "1"}
        with pytest.raises(AzfilterError, match="not evenly spaced.*--shard I/N"):
            plan.environment_shard(env)


def test_a_single_array_task_is_refused_not_guessed():
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "1",
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "1",
           "SLURM_ARRAY_TASK_STEP": "1"}
    with pytest.raises(AzfilterError, match="one task.*--shard I/N"):
        plan.environment_shard(env)


def test_srun_tasks_and_their_combination_with_arrays():
    assert plan.environment_shard({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}) == (1, 2)
    # a batch script's SLURM_NTASKS alone does not shard it (srun sets STEP_NUM_TASKS)
    assert plan.environment_shard({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "2",
           "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}
    assert plan.environment_shard(env) == (3, 6)


def test_sge_lsf_and_pbs_arrays():
    sge = {"SGE_TASK_ID": "7", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9",
           "SGE_TASK_STEPSIZE": "2"}
    assert plan.environment_shard(sge) == (3, 5)
    assert plan.environment_shard({"SGE_TASK_ID": "undefined"}) is None
    lsf = {"LSB_JOBINDEX": "4", "LSB_JOBNAME": "reduce[1-8]"}
    assert plan.environment_shard(lsf) == (3, 8)
    with pytest.raises(AzfilterError, match="LSF.*--shard I/N"):
        plan.environment_shard({"LSB_JOBINDEX": "3", "LSB_JOBNAME": "reduce[1,3,8]"})
    with pytest.raises(AzfilterError, match="PBS.*--shard I/N"):
        plan.environment_shard({"PBS_ARRAY_INDEX": "3"})


def test_output_kinds_and_shard_names(tmp_path):
    assert plan.output_kind("-") == "stdout"
    assert plan.output_kind("run.NXS") == "hdf5"
    assert plan.output_kind(str(tmp_path)) == "textdir"
    assert plan.output_kind("new/") == "textdir"
    assert plan.output_kind("one.xy") == "textfile"
    with pytest.raises(AzfilterError, match="not an existing directory"):
        plan.output_kind("noidea")
    assert plan.shard_output("out.h5", (2, 16)) == "out_shard02of16.h5"
    assert plan.shard_output("out_{shard}.h5", (2, 16)) == "out_02.h5"
    assert plan.shard_output("out.h5", (0, 1)) == "out.h5"
    assert plan.shard_output("out.h5", None) == "out.h5"


def test_blocks_group_consecutive_frames_of_one_file():
    frames = _planned(20) + _planned(2, "/data/b.h5")
    groups = plan.blocks(frames)
    assert [len(g.frames) for g in groups] == [8, 8, 4, 2]
    assert [p for g in groups for p in g.frames] == frames


def test_collisions_are_refused(tmp_path):
    one = _planned(1, "/x/a/img_0000.cbf", tmp_path)
    two = _planned(1, "/x/b/img_0000.cbf", tmp_path)
    plan.check_collisions(one)
    with pytest.raises(AzfilterError, match="would both be written to"):
        plan.check_collisions(one + two)


def test_skip_existing_text_outputs(tmp_path):
    frames = _planned(3, out=tmp_path)
    npt = 4
    good = "# header\n" + "".join(f"{k} 1.0 0.1\n" for k in range(npt))
    frames[0].out_path.write_text(good)
    frames[1].out_path.write_text(good[:-1])          # only the final newline missing
    with pytest.raises(AzfilterError, match="output exists"):
        plan.skip_existing(frames, "textdir", str(tmp_path), "new", npt)
    todo, skipped = plan.skip_existing(frames, "textdir", str(tmp_path), "append", npt)
    assert [p.index for p in todo] == [1, 2] and skipped == 1
    todo, skipped = plan.skip_existing(frames, "textdir", str(tmp_path), "overwrite", npt)
    assert len(todo) == 3 and skipped == 0


def test_text_output_complete_checks_every_row(tmp_path):
    path = tmp_path / "a.dat"
    rows = [f"{k} 1.5 0.25" for k in range(5)]
    path.write_text("# h\n" + "\n".join(rows) + "\n")
    assert text_output_complete(path, 5)
    assert not text_output_complete(path, 4)
    path.write_text("# h\n" + "\n".join(rows))       # no final newline
    assert not text_output_complete(path, 5)
    damaged = rows.copy()
    damaged[2] = "2 1.5"                               # a damaged middle row
    path.write_text("# h\n" + "\n".join(damaged) + "\n")
    assert not text_output_complete(path, 5)
    damaged[2] = "2 x 0.1"
    path.write_text("# h\n" + "\n".join(damaged) + "\n")
    assert not text_output_complete(path, 5)
    nan_row = rows.copy()
    nan_row[2] = "2 nan nan"                           # an empty bin is complete
    path.write_text("# h\n" + "\n".join(nan_row) + "\n")
    assert text_output_complete(path, 5)


def test_drop_stored_rows():
    frames = _planned(4)
    todo, skipped = plan.drop_stored(frames, {("/data/a.h5", 1), ("/data/a.h5", 3)})
    assert [p.index for p in todo] == [0, 2] and skipped == 2
    assert plan.drop_stored(frames, set()) == (frames, 0)


# ---------------------------------------------------------------------------- schema


def test_saved_jobs_carry_the_schema_version(tmp_path):
    job = cfg.job_config(cfg.effective({"operation": "integrate", "poni": "g.poni"}))
    assert job["schema"] == cfg.SCHEMA_VERSION
    path = tmp_path / "job.json"
    cfg.save_config(job, path)
    assert json.loads(path.read_text())["schema"] == cfg.SCHEMA_VERSION
    loaded = cfg.load_config(path)
    assert "schema" not in loaded and loaded["operation"] == "integrate"


def test_a_config_without_schema_is_version_1_and_upgrades():
    upgraded = cfg.from_raw({"operation": "integrate", "npt": 10}, "old")
    assert upgraded == {"operation": "integrate", "npt": 10}


def test_a_newer_schema_is_refused_in_one_line():
    with pytest.raises(AzfilterError, match="newer azfilter") as err:
        cfg.from_raw({"schema": cfg.SCHEMA_VERSION + 1, "npt": 10}, "job.toml")
    assert "\n" not in str(err.value)
    with pytest.raises(AzfilterError, match="positive integer"):
        cfg.from_raw({"schema": "two"}, "job.toml")


def test_a_renamed_key_still_reruns_through_an_upgrade_step(monkeypatch):
    """The mechanism a release uses when it renames a key: a job stored under the old name
    (schema N) is upgraded to N+1 on reading."""
    version = cfg.SCHEMA_VERSION

    def rename_bins(raw):
        raw = dict(raw)
        if "bins" in raw:
            raw["npt"] = raw.pop("bins")
        return raw

    # pretend schema ``version`` called npt "bins" and ``version + 1`` renamed it back
    monkeypatch.setattr(cfg, "SCHEMA_VERSION", version + 1)
    monkeypatch.setitem(cfg.UPGRADES, version, rename_bins)
    upgraded = cfg.from_raw({"schema": version, "operation": "medfilt", "bins": 77}, "old.h5")
    assert upgraded["npt"] == 77 and "bins" not in upgraded
