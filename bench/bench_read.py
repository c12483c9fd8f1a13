"""Read throughput (frames/s): h5py and fabio against azfilter's parallel stream.

(a) An Eiger 4M uint32 bitshuffle-LZ4 stack (the stack of ``bench_cli.py``, made once and
    reused; at most 100 frames here; or ``--stack``): h5py's own read (``dataset[i]``, its
    filter pipeline), ``open_frames`` (today's reader) and ``iter_frames`` (direct chunk reads
    + azfilter's decoder) at 1 and 2 workers; also each decoder alone, per frame (CPU ms), and
    decoded frames/s with 1, 4 and all usable cores' threads decoding at once
    (``--decoders-only``: this part alone).
(b) 100 Pilatus 1M CBF files (the real AgBh frame with fresh Poisson noise per file, written
    by fabio): plain ``fabio.open``, ``open_frames``, ``iter_frames`` at 1 and 2 workers (both
    with azfilter's own CBF reader); also each reading step alone, per file (CPU ms): fabio's
    and azfilter's.
(c) Whether each decoder releases the GIL: while a thread calls it in a loop, the main thread
    counts pure-Python steps; a call that holds the GIL stops the main thread for its whole
    length (control: ``bytes.translate``), one that releases it does not (control: sleep).

Files are read once before timing (page cache).  Each rate is the best of ``--repeat`` runs
(the least disturbed by other processes on a shared machine); the medians are in the JSON.

Usage: ``python bench/bench_read.py [--frames 50] [--cbf-files 100] [--repeat 3] [--json F]
[--stack STACK.h5 --decoders-only]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import (  # noqa: E402  (after the path set-up)
    H5PATH,
    eiger_stack,
    machine_info,
    make_cbf_files,
    read_page_cache,
)


def rate(run, n: int, repeat: int) -> dict[str, float]:
    """frames/s of ``run()`` (which reads ``n`` frames), best and median of ``repeat``; and
    the cores it kept busy (process CPU time / wall time, of the best run): above 1 only when
    threads decode at the same time, i.e. outside the GIL, and when other processes leave a
    second core free."""
    runs = []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.process_time()
        got = run()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if got != n:
            sys.exit(f"bench_read: read {got} frames, expected {n}")
        runs.append((n / elapsed, cpu / elapsed))
    best = max(runs)
    return {"best": round(best[0], 1), "median": round(statistics.median(r[0] for r in runs), 1),
            "cores_busy": round(best[1], 2)}


def count_frames_of(stream) -> int:
    from azfilter.frames import Frame

    count = 0
    for result in stream:
        if not isinstance(result, Frame):
            sys.exit(f"bench_read: {result}")
        count += 1
    return count


# ============================================================================ (a) Eiger stack


def eiger_rates(stack: Path, n: int, repeat: int) -> dict[str, Any]:
    import h5py
    import hdf5plugin  # noqa: F401  (the bitshuffle filter for h5py)

    from azfilter.frames import expand_inputs, iter_frames, open_frames

    items = expand_inputs(str(stack))

    def h5py_read() -> int:
        with h5py.File(stack, "r") as h5:
            dset = h5[H5PATH]
            for i in range(dset.shape[0]):
                dset[i]
            return dset.shape[0]

    rows = {"h5py dataset[i] (filter pipeline)": rate(h5py_read, n, repeat),
            "azfilter open_frames (today's reader)":
                rate(lambda: count_frames_of(open_frames(items)), n, repeat)}
    for workers in (1, 2):
        rows[f"azfilter iter_frames, {workers} worker{'s' if workers > 1 else ''}"] = rate(
            lambda w=workers: count_frames_of(iter_frames(items, workers=w)), n, repeat)
    return rows


class EigerChunks:
    """The first frames of an Eiger 4M bitshuffle-LZ4 stack as raw chunks, and ways to decode
    them (each ``decode(i, out)`` writes frame ``i % len`` into ``out``)."""

    def __init__(self, stack: Path, frames: int = 8):
        import h5py
        import hdf5plugin  # noqa: F401  (the bitshuffle filter for h5py)

        from azfilter.frames import chunks

        with h5py.File(stack, "r") as h5:
            dset = h5[H5PATH]
            self.layout = chunks.direct_layout(dset)
            self.raws = [dset.id.read_direct_chunk((i, 0, 0))[1]
                         for i in range(min(frames, dset.shape[0]))]
            self.frames = [dset[i] for i in range(len(self.raws))]
        self.block_bytes = struct.unpack_from(">I", self.raws[0], 8)[0]
        # the LZ4 blocks alone, framed for imagecodecs (an Eiger 4M frame ends with
        # 2167 * 2070 % 8 = 2 elements stored as they are)
        size = self.frames[0].size
        self.count = size - size % 8
        tail = (size - self.count) * 4
        self.blocks = []
        for raw in self.raws:
            patched = bytearray(raw[:len(raw) - tail])
            struct.pack_into(">Q", patched, 0, self.count * 4)
            self.blocks.append(patched)

    def azfilter(self, simd: int | None = None):
        """``decode_chunk`` with bit-unshuffle code ``simd`` (``chunks.SIMD_*``; default the
        widest the CPU has)."""
        from azfilter.frames import chunks

        simd = chunks.SIMD_WIDEST if simd is None else simd

        def decode(i: int, out) -> None:
            chunks.decode_chunk(self.raws[i % len(self.raws)], self.layout, out, simd=simd)
        return decode

    def imagecodecs_before(self, i: int, out) -> None:
        """The host decoder until 2026-11-29: the block walk, imagecodecs' LZ4 of the whole
        frame into scratch memory, then its bit-unshuffle into the frame (the tail aside)."""
        import imagecodecs
        import numpy as np

        from azfilter.frames import chunks

        i %= len(self.raws)
        chunks.bslz4_layout(self.raws[i], self.frames[0].size, 4)
        shuffled = imagecodecs.lz4h5_decode(self.blocks[i],
                                            out=chunks._scratch_bytes(self.count * 4))
        imagecodecs.bitshuffle_decode(np.frombuffer(shuffled, np.uint32),
                                      blocksize=self.block_bytes // 4,
                                      out=out.reshape(-1)[:self.count])

    def check(self, decode) -> None:
        import numpy as np

        out = np.empty(self.layout.shape, self.layout.dtype)
        decode(1, out)
        np.testing.assert_array_equal(out.reshape(-1)[:self.count],
                                      self.frames[1].reshape(-1)[:self.count])


def decoder_costs(stack: Path, repeat: int) -> dict[str, float]:
    """CPU ms per Eiger 4M frame of each decoding step, on one thread (CPU time: a decoder
    that runs on several threads is charged for all of them)."""
    import imagecodecs
    import numpy as np

    from azfilter.frames import chunks

    cases = EigerChunks(stack)
    raws, layout = cases.raws, cases.layout
    out = np.empty(layout.shape, layout.dtype)
    count, block_bytes = cases.count, cases.block_bytes
    shuffled = [f.reshape(-1)[:count] for f in cases.frames]
    import h5py

    with h5py.File(stack, "r") as h5:
        dset = h5[H5PATH]
        steps = {
            "h5py dataset[i] (read + filter)": lambda i: dset[i],
            "h5py read_direct_chunk (raw bytes)": lambda i: dset.id.read_direct_chunk((i, 0, 0)),
            "direct: block walk (bslz4_layout)":
                lambda i: chunks.bslz4_layout(raws[i], cases.frames[0].size, 4),
            "imagecodecs lz4h5_decode (LZ4 blocks of the whole frame)":
                lambda i: imagecodecs.lz4h5_decode(cases.blocks[i], out=chunks._scratch_bytes(
                    count * 4)),
            "imagecodecs bitshuffle_decode (the whole frame)":
                lambda i: imagecodecs.bitshuffle_decode(shuffled[i], blocksize=block_bytes // 4,
                                                        out=out.reshape(-1)[:count]),
            "imagecodecs, both with the walk (the decoder before)":
                lambda i: cases.imagecodecs_before(i, out),
            "direct: decode_chunk (walk + azfilter's decoder)":
                lambda i: cases.azfilter(chunks.SIMD_WIDEST)(i, out),
            "direct: decode_chunk, AVX2 without GFNI":
                lambda i: cases.azfilter(chunks.SIMD_AVX2)(i, out),
            "direct: decode_chunk, 16-byte vectors (CPUs without AVX2)":
                lambda i: cases.azfilter(chunks.SIMD_VECTORS)(i, out),
            "direct: decode_chunk, 64-bit words only":
                lambda i: cases.azfilter(chunks.SIMD_WORDS)(i, out),
        }
        try:
            import bitshuffle

            steps["bitshuffle package decompress_lz4 (OpenMP: all cores)"] = \
                lambda i: bitshuffle.decompress_lz4(
                    np.frombuffer(raws[i], np.uint8, offset=12), layout.shape, layout.dtype,
                    block_bytes // 4)
        except ImportError:
            pass
        for simd in (chunks.SIMD_WIDEST, chunks.SIMD_AVX2, chunks.SIMD_VECTORS,
                     chunks.SIMD_WORDS):
            cases.check(cases.azfilter(simd))
        cases.check(cases.imagecodecs_before)
        costs = {}
        for name, step in steps.items():
            best = float("inf")
            for _ in range(repeat):
                start = time.process_time()
                for i in range(len(raws)):
                    step(i)
                best = min(best, (time.process_time() - start) / len(raws))
            costs[name] = round(best * 1000, 2)
    return costs


def decoder_threads(stack: Path, seconds: float = 2.0) -> dict[str, dict[str, float]]:
    """Decoded Eiger 4M frames/s with T threads decoding at once, each into its own frame
    (T = 1, 4 and the usable cores): how the decoders share the cores and memory."""
    import numpy as np

    from azfilter.frames import chunks
    from azfilter.resources import usable_cores

    cases = EigerChunks(stack, frames=16)
    decoders = {"azfilter (AVX2 and GFNI where the CPU has them)": cases.azfilter(),
                "azfilter, AVX2 without GFNI": cases.azfilter(chunks.SIMD_AVX2),
                "azfilter, 16-byte vectors": cases.azfilter(chunks.SIMD_VECTORS),
                "imagecodecs (the decoder before)": cases.imagecodecs_before}
    rows: dict[str, dict[str, float]] = {}
    for name, decode in decoders.items():
        rows[name] = {}
        for threads in sorted({1, 4, usable_cores()}):
            done = [0] * threads
            stop = time.perf_counter() + seconds

            def work(k: int, threads: int = threads, decode=decode, stop: float = stop,
                     done: list[int] = done) -> None:
                out = np.empty(cases.layout.shape, cases.layout.dtype)
                i = k
                while time.perf_counter() < stop:
                    decode(i, out)
                    i += threads
                    done[k] += 1

            pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
            start = time.perf_counter()
            for thread in pool:
                thread.start()
            for thread in pool:
                thread.join()
            rows[name][f"{threads} threads"] = round(sum(done) / (time.perf_counter() - start), 1)
    return rows


# ============================================================================ (b) CBF files


def cbf_rates(paths: list[Path], repeat: int) -> dict[str, Any]:
    import fabio

    from azfilter.frames import expand_inputs, iter_frames, open_frames

    items = expand_inputs([str(p) for p in paths])
    for p in paths:
        read_page_cache(p)

    def fabio_loop() -> int:
        for p in paths:
            if fabio.open(str(p)).data is None:
                sys.exit(f"bench_read: fabio read no data from {p}")
        return len(paths)

    rows = {"fabio.open(...).data, one after the other": rate(fabio_loop, len(paths), repeat),
            "azfilter open_frames (today's reader)":
                rate(lambda: count_frames_of(open_frames(items)), len(paths), repeat)}
    for workers in (1, 2):
        rows[f"azfilter iter_frames, {workers} worker{'s' if workers > 1 else ''}"] = rate(
            lambda w=workers: count_frames_of(iter_frames(items, workers=w)), len(paths),
            repeat)
    return rows


def cbf_costs(paths: list[Path], repeat: int) -> dict[str, float]:
    """CPU ms per Pilatus 1M CBF file of each reading step, on one thread (best of
    ``repeat`` passes over the files; files in the page cache)."""
    import base64
    import hashlib

    import fabio
    import fabio.cbfimage
    import numpy as np
    from fabio.compression import decByteOffset

    from azfilter.frames import cbf

    contents = {p: p.read_bytes() for p in paths}
    layouts = {p: cbf.parse(contents[p]) for p in paths}
    if any(layout is None for layout in layouts.values()):
        sys.exit("bench_read: azfilter's CBF reader does not take these files (not built?)")
    out = np.empty(layouts[paths[0]].shape, layouts[paths[0]].dtype)

    def payload(p: Path) -> memoryview:
        layout = layouts[p]
        return memoryview(contents[p])[layout.start:layout.start + layout.size]

    np.testing.assert_array_equal(cbf.read_cbf(str(paths[0]), np.empty)[0],
                                  fabio.open(str(paths[0])).data)
    steps = {
        "fabio.open(f).data (whole read, MD5 checked)": lambda p: fabio.open(str(p)).data,
        "fabio CbfImage().read(f, check_MD5=False)":
            lambda p: fabio.cbfimage.CbfImage().read(str(p), check_MD5=False).data,
        "fabio decByteOffset (payload bytes -> int32)":
            lambda p: decByteOffset(bytes(payload(p)), size=out.size, dtype="int32"),
        "MD5 of the payload (hashlib, as both check it)":
            lambda p: base64.b64encode(hashlib.md5(payload(p)).digest()),
        "file read (bytes, page cache)": lambda p: cbf.read_file(str(p)),
        "azfilter MIME header parse": lambda p: cbf.parse(contents[p]),
        "azfilter decode_byte_offset (into a buffer)":
            lambda p: cbf.decode(contents[p], layouts[p], out),
        "azfilter read_cbf (whole read, MD5 checked)":
            lambda p: cbf.read_cbf(str(p), lambda shape, dtype: out),
    }
    costs = {}
    for name, step in steps.items():
        best = float("inf")
        for _ in range(repeat):
            start = time.process_time()
            for p in paths:
                step(p)
            best = min(best, (time.process_time() - start) / len(paths))
        costs[name] = round(best * 1000, 2)
    return costs


# ============================================================================ (c) the GIL


def main_thread_steps(call, seconds: float = 1.0) -> dict[str, float]:
    """Python steps/ms of the main thread while another thread runs ``call`` in a loop, and
    the length of one call."""
    stop = threading.Event()
    spans: list[tuple[float, float]] = []

    def loop() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            call()
            spans.append((start, time.perf_counter()))

    worker = threading.Thread(target=loop)
    stamps = []
    worker.start()
    t0 = time.perf_counter()
    while True:
        for _ in range(50):
            pass
        now = time.perf_counter()
        stamps.append(now)
        if (now - t0 > seconds and len(spans) >= 3) or not worker.is_alive() \
                or now - t0 > 20 * seconds:
            break
    stop.set()
    worker.join()
    if len(spans) < 2:
        sys.exit("bench_read: the GIL probe's call failed or never returned")
    # only the steps taken while a call was running (not between calls)
    import bisect

    inside = sum(bisect.bisect_left(stamps, end) - bisect.bisect_right(stamps, start)
                 for start, end in spans[1:])
    busy = sum(end - start for start, end in spans[1:])
    return {"call_ms": round(1000 * busy / max(1, len(spans) - 1), 2),
            "main_steps_per_ms": round(inside / (busy * 1000), 1) if busy else 0.0}


def gil_probe(stack: Path, cbf: Path) -> dict[str, Any]:
    import fabio
    import h5py
    import imagecodecs
    import numpy as np
    from fabio.compression import decByteOffset

    from azfilter.frames import chunks

    with h5py.File(stack, "r") as h5:
        dset = h5[H5PATH]
        raw = dset.id.read_direct_chunk((0, 0, 0))[1]
        frame = dset[0]
        layout = chunks.direct_layout(dset)
    layout_out = np.empty_like(frame)
    count = frame.size - frame.size % 8                 # the LZ4 blocks alone (see above)
    blocks = bytearray(raw[:len(raw) - (frame.size - count) * 4])
    struct.pack_into(">Q", blocks, 0, count * 4)
    shuffled = frame.reshape(-1)[:count]
    cbf_bytes = cbf.read_bytes()
    start = cbf_bytes.index(b"\x0c\x1a\x04\xd5") + 4
    cbf_image = fabio.open(str(cbf))
    cbf_payload = cbf_bytes[start:start + int(cbf_image.header["X-Binary-Size"])]
    cbf_pixels = cbf_image.data.size
    big = bytes(50_000_000)
    table = bytes(range(256))[::-1]
    calls = {
        "control: time.sleep(5 ms) (releases the GIL)": lambda: time.sleep(0.005),
        "control: bytes.translate 50 MB (holds the GIL)": lambda: big.translate(table),
        "imagecodecs.lz4h5_decode (Eiger 4M chunk)":
            lambda: imagecodecs.lz4h5_decode(blocks, out=chunks._scratch_bytes(count * 4)),
        "imagecodecs.bitshuffle_decode (Eiger 4M)":
            lambda: imagecodecs.bitshuffle_decode(shuffled, blocksize=2048,
                                                  out=layout_out.reshape(-1)[:count]),
        "azfilter decode_chunk (Eiger 4M, all steps)":
            lambda: chunks.decode_chunk(raw, layout, layout_out),
        "fabio decByteOffset (Pilatus 1M CBF payload)":
            lambda: decByteOffset(cbf_payload, size=cbf_pixels, dtype=np.int32),
        "fabio.open(cbf).data (whole file)": lambda: fabio.open(str(cbf)).data,
    }
    from azfilter.frames import cbf as cbf_reader

    # (its own name: the Eiger call above reads `layout` when it runs)
    cbf_layout = cbf_reader.parse(cbf_bytes)
    cbf_out = np.empty(cbf_layout.shape, cbf_layout.dtype)
    calls["azfilter decode_byte_offset (Pilatus 1M CBF)"] = \
        lambda: cbf_reader.decode(cbf_bytes, cbf_layout, cbf_out)
    calls["azfilter read_cbf (whole file)"] = lambda: cbf_reader.read_cbf(str(cbf), np.empty)
    return {name: main_thread_steps(call) for name, call in calls.items()}


# ============================================================================ main


def print_decoders(costs: dict[str, float], rates: dict[str, dict[str, float]]) -> None:
    print("\n## Eiger 4M decoding, CPU ms per frame (one thread)")
    for name, value in costs.items():
        print(f"  {name:58s} {value:8.2f}")
    print("\n## Eiger 4M decoding, frames/s with T threads at once")
    for name, row in rates.items():
        print(f"  {name:45s} " + "  ".join(f"{k}: {v:.0f}" for k, v in row.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=50, help="Eiger 4M frames (<= 100)")
    parser.add_argument("--cbf-files", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "azfilter-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stack", type=Path,
                        help="an existing Eiger 4M uint32 bitshuffle-LZ4 stack (one frame per "
                             "chunk at /entry/data/data) instead of generating one")
    parser.add_argument("--decoders-only", action="store_true",
                        help="only the Eiger decoders: CPU ms per frame, frames/s on T threads")
    args = parser.parse_args(argv)
    if not 1 <= args.frames <= 100:
        parser.error("--frames must be between 1 and 100")

    machine = machine_info()
    if args.stack:
        stack, generated = args.stack, 0.0
    else:
        stack, _poni, generated = eiger_stack(args.data_dir, args.frames)
    read_page_cache(stack)
    if args.decoders_only:
        report = {"machine": machine, "stack": str(stack),
                  "decoder_cpu_ms_per_frame": decoder_costs(stack, args.repeat),
                  "decoder_frames_per_s": decoder_threads(stack)}
        print(f"# machine: {machine['cpu']}, {machine['usable_cores']} usable cores; "
              f"load average {machine['load_average_start'][0]:.1f} at start")
        print_decoders(report["decoder_cpu_ms_per_frame"], report["decoder_frames_per_s"])
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    cbf_paths = make_cbf_files(args.data_dir / "pilatus1m_cbf", args.cbf_files)

    report: dict[str, Any] = {"machine": machine}
    report["eiger"] = {"input": f"{stack.name}: {args.frames} x Eiger 4M uint32 "
                                f"bitshuffle-LZ4, {stack.stat().st_size / 2**20:.0f} MiB",
                       "frames_per_s": eiger_rates(stack, args.frames, args.repeat),
                       "decoder_cpu_ms_per_frame": decoder_costs(stack, args.repeat),
                       "decoder_frames_per_s": decoder_threads(stack)}
    report["cbf"] = {"input": f"{len(cbf_paths)} Pilatus 1M int32 CBF files (byte offset)",
                     "frames_per_s": cbf_rates(cbf_paths, args.repeat),
                     "cpu_ms_per_file": cbf_costs(cbf_paths, args.repeat)}
    report["gil"] = gil_probe(stack, cbf_paths[0])
    machine["load_average_end"] = list(os.getloadavg())
    report["generated_stack_s"] = round(generated, 1)

    print(f"# machine: {machine['cpu']}, {machine['usable_cores']} usable cores; load average "
          f"{machine['load_average_start'][0]:.1f} at start, "
          f"{machine['load_average_end'][0]:.1f} at end")
    for key in ("eiger", "cbf"):
        print(f"\n## {report[key]['input']}: frames/s (best of {args.repeat}, median), "
              "cores busy")
        for name, value in report[key]["frames_per_s"].items():
            print(f"  {name:45s} {value['best']:8.1f} {value['median']:8.1f} "
                  f"{value['cores_busy']:6.2f}")
    print_decoders(report["eiger"]["decoder_cpu_ms_per_frame"],
                   report["eiger"]["decoder_frames_per_s"])
    print("\n## Pilatus 1M CBF reading, CPU ms per file (one thread)")
    for name, value in report["cbf"]["cpu_ms_per_file"].items():
        print(f"  {name:45s} {value:8.2f}")
    print("\n## GIL: main-thread Python steps per ms while a thread runs the call")
    for name, value in report["gil"].items():
        print(f"  {name:48s} {value['main_steps_per_ms']:8.1f} steps/ms "
              f"(call {value['call_ms']:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
