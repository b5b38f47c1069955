//! DINOv2 as a DINO scorer (SPEC.md §6): the CLS token of `last_hidden_state` of a transformers
//! `Dinov2Model` (facebook/dinov2-small; `tests/fixtures/tiny-dinov2` has the same layout), i.e.
//! after the final layer norm, as `Dinov2Model(...).last_hidden_state[:, 0]`.
//!
//! What differs from the ViT of DINO v1 ([`super::dino`]), each as transformers v5
//! `models/dinov2/modeling_dinov2.py` does it:
//! - **Layer scale**: each residual branch is multiplied by a learned per-channel vector
//!   (`layer_scale1.lambda1`, `layer_scale2.lambda1`) before it is added.
//! - **Position embeddings are interpolated**: the checkpoint's are for `image_size` (518, a
//!   37 x 37 grid of 14-pixel patches) while the scorer sees 224-pixel crops (16 x 16). The patch
//!   grid of the positions is resized with `interpolate(mode="bicubic", align_corners=False)`
//!   (no antialiasing) to the crop's grid, the CLS position kept as is. That resize is computed
//!   once at load (the crop size is fixed), on the host, with PyTorch's bicubic taps and
//!   weights: [`resize_weights`].
//! - Its own preprocessing, from the checkpoint's `preprocessor_config.json`
//!   (`BitImageProcessor`: short side 256 bicubic, centre crop 224, ImageNet mean/std).
//! - Layer norm eps from the config (1e-6), exact (erf) GELU, an MLP of `mlp_ratio` x width.
//!
//! The SwiGLU MLP of the giant model (`use_swiglu_ffn`) is not implemented and is refused by
//! name.

use crate::nn::{LayerNorm, Linear};
use anyhow::{bail, Result};
use candle_core::{IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::path::Path;

fn d_act() -> candle_nn::Activation {
    candle_nn::Activation::Gelu
}
fn d_eps() -> f64 {
    1e-6
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
    14
}
fn d_mlp_ratio() -> f64 {
    4.0
}

/// A transformers `Dinov2Config` `config.json` (defaults: transformers' `Dinov2Config`).
#[derive(Clone, Debug, Deserialize)]
pub struct Dinov2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
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
    #[serde(default)]
    pub use_swiglu_ffn: bool,
}

impl Dinov2Config {
    /// Parse and check a config (`path` only names the file in errors).
    pub fn from_json(value: serde_json::Value, path: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a transformers Dinov2Model config.json ({e}; needs hidden_size, \
                 num_hidden_layers, num_attention_heads)",
                path.display()
            )
        })?;
        if cfg.use_swiglu_ffn {
            bail!(
                "{}: use_swiglu_ffn = true (DINOv2 giant's SwiGLU MLP) is not supported; use \
                 facebook/dinov2-small, -base or -large",
                path.display()
            );
        }
        if cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            || cfg.patch_size == 0
            || cfg.image_size < cfg.patch_size
            || cfg.mlp_ratio <= 0.0
        {
            bail!(
                "{}: inconsistent sizes (hidden size must split into heads, image size hold a \
                 patch, mlp_ratio be positive)",
                path.display()
            );
        }
        Ok(cfg)
    }

    /// The MLP's hidden width, `int(hidden_size * mlp_ratio)` as transformers computes it.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Patches per side of the stored position embeddings.
    pub fn position_grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// One pre-norm block with layer scale.
struct Layer {
    norm1: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    scale2: Tensor,
}

impl Layer {
    fn new(vb: VarBuilder, c: &Dinov2Config) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let att = vb.pp("attention");
        let lin = |vb: VarBuilder, i, o, b| Linear::new(vb, i, o, b);
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), h, c.layer_norm_eps)?,
            query: lin(att.pp("attention.query"), h, h, c.qkv_bias)?,
            key: lin(att.pp("attention.key"), h, h, c.qkv_bias)?,
            value: lin(att.pp("attention.value"), h, h, c.qkv_bias)?,
            out: lin(att.pp("output.dense"), h, h, true)?,
            scale1: vb.get(h, "layer_scale1.lambda1")?,
            norm2: LayerNorm::new(vb.pp("norm2"), h, c.layer_norm_eps)?,
            fc1: lin(vb.pp("mlp.fc1"), h, c.mlp_hidden(), true)?,
            fc2: lin(vb.pp("mlp.fc2"), c.mlp_hidden(), h, true)?,
            scale2: vb.get(h, "layer_scale2.lambda1")?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, act: candle_nn::Activation) -> Result<Tensor> {
        let y = self.norm1.forward(x)?;
        let (q, k, v) = (
            self.query.forward(&y)?,
            self.key.forward(&y)?,
            self.value.forward(&y)?,
        );
        let a = crate::nn::attention_merged(&q, &k, &v, heads, None)?;
        let a = self.out.forward(&a)?.broadcast_mul(&self.scale1)?;
        let x = (x + a)?;
        let y = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let y = self.fc2.forward(&act.forward(&y)?)?;
        Ok((x + y.broadcast_mul(&self.scale2)?)?)
    }
}

/// `Dinov2Model` without a head, for images of one size: CLS of the final-layer-normed hidden
/// states.
pub struct Dinov2Model {
    patch: crate::nn::Conv2d,
    cls_token: Tensor,
    /// `[1, 1 + grid^2, hidden]`: the CLS position and the patch positions resized to the
    /// grid of `input_size`.
    positions: Tensor,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
    /// The side of the (square) images this model takes.
    pub input_size: usize,
    pub config: Dinov2Config,
}

impl Dinov2Model {
    /// Load the weights and resize the position embeddings for `input_size` pixel images.
    pub fn new(vb: VarBuilder, config: &Dinov2Config, input_size: usize) -> Result<Self> {
        let c = config;
        let h = c.hidden_size;
        if input_size < c.patch_size {
            bail!(
                "DINOv2 needs images of at least one {}-pixel patch, got {input_size}",
                c.patch_size
            );
        }
        let emb = vb.pp("embeddings");
        let src = c.position_grid();
        let stored = emb.get((1, 1 + src * src, h), "position_embeddings")?;
        let dst = input_size / c.patch_size;
        let positions = if dst == src {
            // transformers returns the stored table unchanged when the grids agree.
            stored
        } else {
            resize_positions(&stored, src, dst)?
        };
        Ok(Self {
            patch: crate::nn::Conv2d::new(
                emb.pp("patch_embeddings.projection"),
                c.num_channels,
                h,
                c.patch_size,
                c.patch_size,
                0,
            )?,
            cls_token: emb.get((1, 1, h), "cls_token")?,
            positions,
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(vb.pp(format!("encoder.layer.{i}")), c))
                .collect::<candle_core::Result<_>>()?,
            layernorm: LayerNorm::new(vb.pp("layernorm"), h, c.layer_norm_eps)?,
            input_size,
            config: config.clone(),
        })
    }

    /// CLS features `[batch, hidden_size]` of pixels `[batch, 3, input_size, input_size]`.
    pub fn cls(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let s = self.input_size;
        let (b, ch, hh, ww) = pixel_values.dims4()?;
        if (ch, hh, ww) != (self.config.num_channels, s, s) {
            bail!(
                "DINOv2 expects pixel values of shape [batch, 3, {s}, {s}], got {:?}",
                pixel_values.dims()
            );
        }
        // 1. patches [b, hidden, g, g] -> [b, g*g, hidden], 2. CLS first, 3. + positions,
        // 4. the blocks, 5. final layer norm, 6. CLS.
        let x = self
            .patch
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .cls_token
            .broadcast_as((b, 1, self.config.hidden_size))?;
        let mut x = Tensor::cat(&[&cls, &x.contiguous()?], 1)?.broadcast_add(&self.positions)?;
        for layer in &self.layers {
            x = layer.forward(&x, self.config.num_attention_heads, self.config.hidden_act)?;
        }
        let x = self.layernorm.forward(&x)?;
        Ok(x.i((.., 0))?.contiguous()?)
    }
}

/// The stored position table `[1, 1 + src^2, dim]` with its patch grid resized from `src` x
/// `src` to `dst` x `dst` (width, then height: the sum of the 4 x 4 products in another order,
/// so equal to PyTorch's within f32 rounding).
fn resize_positions(stored: &Tensor, src: usize, dst: usize) -> Result<Tensor> {
    let dim = stored.dim(D::Minus1)?;
    let table = stored
        .to_dtype(candle_core::DType::F32)?
        .squeeze(0)?
        .to_vec2::<f32>()?;
    let taps = resize_weights(src, dst);
    // Row-major grid of `dim`-vectors: patch (y, x) is table[1 + y * src + x].
    let mut wide = vec![0f32; src * dst * dim];
    for y in 0..src {
        for (x, tx) in taps.iter().enumerate() {
            let o = &mut wide[(y * dst + x) * dim..][..dim];
            for (j, w) in tx {
                for (a, v) in o.iter_mut().zip(&table[1 + y * src + j]) {
                    *a += w * v;
                }
            }
        }
    }
    let mut out = Vec::with_capacity((1 + dst * dst) * dim);
    out.extend_from_slice(&table[0]);
    for ty in &taps {
        for x in 0..dst {
            let mut o = vec![0f32; dim];
            for (j, w) in ty {
                for (a, v) in o.iter_mut().zip(&wide[(j * dst + x) * dim..][..dim]) {
                    *a += w * v;
                }
            }
            out.extend(o);
        }
    }
    Ok(
        Tensor::from_vec(out, (1, 1 + dst * dst, dim), stored.device())?
            .to_dtype(stored.dtype())?,
    )
}

/// PyTorch's cubic convolution constant for `mode="bicubic"` without antialiasing.
const A: f32 = -0.75;

/// `|x| <= 1` branch of the cubic convolution kernel.
fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

/// `1 < |x| < 2` branch.
fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// For each of `dst` outputs, the 4 inputs it reads and their weights: PyTorch's
/// `interpolate(mode="bicubic", align_corners=False)` along one axis (`upsample_bicubic2d`:
/// source `scale (i + 0.5) - 0.5` with scale `src / dst`, not clamped; taps `floor - 1 ..=
/// floor + 2`, clamped to the edges; Keys' weights with a = -0.75). No antialiasing, also
/// when shrinking, as transformers' `Dinov2Embeddings.interpolate_pos_encoding` calls it.
pub fn resize_weights(src: usize, dst: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = src as f32 / dst as f32;
    (0..dst)
        .map(|i| {
            let real = scale * (i as f32 + 0.5) - 0.5;
            let floor = real.floor();
            let t = real - floor;
            let w = [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)];
            (0..4)
                .map(|k| {
                    let j = (floor as i64 - 1 + k as i64).clamp(0, src as i64 - 1) as usize;
                    (j, w[k])
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_weights_sum_to_one_and_keep_the_identity() {
        for (src, dst) in [(37, 16), (3, 16), (16, 16), (5, 2)] {
            let w = resize_weights(src, dst);
            assert_eq!(w.len(), dst);
            for taps in &w {
                assert_eq!(taps.len(), 4);
                assert!(taps.iter().all(|(j, _)| *j < src));
                assert!((taps.iter().map(|t| t.1).sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
        // Same size: the identity (the kernel is 1 at 0 and 0 at the other integers).
        for (i, taps) in resize_weights(6, 6).iter().enumerate() {
            let mut per_input = [0f32; 6];
            for (j, w) in taps {
                per_input[*j] += w;
            }
            for (j, w) in per_input.iter().enumerate() {
                let want = if j == i { 1.0 } else { 0.0 };
                assert!((w - want).abs() < 1e-6, "{i} {j} {w}");
            }
        }
    }

    #[test]
    fn positions_keep_cls_and_a_constant_grid() {
        let dev = candle_core::Device::Cpu;
        let (src, dst, dim) = (5, 3, 2);
        let mut data = vec![7.0f32, -7.0];
        data.extend((0..src * src).flat_map(|_| [0.25f32, 1.5]));
        let t = Tensor::from_vec(data, (1, 1 + src * src, dim), &dev).unwrap();
        let r = resize_positions(&t, src, dst).unwrap();
        let v = r.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(v.len(), 1 + dst * dst);
        assert_eq!(v[0], vec![7.0, -7.0]);
        // A constant stays constant: each output is a sum of 16 taps whose weights add to 1
        // within f32 rounding (1.3e-6 measured on 1.5).
        for row in &v[1..] {
            assert!(
                (row[0] - 0.25).abs() < 1e-5 && (row[1] - 1.5).abs() < 1e-5,
                "{row:?}"
            );
        }
    }
}
