//! The learned concept: what turns prompts with `<v*>` (and the attractors `<a{k}*>`) into UNet
//! conditioning. Textual Inversion learns token rows; NeTI learns a mapper per token that gives a
//! word vector and a textual bypass for each (timestep, UNet layer). Training and sampling share
//! this code, so what is trained is exactly what is sampled.

use crate::personalize::neti::NetiMapper;
use crate::sd::text_encoder::TextEncoder;
use crate::sd::unet::Conditioning;
use candle_core::{Device, Result, Tensor};

/// The learned part of a concept.
#[derive(Debug, Clone)]
pub enum Learned {
    /// No learned tokens: the prompts use existing words only (DreamBooth's `sks`); what was
    /// learned lives in the model's weights.
    None,
    /// Textual Inversion: rows `[n_new, D]` for every added token, in token-id order (also
    /// Custom Diffusion's modifier token and dreambooth-lora+'s attractors).
    Rows(Tensor),
    /// NeTI: one mapper per added token, in token-id order (the subject `<v*>`, then the
    /// attractors); `alpha` is the bypass strength.
    Mappers {
        mappers: Vec<NetiMapper>,
        alpha: f64,
    },
}

/// Conditioning for a batch of prompts plus, for the contrastive loss, the contextual embeddings
/// (text-encoder output after the final layer norm) of each layer group.
pub struct Encoded {
    pub cond: Conditioning,
    /// Per layer group (1 for TI, 16 for NeTI): `[N, 77, D]` after the final layer norm.
    pub contextual: Vec<Tensor>,
}

/// Options of a NeTI evaluation.
#[derive(Default)]
pub struct NetiOptions<'a> {
    /// Zero hidden units from this index on (inference).
    pub truncation: Option<usize>,
    /// Training: nested dropout draws from this RNG.
    pub dropout: Option<&'a mut crate::rng::Rng>,
}

impl Learned {
    /// Encode `ids` `[N, 77]` (new tokens have ids `vocab + j`) at per-prompt timesteps `ts`.
    pub fn encode(
        &self,
        te: &TextEncoder,
        ids: &Tensor,
        ts: &[usize],
        num_layers: usize,
        opts: NetiOptions,
    ) -> Result<Encoded> {
        match self {
            Learned::None | Learned::Rows(_) => {
                let rows = match self {
                    Learned::Rows(r) => Some(r),
                    _ => None,
                };
                let ctx = te.forward(ids, rows)?;
                Ok(Encoded {
                    cond: Conditioning::Shared(ctx.clone()),
                    contextual: vec![ctx],
                })
            }
            Learned::Mappers { mappers, alpha } => {
                encode_neti(te, mappers, *alpha, ids, ts, num_layers, opts)
            }
        }
    }
}

/// NeTI: run the text encoder once per UNet layer, batched (`[L * N]` rows, layer-major), with
/// each new token's word vector from its mapper at (t, l); keys use `final_ln(E)`, values
/// `final_ln(E')` with the textual bypass added at each new token's positions.
fn encode_neti(
    te: &TextEncoder,
    mappers: &[NetiMapper],
    alpha: f64,
    ids: &Tensor,
    ts: &[usize],
    num_layers: usize,
    mut opts: NetiOptions,
) -> Result<Encoded> {
    let (n, _) = ids.dims2()?;
    if ts.len() != n {
        candle_core::bail!("{} timesteps for {n} prompts", ts.len());
    }
    // (t, l) of every row, layer-major.
    let t_rows: Vec<f32> = (0..num_layers)
        .flat_map(|_| ts.iter().map(|&t| t as f32))
        .collect();
    let l_rows: Vec<f32> = (0..num_layers)
        .flat_map(|l| std::iter::repeat_n(l as f32, n))
        .collect();
    // 1. every mapper at every (t, l): word vectors and bypass vectors, [L*N, D] each.
    let mut words = Vec::with_capacity(mappers.len());
    let mut bypasses = Vec::with_capacity(mappers.len());
    for m in mappers {
        let out = m.forward(
            &t_rows,
            &l_rows,
            opts.truncation,
            opts.dropout.as_deref_mut(),
        )?;
        let (w, b) = NetiMapper::split(&out)?;
        words.push(w);
        bypasses.push(b);
    }
    // 2. per-row learned rows [L*N, n_new, D] and the token ids repeated per layer.
    let extra = Tensor::stack(&words, 1)?;
    let ids_rep = ids.repeat((num_layers, 1))?;
    let (keys, values) = bypass_contexts(te, &ids_rep, &extra, &bypasses, alpha)?;
    let mut per_layer = Vec::with_capacity(num_layers);
    let mut contextual = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let k = keys.narrow(0, l * n, n)?;
        let v = values.narrow(0, l * n, n)?;
        contextual.push(k.clone());
        per_layer.push((k, v));
    }
    Ok(Encoded {
        cond: Conditioning::PerLayer(per_layer),
        contextual,
    })
}

/// The text encoder's hidden states before its final layer norm for the embeddings `emb`
/// `[R, S, D]` of the token rows `ids`: rows with the same ids (NeTI's copies of one prompt, one
/// per UNet layer) go through `TextEncoder::encode_shared_prefix_pre_ln` together, which runs
/// the tokens before their first new token once for all of them; the result is in `ids`' order.
pub fn encode_by_prompt(te: &TextEncoder, ids: &[Vec<u32>], emb: &Tensor) -> Result<Tensor> {
    let vocab = te.config.vocab_size as u32;
    let mut groups: Vec<(&[u32], Vec<u32>)> = Vec::new();
    for (r, row) in ids.iter().enumerate() {
        match groups.iter_mut().find(|(k, _)| *k == row.as_slice()) {
            Some((_, rows)) => rows.push(r as u32),
            None => groups.push((row, vec![r as u32])),
        }
    }
    if groups.len() == ids.len() {
        return te.encode_embeddings_pre_ln(emb);
    }
    let dev = emb.device();
    let mut parts = Vec::with_capacity(groups.len());
    let mut order = Vec::with_capacity(ids.len());
    for (key, rows) in &groups {
        let prefix = key.iter().position(|&i| i >= vocab).unwrap_or(key.len());
        let members = emb.index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        parts.push(te.encode_shared_prefix_pre_ln(&members, prefix)?);
        order.extend_from_slice(rows);
    }
    // Row r of the result is row inv[r] of the groups' concatenation.
    let mut inv = vec![0u32; ids.len()];
    for (k, &r) in order.iter().enumerate() {
        inv[r as usize] = k as u32;
    }
    Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inv, dev)?, 0)
}

/// Key and value contexts `[R, S, D]` for ids `[R, S]` whose new tokens take their word vectors
/// from `extra` `[R, n_new, D]`: keys `final_ln(E)`, values `final_ln(E')` where `E'` adds NeTI's
/// bypass `alpha * b/|b| * |e|` at every position of new token j, with `b = bypasses[j][row]`.
/// The bypass is gathered and scattered with a one-hot matrix: differentiable, no in-place writes.
pub fn bypass_contexts(
    te: &TextEncoder,
    ids: &Tensor,
    extra: &Tensor,
    bypasses: &[Tensor],
    alpha: f64,
) -> Result<(Tensor, Tensor)> {
    let (r, s) = ids.dims2()?;
    let d = te.config.hidden_size;
    let vocab = te.config.vocab_size as u32;
    let dev = te.device().clone();
    let emb = te.embed_tokens(ids, Some(extra))?;
    let id_rows: Vec<Vec<u32>> = ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
    let e = encode_by_prompt(te, &id_rows, &emb)?;
    let keys = te.final_layer_norm(&e)?;
    let mut entries = Vec::new(); // (row, position, token index)
    for (row, ids_row) in id_rows.iter().enumerate() {
        for (p, &id) in ids_row.iter().enumerate() {
            if id >= vocab {
                let j = (id - vocab) as usize;
                if j >= bypasses.len() {
                    candle_core::bail!("token id {id} has no bypass vector");
                }
                entries.push((row, p, j));
            }
        }
    }
    let values_pre = if entries.is_empty() {
        e.clone()
    } else {
        let rows = r * s;
        let m = entries.len();
        let mut onehot = vec![0f32; rows * m];
        for (k, &(row, p, _)) in entries.iter().enumerate() {
            onehot[(row * s + p) * m + k] = 1.0;
        }
        let p_mat = Tensor::from_vec(onehot, (rows, m), &dev)?.to_dtype(e.dtype())?;
        let e_flat = e.reshape((rows, d))?;
        let gathered = p_mat.t()?.matmul(&e_flat)?; // [m, D]
        let b_sel: Vec<Tensor> = entries
            .iter()
            .map(|&(row, _, j)| bypasses[j].get(row))
            .collect::<Result<_>>()?;
        let b = Tensor::stack(&b_sel, 0)?.to_dtype(e.dtype())?;
        let e_norm = gathered.sqr()?.sum_keepdim(1)?.sqrt()?;
        let b_norm = b.sqr()?.sum_keepdim(1)?.sqrt()?;
        let delta = b
            .broadcast_div(&b_norm)?
            .broadcast_mul(&e_norm)?
            .affine(alpha, 0.0)?;
        (e_flat + p_mat.matmul(&delta)?)?.reshape((r, s, d))?
    };
    let values = te.final_layer_norm(&values_pre)?;
    Ok((keys, values))
}

/// Gather the contextual embeddings at `(row, position)` pairs: `[M, D]`.
pub fn gather_positions(ctx: &Tensor, at: &[(usize, usize)], dev: &Device) -> Result<Tensor> {
    let (n, s, d) = ctx.dims3()?;
    let idx: Vec<u32> = at.iter().map(|&(r, p)| (r * s + p) as u32).collect();
    let idx = Tensor::new(idx, dev)?;
    ctx.reshape((n * s, d))?.index_select(&idx, 0)
}
