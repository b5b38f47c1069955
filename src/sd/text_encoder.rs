//! The CLIP text transformer of SD 1.5 (transformers `CLIPTextModel`), differentiable end to end.
//!
//! It starts from token embeddings rather than ids, so learned rows (Textual Inversion, NeTI's
//! per-layer word vectors) are spliced in before the position embeddings while the frozen table
//! is never touched, and it can return the hidden states before the final layer norm (NeTI's
//! textual bypass adds to those). Follows transformers' `modeling_clip.py` (CLIPTextTransformer):
//! embeddings -> N pre-LN encoder layers with a causal mask -> final layer norm.
//!
//! The eval scorers reuse this module for CLIP's text tower.

use crate::nn::{self, LayerNorm, Linear};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

/// `text_encoder/config.json` (the fields this model reads).
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    /// Number of token rows in the frozen embedding table (49408 for CLIP).
    pub vocab_size: usize,
    /// Width of the hidden states (768 in SD 1.5).
    pub hidden_size: usize,
    /// Width of the MLP (3072 in SD 1.5).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Sequence length (77).
    pub max_position_embeddings: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// `quick_gelu` (CLIP) or `gelu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_ln_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out: Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads: c.num_attention_heads,
        })
    }

    /// Self-attention of `x`, projected, plus `residual`.
    fn forward_residual(&self, x: &Tensor, mask: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        self.out.forward_residual(
            &nn::attention_merged(&q, &k, &v, self.heads, Some(mask))?,
            residual,
        )
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick_gelu: bool,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &TextConfig) -> Result<Self> {
        let d = c.hidden_size;
        let quick_gelu = match c.hidden_act.as_str() {
            "quick_gelu" => true,
            "gelu" => false,
            other => candle_core::bail!(
                "text_encoder config: hidden_act \"{other}\" is not supported (quick_gelu or gelu)"
            ),
        };
        Ok(Self {
            ln1: LayerNorm::new(vb.pp("layer_norm1"), d, c.layer_norm_eps)?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: LayerNorm::new(vb.pp("layer_norm2"), d, c.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), c.intermediate_size, d, true)?,
            quick_gelu,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.attn.forward_residual(&self.ln1.forward(x)?, mask, x)?;
        let m = self.fc1.forward(&self.ln2.forward(&h)?)?;
        let m = if self.quick_gelu {
            nn::quick_gelu(&m)?
        } else {
            m.gelu_erf()?
        };
        self.fc2.forward_residual(&m, &h)
    }
}

/// The CLIP text transformer. Weights are frozen tensors; gradients flow to whatever embeddings
/// the caller passes in.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    /// The frozen token table `[vocab, hidden]`.
    pub token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
    pub config: TextConfig,
}

impl TextEncoder {
    /// `vb` points at the checkpoint root; keys start with `text_model.` as published.
    pub fn new(vb: VarBuilder, cfg: &TextConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let d = cfg.hidden_size;
        let e = vb.pp("embeddings");
        let token_embedding = e.get((cfg.vocab_size, d), "token_embedding.weight")?;
        let position_embedding = e.get(
            (cfg.max_position_embeddings, d),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(vb.pp("final_layer_norm"), d, cfg.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            config: cfg.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// Token embeddings `[B, L, D]` for ids `[B, L]` (u32). Ids `>= vocab_size` index `extra`:
    /// `[n, D]` rows shared by the batch, or `[B, n, D]` rows per sample (NeTI's per-layer word
    /// vectors). Only `extra` receives gradients; the frozen table is read, never changed.
    pub fn embed_tokens(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let vocab = self.config.vocab_size as u32;
        let ids = ids.to_dtype(DType::U32)?;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
        let base_ids: Vec<u32> = flat
            .iter()
            .map(|&i| if i < vocab { i } else { 0 })
            .collect();
        let dev = self.device();
        let base = self
            .token_embedding
            .index_select(&Tensor::new(base_ids, dev)?, 0)?;
        let n_new = flat.iter().filter(|&&i| i >= vocab).count();
        let out = match (extra, n_new) {
            (_, 0) => base,
            (None, _) => {
                candle_core::bail!("token ids >= {vocab} need learned rows, but none were given")
            }
            (Some(extra), _) => {
                let (rows, per_sample) = match extra.rank() {
                    2 => (extra.clone(), None),
                    3 => {
                        let (eb, n, d) = extra.dims3()?;
                        if eb != b {
                            candle_core::bail!("learned rows have batch {eb}, ids have {b}");
                        }
                        (extra.reshape((eb * n, d))?, Some(n))
                    }
                    r => {
                        candle_core::bail!("learned rows must be [n, D] or [B, n, D], got rank {r}")
                    }
                };
                let count = rows.dim(0)? as u32;
                let mut extra_ids = Vec::with_capacity(flat.len());
                let mut is_new = Vec::with_capacity(flat.len());
                for (pos, &i) in flat.iter().enumerate() {
                    if i >= vocab {
                        let j = i - vocab;
                        let j = match per_sample {
                            Some(n) => {
                                if j as usize >= n {
                                    candle_core::bail!("token id {i} has no learned row");
                                }
                                (pos / l) as u32 * n as u32 + j
                            }
                            None => j,
                        };
                        if j >= count {
                            candle_core::bail!("token id {i} has no learned row");
                        }
                        extra_ids.push(j);
                        is_new.push(1u8);
                    } else {
                        extra_ids.push(0);
                        is_new.push(0u8);
                    }
                }
                let ex = rows.index_select(&Tensor::new(extra_ids, dev)?, 0)?;
                let d = self.config.hidden_size;
                let m = Tensor::new(is_new, dev)?
                    .reshape((b * l, 1))?
                    .broadcast_as((b * l, d))?;
                m.where_cond(&ex.to_dtype(base.dtype())?, &base)?
            }
        };
        out.reshape((b, l, self.config.hidden_size))
    }

    /// Run the transformer on token embeddings `[B, L, D]`; returns the hidden states before the
    /// final layer norm (`E` in NeTI's bypass). Apply [`Self::final_layer_norm`] for the
    /// conditioning SD uses.
    pub fn encode_embeddings_pre_ln(&self, embeds: &Tensor) -> Result<Tensor> {
        let (_, l, _) = embeds.dims3()?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = nn::broadcast_add(embeds, &pos.to_dtype(embeds.dtype())?)?;
        let mask = causal_mask(l, self.device())?.to_dtype(embeds.dtype())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    pub fn final_layer_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.final_ln.forward(x)
    }

    /// `last_hidden_state` for ids `[B, L]` with optional learned rows (see [`Self::embed_tokens`]).
    pub fn forward(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        let e = self.embed_tokens(ids, extra)?;
        let h = self.encode_embeddings_pre_ln(&e)?;
        self.final_layer_norm(&h)
    }

    /// The hidden state at the first EOS token of each row (CLIP's pooled output), used by the
    /// CLIP-T scorer with a projection on top.
    pub fn pooled(&self, ids: &Tensor, hidden: &Tensor, eos: u32) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let mut out = Vec::with_capacity(rows.len());
        for (b, r) in rows.iter().enumerate() {
            let p = r.iter().position(|&i| i == eos).unwrap_or(r.len() - 1);
            out.push(hidden.get(b)?.get(p)?);
        }
        Tensor::stack(&out, 0)
    }
}

/// Additive causal mask `[1, 1, L, L]`: 0 on and below the diagonal, -inf above.
fn causal_mask(l: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, l, l), dev)
}
