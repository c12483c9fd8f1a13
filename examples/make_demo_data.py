#!/usr/bin/env python3
"""Write a small synthetic powder-diffraction data set for the azfilter demo.

Usage: ``python examples/make_demo_data.py OUT_DIR [--frames-cbf 4] [--frames-h5 8] [--seed 0]``

OUT_DIR receives:

- ``demo.poni``: a Pilatus 300K (619 x 487 pixels, two horizontal module gaps) 150 mm from the
  sample, 0.7 A X-rays, beam near the top-left corner, slightly tilted;
- ``frame_0001.cbf`` ...: single frames (int32, Pilatus byte-offset CBF);
- ``stack.h5``: a NeXus/HDF5 stack ``/entry/data/data`` of shape (n, 619, 487), gzip.

Every frame holds CeO2-like powder rings on a decaying background (Poisson noise, solid angle
and polarization applied), Bragg spots from large crystallites, zingers (single hot pixels),
module gaps at -1 and a few dead pixels at -2 (the Pilatus dummy values).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import azfilter as az  # noqa: E402

PONI = """\
# Synthetic geometry of the azfilter demo
poni_version: 2.1
Detector: Pilatus300k
Detector_config: {"orientation": 3}
Distance: 0.15
Poni1: 0.012
Poni2: 0.018
Rot1: 0.05
Rot2: -0.03
Rot3: 0.0
Wavelength: 7e-11
"""

# CeO2 reflections: d-spacings (A) and relative intensities
CEO2 = [(3.124, 100), (2.706, 30), (1.913, 55), (1.632, 45), (1.562, 8), (1.353, 7),
        (1.241, 16), (1.210, 9), (1.104, 12)]


def ideal_pattern(q: np.ndarray) -> np.ndarray:
    """Expected counts per pixel at q (nm^-1), before solid angle and polarization."""
    intensity = 40.0 * np.exp(-q / 25.0) + 8.0
    for d_spacing, height in CEO2:
        q0 = 2 * np.pi / (d_spacing / 10.0)  # nm^-1
        intensity += 6.0 * height * np.exp(-0.5 * ((q - q0) / 0.12) ** 2)
    return intensity


def make_frame(expected: np.ndarray, gaps: np.ndarray, dead: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    frame = rng.poisson(expected).astype(np.int32)
    rows, cols = frame.shape
    # Bragg spots from large crystallites: small bright blobs on the rings.
    on_ring = np.argwhere(expected > np.percentile(expected, 97))
    for k in rng.choice(len(on_ring), size=40, replace=False):
        i, j = on_ring[k]
        height = rng.uniform(500, 20000)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                if 0 <= i + di < rows and 0 <= j + dj < cols:
                    weight = 1.0 if di == dj == 0 else 0.35
                    frame[i + di, j + dj] += int(height * weight)
    # Zingers: single hot pixels anywhere.
    hot = rng.integers(0, frame.size, size=25)
    frame.flat[hot] += rng.integers(50_000, 1_000_000, size=hot.size).astype(np.int32)
    frame[gaps] = -1
    frame[dead] = -2
    return frame


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--frames-cbf", type=int, default=4)
    parser.add_argument("--frames-h5", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import fabio.cbfimage
    import h5py

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    poni_path = out / "demo.poni"
    poni_path.write_text(PONI)
    geometry = az.load_poni(poni_path)
    shape = geometry.detector.shape
    rng = np.random.default_rng(args.seed)

    q = geometry.array("q_nm^-1")
    expected = ideal_pattern(q) * geometry.solid_angle() * geometry.polarization(0.95)
    gaps = np.asarray(geometry.detector.mask, dtype=bool)
    dead = np.zeros(shape, dtype=bool)
    dead.flat[rng.integers(0, dead.size, size=60)] = True

    for number in range(1, args.frames_cbf + 1):
        frame = make_frame(expected, gaps, dead, rng)
        path = out / f"frame_{number:04d}.cbf"
        fabio.cbfimage.CbfImage(data=frame).write(os.fspath(path))

    stack_path = out / "stack.h5"
    tmp = stack_path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as h5:
        h5.attrs["NX_class"] = "NXroot"
        h5.attrs["default"] = "entry"
        entry = h5.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        data_group = entry.create_group("data")
        data_group.attrs["NX_class"] = "NXdata"
        data_group.attrs["signal"] = "data"
        data = data_group.create_dataset(
            "data", shape=(args.frames_h5, *shape), dtype=np.int32,
            chunks=(1, *shape), compression="gzip", compression_opts=1)
        for k in range(args.frames_h5):
            data[k] = make_frame(expected, gaps, dead, rng)
    os.replace(tmp, stack_path)
    print(f"demo data in {out}: {poni_path.name}, {args.frames_cbf} CBF frames, "
          f"{stack_path.name} ({args.frames_h5} frames of {shape[0]}x{shape[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
