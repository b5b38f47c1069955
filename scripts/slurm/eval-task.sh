#!/usr/bin/env bash
# Slurm array task: evaluate one shard of one run of a submission's eval-tasks.tsv (written by
# scripts/slurm/submit.sh) with `attractor eval --run RUN --shard i/n` into
# RUN/eval-shards/i-of-n (with one shard per run: straight into RUN/eval).
# Argument: the submission folder.
set -euo pipefail
SUBMIT_DIR="${1:?usage: eval-task.sh SUBMIT_DIR}"
# shellcheck disable=SC1091
source "$SUBMIT_DIR/sweep.env"
source "$SCRIPTS_DIR/lib/sweep.sh"
source "$SCRIPTS_DIR/slurm/job-common.sh"
job_setup

IFS=$'\t' read -r subject method schedule shard <<<"$(job_task_line "$SUBMIT_DIR/eval-tasks.tsv")"
run=$(sweep_run_dir "$subject" "$method" "$schedule")
name=$(sweep_log_name "$subject" "$method" "$schedule")
[[ -f "$run/train.done" ]] || sweep_die "$run is not trained (no train.done): did its training task fail?"
if sweep_eval_done "$run"; then
    echo "skip eval (done: $run/eval/summary.json)"
    exit 0
fi
if ((SHARDS > 1)); then
    out="$run/eval-shards/${shard/\//-of-}"
    log="$SWEEP_DIR/logs/$name.eval-${shard/\//-of-}.log"
    arg="$shard"
else
    out="$run/eval"
    log="$SWEEP_DIR/logs/$name.eval.log"
    arg=""
fi
if [[ -f "$out/summary.json" ]]; then
    echo "skip eval shard $shard (done: $out/summary.json)"
    exit 0
fi
echo "$subject $method $schedule: eval shard $shard on $(hostname), log $log"
t0=$SECONDS
if ! sweep_eval "$run" "$log" "$out" "$arg"; then
    sweep_tail_log "$log" 30
    sweep_die "evaluating $run (shard $shard) failed (log $log)"
fi
echo "evaluated in $((SECONDS - t0)) s"
