//! The held-out loss (SPEC.md §9): the noise-prediction loss on the subject's **test** images
//! at fixed (timestep, noise) pairs, and the same quantity on its training images beside it.
//!
//! The training loss says nothing about overfitting (kohya-ss/sd-scripts issue 193): it is
//! measured on the images being fitted, at fresh random timesteps and noise each step. This one
//! is measured on images the run never trains on, at the same pairs every time, so its changes
//! over training are the model's alone:
//! - timesteps: [`TIMESTEPS`] of them, the midpoints of equal bins of `0..T` (62, 187, ...,
//!   937 for T = 1000): evenly spread, never the degenerate t = 0;
//! - noise: one draw per (image, timestep) from a seed derived from the image's file name
//!   ([`noise_seed`]), independent of the run's seed, of the training RNG and of `--resume`;
//! - latents: VAE posterior means (no sampling), scaled, of each image at the training
//!   resolution (no flip, no Custom Diffusion rescale);
//! - conditioning: the method's own, with the prompt `a photo of <subject>` ([`PROMPT`]; the
//!   learned token, DreamBooth's `sks dog`, Custom Diffusion's `<new1> dog`) and NeTI's
//!   per-timestep, per-layer embeddings without nested dropout.
//!
//! The loss is the mean over images and timesteps of the per-row MSE, in f64. Everything here is
//! forward only; the trainer runs it in chunks no larger than its own step's UNet rows, so it
//! never needs more memory than training does.

use crate::personalize::trainer::{HeldOutLosses, Trainer};
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::path::{Path, PathBuf};

/// Fixed timesteps per image.
pub const TIMESTEPS: usize = 8;
/// The held-out prompt; `{}` is the subject's text (`RunInfo::subject_text`).
pub const PROMPT: &str = "a photo of {}";

/// The fixed timesteps: the midpoints of `TIMESTEPS` equal bins of `0..num_train_timesteps`.
pub fn timesteps(num_train_timesteps: usize) -> Vec<usize> {
    (0..TIMESTEPS)
        .map(|j| (2 * j + 1) * num_train_timesteps / (2 * TIMESTEPS))
        .collect()
}

/// The seed of an image's noise draws: from its file name only, so the pairs are the same in
/// every run, every evaluation and after `--resume`.
pub fn noise_seed(image: &Path) -> u64 {
    Rng::derive_seed(&["heldout-loss", &crate::data::layout::file_name(image)])
}

/// One image of a held-out set: its scaled posterior-mean latent and its fixed noise draws.
struct Item {
    /// `[1, 4, h, w]`, f32.
    latent: Tensor,
    /// `[TIMESTEPS, 4, h, w]`, f32: row j goes with `timesteps()[j]`.
    noise: Tensor,
}

/// A set of images encoded once for repeated held-out evaluations.
pub struct HeldOutSet {
    pub images: Vec<PathBuf>,
    items: Vec<Item>,
    timesteps: Vec<usize>,
}

impl HeldOutSet {
    /// Encode `images` at `resolution` with the VAE and draw their fixed noise.
    pub fn encode(sd: &StableDiffusion, images: &[PathBuf], resolution: usize) -> Result<Self> {
        if images.is_empty() {
            bail!("a held-out set needs at least one image");
        }
        let dev = &sd.device;
        let mut items = Vec::with_capacity(images.len());
        for path in images {
            let img = crate::data::image::load_rgb(path)?;
            let x = crate::data::image::to_tensor(&img, resolution as u32)?
                .to_device(dev)?
                .to_dtype(sd.dtype)?
                .unsqueeze(0)?;
            let post = sd.vae.encode(&x)?;
            let latent = (post.mean.to_dtype(DType::F32)? * sd.vae_config.scaling_factor)?;
            let (_, c, h, w) = latent.dims4()?;
            let noise = Rng::new(noise_seed(path)).randn((TIMESTEPS, c, h, w), dev)?;
            items.push(Item { latent, noise });
        }
        Ok(Self {
            images: images.to_vec(),
            items,
            timesteps: timesteps(sd.schedule.num_train_timesteps()),
        })
    }

    /// The mean noise-prediction MSE of the trainer's current parameters over the set, running
    /// at most `chunk` UNet rows per call.
    pub fn loss(&self, trainer: &Trainer, chunk: usize) -> Result<f64> {
        let chunk = chunk.max(1);
        let sd = trainer.sd;
        let dev = &sd.device;
        let prompt = PROMPT.replace("{}", &trainer.info.subject_text());
        let tokens = trainer.tokenizer.encode_batch(&[prompt])?;
        let mut total = 0f64;
        let mut rows = 0usize;
        for item in &self.items {
            for start in (0..TIMESTEPS).step_by(chunk) {
                let n = chunk.min(TIMESTEPS - start);
                let ts = &self.timesteps[start..start + n];
                let eps = item.noise.narrow(0, start, n)?;
                let x0 = item.latent.repeat((n, 1, 1, 1))?;
                let zt = sd.schedule.add_noise(&x0, &eps, ts)?;
                let batch = vec![tokens[0].clone(); n];
                let ids = crate::personalize::tokens::ids_tensor(&batch, dev)?;
                let pred = trainer.predict_noise(&zt, ts, &ids)?;
                // Per row, then summed: every row weighs the same whatever the chunking.
                let per_row = (pred - &eps)?.sqr()?.flatten_from(1)?.mean(1)?;
                let v: Vec<f64> = per_row.to_dtype(DType::F64)?.to_vec1()?;
                total += v.iter().sum::<f64>();
                rows += n;
            }
        }
        Ok(total / rows as f64)
    }
}

/// The held-out evaluations of a run: the test images' set and the training images' set.
pub struct HeldOut {
    pub test: HeldOutSet,
    pub train: HeldOutSet,
}

impl HeldOut {
    pub fn encode(
        sd: &StableDiffusion,
        test_images: &[PathBuf],
        train_images: &[PathBuf],
        resolution: usize,
    ) -> Result<Self> {
        Ok(Self {
            test: HeldOutSet::encode(sd, test_images, resolution)?,
            train: HeldOutSet::encode(sd, train_images, resolution)?,
        })
    }

    /// Both losses at the trainer's current parameters.
    pub fn evaluate(&self, trainer: &Trainer) -> Result<HeldOutLosses> {
        let chunk = trainer.unet_rows_per_step();
        Ok(HeldOutLosses {
            heldout_loss: self.test.loss(trainer, chunk)?,
            train_ref_loss: self.train.loss(trainer, chunk)?,
        })
    }
}

/// Which held-out evaluation was best so far, and whether training should stop
/// (`train --keep-best`, `--early-stop P`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BestTracker {
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: usize,
    /// (step, held-out loss) of the lowest loss so far; the earliest step on ties.
    pub best: Option<(usize, f64)>,
    /// Evaluations since the best one.
    pub since_best: usize,
}

impl BestTracker {
    pub fn new(patience: usize) -> Self {
        Self {
            patience,
            ..Self::default()
        }
    }

    /// Record an evaluation; true when it is a new best (strictly lower loss).
    pub fn observe(&mut self, step: usize, loss: f64) -> bool {
        let improved = match self.best {
            None => true,
            Some((_, b)) => loss < b,
        };
        if improved {
            self.best = Some((step, loss));
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        improved
    }

    /// True once `patience` evaluations in a row brought no improvement.
    pub fn should_stop(&self) -> bool {
        self.patience > 0 && self.since_best >= self.patience
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_are_bin_midpoints() {
        assert_eq!(timesteps(1000), vec![62, 187, 312, 437, 562, 687, 812, 937]);
        assert!(timesteps(10).iter().all(|&t| t < 10));
    }

    #[test]
    fn noise_seed_depends_on_the_file_name_only() {
        let a = noise_seed(Path::new("/data/dog/03.jpg"));
        assert_eq!(a, noise_seed(Path::new("elsewhere/03.jpg")));
        assert_ne!(a, noise_seed(Path::new("/data/dog/04.jpg")));
    }

    /// A scripted loss sequence: the tracker keeps the argmin (earliest on ties) and stops
    /// after `patience` evaluations without a strictly lower loss.
    #[test]
    fn early_stop_on_a_scripted_sequence() {
        let losses = [0.50, 0.40, 0.45, 0.40, 0.30, 0.31, 0.32, 0.33, 0.10];
        let mut t = BestTracker::new(3);
        let mut stopped_at = None;
        for (i, &l) in losses.iter().enumerate() {
            let step = (i + 1) * 10;
            t.observe(step, l);
            if t.should_stop() {
                stopped_at = Some(step);
                break;
            }
        }
        assert_eq!(stopped_at, Some(80));
        assert_eq!(t.best, Some((50, 0.30)));
        // A tie is no improvement: the earliest step stays best.
        let mut t = BestTracker::new(0);
        assert!(t.observe(1, 0.2));
        assert!(!t.observe(2, 0.2));
        assert_eq!(t.best, Some((1, 0.2)));
        assert!(!t.should_stop(), "patience 0 never stops");
    }
}
