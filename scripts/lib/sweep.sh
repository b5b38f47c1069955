# shellcheck shell=bash
# Shared pieces of the schedule sweep: sourced by scripts/sweep-schedules.sh (local) and the
# Slurm job scripts in scripts/slurm/. Bash 4+. Nothing here runs on its own.
#
# Layout of a sweep folder (SWEEP_DIR):
#   runs/<subject>/<method>/<schedule>/          one training run (`attractor train --out`)
#   runs/<subject>/<method>/<schedule>/train.done written when training finished
#   runs/<subject>/<method>/<schedule>/eval/     its evaluation (`attractor eval --run`),
#                                                finished when eval/summary.json exists
#   logs/                                        one log per step of each run
#   report/                                      `attractor report SWEEP_DIR`
# Methods without an attractor (ti, neti and the weight-training baselines dreambooth,
# dreambooth-lora, custom-diffusion) do not use a schedule: their one run per subject lives in
# runs/<subject>/<method>/none. The attractor methods (ti+, neti+, dreambooth-lora+) get one run
# per schedule. The baselines generate class images for prior preservation once and cache them
# in $ATTRACTOR_CACHE (default ~/.cache/attractor), shared by every run and subject of a class.
#
# The attractor methods need subject masks: `attractor train` makes the missing ones in
# <dataset>/<subject>/masks/ before training (SAM + CLIP from the hub cache; parallel runs of
# one subject may both make them, and a mask that exists is never replaced), so a sweep of
# neti+ on the bundled benchmark needs no separate `attractor masks` step.
#
# The caller sets these arrays / variables before calling the functions:
#   ATTRACTOR_CMD  the attractor executable (an array: e.g. (/path/attractor))
#   COMMON_ARGS    flags for every verb (--model, --data, --device, --seed, --offline)
#   TRAIN_ARGS     flags for `train` only (--steps and the pass-through flags)
#   EVAL_ARGS      flags for `eval` only (--split, --samples, --steps, --clip, --dino, ...)
#   SWEEP_DIR      the sweep folder

SWEEP_ALL_SCHEDULES=(zero one linear exponential sigmoid cosine)
SWEEP_ALL_METHODS=(ti ti+ neti neti+ dreambooth dreambooth-lora custom-diffusion dreambooth-lora+)
SWEEP_NO_SCHEDULE=none

sweep_die() {
    echo "error: $*" >&2
    exit 2
}

# Split "a,b c" into words on commas and blanks; prints one per line.
sweep_list() {
    local item
    for item in ${1//,/ }; do
        [[ -n "$item" ]] && printf '%s\n' "$item"
    done
    return 0
}

# The subject names of a dataset's subjects.json (in file order).
sweep_subjects_of() {
    local file="$1/subjects.json"
    [[ -f "$file" ]] || sweep_die "$file not found: pass --data DIR, a dataset in the split-test layout"
    # subjects.json is a list of {"name": ..., "class": ..., "kind": ...}; names hold no quotes.
    grep -o '"name"[[:space:]]*:[[:space:]]*"[^"]*"' "$file" | sed 's/.*"\([^"]*\)"$/\1/'
}

# True for the methods with attractor tokens and a contrastive schedule (one run per schedule).
sweep_is_attractor() {
    [[ "$1" == "ti+" || "$1" == "neti+" || "$1" == "dreambooth-lora+" ]]
}

# Check a method / schedule name against the CLI's choices.
sweep_check_method() {
    local m
    for m in "${SWEEP_ALL_METHODS[@]}"; do [[ "$1" == "$m" ]] && return 0; done
    sweep_die "unknown method '$1' (choose from: ${SWEEP_ALL_METHODS[*]})"
}

sweep_check_schedule() {
    local s
    for s in "${SWEEP_ALL_SCHEDULES[@]}"; do [[ "$1" == "$s" ]] && return 0; done
    sweep_die "unknown schedule '$1' (choose from: ${SWEEP_ALL_SCHEDULES[*]})"
}

# Print the task list, one "subject<TAB>method<TAB>schedule" line per run, for the arrays
# SUBJECTS, METHODS, SCHEDULES. Methods without an attractor get one run (schedule "none").
sweep_tasks() {
    local subject method schedule
    for subject in "${SUBJECTS[@]}"; do
        for method in "${METHODS[@]}"; do
            if sweep_is_attractor "$method"; then
                for schedule in "${SCHEDULES[@]}"; do
                    printf '%s\t%s\t%s\n' "$subject" "$method" "$schedule"
                done
            else
                printf '%s\t%s\t%s\n' "$subject" "$method" "$SWEEP_NO_SCHEDULE"
            fi
        done
    done
}

sweep_run_dir() {
    printf '%s/runs/%s/%s/%s' "$SWEEP_DIR" "$1" "$2" "$3"
}

sweep_log_name() {
    printf '%s__%s__%s' "$1" "${2//+/plus}" "$3"
}

# done | resume | restart | new: what training run folder $1 needs.
sweep_train_state() {
    local run="$1"
    if [[ -f "$run/train.done" ]]; then
        echo "done"
    elif [[ -f "$run/config.json" ]]; then
        if compgen -G "$run/checkpoints/step-*.safetensors" >/dev/null; then
            echo resume
        else
            echo restart
        fi
    else
        echo new
    fi
}

sweep_eval_done() {
    [[ -f "$1/eval/summary.json" ]]
}

# Train one run (new, resumed or restarted); output goes to the log file $5.
sweep_train() {
    local subject="$1" method="$2" schedule="$3" run="$4" log="$5" state
    state=$(sweep_train_state "$run")
    mkdir -p "$(dirname "$log")"
    case "$state" in
        "done") return 0 ;;
        restart)
            # Killed before its first checkpoint: nothing to keep, start over.
            rm -rf -- "$run"
            ;;
    esac
    local cmd
    if [[ "$state" == resume ]]; then
        cmd=("${ATTRACTOR_CMD[@]}" train --resume "$run" "${COMMON_ARGS[@]}" "${TRAIN_ARGS[@]}")
    else
        mkdir -p "$(dirname "$run")"
        cmd=("${ATTRACTOR_CMD[@]}" train --subject "$subject" --method "$method")
        if [[ "$schedule" != "$SWEEP_NO_SCHEDULE" ]]; then
            cmd+=(--schedule "$schedule")
        fi
        cmd+=(--out "$run" "${COMMON_ARGS[@]}" "${TRAIN_ARGS[@]}")
    fi
    {
        printf '# %s\n' "$(date '+%F %T')"
        printf '#'
        printf ' %q' "${cmd[@]}"
        printf '\n'
    } >>"$log"
    "${cmd[@]}" >>"$log" 2>&1 || return $?
    date '+%F %T' >"$run/train.done"
}

# Evaluate one run into <run>/eval, or into $3 for shard $4 ("i/n"); output to the log $2.
sweep_eval() {
    local run="$1" log="$2" out="${3:-$1/eval}" shard="${4:-}"
    mkdir -p "$(dirname "$log")"
    local cmd=("${ATTRACTOR_CMD[@]}" eval --run "$run" --out "$out" "${COMMON_ARGS[@]}" "${EVAL_ARGS[@]}")
    if [[ -n "$shard" ]]; then
        cmd+=(--shard "$shard")
    fi
    {
        printf '# %s\n' "$(date '+%F %T')"
        printf '#'
        printf ' %q' "${cmd[@]}"
        printf '\n'
    } >>"$log"
    "${cmd[@]}" >>"$log" 2>&1
}

# The attractor executable: $ATTRACTOR_BIN, else `attractor` on PATH, else a build of this
# checkout (release, then debug).
sweep_find_bin() {
    local root="$1" target
    if [[ -n "${ATTRACTOR_BIN:-}" ]]; then
        [[ -x "$ATTRACTOR_BIN" ]] || command -v "$ATTRACTOR_BIN" >/dev/null 2>&1 \
            || sweep_die "ATTRACTOR_BIN=$ATTRACTOR_BIN is not an executable"
        printf '%s' "$ATTRACTOR_BIN"
        return
    fi
    if command -v attractor >/dev/null 2>&1; then
        command -v attractor
        return
    fi
    target="${CARGO_TARGET_DIR:-$root/target}"
    for b in "$target/release/attractor" "$target/debug/attractor"; do
        if [[ -x "$b" ]]; then
            printf '%s' "$b"
            return
        fi
    done
    sweep_die "no attractor executable: build it (cargo build --release) or set ATTRACTOR_BIN=/path/to/attractor"
}

# Print the last lines of a log to stderr (after a failure).
sweep_tail_log() {
    if [[ -f "$1" ]]; then
        echo "---- last lines of $1 ----" >&2
        tail -n "${2:-15}" "$1" >&2
        echo "----" >&2
    fi
}

# An existing path made absolute; anything else (a hub repo id) unchanged.
sweep_abs_if_path() {
    if [[ -e "$1" ]]; then
        (cd "$(dirname -- "$1")" && printf '%s/%s' "$(pwd -P)" "$(basename -- "$1")")
    else
        printf '%s' "$1"
    fi
}

# Parse the options that the local and the Slurm sweep share. A caller-defined function
# `sweep_own_option OPT [VALUE]` may claim options first: it sets SWEEP_CONSUMED to the number
# of words it used (0: not its option). Unknown options, and everything after `--`, are passed
# to `attractor train` (an unknown --flag takes the words after it up to the next --flag).
sweep_parse() {
    SWEEP_DIR="" OPT_SUBJECTS="" OPT_METHODS="neti+" OPT_SCHEDULES="${SWEEP_ALL_SCHEDULES[*]}"
    OPT_MODEL="" OPT_DATA="" OPT_SAMPLES="" OPT_STEPS="" OPT_EVAL_STEPS="" OPT_CLIP="" OPT_DINO=""
    OPT_DEVICE="" OPT_SEED="" OPT_OFFLINE=0 OPT_SPLIT=both
    EXTRA_TRAIN=() EXTRA_EVAL=()
    # --opt=value -> --opt value (up to a --, after which words pass through untouched).
    local args=() a
    while (($#)); do
        a="$1"
        shift
        if [[ "$a" == -- ]]; then
            args+=(-- "$@")
            break
        elif [[ "$a" == --*=* ]]; then
            args+=("${a%%=*}" "${a#*=}")
        else
            args+=("$a")
        fi
    done
    set -- "${args[@]}"
    local words
    while (($#)); do
        SWEEP_CONSUMED=0
        if declare -F sweep_own_option >/dev/null; then
            sweep_own_option "$@"
        fi
        if ((SWEEP_CONSUMED > 0)); then
            shift "$SWEEP_CONSUMED"
            continue
        fi
        case "$1" in
            --offline) OPT_OFFLINE=1; shift; continue ;;
            --) shift; EXTRA_TRAIN+=("$@"); break ;;
            --out | --subjects | --subject | --methods | --method | --schedules | --schedule | \
                --model | --data | --samples | --steps | --eval-steps | --clip | --dino | \
                --device | --seed | --split | --train-args | --eval-args)
                (($# > 1)) || sweep_die "$1 needs a value (see --help)"
                ;;
            --*)
                EXTRA_TRAIN+=("$1")
                shift
                while (($#)) && [[ "$1" != --* ]]; do EXTRA_TRAIN+=("$1"); shift; done
                continue
                ;;
            *) sweep_die "unexpected argument '$1' (see --help)" ;;
        esac
        case "$1" in
            --out) SWEEP_DIR="$2" ;;
            --subjects | --subject) OPT_SUBJECTS="$2" ;;
            --methods | --method) OPT_METHODS="$2" ;;
            --schedules | --schedule) OPT_SCHEDULES="$2" ;;
            --model) OPT_MODEL="$2" ;;
            --data) OPT_DATA="$2" ;;
            --samples) OPT_SAMPLES="$2" ;;
            --steps) OPT_STEPS="$2" ;;
            --eval-steps) OPT_EVAL_STEPS="$2" ;;
            --clip) OPT_CLIP="$2" ;;
            --dino) OPT_DINO="$2" ;;
            --device) OPT_DEVICE="$2" ;;
            --seed) OPT_SEED="$2" ;;
            --split) OPT_SPLIT="$2" ;;
            --train-args) read -r -a words <<<"$2"; EXTRA_TRAIN+=("${words[@]}") ;;
            --eval-args) read -r -a words <<<"$2"; EXTRA_EVAL+=("${words[@]}") ;;
        esac
        shift 2
    done
    return 0
}

# Fill in defaults and build SUBJECTS, METHODS, SCHEDULES, COMMON_ARGS, TRAIN_ARGS, EVAL_ARGS.
sweep_configure() {
    local root="$1"
    [[ -n "$SWEEP_DIR" ]] || sweep_die "pass --out SWEEP_DIR (where runs, logs and the report go)"
    mkdir -p "$SWEEP_DIR"
    SWEEP_DIR=$(cd "$SWEEP_DIR" && pwd -P)
    local data="${OPT_DATA:-${ATTRACTOR_DATA:-$root/data/dreambooth-split}}"
    [[ -d "$data" ]] || sweep_die "--data $data: no such folder"
    DATA=$(sweep_abs_if_path "$data")
    if [[ -n "$OPT_SUBJECTS" ]]; then
        mapfile -t SUBJECTS < <(sweep_list "$OPT_SUBJECTS")
    else
        mapfile -t SUBJECTS < <(sweep_subjects_of "$DATA")
    fi
    ((${#SUBJECTS[@]})) || sweep_die "no subjects (pass --subjects a,b or a dataset with subjects.json)"
    local s
    for s in "${SUBJECTS[@]}"; do
        [[ -d "$DATA/$s" ]] || sweep_die "subject '$s' has no folder in $DATA"
    done
    mapfile -t METHODS < <(sweep_list "$OPT_METHODS")
    mapfile -t SCHEDULES < <(sweep_list "$OPT_SCHEDULES")
    ((${#METHODS[@]})) || sweep_die "--methods: empty"
    ((${#SCHEDULES[@]})) || sweep_die "--schedules: empty"
    for s in "${METHODS[@]}"; do sweep_check_method "$s"; done
    for s in "${SCHEDULES[@]}"; do sweep_check_schedule "$s"; done
    case "$OPT_SPLIT" in test | train | both) ;; *) sweep_die "--split $OPT_SPLIT: expected test, train or both" ;; esac
    COMMON_ARGS=(--data "$DATA")
    [[ -n "$OPT_MODEL" ]] && COMMON_ARGS+=(--model "$(sweep_abs_if_path "$OPT_MODEL")")
    [[ -n "$OPT_DEVICE" ]] && COMMON_ARGS+=(--device "$OPT_DEVICE")
    [[ -n "$OPT_SEED" ]] && COMMON_ARGS+=(--seed "$OPT_SEED")
    ((OPT_OFFLINE)) && COMMON_ARGS+=(--offline)
    TRAIN_ARGS=()
    [[ -n "$OPT_STEPS" ]] && TRAIN_ARGS+=(--steps "$OPT_STEPS")
    # The attractor methods make missing subject masks before training (SAM candidates ranked
    # by CLIP): the evaluation's CLIP ranks them too.
    [[ -n "$OPT_CLIP" ]] && TRAIN_ARGS+=(--clip "$(sweep_abs_if_path "$OPT_CLIP")")
    TRAIN_ARGS+=("${EXTRA_TRAIN[@]}")
    EVAL_ARGS=(--split "$OPT_SPLIT")
    [[ -n "$OPT_SAMPLES" ]] && EVAL_ARGS+=(--samples "$OPT_SAMPLES")
    [[ -n "$OPT_EVAL_STEPS" ]] && EVAL_ARGS+=(--steps "$OPT_EVAL_STEPS")
    [[ -n "$OPT_CLIP" ]] && EVAL_ARGS+=(--clip "$(sweep_abs_if_path "$OPT_CLIP")")
    [[ -n "$OPT_DINO" ]] && EVAL_ARGS+=(--dino "$(sweep_abs_if_path "$OPT_DINO")")
    EVAL_ARGS+=("${EXTRA_EVAL[@]}")
    return 0
}

# Write the settings of this sweep as a file that `source` restores (for the workers).
sweep_write_env() {
    {
        echo "# written by $(basename -- "$0") on $(date '+%F %T'); sourced by the sweep's workers"
        declare -p SWEEP_DIR DATA ATTRACTOR_CMD COMMON_ARGS TRAIN_ARGS EVAL_ARGS
    } >"$1"
}

# Options shared by both sweeps, for their --help.
# shellcheck disable=SC2016,SC2034
SWEEP_COMMON_USAGE='  --out SWEEP_DIR        where runs/, logs/ and report/ go (required)
  --subjects a,b         subjects (default: every subject in the dataset'"'"'s subjects.json)
  --methods m,...        ti, ti+, neti, neti+, dreambooth, dreambooth-lora,
                         custom-diffusion, dreambooth-lora+ (default neti+); the methods
                         without an attractor (ti, neti, dreambooth, dreambooth-lora,
                         custom-diffusion) train once per subject (their runs go to
                         runs/<subject>/<method>/none), ti+, neti+ and dreambooth-lora+ once
                         per schedule. The weight-training methods generate class images for
                         prior preservation (attractor train --prior-images N, default 200,
                         --prior-steps N, default 50), cached in $ATTRACTOR_CACHE
  --schedules s,...      zero, one, linear, exponential, sigmoid, cosine (default: all six;
                         used by ti+, neti+, dreambooth-lora+)
  --model M              SD 1.5 weights: a folder or a hub repo id (attractor --model)
  --data DIR             dataset (default: $ATTRACTOR_DATA or the bundled data/dreambooth-split)
  --steps N              training steps (attractor train --steps)
  --samples N            images per caption / prompt in the evaluation (attractor eval --samples)
  --eval-steps N         sampling steps of the evaluation (attractor eval --steps)
  --split S              evaluation protocol: test, train or both (default both)
  --clip C, --dino D     evaluation scorers (attractor eval --clip / --dino); --clip also
                         ranks the subject masks that ti+, neti+ and dreambooth-lora+ make
                         before training where the dataset has none (attractor train
                         --clip; SAM comes from the hub cache, or pass -- --sam FILE)
  --device D, --seed N, --offline
                         passed to every attractor command
  --train-args "..."     extra flags for attractor train (also: any flag not listed here,
                         and everything after --, e.g. --resolution 256 --batch 1
                         --prior-images 100)
  --eval-args "..."      extra flags for attractor eval (e.g. "--guidance 5")
  -h, --help             this message'
