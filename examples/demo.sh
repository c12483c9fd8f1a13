#!/usr/bin/env bash
# The azfilter demo: reduce the synthetic data of examples/make_demo_data.py with the three
# operations, to text and HDF5 outputs, and plot the results.
#
# Usage: examples/demo.sh OUT_DIR        (the data are in OUT_DIR/data; `make demo` does both)
# AZFILTER_DEMO_BACKEND=python|cython|opencl picks the engine (default: cython).
set -euo pipefail

out=${1:-demo-output}
data=$out/data
backend=${AZFILTER_DEMO_BACKEND:-cython}
common=(-p "$data/demo.poni" --backend "$backend" --npt 1500 --unit 2th_deg --polarization 0.95
        --overwrite)

echo "== what we have"
azfilter info "$data/demo.poni" "$data/stack.h5" "$data/frame_0001.cbf"

echo "== plain integration: one .xy text file per CBF frame"
azfilter integrate "${common[@]}" "$data"/frame_*.cbf -o "$out/integrate/"

echo "== sigma-clipping (Bragg spots and zingers rejected): the CBFs and the HDF5 stack, one NeXus file"
azfilter sigma-clip "${common[@]}" --thres 4 "$data"/frame_*.cbf "$data/stack.h5" \
    -o "$out/sigma_clip.h5" --save-config "$out/sigma_clip_job.toml"

echo "== median filter (full pixel splitting, mean of the 20-80 % quantiles), same frames"
azfilter medfilt "${common[@]}" --percentile 20 80 "$data"/frame_*.cbf "$data/stack.h5" \
    -o "$out/medfilt.h5"

echo "== the same first frame by the three operations, as text"
azfilter sigma-clip "${common[@]}" --thres 4 "$data/frame_0001.cbf" -o "$out/frame_0001_sigma_clip.xy"
azfilter medfilt "${common[@]}" --percentile 20 80 "$data/frame_0001.cbf" -o "$out/frame_0001_medfilt.xy"

echo "== plots"
azfilter plot --overwrite --log --title "frame_0001: integrate vs sigma-clip vs medfilt" \
    "$out/integrate/frame_0001.xy" "$out/frame_0001_sigma_clip.xy" "$out/frame_0001_medfilt.xy" \
    -o "$out/compare_operations.png"
azfilter plot --overwrite --heatmap --log "$out/sigma_clip.h5" -o "$out/sigma_clip_heatmap.png"

echo "== rerun the sigma-clip job from its saved config (only new frames: none)"
azfilter run "$out/sigma_clip_job.toml" --skip-existing
azfilter info "$out/sigma_clip.h5"

echo "demo done: see $out/compare_operations.png, $out/sigma_clip_heatmap.png, $out/*.h5, $out/integrate/"
