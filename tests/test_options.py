"""Options a pyFAI user expects (issue 11): wavelength/energy, dummy, monitor, duplicates."""

from __future__ import annotations

import dataclasses
import os

import fabio.edfimage
import h5py
import numpy as np
import pytest
from test_cli import PONI, integrator, invoke, make_frame, write_cbf, write_stack

import azfilter as az
from azfilter.output import read_result


@pytest.fixture()
def data(tmp_path):
    from types import SimpleNamespace

    (tmp_path / "geo.poni").write_text(PONI)
    return SimpleNamespace(root=tmp_path, poni=tmp_path / "geo.poni")


def _run(*args):
    return invoke(*map(str, args))


def test_wavelength_and_energy_override_the_poni(data, tmp_path):
    frame = write_cbf(tmp_path / "one.cbf", make_frame(3))
    out = {}
    for name, option in (("w", ["--wavelength", 0.8]), ("e", ["--energy", 15.498024804])):
        result = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 50,
                      *option, frame, "-o", tmp_path / f"{name}.h5")
        assert result.exit_code == 0, result.output
        out[name] = read_result(tmp_path / f"{name}.h5")
    geometry = dataclasses.replace(az.load_poni(data.poni), wavelength=0.8e-10)
    expected = az.Integrator(geometry, npt=50, backend="python").integrate(make_frame(3))
    np.testing.assert_allclose(out["w"].radial, expected.radial, rtol=1e-12)
    np.testing.assert_allclose(out["w"].intensity[0], expected.intensity, rtol=1e-6)
    np.testing.assert_allclose(out["e"].radial, out["w"].radial, rtol=1e-8)   # 15.498 keV
    plain = integrator(data, npt=50).integrate(make_frame(3))
    assert not np.allclose(plain.radial, expected.radial)      # the PONI's 1 Å differs
    assert out["w"].config["wavelength"] == 0.8
    both = _run("integrate", "-p", data.poni, "--wavelength", 1, "--energy", 12, frame,
                "-o", tmp_path / "x.h5")
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_user_dummy_masks_pixels(data, tmp_path):
    raw = make_frame(4)
    raw[10:20, :] = 7777
    frame = write_cbf(tmp_path / "d.cbf", raw)
    result = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 50,
                  "--dummy", 7777, "--delta-dummy", 0.5, frame, "-o", tmp_path / "d.h5")
    assert result.exit_code == 0, result.output
    mask = np.zeros(raw.shape, bool)
    mask[10:20, :] = True
    expected = integrator(data, npt=50, mask=mask).integrate(raw)
    np.testing.assert_allclose(read_result(tmp_path / "d.h5").intensity[0],
                               expected.intensity, rtol=1e-6)


def test_monitor_from_headers_and_datasets(data, tmp_path):
    frames = [make_frame(k) for k in range(3)]
    monitors = [2.0, 4.0, 0.5]
    edfs = []
    for k, (frame, monitor) in enumerate(zip(frames, monitors, strict=True)):
        edfs.append(tmp_path / f"m_{k}.edf")
        fabio.edfimage.EdfImage(data=frame.astype(np.float32),
                                header={"I0": str(monitor)}).write(os.fspath(edfs[-1]))
    reference = integrator(data, npt=40)
    result = _run("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 40,
                  "--monitor", "I0", *edfs, "-o", tmp_path / "hdr.h5")
    assert result.exit_code == 0, result.output
    table = read_result(tmp_path / "hdr.h5")
    for row, (frame, monitor) in enumerate(zip(frames, monitors, strict=True)):
        expected = reference.sigma_clip(frame)
        np.testing.assert_allclose(table.intensity[row], expected.intensity / monitor,
                                   rtol=1e-6)
        np.testing.assert_allclose(table.sigma[row], expected.sigma / monitor, rtol=1e-6)
    assert table.config["monitor"] == "I0"
    # a dataset of one value per frame in the stack itself
    stack = write_stack(tmp_path / "stack.h5", frames)
    with h5py.File(stack, "a") as h5:
        h5["entry/instrument/i0/data"] = np.array([2.0, 0.0, 0.5])
    result = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 40,
                  "--monitor", "/entry/instrument/i0/data", stack, "-o", tmp_path / "ds.h5")
    assert result.exit_code == 3                      # frame 1's monitor is 0: named
    assert "frame 1: monitor '/entry/instrument/i0/data' is 0.0" in result.stderr
    table = read_result(tmp_path / "ds.h5")
    assert table.frame_indices == [0, 2]
    np.testing.assert_allclose(table.intensity[1],
                               reference.integrate(frames[2]).intensity / 0.5, rtol=1e-6)
    missing = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 40,
                   "--monitor", "Flux", edfs[0], "-o", tmp_path / "no.h5")
    assert missing.exit_code == 3 and "monitor 'Flux' is not in the header" in missing.stderr


def test_duplicate_inputs_are_reduced_once_with_a_note(data, tmp_path):
    frame = write_cbf(tmp_path / "one.cbf", make_frame(1))
    links = []
    for k in range(5):
        links.append(tmp_path / f"link_{k}.cbf")
        links[-1].symlink_to(frame)
    result = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 30, frame,
                  *links, "-o", tmp_path / "dup.h5")
    assert result.exit_code == 0, result.output
    assert "5 input(s) name a file already in the job" in result.stderr
    assert len(read_result(tmp_path / "dup.h5").sources) == 1


def test_sectors_text_one_file_per_sector(data, tmp_path):
    frames = [write_cbf(tmp_path / f"s_{k}.cbf", make_frame(k)) for k in range(2)]
    out = tmp_path / "sec"
    result = _run("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 30,
                  "--sectors", 4, *frames, "-o", f"{out}/")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"s_{k}_sector{j}.dat" for k in range(2) for j in range(4)]
    reference = az.Integrator(az.load_poni(data.poni), npt=30, backend="python", sectors=4)
    expected = reference.sigma_clip(make_frame(1))
    for j in range(4):
        values = np.loadtxt(out / f"s_1_sector{j}.dat")
        np.testing.assert_allclose(values[:, 1], expected.intensity[j], rtol=1e-6)
        header = (out / f"s_1_sector{j}.dat").read_text()
        assert f"# sector: {j}" in header and "# sector_range:" in header
    # --skip-existing: a frame is complete when all its sector files are
    (out / "s_0_sector2.dat").unlink()
    again = _run("sigma-clip", "-p", data.poni, "--backend", "python", "--npt", 30,
                 "--sectors", 4, *frames, "-o", f"{out}/", "--skip-existing")
    assert again.exit_code == 0 and "1 frame reduced, 1 skipped" in again.stderr
    assert (out / "s_0_sector2.dat").exists()
    # explicit ranges
    explicit = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 30,
                    "--sector", -30, 30, "--sector", 150, -150, frames[0],
                    "-o", tmp_path / "one.dat")
    assert explicit.exit_code == 0, explicit.output
    assert (tmp_path / "one_sector0.dat").exists() and (tmp_path / "one_sector1.dat").exists()
    both = _run("integrate", "-p", data.poni, "--sectors", 2, "--sector", 0, 10, frames[0],
                "-o", tmp_path / "x.dat")
    assert both.exit_code == 2 and "exclude each other" in both.stderr


def test_sectors_into_one_hdf5_file_and_rerun(data, tmp_path):
    stack = write_stack(tmp_path / "stack.h5", [make_frame(k) for k in range(3)])
    out = tmp_path / "sec.h5"
    result = _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 30,
                  "--sectors", 6, stack, "-o", out)
    assert result.exit_code == 0, result.output
    table = read_result(out)
    assert table.intensity.shape == (3, 6, 30)
    reference = az.Integrator(az.load_poni(data.poni), npt=30, backend="python", sectors=6)
    expected = reference.integrate(make_frame(2))
    np.testing.assert_allclose(table.intensity[2], expected.intensity, rtol=1e-6)
    with h5py.File(out) as h5:
        assert h5["entry/data"].attrs["axes"][1] in ("chi", b"chi")
        assert h5["entry/data/chi"].shape == (6,)
    again = _run("run", out, "-o", tmp_path / "again.h5")
    assert again.exit_code == 0, again.output
    np.testing.assert_array_equal(read_result(tmp_path / "again.h5").intensity, table.intensity)


def test_plot_a_sector_file(data, tmp_path):
    pytest.importorskip("matplotlib")
    frame = write_cbf(tmp_path / "p.cbf", make_frame(2))
    _run("integrate", "-p", data.poni, "--backend", "python", "--npt", 30, "--sectors", 3,
         frame, "-o", tmp_path / "p.h5")
    result = _run("plot", tmp_path / "p.h5", "-o", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert "3 pattern(s)" in result.stderr and (tmp_path / "p.png").stat().st_size > 1000
