//! Scaled dot-product attention that never keeps the softmax matrix.
//!
//! The forward pass runs over blocks of queries, so at most one block's `[B, H, q, k]` scores
//! exist at a time (SD 1.5's 64 x 64 self-attention has 4096 x 4096 scores per head: 512 MB per
//! batch element in f32). The backward pass recomputes each block's softmax from `q` and `k` and
//! forms the input gradients from it (the recomputation trick of FlashAttention, Dao et al. 2022,
//! at block granularity):
//! `dV = P^T dO`, `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`, `dQ = s dS K`, `dK = s dS^T Q`.
//! The graph keeps only `q`, `k`, `v` and the output. In f32 on the CPU, both directions run as
//! fused kernels ([`cpu`]): for `[B, H, L, d]` inputs without a mask ([`attention_blocks`]), and
//! for merged heads `[B, L, H * d]` without a mask or with one `[Lq, Lk]` mask for all
//! ([`attention_merged`]); elsewhere, as tensor ops over query blocks. The fused forward also
//! keeps each query row's log-sum-exp (one value a row), so the fused backward rebuilds the
//! probabilities tile by tile over queries and keys, as FlashAttention-2 does.

mod cpu;

use super::attach::{attach, Value};
use candle_core::{Result, Tensor, D};

/// Elements of one block's score matrix (`B * H * q_block * k_len`): 4 M f32 = 16 MB, small
/// enough that the allocator recycles the blocks instead of mapping fresh pages for each (glibc
/// maps anything over 32 MB afresh, and the page faults cost more than the products).
const BLOCK_ELEMS: usize = 1 << 22;

/// Queries per block for `bh` batch x heads and `k_len` keys, at most `budget` scores a block.
fn block_len(budget: usize, bh: usize, q_len: usize, k_len: usize) -> usize {
    (budget / (bh * k_len).max(1)).clamp(1, q_len.max(1))
}

/// The rows `[start, start + len)` of an additive mask broadcastable to `[B, H, q, k]`.
fn mask_rows(mask: Option<&Tensor>, start: usize, len: usize) -> Result<Option<Tensor>> {
    match mask {
        None => Ok(None),
        Some(m) => {
            let r = m.rank();
            if r >= 2 && m.dim(r - 2)? > 1 {
                Ok(Some(m.narrow(r - 2, start, len)?))
            } else {
                Ok(Some(m.clone()))
            }
        }
    }
}

/// Softmax of one block's scores `q_blk k^T * scale (+ mask)`.
fn block_probs(q_blk: &Tensor, kt: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let mut s = (q_blk.matmul(kt)? * scale)?;
    if let Some(m) = mask {
        s = s.broadcast_add(&m.to_dtype(s.dtype())?)?;
    }
    // No backward needed: nothing here is differentiated through candle.
    super::softmax::softmax_last_dim(&s)
}

/// Attention without a graph, block by block over the queries. All inputs contiguous. With the
/// fused kernels, also the rows' log-sum-exps, for their backward.
fn forward_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    budget: usize,
) -> Result<(Value, Option<Vec<f32>>)> {
    if mask.is_none() {
        if let Some(f) = cpu::forward(q, k, v, scale, None, None)? {
            return Ok((f.out, Some(f.lse)));
        }
    }
    let (b, h, q_len, _) = q.dims4()?;
    let k_len = k.dim(2)?;
    let kt = k.t()?;
    let blk = block_len(budget, b * h, q_len, k_len);
    let mut outs = Vec::with_capacity(q_len.div_ceil(blk));
    let mut start = 0;
    while start < q_len {
        let len = blk.min(q_len - start);
        let m = mask_rows(mask, start, len)?;
        let p = block_probs(&q.narrow(2, start, len)?, &kt, scale, m.as_ref())?;
        outs.push(p.matmul(v)?);
        start += len;
    }
    Ok((Tensor::cat(&outs, 2)?.into(), None))
}

/// Input gradients `(dq, dk, dv)` given the output `o` and its gradient `g`.
#[allow(clippy::too_many_arguments)]
fn backward_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    g: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    budget: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, q_len, _) = q.dims4()?;
    let k_len = k.dim(2)?;
    let kt = k.t()?;
    let vt = v.t()?;
    let blk = block_len(budget, b * h, q_len, k_len);
    let mut dqs = Vec::with_capacity(q_len.div_ceil(blk));
    let mut dk: Option<Tensor> = None;
    let mut dv: Option<Tensor> = None;
    let acc = |a: Option<Tensor>, x: Tensor| -> Result<Option<Tensor>> {
        Ok(Some(match a {
            None => x,
            Some(a) => (a + x)?,
        }))
    };
    let mut start = 0;
    while start < q_len {
        let len = blk.min(q_len - start);
        let q_b = q.narrow(2, start, len)?;
        let g_b = g.narrow(2, start, len)?;
        let m = mask_rows(mask, start, len)?;
        let p = block_probs(&q_b, &kt, scale, m.as_ref())?;
        dv = acc(dv, p.t()?.matmul(&g_b)?)?;
        let dp = g_b.matmul(&vt)?;
        let rows = (&g_b * o.narrow(2, start, len)?)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&rows)?)?;
        dqs.push((ds.matmul(k)? * scale)?);
        dk = acc(dk, (ds.t()?.matmul(&q_b)? * scale)?)?;
        start += len;
    }
    let none = || candle_core::Error::Msg("attention: no queries".into());
    Ok((
        Tensor::cat(&dqs, 2)?,
        dk.ok_or_else(none)?,
        dv.ok_or_else(none)?,
    ))
}

/// `softmax(q k^T / sqrt(d) + mask) v` for `[B, H, L, d]` inputs and an optional additive mask
/// (no gradient) broadcastable to `[B, H, Lq, Lk]`. Differentiable in `q`, `k` and `v`.
pub fn attention_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    attention_with_budget(q, k, v, mask, super::block_budget(q, BLOCK_ELEMS))
}

/// Attention of `q` `[B, Lq, H * d]` over `k`, `v` `[B, Lk, H * d]` in `heads` heads, with an
/// optional additive mask (no gradient) broadcastable to `[B, H, Lq, Lk]`, as `[B, Lq, H * d]`:
/// the layout that linear layers give and take. On the CPU in f32, with no mask or one `[Lq, Lk]`
/// matrix for all (CLIP's causal mask), the fused kernels read and write the heads in place, so
/// neither the split of `q`, `k`, `v` nor the merge of the output is copied, nor kept by the
/// graph; elsewhere it splits, runs `attention_blocks` and merges. Differentiable in `q`, `k`
/// and `v`.
pub fn attention_merged(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let d = q.dim(D::Minus1)? / heads.max(1);
    let scale = 1.0 / (d as f64).sqrt();
    let mask = mask.map(|m| m.detach());
    let fused = cpu::forward(
        &q.detach(),
        &k.detach(),
        &v.detach(),
        scale,
        Some(heads),
        mask.as_ref(),
    )?;
    let Some(cpu::Forward { out, lse }) = fused else {
        let split = |t: &Tensor| super::split_heads(t, heads);
        let o = attention_blocks(&split(&q)?, &split(&k)?, &split(&v)?, mask.as_ref())?;
        return super::merge_heads(&o);
    };
    attach(
        "attention-merged-heads",
        &[&q, &k, &v],
        out,
        Box::new(move |args, o, g| {
            let need: Vec<bool> = args.iter().map(|a| a.track_op()).collect();
            let (q, k, v) = (args[0].detach(), args[1].detach(), args[2].detach());
            let (g, o) = (g.contiguous()?, o.detach());
            let (dq, dk, dv) =
                cpu::backward(&q, &k, &v, &o, &g, &lse, scale, Some(heads), mask.as_ref())?
                    .ok_or_else(|| {
                        candle_core::Error::Msg("attention: fused backward unavailable".into())
                    })?;
            Ok(vec![
                need[0].then_some(dq),
                need[1].then_some(dk),
                need[2].then_some(dv),
            ])
        }),
    )
}

/// [`attention_blocks`] with at most `budget` scores per block.
fn attention_with_budget(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    budget: usize,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mask = mask.map(|m| m.detach());
    let (o, lse) = forward_blocks(
        &q.detach(),
        &k.detach(),
        &v.detach(),
        mask.as_ref(),
        scale,
        budget,
    )?;
    attach(
        "attention",
        &[&q, &k, &v],
        o,
        Box::new(move |args, o, g| {
            let need: Vec<bool> = args.iter().map(|a| a.track_op()).collect();
            let (q, k, v) = (args[0].detach(), args[1].detach(), args[2].detach());
            let (g, o) = (g.contiguous()?, o.detach());
            let fused = match (&mask, &lse) {
                (None, Some(lse)) => cpu::backward(&q, &k, &v, &o, &g, lse, scale, None, None)?,
                _ => None,
            };
            let (dq, dk, dv) = match fused {
                Some(grads) => grads,
                None => backward_blocks(&q, &k, &v, &o, &g, mask.as_ref(), scale, budget)?,
            };
            Ok(vec![
                need[0].then_some(dq),
                need[1].then_some(dk),
                need[2].then_some(dv),
            ])
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, randn};
    use candle_core::{DType, Device, Var};

    /// The f32 gradients `g1` of `vars` against the f64 reference `g2` of `reference`, each
    /// within `1e-4` of the reference's largest magnitude (at least 1).
    fn assert_grads_close(
        g1: &candle_core::backprop::GradStore,
        vars: &[Var],
        g2: &candle_core::backprop::GradStore,
        reference: &[Var],
        what: &str,
    ) {
        for (i, (v, r)) in vars.iter().zip(reference).enumerate() {
            let a = g1.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
            let e = g2.get(r.as_tensor()).unwrap();
            let diff = max_diff(&a, e);
            assert!(
                diff < 1e-4 * crate::nn::testing::max_abs(e).max(1.0),
                "gradient {i} {what}: {diff}"
            );
        }
    }

    /// Values and q/k/v gradients equal the composed attention's (whose backward is candle's),
    /// with and without a causal mask, in one block and in several uneven ones.
    #[test]
    fn blocks_match_composed_attention() {
        let (b, h, lq, lk, d) = (2, 3, 7, 5, 4);
        let causal: Vec<f64> = (0..lq)
            .flat_map(|i| (0..lk).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, lq, lk), &Device::Cpu).unwrap();
        let r = randn(&[b, h, lq, d], 4);
        for (mask, budget) in [
            (None, 1 << 20),
            (None, b * h * lk * 3),
            (Some(&causal), b * h * lk * 2),
            (Some(&causal), 1),
        ] {
            let vars: Vec<Var> = [(lq, 1), (lk, 2), (lk, 3)]
                .iter()
                .map(|&(l, s)| Var::from_tensor(&randn(&[b, h, l, d], s)).unwrap())
                .collect();
            let (q, k, v) = (
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
            );
            let ours = attention_with_budget(q, k, v, mask, budget).unwrap();
            let reference = super::super::attention_composed(q, k, v, mask).unwrap();
            assert!(
                max_diff(&ours, &reference) < 1e-12,
                "forward, budget {budget}"
            );
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, var) in vars.iter().enumerate() {
                let a = g1.get(var.as_tensor()).unwrap();
                let e = g2.get(var.as_tensor()).unwrap();
                assert!(max_diff(a, e) < 1e-12, "gradient {i}, budget {budget}");
            }
        }
    }

    /// The fused CPU kernels (f32) against the composed attention in f64: self- and
    /// cross-attention shapes, one tile and several with uneven tails in queries and keys, one
    /// head whose key blocks are split over groups (summed dQ); values, and gradients through the
    /// differentiable entry point.
    #[test]
    fn fused_cpu_kernels_match_composed_attention() {
        if !crate::nn::softmax::simd_available() {
            return;
        }
        for (b, h, lq, lk, d) in [
            (2, 3, 9, 77, 8),
            (1, 2, 300, 1000, 16),
            (1, 1, 600, 2048, 8),
        ] {
            let xs: Vec<Tensor> = [(lq, 11), (lk, 12), (lk, 13)]
                .iter()
                .map(|&(l, s)| randn(&[b, h, l, d], s))
                .collect();
            let scale = 1.0 / (d as f64).sqrt();
            let f32s: Vec<Tensor> = xs.iter().map(|x| x.to_dtype(DType::F32).unwrap()).collect();
            let fused = cpu::forward(&f32s[0], &f32s[1], &f32s[2], scale, None, None)
                .unwrap()
                .expect("the fused path applies to f32 CPU tensors")
                .out
                .into_tensor()
                .unwrap();
            let reference = super::super::attention_composed(&xs[0], &xs[1], &xs[2], None).unwrap();
            let diff = max_diff(&fused.to_dtype(DType::F64).unwrap(), &reference);
            assert!(diff < 1e-5, "forward {lq}x{lk}: {diff}");
            // Through the differentiable entry point: f32 values and gradients.
            let vars: Vec<Var> = f32s.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
            let r = randn(&[b, h, lq, d], 14).to_dtype(DType::F32).unwrap();
            let ours = attention_blocks(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                None,
            )
            .unwrap();
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let rv: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
            let expect = super::super::attention_composed(
                rv[0].as_tensor(),
                rv[1].as_tensor(),
                rv[2].as_tensor(),
                None,
            )
            .unwrap();
            let g2 = (&expect * &r.to_dtype(DType::F64).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_grads_close(&g1, &vars, &g2, &rv, &format!("{lq}x{lk}"));
        }
    }

    /// The merged-heads entry point (`[B, L, H * d]` in and out, heads read in place) against
    /// split, composed attention, merged, in f64: values and gradients; self- and cross-attention
    /// shapes, one head's key blocks over several groups (dQ summed into the merged layout, with
    /// and without CLIP's causal mask), a causal mask over several forward key tiles (whose
    /// later tiles are all masked for the first rows), and a batch of two with several heads.
    #[test]
    fn merged_heads_match_split_composed_attention() {
        if !crate::nn::softmax::simd_available() {
            return;
        }
        let causal = |l: usize| {
            let v: Vec<f32> = (0..l)
                .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Tensor::from_vec(v, (1, 1, l, l), &Device::Cpu).unwrap()
        };
        for (b, h, lq, lk, d, masked) in [
            (2, 3, 9, 77, 8, false),
            (1, 2, 600, 2048, 8, false),
            (2, 4, 300, 300, 16, false),
            (3, 2, 77, 77, 8, true),
            (1, 2, 300, 300, 8, true),
            (1, 2, 600, 600, 8, true),
        ] {
            let mask = masked.then(|| causal(lq));
            let mask64 = mask.as_ref().map(|m| m.to_dtype(DType::F64).unwrap());
            let xs: Vec<Tensor> = [(lq, 21), (lk, 22), (lk, 23)]
                .iter()
                .map(|&(l, s)| randn(&[b, l, h * d], s))
                .collect();
            let r = randn(&[b, lq, h * d], 24);
            let vars: Vec<Var> = xs
                .iter()
                .map(|x| Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap())
                .collect();
            let ours = attention_merged(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                h,
                mask.as_ref(),
            )
            .unwrap();
            assert_eq!(ours.dims(), &[b, lq, h * d]);
            let g1 = (&ours * &r.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let rv: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
            let split = |t: &Tensor| crate::nn::split_heads(t, h).unwrap();
            let expect = crate::nn::merge_heads(
                &super::super::attention_composed(
                    &split(rv[0].as_tensor()),
                    &split(rv[1].as_tensor()),
                    &split(rv[2].as_tensor()),
                    mask64.as_ref(),
                )
                .unwrap(),
            )
            .unwrap();
            let diff = max_diff(&ours.to_dtype(DType::F64).unwrap(), &expect);
            assert!(diff < 1e-5, "forward {b}x{h} {lq}x{lk}: {diff}");
            let g2 = (&expect * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_grads_close(&g1, &vars, &g2, &rv, &format!("{b}x{h} {lq}x{lk}"));
        }
    }
}
