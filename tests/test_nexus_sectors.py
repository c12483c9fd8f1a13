"""NeXus outputs of reductions with χ sectors: (frames, sectors, npt) with a χ axis.

Results come from a real :class:`azfilter.Integrator` with sectors (python backend, a small
synthetic frame whose rings vary with χ). What is checked: the layout (shapes, chunks, NXdata
axes, ``chi`` and ``sector_ranges``), reading back equal to the results, NXazint1d's required
items and silx's default plot, ``--skip-existing`` appending (and refusing other sectors),
merging shard files (and refusing other sectors), and ``azfilter info``.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_cli import PONI, SHAPE, make_frame
from test_nexus_layout import _text, nxdl_check
from test_output import make_meta

from azfilter.commands.info import describe_result
from azfilter.errors import AzfilterError
from azfilter.integrator import Integrator
from azfilter.output import NexusWriter, check_nexus, read_result
from azfilter.output.merge import merge_nexus
from azfilter.poni import parse_poni

NPT = 50
N_SECTORS = 4
SOURCE = "/data/scan.h5::/entry/data/data"
#: per-bin dataset -> Result attribute, and the dtype the file stores it in
STORED = {"I": ("intensity", np.float32), "I_errors": ("sigma", np.float32),
          "std": ("std", np.float32), "count": ("count", np.float32),
          "sum_signal": ("sum_signal", np.float64), "sum_variance": ("sum_variance", np.float64),
          "sum_normalization": ("sum_normalization", np.float64),
          "sum_normalization2": ("sum_normalization2", np.float64)}


def textured_frame(seed: int) -> np.ndarray:
    """test_cli's two-ring frame with intensity varying as 1 + 0.6 cos(2χ) (texture)."""
    rows, cols = np.indices(SHAPE)
    chi = np.arctan2(rows - 48.0, cols - 60.0)
    return (make_frame(seed) * (1.0 + 0.6 * np.cos(2.0 * chi))).astype(np.int32)


@pytest.fixture(scope="module")
def geometry():
    return parse_poni(PONI, "test.poni")


@pytest.fixture(scope="module")
def results(geometry):
    """Five sigma-clip results of 4 equal sectors, and two of 3 sectors."""
    four = Integrator(geometry, npt=NPT, backend="python", sectors=N_SECTORS)
    three = Integrator(geometry, npt=NPT, backend="python", sectors=3)
    return ([four.sigma_clip(textured_frame(k), thres=3.0, max_iter=3) for k in range(5)],
            [three.sigma_clip(textured_frame(k), thres=3.0, max_iter=3) for k in range(2)])


def write(path, results, indices, mode="new", shard=None):
    meta = make_meta(shard=shard)
    writer = NexusWriter(path, meta, mode=mode)
    for result, index in zip(results, indices, strict=True):
        writer.write(result, SOURCE, index)
    writer.close()
    assert meta.sectors is None      # the caller's meta is not changed
    return path


def assert_rows_equal(path, results):
    table = read_result(path)
    assert table.intensity.shape == (len(results), N_SECTORS, NPT)
    assert table.sigma.shape == (len(results), N_SECTORS, NPT)
    np.testing.assert_array_equal(table.sectors, results[0].sectors)
    np.testing.assert_array_equal(table.chi, results[0].chi)
    assert table.n_sectors == N_SECTORS
    np.testing.assert_array_equal(table.radial, results[0].radial)
    for row, result in enumerate(results):
        np.testing.assert_array_equal(table.intensity[row],
                                      result.intensity.astype(np.float32).astype(np.float64))
        np.testing.assert_array_equal(table.sigma[row],
                                      result.sigma.astype(np.float32).astype(np.float64))
    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        for name, (attr, dtype) in STORED.items():
            stored = data[name][()]
            assert stored.dtype == dtype
            for row, result in enumerate(results):
                np.testing.assert_array_equal(stored[row], getattr(result, attr).astype(dtype))
    return table


def test_sector_results_differ(results):
    """The frame is textured: sectors really differ (otherwise the tests prove little)."""
    first = results[0][0]
    assert first.intensity.shape == (N_SECTORS, NPT)
    assert np.nanmax(np.abs(first.intensity[0] - first.intensity[1])) > 10


def test_sector_file_layout(tmp_path, results):
    path = write(tmp_path / "out.h5", results[0][:3], range(3))
    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        assert [_text(a) for a in data.attrs["axes"]] == [".", "chi", "radial_axis"]
        assert data.attrs["chi_indices"] == 1 and data.attrs["radial_axis_indices"] == 2
        assert data.attrs["source_indices"] == 0 and data.attrs["frame_index_indices"] == 0
        assert _text(data.attrs["signal"]) == "I"
        for name in STORED:
            assert data[name].shape == (3, N_SECTORS, NPT)
            assert data[name].maxshape == (None, N_SECTORS, NPT)
            assert data[name].chunks[1:] == (N_SECTORS, NPT) and data[name].chunks[0] >= 1
        chi = data["chi"]
        np.testing.assert_array_equal(chi[()], [-135.0, -45.0, 45.0, 135.0])
        assert _text(chi.attrs["units"]) == "degree"
        ranges = data["sector_ranges"]
        np.testing.assert_array_equal(ranges[()], [[-180, -90], [-90, 0], [0, 90], [90, 180]])
        assert _text(ranges.attrs["units"]) == "degree"
        assert data["radial_axis"].shape == (NPT,)
        assert data["source"].shape == (3,)
    assert check_nexus(path) == "nxazint1d"


def test_sector_file_reads_back_equal(tmp_path, results):
    path = write(tmp_path / "out.h5", results[0][:3], range(3))
    table = assert_rows_equal(path, results[0][:3])
    assert table.sources == [SOURCE] * 3 and table.frame_indices == [0, 1, 2]


def test_file_without_sectors_has_no_chi(tmp_path, geometry):
    plain = Integrator(geometry, npt=NPT, backend="python")
    path = write(tmp_path / "plain.h5", [plain.sigma_clip(make_frame(0))], [0])
    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        assert "chi" not in data and "sector_ranges" not in data
        assert [_text(a) for a in data.attrs["axes"]] == [".", "radial_axis"]
        assert data["I"].shape == (1, NPT)
    table = read_result(path)
    assert table.sectors is None and table.intensity.shape == (1, NPT)


def test_sector_file_has_every_nxazint1d_required_item(tmp_path, results):
    """NXazint1d knows no sectors (axes ['.', 'radial_axis'], I of rank 2): a sector file
    keeps every required item; its only departures are the χ dimension of I, I_errors and
    axes."""
    path = write(tmp_path / "out.h5", results[0][:2], range(2))
    rows: list = []
    with h5py.File(path, "r") as h5:
        problems = nxdl_check(h5, rows)
    required = [r for r in rows if r[1]]
    assert len(required) == 29
    assert all(present for _path, _req, present, _value in required), \
        [r[0] for r in required if not r[2]]
    assert sorted(problems) == sorted([
        "/entry/data@axes=['.', 'chi', 'radial_axis'] not in [\"['.', 'radial_axis']\"]",
        "/entry/data/I: rank 3, not 2",
        "/entry/data/I_errors: rank 3, not 2",
        # the definition's nRad is I's 2nd dimension, here the sectors
        f"/entry/data/radial_axis: nRad={NPT}, not {N_SECTORS}",
    ])


def test_silx_finds_the_default_signal_of_a_sector_file(tmp_path, results):
    nxdata = pytest.importorskip("silx.io.nxdata")
    path = write(tmp_path / "out.h5", results[0][:3], range(3))
    with h5py.File(path, "r") as h5:
        default = nxdata.get_default(h5)
        assert default is not None and default.is_valid
        assert default.signal.name == "/entry/data/I"
        assert default.signal.shape == (3, N_SECTORS, NPT)
        assert default.axes_dataset_names == [None, "chi", "radial_axis"]
        np.testing.assert_array_equal(default.axes[1][()], results[0][0].chi)
        np.testing.assert_array_equal(default.axes[2][()], results[0][0].radial)
        assert default.errors is not None and default.errors.name.endswith("/I_errors")
        np.testing.assert_array_equal(default.errors[2, 1],
                                      results[0][2].sigma[1].astype(np.float32))


def test_append_keeps_sectors_and_refuses_other_sectors(tmp_path, results, geometry):
    path = write(tmp_path / "out.h5", results[0][:2], range(2))
    write(path, results[0][2:4], [2, 3], mode="append")
    assert_rows_equal(path, results[0][:4])
    before = path.read_bytes()
    with pytest.raises(AzfilterError, match=r"out.h5: exists with other sectors \(4 sectors: "
                       r"\[-180, -90\].*this run: 3 sectors"):
        write(path, results[1][:1], [4], mode="append")
    plain = Integrator(geometry, npt=NPT, backend="python").sigma_clip(make_frame(0))
    with pytest.raises(AzfilterError, match=r"this run: none"):
        write(path, [plain], [4], mode="append")
    assert path.read_bytes() == before
    # a 1-D file refuses a sector result
    flat = write(tmp_path / "flat.h5", [plain], [0])
    with pytest.raises(AzfilterError, match=r"flat.h5: exists with other sectors \(none; "
                       r"this run: 4 sectors"):
        write(flat, results[0][:1], [1], mode="append")


def test_append_without_rows_keeps_the_files_sectors(tmp_path, results):
    """An append run whose frames all failed (start() without sectors) keeps the sectors."""
    path = write(tmp_path / "out.h5", results[0][:2], range(2))
    writer = NexusWriter(path, make_meta(), mode="append")
    writer.record_failure("/data/b.cbf", 0, "cannot read")
    writer.start(results[0][0].radial)
    assert writer.close()
    table = assert_rows_equal(path, results[0][:2])
    assert table.failed == [("/data/b.cbf", 0, "cannot read")]


def test_start_with_sectors_writes_an_empty_sector_file(tmp_path, results):
    writer = NexusWriter(tmp_path / "empty.h5", make_meta())
    writer.record_failure("/data/b.cbf", -1, "cannot read")
    writer.start(results[0][0].radial, sectors=results[0][0].sectors)
    assert writer.close()
    with h5py.File(tmp_path / "empty.h5", "r") as h5:
        assert h5["entry/data/I"].shape == (0, N_SECTORS, NPT)
    np.testing.assert_array_equal(read_result(tmp_path / "empty.h5").sectors,
                                  results[0][0].sectors)


def test_merge_sector_shards(tmp_path, results):
    first = write(tmp_path / "s0.h5", results[0][:3], range(3), shard="0/2")
    second = write(tmp_path / "s1.h5", results[0][3:5], [3, 4], shard="1/2")
    # the second shard given first: merge orders by shard index
    summary = merge_nexus([second, first], tmp_path / "all.h5")
    assert summary["rows"] == 5 and summary["duplicates"] == 0
    table = assert_rows_equal(tmp_path / "all.h5", results[0])
    assert table.frame_indices == [0, 1, 2, 3, 4]
    with h5py.File(tmp_path / "all.h5", "r") as h5:
        assert [_text(a) for a in h5["entry/data"].attrs["axes"]] == [".", "chi", "radial_axis"]
        assert h5["entry/data/I"].maxshape == (None, N_SECTORS, NPT)
    assert check_nexus(tmp_path / "all.h5") == "nxazint1d"


def test_merge_refuses_other_sector_counts(tmp_path, results, geometry):
    first = write(tmp_path / "s0.h5", results[0][:1], [0], shard="0/2")
    other = write(tmp_path / "s1.h5", results[1][1:2], [1], shard="1/2")
    with pytest.raises(AzfilterError, match=r"s1.h5: χ sectors differ from .*s0.h5 "
                       r"\(3 sectors: .*, not 4 sectors"):
        merge_nexus([first, other], tmp_path / "all.h5")
    plain = Integrator(geometry, npt=NPT, backend="python").sigma_clip(make_frame(1))
    flat = write(tmp_path / "flat.h5", [plain], [1], shard="1/2")
    with pytest.raises(AzfilterError, match=r"flat.h5: χ sectors differ .*\(none, not 4"):
        merge_nexus([first, flat], tmp_path / "all.h5")
    assert not (tmp_path / "all.h5").exists()


def test_info_shows_the_sectors(tmp_path, results):
    path = write(tmp_path / "out.h5", results[0][:3], range(3))
    lines = describe_result(str(path))
    assert "  frames: 3" in lines
    assert "  chi sectors: 4 sectors: [-180, -90] [-90, 0] [0, 90] [90, 180] deg" in lines
    plain = describe_result(str(write(tmp_path / "one.h5", [results[0][0].sector(0)], [0])))
    assert not any("sectors" in line for line in plain[1:])   # plain[0] names the tmp path


def test_command_empty_sector_shard_merges(tmp_path):
    """A shard given no frames still writes a sector file (same sectors), so that
    ``azfilter merge`` joins it with the shard that holds the frame."""
    from test_cli import invoke, write_cbf

    (tmp_path / "geo.poni").write_text(PONI)
    frame = write_cbf(tmp_path / "one.cbf", make_frame(0))
    for index in range(2):
        result = invoke("integrate", "-p", str(tmp_path / "geo.poni"), "--backend", "python",
                        "--npt", str(NPT), "--sectors", "3", "--shard", f"{index}/2",
                        str(frame), "-o", str(tmp_path / "s.h5"))
        assert result.exit_code == 0, result.output
    shards = [tmp_path / "s_shard0of2.h5", tmp_path / "s_shard1of2.h5"]
    tables = [read_result(path) for path in shards]
    assert sorted(t.intensity.shape for t in tables) == [(0, 3, NPT), (1, 3, NPT)]
    assert all(t.n_sectors == 3 for t in tables)
    merged = invoke("merge", str(shards[0]), str(shards[1]), "-o", str(tmp_path / "all.h5"))
    assert merged.exit_code == 0, merged.output
    table = read_result(tmp_path / "all.h5")
    assert table.intensity.shape == (1, 3, NPT) and table.complete is True
