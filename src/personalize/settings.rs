//! Training settings: one struct that TOML presets (configs/*.toml) and `train` flags both fill,
//! so a TOML key and its flag share one name. Method-dependent defaults are resolved once, and the
//! resolved settings (with the learning rate after scaling) are printed and saved with the run.

use crate::personalize::losses::LossWeights;
use crate::personalize::method::{Method, Schedule};
use crate::personalize::optim::AdamWConfig;
use crate::ranges::Range;
use serde::{Deserialize, Serialize};

/// What `train` runs. `None` fields take the method's default in [`TrainSettings::resolve`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// ti | ti+ | neti | neti+.
    pub method: Method,
    /// Optimizer steps in total (default: ti 5000, neti 1000).
    pub steps: Option<usize>,
    /// Images per micro-batch (default 2).
    pub batch: Option<usize>,
    /// Micro-batches per optimizer step (default: ti 1, neti 4).
    pub grad_accum: Option<usize>,
    /// Base learning rate before scaling (default: ti 5e-3, neti 1e-3).
    pub base_lr: Option<f64>,
    /// Multiply the base learning rate by batch x grad_accum, as diffusers' `--scale_lr`
    /// (default: yes for ti, neti and custom-diffusion, no for the DreamBooth methods).
    pub scale_lr: Option<bool>,
    /// Training resolution in pixels (default 512).
    pub resolution: usize,
    /// Probability of a horizontal flip (default 0.5; 0 for the DreamBooth methods, whose
    /// scripts do not flip).
    pub flip_p: Option<f64>,
    /// Vectors for `<v*>` (Textual Inversion only; default 1).
    pub num_vectors: usize,
    /// Initializer word of `<v*>` (one token; default: the class word if one token, else "object").
    /// NeTI: the super-category word whose embedding norm scales the mapper output.
    pub init_word: Option<String>,
    /// Contrastive-weight schedule over training (attractor methods; default cosine).
    pub schedule: Schedule,
    /// Loss weights w_s, w_b, w_i, w_c (defaults 1, 1, 1, 0.1).
    pub weights: LossWeights,
    /// InfoNCE temperature (default 0.07).
    pub tau: f64,
    /// Save a checkpoint every N optimizer steps (default 500; 0 = only at the end).
    pub save_every: usize,
    /// Write validation images every N steps (default 0 = off).
    pub validate_every: usize,
    /// Validation prompt (`{}` = the subject).
    pub validation_prompt: String,
    /// Sampler steps of validation images.
    pub validation_steps: usize,
    /// Evaluate the held-out loss (SPEC.md §9: the test images' noise-prediction loss at fixed
    /// timesteps and noise, with the training images' beside it) every N optimizer steps
    /// (default 0 = off).
    pub heldout_every: usize,
    /// Keep the learned files of the step with the lowest held-out loss as `RUN/best/`
    /// (needs heldout_every).
    pub keep_best: bool,
    /// Stop after this many held-out evaluations without a lower loss (default 0 = never;
    /// needs heldout_every).
    pub early_stop: usize,
    pub adamw: AdamWConfig,
    /// Random seed (noise, timesteps, images, flips, templates, dropout).
    pub seed: u64,
    /// The weight-training baselines (dreambooth, dreambooth-lora, custom-diffusion,
    /// dreambooth-lora+); ignored by the token methods.
    pub baseline: BaselineSettings,
}

/// Settings of the methods that train model weights (SPEC.md §8).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineSettings {
    /// The rare token that names the subject in DreamBooth prompts (default `sks`).
    pub identifier: String,
    /// Instance prompt; `{identifier}` and `{class}` are filled in (default
    /// `a photo of {identifier} {class}`; Custom Diffusion: `photo of a <new1> {class}`).
    pub instance_prompt: Option<String>,
    /// Class prompt of the prior-preservation images; `{class}` is filled in (default
    /// `a photo of {class}`, diffusers' README).
    pub class_prompt: Option<String>,
    /// Class images for prior preservation (default 200; 0 = no prior preservation).
    pub prior_images: usize,
    /// Weight of the prior loss (default 1.0).
    pub prior_loss_weight: f64,
    /// Sampler steps of the generated class images (default 50, the pipeline's default).
    pub prior_steps: usize,
    /// Guidance scale of the generated class images (default 7.5).
    pub prior_guidance: f64,
    /// Also fine-tune the text encoder (DreamBooth: all of it; LoRA: its attention
    /// projections), at the same learning rate.
    pub train_text_encoder: bool,
    /// LoRA rank r (default 4).
    pub lora_rank: usize,
    /// LoRA alpha (default: the rank, so the scale alpha / r is 1).
    pub lora_alpha: Option<f64>,
    /// Clip the gradients' total L2 norm to this (default 1.0; 0 = no clipping).
    pub max_grad_norm: f64,
    /// Recompute each UNet block in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Custom Diffusion's modifier token (default `<new1>`; its row starts from `--init-word`,
    /// default `sks`: the reference default `ktn` is two CLIP tokens).
    pub modifier_token: String,
    /// Custom Diffusion: the BOS token's cross-attention keys and values get no gradient, as
    /// diffusers' `CustomDiffusionAttnProcessor` and the paper's code do (default true).
    pub detach_bos: bool,
}

impl Default for BaselineSettings {
    fn default() -> Self {
        Self {
            identifier: "sks".into(),
            instance_prompt: None,
            class_prompt: None,
            prior_images: 200,
            prior_loss_weight: 1.0,
            prior_steps: 50,
            prior_guidance: 7.5,
            train_text_encoder: false,
            lora_rank: 4,
            lora_alpha: None,
            max_grad_norm: 1.0,
            gradient_checkpointing: false,
            modifier_token: "<new1>".into(),
            detach_bos: true,
        }
    }
}

impl BaselineSettings {
    /// The instance prompt of `method` for a subject of class `class`.
    pub fn instance_prompt(&self, method: Method, class: &str) -> String {
        let t = match (&self.instance_prompt, method) {
            (Some(t), _) => t.clone(),
            (None, Method::CustomDiffusion) => {
                format!("photo of a {} {{class}}", self.modifier_token)
            }
            (None, _) => "a photo of {identifier} {class}".to_string(),
        };
        t.replace("{identifier}", &self.identifier)
            .replace("{class}", class)
    }

    /// The class prompt for a subject of class `class`.
    pub fn class_prompt(&self, class: &str) -> String {
        self.class_prompt
            .clone()
            .unwrap_or_else(|| "a photo of {class}".to_string())
            .replace("{class}", class)
    }

    /// alpha / r, the factor of every LoRA product.
    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64) / self.lora_rank.max(1) as f64
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            method: Method::Ti,
            steps: None,
            batch: None,
            grad_accum: None,
            base_lr: None,
            scale_lr: None,
            resolution: 512,
            flip_p: None,
            num_vectors: 1,
            init_word: None,
            schedule: Schedule::Cosine,
            weights: LossWeights::default(),
            tau: 0.07,
            save_every: 500,
            validate_every: 0,
            validation_prompt: "a photo of {}".into(),
            validation_steps: 25,
            heldout_every: 0,
            keep_best: false,
            early_stop: 0,
            adamw: AdamWConfig::default(),
            seed: 0,
            baseline: BaselineSettings::default(),
        }
    }
}

/// Settings with every default filled in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Resolved {
    #[serde(flatten)]
    pub s: TrainSettings,
    // Renamed in JSON: the flattened settings already have optional `steps`, `batch`,
    // `grad_accum` and `base_lr` keys, and duplicate keys do not read back.
    #[serde(rename = "resolved_steps")]
    pub steps: usize,
    #[serde(rename = "resolved_batch")]
    pub batch: usize,
    #[serde(rename = "resolved_grad_accum")]
    pub grad_accum: usize,
    #[serde(rename = "resolved_base_lr")]
    pub base_lr: f64,
    /// The learning rate used: base_lr x batch x grad_accum when scale_lr.
    pub lr: f64,
    #[serde(rename = "resolved_scale_lr", default = "yes")]
    pub scale_lr: bool,
    #[serde(rename = "resolved_flip_p", default = "half")]
    pub flip_p: f64,
}

fn yes() -> bool {
    true
}
fn half() -> f64 {
    0.5
}

impl Resolved {
    /// True when each micro-batch carries class images: a method that does prior preservation,
    /// with at least one class image.
    pub fn prior_preservation(&self) -> bool {
        self.s.method.uses_prior() && self.s.baseline.prior_images > 0
    }
}

impl TrainSettings {
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let m = self.method;
        let steps = self.steps.unwrap_or_else(|| m.default_steps());
        let batch = self.batch.unwrap_or_else(|| m.default_batch());
        let grad_accum = self.grad_accum.unwrap_or_else(|| m.default_grad_accum());
        let base_lr = self.base_lr.unwrap_or_else(|| m.default_base_lr());
        // The ranges the `train` flags check at parse time (crate::ranges), for values that
        // come from a TOML preset or a run's config.json; named by their TOML key.
        let check = |name: &str, v: f64, r: Range| r.check(name, v).map_err(anyhow::Error::msg);
        check("steps", steps as f64, Range::AtLeast(1))?;
        check("batch", batch as f64, Range::AtLeast(1))?;
        check("grad_accum", grad_accum as f64, Range::AtLeast(1))?;
        check("base_lr", base_lr, Range::Positive)?;
        check("resolution", self.resolution as f64, Range::MultipleOf8)?;
        check("num_vectors", self.num_vectors as f64, Range::AtLeast(1))?;
        check("tau", self.tau, Range::Positive)?;
        let w = &self.weights;
        for (name, v) in [
            ("weights.w_s", w.w_s),
            ("weights.w_b", w.w_b),
            ("weights.w_i", w.w_i),
            ("weights.w_c", w.w_c),
        ] {
            check(name, v, Range::NonNegative)?;
        }
        if let Some(p) = self.flip_p {
            check("flip_p", p, Range::Unit)?;
        }
        if self.heldout_every == 0 && (self.keep_best || self.early_stop > 0) {
            anyhow::bail!(
                "{} needs the held-out loss: add --heldout-every N (e.g. --heldout-every 50)",
                if self.keep_best {
                    "--keep-best"
                } else {
                    "--early-stop"
                }
            );
        }
        check(
            "validation_steps",
            self.validation_steps as f64,
            Range::AtLeast(1),
        )?;
        if m.uses_neti() && self.num_vectors != 1 {
            anyhow::bail!(
                "NeTI learns one token: num_vectors must be 1 (got {})",
                self.num_vectors
            );
        }
        let b = &self.baseline;
        if m.trains_weights() {
            check("baseline.lora_rank", b.lora_rank as f64, Range::AtLeast(1))?;
            if let Some(a) = b.lora_alpha {
                check("baseline.lora_alpha", a, Range::Positive)?;
            }
            check(
                "baseline.prior_loss_weight",
                b.prior_loss_weight,
                Range::NonNegative,
            )?;
            check(
                "baseline.prior_guidance",
                b.prior_guidance,
                Range::NonNegative,
            )?;
            check(
                "baseline.max_grad_norm",
                b.max_grad_norm,
                Range::NonNegative,
            )?;
            if b.prior_images > 0 {
                check(
                    "baseline.prior_steps",
                    b.prior_steps as f64,
                    Range::AtLeast(1),
                )?;
            }
        }
        let scale_lr = self.scale_lr.unwrap_or_else(|| m.default_scale_lr());
        let flip_p = self
            .flip_p
            .unwrap_or(if m.uses_identifier() { 0.0 } else { 0.5 });
        let mut lr = if scale_lr {
            Method::scaled_lr(base_lr, batch, grad_accum)
        } else {
            base_lr
        };
        // train_custom_diffusion.py doubles a scaled rate with prior preservation (the class
        // images double the batch).
        if scale_lr && m == Method::CustomDiffusion && b.prior_images > 0 {
            lr *= 2.0;
        }
        Ok(Resolved {
            s: self.clone(),
            steps,
            batch,
            grad_accum,
            base_lr,
            lr,
            scale_lr,
            flip_p,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config.json` of a run holds a `Resolved`; `train --resume` and `eval --run` read it back,
    /// with defaults left unset and with every value given.
    #[test]
    fn resolved_round_trips_through_json() {
        let mut s = TrainSettings::default();
        for _ in 0..2 {
            let r = s.resolve().unwrap();
            let text = serde_json::to_string_pretty(&r).unwrap();
            let back: Resolved = serde_json::from_str(&text).unwrap();
            assert_eq!(back, r, "{text}");
            s.steps = Some(7);
            s.batch = Some(1);
            s.grad_accum = Some(3);
            s.base_lr = Some(2e-3);
        }
    }

    /// A preset's out-of-range values are refused where they resolve, with the flags' words.
    #[test]
    fn preset_values_get_the_flag_ranges() {
        let bad = |edit: &dyn Fn(&mut TrainSettings)| {
            let mut s = TrainSettings::default();
            edit(&mut s);
            s.resolve().unwrap_err().to_string()
        };
        assert_eq!(
            bad(&|s| s.steps = Some(0)),
            "steps 0: expected a whole number >= 1"
        );
        assert!(
            bad(&|s| s.base_lr = Some(0.0)).starts_with("base_lr 0: expected a finite number > 0")
        );
        assert!(bad(&|s| s.resolution = 500)
            .starts_with("resolution 500: expected a positive multiple of 8"));
        assert!(bad(&|s| s.tau = -1.0).starts_with("tau -1: expected"));
        assert!(bad(&|s| s.weights.w_c = -0.1).starts_with("weights.w_c -0.1: expected"));
        assert!(
            bad(&|s| s.flip_p = Some(1.5)).starts_with("flip_p 1.5: expected a number from 0 to 1")
        );
        let lora = |s: &mut TrainSettings| s.method = Method::DreamBoothLora;
        assert!(bad(&|s| {
            lora(s);
            s.baseline.lora_rank = 0
        })
        .starts_with("baseline.lora_rank 0: expected"));
        assert!(bad(&|s| {
            lora(s);
            s.baseline.lora_alpha = Some(0.0)
        })
        .starts_with("baseline.lora_alpha 0: expected"));
    }
}
