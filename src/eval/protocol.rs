//! The evaluation protocols (SPEC.md §6): which images are generated, from which prompt and seed,
//! and against which text and reference images each is scored; and the engine that runs them.
//!
//! - **Split-test** (`--split test`, the paper's): for every subject, every test image, every
//!   caption of that image and every sample `0..N` (default 5), generate from the caption and score
//!   CLIP-T against the caption's text and CLIP-I/DINO against *that caption's own test image*.
//! - **Classic** (`--split train`): the DreamBooth prompt list of the subject's kind
//!   (`prompts.json`) x N samples; CLIP-I/DINO are the mean over all training images.
//! - `--split both` runs both into one results file; the summary then reports how much the
//!   classic protocol overestimates (classic minus test).
//!
//! Prompts keep their `{}`: the [`Generator`] puts its own placeholder there (`<v*>`, NeTI's
//! token, ...). The CLIP-T text puts the class word there (`--clip-t-subject class`, default),
//! nothing (`remove`, as the TI/NeTI papers) or the generator's placeholder (`keep`).
//!
//! Seeds come from `Rng::derive_seed([subject, test image file | "classic", caption index,
//! sample])`, so any shard, resumed run or other machine regenerates the same image. Job keys
//! are `<subject>/<split>/<test image file | classic>/<caption index>/<sample>`; `--shard i/n`
//! keeps the jobs whose key hashes to `i - 1` modulo `n`.
//!
//! Generated images are saved as `<out>/images/<subject>/<test image stem | classic>/<caption
//! index>/<sample>.png`, the same layout that `--images DIR` scores ([`score_image_dir`]), so an
//! output folder's `images/` can be rescored with other scorers.

use super::store::{EvalConfig, Record, Store};
use super::summary::{summarize, write_summary, Summary};
use super::{cosine, ImageFeatures, Scorers};
use crate::data::layout::{file_name, validate_caption, Dataset};
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Makes the images to evaluate. Implemented by the SD pipeline with a trained run; tests use a
/// deterministic fake.
pub trait Generator {
    /// A fingerprint of every setting that changes the images (method, run, checkpoint, base
    /// model, sampler, steps, guidance, size, ...). It is recorded in `eval-config.json`; a
    /// resumed evaluation refuses to mix images from a generator with another id.
    fn id(&self) -> String;

    /// Generate one image for `subject` from `prompt` with `seed`. `prompt` contains exactly
    /// one `{}`: the generator replaces it with its own placeholder for the subject (e.g.
    /// `<v*>`). The same (subject, prompt, seed) must give the same image.
    fn generate(&mut self, subject: &str, prompt: &str, seed: u64) -> Result<RgbImage>;

    /// One image per `(prompt, seed)` of `requests`, all for `subject`, in order; each must
    /// equal [`Self::generate`] of its own request (a batch only shares the work). The default
    /// generates them one at a time.
    fn generate_batch(&mut self, subject: &str, requests: &[(&str, u64)]) -> Result<Vec<RgbImage>> {
        requests
            .iter()
            .map(|(prompt, seed)| self.generate(subject, prompt, *seed))
            .collect()
    }

    /// How many images [`run_protocol`] asks for per [`Self::generate_batch`] call. Not part
    /// of [`Self::id`]: the images do not depend on it, so a run may resume with another.
    fn batch_size(&self) -> usize {
        1
    }

    /// The placeholder text the generator puts for `{}` (used for `--clip-t-subject keep`);
    /// `None` when it has no textual placeholder.
    fn placeholder(&self, _subject: &str) -> Option<String> {
        None
    }
}

/// Which protocol(s) to run.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Split-test: references are each caption's own held-out test image.
    Test,
    /// Classic: DreamBooth prompts, references are the training images.
    Train,
    /// Both protocols (and their difference).
    Both,
}

impl Split {
    /// The protocols this choice runs (never `Both`).
    pub fn protocols(self) -> &'static [Split] {
        match self {
            Split::Test => &[Split::Test],
            Split::Train => &[Split::Train],
            Split::Both => &[Split::Test, Split::Train],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Train => "train",
            Split::Both => "both",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the CLIP-T text puts where the caption has `{}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClipTSubject {
    /// The subject's class word ("a photo of dog on a ledge" style, default).
    Class,
    /// Nothing: the slot is deleted (as the TI and NeTI papers score).
    Remove,
    /// The generator's own placeholder text.
    Keep,
}

impl ClipTSubject {
    /// The CLIP-T text of `caption`.
    pub fn text(self, caption: &str, class: &str, placeholder: Option<&str>) -> Result<String> {
        Ok(match self {
            ClipTSubject::Class => caption.replace("{}", class),
            ClipTSubject::Remove => caption
                .replace("{}", " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
            ClipTSubject::Keep => match placeholder {
                Some(p) => caption.replace("{}", p),
                None => bail!(
                    "--clip-t-subject keep needs the generator's placeholder text, and this \
                     image source has none (e.g. --images); use --clip-t-subject class or remove"
                ),
            },
        })
    }
}

/// One of `n` disjoint parts of the jobs (`i/n`, `i` in `1..=n`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether the job with `key` belongs to this shard (a stable hash of the key).
    pub fn contains(&self, key: &str) -> bool {
        (Rng::derive_seed(&["shard", key]) % self.count as u64) as usize == self.index - 1
    }
}

impl FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--shard {s}: expected i/n with 1 <= i <= n, e.g. 2/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Serialize for Shard {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Shard {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of one evaluation (everything but the generator, the scorers and the output folder).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Which protocol(s): `test` (default), `train` (classic) or `both`.
    pub split: Split,
    /// Images per (test image, caption) or per classic prompt (default 5, the paper's).
    pub samples: usize,
    /// CLIP-T text: class word (default), removed, or the generator's placeholder.
    pub clip_t_subject: ClipTSubject,
    /// Run only this part of the jobs (default: all).
    pub shard: Option<Shard>,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            split: Split::Test,
            samples: 5,
            clip_t_subject: ClipTSubject::Class,
            shard: None,
        }
    }
}

/// One image to generate (or find) and score.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub subject: String,
    /// `Test` or `Train` (classic).
    pub split: Split,
    /// The test image's file name (split-test), `None` for classic.
    pub test_image: Option<String>,
    /// The caption's index among its test image's captions, or the classic prompt's index.
    pub caption_index: usize,
    pub sample: usize,
    pub seed: u64,
    /// The caption or prompt with its `{}`.
    pub prompt: String,
    /// What CLIP-T compares the image with.
    pub clip_t_text: String,
    /// The images CLIP-I and DINO compare with (mean over them).
    pub references: Vec<PathBuf>,
}

impl Job {
    fn image_part(&self) -> &str {
        self.test_image.as_deref().unwrap_or("classic")
    }

    /// The stable key of this job (resume, shards, merge).
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.subject,
            self.split,
            self.image_part(),
            self.caption_index,
            self.sample
        )
    }

    /// `<subject>/<test image stem | classic>/<caption index>/<sample>.png`.
    pub fn image_rel_path(&self) -> PathBuf {
        let folder = match &self.test_image {
            Some(name) => stem(name),
            None => "classic".to_string(),
        };
        PathBuf::from(&self.subject)
            .join(folder)
            .join(self.caption_index.to_string())
            .join(format!("{}.png", self.sample))
    }
}

fn stem(name: &str) -> String {
    Path::new(name)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string())
}

/// The seed of one image: a stable hash of (subject, test image file or "classic", caption
/// index, sample index).
pub fn job_seed(
    subject: &str,
    test_image: Option<&str>,
    caption_index: usize,
    sample: usize,
) -> u64 {
    Rng::derive_seed(&[
        subject,
        test_image.unwrap_or("classic"),
        &caption_index.to_string(),
        &sample.to_string(),
    ])
}

/// Every job of `settings` over `subjects` (shards not applied), after checking the whole
/// input: all problems are reported at once, before anything is generated.
pub fn build_jobs(
    settings: &EvalSettings,
    dataset: &Dataset,
    subjects: &[String],
    placeholder: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Job>> {
    if settings.samples == 0 {
        bail!("--samples 0: at least one sample per caption is needed");
    }
    if subjects.is_empty() {
        bail!("no subjects to evaluate: pass --subject NAME or use a dataset with subjects");
    }
    let mut problems: Vec<String> = Vec::new();
    let mut jobs = Vec::new();
    let mut seen_subjects = BTreeSet::new();
    for name in subjects {
        if !seen_subjects.insert(name.as_str()) {
            continue;
        }
        let subject = match dataset.subject(name) {
            Ok(s) => s,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let captions_file = subject.dir.join("captions.json");
        let ph = placeholder(&subject.name);
        if settings.clip_t_subject == ClipTSubject::Keep && ph.is_none() {
            problems.push(format!(
                "--clip-t-subject keep needs the generator's placeholder text for `{}`, and this \
                 image source has none (e.g. --images); use --clip-t-subject class or remove",
                subject.name
            ));
            continue;
        }
        let clip_t = |caption: &str| {
            settings
                .clip_t_subject
                .text(caption, &subject.class, ph.as_deref())
        };
        for &split in settings.split.protocols() {
            match split {
                Split::Test => {
                    if subject.test_images.is_empty() {
                        problems.push(format!(
                            "subject `{}` has no test images in {}: the split-test protocol needs \
                             them; add held-out photos there with captions, or use --split train",
                            subject.name,
                            subject.dir.join("test").display()
                        ));
                    }
                    let on_disk: BTreeSet<String> =
                        subject.test_images.iter().map(|p| file_name(p)).collect();
                    for listed in subject.captions.keys() {
                        if !on_disk.contains(listed) {
                            problems.push(format!(
                                "{} lists captions for `{listed}`, but the reference image {} \
                                 does not exist; restore the image or remove its entry",
                                captions_file.display(),
                                subject.dir.join("test").join(listed).display()
                            ));
                        }
                    }
                    let mut stems = HashMap::new();
                    for img in &subject.test_images {
                        let fname = file_name(img);
                        let st = stem(&fname);
                        if st == "classic" {
                            problems.push(format!(
                                "{}: a test image may not be named `classic` (that name is \
                                 reserved for the classic protocol's images); rename it",
                                img.display()
                            ));
                        }
                        if let Some(other) = stems.insert(st.clone(), fname.clone()) {
                            problems.push(format!(
                                "{}: test images `{other}` and `{fname}` share the stem `{st}`, \
                                 so their generated images would collide; rename one",
                                subject.dir.join("test").display()
                            ));
                        }
                        let caps = match subject.captions.get(&fname) {
                            Some(c) if !c.is_empty() => c,
                            _ => {
                                problems.push(format!(
                                    "test image {} has no captions in {}; add \"{fname}\": [10 \
                                     captions with {{}}] or move the image out of test/",
                                    img.display(),
                                    captions_file.display()
                                ));
                                continue;
                            }
                        };
                        for (ci, caption) in caps.iter().enumerate() {
                            if let Err(e) = validate_caption(caption) {
                                problems.push(format!(
                                    "{}: caption {ci} of `{fname}` ({caption:?}) {e}; write it \
                                     with exactly one {{}} where the subject goes",
                                    captions_file.display()
                                ));
                                continue;
                            }
                            let text = clip_t(caption)?;
                            for sample in 0..settings.samples {
                                jobs.push(Job {
                                    subject: subject.name.clone(),
                                    split: Split::Test,
                                    test_image: Some(fname.clone()),
                                    caption_index: ci,
                                    sample,
                                    seed: job_seed(&subject.name, Some(&fname), ci, sample),
                                    prompt: caption.clone(),
                                    clip_t_text: text.clone(),
                                    references: vec![img.clone()],
                                });
                            }
                        }
                    }
                }
                // `protocols()` never yields `Both`.
                Split::Train | Split::Both => {
                    let prompts = match dataset.prompts_for(subject.kind) {
                        Ok(p) => p,
                        Err(e) => {
                            problems.push(e.to_string());
                            continue;
                        }
                    };
                    if prompts.is_empty() {
                        problems.push(format!(
                            "{}: no `{}` prompts for the classic protocol",
                            dataset.dir.join("prompts.json").display(),
                            subject.kind
                        ));
                    }
                    for (pi, prompt) in prompts.iter().enumerate() {
                        if let Err(e) = validate_caption(prompt) {
                            problems.push(format!(
                                "{}: `{}` prompt {pi} ({prompt:?}) {e}; write it with exactly \
                                 one {{}} where the subject goes",
                                dataset.dir.join("prompts.json").display(),
                                subject.kind
                            ));
                            continue;
                        }
                        let text = clip_t(prompt)?;
                        for sample in 0..settings.samples {
                            jobs.push(Job {
                                subject: subject.name.clone(),
                                split: Split::Train,
                                test_image: None,
                                caption_index: pi,
                                sample,
                                seed: job_seed(&subject.name, None, pi, sample),
                                prompt: prompt.clone(),
                                clip_t_text: text.clone(),
                                references: subject.train_images.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    // A prompt list (classic) is shared by subjects of a kind: report each problem once.
    let mut unique = BTreeSet::new();
    problems.retain(|p| unique.insert(p.clone()));
    if !problems.is_empty() {
        bail!(
            "the evaluation input has {} problem(s); nothing was generated:\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    Ok(jobs)
}

/// Progress of a running evaluation, for the caller's display.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// Jobs of this shard done so far (including those found done on resume).
    pub done: usize,
    /// Jobs of this shard in all.
    pub total: usize,
    /// The record just written (`None` for the initial report).
    pub record: Option<&'a Record>,
}

/// Features of reference images, computed once per image.
struct References {
    features: HashMap<PathBuf, ImageFeatures>,
}

impl References {
    fn new() -> Self {
        Self {
            features: HashMap::new(),
        }
    }

    /// Compute the features of every reference of `jobs` that is not known yet. One image per
    /// forward pass, so features do not depend on which shard asked for them.
    fn prepare<'a>(
        &mut self,
        jobs: impl Iterator<Item = &'a Job>,
        scorers: &mut Scorers,
    ) -> Result<()> {
        let mut missing = Vec::new();
        let mut wanted = BTreeSet::new();
        for job in jobs {
            for r in &job.references {
                wanted.insert(r.clone());
            }
        }
        for path in wanted {
            if self.features.contains_key(&path) {
                continue;
            }
            if !path.is_file() {
                missing.push(path.display().to_string());
                continue;
            }
            let img = crate::data::image::load_rgb(&path)
                .with_context(|| format!("reference image {}", path.display()))?;
            let f = scorers
                .image_features(std::slice::from_ref(&img))?
                .pop()
                .context("no features returned for a reference image")?;
            self.features.insert(path, f);
        }
        if !missing.is_empty() {
            bail!(
                "reference image(s) missing: {}; restore them (or fix the dataset with \
                 `attractor dataset check`)",
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// (CLIP-I, DINO): mean cosine of `gen` with every reference of `job`.
    fn similarity(&self, job: &Job, gen: &ImageFeatures) -> Result<(f64, f64)> {
        let n = job.references.len() as f64;
        let (mut ci, mut di) = (0.0, 0.0);
        for r in &job.references {
            let f = self
                .features
                .get(r)
                .with_context(|| format!("reference {} was not prepared", r.display()))?;
            ci += cosine(&gen.clip, &f.clip);
            di += cosine(&gen.dino, &f.dino);
        }
        Ok((ci / n, di / n))
    }
}

fn score_job(
    job: &Job,
    feats: &ImageFeatures,
    refs: &References,
    scorers: &mut Scorers,
    image: String,
) -> Result<Record> {
    let text = scorers.text_features(&job.clip_t_text)?;
    let (clip_i, dino) = refs.similarity(job, feats)?;
    Ok(Record {
        key: job.key(),
        subject: job.subject.clone(),
        split: job.split,
        test_image: job.test_image.clone(),
        caption_index: job.caption_index,
        sample: job.sample,
        seed: job.seed,
        prompt: job.prompt.clone(),
        clip_t_text: job.clip_t_text.clone(),
        clip_t: cosine(&text, &feats.clip),
        clip_i,
        dino,
        image,
    })
}

fn data_id(dataset: &Dataset) -> String {
    dataset.id()
}

/// Run `settings` over `subjects` with `generator`: generate every pending job of the shard,
/// save its image, score it and append its line to `<out>/results.jsonl`; then write
/// `summary.json` and `summary.csv`. A rerun with the same settings resumes: jobs already in
/// `results.jsonl` are skipped.
pub fn run_protocol(
    settings: &EvalSettings,
    dataset: &Dataset,
    subjects: &[String],
    generator: &mut dyn Generator,
    scorers: &mut Scorers,
    out: &Path,
) -> Result<Summary> {
    run_protocol_with_progress(
        settings,
        dataset,
        subjects,
        generator,
        scorers,
        out,
        &mut |_| {},
    )
}

/// [`run_protocol`], reporting progress after each image.
pub fn run_protocol_with_progress(
    settings: &EvalSettings,
    dataset: &Dataset,
    subjects: &[String],
    generator: &mut dyn Generator,
    scorers: &mut Scorers,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Summary> {
    let jobs = build_jobs(settings, dataset, subjects, &|s| generator.placeholder(s))?;
    let config = EvalConfig::new(settings, scorers, &generator.id(), &data_id(dataset));
    let mut store = Store::open(out, &config)?;
    let mine: Vec<&Job> = jobs
        .iter()
        .filter(|j| settings.shard.is_none_or(|s| s.contains(&j.key())))
        .collect();
    let pending: Vec<&Job> = mine
        .iter()
        .copied()
        .filter(|j| !store.contains(&j.key()))
        .collect();
    let mut refs = References::new();
    refs.prepare(pending.iter().copied(), scorers)?;
    let total = mine.len();
    let already = total - pending.len();
    progress(Progress {
        done: already,
        total,
        record: None,
    });
    let batch = generator.batch_size().max(1);
    let mut done = already;
    for group in batches(&pending, batch) {
        let requests: Vec<(&str, u64)> =
            group.iter().map(|j| (j.prompt.as_str(), j.seed)).collect();
        let first = group[0];
        let images = generator
            .generate_batch(&first.subject, &requests)
            .with_context(|| {
                let what = if group.len() == 1 {
                    format!("{} (seed {})", first.key(), first.seed)
                } else {
                    format!("a batch of {} images from {}", group.len(), first.key())
                };
                format!(
                    "generating {what} failed; the {done} images done so far are saved in {}: \
                     rerun the same command to resume",
                    out.display()
                )
            })?;
        if images.len() != group.len() {
            bail!(
                "the generator returned {} images for a batch of {}",
                images.len(),
                group.len()
            );
        }
        // Each image counts once its line is in results.jsonl: a kill mid-batch loses only the
        // images not yet appended, and a resumed run regenerates exactly those.
        for (job, img) in group.iter().zip(images) {
            let rel = Path::new("images").join(job.image_rel_path());
            crate::files::save_png(&img, &out.join(&rel))?;
            let feats = scorers
                .image_features(std::slice::from_ref(&img))?
                .pop()
                .context("no features returned for a generated image")?;
            let record = score_job(job, &feats, &refs, scorers, path_string(&rel))?;
            store.append(&record)?;
            done += 1;
            progress(Progress {
                done,
                total,
                record: Some(&record),
            });
        }
    }
    let summary = summarize(store.records(), &config);
    write_summary(out, &summary)?;
    Ok(summary)
}

/// `jobs` in order, cut into runs of at most `size` consecutive jobs of one subject (a batch
/// shares one learned subject's model).
fn batches<'a, 'j>(jobs: &'a [&'j Job], size: usize) -> Vec<&'a [&'j Job]> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=jobs.len() {
        if i == jobs.len() || i - start == size || jobs[i].subject != jobs[start].subject {
            if i > start {
                out.push(&jobs[start..i]);
            }
            start = i;
        }
    }
    out
}

fn path_string(p: &Path) -> String {
    // Forward slashes on every platform, so results files compare across machines.
    p.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// What scoring a folder of images found.
#[derive(Debug)]
pub struct ImageDirOutcome {
    pub summary: Summary,
    /// Expected images that were not there.
    pub missing: Vec<PathBuf>,
    /// Images that did not decode, with the reason.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Score images generated elsewhere, laid out as
/// `DIR/<subject>/<test image stem>/<caption index>/<sample>.png` (split-test) and
/// `DIR/<subject>/classic/<prompt index>/<sample>.png` (classic), with `<sample>` in
/// `0..settings.samples`. Results and summary go to `out` as with [`run_protocol`] (resumable,
/// shardable); records point at the files in `DIR`. Missing or unreadable images are skipped
/// and returned, so the caller can report them and fail.
pub fn score_image_dir(
    settings: &EvalSettings,
    dataset: &Dataset,
    subjects: &[String],
    images_dir: &Path,
    scorers: &mut Scorers,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageDirOutcome> {
    if !images_dir.is_dir() {
        bail!(
            "--images {}: not a folder; it must hold <subject>/<test image stem>/<caption \
             index>/<sample>.png",
            images_dir.display()
        );
    }
    let jobs = build_jobs(settings, dataset, subjects, &|_| None)?;
    let dir_abs = std::fs::canonicalize(images_dir).unwrap_or_else(|_| images_dir.to_path_buf());
    let config = EvalConfig::new(
        settings,
        scorers,
        &format!("images:{}", dir_abs.display()),
        &data_id(dataset),
    );
    let mut store = Store::open(out, &config)?;
    let mine: Vec<&Job> = jobs
        .iter()
        .filter(|j| settings.shard.is_none_or(|s| s.contains(&j.key())))
        .collect();
    let pending: Vec<&Job> = mine
        .iter()
        .copied()
        .filter(|j| !store.contains(&j.key()))
        .collect();
    let mut missing = Vec::new();
    let mut unreadable = Vec::new();
    let present: Vec<&Job> = pending
        .into_iter()
        .filter(|j| {
            let p = dir_abs.join(j.image_rel_path());
            let ok = p.is_file();
            if !ok {
                missing.push(p);
            }
            ok
        })
        .collect();
    let mut refs = References::new();
    refs.prepare(present.iter().copied(), scorers)?;
    let total = mine.len();
    let mut done = total - present.len() - missing.len();
    progress(Progress {
        done,
        total,
        record: None,
    });
    for job in present {
        let path = dir_abs.join(job.image_rel_path());
        let img = match crate::data::image::load_rgb(&path) {
            Ok(i) => i,
            Err(e) => {
                unreadable.push((path, e.to_string()));
                continue;
            }
        };
        let feats = scorers
            .image_features(std::slice::from_ref(&img))?
            .pop()
            .context("no features returned for an image")?;
        let record = score_job(job, &feats, &refs, scorers, path_string(&path))?;
        store.append(&record)?;
        done += 1;
        progress(Progress {
            done,
            total,
            record: Some(&record),
        });
    }
    let summary = summarize(store.records(), &config);
    write_summary(out, &summary)?;
    Ok(ImageDirOutcome {
        summary,
        missing,
        unreadable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parse_and_partition() {
        assert_eq!(
            "2/4".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 4 }
        );
        for bad in ["0/4", "5/4", "1/0", "a/b", "3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (1..=3).map(|i| Shard { index: i, count: 3 }).collect();
        let mut sizes = [0usize; 3];
        for k in 0..300 {
            let key = format!("dog/test/03.jpg/{}/{}", k / 5, k % 5);
            let owners: Vec<usize> = (0..3).filter(|&i| shards[i].contains(&key)).collect();
            assert_eq!(owners.len(), 1, "{key} must be in exactly one shard");
            sizes[owners[0]] += 1;
        }
        assert!(sizes.iter().all(|&s| s > 60), "unbalanced shards {sizes:?}");
    }

    #[test]
    fn clip_t_text_variants() {
        let c = "a photo of {} on a ledge";
        assert_eq!(
            ClipTSubject::Class.text(c, "dog", None).unwrap(),
            "a photo of dog on a ledge"
        );
        assert_eq!(
            ClipTSubject::Remove.text(c, "dog", None).unwrap(),
            "a photo of on a ledge"
        );
        assert_eq!(
            ClipTSubject::Keep.text(c, "dog", Some("<v*>")).unwrap(),
            "a photo of <v*> on a ledge"
        );
        assert!(ClipTSubject::Keep.text(c, "dog", None).is_err());
    }

    #[test]
    fn seeds_depend_on_every_part() {
        let base = job_seed("dog", Some("03.jpg"), 1, 2);
        assert_eq!(base, job_seed("dog", Some("03.jpg"), 1, 2));
        for other in [
            job_seed("cat", Some("03.jpg"), 1, 2),
            job_seed("dog", Some("04.jpg"), 1, 2),
            job_seed("dog", None, 1, 2),
            job_seed("dog", Some("03.jpg"), 2, 2),
            job_seed("dog", Some("03.jpg"), 1, 3),
        ] {
            assert_ne!(base, other);
        }
    }
}
