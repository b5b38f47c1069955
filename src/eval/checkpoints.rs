//! Scores over training (`attractor eval --checkpoints`, the paper's Fig. 1): one evaluation per
//! saved step of a run, gathered into a curve per protocol and metric.
//!
//! The point of the figure: under the classic protocol (references = the training images) DINO
//! keeps rising or stays flat as the token overfits, while against the held-out test images it
//! peaks and falls. Each step's evaluation is an ordinary evaluation folder (`step-N/`, resumable
//! like any other); this module only collects their summaries into `checkpoints.csv`.

use super::protocol::Split;
use super::summary::{Metrics, Summary, METRICS_CSV_HEADER};
use std::fmt::Write as _;

/// The curve table's file name.
pub const CURVES_CSV: &str = "checkpoints.csv";
/// The curve plot's file name.
pub const CURVES_PNG: &str = "checkpoints.png";

/// One saved step's scores, per protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct StepScores {
    pub step: usize,
    /// Split-test protocol, when run.
    pub test: Option<Metrics>,
    /// Classic protocol, when run.
    pub classic: Option<Metrics>,
}

impl StepScores {
    /// The overall metrics of a step's evaluation summary.
    pub fn from_summary(step: usize, summary: &Summary) -> Self {
        Self {
            step,
            test: summary.test.as_ref().map(|s| s.overall.clone()),
            classic: summary.train.as_ref().map(|s| s.overall.clone()),
        }
    }

    /// The metrics of one protocol.
    pub fn get(&self, split: Split) -> Option<&Metrics> {
        match split {
            Split::Test => self.test.as_ref(),
            Split::Train => self.classic.as_ref(),
            Split::Both => None,
        }
    }
}

/// The protocols in curve order, with the names the CSV and plot use.
pub const PROTOCOLS: [(Split, &str); 2] = [(Split::Test, "split-test"), (Split::Train, "classic")];

/// `checkpoints.csv`: one row per (step, protocol), steps ascending; empty cells for a standard
/// error below two images.
pub fn curves_csv(steps: &[StepScores]) -> String {
    let mut out = format!("step,protocol,{METRICS_CSV_HEADER}\n");
    let mut sorted: Vec<&StepScores> = steps.iter().collect();
    sorted.sort_by_key(|s| s.step);
    for s in sorted {
        for (split, name) in PROTOCOLS {
            if let Some(m) = s.get(split) {
                let _ = writeln!(out, "{},{name},{}", s.step, m.csv_cells());
            }
        }
    }
    out
}

/// A console table: a row per step, the three metrics per protocol.
pub fn curves_table(steps: &[StepScores]) -> String {
    let mut steps: Vec<&StepScores> = steps.iter().collect();
    steps.sort_by_key(|s| s.step);
    // The protocols any step was scored under: a column group each.
    let present: Vec<(Split, &str)> = PROTOCOLS
        .into_iter()
        .filter(|(split, _)| steps.iter().any(|s| s.get(*split).is_some()))
        .collect();
    let mut out = String::new();
    let _ = write!(out, "{:>8}", "step");
    for (_, name) in &present {
        for m in ["CLIP-T", "CLIP-I", "DINO"] {
            let _ = write!(out, " {:>16}", format!("{name} {m}"));
        }
    }
    out.push('\n');
    for s in &steps {
        let _ = write!(out, "{:>8}", s.step);
        for (split, _) in &present {
            match s.get(*split) {
                Some(m) => {
                    for st in [m.clip_t, m.clip_i, m.dino] {
                        let _ = write!(out, " {:>16.4}", st.mean);
                    }
                }
                None => {
                    let _ = write!(out, " {:>16} {:>16} {:>16}", "-", "-", "-");
                }
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::summary::Stat;

    fn metrics(n: usize, t: f64, i: f64, d: f64, se: Option<f64>) -> Metrics {
        let s = |mean| Stat { mean, se };
        Metrics {
            n,
            clip_t: s(t),
            clip_i: s(i),
            dino: s(d),
        }
    }

    #[test]
    fn csv_rows_by_step_then_protocol() {
        let steps = vec![
            StepScores {
                step: 20,
                test: Some(metrics(4, 0.25, 0.5, 0.125, Some(0.5))),
                classic: Some(metrics(2, 0.75, 0.625, 0.375, None)),
            },
            StepScores {
                step: 10,
                test: Some(metrics(4, 0.3, 0.4, 0.2, Some(0.01))),
                classic: None,
            },
        ];
        let csv = curves_csv(&steps);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines,
            [
                "step,protocol,n,clip_t,clip_t_se,clip_i,clip_i_se,dino,dino_se",
                "10,split-test,4,0.300000,0.010000,0.400000,0.010000,0.200000,0.010000",
                "20,split-test,4,0.250000,0.500000,0.500000,0.500000,0.125000,0.500000",
                "20,classic,2,0.750000,,0.625000,,0.375000,",
            ]
        );
        let table = curves_table(&steps);
        assert!(table.contains("classic DINO"), "{table}");
        assert!(table.lines().nth(1).unwrap().contains('-'), "{table}");
    }
}
