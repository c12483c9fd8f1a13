#!/usr/bin/env bash
# One line: sigma-clip every CBF frame of a run into one text file per frame, 2theta in degrees.
#
# Usage: examples/oneliner.sh GEOMETRY.poni DATA_DIR OUT_DIR [more azfilter options...]
set -euo pipefail
poni=$1 data=$2 out=$3
shift 3

azfilter sigma-clip -p "$poni" --unit 2th_deg --npt 2000 --polarization 0.99 "$@" "$data"/*.cbf -o "$out"/
