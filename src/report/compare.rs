//! Which method pairs a report compares, and their paired results (issue 21, item 3; the
//! statistics are [`super::paired`]'s).
//!
//! Every difference is **B − A**: positive means B scores higher. The comparisons are
//!
//! - each + variant against its base when the sweep has both: A = `ti`, B = `ti+` (likewise
//!   `neti` / `neti+`, `dreambooth-lora` / `dreambooth-lora+`). A base method trains once per
//!   subject (it has no schedule), so *each* schedule of the + variant is compared with that
//!   one base run of the same subject: `ti+ cosine − ti`, `ti+ zero − ti`, ...;
//! - each `--compare A,B` (methods as users type them, a schedule pinned with `:`, e.g.
//!   `neti+:cosine,dreambooth`). Schedules pair by name when both sides have several (`ti+,neti+`
//!   gives `neti+ cosine − ti+ cosine`, ...); a side with one (a method without an attractor, or
//!   a pinned schedule) pairs with each schedule of the other.
//!
//! Pairs are formed within a subject only, from the two runs' results lines with the same key
//! and seed; lines without a partner are counted as unmatched, and a subject whose two runs were
//! scored with different CLIP/DINO models or CLIP-T texts is left out (named in the result).

use super::paired::{self, Interval, Pairs};
use super::{known_method, method_rank, schedule_rank, split_title, Entry, NO_SCHEDULE};
use crate::eval::protocol::Split;
use crate::eval::store::Record;
use crate::personalize::method::Method;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// One side of a `--compare`: a method and, optionally, one of its schedules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    pub method: String,
    pub schedule: Option<String>,
}

fn method_list() -> String {
    Method::ALL
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parse one `--compare` value, `A,B` with each side `METHOD[:SCHEDULE]`.
pub fn parse_compare(spec: &str) -> Result<(Side, Side)> {
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        bail!(
            "--compare {spec}: give two methods separated by a comma, e.g. --compare ti,ti+ \
             (repeat --compare for more pairs)"
        );
    }
    let side = |p: &str| -> Result<Side> {
        let (m, s) = match p.split_once(':') {
            Some((m, s)) => (m.trim(), Some(s.trim().to_string())),
            None => (p, None),
        };
        if known_method(m).is_none() {
            bail!(
                "--compare {spec}: unknown method `{m}` (one of {}; pin a schedule with \
                 METHOD:SCHEDULE, e.g. ti+:cosine)",
                method_list()
            );
        }
        if s.as_deref() == Some("") {
            bail!("--compare {spec}: empty schedule after `{m}:`");
        }
        Ok(Side {
            method: m.to_string(),
            schedule: s,
        })
    };
    Ok((side(parts[0])?, side(parts[1])?))
}

/// A comparison of two (method, schedule) rows of the tables: B − A.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Comparison {
    pub a_method: String,
    pub a_schedule: String,
    pub b_method: String,
    pub b_schedule: String,
}

fn side_label(method: &str, schedule: &str) -> String {
    if schedule == NO_SCHEDULE {
        method.to_string()
    } else {
        format!("{method} {schedule}")
    }
}

impl Comparison {
    pub fn a_label(&self) -> String {
        side_label(&self.a_method, &self.a_schedule)
    }

    pub fn b_label(&self) -> String {
        side_label(&self.b_method, &self.b_schedule)
    }

    /// `B − A`, e.g. `ti+ cosine − ti`.
    pub fn label(&self) -> String {
        format!("{} − {}", self.b_label(), self.a_label())
    }
}

/// The schedules each method has in `entries`, in the tables' order.
fn schedules_of(entries: &[Entry]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in entries {
        let v = m.entry(e.method.clone()).or_default();
        if !v.contains(&e.schedule) {
            v.push(e.schedule.clone());
        }
    }
    for v in m.values_mut() {
        v.sort_by_key(|s| schedule_rank(s));
    }
    m
}

/// The comparisons of a report: every + variant against its base where both are in `entries`,
/// then the `requested` ones (see the module doc for how schedules pair); duplicates once.
/// A requested method or schedule the sweep lacks is an error naming the `--compare` value.
pub fn plan(entries: &[Entry], requested: &[(Side, Side)]) -> Result<Vec<Comparison>> {
    let have = schedules_of(entries);
    let mut out: Vec<Comparison> = Vec::new();
    let mut push = |c: Comparison| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    for base in Method::ALL {
        let Some(plus) = base.plus() else { continue };
        let (Some(sa), Some(sb)) = (have.get(base.name()), have.get(plus.name())) else {
            continue;
        };
        for a in sa {
            for b in sb {
                push(Comparison {
                    a_method: base.name().into(),
                    a_schedule: a.clone(),
                    b_method: plus.name().into(),
                    b_schedule: b.clone(),
                });
            }
        }
    }
    let present = || {
        let mut v: Vec<&String> = have.keys().collect();
        v.sort_by_key(|m| method_rank(m));
        v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    };
    for (a, b) in requested {
        let spec = |s: &Side| match &s.schedule {
            Some(x) => format!("{}:{x}", s.method),
            None => s.method.clone(),
        };
        let flag = format!("--compare {},{}", spec(a), spec(b));
        let pick = |s: &Side| -> Result<Vec<String>> {
            let Some(all) = have.get(&s.method) else {
                bail!(
                    "{flag}: this sweep has no evaluated `{}` runs (it has {})",
                    s.method,
                    present()
                );
            };
            match &s.schedule {
                None => Ok(all.clone()),
                Some(x) if all.contains(x) => Ok(vec![x.clone()]),
                Some(x) => bail!(
                    "{flag}: `{}` has no runs with schedule `{x}` in this sweep (it has {})",
                    s.method,
                    all.join(", ")
                ),
            }
        };
        let (sa, sb) = (pick(a)?, pick(b)?);
        let pairs: Vec<(String, String)> = if sa.len() > 1 && sb.len() > 1 {
            let common: Vec<(String, String)> = sa
                .iter()
                .filter(|s| sb.contains(s))
                .map(|s| (s.clone(), s.clone()))
                .collect();
            if common.is_empty() {
                bail!(
                    "{flag}: the two methods share no schedule ({} vs {}); pin one with \
                     METHOD:SCHEDULE",
                    sa.join(", "),
                    sb.join(", ")
                );
            }
            common
        } else {
            sa.iter()
                .flat_map(|x| sb.iter().map(move |y| (x.clone(), y.clone())))
                .collect()
        };
        for (x, y) in pairs {
            if a.method == b.method && x == y {
                bail!(
                    "{flag}: compares `{}` with itself",
                    side_label(&a.method, &x)
                );
            }
            push(Comparison {
                a_method: a.method.clone(),
                a_schedule: x,
                b_method: b.method.clone(),
                b_schedule: y,
            });
        }
    }
    Ok(out)
}

/// One subject's mean paired difference.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectDiff {
    pub subject: String,
    pub pairs: usize,
    /// Mean B − A of CLIP-T, CLIP-I, DINO.
    pub mean: [f64; 3],
}

/// The result of one comparison on one protocol.
#[derive(Clone, Debug, Serialize)]
pub struct PairedResult {
    pub comparison: Comparison,
    pub split: Split,
    /// Subjects with at least one pair.
    pub subjects: usize,
    pub pairs: usize,
    /// Lines of either side without a partner (seed mismatches counted on both sides).
    pub unmatched: usize,
    /// Subjects that only one side evaluated on this protocol (their lines are unmatched).
    pub unpaired_subjects: Vec<String>,
    /// Subjects left out: the two runs were scored differently (and how).
    pub incompatible: Vec<(String, String)>,
    /// CLIP-T, CLIP-I, DINO (None without pairs).
    pub intervals: Option<[Interval; 3]>,
    pub per_subject: Vec<SubjectDiff>,
}

/// How two evaluations' scores differ in meaning, if they do (other CLIP or DINO model, other
/// CLIP-T text).
fn incompatibility(a: &Entry, b: &Entry) -> Option<String> {
    let (ca, cb) = (&a.summary.config, &b.summary.config);
    let mut why = Vec::new();
    if ca.clip != cb.clip {
        why.push(format!("CLIP {} vs {}", ca.clip, cb.clip));
    }
    if ca.dino != cb.dino {
        why.push(format!("DINO {} vs {}", ca.dino, cb.dino));
    }
    if ca.clip_t_subject != cb.clip_t_subject {
        why.push(format!(
            "--clip-t-subject {:?} vs {:?}",
            ca.clip_t_subject, cb.clip_t_subject
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// The results lines of each evaluation folder, by folder.
pub type RecordsByDir = BTreeMap<PathBuf, Vec<Record>>;

/// One (comparison, protocol) to bootstrap: its pairs, the subjects only one side evaluated,
/// and the subjects left out as scored differently (with why).
type Job = (Comparison, Split, Pairs, Vec<String>, Vec<(String, String)>);

/// Pair and bootstrap every comparison on both protocols (each where either side has lines):
/// `resamples` two-level bootstrap resamples from a seed derived from `seed` and the row (see
/// [`paired::job_seed`]), the rows computed in parallel (same numbers whatever the thread
/// count).
pub fn compute(
    entries: &[Entry],
    records: &RecordsByDir,
    comparisons: &[Comparison],
    resamples: usize,
    seed: u64,
) -> Vec<PairedResult> {
    let no_records: Vec<Record> = Vec::new();
    let lines = |e: &Entry| records.get(&e.eval_dir).unwrap_or(&no_records);
    let mut jobs: Vec<Job> = Vec::new();
    for c in comparisons {
        for split in [Split::Test, Split::Train] {
            let has = |e: &Entry| match split {
                Split::Test => e.summary.test.is_some(),
                _ => e.summary.train.is_some(),
            };
            let side = |m: &str, s: &str| -> BTreeMap<&str, Vec<&Entry>> {
                let mut by: BTreeMap<&str, Vec<&Entry>> = BTreeMap::new();
                for e in entries
                    .iter()
                    .filter(|e| e.method == m && e.schedule == s && has(e))
                {
                    by.entry(e.subject.as_str()).or_default().push(e);
                }
                by
            };
            let sa = side(&c.a_method, &c.a_schedule);
            let sb = side(&c.b_method, &c.b_schedule);
            if sa.is_empty() && sb.is_empty() {
                continue;
            }
            let mut pairs = Pairs::default();
            let mut unpaired = Vec::new();
            let mut incompatible = Vec::new();
            let count = |es: &[&Entry]| -> usize {
                let mut keys: Vec<&str> = es
                    .iter()
                    .flat_map(|e| lines(e).iter())
                    .filter(|r| r.split == split)
                    .map(|r| r.key.as_str())
                    .collect();
                keys.sort_unstable();
                keys.dedup();
                keys.len()
            };
            let mut subjects: Vec<&str> = sa.keys().chain(sb.keys()).copied().collect();
            subjects.sort_unstable();
            subjects.dedup();
            for subject in subjects {
                match (sa.get(subject), sb.get(subject)) {
                    (Some(ea), Some(eb)) => {
                        let why = ea
                            .iter()
                            .flat_map(|x| eb.iter().filter_map(move |y| incompatibility(x, y)))
                            .next();
                        if let Some(why) = why {
                            incompatible.push((subject.to_string(), why));
                            pairs.only_a += count(ea);
                            pairs.only_b += count(eb);
                            continue;
                        }
                        let ra: Vec<Record> =
                            ea.iter().flat_map(|e| lines(e).iter().cloned()).collect();
                        let rb: Vec<Record> =
                            eb.iter().flat_map(|e| lines(e).iter().cloned()).collect();
                        pairs.extend(paired::pair(&ra, &rb, split));
                    }
                    (Some(ea), None) => {
                        unpaired.push(subject.to_string());
                        pairs.only_a += count(ea);
                    }
                    (None, Some(eb)) => {
                        unpaired.push(subject.to_string());
                        pairs.only_b += count(eb);
                    }
                    (None, None) => {}
                }
            }
            jobs.push((c.clone(), split, pairs, unpaired, incompatible));
        }
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let intervals: Vec<Option<[Interval; 3]>> = std::thread::scope(|s| {
        let chunk = jobs.len().div_ceil(threads).max(1);
        let handles: Vec<_> = jobs
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(c, split, p, _, _)| {
                            let seed = paired::job_seed(seed, &c.label(), *split);
                            paired::bootstrap(&p.groups(), resamples, seed, 0.95)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    jobs.into_iter()
        .zip(intervals)
        .map(
            |((comparison, split, p, unpaired, incompatible), intervals)| {
                let per_subject = p
                    .subjects
                    .iter()
                    .map(|(s, images)| (s, paired::group(images)))
                    .filter(|(_, g)| !g.is_empty())
                    .map(|(s, g)| SubjectDiff {
                        subject: s.clone(),
                        pairs: g.iter().map(|i| i.len()).sum(),
                        mean: paired::pooled_mean(&[g]),
                    })
                    .collect::<Vec<_>>();
                PairedResult {
                    comparison,
                    split,
                    subjects: per_subject.len(),
                    pairs: p.n_pairs(),
                    unmatched: p.unmatched(),
                    unpaired_subjects: unpaired,
                    incompatible,
                    intervals,
                    per_subject,
                }
            },
        )
        .collect()
}

/// The protocol's name in the CSV files.
pub fn protocol_name(split: Split) -> &'static str {
    match split {
        Split::Test => "split-test",
        Split::Train => "classic",
        Split::Both => "both",
    }
}

/// `paired.csv`: one row per comparison x protocol x metric; the differences are B − A, the
/// interval a 95 % two-level bootstrap percentile interval (empty cells without pairs).
pub fn paired_csv(results: &[PairedResult]) -> String {
    let mut s = String::from(
        "a_method,a_schedule,b_method,b_schedule,protocol,metric,subjects,pairs,unmatched,\
         mean_b_minus_a,ci95_lo,ci95_hi\n",
    );
    for r in results {
        let c = &r.comparison;
        for (k, metric) in paired::METRIC_KEYS.iter().enumerate() {
            let (m, lo, hi) = match &r.intervals {
                Some(iv) => (
                    format!("{:.6}", iv[k].mean),
                    format!("{:.6}", iv[k].lo),
                    format!("{:.6}", iv[k].hi),
                ),
                None => Default::default(),
            };
            let _ = writeln!(
                s,
                "{},{},{},{},{},{metric},{},{},{},{m},{lo},{hi}",
                c.a_method,
                c.a_schedule,
                c.b_method,
                c.b_schedule,
                protocol_name(r.split),
                r.subjects,
                r.pairs,
                r.unmatched
            );
        }
    }
    s
}

/// `paired-subjects.csv`: each subject's mean paired difference (B − A) per comparison and
/// protocol.
pub fn subjects_csv(results: &[PairedResult]) -> String {
    let mut s = String::from(
        "a_method,a_schedule,b_method,b_schedule,protocol,subject,pairs,\
         clip_t_b_minus_a,clip_i_b_minus_a,dino_b_minus_a\n",
    );
    for r in results {
        let c = &r.comparison;
        for d in &r.per_subject {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{:.6},{:.6},{:.6}",
                c.a_method,
                c.a_schedule,
                c.b_method,
                c.b_schedule,
                protocol_name(r.split),
                d.subject,
                d.pairs,
                d.mean[0],
                d.mean[1],
                d.mean[2]
            );
        }
    }
    s
}

/// One line per result for the terminal.
pub fn summary_lines(results: &[PairedResult]) -> String {
    let mut s = String::new();
    for r in results {
        let _ = write!(
            s,
            "paired {} ({}): {} subjects, {} pairs, {} unmatched",
            r.comparison.label(),
            split_title(r.split),
            r.subjects,
            r.pairs,
            r.unmatched
        );
        if let Some(iv) = &r.intervals {
            for (k, name) in paired::METRIC_NAMES.iter().enumerate() {
                let _ = write!(
                    s,
                    "; {name} {:+.4} [{:+.4}, {:+.4}]{}",
                    iv[k].mean,
                    iv[k].lo,
                    iv[k].hi,
                    if iv[k].excludes_zero() { "*" } else { "" }
                );
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(m: &str, s: Option<&str>) -> Side {
        Side {
            method: m.into(),
            schedule: s.map(str::to_string),
        }
    }

    #[test]
    fn parses_compare_values() {
        assert_eq!(
            parse_compare("neti+,dreambooth").unwrap(),
            (side("neti+", None), side("dreambooth", None))
        );
        assert_eq!(
            parse_compare(" ti+:cosine , ti ").unwrap(),
            (side("ti+", Some("cosine")), side("ti", None))
        );
        for (bad, needle) in [
            ("ti", "two methods separated by a comma"),
            ("ti,ti+,neti", "two methods"),
            ("ti,", "two methods"),
            ("ti,tiplus", "unknown method `tiplus`"),
            ("ti+:,ti", "empty schedule"),
        ] {
            let e = format!("{:#}", parse_compare(bad).unwrap_err());
            assert!(e.contains(needle) && e.contains("--compare"), "{bad}: {e}");
        }
    }
}
