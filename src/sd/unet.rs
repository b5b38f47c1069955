//! SD 1.5's UNet (diffusers `UNet2DConditionModel`), differentiable end to end, with per-sample
//! timesteps and, for each of the 16 cross-attention layers, its own key and value context (NeTI
//! conditions every layer differently, and its textual bypass reaches the values only).
//!
//! Mirrors diffusers 0.42 `models/unets/unet_2d_condition.py` and the blocks it uses
//! (`unet_2d_blocks.py`: CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn,
//! CrossAttnUpBlock2D, UpBlock2D; `resnet.py`: ResnetBlock2D, Downsample2D, Upsample2D;
//! `transformers/transformer_2d.py` + `attention.py`: Transformer2DModel, BasicTransformerBlock,
//! GEGLU). Shapes come from `unet/config.json`, so the tiny fixture and SD 1.5 load alike.

use crate::nn::checkpoint::{checkpoint, ParamGrads};
use crate::nn::{self, Conv2d, GroupNorm, LayerNorm, Linear};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use std::sync::Arc;

/// `unet/config.json` (the fields this model reads).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: usize,
    pub cross_attention_dim: usize,
    /// In SD 1.5 this is the number of heads (diffusers' naming quirk).
    pub attention_head_dim: usize,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_tlpb")]
    pub transformer_layers_per_block: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_time_emb")]
    pub time_embedding_type: String,
    #[serde(default = "default_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub only_cross_attention: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    /// Latent side the model was trained at (64 for SD 1.5 = 512 px).
    #[serde(default = "default_sample_size")]
    pub sample_size: usize,
}

fn default_sample_size() -> usize {
    64
}

fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}
fn default_tlpb() -> usize {
    1
}
fn default_act() -> String {
    "silu".into()
}
fn default_time_emb() -> String {
    "positional".into()
}
fn default_shift() -> String {
    "default".into()
}

impl UNetConfig {
    /// Reject what this implementation does not build, naming the config key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, val: &str, ok: &str| {
            Err(candle_core::Error::Msg(format!(
                "unet config: {key} = {val:?} is not supported (supported: {ok})"
            )))
        };
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad("down_block_types", t, "CrossAttnDownBlock2D, DownBlock2D");
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad("up_block_types", t, "CrossAttnUpBlock2D, UpBlock2D");
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => {
                return bad(
                    "mid_block_type",
                    &format!("{other:?}"),
                    "UNetMidBlock2DCrossAttn",
                )
            }
        }
        if self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return bad(
                "down_block_types/up_block_types",
                &format!(
                    "{} / {}",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
                "one per entry of block_out_channels",
            );
        }
        if self.use_linear_projection {
            return bad("use_linear_projection", "true", "false (SD 1.x)");
        }
        if self.transformer_layers_per_block != 1 {
            return bad(
                "transformer_layers_per_block",
                &self.transformer_layers_per_block.to_string(),
                "1",
            );
        }
        if let Some(c) = &self.class_embed_type {
            return bad("class_embed_type", c, "null");
        }
        if let Some(c) = &self.addition_embed_type {
            return bad("addition_embed_type", c, "null");
        }
        if self.act_fn != "silu" {
            return bad("act_fn", &self.act_fn, "silu");
        }
        if self.time_embedding_type != "positional" {
            return bad(
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            );
        }
        if self.resnet_time_scale_shift != "default" {
            return bad(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            );
        }
        if self.only_cross_attention {
            return bad("only_cross_attention", "true", "false");
        }
        Ok(())
    }

    /// Attention heads of every transformer block (SD 1.5's config names them
    /// `attention_head_dim`, a diffusers naming slip kept for compatibility).
    pub fn heads(&self) -> usize {
        self.num_attention_heads.unwrap_or(self.attention_head_dim)
    }

    /// How many cross-attention layers the UNet has (16 for SD 1.5).
    pub fn num_cross_attention_layers(&self) -> usize {
        let down = self
            .down_block_types
            .iter()
            .filter(|t| t.as_str() == "CrossAttnDownBlock2D")
            .count()
            * self.layers_per_block;
        let up = self
            .up_block_types
            .iter()
            .filter(|t| t.as_str() == "CrossAttnUpBlock2D")
            .count()
            * (self.layers_per_block + 1);
        down + 1 + up
    }
}

/// What each cross-attention layer attends to.
#[derive(Debug, Clone)]
pub enum Conditioning {
    /// One context `[B, 77, D]` for every layer (plain SD, Textual Inversion).
    Shared(Tensor),
    /// Per layer, in forward order, a (key context, value context) pair, each `[B, 77, D]`.
    PerLayer(Vec<(Tensor, Tensor)>),
}

impl Conditioning {
    fn get(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match self {
            Conditioning::Shared(c) => Ok((c, c)),
            Conditioning::PerLayer(v) => v.get(layer).map(|(k, v)| (k, v)).ok_or_else(|| {
                candle_core::Error::Msg(format!("no context for cross-attention layer {layer}"))
            }),
        }
    }
}

#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, temb: usize, c: &UNetConfig) -> Result<Self> {
        let g = c.norm_num_groups;
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), g, cin, c.norm_eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: Linear::new(vb.pp("time_emb_proj"), temb, cout, true)?,
            norm2: GroupNorm::new(vb.pp("norm2"), g, cout, c.norm_eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(Conv2d::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    fn params(&self) -> Vec<Tensor> {
        let mut v = self.norm1.params();
        v.extend(self.conv1.params());
        v.extend(self.time_emb_proj.params());
        v.extend(self.norm2.params());
        v.extend(self.conv2.params());
        if let Some(c) = &self.shortcut {
            v.extend(c.params());
        }
        v
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        // 1. norm -> silu -> conv
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        // 2. add the projected time embedding per channel
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = nn::broadcast_add(&h, &t.unsqueeze(2)?.unsqueeze(3)?)?;
        // 3. norm -> silu -> (dropout: identity) -> conv
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        // 4. residual (output_scale_factor 1)
        let s = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        s + h
    }
}

#[derive(Debug, Clone)]
struct Attn {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// Custom Diffusion: the first context token's (BOS's) keys and values carry no gradient
    /// (`CustomDiffusionAttnProcessor`: `key = m * key + (1 - m) * key.detach()`, m = 0 at
    /// position 0). Values are unchanged.
    detach_bos: bool,
}

impl Attn {
    fn new(vb: VarBuilder, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(vb.pp("to_k"), ctx_dim, dim, false)?,
            to_v: Linear::new(vb.pp("to_v"), ctx_dim, dim, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            detach_bos: false,
        })
    }

    /// The attention output projected, plus `residual`.
    fn forward_residual(
        &self,
        x: &Tensor,
        k_ctx: &Tensor,
        v_ctx: &Tensor,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let mut k = self.to_k.forward(k_ctx)?;
        let mut v = self.to_v.forward(v_ctx)?;
        if self.detach_bos {
            let keep_first = |t: &Tensor| -> Result<Tensor> {
                let n = t.dim(1)?;
                Tensor::cat(&[&t.narrow(1, 0, 1)?.detach(), &t.narrow(1, 1, n - 1)?], 1)
            };
            k = keep_first(&k)?;
            v = keep_first(&v)?;
        }
        self.to_out.forward_residual(
            &nn::attention_merged(&q, &k, &v, self.heads, None)?,
            residual,
        )
    }
}

#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attn,
    norm2: LayerNorm,
    attn2: Attn,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attn::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attn::new(vb.pp("attn2"), dim, ctx_dim, heads)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::new(vb.pp("ff.net.0.proj"), dim, inner * 2, true)?,
            ff_out: Linear::new(vb.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, k_ctx: &Tensor, v_ctx: &Tensor) -> Result<Tensor> {
        // 1. self-attention
        let n = self.norm1.forward(x)?;
        let x = self.attn1.forward_residual(&n, &n, &n, x)?;
        // 2. cross-attention to the text
        let n = self.norm2.forward(&x)?;
        let x = self.attn2.forward_residual(&n, k_ctx, v_ctx, &x)?;
        // 3. GEGLU feed-forward: hidden * gelu(gate)
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        self.ff_out.forward_residual(&nn::geglu(&h)?, &x)
    }
}

/// Transformer2DModel with one BasicTransformerBlock (conv projections, SD 1.x).
#[derive(Debug, Clone)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Conv2d,
    block: TransformerBlock,
    proj_out: Conv2d,
}

impl SpatialTransformer {
    fn new(vb: VarBuilder, ch: usize, c: &UNetConfig) -> Result<Self> {
        let heads = c.heads();
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm"), c.norm_num_groups, ch, 1e-6)?,
            proj_in: Conv2d::new(vb.pp("proj_in"), ch, ch, 1, 1, 0)?,
            block: TransformerBlock::new(
                vb.pp("transformer_blocks.0"),
                ch,
                c.cross_attention_dim,
                heads,
            )?,
            proj_out: Conv2d::new(vb.pp("proj_out"), ch, ch, 1, 1, 0)?,
        })
    }

    fn params(&self) -> Vec<Tensor> {
        let mut v = self.norm.params();
        v.extend(self.proj_in.params());
        let b = &self.block;
        for n in [&b.norm1, &b.norm2, &b.norm3] {
            v.extend(n.params());
        }
        for a in [&b.attn1, &b.attn2] {
            for l in [&a.to_q, &a.to_k, &a.to_v, &a.to_out] {
                v.extend(l.params());
            }
        }
        v.extend(b.ff_proj.params());
        v.extend(b.ff_out.params());
        v.extend(self.proj_out.params());
        v
    }

    fn forward(&self, x: &Tensor, k_ctx: &Tensor, v_ctx: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let y = self.proj_in.forward(&self.norm.forward(x)?)?;
        let y = y.flatten_from(2)?.transpose(1, 2)?.contiguous()?; // [B, HW, C]
        let y = self.block.forward(&y, k_ctx, v_ctx)?;
        let y = y.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        self.proj_out.forward(&y)? + x
    }
}

#[derive(Debug, Clone)]
struct Block {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    /// Downsampler (down blocks) or upsampler conv (up blocks).
    sampler: Option<Conv2d>,
}

/// The SD 1.5 UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<Block>,
    mid_resnets: [ResnetBlock; 2],
    mid_attn: SpatialTransformer,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
    /// Gradient checkpointing: each ResNet block and transformer recomputes its forward in the
    /// backward pass; the parameters' gradients collect here (see `nn::checkpoint`).
    pub checkpointing: Option<ParamGrads>,
}

impl UNet {
    pub fn new(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let ch = &cfg.block_out_channels;
        let c0 = ch[0];
        let temb = c0 * 4;
        let lpb = cfg.layers_per_block;
        let conv_in = Conv2d::new(vb.pp("conv_in"), cfg.in_channels, c0, 3, 1, 1)?;
        let time_linear_1 = Linear::new(vb.pp("time_embedding.linear_1"), c0, temb, true)?;
        let time_linear_2 = Linear::new(vb.pp("time_embedding.linear_2"), temb, temb, true)?;

        let mut down = Vec::new();
        let mut out_c = c0;
        for (i, t) in cfg.down_block_types.iter().enumerate() {
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let in_c = out_c;
            out_c = ch[i];
            let is_final = i == ch.len() - 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..lpb {
                let cin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::new(
                    vbb.pp(format!("resnets.{j}")),
                    cin,
                    out_c,
                    temb,
                    cfg,
                )?);
                if t == "CrossAttnDownBlock2D" {
                    attentions.push(SpatialTransformer::new(
                        vbb.pp(format!("attentions.{j}")),
                        out_c,
                        cfg,
                    )?);
                }
            }
            let sampler = if is_final {
                None
            } else {
                Some(Conv2d::new(
                    vbb.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    cfg.downsample_padding,
                )?)
            };
            down.push(Block {
                resnets,
                attentions,
                sampler,
            });
        }

        let cm = *ch.last().unwrap_or(&c0);
        let vbm = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(vbm.pp("resnets.0"), cm, cm, temb, cfg)?,
            ResnetBlock::new(vbm.pp("resnets.1"), cm, cm, temb, cfg)?,
        ];
        let mid_attn = SpatialTransformer::new(vbm.pp("attentions.0"), cm, cfg)?;

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut prev_out = rev[0];
        for (i, t) in cfg.up_block_types.iter().enumerate() {
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let out_c = rev[i];
            let in_c = rev[(i + 1).min(rev.len() - 1)];
            let is_final = i == rev.len() - 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=lpb {
                let skip = if j == lpb { in_c } else { out_c };
                let rin = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock::new(
                    vbb.pp(format!("resnets.{j}")),
                    rin + skip,
                    out_c,
                    temb,
                    cfg,
                )?);
                if t == "CrossAttnUpBlock2D" {
                    attentions.push(SpatialTransformer::new(
                        vbb.pp(format!("attentions.{j}")),
                        out_c,
                        cfg,
                    )?);
                }
            }
            let sampler = if is_final {
                None
            } else {
                Some(Conv2d::new(
                    vbb.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            };
            up.push(Block {
                resnets,
                attentions,
                sampler,
            });
            prev_out = out_c;
        }
        let norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            c0,
            cfg.norm_eps,
        )?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), c0, cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid_resnets,
            mid_attn,
            up,
            norm_out,
            conv_out,
            config: cfg.clone(),
            checkpointing: None,
        })
    }

    /// Every spatial transformer with its diffusers module path, in forward order.
    fn transformers_mut(&mut self) -> Vec<(String, &mut SpatialTransformer)> {
        let mut out = Vec::new();
        for (i, b) in self.down.iter_mut().enumerate() {
            for (j, a) in b.attentions.iter_mut().enumerate() {
                out.push((format!("down_blocks.{i}.attentions.{j}"), a));
            }
        }
        out.push(("mid_block.attentions.0".to_string(), &mut self.mid_attn));
        for (i, b) in self.up.iter_mut().enumerate() {
            for (j, a) in b.attentions.iter_mut().enumerate() {
                out.push((format!("up_blocks.{i}.attentions.{j}"), a));
            }
        }
        out
    }

    /// The four projections (`to_q`, `to_k`, `to_v`, `to_out.0`) of every self-attention
    /// (`attn1`) and cross-attention (`attn2`) layer, with their diffusers module paths (e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k`), in forward order: what
    /// LoRA adapts and Custom Diffusion trains (`attn2`'s `to_k`, `to_v`).
    pub fn attention_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (path, t) in self.transformers_mut() {
            let b = &mut t.block;
            for (name, a) in [("attn1", &mut b.attn1), ("attn2", &mut b.attn2)] {
                let p = format!("{path}.transformer_blocks.0.{name}");
                out.push((format!("{p}.to_q"), &mut a.to_q));
                out.push((format!("{p}.to_k"), &mut a.to_k));
                out.push((format!("{p}.to_v"), &mut a.to_v));
                out.push((format!("{p}.to_out.0"), &mut a.to_out));
            }
        }
        out
    }

    /// Custom Diffusion's training rule: the cross-attention layers' BOS keys and values get
    /// no gradient (see `Attn::detach_bos`); outputs are unchanged.
    pub fn set_detach_bos_kv(&mut self, on: bool) {
        for (_, t) in self.transformers_mut() {
            t.block.attn2.detach_bos = on;
        }
    }

    /// The dtype of the weights (and of the activations through them).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.dtype()
    }

    /// Sinusoidal timestep features `[B, c0]` (diffusers `get_timestep_embedding`).
    fn time_proj(&self, t: &Tensor) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let dev = t.device();
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                (-(10000f64.ln()) * i as f64 / (half as f64 - self.config.freq_shift)).exp() as f32
            })
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
        let args = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)
        } else {
            Tensor::cat(&[sin, cos], 1)
        }
    }

    /// A ResNet block, checkpointed when [`UNet::checkpointing`] is on.
    fn resnet(&self, r: &ResnetBlock, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        match &self.checkpointing {
            None => r.forward(x, temb),
            Some(sink) => {
                let block = r.clone();
                checkpoint(
                    "resnet-checkpointed",
                    &[x, temb],
                    r.params(),
                    sink,
                    Arc::new(move |a| block.forward(&a[0], &a[1])),
                )
            }
        }
    }

    /// A spatial transformer, checkpointed when [`UNet::checkpointing`] is on.
    fn transformer(
        &self,
        t: &SpatialTransformer,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        match &self.checkpointing {
            None => t.forward(x, k, v),
            Some(sink) => {
                let block = t.clone();
                checkpoint(
                    "transformer-checkpointed",
                    &[x, k, v],
                    t.params(),
                    sink,
                    Arc::new(move |a| block.forward(&a[0], &a[1], &a[2])),
                )
            }
        }
    }

    /// Predict the noise for latents `[B, 4, h, w]` at per-sample timesteps `t` `[B]` (any numeric
    /// dtype), conditioned as `cond` says.
    pub fn forward(&self, sample: &Tensor, t: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        let dtype = sample.dtype();
        let n_layers = self.config.num_cross_attention_layers();
        if let Conditioning::PerLayer(v) = cond {
            if v.len() != n_layers {
                candle_core::bail!("per-layer conditioning has {} entries, the UNet has {n_layers} cross-attention layers", v.len());
            }
        }
        // 1. time embedding
        let temb = self.time_proj(t)?.to_dtype(dtype)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb)?.silu()?)?;
        // 2. pre-process
        let mut x = self.conv_in.forward(sample)?;
        let mut skips = vec![x.clone()];
        let mut layer = 0;
        // 3. down
        for b in &self.down {
            for (j, r) in b.resnets.iter().enumerate() {
                x = self.resnet(r, &x, &temb)?;
                if let Some(a) = b.attentions.get(j) {
                    let (k, v) = cond.get(layer)?;
                    layer += 1;
                    x = self.transformer(a, &x, k, v)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &b.sampler {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }
        // 4. mid
        x = self.resnet(&self.mid_resnets[0], &x, &temb)?;
        let (k, v) = cond.get(layer)?;
        layer += 1;
        x = self.transformer(&self.mid_attn, &x, k, v)?;
        x = self.resnet(&self.mid_resnets[1], &x, &temb)?;
        // 5. up
        for b in &self.up {
            for (j, r) in b.resnets.iter().enumerate() {
                let s = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("unet: skip stack underflow".into()))?;
                x = Tensor::cat(&[&x, &s], 1)?;
                x = self.resnet(r, &x, &temb)?;
                if let Some(a) = b.attentions.get(j) {
                    let (k, v) = cond.get(layer)?;
                    layer += 1;
                    x = self.transformer(a, &x, k, v)?;
                }
            }
            if let Some(u) = &b.sampler {
                x = u.forward(&nn::upsample_nearest2x(&x)?)?;
            }
        }
        // 6. post-process
        self.conv_out.forward(&self.norm_out.forward_silu(&x)?)
    }
}
