//! The training loop of all four methods (SPEC.md §3-5). One step reads like the paper: draw a
//! batch, noise it, encode the prompts of the pools, one UNet call, the losses, backward, update.
//! Saving, resuming and logging are named calls outside the step.

use crate::data::layout::Subject;
use crate::personalize::concept::{gather_positions, Encoded, Learned, NetiOptions};
use crate::personalize::losses::{self, LossParts};
use crate::personalize::method::Method;
use crate::personalize::neti::{MapperConfig, MapperInfo, NetiMapper, UNET_LAYERS};
use crate::personalize::optim::{accumulate, AdamW};
use crate::personalize::prompts::{self, PromptSampler};
use crate::personalize::settings::Resolved;
use crate::personalize::tokens::{ids_tensor, ClipTokenizer};
use crate::personalize::{prior, weights};
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a run folder records about its concept (config.json), enough to sample it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub settings: Resolved,
    pub subject: String,
    pub class_word: String,
    pub dataset: String,
    pub model: String,
    /// The subject's tokens (`<v*>`, `<v*>_1`, ...).
    pub placeholder_tokens: Vec<String>,
    /// One attractor token per training image (attractor methods).
    pub attractor_tokens: Vec<String>,
    /// Training images, in attractor order.
    pub train_images: Vec<String>,
    pub init_word: String,
    /// Precision the frozen model ran in (`f32`, `f16`, `bf16`; runs from before this field
    /// were all f32). The learned tensors are f32 whatever it says.
    #[serde(default = "f32_name")]
    pub model_dtype: String,
    /// Where prior preservation's class images come from (the baselines; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_images: Option<String>,
    /// `train --images DIR`: the photo folder trained on and a fingerprint of its photos
    /// (absent for a dataset subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<crate::data::photos::PhotoSource>,
    /// `train --keep-best`: the step whose learned files are in `RUN/best/`, by held-out loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<BestStep>,
    /// `train --early-stop`: the step training stopped at, before its `--steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<usize>,
}

/// The held-out evaluation with the lowest loss (`train --keep-best`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BestStep {
    pub step: usize,
    pub heldout_loss: f64,
}

fn f32_name() -> String {
    DType::F32.as_str().to_string()
}

impl RunInfo {
    /// What stands for the subject in a prompt's `{}`: the learned placeholder(s) (`<v*>`),
    /// DreamBooth's identifier and class (`sks dog`), or Custom Diffusion's modifier token and
    /// class (`<new1> dog`).
    pub fn subject_text(&self) -> String {
        let m = self.settings.s.method;
        if m.uses_identifier() {
            format!(
                "{} {}",
                self.settings.s.baseline.identifier, self.class_word
            )
        } else if m == Method::CustomDiffusion {
            format!(
                "{} {}",
                self.settings.s.baseline.modifier_token, self.class_word
            )
        } else {
            prompts::placeholder_text(self.placeholder_tokens.len())
        }
    }

    /// All added tokens in id order.
    pub fn all_tokens(&self) -> Vec<String> {
        self.placeholder_tokens
            .iter()
            .chain(self.attractor_tokens.iter())
            .cloned()
            .collect()
    }
}

/// One training image: VAE posteriors of it and its mirror, and its masks on the latent grid.
struct Example {
    /// (mean, logvar) of the image and of its horizontal flip.
    posterior: [(Tensor, Tensor); 2],
    /// Subject masks `[1, 1, h, w]` on the latent grid, plain and flipped.
    mask: Option<[Tensor; 2]>,
    /// Custom Diffusion: the image at the training resolution, re-viewed (rescaled, pasted or
    /// cropped) and encoded each step.
    pixels: Option<image::RgbImage>,
}

/// The losses of one optimizer step, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub sub: Option<f64>,
    pub bg: Option<f64>,
    pub joint: Option<f64>,
    pub nce: Option<f64>,
    /// Prior preservation's class-image MSE (before its weight), where it applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior: Option<f64>,
    /// The gradients' total L2 norm before clipping (the weight-training methods).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    pub schedule_weight: f64,
    pub lr: f64,
    /// The held-out loss on the test images (SPEC.md §9), at `--heldout-every` steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heldout_loss: Option<f64>,
    /// The same quantity on the training images, beside it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_ref_loss: Option<f64>,
}

/// One held-out evaluation ([`crate::personalize::heldout`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldOutLosses {
    pub heldout_loss: f64,
    pub train_ref_loss: f64,
}

/// What one micro-batch's forward pass gives: the total loss, the paper's parts, whether the
/// attractor objective applied, and the prior loss (unweighted) where prior preservation did.
struct MicroBatch {
    total: Tensor,
    parts: LossParts,
    plus: bool,
    prior: Option<Tensor>,
}

/// A training run in memory.
pub struct Trainer<'a> {
    pub sd: &'a StableDiffusion,
    pub info: RunInfo,
    pub tokenizer: ClipTokenizer,
    pub learned: Learned,
    /// Trainable variables by name (sorted), as the optimizer sees them.
    names: Vec<String>,
    opt: AdamW,
    pub rng: Rng,
    /// Optimizer steps done.
    pub step: usize,
    examples: Vec<Example>,
    /// Prior preservation's class images (posteriors only), their epoch order and position.
    class_examples: Vec<Example>,
    class_order: Vec<usize>,
    class_cursor: usize,
    /// The token whose contextual embedding is the subject in InfoNCE: `<v*>`'s id, or the
    /// identifier's (`sks`) for dreambooth-lora+.
    subject_id: u32,
    /// Epoch order of the training images (shuffled each epoch, as a shuffling data loader) and
    /// the position in it: every image, hence every attractor, is seen once per epoch.
    order: Vec<usize>,
    cursor: usize,
    sampler: PromptSampler,
    vocab: u32,
    /// Wall-clock seconds of the last [`Trainer::train_step`]: (forward and losses, backward and
    /// optimizer). Read by `attractor bench`; never saved.
    pub last_step_seconds: (f64, f64),
}

/// Masks a method needs but the subject lacks: the error lists them and names the command.
/// Masks that exist are checked as `dataset check` checks them (same messages and fixes).
pub fn check_masks(subject: &Subject, dataset_dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = subject
        .train_images
        .iter()
        .map(|p| subject.mask_path(p))
        .collect();
    let missing: Vec<String> = paths
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        let make = if subject.photo_folder {
            "leave out --masks-missing error and `attractor train` makes them (SAM + CLIP)"
                .to_string()
        } else {
            format!(
                "make them with `attractor masks --data {} --subject {}`",
                dataset_dir.display(),
                subject.name
            )
        };
        bail!(
            "the attractor methods need a subject mask for every training image, and these are missing:\n  {}\nFix: {make} (or draw them: white = subject, same size as the image), or train with --method ti / neti",
            missing.join("\n  "),
        );
    }
    crate::data::check::check_training_masks(subject, dataset_dir)?;
    Ok(paths)
}

/// Get a model ready for a method that trains weights: the class images of prior preservation
/// (generated from the still-frozen base model, cached under `cache`), then the trainable
/// weights ([`weights::make_trainable`]). Returns the class images' paths (none for the token
/// methods, or with `prior_images = 0`). `on_image(i, n, generated)` reports each class image.
pub fn prepare_model(
    sd: &mut StableDiffusion,
    s: &Resolved,
    subject: &Subject,
    cache: &Path,
    on_image: &mut dyn FnMut(usize, usize, bool),
) -> Result<Vec<PathBuf>> {
    let method = s.s.method;
    if !method.trains_weights() {
        return Ok(Vec::new());
    }
    let b = &s.s.baseline;
    let class_images = if s.prior_preservation() {
        let key = prior::ClassImageKey {
            model: sd.id.clone(),
            prompt: b.class_prompt(&subject.class),
            sampler: crate::sd::samplers::SamplerKind::Ddim,
            steps: b.prior_steps,
            guidance: b.prior_guidance,
            seed: 0,
            size: s.s.resolution,
        };
        prior::ensure_class_images(sd, &key, b.prior_images, cache, on_image)?
    } else {
        Vec::new()
    };
    weights::make_trainable(sd, s)?;
    Ok(class_images)
}

impl<'a> Trainer<'a> {
    /// Set up a fresh run: tokens, initial rows or mappers, cached posteriors and masks. A
    /// method that trains weights needs the model from [`prepare_model`] and then
    /// [`Trainer::set_class_images`] with the paths it returned.
    pub fn new(
        sd: &'a StableDiffusion,
        settings: Resolved,
        subject: &Subject,
        dataset_dir: &Path,
    ) -> Result<Self> {
        let method = settings.s.method;
        if method.trains_weights() && sd.trainable.is_empty() {
            bail!("{method} trains model weights: prepare the model with trainer::prepare_model first");
        }
        let mut rng = Rng::new(settings.s.seed);
        let mut tokenizer = sd.tokenizer.clone();
        let baseline = &settings.s.baseline;
        let placeholder_tokens = if method.uses_identifier() {
            Vec::new()
        } else if method == Method::CustomDiffusion {
            vec![baseline.modifier_token.clone()]
        } else {
            prompts::placeholder_tokens(settings.s.num_vectors)
        };
        let attractor_tokens: Vec<String> = if method.uses_attractor() {
            (0..subject.train_images.len())
                .map(prompts::attractor_token)
                .collect()
        } else {
            Vec::new()
        };
        let init_word = match (&settings.s.init_word, method) {
            (Some(w), _) => w.clone(),
            (None, Method::CustomDiffusion) => "sks".to_string(),
            (None, m) if m.uses_identifier() => baseline.identifier.clone(),
            (None, _) => tokenizer.default_init_word(&subject.class),
        };
        let subject_id = if method.uses_identifier() {
            match tokenizer.single_token_id(&baseline.identifier) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("warning: --identifier {:?} is not one CLIP token ({e}); DreamBooth users expect a rare single token such as `sks`", baseline.identifier);
                    tokenizer
                        .text_ids(&baseline.identifier)?
                        .first()
                        .copied()
                        .unwrap_or(0)
                }
            }
        } else {
            sd.text.config.vocab_size as u32
        };
        let init_id = if method.uses_identifier() {
            subject_id
        } else {
            tokenizer
                .single_token_id(&init_word)
                .with_context(|| "--init-word".to_string())?
        };
        let bg_id = tokenizer.single_token_id(prompts::ATTRACTOR_INIT_WORD)?;
        let info = RunInfo {
            settings: settings.clone(),
            subject: subject.name.clone(),
            class_word: subject.class.clone(),
            dataset: dataset_dir.display().to_string(),
            model: sd.id.clone(),
            placeholder_tokens,
            attractor_tokens,
            train_images: subject
                .train_images
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            init_word,
            model_dtype: sd.dtype.as_str().to_string(),
            prior_images: prior_source(&settings, &subject.class),
            best: None,
            stopped_early_at: None,
            images: None,
        };
        add_tokens(&mut tokenizer, &info, sd)?;
        let table = &sd.text.token_embedding;
        let row = |id: u32| table.get(id as usize);
        let varmap = VarMap::new();
        let (learned, named_vars) = if method.uses_neti() {
            let mut mappers = Vec::new();
            let d = sd.text.config.hidden_size;
            let words: Vec<u32> = std::iter::once(init_id)
                .chain(info.attractor_tokens.iter().map(|_| bg_id))
                .collect();
            for (j, &w) in words.iter().enumerate() {
                let norm = row(w)?
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?;
                let cfg = MapperConfig::new(d, norm);
                let prefix = format!("mapper{j}");
                mappers.push(NetiMapper::init(
                    &varmap, &prefix, &cfg, &mut rng, &sd.device,
                )?);
            }
            let mut named: Vec<(String, Var)> = varmap
                .data()
                .lock()
                .map_err(|_| anyhow::anyhow!("variable map lock poisoned"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (
                Learned::Mappers {
                    mappers,
                    alpha: 0.2,
                },
                named,
            )
        } else if info.placeholder_tokens.is_empty() && info.attractor_tokens.is_empty() {
            (Learned::None, Vec::new())
        } else {
            let mut rows = Vec::new();
            for _ in &info.placeholder_tokens {
                rows.push(row(init_id)?);
            }
            for _ in &info.attractor_tokens {
                rows.push(row(bg_id)?);
            }
            let var = Var::from_tensor(&Tensor::stack(&rows, 0)?.to_dtype(DType::F32)?)?;
            (
                Learned::Rows(var.as_tensor().clone()),
                vec![("rows".to_string(), var)],
            )
        };
        // The learned tokens' variables first (TI's rows stay at index 0), then the model's.
        let mut named_vars = named_vars;
        named_vars.extend(sd.trainable.iter().cloned());
        let names = named_vars.iter().map(|(n, _)| n.clone()).collect();
        let vars: Vec<Var> = named_vars.into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(vars, settings.s.adamw)?;
        let examples = load_examples(sd, subject, &settings, dataset_dir)?;
        let subject_text = info.subject_text();
        Ok(Self {
            sd,
            sampler: PromptSampler::new(subject_text, subject.class.clone()),
            class_examples: Vec::new(),
            class_order: Vec::new(),
            class_cursor: 0,
            subject_id,
            vocab: sd.text.config.vocab_size as u32,
            info,
            tokenizer,
            learned,
            names,
            opt,
            rng,
            step: 0,
            examples,
            order: Vec::new(),
            cursor: 0,
            last_step_seconds: (0.0, 0.0),
        })
    }

    pub fn method(&self) -> Method {
        self.info.settings.s.method
    }

    /// The class images of prior preservation (from [`prepare_model`]): their VAE posteriors
    /// are computed once, like the instance images'.
    pub fn set_class_images(&mut self, paths: &[PathBuf]) -> Result<()> {
        self.class_examples = encode_images(self.sd, paths, self.info.settings.s.resolution)?;
        self.class_order.clear();
        self.class_cursor = 0;
        Ok(())
    }

    /// One micro-batch: the losses (not yet backpropagated).
    fn micro_batch(&mut self, p: f64) -> Result<MicroBatch> {
        let s = self.info.settings.clone();
        let b = s.batch;
        let method = self.method();
        let sd = self.sd;
        let dev = &sd.device;
        // 1. the batch: image, flip, timestep, posterior sample, noise
        let mut latents = Vec::with_capacity(b);
        let mut masks = Vec::with_capacity(b);
        let mut ks = Vec::with_capacity(b);
        let mut ts = Vec::with_capacity(b);
        let mut prefixes = Vec::with_capacity(b);
        for _ in 0..b {
            let k = self.next_image();
            let flip = (self.rng.uniform_f32() as f64) < s.flip_p;
            if method == Method::CustomDiffusion {
                let (z, m, prefix) = self.rescaled_view(k, flip)?;
                latents.push(z);
                masks.push(m);
                prefixes.push(prefix);
            } else {
                let (mean, logvar) = &self.examples[k].posterior[flip as usize];
                latents.push(sample_latent(sd, &mut self.rng, mean, logvar)?);
                if let Some(m) = &self.examples[k].mask {
                    masks.push(m[flip as usize].clone());
                }
            }
            ks.push(k);
            ts.push(self.rng.range(0, sd.schedule.num_train_timesteps()));
        }
        let (zt, eps) = self.noised(&latents, &ts)?;
        // 1b. prior preservation: as many class images, each its own timestep and noise
        let prior = if s.prior_preservation() {
            Some(self.class_batch(b, s.flip_p)?)
        } else {
            None
        };
        // 2. the prompts: one per image (ti, neti; the baselines' fixed instance prompt) or
        // one per pool and image (the attractor methods), then the class prompts
        let mut prompts: Vec<String> = if method.uses_attractor() {
            let triples: Vec<_> = ks
                .iter()
                .map(|&k| {
                    self.sampler
                        .triple(&mut self.rng, &self.info.attractor_tokens[k])
                })
                .collect();
            let mut v: Vec<String> = triples.iter().map(|t| t.subject.clone()).collect();
            v.extend(triples.iter().map(|t| t.background.clone()));
            v.extend(triples.iter().map(|t| t.joint.clone()));
            v
        } else if method.trains_weights() {
            let p = s.s.baseline.instance_prompt(method, &self.info.class_word);
            if method == Method::CustomDiffusion {
                prefixes.iter().map(|pre| format!("{pre}{p}")).collect()
            } else {
                vec![p; b]
            }
        } else {
            (0..b).map(|_| self.sampler.object(&mut self.rng)).collect()
        };
        let pools = prompts.len() / b;
        let mut t_all: Vec<usize> = (0..pools).flat_map(|_| ts.iter().copied()).collect();
        if let Some((_, _, ts_c)) = &prior {
            let cp = s.s.baseline.class_prompt(&self.info.class_word);
            prompts.extend(std::iter::repeat_n(cp, b));
            t_all.extend(ts_c.iter().copied());
        }
        let tokens = self.tokenizer.encode_batch(&prompts)?;
        let ids = ids_tensor(&tokens, dev)?;
        // 3. text conditioning (NeTI: 16 layers in one text-encoder pass, with nested dropout)
        let enc: Encoded = self.learned.encode(
            &sd.text,
            &ids,
            &t_all,
            UNET_LAYERS.len(),
            NetiOptions {
                truncation: None,
                dropout: if method.uses_neti() {
                    Some(&mut self.rng)
                } else {
                    None
                },
            },
        )?;
        // 4. one UNet call on all pools (and the class images)
        let mut x_in = zt.repeat((pools, 1, 1, 1))?;
        if let Some((zt_c, _, _)) = &prior {
            x_in = Tensor::cat(&[&x_in, zt_c], 0)?;
        }
        let x_in = x_in.to_dtype(sd.dtype)?;
        let t_in = Tensor::new(t_all.iter().map(|&t| t as f32).collect::<Vec<_>>(), dev)?;
        let pred_all = sd
            .unet
            .forward(&x_in, &t_in, &enc.cond)?
            .to_dtype(DType::F32)?;
        let pred = pred_all.narrow(0, 0, pools * b)?;
        // 5. the losses: prior preservation's class MSE, weighted, joins the instance loss
        let prior_loss = match &prior {
            Some((_, eps_c, _)) => Some(losses::mse(&pred_all.narrow(0, pools * b, b)?, eps_c)?),
            None => None,
        };
        let with_prior = |inst: Tensor| -> Result<Tensor> {
            Ok(match &prior_loss {
                Some(l) => (inst + (l * s.s.baseline.prior_loss_weight)?)?,
                None => inst,
            })
        };
        if !method.uses_attractor() {
            let l = if method == Method::CustomDiffusion {
                // The loss only where the view has image (the pasted area), SPEC.md §8.
                losses::masked_mean_mse(&pred, &eps, &Tensor::cat(&masks, 0)?)?
            } else {
                losses::mse(&pred, &eps)?
            };
            let zero = l.zeros_like()?;
            return Ok(MicroBatch {
                total: with_prior(l.clone())?,
                parts: LossParts {
                    sub: zero.clone(),
                    bg: zero.clone(),
                    joint: l,
                    nce: zero,
                },
                plus: false,
                prior: prior_loss,
            });
        }
        let m_s = Tensor::cat(&masks, 0)?.to_dtype(pred.dtype())?;
        let m_b = m_s.affine(-1.0, 1.0)?;
        let sub = losses::masked_mse(&pred.narrow(0, 0, b)?, &eps, &m_s)?;
        let bg = losses::masked_mse(&pred.narrow(0, b, b)?, &eps, &m_b)?;
        let joint = losses::mse(&pred.narrow(0, 2 * b, b)?, &eps)?;
        // InfoNCE on contextual embeddings: V = the subject token in the subject and joint
        // prompts, A = the attractors in the background and joint prompts; averaged over layer
        // groups.
        let v_id = self.subject_id;
        let first = |row: usize, id: u32| tokens[row].positions(id).first().copied();
        let mut v_at = Vec::new();
        let mut a_at = Vec::new();
        for (i, k) in ks.iter().enumerate().take(b) {
            let a_id = self.vocab + (self.info.placeholder_tokens.len() + k) as u32;
            for row in [i, 2 * b + i] {
                if let Some(p) = first(row, v_id) {
                    v_at.push((row, p));
                }
            }
            for row in [b + i, 2 * b + i] {
                if let Some(p) = first(row, a_id) {
                    a_at.push((row, p));
                }
            }
        }
        let mut nce_terms = Vec::new();
        for ctx in &enc.contextual {
            let v = gather_positions(ctx, &v_at, dev)?;
            let a = gather_positions(ctx, &a_at, dev)?;
            nce_terms.push(losses::info_nce(&v, &a, s.s.tau)?);
        }
        let nce = (Tensor::stack(&nce_terms, 0)?.mean_all()?).to_dtype(DType::F32)?;
        let parts = LossParts {
            sub,
            bg,
            joint,
            nce,
        };
        let w = s.s.schedule.weight(p);
        let total = losses::total_loss(&parts, &s.s.weights, w)?;
        Ok(MicroBatch {
            total: with_prior(total)?,
            parts,
            plus: true,
            prior: prior_loss,
        })
    }

    /// Custom Diffusion's augmentation of image `k` (SPEC.md §8, `train_custom_diffusion.py`):
    /// with probability 0.66 shrunk to `s ~ U{res/3 .. res}` and pasted at a random place,
    /// else enlarged to `s ~ U{1.2 res .. 1.4 res}` and cropped at a random place; encoded by
    /// the VAE and sampled. Returns the scaled latent `[1, 4, h, w]`, the loss mask `[1, 1, h, w]`
    /// and the prompt prefix the view calls for ("a far away " / "very small " below 0.6 res,
    /// "zoomed in " / "close up " above res).
    fn rescaled_view(&mut self, k: usize, flip: bool) -> Result<(Tensor, Tensor, &'static str)> {
        let sd = self.sd;
        let res = self.info.settings.s.resolution;
        let f = 1usize << (sd.vae_config.block_out_channels.len() - 1);
        let img = self.examples[k]
            .pixels
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("custom diffusion: image {k} has no pixels"))?;
        let img = if flip {
            crate::data::image::hflip_image(img)
        } else {
            img.clone()
        };
        let scale = if (self.rng.uniform_f32() as f64) < 0.66 {
            self.rng.range(res / 3, res + 1)
        } else {
            self.rng
                .range((1.2 * res as f64) as usize, (1.4 * res as f64) as usize)
        };
        let (outer, inner) = if scale > res {
            (scale, res)
        } else {
            (res, scale)
        };
        let top = self.rng.range(0, outer - inner + 1);
        let left = self.rng.range(0, outer - inner + 1);
        let (x, mask) = crate::data::image::rescaled_view(
            &img,
            res as u32,
            scale as u32,
            (top as u32, left as u32),
            res / f,
        )?;
        let prefix = if (scale as f64) < 0.6 * res as f64 {
            ["a far away ", "very small "][self.rng.range(0, 2)]
        } else if scale > res {
            ["zoomed in ", "close up "][self.rng.range(0, 2)]
        } else {
            ""
        };
        let dev = &sd.device;
        let post = sd
            .vae
            .encode(&x.to_device(dev)?.to_dtype(sd.dtype)?.unsqueeze(0)?)?;
        let z = sample_latent(
            sd,
            &mut self.rng,
            &post.mean.to_dtype(DType::F32)?,
            &post.logvar.to_dtype(DType::F32)?,
        )?;
        Ok((z, mask.to_device(dev)?, prefix))
    }

    /// `n` class images for prior preservation: noised latents, their noise and timesteps
    /// (the class images' own epoch order, like the instance images').
    fn class_batch(&mut self, n: usize, flip_p: f64) -> Result<(Tensor, Tensor, Vec<usize>)> {
        if self.class_examples.is_empty() {
            bail!("prior preservation needs class images: call Trainer::set_class_images with the paths from trainer::prepare_model (or set prior_images = 0)");
        }
        let sd = self.sd;
        let mut latents = Vec::with_capacity(n);
        let mut ts = Vec::with_capacity(n);
        for _ in 0..n {
            if self.class_cursor >= self.class_order.len() {
                self.class_order = shuffled(self.class_examples.len(), &mut self.rng);
                self.class_cursor = 0;
            }
            let k = self.class_order[self.class_cursor];
            self.class_cursor += 1;
            let flip = (self.rng.uniform_f32() as f64) < flip_p;
            let (mean, logvar) = &self.class_examples[k].posterior[flip as usize];
            latents.push(sample_latent(sd, &mut self.rng, mean, logvar)?);
            ts.push(self.rng.range(0, sd.schedule.num_train_timesteps()));
        }
        let (zt, eps) = self.noised(&latents, &ts)?;
        Ok((zt, eps, ts))
    }

    /// The latents stacked and noised at `ts` with noise from the run's RNG: `(z_t, noise)`.
    fn noised(&mut self, latents: &[Tensor], ts: &[usize]) -> Result<(Tensor, Tensor)> {
        let x0 = Tensor::cat(latents, 0)?;
        let eps = self.rng.randn(x0.shape(), &self.sd.device)?;
        let zt = self.sd.schedule.add_noise(&x0, &eps, ts)?;
        Ok((zt, eps))
    }

    /// The next image of the epoch order, reshuffling (Fisher-Yates, our RNG) at each epoch start.
    fn next_image(&mut self) -> usize {
        if self.cursor >= self.order.len() {
            self.order = shuffled(self.examples.len(), &mut self.rng);
            self.cursor = 0;
        }
        let k = self.order[self.cursor];
        self.cursor += 1;
        k
    }

    /// One optimizer step (grad_accum micro-batches). Stops with an error on a NaN/Inf loss
    /// before touching the parameters, so the last checkpoint stays good.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let total_steps = self.info.settings.steps;
        let p = self.step as f64 / total_steps as f64;
        let accum = self.info.settings.grad_accum;
        let mut grads = None;
        let mut sums = [0f64; 6];
        let mut plus = false;
        let mut with_prior = false;
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        for _ in 0..accum {
            let t0 = std::time::Instant::now();
            let mb = self.micro_batch(p)?;
            plus = mb.plus;
            let scalar =
                |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
            let lv = scalar(&mb.total)?;
            if !lv.is_finite() {
                bail!(
                    "the loss became {lv} at step {}: training stopped, and the last checkpoint in {} is kept. Fix: lower the learning rate (--lr) or check the training images",
                    self.step + 1,
                    "the run folder"
                );
            }
            sums[0] += lv;
            sums[1] += scalar(&mb.parts.sub)?;
            sums[2] += scalar(&mb.parts.bg)?;
            sums[3] += scalar(&mb.parts.joint)?;
            sums[4] += scalar(&mb.parts.nce)?;
            if let Some(l) = &mb.prior {
                sums[5] += scalar(l)?;
                with_prior = true;
            }
            let t1 = std::time::Instant::now();
            forward_s += (t1 - t0).as_secs_f64();
            let mut g = (mb.total / accum as f64)?.backward()?;
            self.collect_checkpointed(&mut g)?;
            grads = Some(accumulate(grads, g, &self.opt.vars)?);
            backward_s += t1.elapsed().as_secs_f64();
        }
        let mut grads = grads.ok_or_else(|| anyhow::anyhow!("no micro-batches"))?;
        let lr = self.info.settings.lr;
        let t2 = std::time::Instant::now();
        let max_norm = self.info.settings.s.baseline.max_grad_norm;
        let grad_norm = if self.method().trains_weights() {
            Some(clip_grad_norm(&mut grads, &self.opt.vars, max_norm)?)
        } else {
            None
        };
        self.opt.step(&grads, lr)?;
        self.refresh_learned()?;
        self.last_step_seconds = (forward_s, backward_s + t2.elapsed().as_secs_f64());
        self.step += 1;
        let n = accum as f64;
        let opt = |v: f64| if plus { Some(v / n) } else { None };
        Ok(StepLog {
            step: self.step,
            loss: sums[0] / n,
            sub: opt(sums[1]),
            bg: opt(sums[2]),
            joint: if plus { Some(sums[3] / n) } else { None },
            nce: opt(sums[4]),
            prior: with_prior.then(|| sums[5] / n),
            grad_norm,
            schedule_weight: if plus {
                self.info.settings.s.schedule.weight(p)
            } else {
                0.0
            },
            lr,
            heldout_loss: None,
            train_ref_loss: None,
        })
    }

    /// The UNet's noise prediction (f32) for noised latents `zt` at timesteps `ts` under the
    /// prompts `ids` `[N, 77]`, with the current parameters and the method's own conditioning
    /// (NeTI: per timestep and layer, no nested dropout). Forward only; the training RNG is
    /// not touched. The held-out loss's one model call.
    pub fn predict_noise(&self, zt: &Tensor, ts: &[usize], ids: &Tensor) -> Result<Tensor> {
        let sd = self.sd;
        let enc =
            self.learned
                .encode(&sd.text, ids, ts, UNET_LAYERS.len(), NetiOptions::default())?;
        let t_in = Tensor::new(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), &sd.device)?;
        Ok(sd
            .unet
            .forward(&zt.to_dtype(sd.dtype)?, &t_in, &enc.cond)?
            .to_dtype(DType::F32)?)
    }

    /// UNet rows of one training micro-batch (the pools and the class images): what a
    /// forward-only pass may use without needing more memory than training.
    pub fn unet_rows_per_step(&self) -> usize {
        let s = &self.info.settings;
        let pools = if self.method().uses_attractor() { 3 } else { 1 };
        s.batch * (pools + s.prior_preservation() as usize)
    }

    /// With gradient checkpointing, the UNet blocks' parameter gradients come from their
    /// recomputed backward passes: add them to `g`.
    fn collect_checkpointed(&self, g: &mut GradStore) -> Result<()> {
        if let Some(sink) = &self.sd.unet.checkpointing {
            sink.drain_into(g)?;
        }
        Ok(())
    }

    /// After `Var::set`, TI's `Learned::Rows` must see the new values (mappers hold the vars).
    fn refresh_learned(&mut self) -> Result<()> {
        if let Learned::Rows(_) = &self.learned {
            self.learned = Learned::Rows(self.opt.vars[0].as_tensor().clone());
        }
        Ok(())
    }

    /// The gradient of one micro-batch's loss for every trainable tensor, by name (`None`: the
    /// loss does not reach it). For tests: every trainable tensor must get a gradient, and a
    /// half-precision model must give the f32 model's gradients.
    pub fn gradients(&mut self) -> Result<Vec<(String, Option<Tensor>)>> {
        let mut g = self.micro_batch(0.5)?.total.backward()?;
        self.collect_checkpointed(&mut g)?;
        Ok(self
            .names
            .iter()
            .zip(self.opt.vars.iter())
            .map(|(n, v)| (n.clone(), g.get(v.as_tensor()).cloned()))
            .collect())
    }

    /// The L2 norm of every trainable tensor's gradient (see [`Self::gradients`]; 0 for none).
    pub fn gradient_norms(&mut self) -> Result<Vec<(String, f64)>> {
        self.gradients()?
            .into_iter()
            .map(|(n, g)| {
                let norm = match g {
                    Some(t) => t
                        .sqr()?
                        .sum_all()?
                        .sqrt()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                    None => 0.0,
                };
                Ok((n, norm))
            })
            .collect()
    }

    /// Trainable tensors by name (rows or mapper weights).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .zip(self.opt.vars.iter())
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Write a checkpoint: parameters, AdamW moments, step, RNG state and the settings.
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            tensors.push((format!("param/{n}"), self.opt.vars[i].as_tensor().clone()));
            tensors.push((format!("m/{n}"), self.opt.m[i].clone()));
            tensors.push((format!("v/{n}"), self.opt.v[i].clone()));
        }
        if let Learned::Mappers { mappers, .. } = &self.learned {
            for (j, m) in mappers.iter().enumerate() {
                tensors.push((format!("fourier/{j}"), m.encoder.w().clone()));
            }
        }
        let (seed, pos) = self.rng.state();
        let mut meta = HashMap::new();
        meta.insert("step".into(), self.step.to_string());
        meta.insert("adam_t".into(), self.opt.t.to_string());
        meta.insert(
            "rng_seed".into(),
            seed.iter().map(|b| format!("{b:02x}")).collect(),
        );
        meta.insert("rng_word_pos".into(), pos.to_string());
        meta.insert("run".into(), serde_json::to_string(&self.info)?);
        meta.insert("order".into(), serde_json::to_string(&self.order)?);
        meta.insert("cursor".into(), self.cursor.to_string());
        meta.insert(
            "class_order".into(),
            serde_json::to_string(&self.class_order)?,
        );
        meta.insert("class_cursor".into(), self.class_cursor.to_string());
        crate::files::save_safetensors(path, &tensors, &meta)
    }

    /// Restore a checkpoint written by [`Self::save_checkpoint`] into this (fresh) trainer.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let meta = crate::files::read_safetensors_metadata(path)?;
        let tensors = candle_core::safetensors::load(path, &self.sd.device)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let get = |k: &str| {
            tensors
                .get(k)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("checkpoint {} has no tensor {k}", path.display()))
        };
        for (i, n) in self.names.iter().enumerate() {
            self.opt.vars[i].set(&get(&format!("param/{n}"))?)?;
            self.opt.m[i] = get(&format!("m/{n}"))?;
            self.opt.v[i] = get(&format!("v/{n}"))?;
        }
        if let Learned::Mappers { mappers, .. } = &mut self.learned {
            for (j, m) in mappers.iter_mut().enumerate() {
                m.encoder = crate::personalize::neti::FourierEncoding::from_tensor(get(
                    &format!("fourier/{j}"),
                )?)?;
            }
        }
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("checkpoint {} has no {k} metadata", path.display()))
        };
        self.step = field("step")?.parse()?;
        self.opt.t = field("adam_t")?.parse()?;
        let hex = field("rng_seed")?;
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16)?;
        }
        self.rng = Rng::from_state(seed, field("rng_word_pos")?.parse()?);
        self.order = serde_json::from_str(&field("order")?)?;
        self.cursor = field("cursor")?.parse()?;
        // Checkpoints of runs without prior preservation (and older ones) have no class order.
        self.class_order = match meta.get("class_order") {
            Some(o) => serde_json::from_str(o)?,
            None => Vec::new(),
        };
        self.class_cursor = meta
            .get("class_cursor")
            .map(|c| c.parse())
            .transpose()?
            .unwrap_or(0);
        self.refresh_learned()?;
        Ok(())
    }

    /// Write what users load: `learned_embeds.safetensors` (TI: `{"<v*>": [n, D]}`, format pt,
    /// loads in diffusers `load_textual_inversion` and A1111), `attractors.safetensors`, the
    /// NeTI mappers, and for the weight-training methods their files (see
    /// [`crate::personalize::generate::learned_file_names`]). `suffix` = `-steps-N` for
    /// intermediate saves.
    pub fn save_outputs(&self, dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
        let names = crate::personalize::generate::learned_file_names(&self.info, suffix);
        let mut written = Vec::new();
        let fmt = crate::files::pt_format();
        let method = self.method();
        match method.weight_training() {
            crate::personalize::WeightTraining::Frozen => {}
            crate::personalize::WeightTraining::FullUnet => {
                let files = self.sd.source.files().ok_or_else(|| {
                    anyhow::anyhow!("a model folder needs the base model's files (this model has random weights)")
                })?;
                let strip = |prefix: &str| -> Vec<(String, Tensor)> {
                    self.parameters()
                        .into_iter()
                        .filter_map(|(n, t)| n.strip_prefix(prefix).map(|k| (k.to_string(), t)))
                        .collect()
                };
                let unet = strip(weights::UNET);
                let text = strip(weights::TEXT_ENCODER);
                let folder = dir.join(format!("model{suffix}"));
                crate::adapters::diffusers_folder::save(
                    &folder,
                    files,
                    Some(&unet),
                    (!text.is_empty()).then_some(text.as_slice()),
                )?;
                written.push(folder);
                return Ok(written);
            }
            crate::personalize::WeightTraining::Lora => {
                let w = self.lora_weights()?;
                let diffusers = dir.join(&names[0]);
                crate::adapters::lora::save_diffusers(&diffusers, &w)?;
                let kohya = dir.join(&names[1]);
                crate::adapters::lora::save_kohya(&kohya, &w)?;
                written.extend([diffusers, kohya]);
            }
            crate::personalize::WeightTraining::CrossAttentionKv => {
                let kv = self
                    .parameters()
                    .into_iter()
                    .filter_map(|(n, t)| {
                        n.strip_prefix(weights::UNET)
                            .and_then(|k| k.strip_suffix(".weight"))
                            .map(|m| (m.to_string(), t))
                    })
                    .collect();
                let p = dir.join(&names[0]);
                crate::adapters::custom_diffusion::save_weights(&p, &kv)?;
                written.push(p);
                if let Learned::Rows(rows) = &self.learned {
                    let p = dir.join(&names[1]);
                    crate::adapters::custom_diffusion::save_token(
                        &p,
                        &self.info.placeholder_tokens[0],
                        &rows.narrow(0, 0, 1)?,
                    )?;
                    written.push(p);
                }
                return Ok(written);
            }
        }
        match &self.learned {
            Learned::None => {}
            Learned::Rows(rows) => {
                let n = self.info.placeholder_tokens.len();
                let mut next = names.iter().skip(written.len());
                if n > 0 {
                    let p = dir.join(next.next().ok_or_else(|| anyhow::anyhow!("no file name"))?);
                    crate::files::save_safetensors(
                        &p,
                        &[(
                            self.info.placeholder_tokens[0].clone(),
                            rows.narrow(0, 0, n)?,
                        )],
                        &fmt,
                    )?;
                    written.push(p);
                }
                if !self.info.attractor_tokens.is_empty() {
                    let p = dir.join(next.next().ok_or_else(|| anyhow::anyhow!("no file name"))?);
                    let t: Vec<(String, Tensor)> = self
                        .info
                        .attractor_tokens
                        .iter()
                        .enumerate()
                        .map(|(k, name)| Ok((name.clone(), rows.narrow(0, n + k, 1)?)))
                        .collect::<Result<_>>()?;
                    crate::files::save_safetensors(&p, &t, &fmt)?;
                    written.push(p);
                }
            }
            Learned::Mappers { mappers, .. } => {
                for (j, (m, token)) in mappers.iter().zip(self.info.all_tokens()).enumerate() {
                    let p = dir.join(&names[j]);
                    let info = MapperInfo {
                        placeholder: token,
                        super_category: if j == 0 {
                            self.info.init_word.clone()
                        } else {
                            prompts::ATTRACTOR_INIT_WORD.to_string()
                        },
                        base_model: self.info.model.clone(),
                        layers: UNET_LAYERS.iter().map(|s| s.to_string()).collect(),
                    };
                    m.save(&p, &info)?;
                    written.push(p);
                }
            }
        }
        Ok(written)
    }

    /// The LoRA factors as the adapter files hold them (module path -> down, up, alpha).
    pub fn lora_weights(&self) -> Result<crate::adapters::lora::LoraWeights> {
        let b = &self.info.settings.s.baseline;
        let alpha = b.lora_alpha.unwrap_or(b.lora_rank as f64);
        let params: HashMap<String, Tensor> = self.parameters().into_iter().collect();
        let mut w = crate::adapters::lora::LoraWeights::default();
        for (n, down) in &params {
            let Some(module) = n.strip_suffix(".lora_A.weight") else {
                continue;
            };
            let up = params
                .get(&format!("{module}.lora_B.weight"))
                .ok_or_else(|| anyhow::anyhow!("{module} has no lora_B"))?;
            w.modules.insert(
                module.to_string(),
                crate::adapters::lora::LoraModule {
                    down: down.clone(),
                    up: up.clone(),
                    alpha: Some(alpha),
                },
            );
        }
        Ok(w)
    }
}

/// What a run's `config.json` says of its class images: generated, by which prompt and
/// sampler, and for Custom Diffusion that they stand in for the paper's retrieved real images.
fn prior_source(s: &Resolved, class: &str) -> Option<String> {
    let b = &s.s.baseline;
    if !s.prior_preservation() {
        return None;
    }
    let mut text = format!(
        "{} class images generated by the frozen base model from {:?} (DDIM, {} steps, guidance {}, seeds 0..{}, {} px), cached in attractor's class-image cache",
        b.prior_images,
        b.class_prompt(class),
        b.prior_steps,
        b.prior_guidance,
        b.prior_images,
        s.s.resolution
    );
    if s.s.method == Method::CustomDiffusion {
        text.push_str("; the Custom Diffusion paper regularises with 200 real images retrieved from LAION, whose retrieval service is not available offline, so these generated images stand in for them");
    }
    Some(text)
}

/// `torch.nn.utils.clip_grad_norm_` over `vars`: the total L2 norm of their gradients (f32, as
/// PyTorch computes it), and every gradient scaled by `min(1, max_norm / (norm + 1e-6))` when
/// `max_norm > 0` (PyTorch multiplies by the clamped factor even when it is 1). Returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut sq = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    if sq.is_empty() {
        return Ok(0.0);
    }
    let norm = Tensor::stack(&sq, 0)?
        .sum_all()?
        .sqrt()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    if max_norm > 0.0 {
        let coef = (max_norm / (norm + 1e-6)).min(1.0);
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// A latent drawn from a VAE posterior, `(mean + exp(logvar / 2) n) * scaling_factor`, with
/// `n` from `rng`.
fn sample_latent(
    sd: &StableDiffusion,
    rng: &mut Rng,
    mean: &Tensor,
    logvar: &Tensor,
) -> Result<Tensor> {
    let n = rng.randn(mean.shape(), &sd.device)?;
    let z = (mean + (logvar * 0.5)?.exp()?.mul(&n)?)?;
    Ok((z * sd.vae_config.scaling_factor)?)
}

/// `0..n` in a Fisher-Yates order drawn from `rng`.
fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.range(0, i + 1);
        order.swap(i, j);
    }
    order
}

/// Add the run's tokens to a tokenizer and check they got the ids the concept expects.
pub fn add_tokens(tok: &mut ClipTokenizer, info: &RunInfo, sd: &StableDiffusion) -> Result<()> {
    add_tokens_after(tok, &info.all_tokens(), sd.text.config.vocab_size as u32)
}

/// Add `tokens` to a tokenizer and check they got the ids `vocab, vocab + 1, ...`, the rows
/// that follow the text encoder's table.
pub fn add_tokens_after(tok: &mut ClipTokenizer, tokens: &[String], vocab: u32) -> Result<()> {
    let ids = tok.add_tokens(tokens)?;
    for (j, id) in ids.iter().enumerate() {
        if *id != vocab + j as u32 {
            bail!(
                "token {} got id {id}, expected {}: the tokenizer and the text encoder's vocabulary ({vocab}) disagree",
                tokens[j],
                vocab + j as u32
            );
        }
    }
    Ok(())
}

/// Load, augment-cache and encode the training images (and masks) of a subject.
fn load_examples(
    sd: &StableDiffusion,
    subject: &Subject,
    settings: &Resolved,
    dataset_dir: &Path,
) -> Result<Vec<Example>> {
    use crate::data::image as im;
    if subject.train_images.is_empty() {
        bail!(
            "subject {} has no training images in {}",
            subject.name,
            subject.dir.display()
        );
    }
    let masks = if settings.s.method.uses_attractor() {
        Some(check_masks(subject, dataset_dir)?)
    } else {
        None
    };
    let res = settings.s.resolution as u32;
    let f = 1usize << (sd.vae_config.block_out_channels.len() - 1);
    let latent = settings.s.resolution / f;
    let dev = &sd.device;
    let mut out = Vec::new();
    for (i, path) in subject.train_images.iter().enumerate() {
        let img = im::load_rgb(path)?;
        let posterior = encode_with_mirror(sd, &img, res)?;
        let mask = match &masks {
            Some(m) => {
                let mt = im::load_mask_for(&m[i], img.dimensions(), res)?.to_device(dev)?;
                let ml = im::mask_to_latent(&mt, latent)?;
                let ml = if ml.rank() == 3 { ml.unsqueeze(0)? } else { ml };
                let mf = im::hflip(&ml)?;
                Some([ml, mf])
            }
            None => None,
        };
        let pixels = (settings.s.method == Method::CustomDiffusion).then(|| {
            image::imageops::resize(&img, res, res, image::imageops::FilterType::CatmullRom)
        });
        out.push(Example {
            posterior,
            mask,
            pixels,
        });
    }
    Ok(out)
}

/// The VAE posteriors (mean, logvar; f32) of `img` resized to `res` and of its mirror, in one
/// encoder call.
fn encode_with_mirror(
    sd: &StableDiffusion,
    img: &image::RgbImage,
    res: u32,
) -> Result<[(Tensor, Tensor); 2]> {
    use crate::data::image as im;
    let x = im::to_tensor(img, res)?
        .to_device(&sd.device)?
        .to_dtype(sd.dtype)?
        .unsqueeze(0)?;
    let both = Tensor::cat(&[&x, &im::hflip(&x)?], 0)?;
    let post = sd.vae.encode(&both)?;
    let pm = |j: usize| -> Result<(Tensor, Tensor)> {
        let f32_row = |t: &Tensor| t.narrow(0, j, 1)?.to_dtype(DType::F32);
        Ok((f32_row(&post.mean)?, f32_row(&post.logvar)?))
    };
    Ok([pm(0)?, pm(1)?])
}

/// VAE posteriors of images (and their mirrors) without masks: prior preservation's class
/// images.
fn encode_images(
    sd: &StableDiffusion,
    paths: &[PathBuf],
    resolution: usize,
) -> Result<Vec<Example>> {
    paths
        .iter()
        .map(|path| {
            let img = crate::data::image::load_rgb(path)?;
            Ok(Example {
                posterior: encode_with_mirror(sd, &img, resolution as u32)?,
                mask: None,
                pixels: None,
            })
        })
        .collect()
}
