//! Sampling a learned subject: load what `train` wrote (or take it from a trainer in memory), put
//! the subject's tokens where the prompt has `{}`, and condition every sampler step on it (NeTI:
//! per timestep and layer, with optional truncation).

use crate::personalize::concept::{Learned, NetiOptions};
use crate::personalize::neti::{NetiMapper, UNET_LAYERS};
use crate::personalize::tokens::{ids_tensor, ClipTokenizer};
use crate::personalize::trainer::{add_tokens, RunInfo, Trainer};
use crate::personalize::{weights, WeightTraining};
use crate::pipeline::{SampleSettings, StableDiffusion};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::path::Path;

/// The learned files of a run with `suffix` in their names (`""`: the final ones, `-steps-N`:
/// those saved at step N), as `Trainer::save_outputs` names them: the subject's file first
/// (`learned_embeds` or `mapper`), then the attractors' (`attractors`, or `mapper-a{k}` each).
pub fn learned_file_names(info: &RunInfo, suffix: &str) -> Vec<String> {
    let s = &info.settings.s;
    let method = s.method;
    if method.uses_neti() {
        let mut names = vec![format!("mapper{suffix}.safetensors")];
        names.extend(
            (0..info.attractor_tokens.len()).map(|k| format!("mapper-a{k}{suffix}.safetensors")),
        );
        return names;
    }
    let mut names = match method.weight_training() {
        WeightTraining::FullUnet => {
            let mut v = vec![format!(
                "model{suffix}/unet/diffusion_pytorch_model.safetensors"
            )];
            if s.baseline.train_text_encoder {
                v.push(format!("model{suffix}/text_encoder/model.safetensors"));
            }
            return v;
        }
        WeightTraining::Lora => vec![
            format!("pytorch_lora_weights{suffix}.safetensors"),
            format!("lora-kohya{suffix}.safetensors"),
        ],
        WeightTraining::CrossAttentionKv => {
            return vec![
                format!("pytorch_custom_diffusion_weights{suffix}.safetensors"),
                format!("{}{suffix}.safetensors", s.baseline.modifier_token),
            ]
        }
        WeightTraining::Frozen => vec![format!("learned_embeds{suffix}.safetensors")],
    };
    if !info.attractor_tokens.is_empty() {
        names.push(format!("attractors{suffix}.safetensors"));
    }
    names
}

/// A trained subject ready to sample.
pub struct LearnedSubject {
    pub info: RunInfo,
    tokenizer: ClipTokenizer,
    learned: Learned,
    /// The model with the run's trained weights (DreamBooth's UNet, a merged LoRA, Custom
    /// Diffusion's K/V), sharing the base model's other weights; `None`: the base model.
    model: Option<StableDiffusion>,
}

impl LearnedSubject {
    /// Load a run folder written by `attractor train` (config.json plus the learned files).
    pub fn open(run: &Path, sd: &StableDiffusion) -> Result<Self> {
        Self::open_at(run, sd, "")
    }

    /// Load the learned files with `suffix` in their names: `""` for the final ones,
    /// `-steps-N` for those saved at step N (`train --save-every`).
    pub fn open_at(run: &Path, sd: &StableDiffusion, suffix: &str) -> Result<Self> {
        let cfg = run.join("config.json");
        let text = std::fs::read_to_string(&cfg).with_context(|| {
            format!(
                "{} not found: --run must be a folder written by `attractor train --out`",
                cfg.display()
            )
        })?;
        let info: RunInfo = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a training run's config", cfg.display()))?;
        Self::load(run, info, sd, suffix)
    }

    /// [`Self::open_at`] for a run whose `config.json` has been read already.
    pub fn load(run: &Path, info: RunInfo, sd: &StableDiffusion, suffix: &str) -> Result<Self> {
        let names = learned_file_names(&info, suffix);
        let mut tokenizer = sd.tokenizer.clone();
        add_tokens(&mut tokenizer, &info, sd)?;
        let dev = &sd.device;
        let missing = |p: &Path| {
            anyhow::anyhow!("{} is missing: the run has not finished or was not saved; resume it with `attractor train --resume {}`", p.display(), run.display())
        };
        for n in &names {
            if !run.join(n).is_file() {
                return Err(missing(&run.join(n)));
            }
        }
        let method = info.settings.s.method;
        // The run's own model: the base model's weights shared, none of them trainable.
        let base_copy = || {
            let mut m = sd.clone();
            m.trainable.clear();
            m
        };
        let model = match method.weight_training() {
            WeightTraining::Frozen => None,
            WeightTraining::FullUnet => {
                let mut m = base_copy();
                let w = run.join(&names[0]);
                m.unet = crate::sd::unet::UNet::new(
                    crate::pipeline::open_weights(&w, sd.dtype, dev)?,
                    &sd.unet.config,
                )
                .with_context(|| format!("unet weights {}", w.display()))?;
                if let Some(t) = names.get(1) {
                    let w = run.join(t);
                    m.text = crate::sd::text_encoder::TextEncoder::new(
                        crate::pipeline::open_weights(&w, sd.dtype, dev)?,
                        &sd.text.config,
                    )
                    .with_context(|| format!("text encoder weights {}", w.display()))?;
                }
                Some(m)
            }
            WeightTraining::Lora => {
                let mut m = base_copy();
                let p = run.join(&names[0]);
                let known = weights::lora_targets(&mut m);
                let (lora, _) = crate::adapters::lora::read(&p, &known, dev)?;
                weights::apply_lora(&mut m, &lora, 1.0, &p.display().to_string())?;
                Some(m)
            }
            WeightTraining::CrossAttentionKv => {
                let mut m = base_copy();
                let cd = crate::adapters::custom_diffusion::read_folder(run, suffix, dev)?;
                weights::apply_custom_diffusion(&mut m, &cd.kv, &run.display().to_string())?;
                let token = &info.placeholder_tokens[0];
                let row = cd
                    .tokens
                    .iter()
                    .find(|(t, _)| t == token)
                    .map(|(_, r)| r.clone())
                    .ok_or_else(|| {
                        anyhow::anyhow!("{} has no row for {token}", run.join(&names[1]).display())
                    })?;
                return Ok(Self {
                    info,
                    tokenizer,
                    learned: Learned::Rows(row.to_device(dev)?.to_dtype(sd.dtype)?),
                    model: Some(m),
                });
            }
        };
        let learned = if method.uses_neti() {
            let mut mappers = Vec::new();
            for name in &names {
                mappers.push(NetiMapper::load(&run.join(name), dev)?.0);
            }
            Learned::Mappers {
                mappers,
                alpha: 0.2,
            }
        } else {
            let read = |file: &str, key: &str| -> Result<Tensor> {
                let p = run.join(file);
                let t = candle_core::safetensors::load(&p, dev).with_context(|| {
                    format!(
                        "cannot read {}: resume the run with `attractor train --resume {}`",
                        p.display(),
                        run.display()
                    )
                })?;
                t.get(key)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("{} has no tensor {key}", p.display()))
            };
            let mut rows = Vec::new();
            let mut files = names.iter().skip(if model.is_some() { 2 } else { 0 });
            if let Some(p) = info.placeholder_tokens.first() {
                let f = files
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("no learned file"))?;
                rows.push(read(f, p)?);
            }
            if !info.attractor_tokens.is_empty() {
                let f = files
                    .next()
                    .ok_or_else(|| anyhow::anyhow!("no attractor file"))?;
                for a in &info.attractor_tokens {
                    rows.push(read(f, a)?);
                }
            }
            if rows.is_empty() {
                Learned::None
            } else {
                Learned::Rows(Tensor::cat(&rows, 0)?.to_dtype(sd.dtype)?)
            }
        };
        Ok(Self {
            info,
            tokenizer,
            learned,
            model,
        })
    }

    /// The model to sample this subject with: the run's own (trained weights) or `base`.
    pub fn model<'m>(&'m self, base: &'m StableDiffusion) -> &'m StableDiffusion {
        self.model.as_ref().unwrap_or(base)
    }

    /// The subject as a trainer holds it now (validation images during training).
    pub fn from_trainer(t: &Trainer) -> Self {
        Self {
            info: t.info.clone(),
            tokenizer: t.tokenizer.clone(),
            learned: t.learned.clone(),
            // The trainer's model already holds the weights being trained.
            model: None,
        }
    }

    /// Fill `{}` with the subject's tokens, or attractor `k`'s token.
    pub fn fill_prompt(&self, template: &str, attractor: Option<usize>) -> Result<String> {
        let word = match attractor {
            Some(k) => self.info.attractor_tokens.get(k).cloned().ok_or_else(|| {
                anyhow::anyhow!(
                    "--attractor {k}: this run has {} attractors (method {})",
                    self.info.attractor_tokens.len(),
                    self.info.settings.s.method
                )
            })?,
            None => self.info.subject_text(),
        };
        if !template.contains("{}") {
            bail!("the prompt {template:?} has no {{}} where the learned subject goes, e.g. \"a photo of {{}} on a beach\"");
        }
        Ok(template.replace("{}", &word))
    }

    /// Generate one image; `template` has `{}` for the subject.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        sd: &StableDiffusion,
        s: &SampleSettings,
        template: &str,
        attractor: Option<usize>,
        truncation: Option<usize>,
        seed: u64,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<image::RgbImage> {
        self.generate_batch(sd, s, &[(template, seed)], attractor, truncation, on_step)?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no image decoded"))
    }

    /// One image per `(template, seed)` of `requests`, all sharing the UNet calls (2N rows with
    /// guidance, see `crate::pipeline`): each starts from its own seed's latents and has its own
    /// prompt's conditioning (NeTI: per timestep and layer, every row at the step's timestep),
    /// so each equals [`Self::generate`] of its own request.
    pub fn generate_batch(
        &self,
        sd: &StableDiffusion,
        s: &SampleSettings,
        requests: &[(&str, u64)],
        attractor: Option<usize>,
        truncation: Option<usize>,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<image::RgbImage>> {
        let sd = self.model(sd);
        let mut tokens = Vec::with_capacity(requests.len());
        for (template, _) in requests {
            let prompt = self.fill_prompt(template, attractor)?;
            tokens.push(self.tokenizer.encode(&prompt)?);
        }
        let ids = ids_tensor(&tokens, &sd.device)?;
        let seeds: Vec<u64> = requests.iter().map(|r| r.1).collect();
        let uncond = sd.encode_prompt(&s.negative_prompt, None)?;
        let latents = sd.initial_latents_batch(s, &seeds)?;
        let n_layers = UNET_LAYERS.len();
        let learned = &self.learned;
        let text = &sd.text;
        let fixed = match learned {
            Learned::None | Learned::Rows(_) => Some(
                learned
                    .encode(
                        text,
                        &ids,
                        &vec![0; requests.len()],
                        1,
                        NetiOptions::default(),
                    )?
                    .cond,
            ),
            Learned::Mappers { .. } => {
                if truncation.is_some_and(|k| k > crate::personalize::neti::HIDDEN) {
                    bail!(
                        "--truncation must be at most {}",
                        crate::personalize::neti::HIDDEN
                    );
                }
                None
            }
        };
        if fixed.is_some() && truncation.is_some() {
            bail!(
                "--truncation applies to NeTI runs only (this run is {})",
                self.info.settings.s.method
            );
        }
        let mut cond = |t: usize| -> Result<crate::sd::unet::Conditioning> {
            match &fixed {
                Some(c) => Ok(c.clone()),
                None => Ok(learned
                    .encode(
                        text,
                        &ids,
                        &vec![t; requests.len()],
                        n_layers,
                        NetiOptions {
                            truncation,
                            dropout: None,
                        },
                    )?
                    .cond),
            }
        };
        let out = sd.denoise(s, latents, &uncond, &mut cond, on_step)?;
        sd.decode_images(&out)
    }
}
