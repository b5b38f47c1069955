//! The summary of an evaluation (SPEC.md §6): per split (test, train = classic), overall and per
//! subject, the mean and standard error of CLIP-T, CLIP-I and DINO over all scored images; with
//! both splits, how much the classic protocol overestimates (classic minus test).
//!
//! The overall mean averages all generated images (subjects weigh by their image count, as the
//! paper averages). The standard error is `sd / sqrt(n)` with the sample standard deviation
//! (`n - 1`); it is `null` for fewer than two images. Written as `summary.json` (with the
//! evaluation's config) and `summary.csv` (one row per split and subject, `ALL` for overall).
//! A photo folder's evaluation (no test split) carries a `note` that its classic scores are
//! training-reference scores, in `summary.json` and on the console.

use super::protocol::Split;
use super::store::{EvalConfig, Record};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

pub const SUMMARY_JSON: &str = "summary.json";
pub const SUMMARY_CSV: &str = "summary.csv";

/// Mean and standard error of one metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub mean: f64,
    /// Standard error of the mean; `None` below two values.
    pub se: Option<f64>,
}

impl Stat {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                se: None,
            };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let se = (n > 1).then(|| {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            (var / n as f64).sqrt()
        });
        Self { mean, se }
    }
}

/// The three metrics over a set of images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Images scored.
    pub n: usize,
    pub clip_t: Stat,
    pub clip_i: Stat,
    pub dino: Stat,
}

/// The CSV columns of [`Metrics::csv_cells`].
pub const METRICS_CSV_HEADER: &str = "n,clip_t,clip_t_se,clip_i,clip_i_se,dino,dino_se";

impl Metrics {
    /// `n` and each metric's mean and standard error as CSV cells (6 decimals; empty where not
    /// finite or, for the standard error, below two images). Columns: [`METRICS_CSV_HEADER`].
    pub fn csv_cells(&self) -> String {
        format!(
            "{},{},{},{},{},{},{}",
            self.n,
            num(self.clip_t.mean),
            opt(self.clip_t.se),
            num(self.clip_i.mean),
            opt(self.clip_i.se),
            num(self.dino.mean),
            opt(self.dino.se)
        )
    }

    pub fn of(records: &[&Record]) -> Self {
        let col = |f: fn(&Record) -> f64| records.iter().map(|r| f(r)).collect::<Vec<_>>();
        Self {
            n: records.len(),
            clip_t: Stat::of(&col(|r| r.clip_t)),
            clip_i: Stat::of(&col(|r| r.clip_i)),
            dino: Stat::of(&col(|r| r.dino)),
        }
    }
}

/// One split: all images, and each subject's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitSummary {
    pub overall: Metrics,
    pub subjects: BTreeMap<String, Metrics>,
}

/// Classic minus split-test, per metric (positive: the classic protocol scores higher).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub clip_t: f64,
    pub clip_i: f64,
    pub dino: f64,
}

impl Delta {
    fn between(classic: &Metrics, test: &Metrics) -> Self {
        Self {
            clip_t: classic.clip_t.mean - test.clip_t.mean,
            clip_i: classic.clip_i.mean - test.clip_i.mean,
            dino: classic.dino.mean - test.dino.mean,
        }
    }
}

/// How much the classic protocol overestimates, overall and for subjects scored under both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Overestimate {
    pub overall: Delta,
    pub subjects: BTreeMap<String, Delta>,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub config: EvalConfig,
    /// The split-test protocol (absent when not run).
    pub test: Option<SplitSummary>,
    /// The classic protocol.
    pub train: Option<SplitSummary>,
    /// Classic minus split-test, when both were run.
    pub classic_minus_test: Option<Overestimate>,
    /// What the scores are, where the protocol's name does not say it: a plain photo folder's
    /// run (`train --images`) has no test split, and its classic scores are training-reference
    /// scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// [`Summary::note`] of a photo folder's evaluation.
pub const TRAINING_REFERENCE_NOTE: &str = "training-reference scores: CLIP-I and DINO compare each image with the photos the subject was trained on (a plain photo folder has no held-out test split); they reward copying those photos and overstate how well the subject generalises";

fn split_summary(records: &[Record], split: Split) -> Option<SplitSummary> {
    // Sorted by key: sums (and so the summary's last digits) do not depend on the order in
    // which shards or resumed runs wrote the lines.
    let mut mine: Vec<&Record> = records.iter().filter(|r| r.split == split).collect();
    mine.sort_by(|a, b| a.key.cmp(&b.key));
    if mine.is_empty() {
        return None;
    }
    let mut by_subject: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in &mine {
        by_subject.entry(r.subject.clone()).or_default().push(r);
    }
    Some(SplitSummary {
        overall: Metrics::of(&mine),
        subjects: by_subject
            .into_iter()
            .map(|(s, rs)| (s, Metrics::of(&rs)))
            .collect(),
    })
}

/// Summarise records (all of a folder).
pub fn summarize(records: &[Record], config: &EvalConfig) -> Summary {
    let test = split_summary(records, Split::Test);
    let train = split_summary(records, Split::Train);
    let classic_minus_test = match (&test, &train) {
        (Some(t), Some(c)) => Some(Overestimate {
            overall: Delta::between(&c.overall, &t.overall),
            subjects: c
                .subjects
                .iter()
                .filter_map(|(s, cm)| {
                    t.subjects
                        .get(s)
                        .map(|tm| (s.clone(), Delta::between(cm, tm)))
                })
                .collect(),
        }),
        _ => None,
    };
    let note = config
        .data
        .starts_with(crate::data::layout::PHOTOS_ID_PREFIX)
        .then(|| TRAINING_REFERENCE_NOTE.to_string());
    Summary {
        config: config.clone(),
        test,
        train,
        classic_minus_test,
        note,
    }
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.6}")
    } else {
        String::new()
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(num).unwrap_or_default()
}

impl Summary {
    /// `summary.csv`: `split,subject,n,clip_t,clip_t_se,clip_i,clip_i_se,dino,dino_se`; subject
    /// `ALL` is the overall row; split `classic-minus-test` rows hold the differences.
    pub fn to_csv(&self) -> String {
        let mut s = format!("split,subject,{METRICS_CSV_HEADER}\n");
        let mut row = |split: &str, subject: &str, m: &Metrics| {
            let _ = writeln!(s, "{split},{subject},{}", m.csv_cells());
        };
        for (name, part) in [("test", &self.test), ("train", &self.train)] {
            if let Some(p) = part {
                row(name, "ALL", &p.overall);
                for (subj, m) in &p.subjects {
                    row(name, subj, m);
                }
            }
        }
        if let Some(o) = &self.classic_minus_test {
            let mut drow = |subject: &str, d: &Delta| {
                let _ = writeln!(
                    s,
                    "classic-minus-test,{subject},,{},,{},,{},",
                    num(d.clip_t),
                    num(d.clip_i),
                    num(d.dino)
                );
            };
            drow("ALL", &o.overall);
            for (subj, d) in &o.subjects {
                drow(subj, d);
            }
        }
        s
    }

    /// A short human-readable table of the overall numbers (for the console).
    pub fn overview(&self) -> String {
        let mut s = String::new();
        let fmt_stat = |st: &Stat| match st.se {
            Some(se) => format!("{:.4} ± {:.4}", st.mean, se),
            None => format!("{:.4}", st.mean),
        };
        let classic = if self.note.is_some() {
            "classic (training-reference)"
        } else {
            "classic"
        };
        for (name, part) in [("split-test", &self.test), (classic, &self.train)] {
            if let Some(p) = part {
                let m = &p.overall;
                let _ = writeln!(
                    s,
                    "{name:<10} n={:<6} CLIP-T {}  CLIP-I {}  DINO {}",
                    m.n,
                    fmt_stat(&m.clip_t),
                    fmt_stat(&m.clip_i),
                    fmt_stat(&m.dino)
                );
            }
        }
        if let Some(note) = &self.note {
            let _ = writeln!(s, "note: {note}");
        }
        if let Some(o) = &self.classic_minus_test {
            let d = &o.overall;
            let _ = writeln!(
                s,
                "the classic protocol overestimates by: CLIP-T {:+.4}  CLIP-I {:+.4}  DINO {:+.4}",
                d.clip_t, d.clip_i, d.dino
            );
        }
        s
    }
}

/// Write `summary.json` and `summary.csv` into `dir` (atomically).
pub fn write_summary(dir: &Path, summary: &Summary) -> Result<()> {
    let json = serde_json::to_string_pretty(summary)?;
    crate::files::atomic_write(&dir.join(SUMMARY_JSON), format!("{json}\n").as_bytes())?;
    crate::files::atomic_write(&dir.join(SUMMARY_CSV), summary.to_csv().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_standard_error() {
        let s = Stat::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((s.mean - 2.5).abs() < 1e-12);
        // sample sd = sqrt(5/3), se = sd / 2
        assert!((s.se.unwrap() - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(Stat::of(&[0.3]).se, None);
    }
}
