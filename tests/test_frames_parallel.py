"""Tests of azfilter.frames.iter_frames (the parallel, ordered stream) and of the direct HDF5
chunk reads behind it (azfilter.frames.chunks): bit-identical to h5py for every filter and
dtype, corrupt chunks as one failed frame, plan order, whole-file failures, caller buffers,
bounded read-ahead, early stop."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fabio
import h5py
import hdf5plugin
import numpy as np
import pytest
from test_frames import assert_one_line, pattern, write_cbf, write_edf, write_eiger, write_h5

import azfilter.frames.parallel as parallel
from azfilter.errors import FrameReadError
from azfilter.frames import Frame, InputItem, chunks, expand_inputs, iter_frames, open_frames
from azfilter.frames.chunks import direct_layout

REPO = Path(__file__).resolve().parent.parent

FILTERS = {
    "bitshuffle-lz4": dict(**hdf5plugin.Bitshuffle(cname="lz4")),
    "bitshuffle-lz4-small-blocks": dict(**hdf5plugin.Bitshuffle(nelems=256, cname="lz4")),
    "lz4": dict(**hdf5plugin.LZ4()),
    "gzip": dict(compression="gzip", compression_opts=4),
    "shuffle+gzip": dict(compression="gzip", shuffle=True),
    "shuffle": dict(shuffle=True),
    "none": {},
}
DTYPES = [np.uint16, np.uint32, np.int32]


def varied_frames(n: int, shape: tuple[int, int], dtype, seed: int = 0) -> np.ndarray:
    """Frames using the whole dtype range here and there (high bits, negative values), so
    that every bit plane and byte plane of the codecs is exercised."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    stack = rng.poisson(30, (n, *shape)).astype(dtype)
    stack[:, 0, :] = rng.integers(info.min, info.max, (n, shape[1]), dtype=dtype,
                                  endpoint=True)
    stack[:, -1, -5:] = info.max
    if info.min < 0:
        stack[:, 1, :3] = info.min
        stack[:, 2, :4] = -1
    return stack


def write_stack(path: Path, stack: np.ndarray, options: dict) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset("entry/data/data", data=stack, chunks=(1, *stack.shape[1:]),
                          **options)
    return path


class DirectReads:
    """Counts the frames that went through the direct chunk path (not through h5py)."""

    def __init__(self, monkeypatch):
        self.count = 0
        self._lock = threading.Lock()
        # bitshuffle-LZ4 chunks are read by read_bslz4_chunk, the others by read_exactly
        for name in ("read_exactly", "read_bslz4_chunk"):
            monkeypatch.setattr(parallel, name, self._counted(getattr(parallel, name)))

    def _counted(self, original):
        def counted(*args, **kwargs):
            with self._lock:
                self.count += 1
            return original(*args, **kwargs)
        return counted


def results(inputs, **kwargs) -> list:
    return list(iter_frames(inputs, **{"workers": 2, **kwargs}))


# --------------------------------------------------------------------------------------------
# direct chunk reads: bit-identical to h5py
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(40, 52), (21, 23)], ids=["2080px", "483px"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(FILTERS))
def test_direct_chunks_bit_identical_to_h5py(tmp_path, monkeypatch, name, dtype, shape):
    # 2080 pixels: not a multiple of the 256-element blocks (a partial last block); 483
    # pixels: bitshuffle stores the last 483 % 8 = 3 elements as they are (as for an Eiger 4M,
    # 2167 x 2070 pixels)
    stack = varied_frames(5, shape, dtype)
    path = write_stack(tmp_path / "stack.h5", stack, FILTERS[name])
    with h5py.File(path, "r") as h5:
        dset = h5["entry/data/data"]
        assert direct_layout(dset) is not None
        expected = [dset[i] for i in range(len(stack))]
    direct = DirectReads(monkeypatch)
    got = results(path, workers=3)
    assert direct.count == len(stack)                 # no frame went through h5py
    assert [type(r) for r in got] == [Frame] * len(stack)
    for frame, reference in zip(got, expected, strict=True):
        assert frame.data.dtype == reference.dtype and frame.data.shape == reference.shape
        np.testing.assert_array_equal(frame.data, reference)
        assert frame.source == f"{path}::/entry/data/data" and frame.nframes == len(stack)
    assert [f.index for f in got] == list(range(len(stack)))


@pytest.mark.parametrize("case", ["fletcher32", "big-endian", "several frames per chunk",
                                  "unchunked", "bitshuffle without LZ4"])
def test_other_layouts_fall_back_to_h5py(tmp_path, monkeypatch, case):
    dtype = np.int32
    shape = (16, 24)
    stack = varied_frames(4, shape, dtype)
    options = dict(FILTERS["bitshuffle-lz4"])
    chunks = (1, *shape)
    if case == "fletcher32":
        options = dict(compression="gzip", fletcher32=True)
    elif case == "big-endian":
        stack = stack.astype(">i4")
    elif case == "several frames per chunk":
        chunks = (2, *shape)
    elif case == "bitshuffle without LZ4":
        options = dict(**hdf5plugin.Bitshuffle(cname="none"))
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        if case == "unchunked":
            h5.create_dataset("entry/data/data", data=stack)
        else:
            h5.create_dataset("entry/data/data", data=stack, chunks=chunks, **options)
    direct = DirectReads(monkeypatch)
    got = results(path)
    assert direct.count == 0
    for frame, reference in zip(got, stack, strict=True):
        np.testing.assert_array_equal(frame.data, reference)
        assert frame.data.dtype.isnative
    assert len(got) == len(stack)


def test_eiger_master_direct_reads_follow_external_links(tmp_path, monkeypatch):
    blocks = [varied_frames(3, (24, 32), np.uint32, seed=s) for s in (1, 2)]
    master = write_eiger(tmp_path, "scan", blocks)
    direct = DirectReads(monkeypatch)
    got = results(master, workers=3)
    assert direct.count == 6
    assert [f.index for f in got] == list(range(6))
    np.testing.assert_array_equal(np.stack([f.data for f in got]), np.concatenate(blocks))
    assert {f.source for f in got} == {f"{master}::/entry/data"}


@pytest.mark.parametrize("name", ["bitshuffle-lz4", "lz4", "gzip", "shuffle+gzip"])
@pytest.mark.parametrize("damage", ["garbled", "zeroed header", "zeroed tail"])
def test_corrupt_chunk_is_one_failed_frame(tmp_path, name, damage):
    stack = varied_frames(4, (48, 64), np.uint32)
    path = write_stack(tmp_path / "stack.h5", stack, FILTERS[name])
    with h5py.File(path, "r") as h5:
        chunk = h5["entry/data/data"].id.get_chunk_info_by_coord((1, 0, 0))
    raw = bytearray(path.read_bytes())
    if damage == "garbled":
        start = chunk.byte_offset + 16
        raw[start:start + chunk.size - 32] = np.random.default_rng(3).integers(
            0, 256, chunk.size - 32, dtype=np.uint8).tobytes()
    elif damage == "zeroed header":
        raw[chunk.byte_offset:chunk.byte_offset + 16] = bytes(16)
    else:                                   # the stream stops half-way (as a cut copy would)
        half = chunk.byte_offset + chunk.size // 2
        raw[half:chunk.byte_offset + chunk.size] = bytes(chunk.byte_offset + chunk.size - half)
    path.write_bytes(bytes(raw))
    # h5py fails on it too (checked first: after a stream that raised, the reader's handle
    # on the file may live until its traceback is collected, and HDF5 then refuses a second
    # open with other properties)
    with h5py.File(path, "r") as h5, pytest.raises(OSError):
        h5["entry/data/data"][1]
    got = results(path)
    assert len(got) == 4
    for index, result in enumerate(got):
        if index == 1:
            assert isinstance(result, FrameReadError), (index, result)
            assert result.index == index
            assert_one_line(result, f"{path}::/entry/data/data frame {index}")
        else:
            assert isinstance(result, Frame), (index, result)
            np.testing.assert_array_equal(result.data, stack[index])
    with pytest.raises(FrameReadError) as info:
        list(iter_frames(path, workers=2, errors="raise"))
    assert info.value.index == 1


# --------------------------------------------------------------------------------------------
# the stream: order, errors, selections, buffers
# --------------------------------------------------------------------------------------------


def test_same_results_as_open_frames_in_plan_order(tmp_path):
    for n in range(1, 4):
        write_cbf(tmp_path / f"img_{n}.cbf", pattern(seed=n))
    write_edf(tmp_path / "multi.edf", [pattern(seed=10 + k) for k in range(3)])
    write_h5(tmp_path / "gz.h5", {"entry/data/data": np.stack(
        [pattern(seed=20 + k, dtype=np.uint16) for k in range(4)])}, compression="gzip",
        chunks=(1, 24, 32))
    write_h5(tmp_path / "plain.h5", {"data": pattern(seed=30)})
    (tmp_path / "garbage.cbf").write_bytes(b"not a cbf" * 100)
    write_eiger(tmp_path, "scan", [pattern((2, 24, 32), seed=40), pattern((3, 24, 32), seed=41)])
    items = expand_inputs(tmp_path)
    expected = list(open_frames(items, errors="report"))
    for workers in (1, 4):
        got = list(iter_frames(items, workers=workers, read_ahead=3))
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            assert type(mine) is type(theirs)
            assert mine.source == theirs.source
            if isinstance(mine, Frame):
                assert (mine.index, mine.nframes) == (theirs.index, theirs.nframes)
                assert mine.header == theirs.header
                np.testing.assert_array_equal(mine.data, theirs.data)
                assert mine.data.dtype == theirs.data.dtype
            else:
                # a CBF counts as one frame without being read: its failure is frame 0
                assert mine.index == 0 and theirs.index is None
                assert mine.reason == theirs.reason


def test_selections_and_repeated_items(tmp_path):
    stack = np.stack([pattern(seed=k, dtype=np.uint16) for k in range(9)])
    path = write_h5(tmp_path / "s.h5", {"entry/data/data": stack}, chunks=(1, 24, 32),
                    **hdf5plugin.Bitshuffle(cname="lz4"))
    item = expand_inputs(path)[0]
    plan = [item.select(range(1, 8, 3)), item.select(range(0, 2)), item.select(range(7, 50))]
    got = results(plan, workers=3)
    assert [f.index for f in got] == [1, 4, 7, 0, 1, 7, 8]
    for frame in got:
        np.testing.assert_array_equal(frame.data, stack[frame.index])


def test_whole_file_failures(tmp_path):
    stack = np.stack([pattern(seed=k, dtype=np.uint16) for k in range(5)])
    counted = write_h5(tmp_path / "counted.h5", {"entry/data/data": stack})
    item = expand_inputs(counted)[0]
    assert item.nframes == 5                     # the count is known ...
    selected = item.select(range(1, 4))
    counted.write_bytes(b"gone" * 10)            # ... then the file breaks
    cut_cbf = tmp_path / "cut.cbf"
    good = write_cbf(tmp_path / "good.cbf", pattern((64, 64)))
    cut_cbf.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("not HDF5\n" * 50)
    bad_md5 = tmp_path / "bad_md5.cbf"
    content = bytearray(good.read_bytes())
    content[-100] ^= 0x01                        # one bit of the binary section flipped
    bad_md5.write_bytes(bytes(content))
    got = results([selected, cut_cbf, not_hdf5, tmp_path / "missing_*.cbf", good, bad_md5])
    assert [type(r).__name__ for r in got] == ["FrameReadError"] * 6 + ["Frame",
                                                                       "FrameReadError"]
    assert got[7].index == 0 and "checksum" in got[7].reason.lower()
    assert_one_line(got[7], str(bad_md5))
    assert [(e.source, e.index) for e in got[:6]] == [
        (str(counted), 1), (str(counted), 2), (str(counted), 3), (str(cut_cbf), 0),
        (str(not_hdf5), None), (str(tmp_path / "missing_*.cbf"), None)]
    for error in got[:6]:
        assert_one_line(error, error.source)
    assert "corrupt or truncated CBF" in got[3].reason
    assert "not an HDF5 file" in got[4].reason


def test_eiger_missing_data_file_is_one_error(tmp_path):
    master = write_eiger(tmp_path, "scan", [pattern((2, 24, 32), seed=1),
                                            pattern((2, 24, 32), seed=2),
                                            pattern((2, 24, 32), seed=3)])
    os.remove(tmp_path / "scan_data_000002.h5")
    got = results(master)
    assert [(type(r).__name__, r.index) for r in got] == [
        ("Frame", 0), ("Frame", 1), ("FrameReadError", None), ("Frame", 4), ("Frame", 5)]
    assert "scan_data_000002.h5" in got[2].reason


def test_frames_are_decoded_into_the_callers_buffers(tmp_path, monkeypatch):
    write_stack(tmp_path / "a_direct.h5", varied_frames(3, (24, 32), np.uint32),
                FILTERS["bitshuffle-lz4"])
    write_stack(tmp_path / "b_fallback.h5", varied_frames(2, (24, 32), np.uint16),
                dict(compression="gzip", fletcher32=True))
    write_cbf(tmp_path / "c.cbf", pattern((24, 32)))
    handed: list[np.ndarray] = []

    def buffer(shape, dtype):
        array = np.full(shape, 77, dtype)
        handed.append(array)
        return array

    got = results(sorted(tmp_path.iterdir()), buffer=buffer)
    assert len(got) == 6 and all(isinstance(f, Frame) for f in got)
    for frame in got:
        assert any(frame.data is array for array in handed), frame
    expected = list(open_frames(sorted(tmp_path.iterdir())))
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine.data, theirs.data)
    # a buffer callable that has none to give: plain arrays
    got = results(sorted(tmp_path.iterdir()), buffer=lambda shape, dtype: None)
    assert all(isinstance(f, Frame) for f in got) and len(got) == 6


def test_read_ahead_bounds_the_frames_in_flight(tmp_path):
    stack = np.stack([pattern(seed=k, dtype=np.uint16) for k in range(40)])
    path = write_h5(tmp_path / "s.h5", {"entry/data/data": stack}, chunks=(1, 24, 32),
                    **hdf5plugin.Bitshuffle(cname="lz4"))
    allocated = []
    lock = threading.Lock()

    def buffer(shape, dtype):
        with lock:
            allocated.append(1)
        return None

    for workers, read_ahead in ((1, 1), (3, 2), (4, None)):
        allocated.clear()
        limit = 2 * workers + 2 if read_ahead is None else read_ahead
        taken = 0
        for _frame in iter_frames(path, workers=workers, buffer=buffer,
                                  read_ahead=read_ahead):
            taken += 1
            threading.Event().wait(0.002)          # a slow consumer: the readers run ahead
            assert len(allocated) <= taken + limit
        assert taken == 40


def test_stopping_early_releases_threads_and_files(tmp_path):
    stack = np.stack([pattern(seed=k, dtype=np.uint16) for k in range(30)])
    path = write_h5(tmp_path / "s.h5", {"entry/data/data": stack}, chunks=(1, 24, 32),
                    **hdf5plugin.Bitshuffle(cname="lz4"))
    cbfs = [write_cbf(tmp_path / f"f{k}.cbf", pattern(seed=k)) for k in range(6)]

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    threads_before, fds_before = threading.active_count(), open_fds()
    for inputs in ([path], cbfs, [path, *cbfs]):
        stream = iter_frames(inputs, workers=3)
        assert isinstance(next(stream), Frame)
        next(stream)
        stream.close()
    assert threading.active_count() == threads_before
    assert open_fds() == fds_before


def test_arguments_are_checked(tmp_path):
    for kwargs in (dict(workers=0), dict(workers=1, read_ahead=0),
                   dict(workers=1, errors="ignore")):
        with pytest.raises(ValueError):
            list(iter_frames(tmp_path, **kwargs))


def test_streaming_memory_is_flat_rss(tmp_path):
    """Resident memory grows by a few frames at most while 2 workers stream a stack 60 times
    larger than read_ahead frames; loading it whole shows the measurement can fail."""
    n, shape = 300, (512, 512)
    path = tmp_path / "stack.h5"
    base = np.random.default_rng(1).poisson(3, shape).astype(np.uint32)
    with h5py.File(path, "w") as h5:
        dset = h5.create_dataset("entry/data/data", (n, *shape), np.uint32,
                                 chunks=(1, *shape), **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(n):
            dset[i] = base + np.uint32(i % 7)
    script = textwrap.dedent(f"""
        import json, os, h5py, hdf5plugin
        from azfilter.frames import iter_frames
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        def rss_mb():
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * page_mb
        stream = iter_frames({str(path)!r}, workers=2)
        first = next(stream)
        before = rss_mb()
        count, total, peak = 1, int(first.data.sum()), before
        for frame in stream:
            count += 1
            total += int(frame.data.sum())
            peak = max(peak, rss_mb())
        streamed = peak - before
        with h5py.File({str(path)!r}, "r") as h5:
            whole = h5["entry/data/data"][()]
        loaded = rss_mb() - before
        print(json.dumps(dict(count=count, total=total, whole=int(whole.sum(dtype="u8")),
                              streamed=streamed, loaded=loaded)))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == n and result["total"] == result["whole"]
    stack_mb = n * shape[0] * shape[1] * 4 / 2**20
    assert result["loaded"] > 0.5 * stack_mb, result           # the measurement works
    assert result["streamed"] < 0.1 * stack_mb, result         # read_ahead (6) frames + scratch


# --------------------------------------------------------------------------------------------
# real detector files
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_eiger_files_direct_and_identical(testdata, monkeypatch):
    files = sorted((testdata / "eiger_bslz4_format_only_synthetic").glob("*.h5"))
    assert len(files) == 2
    direct = DirectReads(monkeypatch)
    got = results(files, workers=2)
    assert direct.count == 4 and len(got) == 4
    for frame in got:
        path = frame.source.split("::")[0]
        with h5py.File(path, "r") as h5:
            np.testing.assert_array_equal(frame.data, h5["entry/data/data"][frame.index])


@pytest.mark.slow
def test_real_cbf_files_identical_to_fabio(testdata):
    files = sorted(p for p in testdata.rglob("*") if p.name.endswith((".cbf", ".cbf.gz",
                                                                       ".cbf.bz2")))
    assert len(files) >= 9
    got = results([InputItem(str(p)) for p in files], workers=2)
    assert len(got) == len(files)
    for frame, path in zip(got, files, strict=True):
        assert isinstance(frame, Frame), frame
        image = fabio.open(str(path))
        assert frame.data.dtype == image.data.dtype
        np.testing.assert_array_equal(frame.data, image.data)


def test_bitshuffle_block_stored_at_its_decoded_size(tmp_path):
    """A bitshuffle-LZ4 block whose LZ4 data is exactly as long as the block decodes to is
    still LZ4 data (HDF5's plain LZ4 filter would store such a block as is): the reader
    decodes it as h5py does."""
    from bslz4_cases import lz4_block_of_decoded_size

    rng = np.random.default_rng(5)
    shuffled = bytearray(rng.integers(0, 256, 8192, dtype=np.uint8).tobytes())
    shuffled[8150:8187] = bytes([shuffled[8149]]) * 37
    chunk = (struct.pack(">QI", 8192, 8192) + struct.pack(">I", 8192)
             + lz4_block_of_decoded_size(bytes(shuffled)))
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as h5:
        dataset = h5.create_dataset("data", shape=(2, 64, 128), dtype=np.uint8,
                                    chunks=(1, 64, 128), **FILTERS["bitshuffle-lz4"])
        for index in range(2):
            dataset.id.write_direct_chunk((index, 0, 0), chunk)
    with h5py.File(path, "r") as h5:
        expected = h5["data"][()]
    got = results(path)
    assert [f.index for f in got] == [0, 1]
    np.testing.assert_array_equal(np.stack([f.data for f in got]), expected)


@pytest.mark.parametrize("name", ["bitshuffle-lz4", "gzip", "none"])
def test_raw_chunks_through_read_direct_chunk_when_offsets_are_unusable(tmp_path, monkeypatch,
                                                                       name):
    """Without chunk offsets (old HDF5, a driver other than sec2) the raw bytes come from
    h5py's read_direct_chunk and are still decoded outside h5py; corrupt ones still fail
    alone."""
    stack = varied_frames(4, (21, 23), np.uint32)
    path = write_stack(tmp_path / "s.h5", stack, FILTERS[name])

    def no_offsets(*args):
        raise AttributeError("get_chunk_info_by_coord")

    decoded = []
    original = parallel.decode_chunk
    monkeypatch.setattr(parallel, "chunk_location", no_offsets)
    monkeypatch.setattr(parallel, "cached_chunk_table", lambda *args: None)   # no chunk_iter
    monkeypatch.setattr(parallel, "decode_chunk",
                        lambda raw, layout, out: decoded.append(1) or original(raw, layout, out))
    direct = DirectReads(monkeypatch)
    got = results(path)
    assert len(decoded) == 4 and direct.count == 0
    np.testing.assert_array_equal(np.stack([f.data for f in got]), stack)

    if name != "none":
        with h5py.File(path, "r") as h5:
            chunk = h5["entry/data/data"].id.get_chunk_info_by_coord((2, 0, 0))
        raw = bytearray(path.read_bytes())
        raw[chunk.byte_offset:chunk.byte_offset + 16] = bytes(16)
        path.write_bytes(bytes(raw))
        got = results(path)
        assert [type(r).__name__ for r in got] == ["Frame", "Frame", "FrameReadError", "Frame"]
        assert got[2].index == 2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(40, 52), (45, 47)], ids=["2080px", "2115px"])
def test_bitshuffle_lz4_small_blocks(tmp_path, monkeypatch, dtype, shape):
    """Bitshuffle-LZ4 chunks of many small blocks decoded by the reader: the same frames as
    h5py's, with a partial last block, a stored tail, blocks that compress to a few bytes
    (zeros), raw bytes from read_direct_chunk left as they are, and a corrupt block failing its
    frame only."""
    itemsize = np.dtype(dtype).itemsize
    stack = varied_frames(4, shape, dtype)
    stack[2] = 0
    path = write_stack(tmp_path / "stack.h5", stack, FILTERS["bitshuffle-lz4-small-blocks"])
    with h5py.File(path, "r") as h5:
        dset = h5["entry/data/data"]
        raw = dset.id.read_direct_chunk((2, 0, 0))[1]
        layout = chunks.bslz4_layout(raw, stack[2].size, itemsize)
        assert layout.n_blocks > 6
        assert np.diff(layout.block_ranges, axis=1).min() < 16   # zeros: tiny blocks
    direct = DirectReads(monkeypatch)
    got = results(path, workers=2)
    assert direct.count == len(stack)
    np.testing.assert_array_equal(np.stack([f.data for f in got]), stack)

    # h5py's read-only bytes are decoded as they are
    with h5py.File(path, "r") as h5:
        dset = h5["entry/data/data"]
        layout = direct_layout(dset)
        raw = dset.id.read_direct_chunk((1, 0, 0))[1]
        before = bytes(raw)
        out = np.empty(shape, dtype)
        chunks.decode_chunk(raw, layout, out)
        np.testing.assert_array_equal(out, stack[1])
        assert raw == before

    # a garbled block near the end: that frame fails, the others are read
    with h5py.File(path, "r") as h5:
        info = h5["entry/data/data"].id.get_chunk_info_by_coord((1, 0, 0))
        blocks = chunks.bslz4_layout(h5["entry/data/data"].id.read_direct_chunk((1, 0, 0))[1],
                                     stack[1].size, itemsize)
    start, stop = (int(x) for x in blocks.block_ranges[-2])
    data = bytearray(path.read_bytes())
    data[info.byte_offset + start:info.byte_offset + stop] = bytes([0xF0]) * (stop - start)
    path.write_bytes(bytes(data))
    got = results(path, workers=2)
    assert [type(r).__name__ for r in got] == ["Frame", "FrameReadError", "Frame", "Frame"]
    for index in (0, 2, 3):
        np.testing.assert_array_equal(got[index].data, stack[index])


# --------------------------------------------------------------------------------------------
# where the chunks are: one walk of the chunk index, or one lookup per frame
# --------------------------------------------------------------------------------------------


def test_chunk_table_agrees_with_lookups_frame_by_frame(tmp_path):
    """The walk (chunk_table) gives each frame chunk_location's answer: stacks of one and two
    leading dimensions, a chunk never written (fill value: not stored), a chunk written with
    its filter skipped (h5py must read it), and chunks written out of order."""
    shape = (12, 16)
    stack = varied_frames(6, shape, np.uint32)
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("plain", data=stack, chunks=(1, *shape), **FILTERS["bitshuffle-lz4"])
        sparse = h5.create_dataset("sparse", shape=(6, *shape), dtype=np.uint32,
                                   chunks=(1, *shape), **FILTERS["gzip"])
        for index in (5, 0, 3):                 # 1, 2 and 4 never written
            sparse[index] = stack[index]
        sparse.id.write_direct_chunk((4, 0, 0), stack[4].tobytes(), filter_mask=1)
        h5.create_dataset("grid", data=stack.reshape(2, 3, *shape), chunks=(1, 1, *shape),
                          **FILTERS["lz4"])
    with h5py.File(path, "r") as h5:
        for name in ("plain", "sparse", "grid"):
            dataset = h5[name]
            layout = direct_layout(dataset)
            assert layout is not None and layout.pread, name
            table = chunks.chunk_table(dataset, layout)
            looked_up = {local: chunks.chunk_location(dataset, layout, local)
                         for local in range(6)}
            if name == "sparse":                # unwritten: not in the walk; skipped filter: None
                assert table.seen() == [0, 3, 4, 5] and len(table) == 4 and table[4] is None
                assert 1 not in table and 6 not in table and -1 not in table
                with pytest.raises(KeyError):
                    table[2]
                assert [local for local, place in looked_up.items() if place] == [0, 3, 5]
                assert {local: looked_up[local] for local in table.seen()} == \
                    {local: table[local] for local in table.seen()}
                grown = chunks.ChunkTable(3)    # a chunk beyond the frames at the walk's start
                grown.record(5, (10, 20))
                assert 5 not in grown and len(grown) == 0
            else:
                assert {local: table[local] for local in table.seen()} == looked_up
                assert None not in looked_up.values()
                assert len({place[0] for place in looked_up.values()}) == 6


def test_chunk_tables_walked_when_worth_it_and_kept_per_file(tmp_path, monkeypatch):
    stack = varied_frames(1000, (4, 4), np.uint16)
    path = write_stack(tmp_path / "stack.h5", stack, FILTERS["none"])
    walks = []
    walk = chunks.chunk_table
    monkeypatch.setattr(chunks, "chunk_table", lambda *args: walks.append(1) or walk(*args))
    monkeypatch.setattr(chunks, "_tables", type(chunks._tables)())
    with h5py.File(path, "r") as h5:
        dataset = h5["entry/data/data"]
        layout = direct_layout(dataset)
        # a few frames of a long stack: looked up one by one
        assert chunks.cached_chunk_table(dataset, layout, chunks.WALK_FRAMES - 1) is None
        assert walks == []
        # a block of frames: one walk, kept for the next blocks of the same file
        table = chunks.cached_chunk_table(dataset, layout, chunks.WALK_FRAMES)
        assert len(table) == 1000 and walks == [1]
        assert chunks.cached_chunk_table(dataset, layout, 1) is table and walks == [1]
        # or a good share of a short stack
        short = write_stack(tmp_path / "short.h5", stack[:16], FILTERS["none"])
        with h5py.File(short, "r") as h5_short:
            small = h5_short["entry/data/data"]
            assert chunks.cached_chunk_table(small, direct_layout(small), 2) is not None
            assert walks == [1, 1]

        class WithoutWalk:                      # h5py or HDF5 too old for chunk_iter
            id = object()

        assert walk(WithoutWalk(), layout) is None

        class WalkFails:
            class id:                           # noqa: N801 - stands for dataset.id
                @staticmethod
                def chunk_iter(visit):
                    raise RuntimeError("H5Dchunk_iter failed")

        assert walk(WalkFails(), layout) is None
    # the file grows (a stack still being written): walked again
    with h5py.File(path, "a") as h5:
        h5["entry/data/data"].attrs["note"] = "x" * 100_000
    with h5py.File(path, "r") as h5:
        dataset = h5["entry/data/data"]
        assert chunks.cached_chunk_table(dataset, direct_layout(dataset), 1) is None
        assert chunks.cached_chunk_table(dataset, direct_layout(dataset), 100) is not None
        assert walks == [1, 1, 1]


@pytest.mark.parametrize("selection", ["all", "few"])
def test_the_planner_walks_the_chunk_index_for_many_frames(tmp_path, monkeypatch, selection):
    """Reading a stack's frames looks no chunk up on its own (one walk); a few frames of a
    long stack are looked up one by one, as is a frame written after the walk. The frames
    are h5py's either way."""
    stack = varied_frames(100, (10, 12), np.int32)
    path = write_stack(tmp_path / "stack.h5", stack, FILTERS["bitshuffle-lz4"])
    lookups = []
    lookup = parallel.chunk_location
    monkeypatch.setattr(parallel, "chunk_location",
                        lambda *args: lookups.append(args[2]) or lookup(*args))
    monkeypatch.setattr(chunks, "_tables", type(chunks._tables)())
    direct = DirectReads(monkeypatch)
    wanted = range(100) if selection == "all" else range(3, 100, 40)
    got = results([expand_inputs(path)[0].select(wanted)], workers=3)
    assert [f.index for f in got] == list(wanted)
    for frame in got:
        np.testing.assert_array_equal(frame.data, stack[frame.index])
    assert direct.count == len(wanted)
    assert lookups == ([] if selection == "all" else list(wanted))
    if selection == "all":
        # a table that misses frame 7 (walked before it was written): frame 7 is looked up
        (table,) = chunks._tables.values()
        table.offsets[7] = table.NOT_SEEN
        got = results([expand_inputs(path)[0].select(range(5, 10))], workers=2)
        assert lookups == [7] and [f.index for f in got] == list(range(5, 10))
        np.testing.assert_array_equal(np.stack([f.data for f in got]), stack[5:10])
