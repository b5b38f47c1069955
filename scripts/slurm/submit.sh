#!/usr/bin/env bash
# The schedule sweep of scripts/sweep-schedules.sh as Slurm job arrays: a training array (one
# task per (subject, method, schedule)), an evaluation array (each run split into --shards
# parts, `attractor eval --shard i/n`) that starts when training has succeeded, and one job
# that merges the shards and writes the report. Nothing here is specific to one cluster: every
# site setting comes from the environment (see --help).
set -euo pipefail

SCRIPTS_DIR="$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)"
ROOT="$(dirname -- "$SCRIPTS_DIR")"
# shellcheck source=../lib/sweep.sh
source "$SCRIPTS_DIR/lib/sweep.sh"

usage() {
    cat <<EOF
Usage: $(basename -- "$0") --out SWEEP_DIR [options] [-- extra attractor train flags]

Submit the sweep to Slurm. The folder layout is the local sweep's (scripts/sweep-schedules.sh),
so both can work on one SWEEP_DIR. Each submission gets SWEEP_DIR/slurm/submit-K/ with:
  sweep.env          the settings the jobs read
  train-tasks.tsv    one line per run still to train (subject, method, schedule)
  eval-tasks.tsv     one line per evaluation shard still to do (subject, method, schedule, i/n)
  runs.tsv           every run of the sweep (merged and reported by the last job)
  logs/              Slurm's output files (the attractor logs go to SWEEP_DIR/logs/)

Jobs: (a) training array, (b) evaluation array with --dependency=afterok:<training job>,
(c) merge + report job with --dependency=afterok:<evaluation job>. Finished work (train.done,
eval/summary.json, a shard's summary.json) is left out of the task lists, so after a failure
you resubmit the same command and only the rest runs. A dependent job whose dependency failed
is cancelled (--kill-on-invalid-dep=yes).

Options:
$SWEEP_COMMON_USAGE
  --shards N             evaluation shards per run (default 4; 1 = no sharding)
  --dry-run              print the sbatch commands instead of running them (the task lists
                         are still written)

Environment (defaults in brackets; unset = the cluster's default / the flag is left out):
  ATTRACTOR_BIN          attractor executable, reachable from the compute nodes
                         [attractor on PATH, else this checkout's target/release build]
  ATTRACTOR_JOB_SETUP    shell commands each job runs first, e.g. "module load cuda/12" []
  ATTRACTOR_CACHE        class-image cache of dreambooth, dreambooth-lora, custom-diffusion and
                         dreambooth-lora+ (sbatch passes it on to the jobs); put it on a file
                         system every node sees, so the array's tasks share the images
                         [~/.cache/attractor]
  SBATCH                 the sbatch command [sbatch]
  SLURM_PARTITION        partition of the GPU jobs []
  SLURM_REPORT_PARTITION partition of the merge + report job (CPU only) [SLURM_PARTITION]
  SLURM_ACCOUNT          --account []
  SLURM_QOS              --qos []
  SLURM_GPUS             GPUs per training / evaluation task, as --gres=gpu:N [1]; 0 = none
  SLURM_GPU_TYPE         GPU type in the gres, e.g. a100 -> --gres=gpu:a100:N []
  SLURM_CPUS             --cpus-per-task of training / evaluation tasks [8]
  SLURM_MEM              --mem of training / evaluation tasks [32G]
  SLURM_REPORT_CPUS      --cpus-per-task of the merge + report job [2]
  SLURM_REPORT_MEM       --mem of the merge + report job [8G]
  SLURM_TIME_TRAIN       --time of a training task [08:00:00]
  SLURM_TIME_EVAL        --time of an evaluation shard [04:00:00]
  SLURM_TIME_REPORT      --time of the merge + report job [01:00:00]
  SLURM_ARRAY_LIMIT      at most this many tasks of an array at once (--array=...%N) []
  SLURM_EXTRA_ARGS       more sbatch flags for every job, e.g. "--constraint=a100 --nice" []
With SLURM_GPUS > 0 and no --device, the jobs run with --device cuda (Slurm shows each job
its own GPUs as cuda:0...); the executable must then be a CUDA build (cargo build --release
--features cuda).
EOF
}

SHARDS=4
DRY_RUN=0
# shellcheck disable=SC2034 # SWEEP_CONSUMED is read by sweep_parse
sweep_own_option() {
    case "$1" in
        --shards)
            (($# > 1)) || sweep_die "--shards needs a value"
            [[ "$2" =~ ^[1-9][0-9]*$ ]] || sweep_die "--shards $2: expected a positive integer"
            SHARDS="$2"
            SWEEP_CONSUMED=2
            ;;
        --dry-run)
            DRY_RUN=1
            SWEEP_CONSUMED=1
            ;;
        -h | --help)
            usage
            exit 0
            ;;
    esac
}

(($#)) || { usage >&2; exit 2; }
sweep_parse "$@"
SLURM_GPUS="${SLURM_GPUS:-1}"
[[ "$SLURM_GPUS" =~ ^[0-9]+$ ]] || sweep_die "SLURM_GPUS=$SLURM_GPUS: expected a number of GPUs"
if [[ -z "$OPT_DEVICE" ]] && ((SLURM_GPUS > 0)); then
    OPT_DEVICE=cuda
fi
sweep_configure "$ROOT"
if ((DRY_RUN)); then
    # The compute nodes' executable need not exist here for a dry run.
    ATTRACTOR_CMD=("${ATTRACTOR_BIN:-attractor}")
else
    ATTRACTOR_CMD=("$(sweep_find_bin "$ROOT")")
fi
ATTRACTOR_JOB_SETUP="${ATTRACTOR_JOB_SETUP:-}"
: "${ATTRACTOR_CMD[@]}" # written to sweep.env by sweep_write_env

# A fresh submission folder.
k=1
while [[ -e "$SWEEP_DIR/slurm/submit-$k" ]]; do k=$((k + 1)); done
SUBMIT_DIR="$SWEEP_DIR/slurm/submit-$k"
mkdir -p "$SUBMIT_DIR/logs"

# Task lists: only what is not done yet.
mapfile -t ALL < <(sweep_tasks)
: >"$SUBMIT_DIR/train-tasks.tsv"
: >"$SUBMIT_DIR/eval-tasks.tsv"
: >"$SUBMIT_DIR/runs.tsv"
for t in "${ALL[@]}"; do
    IFS=$'\t' read -r subject method schedule <<<"$t"
    run=$(sweep_run_dir "$subject" "$method" "$schedule")
    printf '%s\n' "$t" >>"$SUBMIT_DIR/runs.tsv"
    if [[ $(sweep_train_state "$run") != "done" ]]; then
        printf '%s\n' "$t" >>"$SUBMIT_DIR/train-tasks.tsv"
    fi
    sweep_eval_done "$run" && continue
    for ((i = 1; i <= SHARDS; i++)); do
        if ((SHARDS > 1)) && [[ -f "$run/eval-shards/$i-of-$SHARDS/summary.json" ]]; then
            continue
        fi
        printf '%s\t%s/%s\n' "$t" "$i" "$SHARDS" >>"$SUBMIT_DIR/eval-tasks.tsv"
    done
done
N_TRAIN=$(wc -l <"$SUBMIT_DIR/train-tasks.tsv")
N_EVAL=$(wc -l <"$SUBMIT_DIR/eval-tasks.tsv")
N_RUNS=${#ALL[@]}

sweep_write_env "$SUBMIT_DIR/sweep.env"
declare -p SCRIPTS_DIR SUBMIT_DIR SHARDS ATTRACTOR_JOB_SETUP >>"$SUBMIT_DIR/sweep.env"

# sbatch flags.
read -r -a SBATCH_CMD <<<"${SBATCH:-sbatch}"
read -r -a EXTRA <<<"${SLURM_EXTRA_ARGS:-}"
common_flags=(--parsable --kill-on-invalid-dep=yes)
[[ -n "${SLURM_ACCOUNT:-}" ]] && common_flags+=("--account=$SLURM_ACCOUNT")
[[ -n "${SLURM_QOS:-}" ]] && common_flags+=("--qos=$SLURM_QOS")
gpu_flags=("--cpus-per-task=${SLURM_CPUS:-8}" "--mem=${SLURM_MEM:-32G}")
[[ -n "${SLURM_PARTITION:-}" ]] && gpu_flags+=("--partition=$SLURM_PARTITION")
if ((SLURM_GPUS > 0)); then
    gpu_flags+=("--gres=gpu:${SLURM_GPU_TYPE:+$SLURM_GPU_TYPE:}$SLURM_GPUS")
fi
limit="${SLURM_ARRAY_LIMIT:+%$SLURM_ARRAY_LIMIT}"

# Run (or print) one sbatch command; sets JOB_ID.
submit() {
    local name="$1"
    shift
    local cmd=("${SBATCH_CMD[@]}" "$@")
    if ((DRY_RUN)); then
        printf '%q ' "${cmd[@]}"
        printf '\n'
        JOB_ID="DRYRUN-$name"
    else
        local out
        out=$("${cmd[@]}") || sweep_die "sbatch failed for the $name job: $(printf '%q ' "${cmd[@]}")"
        JOB_ID="${out%%;*}"
        [[ "$JOB_ID" =~ ^[0-9]+$ ]] || sweep_die "sbatch printed '$out' for the $name job, not a job id"
    fi
}

echo "# sweep: $N_RUNS run(s); to train: $N_TRAIN; evaluation shards to do: $N_EVAL ($SHARDS per run); task lists in $SUBMIT_DIR" >&2
dep_train=()
if ((N_TRAIN > 0)); then
    submit train "${common_flags[@]}" "${gpu_flags[@]}" "${EXTRA[@]}" \
        --job-name=attractor-train "--array=0-$((N_TRAIN - 1))$limit" \
        "--time=${SLURM_TIME_TRAIN:-08:00:00}" \
        "--output=$SUBMIT_DIR/logs/train-%A_%a.out" \
        "$SCRIPTS_DIR/slurm/train-task.sh" "$SUBMIT_DIR"
    TRAIN_JOB=$JOB_ID
    dep_train=("--dependency=afterok:$TRAIN_JOB")
    echo "# training array: job $TRAIN_JOB, $N_TRAIN task(s)" >&2
fi
dep_eval=("${dep_train[@]}")
if ((N_EVAL > 0)); then
    submit eval "${common_flags[@]}" "${gpu_flags[@]}" "${EXTRA[@]}" "${dep_train[@]}" \
        --job-name=attractor-eval "--array=0-$((N_EVAL - 1))$limit" \
        "--time=${SLURM_TIME_EVAL:-04:00:00}" \
        "--output=$SUBMIT_DIR/logs/eval-%A_%a.out" \
        "$SCRIPTS_DIR/slurm/eval-task.sh" "$SUBMIT_DIR"
    EVAL_JOB=$JOB_ID
    dep_eval=("--dependency=afterok:$EVAL_JOB")
    echo "# evaluation array: job $EVAL_JOB, $N_EVAL task(s)" >&2
fi
report_flags=("--cpus-per-task=${SLURM_REPORT_CPUS:-2}" "--mem=${SLURM_REPORT_MEM:-8G}")
partition="${SLURM_REPORT_PARTITION:-${SLURM_PARTITION:-}}"
[[ -n "$partition" ]] && report_flags+=("--partition=$partition")
submit report "${common_flags[@]}" "${report_flags[@]}" "${EXTRA[@]}" "${dep_eval[@]}" \
    --job-name=attractor-report \
    "--time=${SLURM_TIME_REPORT:-01:00:00}" \
    "--output=$SUBMIT_DIR/logs/report-%j.out" \
    "$SCRIPTS_DIR/slurm/report-task.sh" "$SUBMIT_DIR"
echo "# merge + report: job $JOB_ID -> $SWEEP_DIR/report/report.html" >&2
