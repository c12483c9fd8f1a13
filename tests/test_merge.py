"""``merge_nexus`` / ``azfilter merge`` prove a job complete from its shards' manifests.

Shards are written by the real NexusWriter with the job manifest a sharded run stores; the
merged file must hold every planned frame as a row or a failed frame, or say it does not.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from test_output import make_meta, make_result

from azfilter.commands.info import describe_result
from azfilter.commands.merge import merge_command
from azfilter.errors import AzfilterError
from azfilter.manifest import Manifest
from azfilter.output import NexusWriter, merge_nexus, read_result

DATA = Path(__file__).parent / "data"
ENTRIES = [("/d/a.cbf", 0), ("/d/b.cbf", 0)] + [("/d/s.h5::/entry/data/data", k)
                                                  for k in range(6)]


def write_shards(folder: Path, manifest: Manifest, skip: set[tuple[str, int]] = frozenset(),
                 fail: dict[tuple[str, int], str] | None = None, only: list[int] | None = None,
                 name: str = "run") -> list[Path]:
    """Shard files of a job as ``--shard I/N`` runs write them; ``skip`` frames are neither
    written nor failed (lost), ``fail`` ones are recorded as failed."""
    fail = fail or {}
    paths = []
    for shard in range(manifest.shards) if only is None else only:
        meta = make_meta(shard=f"{shard}/{manifest.shards}")
        meta.manifest = manifest
        path = folder / f"{name}_shard{shard}of{manifest.shards}.h5"
        writer = NexusWriter(path, meta)
        writer.start(make_result().radial)
        for position, (source, index) in enumerate(manifest.shard_entries(shard)):
            if (source, index) in skip:
                continue
            if (source, index) in fail:
                writer.record_failure(source, index, fail[(source, index)])
            else:
                writer.write(make_result(seed=position), source, index)
        assert writer.close()
        paths.append(path)
    return paths


def test_merge_of_a_whole_job_is_complete(tmp_path):
    manifest = Manifest.of(ENTRIES, shards=3)
    shards = write_shards(tmp_path, manifest)
    out = tmp_path / "all.h5"
    summary = merge_nexus(shards[::-1], out)
    assert summary == {"rows": 8, "duplicates": 0, "missing_shards": [], "missing_frames": 0,
                       "failed": 0, "complete": True}
    table = read_result(out)
    assert list(zip(table.sources, table.frame_indices, strict=True)) == ENTRIES
    assert table.complete is True and table.manifest_digest == manifest.digest
    assert table.manifest_entries == 8 and table.shards == 3
    with h5py.File(out, "r") as h5:
        assert "shard" not in h5["entry/reduction"]
        assert h5["entry/definition"][()] == b"NXazint1d"
    assert "  complete: yes (every planned frame is a row or listed as failed)" in \
        describe_result(str(out))


def test_failed_frames_are_carried_and_accounted(tmp_path):
    manifest = Manifest.of(ENTRIES, shards=2)
    shards = write_shards(tmp_path, manifest,
                          fail={("/d/b.cbf", 0): "not a CBF file",
                                ("/d/s.h5::/entry/data/data", 4): "reduction failed: boom"})
    out = tmp_path / "all.h5"
    summary = merge_nexus(shards, out)
    assert summary["complete"] is True and summary["failed"] == 2 and summary["rows"] == 6
    table = read_result(out)
    assert table.failed == [("/d/b.cbf", 0, "not a CBF file"),
                            ("/d/s.h5::/entry/data/data", 4, "reduction failed: boom")]
    text = "\n".join(describe_result(str(out)))
    assert "failed frames: 2" in text
    assert "failed: /d/s.h5::/entry/data/data frame 4: reduction failed: boom" in text
    # a rerun of the failed frame, merged with the shards, is a row and no longer a failure
    rerun = tmp_path / "rerun.h5"
    meta = make_meta(shard="1/2")
    meta.manifest = manifest
    writer = NexusWriter(rerun, meta)
    writer.write(make_result(seed=9), "/d/s.h5::/entry/data/data", 4)
    writer.close()
    summary = merge_nexus([*shards, rerun], tmp_path / "again.h5")
    assert summary["failed"] == 1 and summary["rows"] == 7 and summary["complete"] is True


def test_missing_shard_is_recorded_in_the_file(tmp_path):
    manifest = Manifest.of(ENTRIES, shards=4)
    shards = write_shards(tmp_path, manifest, only=[0, 1, 3])
    out = tmp_path / "all.h5"
    summary = merge_nexus(shards, out)
    assert summary["missing_shards"] == [2] and summary["complete"] is False
    assert summary["missing_frames"] == len(manifest.shard_entries(2)) == 2
    table = read_result(out)
    assert table.complete is False and table.missing_shards == [2]
    assert table.missing == list(manifest.shard_entries(2))
    text = "\n".join(describe_result(str(out)))
    assert "complete: NO (shard(s) 2 missing; 2 planned frame(s) missing)" in text
    assert "missing: /d/s.h5::/entry/data/data frame 2" in text


def test_frame_lost_inside_a_shard_is_found(tmp_path):
    manifest = Manifest.of(ENTRIES, shards=2)
    shards = write_shards(tmp_path, manifest, skip={("/d/s.h5::/entry/data/data", 1)})
    assert read_result(shards[0]).complete is False       # the shard itself says so
    summary = merge_nexus(shards, tmp_path / "all.h5")
    assert summary["missing_frames"] == 1 and summary["complete"] is False
    assert read_result(tmp_path / "all.h5").missing == [("/d/s.h5::/entry/data/data", 1)]


def test_whole_file_failure_and_uncounted_file(tmp_path):
    """A planned entry with frame -1 (a file not counted when planning) and a failure of a
    whole source (frame -1) account for the frames they stand for."""
    entries = [("/d/a.cbf", 0), ("/d/big.h5", -1), ("/d/s.h5", 0), ("/d/s.h5", 1)]
    manifest = Manifest.of(entries, shards=2)
    meta0, meta1 = make_meta(shard="0/2"), make_meta(shard="1/2")
    meta0.manifest = meta1.manifest = manifest
    w0 = NexusWriter(tmp_path / "s0.h5", meta0)
    w0.write(make_result(), "/d/a.cbf", 0)
    w0.write(make_result(), "/d/big.h5", 0)
    w0.write(make_result(), "/d/big.h5", 1)
    w0.close()
    w1 = NexusWriter(tmp_path / "s1.h5", meta1)
    w1.start(make_result().radial)
    w1.record_failure("/d/s.h5", None, "truncated file")
    w1.close()
    summary = merge_nexus([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "all.h5")
    assert summary["complete"] is True and summary["rows"] == 3 and summary["failed"] == 1


@pytest.mark.parametrize("case", ["different N", "different input list"])
def test_shards_of_different_jobs_are_refused(tmp_path, case):
    """``run_shard0of4.h5`` + ``n3_shard1of3.h5``, or shards planned over different input
    lists (a glob expanded at different times): one line, nothing written."""
    first = write_shards(tmp_path, Manifest.of(ENTRIES, shards=4), only=[0])[0]
    if case == "different N":
        other = write_shards(tmp_path, Manifest.of(ENTRIES, shards=3), only=[1], name="n3")[0]
        match = r"n3_shard1of3\.h5: comes from a different job than .*run_shard0of4\.h5 " \
                r"\(split into 3 shards, not 4\)"
    else:
        grown = Manifest.of([*ENTRIES, ("/d/late.cbf", 0)], shards=4)
        other = write_shards(tmp_path, grown, only=[1], name="late")[0]
        match = r"late_shard1of4\.h5: comes from a different job .*job manifests differ: " \
                r"9 planned frames vs 8"
    with pytest.raises(AzfilterError, match=match) as info:
        merge_nexus([first, other], tmp_path / "all.h5")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "all.h5").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_legacy_shards_of_different_n_are_refused(tmp_path):
    """Files without a manifest (or of the old layout) still carry ``I/N``: mixing N is
    refused, not merged into 58 of 100 frames."""
    old = tmp_path / "run_shard0of2.h5"
    shutil.copyfile(DATA / "legacy_shard0of2.h5", old)
    meta = make_meta({"npt": 20}, shard="1/3")
    writer = NexusWriter(tmp_path / "n3_shard1of3.h5", meta)
    writer.write(make_result(npt=20), "/x/c.cbf", 0)
    writer.close()
    with pytest.raises(AzfilterError, match=r"n3_shard1of3\.h5: comes from a different job .*"
                                            r"\(shard of 3, not of 2\)"):
        merge_nexus([old, tmp_path / "n3_shard1of3.h5"], tmp_path / "all.h5")


def test_legacy_shards_still_merge(tmp_path):
    """Shards of the layout before NXazint1d (no manifest) merge as before, into the new
    layout; completeness is unknown (no manifest), missing shards are still found."""
    out = tmp_path / "all.h5"
    summary = merge_nexus([DATA / "legacy_shard1of2.h5", DATA / "legacy_shard0of2.h5"], out)
    assert summary == {"rows": 3, "duplicates": 0, "missing_shards": [], "missing_frames": 0,
                       "failed": 0, "complete": None}
    table = read_result(out)
    assert table.layout == "nxazint1d" and table.complete is None
    assert table.sources == ["/x/a.cbf", "/x/b.h5::/entry/data/data",
                             "/x/b.h5::/entry/data/data"]
    legacy = read_result(DATA / "legacy_shard0of2.h5")
    np.testing.assert_array_equal(table.intensity[:2], legacy.intensity)
    with h5py.File(out, "r") as h5, h5py.File(DATA / "legacy_shard0of2.h5", "r") as old:
        np.testing.assert_array_equal(h5["entry/data/sum_signal"][:2],
                                      old["entry/data/sum_signal"][()])
        np.testing.assert_array_equal(h5["entry/data/radial_axis"][()], old["entry/data/q"][()])
    assert "job manifest: not recorded" in "\n".join(describe_result(str(out)))
    summary = merge_nexus([DATA / "legacy_shard1of2.h5"], tmp_path / "half.h5")
    assert summary["missing_shards"] == [0] and summary["complete"] is False


def test_shard_without_manifest_mixed_with_one_is_refused(tmp_path):
    with_manifest = write_shards(tmp_path, Manifest.of(ENTRIES, shards=2), only=[0])[0]
    bare = tmp_path / "bare_shard1of2.h5"
    writer = NexusWriter(bare, make_meta(shard="1/2"))
    writer.write(make_result(), "/d/s.h5::/entry/data/data", 5)
    writer.close()
    with pytest.raises(AzfilterError, match=r"bare_shard1of2\.h5: has no job manifest"):
        merge_nexus([with_manifest, bare], tmp_path / "all.h5")


@pytest.mark.parametrize("damage", ["btree", "truncated", "not hdf5"])
def test_corrupt_shard_is_one_line_naming_it(tmp_path, damage):
    shards = write_shards(tmp_path, Manifest.of(ENTRIES, shards=2))
    raw = bytearray(shards[1].read_bytes())
    if damage == "btree":
        at = raw.find(b"TREE", 100)
        raw[at:at + 4] = b"XXXX"
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"garbage" * 100)
    shards[1].write_bytes(bytes(raw))
    with pytest.raises(AzfilterError, match=r"run_shard1of2\.h5: ") as info:
        merge_nexus(shards, tmp_path / "all.h5")
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert not (tmp_path / "all.h5").exists() and not list(tmp_path.glob(".*.tmp"))
    proc = subprocess.run([sys.executable, "-m", "azfilter", "merge", *map(str, shards), "-o",
                           str(tmp_path / "all.h5")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "run_shard1of2.h5" in lines[0] and "Traceback" not in proc.stderr


def test_merge_command_exit_status_and_lines(tmp_path):
    manifest = Manifest.of(ENTRIES, shards=3)
    shards = write_shards(tmp_path, manifest, fail={("/d/a.cbf", 0): "corrupt"}, only=[0, 1])
    runner = CliRunner()
    result = runner.invoke(merge_command, [*map(str, shards), "-o", str(tmp_path / "all.h5")])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert "azfilter: merge: shard(s) 2 missing from the inputs" in lines
    assert ("azfilter: merge: 3 planned frame(s) are neither in the shards nor listed as "
            "failed (see 'azfilter info')") in lines
    assert any("1 frame(s) failed" in line for line in lines)
    assert lines[-1].endswith(f"4 frames, INCOMPLETE -> {tmp_path / 'all.h5'}")
    complete = write_shards(tmp_path, manifest, name="ok")
    result = runner.invoke(merge_command, [*map(str, complete), "-o", str(tmp_path / "ok.h5")])
    assert result.exit_code == 0 and "8 frames, complete" in result.output


def test_unsharded_output_and_earlier_merge_need_no_shard_names(tmp_path):
    """An unsharded output (no ``I/N``) of a job, or the merge of some shards merged again
    with the rest, is complete when its frames are there."""
    whole = Manifest.of(ENTRIES, shards=1)
    meta = make_meta()
    meta.manifest = whole
    writer = NexusWriter(tmp_path / "one.h5", meta)
    for k, (source, index) in enumerate(ENTRIES):
        writer.write(make_result(seed=k), source, index)
    writer.close()
    summary = merge_nexus([tmp_path / "one.h5"], tmp_path / "copy.h5")
    assert summary["complete"] is True and summary["missing_shards"] == []
    manifest = Manifest.of(ENTRIES, shards=3)
    shards = write_shards(tmp_path, manifest)
    merge_nexus(shards[:2], tmp_path / "part.h5")
    summary = merge_nexus([tmp_path / "part.h5", shards[2]], tmp_path / "all.h5")
    assert summary["complete"] is True and summary["missing_shards"] == []
    assert summary["rows"] == 8


def test_legacy_and_new_layout_shards_merge(tmp_path):
    """A shard of the old layout and one of the new (both without a manifest) merge."""
    meta = make_meta({"npt": 20, "config_version": 1}, shard="1/2")
    writer = NexusWriter(tmp_path / "new_shard1of2.h5", meta)
    writer.write(make_result(npt=20, seed=5), "/x/c.cbf", 0)
    writer.close()
    summary = merge_nexus([tmp_path / "new_shard1of2.h5", DATA / "legacy_shard0of2.h5"],
                          tmp_path / "all.h5")
    assert summary["rows"] == 3 and summary["missing_shards"] == []
    table = read_result(tmp_path / "all.h5")
    assert table.sources == ["/x/a.cbf", "/x/b.h5::/entry/data/data", "/x/c.cbf"]
    np.testing.assert_allclose(table.intensity[2], make_result(npt=20, seed=5).intensity,
                               rtol=1e-6)
