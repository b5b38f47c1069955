//! `attractor train`: learn a subject with ti, ti+, neti or neti+ (SPEC.md §3-5), with
//! checkpoints that resume exactly.

use super::ranges;
use super::sample::{load_model_in, progress};
use super::Common;
use crate::data::layout::{Dataset, Kind};
use crate::personalize::generate::LearnedSubject;
use crate::personalize::heldout::{BestTracker, HeldOut};
use crate::personalize::method::{Method, Schedule};
use crate::personalize::settings::TrainSettings;
use crate::personalize::trainer::{BestStep, RunInfo, Trainer};
use crate::pipeline::SampleSettings;
use crate::ranges::Range;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone, Default)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    /// ti | ti+ | neti | neti+ (default ti, or the --config preset's).
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Optimizer steps in total (default: ti 5000, neti 1000). With --resume: continue up to this.
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub steps: Option<usize>,
    /// Save a checkpoint every N steps (default 500).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub save_every: Option<usize>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Images per micro-batch (default 2).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (default: ti 1, neti 4).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub grad_accum: Option<usize>,
    /// Base learning rate, scaled by batch x grad-accum unless --no-scale-lr.
    #[arg(long, value_parser = ranges::float(Range::Positive), allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Use --lr as given.
    #[arg(long)]
    pub no_scale_lr: bool,
    /// Training resolution in pixels (default 512).
    #[arg(long, value_parser = ranges::int(Range::MultipleOf8), allow_negative_numbers = true)]
    pub resolution: Option<usize>,
    /// Textual Inversion vectors for the subject (default 1).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub num_vectors: Option<usize>,
    /// Initializer (TI) / super-category (NeTI) word: one token.
    #[arg(long)]
    pub init_word: Option<String>,
    /// Contrastive-weight schedule (attractor methods; default cosine).
    #[arg(long, value_enum)]
    pub schedule: Option<Schedule>,
    /// Weight w_c of the contrastive loss (default 0.1).
    #[arg(long, value_parser = ranges::float(Range::NonNegative), allow_negative_numbers = true)]
    pub contrastive_weight: Option<f64>,
    /// InfoNCE temperature (default 0.07).
    #[arg(long, value_parser = ranges::float(Range::Positive), allow_negative_numbers = true)]
    pub tau: Option<f64>,
    /// Write validation images every N steps (0 = off).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub validate_every: Option<usize>,
    /// Evaluate the held-out loss every N steps (0 = off): the noise-prediction loss on the
    /// subject's test images at fixed timesteps and noise (SPEC.md §9), and on its training
    /// images beside it, logged in metrics.jsonl as heldout_loss and train_ref_loss.
    #[arg(long, value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub heldout_every: Option<usize>,
    /// Keep the learned files of the step with the lowest held-out loss as RUN/best/ (`sample
    /// --run RUN/best`, `eval --run RUN/best`); needs --heldout-every.
    #[arg(long)]
    pub keep_best: bool,
    /// Stop after P held-out evaluations without a lower loss, saving as at the end of
    /// training; needs --heldout-every.
    #[arg(long, value_name = "P", value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub early_stop: Option<usize>,
    /// DreamBooth's subject word (default `sks`; a rare single CLIP token).
    #[arg(long)]
    pub identifier: Option<String>,
    /// The baselines' instance prompt (`{identifier}`, `{class}` are filled in).
    #[arg(long)]
    pub instance_prompt: Option<String>,
    /// Prior preservation's class prompt (default `a photo of {class}`).
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// Class images generated for prior preservation (default 200; 0 = none).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub prior_images: Option<usize>,
    /// Weight of the prior loss (default 1.0).
    #[arg(long, value_parser = ranges::float(Range::NonNegative), allow_negative_numbers = true)]
    pub prior_loss_weight: Option<f64>,
    /// Sampler steps of the generated class images (default 50).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub prior_steps: Option<usize>,
    /// Fine-tune the text encoder too (dreambooth: all of it; dreambooth-lora: LoRA on its
    /// attention projections).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// LoRA rank (default 4).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha (default: the rank).
    #[arg(long, value_parser = ranges::float(Range::Positive), allow_negative_numbers = true)]
    pub lora_alpha: Option<f64>,
    /// Clip the gradients' total norm (weight-training methods; default 1.0, 0 = off).
    #[arg(long, value_parser = ranges::float(Range::NonNegative), allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    /// Recompute each UNet block in the backward pass (less memory for the full fine-tune).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Custom Diffusion's modifier token (default `<new1>`).
    #[arg(long)]
    pub modifier_token: Option<String>,
    /// Train on a plain folder of photos (jpg, png, webp, bmp, tiff; EXIF rotation applied)
    /// instead of a dataset subject: no captions, no test split; needs --class. The subject is
    /// named after the folder; masks go to DIR/masks/.
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,
    /// With --images: what the photos show, e.g. dog or backpack (initialises the token,
    /// fills the evaluation prompts).
    #[arg(long, value_name = "WORD")]
    pub class: Option<String>,
    /// With --images: the classic protocol's prompt list that scores the run, `live` or
    /// `object` (default: live for the classes cat and dog, as in the DreamBooth benchmark).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// With --images: the folder of the photos' masks (default DIR/masks; masks made on
    /// demand go there too).
    #[arg(long, value_name = "DIR")]
    pub masks: Option<PathBuf>,
    /// With --images: set K photos aside as the test split of the held-out loss
    /// (--heldout-every); they are not trained on. Which ones is printed and recorded.
    #[arg(long, value_name = "K", value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub holdout: Option<usize>,
    /// When an attractor method (ti+, neti+, dreambooth-lora+) finds training images without a
    /// mask: `make` them with SAM + CLIP first (existing masks are never replaced), or `error`.
    #[arg(long, value_enum, default_value_t = MasksMissing::Make)]
    pub masks_missing: MasksMissing,
    #[command(flatten)]
    pub mask_models: super::masks::MaskModelArgs,
}

/// Flags over TOML over defaults: the settings this command runs with.
pub fn resolve_settings(args: &TrainArgs) -> Result<TrainSettings> {
    let mut s = match &args.common.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("--config {}: cannot read it", p.display()))?;
            toml::from_str::<TrainSettings>(&text).with_context(|| {
                format!(
                    "--config {}: not a valid training preset (see configs/*.toml for the keys)",
                    p.display()
                )
            })?
        }
        None => TrainSettings::default(),
    };
    if let Some(m) = args.method {
        s.method = m;
    }
    if args.steps.is_some() {
        s.steps = args.steps;
    }
    if let Some(v) = args.save_every {
        s.save_every = v;
    }
    if args.batch.is_some() {
        s.batch = args.batch;
    }
    if args.grad_accum.is_some() {
        s.grad_accum = args.grad_accum;
    }
    if args.lr.is_some() {
        s.base_lr = args.lr;
    }
    if args.no_scale_lr {
        s.scale_lr = Some(false);
    }
    if let Some(v) = args.resolution {
        s.resolution = v;
    }
    if let Some(v) = args.num_vectors {
        s.num_vectors = v;
    }
    if args.init_word.is_some() {
        s.init_word = args.init_word.clone();
    }
    if let Some(v) = args.schedule {
        s.schedule = v;
    }
    if let Some(v) = args.contrastive_weight {
        s.weights.w_c = v;
    }
    if let Some(v) = args.tau {
        s.tau = v;
    }
    if let Some(v) = args.validate_every {
        s.validate_every = v;
    }
    apply_heldout_flags(args, &mut s);
    if let Some(v) = args.common.seed {
        s.seed = v;
    }
    let b = &mut s.baseline;
    if let Some(v) = &args.identifier {
        b.identifier = v.clone();
    }
    if args.instance_prompt.is_some() {
        b.instance_prompt = args.instance_prompt.clone();
    }
    if args.class_prompt.is_some() {
        b.class_prompt = args.class_prompt.clone();
    }
    if let Some(v) = args.prior_images {
        b.prior_images = v;
    }
    if let Some(v) = args.prior_loss_weight {
        b.prior_loss_weight = v;
    }
    if let Some(v) = args.prior_steps {
        b.prior_steps = v;
    }
    if args.train_text_encoder {
        b.train_text_encoder = true;
    }
    if let Some(v) = args.lora_rank {
        b.lora_rank = v;
    }
    if args.lora_alpha.is_some() {
        b.lora_alpha = args.lora_alpha;
    }
    if let Some(v) = args.max_grad_norm {
        b.max_grad_norm = v;
    }
    if args.gradient_checkpointing {
        b.gradient_checkpointing = true;
    }
    if let Some(v) = &args.modifier_token {
        b.modifier_token = v.clone();
    }
    Ok(s)
}

/// The held-out flags, which also apply on `--resume` (they change what is measured and kept,
/// never the trained parameters).
fn apply_heldout_flags(args: &TrainArgs, s: &mut TrainSettings) {
    if let Some(v) = args.heldout_every {
        s.heldout_every = v;
    }
    if args.keep_best {
        s.keep_best = true;
    }
    if let Some(v) = args.early_stop {
        s.early_stop = v;
    }
}

/// The (step, held-out loss) pairs a run's metrics.jsonl has logged, in order: what a resumed
/// run's best step and early-stop count are rebuilt from (the file is truncated to the
/// checkpoint first, so they match an uninterrupted run).
pub fn heldout_history(metrics: &Path) -> Result<Vec<(usize, f64)>> {
    if !metrics.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let step = v.get("step")?.as_u64()? as usize;
            Some((step, v.get("heldout_loss")?.as_f64()?))
        })
        .collect())
}

fn best_step(tracker: &BestTracker) -> Option<BestStep> {
    tracker
        .best
        .map(|(step, heldout_loss)| BestStep { step, heldout_loss })
}

/// `--keep-best`: the current learned files and config.json (with the best step) into
/// `RUN/best/`, written beside it first and swapped in by renames, so `RUN/best/` is always one
/// complete step.
fn save_best(trainer: &Trainer, out: &Path) -> Result<()> {
    let best = out.join("best");
    let tmp = out.join("best.tmp");
    let old = out.join("best.old");
    for d in [&tmp, &old] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("cannot remove {}", d.display()))?;
        }
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    trainer.save_outputs(&tmp, "")?;
    let cfg_json = serde_json::to_string_pretty(&trainer.info)?;
    crate::files::atomic_write(&tmp.join("config.json"), cfg_json.as_bytes())?;
    crate::files::atomic_write(&out.join("config.json"), cfg_json.as_bytes())?;
    if best.exists() {
        std::fs::rename(&best, &old).with_context(|| format!("cannot move {}", best.display()))?;
    }
    std::fs::rename(&tmp, &best).with_context(|| format!("cannot move {}", tmp.display()))?;
    if old.exists() {
        std::fs::remove_dir_all(&old)
            .with_context(|| format!("cannot remove {}", old.display()))?;
    }
    Ok(())
}

/// The newest `checkpoints/step-N.safetensors` of a run.
pub fn latest_checkpoint(run: &Path) -> Result<Option<(usize, PathBuf)>> {
    Ok(saved_checkpoints(run)?.pop())
}

/// Every `checkpoints/step-N.safetensors` of a run, by step.
pub fn saved_checkpoints(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = run.join("checkpoints");
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|r| r.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            found.push((n, p));
        }
    }
    found.sort();
    Ok(found)
}

/// Keep only the metrics lines up to `step` (a resumed run redoes the steps after its checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s as usize <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::files::atomic_write(path, out.as_bytes())
}

/// The model precision of a training run: `--dtype` when given, else the one a resumed run
/// recorded, else `auto`. f16 is refused: the MSE's gradient on the UNet output is about 2/N per
/// element (1.2e-4 at 512 px and batch 1, 1.5e-5 at batch 8), at or below f16's smallest normal
/// number (6.1e-5), where f16 keeps ever fewer significant bits, and attractor does no loss
/// scaling; bf16 has f32's range.
fn train_dtype(common: &Common, prior: Option<&RunInfo>) -> Result<DType> {
    let on_cpu = common.on_cpu();
    let recorded = prior.map(|info| info.model_dtype.as_str());
    let dtype = match (common.dtype.as_deref(), recorded) {
        (None, Some(r)) => super::resolve_dtype(Some(r), on_cpu).with_context(|| {
            format!("the run was trained with --dtype {r}; pass --dtype to resume it in another precision (it then no longer matches an uninterrupted run bit for bit)")
        })?,
        (flag, _) => super::resolve_dtype(flag, on_cpu)?,
    };
    if dtype == DType::F16 {
        bail!("--dtype f16: training in f16 would underflow the gradients (attractor does no loss scaling); use --dtype bf16 on CUDA or f32");
    }
    if let Some(r) = recorded.filter(|&r| r != dtype.as_str()) {
        eprintln!(
            "warning: resuming a run trained with --dtype {r} in {}; the result will not match an uninterrupted run bit for bit",
            dtype.as_str()
        );
    }
    Ok(dtype)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let (out, settings, prior, opened) = match &args.resume {
        Some(run) => {
            let cfg = run.join("config.json");
            let text = std::fs::read_to_string(&cfg).with_context(|| {
                format!(
                    "--resume {}: {} not found; pass a folder written by `attractor train --out`",
                    run.display(),
                    cfg.display()
                )
            })?;
            let info: RunInfo = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a training run's config", cfg.display()))?;
            let mut s = info.settings.s.clone();
            if args.steps.is_some() {
                s.steps = args.steps;
            }
            if let Some(v) = args.save_every {
                s.save_every = v;
            }
            if args.images.is_some() {
                bail!("--resume {}: the run knows its photos; leave out --images (and --class, --kind, --masks, --holdout)", run.display());
            }
            apply_heldout_flags(args, &mut s);
            (run.clone(), s, Some(info), None)
        }
        None => {
            let s = resolve_settings(args)?;
            let (dataset, subject) = new_input(args)?;
            let out = args.common.out.clone().unwrap_or_else(|| {
                PathBuf::from(format!(
                    "runs/{subject}-{}",
                    s.method.name().replace('+', "plus")
                ))
            });
            if out.join("config.json").is_file() {
                bail!(
                    "{} already holds a training run. Fix: continue it with `attractor train --resume {}`, or choose another --out",
                    out.display(),
                    out.display()
                );
            }
            (out, s, None, Some((dataset, subject)))
        }
    };
    let resolved =
        settings
            .resolve()
            .with_context(|| match (&args.resume, &args.common.config) {
                (Some(run), _) => format!("--resume {}: config.json", run.display()),
                (None, Some(p)) => format!("--config {} (or a flag)", p.display()),
                (None, None) => "the training settings".into(),
            })?;
    let (dataset, subject_name) = match (&prior, opened) {
        (_, Some(opened)) => opened,
        (Some(info), None) => (run_dataset(info, &out)?, info.subject.clone()),
        (None, None) => bail!("internal: a new run without its input"),
    };
    let subject = dataset.subject(&subject_name)?;
    if let (Some(info), Some(photos)) = (&prior, &prior.as_ref().and_then(|i| i.images.clone())) {
        let changed = photos.changes(&subject)?;
        if !changed.is_empty() {
            bail!(
                "--resume {}: the photos in {} are not the ones this run began with ({}); a resumed run must see the same photos (its attractor tokens and epoch order are per photo). Fix: restore them, or start a new run on the folder as it is now with `attractor train --images {} --class {} --out NEW_DIR`",
                out.display(),
                photos.dir,
                changed.join(", "),
                photos.dir,
                info.class_word
            );
        }
    }
    let photo_record = match dataset.photos {
        Some(_) => Some(crate::data::photos::PhotoSource::record(
            &dataset, &subject,
        )?),
        None => None,
    };
    let mut common = args.common.clone();
    if let Some(info) = &prior {
        if common.model.is_none() {
            common.model = Some(info.model.trim_end_matches("@main").to_string());
        }
    }
    if resolved.s.method.uses_attractor() && args.masks_missing == MasksMissing::Make {
        make_missing_masks(&args.mask_models, &common, &subject, &dataset.dir)?;
    }
    check_input(&resolved, &subject, &dataset.dir)?;
    let mut sd = load_model_in(&common, train_dtype(&common, prior.as_ref())?)?;
    let class_images = prepare_baseline(&mut sd, &resolved, &subject)?;
    let mut trainer = Trainer::new(&sd, resolved.clone(), &subject, &dataset.dir)?;
    trainer.info.images = photo_record;
    trainer.set_class_images(&class_images)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let metrics = out.join("metrics.jsonl");
    if prior.is_some() {
        match latest_checkpoint(&out)? {
            Some((n, p)) => {
                trainer.load_checkpoint(&p)?;
                truncate_metrics(&metrics, n)?;
                eprintln!(
                    "resumed {} at step {n} of {}",
                    out.display(),
                    resolved.steps
                );
            }
            None => bail!(
                "--resume {}: no checkpoints/step-N.safetensors to resume from",
                out.display()
            ),
        }
    }
    let cfg_json = serde_json::to_string_pretty(&trainer.info)?;
    crate::files::atomic_write(&out.join("config.json"), cfg_json.as_bytes())?;
    crate::files::atomic_write(
        &out.join("config.toml"),
        toml::to_string(&resolved.s)?.as_bytes(),
    )?;
    eprintln!(
        "training {} on {} ({} images) with {} from {} in {}: {} steps, batch {} x accum {}, lr {:.3e} (base {:.1e}{})",
        resolved.s.method,
        subject.name,
        subject.train_images.len(),
        resolved.s.method,
        sd.id,
        sd.dtype.as_str(),
        resolved.steps,
        resolved.batch,
        resolved.grad_accum,
        resolved.lr,
        resolved.base_lr,
        if resolved.scale_lr { " x batch x accum" } else { "" }
    );
    eprintln!(
        "effective configuration: {}",
        out.join("config.toml").display()
    );
    let heldout = match resolved.s.heldout_every {
        0 => None,
        every => {
            eprintln!(
                "held-out loss every {every} steps on {} test images ({} fixed timesteps each; the {} training images beside it){}",
                subject.test_images.len(),
                crate::personalize::heldout::TIMESTEPS,
                subject.train_images.len(),
                match (resolved.s.keep_best, resolved.s.early_stop) {
                    (true, 0) => format!("; the best step is kept in {}", out.join("best").display()),
                    (true, p) => format!("; the best step is kept in {}; stop after {p} evaluations without improvement", out.join("best").display()),
                    (false, 0) => String::new(),
                    (false, p) => format!("; stop after {p} evaluations without improvement"),
                }
            );
            Some(HeldOut::encode(
                &sd,
                &subject.test_images,
                &subject.train_images,
                resolved.s.resolution,
            )?)
        }
    };
    let mut tracker = BestTracker::new(resolved.s.early_stop);
    for (step, loss) in heldout_history(&metrics)? {
        tracker.observe(step, loss);
    }
    if resolved.s.keep_best {
        trainer.info.best = best_step(&tracker);
    }
    if tracker.should_stop() && trainer.step < resolved.steps {
        let (b, l) = tracker.best.unwrap_or_default();
        eprintln!(
            "{} stopped early at step {}: no lower held-out loss in {} evaluations after step {b} ({l:.5}). Fix: resume with a larger --early-stop (or 0) to train on",
            out.display(),
            trainer.step,
            tracker.patience
        );
        return Ok(());
    }
    let pb = progress(resolved.steps as u64, "train");
    pb.set_position(trainer.step as u64);
    let ckpt_dir = out.join("checkpoints");
    let mut last_heldout = String::new();
    while trainer.step < resolved.steps {
        let mut log = match trainer.train_step() {
            Ok(l) => l,
            Err(e) => {
                pb.abandon();
                let last = latest_checkpoint(&out)?
                    .map(|(n, _)| {
                        format!(
                            "the last checkpoint (step {n}) in {} is kept",
                            ckpt_dir.display()
                        )
                    })
                    .unwrap_or_else(|| "no checkpoint was written yet".into());
                return Err(e.context(format!(
                    "training stopped at step {}; {last}",
                    trainer.step + 1
                )));
            }
        };
        let s = trainer.step;
        let mut stop = false;
        let mut message = format!("train loss {:.4}", log.loss);
        if let Some(h) = heldout
            .as_ref()
            .filter(|_| s % resolved.s.heldout_every == 0 || s == resolved.steps)
        {
            let l = h.evaluate(&trainer)?;
            log.heldout_loss = Some(l.heldout_loss);
            log.train_ref_loss = Some(l.train_ref_loss);
            let improved = tracker.observe(s, l.heldout_loss);
            crate::files::append_line(&metrics, &serde_json::to_string(&log)?)?;
            if improved && resolved.s.keep_best {
                trainer.info.best = best_step(&tracker);
                save_best(&trainer, &out)?;
            }
            stop = tracker.should_stop();
            last_heldout = format!(
                " · held-out {:.4} (train-ref {:.4}, best step {})",
                l.heldout_loss,
                l.train_ref_loss,
                tracker.best.map(|b| b.0).unwrap_or(s)
            );
        } else {
            crate::files::append_line(&metrics, &serde_json::to_string(&log)?)?;
        }
        message.push_str(&last_heldout);
        pb.set_position(log.step as u64);
        pb.set_message(message);
        if stop {
            trainer.info.stopped_early_at = Some(s);
            pb.suspend(|| {
                eprintln!(
                    "early stop at step {s}: no lower held-out loss in {} evaluations (best: step {})",
                    tracker.patience,
                    tracker.best.map(|b| b.0).unwrap_or(s)
                )
            });
            break;
        }
        let every = resolved.s.save_every;
        if every > 0 && s % every == 0 && s < resolved.steps {
            trainer.save_checkpoint(&ckpt_dir.join(format!("step-{s}.safetensors")))?;
            trainer.save_outputs(&out, &format!("-steps-{s}"))?;
        }
        if resolved.s.validate_every > 0 && s % resolved.s.validate_every == 0 {
            validate(&trainer, &out, s)?;
        }
    }
    pb.finish_and_clear();
    let s = trainer.step;
    trainer.save_checkpoint(&ckpt_dir.join(format!("step-{s}.safetensors")))?;
    let written = trainer.save_outputs(&out, "")?;
    for w in written {
        eprintln!("wrote {}", w.display());
    }
    if trainer.info.best.is_some() || trainer.info.stopped_early_at.is_some() {
        let cfg_json = serde_json::to_string_pretty(&trainer.info)?;
        crate::files::atomic_write(&out.join("config.json"), cfg_json.as_bytes())?;
    }
    if let Some(b) = trainer.info.best {
        eprintln!(
            "best held-out loss {:.5} at step {}: its learned files are in {} (`attractor sample --run {}`)",
            b.heldout_loss,
            b.step,
            out.join("best").display(),
            out.join("best").display()
        );
    }
    eprintln!(
        "done: sample it with `attractor sample --run {} --prompt \"a photo of {{}} on a beach\"{}`",
        out.display(),
        args.common.model.as_ref().map(|m| format!(" --model {m}")).unwrap_or_default()
    );
    Ok(())
}

/// The dataset and subject of a new run: a plain photo folder (`--images DIR --class WORD`) or
/// a subject of a split-test dataset (`--data`, default the bundled benchmark, `--subject`).
fn new_input(args: &TrainArgs) -> Result<(Dataset, String)> {
    let Some(dir) = &args.images else {
        if args.class.is_some() || args.kind.is_some() || args.masks.is_some() {
            bail!("--class, --kind and --masks go with --images DIR (a folder of photos); a dataset subject has them in subjects.json and <subject>/masks/");
        }
        if args.holdout.is_some() {
            bail!("--holdout goes with --images DIR (a folder of photos); a dataset subject's test split is its test/ folder");
        }
        let dataset = match &args.common.data {
            Some(d) => Dataset::open(d)?,
            None => Dataset::open_default()?,
        };
        let subject = args.common.subject.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "--subject is required (a folder of the dataset, e.g. --subject dog), or train on a folder of photos with --images DIR --class WORD"
            )
        })?;
        return Ok((dataset, subject));
    };
    if args.common.subject.is_some() || args.common.data.is_some() {
        bail!(
            "--images {} trains on that folder of photos; leave out --subject and --data (they name a split-test dataset's subject)",
            dir.display()
        );
    }
    let class = args.class.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "--images {}: say what the photos show with --class WORD (e.g. --class dog): it initialises the learned token and fills the evaluation prompts",
            dir.display()
        )
    })?;
    let kind = args.kind.unwrap_or_else(|| Kind::guess(class));
    let dataset = Dataset::from_photos(dir, class, kind, args.masks.clone())?
        .holding_out(args.holdout.unwrap_or(0));
    let name = dataset.subject_names()[0].to_string();
    let subject = dataset.subject(&name)?;
    let held = if subject.test_images.is_empty() {
        "no test split, so `attractor eval --run` gives training-reference scores".to_string()
    } else {
        let names: Vec<String> = subject
            .test_images
            .iter()
            .map(|p| crate::data::layout::file_name(p))
            .collect();
        format!(
            "held out as test images (--holdout {}): {}, training on the other {}{}",
            names.len(),
            names.join(", "),
            subject.train_images.len(),
            if args.heldout_every.unwrap_or(0) == 0 {
                "; they are used by --heldout-every N, which is off"
            } else {
                ""
            }
        )
    };
    eprintln!(
        "photos: {} as subject `{name}` (class {class}, kind {kind}{}); {held}",
        dir.display(),
        if args.kind.is_some() {
            ""
        } else {
            ", --kind to change"
        }
    );
    Ok((dataset, name))
}

/// The dataset a run was trained on: its photo folder, or its dataset folder.
fn run_dataset(info: &RunInfo, run: &Path) -> Result<Dataset> {
    Ok(match &info.images {
        Some(p) => p
            .open()
            .with_context(|| format!("--resume {}: its photo folder {}", run.display(), p.dir))?,
        None => Dataset::open(&info.dataset)?,
    })
}

/// Run the mask pipeline (SAM candidates ranked by CLIP) for exactly the training images of
/// `subject` that have no mask, writing each beside the others (a dataset subject's `masks/`,
/// or the photo folder's), one line per image with its preview. Masks that exist are never
/// replaced. Nothing loads when none is missing.
pub fn make_missing_masks(
    models: &super::masks::MaskModelArgs,
    common: &Common,
    subject: &crate::data::layout::Subject,
    dataset_dir: &Path,
) -> Result<()> {
    let missing = subject
        .train_images
        .iter()
        .filter(|p| !subject.mask_path(p).is_file())
        .count();
    if missing == 0 {
        return Ok(());
    }
    eprintln!(
        "{missing} of {} training image(s) of {} have no subject mask: making them in {} (SAM + CLIP; --masks-missing error refuses instead)",
        subject.train_images.len(),
        subject.name,
        subject.masks_dir().display()
    );
    let mut m = models.load(common).context(
        "the attractor methods need subject masks and making them needs SAM and CLIP; pass --sam FILE / --clip DIR, or train with --masks-missing error after making the masks yourself",
    )?;
    let opts = models.options(&crate::data::masks::MaskOptions::default().prompt, false);
    let rel = |p: &Path| {
        p.strip_prefix(dataset_dir)
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let relaxed = super::masks::make_masks(subject, &mut m, &opts, &rel, false)?;
    if let Some(note) = super::masks::relaxed_note(relaxed) {
        eprintln!("{note}");
    }
    Ok(())
}

/// What an attractor method does when training images have no subject mask.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MasksMissing {
    /// Make them with the mask pipeline before training.
    #[default]
    Make,
    /// Refuse, listing them.
    Error,
}

/// What a method needs that can be checked before any model loads: masks for the attractor
/// methods (ti+, neti+, dreambooth-lora+: the same check and message), a one-word identifier,
/// a modifier token that is new to CLIP's vocabulary.
fn check_input(
    s: &crate::personalize::settings::Resolved,
    subject: &crate::data::layout::Subject,
    dataset_dir: &Path,
) -> Result<()> {
    let method = s.s.method;
    if method.uses_attractor() {
        crate::personalize::trainer::check_masks(subject, dataset_dir)?;
    }
    if s.s.heldout_every > 0 && subject.test_images.is_empty() && subject.photo_folder {
        bail!(
            "--heldout-every: the photos in {} have no test split to measure a held-out loss on. Fix: set some aside with --holdout K (e.g. --holdout 1), or drop --heldout-every",
            subject.dir.display()
        );
    }
    if s.s.heldout_every > 0 && subject.test_images.is_empty() {
        bail!(
            "--heldout-every: subject {} has no test images in {} to measure a held-out loss on. Fix: add test images (see `attractor dataset new`), or drop --heldout-every",
            subject.name,
            subject.dir.join("test").display()
        );
    }
    let b = &s.s.baseline;
    if method.uses_identifier()
        && (b.identifier.trim().is_empty() || b.identifier.contains(char::is_whitespace))
    {
        bail!(
            "--identifier {:?}: give one word, e.g. --identifier sks",
            b.identifier
        );
    }
    if method == Method::CustomDiffusion {
        if !(b.modifier_token.starts_with('<') && b.modifier_token.ends_with('>')) {
            bail!("--modifier-token {:?}: use a bracketed new token such as <new1>, which no CLIP word can collide with", b.modifier_token);
        }
        crate::pipeline::bundled_tokenizer()?
            .add_tokens(&[b.modifier_token.as_str()])
            .with_context(|| format!("--modifier-token {}", b.modifier_token))?;
    }
    Ok(())
}

/// Prior preservation's class images (generated from the base model on first use, cached in
/// attractor's cache folder) and the trainable weights, with one line per class image made.
fn prepare_baseline(
    sd: &mut crate::pipeline::StableDiffusion,
    s: &crate::personalize::settings::Resolved,
    subject: &crate::data::layout::Subject,
) -> Result<Vec<PathBuf>> {
    let method = s.s.method;
    if !method.trains_weights() {
        return Ok(Vec::new());
    }
    let b = &s.s.baseline;
    let root = crate::personalize::prior::cache_root();
    if s.prior_preservation() {
        eprintln!(
            "prior preservation: {} class images of {:?} ({} DDIM steps, guidance {}, {} px) in {}",
            b.prior_images,
            b.class_prompt(&subject.class),
            b.prior_steps,
            b.prior_guidance,
            s.s.resolution,
            root.join("class-images").display()
        );
    }
    let mut made = 0usize;
    let pb = progress(b.prior_images as u64, "class images");
    let paths = crate::personalize::trainer::prepare_model(
        sd,
        s,
        subject,
        &root,
        &mut |i, _n, generated| {
            made += generated as usize;
            pb.set_position(i as u64 + 1);
        },
    )?;
    pb.finish_and_clear();
    if made > 0 {
        eprintln!("generated {made} class images (the rest were cached)");
    }
    let vars = &sd.trainable;
    let count = crate::personalize::weights::parameter_count(vars);
    if method.weight_training() == crate::personalize::WeightTraining::FullUnet
        && sd.device.is_cpu()
    {
        let rows = s.batch * if s.prior_preservation() { 2 } else { 1 };
        let need = crate::personalize::weights::full_finetune_extra_bytes(
            count,
            rows,
            s.s.resolution,
            b.gradient_checkpointing,
        );
        if let Some(free) = crate::bench::mem_available_bytes() {
            if need > free {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                bail!(
                    "the full DreamBooth fine-tune of {count} parameters needs about {:.1} GiB more for its gradients, AdamW moments and activations ({rows} UNet rows at {} px), and {:.1} GiB are available. Fix: --method dreambooth-lora (about 0.1 % of the parameters, as adapters){}, or a lower --resolution",
                    gib(need),
                    s.s.resolution,
                    gib(free),
                    if b.gradient_checkpointing { "" } else { ", --gradient-checkpointing" }
                );
            }
        }
    }
    eprintln!(
        "{method} trains {count} parameters in {} tensors{}",
        vars.len(),
        match method.weight_training() {
            crate::personalize::WeightTraining::Lora => format!(
                " (LoRA rank {}, alpha {}: effective scale alpha/r = {})",
                b.lora_rank,
                b.lora_alpha.unwrap_or(b.lora_rank as f64),
                b.lora_scale()
            ),
            _ => String::new(),
        }
    );
    Ok(paths)
}

/// Validation images with fixed seeds (0, 1) at `validation_steps` DDIM steps.
fn validate(trainer: &Trainer, out: &Path, step: usize) -> Result<()> {
    let subj = LearnedSubject::from_trainer(trainer);
    let s = &trainer.info.settings.s;
    let settings = SampleSettings {
        steps: s.validation_steps,
        height: s.resolution,
        width: s.resolution,
        ..SampleSettings::default()
    };
    for seed in 0..2u64 {
        let img = subj.generate(
            trainer.sd,
            &settings,
            &s.validation_prompt,
            None,
            None,
            seed,
            &mut |_, _| {},
        )?;
        crate::files::save_png(
            &img,
            &out.join(format!("validation/step-{step}-seed-{seed}.png")),
        )?;
    }
    Ok(())
}
