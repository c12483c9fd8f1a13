"""Output writers and readers: text (.dat/.xy), NeXus/HDF5, merge, atomic writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import azfilter as az
from azfilter.errors import AzfilterError
from azfilter.integrator import Result
from azfilter.output import (
    NexusWriter,
    OutputMeta,
    beam_centre,
    format_text,
    geometry_lines,
    merge_nexus,
    read_nexus_config,
    read_result,
    source_stem,
    stored_frames,
    text_output_complete,
    text_output_name,
    write_text,
)

PONI_TEXT = """\
poni_version: 2.1
Detector: Detector
Detector_config: {"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [64, 80], "orientation": 3}
Distance: 0.1
Poni1: 0.0032
Poni2: 0.004
Rot1: 0.0
Rot2: 0.0
Rot3: 0.0
Wavelength: 1e-10
"""


def make_result(npt: int = 50, seed: int = 0, unit: str = "q_nm^-1", empty=(3, 4)) -> Result:
    """A result with random values and NaN/0 in the ``empty`` bins."""
    rng = np.random.default_rng(seed)
    radial = np.linspace(0.1, 10.0, npt)
    signal = rng.uniform(10, 1000, npt)
    norm = rng.uniform(1, 5, npt)
    intensity = signal / norm
    sigma = np.sqrt(signal) / norm
    std = rng.uniform(0.1, 3, npt)
    count = rng.integers(1, 100, npt).astype(float)
    for k in empty:
        intensity[k] = sigma[k] = std[k] = np.nan
        count[k] = 0
    return Result(radial=radial, intensity=intensity, sigma=sigma, std=std, count=count,
                  sum_signal=signal, sum_variance=signal.copy(), sum_normalization=norm,
                  sum_normalization2=norm**2, unit=unit, operation="sigma_clip",
                  parameters={}, error_model="azimuthal")


def make_meta(config: dict | None = None, unit: str = "q_nm^-1", shard: str | None = None
              ) -> OutputMeta:
    from azfilter.poni import parse_poni

    geometry = parse_poni(PONI_TEXT, "test.poni")
    base = {"operation": "sigma-clip", "poni": "/x/test.poni", "npt": 50, "unit": unit,
            "thres": 5.0, "max_iter": 5, "error_model": "azimuthal", "split": "no",
            "inputs": ["/x/a.cbf"], "output": "/x/out.h5"}
    base.update(config or {})
    return OutputMeta(operation="sigma-clip", unit=unit,
                      parameters={"npt": 50, "unit": unit, "thres": 5.0, "max_iter": 5,
                                  "mask": None, "radial_range": None},
                      poni_text=PONI_TEXT, geometry=geometry_lines(geometry), config=base,
                      shard=shard)


# ---------------------------------------------------------------------------- text


def test_text_round_trip_loadtxt_and_header(tmp_path):
    result = make_result()
    meta = make_meta()
    path = tmp_path / "img_00002.dat"
    write_text(path, result, meta, "/data/img.h5::/entry/data/data", 2, 10)
    values = np.loadtxt(path)
    assert values.shape == (50, 3)
    np.testing.assert_allclose(values[:, 0], result.radial, rtol=1e-9)
    np.testing.assert_allclose(values[:, 1], result.intensity, rtol=1e-9)
    np.testing.assert_allclose(values[:, 2], result.sigma, rtol=1e-9)
    assert np.isnan(values[3, 1]) and np.isnan(values[4, 2])
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert header[0].startswith("# azfilter ")
    assert "# operation: sigma-clip" in header
    assert "# thres: 5.0" in header and "# mask: none" in header
    assert "# source: /data/img.h5::/entry/data/data" in header
    assert "# frame: 2 of 10" in header
    assert any(line.startswith("# poni> Distance: 0.1") for line in header)
    assert any(line.startswith("# Beam centre (Fit2D): x=40.000 y=32.000") for line in header)
    assert any(line.startswith("# Detector: ") for line in header)
    assert header[-1] == "# q_nm^-1 intensity sigma"
    config_line = next(line for line in header if line.startswith("# config: "))
    assert json.loads(config_line[len("# config: "):])["thres"] == 5.0
    table = read_result(path)
    assert table.sources == ["/data/img.h5::/entry/data/data"] and table.frame_indices == [2]
    assert table.unit == "q_nm^-1" and table.operation == "sigma-clip"
    np.testing.assert_allclose(table.intensity[0], result.intensity, rtol=1e-9)


def test_text_complete_check(tmp_path):
    result = make_result()
    path = tmp_path / "a.dat"
    write_text(path, result, make_meta(), "/d/a.cbf", 0, 1)
    assert text_output_complete(path, 50)
    assert not text_output_complete(path, 51)
    text = path.read_text()
    (tmp_path / "cut.dat").write_text(text[: len(text) - 30])  # truncated mid-line
    assert not text_output_complete(tmp_path / "cut.dat", 50)
    (tmp_path / "rows.dat").write_text("\n".join(text.splitlines()[:-5]) + "\n")
    assert not text_output_complete(tmp_path / "rows.dat", 50)
    assert not text_output_complete(tmp_path / "missing.dat", 50)


def test_text_names():
    assert text_output_name("/d/img_001.cbf", 0, 1, "q_nm^-1") == "img_001.dat"
    assert text_output_name("/d/img_001.cbf.gz", 0, 1, "2th_deg") == "img_001.xy"
    assert text_output_name("/d/scan.h5::/entry/data", 7, 50, "q_A^-1") == "scan_00007.dat"
    assert text_output_name("/d/scan.h5", 0, 1, "r_mm") == "scan.dat"
    assert source_stem("/d/x.y.edf.bz2") == "x.y"


def test_format_text_ends_with_newline_and_no_stray_columns():
    text = format_text(make_result(npt=5, empty=()), make_meta(), "/d/a.cbf", 0, 1)
    rows = [line for line in text.splitlines() if not line.startswith("#")]
    assert len(rows) == 5 and all(len(r.split()) == 3 for r in rows)
    assert text.endswith("\n")


# ---------------------------------------------------------------------------- NeXus


def _attr(value):
    return value.decode() if isinstance(value, bytes) else value


def test_nexus_layout_is_plottable_nxdata(tmp_path):
    path = tmp_path / "out.h5"
    writer = NexusWriter(path, make_meta(shard="1/4"))
    results = [make_result(seed=k) for k in range(3)]
    for k, result in enumerate(results):
        writer.write(result, "/data/scan.h5", k)
        # not visible under the final name until closed
        assert not path.exists()
    temps = list(tmp_path.glob(".out.h5.*.tmp"))
    assert len(temps) == 1
    assert writer.close()
    assert not list(tmp_path.glob("*.tmp"))
    with h5py.File(path, "r") as h5:
        assert _attr(h5.attrs["NX_class"]) == "NXroot"
        entry = h5[_attr(h5.attrs["default"])]
        assert _attr(entry.attrs["NX_class"]) == "NXentry"
        data = entry[_attr(entry.attrs["default"])]
        assert _attr(data.attrs["NX_class"]) == "NXdata"
        signal = _attr(data.attrs["signal"])
        assert signal == "I"
        axes = [_attr(a) for a in data.attrs["axes"]]
        assert axes == [".", "radial_axis"]
        assert int(data.attrs["radial_axis_indices"]) == 1
        assert data[signal].shape == (3, 50) and data[signal].dtype == np.float32
        assert data["I_errors"].shape == (3, 50)
        assert data["radial_axis"].shape == (50,)
        assert _attr(data["radial_axis"].attrs["units"]) == "1/nm"
        assert _attr(data["radial_axis"].attrs["unit_name"]) == "q_nm^-1"
        assert _attr(data["radial_axis"].attrs["long_name"]) == "q"
        for name in ("std", "count", "sum_signal", "sum_variance", "sum_normalization",
                     "sum_normalization2"):
            assert data[name].shape == (3, 50)
        np.testing.assert_allclose(data["I"][1], results[1].intensity, rtol=1e-6)
        np.testing.assert_allclose(data["I_errors"][2], results[2].sigma, rtol=1e-6)
        np.testing.assert_array_equal(data["sum_signal"][0], results[0].sum_signal)
        assert [int(i) for i in data["frame_index"][()]] == [0, 1, 2]
        assert [_attr(s) for s in data["source"][()]] == ["/data/scan.h5"] * 3
        process = entry["reduction"]
        assert _attr(process.attrs["NX_class"]) == "NXprocess"
        assert _attr(process["program"][()]) == "azfilter"
        assert _attr(process["version"][()]) == az.__version__
        assert _attr(process["shard"][()]) == "1/4"
        assert "Distance: 0.1" in _attr(process["poni/data"][()])
        assert _attr(process["configuration"].attrs["NX_class"]) == "NXnote"
    assert read_nexus_config(path)["thres"] == 5.0
    table = read_result(path)
    assert table.intensity.shape == (3, 50) and table.unit == "q_nm^-1"
    assert stored_frames(path) == {("/data/scan.h5", k) for k in range(3)}


@pytest.mark.parametrize("unit,name,symbol", [("2th_deg", "2theta", "degree"),
                                              ("2th_rad", "2theta", "rad"), ("r_mm", "r", "mm"),
                                              ("q_A^-1", "q", "1/angstrom"),
                                              ("q_nm^-1", "q", "1/nm")])
def test_nexus_radial_axis_units_as_nexus_writes_them(tmp_path, unit, name, symbol):
    path = tmp_path / "u.nxs"
    writer = NexusWriter(path, make_meta(unit=unit))
    writer.write(make_result(unit=unit), "/d/a.cbf", 0)
    writer.close()
    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        assert [_attr(a) for a in data.attrs["axes"]] == [".", "radial_axis"]
        assert _attr(data["radial_axis"].attrs["units"]) == symbol
        assert _attr(data["radial_axis"].attrs["long_name"]) == name
        assert _attr(data["radial_axis"].attrs["unit_name"]) == unit
        assert int(data.attrs["radial_axis_indices"]) == 1
    assert read_result(path).unit == unit


def test_nexus_refuses_existing_and_abort_leaves_nothing(tmp_path):
    path = tmp_path / "out.h5"
    path.write_bytes(b"precious")
    with pytest.raises(AzfilterError, match="exists"):
        NexusWriter(path, make_meta())
    writer = NexusWriter(path, make_meta(), mode="overwrite")
    writer.write(make_result(), "/d/a.cbf", 0)
    writer.abort()
    assert path.read_bytes() == b"precious"
    assert not list(tmp_path.glob("*.tmp"))
    # no rows: close() creates nothing
    other = tmp_path / "none.h5"
    assert not NexusWriter(other, make_meta()).close()
    assert not other.exists()


def test_nexus_append_keeps_rows_and_checks_config(tmp_path):
    path = tmp_path / "out.h5"
    writer = NexusWriter(path, make_meta())
    writer.write(make_result(seed=1), "/d/a.cbf", 0)
    writer.close()
    appender = NexusWriter(path, make_meta(), mode="append")
    assert appender.existing == {("/d/a.cbf", 0)}
    appender.write(make_result(seed=2), "/d/b.cbf", 0)
    appender.close()
    table = read_result(path)
    assert table.sources == ["/d/a.cbf", "/d/b.cbf"]
    np.testing.assert_allclose(table.intensity[0], make_result(seed=1).intensity, rtol=1e-6)
    with pytest.raises(AzfilterError, match="different configuration.*thres"):
        NexusWriter(path, make_meta({"thres": 3.0}), mode="append")


# ---------------------------------------------------------------------------- merge


def _shard_file(path: Path, shard: str | None, rows: list[tuple[str, int, int]],
                config: dict | None = None) -> Path:
    writer = NexusWriter(path, make_meta(config, shard=shard))
    for source, index, seed in rows:
        writer.write(make_result(seed=seed), source, index)
    writer.close()
    return path


def test_merge_orders_by_shard_and_drops_duplicates(tmp_path):
    s1 = _shard_file(tmp_path / "s1.h5", "1/3", [("/d/b.h5", 0, 3), ("/d/b.h5", 1, 4)])
    s0 = _shard_file(tmp_path / "s0.h5", "0/3", [("/d/a.cbf", 0, 1), ("/d/b.h5", 0, 3)])
    s2 = _shard_file(tmp_path / "s2.h5", "2/3", [("/d/c.cbf", 0, 5)])
    out = tmp_path / "all.h5"
    summary = merge_nexus([s2, s1, s0], out)
    assert summary == {"rows": 4, "duplicates": 1, "missing_shards": [], "missing_frames": 0,
                       "failed": 0, "complete": None}
    table = read_result(out)
    assert list(zip(table.sources, table.frame_indices, strict=True)) == [
        ("/d/a.cbf", 0), ("/d/b.h5", 0), ("/d/b.h5", 1), ("/d/c.cbf", 0)]
    np.testing.assert_allclose(table.intensity[2], make_result(seed=4).intensity, rtol=1e-6)
    with h5py.File(out, "r") as h5:
        assert "shard" not in h5["entry/reduction"]
        assert h5["entry/data/sum_signal"].shape == (4, 50)
    with pytest.raises(AzfilterError, match="exists"):
        merge_nexus([s0, s1], out)
    assert merge_nexus([s0, s2], out, overwrite=True)["missing_shards"] == [1]


def test_merge_refuses_different_jobs(tmp_path):
    s0 = _shard_file(tmp_path / "s0.h5", "0/2", [("/d/a.cbf", 0, 1)])
    s1 = _shard_file(tmp_path / "s1.h5", "1/2", [("/d/b.cbf", 0, 2)], config={"npt": 60})
    with pytest.raises(AzfilterError, match="different job.*npt"):
        merge_nexus([s0, s1], tmp_path / "all.h5")
    assert not (tmp_path / "all.h5").exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_read_result_rejects_foreign_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5["data"] = np.zeros((3, 3))
    with pytest.raises(AzfilterError, match="not an azfilter result"):
        read_result(foreign)
    with pytest.raises(AzfilterError, match="no such file"):
        read_result(tmp_path / "missing.h5")


# ---------------------------------------------------------------------------- geometry text


@pytest.mark.parametrize("rot1,rot2,rot3", [(0.0, 0.0, 0.0), (0.05, -0.03, 0.0),
                                            (-0.2, 0.3, 0.7), (0.49, 0.1, -1.0)])
def test_beam_centre_matches_pyfai_fit2d(rot1, rot2, rot3):
    pytest.importorskip("pyFAI")
    from pyFAI.geometry import Geometry as PyFAIGeometry

    from azfilter.poni import parse_poni

    text = PONI_TEXT.replace("Rot1: 0.0", f"Rot1: {rot1}").replace(
        "Rot2: 0.0", f"Rot2: {rot2}").replace("Rot3: 0.0", f"Rot3: {rot3}")
    geometry = parse_poni(text, "t.poni")
    x, y, direct, tilt = beam_centre(geometry)
    ai = PyFAIGeometry(dist=0.1, poni1=0.0032, poni2=0.004, rot1=rot1, rot2=rot2,
                                 rot3=rot3, pixel1=1e-4, pixel2=1e-4, wavelength=1e-10)
    fit2d = ai.getFit2D()
    assert x == pytest.approx(fit2d["centerX"], abs=1e-6)
    assert y == pytest.approx(fit2d["centerY"], abs=1e-6)
    assert direct * 1e3 == pytest.approx(fit2d["directDist"], rel=1e-9)
    assert tilt == pytest.approx(fit2d["tilt"], abs=1e-9)


def test_geometry_lines_without_wavelength():
    from azfilter.poni import parse_poni

    geometry = parse_poni(PONI_TEXT.replace("Wavelength: 1e-10\n", ""), "t.poni")
    lines = geometry_lines(geometry)
    assert any("Wavelength: not set" in line for line in lines)
    assert any(line.startswith("Beam centre (Fit2D): x=40.000 y=32.000") for line in lines)


def test_atomic_text_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "a.dat"
    path.write_text("old\n")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_text(path, make_result(), make_meta(), "/d/a.cbf", 0, 1)
    assert path.read_text() == "old\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "a.dat"]


def test_count_nan_handling_in_nexus(tmp_path):
    path = tmp_path / "n.h5"
    writer = NexusWriter(path, make_meta())
    writer.write(make_result(empty=(0, 49)), "/d/a.cbf", 0)
    writer.close()
    with h5py.File(path, "r") as h5:
        intensity = h5["entry/data/I"][0]
        count = h5["entry/data/count"][0]
    assert math.isnan(intensity[0]) and math.isnan(intensity[49]) and count[0] == 0
