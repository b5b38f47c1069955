//! The DINO scorer (SPEC.md §6): the CLS token of `last_hidden_state` of a self-supervised ViT.
//! Which one is read from the checkpoint's `config.json` (`model_type`), never from its name:
//!
//! - `vit`: a transformers `ViTModel` as DINO v1 ships it (facebook/dino-vits16, and
//!   facebook/dino-vits8, the same network with 8-pixel patches; `tests/fixtures/tiny-dino` has
//!   the layout: keys `embeddings.*`, `encoder.layer.N.*`, `layernorm.*` with no `vit.` prefix,
//!   no pooler). The embeddings and encoder are candle-transformers' `vit::{Embeddings,
//!   Encoder}` (their key names are transformers'); the final layer norm uses the checkpoint's
//!   `layer_norm_eps` (1e-12 for DINO). Position embeddings are used as stored: images are
//!   always preprocessed to the model's own size (224), so no interpolation is needed. The
//!   preprocessing is DINO's evaluation transform ([`Preprocess::dino`]), not the checkpoint's
//!   `preprocessor_config.json` (a classification resize to 224 x 224 that the papers do not use).
//!   Reference: transformers v5 `models/vit/modeling_vit.py` `ViTModel.forward`.
//! - `dinov2`: a transformers `Dinov2Model` (facebook/dinov2-small), see [`super::dinov2`], with
//!   its own `preprocessor_config.json`.

use super::dinov2::{Dinov2Config, Dinov2Model};
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
        Self::from_json(read_json(path)?, path)
    }

    /// Parse and check a config (`path` only names the file in errors).
    pub fn from_json(value: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a transformers ViTModel config.json ({e}; needs hidden_size, \
                 num_hidden_layers, num_attention_heads, intermediate_size)",
                path.display()
            )
        })?;
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || cfg.patch_size == 0
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
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

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The network behind a DINO scorer, as its `config.json` says.
pub enum DinoBackbone {
    /// DINO v1: a transformers `ViTModel` (ViT-S/16, ViT-S/8, ...).
    Vit(DinoModel),
    /// A transformers `Dinov2Model`.
    Dinov2(Dinov2Model),
}

/// The `model_type` values a DINO scorer loads.
const DINO_MODEL_TYPES: &str = "\"vit\" (facebook/dino-vits16, facebook/dino-vits8) or \"dinov2\" \
                                (facebook/dinov2-small)";

impl DinoBackbone {
    /// CLS features `[batch, hidden_size]` of preprocessed pixels.
    pub fn cls(&self, pixel_values: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(m) => m.cls(pixel_values),
            Self::Dinov2(m) => m.cls(pixel_values),
        }
    }

    /// What the network is, read from its config (not from its name); the parity tests check it.
    pub fn architecture(&self) -> String {
        match self {
            Self::Vit(m) => {
                let c = &m.config;
                format!(
                    "ViTModel (DINO): patch {}, {} px, {} layers x {}, {} heads; feature: CLS of \
                     last_hidden_state",
                    c.patch_size,
                    c.image_size,
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads
                )
            }
            Self::Dinov2(m) => {
                let c = &m.config;
                format!(
                    "Dinov2Model: patch {}, positions for {} px resized to {} px, {} layers x {}, \
                     {} heads, layer scale; feature: CLS of last_hidden_state",
                    c.patch_size,
                    c.image_size,
                    m.input_size,
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.num_attention_heads
                )
            }
        }
    }
}

/// DINO ready to score: model and preprocessing.
pub struct DinoScorer {
    pub model: DinoBackbone,
    pub preprocess: Preprocess,
    device: Device,
}

impl DinoScorer {
    /// Load `config.json` and `model.safetensors` (and, for DINOv2, `preprocessor_config.json`)
    /// from a local folder or a hub repo.
    pub fn load(source: &ModelSource, device: &Device, offline: bool) -> Result<Self> {
        let file = |name: &str| {
            source
                .file(name, offline)
                .with_context(|| format!("DINO scorer ({source})"))
        };
        let config_path = file("config.json")?;
        let json = read_json(&config_path)?;
        let model_type = json
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("vit")
            .to_string();
        enum Parsed {
            Vit(DinoConfig),
            Dinov2(Dinov2Config, Preprocess),
        }
        let parsed = match model_type.as_str() {
            "vit" => {
                let config = DinoConfig::from_json(json, &config_path)?;
                if Preprocess::dino().crop as usize != config.image_size {
                    bail!(
                        "DINO scorer ({source}): the model's image size is {}, the DINO protocol \
                         crops 224",
                        config.image_size
                    );
                }
                Parsed::Vit(config)
            }
            "dinov2" => {
                let config = Dinov2Config::from_json(json, &config_path)?;
                let pre = Preprocess::from_config(
                    &file("preprocessor_config.json")?,
                    Preprocess::dino(),
                )?;
                Parsed::Dinov2(config, pre)
            }
            other => bail!(
                "DINO scorer ({source}): {} has model_type {other:?}; supported are \
                 {DINO_MODEL_TYPES}",
                config_path.display()
            ),
        };
        let weights = file("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only; it is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let (model, preprocess) = match parsed {
            Parsed::Vit(config) => (
                DinoBackbone::Vit(DinoModel::new(vb, &config).with_context(|| {
                    format!(
                        "{} does not hold ViTModel weights (keys embeddings.*, \
                         encoder.layer.N.*, layernorm.*) matching its config.json",
                        weights.display()
                    )
                })?),
                Preprocess::dino(),
            ),
            Parsed::Dinov2(config, pre) => (
                DinoBackbone::Dinov2(
                    Dinov2Model::new(vb, &config, pre.crop as usize).with_context(|| {
                        format!(
                            "{} does not hold Dinov2Model weights (keys embeddings.*, \
                             encoder.layer.N.*, layernorm.*) matching its config.json",
                            weights.display()
                        )
                    })?,
                ),
                pre,
            ),
        };
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
