"""Several OpenCL devices: ``--device 0:0,0:1`` / ``all`` and the MultiDeviceEngine.

On PoCL the one CPU device named twice stands in for two GPUs (two engines, two worker
threads, each with its own queues and device buffers): frames are spread over both, results
come back in input order and bit-identical to one device, a bad frame fails alone, a device
that breaks mid-run (a real OpenCL error) gives its frames to the other, a device that cannot
start is left out with one warning. The syntax, the job-config key and the command line are
tested without OpenCL where they can be.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from opencl_device import opencl_test_device
from synthetic import synthetic_case, table

from azfilter import cli
from azfilter import config as cfg
from azfilter.backends import opencl
from azfilter.backends.opencl import devices as devices_module
from azfilter.binning import build_csr
from azfilter.errors import AzfilterError
from azfilter.integrator import Integrator
from azfilter.poni import load_poni
from azfilter.preproc import pixel_constants
from azfilter.vocabulary import names_several_devices, parse_device_spec

FIELDS = ("signal", "variance", "normalization", "normalization2", "count")
DUMMY, DELTA_DUMMY = -2.0, 1.5
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_opencl() -> str:
    """The id of the OpenCL device to name twice (skip, or fail in CI, without one)."""
    # an id (P:D), also where $AZFILTER_OPENCL_DEVICE says "gpu": messages name devices by id
    return opencl_test_device()


def assert_same(expected, got) -> None:
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


# ============================================================================ syntax, config
@pytest.mark.parametrize("value, tokens", [
    (None, None), ("", None), ([], None), (" , ", None),
    ("gpu", ["gpu"]), (" GPU ", ["gpu"]), ("cpu", ["cpu"]), ("0:1", ["0:1"]),
    ("0:0,0:1", ["0:0", "0:1"]), ("0:0, 0:1 ,1:0", ["0:0", "0:1", "1:0"]),
    ("00:01", ["0:1"]), ("0:0,0:0", ["0:0", "0:0"]), ("all", ["all"]), ("ALL-GPUS", ["all-gpus"]),
    (["0:0", "0:1"], ["0:0", "0:1"]), (["0:0,0:1", "gpus"], ["0:0", "0:1", "gpus"]),
])
def test_device_spec_syntax(value, tokens):
    assert parse_device_spec(value) == tokens


@pytest.mark.parametrize("value", ["0", "0:", "a:b", "0:0:0", "gpu0", "0:0;0:1", 3, ["0:0", 1]])
def test_device_spec_refuses_what_names_no_device(value):
    with pytest.raises(ValueError, match="--device"):
        parse_device_spec(value)


def test_several_devices_are_a_list_or_all():
    assert not names_several_devices(None)
    assert not names_several_devices(["gpu"]) and not names_several_devices(["0:1"])
    assert names_several_devices(["0:0", "0:1"]) and names_several_devices(["0:0", "0:0"])
    assert all(names_several_devices([word]) for word in ("all", "gpus", "all-gpus"))


def test_config_device_is_a_list_and_old_configs_load(tmp_path):
    """Schema 3 stores a list; a schema-2 (or unversioned) config's one device string loads
    as a one-item list; the list survives a TOML and a JSON round trip."""
    assert cfg.normalize({"device": "0:0,0:1"}, "cli") == {"device": ["0:0", "0:1"]}
    assert cfg.normalize({"device": ["all"]}, "cli") == {"device": ["all"]}
    assert cfg.normalize({"device": None}, "cli") == {"device": None}
    assert cfg.from_raw({"schema": 2, "device": "gpu"}, "old.h5") == {"device": ["gpu"]}
    assert cfg.from_raw({"device": "0:1"}, "v1.toml") == {"device": ["0:1"]}
    assert cfg.from_raw({"schema": 2, "device": "0:0,0:1"}, "old.h5") == {
        "device": ["0:0", "0:1"]}
    with pytest.raises(AzfilterError, match=r"^job.toml: device: 'gpu0' is not a device"):
        cfg.from_raw({"schema": 3, "device": ["gpu0"]}, "job.toml")
    config = cfg.effective({"operation": "integrate", "poni": str(tmp_path / "g.poni"),
                            "device": ["0:0", "0:1"], "backend": "opencl"})
    for suffix in (".toml", ".json"):
        path = tmp_path / f"job{suffix}"
        cfg.save_config(cfg.job_config(config), path)
        assert cfg.load_config(path)["device"] == ["0:0", "0:1"]
    assert json.loads((tmp_path / "job.json").read_text())["schema"] == cfg.SCHEMA_VERSION == 3


def test_integrator_keeps_the_device_tokens(tmp_path):
    """The Integrator takes a string or a list, records "0:0,0:1", refuses a bad token."""
    poni = tmp_path / "geo.poni"
    poni.write_text(PONI)
    geometry = load_poni(poni)
    assert Integrator(geometry, backend="python", device=["0:0", "0:1"]).device == "0:0,0:1"
    assert Integrator(geometry, backend="python", device="GPU").config()["device"] == "gpu"
    assert Integrator(geometry, backend="python").device is None
    with pytest.raises(AzfilterError, match="'first' is not a device"):
        Integrator(geometry, backend="python", device="first")


def fake_devices(kinds: list[str]) -> list[tuple[dict, object]]:
    return [({"id": f"0:{k}", "platform": 0, "device": k, "platform_name": "Fake",
              "name": f"Fake {kind} {k}", "type": kind, "fp64": True, "global_memory": 1 << 34,
              "compute_units": 8}, object()) for k, kind in enumerate(kinds)]


def test_all_names_every_gpu(monkeypatch):
    """``all`` gives every GPU in ``azfilter devices`` order; none is one line naming what
    there is; a missing device in a list is refused with the list of devices."""
    pytest.importorskip("pyopencl")
    found = fake_devices(["CPU", "GPU", "GPU", "GPU"])
    monkeypatch.setattr(devices_module, "_enumerate", lambda cl: found)
    ids = lambda spec: [info["id"] for info, _ in devices_module.select_devices(spec)]  # noqa: E731
    assert ids("all") == ids("gpus") == ids(["all-gpus"]) == ["0:1", "0:2", "0:3"]
    assert ids("0:3,0:1") == ["0:3", "0:1"]
    assert ids("gpu,cpu") == ["0:1", "0:0"]
    assert ids(None) == ["0:1"]
    with pytest.raises(AzfilterError, match=r"no OpenCL device 0:7; available: 0:0 \(CPU"):
        devices_module.select_devices("0:1,0:7")
    monkeypatch.setattr(devices_module, "_enumerate", lambda cl: found[:1])
    with pytest.raises(AzfilterError, match=r"^--device all: no OpenCL GPU found; available: "
                                            r"0:0 \(CPU Fake CPU 0\)$"):
        devices_module.select_devices("all")


# ============================================================================ the engine
@pytest.fixture(scope="module")
def case():
    """A Pilatus 300K frame series and its tables (no split, full split)."""
    source = synthetic_case(seed=5)
    constants = pixel_constants(source.geometry, polarization=0.99)
    tables = {split: build_csr(source.geometry, "q_nm^-1", 200, split, constants.static_mask,
                               cache=False) for split in ("no", "full")}
    frames = [(source.raw * (1 + k % 3) + k).astype(np.int32) for k in range(10)]
    for frame in frames:   # keep the gaps and dead pixels dummies
        frame[source.raw < 0] = source.raw[source.raw < 0]
    return SimpleNamespace(norm=constants.pixel_norm, tables=tables, frames=frames)


@pytest.fixture(scope="module")
def engines(case):
    """(one-device engine, the same device twice) per split, built once."""
    device = need_opencl()
    from azfilter.backends.opencl.multi import MultiDeviceEngine

    return {split: (opencl.OpenCLEngine(csr, case.norm, None, DUMMY, DELTA_DUMMY,
                                        device=device),
                    MultiDeviceEngine(csr, case.norm, None, DUMMY, DELTA_DUMMY,
                                      device=f"{device},{device}"))
            for split, csr in case.tables.items()}


OPERATIONS = {
    "integrate": ("no", {"error_model": "poisson"}),
    "sigma_clip": ("no", {"thres": 3.0, "max_iter": 5, "error_model": "azimuthal"}),
    "medfilt": ("full", {"quant_min": 0.2, "quant_max": 0.8, "error_model": "poisson"}),
}


@pytest.mark.opencl
@pytest.mark.parametrize("operation", list(OPERATIONS))
def test_spread_in_order_and_identical_to_one_device(engines, case, operation):
    """Every engine gets frames; tags come back in input order; sums are bit-identical."""
    split, params = OPERATIONS[operation]
    single, multi = engines[split]
    frames = case.frames if operation != "medfilt" else case.frames[:6]
    tags = [f"frame{k}" for k in range(len(frames))]
    before = list(multi.frame_counts)
    expected = [sums for _, sums in single.process_many(zip(tags, frames, strict=True), operation,
                                                        params)]
    got = list(multi.process_many(zip(tags, frames, strict=True), operation, params))
    assert [tag for tag, _ in got] == tags
    for want, (_, sums) in zip(expected, got, strict=True):
        assert_same(want, sums)
    spread = [after - start for after, start in zip(multi.frame_counts, before, strict=True)]
    assert sum(spread) == len(frames) and all(count > 0 for count in spread), spread
    assert not multi.retired
    # one frame at a time goes to a device still in the pool
    assert_same(expected[0], getattr(multi, operation)(frames[0], **params))


@pytest.mark.opencl
def test_a_bad_frame_fails_alone(engines, case):
    """A frame of the wrong size is that frame's error, in its place, on no retry."""
    single, multi = engines["no"]
    params = OPERATIONS["sigma_clip"][1]
    frames = list(case.frames[:6])
    frames[3] = frames[3][:-5]
    got = list(multi.process_many(enumerate(frames), "sigma_clip", params))
    assert [tag for tag, _ in got] == list(range(6))
    assert isinstance(got[3][1], AzfilterError) and "pixels" in str(got[3][1])
    for k in (0, 1, 2, 4, 5):
        assert_same(single.sigma_clip(frames[k], **params), got[k][1])
    assert not multi.retired


@pytest.fixture
def fresh_multi(case):
    """A MultiDeviceEngine of the device named twice, to break (not shared)."""
    device = need_opencl()
    from azfilter.backends.opencl.multi import MultiDeviceEngine

    engine = MultiDeviceEngine(case.tables["no"], case.norm, None, DUMMY, DELTA_DUMMY,
                               device=f"{device},{device}")
    for each in engine.engines:
        # compile the int32 kernels now: a work-group size changed later then makes their
        # launches fail, where a first compilation would adapt to it (see breaking())
        each.integrate(case.frames[0], "poisson")
    return engine


def breaking(frames, after: int, engine) -> object:
    """Yield ``frames``; after ``after`` of them, make ``engine``'s kernel launches fail with
    a real OpenCL error (a work-group larger than the device allows: INVALID_WORK_GROUP_SIZE)."""
    for k, frame in enumerate(frames):
        if k == after:
            engine.workgroup_size = 1 << 24
        yield k, frame


@pytest.mark.opencl
def test_a_device_failing_mid_run_hands_its_frames_to_the_other(engines, case, fresh_multi,
                                                                 caplog):
    """Frames that fail with an OpenCL error on device 1 are retried on device 0; the device
    is taken out (one warning naming it) and every result is still right, in order."""
    single = engines["no"][0]
    params = OPERATIONS["sigma_clip"][1]
    expected = [sums for _, sums in single.process_many(enumerate(case.frames), "sigma_clip",
                                                        params)]
    broken = fresh_multi.engines[1]
    with caplog.at_level(logging.WARNING, logger="azfilter"):
        got = list(fresh_multi.process_many(breaking(case.frames, 3, broken), "sigma_clip",
                                            params))
    assert [tag for tag, _ in got] == list(range(len(case.frames)))
    for want, (_, sums) in zip(expected, got, strict=True):
        assert not isinstance(sums, Exception), sums
        assert_same(want, sums)
    assert list(fresh_multi.retired) == [1]
    assert "INVALID_WORK_GROUP_SIZE" in str(fresh_multi.retired[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OpenCL device" in warnings[0] and "failed" in warnings[0]
    assert fresh_multi.devices[1]["id"] in warnings[0]
    # the next stream runs on the device left, with no new warning
    counts = list(fresh_multi.frame_counts)
    again = list(fresh_multi.process_many(enumerate(case.frames[:3]), "sigma_clip", params))
    for want, (_, sums) in zip(expected, again, strict=False):
        assert_same(want, sums)
    assert fresh_multi.frame_counts[1] == counts[1]
    assert fresh_multi.frame_counts[0] == counts[0] + 3


@pytest.mark.opencl
def test_every_device_failing_fails_the_frames_not_the_stream(case, fresh_multi):
    """OpenCL errors on both devices: each frame gets its error (after one retry), the
    stream ends, no device is retired (the frames may be at fault)."""
    params = OPERATIONS["integrate"][1]
    for engine in fresh_multi.engines:
        engine.workgroup_size = 1 << 24
    got = list(fresh_multi.process_many(enumerate(case.frames[:5]), "integrate", params))
    assert [tag for tag, _ in got] == list(range(5))
    assert all("INVALID_WORK_GROUP_SIZE" in str(error) for _, error in got)
    assert not fresh_multi.retired


@pytest.mark.opencl
def test_a_crashed_device_stream_is_retried_elsewhere(engines, case, fresh_multi, caplog):
    """A device whose stream raises (rather than yielding errors) loses its frames to the
    other device, which reduces them."""
    single = engines["no"][0]
    params = OPERATIONS["integrate"][1]
    broken = fresh_multi.engines[0]
    original = broken.process_many

    def crashing(frames, operation, params):
        stream = original(frames, operation, params)
        yield next(stream)
        raise RuntimeError("driver crashed")

    broken.process_many = crashing
    with caplog.at_level(logging.WARNING, logger="azfilter"):
        got = list(fresh_multi.process_many(enumerate(case.frames), "integrate", params))
    assert [tag for tag, _ in got] == list(range(len(case.frames)))
    for frame, (_, sums) in zip(case.frames, got, strict=True):
        assert_same(single.integrate(frame, **params), sums)
    assert list(fresh_multi.retired) == [0]
    assert any("driver crashed" in r.getMessage() for r in caplog.records)


@pytest.mark.opencl
def test_a_device_that_cannot_start_is_left_out(case, monkeypatch, caplog):
    """One warning line naming the device; the engine runs on the others; none starting is
    one error naming each device."""
    device = need_opencl()
    from azfilter.backends.opencl import multi

    started = []

    class FailingSecond(multi.OpenCLEngine):
        def __init__(self, *args, **kwargs):
            started.append(kwargs["device"])
            if len(started) == 2:
                raise AzfilterError("OpenCL device has not enough memory for this lookup table")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(multi, "OpenCLEngine", FailingSecond)
    with caplog.at_level(logging.WARNING, logger="azfilter"):
        engine = multi.MultiDeviceEngine(case.tables["no"], case.norm, None, DUMMY,
                                         DELTA_DUMMY, device=f"{device},{device},{device}")
    assert len(engine.engines) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"OpenCL device {device} (") and "not enough memory" in \
        warnings[0] and "continuing on 2 device(s)" in warnings[0]
    got = list(engine.process_many(enumerate(case.frames[:4]), "integrate",
                                   {"error_model": "poisson"}))
    assert all(not isinstance(sums, Exception) for _, sums in got)

    class NeverStarts(multi.OpenCLEngine):
        def __init__(self, *args, **kwargs):
            raise AzfilterError("no memory")

    monkeypatch.setattr(multi, "OpenCLEngine", NeverStarts)
    with pytest.raises(AzfilterError, match=rf"^no OpenCL device could start: {device} .*: "
                                            rf"no memory; {device} .*: no memory$"):
        multi.MultiDeviceEngine(case.tables["no"], case.norm, None, DUMMY, DELTA_DUMMY,
                                device=f"{device},{device}")


@pytest.mark.opencl
def test_memory_stays_bounded_and_an_abandoned_stream_stops(case):
    """A long stream of tiny frames: frames read ahead of those yielded never exceed the
    window (devices × frames each, plus the engines' look-ahead); breaking off the stream
    stops every worker thread."""
    device = need_opencl()
    from azfilter.backends.opencl.multi import MultiDeviceEngine

    tiny = table([[0, 1, 2], [3, 4], [5, 6, 7]])
    engine = MultiDeviceEngine(tiny, np.ones(8, np.float32), None, None, 0.0,
                               device=f"{device},{device}", in_flight=3)
    state = {"read": 0, "yielded": 0, "most": 0}

    def frames():
        for k in range(400):
            state["read"] += 1
            state["most"] = max(state["most"], state["read"] - state["yielded"])
            yield k, np.full(8, k, dtype=np.int32)

    for k, (tag, sums) in enumerate(engine.process_many(frames(), "integrate",
                                                        {"error_model": "poisson"})):
        assert tag == k and sums.signal[0] == 3 * k
        state["yielded"] += 1
    assert state["yielded"] == 400
    # window 6 (2 devices x 3), + what each engine stages ahead when it copies ordinary
    # frames into page-locked memory (discrete GPUs: its copy threads; PoCL: none), + 2 the
    # engine keeps, + 1 read
    staged = sum(e.copy_threads for e in engine.engines if e.staging)
    assert state["most"] <= 2 * 3 + staged + 2 + 1, state
    # (how the frames split between the devices depends on their speed: on a GPU the first
    # device is often free again before the next frame comes; spreading is tested above)
    assert sum(engine.frame_counts) == 400, engine.frame_counts

    stream = engine.process_many(frames(), "integrate", {"error_model": "poisson"})
    assert next(stream)[0] == 0
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("azfilter-device-")]


@pytest.mark.opencl
def test_device_rings_lend_from_the_least_busy_device():
    """DeviceRings: one bounded ring per device, lending alternately, giving back to the
    ring that lent, and None once every buffer is lent."""
    device = need_opencl()
    from azfilter.backends.opencl.hostmem import is_pinned
    from azfilter.backends.opencl.multi import DeviceRings

    rings = DeviceRings(2, [device, device])
    taken = [rings.take((4, 5), np.uint32) for _ in range(4)]
    assert all(buffer is not None and is_pinned(buffer) for buffer in taken)
    assert [ring.lent for ring in rings.rings] == [2, 2] and rings.lent == 4
    assert rings.take((4, 5), np.uint32) is None
    data = np.arange(20, dtype=np.uint32).reshape(4, 5)
    assert rings.fill(data) is data      # nothing free: the caller's array
    rings.give_back(taken[1])
    assert rings.lent == 3 and len(rings) == 4 and rings.capacity == 4
    filled = rings.fill(data)
    assert filled is taken[1] and np.array_equal(filled, data) and rings.is_lent(filled)


# ============================================================================ the command
PONI = """\
poni_version: 2.1
Detector: Detector
Detector_config: {"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [96, 120], "orientation": 3}
Distance: 0.05
Poni1: 0.0048
Poni2: 0.006
Rot1: 0.01
Rot2: -0.02
Rot3: 0.0
Wavelength: 1e-10
"""


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False,
                              prog_name="azfilter")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """geo.poni and a 12-frame HDF5 stack with one frame of NaN-free noise each."""
    root = tmp_path_factory.mktemp("multidevice")
    (root / "geo.poni").write_text(PONI)
    rng = np.random.default_rng(4)
    rows, cols = np.indices((96, 120))
    rings = 30 + 300 * np.exp(-0.5 * ((np.hypot(rows - 48.0, cols - 60.0) - 22) / 2.0) ** 2)
    frames = rng.poisson(rings, size=(12, 96, 120)).astype(np.int32)
    frames[:, ::17, ::13] += 40_000
    with h5py.File(root / "stack.h5", "w") as h5:
        h5.create_dataset("entry/data/data", data=frames, chunks=(1, 96, 120))
    return SimpleNamespace(poni=root / "geo.poni", h5=root / "stack.h5")


def reduced(path) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        found = []
        h5.visititems(lambda name, obj: found.append(name)
                      if isinstance(obj, h5py.Dataset) and name.endswith("/I") else None)
        return h5[found[0]][()]


@pytest.mark.opencl
def test_the_command_on_two_devices_matches_one(stack, tmp_path):
    """sigma-clip --device D,D writes the same numbers as --device D; -v names both devices
    and the pool sizes; the saved job holds the device list."""
    device = need_opencl()
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    common = ["sigma-clip", "-p", stack.poni, "--backend", "opencl", "--npt", 60, stack.h5]
    first = invoke(*common, "--device", device, "-o", one)
    assert first.exit_code == 0, first.output
    second = invoke(*common, "--device", f"{device},{device}", "-o", two, "-v",
                    "--save-config", tmp_path / "job.toml")
    assert second.exit_code == 0, second.output
    np.testing.assert_array_equal(reduced(two), reduced(one))
    assert reduced(one).shape == (12, 60)
    log = second.stderr
    assert f"(device {device},{device})" in log
    assert log.count(f"{device} (") >= 2 and "frames in flight" in log
    assert "page-locked per device" in log
    assert cfg.load_config(tmp_path / "job.toml")["device"] == [device, device]


@pytest.mark.opencl
def test_the_command_refuses_devices_that_do_not_exist(stack, tmp_path):
    """One line, naming what exists: a missing device in a list, ``all`` without a GPU."""
    device = need_opencl()
    common = ["integrate", "-p", stack.poni, "--backend", "opencl", stack.h5]
    bad = invoke(*common, "--device", f"{device},7:7", "-o", tmp_path / "bad.h5")
    assert bad.exit_code != 0
    lines = [line for line in bad.stderr.splitlines() if "7:7" in line]
    assert len(lines) == 1 and "available: " in lines[0] and "Traceback" not in bad.output
    syntax = invoke(*common, "--device", "first,second", "-o", tmp_path / "syntax.h5")
    assert syntax.exit_code != 0 and "'first' is not a device" in syntax.stderr
    if not any(d["type"] == "GPU" for d in opencl.list_devices()):
        none = invoke(*common, "--device", "all", "-o", tmp_path / "all.h5")
        assert none.exit_code != 0
        assert "--device all: no OpenCL GPU found; available: " in none.stderr


# ============================================================================ compressed chunks
def test_decode_auto_on_several_devices(monkeypatch):
    """``--decode auto`` decodes on the devices when every device named is a GPU."""
    pytest.importorskip("pyopencl")
    from azfilter.pipeline.run import decode_on_device

    monkeypatch.setattr(devices_module, "_enumerate",
                        lambda cl: fake_devices(["CPU", "GPU", "GPU"]))
    config = {"backend": "opencl", "decode": "auto"}
    assert decode_on_device({**config, "device": ["0:1", "0:2"]})
    assert decode_on_device({**config, "device": ["all"]})
    assert not decode_on_device({**config, "device": ["0:0", "0:1"]})
    assert not decode_on_device({**config, "device": ["0:1", "0:9"]})   # refused later
    assert not decode_on_device({**config, "device": ["all"], "decode": "host"})


@pytest.mark.opencl
def test_compressed_chunks_on_two_devices(tmp_path):
    """A bitshuffle-LZ4 stack with a corrupt chunk, decoded on the device named twice: the
    same bits as host decoding on one device, the same frame failed."""
    device = need_opencl()
    pytest.importorskip("hdf5plugin")
    from test_decode_device import PONI as DECODE_PONI
    from test_decode_device import corrupt_chunks, ring_frames, write_bslz4

    from azfilter.output import read_result

    (tmp_path / "geo.poni").write_text(DECODE_PONI)
    write_bslz4(tmp_path / "bslz4.h5", ring_frames(8, np.uint32, seed=3))
    damaged = corrupt_chunks(tmp_path / "bslz4.h5", np.uint32)
    results = {}
    for name, options in (("host", ["--device", device, "--decode", "host"]),
                          ("devices", ["--device", f"{device},{device}", "--decode",
                                       "device"])):
        out = tmp_path / f"{name}.h5"
        result = invoke("sigma-clip", "-p", tmp_path / "geo.poni", "--npt", 50,
                        "--backend", "opencl", *options, tmp_path / "bslz4.h5", "-o", out, "-q")
        assert result.exit_code == 3, result.output      # 3: the damaged frames failed
        results[name] = read_result(out)
    for result in results.values():
        assert sorted(index for _, index, _ in result.failed) == sorted(damaged)
    np.testing.assert_array_equal(results["devices"].intensity, results["host"].intensity)
    np.testing.assert_array_equal(results["devices"].sigma, results["host"].sigma)
    assert results["devices"].frame_indices == results["host"].frame_indices
