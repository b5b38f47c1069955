//! The CLIP scorer (SPEC.md §6): projected image and text embeddings of a transformers
//! `CLIPModel` checkpoint (openai/clip-vit-base-patch32; `tests/fixtures/tiny-clip` has the same
//! layout).
//!
//! The two towers are candle-transformers' `clip::{ClipTextTransformer, ClipVisionTransformer}`,
//! configured from the checkpoint's `config.json` (candle ships only hand-written configs; ours
//! are read from the file) and loaded with the transformers key names (`text_model.*`,
//! `vision_model.*`, `text_projection`, `visual_projection`). Scoring needs no gradients, so
//! candle's fused (backward-less) layer norm inside those towers is fine here.
//!
//! Text follows transformers' `CLIPTextModelWithProjection`: BOS + BPE tokens (at most 75) +
//! EOS, padded to 77 with `<|endoftext|>`; the pooled output is the final-layer-normed hidden
//! state at the first position of the largest id (the EOS: the original CLIP's `argmax`, which
//! transformers keeps for checkpoints whose config says `eos_token_id = 2`).
//! Reference: transformers v5 `models/clip/modeling_clip.py` `CLIPTextTransformer.forward`.

use super::preprocess::Preprocess;
use crate::hub::ModelSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{text_model, vision_model};
use image::RgbImage;
use serde::Deserialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// CLIP's text context length.
pub const CONTEXT_LEN: usize = 77;

fn d_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_vision_hidden() -> usize {
    768
}
fn d_vision_inter() -> usize {
    3072
}
fn d_vision_heads() -> usize {
    12
}
fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_channels() -> usize {
    3
}
fn d_projection() -> usize {
    512
}

/// `text_config` of a transformers CLIP `config.json` (defaults: ViT-B/32's).
#[derive(Clone, Debug, Deserialize)]
pub struct TextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// `vision_config` of a transformers CLIP `config.json` (defaults: ViT-B/32's).
#[derive(Clone, Debug, Deserialize)]
pub struct VisionConfig {
    #[serde(default = "d_vision_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vision_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vision_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// A transformers `CLIPModel` `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "d_projection")]
    pub projection_dim: usize,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a transformers CLIPModel config.json (needs text_config and vision_config)",
                path.display()
            )
        })?;
        cfg.check(path)?;
        Ok(cfg)
    }

    /// candle's towers hard-code quick GELU and LN eps 1e-5 (every OpenAI CLIP uses both):
    /// refuse a config that says otherwise rather than compute something else.
    fn check(&self, path: &Path) -> Result<()> {
        for (tower, act, eps) in [
            (
                "text_config",
                &self.text_config.hidden_act,
                self.text_config.layer_norm_eps,
            ),
            (
                "vision_config",
                &self.vision_config.hidden_act,
                self.vision_config.layer_norm_eps,
            ),
        ] {
            if act != "quick_gelu" {
                bail!(
                    "{}: {tower}.hidden_act = {act:?}; only \"quick_gelu\" CLIP checkpoints are supported",
                    path.display()
                );
            }
            if (eps - 1e-5).abs() > 1e-12 {
                bail!(
                    "{}: {tower}.layer_norm_eps = {eps}; only 1e-5 is supported",
                    path.display()
                );
            }
        }
        let t = &self.text_config;
        let v = &self.vision_config;
        if t.num_attention_heads == 0
            || t.hidden_size % t.num_attention_heads != 0
            || v.num_attention_heads == 0
            || v.hidden_size % v.num_attention_heads != 0
            || v.patch_size == 0
            || v.image_size % v.patch_size != 0
        {
            bail!(
                "{}: inconsistent sizes (hidden size must split into heads, image size into patches)",
                path.display()
            );
        }
        Ok(())
    }

    fn candle_text(&self) -> text_model::ClipTextConfig {
        let t = &self.text_config;
        text_model::ClipTextConfig {
            vocab_size: t.vocab_size,
            embed_dim: t.hidden_size,
            activation: text_model::Activation::QuickGelu,
            intermediate_size: t.intermediate_size,
            max_position_embeddings: t.max_position_embeddings,
            pad_with: None,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            projection_dim: self.projection_dim,
        }
    }

    fn candle_vision(&self) -> vision_model::ClipVisionConfig {
        let v = &self.vision_config;
        vision_model::ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: text_model::Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: self.projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        }
    }
}

/// CLIP's BPE tokenizer, padded and truncated to 77 tokens as transformers does.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let tokenizer = Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot load the CLIP tokenizer {}: {e}; it must be a tokenizers `tokenizer.json` \
                 such as openai/clip-vit-base-patch32's",
                path.display()
            )
        })?;
        let id = |t: &str| {
            tokenizer.token_to_id(t).with_context(|| {
                format!("{} has no {t} token: not a CLIP tokenizer", path.display())
            })
        };
        Ok(Self {
            bos: id("<|startoftext|>")?,
            eos: id("<|endoftext|>")?,
            tokenizer,
        })
    }

    /// `[BOS, tokens (at most 75), EOS, EOS padding]`: exactly 77 ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {text:?}: {e}"))?;
        let body = enc.get_ids();
        let body = &body[..body.len().min(CONTEXT_LEN - 2)];
        let mut ids = Vec::with_capacity(CONTEXT_LEN);
        ids.push(self.bos);
        ids.extend_from_slice(body);
        ids.push(self.eos);
        ids.resize(CONTEXT_LEN, self.eos);
        Ok(ids)
    }
}

/// The first position of the largest id in each row (the EOS of a CLIP-tokenized prompt),
/// computed on the host so ties resolve to the first occurrence as `torch.argmax` does.
fn pooled_positions(ids: &[Vec<u32>]) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            let mut best = 0;
            for (i, id) in row.iter().enumerate() {
                if *id > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// CLIP's two towers and projections.
pub struct ClipModel {
    text: text_model::ClipTextTransformer,
    vision: vision_model::ClipVisionTransformer,
    text_projection: crate::nn::Linear,
    visual_projection: crate::nn::Linear,
    pub config: ClipConfig,
    device: Device,
}

impl ClipModel {
    /// Build from a VarBuilder over transformers `CLIPModel` weights.
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> candle_core::Result<Self> {
        let text =
            text_model::ClipTextTransformer::new(vb.pp("text_model"), &config.candle_text())?;
        let vision = vision_model::ClipVisionTransformer::new(
            vb.pp("vision_model"),
            &config.candle_vision(),
        )?;
        let text_projection = crate::nn::Linear::new(
            vb.pp("text_projection"),
            config.text_config.hidden_size,
            config.projection_dim,
            false,
        )?;
        let visual_projection = crate::nn::Linear::new(
            vb.pp("visual_projection"),
            config.vision_config.hidden_size,
            config.projection_dim,
            false,
        )?;
        Ok(Self {
            text,
            vision,
            text_projection,
            visual_projection,
            config: config.clone(),
            device: vb.device().clone(),
        })
    }

    /// Projected image embeddings `[batch, projection_dim]` of preprocessed pixels
    /// `[batch, 3, image_size, image_size]` (not normalised).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = self.config.vision_config.image_size;
        let (_, c, h, w) = pixel_values.dims4()?;
        if (c, h, w) != (self.config.vision_config.num_channels, size, size) {
            bail!(
                "CLIP expects pixel values of shape [batch, 3, {size}, {size}], got {:?}",
                pixel_values.dims()
            );
        }
        let pooled = self.vision.forward(pixel_values)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// Projected text embeddings `[batch, projection_dim]` of token ids (77 per row, not
    /// normalised).
    pub fn text_embeds(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("no texts to embed");
        }
        let len = ids[0].len();
        if len == 0
            || len > self.config.text_config.max_position_embeddings
            || ids.iter().any(|r| r.len() != len)
        {
            bail!(
                "token rows must all have the same length, 1..={}",
                self.config.text_config.max_position_embeddings
            );
        }
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (ids.len(), len), &self.device)?;
        let hidden = self.text.forward_with_mask(&input, usize::MAX)?;
        let rows = pooled_positions(ids)
            .into_iter()
            .enumerate()
            .map(|(b, p)| hidden.i((b, p)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        Ok(self.text_projection.forward(&pooled)?)
    }
}

/// CLIP ready to score: model, tokenizer and preprocessing.
pub struct ClipScorer {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocess: Preprocess,
    device: Device,
}

impl ClipScorer {
    /// Load `config.json`, `model.safetensors`, `tokenizer.json` and `preprocessor_config.json`
    /// from a local folder or a hub repo.
    pub fn load(source: &ModelSource, device: &Device, offline: bool) -> Result<Self> {
        let file = |name: &str| {
            source
                .file(name, offline)
                .with_context(|| format!("CLIP scorer ({source})"))
        };
        let config = ClipConfig::from_file(&file("config.json")?)?;
        let tokenizer = ClipTokenizer::from_file(&file("tokenizer.json")?)?;
        let preprocess = Preprocess::from_clip_config(&file("preprocessor_config.json")?)?;
        if preprocess.crop as usize != config.vision_config.image_size {
            bail!(
                "CLIP scorer ({source}): preprocessor crop {} differs from the model's image size {}",
                preprocess.crop,
                config.vision_config.image_size
            );
        }
        let weights = file("model.safetensors")?;
        // SAFETY: the file is memory-mapped read-only; it is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let model = ClipModel::new(vb, &config).with_context(|| {
            format!(
                "{} does not hold CLIPModel weights matching its config.json",
                weights.display()
            )
        })?;
        Ok(Self {
            model,
            tokenizer,
            preprocess,
            device: device.clone(),
        })
    }

    /// Projected embeddings of images (raw, `[batch, projection_dim]`).
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Tensor> {
        let pixels = self.preprocess.batch(images, &self.device)?;
        self.model.image_embeds(&pixels)
    }

    /// Projected embeddings of texts (raw, `[batch, projection_dim]`).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let ids = texts
            .iter()
            .map(|t| self.tokenizer.encode(t))
            .collect::<Result<Vec<_>>>()?;
        self.model.text_embeds(&ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_position_is_first_eos() {
        let ids = vec![vec![49406, 320, 49407, 49407], vec![49406, 5, 6, 49407]];
        assert_eq!(pooled_positions(&ids), vec![2, 3]);
    }
}
