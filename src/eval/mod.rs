//! Evaluation (SPEC.md §6): the CLIP and DINO scorers, the split-test and classic protocols, the
//! append-only results store with shards and merge, and the summary.
//!
//! - [`clip`], [`dino`], [`preprocess`]: the feature extractors, parity-tested against
//!   transformers (tests/parity_scorers.rs).
//! - [`protocol`]: which images are generated and against what they are scored; the
//!   [`protocol::Generator`] trait is the seam to the image generator.
//! - [`store`]: `eval-config.json`, `results.jsonl` (resume, shards), `merge`.
//! - [`summary`]: means and standard errors, overall and per subject, per split.
//! - [`checkpoints`]: scores over a run's saved steps (the paper's Fig. 1).

pub mod checkpoints;
pub mod clip;
pub mod dino;
pub mod dinov2;
pub mod preprocess;
pub mod protocol;
pub mod store;
pub mod summary;

pub use protocol::{run_protocol, EvalSettings, Generator};
pub use summary::Summary;

use crate::hub::ModelSource;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::collections::HashMap;

/// The CLIP scorer's default hub repo and the revision that has `model.safetensors`.
pub const CLIP_REPO: &str = "openai/clip-vit-base-patch32";
pub const CLIP_REVISION: &str = "refs/pr/15";
/// The DINO scorer's default hub repo and the revision that has `model.safetensors`.
pub const DINO_REPO: &str = "facebook/dino-vits16";
pub const DINO_REVISION: &str = "refs/pr/1";

/// L2-normalised features of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageFeatures {
    /// CLIP projected image embedding.
    pub clip: Vec<f32>,
    /// DINO CLS feature.
    pub dino: Vec<f32>,
}

/// Both scorers, with a cache of text embeddings (captions repeat across samples).
pub struct Scorers {
    pub clip: clip::ClipScorer,
    pub dino: dino::DinoScorer,
    /// What was loaded, as recorded in `eval-config.json`.
    pub clip_source: ModelSource,
    pub dino_source: ModelSource,
    /// Images per forward pass (default 1: a feature then never depends on which images shared
    /// its batch, so shards and resumed runs write bit-identical lines).
    pub batch: usize,
    text_cache: HashMap<String, Vec<f32>>,
}

impl Scorers {
    /// Load CLIP and DINO from local folders or hub repos (cache first; no network when
    /// `offline`).
    pub fn load(
        clip: &ModelSource,
        dino: &ModelSource,
        device: &Device,
        offline: bool,
    ) -> Result<Self> {
        Ok(Self {
            clip: clip::ClipScorer::load(clip, device, offline)?,
            dino: dino::DinoScorer::load(dino, device, offline)?,
            clip_source: clip.clone(),
            dino_source: dino.clone(),
            batch: 1,
            text_cache: HashMap::new(),
        })
    }

    /// Normalised CLIP and DINO features of each image.
    pub fn image_features(&mut self, images: &[RgbImage]) -> Result<Vec<ImageFeatures>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(self.batch.max(1)) {
            let c = rows(
                &self
                    .clip
                    .embed_images(chunk)
                    .context("CLIP image embedding")?,
            )?;
            let d = rows(&self.dino.embed_images(chunk).context("DINO embedding")?)?;
            for (clip, dino) in c.into_iter().zip(d) {
                out.push(ImageFeatures {
                    clip: normalized(clip),
                    dino: normalized(dino),
                });
            }
        }
        Ok(out)
    }

    /// The normalised CLIP text embedding of `text` (cached).
    pub fn text_features(&mut self, text: &str) -> Result<Vec<f32>> {
        if let Some(v) = self.text_cache.get(text) {
            return Ok(v.clone());
        }
        let e = rows(&self.clip.embed_texts(&[text])?)?
            .pop()
            .context("CLIP returned no text embedding")?;
        let e = normalized(e);
        self.text_cache.insert(text.to_string(), e.clone());
        Ok(e)
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// `v / |v|` (a zero vector stays zero).
pub fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if n > 0.0 {
        for x in v.iter_mut() {
            *x = (*x as f64 / n) as f32;
        }
    }
    v
}

/// Cosine similarity of two vectors (any norm).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}
