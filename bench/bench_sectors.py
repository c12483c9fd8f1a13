"""N azimuthal sectors in one pass against N separate runs (azfilter) and pyFAI's one call per
sector.

One synthetic frame with texture (ring intensity varying with χ, Poisson noise, gaps, hot
pixels) on an Eiger 4M (or another detector), the same geometry, mask, polarization and
``npt`` radial bins everywhere. For each operation it prints ms per frame (median over
``--repeat`` runs after one warm-up) for:

- azfilter, one Integrator with ``sectors=N`` (one pass over the frame);
- azfilter, N Integrators, one per sector (``azimuth_range=sector``; with full splitting a
  one-sector Integrator, whose edges cut pixels by area as the one-pass table does);
- pyFAI 2026.9, one ``integrate1d_ng`` / ``sigma_clip_ng`` / ``medfilt1d_ng`` call per sector
  with ``azimuth_range=sector`` on one AzimuthalIntegrator: what a loop over sectors does.
  pyFAI keeps one engine per method, so each call with another azimuth range rebuilds the
  lookup table;
- with ``--pyfai-integrator-per-sector``, also pyFAI with one AzimuthalIntegrator per sector
  (each keeps its table: pyFAI's best case, at N times the memory of its pixel arrays);

and the first call (lookup tables built, empty azfilter cache) of each. It also prints the
largest relative difference between azfilter's one pass and pyFAI's calls for integrate
(bins with at least 20 pixels), as a check that both compute the same thing. Both use the
same explicit radial range (1-99 % of the pixels' q).

Usage: ``python bench/bench_sectors.py [--detector Eiger4M] [--sectors 36] [--npt 1000]
[--repeat 3] [--operations integrate sigma_clip medfilt] [--no-pyfai] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# a tilted detector, beam near the middle (as bench_engine.py)
GEOMETRIES = {
    "Pilatus1M": dict(dist=0.3, poni1=0.0905, poni2=0.0843, rot1=0.012, rot2=-0.007, rot3=0.0),
    "Eiger4M": dict(dist=0.2, poni1=0.0812, poni2=0.0776, rot1=0.010, rot2=-0.006, rot3=0.0),
}
WAVELENGTH = 1.0e-10
POLARIZATION = 0.99
# operation -> (azfilter method, its options, pyFAI method, its options)
OPERATIONS = {
    "integrate": ("integrate", {"split": "no", "error_model": "poisson"},
                  "integrate1d_ng", {"method": ("no", "csr", "cython"),
                                     "error_model": "poisson"}),
    "sigma_clip": ("sigma_clip", {"thres": 5.0, "max_iter": 5, "error_model": "azimuthal"},
                   "sigma_clip_ng", {"method": ("no", "csr", "cython"), "thres": 5.0,
                                     "max_iter": 5, "error_model": "azimuthal"}),
    "medfilt": ("medfilt", {"split": "full", "percentile": (10, 90)},
                "medfilt1d_ng", {"method": ("full", "csr", "cython"),
                                 "percentile": (10, 90)}),
}


def textured_frame(geometry, seed: int = 1) -> np.ndarray:
    """Rings whose intensity varies as ``1 + 0.7·cos(2χ − 1)``, Poisson noise, hot pixels,
    -1 in the gaps (int32) or 2^32 - 1 (uint32, Eiger)."""
    from tests.synthetic import true_profile

    rng = np.random.default_rng(seed)
    q = geometry.center_array("q")
    chi = geometry.center_array("chi")
    expected = true_profile(q) * (1.0 + 0.7 * np.cos(2.0 * chi - 1.0)) \
        * geometry.solid_angle() * geometry.polarization(POLARIZATION)
    counts = rng.poisson(expected)
    hot = rng.choice(counts.size, counts.size // 20000, replace=False)
    counts.reshape(-1)[hot] = rng.integers(100_000, 1_000_000, hot.size)
    gaps = np.asarray(geometry.detector.mask, dtype=bool)
    if geometry.detector.name.startswith("Eiger"):
        raw = counts.astype(np.uint32)
        raw[gaps] = np.iinfo(np.uint32).max
    else:
        raw = counts.astype(np.int32)
        raw[gaps] = -1
    return raw


def timed(function, repeat: int) -> tuple[float, float]:
    """(first call in ms, median of ``repeat`` further calls in ms)."""
    start = time.perf_counter()
    function()
    first = (time.perf_counter() - start) * 1e3
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        runs.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector", default="Eiger4M", choices=sorted(GEOMETRIES))
    parser.add_argument("--sectors", type=int, default=36)
    parser.add_argument("--npt", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--operations", nargs="+", default=["integrate", "sigma_clip"],
                        choices=sorted(OPERATIONS))
    parser.add_argument("--no-pyfai", action="store_true", help="azfilter only")
    parser.add_argument("--pyfai-integrator-per-sector", action="store_true",
                        help="also time pyFAI with one AzimuthalIntegrator per sector")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    cache = tempfile.TemporaryDirectory(prefix="azfilter-bench-sectors-")
    os.environ["AZFILTER_CACHE_DIR"] = cache.name   # cold tables: first calls build them
    from azfilter.detectors import get_detector
    from azfilter.geometry import Geometry
    from azfilter.integrator import Integrator

    geometry = Geometry(**GEOMETRIES[args.detector], wavelength=WAVELENGTH,
                        detector=get_detector(args.detector))
    frame = textured_frame(geometry)
    # an explicit radial range, the same for both tools (1-99 % of the pixels' q)
    low, high = np.quantile(geometry.center_array("q"), [0.01, 0.99])
    radial_range = (float(f"{low:.3g}"), float(f"{high:.3g}"))
    common = dict(npt=args.npt, unit="q_nm^-1", backend="cython", polarization=POLARIZATION,
                  radial_range=radial_range)
    together = Integrator(geometry, sectors=args.sectors, **common)
    bounds = together.sectors

    ai = None
    if not args.no_pyfai:
        import pyFAI
        from pyFAI.detectors import detector_factory
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator

        logging.getLogger("pyFAI").setLevel(logging.ERROR)
        def new_ai():
            return AzimuthalIntegrator(**GEOMETRIES[args.detector], wavelength=WAVELENGTH,
                                       detector=detector_factory(args.detector))

        ai = new_ai()
        mask = together.constants.static_mask.reshape(frame.shape) \
            | geometry.detector.invalid_pixels(frame)
        pyfai_version = pyFAI.version
    rows = []
    for name in args.operations:
        method, options, pyfai_method, pyfai_options = OPERATIONS[name]
        split = options.get("split", "no")
        one_pass = Integrator(geometry, sectors=args.sectors, **common)
        if split == "no":
            separate = [Integrator(geometry, azimuth_range=b, **common) for b in bounds]
        else:
            separate = [Integrator(geometry, sectors=[b], **common) for b in bounds]
        results = {}

        def run_one_pass(one_pass=one_pass, method=method, options=options, results=results):
            results["one"] = getattr(one_pass, method)(frame, **options)

        def run_separate(separate=separate, method=method, options=options):
            for integ in separate:
                getattr(integ, method)(frame, **options)

        row = {"operation": f"{name} ({split} split)"}
        row["one_first"], row["one_ms"] = timed(run_one_pass, args.repeat)
        row["separate_first"], row["separate_ms"] = timed(run_separate, args.repeat)
        if ai is not None:
            def run_pyfai(pyfai_method=pyfai_method, pyfai_options=pyfai_options,
                          results=results):
                results["pyfai"] = [
                    getattr(ai, pyfai_method)(frame, args.npt, unit="q_nm^-1", mask=mask,
                                              radial_range=radial_range,
                                              azimuth_range=tuple(b),
                                              polarization_factor=POLARIZATION,
                                              correctSolidAngle=True, **pyfai_options)
                    for b in bounds]

            row["pyfai_first"], row["pyfai_ms"] = timed(run_pyfai, args.repeat)
            if args.pyfai_integrator_per_sector:
                ais = [new_ai() for _ in bounds]

                def run_pyfai_each(ais=ais, pyfai_method=pyfai_method,
                                   pyfai_options=pyfai_options):
                    for each, b in zip(ais, bounds, strict=True):
                        getattr(each, pyfai_method)(
                            frame, args.npt, unit="q_nm^-1", mask=mask,
                            radial_range=radial_range, azimuth_range=tuple(b),
                            polarization_factor=POLARIZATION, correctSolidAngle=True,
                            **pyfai_options)

                row["pyfai_each_first"], row["pyfai_each_ms"] = timed(run_pyfai_each,
                                                                      args.repeat)
                del ais
            if name == "integrate":
                # same bins (explicit radial range); the first and last bin left out, where
                # pyFAI piles in pixels from below the range
                worst = 0.0
                for k, ref in enumerate(results["pyfai"]):
                    ours = results["one"].sector(k)
                    filled = ours.count[1:-1] >= 20
                    diff = np.abs(ours.intensity[1:-1] - ref.intensity[1:-1])[filled] \
                        / np.abs(ref.intensity[1:-1][filled])
                    worst = max(worst, float(diff.max(initial=0.0)))
                row["max_rel_diff_vs_pyfai"] = worst
        rows.append(row)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\n{args.detector} {frame.shape}, {args.sectors} sectors x {args.npt} bins, "
          f"cython backend; {os.cpu_count()} CPUs, load {load[0]:.1f}/{load[1]:.1f}/"
          f"{load[2]:.1f}, {platform.processor() or platform.machine()}"
          + ("" if ai is None else f"; pyFAI {pyfai_version}"))
    header = ("| operation | azfilter 1 pass | azfilter N runs | pyFAI N calls | "
              "N runs / 1 pass | pyFAI / 1 pass | first call: 1 pass / N runs / pyFAI |")
    print(header)
    print("|---" * 7 + "|")
    for row in rows:
        pyfai_ms = row.get("pyfai_ms", float("nan"))
        print(f"| {row['operation']} | {row['one_ms']:.1f} ms | {row['separate_ms']:.1f} ms | "
              f"{pyfai_ms:.1f} ms | {row['separate_ms'] / row['one_ms']:.1f}x | "
              f"{pyfai_ms / row['one_ms']:.1f}x | {row['one_first'] / 1e3:.1f} s / "
              f"{row['separate_first'] / 1e3:.1f} s / "
              f"{row.get('pyfai_first', float('nan')) / 1e3:.1f} s |")
    for row in rows:
        if "pyfai_each_ms" in row:
            print(f"{row['operation']}: pyFAI with one AzimuthalIntegrator per sector: "
                  f"{row['pyfai_each_ms']:.1f} ms per frame "
                  f"({row['pyfai_each_ms'] / row['one_ms']:.1f}x azfilter's one pass), "
                  f"first call {row['pyfai_each_first'] / 1e3:.1f} s")
    for row in rows:
        if "max_rel_diff_vs_pyfai" in row:
            print(f"{row['operation']}: largest relative difference, azfilter one pass vs "
                  f"pyFAI per sector (bins of >= 20 pixels): {row['max_rel_diff_vs_pyfai']:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"detector": args.detector, "sectors": args.sectors,
                                         "npt": args.npt, "load": load, "rows": rows},
                                        indent=2))
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
