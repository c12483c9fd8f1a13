"""``azfilter sparsify`` side by side with pyFAI's ``sparsify-Bragg`` and ``azfilter sigma-clip``.

On the same frames, the same PONI and the same options (800 bins in r_mm, Poisson model,
Chauvenet clipping over 5 cycles, pick at 3 sigma, noise 1, solid-angle correction), it runs:

1. per frame, in this process: the sigma-clip engine alone, then the picking (compiled, and
   the numpy reference), so that the extra cost of picking is measured apart from I/O;
2. the commands, each in its own process, over the same list of frames (repeated with
   ``--repeat`` through symbolic links, to amortise start-up): ``azfilter sigma-clip``,
   ``azfilter sparsify`` for each ``--backends`` entry, and pyFAI's ``sparsify-Bragg``
   (OpenCL; its own processing rate is read from its log too);
3. what the sparse files hold: file size against the raw frames (pixels x bytes) and against
   the input files; picked pixels per frame (azfilter and pyFAI); the round trip through
   fabio (picked pixels bit-exact after densify; the sigma-clipped 1-D pattern of the
   densified frame against the original's, in its sem and in its std).

No network is used. Usage::

    python bench/bench_sparsify.py -p geo.poni FRAME... [--backends cython opencl]
        [--device gpu] [--repeat 10] [--npt 800] [--unit r_mm] [--no-pyfai]
        [--pyfai-device-type gpu] [--json results.json] [--workdir DIR]

e.g. ``python bench/bench_sparsify.py -p $T/thau_3_2_from_cbf_header.poni $T/thau_3_2_000*.cbf.bz2``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLIP = {"thres": 0.0, "max_iter": 5, "error_model": "poisson"}


def run(command: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Wall time and combined output of a command (raises on failure, showing its output)."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout}\n"
                         f"{done.stderr}")
    return elapsed, done.stdout + done.stderr


def linked_inputs(frames: list[Path], repeat: int, folder: Path) -> list[Path]:
    """``repeat`` copies of the frame list as symbolic links (distinct names, same bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for r in range(repeat):
        for k, frame in enumerate(frames):
            suffix = "".join(frame.suffixes[-2:]) if frame.suffix in (".gz", ".bz2") \
                else frame.suffix
            link = folder / f"frame_{r:03d}_{k:03d}{suffix}"
            if not link.exists():
                link.symlink_to(frame.resolve())
            links.append(link)
    return links


def in_process(poni: str, frames: list[Path], npt: int, unit: str, threads: int | None,
               repeat: int) -> dict:
    """Per-frame times (ms, median) of the clip engine and of the picking."""
    import fabio

    import azfilter as az
    from azfilter import bragg

    geometry = az.load_poni(poni)
    first = fabio.open(os.fspath(frames[0])).data
    integrator = az.Integrator(geometry, npt=npt, unit=unit, threads=threads)
    integrator.sigma_clip(first, **CLIP)
    picker_geometry = bragg.pick_geometry(integrator)
    clip_ms, pick_ms, reference_ms, picked = [], [], [], []
    for path in frames:
        raw = fabio.open(os.fspath(path)).data
        dummy, delta = integrator.geometry.detector.dummy_for(raw.dtype)
        for _ in range(repeat):
            t0 = time.perf_counter()
            result = integrator.sigma_clip(raw, **CLIP)
            t1 = time.perf_counter()
            frame = bragg.sparsify_frame(raw, result, picker_geometry, 3.0, 1.0, dummy, delta)
            t2 = time.perf_counter()
            clip_ms.append(1e3 * (t1 - t0))
            pick_ms.append(1e3 * (t2 - t1))
        t3 = time.perf_counter()
        reference = bragg.pick_pixels_reference(raw, picker_geometry, frame.background,
                                                frame.background_std, 3.0, 1.0, dummy, delta)
        reference_ms.append(1e3 * (time.perf_counter() - t3))
        if not np.array_equal(reference, frame.index):
            raise SystemExit(f"{path}: compiled and reference pickers disagree")
        picked.append(int(frame.index.size))
    return {"shape": list(first.shape), "clip_ms": statistics.median(clip_ms),
            "pick_ms": statistics.median(pick_ms),
            "pick_reference_ms": statistics.median(reference_ms), "picked": picked}


def round_trip(sparse: Path, frames: list[Path], poni: str, npt: int, unit: str) -> dict:
    """Bit-exactness of the picked pixels after fabio's densify; 1-D pattern deviations."""
    import fabio
    import h5py

    import azfilter as az
    from azfilter.output.sparse import sparse_group_of

    integrator = az.Integrator(az.load_poni(poni), npt=npt, unit=unit)
    image = fabio.open(os.fspath(sparse))
    with h5py.File(sparse, "r") as h5:
        group = sparse_group_of(h5)
        ptr, index = group["frame_ptr"][()], group["index"][()]
        sem_all, std_all, original = (h5[f"entry/data/{n}"][()] for n in ("I_errors", "std", "I"))
    exact, in_sem, in_std, max_std = True, [], [], 0.0
    for k, path in enumerate(frames):
        raw = fabio.open(os.fspath(path)).data
        # fabio's getframe on a one-frame file looks for another file: use .data
        dense = image.data if image.nframes == 1 else image.getframe(k).data
        picked = index[ptr[k]:ptr[k + 1]]
        exact &= bool(np.array_equal(dense.ravel()[picked], raw.ravel()[picked]))
        again = integrator.sigma_clip(dense, **CLIP)
        filled = np.isfinite(again.intensity) & np.isfinite(original[k])
        deviation = np.abs(again.intensity - original[k])[filled]
        in_sem.append(float(np.mean(deviation <= sem_all[k][filled])))
        in_std.append(float(np.mean(deviation <= std_all[k][filled])))
        max_std = max(max_std, float(np.max(deviation / std_all[k][filled])))
    return {"picked_bit_exact": exact, "bins_within_sem": min(in_sem),
            "bins_within_std": min(in_std), "max_deviation_in_std": max_std}


def per_file_bytes(path: Path) -> int:
    """Bytes of the datasets written once per file (pixel radii, normalisation, bins)."""
    import h5py

    from azfilter.output.sparse import sparse_group_of

    with h5py.File(path, "r") as h5:
        group = sparse_group_of(h5)
        return sum(group[name].id.get_storage_size() for name in ("mask", "normalization",
                                                                  "radius"))


def steady_frame_bytes(path: Path) -> float:
    """Bytes one more frame adds in a long run: its picked pixels (compressed, as stored),
    its two background rows (float32) and its 1-D pattern row in /entry/data (uncompressed);
    not the allocation of the first partly filled HDF5 chunks, which dominates short runs."""
    import h5py

    from azfilter.output.sparse import sparse_group_of

    with h5py.File(path, "r") as h5:
        group = sparse_group_of(h5)
        frames = group["frame_ptr"].shape[0] - 1
        pixels = group["index"].id.get_storage_size() + group["intensity"].id.get_storage_size()
        npt = group["radius"].shape[0]
        data = h5["entry/data"]
        row = sum(data[name].dtype.itemsize for name in data
                  if data[name].ndim == 2 and data[name].shape[0] == frames)
        return pixels / max(frames, 1) + npt * (2 * 4 + row)


def pyfai_picked(path: Path) -> list[int]:
    import h5py

    try:
        import hdf5plugin  # noqa: F401 - pyFAI writes bitshuffle
    except ImportError:
        pass
    from azfilter.output.sparse import sparse_group_of

    with h5py.File(path, "r") as h5:
        return [int(n) for n in np.diff(sparse_group_of(h5)["frame_ptr"][()])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frames", nargs="+", type=Path, help="frames (CBF, EDF, ...)")
    parser.add_argument("-p", "--poni", required=True)
    parser.add_argument("--npt", type=int, default=800)
    parser.add_argument("--unit", default="r_mm")
    parser.add_argument("--backends", nargs="+", default=["cython", "opencl"])
    parser.add_argument("--device", default=None, help="azfilter --device for opencl")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the commands over the frames this many times")
    parser.add_argument("--no-pyfai", action="store_true")
    parser.add_argument("--pyfai-device-type", default="all")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_sparsify_"))
    work.mkdir(parents=True, exist_ok=True)
    frames = [f.resolve() for f in args.frames]
    inputs = linked_inputs(frames, args.repeat, work / "inputs")
    n_frames = len(inputs)
    azfilter = [sys.executable, "-m", "azfilter"]
    common = ["-q", "-p", args.poni, "--npt", str(args.npt), "--unit", args.unit, "--overwrite"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    report: dict = {"frames": n_frames, "distinct_frames": len(frames), "npt": args.npt,
                    "unit": args.unit}

    print(f"{len(frames)} distinct frames x {args.repeat} = {n_frames}; npt {args.npt} "
          f"({args.unit})")
    report["engine"] = engine = in_process(args.poni, frames, args.npt, args.unit,
                                           args.threads, repeat=3)
    print(f"detector {engine['shape']}: sigma-clip {engine['clip_ms']:.1f} ms/frame, picking "
          f"{engine['pick_ms']:.1f} ms (+{100 * engine['pick_ms'] / engine['clip_ms']:.0f} %), "
          f"numpy reference picking {engine['pick_reference_ms']:.1f} ms")

    rates = {}
    clip_out = work / "clip.h5"
    seconds, _ = run(azfilter + ["sigma-clip", *common, "--thres", "0", "--error-model",
                                 "poisson", *map(str, inputs), "-o", str(clip_out)])
    rates["azfilter sigma-clip cython"] = n_frames / seconds
    outputs = {}
    for backend in args.backends:
        out = work / f"sparse_{backend}.h5"
        extra = ["--backend", backend] + (["--device", args.device]
                                          if backend == "opencl" and args.device else [])
        seconds, _ = run(azfilter + ["sparsify", *common, *extra, *map(str, inputs),
                                     "-o", str(out)])
        rates[f"azfilter sparsify {backend}"] = n_frames / seconds
        outputs[backend] = out
    pyfai_out = None
    if not args.no_pyfai:
        tool = shutil.which("sparsify-Bragg", path=os.path.dirname(sys.executable)) or \
            shutil.which("sparsify-Bragg")
        if tool is None:
            print("pyFAI's sparsify-Bragg not found: skipped")
        else:
            pyfai_dir = work / "pyfai"
            pyfai_dir.mkdir(exist_ok=True)
            seconds, log = run([tool, "-p", os.path.abspath(args.poni), "--bins",
                                str(args.npt), "--unit", args.unit, "-A", "--dummy", "-2",
                                "--delta-dummy", "1.5", "--device-type",
                                args.pyfai_device_type, "-o", "{basename}_pyfai.h5",
                                *map(str, inputs)], cwd=pyfai_dir)
            rates["pyFAI sparsify-Bragg opencl (wall)"] = n_frames / seconds
            match = re.search(r"\(([\d.]+) fps\)", log)
            if match:
                rates["pyFAI sparsify-Bragg opencl (own log)"] = float(match.group(1))
            # sparsify-Bragg writes one file per input file
            pyfai_out = sorted(pyfai_dir.glob("*_pyfai.h5")) or None
    report["frames_per_s"] = rates
    print("\ncommand                                   frames/s   ratio to sparsify cython")
    reference_rate = rates.get("azfilter sparsify cython")
    for label, rate in rates.items():
        ratio = f"{rate / reference_rate:8.2f}" if reference_rate else "       -"
        print(f"{label:40s} {rate:9.2f}   {ratio}")

    first_out = outputs.get("cython") or next(iter(outputs.values()))
    raw_bytes = 0
    import fabio

    for frame in frames:
        data = fabio.open(os.fspath(frame)).data
        raw_bytes += data.size * data.dtype.itemsize
    raw_bytes *= args.repeat
    input_bytes = sum(os.path.getsize(f) for f in frames) * args.repeat
    size = os.path.getsize(first_out)
    constant = per_file_bytes(first_out)
    per_frame = steady_frame_bytes(first_out)
    report["compression"] = {"sparse_bytes": size, "raw_bytes": raw_bytes,
                             "input_bytes": input_bytes, "vs_raw": raw_bytes / size,
                             "vs_input": input_bytes / size, "per_file_bytes": constant,
                             "per_frame_bytes": per_frame,
                             "per_frame_vs_raw": raw_bytes / n_frames / per_frame,
                             "per_frame_vs_input": input_bytes / n_frames / per_frame}
    print(f"\nsparse file {size / 1e6:.2f} MB: {raw_bytes / size:.1f}x smaller than the raw "
          f"frames ({raw_bytes / 1e6:.1f} MB), {input_bytes / size:.2f}x than the input files "
          f"({input_bytes / 1e6:.1f} MB)")
    print(f"of which {constant / 1e6:.2f} MB once per file (pixel radii and normalisation "
          f"images); in a long run each frame adds {per_frame / 1e3:.0f} kB: "
          f"{raw_bytes / n_frames / per_frame:.0f}x smaller than raw, "
          f"{input_bytes / n_frames / per_frame:.1f}x than the input files")
    if pyfai_out is not None:
        pyfai_size = sum(os.path.getsize(p) for p in pyfai_out)
        report["compression"]["pyfai_bytes"] = pyfai_size
        print(f"pyFAI's files {pyfai_size / 1e6:.2f} MB in all ({len(pyfai_out)} files, "
              f"{raw_bytes / pyfai_size:.1f}x vs raw)")
        theirs = [n for path in pyfai_out for n in pyfai_picked(path)][:len(frames)]
        report["pyfai_picked"] = theirs
        print(f"picked pixels per frame: azfilter {engine['picked']}, pyFAI {theirs}")
    else:
        print(f"picked pixels per frame: azfilter {engine['picked']}")
    report["round_trip"] = trip = round_trip(first_out, frames, args.poni, args.npt, args.unit)
    print(f"round trip through fabio: picked pixels bit-exact: {trip['picked_bit_exact']}; "
          f"1-D pattern of the densified frames: {100 * trip['bins_within_sem']:.0f} % of bins "
          f"within 1 sem, {100 * trip['bins_within_std']:.0f} % within 1 std (max "
          f"{trip['max_deviation_in_std']:.2f} std)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
