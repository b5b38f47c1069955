//! The report of a sweep (SPEC.md §6-7): every evaluation summary under a sweep folder, pooled
//! over subjects into one table per split (method x schedule: mean and standard error of CLIP-T,
//! CLIP-I and DINO), the schedule bar chart (the paper's Fig. 7), the method bubble chart
//! (Fig. 5: x DINO, y CLIP-I, bubble size CLIP-T, a colour per method family, arrows from ti,
//! neti and dreambooth-lora to their + variants), and one self-contained HTML page with the
//! tables, the plots and a grid of generated samples. Every method of
//! [`Method::ALL`](crate::personalize::method::Method::ALL) has its place in the tables, in the
//! paper's order.
//!
//! Layout it reads (what `scripts/sweep-schedules.sh` and `scripts/slurm/submit.sh` write):
//!
//! ```text
//! SWEEP_DIR/runs/<subject>/<method>/<schedule>/config.json      the training run (RunInfo)
//! SWEEP_DIR/runs/<subject>/<method>/<schedule>/eval/summary.json its evaluation (any split)
//! ```
//!
//! Any `summary.json` under the folder counts, wherever it lies, when the folder above its
//! evaluation folder is a training run (its `config.json` names subject, method and schedule);
//! otherwise the path must end in `<subject>/<method>/<schedule>/<eval folder>/summary.json`.
//! Shard folders (their config names a shard) are skipped: the merged folder holds their lines.
//!
//! Pooling is over images, as a run's own summary pools its images: the pooled mean weighs each
//! subject by its image count and the standard error is `sd / sqrt(n)` of all images together,
//! recovered exactly from each part's (n, mean, standard error).
//!
//! Beside the tables: paired comparisons of methods on the same seeds (each + variant against
//! its base and any `--compare A,B`; differences B − A with a two-level bootstrap interval, see
//! [`compare`] and [`paired`]), the qualitative grid of one test image per row ([`qualitative`],
//! the paper's Fig. 6), and the runs' held-out and training-reference losses over steps where
//! their `metrics.jsonl` logged them ([`losses`]). The page does not show the per-checkpoint
//! score curves (the paper's Fig. 1): `eval --checkpoints` draws those into its own folder.
//!
//! Written (atomically, via `crate::files`) into the output folder: `report.html`,
//! `report.json`, `table-<split>.csv`, `table.md`, `schedules-<method>-<split>.png`,
//! `methods-<split>.png`, and where there is something to show `paired.csv` and
//! `paired-subjects.csv`, `qualitative.png` and `losses.png`.

pub mod compare;
pub mod html;
pub mod losses;
pub mod paired;
pub mod plot;
pub mod qualitative;

use crate::eval::protocol::Split;
use crate::eval::store::{read_results, Record};
use crate::eval::summary::{Metrics, Stat, Summary, METRICS_CSV_HEADER, SUMMARY_JSON};
use crate::personalize::method::{Method, Schedule};
use crate::personalize::trainer::RunInfo;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The schedule label of methods without an attractor (ti, neti, dreambooth, dreambooth-lora,
/// custom-diffusion: their schedule is not used).
pub const NO_SCHEDULE: &str = "-";

/// One evaluated run found under the sweep folder.
#[derive(Clone, Debug)]
pub struct Entry {
    pub subject: String,
    pub method: String,
    /// The contrastive-weight schedule, or [`NO_SCHEDULE`] for methods without an attractor.
    pub schedule: String,
    /// The evaluation folder (holds `summary.json`, `results.jsonl`, `images/`).
    pub eval_dir: PathBuf,
    pub summary: Summary,
}

/// A summary.json that was found but not used, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Every evaluation summary under `dir` (sorted by method, schedule, subject), and the
/// summaries that were left out with the reason.
pub fn discover(dir: &Path) -> Result<(Vec<Entry>, Vec<Skipped>)> {
    if !dir.is_dir() {
        bail!(
            "{}: no such folder (pass the sweep's --out folder)",
            dir.display()
        );
    }
    let mut found = Vec::new();
    walk(dir, &mut found)?;
    found.sort();
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for path in found {
        match entry(dir, &path) {
            Ok(Some(e)) => entries.push(e),
            Ok(None) => {}
            Err(e) => skipped.push(Skipped {
                path,
                reason: format!("{e:#}"),
            }),
        }
    }
    entries.sort_by(|a, b| {
        (
            method_rank(&a.method),
            schedule_rank(&a.schedule),
            &a.subject,
        )
            .cmp(&(
                method_rank(&b.method),
                schedule_rank(&b.schedule),
                &b.subject,
            ))
    });
    Ok((entries, skipped))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in rd {
        let e = e?;
        let p = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            // Generated images and checkpoints hold no summaries; skip the big folders.
            let name = e.file_name();
            if name == "images" || name == "checkpoints" {
                continue;
            }
            walk(&p, out)?;
        } else if ft.is_file() && e.file_name() == SUMMARY_JSON {
            out.push(p);
        }
    }
    Ok(())
}

/// Read one summary and work out whose it is; `Ok(None)` for shard summaries.
fn entry(root: &Path, path: &Path) -> Result<Option<Entry>> {
    let text = std::fs::read_to_string(path)?;
    let summary: Summary =
        serde_json::from_str(&text).context("not an `attractor eval` summary.json")?;
    if summary.config.shard.is_some() {
        return Ok(None);
    }
    let eval_dir = path
        .parent()
        .context("summary.json has no folder")?
        .to_path_buf();
    let run_dir = eval_dir.parent();
    let from_run = run_dir
        .map(|r| r.join("config.json"))
        .filter(|c| c.is_file())
        .and_then(|c| std::fs::read_to_string(c).ok())
        .and_then(|t| serde_json::from_str::<RunInfo>(&t).ok());
    let (subject, method, schedule) = match from_run {
        Some(info) => {
            let m = info.settings.s.method;
            let schedule = if m.uses_attractor() {
                info.settings.s.schedule.name().to_string()
            } else {
                NO_SCHEDULE.to_string()
            };
            (info.subject, m.name().to_string(), schedule)
        }
        None => {
            // <subject>/<method>/<schedule>/<eval>/summary.json, below the sweep folder.
            let rel = eval_dir.strip_prefix(root).unwrap_or(&eval_dir);
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().to_string())
                .collect();
            if parts.len() < 4 {
                bail!(
                    "no training run's config.json beside its evaluation folder, and the path is \
                     not <subject>/<method>/<schedule>/<eval folder>/summary.json"
                );
            }
            let n = parts.len();
            let method = parts[n - 3].clone();
            let schedule = match known_method(&method) {
                Some(m) if !m.uses_attractor() => NO_SCHEDULE.to_string(),
                _ => parts[n - 2].clone(),
            };
            (parts[n - 4].clone(), method, schedule)
        }
    };
    Ok(Some(Entry {
        subject,
        method,
        schedule,
        eval_dir,
        summary,
    }))
}

/// The method of a name as users type it (`ti`, ..., `dreambooth-lora+`); `None` for names no
/// method has.
pub fn known_method(name: &str) -> Option<Method> {
    Method::ALL.iter().copied().find(|m| m.name() == name)
}

/// Sort key: the paper's method order, unknown names after.
pub fn method_rank(m: &str) -> (usize, String) {
    let i = Method::ALL
        .iter()
        .position(|x| x.name() == m)
        .unwrap_or(Method::ALL.len());
    (i, m.to_string())
}

/// Sort key: the schedules in the paper's order, [`NO_SCHEDULE`] first, unknown names after.
pub fn schedule_rank(s: &str) -> (usize, String) {
    let i = if s == NO_SCHEDULE {
        0
    } else {
        Schedule::ALL
            .iter()
            .position(|x| x.name() == s)
            .map(|i| i + 1)
            .unwrap_or(Schedule::ALL.len() + 1)
    };
    (i, s.to_string())
}

/// Pool the summaries of disjoint image sets into the statistics of their union: exact for
/// the mean and for the standard error (each part's sum of squared deviations is
/// `(n - 1) * se^2 * n`).
pub fn pool(parts: &[&Metrics]) -> Metrics {
    let pick: [fn(&Metrics) -> &Stat; 3] = [|m| &m.clip_t, |m| &m.clip_i, |m| &m.dino];
    let n: usize = parts.iter().map(|m| m.n).sum();
    let stats: Vec<Stat> = pick
        .iter()
        .map(|f| {
            let items: Vec<(f64, f64, Option<f64>)> = parts
                .iter()
                .filter(|m| m.n > 0)
                .map(|m| (m.n as f64, f(m).mean, f(m).se))
                .collect();
            pool_stat(&items)
        })
        .collect();
    Metrics {
        n,
        clip_t: stats[0],
        clip_i: stats[1],
        dino: stats[2],
    }
}

/// (n, mean, se) parts -> the pooled mean and standard error.
fn pool_stat(parts: &[(f64, f64, Option<f64>)]) -> Stat {
    let n: f64 = parts.iter().map(|p| p.0).sum();
    if n == 0.0 {
        return Stat {
            mean: f64::NAN,
            se: None,
        };
    }
    let mean = parts.iter().map(|(k, m, _)| k * m).sum::<f64>() / n;
    let se = (n > 1.0).then(|| {
        let ss: f64 = parts
            .iter()
            .map(|(k, m, se)| {
                let within = match se {
                    Some(se) if *k > 1.0 => (k - 1.0) * se * se * k,
                    _ => 0.0,
                };
                within + k * (m - mean).powi(2)
            })
            .sum();
        (ss / (n - 1.0) / n).sqrt()
    });
    Stat { mean, se }
}

/// One table row: a (method, schedule) pooled over its subjects.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub method: String,
    pub schedule: String,
    pub subjects: Vec<String>,
    pub metrics: Metrics,
}

/// One split's table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Table {
    /// `test` (split-test) or `train` (classic).
    pub split: Split,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn title(&self) -> &'static str {
        split_title(self.split)
    }

    /// `method,schedule,subjects,n,clip_t,clip_t_se,clip_i,clip_i_se,dino,dino_se`.
    pub fn to_csv(&self) -> String {
        let mut s = format!("method,schedule,subjects,{METRICS_CSV_HEADER}\n");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{},{},{},{}",
                r.method,
                r.schedule,
                r.subjects.len(),
                r.metrics.csv_cells()
            );
        }
        s
    }

    /// A Markdown table.
    pub fn to_markdown(&self) -> String {
        let mut s = format!("### {}\n\n", self.title());
        s.push_str("| method | schedule | subjects | images | CLIP-T | CLIP-I | DINO |\n");
        s.push_str("|---|---|---:|---:|---|---|---|\n");
        for r in &self.rows {
            let m = &r.metrics;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.method,
                r.schedule,
                r.subjects.len(),
                m.n,
                fmt_stat(&m.clip_t),
                fmt_stat(&m.clip_i),
                fmt_stat(&m.dino)
            );
        }
        s
    }
}

/// `mean ± se` (4 decimals; `mean` alone below two images).
pub fn fmt_stat(s: &Stat) -> String {
    match s.se {
        Some(se) => format!("{:.4} ± {:.4}", s.mean, se),
        None if s.mean.is_finite() => format!("{:.4}", s.mean),
        None => "n/a".to_string(),
    }
}

/// The reader's name of a split.
pub fn split_title(split: Split) -> &'static str {
    match split {
        Split::Test => "split-test protocol",
        Split::Train => "classic protocol",
        Split::Both => "both protocols",
    }
}

/// The short file-name tag of a split.
pub fn split_tag(split: Split) -> &'static str {
    match split {
        Split::Test => "test",
        Split::Train => "train",
        Split::Both => "both",
    }
}

/// A method name usable in a file name (`neti+` -> `netiplus`, `dreambooth-lora+` ->
/// `dreambooth-loraplus`).
pub fn method_tag(method: &str) -> String {
    method
        .replace('+', "plus")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A sort key of [`method_rank`] / [`schedule_rank`].
type RankKey = (usize, String);

/// The tables of a sweep: one per split that any entry has.
pub fn tables(entries: &[Entry]) -> Vec<Table> {
    let mut out = Vec::new();
    for split in [Split::Test, Split::Train] {
        let mut groups: BTreeMap<(RankKey, RankKey), Vec<&Entry>> = BTreeMap::new();
        for e in entries {
            let part = match split {
                Split::Test => &e.summary.test,
                _ => &e.summary.train,
            };
            if part.is_some() {
                groups
                    .entry((method_rank(&e.method), schedule_rank(&e.schedule)))
                    .or_default()
                    .push(e);
            }
        }
        if groups.is_empty() {
            continue;
        }
        let rows = groups
            .into_iter()
            .map(|((m, s), es)| {
                let parts: Vec<&Metrics> = es
                    .iter()
                    .filter_map(|e| match split {
                        Split::Test => e.summary.test.as_ref(),
                        _ => e.summary.train.as_ref(),
                    })
                    .map(|p| &p.overall)
                    .collect();
                let mut subjects: Vec<String> = es.iter().map(|e| e.subject.clone()).collect();
                subjects.sort();
                subjects.dedup();
                Row {
                    method: m.1,
                    schedule: s.1,
                    subjects,
                    metrics: pool(&parts),
                }
            })
            .collect();
        out.push(Table { split, rows });
    }
    out
}

/// A few generated images of one (method, schedule, subject).
#[derive(Clone, Debug)]
pub struct SampleSet {
    pub method: String,
    pub schedule: String,
    pub subject: String,
    /// (image file, the prompt it was generated from).
    pub images: Vec<(PathBuf, String)>,
    /// The held-out test images the split-test samples among them were scored against
    /// (when the dataset is still where the evaluation found it).
    pub references: Vec<PathBuf>,
}

/// The results lines of every entry's evaluation folder (a torn last line left out).
pub fn read_records(entries: &[Entry]) -> Result<compare::RecordsByDir> {
    let mut out = compare::RecordsByDir::new();
    for e in entries {
        if !out.contains_key(&e.eval_dir) {
            let (records, _) = read_results(&e.eval_dir.join(crate::eval::store::RESULTS_FILE))?;
            out.insert(e.eval_dir.clone(), records);
        }
    }
    Ok(out)
}

/// Up to `per_cell` generated images of each entry, split-test first (then classic), by key.
pub fn samples(
    entries: &[Entry],
    records: &compare::RecordsByDir,
    per_cell: usize,
) -> Result<Vec<SampleSet>> {
    let mut out = Vec::new();
    for e in entries {
        let mut records: Vec<&Record> = records
            .get(&e.eval_dir)
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        records.sort_by(|a: &&Record, b: &&Record| {
            ((a.split != Split::Test), &a.key).cmp(&((b.split != Split::Test), &b.key))
        });
        let chosen: Vec<&Record> = records
            .into_iter()
            .filter(|r| {
                let p = Path::new(&r.image);
                p.is_absolute() && p.is_file() || e.eval_dir.join(p).is_file()
            })
            .take(per_cell)
            .collect();
        let images = chosen
            .iter()
            .map(|r| (e.eval_dir.join(&r.image), r.prompt.clone()))
            .collect();
        let data = Path::new(&e.summary.config.data);
        let mut references: Vec<PathBuf> = Vec::new();
        for r in &chosen {
            if let Some(t) = &r.test_image {
                let p = data.join(&r.subject).join("test").join(t);
                if p.is_file() && !references.contains(&p) {
                    references.push(p);
                }
            }
        }
        out.push(SampleSet {
            method: e.method.clone(),
            schedule: e.schedule.clone(),
            subject: e.subject.clone(),
            images,
            references,
        });
    }
    Ok(out)
}

/// `report.json`: what the report was built from and its tables.
#[derive(Clone, Debug, Serialize)]
pub struct ReportJson {
    pub sweep: String,
    pub runs: Vec<RunRef>,
    pub skipped: Vec<Skipped>,
    pub tables: Vec<Table>,
    /// The paired comparisons (differences B − A).
    pub paired: Vec<compare::PairedResult>,
    /// The bootstrap behind their intervals.
    pub bootstrap: BootstrapJson,
    /// The results keys of the qualitative grid's rows, top to bottom.
    pub qualitative_rows: Vec<String>,
    /// The runs whose held-out losses are plotted.
    pub loss_runs: Vec<String>,
}

/// How the paired intervals were computed.
#[derive(Clone, Debug, Serialize)]
pub struct BootstrapJson {
    pub method: &'static str,
    pub level: f64,
    pub resamples: usize,
    pub seed: u64,
}

/// One evaluated run in `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunRef {
    pub subject: String,
    pub method: String,
    pub schedule: String,
    pub eval_dir: String,
}

/// What [`write_report`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub tables: Vec<Table>,
    pub files: Vec<PathBuf>,
    pub skipped: Vec<Skipped>,
    pub entries: usize,
    pub paired: Vec<compare::PairedResult>,
}

/// Options of [`write_report`].
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Generated images shown per (method, schedule, subject) in the HTML grid.
    pub grid_images: usize,
    /// Thumbnail edge in pixels.
    pub thumb: u32,
    /// Comparisons asked for beside the automatic + variant vs base ones (`--compare`).
    pub compare: Vec<(compare::Side, compare::Side)>,
    /// Bootstrap resamples of the paired intervals.
    pub resamples: usize,
    /// Bootstrap seed.
    pub seed: u64,
    /// Rows of the qualitative grid (`None`: one per subject, at most 8; 0: no grid).
    pub grid_rows: Option<usize>,
    /// Cell edge of the qualitative grid, pixels.
    pub grid_cell: u32,
    /// The dataset folder holding the reference test images (`None`: the one each evaluation
    /// recorded).
    pub data: Option<PathBuf>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            grid_images: 4,
            thumb: 128,
            compare: Vec::new(),
            resamples: paired::DEFAULT_RESAMPLES,
            seed: paired::DEFAULT_SEED,
            grid_rows: None,
            grid_cell: 160,
            data: None,
        }
    }
}

/// Build the whole report of the sweep folder `sweep` into `out`.
pub fn write_report(sweep: &Path, out: &Path, opts: &ReportOptions) -> Result<Written> {
    let (entries, skipped) = discover(sweep)?;
    if entries.is_empty() {
        bail!(
            "{}: no evaluation summaries found (expected runs/<subject>/<method>/<schedule>/eval/\
             summary.json; run `attractor eval --run RUN --split both` on the runs first){}",
            sweep.display(),
            skipped
                .first()
                .map(|s| format!("; {} was skipped: {}", s.path.display(), s.reason))
                .unwrap_or_default()
        );
    }
    let comparisons = compare::plan(&entries, &opts.compare)?;
    let records = read_records(&entries)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let tables = tables(&entries);
    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| -> Result<PathBuf> {
        let p = out.join(name);
        crate::files::atomic_write(&p, bytes)?;
        files.push(p.clone());
        Ok(p)
    };
    let mut md = String::from("# Sweep report\n\n");
    for t in &tables {
        write(
            &format!("table-{}.csv", split_tag(t.split)),
            t.to_csv().as_bytes(),
        )?;
        md.push_str(&t.to_markdown());
        md.push('\n');
    }
    write("table.md", md.as_bytes())?;
    let mut plots: Vec<html::Plot> = Vec::new();
    for t in &tables {
        for (method, rows) in plot::schedule_groups(t) {
            let png = plot::schedule_bars(t, &method, &rows)?;
            let name = format!(
                "schedules-{}-{}.png",
                method_tag(&method),
                split_tag(t.split)
            );
            write(&name, &png)?;
            plots.push(html::Plot {
                title: format!("Schedules of {method}, {}", t.title()),
                file: name,
                png,
            });
        }
        if !t.rows.is_empty() {
            let png = plot::method_bubbles(t)?;
            let name = format!("methods-{}.png", split_tag(t.split));
            write(&name, &png)?;
            plots.push(html::Plot {
                title: format!("Methods, {}", t.title()),
                file: name,
                png,
            });
        }
    }
    let paired = compare::compute(&entries, &records, &comparisons, opts.resamples, opts.seed);
    if !paired.is_empty() {
        write("paired.csv", compare::paired_csv(&paired).as_bytes())?;
        write(
            "paired-subjects.csv",
            compare::subjects_csv(&paired).as_bytes(),
        )?;
    }
    let columns = qualitative::columns(&entries);
    let mut subjects: Vec<String> = entries
        .iter()
        .filter(|e| e.summary.test.is_some())
        .map(|e| e.subject.clone())
        .collect();
    subjects.sort();
    subjects.dedup();
    let no_records = Vec::new();
    let choices = qualitative::choose_rows(
        &subjects,
        &columns,
        |subject, c| {
            entries
                .iter()
                .filter(|e| e.subject == subject && e.method == c.0 && e.schedule == c.1)
                .flat_map(|e| records.get(&e.eval_dir).unwrap_or(&no_records))
                .collect()
        },
        opts.grid_rows,
    );
    let mut qualitative_plot = None;
    if !choices.is_empty() {
        let rows = qualitative::load(&entries, &records, &columns, &choices, opts.data.as_deref())?;
        let png = qualitative::png(&qualitative::compose(&columns, &rows, opts.grid_cell)?)?;
        write("qualitative.png", &png)?;
        qualitative_plot = Some(html::Plot {
            title: format!(
                "Qualitative comparison: {} held-out test image(s), each method's image from the same \
                 caption and seed",
                choices.len()
            ),
            file: "qualitative.png".into(),
            png,
        });
    }
    let loss_series = losses::gather(&entries)?;
    let mut loss_plot = None;
    if !loss_series.is_empty() {
        let png = plot::loss_curves(&loss_series)?;
        write("losses.png", &png)?;
        loss_plot = Some(html::Plot {
            title: "Held-out and training-reference loss over training steps".into(),
            file: "losses.png".into(),
            png,
        });
    }
    let sample_sets = samples(&entries, &records, opts.grid_images)?;
    let page = html::page(&html::PageParts {
        sweep,
        entries: &entries,
        tables: &tables,
        plots: &plots,
        samples: &sample_sets,
        thumb: opts.thumb,
        paired: &paired,
        resamples: opts.resamples,
        seed: opts.seed,
        qualitative: qualitative_plot.as_ref(),
        losses: loss_plot.as_ref(),
    })?;
    write("report.html", page.as_bytes())?;
    let json = ReportJson {
        sweep: sweep.display().to_string(),
        runs: entries
            .iter()
            .map(|e| RunRef {
                subject: e.subject.clone(),
                method: e.method.clone(),
                schedule: e.schedule.clone(),
                eval_dir: e.eval_dir.display().to_string(),
            })
            .collect(),
        skipped: skipped.clone(),
        tables: tables.clone(),
        paired: paired.clone(),
        bootstrap: BootstrapJson {
            method: "percentile, two-level cluster (subjects, then images within each subject)",
            level: 0.95,
            resamples: opts.resamples,
            seed: opts.seed,
        },
        qualitative_rows: choices.iter().map(|c| c.key.clone()).collect(),
        loss_runs: loss_series
            .iter()
            .map(|l| l.run_dir.display().to_string())
            .collect(),
    };
    write(
        "report.json",
        format!("{}\n", serde_json::to_string_pretty(&json)?).as_bytes(),
    )?;
    Ok(Written {
        tables,
        files,
        skipped,
        entries: entries.len(),
        paired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::protocol::Shard;
    use crate::eval::store::EvalConfig;
    use crate::eval::summary::summarize;

    fn metrics(values: &[[f64; 3]]) -> Metrics {
        let col = |k: usize| values.iter().map(|v| v[k]).collect::<Vec<_>>();
        Metrics {
            n: values.len(),
            clip_t: Stat::of(&col(0)),
            clip_i: Stat::of(&col(1)),
            dino: Stat::of(&col(2)),
        }
    }

    /// Pooling per-part summaries equals summarising all values at once (parts of 1 image
    /// included, whose standard error is unknown).
    #[test]
    fn pooling_is_exact() {
        let mut rng = crate::rng::Rng::new(7);
        let mut all = Vec::new();
        let mut parts = Vec::new();
        for size in [5usize, 1, 3, 8] {
            let vals: Vec<[f64; 3]> = (0..size)
                .map(|_| {
                    [
                        rng.uniform_f32() as f64,
                        rng.uniform_f32() as f64 * 2.0,
                        0.5 + rng.uniform_f32() as f64,
                    ]
                })
                .collect();
            all.extend(vals.clone());
            parts.push(metrics(&vals));
        }
        let pooled = pool(&parts.iter().collect::<Vec<_>>());
        let direct = metrics(&all);
        assert_eq!(pooled.n, direct.n);
        for (a, b) in [
            (pooled.clip_t, direct.clip_t),
            (pooled.clip_i, direct.clip_i),
            (pooled.dino, direct.dino),
        ] {
            assert!((a.mean - b.mean).abs() < 1e-12, "{a:?} vs {b:?}");
            assert!(
                (a.se.unwrap() - b.se.unwrap()).abs() < 1e-12,
                "{a:?} vs {b:?}"
            );
        }
        let one = pool(&[&metrics(&[[0.1, 0.2, 0.3]])]);
        assert_eq!(one.clip_i.se, None);
        assert!((one.clip_i.mean - 0.2).abs() < 1e-15);
    }

    fn record(subject: &str, split: Split, i: usize, v: f64) -> Record {
        Record {
            key: format!("{subject}/{}/x/{i}/0", split.as_str()),
            subject: subject.into(),
            split,
            test_image: (split == Split::Test).then(|| "03.jpg".to_string()),
            caption_index: i,
            sample: 0,
            seed: i as u64,
            prompt: "a photo of {}".into(),
            clip_t_text: "a photo of dog".into(),
            clip_t: 0.2 + v,
            clip_i: 0.7 + v,
            dino: 0.5 + v,
            image: format!("images/{i}.png"),
        }
    }

    fn write_summary(dir: &Path, records: &[Record], shard: Option<Shard>) {
        let config = EvalConfig {
            format: crate::eval::store::FORMAT,
            split: Split::Both,
            samples: 1,
            clip_t_subject: crate::eval::protocol::ClipTSubject::Class,
            clip: "clip".into(),
            dino: "dino".into(),
            scores: crate::eval::store::SCORES.into(),
            images_from: "test".into(),
            data: "/nowhere".into(),
            seeds: "test".into(),
            shard,
        };
        std::fs::create_dir_all(dir).unwrap();
        crate::eval::summary::write_summary(dir, &summarize(records, &config)).unwrap();
    }

    /// Summaries are found by path layout when no run config is beside them; shard folders
    /// and unreadable summaries are left out; rows pool the subjects' images.
    #[test]
    fn discovers_and_pools_a_sweep_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("runs");
        let mut all_ti = Vec::new();
        for (k, subject) in ["cat", "dog"].iter().enumerate() {
            let recs: Vec<Record> = (0..3)
                .flat_map(|i| {
                    let v = (k * 3 + i) as f64 * 0.01;
                    [
                        record(subject, Split::Test, i, v),
                        record(subject, Split::Train, i, 2.0 * v),
                    ]
                })
                .collect();
            all_ti.extend(recs.iter().filter(|r| r.split == Split::Test).cloned());
            write_summary(&runs.join(subject).join("ti/none/eval"), &recs, None);
            let plus: Vec<Record> = (0..2)
                .map(|i| record(subject, Split::Test, i, 0.1))
                .collect();
            write_summary(&runs.join(subject).join("neti+/cosine/eval"), &plus, None);
            write_summary(
                &runs.join(subject).join("neti+/cosine/eval-shards/1-of-2"),
                &plus[..1],
                Some(Shard { index: 1, count: 2 }),
            );
        }
        std::fs::create_dir_all(runs.join("odd")).unwrap();
        std::fs::write(runs.join("odd/summary.json"), "{\"not\": 1}").unwrap();
        let (entries, skipped) = discover(tmp.path()).unwrap();
        assert_eq!(entries.len(), 4);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].path.ends_with("odd/summary.json"));
        assert_eq!(
            entries
                .iter()
                .map(|e| format!("{} {} {}", e.method, e.schedule, e.subject))
                .collect::<Vec<_>>(),
            [
                "ti - cat",
                "ti - dog",
                "neti+ cosine cat",
                "neti+ cosine dog"
            ]
        );
        let tables = tables(&entries);
        assert_eq!(tables.len(), 2);
        let test = &tables[0];
        assert_eq!(test.split, Split::Test);
        assert_eq!(test.rows.len(), 2);
        assert_eq!(test.rows[0].subjects, ["cat", "dog"]);
        let direct = Metrics::of(&all_ti.iter().collect::<Vec<_>>());
        assert_eq!(test.rows[0].metrics.n, 6);
        assert!((test.rows[0].metrics.dino.mean - direct.dino.mean).abs() < 1e-12);
        assert!((test.rows[0].metrics.dino.se.unwrap() - direct.dino.se.unwrap()).abs() < 1e-12);
        assert_eq!(test.rows[1].metrics.n, 4);
        // Only ti has classic results.
        assert_eq!(tables[1].split, Split::Train);
        assert_eq!(tables[1].rows.len(), 1);
        let csv = test.to_csv();
        assert!(
            csv.lines().nth(1).unwrap().starts_with("ti,-,2,6,"),
            "{csv}"
        );
        assert!(discover(&tmp.path().join("missing")).is_err());
    }

    /// Every method is found by path layout (the baselines train once per subject: no
    /// schedule; dreambooth-lora+ keeps its schedule) and gets its row, in the paper's order.
    #[test]
    fn every_method_gets_a_row_in_table_order() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = tmp.path().join("runs/dog");
        for (k, m) in Method::ALL.iter().rev().enumerate() {
            let folder = if m.uses_attractor() { "cosine" } else { "none" };
            let recs: Vec<Record> = (0..2)
                .map(|i| record("dog", Split::Test, i, k as f64 * 0.01))
                .collect();
            write_summary(&runs.join(m.name()).join(folder).join("eval"), &recs, None);
        }
        let (entries, skipped) = discover(tmp.path()).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let tables = tables(&entries);
        assert_eq!(tables.len(), 1);
        let rows: Vec<(String, String)> = tables[0]
            .rows
            .iter()
            .map(|r| (r.method.clone(), r.schedule.clone()))
            .collect();
        let want: Vec<(String, String)> = Method::ALL
            .iter()
            .map(|m| {
                let s = if m.uses_attractor() {
                    "cosine"
                } else {
                    NO_SCHEDULE
                };
                (m.name().to_string(), s.to_string())
            })
            .collect();
        assert_eq!(rows, want);
        let md = tables[0].to_markdown();
        assert!(md.contains("| dreambooth-lora+ | cosine | 1 | 2 |"), "{md}");
        assert!(md.contains("| custom-diffusion | - | 1 | 2 |"), "{md}");
    }

    #[test]
    fn orders_and_tags() {
        let mut m = vec!["neti+", "ti", "zzz", "neti"];
        m.sort_by_key(|x| method_rank(x));
        assert_eq!(m, ["ti", "neti", "neti+", "zzz"]);
        // All eight methods: the paper's table order, base methods first.
        let mut m = vec![
            "dreambooth-lora+",
            "neti+",
            "custom-diffusion",
            "zzz",
            "ti+",
            "dreambooth",
            "neti",
            "dreambooth-lora",
            "ti",
        ];
        m.sort_by_key(|x| method_rank(x));
        assert_eq!(
            m,
            [
                "ti",
                "neti",
                "dreambooth",
                "dreambooth-lora",
                "custom-diffusion",
                "ti+",
                "neti+",
                "dreambooth-lora+",
                "zzz"
            ]
        );
        for method in Method::ALL {
            assert_eq!(known_method(method.name()), Some(method));
            assert!(method_rank(method.name()).0 < Method::ALL.len());
        }
        assert_eq!(known_method("dreambooth-lora-plus"), None);
        assert_eq!(method_tag("dreambooth-lora+"), "dreambooth-loraplus");
        assert_eq!(method_tag("custom-diffusion"), "custom-diffusion");
        assert_eq!(method_tag("ti+"), "tiplus");
        let mut s = vec!["cosine", "zero", NO_SCHEDULE, "sigmoid"];
        s.sort_by_key(|x| schedule_rank(x));
        assert_eq!(s, [NO_SCHEDULE, "zero", "sigmoid", "cosine"]);
        assert_eq!(method_tag("neti+"), "netiplus");
        assert_eq!(method_tag("a/b"), "a_b");
    }
}
