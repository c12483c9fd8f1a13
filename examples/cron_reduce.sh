#!/usr/bin/env bash
# Reduce the new frames of a directory that keeps filling; meant for cron, e.g. every minute:
#
#   * * * * * /opt/azfilter/examples/cron_reduce.sh /data/geo.poni /data/incoming /data/reduced
#
# Frames whose output already exists (and is complete) are skipped, so each run only reduces
# what arrived since the last one.  Nothing is printed when all goes well (cron sends no mail);
# unreadable or corrupt frames are named on stderr and the exit status is 3.  No wrapper lock
# is needed: azfilter locks its output, so a run that starts while the previous one is still
# writing waits for it and then reduces only what is left (never the same frame twice).
#
# Usage: cron_reduce.sh GEOMETRY.poni INCOMING_DIR REDUCED_DIR [extra azfilter options...]
set -uo pipefail
poni=$1 incoming=$2 reduced=$3
shift 3

mkdir -p "$reduced"
azfilter sigma-clip -p "$poni" --recursive --skip-existing --quiet "$@" "$incoming" -o "$reduced"/
