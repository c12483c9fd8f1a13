"""``azfilter sparsify`` and ``azfilter hits``: the picking rule (numpy reference and compiled),
the sparse file read back by fabio, agreement with pyFAI's sparsify-Bragg, the batch features
(shards + merge, --skip-existing, failed frames) and the hit list on a labelled set."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fabio
import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from opencl_device import require_opencl

import azfilter as az
from azfilter import bragg, cli
from azfilter.hits import count_peaks, read_frame_hits
from azfilter.output.sparse import CREATOR, sparse_group_of

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import default_geometry, synthetic_case  # noqa: E402

NPT = 300
#: frames of the labelled set: odd frames carry Bragg spots, even ones none
N_FRAMES = 20
#: 2x2 and 3x3 spots are at least 4 pixels; noise picks rarely make groups of 4
PEAK_SIZE = 4


def invoke(*args):
    """``azfilter ARGS`` in process; click's Result."""
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False,
                              prog_name="azfilter")


def labelled_frame(geometry, k: int) -> np.ndarray:
    """Frame k of the labelled set: Bragg spots on odd frames (5 to 40 of them)."""
    spots = 0 if k % 2 == 0 else 5 + (7 * k) % 36
    return synthetic_case(geometry, seed=100 + k, n_spots=spots, n_hot=0, n_dead=5).raw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """geo.poni; stack.h5 (the 20 labelled frames); frames as CBF files; a corrupt CBF."""
    root = tmp_path_factory.mktemp("sparsify")
    geometry = default_geometry("Pilatus300k")
    (root / "geo.poni").write_text(geometry.to_poni())
    frames = np.stack([labelled_frame(geometry, k) for k in range(N_FRAMES)])
    with h5py.File(root / "stack.h5", "w") as h5:
        h5["entry/data/data"] = frames
    cbfs = []
    for k in range(4):
        path = root / "cbf" / f"img_{k:04d}.cbf"
        path.parent.mkdir(exist_ok=True)
        fabio.cbfimage.CbfImage(data=frames[k]).write(os.fspath(path))
        cbfs.append(path)
    corrupt = root / "cbf" / "img_0002.cbf"
    corrupt.write_bytes(corrupt.read_bytes()[:5000])   # truncated: a failed frame
    return SimpleNamespace(root=root, poni=root / "geo.poni", stack=root / "stack.h5",
                           frames=frames, geometry=geometry, cbfs=cbfs)


@pytest.fixture(scope="module")
def sparse(data):
    """The labelled stack sparsified once (cython backend, defaults)."""
    out = data.root / "sparse.h5"
    result = invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, data.stack, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def clipped(data, frame, backend="cython"):
    integrator = az.Integrator(data.geometry, npt=NPT, backend=backend)
    return integrator, integrator.sigma_clip(frame, thres=0.0, max_iter=5,
                                             error_model="poisson")


# ------------------------------------------------------------------------------ the rule


def test_fill_profile_interpolates_empty_bins():
    values = np.array([np.nan, 2.0, np.nan, np.nan, 8.0, np.nan])
    assert np.array_equal(bragg.fill_profile(values), [2.0, 2.0, 4.0, 6.0, 8.0, 8.0])
    assert np.array_equal(bragg.fill_profile(np.full(3, np.nan)), np.zeros(3))


def test_interpolation_is_linear_between_centres_and_clamped():
    radius = np.array([1.0, 2.0, 3.0])
    profile = np.array([10.0, 20.0, 40.0])
    got = bragg.interpolate(profile, radius, np.array([0.0, 1.5, 2.0, 2.25, 5.0, np.nan]))
    assert np.array_equal(got[:5], [10.0, 15.0, 20.0, 25.0, 40.0])


@pytest.mark.parametrize("kind", ["int32", "float32-dark", "uint32"])
def test_compiled_picker_equals_reference(data, kind):
    if bragg._compiled is None:
        pytest.fail("the compiled picker (azfilter._bragg) is not built")
    frame = data.frames[1]
    dark = None
    if kind == "float32-dark":
        frame = frame.astype(np.float32) + 0.25
        dark = np.full(frame.shape, 0.5, dtype=np.float32)
    elif kind == "uint32":
        # int64 first: numpy 2 refuses 2**32 - 1 as an int32 scalar
        frame = np.where(frame < 0, np.iinfo(np.uint32).max,
                         frame.astype(np.int64)).astype(np.uint32)
    integrator = az.Integrator(data.geometry, npt=NPT, dark=dark)
    result = integrator.sigma_clip(frame, thres=0.0, max_iter=5, error_model="poisson")
    geometry = bragg.pick_geometry(integrator)
    bg, std = bragg.fill_profile(result.intensity), bragg.fill_profile(result.std)
    dummy, delta = data.geometry.detector.dummy_for(frame.dtype)
    reference = bragg.pick_pixels_reference(frame, geometry, bg, std, 3.0, 1.0, dummy, delta)
    compiled = bragg.pick_pixels(frame, geometry, bg, std, 3.0, 1.0, dummy, delta)
    assert reference.size > 100
    assert np.array_equal(reference, compiled)


def test_picked_pixels_follow_the_rule(data):
    """Every picked pixel exceeds its threshold, every other valid pixel does not."""
    frame = data.frames[3]
    integrator, result = clipped(data, frame)
    geometry = bragg.pick_geometry(integrator)
    sparse_frame = bragg.sparsify_frame(frame, result, geometry, 3.0, 1.0, -2.0, 1.5)
    valid = bragg.valid_pixels(frame, geometry, -2.0, 1.5)
    with np.errstate(divide="ignore", invalid="ignore"):   # masked pixels: norm 0
        corrected = frame.ravel() / geometry.pixel_norm.astype(np.float64)
    bg = bragg.interpolate(sparse_frame.background, geometry.radius, geometry.position)
    std = bragg.interpolate(sparse_frame.background_std, geometry.radius, geometry.position)
    excess = corrected - bg - np.maximum(1.0, 3.0 * np.sqrt(std ** 2 + 1.0))
    picked = np.zeros(frame.size, bool)
    picked[sparse_frame.index] = True
    assert np.all(excess[picked] > 0)
    assert not np.any(excess[valid & ~picked] > 0)
    case = synthetic_case(data.geometry, seed=103, n_spots=5 + 21 % 36, n_hot=0, n_dead=5)
    # nearly every Bragg-spot pixel is picked (the faint ones at 500 counts on a bright ring
    # may stay below 3 sigma)
    assert picked.reshape(frame.shape)[case.spots].mean() > 0.95


# ------------------------------------------------------------------------------ fabio


def test_fabio_densifies_frames_bit_exact_on_picked_pixels(data, sparse):
    with h5py.File(sparse, "r") as h5:
        assert h5.attrs["creator"] == CREATOR
        group = sparse_group_of(h5)
        ptr = group["frame_ptr"][()]
        index = group["index"][()]
        mask = group["mask"][()]
        assert group["intensity"].dtype == np.int32
        assert group["dummy"][()] == -2    # the Pilatus dummy value
    image = fabio.open(os.fspath(sparse))
    assert type(image).__name__ == "SparseImage"
    assert image.nframes == N_FRAMES
    masked = ~np.isfinite(mask)
    for k in (0, 1, 7):
        dense = image.getframe(k).data
        assert dense.dtype == np.int32 and dense.shape == data.frames[k].shape
        picked = index[ptr[k]:ptr[k + 1]]
        assert np.array_equal(dense.ravel()[picked], data.frames[k].ravel()[picked])
        assert np.all(dense[masked] == -2)


def test_pattern_of_densified_frame_within_sigma_of_original(data, sparse):
    """The sigma-clipped 1-D pattern of a densified frame vs the original's: within the
    ring's std in every bin; within one standard error (sem) in about 2 bins of 3 (the
    densified background is the noise-free clipped mean rounded to integer counts)."""
    image = fabio.open(os.fspath(sparse))
    with h5py.File(sparse, "r") as h5:
        original = h5["entry/data/I"][()]
        sem = h5["entry/data/I_errors"][()]
        std = h5["entry/data/std"][()]
    for k in (0, 1):
        _integrator, again = clipped(data, image.getframe(k).data)
        filled = np.isfinite(again.intensity) & np.isfinite(original[k])
        deviation = np.abs(again.intensity - original[k])[filled]
        assert np.all(deviation <= std[k][filled])
        assert np.median(deviation / sem[k][filled]) < 1.0


# ------------------------------------------------------------------------------ pyFAI


@pytest.mark.opencl
def test_agrees_with_pyfai_sparsify_bragg(data, tmp_path):
    """pyFAI's sparsify-Bragg (OpenCL) on the same frames, same bins (800 in r_mm), same
    options: on a frame without spots the picked sets agree to a few pixels in 1500; with
    spots pyFAI also picks whole rings where Poisson clipping emptied a bin (its background
    there is the dummy value, -2): azfilter fills such bins from their neighbours."""
    require_opencl()
    import hdf5plugin  # noqa: F401 - pyFAI compresses with bitshuffle

    frames = tmp_path / "two.h5"
    with h5py.File(frames, "w") as h5:
        h5["entry/data/data"] = data.frames[[0, 5]]
    ours = tmp_path / "ours.h5"
    result = invoke("sparsify", "-q", "-p", data.poni, "--npt", 800, "--unit", "r_mm",
                    frames, "-o", ours)
    assert result.exit_code == 0, result.output
    tool = shutil.which("sparsify-Bragg", path=os.path.dirname(sys.executable))
    subprocess.run([tool, "-p", os.fspath(data.poni), "--bins", "800", "--unit", "r_mm", "-A",
                    "--dummy", "-2", "--delta-dummy", "1.5",
                    "-o", "{basename}_pyfai.h5", os.fspath(frames)],
                   check=True, capture_output=True, cwd=tmp_path)
    written = tmp_path / "two_pyfai.h5"
    with h5py.File(ours, "r") as a, h5py.File(written, "r") as b:
        mine, other = sparse_group_of(a), sparse_group_of(b)
        assert np.allclose(mine["radius"][()], other["radius"][()], rtol=1e-6)
        ptr_a, ptr_b = mine["frame_ptr"][()], other["frame_ptr"][()]
        sets = [(set(mine["index"][ptr_a[k]:ptr_a[k + 1]]),
                 set(other["index"][ptr_b[k]:ptr_b[k + 1]])) for k in range(2)]
        # no spots: the same pixels, to 0.5 %
        a0, b0 = sets[0]
        assert len(a0 ^ b0) <= 0.005 * len(b0)
        # spots: everything we pick pyFAI picks (to 0.5 %); pyFAI's extra pixels lie in
        # bins where its background is its dummy value (an emptied bin)
        a1, b1 = sets[1]
        assert len(a1 - b1) <= 0.005 * len(a1)
        extra = np.array(sorted(b1 - a1))
        position = mine["mask"][()].ravel()[extra]
        radius = mine["radius"][()]
        nearest = np.clip(np.round((position - radius[0]) / (radius[1] - radius[0])),
                          0, radius.size - 1).astype(int)
        emptied = other["background_avg"][1] == -2
        near_emptied = emptied[nearest] | emptied[np.clip(nearest - 1, 0, None)] | \
            emptied[np.clip(nearest + 1, None, radius.size - 1)]
        assert near_emptied.mean() > 0.99
    # the hit list reads pyFAI's files too (no azfilter records: the file names the frames)
    counts = [(h.source, h.frame, h.picked) for h in read_frame_hits(written)]
    assert counts == [(str(written), 0, len(b0)), (str(written), 1, len(b1))]


# ------------------------------------------------------------------------------ batch


def _sparse_arrays(path):
    with h5py.File(path, "r") as h5:
        group = sparse_group_of(h5)
        arrays = {name: group[name][()] for name in (
            "frame_ptr", "index", "intensity", "background_avg", "background_std", "mask",
            "radius", "normalization", "dummy")}
        arrays["source"] = h5["entry/data/source"][()]
        arrays["frame_index"] = h5["entry/data/frame_index"][()]
    return arrays


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name


def test_shards_and_merge_equal_one_process(data, sparse, tmp_path):
    for shard in range(3):
        result = invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, data.stack,
                        "--shard", f"{shard}/3", "-o", tmp_path / "part.h5")
        assert result.exit_code == 0, result.output
    merged = tmp_path / "all.h5"
    result = invoke("merge", *sorted(tmp_path.glob("part_shard*.h5")), "-o", merged)
    assert result.exit_code == 0, result.output
    _same(_sparse_arrays(merged), _sparse_arrays(sparse))
    assert fabio.open(os.fspath(merged)).nframes == N_FRAMES


def test_merge_refuses_sparse_with_plain_outputs(data, tmp_path):
    invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, data.stack, "--shard", "0/2",
           "-o", tmp_path / "s.h5")
    invoke("sigma-clip", "-q", "-p", data.poni, "--npt", NPT, "--thres", 0, "--error-model",
           "poisson", data.stack, "--shard", "1/2", "-o", tmp_path / "s.h5")
    result = invoke("merge", tmp_path / "s_shard0of2.h5", tmp_path / "s_shard1of2.h5",
                    "-o", tmp_path / "m.h5")
    assert result.exit_code == 2
    assert "s_shard1of2.h5" in result.stderr and "Traceback" not in result.output


def test_skip_existing_adds_only_new_frames(data, sparse, tmp_path):
    first, rest = tmp_path / "first.h5", tmp_path / "rest.h5"
    with h5py.File(data.stack, "r") as h5:
        frames = h5["entry/data/data"][()]
    for path, part in ((first, frames[:8]), (rest, frames[8:])):
        with h5py.File(path, "w") as h5:
            h5["entry/data/data"] = part
    out, whole = tmp_path / "grow.h5", tmp_path / "whole.h5"
    assert invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, first, "-o", out).exit_code == 0
    result = invoke("sparsify", "-p", data.poni, "--npt", NPT, first, rest, "-o", out,
                    "--skip-existing")
    assert result.exit_code == 0, result.output
    assert "12 frames reduced, 8 skipped" in result.stderr
    assert invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, first, rest,
                  "-o", whole).exit_code == 0
    _same(_sparse_arrays(out), _sparse_arrays(whole))
    # another pick threshold is another job: refused, the file unchanged
    result = invoke("sparsify", "-p", data.poni, "--npt", NPT, first, "-o", out,
                    "--skip-existing", "--cutoff-pick", 4)
    assert result.exit_code == 2 and "cutoff_pick" in result.stderr


def test_corrupt_input_is_a_failed_frame(data, tmp_path):
    out = tmp_path / "cbf.h5"
    result = invoke("sparsify", "-p", data.poni, "--npt", NPT, *data.cbfs, "-o", out)
    assert result.exit_code == 3
    assert "img_0002.cbf" in result.stderr and "Traceback" not in result.output
    with h5py.File(out, "r") as h5:
        failed = [s.decode() for s in h5["entry/azfilter/failed/source"][()]]
        assert [Path(s).name for s in failed] == ["img_0002.cbf"]
        assert h5["entry/azfilter"].attrs["complete"]
    image = fabio.open(os.fspath(out))
    assert image.nframes == 3
    dense = image.getframe(2).data          # the fourth file, third stored frame
    with h5py.File(out, "r") as h5:
        group = sparse_group_of(h5)
        ptr = group["frame_ptr"][()]
        picked = group["index"][ptr[2]:ptr[3]]
    assert np.array_equal(dense.ravel()[picked], data.frames[3].ravel()[picked])
    summary = (tmp_path / "cbf.h5.summary.json").read_text()
    assert '"failed": 1' in summary


def test_sparsify_refusals(data, tmp_path):
    text = invoke("sparsify", "-p", data.poni, data.stack, "-o", tmp_path / "out/")
    assert text.exit_code == 2 and "one HDF5 file" in text.stderr
    sectors = invoke("sparsify", "-p", data.poni, data.stack, "--sectors", 4,
                     "-o", tmp_path / "s.h5")
    assert sectors.exit_code == 2 and "--sectors" in sectors.stderr
    split = invoke("sparsify", "-p", data.poni, data.stack, "--split", "full",
                   "-o", tmp_path / "f.h5")
    assert split.exit_code == 2 and "without pixel splitting" in split.stderr


@pytest.mark.opencl
def test_opencl_backend_picks_as_cython(data, sparse, tmp_path):
    """The OpenCL clip (float32 compensated sums) then the same host picking."""
    require_opencl()
    subset = tmp_path / "four.h5"
    with h5py.File(subset, "w") as h5:
        h5["entry/data/data"] = data.frames[:4]
    out = tmp_path / "cl.h5"
    result = invoke("sparsify", "-q", "-p", data.poni, "--npt", NPT, "--backend", "opencl",
                    subset, "-o", out)
    assert result.exit_code == 0, result.output
    mine, reference = _sparse_arrays(out), _sparse_arrays(sparse)
    for k in range(4):
        a = set(mine["index"][mine["frame_ptr"][k]:mine["frame_ptr"][k + 1]])
        b = set(reference["index"][reference["frame_ptr"][k]:reference["frame_ptr"][k + 1]])
        assert len(a ^ b) <= 0.002 * len(b) + 2


# ------------------------------------------------------------------------------ hits


def test_count_peaks_uses_8_connectivity():
    shape = (10, 10)
    image = np.zeros(shape, bool)
    image[1, 1] = image[2, 2] = image[3, 3] = True     # a diagonal: one group of 3
    image[5, 8] = image[5, 9] = True                  # a pair at the right edge
    image[6, 0] = True                                # not joined across the row end
    image[8, 4] = True                                # alone
    index = np.flatnonzero(image)
    assert count_peaks(index, shape, 1) == 4
    assert count_peaks(index, shape, 2) == 2
    assert count_peaks(index, shape, 3) == 1
    assert count_peaks(np.zeros(0, int), shape, 1) == 0


def test_hit_list_against_labelled_frames(data, sparse, tmp_path):
    truth = {k for k in range(N_FRAMES) if k % 2 == 1}
    result = invoke("hits", sparse, "--min-peaks", 3, "--peak-size", PEAK_SIZE)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    found = {int(line.split()[1]) for line in lines}
    true_positives = len(found & truth)
    precision, recall = true_positives / len(found), true_positives / len(truth)
    print(f"hit list: precision {precision:.2f} recall {recall:.2f} on {N_FRAMES} frames")
    assert precision == 1.0 and recall == 1.0
    source, frame, picked, peaks = lines[0].split()
    assert Path(source) == data.stack.resolve() and int(picked) >= int(peaks) >= 3
    count = invoke("hits", sparse, "--min-peaks", 3, "--peak-size", PEAK_SIZE, "--count")
    assert count.stdout.strip() == str(len(truth))
    none = invoke("hits", sparse, "--min-peaks", 10_000)
    assert none.exit_code == 1 and none.stdout == ""
    text, table = tmp_path / "hits.txt", tmp_path / "hits.h5"
    invoke("hits", sparse, "--min-peaks", 3, "--peak-size", PEAK_SIZE, "-o", text)
    invoke("hits", sparse, "--min-peaks", 3, "--peak-size", PEAK_SIZE, "-o", table)
    body = [line for line in text.read_text().splitlines() if not line.startswith("#")]
    assert body == lines
    with h5py.File(table, "r") as h5:
        assert sorted(h5["hits/frame_index"][()]) == sorted(truth)
        assert h5["hits"].attrs["peak_size"] == PEAK_SIZE


def test_hits_from_outlier_statistics_are_pixels_only(data, tmp_path):
    """A sigma-clip output with /entry/outliers/picked (written by sigma-clip's statistics)
    gives pixel counts; --min-peaks needs positions and is refused in one line."""
    out = tmp_path / "clip.h5"
    assert invoke("sigma-clip", "-q", "-p", data.poni, "--npt", NPT, data.stack,
                  "-o", out).exit_code == 0
    real = invoke("hits", out, "--min-pixels", 0, "--count")   # what sigma-clip wrote
    assert real.exit_code == 0 and real.stdout.split()[0] == str(N_FRAMES)
    with h5py.File(out, "a") as h5:
        picked = h5["entry/outliers/picked"]
        assert picked.shape == (N_FRAMES,) and picked.dtype == np.int64
        # known counts, to check the threshold and the printed values
        picked[...] = np.arange(N_FRAMES, dtype=np.int64) * 10
    result = invoke("hits", out, "--min-pixels", 150)
    assert result.exit_code == 0
    assert [line.split()[1:] for line in result.stdout.splitlines()] == \
        [[str(k), str(10 * k), "-"] for k in range(15, N_FRAMES)]
    refused = invoke("hits", out, "--min-peaks", 1)
    assert refused.exit_code == 2 and "positions" in refused.stderr
    assert "Traceback" not in refused.output
    stats = read_frame_hits(out)
    assert len(stats) == N_FRAMES and stats[3].peaks is None
    neither = invoke("hits", data.stack, "--min-pixels", 1)
    assert neither.exit_code == 2 and "stack.h5" in neither.stderr
