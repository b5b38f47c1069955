#!/usr/bin/env bash
# The contrastive-weight schedule sweep on this machine: train every (subject, method, schedule),
# evaluate each run on both protocols, and collect everything with `attractor report`.
# Rerunning it skips finished work and completes the rest (see --help).
set -euo pipefail

SCRIPT="$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)/$(basename -- "${BASH_SOURCE[0]}")"
SCRIPTS_DIR="$(dirname -- "$SCRIPT")"
ROOT="$(dirname -- "$SCRIPTS_DIR")"
# shellcheck source=lib/sweep.sh
source "$SCRIPTS_DIR/lib/sweep.sh"

usage() {
    cat <<EOF
Usage: $(basename -- "$0") --out SWEEP_DIR [options] [-- extra attractor train flags]

Train each (subject, method, schedule) into SWEEP_DIR/runs/<subject>/<method>/<schedule>,
evaluate it (attractor eval --split both) into <run>/eval, then write SWEEP_DIR/report/
(attractor report SWEEP_DIR). Logs go to SWEEP_DIR/logs/.

Rerunning the same command does only what is missing: a run with train.done is not trained
again, a run with checkpoints but no train.done is resumed (attractor train --resume), a run
with eval/summary.json is not evaluated again (an interrupted evaluation resumes where it
stopped), and the report is rebuilt only when a summary is newer than it. A failed run does not
stop the others; the script exits 1 at the end if any failed.

Options:
$SWEEP_COMMON_USAGE
  --jobs N               runs to process in parallel on this machine (default 1); each run
                         trains then evaluates; with a GPU, make sure N runs fit in its memory

Environment:
  ATTRACTOR_BIN          the attractor executable (default: attractor on PATH, else this
                         checkout's target/release or target/debug build)
  ATTRACTOR_CACHE        where dreambooth, dreambooth-lora, custom-diffusion and
                         dreambooth-lora+ cache their generated class images (default
                         ~/.cache/attractor); runs in parallel share them

Example (the tiny test models):
  $(basename -- "$0") --out /tmp/sweep --model tests/fixtures/tiny-sd --subjects dog,cat \\
      --schedules zero,cosine --steps 2 --samples 1 --eval-steps 2 --offline \\
      --clip tests/fixtures/tiny-clip --dino tests/fixtures/tiny-dino \\
      -- --resolution 128 --batch 1 --grad-accum 1

Every method, one subject (the + methods with the cosine schedule; the weight-training
methods with one class image of two sampling steps). ti+, neti+ and dreambooth-lora+ make the
subject masks the dataset lacks (DIR/<subject>/masks/) before training, with SAM from the
Hugging Face cache (offline: fetch it once, or pass -- --sam FILE) and --clip:
  ATTRACTOR_CACHE=/tmp/sweep-cache $(basename -- "$0") --out /tmp/sweep8 \\
      --model tests/fixtures/tiny-sd --data DIR --subjects dog --schedules cosine --split test \\
      --methods ti,ti+,neti,neti+,dreambooth,dreambooth-lora,custom-diffusion,dreambooth-lora+ \\
      --steps 2 --samples 1 --eval-steps 2 --offline \\
      --clip tests/fixtures/tiny-clip --dino tests/fixtures/tiny-dino \\
      -- --resolution 128 --batch 1 --grad-accum 1 --prior-images 1 --prior-steps 2
EOF
}

# One run: train (unless done), then evaluate (unless done). Called through xargs.
run_task() {
    local env_file="$1" line="$2" index subject method schedule
    # shellcheck disable=SC1090
    source "$env_file"
    IFS=$'\t' read -r index subject method schedule <<<"$line"
    local run tag name logs
    run=$(sweep_run_dir "$subject" "$method" "$schedule")
    name=$(sweep_log_name "$subject" "$method" "$schedule")
    logs="$SWEEP_DIR/logs"
    tag="[$index/$TOTAL] $subject $method $schedule"
    local state t0
    state=$(sweep_train_state "$run")
    if [[ "$state" == "done" ]]; then
        echo "$tag: skip train (done)"
    else
        echo "$tag: train ($state)"
        t0=$SECONDS
        if ! sweep_train "$subject" "$method" "$schedule" "$run" "$logs/$name.train.log"; then
            echo "$tag: train FAILED, see $logs/$name.train.log" >&2
            sweep_tail_log "$logs/$name.train.log"
            return 1
        fi
        echo "$tag: trained in $((SECONDS - t0)) s"
    fi
    if sweep_eval_done "$run"; then
        echo "$tag: skip eval (done)"
    else
        echo "$tag: eval"
        t0=$SECONDS
        if ! sweep_eval "$run" "$logs/$name.eval.log"; then
            echo "$tag: eval FAILED, see $logs/$name.eval.log" >&2
            sweep_tail_log "$logs/$name.eval.log"
            return 1
        fi
        echo "$tag: evaluated in $((SECONDS - t0)) s"
    fi
}

if [[ "${1:-}" == --run-task ]]; then
    (($# == 3)) || sweep_die "internal: --run-task ENV_FILE LINE"
    run_task "$2" "$3"
    exit
fi

JOBS=1
# shellcheck disable=SC2034 # SWEEP_CONSUMED is read by sweep_parse
sweep_own_option() {
    case "$1" in
        --jobs)
            (($# > 1)) || sweep_die "--jobs needs a value"
            [[ "$2" =~ ^[1-9][0-9]*$ ]] || sweep_die "--jobs $2: expected a positive integer"
            JOBS="$2"
            SWEEP_CONSUMED=2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
    esac
}

(($#)) || { usage >&2; exit 2; }
sweep_parse "$@"
sweep_configure "$ROOT"
ATTRACTOR_CMD=("$(sweep_find_bin "$ROOT")")

mapfile -t TASKS < <(sweep_tasks)
TOTAL=${#TASKS[@]}
mkdir -p "$SWEEP_DIR/logs"
ENV_FILE=$(mktemp "${TMPDIR:-/tmp}/attractor-sweep.XXXXXX")
trap 'rm -f -- "$ENV_FILE"' EXIT
sweep_write_env "$ENV_FILE"
declare -p TOTAL >>"$ENV_FILE"

echo "sweep: $TOTAL run(s) into $SWEEP_DIR/runs (subjects: ${SUBJECTS[*]}; methods: ${METHODS[*]}; schedules: ${SCHEDULES[*]}), $JOBS at a time"
echo "sweep: $(printf '%q ' "${ATTRACTOR_CMD[@]}")"
t_start=$SECONDS
failed=0
i=0
for t in "${TASKS[@]}"; do
    i=$((i + 1))
    printf '%s\t%s\0' "$i" "$t"
done | xargs -0 -P "$JOBS" -I{} bash "$SCRIPT" --run-task "$ENV_FILE" {} || failed=1

summaries=()
while IFS= read -r -d '' f; do summaries+=("$f"); done < <(
    find "$SWEEP_DIR/runs" -path '*/eval/summary.json' -print0 2>/dev/null
)
report="$SWEEP_DIR/report/report.html"
if ((${#summaries[@]} == 0)); then
    echo "sweep: no evaluation finished, no report" >&2
elif [[ -f "$report" ]] && [[ -z "$(find "$SWEEP_DIR/runs" -path '*/eval/summary.json' -newer "$report" -print -quit)" ]]; then
    echo "skip report (up to date: $report)"
else
    echo "report: ${#summaries[@]} evaluation(s)"
    if ! "${ATTRACTOR_CMD[@]}" report "$SWEEP_DIR" >"$SWEEP_DIR/logs/report.log" 2>&1; then
        echo "report FAILED, see $SWEEP_DIR/logs/report.log" >&2
        sweep_tail_log "$SWEEP_DIR/logs/report.log"
        failed=1
    else
        echo "report: $report"
    fi
fi
echo "sweep: finished in $((SECONDS - t_start)) s"
if ((failed)); then
    echo "sweep: some runs failed (see the messages above); rerun the same command to retry them" >&2
    exit 1
fi
