//! Step benchmarks on random weights of the real SD 1.5 size: a Textual Inversion training step,
//! a NeTI-style training step and a guided sampling step, timed as SPEC.md §7's PyTorch reference
//! was (text encoder + UNet forward, MSE, backward to the learned rows; UNet forward on batch 2),
//! and the full `attractor train` steps of ti+ and neti+ (the [`Trainer`] itself: three prompt
//! pools, masked losses, InfoNCE, AdamW) on a generated two-image subject.
//!
//! The models are built from the shipped `configs/sd15/*/config.json` through a [`VarBuilder`]
//! whose backend generates every tensor from a seed and its name ([`RandomWeights`]), so no
//! checkpoint is needed and two runs see the same bytes. Weights are plain tensors (frozen, no
//! gradient), exactly as when loaded from a checkpoint; only the inputs the step trains are
//! [`Var`]s. Peak memory is the process's `VmHWM`, so each case is meant to run in a fresh
//! process (the `bench` verb re-executes itself per case).

use crate::data::layout::{Kind, Subject};
use crate::personalize::method::Method;
use crate::personalize::neti;
use crate::personalize::settings::TrainSettings;
use crate::personalize::trainer::Trainer;
use crate::pipeline::{bundled_tokenizer, StableDiffusion};
use crate::rng::Rng;
use crate::sd::schedule::{NoiseSchedule, SchedulerConfig};
use crate::sd::text_encoder::{TextConfig, TextEncoder};
use crate::sd::unet::{Conditioning, UNet, UNetConfig};
use crate::sd::vae::{Vae, VaeConfig};
use anyhow::Context;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// SD 1.5's `unet/config.json`, as published (stable-diffusion-v1-5, main).
pub const SD15_UNET_CONFIG: &str = include_str!("../configs/sd15/unet/config.json");
/// SD 1.5's `text_encoder/config.json`, as published.
pub const SD15_TEXT_CONFIG: &str = include_str!("../configs/sd15/text_encoder/config.json");
/// SD 1.5's `vae/config.json`, as published.
pub const SD15_VAE_CONFIG: &str = include_str!("../configs/sd15/vae/config.json");
/// SD 1.5's `scheduler/scheduler_config.json`, as published.
pub const SD15_SCHEDULER_CONFIG: &str =
    include_str!("../configs/sd15/scheduler/scheduler_config.json");

/// The configs a bench builds its random-weight models from.
#[derive(Clone, Debug)]
pub struct BenchConfigs {
    pub text: TextConfig,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub scheduler: SchedulerConfig,
}

impl BenchConfigs {
    /// Parse the four configs (JSON text); `origin` names them in errors.
    pub fn parse(
        text: &str,
        unet: &str,
        vae: &str,
        scheduler: &str,
        origin: &str,
    ) -> anyhow::Result<Self> {
        let unet: UNetConfig = serde_json::from_str(unet)
            .with_context(|| format!("unet/config.json of {origin} is not a UNet config"))?;
        unet.validate()
            .with_context(|| format!("unet/config.json of {origin}"))?;
        Ok(Self {
            text: serde_json::from_str(text).with_context(|| {
                format!("text_encoder/config.json of {origin} is not a CLIP text config")
            })?,
            unet,
            vae: serde_json::from_str(vae)
                .with_context(|| format!("vae/config.json of {origin} is not a VAE config"))?,
            scheduler: serde_json::from_str(scheduler).with_context(|| {
                format!("scheduler/scheduler_config.json of {origin} is not a scheduler config")
            })?,
        })
    }

    /// SD 1.5's published configs, shipped in the binary.
    pub fn sd15() -> anyhow::Result<Self> {
        Self::parse(
            SD15_TEXT_CONFIG,
            SD15_UNET_CONFIG,
            SD15_VAE_CONFIG,
            SD15_SCHEDULER_CONFIG,
            "the bundled SD 1.5 configs",
        )
    }

    /// The configs of a diffusers-layout folder (weights are not read).
    pub fn from_dir(dir: &std::path::Path) -> anyhow::Result<Self> {
        let read = |rel: &str| {
            let p = dir.join(rel);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Self::parse(
            &read("text_encoder/config.json")?,
            &read("unet/config.json")?,
            &read("vae/config.json")?,
            &read("scheduler/scheduler_config.json")?,
            &dir.display().to_string(),
        )
    }
}

/// Standard deviation of the random weights: small enough that activations stay finite through
/// the 12 text layers and the UNet, as in CLIP's own initialiser (`initializer_range` 0.02).
pub const DEFAULT_STD: f64 = 0.02;

/// The NeTI bypass strength (SPEC.md §4).
const NETI_ALPHA: f64 = 0.2;

/// What one benchmark case times.
#[derive(
    clap::ValueEnum,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum Case {
    /// Textual Inversion step: text encoder + UNet forward on batch 1, MSE on the noise,
    /// backward to one learned token row.
    #[value(name = "ti")]
    #[serde(rename = "ti")]
    Ti,
    /// NeTI-style step: the text encoder on 16 prompts at once (one learned word vector per
    /// cross-attention layer, with the textual bypass on the values), the UNet with per-layer
    /// key/value contexts, MSE, backward to the 16 mapper outputs `[16, 1536]`.
    #[value(name = "neti")]
    #[serde(rename = "neti")]
    Neti,
    /// One `attractor train --method ti+` optimizer step at batch 1: the UNet on the three prompt
    /// pools (batch 3), the masked losses and InfoNCE, backward, AdamW.
    #[value(name = "ti+")]
    #[serde(rename = "ti+")]
    TiPlus,
    /// One `attractor train --method neti+` optimizer step at batch 1: as `ti+`, with the NeTI
    /// mappers (16 layers x 3 prompts in one text pass, nested dropout, textual bypass).
    #[value(name = "neti+")]
    #[serde(rename = "neti+")]
    NetiPlus,
    /// One guided sampling step: UNet forward on batch 2 (unconditional + conditional), no
    /// gradient.
    #[value(name = "sample")]
    #[serde(rename = "sample")]
    Sample,
    /// One `attractor train --method dreambooth` step: every UNet weight trained, batch 1 plus
    /// one class image (UNet batch 2), prior-preservation loss, backward, grad-norm clipping,
    /// AdamW.
    #[value(name = "dreambooth")]
    #[serde(rename = "dreambooth")]
    DreamBooth,
    /// One `attractor train --method dreambooth-lora` step: rank-4 LoRA on the 128 attention
    /// projections, UNet batch 2 (instance + class), clipping, AdamW.
    #[value(name = "dreambooth-lora")]
    #[serde(rename = "dreambooth-lora")]
    DreamBoothLora,
    /// One `attractor train --method custom-diffusion` step: the 32 cross-attention K/V weights
    /// and the modifier row, batch 2 plus two class images (UNet batch 4), clipping, AdamW.
    #[value(name = "custom-diffusion")]
    #[serde(rename = "custom-diffusion")]
    CustomDiffusion,
    /// One `train --heldout-every` evaluation of one image for a ti run: the
    /// [`HeldOutSet`](crate::personalize::heldout::HeldOutSet) loss at its 8 fixed timesteps,
    /// forward only, in chunks of the ti step's UNet rows (1). A run's evaluation costs this
    /// times its test plus training images; set it beside the `ti+` or `ti` step.
    #[value(name = "heldout")]
    #[serde(rename = "heldout")]
    HeldOut,
    /// One guided sampling step of a batch of images through the pipeline's own
    /// `StableDiffusion::denoise` (`eval/sample --batch N`): the UNet on 2N rows, guidance and
    /// the DDIM update, text encoding and VAE decode left out (once per image, not per step).
    /// Run at each of `bench --batches`; the report divides by N for the cost per image-step.
    #[value(name = "generate")]
    #[serde(rename = "generate")]
    Generate,
}

impl Case {
    pub const ALL: [Case; 10] = [
        Case::Ti,
        Case::Neti,
        Case::TiPlus,
        Case::NetiPlus,
        Case::Sample,
        Case::DreamBooth,
        Case::DreamBoothLora,
        Case::CustomDiffusion,
        Case::HeldOut,
        Case::Generate,
    ];

    /// What `bench` runs without `--cases`: all but the full DreamBooth fine-tune, whose
    /// weights, gradients and AdamW moments alone take 13.8 GB at SD 1.5's size, and the
    /// held-out evaluation (`--cases ti+,heldout` sets it beside a training step).
    pub const DEFAULT: [Case; 7] = [
        Case::Ti,
        Case::Neti,
        Case::TiPlus,
        Case::NetiPlus,
        Case::Sample,
        Case::DreamBoothLora,
        Case::CustomDiffusion,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::Ti => "ti",
            Case::Neti => "neti",
            Case::TiPlus => "ti+",
            Case::NetiPlus => "neti+",
            Case::Sample => "sample",
            Case::DreamBooth => "dreambooth",
            Case::DreamBoothLora => "dreambooth-lora",
            Case::CustomDiffusion => "custom-diffusion",
            Case::HeldOut => "heldout",
            Case::Generate => "generate",
        }
    }

    /// True when the case runs a backward pass.
    pub fn trains(self) -> bool {
        !matches!(self, Case::Sample | Case::HeldOut | Case::Generate)
    }

    /// The training method whose real [`Trainer`] step this case times, if it is one.
    pub fn trainer_method(self) -> Option<Method> {
        match self {
            Case::TiPlus => Some(Method::TiPlus),
            Case::NetiPlus => Some(Method::NetiPlus),
            Case::DreamBooth => Some(Method::DreamBooth),
            Case::DreamBoothLora => Some(Method::DreamBoothLora),
            Case::CustomDiffusion => Some(Method::CustomDiffusion),
            _ => None,
        }
    }
}

/// PyTorch 2.15 on this 2-core machine (SPEC.md §7: diffusers 0.42 + transformers 5.24, f32,
/// random SD 1.5-size weights, median of 2-3 runs): `(seconds, peak RSS in GiB if measured)`.
pub fn pytorch_reference(case: Case, size: usize) -> Option<(f64, Option<f64>)> {
    match (case, size) {
        (Case::Ti, 256) => Some((4.3, Some(5.1))),
        (Case::Ti, 512) => Some((13.1, Some(6.3))),
        (Case::Sample, 256) => Some((3.6, None)),
        (Case::Sample, 512) => Some((12.2, None)),
        _ => None,
    }
}

/// A [`SimpleBackend`] that makes up every tensor it is asked for: uniform values with standard
/// deviation `std`, from a stream seeded by `(seed, name)`, so a tensor does not depend on the
/// order the model asks for them. Normalisation layers get weight 1 and bias 0 (their
/// initialisation in PyTorch), which keeps activations at unit scale.
#[derive(Clone, Debug)]
pub struct RandomWeights {
    pub seed: u64,
    pub std: f64,
}

impl RandomWeights {
    /// A [`VarBuilder`] over these random tensors.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The weights, in `dtype`, of one model part (`"unet"`, ...) of the models seeded `seed`,
    /// at [`DEFAULT_STD`]: each part draws from its own stream (drawn in f32, then cast).
    pub fn part(seed: u64, part: &str, dtype: DType, device: &Device) -> VarBuilder<'static> {
        RandomWeights {
            seed: Rng::derive_seed(&[&seed.to_string(), part]),
            std: DEFAULT_STD,
        }
        .var_builder(dtype, device)
    }

    fn values(&self, name: &str, n: usize) -> Vec<f32> {
        let leaf = name.rsplit('.').nth(1).unwrap_or("");
        let last = name.rsplit('.').next().unwrap_or("");
        if leaf.contains("norm") {
            return vec![if last == "weight" { 1.0 } else { 0.0 }; n];
        }
        // SplitMix64: plenty for weights, and fast enough for SD 1.5's ~1e9 values.
        let mut state = Rng::derive_seed(&[&self.seed.to_string(), name]);
        let half_width = (self.std * 3f64.sqrt()) as f32;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                (2.0 * u - 1.0) * half_width
            })
            .collect()
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let v = self.values(name, s.elem_count());
        Tensor::from_vec(v, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: {name} was requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The frozen models a case runs.
pub struct BenchModels {
    pub text_encoder: TextEncoder,
    pub unet: UNet,
}

impl BenchModels {
    /// Build the text encoder and the UNet from their configs with [`RandomWeights`] in `dtype`.
    pub fn random(
        text_cfg: &TextConfig,
        unet_cfg: &UNetConfig,
        seed: u64,
        (device, dtype): (&Device, DType),
    ) -> Result<Self> {
        let weights = |part| RandomWeights::part(seed, part, dtype, device);
        Ok(Self {
            text_encoder: TextEncoder::new(weights("text_encoder"), text_cfg)?,
            unet: UNet::new(weights("unet"), unet_cfg)?,
        })
    }
}

/// Wall-clock times of one run of a case, in seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunTimes {
    /// Forward pass (text encoder + UNet + loss; the UNet alone for `sample`).
    pub forward_s: f64,
    /// Backward pass (0 for `sample`).
    pub backward_s: f64,
    /// CPU time (user + system, all threads) of the whole run: less sensitive than wall time to
    /// other processes sharing the cores, but it counts the thread pool's spin-waits.
    #[serde(default)]
    pub cpu_s: f64,
}

impl RunTimes {
    pub fn total_s(&self) -> f64 {
        self.forward_s + self.backward_s
    }
}

/// Median of a non-empty list (the mean of the two middle values for even lengths); `NaN` when
/// empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The fixed inputs of a case at one image size.
pub struct CaseInputs {
    case: Case,
    /// Noisy latents `[B, 4, size/8, size/8]`.
    latents: Tensor,
    /// The regression target (the noise).
    target: Tensor,
    /// Per-sample timesteps `[B]`.
    t: Tensor,
    /// Token ids `[B, 77]` with one placeholder id (= vocab size) after "a photo of a".
    ids: Tensor,
    placeholder_pos: usize,
    /// The initial trainable rows: `[1, D]` (ti) or `[16, 2D]` (neti: word + bypass).
    init_rows: Tensor,
    /// Conditioning for `sample`: `[2, 77, D]`.
    context: Tensor,
}

impl CaseInputs {
    pub fn new(models: &BenchModels, case: Case, size: usize, seed: u64) -> Result<Self> {
        if size == 0 || !size.is_multiple_of(8) {
            candle_core::bail!("image size {size} is not a positive multiple of 8");
        }
        let dev = models.text_encoder.device().clone();
        let tc = &models.text_encoder.config;
        let d = tc.hidden_size;
        let len = tc.max_position_embeddings;
        let layers = models.unet.config.num_cross_attention_layers();
        let mut rng = Rng::new(Rng::derive_seed(&[
            "bench",
            case.name(),
            &size.to_string(),
            &seed.to_string(),
        ]));
        let batch = if case == Case::Sample { 2 } else { 1 };
        let h = size / 8;
        let c = models.unet.config.in_channels;
        let dtype = models.unet.dtype();
        let latents = rng.randn((batch, c, h, h), &dev)?.to_dtype(dtype)?;
        let target = rng.randn((batch, models.unet.config.out_channels, h, h), &dev)?;
        let t = Tensor::from_vec(vec![500u32; batch], batch, &dev)?;
        // "a photo of a <v*>": BOS, four words, the placeholder, EOS padding (CLIP's ids).
        let placeholder = tc.vocab_size as u32;
        let placeholder_pos = 5;
        let mut row = vec![49406u32, 320, 1125, 539, 320, placeholder];
        row.resize(len, 49407);
        let text_rows = match case {
            Case::Neti => layers,
            _ => 1,
        };
        let ids = Tensor::from_vec(row.repeat(text_rows), (text_rows, len), &dev)?;
        let init_rows = match case {
            Case::Neti => (rng.randn((layers, 2 * d), &dev)? * 0.02)?,
            _ => (rng.randn((1, d), &dev)? * 0.02)?,
        };
        let context = rng.randn((2, len, d), &dev)?.to_dtype(dtype)?;
        Ok(Self {
            case,
            latents,
            target,
            t,
            ids,
            placeholder_pos,
            init_rows,
            context,
        })
    }
}

/// Run a case once: forward (and backward for the training cases), checking that the learned
/// rows get a finite, non-zero gradient.
pub fn run_once(models: &BenchModels, inputs: &CaseInputs) -> Result<RunTimes> {
    let cpu0 = process_cpu_seconds();
    // On the CPU this runs the step inside candle's thread pool, so its parallel sections find
    // warm workers (and this thread among them) instead of waking the global pool each time.
    let device = models.text_encoder.device().clone();
    let mut r = device.with_context(|| run_timed(models, inputs))?;
    r.cpu_s = process_cpu_seconds() - cpu0;
    Ok(r)
}

/// CPU time this process has used so far (user + system), in seconds; 0 where unavailable.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn run_timed(models: &BenchModels, inputs: &CaseInputs) -> Result<RunTimes> {
    let te = &models.text_encoder;
    let unet = &models.unet;
    let start = Instant::now();
    match inputs.case {
        Case::TiPlus
        | Case::NetiPlus
        | Case::DreamBooth
        | Case::DreamBoothLora
        | Case::CustomDiffusion
        | Case::HeldOut
        | Case::Generate => {
            candle_core::bail!("the {} case runs through the trainer", inputs.case.name())
        }
        Case::Sample => {
            let out = unet.forward(
                &inputs.latents,
                &inputs.t,
                &Conditioning::Shared(inputs.context.clone()),
            )?;
            // Classifier-free guidance on the two halves, as a sampler does.
            let u = out.narrow(0, 0, 1)?;
            let c = out.narrow(0, 1, 1)?;
            let eps = (&u + ((&c - &u)? * 7.5)?)?;
            check_finite("guided noise prediction", &eps)?;
            Ok(RunTimes {
                forward_s: start.elapsed().as_secs_f64(),
                ..Default::default()
            })
        }
        Case::Ti => {
            let rows = Var::from_tensor(&inputs.init_rows)?;
            let ctx = te.forward(&inputs.ids, Some(rows.as_tensor()))?;
            let out = unet.forward(&inputs.latents, &inputs.t, &Conditioning::Shared(ctx))?;
            let loss = (out.to_dtype(DType::F32)? - &inputs.target)?
                .sqr()?
                .mean_all()?;
            backward_to(loss, rows, start)
        }
        Case::Neti => {
            let out_rows = Var::from_tensor(&inputs.init_rows)?;
            let (layers, two_d) = out_rows.dims2()?;
            let d = two_d / 2;
            let word = out_rows.narrow(1, 0, d)?.unsqueeze(1)?; // [16, 1, D]
            let bypass = out_rows.narrow(1, d, d)?; // [16, D]
            let emb = te.embed_tokens(&inputs.ids, Some(&word))?;
            // The 16 copies of the prompt share their rows before <v*>, as in the trainer.
            let ids: Vec<Vec<u32>> = inputs.ids.to_dtype(DType::U32)?.to_vec2()?;
            let e = crate::personalize::concept::encode_by_prompt(te, &ids, &emb)?; // [16, 77, D]
            let pos = vec![inputs.placeholder_pos; layers];
            let keys = te.final_layer_norm(&e)?;
            let values = te.final_layer_norm(&neti::bypass(&e, &pos, &bypass, NETI_ALPHA)?)?;
            let cond = Conditioning::PerLayer(
                (0..layers)
                    .map(|l| Ok((keys.narrow(0, l, 1)?, values.narrow(0, l, 1)?)))
                    .collect::<Result<Vec<_>>>()?,
            );
            let out = unet.forward(&inputs.latents, &inputs.t, &cond)?;
            let loss = (out.to_dtype(DType::F32)? - &inputs.target)?
                .sqr()?
                .mean_all()?;
            backward_to(loss, out_rows, start)
        }
    }
}

fn backward_to(loss: Tensor, rows: Var, start: Instant) -> Result<RunTimes> {
    check_finite("loss", &loss)?;
    let forward_s = start.elapsed().as_secs_f64();
    let mid = Instant::now();
    let grads = loss.backward()?;
    let grad = grads
        .get(rows.as_tensor())
        .ok_or_else(|| candle_core::Error::Msg("the learned rows got no gradient".into()))?;
    check_finite("gradient", grad)?;
    let gmax = grad.abs()?.max_all()?.to_scalar::<f32>()?;
    if gmax == 0.0 {
        candle_core::bail!("the gradient to the learned rows is zero");
    }
    drop(grads);
    Ok(RunTimes {
        forward_s,
        backward_s: mid.elapsed().as_secs_f64(),
        ..Default::default()
    })
}

fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    let s = t
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if !s.is_finite() {
        candle_core::bail!("the {what} is not finite: the random weights blew up");
    }
    Ok(())
}

/// Peak resident memory of this process so far (`VmHWM` of `/proc/self/status`), in bytes;
/// `None` where procfs is missing.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|k| k * 1024)
}

/// Memory the kernel reports as available for new work (`MemAvailable` of `/proc/meminfo`), in
/// bytes; `None` where procfs is missing.
pub fn mem_available_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kib(&s, "MemAvailable:").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_kib(&s, key)
}

fn parse_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The measurement of one case at one size, as a child process reports it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseResult {
    pub case: Case,
    pub size: usize,
    /// Images per step (the `generate` case); `None` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Every run, in order.
    pub runs: Vec<RunTimes>,
    /// Median of the runs' totals, seconds.
    pub median_s: f64,
    pub median_forward_s: f64,
    pub median_backward_s: f64,
    /// Median CPU seconds (all threads) per run.
    #[serde(default)]
    pub median_cpu_s: f64,
    /// Seconds to build the random-weight models (not part of any run).
    pub build_s: f64,
    /// Peak resident memory of the whole process (models included), bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// Build the models, run `case` at `size` `warmup` times untimed (the first step also touches
/// every weight and grows the allocator's heap; PyTorch's script warms up the same way), then
/// `runs` times timed. `batch`: images per step of the `generate` case (ignored by the others).
pub fn measure(
    cfgs: &BenchConfigs,
    case: Case,
    size: usize,
    batch: usize,
    (warmup, runs): (usize, usize),
    seed: u64,
    (device, dtype): (&Device, DType),
) -> anyhow::Result<CaseResult> {
    crate::pipeline::check_dtype(dtype, device)?;
    if runs == 0 {
        anyhow::bail!("runs must be at least 1");
    }
    let start = Instant::now();
    let (all, build_s) = match case.trainer_method() {
        None if case == Case::Generate => {
            if batch == 0 {
                anyhow::bail!("the generate case needs a batch of at least 1 image");
            }
            let sd = random_sd(cfgs, seed, (device, dtype))?;
            let s = crate::pipeline::SampleSettings {
                steps: 1,
                height: size,
                width: size,
                ..Default::default()
            };
            let seeds: Vec<u64> = (0..batch as u64).map(|i| seed + i).collect();
            let latents = sd.initial_latents_batch(&s, &seeds)?;
            let uncond = sd.encode_prompt("", None)?;
            let ids = sd.tokenize("a photo of a dog")?.repeat((batch, 1))?;
            let cond = Conditioning::Shared(sd.text.forward(&ids, None)?);
            let build_s = start.elapsed().as_secs_f64();
            let all = time_forward(device, (warmup, runs), || {
                let out = sd.denoise(
                    &s,
                    latents.clone(),
                    &uncond,
                    &mut |_| Ok(cond.clone()),
                    &mut |_, _| {},
                )?;
                // Reading the sum back waits for the device and checks the step's output.
                let total = out.sum_all()?.to_scalar::<f32>()?;
                if !total.is_finite() {
                    anyhow::bail!("the generated latents are not finite");
                }
                Ok(())
            })?;
            (all, build_s)
        }
        None if case == Case::HeldOut => {
            let sd = random_sd(cfgs, seed, (device, dtype))?;
            let subject = BenchSubject::create(seed)?;
            let settings = TrainSettings {
                method: Method::Ti,
                batch: Some(1),
                grad_accum: Some(1),
                resolution: size,
                seed,
                ..Default::default()
            }
            .resolve()?;
            let trainer = Trainer::new(&sd, settings, &subject.subject, &subject.root)?;
            let set = crate::personalize::heldout::HeldOutSet::encode(
                &sd,
                &subject.subject.train_images[..1],
                size,
            )?;
            let chunk = trainer.unet_rows_per_step();
            let build_s = start.elapsed().as_secs_f64();
            let all = time_forward(device, (warmup, runs), || {
                if !set.loss(&trainer, chunk)?.is_finite() {
                    anyhow::bail!("the held-out loss is not finite");
                }
                Ok(())
            })?;
            (all, build_s)
        }
        None => {
            let models = BenchModels::random(&cfgs.text, &cfgs.unet, seed, (device, dtype))?;
            let inputs = CaseInputs::new(&models, case, size, seed)?;
            let build_s = start.elapsed().as_secs_f64();
            for _ in 0..warmup {
                run_once(&models, &inputs)?;
            }
            let mut all = Vec::with_capacity(runs);
            for _ in 0..runs {
                all.push(run_once(&models, &inputs)?);
            }
            (all, build_s)
        }
        Some(method) => {
            let mut sd = random_sd(cfgs, seed, (device, dtype))?;
            let subject = BenchSubject::create(seed)?;
            let mut settings = TrainSettings {
                method,
                // Custom Diffusion's recipe trains at batch 2, the others at 1.
                batch: Some(if method == Method::CustomDiffusion {
                    2
                } else {
                    1
                }),
                grad_accum: Some(1),
                resolution: size,
                seed,
                ..Default::default()
            };
            settings.baseline.prior_images = 1;
            let settings = settings.resolve()?;
            // The baselines' class images: the subject's own random pictures stand in for
            // generated ones (their content does not change a step's cost).
            crate::personalize::weights::make_trainable(&mut sd, &settings)?;
            let sd = sd;
            let mut trainer = Trainer::new(&sd, settings, &subject.subject, &subject.root)?;
            if method.uses_prior() {
                trainer.set_class_images(&subject.subject.train_images)?;
            }
            let build_s = start.elapsed().as_secs_f64();
            let mut all = Vec::with_capacity(runs);
            for i in 0..warmup + runs {
                let cpu0 = process_cpu_seconds();
                let log = device.with_context(|| trainer.train_step())?;
                if !log.loss.is_finite() {
                    anyhow::bail!("the {} loss is not finite", case.name());
                }
                if i < warmup {
                    continue;
                }
                let (forward_s, backward_s) = trainer.last_step_seconds;
                all.push(RunTimes {
                    forward_s,
                    backward_s,
                    cpu_s: process_cpu_seconds() - cpu0,
                });
            }
            (all, build_s)
        }
    };
    let pick = |f: fn(&RunTimes) -> f64| median(&all.iter().map(f).collect::<Vec<_>>());
    Ok(CaseResult {
        case,
        size,
        batch: (case == Case::Generate).then_some(batch),
        median_s: pick(RunTimes::total_s),
        median_forward_s: pick(|r| r.forward_s),
        median_backward_s: pick(|r| r.backward_s),
        median_cpu_s: pick(|r| r.cpu_s),
        runs: all,
        build_s,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Run a forward-only case `warmup` times untimed, then `runs` times timed (wall and CPU
/// seconds), each inside `device`'s context as [`run_once`] runs the others.
fn time_forward(
    device: &Device,
    (warmup, runs): (usize, usize),
    mut once: impl FnMut() -> anyhow::Result<()> + Send,
) -> anyhow::Result<Vec<RunTimes>> {
    let mut all = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let cpu0 = process_cpu_seconds();
        let t0 = Instant::now();
        device.with_context(&mut once)?;
        if i >= warmup {
            all.push(RunTimes {
                forward_s: t0.elapsed().as_secs_f64(),
                backward_s: 0.0,
                cpu_s: process_cpu_seconds() - cpu0,
            });
        }
    }
    Ok(all)
}

/// The whole model bundle (text encoder, UNet, VAE, schedule, bundled tokenizer) with
/// [`RandomWeights`], as the trainer takes it.
pub fn random_sd(
    cfgs: &BenchConfigs,
    seed: u64,
    (device, dtype): (&Device, DType),
) -> anyhow::Result<StableDiffusion> {
    let BenchModels { text_encoder, unet } =
        BenchModels::random(&cfgs.text, &cfgs.unet, seed, (device, dtype))?;
    Ok(StableDiffusion {
        tokenizer: bundled_tokenizer()?,
        text: text_encoder,
        unet,
        vae: Vae::new(RandomWeights::part(seed, "vae", dtype, device), &cfgs.vae)?,
        vae_config: cfgs.vae.clone(),
        schedule: NoiseSchedule::new(&cfgs.scheduler)?,
        scheduler_config: cfgs.scheduler.clone(),
        device: device.clone(),
        dtype,
        id: "random weights (bench)".into(),
        source: crate::pipeline::WeightSource::Random { seed },
        trainable: Vec::new(),
    })
}

/// A two-image subject made up for the trainer cases (random pixels, a centred square mask),
/// in a temporary folder removed on drop. The images' content does not change a step's cost.
struct BenchSubject {
    root: std::path::PathBuf,
    subject: Subject,
}

impl BenchSubject {
    const IMAGES: usize = 2;
    const SIDE: u32 = 64;

    fn create(seed: u64) -> anyhow::Result<Self> {
        let root =
            std::env::temp_dir().join(format!("attractor-bench-{}-{}", std::process::id(), seed));
        let dir = root.join("bench_subject");
        std::fs::create_dir_all(dir.join("masks"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut rng = Rng::new(Rng::derive_seed(&["bench subject", &seed.to_string()]));
        let n = Self::SIDE;
        let mut train_images = Vec::new();
        for i in 0..Self::IMAGES {
            let img = image::RgbImage::from_fn(n, n, |_, _| {
                image::Rgb([0; 3].map(|_: u8| (rng.uniform_f32() * 255.0) as u8))
            });
            let path = dir.join(format!("{i:02}.png"));
            crate::files::save_png(&img, &path)?;
            let mask = image::GrayImage::from_fn(n, n, |x, y| {
                let inside = (n / 4..3 * n / 4).contains(&x) && (n / 4..3 * n / 4).contains(&y);
                image::Luma([if inside { 255 } else { 0 }])
            });
            crate::files::save_png(&mask, &dir.join("masks").join(format!("{i:02}.png")))?;
            train_images.push(path);
        }
        let subject = Subject {
            name: "bench_subject".into(),
            class: "dog".into(),
            kind: Kind::Live,
            masks_dir: dir.join("masks"),
            dir,
            train_images,
            test_images: Vec::new(),
            captions: Default::default(),
            photo_folder: false,
        };
        Ok(Self { root, subject })
    }
}

impl Drop for BenchSubject {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn random_weights_are_deterministic_and_small() {
        let w = RandomWeights { seed: 7, std: 0.02 };
        let a = w.values("down_blocks.0.resnets.0.conv1.weight", 10_000);
        let b = w.values("down_blocks.0.resnets.0.conv1.weight", 10_000);
        let c = w.values("down_blocks.0.resnets.0.conv2.weight", 10_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "std {}", var.sqrt());
        assert_eq!(
            w.values("mid_block.resnets.0.norm1.weight", 3),
            vec![1.0; 3]
        );
        assert_eq!(
            w.values("text_model.final_layer_norm.bias", 2),
            vec![0.0; 2]
        );
    }

    #[test]
    fn parses_proc_fields() {
        let s = "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t 42 kB\n";
        assert_eq!(parse_kib(s, "VmHWM:"), Some(123456));
        assert_eq!(parse_kib(s, "VmPeak:"), None);
        assert!(peak_rss_bytes().unwrap_or(1) > 0);
    }

    #[test]
    fn shipped_configs_parse() {
        let c = BenchConfigs::sd15().unwrap();
        assert_eq!(c.unet.num_cross_attention_layers(), 16);
        assert_eq!(c.text.hidden_size, 768);
        assert_eq!(c.vae.block_out_channels.len(), 4);
    }

    /// The tiny fixture models run every case end to end (values finite, gradient present), in
    /// f32 and in f16 (`--dtype`); bf16 is refused on the CPU.
    #[test]
    fn every_case_runs_on_the_tiny_models() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd");
        let cfgs = BenchConfigs::from_dir(&root).unwrap();
        for dtype in [DType::F32, DType::F16] {
            for case in Case::ALL {
                let r = measure(&cfgs, case, 64, 3, (1, 2), 1, (&Device::Cpu, dtype)).unwrap();
                assert_eq!(r.runs.len(), 2);
                assert!(r.median_s > 0.0);
                assert_eq!(r.median_backward_s > 0.0, case.trains());
                assert_eq!(r.batch, (case == Case::Generate).then_some(3));
            }
        }
        let e = measure(
            &cfgs,
            Case::Ti,
            64,
            1,
            (0, 1),
            1,
            (&Device::Cpu, DType::BF16),
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("bf16 needs a CUDA device"));
    }
}
