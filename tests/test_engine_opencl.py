"""OpenCLEngine against the numpy reference (PythonEngine), device discovery and batch mode.

Every operation, error model and split is compared with :class:`PythonEngine` on synthetic
frames (Poisson rings, Bragg spots, hot and dead pixels, Dectris dummies, a dark, a flat and a
polarization correction): S, V, W, W2, N and intensity/sigma/std agree to 1e-5 relative.
The tests run on whatever OpenCL device is found (``$AZFILTER_OPENCL_DEVICE`` picks one); in
CI (``CI=true``) they must run on PoCL and fail, never skip, when it is missing.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from opencl_device import require_opencl
from synthetic import synthetic_case, table

from azfilter.backends import BinSums, get_engine_class, opencl
from azfilter.backends.python import PythonEngine
from azfilter.binning import build_csr
from azfilter.detectors import generic_detector
from azfilter.errors import AzfilterError
from azfilter.preproc import pixel_constants

pytestmark = pytest.mark.opencl

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
FIELDS = ("signal", "variance", "normalization", "normalization2", "count")
MODELS = ("poisson", "azimuthal", "hybrid", "variance")
DUMMY, DELTA_DUMMY = -2.0, 1.5      # Pilatus: -1 (gaps) and -2 (dead pixels) are invalid


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def device() -> str:
    """The ``device=`` string of the OpenCL device the tests run on."""
    devices = require_opencl()
    wanted = os.environ.get("AZFILTER_OPENCL_DEVICE")
    if IN_CI and not wanted:
        pocl = [d for d in devices if "portable computing language" in d["platform_name"].lower()
                or "pocl" in d["platform_name"].lower()]
        if not pocl:
            pytest.fail(f"CI must run the OpenCL tests on PoCL; found only {devices}")
        return pocl[0]["id"]
    return opencl.select_device(wanted)[0]["id"]   # None: the best device


@dataclass
class Setup:
    """A synthetic frame with its tables and both engines' inputs."""

    raw: np.ndarray
    variance: np.ndarray
    pixel_norm: np.ndarray
    dark: np.ndarray | None
    tables: dict


@pytest.fixture(scope="module")
def small() -> Setup:
    """Pilatus 300K frame (int32, -1 gaps, -2 dead pixels) with dark, flat, polarization."""
    case = synthetic_case(seed=3)
    shape = case.raw.shape
    rng = np.random.default_rng(7)
    dark = rng.normal(2.0, 0.1, shape).astype(np.float32)
    flat = rng.normal(1.0, 0.02, shape).astype(np.float32)
    const = pixel_constants(case.geometry, dark=dark, flat=flat, polarization=0.99,
                            normalization=2.5)
    raw = case.raw + np.rint(dark).astype(np.int32) * (case.raw >= 0)
    variance = (np.maximum(raw, 1) * rng.uniform(0.8, 1.2, shape)).astype(np.float32)
    tables = {split: build_csr(case.geometry, "q_nm^-1", 300, split, const.static_mask,
                               cache=False) for split in ("no", "full")}
    return Setup(raw, variance, const.pixel_norm, const.dark, tables)


@pytest.fixture(scope="module")
def engines(small, device):
    """(reference, OpenCL engine) per split, built once for the module."""
    return {split: (PythonEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY),
                    opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                        device=device))
            for split, csr in small.tables.items()}


# ----------------------------------------------------------------------------- helpers
def results(sums: BinSums) -> dict[str, np.ndarray]:
    """intensity, sigma, std as integrator.py derives them (NaN where N == 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"intensity": sums.signal / sums.normalization,
               "sigma": np.sqrt(sums.variance) / sums.normalization,
               "std": np.sqrt(sums.variance / sums.normalization2)}
    for values in out.values():
        values[sums.count == 0] = np.nan
    return out


def assert_agree(ref: BinSums, got: BinSums, what: str, rtol: float = 1e-5) -> None:
    """S, V, W, W2, N and intensity/sigma/std equal to ``rtol`` (relative).

    Values that are zero up to rounding in the reference (the scatter of a single fragment)
    are compared to 1e-9 of the largest value of their array.
    """
    assert isinstance(got, BinSums) and got.npt == ref.npt, what
    for name in FIELDS:
        expected, actual = getattr(ref, name), getattr(got, name)
        scale = float(np.abs(expected[np.isfinite(expected)]).max(initial=0.0))
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-9 * scale,
                                   err_msg=f"{what}: {name}")
    ref_results, got_results = results(ref), results(got)
    for name, expected in ref_results.items():
        finite = np.abs(expected[np.isfinite(expected)])
        scale = float(finite.max(initial=0.0))
        np.testing.assert_allclose(got_results[name], expected, rtol=rtol,
                                   atol=1e-9 * scale, err_msg=f"{what}: {name}")


def run(engine, operation: str, raw, model: str, variance, **params) -> BinSums:
    var = variance if model == "variance" else None
    if operation == "integrate":
        return engine.integrate(raw, model, var)
    if operation == "sigma_clip":
        return engine.sigma_clip(raw, params["thres"], params["max_iter"], model, var)
    return engine.medfilt(raw, params["quant_min"], params["quant_max"], model, var)




# ----------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("thres, max_iter", [(5.0, 5), (0.0, 10), (3.0, 0), (2.0, 1)])
def test_sigma_clip_matches_reference(engines, small, model, thres, max_iter):
    ref, ocl = engines["no"]
    params = dict(thres=thres, max_iter=max_iter)
    expected = run(ref, "sigma_clip", small.raw, model, small.variance, **params)
    got = run(ocl, "sigma_clip", small.raw, model, small.variance, **params)
    plain = ref.integrate(small.raw, model, small.variance if model == "variance" else None)
    if max_iter > 0:   # the clipping did reject the spots and hot pixels somewhere
        assert np.sum(plain.count - expected.count) > 100
    else:
        np.testing.assert_array_equal(expected.count, plain.count)
    assert_agree(expected, got, f"sigma_clip {model} thres={thres} max_iter={max_iter}")


def test_sigma_clip_full_split_table(engines, small):
    """The engine does not assume c == 1 (the integrator only clips without splitting)."""
    ref, ocl = engines["full"]
    assert_agree(ref.sigma_clip(small.raw, 4.0, 5, "azimuthal"),
                 ocl.sigma_clip(small.raw, 4.0, 5, "azimuthal"), "sigma_clip full split")


@pytest.mark.parametrize("split", ["no", "full"])
@pytest.mark.parametrize("model", MODELS)
def test_medfilt_matches_reference(engines, small, split, model):
    """Rows of ~1000 fragments: the local-memory bitonic sort at its full size (the contract's
    rows are ~100)."""
    quantiles = (0.25, 0.75)
    ref, ocl = engines[split]
    params = dict(quant_min=quantiles[0], quant_max=quantiles[1])
    expected = run(ref, "medfilt", small.raw, model, small.variance, **params)
    got = run(ocl, "medfilt", small.raw, model, small.variance, **params)
    np.testing.assert_array_equal(got.count, expected.count)
    assert_agree(expected, got, f"medfilt {split} {model} {quantiles}")


# ----------------------------------------------------------------------------- raw dtypes
# uint16, uint32, int32, float32, float64: the contract; these go through a host conversion
@pytest.mark.parametrize("dtype", [">i4", "bool", "int8", "uint64"])
def test_raw_dtypes_are_converted(engines, small, dtype):
    ref, ocl = engines["no"]
    raw = np.clip(small.raw, 0, None).astype(dtype)
    if dtype.startswith("float"):   # NaN pixels are invalid
        raw.ravel()[::97] = np.nan
        raw[small.raw == -2] = -2
    expected = ref.integrate(raw, "poisson")
    assert_agree(expected, ocl.integrate(raw, "poisson"), f"integrate raw {dtype}")


def test_unsupported_dtype_and_wrong_size(engines, small):
    _, ocl = engines["no"]
    with pytest.raises(AzfilterError, match="dtype"):
        ocl.integrate(small.raw.astype(np.complex64), "poisson")
    with pytest.raises(AzfilterError, match="pixels"):
        ocl.integrate(small.raw[:-1], "poisson")
    with pytest.raises(AzfilterError, match="variance"):
        ocl.integrate(small.raw, "variance")
    with pytest.raises(AzfilterError, match="error model"):
        ocl.integrate(small.raw, "poissonian")


def test_variance_array_is_reuploaded_when_changed(engines, small):
    ref, ocl = engines["no"]
    variance = small.variance.copy()
    first = ocl.integrate(small.raw, "variance", variance)
    variance *= 4.0   # same object, new content
    second = ocl.integrate(small.raw, "variance", variance)
    np.testing.assert_allclose(second.variance, 4.0 * first.variance, rtol=1e-6)
    assert_agree(ref.integrate(small.raw, "variance", variance), second, "variance changed")


# ----------------------------------------------------------------------------- small tables
def test_hand_made_tables_edge_cases(device):
    """Empty rows, rows of invalid pixels only, single pixels, ties, negative values, c < 1."""
    rows = [[0, 1, 2, 3, 4, 5], [], [6, 7], [8], [9, 10, 11, 12], [0, 3, 13, 14, 15]]
    coefs = [[1] * 6, [], [1, 1], [1], [1, 1, 1, 1], [0.5, 0.25, 1.0, 0.0, 0.75]]
    norm = np.array([1, 2, 1, 0.5, 1, 1, 1, 1, 1, 3, 3, 3, 3, 1, 2, 0.5], np.float32)
    norm[7] = 0   # statically masked pixel listed in a table: invalid
    raw = np.array([10, 20, 20, 5, 10, 10, -2, 7, 40, 9, 9, 9, 9, -5, 3, 8], np.int32)
    dark = np.linspace(0, 1, raw.size).astype(np.float32)
    variance = np.linspace(1, 5, raw.size).astype(np.float32)
    for csr in (table(rows), table(rows, coefs)):
        ref = PythonEngine(csr, norm, dark, DUMMY, DELTA_DUMMY)
        ocl = opencl.OpenCLEngine(csr, norm, dark, DUMMY, DELTA_DUMMY, device=device)
        for model in MODELS:
            var = variance if model == "variance" else None
            assert_agree(ref.integrate(raw, model, var), ocl.integrate(raw, model, var),
                         f"tiny integrate {model}")
            for thres, max_iter in ((0.5, 5), (1.0, 1), (0.0, 3)):
                assert_agree(ref.sigma_clip(raw, thres, max_iter, model, var),
                             ocl.sigma_clip(raw, thres, max_iter, model, var),
                             f"tiny sigma_clip {model} {thres} {max_iter}")
            for low, high in ((0.5, 0.5), (0.2, 0.8), (0.0, 1.0), (0.0, 0.0), (1.0, 1.0)):
                expected = ref.medfilt(raw, low, high, model, var)
                assert_agree(expected, ocl.medfilt(raw, low, high, model, var),
                             f"tiny medfilt {model} {low} {high}")
    # the row of one dummy pixel is empty; N counts what is valid
    sums = ocl.integrate(raw, "poisson")
    assert sums.count[1] == 0 and sums.count[2] == 0 and sums.count[3] == 1


def test_medfilt_ties_are_broken_by_pixel_index(device):
    """Equal corrected values: the fragment order (and so the median) follows the pixel index."""
    csr = table([[0, 1, 2, 3]])
    norm = np.array([8.0, 4.0, 2.0, 1.0], np.float32)
    raw = np.array([40, 20, 10, 5], np.int32)      # x = 5 for every pixel
    ocl = opencl.OpenCLEngine(csr, norm, None, None, 0.0, device=device)
    # weights 8, 4, 2, 1 (T = 15), quantile 0.3 -> 4.5: in pixel order pixel 0 spans [0, 8]
    # and is selected; in reverse order pixel 1 (span [3, 7]) would be
    sums = ocl.medfilt(raw, 0.3, 0.3, "poisson")
    assert sums.count[0] == 1 and sums.signal[0] == 40 and sums.normalization[0] == 8
    ref = PythonEngine(csr, norm, None, None, 0.0)
    assert_agree(ref.medfilt(raw, 0.1, 0.3, "azimuthal"), ocl.medfilt(raw, 0.1, 0.3, "azimuthal"),
                 "ties")


# ----------------------------------------------------------------------------- long rows
@pytest.fixture(scope="module")
def wide(device):
    """1000x1000 frame, r_mm, 20 bins: tens of thousands of pixels per bin."""
    detector = generic_detector(100e-6, 100e-6, (1000, 1000))
    case = synthetic_case(detector, seed=11, n_spots=400)
    const = pixel_constants(case.geometry, polarization=0.95)
    out = {}
    for split in ("no", "full"):
        csr = build_csr(case.geometry, "r_mm", 20, split, const.static_mask, cache=False)
        out[split] = (PythonEngine(csr, const.pixel_norm, None, None, 0.0),
                      opencl.OpenCLEngine(csr, const.pixel_norm, None, None, 0.0,
                                          device=device))
    return case.raw, out


def test_long_rows_sigma_clip(wide):
    raw, engines = wide
    ref, ocl = engines["no"]
    assert ocl_table_lengths(ref).size == 20
    assert ocl_table_lengths(ref).max() > 50_000
    for model in ("azimuthal", "poisson"):
        expected = ref.sigma_clip(raw, 3.0, 5, model)
        assert np.sum(ref.integrate(raw, model).count - expected.count) > 400
        assert_agree(expected, ocl.sigma_clip(raw, 3.0, 5, model), f"long rows clip {model}")


@pytest.mark.parametrize("split", ["no", "full"])
def test_long_rows_medfilt_global_sort(wide, split):
    raw, engines = wide
    ref, ocl = engines[split]
    assert ocl._long_rows.size > 0 and len(ocl._merge_widths) >= 3   # global sort path
    assert ocl_table_lengths(ref).max() > 50_000
    for quantiles, model in (((0.5, 0.5), "poisson"), ((0.1, 0.9), "azimuthal")):
        expected = ref.medfilt(raw, *quantiles, model)
        got = ocl.medfilt(raw, *quantiles, model)
        np.testing.assert_array_equal(got.count, expected.count)
        assert_agree(expected, got, f"long rows medfilt {split} {quantiles}")


def ocl_table_lengths(ref: PythonEngine) -> np.ndarray:
    return np.bincount(ref._bin, minlength=ref.npt)


# ----------------------------------------------------------------------------- fallbacks
def test_compensated_float32_and_global_sort(small, device):
    """fp64=False (devices without cl_khr_fp64), a small work-group and a tiny local sort."""
    for split in ("no", "full"):
        csr = small.tables[split]
        ref = PythonEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY)
        ocl = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                  device=device, fp64=False, workgroup_size=16,
                                  local_sort_size=128)
        assert not ocl.fp64 and ocl._long_rows.size > 0
        for model in ("poisson", "azimuthal"):
            assert_agree(ref.integrate(small.raw, model), ocl.integrate(small.raw, model),
                         f"fp32 integrate {split} {model}")
            assert_agree(ref.medfilt(small.raw, 0.25, 0.75, model),
                         ocl.medfilt(small.raw, 0.25, 0.75, model),
                         f"fp32 medfilt {split} {model}")
            if split == "no":
                assert_agree(ref.sigma_clip(small.raw, 5.0, 5, model),
                             ocl.sigma_clip(small.raw, 5.0, 5, model),
                             f"fp32 sigma_clip {model}")


@pytest.mark.parametrize("slots", [2, 4])
def test_medfilt_global_sort_streams_on_every_slot(small, device, slots, monkeypatch):
    """medfilt rows longer than the local sort, streamed: each frame slot has its own sort
    scratch (when the device has the memory) and its own queue, and every frame equals the
    frame reduced alone; with one shared scratch, the frames keep to one queue."""
    from azfilter.backends.opencl import engine as engine_module

    monkeypatch.setattr(engine_module, "CPU_SLOTS", slots)
    monkeypatch.setattr(engine_module, "GPU_SLOTS", slots)
    csr = small.tables["full"]
    ocl = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                              device=device, workgroup_size=16, local_sort_size=128)
    assert ocl._long_rows.size > 0 and ocl._sort_per_slot
    rng = np.random.default_rng(5)
    frames = [(small.raw + rng.poisson(3, small.raw.shape) * (small.raw >= 0)).astype(np.int32)
              for _ in range(2 * slots + 1)]
    alone = [ocl.medfilt(frame, 0.25, 0.75, "azimuthal") for frame in frames]
    params = {"quant_min": 0.25, "quant_max": 0.75, "error_model": "azimuthal"}
    streamed = [sums for _, sums in ocl.process_many(enumerate(frames), "medfilt", params)]
    for index, (single, got) in enumerate(zip(alone, streamed, strict=True)):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(single, name),
                                          err_msg=f"frame {index}: {name}")
    assert sorted(ocl._sort_buffers) == list(range(slots))   # one scratch per slot
    assert {queue.int_ptr for queue in ocl._slot_queues} == \
        {ocl._slot_queue[slot].int_ptr for slot in range(slots)}
    # without the memory for one per slot: one scratch, one queue, the same results
    monkeypatch.setattr(engine_module.OpenCLEngine, "_sort_per_slot", False)
    shared = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                 device=device, workgroup_size=16, local_sort_size=128)
    again = [sums for _, sums in shared.process_many(enumerate(frames), "medfilt", params)]
    np.testing.assert_array_equal(again[-1].signal, streamed[-1].signal)
    assert list(shared._sort_buffers) == [0]
    assert {shared._slot_queue[slot].int_ptr for slot in range(slots)} == \
        {shared._slot_queues[0].int_ptr}


# ----------------------------------------------------------------------------- batch mode
# process_many's order, per-frame errors and early stop: the contract
def test_frames_in_pinned_memory(engines, small):
    """pinned_array gives page-locked host arrays; frames there give the same results."""
    _, ocl = engines["no"]
    pinned = ocl.pinned_array(small.raw.shape, small.raw.dtype)
    assert pinned.shape == small.raw.shape and pinned.flags.c_contiguous
    frames = [small.raw, small.raw * 3, small.raw[::-1].copy()]
    for frame in frames:
        pinned[...] = frame
        direct = ocl.sigma_clip(pinned, 4.0, 5, "azimuthal")
        single = ocl.sigma_clip(frame, 4.0, 5, "azimuthal")
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(direct, name), getattr(single, name))


def test_stream_read_backs_keep_their_events_and_give_new_arrays(engines, small,
                                                               monkeypatch):
    """A streamed frame's results (sums and statistics) come back in one copy, into its
    slot's page-locked results array, and the event of that copy stays with the frame until
    it is finished (pyopencl waits for a copy whose event is dropped, holding the GIL: the
    thread feeding the engine then waited for every frame's kernels). The sums handed out
    are new arrays, not the slot's: the next frame in that slot must not change them."""
    _, ocl = engines["no"]
    cl = ocl._cl
    copies = []
    enqueue_copy = cl.enqueue_copy

    def counted(queue, dest, src, **kwargs):
        copies.append("to host" if isinstance(dest, np.ndarray) else "to device")
        return enqueue_copy(queue, dest, src, **kwargs)
    monkeypatch.setattr(cl, "enqueue_copy", counted)
    pending = ocl._submit(small.raw, "sigma_clip", {"thres": 4.0, "max_iter": 5,
                                                     "error_model": "azimuthal"}, 0)
    assert copies.count("to host") == 1     # sums, counts and reals in one copy
    assert isinstance(pending.done, cl.Event)
    results = ocl._host_arrays(0)["results"]
    assert opencl.is_pinned(results)
    for array in (pending.sums, *pending.outliers[1:]):
        assert np.shares_memory(array, results)
    monkeypatch.undo()
    first = ocl._finish(pending)
    again = ocl._finish(ocl._submit(small.raw * 2, "sigma_clip",
                                    {"thres": 4.0, "max_iter": 5,
                                     "error_model": "azimuthal"}, 0))
    assert not np.shares_memory(first.signal, pending.sums)
    expected = ocl.sigma_clip(small.raw, 4.0, 5, "azimuthal")
    for name in FIELDS:      # the second frame in the same slot left the first's results
        np.testing.assert_array_equal(getattr(first, name), getattr(expected, name))
    assert not np.array_equal(first.signal, again.signal)


@pytest.mark.parametrize("error_model", ["azimuthal", "poisson", "hybrid"])
def test_sigma_clip_statistics_in_its_own_launch_equal_outlier_stats(engines, small,
                                                                     error_model):
    """sigma_clip computes the outlier statistics at its end (one launch less per frame):
    they equal, bit for bit, those of the outlier_stats kernel run on its flags and sums."""
    for split in ("no", "full"):
        _, ocl = engines[split]
        cl = ocl._cl
        raw = small.raw * 3
        fused = ocl.sigma_clip(raw, 3.0, 5, error_model, pick=2.5).outliers
        # the frame's flags and sums are still in slot 0's buffers: run outlier_stats on them
        kernels = ocl._kernels_for(opencl.RAW_TYPES[np.dtype(raw.dtype)], 0)
        counts = cl.Buffer(ocl.context, cl.mem_flags.READ_WRITE, 2 * 4 * ocl.npt)
        reals_host = np.empty_like(ocl._host_arrays(None)["reals"])
        reals = cl.Buffer(ocl.context, cl.mem_flags.READ_WRITE, reals_host.nbytes)
        kernel = cl.Kernel(kernels["outlier_stats"].program, "outlier_stats")
        kernel.set_args(ocl._indptr, ocl._indices, ocl._coefs,
                        *ocl._frame_args(0, error_model, None), ocl._flags[0], ocl._sums[0],
                        ocl._real(2.5), np.int32(ocl.npt), counts, reals)
        wg = ocl.workgroup_size
        cl.enqueue_nd_range_kernel(ocl.queue, kernel, (ocl.npt * wg,), (wg,))
        counts_host = np.empty((2, ocl.npt), np.int32)
        cl.enqueue_copy(ocl.queue, counts_host, counts)
        cl.enqueue_copy(ocl.queue, reals_host, reals)
        if reals_host.ndim == 3:
            reals_host = reals_host[..., 0].astype(np.float64) + reals_host[..., 1]
        np.testing.assert_array_equal(fused.available, counts_host[0])
        np.testing.assert_array_equal(fused.picked, counts_host[1])
        np.testing.assert_array_equal(fused.rejected_sum, reals_host[0])
        np.testing.assert_array_equal(fused.max_sigma, reals_host[1])
        assert (fused.available > 0).any() and (fused.picked > 0).any()


# ----------------------------------------------------------------------------- devices
def test_list_devices_and_status(device):
    devices = opencl.list_devices()
    keys = {"id", "platform", "device", "platform_name", "name", "type", "global_memory",
            "local_memory", "compute_units", "max_work_group_size", "fp64", "version"}
    assert devices and all(keys <= set(d) for d in devices)
    assert device in {d["id"] for d in devices}
    status = opencl.opencl_status()
    assert status.startswith("OpenCL:") and devices[0]["name"] in status


def test_device_choice(small, device):
    devices = opencl.list_devices()
    info, _ = opencl.select_device(device)
    assert info["id"] == device
    for kind in ("GPU", "CPU"):
        if any(d["type"] == kind for d in devices):
            assert opencl.select_device(kind.lower())[0]["type"] == kind
        else:
            with pytest.raises(AzfilterError, match=f"no OpenCL {kind}.*available"):
                opencl.select_device(kind.lower())
    best = opencl.select_device(None)[0]
    if any(d["type"] == "GPU" for d in devices):
        assert best["type"] == "GPU"
    with pytest.raises(AzfilterError, match=r"no OpenCL device 9:9; available: .*0:0"):
        opencl.select_device("9:9")
    with pytest.raises(AzfilterError, match="expected 'gpu', 'cpu' or 'P:D'"):
        opencl.OpenCLEngine(small.tables["no"], small.pixel_norm, None, None, 0.0,
                            device="tpu")
    engine = get_engine_class("opencl")(small.tables["no"], small.pixel_norm, None, None, 0.0,
                                        threads=2, device=device)
    assert engine.device_info["id"] == device
    assert not any("fast-relaxed" in option for option in engine._base_options)


def test_azfilter_works_without_pyopencl():
    """Import, discovery and a clear error when pyopencl is missing (run in a subprocess)."""
    code = (
        "import sys; sys.modules['pyopencl'] = None\n"
        "import numpy as np\n"
        "import azfilter.backends.opencl as m\n"
        "from azfilter.backends import get_engine_class\n"
        "from azfilter.errors import AzfilterError\n"
        "assert m.list_devices() == []\n"
        "print(m.opencl_status())\n"
        "try:\n"
        "    get_engine_class('opencl')(None, np.ones(4, np.float32), None, None, 0.0)\n"
        "except AzfilterError as err:\n"
        "    print('error:', err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pyopencl is not installed" in done.stdout
    # opencl_status (azfilter devices) says how to install it too
    assert "pip install 'azfilter[opencl]'" in done.stdout.splitlines()[0]
    # one line, saying how to install it
    assert ("error: backend 'opencl' needs pyopencl, which is not installed: "
            "pip install 'azfilter[opencl]'") in done.stdout.splitlines()[-1]


def test_kernel_sources_found_outside_the_package(monkeypatch, tmp_path):
    """Editable installs have no azfilter/kernels/: the repository's kernels/ is used."""
    monkeypatch.setattr(opencl.programs, "_SOURCE", None)
    monkeypatch.setattr(opencl.programs.importlib.resources, "files", lambda package: tmp_path)
    source = opencl.kernel_source()
    for kernel in ("void integrate(", "void sigma_clip(", "void medfilt(",
                   "void medfilt_chunk_sort(", "void medfilt_merge("):
        assert kernel in source
    monkeypatch.setattr(opencl.programs, "_SOURCE", None)
    monkeypatch.setattr(opencl.programs, "_REPO_KERNELS", tmp_path / "nowhere")
    with pytest.raises(AzfilterError, match="not found"):
        opencl.kernel_source()


# ----------------------------------------------------------------------------- host memory
def test_staged_uploads_equal_direct_uploads(small, device, monkeypatch):
    """Frames copied through the page-locked staging buffers (in pieces, by several threads,
    converting dtype and strides on the way) give bit-identical sums to direct uploads."""
    csr = small.tables["no"]
    direct = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                 device=device, staging=False)
    staged = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                 device=device, staging=True, threads=3)
    monkeypatch.setattr(opencl.engine, "STAGING_UNIT_BYTES", 1 << 12)   # every frame: 3 threads
    monkeypatch.setattr(opencl.engine, "STAGING_ROUNDS", 2)
    copies: list[str] = []
    copy_piece = opencl.copy_piece

    def counting_copy(*args):
        copies.append(threading.current_thread().name)
        copy_piece(*args)
    monkeypatch.setattr(opencl.engine, "copy_piece", counting_copy)
    raw = small.raw
    frames = {
        "int32": raw, "rows reversed (strided)": raw[::-1], "columns reversed": raw[:, ::-1],
        "Fortran order": np.asfortranarray(raw), "big-endian": raw.astype(">i4"),
        "uint16": np.clip(raw, 0, None).astype(np.uint16),
        "float16": np.minimum(raw, 60000).astype(np.float16),
        "bool": raw > 50,
    }
    for what, frame in frames.items():
        copies.clear()
        got = staged.integrate(frame, "poisson")
        assert len(copies) == 2 * 3, what   # 2 rounds of 3 threads
        assert all(name.startswith("azfilter-staging") for name in copies), what
        expected = direct.integrate(frame, "poisson")
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(expected, name),
                                          err_msg=f"{what}: {name}")
    assert_agree(direct.sigma_clip(raw[::-1], 4.0, 5, "azimuthal"),
                 staged.sigma_clip(raw[::-1], 4.0, 5, "azimuthal"), "staged sigma_clip")
    # one thread: the calling thread copies the pieces (each sent as soon as it is copied)
    single = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                 device=device, staging=True, threads=1)
    copies.clear()
    got = single.integrate(raw[::-1], "azimuthal")
    assert copies == [threading.current_thread().name] * 2
    np.testing.assert_array_equal(got.signal, direct.integrate(raw[::-1], "azimuthal").signal)
    with pytest.raises(AzfilterError, match="threads"):
        opencl.OpenCLEngine(csr, small.pixel_norm, None, None, 0.0, device=device, threads=0)


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_process_many_staged_and_pinned_frames(small, device, slots, monkeypatch):
    """Streams mixing pageable (staged) and page-locked (direct) frames, and a ring of two
    page-locked buffers refilled as soon as the next frame is asked for, with 2 to 4 frames
    in flight (CPU and GPU defaults)."""
    from azfilter.backends.opencl import engine as engine_module

    monkeypatch.setattr(engine_module, "CPU_SLOTS", slots)
    monkeypatch.setattr(engine_module, "GPU_SLOTS", slots)
    csr = small.tables["no"]
    staged = opencl.OpenCLEngine(csr, small.pixel_norm, small.dark, DUMMY, DELTA_DUMMY,
                                 device=device, staging=True, threads=2)
    assert staged.slots == slots and len(staged._slot_queues) == slots
    rng = np.random.default_rng(11)
    frames = [(small.raw + rng.poisson(2, small.raw.shape) * (small.raw >= 0)).astype(np.int32)
              for _ in range(9)]
    frames[4] = np.clip(frames[4], 0, None).astype(np.uint16)   # another dtype, mid-stream
    params = dict(thres=4.0, max_iter=5, error_model="azimuthal")
    one_by_one = [staged.sigma_clip(frame, 4.0, 5, "azimuthal") for frame in frames]
    ring = [staged.pinned_array(small.raw.shape, np.int32) for _ in range(2)]
    kinds = []

    def mixed():
        """Page-locked ring buffers (overwritten as soon as the next frame is asked for),
        pageable frames, a strided view, in runs of each."""
        for index, frame in enumerate(frames):
            if index in (2, 3, 7) and frame.dtype == np.int32:
                buffer = ring[index % 2]
                buffer[...] = frame
                kinds.append("ring")
                yield buffer
                buffer[...] = -7   # uploaded: the engine no longer needs it
            else:
                kinds.append("pageable")
                yield frame[::-1][::-1] if index == 5 else frame
    streamed = [sums for _, sums in staged.process_many(enumerate(mixed()), "sigma_clip",
                                                        params)]
    assert kinds.count("ring") == 3 and len(streamed) == len(frames)
    for index, (single, got) in enumerate(zip(one_by_one, streamed, strict=True)):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(single, name),
                                          err_msg=f"frame {index}: {name}")
    # bad frames among staged ones: their errors in their places, the others unchanged
    bad = [(0, frames[0]), (1, frames[1][:-1]), (2, frames[2]),
           (3, frames[3].astype(np.complex64)), (4, frames[4]), (5, frames[5])]
    got = list(staged.process_many(iter(bad), "sigma_clip", params))
    assert [tag for tag, _ in got] == [0, 1, 2, 3, 4, 5]
    assert isinstance(got[1][1], AzfilterError) and isinstance(got[3][1], AzfilterError)
    for index in (0, 2, 4, 5):
        np.testing.assert_array_equal(got[index][1].signal, one_by_one[index].signal)
    # abandoned with frames still being copied: no error, the next stream is right
    stream = staged.process_many(enumerate(frames), "sigma_clip", params)
    np.testing.assert_array_equal(next(stream)[1].signal, one_by_one[0].signal)
    stream.close()
    again = [sums for _, sums in staged.process_many(enumerate(frames[:3]), "sigma_clip",
                                                     params)]
    np.testing.assert_array_equal(again[2].signal, one_by_one[2].signal)


def test_pinned_arrays_are_recognised_and_uploaded_directly(engines, small, device):
    _, ocl = engines["no"]
    pinned = opencl.pinned_array(small.raw.shape, small.raw.dtype, device=device)
    assert pinned.flags.c_contiguous and pinned.shape == small.raw.shape
    assert opencl.is_pinned(pinned) and opencl.is_pinned(pinned[10:20])
    assert opencl.is_pinned(pinned, ocl.context)
    assert not opencl.is_pinned(small.raw) and not opencl.is_pinned(np.empty_like(pinned))
    extra = ocl.pinned_array(1000, np.uint16)
    start = extra.__array_interface__["data"][0]
    assert start in [r[0] for r in opencl.pinned_ranges()] and opencl.is_pinned(extra)
    del extra
    gc.collect()
    assert start not in [r[0] for r in opencl.pinned_ranges()]   # freed: range forgotten

    staged = opencl.OpenCLEngine(small.tables["no"], small.pixel_norm, small.dark, DUMMY,
                                 DELTA_DUMMY, device=device, staging=True)

    def refuse(*args):
        raise AssertionError("a page-locked frame was staged")
    staged._staged_upload = refuse
    pinned[...] = small.raw
    got = staged.integrate(pinned, "poisson")
    np.testing.assert_array_equal(got.signal, ocl.integrate(small.raw, "poisson").signal)
    with pytest.raises(AssertionError, match="staged"):   # strided: must be staged
        staged.integrate(pinned[::-1], "poisson")


def test_integrator_frame_buffer(small, device):
    from synthetic import synthetic_case

    import azfilter as az

    case = synthetic_case(seed=3)
    plain = az.Integrator(case.geometry, npt=200, backend="python").frame_buffer(
        case.raw.shape, np.int32)
    assert isinstance(plain, np.ndarray) and not opencl.is_pinned(plain)
    assert plain.shape == case.raw.shape and plain.dtype == np.int32
    gpu = az.Integrator(case.geometry, npt=200, backend="opencl", device=device)
    buffer = gpu.frame_buffer(case.raw.shape, np.int32)
    assert opencl.is_pinned(buffer) and buffer.shape == case.raw.shape
    buffer[...] = case.raw
    np.testing.assert_array_equal(gpu.sigma_clip(buffer).intensity,
                                  gpu.sigma_clip(case.raw).intensity)


def test_open_frames_decodes_hdf5_into_given_buffers(tmp_path):
    """``open_frames(buffer=...)``: HDF5 frames are read into the caller's arrays (any
    layout and byte order); fabio formats ignore it."""
    import fabio.edfimage
    import h5py

    from azfilter.frames import open_frames

    rng = np.random.default_rng(2)
    stack = rng.integers(0, 60000, (2, 3, 12, 10)).astype(">u4")
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("s3", data=stack[0], chunks=(1, 12, 10), compression="gzip")
        h5.create_dataset("s4", data=stack)
        h5.create_dataset("one", data=stack[1, 2].astype(np.float32))
    edf = tmp_path / "frame.edf"
    fabio.edfimage.EdfImage(data=stack[0, 0].astype(np.int32)).write(str(edf))
    given: list[np.ndarray] = []

    def buffer(shape, dtype):
        assert dtype.isnative
        given.append(np.full(shape, 7, dtype=dtype))
        return given[-1]
    specs = [f"{path}::/s3", f"{path}::/s4", f"{path}::/one", str(edf)]
    plain = list(open_frames(specs))
    into = list(open_frames(specs, buffer=buffer))
    assert len(plain) == len(into) == 3 + 6 + 1 + 1 and len(given) == 10
    for expected, got in zip(plain, into, strict=True):
        assert (got.source, got.index) == (expected.source, expected.index)
        np.testing.assert_array_equal(got.data, expected.data)
    assert all(any(frame.data is array for array in given) for frame in into[:-1])
    assert not any(into[-1].data is array for array in given)


def test_cli_reads_frames_into_page_locked_buffers(tmp_path, device, monkeypatch):
    """``--backend opencl``: the reader decodes HDF5 frames straight into page-locked
    buffers (and copies CBF frames into them), a bounded set reused; the output equals the
    python backend's."""
    import fabio.cbfimage
    import h5py
    from click.testing import CliRunner

    from azfilter import cli
    from azfilter.integrator import Integrator
    from azfilter.output import read_result
    from azfilter.pipeline import run as pipeline_run
    from azfilter.resources import usable_cores

    shape = (96, 120)
    (tmp_path / "geo.poni").write_text(
        "poni_version: 2.1\nDetector: Detector\nDetector_config: {\"pixel1\": 0.0001, "
        "\"pixel2\": 0.0001, \"max_shape\": [96, 120], \"orientation\": 3}\n"
        "Distance: 0.05\nPoni1: 0.0048\nPoni2: 0.006\nRot1: 0.01\nRot2: -0.02\nRot3: 0.0\n"
        "Wavelength: 1e-10\n")
    rng = np.random.default_rng(4)
    rows, cols = np.indices(shape)
    rings = 40 + 300 * np.exp(-0.5 * ((np.hypot(rows - 48, cols - 60) - 25) / 2.0) ** 2)
    frames = [rng.poisson(rings).astype(np.uint32) for _ in range(20)]
    for frame in frames:
        frame.flat[rng.integers(0, frame.size, 6)] += 50_000
    with h5py.File(tmp_path / "stack.h5", "w") as h5:
        h5.create_dataset("entry/data/data", data=np.stack(frames[:18]), chunks=(1, *shape),
                          compression="gzip")
    cbfs = []
    for k, frame in enumerate(frames[18:]):
        cbfs.append(tmp_path / f"img_{k}.cbf")
        fabio.cbfimage.CbfImage(data=frame.astype(np.int32)).write(str(cbfs[-1]))


    allocated: list[tuple] = []
    reduced_pinned: list[bool] = []
    pinned_array = opencl.hostmem.pinned_array
    process_many = Integrator.process_many

    def counting_pinned(shape, dtype, device=None):
        allocated.append((tuple(shape), np.dtype(dtype)))
        return pinned_array(shape, dtype, device=device)

    def spying_process_many(integrator, frames, operation, **params):
        # what the command's pipeline hands the engine's stream, frame by frame
        def watched():
            for tag, data in frames:
                reduced_pinned.append(opencl.is_pinned(data))
                yield tag, data
        return process_many(integrator, watched(), operation, **params)
    monkeypatch.setattr(opencl.hostmem, "pinned_array", counting_pinned)
    monkeypatch.setattr(Integrator, "process_many", spying_process_many)
    outputs = {}
    for backend in ("opencl", "python"):
        out = tmp_path / f"{backend}.h5"
        args = ["sigma-clip", "-p", tmp_path / "geo.poni", "--backend", backend, "--npt", 60,
                "--thres", 3, tmp_path / "stack.h5", *cbfs, "-o", out, "--quiet"]
        if backend == "opencl":
            args[5:5] = ["--device", device]
        result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs[backend] = read_result(out)
    assert len(reduced_pinned) == 40
    # the HDF5 frames (gzip chunks decoded by the frame stream straight into the ring's
    # buffers) and the CBF frames reach the OpenCL engine in page-locked memory
    assert all(reduced_pinned[:20]) and not any(reduced_pinned[20:])   # opencl, then python
    # the ring the pipeline sizes from the cores the job may use (2 here, 16 on a GPU node)
    readers = usable_cores()
    capacity = 2 * readers + 2 + pipeline_run.READ_AHEAD + 4
    assert 1 <= len(allocated) <= min(capacity, 20)   # reused, bounded
    assert set(allocated) <= {(shape, np.dtype(np.uint32)), (shape, np.dtype(np.int32))}
    np.testing.assert_allclose(outputs["opencl"].intensity, outputs["python"].intensity,
                               rtol=1e-5)
    np.testing.assert_allclose(outputs["opencl"].sigma, outputs["python"].sigma, rtol=1e-5)
    assert outputs["opencl"].frame_indices == outputs["python"].frame_indices
    assert outputs["opencl"].intensity.shape == (20, 60)
