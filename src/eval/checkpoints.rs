//! Scores over training (`attractor eval --checkpoints`, the paper's Fig. 1): one evaluation per
//! saved step of a run, gathered into a curve per protocol and metric.
//!
//! The point of the figure: under the classic protocol (references = the training images) DINO
//! keeps rising or stays flat as the token overfits, while against the held-out test images it
//! peaks and falls. Each step's evaluation is an ordinary evaluation folder (`step-N/`, resumable
//! like any other); this module only collects their summaries into `checkpoints.csv`, and
//! says in `best.json` which step each protocol would pick ([`best_choices`]).

use super::protocol::Split;
use super::summary::{Metrics, Summary, METRICS_CSV_HEADER};
use serde::Serialize;
use std::fmt::Write as _;

/// The curve table's file name.
pub const CURVES_CSV: &str = "checkpoints.csv";
/// The curve plot's file name.
pub const CURVES_PNG: &str = "checkpoints.png";
/// Which step each protocol (and the held-out loss) would pick.
pub const BEST_JSON: &str = "best.json";

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

/// One metric's pick of a step under each protocol: the paper's bias as one number, how far
/// the classic protocol's choice is from the honest (split-test) one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricChoice {
    /// `CLIP-T`, `CLIP-I` or `DINO`.
    pub metric: &'static str,
    /// The step with the highest split-test score, and that score.
    pub split_test_step: Option<usize>,
    pub split_test_score: Option<f64>,
    /// The step with the highest classic score, and that score.
    pub classic_step: Option<usize>,
    pub classic_score: Option<f64>,
    /// The split-test score of the classic protocol's choice, and how much lower it is than the
    /// best split-test score (>= 0: what picking by training-reference scores costs).
    pub split_test_score_at_classic_step: Option<f64>,
    pub split_test_loss_of_classic_choice: Option<f64>,
    /// The split-test score at the held-out loss's choice.
    pub split_test_score_at_heldout_step: Option<f64>,
}

/// `best.json`: every metric's choices, and the held-out loss's (lowest `heldout_loss` among the
/// evaluated steps, from the run's metrics.jsonl; none when the run did not log it).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BestChoices {
    pub heldout_loss_step: Option<usize>,
    pub heldout_loss: Option<f64>,
    pub metrics: Vec<MetricChoice>,
}

/// Reads one metric's mean out of a protocol's metrics.
type MetricOf = fn(&Metrics) -> f64;

/// The step of the largest value (the earliest on ties).
fn argmax(v: impl Iterator<Item = (usize, f64)>) -> Option<(usize, f64)> {
    v.fold(None, |best, (s, x)| match best {
        Some((_, b)) if x <= b => best,
        _ => Some((s, x)),
    })
}

/// Which step each protocol scores best for each metric, and the held-out loss's choice among
/// the evaluated steps (`heldout`: (step, loss) pairs as logged; steps without an evaluation
/// are ignored, since no protocol scored them).
pub fn best_choices(steps: &[StepScores], heldout: &[(usize, f64)]) -> BestChoices {
    let mut sorted: Vec<&StepScores> = steps.iter().collect();
    sorted.sort_by_key(|s| s.step);
    let evaluated: Vec<usize> = sorted.iter().map(|s| s.step).collect();
    let held = argmax(
        heldout
            .iter()
            .filter(|(s, _)| evaluated.contains(s))
            .map(|&(s, l)| (s, -l)),
    )
    .map(|(s, l)| (s, -l));
    let score_at = |split: Split, step: usize, pick: MetricOf| {
        sorted
            .iter()
            .find(|s| s.step == step)
            .and_then(|s| s.get(split))
            .map(pick)
    };
    let picks: [(&'static str, MetricOf); 3] = [
        ("CLIP-T", |m| m.clip_t.mean),
        ("CLIP-I", |m| m.clip_i.mean),
        ("DINO", |m| m.dino.mean),
    ];
    let metrics = picks
        .into_iter()
        .map(|(metric, pick)| {
            let best_of = |split: Split| {
                argmax(
                    sorted
                        .iter()
                        .filter_map(|s| s.get(split).map(|m| (s.step, pick(m)))),
                )
            };
            let test = best_of(Split::Test);
            let classic = best_of(Split::Train);
            let at_classic = classic.and_then(|(c, _)| score_at(Split::Test, c, pick));
            MetricChoice {
                metric,
                split_test_step: test.map(|t| t.0),
                split_test_score: test.map(|t| t.1),
                classic_step: classic.map(|c| c.0),
                classic_score: classic.map(|c| c.1),
                split_test_score_at_classic_step: at_classic,
                split_test_loss_of_classic_choice: test.zip(at_classic).map(|(t, a)| t.1 - a),
                split_test_score_at_heldout_step: held
                    .and_then(|(h, _)| score_at(Split::Test, h, pick)),
            }
        })
        .collect();
    BestChoices {
        heldout_loss_step: held.map(|h| h.0),
        heldout_loss: held.map(|h| h.1),
        metrics,
    }
}

/// The console table of [`best_choices`]: a row per metric.
pub fn best_table(b: &BestChoices) -> String {
    let step = |s: Option<usize>| s.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    let score = |s: Option<f64>| s.map(|s| format!("{s:.4}")).unwrap_or_else(|| "-".into());
    let mut out = format!(
        "{:<8} {:>16} {:>14} {:>24} {:>18}\n",
        "metric", "split-test best", "classic best", "split-test at classic's", "held-out loss's"
    );
    for m in &b.metrics {
        let _ = writeln!(
            out,
            "{:<8} {:>16} {:>14} {:>24} {:>18}",
            m.metric,
            format!(
                "step {} ({})",
                step(m.split_test_step),
                score(m.split_test_score)
            ),
            format!("step {}", step(m.classic_step)),
            format!(
                "{} (-{})",
                score(m.split_test_score_at_classic_step),
                score(m.split_test_loss_of_classic_choice)
            ),
            match b.heldout_loss_step {
                Some(h) => format!("step {h} ({})", score(m.split_test_score_at_heldout_step)),
                None => "-".into(),
            }
        );
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

    /// Classic keeps rising with training while split-test peaks at step 2: the table's bias.
    #[test]
    fn best_steps_per_protocol_and_heldout() {
        let step = |step, test_dino, classic_dino| StepScores {
            step,
            test: Some(metrics(4, 0.3, 0.5, test_dino, None)),
            classic: Some(metrics(4, 0.3, 0.5, classic_dino, None)),
        };
        let steps = vec![step(3, 0.20, 0.9), step(1, 0.25, 0.5), step(2, 0.40, 0.7)];
        let b = best_choices(&steps, &[(1, 0.30), (2, 0.20), (3, 0.25), (4, 0.01)]);
        assert_eq!(b.heldout_loss_step, Some(2), "step 4 was not evaluated");
        let dino = &b.metrics[2];
        assert_eq!(dino.metric, "DINO");
        assert_eq!(
            (dino.split_test_step, dino.classic_step),
            (Some(2), Some(3))
        );
        assert_eq!(dino.split_test_score_at_classic_step, Some(0.20));
        assert!((dino.split_test_loss_of_classic_choice.unwrap() - 0.20).abs() < 1e-12);
        assert_eq!(dino.split_test_score_at_heldout_step, Some(0.40));
        // Equal scores everywhere: the earliest step.
        assert_eq!(b.metrics[0].split_test_step, Some(1));
        let table = best_table(&b);
        assert!(
            table.contains("DINO") && table.contains("step 2 (0.4000)"),
            "{table}"
        );
        assert_eq!(best_choices(&steps, &[]).heldout_loss_step, None);
    }
}
