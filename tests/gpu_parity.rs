//! Every parity suite in one executable, for the GPU check: scripts/build-cuda.sh builds it with
//! `--features cuda`, scripts/gpu-check.sh runs it with `ATTRACTOR_TEST_DEVICE=cuda:0` (one
//! executable to carry instead of six). On the CPU (CI) it repeats the suites, which keeps it
//! compiling.

// Each suite declares `mod common;`: one copy of the helpers per suite, as in their own binaries.
#![allow(clippy::duplicate_mod)]

#[path = "half_precision.rs"]
mod half_precision;
#[path = "parity_baselines.rs"]
mod parity_baselines;
#[path = "parity_pipeline.rs"]
mod parity_pipeline;
#[path = "parity_scorers.rs"]
mod parity_scorers;
#[path = "parity_sd.rs"]
mod parity_sd;
#[path = "parity_training.rs"]
mod parity_training;
#[path = "parity_vae_sched.rs"]
mod parity_vae_sched;
#[path = "personalize_golden.rs"]
mod personalize_golden;
