"""Per-frame timings of the OpenCL engine, optionally side by side with pyFAI's OpenCL engine.

For each detector (synthetic frame: rings, Poisson noise, Bragg spots, hot pixels, gaps) and
each operation it prints the wall time per frame of one engine call -- upload of the raw frame
in its own dtype, kernels, read-back of the per-bin sums -- as the median over ``--repeat``
calls after a warm-up, for a frame in ordinary (pageable) memory and for one already in
page-locked memory (``OpenCLEngine.pinned_array``, where a reader could decode it); the
upload alone (from pageable and from page-locked memory); and the
throughput of a stream of frames through ``OpenCLEngine.process_many`` (uploads overlapping
the kernels). With ``--pyfai`` the
same operation runs in pyFAI (``method=(split, "csr", "opencl")``) on the same device when
pyFAI picks it, with the same geometry, mask and number of bins.

Usage::

    python bench/bench_opencl.py [--detectors Pilatus1M Eiger4M Eiger9M] [--device gpu]
                                 [--repeat 20] [--stream 1000] [--pyfai] [--json F]
    python bench/bench_opencl.py --quick      # small and slow-device friendly (PoCL)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from azfilter.backends.opencl import OpenCLEngine, opencl_status  # noqa: E402
from azfilter.binning import build_csr  # noqa: E402
from azfilter.detectors import get_detector  # noqa: E402
from azfilter.geometry import Geometry  # noqa: E402
from azfilter.preproc import pixel_constants  # noqa: E402

# Tilted detectors ~0.2-0.3 m from the sample, beam near the middle (as bench_engine.py).
GEOMETRIES = {
    "Pilatus300k": dict(dist=0.25, poni1=0.0532, poni2=0.0461, rot1=0.012, rot2=-0.007),
    "Pilatus1M": dict(dist=0.3, poni1=0.0905, poni2=0.0843, rot1=0.012, rot2=-0.007),
    "Eiger4M": dict(dist=0.2, poni1=0.0812, poni2=0.0776, rot1=0.010, rot2=-0.006),
    "Eiger9M": dict(dist=0.25, poni1=0.1226, poni2=0.1166, rot1=0.010, rot2=-0.006),
}
WAVELENGTH = 1.0e-10
POLARIZATION = 0.99
UNIT = "q_nm^-1"

# label -> (split, engine method, its parameters, pyFAI method name, pyFAI keywords)
OPERATIONS = {
    "integrate no-split": ("no", "integrate", dict(error_model="poisson"),
                           "integrate1d", dict(error_model="poisson")),
    "integrate full-split": ("full", "integrate", dict(error_model="poisson"),
                             "integrate1d", dict(error_model="poisson")),
    "sigma_clip": ("no", "sigma_clip", dict(thres=5.0, max_iter=5, error_model="azimuthal"),
                   "sigma_clip_ng", dict(thres=5.0, max_iter=5, error_model="azimuthal")),
    "medfilt full-split": ("full", "medfilt",
                           dict(quant_min=0.4, quant_max=0.6, error_model="poisson"),
                           "medfilt1d_ng", dict(percentile=(40, 60), error_model="poisson")),
}


def geometry(detector_name: str) -> Geometry:
    return Geometry(**GEOMETRIES[detector_name], rot3=0.0, wavelength=WAVELENGTH,
                    detector=get_detector(detector_name))


def frames_for(geo: Geometry, count: int) -> list[np.ndarray]:
    """Distinct synthetic frames (Pilatus int32 with -1/-2, Eiger uint32 with 2^32-1)."""
    from synthetic import synthetic_frame
    return [synthetic_frame(geometry=geo, seed=seed) for seed in range(count)]


def progress(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_ms(call, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def pinned_copies(engine: OpenCLEngine, frames: list[np.ndarray]) -> list[np.ndarray]:
    """The frames copied into the engine's page-locked memory (as a reader could decode)."""
    copies = []
    for frame in frames:
        pinned = engine.pinned_array(frame.shape, frame.dtype)
        pinned[...] = frame
        copies.append(pinned)
    return copies


def bench_azfilter(geo, frames, npt: int, device: str | None, repeat: int, stream: int,
                   labels: list[str], tuning: dict) -> tuple[dict, dict]:
    detector = geo.detector
    const = pixel_constants(geo, polarization=POLARIZATION)
    dummy, delta = detector.dummy_for(frames[0].dtype)
    results, info = {}, {}
    engines: dict[str, OpenCLEngine] = {}
    for label in labels:
        split, method, params, _, _ = OPERATIONS[label]
        if split not in engines:
            progress(f"{detector.name}: {split}-split table")
            started = time.perf_counter()
            csr = build_csr(geo, UNIT, npt, split, const.static_mask)
            table_s = time.perf_counter() - started
            started = time.perf_counter()
            engines[split] = OpenCLEngine(csr, const.pixel_norm, const.dark, dummy, delta,
                                          device=device, **tuning)
            info[split] = dict(nnz=csr.nnz, max_row=int(np.diff(csr.indptr).max()),
                               table_s=table_s, engine_s=time.perf_counter() - started)
        engine = engines[split]
        run = getattr(engine, method)
        progress(f"{detector.name}: azfilter {label}")
        started = time.perf_counter()
        run(frames[0], **params)                       # compiles for this dtype
        first_ms = (time.perf_counter() - started) * 1e3
        run(frames[1 % len(frames)], **params)
        single = median_ms(lambda: run(frames[0], **params), repeat)  # noqa: B023
        pinned = pinned_copies(engine, frames)
        single_pinned = median_ms(lambda: run(pinned[0], **params), repeat)  # noqa: B023
        upload = median_ms(lambda eng=engine: eng._cl.enqueue_copy(
            eng._transfer_queue, eng._raw[0], frames[0]).wait(), repeat)
        pinned_upload = median_ms(lambda eng=engine, src=pinned[0]: eng._cl.enqueue_copy(
            eng._transfer_queue, eng._raw[0], src).wait(), repeat)
        fps = {}
        for kind, source in (("numpy", frames), ("pinned", pinned)):
            stream_frames = (source[i % len(source)] for i in range(stream))
            started = time.perf_counter()
            count = sum(1 for _ in engine.process_many(stream_frames, method, **params))
            fps[kind] = count / (time.perf_counter() - started)
        results[label] = dict(ms=single, pinned_ms=single_pinned, upload_ms=upload,
                              pinned_upload_ms=pinned_upload,
                              first_ms=first_ms,
                              stream_fps=fps["numpy"], stream_pinned_fps=fps["pinned"])
    engine = next(iter(engines.values()))
    return results, dict(tables=info, device=engine.device_info,
                         engine=dict(workgroup_size=engine.workgroup_size,
                                     local_sort_size=engine.local_sort_size, fp64=engine.fp64))


def bench_pyfai(geo, frames, npt: int, repeat: int, labels: list[str]) -> dict:
    from pyFAI.detectors import detector_factory
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator

    detector = detector_factory(geo.detector.name)
    mask = np.asarray(geo.detector.mask, dtype=bool) | geo.detector.invalid_pixels(frames[0])
    detector.mask = mask.astype(np.int8)
    results = {}
    for label in labels:
        split, _, _, method_name, kwargs = OPERATIONS[label]
        ai = AzimuthalIntegrator(dist=geo.dist, poni1=geo.poni1, poni2=geo.poni2, rot1=geo.rot1,
                                 rot2=geo.rot2, rot3=geo.rot3, wavelength=geo.wavelength,
                                 detector=detector)
        call = getattr(ai, method_name)
        progress(f"{geo.detector.name}: pyFAI {label}")
        options = dict(unit=UNIT, method=(split, "csr", "opencl"),
                       polarization_factor=POLARIZATION, **kwargs)
        started = time.perf_counter()
        out = call(frames[0], npt, **options)
        first_ms = (time.perf_counter() - started) * 1e3
        call(frames[1 % len(frames)], npt, **options)
        single = median_ms(lambda: call(frames[0], npt, **options), repeat)  # noqa: B023
        results[label] = dict(ms=single, first_ms=first_ms,
                              engine=str(getattr(out, "method", "")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detectors", nargs="+", default=["Pilatus1M", "Eiger4M", "Eiger9M"],
                        choices=sorted(GEOMETRIES))
    parser.add_argument("--operations", nargs="+", default=list(OPERATIONS),
                        choices=list(OPERATIONS))
    parser.add_argument("--device", default=None, help="gpu, cpu or P:D (default: best)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--stream", type=int, default=1000,
                        help="frames streamed through process_many")
    parser.add_argument("--npt", type=int, default=None,
                        help="radial bins (default: the larger image dimension)")
    parser.add_argument("--workgroup-size", type=int, default=None,
                        help="OpenCLEngine workgroup_size (default: the engine's choice)")
    parser.add_argument("--local-sort-size", type=int, default=None,
                        help="OpenCLEngine local_sort_size (default: the engine's choice)")
    parser.add_argument("--pyfai", action="store_true", help="also time pyFAI's OpenCL engine")
    parser.add_argument("--quick", action="store_true",
                        help="Pilatus1M only, 3 repeats, 10 streamed frames (PoCL-friendly)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    if args.quick:
        args.detectors, args.repeat, args.stream = ["Pilatus1M"], 3, 10

    print(f"# {opencl_status()}")
    table = []
    everything = {}
    for name in args.detectors:
        geo = geometry(name)
        frames = frames_for(geo, 4 if args.stream > 4 else 2)
        npt = args.npt or max(frames[0].shape)
        tuning = {key: value for key, value in (("workgroup_size", args.workgroup_size),
                                                ("local_sort_size", args.local_sort_size))
                  if value}
        ours, info = bench_azfilter(geo, frames, npt, args.device, args.repeat, args.stream,
                                    args.operations, tuning)
        theirs = bench_pyfai(geo, frames, npt, args.repeat, args.operations) if args.pyfai \
            else {}
        everything[name] = dict(azfilter=ours, pyfai=theirs, info=info, npt=npt,
                                dtype=str(frames[0].dtype))
        engine_info = info["engine"]
        print(f"# {name}: {frames[0].shape} {frames[0].dtype}, npt={npt}, device "
              f"{info['device']['name']} (work-group {engine_info['workgroup_size']}, local "
              f"sort {engine_info['local_sort_size']}, fp64 {engine_info['fp64']}), tables: "
              + ", ".join(f"{split} split nnz={t['nnz']} longest row={t['max_row']} "
                          f"(built in {t['table_s']:.1f} s)"
                          for split, t in info["tables"].items()))
        for label in args.operations:
            table.append((name, label, ours[label], theirs.get(label)))

    print("| detector | operation | azfilter ms/frame | ... frame in pinned memory | "
          "upload ms (pageable / pinned) | streamed frames/s (numpy / pinned) | first call ms | "
          "pyFAI OpenCL ms/frame | speed-up |")
    print("|" + "---|" * 9)
    for name, label, mine, other in table:
        versus = f"{other['ms']:.2f} | {other['ms'] / mine['ms']:.1f}x" if other else " | "
        print(f"| {name} | {label} | {mine['ms']:.2f} | {mine['pinned_ms']:.2f} | "
              f"{mine['upload_ms']:.2f} / {mine['pinned_upload_ms']:.2f} | "
              f"{mine['stream_fps']:.0f} / {mine['stream_pinned_fps']:.0f} | "
              f"{mine['first_ms']:.0f} | {versus} |")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
