# shellcheck shell=bash
# Sourced by the Slurm job scripts after the submission's sweep.env and scripts/lib/sweep.sh:
# helpers to pick an array task's line and to run the site's setup commands.

# The line of a task list for this array task (tasks are numbered from 0).
job_task_line() {
    local list="$1" id="${SLURM_ARRAY_TASK_ID:?not running as a Slurm array task}"
    local line
    line=$(sed -n "$((id + 1))p" "$list")
    [[ -n "$line" ]] || sweep_die "$list has no task $id"
    printf '%s' "$line"
}

# Run the site's setup commands (ATTRACTOR_JOB_SETUP), which may not be `set -u` clean.
job_setup() {
    if [[ -n "${ATTRACTOR_JOB_SETUP:-}" ]]; then
        set +u
        eval "$ATTRACTOR_JOB_SETUP"
        set -u
    fi
}
