#!/usr/bin/env bash
# shellcheck disable=SC2153 # SHARDS comes from sweep.env
# Slurm job: merge each run's evaluation shards into RUN/eval (`attractor eval merge`), then
# write the report (`attractor report SWEEP_DIR`). Argument: the submission folder.
set -euo pipefail
SUBMIT_DIR="${1:?usage: report-task.sh SUBMIT_DIR}"
# shellcheck disable=SC1091
source "$SUBMIT_DIR/sweep.env"
source "$SCRIPTS_DIR/lib/sweep.sh"
source "$SCRIPTS_DIR/slurm/job-common.sh"
job_setup

missing=0
while IFS=$'\t' read -r subject method schedule; do
    run=$(sweep_run_dir "$subject" "$method" "$schedule")
    sweep_eval_done "$run" && continue
    if ((SHARDS == 1)); then
        echo "missing: $run/eval/summary.json" >&2
        missing=$((missing + 1))
        continue
    fi
    shards=()
    for ((i = 1; i <= SHARDS; i++)); do
        s="$run/eval-shards/$i-of-$SHARDS"
        if [[ -f "$s/summary.json" ]]; then
            shards+=("$s")
        else
            echo "missing: $s/summary.json" >&2
            missing=$((missing + 1))
        fi
    done
    if ((${#shards[@]} == SHARDS)); then
        log="$SWEEP_DIR/logs/$(sweep_log_name "$subject" "$method" "$schedule").merge.log"
        echo "merge $run"
        if ! "${ATTRACTOR_CMD[@]}" eval merge --out "$run/eval" "${shards[@]}" >>"$log" 2>&1; then
            sweep_tail_log "$log"
            sweep_die "merging the shards of $run failed (log $log)"
        fi
    fi
done <"$SUBMIT_DIR/runs.tsv"
echo "report"
"${ATTRACTOR_CMD[@]}" report "$SWEEP_DIR"
if ((missing > 0)); then
    sweep_die "$missing evaluation shard(s) missing (listed above); the report covers the rest. Resubmit the same submit.sh command to finish them"
fi
