//! `attractor eval`: score personalized generations with CLIP-T, CLIP-I and DINO under the
//! split-test protocol (default), the classic one (`--split train`) or both (SPEC.md §6).
//!
//! ```text
//! attractor eval --run RUN_DIR [--split test|train|both] [--samples 5] [--shard i/n] [--out DIR]
//! attractor eval --runs DIR ...            every run folder under DIR, each into <run>/eval
//! attractor eval --images DIR --out OUT    images generated elsewhere, laid out as
//!     DIR/<subject>/<test image stem>/<caption index>/<sample>.png   (split-test)
//!     DIR/<subject>/classic/<prompt index>/<sample>.png              (classic)
//! attractor eval merge --out ALL SHARD_DIR...
//! attractor eval --checkpoints RUN_DIR     every saved step, both protocols: step-N/ folders,
//!     checkpoints.csv and checkpoints.png (scores over training, the paper's Fig. 1); best.json
//! ```
//!
//! This file resolves flags into [`EvalSettings`] and owns the console output; the protocol,
//! store and summary live in `crate::eval`.

use super::ranges;
use super::Common;
use crate::data::layout::Dataset;
use crate::eval::checkpoints::{
    best_choices, best_table, curves_csv, curves_table, StepScores, BEST_JSON, CURVES_CSV,
    CURVES_PNG,
};
use crate::eval::protocol::{
    run_protocol_with_progress, score_image_dir, ClipTSubject, Generator, Progress, Shard, Split,
};
use crate::eval::{
    store, EvalSettings, Scorers, CLIP_REPO, CLIP_REVISION, DINO_REPO, DINO_REVISION,
};
use crate::hub::ModelSource;
use crate::personalize::generate::learned_file_names;
use crate::personalize::trainer::RunInfo;
use crate::ranges::Range;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

/// Flags of `attractor eval`.
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub action: Option<EvalAction>,
    /// Protocol: `test` (split-test, the paper's), `train` (classic DreamBooth prompts against
    /// the training images) or `both` (and print how much classic overestimates). Default:
    /// `test`; `both` with `--checkpoints`.
    #[arg(long, value_enum)]
    pub split: Option<Split>,
    /// A training run folder (what `train --out` wrote) to generate from.
    #[arg(long, conflicts_with_all = ["runs", "images", "checkpoints"])]
    pub run: Option<PathBuf>,
    /// A training run folder: evaluate every saved step (`checkpoints/step-N`, see `train
    /// --save-every`) into `--out` (default RUN_DIR/eval-checkpoints)/step-N, then write
    /// checkpoints.csv and checkpoints.png, the scores over training, and best.json, the step
    /// each protocol (and the run's held-out loss) would pick.
    #[arg(long, conflicts_with_all = ["runs", "images", "shard"])]
    pub checkpoints: Option<PathBuf>,
    /// A folder of run folders: evaluate each.
    #[arg(long, conflicts_with = "images")]
    pub runs: Option<PathBuf>,
    /// Score images generated elsewhere, laid out as
    /// DIR/<subject>/<test image stem>/<caption index>/<sample>.png and
    /// DIR/<subject>/classic/<prompt index>/<sample>.png.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Images per caption (split-test) or per prompt (classic).
    #[arg(long, default_value_t = 5, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub samples: usize,
    /// Evaluate only part i of n (1 <= i <= n) of the jobs; join the parts with `eval merge`.
    #[arg(long)]
    pub shard: Option<Shard>,
    /// CLIP scorer: a local folder or a hub repo id (`repo@revision`; openai/clip-vit-base-patch32
    /// defaults to revision refs/pr/15, which has model.safetensors). Any transformers
    /// `CLIPModel` loads, e.g. openai/clip-vit-large-patch14 (ViT-L/14, as some papers score).
    #[arg(long, default_value = CLIP_REPO)]
    pub clip: String,
    /// DINO scorer: a local folder or a hub repo id (`repo@revision`; facebook/dino-vits16
    /// defaults to revision refs/pr/1, which has model.safetensors). Also DINO ViT-S/8
    /// (facebook/dino-vits8) and DINOv2 (facebook/dinov2-small, CLS of the last hidden state),
    /// told apart by their config.json. Scores are raw cosines (eval-config.json says so).
    #[arg(long, default_value = DINO_REPO)]
    pub dino: String,
    /// What CLIP-T's text puts where a caption has `{}`: the class word, nothing, or the
    /// generator's placeholder.
    #[arg(long, value_enum, default_value_t = ClipTSubject::Class)]
    pub clip_t_subject: ClipTSubject,
    /// Sampling steps (default: the sampler's, 50).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale (default 7.5).
    #[arg(long, value_parser = ranges::float(Range::NonNegative), allow_negative_numbers = true)]
    pub guidance: Option<f64>,
    /// Sampler (default ddim).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerChoice>,
    /// Images per UNet call (2N rows with guidance), across the captions and samples of one
    /// subject. Each image keeps its own seed, so the images do not depend on it and a run may
    /// resume with another. Default: 1 on the CPU; on CUDA, as many as fit in free memory.
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub batch: Option<usize>,
}

/// `attractor eval` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum EvalAction {
    /// Merge shard folders (same settings) into `--out`.
    Merge(MergeArgs),
}

/// Flags of `attractor eval merge`.
#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The evaluation folders to merge.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

/// Samplers a generator may use (SPEC.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SamplerChoice {
    /// DDIM, eta 0, "leading" spacing (the default).
    Ddim,
    /// DPM-Solver++ 2M, "linspace" spacing (NeTI's).
    Dpmpp2m,
}

/// Generation settings from the flags, for the generator of a run.
#[derive(Clone, Debug)]
pub struct GenerationOptions {
    pub model: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub sampler: Option<SamplerChoice>,
    pub device: Device,
    /// Precision of the frozen SD weights (`--dtype`).
    pub dtype: candle_core::DType,
    pub offline: bool,
    /// Images per UNet call (`--batch`); `None`: `StableDiffusion::default_batch`.
    pub batch: Option<usize>,
}

/// A run's generator and the subjects it was trained on.
pub struct RunGenerator {
    pub generator: Box<dyn Generator>,
    pub subjects: Vec<String>,
}

/// Open a training run as an image generator: SD 1.5 (`--model`, default the run's own base
/// model) with the run's learned subject.
pub fn open_run(run_dir: &Path, opts: &GenerationOptions) -> Result<RunGenerator> {
    let (sd, info) = open_base(run_dir, opts)?;
    run_generator(run_dir, sd, &info, opts, "")
}

/// The run's settings and the base model it samples with.
fn open_base(
    run_dir: &Path,
    opts: &GenerationOptions,
) -> Result<(std::sync::Arc<crate::pipeline::StableDiffusion>, RunInfo)> {
    let info = read_run_info(run_dir)?;
    let model = opts
        .model
        .clone()
        .unwrap_or_else(|| info.model.trim_end_matches("@main").to_string());
    let source = ModelSource::parse(&model, "main").map_err(|e| anyhow!("--model: {e}"))?;
    let files = crate::hub::resolve_sd(&source, opts.offline)?;
    let sd = crate::pipeline::StableDiffusion::open(&files, &opts.device, opts.dtype)?;
    Ok((std::sync::Arc::new(sd), info))
}

/// A run folder's `config.json`.
fn read_run_info(run_dir: &Path) -> Result<RunInfo> {
    let cfg = run_dir.join("config.json");
    let text = std::fs::read_to_string(&cfg).with_context(|| {
        format!(
            "--run {}: {} not found; pass a folder written by `attractor train --out`",
            run_dir.display(),
            cfg.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a training run's config", cfg.display()))
}

/// What a run is scored on, and how: a run on a plain photo folder (`train --images`) is scored
/// against its own photos with the classic protocol (its only one: there is no test split), with
/// a warning when the folder no longer holds the photos it was trained on; any other run on the
/// `--data` dataset (default the bundled benchmark) with the `--split` protocol(s).
fn run_input(args: &EvalArgs, info: &RunInfo, run_dir: &Path) -> Result<(Dataset, EvalSettings)> {
    let mut settings = args.settings();
    let Some(photos) = &info.images else {
        return Ok((dataset(&args.common)?, settings));
    };
    if let Some(split @ (Split::Test | Split::Both)) = args.split {
        bail!(
            "--split {split}: {} was trained on a plain folder of photos ({}), which has no held-out test split, so the split-test protocol has no test images to score against. Fix: score it with --split train (training-reference scores: its own photos as the references), or build a split-test dataset from the photos with `attractor dataset new SRC OUT --test N` (N photos set aside as the test split, with captions) and train on it with --data OUT --subject NAME",
            run_dir.display(),
            photos.dir
        );
    }
    if let Some(d) = &args.common.data {
        bail!(
            "--data {}: {} was trained on the photos in {} and is scored against them; leave out --data",
            d.display(),
            run_dir.display(),
            photos.dir
        );
    }
    settings.split = Split::Train;
    let dataset = photos
        .open()
        .with_context(|| format!("{}: its photo folder", run_dir.display()))?;
    let subject = dataset.subject(&info.subject)?;
    let changed = photos.changes(&subject)?;
    if !changed.is_empty() {
        eprintln!(
            "warning: the photos in {} are not the ones {} was trained on ({}); the scores compare with the folder as it is now",
            photos.dir,
            run_dir.display(),
            changed.join(", ")
        );
    }
    eprintln!(
        "{}: trained on the {} photos in {}; scoring with the classic protocol: {}",
        run_dir.display(),
        subject.train_images.len(),
        photos.dir,
        crate::eval::summary::TRAINING_REFERENCE_NOTE
    );
    Ok((dataset, settings))
}

/// The generator of a run's learned files with `suffix` (`""`: final, `-steps-N`: step N).
fn run_generator(
    run_dir: &Path,
    sd: std::sync::Arc<crate::pipeline::StableDiffusion>,
    info: &RunInfo,
    opts: &GenerationOptions,
    suffix: &str,
) -> Result<RunGenerator> {
    let subject =
        crate::personalize::generate::LearnedSubject::load(run_dir, info.clone(), &sd, suffix)?;
    let native = sd.unet.config.sample_size * 8;
    let settings = crate::pipeline::SampleSettings {
        steps: opts.steps.unwrap_or(50),
        guidance: opts.guidance.unwrap_or(7.5),
        sampler: match opts.sampler.unwrap_or(SamplerChoice::Ddim) {
            SamplerChoice::Ddim => crate::sd::samplers::SamplerKind::Ddim,
            SamplerChoice::Dpmpp2m => crate::sd::samplers::SamplerKind::Dpmpp2m,
        },
        height: native,
        width: native,
        negative_prompt: String::new(),
    };
    // What changes the images: the run's learned files (by content), base model, sampling.
    let mut fingerprint = Vec::new();
    for name in learned_file_names(info, suffix) {
        let p = run_dir.join(&name);
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        fingerprint.push(format!("{name}:{:016x}", crate::files::fnv64(&bytes)));
    }
    fingerprint.sort();
    let mut id = serde_json::json!({
        "run": run_dir.display().to_string(),
        "method": info.settings.s.method.to_string(),
        "learned": fingerprint,
        "model": sd.id,
        "sampling": settings,
    });
    // Only a half-precision model adds its dtype, so f32 evaluations begun before `--dtype`
    // existed keep their id and resume.
    if sd.dtype != candle_core::DType::F32 {
        id["dtype"] = sd.dtype.as_str().into();
    }
    let id = id.to_string();
    let batch = opts.batch.unwrap_or_else(|| sd.default_batch(&settings));
    Ok(RunGenerator {
        subjects: vec![info.subject.clone()],
        generator: Box::new(RunImages {
            sd,
            subject,
            settings,
            id,
            batch,
        }),
    })
}

/// SD 1.5 with a learned subject, as the evaluation engine's generator.
struct RunImages {
    sd: std::sync::Arc<crate::pipeline::StableDiffusion>,
    subject: crate::personalize::generate::LearnedSubject,
    settings: crate::pipeline::SampleSettings,
    id: String,
    /// Images per UNet call.
    batch: usize,
}

impl Generator for RunImages {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn generate(&mut self, subject: &str, prompt: &str, seed: u64) -> Result<image::RgbImage> {
        self.generate_batch(subject, &[(prompt, seed)])?
            .pop()
            .context("no image generated")
    }

    fn generate_batch(
        &mut self,
        subject: &str,
        requests: &[(&str, u64)],
    ) -> Result<Vec<image::RgbImage>> {
        if subject != self.subject.info.subject {
            bail!(
                "this run learned {}, not {subject}",
                self.subject.info.subject
            );
        }
        self.subject.generate_batch(
            &self.sd,
            &self.settings,
            requests,
            None,
            None,
            &mut |_, _| {},
        )
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn placeholder(&self, _subject: &str) -> Option<String> {
        Some(self.subject.info.subject_text())
    }
}

impl EvalArgs {
    /// The evaluation settings these flags describe.
    pub fn settings(&self) -> EvalSettings {
        let default_split = if self.checkpoints.is_some() {
            Split::Both
        } else {
            Split::Test
        };
        EvalSettings {
            split: self.split.unwrap_or(default_split),
            samples: self.samples,
            clip_t_subject: self.clip_t_subject,
            shard: self.shard,
        }
    }

    fn sources(&self) -> Result<(ModelSource, ModelSource)> {
        let clip = model_source(&self.clip, CLIP_REPO, CLIP_REVISION).context("--clip")?;
        let dino = model_source(&self.dino, DINO_REPO, DINO_REVISION).context("--dino")?;
        Ok((clip, dino))
    }
}

/// A local folder or hub id; the known scorer repos default to the revision with safetensors.
fn model_source(spec: &str, known_repo: &str, known_revision: &str) -> Result<ModelSource> {
    let default_rev = if spec == known_repo {
        known_revision
    } else {
        "main"
    };
    ModelSource::parse(spec, default_rev).map_err(|e| anyhow!(e))
}

fn dataset(common: &Common) -> Result<Dataset> {
    Ok(match &common.data {
        Some(d) => Dataset::open(d)?,
        None => Dataset::open_default()?,
    })
}

/// `--subject a,b` or every subject of the dataset.
fn subjects(common: &Common, dataset: &Dataset) -> Vec<String> {
    match &common.subject {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
        None => dataset
            .subject_names()
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

/// A console progress bar fed by the engine's progress reports.
fn progress_bar(label: String) -> (indicatif::ProgressBar, impl FnMut(Progress)) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} images ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label);
    let b = bar.clone();
    let mut first = true;
    let update = move |p: Progress| {
        b.set_length(p.total as u64);
        if first {
            b.set_position(p.done as u64);
            b.reset_eta();
            first = false;
        } else {
            b.set_position(p.done as u64);
        }
    };
    (bar, update)
}

fn print_done(out: &Path, summary: &crate::eval::Summary) {
    println!("{}", summary.overview().trim_end());
    println!(
        "results: {}  summary: {}",
        out.join(store::RESULTS_FILE).display(),
        out.join(crate::eval::summary::SUMMARY_CSV).display()
    );
}

/// Run `attractor eval`.
pub fn run(args: &EvalArgs) -> Result<()> {
    if let Some(EvalAction::Merge(m)) = &args.action {
        return merge(args, m);
    }
    let modes = [
        args.run.is_some(),
        args.runs.is_some(),
        args.images.is_some(),
        args.checkpoints.is_some(),
    ];
    if modes.iter().filter(|m| **m).count() != 1 {
        bail!("eval: pass one of --run RUN_DIR, --runs DIR, --images DIR or --checkpoints RUN_DIR (see `attractor eval --help`)");
    }
    let settings = args.settings();
    let device = args.common.device()?;
    let offline = args.common.offline();
    let (clip, dino) = args.sources()?;
    if let Some(dir) = &args.images {
        let dataset = dataset(&args.common)?;
        let out = args.common.out.clone().ok_or_else(|| {
            anyhow!(
                "eval --images: pass --out DIR for the results (a new folder, or one to resume)"
            )
        })?;
        let subjects = subjects(&args.common, &dataset);
        // Check the protocol input before loading the scorers (which may download).
        crate::eval::protocol::build_jobs(&settings, &dataset, &subjects, &|_| None)?;
        let mut scorers = Scorers::load(&clip, &dino, &device, offline)?;
        let (bar, mut update) = progress_bar(format!("scoring {}", dir.display()));
        let outcome = score_image_dir(
            &settings,
            &dataset,
            &subjects,
            dir,
            &mut scorers,
            &out,
            &mut update,
        )?;
        bar.finish_and_clear();
        print_done(&out, &outcome.summary);
        let (missing, unreadable) = (&outcome.missing, &outcome.unreadable);
        if !missing.is_empty() || !unreadable.is_empty() {
            for p in missing.iter().take(10) {
                eprintln!("missing: {}", p.display());
            }
            for (p, why) in unreadable.iter().take(10) {
                eprintln!("unreadable: {} ({why})", p.display());
            }
            bail!(
                "{} expected image(s) missing and {} unreadable under {} (first ones listed \
                 above; the summary covers the images that were scored). Generate them into the \
                 layout <subject>/<test image stem>/<caption index>/<sample>.png and rerun the \
                 same command: scored images are not redone",
                missing.len(),
                unreadable.len(),
                dir.display()
            );
        }
        return Ok(());
    }
    let opts = GenerationOptions {
        model: args.common.model.clone(),
        steps: args.steps,
        guidance: args.guidance,
        sampler: args.sampler,
        device: device.clone(),
        dtype: args.common.dtype()?,
        offline,
        batch: args.batch,
    };
    if let Some(run_dir) = &args.checkpoints {
        let (dataset, settings) = run_input(args, &read_run_info(run_dir)?, run_dir)?;
        return checkpoints(args, run_dir, &dataset, &settings, &opts, (&clip, &dino));
    }
    let runs: Vec<PathBuf> = match (&args.run, &args.runs) {
        (Some(r), _) => vec![r.clone()],
        (None, Some(dir)) => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("--runs {}: cannot list the folder", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            v.sort();
            if v.is_empty() {
                bail!("--runs {}: no run folders inside", dir.display());
            }
            v
        }
        _ => bail!("eval: pass one of --run RUN_DIR, --runs DIR or --images DIR"),
    };
    let mut scorers: Option<Scorers> = None;
    for run_dir in &runs {
        let (dataset, settings) = run_input(args, &read_run_info(run_dir)?, run_dir)?;
        let mut opened = open_run(run_dir, &opts)?;
        let subjects = match &args.common.subject {
            Some(_) => subjects(&args.common, &dataset),
            None => opened.subjects.clone(),
        };
        let out = match (&args.common.out, &args.runs) {
            (Some(o), Some(_)) => o.join(run_dir.file_name().unwrap_or_default()),
            (Some(o), None) => o.clone(),
            (None, _) => run_dir.join("eval"),
        };
        if scorers.is_none() {
            scorers = Some(Scorers::load(&clip, &dino, &device, offline)?);
        }
        let sc = scorers.as_mut().context("scorers not loaded")?;
        let (bar, mut update) = progress_bar(format!("eval {}", run_dir.display()));
        let summary = run_protocol_with_progress(
            &settings,
            &dataset,
            &subjects,
            opened.generator.as_mut(),
            sc,
            &out,
            &mut update,
        )?;
        bar.finish_and_clear();
        println!("{}:", run_dir.display());
        print_done(&out, &summary);
    }
    Ok(())
}

/// The learned files saved with checkpoint `step`: `-steps-N` ones, or the final ones for the
/// last step (training writes those instead).
fn step_suffix(run_dir: &Path, info: &RunInfo, step: usize, last: usize) -> Result<String> {
    let main = |suffix: &str| run_dir.join(&learned_file_names(info, suffix)[0]);
    let suffix = format!("-steps-{step}");
    if main(&suffix).is_file() {
        return Ok(suffix);
    }
    if step == last && main("").is_file() {
        return Ok(String::new());
    }
    bail!(
        "{}: checkpoints/step-{step}.safetensors has no learned files beside it ({} is missing); remove that checkpoint or resume the run with `attractor train --resume {}`",
        run_dir.display(),
        main(&suffix).display(),
        run_dir.display()
    )
}

/// `eval --checkpoints RUN_DIR`: every saved step into OUT/step-N, then the curves.
fn checkpoints(
    args: &EvalArgs,
    run_dir: &Path,
    dataset: &Dataset,
    settings: &EvalSettings,
    opts: &GenerationOptions,
    (clip, dino): (&ModelSource, &ModelSource),
) -> Result<()> {
    let saved = super::train::saved_checkpoints(run_dir)?;
    if saved.is_empty() {
        bail!(
            "--checkpoints {}: no checkpoints/step-N.safetensors inside; train with `attractor train --save-every N --out {}` to keep intermediate steps",
            run_dir.display(),
            run_dir.display()
        );
    }
    let last = saved.last().map(|(n, _)| *n).unwrap_or(0);
    let (sd, info) = open_base(run_dir, opts)?;
    // Check every step's files before the long part starts.
    let suffixes = saved
        .iter()
        .map(|(n, _)| Ok((*n, step_suffix(run_dir, &info, *n, last)?)))
        .collect::<Result<Vec<_>>>()?;
    let subjects = match &args.common.subject {
        Some(_) => subjects(&args.common, dataset),
        None => vec![info.subject.clone()],
    };
    crate::eval::protocol::build_jobs(settings, dataset, &subjects, &|_| None)?;
    let out = args
        .common
        .out
        .clone()
        .unwrap_or_else(|| run_dir.join("eval-checkpoints"));
    let mut scorers = Scorers::load(clip, dino, &opts.device, opts.offline)?;
    let mut curves = Vec::new();
    for (step, suffix) in &suffixes {
        let mut opened = run_generator(run_dir, sd.clone(), &info, opts, suffix)?;
        let step_out = out.join(format!("step-{step}"));
        let (bar, mut update) = progress_bar(format!("eval step {step}/{last}"));
        let summary = run_protocol_with_progress(
            settings,
            dataset,
            &subjects,
            opened.generator.as_mut(),
            &mut scorers,
            &step_out,
            &mut update,
        )?;
        bar.finish_and_clear();
        curves.push(StepScores::from_summary(*step, &summary));
        // Rewritten after every step: an interrupted evaluation still leaves its curves so far.
        write_curves(&out, run_dir, &info, &curves)?;
    }
    println!("{}", curves_table(&curves).trim_end());
    let best = best_choices(
        &curves,
        &super::train::heldout_history(&run_dir.join("metrics.jsonl"))?,
    );
    println!("\nthe step each protocol would pick (split-test = the honest choice):");
    println!("{}", best_table(&best).trim_end());
    println!(
        "curves: {}  plot: {}  choices: {}  per step: {}",
        out.join(CURVES_CSV).display(),
        out.join(CURVES_PNG).display(),
        out.join(BEST_JSON).display(),
        out.join("step-N").display()
    );
    Ok(())
}

fn write_curves(out: &Path, run_dir: &Path, info: &RunInfo, curves: &[StepScores]) -> Result<()> {
    crate::files::atomic_write(&out.join(CURVES_CSV), curves_csv(curves).as_bytes())?;
    let best = best_choices(
        curves,
        &super::train::heldout_history(&run_dir.join("metrics.jsonl"))?,
    );
    crate::files::atomic_write(
        &out.join(BEST_JSON),
        serde_json::to_string_pretty(&best)?.as_bytes(),
    )?;
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let title = format!(
        "{name}: {} on {}, scores over training",
        info.settings.s.method, info.subject
    );
    let png = crate::report::plot::training_curves(&title, curves)?;
    crate::files::atomic_write(&out.join(CURVES_PNG), &png)
}

fn merge(args: &EvalArgs, m: &MergeArgs) -> Result<()> {
    let out = args
        .common
        .out
        .clone()
        .ok_or_else(|| anyhow!("eval merge: pass --out DIR for the merged results"))?;
    let outcome = store::merge(&m.shards, &out)?;
    println!(
        "merged {} folder(s): {} images ({} duplicate lines dropped)",
        m.shards.len(),
        outcome.records,
        outcome.duplicates
    );
    print_done(&out, &outcome.summary);
    if !outcome.conflicts.is_empty() {
        bail!(
            "{} key(s) have different scores in different folders (e.g. {}); the first was kept. \
             Were the shards produced by the same build and device?",
            outcome.conflicts.len(),
            outcome.conflicts[0]
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: EvalArgs,
    }

    #[test]
    fn defaults_and_overrides() {
        let t = T::try_parse_from(["x", "--images", "imgs", "--out", "o"]).unwrap();
        let s = t.a.settings();
        assert_eq!(s, EvalSettings::default());
        assert_eq!(
            t.a.sources().unwrap().0,
            ModelSource::Hub {
                repo: CLIP_REPO.into(),
                revision: CLIP_REVISION.into()
            }
        );
        let t = T::try_parse_from([
            "x",
            "--run",
            "r",
            "--split",
            "both",
            "--samples",
            "2",
            "--shard",
            "3/4",
            "--clip-t-subject",
            "remove",
            "--dino",
            "facebook/dino-vits16@main",
            "--sampler",
            "dpmpp2m",
        ])
        .unwrap();
        let s = t.a.settings();
        assert_eq!(s.split, Split::Both);
        assert_eq!(s.samples, 2);
        assert_eq!(s.shard, Some(Shard { index: 3, count: 4 }));
        assert_eq!(s.clip_t_subject, ClipTSubject::Remove);
        assert_eq!(t.a.sampler, Some(SamplerChoice::Dpmpp2m));
        assert_eq!(
            t.a.sources().unwrap().1,
            ModelSource::Hub {
                repo: DINO_REPO.into(),
                revision: "main".into()
            }
        );
        assert!(T::try_parse_from(["x", "--run", "r", "--images", "i"]).is_err());
        assert!(T::try_parse_from(["x", "--shard", "0/2"]).is_err());
        let t = T::try_parse_from(["x", "merge", "a", "b", "--out", "m"]).unwrap();
        match t.a.action {
            Some(EvalAction::Merge(m)) => assert_eq!(m.shards.len(), 2),
            None => panic!("merge not parsed"),
        }
        assert_eq!(t.a.common.out, Some(PathBuf::from("m")));
    }
}
