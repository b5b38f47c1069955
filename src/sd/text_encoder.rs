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

    /// [`Self::forward_residual`] for sequences split into a prefix `xp` `[1, P, D]` that every
    /// sequence shares and their own rows `xs` `[B, S, D]`: the prefix attends to itself, each
    /// sequence's rows to the prefix's keys and values followed by their own. Each with its
    /// residual added.
    fn forward_split_residual(
        &self,
        (xp, xs): (&Tensor, &Tensor),
        (mask_p, mask_s): (&Tensor, &Tensor),
        (rp, rs): (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (b, p, d) = (xs.dim(0)?, xp.dim(1)?, xp.dim(2)?);
        let (qp, kp, vp) = (
            self.q.forward(xp)?,
            self.k.forward(xp)?,
            self.v.forward(xp)?,
        );
        let (qs, ks, vs) = (
            self.q.forward(xs)?,
            self.k.forward(xs)?,
            self.v.forward(xs)?,
        );
        let yp = nn::attention_merged(&qp, &kp, &vp, self.heads, Some(mask_p))?;
        // The prefix's keys and values carry no graph; copied per sequence, then each
        // sequence's own follow.
        let per_seq = |t: &Tensor| t.broadcast_as((b, p, d))?.contiguous();
        let k_all = Tensor::cat(&[&per_seq(&kp)?, &ks], 1)?;
        let v_all = Tensor::cat(&[&per_seq(&vp)?, &vs], 1)?;
        let ys = nn::attention_merged(&qs, &k_all, &v_all, self.heads, Some(mask_s))?;
        Ok((
            self.out.forward_residual(&yp, rp)?,
            self.out.forward_residual(&ys, rs)?,
        ))
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
        self.mlp_residual(&h)
    }

    /// The MLP half of the layer on `h`, plus `h`: `h + fc2(act(fc1(ln2(h))))`.
    ///
    /// With frozen weights and CLIP's quick GELU, when `h` needs a gradient, this is one graph
    /// node that keeps `h` and fc1's output alone. Composed, the graph also keeps ln2's output and
    /// the activation's (the inputs of fc1 and fc2), which only the frozen weights' gradients
    /// would read: 3840 of the 6912 values per row and layer that the MLP kept. That is 0.6 GB
    /// of a neti+ step's 48 prompts at once (SPEC.md §4), where PyTorch saves only what its
    /// backward reads. Same products, same order: the gradients are those of the composition.
    fn mlp_residual(&self, h: &Tensor) -> Result<Tensor> {
        let fusable = self.quick_gelu
            && h.track_op()
            && self.ln2.is_frozen()
            && self.fc1.is_frozen()
            && self.fc2.is_frozen();
        if !fusable {
            return self.mlp_residual_composed(h);
        }
        let hd = h.detach();
        let pre = self.fc1.forward(&self.ln2.forward(&hd)?)?;
        let out = self.fc2.forward_residual(&nn::quick_gelu(&pre)?, &hd)?;
        let (ln2, fc1, fc2) = (self.ln2.clone(), self.fc1.clone(), self.fc2.clone());
        nn::attach(
            "clip-mlp-frozen",
            &[h],
            out,
            Box::new(move |args, _, g| {
                let g_pre = nn::quick_gelu_grad(&pre, &fc2.input_grad(g)?)?;
                let g_h = (ln2.input_grad(args[0], &fc1.input_grad(&g_pre)?)? + g)?;
                Ok(vec![Some(g_h)])
            }),
        )
    }

    /// [`Self::mlp_residual`] from the layers' own differentiable forwards.
    fn mlp_residual_composed(&self, h: &Tensor) -> Result<Tensor> {
        let m = self.fc1.forward(&self.ln2.forward(h)?)?;
        let m = if self.quick_gelu {
            nn::quick_gelu(&m)?
        } else {
            m.gelu_erf()?
        };
        self.fc2.forward_residual(&m, h)
    }

    /// [`Self::forward`] on a shared prefix `xp` `[1, P, D]` and the sequences' own rows `xs`
    /// `[B, S, D]` (see [`TextEncoder::encode_shared_prefix_pre_ln`]).
    fn forward_split(
        &self,
        xp: &Tensor,
        xs: &Tensor,
        masks: (&Tensor, &Tensor),
    ) -> Result<(Tensor, Tensor)> {
        let (hp, hs) = self.attn.forward_split_residual(
            (&self.ln1.forward(xp)?, &self.ln1.forward(xs)?),
            masks,
            (xp, xs),
        )?;
        Ok((self.mlp_residual(&hp)?, self.mlp_residual(&hs)?))
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

    /// The four projections of every self-attention layer with their transformers module paths
    /// (`text_model.encoder.layers.0.self_attn.q_proj`, ...): what LoRA adapts in the text
    /// encoder.
    pub fn attention_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("text_model.encoder.layers.{i}.self_attn");
            let a = &mut l.attn;
            out.push((format!("{p}.q_proj"), &mut a.q));
            out.push((format!("{p}.k_proj"), &mut a.k));
            out.push((format!("{p}.v_proj"), &mut a.v));
            out.push((format!("{p}.out_proj"), &mut a.out));
        }
        out
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

    /// [`Self::encode_embeddings_pre_ln`] for sequences `[B, L, D]` whose first `prefix` rows
    /// are the same in all of them and hold no learned row (NeTI runs each prompt once per UNet
    /// layer, and its copies differ from the first new token on). The attention is causal, so
    /// those rows' hidden states are the same in every sequence too: they are computed once,
    /// without a graph, and the other rows attend to them. Same values as the plain pass; the
    /// text encoder's work shrinks by `prefix / L` (NeTI's prompts: about 7 of 77 rows).
    pub(crate) fn encode_shared_prefix_pre_ln(
        &self,
        embeds: &Tensor,
        prefix: usize,
    ) -> Result<Tensor> {
        let (b, l, d) = embeds.dims3()?;
        if prefix == 0 || prefix >= l || b < 2 {
            return self.encode_embeddings_pre_ln(embeds);
        }
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let x = nn::broadcast_add(embeds, &pos.to_dtype(embeds.dtype())?)?;
        let mut xp = x.narrow(0, 0, 1)?.narrow(1, 0, prefix)?.detach();
        let mut xs = x.narrow(1, prefix, l - prefix)?;
        let dev = self.device();
        let mask_p = causal_mask(prefix, dev)?.to_dtype(embeds.dtype())?;
        let mask_s = causal_mask_from(prefix, l, dev)?.to_dtype(embeds.dtype())?;
        for layer in &self.layers {
            (xp, xs) = layer.forward_split(&xp, &xs, (&mask_p, &mask_s))?;
        }
        Tensor::cat(&[&xp.broadcast_as((b, prefix, d))?.contiguous()?, &xs], 1)
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
    causal_mask_from(0, l, dev)
}

/// The rows `from..L` of the `L x L` causal mask: `[1, 1, L - from, L]`, query `i` (position
/// `from + i`) seeing keys `0..=from + i`.
fn causal_mask_from(from: usize, l: usize, dev: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (from..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (1, 1, l - from, l), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, randn};
    use candle_core::Var;

    /// A CLIP layer of width 8 (MLP 32) with random weights of `dtype`.
    fn layer(dtype: DType) -> EncoderLayer {
        let t = |shape: &[usize], seed: u64, scale: f64| {
            (randn(shape, seed) * scale)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let lin = |i: usize, o: usize, seed: u64| {
            Linear::from_tensors(t(&[o, i], seed, 0.3), Some(t(&[o], seed + 1, 0.1)))
        };
        let ln = |seed: u64| {
            LayerNorm::from_tensors(
                (t(&[8], seed, 0.1) + 1.0).unwrap(),
                t(&[8], seed + 1, 0.1),
                1e-5,
            )
        };
        EncoderLayer {
            ln1: ln(1),
            attn: Attention {
                q: lin(8, 8, 3),
                k: lin(8, 8, 5),
                v: lin(8, 8, 7),
                out: lin(8, 8, 9),
                heads: 2,
            },
            ln2: ln(11),
            fc1: lin(8, 32, 13),
            fc2: lin(32, 8, 15),
            quick_gelu: true,
        }
    }

    /// The fused MLP node gives the composition's output and input gradient, on the CPU's f32
    /// kernels and on the generic ops (f64).
    #[test]
    fn fused_mlp_matches_its_composition() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let l = layer(dtype);
            let h0 = (randn(&[2, 5, 8], 21) * 2.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let r = randn(&[2, 5, 8], 23).to_dtype(dtype).unwrap();
            let run = |fused: bool| {
                let h = Var::from_tensor(&h0).unwrap();
                let y = if fused {
                    l.mlp_residual(h.as_tensor())
                } else {
                    l.mlp_residual_composed(h.as_tensor())
                }
                .unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(h.as_tensor()).unwrap().clone())
            };
            let ((yf, gf), (yc, gc)) = (run(true), run(false));
            assert!(max_diff(&yf, &yc) < tol, "{dtype:?} output");
            assert!(max_diff(&gf, &gc) < tol * 10.0, "{dtype:?} gradient");
            assert!(crate::nn::testing::max_abs(&gc) > 0.1);
        }
    }
}
