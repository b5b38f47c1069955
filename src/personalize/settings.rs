//! Training settings: one struct that TOML presets (configs/*.toml) and `train` flags both fill,
//! so a TOML key and its flag share one name. Method-dependent defaults are resolved once, and the
//! resolved settings (with the learning rate after scaling) are printed and saved with the run.

use crate::personalize::losses::LossWeights;
use crate::personalize::method::{Method, Schedule};
use crate::personalize::optim::AdamWConfig;
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
    /// Multiply the base learning rate by batch x grad_accum (default true, as diffusers' --scale_lr).
    pub scale_lr: bool,
    /// Training resolution in pixels (default 512).
    pub resolution: usize,
    /// Probability of a horizontal flip (default 0.5).
    pub flip_p: f64,
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
    pub adamw: AdamWConfig,
    /// Random seed (noise, timesteps, images, flips, templates, dropout).
    pub seed: u64,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            method: Method::Ti,
            steps: None,
            batch: None,
            grad_accum: None,
            base_lr: None,
            scale_lr: true,
            resolution: 512,
            flip_p: 0.5,
            num_vectors: 1,
            init_word: None,
            schedule: Schedule::Cosine,
            weights: LossWeights::default(),
            tau: 0.07,
            save_every: 500,
            validate_every: 0,
            validation_prompt: "a photo of {}".into(),
            validation_steps: 25,
            adamw: AdamWConfig::default(),
            seed: 0,
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
}

impl TrainSettings {
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        let m = self.method;
        let steps = self.steps.unwrap_or_else(|| m.default_steps());
        let batch = self.batch.unwrap_or_else(|| m.default_batch());
        let grad_accum = self.grad_accum.unwrap_or_else(|| m.default_grad_accum());
        let base_lr = self.base_lr.unwrap_or_else(|| m.default_base_lr());
        if steps == 0 || batch == 0 || grad_accum == 0 {
            anyhow::bail!("steps, batch and grad_accum must be at least 1 (got {steps}, {batch}, {grad_accum})");
        }
        if !self.resolution.is_multiple_of(8) || self.resolution == 0 {
            anyhow::bail!(
                "resolution {} is not a positive multiple of 8",
                self.resolution
            );
        }
        if m.uses_neti() && self.num_vectors != 1 {
            anyhow::bail!(
                "NeTI learns one token: num_vectors must be 1 (got {})",
                self.num_vectors
            );
        }
        if self.num_vectors == 0 {
            anyhow::bail!("num_vectors must be at least 1");
        }
        let lr = if self.scale_lr {
            Method::scaled_lr(base_lr, batch, grad_accum)
        } else {
            base_lr
        };
        Ok(Resolved {
            s: self.clone(),
            steps,
            batch,
            grad_accum,
            base_lr,
            lr,
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
}
