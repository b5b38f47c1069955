//! The DINO scorer (SPEC.md §6): the CLS token of `last_hidden_state` of a transformers
//! `ViTModel` (facebook/dino-vits16; `tests/fixtures/tiny-dino` has the same layout: keys
//! `embeddings.*`, `encoder.layer.N.*`, `layernorm.*` with no `vit.` prefix, no pooler).
//!
//! The embeddings and encoder are candle-transformers' `vit::{Embeddings, Encoder}` (their key
//! names are transformers'); the final layer norm uses the checkpoint's `layer_norm_eps`
//! (1e-12 for DINO). Position embeddings are used as stored: images are always preprocessed to
//! the model's own size (224), so no interpolation is needed.
//! Reference: transformers v5 `models/vit/modeling_vit.py` `ViTModel.forward`.

use super::preprocess::Preprocess;
use crate::hub::ModelSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::vit;
use image::RgbImage;
use serde::Deserialize;
use std::path::Path;

fn d_act() -> candle_nn::Activation {
    candle_nn::Activation::Gelu
}
fn d_eps() -> f64 {
    1e-12
}
fn d_channels() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    16
}

/// A transformers ViT `config.json` (defaults: transformers' `ViTConfig`).
#[derive(Clone, Debug, Deserialize)]
pub struct DinoConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: candle_nn::Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
}

impl DinoConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a transformers ViTModel config.json (needs hidden_size, \
                 num_hidden_layers, num_attention_heads, intermediate_size)",
                path.display()
            )
        })?;
        if cfg.num_attention_heads == 0
            || cfg.hidden_size % cfg.num_attention_heads != 0
            || cfg.patch_size == 0
            || cfg.image_size % cfg.patch_size != 0
        {
            bail!(
                "{}: inconsistent sizes (hidden size must split into heads, image size into patches)",
                path.display()
            );
        }
        Ok(cfg)
    }

    fn candle(&self) -> vit::Config {
        vit::Config {
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: self.hidden_act,
            layer_norm_eps: self.layer_norm_eps,
            image_size: self.image_size,
            patch_size: self.patch_size,
            num_channels: self.num_channels,
            qkv_bias: self.qkv_bias,
        }
    }
}

/// A ViT without a head: CLS of the final-layer-normed hidden states.
pub struct DinoModel {
    embeddings: vit::Embeddings,
    encoder: vit::Encoder,
    layernorm: crate::nn::LayerNorm,
    pub config: DinoConfig,
}

impl DinoModel {
    pub fn new(vb: VarBuilder, config: &DinoConfig) -> candle_core::Result<Self> {
        let cfg = config.candle();
        Ok(Self {
            embeddings: vit::Embeddings::new(&cfg, false, vb.pp("embeddings"))?,
            encoder: vit::Encoder::new(&cfg, vb.pp("encoder"))?,
            layernorm: crate::nn::LayerNorm::new(
                vb.pp("layernorm"),
                config.hidden_size,
                config.layer_norm_eps,
            )?,
            config: config.clone(),
        })
    }

    /// CLS features `[batch, hidden_size]` of pixels `[batch, 3, image_size, image_size]`.
    pub fn cls(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = self.config.image_size;
        let (_, c, h, w) = pixel_values.dims4()?;
        if (c, h, w) != (self.config.num_channels, size, size) {
            bail!(
                "DINO expects pixel values of shape [batch, 3, {size}, {size}], got {:?}",
                pixel_values.dims()
            );
        }
        // 1. patch + CLS embeddings + positions, 2. encoder, 3. final layer norm, 4. CLS.
        let x = self.embeddings.forward(pixel_values, None, false)?;
        let x = self.encoder.forward(&x)?;
        let x = self.layernorm.forward(&x)?;
        Ok(x.i((.., 0))?.contiguous()?)
    }
}

/// DINO ready to score: model and preprocessing.
pub struct DinoScorer {
    pub model: DinoModel,
    pub preprocess: Preprocess,
    device: Device,
}

impl DinoScorer {
    /// Load `config.json` and `model.safetensors` from a local folder or a hub repo.
    pub fn load(source: &ModelSource, device: &Device, offline: bool) -> Result<Self> {
        let file = |name: &str| {
            source
                .file(name, offline)
                .with_context(|| format!("DINO scorer ({source})"))
        };
        let config = DinoConfig::from_file(&file("config.json")?)?;
        let preprocess = Preprocess::dino();
        if preprocess.crop as usize != config.image_size {
            bail!(
                "DINO scorer ({source}): the model's image size is {}, the DINO protocol crops 224",
                config.image_size
            );
        }
        let weights = file("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only; it is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let model = DinoModel::new(vb, &config).with_context(|| {
            format!(
                "{} does not hold ViTModel weights (keys embeddings.*, encoder.layer.N.*, \
                 layernorm.*) matching its config.json",
                weights.display()
            )
        })?;
        Ok(Self {
            model,
            preprocess,
            device: device.clone(),
        })
    }

    /// CLS features of images (raw, `[batch, hidden_size]`).
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        let pixels = self.preprocess.batch(images, &self.device)?;
        self.model.cls(&pixels)
    }
}
