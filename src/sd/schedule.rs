//! The DDPM noise schedule of SD 1.5: `scheduler/scheduler_config.json`, the cumulative products
//! `abar_t` of `1 - beta_t`, and the forward process `x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`.
//!
//! Reference: diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951,
//! [`DDIMScheduler.__init__`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_ddim.py#L213)
//! and [`add_noise`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_ddim.py#L517).
//! PyTorch computes the betas in float32 (`torch.linspace(..., dtype=float32)`, squared in float32)
//! and their cumulative product with a double accumulator on the CPU, rounded to float32; this
//! module does the same, so `abar` matches diffusers to the last float32 bit or so.

use crate::sd::config::{parse_json, ConfigError};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// How betas are spaced over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, T)` (the diffusers default).
    #[default]
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), T)^2` (SD 1.5).
    ScaledLinear,
}

/// What the denoiser predicts. Only epsilon prediction (SD 1.5) is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
}

/// How a sampler spreads its inference timesteps over `0..T` (Table 2 of arXiv:2305.08891).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestepSpacing {
    Leading,
    Linspace,
    Trailing,
}

/// `scheduler/scheduler_config.json`. The SD 1.5 file is written for `PNDMScheduler`; diffusers'
/// `from_config` reads the keys every scheduler shares, and so does this struct. Unknown keys
/// (`skip_prk_steps`, `_class_name`, ...) are ignored; defaults are those of `DDIMScheduler`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "thousand")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; when given they replace `beta_start`/`beta_end`/`beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Added to DDIM's "leading" timesteps (SD 1.5: 1, so 50 steps end at t = 1).
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM's `abar` after the last step: 1 when true, else `abar_0` (SD 1.5: false).
    #[serde(default = "yes")]
    pub set_alpha_to_one: bool,
    /// DDIM clamps its x0 prediction to `[-clip_sample_range, clip_sample_range]` (SD 1.5: false).
    #[serde(default = "yes")]
    pub clip_sample: bool,
    #[serde(default = "one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub prediction_type: PredictionType,
    /// When absent each sampler uses its diffusers default (DDIM "leading", DPM++ "linspace").
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Must be false (SD 1.5 does not use zero terminal SNR).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Must be false (dynamic thresholding is for pixel-space models).
    #[serde(default)]
    pub thresholding: bool,
}

fn thousand() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn yes() -> bool {
    true
}
fn one() -> f64 {
    1.0
}

impl SchedulerConfig {
    /// Parse the JSON text of a `scheduler_config.json` and validate it.
    pub fn from_json(text: &str, origin: &str) -> std::result::Result<Self, ConfigError> {
        let cfg: Self = parse_json(text, origin)?;
        cfg.validate().map_err(|e| e.with_origin(origin))?;
        Ok(cfg)
    }

    /// Check that the schedule can be built; the error names the offending key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        const ORIGIN: &str = "scheduler config";
        if self.num_train_timesteps < 2 {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "num_train_timesteps",
                self.num_train_timesteps.to_string(),
                "2 or more",
            ));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(ConfigError::unsupported(
                    ORIGIN,
                    "trained_betas",
                    format!("{} values", b.len()),
                    format!("num_train_timesteps = {} values", self.num_train_timesteps),
                ));
            }
        }
        for (key, v) in [
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("thresholding", self.thresholding),
        ] {
            if v {
                return Err(ConfigError::unsupported(ORIGIN, key, "true", "false"));
            }
        }
        Ok(())
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` on the CPU: the ends are cast to float32, the
/// step is computed in float32, and the second half counts back from `end`.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The cumulative products `abar_t = prod_{s <= t} (1 - beta_s)`, `t = 0..T`.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Build the schedule of `cfg` (validated first).
    pub fn new(cfg: &SchedulerConfig) -> std::result::Result<Self, ConfigError> {
        cfg.validate()?;
        let t = cfg.num_train_timesteps;
        // 1. Betas in float32, as diffusers.
        let betas: Vec<f32> = match (&cfg.trained_betas, cfg.beta_schedule) {
            (Some(b), _) => b.iter().map(|&x| x as f32).collect(),
            (None, BetaSchedule::Linear) => torch_linspace_f32(cfg.beta_start, cfg.beta_end, t),
            (None, BetaSchedule::ScaledLinear) => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), t)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
        };
        // 2. alphas = 1 - betas in float32; cumulative product with a double accumulator, each
        //    partial product stored as float32 (torch.cumprod on the CPU).
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1f32 - b) as f64;
                acc as f32 as f64
            })
            .collect();
        Ok(Self { alphas_cumprod })
    }

    /// T, the number of training timesteps.
    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// All `abar_t`, `t = 0..T` (float32 values held as f64).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// `abar_t`; an error when `t >= T`.
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        match self.alphas_cumprod.get(t) {
            Some(&a) => Ok(a),
            None => candle_core::bail!(
                "timestep {t} is out of range: the schedule has {} training timesteps",
                self.alphas_cumprod.len()
            ),
        }
    }

    /// The forward process `sqrt(abar_t) x0 + sqrt(1 - abar_t) eps` with one timestep per sample:
    /// `timesteps[i]` applies to `x0[i]` (the first dimension). `x0` and `eps` have the same shape.
    /// The coefficients are computed in float32 as diffusers does and follow `x0`'s dtype and device.
    pub fn add_noise(&self, x0: &Tensor, eps: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        if x0.shape() != eps.shape() {
            candle_core::bail!(
                "add_noise: x0 has shape {:?} but eps has {:?}",
                x0.dims(),
                eps.dims()
            );
        }
        let b = x0.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!(
                "add_noise: {} timesteps for a batch of {b}: give one timestep per sample",
                timesteps.len()
            );
        }
        let mut ca = Vec::with_capacity(b);
        let mut cb = Vec::with_capacity(b);
        for &t in timesteps {
            let a = self.alpha_bar(t)? as f32;
            ca.push(a.sqrt());
            cb.push((1f32 - a).sqrt());
        }
        let mut shape = vec![1usize; x0.rank()];
        shape[0] = b;
        let ca = Tensor::from_vec(ca, shape.clone(), x0.device())?.to_dtype(x0.dtype())?;
        let cb = Tensor::from_vec(cb, shape, x0.device())?.to_dtype(x0.dtype())?;
        x0.broadcast_mul(&ca)?.add(&eps.broadcast_mul(&cb)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_linspace_hits_both_ends() {
        let v = torch_linspace_f32(0.1, 0.7, 7);
        assert_eq!(v.len(), 7);
        assert_eq!(v[0], 0.1f32);
        assert_eq!(v[6], 0.7f32);
        assert!((v[3] - 0.4).abs() < 1e-7);
    }

    #[test]
    fn alpha_bar_rejects_out_of_range() {
        let cfg: SchedulerConfig = parse_json("{}", "test").unwrap();
        let s = NoiseSchedule::new(&cfg).unwrap();
        assert_eq!(s.num_train_timesteps(), 1000);
        assert!(s.alpha_bar(999).is_ok());
        let err = s.alpha_bar(1000).unwrap_err().to_string();
        assert!(err.contains("1000"), "{err}");
    }
}
