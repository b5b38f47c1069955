//! `attractor sample`: generate images from a prompt, optionally with a learned subject
//! (`--run RUN_DIR`, `{}` in the prompt stands for it).

use super::ranges;
use super::Common;
use crate::hub::{self, ModelSource};
use crate::pipeline::{SampleSettings, StableDiffusion};
use crate::ranges::Range;
use crate::sd::samplers::SamplerKind;
use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    #[command(flatten)]
    pub common: Common,
    /// The prompt; with --run, `{}` stands for the learned subject.
    #[arg(long)]
    pub prompt: String,
    /// The unconditional (negative) prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Sampler steps.
    #[arg(long, default_value_t = 50, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5, value_parser = ranges::float(Range::NonNegative), allow_negative_numbers = true)]
    pub guidance: f64,
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    pub sampler: SamplerKind,
    /// How many images (image i uses seed + i).
    #[arg(long, default_value_t = 1, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub num_images: usize,
    /// Images per UNet call (2N rows with guidance). Image i still starts from seed + i, so the
    /// images do not depend on it. Default: 1 on the CPU; on CUDA, as many as fit in free memory.
    #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Image height in pixels (default: the UNet config's sample_size x 8, 512 for SD 1.5).
    #[arg(long, value_parser = ranges::int(Range::MultipleOf8), allow_negative_numbers = true)]
    pub height: Option<usize>,
    /// Image width in pixels (default as --height).
    #[arg(long, value_parser = ranges::int(Range::MultipleOf8), allow_negative_numbers = true)]
    pub width: Option<usize>,
    /// A training run folder (what `train --out` wrote): sample its learned subject.
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// NeTI: zero the mapper's hidden units from this index on (fewer = more editable).
    #[arg(long, value_parser = ranges::int(Range::Between(1, crate::personalize::neti::HIDDEN as u64)), allow_negative_numbers = true)]
    pub truncation: Option<usize>,
    /// Sample attractor K's learned background instead of the subject (`{}` -> `<aK*>`).
    #[arg(long, value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub attractor: Option<usize>,
    /// Apply a LoRA file (diffusers, peft or kohya/A1111 layout, made by attractor or another
    /// tool) at strength SCALE (default 1), folded into the weights; repeatable.
    #[arg(long, value_name = "FILE[:SCALE]")]
    pub lora: Vec<String>,
    /// Apply a Custom Diffusion folder (diffusers' `save_attn_procs` output and its
    /// `<new1>.safetensors`, or attractor's): its K/V weights, and its tokens for the prompt.
    #[arg(long, value_name = "DIR")]
    pub custom_diffusion: Option<PathBuf>,
}

/// `FILE[:SCALE]` of `--lora`: the scale is what follows the last `:` when it is a number.
pub fn parse_lora_spec(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((path, scale)) = spec.rsplit_once(':') {
        if let Ok(v) = scale.parse::<f64>() {
            if !v.is_finite() {
                anyhow::bail!("--lora {spec}: the scale must be a finite number");
            }
            return Ok((PathBuf::from(path), v));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

pub fn model_source(common: &Common) -> Result<ModelSource> {
    let m = common.model.as_deref().unwrap_or(hub::SD15_REPO);
    ModelSource::parse(m, "main").map_err(|e| anyhow::anyhow!("--model: {e}"))
}

/// Load SD 1.5 as `--model`/`--offline`/`--device`/`--dtype` say.
pub fn load_model(common: &Common) -> Result<StableDiffusion> {
    load_model_in(common, common.dtype()?)
}

/// Load SD 1.5 as `--model`/`--offline`/`--device` say, in `dtype`.
pub fn load_model_in(common: &Common, dtype: DType) -> Result<StableDiffusion> {
    let source = model_source(common)?;
    let files = hub::resolve_sd(&source, common.offline())?;
    let device = common.device()?;
    StableDiffusion::open(&files, &device, dtype)
}

pub fn progress(len: u64, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb
}

pub fn run(args: &SampleArgs) -> Result<()> {
    let out = args
        .common
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("samples"));
    let specs = args
        .lora
        .iter()
        .map(|l| parse_lora_spec(l))
        .collect::<Result<Vec<_>>>()?;
    for (p, _) in &specs {
        if !p.is_file() {
            anyhow::bail!("--lora {}: no such file", p.display());
        }
    }
    if let Some(d) = &args.custom_diffusion {
        if !d.is_dir() {
            anyhow::bail!("--custom-diffusion {}: not a folder (give the folder holding pytorch_custom_diffusion_weights.safetensors)", d.display());
        }
    }
    let mut sd = load_model(&args.common)?;
    for (p, scale) in &specs {
        let known = crate::personalize::weights::lora_targets(&mut sd);
        let (lora, layout) = crate::adapters::lora::read(p, &known, &sd.device)?;
        crate::personalize::weights::apply_lora(&mut sd, &lora, *scale, &p.display().to_string())?;
        eprintln!(
            "applied {} ({layout:?} layout, {} modules) at strength {scale}",
            p.display(),
            lora.modules.len()
        );
    }
    let mut extra = None;
    if let Some(d) = &args.custom_diffusion {
        let cd = crate::adapters::custom_diffusion::read_folder(d, "", &sd.device)?;
        crate::personalize::weights::apply_custom_diffusion(
            &mut sd,
            &cd.kv,
            &d.display().to_string(),
        )?;
        let names: Vec<String> = cd.tokens.iter().map(|(t, _)| t.clone()).collect();
        let vocab = sd.text.config.vocab_size as u32;
        crate::personalize::trainer::add_tokens_after(&mut sd.tokenizer, &names, vocab)
            .with_context(|| format!("--custom-diffusion {}", d.display()))?;
        let rows: Vec<candle_core::Tensor> = cd.tokens.iter().map(|(_, r)| r.clone()).collect();
        extra = Some(candle_core::Tensor::cat(&rows, 0)?.to_dtype(sd.dtype)?);
        eprintln!(
            "applied {} ({} K/V weights; tokens {})",
            d.display(),
            cd.kv.len(),
            names.join(", ")
        );
    }
    let sd = sd;
    let native = sd.unet.config.sample_size * 8;
    let settings = SampleSettings {
        steps: args.steps,
        guidance: args.guidance,
        sampler: args.sampler,
        height: args.height.unwrap_or(native),
        width: args.width.unwrap_or(args.height.unwrap_or(native)),
        negative_prompt: args.negative_prompt.clone(),
    };
    let seed = args.common.seed.unwrap_or(0);
    let subject = match &args.run {
        Some(run) => Some(crate::personalize::generate::LearnedSubject::open(
            run, &sd,
        )?),
        None => {
            if args.truncation.is_some() || args.attractor.is_some() {
                anyhow::bail!(
                    "--truncation and --attractor need --run RUN_DIR (a trained subject)"
                );
            }
            None
        }
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let batch = args
        .batch
        .unwrap_or_else(|| {
            subject
                .as_ref()
                .map_or(&sd, |s| s.model(&sd))
                .default_batch(&settings)
        })
        .min(args.num_images);
    let mut written = Vec::new();
    let indices: Vec<usize> = (0..args.num_images).collect();
    for chunk in indices.chunks(batch) {
        let seeds: Vec<u64> = chunk.iter().map(|&i| seed + i as u64).collect();
        let msg = match chunk {
            [i] => format!("image {}/{}", i + 1, args.num_images),
            _ => format!(
                "images {}-{}/{}",
                chunk[0] + 1,
                chunk[chunk.len() - 1] + 1,
                args.num_images
            ),
        };
        let pb = progress(settings.steps as u64, &msg);
        let mut on_step = |k: usize, _n: usize| pb.set_position(k as u64);
        let requests: Vec<(&str, u64)> = seeds.iter().map(|&s| (args.prompt.as_str(), s)).collect();
        let images = match &subject {
            Some(subj) => subj.generate_batch(
                &sd,
                &settings,
                &requests,
                args.attractor,
                args.truncation,
                &mut on_step,
            )?,
            None => sd.generate_batch(&settings, &requests, extra.as_ref(), &mut on_step)?,
        };
        pb.finish_and_clear();
        for ((&i, &s), img) in chunk.iter().zip(&seeds).zip(images) {
            let path = out.join(format!("{i:03}-seed{s}.png"));
            crate::files::save_png(&img, &path)?;
            eprintln!("wrote {}", path.display());
            written.push(path.display().to_string());
        }
    }
    let record = serde_json::json!({
        "model": sd.id,
        "dtype": sd.dtype.as_str(),
        "prompt": args.prompt,
        "seed": seed,
        "batch": batch,
        "settings": settings,
        "run": args.run,
        "truncation": args.truncation,
        "attractor": args.attractor,
        "lora": args.lora,
        "custom_diffusion": args.custom_diffusion,
        "images": written,
    });
    crate::files::atomic_write(
        &out.join("sample.json"),
        serde_json::to_string_pretty(&record)?.as_bytes(),
    )?;
    Ok(())
}
