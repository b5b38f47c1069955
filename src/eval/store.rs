//! The results store of an evaluation folder (SPEC.md §6):
//!
//! ```text
//! <out>/eval-config.json   every setting that changes a result (written once, checked on reuse)
//! <out>/results.jsonl      one JSON line per scored image, appended as scored
//! <out>/images/...         generated images (PNG, written atomically before their line)
//! <out>/summary.json|csv   written at the end (see summary.rs)
//! ```
//!
//! A killed run loses at most the line being written: on reopening, a torn last line (no final
//! newline) is dropped and the file rewritten without it, and every job whose key has a line is
//! skipped. A folder whose `eval-config.json` differs from the run's settings is refused, so
//! results of different settings never mix. [`merge`] joins shard folders into one.

use super::protocol::{EvalSettings, Shard, Split};
use super::summary::{summarize, write_summary, Summary};
use super::Scorers;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "eval-config.json";
pub const RESULTS_FILE: &str = "results.jsonl";
/// Version of the results layout, bumped when a line's meaning changes.
pub const FORMAT: u32 = 1;
const SEED_SCHEME: &str =
    "fnv1a64(subject, test image file | \"classic\", caption index, sample index)";

/// What `clip_t`, `clip_i` and `dino` of a results line are.
pub const SCORES: &str = "raw cosine similarities in [-1, 1] (not x100, not clipped at 0): clip_t \
    of the CLIP text and image embeddings, clip_i of the CLIP image embeddings and dino of the \
    DINO CLS features, each averaged over the job's reference images";

fn scores_meaning() -> String {
    SCORES.to_string()
}

/// Everything that decides what a results line means. Two folders with equal configs (shard
/// aside) hold interchangeable lines.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub format: u32,
    /// `test`, `train` (classic) or `both`.
    pub split: Split,
    pub samples: usize,
    pub clip_t_subject: super::protocol::ClipTSubject,
    /// CLIP scorer source (`repo@revision` or a folder).
    pub clip: String,
    /// DINO scorer source.
    pub dino: String,
    /// What the score columns are ([`SCORES`]), so that numbers set beside other papers' are
    /// not mistaken for CLIPScore's `100 * max(cos, 0)` or a rescaled variant. Folders written
    /// before it was recorded held the same scores, hence the default.
    #[serde(default = "scores_meaning")]
    pub scores: String,
    /// The generator's fingerprint (`Generator::id`), or `images:<folder>` for `--images`.
    pub images_from: String,
    /// The dataset folder.
    pub data: String,
    /// How seeds are derived.
    pub seeds: String,
    /// The shard this folder holds (`None`: all jobs).
    pub shard: Option<Shard>,
}

impl EvalConfig {
    pub fn new(settings: &EvalSettings, scorers: &Scorers, images_from: &str, data: &str) -> Self {
        Self {
            format: FORMAT,
            split: settings.split,
            samples: settings.samples,
            clip_t_subject: settings.clip_t_subject,
            clip: scorers.clip_source.to_string(),
            dino: scorers.dino_source.to_string(),
            scores: scores_meaning(),
            images_from: images_from.to_string(),
            data: data.to_string(),
            seeds: SEED_SCHEME.to_string(),
            shard: settings.shard,
        }
    }

    /// Keys whose values differ, each as `key: ours vs theirs` (`ignore` keys skipped).
    pub fn differences(&self, other: &EvalConfig, ignore: &[&str]) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec!["(unreadable config)".into()];
        };
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        keys.into_iter()
            .filter(|k| !ignore.contains(&k.as_str()))
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |v: Option<&serde_json::Value>| {
                    v.map(|v| v.to_string())
                        .unwrap_or_else(|| "(absent)".into())
                };
                format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
            })
            .collect()
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not an attractor eval-config.json (format {FORMAT}); use a new --out",
                path.display()
            )
        })
    }

    fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::files::atomic_write(path, format!("{text}\n").as_bytes())
    }
}

/// One scored image: one line of `results.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// `<subject>/<split>/<test image file | classic>/<caption index>/<sample>`.
    pub key: String,
    pub subject: String,
    /// `test` or `train` (classic).
    pub split: Split,
    /// The test image's file name; `null` for classic.
    pub test_image: Option<String>,
    /// Caption index (split-test) or prompt index (classic).
    pub caption_index: usize,
    pub sample: usize,
    pub seed: u64,
    /// The caption or prompt, with its `{}` (the generator filled in its placeholder).
    pub prompt: String,
    /// The text CLIP-T compared with.
    pub clip_t_text: String,
    /// Cosine of CLIP text and image embeddings (raw, not x2.5).
    pub clip_t: f64,
    /// Mean cosine of CLIP image embeddings with the references.
    pub clip_i: f64,
    /// Mean cosine of DINO CLS features with the references.
    pub dino: f64,
    /// The image: relative to the evaluation folder when generated, else its path.
    pub image: String,
}

/// Read a results file. A torn last line (no final newline) is ignored; `Ok((records, torn))`.
/// Any other unreadable line is an error naming it.
pub fn read_results(path: &Path) -> Result<(Vec<Record>, bool)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let torn = !text.is_empty() && !text.ends_with('\n');
    let complete = if torn {
        match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        }
    } else {
        &text[..]
    };
    let mut records = Vec::new();
    for (i, line) in complete.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(line).with_context(|| {
            format!(
                "{} line {} is not a results record; delete that line (its image will be \
                 scored again) and rerun",
                path.display(),
                i + 1
            )
        })?;
        records.push(r);
    }
    Ok((records, torn))
}

/// An open evaluation folder: its config is checked and its results are loaded.
pub struct Store {
    dir: PathBuf,
    records: Vec<Record>,
    keys: HashSet<String>,
    /// True when a torn last line was found (and dropped) on opening.
    pub repaired_torn_line: bool,
}

impl Store {
    /// Open (or create) `dir` for `config`: refuse a folder written with other settings, drop a
    /// torn last results line, load the done keys.
    pub fn open(dir: &Path, config: &EvalConfig) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let results = dir.join(RESULTS_FILE);
        if cfg_path.is_file() {
            let existing = EvalConfig::read(&cfg_path)?;
            let diff = config.differences(&existing, &[]);
            if !diff.is_empty() {
                bail!(
                    "{} holds results of a different evaluation (this run vs the folder's): {}. \
                     Results of different settings must not mix: pass a new --out (or delete {} \
                     to start over)",
                    dir.display(),
                    diff.join("; "),
                    dir.display()
                );
            }
        } else if results.is_file() {
            bail!(
                "{} has a {RESULTS_FILE} but no {CONFIG_FILE}, so its settings are unknown: pass \
                 a new --out",
                dir.display()
            );
        } else {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            config.write(&cfg_path)?;
        }
        let (records, torn) = read_results(&results)?;
        if torn {
            // Rewrite without the torn tail so the next append starts on a fresh line.
            let mut text = String::new();
            for r in &records {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            crate::files::atomic_write(&results, text.as_bytes())?;
        }
        let mut store = Self {
            dir: dir.to_path_buf(),
            records: Vec::new(),
            keys: HashSet::new(),
            repaired_torn_line: torn,
        };
        for r in records {
            if store.keys.insert(r.key.clone()) {
                store.records.push(r);
            }
        }
        Ok(store)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Append one record (a line of `results.jsonl`, flushed).
    pub fn append(&mut self, record: &Record) -> Result<()> {
        if !self.keys.insert(record.key.clone()) {
            bail!("internal: {} was scored twice", record.key);
        }
        crate::files::append_line(
            &self.dir.join(RESULTS_FILE),
            &serde_json::to_string(record)?,
        )?;
        self.records.push(record.clone());
        Ok(())
    }
}

/// What [`merge`] did.
#[derive(Debug)]
pub struct MergeOutcome {
    pub summary: Summary,
    /// Records in the merged folder.
    pub records: usize,
    /// Keys found in more than one input (kept once).
    pub duplicates: usize,
    /// Keys whose duplicate lines disagree (the first one read is kept).
    pub conflicts: Vec<String>,
}

/// Merge evaluation folders (shards, or partial runs of the same settings) into `out`: verify
/// that their configs agree (apart from `shard`), keep each key once, copy generated images,
/// write `results.jsonl` sorted by key, `eval-config.json` without a shard, and the summary.
/// Records already in `out` are kept; `out` must have the same config if it has one.
pub fn merge(inputs: &[PathBuf], out: &Path) -> Result<MergeOutcome> {
    if inputs.is_empty() {
        bail!(
            "merge: name the shard folders to merge, e.g. `attractor eval merge --out all s1 s2`"
        );
    }
    let mut config: Option<(PathBuf, EvalConfig)> = None;
    for dir in inputs {
        let c = EvalConfig::read(&dir.join(CONFIG_FILE))
            .with_context(|| format!("merge: {} is not an evaluation folder", dir.display()))?;
        match &config {
            None => config = Some((dir.clone(), c)),
            Some((first, fc)) => {
                let diff = fc.differences(&c, &["shard"]);
                if !diff.is_empty() {
                    bail!(
                        "merge: {} and {} were evaluated with different settings ({}); only \
                         shards of one evaluation can be merged",
                        first.display(),
                        dir.display(),
                        diff.join("; ")
                    );
                }
            }
        }
    }
    let mut config = config.map(|(_, c)| c).context("merge: no inputs")?;
    config.shard = None;
    let out_cfg = out.join(CONFIG_FILE);
    if out_cfg.is_file() {
        let existing = EvalConfig::read(&out_cfg)?;
        let diff = config.differences(&existing, &[]);
        if !diff.is_empty() {
            bail!(
                "merge: {} already holds a different evaluation ({}); pass a new --out",
                out.display(),
                diff.join("; ")
            );
        }
    }
    let mut merged: BTreeMap<String, Record> = BTreeMap::new();
    let mut duplicates = 0;
    let mut conflicts = Vec::new();
    let (existing, _) = read_results(&out.join(RESULTS_FILE))?;
    let mut sources: Vec<(Option<PathBuf>, Vec<Record>)> = vec![(None, existing)];
    for dir in inputs {
        let (recs, _) = read_results(&dir.join(RESULTS_FILE))?;
        sources.push((Some(dir.clone()), recs));
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (src, recs) in sources {
        for r in recs {
            if let Some(prev) = merged.get(&r.key) {
                duplicates += 1;
                if !same_result(prev, &r) {
                    conflicts.push(r.key.clone());
                }
                continue;
            }
            if let Some(src) = &src {
                copy_image(src, out, &r)?;
            }
            merged.insert(r.key.clone(), r);
        }
    }
    let mut text = String::new();
    for r in merged.values() {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::files::atomic_write(&out.join(RESULTS_FILE), text.as_bytes())?;
    config.write(&out_cfg)?;
    let records: Vec<Record> = merged.into_values().collect();
    let summary = summarize(&records, &config);
    write_summary(out, &summary)?;
    Ok(MergeOutcome {
        summary,
        records: records.len(),
        duplicates,
        conflicts,
    })
}

fn same_result(a: &Record, b: &Record) -> bool {
    a.seed == b.seed
        && a.prompt == b.prompt
        && (a.clip_t - b.clip_t).abs() < 1e-6
        && (a.clip_i - b.clip_i).abs() < 1e-6
        && (a.dino - b.dino).abs() < 1e-6
}

/// Copy a record's generated image (a path relative to its folder) into `out`.
fn copy_image(src: &Path, out: &Path, r: &Record) -> Result<()> {
    let rel = Path::new(&r.image);
    if rel.is_absolute() {
        return Ok(()); // scored in place (--images): the record points at the file itself
    }
    let from = src.join(rel);
    let to = out.join(rel);
    if from == to || to.is_file() {
        return Ok(());
    }
    let bytes = match std::fs::read(&from) {
        Ok(b) => b,
        // The score stands without the picture; nothing to copy.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", from.display())),
    };
    crate::files::atomic_write(&to, &bytes)
}
