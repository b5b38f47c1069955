//! Dataset validation (`attractor dataset check`) and the layout builder (`attractor dataset new`).
//!
//! [`check_dataset`] walks a split-test dataset (layout: [`crate::data::layout`]) and collects every
//! problem instead of stopping at the first: layout (subjects.json entries vs folders, train/test
//! folders, files that are not images), captions (captions.json keys = test images, 1-10 captions
//! each, exactly one `{}`, at most 77 CLIP tokens with the class word filled in, no unfilled
//! placeholders), images (each decodes, truncated JPEGs included), masks (decode, same size as their
//! image, not empty or full, no orphans), and train/test leaks.
//!
//! Leak detection: a DCT perceptual hash (pHash: 256 bits, `image_hasher` with a 16x16 mean-of-DCT
//! hash) of every test image and of its mirror image is compared with the hash of every training
//! image of the same subject; a Hamming distance at or below the threshold (default 8 of 256) is
//! a near-duplicate: the same photo, mirrored, resized or recompressed. On the bundled benchmark
//! the closest genuine train/test pair is 14 bits apart, while mirrored, resized-and-recompressed
//! copies of its photos land within 0-3 bits (measured while choosing the threshold).
//!
//! [`new_dataset`] builds the layout from one folder of photos per subject: the last N photos by
//! file name become the test split (the bundled benchmark's rule), and `captions.json` gets
//! placeholder captions that `check` reports until they are written.

use super::image::load_dynamic;
use super::layout::{file_name, is_image_file, list_images, validate_caption, Dataset};
use super::{fill, io_err, DataError, Kind, SubjectEntry};
use crate::assets::{clip_token_count, CLIP_MAX_TOKENS};
use image::imageops::FilterType;
use image_hasher::{HashAlg, Hasher, HasherConfig, ImageHash};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokenizers::Tokenizer;

/// Default leak threshold: Hamming distance (of [`HASH_BITS`]) at or below which a test image
/// counts as a copy of a training image.
pub const DEFAULT_LEAK_THRESHOLD: u32 = 8;
/// Bits of the perceptual hash (16 x 16).
pub const HASH_BITS: u32 = 256;
/// At most this many captions per test image (the benchmark's protocol uses 10).
pub const MAX_CAPTIONS: usize = 10;
/// Captions that `dataset new` writes start with this; `check` reports them as unfilled.
pub const PLACEHOLDER_MARK: &str = "TODO:";
/// A mask whose white (subject) share is below this, or above 1 minus this, is reported.
pub const MASK_MIN_SHARE: f64 = 0.005;

/// Settings of [`check_dataset`].
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Hamming distance (of 256 bits) at or below which a test image is a copy of a training
    /// image. Default [`DEFAULT_LEAK_THRESHOLD`].
    pub leak_threshold: u32,
    /// Worker threads for decoding and hashing (default: available cores).
    pub threads: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            leak_threshold: DEFAULT_LEAK_THRESHOLD,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }
}

/// What part of the dataset a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProblemKind {
    Layout,
    Caption,
    Image,
    Mask,
    Leak,
}

/// One problem: the file, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The file or folder, relative to the dataset folder.
    pub path: PathBuf,
    pub what: String,
    pub fix: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}. Fix: {}",
            self.path.display(),
            self.what,
            self.fix
        )
    }
}

/// The closest train/test pair found by the leak detection (for calibration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosestPair {
    pub test: PathBuf,
    pub train: PathBuf,
    pub distance: u32,
    pub mirrored: bool,
}

/// What [`check_dataset`] found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub dir: PathBuf,
    pub subjects: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub captions: usize,
    pub masks: usize,
    pub problems: Vec<Problem>,
    /// The closest train/test pair that is not reported as a leak.
    pub closest: Option<ClosestPair>,
    pub elapsed: Duration,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The problems of one kind.
    pub fn of_kind(&self, kind: ProblemKind) -> Vec<&Problem> {
        self.problems.iter().filter(|p| p.kind == kind).collect()
    }
}

enum Job {
    Image { path: PathBuf, mirror: bool },
    Mask { path: PathBuf },
}

#[derive(Clone)]
enum Outcome {
    Image {
        dims: (u32, u32),
        hash: ImageHash,
        mirror: Option<ImageHash>,
    },
    Mask {
        dims: (u32, u32),
        share: f64,
    },
    Failed(String),
}

fn hasher() -> Hasher {
    HasherConfig::new()
        .hash_size(16, 16)
        .hash_alg(HashAlg::Mean)
        .preproc_dct()
        .to_hasher()
}

fn run_job(job: &Job, h: &Hasher) -> Outcome {
    match job {
        Job::Image { path, mirror } => match load_dynamic(path) {
            Ok(img) => {
                let dims = (img.width(), img.height());
                // Shrink the grey image first (the hash sees luma only; triangle filter): the
                // hasher's own Lanczos resize of a full-size photo costs more than decoding it,
                // and 128 px keeps every detail a 16 x 16 DCT hash can see.
                let small =
                    image::imageops::resize(&img.to_luma8(), 128, 128, FilterType::Triangle);
                let hash = h.hash_image(&small);
                let mirror =
                    mirror.then(|| h.hash_image(&image::imageops::flip_horizontal(&small)));
                Outcome::Image { dims, hash, mirror }
            }
            Err(e) => Outcome::Failed(reason(e)),
        },
        Job::Mask { path } => match mask_stats(path) {
            Ok((dims, share)) => Outcome::Mask { dims, share },
            Err(e) => Outcome::Failed(reason(e)),
        },
    }
}

/// Why a file failed, without the generic fix (the problem list adds its own).
fn reason(e: DataError) -> String {
    match e {
        DataError::BadImage { reason, .. } => reason,
        DataError::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Decode and hash every job on `threads` workers; results in job order.
fn run_jobs(jobs: &[Job], threads: usize) -> Vec<Outcome> {
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, jobs.len().max(1));
    let mut results: Vec<Option<Outcome>> = vec![None; jobs.len()];
    let parts: Vec<Vec<(usize, Outcome)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let h = hasher();
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= jobs.len() {
                            break;
                        }
                        out.push((i, run_job(&jobs[i], &h)));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| vec![]) // a panicking decoder leaves its jobs unset
            })
            .collect()
    });
    for (i, o) in parts.into_iter().flatten() {
        results[i] = Some(o);
    }
    results
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Failed("the decoder crashed on this file".into())))
        .collect()
}

/// Per subject: job indices of its training images, of its test images, and (training image
/// index, job index) of its masks.
type SubjectJobs = (Vec<usize>, Vec<usize>, Vec<(usize, usize)>);

struct Ctx<'a> {
    dir: &'a Path,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn rel(&self, p: &Path) -> PathBuf {
        p.strip_prefix(self.dir).unwrap_or(p).to_path_buf()
    }
    fn push(
        &mut self,
        kind: ProblemKind,
        path: &Path,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let path = self.rel(path);
        self.problems.push(Problem {
            kind,
            path,
            what: what.into(),
            fix: fix.into(),
        });
    }
}

/// Validate the dataset at `dir`; every problem is collected (none = a usable dataset).
pub fn check_dataset(dir: &Path, tok: &Tokenizer, opts: &CheckOptions) -> CheckReport {
    let start = Instant::now();
    let mut cx = Ctx {
        dir,
        problems: Vec::new(),
    };
    let mut report = CheckReport {
        dir: dir.to_path_buf(),
        subjects: 0,
        train_images: 0,
        test_images: 0,
        captions: 0,
        masks: 0,
        problems: Vec::new(),
        closest: None,
        elapsed: Duration::ZERO,
    };
    let ds = match Dataset::open(dir) {
        Ok(ds) => ds,
        Err(e) => {
            cx.push(
                ProblemKind::Layout,
                dir,
                e.to_string(),
                "see data/dreambooth-split/README.md for the layout",
            );
            report.problems = cx.problems;
            report.elapsed = start.elapsed();
            return report;
        }
    };
    report.subjects = ds.subjects.len();
    if ds.subjects.is_empty() {
        cx.push(
            ProblemKind::Layout,
            &dir.join("subjects.json"),
            "lists no subjects",
            r#"add {"name": <folder>, "class": <class word>, "kind": "object" or "live"} per subject"#,
        );
    }
    check_unlisted_folders(&mut cx, &ds);
    check_prompts(&mut cx, &ds, tok);

    // Collect the subjects that load, and every decode job.
    let mut subjects = Vec::new();
    for entry in &ds.subjects {
        if entry.class.trim().is_empty() {
            cx.push(
                ProblemKind::Layout,
                &dir.join("subjects.json"),
                format!("subject `{}` has an empty class", entry.name),
                "give it its class word, e.g. \"dog\" or \"backpack\"",
            );
        }
        match ds.subject(&entry.name) {
            Ok(s) => subjects.push(s),
            Err(e) => {
                let (path, what, fix) = split_data_error(&e, &dir.join(&entry.name));
                cx.push(ProblemKind::Layout, &path, what, fix);
            }
        }
    }
    let mut jobs = Vec::new();
    let mut plan: Vec<SubjectJobs> = Vec::new();
    for s in &subjects {
        let train: Vec<usize> = s
            .train_images
            .iter()
            .map(|p| {
                jobs.push(Job::Image {
                    path: p.clone(),
                    mirror: false,
                });
                jobs.len() - 1
            })
            .collect();
        let test: Vec<usize> = s
            .test_images
            .iter()
            .map(|p| {
                jobs.push(Job::Image {
                    path: p.clone(),
                    mirror: true,
                });
                jobs.len() - 1
            })
            .collect();
        let mut masks = Vec::new();
        for (i, img) in s.train_images.iter().enumerate() {
            let m = s.mask_path(img);
            if m.is_file() {
                jobs.push(Job::Mask { path: m });
                masks.push((i, jobs.len() - 1));
            }
        }
        plan.push((train, test, masks));
    }
    let outcomes = run_jobs(&jobs, opts.threads);

    let mut closest: Option<ClosestPair> = None;
    for (s, (train, test, masks)) in subjects.iter().zip(&plan) {
        report.train_images += train.len();
        report.test_images += test.len();
        report.masks += masks.len();
        check_stray_files(&mut cx, &s.dir.join("train"));
        check_stray_files(&mut cx, &s.dir.join("test"));
        report.captions += check_captions(&mut cx, s, tok);

        for &j in train.iter().chain(test) {
            if let (Job::Image { path, .. }, Outcome::Failed(reason)) = (&jobs[j], &outcomes[j]) {
                cx.push(
                    ProblemKind::Image,
                    path,
                    format!("does not decode ({reason})"),
                    "re-export it as JPEG or PNG, or delete it",
                );
            }
        }
        check_masks(&mut cx, s, train, masks, &jobs, &outcomes);

        // Leaks: every test image (and its mirror) against every training image.
        for (ti, &tj) in test.iter().enumerate() {
            let Outcome::Image {
                hash: th,
                mirror: tm,
                ..
            } = &outcomes[tj]
            else {
                continue;
            };
            for (ri, &rj) in train.iter().enumerate() {
                let Outcome::Image { hash: rh, .. } = &outcomes[rj] else {
                    continue;
                };
                let direct = th.dist(rh);
                let mirrored = tm.as_ref().map(|m| m.dist(rh)).unwrap_or(u32::MAX);
                let (distance, is_mirror) = if mirrored < direct {
                    (mirrored, true)
                } else {
                    (direct, false)
                };
                let test_path = &s.test_images[ti];
                let train_path = &s.train_images[ri];
                if distance <= opts.leak_threshold {
                    let how = if is_mirror {
                        "a mirrored copy"
                    } else {
                        "a copy"
                    };
                    cx.push(
                        ProblemKind::Leak,
                        test_path,
                        format!(
                            "is {how} of {} (perceptual-hash distance {distance} of {HASH_BITS} bits, leak threshold {}): a train/test leak, the subject would be scored on a photo it was trained on",
                            cx.rel(train_path).display(),
                            opts.leak_threshold
                        ),
                        format!(
                            "delete {} and its entry in {}/captions.json, or move {} out of train/",
                            cx.rel(test_path).display(),
                            s.name,
                            cx.rel(train_path).display()
                        ),
                    );
                } else if closest.as_ref().is_none_or(|c| distance < c.distance) {
                    closest = Some(ClosestPair {
                        test: cx.rel(test_path),
                        train: cx.rel(train_path),
                        distance,
                        mirrored: is_mirror,
                    });
                }
            }
        }
    }
    report.closest = closest;
    report.problems = cx.problems;
    report.elapsed = start.elapsed();
    report
}

/// The path, reason and fix inside a [`DataError`], for the problem list.
fn split_data_error(e: &DataError, fallback: &Path) -> (PathBuf, String, String) {
    match e {
        DataError::Layout { path, reason, fix } => (path.clone(), reason.clone(), fix.clone()),
        DataError::Json { path, reason, fix } => {
            (path.clone(), format!("is not valid: {reason}"), fix.clone())
        }
        other => (
            fallback.to_path_buf(),
            other.to_string(),
            "see data/dreambooth-split/README.md".into(),
        ),
    }
}

/// Folders that look like subjects (have `train/`) but are not in subjects.json.
fn check_unlisted_folders(cx: &mut Ctx, ds: &Dataset) {
    let listed: BTreeSet<&str> = ds.subjects.iter().map(|s| s.name.as_str()).collect();
    let Ok(entries) = std::fs::read_dir(&ds.dir) else {
        return;
    };
    let mut unlisted: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("train").is_dir())
        .filter(|p| !listed.contains(file_name(p).as_str()))
        .collect();
    unlisted.sort();
    for p in unlisted {
        let name = file_name(&p);
        cx.push(
            ProblemKind::Layout,
            &p,
            "has a train/ folder but is not listed in subjects.json, so no command sees it",
            format!(r#"add {{"name": "{name}", "class": <class word>, "kind": "object" or "live"}} to subjects.json, or remove the folder"#),
        );
    }
}

/// The classic-protocol prompts: one `{}` each, within CLIP's 77 tokens with the longest class
/// word of that kind filled in.
fn check_prompts(cx: &mut Ctx, ds: &Dataset, tok: &Tokenizer) {
    // Without prompts.json the dataset serves training and the split-test protocol; the
    // classic protocol names the missing file when asked for.
    if matches!(ds.prompts_from, super::layout::PromptsFrom::Missing(_)) {
        return;
    }
    let path = ds.dir.join("prompts.json");
    for kind in [Kind::Object, Kind::Live] {
        let prompts = ds.prompts.for_kind(kind);
        let has_subjects = ds.subjects.iter().any(|s| s.kind == kind);
        if prompts.is_empty() && has_subjects {
            cx.push(
                ProblemKind::Caption,
                &path,
                format!("has no `{kind}` prompts but subjects of that kind exist"),
                "copy the lists of the bundled data/dreambooth-split/prompts.json",
            );
        }
        let word = ds
            .subjects
            .iter()
            .filter(|s| s.kind == kind)
            .map(|s| s.class.as_str())
            .max_by_key(|c| c.len())
            .unwrap_or("object");
        for (i, p) in prompts.iter().enumerate() {
            if let Err(e) = validate_caption(p) {
                cx.push(
                    ProblemKind::Caption,
                    &path,
                    format!("{kind} prompt {} {:?} {e}", i + 1, p),
                    "write it with exactly one {} where the subject goes",
                );
            } else if let Some(n) = too_long(tok, &fill(p, word)) {
                cx.push(
                    ProblemKind::Caption,
                    &path,
                    format!("{kind} prompt {} is {n} CLIP tokens with `{word}` filled in; CLIP reads {CLIP_MAX_TOKENS} and drops the rest", i + 1),
                    "shorten it",
                );
            }
        }
    }
}

fn too_long(tok: &Tokenizer, text: &str) -> Option<usize> {
    match clip_token_count(tok, text) {
        Ok(n) if n > CLIP_MAX_TOKENS => Some(n),
        _ => None,
    }
}

/// Files in train/ or test/ that the tools skip (HEIC from phones, RAW, text files).
fn check_stray_files(cx: &mut Ctx, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut stray: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let hidden = file_name(p).starts_with('.');
            !hidden && (p.is_dir() || !is_image_file(p))
        })
        .collect();
    stray.sort();
    for p in stray {
        cx.push(
            ProblemKind::Layout,
            &p,
            "is not an image the tools read (jpg, jpeg, png, webp, bmp, tif, tiff), so it is skipped",
            "convert it to JPEG or PNG, or move it out of the dataset",
        );
    }
}

/// captions.json against the test images; returns the number of captions seen.
fn check_captions(cx: &mut Ctx, s: &super::Subject, tok: &Tokenizer) -> usize {
    let path = s.dir.join("captions.json");
    let test_names: BTreeSet<String> = s.test_images.iter().map(|p| file_name(p)).collect();
    if s.test_images.is_empty() {
        cx.push(
            ProblemKind::Layout,
            &s.dir.join("test"),
            "has no test images, so the split-test protocol cannot score this subject",
            "move 1-2 photos (not near-duplicates of the training photos) from train/ to test/ and caption them",
        );
    }
    for key in s.captions.keys() {
        if !test_names.contains(key) {
            cx.push(
                ProblemKind::Caption,
                &path,
                format!("has captions for `{key}`, which is not in test/"),
                format!(
                    "rename the key to the test image's file name, or remove it (test images: {})",
                    join(&test_names)
                ),
            );
        }
    }
    let mut count = 0;
    for name in &test_names {
        let Some(caps) = s.captions.get(name) else {
            cx.push(
                ProblemKind::Caption,
                &path,
                format!("has no captions for test image `{name}`"),
                format!(r#"add "{name}": [up to {MAX_CAPTIONS} captions, each with one {{}} for the subject]"#),
            );
            continue;
        };
        count += caps.len();
        if caps.is_empty() || caps.len() > MAX_CAPTIONS {
            cx.push(
                ProblemKind::Caption,
                &path,
                format!(
                    "`{name}` has {} captions; 1 to {MAX_CAPTIONS} are needed",
                    caps.len()
                ),
                format!("write between 1 and {MAX_CAPTIONS} captions for it"),
            );
        }
        for (i, c) in caps.iter().enumerate() {
            let at = format!("`{name}` caption {}", i + 1);
            if c.contains(PLACEHOLDER_MARK) {
                cx.push(
                    ProblemKind::Caption,
                    &path,
                    format!("{at} is an unfilled placeholder ({c:?})"),
                    "replace it with a description of the test photo's scene, with {} where the subject is and without naming the subject's class, colour or brand",
                );
            } else if let Err(e) = validate_caption(c) {
                cx.push(
                    ProblemKind::Caption,
                    &path,
                    format!("{at} {c:?} {e}"),
                    "write it with exactly one {} where the subject goes",
                );
            } else if let Some(n) = too_long(tok, &fill(c, &s.class)) {
                cx.push(
                    ProblemKind::Caption,
                    &path,
                    format!("{at} is {n} CLIP tokens with `{}` filled in; CLIP reads {CLIP_MAX_TOKENS} and drops the rest", s.class),
                    "shorten it (the bundled captions stay under 40 words)",
                );
            }
        }
    }
    count
}

/// A mask's decoded size (orientation applied) and the share of its pixels that are white
/// (>= 128, the subject).
fn mask_stats(path: &Path) -> Result<((u32, u32), f64), DataError> {
    let g = load_dynamic(path)?.to_luma8();
    let white = g.as_raw().iter().filter(|&&v| v >= 128).count();
    Ok((
        g.dimensions(),
        white as f64 / g.as_raw().len().max(1) as f64,
    ))
}

/// What is wrong with a decoded mask of `dims` whose white share is `share`, for a training
/// image of `image_dims` (`None`: not decoded) shown as `image`: `(what, fix)`, or `None` when
/// it is usable. The one rule that `dataset check` and `train` apply.
fn mask_problem(
    s: &super::Subject,
    image: &Path,
    dims: (u32, u32),
    share: f64,
    image_dims: Option<(u32, u32)>,
) -> Option<(String, String)> {
    let rerun = s.remake_mask_fix();
    if let Some(idims) = image_dims.filter(|&d| d != dims) {
        return Some((
            format!(
                "is {}x{}, its image {} is {}x{}",
                dims.0,
                dims.1,
                image.display(),
                idims.0,
                idims.1
            ),
            rerun,
        ));
    }
    if (MASK_MIN_SHARE..=1.0 - MASK_MIN_SHARE).contains(&share) {
        return None;
    }
    let what = if share < MASK_MIN_SHARE {
        "is (almost) all black: no subject pixels, the subject loss would see nothing"
    } else {
        "is (almost) all white: no background pixels, the attractor would learn nothing"
    };
    Some((
        format!("{what} ({:.1} % white)", share * 100.0),
        format!("{rerun}, or paint it by hand (white = subject)"),
    ))
}

/// The masks of `subject`'s training images that exist, checked as `dataset check` checks
/// them (decodes, the image's size, neither all black nor all white): every problem, each as
/// `dataset check` prints it (paths relative to `dataset_dir`), in one error.
pub fn check_training_masks(subject: &super::Subject, dataset_dir: &Path) -> Result<(), DataError> {
    let mut cx = Ctx {
        dir: dataset_dir,
        problems: Vec::new(),
    };
    for img in &subject.train_images {
        let path = subject.mask_path(img);
        if !path.is_file() {
            continue;
        }
        match mask_stats(&path) {
            Err(e) => cx.push(
                ProblemKind::Mask,
                &path,
                format!("does not decode ({})", reason(e)),
                subject.remake_mask_fix(),
            ),
            Ok((dims, share)) => {
                let decoded = load_dynamic(img)?;
                let idims = (decoded.width(), decoded.height());
                let shown = cx.rel(img);
                if let Some((what, fix)) = mask_problem(subject, &shown, dims, share, Some(idims)) {
                    cx.push(ProblemKind::Mask, &path, what, fix);
                }
            }
        }
    }
    match cx.problems.as_slice() {
        [] => Ok(()),
        // Displayed exactly as the problem line of `dataset check`.
        [one] => Err(DataError::Layout {
            path: one.path.clone(),
            reason: one.what.clone(),
            fix: one.fix.clone(),
        }),
        many => Err(DataError::Problems {
            lines: many.iter().map(|p| p.to_string()).collect(),
        }),
    }
}

fn check_masks(
    cx: &mut Ctx,
    s: &super::Subject,
    train: &[usize],
    masks: &[(usize, usize)],
    jobs: &[Job],
    outcomes: &[Outcome],
) {
    for &(ti, mj) in masks {
        let Job::Mask { path } = &jobs[mj] else {
            continue;
        };
        match (&outcomes[mj], &outcomes[train[ti]]) {
            (Outcome::Failed(reason), _) => cx.push(
                ProblemKind::Mask,
                path,
                format!("does not decode ({reason})"),
                s.remake_mask_fix(),
            ),
            (Outcome::Mask { dims, share }, img) => {
                let idims = match img {
                    Outcome::Image { dims, .. } => Some(*dims),
                    _ => None,
                };
                let shown = cx.rel(&s.train_images[ti]);
                if let Some((what, fix)) = mask_problem(s, &shown, *dims, *share, idims) {
                    cx.push(ProblemKind::Mask, path, what, fix);
                }
            }
            _ => {}
        }
    }
    // Masks without a training image (left over after renaming or moving photos).
    let stems: BTreeSet<String> = s
        .train_images
        .iter()
        .filter_map(|p| p.file_stem().map(|x| x.to_string_lossy().into_owned()))
        .collect();
    if let Ok(entries) = std::fs::read_dir(s.masks_dir()) {
        let mut orphans: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "png"))
            .filter(|p| {
                p.file_stem()
                    .is_some_and(|st| !stems.contains(&*st.to_string_lossy()))
            })
            .collect();
        orphans.sort();
        for p in orphans {
            cx.push(
                ProblemKind::Mask,
                &p,
                "belongs to no training image (masks are named after their image: masks/<stem>.png)",
                "delete it, or rename it after its image in train/",
            );
        }
    }
}

fn join(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// One subject written by [`new_dataset`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSubject {
    pub name: String,
    pub train: Vec<String>,
    pub test: Vec<String>,
}

/// What [`new_dataset`] wrote.
#[derive(Debug, Clone)]
pub struct NewReport {
    pub out: PathBuf,
    pub subjects: Vec<NewSubject>,
    /// Files in the source folders that are not images and were not copied.
    pub skipped: Vec<PathBuf>,
}

/// The placeholder captions `dataset new` writes for a test image (reported by `check` until
/// replaced).
pub fn placeholder_captions(test_file: &str) -> Vec<String> {
    (1..=MAX_CAPTIONS)
        .map(|i| {
            format!("{PLACEHOLDER_MARK} caption {i} of {MAX_CAPTIONS} for {test_file}: describe its scene with {{}} where the subject is")
        })
        .collect()
}

/// Build a split-test dataset at `out` from `src`, which holds one folder of photos per subject
/// (folder name = subject name = initial class word). Per subject, the last `n_test` photos by
/// file name go to `test/`, the rest to `train/`; files are copied byte for byte. Writes
/// `subjects.json` (kind `object`: edit it), the bundled `prompts.json`, and `captions.json` with
/// placeholder captions. `out` must not exist or be empty.
pub fn new_dataset(src: &Path, out: &Path, n_test: usize) -> Result<NewReport, DataError> {
    if !src.is_dir() {
        return Err(DataError::Layout {
            path: src.to_path_buf(),
            reason: "not a folder".into(),
            fix: "pass a folder that holds one sub-folder of photos per subject".into(),
        });
    }
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(io_err(out))?
                .next()
                .is_none();
        if !empty {
            return Err(DataError::Layout {
                path: out.to_path_buf(),
                reason: "already exists and is not empty".into(),
                fix: "choose a new output folder (nothing is overwritten)".into(),
            });
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(src)
        .map_err(io_err(src))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !file_name(p).starts_with('.'))
        .collect();
    dirs.sort();
    let mut skipped = Vec::new();
    let mut plan = Vec::new();
    for d in &dirs {
        let images = list_images(d)?;
        for e in std::fs::read_dir(d).map_err(io_err(d))? {
            let p = e.map_err(io_err(d))?.path();
            if !is_image_file(&p) && !file_name(&p).starts_with('.') {
                skipped.push(p);
            }
        }
        if images.is_empty() {
            continue;
        }
        if images.len() <= n_test {
            return Err(DataError::Layout {
                path: d.clone(),
                reason: format!(
                    "has {} photo(s); with --test {n_test} at least {} are needed (one to train on)",
                    images.len(),
                    n_test + 1
                ),
                fix: "add photos or lower --test".into(),
            });
        }
        plan.push((file_name(d), images));
    }
    if plan.is_empty() {
        return Err(DataError::Layout {
            path: src.to_path_buf(),
            reason: "holds no sub-folder with photos (jpg, png, webp, bmp, tiff)".into(),
            fix: "put each subject's photos in its own sub-folder, named after the subject".into(),
        });
    }
    let mut subjects = Vec::new();
    let mut entries = Vec::new();
    for (name, images) in &plan {
        let split = images.len() - n_test;
        let mut captions = BTreeMap::new();
        let mut ns = NewSubject {
            name: name.clone(),
            train: Vec::new(),
            test: Vec::new(),
        };
        for (i, img) in images.iter().enumerate() {
            let fname = file_name(img);
            let (part, list) = if i < split {
                ("train", &mut ns.train)
            } else {
                captions.insert(fname.clone(), placeholder_captions(&fname));
                ("test", &mut ns.test)
            };
            let bytes = std::fs::read(img).map_err(io_err(img))?;
            let dst = out.join(name).join(part).join(&fname);
            write(&dst, &bytes)?;
            list.push(fname);
        }
        write(
            &out.join(name).join("captions.json"),
            json(&captions)?.as_bytes(),
        )?;
        entries.push(SubjectEntry {
            name: name.clone(),
            class: name.clone(),
            kind: Kind::Object,
        });
        subjects.push(ns);
    }
    write(&out.join("subjects.json"), json(&entries)?.as_bytes())?;
    write(
        &out.join("prompts.json"),
        crate::assets::DREAMBOOTH_PROMPTS_JSON.as_bytes(),
    )?;
    Ok(NewReport {
        out: out.to_path_buf(),
        subjects,
        skipped,
    })
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, DataError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| candle_core::Error::Msg(format!("cannot serialise JSON: {e}")).into())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::files::atomic_write(path, bytes).map_err(|e| DataError::Layout {
        path: path.to_path_buf(),
        reason: format!("cannot be written: {e:#}"),
        fix: "check the output folder's permissions and free space".into(),
    })
}
