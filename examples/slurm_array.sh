#!/usr/bin/env bash
# Reduce thousands of frames as a SLURM array job, then join the shards into one NeXus file.
#
#   examples/slurm_array.sh submit GEOMETRY.poni 'INPUTS' OUT.h5 [NTASKS]
#       submits an array of NTASKS tasks (default 16), each reducing its shard of the frames
#       (azfilter reads SLURM_ARRAY_TASK_ID/COUNT itself and writes OUT_shardIIofNN.h5), and
#       a merge job that starts when all tasks succeeded and writes OUT.h5.
#   examples/slurm_array.sh task GEOMETRY.poni 'INPUTS' OUT.h5
#       what each array task runs (INPUTS is a quoted glob, expanded by azfilter).
#   examples/slurm_array.sh merge OUT.h5 NTASKS
#       what the merge job runs.
#
# Set AZFILTER_OPTIONS for the reduction options, e.g. AZFILTER_OPTIONS="--npt 3000 --thres 4".
#SBATCH --job-name=azfilter
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
set -euo pipefail

mode=$1
shift
case $mode in
  submit)
    poni=$1 inputs=$2 output=$3 ntasks=${4:-16}
    array_job=$(sbatch --parsable --array=0-$((ntasks - 1)) "$0" task "$poni" "$inputs" "$output")
    sbatch --dependency=afterok:"$array_job" --job-name=azfilter-merge --cpus-per-task=1 \
        "$0" merge "$output" "$ntasks"
    ;;
  task)
    poni=$1 inputs=$2 output=$3
    # --shard defaults to this array task; --skip-existing makes a resubmitted task cheap.
    # shellcheck disable=SC2086
    azfilter sigma-clip -p "$poni" --threads "${SLURM_CPUS_PER_TASK:-1}" ${AZFILTER_OPTIONS:-} \
        --skip-existing --quiet "$inputs" -o "$output"
    ;;
  merge)
    output=$1 ntasks=$2
    # the names azfilter gives the shards: OUT_shard<I>of<N>.h5, I zero-padded like N-1
    last=$((ntasks - 1))
    shards=()
    for ((i = 0; i < ntasks; i++)); do
      shards+=("$(printf '%s_shard%0*dof%d.%s' "${output%.*}" "${#last}" "$i" "$ntasks" "${output##*.}")")
    done
    azfilter merge "${shards[@]}" -o "$output" --overwrite
    ;;
  *)
    echo "usage: $0 submit|task|merge ..." >&2
    exit 2
    ;;
esac
