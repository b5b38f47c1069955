//! Text-to-image with SD 1.5: load the model bundle from the files `crate::hub` found, encode
//! prompts (with learned token rows spliced in), run a sampler with classifier-free guidance, and
//! decode latents to images. Follows diffusers' `StableDiffusionPipeline.__call__`:
//! `eps = eps_u + g * (eps_c - eps_u)` on a batch of [unconditional, conditional].
//!
//! Several images can share the UNet calls (`--batch N`): their latents are stacked into `[N, ..]`
//! and the UNet runs on `2N` rows, `[N unconditional, N conditional]` (diffusers' order for
//! `num_images_per_prompt`), each row with its own prompt's context. Every image still starts
//! from its own seed's latents, and the samplers' updates are element-wise (DPM-Solver++'s
//! history is a tensor of the same rows), so row `i` of a batch follows the same path as the
//! image generated alone; latents are decoded one image at a time.

use crate::hub::SdFiles;
use crate::personalize::tokens::{ids_tensor, ClipTokenizer};
use crate::rng::Rng;
use crate::sd::samplers::{make_sampler, SamplerKind};
use crate::sd::schedule::{NoiseSchedule, SchedulerConfig};
use crate::sd::text_encoder::{TextConfig, TextEncoder};
use crate::sd::unet::{Conditioning, UNet, UNetConfig};
use crate::sd::vae::{Vae, VaeConfig};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The CLIP BPE tokenizer, bundled so that the binary works without it on disk.
pub const BUNDLED_TOKENIZER: &[u8] = include_bytes!("../assets/clip-tokenizer.json");

/// CLIP's tokenizer from the copy built into the binary.
pub fn bundled_tokenizer() -> Result<ClipTokenizer> {
    Ok(ClipTokenizer::new(
        tokenizers::Tokenizer::from_bytes(BUNDLED_TOKENIZER)
            .map_err(|e| anyhow::anyhow!("bundled tokenizer: {e}"))?,
    )?)
}

/// How to sample (SPEC.md §2 defaults: DDIM 50 steps, CFG 7.5, 512 x 512).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SampleSettings {
    /// Sampler steps.
    pub steps: usize,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    pub sampler: SamplerKind,
    /// Image height in pixels (a multiple of 8).
    pub height: usize,
    /// Image width in pixels (a multiple of 8).
    pub width: usize,
    /// The unconditional prompt.
    pub negative_prompt: String,
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self {
            steps: 50,
            guidance: 7.5,
            sampler: SamplerKind::Ddim,
            height: 512,
            width: 512,
            negative_prompt: String::new(),
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let s = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{} is not a valid config", p.display()))
}

/// Memory-map a safetensors file into a VarBuilder, naming the file in errors.
pub fn open_weights(p: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the file is mapped read-only; the crate never writes to weight files it has open.
    unsafe { VarBuilder::from_mmaped_safetensors(&[p], dtype, device) }
        .with_context(|| format!("cannot load weights {}", p.display()))
}

/// Whether the frozen model can run in `dtype` on `device`: f32 everywhere, f16 everywhere,
/// bf16 on CUDA only (candle's CPU matrix product has no bf16 kernel).
pub fn check_dtype(dtype: DType, device: &Device) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 => Ok(()),
        DType::BF16 if !device.is_cpu() => Ok(()),
        DType::BF16 => anyhow::bail!(
            "bf16 needs a CUDA device (candle's CPU matrix product has no bf16); use f32 (or f16) on the CPU"
        ),
        other => anyhow::bail!("the model cannot run in {other:?}; use f32, f16 or bf16"),
    }
}

/// Where a model's weights come from, so that a part can be read again (as trainable `Var`s).
#[derive(Debug, Clone)]
pub enum WeightSource {
    Files(Box<SdFiles>),
    /// `crate::bench::RandomWeights` with this seed.
    Random {
        seed: u64,
    },
}

impl WeightSource {
    /// The weights of `part` (`unet`, `text_encoder`) in `dtype` on `device`.
    pub fn part(&self, part: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            WeightSource::Files(f) => {
                let p = match part {
                    "unet" => &f.unet_weights,
                    "text_encoder" => &f.text_weights,
                    "vae" => &f.vae_weights,
                    other => anyhow::bail!("no model part {other}"),
                };
                open_weights(p, dtype, device)
            }
            WeightSource::Random { seed } => Ok(crate::bench::RandomWeights::part(
                *seed, part, dtype, device,
            )),
        }
    }

    /// The files, where the weights came from files.
    pub fn files(&self) -> Option<&SdFiles> {
        match self {
            WeightSource::Files(f) => Some(f),
            WeightSource::Random { .. } => None,
        }
    }
}

/// The loaded SD 1.5 model. Cloning is cheap: the weights are shared, not copied (a learned
/// subject that adapts weights holds a clone with its own UNet).
#[derive(Clone)]
pub struct StableDiffusion {
    pub tokenizer: ClipTokenizer,
    pub text: TextEncoder,
    pub unet: UNet,
    pub vae: Vae,
    pub vae_config: VaeConfig,
    pub schedule: NoiseSchedule,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// Model id recorded in outputs.
    pub id: String,
    /// Where the weights came from: the files (a fine-tuned model folder links its unchanged
    /// parts to them), or the benchmark's random weights.
    pub source: WeightSource,
    /// The weights made trainable by `personalize::weights::make_trainable`, by name
    /// (`unet.<key>`, `text_encoder.<key>`, LoRA factors); empty for a frozen model.
    pub trainable: Vec<(String, candle_core::Var)>,
}

impl StableDiffusion {
    /// Load every part of the model from `files` onto `device` in `dtype` (see [`check_dtype`]).
    pub fn open(files: &SdFiles, device: &Device, dtype: DType) -> Result<Self> {
        check_dtype(dtype, device)?;
        let tokenizer = match &files.tokenizer {
            Some(p) => ClipTokenizer::from_file(p)
                .with_context(|| format!("cannot load tokenizer {}", p.display()))?,
            None => bundled_tokenizer()?,
        };
        let text_cfg: TextConfig = read_json(&files.text_config)?;
        let text = TextEncoder::new(open_weights(&files.text_weights, dtype, device)?, &text_cfg)
            .with_context(|| {
            format!("text encoder weights {}", files.text_weights.display())
        })?;
        let unet_cfg: UNetConfig = read_json(&files.unet_config)?;
        unet_cfg
            .validate()
            .with_context(|| format!("{}", files.unet_config.display()))?;
        let unet = UNet::new(open_weights(&files.unet_weights, dtype, device)?, &unet_cfg)
            .with_context(|| format!("unet weights {}", files.unet_weights.display()))?;
        let vae_config: VaeConfig = read_json(&files.vae_config)?;
        let vae = Vae::new(
            open_weights(&files.vae_weights, dtype, device)?,
            &vae_config,
        )
        .with_context(|| format!("vae weights {}", files.vae_weights.display()))?;
        let scheduler_config: SchedulerConfig = read_json(&files.scheduler_config)?;
        let schedule = NoiseSchedule::new(&scheduler_config)?;
        Ok(Self {
            tokenizer,
            text,
            unet,
            vae,
            vae_config,
            schedule,
            scheduler_config,
            device: device.clone(),
            dtype,
            id: files.id.clone(),
            source: WeightSource::Files(Box::new(files.clone())),
            trainable: Vec::new(),
        })
    }

    /// Tokenize a prompt to `[1, 77]` ids; warns once on stderr if it was truncated.
    pub fn tokenize(&self, prompt: &str) -> Result<Tensor> {
        let t = self.tokenizer.encode(prompt)?;
        if t.truncated {
            warn_truncated(prompt);
        }
        Ok(ids_tensor(&[t], &self.device)?)
    }

    /// Text conditioning `[1, 77, D]` of a prompt, with learned rows for added tokens.
    pub fn encode_prompt(&self, prompt: &str, extra: Option<&Tensor>) -> Result<Tensor> {
        let ids = self.tokenize(prompt)?;
        Ok(self.text.forward(&ids, extra)?)
    }

    /// Initial latents `[1, 4, h/8, w/8]` in f32 from a seed (our own RNG: same seed, same
    /// bytes). Latents stay f32 through sampling whatever the model's dtype; only the UNet's
    /// input and the VAE's are cast to it.
    pub fn initial_latents(&self, s: &SampleSettings, seed: u64) -> Result<Tensor> {
        self.initial_latents_batch(s, &[seed])
    }

    /// Initial latents of a batch, `[N, 4, h/8, w/8]`: row `i` is [`Self::initial_latents`] of
    /// `seeds[i]`, so an image's start does not depend on the batch it is generated in.
    pub fn initial_latents_batch(&self, s: &SampleSettings, seeds: &[u64]) -> Result<Tensor> {
        if seeds.is_empty() {
            anyhow::bail!("no images to generate: the batch is empty");
        }
        let rows = seeds
            .iter()
            .map(|&seed| self.latents_of(s, seed))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    fn latents_of(&self, s: &SampleSettings, seed: u64) -> Result<Tensor> {
        let f = 1usize << (self.vae_config.block_out_channels.len() - 1);
        if !s.height.is_multiple_of(f) || !s.width.is_multiple_of(f) {
            anyhow::bail!(
                "--height/--width must be multiples of {f}, got {}x{}",
                s.height,
                s.width
            );
        }
        let mut rng = Rng::new(seed);
        let c = self.unet.config.in_channels;
        Ok(rng.randn((1, c, s.height / f, s.width / f), &self.device)?)
    }

    /// Denoise `latents` `[N, 4, h, w]` (N images) with classifier-free guidance. `cond(t)` gives
    /// the conditional branch's conditioning at sampler timestep `t`, one row per image
    /// (constant for plain prompts and TI; per timestep and layer for NeTI); the unconditional
    /// branch uses `uncond` `[1, 77, D]` for every image. The UNet runs once per step on `2N`
    /// rows. `on_step` is called after every step (progress bars).
    pub fn denoise(
        &self,
        s: &SampleSettings,
        latents: Tensor,
        uncond: &Tensor,
        cond: &mut dyn FnMut(usize) -> Result<Conditioning>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let mut sampler = make_sampler(s.sampler, &self.schedule, &self.scheduler_config, s.steps)?;
        let timesteps: Vec<usize> = sampler.timesteps().to_vec();
        let mut x = (latents * sampler.init_noise_sigma())?;
        let images = x.dim(0)?;
        let uncond = repeat_rows(uncond, images)?;
        let n = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let c = cond(t)?;
            let both = batch_conditioning(&uncond, &c)?;
            let x_in = Tensor::cat(&[&x, &x], 0)?.to_dtype(self.dtype)?;
            let tt = Tensor::new(vec![t as f32; 2 * images], &self.device)?;
            let eps = self.unet.forward(&x_in, &tt, &both)?.to_dtype(DType::F32)?;
            let eu = eps.narrow(0, 0, images)?;
            let ec = eps.narrow(0, images, images)?;
            let guided = (&eu + ((ec - &eu)? * s.guidance)?)?;
            x = sampler.step(&guided, t, &x)?;
            on_step(i + 1, n);
        }
        Ok(x)
    }

    /// Decode latents to images in [0, 1], `[B, 3, H, W]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.vae_config.scaling_factor)?.to_dtype(self.dtype)?;
        let img = self.vae.decode(&z)?;
        Ok(((img / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .to_dtype(DType::F32)?)
    }

    /// Decode final latents `[N, 4, h, w]` to 8-bit images, one image per VAE call: the decoder's
    /// activations at 512 px are over 1 GB an image in f32, and it runs once per image against
    /// the UNet's 50 steps, so batching it would save little and bound the batch size by memory.
    pub fn decode_images(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let mut out = Vec::with_capacity(latents.dim(0)?);
        for i in 0..latents.dim(0)? {
            let img = self.decode(&latents.narrow(0, i, 1)?)?;
            out.extend(to_rgb_images(&img)?);
        }
        Ok(out)
    }

    /// One image from a plain (or TI) prompt: the whole pipeline.
    pub fn generate(
        &self,
        s: &SampleSettings,
        prompt: &str,
        extra: Option<&Tensor>,
        seed: u64,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<image::RgbImage> {
        self.generate_batch(s, &[(prompt, seed)], extra, on_step)?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no image decoded"))
    }

    /// One image per `(prompt, seed)` of `requests`, all in the same UNet calls (see the module
    /// doc); each equals [`Self::generate`] of its own request.
    pub fn generate_batch(
        &self,
        s: &SampleSettings,
        requests: &[(&str, u64)],
        extra: Option<&Tensor>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<image::RgbImage>> {
        let seeds: Vec<u64> = requests.iter().map(|r| r.1).collect();
        let latents = self.initial_latents_batch(s, &seeds)?;
        let uncond = self.encode_prompt(&s.negative_prompt, None)?;
        let ids = requests
            .iter()
            .map(|(p, _)| self.tokenize(p))
            .collect::<Result<Vec<_>>>()?;
        let c = Conditioning::Shared(self.text.forward(&Tensor::cat(&ids, 0)?, extra)?);
        let out = self.denoise(s, latents, &uncond, &mut |_| Ok(c.clone()), on_step)?;
        self.decode_images(&out)
    }

    /// The `--batch` default: 1 on the CPU, where the matrix products of one image's two UNet
    /// rows already fill the cores; on CUDA, as many images as fit in the free device memory
    /// (see [`auto_batch`]).
    pub fn default_batch(&self, s: &SampleSettings) -> usize {
        match free_device_memory(&self.device) {
            Some(free) => auto_batch(free, s, &self.unet.config, self.dtype),
            None => 1,
        }
    }
}

/// Free memory of a CUDA device in bytes; `None` on the CPU (and in builds without CUDA).
pub fn free_device_memory(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64);
    }
    let _ = device;
    None
}

/// Images per UNet call that fit in `free` bytes of device memory: a conservative estimate of
/// one image's working set during sampling (its two UNet rows' widest activations and the
/// unfused attention scores of the first block, which dominate at 512 px), a quarter of the free
/// memory kept back for the allocator's slack and the VAE, and at most 16 (beyond that a GPU
/// gains little throughput and a failure loses more work).
pub fn auto_batch(free: u64, s: &SampleSettings, unet: &UNetConfig, dtype: DType) -> usize {
    let tokens = (s.height / 8) as u64 * (s.width / 8) as u64;
    let heads = unet.heads() as u64;
    let bytes = dtype.size_in_bytes() as u64;
    let width = unet.block_out_channels.first().copied().unwrap_or(320) as u64;
    // Per UNet row: the scores and probabilities of one self-attention ([H, L, L] twice), and
    // some 32 feature maps of the first block's width alive at once.
    let per_row = bytes * (2 * heads * tokens * tokens + 32 * width * tokens);
    let per_image = 2 * per_row;
    let usable = free / 4 * 3;
    ((usable / per_image.max(1)) as usize).clamp(1, 16)
}

/// `t` `[1, ..]` repeated to `n` rows (unchanged when `n` is 1 or it already has `n` rows).
fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if rows == n {
        return Ok(t.clone());
    }
    if rows != 1 {
        anyhow::bail!("the unconditional context has {rows} rows for a batch of {n} images");
    }
    let mut dims = vec![1usize; t.rank()];
    dims[0] = n;
    Ok(t.repeat(dims)?)
}

/// Stack the unconditional and conditional branches (`[N, 77, D]` each) into one conditioning
/// of `2N` rows, unconditional first.
pub fn batch_conditioning(uncond: &Tensor, cond: &Conditioning) -> Result<Conditioning> {
    Ok(match cond {
        Conditioning::Shared(c) => Conditioning::Shared(Tensor::cat(&[uncond, c], 0)?),
        Conditioning::PerLayer(v) => Conditioning::PerLayer(
            v.iter()
                .map(|(k, val)| {
                    Ok((
                        Tensor::cat(&[uncond, k], 0)?,
                        Tensor::cat(&[uncond, val], 0)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    })
}

/// `[B, 3, H, W]` in [0, 1] to 8-bit images (`round(x * 255)`, as diffusers' `numpy_to_pil`).
pub fn to_rgb_images(img: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, _, h, w) = img.dims4()?;
    let px = (img.to_device(&Device::Cpu)?.permute((0, 2, 3, 1))? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per = h * w * 3;
    (0..b)
        .map(|i| {
            image::RgbImage::from_raw(w as u32, h as u32, px[i * per..(i + 1) * per].to_vec())
                .ok_or_else(|| anyhow::anyhow!("image buffer size mismatch"))
        })
        .collect()
}

fn warn_truncated(prompt: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        let short: String = prompt.chars().take(60).collect();
        eprintln!("warning: prompt \"{short}...\" is longer than CLIP's 77 tokens and was truncated (warned once)");
    }
}
