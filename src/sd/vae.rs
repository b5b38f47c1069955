//! The SD 1.5 VAE (diffusers `AutoencoderKL` with `DownEncoderBlock2D` / `UpDecoderBlock2D`
//! blocks): images in [-1, 1] to a diagonal Gaussian posterior over latents, and latents back to
//! images. It loads the diffusers key names of `vae/diffusion_pytorch_model.safetensors` as they are.
//!
//! Reference: diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (the golden tensors were
//! made with diffusers 0.42, whose VAE code is the same), files
//! `src/diffusers/models/autoencoders/{autoencoder_kl,vae}.py`, `models/resnet.py`,
//! `models/{down,up}sampling.py`, `models/unets/unet_2d_blocks.py` and
//! `models/attention_processor.py` (`AttnProcessor2_0`).
//!
//! Latent scaling is the caller's job: [`Vae::encode`] returns the unscaled posterior (training
//! latents are `posterior.sample(rng) * scaling_factor`) and [`Vae::decode`] takes unscaled latents
//! (pass `latents / scaling_factor`).
//!
//! All layers come from [`crate::nn`]; the VAE is frozen in every method, so nothing here needs a
//! backward, but the graph is differentiable anyway.

use crate::nn::{
    attention, merge_heads, split_heads, upsample_nearest2x, Conv2d, GroupNorm, Linear,
};
use crate::rng::Rng;
use crate::sd::config::{parse_json, ConfigError};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// `eps` of every group norm in the VAE (diffusers hard-codes `resnet_eps=1e-6`).
const NORM_EPS: f64 = 1e-6;

/// `vae/config.json` of a diffusers `AutoencoderKL`. Unknown keys (`sample_size`, `force_upcast`,
/// ...) are ignored; defaults are those of `AutoencoderKL.__init__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// Must be absent or null: a shift (SD3, Flux) changes the latent scaling this crate assumes.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn silu() -> String {
    "silu".to_string()
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

impl VaeConfig {
    /// Parse the JSON text of a `vae/config.json` and validate it; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> std::result::Result<Self, ConfigError> {
        let cfg: Self = parse_json(text, origin)?;
        cfg.validate().map_err(|e| e.with_origin(origin))?;
        Ok(cfg)
    }

    /// Check that this crate can build the described VAE; the error names the offending key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        const ORIGIN: &str = "vae config";
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "block_out_channels",
                "[]",
                "at least one block",
            ));
        }
        for (key, types, want) in [
            ("down_block_types", &self.down_block_types, DOWN_BLOCK),
            ("up_block_types", &self.up_block_types, UP_BLOCK),
        ] {
            for (i, t) in types.iter().enumerate() {
                if t != want {
                    return Err(ConfigError::unsupported(
                        ORIGIN,
                        format!("{key}[{i}]"),
                        format!("\"{t}\""),
                        format!("\"{want}\""),
                    ));
                }
            }
            if types.len() != n {
                return Err(ConfigError::unsupported(
                    ORIGIN,
                    key,
                    format!("{} entries", types.len()),
                    format!("one entry per block_out_channels entry ({n})"),
                ));
            }
        }
        if self.act_fn != "silu" {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "act_fn",
                format!("\"{}\"", self.act_fn),
                "\"silu\"",
            ));
        }
        if self.layers_per_block == 0 {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "layers_per_block",
                "0",
                "1 or more",
            ));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "norm_num_groups",
                self.norm_num_groups.to_string(),
                format!("a divisor of every block_out_channels entry (not of {c})"),
            ));
        }
        if let Some(s) = self.shift_factor {
            return Err(ConfigError::unsupported(
                ORIGIN,
                "shift_factor",
                s.to_string(),
                "null (SD 1.5 latents are only scaled)",
            ));
        }
        Ok(())
    }

    /// How many times the encoder halves the resolution (8x for SD 1.5: 3 downsamplers).
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// `ResnetBlock2D` without a time embedding (`temb_channels=None`, `output_scale_factor=1`).
/// Mirrors [`ResnetBlock2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/resnet.py#L319).
#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), groups, in_c, NORM_EPS)?,
            conv1: Conv2d::new(vb.pp("conv1"), in_c, out_c, 3, 1, 1)?,
            norm2: GroupNorm::new(vb.pp("norm2"), groups, out_c, NORM_EPS)?,
            conv2: Conv2d::new(vb.pp("conv2"), out_c, out_c, 3, 1, 1)?,
            conv_shortcut,
        })
    }
}

impl Module for ResnetBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. norm1, SiLU, conv1.
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // 2. norm2, SiLU, (dropout 0), conv2.
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        // 3. 1x1 shortcut when the width changes, residual sum.
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: zero-pad right and bottom by one, then a 3x3 conv with
/// stride 2 and no padding. Mirrors [`Downsample2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/downsampling.py#L130).
#[derive(Debug, Clone)]
struct Downsample2D {
    conv: Conv2d,
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // F.pad(x, (0, 1, 0, 1)): width right by 1, height bottom by 1.
        let x = x
            .pad_with_zeros(D::Minus1, 0, 1)?
            .pad_with_zeros(D::Minus2, 0, 1)?;
        self.conv.forward(&x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest x2, then a 3x3 conv.
/// Mirrors [`Upsample2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/upsampling.py#L140).
#[derive(Debug, Clone)]
struct Upsample2D {
    conv: Conv2d,
}

impl Module for Upsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&upsample_nearest2x(x)?)
    }
}

/// The mid-block self-attention (`Attention` with `group_norm`, `residual_connection=True`,
/// one head of width `block_out_channels[-1]`).
/// Mirrors [`AttnProcessor2_0.__call__`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/attention_processor.py#L2700).
#[derive(Debug, Clone)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, NORM_EPS)?,
            to_q: Linear::new(vb.pp("to_q"), channels, channels, true)?,
            to_k: Linear::new(vb.pp("to_k"), channels, channels, true)?,
            to_v: Linear::new(vb.pp("to_v"), channels, channels, true)?,
            to_out: Linear::new(vb.pp("to_out.0"), channels, channels, true)?,
            // heads = in_channels // attention_head_dim, and attention_head_dim = in_channels.
            heads: 1,
        })
    }
}

impl Module for SpatialAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // 1. Group norm over channels (the reference normalises the [b, c, hw] view: the same).
        let hs = self.group_norm.forward(x)?;
        // 2. [b, c, h, w] -> [b, hw, c] tokens.
        let hs = hs.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        // 3. Projections, heads, scaled dot-product attention, output projection.
        let q = split_heads(&self.to_q.forward(&hs)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&hs)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&hs)?, self.heads)?;
        let o = self
            .to_out
            .forward(&merge_heads(&attention(&q, &k, &v, None)?)?)?;
        // 4. Back to [b, c, h, w], residual connection (rescale_output_factor = 1).
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
/// Mirrors [`UNetMidBlock2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/unets/unet_2d_blocks.py#L736).
#[derive(Debug, Clone)]
struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Option<SpatialAttention>,
}

impl UNetMidBlock2D {
    fn new(vb: VarBuilder, channels: usize, groups: usize, add_attention: bool) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), channels, channels, groups))
            .collect::<Result<Vec<_>>>()?;
        let attentions = if add_attention {
            Some(SpatialAttention::new(
                vb.pp("attentions.0"),
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }
}

impl Module for UNetMidBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x)?;
        if let Some(a) = &self.attentions {
            h = a.forward(&h)?;
        }
        self.resnets[1].forward(&h)
    }
}

/// `DownEncoderBlock2D`: `layers_per_block` resnets, then a downsampler except in the last block.
/// Mirrors [`DownEncoderBlock2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/unets/unet_2d_blocks.py#L1436).
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Option<Downsample2D>,
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.downsamplers {
            Some(d) => d.forward(&h),
            None => Ok(h),
        }
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then an upsampler except in the last block.
/// Mirrors [`UpDecoderBlock2D.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/unets/unet_2d_blocks.py#L2637).
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Option<Upsample2D>,
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        match &self.upsamplers {
            Some(u) => u.forward(&h),
            None => Ok(h),
        }
    }
}

/// The VAE encoder (`double_z=True`: it outputs mean and log-variance channels).
/// Mirrors [`Encoder.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/vae.py#L152).
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = boc.len() - 1;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(boc.len());
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let from = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), from, out_c, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsamplers = if i != last {
                Some(Downsample2D {
                    conv: Conv2d::new(vbb.pp("downsamplers.0.conv"), out_c, out_c, 3, 2, 0)?,
                })
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock2D {
                resnets,
                downsamplers,
            });
        }
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: UNetMidBlock2D::new(
                vb.pp("mid_block"),
                boc[last],
                g,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, boc[last], NORM_EPS)?,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                boc[last],
                2 * cfg.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // 1. conv_in.
        let mut h = self.conv_in.forward(x)?;
        // 2. Down blocks.
        for b in &self.down_blocks {
            h = b.forward(&h)?;
        }
        // 3. Mid block.
        let h = self.mid_block.forward(&h)?;
        // 4. Norm, SiLU, conv_out.
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The VAE decoder. Mirrors [`Decoder.forward`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/vae.py#L279).
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let last = rev.len() - 1;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1, 1)?;
        let mid_block =
            UNetMidBlock2D::new(vb.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention)?;
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let from = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(vbb.pp(format!("resnets.{j}")), from, out_c, g)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsamplers = if i != last {
                Some(Upsample2D {
                    conv: Conv2d::new(vbb.pp("upsamplers.0.conv"), out_c, out_c, 3, 1, 1)?,
                })
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock2D {
                resnets,
                upsamplers,
            });
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), g, rev[last], NORM_EPS)?,
            conv_out: Conv2d::new(vb.pp("conv_out"), rev[last], cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        // 1. conv_in.
        let h = self.conv_in.forward(z)?;
        // 2. Mid block.
        let mut h = self.mid_block.forward(&h)?;
        // 3. Up blocks.
        for b in &self.up_blocks {
            h = b.forward(&h)?;
        }
        // 4. Norm, SiLU, conv_out.
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The diagonal Gaussian posterior `q(z | x)` over unscaled latents.
/// Mirrors `DiagonalGaussianDistribution` ([vae.py#L687](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/vae.py#L687)).
#[derive(Debug, Clone)]
pub struct Posterior {
    /// `[b, latent_channels, h/8, w/8]`.
    pub mean: Tensor,
    /// Log-variance, clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl Posterior {
    /// `mean + exp(0.5 logvar) * n` with `n` standard normal from our seeded stream (drawn on the
    /// CPU, so the same seed gives the same latents on every device).
    pub fn sample(&self, rng: &mut Rng) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        let n = rng
            .randn(self.mean.shape(), self.mean.device())?
            .to_dtype(self.mean.dtype())?;
        self.mean.add(&std.mul(&n)?)
    }
}

/// `AutoencoderKL` of SD 1.5.
#[derive(Debug, Clone)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl Vae {
    /// Build the VAE from a VarBuilder over the diffusers `vae/diffusion_pytorch_model.safetensors`
    /// keys (`encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`). Validates `cfg` first.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), l, l, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Multiply posterior samples by this to get diffusion latents; divide latents by it before
    /// [`Vae::decode`].
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Encode images `[b, in_channels, h, w]` in [-1, 1] to the (unscaled) latent posterior.
    /// Mirrors [`AutoencoderKL._encode`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl.py#L158).
    pub fn encode(&self, images: &Tensor) -> Result<Posterior> {
        let (_, c, _, _) = images.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "vae encode: images have {c} channels, the VAE takes {} (expected NCHW in [-1, 1])",
                self.config.in_channels
            );
        }
        // 1. Encoder, then quant_conv.
        let mut h = self.encoder.forward(images)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        // 2. Split moments into mean and log-variance; clamp the log-variance.
        let l = self.config.latent_channels;
        let mean = h.narrow(1, 0, l)?;
        let logvar = h.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        Ok(Posterior { mean, logvar })
    }

    /// Decode UNSCALED latents `[b, latent_channels, h, w]` (i.e. diffusion latents divided by
    /// [`Vae::scaling_factor`]) to images `[b, out_channels, 8h, 8w]`, nominally in [-1, 1]
    /// (not clamped).
    /// Mirrors [`AutoencoderKL._decode`](https://github.com/huggingface/diffusers/blob/58eb52c0803ea9af3abec60841c2a093bdf1f951/src/diffusers/models/autoencoders/autoencoder_kl.py#L199).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.config.latent_channels {
            candle_core::bail!(
                "vae decode: latents have {c} channels, the VAE takes {}",
                self.config.latent_channels
            );
        }
        // 1. post_quant_conv, then the decoder.
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }
}
