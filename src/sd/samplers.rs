//! Inference samplers over a [`NoiseSchedule`]: DDIM (eta 0) and DPM-Solver++ 2M, each a stateful
//! object that turns the denoiser's noise prediction at timestep `t` into the next, less noisy
//! sample. Classifier-free guidance is the pipeline's job: pass the guided eps to [`Sampler::step`].
//!
//! Driving one (the pipeline's loop):
//!
//! ```ignore
//! let mut sampler = make_sampler(SamplerKind::Ddim, &schedule, &sched_cfg, 50)?;
//! let mut x = (rng.randn(latent_shape, &device)? * sampler.init_noise_sigma())?;
//! for t in sampler.timesteps().to_vec() {
//!     let eps = guided_unet(&x, t)?; // the model input is x itself: no input scaling
//!     x = sampler.step(&eps, t, &x)?;
//! }
//! // x are the final scaled latents: decode with vae.decode(&(x / scaling_factor)?)
//! ```
//!
//! References, diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951:
//! [`DDIMScheduler`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_ddim.py#L334)
//! and
//! [`DPMSolverMultistepScheduler`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py#L367)
//! as `from_config` builds them from the SD 1.5 scheduler config (DPM: `dpmsolver++`, order 2,
//! midpoint, `lower_order_final`, `final_sigmas_type="zero"`, no Karras sigmas). Scalar coefficients
//! are computed in f64 from the float32 schedule values; tensor arithmetic runs in f32.

use crate::sd::schedule::{NoiseSchedule, SchedulerConfig, TimestepSpacing};
use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// Which sampler to run, spelled as users type it: `ddim` or `dpmpp2m`.
#[derive(
    clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default,
)]
pub enum SamplerKind {
    /// DDIM, eta 0, "leading" spacing with the config's `steps_offset` (the default).
    #[default]
    #[value(name = "ddim")]
    #[serde(rename = "ddim")]
    Ddim,
    /// DPM-Solver++ 2M, "linspace" spacing, first order at the first and last step.
    #[value(name = "dpmpp2m")]
    #[serde(rename = "dpmpp2m")]
    Dpmpp2m,
}

impl SamplerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Dpmpp2m => "dpmpp2m",
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stateful sampler. Call [`Sampler::step`] once per entry of [`Sampler::timesteps`], in order,
/// with the (guided) noise prediction at that timestep; make a new sampler for each generation.
pub trait Sampler: Send {
    /// The timesteps to evaluate the denoiser at, from noisiest to cleanest.
    fn timesteps(&self) -> &[usize];
    /// One update: `eps` is the noise prediction for `sample` at timestep `t`; returns the sample
    /// for the next timestep (after the last one: the final latents). Output dtype = `sample`'s.
    fn step(&mut self, eps: &Tensor, t: usize, sample: &Tensor) -> Result<Tensor>;
    /// Standard deviation of the initial noise (1 for both samplers here).
    fn init_noise_sigma(&self) -> f64;
}

/// Build a sampler of `kind` with `steps` inference steps. `schedule` must be the one built from
/// `cfg`. Errors when `steps` is 0 or gives timesteps outside `0..T`.
pub fn make_sampler(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    cfg: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    let t = schedule.num_train_timesteps();
    if cfg.num_train_timesteps != t {
        candle_core::bail!(
            "sampler: the schedule has {t} timesteps but its config says {}; build both from one config",
            cfg.num_train_timesteps
        );
    }
    if steps == 0 || steps > t {
        candle_core::bail!("sampler: {steps} inference steps requested; use 1 to {t}");
    }
    Ok(match kind {
        SamplerKind::Ddim => Box::new(Ddim::new(schedule, cfg, steps)?),
        SamplerKind::Dpmpp2m => Box::new(DpmSolverPp2m::new(schedule, cfg, steps)?),
    })
}

/// `np.linspace(start, stop, num)`: `i * ((stop - start) / (num - 1)) + start`, last = `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, 0, -step)` for positive floats: `ceil(start / step)` values `start + i * d`,
/// with `d = (start - step) - start` as numpy's fill computes it.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil().max(0.0) as usize;
    let d = (start - step) - start;
    (0..n).map(|i| start + i as f64 * d).collect()
}

/// Rounded (half to even, as numpy) non-negative floats to timesteps, each checked against `0..t`.
fn to_timesteps(v: impl IntoIterator<Item = f64>, t: usize, what: &str) -> Result<Vec<usize>> {
    v.into_iter()
        .map(|x| {
            let r = x.round_ties_even();
            if r < 0.0 || r >= t as f64 {
                candle_core::bail!("{what}: timestep {r} falls outside 0..{t}")
            }
            Ok(r as usize)
        })
        .collect()
}

/// DDIM's inference timesteps (`DDIMScheduler.set_timesteps`).
fn ddim_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<usize>> {
    let t = cfg.num_train_timesteps;
    let what = "ddim timesteps";
    match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading) {
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            to_timesteps(
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64),
                t,
                what,
            )
        }
        TimestepSpacing::Linspace => to_timesteps(
            np_linspace(0.0, (t - 1) as f64, steps)
                .into_iter()
                .map(f64::round_ties_even)
                .rev(),
            t,
            what,
        ),
        TimestepSpacing::Trailing => to_timesteps(
            np_arange_down(t as f64, t as f64 / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0),
            t,
            what,
        ),
    }
}

/// DPM-Solver's inference timesteps (`DPMSolverMultistepScheduler.set_timesteps` with
/// `lambda_min_clipped=-inf`, so the last usable timestep is `T`).
fn dpm_timesteps(cfg: &SchedulerConfig, steps: usize) -> Result<Vec<usize>> {
    let t = cfg.num_train_timesteps;
    let what = "dpmpp2m timesteps";
    match cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (t - 1) as f64, steps + 1);
            v.remove(0); // [::-1][:-1] drops the 0 at the start
            to_timesteps(v.into_iter().rev(), t, what)
        }
        TimestepSpacing::Leading => {
            let ratio = t / (steps + 1);
            to_timesteps(
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64),
                t,
                what,
            )
        }
        TimestepSpacing::Trailing => to_timesteps(
            np_arange_down(t as f64, t as f64 / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0),
            t,
            what,
        ),
    }
}

/// DDIM with eta 0 and epsilon prediction.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<usize>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// `T // steps`: diffusers steps from `t` to `t - T // steps` whatever the spacing.
    step_ratio: usize,
    clip_sample_range: Option<f64>,
}

impl Ddim {
    pub fn new(schedule: &NoiseSchedule, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let ac = schedule.alphas_cumprod().to_vec();
        Ok(Self {
            timesteps: ddim_timesteps(cfg, steps)?,
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            step_ratio: cfg.num_train_timesteps / steps,
            clip_sample_range: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Mirrors [`DDIMScheduler.step`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_ddim.py#L384) with eta 0.
    fn step(&mut self, eps: &Tensor, t: usize, sample: &Tensor) -> Result<Tensor> {
        let dtype = sample.dtype();
        let (eps, x) = (eps.to_dtype(DType::F32)?, sample.to_dtype(DType::F32)?);
        // 1. abar at t and at the previous timestep t - T // steps (the final abar below 0).
        let a_t = match self.alphas_cumprod.get(t) {
            Some(&a) => a,
            None => candle_core::bail!(
                "ddim step: timestep {t} outside 0..{}",
                self.alphas_cumprod.len()
            ),
        };
        let a_prev = match t.checked_sub(self.step_ratio) {
            Some(p) => self.alphas_cumprod[p],
            None => self.final_alpha_cumprod,
        };
        // 2. Predicted x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), optionally clipped.
        let mut x0 = ((x - (&eps * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
        if let Some(r) = self.clip_sample_range {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        // 3. Direction to x_t (std_dev_t = 0 for eta 0), and the previous sample.
        let dir = (&eps * (1.0 - a_prev).sqrt())?;
        ((x0 * a_prev.sqrt())? + dir)?.to_dtype(dtype)
    }
}

/// `(alpha_t, sigma_t)` of a VP schedule from `sigma = sqrt((1 - abar) / abar)`
/// (`_sigma_to_alpha_sigma_t`): `alpha_t = 1 / sqrt(sigma^2 + 1)`, `sigma_t = sigma alpha_t`.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = log(alpha_t) - log(sigma_t)` (+inf at sigma 0).
fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// DPM-Solver++ (data prediction) 2M, midpoint solver, for an epsilon-predicting model.
#[derive(Debug, Clone)]
pub struct DpmSolverPp2m {
    timesteps: Vec<usize>,
    /// One sigma per timestep plus the final sigma 0 (`final_sigmas_type="zero"`), as float32.
    sigmas: Vec<f64>,
    /// The x0 prediction of the previous step (`model_outputs[-2]`).
    prev_x0: Option<Tensor>,
    step_index: usize,
}

impl DpmSolverPp2m {
    pub fn new(schedule: &NoiseSchedule, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let timesteps = dpm_timesteps(cfg, steps)?;
        // sigma_t = ((1 - abar) / abar) ** 0.5 in float32 for every training t; np.interp at
        // integer timesteps returns these values exactly. Then the final sigma 0.
        let ac = schedule.alphas_cumprod();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let a = ac[t] as f32;
                ((1f32 - a) / a).sqrt() as f64
            })
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prev_x0: None,
            step_index: 0,
        })
    }
}

impl Sampler for DpmSolverPp2m {
    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Mirrors [`DPMSolverMultistepScheduler.step`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py#L1196)
    /// with its first- and second-order updates (lines 847 and 921).
    fn step(&mut self, eps: &Tensor, t: usize, sample: &Tensor) -> Result<Tensor> {
        let i = self.step_index;
        let n = self.timesteps.len();
        if i >= n {
            candle_core::bail!("dpmpp2m step: all {n} steps are done; make a new sampler");
        }
        if t != self.timesteps[i] {
            candle_core::bail!(
                "dpmpp2m step {i}: called with timestep {t}, expected {} (call step once per \
                 entry of timesteps(), in order)",
                self.timesteps[i]
            );
        }
        let dtype = sample.dtype();
        let (eps, x) = (eps.to_dtype(DType::F32)?, sample.to_dtype(DType::F32)?);
        // 1. convert_model_output: x0 = (x - sigma_s eps) / alpha_s at the current sigma.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let x0 = ((&x - (&eps * sigma_s0)?)? / alpha_s0)?;
        // 2. The target sigma (0 after the last step) and the step size in lambda.
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let phi = (-h).exp() - 1.0; // exp(-h) - 1 (-1 when the target sigma is 0)
        let base = (&x * (sigma_t / sigma_s0))?;
        // 3. First order at the first step (no history) and at the last step (lower_order_final,
        //    forced by final_sigmas_type="zero"); otherwise the 2M midpoint update.
        let out = match (&self.prev_x0, i + 1 == n) {
            (Some(m1), false) => {
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
                let h0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
                let r0 = h0 / h;
                // D0 = m0, D1 = (m0 - m1) / r0
                let d1 = ((&x0 - m1)? * (1.0 / r0))?;
                ((base - (&x0 * (alpha_t * phi))?)? - (d1 * (0.5 * alpha_t * phi))?)?
            }
            _ => (base - (&x0 * (alpha_t * phi))?)?,
        };
        self.prev_x0 = Some(x0);
        self.step_index += 1;
        out.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> SchedulerConfig {
        crate::sd::config::parse_json(
            r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "clip_sample": false, "num_train_timesteps": 1000, "set_alpha_to_one": false,
                "steps_offset": 1}"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn ddim_50_steps_leading() {
        let ts = ddim_timesteps(&sd15(), 50).unwrap();
        assert_eq!(ts.len(), 50);
        assert_eq!(ts[0], 981);
        assert_eq!(ts[1], 961);
        assert_eq!(ts[49], 1);
    }

    #[test]
    fn dpm_50_steps_linspace() {
        let ts = dpm_timesteps(&sd15(), 50).unwrap();
        assert_eq!(ts.len(), 50);
        assert_eq!(&ts[..3], &[999, 979, 959]);
        assert_eq!(ts[49], 20);
    }

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 10.0, 3), vec![0.0, 5.0, 10.0]);
        assert_eq!(np_arange_down(1000.0, 100.0).len(), 10);
        assert_eq!(
            np_arange_down(1000.0, 300.0),
            vec![1000.0, 700.0, 400.0, 100.0]
        );
    }

    #[test]
    fn trailing_spacing() {
        let mut cfg = sd15();
        cfg.timestep_spacing = Some(TimestepSpacing::Trailing);
        assert_eq!(ddim_timesteps(&cfg, 4).unwrap(), vec![999, 749, 499, 249]);
    }

    #[test]
    fn sampler_kind_spelling() {
        use clap::ValueEnum;
        assert_eq!(
            SamplerKind::from_str("dpmpp2m", false).unwrap(),
            SamplerKind::Dpmpp2m
        );
        assert_eq!(
            SamplerKind::from_str("ddim", false).unwrap(),
            SamplerKind::Ddim
        );
        assert_eq!(
            serde_json::to_string(&SamplerKind::Dpmpp2m).unwrap(),
            "\"dpmpp2m\""
        );
        let k: SamplerKind = serde_json::from_str("\"ddim\"").unwrap();
        assert_eq!(k, SamplerKind::Ddim);
    }
}
