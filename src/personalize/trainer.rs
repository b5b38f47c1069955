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
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
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
}

fn f32_name() -> String {
    DType::F32.as_str().to_string()
}

impl RunInfo {
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
    pub schedule_weight: f64,
    pub lr: f64,
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
        bail!(
            "the attractor methods need a subject mask for every training image, and these are missing:\n  {}\nFix: make them with `attractor masks --data {} --subject {}` (or draw them: white = subject, same size as the image), or train with --method ti / neti",
            missing.join("\n  "),
            dataset_dir.display(),
            subject.name
        );
    }
    Ok(paths)
}

impl<'a> Trainer<'a> {
    /// Set up a fresh run: tokens, initial rows or mappers, cached posteriors and masks.
    pub fn new(
        sd: &'a StableDiffusion,
        settings: Resolved,
        subject: &Subject,
        dataset_dir: &Path,
    ) -> Result<Self> {
        let method = settings.s.method;
        let mut rng = Rng::new(settings.s.seed);
        let mut tokenizer = sd.tokenizer.clone();
        let placeholder_tokens = prompts::placeholder_tokens(settings.s.num_vectors);
        let attractor_tokens: Vec<String> = if method.uses_attractor() {
            (0..subject.train_images.len())
                .map(prompts::attractor_token)
                .collect()
        } else {
            Vec::new()
        };
        let init_word = match &settings.s.init_word {
            Some(w) => w.clone(),
            None => tokenizer.default_init_word(&subject.class),
        };
        let init_id = tokenizer
            .single_token_id(&init_word)
            .with_context(|| "--init-word".to_string())?;
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
        let names = named_vars.iter().map(|(n, _)| n.clone()).collect();
        let vars: Vec<Var> = named_vars.into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(vars, settings.s.adamw)?;
        let examples = load_examples(sd, subject, &settings, dataset_dir)?;
        let subject_text = prompts::placeholder_text(settings.s.num_vectors);
        Ok(Self {
            sd,
            sampler: PromptSampler::new(subject_text, subject.class.clone()),
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

    /// One micro-batch: the losses (not yet backpropagated).
    fn micro_batch(&mut self, p: f64) -> Result<(Tensor, LossParts, bool)> {
        let s = self.info.settings.clone();
        let b = s.batch;
        let method = self.method();
        let sd = self.sd;
        let dev = &sd.device;
        let scale = sd.vae_config.scaling_factor;
        // 1. the batch: image, flip, timestep, posterior sample, noise
        let mut latents = Vec::with_capacity(b);
        let mut masks = Vec::with_capacity(b);
        let mut ks = Vec::with_capacity(b);
        let mut ts = Vec::with_capacity(b);
        for _ in 0..b {
            let k = self.next_image();
            let flip = (self.rng.uniform_f32() as f64) < s.s.flip_p;
            let ex = &self.examples[k];
            let (mean, logvar) = &ex.posterior[flip as usize];
            let z = (mean
                + (logvar * 0.5)?
                    .exp()?
                    .mul(&self.rng.randn(mean.shape(), dev)?)?)?;
            latents.push((z * scale)?);
            if let Some(m) = &ex.mask {
                masks.push(m[flip as usize].clone());
            }
            ks.push(k);
            ts.push(self.rng.range(0, sd.schedule.num_train_timesteps()));
        }
        let x0 = Tensor::cat(&latents, 0)?;
        let eps = self.rng.randn(x0.shape(), dev)?;
        let zt = sd.schedule.add_noise(&x0, &eps, &ts)?;
        // 2. the prompts: one per image (ti, neti) or one per pool and image (ti+, neti+)
        let prompts: Vec<String> = if method.uses_attractor() {
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
        } else {
            (0..b).map(|_| self.sampler.object(&mut self.rng)).collect()
        };
        let pools = prompts.len() / b;
        let tokens = self.tokenizer.encode_batch(&prompts)?;
        let ids = ids_tensor(&tokens, dev)?;
        let t_all: Vec<usize> = (0..pools).flat_map(|_| ts.iter().copied()).collect();
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
        // 4. one UNet call on all pools
        let x_in = zt.repeat((pools, 1, 1, 1))?.to_dtype(sd.dtype)?;
        let t_in = Tensor::new(t_all.iter().map(|&t| t as f32).collect::<Vec<_>>(), dev)?;
        let pred = sd
            .unet
            .forward(&x_in, &t_in, &enc.cond)?
            .to_dtype(DType::F32)?;
        // 5. the losses
        if !method.uses_attractor() {
            let l = losses::mse(&pred, &eps)?;
            let zero = l.zeros_like()?;
            return Ok((
                l.clone(),
                LossParts {
                    sub: zero.clone(),
                    bg: zero.clone(),
                    joint: l,
                    nce: zero,
                },
                false,
            ));
        }
        let m_s = Tensor::cat(&masks, 0)?.to_dtype(pred.dtype())?;
        let m_b = m_s.affine(-1.0, 1.0)?;
        let sub = losses::masked_mse(&pred.narrow(0, 0, b)?, &eps, &m_s)?;
        let bg = losses::masked_mse(&pred.narrow(0, b, b)?, &eps, &m_b)?;
        let joint = losses::mse(&pred.narrow(0, 2 * b, b)?, &eps)?;
        // InfoNCE on contextual embeddings: V = <v*> in the subject and joint prompts, A = the
        // attractors in the background and joint prompts; averaged over layer groups.
        let v_id = self.vocab;
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
        Ok((total, parts, true))
    }

    /// The next image of the epoch order, reshuffling (Fisher-Yates, our RNG) at each epoch start.
    fn next_image(&mut self) -> usize {
        if self.cursor >= self.order.len() {
            let n = self.examples.len();
            self.order = (0..n).collect();
            for i in (1..n).rev() {
                let j = self.rng.range(0, i + 1);
                self.order.swap(i, j);
            }
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
        let mut sums = [0f64; 5];
        let mut plus = false;
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        for _ in 0..accum {
            let t0 = std::time::Instant::now();
            let (loss, parts, is_plus) = self.micro_batch(p)?;
            plus = is_plus;
            let scalar =
                |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
            let lv = scalar(&loss)?;
            if !lv.is_finite() {
                bail!(
                    "the loss became {lv} at step {}: training stopped, and the last checkpoint in {} is kept. Fix: lower the learning rate (--lr) or check the training images",
                    self.step + 1,
                    "the run folder"
                );
            }
            sums[0] += lv;
            sums[1] += scalar(&parts.sub)?;
            sums[2] += scalar(&parts.bg)?;
            sums[3] += scalar(&parts.joint)?;
            sums[4] += scalar(&parts.nce)?;
            let t1 = std::time::Instant::now();
            forward_s += (t1 - t0).as_secs_f64();
            let g = (loss / accum as f64)?.backward()?;
            grads = Some(accumulate(grads, g, &self.opt.vars)?);
            backward_s += t1.elapsed().as_secs_f64();
        }
        let grads = grads.ok_or_else(|| anyhow::anyhow!("no micro-batches"))?;
        let lr = self.info.settings.lr;
        let t2 = std::time::Instant::now();
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
            schedule_weight: if plus {
                self.info.settings.s.schedule.weight(p)
            } else {
                0.0
            },
            lr,
        })
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
        let (loss, _, _) = self.micro_batch(0.5)?;
        let g = loss.backward()?;
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
        self.refresh_learned()?;
        Ok(())
    }

    /// Write what users load: `learned_embeds.safetensors` (TI: `{"<v*>": [n, D]}`, format pt,
    /// loads in diffusers `load_textual_inversion` and A1111), `attractors.safetensors`, or the
    /// NeTI mappers. `suffix` = `-steps-N` for intermediate saves.
    pub fn save_outputs(&self, dir: &Path, suffix: &str) -> Result<Vec<PathBuf>> {
        let names = crate::personalize::generate::learned_file_names(&self.info, suffix);
        let mut written = Vec::new();
        let mut fmt = HashMap::new();
        fmt.insert("format".to_string(), "pt".to_string());
        match &self.learned {
            Learned::Rows(rows) => {
                let n = self.info.placeholder_tokens.len();
                let p = dir.join(&names[0]);
                crate::files::save_safetensors(
                    &p,
                    &[(
                        self.info.placeholder_tokens[0].clone(),
                        rows.narrow(0, 0, n)?,
                    )],
                    &fmt,
                )?;
                written.push(p);
                if !self.info.attractor_tokens.is_empty() {
                    let p = dir.join(&names[1]);
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
}

/// Add the run's tokens to a tokenizer and check they got the ids the concept expects.
pub fn add_tokens(tok: &mut ClipTokenizer, info: &RunInfo, sd: &StableDiffusion) -> Result<()> {
    let ids = tok.add_tokens(&info.all_tokens())?;
    let vocab = sd.text.config.vocab_size as u32;
    for (j, id) in ids.iter().enumerate() {
        if *id != vocab + j as u32 {
            bail!(
                "token {} got id {id}, expected {}: the tokenizer and the text encoder's vocabulary ({vocab}) disagree",
                info.all_tokens()[j],
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
        let x = im::to_tensor(&img, res)?
            .to_device(dev)?
            .to_dtype(sd.dtype)?
            .unsqueeze(0)?;
        let xf = im::hflip(&x)?;
        let both = Tensor::cat(&[&x, &xf], 0)?;
        let post = sd.vae.encode(&both)?;
        let pm = |j: usize| -> Result<(Tensor, Tensor)> {
            let f32_row = |t: &Tensor| t.narrow(0, j, 1)?.to_dtype(DType::F32);
            Ok((f32_row(&post.mean)?, f32_row(&post.logvar)?))
        };
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
        out.push(Example {
            posterior: [pm(0)?, pm(1)?],
            mask,
        });
    }
    Ok(out)
}
