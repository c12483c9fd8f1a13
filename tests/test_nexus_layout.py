"""The NeXus output conforms to NXazint1d; silx and pyFAI read it; older files still read.

The application definition is checked field by field against the NeXus definitions' own
``NXazint1d.nxdl.xml`` (stored under ``tests/data``, from nexusformat/definitions v2026.01):
every group, field and attribute not marked optional must be present, with the right type,
rank, enumerated value and units.
"""

from __future__ import annotations

import datetime
import errno
import gc
import os
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_output import PONI_TEXT, make_meta, make_result

from azfilter.commands.info import describe_result
from azfilter.errors import AzfilterError
from azfilter.manifest import Manifest
from azfilter.output import (
    NexusWriter,
    OutputWriteError,
    check_nexus,
    read_nexus_config,
    read_result,
    read_stored_config,
    stored_frames,
)
from azfilter.output.nexus import GuardedFile

DATA = Path(__file__).parent / "data"
NXDL = DATA / "NXazint1d.nxdl.xml"
NS = {"nx": "http://definition.nexusformat.org/nxdl/3.1"}

# NeXus unit categories of the definition -> units a NeXus reader accepts for them.
UNIT_CATEGORIES = {
    "NX_PER_LENGTH": {"1/nm", "1/angstrom", "1/m"},
    "NX_WAVENUMBER": {"1/nm", "1/angstrom", "1/m"},
    "NX_ANGLE": {"degree", "rad"},
}


def _text(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return value


def write_file(path: Path, unit: str = "q_nm^-1", frames: int = 3, manifest=None) -> Path:
    meta = make_meta(unit=unit)
    meta.manifest = manifest
    writer = NexusWriter(path, meta)
    for k in range(frames):
        writer.write(make_result(seed=k, unit=unit), "/data/scan.h5::/entry/data/data", k)
    assert writer.close()
    return path


# ---------------------------------------------------------------------------- NXazint1d


def _children(node, tag):
    return node.findall(f"nx:{tag}", NS)


def _required(node) -> bool:
    return node.get("optional", "false") != "true" and node.get("minOccurs", "1") != "0"


def _find_group(parent: h5py.Group, spec) -> h5py.Group | None:
    nx_class, name = spec.get("type"), spec.get("name")
    if name is not None:
        group = parent.get(name)
        ok = isinstance(group, h5py.Group) and _text(group.attrs.get("NX_class")) == nx_class
        return group if ok else None
    matches = [g for g in parent.values() if isinstance(g, h5py.Group)
               and _text(g.attrs.get("NX_class")) == nx_class]
    if nx_class == "NXdata" and "default" in parent.attrs:   # the default plot, when several
        matches = [g for g in matches if g.name.endswith("/" + _text(parent.attrs["default"]))]
    return matches[0] if matches else None


def _check_type(value, nx_type: str | None) -> bool:
    if nx_type in (None, "NX_CHAR"):
        return isinstance(_text(value), str) or (isinstance(value, np.ndarray)
                                                 and value.dtype.kind in "OSU")
    if nx_type == "NX_BOOLEAN":
        return np.asarray(value).dtype == np.bool_
    if nx_type == "NX_FLOAT":
        return np.asarray(value).dtype.kind == "f"
    if nx_type == "NX_NUMBER":
        return np.asarray(value).dtype.kind in "fiu"
    if nx_type == "NX_DATE_TIME":
        datetime.datetime.fromisoformat(_text(value))
        return True
    raise AssertionError(f"type {nx_type} not handled by this check")


def _enumeration(node) -> list[str]:
    return [item.get("value") for item in node.findall("nx:enumeration/nx:item", NS)]


def nxdl_check(h5: h5py.File, rows: list | None = None) -> list[str]:
    """Problems of the file's NXentry against NXazint1d (empty: conforms). ``rows`` receives
    (path, required, present, value/units) of every item of the definition."""
    tree = ET.parse(NXDL).getroot()
    problems: list[str] = []
    rows = [] if rows is None else rows
    symbols: dict[str, int] = {}

    def check_attributes(spec, obj, where):
        for attr in _children(spec, "attribute"):
            name, required = attr.get("name"), _required(attr)
            present = name in obj.attrs
            value = obj.attrs.get(name)
            shown = [_text(v) for v in value] if isinstance(value, np.ndarray) and value.ndim \
                else _text(value)
            rows.append((f"{where}@{name}", required, present, shown))
            if not present:
                if required:
                    problems.append(f"{where}@{name} missing")
                continue
            allowed = _enumeration(attr)
            if name == "units" and any(a in UNIT_CATEGORIES for a in allowed):
                allowed = sorted(set().union(*(UNIT_CATEGORIES.get(a, {a}) for a in allowed)))
            if allowed:
                if attr.find("nx:dimensions", NS) is not None:   # e.g. axes=['.', 'radial_axis']
                    ok = str([_text(v) for v in value]) in allowed
                else:
                    ok = _text(value) in allowed
                if not ok:
                    problems.append(f"{where}@{name}={shown!r} not in {allowed}")

    def check_group(spec, group, where):
        check_attributes(spec, group, where)
        for field in _children(spec, "field"):
            name, required = field.get("name"), _required(field)
            dset = group.get(name)
            present = isinstance(dset, h5py.Dataset)
            units = _text(dset.attrs.get("units")) if present else None
            value = (_text(dset[()]) if dset.ndim == 0 else f"shape {dset.shape}") \
                if present else None
            rows.append((f"{where}/{name}", required, present,
                         value if units is None else f"{value} {units}"))
            if not present:
                if required:
                    problems.append(f"{where}/{name} missing")
                continue
            if not _check_type(dset[()] if dset.ndim == 0 else dset[:1], field.get("type")):
                problems.append(f"{where}/{name}: not {field.get('type')} ({dset.dtype})")
            allowed = _enumeration(field)
            if allowed and _text(dset[()]) not in allowed:
                problems.append(f"{where}/{name}={_text(dset[()])!r} not in {allowed}")
            if field.get("units") and units != field.get("units"):
                problems.append(f"{where}/{name}: units {units!r}, not {field.get('units')}")
            dims = field.find("nx:dimensions", NS)
            if dims is not None:
                if dset.ndim != int(dims.get("rank")):
                    problems.append(f"{where}/{name}: rank {dset.ndim}, not {dims.get('rank')}")
                for dim in dims.findall("nx:dim", NS):
                    size = dset.shape[int(dim.get("index")) - 1]
                    if symbols.setdefault(dim.get("value"), size) != size:
                        problems.append(f"{where}/{name}: {dim.get('value')}={size}, not "
                                        f"{symbols[dim.get('value')]}")
            check_attributes(field, dset, f"{where}/{name}")
        for sub in _children(spec, "group"):
            required = _required(sub)
            found = _find_group(group, sub)
            label = f"{where}/{sub.get('name') or ''}:{sub.get('type')}"
            rows.append((label, required, found is not None,
                         found.name if found is not None else None))
            if found is None:
                if required:
                    problems.append(f"{label} missing")
                continue
            check_group(sub, found, found.name)

    entries = [g for g in h5.values() if _text(g.attrs.get("NX_class")) == "NXentry"]
    entry_spec = _children(tree, "group")[0]
    assert entry_spec.get("type") == "NXentry"
    if len(entries) != 1:
        return [f"{len(entries)} NXentry groups"]
    check_group(entry_spec, entries[0], entries[0].name)
    return problems


@pytest.mark.parametrize("unit", ["q_nm^-1", "q_A^-1", "2th_deg", "2th_rad"])
def test_output_conforms_to_nxazint1d(tmp_path, unit):
    path = write_file(tmp_path / "out.h5", unit=unit)
    rows: list = []
    with h5py.File(path, "r") as h5:
        problems = nxdl_check(h5, rows)
        # the checker saw every required item of the definition (not a vacuous pass)
        required = {r[0] for r in rows if r[1]}
        assert {"/entry/definition", "/entry/data/I", "/entry/data/radial_axis",
                "/entry/instrument/monochromator/wavelength", "/entry/reduction/reference",
                "/entry/data@signal", "/entry/data/I@units"} <= required
        assert len(required) == 29      # required groups, fields and attributes in v2026.01
        assert _text(h5["entry/definition"][()]) == "NXazint1d"
        mono = h5["entry/instrument/monochromator"]
        assert mono["wavelength"][()] == pytest.approx(1.0)            # 1e-10 m in the PONI
        assert mono["energy"][()] == pytest.approx(12.39842, rel=1e-6)
        assert h5["entry/data/I"].shape == (3, 50)
    assert problems == []


def test_nxdl_check_finds_what_is_missing(tmp_path):
    """The checker fails a file that lacks required items or has wrong values."""
    path = write_file(tmp_path / "out.h5")
    with h5py.File(path, "r+") as h5:
        del h5["entry/instrument/monochromator/wavelength"]
        del h5["entry/reduction/reference"]
        h5["entry/data/radial_axis"].attrs["units"] = "nm^-1"
        h5["entry/data"].attrs["signal"] = "intensity"
        del h5["entry/solid_angle_applied"]
        h5["entry/solid_angle_applied"] = 1
    with h5py.File(path, "r") as h5:
        problems = nxdl_check(h5)
    text = "\n".join(problems)
    assert "monochromator/wavelength missing" in text
    assert "reduction/reference missing" in text
    assert "radial_axis@units='nm^-1'" in text
    assert "@signal='intensity'" in text
    assert "solid_angle_applied: not NX_BOOLEAN" in text


def test_units_are_pint_readable(tmp_path):
    """``A^-1`` reads as 1/ampere in pint; the file says ``1/angstrom``."""
    pint = pytest.importorskip("pint")
    registry = pint.UnitRegistry()
    expected = {"q_nm^-1": (1.0, "1/nanometer"), "q_A^-1": (1.0, "1/angstrom"),
                "2th_deg": (1.0, "degree"), "2th_rad": (1.0, "radian"), "r_mm": (1.0, "mm")}
    for unit, (value, reference) in expected.items():
        path = write_file(tmp_path / f"{unit.replace('^', '')}.h5", unit=unit, frames=1)
        with h5py.File(path, "r") as h5:
            units = _text(h5["entry/data/radial_axis"].attrs["units"])
        quantity = registry.Quantity(value, units)
        assert quantity.to(reference).magnitude == pytest.approx(value)
    assert not registry.Quantity(1, "A^-1").check("1/[length]")   # why the old unit was wrong


def test_keeps_azfilter_additions(tmp_path):
    path = write_file(tmp_path / "out.h5")
    result = make_result(seed=1)
    with h5py.File(path, "r") as h5:
        data = h5["entry/data"]
        for name in ("std", "count", "sum_signal", "sum_variance", "sum_normalization",
                     "sum_normalization2"):
            assert data[name].shape == (3, 50)
        np.testing.assert_array_equal(data["sum_normalization2"][1], result.sum_normalization2)
        np.testing.assert_allclose(data["std"][1], result.std, rtol=1e-6)
        assert [_text(s) for s in data["source"][()]] == ["/data/scan.h5::/entry/data/data"] * 3
        assert list(data["frame_index"][()]) == [0, 1, 2]
        process = h5["entry/reduction"]
        assert "Distance: 0.1" in _text(process["poni/data"][()])
        assert "Distance: 0.1" in _text(process["input/poni"][()])
        assert process["input/thres"][()] == 5.0
        assert _text(process["input/mask"][()]) == "none"
    assert read_nexus_config(path)["thres"] == 5.0


def test_silx_finds_and_plots_the_default_signal(tmp_path):
    nxdata = pytest.importorskip("silx.io.nxdata")
    path = write_file(tmp_path / "out.h5", unit="2th_deg")
    with h5py.File(path, "r") as h5:
        default = nxdata.get_default(h5)
        assert default is not None and default.is_valid
        assert default.signal.name == "/entry/data/I"
        assert default.signal_name == "intensity"        # silx shows the long_name
        assert default.signal.shape == (3, 50)
        assert default.interpretation == "spectrum" and default.is_curve
        assert default.axes_dataset_names == [None, "radial_axis"]
        np.testing.assert_array_equal(default.axes[1][()], make_result().radial)
        assert default.errors is not None and default.errors.name.endswith("/I_errors")
        np.testing.assert_allclose(default.errors[2], make_result(seed=2).sigma, rtol=1e-6)


def test_read_with_pyfai_or_the_definition_names(tmp_path):
    """pyFAI 2026.9's ``load_nexus`` reads NXmonopd and NXcanSAS only (it raises for
    NXazint1d); its ``Nexus`` class finds the entry and default NXdata, and the data is read
    with the definition's field names. Should pyFAI learn NXazint1d, its result is compared."""
    nexus = pytest.importorskip("pyFAI.io.nexus")
    path = write_file(tmp_path / "out.h5", unit="q_A^-1")
    with nexus.Nexus(str(path), mode="r") as nxs:
        entries = nxs.get_entries()
        assert len(entries) == 1
        assert _text(entries[0]["definition"][()]) == "NXazint1d"
        data = nxs.get_default_NXdata()
        signal = _text(data.attrs["signal"])
        axis = [_text(a) for a in data.attrs["axes"]][-1]
        intensity, errors, radial = data[signal][()], data[f"{signal}_errors"][()], data[axis][()]
        assert _text(data[axis].attrs["long_name"]) == "q"
        assert _text(data[axis].attrs["units"]) == "1/angstrom"
        wavelength = entries[0]["instrument/monochromator/wavelength"][()]
    np.testing.assert_allclose(intensity[1], make_result(seed=1).intensity, rtol=1e-6)
    np.testing.assert_allclose(errors[1], make_result(seed=1).sigma, rtol=1e-6)
    np.testing.assert_array_equal(radial, make_result().radial)
    assert wavelength == pytest.approx(1.0)
    try:
        result = nexus.load_nexus(str(path))
    except (RuntimeError, KeyError) as err:
        # pyFAI 2026.9: no NXazint1d reader (it looks for its own NXprocess "pyFAI" first)
        assert "NXazint1d" in str(err) or "pyFAI" in str(err)
    else:
        np.testing.assert_allclose(result.intensity, intensity[0], rtol=1e-6)


def test_no_wavelength_is_nan_not_missing(tmp_path):
    meta = make_meta(unit="2th_deg")
    meta.poni_text = PONI_TEXT.replace("Wavelength: 1e-10\n", "")
    writer = NexusWriter(tmp_path / "w.h5", meta)
    writer.write(make_result(unit="2th_deg"), "/d/a.cbf", 0)
    writer.close()
    with h5py.File(tmp_path / "w.h5", "r") as h5:
        assert np.isnan(h5["entry/instrument/monochromator/wavelength"][()])
        assert _text(h5["entry/instrument/monochromator/wavelength"].attrs["units"]) == \
            "angstrom"
    meta.wavelength = 0.5e-10
    writer = NexusWriter(tmp_path / "w2.h5", meta)
    writer.write(make_result(unit="2th_deg"), "/d/a.cbf", 0)
    writer.close()
    with h5py.File(tmp_path / "w2.h5", "r") as h5:
        assert h5["entry/instrument/monochromator/wavelength"][()] == pytest.approx(0.5)


# ---------------------------------------------------------------------------- older files


def test_legacy_layout_is_still_read(tmp_path):
    """Files written before NXazint1d (``intensity``, axis ``q``) read, rerun and refuse to
    be extended with a message."""
    legacy = tmp_path / "legacy.h5"
    shutil.copyfile(DATA / "legacy_shard0of2.h5", legacy)
    table = read_result(legacy)
    assert table.layout == "legacy" and table.unit == "q_nm^-1"
    assert table.intensity.shape == (2, 20)
    assert table.sources == ["/x/a.cbf", "/x/b.h5::/entry/data/data"]
    assert np.isfinite(table.sigma).all()
    assert read_stored_config(legacy)["thres"] == 5.0        # `azfilter run legacy.h5`
    assert stored_frames(legacy) == {("/x/a.cbf", 0), ("/x/b.h5::/entry/data/data", 0)}
    assert check_nexus(legacy) == "legacy"
    text = "\n".join(describe_result(str(legacy)))
    assert "frames: 2" in text and "layout: azfilter's layout before NXazint1d" in text
    assert "job manifest: not recorded" in text
    meta = make_meta({"npt": 20})
    with pytest.raises(AzfilterError, match="older azfilter.*--overwrite"):
        NexusWriter(legacy, meta, mode="append")


# ---------------------------------------------------------------------------- records


def test_manifest_failures_and_completeness_in_the_file(tmp_path):
    entries = [("/d/a.cbf", 0), ("/d/s.h5", 0), ("/d/s.h5", 1), ("/d/bad.cbf", -1)]
    manifest = Manifest.of(entries, shards=1)
    meta = make_meta()
    meta.manifest = manifest
    writer = NexusWriter(tmp_path / "out.h5", meta)
    writer.write(make_result(), "/d/a.cbf", 0)
    writer.write(make_result(seed=1), "/d/s.h5", 0)
    writer.record_failure("/d/s.h5", 1, "reduction failed:\n  ValueError: boom")
    writer.record_failure("/d/bad.cbf", None, "not a CBF file")
    assert writer.close()
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        job = h5["entry/azfilter"]
        assert _text(job["manifest"].attrs["digest"]) == manifest.digest
        assert int(job["manifest"].attrs["shards"]) == 1
        assert [_text(s) for s in job["manifest/source"][()]] == [s for s, _ in entries]
        assert list(job["manifest/frame_index"][()]) == [i for _, i in entries]
        assert list(job["failed/frame_index"][()]) == [1, -1]
        assert _text(job["failed/reason"][0]) == "reduction failed: ValueError: boom"
        assert bool(job.attrs["complete"])
    table = read_result(tmp_path / "out.h5")
    assert table.complete is True and table.manifest_entries == 4
    assert table.failed[1] == ("/d/bad.cbf", -1, "not a CBF file")
    # a frame neither written nor failed: the file says it is incomplete
    writer = NexusWriter(tmp_path / "gap.h5", meta)
    writer.write(make_result(), "/d/a.cbf", 0)
    writer.record_failure("/d/bad.cbf", -1, "not a CBF file")
    writer.close()
    table = read_result(tmp_path / "gap.h5")
    assert table.complete is False
    assert table.missing == [("/d/s.h5", 0), ("/d/s.h5", 1)]


def test_shard_completeness_covers_its_own_range(tmp_path):
    manifest = Manifest.of([(f"/d/{k}.cbf", 0) for k in range(6)], shards=3)
    meta = make_meta(shard="1/3")
    meta.manifest = manifest
    writer = NexusWriter(tmp_path / "s1.h5", meta)
    for source, index in manifest.shard_entries(1):
        writer.write(make_result(), source, index)
    writer.close()
    assert read_result(tmp_path / "s1.h5").complete is True


def test_all_frames_failed_still_writes_the_record(tmp_path):
    """A shard whose frames all failed leaves its file (started with the bins), listing them."""
    meta = make_meta(shard="0/2")
    meta.manifest = Manifest.of([("/d/a.cbf", 0), ("/d/b.cbf", 0)], shards=2)
    writer = NexusWriter(tmp_path / "s0.h5", meta)
    writer.start(make_result().radial)
    writer.record_failure("/d/a.cbf", 0, "corrupt")
    assert writer.close()
    table = read_result(tmp_path / "s0.h5")
    assert table.intensity.shape == (0, 50) and table.failed == [("/d/a.cbf", 0, "corrupt")]
    assert table.complete is True


def test_append_retries_failures_and_keeps_rows(tmp_path):
    meta = make_meta()
    meta.manifest = Manifest.of([("/d/a.cbf", 0), ("/d/b.cbf", 0)])
    path = tmp_path / "out.h5"
    writer = NexusWriter(path, meta)
    writer.write(make_result(), "/d/a.cbf", 0)
    writer.record_failure("/d/b.cbf", 0, "busy")
    writer.close()
    appender = NexusWriter(path, meta, mode="append")
    assert appender.existing == {("/d/a.cbf", 0)}
    appender.write(make_result(seed=3), "/d/b.cbf", 0)
    appender.close()
    table = read_result(path)
    assert table.sources == ["/d/a.cbf", "/d/b.cbf"] and table.failed == []
    assert table.complete is True


# ---------------------------------------------------------------------------- damaged files


def _damage(path: Path, where: str) -> None:
    """Overwrite bytes of the file: the B-tree of the rows' chunks, or the end of the file."""
    raw = bytearray(path.read_bytes())
    if where == "btree":
        at = raw.find(b"TREE", 100)
        assert at > 0
        raw[at:at + 4] = b"XXXX"
    else:
        raw = raw[: len(raw) * 2 // 3]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["btree", "truncated"])
def test_damaged_file_refused_for_append(tmp_path, where):
    path = write_file(tmp_path / "out.h5", frames=70)
    _damage(path, where)
    before = path.read_bytes()
    with pytest.raises(AzfilterError, match=r"out\.h5: damaged.*--overwrite") as info:
        NexusWriter(path, make_meta(), mode="append")
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]   # no temporary file


# ---------------------------------------------------------------------------- write errors


def test_guarded_file_keeps_the_first_error(tmp_path):
    path = tmp_path / "g.bin"
    path.write_bytes(b"")
    guard = GuardedFile(path)
    assert guard.write(b"abc") == 3

    def full(_data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    raw = guard._raw
    guard._raw = type("Full", (), {"write": staticmethod(full), "seek": raw.seek,
                                   "tell": raw.tell, "close": raw.close,
                                   "fileno": raw.fileno})()
    assert guard.write(b"defg") == 4          # reported done: HDF5 never sees a failure
    assert guard.error.errno == errno.ENOSPC
    assert guard.tell() == 7
    guard.close()
    err = OutputWriteError(tmp_path / "out.h5", guard.error)
    assert str(err) == f"{tmp_path / 'out.h5'}: cannot write: No space left on device (ENOSPC)"


def test_unwritable_folder_is_one_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into mode-0500 folders; test_read_only_file_system covers root")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        writer = NexusWriter(folder / "out.h5", make_meta())
        with pytest.raises(OutputWriteError, match=r"out\.h5: cannot write: Permission denied"):
            writer.write(make_result(), "/d/a.cbf", 0)
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (a full disk within a few dozen rows); needs root (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the suite as root)")
    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill_from_a_thread(writer: NexusWriter, npt: int) -> BaseException | None:
    """Write rows from another thread (as the pipeline's writer thread does) until it fails."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for k in range(10_000):
                writer.write(make_result(npt=npt, seed=k % 7, empty=()), "/d/s.h5", k)
            writer.close()
        except BaseException as err:  # noqa: BLE001 - the test inspects it
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    return errors[0] if errors else None


def test_full_disk_is_one_error_and_leaves_nothing(small_disk):
    path = small_disk / "out.h5"
    meta = make_meta({"npt": 2000})
    error = _fill_from_a_thread(NexusWriter(path, meta), npt=2000)
    assert isinstance(error, OutputWriteError) and isinstance(error, AzfilterError)
    assert str(error) == f"{path}: cannot write: No space left on device (ENOSPC)"
    assert error.errno == errno.ENOSPC
    gc.collect()                             # no handle left whose clean-up would crash
    assert list(small_disk.iterdir()) == []  # no temporary file keeps the disk full
    # the same when the disk fills while closing (manifest records of a big job)
    meta.manifest = Manifest.of([(f"/d/{'x' * 200}{k}.cbf", 0) for k in range(20_000)])
    writer = NexusWriter(path, meta)
    writer.write(make_result(npt=2000), "/d/x.cbf", 0)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        writer.close()
    assert list(small_disk.iterdir()) == []


def test_full_disk_while_copying_for_append(small_disk, tmp_path):
    path = small_disk / "out.h5"
    writer = NexusWriter(path, make_meta({"npt": 50}))
    for k in range(3):
        writer.write(make_result(npt=50, seed=k), "/d/s.h5", k)
    writer.close()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, free - path.stat().st_size // 2))   # the copy cannot fit
    before = path.read_bytes()
    appender = NexusWriter(path, make_meta({"npt": 50}), mode="append")
    with pytest.raises(OutputWriteError, match=r"out\.h5: cannot write: No space left"):
        appender.write(make_result(npt=50), "/d/s.h5", 99)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "out.h5"]
    assert path.read_bytes() == before


def test_read_only_file_system_is_one_error(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root (CI runs the suite as root)")
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        writer = NexusWriter(folder / "out.h5", make_meta())
        with pytest.raises(OutputWriteError,
                           match=r"out\.h5: cannot write: Read-only file system \(EROFS\)"):
            writer.write(make_result(), "/d/a.cbf", 0)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_cli_full_disk_exit_3_one_line(small_disk, tmp_path):
    """``azfilter integrate ... -o full/out.h5`` on a full disk: exit 3, one stderr line, no
    traceback, no segmentation fault, nothing left in the folder."""
    poni = tmp_path / "geo.poni"
    poni.write_text(PONI_TEXT)
    rng = np.random.default_rng(0)
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as h5:
        h5["entry/data/data"] = rng.poisson(100, (40, 64, 80)).astype(np.int32)
    proc = subprocess.run(
        [sys.executable, "-m", "azfilter", "integrate", "-p", poni, "--npt", "2000", "-q",
         "--threads", "1", f"{stack}::/entry/data/data", "-o", small_disk / "out.h5"],
        capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(small_disk / "out.h5") in lines[0] and "No space left on device" in lines[0]
    # nothing that takes space: no output, no temporary file (the run's empty lock file may stay)
    left = [p for p in small_disk.iterdir() if p.name != ".out.h5.lock"]
    assert left == [] and all(p.stat().st_size == 0 for p in small_disk.iterdir())


def test_cli_skip_existing_on_a_damaged_output(tmp_path):
    """``--skip-existing`` over a damaged ``.h5``: one line naming it ("damaged ... use
    --overwrite"), exit 2, no temporary file, the file untouched; never taken as complete
    (here: no new inputs at all)."""
    poni = tmp_path / "geo.poni"
    poni.write_text(PONI_TEXT)
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as h5:
        h5["entry/data/data"] = np.random.default_rng(0).poisson(100, (3, 64, 80)).astype(
            np.int32)
    out = tmp_path / "out" / "run.h5"
    command = [sys.executable, "-m", "azfilter", "integrate", "-p", poni, "--npt", "100", "-q",
               f"{stack}::/entry/data/data", "-o", out]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert read_result(out).layout == "nxazint1d"
    again = subprocess.run([*command, "--skip-existing"], capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr         # intact: nothing to add
    raw = bytearray(out.read_bytes())
    at = raw.find(b"TREE", 100)
    raw[at:at + 4] = b"XXXX"
    out.write_bytes(bytes(raw))
    proc = subprocess.run([*command, "--skip-existing"], capture_output=True, text=True,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert str(out) in lines[0] and "damaged" in lines[0] and "--overwrite" in lines[0]
    assert out.read_bytes() == bytes(raw)
    assert not list(out.parent.glob("*.tmp")) and not list(out.parent.glob(".*.tmp"))


def test_sinks_record_failures(tmp_path):
    """What the pipeline calls for a failed frame: ``Sink.fail(planned, reason)`` or
    ``record_failure(source, index, reason)``; text sinks keep a list, NeXus sinks the file."""
    from types import SimpleNamespace

    from azfilter.errors import FrameReadError
    from azfilter.output import NexusSink, TextSink

    planned = SimpleNamespace(source="/d/b.cbf", index=0, nframes=1, out_path=None)
    text = TextSink(make_meta())
    text.fail(planned, "bad\nheader")
    text.record_failure("/d/c.h5", None, "truncated")
    assert text.failures == [("/d/b.cbf", 0, "bad header"), ("/d/c.h5", -1, "truncated")]
    writer = NexusWriter(tmp_path / "out.h5", make_meta())
    sink = NexusSink(writer)
    sink.write(SimpleNamespace(source="/d/a.cbf", index=0), "/d/a.cbf", make_result())
    sink.fail(planned, "bad header")
    error = FrameReadError("/d/s.h5", 3, "reduction failed: boom")
    sink.record_failure(error.source, error.index, str(error))
    sink.close()
    assert read_result(tmp_path / "out.h5").failed == [
        ("/d/b.cbf", 0, "bad header"), ("/d/s.h5", 3, "reduction failed: boom")]


def test_wavelength_and_monitor_options(tmp_path):
    """--wavelength/--energy/--monitor parameters: the wavelength used is the one recorded
    (angstrom); monitor_applied follows --monitor."""
    meta = make_meta()
    meta.parameters.update(wavelength=0.7e-10, energy=None, monitor="i0", dummy=None,
                           delta_dummy=None)
    meta.wavelength = 0.7e-10
    writer = NexusWriter(tmp_path / "out.h5", meta)
    writer.write(make_result(), "/d/a.cbf", 0)
    writer.close()
    with h5py.File(tmp_path / "out.h5", "r") as h5:
        assert h5["entry/reduction/input/wavelength"][()] == pytest.approx(0.7)
        assert h5["entry/instrument/monochromator/wavelength"][()] == pytest.approx(0.7)
        assert _text(h5["entry/reduction/input/monitor"][()]) == "i0"
        assert bool(h5["entry/monitor_applied"][()]) is True
        assert nxdl_check(h5) == []


def test_cli_text_outputs_on_a_full_disk_exit_3_one_line(small_disk, tmp_path):
    """One text file per frame onto a full disk (their fsyncs and renames run in the
    background): exit 3, one stderr line naming a file, no traceback, no temporary left."""
    poni = tmp_path / "geo.poni"
    poni.write_text(PONI_TEXT)
    rng = np.random.default_rng(0)
    stack = tmp_path / "stack.h5"
    with h5py.File(stack, "w") as h5:
        h5["entry/data/data"] = rng.poisson(100, (60, 64, 80)).astype(np.int32)
    out = small_disk / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "azfilter", "integrate", "-p", poni, "--npt", "2000", "-q",
         "--threads", "1", f"{stack}::/entry/data/data", "-o", f"{out}/"],
        capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 3, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(out) in lines[0] and "No space left on device" in lines[0]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for path in out.iterdir():               # what is there is complete
        assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) > 2000
