//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//! moments), with its state exposed so checkpoints resume bit-exactly (candle_nn's AdamW keeps its
//! moments private).

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (SPEC.md §3: betas 0.9/0.999, eps 1e-8, weight decay 1e-2).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// AdamW over a list of variables.
pub struct AdamW {
    pub vars: Vec<Var>,
    /// First moments, one per variable.
    pub m: Vec<Tensor>,
    /// Second moments, one per variable.
    pub v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub t: usize,
    pub cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            t: 0,
            cfg,
        })
    }

    /// One update with learning rate `lr`. A variable without a gradient still decays and moves
    /// with its moments, as in PyTorch only if it had a gradient before; here it is skipped.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step_impl(grads, lr, true)
    }

    fn step_impl(&mut self, grads: &GradStore, lr: f64, fused: bool) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(var.dtype())?;
            let one_pass = if fused {
                fused_cpu_f32(var, &g, &self.m[i], &self.v[i], c, lr, (bc1, bc2))?
            } else {
                None
            };
            if let Some((p, m, v)) = one_pass {
                self.m[i] = m;
                self.v[i] = v;
                var.set(&p)?;
                continue;
            }
            // 1. decoupled weight decay: p <- p (1 - lr wd)
            let p = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            // 2. moments
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            // 3. p <- p - lr * m_hat / (sqrt(v_hat) + eps), in PyTorch's order of operations
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + c.eps)?;
            let upd = ((&self.m[i] / denom)? * (lr / bc1))?;
            var.set(&(p - upd)?)?;
        }
        Ok(())
    }
}

/// The update of one f32 CPU variable in one pass over its values (a DreamBooth step updates
/// 860 M of them: the tensor form below makes ten passes and as many temporaries). The same
/// operations in the same order and precision as the tensor form, so both give the same bits:
/// `p (1 - lr wd)`, `m b1 + g (1 - b1)`, `v b2 + g^2 (1 - b2)`,
/// `p - m / (sqrt(v) / sqrt(bc2) + eps) * (lr / bc1)`, each scalar factor rounded to f32 as
/// candle's `affine` rounds it. `None` off the CPU or in other dtypes.
fn fused_cpu_f32(
    var: &Var,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: AdamWConfig,
    lr: f64,
    (bc1, bc2): (f64, f64),
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    use candle_core::{DType, Device};
    let all_cpu_f32 = [var.as_tensor(), g, m, v]
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32);
    if !all_cpu_f32 {
        return Ok(None);
    }
    let flat = |t: &Tensor| -> Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
    let (mut p, gv, mut mv, mut vv) = (flat(var.as_tensor())?, flat(g)?, flat(m)?, flat(v)?);
    let decay = (1.0 - lr * c.weight_decay) as f32;
    let (b1, nb1) = (c.beta1 as f32, (1.0 - c.beta1) as f32);
    let (b2, nb2) = (c.beta2 as f32, (1.0 - c.beta2) as f32);
    let inv_bc2 = (1.0 / bc2.sqrt()) as f32;
    let eps = c.eps as f32;
    let step = (lr / bc1) as f32;
    for (((p, &g), m), v) in p.iter_mut().zip(&gv).zip(mv.iter_mut()).zip(vv.iter_mut()) {
        let pd = *p * decay;
        *m = *m * b1 + g * nb1;
        *v = *v * b2 + (g * g) * nb2;
        let denom = v.sqrt() * inv_bc2 + eps;
        *p = pd - (*m / denom) * step;
    }
    let shape = var.shape().clone();
    let dev = var.device();
    Ok(Some((
        Tensor::from_vec(p, shape.clone(), dev)?,
        Tensor::from_vec(mv, shape.clone(), dev)?,
        Tensor::from_vec(vv, shape, dev)?,
    )))
}

/// Sum two gradient stores over `vars` (gradient accumulation).
pub fn accumulate(acc: Option<GradStore>, new: GradStore, vars: &[Var]) -> Result<GradStore> {
    let Some(mut acc) = acc else {
        return Ok(new);
    };
    for v in vars {
        if let Some(g) = new.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    /// The one-pass f32 CPU update gives the tensor form's bits, over three steps with
    /// weight decay (so the moments and bias corrections all matter).
    #[test]
    fn fused_update_equals_the_tensor_form_bit_for_bit() {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(3);
        let p0 = rng.randn((7, 5), &dev).unwrap();
        let grads: Vec<Tensor> = (0..3).map(|_| rng.randn((7, 5), &dev).unwrap()).collect();
        let run = |fused: bool| {
            let var = Var::from_tensor(&p0).unwrap();
            let mut opt = AdamW::new(vec![var.clone()], AdamWConfig::default()).unwrap();
            for g in &grads {
                let loss = (var.as_tensor() * g).unwrap().sum_all().unwrap();
                let gs = loss.backward().unwrap();
                opt.step_impl(&gs, 1e-2, fused).unwrap();
            }
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            (bits(var.as_tensor()), bits(&opt.m[0]), bits(&opt.v[0]))
        };
        assert_eq!(run(true), run(false));
    }
}
