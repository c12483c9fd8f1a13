"""azfilter's own miniCBF reader (azfilter/frames/cbf.py, kernels/_cbf.pyx) and single-frame
EDF reader (azfilter/frames/edf.py) against fabio.

- every CBF of the real test data: the reader takes it, pixels and header identical to fabio's;
- synthetic files written here (a small spec-following byte-offset encoder) for every element
  type, every escape width (8/16/32/64 bits), both signs, and non-minimal escapes: identical
  to the values written and to fabio;
- the decoder on random bytes never reads out of bounds and agrees with a pure-Python decoder;
- damaged files (truncated, bad checksum, cut escape) are one failed frame through
  ``iter_frames`` and through the command, never a crash; unusual files go to fabio.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import struct
from pathlib import Path

import fabio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from azfilter.errors import FrameReadError
from azfilter.frames import Frame, InputItem, iter_frames, load_image, open_frames
from azfilter.frames import cbf as cbf_reader
from azfilter.frames.fabio_formats import _FabioSource

pytestmark = pytest.mark.skipif(not cbf_reader.available(),
                                reason="compiled CBF decoder (azfilter._cbf) not built")

ELEMENT_TYPES = {np.dtype(v): k for k, v in cbf_reader.ELEMENT_TYPES.items()}


# ------------------------------------------------------------------------ a miniCBF writer

def encode_byte_offset(values: np.ndarray, widen: int = 0) -> bytes:
    """The CBF byte-offset stream of ``values`` (as Python ints), shortest escape for each
    delta, or ``widen`` more escape levels than needed (valid, and written by some tools)."""
    out = bytearray()
    last = 0
    for value in (int(v) for v in values.ravel()):
        delta, last = value - last, value
        delta = (delta + 2**63) % 2**64 - 2**63        # 64-bit arithmetic, as writers do
        level = 0 if -127 <= delta <= 127 else 1 if -32767 <= delta <= 32767 else \
            2 if -(2**31) + 1 <= delta <= 2**31 - 1 else 3
        level = min(3, level + widen)
        if level == 0:
            out += struct.pack("<b", delta)
        elif level == 1:
            out += b"\x80" + struct.pack("<h", delta)
        elif level == 2:
            out += b"\x80\x00\x80" + struct.pack("<i", delta)
        else:
            out += b"\x80\x00\x80\x00\x00\x00\x80" + struct.pack("<q", delta)
    return bytes(out)


def minicbf(data: np.ndarray, *, payload: bytes | None = None, md5: bool = True,
            conversions: str = "x-CBF_BYTE_OFFSET", element: str | None = None,
            newline: bytes = b"\r\n", size: int | None = None) -> bytes:
    """A miniCBF as a Pilatus writes it (CIF header, MIME section, padding)."""
    payload = encode_byte_offset(data) if payload is None else payload
    element = ELEMENT_TYPES[data.dtype] if element is None else element
    n = newline
    lines = [b"###CBF: VERSION 1.5, written by tests/test_cbf.py", b"", b"data_test", b"",
             b"_array_data.header_convention \"PILATUS_1.2\"",
             b"_array_data.header_contents", b";", b"# Detector: synthetic", b";", b"",
             b"_array_data.data", b";", b"--CIF-BINARY-FORMAT-SECTION--",
             b"Content-Type: application/octet-stream;",
             f'     conversions="{conversions}"'.encode(),
             b"Content-Transfer-Encoding: BINARY",
             f"X-Binary-Size: {len(payload) if size is None else size}".encode(),
             b"X-Binary-ID: 1", f'X-Binary-Element-Type: "{element}"'.encode(),
             b"X-Binary-Element-Byte-Order: LITTLE_ENDIAN"]
    if md5:
        lines.append(b"Content-MD5: " + base64.b64encode(hashlib.md5(payload).digest()))
    lines += [f"X-Binary-Number-of-Elements: {data.size}".encode(),
              f"X-Binary-Size-Fastest-Dimension: {data.shape[1]}".encode(),
              f"X-Binary-Size-Second-Dimension: {data.shape[0]}".encode(),
              b"X-Binary-Size-Padding: 4095", b""]
    end = n + b"--CIF-BINARY-FORMAT-SECTION----" + n + b";" + n + n
    return n.join(lines) + n + cbf_reader.BINARY_START + payload + bytes(4095) + end


def decode_reference(stream: bytes, count: int) -> list[int]:
    """Pure-Python byte-offset decoder (the specification, unbounded ints): the values
    decoded before the stream ends."""
    values, last, i = [], 0, 0
    while len(values) < count and i < len(stream):
        if stream[i] != 0x80:
            delta, i = struct.unpack_from("<b", stream, i)[0], i + 1
        elif i + 3 > len(stream):
            break
        elif (delta := struct.unpack_from("<h", stream, i + 1)[0]) != -32768:
            i += 3
        elif i + 7 > len(stream):
            break
        elif (delta := struct.unpack_from("<i", stream, i + 3)[0]) != -(2**31):
            i += 7
        elif i + 15 > len(stream):
            break
        else:
            delta, i = struct.unpack_from("<q", stream, i + 7)[0], i + 15
        last += delta
        values.append(last)
    return values


def escapes_of_every_width(dtype: np.dtype, n: int = 4000, seed: int = 0) -> np.ndarray:
    """Values of ``dtype`` whose deltas need 8, 16, 32 and (for 32/64-bit types) 64-bit
    escapes, up and down, including the extremes of the type."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    values = [0, 127, 0, -127 if info.min < 0 else 1, 128, 0, 32767, 0, 32768, 0,
              2**31 - 1, 0, 2**31, 0, info.max, info.min, info.max, 0, info.min, 1]
    steps = [1, 200, 40_000, 2**31, 2**40]
    while len(values) < n:
        step = steps[rng.integers(0, len(steps))]
        values.append(values[-1] + int(rng.integers(-step, step + 1)))
    array = np.array([min(max(v, int(info.min)), int(info.max)) for v in values[:n]],
                     dtype=object)
    return array.astype(dtype).reshape(-1, 50)


def fabio_read(path: Path) -> tuple[np.ndarray, dict]:
    image = fabio.open(str(path))
    return image.data, dict(image.header)


# ------------------------------------------------------------------------ real files

@pytest.mark.slow
def test_every_testdata_cbf_is_read_natively_identical_to_fabio(testdata):
    files = sorted(p for p in testdata.rglob("*") if p.name.endswith((".cbf", ".cbf.gz",
                                                                       ".cbf.bz2")))
    assert len(files) >= 9
    for path in files:
        reader = _FabioSource(str(path))
        assert reader.native is not None, f"{path.name} went to fabio"
        data, header = reader.read(0)
        expected, expected_header = fabio_read(path)
        assert data.dtype == expected.dtype and data.shape == expected.shape, path.name
        np.testing.assert_array_equal(data, expected, err_msg=path.name)
        assert dict(header) == expected_header, path.name


# ------------------------------------------------------------------------ synthetic files

@pytest.mark.parametrize("dtype", list(ELEMENT_TYPES), ids=str)
@pytest.mark.parametrize("widen", [0, 1, 3])
def test_every_escape_width_and_sign_matches_the_values_and_fabio(tmp_path, dtype, widen):
    values = escapes_of_every_width(dtype)
    stream = encode_byte_offset(values, widen=widen)
    if widen == 0 and dtype.itemsize >= 4:
        assert b"\x80\x00\x80\x00\x00\x00\x80" in stream        # 64-bit escapes are there
    path = tmp_path / "escapes.cbf"
    path.write_bytes(minicbf(values, payload=stream))
    reader = _FabioSource(str(path))
    assert reader.native is not None
    data, header = reader.read(0)
    assert data.dtype == dtype
    np.testing.assert_array_equal(data, values)
    expected, expected_header = fabio_read(path)
    if dtype == np.int32 and b"\x80\x00\x80\x00\x00\x00\x80" in stream:
        # fabio's int32 decoder has no 64-bit escape: it reads 0x80000000 as a delta and the
        # int64 that follows as more deltas. This reader follows the specification, as
        # fabio's decoder of every other type does.
        assert not np.array_equal(expected, values)
    else:
        assert expected.dtype == dtype
        np.testing.assert_array_equal(data, expected)
    assert dict(header) == expected_header


def test_fabio_written_files_and_compressed_copies(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.poisson(50, (67, 45)).astype(np.int32)
    data[::7, ::5] = -1
    data[3, 4] = 2**20
    path = tmp_path / "f.cbf"
    fabio.cbfimage.CbfImage(data=data).write(str(path))
    (tmp_path / "f2.cbf.gz").write_bytes(gzip.compress(path.read_bytes()))
    (tmp_path / "f3.cbf.bz2").write_bytes(bz2.compress(path.read_bytes()))
    for name in ("f.cbf", "f2.cbf.gz", "f3.cbf.bz2"):
        reader = _FabioSource(str(tmp_path / name))
        assert reader.native is not None
        np.testing.assert_array_equal(reader.read(0)[0], data)
        np.testing.assert_array_equal(load_image(tmp_path / name), data)


def test_lf_line_ends_and_no_md5(tmp_path):
    values = escapes_of_every_width(np.dtype(np.int16))
    path = tmp_path / "lf.cbf"
    path.write_bytes(minicbf(values, newline=b"\n", md5=False))
    reader = _FabioSource(str(path))
    assert reader.native is not None
    np.testing.assert_array_equal(reader.read(0)[0], values)
    np.testing.assert_array_equal(reader.read(0)[0], fabio.open(str(path)).data)


def test_decoded_into_the_callers_buffer(tmp_path):
    values = escapes_of_every_width(np.dtype(np.int32), n=1000)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"b{k}.cbf")
        paths[-1].write_bytes(minicbf(values + k))
    buffers = []

    def buffer(shape, dtype):
        buffers.append(np.empty(shape, dtype))
        return buffers[-1]

    frames = list(iter_frames([InputItem(str(p)) for p in paths], workers=2, buffer=buffer))
    assert [type(f) for f in frames] == [Frame] * 3
    for k, frame in enumerate(frames):
        assert any(frame.data is b for b in buffers)      # no copy
        np.testing.assert_array_equal(frame.data, values + k)


def test_header_is_parsed_by_fabio_only_when_looked_at(tmp_path, monkeypatch):
    values = escapes_of_every_width(np.dtype(np.int32), n=500)
    path = tmp_path / "h.cbf"
    path.write_bytes(minicbf(values))
    calls = []
    from azfilter.frames import fabio_formats

    original = fabio_formats._cbf_header
    monkeypatch.setattr(fabio_formats, "_cbf_header",
                        lambda *args: calls.append(args) or original(*args))
    frame = next(open_frames(path))
    assert calls == []
    assert frame.header["X-Binary-Size-Fastest-Dimension"] == "50"
    assert frame.header["_array_data.header_convention"] == "PILATUS_1.2"
    assert dict(frame.header) == dict(fabio.open(str(path)).header)
    assert len(calls) == 1


# ------------------------------------------------------------------------ the decoder alone

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=st.binary(max_size=200), count=st.integers(0, 120),
       dtype=st.sampled_from(list(ELEMENT_TYPES)))
def test_decoder_on_random_bytes_is_bounded_and_follows_the_specification(stream, count,
                                                                          dtype):
    from azfilter._cbf import decode_byte_offset

    # the stream is cut out of a larger buffer: reading past its end would read the 0x80
    # bytes after it and show up as a different result
    backing = bytearray(b"\x80" * 16 + stream + b"\x80" * 16)
    view = memoryview(backing)[16:16 + len(stream)]
    out = np.full(count, 7, dtype)
    expected = decode_reference(stream, count)
    if len(expected) < count:
        with pytest.raises(ValueError, match=f"after {len(expected)} of {count} pixels"):
            decode_byte_offset(view, out)
    else:
        used = decode_byte_offset(view, out)
        assert used <= len(stream)
        wrapped = [v % 2**(8 * dtype.itemsize) for v in expected]
        np.testing.assert_array_equal(out.astype(object) % 2**(8 * dtype.itemsize),
                                      np.array(wrapped, dtype=object).reshape(out.shape))


# ------------------------------------------------------------------------ damaged files

def damaged_files(tmp_path: Path) -> dict[str, Path]:
    values = escapes_of_every_width(np.dtype(np.int32), n=2000)
    good = minicbf(values)
    stream = encode_byte_offset(values)
    files = {}

    def add(name: str, content: bytes) -> None:
        files[name] = tmp_path / f"{name}.cbf"
        files[name].write_bytes(content)

    # the checksum of other bytes
    add("bad_md5", good.replace(cbf_reader.BINARY_START + stream[:20],
                                cbf_reader.BINARY_START + bytes(20), 1))
    # data that end before the last pixel, sizes and checksum consistent
    add("short_data", minicbf(values, payload=stream[:len(stream) // 2]))
    # the last escape cut in its middle (a 64-bit escape needs 15 bytes)
    cut = stream[:stream.rindex(b"\x80\x00\x80\x00\x00\x00\x80") + 9]
    add("cut_escape", minicbf(values, payload=cut))
    # the file itself cut in the binary data
    add("truncated", good[:len(good) // 3])
    # more bytes announced than the file has
    add("size_too_large", minicbf(values, size=len(stream) + 10**6))
    # cut before the binary section (a file still being written)
    add("no_binary", good[:good.index(cbf_reader.BINARY_START)])
    return files


def test_damaged_files_are_one_failed_frame_each(tmp_path):
    files = damaged_files(tmp_path)
    results = list(iter_frames([InputItem(str(p)) for p in files.values()], workers=2,
                               errors="report"))
    assert len(results) == len(files)
    for (name, path), result in zip(files.items(), results, strict=True):
        assert isinstance(result, FrameReadError), name
        assert result.source == str(path) and result.index == 0, name
        message = str(result)
        assert "\n" not in message and "corrupt or truncated CBF" in message, (name, message)
    reasons = {name: r.reason for name, r in zip(files, results, strict=True)}
    assert "Checksum of binary data mismatch" in reasons["bad_md5"]
    assert "byte-offset data end after" in reasons["short_data"]
    assert "byte-offset data end after" in reasons["cut_escape"]
    for path in files.values():            # the sequential reader says the same
        (error,) = list(open_frames(path, errors="report"))
        assert isinstance(error, FrameReadError)


def test_damaged_files_through_the_command(tmp_path):
    from click.testing import CliRunner

    from azfilter import cli

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    shape = (40, 50)
    for k in range(2):
        data = rng.poisson(100, shape).astype(np.int32)
        (run / f"good_{k}.cbf").write_bytes(minicbf(data))
    source = tmp_path / "damaged"
    source.mkdir()
    damaged = damaged_files(source)
    for name, path in damaged.items():
        (run / f"bad_{name}.cbf").write_bytes(path.read_bytes())
    poni = tmp_path / "geo.poni"
    poni.write_text("poni_version: 2.1\nDetector: Detector\nDetector_config: "
                    '{"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [40, 50]}\n'
                    "Distance: 0.05\nPoni1: 0.002\nPoni2: 0.0025\nRot1: 0\nRot2: 0\n"
                    "Rot3: 0\nWavelength: 1e-10\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, ["sigma-clip", "-p", str(poni), "--npt", "20",
                                           "--backend", "python", str(run), "-o", f"{out}/"],
                                catch_exceptions=False, prog_name="azfilter")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    failures = [line for line in result.stderr.splitlines() if "failed:" in line]
    # the 2000-pixel damaged files do not have the detector's shape: those that decode
    # would fail on their shape, but none decodes
    assert len(failures) == len(damaged), result.stderr
    for name in damaged:
        assert sum(f"bad_{name}.cbf" in line for line in failures) == 1, name
    assert sorted(p.name for p in out.iterdir()) == ["good_0.dat", "good_1.dat"]


# ------------------------------------------------------------------------ left to fabio

@pytest.mark.parametrize("change", ["conversions", "element", "no_data_item", "third_dim"])
def test_unusual_files_go_to_fabio(tmp_path, change):
    values = escapes_of_every_width(np.dtype(np.int32), n=500)
    if change == "conversions":
        content = minicbf(values, conversions="x-CBF_PACKED")
    elif change == "element":
        content = minicbf(values, element="signed 32-bit real IEEE")
    elif change == "no_data_item":
        content = minicbf(values).replace(b"_array_data.data\r\n;", b"_array_data.other\r\n;")
    else:
        content = minicbf(values).replace(b"X-Binary-Size-Padding",
                                          b"X-Binary-Size-Third-Dimension: 2\r\nX-Binary-Size-P")
    assert cbf_reader.parse(content) is None
    path = tmp_path / "unusual.cbf"
    path.write_bytes(content)
    try:
        reader = _FabioSource(str(path))
    except FrameReadError:
        return                                  # fabio refuses it: a read error, no crash
    assert reader.native is None and reader.image is not None
    try:
        data = reader.read(0)[0]
    except FrameReadError:
        return
    np.testing.assert_array_equal(data, fabio.open(str(path)).data)


# ------------------------------------------------------------------------ single-frame EDF

def edf_bytes(data: np.ndarray, order: str = "LowByteFirst", extra: str = "") -> bytes:
    """A one-frame EDF written by hand (header padded to 512 bytes)."""
    names = {np.dtype(np.int16): "SignedShort", np.dtype(np.float32): "FloatValue",
             np.dtype(np.uint32): "UnsignedInteger"}
    stored = data.astype(data.dtype.newbyteorder("<" if order == "LowByteFirst" else ">"))
    text = (f"{{\nHeaderID = EH:000001:000000:000000 ;\nImage = 1 ;\nByteOrder = {order} ;\n"
            f"DataType = {names[data.dtype]} ;\nDim_1 = {data.shape[1]} ;\n"
            f"Dim_2 = {data.shape[0]} ;\nSize = {data.nbytes} ;\n{extra}")
    header = text.encode() + b" " * (510 - len(text) % 512 if len(text) % 512 <= 510 else 1022
                                     - len(text) % 512) + b"}\n"
    assert len(header) % 512 == 0
    return header + stored.tobytes()


@pytest.mark.slow
def test_testdata_edf_files_are_read_natively_identical_to_fabio(testdata):
    files = sorted(testdata.rglob("*.edf"))
    assert files
    for path in files:
        reader = _FabioSource(str(path))
        assert reader.native is not None, path.name
        data, header = reader.read(0)
        image = fabio.open(str(path))
        assert data.dtype == image.data.dtype
        np.testing.assert_array_equal(data, image.data)
        assert dict(header) == dict(image.header)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32,
                                   np.uint32, np.int64, np.float32, np.float64])
def test_fabio_written_edf_of_every_type(tmp_path, dtype):
    rng = np.random.default_rng(1)
    data = (rng.normal(0, 50, (31, 17)) if np.dtype(dtype).kind == "f"
            else rng.integers(0, 100, (31, 17))).astype(dtype)
    path = tmp_path / "f.edf"
    fabio.edfimage.EdfImage(data=data, header={"Title": "mask; of sorts"}).write(str(path))
    reader = _FabioSource(str(path))
    assert reader.native is not None
    got, header = reader.read(0)
    np.testing.assert_array_equal(got, data)
    assert got.dtype == data.dtype
    assert dict(header) == dict(fabio.open(str(path)).header)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint32])
def test_edf_big_endian(tmp_path, dtype):
    data = (np.arange(12 * 7).reshape(12, 7) * 37 - 300).astype(dtype)
    if np.dtype(dtype).kind == "u":
        data = np.abs(data)
    path = tmp_path / "be.edf"
    path.write_bytes(edf_bytes(data, "HighByteFirst"))
    reader = _FabioSource(str(path))
    assert reader.native is not None
    got = reader.read(0)[0]
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(got, fabio.open(str(path)).data)


@pytest.mark.parametrize("change", ["two_frames", "dim3", "compression", "trailing",
                                    "size"])
def test_unusual_edf_files_go_to_fabio(tmp_path, change):
    data = np.arange(20 * 9, dtype=np.int16).reshape(20, 9)
    content = edf_bytes(data)
    if change == "two_frames":
        content = content + edf_bytes(data + 1)
    elif change == "dim3":
        content = edf_bytes(data, extra="Dim_3 = 1 ;\n")
    elif change == "compression":
        content = edf_bytes(data, extra="Compression = None ;\n")
    elif change == "trailing":
        content = content + b"\0" * 512
    else:
        content = content.replace(b"Size = 360", b"Size = 720")
    path = tmp_path / "unusual.edf"
    path.write_bytes(content)
    from azfilter.frames import edf

    assert edf.read_edf(str(path), np.empty) is None
    frames = [f for f in open_frames(path, errors="report")]
    expected = fabio.open(str(path))
    assert len(frames) == expected.nframes
    if isinstance(frames[0], Frame):
        np.testing.assert_array_equal(frames[0].data, expected.data)


def test_cbf_run_with_an_edf_mask_does_not_import_fabio(tmp_path):
    """A run over CBF files with an EDF mask reads both itself: fabio (and the h5py it
    brings) are not imported."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / f"img_{k}.cbf").write_bytes(
            minicbf(rng.poisson(100, (40, 50)).astype(np.int32)))
    mask = np.zeros((40, 50), np.int8)
    mask[:3] = 1
    fabio.edfimage.EdfImage(data=mask).write(str(tmp_path / "mask.edf"))
    (tmp_path / "geo.poni").write_text(
        "poni_version: 2.1\nDetector: Detector\nDetector_config: "
        '{"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [40, 50]}\n'
        "Distance: 0.05\nPoni1: 0.002\nPoni2: 0.0025\nRot1: 0\nRot2: 0\nRot3: 0\n"
        "Wavelength: 1e-10\n")
    script = (
        "import sys\nfrom azfilter.cli import run\n"
        f"code = run(['sigma-clip', '-p', {str(tmp_path / 'geo.poni')!r}, '--npt', '20', "
        f"'--mask', {str(tmp_path / 'mask.edf')!r}, '--backend', 'python', "
        f"{str(tmp_path / 'img_0.cbf')!r}, {str(tmp_path / 'img_1.cbf')!r}, "
        f"'-o', {str(tmp_path / 'out') + '/'!r}])\n"
        "loaded = sorted(m for m in ('fabio', 'h5py', 'hdf5plugin') if m in sys.modules)\n"
        "print('loaded:', loaded)\nsys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout, result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img_0.dat", "img_1.dat"]


def test_cbf_to_text_run_imports_only_what_it_needs(tmp_path):
    """The main workload of this reader, CBF files -> one text file each with the compiled
    engine, starts lean: no h5py/hdf5plugin/fabio (HDF5 and other formats), no pyopencl
    (OpenCL backend), no scipy (Python backend), none of the NeXus writer/reader/merger, no
    filelock (a free output lock is a plain flock); and numpy's BLAS runs one thread (its idle
    threads otherwise spin at start-up)."""
    import subprocess
    import sys

    from azfilter.backends import get_engine_class
    from azfilter.errors import AzfilterError

    try:
        get_engine_class("cython")
    except AzfilterError:
        pytest.skip("the compiled (cython) engine is not built")
    rng = np.random.default_rng(1)
    for k in range(3):
        (tmp_path / f"img_{k}.cbf").write_bytes(
            minicbf(rng.poisson(100, (40, 50)).astype(np.int32)))
    (tmp_path / "geo.poni").write_text(
        "poni_version: 2.1\nDetector: Detector\nDetector_config: "
        '{"pixel1": 0.0001, "pixel2": 0.0001, "max_shape": [40, 50]}\n'
        "Distance: 0.05\nPoni1: 0.002\nPoni2: 0.0025\nRot1: 0\nRot2: 0\nRot3: 0\n"
        "Wavelength: 1e-10\n")
    unwanted = ("h5py", "hdf5plugin", "fabio", "pyopencl", "scipy", "azfilter.output.nexus",
                "azfilter.output.read", "azfilter.output.merge", "azfilter.output.sparse",
                "filelock")   # the output lock is free: taken with a plain flock
    script = (
        "import os, sys\nos.environ.pop('OPENBLAS_NUM_THREADS', None)\n"
        "from azfilter.cli import run\n"
        "blas_threads = os.environ.get('OPENBLAS_NUM_THREADS')\n"
        "numpy_before = 'numpy' in sys.modules\n"
        f"code = run(['sigma-clip', '-p', {str(tmp_path / 'geo.poni')!r}, '--npt', '20', "
        "'--backend', 'cython', '--quiet', "
        + ", ".join(repr(str(tmp_path / f"img_{k}.cbf")) for k in range(3)) +
        f", '-o', {str(tmp_path / 'out') + '/'!r}])\n"
        f"loaded = sorted(m for m in {unwanted!r} if m in sys.modules)\n"
        "print('loaded:', loaded, 'blas:', blas_threads, 'numpy before:', numpy_before)\n"
        "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded: [] blas: 1 numpy before: False" in result.stdout, result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        ["img_0.dat", "img_1.dat", "img_2.dat"]
