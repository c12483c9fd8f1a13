"""Outlier statistics in the outputs: NeXus ``/entry/outliers``, text header lines, merge,
``--skip-existing`` extension, ``azfilter info``, and the ``--pick`` option and config key."""

from __future__ import annotations

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from test_cli import PONI, invoke, make_frame, write_cbf, write_stack

import azfilter as az
from azfilter import config as cfg
from azfilter.commands.info import describe_result
from azfilter.output import merge_nexus, read_result, text_output_complete

NPT = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    """geo.poni, three CBF frames and a 3-frame HDF5 stack, with bright spots."""
    root = tmp_path_factory.mktemp("outliersdata")
    (root / "geo.poni").write_text(PONI)
    cbfs = [write_cbf(root / "run" / f"img_{k:04d}.cbf", make_frame(k)) for k in (1, 2, 3)]
    stack_frames = [make_frame(30 + k) for k in range(3)]
    stack = write_stack(root / "stack.h5", stack_frames)
    return SimpleNamespace(root=root, poni=root / "geo.poni", cbfs=cbfs, stack=stack,
                           frames=[make_frame(k) for k in (1, 2, 3)] + stack_frames)


def reference(data, operation: str, frame: np.ndarray, **options):
    integ = az.Integrator(az.load_poni(data.poni), npt=NPT, backend="python")
    return getattr(integ, operation)(frame, **options)


def test_nexus_outliers_group_round_trip(data, tmp_path):
    out = tmp_path / "clip.h5"
    result = invoke("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", NPT,
                    "--thres", 3, "--pick", 4, *data.cbfs, data.stack, "-o", out)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        group = h5["entry/outliers"]
        assert group.attrs["NX_class"] == "NXcollection" and group.attrs["pick"] == 4.0
        assert group["rejected"].dtype == np.int64 and group["rejected"].shape == (6,)
        assert group["picked"].dtype == np.int64 and group["rejected_sum"].dtype == np.float64
        assert group["max_sigma"].dtype == np.float64
        assert group["kept"].dtype == np.int32 and group["kept"].shape == (6, NPT)
        assert group["available"].dtype == np.int32
        np.testing.assert_array_equal(group["kept"][()], h5["entry/data/count"][()])
        stored = {name: group[name][()] for name in group}
        config = json.loads(h5["entry/reduction/configuration/data"][()])
        assert h5["entry/reduction/input/pick"][()] == 4.0
    assert config["pick"] == 4.0
    for row, frame in enumerate(data.frames):
        expected = reference(data, "sigma_clip", frame, thres=3, pick=4).outliers
        assert stored["rejected"][row] == expected.rejected > 0
        assert stored["picked"][row] == expected.picked > 0
        assert stored["rejected_sum"][row] == pytest.approx(expected.rejected_sum, rel=1e-12)
        assert stored["max_sigma"][row] == pytest.approx(expected.max_sigma, rel=1e-12)
        np.testing.assert_array_equal(stored["available"][row], expected.available)
    table = read_result(out)
    assert table.pick == 4.0
    np.testing.assert_array_equal(table.outliers["picked"], stored["picked"])
    line = next(x for x in describe_result(str(out)) if x.startswith("  outliers"))
    assert line.startswith("  outliers (pick=4): rejected ")
    assert f"({np.count_nonzero(stored['picked'])} of 6 frames > 0)" in line


def test_text_outputs_carry_header_lines(data, tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    result = invoke("medfilt", "-p", data.poni, "--backend", "python", "--npt", NPT,
                    "--percentile", 20, 80, "--split", "no", data.cbfs[0], "-o", f"{folder}/")
    assert result.exit_code == 0, result.output
    path = folder / "img_0001.dat"
    text = path.read_text()
    expected = reference(data, "medfilt", data.frames[0], percentile=(20, 80), split="no")
    summary = next(x for x in text.splitlines() if x.startswith("# outliers: "))
    assert summary == "# outliers: " + expected.outliers.summary()
    # the column line stays the last header line; readers and the row check still work
    header = [x for x in text.splitlines() if x.startswith("#")]
    assert header[-1] == "# q_nm^-1 intensity sigma"
    assert text_output_complete(path, NPT)
    assert np.loadtxt(path).shape == (NPT, 3)
    table = read_result(path)
    np.testing.assert_array_equal(table.outliers["kept"][0], expected.count)
    np.testing.assert_array_equal(table.outliers["available"][0], expected.outliers.available)
    assert table.outliers["rejected"][0] == expected.outliers.rejected
    assert table.outliers["picked"][0] == expected.outliers.picked
    assert table.pick == 3.0
    assert any(x.startswith("  outliers (pick=3): ") for x in describe_result(str(path)))
    # integrate writes none
    plain = tmp_path / "plain"
    plain.mkdir()
    assert invoke("integrate", "-p", data.poni, "--backend", "python", "--npt", NPT,
                  data.cbfs[0], "-o", f"{plain}/").exit_code == 0
    assert "# outliers" not in (plain / "img_0001.dat").read_text()
    assert read_result(plain / "img_0001.dat").outliers is None


def test_result_save_writes_the_statistics(data, tmp_path):
    result = reference(data, "sigma_clip", data.frames[1], thres=3)
    path = tmp_path / "one.dat"
    result.save(path)
    table = read_result(path)
    assert table.outliers["rejected"][0] == result.outliers.rejected
    assert table.outliers["rejected_sum"][0] == pytest.approx(result.outliers.rejected_sum,
                                                              rel=1e-8)


def test_merge_and_skip_existing_carry_the_datasets(data, tmp_path):
    common = ("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", NPT, "--thres", 3,
              *data.cbfs, data.stack)
    for k in range(2):
        assert invoke(*common, "--shard", f"{k}/2", "-o", tmp_path / "part.h5").exit_code == 0
    shards = sorted(tmp_path.glob("part_shard*of2.h5"))
    assert len(shards) == 2
    whole = tmp_path / "whole.h5"
    assert invoke(*common, "-o", whole).exit_code == 0
    merged = tmp_path / "merged.h5"
    assert merge_nexus(shards, merged)["complete"] is True
    a, b = read_result(whole), read_result(merged)
    assert a.sources == b.sources and a.frame_indices == b.frame_indices
    for name in ("rejected", "rejected_sum", "picked", "max_sigma", "kept", "available"):
        np.testing.assert_array_equal(a.outliers[name], b.outliers[name], err_msg=name)
    # --skip-existing: a file of the first three frames, extended by the rest
    grown = tmp_path / "grown.h5"
    assert invoke(*common[:-4], *data.cbfs, "-o", grown).exit_code == 0
    assert invoke(*common, "--skip-existing", "-o", grown).exit_code == 0
    c = read_result(grown)
    assert c.sources == a.sources
    for name in ("rejected", "picked", "kept"):
        np.testing.assert_array_equal(a.outliers[name], c.outliers[name], err_msg=name)


def test_outputs_written_before_the_statistics_stay_joinable(data, tmp_path):
    """An output without /entry/outliers nor pick (an older azfilter) is extended with
    --skip-existing and merged: its rows read -1 / NaN, the new rows have statistics."""
    common = ("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", NPT, "--thres", 3)

    def strip(path):   # what an azfilter before the statistics wrote
        with h5py.File(path, "r+") as h5:
            del h5["entry/outliers"]
            del h5["entry/reduction/input/pick"]
            config = json.loads(h5["entry/reduction/configuration/data"][()])
            del config["pick"]
            h5["entry/reduction/configuration/data"][()] = json.dumps(config)

    for k in range(2):
        result = invoke(*common, *data.cbfs, data.stack, "--shard", f"{k}/2", "-o",
                        tmp_path / "part.h5")
        assert result.exit_code == 0, result.output
    old, new = sorted(tmp_path.glob("part_shard*of2.h5"))
    strip(old)
    n_old = read_result(old).intensity.shape[0]
    merged = tmp_path / "merged.h5"
    assert merge_nexus([old, new], merged)["complete"] is True
    table = read_result(merged)
    assert list(table.outliers["rejected"][:n_old]) == [-1] * n_old
    assert np.isnan(table.outliers["max_sigma"][:n_old]).all()
    assert np.all(table.outliers["kept"][:n_old] == -1)
    assert np.all(table.outliers["rejected"][n_old:] > 0)
    assert any(f"{n_old} row(s) without statistics" in x for x in describe_result(str(merged)))
    # --skip-existing on an old file: its rows keep -1, the new ones get statistics
    grown = tmp_path / "grown.h5"
    assert invoke(*common, *data.cbfs, "-o", grown).exit_code == 0
    strip(grown)
    result = invoke(*common, *data.cbfs, data.stack, "--skip-existing", "-o", grown)
    assert result.exit_code == 0, result.output
    table = read_result(grown)
    assert list(table.outliers["rejected"][:3]) == [-1, -1, -1]
    expected = [reference(data, "sigma_clip", frame, thres=3).outliers.picked
                for frame in data.frames[3:]]
    assert list(table.outliers["picked"][3:]) == expected
    # a different pick is another job
    result = invoke(*common, *data.cbfs, data.stack, "--skip-existing", "--pick", 5, "-o",
                    grown)
    assert result.exit_code == 2 and "pick" in result.output


def test_pick_option_and_config_key(data, tmp_path):
    assert cfg.effective({"operation": "sigma-clip"})["pick"] == 3.0
    assert cfg.effective({"operation": "medfilt", "pick": 5})["pick"] == 5
    assert "pick" not in cfg.effective({"operation": "integrate", "pick": 5})
    assert cfg.from_raw({"pick": "2.5"}, "job.toml")["pick"] == 2.5
    result = invoke("integrate", "-p", data.poni, "--pick", 3, data.cbfs[0], "-o",
                    tmp_path / "x.h5")
    assert result.exit_code == 2
    result = invoke("sigma-clip", "--help")
    assert "--pick" in result.output


def test_nexus_rows_written_in_small_blocks_are_the_same(data, tmp_path, monkeypatch):
    """Rows reach the file in blocks (RowBlock): blocks of 2 rows, flushed 3 times over the
    6 frames, give the file that one block gives, outlier statistics included."""
    from azfilter.output import nexus

    args = ("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", NPT, "--thres", 3,
            "--pick", 4, *data.cbfs, data.stack)
    whole = tmp_path / "whole.h5"
    assert invoke(*args, "-o", whole).exit_code == 0
    monkeypatch.setattr(nexus, "MIN_BUFFER_ROWS", 1)
    monkeypatch.setattr(nexus, "MAX_BUFFER_ROWS", 2)
    blocks = tmp_path / "blocks.h5"
    assert invoke(*args, "-o", blocks).exit_code == 0
    with h5py.File(whole, "r") as one, h5py.File(blocks, "r") as many:
        for group in ("entry/data", "entry/outliers"):
            names = sorted(one[group])
            assert names == sorted(many[group])
            for name in names:
                if isinstance(one[group][name], h5py.Dataset):
                    a, b = np.asarray(one[group][name][()]), np.asarray(many[group][name][()])
                    assert a.dtype == b.dtype, name
                    np.testing.assert_array_equal(a, b, err_msg=name)


def test_row_block_grows_and_refuses_other_shapes():
    from azfilter.output.nexus import RowBlock

    block = RowBlock()
    for row in range(5):   # capacity 2: grows, keeping the rows already there
        block.put("I", np.full(3, row, dtype=np.float64), np.float32, capacity=2)
        block.put("rejected", row, np.int64, capacity=2)
        block.rows += 1
    rows = block.take()
    assert rows["I"].dtype == np.float32 and rows["I"].shape == (5, 3)
    np.testing.assert_array_equal(rows["I"][:, 0], np.arange(5))
    np.testing.assert_array_equal(rows["rejected"], np.arange(5))
    assert block.rows == 0
    block.put("I", np.zeros(3), np.float32, capacity=2)
    block.rows += 1
    with pytest.raises(ValueError, match="shape"):
        block.put("I", np.zeros(4), np.float32, capacity=2)
