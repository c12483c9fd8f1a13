#!/usr/bin/env bash
# Reduce thousands of frames as a SLURM array job, then join the shards into one NeXus file.
#
#   examples/slurm_array.sh submit [SBATCH_OPTION...] -- OPERATION GEOMETRY.poni 'INPUTS' OUT.h5 \
#       [AZFILTER_OPTION...]
#       Submits an array job whose task k reduces shard k of the frames into
#       OUT_shard<k>of<N>.h5, and a merge job (--dependency=afterany on the array) that checks
#       every task's status and joins the shards into OUT.h5. SBATCH_OPTIONs go to both jobs
#       (e.g. --partition=p --time=1:00:00 --account=a); --array=SPEC chooses the tasks
#       (default --array=0-15): N = the number of task ids, which must be evenly spaced
#       (0-15, 1-31:2, 0-99%10, 1,3,5; not 1,3,8); --cpus-per-task=C gives each task C threads
#       (default 1 CPU per task). OPERATION is integrate, sigma-clip or medfilt; INPUTS is quoted
#       (azfilter expands globs itself); AZFILTER_OPTIONs are the reduction options
#       (--npt 3000 --thres 4 ...). Example:
#         examples/slurm_array.sh submit --array=0-31%8 --cpus-per-task=4 --time=2:00:00 -- \
#             sigma-clip geo.poni 'run1/*.cbf' results/run1.h5 --npt 3000
#   examples/slurm_array.sh task SHARD OPERATION GEOMETRY.poni 'INPUTS' OUT.h5 [AZFILTER_OPTION...]
#       What each array task runs. SHARD is I/N (shard I of N) or MIN:STEP/N (inside an array
#       job whose task ids are MIN, MIN+STEP, ...: shard (SLURM_ARRAY_TASK_ID-MIN)/STEP of N).
#       Runs azfilter OPERATION ... --shard I/N --skip-existing.
#   examples/slurm_array.sh merge OUT.h5 N
#       What the merge job runs: checks the N tasks' statuses and shard files, then
#       `azfilter merge` the shards into OUT.h5 (with N=1 the task wrote OUT.h5 itself).
#
# Logs and statuses: OUT.logs/ next to OUT.h5 holds task_<ID>.log for each array task id (a
# rerun appends to it), merge_<JOB>.log, and shard_<I>.status (the exit status of shard I's
# last run, "started" while it runs or when it was killed). The merge job exits 0 only when
# every shard ran to the end without a failed frame; otherwise it names the shards and exits
# 1 (a task killed, cancelled, timed out, never run, or its shard file missing: OUT.h5 is not
# written) or 3 (frames failed to read or reduce, listed in the task logs: OUT.h5 is written
# without them).
#
# Rerun one shard I of N (after a failure, a time limit, a cancelled task): the command the
# task ran, on any machine that sees the files,
#   azfilter OPERATION -p GEOMETRY.poni [AZFILTER_OPTION...] 'INPUTS' -o OUT.h5 --shard I/N --skip-existing
# through this script (so that its status is recorded for the merge), here or as a job:
#   examples/slurm_array.sh task I/N OPERATION GEOMETRY.poni 'INPUTS' OUT.h5 [AZFILTER_OPTION...]
#   sbatch [SBATCH_OPTION...] examples/slurm_array.sh task I/N OPERATION ...
# or requeue the array task itself: scontrol requeue ARRAYJOB_TASKID (it runs again after
# SLURM's requeue delay of about 2 minutes, or at once after
# scontrol update JobId=ARRAYJOB_TASKID StartTime=now). Then merge again:
#   examples/slurm_array.sh merge OUT.h5 N
#   (or sbatch [--dependency=afterany:JOB] examples/slurm_array.sh merge OUT.h5 N).
# --skip-existing keeps the frames a shard file already holds; outputs are written atomically,
# so a task killed in the middle leaves no partial shard file and its rerun reduces the shard.
#
# Environment: AZFILTER, the azfilter command (default: azfilter on PATH). The jobs see the
# submitting shell's environment (sbatch's default --export=ALL); otherwise put azfilter on the
# jobs' PATH or pass its absolute path (--export=AZFILTER=/path/to/venv/bin/azfilter).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

die() { echo "slurm_array.sh: $*" >&2; exit 2; }

azfilter_cmd=${AZFILTER:-azfilter}

# shard_name OUT.h5 I N -> the file azfilter writes for shard I of N (OUT_shard<I>of<N>.h5, I
# zero-padded like N-1; OUT.h5 itself when N=1).
shard_name() {
  local output=$1 index=$2 count=$3 last
  if ((count == 1)); then echo "$output"; return; fi
  last=$((count - 1))
  printf '%s_shard%0*dof%d.%s\n' "${output%.*}" "${#last}" "$index" "$count" "${output##*.}"
}

logs_dir() { echo "${1%.*}.logs"; }

# array_ids SPEC -> the task ids of an sbatch --array SPEC (without its %LIMIT), one a line.
array_ids() {
  local spec=${1%%\%*} part first last step
  IFS=, read -ra parts <<<"$spec"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)-([0-9]+)(:([0-9]+))?$ ]]; then
      first=${BASH_REMATCH[1]} last=${BASH_REMATCH[2]} step=${BASH_REMATCH[4]:-1}
      ((step > 0 && first <= last)) || die "--array=$1: cannot read '$part'"
      seq "$first" "$step" "$last"
    elif [[ $part =~ ^[0-9]+$ ]]; then
      echo "$part"
    else
      die "--array=$1: cannot read '$part' (use A-B, A-B:S, A,B,C, optionally %LIMIT)"
    fi
  done | sort -n -u
}

mode=${1:-}
[[ -n $mode ]] || usage
shift
case $mode in
  submit)
    sbatch_options=() array_spec=
    while (($#)) && [[ $1 != -- ]]; do
      case $1 in
        --array=*) array_spec=${1#--array=} ;;
        --array|-a) (($# > 1)) || die "$1 needs a value"; array_spec=$2; shift ;;
        -a*) array_spec=${1#-a} ;;
        *) sbatch_options+=("$1") ;;
      esac
      shift
    done
    [[ ${1:-} == -- ]] || die "submit: put -- between the sbatch options and OPERATION"
    shift
    (($# >= 4)) || die "submit: expected -- OPERATION GEOMETRY.poni 'INPUTS' OUT.h5 [AZFILTER_OPTION...]"
    operation=$1 poni=$2 inputs=$3 output=$4
    shift 4
    [[ $output == *.h5 || $output == *.nxs || $output == *.hdf5 || $output == *.nx5 ]] ||
      die "OUT must be an HDF5 file (.h5, .nxs): the shards are joined by azfilter merge"
    array_spec=${array_spec:-0-15}
    mapfile -t ids < <(array_ids "$array_spec")
    count=${#ids[@]}
    ((count >= 1)) || die "--array=$array_spec: no task ids"
    first=${ids[0]} step=1
    ((count > 1)) && step=$((ids[1] - ids[0]))
    for ((k = 1; k < count; k++)); do
      ((ids[k] - ids[k - 1] == step)) || die "--array=$array_spec: task ids ${ids[*]} are not evenly spaced; submit an evenly spaced array, or rerun single shards with --shard I/N (see the header of $0)"
    done
    logs=$(logs_dir "$output")
    mkdir -p "$logs"
    rm -f "$logs"/shard_*.status
    # Check the command once here (exit 2 on a usage error) rather than in every task.
    if ! check=$("$azfilter_cmd" "$operation" -p "$poni" "$@" --skip-existing --dry-run \
        --quiet --shard "0/$count" "$inputs" -o "$output" 2>&1 >/dev/null); then
      echo "$check" >&2
      die "submit: the azfilter command above fails; nothing submitted"
    fi
    array_job=$(sbatch --parsable --job-name=azfilter --output="$logs/task_%a.log" \
        --open-mode=append "${sbatch_options[@]}" --array="$array_spec" \
        "$0" task "$first:$step/$count" "$operation" "$poni" "$inputs" "$output" "$@")
    array_job=${array_job%%;*}
    # The merge needs one CPU; the caller's options come first so that these win.
    merge_job=$(sbatch --parsable --job-name=azfilter-merge "${sbatch_options[@]}" \
        --output="$logs/merge_%j.log" --open-mode=append --cpus-per-task=1 --ntasks=1 \
        --dependency=afterany:"$array_job" "$0" merge "$output" "$count")
    merge_job=${merge_job%%;*}
    echo "array job $array_job ($count tasks, --array=$array_spec), merge job $merge_job -> $output (logs in $logs/)"
    ;;
  task)
    (($# >= 5)) || usage
    shard=$1 operation=$2 poni=$3 inputs=$4 output=$5
    shift 5
    if [[ $shard =~ ^([0-9]+):([0-9]+)/([0-9]+)$ ]]; then
      first=${BASH_REMATCH[1]} step=${BASH_REMATCH[2]} count=${BASH_REMATCH[3]}
      [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] || die "task $shard: not inside an array job (no SLURM_ARRAY_TASK_ID); give I/N"
      offset=$((SLURM_ARRAY_TASK_ID - first))
      ((step > 0 && offset >= 0 && offset % step == 0 && offset / step < count)) ||
        die "array task $SLURM_ARRAY_TASK_ID is not one of the ids $first, $first+$step, ... of $count tasks"
      index=$((offset / step))
    elif [[ $shard =~ ^([0-9]+)/([0-9]+)$ ]]; then
      index=${BASH_REMATCH[1]} count=${BASH_REMATCH[2]}
      ((index < count)) || die "task $shard: I must be below N"
    else
      die "task: SHARD is I/N or MIN:STEP/N, not '$shard'"
    fi
    logs=$(logs_dir "$output")
    mkdir -p "$logs"
    status_file=$logs/shard_$index.status
    # "started" stays when the task is killed (time limit, scancel, node failure): the merge
    # then sees that this shard did not finish.
    echo started >"$status_file"
    threads=()
    cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
    [[ -n $cpus ]] && threads=(--threads "$cpus")
    echo "== $(date -u +%FT%TZ) $(hostname -s) job ${SLURM_JOB_ID:-none} array task ${SLURM_ARRAY_TASK_ID:-none}: shard $index/$count"
    status=0
    "$azfilter_cmd" "$operation" -p "$poni" "${threads[@]}" "$@" --skip-existing \
        --shard "$index/$count" "$inputs" -o "$output" || status=$?
    echo "$status" >"$status_file"
    echo "== $(date -u +%FT%TZ) shard $index/$count exit $status"
    exit "$status"
    ;;
  merge)
    (($# == 2)) || usage
    output=$1 count=$2
    [[ $count =~ ^[1-9][0-9]*$ ]] || die "merge: N must be a positive number, not '$count'"
    logs=$(logs_dir "$output")
    echo "== $(date -u +%FT%TZ) merge of $count shard(s) -> $output"
    unfinished=() failed=() shards=()
    for ((i = 0; i < count; i++)); do
      status=$(cat "$logs/shard_$i.status" 2>/dev/null || echo "never ran")
      file=$(shard_name "$output" "$i" "$count")
      case $status in
        0) ;;
        3) failed+=("$i") ;;
        *) unfinished+=("$i"); echo "shard $i/$count: did not finish (status: $status)" >&2 ;;
      esac
      if [[ -f $file ]]; then
        shards+=("$file")
      elif [[ $status == 0 || $status == 3 ]]; then
        unfinished+=("$i"); echo "shard $i/$count: $file is missing" >&2
      fi
    done
    if ((${#unfinished[@]})); then
      echo "merge: shard(s) ${unfinished[*]} of $count did not finish; $output not written." \
           "Rerun each with: examples/slurm_array.sh task I/$count OPERATION GEOMETRY.poni 'INPUTS' $output" \
           "[AZFILTER_OPTION...] (see the task logs in $logs/), then merge again" >&2
      exit 1
    fi
    status=0
    if ((count > 1)); then
      "$azfilter_cmd" merge "${shards[@]}" -o "$output" --overwrite || status=$?
    fi
    if ((${#failed[@]})); then
      echo "merge: frames failed in shard(s) ${failed[*]} of $count (listed in their task logs" \
           "in $logs/); $output holds the other frames" >&2
      ((status == 0)) && status=3
    fi
    echo "== $(date -u +%FT%TZ) merge exit $status"
    exit "$status"
    ;;
  -h|--help|help) usage ;;
  *) usage ;;
esac
