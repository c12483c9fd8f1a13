"""Tests of azfilter.frames: expanding inputs, streaming frames, errors, HDF5 discovery.

Synthetic files of every format are written into tmp_path here; the real detector files of
the shared test data are all opened and checked against fabio / h5py.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import fabio
import fabio.cbfimage
import fabio.edfimage
import h5py
import hdf5plugin
import numpy as np
import pytest
from PIL import Image

from azfilter.errors import AzfilterError, FrameReadError
from azfilter.frames import (
    Frame,
    InputItem,
    count_frames,
    describe_file,
    expand_inputs,
    load_image,
    open_frames,
    pixel_mask_for,
)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# synthetic file writers
# --------------------------------------------------------------------------------------------


def pattern(shape=(24, 32), seed=0, dtype=np.int32) -> np.ndarray:
    """A distinct frame per seed (Poisson counts with a Dectris-like -1/-2 pixel)."""
    data = np.random.default_rng(seed).poisson(40, shape).astype(dtype)
    if np.issubdtype(dtype, np.signedinteger):
        data[0, 0], data[-1, -1] = -1, -2
    return data


def write_cbf(path: Path, data: np.ndarray) -> Path:
    """A miniCBF (byte-offset); ``.gz``/``.bz2`` names are compressed as such."""
    name = str(path)
    plain = name.removesuffix(".gz").removesuffix(".bz2")
    fabio.cbfimage.CbfImage(data=data.astype(np.int32)).write(plain)
    if name != plain:
        raw = Path(plain).read_bytes()
        Path(name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else bz2.compress(raw))
        os.remove(plain)
    return path


def write_edf(path: Path, frames: list[np.ndarray]) -> Path:
    edf = fabio.edfimage.EdfImage(data=frames[0], header={"Title": "synthetic"})
    for frame in frames[1:]:
        edf.append_frame(data=frame)
    edf.write(str(path))
    return path


def write_tiff(path: Path, frames: list[np.ndarray]) -> Path:
    """Single or multi-page TIFF (PIL), e.g. uint16 or float32 pages."""
    pages = [Image.fromarray(frame) for frame in frames]
    pages[0].save(str(path), save_all=len(pages) > 1, append_images=pages[1:])
    return path


def write_h5(path: Path, datasets: dict, attrs: dict | None = None, **options) -> Path:
    """HDF5 file with ``{h5path: array}``; ``attrs`` maps an object path to its attributes."""
    with h5py.File(path, "w") as h5:
        for name, data in datasets.items():
            h5.create_dataset(name, data=data, **options)
        for name, values in (attrs or {}).items():
            h5[name].attrs.update(values)
    return path


def write_eiger(directory: Path, prefix: str, blocks: list[np.ndarray],
                pixel_mask: np.ndarray | None = None) -> Path:
    """An Eiger master file linking ``prefix_data_00000k.h5`` (bitshuffle-LZ4) as Dectris
    writes them, with the image numbers attributes and the detector pixel mask."""
    first = 1
    master = directory / f"{prefix}_master.h5"
    with h5py.File(master, "w") as h5:
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        data_group = entry.create_group("data")
        data_group.attrs["NX_class"] = "NXdata"
        for k, block in enumerate(blocks, start=1):
            data_name = f"{prefix}_data_{k:06d}.h5"
            with h5py.File(directory / data_name, "w") as data_file:
                dset = data_file.create_dataset("entry/data/data", data=block,
                                                chunks=(1, *block.shape[1:]),
                                                **hdf5plugin.Bitshuffle(cname="lz4"))
                dset.attrs["image_nr_low"] = np.int32(first)
                dset.attrs["image_nr_high"] = np.int32(first + len(block) - 1)
            data_group[f"data_{k:06d}"] = h5py.ExternalLink(data_name, "/entry/data/data")
            first += len(block)
        if pixel_mask is not None:
            entry.create_dataset("instrument/detector/detectorSpecific/pixel_mask",
                                 data=pixel_mask)
    return master


def assert_one_line(err: BaseException, *needles: str) -> None:
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def frames_and_errors(*args, **kwargs):
    results = list(open_frames(*args, errors="report", **kwargs))
    return ([r for r in results if isinstance(r, Frame)],
            [r for r in results if isinstance(r, FrameReadError)], results)


# --------------------------------------------------------------------------------------------
# expanding inputs
# --------------------------------------------------------------------------------------------


def test_directory_natural_order_known_extensions_only(tmp_path):
    for n in (10, 2, 1):
        write_cbf(tmp_path / f"img_{n}.cbf", pattern(seed=n))
    write_edf(tmp_path / "dark.edf", [pattern(seed=5)])
    (tmp_path / "setup.poni").write_text("Distance: 0.1\n")
    (tmp_path / "notes.txt").write_text("x")
    write_cbf(tmp_path / ".partial.cbf", pattern())          # hidden: in-progress copies
    (tmp_path / "sub").mkdir()
    write_cbf(tmp_path / "sub" / "deep_1.cbf", pattern(seed=7))

    names = [Path(i.path).name for i in expand_inputs(tmp_path)]
    assert names == ["dark.edf", "img_1.cbf", "img_2.cbf", "img_10.cbf"]
    names = [Path(i.path).relative_to(tmp_path).as_posix()
             for i in expand_inputs(str(tmp_path), recursive=True)]
    assert names == ["dark.edf", "img_1.cbf", "img_2.cbf", "img_10.cbf", "sub/deep_1.cbf"]


def test_globs_h5_paths_and_duplicates(tmp_path):
    for n in (3, 20, 1):
        write_cbf(tmp_path / f"run_{n}.cbf", pattern(seed=n))
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_cbf(tmp_path / "a" / "b" / "run_5.cbf", pattern(seed=5))
    write_h5(tmp_path / "s1.h5", {"x/img": np.zeros((2, 4, 4))})
    write_h5(tmp_path / "s2.h5", {"x/img": np.zeros((3, 4, 4))})

    items = expand_inputs(str(tmp_path / "run_*.cbf"))
    assert [Path(i.path).name for i in items] == ["run_1.cbf", "run_3.cbf", "run_20.cbf"]
    deep = expand_inputs(str(tmp_path / "**" / "run_*.cbf"), recursive=True)
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in deep] == [
        "a/b/run_5.cbf", "run_1.cbf", "run_3.cbf", "run_20.cbf"]   # natural order of paths

    items = expand_inputs([str(tmp_path / "s*.h5::/x/img"), tmp_path / "run_3.cbf",
                           str(tmp_path / "run_3.cbf"), str(tmp_path / "run_*.cbf")])
    assert [(Path(i.path).name, i.h5path) for i in items] == [
        ("s1.h5", "/x/img"), ("s2.h5", "/x/img"), ("run_3.cbf", None),
        ("run_1.cbf", None), ("run_20.cbf", None)]
    assert items[0].source == f"{tmp_path / 's1.h5'}::/x/img"
    assert count_frames(str(tmp_path / "s*.h5::x/img")) == 5   # leading '/' optional


@pytest.mark.parametrize("spec, needle", [
    ("missing.cbf", "no such file"),
    ("nothing_*.cbf", "no file matches"),
    ("notes.txt", "unknown file type '.txt'"),
    ("empty_dir", "no data files in this directory"),
    ("only_text/*", "no data file matches"),
    ("missing.h5::/entry/data/data", "no such file"),
])
def test_nothing_matched_names_the_pattern(tmp_path, spec, needle):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    pattern_text = str(tmp_path / spec)
    with pytest.raises(AzfilterError) as info:
        expand_inputs([pattern_text])
    assert_one_line(info.value, pattern_text, needle)
    with pytest.raises(FrameReadError):
        list(open_frames(pattern_text))
    frames, errors, _ = frames_and_errors(pattern_text)
    assert not frames and len(errors) == 1 and errors[0].source == pattern_text


def test_eiger_data_files_left_out_next_to_their_master(tmp_path):
    write_eiger(tmp_path, "scan", [pattern((1, 6, 8), seed=k) for k in (1, 2)])
    write_h5(tmp_path / "other_data_000001.h5", {"entry/data/data": np.zeros((1, 4, 4))})
    names = [Path(i.path).name for i in expand_inputs(tmp_path)]
    assert names == ["other_data_000001.h5", "scan_master.h5"]
    # an explicit data file is still read on its own
    assert len(expand_inputs(str(tmp_path / "scan_data_000002.h5"))) == 1


# --------------------------------------------------------------------------------------------
# reading every format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".cbf", ".cbf.gz", ".cbf.bz2"])
def test_cbf_plain_and_compressed(tmp_path, suffix):
    data = pattern((37, 29), seed=3)
    path = write_cbf(tmp_path / f"frame{suffix}", data)
    (frame,) = list(open_frames(path))
    assert frame.data.dtype == np.int32 and frame.data.shape == (37, 29)
    np.testing.assert_array_equal(frame.data, data)
    assert (frame.source, frame.index, frame.nframes) == (str(path), 0, 1)
    assert "X-Binary-Size-Fastest-Dimension" in frame.header


def test_multiframe_edf_streams_each_frame(tmp_path):
    stack = [pattern((16, 20), seed=s, dtype=np.uint16) for s in range(4)]
    path = write_edf(tmp_path / "series.edf", stack)
    frames = list(open_frames(path))
    assert [f.index for f in frames] == [0, 1, 2, 3] and {f.nframes for f in frames} == {4}
    for frame, expected in zip(frames, stack, strict=True):
        assert frame.data.dtype == np.uint16
        np.testing.assert_array_equal(frame.data, expected)
    assert count_frames(path) == 4
    assert [f.index for f in open_frames(InputItem(str(path)).select(range(1, 3)))] == [1, 2]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_multipage_tiff(tmp_path, dtype):
    stack = [pattern((12, 18), seed=s, dtype=dtype) for s in range(3)]
    path = write_tiff(tmp_path / "pages.tiff", stack)
    frames = list(open_frames(path))
    assert len(frames) == 3 and count_frames(path) == 3
    for frame, expected in zip(frames, stack, strict=True):
        assert frame.data.dtype == dtype and frame.nframes == 3
        np.testing.assert_array_equal(frame.data, expected)


def test_hdf5_stacks_2d_3d_4d_and_byte_order(tmp_path):
    stack = np.stack([pattern((10, 14), seed=s, dtype=np.uint32) for s in range(6)])
    path = write_h5(tmp_path / "d.h5", {
        "entry/data/data": stack,
        "single": stack[2],
        "grid": stack.reshape(2, 3, 10, 14),
        "big_endian": stack.astype(">i4"),
    }, compression="gzip")
    frames = list(open_frames(path))          # /entry/data/data found without a path
    assert [f.index for f in frames] == list(range(6))
    assert all(f.source == f"{path}::/entry/data/data" and f.nframes == 6 for f in frames)
    np.testing.assert_array_equal(np.stack([f.data for f in frames]), stack)

    (single,) = list(open_frames(f"{path}::/single"))
    np.testing.assert_array_equal(single.data, stack[2])
    grid = list(open_frames(f"{path}::/grid"))
    assert len(grid) == 6 and grid[4].nframes == 6
    np.testing.assert_array_equal(grid[4].data, stack[4])
    swapped = list(open_frames(f"{path}::/big_endian"))
    assert swapped[1].data.dtype == np.dtype("=i4") and swapped[1].data.dtype.isnative
    np.testing.assert_array_equal(swapped[1].data, stack[1].astype(np.int32))
    assert count_frames([path, f"{path}::/single", f"{path}::/grid"]) == 13


def test_hdf5_chunks_spanning_several_frames(tmp_path):
    stack = np.stack([pattern((300, 400), seed=s, dtype=np.uint16) for s in range(20)])
    path = tmp_path / "chunky.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("data", data=stack, chunks=(8, 300, 400), compression="gzip")
    frames = list(open_frames(f"{path}::/data"))
    assert len(frames) == 20
    np.testing.assert_array_equal(np.stack([f.data for f in frames]), stack)


def test_nexus_default_attributes_are_followed(tmp_path):
    image = pattern((8, 9), seed=1)
    other = pattern((8, 9), seed=2)
    path = write_h5(tmp_path / "nx.nxs", {
        "scan/plots/counts": np.stack([image, image]),
        "entry/data/data": np.stack([other]),
    }, attrs={"/": {"default": "scan"},
              "scan": {"NX_class": "NXentry", "default": "plots"},
              "scan/plots": {"NX_class": "NXdata", "signal": "counts"}})
    frames = list(open_frames(path))
    assert len(frames) == 2 and frames[0].source == f"{path}::/scan/plots/counts"
    np.testing.assert_array_equal(frames[1].data, image)
    assert describe_file(path)["h5path"] == "/scan/plots/counts"
    # a group given after '::' is searched the same way
    assert [f.source for f in open_frames(f"{path}::/scan")][0].endswith("::/scan/plots/counts")


def test_nexus_fallbacks(tmp_path):
    image = pattern((8, 9), seed=4, dtype=np.int16)
    # default signal is a 1-D pattern: not an image, so /entry/data/data is used
    one_d = write_h5(tmp_path / "oned.nxs", {"entry/result/I": np.arange(5.0),
                                             "entry/data/data": image[None]},
                     attrs={"/": {"default": "entry"}, "entry": {"default": "result"},
                            "entry/result": {"signal": "I"}})
    assert describe_file(one_d)["h5path"] == "/entry/data/data"
    # Lambda-like: frames in the NXdetector group, flat field and mask beside them
    lam = write_h5(tmp_path / "lambda.nxs", {
        "entry/instrument/detector/data": np.stack([image] * 3),
        "entry/instrument/detector/flatfield": np.ones((1, 8, 9), np.float32),
        "entry/instrument/detector/pixel_mask": (image[None] < 0).astype(np.uint32)},
        attrs={"entry": {"NX_class": "NXentry"},
               "entry/instrument": {"NX_class": "NXinstrument"},
               "entry/instrument/detector": {"NX_class": "NXdetector"}})
    assert describe_file(lam)["h5path"] == "/entry/instrument/detector/data"
    assert count_frames(lam) == 3
    mask = pixel_mask_for(lam)
    assert mask.shape == (8, 9) and np.count_nonzero(mask) == 2
    # nothing NeXus at all: the first dataset with two or more dimensions
    plain = write_h5(tmp_path / "plain.h5", {"a_vector": np.arange(4), "b_image": image})
    assert [f.source for f in open_frames(plain)] == [f"{plain}::/b_image"]
    assert pixel_mask_for(plain) is None


def test_eiger_master_reads_linked_data_files_as_one_stack(tmp_path, monkeypatch):
    blocks = [np.stack([pattern((6, 8), seed=10 * k + j, dtype=np.uint32) for j in range(n)])
              for k, n in enumerate((3, 2, 3))]
    mask = np.zeros((6, 8), np.uint32)
    mask[2, :] = 1          # gap
    mask[4, 5] = 8          # noisy
    master = write_eiger(tmp_path, "series", blocks, pixel_mask=mask)
    monkeypatch.chdir(tmp_path.parent)       # links resolve next to the master, not the cwd

    frames = list(open_frames(master))
    assert [f.index for f in frames] == list(range(8))
    assert {f.source for f in frames} == {f"{master}::/entry/data"} and frames[0].nframes == 8
    np.testing.assert_array_equal(np.stack([f.data for f in frames]), np.concatenate(blocks))
    assert frames[3].header["image_nr_low"] == 4
    assert count_frames(master) == 8

    np.testing.assert_array_equal(pixel_mask_for(master), mask)
    np.testing.assert_array_equal(pixel_mask_for(tmp_path / "series_data_000002.h5"), mask)
    info = describe_file(master)
    assert info["layout"] == "eiger-master" and info["nframes"] == 8
    assert info["compression"] == "bitshuffle+lz4" and info["pixel_mask"]["masked"] == 9
    assert info["data_files"]["data_000003"] == "series_data_000003.h5"
    # one linked data file read by its link path
    linked = list(open_frames(f"{master}::/entry/data/data_000002"))
    np.testing.assert_array_equal(linked[1].data, blocks[1][1])

    # a selection across data files (as the command line's sharding and reader blocks use)
    (item,) = expand_inputs(master)
    assert item.nframes == 8
    picked = item.select(range(2, 7, 2))
    assert count_frames(picked) == 3
    selected = list(open_frames(picked))
    assert [f.index for f in selected] == [2, 4, 6]
    np.testing.assert_array_equal(selected[1].data, blocks[1][1])
    np.testing.assert_array_equal(selected[2].data, blocks[2][1])

    # a missing data file: one error, and the frames after it keep their numbers
    os.remove(tmp_path / "series_data_000002.h5")
    frames, errors, _ = frames_and_errors(master)
    assert [f.index for f in frames] == [0, 1, 2, 5, 6, 7]
    assert len(errors) == 1 and "series_data_000002.h5" in str(errors[0])
    np.testing.assert_array_equal(frames[3].data, blocks[2][0])
    with pytest.raises(FrameReadError):
        list(open_frames(master))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_garbage_truncated_and_empty_files(tmp_path):
    rng = np.random.default_rng(0)
    garbage = tmp_path / "garbage.cbf"
    garbage.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.edf"
    empty.write_bytes(b"")
    cbf = write_cbf(tmp_path / "good.cbf", pattern((64, 64)))
    truncated_cbf = tmp_path / "cut.cbf"
    truncated_cbf.write_bytes(cbf.read_bytes()[: cbf.stat().st_size // 2])
    edf = write_edf(tmp_path / "good.edf", [pattern((64, 64))])
    truncated_edf = tmp_path / "cut.edf"
    truncated_edf.write_bytes(edf.read_bytes()[: edf.stat().st_size // 2])
    tif = write_tiff(tmp_path / "good.tif", [pattern((64, 64), dtype=np.float32)])
    truncated_tif = tmp_path / "cut.tif"
    truncated_tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])

    for bad, needle in [(garbage, "corrupt or truncated CBF"), (empty, "empty file"),
                        (truncated_cbf, "corrupt or truncated CBF"),
                        (truncated_edf, "incomplete"), (truncated_tif, "TIFF")]:
        with pytest.raises(FrameReadError) as info:
            list(open_frames(bad))
        assert_one_line(info.value, str(bad), needle)
        with pytest.raises(FrameReadError):
            load_image(bad)

    # reported in the stream, in order, and the good files around them still read
    frames, errors, results = frames_and_errors(
        [cbf, garbage, str(tmp_path / "gone.cbf"), truncated_edf, edf])
    assert [type(r).__name__ for r in results] == [
        "Frame", "FrameReadError", "FrameReadError", "FrameReadError", "Frame"]
    assert [e.source for e in errors] == [str(garbage), str(tmp_path / "gone.cbf"),
                                          str(truncated_edf)]


def test_hdf5_errors(tmp_path):
    stack = np.stack([pattern((32, 32), seed=s, dtype=np.uint16) for s in range(10)])
    good = write_h5(tmp_path / "good.h5", {"entry/data/data": stack, "vector": np.arange(9),
                                           "names": np.array([[b"a", b"b"]])},
                    compression="gzip")
    truncated = tmp_path / "cut.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("this is not HDF5\n" * 100)

    cases = [(str(truncated), str(truncated), "truncated"),
             (str(not_hdf5), str(not_hdf5), "not an HDF5 file"),
             (f"{good}::/entry/missing", f"{good}::/entry/missing", "no dataset or group"),
             (f"{good}::/vector", f"{good}::/vector", "1-D"),
             (f"{good}::/names", f"{good}::/names", "not numeric")]
    for spec, where, needle in cases:
        with pytest.raises(FrameReadError) as info:
            list(open_frames(spec))
        assert_one_line(info.value, where, needle)
        with pytest.raises(AzfilterError):
            describe_file(spec)
    with pytest.raises(FrameReadError) as info:
        count_frames(truncated)
    assert_one_line(info.value, str(truncated))


def test_corrupt_chunk_is_one_frame_error(tmp_path):
    stack = np.stack([pattern((64, 64), seed=s, dtype=np.uint16) for s in range(4)])
    path = tmp_path / "chunks.h5"
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset("data", data=stack, chunks=(1, 64, 64), compression="gzip",
                                 fletcher32=True)
        chunk = dset.id.get_chunk_info_by_coord((1, 0, 0))
    raw = bytearray(path.read_bytes())
    middle = chunk.byte_offset + chunk.size // 2
    raw[middle:middle + 8] = bytes(8)
    path.write_bytes(bytes(raw))

    frames, errors, _ = frames_and_errors(path)
    assert [f.index for f in frames] == [0, 2, 3]
    np.testing.assert_array_equal(frames[1].data, stack[2])
    assert len(errors) == 1 and errors[0].index == 1
    assert_one_line(errors[0], f"{path}::/data frame 1")
    with pytest.raises(FrameReadError) as info:
        list(open_frames(path))
    assert info.value.index == 1


def test_errors_argument_is_checked(tmp_path):
    with pytest.raises(ValueError):
        list(open_frames(tmp_path, errors="ignore"))


# --------------------------------------------------------------------------------------------
# single images, descriptions
# --------------------------------------------------------------------------------------------


def test_load_image_formats(tmp_path):
    image = pattern((20, 30), seed=9)
    np.testing.assert_array_equal(load_image(write_cbf(tmp_path / "m.cbf", image)), image)
    np.testing.assert_array_equal(load_image(write_edf(tmp_path / "m.edf", [image])), image)
    flat = pattern((20, 30), seed=2, dtype=np.float32)
    # masks come with any name: fabio recognises a TIFF named .mask by its content
    tif = write_tiff(tmp_path / "m.tif", [flat])
    odd_name = tmp_path / "calib.mask"
    shutil.copy(tif, odd_name)
    np.testing.assert_array_equal(load_image(odd_name), flat)
    np.save(tmp_path / "m.npy", image)
    np.testing.assert_array_equal(load_image(tmp_path / "m.npy"), image)
    h5 = write_h5(tmp_path / "f.h5", {"flat": flat[None], "two": np.stack([flat, flat]),
                                      "entry/data/data": image})
    loaded = load_image(f"{h5}::/flat")          # (1, rows, cols) is one image
    assert loaded.shape == (20, 30) and loaded.dtype == np.float32
    np.testing.assert_array_equal(load_image(h5), image)
    multi = write_edf(tmp_path / "multi.edf", [image, image])
    for spec in (f"{h5}::/two", multi):
        with pytest.raises(AzfilterError) as info:
            load_image(spec)
        assert_one_line(info.value, "2 frames", "single image")


def test_describe_file(tmp_path):
    cbf = describe_file(write_cbf(tmp_path / "a.cbf.gz", pattern((20, 30))))
    assert (cbf["format"], cbf["nframes"], cbf["shape"], cbf["dtype"]) == (
        "CBF", 1, (20, 30), "int32")
    assert cbf["compression"] == "gzip file+byte_offset"
    h5 = write_h5(tmp_path / "b.h5", {"entry/data/data": np.zeros((5, 20, 30), np.uint16)},
                  chunks=(1, 20, 30), compression="gzip", compression_opts=4, shuffle=True)
    info = describe_file(h5)
    assert info == {**info, "format": "HDF5", "h5path": "/entry/data/data", "nframes": 5,
                    "shape": (20, 30), "dtype": "uint16", "compression": "shuffle+gzip(4)",
                    "layout": "dataset", "pixel_mask": None}


# --------------------------------------------------------------------------------------------
# memory stays flat whatever the stack length
# --------------------------------------------------------------------------------------------

N_BIG, SHAPE_BIG = 500, (512, 512)      # 262 MB of uint16 if it were loaded whole
STACK_BYTES = N_BIG * SHAPE_BIG[0] * SHAPE_BIG[1] * 2


@pytest.fixture(scope="module")
def big_stack(tmp_path_factory) -> Path:
    """500 x 512x512 uint16 frames, bitshuffle-LZ4, written frame by frame."""
    path = tmp_path_factory.mktemp("big") / "stack.h5"
    base = np.random.default_rng(1).poisson(3, SHAPE_BIG).astype(np.uint16)
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset("entry/data/data", (N_BIG, *SHAPE_BIG), np.uint16,
                                 chunks=(1, *SHAPE_BIG), **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(N_BIG):
            dset[i] = base + np.uint16(i % 7)
    return path


def test_streaming_memory_is_flat_rss(big_stack):
    """Resident memory of a fresh process grows by far less than the stack while reading it
    all; the same measurement sees the growth when the stack is loaded whole (so it can fail).
    RSS is sampled from /proc/self/statm after every frame (ru_maxrss is not reliable in
    every sandbox)."""
    script = textwrap.dedent(f"""
        import json, os, h5py, hdf5plugin
        from azfilter.frames import open_frames
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        def rss_mb():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * page_mb
        stream = open_frames({str(big_stack)!r})
        first = next(stream)                   # imports and first frame done
        before = rss_mb()
        count, total, peak = 1, int(first.data.sum()), before
        for frame in stream:
            count += 1
            total += int(frame.data.sum())
            peak = max(peak, rss_mb())
        streamed = peak - before
        with h5py.File({str(big_stack)!r}, "r") as h5:
            whole = h5["entry/data/data"][()]
        loaded = rss_mb() - before
        print(json.dumps(dict(count=count, total=total, whole=int(whole.sum(dtype="u8")),
                              streamed=streamed, loaded=loaded)))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == N_BIG and result["total"] == result["whole"]
    stack_mb = STACK_BYTES / 2**20
    assert result["loaded"] > 0.5 * stack_mb, result          # the measurement works
    assert result["streamed"] < 0.1 * stack_mb, result        # ~ a few frames at most


def test_streaming_memory_is_flat_tracemalloc(big_stack):
    """Python/numpy allocations alive at once stay at a couple of frames."""
    frame_bytes = STACK_BYTES // N_BIG
    tracemalloc.start()
    try:
        count = 0
        for frame in open_frames(big_stack):
            count += 1
            assert frame.index == count - 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == N_BIG
    assert peak < 4 * frame_bytes, f"peak {peak / 2**20:.1f} MiB while streaming"


# --------------------------------------------------------------------------------------------
# real detector files
# --------------------------------------------------------------------------------------------

REAL_EXTENSIONS = (".cbf", ".cbf.gz", ".cbf.bz2", ".edf", ".tif", ".tiff", ".h5", ".hdf5",
                   ".nxs")
# where each real HDF5 file keeps its frames (from h5py listings; see testdata/README.md)
REAL_H5_DATASETS = {
    "testasapo1_1009_00002_proc.nxs": "/processed/result/data",      # NeXus @default chain
    "AgBehenate_228.hdf5": "/entry/data/data",
    "Pilatus1M.hdf5": "/data",
}


def real_files(testdata: Path) -> list[Path]:
    return sorted(p for p in testdata.rglob("*") if p.is_file()
                  and any(p.name.lower().endswith(ext) for ext in REAL_EXTENSIONS))


def expected_h5_dataset(path: Path) -> str:
    if path.name in REAL_H5_DATASETS:
        return REAL_H5_DATASETS[path.name]
    if "_m1_part" in path.name or "_m2_part" in path.name or "_m3_part" in path.name:
        return "/entry/instrument/detector/data"                    # Lambda: NXdetector
    return "/entry/data/data"                                       # Eiger data files


@pytest.mark.slow
def test_every_real_file_opens_like_fabio_and_h5py(testdata):
    files = real_files(testdata)
    assert len(files) >= 40, "test data incomplete"
    assert count_frames(testdata, recursive=True) == sum(count_frames(f) for f in files)
    checked = 0
    for path in files:
        frames = list(open_frames(path))
        # describe_file decodes the first frame: spare the slow bzip2 files a third decoding
        info = {"nframes": len(frames), "shape": frames[0].data.shape} if path.name.endswith(
            ".bz2") else describe_file(path)
        if path.name.endswith((".h5", ".hdf5", ".nxs")):
            h5path = expected_h5_dataset(path)
            with h5py.File(path, "r") as h5:
                dset = h5[h5path]
                n = dset.shape[0] if dset.ndim == 3 else 1
                assert info["h5path"] == h5path and info["dtype"] == str(dset.dtype), path
                assert len(frames) == n == info["nframes"], path
                for frame in frames:
                    expected = dset[frame.index] if dset.ndim == 3 else dset[()]
                    assert frame.source == f"{path}::{h5path}"
                    assert frame.data.dtype == expected.dtype, path
                    np.testing.assert_array_equal(frame.data, expected, err_msg=str(path))
        else:
            image = fabio.open(str(path))
            assert len(frames) == image.nframes == info["nframes"], path
            assert frames[0].data.dtype == image.data.dtype, path
            assert frames[0].data.shape == image.data.shape == info["shape"], path
            np.testing.assert_array_equal(frames[0].data, image.data, err_msg=str(path))
        checked += len(frames)
    assert checked >= 180


@pytest.mark.slow
def test_real_stacks_eiger_bslz4_and_lambda(testdata):
    eiger = sorted((testdata / "eiger_bslz4_format_only_synthetic").glob("*.h5"))
    assert len(eiger) == 2
    for path in eiger:
        frames = list(open_frames(path))
        assert len(frames) == 2 and frames[0].data.dtype == np.uint16
        assert describe_file(path)["compression"] == "bitshuffle+lz4"
        assert frames[0].data.any() and not np.array_equal(frames[0].data, frames[1].data)
    lam = sorted((testdata / "dioptas_lambda2M_3module_stack").glob("*_m1_part*.nxs"))
    frames = list(open_frames(lam))
    assert len(frames) == 50 and [f.index for f in frames[:10]] == list(range(10))
    assert frames[0].data.shape == (516, 1554) and frames[0].data.dtype == np.int16
    mask = pixel_mask_for(lam[0])
    assert mask is not None and mask.shape == (516, 1554)
    with h5py.File(lam[0], "r") as h5:
        np.testing.assert_array_equal(mask, h5["entry/instrument/detector/pixel_mask"][0])
    assert 0 < np.count_nonzero(mask) < mask.size


@pytest.mark.slow
def test_real_files_truncated(testdata, tmp_path):
    cbf = testdata / "dials_pilatus6M_eiger16M_MX_cbf" / "thau_3_2_0001.cbf"
    h5 = testdata / "eiger_bslz4_format_only_synthetic" / (
        "eiger2_simread7_2datafiles_4images_bslz4_data_000001.h5")
    for original in (cbf, h5):
        cut = tmp_path / original.name
        cut.write_bytes(original.read_bytes()[: original.stat().st_size * 2 // 3])
        frames, errors, _ = frames_and_errors(cut)
        assert not frames and len(errors) == 1
        assert_one_line(errors[0], str(cut))


@pytest.mark.slow
def test_real_mask_with_odd_extension(testdata):
    path = testdata / "lightform_DLS_I12_pixium_stack" / "DLS_CeO2_1200mm.mask"
    mask = load_image(path)
    np.testing.assert_array_equal(mask, fabio.open(str(path)).data)
    assert mask.shape == (1441, 1440) and 0 < np.count_nonzero(mask) < mask.size
