//! The training runs' held-out and training-reference losses (issue 23, item 4): the trainer's
//! `--heldout-every N` logs, in `RUN/metrics.jsonl`, lines with `"step"` and, at held-out
//! evaluation steps, `"heldout_loss"` (the noise-prediction loss on the subject's test images
//! at fixed (t, noise) pairs, SPEC.md §9) and `"train_ref_loss"` (the same on its training
//! images). The report plots both over steps, one panel per subject and a line per (method,
//! schedule) (see [`super::plot::loss_curves`]); with no such lines in any run there is no plot.
//!
//! The run folder of an evaluation is the folder above it (where `config.json` and
//! `metrics.jsonl` lie). A line that is not JSON (a line being written while the report
//! reads) is skipped, as are lines without either loss; a step logged twice keeps its last line
//! (a resumed run rewrites the steps after its checkpoint).

use super::{method_rank, schedule_rank, Entry, NO_SCHEDULE};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The metrics file of a training run.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The losses logged at one step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub heldout: Option<f64>,
    pub train_ref: Option<f64>,
}

/// The loss points of a metrics file's text, by step.
pub fn parse_metrics(text: &str) -> Vec<LossPoint> {
    let mut by_step: BTreeMap<u64, LossPoint> = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
            continue;
        };
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).filter(|x| x.is_finite());
        let (heldout, train_ref) = (f("heldout_loss"), f("train_ref_loss"));
        if heldout.is_none() && train_ref.is_none() {
            continue;
        }
        by_step.insert(
            step,
            LossPoint {
                step,
                heldout,
                train_ref,
            },
        );
    }
    by_step.into_values().collect()
}

/// One run's loss curve.
#[derive(Clone, Debug, PartialEq)]
pub struct LossSeries {
    pub subject: String,
    pub method: String,
    pub schedule: String,
    pub run_dir: PathBuf,
    pub points: Vec<LossPoint>,
}

impl LossSeries {
    /// `method` or `method schedule`, as the legend shows it.
    pub fn label(&self) -> String {
        if self.schedule == NO_SCHEDULE {
            self.method.clone()
        } else {
            format!("{} {}", self.method, self.schedule)
        }
    }
}

/// The loss curves of every evaluated run that logged held-out losses (each run once), sorted
/// by subject, then the tables' method and schedule order.
pub fn gather(entries: &[Entry]) -> Result<Vec<LossSeries>> {
    let mut seen: Vec<&Path> = Vec::new();
    let mut out = Vec::new();
    for e in entries {
        let Some(run) = e.eval_dir.parent() else {
            continue;
        };
        if seen.contains(&run) {
            continue;
        }
        seen.push(run);
        let path = run.join(METRICS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let points = parse_metrics(&text);
        if points.is_empty() {
            continue;
        }
        out.push(LossSeries {
            subject: e.subject.clone(),
            method: e.method.clone(),
            schedule: e.schedule.clone(),
            run_dir: run.to_path_buf(),
            points,
        });
    }
    out.sort_by(|a, b| {
        (
            &a.subject,
            method_rank(&a.method),
            schedule_rank(&a.schedule),
        )
            .cmp(&(
                &b.subject,
                method_rank(&b.method),
                schedule_rank(&b.schedule),
            ))
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loss_lines() {
        let text = "{\"step\":1,\"loss\":0.5}\n\
                    {\"step\":2,\"loss\":0.4,\"heldout_loss\":0.3,\"train_ref_loss\":0.2}\n\
                    not json\n\
                    {\"step\":4,\"heldout_loss\":0.25}\n\
                    {\"step\":2,\"heldout_loss\":0.35,\"train_ref_loss\":0.1}\n\
                    {\"heldout_loss\":0.1}\n\
                    {\"step\":6,\"train_ref_loss\":0.05";
        let p = parse_metrics(text);
        assert_eq!(
            p,
            [
                LossPoint {
                    step: 2,
                    heldout: Some(0.35),
                    train_ref: Some(0.1)
                },
                LossPoint {
                    step: 4,
                    heldout: Some(0.25),
                    train_ref: None
                },
            ]
        );
        assert!(parse_metrics("{\"step\":1,\"loss\":0.5}\n").is_empty());
    }
}
