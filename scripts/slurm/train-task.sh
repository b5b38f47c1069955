#!/usr/bin/env bash
# Slurm array task: train one (subject, method, schedule) of a submission's train-tasks.tsv
# (written by scripts/slurm/submit.sh). Argument: the submission folder.
set -euo pipefail
SUBMIT_DIR="${1:?usage: train-task.sh SUBMIT_DIR}"
# shellcheck disable=SC1091
source "$SUBMIT_DIR/sweep.env"
source "$SCRIPTS_DIR/lib/sweep.sh"
source "$SCRIPTS_DIR/slurm/job-common.sh"
job_setup

IFS=$'\t' read -r subject method schedule <<<"$(job_task_line "$SUBMIT_DIR/train-tasks.tsv")"
run=$(sweep_run_dir "$subject" "$method" "$schedule")
log="$SWEEP_DIR/logs/$(sweep_log_name "$subject" "$method" "$schedule").train.log"
state=$(sweep_train_state "$run")
echo "$subject $method $schedule: train ($state) on $(hostname), log $log"
if [[ "$state" == "done" ]]; then
    echo "skip train (done)"
    exit 0
fi
t0=$SECONDS
if ! sweep_train "$subject" "$method" "$schedule" "$run" "$log"; then
    sweep_tail_log "$log" 30
    sweep_die "training $subject $method $schedule failed (log $log)"
fi
echo "trained in $((SECONDS - t0)) s"
