//! The attractor paper's losses in one file (SPEC.md §5): the plain and masked noise-prediction
//! MSE, the InfoNCE of Eq. 5 between subject and attractor contextual embeddings, and the weighted
//! total `w_s L_sub + w_b L_bg + w_i L_joint + w_c s(p) L_nce`.
//!
//! Everything is built from ops with a candle backward (no fused softmax / log-sum-exp): a missing
//! gradient would silently freeze the tokens (SPEC.md §1).

use candle_core::{bail, DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// Mean squared error over all elements (diffusers' `F.mse_loss(..., reduction="mean")`).
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        bail!(
            "mse: prediction {:?} and target {:?} differ in shape",
            pred.dims(),
            target.dims()
        );
    }
    (pred - target)?.sqr()?.mean_all()
}

/// `mse(pred * M, target * M)`, mean over ALL elements (not over the mask's support), with `mask`
/// `[B, 1, H, W]` (or any shape broadcastable to `pred`) broadcast over the channels.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(pred.dtype())?;
    mse(&pred.broadcast_mul(&mask)?, &target.broadcast_mul(&mask)?)
}

/// Custom Diffusion's masked instance loss: the mean of `(pred - target)^2` over the elements
/// the mask keeps, `sum((pred - target)^2 * mask) / sum(mask broadcast over channels)` for
/// `pred` `[B, C, h, w]` and `mask` `[B, 1, h, w]`, averaged over the batch. diffusers'
/// `train_custom_diffusion.py` divides by the 1-channel mask's sum instead, which scales the
/// loss (and the learning rate's effect) by C = 4; we follow the per-element mean, as the
/// reference goldens do (SPEC.md §8).
pub fn masked_mean_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(pred.dtype())?;
    let (b, c) = (pred.dim(0)?, pred.dim(1)?);
    let sq = (pred - target)?.sqr()?.broadcast_mul(&mask)?;
    let num = sq.reshape((b, ()))?.sum(1)?;
    let den = (mask.reshape((b, ()))?.sum(1)? * c as f64)?;
    num.div(&den.clamp(1e-12, f64::MAX)?)?.mean_all()
}

/// `log(sum(exp(x)))` over all elements of a 1-D tensor, stable and differentiable: the max is
/// detached because it only shifts the exponent.
fn logsumexp_1d(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(0)?.detach();
    x.broadcast_sub(&m)?.exp()?.sum_keepdim(0)?.log()? + m
}

/// Rows divided by their L2 norm.
fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&n)
}

/// InfoNCE of the paper's Eq. 5 over subject embeddings `v` `[Nv, D]` and attractor embeddings
/// `a` `[Na, D]`, both L2-normalised here:
/// `L = -log(S_P / (S_P + S_N))`, `S_P = sum_{i != j} exp(v_i.v_j / tau)` over ordered pairs,
/// `S_N = sum_{i,k} exp(v_i.a_k / tau)`; computed as `lse(P u N) - lse(P)`. Returns a scalar.
pub fn info_nce(v: &Tensor, a: &Tensor, tau: f64) -> Result<Tensor> {
    let (nv, d) = v.dims2()?;
    let (na, da) = a.dims2()?;
    if d != da {
        bail!("info_nce: subject width {d} and attractor width {da} differ");
    }
    if nv < 2 {
        bail!("info_nce: needs at least 2 subject embeddings for a positive pair, got {nv}");
    }
    if na == 0 {
        bail!("info_nce: no attractor embeddings");
    }
    if tau <= 0.0 {
        bail!("info_nce: temperature must be positive, got {tau}");
    }
    let dtype = v.dtype();
    let v = l2_normalize_rows(&v.to_dtype(DType::F32)?)?;
    let a = l2_normalize_rows(&a.to_dtype(DType::F32)?)?;
    let s_vv = (v.matmul(&v.t()?)? / tau)?.flatten_all()?;
    let s_va = (v.matmul(&a.t()?)? / tau)?.flatten_all()?;
    // The off-diagonal entries of the row-major [Nv, Nv] matrix: the ordered pairs i != j.
    let off: Vec<u32> = (0..nv)
        .flat_map(|i| {
            (0..nv)
                .filter(move |&j| j != i)
                .map(move |j| (i * nv + j) as u32)
        })
        .collect();
    let off = Tensor::new(off.as_slice(), v.device())?;
    let pos = s_vv.index_select(&off, 0)?;
    let all = Tensor::cat(&[&pos, &s_va], 0)?;
    (logsumexp_1d(&all)? - logsumexp_1d(&pos)?)?
        .squeeze(0)?
        .to_dtype(dtype)
}

/// The four terms of the attractor objective, each a scalar tensor.
#[derive(Clone, Debug)]
pub struct LossParts {
    /// `mse(M_s * pred_sub, M_s * eps)`.
    pub sub: Tensor,
    /// `mse(M_b * pred_bg, M_b * eps)`.
    pub bg: Tensor,
    /// `mse(pred_joint, eps)`.
    pub joint: Tensor,
    /// InfoNCE (in neti+: averaged over the 16 layers).
    pub nce: Tensor,
}

/// The weights of the attractor objective (SPEC.md §5; the paper gives no values, ours).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LossWeights {
    /// Weight of the masked subject loss (default 1).
    pub w_s: f64,
    /// Weight of the masked background loss (default 1).
    pub w_b: f64,
    /// Weight of the joint (unmasked) loss (default 1).
    pub w_i: f64,
    /// Weight of the contrastive loss before the schedule (default 0.1).
    pub w_c: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            w_s: 1.0,
            w_b: 1.0,
            w_i: 1.0,
            w_c: 0.1,
        }
    }
}

/// `w_s L_sub + w_b L_bg + w_i L_joint + w_c * s(p) * L_nce` (SPEC.md §5), `schedule_weight` = s(p).
pub fn total_loss(
    parts: &LossParts,
    weights: &LossWeights,
    schedule_weight: f64,
) -> Result<Tensor> {
    let terms = [
        (parts.sub.affine(weights.w_s, 0.0))?,
        (parts.bg.affine(weights.w_b, 0.0))?,
        (parts.joint.affine(weights.w_i, 0.0))?,
        (parts.nce.affine(weights.w_c * schedule_weight, 0.0))?,
    ];
    let mut total = terms[0].clone();
    for t in &terms[1..] {
        total = (total + t)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn masked_mse_by_hand() {
        let dev = Device::Cpu;
        // pred - eps per element (B=1, C=2, H=1, W=2): [[1, 2], [3, 4]]; mask [1, 0].
        let pred = Tensor::new(&[[[[1f32, 2.]], [[3., 4.]]]], &dev).unwrap();
        let eps = Tensor::zeros((1, 2, 1, 2), DType::F32, &dev).unwrap();
        let mask = Tensor::new(&[[[[1f32, 0.]]]], &dev).unwrap();
        // kept: 1 and 3 -> (1 + 9) / 4 elements = 2.5 (mean over all, not over the mask).
        let l = masked_mse(&pred, &eps, &mask).unwrap();
        assert!((scalar(&l) - 2.5).abs() < 1e-6);
        let inv = (1.0 - &mask).unwrap();
        let lb = masked_mse(&pred, &eps, &inv).unwrap();
        assert!((scalar(&lb) - 5.0).abs() < 1e-6); // (4 + 16) / 4
        let full = mse(&pred, &eps).unwrap();
        assert!((scalar(&full) - 7.5).abs() < 1e-6);
        assert!(mse(&pred, &mask).is_err());
    }

    #[test]
    fn masked_mse_gradient_is_zero_outside_the_mask() {
        let dev = Device::Cpu;
        let p = Var::from_tensor(&Tensor::new(&[[[[1f32, 2.]]]], &dev).unwrap()).unwrap();
        let eps = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev).unwrap();
        let mask = Tensor::new(&[[[[1f32, 0.]]]], &dev).unwrap();
        let g = masked_mse(p.as_tensor(), &eps, &mask)
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f32> = g.get(&p).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // d/dp (p^2 / 2) = p for the kept element; 0 for the masked one.
        assert_eq!(g, vec![1.0, 0.0]);
    }

    #[test]
    fn info_nce_by_hand() {
        let dev = Device::Cpu;
        // v = two copies of e1 (scaled, to check the normalisation); a = one vector e2.
        // S_P = 2 exp(1/tau), S_N = 2 exp(0) = 2; L = -log(S_P / (S_P + S_N)) = log(1 + exp(-1/tau)).
        let tau = 0.5;
        let v = Tensor::new(&[[3f32, 0.], [0.5, 0.]], &dev).unwrap();
        let a = Tensor::new(&[[0f32, 2.]], &dev).unwrap();
        let l = scalar(&info_nce(&v, &a, tau).unwrap());
        let want = (1.0 + (-1.0f64 / tau).exp()).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // Orthogonal subject vectors e1, e2 against attractor e1: S_P = 2 exp(0) = 2,
        // S_N = exp(1/tau) + exp(0); L = log((2 + e^(1/tau) + 1) / 2).
        let v = Tensor::new(&[[1f32, 0.], [0., 1.]], &dev).unwrap();
        let a = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
        let l = scalar(&info_nce(&v, &a, tau).unwrap());
        let want = ((3.0 + (1.0f64 / tau).exp()) / 2.0).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // Large logits (tau tiny) stay finite thanks to the log-sum-exp.
        let l = scalar(&info_nce(&v, &a, 1e-3).unwrap());
        assert!(
            l.is_finite() && (l - (1.0 / 1e-3 - 2f64.ln())).abs() < 1e-2,
            "{l}"
        );
        assert!(info_nce(&a, &v, tau).is_err()); // one subject vector: no positive pair
    }

    #[test]
    fn total_loss_weighs_each_part() {
        let dev = Device::Cpu;
        let s = |x: f32| Tensor::new(x, &dev).unwrap();
        let parts = LossParts {
            sub: s(1.0),
            bg: s(2.0),
            joint: s(4.0),
            nce: s(8.0),
        };
        let w = LossWeights::default();
        // 1 + 2 + 4 + 0.1 * 0.5 * 8 = 7.4
        assert!((scalar(&total_loss(&parts, &w, 0.5).unwrap()) - 7.4).abs() < 1e-6);
        let w = LossWeights {
            w_s: 2.0,
            w_b: 0.0,
            w_i: 0.5,
            w_c: 1.0,
        };
        // 2 + 0 + 2 + 1 * 0 * 8 = 4
        assert!((scalar(&total_loss(&parts, &w, 0.0).unwrap()) - 4.0).abs() < 1e-6);
        let w: LossWeights = toml::from_str("w_c = 0.3").unwrap();
        assert_eq!((w.w_s, w.w_b, w.w_i, w.w_c), (1.0, 1.0, 1.0, 0.3));
        assert!(toml::from_str::<LossWeights>("w_x = 1.0").is_err());
    }
}
